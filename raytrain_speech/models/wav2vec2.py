"""wav2vec 2.0's two models: contrastive pretraining against Gumbel-softmax product-quantized targets, and
CTC fine-tuning; both on the encoder of ``wav2vec2_encoder.py`` (which holds the config, the presets
and the architecture notes).

Shapes: B = batch, S = waveform samples, C = feature-encoder channels, T = encoder frames,
D = Transformer width, N = masked frames in the batch, K = negatives per masked frame, F = final
(contrastive) dimension, G = codebook groups, V = entries per group, Q = codevector width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raytrain_speech.batch import Batch
from raytrain_speech.models.base import ChannelMasking, SpanMasking, SpeechModel, strip_wrapper_prefixes
from raytrain_speech.models.masking import model_span_mask
from raytrain_speech.models.wav2vec2_encoder import (
    PRESETS,
    EncoderOutput,
    Wav2Vec2Config,
    Wav2Vec2Encoder,
    fit_mask,
)

__all__ = ["PRESETS", "GumbelVectorQuantizer", "Wav2Vec2CTC", "Wav2Vec2Config", "Wav2Vec2Pretraining",
           "sample_negative_indices"]


def _channel_masking(cfg: Wav2Vec2Config) -> ChannelMasking | None:
    """Channel masks over the projected CNN features (both models, training only); None when off."""
    if cfg.mask_channel_prob <= 0 and cfg.mask_channel_min == 0:
        return None
    return ChannelMasking(cfg.mask_channel_prob, cfg.mask_channel_span, cfg.mask_channel_min, cfg.d_model)


class GumbelVectorQuantizer(nn.Module):
    """Product quantizer: G codebooks of V entries, chosen by straight-through Gumbel-softmax.

    Training picks a hard one-hot by Gumbel-softmax (gradients through the soft sample); eval picks
    the argmax. The codevector lookup is a (one-hot x codebook) matmul, never an (N, G, V, Q/G)
    broadcast, so large batches of masked frames stay cheap.
    """

    def __init__(self, in_dim: int, groups: int, entries: int, codevector_dim: int):
        super().__init__()
        self.groups, self.entries = groups, entries
        self.weight_proj = nn.Linear(in_dim, groups * entries)
        nn.init.normal_(self.weight_proj.weight, mean=0.0, std=1.0)
        nn.init.zeros_(self.weight_proj.bias)
        self.codevectors = nn.Parameter(torch.empty(1, groups * entries, codevector_dim // groups).uniform_())

    @property
    def num_codevectors(self) -> int:
        return self.groups * self.entries

    def forward(self, x_NC: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codevectors q_NQ, soft perplexity summed over groups, hard-code perplexity), both float32."""
        N = x_NC.shape[0]
        logits_NGV = self.weight_proj(x_NC).float().view(N, self.groups, self.entries)
        denom = max(N, 1)
        avg_probs_GV = logits_NGV.softmax(dim=-1).sum(dim=0) / denom
        prob_perplexity = torch.exp(-(avg_probs_GV * torch.log(avg_probs_GV + 1e-7)).sum(-1)).sum()
        hard_NGV = F.one_hot(logits_NGV.argmax(dim=-1), self.entries).float()
        with torch.no_grad():
            avg_hard_GV = hard_NGV.sum(dim=0) / denom
            code_perplexity = torch.exp(-(avg_hard_GV * torch.log(avg_hard_GV + 1e-7)).sum(-1)).sum()
        onehot_NGV = F.gumbel_softmax(logits_NGV, tau=temperature, hard=True) if self.training else hard_NGV
        book_GVE = self.codevectors.view(self.groups, self.entries, -1)
        q_GNE = torch.bmm(onehot_NGV.transpose(0, 1).to(book_GVE.dtype), book_GVE)
        return q_GNE.transpose(0, 1).reshape(N, -1), prob_perplexity, code_perplexity


def sample_negative_indices(mask_BT: torch.Tensor, num_negatives: int) -> torch.Tensor:
    """For each masked frame (row-major order of ``mask_BT``), K indices into that same order drawn
    uniformly from the OTHER masked frames of its utterance (fairseq's sample_negatives, per-row
    counts). A row with a single masked frame can only point at itself; the objective masks those
    out as negatives identical to the positive. Uses the torch RNG."""
    counts_B = mask_BT.sum(dim=1)
    offsets_B = torch.cumsum(counts_B, 0) - counts_B
    row_N = mask_BT.nonzero(as_tuple=True)[0]
    N = row_N.shape[0]
    pos_N = torch.arange(N, device=mask_BT.device) - offsets_B[row_N]
    others_N = (counts_B[row_N] - 1).clamp(min=1)
    r_NK = (torch.rand(N, num_negatives, device=mask_BT.device) * others_N[:, None]).long()
    r_NK = torch.minimum(r_NK, others_N[:, None] - 1)  # guard the float edge of rand * n
    r_NK = r_NK + (r_NK >= pos_N[:, None]).long()
    r_NK = torch.where((counts_B[row_N] <= 1)[:, None], pos_N[:, None], r_NK)
    return offsets_B[row_N][:, None] + r_NK


class Wav2Vec2Pretraining(SpeechModel):
    """Self-supervised wav2vec 2.0: contrastive prediction of quantized CNN features at masked frames.

    ``set_step(step)`` anneals the Gumbel temperature (the training loop calls it before every step;
    the temperature is a function of the step, so a resumed run continues the schedule exactly).
    """

    has_feature_encoder = True

    def __init__(self, cfg: Wav2Vec2Config, vocab_size: int = 0):
        super().__init__()
        del vocab_size  # no text output
        self.cfg = cfg
        self.encoder = Wav2Vec2Encoder(cfg)
        self.feature_dropout = nn.Dropout(cfg.feature_dropout)
        self.quantizer = GumbelVectorQuantizer(cfg.conv_channels, cfg.codebook_groups, cfg.codebook_entries,
                                               cfg.codevector_dim)
        self.project_q = nn.Linear(cfg.codevector_dim, cfg.final_dim)
        self.final_proj = nn.Linear(cfg.d_model, cfg.final_dim)
        self.step = 0

    @property
    def span_masking(self) -> SpanMasking:
        return SpanMasking(self.cfg.mask_prob, self.cfg.span_frames(self.cfg.mask_span_ms), self.cfg.min_masks)

    @property
    def channel_masking(self) -> ChannelMasking | None:
        return _channel_masking(self.cfg)

    def set_step(self, step: int) -> None:
        self.step = int(step)

    @property
    def gumbel_temperature(self) -> float:
        c = self.cfg
        return max(c.gumbel_temperature_start * c.gumbel_temperature_decay ** self.step, c.gumbel_temperature_end)

    def output_lengths(self, lengths_B: torch.Tensor) -> torch.Tensor:
        return self.encoder.output_lengths(lengths_B)

    def encode(self, features_BFM: torch.Tensor, lengths_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.encoder(features_BFM, lengths_B)
        return enc.context_BTD, enc.lengths_B

    def encoder_blocks(self) -> tuple[nn.ModuleList, bool]:
        return self.encoder.transformer.layers, False

    def feature_encoder_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.feature_extractor.parameters())

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Context vectors, quantized targets and negatives at the masked frames, plus the quantities the
        contrastive objective weighs in (see objectives/contrastive.py)."""
        waveform_BS, lengths_B = batch.features_BFM, batch.feature_lengths_B
        mask_BT = batch.mask_BT
        if mask_BT is None:  # unit tests, validation: the same function the loop uses, at (seed 0, epoch 0)
            mask_BT = model_span_mask(self, batch)
        channels_BC = batch.channel_mask_BC if self.training else None
        enc = self.encoder(waveform_BS, lengths_B, mask_BT.to(waveform_BS.device), channels_BC)
        mask_BT = fit_mask(mask_BT.to(waveform_BS.device), enc.valid_BT.shape[1]) & enc.valid_BT
        y_NC = self.feature_dropout(enc.features_BTC[mask_BT])
        q_NQ, prob_perplexity, code_perplexity = self.quantizer(y_NC, self.gumbel_temperature)
        targets_NF = self.project_q(q_NQ)
        context_NF = self.final_proj(enc.context_BTD[mask_BT])
        with torch.no_grad():
            neg_idx_NK = sample_negative_indices(mask_BT, self.cfg.num_negatives)
        negatives_NKF = targets_NF[neg_idx_NK]

        def scalar(v: float) -> torch.Tensor:
            return torch.full((), v, dtype=torch.float32, device=waveform_BS.device)
        return {
            "context_NF": context_NF, "targets_NF": targets_NF, "negatives_NKF": negatives_NKF,
            "mask_BT": mask_BT, "lengths_B": enc.lengths_B,
            "prob_perplexity": prob_perplexity, "code_perplexity": code_perplexity,
            "feature_penalty": enc.feature_penalty,
            "num_codevectors": scalar(self.quantizer.num_codevectors),
            "logit_temperature": scalar(self.cfg.logit_temperature),
            "diversity_weight": scalar(self.cfg.diversity_weight),
            "feature_penalty_weight": scalar(self.cfg.feature_penalty_weight),
            "gumbel_temperature": scalar(self.gumbel_temperature),
        }


class Wav2Vec2CTC(SpeechModel):
    """Fine-tuning: the (pretrained) encoder + dropout + a Linear head over characters and blank.

    Output like ConformerCTC: float32 ``log_probs_BTV`` and ``lengths_B``. Time masking during
    fine-tuning reuses ``batch.mask_BT`` when the loop drew one (``mask_prob`` > 0, i.e.
    ``finetune_mask_prob``), in training mode only.
    """

    has_feature_encoder = True

    def __init__(self, cfg: Wav2Vec2Config, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.encoder = Wav2Vec2Encoder(cfg)
        self.dropout = nn.Dropout(cfg.final_dropout)
        self.head = nn.Linear(cfg.d_model, vocab_size)

    @property
    def span_masking(self) -> SpanMasking | None:
        """Fine-tuning time masks (fairseq's mask_prob while fine-tuning); None when off."""
        c = self.cfg
        if c.finetune_mask_prob <= 0 and c.finetune_min_masks == 0:
            return None
        return SpanMasking(c.finetune_mask_prob, c.span_frames(c.finetune_mask_span_ms), c.finetune_min_masks)

    @property
    def channel_masking(self) -> ChannelMasking | None:
        return _channel_masking(self.cfg)

    def output_lengths(self, lengths_B: torch.Tensor) -> torch.Tensor:
        return self.encoder.output_lengths(lengths_B)

    def encode(self, features_BFM: torch.Tensor, lengths_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.encoder(features_BFM, lengths_B)
        return enc.context_BTD, enc.lengths_B

    def encoder_blocks(self) -> tuple[nn.ModuleList, bool]:
        return self.encoder.transformer.layers, False

    def feature_encoder_parameters(self) -> list[nn.Parameter]:
        """The CNN's parameters: the trainer's group to freeze (LR 0) for the first N fine-tuning steps."""
        return list(self.encoder.feature_extractor.parameters())

    def load_pretrained(self, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
        """Copy the ``encoder.*`` tensors of a Wav2Vec2Pretraining state dict (DDP ``module.`` and
        torch.compile ``_orig_mod.`` prefixes are stripped). Pretraining-only heads (quantizer,
        project_q, final_proj) are ignored. Returns (missing encoder keys, unexpected encoder keys)."""
        sub = {}
        for key, value in state.items():
            key = strip_wrapper_prefixes(key)
            if key.startswith("encoder."):
                sub[key[len("encoder."):]] = value
        result = self.encoder.load_state_dict(sub, strict=False)
        return list(result.missing_keys), list(result.unexpected_keys)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return self.ctc_forward(batch)[1]

    def ctc_forward(self, batch: Batch) -> tuple[EncoderOutput, dict[str, torch.Tensor]]:
        """The encoder pass (training masks applied) and the CTC outputs: what subclasses build on."""
        mask_BT = batch.mask_BT if (self.training and batch.mask_BT is not None) else None
        channels_BC = batch.channel_mask_BC if self.training else None
        enc = self.encoder(batch.features_BFM, batch.feature_lengths_B, mask_BT, channels_BC)
        logits_BTV = self.head(self.dropout(enc.context_BTD))
        return enc, {"log_probs_BTV": logits_BTV.float().log_softmax(dim=-1), "lengths_B": enc.lengths_B}


