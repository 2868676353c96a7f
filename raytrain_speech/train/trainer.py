"""The Trainer: one training loop for every model family, in plain torch, driven by a ``Runtime``.

Every rank runs one Trainer. It owns the loop (epochs, lockstep, the step, accumulation, validation,
early stopping, checkpoint cadence); what differs between running under Ray Train and running in one
process is the Runtime it is given (``train/worker.py`` for Ray, ``train/local.py`` for
``run.backend=local``): rank and world size, the device, DDP wrapping, the latest committed
checkpoint, the rows of an epoch, the preemption notice, and where reports and checkpoints go. The
Trainer never imports Ray, so it runs and is tested on a box without it.

Ranks step in lockstep: before each optimizer step one all-reduce tells every rank whether any of
them still has micro-batches and how many loss units the global batch holds; a rank that runs dry
steps zero-gradient fillers until all have (collectives.lockstep), so every rank reports at the same
steps and nobody hangs in ``report``'s barrier on unevenly bucketed shards.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
import torch
from torch import nn

from raytrain_speech import storage
from raytrain_speech.batch import Batch
from raytrain_speech.config import Config, dump_yaml
from raytrain_speech.data import corpus
from raytrain_speech.data.augment import mask_batch
from raytrain_speech.data.batching import duration_quantile_boundaries, filler_batch
from raytrain_speech.data.features import DeviceLogMel
from raytrain_speech.data.mixture import Mixture, build_mixture, train_data_label
from raytrain_speech.data.prefetch import WaitClock
from raytrain_speech.data.preprocess import worker_batches
from raytrain_speech.data.progress import DataCursor
from raytrain_speech.data.shards import read_manifest
from raytrain_speech.data.text import TOKENIZER_FILES
from raytrain_speech.data.tokenizer import load_tokenizer
from raytrain_speech.evaluate.validate import Validator, source_validators, summarize
from raytrain_speech.models.masking import model_channel_mask, model_span_mask
from raytrain_speech.models.registry import build_model, count_parameters, objective_for
from raytrain_speech.seeding import epoch_seed
from raytrain_speech.train import checkpoint, collectives, finetune
from raytrain_speech.train.bad_input import BadInputAccountant
from raytrain_speech.train.bad_input import log as console_line
from raytrain_speech.train.checkpoint import Restored, TrainState
from raytrain_speech.train.memory import malloc_trim, rss_mb
from raytrain_speech.train.metrics import AttemptClock, TrainedLog, Window, device_name, run_dir
from raytrain_speech.train.optim import build_optimizer, lr_at, set_lr
from raytrain_speech.train.sources import SourceTally
from raytrain_speech.train.step import Stepper, unwrap


@dataclass
class CheckpointWrite:
    """A checkpoint to report: every rank passes one with the same ``dir_name``; ``save(directory)``
    (rank 0's only) fills a local directory with the checkpoint's files."""

    dir_name: str
    save: Callable[[str], None] | None
    sync: bool
    """Whether the report must return only once the checkpoint is stored (preemption: the node is
    going), instead of uploading in the background while training goes on."""


class Runtime(Protocol):
    """What the Trainer needs from where it runs (Ray Train's workers, or one local process)."""

    rank: int
    world_size: int
    device: torch.device

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """The model on the device, wrapped for data parallelism where there is more than one rank."""

    def latest_checkpoint(self) -> Restored | None:
        """The run's latest committed checkpoint (any backend's), or None on a fresh start."""

    def start_epoch(self, epoch: int) -> None:
        """Called on every rank before any rank iterates ``epoch`` (then a barrier): where the data
        path learns the epoch its augmentation is drawn for."""

    def epoch_rows(self, consumed: np.ndarray | None) -> Iterable[dict]:
        """This rank's preprocessed row batches of the epoch; ``consumed`` (a resumed epoch) are the
        utterances the restored checkpoint had already trained on, left out before decoding."""

    def preempted_ranks(self) -> list[int] | None:
        """The ranks on nodes being drained (spot reclaim), or None. A collective: every rank asks at
        the same step."""

    def report(self, metrics: dict, ckpt: CheckpointWrite | None) -> None:
        """Record rank 0's metrics (and commit the checkpoint); a barrier: every rank calls it at the same
        steps."""


def log(message: str, err: bool = False) -> None:
    console_line(message, err)  # stdout unless err (train/bad_input.py says why not print)


class Trainer:
    """One rank's side of one attempt (worker-group start to finish or failure)."""

    def __init__(self, cfg: Config, runtime: Runtime):
        self.cfg, self.tc, self.rt = cfg, cfg.train, runtime
        self.rank, self.world, self.device = runtime.rank, runtime.world_size, runtime.device
        self._build_model()
        self._restore()
        self._plan_data()
        self._prepare_reporting()

    # -- set-up ----------------------------------------------------------------------------------------

    def _build_model(self) -> None:
        cfg = self.cfg
        torch.manual_seed(self.tc.seed)
        tokenizer = load_tokenizer(cfg.text, cfg.storage)
        model = build_model(cfg.model, tokenizer.vocab_size, tokenizer.specials or None)
        self.tokenizer_files = {}  # the tokenizer file travels in every checkpoint (data/text.py)
        if tokenizer.kind in TOKENIZER_FILES and self.rank == 0:
            self.tokenizer_files[TOKENIZER_FILES[tokenizer.kind]] = storage.read_bytes(cfg.text.tokenizer_path,
                                                                                        cfg.storage)
        self.n_params = count_parameters(model)
        self.objective = objective_for(cfg.model)
        self.restored = self.rt.latest_checkpoint()
        # init_from is loaded on restarts too, so the optimizer's parameter groups come out the same.
        plan = finetune.plan(model, cfg, log=self.rank == 0 and self.restored is None)
        optimizer = build_optimizer(model.to(self.device), cfg.optim, pretrained=plan.pretrained,
                                    frozen=plan.frozen_until)
        self.stepper = Stepper(self.rt.prepare_model(model), optimizer, cfg.step, self.objective.loss, self.device)
        self.model = unwrap(self.stepper.model)
        self.ssl_masks = self.model.span_masking is not None or self.model.channel_masking is not None

    def _restore(self) -> None:
        cfg, stepper = self.cfg, self.stepper
        # A mixture of corpora (data.sources): its sources read once, on rank 0, for every rank.
        self.mixture: Mixture | None = None
        if cfg.data.sources:
            self.mixture = collectives.broadcast(build_mixture(cfg) if self.rank == 0 else None, self.rank)
        else:
            self.n_train = read_manifest(cfg.data.root, cfg.storage).splits[cfg.data.train_split].num_utterances
        plan_key = self.mixture.key if self.mixture is not None else ""
        if self.restored is None:
            self.state, self.cursor = TrainState(), DataCursor(self._epoch_size(0), 0, plan_key=plan_key)
        else:
            self.state = checkpoint.restore(self.restored.payload, stepper.model, stepper.optimizer, stepper.scaler,
                                            stepper.ema, rank=self.rank, device=self.device)
            self.cursor = self.restored.cursor or DataCursor(self._epoch_size(self.state.epoch), self.state.epoch,
                                                             plan_key=plan_key)
            if self.cursor.plan_key != plan_key:
                raise RuntimeError(
                    f"{self.restored.uri}: its data cursor numbers "
                    f"{'another mixture' if self.cursor.plan_key else 'one corpus'} than data.sources now give "
                    "(the sources, their weights, the seed or their readable shards changed); restore those, or "
                    "train under a new run.name")
        self.state.attempts += 1
        self.state.world_sizes.append(self.world)
        self.accum, self.micro_budget_s = self.tc.accumulation(self.world)
        self.tally = SourceTally(self.mixture) if self.mixture is not None else None

    def _epoch_size(self, epoch: int) -> int:
        """Cursor entries of ``epoch``: the split's utterances, or the mixture epoch's occurrences."""
        return self.mixture.epoch(epoch).size if self.mixture is not None else self.n_train

    def _plan_data(self) -> None:
        """Unreadable shards and duration-bucket edges, read once on rank 0 and broadcast."""
        cfg = self.cfg
        self.run_dir = run_dir(cfg)
        self.bad = BadInputAccountant(self.run_dir, cfg.storage, cfg.data, self.rank, self.world, self.device)
        plan = None
        if self.mixture is not None:
            edges = None
            if cfg.batching.duration_buckets > 1:
                edges = duration_quantile_boundaries(self.mixture.durations_s(), cfg.batching.duration_buckets)
            plan = ([b for s in self.mixture.sources for b in s.bad_shards], edges)
        elif self.rank == 0:
            good, bad_shards = corpus.readable_shards(cfg.data.root, cfg.data.train_split, cfg.storage)
            edges = None
            if cfg.batching.duration_buckets > 1:
                durations = corpus.read_durations(cfg.data.root, cfg.data.train_split, cfg.storage, good)
                edges = duration_quantile_boundaries(durations, cfg.batching.duration_buckets)
            plan = (bad_shards, edges)
        self.bad_shards, self.boundaries_s = plan if self.mixture is not None else collectives.broadcast(plan, self.rank)
        self.frontend = (DeviceLogMel(cfg.features).to(self.device)
                         if cfg.features.placement == "worker" and cfg.features.kind == "log_mel" else None)
        self.filler: Batch = filler_batch(cfg.features)

    def _prepare_reporting(self) -> None:
        cfg, tc = self.cfg, self.tc
        self.config_yaml = dump_yaml(cfg)
        self.window = Window()
        self.clock = AttemptClock()
        self.data_wait = WaitClock()
        self.reported_wait_s = 0.0
        self.last_ckpt_step = self.state.step
        self.reports = 0
        self.preemption_saved = False
        self.validator = None
        if tc.validate_every_steps or cfg.run.checkpoint_score_attribute:
            self.validator = Validator(cfg, cfg.data.valid_split, self.rank, self.world)
        self.source_validators = source_validators(cfg, self.rank, self.world) if self.validator else []
        # Rank 0's id for this attempt: the run card and the trained logs group by it, so an attempt
        # that ends before its first checkpoint (and so restores the same attempt count as the next
        # one) is still an attempt of its own.
        self.attempt_id = collectives.broadcast(uuid.uuid4().hex, self.rank)
        self.attempt_start_step = self.state.step
        self.trained_log = None
        if tc.trained_log_dir:
            self.trained_log = TrainedLog(tc.trained_log_dir, {
                "attempt_id": self.attempt_id, "rank": self.rank, "world_size": self.world,
                "restored_step": self.state.step, "grad_accum": self.accum})

    # -- the loop --------------------------------------------------------------------------------------

    def run(self) -> TrainState:
        """Train to max_steps / max_epochs / an early stop, and report the final state."""
        self._announce()
        tc, first = self.tc, True
        while not self.state.finished(tc.max_steps, tc.max_epochs):
            resuming = first and not self.cursor.empty
            consumed = self.cursor.consumed.copy() if resuming else None
            first = False
            self._start_epoch()
            epoch_start_step = self.state.step
            for group, totals in collectives.lockstep(self._epoch_batches(consumed), self.accum, self.device,
                                                      self.objective.units):
                self._step(group, totals)
                if self.state.step >= tc.max_steps or self.state.stopped_early:
                    return self._finish()
            self._end_epoch(epoch_start_step, resuming)
        return self._finish()

    def _announce(self) -> None:
        if self.rank != 0:
            return
        c = self.cursor
        where = (f"resuming at step {self.state.step} (epoch {c.epoch}, {c.count}/{c.num_utterances} utterances "
                 "done)" if self.restored is not None else "starting fresh")
        log(f"{self.world} worker(s) x {self.accum} micro-batch(es) of <= {self.micro_budget_s:.0f} audio-s, "
            f"{self.n_params / 1e6:.2f} M parameters, {self.stepper.precision} on {self.device.type}, {where}")
        if self.mixture is not None:
            log(f"training on a {self.mixture.describe()}")

    def _start_epoch(self) -> None:
        """Before any rank iterates an epoch: count unreadable shards, tell the data path the epoch (the
        barrier keeps every rank from starting before it is set)."""
        self.bad.skip_bad_shards(self.cursor, self.bad_shards, mark=self.mixture is None)
        self.rt.start_epoch(self.cursor.epoch)
        collectives.barrier(self.device)

    def _epoch_batches(self, consumed: np.ndarray | None) -> Iterator[Batch]:
        rows = self.data_wait.timed(self.rt.epoch_rows(consumed))
        if consumed is not None:
            rows = self.bad.drop_stale(rows, consumed)
        batching = self.cfg.batching
        cap = self.tc.utterance_cap(self.world)
        if cap is not None:
            batching = replace(batching, max_batch_utterances=min(cap, batching.max_batch_utterances or cap))
        batches = worker_batches(rows, self.micro_budget_s, batching, epoch_seed(self.tc.seed, self.state.epoch,
                                                                                   self.rank),
                                 lambda i, utt_id, reason: self.bad.on_bad(self.cursor, i, utt_id, reason),
                                 self.boundaries_s)
        if self.frontend is not None:  # before the SSL masks, which are drawn over feature frames
            batches = map(self._featurize, batches)
        return map(self._with_ssl_mask, batches) if self.ssl_masks else batches

    def _featurize(self, batch: Batch) -> Batch:
        """``features.placement: worker``: the batch's center-padded waveforms -> log-mel on the device."""
        batch = batch.to(self.device)
        feats, frames = self.frontend(batch.features_BFM, batch.feature_lengths_B)
        return replace(batch, features_BFM=feats, feature_lengths_B=frames)

    def _with_ssl_mask(self, batch: Batch) -> Batch:
        """Masked families: the span mask over encoder frames (drawn before lockstep counts the masked frames,
        the loss normaliser) and the channel mask, both from (seed, epoch, index) like all augmentation."""
        seed, epoch = self.tc.seed, self.cursor.epoch
        if self.model.span_masking is not None:
            batch = replace(batch, mask_BT=model_span_mask(self.model, batch, seed, epoch))
        if self.model.channel_masking is not None:
            batch = replace(batch, channel_mask_BC=model_channel_mask(self.model, batch, seed, epoch))
        return batch

    def _augment(self, batch: Batch) -> Batch:
        features, fraction = mask_batch(batch.features_BFM, batch.feature_lengths_B, batch.indices,
                                        self.cfg.augment, self.tc.seed, self.cursor.epoch)
        self.window.masked_fraction += fraction
        self.window.masked_batches += 1
        return replace(batch, features_BFM=features)

    # -- one step --------------------------------------------------------------------------------------

    def _step(self, group: list[Batch], totals: list[float]) -> None:
        group = [b.to(self.device) for b in group]
        if group:
            self.filler = group[-1]
        if self.cfg.augment.enabled:
            group = [self._augment(b) for b in group]
        fillers = [self.filler.to(self.device)] * (self.accum - len(group))
        lr = lr_at(self.state.step, self.tc.max_steps, self.cfg.optim)
        set_lr(self.stepper.optimizer, lr, self.state.step)
        self.model.set_step(self.state.step)  # schedules inside the model (Gumbel temperature)
        result = self.stepper.step(group, totals[1], self.world, fillers=fillers)
        if self.tc.malloc_trim_every_steps and (self.state.step + 1) % self.tc.malloc_trim_every_steps == 0:
            malloc_trim()
        now = self._account(group, totals, result)
        self._after_step(lr, now)

    def _account(self, group: list[Batch], totals: list[float], result) -> float:
        """Counters, the window and the cursor after a step; returns the time it ended."""
        now, st = time.time(), self.state
        st.step += 1
        st.audio_s_seen += totals[2]
        st.utterances_seen += int(totals[3])
        st.skipped_steps += int(result.skipped)
        st.train_wall_s += now - self.clock.last_wall
        self.clock.audio_s += totals[2]
        self.clock.last_wall = now
        self.window.add(result, group)
        indices = [i for b in group for i in b.indices]
        self.cursor.mark(indices)
        if self.tally is not None and indices:
            self.tally.count(self.cursor.epoch, indices)
        if self.trained_log is not None:
            self.trained_log.write({"step": st.step, "epoch": self.cursor.epoch, "time": now, "indices": indices})
        return now

    def _after_step(self, lr: float, now: float) -> None:
        """Validate, stop early, checkpoint and report at their cadences (all ranks decide alike)."""
        tc, st = self.tc, self.state
        is_ckpt = st.step >= tc.max_steps or st.step % tc.checkpoint_every_steps == 0
        is_log = st.step % tc.log_every_steps == 0
        sync_upload = is_log and tc.checkpoint_on_preemption and self._preempted()
        is_ckpt = is_ckpt or sync_upload  # the node is going: this checkpoint must land before it does
        extra = {}
        if ((tc.validate_every_steps and st.step % tc.validate_every_steps == 0)
                or (is_ckpt and self.cfg.run.checkpoint_score_attribute)):
            extra = self._validate()
            if self._should_stop(extra):
                st.stopped_early = is_ckpt = True
        if sync_upload:
            extra = {**extra, "preemption_checkpoint": True}
        if is_ckpt or is_log or extra:
            self._report(lr, now, checkpoint_now=is_ckpt, extra=extra, sync_upload=sync_upload)

    def _preempted(self) -> bool:
        """Ray's drain notice for any node of this run, acted on once per attempt."""
        if self.preemption_saved:
            return False
        ranks = self.rt.preempted_ranks()
        if ranks is None:
            return False
        self.preemption_saved = True
        if self.rank == 0:
            log(f"preemption notice for ranks {ranks}: checkpointing at step {self.state.step}")
        return True

    # -- validation ------------------------------------------------------------------------------------

    def _validate(self) -> dict:
        """Loss (and greedy WER/CER for text families) on the valid split, summed over ranks (and on
        each mixture source's own valid_split, as source.<name>.valid_*); the EMA weights when the run
        keeps them."""
        model = self.stepper.model
        applied = self.stepper.ema.applied(model) if self.stepper.ema is not None else nullcontext(unwrap(model))
        out = {}
        with applied as weights:
            for prefix, validator in [("", self.validator), *self.source_validators]:
                counts = validator.counts(weights, self.device)
                keys = sorted(counts)
                summed = summarize(dict(zip(keys, collectives.all_reduce_sum([counts[k] for k in keys], self.device))))
                out.update({prefix + k: v for k, v in summed.items()})
        return out

    def _should_stop(self, valid: dict) -> bool:
        """Early stopping bookkeeping (kept in TrainState, so it survives restarts)."""
        if self.tc.early_stop_patience is None:
            return False
        st, value = self.state, valid[self.tc.early_stop_metric]
        if st.best_valid is None or value < st.best_valid - self.tc.early_stop_min_delta:
            st.best_valid, st.bad_validations = value, 0
            return False
        st.bad_validations += 1
        return st.bad_validations >= self.tc.early_stop_patience

    # -- reporting -------------------------------------------------------------------------------------

    def _judge_bad_input(self, bad: int, final: bool) -> None:
        """Stop the run (every rank, same step) when bad input exceeds data.max_bad_fraction."""
        if self.state.stopped_early:
            return
        reason = self.bad.verdict(bad, self.state.utterances_seen, final)
        if reason:
            self.state.stopped_early, self.state.stop_reason = True, reason
            if self.rank == 0:
                log(f"stopping: {reason}", err=True)

    def _metrics(self, lr: float | None, now: float) -> tuple[dict, TrainState]:
        """Collective: this report's metrics (rank 0's are kept) and the state a checkpoint would save."""
        w, st = self.window, self.state
        extra_keys = [f"{k}_sum" for k in self.objective.extra_stats]
        loss_sum, tokens, filtered, stale, *extra = collectives.all_reduce_sum(
            [w.loss_sum, w.tokens, self.bad.filtered, self.bad.stale_rows,
             *(w.extra_sums.get(k, 0.0) for k in extra_keys)], self.device)
        # The slowest rank's data wait holds every rank up (lockstep): the window's and the attempt's maximum.
        window_wait_s, attempt_wait_s = collectives.all_reduce_max(
            [self.data_wait.waited_s - self.reported_wait_s, self.data_wait.waited_s], self.device)
        self.reported_wait_s = self.data_wait.waited_s
        bad = self.bad.sync()
        self._judge_bad_input(bad, final=False)
        sources = {} if self.tally is None else self.tally.report(st, self.bad.per_source(self.mixture), self.device)
        snapshot = replace(st, bad_utterances=bad, filtered_utterances=st.filtered_utterances + int(filtered),
                           source_audio_s=dict(st.source_audio_s), source_utterances=dict(st.source_utterances))
        metrics = {
            "step": st.step, "epoch": self.cursor.epoch, "lr": lr, "audio_hours_seen": st.audio_s_seen / 3600,
            "utterances_seen": st.utterances_seen, "train_wall_s": st.train_wall_s, "world_size": self.world,
            "grad_accum": self.accum, "micro_batch_audio_s": self.micro_budget_s, "attempt": st.attempts,
            "attempt_id": self.attempt_id, "attempt_start_step": self.attempt_start_step,
            "bad_utterances": snapshot.bad_utterances, "filtered_utterances": snapshot.filtered_utterances,
            "skipped_steps": st.skipped_steps, "stale_rows": int(stale), "stop_reason": st.stop_reason, "parameters": self.n_params,
            "device": device_name(self.device), "stopped_early": st.stopped_early, "worker_rss_mb": rss_mb(),
            "data_wait_s": window_wait_s, "attempt_data_wait_s": attempt_wait_s,
            **self.clock.metrics(now), **w.summary(loss_sum, tokens, dict(zip(extra_keys, extra))), **sources,
        }
        self.window = Window()
        return metrics, snapshot

    def _report(self, lr: float | None, now: float, checkpoint_now: bool, extra: dict | None = None,
                sync_upload: bool = False) -> None:
        started = time.time()
        self.reports += 1
        metrics, snapshot = self._metrics(lr, now)
        metrics.update(extra or {})
        metrics["checkpoint"] = checkpoint_now
        ckpt = None
        if checkpoint_now:
            self.cursor.consumed = collectives.merge_consumed(self.cursor.consumed, self.device)
            metrics["epoch_utterances_done"] = self.cursor.count
            # Every rank's RNG streams (a collective), so each resumes its own dropout stream.
            rngs = collectives.all_gather(checkpoint.rng_state(self.device), self.world)
            ckpt = CheckpointWrite(checkpoint.dir_name(snapshot.step),
                                   self._saver(snapshot, rngs) if self.rank == 0 else None,
                                   sync=sync_upload or self.tc.checkpoint_upload == "sync")
            self.last_ckpt_step = snapshot.step
        self.rt.report(metrics, ckpt)
        self.clock.last_wall = time.time()  # time spent reporting/uploading is not training time
        blocked = self.clock.last_wall - started
        if checkpoint_now:
            self.clock.checkpoint_blocked_s += blocked
        else:
            self.clock.report_blocked_s += blocked

    def _saver(self, snapshot: TrainState, rngs: list[dict]) -> Callable[[str], None]:
        """Rank 0's checkpoint writer for this report (the fault-injection delay on the first attempt only)."""
        s, cursor = self.stepper, self.cursor
        delay_s = self.tc.fault_checkpoint_delay_s if snapshot.attempts == 1 else 0.0
        return lambda d: checkpoint.save(d, s.model, s.optimizer, s.scaler, snapshot, self.config_yaml, cursor,
                                         s.ema, fault_delay_s=delay_s, extra_files=self.tokenizer_files,
                                         rng_per_rank=rngs)

    def _end_epoch(self, epoch_start_step: int, resumed_tail: bool) -> None:
        self._judge_bad_input(self.bad.sync(), final=True)
        if self.state.step == epoch_start_step and not resumed_tail and not self.state.stopped_early:
            raise RuntimeError(
                f"epoch {self.state.epoch} gave no step: no usable utterance in {self._train_data()} after "
                "filtering (check data.min/max_duration_s and the bad-input messages above)")
        merged = collectives.merge_consumed(self.cursor.consumed, self.device)
        missing = int((~merged).sum())
        (stale,) = collectives.all_reduce_sum([self.bad.stale_rows], self.device)
        if self.rank == 0 and (missing or stale):
            log(f"epoch {self.cursor.epoch}: {missing} utterance(s) never arrived, {int(stale)} already-consumed "
                "row(s) dropped by the worker", err=True)
        self.state.epoch += 1
        self.cursor = self.cursor.next_epoch(self._epoch_size(self.state.epoch))

    def _train_data(self) -> str:
        root, split = train_data_label(self.cfg)
        return f"{root} split {split}"

    def _finish(self) -> TrainState:
        if self.state.step != self.last_ckpt_step:  # stopped by max_epochs between checkpoints
            extra = self._validate() if self.cfg.run.checkpoint_score_attribute else None
            self._report(None, time.time(), checkpoint_now=True, extra=extra)
        elif self.reports == 0:
            # Restarted after the last step (e.g. a sweep trial resumed after its run had finished):
            # report the final state once, validated, so whoever watches the run sees its result.
            extra = self._validate() if self.validator is not None else None
            self._report(None, time.time(), checkpoint_now=False, extra=extra)
        if self.trained_log is not None:
            self.trained_log.close()
        return self.state
