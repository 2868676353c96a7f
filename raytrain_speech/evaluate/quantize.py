"""Export a trained model as a standalone inference artifact, optionally int8-quantized (plain torch).

An artifact is one directory: ``model.pt`` (weights, the resolved config and the tokenizer's alphabet
inside it; loaded with ``torch.load(weights_only=True)``) plus a human-readable ``config.yaml`` and the
export report. It has no optimizer, scheduler, EMA or data cursor, so it is the inference weights and
nothing else; ``raytrain-speech eval`` and ``transcribe`` accept it wherever they accept a checkpoint.

int8 ("post-training dynamic quantization"):

* every ``nn.Linear`` becomes torch's dynamic int8 Linear (per-output-channel int8 weights, activations
  quantized per batch at run time), so the matrix multiplies that dominate inference run in int8;
* every other weight matrix (convolutions, the input projection inside ``nn.MultiheadAttention``,
  embeddings) is *stored* as per-output-channel symmetric int8 and dequantized to float when the
  artifact is loaded: a storage-only saving with no int8 kernel, reported as such.

Vectors (biases, norms) stay float. torch's eager dynamic quantization (``torch.ao.quantization``) is
deprecated in favour of torchao; it is what torch 2.14 ships, so we use it and silence the notice.
"""

from __future__ import annotations

import copy
import io
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from raytrain_speech import storage
from raytrain_speech.config import StorageConfig

ARTIFACT_FILE = "model.pt"
FORMAT = "raytrain-speech-export/1"
QUANTIZE_CHOICES = ("none", "int8")
WEIGHT_ONLY_MIN_NUMEL = 1024
"""Smaller matrices are not worth a scale per row."""


def _quantized_structure(model: nn.Module) -> nn.Module:
    """``model`` with its Linear layers swapped for dynamic int8 Linears (per-channel weights)."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)


def _int8_rows(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Symmetric per-output-channel int8: q = round(w / scale), scale = max|w| / 127 per row."""
    flat = w.detach().float().reshape(w.shape[0], -1)
    scale_R = flat.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(flat / scale_R[:, None]).clamp(-127, 127).to(torch.int8)
    return {"q": q.reshape(w.shape), "scale": scale_R, "dtype": str(w.dtype).removeprefix("torch.")}


def _load(model: nn.Module, state: dict) -> None:
    """``load_state_dict`` with the module versions of ``model``'s own state dict: quantized Linears
    read their packed weights only under their current version (a plain dict would take the legacy path)."""
    full = OrderedDict(state)
    full._metadata = getattr(model.state_dict(), "_metadata", None)  # type: ignore[attr-defined]
    model.load_state_dict(full)


def _dequant_rows(entry: dict) -> torch.Tensor:
    q = entry["q"]
    w = q.reshape(q.shape[0], -1).float() * entry["scale"][:, None]
    return w.reshape(q.shape).to(getattr(torch, entry["dtype"]))


@dataclass
class Exported:
    payload: dict
    quantized_model: nn.Module


def export_model(model: nn.Module, config_yaml: str, step: int, quantize: str = "int8",
                 source: str = "") -> Exported:
    """The artifact payload of ``model`` (a float model in eval mode; left untouched) and the model that
    payload loads into, for scoring it before anything is written."""
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"--quantize {quantize!r}: choose one of {', '.join(QUANTIZE_CHOICES)}")
    model = copy.deepcopy(model).cpu().eval()
    weight_only: dict[str, dict] = {}
    if quantize == "int8":
        model = _quantized_structure(model)
        state = model.state_dict()
        for name, t in list(state.items()):
            if (isinstance(t, torch.Tensor) and not t.is_quantized and t.is_floating_point() and t.dim() >= 2
                    and t.numel() >= WEIGHT_ONLY_MIN_NUMEL):
                weight_only[name] = _int8_rows(t)
                del state[name]
        # The loaded model computes with what the artifact stores: the dequantized matrices.
        _load(model, {**state, **{k: _dequant_rows(v) for k, v in weight_only.items()}})
    else:
        state = model.state_dict()
    payload = {"format": FORMAT, "quantize": quantize, "step": step, "source": source,
               "config_yaml": config_yaml, "state": state, "weight_only_int8": weight_only}
    return Exported(payload, model)


def payload_bytes(payload: dict) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage deprecation notice from quantized tensors
        torch.save(payload, buf)
    return buf.getvalue()


def is_artifact(uri: str, storage_cfg: StorageConfig | None = None) -> bool:
    return storage.exists(storage.join(uri, ARTIFACT_FILE), storage_cfg)


def read_artifact(uri: str, storage_cfg: StorageConfig | None = None) -> tuple[dict, str]:
    """(payload, config YAML) of an exported artifact directory."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        payload = torch.load(io.BytesIO(storage.read_bytes(storage.join(uri, ARTIFACT_FILE), storage_cfg)),
                             map_location="cpu", weights_only=True)
    if payload.get("format") != FORMAT:
        raise storage.StorageError(f"{uri}: {ARTIFACT_FILE} is not a {FORMAT} artifact")
    return payload, payload["config_yaml"]


def build_from_artifact(payload: dict, cfg, vocab_size: int) -> nn.Module:
    """The artifact's model in eval mode (CPU: torch's dynamic int8 kernels are CPU kernels)."""
    from raytrain_speech.models.registry import build_model

    model = build_model(cfg.model, vocab_size).eval()
    if payload["quantize"] == "int8":
        model = _quantized_structure(model)
    _load(model, {**payload["state"], **{k: _dequant_rows(v) for k, v in payload["weight_only_int8"].items()}})
    return model.eval()


def export_checkpoint(checkpoint: str, out: str, quantize: str = "int8", storage_cfg: StorageConfig | None = None,
                      split: str | None = None, overrides=(), evaluate: bool = True, log=print) -> dict:
    """Checkpoint -> artifact in ``out``, with the report users need to trust it: sizes (the float
    export, the int8 artifact, and the training checkpoint it came from) and, for text models, WER/CER
    and decoding time of the float and the exported model on ``split`` (default eval.split), both
    in-process on this CPU with the same search."""
    import json
    import time
    from dataclasses import replace

    from raytrain_speech.config import dump_yaml
    from raytrain_speech.evaluate.runner import (
        BatchDecoder,
        build_search,
        load_model,
        rows_in_process,
        score_rows,
    )
    from raytrain_speech.train.checkpoint import STATE_FILE, resolve_checkpoint

    ckpt = resolve_checkpoint(checkpoint, storage_cfg)
    loaded = load_model(ckpt, storage_cfg, overrides, need_text=False)
    cfg = loaded.cfg
    config_yaml = dump_yaml(cfg)
    exported = export_model(loaded.model, config_yaml, loaded.step, quantize, source=ckpt)
    artifact = payload_bytes(exported.payload)
    # The float export's size without a second deep copy: the same payload with the float weights.
    float_bytes = len(payload_bytes({**exported.payload, "quantize": "none", "weight_only_int8": {},
                                     "state": loaded.model.state_dict()}))
    report = {
        "checkpoint": ckpt, "artifact": out, "quantize": quantize, "step": loaded.step, "weights": loaded.weights,
        "family": cfg.model.family, "preset": cfg.model.preset,
        "bytes": {"checkpoint_state": len(storage.read_bytes(storage.join(ckpt, STATE_FILE), storage_cfg)),
                  "float_export": float_bytes, "artifact": len(artifact)},
    }
    report["size_reduction_vs_float"] = 1.0 - len(artifact) / float_bytes
    if evaluate and loaded.text_output is not None:
        split = split or cfg.eval.split
        search = build_search(cfg, loaded.pre.tokenizer, log)
        scores = {}
        for name, model in (("float", loaded.model), (quantize, exported.quantized_model)):
            start = time.time()
            decoder = BatchDecoder(loaded=replace(loaded, model=model), search=search)
            scores[name] = score_rows(rows_in_process(decoder, cfg, split), split, log)
            scores[name]["decode_wall_s"] = time.time() - start
            log(f"[export] {split} with the {name} model: WER {100 * scores[name]['wer']:.2f}%  "
                f"CER {100 * scores[name]['cer']:.2f}%  ({scores[name]['decode_wall_s']:.1f} s)")
        f, q = scores["float"], scores[quantize]
        report["eval"] = {
            "split": split, "utterances": f["utterances"],
            "float": {k: f[k] for k in ("wer", "cer", "decode_wall_s")},
            quantize: {k: q[k] for k in ("wer", "cer", "decode_wall_s")},
            "wer_relative_change": (q["wer"] - f["wer"]) / f["wer"] if f["wer"] else 0.0,
            "accuracy_kept": (1 - q["wer"]) / (1 - f["wer"]) if f["wer"] < 1 else float("nan"),
        }
    storage.write_bytes(storage.join(out, ARTIFACT_FILE), artifact, storage_cfg)
    storage.write_bytes(storage.join(out, "config.yaml"), config_yaml.encode(), storage_cfg)
    storage.write_bytes(storage.join(out, "export.json"), json.dumps(report, indent=2).encode(), storage_cfg)
    return report
