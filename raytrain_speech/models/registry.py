"""Model families and their named presets: the only place a config's ``model`` section is read.

A family is (config dataclass, presets, module class, objective). Presets are plain dicts of
overrides on the family's defaults, so a recipe names a preset and may still override any field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from raytrain_speech.config import ConfigError, ModelSpec, from_dict, require, to_dict
from raytrain_speech.models import (
    activation_checkpointing,
    conformer,
    mask_ctc,
    wav2vec2,
    wavlm,
    wavlm_waveform,
    whisper,
)
from raytrain_speech.objectives import Objective, contrastive, ctc, hybrid, masked, seq2seq
from raytrain_speech.objectives import mask_ctc as mask_ctc_objective


@dataclass(frozen=True)
class Family:
    config_cls: type
    presets: dict[str, dict]
    builder: Any
    objective: str
    """Module of raytrain_speech.objectives that trains it."""
    input_kind: str
    """log_mel or waveform (must match features.kind)."""
    text_output: str | None
    """How text comes out: ctc (log_probs_BTV), seq2seq (model.transcribe), None (self-supervised)."""
    summary: str
    init_from_families: tuple[str, ...] = ()
    """Families whose checkpoints can initialise this one (train.init_from); itself is always allowed."""


NAR_PRESETS: dict[str, dict] = {
    # The NAR recipe (seed 001) leaves the size open. Its encoder is wav2vec 2.0's: a 7-layer strided
    # conv stack on the raw waveform (320x subsampling, 20 ms frames) and a Transformer, with a CTC head;
    # sharing the architecture means its "pretrain on unlabelled audio" stage is the wav2vec2 family at
    # the same preset, loaded by train.init_from. Full size: wav2vec 2.0 Base (12 x 768, 94.4 M). The
    # "standard Transformer decoder" after it is Mask-CTC's non-autoregressive refinement decoder
    # (models/mask_ctc.py): 6 blocks at the encoder's width (Mask-CTC's depth), 2 at tiny size.
    "tiny": {**wav2vec2.PRESETS["tiny"], "decoder_layers": 2},
    "base": {**wav2vec2.PRESETS["base"], "decoder_layers": 6},
}

FAMILIES: dict[str, Family] = {
    "conformer_ctc": Family(conformer.ConformerCTCConfig, conformer.PRESETS, conformer.ConformerCTC,
                            objective="ctc", input_kind="log_mel", text_output="ctc",
                            summary="Conformer encoder on log-mel, CTC over characters",
                            init_from_families=("conformer_mlm",)),
    "conformer_aed": Family(conformer.ConformerAEDConfig, conformer.AED_PRESETS, conformer.ConformerAED,
                            objective="hybrid", input_kind="log_mel", text_output="seq2seq",
                            summary="Conformer encoder + Transformer decoder, hybrid CTC/attention loss",
                            init_from_families=("conformer_mlm", "conformer_ctc")),
    "conformer_mlm": Family(conformer.ConformerMLMConfig, conformer.MLM_PRESETS, conformer.ConformerMLM,
                            objective="masked", input_kind="log_mel", text_output=None,
                            summary="Conformer encoder SSL pretraining: masked log-mel reconstruction"),
    "whisper": Family(whisper.WhisperConfig, whisper.PRESETS, whisper.Whisper, objective="seq2seq",
                      input_kind="log_mel", text_output="seq2seq",
                      summary="Whisper-style encoder-decoder, teacher-forced cross-entropy"),
    "wav2vec2": Family(wav2vec2.Wav2Vec2Config, wav2vec2.PRESETS, wav2vec2.Wav2Vec2Pretraining,
                       objective="contrastive", input_kind="waveform", text_output=None,
                       summary="wav2vec 2.0 contrastive pretraining: span masks, Gumbel product quantizer"),
    "wav2vec2_ctc": Family(wav2vec2.Wav2Vec2Config, wav2vec2.PRESETS, wav2vec2.Wav2Vec2CTC, objective="ctc",
                           input_kind="waveform", text_output="ctc",
                           summary="wav2vec 2.0 encoder fine-tuned with CTC (train.init_from a wav2vec2 run)",
                           init_from_families=("wav2vec2",)),
    "nar_ctc": Family(mask_ctc.MaskCTCConfig, NAR_PRESETS, mask_ctc.MaskCTC, objective="mask_ctc",
                      input_kind="waveform", text_output="ctc",
                      summary="non-autoregressive raw-waveform encoder (strided convs + Transformer), CTC + "
                              "Mask-CTC refinement decoder",
                      init_from_families=("wav2vec2",)),
    "wavlm": Family(wavlm.WavLMConfig, wavlm.PRESETS, wavlm.WavLMPretraining, objective="masked",
                    input_kind="log_mel", text_output=None,
                    summary="WavLM-style masked speech modelling (gated relative position bias)"),
    "wavlm_ctc": Family(wavlm.WavLMConfig, wavlm.PRESETS, wavlm.WavLMCTC, objective="ctc",
                        input_kind="log_mel", text_output="ctc",
                        summary="WavLM encoder fine-tuned with CTC (train.init_from a wavlm run)",
                        init_from_families=("wavlm",)),
    "wavlm_waveform_ctc": Family(wavlm_waveform.WavLMWaveformConfig, wavlm_waveform.PRESETS,
                                 wavlm_waveform.WavLMWaveformCTC, objective="ctc", input_kind="waveform",
                                 text_output="ctc",
                                 summary="WavLM as published (waveform CNN, gated relative position bias), CTC; "
                                         "from a WavLM directory (train.init_from=hf:)"),
}


def check_config(cfg) -> None:
    """The ``model`` section resolved against its family (known family and preset, valid overrides),
    and the family's rules on the other sections; ConfigError naming the key. The config package is a
    leaf and cannot know the families, so every entry point (CLI, ``train.preflight``, sweeps) calls
    this once the config is loaded."""
    fam = family(cfg.model)
    model_cfg = resolve(cfg.model)
    kind = "log_mel" if cfg.features.kind == "whisper_log_mel" else cfg.features.kind
    require(fam.input_kind == kind, "features.kind",
            f"model family {cfg.model.family} needs {fam.input_kind!r} input")
    if cfg.train.freeze_feature_encoder_steps:
        require(fam.builder.has_feature_encoder, "train.freeze_feature_encoder_steps",
                f"model family {cfg.model.family} has no separate feature encoder to freeze")
    if fam.text_output is None:
        for key, value in (("train.early_stop_metric", cfg.train.early_stop_metric if
                            cfg.train.early_stop_patience else None),
                           ("run.checkpoint_score_attribute", cfg.run.checkpoint_score_attribute)):
            require(value not in ("valid_wer", "valid_cer"), key,
                    f"{cfg.model.family} is self-supervised (no transcripts out); use valid_loss")
    require(cfg.data.crop_s is None or fam.text_output is None, "data.crop_s",
            f"crops audio away from its transcript; only self-supervised families may crop ({cfg.model.family} "
            "reads transcripts)")
    require(not cfg.eval.refine_iterations or getattr(model_cfg, "decoder_layers", 0) > 0, "eval.refine_iterations",
            f"needs the Mask-CTC refinement decoder, which only nar_ctc has (model.overrides.decoder_layers > 0); "
            f"{cfg.model.family} has none, so set it to 0")
    if hasattr(model_cfg, "n_mels"):
        require(model_cfg.n_mels == cfg.features.n_mels, "features.n_mels",
                f"is {cfg.features.n_mels} but the model expects {model_cfg.n_mels}")


def family(spec: ModelSpec) -> Family:
    if spec.family not in FAMILIES:
        raise ConfigError(f"model.family: unknown family {spec.family!r} (known: {', '.join(FAMILIES)})")
    return FAMILIES[spec.family]


def resolve(spec: ModelSpec) -> Any:
    """The family's typed config: defaults <- preset <- overrides (unknown fields are errors)."""
    fam = family(spec)
    if spec.preset not in fam.presets:
        raise ConfigError(f"model.preset: {spec.family} has no preset {spec.preset!r} "
                          f"(known: {', '.join(fam.presets)})")
    merged = {**fam.presets[spec.preset], **spec.overrides}
    return from_dict(fam.config_cls, merged, prefix="model.overrides.")


def build_model(spec: ModelSpec, vocab_size: int, specials: dict[str, int] | None = None) -> nn.Module:
    """The family's module for a tokenizer of ``vocab_size`` ids; ``specials`` are the special tokens a
    tokenizer file defines (Whisper's prompt tokens in its tokenizer.json), which only Whisper reads."""
    fam = family(spec)
    if specials:
        require(fam.builder is whisper.Whisper, "text.tokenizer",
                f"a tokenizer.json with special tokens (text.tokenizer=hf) is for the whisper family, not "
                f"{spec.family} (use sentencepiece or char)")
        model = fam.builder(resolve(spec), vocab_size, specials)
    else:
        model = fam.builder(resolve(spec), vocab_size)
    activation_checkpointing.apply(model, spec.activation_checkpointing)
    return model


def check_tokenizer(spec: ModelSpec, tokenizer) -> None:
    """ConfigError when a family cannot train on ``tokenizer`` (a CTC loss needs a blank id)."""
    fam = family(spec)
    needs_blank = fam.objective in ("ctc", "hybrid", "mask_ctc")
    require(not needs_blank or tokenizer.blank_id is not None, "text.tokenizer",
            f"{spec.family} trains with CTC, which needs a blank id; text.tokenizer={tokenizer.kind} has none "
            "(use sentencepiece or char)")
    if fam.text_output is not None:
        build_meta(spec, tokenizer.vocab_size, tokenizer.specials or None)  # Whisper checks its tokens here


def target_limits(spec: ModelSpec, specials: dict[str, int] | None = None,
                  max_target_tokens: int | None = None) -> dict:
    """How long a training target may be: ``max_tokens`` (decoder positions after the prompt, or
    ``max_target_tokens`` if lower) and, for CTC, encoder frames per input unit (keyword arguments of
    data.preprocess.TargetLimits). Self-supervised families: no limits."""
    fam = family(spec)
    out: dict = {}
    if fam.text_output is None:
        return out
    if fam.text_output == "seq2seq":
        prompt = whisper.prompt_length(specials) if fam.builder is whisper.Whisper else 1  # AED: <sot>
        out["max_tokens"] = resolve(spec).max_target_positions - prompt
    if max_target_tokens is not None:
        out["max_tokens"] = min(out.get("max_tokens", max_target_tokens), max_target_tokens)
    if fam.objective in ("ctc", "hybrid", "mask_ctc"):  # the encoder's own frame count, from a meta-device model
        model = build_meta(spec, 64)
        big = 1_000_000
        per_frame = big / float(model.output_lengths(torch.tensor([big]))[0])
        grid = torch.arange(1, 4000)
        slack = float((grid / per_frame - model.output_lengths(grid)).max().clamp(min=0))
        out.update(ctc_inputs_per_frame=per_frame, ctc_frame_slack=slack)
    return out


OBJECTIVES = {"ctc": ctc.objective, "hybrid": hybrid.objective, "masked": masked.objective,
              "seq2seq": seq2seq.objective, "contrastive": contrastive.objective,
              "mask_ctc": mask_ctc_objective.objective}
"""Objective name (``Family.objective``) -> its constructor from the model's resolved config (which
carries weights such as the CTC share of a hybrid loss)."""


def objective_for(spec: ModelSpec) -> Objective:
    """The family's objective, built from the model's resolved config."""
    return OBJECTIVES[family(spec).objective](resolve(spec))


def build_meta(spec: ModelSpec, vocab_size: int, specials: dict[str, int] | None = None) -> nn.Module:
    """The model on the meta device: parameter counts of billion-parameter presets without memory."""
    with torch.device("meta"):
        return build_model(spec, vocab_size, specials)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def describe(spec: ModelSpec) -> dict:
    return {"family": spec.family, "preset": spec.preset, **to_dict(resolve(spec))}


def presets_table(names: list[str], chars_vocab_size: int) -> list[str]:
    """One line per (family, preset): parameters counted on the meta device, so billion-parameter
    presets list in a second without memory. A preset published with a tokenizer (Whisper large-v3:
    Whisper's 51,866 ids) is counted with that vocabulary's size and special-token layout; the others
    with the character tokenizer's ``chars_vocab_size``."""
    lines = [f"{'family':<19} {'preset':<11} {'parameters':>15} {'vocabulary':>22}  {'objective':<11} {'input':<9} "
             "description"]
    for name in names:
        fam = family(ModelSpec(family=name))
        for preset in fam.presets:
            spec = ModelSpec(family=name, preset=preset)
            published = getattr(resolve(spec), "vocab_size", None) if name == "whisper" else None
            if published:
                model = build_meta(spec, published, whisper.published_specials(resolve(spec)))
                vocab = f"{published:,} (Whisper BPE)"
            else:
                model = build_meta(spec, chars_vocab_size)
                vocab = f"{chars_vocab_size} (chars)" if fam.text_output else "-"
            lines.append(f"{name:<19} {preset:<11} {count_parameters(model):>15,} {vocab:>22}  {fam.objective:<11} "
                         f"{fam.input_kind:<9} {fam.summary}")
    return lines

