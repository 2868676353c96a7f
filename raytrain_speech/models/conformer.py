"""Conformer encoder with a CTC head over characters (plain torch; no Ray).

Shapes: B = batch, F = input frames, M = mel bins, T = encoder frames (F/4), D = model width,
V = vocabulary (CTC blank included).

The conformer blocks are torchaudio's reference implementation, so this module only owns the
convolutional subsampling, the output head, and the length bookkeeping.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torchaudio
from torch import nn

from raytrain_speech.configlib import require
from raytrain_speech.data.batching import Batch


@dataclass
class ConformerCTCConfig:
    """Conformer-CTC size and regularisation."""

    n_mels: int = 80
    """Input feature bins (must match features.n_mels)."""
    subsampling_channels: int = 64
    """Channels of the two stride-2 3x3 convolutions (4x time reduction)."""
    d_model: int = 144
    """Encoder width."""
    num_layers: int = 4
    """Conformer blocks."""
    num_heads: int = 4
    """Self-attention heads."""
    ffn_dim: int = 576
    """Feed-forward hidden width."""
    conv_kernel_size: int = 15
    """Depthwise convolution kernel in each block."""
    dropout: float = 0.1
    """Dropout inside the blocks."""

    def validate(self) -> None:
        require(self.d_model % self.num_heads == 0, "model.overrides.d_model",
                f"must be divisible by num_heads ({self.num_heads})")
        require(self.conv_kernel_size % 2 == 1, "model.overrides.conv_kernel_size", "must be odd")


PRESETS: dict[str, dict] = {
    # 2.15M parameters: the size calibrated for the 2-core CPU demo.
    "tiny": {},
    # A 10M-parameter variant for a single GPU.
    "small": {"d_model": 256, "num_layers": 8, "ffn_dim": 1024, "conv_kernel_size": 31},
}


class Conv2dSubsampling(nn.Module):
    """Two stride-2 3x3 convs: (B, F, M) -> (B, F/4, D)."""

    def __init__(self, n_mels: int, channels: int, d_model: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, channels, 3, stride=2), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, stride=2), nn.ReLU(),
        )
        freq_out = ((n_mels - 1) // 2 - 1) // 2
        self.proj = nn.Linear(channels * freq_out, d_model)

    @staticmethod
    def output_lengths(lengths_B: torch.Tensor) -> torch.Tensor:
        return ((lengths_B - 1) // 2 - 1) // 2

    def forward(self, x_BFM: torch.Tensor, lengths_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.conv(x_BFM.unsqueeze(1))  # B, C, T, M'
        b, c, t, m = h.shape
        h_BTD = self.proj(h.permute(0, 2, 1, 3).reshape(b, t, c * m))
        return h_BTD, self.output_lengths(lengths_B).clamp(min=1, max=t)


class ConformerCTC(nn.Module):
    """log-mel -> conformer -> per-frame log-probabilities over characters + blank."""

    def __init__(self, cfg: ConformerCTCConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.subsampling = Conv2dSubsampling(cfg.n_mels, cfg.subsampling_channels, cfg.d_model)
        self.encoder = torchaudio.models.Conformer(
            input_dim=cfg.d_model, num_heads=cfg.num_heads, ffn_dim=cfg.ffn_dim,
            num_layers=cfg.num_layers, depthwise_conv_kernel_size=cfg.conv_kernel_size,
            dropout=cfg.dropout,
        )
        self.head = nn.Linear(cfg.d_model, vocab_size)

    def output_lengths(self, lengths_B: torch.Tensor) -> torch.Tensor:
        return self.subsampling.output_lengths(lengths_B).clamp(min=1)

    def encode(self, features_BFM: torch.Tensor, lengths_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(encoder states h_BTD, their lengths): shared by the CTC head and the attention decoder."""
        h_BTD, out_lengths_B = self.subsampling(features_BFM, lengths_B)
        return self.encoder(h_BTD, out_lengths_B)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        h_BTD, out_lengths_B = self.encode(batch.features_BFM, batch.feature_lengths_B)
        logits_BTV = self.head(h_BTD)
        return {"log_probs_BTV": logits_BTV.float().log_softmax(dim=-1), "lengths_B": out_lengths_B}
