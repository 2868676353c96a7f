"""The Trainer's bad-input accountant: nothing is lost silently, and too much bad input stops the run.

Every row the preprocessing rejected counts as consumed (it was seen and skipped, not lost) and is
logged by id and reason; rows outside the duration filter are only counted, and rows whose target is
too long for the model are counted and listed (``"filtered": true``). Unreadable shards count
all their utterances, once per epoch. At each report the ranks' new records are gathered into the
run's ``bad_inputs.jsonl`` (data/badinput.py), so every rank agrees on the run's count, and the
``data.max_bad_fraction`` verdict stops every rank at the same step.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from raytrain_speech.config import DataConfig, StorageConfig
from raytrain_speech.data.badinput import BadInputLog, record_key
from raytrain_speech.data.preprocess import is_filtered
from raytrain_speech.data.progress import DataCursor
from raytrain_speech.data.shards import BadShard
from raytrain_speech.train import collectives

PRINTED_PER_ATTEMPT = 5
"""Skipped utterances printed by each rank per attempt; all of them are in bad_inputs.jsonl."""


def log(message: str, err: bool = True) -> None:
    """One console line of ours (stderr by default). Written to the stream, not with ``print``: Ray
    Train 2.60 replaces ``print`` in its workers with one that writes the line and also logs it through
    the root logger, so every printed line reached the console twice."""
    stream = sys.stderr if err else sys.stdout
    stream.write(f"[raytrain-speech] {message}\n")
    stream.flush()


class BadInputAccountant:
    """One rank's side of the run's bad-input accounting (collective methods say so)."""

    def __init__(self, run_dir: str, storage_cfg: StorageConfig | None, data_cfg: DataConfig, rank: int, world: int,
                 device: torch.device):
        self.data_cfg, self.rank, self.world, self.device = data_cfg, rank, world, device
        self.log = BadInputLog(run_dir, storage_cfg)
        self.log.load()  # every rank reads the records of earlier attempts now, before rank 0 writes
        self.new: list[dict] = []
        self.printed = 0
        self.printed_filtered = 0
        self.filtered = 0
        """Utterances this rank left out by the duration filter in this attempt."""
        self.stale_rows = 0
        """Rows this rank received that the restored cursor had already consumed (dropped)."""

    def on_bad(self, cursor: DataCursor, index: int, utt_id: str, reason: str) -> None:
        """A row the preprocessor rejected: consumed, and counted as filtered or logged as bad."""
        cursor.mark([index])
        if is_filtered(reason):
            self.filtered += 1
            if "target of" in reason:  # long targets are named in the log (the duration filter's are not)
                self.new.append({"epoch": cursor.epoch, "index": index, "id": utt_id, "reason": reason,
                                 "filtered": True})
                if self.printed_filtered < PRINTED_PER_ATTEMPT:
                    self.printed_filtered += 1
                    log(f"filtered utterance {utt_id}: {reason.removeprefix('filtered: ')}")
            return
        self.new.append({"epoch": cursor.epoch, "index": index, "id": utt_id, "reason": reason})
        self.printed += 1
        if self.printed <= PRINTED_PER_ATTEMPT:
            log(f"skipped utterance {utt_id}: {reason}")

    def skip_bad_shards(self, cursor: DataCursor, bad_shards: list[BadShard], mark: bool = True) -> None:
        """Unreadable shards' utterances count as consumed bad input, once per epoch (on rank 0).
        ``mark=False``: a mixture's epoch has no entries for them (data/mixture.py leaves unreadable
        shards out of its plan), so only the record is kept (once per epoch: the log's key)."""
        if self.rank != 0:
            return
        for b in bad_shards:
            if not mark:
                record = {"epoch": cursor.epoch, "shard": b.uri, "first_index": b.first_index}
                if record_key(record) in self.log.load():
                    continue  # a resumed epoch: already counted before the checkpoint
            else:
                span = slice(b.first_index, b.first_index + b.utterances)
                if cursor.consumed[span].all():
                    continue  # a resumed epoch: already counted before the checkpoint
                cursor.consumed[span] = True
            self.new.append({"epoch": cursor.epoch, "shard": b.uri, "first_index": b.first_index,
                             "utterances": b.utterances, "reason": b.reason})
            log(f"skipped shard {b.uri} ({b.utterances} utterances): {b.reason}")

    def per_source(self, mixture) -> dict[str, int]:
        """The run's bad utterances by source of a mixture (records name it: ids are ``source/id``,
        shards lie under its root)."""
        out: dict[str, int] = {}
        for r in self.log.load().values():
            if r.get("filtered"):
                continue
            for src in mixture.sources:
                if str(r.get("id", "")).startswith(f"{src.name}/") or str(r.get("shard", "")).startswith(src.root):
                    out[src.name] = out.get(src.name, 0) + int(r.get("utterances", 1))
                    break
        return out

    def drop_stale(self, rows, consumed: np.ndarray):
        """Second line of defence: rows the restored cursor says were consumed never reach training."""
        for rb in rows:
            keep = ~consumed[np.asarray(rb["index"], dtype=np.int64)]
            if not keep.all():
                self.stale_rows += int((~keep).sum())
                rb = {k: np.asarray(v)[keep] for k, v in rb.items()}
            yield rb

    def sync(self) -> int:
        """Collective: gather every rank's new records into the run's log (rank 0 writes it); returns
        the run's bad-utterance count, the same on every rank."""
        (n_new,) = collectives.all_reduce_sum([len(self.new)], self.device)
        if n_new:
            gathered = collectives.all_gather(self.new, self.world)
            self.log.add([r for part in gathered for r in part], write=self.rank == 0)
            self.new = []
        return self.log.count

    def verdict(self, bad: int, utterances_seen: int, final: bool) -> str:
        """'' or the stop reason when bad input exceeds data.max_bad_fraction (judged once
        bad_fraction_min_utterances were seen, and at every epoch end: ``final``)."""
        dc = self.data_cfg
        seen = utterances_seen + bad
        if not bad or (not final and seen < dc.bad_fraction_min_utterances) or bad / seen <= dc.max_bad_fraction:
            return ""
        return (f"too much bad input: {bad} of {seen} training utterances ({100 * bad / seen:.1f}%) were skipped, "
                f"above data.max_bad_fraction={dc.max_bad_fraction}; see {self.log.uri} (fix or remove those "
                "inputs, or raise data.max_bad_fraction)")
