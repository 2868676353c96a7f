"""The configured tokenizer, built from ``text.*`` and its file's bytes (no Ray): once per process
and path, or from the copy a checkpoint or export directory carries."""

from __future__ import annotations

from raytrain_speech import storage
from raytrain_speech.config import ConfigError, StorageConfig, TextConfig
from raytrain_speech.data import subword
from raytrain_speech.data.text import TOKENIZER_FILES, CharTokenizer, Tokenizer


def build_tokenizer(cfg: TextConfig, data: bytes | None = None) -> Tokenizer:
    """The configured tokenizer; ``data`` is the tokenizer file's bytes (sentencepiece, hf)."""
    if cfg.tokenizer == "char":
        return CharTokenizer(cfg)
    if data is None:
        raise ConfigError(f"text.tokenizer={cfg.tokenizer} needs text.tokenizer_path (a "
                          f"{TOKENIZER_FILES[cfg.tokenizer]} file; `raytrain-speech tokenizer train` makes one)")
    if cfg.tokenizer == "sentencepiece":
        return subword.SentencePieceTokenizer(data, cfg.tokenizer_path or "")
    if cfg.tokenizer == "ctc_vocab":
        return subword.CTCVocabTokenizer(data, cfg.tokenizer_path or "")
    return subword.HFTokenizer(data, cfg.tokenizer_path or "")


_LOADED: dict[tuple, Tokenizer] = {}


def load_tokenizer(cfg: TextConfig, storage_cfg: StorageConfig | None = None) -> Tokenizer:
    """``build_tokenizer`` with the file read from ``text.tokenizer_path``, once per process and path."""
    key = (cfg.tokenizer, cfg.alphabet, cfg.tokenizer_path)
    if key not in _LOADED:
        data = None
        if cfg.tokenizer != "char" and cfg.tokenizer_path:
            try:
                data = storage.read_bytes(cfg.tokenizer_path, storage_cfg)
            except storage.StorageError as err:
                raise ConfigError(f"text.tokenizer_path: cannot read {cfg.tokenizer_path}: {err}") from None
        _LOADED[key] = build_tokenizer(cfg, data)
    return _LOADED[key]


def tokenizer_file_in(directory: str, cfg: TextConfig, storage_cfg: StorageConfig | None = None) -> bytes | None:
    """The tokenizer file a checkpoint or export directory carries, else the one ``cfg`` names
    (None for char, which has no file)."""
    if cfg.tokenizer not in TOKENIZER_FILES:
        return None
    uri = storage.join(directory, TOKENIZER_FILES[cfg.tokenizer])
    return storage.read_bytes(uri if storage.exists(uri, storage_cfg) else cfg.tokenizer_path, storage_cfg)


def tokenizer_in(directory: str, cfg: TextConfig, storage_cfg: StorageConfig | None = None) -> Tokenizer:
    """The tokenizer a checkpoint or export directory carries (its own copy of the file), else the
    one ``cfg`` names: a checkpoint copied away from its run still decodes with its tokenizer."""
    if cfg.tokenizer in TOKENIZER_FILES:
        return build_tokenizer(cfg, tokenizer_file_in(directory, cfg, storage_cfg))
    return load_tokenizer(cfg, storage_cfg)
