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
import json
import time
import warnings
from dataclasses import dataclass, replace

import torch
from torch import nn

from raytrain_speech import storage
from raytrain_speech.config import StorageConfig, dump_yaml
from raytrain_speech.data.text import TOKENIZER_FILES
from raytrain_speech.data.tokenizer import tokenizer_file_in
from raytrain_speech.evaluate.artifact import (
    ARTIFACT_FILE,
    FORMAT,
    dequant_rows,
    load_state,
    quantized_structure,
)
from raytrain_speech.evaluate.loading import load_model
from raytrain_speech.evaluate.runner import BatchDecoder, build_search, rows_in_process, score_rows
from raytrain_speech.hf import directory as hfdir
from raytrain_speech.train.checkpoint import STATE_FILE, resolve_checkpoint

QUANTIZE_CHOICES = ("none", "int8")
WEIGHT_ONLY_MIN_NUMEL = 1024
"""Smaller matrices are not worth a scale per row."""


def _int8_rows(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Symmetric per-output-channel int8: q = round(w / scale), scale = max|w| / 127 per row."""
    flat = w.detach().float().reshape(w.shape[0], -1)
    scale_R = flat.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(flat / scale_R[:, None]).clamp(-127, 127).to(torch.int8)
    return {"q": q.reshape(w.shape), "scale": scale_R, "dtype": str(w.dtype).removeprefix("torch.")}


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
        model = quantized_structure(model)
        state = model.state_dict()
        for name, t in list(state.items()):
            if (isinstance(t, torch.Tensor) and not t.is_quantized and t.is_floating_point() and t.dim() >= 2
                    and t.numel() >= WEIGHT_ONLY_MIN_NUMEL):
                weight_only[name] = _int8_rows(t)
                del state[name]
        # The loaded model computes with what the artifact stores: the dequantized matrices.
        load_state(model, {**state, **{k: dequant_rows(v) for k, v in weight_only.items()}})
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


def export_checkpoint(checkpoint: str, out: str, quantize: str = "int8", storage_cfg: StorageConfig | None = None,
                      split: str | None = None, overrides=(), evaluate: bool = True, log=print) -> dict:
    """Checkpoint -> artifact in ``out``, with the report users need to trust it: sizes (the float
    export, the int8 artifact, and the training checkpoint it came from) and, for text models, WER/CER
    and decoding time of the float and the exported model on ``split`` (default eval.split), both
    in-process on this CPU with the same search."""
    from_hf = hfdir.is_hf(checkpoint)
    ckpt = checkpoint if from_hf else resolve_checkpoint(checkpoint, storage_cfg)
    loaded = load_model(ckpt, storage_cfg, overrides, need_text=False)
    cfg = loaded.cfg
    tokenizer_files = {}
    if cfg.text.tokenizer in TOKENIZER_FILES:  # the export carries its tokenizer, as checkpoints do
        name = TOKENIZER_FILES[cfg.text.tokenizer]
        tokenizer_files[name] = tokenizer_file_in(hfdir.path_of(ckpt), cfg.text, storage_cfg)
        cfg.text.tokenizer_path = storage.join(out, name)
    config_yaml = dump_yaml(cfg)
    exported = export_model(loaded.model, config_yaml, loaded.step, quantize, source=ckpt)
    artifact = payload_bytes(exported.payload)
    # The float export's size without a second deep copy: the same payload with the float weights.
    float_bytes = len(payload_bytes({**exported.payload, "quantize": "none", "weight_only_int8": {},
                                     "state": loaded.model.state_dict()}))
    report = {
        "checkpoint": ckpt, "artifact": out, "quantize": quantize, "step": loaded.step, "weights": loaded.weights,
        "family": cfg.model.family, "preset": cfg.model.preset,
        "bytes": {"checkpoint_state": sum(len(storage.read_bytes(storage.join(hfdir.path_of(ckpt), name), storage_cfg))
                                          for name in (hfdir.weight_files(hfdir.path_of(ckpt), storage_cfg)
                                                       if from_hf else [STATE_FILE])),
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
            scores[name] = score_rows(rows_in_process(decoder, cfg, split), split, log, cfg.eval.normalizer)
            scores[name]["decode_wall_s"] = time.time() - start
            log(f"[export] {split} with the {name} model: WER {100 * scores[name]['wer']:.2f}%  "
                f"CER {100 * scores[name]['cer']:.2f}%  ({scores[name]['decode_wall_s']:.1f} s)")
        f, q = scores["float"], scores[quantize]
        report["eval"] = {
            "split": split, "utterances": f["utterances"],
            "float": {k: f[k] for k in ("wer", "cer", "decode_wall_s")},
            quantize: {k: q[k] for k in ("wer", "cer", "decode_wall_s")},
            "wer_relative_change": (q["wer"] - f["wer"]) / f["wer"] if f["wer"] else 0.0,
            # undefined (null, strict JSON) when the float model gets no word right on balance (WER >= 100%)
            "accuracy_kept": (1 - q["wer"]) / (1 - f["wer"]) if f["wer"] < 1 else None,
        }
    storage.write_bytes(storage.join(out, ARTIFACT_FILE), artifact, storage_cfg)
    storage.write_bytes(storage.join(out, "config.yaml"), config_yaml.encode(), storage_cfg)
    for name, data in tokenizer_files.items():
        storage.write_bytes(storage.join(out, name), data, storage_cfg)
    storage.write_bytes(storage.join(out, "export.json"), json.dumps(report, indent=2).encode(), storage_cfg)
    return report
