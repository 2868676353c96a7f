"""WavLM-style masked speech modelling on log-mel input, and the CTC model that fine-tunes its encoder.

Shapes: B = batch, F = input log-mel frames (10 ms), M = mel bins, T = encoder frames (40 ms, F // 4),
D = model width, H = heads, K = head width (D / H), C = conv channels, P = predicted values per
encoder frame (4 * M = 320), V = vocabulary (CTC blank included).

What follows WavLM (Chen et al. 2022) and what does not:

- Encoder: Transformer with WavLM's gated relative position bias: one learned scalar bias per head
  and relative-distance bucket (320 buckets, log-spaced up to 800 frames, shared by all layers) that
  each layer scales by a gate computed from its own queries, so a frame can decide how much it cares
  about position (see ``GatedRelativeAttention``). A grouped convolutional position embedding
  (wav2vec 2.0 / WavLM ``pos_conv``) comes before the stack. Pre-LN (``layer_norm_first``, WavLM
  Large) or post-LN (WavLM Base+) blocks.
- Feature encoder: WavLM's is a CNN over the waveform (20 ms frames). The recipe (seed 004) feeds
  80-bin log-mel (25 ms window, 10 ms hop, per-segment zero-mean unit-variance), so ours is a 2-D
  conv subsampler over log-mel: two convolutions of time kernel 2 / stride 2 -> 4x time reduction,
  40 ms encoder frames. The time kernel equals the stride on purpose: encoder frame t sees exactly
  input frames 4t..4t+3 and nothing else, so an unmasked neighbour cannot leak the log-mel of a
  masked frame (overlapping 3x3 stride-2 convs would hand 3 of its 4 frames to frame t-1).
  Temporal context comes from the position convolution and attention, after masking.
- Prediction target: WavLM predicts HuBERT k-means cluster ids, which needs an offline clustering
  pass. The recipe says "reconstruct", so we reconstruct: for each masked encoder frame the head
  predicts the 4 x 80 = 320 normalised log-mel values it covers, taken from the UNMASKED input.
  Masked positions are replaced by a learned mask embedding after the conv encoder. Loss: L1 per
  value, averaged over the 320 values of a frame (objectives/masked.py). L1 rather than MSE because
  normalised log-mel has heavy tails (the log floor in silence, onsets) that would dominate a
  squared error, and its gradient has a fixed scale, which keeps early bf16 steps tame; L1 is also
  the usual choice for masked log-mel reconstruction (Mockingjay, TERA).
- Masking: spans of ``mask_span_frames`` = 10 encoder frames (400 ms) start at each frame with
  probability ``mask_prob`` = 0.15 (``data.augment.frame_span_mask``, wav2vec 2.0's scheme; spans may
  overlap). A frame away from the edges stays unmasked only if none of the 10 starts that would
  cover it fired: coverage = 1 - (1 - 0.15)^10 = 80.3%, the recipe's 80% (``expected_mask_coverage`` gives
  the exact figure with the edges: 79.0% on a 16 s segment of 400 encoder frames, 75.1% on 4 s).
- Not reproduced: WavLM's utterance-mixing denoising augmentation and layer drop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from raytrain_speech.batch import Batch
from raytrain_speech.config import require
from raytrain_speech.models.base import SpanMasking, SpeechModel, strip_wrapper_prefixes
from raytrain_speech.models.layers import padding_mask, stacked_targets
from raytrain_speech.models.masking import model_span_mask

SUBSAMPLING = 4
"""Input frames per encoder frame (two stride-2 convolutions)."""


@dataclass
class WavLMConfig:
    """WavLM encoder size, position bias, masking and target (defaults = the tiny CPU preset)."""

    n_mels: int = 80
    """Input feature bins (must match features.n_mels)."""
    conv_channels: int = 32
    """Channels of the two conv layers of the log-mel feature encoder (4x time reduction, 40 ms frames)."""
    d_model: int = 144
    """Transformer width."""
    num_layers: int = 4
    """Transformer blocks."""
    num_heads: int = 4
    """Attention heads."""
    ffn_dim: int = 576
    """Feed-forward hidden width."""
    dropout: float = 0.1
    """Dropout on features, attention weights, and block outputs."""
    layer_norm_first: bool = True
    """Pre-LN blocks plus a final LayerNorm (WavLM Large); False = post-LN (WavLM Base+)."""
    pos_conv_kernel: int = 16
    """Kernel of the grouped convolutional position embedding, in encoder frames (0 = none)."""
    pos_conv_groups: int = 16
    """Groups of that convolution (WavLM: 16)."""
    num_buckets: int = 320
    """Relative-position buckets of the attention bias (WavLM: 320; half per direction)."""
    max_distance_frames: int = 800
    """Relative distance at which the log-spaced buckets saturate, in encoder frames (WavLM: 800)."""
    gated_position_bias: bool = True
    """Scale the relative position bias by a gate computed from each query (WavLM's gru_rel_pos)."""
    mask_prob: float = 0.15
    """Probability that a masked span starts at each encoder frame: 1 - 0.85^10 = 80.3% coverage."""
    mask_span_frames: int = 10
    """Masked span length in encoder frames (10 = 400 ms)."""
    min_masks: int = 2
    """Spans every utterance gets at least (so no row contributes nothing to the loss)."""
    target_kind: Literal["log_mel", "log_mel_renorm"] = "log_mel"
    """Reconstruction target per masked encoder frame: the 4 x n_mels input values as given
    (already per-segment normalised by the feature pipeline), or re-normalised per utterance and
    mel bin inside the model (for features.normalize = none)."""

    def validate(self) -> None:
        require(self.d_model % self.num_heads == 0, "model.overrides.d_model",
                f"must be divisible by num_heads ({self.num_heads})")
        require(self.pos_conv_kernel >= 0, "model.overrides.pos_conv_kernel", "must be >= 0")
        require(self.pos_conv_kernel == 0 or self.d_model % self.pos_conv_groups == 0,
                "model.overrides.pos_conv_groups", f"must divide d_model ({self.d_model})")
        require(self.num_buckets >= 8 and self.num_buckets % 4 == 0, "model.overrides.num_buckets",
                "must be a multiple of 4, at least 8 (half per direction, half of those exact)")
        require(self.max_distance_frames > self.num_buckets // 4, "model.overrides.max_distance_frames",
                f"must exceed num_buckets / 4 ({self.num_buckets // 4}), where the exact buckets end")
        require(0.0 < self.mask_prob < 1.0, "model.overrides.mask_prob", "must be in (0, 1)")
        require(self.mask_span_frames >= 1, "model.overrides.mask_span_frames", "must be >= 1")
        require(self.min_masks >= 0, "model.overrides.min_masks", "must be >= 0")
        require(0.0 <= self.dropout < 1.0, "model.overrides.dropout", "must be in [0, 1)")


PRESETS: dict[str, dict] = {
    # 1,172,104 parameters (WavLMPretraining; WavLMCTC with 29 symbols: 1,129,765): the 2-core CPU demo.
    "tiny": {},
    # WavLM Base+ shape (12 x 768, post-LN): 94,470,632 parameters (WavLM Base+: 94.7M); the conv
    # feature encoder's 384 channels bring it to that size.
    "base_plus": {"conv_channels": 384, "d_model": 768, "num_layers": 12, "num_heads": 12, "ffn_dim": 3072,
                  "layer_norm_first": False, "pos_conv_kernel": 64, "dropout": 0.1},
    # The recipe's 600M "WavLM-Large+": 599,561,084 parameters (-0.07%). The write-up attributes the
    # growth over WavLM Large (24 x 1024, 316M) to "deeper transformer blocks and larger embedding
    # dimensions within the feature encoder", so we keep Large's width, heads and FFN (1024 / 16 /
    # 4096, head width 64, which the fused attention kernels like), almost double the depth to 46
    # blocks (12.6M each), and widen the feature encoder to 640 channels (15.6M); 48 blocks alone
    # would be 604.6M before the front end, over the 1% tolerance. Pre-LN, as in WavLM Large, is
    # what keeps 46 blocks stable. pos_conv_kernel 64 x 40 ms = WavLM's 128 x 20 ms (2.56 s).
    "large_plus": {"conv_channels": 640, "d_model": 1024, "num_layers": 46, "num_heads": 16, "ffn_dim": 4096,
                   "layer_norm_first": True, "pos_conv_kernel": 64, "dropout": 0.1},
}


def expected_mask_coverage(prob: float, span_frames: int, num_frames: int) -> float:
    """Expected fraction of ``num_frames`` masked by ``frame_span_mask`` (ignoring the min_masks floor).

    Starts are drawn independently at the ``num_frames - span + 1`` positions where a whole span
    fits; frame k is masked unless every start that covers it stays off.
    """
    span = min(span_frames, num_frames)
    n_starts = num_frames - span + 1
    covered = 0.0
    for k in range(num_frames):
        starts_covering = min(k, n_starts - 1) - max(0, k - span + 1) + 1
        covered += 1.0 - (1.0 - prob) ** starts_covering
    return covered / num_frames


def relative_position_bucket(relative_TS: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bucket of each signed offset (key - query): half the buckets per direction; within a direction,
    half are exact offsets and the rest log-spaced up to ``max_distance`` (T5 / WavLM eq. 5)."""
    per_side = num_buckets // 2
    exact = per_side // 2
    bucket = (relative_TS > 0).long() * per_side
    distance = relative_TS.abs()
    log_ratio = torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    far = (exact + (log_ratio * (per_side - exact)).long()).clamp(max=per_side - 1)
    return bucket + torch.where(distance < exact, distance, far)


class LogMelConvEncoder(nn.Module):
    """(B, F, M) log-mel -> (B, F // 4, D): two GELU convs, time kernel = stride = 2 (see module docstring)."""

    def __init__(self, n_mels: int, channels: int, d_model: int, dropout: float):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, channels, kernel_size=(2, 3), stride=2, padding=(0, 1)), nn.GELU(),
            nn.Conv2d(channels, channels, kernel_size=(2, 3), stride=2, padding=(0, 1)), nn.GELU(),
        )
        freq_out = (((n_mels - 1) // 2 + 1) - 1) // 2 + 1
        self.norm = nn.LayerNorm(channels * freq_out)
        self.proj = nn.Linear(channels * freq_out, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x_BFM: torch.Tensor) -> torch.Tensor:
        h_BCTM = self.conv(x_BFM.unsqueeze(1))
        b, c, t, m = h_BCTM.shape
        return self.drop(self.proj(self.norm(h_BCTM.permute(0, 2, 1, 3).reshape(b, t, c * m))))


class ConvPositionEmbedding(nn.Module):
    """Grouped 1-D convolution over time added to the features (wav2vec 2.0 / WavLM ``pos_conv``).

    Plain (not weight-normalised) so the module builds on the meta device without a data-dependent
    initialisation; an even kernel drops its last output frame to stay aligned ("same" padding).
    """

    def __init__(self, d_model: int, kernel: int, groups: int):
        super().__init__()
        self.conv = nn.Conv1d(d_model, d_model, kernel, padding=kernel // 2, groups=groups)
        self.trim = 1 if kernel % 2 == 0 else 0

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        h_BDT = self.conv(x_BTD.transpose(1, 2))
        if self.trim:
            h_BDT = h_BDT[:, :, :-self.trim]
        return F.gelu(h_BDT).transpose(1, 2)


class GatedRelativeAttention(nn.Module):
    """Self-attention whose additive bias is the shared relative position bias, gated per query.

    WavLM's gate (paper, section "Gated Relative Position Bias"): from query q_i of head h,
    g_update = sigmoid(q_i . u), g_reset = sigmoid(q_i . w), and the bias for offset j - i becomes
    d + g_update * d + (1 - g_update) * s * g_reset * d, with d the bucket's learned scalar and s a
    learned per-head scale (initialised to 1). For s >= 0 the bias is thus between 1 and
    max(2, 1 + s) times d, the multiple chosen by the content of the query (a frame in a vowel can
    attend more locally than one in silence). u and w are shared by all heads (one K -> 2
    projection); the gate reads the projected per-head query, the paper's q_i.
    """

    def __init__(self, d_model: int, num_heads: int, dropout: float, gated: bool):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.gate = nn.Linear(d_model // num_heads, 2) if gated else None
        self.gate_scale_H = nn.Parameter(torch.ones(num_heads)) if gated else None

    def gated_bias(self, q_BHTK: torch.Tensor, bias_HTS: torch.Tensor) -> torch.Tensor:
        """(B, H, T, S) position bias for these queries; without a gate, the shared bias broadcast."""
        if self.gate is None:
            return bias_HTS.unsqueeze(0).expand(q_BHTK.shape[0], -1, -1, -1)
        update_BHT1, reset_BHT1 = torch.sigmoid(self.gate(q_BHTK)).float().chunk(2, dim=-1)
        scale_1H11 = self.gate_scale_H.float().view(1, -1, 1, 1)
        factor_BHT1 = 1.0 + update_BHT1 + (1.0 - update_BHT1) * scale_1H11 * reset_BHT1
        return factor_BHT1 * bias_HTS.float().unsqueeze(0)

    def forward(self, x_BTD: torch.Tensor, bias_HTS: torch.Tensor, pad_BT: torch.Tensor) -> torch.Tensor:
        b, t, d = x_BTD.shape
        q_BHTK, k_BHTK, v_BHTK = self.qkv(x_BTD).view(b, t, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        bias_BHTS = self.gated_bias(q_BHTK, bias_HTS)
        bias_BHTS = bias_BHTS.masked_fill(pad_BT[:, None, None, :], float("-inf")).to(q_BHTK.dtype)
        y_BHTK = F.scaled_dot_product_attention(q_BHTK, k_BHTK, v_BHTK, attn_mask=bias_BHTS,
                                                dropout_p=self.dropout if self.training else 0.0)
        return self.out(y_BHTK.transpose(1, 2).reshape(b, t, d))


class WavLMLayer(nn.Module):
    """Attention + feed-forward block, pre-LN or post-LN."""

    def __init__(self, cfg: WavLMConfig):
        super().__init__()
        self.pre_norm = cfg.layer_norm_first
        self.attn = GatedRelativeAttention(cfg.d_model, cfg.num_heads, cfg.dropout, cfg.gated_position_bias)
        self.attn_norm = nn.LayerNorm(cfg.d_model)
        self.ffn = nn.Sequential(nn.Linear(cfg.d_model, cfg.ffn_dim), nn.GELU(), nn.Dropout(cfg.dropout),
                                 nn.Linear(cfg.ffn_dim, cfg.d_model))
        self.ffn_norm = nn.LayerNorm(cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x_BTD: torch.Tensor, bias_HTS: torch.Tensor, pad_BT: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:
            x_BTD = x_BTD + self.drop(self.attn(self.attn_norm(x_BTD), bias_HTS, pad_BT))
            return x_BTD + self.drop(self.ffn(self.ffn_norm(x_BTD)))
        x_BTD = self.attn_norm(x_BTD + self.drop(self.attn(x_BTD, bias_HTS, pad_BT)))
        return self.ffn_norm(x_BTD + self.drop(self.ffn(x_BTD)))


class WavLMEncoder(nn.Module):
    """log-mel -> contextual frames, in two halves so the pretraining model can mask in between:
    ``embed`` (conv feature encoder, 40 ms frames) and ``contextualize`` (position conv + Transformer)."""

    def __init__(self, cfg: WavLMConfig):
        super().__init__()
        self.cfg = cfg
        self.feature_encoder = LogMelConvEncoder(cfg.n_mels, cfg.conv_channels, cfg.d_model, cfg.dropout)
        self.pos_conv = (ConvPositionEmbedding(cfg.d_model, cfg.pos_conv_kernel, cfg.pos_conv_groups)
                         if cfg.pos_conv_kernel else None)
        self.rel_bias = nn.Embedding(cfg.num_buckets, cfg.num_heads)
        self.layers = nn.ModuleList(WavLMLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    @staticmethod
    def output_lengths(lengths_B: torch.Tensor) -> torch.Tensor:
        return (lengths_B // SUBSAMPLING).clamp(min=1)

    def embed(self, features_BFM: torch.Tensor, lengths_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(frame embeddings x_BTD, encoder lengths_B)."""
        x_BTD = self.feature_encoder(features_BFM)
        return x_BTD, self.output_lengths(lengths_B).clamp(max=x_BTD.shape[1])

    def position_bias(self, t: int, device: torch.device) -> torch.Tensor:
        """Learned scalar per head and relative-offset bucket: (H, T, T), shared by every layer."""
        pos_T = torch.arange(t, device=device)
        bucket_TS = relative_position_bucket(pos_T[None, :] - pos_T[:, None], self.cfg.num_buckets,
                                             self.cfg.max_distance_frames)
        return self.rel_bias(bucket_TS).permute(2, 0, 1)

    def contextualize(self, x_BTD: torch.Tensor, lengths_B: torch.Tensor) -> torch.Tensor:
        pad_BT = padding_mask(lengths_B, x_BTD.shape[1])
        x_BTD = x_BTD.masked_fill(pad_BT[..., None], 0.0)  # padding must not leak in through pos_conv
        if self.pos_conv is not None:
            x_BTD = x_BTD + self.pos_conv(x_BTD)
        if not self.cfg.layer_norm_first:
            x_BTD = self.norm(x_BTD)
        x_BTD = self.drop(x_BTD)
        bias_HTS = self.position_bias(x_BTD.shape[1], x_BTD.device)
        for layer in self.layers:
            x_BTD = layer(x_BTD, bias_HTS, pad_BT)
        return self.norm(x_BTD) if self.cfg.layer_norm_first else x_BTD

    def forward(self, features_BFM: torch.Tensor, lengths_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_BTD, out_lengths_B = self.embed(features_BFM, lengths_B)
        return self.contextualize(x_BTD, out_lengths_B), out_lengths_B


def _fit_mask(mask_BT: torch.Tensor, t: int) -> torch.Tensor:
    """The loop's mask over ``output_lengths`` frames, cut or padded (unmasked) to the encoder's T."""
    if mask_BT.shape[1] >= t:
        return mask_BT[:, :t]
    return F.pad(mask_BT, (0, t - mask_BT.shape[1]), value=False)


class WavLMPretraining(SpeechModel):
    """Masked log-mel reconstruction: embed, replace masked frames by a learned vector, contextualize,
    predict the 4 x n_mels normalised log-mel values under every encoder frame (the objective keeps
    the masked ones). ``vocab_size`` is unused (no text output)."""

    def __init__(self, cfg: WavLMConfig, vocab_size: int = 0):
        super().__init__()
        self.cfg = cfg
        self.encoder = WavLMEncoder(cfg)
        self.mask_emb = nn.Parameter(torch.empty(cfg.d_model).uniform_())
        self.head = nn.Linear(cfg.d_model, SUBSAMPLING * cfg.n_mels)

    @property
    def span_masking(self) -> SpanMasking:
        return SpanMasking(self.cfg.mask_prob, self.cfg.mask_span_frames, self.cfg.min_masks)

    def output_lengths(self, lengths_B: torch.Tensor) -> torch.Tensor:
        return self.encoder.output_lengths(lengths_B)

    def encode(self, features_BFM: torch.Tensor, lengths_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(features_BFM, lengths_B)

    def encoder_blocks(self) -> tuple[nn.ModuleList, bool]:
        return self.encoder.layers, False

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """pred_BTP / target_BTP (float32), mask_BT (masked AND valid), lengths_B (encoder frames)."""
        x_BTD, lengths_B = self.encoder.embed(batch.features_BFM, batch.feature_lengths_B)
        t = x_BTD.shape[1]
        mask_BT = batch.mask_BT
        if mask_BT is None:  # unit tests and validation: the loop's draw, at seed 0 / epoch 0
            mask_BT = model_span_mask(self, batch)
        mask_BT = _fit_mask(mask_BT.to(x_BTD.device), t) & ~padding_mask(lengths_B, t)
        x_BTD = torch.where(mask_BT[..., None], self.mask_emb.to(x_BTD.dtype), x_BTD)
        h_BTD = self.encoder.contextualize(x_BTD, lengths_B)
        return {
            "pred_BTP": self.head(h_BTD).float(),
            "target_BTP": stacked_targets(batch.features_BFM, batch.feature_lengths_B, t, SUBSAMPLING,
                                          self.cfg.target_kind == "log_mel_renorm"),
            "mask_BT": mask_BT,
            "lengths_B": lengths_B,
        }


class WavLMCTC(SpeechModel):
    """The WavLM encoder with a CTC head over characters: the fine-tuning model of the recipe."""

    has_feature_encoder = True

    def __init__(self, cfg: WavLMConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.encoder = WavLMEncoder(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.d_model, vocab_size)

    def output_lengths(self, lengths_B: torch.Tensor) -> torch.Tensor:
        return self.encoder.output_lengths(lengths_B)

    def encode(self, features_BFM: torch.Tensor, lengths_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(features_BFM, lengths_B)

    def encoder_blocks(self) -> tuple[nn.ModuleList, bool]:
        return self.encoder.layers, False

    def feature_encoder_parameters(self) -> list[nn.Parameter]:
        """The conv feature encoder: what train.freeze_feature_encoder_steps holds fixed while fine-tuning."""
        return list(self.encoder.feature_encoder.parameters())

    def load_pretrained(self, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
        """Copy the ``encoder.*`` weights of a WavLMPretraining state dict. The mask embedding and the
        reconstruction head are pretraining-only and are dropped. Returns (missing, unexpected) encoder keys."""
        prefix = "encoder."
        encoder_state = {}
        for key, value in state.items():
            key = strip_wrapper_prefixes(key)
            if key.startswith(prefix):
                encoder_state[key[len(prefix):]] = value
        result = self.encoder.load_state_dict(encoder_state, strict=False)
        return list(result.missing_keys), list(result.unexpected_keys)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        h_BTD, lengths_B = self.encoder(batch.features_BFM, batch.feature_lengths_B)
        logits_BTV = self.head(self.drop(h_BTD))
        return {"log_probs_BTV": logits_BTV.float().log_softmax(dim=-1), "lengths_B": lengths_B}
