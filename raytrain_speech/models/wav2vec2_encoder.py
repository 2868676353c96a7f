"""wav2vec 2.0: convolutional feature encoder + Transformer context network, pretrained contrastively
against Gumbel-softmax product-quantized targets, then fine-tuned with CTC (plain torch; no Ray).
This module: the config, presets and the encoder shared by pretraining and fine-tuning;
``wav2vec2.py`` adds the quantizer and the two models.

Shapes: B = batch, S = waveform samples (16 kHz), C = feature-encoder channels, T = encoder frames
(20 ms with the standard strides), D = Transformer width, N = masked frames in the batch,
K = negatives per masked frame, F = final (contrastive) dimension, G = codebook groups,
V = entries per group, Q = codevector width (G x Q/G), H = heads, E = head width, L = layers.

Module and parameter names follow ``torchaudio.models.wav2vec2_model`` (itself a port of fairseq),
so a torchaudio state dict maps onto ``Wav2Vec2Encoder`` by dropping one prefix
(``from_torchaudio_state_dict``) and the parity test can hold us to its numbers. Two torchaudio /
fairseq behaviours are kept on purpose for that parity: in ``group_norm`` mode (Base) the first
convolution's GroupNorm takes its statistics over the whole padded row, so Base outputs depend
slightly on how much padding a batch has (the ``layer_norm`` mode of Large/xl does not); and the
Transformer's outer LayerNorm sits before the layers in post-norm models, after them in pre-norm
ones.

The masking convention is ours, not fairseq's: ``mask_prob`` is the probability that a span starts
at each frame (``data.augment.frame_span_mask``), so fairseq's ``mask_prob=0.65, mask_length=10``
(0.65 x T / 10 span starts) is ``mask_prob=0.065`` here, and the span length is set in
milliseconds and converted to encoder frames (65 ms -> 3 frames of 20 ms).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from raytrain_speech.config import require


@dataclass
class Wav2Vec2Config:
    """wav2vec 2.0 architecture, masking, quantizer and loss weights (defaults: the paper's Base)."""

    sample_rate_hz: int = 16000
    """Waveform rate the feature encoder expects (its strides fix the frame rate at this rate)."""
    conv_channels: int = 512
    """Channels of every feature-encoder convolution."""
    conv_kernels: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    """Kernel sizes of the feature-encoder convolutions (samples / frames)."""
    conv_strides: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    """Strides of the feature-encoder convolutions; their product (320) = 20 ms frames at 16 kHz."""
    extractor_mode: Literal["group_norm", "layer_norm"] = "group_norm"
    """group_norm: one GroupNorm after the first convolution (Base); layer_norm: LayerNorm after every
    convolution (Large/xl, stable with conv biases and fp16)."""
    conv_bias: bool = False
    """Bias in the feature-encoder convolutions (Base: no, Large: yes)."""
    normalize_waveform: bool = False
    """Zero-mean unit-variance each utterance's valid samples before the CNN (fairseq `normalize`;
    used with the layer_norm extractor)."""
    feature_grad_mult: float = 0.1
    """Scale of the gradient entering the feature encoder (Base 0.1 keeps the CNN stable; Large 1.0;
    0 = frozen, fairseq's fine-tuning setting: zero gradients, no backward through the CNN)."""
    d_model: int = 768
    """Transformer width."""
    num_layers: int = 12
    """Transformer blocks."""
    num_heads: int = 12
    """Self-attention heads."""
    ffn_dim: int = 3072
    """Feed-forward hidden width."""
    layer_norm_first: bool = False
    """Pre-norm blocks (Large/xl) instead of post-norm (Base)."""
    pos_conv_kernel: int = 128
    """Kernel (encoder frames) of the convolutional relative positional embedding."""
    pos_conv_groups: int = 16
    """Groups of the positional convolution."""
    dropout: float = 0.1
    """Dropout on attention/FFN outputs and after the positional embedding."""
    attention_dropout: float = 0.1
    """Dropout on attention probabilities."""
    activation_dropout: float = 0.0
    """Dropout inside the feed-forward block (after GELU)."""
    input_dropout: float = 0.1
    """Dropout on the projected features entering the Transformer (fairseq dropout_input)."""
    feature_dropout: float = 0.1
    """Dropout on the CNN features entering the quantizer (fairseq dropout_features)."""
    layer_drop: float = 0.05
    """Probability of skipping each Transformer block in training (LayerDrop; DDP-safe here)."""
    codebook_groups: int = 2
    """Quantizer codebooks G (product quantization)."""
    codebook_entries: int = 320
    """Entries V per codebook (G x V = 640 codewords, 102.4k combinations)."""
    codevector_dim: int = 256
    """Width Q of a concatenated codevector (each group contributes Q / G)."""
    final_dim: int = 256
    """Width F of the space where context vectors and quantized targets are compared."""
    mask_prob: float = 0.065
    """Probability that a masked span starts at each encoder frame (≈49% of frames masked at 10-frame spans)."""
    mask_span_ms: float = 65.0
    """Masked span length in ms, converted to encoder frames (65 ms -> 3 frames; 200 ms -> the paper's 10)."""
    min_masks: int = 2
    """Spans forced into every utterance that drew fewer (fairseq: 2), so each row has negatives."""
    num_negatives: int = 100
    """Distractors K per masked frame, drawn from the other masked frames of the same utterance."""
    logit_temperature: float = 0.1
    """Temperature of the cosine-similarity logits in the contrastive loss."""
    gumbel_temperature_start: float = 2.0
    """Gumbel-softmax temperature at step 0."""
    gumbel_temperature_end: float = 0.5
    """Floor of the Gumbel-softmax temperature."""
    gumbel_temperature_decay: float = 0.999995
    """Per-update factor: temperature = max(start x decay^step, end)."""
    diversity_weight: float = 0.1
    """Weight of the codebook diversity loss (G x V - perplexity) / (G x V), per masked frame."""
    feature_penalty_weight: float = 10.0
    """Weight of the L2 penalty on the CNN output (Base 10; Large/xl 0 since LayerNorm bounds it)."""
    final_dropout: float = 0.0
    """CTC fine-tuning: dropout before the output head."""
    finetune_mask_prob: float = 0.0
    """CTC fine-tuning: span-start probability of time masking (0 = none; fairseq's 0.5 = 0.05 here)."""
    finetune_mask_span_ms: float = 200.0
    """CTC fine-tuning: time-mask span in ms (200 ms = fairseq's 10 frames)."""
    finetune_min_masks: int = 0
    """CTC fine-tuning: spans forced into every utterance (with finetune_mask_prob 0: exactly this many)."""
    mask_channel_prob: float = 0.0
    """Training: share of the projected CNN features' d_model channels zeroed per utterance (fairseq's mask_channel_prob)."""
    mask_channel_span: int = 10
    """Width in channels of each masked block (fairseq's mask_channel_length)."""
    mask_channel_min: int = 0
    """Channel blocks every utterance gets at least (2 with prob 0: SpecAugment's two frequency masks)."""

    def validate(self) -> None:
        key = "model.overrides."
        require(len(self.conv_kernels) == len(self.conv_strides) and len(self.conv_kernels) >= 1,
                key + "conv_kernels", "needs one kernel per stride (conv_strides), at least one")
        require(all(k >= 1 for k in self.conv_kernels) and all(s >= 1 for s in self.conv_strides),
                key + "conv_kernels", "kernels and strides must be >= 1")
        require(self.conv_channels >= 1, key + "conv_channels", "must be >= 1")
        require(self.d_model % self.num_heads == 0, key + "d_model", f"must be divisible by num_heads ({self.num_heads})")
        require(self.d_model % self.pos_conv_groups == 0, key + "pos_conv_groups", "must divide d_model")
        require(self.pos_conv_kernel >= 1, key + "pos_conv_kernel", "must be >= 1")
        require(self.codevector_dim % self.codebook_groups == 0, key + "codevector_dim",
                f"must be divisible by codebook_groups ({self.codebook_groups})")
        require(self.codebook_entries >= 2, key + "codebook_entries", "must be >= 2")
        require(0.0 <= self.mask_prob < 1.0, key + "mask_prob", "must be in [0, 1)")
        require(0.0 <= self.finetune_mask_prob < 1.0, key + "finetune_mask_prob", "must be in [0, 1)")
        require(self.mask_span_ms > 0 and self.finetune_mask_span_ms > 0, key + "mask_span_ms", "must be positive")
        require(self.min_masks >= 0 and self.finetune_min_masks >= 0, key + "min_masks", "must be >= 0")
        require(0.0 <= self.mask_channel_prob < 1.0, key + "mask_channel_prob", "must be in [0, 1)")
        require(1 <= self.mask_channel_span <= self.d_model, key + "mask_channel_span",
                f"must be in [1, d_model={self.d_model}]")
        require(self.mask_channel_min >= 0, key + "mask_channel_min", "must be >= 0")
        require(self.num_negatives >= 1, key + "num_negatives", "must be >= 1")
        require(self.logit_temperature > 0, key + "logit_temperature", "must be positive")
        require(0 < self.gumbel_temperature_end <= self.gumbel_temperature_start,
                key + "gumbel_temperature_end", "must be in (0, gumbel_temperature_start]")
        require(0 < self.gumbel_temperature_decay <= 1, key + "gumbel_temperature_decay", "must be in (0, 1]")
        require(self.feature_grad_mult >= 0, key + "feature_grad_mult", "must be >= 0")
        for name in ("dropout", "attention_dropout", "activation_dropout", "input_dropout", "feature_dropout",
                     "layer_drop", "final_dropout"):
            require(0.0 <= getattr(self, name) < 1.0, key + name, "must be in [0, 1)")

    @property
    def frame_stride_samples(self) -> int:
        return math.prod(self.conv_strides)

    def span_frames(self, span_ms: float) -> int:
        """A span in ms as encoder frames (nearest, at least 1): 65 ms -> 3, 200 ms -> 10 at 20 ms frames."""
        frame_ms = 1000.0 * self.frame_stride_samples / self.sample_rate_hz
        return max(1, round(span_ms / frame_ms))


_LARGE = {  # the paper's LARGE: wider, deeper, pre-norm, LayerNorm CNN with biases
    "extractor_mode": "layer_norm", "conv_bias": True, "normalize_waveform": True, "feature_grad_mult": 1.0,
    "d_model": 1024, "num_layers": 24, "num_heads": 16, "ffn_dim": 4096, "layer_norm_first": True,
    "codevector_dim": 768, "final_dim": 768, "layer_drop": 0.2, "feature_penalty_weight": 0.0,
}

PRESETS: dict[str, dict] = {
    # 1.04M parameters (pretraining model): trains on a 2-core CPU. The full models' 20 ms frame rate
    # (7 convolutions, 64 channels), a 3-layer 144-wide Transformer, a 2 x 128-entry codebook.
    "tiny": {"conv_channels": 64, "d_model": 144, "num_layers": 3, "num_heads": 4, "ffn_dim": 576,
             "pos_conv_kernel": 64, "pos_conv_groups": 8, "codebook_entries": 128, "codevector_dim": 128,
             "final_dim": 64, "layer_drop": 0.0, "feature_grad_mult": 1.0},
    # The paper's Base (95.0M with the quantizer) with the recipe's 65 ms spans.
    "base": {"finetune_mask_prob": 0.05},
    # The paper's Base with its 10-frame (200 ms) spans.
    "base_10frame": {"mask_span_ms": 200.0, "finetune_mask_prob": 0.05},
    # The recipe's 317M "XL" (seed 003) = the paper's LARGE: 317.4M parameters, 65 ms spans at p=0.065,
    # Gumbel temperature 2 -> 0.5 by 0.999995 per update.
    "xl": {**_LARGE, "finetune_mask_prob": 0.05},
    # The same model with the paper's 10-frame spans.
    "xl_10frame": {**_LARGE, "mask_span_ms": 200.0, "finetune_mask_prob": 0.05},
}


class GradMultiply(torch.autograd.Function):
    """Identity forward; scales the gradient (fairseq's feature_grad_mult on the CNN output)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over channels of a (B, C, T) tensor (torchaudio's transposed LayerNorm)."""

    def forward(self, x_BCT: torch.Tensor) -> torch.Tensor:
        return super().forward(x_BCT.transpose(-2, -1)).transpose(-2, -1)


class ConvLayerBlock(nn.Module):
    """Conv1d -> optional norm -> GELU, with the valid-length bookkeeping of an unpadded conv."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, bias: bool,
                 layer_norm: nn.Module | None):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride
        self.layer_norm = layer_norm
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride, bias=bias)
        nn.init.kaiming_normal_(self.conv.weight)

    def output_lengths(self, lengths_B: torch.Tensor) -> torch.Tensor:
        return torch.div(lengths_B - self.kernel_size, self.stride, rounding_mode="floor").add(1).clamp(min=0)

    def forward(self, x_BCT: torch.Tensor) -> torch.Tensor:
        x_BCT = self.conv(x_BCT)
        if self.layer_norm is not None:
            x_BCT = self.layer_norm(x_BCT)
        return F.gelu(x_BCT)


class FeatureExtractor(nn.Module):
    """The convolutional feature encoder: waveform (B, S) -> features (B, C, T)."""

    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        blocks, in_channels = [], 1
        for i, (k, s) in enumerate(zip(cfg.conv_kernels, cfg.conv_strides)):
            norm: nn.Module | None = None
            if cfg.extractor_mode == "group_norm" and i == 0:
                norm = nn.GroupNorm(cfg.conv_channels, cfg.conv_channels, affine=True)
            elif cfg.extractor_mode == "layer_norm":
                norm = ChannelLayerNorm(cfg.conv_channels, elementwise_affine=True)
            blocks.append(ConvLayerBlock(in_channels, cfg.conv_channels, k, s, cfg.conv_bias, norm))
            in_channels = cfg.conv_channels
        self.conv_layers = nn.ModuleList(blocks)

    def output_lengths(self, lengths_B: torch.Tensor) -> torch.Tensor:
        for layer in self.conv_layers:
            lengths_B = layer.output_lengths(lengths_B)
        return lengths_B

    def forward(self, waveform_BS: torch.Tensor) -> torch.Tensor:
        x_BCT = waveform_BS.unsqueeze(1)
        for layer in self.conv_layers:
            x_BCT = layer(x_BCT)
        return x_BCT


class FeatureProjection(nn.Module):
    """LayerNorm over CNN channels, then Linear to the Transformer width (+ input dropout)."""

    def __init__(self, in_features: int, out_features: int, dropout: float):
        super().__init__()
        self.layer_norm = nn.LayerNorm(in_features)
        self.projection = nn.Linear(in_features, out_features)
        self.dropout = nn.Dropout(dropout)


class ConvolutionalPositionalEmbedding(nn.Module):
    """Grouped, weight-normalised conv over time (relative positions); even kernels drop one frame."""

    def __init__(self, embed_dim: int, kernel_size: int, groups: int):
        super().__init__()
        conv = nn.Conv1d(embed_dim, embed_dim, kernel_size, padding=kernel_size // 2, groups=groups)
        nn.init.normal_(conv.weight, mean=0.0, std=math.sqrt(4.0 / (kernel_size * embed_dim)))
        nn.init.constant_(conv.bias, 0.0)
        self.conv = nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
        self.num_remove = 1 if kernel_size % 2 == 0 else 0

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        y_BDT = self.conv(x_BTD.transpose(1, 2))
        if self.num_remove:
            y_BDT = y_BDT[..., : -self.num_remove]
        return F.gelu(y_BDT).transpose(1, 2)


class SelfAttention(nn.Module):
    """Multi-head self-attention through F.scaled_dot_product_attention with key padding."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x_BTD: torch.Tensor, attend_B11T: torch.Tensor | None) -> torch.Tensor:
        B, T, D = x_BTD.shape
        def heads(t_BTD):
            return t_BTD.view(B, T, self.num_heads, D // self.num_heads).transpose(1, 2)  # B, H, T, E
        y_BHTE = F.scaled_dot_product_attention(
            heads(self.q_proj(x_BTD)), heads(self.k_proj(x_BTD)), heads(self.v_proj(x_BTD)),
            attn_mask=attend_B11T, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(y_BHTE.transpose(1, 2).reshape(B, T, D))


class FeedForward(nn.Module):
    def __init__(self, d_model: int, ffn_dim: int, activation_dropout: float, dropout: float):
        super().__init__()
        self.intermediate_dense = nn.Linear(d_model, ffn_dim)
        self.intermediate_dropout = nn.Dropout(activation_dropout)
        self.output_dense = nn.Linear(ffn_dim, d_model)
        self.output_dropout = nn.Dropout(dropout)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        h = self.intermediate_dropout(F.gelu(self.intermediate_dense(x_BTD)))
        return self.output_dropout(self.output_dense(h))


class EncoderLayer(nn.Module):
    """A Transformer block, pre-norm (Large) or post-norm (Base), with fairseq's LayerNorm placement."""

    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.attention = SelfAttention(cfg.d_model, cfg.num_heads, cfg.attention_dropout)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layer_norm = nn.LayerNorm(cfg.d_model)
        self.layer_norm_first = cfg.layer_norm_first
        self.feed_forward = FeedForward(cfg.d_model, cfg.ffn_dim, cfg.activation_dropout, cfg.dropout)
        self.final_layer_norm = nn.LayerNorm(cfg.d_model)

    def forward(self, x_BTD: torch.Tensor, attend_B11T: torch.Tensor | None) -> torch.Tensor:
        if self.layer_norm_first:
            x_BTD = x_BTD + self.dropout(self.attention(self.layer_norm(x_BTD), attend_B11T))
            return x_BTD + self.feed_forward(self.final_layer_norm(x_BTD))
        x_BTD = self.layer_norm(x_BTD + self.dropout(self.attention(x_BTD, attend_B11T)))
        return self.final_layer_norm(x_BTD + self.feed_forward(x_BTD))


class Transformer(nn.Module):
    """Positional conv + blocks; the outer LayerNorm precedes post-norm blocks and follows pre-norm ones."""

    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.pos_conv_embed = ConvolutionalPositionalEmbedding(cfg.d_model, cfg.pos_conv_kernel, cfg.pos_conv_groups)
        self.layer_norm = nn.LayerNorm(cfg.d_model)
        self.layer_norm_first = cfg.layer_norm_first
        self.layer_drop = cfg.layer_drop
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))
        for module in self.layers.modules():  # fairseq's init_bert_params
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                nn.init.zeros_(module.bias)

    def layer_inputs(self, x_BTD: torch.Tensor) -> tuple:
        """What every block takes besides the frames and the key mask (WavLM: the position bias)."""
        return ()

    def skips(self, i: int) -> bool:
        """LayerDrop: whether block ``i`` is skipped in this training forward."""
        return self.training and self.layer_drop > 0 and float(torch.rand(())) < self.layer_drop

    def forward(self, x_BTD: torch.Tensor, attend_B11T: torch.Tensor | None) -> torch.Tensor:
        x_BTD = x_BTD + self.pos_conv_embed(x_BTD)
        if not self.layer_norm_first:
            x_BTD = self.layer_norm(x_BTD)
        x_BTD = self.dropout(x_BTD)
        extra = self.layer_inputs(x_BTD)
        for i, layer in enumerate(self.layers):
            if self.skips(i):
                # A skipped block still joins the graph with a zero term, so DDP sees a gradient for each of
                # its parameters (no find_unused_parameters) and ranks may skip different blocks.
                x_BTD = x_BTD + 0.0 * sum(p.sum() for p in layer.parameters()).to(x_BTD.dtype)
                continue
            x_BTD = layer(x_BTD, attend_B11T, *extra)
        if self.layer_norm_first:
            x_BTD = self.layer_norm(x_BTD)
        return x_BTD


@dataclass
class EncoderOutput:
    """What the pretraining and CTC heads read from the encoder."""

    context_BTD: torch.Tensor
    """Transformer output."""
    lengths_B: torch.Tensor
    """Valid encoder frames per row."""
    valid_BT: torch.Tensor
    """Bool, True inside each row's length."""
    features_BTC: torch.Tensor
    """Layer-normed CNN features before projection and masking: the quantizer's input."""
    feature_penalty: torch.Tensor
    """Mean squared CNN activation over valid frames (float32 scalar)."""


class Wav2Vec2Encoder(nn.Module):
    """Waveform -> CNN features -> projection -> span masking (learned embedding) -> conv rel-pos + Transformer.

    Shared by pretraining and CTC fine-tuning, so a pretrained encoder loads into the CTC model
    under the same names.
    """

    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.cfg = cfg
        self.feature_extractor = FeatureExtractor(cfg)
        self.feature_projection = FeatureProjection(cfg.conv_channels, cfg.d_model, cfg.input_dropout)
        self.mask_embedding = nn.Parameter(torch.empty(cfg.d_model).uniform_())
        self.transformer = Transformer(cfg)

    def output_lengths(self, lengths_B: torch.Tensor) -> torch.Tensor:
        """Encoder frames of waveforms of ``lengths_B`` samples (an unpadded conv stack's arithmetic)."""
        return self.feature_extractor.output_lengths(lengths_B)

    def _normalize(self, waveform_BS: torch.Tensor, lengths_B: torch.Tensor) -> torch.Tensor:
        valid_BS = torch.arange(waveform_BS.shape[1], device=waveform_BS.device)[None, :] < lengths_B[:, None]
        n_B1 = lengths_B.clamp(min=1)[:, None].to(torch.float32)
        x = waveform_BS.float() * valid_BS
        mean_B1 = x.sum(1, keepdim=True) / n_B1
        var_B1 = ((x - mean_B1) * valid_BS).pow(2).sum(1, keepdim=True) / n_B1
        return ((x - mean_B1) / torch.sqrt(var_B1 + 1e-5) * valid_BS).to(waveform_BS.dtype)

    def forward(self, waveform_BS: torch.Tensor, lengths_B: torch.Tensor,
                mask_BT: torch.Tensor | None = None, channel_mask_BC: torch.Tensor | None = None) -> EncoderOutput:
        """``mask_BT`` (True = masked) replaces those frames' projected features by the mask embedding;
        ``channel_mask_BC`` zeroes those channels in every frame (after it, as fairseq does)."""
        if self.cfg.normalize_waveform:
            waveform_BS = self._normalize(waveform_BS, lengths_B)
        mult = self.cfg.feature_grad_mult
        if mult > 0:
            x_BCT = self.feature_extractor(waveform_BS)
            if mult != 1.0 and torch.is_grad_enabled():
                x_BCT = GradMultiply.apply(x_BCT, mult)
        else:  # a frozen CNN (fairseq feature_grad_mult 0): no backward through it, but every parameter
            with torch.no_grad():  # still takes part (a zero gradient), as DDP requires of each forward
                x_BCT = self.feature_extractor(waveform_BS)
            if torch.is_grad_enabled():
                x_BCT = x_BCT + 0.0 * sum(p.view(-1)[0] for p in self.feature_extractor.parameters())
        B, _, T = x_BCT.shape
        out_lengths_B = self.output_lengths(lengths_B).clamp(max=T)
        valid_BT = torch.arange(T, device=x_BCT.device)[None, :] < out_lengths_B[:, None]
        sq_BT = x_BCT.float().pow(2).mean(dim=1)
        feature_penalty = (sq_BT * valid_BT).sum() / valid_BT.sum().clamp(min=1)

        features_BTC = self.feature_projection.layer_norm(x_BCT.transpose(1, 2))
        x_BTD = self.feature_projection.dropout(self.feature_projection.projection(features_BTC))
        x_BTD = x_BTD * valid_BT[..., None].to(x_BTD.dtype)  # padded frames enter the pos-conv as zeros
        # Always through the mask (empty when there is none): under DDP every parameter must take part
        # in every forward, and the CTC model masks only some batches (or never, finetune_mask_prob 0).
        mask_BT = torch.zeros_like(valid_BT) if mask_BT is None else fit_mask(mask_BT, T) & valid_BT
        x_BTD = torch.where(mask_BT[..., None], self.mask_embedding.to(x_BTD.dtype), x_BTD)
        if channel_mask_BC is not None:
            x_BTD = x_BTD.masked_fill(channel_mask_BC.to(x_BTD.device, torch.bool)[:, None, :], 0.0)
        attend_B11T = None
        if not bool(valid_BT.all()):
            # Rows with no valid frame attend to everything (finite garbage instead of NaN); nothing reads them.
            attend_B11T = (valid_BT | (out_lengths_B == 0)[:, None])[:, None, None, :]
        context_BTD = self.transformer(x_BTD, attend_B11T)
        return EncoderOutput(context_BTD, out_lengths_B, valid_BT, features_BTC, feature_penalty)


def fit_mask(mask_BT: torch.Tensor, T: int) -> torch.Tensor:
    """A (B, T') frame mask cut or padded (with False) to T frames, as bool on its device."""
    mask_BT = mask_BT.to(torch.bool)
    if mask_BT.shape[1] >= T:
        return mask_BT[:, :T]
    return F.pad(mask_BT, (0, T - mask_BT.shape[1]), value=False)


def from_torchaudio_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ``torchaudio.models.Wav2Vec2Model`` state dict under Wav2Vec2Encoder's names: the feature
    extractor keeps its names, ``encoder.feature_projection.*`` / ``encoder.transformer.*`` lose the
    ``encoder.`` prefix, the ``aux`` head is dropped. torchaudio has no mask embedding, so load with
    ``strict=False`` and expect exactly ``mask_embedding`` missing."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("aux."):
            continue
        out[key.removeprefix("encoder.")] = value
    return out


def to_torchaudio_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse: a Wav2Vec2Encoder state dict for ``torchaudio.models.wav2vec2_model(..., aux_num_out=None)``."""
    out = {}
    for key, value in state_dict.items():
        if key == "mask_embedding":
            continue
        out[key if key.startswith("feature_extractor.") else f"encoder.{key}"] = value
    return out
