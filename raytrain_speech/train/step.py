"""One optimizer step: autocast, backward over micro-batches, unscale, clip, step (plain torch).

Kept free of Ray and of data loading so that the step benchmark and the unit tests drive exactly
the code that training runs.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from raytrain_speech.batch import Batch
from raytrain_speech.config import StepConfig
from raytrain_speech.objectives import LossFn


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP/compile wrappers (so state-dict keys have no ``module.`` prefix)."""
    while hasattr(model, "module"):
        model = model.module
    return model


class EMA:
    """Exponential moving average of a model's floating-point state (weights and norm statistics).

    Kept in fp32 on the model's device; ``applied`` swaps the averaged weights in for validation or
    export and restores the live ones after.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in unwrap(model).state_dict().items()
                       if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for k, v in unwrap(model).state_dict().items():
            if k in self.shadow:
                self.shadow[k].mul_(self.decay).add_(v.detach().float(), alpha=1 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k, v in state.items():
            self.shadow[k].copy_(v)

    @contextlib.contextmanager
    def applied(self, model: nn.Module):
        plain = unwrap(model)
        live = {k: v.detach().clone() for k, v in plain.state_dict().items() if k in self.shadow}
        plain.load_state_dict({**plain.state_dict(), **{k: v.to(live[k].dtype) for k, v in self.shadow.items()}})
        try:
            yield plain
        finally:
            plain.load_state_dict({**plain.state_dict(), **live})


@dataclass
class StepResult:
    grad_norm: float
    skipped: bool
    loss_sum: float
    tokens: float
    extra_sums: dict[str, float] = field(default_factory=dict)
    """The objective's other ``<name>_sum`` stats, summed over micro-batches (reported per unit)."""


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively (emulated bf16 on older CPUs is slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


class Stepper:
    """Holds model, optimizer and scaler; ``step`` consumes one optimizer step's micro-batches."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: StepConfig,
                 loss_fn: LossFn, device: torch.device):
        self.model, self.optimizer, self.cfg, self.loss_fn, self.device = model, optimizer, cfg, loss_fn, device
        self.precision = resolve_precision(cfg.precision, device)
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.ema = EMA(model, cfg.ema_decay) if cfg.ema_decay is not None else None

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def step(self, micro_batches: list[Batch], global_tokens: float, world_size: int,
             fillers: list[Batch] = ()) -> StepResult:
        """Backward over ``micro_batches`` (gradient sync only on the last), then one update.

        ``global_tokens`` is the objective's unit count (target tokens, masked frames) of this step
        over all ranks and micro-batches; each micro-batch's summed loss is scaled by
        ``world_size / global_tokens`` here, the one place any objective is normalised, so that after
        DDP's gradient average the update is the per-unit mean of the whole global batch.
        ``fillers`` are micro-steps that contribute exactly zero gradient: a rank whose data ran out
        before the others' still has to join every gradient all-reduce (DDP), so it runs them in
        eval mode (no BatchNorm update) with the loss multiplied by zero.
        """
        # Running statistics (BatchNorm) change in the forward pass; a step that turns out to be
        # non-finite must not leave NaNs in them, so they are restored when the step is skipped.
        buffers = [b.detach().clone() for b in self.model.buffers()]
        loss_sum, tokens, extra = self._backward(micro_batches, fillers, world_size / max(global_tokens, 1.0))
        grad_norm, skipped = self._update()
        if skipped:
            with torch.no_grad():
                for live, saved in zip(self.model.buffers(), buffers):
                    live.copy_(saved)
        elif self.ema is not None:
            self.ema.update(self.model)
        return StepResult(grad_norm, skipped, loss_sum, tokens, extra)

    def _backward(self, micro_batches: list[Batch], fillers: list[Batch], scale: float,
                  ) -> tuple[float, float, dict[str, float]]:
        """Forward + backward of every micro-batch, then the fillers; (loss sum, units, stat sums)."""
        loss_sum = tokens = 0.0
        extra: dict[str, float] = {}
        work = [(b, False) for b in micro_batches] + [(b, True) for b in fillers]
        for i, (batch, filler) in enumerate(work):
            last = i == len(work) - 1
            sync = contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()
            self.model.train(not filler)
            with sync:
                with self._autocast():
                    out = self.model(batch)
                if filler:
                    loss = sum(torch.nan_to_num(v.float(), 0.0, 0.0, 0.0).sum() for v in out.values()
                               if torch.is_tensor(v) and v.is_floating_point()) * 0.0
                else:
                    summed, units, stats = self.loss_fn(batch, out)
                    loss = summed * scale
                    loss_sum += float(summed.detach())
                    tokens += units
                    for k, v in stats.items():
                        extra[k] = extra.get(k, 0.0) + float(v)
                self.scaler.scale(loss).backward()
        self.model.train()
        return loss_sum, tokens, extra

    def _update(self) -> tuple[float, bool]:
        """Unscale, clip, step (unless the gradient is not finite); (grad norm, skipped)."""
        for group in self.optimizer.param_groups:
            if group["lr"] == 0.0:  # frozen (fine-tuning warm-up): no update, no share of the clip norm
                for p in group["params"]:
                    p.grad = None
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = self.cfg.grad_clip_norm if self.cfg.grad_clip_norm is not None else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        skipped = not math.isfinite(grad_norm)
        if skipped and not self.scaler.is_enabled():
            self.optimizer.zero_grad(set_to_none=True)  # a NaN/Inf gradient must not reach the weights
        else:
            scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
            self.scaler.step(self.optimizer)
            self.scaler.update()
            skipped = self.scaler.is_enabled() and self.scaler.get_scale() < scale_before
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, skipped
