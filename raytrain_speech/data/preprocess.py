"""Shard rows -> model-ready utterances: decode, resample, featurize, tokenize (no Ray).

The same ``Preprocessor`` runs inside Ray Data's ``map_batches`` for training and in-process for
evaluation, so train and eval can never disagree on the front end. A row that fails keeps its place
with an ``error`` reason instead of features: the consumer counts and logs it by utterance id, and
nothing is dropped silently.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from raytrain_speech.data import audio
from raytrain_speech.data.batching import Utterance
from raytrain_speech.data.features import FeatureConfig, FeatureExtractor
from raytrain_speech.data.text import CharTokenizer, TextConfig, TextError, normalize_text

INPUT_COLUMNS = ["index", "id", "audio", "duration_s", "text"]
OPTIONAL_INPUT_COLUMNS = ["language"]


def input_columns(available) -> list[str]:
    """The columns the preprocessor reads from a shard with ``available`` columns (optional ones if present)."""
    return INPUT_COLUMNS + [c for c in OPTIONAL_INPUT_COLUMNS if c in set(available)]


class Preprocessor:
    """Callable on a column batch (dict of arrays/lists) -> column batch of ready utterances."""

    def __init__(self, features: FeatureConfig, text: TextConfig):
        self.features_cfg = features
        self.features = FeatureExtractor(features)
        self.tokenizer = CharTokenizer(text)

    def one(self, audio_bytes: bytes, text: str) -> tuple[np.ndarray, np.ndarray]:
        try:
            targets = np.asarray(self.tokenizer.encode(text), dtype=np.int16)
        except TextError as err:
            raise audio.AudioError(f"bad transcript: {err}") from None
        samples = audio.load(audio_bytes, self.features_cfg.sample_rate_hz)
        return self.features(samples), targets

    def __call__(self, batch: dict) -> dict:
        n = len(batch["index"])
        feats, targets, errors = [], [], []
        empty_f = np.zeros((0, self.features_cfg.n_mels), np.float32)
        for audio_bytes, text in zip(batch["audio"], batch["text"]):
            try:
                f, t = self.one(audio_bytes, text if isinstance(text, str) else "")
                feats.append(f)
                targets.append(t)
                errors.append("")
            except audio.AudioError as err:
                feats.append(empty_f)
                targets.append(np.zeros(0, np.int16))
                errors.append(str(err))
        return {
            "index": np.asarray(batch["index"], dtype=np.int64),
            "id": np.asarray(batch["id"], dtype=object),
            "duration_s": np.asarray(batch["duration_s"], dtype=np.float32),
            "text": np.asarray([normalize_text(t) if isinstance(t, str) else "" for t in batch["text"]],
                               dtype=object),
            # Carried through for per-language scoring and the Whisper prompt; '' where a corpus has none.
            "language": np.asarray([v if isinstance(v, str) else "" for v in batch.get("language", [None] * n)],
                                   dtype=object),
            "features": _ragged(feats),
            "targets": _ragged(targets),
            "error": np.asarray(errors, dtype=object),
        }


def _ragged(arrays: list[np.ndarray]) -> np.ndarray:
    out = np.empty(len(arrays), dtype=object)
    out[:] = arrays
    return out


def to_utterances(batch: dict) -> tuple[list[Utterance], list[tuple[int, str, str]]]:
    """Preprocessed column batch -> (good utterances, [(index, id, reason)] for the rows that failed)."""
    good, bad = [], []
    for i in range(len(batch["index"])):
        if batch["error"][i]:
            bad.append((int(batch["index"][i]), str(batch["id"][i]), str(batch["error"][i])))
            continue
        good.append(Utterance(int(batch["index"][i]), str(batch["id"][i]), float(batch["duration_s"][i]),
                              np.asarray(batch["features"][i]), np.asarray(batch["targets"][i]),
                              str(batch["text"][i]), str(batch["language"][i]) if "language" in batch else ""))
    return good, bad


def iter_table(table: pa.Table, pre: Preprocessor, rows_per_batch: int = 32) -> Iterator[dict]:
    """Preprocess an in-memory shard table batch by batch (the no-Ray path)."""
    for rb in table.select(input_columns(table.column_names)).to_batches(max_chunksize=rows_per_batch):
        yield pre(rb.to_pydict())
