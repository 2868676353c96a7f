"""F0 measured from the waveform (YIN), and put on an encoder's frame grid, for the F0 probe.

Why measure: the probe's labels must exist for any audio, not only for audio whose synthesizer
settings we know; and a synthesizer's pitch *setting* is not the F0 of any frame (espeak moves pitch
through each clause). Why YIN (de Cheveigné & Kawahara 2002) written here rather than
``torchaudio.functional.detect_pitch_frequency``: that function has no voicing decision (it gives a
number for silence and noise too), and the probe must score voiced frames only; YIN's aperiodicity is
the voicing decision. It is plain numpy: one FFT per frame, no dependency.

Shapes: N = tracker frames (``hop_s`` apart, frame i centred at ``i * hop_s``), L = samples a frame
reads, T = encoder frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class YinSettings:
    """The tracker's settings; the defaults cover adult and espeak voices (50-550 Hz)."""

    min_f0_hz: float = 50.0
    """Lowest F0 reported (sets the longest lag searched)."""
    max_f0_hz: float = 550.0
    """Highest F0 reported (sets the shortest lag searched)."""
    hop_s: float = 0.01
    """Time between tracker frames."""
    window_s: float = 0.025
    """YIN's integration window: how many samples each lag's difference sums over."""
    threshold: float = 0.25
    """YIN's absolute threshold on the cumulative-mean-normalised difference: the first dip below it
    is the period; a frame with no dip below it is unvoiced (aperiodic: noise, or a transition). 0.25
    rather than the paper's 0.1: espeak's low and Klatt voices are breathy, and at 0.15 most of their
    vowels came out unvoiced; 0.35 began to let octave jumps through."""
    dip_tolerance: float = 0.05
    """A dip counts only if within this of the deepest one (see ``track_f0``). On 60 demo utterances
    it cut frames more than 0.75 octave from their utterance's median from 5.1% to 1.7%."""
    max_octaves_from_median: float = 0.75
    """Frames further than this from the utterance's median F0 are unvoiced: on the demo voices the
    frames above the median form two groups, within 0.5 octave (intonation) and beyond 0.75 (the
    tracker locking onto a harmonic), with nothing between."""
    silence_db: float = -40.0
    """Frames this far below the utterance's loudest frame are unvoiced (silence, breath)."""


@dataclass
class F0Track:
    f0_hz_N: np.ndarray
    """F0 per tracker frame (0 where unvoiced)."""
    voiced_N: np.ndarray
    """The voicing decision per tracker frame."""
    aperiodicity_N: np.ndarray
    """YIN's normalised difference at the chosen lag (0 = perfectly periodic, ~1 = noise)."""
    hop_s: float


def track_f0(samples: np.ndarray, sample_rate_hz: int, settings: YinSettings = YinSettings()) -> F0Track:
    """YIN on ``samples`` (float, mono): difference function by FFT, cumulative-mean normalisation,
    absolute threshold, parabolic interpolation of the lag; unvoiced where aperiodic, silent, or far
    from the utterance's median F0."""
    x = np.asarray(samples, dtype=np.float64)
    w = max(2, round(settings.window_s * sample_rate_hz))
    tau_min = max(2, math.floor(sample_rate_hz / settings.max_f0_hz))
    tau_max = math.ceil(sample_rate_hz / settings.min_f0_hz)
    hop = max(1, round(settings.hop_s * sample_rate_hz))
    frame_len = w + tau_max + 1
    n = max(1, math.ceil(len(x) / hop))
    padded = np.zeros(w // 2 + n * hop + frame_len, dtype=np.float64)  # frame i's window centred at i*hop
    padded[w // 2: w // 2 + len(x)] = x
    frames_NL = np.lib.stride_tricks.sliding_window_view(padded, frame_len)[::hop][:n]

    # d(tau) = sum_{j<w} (f[j] - f[j+tau])^2 = E(0) + E(tau) - 2 r(tau), for tau = 0..tau_max
    n_fft = 1 << math.ceil(math.log2(frame_len + w))
    spec = np.fft.rfft(frames_NL, n_fft, axis=1)
    ref = np.fft.rfft(frames_NL[:, :w], n_fft, axis=1)
    r_NT = np.fft.irfft(np.conj(ref) * spec, n_fft, axis=1)[:, : tau_max + 1]
    cum = np.concatenate([np.zeros((n, 1)), np.cumsum(frames_NL ** 2, axis=1)], axis=1)
    energy_NT = cum[:, w: w + tau_max + 1] - cum[:, : tau_max + 1]
    d_NT = np.maximum(energy_NT[:, :1] + energy_NT - 2 * r_NT, 0.0)
    cmnd_NT = np.ones_like(d_NT)
    running = np.cumsum(d_NT[:, 1:], axis=1)
    taus = np.arange(1, tau_max + 1)
    cmnd_NT[:, 1:] = d_NT[:, 1:] * taus / np.maximum(running, 1e-12)

    search = cmnd_NT[:, tau_min: tau_max]  # lags tau_min .. tau_max-1 (tau_max+1 needed for interpolation)
    left = np.concatenate([np.full((n, 1), np.inf), search[:, :-1]], axis=1)
    right = np.concatenate([search[:, 1:], np.full((n, 1), np.inf)], axis=1)
    floor = search.min(axis=1, keepdims=True)
    # The shortest lag at the bottom of a dip under the threshold *and* near the deepest dip: the
    # shortest keeps multiples of the period (octave-down errors) out, as in YIN; "near the deepest"
    # keeps out the shallower dips at half or a quarter of the period that strong harmonics make.
    good = (search <= left) & (search <= right) & (search < settings.threshold) & (search <= floor + settings.dip_tolerance)
    has_dip = good.any(axis=1)
    best = np.where(has_dip, np.argmax(good, axis=1), np.argmin(search, axis=1)) + tau_min

    rows = np.arange(n)
    a, b, c = cmnd_NT[rows, best - 1], cmnd_NT[rows, best], cmnd_NT[rows, best + 1]
    denom = a - 2 * b + c
    shift = np.where(np.abs(denom) > 1e-12, 0.5 * (a - c) / np.where(denom == 0, 1, denom), 0.0)
    period = best + np.clip(shift, -1.0, 1.0)

    power_db = 10 * np.log10(energy_NT[:, 0] / w + 1e-12)
    loud = (power_db > power_db.max() + settings.silence_db) & (power_db > -100.0)
    voiced = has_dip & loud
    f0 = sample_rate_hz / period
    if voiced.any():
        voiced &= np.abs(np.log2(f0 / np.median(f0[voiced]))) <= settings.max_octaves_from_median
    f0 = np.where(voiced, f0, 0.0)
    return F0Track(f0.astype(np.float32), voiced, b.astype(np.float32), settings.hop_s)


def to_encoder_frames(track: F0Track, n_frames: int, frame_s: float) -> tuple[np.ndarray, np.ndarray]:
    """(f0_hz_T, voiced_T) on an encoder grid of ``n_frames`` frames ``frame_s`` long: an encoder frame
    is voiced when most tracker frames centred inside it are, and its F0 is their voiced median (the
    nearest tracker frame when the encoder's frames are shorter than the tracker's hop)."""
    f0_T = np.zeros(n_frames, np.float32)
    voiced_T = np.zeros(n_frames, bool)
    n = len(track.f0_hz_N)
    for t in range(n_frames):
        lo = math.ceil(t * frame_s / track.hop_s - 1e-9)
        hi = math.ceil((t + 1) * frame_s / track.hop_s - 1e-9)
        idx = np.arange(lo, min(hi, n))
        if idx.size == 0:
            idx = np.array([min(n - 1, round((t + 0.5) * frame_s / track.hop_s))])
        v = track.voiced_N[idx]
        if v.mean() > 0.5:
            voiced_T[t] = True
            f0_T[t] = float(np.median(track.f0_hz_N[idx][v]))
    return f0_T, voiced_T
