"""The one Ray Data chain: shards in storage -> decoded, featurized, tokenized rows.

    read_parquet(shard URIs, pyarrow filesystem) -> map_batches(Preprocessor) -> (streaming_split by Train)

Training workers turn the rows into duration-bucketed batches themselves (``worker_batches``), so
the chain stays a plain row transform that Ray Data can stream, backpressure and parallelise.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import ray
import ray.data
from ray.train import DataConfig as RayTrainDataConfig

from raytrain_speech import storage
from raytrain_speech.configlib import require
from raytrain_speech.data import shards
from raytrain_speech.data.batching import Batch, BatchingConfig, batch_by_duration, collate
from raytrain_speech.data.preprocess import Preprocessor, input_columns, to_utterances
from raytrain_speech.data.progress import drop_consumed

if TYPE_CHECKING:
    from raytrain_speech.config import Config


@dataclass
class DataConfig:
    """Where the shards are and how Ray Data streams them."""

    root: str = "data/demo"
    """Corpus root (local path or s3://bucket/prefix) holding manifest.json and split folders."""
    train_split: str = "train"
    """Split trained on."""
    valid_split: str = "dev"
    """Split for validation during training (train.validate_every_steps)."""
    preprocess_batch_rows: int = 32
    """Rows per Ray Data preprocessing task batch."""
    preprocess_cpus: float = 1.0
    """CPUs reserved by each preprocessing task."""
    shuffle_blocks: bool = True
    """Randomize shard order every epoch."""
    blocks_per_shard: int = 4
    """Ray Data blocks each shard is read into: more blocks even out the ranks' shares at epoch end."""
    prefetch_batches: int = 4
    """Row batches each training worker prefetches."""

    def validate(self) -> None:
        require(bool(self.root), "data.root", "must name a corpus (local path or s3://bucket/prefix)")
        require(self.preprocess_batch_rows >= 1, "data.preprocess_batch_rows", "must be >= 1")
        require(self.blocks_per_shard >= 1, "data.blocks_per_shard", "must be >= 1")


def build_dataset(cfg: Config, split: str, consumed: np.ndarray | None = None) -> ray.data.Dataset:
    """The Ray Data chain for one split (lazy: nothing runs until a consumer iterates).

    ``consumed`` (a bitmap over the split's utterance indices) drops rows before they are decoded:
    that is how a resumed epoch skips what the checkpoint says was already trained on.
    """
    uris = shards.shard_uris(cfg.data.root, split, cfg.storage)
    fs, _ = storage.resolve(cfg.data.root, cfg.storage)
    paths = [storage.resolve(u, cfg.storage)[1] for u in uris]
    # Several blocks per shard: Train's unequal streaming split hands out whole blocks, so at the end
    # of an epoch one rank can hold up to a block more than the others and train alone with filler
    # steps on the rest; smaller blocks make that tail shorter.
    ds = ray.data.read_parquet(paths, filesystem=fs, override_num_blocks=len(paths) * cfg.data.blocks_per_shard)
    ds = ds.select_columns(input_columns(ds.schema().names))
    if cfg.data.shuffle_blocks:
        ds = ds.randomize_block_order()
    if consumed is not None and consumed.any():
        ds = ds.map_batches(drop_consumed, fn_kwargs={"consumed": consumed}, batch_format="numpy",
                            batch_size=None, num_cpus=0.25)
    return ds.map_batches(
        _preprocess, fn_kwargs={"features": cfg.features, "text": cfg.text},
        batch_size=cfg.data.preprocess_batch_rows, batch_format="numpy", num_cpus=cfg.data.preprocess_cpus,
    )


def decode_rows(cfg: Config, split: str, decoder_cls: type, decoder_kwargs: dict) -> list[dict]:
    """Evaluation on Ray Data: the split's shards -> ``map_batches(decoder_cls)`` on a pool of
    ``eval.actors`` model actors -> one output row per utterance, gathered on the driver.

    ``decoder_cls`` (evaluate/runner.py ``BatchDecoder``) loads the model once per actor; shards
    stream through the pool, so a test set of any size is decoded with only a few row batches in
    flight. Joins ``run.ray_address`` / $RAY_ADDRESS, or starts a local Ray sized to the pool.
    """
    import os

    if not ray.is_initialized():
        address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, logging_level="WARNING")
        else:
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(cfg.eval.actors * cfg.eval.actor_cpus) + 1),
                     object_store_memory=cfg.run.object_store_memory_mb * 2**20, include_dashboard=False,
                     logging_level="WARNING")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = ctx.print_on_execution_start = False  # one result line per test set instead
    uris = shards.shard_uris(cfg.data.root, split, cfg.storage)
    fs, _ = storage.resolve(cfg.data.root, cfg.storage)
    ds = ray.data.read_parquet([storage.resolve(u, cfg.storage)[1] for u in uris], filesystem=fs)
    ds = ds.select_columns(input_columns(ds.schema().names))
    gpus = {"num_gpus": cfg.eval.actor_gpus} if cfg.eval.actor_gpus else {}
    ds = ds.map_batches(
        decoder_cls, fn_constructor_kwargs=decoder_kwargs, batch_size=cfg.eval.actor_batch_rows,
        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=cfg.eval.actors),
        num_cpus=cfg.eval.actor_cpus, **gpus,
    )
    return [{k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()} for row in ds.iter_rows()]


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

    ``on_bad(index, id, reason)`` is called for every row the preprocessor rejected.
    """

    def utterances():
        for rb in rows:
            good, bad = to_utterances(rb)
            for index, utt_id, reason in bad:
                if on_bad is not None:
                    on_bad(index, utt_id, reason)
            yield from good

    for group in batch_by_duration(utterances(), max_padded_s, batching, seed=seed):
        yield collate(group)


class UnequalSplitDataConfig(RayTrainDataConfig):
    """Ray Train's DataConfig splits with ``equal=True``, which drops up to world_size-1 rows per epoch.

    Exactly-once needs every row, so this splits with ``equal=False``; the training loop's lockstep
    (filler micro-steps on ranks that run dry first) absorbs the uneven row counts.
    """

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            if ds.name is None:
                ds.set_name(name)
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options(name)
            hints = worker_node_ids if getattr(self, "_enable_shard_locality", False) else None
            for i, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=hints)):
                output[i][name] = split
        return output
