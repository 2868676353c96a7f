"""Chaos: faults injected mid-epoch into a 2-worker run; every utterance is trained exactly once per
epoch over the steps that survive, step numbers continue, and loss picks up where it was."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from raytrain_speech.data.synth import synthesize
from raytrain_speech.train.fit import fit
from raytrain_speech.train.metrics import read_metrics
from tests.conftest import tiny_config
from tests.integration.audit import (
    assert_exactly_once,
    assert_no_stale_rows,
    kill_driver_at_step,
    read_attempts,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("chaos") / "corpus")
    cfg = tiny_config()
    manifest = synthesize(cfg.synth, root, log=lambda s: None)
    return root, manifest.splits["train"].num_utterances


def chaos_config(tmp_path, root, name, **extra):
    return tiny_config(**{
        "data.root": root, "run.storage_path": str(tmp_path / "runs"), "run.name": name,
        "train.max_steps": 20, "train.log_every_steps": 2, "train.checkpoint_every_steps": 6,
        "train.global_batch_audio_s": 20, "train.trained_log_dir": str(tmp_path / "trained"),
        "optim.warmup_steps": 5, "run.max_failures": 3, **extra,
    })


def kill_when(log_dir: str, at_step: int, rank: int, timeout_s: float = 300, delay_s: float = 0.0) -> dict:
    """In the background: SIGKILL rank ``rank``'s worker process ``delay_s`` after any rank logged
    ``at_step``."""
    done: dict = {}

    def watch():
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            attempts = read_attempts(log_dir) if os.path.isdir(log_dir) else []
            if attempts and max(attempts[-1]["steps"], default=0) >= at_step and rank in attempts[-1]["pids"]:
                done["pid"] = attempts[-1]["pids"][rank]
                done["step"] = max(attempts[-1]["steps"])
                time.sleep(delay_s)
                os.kill(done["pid"], signal.SIGKILL)
                return
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()
    return done


def loss_continuity(metrics: list[dict]) -> tuple[float, float]:
    """(loss of the last report before the fault, loss of the first report after the restart)."""
    first = [m for m in metrics if m.get("attempt") == 1 and "loss" in m]
    second = [m for m in metrics if m.get("attempt") == 2 and "loss" in m]
    return first[-1]["loss"], second[0]["loss"]


@pytest.mark.slow  # over the default run's budget on the 2-core Zen-1 AVX2 box (docs/LOG.md, 2026-12-03)
def test_sigkill_one_worker_resumes_exactly_once(ray_local, tmp_path, corpus):
    root, n_train = corpus
    # One epoch (14-21 steps here, depending on how the ranks' shares fall): stopped by max_epochs, so the
    # epoch the restart cut in two is finished and checked in full.
    cfg = chaos_config(tmp_path, root, "sigkill", **{"train.max_steps": 1000, "train.max_epochs": 1})
    killed = kill_when(str(tmp_path / "trained"), at_step=9, rank=1)
    outcome = fit(cfg, progress=False)
    assert killed, "the fault was never injected"
    assert outcome.metrics["epoch"] == 1 and outcome.metrics["step"] > 9
    attempts = assert_exactly_once(str(tmp_path / "trained"), n_train, final_step=outcome.metrics["step"],
                                   complete_epochs=1, last_epoch_complete=True)
    assert len(attempts) == 2
    assert attempts[1]["restored_step"] == 6  # the last checkpoint before the kill at step >= 9
    assert killed["pid"] not in attempts[1]["pids"].values()
    metrics = read_metrics(str(tmp_path / "runs" / "sigkill" / "metrics.jsonl"))
    assert_no_stale_rows(metrics)
    before, after = loss_continuity(metrics)
    assert abs(after - before) < 0.35 * before, (before, after)
    assert outcome.run_card["restarts_survived"] == 1
    assert [a["world_size"] for a in outcome.run_card["worker_history"]] == [2, 2]


def _cli_args(cfg_overrides: dict) -> list[str]:
    return [f"{k}={v}" for k, v in cfg_overrides.items()]


@pytest.mark.slow  # over the default run's time budget on 2 cores (docs/LOG.md)
def test_driver_killed_then_same_command_resumes(tmp_path, corpus):
    """SIGKILL the driver (and the local Ray it started: the whole process group), run it again."""
    import subprocess
    import sys

    root, n_train = corpus
    log_dir = tmp_path / "trained"
    overrides = {
        "data.root": root, "run.storage_path": str(tmp_path / "runs"), "run.name": "driverkill",
        "train.max_steps": 1000, "train.max_epochs": 1, "train.log_every_steps": 2,
        "train.checkpoint_every_steps": 6, "train.global_batch_audio_s": 20, "train.trained_log_dir": str(log_dir),
        "optim.warmup_steps": 5, "run.object_store_memory_mb": 400,
    }
    cmd = [sys.executable, "-m", "raytrain_speech.cli", "train", "--config", "examples/conformer_ctc_tiny.yaml",
           "--no-progress", *_cli_args(overrides)]
    kill_driver_at_step(cmd, log_dir, at_step=9)
    time.sleep(2)
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    metrics = read_metrics(str(tmp_path / "runs" / "driverkill" / "metrics.jsonl"))
    attempts = assert_exactly_once(str(log_dir), n_train, final_step=metrics[-1]["step"], complete_epochs=1,
                                   last_epoch_complete=True)
    assert [a["restored_step"] for a in attempts] == [0, 6]
    assert_no_stale_rows(metrics)
    assert metrics[-1]["epoch"] == 1 and metrics[-1]["attempt"] == 2
    before, after = loss_continuity(metrics)
    assert abs(after - before) < 0.35 * before, (before, after)


@pytest.mark.slow  # over the default run's time budget on 2 cores (docs/LOG.md)
def test_worker_killed_while_writing_a_checkpoint_restores_the_last_complete_one(ray_local, tmp_path, corpus):
    root, n_train = corpus
    cfg = chaos_config(tmp_path, root, "ckptkill", **{"train.max_steps": 1000, "train.max_epochs": 1,
                                                      "train.fault_checkpoint_delay_s": 6})
    # Rank 0 logs step 12 and then spends 6 s inside the step-12 checkpoint write: kill it in there.
    killed = kill_when(str(tmp_path / "trained"), at_step=12, rank=0, delay_s=1.5)
    outcome = fit(cfg, progress=False)
    assert killed and killed["step"] == 12
    final = outcome.metrics["step"]
    attempts = assert_exactly_once(str(tmp_path / "trained"), n_train, final_step=final, complete_epochs=1,
                                   last_epoch_complete=True)
    assert [a["restored_step"] for a in attempts] == [0, 6]  # the half-written step-12 checkpoint was never used
    assert_no_stale_rows(read_metrics(str(tmp_path / "runs" / "ckptkill" / "metrics.jsonl")))
    assert outcome.checkpoint_uri.endswith(f"checkpoint_step{final:08d}") and final > 12
