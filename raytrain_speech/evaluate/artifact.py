"""The exported inference artifact's format: one directory with ``model.pt`` (weights, the resolved
config and the tokenizer's alphabet inside it; loaded with ``torch.load(weights_only=True)``) plus a
readable ``config.yaml`` and the export report (evaluate/quantize.py writes it).

Reading it back needs only this module: eval and transcribe accept an artifact wherever they accept a
checkpoint. int8 artifacts hold torch's dynamic int8 Linears (per-channel weights) and the other
matrices as per-row int8 with a scale, dequantized here at load.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict

import torch
from torch import nn

from raytrain_speech import storage
from raytrain_speech.config import StorageConfig
from raytrain_speech.models.registry import build_model
from raytrain_speech.train.checkpoint import load_weights_only

ARTIFACT_FILE = "model.pt"


FORMAT = "raytrain-speech-export/1"


def quantized_structure(model: nn.Module) -> nn.Module:
    """``model`` with its Linear layers swapped for dynamic int8 Linears (per-channel weights)."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)


def load_state(model: nn.Module, state: dict) -> None:
    """``load_state_dict`` with the module versions of ``model``'s own state dict: quantized Linears
    read their packed weights only under their current version (a plain dict would take the legacy path)."""
    full = OrderedDict(state)
    full._metadata = getattr(model.state_dict(), "_metadata", None)  # type: ignore[attr-defined]
    model.load_state_dict(full)


def dequant_rows(entry: dict) -> torch.Tensor:
    q = entry["q"]
    w = q.reshape(q.shape[0], -1).float() * entry["scale"][:, None]
    return w.reshape(q.shape).to(getattr(torch, entry["dtype"]))


def is_artifact(uri: str, storage_cfg: StorageConfig | None = None) -> bool:
    return storage.exists(storage.join(uri, ARTIFACT_FILE), storage_cfg)


def read_artifact(uri: str, storage_cfg: StorageConfig | None = None) -> tuple[dict, str]:
    """(payload, config YAML) of an exported artifact directory."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        payload = load_weights_only(storage.read_bytes(storage.join(uri, ARTIFACT_FILE), storage_cfg),
                                    storage.join(uri, ARTIFACT_FILE))
    if payload.get("format") != FORMAT:
        raise storage.StorageError(f"{uri}: {ARTIFACT_FILE} is not a {FORMAT} artifact")
    return payload, payload["config_yaml"]


def build_from_artifact(payload: dict, cfg, tokenizer) -> nn.Module:
    """The artifact's model in eval mode (CPU: torch's dynamic int8 kernels are CPU kernels)."""
    model = build_model(cfg.model, tokenizer.vocab_size, tokenizer.specials or None).eval()
    if payload["quantize"] == "int8":
        model = quantized_structure(model)
    load_state(model, {**payload["state"], **{k: dequant_rows(v) for k, v in payload["weight_only_int8"].items()}})
    return model.eval()

