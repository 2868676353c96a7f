"""Shard rows -> model-ready utterances: duration filter, decode, resample, augment, featurize,
tokenize (no Ray).

The same ``Preprocessor`` runs inside Ray Data's ``map_batches`` for training and in-process for
evaluation, so train and eval can never disagree on the front end. A row that fails keeps its place
with an ``error`` reason instead of features: the consumer counts and logs it by utterance id, and
nothing is dropped silently. Rows outside the duration filter are rejected the same way, from the
``duration_s`` column alone (never decoded), with a reason that starts with ``FILTERED``.

Training may move the log-mel to the training device (``features.placement: worker``): rows then carry
the waveform, reflect-padded by n_fft/2 at both ends exactly as ``torch.stft(center=True)`` would pad
it alone, so ``features.DeviceLogMel`` computes the same frames batched as the CPU path does per row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from raytrain_speech.batch import Batch
from raytrain_speech.config import (
    AugmentConfig,
    BatchingConfig,
    Config,
    FeatureConfig,
    StorageConfig,
    TextConfig,
)
from raytrain_speech.data import audio
from raytrain_speech.data.augment import WaveformAugmenter
from raytrain_speech.data.batching import Utterance, batch_by_buckets, batch_by_duration, collate
from raytrain_speech.data.features import FeatureExtractor, center_pad
from raytrain_speech.data.text import CharTokenizer, TextError, normalize_text

INPUT_COLUMNS = ["index", "id", "audio", "duration_s", "text"]
OPTIONAL_INPUT_COLUMNS = ["language"]
FILTERED = "filtered: "
"""Reason prefix of rows left out by the duration filter (counted apart from bad input)."""


def is_filtered(reason: str) -> bool:
    return reason.startswith(FILTERED)


def input_columns(available) -> list[str]:
    """The columns the preprocessor reads from a shard with ``available`` columns (optional ones if present)."""
    return INPUT_COLUMNS + [c for c in OPTIONAL_INPUT_COLUMNS if c in set(available)]


def _transcript(value) -> str:
    """A shard's text cell as str; bytes that are not UTF-8 (a binary text column) are bad input."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray | np.bytes_):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise audio.AudioError("bad transcript: not valid UTF-8 (re-encode the transcript as UTF-8)") from None
    return ""  # null: the tokenizer reports an empty transcript


def _printable(value) -> str:
    try:
        return _transcript(value)
    except audio.AudioError:
        return ""


class Preprocessor:
    """Callable on a column batch (dict of arrays/lists) -> column batch of ready utterances.

    ``augmenter`` (training only) perturbs each waveform from (seed, epoch, index) before the front
    end; ``frontend_on_worker`` leaves the log-mel to the training device; ``duration_range_s`` is the
    (min, max) duration filter, either end None.
    """

    def __init__(self, features: FeatureConfig, text: TextConfig, augmenter: WaveformAugmenter | None = None,
                 frontend_on_worker: bool = False, duration_range_s: tuple[float | None, float | None] = (None, None)):
        self.features_cfg = features
        self.features = FeatureExtractor(features)
        self.tokenizer = CharTokenizer(text)
        self.augmenter = augmenter
        self.frontend_on_worker = frontend_on_worker and features.kind == "log_mel"
        self.min_s, self.max_s = duration_range_s

    def _filter_reason(self, duration_s: float) -> str:
        if (self.min_s is not None and duration_s < self.min_s) or (self.max_s is not None and duration_s > self.max_s):
            return (f"{FILTERED}duration {duration_s:.2f} s outside [{self.min_s}, {self.max_s}] "
                    f"(data.min_duration_s / data.max_duration_s)")
        return ""

    def one(self, audio_bytes: bytes, text, index: int = 0, seed: int = 0, epoch: int = 0,
            duration_s: float | None = None) -> tuple[np.ndarray, np.ndarray, float]:
        """(features or padded waveform, token ids, duration in seconds after augmentation);
        ``duration_s`` (the shard's column) catches files cut short."""
        try:
            targets = np.asarray(self.tokenizer.encode(_transcript(text)), dtype=np.int16)
        except TextError as err:
            raise audio.AudioError(f"bad transcript: {err}") from None
        rate_hz = self.features_cfg.sample_rate_hz
        samples = audio.load(audio_bytes, rate_hz, duration_s)
        if self.augmenter is not None:
            samples = self.augmenter(samples, seed, epoch, index)
        duration_s = samples.shape[0] / rate_hz
        if self.frontend_on_worker:
            return center_pad(samples, self.features_cfg), targets, duration_s
        return self.features(samples), targets, duration_s

    def __call__(self, batch: dict, seed: int = 0, epoch: int = 0) -> dict:
        n = len(batch["index"])
        feats, targets, errors = [], [], []
        durations = np.asarray(batch["duration_s"], dtype=np.float32).copy()
        empty_f = np.zeros((0,) if self.frontend_on_worker else (0, self.features_cfg.n_mels), np.float32)
        for i, (index, audio_bytes, text) in enumerate(zip(batch["index"], batch["audio"], batch["text"])):
            reason = self._filter_reason(float(durations[i]))
            if not reason:
                try:
                    f, t, durations[i] = self.one(audio_bytes, text, int(index), seed, epoch, float(durations[i]))
                except audio.AudioError as err:
                    reason = str(err)
            if reason:
                f, t = empty_f, np.zeros(0, np.int16)
            feats.append(f)
            targets.append(t)
            errors.append(reason)
        return {
            "index": np.asarray(batch["index"], dtype=np.int64),
            "id": np.asarray(batch["id"], dtype=object),
            "duration_s": durations,
            "text": np.asarray([normalize_text(_printable(t)) for t in batch["text"]], dtype=object),
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


@dataclass(frozen=True)
class TrainingRecipe:
    """What a training row's preprocessing depends on (plain, picklable: it travels to Ray Data tasks)."""

    features: FeatureConfig
    text: TextConfig
    augment: AugmentConfig | None
    """Waveform augmentation (speed, noise) or None when off."""
    frontend_on_worker: bool
    duration_range_s: tuple[float | None, float | None]
    storage: StorageConfig

    @classmethod
    def from_config(cls, cfg: Config) -> TrainingRecipe:
        return cls(cfg.features, cfg.text, cfg.augment if cfg.augment.waveform_enabled else None,
                   cfg.features.placement == "worker", (cfg.data.min_duration_s, cfg.data.max_duration_s), cfg.storage)


def make_preprocessor(recipe: TrainingRecipe) -> Preprocessor:
    """A training Preprocessor; loads the noise set (once per process) when noise is on."""
    augmenter = None
    if recipe.augment is not None:
        clips = None
        a = recipe.augment
        if a.noise_root is not None and a.noise_prob > 0:
            from raytrain_speech.data.noise import load_noise_clips

            clips = load_noise_clips(a.noise_root, recipe.storage, split=a.noise_split, max_clips=a.noise_max_clips,
                                     sample_rate_hz=recipe.features.sample_rate_hz)
        augmenter = WaveformAugmenter(a, clips)
    return Preprocessor(recipe.features, recipe.text, augmenter, recipe.frontend_on_worker, recipe.duration_range_s)


_PREPROCESSORS: dict[str, Preprocessor] = {}


def preprocess_training_rows(batch: dict, recipe: TrainingRecipe, seed: int, epoch: int) -> dict:
    """Raw shard rows -> preprocessed rows for training (the function both backends map: inside Ray
    Data tasks, and in the local backend's process). One Preprocessor (mel filterbank, noise clips)
    is kept per process and recipe. A tar row without audio says why (``read_error``)."""
    key = repr(recipe)  # the configs are plain (unhashable) dataclasses; their repr is their value
    if key not in _PREPROCESSORS:
        _PREPROCESSORS[key] = make_preprocessor(recipe)
    out = _PREPROCESSORS[key](batch, seed, epoch)
    if "read_error" in batch:  # a tar's row that has no audio: say why, not just "empty audio bytes"
        out["error"] = np.asarray([r or e for r, e in zip(batch["read_error"], out["error"])], dtype=object)
    return out


def worker_batches(rows: Iterable[dict], max_padded_s: float, batching: BatchingConfig, seed: int,
                   on_bad: Callable[[int, str, str], None] | None = None,
                   boundaries_s: list[float] | None = None) -> Iterator[Batch]:
    """Preprocessed row batches of one rank -> padded training batches bounded by audio seconds.

    ``on_bad(index, id, reason)`` is called for every row the preprocessor rejected; with
    ``boundaries_s`` (duration quantiles of the split) batches are cut per duration bucket, else
    from a sorted window.
    """

    def utterances():
        for rb in rows:
            good, bad = to_utterances(rb)
            for index, utt_id, reason in bad:
                if on_bad is not None:
                    on_bad(index, utt_id, reason)
            yield from good

    if boundaries_s:
        groups = batch_by_buckets(utterances(), boundaries_s, max_padded_s, batching, seed=seed)
    else:
        groups = batch_by_duration(utterances(), max_padded_s, batching, seed=seed)
    for group in groups:
        yield collate(group)
