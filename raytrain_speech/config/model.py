"""The ``model`` section: which family and preset to build, with field overrides.

The family's own config dataclass (its architecture fields) belongs to the family's module under
``models/``; ``models.registry.check_config`` resolves a spec against it and checks it against the
other sections (input kind, mel bins, what the family can be fine-tuned or scored on).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from raytrain_speech.config.schema import require


@dataclass
class ModelSpec:
    """Which model to build: a family, one of its presets, and field overrides."""

    family: str = "conformer_ctc"
    """Model family (see `raytrain-speech models`)."""
    preset: str = "tiny"
    """Named size/hyperparameter preset of the family."""
    overrides: dict = field(default_factory=dict)
    """Fields of the family's config that replace the preset's values."""
    from_hf: str | None = None
    """A Hugging Face model directory (hf:PATH, local or s3://) whose config.json sets the
    architecture (into overrides; yours still win), its front end (features.*) and tokenizer;
    implied by train.init_from=hf:PATH (docs/pretrained.md)."""

    activation_checkpointing: str = "none"
    """Recompute activations in the backward pass instead of keeping them: none, blocks (every
    Transformer/Conformer/feature-encoder layer) or every_N (every N-th layer of each stack). Saves
    activation memory for ~30% more compute; gradients are the same (docs/scaling.md)."""

    def validate(self) -> None:
        require(bool(self.family), "model.family", "must name a family (see `raytrain-speech models`)")
        require(bool(re.fullmatch(r"none|blocks|every_[1-9]\d*", self.activation_checkpointing)),
                "model.activation_checkpointing", f"{self.activation_checkpointing!r} is not none, blocks or every_N")
        require(bool(self.preset), "model.preset", "must name a preset of the family")
