"""``fit(cfg)``: train a run to its end on the configured backend and say how it went.

Re-running with the same ``run.name`` and ``run.storage_path`` resumes from the run's latest committed
checkpoint, under either backend. ``run.backend=ray`` (the default) runs Ray Train workers fed by Ray
Data (train/launch.py, imported only then); ``run.backend=local`` runs the same Trainer in this
process (train/local.py), and Ray is never imported.
"""

from __future__ import annotations

import json
import time
import traceback
from dataclasses import dataclass

from raytrain_speech import storage
from raytrain_speech.config import Config, ConfigError, dump_yaml
from raytrain_speech.data import vocab
from raytrain_speech.data.badinput import BAD_INPUTS_FILE, read_bad_inputs, summary_line
from raytrain_speech.data.prefetch import DataStalled
from raytrain_speech.data.text import TOKENIZER_FILES
from raytrain_speech.hf import directory as hfdir
from raytrain_speech.hf.importer import settle as settle_from_hf
from raytrain_speech.storage import StorageError
from raytrain_speech.train import checkpoint, preflight
from raytrain_speech.train.metrics import (
    METRICS_FILE,
    RUN_CARD_JSON,
    ProgressDisplay,
    read_metrics,
    run_dir,
    run_info,
    write_run_card,
)

CONFIG_FILE = "config.yaml"


@dataclass
class FitOutcome:
    run_dir: str
    checkpoint_uri: str | None
    metrics: dict
    wall_s: float
    run_card: dict
    bad_input_summary: str = "bad input: none"
    """One line: skipped utterances per reason and where they are listed."""


class TrainingFailed(RuntimeError):
    """Training stopped with an error (after its failure budget, under Ray); the message is the error."""

    reader_stuck = False
    """A data reader of this process may still be blocked inside a read that never returns (a stall):
    a command ending on it exits without waiting for it (the storage client's exit would)."""


class TrainingStalled(TrainingFailed):
    """The local backend's data stalled (data/prefetch.py's watchdog)."""

    reader_stuck = True


def fit(cfg: Config, progress: bool = True, out=print, callbacks: list | None = None) -> FitOutcome:
    """Check the config and storage, train to ``train.max_steps`` (resuming if the run exists), and
    return the final checkpoint, metrics and run card. ``callbacks``: extra Ray Train callbacks (a
    sweep trial adds Tune's report callback; Ray backend only)."""
    settle_from_hf(cfg, log=out)
    preflight.check(cfg)
    start = time.time()
    directory = run_dir(cfg)
    finished = _finished(cfg, directory)
    if finished is not None:
        out(f"[raytrain-speech] run {cfg.run.name} finished at step {finished.metrics.get('step')} "
            f"(train.max_steps={cfg.train.max_steps}); nothing to train, no record changed "
            "(raise train.max_steps to train on)")
        return finished
    _tokenizer_from_init(cfg)
    vocab.settle_run_tokenizer(cfg, directory, log=out)  # learned or copied in; its path joins the config
    vocab.check_fits(cfg)
    storage.write_bytes(storage.join(directory, CONFIG_FILE), dump_yaml(cfg).encode(), cfg.storage)
    metrics_uri = storage.join(directory, METRICS_FILE)
    with ProgressDisplay(metrics_uri, cfg.train.max_steps, cfg.storage, out=out, enabled=progress):
        if cfg.run.backend == "local":
            if callbacks:
                raise ConfigError("run.backend=local: Ray Train callbacks (a sweep) need run.backend=ray")
            ckpt, metrics = _fit_local(cfg)
        else:
            from raytrain_speech.train.launch import fit_ray

            ckpt, metrics, error = fit_ray(cfg, callbacks)
            if error:
                raise TrainingFailed(error)
    return _outcome(cfg, start, ckpt, metrics)


def _finished(cfg: Config, directory: str) -> FitOutcome | None:
    """The outcome of a run whose latest committed checkpoint has nothing left to train under this
    config, read from its records, which are left as they are (a re-run changes no record); None
    when there is training to do, or the checkpoint predates train_state.json (it is launched, and
    its Trainer finds out)."""
    ckpt = checkpoint.latest_committed_dir(directory, cfg.storage)
    state = checkpoint.read_train_state(ckpt, cfg.storage) if ckpt is not None else None
    if state is None or not state.finished(cfg.train.max_steps, cfg.train.max_epochs):
        return None
    records = read_metrics(storage.join(directory, METRICS_FILE), cfg.storage)
    last = {k: v for k, v in (records[-1] if records else {}).items() if k not in ("time", "checkpoint_path")}
    card_uri = storage.join(directory, RUN_CARD_JSON)
    card = json.loads(storage.read_bytes(card_uri, cfg.storage)) if storage.exists(card_uri, cfg.storage) else {}
    bad_uri = storage.join(directory, BAD_INPUTS_FILE)
    bad_line = summary_line(read_bad_inputs(bad_uri, cfg.storage), bad_uri)
    if state.stop_reason.startswith("too much bad input"):  # it failed then; it fails again, the same way
        raise TrainingFailed(f"{state.stop_reason} [{bad_line}]")
    return FitOutcome(directory, ckpt, last or {"step": state.step}, 0.0, card, bad_line)


def _tokenizer_from_init(cfg: Config) -> None:
    """A fine-tuning run (train.init_from) whose subword tokenizer is not given takes the one its
    starting checkpoint carries, so the embedding rows keep their meaning."""
    t = cfg.text
    if (not cfg.train.init_from or hfdir.is_hf(cfg.train.init_from) or t.tokenizer not in TOKENIZER_FILES
            or t.tokenizer_path):
        return
    try:
        source = storage.join(checkpoint.resolve_checkpoint(cfg.train.init_from, cfg.storage), TOKENIZER_FILES[t.tokenizer])
    except StorageError:
        return  # preflight / finetune report an unusable init_from with their own message
    if storage.exists(source, cfg.storage):
        t.tokenizer_path = source


def _fit_local(cfg: Config) -> tuple[str | None, dict]:
    from raytrain_speech.train.local import run_local

    try:
        run_local(cfg)
    except (ConfigError, StorageError, KeyboardInterrupt):
        raise
    except DataStalled as err:  # its message is the whole story
        raise TrainingStalled(f"DataStalled: {err}") from None
    except Exception as err:
        traceback.print_exc()  # the local backend is for debugging: the whole story, then one line
        lines = str(err).strip().splitlines()
        raise TrainingFailed(f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__) from err
    records = read_metrics(storage.join(run_dir(cfg), METRICS_FILE), cfg.storage)
    last = {k: v for k, v in (records[-1] if records else {}).items() if k not in ("time", "checkpoint_path")}
    return checkpoint.latest_committed_dir(run_dir(cfg), cfg.storage), last



def _outcome(cfg: Config, start: float, ckpt: str | None, metrics: dict) -> FitOutcome:
    directory = run_dir(cfg)
    records = read_metrics(storage.join(directory, METRICS_FILE), cfg.storage)
    card = write_run_card(directory, records, run_info(cfg), cfg.storage) if records else {}
    bad_uri = storage.join(directory, BAD_INPUTS_FILE)
    bad_line = summary_line(read_bad_inputs(bad_uri, cfg.storage), bad_uri)
    if str(metrics.get("stop_reason", "")).startswith("too much bad input"):
        raise TrainingFailed(f"{metrics['stop_reason']} [{bad_line}]")
    return FitOutcome(directory, ckpt, metrics, time.time() - start, card, bad_line)
