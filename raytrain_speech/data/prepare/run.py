"""``raytrain-speech prepare``: an existing corpus -> our shards (docs/shards.md), so real speech
trains through exactly the pipeline the synthesized corpus does.

Every header is read before the first shard is cut (plan.py says why), hence two parallel phases with
a plan between them::

    survey (headers only: a task per batch of files, or per tar) -> plan (driver: drop bad
    inputs, sort, number, cut shards by bytes/count) -> write (one Ray task per shard, copying
    bytes and decoding each file on the way: one that does not decode in full is left out, and the
    indices after it close up, write.py) -> manifest (last, merged with the splits already there)

The counts printed and recorded (``skipped`` in the outcome and the manifest's source) include the
files the writers left out, and ``prepare_skipped.jsonl`` is rewritten with them once writing ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

from raytrain_speech import storage
from raytrain_speech.config import ConfigError, StorageConfig, TextConfig, to_dict
from raytrain_speech.data import shards
from raytrain_speech.data.prepare.executor import executor
from raytrain_speech.data.prepare.index import index_webdataset
from raytrain_speech.data.prepare.layouts import locate, nothing_found, survey
from raytrain_speech.data.prepare.plan import TEXT_REASON, Plan, PrepareConfig, PrepareOutcome, make_plan
from raytrain_speech.data.prepare.write import (
    SKIPPED_FILE,
    STATE_FILE,
    load_state,
    merge_manifest,
    write_shards,
    write_skipped,
)
from raytrain_speech.data.vocab import text_checker


def prepare(cfg: PrepareConfig, out_uri: str, storage_cfg: StorageConfig | None = None,
            log: Callable[[str], None] = print, text: TextConfig | None = None) -> PrepareOutcome:
    """Convert ``cfg.input`` into split ``cfg.split`` of the shard corpus at ``out_uri``; the manifest
    is written last, so the split is usable exactly when this returns. Transcripts the text rules
    (``text``: the recipe's text section; default TextConfig) cannot encode are left out and listed
    with their reason, so a run never learns of them from its bad-input count."""
    cfg.validate()
    if cfg.index_only:
        return index_webdataset(cfg, out_uri, storage_cfg, log)
    start = time.time()
    input_uri, out_uri = shards.absolute(cfg.input), shards.absolute(out_uri)
    storage.check_reachable(input_uri, storage_cfg)
    storage.check_reachable(out_uri, storage_cfg)
    record = {"kind": "prepare", "layout": cfg.layout, "input": input_uri,
              "config": to_dict(replace(cfg, input=input_uri))}
    skipped_uri = storage.join(out_uri, cfg.split, SKIPPED_FILE)
    located, skipped = locate(cfg, input_uri, storage_cfg)
    with executor(cfg.workers) as run_all:
        found, skipped = survey(cfg, located, skipped, storage_cfg, run_all)
        if not found and not skipped:
            nothing_found(input_uri, cfg.layout)
        text_problem, rules = text_checker(text or TextConfig(), storage_cfg)
        plan = make_plan(found, skipped, replace(cfg, input=input_uri), text_problem)
        n_filtered = sum(s.filtered for s in plan.skipped)
        text_skips = [s for s in plan.skipped if s.reason.startswith(TEXT_REASON)]
        record.update(skipped=len(plan.skipped) - n_filtered, filtered=n_filtered, text_rules=rules,
                      text_skipped=text_summary(text_skips))
        n_good = sum(len(j.utterances) for j in plan.shards)
        log(f"prepare: {n_good} utterances in {len(plan.shards)} shards; {record['skipped']} bad inputs and "
            f"{n_filtered} outside the duration limits left out (surveyed in {time.time() - start:.0f} s; a file "
            "that fails to decode while written is left out too)")
        state_uri = storage.join(out_uri, cfg.split, STATE_FILE)
        if not plan.shards:
            _refuse_empty_plan(plan, input_uri, state_uri, skipped_uri, storage_cfg)
        state = load_state(state_uri, out_uri, plan, record, storage_cfg)
        write_skipped(skipped_uri, plan.skipped, storage_cfg)  # after the state check: never clobber another plan's
        info, written, reused, lost = write_shards(plan, state, out_uri, cfg.split, storage_cfg, run_all, log)
    if lost:
        record["skipped"] += len(lost)
        write_skipped(skipped_uri, sorted(plan.skipped + lost, key=lambda s: (s.id or "", s.source)), storage_cfg)
        log(f"prepare: {len(lost)} files failed the decode check (truncated, corrupt, or NaN/Inf samples) and were "
            f"left out (e.g. {lost[0].source}: {lost[0].reason}); listed in {skipped_uri}")
    if not info.shards:
        raise ConfigError(f"{input_uri}: all {n_good} utterances planned were left out when decoded (e.g. "
                          f"{lost[0].source}: {lost[0].reason}); all listed in {skipped_uri}")
    manifest = merge_manifest(out_uri, cfg.split, info, record, storage_cfg)
    return PrepareOutcome(manifest, cfg.split, record["skipped"], n_filtered, written, reused, skipped_uri,
                          time.time() - start, rules, record["text_skipped"])


def text_summary(skips: list) -> dict:
    """Transcripts left out by the text rules: per reason, a count and up to 3 example ids."""
    out: dict = {}
    for s in skips:
        entry = out.setdefault(s.reason[len(TEXT_REASON):], {"count": 0, "examples": []})
        entry["count"] += 1
        if len(entry["examples"]) < 3:
            entry["examples"].append(s.id)
    return out


def _refuse_empty_plan(plan: Plan, input_uri: str, state_uri: str, skipped_uri: str,
                       storage_cfg: StorageConfig | None) -> None:
    """Stop: every utterance found was left out. Their list is written unless the split already holds
    another plan (whose list it would clobber)."""
    listed = ""
    if not storage.exists(state_uri, storage_cfg):  # never clobber another plan's list
        write_skipped(skipped_uri, plan.skipped, storage_cfg)
        listed = f"; all listed in {skipped_uri}"
    raise ConfigError(f"{input_uri}: all {len(plan.skipped)} utterances found were left out "
                      f"(e.g. {plan.skipped[0].source}: {plan.skipped[0].reason}{listed})")
