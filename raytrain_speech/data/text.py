"""Transcripts -> token ids: the target normaliser, then one of three tokenizers (no Ray).

``text.normalizer`` (data/normalize.py) shapes training targets; ``eval.normalizer`` shapes reference
and hypothesis alike before scoring, so a cased, punctuated model can still be scored on words.

Tokenizers (``text.tokenizer``):

- ``char``: blank = 0, space = 1, then ``text.alphabet`` in order (``auto``: the characters of the
  training split, resolved once at run start and recorded in the run's config).
- ``sentencepiece``: a SentencePiece model file (BPE or unigram); our id = SentencePiece id + 1, so
  id 0 stays the CTC blank for every family and the hybrid CTC/attention loss.
- ``hf``: a ``tokenizer.json`` read by the ``tokenizers`` library (Whisper's byte-level BPE). Ids are
  the file's own, special tokens included, so a Whisper decoder's embedding is exactly the file's
  size. There is no blank: CTC families cannot use it.

The file behind ``text.tokenizer_path`` (local or ``s3://``) is copied into the run directory and
every checkpoint (data/vocab.py), so whatever decodes a checkpoint later reads the same one;
data/tokenizer.py builds the configured one.
"""

from __future__ import annotations

from typing import Protocol

from raytrain_speech.batch import BLANK_ID
from raytrain_speech.config import ConfigError, TextConfig
from raytrain_speech.data.normalize import normalize

__all__ = ["BLANK_ID", "CharTokenizer", "TextError", "Tokenizer", "encode_transcript", "normalize_text",
           "TOKENIZER_FILES"]

TOKENIZER_FILES = {"sentencepiece": "tokenizer.model", "hf": "tokenizer.json", "ctc_vocab": "vocab.json"}
"""The name a tokenizer file takes in a run directory, a checkpoint and an export."""


class TextError(ValueError):
    """A transcript cannot be tokenized; the message names the offending characters."""


class Tokenizer(Protocol):
    """What models, losses and decoders need of a tokenizer."""

    kind: str
    vocab_size: int
    """Ids 0 .. vocab_size - 1 (specials of an ``hf`` file included)."""
    blank_id: int | None
    """The id never used as a target (the CTC blank); None when the tokenizer has none (``hf``)."""
    specials: dict[str, int]
    """Special tokens the file defines (``hf``: Whisper's prompt tokens); {} = the model adds its own."""
    symbols: list[str] | None
    """Per-id characters for character-level LM fusion; None for subword tokenizers."""

    def encode(self, normalized: str) -> list[int]: ...

    def decode(self, ids) -> str: ...


def normalize_text(text: str, kind: str = "basic") -> str:
    """``text`` under normaliser ``kind`` (the default is the default of ``text.normalizer``)."""
    return normalize(text, kind)


class CharTokenizer:
    """blank=0, space=1, then the alphabet in order."""

    kind = "char"
    blank_id = BLANK_ID
    specials: dict[str, int] = {}

    def __init__(self, cfg: TextConfig | None = None):
        self.cfg = cfg or TextConfig()
        if self.cfg.alphabet == "auto":
            raise ConfigError("text.alphabet=auto is resolved from the training split when a run starts; "
                              "this config has not been through a run (set text.alphabet to the characters)")
        self.symbols = ["<blank>", " ", *self.cfg.alphabet]
        self._ids = {s: i for i, s in enumerate(self.symbols)}

    @property
    def vocab_size(self) -> int:
        return len(self.symbols)

    def encode(self, normalized: str) -> list[int]:
        if not normalized.strip():
            raise TextError("empty transcript")
        bad = sorted({c for c in normalized if c not in self._ids or c == "<blank>"})
        if bad:
            raise TextError(f"characters outside the alphabet: {''.join(bad)!r} (text.alphabet, or "
                            f"text.alphabet=auto to learn it from the training split)")
        return [self._ids[c] for c in normalized]

    def decode(self, ids) -> str:
        return " ".join("".join(self.symbols[i] for i in ids if 0 < i < len(self.symbols)).split())

    def vocab_json(self) -> bytes:
        """The alphabet as a Wav2Vec2CTCTokenizer vocab.json (pad = the blank, ``|`` = space): how a
        CTC export is read by transformers."""
        import json

        names = ["<pad>", "|", *self.cfg.alphabet]
        return json.dumps({t: i for i, t in enumerate(names)}, ensure_ascii=False, indent=1).encode()


def encode_transcript(raw: str, cfg: TextConfig, tokenizer: Tokenizer) -> list[int]:
    """A raw transcript, normalised by ``text.normalizer``, as token ids; TextError says why not."""
    norm = normalize(raw, cfg.normalizer)
    if not norm:
        raise TextError("empty transcript" + (f" after text.normalizer={cfg.normalizer} (was {raw.strip()!r})"
                                              if raw.strip() else ""))
    return tokenizer.encode(norm)
