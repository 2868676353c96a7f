"""Subword tokenizers from well-kept libraries: SentencePiece models and ``tokenizer.json`` files (no Ray).

Both are built from the file's bytes (read once from local disk or ``s3://`` by the caller), so a
Ray Data task or a checkpoint loader never needs the original path. ``train_sentencepiece`` learns a
model from transcripts only (never audio), in memory.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable

import sentencepiece as spm
from tokenizers import Tokenizer as HFFile

from raytrain_speech.config import ConfigError
from raytrain_speech.data.text import TextError
from raytrain_speech.models.whisper import WHISPER_LANGUAGES

ID_OFFSET = 1
"""Our id = SentencePiece id + 1: id 0 is the CTC blank, which SentencePiece does not have."""


class SentencePieceTokenizer:
    """A SentencePiece model (BPE or unigram) behind our id layout (0 = blank)."""

    kind = "sentencepiece"
    blank_id = 0
    specials: dict[str, int] = {}
    symbols = None

    def __init__(self, data: bytes, name: str = ""):
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(data)
        except Exception as err:  # the library raises a bare RuntimeError/OSError on a bad file
            raise ConfigError(f"text.tokenizer_path: {name or 'tokenizer'} is not a SentencePiece model "
                              f"({err}); give a .model file or use text.tokenizer=hf for tokenizer.json") from None
        self.vocab_size = self.sp.get_piece_size() + ID_OFFSET
        self._unk = self.sp.unk_id()

    def encode(self, normalized: str) -> list[int]:
        ids = self.sp.encode(normalized, out_type=int)
        if not ids:
            raise TextError("empty transcript")
        if self._unk in ids:
            bad = sorted({c for c in normalized if not c.isspace() and self._unk in self.sp.encode(c, out_type=int)})
            raise TextError(f"characters the SentencePiece model cannot encode: {''.join(bad)!r} (train the "
                            "tokenizer on this corpus: raytrain-speech tokenizer train)")
        return [i + ID_OFFSET for i in ids]

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) - ID_OFFSET for i in ids if int(i) >= ID_OFFSET])


class HFTokenizer:
    """A ``tokenizer.json`` (Hugging Face ``tokenizers``); its own ids, special tokens included."""

    kind = "hf"
    blank_id = None
    symbols = None

    def __init__(self, data: bytes, name: str = ""):
        try:
            self.tok = HFFile.from_str(data.decode("utf-8"))
        except Exception as err:  # the library raises its own Exception subclass on bad JSON
            raise ConfigError(f"text.tokenizer_path: {name or 'tokenizer'} is not a tokenizer.json file "
                              f"({str(err).splitlines()[0][:200]})") from None
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.specials = {t.content: i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}
        self._special_ids = frozenset(self.specials.values())
        unk = getattr(self.tok.model, "unk_token", None)
        self._unk = self.tok.token_to_id(unk) if unk else None

    def encode(self, normalized: str) -> list[int]:
        ids = self.tok.encode(normalized, add_special_tokens=False).ids
        if not ids:
            raise TextError("empty transcript")
        if self._unk is not None and self._unk in ids:
            bad = sorted({c for c in normalized if not c.isspace()
                          and self._unk in self.tok.encode(c, add_special_tokens=False).ids})
            raise TextError(f"characters the tokenizer.json cannot encode: {''.join(bad)!r}")
        if self._special_ids.intersection(ids):  # a transcript that spells a special token must not become one
            raise TextError("transcript contains a special token of the tokenizer "
                            f"({', '.join(sorted(t for t, i in self.specials.items() if i in ids))})")
        return ids

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


class CTCVocabTokenizer:
    """A ``vocab.json`` of transformers' Wav2Vec2CTCTokenizer (the CTC head of a published wav2vec 2.0 /
    WavLM checkpoint): one id per character, ``|`` between words, the pad token as the CTC blank.

    Our ids put the blank first (id 0, as every CTC loss here expects) and keep the file's order for
    the rest; ``file_ids[our id]`` is the file's id, so an imported head's rows are permuted once.
    A vocabulary with capital letters and no small ones (wav2vec2-base-960h) reads normalised
    (lower-case) text upper-cased and writes it back lower-case."""

    kind = "ctc_vocab"
    blank_id = 0
    symbols = None
    specials: dict[str, int] = {}
    PADS = ("<pad>", "[PAD]", "<blank>")
    NON_TARGETS = ("<s>", "</s>", "<unk>", "[UNK]", "<bos>", "<eos>")

    def __init__(self, data: bytes, name: str = ""):
        try:
            vocab = json.loads(data.decode("utf-8"))
            assert isinstance(vocab, dict) and all(isinstance(i, int) for i in vocab.values())
        except (ValueError, UnicodeDecodeError, AssertionError):
            raise ConfigError(f"text.tokenizer_path: {name or 'vocab'} is not a vocab.json of token -> id") from None
        pads = [t for t in self.PADS if t in vocab]
        if not pads:
            raise ConfigError(f"text.tokenizer_path: {name or 'vocab.json'} has no pad token ({', '.join(self.PADS)}) "
                              "to serve as the CTC blank")
        by_id = sorted(vocab, key=vocab.get)
        order = [pads[0], *(t for t in by_id if t != pads[0])]
        self.tokens = order
        self.file_ids = [vocab[t] for t in order]
        self._ids = {t: i for i, t in enumerate(order)}
        self._skip = {self._ids[t] for t in (*self.PADS, *self.NON_TARGETS) if t in self._ids}
        self.delimiter = "|" if "|" in vocab else " "
        letters = [t for t in vocab if len(t) == 1 and t.isalpha()]
        self.upper = bool(letters) and all(t.isupper() for t in letters)
        self.vocab_size = len(order)

    def encode(self, normalized: str) -> list[int]:
        text = normalized.upper() if self.upper else normalized
        words = text.split()
        if not words:
            raise TextError("empty transcript")
        tokens = list(f"{self.delimiter}".join(words))
        bad = sorted({c for c in tokens if c not in self._ids or self._ids[c] in self._skip})
        if bad:
            raise TextError(f"characters the vocab.json cannot encode: {''.join(bad)!r}")
        return [self._ids[c] for c in tokens]

    def decode(self, ids) -> str:
        out = "".join(self.tokens[i] for i in ids if 0 <= i < self.vocab_size and i not in self._skip)
        out = " ".join(out.replace(self.delimiter, " ").split())
        return out.lower() if self.upper else out

    def vocab_json(self) -> bytes:
        """The vocabulary in our order (pad = id 0): what an export writes beside its head."""
        return json.dumps({t: i for i, t in enumerate(self.tokens)}, ensure_ascii=False, indent=1).encode()


def train_sentencepiece(texts: Iterable[str], vocab_size: int, model_type: str = "unigram",
                        character_coverage: float = 1.0) -> bytes:
    """A SentencePiece model learned from normalised transcripts; the model file's bytes.

    No bos/eos pieces (models add their own specials); unk is SentencePiece id 0. ``hard_vocab_limit``
    is off so a small corpus yields a smaller vocabulary instead of an error."""
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(t for t in texts if t), model_writer=model, vocab_size=vocab_size,
            model_type=model_type, character_coverage=character_coverage, bos_id=-1, eos_id=-1, unk_id=0,
            pad_id=-1, hard_vocab_limit=False, split_digits=True, num_threads=2,
            input_sentence_size=2_000_000, shuffle_input_sentence=True, minloglevel=2)
    except RuntimeError as err:
        raise ConfigError(f"text.vocab_size={vocab_size}: SentencePiece could not train ({err})") from None
    return model.getvalue()


def whisper_special_tokens() -> list[str]:
    """Whisper's special tokens in its tokenizer's order (timestamps left out: nothing here emits them)."""
    return ["<|endoftext|>", "<|startoftranscript|>", *(f"<|{c}|>" for c in (*WHISPER_LANGUAGES, "yue")),
            "<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>",
            "<|notimestamps|>"]


def train_whisper_bpe(texts: Iterable[str], vocab_size: int) -> bytes:
    """A byte-level BPE ``tokenizer.json`` in Whisper's layout (GPT-2 byte alphabet, no prefix space,
    Whisper's special tokens after the text ids), learned from transcripts: a Whisper trained from
    scratch on it exports to transformers' WhisperTokenizer like a published one."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFFile(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size <= len(alphabet):
        raise ConfigError(f"text.vocab_size={vocab_size}: a byte-level BPE needs more than its {len(alphabet)} "
                          "byte symbols")
    tok.train_from_iterator((t for t in texts if t), trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False, initial_alphabet=alphabet))
    tok.add_special_tokens(whisper_special_tokens())
    return tok.to_str().encode()
