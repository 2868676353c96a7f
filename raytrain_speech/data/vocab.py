"""The run's tokenizer, settled once when a run starts (no Ray): learned from the training split's
transcripts, or brought as a file, and copied into the run directory.

- ``text.alphabet=auto`` (char): the characters of the normalised training transcripts become the
  alphabet, written into the run's resolved config.
- ``text.tokenizer=sentencepiece`` without ``text.tokenizer_path``: a model is trained on those
  transcripts (seconds for the demo corpus) and saved as the run's ``tokenizer.model``.
- A brought file (``text.tokenizer_path``, local or ``s3://``) is copied in as ``tokenizer.model`` /
  ``tokenizer.json``.

The config's ``text.tokenizer_path`` then names the run directory's copy, which every checkpoint also
carries; a resumed run keeps the tokenizer it started with. Only the ``text`` column is read, never
the audio.
"""

from __future__ import annotations

from collections.abc import Iterator

from raytrain_speech import storage
from raytrain_speech.config import Config, ConfigError, StorageConfig, TextConfig
from raytrain_speech.data import corpus, shards
from raytrain_speech.data.normalize import normalize
from raytrain_speech.data.text import TOKENIZER_FILES
from raytrain_speech.data.tokenizer import load_tokenizer


def transcripts(root: str, split: str, storage_cfg: StorageConfig | None, normalizer: str) -> Iterator[str]:
    """The split's transcripts under ``normalizer``, shard by shard (the text column only); empty
    ones are left out (the tokenizer never has to learn them)."""
    for uri in corpus.shard_uris(root, split, storage_cfg):
        for text in shards.read_column(uri, "text", storage_cfg).to_pylist():
            norm = normalize(text or "", normalizer)
            if norm:
                yield norm


def learn_alphabet(texts) -> str:
    """Every character of ``texts`` but space, in code-point order."""
    seen: set[str] = set()
    for t in texts:
        seen.update(t)
    seen.discard(" ")
    return "".join(sorted(seen))


def train_tokenizer(cfg: TextConfig, texts) -> bytes:
    """A tokenizer file from ``texts`` (already normalised) with ``cfg``'s settings: a SentencePiece
    model, or (hf) a byte-level BPE tokenizer.json in Whisper's layout."""
    from raytrain_speech.data.subword import train_sentencepiece, train_whisper_bpe

    if cfg.tokenizer == "hf":
        return train_whisper_bpe(texts, cfg.vocab_size)
    if cfg.tokenizer == "ctc_vocab":
        raise ConfigError("text.tokenizer=ctc_vocab reads a checkpoint's vocab.json: set text.tokenizer_path "
                          "(or train.init_from=hf:DIR, whose vocab.json is taken)")
    if cfg.tokenizer != "sentencepiece":
        raise ConfigError(f"text.tokenizer={cfg.tokenizer}: char needs no trained tokenizer")
    return train_sentencepiece(texts, cfg.vocab_size, cfg.subword_model, cfg.character_coverage)


RAY_TOKENIZER_SHARDS = 32
"""`tokenizer train` reads transcripts with Ray Data tasks from this many shards up (else in-process)."""


def train_from_split(cfg: Config, split: str, use_ray: bool = False) -> tuple[bytes, int, int]:
    """(tokenizer file, transcripts, shards) learned from ``split``'s transcripts (``raytrain-speech
    tokenizer train``): read in this process for a small split, with Ray Data tasks (one per shard)
    from RAY_TOKENIZER_SHARDS up or with ``use_ray``."""
    from raytrain_speech.data import corpus

    t = cfg.text
    if t.tokenizer == "char":
        raise ConfigError("text.tokenizer=char: `tokenizer train` learns sentencepiece models or (hf) Whisper-layout "
                          "BPE tokenizer.json files (pass text.tokenizer=sentencepiece text.vocab_size=N)")
    storage.check_reachable(cfg.data.root, cfg.storage)
    n_shards = len(corpus.shard_uris(cfg.data.root, split, cfg.storage))
    if use_ray or n_shards >= RAY_TOKENIZER_SHARDS:
        from raytrain_speech import ray_session
        from raytrain_speech.data.pipeline import transcripts_on_ray

        ray_session.connect(cfg.run.ray_address, dashboard=False)
        texts = list(transcripts_on_ray(cfg.data.root, split, cfg.storage, t.normalizer))
    else:
        texts = list(transcripts(cfg.data.root, split, cfg.storage, t.normalizer))
    if not texts:
        raise ConfigError(f"{cfg.data.root}: split {split} has no transcripts to learn a tokenizer from")
    return train_tokenizer(t, texts), len(texts), n_shards


def training_transcripts(cfg: Config):
    """The normalised transcripts training reads: data.root's train split, or every source's split
    of a mixture (data.sources), each with its own storage settings."""
    if not cfg.data.sources:
        yield from transcripts(cfg.data.root, cfg.data.train_split, cfg.storage, cfg.text.normalizer)
        return
    for src in cfg.data.sources:
        yield from transcripts(src.root, src.split, src.storage or cfg.storage, cfg.text.normalizer)


def _training_name(cfg: Config) -> str:
    return (f"{cfg.data.train_split} split" if not cfg.data.sources
            else "training sources' (" + ", ".join(s.name for s in cfg.data.sources) + ")")


def settle_run_tokenizer(cfg: Config, run_dir: str, log=print) -> Config:
    """``cfg`` with its tokenizer settled for the run in ``run_dir`` (see the module docstring)."""
    t, s = cfg.text, cfg.storage
    if t.tokenizer == "char":
        if t.alphabet == "auto":
            t.alphabet = learn_alphabet(training_transcripts(cfg))
            log(f"[text] alphabet of {len(t.alphabet)} characters from the {_training_name(cfg)}: {t.alphabet!r}")
        return cfg
    dest = storage.join(run_dir, TOKENIZER_FILES[t.tokenizer])
    if storage.exists(dest, s):  # a resumed run keeps the tokenizer it started with
        if t.tokenizer_path and t.tokenizer_path != dest and \
                storage.read_bytes(t.tokenizer_path, s) != storage.read_bytes(dest, s):
            raise ConfigError(f"text.tokenizer_path: {t.tokenizer_path} differs from the tokenizer run "
                              f"{run_dir} started with ({dest}); a run keeps its tokenizer (use a new run.name)")
    elif t.tokenizer_path:
        try:
            data = storage.read_bytes(t.tokenizer_path, s)
        except storage.StorageError as err:
            raise ConfigError(f"text.tokenizer_path: cannot read {t.tokenizer_path}: {err}") from None
        storage.write_bytes(dest, data, s)
    else:
        texts = list(training_transcripts(cfg))
        storage.write_bytes(dest, train_tokenizer(t, texts), s)
        kind = "byte-level BPE (Whisper layout)" if t.tokenizer == "hf" else f"{t.subword_model} SentencePiece"
        log(f"[text] trained a {kind} tokenizer on {len(texts)} {_training_name(cfg)} transcripts -> {dest}")
    t.tokenizer_path = dest
    return cfg


def text_checker(cfg: TextConfig, storage_cfg: StorageConfig | None = None):
    """(problem(raw transcript) -> '' or why the text rules cannot encode it, a description of the
    rules). A tokenizer that does not exist yet (alphabet=auto, a SentencePiece model to be trained
    on the corpus) can encode whatever the normaliser leaves, so only emptiness is checked then."""
    from raytrain_speech.data.text import TextError, encode_transcript

    learned = (cfg.tokenizer == "char" and cfg.alphabet == "auto") or (cfg.tokenizer != "char" and not
                                                                        cfg.tokenizer_path)
    tokenizer = None if learned else load_tokenizer(cfg, storage_cfg)
    rules = f"text.normalizer={cfg.normalizer}, text.tokenizer={cfg.tokenizer}" + (
        f" (alphabet {cfg.alphabet!r})" if cfg.tokenizer == "char" else
        f" ({cfg.tokenizer_path})" if cfg.tokenizer_path else " (to be learned from the corpus)")

    def problem(raw: str) -> str:
        if tokenizer is None:
            return "" if normalize(raw or "", cfg.normalizer) else f"empty after text.normalizer={cfg.normalizer}"
        try:
            encode_transcript(raw or "", cfg, tokenizer)
        except TextError as err:
            return str(err)
        return ""

    return problem, rules


def check_fits(cfg: Config) -> None:
    """ConfigError if the model family cannot train on the settled tokenizer (CTC needs a blank;
    Whisper needs its special tokens in a tokenizer.json)."""
    from raytrain_speech.models.registry import check_tokenizer

    check_tokenizer(cfg.model, load_tokenizer(cfg.text, cfg.storage))
