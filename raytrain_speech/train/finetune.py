"""Fine-tuning from a pretraining run (``train.init_from``): load its weights, and plan which
parameters stay frozen for how many steps.

Freezing is by learning rate (optim.py gives a frozen group LR 0 until its step), never by
``requires_grad``: every parameter stays in DDP's gradient buckets, so unfreezing mid-run needs no
re-wrap, and a restart rebuilds exactly the same optimizer groups (init_from is loaded on restarts
too, before the checkpoint's weights overwrite it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import yaml

from raytrain_speech import storage
from raytrain_speech.config import Config, ConfigError, StorageConfig
from raytrain_speech.data.tokenizer import load_tokenizer
from raytrain_speech.hf import directory as hfdir
from raytrain_speech.hf.importer import load_weights
from raytrain_speech.hf.importer import preflight as hf_preflight
from raytrain_speech.models.base import SpeechModel
from raytrain_speech.models.registry import family
from raytrain_speech.storage import StorageError
from raytrain_speech.train.checkpoint import CONFIG_FILE, read_checkpoint, resolve_checkpoint


@dataclass
class FreezePlan:
    """Parameter names loaded from the pretraining run, and steps each named parameter stays frozen."""

    pretrained: set[str] = field(default_factory=set)
    frozen_until: dict[str, int] = field(default_factory=dict)


def plan(model: SpeechModel, cfg: Config, log: bool) -> FreezePlan:
    """Load ``train.init_from`` (if set) into ``model`` and return what to freeze: every loaded
    parameter for ``train.freeze_pretrained_steps`` (the new head trains alone first), the feature
    encoder for ``train.freeze_feature_encoder_steps``."""
    tc = cfg.train
    pretrained: set[str] = set()
    if hfdir.is_hf(tc.init_from):
        report = load_weights(model, cfg.model.family, tc.init_from, cfg.storage, strict=tc.init_strict,
                              log=print if log else None, tokenizer=load_tokenizer(cfg.text, cfg.storage))
        pretrained = {n for n in report.mapped if n in dict(model.named_parameters())}
    elif tc.init_from:
        pretrained = init_from_pretrained(model, tc.init_from, cfg.storage, log=log)
    frozen = dict.fromkeys(pretrained, tc.freeze_pretrained_steps)
    if tc.freeze_feature_encoder_steps:
        ids = {id(p) for p in model.feature_encoder_parameters()}
        for name, p in model.named_parameters():
            if id(p) in ids:
                frozen[name] = max(frozen.get(name, 0), tc.freeze_feature_encoder_steps)
    return FreezePlan(pretrained, frozen)


def init_from_pretrained(model: SpeechModel, uri: str, storage_cfg: StorageConfig | None = None,
                         log: bool = True) -> set[str]:
    """Load a pretraining run's weights into ``model`` for fine-tuning; the loaded parameter names.

    The model's ``load_pretrained`` says how (by default, tensors whose name and shape match;
    families that fine-tune another family's encoder map it, e.g. wav2vec 2.0 pretraining -> CTC).
    The live weights are used, not the EMA, which keeps part of the random init early in a run.
    Nothing matching is an error naming the checkpoint, so a wrong path cannot silently train from
    scratch.
    """
    ckpt = resolve_checkpoint(uri, storage_cfg)
    payload, _ = read_checkpoint(ckpt, storage_cfg)
    state = payload["model"]  # the live weights: an EMA that started at random init still carries some of it
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_pretrained(state)
    # "Loaded" = changed by the load (random init never equals trained weights), whatever the mapping.
    loaded = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    if not loaded:
        raise StorageError(f"train.init_from={uri}: no tensor of {ckpt} fits this model "
                           "(is it a pretraining run of a compatible family and size?)")
    if log:
        total = sum(1 for _ in model.parameters())
        print(f"[raytrain-speech] initialised {len(loaded)}/{total} parameter tensors from {ckpt}", flush=True)
    return loaded



def check_init_from(cfg: Config) -> None:
    """A fine-tuning source that is missing or of a family this model cannot start from fails before
    any worker starts, in one line, instead of in every worker after Ray has started."""
    if hfdir.is_hf(cfg.train.init_from):  # hf.importer.settle has read its config
        hf_preflight(cfg)
        return
    try:
        ckpt = resolve_checkpoint(cfg.train.init_from, cfg.storage)
    except StorageError as err:
        raise StorageError(f"train.init_from: {err} (point it at a pretraining run or checkpoint)") from None
    source = yaml.safe_load(storage.read_bytes(storage.join(ckpt, CONFIG_FILE), cfg.storage).decode())
    source_family = source.get("model", {}).get("family")
    accepted = (cfg.model.family, *family(cfg.model).init_from_families)
    if source_family not in accepted:
        raise ConfigError(f"train.init_from={cfg.train.init_from}: a {source_family} checkpoint cannot initialise "
                          f"{cfg.model.family} (it starts from: {', '.join(accepted) or 'nothing'})")
