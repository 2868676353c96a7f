"""``train_loop_per_worker``: the only place that talks to Ray Train's worker API.

Every rank runs this. Ranks step in lockstep: before each optimizer step one all-reduce tells every
rank whether all of them still have a full set of micro-batches and how many tokens/seconds the
global batch holds; when any rank runs dry the epoch ends for all (no hang in ``report``'s barrier
from unevenly bucketed shards).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import ray.train
import torch
import torch.distributed as dist

from raytrain_speech.configlib import require
from raytrain_speech.data.batching import Batch
from raytrain_speech.data.pipeline import worker_batches
from raytrain_speech.data.text import CharTokenizer
from raytrain_speech.models.registry import build_model, count_parameters
from raytrain_speech.objectives import ctc
from raytrain_speech.train import checkpoint
from raytrain_speech.train.checkpoint import TrainState
from raytrain_speech.train.optim import build_optimizer, lr_at, set_lr
from raytrain_speech.train.step import Stepper


@dataclass
class TrainConfig:
    """Length of training, the global batch promise, and reporting cadence."""

    seed: int = 0
    """Seeds model init and per-epoch batch shuffling."""
    max_steps: int = 1500
    """Optimizer steps in the whole run (the LR schedule spans these)."""
    max_epochs: int | None = None
    """Stop earlier after this many passes over the train split (None = no limit)."""
    global_batch_audio_s: float = 120.0
    """Padded audio seconds per optimizer step summed over all workers and micro-batches."""
    grad_accum_steps: int = 1
    """Micro-batches per worker per optimizer step."""
    log_every_steps: int = 10
    """Report metrics (a barrier across ranks) every this many steps."""
    checkpoint_every_steps: int = 250
    """Save a full-state checkpoint every this many steps (and always at the last step)."""
    torch_threads: int = 1
    """torch intra-op threads per worker (CPU training: cores / workers)."""

    def validate(self) -> None:
        require(self.max_steps >= 1, "train.max_steps", "must be >= 1")
        require(self.global_batch_audio_s > 0, "train.global_batch_audio_s", "must be positive")
        require(self.grad_accum_steps >= 1, "train.grad_accum_steps", "must be >= 1")
        require(self.log_every_steps >= 1, "train.log_every_steps", "must be >= 1")
        require(self.checkpoint_every_steps >= 1, "train.checkpoint_every_steps", "must be >= 1")
        require(self.torch_threads >= 1, "train.torch_threads", "must be >= 1")


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    digest = hashlib.sha256(f"{seed}/{epoch}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def lockstep(batches: Iterator[Batch], accum: int, world: int, device: torch.device,
             ) -> Iterator[tuple[list[Batch], list[float]]]:
    """Yield (micro_batches, [ranks_ready, tokens, audio_s, utterances] summed over ranks)."""
    it = iter(batches)
    while True:
        group = list(itertools.islice(it, accum))
        ready = 1.0 if len(group) == accum else 0.0
        totals = all_reduce_sum([ready, sum(float(b.target_lengths_B.sum()) for b in group),
                                 sum(b.audio_s for b in group), sum(b.size for b in group)], device)
        if totals[0] < world:
            return
        yield group, totals


def _quiet_report_logs() -> None:
    """Ray 2.60 logs every report at INFO through a logger named by a file path (``getLogger(__file__)``
    in ``ray/train/v2/_internal/execution/context.py``), out of reach of ``LoggingConfig``; at one
    report per few seconds that drowns the progress display."""
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


@dataclass
class Window:
    """Per-rank sums since the last report."""

    loss_sum: float = 0.0
    tokens: float = 0.0
    padding: float = 0.0
    grad_norm: float = 0.0
    steps: int = 0

    def add(self, result, group: list[Batch]) -> None:
        self.loss_sum += result.loss_sum
        self.tokens += result.tokens
        self.padding += sum(b.padding_fraction for b in group) / len(group)
        self.grad_norm += result.grad_norm
        self.steps += 1


class BadInputCounter:
    """Counts rows the preprocessor rejected; logs the first few with their ids and reasons."""

    def __init__(self, log_first: int = 5):
        self.count, self.log_first = 0, log_first

    def __call__(self, utt_id: str, reason: str) -> None:
        self.count += 1
        if self.count <= self.log_first:
            print(f"[raytrain-speech] skipped utterance {utt_id}: {reason}", file=sys.stderr, flush=True)


def _build(cfg, device: torch.device):
    """Model (DDP-wrapped), optimizer, stepper and the restored (or fresh) TrainState."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, CharTokenizer(cfg.text).vocab_size)
    n_params = count_parameters(model)
    optimizer = build_optimizer(model.to(device), cfg.optim)
    model = ray.train.torch.prepare_model(model)
    stepper = Stepper(model, optimizer, cfg.step, ctc.loss, device)
    payload = checkpoint.latest_ray_checkpoint()
    state = checkpoint.restore(payload, model, optimizer, stepper.scaler) if payload else TrainState()
    return stepper, state, n_params, payload is not None


def train_loop_per_worker(config: dict) -> None:
    from raytrain_speech.config import Config, dump_yaml

    cfg = Config.from_dict(config)
    _quiet_report_logs()
    tc = cfg.train
    torch.set_num_threads(tc.torch_threads)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    stepper, state, n_params, resumed = _build(cfg, device)
    state.attempts += 1
    state.world_sizes.append(world)
    if rank == 0:
        where = f"resuming at step {state.step}" if resumed else "starting fresh"
        print(f"[raytrain-speech] {world} worker(s), {n_params / 1e6:.2f} M parameters, "
              f"{stepper.precision} on {device.type}, {where}", flush=True)
    config_yaml = dump_yaml(cfg)
    shard = ray.train.get_dataset_shard("train")
    micro_budget_s = tc.global_batch_audio_s / (world * tc.grad_accum_steps)
    bad = BadInputCounter()

    def save_checkpoint(snapshot: TrainState, metrics: dict) -> None:
        """Every rank reports (a barrier); rank 0 writes the checkpoint directory."""
        save_fn = None
        if rank == 0:
            def save_fn(d):
                checkpoint.save(d, stepper.model, stepper.optimizer, stepper.scaler, snapshot, config_yaml)
        checkpoint.report(metrics, f"checkpoint_step{snapshot.step:08d}", save_fn)

    attempt_start = last_wall = time.time()
    attempt_audio_s = 0.0
    window = Window()
    last_ckpt_step = state.step
    while state.step < tc.max_steps and (tc.max_epochs is None or state.epoch < tc.max_epochs):
        epoch_start_step = state.step
        rows = shard.iter_batches(batch_size=cfg.data.preprocess_batch_rows, batch_format="numpy",
                                  prefetch_batches=cfg.data.prefetch_batches)
        batches = worker_batches(rows, micro_budget_s, cfg.batching, epoch_seed(tc.seed, state.epoch, rank), bad)
        for group, totals in lockstep(batches, tc.grad_accum_steps, world, device):
            group = [b.to(device) for b in group]
            lr = lr_at(state.step, tc.max_steps, cfg.optim)
            set_lr(stepper.optimizer, lr)
            result = stepper.step(group, totals[1], world)
            now = time.time()
            state.step += 1
            state.audio_s_seen += totals[2]
            state.utterances_seen += int(totals[3])
            state.skipped_steps += int(result.skipped)
            state.train_wall_s += now - last_wall
            attempt_audio_s += totals[2]
            last_wall = now
            window.add(result, group)

            is_last = state.step >= tc.max_steps
            is_ckpt = is_last or state.step % tc.checkpoint_every_steps == 0
            if not (is_ckpt or state.step % tc.log_every_steps == 0):
                continue
            loss_sum, tokens, bad_total = all_reduce_sum([window.loss_sum, window.tokens, bad.count], device)
            snapshot = TrainState(**{**state.__dict__, "bad_utterances": state.bad_utterances + int(bad_total)})
            metrics = {
                "step": state.step, "epoch": state.epoch, "loss": loss_sum / max(tokens, 1.0), "lr": lr,
                "grad_norm": window.grad_norm / window.steps, "padding_fraction": window.padding / window.steps,
                "audio_hours_seen": state.audio_s_seen / 3600, "utterances_seen": state.utterances_seen,
                "throughput_audio_s_per_s": attempt_audio_s / max(now - attempt_start, 1e-9),
                "train_wall_s": state.train_wall_s, "world_size": world, "attempt": state.attempts,
                "bad_utterances": snapshot.bad_utterances, "skipped_steps": state.skipped_steps,
                "parameters": n_params, "checkpoint": is_ckpt,
            }
            window = Window()
            if is_ckpt:
                last_ckpt_step = state.step
                save_checkpoint(snapshot, metrics)
            else:
                checkpoint.report(metrics)
            last_wall = time.time()  # time spent reporting/uploading is not training time
            if is_last:
                break
        if state.step == epoch_start_step:
            raise RuntimeError(
                f"epoch {state.epoch} gave no full step: the train split is smaller than one global batch "
                f"({tc.global_batch_audio_s} s over {world} workers x {tc.grad_accum_steps} micro-batches); "
                "lower train.global_batch_audio_s or add data")
        state.epoch += 1
    if state.step != last_ckpt_step:  # stopped by max_epochs between checkpoints
        (bad_total,) = all_reduce_sum([bad.count], device)
        snapshot = TrainState(**{**state.__dict__, "bad_utterances": state.bad_utterances + int(bad_total)})
        save_checkpoint(snapshot, {"step": state.step, "epoch": state.epoch, "checkpoint": True,
                                   "audio_hours_seen": state.audio_s_seen / 3600,
                                   "train_wall_s": state.train_wall_s})
