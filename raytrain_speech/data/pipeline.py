"""The one Ray Data chain: shards in storage -> decoded, featurized, tokenized rows.

    read_parquet(shard URIs, pyarrow filesystem) -> map_batches(Preprocessor) -> (streaming_split by Train)

Training workers turn the rows into duration-bucketed batches themselves (``worker_batches``), so
the chain stays a plain row transform that Ray Data can stream, backpressure and parallelise.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import ray
import ray.data

from raytrain_speech import storage
from raytrain_speech.configlib import require
from raytrain_speech.data import shards
from raytrain_speech.data.batching import Batch, BatchingConfig, batch_by_duration, collate
from raytrain_speech.data.preprocess import INPUT_COLUMNS, Preprocessor, to_utterances

if TYPE_CHECKING:
    from raytrain_speech.config import Config


@dataclass
class DataConfig:
    """Where the shards are and how Ray Data streams them."""

    root: str = "data/demo"
    """Corpus root (local path or s3://bucket/prefix) holding manifest.json and split folders."""
    train_split: str = "train"
    """Split trained on."""
    preprocess_batch_rows: int = 32
    """Rows per Ray Data preprocessing task batch."""
    preprocess_cpus: float = 1.0
    """CPUs reserved by each preprocessing task."""
    shuffle_blocks: bool = True
    """Randomize shard order every epoch."""
    prefetch_batches: int = 4
    """Row batches each training worker prefetches."""

    def validate(self) -> None:
        require(bool(self.root), "data.root", "must name a corpus (local path or s3://bucket/prefix)")
        require(self.preprocess_batch_rows >= 1, "data.preprocess_batch_rows", "must be >= 1")


def build_dataset(cfg: Config, split: str) -> ray.data.Dataset:
    """The Ray Data chain for one split (lazy: nothing runs until a consumer iterates)."""
    uris = shards.shard_uris(cfg.data.root, split, cfg.storage)
    fs, _ = storage.resolve(cfg.data.root, cfg.storage)
    paths = [storage.resolve(u, cfg.storage)[1] for u in uris]
    ds = ray.data.read_parquet(paths, filesystem=fs).select_columns(INPUT_COLUMNS)
    if cfg.data.shuffle_blocks:
        ds = ds.randomize_block_order()
    return ds.map_batches(
        _preprocess, fn_kwargs={"features": cfg.features, "text": cfg.text},
        batch_size=cfg.data.preprocess_batch_rows, batch_format="numpy", num_cpus=cfg.data.preprocess_cpus,
    )


_PREPROCESSORS: dict[str, Preprocessor] = {}


def _preprocess(batch: dict, features, text) -> dict:
    """Ray Data task body; keeps one Preprocessor (mel filterbank) per worker process and config."""
    key = repr((features, text))
    if key not in _PREPROCESSORS:
        import torch

        torch.set_num_threads(1)  # data tasks share the cores with training workers
        _PREPROCESSORS[key] = Preprocessor(features, text)
    return _PREPROCESSORS[key](batch)


def worker_batches(
    rows: Iterator[dict], max_padded_s: float, batching: BatchingConfig, seed: int,
    on_bad=None,
) -> Iterator[Batch]:
    """Row batches from a dataset shard -> padded training batches bounded by audio seconds.

    ``on_bad(id, reason)`` is called for every row the preprocessor rejected.
    """

    def utterances():
        for rb in rows:
            good, bad = to_utterances(rb)
            for utt_id, reason in bad:
                if on_bad is not None:
                    on_bad(utt_id, reason)
            yield from good

    for group in batch_by_duration(utterances(), max_padded_s, batching, seed=seed):
        yield collate(group)
