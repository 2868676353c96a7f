"""The interface every model family implements: what the Trainer, validation, evaluation, fine-tuning
and the probes may ask of a model, and nothing else.

Shapes: B = batch, F = input frames (samples for waveform models), T = encoder frames, D = width.

A family is a ``SpeechModel`` subclass + an objective + a recipe YAML (``registry.py``). The Trainer
never looks inside a model: it calls ``forward(batch)``, asks ``span_masking`` whether to draw
self-supervised span masks before the step, calls ``set_step`` before each step, and freezes
``feature_encoder_parameters()`` or the parameters ``load_pretrained`` loaded while fine-tuning.
Defaults here are the behaviour of a family that has none of these (no masks, no schedule, no
separate feature encoder, load by name and shape).

Output keys of ``forward`` (float32 where they are scores): CTC families ``log_probs_BTV``,
``lengths_B``; encoder-decoder families ``logits_BLV``, ``decoder_targets_BL`` (``batch.IGNORE_ID`` where
no loss), ``lengths_B``; masked-prediction families ``pred_BTP``, ``target_BTP``, ``mask_BT``; wav2vec 2.0
pretraining its contrastive quantities (objectives/contrastive.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from raytrain_speech.batch import Batch


@dataclass(frozen=True)
class SpanMasking:
    """A family's self-supervised span masks over its encoder frames (``masking.frame_span_mask``)."""

    prob: float
    """Probability that a span starts at each encoder frame."""
    span_frames: int
    """Span length in encoder frames."""
    min_spans: int
    """Spans every utterance gets at least."""


@dataclass(frozen=True)
class ChannelMasking:
    """A family's channel masks over its encoder's input features (``masking.channel_mask``)."""

    prob: float
    """Share of the channels masked, before overlaps (fairseq's mask_channel_prob, same meaning)."""
    span_channels: int
    """Width of each masked block of adjacent channels (fairseq's mask_channel_length)."""
    min_spans: int
    """Blocks every utterance gets at least (2 with prob 0: SpecAugment's two frequency masks)."""
    num_channels: int
    """Channels of the features the mask applies to."""


class SpeechModel(nn.Module):
    """Base class of every family's model (plain torch, single device)."""

    has_feature_encoder: ClassVar[bool] = False
    """Whether ``feature_encoder_parameters`` names a separate front-end network (train.freeze_feature_encoder_steps)."""

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def output_lengths(self, lengths_B: torch.Tensor) -> torch.Tensor:
        """Encoder frames per row for input lengths ``lengths_B`` (frames, or samples for waveforms)."""
        raise NotImplementedError

    def encode(self, features_BFM: torch.Tensor, lengths_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(encoder states h_BTD, their lengths), without any masking: what probes and decoders read."""
        raise NotImplementedError

    def encoder_blocks(self) -> tuple[nn.ModuleList, bool]:
        """The encoder's block list, and whether a block's output is time-first (torchaudio's Conformer):
        the layers whose outputs the probes average."""
        raise NotImplementedError(f"{type(self).__name__} exposes no encoder blocks")

    @property
    def span_masking(self) -> SpanMasking | None:
        """The span masks the Trainer draws for this model before every step (None = none)."""
        return None

    @property
    def channel_masking(self) -> ChannelMasking | None:
        """The channel masks the Trainer draws for this model before every training step (None = none)."""
        return None

    def set_step(self, step: int) -> None:
        """Schedules that live inside the model (wav2vec 2.0's Gumbel temperature), as a function of the
        optimizer step, so a resumed run continues them exactly."""

    def feature_encoder_parameters(self) -> list[nn.Parameter]:
        """The front-end network's parameters (the convolutional feature encoder), if it has one."""
        return []

    def load_pretrained(self, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
        """Copy a pretraining checkpoint's weights (train.init_from); returns (own tensors left as
        initialised, checkpoint tensors not used). By default every tensor whose name and shape match;
        families that fine-tune another family's encoder override this."""
        own = self.state_dict()
        state = {strip_wrapper_prefixes(k): v for k, v in state.items()}
        fits = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        self.load_state_dict(fits, strict=False)
        return sorted(set(own) - set(fits)), sorted(set(state) - set(fits))


class Seq2SeqModel(SpeechModel):
    """An encoder-decoder family: searches read ``decoding_inputs`` and ``decoder``."""

    decoder: nn.Module

    def decoding_inputs(self, batch: Batch) -> dict:
        """Keyword arguments of the decoder's greedy search and of ``evaluate.beam.attention_beam_search``:
        encoder memory and lengths, prompt, end token, allowed ids, length cap."""
        raise NotImplementedError

    def transcribe(self, batch: Batch, max_len: int | None = None) -> list[list[int]]:
        """Greedy transcripts as tokenizer ids (no specials, no blank)."""
        return self.decoder.greedy_from(self.decoding_inputs(batch), max_len)


def strip_wrapper_prefixes(key: str) -> str:
    """A state-dict key without DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes."""
    for prefix in ("module.", "_orig_mod."):
        key = key.removeprefix(prefix)
    return key
