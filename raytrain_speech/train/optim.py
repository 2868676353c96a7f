"""Optimizer and learning-rate schedule.

The schedule is a pure function of the optimizer step, so a resumed run (any worker count) lands on
exactly the LR it would have had, and recipes state warmup/decay in their papers' terms.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from raytrain_speech.config import OptimConfig


def param_groups(model: nn.Module, cfg: OptimConfig, pretrained: set[str] = frozenset(),
                 frozen: set[str] | dict[str, int] = frozenset(), frozen_steps: int = 0) -> list[dict]:
    """Groups by (weight decay?, pretrained?, frozen until which step?); empty groups are dropped.

    ``frozen`` is a set of names (each frozen for ``frozen_steps``) or a mapping name -> steps.

    Decay only tensors with >= 2 dims (weights), not norms, biases or scalars. A group carries an
    ``lr_scale`` (pretrained LR / peak LR) and a ``frozen_until_step``: ``set_lr`` gives it LR 0
    until then. Freezing by LR keeps every parameter in DDP's gradient buckets, so unfreezing
    mid-run needs no re-wrap.
    """
    scale = (cfg.pretrained_lr_peak / cfg.lr_peak) if cfg.pretrained_lr_peak is not None else 1.0
    until = frozen if isinstance(frozen, dict) else dict.fromkeys(frozen, frozen_steps)
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = (p.ndim >= 2, name in pretrained, until.get(name, 0))
        group = groups.setdefault(key, {
            "params": [], "weight_decay": cfg.weight_decay if key[0] else 0.0,
            "lr_scale": scale if key[1] else 1.0, "frozen_until_step": key[2]})
        group["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(model: nn.Module, cfg: OptimConfig, pretrained: set[str] = frozenset(),
                    frozen: set[str] | dict[str, int] = frozenset(), frozen_steps: int = 0) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg, pretrained, frozen, frozen_steps)
    # fairseq's "adam" decays decoupled (p -= lr * wd * p, then the Adam update): AdamW's arithmetic.
    cls = torch.optim.Adam if cfg.name == "adam_l2" else torch.optim.AdamW
    # On a GPU the fused kernel: one launch per step, and none of foreach's full-size temporaries.
    fused = {"fused": True} if all(p.is_cuda for g in groups for p in g["params"]) and groups else {}
    return cls(groups, lr=cfg.lr_peak, betas=cfg.betas, eps=cfg.eps, **fused)


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """LR for optimizer step ``step`` (0-based) of ``total_steps``."""
    warmup = round(cfg.warmup_fraction * total_steps) if cfg.warmup_fraction is not None else cfg.warmup_steps
    if step < warmup:
        return cfg.lr_peak * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr_peak
    if cfg.schedule == "tri_stage":
        hold_end = warmup + round(cfg.hold_fraction * total_steps)
        if step < hold_end:
            return cfg.lr_peak
        progress = min(1.0, (step - hold_end) / max(1, total_steps - hold_end))
        return cfg.lr_peak * (cfg.lr_final / cfg.lr_peak) ** progress
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if cfg.schedule == "cosine":
        return cfg.lr_final + (cfg.lr_peak - cfg.lr_final) * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr_final + (cfg.lr_peak - cfg.lr_final) * (1 - progress) ** cfg.poly_power


def set_lr(optimizer: torch.optim.Optimizer, lr: float, step: int = 0) -> None:
    """Apply the scheduled LR to every group (scaled for pretrained groups, 0 while frozen)."""
    for group in optimizer.param_groups:
        frozen = step < group.get("frozen_until_step", 0)
        group["lr"] = 0.0 if frozen else lr * group.get("lr_scale", 1.0)
