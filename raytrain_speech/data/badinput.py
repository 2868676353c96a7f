"""The per-run bad-input log: every training utterance skipped as unusable, with its id and reason.

One JSON object per line in ``<run dir>/bad_inputs.jsonl``: ``{"epoch", "index", "id", "reason"}`` for
an utterance, or ``{"epoch", "shard", "first_index", "utterances", "reason"}`` for a shard that could
not be read at all. An utterance left out because its target is longer than the model can hold is
listed too, with ``"filtered": true``: it is named (a 10,000-character transcript on a 2 s clip is a
data error worth finding) but, like the duration filter, it does not count as bad input. Rank 0 rewrites the whole file when new records arrive (object stores cannot
append; the file is small). Records are keyed by (epoch, index), so an utterance seen again after a
restart (it was rejected after the last checkpoint) is listed once.
"""

from __future__ import annotations

import json
from collections import Counter

from raytrain_speech import storage
from raytrain_speech.config import StorageConfig

BAD_INPUTS_FILE = "bad_inputs.jsonl"


def category(reason: str) -> str:
    """The reason without its specifics: 'cannot decode audio: Format not recognised' -> 'cannot decode audio'."""
    return reason.split(":", 1)[0].split(" (", 1)[0].strip()


class BadInputLog:
    """The run's bad-input records, persisted under ``run_dir``."""

    def __init__(self, run_dir: str, storage_cfg: StorageConfig | None = None):
        self.uri = storage.join(run_dir, BAD_INPUTS_FILE)
        self.storage_cfg = storage_cfg
        self.records: dict[tuple, dict] | None = None

    def load(self) -> dict[tuple, dict]:
        if self.records is None:
            self.records = {}
            for r in read_bad_inputs(self.uri, self.storage_cfg):
                self.records[record_key(r)] = r
        return self.records

    def add(self, new: list[dict], write: bool = True) -> int:
        """Merge ``new`` records and (``write``) rewrite the file if any was new; returns how many were new.

        Every rank keeps the merged records so that all agree on the count; only rank 0 writes."""
        records = self.load()
        added = 0
        for r in new:
            if record_key(r) not in records:
                records[record_key(r)] = r
                added += 1
        if added and write:
            text = "".join(json.dumps(r) + "\n" for r in sorted(records.values(), key=record_key))
            storage.write_bytes(self.uri, text.encode(), self.storage_cfg)
        return added


    @property
    def count(self) -> int:
        """Utterances skipped as bad input over the whole run (a shard counts all its utterances;
        filtered records do not count)."""
        return sum(int(r.get("utterances", 1)) for r in self.load().values() if not r.get("filtered"))


def record_key(record: dict) -> tuple:
    return (record.get("epoch", 0), record.get("index", record.get("first_index", -1)), record.get("shard", ""))


def read_bad_inputs(uri: str, storage_cfg: StorageConfig | None = None) -> list[dict]:
    if not storage.exists(uri, storage_cfg):
        return []
    return [json.loads(line) for line in storage.read_bytes(uri, storage_cfg).decode().splitlines() if line.strip()]


def summarize(records: list[dict]) -> dict[str, int]:
    """Skipped utterances per reason category (a shard counts all its utterances)."""
    counts: Counter[str] = Counter()
    for r in records:
        if not r.get("filtered"):
            counts[category(r["reason"])] += int(r.get("utterances", 1))
    return dict(counts.most_common())


def summary_line(records: list[dict], uri: str) -> str:
    """'bad input: 7 utterances skipped (cannot decode audio 3, bad transcript 2, ...); listed in URI'."""
    counts = summarize(records)
    if not counts:
        return "bad input: none"
    parts = ", ".join(f"{k} {v}" for k, v in counts.items())
    return f"bad input: {sum(counts.values())} utterance(s) skipped ({parts}); listed in {uri}"
