"""Hugging Face model directories as ``save_pretrained`` writes them, local or ``s3://`` (no Ray, no
``transformers``): ``config.json``, weights in ``model.safetensors`` (or sharded with
``model.safetensors.index.json``, or the older ``pytorch_model.bin``), and the tokenizer and
feature-extractor files beside them.

A URI names one with the ``hf:`` prefix (``train.init_from=hf:/models/whisper-small``,
``--checkpoint hf:s3://bucket/xls-r``), so a published checkpoint can never be mistaken for one of
our run directories, and every error names the file and what to do.
"""

from __future__ import annotations

import io
import json

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from raytrain_speech import storage
from raytrain_speech.config import StorageConfig
from raytrain_speech.storage import StorageError

PREFIX = "hf:"
CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
PREPROCESSOR = "preprocessor_config.json"
GENERATION = "generation_config.json"


def is_hf(uri: str | None) -> bool:
    return bool(uri) and uri.startswith(PREFIX)


def path_of(uri: str) -> str:
    """The directory behind ``hf:PATH`` (a plain path is returned as it is)."""
    return uri[len(PREFIX):] if is_hf(uri) else uri


def read_json(directory: str, name: str, storage_cfg: StorageConfig | None = None,
              required: bool = True) -> dict | None:
    """``name`` in the directory as a dict; None when it is absent and not ``required``."""
    uri = storage.join(directory, name)
    if not storage.exists(uri, storage_cfg):
        if required:
            raise StorageError(f"hf:{directory}: no {name} (a Hugging Face model directory as save_pretrained "
                               "writes it has one)")
        return None
    try:
        return json.loads(storage.read_bytes(uri, storage_cfg).decode())
    except (ValueError, UnicodeDecodeError) as err:
        raise StorageError(f"hf:{directory}: {name} is not valid JSON ({err})") from None


def read_file(directory: str, name: str, storage_cfg: StorageConfig | None = None) -> bytes | None:
    uri = storage.join(directory, name)
    return storage.read_bytes(uri, storage_cfg) if storage.exists(uri, storage_cfg) else None


def weight_files(directory: str, storage_cfg: StorageConfig | None = None) -> list[str]:
    """The weight files ``read_state`` reads, by name (index shards, else the single file)."""
    for index_name in (SAFETENSORS_INDEX, TORCH_BIN_INDEX):
        index = read_json(directory, index_name, storage_cfg, required=False)
        if index is not None:
            return sorted(set(index.get("weight_map", {}).values()))
    for name in (SAFETENSORS, TORCH_BIN):
        if storage.exists(storage.join(directory, name), storage_cfg):
            return [name]
    raise StorageError(f"hf:{directory}: no weights ({SAFETENSORS}, {SAFETENSORS_INDEX} or {TORCH_BIN})")


def read_shapes(directory: str, storage_cfg: StorageConfig | None = None) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape without reading the weights: safetensors headers (the first bytes of each
    file); a ``pytorch_model.bin`` has no header and is loaded."""
    names = weight_files(directory, storage_cfg)
    if not all(n.endswith(".safetensors") for n in names):
        return {k: tuple(v.shape) for k, v in read_state(directory, storage_cfg).items()}
    shapes: dict[str, tuple[int, ...]] = {}
    for name in names:
        shapes.update(_safetensors_header(directory, name, storage_cfg))
    return shapes


def _safetensors_header(directory: str, name: str, storage_cfg) -> dict[str, tuple[int, ...]]:
    fs, path = storage.resolve(storage.join(directory, name), storage_cfg)
    try:
        with fs.open_input_file(path) as f:
            size = int.from_bytes(f.read_at(8, 0), "little")
            if size <= 0 or size > 100 * 2**20:
                raise ValueError(f"header length {size}")
            header = json.loads(f.read_at(size, 8))
    except (OSError, ValueError) as err:
        raise StorageError(f"hf:{directory}: {name} is not a readable safetensors file ({err})") from None
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def read_state(directory: str, storage_cfg: StorageConfig | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, from safetensors (single or sharded) or, failing that,
    ``pytorch_model.bin`` loaded with ``weights_only=True`` (a pickle cannot run code here)."""
    state: dict[str, torch.Tensor] = {}
    for name in weight_files(directory, storage_cfg):
        loader = _safetensors_file if name.endswith(".safetensors") else _torch_file
        state.update(loader(directory, name, storage_cfg))
    return state


def _safetensors_file(directory: str, name: str, storage_cfg) -> dict[str, torch.Tensor]:
    data = storage.read_bytes(storage.join(directory, name), storage_cfg)
    try:
        return load_safetensors(data)
    except Exception as err:  # safetensors raises its own SafetensorError
        raise StorageError(f"hf:{directory}: {name} is not a readable safetensors file ({err})") from None


def _torch_file(directory: str, name: str, storage_cfg) -> dict[str, torch.Tensor]:
    data = storage.read_bytes(storage.join(directory, name), storage_cfg)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise StorageError(f"hf:{directory}: {name} cannot be loaded as weights only ({reason}); "
                           "convert it to safetensors") from None


def write_directory(out: str, config: dict, state: dict[str, torch.Tensor], files: dict[str, bytes],
                    storage_cfg: StorageConfig | None = None) -> None:
    """``config.json``, ``model.safetensors`` (contiguous copies: safetensors refuses shared or
    strided storage) and the other ``files`` under ``out``."""
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
    storage.write_bytes(storage.join(out, SAFETENSORS), save_safetensors(tensors, metadata={"format": "pt"}),
                        storage_cfg)
    storage.write_bytes(storage.join(out, CONFIG), (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(),
                        storage_cfg)
    for name, data in files.items():
        storage.write_bytes(storage.join(out, name), data, storage_cfg)
