"""Full training state <-> a checkpoint directory, and which checkpoint of a run is the one to resume.

A checkpoint directory (``checkpoint_step%08d``) holds ``state.pt`` (tensors and plain data only,
loaded with ``weights_only=True`` so a checkpoint cannot execute code), ``config.yaml`` (the
resolved run config, all that evaluation and export need), ``data_cursor.npz`` (the epoch's
consumed utterances) and ``train_state.json`` (the counters of state.pt's TrainState, readable
without loading the weights). The format is the same under either backend, so a run trained with
``run.backend=local`` resumes under Ray and the reverse.

Committed = safe to resume from. Ray Train commits a checkpoint once it is fully uploaded and records
it in its snapshot file; the local backend writes a checkpoint's directory first and then its own
record, ``local_checkpoints.json``. A resuming run (either backend) restores the newer of the two
records' latest checkpoints, by step. No Ray here.
"""

from __future__ import annotations

import io
import json
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from pyarrow.fs import FileSelector
from torch import nn

from raytrain_speech import ray_compat, storage
from raytrain_speech.config import StorageConfig
from raytrain_speech.data.progress import CURSOR_FILE, DataCursor
from raytrain_speech.storage import StorageError
from raytrain_speech.train.step import EMA, unwrap

STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
TRAIN_STATE_FILE = "train_state.json"
"""The TrainState again, as JSON beside state.pt: where a run stands, read without its weights."""


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
    source_audio_s: dict[str, float] = field(default_factory=dict)
    """A mixture (data.sources): audio seconds trained on per source name."""
    source_utterances: dict[str, int] = field(default_factory=dict)
    """A mixture: utterances trained on per source name."""

    def finished(self, max_steps: int, max_epochs: int | None) -> bool:
        """Whether the Trainer's loop would train no step from here (its loop condition, negated)."""
        return (self.step >= max_steps or self.stopped_early
                or (max_epochs is not None and self.epoch >= max_epochs))


def rng_state(device: torch.device) -> dict:
    """This process's torch generators that training draws from (dropout, SSL negatives, mask-CTC
    masks): the CPU one, and the one of ``device`` when it is a GPU. One rank's entry of a checkpoint's
    ``rng_per_rank``."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(entry: dict, device: torch.device) -> None:
    torch.set_rng_state(entry["torch"])
    if entry.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(entry["cuda"], device)


def save(directory: str, model: nn.Module, optimizer: torch.optim.Optimizer | None,
         scaler: torch.amp.GradScaler | None, state: TrainState, config_yaml: str,
         cursor: DataCursor | None = None, ema: EMA | None = None, fault_delay_s: float = 0.0,
         extra_files: dict[str, bytes] | None = None, rng_per_rank: list[dict] | None = None) -> None:
    """Write the checkpoint directory; ``extra_files`` (name -> bytes: the run's tokenizer file) go
    beside the state, so the checkpoint decodes on its own; ``fault_delay_s`` (tests only) stalls
    between its files.

    ``rng_per_rank`` is every rank's ``rng_state`` in rank order (gathered by the Trainer at the
    checkpoint's report), so that each rank resumes its own dropout stream; without it (one process,
    a checkpoint written outside training) it is this process's. ``torch_rng``/``cuda_rng`` keep rank 0's
    in the layout older readers expect."""
    rngs = rng_per_rank or [rng_state(torch.device("cpu"))]
    payload = {
        "model": unwrap(model).state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "train_state": asdict(state),
        "torch_rng": rngs[0]["torch"],
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "rng_per_rank": rngs,
    }
    torch.save(payload, os.path.join(directory, STATE_FILE))
    if fault_delay_s:
        time.sleep(fault_delay_s)
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        f.write(config_yaml)
    with open(os.path.join(directory, TRAIN_STATE_FILE), "w") as f:
        json.dump(asdict(state), f)
    if cursor is not None:
        with open(os.path.join(directory, CURSOR_FILE), "wb") as f:
            f.write(cursor.to_bytes())
    for name, data in (extra_files or {}).items():
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)


def load_cursor(directory: str) -> DataCursor | None:
    path = os.path.join(directory, CURSOR_FILE)
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return DataCursor.from_bytes(f.read())


def load(directory: str) -> dict:
    path = os.path.join(directory, STATE_FILE)
    with open(path, "rb") as f:
        return load_weights_only(f.read(), path)


def load_weights_only(data: bytes, source: str):
    """``torch.load(weights_only=True)`` of a state file, with a refusal as one line naming the file:
    a pickle that would construct anything but tensors and plain containers (code, a class of any
    library) is never unpickled, and a truncated or foreign file says so instead of a stack dump."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for code, RuntimeError / EOFError for a damaged file
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line),
                      lines[0] if lines else type(err).__name__)
        raise StorageError(f"{source}: refused to load: not a plain tensor file ({reason}); it may carry code "
                           "or be damaged; load only checkpoints written by raytrain-speech") from None


def restore(payload: dict, model: nn.Module, optimizer: torch.optim.Optimizer | None,
            scaler: torch.amp.GradScaler | None, ema: EMA | None = None, rank: int = 0,
            device: torch.device | None = None) -> TrainState:
    """Load a checkpoint's state into a freshly built model/optimizer/scaler/EMA, and give this process
    rank ``rank``'s RNG streams (``restore_rng``)."""
    unwrap(model).load_state_dict(payload["model"])
    if ema is not None and payload.get("ema") is not None:
        ema.load_state_dict(payload["ema"])
    if optimizer is not None and payload.get("optimizer") is not None:
        optimizer.load_state_dict(payload["optimizer"])
    if scaler is not None and payload.get("scaler") is not None:
        scaler.load_state_dict(payload["scaler"])
    state = TrainState(**payload["train_state"])
    if not restore_rng(payload, rank, device or torch.device("cpu")):
        # A rank the saving world did not have: streams of its own (not a copy of another rank's, which
        # would draw the same dropout masks), derived from the step and the rank so a rerun agrees.
        torch.manual_seed(int(np.random.SeedSequence([state.step, rank]).generate_state(1)[0]))
    return state


def restore_rng(payload: dict, rank: int, device: torch.device) -> bool:
    """Give this process the RNG streams rank ``rank`` saved; False when the checkpoint holds none for
    that rank (a resume at a larger world size: the caller seeds the new rank's streams itself).

    A resume at the same world size is then bit-deterministic on every rank. Checkpoints written
    before per-rank states existed hold rank 0's only, which every rank gets, as it did then."""
    per_rank = payload.get("rng_per_rank")
    if per_rank:
        if rank >= len(per_rank):
            return False
        set_rng_state(per_rank[rank], device)
        return True
    if payload.get("torch_rng") is not None:
        torch.set_rng_state(payload["torch_rng"])
    if payload.get("cuda_rng") is not None and torch.cuda.is_available():
        if len(payload["cuda_rng"]) == torch.cuda.device_count():  # same GPUs per node; else keep fresh
            torch.cuda.set_rng_state_all(payload["cuda_rng"])
    return True


def read_checkpoint(uri: str, storage_cfg: StorageConfig | None = None) -> tuple[dict, str]:
    """(state payload, resolved config YAML) of a checkpoint directory given by path or s3:// URI."""
    try:
        state_bytes = storage.read_bytes(storage.join(uri, STATE_FILE), storage_cfg)
        config_yaml = storage.read_bytes(storage.join(uri, CONFIG_FILE), storage_cfg).decode()
    except StorageError as err:
        raise StorageError(f"not a raytrain-speech checkpoint: {err}") from None
    return load_weights_only(state_bytes, storage.join(uri, STATE_FILE)), config_yaml


def resolve_checkpoint(uri: str, storage_cfg: StorageConfig | None = None) -> str:
    """A checkpoint dir is used as is. A run dir resolves to its latest *committed* checkpoint (Ray
    Train's snapshot or the local backend's record, as a resuming run reads them), so ``eval``,
    ``export`` and ``init_from`` never read a directory whose upload is still in flight. A directory
    of checkpoints without either record (copied by hand, a Tune trial's) resolves to its newest
    ``checkpoint_*`` directory that holds a state file."""
    if storage.exists(storage.join(uri, STATE_FILE), storage_cfg):
        return uri
    committed = latest_committed_dir(uri, storage_cfg)
    if committed is not None:
        return committed
    fs, path = storage.resolve(uri, storage_cfg)
    try:
        entries = fs.get_file_info(FileSelector(path, allow_not_found=True))
    except OSError as err:
        raise StorageError(f"{uri}: {err}") from None
    for name in sorted((e.base_name for e in entries if e.base_name.startswith("checkpoint_")), reverse=True):
        if storage.exists(storage.join(uri, name, STATE_FILE), storage_cfg):
            return storage.join(uri, name)
    raise StorageError(f"{uri}: neither a checkpoint nor a run directory with checkpoints")


LOCAL_RECORD = "local_checkpoints.json"
"""The local backend's list of committed checkpoints in the run directory (Ray keeps its own)."""
DIR_PREFIX = "checkpoint_step"


def dir_name(step: int) -> str:
    """A checkpoint's directory name: the same scheme under both backends, so steps compare."""
    return f"{DIR_PREFIX}{step:08d}"


def step_of(name: str) -> int:
    """The step in a checkpoint directory name (-1 for a name of another scheme)."""
    tail = name.rstrip("/").rsplit("/", 1)[-1]
    digits = tail.removeprefix(DIR_PREFIX)
    return int(digits) if tail.startswith(DIR_PREFIX) and digits.isdigit() else -1


@dataclass
class Restored:
    """What a resuming attempt restores: the state payload and the epoch's data cursor."""

    payload: dict
    cursor: DataCursor | None
    directory: str


def read_local_record(run_dir: str, storage_cfg: StorageConfig | None = None) -> list[dict]:
    """The local backend's committed checkpoints, oldest first: [{"dir", "step", "score"?}]."""
    uri = storage.join(run_dir, LOCAL_RECORD)
    if not storage.exists(uri, storage_cfg):
        return []
    return json.loads(storage.read_bytes(uri, storage_cfg))["checkpoints"]


def write_local_record(run_dir: str, entries: list[dict], storage_cfg: StorageConfig | None = None) -> None:
    storage.write_bytes(storage.join(run_dir, LOCAL_RECORD),
                        json.dumps({"checkpoints": entries}, indent=1).encode(), storage_cfg)


def latest_committed_dir(run_dir: str, storage_cfg: StorageConfig | None = None) -> str | None:
    """The URI of the checkpoint a resuming run restores: the newer (by step) of Ray Train's latest
    committed checkpoint and the local backend's latest; None on a fresh run.

    Read by the Ray dataset factory on the Train controller at each worker-group start (to drop
    consumed utterances before decoding), by the Ray workers and by the local backend, so all agree.
    """
    names = [ray_compat.latest_snapshot_checkpoint(run_dir, storage_cfg)]
    local = read_local_record(run_dir, storage_cfg)
    names.append(local[-1]["dir"] if local else None)
    names = [n for n in names if n]
    if not names:
        return None
    return storage.join(run_dir, max(names, key=step_of))


def read_restored(directory: str, storage_cfg: StorageConfig | None = None) -> Restored:
    """A committed checkpoint directory (local path or s3://) read for resuming."""
    payload, _ = read_checkpoint(directory, storage_cfg)
    return Restored(payload, read_cursor(directory, storage_cfg), directory)


def read_train_state(directory: str, storage_cfg: StorageConfig | None = None) -> TrainState | None:
    """The checkpoint's TrainState from train_state.json (None for a checkpoint written before it)."""
    uri = storage.join(directory, TRAIN_STATE_FILE)
    if not storage.exists(uri, storage_cfg):
        return None
    return TrainState(**json.loads(storage.read_bytes(uri, storage_cfg)))


def read_cursor(directory: str, storage_cfg: StorageConfig | None = None) -> DataCursor | None:
    uri = storage.join(directory, CURSOR_FILE)
    if not storage.exists(uri, storage_cfg):
        return None
    return DataCursor.from_bytes(storage.read_bytes(uri, storage_cfg))


def latest_committed_cursor(run_dir: str, storage_cfg: StorageConfig | None = None) -> DataCursor | None:
    directory = latest_committed_dir(run_dir, storage_cfg)
    return None if directory is None else read_cursor(directory, storage_cfg)
