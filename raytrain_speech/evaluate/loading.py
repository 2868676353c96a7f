"""A trained model ready to decode: from a training checkpoint, a run directory (its latest
checkpoint) or an exported artifact, with the config it was trained with (no Ray).

The checkpoint carries its resolved config, so evaluation, transcription, export and probes need
nothing but its URI; overrides (decoding settings, another corpus root) apply on top.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import yaml

from raytrain_speech.config import Config, ConfigError, StorageConfig, apply_overrides
from raytrain_speech.data.preprocess import Preprocessor
from raytrain_speech.data.tokenizer import tokenizer_in
from raytrain_speech.evaluate import artifact
from raytrain_speech.hf import directory as hfdir
from raytrain_speech.hf import importer
from raytrain_speech.models.conformer import ConformerCTC, checkpoint_attention
from raytrain_speech.models.mask_ctc import MaskCTC
from raytrain_speech.models.registry import build_model, family
from raytrain_speech.train.checkpoint import read_checkpoint, resolve_checkpoint


@dataclass
class LoadedModel:
    """A model ready to decode, with the config it was trained (or exported) with."""

    cfg: Config
    model: torch.nn.Module
    step: int
    weights: str
    """'ema' | 'live' | 'int8' / 'fp32' (an exported artifact)."""
    pre: Preprocessor
    text_output: str | None
    uri: str = ""
    """The checkpoint directory (a run directory resolved to its latest checkpoint) or artifact."""


def config_from_yaml(config_yaml: str, overrides, storage_cfg: StorageConfig | None) -> Config:
    """A checkpoint's saved config with ``overrides`` applied (and this command's storage settings)."""
    cfg = Config.from_dict(apply_overrides(yaml.safe_load(config_yaml), list(overrides)))
    if storage_cfg is not None:
        cfg.storage = storage_cfg
    return cfg


def load_model(uri: str, storage_cfg: StorageConfig | None = None, overrides=(), need_text: bool = True,
               weights: str | None = None) -> LoadedModel:
    """A training checkpoint (EMA weights when it has them and ``eval.use_ema``), a run directory (its
    latest checkpoint) or an exported artifact (evaluate/artifact.py), ready for ``model.eval()`` use.
    ``weights='live'`` forces the live weights of a checkpoint. ``hf:PATH``: a Hugging Face model
    directory, decoded with its own head and tokenizer (hf/importer.py)."""
    if hfdir.is_hf(uri):
        return _load_hf(uri, storage_cfg, overrides, need_text)
    is_artifact = artifact.is_artifact(uri, storage_cfg)
    if is_artifact:
        payload, config_yaml = artifact.read_artifact(uri, storage_cfg)
    else:
        uri = resolve_checkpoint(uri, storage_cfg)
        payload, config_yaml = read_checkpoint(uri, storage_cfg)
    cfg = config_from_yaml(config_yaml, overrides, storage_cfg)
    _conformer_attention_of(cfg, payload, is_artifact)
    _nar_decoder_of(cfg, payload, is_artifact)
    text_output = family(cfg.model).text_output
    if need_text and text_output is None:
        raise ConfigError(f"{uri}: model family {cfg.model.family} is self-supervised and has no text "
                          "output to score; fine-tune it first (train.init_from) and evaluate that run, "
                          "or probe its features (raytrain-speech probe)")
    # Scoring reads the reference as text, so a transcript the tokenizer cannot encode is still scored.
    pre = Preprocessor(cfg.features, cfg.text, tokenizer=tokenizer_in(uri, cfg.text, storage_cfg),
                       targets_required=False)
    if is_artifact:
        model = artifact.build_from_artifact(payload, cfg, pre.tokenizer)
        return LoadedModel(cfg, model, payload["step"], payload["quantize"], pre, text_output, uri)
    model = build_model(cfg.model, pre.tokenizer.vocab_size, pre.tokenizer.specials or None)
    state = payload["model"]
    use_ema = (weights or ("ema" if cfg.eval.use_ema else "live")) == "ema" and bool(payload.get("ema"))
    if use_ema:
        state = {**state, **{k: v.to(state[k].dtype) for k, v in payload["ema"].items()}}
    model.load_state_dict(state)
    model.eval()
    return LoadedModel(cfg, model, payload["train_state"]["step"], "ema" if use_ema else "live", pre, text_output,
                       uri)


def _tensor_names(payload: dict, is_artifact: bool) -> list[str]:
    """The model tensor names a checkpoint or an exported artifact holds."""
    return [*payload["state"], *payload["weight_only_int8"]] if is_artifact else list(payload["model"])


def _conformer_attention_of(cfg: Config, payload: dict, is_artifact: bool) -> None:
    """A Conformer checkpoint whose config predates ``attention`` (the default is now rel_pos) is built
    the way it was trained: position-free, torchaudio's blocks, when its weights have no position biases."""
    if not issubclass(family(cfg.model).builder, ConformerCTC) or "attention" in cfg.model.overrides:
        return
    if checkpoint_attention(_tensor_names(payload, is_artifact)) == "none":
        cfg.model.overrides["attention"] = "none"


def _nar_decoder_of(cfg: Config, payload: dict, is_artifact: bool) -> None:
    """A nar_ctc checkpoint from before the refinement decoder (its config does not name decoder_layers,
    which now defaults to the preset's) is built without one when its weights have none."""
    if family(cfg.model).builder is not MaskCTC or "decoder_layers" in cfg.model.overrides:
        return
    if not any(k.startswith("decoder.") for k in _tensor_names(payload, is_artifact)):
        cfg.model.overrides["decoder_layers"] = 0


def _load_hf(uri: str, storage_cfg: StorageConfig | None, overrides, need_text: bool) -> LoadedModel:
    """A published checkpoint as it is: its family, front end, tokenizer and every tensor (strict)."""
    cfg = importer.config_for_eval(uri, storage_cfg, overrides)
    text_output = family(cfg.model).text_output
    if need_text and text_output is None:
        raise ConfigError(f"{uri}: a {cfg.model.family} checkpoint has no text output to score")
    pre = Preprocessor(cfg.features, cfg.text, tokenizer=tokenizer_in(hfdir.path_of(uri), cfg.text, storage_cfg),
                       targets_required=False)
    model = build_model(cfg.model, pre.tokenizer.vocab_size, pre.tokenizer.specials or None)
    importer.load_weights(model, cfg.model.family, uri, storage_cfg, strict=True, log=None, tokenizer=pre.tokenizer)
    model.eval()
    return LoadedModel(cfg, model, 0, "hf", pre, text_output, uri)
