"""Exactly-once accounting: which utterances of the current epoch have been trained on (the data cursor).

Every utterance of a split has a stable index 0..n-1 (see shards.py). A cursor is (epoch, bitmap of
consumed indices). Ranks mark what they consume; at checkpoint time the ranks' bitmaps are OR-ed
(an all-reduce) and the merged cursor goes into the checkpoint beside the model. After a restart,
with any number of workers, the pipeline drops consumed indices before decoding, so no utterance of
the epoch is lost or repeated. Ray Data's iterators cannot resume mid-epoch; this is what can.

For a mixture of corpora (data/mixture.py) the indices are an epoch's occurrence numbers, whose count
changes from epoch to epoch, and ``plan_key`` names the mixture plan they number.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import numpy as np

CURSOR_FILE = "data_cursor.npz"


@dataclass
class DataCursor:
    """Consumed utterance indices of one epoch of one split."""

    num_utterances: int
    epoch: int = 0
    consumed: np.ndarray = field(default=None)  # bool[num_utterances]
    plan_key: str = ""
    """A mixture's plan (data/mixture.py ``Mixture.key``); "" for one corpus."""

    def __post_init__(self):
        if self.consumed is None:
            self.consumed = np.zeros(self.num_utterances, dtype=bool)
        if self.consumed.shape != (self.num_utterances,):
            raise ValueError(f"cursor bitmap has {self.consumed.shape[0]} entries, split has {self.num_utterances}")

    def mark(self, indices) -> None:
        idx = np.asarray(list(indices), dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_utterances):
            raise IndexError(f"utterance index out of range 0..{self.num_utterances - 1}: {idx.min()}..{idx.max()}")
        self.consumed[idx] = True

    @property
    def count(self) -> int:
        return int(self.consumed.sum())

    @property
    def empty(self) -> bool:
        return not self.consumed.any()

    @property
    def complete(self) -> bool:
        return bool(self.consumed.all())

    def next_epoch(self, num_utterances: int | None = None) -> DataCursor:
        """The next epoch's empty cursor (a mixture's epochs differ in size: ``num_utterances``)."""
        n = self.num_utterances if num_utterances is None else num_utterances
        return DataCursor(n, self.epoch + 1, plan_key=self.plan_key)

    def merge(self, other: DataCursor) -> None:
        if other.epoch != self.epoch or other.num_utterances != self.num_utterances:
            raise ValueError(f"cannot merge cursor of epoch {other.epoch} into epoch {self.epoch}")
        self.consumed |= other.consumed

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        meta = json.dumps({"epoch": self.epoch, "num_utterances": self.num_utterances,
                           **({"plan_key": self.plan_key} if self.plan_key else {})})
        np.savez_compressed(buf, consumed=np.packbits(self.consumed), meta=np.frombuffer(meta.encode(), np.uint8))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> DataCursor:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes().decode())
            n = meta["num_utterances"]
            consumed = np.unpackbits(z["consumed"])[:n].astype(bool)
        return cls(n, meta["epoch"], consumed, meta.get("plan_key", ""))
