"""Config sections of evaluation: what to score, how to decode, the fusion LM."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from raytrain_speech.config.schema import require


@dataclass
class NGramConfig:
    """What the n-gram language model counts and how it smooths."""

    unit: Literal["char", "word"] = "char"
    """Modelled unit: characters (space included) or whitespace-separated words."""
    order: int | None = None
    """Longest n-gram (context = order - 1 units); None: 6 for characters, 3 for words."""
    smoothing: Literal["modified_kn", "kn"] = "modified_kn"
    """Interpolated Kneser-Ney with three discounts per order (modified) or one (plain)."""
    min_word_count: int = 2
    """Word models: training words seen fewer times become <unk> (gives <unk> a learned mass)."""

    def validate(self) -> None:
        require(self.order is None or 1 <= self.order <= 12, "eval.lm.order", "must be between 1 and 12 (or null)")
        require(self.min_word_count >= 1, "eval.lm.min_word_count", "must be >= 1")

    @property
    def resolved_order(self) -> int:
        return self.order if self.order is not None else (6 if self.unit == "char" else 3)


@dataclass
class EvalConfig:
    """What to score, how to decode it, and where the decoding runs."""

    split: str = "test"
    """Split of data.root to score (the CLI's repeatable --split scores several test sets)."""
    normalizer: Literal["none", "basic", "english"] = "basic"
    """Scoring normaliser, applied to reference and hypothesis alike (data/normalize.py)."""
    batch_audio_s: float = 300.0
    """Padded audio seconds per decoding batch."""
    threads: int = 0
    """torch threads for in-process decoding; 0 = all cores."""
    use_ema: bool = True
    """Score the EMA weights when the checkpoint has them (step.ema_decay)."""
    beam_width: int = 1
    """1 = greedy; more = CTC prefix beam search / attention beam search (recipes: 5)."""
    lm_weight: float = 0.0
    """Shallow-fusion weight of the n-gram LM trained on the corpus's train-split transcripts (0 = no LM)."""
    length_bonus: float = 0.0
    """Score added per emitted character (offsets the LM's preference for short outputs)."""
    refine_iterations: int = 0
    """Mask-CTC refinement (nar_ctc's decoder): mask the greedy CTC hypothesis's low-confidence tokens and
    fill them in this many parallel decoder passes (Mask-CTC: 10); 0 = the CTC hypothesis as it is.
    Needs greedy CTC (beam_width 1, no LM)."""
    refine_threshold: float = 0.999
    """CTC token confidence (frame posterior) below which refinement re-predicts a token (Mask-CTC: 0.999)."""
    lm: NGramConfig = field(default_factory=NGramConfig)
    """The fusion LM: unit (char/word), order, smoothing."""
    actors: int = 0
    """Ray Data decoding actors (map_batches over the test shards); 0 = decode in this process."""
    actor_gpus: float = 0.0
    """GPUs per decoding actor (the model runs on cuda when > 0)."""
    actor_cpus: float = 1.0
    """CPUs per decoding actor (also its torch thread count, rounded up)."""
    actor_batch_rows: int = 64
    """Shard rows handed to an actor per map_batches call (decoded in duration-sorted batches)."""

    def validate(self) -> None:
        require(self.batch_audio_s > 0, "eval.batch_audio_s", "must be positive")
        require(self.beam_width >= 1, "eval.beam_width", "must be >= 1")
        require(self.lm_weight >= 0, "eval.lm_weight", "must be >= 0")
        require(self.actors >= 0, "eval.actors", "must be >= 0 (0 = decode in-process)")
        require(self.actor_gpus >= 0 and self.actor_cpus > 0, "eval.actor_cpus",
                "actor_cpus must be > 0 and actor_gpus >= 0")
        require(self.actor_batch_rows >= 1, "eval.actor_batch_rows", "must be >= 1")
        require(self.refine_iterations >= 0, "eval.refine_iterations", "must be >= 0 (0 = no refinement)")
        require(0.0 < self.refine_threshold <= 1.0, "eval.refine_threshold", "must be in (0, 1]")
        require(self.refine_iterations == 0 or (self.beam_width == 1 and self.lm_weight == 0 and
                                                self.length_bonus == 0), "eval.refine_iterations",
                "refines the greedy CTC hypothesis; set eval.beam_width=1 eval.lm_weight=0 eval.length_bonus=0")
        self.lm.validate()
