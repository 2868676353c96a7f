"""``train_loop_per_worker``: the only place that talks to Ray Train's worker API.

Every rank runs this. Ranks step in lockstep: before each optimizer step one all-reduce tells every
rank whether all of them still have a full set of micro-batches and how many tokens/seconds the
global batch holds; when any rank runs dry the epoch ends for all (no hang in ``report``'s barrier
from unevenly bucketed shards).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import ray.train
import torch
import torch.distributed as dist

from raytrain_speech import storage
from raytrain_speech.data.augment import mask_batch, model_span_mask
from raytrain_speech.data.badinput import BadInputLog
from raytrain_speech.data.batching import Batch, duration_quantile_boundaries
from raytrain_speech.data.features import DeviceLogMel
from raytrain_speech.data.pipeline import epoch_clock, epoch_clock_name, readable_shards, worker_batches
from raytrain_speech.data.preprocess import is_filtered
from raytrain_speech.data.text import CharTokenizer
from raytrain_speech.models.registry import build_model, count_parameters, objective_for
from raytrain_speech.objectives import ctc
from raytrain_speech.train import checkpoint
from raytrain_speech.train.checkpoint import TrainState
from raytrain_speech.train.memory import malloc_trim, rss_mb
from raytrain_speech.train.optim import build_optimizer, lr_at, set_lr
from raytrain_speech.train.step import Stepper, unwrap


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    digest = hashlib.sha256(f"{seed}/{epoch}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def lockstep(batches: Iterator[Batch], accum: int, device: torch.device, units=ctc.units,
             ) -> Iterator[tuple[list[Batch], list[float]]]:
    """Yield (this rank's 0..accum micro-batches, [ranks_with_data, loss units, audio_s, utterances]
    summed over ranks) until every rank has run dry; ranks short of ``accum`` batches fill in (see
    Stepper). ``units`` is the objective's normaliser (target tokens, masked frames)."""
    it = iter(batches)
    while True:
        group = list(itertools.islice(it, accum))
        totals = all_reduce_sum([1.0 if group else 0.0, sum(units(b) for b in group),
                                 sum(b.audio_s for b in group), sum(b.size for b in group)], device)
        if totals[0] == 0:
            return
        yield group, totals


def all_gather(value, world: int) -> list:
    """Every rank's ``value`` (picklable), in rank order."""
    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return [value]
    out = [None] * world
    dist.all_gather_object(out, value)
    return out


def broadcast(value, rank: int):
    """Rank 0's ``value`` on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def merge_consumed(consumed, device: torch.device):
    """OR of every rank's consumed bitmap (an all-reduce MAX over uint8)."""
    t = torch.from_numpy(consumed.astype("uint8")).to(device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.cpu().numpy().astype(bool)


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
    masked_fraction: float = 0.0
    masked_batches: int = 0
    extra_sums: dict = field(default_factory=dict)

    def add(self, result, group: list[Batch]) -> None:
        self.loss_sum += result.loss_sum
        self.tokens += result.tokens
        for k, v in result.extra_sums.items():
            self.extra_sums[k] = self.extra_sums.get(k, 0.0) + v
        self.padding += sum(b.padding_fraction for b in group) / len(group) if group else 0.0
        self.grad_norm += result.grad_norm
        self.steps += 1


def filler_batch(cfg) -> Batch:
    """A one-row batch for filler micro-steps on a rank that has not seen data in this attempt."""
    import numpy as np

    from raytrain_speech.data.batching import Utterance, collate

    shape = (100, cfg.features.n_mels) if cfg.features.kind == "log_mel" else (cfg.features.sample_rate_hz,)
    return collate([Utterance(-1, "filler", 1.0, np.zeros(shape, np.float32), np.ones(4, np.int64))])


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


class WorkerRun:
    """One rank's side of one attempt (worker-group start to finish or failure)."""

    def __init__(self, cfg):
        from raytrain_speech.config import dump_yaml
        from raytrain_speech.data.progress import DataCursor
        from raytrain_speech.data.shards import read_manifest

        self.cfg, self.tc = cfg, cfg.train
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        torch.manual_seed(self.tc.seed)
        model = build_model(cfg.model, CharTokenizer(cfg.text).vocab_size)
        self.n_params = count_parameters(model)
        self.objective = objective_for(cfg.model)
        restored = checkpoint.latest_ray_checkpoint()
        pretrained: set[str] = set()
        if self.tc.init_from:  # also on restarts, so the optimizer's parameter groups come out the same
            pretrained = checkpoint.init_from_pretrained(model, self.tc.init_from, cfg.storage,
                                                         log=self.rank == 0 and restored is None)
        frozen = dict.fromkeys(pretrained, self.tc.freeze_pretrained_steps)
        if self.tc.freeze_feature_encoder_steps and hasattr(model, "feature_encoder_parameters"):
            ids = {id(p) for p in model.feature_encoder_parameters()}
            for n, p in model.named_parameters():
                if id(p) in ids:
                    frozen[n] = max(frozen.get(n, 0), self.tc.freeze_feature_encoder_steps)
        optimizer = build_optimizer(model.to(self.device), cfg.optim, pretrained=pretrained, frozen=frozen)
        self.stepper = Stepper(ray.train.torch.prepare_model(model), optimizer, cfg.step, self.objective.loss,
                               self.device)
        n_train = read_manifest(cfg.data.root, cfg.storage).splits[cfg.data.train_split].num_utterances
        if restored is None:
            self.state, self.cursor = TrainState(), DataCursor(n_train, 0)
        else:
            payload, cursor = restored
            self.state = checkpoint.restore(payload, self.stepper.model, optimizer, self.stepper.scaler,
                                            self.stepper.ema)
            self.cursor = cursor if cursor is not None else DataCursor(n_train, self.state.epoch)
        self.resumed = restored is not None
        self.plain_model = unwrap(self.stepper.model)
        self.ssl_masks = getattr(self.plain_model, "mask_prob", 0.0) > 0
        self.state.attempts += 1
        self.state.world_sizes.append(self.world)
        self.accum, self.micro_budget_s = self.tc.accumulation(self.world)
        self.config_yaml = dump_yaml(cfg)
        self.bad_local = self.filtered_local = 0
        self.bad_new: list[dict] = []
        self.bad_log = BadInputLog(storage.join(cfg.run.storage_path, cfg.run.name), cfg.storage)
        self.bad_log.load()  # every rank reads the records of earlier attempts now, before rank 0 writes
        self.bad_shards, self.boundaries_s = broadcast(self._data_plan() if self.rank == 0 else None, self.rank)
        self.frontend = (DeviceLogMel(cfg.features).to(self.device)
                         if cfg.features.placement == "worker" and cfg.features.kind == "log_mel" else None)
        self.clock = epoch_clock(epoch_clock_name(cfg)) if cfg.augment.waveform_enabled else None
        self.stale_rows = 0
        self.filler: Batch = filler_batch(cfg)
        self.window = Window()
        self.attempt_start = self.last_wall = time.time()
        self.attempt_audio_s = 0.0
        self.checkpoint_blocked_s = self.report_blocked_s = 0.0
        self.last_ckpt_step = self.state.step
        self.validator = None
        if self.tc.validate_every_steps or cfg.run.checkpoint_score_attribute:
            from raytrain_speech.train.validate import Validator

            self.validator = Validator(cfg, cfg.data.valid_split, self.rank, self.world)
        self.preemption_saved = False
        self.reports = 0
        self.attempt_id = self._agree_attempt_id()
        self.trained_log = None
        if self.tc.trained_log_dir:
            os.makedirs(self.tc.trained_log_dir, exist_ok=True)
            name = f"{time.time_ns()}-rank{self.rank}-pid{os.getpid()}.jsonl"
            self.trained_log = open(os.path.join(self.tc.trained_log_dir, name), "a")
            self._log({"attempt_id": self.attempt_id, "attempt_start": time.time(), "rank": self.rank,
                       "world_size": self.world,
                       "pid": os.getpid(), "restored_step": self.state.step, "grad_accum": self.accum})

    def _data_plan(self) -> tuple[list, list[float] | None]:
        """(unreadable shards of the train split, duration-bucket boundaries): read once, on rank 0."""
        from raytrain_speech.data.shards import read_durations

        good, bad = readable_shards(self.cfg, self.cfg.data.train_split)
        boundaries = None
        n_buckets = self.cfg.batching.duration_buckets
        if n_buckets > 1:
            durations = read_durations(self.cfg.data.root, self.cfg.data.train_split, self.cfg.storage, good)
            boundaries = duration_quantile_boundaries(durations, n_buckets)
        return bad, boundaries

    def _agree_attempt_id(self) -> str:
        """One id for all ranks of this attempt (rank 0's), so audit logs group by attempt."""
        import uuid

        ids = [uuid.uuid4().hex]
        if dist.is_available() and dist.is_initialized():
            dist.broadcast_object_list(ids, src=0)
        return ids[0]

    def _log(self, record: dict) -> None:
        self.trained_log.write(json.dumps(record) + "\n")
        self.trained_log.flush()

    # -- data ------------------------------------------------------------------------------------------

    def _on_bad(self, index: int, utt_id: str, reason: str) -> None:
        """A rejected row counts as consumed (it was seen and skipped, not lost); bad input is logged
        by id and reason, rows outside the duration filter only counted."""
        self.cursor.mark([index])
        if is_filtered(reason):
            self.filtered_local += 1
            return
        self.bad_local += 1
        self.bad_new.append({"epoch": self.cursor.epoch, "index": index, "id": utt_id, "reason": reason})
        if self.bad_local <= 5:
            print(f"[raytrain-speech] skipped utterance {utt_id}: {reason}", file=sys.stderr, flush=True)

    def _skip_bad_shards(self) -> None:
        """Unreadable shards' utterances count as consumed bad input, once per epoch (on rank 0)."""
        if self.rank != 0:
            return
        for b in self.bad_shards:
            span = slice(b.first_index, b.first_index + b.utterances)
            if self.cursor.consumed[span].all():
                continue  # a resumed epoch: already counted before the checkpoint
            self.cursor.consumed[span] = True
            self.bad_local += b.utterances
            self.bad_new.append({"epoch": self.cursor.epoch, "shard": b.uri, "first_index": b.first_index,
                                 "utterances": b.utterances, "reason": b.reason})
            print(f"[raytrain-speech] skipped shard {b.uri} ({b.utterances} utterances): {b.reason}",
                  file=sys.stderr, flush=True)

    def _start_epoch(self) -> None:
        """Before any rank iterates an epoch: count unreadable shards, and set the epoch clock that the
        Ray Data augmentation reads (the barrier keeps every rank from starting before it is set)."""
        self._skip_bad_shards()
        if self.clock is not None:
            if self.rank == 0:
                ray.get(self.clock.set.remote(self.cursor.epoch))
            all_reduce_sum([0.0], self.device)

    def _epoch_batches(self, shard, already_consumed) -> Iterator[Batch]:
        rows = shard.iter_batches(batch_size=self.cfg.data.preprocess_batch_rows, batch_format="numpy",
                                  prefetch_batches=self.cfg.data.prefetch_batches)
        if already_consumed is not None:
            rows = self._drop_stale(rows, already_consumed)
        seed = epoch_seed(self.tc.seed, self.state.epoch, self.rank)
        batching = self.cfg.batching
        cap = self.tc.utterance_cap(self.world)
        if cap is not None:
            batching = replace(batching, max_batch_utterances=min(cap, batching.max_batch_utterances or cap))
        batches = worker_batches(rows, self.micro_budget_s, batching, seed, self._on_bad, self.boundaries_s)
        if self.frontend is not None:  # before the SSL masks, which are drawn over feature frames
            batches = map(self._featurize, batches)
        return map(self._with_ssl_mask, batches) if self.ssl_masks else batches

    def _with_ssl_mask(self, batch: Batch) -> Batch:
        """Masked-prediction families: draw the span mask over encoder frames before lockstep counts the
        masked frames (the loss normaliser), from (seed, epoch, index) like all augmentation."""
        return replace(batch, mask_BT=model_span_mask(self.plain_model, batch, self.tc.seed, self.cursor.epoch))

    def _drop_stale(self, rows, consumed):
        """Second line of defence: rows the restored cursor says were consumed never reach training."""
        for rb in rows:
            keep = ~consumed[rb["index"].astype("int64")]
            if not keep.all():
                self.stale_rows += int((~keep).sum())
                rb = {k: v[keep] for k, v in rb.items()}
            yield rb

    # -- the loop --------------------------------------------------------------------------------------

    def run(self) -> None:
        if self.rank == 0:
            where = (f"resuming at step {self.state.step} (epoch {self.cursor.epoch}, "
                     f"{self.cursor.count}/{self.cursor.num_utterances} utterances done)"
                     if self.resumed else "starting fresh")
            print(f"[raytrain-speech] {self.world} worker(s) x {self.accum} micro-batch(es) of "
                  f"<= {self.micro_budget_s:.0f} audio-s, {self.n_params / 1e6:.2f} M parameters, "
                  f"{self.stepper.precision} on {self.device.type}, {where}", flush=True)
        train_shard = ray.train.get_dataset_shard("train")
        first = True
        tc = self.tc
        while (self.state.step < tc.max_steps and not self.state.stopped_early
               and (tc.max_epochs is None or self.state.epoch < tc.max_epochs)):
            resuming = first and not self.cursor.empty
            shard = ray.train.get_dataset_shard("train_resume") if resuming else train_shard
            already = self.cursor.consumed.copy() if resuming else None
            first = False
            self._start_epoch()
            epoch_start_step = self.state.step
            for group, totals in lockstep(self._epoch_batches(shard, already), self.accum, self.device,
                                          self.objective.units):
                self._step(group, totals)
                if self.state.step >= tc.max_steps or self.state.stopped_early:
                    return self._finish()
            self._end_epoch(epoch_start_step, resuming)
        self._finish()

    def _featurize(self, batch: Batch) -> Batch:
        """``features.placement: worker``: the batch's center-padded waveforms -> log-mel on the device."""
        batch = batch.to(self.device)
        feats, frames = self.frontend(batch.features_BFM, batch.feature_lengths_B)
        return replace(batch, features_BFM=feats, feature_lengths_B=frames)

    def _step(self, group: list[Batch], totals: list[float]) -> None:
        group = [b.to(self.device) for b in group]
        if group:
            self.filler = group[-1]
        if self.cfg.augment.enabled:
            group = [self._augment(b) for b in group]
        fillers = [self.filler.to(self.device)] * (self.accum - len(group))
        lr = lr_at(self.state.step, self.tc.max_steps, self.cfg.optim)
        set_lr(self.stepper.optimizer, lr, self.state.step)
        if hasattr(self.plain_model, "set_step"):  # schedules inside the model (Gumbel temperature)
            self.plain_model.set_step(self.state.step)
        result = self.stepper.step(group, totals[1], self.world, fillers=fillers)
        if self.tc.malloc_trim_every_steps and (self.state.step + 1) % self.tc.malloc_trim_every_steps == 0:
            malloc_trim()
        now = time.time()
        st = self.state
        st.step += 1
        st.audio_s_seen += totals[2]
        st.utterances_seen += int(totals[3])
        st.skipped_steps += int(result.skipped)
        st.train_wall_s += now - self.last_wall
        self.attempt_audio_s += totals[2]
        self.last_wall = now
        self.window.add(result, group)
        indices = [i for b in group for i in b.indices]
        self.cursor.mark(indices)
        if self.trained_log is not None:
            self._log({"step": st.step, "epoch": self.cursor.epoch, "time": now, "indices": indices})
        is_ckpt = st.step >= self.tc.max_steps or st.step % self.tc.checkpoint_every_steps == 0
        is_log = st.step % self.tc.log_every_steps == 0
        sync_upload = False
        if is_log and self.tc.checkpoint_on_preemption and self._preempted():
            is_ckpt = sync_upload = True  # the node is going: this checkpoint must land before it does
        extra = {}
        validate_every = self.tc.validate_every_steps
        if (validate_every and st.step % validate_every == 0) or (is_ckpt and self.cfg.run.checkpoint_score_attribute):
            extra = self._validate()
            if self._should_stop(extra):
                st.stopped_early = True
                is_ckpt = True
        if sync_upload:
            extra = {**extra, "preemption_checkpoint": True}
        if is_ckpt or is_log or extra:
            self._report(lr, now, checkpoint_now=is_ckpt, extra=extra, sync_upload=sync_upload)

    def _augment(self, batch: Batch) -> Batch:
        features, fraction = mask_batch(batch.features_BFM, batch.feature_lengths_B, batch.indices,
                                        self.cfg.augment, self.tc.seed, self.cursor.epoch)
        self.window.masked_fraction += fraction
        self.window.masked_batches += 1
        return replace(batch, features_BFM=features)

    def _preempted(self) -> bool:
        """Ray's drain notice for any node of this run (a barrier: every rank asks at the same step)."""
        get_info = getattr(ray.train, "get_preemption_info", None)
        if get_info is None or self.preemption_saved:
            return False
        info = get_info()
        if info is None:
            return False
        self.preemption_saved = True
        if self.rank == 0:
            print(f"[raytrain-speech] preemption notice for ranks {info.preempted_ranks}: checkpointing at "
                  f"step {self.state.step}", flush=True)
        return True

    def _validate(self) -> dict:
        from raytrain_speech.train.validate import summarize

        model = self.stepper.model
        if self.stepper.ema is not None:
            with self.stepper.ema.applied(model) as averaged:
                counts = self.validator.counts(averaged, self.device)
        else:
            counts = self.validator.counts(unwrap(model), self.device)
        keys = sorted(counts)
        summed = dict(zip(keys, all_reduce_sum([counts[k] for k in keys], self.device)))
        return summarize(summed)

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

    def _metrics(self, lr: float | None, now: float) -> tuple[dict, TrainState]:
        w = self.window
        extra_keys = [f"{k}_sum" for k in self.objective.extra_stats]
        loss_sum, tokens, filtered, *extra = all_reduce_sum(
            [w.loss_sum, w.tokens, self.filtered_local, *(w.extra_sums.get(k, 0.0) for k in extra_keys)], self.device)
        st = self.state
        bad = self._sync_bad_inputs()
        self._judge_bad_fraction(bad, final=False)
        snapshot = TrainState(**{**st.__dict__, "bad_utterances": bad,
                                 "filtered_utterances": st.filtered_utterances + int(filtered)})
        metrics = {
            "step": st.step, "epoch": self.cursor.epoch, "lr": lr,
            "audio_hours_seen": st.audio_s_seen / 3600, "utterances_seen": st.utterances_seen,
            "throughput_audio_s_per_s": self.attempt_audio_s / max(now - self.attempt_start, 1e-9),
            "train_wall_s": st.train_wall_s, "world_size": self.world, "grad_accum": self.accum,
            "micro_batch_audio_s": self.micro_budget_s, "attempt": st.attempts,
            "bad_utterances": snapshot.bad_utterances, "filtered_utterances": snapshot.filtered_utterances,
            "skipped_steps": st.skipped_steps, "stop_reason": st.stop_reason,
            "parameters": self.n_params, "device": device_name(self.device), "stopped_early": st.stopped_early,
            "attempt_elapsed_s": now - self.attempt_start, "checkpoint_blocked_s": self.checkpoint_blocked_s,
            "report_blocked_s": self.report_blocked_s, "worker_rss_mb": rss_mb(),
        }
        if w.steps:
            metrics.update(loss=loss_sum / max(tokens, 1.0), grad_norm=w.grad_norm / w.steps,
                           padding_fraction=w.padding / w.steps)
            metrics.update({k[: -len("_sum")]: v / max(tokens, 1.0) for k, v in zip(extra_keys, extra)})
        if w.masked_batches:
            metrics["masked_fraction"] = w.masked_fraction / w.masked_batches
        self.window = Window()
        return metrics, snapshot

    def _sync_bad_inputs(self) -> int:
        """Gather every rank's new bad-input records into the run's log (rank 0 writes it); returns the
        run's bad-utterance count, the same on every rank (a collective: all ranks call it together)."""
        (n_new,) = all_reduce_sum([len(self.bad_new)], self.device)
        if n_new:
            gathered = all_gather(self.bad_new, self.world)
            self.bad_log.add([r for part in gathered for r in part], write=self.rank == 0)
            self.bad_new = []
        return self.bad_log.count

    def _judge_bad_fraction(self, bad: int, final: bool) -> None:
        """Stop the run (every rank, same step) when bad input exceeds data.max_bad_fraction."""
        dc, st = self.cfg.data, self.state
        seen = st.utterances_seen + bad
        if st.stopped_early or not bad or (not final and seen < dc.bad_fraction_min_utterances):
            return
        if bad / seen > dc.max_bad_fraction:
            st.stopped_early = True
            st.stop_reason = (f"too much bad input: {bad} of {seen} training utterances ({100 * bad / seen:.1f}%) "
                              f"were skipped, above data.max_bad_fraction={dc.max_bad_fraction}; see "
                              f"{self.bad_log.uri} (fix or remove those inputs, or raise data.max_bad_fraction)")
            if self.rank == 0:
                print(f"[raytrain-speech] stopping: {st.stop_reason}", file=sys.stderr, flush=True)

    def _report(self, lr: float | None, now: float, checkpoint_now: bool, extra: dict | None = None,
                sync_upload: bool = False) -> None:
        started = time.time()
        self.reports += 1
        metrics, snapshot = self._metrics(lr, now)
        metrics.update(extra or {})
        metrics["checkpoint"] = checkpoint_now
        if not checkpoint_now:
            checkpoint.report(metrics)
        else:
            self.cursor.consumed = merge_consumed(self.cursor.consumed, self.device)
            metrics["epoch_utterances_done"] = self.cursor.count
            cursor = self.cursor
            save_fn = None
            if self.rank == 0:
                delay_s = self.tc.fault_checkpoint_delay_s if snapshot.attempts == 1 else 0.0

                def save_fn(d):
                    checkpoint.save(d, self.stepper.model, self.stepper.optimizer, self.stepper.scaler,
                                    snapshot, self.config_yaml, cursor, self.stepper.ema, fault_delay_s=delay_s)
            upload = "sync" if sync_upload else self.tc.checkpoint_upload
            checkpoint.report(metrics, f"checkpoint_step{snapshot.step:08d}", save_fn, upload=upload)
            self.last_ckpt_step = snapshot.step
        self.last_wall = time.time()  # time spent reporting/uploading is not training time
        blocked = self.last_wall - started
        if checkpoint_now:
            self.checkpoint_blocked_s += blocked
        else:
            self.report_blocked_s += blocked

    def _end_epoch(self, epoch_start_step: int, resumed_tail: bool) -> None:
        self._judge_bad_fraction(self._sync_bad_inputs(), final=True)
        if self.state.step == epoch_start_step and not resumed_tail and not self.state.stopped_early:
            raise RuntimeError(
                f"epoch {self.state.epoch} gave no step: no usable utterance in {self.cfg.data.root} split "
                f"{self.cfg.data.train_split} after filtering (check data.min/max_duration_s and the "
                f"bad-input messages above)")
        merged = merge_consumed(self.cursor.consumed, self.device)
        missing = int((~merged).sum())
        (stale,) = all_reduce_sum([self.stale_rows], self.device)
        if self.rank == 0 and (missing or stale):
            print(f"[raytrain-speech] epoch {self.cursor.epoch}: {missing} utterance(s) never arrived, "
                  f"{int(stale)} already-consumed row(s) dropped by the worker", file=sys.stderr, flush=True)
        self.state.epoch += 1
        self.cursor = self.cursor.next_epoch()

    def _finish(self) -> None:
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


def train_loop_per_worker(config: dict) -> None:
    from raytrain_speech.config import Config

    cfg = Config.from_dict(config)
    _quiet_report_logs()
    torch.set_num_threads(cfg.train.torch_threads)
    WorkerRun(cfg).run()
