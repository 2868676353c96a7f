"""Conformer encoder with a CTC head over characters (plain torch; no Ray).

Shapes: B = batch, F = input frames, M = mel bins, T = encoder frames (F/4), D = model width,
V = vocabulary (CTC blank included).

The conformer blocks are ours (conformer_blocks.py: relative positional self-attention as in the
paper, torchaudio's parameter names), so this module only owns the convolutional subsampling, the
output head, and the length bookkeeping.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from raytrain_speech.batch import BLANK_ID, Batch
from raytrain_speech.config import require
from raytrain_speech.models.base import Seq2SeqModel, SpanMasking, SpeechModel
from raytrain_speech.models.conformer_blocks import ATTENTION_CHOICES, Conformer
from raytrain_speech.models.layers import TransformerDecoder, padding_mask, stacked_targets, teacher_forcing
from raytrain_speech.models.masking import model_span_mask

SUBSAMPLING = 4
"""Input log-mel frames per encoder frame (two stride-2 convolutions)."""


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
    attention: str = "rel_pos"
    """Self-attention: rel_pos = Transformer-XL relative positional MHSA as in the Conformer paper, ESPnet
    and NeMo (adds linear_pos, pos_bias_u, pos_bias_v per block); none = torchaudio's position-free
    attention and its convolution over padded frames, kept so checkpoints from before rel_pos load and
    compute exactly what they did."""

    def validate(self) -> None:
        require(self.d_model % self.num_heads == 0, "model.overrides.d_model",
                f"must be divisible by num_heads ({self.num_heads})")
        require(self.attention in ATTENTION_CHOICES, "model.overrides.attention",
                f"{self.attention!r}: choose one of {', '.join(ATTENTION_CHOICES)}")
        require(self.conv_kernel_size % 2 == 1, "model.overrides.conv_kernel_size", "must be odd")


def checkpoint_attention(state_keys: Iterable[str]) -> str:
    """The ``attention`` a Conformer-family state dict was trained with. Configs saved before the field
    existed do not name it and would now resolve to rel_pos; their weights (no position biases) say none."""
    return "rel_pos" if any(k.endswith("self_attn.pos_bias_u") for k in state_keys) else "none"


PRESETS: dict[str, dict] = {
    # 2.23M parameters (2.15M with attention=none): the size calibrated for the 2-core CPU demo.
    "tiny": {},
    # A 13M-parameter variant for a single GPU.
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


class ConformerCTC(SpeechModel):
    """log-mel -> conformer -> per-frame log-probabilities over characters + blank."""

    def __init__(self, cfg: ConformerCTCConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.subsampling = Conv2dSubsampling(cfg.n_mels, cfg.subsampling_channels, cfg.d_model)
        self.encoder = Conformer(
            input_dim=cfg.d_model, num_heads=cfg.num_heads, ffn_dim=cfg.ffn_dim,
            num_layers=cfg.num_layers, depthwise_conv_kernel_size=cfg.conv_kernel_size,
            dropout=cfg.dropout, attention=cfg.attention, mask_conv_padding=cfg.attention != "none",
        )
        self.head = nn.Linear(cfg.d_model, vocab_size)

    def output_lengths(self, lengths_B: torch.Tensor) -> torch.Tensor:
        return self.subsampling.output_lengths(lengths_B).clamp(min=1)

    def encode(self, features_BFM: torch.Tensor, lengths_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(encoder states h_BTD, their lengths): shared by the CTC head and the attention decoder."""
        h_BTD, out_lengths_B = self.subsampling(features_BFM, lengths_B)
        return self.encoder(h_BTD, out_lengths_B)

    def encoder_blocks(self) -> tuple[nn.ModuleList, bool]:
        return self.encoder.conformer_layers, False  # ours are batch-first (torchaudio's were time-first)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        h_BTD, out_lengths_B = self.encode(batch.features_BFM, batch.feature_lengths_B)
        logits_BTV = self.head(h_BTD)
        return {"log_probs_BTV": logits_BTV.float().log_softmax(dim=-1), "lengths_B": out_lengths_B}


@dataclass
class ConformerAEDConfig(ConformerCTCConfig):
    """Conformer encoder + Transformer decoder trained with the hybrid CTC/attention loss."""

    decoder_layers: int = 2
    """Transformer decoder blocks."""
    decoder_ffn_dim: int = 576
    """Decoder feed-forward width."""
    max_target_positions: int = 512
    """Longest decoder input (prompt + characters)."""
    ctc_weight: float = 0.3
    """Share of the CTC loss in the hybrid loss (ESPnet's 0.3); the attention loss gets the rest."""

    def validate(self) -> None:
        super().validate()
        require(0.0 <= self.ctc_weight <= 1.0, "model.overrides.ctc_weight", "must be in [0, 1]")
        require(self.decoder_layers >= 1, "model.overrides.decoder_layers", "must be >= 1")


AED_PRESETS: dict[str, dict] = {
    "tiny": {},
    # Conformer-L of Gulati et al. (17 x 512, 8 heads, kernel 32 -> 31: kernels must be odd here) with
    # ESPnet's 6-layer decoder: 140.4 M parameters with a 512-channel subsampling (135.9 M with
    # attention=none; Conformer-L alone is 118.8 M in the paper; the write-up's 1.9/4.2 WER are
    # Conformer-L numbers).
    "large": {"subsampling_channels": 512, "d_model": 512, "num_layers": 17, "num_heads": 8, "ffn_dim": 2048,
              "conv_kernel_size": 31, "decoder_layers": 6, "decoder_ffn_dim": 2048},
}


class ConformerAED(ConformerCTC, Seq2SeqModel):
    """ConformerCTC plus an attention decoder over the same characters (ids: chars, then eot, sot).

    The CTC head (``head``) and the encoder keep ConformerCTC's parameter names, so a ConformerCTC or
    ConformerMLM checkpoint initialises this model by name (train.init_from).
    """

    def __init__(self, cfg: ConformerAEDConfig, vocab_size: int):
        super().__init__(cfg, vocab_size)
        self.eot_id, self.sot_id = vocab_size, vocab_size + 1
        self.decoder = TransformerDecoder(vocab_size + 2, cfg.d_model, cfg.num_heads, cfg.decoder_ffn_dim,
                                          cfg.decoder_layers, cfg.max_target_positions, cfg.dropout)

    def _prefix(self, batch_size: int, device: torch.device) -> torch.Tensor:
        return torch.full((batch_size, 1), self.sot_id, dtype=torch.int64, device=device)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        h_BTD, lengths_B = self.encode(batch.features_BFM, batch.feature_lengths_B)
        dec_in_BL, dec_out_BL = teacher_forcing(batch.targets_BL, batch.target_lengths_B,
                                                self._prefix(h_BTD.shape[0], h_BTD.device), self.eot_id, self.eot_id)
        return {"log_probs_BTV": self.head(h_BTD).float().log_softmax(dim=-1), "lengths_B": lengths_B,
                "logits_BLV": self.decoder(dec_in_BL, h_BTD, lengths_B), "decoder_targets_BL": dec_out_BL}

    @torch.no_grad()
    def decoding_inputs(self, batch: Batch) -> dict:
        """Keyword arguments of TransformerDecoder.greedy / evaluate.beam.attention_beam_search."""
        h_BTD, lengths_B = self.encode(batch.features_BFM, batch.feature_lengths_B)
        allowed_V = torch.ones(self.eot_id + 2, dtype=torch.bool, device=h_BTD.device)
        allowed_V[[BLANK_ID, self.sot_id]] = False
        return {"memory_BSD": h_BTD, "memory_lengths_B": lengths_B, "eot_id": self.eot_id, "allowed_V": allowed_V,
                "prefix_BP": self._prefix(h_BTD.shape[0], h_BTD.device), "max_len": self.cfg.max_target_positions - 1}

    @torch.no_grad()
    def transcribe(self, batch: Batch, max_len: int | None = None) -> list[list[int]]:
        """Attention-decoder greedy search (character ids; blank, eot and sot never emitted)."""
        return super().transcribe(batch, max_len)


@dataclass
class ConformerMLMConfig(ConformerCTCConfig):
    """Conformer encoder pretrained by masked log-mel reconstruction (the SSL stage of conformer_aed)."""

    mask_prob: float = 0.15
    """Span start probability per encoder frame (with 10-frame spans: 1 - 0.85^10 = 80% coverage)."""
    mask_span_frames: int = 10
    """Span length in encoder frames (40 ms each)."""
    min_masks: int = 2
    """Spans every utterance gets at least."""

    def validate(self) -> None:
        super().validate()
        require(0.0 < self.mask_prob < 1.0, "model.overrides.mask_prob", "must be in (0, 1)")
        require(self.mask_span_frames >= 1, "model.overrides.mask_span_frames", "must be >= 1")


MLM_PRESETS: dict[str, dict] = {
    "tiny": {},
    "large": {k: v for k, v in AED_PRESETS["large"].items() if not k.startswith("decoder")},
}


class ConformerMLM(ConformerCTC):
    """Masked reconstruction with the Conformer encoder (WavLM's target, objectives/masked.py).

    The 3x3 subsampling convs overlap, so a masked encoder frame's input would leak through its
    neighbours; the input log-mel under every masked frame is zeroed as well as the frame being
    replaced by the mask embedding. ``head`` predicts the 4 x n_mels values under each frame.
    """

    def __init__(self, cfg: ConformerMLMConfig, vocab_size: int = 0):
        super().__init__(cfg, vocab_size=SUBSAMPLING * cfg.n_mels)
        self.mask_emb = nn.Parameter(torch.empty(cfg.d_model).uniform_())

    @property
    def span_masking(self) -> SpanMasking:
        return SpanMasking(self.cfg.mask_prob, self.cfg.mask_span_frames, self.cfg.min_masks)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        x_BFM, lengths_B = batch.features_BFM, batch.feature_lengths_B
        t_lengths_B = self.output_lengths(lengths_B)
        mask_BT = batch.mask_BT
        if mask_BT is None:
            mask_BT = model_span_mask(self, batch)
        mask_BT = mask_BT.to(x_BFM.device)
        in_mask_BF = mask_BT.repeat_interleave(SUBSAMPLING, dim=1)[:, : x_BFM.shape[1]]
        in_mask_BF = F.pad(in_mask_BF, (0, x_BFM.shape[1] - in_mask_BF.shape[1]))
        h_BTD, _ = self.subsampling(x_BFM.masked_fill(in_mask_BF[..., None], 0.0), lengths_B)
        t = h_BTD.shape[1]
        mask_BT = F.pad(mask_BT, (0, max(0, t - mask_BT.shape[1])))[:, :t] & ~padding_mask(t_lengths_B, t)
        h_BTD = torch.where(mask_BT[..., None], self.mask_emb.to(h_BTD.dtype), h_BTD)
        h_BTD, _ = self.encoder(h_BTD, t_lengths_B.clamp(max=t))
        return {"pred_BTP": self.head(h_BTD).float(), "mask_BT": mask_BT, "lengths_B": t_lengths_B,
                "target_BTP": stacked_targets(x_BFM, lengths_B, t, SUBSAMPLING, renorm=False)}
