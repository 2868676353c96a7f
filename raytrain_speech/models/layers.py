"""Pre-norm Transformer building blocks shared by the model families (plain torch; no Ray).

Shapes: B = batch, T = query frames/tokens, S = key/memory frames, D = model width, H = heads,
K = head width (D / H), L = decoder tokens, P = prompt (prefix) tokens, V = vocabulary.

Attention goes through ``F.scaled_dot_product_attention`` so the fused (flash / memory-efficient)
kernels are used where the device has them. Padding is always described by lengths, never by
a precomputed mask, so that callers cannot disagree about which side is padded (the right).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from raytrain_speech.batch import IGNORE_ID


def padding_mask(lengths_B: torch.Tensor, T: int) -> torch.Tensor:
    """Bool (B, T), True = padding (position >= length): the convention of the batch's ``mask_BT``."""
    return torch.arange(T, device=lengths_B.device)[None, :] >= lengths_B[:, None]


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's fixed positional table (length, channels): sin of all timescales, then cos.

    Computed on the fly rather than stored, so a model built on the meta device and materialised
    later (``to_empty``) never holds an uninitialised table, and checkpoints do not carry it.
    """
    if channels % 2:
        raise ValueError(f"sinusoids: channels must be even, got {channels}")
    log_increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-log_increment * torch.arange(channels // 2, dtype=torch.float32))
    scaled_time = torch.arange(length, dtype=torch.float32)[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(scaled_time), torch.cos(scaled_time)], dim=1)


class MultiHeadAttention(nn.Module):
    """Self- or cross-attention with key padding from lengths and an optional causal mask."""

    def __init__(self, d_model: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model {d_model} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)

    def _heads(self, x_BTD: torch.Tensor) -> torch.Tensor:
        b, t, d = x_BTD.shape
        return x_BTD.view(b, t, self.num_heads, d // self.num_heads).transpose(1, 2)  # B, H, T, K

    def forward(self, x_BTD: torch.Tensor, memory_BSD: torch.Tensor | None = None,
                key_lengths_B: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        """Attend from ``x_BTD`` to ``memory_BSD`` (itself when None); keys at or past the length are ignored."""
        kv_BSD = x_BTD if memory_BSD is None else memory_BSD
        q_BHTK, k_BHSK, v_BHSK = self._heads(self.q(x_BTD)), self._heads(self.k(kv_BSD)), self._heads(self.v(kv_BSD))
        t, s = x_BTD.shape[1], kv_BSD.shape[1]
        mask = None  # bool, True = may attend (SDPA's convention, the opposite of padding_mask)
        # No mask when no key is padding: a mask rules out the flash kernel on CUDA (one host sync here).
        if key_lengths_B is not None and not bool((key_lengths_B >= s).all()):
            mask = ~padding_mask(key_lengths_B, s)[:, None, None, :]  # B, 1, 1, S
        if causal and mask is not None:  # SDPA takes either is_causal or a mask, so fold causality in
            mask = mask & torch.ones(t, s, dtype=torch.bool, device=x_BTD.device).tril(s - t)
            causal = False
        y_BHTK = F.scaled_dot_product_attention(q_BHTK, k_BHSK, v_BHSK, attn_mask=mask, is_causal=causal,
                                                dropout_p=self.dropout if self.training else 0.0)
        return self.out(y_BHTK.transpose(1, 2).reshape(x_BTD.shape[0], t, -1))


def _mlp(d_model: int, ffn_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_model, ffn_dim), nn.GELU(), nn.Linear(ffn_dim, d_model))


class TransformerEncoderLayer(nn.Module):
    """Pre-norm block: x + MHA(LN(x)), then x + MLP(LN(x)); pre-norm keeps deep stacks trainable without warm-up tricks."""

    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, dropout: float = 0.0):
        super().__init__()
        self.attn_norm = nn.LayerNorm(d_model)
        self.attn = MultiHeadAttention(d_model, num_heads, dropout)
        self.mlp_norm = nn.LayerNorm(d_model)
        self.mlp = _mlp(d_model, ffn_dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x_BTD: torch.Tensor, lengths_B: torch.Tensor | None = None) -> torch.Tensor:
        x_BTD = x_BTD + self.drop(self.attn(self.attn_norm(x_BTD), key_lengths_B=lengths_B))
        return x_BTD + self.drop(self.mlp(self.mlp_norm(x_BTD)))


class TransformerEncoder(nn.Module):
    """A stack of pre-norm encoder layers and the final LayerNorm that pre-norm stacks need."""

    def __init__(self, num_layers: int, d_model: int, num_heads: int, ffn_dim: int, dropout: float = 0.0):
        super().__init__()
        self.layers = nn.ModuleList(TransformerEncoderLayer(d_model, num_heads, ffn_dim, dropout)
                                    for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x_BTD: torch.Tensor, lengths_B: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layers:
            x_BTD = layer(x_BTD, lengths_B)
        return self.norm(x_BTD)


class TransformerDecoderLayer(nn.Module):
    """Pre-norm block: self-attention (causal for autoregressive decoders; Mask-CTC's is not), cross-attention
    to the encoder memory, MLP."""

    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, dropout: float = 0.0):
        super().__init__()
        self.self_norm = nn.LayerNorm(d_model)
        self.self_attn = MultiHeadAttention(d_model, num_heads, dropout)
        self.cross_norm = nn.LayerNorm(d_model)
        self.cross_attn = MultiHeadAttention(d_model, num_heads, dropout)
        self.mlp_norm = nn.LayerNorm(d_model)
        self.mlp = _mlp(d_model, ffn_dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x_BLD: torch.Tensor, memory_BSD: torch.Tensor, memory_lengths_B: torch.Tensor | None,
                causal: bool = True, lengths_B: torch.Tensor | None = None) -> torch.Tensor:
        # Token padding is on the right, so causality alone keeps real tokens from seeing it; without
        # causality the token lengths mask it.
        self_keys_B = None if causal else lengths_B
        x_BLD = x_BLD + self.drop(self.self_attn(self.self_norm(x_BLD), key_lengths_B=self_keys_B, causal=causal))
        x_BLD = x_BLD + self.drop(self.cross_attn(self.cross_norm(x_BLD), memory_BSD, memory_lengths_B))
        return x_BLD + self.drop(self.mlp(self.mlp_norm(x_BLD)))


class TransformerDecoder(nn.Module):
    """Autoregressive token decoder over an encoder memory; the output projection is the tied embedding."""

    def __init__(self, vocab_size: int, d_model: int, num_heads: int, ffn_dim: int, num_layers: int,
                 max_positions: int, dropout: float = 0.0):
        super().__init__()
        self.max_positions = max_positions
        self.embed = nn.Embedding(vocab_size, d_model)
        self.positions = nn.Embedding(max_positions, d_model)
        self.layers = nn.ModuleList(TransformerDecoderLayer(d_model, num_heads, ffn_dim, dropout)
                                    for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)
        # torch's N(0, 1) embedding init would make the tied logits ~sqrt(D) wide at step 0; 0.02 is
        # the GPT/Whisper choice and keeps the initial loss near log(V).
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.positions.weight, std=0.02)

    def forward(self, tokens_BL: torch.Tensor, memory_BSD: torch.Tensor,
                memory_lengths_B: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, L, V) for the next token at every position (teacher forcing)."""
        length = tokens_BL.shape[1]
        if length > self.max_positions:
            raise ValueError(f"decoder input of {length} tokens is longer than max_target_positions "
                             f"({self.max_positions})")
        x_BLD = self.drop(self.embed(tokens_BL) + self.positions.weight[:length])
        for layer in self.layers:
            x_BLD = layer(x_BLD, memory_BSD, memory_lengths_B)
        return self.norm(x_BLD) @ self.embed.weight.T

    def greedy_from(self, inputs: dict, max_len: int | None = None) -> list[list[int]]:
        """``greedy`` on a model's ``decoding_inputs`` (memory, prompt, eot, allowed ids, length cap),
        with the cap lowered to ``max_len`` when given."""
        if max_len is not None:
            inputs = {**inputs, "max_len": min(max_len, inputs["max_len"])}
        return self.greedy(**inputs)

    @torch.no_grad()
    def greedy(self, memory_BSD: torch.Tensor, memory_lengths_B: torch.Tensor | None, prefix_BP: torch.Tensor,
               eot_id: int, max_len: int, allowed_V: torch.Tensor | None = None) -> list[list[int]]:
        """Argmax decoding after ``prefix_BP`` until ``eot_id`` or ``max_len`` new tokens (prefix/eot not returned).

        ``allowed_V`` (bool) restricts what may be emitted (e.g. no prompt tokens mid-transcript);
        ``eot_id`` is always allowed. No KV cache: every step re-runs the decoder over the prefix,
        which is cheap at the lengths a character model evaluates and keeps one code path.
        """
        b, p = prefix_BP.shape
        max_len = max(0, min(max_len, self.max_positions - p))
        tokens_BL = prefix_BP
        done_B = torch.zeros(b, dtype=torch.bool, device=prefix_BP.device)
        suppress_V = None
        if allowed_V is not None:
            suppress_V = ~allowed_V.clone()
            suppress_V[eot_id] = False
        for _ in range(max_len):
            logits_BV = self(tokens_BL, memory_BSD, memory_lengths_B)[:, -1].float()
            if suppress_V is not None:
                logits_BV = logits_BV.masked_fill(suppress_V, float("-inf"))
            next_B = logits_BV.argmax(-1).masked_fill(done_B, eot_id)
            tokens_BL = torch.cat([tokens_BL, next_B[:, None]], dim=1)
            done_B |= next_B == eot_id
            if bool(done_B.all()):
                break
        hyps = []
        for row in tokens_BL[:, p:].tolist():
            hyps.append(row[: row.index(eot_id)] if eot_id in row else row)
        return hyps


def teacher_forcing(targets_BL: torch.Tensor, target_lengths_B: torch.Tensor, prefix_BP: torch.Tensor,
                    eot_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(decoder input, decoder output), both (B, P + L): the one place the shift is defined.

    input  = prefix, targets[:n], pad ...
    output = IGNORE x (P - 1), targets[:n], eot, IGNORE ...
    so output[i] is the token that must follow input[:i + 1].
    """
    b, length = targets_BL.shape
    p = prefix_BP.shape[1]
    if p < 1:
        raise ValueError("teacher_forcing needs a prefix of at least one token (start-of-transcript)")
    pos_BL = torch.arange(length, device=targets_BL.device)[None, :].expand(b, length)
    lengths_B1 = target_lengths_B.to(targets_BL.device)[:, None]
    real_BL = pos_BL < lengths_B1
    body_in_BL = torch.where(real_BL, targets_BL, torch.full_like(targets_BL, pad_id))
    decoder_in_BL = torch.cat([prefix_BP.to(targets_BL), body_in_BL], dim=1)
    # Output columns P-1 .. P+L-1: targets, then eot at column (P - 1 + n), then ignore.
    body_out_BL = torch.where(real_BL, targets_BL, torch.full_like(targets_BL, IGNORE_ID))
    body_out_BL = torch.cat([body_out_BL, torch.full_like(targets_BL[:, :1], IGNORE_ID)], dim=1)  # B, L + 1
    body_out_BL.scatter_(1, lengths_B1, eot_id)
    head_BL = torch.full((b, p - 1), IGNORE_ID, dtype=targets_BL.dtype, device=targets_BL.device)
    decoder_out_BL = torch.cat([head_BL, body_out_BL], dim=1)
    return decoder_in_BL, decoder_out_BL


def stacked_targets(features_BFM: torch.Tensor, lengths_B: torch.Tensor, t: int, stack: int,
                    renorm: bool) -> torch.Tensor:
    """(B, T, stack * M) reconstruction targets of masked prediction: the ``stack`` input frames under
    each encoder frame, flattened (``renorm``: normalised again over each row's valid frames)."""
    x_BFM = features_BFM.float()
    if renorm:
        valid_BF1 = (~padding_mask(lengths_B, x_BFM.shape[1]))[..., None].float()
        count_B11 = valid_BF1.sum(1, keepdim=True).clamp(min=1.0)
        mean_B1M = (x_BFM * valid_BF1).sum(1, keepdim=True) / count_B11
        var_B1M = (((x_BFM - mean_B1M) * valid_BF1) ** 2).sum(1, keepdim=True) / count_B11
        x_BFM = (x_BFM - mean_B1M) / var_B1M.sqrt().clamp(min=1e-5)
    b, _, m = x_BFM.shape
    return x_BFM[:, : t * stack].reshape(b, t, stack * m)
