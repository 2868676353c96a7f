"""Writing a plan: one Parquet shard per ``ShardJob`` (audio bytes copied as they are, each file
decoded on the way and left out if it does not decode in full), the resume state, the list of skipped
inputs, and last the manifest, merged with the splits already there.

Indices: a shard's rows hold consecutive indices and the shards follow each other in manifest order
(``shards.first_indices``), so a file left out at write time shifts every later shard's indices. A
shard's first index is therefore decided when its writer task is handed out, from the counts of the
shards finished by then (``executor`` hands jobs out one at a time); a shard handed out while an
earlier one was still being written, and that earlier one then lost a file, has its index column
rewritten at the end (``renumber_shard_job``): the rows of the shards in flight at worst, and only
when a file was left out.

Resumable: the plan has a fingerprint, and ``<root>/<split>/.prepare-state.json`` records it and every
finished shard (its rows, hours, first index and files left out). Re-running the same command writes
only the shards still missing; a run whose input or settings changed is refused instead of mixing two
plans in one split.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pyarrow as pa

from raytrain_speech import storage
from raytrain_speech.config import ConfigError, StorageConfig
from raytrain_speech.data import shards
from raytrain_speech.data.prepare.plan import Plan, ShardJob, Skip, Utterance
from raytrain_speech.data.prepare.probe import IO_THREADS, Files, decode_check
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


def _read_checked(u: Utterance, files: Files, tars: dict) -> tuple[bytes, int, float, str]:
    """(bytes, sample_rate_hz, decoded duration_s, problem) of one utterance's audio: read, then decoded
    in full from the bytes in memory (in the reading thread, so decoding overlaps the other reads)."""
    data = _read_audio(u, files, tars)
    return (data, *decode_check(data))


def write_shard_job(job: tuple) -> dict:
    """Writer task: copy one shard's audio bytes as they are into a Parquet shard, leaving out the files
    that do not decode in full; the rows get indices ``shard.first_index``, +1, ... in plan order. The
    result is the shard's resume-state entry plus its ``relpath``."""
    out_uri, shard, storage_cfg = job
    files = Files(storage_cfg)
    tars = _open_tars(shard.utterances, files)
    try:
        with ThreadPoolExecutor(IO_THREADS) as pool:
            checked = list(pool.map(lambda u: _read_checked(u, files, tars), shard.utterances))
    finally:
        for f in tars.values():
            f.close()
    rows, skipped = [], []
    for u, (data, rate_hz, duration_s, problem) in zip(shard.utterances, checked):
        if problem:
            skipped.append({"id": u.id, "source": u.source, "reason": problem})
            continue
        rows.append({"index": shard.first_index + len(rows), "id": u.id, "audio": data, "sample_rate_hz": rate_hz,
                     "duration_s": duration_s, "text": u.text, "language": u.language, "speaker": u.speaker,
                     "phonemes": u.phonemes})
    shards.write_shard(out_uri, shard.relpath, shards.rows_to_table(rows, phonemes=shard.phonemes), storage_cfg)
    return {"relpath": shard.relpath, "utterances": len(rows), "duration_s": sum(r["duration_s"] for r in rows),
            "first_index": shard.first_index, "skipped": skipped}


def renumber_shard_job(job: tuple) -> str:
    """Renumber task: rewrite a written shard with indices ``first_index``, +1, ... (everything else
    as it was), after a file left out of an earlier shard moved its range."""
    out_uri, relpath, first_index, storage_cfg = job
    table = shards.read_shard(storage.join(out_uri, relpath), storage_cfg)
    column = pa.array(range(first_index, first_index + table.num_rows), pa.int64())
    table = table.set_column(table.schema.get_field_index("index"), table.schema.field("index"), column)
    shards.write_shard(out_uri, relpath, table, storage_cfg)
    return relpath


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


def _entry(entry: dict, job: ShardJob) -> dict:
    """A finished shard's state entry; entries of runs before the decode check lack ``first_index``
    and ``skipped``: those runs wrote every planned row at the planned indices."""
    return {"first_index": job.first_index, "skipped": [], **entry}


def write_shards(plan: Plan, state: dict, out_uri: str, split: str, storage_cfg, run_all, log
                 ) -> tuple[shards.SplitInfo, int, int, list[Skip]]:
    """Run a writer task per shard the state does not list as done, recording each as it finishes;
    then renumber any shard whose indices a file left out before it moved. Returns the split's
    manifest entry, the shards written and reused, and the files the writers left out."""
    state_uri = storage.join(out_uri, split, STATE_FILE)
    done = state["shards"]
    done.update({job.relpath: _entry(done[job.relpath], job) for job in plan.shards if job.relpath in done})
    todo = [job for job in plan.shards if job.relpath not in done]
    reused = len(plan.shards) - len(todo)
    if reused:
        log(f"prepare: resuming: {reused} of {len(plan.shards)} shards already written, skipping them")

    def save() -> None:
        storage.write_bytes(state_uri, json.dumps(state).encode(), storage_cfg)  # object stores: no append

    save()
    jobs = _numbered_jobs(plan, todo, done, out_uri, storage_cfg)
    for n, (_, result) in enumerate(run_all(write_shard_job, jobs), start=1):
        relpath = result.pop("relpath")
        done[relpath] = result
        save()
        lost = f", {len(result['skipped'])} files left out" if result["skipped"] else ""
        log(f"prepare: {n}/{len(todo)} shards written ({relpath}, {result['utterances']} utterances{lost}, "
            f"{result['duration_s'] / 60:.1f} min)")
    firsts = _first_indices(plan, done)
    moved = [(out_uri, job.relpath, firsts[job.relpath], storage_cfg) for job in plan.shards
             if done[job.relpath]["utterances"] and done[job.relpath]["first_index"] != firsts[job.relpath]]
    if moved:
        log(f"prepare: renumbering {len(moved)} shards written before files left out of earlier shards were known")
        for i, relpath in run_all(renumber_shard_job, moved):
            done[relpath]["first_index"] = moved[i][2]
            save()
    info = shards.SplitInfo()
    for job in plan.shards:
        if done[job.relpath]["utterances"]:  # a shard whose every file was left out is not listed
            info.shards.append(job.relpath)
            info.utterances.append(done[job.relpath]["utterances"])
            info.hours += done[job.relpath]["duration_s"] / 3600
    lost = [Skip(s["id"], s["source"], s["reason"]) for job in plan.shards for s in done[job.relpath]["skipped"]]
    return info, len(todo), reused, lost


def _numbered_jobs(plan: Plan, todo: list[ShardJob], done: dict, out_uri: str, storage_cfg
                   ) -> Iterator[tuple]:
    """Writer jobs in plan order, each numbered as it is handed out (the executor pulls a job only when
    a slot frees): earlier shards count with the rows they hold if finished, else with their planned rows
    (any they lose then is fixed by renumbering)."""
    todo_relpaths = {job.relpath for job in todo}
    shift, waiting = 0, []  # rows lost by the finished earlier shards; earlier todo shards not yet finished
    for job in plan.shards:
        if job.relpath not in todo_relpaths:
            shift += len(job.utterances) - done[job.relpath]["utterances"]
            continue
        for earlier in [j for j in waiting if j.relpath in done]:
            shift += len(earlier.utterances) - done[earlier.relpath]["utterances"]
            waiting.remove(earlier)
        waiting.append(job)
        yield out_uri, replace(job, first_index=job.first_index - shift), storage_cfg


def _first_indices(plan: Plan, done: dict) -> dict[str, int]:
    """Each shard's first index once every shard is written: the rows before it, in plan order."""
    out, total = {}, 0
    for job in plan.shards:
        out[job.relpath] = total
        total += done[job.relpath]["utterances"]
    return out


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
