"""Explicit tensor maps between a published checkpoint and our modules (plain torch).

A family's map is a list of (our name, Hugging Face name) pairs, one per tensor, written out in
``hf/<family>.py``: no name guessing, so a renamed layer upstream is an error naming the tensor,
never a silently random weight. ``apply`` loads the pairs into a model and reports what happened.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from raytrain_speech.config import ConfigError


@dataclass
class ImportReport:
    """What an import did, tensor by tensor."""

    mapped: list[str] = field(default_factory=list)
    """Our tensors copied from the checkpoint (or set from it exactly, e.g. a bias it does not have)."""
    new: list[str] = field(default_factory=list)
    """Our tensors the checkpoint has no counterpart for: left as initialised (a fresh head)."""
    unused: list[str] = field(default_factory=list)
    """Checkpoint tensors nothing of ours takes."""
    mismatched: list[str] = field(default_factory=list)
    """'ours <- theirs: (shape) vs (shape)' for pairs whose shapes differ."""
    missing: list[str] = field(default_factory=list)
    """Our parameters the checkpoint should have had (new, and not a head that may start fresh)."""

    def line(self, source: str) -> str:
        return (f"[raytrain-speech] {source}: {len(self.mapped)} tensors mapped, {len(self.new)} newly initialised"
                f"{' (' + ', '.join(self.new[:4]) + (' ...' if len(self.new) > 4 else '') + ')' if self.new else ''}"
                f", {len(self.unused)} unused")

    def check(self, source: str, strict: bool) -> None:
        """ConfigError naming the tensors that do not fit (unused or of another shape) when ``strict``."""
        if not strict:
            return
        for what, names in (("shape mismatch", self.mismatched), ("missing tensor(s) for", self.missing),
                            ("unused checkpoint tensor(s)", self.unused)):
            if names:
                raise ConfigError(f"{source}: {what}: {', '.join(names[:4])}"
                                  f"{' ...' if len(names) > 4 else ''} ({len(names)} in all; is model.* the "
                                  "checkpoint's architecture? train.init_strict=false loads the rest)")


@dataclass
class FamilyMap:
    """How one family's tensors come from a checkpoint: copied pairs, our tensors set to zero (the
    exact equivalent of something the checkpoint lacks, e.g. a key bias), checkpoint tensors that
    are checked rather than copied (a fixed table), and our tensors that may stay fresh (a new head)."""

    pairs: list[tuple[str, str]]
    zeros: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)
    fresh_ok: tuple[str, ...] = ()
    """Prefixes of our parameter names that may be left as initialised without an error."""


def match(own: dict[str, tuple], theirs: dict[str, tuple], fmap: FamilyMap, params: set[str]) -> ImportReport:
    """The report of loading checkpoint tensors of shapes ``theirs`` into ours of shapes ``own``
    (names -> shapes only: a preflight can run it on the meta device and a safetensors header)."""
    report = ImportReport()
    used = {name for name in fmap.checked if name in theirs}
    for ours, hf in fmap.pairs:
        if hf not in theirs:
            continue
        used.add(hf)
        if tuple(theirs[hf]) != tuple(own[ours]):
            report.mismatched.append(f"{ours} <- {hf}: {tuple(own[ours])} vs {tuple(theirs[hf])}")
        else:
            report.mapped.append(ours)
    report.mapped += [z for z in fmap.zeros if z in own]
    report.mapped.sort()
    done = set(report.mapped)
    report.new = sorted(k for k in own if k in params and k not in done)
    report.unused = sorted(set(theirs) - used)
    report.missing = [k for k in report.new if not k.startswith(fmap.fresh_ok)]
    return report


def apply(model: nn.Module, theirs: dict[str, torch.Tensor], fmap: FamilyMap) -> ImportReport:
    """Copy every pair that fits into ``model`` and zero ``fmap.zeros``; the report of what happened."""
    own = model.state_dict()
    params = {n for n, _ in model.named_parameters()}
    report = match({k: tuple(v.shape) for k, v in own.items()}, {k: tuple(v.shape) for k, v in theirs.items()},
                   fmap, params)
    load = {ours: theirs[hf].to(own[ours].dtype) for ours, hf in fmap.pairs
            if hf in theirs and tuple(theirs[hf].shape) == tuple(own[ours].shape)}
    load.update({z: torch.zeros_like(own[z]) for z in fmap.zeros if z in own})
    model.load_state_dict(load, strict=False)
    return report


def rename(state: dict[str, torch.Tensor], pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Our state dict under the checkpoint's names (export): every pair must be present."""
    missing = [ours for ours, _ in pairs if ours not in state]
    if missing:
        raise ConfigError(f"export --format hf: the model lacks {', '.join(missing[:4])} (not this family's layout?)")
    return {hf: state[ours] for ours, hf in pairs}
