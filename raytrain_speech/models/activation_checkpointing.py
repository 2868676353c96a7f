"""Activation checkpointing (``model.activation_checkpointing``) for every family, without renaming a
parameter.

A checkpointed block keeps only its inputs for the backward pass and runs its forward again there
(``torch.utils.checkpoint``, non-reentrant, the RNG state preserved so dropout draws the same masks):
activation memory drops from every block's intermediates to the blocks' inputs plus one block's
intermediates, for ~30% more compute. The blocks are the model's layer stacks (every ``nn.ModuleList``
attribute named ``*layers``: Transformer and Conformer encoder and decoder layers, wav2vec 2.0's
convolutional feature-encoder layers); ``every_N`` checkpoints every N-th block of each stack
(torchtitan's selective layer AC).

The block's ``forward`` is replaced on the instance, not wrapped in another module, so state-dict keys,
parameter names (optimizer groups, freezing, exports, checkpoints) and DDP are unchanged. BatchNorm's
running statistics are updated by the first forward only: the recomputation runs with momentum 0, so
a checkpointed run keeps the same statistics as one without.
"""

from __future__ import annotations

import re
import types
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

MODES = "none, blocks or every_N (N >= 1)"


def parse(mode: str) -> int:
    """0 for none, N for every N-th block (blocks = 1); ValueError naming the choices otherwise."""
    if mode == "none":
        return 0
    if mode == "blocks":
        return 1
    m = re.fullmatch(r"every_(\d+)", mode)
    if m and int(m.group(1)) >= 1:
        return int(m.group(1))
    raise ValueError(f"{mode!r} is not one of {MODES}")


def block_stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """(name, stack) of every layer stack of the model."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1].endswith("layers") and len(m)]


def apply(model: nn.Module, mode: str) -> list[str]:
    """Checkpoint the blocks ``mode`` picks; returns their module names."""
    every = parse(mode)
    if not every:
        return []
    names = []
    for stack_name, stack in block_stacks(model):
        for i, block in enumerate(stack):
            if i % every == 0 and not getattr(block, "_rts_checkpointed", False):
                block.forward = types.MethodType(_checkpointed_forward, block)
                block._rts_checkpointed = True
                names.append(f"{stack_name}.{i}")
    return names


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    forward = type(self).forward
    if not (self.training and torch.is_grad_enabled()):
        return forward(self, *args, **kwargs)
    calls = [0]

    def run(*a, **k):
        calls[0] += 1
        if calls[0] == 1:
            return forward(self, *a, **k)
        with _frozen_batch_norm(self):  # the recomputation in backward
            return forward(self, *a, **k)

    return checkpoint(run, *args, use_reentrant=False, **kwargs)


@contextmanager
def _frozen_batch_norm(block: nn.Module):
    norms = [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
             for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)
