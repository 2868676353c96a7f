"""Conformer encoder blocks with relative positional self-attention (plain torch; no Ray).

Shapes: B = batch, T = frames, D = model width, H = heads, K = head width (D / H),
P = relative positions (2T - 1: offsets T-1 .. -(T-1)).

Why our own: ``torchaudio.models.Conformer`` attends without any positional information (only the
depthwise convolution tells frames apart), while the Conformer paper (Gulati et al. 2020), ESPnet
(``RelPositionMultiHeadedAttention`` + ``RelPositionalEncoding``) and NeMo
(``RelPositionMultiHeadAttention``) use Transformer-XL's relative positional attention:

    score(i, j) = [(q_i + u) . k_j  +  (q_i + v) . W_pos r_{i-j}] / sqrt(K)

with learned per-head biases u, v (``pos_bias_u``, ``pos_bias_v``), a projection ``linear_pos`` (no
bias) and a fixed sinusoidal table r of the 2T-1 offsets. The position term is one matmul against the
2T-1 offsets followed by the "relative shift" (a strided view here, so no padded copy); it enters
``F.scaled_dot_product_attention`` as an additive mask, so the content term stays the fused kernel's
own matmul (the memory-efficient kernel on CUDA accepts an additive bias).

Parameter names and module structure are torchaudio's (``conformer_layers.N.ffn1.sequential.1``,
``self_attn.in_proj_weight``, ``self_attn.out_proj``, ``conv_module.sequential.2``, ...), so with
``attention="none"`` a torchaudio Conformer's state dict loads strictly and computes the same outputs;
that mode also keeps torchaudio's convolution over padded frames, so old checkpoints reproduce exactly.
Unlike torchaudio, blocks are batch-first in and out (B, T, D).

With ``mask_conv_padding`` (the default) padded frames are zeroed before the depthwise convolution, as
NeMo and WeNet do: otherwise the last valid frames of a short row see its padding, and a row's output
depends on the rows it is batched with.

Choices ESPnet/NeMo leave to their input layer and we do not copy: the input is not scaled by
sqrt(D) before the blocks (our subsampling's projection learns the scale) and the positional table
gets no dropout (NeMo's default ``dropout_emb=0``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from raytrain_speech.models.layers import padding_mask

ATTENTION_CHOICES = ("rel_pos", "none")
"""rel_pos: Transformer-XL relative positional MHSA (the paper, ESPnet, NeMo); none: torchaudio's."""


def relative_sinusoids(t: int, d_model: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(2T-1, D) sinusoids of the offsets T-1, T-2, ..., -(T-1), row p = offset T-1-p: ESPnet's table
    (sin at even channels, cos at odd), so weights ported from ESPnet read the same positions.

    Computed per forward in float32 (cheap: 2T-1 rows), so checkpoints carry no table and a model
    built on the meta device has nothing uninitialised."""
    if d_model % 2:
        raise ValueError(f"relative_sinusoids: d_model must be even, got {d_model}")
    offsets_P = torch.arange(t - 1, -t, -1, device=device, dtype=torch.float32)
    inv_freq = torch.exp(torch.arange(0, d_model, 2, device=device, dtype=torch.float32)
                         * (-math.log(10000.0) / d_model))
    angle_PD2 = offsets_P[:, None] * inv_freq[None, :]
    return torch.stack([angle_PD2.sin(), angle_PD2.cos()], dim=-1).flatten(1).to(dtype)


def rel_shift(x_BHTP: torch.Tensor) -> torch.Tensor:
    """(B, H, T, 2T-1) scores against offsets -> (B, H, T, T) with out[i, j] = x[i, T-1-i+j], the
    column of offset i - j. A strided view of the same storage (icefall's form of Transformer-XL's
    pad-and-reshape trick), so no (B, H, T, 2T) padded copy is made."""
    x_BHTP = x_BHTP.contiguous()
    b, h, t, _ = x_BHTP.shape
    sb, sh, st, sp = x_BHTP.stride()
    return x_BHTP.as_strided((b, h, t, t), (sb, sh, st - sp, sp),
                             storage_offset=x_BHTP.storage_offset() + (t - 1) * sp)


class SelfAttention(nn.Module):
    """Multi-head self-attention in ``nn.MultiheadAttention``'s parameter layout, optionally with
    relative positional scores (``rel_pos``)."""

    def __init__(self, d_model: int, num_heads: int, dropout: float = 0.0, rel_pos: bool = True):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model {d_model} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim, self.dropout = num_heads, d_model // num_heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * d_model))
        # nn.MultiheadAttention's class: int8 export (evaluate/quantize.py) leaves it float, as it did.
        self.out_proj = NonDynamicallyQuantizableLinear(d_model, d_model)
        self.linear_pos: nn.Linear | None = None
        if rel_pos:
            self.linear_pos = nn.Linear(d_model, d_model, bias=False)
            self.pos_bias_u = nn.Parameter(torch.empty(num_heads, self.head_dim))
            self.pos_bias_v = nn.Parameter(torch.empty(num_heads, self.head_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.MultiheadAttention's initialisation; the position biases as ESPnet's (Xavier)."""
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)
        if self.linear_pos is not None:
            nn.init.xavier_uniform_(self.pos_bias_u)
            nn.init.xavier_uniform_(self.pos_bias_v)

    def forward(self, x_BTD: torch.Tensor, pad_BT: torch.Tensor | None = None,
                pos_PD: torch.Tensor | None = None) -> torch.Tensor:
        """Attend over ``x_BTD``; keys where ``pad_BT`` is True are ignored. ``pos_PD``: the
        ``relative_sinusoids`` of T (required with rel_pos, ignored without)."""
        b, t, d = x_BTD.shape
        q_BTHK, k_BTHK, v_BTHK = F.linear(x_BTD, self.in_proj_weight, self.in_proj_bias).view(
            b, t, 3, self.num_heads, self.head_dim).unbind(2)
        mask = None if pad_BT is None else ~pad_BT[:, None, None, :]  # SDPA: True = may attend
        if self.linear_pos is not None:
            if pos_PD is None or pos_PD.shape[0] != 2 * t - 1:
                raise ValueError(f"rel_pos attention over {t} frames needs relative_sinusoids({t}, D)")
            mask = self._position_scores(q_BTHK, pad_BT, pos_PD)
            q_BTHK = q_BTHK + self.pos_bias_u.to(q_BTHK.dtype)
        y_BHTK = F.scaled_dot_product_attention(q_BTHK.transpose(1, 2), k_BTHK.transpose(1, 2),
                                                v_BTHK.transpose(1, 2), attn_mask=mask,
                                                dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(y_BHTK.transpose(1, 2).reshape(b, t, d))

    def _position_scores(self, q_BTHK: torch.Tensor, pad_BT: torch.Tensor | None,
                         pos_PD: torch.Tensor) -> torch.Tensor:
        """(q + v) . W_pos r_{i-j} / sqrt(K), -inf at padded keys: SDPA's additive mask (B, H, T, T)."""
        p_HKP = self.linear_pos(pos_PD).view(-1, self.num_heads, self.head_dim).permute(1, 2, 0)
        qv_BHTK = ((q_BTHK + self.pos_bias_v.to(q_BTHK.dtype)) * self.head_dim ** -0.5).transpose(1, 2)
        bias_BHTT = rel_shift(torch.matmul(qv_BHTK, p_HKP.to(qv_BHTK.dtype)))
        if pad_BT is not None:
            bias_BHTT = bias_BHTT.masked_fill(pad_BT[:, None, None, :], float("-inf"))
        return bias_BHTT.to(q_BTHK.dtype)


class FeedForward(nn.Module):
    """The macaron half-step feed-forward (torchaudio's ``_FeedForwardModule``, same indices)."""

    def __init__(self, d_model: int, hidden_dim: int, dropout: float = 0.0):
        super().__init__()
        self.sequential = nn.Sequential(
            nn.LayerNorm(d_model), nn.Linear(d_model, hidden_dim), nn.SiLU(), nn.Dropout(dropout),
            nn.Linear(hidden_dim, d_model), nn.Dropout(dropout),
        )

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self.sequential(x_BTD)


class ConvolutionModule(nn.Module):
    """Pointwise conv + GLU, depthwise conv, norm, SiLU, pointwise conv (torchaudio's indices)."""

    def __init__(self, d_model: int, kernel_size: int, dropout: float = 0.0, use_group_norm: bool = False):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError("depthwise_conv_kernel_size must be odd to achieve 'SAME' padding.")
        self.layer_norm = nn.LayerNorm(d_model)
        self.sequential = nn.Sequential(
            nn.Conv1d(d_model, 2 * d_model, 1), nn.GLU(dim=1),
            nn.Conv1d(d_model, d_model, kernel_size, padding=(kernel_size - 1) // 2, groups=d_model),
            nn.GroupNorm(1, d_model) if use_group_norm else nn.BatchNorm1d(d_model),
            nn.SiLU(), nn.Conv1d(d_model, d_model, 1), nn.Dropout(dropout),
        )

    def forward(self, x_BTD: torch.Tensor, pad_BT: torch.Tensor | None = None) -> torch.Tensor:
        """``pad_BT`` (True = padding): frames zeroed after the GLU, before the depthwise conv reads them."""
        h_BDT = self.sequential[1](self.sequential[0](self.layer_norm(x_BTD).transpose(1, 2)))
        if pad_BT is not None:
            h_BDT = h_BDT.masked_fill(pad_BT[:, None, :], 0.0)
        for module in self.sequential[2:]:
            h_BDT = module(h_BDT)
        return h_BDT.transpose(1, 2)


class ConformerLayer(nn.Module):
    """FFN/2, self-attention, convolution, FFN/2, LayerNorm (torchaudio's names; batch-first)."""

    def __init__(self, d_model: int, ffn_dim: int, num_heads: int, kernel_size: int, dropout: float = 0.0,
                 use_group_norm: bool = False, convolution_first: bool = False, attention: str = "rel_pos"):
        super().__init__()
        self.ffn1 = FeedForward(d_model, ffn_dim, dropout)
        self.self_attn_layer_norm = nn.LayerNorm(d_model)
        self.self_attn = SelfAttention(d_model, num_heads, dropout, rel_pos=attention == "rel_pos")
        self.self_attn_dropout = nn.Dropout(dropout)
        self.conv_module = ConvolutionModule(d_model, kernel_size, dropout, use_group_norm)
        self.ffn2 = FeedForward(d_model, ffn_dim, dropout)
        self.final_layer_norm = nn.LayerNorm(d_model)
        self.convolution_first = convolution_first

    def forward(self, x_BTD: torch.Tensor, pad_BT: torch.Tensor | None = None, pos_PD: torch.Tensor | None = None,
                conv_pad_BT: torch.Tensor | None = None) -> torch.Tensor:
        x_BTD = self.ffn1(x_BTD) * 0.5 + x_BTD
        if self.convolution_first:
            x_BTD = x_BTD + self.conv_module(x_BTD, conv_pad_BT)
        attn_BTD = self.self_attn(self.self_attn_layer_norm(x_BTD), pad_BT, pos_PD)
        x_BTD = self.self_attn_dropout(attn_BTD) + x_BTD
        if not self.convolution_first:
            x_BTD = x_BTD + self.conv_module(x_BTD, conv_pad_BT)
        x_BTD = self.ffn2(x_BTD) * 0.5 + x_BTD
        return self.final_layer_norm(x_BTD)


class Conformer(nn.Module):
    """A drop-in for ``torchaudio.models.Conformer`` (same arguments, same state-dict names, same
    ``forward(x_BTD, lengths_B) -> (y_BTD, lengths_B)``) with a choice of ``attention``."""

    def __init__(self, input_dim: int, num_heads: int, ffn_dim: int, num_layers: int,
                 depthwise_conv_kernel_size: int, dropout: float = 0.0, use_group_norm: bool = False,
                 convolution_first: bool = False, attention: str = "rel_pos", mask_conv_padding: bool = True):
        super().__init__()
        if attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention {attention!r}: choose one of {', '.join(ATTENTION_CHOICES)}")
        self.attention, self.mask_conv_padding = attention, mask_conv_padding
        self.conformer_layers = nn.ModuleList([
            ConformerLayer(input_dim, ffn_dim, num_heads, depthwise_conv_kernel_size, dropout, use_group_norm,
                           convolution_first, attention)
            for _ in range(num_layers)
        ])

    def forward(self, x_BTD: torch.Tensor, lengths_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Frames at or past ``lengths_B`` are padding: never attended to (and, with
        ``mask_conv_padding``, never convolved into valid frames)."""
        t = x_BTD.shape[1]
        pad_BT = padding_mask(lengths_B, t)
        if not bool(pad_BT.any()):  # no mask at all: SDPA may then pick a fused kernel (one host sync)
            pad_BT = None
        pos_PD = None
        if self.attention == "rel_pos":
            pos_PD = relative_sinusoids(t, x_BTD.shape[-1], x_BTD.device, x_BTD.dtype)
        conv_pad_BT = pad_BT if self.mask_conv_padding else None
        for layer in self.conformer_layers:
            x_BTD = layer(x_BTD, pad_BT, pos_PD, conv_pad_BT)
        return x_BTD, lengths_B
