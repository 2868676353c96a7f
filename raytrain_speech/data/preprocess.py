"""Shard rows -> model-ready utterances: duration filter, decode, resample, augment, featurize,
tokenize, target-length filter (no Ray).

The same ``Preprocessor`` runs inside Ray Data's ``map_batches`` for training and in-process for
evaluation, so train and eval can never disagree on the front end. A row that fails keeps its place
with an ``error`` reason instead of features: the consumer counts and logs it by utterance id, and
nothing is dropped silently. Rows outside the duration filter are rejected the same way, from the
``duration_s`` column alone (never decoded), with a reason that starts with ``FILTERED``; so are
targets longer than the model can hold (``TargetLimits``: the decoder's positions, or a CTC encoder's
frames), from the tokens and the features.

Training may move the log-mel to the training device (``features.placement: worker``): rows then carry
the waveform, reflect-padded by n_fft/2 at both ends exactly as ``torch.stft(center=True)`` would pad
it alone, so ``features.DeviceLogMel`` computes the same frames batched as the CPU path does per row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

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
from raytrain_speech.data.text import TextError, Tokenizer, encode_transcript
from raytrain_speech.data.tokenizer import load_tokenizer
from raytrain_speech.seeding import utterance_rng

INPUT_COLUMNS = ["index", "id", "audio", "duration_s", "text"]
OPTIONAL_INPUT_COLUMNS = ["language", "sample_rate_hz"]
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


@dataclass(frozen=True)
class TargetLimits:
    """How long a training target may be for the model it feeds (models/registry.py target_limits)."""

    max_tokens: int | None = None
    """Decoder positions left after the prompt (or text.max_target_tokens)."""
    ctc_inputs_per_frame: float | None = None
    """CTC: input units (feature frames, or samples) per encoder frame; None = not a CTC model."""
    ctc_frame_slack: float = 0.0
    """CTC: encoder frames the conv stem loses at the edges (a lower bound is taken)."""

    def reason(self, targets: np.ndarray, n_inputs: int) -> str:
        """'' if ``targets`` fit, else the FILTERED reason naming the limit and its key."""
        return self.tokens_reason(targets) or self.frames_reason(targets, n_inputs)

    def tokens_reason(self, targets: np.ndarray) -> str:
        """The token-count limit alone (decided before the audio is decoded)."""
        if self.max_tokens is not None and len(targets) > self.max_tokens:
            return f"{FILTERED}target of {len(targets)} tokens is longer than {self.max_tokens} (text.max_target_tokens)"
        return ""

    def frames_reason(self, targets: np.ndarray, n_inputs: int) -> str:
        """The CTC limit: tokens plus repeats against the encoder frames of ``n_inputs`` input units."""
        if self.ctc_inputs_per_frame is None or not len(targets):
            return ""
        frames = int(n_inputs / self.ctc_inputs_per_frame - self.ctc_frame_slack)
        needed = len(targets) + int(np.count_nonzero(targets[1:] == targets[:-1]))
        if needed > frames:
            return (f"{FILTERED}target of {len(targets)} tokens needs {needed} CTC frames, the encoder has about "
                    f"{frames} for this audio (a coarser tokenizer, or text.max_target_tokens)")
        return ""


def _printable(value) -> str:
    try:
        return _transcript(value)
    except audio.AudioError:
        return ""


class Preprocessor:
    """Callable on a column batch (dict of arrays/lists) -> column batch of ready utterances.

    ``augmenter`` (training only) perturbs each waveform from (seed, epoch, index) before the front
    end; ``frontend_on_worker`` leaves the log-mel to the training device; ``duration_range_s`` is the
    (min, max) duration filter, either end None; ``limits`` filters over-long targets. With
    ``targets_required=False`` (evaluation: the reference is scored as text) a transcript the
    tokenizer cannot encode gives empty targets instead of a rejected row.
    """

    def __init__(self, features: FeatureConfig, text: TextConfig, augmenter: WaveformAugmenter | None = None,
                 frontend_on_worker: bool = False, duration_range_s: tuple[float | None, float | None] = (None, None),
                 tokenizer: Tokenizer | None = None, storage_cfg: StorageConfig | None = None,
                 limits: TargetLimits | None = None, targets_required: bool = True, crop_s: float | None = None):
        self.features_cfg, self.text_cfg = features, text
        self.features = FeatureExtractor(features)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(text, storage_cfg)
        self.limits = limits or TargetLimits()
        self.targets_required = targets_required
        self.augmenter = augmenter
        self.frontend_on_worker = frontend_on_worker and features.kind == "log_mel"
        self.min_s, self.max_s = duration_range_s
        self.crop_s = crop_s
        # torch.stft(center=True) reflect-pads by n_fft/2, which needs more samples than the pad.
        self.min_samples = features.n_fft // 2 + 1 if features.kind in ("log_mel", "whisper_log_mel") else 1

    def _filter_reason(self, duration_s: float) -> str:
        if (self.min_s is not None and duration_s < self.min_s) or (self.max_s is not None and duration_s > self.max_s):
            return (f"{FILTERED}duration {duration_s:.2f} s outside [{self.min_s}, {self.max_s}] "
                    f"(data.min_duration_s / data.max_duration_s)")
        return ""

    def one(self, audio_bytes: bytes, text, index: int = 0, seed: int = 0, epoch: int = 0,
            duration_s: float | None = None, source_rate_hz: int | None = None) -> tuple[np.ndarray, np.ndarray, float]:
        """(features or padded waveform, token ids, duration in seconds after augmentation);
        ``duration_s`` and ``source_rate_hz`` (the shard's columns) are checked against the header
        before decoding and catch files cut short after it."""
        try:
            targets = np.asarray(encode_transcript(_transcript(text), self.text_cfg, self.tokenizer), dtype=np.int32)
        except TextError as err:
            if self.targets_required:
                raise audio.AudioError(f"bad transcript: {err}") from None
            targets = np.zeros(0, np.int32)
        reason = self.limits.tokens_reason(targets) if self.targets_required else ""
        if reason:
            raise TargetFiltered(reason)
        rate_hz = self.features_cfg.sample_rate_hz
        samples = audio.load(audio_bytes, rate_hz, duration_s, source_rate_hz, self.max_s)
        if self.augmenter is not None:
            samples = self.augmenter(samples, seed, epoch, index)
        if self.crop_s is not None:
            samples = random_crop(samples, round(self.crop_s * rate_hz), seed, epoch, index)
        duration_s = samples.shape[0] / rate_hz
        if samples.shape[0] < self.min_samples:
            raise audio.AudioError(f"audio too short: {samples.shape[0]} samples at {rate_hz} Hz, the front end "
                                   f"needs at least {self.min_samples} (data.min_duration_s leaves such files out)")
        if self.frontend_on_worker:
            out = center_pad(samples, self.features_cfg)
            n_inputs = 1 + (out.shape[0] - self.features_cfg.n_fft) // self.features_cfg.hop_length
        else:
            out = self.features(samples)
            n_inputs = out.shape[0]
        reason = self.limits.frames_reason(targets, n_inputs) if self.targets_required else ""
        if reason:
            raise TargetFiltered(reason)
        return out, targets, duration_s

    def __call__(self, batch: dict, seed: int = 0, epoch: int = 0) -> dict:
        n = len(batch["index"])
        feats, targets, errors = [], [], []
        durations = np.asarray(batch["duration_s"], dtype=np.float32).copy()
        empty_f = np.zeros((0,) if self.frontend_on_worker else (0, self.features_cfg.n_mels), np.float32)
        rates = batch.get("sample_rate_hz", [None] * n)
        read_errors = batch.get("read_error", [""] * n)  # a reader's reason a row has no audio
        for i, (index, audio_bytes, text) in enumerate(zip(batch["index"], batch["audio"], batch["text"])):
            reason = read_errors[i] or self._filter_reason(float(durations[i]))
            if not reason:
                try:
                    f, t, durations[i] = self.one(audio_bytes, text, int(index), seed, epoch, float(durations[i]),
                                                  _rate_or_none(rates[i]))
                except audio.AudioTooLong as err:
                    reason = FILTERED + str(err)
                except (audio.AudioError, TargetFiltered) as err:
                    reason = str(err)
                except Exception as err:  # noqa: BLE001 - one utterance must never take the run down
                    # A deterministic error would fail the task on every retry; as a bad-input row it is
                    # counted, named, and the max_bad_fraction verdict still stops a run where every row
                    # fails (a bug rather than bad data).
                    reason = preprocessing_failure(err)
            if reason:
                f, t = empty_f, np.zeros(0, np.int32)
            feats.append(f)
            targets.append(t)
            errors.append(reason)
        return {
            "index": np.asarray(batch["index"], dtype=np.int64),
            "id": np.asarray(batch["id"], dtype=object),
            "duration_s": durations,
            # The transcript as written: scoring applies eval.normalizer to it and to the hypothesis.
            "text": np.asarray([" ".join(_printable(t).split()) for t in batch["text"]], dtype=object),
            # Carried through for per-language scoring and the Whisper prompt; '' where a corpus has none.
            "language": np.asarray([v if isinstance(v, str) else "" for v in batch.get("language", [None] * n)],
                                   dtype=object),
            "features": _ragged(feats),
            "targets": _ragged(targets),
            "error": np.asarray(errors, dtype=object),
        }


def random_crop(samples: np.ndarray, crop_samples: int, seed: int, epoch: int, index: int) -> np.ndarray:
    """A window of ``crop_samples`` at a start drawn uniformly from (seed, epoch, index); shorter
    utterances are kept whole (never padded: padding is the batcher's, and it is masked)."""
    if samples.shape[0] <= crop_samples:
        return samples
    start = int(utterance_rng(seed ^ 0xC209, epoch, index).integers(0, samples.shape[0] - crop_samples + 1))
    return samples[start:start + crop_samples]


def _rate_or_none(value) -> int | None:
    """A ``sample_rate_hz`` cell as an int, or None where a reader had none (null, NaN, 0)."""
    try:
        return int(value) or None
    except (TypeError, ValueError):
        return None


def preprocessing_failure(err: BaseException) -> str:
    """The bad-input reason for an exception the checks did not anticipate: its type and first line."""
    first = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
    return f"preprocessing failed: {type(err).__name__}{': ' + first if first else ''} (this utterance's audio " \
           "or transcript; report it if the file plays)"


class TargetFiltered(Exception):
    """A target the model cannot hold: the row is filtered and counted, like the duration filter."""


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
    limits: TargetLimits = field(default_factory=TargetLimits)
    crop_s: float | None = None

    @classmethod
    def from_config(cls, cfg: Config) -> TrainingRecipe:
        return cls(cfg.features, cfg.text, cfg.augment if cfg.augment.waveform_enabled else None,
                   cfg.features.placement == "worker", (cfg.data.min_duration_s, cfg.data.max_duration_s), cfg.storage,
                   limits_for(cfg), cfg.data.crop_s)


def limits_for(cfg: Config) -> TargetLimits:
    """The target limits of ``cfg``'s model with its tokenizer (the model decides how long a target may be)."""
    from raytrain_speech.models.registry import target_limits

    tokenizer = load_tokenizer(cfg.text, cfg.storage)
    return TargetLimits(**target_limits(cfg.model, tokenizer.specials or None, cfg.text.max_target_tokens))


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
    return Preprocessor(recipe.features, recipe.text, augmenter, recipe.frontend_on_worker, recipe.duration_range_s,
                        storage_cfg=recipe.storage, limits=recipe.limits, crop_s=recipe.crop_s)


_PREPROCESSORS: dict[str, Preprocessor] = {}


def preprocess_training_rows(batch: dict, recipe: TrainingRecipe, seed: int, epoch: int) -> dict:
    """Raw shard rows -> preprocessed rows for training (the function both backends map: inside Ray
    Data tasks, and in the local backend's process). One Preprocessor (mel filterbank, noise clips)
    is kept per process and recipe. A row a reader could not read says why (``read_error``)."""
    key = repr(recipe)  # the configs are plain (unhashable) dataclasses; their repr is their value
    if key not in _PREPROCESSORS:
        _PREPROCESSORS[key] = make_preprocessor(recipe)
    return _PREPROCESSORS[key](batch, seed, epoch)


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
