"""Transcript normalisation and the character tokenizer used by CTC models.

The same ``normalize_text`` is applied to training targets and to references before scoring, so the
model is never asked to produce, or penalised for, characters outside its alphabet.
"""

from __future__ import annotations

import re

from raytrain_speech.batch import BLANK_ID
from raytrain_speech.config import TextConfig

__all__ = ["BLANK_ID", "CharTokenizer", "TextError", "normalize_text"]
_SPACES = re.compile(r"\s+")


class TextError(ValueError):
    """A transcript cannot be tokenized; the message names the offending characters."""


def normalize_text(text: str) -> str:
    """Lower-case and collapse whitespace; punctuation is left for the tokenizer to reject."""
    return _SPACES.sub(" ", text.lower()).strip()


class CharTokenizer:
    """blank=0, space=1, then the alphabet in order."""

    def __init__(self, cfg: TextConfig | None = None):
        self.cfg = cfg or TextConfig()
        self.symbols = ["<blank>", " ", *self.cfg.alphabet]
        self._ids = {s: i for i, s in enumerate(self.symbols)}

    @property
    def vocab_size(self) -> int:
        return len(self.symbols)

    def encode(self, text: str) -> list[int]:
        norm = normalize_text(text)
        if not norm:
            raise TextError("empty transcript")
        bad = sorted({c for c in norm if c not in self._ids or c == "<blank>"})
        if bad:
            raise TextError(f"characters outside the alphabet: {''.join(bad)!r}")
        return [self._ids[c] for c in norm]

    def decode(self, ids: list[int]) -> str:
        return normalize_text("".join(self.symbols[i] for i in ids if i != BLANK_ID))
