"""Ray Train's Runtime for the Trainer: the only caller of Ray Train's worker API.

``train_loop_per_worker`` is what ``TorchTrainer`` runs on every worker; it builds a ``RayRuntime``
(rank, world size and device from Train's context, DDP through ``prepare_model``, the dataset
shards Train split for this worker, reports and checkpoints through ``ray.train.report``) and
hands it to the same Trainer the local backend runs.
"""

from __future__ import annotations

import tempfile

import ray
import ray.train
import ray.train.torch
import torch
from torch import nn

from raytrain_speech import ray_compat, ray_session
from raytrain_speech.config import Config
from raytrain_speech.data.mixture import train_data_label
from raytrain_speech.data.pipeline import epoch_clock, epoch_clock_name, needs_epoch_clock
from raytrain_speech.data.prefetch import prefetch, stall_message
from raytrain_speech.train import checkpoint
from raytrain_speech.train.checkpoint import Restored
from raytrain_speech.train.metrics import run_dir
from raytrain_speech.train.trainer import CheckpointWrite, Trainer

TRAIN_DATASET = "train"
RESUME_DATASET = "train_resume"
"""The rest of an interrupted epoch: the train split minus what the restored checkpoint consumed
(built by launch.resume_dataset on the Train controller from the same checkpoint)."""


class RayRuntime:
    """One Ray Train worker's side of the Runtime protocol (train/trainer.py)."""

    def __init__(self, cfg: Config):
        ctx = ray.train.get_context()
        self.cfg = cfg
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.run_dir = run_dir(cfg)
        self.clock = epoch_clock(epoch_clock_name(cfg)) if needs_epoch_clock(cfg) else None
        self.epoch = 0

    def prepare_model(self, model: nn.Module) -> nn.Module:
        # Gradients as views into DDP's buckets: one copy of the gradients instead of two (the memory
        # plan counts one, train/memory_plan.py); same arithmetic.
        return ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"gradient_as_bucket_view": True})

    def latest_checkpoint(self) -> Restored | None:
        """Train's latest committed checkpoint, unless the local backend committed a newer one in the
        same run directory (a run that moved between backends): the one the dataset factory on the
        controller chose too (checkpoint.latest_committed_dir)."""
        chosen = checkpoint.latest_committed_dir(self.run_dir, self.cfg.storage)
        ckpt = ray.train.get_checkpoint()
        if ckpt is not None and (chosen is None or checkpoint.step_of(ckpt.path) >= checkpoint.step_of(chosen)):
            with ckpt.as_directory() as d:
                return Restored(checkpoint.load(d), checkpoint.load_cursor(d), ckpt.path)
        return None if chosen is None else checkpoint.read_restored(chosen, self.cfg.storage)

    def start_epoch(self, epoch: int) -> None:
        """Ray Data's augmentation tasks cannot know which epoch Train is re-executing the dataset for:
        rank 0 sets the run's epoch clock (the Trainer's barrier follows)."""
        self.epoch = epoch
        if self.clock is not None and self.rank == 0:
            ray.get(self.clock.set.remote(epoch))

    def epoch_rows(self, consumed):
        """This worker's split of the epoch's Ray Data stream, pulled one batch ahead in a thread so a
        stalled pipeline ends the attempt after ``data.stall_timeout_s`` (data/prefetch.py)."""
        dc = self.cfg.data
        name = RESUME_DATASET if consumed is not None else TRAIN_DATASET
        rows = ray.train.get_dataset_shard(name).iter_batches(
            batch_size=dc.preprocess_batch_rows, batch_format="numpy", prefetch_batches=dc.prefetch_batches)
        epoch = self.epoch
        root, split = train_data_label(self.cfg)
        return prefetch(rows, 1, dc.stall_timeout_s,
                        lambda waited_s: stall_message(self.rank, root, split, epoch, waited_s))

    def preempted_ranks(self) -> list[int] | None:
        info = ray_compat.preemption_info()
        return None if info is None else list(info.preempted_ranks)

    def report(self, metrics: dict, ckpt: CheckpointWrite | None) -> None:
        """``ray.train.report``: on checkpoint steps every rank passes the same directory name and rank 0
        the files, which Ray uploads in the background (``async``; Ray deletes the local copy once
        uploaded) or before returning (``sync``). Either way Ray commits a checkpoint only once its
        upload is complete, so a crash mid-upload leaves the previous one as the one to restore."""
        if ckpt is None or ckpt.save is None:
            ray.train.report(metrics, checkpoint_dir_name=None if ckpt is None else ckpt.dir_name)
            return
        from ray.train import CheckpointUploadMode

        if not ckpt.sync:
            d = tempfile.mkdtemp(prefix="rts-ckpt-")
            ckpt.save(d)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                             checkpoint_dir_name=ckpt.dir_name, checkpoint_upload_mode=CheckpointUploadMode.ASYNC,
                             delete_local_checkpoint_after_upload=True)
            return
        with tempfile.TemporaryDirectory(prefix="rts-ckpt-") as d:
            ckpt.save(d)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                             checkpoint_dir_name=ckpt.dir_name)


def train_loop_per_worker(config: dict) -> None:
    cfg = Config.from_dict(config)
    ray_session.quiet_train_worker()
    torch.set_num_threads(cfg.train.torch_threads)
    Trainer(cfg, RayRuntime(cfg)).run()
