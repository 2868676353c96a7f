"""WavLM as published: wav2vec 2.0's CNN on the raw waveform and a Transformer with WavLM's gated
relative position bias, computed exactly as transformers' ``WavLMAttention`` does, so a published
``WavLMModel`` / ``WavLMForCTC`` (microsoft/wavlm-base-plus, -large) loads tensor for tensor and
gives the same numbers (plain torch; no Ray). The seed's recipe (``wavlm.py``) keeps log-mel input.

Shapes: B = batch, S = samples, T = encoder frames (20 ms), D = width, H = heads, E = head width,
N = relative-distance buckets, V = vocabulary.

The position bias: a learned scalar per head and bucket of the relative distance j - i (320
buckets: half per direction, exact up to 80 frames, then log-spaced to 800), held by the first layer
only and shared by all. Every layer gates it per head and query frame from its own input (not from
the queries): ``gate = a * (b * c_h - 1) + 2`` with ``a, b = sigmoid(sum of two halves of
Linear(E -> 8)(x_e))`` and a learned per-head ``c_h``, and adds ``gate * bias`` to the attention
logits. The feature extractor, projection, positional convolution and feed-forward blocks are
wav2vec 2.0's (``wav2vec2_encoder.py``), names and all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from raytrain_speech.config import require
from raytrain_speech.models import wav2vec2_encoder as w2v
from raytrain_speech.models.wav2vec2 import Wav2Vec2CTC


@dataclass
class WavLMWaveformConfig(w2v.Wav2Vec2Config):
    """wav2vec 2.0's fields plus WavLM's relative-position buckets."""

    num_buckets: int = 320
    """Relative-distance buckets (half for each direction)."""
    max_distance: int = 800
    """Distance (frames) where the log-spaced buckets end; farther frames share the last bucket."""

    def validate(self) -> None:
        super().validate()
        require(self.num_buckets >= 4 and self.num_buckets % 2 == 0, "model.overrides.num_buckets",
                "must be even and >= 4")
        require(self.max_distance > self.num_buckets // 4, "model.overrides.max_distance",
                "must exceed num_buckets / 4 (the exact range)")


PRESETS: dict[str, dict] = {
    # wav2vec2's tiny CPU size with WavLM's attention.
    "tiny": {**w2v.PRESETS["tiny"], "finetune_mask_prob": 0.05},
    # microsoft/wavlm-base-plus: Base (post-norm, group-norm CNN without biases), 12 x 768.
    "base_plus": {"layer_drop": 0.05, "finetune_mask_prob": 0.05},
    # microsoft/wavlm-large: 24 x 1024, pre-norm, layer-norm CNN with biases.
    "large": {"extractor_mode": "layer_norm", "conv_bias": True, "d_model": 1024, "num_layers": 24,
              "num_heads": 16, "ffn_dim": 4096, "layer_norm_first": True, "feature_grad_mult": 1.0,
              "layer_drop": 0.05, "finetune_mask_prob": 0.05},
}


def relative_bucket_TS(t: int, num_buckets: int, max_distance: int, device) -> torch.Tensor:
    """transformers' ``WavLMAttention._relative_positions_bucket`` of (key - query) for t frames."""
    rel_TS = torch.arange(t, device=device)[None, :] - torch.arange(t, device=device)[:, None]
    half = num_buckets // 2
    buckets_TS = (rel_TS > 0).long() * half
    dist_TS = rel_TS.abs()
    exact = half // 2
    far_TS = exact + (torch.log(dist_TS.float() / exact) / math.log(max_distance / exact) * (half - exact)).long()
    far_TS = torch.clamp(far_TS, max=half - 1)
    return buckets_TS + torch.where(dist_TS < exact, dist_TS, far_TS)


class GatedRelPosSelfAttention(w2v.SelfAttention):
    """wav2vec 2.0's attention projections + WavLM's gate (and, in the first layer, the bias table)."""

    def __init__(self, cfg: WavLMWaveformConfig, has_bias_table: bool):
        super().__init__(cfg.d_model, cfg.num_heads, cfg.attention_dropout)
        self.gru_rel_pos_const = nn.Parameter(torch.ones(1, cfg.num_heads, 1, 1))
        self.gru_rel_pos_linear = nn.Linear(cfg.d_model // cfg.num_heads, 8)
        self.num_buckets, self.max_distance = cfg.num_buckets, cfg.max_distance
        if has_bias_table:
            self.rel_attn_embed = nn.Embedding(cfg.num_buckets, cfg.num_heads)

    def bias_HTS(self, t: int) -> torch.Tensor:
        buckets_TS = relative_bucket_TS(t, self.num_buckets, self.max_distance, self.rel_attn_embed.weight.device)
        return self.rel_attn_embed(buckets_TS).permute(2, 0, 1)

    def forward(self, x_BTD: torch.Tensor, attend_B11T: torch.Tensor | None,
                bias_HTS: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        H = self.num_heads
        x_BHTE = x_BTD.view(B, T, H, D // H).transpose(1, 2)
        a_BHT1, b_BHT1 = torch.sigmoid(self.gru_rel_pos_linear(x_BHTE).view(B, H, T, 2, 4).sum(-1)).chunk(2, dim=-1)
        gate_BHT1 = a_BHT1 * (b_BHT1 * self.gru_rel_pos_const - 1.0) + 2.0
        mask_BHTS = gate_BHT1 * bias_HTS[None].to(x_BTD.dtype)
        if attend_B11T is not None:
            mask_BHTS = mask_BHTS.masked_fill(~attend_B11T, float("-inf"))

        def heads(t_BTD):
            return t_BTD.view(B, T, H, D // H).transpose(1, 2)

        y_BHTE = F.scaled_dot_product_attention(
            heads(self.q_proj(x_BTD)), heads(self.k_proj(x_BTD)), heads(self.v_proj(x_BTD)),
            attn_mask=mask_BHTS, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(y_BHTE.transpose(1, 2).reshape(B, T, D))


class WavLMLayer(w2v.EncoderLayer):
    def __init__(self, cfg: WavLMWaveformConfig, has_bias_table: bool):
        super().__init__(cfg)
        self.attention = GatedRelPosSelfAttention(cfg, has_bias_table)

    def forward(self, x_BTD, attend_B11T, bias_HTS):
        if self.layer_norm_first:
            x_BTD = x_BTD + self.dropout(self.attention(self.layer_norm(x_BTD), attend_B11T, bias_HTS))
            return x_BTD + self.feed_forward(self.final_layer_norm(x_BTD))
        x_BTD = self.layer_norm(x_BTD + self.dropout(self.attention(x_BTD, attend_B11T, bias_HTS)))
        return self.final_layer_norm(x_BTD + self.feed_forward(x_BTD))


class WavLMTransformer(w2v.Transformer):
    """wav2vec 2.0's Transformer with WavLM layers; LayerDrop never skips the first layer (it owns the
    bias table), as transformers does."""

    def __init__(self, cfg: WavLMWaveformConfig):
        super().__init__(cfg)
        self.layers = nn.ModuleList(WavLMLayer(cfg, has_bias_table=(i == 0)) for i in range(cfg.num_layers))
        for module in self.layers.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                nn.init.zeros_(module.bias)

    def layer_inputs(self, x_BTD: torch.Tensor) -> tuple:
        return (self.layers[0].attention.bias_HTS(x_BTD.shape[1]),)

    def skips(self, i: int) -> bool:
        return i > 0 and super().skips(i)


class WavLMWaveformCTC(Wav2Vec2CTC):
    """WavLM (waveform) encoder + a CTC head: fine-tuning a published WavLM (train.init_from=hf:DIR)."""

    def __init__(self, cfg: WavLMWaveformConfig, vocab_size: int):
        super().__init__(cfg, vocab_size)
        self.encoder.transformer = WavLMTransformer(cfg)
