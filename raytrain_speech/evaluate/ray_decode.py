"""Evaluation on Ray Data: a test split's shards streamed through a pool of model actors.

    read the split (the training chain's reader, data/pipeline.py) -> map_batches(BatchDecoder,
    ActorPoolStrategy(eval.actors), eval.actor_gpus each) -> one output row per utterance

For full-size models and test sets: each actor loads the model once, shards stream through the pool,
so a test set of any size is decoded with only a few row batches in flight. The decoder itself is
plain Python (evaluate/runner.py ``BatchDecoder``), the same one that decodes in-process.
"""

from __future__ import annotations

import os

import ray
import ray.data

from raytrain_speech import ray_session
from raytrain_speech.config import Config
from raytrain_speech.data import corpus
from raytrain_speech.data.pipeline import source_dataset


def decode_rows(cfg: Config, split: str, decoder_cls: type, decoder_kwargs: dict) -> list[dict]:
    """Every utterance of ``split`` decoded by ``decoder_cls`` actors, gathered on the driver. Joins
    ``run.ray_address`` / $RAY_ADDRESS, or starts a local Ray sized to the pool."""
    ev = cfg.eval
    ray_session.connect(cfg.run.ray_address, num_cpus=max(os.cpu_count() or 1, int(ev.actors * ev.actor_cpus) + 1),
                        object_store_mb=cfg.run.object_store_memory_mb, dashboard=False)
    ds = source_dataset(cfg, split, corpus.shard_uris(cfg.data.root, split, cfg.storage))
    gpus = {"num_gpus": ev.actor_gpus} if ev.actor_gpus else {}
    ds = ds.map_batches(
        decoder_cls, fn_constructor_kwargs=decoder_kwargs, batch_size=ev.actor_batch_rows, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=ev.actors), num_cpus=ev.actor_cpus, **gpus,
    )
    return [{k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()} for row in ds.iter_rows()]
