"""Log-mel front end and per-utterance normalisation.

Shapes: T = samples, F = frames, M = mel bins.

Runs inside Ray Data on CPU (``features.placement: data``) so training workers receive ready
features, or batched on the training device (``features.placement: worker``, ``DeviceLogMel``) when
the data CPUs are the bottleneck: a GPU computes a batch's log-mel in well under a millisecond. Both
give the same frames (see ``center_pad``).
"""

from __future__ import annotations

import numpy as np
import torch
import torchaudio

from raytrain_speech.config import FeatureConfig


def mel_spectrogram(cfg: FeatureConfig, center: bool) -> torchaudio.transforms.MelSpectrogram:
    """The power mel spectrogram both front ends share (htk mel scale, the configured window)."""
    window_fn = torch.hamming_window if cfg.window == "hamming" else torch.hann_window
    return torchaudio.transforms.MelSpectrogram(
        sample_rate=cfg.sample_rate_hz, n_fft=cfg.n_fft, win_length=cfg.win_length, hop_length=cfg.hop_length,
        n_mels=cfg.n_mels, window_fn=window_fn, power=2.0, center=center, mel_scale="htk",
    )


class LogMel(torch.nn.Module):
    """waveform_T (or batch waveform_BT) -> log-mel (…, F, M)."""

    def __init__(self, cfg: FeatureConfig):
        super().__init__()
        self.cfg = cfg
        self.mel = mel_spectrogram(cfg, center=True)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        mel_MF = self.mel(waveform)
        logmel = torch.log(mel_MF + self.cfg.log_floor)
        return logmel.transpose(-1, -2)


def normalize_utterance(feats_FM: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance per mel bin over the utterance's frames."""
    mean = feats_FM.mean(dim=0, keepdim=True)
    std = feats_FM.std(dim=0, keepdim=True, unbiased=False).clamp_min(1e-5)
    return (feats_FM - mean) / std


def center_pad(samples_T: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """The waveform reflect-padded by n_fft // 2 at both ends, as ``torch.stft(center=True)`` pads one
    utterance; padded rows can then be batched (zero-padded to the longest) and framed with
    center=False without their last frames seeing the batch's zeros."""
    pad = cfg.n_fft // 2
    x = torch.from_numpy(np.ascontiguousarray(samples_T, dtype=np.float32))
    return torch.nn.functional.pad(x[None, None], (pad, pad), mode="reflect")[0, 0].numpy()


class DeviceLogMel(torch.nn.Module):
    """Batched log-mel on the training device: center-padded waveforms (B, T) and their lengths ->
    (features (B, F, M) normalised per utterance over its own frames, frame lengths (B,)); padded
    frames are 0."""

    def __init__(self, cfg: FeatureConfig):
        super().__init__()
        self.cfg = cfg
        self.mel = mel_spectrogram(cfg, center=False)  # the rows come center-padded already

    @torch.no_grad()
    def forward(self, padded_BT: torch.Tensor, lengths_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        frames_B = (lengths_B - self.cfg.n_fft) // self.cfg.hop_length + 1
        feats_BFM = torch.log(self.mel(padded_BT.float()) + self.cfg.log_floor).transpose(1, 2)
        F = feats_BFM.shape[1]
        real_BF1 = (torch.arange(F, device=feats_BFM.device)[None, :] < frames_B[:, None]).unsqueeze(-1)
        if self.cfg.normalize == "utterance":
            n_B11 = frames_B.clamp_min(1).to(feats_BFM.dtype)[:, None, None]
            mean = (feats_BFM * real_BF1).sum(1, keepdim=True) / n_B11
            var = (((feats_BFM - mean) * real_BF1) ** 2).sum(1, keepdim=True) / n_B11
            feats_BFM = (feats_BFM - mean) / var.sqrt().clamp_min(1e-5)
        return feats_BFM * real_BF1, frames_B


class WhisperLogMel(torch.nn.Module):
    """waveform_T -> Whisper's log-mel (F, M), as ``WhisperFeatureExtractor`` computes it: periodic
    Hann window, |STFT|^2 with the last frame dropped, slaney-normalised slaney-scale mel filters up
    to 8 kHz, log10 floored at 1e-10, clamped to (max - 8) and scaled by (x + 4) / 4. A published
    Whisper encoder only works on exactly these numbers; ``pad_to_s`` zero-pads the waveform first
    as the extractor pads to its 30 s chunk."""

    def __init__(self, cfg: FeatureConfig):
        super().__init__()
        self.cfg = cfg
        fbanks_FM = torchaudio.functional.melscale_fbanks(
            n_freqs=cfg.n_fft // 2 + 1, f_min=0.0, f_max=8000.0, n_mels=cfg.n_mels,
            sample_rate=cfg.sample_rate_hz, norm="slaney", mel_scale="slaney")
        self.register_buffer("filters_MF", fbanks_FM.T.contiguous(), persistent=False)
        self.register_buffer("window", torch.hann_window(cfg.n_fft), persistent=False)
        self.pad_samples = round((cfg.pad_to_s or 0.0) * cfg.sample_rate_hz)

    def forward(self, samples_T: torch.Tensor) -> torch.Tensor:
        x_T = samples_T.float()
        if x_T.shape[0] < self.pad_samples:
            x_T = torch.nn.functional.pad(x_T, (0, self.pad_samples - x_T.shape[0]))
        stft = torch.stft(x_T, self.cfg.n_fft, self.cfg.hop_length, window=self.window, return_complex=True)
        power_KF = (stft[..., :-1].abs() ** 2).contiguous()
        log_MF = torch.clamp(self.filters_MF @ power_KF, min=1e-10).log10()
        log_MF = torch.maximum(log_MF, log_MF.max() - 8.0)
        return ((log_MF + 4.0) / 4.0).T.contiguous()


def normalize_waveform(samples_T: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance over the utterance (Wav2Vec2FeatureExtractor's ``do_normalize``,
    with its 1e-7 inside the square root)."""
    x = samples_T.astype(np.float32, copy=False)
    return ((x - x.mean()) / np.sqrt(x.var() + 1e-7)).astype(np.float32)


class FeatureExtractor:
    """waveform (numpy, float32, cfg rate) -> float32 features_FM ready for the model."""

    def __init__(self, cfg: FeatureConfig):
        self.cfg = cfg
        self.logmel = {"log_mel": LogMel, "whisper_log_mel": WhisperLogMel}.get(cfg.kind, lambda _: None)(cfg)

    @torch.no_grad()
    def __call__(self, samples_T: np.ndarray) -> np.ndarray:
        if self.logmel is None:
            if self.cfg.waveform_normalize:
                return normalize_waveform(samples_T)
            return samples_T.astype(np.float32, copy=False)
        feats_FM = self.logmel(torch.from_numpy(samples_T))
        if self.cfg.normalize == "utterance":
            feats_FM = normalize_utterance(feats_FM)
        return feats_FM.numpy()
