"""Augmentation: speed perturbation and additive noise on the waveform (inside Ray Data, before the
front end), SpecAugment masks and wav2vec 2.0-style span masks on the training device.

Shapes: B = utterances, F = frames, M = mel bins, T = samples.

Every draw is per utterance from a generator seeded by (seed, epoch, utterance index), never from
worker state, so an utterance gets the same augmentation on any worker and in any process, after any
restart or resize, and a sweep over augmentation parameters compares like with like. Masked cells are
set to 0, the mean of the per-utterance-normalised features.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torchaudio

from raytrain_speech.config import AugmentConfig
from raytrain_speech.seeding import utterance_rng

WAVEFORM_SALT = 0x57A7E  # waveform draws use their own stream, so turning them on leaves masks unchanged


@functools.lru_cache(maxsize=16)
def _speed_resampler(factor: float) -> torchaudio.transforms.Resample:
    """Playing at ``factor`` x speed = reading the samples as if recorded at factor x the rate and
    resampling back; rates are kept in hundredths so the sinc kernel is small (0.9 -> 9:10) and
    built once per process."""
    orig, new = round(factor * 100), 100
    g = math.gcd(orig, new)
    return torchaudio.transforms.Resample(orig // g, new // g)


def speed_perturb(samples_T: np.ndarray, factor: float) -> np.ndarray:
    """The utterance played ``factor`` times faster (shorter by 1/factor, pitch up by factor).

    torchaudio's sinc kernel, applied here with a single-threaded ``np.einsum`` rather than its
    ``conv1d``: the conv's result depends on torch's thread count, and the same (seed, epoch, index)
    must give the same audio in a Ray Data task (1 thread) and in the local backend or a test (N)."""
    if factor == 1.0:
        return samples_T
    res = _speed_resampler(factor)
    orig, new = res.orig_freq // res.gcd, res.new_freq // res.gcd
    kernel_NK = res.kernel[:, 0, :].double().numpy()
    padded_T = np.pad(np.asarray(samples_T, np.float64), (res.width, res.width + orig))
    frames_FK = np.lib.stride_tricks.sliding_window_view(padded_T, kernel_NK.shape[1])[::orig]
    out = np.einsum("fk,nk->fn", frames_FK, kernel_NK).reshape(-1)
    return out[: math.ceil(new * len(samples_T) / orig)].astype(np.float32)


def mix_noise(samples_T: np.ndarray, noise_T: np.ndarray, snr_db: float, offset: int = 0) -> np.ndarray:
    """``samples_T`` plus the noise clip (looped from ``offset`` to the utterance's length) scaled so
    that speech power / noise power = ``snr_db``; silent speech or silent noise is returned unchanged."""
    n = samples_T.shape[0]
    noise = np.resize(np.roll(noise_T, -offset), n).astype(np.float32)
    p_speech = float(np.mean(np.square(samples_T, dtype=np.float64)))
    p_noise = float(np.mean(np.square(noise, dtype=np.float64)))
    if p_speech <= 0.0 or p_noise <= 0.0:
        return samples_T
    scale = math.sqrt(p_speech / (p_noise * 10.0 ** (snr_db / 10.0)))
    return (samples_T + scale * noise).astype(np.float32)


class WaveformAugmenter:
    """Speed perturbation then additive noise for one utterance, drawn from (seed, epoch, index).

    Runs in Ray Data's preprocessing tasks; ``noise_clips`` are loaded once per process by the caller.
    The draws happen in a fixed order whether or not each is used, so changing one setting (say
    noise_prob) does not reshuffle the others.
    """

    def __init__(self, cfg: AugmentConfig, noise_clips: list[np.ndarray] | None = None):
        self.cfg = cfg
        self.noise_clips = noise_clips or []
        if cfg.noise_root is not None and cfg.noise_prob > 0 and not self.noise_clips:
            raise ValueError(f"augment.noise_root={cfg.noise_root}: no noise clips loaded")

    def draw(self, seed: int, epoch: int, index: int) -> dict:
        """The augmentation one utterance gets: {speed, noise clip (or None), offset, snr_db}."""
        rng = utterance_rng(seed ^ WAVEFORM_SALT, epoch, index)
        factors = self.cfg.speed_factors or (1.0,)
        speed = float(factors[int(rng.integers(len(factors)))])
        noisy = bool(rng.random() < self.cfg.noise_prob) and bool(self.noise_clips)
        clip = int(rng.integers(max(1, len(self.noise_clips))))
        offset_u = float(rng.random())
        snr_db = float(rng.uniform(*self.cfg.noise_snr_db))
        return {"speed": speed, "clip": clip if noisy else None, "offset_u": offset_u, "snr_db": snr_db}

    def __call__(self, samples_T: np.ndarray, seed: int, epoch: int, index: int) -> np.ndarray:
        d = self.draw(seed, epoch, index)
        out = speed_perturb(samples_T, d["speed"])
        if d["clip"] is not None:
            noise = self.noise_clips[d["clip"]]
            out = mix_noise(out, noise, d["snr_db"], offset=int(d["offset_u"] * len(noise)))
        return out


def utterance_mask(cfg: AugmentConfig, num_frames: int, num_bins: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(time mask [num_frames], frequency mask [num_bins]) booleans for one utterance."""
    time_F = np.zeros(num_frames, dtype=bool)
    freq_M = np.zeros(num_bins, dtype=bool)
    for _ in range(cfg.freq_masks):
        width = int(rng.integers(0, min(cfg.freq_mask_max_bins, num_bins) + 1))
        start = int(rng.integers(0, num_bins - width + 1))
        freq_M[start:start + width] = True
    max_time = min(cfg.time_mask_max_frames, int(0.2 * num_frames))
    for _ in range(cfg.time_masks):
        width = int(rng.integers(0, max_time + 1))
        start = int(rng.integers(0, num_frames - width + 1))
        time_F[start:start + width] = True
    if cfg.span_mask_prob > 0 and num_frames > 0:
        starts = np.flatnonzero(rng.random(num_frames) < cfg.span_mask_prob)
        for s in starts:
            time_F[s:s + cfg.span_mask_frames] = True
    return time_F, freq_M


def mask_batch(features_BFM: torch.Tensor, lengths_B: torch.Tensor, indices: list[int],
               cfg: AugmentConfig, seed: int, epoch: int) -> tuple[torch.Tensor, float]:
    """A masked copy of a padded batch (on its device) and the fraction of real frames time-masked."""
    if not cfg.enabled or not indices:
        return features_BFM, 0.0
    B, F, M = features_BFM.shape
    keep_BFM = np.ones((B, F, M), dtype=bool)
    masked_frames = 0
    lengths = lengths_B.tolist()
    for b, (index, n) in enumerate(zip(indices, lengths)):
        time_F, freq_M = utterance_mask(cfg, int(n), M, utterance_rng(seed, epoch, index))
        keep_BFM[b, :n][time_F] = False
        keep_BFM[b, :n, freq_M] = False
        masked_frames += int(time_F.sum())
    keep = torch.from_numpy(keep_BFM).to(features_BFM.device, non_blocking=True)
    return features_BFM * keep, masked_frames / max(1, sum(lengths))


