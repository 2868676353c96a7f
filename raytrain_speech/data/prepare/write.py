"""Writing a plan: one Parquet shard per ``ShardJob`` (audio bytes copied as they are), the resume
state, the list of skipped inputs, and last the manifest, merged with the splits already there.

Resumable: the plan has a fingerprint, and ``<root>/<split>/.prepare-state.json`` records it and every
finished shard. Re-running the same command writes only the shards still missing; a run whose input
or settings changed is refused instead of mixing two plans in one split.
"""

from __future__ import annotations

import json
import posixpath
from concurrent.futures import ThreadPoolExecutor

from raytrain_speech import storage
from raytrain_speech.config import ConfigError, StorageConfig
from raytrain_speech.data import shards
from raytrain_speech.data.prepare.plan import Plan, Skip, Utterance
from raytrain_speech.data.prepare.probe import IO_THREADS, Files
from raytrain_speech.storage import StorageError

STATE_FILE = ".prepare-state.json"
SKIPPED_FILE = "prepare_skipped.jsonl"


def _read_audio(u: Utterance, files: Files, tars: dict) -> bytes:
    try:
        if u.member_offset is None:
            fs, path = files.resolve(u.audio_uri)
            with fs.open_input_stream(path) as f:
                data = f.read()
        else:
            data = tars[u.audio_uri].read_at(u.size_bytes, u.member_offset)  # positional: thread-safe
    except OSError as err:
        raise StorageError(f"{u.source}: {str(err).splitlines()[0]} (was readable when surveyed; "
                           "re-run to retry)") from None
    if len(data) != u.size_bytes:
        raise StorageError(f"{u.source}: {len(data)} bytes, {u.size_bytes} when surveyed: the input "
                           "changed while preparing; prepare it again into an empty --out")
    return data


def _open_tars(utterances: list[Utterance], files: Files) -> dict:
    """Each tar a shard draws members from, opened once (not once per member)."""
    tars = {}
    for uri in sorted({u.audio_uri for u in utterances if u.member_offset is not None}):
        fs, path = files.resolve(uri)
        try:
            tars[uri] = fs.open_input_file(path)
        except OSError as err:
            raise StorageError(f"{uri}: {str(err).splitlines()[0]} (was readable when surveyed; re-run to retry)") from None
    return tars


def write_shard_job(job: tuple) -> tuple[str, int, float]:
    """Writer task: copy one shard's audio bytes as they are into a Parquet shard."""
    out_uri, shard, storage_cfg = job
    files = Files(storage_cfg)
    tars = _open_tars(shard.utterances, files)
    try:
        with ThreadPoolExecutor(IO_THREADS) as pool:
            blobs = list(pool.map(lambda u: _read_audio(u, files, tars), shard.utterances))
    finally:
        for f in tars.values():
            f.close()
    rows = [{"index": shard.first_index + i, "id": u.id, "audio": data, "sample_rate_hz": u.sample_rate_hz,
             "duration_s": u.duration_s, "text": u.text, "language": u.language, "speaker": u.speaker,
             "phonemes": u.phonemes}
            for i, (u, data) in enumerate(zip(shard.utterances, blobs))]
    shards.write_shard(out_uri, shard.relpath, shards.rows_to_table(rows, phonemes=shard.phonemes), storage_cfg)
    return shard.relpath, len(rows), sum(u.duration_s for u in shard.utterances)


def load_state(state_uri: str, out_uri: str, plan: Plan, record: dict,
               storage_cfg: StorageConfig | None) -> dict:
    """The resume state for this plan: shards an earlier run finished (and that still exist)."""
    fresh = {"fingerprint": plan.fingerprint, "layout": record["layout"], "input": record["input"],
             "config": record["config"], "utterances": sum(len(j.utterances) for j in plan.shards), "shards": {}}
    if not storage.exists(state_uri, storage_cfg):
        return fresh
    try:
        state = json.loads(storage.read_bytes(state_uri, storage_cfg).decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise StorageError(f"{state_uri}: not a valid prepare state file; delete it to start over") from None
    if state.get("fingerprint") != plan.fingerprint:
        split_dir = posixpath.dirname(state_uri)
        old_cfg = state.get("config", {})
        changed = [f"{k} {old_cfg.get(k)!r} -> {v!r}" for k, v in record["config"].items()
                   if k != "workers" and old_cfg.get(k) != v]
        why = (f"settings changed: {', '.join(changed)}" if changed and old_cfg else
               "the input files differ" if old_cfg else "input files or settings differ")
        raise ConfigError(
            f"{split_dir} holds a different prepare ({state.get('layout')} of {state.get('input')}, "
            f"{state.get('utterances')} utterances) than this one ({record['layout']} of {record['input']}, "
            f"{fresh['utterances']} utterances; {why}); "
            f"prepare never mixes two plans in a split: delete {split_dir} to start over, or write to another "
            "--out or --split")
    state["shards"] = {k: v for k, v in state.get("shards", {}).items()
                       if storage.exists(storage.join(out_uri, k), storage_cfg)}
    return state


def write_shards(plan: Plan, state: dict, out_uri: str, split: str, storage_cfg, run_all, log
                 ) -> tuple[shards.SplitInfo, int, int]:
    """Run a writer task per shard the state does not list as done, recording each as it finishes."""
    state_uri = storage.join(out_uri, split, STATE_FILE)
    done = state["shards"]
    todo = [job for job in plan.shards if job.relpath not in done]
    reused = len(plan.shards) - len(todo)
    if reused:
        log(f"prepare: resuming: {reused} of {len(plan.shards)} shards already written, skipping them")
    storage.write_bytes(state_uri, json.dumps(state).encode(), storage_cfg)
    jobs = [(out_uri, job, storage_cfg) for job in todo]
    for n, (_, (relpath, count, seconds)) in enumerate(run_all(write_shard_job, jobs), start=1):
        done[relpath] = {"utterances": count, "duration_s": seconds}
        storage.write_bytes(state_uri, json.dumps(state).encode(), storage_cfg)  # object stores: no append
        log(f"prepare: {n}/{len(todo)} shards written ({relpath}, {count} utterances, {seconds / 60:.1f} min)")
    info = shards.SplitInfo()
    for job in plan.shards:
        info.shards.append(job.relpath)
        info.utterances.append(done[job.relpath]["utterances"])
        info.hours += done[job.relpath]["duration_s"] / 3600
    return info, len(todo), reused


def write_skipped(uri: str, skipped: list[Skip], storage_cfg) -> None:
    """``prepare_skipped.jsonl``: one JSON object a line (id, source, reason) per input left out."""
    lines = "".join(json.dumps({"id": s.id, "source": s.source, "reason": s.reason}) + "\n" for s in skipped)
    storage.write_bytes(uri, lines.encode(), storage_cfg)


def merge_manifest(out_uri: str, split: str, info: shards.SplitInfo, record: dict,
                   storage_cfg) -> shards.Manifest:
    """Replace ``split`` in the root's manifest and keep every other split (e.g. preparing ``test``
    into a root that already has ``train``); ``source.splits`` keeps where each split came from."""
    if storage.exists(storage.join(out_uri, shards.MANIFEST), storage_cfg):
        manifest = shards.read_manifest(out_uri, storage_cfg)
    else:
        manifest = shards.Manifest()
    old = manifest.source or {}
    if old.get("kind") in ("prepare", "webdataset-index"):
        provenance = dict(old.get("splits", {}))
    else:  # e.g. a synthesized corpus getting a prepared split: its splits keep their source
        provenance = {name: old for name in manifest.splits} if old else {}
    provenance[split] = record
    manifest.splits[split] = info
    manifest.source = {**record, "split": split, "splits": provenance}
    shards.write_manifest(out_uri, manifest, storage_cfg)
    return manifest
