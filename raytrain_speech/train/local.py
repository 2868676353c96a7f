"""The local backend (``run.backend=local``): the Trainer in this one process, on one device, with no Ray.

For debugging (a breakpoint in the loop, no worker processes), single-GPU boxes, and GPU machines
where Ray is not installed. It is the same product path as Ray's, not a second one: the same Trainer,
the same preprocessing function the Ray Data chain maps (``data.preprocess.preprocess_training_rows``)
over the same corpus readers (``data.corpus``), the same checkpoint format and run records. So a run
trained here resumes under Ray and the reverse (train/checkpoint.py says which checkpoint is whose).

Data is read and preprocessed in a background thread (``data/prefetch.py``, with its stall watchdog),
a few row batches ahead of the step (decoding and the front end release the GIL for most of their
time), in a shard order shuffled per epoch the way Ray Data randomizes block order.
"""

from __future__ import annotations

import random
import tempfile
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from raytrain_speech import storage
from raytrain_speech.config import Config
from raytrain_speech.data import corpus, mixture
from raytrain_speech.data.prefetch import prefetch, stall_message
from raytrain_speech.data.preprocess import TrainingRecipe, preprocess_training_rows
from raytrain_speech.train import checkpoint
from raytrain_speech.train.checkpoint import Restored
from raytrain_speech.train.metrics import RunRecord, run_dir, run_info
from raytrain_speech.train.trainer import CheckpointWrite, Trainer


def local_device(cfg: Config) -> torch.device:
    """cuda:0 with ``run.use_gpu`` (an error naming the key where there is none), else the CPU."""
    if not cfg.run.use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("run.use_gpu=true but torch sees no CUDA device on this machine "
                           "(set run.use_gpu=false to train on the CPU)")
    return torch.device("cuda", 0)


class LocalRuntime:
    """The Runtime protocol (train/trainer.py) for one process: rank 0 of a world of 1."""

    rank = 0
    world_size = 1

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.device = local_device(cfg)
        self.run_dir = run_dir(cfg)
        self.record = RunRecord(self.run_dir, cfg.storage, run_info(cfg), trackers=cfg.run.trackers)
        self.recipe = TrainingRecipe.from_config(cfg)
        self.epoch = 0
        self.mixture = None  # data.sources: read once, in the first epoch's prefetch thread

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def latest_checkpoint(self) -> Restored | None:
        chosen = checkpoint.latest_committed_dir(self.run_dir, self.cfg.storage)
        return None if chosen is None else checkpoint.read_restored(chosen, self.cfg.storage)

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_shards(self) -> list[str]:
        """The readable shards of the train split, in this epoch's order."""
        cfg = self.cfg
        uris, _ = corpus.readable_shards(cfg.data.root, cfg.data.train_split, cfg.storage)
        if cfg.data.shuffle_blocks:
            random.Random(f"{cfg.train.seed}/{self.epoch}").shuffle(uris)
        return uris

    def epoch_rows(self, consumed: np.ndarray | None) -> Iterator[dict]:
        cfg, epoch = self.cfg, self.epoch
        consumed = consumed if consumed is not None and consumed.any() else None

        def rows() -> Iterator[dict]:  # all of the epoch's reads, the shard list too, in the prefetch thread
            raw = (self._mixture_rows(consumed, epoch) if cfg.data.sources else
                   corpus.read_batches(cfg.data.root, cfg.data.train_split, cfg.storage, uris=self.epoch_shards(),
                                       consumed=consumed, rows_per_batch=cfg.data.preprocess_batch_rows))
            for b in raw:
                yield preprocess_training_rows(b, self.recipe, cfg.train.seed, epoch)

        root, split = mixture.train_data_label(cfg)
        return prefetch(rows(), cfg.data.prefetch_batches, cfg.data.stall_timeout_s,
                        lambda waited_s: stall_message(0, root, split, epoch, waited_s))

    def _mixture_rows(self, consumed: np.ndarray | None, epoch: int) -> Iterator[dict]:
        """Mixture epoch ``epoch``'s rows: every source's shards, in an order shuffled per epoch."""
        cfg = self.cfg
        if self.mixture is None:
            self.mixture = mixture.build_mixture(cfg)
        items = self.mixture.items(pieces=1)
        if cfg.data.shuffle_blocks:
            random.Random(f"{cfg.train.seed}/{epoch}").shuffle(items)
        for item in items:
            yield from mixture.item_batches(self.mixture, item, epoch, consumed, cfg.data.preprocess_batch_rows, 1)

    def preempted_ranks(self) -> list[int] | None:
        return None  # one process: nothing drains it but the user

    def report(self, metrics: dict, ckpt: CheckpointWrite | None) -> None:
        path = None
        if ckpt is not None:
            path = self._commit(ckpt, metrics)
        self.record.add(metrics, checkpoint_path=path)

    def _commit(self, ckpt: CheckpointWrite, metrics: dict) -> str:
        """Write the checkpoint's directory, then the record that names it (the commit), then drop the
        checkpoints beyond ``run.checkpoints_to_keep``."""
        cfg = self.cfg
        uri = storage.join(self.run_dir, ckpt.dir_name)
        with tempfile.TemporaryDirectory(prefix="rts-ckpt-") as d:
            ckpt.save(d)
            storage.upload_dir(d, uri, cfg.storage)
        entries = [e for e in checkpoint.read_local_record(self.run_dir, cfg.storage) if e["dir"] != ckpt.dir_name]
        score_key = cfg.run.checkpoint_score_attribute
        entries.append({"dir": ckpt.dir_name, "step": checkpoint.step_of(ckpt.dir_name),
                        **({"score": metrics.get(score_key)} if score_key else {})})
        kept, dropped = keep(entries, cfg.run.checkpoints_to_keep, score_key is not None,
                             cfg.run.checkpoint_score_order)
        checkpoint.write_local_record(self.run_dir, kept, cfg.storage)
        for e in dropped:
            storage.delete_dir(storage.join(self.run_dir, e["dir"]), cfg.storage)
        return uri


def keep(entries: list[dict], num_to_keep: int, by_score: bool, order: str) -> tuple[list[dict], list[dict]]:
    """(kept, dropped) checkpoints, oldest first: the latest always, then the best by score (or the
    newest) up to ``num_to_keep``; as Ray's CheckpointConfig does."""
    latest = entries[-1]
    others = entries[:-1]
    if by_score:
        worst = float("inf") if order == "min" else float("-inf")
        others.sort(key=lambda e: e.get("score") if e.get("score") is not None else worst, reverse=order == "max")
    else:
        others.reverse()
    kept = others[: num_to_keep - 1] + [latest]
    kept.sort(key=lambda e: e["step"])
    return kept, [e for e in entries if e not in kept]


def run_local(cfg: Config) -> None:
    """Train ``cfg`` in this process (the local backend's counterpart of ``train_loop_per_worker``)."""
    torch.set_num_threads(cfg.train.torch_threads)
    Trainer(cfg, LocalRuntime(cfg)).run()
