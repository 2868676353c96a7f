"""Activations a model keeps for its backward pass, traced on the CPU (for ``train/memory_plan.py``).

Each Transformer/Conformer stack is cut to its first ``TRACED_BLOCKS`` layers (same width, heads,
vocabulary as the preset; convolutional feature encoders stay whole: their layers differ),
materialised on the CPU with random weights and run forward with the loss under the run's autocast,
while autograd's saved-tensor hooks count the bytes kept for backward (each storage once; weights and
their autocast copies excluded), per block and outside the blocks. ``ActivationModel`` fits two such
traces in T and T^2 (relative-position attention keeps a T x T bias) and scales them to any duration
and batch; blocks past the traced ones keep what the last traced one does; activation checkpointing
keeps the checkpointed blocks' inputs plus one block's intermediates (its recomputation in backward).
tests/unit/test_memory_plan.py checks the extrapolation against full-depth traces.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from raytrain_speech.batch import Batch
from raytrain_speech.config import ModelSpec
from raytrain_speech.models import activation_checkpointing
from raytrain_speech.models.masking import model_span_mask
from raytrain_speech.models.registry import build_model, family, objective_for

TRACED_BLOCKS = 2
"""Blocks of each Transformer/Conformer stack traced: the first (which may differ: WavLM's computes
the relative position bias) and one that stands for all the others."""
TRACE_S = 4.0
"""The trace runs one utterance of this many seconds (or the longest, if shorter); activations scale
linearly with duration and rows (tests/unit/test_memory_plan.py checks the extrapolation)."""

@dataclass
class ActivationTrace:
    """Saved-for-backward bytes of one forward at one batch shape."""

    outside: int
    blocks: dict[str, list[int]]
    """Per stack: bytes each traced block keeps; the blocks past the traced ones keep what the last
    traced one does (the first block of a stack may differ: WavLM's computes the position bias)."""
    inputs: dict[str, list[int]]
    """Per stack: bytes of each traced block's inputs (what a checkpointed block keeps)."""
    depth: dict[str, int]
    """Per stack: the preset's number of blocks."""

    def scaled(self, factor: float) -> ActivationTrace:
        """The trace of ``factor`` x the rows."""
        return self.mapped(lambda v: v * factor)

    def mapped(self, fn) -> ActivationTrace:
        return ActivationTrace(round(fn(self.outside)), {k: [round(fn(v)) for v in b] for k, b in self.blocks.items()},
                               {k: [round(fn(v)) for v in b] for k, b in self.inputs.items()}, dict(self.depth))

    def total(self, every: int = 0) -> int:
        """Bytes at full depth; ``every`` = activation checkpointing (0 none, 1 blocks, N every N-th)."""
        kept, recompute = self.outside, 0
        for stack, n in self.depth.items():
            traced, inputs = self.blocks[stack], self.inputs[stack]
            for i in range(n):
                block = traced[min(i, len(traced) - 1)]
                if every and i % every == 0:
                    kept += inputs[min(i, len(inputs) - 1)]
                    recompute = max(recompute, block)
                else:
                    kept += block
        return kept + recompute


def _homogeneous(stack_name: str) -> bool:
    """Whether every block of a stack keeps the same activations (Transformer and Conformer layers),
    so that a few traced blocks stand for all; a convolutional feature encoder's layers shrink the
    time axis one after the other and are traced whole."""
    return "conv" not in stack_name.rsplit(".", 1)[-1]


def _storage_key(t: torch.Tensor):
    try:
        return t.untyped_storage().data_ptr()
    except RuntimeError:
        return id(t)


def _is_weight(t: torch.Tensor, weights: set) -> bool:
    """A parameter, autocast's half-precision copy of one, or a view of either (the transposed weight
    a matmul keeps): its autograd chain reaches a parameter through casts and views only. The static
    lines count these (weights, and the half-precision copies)."""
    if _storage_key(t) in weights:
        return True
    fn = t.grad_fn
    for _ in range(6):
        if fn is None or len(fn.next_functions) != 1 or not fn.name().startswith(_CAST_OR_VIEW):
            return False
        fn = fn.next_functions[0][0]
        if fn is not None and fn.name().endswith("AccumulateGrad"):
            return True
    return False


_CAST_OR_VIEW = ("ToCopyBackward", "TBackward", "TransposeBackward", "ViewBackward", "UnsafeViewBackward",
                 "ExpandBackward", "PermuteBackward", "AsStridedBackward", "UnsqueezeBackward", "SqueezeBackward",
                 "ReshapeAliasBackward", "AliasBackward")


def trace(spec: ModelSpec, vocab_size: int, specials: dict | None, rows: int, duration_s: float, tokens: int,
          precision: str, blocks: int | None = TRACED_BLOCKS, seed: int = 0) -> ActivationTrace:
    """Trace the model (stacks cut to ``blocks`` layers; None = full depth) on ``rows`` utterances of
    ``duration_s`` with ``tokens`` target tokens each."""
    spec = ModelSpec(family=spec.family, preset=spec.preset, overrides=dict(spec.overrides))  # no AC: traced plain
    model, depth = _truncated(spec, vocab_size, specials, blocks, seed)
    batch = _batch(family(spec).input_kind, rows, duration_s, tokens, torch.Generator().manual_seed(seed))
    if model.span_masking is not None:
        from dataclasses import replace

        batch = replace(batch, mask_BT=model_span_mask(model, batch, seed=seed, epoch=0))
    counter = _SavedBytes(model)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision in ("bf16", "fp16"))
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t), autocast, _fused_attention():
        out = model(batch)
        objective_for(spec).loss(batch, out)
    counter.remove()
    return counter.result(depth)


def _truncated(spec: ModelSpec, vocab_size: int, specials: dict | None, blocks: int | None, seed: int
               ) -> tuple[nn.Module, dict[str, int]]:
    """The model with its homogeneous stacks cut to ``blocks`` layers, on the CPU with random weights
    (built on the meta device first: the full preset never exists in memory); each stack's full depth."""
    with torch.device("meta"):
        model = build_model(spec, vocab_size, specials)
    depth = {}
    for name, stack in activation_checkpointing.block_stacks(model):
        depth[name] = len(stack)
        if blocks is not None and len(stack) > blocks and _homogeneous(name):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, nn.ModuleList(list(stack)[:blocks]))
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
        for b in model.buffers():
            if b.is_floating_point():
                b.zero_()
    return model.train(), depth


class _SavedBytes:
    """Bytes autograd keeps for backward, per block of the model's stacks (key None: outside them),
    each storage once, weights and their casts left out (``_is_weight``)."""

    def __init__(self, model: nn.Module):
        self.weights = {_storage_key(p) for p in model.parameters()}
        self.seen: set = set()
        self.block = None
        self.saved: dict = {}
        self.inputs: dict = {}
        self.handles = []
        for stack_name, stack in activation_checkpointing.block_stacks(model):
            for i, block in enumerate(stack):
                self.handles.append(block.register_forward_pre_hook(
                    lambda _m, args, _kw, key=(stack_name, i): self._enter(key, args), with_kwargs=True))
                self.handles.append(block.register_forward_hook(self._leave, with_kwargs=True))

    def _enter(self, key, args) -> None:
        self.block = key
        self.inputs[key] = sum(a.untyped_storage().nbytes() for a in args if torch.is_tensor(a))

    def _leave(self, _m, _args, _kwargs, _out) -> None:
        self.block = None

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in self.seen and not _is_weight(t, self.weights):
            self.seen.add(key)
            self.saved[self.block] = self.saved.get(self.block, 0) + t.untyped_storage().nbytes()
        return t

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def result(self, depth: dict[str, int]) -> ActivationTrace:
        blocks_kept, block_inputs = {}, {}
        for stack_name in depth:
            keys = sorted(k for k in self.inputs if k[0] == stack_name)
            blocks_kept[stack_name] = [self.saved.get(k, 0) for k in keys]
            block_inputs[stack_name] = [self.inputs[k] for k in keys]
        return ActivationTrace(self.saved.get(None, 0), blocks_kept, block_inputs, depth)


@contextmanager
def _fused_attention():
    """Attention as a GPU's fused kernels keep it for backward: O(T) per head, dropout drawn inside
    the kernel. The CPU's flash kernel has no dropout, and with dropout on it falls back to the math
    path, which keeps the T x T weights; so the trace runs attention without its dropout."""
    sdpa = F.scaled_dot_product_attention

    def fused(*args, **kwargs):
        if len(args) > 4:  # (query, key, value, attn_mask, dropout_p, ...)
            args = (*args[:4], 0.0, *args[5:])
        else:
            kwargs["dropout_p"] = 0.0
        return sdpa(*args, **kwargs)

    F.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa


def _batch(kind: str, rows: int, duration_s: float, tokens: int, gen: torch.Generator) -> Batch:
    frames = max(1, round(duration_s * 100))
    shape = (rows, frames * 160) if kind == "waveform" else (rows, frames, 80)
    return Batch(features_BFM=torch.randn(shape, generator=gen),
                 feature_lengths_B=torch.full((rows,), shape[1], dtype=torch.int64),
                 targets_BL=torch.randint(3, 20, (rows, max(1, tokens)), generator=gen),
                 target_lengths_B=torch.full((rows,), max(1, tokens), dtype=torch.int64),
                 indices=list(range(rows)), ids=[f"plan{i}" for i in range(rows)], texts=[""] * rows,
                 audio_s=rows * duration_s, languages=[""] * rows)


@dataclass
class ActivationModel:
    """Traces of ``traced_rows`` rows at two durations, each figure fitted as b x T + c x T^2 through
    them: most activations are linear in T, but relative-position attention (Conformer, WavLM) keeps
    a T x T bias per head, as a GPU does. Rows scale linearly from the traced ones (a tensor shared by
    the rows, such as WavLM's position bias, is then counted high, never low, for larger batches)."""

    short: ActivationTrace
    short_s: float
    longer: ActivationTrace | None = None
    longer_s: float = 0.0
    traced_rows: int = 1

    def at(self, duration_s: float, rows: int) -> ActivationTrace:
        per = rows / self.traced_rows
        if self.longer is None:
            return self.short.scaled(per * duration_s / self.short_s)
        s1, s2 = self.short_s, self.longer_s

        def fit(v1: float, v2: float) -> int:
            c = max(0.0, (v2 / s2 - v1 / s1) / (s2 - s1))
            b = v1 / s1 - c * s1
            return round(per * max(b * duration_s + c * duration_s**2, 0.0))

        a, b = self.short, self.longer
        return ActivationTrace(
            fit(a.outside, b.outside), {k: [fit(x, y) for x, y in zip(a.blocks[k], b.blocks[k])] for k in a.blocks},
            {k: [fit(x, y) for x, y in zip(a.inputs[k], b.inputs[k])] for k in a.inputs}, dict(a.depth))
