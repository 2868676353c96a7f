"""``raytrain-speech prepare --layout webdataset --index-only``: index WebDataset tars where they are.

The tars are surveyed exactly as a full prepare surveys them (members grouped by key, audio header via
``soundfile.info``, ``.txt``/``.json`` transcript), but instead of Parquet shards of audio one small
index Parquet per tar is written (``tars.INDEX_SCHEMA``; data/tars.py says why an index, and reads
it), with the bad members listed in ``prepare_skipped.jsonl`` as a full prepare lists them.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import pyarrow as pa
import pyarrow.parquet as pq

from raytrain_speech import storage
from raytrain_speech.config import ConfigError, StorageConfig, to_dict
from raytrain_speech.data import shards, tars
from raytrain_speech.data.prepare.executor import executor
from raytrain_speech.data.prepare.layouts import locate, survey
from raytrain_speech.data.prepare.plan import (
    PrepareConfig,
    PrepareOutcome,
    Skip,
    Utterance,
    check_unique_ids,
    duration_problem,
)
from raytrain_speech.data.prepare.probe import IO_THREADS
from raytrain_speech.data.prepare.write import SKIPPED_FILE, merge_manifest, write_skipped


def index_name(split: str, number: int) -> str:
    """Where tar ``number``'s index goes, relative to the root (beside the split's skip list)."""
    return f"{split}/index-{number:05d}.parquet"


@dataclass
class TarIndex:
    """One tar's index: its utterances get indices first_index, first_index+1, ... in key order."""

    tar: str
    """The tar as the manifest lists it: relative to the root when under it, else an absolute URI."""
    relpath: str
    first_index: int
    utterances: list[Utterance]


def tar_entry(out_uri: str, tar_uri: str) -> str:
    """A tar as the manifest lists it: relative to the root when under it, else as it is."""
    prefix = out_uri.rstrip("/") + "/"
    return tar_uri[len(prefix):] if tar_uri.startswith(prefix) else tar_uri


def plan_index(tar_uris: list[str], found: list[Utterance], skipped: list[Skip], cfg: PrepareConfig, out_uri: str
               ) -> tuple[list[TarIndex], list[Skip]]:
    """Number the usable utterances tar by tar (tars in listing order, sorted, keys sorted within a
    tar), so shard k holds consecutive indices whatever order the survey finished in; a tar left
    with no usable utterance is not listed (its members are all in the skip list)."""
    check_unique_ids(found, cfg.input)
    by_tar: dict[str, list[Utterance]] = {}
    for u in found:
        by_tar.setdefault(u.audio_uri, []).append(u)
    skipped, jobs, first = list(skipped), [], 0
    for tar in sorted(tar_uris):
        good = []
        for u in sorted(by_tar.get(tar, []), key=lambda u: u.id):
            reason = u.problem or duration_problem(u.duration_s, cfg)
            if reason:
                skipped.append(Skip(u.id, u.source, reason, filtered=not u.problem))
            else:
                good.append(u)
        if good:
            jobs.append(TarIndex(tar_entry(out_uri, tar), index_name(cfg.split, len(jobs)), first, good))
            first += len(good)
    skipped.sort(key=lambda s: (s.id or "", s.source))
    return jobs, skipped


def index_table(job: TarIndex) -> pa.Table:
    """One tar's index rows (``tars.INDEX_SCHEMA``), its metadata naming the tar as the manifest lists it."""
    rows = [{"index": job.first_index + i, "key": u.id, "member": u.member, "size_bytes": u.size_bytes,
             "sample_rate_hz": u.sample_rate_hz, "duration_s": u.duration_s, "text": u.text,
             "language": u.language, "speaker": u.speaker} for i, u in enumerate(job.utterances)]
    return pa.Table.from_pylist(rows, schema=tars.INDEX_SCHEMA.with_metadata({tars.TAR_KEY: job.tar.encode()}))


def write_index(out_uri: str, job: TarIndex, storage_cfg: StorageConfig | None = None) -> None:
    buf = io.BytesIO()
    pq.write_table(index_table(job), buf)
    storage.write_bytes(storage.join(out_uri, job.relpath), buf.getvalue(), storage_cfg)


def index_webdataset(cfg: PrepareConfig, out_uri: str, storage_cfg: StorageConfig | None = None,
                     log: Callable[[str], None] = print) -> PrepareOutcome:
    """``prepare --index-only``: survey the tars (a Ray task each) and write split ``cfg.split`` of
    ``out_uri`` as an index over them; the manifest is written last. Re-running rewrites the index
    (it is a function of the tars and the settings, so the same input gives the same indices)."""
    cfg.validate()
    start = time.time()
    input_uri, out_uri = shards.absolute(cfg.input), shards.absolute(out_uri)
    cfg = replace(cfg, input=input_uri)
    storage.check_reachable(input_uri, storage_cfg)
    storage.check_reachable(out_uri, storage_cfg)
    tar_uris, _ = locate(cfg, input_uri, storage_cfg)
    with executor(cfg.workers) as run_all:
        found, skipped = survey(cfg, tar_uris, [], storage_cfg, run_all)
    jobs, skipped = plan_index(tar_uris, found, skipped, cfg, out_uri)
    n_filtered = sum(s.filtered for s in skipped)
    skipped_uri = storage.join(out_uri, cfg.split, SKIPPED_FILE)
    write_skipped(skipped_uri, skipped, storage_cfg)
    if not jobs:
        detail = f" (e.g. {skipped[0].source}: {skipped[0].reason}; all listed in {skipped_uri})" if skipped else ""
        raise ConfigError(f"{input_uri}: no usable utterance in {len(tar_uris)} tars{detail}")
    with ThreadPoolExecutor(IO_THREADS) as pool:
        list(pool.map(lambda job: write_index(out_uri, job, storage_cfg), jobs))
    info = shards.SplitInfo([j.tar for j in jobs], [len(j.utterances) for j in jobs],
                            sum(u.duration_s for j in jobs for u in j.utterances) / 3600)
    record = {"kind": tars.INDEX_KIND, "layout": "webdataset", "input": input_uri, "index": [j.relpath for j in jobs],
              "skipped": len(skipped) - n_filtered, "filtered": n_filtered, "config": to_dict(cfg)}
    log(f"prepare: indexed {info.num_utterances} utterances in {len(jobs)} tars; {record['skipped']} bad inputs "
        f"and {n_filtered} outside the duration limits left out")
    manifest = merge_manifest(out_uri, cfg.split, info, record, storage_cfg)
    return PrepareOutcome(manifest, cfg.split, record["skipped"], n_filtered, len(jobs), 0, skipped_uri,
                          time.time() - start)
