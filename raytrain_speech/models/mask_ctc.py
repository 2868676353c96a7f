"""Mask-CTC (Higuchi et al., 2020): the NAR recipe's raw-waveform CTC encoder followed by a non-autoregressive
Transformer decoder, a conditional masked language model over the CTC hypothesis.

Why this decoder: seed 001 describes the encoder as "followed by a standard Transformer decoder for text
generation" in a non-autoregressive system; Mask-CTC is the published way to put an attention decoder
behind a CTC encoder without giving up parallel decoding. Training masks a uniformly drawn number
(1..L) of each transcript's tokens and teaches the decoder to predict them from the rest and the
encoder states (``objectives/mask_ctc.py`` adds its loss to CTC's). Decoding takes the greedy CTC
hypothesis, masks the tokens whose CTC confidence is below a threshold (Mask-CTC's 0.999) and fills
them in K parallel iterations, the most confident predictions first (``refine``). The hypothesis
keeps its length: Mask-CTC corrects substitutions, not insertions or deletions.

Shapes: B = batch, S = waveform samples, T = encoder frames, D = width, L = tokens, V = vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from raytrain_speech.batch import BLANK_ID, Batch
from raytrain_speech.config import require
from raytrain_speech.models.layers import TransformerDecoderLayer, sinusoids
from raytrain_speech.models.wav2vec2 import Wav2Vec2CTC
from raytrain_speech.models.wav2vec2_encoder import Wav2Vec2Config

EVAL_MASK_SEED = 0
"""Validation draws its decoder masks from this seed, so valid_loss compares across steps."""


@dataclass
class MaskCTCConfig(Wav2Vec2Config):
    """wav2vec 2.0's encoder config plus the refinement decoder's (nar_ctc)."""

    decoder_layers: int = 6
    """Refinement decoder blocks (Mask-CTC: 6); 0 = no decoder, plain CTC."""
    decoder_heads: int = 0
    """Its attention heads; 0 = the encoder's num_heads."""
    decoder_ffn_dim: int = 0
    """Its MLP width; 0 = the encoder's ffn_dim."""
    decoder_dropout: float = 0.1
    """Dropout in the decoder's blocks and embeddings."""
    ctc_weight: float = 0.3
    """Loss = w x CTC + (1 - w) x masked-token cross-entropy (Mask-CTC and ESPnet: 0.3)."""

    def validate(self) -> None:
        super().validate()
        key = "model.overrides."
        require(self.decoder_layers >= 0, key + "decoder_layers", "must be >= 0 (0 = no refinement decoder)")
        require(self.decoder_heads >= 0 and self.decoder_ffn_dim >= 0, key + "decoder_heads",
                "decoder_heads and decoder_ffn_dim must be >= 0 (0 = the encoder's)")
        require(self.d_model % (self.decoder_heads or self.num_heads) == 0, key + "decoder_heads",
                f"must divide d_model ({self.d_model})")
        require(0.0 <= self.decoder_dropout < 1.0, key + "decoder_dropout", "must be in [0, 1)")
        require(0.0 < self.ctc_weight <= 1.0, key + "ctc_weight", "must be in (0, 1] (the CTC head decodes first)")


class MaskedTokenDecoder(nn.Module):
    """A conditional masked LM: every position sees every other (no causal mask) and the encoder memory.

    The input vocabulary is the tokenizer's plus one ``mask_id`` (= V); the output is the tokenizer's.
    Positions are sinusoidal, so no transcript is too long for it and checkpoints carry no table.
    """

    def __init__(self, vocab_size: int, d_model: int, num_heads: int, ffn_dim: int, num_layers: int,
                 dropout: float):
        super().__init__()
        self.vocab_size, self.mask_id, self.d_model = vocab_size, vocab_size, d_model
        self.embed = nn.Embedding(vocab_size + 1, d_model)
        # fairseq's choice: N(0, 1/D) scaled by sqrt(D) at the input, the same size as the sinusoids.
        nn.init.normal_(self.embed.weight, std=d_model ** -0.5)
        self.layers = nn.ModuleList(TransformerDecoderLayer(d_model, num_heads, ffn_dim, dropout)
                                    for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, vocab_size)
        self.drop = nn.Dropout(dropout)

    def forward(self, tokens_BL: torch.Tensor, lengths_B: torch.Tensor, memory_BTD: torch.Tensor,
                memory_lengths_B: torch.Tensor) -> torch.Tensor:
        """Logits (B, L, V) for every position (padding positions are computed and meaningless)."""
        length = tokens_BL.shape[1]
        x_BLD = self.embed(tokens_BL) * math.sqrt(self.d_model)
        x_BLD = self.drop(x_BLD + sinusoids(length, self.d_model).to(x_BLD))
        for layer in self.layers:
            x_BLD = layer(x_BLD, memory_BTD, memory_lengths_B, causal=False, lengths_B=lengths_B)
        return self.out(self.norm(x_BLD))


def mask_tokens(targets_BL: torch.Tensor, lengths_B: torch.Tensor, mask_id: int,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask-CTC's training input: per row n ~ U{1..L} of its L tokens replaced by ``mask_id`` at random
    positions. Returns (decoder input, float weights): the weight of a masked token is L / n (0 elsewhere),
    so a row's weighted cross-entropy is L x its mean over masked tokens and the loss, like CTC's, is
    a sum over target tokens (its normaliser is then known before the forward pass). Draws on the CPU
    (the torch RNG the checkpoint restores) and moves the result to the targets' device."""
    b, length = targets_BL.shape
    lengths_cpu_B = lengths_B.detach().to("cpu", torch.long)
    valid_BL = torch.arange(length)[None, :] < lengths_cpu_B[:, None]
    count_B = torch.minimum((torch.rand(b, generator=generator) * lengths_cpu_B).long() + 1, lengths_cpu_B)
    scores_BL = torch.rand(b, length, generator=generator).masked_fill(~valid_BL, 2.0)
    rank_BL = scores_BL.argsort(dim=1).argsort(dim=1)
    masked_BL = (rank_BL < count_B[:, None]) & valid_BL
    weights_BL = masked_BL.float() * (lengths_cpu_B.float() / count_B.clamp(min=1).float())[:, None]
    device = targets_BL.device
    masked_BL = masked_BL.to(device)
    body_BL = torch.where(valid_BL.to(device), targets_BL, torch.full_like(targets_BL, BLANK_ID))
    return body_BL.masked_fill(masked_BL, mask_id), weights_BL.to(device)


def token_confidences(log_probs_BTV: torch.Tensor, lengths_B: torch.Tensor) -> list[tuple[list[int], list[float]]]:
    """The greedy CTC hypothesis of each row with one confidence per token: the highest frame posterior
    among the run of frames that emitted it (Mask-CTC's token-level CTC probability)."""
    conf_BT, best_BT = log_probs_BTV.float().exp().max(dim=-1)
    rows = []
    for best, conf, n in zip(best_BT.cpu().tolist(), conf_BT.cpu().tolist(), lengths_B.cpu().tolist()):
        ids, confs, prev = [], [], None
        for tok, p in zip(best[:n], conf[:n]):
            if tok != prev and tok != BLANK_ID:
                ids.append(tok)
                confs.append(p)
            elif tok == prev and tok != BLANK_ID:
                confs[-1] = max(confs[-1], p)
            prev = tok
        rows.append((ids, confs))
    return rows


class MaskCTC(Wav2Vec2CTC):
    """nar_ctc: the wav2vec 2.0 encoder, a CTC head, and (``decoder_layers`` > 0) the refinement decoder.

    ``forward`` adds ``memory_BTD`` (encoder states) and, when the batch has transcripts,
    ``mlm_logits_BLV`` / ``mlm_weights_BL`` (the masked-token predictions and their loss weights) to
    the CTC outputs. Training masks with the torch RNG (like dropout); validation with a fixed seed.
    """

    def __init__(self, cfg: MaskCTCConfig, vocab_size: int):
        super().__init__(cfg, vocab_size)
        self.decoder = None
        if cfg.decoder_layers:
            self.decoder = MaskedTokenDecoder(vocab_size, cfg.d_model, cfg.decoder_heads or cfg.num_heads,
                                              cfg.decoder_ffn_dim or cfg.ffn_dim, cfg.decoder_layers,
                                              cfg.decoder_dropout)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        enc, out = self.ctc_forward(batch)
        if self.decoder is None:
            return out
        out["memory_BTD"] = enc.context_BTD
        if batch.targets_BL.numel():
            generator = None if self.training else torch.Generator().manual_seed(EVAL_MASK_SEED)
            tokens_BL, weights_BL = mask_tokens(batch.targets_BL, batch.target_lengths_B, self.decoder.mask_id,
                                                generator)
            logits_BLV = self.decoder(tokens_BL, batch.target_lengths_B, enc.context_BTD, enc.lengths_B)
            out.update(mlm_logits_BLV=logits_BLV.float(), mlm_weights_BL=weights_BL)
        return out

    @torch.no_grad()
    def refine(self, out: dict[str, torch.Tensor], iterations: int, threshold: float) -> list[list[int]]:
        """Mask-CTC decoding: the greedy CTC hypothesis with its tokens below ``threshold`` confidence
        masked, then filled in ``iterations`` decoder passes (a row with fewer masks than that needs
        one pass per mask): each pass fixes the ``masks // passes`` most confident predictions and
        the last pass fills the rest. Blank is never predicted."""
        rows = token_confidences(out["log_probs_BTV"], out["lengths_B"])
        if self.decoder is None or iterations <= 0:
            return [ids for ids, _ in rows]
        b, longest = len(rows), max((len(ids) for ids, _ in rows), default=0)
        if longest == 0:
            return [[] for _ in rows]
        memory_BTD = out["memory_BTD"]
        device = memory_BTD.device
        tokens_BL = torch.zeros(b, longest, dtype=torch.long)
        masked_BL = torch.zeros(b, longest, dtype=torch.bool)
        lengths_B = torch.tensor([len(ids) for ids, _ in rows])
        for i, (ids, confs) in enumerate(rows):
            tokens_BL[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            masked_BL[i, : len(ids)] = torch.tensor(confs) < threshold
        tokens_BL = tokens_BL.masked_fill(masked_BL, self.decoder.mask_id).to(device)
        masked_BL, lengths_B = masked_BL.to(device), lengths_B.to(device)
        count_B = masked_BL.sum(dim=1)
        passes_B = count_B.clamp(max=iterations)
        per_pass_B = count_B // passes_B.clamp(min=1)
        for t in range(int(passes_B.max())):
            logits_BLV = self.decoder(tokens_BL, lengths_B, memory_BTD, out["lengths_B"]).float()
            logits_BLV[..., BLANK_ID] = float("-inf")
            score_BL, pred_BL = logits_BLV.log_softmax(dim=-1).max(dim=-1)
            score_BL = score_BL.masked_fill(~masked_BL, float("-inf"))
            rank_BL = score_BL.argsort(dim=1, descending=True).argsort(dim=1)
            take_B = torch.where(passes_B == t + 1, masked_BL.sum(dim=1), per_pass_B)
            fill_BL = masked_BL & (rank_BL < take_B[:, None]) & (t < passes_B)[:, None]
            tokens_BL = torch.where(fill_BL, pred_BL, tokens_BL)
            masked_BL = masked_BL & ~fill_BL
        return [row[:n] for row, n in zip(tokens_BL.tolist(), lengths_B.tolist())]

