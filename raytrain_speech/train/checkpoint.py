"""Full training state <-> a checkpoint directory <-> ``ray.train.Checkpoint``.

A checkpoint directory holds ``state.pt`` (tensors and plain data only, loaded with
``weights_only=True`` so a checkpoint cannot execute code) and ``config.yaml`` (the resolved run
config), which is all that evaluation and export need.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field

import ray.train
import torch
from pyarrow.fs import FileSelector
from torch import nn

from raytrain_speech import storage
from raytrain_speech.config import StorageConfig
from raytrain_speech.data.progress import CURSOR_FILE, DataCursor
from raytrain_speech.storage import StorageError
from raytrain_speech.train.step import EMA, unwrap

STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"


@dataclass
class TrainState:
    """Counters that must survive restarts (the model and optimizer are saved beside them)."""

    step: int = 0
    epoch: int = 0
    audio_s_seen: float = 0.0
    utterances_seen: int = 0
    train_wall_s: float = 0.0
    bad_utterances: int = 0
    filtered_utterances: int = 0
    skipped_steps: int = 0
    attempts: int = 0
    world_sizes: list[int] = field(default_factory=list)
    best_valid: float | None = None
    bad_validations: int = 0
    stopped_early: bool = False
    stop_reason: str = ""
    """Why the run stopped before max_steps ('' = it did not): early stopping, or too much bad input."""


def save(directory: str, model: nn.Module, optimizer: torch.optim.Optimizer | None,
         scaler: torch.amp.GradScaler | None, state: TrainState, config_yaml: str,
         cursor: DataCursor | None = None, ema: EMA | None = None, fault_delay_s: float = 0.0) -> None:
    """Write the checkpoint directory; ``fault_delay_s`` (tests only) stalls between its files."""
    payload = {
        "model": unwrap(model).state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "train_state": asdict(state),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    torch.save(payload, os.path.join(directory, STATE_FILE))
    if fault_delay_s:
        time.sleep(fault_delay_s)
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        f.write(config_yaml)
    if cursor is not None:
        with open(os.path.join(directory, CURSOR_FILE), "wb") as f:
            f.write(cursor.to_bytes())


def load_cursor(directory: str) -> DataCursor | None:
    path = os.path.join(directory, CURSOR_FILE)
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return DataCursor.from_bytes(f.read())


def load(directory: str) -> dict:
    return torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)


def restore(payload: dict, model: nn.Module, optimizer: torch.optim.Optimizer | None,
            scaler: torch.amp.GradScaler | None, ema: EMA | None = None) -> TrainState:
    unwrap(model).load_state_dict(payload["model"])
    if ema is not None and payload.get("ema") is not None:
        ema.load_state_dict(payload["ema"])
    if optimizer is not None and payload.get("optimizer") is not None:
        optimizer.load_state_dict(payload["optimizer"])
    if scaler is not None and payload.get("scaler") is not None:
        scaler.load_state_dict(payload["scaler"])
    if payload.get("torch_rng") is not None:
        torch.set_rng_state(payload["torch_rng"])
    if payload.get("cuda_rng") is not None and torch.cuda.is_available():
        if len(payload["cuda_rng"]) == torch.cuda.device_count():  # same GPUs per node; else keep fresh
            torch.cuda.set_rng_state_all(payload["cuda_rng"])
    return TrainState(**payload["train_state"])


def latest_ray_checkpoint() -> tuple[dict, DataCursor | None] | None:
    """(payload, data cursor) of the latest committed checkpoint of this run; None on a fresh start."""
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        return load(d), load_cursor(d)


RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


def latest_committed_dir(run_dir: str, storage_cfg: StorageConfig | None = None) -> str | None:
    """The URI of the checkpoint Ray Train will restore next, from its checkpoint-manager snapshot.

    Read by the dataset factory on the Train controller at each worker-group start so the pipeline can
    drop consumed utterances before decoding. The snapshot is Ray's own file (2.60 layout); if it
    changes shape we fail loudly rather than guess, since a wrong guess would lose or repeat data.
    """
    uri = storage.join(run_dir, RAY_SNAPSHOT)
    if not storage.exists(uri, storage_cfg):
        return None
    snap = json.loads(storage.read_bytes(uri, storage_cfg))
    if "latest_checkpoint_result" not in snap:
        raise RuntimeError(f"{uri}: unrecognised Ray checkpoint snapshot (keys {sorted(snap)}); "
                           "this Ray version is not supported by exactly-once resume")
    latest = snap["latest_checkpoint_result"]
    if latest is None:
        return None
    return storage.join(run_dir, latest["checkpoint_dir_name"])


def latest_committed_cursor(run_dir: str, storage_cfg: StorageConfig | None = None) -> DataCursor | None:
    directory = latest_committed_dir(run_dir, storage_cfg)
    if directory is None:
        return None
    uri = storage.join(directory, CURSOR_FILE)
    if not storage.exists(uri, storage_cfg):
        return None
    return DataCursor.from_bytes(storage.read_bytes(uri, storage_cfg))


def report(metrics: dict, checkpoint_dir_name: str | None = None, save_fn=None, upload: str = "sync") -> None:
    """``ray.train.report`` (a barrier: every rank calls it at the same step).

    On checkpoint steps every rank passes the same ``checkpoint_dir_name`` and rank 0 passes
    ``save_fn(dir)``, which fills the checkpoint directory that Ray then uploads: in the
    background with ``upload="async"`` (Ray deletes the local copy once uploaded), or before
    returning with ``"sync"``. Either way Ray commits the checkpoint only when the upload is
    complete, so a crash mid-upload leaves the previous checkpoint as the one to restore.
    """
    if save_fn is None:
        ray.train.report(metrics, checkpoint_dir_name=checkpoint_dir_name)
        return
    from ray.train import CheckpointUploadMode

    if upload == "async":
        d = tempfile.mkdtemp(prefix="rts-ckpt-")
        save_fn(d)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_dir_name=checkpoint_dir_name, checkpoint_upload_mode=CheckpointUploadMode.ASYNC,
                         delete_local_checkpoint_after_upload=True)
        return
    with tempfile.TemporaryDirectory(prefix="rts-ckpt-") as d:
        save_fn(d)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_dir_name=checkpoint_dir_name)


def read_checkpoint(uri: str, storage_cfg: StorageConfig | None = None) -> tuple[dict, str]:
    """(state payload, resolved config YAML) of a checkpoint directory given by path or s3:// URI."""
    try:
        state_bytes = storage.read_bytes(storage.join(uri, STATE_FILE), storage_cfg)
        config_yaml = storage.read_bytes(storage.join(uri, CONFIG_FILE), storage_cfg).decode()
    except StorageError as err:
        raise StorageError(f"not a raytrain-speech checkpoint: {err}") from None
    payload = torch.load(io.BytesIO(state_bytes), map_location="cpu", weights_only=True)
    return payload, config_yaml


def resolve_checkpoint(uri: str, storage_cfg: StorageConfig | None = None) -> str:
    """A checkpoint dir is used as is; a run dir resolves to its latest checkpoint_step* dir."""
    if storage.exists(storage.join(uri, STATE_FILE), storage_cfg):
        return uri
    fs, path = storage.resolve(uri, storage_cfg)
    try:
        entries = fs.get_file_info(FileSelector(path, allow_not_found=True))
    except OSError as err:
        raise StorageError(f"{uri}: {err}") from None
    ckpts = sorted(e.base_name for e in entries if e.base_name.startswith("checkpoint_"))
    if not ckpts:
        raise StorageError(f"{uri}: neither a checkpoint nor a run directory with checkpoints")
    return storage.join(uri, ckpts[-1])


def init_from_pretrained(model: nn.Module, uri: str, storage_cfg: StorageConfig | None = None,
                         log: bool = True) -> set[str]:
    """Load a pretraining run's weights into ``model`` for fine-tuning; the loaded parameter names.

    Families that fine-tune another family's encoder say how (``load_pretrained_encoder``: e.g.
    wav2vec 2.0 pretraining -> wav2vec 2.0 CTC); otherwise tensors whose name and shape match are
    copied. The live weights are used, not the EMA, which keeps part of the random init early in a run. Nothing matching is an error
    naming the checkpoint, so a wrong path cannot silently train from scratch.
    """
    ckpt = resolve_checkpoint(uri, storage_cfg)
    payload, _ = read_checkpoint(ckpt, storage_cfg)
    state = payload["model"]  # the live weights: an EMA that started at random init still carries some of it
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if hasattr(model, "load_pretrained_encoder"):
        model.load_pretrained_encoder(state)
    else:
        own = model.state_dict()
        model.load_state_dict({k: v for k, v in state.items() if k in own and own[k].shape == v.shape},
                              strict=False)
    # "Loaded" = changed by the load (random init never equals trained weights), whatever the mapping.
    loaded = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    if not loaded:
        raise StorageError(f"train.init_from={uri}: no tensor of {ckpt} fits this model "
                           "(is it a pretraining run of a compatible family and size?)")
    if log:
        total = sum(1 for _ in model.parameters())
        print(f"[raytrain-speech] initialised {len(loaded)}/{total} parameter tensors from {ckpt}", flush=True)
    return loaded
