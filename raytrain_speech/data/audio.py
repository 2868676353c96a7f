"""Decode, resample and validate audio (pure functions; no Ray, no I/O beyond bytes in memory).

Every problem raises ``AudioError`` with a short reason so the pipeline can count and log the skip
with the utterance id instead of crashing a worker or silently dropping the row.
"""

from __future__ import annotations

import io
import re

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF


class AudioError(ValueError):
    """An utterance's audio is unusable; the message is the reason (logged with the utterance id)."""


def decode(audio_bytes: bytes, expected_rate_hz: int | None = None, expected_duration_s: float | None = None,
           max_duration_s: float | None = None) -> tuple[np.ndarray, int]:
    """FLAC/WAV/OGG bytes -> (float32 mono samples in [-1, 1], sample rate in Hz).

    The header is checked before any sample is decoded, so a file that lies about itself costs a
    header read, not its length in memory: its rate against the shard's ``sample_rate_hz``
    (``expected_rate_hz``), its length against the shard's ``duration_s`` and ``max_duration_s``
    (a 3-hour file in a corpus of 10 s utterances is never decoded)."""
    if not audio_bytes:
        raise AudioError("empty audio bytes")
    try:
        with sf.SoundFile(io.BytesIO(audio_bytes)) as f:
            check_header(int(f.samplerate), int(f.frames), expected_rate_hz, expected_duration_s, max_duration_s)
            samples = f.read(dtype="float32", always_2d=True)
            sample_rate_hz = int(f.samplerate)
    except (sf.LibsndfileError, RuntimeError, TypeError) as err:
        raise AudioError(f"cannot decode audio: {_reason(err)}") from None
    mono = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
    return np.ascontiguousarray(mono, dtype=np.float32), sample_rate_hz


def _reason(err: Exception) -> str:
    """libsndfile's message without the in-memory file's repr ("Error opening <_io.BytesIO object at
    0x7f...>: Format not recognised." -> "Format not recognised."): the caller names the utterance."""
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    return re.sub(r"^Error opening <[^>]*>: ", "", first)


class AudioTooLong(AudioError):
    """The header says the file is longer than data.max_duration_s: left out like the duration filter."""


def check_header(rate_hz: int, frames: int, expected_rate_hz: int | None, expected_duration_s: float | None,
                 max_duration_s: float | None) -> None:
    """What a header can tell before decoding: a wrong rate, a lying duration, a file too long to decode.
    ``frames`` <= 0 means the format does not say (some OGG streams); the decoded length is checked later."""
    if expected_rate_hz and rate_hz != expected_rate_hz:
        raise AudioError(f"sample rate mismatch: the audio header says {rate_hz} Hz but the shard's sample_rate_hz "
                         f"says {expected_rate_hz} Hz (re-run prepare on this file)")
    if frames <= 0 or rate_hz <= 0:
        return
    header_s = frames / rate_hz
    if expected_duration_s is not None and header_s > expected_duration_s + max(0.05, 0.02 * expected_duration_s):
        raise AudioError(f"mislabelled audio: the header says {header_s:.2f} s but duration_s says "
                         f"{expected_duration_s:.2f} s (re-run prepare on this file)")
    if max_duration_s is not None and header_s > max_duration_s:
        raise AudioTooLong(f"audio of {header_s:.2f} s is longer than {max_duration_s:g} s (data.max_duration_s; "
                           "segment long-form audio at prepare time)")


def resample(samples: np.ndarray, from_hz: int, to_hz: int) -> np.ndarray:
    """Band-limited resampling (torchaudio's sinc interpolation); a no-op at equal rates."""
    if from_hz == to_hz:
        return samples
    out = AF.resample(torch.from_numpy(samples), orig_freq=from_hz, new_freq=to_hz)
    return out.numpy()


def validate(samples: np.ndarray, sample_rate_hz: int, min_duration_s: float = 0.0) -> None:
    if samples.size == 0:
        raise AudioError("zero-length audio")
    if not np.isfinite(samples).all():
        raise AudioError("audio contains NaN or Inf samples")
    if samples.size / sample_rate_hz < min_duration_s:
        raise AudioError(f"audio shorter than {min_duration_s} s")


def check_duration(samples: np.ndarray, sample_rate_hz: int, expected_duration_s: float) -> None:
    """A file cut short (an interrupted upload or copy) still decodes, to fewer samples than its
    header or the shard's ``duration_s`` promised; that is bad input, not a short utterance."""
    got_s = samples.size / sample_rate_hz
    if abs(got_s - expected_duration_s) > max(0.05, 0.02 * expected_duration_s):
        raise AudioError(f"truncated or mislabelled audio: decodes to {got_s:.2f} s but duration_s says "
                         f"{expected_duration_s:.2f} s (re-encode the file or re-run prepare)")


def load(audio_bytes: bytes, sample_rate_hz: int, expected_duration_s: float | None = None,
         expected_rate_hz: int | None = None, max_duration_s: float | None = None) -> np.ndarray:
    """Decode + mono + validate (+ header and duration checks) + resample to ``sample_rate_hz``: the
    one entry point for readers."""
    samples, source_hz = decode(audio_bytes, expected_rate_hz, expected_duration_s, max_duration_s)
    validate(samples, source_hz)
    if expected_duration_s is not None:
        check_duration(samples, source_hz, expected_duration_s)
    return resample(samples, source_hz, sample_rate_hz)


def encode_flac(samples: np.ndarray, sample_rate_hz: int) -> bytes:
    """float samples in [-1, 1] -> 16-bit FLAC bytes (the shard format's audio encoding)."""
    buf = io.BytesIO()
    sf.write(buf, np.clip(samples, -1.0, 1.0), sample_rate_hz, format="FLAC", subtype="PCM_16")
    return buf.getvalue()
