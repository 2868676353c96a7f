"""Weighted mixtures of corpora (``data.sources``): which utterances of which source each epoch trains on.

Each source is an endless stream of its own epochs: epoch k of a source is every utterance of its
readable shards once, shard order shuffled by (seed, source, k). A source's weight is its share of
a *mixture epoch*, whose size is all the sources' audio together (hours, or utterances with
``data.mix_unit: utterances``): source s takes the stream items whose start falls in
[e * B_s, (e + 1) * B_s), with B_s = share_s x the sources' total. So a source weighted above its
size's share runs through several of its epochs per mixture epoch (a new one starts when it runs out,
while the others go on), one weighted below takes several mixture epochs for one of its own, and
weights equal to the sizes' shares give every source exactly once per mixture epoch.

A mixture epoch is a fixed, computable set of *occurrences* (source, source epoch, utterance),
numbered 0..N-1 in (source, source epoch, utterance) order; the number is the row's ``index`` from
the read onwards. The exactly-once cursor (data/progress.py) and the augmentation draws are over
those numbers unchanged: every occurrence trains once per mixture epoch across restarts at any world
size, hence every utterance once per epoch of its source. Nothing here depends on the order Ray Data
streams rows in, only on the sources, their readable shards and durations, the weights and the seed
(``Mixture.key``; a checkpoint's cursor is refused for a different plan).

Reading an item (a piece of a shard, or a tar) for an epoch reads only the rows that epoch has
occurrences of, and hands each row on once per occurrence left to train (``item_batches``), through
the same readers as a single corpus; both backends call it. No Ray here.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from raytrain_speech.config import Config, StorageConfig
from raytrain_speech.data import corpus, shards, tars
from raytrain_speech.data.shards import BadShard


@dataclass
class Source:
    """One source's readable shards, as read once per run."""

    name: str
    root: str
    split: str
    storage: StorageConfig | None
    indexed: bool
    """WebDataset tars read through their indices (uris are the index files)."""
    uris: list[str]
    first_index: list[int]
    """Parquet: each shard's first utterance index (tars: -1)."""
    shard_indices: list[np.ndarray]
    """Each readable shard's utterance indices, in shard order."""
    durations_s: np.ndarray
    """float64[num_utterances] by index (NaN where the shard is unreadable)."""
    num_utterances: int
    bad_shards: list[BadShard] = field(default_factory=list)

    @property
    def hours(self) -> float:
        return float(np.nansum(self.durations_s)) / 3600


def read_source(name: str, root: str, split: str, storage_cfg: StorageConfig | None) -> Source:
    """A source's manifest, footer check and duration columns (one read of each shard's footer and
    ``duration_s`` column; a tar's index also gives its ``index`` column)."""
    manifest = shards.read_manifest(root, storage_cfg)
    info = shards.split_info(root, manifest, split)
    good, bad = corpus.readable_shards(root, split, storage_cfg)
    indexed = tars.index_record(manifest, split) is not None
    n = info.num_utterances
    durations = np.full(n, np.nan)
    firsts = {} if indexed else corpus.first_index_of(root, split, storage_cfg)
    shard_indices = []
    for uri in good:
        d = shards.read_duration_column([uri], storage_cfg)
        if indexed:
            idx = shards.read_column(uri, "index", storage_cfg).to_numpy().astype(np.int64)
        else:
            idx = np.arange(firsts[uri], firsts[uri] + len(d), dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise ValueError(f"{uri}: utterance indices {idx.min()}..{idx.max()} outside the manifest's 0..{n - 1} "
                             "(re-run prepare for this source)")
        durations[idx] = d
        shard_indices.append(idx)
    return Source(name, root, split, storage_cfg, indexed, list(good), [firsts.get(u, -1) for u in good],
                  shard_indices, durations, n, list(bad))


@dataclass
class EpochPlan:
    """The occurrences of one mixture epoch, numbered 0..size-1 in (source, source epoch, index) order."""

    epoch: int
    offsets: np.ndarray
    """int64[sources + 1]: source s's occurrences are numbers offsets[s]..offsets[s + 1] - 1."""
    index: np.ndarray
    """int64[size]: each occurrence's utterance index in its source."""
    source_epoch: np.ndarray
    """int64[size]: each occurrence's epoch of its source."""
    by_index: list[tuple[np.ndarray, np.ndarray]]
    """Per source: (utterance indices sorted, their occurrence numbers), for reading."""

    @property
    def size(self) -> int:
        return int(self.offsets[-1])

    def source_of(self, numbers) -> np.ndarray:
        """The source (position in data.sources) of each occurrence number."""
        return np.searchsorted(self.offsets, np.asarray(numbers, np.int64), side="right") - 1

    def remaining(self, source: int, lo: int, hi: int, consumed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(utterance indices, occurrence numbers) of ``source``'s occurrences with index in [lo, hi)
        that ``consumed`` (a bitmap over this epoch's numbers) does not mark, sorted by index."""
        idx, numbers = self.by_index[source]
        a, b = np.searchsorted(idx, lo), np.searchsorted(idx, hi)
        idx, numbers = idx[a:b], numbers[a:b]
        if consumed is not None:
            keep = ~consumed[numbers]
            idx, numbers = idx[keep], numbers[keep]
        return idx, numbers


class Mixture:
    """The sources, their shares and the seed: every epoch's plan, computed the same in every process."""

    def __init__(self, sources: list[Source], weights: list[float], unit: str, seed: int, shuffle: bool,
                 duration_range_s: tuple[float | None, float | None] = (None, None)):
        self.sources, self.unit, self.seed, self.shuffle = sources, unit, seed, shuffle
        w = np.asarray(weights, np.float64)
        self.shares = w / w.sum()
        lo, hi = duration_range_s
        self.units = []
        for s in sources:
            d = s.durations_s
            # Only what training keeps counts towards a share: the duration filter's rows are read and
            # counted as filtered, but give no audio.
            keep = np.isfinite(d) & (d >= (lo if lo is not None else -np.inf)) & (d <= (hi if hi is not None else np.inf))
            self.units.append(np.where(keep, d if unit == "hours" else 1.0, 0.0))
        self.totals = np.array([u.sum() for u in self.units])
        empty = [s for s, t in zip(sources, self.totals) if t <= 0]
        if empty:
            raise ValueError(f"data.sources {empty[0].name}: no readable utterance within data.min/max_duration_s "
                             f"in {empty[0].root} split {empty[0].split}")
        self.budgets = self.shares * self.totals.sum()
        self.key = self._fingerprint(duration_range_s)
        self._plans: dict[int, EpochPlan] = {}

    def _fingerprint(self, duration_range_s) -> str:
        desc = {"unit": self.unit, "seed": self.seed, "shuffle": self.shuffle, "range": list(duration_range_s),
                "sources": [{"name": s.name, "root": s.root, "split": s.split, "share": round(float(sh), 12),
                             "shards": s.uris, "utterances": [len(i) for i in s.shard_indices]}
                            for s, sh in zip(self.sources, self.shares)]}
        return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]

    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    def _stream_order(self, s: int, source_epoch: int) -> np.ndarray:
        """Source ``s``'s utterance indices in the order of its epoch ``source_epoch``: shards shuffled
        (data.shuffle_blocks), rows in shard order."""
        src = self.sources[s]
        order = list(range(len(src.uris)))
        if self.shuffle:
            random.Random(f"{self.seed}/{src.name}/{source_epoch}").shuffle(order)
        parts = [src.shard_indices[k] for k in order]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def epoch(self, e: int) -> EpochPlan:
        """Mixture epoch ``e``'s occurrences (cached: a Ray worker process serves many tasks of one epoch)."""
        if e not in self._plans:
            if len(self._plans) > 4:
                self._plans.clear()
            self._plans[e] = self._plan(e)
        return self._plans[e]

    def _plan(self, e: int) -> EpochPlan:
        indices, epochs, by_index, offsets = [], [], [], [0]
        for s in range(len(self.sources)):
            total, budget = self.totals[s], self.budgets[s]
            lo, hi = e * budget, (e + 1) * budget
            idx_parts, ep_parts = [], []
            for k in range(int(lo // total), int(hi // total) + 1):
                order = self._stream_order(s, k)
                u = self.units[s][order]
                start = k * total + (np.cumsum(u) - u)
                take = order[(start >= lo) & (start < hi)]
                take.sort()
                idx_parts.append(take)
                ep_parts.append(np.full(len(take), k, np.int64))
            idx = np.concatenate(idx_parts) if idx_parts else np.zeros(0, np.int64)
            numbers = offsets[-1] + np.arange(len(idx), dtype=np.int64)
            sort = np.argsort(idx, kind="stable")
            by_index.append((idx[sort], numbers[sort]))
            indices.append(idx)
            epochs.append(np.concatenate(ep_parts) if ep_parts else np.zeros(0, np.int64))
            offsets.append(offsets[-1] + len(idx))
        return EpochPlan(e, np.asarray(offsets, np.int64), np.concatenate(indices), np.concatenate(epochs), by_index)

    def items(self, pieces: int) -> list[dict]:
        """What read tasks are handed: each source's Parquet shards in ``pieces`` pieces, or its tars."""
        out = []  # one set of keys for every item: Ray Data's blocks of them share a schema
        for s, src in enumerate(self.sources):
            for k, uri in enumerate(src.uris):
                base = {"source": s, "shard": k, "index_uri": "", "uri": "", "first_index": src.first_index[k]}
                if src.indexed:
                    out.append({**base, "index_uri": shards.absolute(uri), "piece": 0})
                else:
                    out.extend({**base, "uri": shards.absolute(uri), "piece": p} for p in range(pieces))
        return out

    def durations_s(self) -> np.ndarray:
        """Every readable utterance's duration, all sources (for duration-bucket edges)."""
        return np.concatenate([s.durations_s[np.isfinite(s.durations_s)] for s in self.sources])

    def describe(self) -> str:
        parts = [f"{s.name} {s.hours:.2f} h x {sh:.2f}" for s, sh in zip(self.sources, self.shares)]
        return f"mixture of {len(self.sources)} sources by {self.unit} ({', '.join(parts)})"


def build_mixture(cfg: Config) -> Mixture | None:
    """``data.sources`` as a Mixture (None for the one-corpus ``data.root``)."""
    dc = cfg.data
    if not dc.sources:
        return None
    sources = [read_source(s.name, s.root, s.split, s.storage or cfg.storage) for s in dc.sources]
    return Mixture(sources, [s.weight for s in dc.sources], dc.mix_unit, cfg.train.seed, dc.shuffle_blocks,
                   (dc.min_duration_s, dc.max_duration_s))


def train_data_label(cfg: Config) -> tuple[str, str]:
    """(root, split) naming what a run trains on, for messages: data.root's split, or the sources."""
    dc = cfg.data
    if not dc.sources:
        return dc.root, dc.train_split
    return "data.sources " + "+".join(s.name for s in dc.sources), "+".join(sorted({s.split for s in dc.sources}))


_PLANS: dict[tuple[str, int], EpochPlan] = {}


def _cached_plan(mixture: Mixture, epoch: int) -> EpochPlan:
    """The plan kept per process across tasks (each task gets its own copy of the Mixture)."""
    key = (mixture.key, epoch)
    if key not in _PLANS:
        if len(_PLANS) > 4:
            _PLANS.clear()
        _PLANS[key] = mixture.epoch(epoch)
    return _PLANS[key]


def item_batches(mixture: Mixture, item: dict, epoch: int, consumed: np.ndarray | None, rows_per_batch: int,
                 pieces: int) -> Iterator[dict]:
    """The raw row batches (``corpus.read_batches``' columns) of one item for mixture epoch ``epoch``:
    each row once per occurrence of it left to train, ``index`` its occurrence number, ``id``
    prefixed with the source's name. Rows without such an occurrence are not read."""
    plan = _cached_plan(mixture, epoch)
    s = int(item["source"])
    src = mixture.sources[s]
    mine = src.shard_indices[int(item["shard"])]
    if not mine.size:
        return
    idx, numbers = plan.remaining(s, int(mine.min()), int(mine.max()) + 1, consumed)
    if not idx.size:
        return
    skip = np.ones(src.num_utterances, bool)
    skip[idx] = False
    if src.indexed:
        tables = tars.read_batches(str(item["index_uri"]), src.storage, skip, rows_per_batch)
    else:
        tables = corpus.parquet_row_tables(str(item["uri"]), int(item["first_index"]), src.storage, skip,
                                           rows_per_batch, int(item["piece"]), pieces)
    for table in tables:
        batch = expand(corpus.numpy_batch(table), idx, numbers, src.name)
        if len(batch["index"]):
            yield batch


def expand(batch: dict, idx: np.ndarray, numbers: np.ndarray, name: str) -> dict:
    """Each row of ``batch`` once per entry of sorted ``idx`` equal to its index, renumbered to that
    entry's occurrence number; ids become ``name/id``."""
    rows = np.asarray(batch["index"], np.int64)
    a, b = np.searchsorted(idx, rows, "left"), np.searchsorted(idx, rows, "right")
    counts = b - a
    take = np.repeat(np.arange(len(rows)), counts)
    within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    out = {k: np.asarray(v)[take] for k, v in batch.items()}
    out["index"] = numbers[np.repeat(a, counts) + within]
    out["id"] = np.array([f"{name}/{x}" for x in out["id"]], dtype=object)
    return out
