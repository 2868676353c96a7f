"""A real Ray Tune sweep through the CLI: 4 trials x 1 worker, 2 at once, ASHA, interrupted and resumed.

The sweep crosses a good and a far-too-small peak learning rate with two span-masking
probabilities, so ASHA has losers to stop. The command is interrupted (SIGINT, as Ctrl+C) once a
trial has finished; running the same command again must finish the sweep without rerunning that
trial, then write the results table, the best config as a runnable recipe, and the plot.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from raytrain_speech.config import load_config
from raytrain_speech.data.synth import synthesize
from tests.conftest import TINY_SYNTH, tiny_config

OWNS_RAY = True
"""This module starts Ray in the test process its own way (tests/conftest.py SharedRay)."""

CLI = [sys.executable, "-m", "raytrain_speech.cli"]
MAX_STEPS = 24

SWEEP = {
    "name": "sw", "metric": "valid_loss", "mode": "min", "num_samples": 1, "seed": 0,
    "scheduler": {"name": "asha", "grace_period_steps": 8, "reduction_factor": 2},
    "trial_workers": 1,
    "space": {"optim.lr_peak": {"grid": [3.0e-3, 1.0e-5]}, "augment.span_mask_prob": {"grid": [0.0, 0.065]}},
    "overrides": {"train.max_steps": MAX_STEPS, "train.validate_every_steps": 8, "train.log_every_steps": 8,
                  "train.checkpoint_every_steps": 8, "train.global_batch_audio_s": 30, "optim.warmup_steps": 4,
                  "run.object_store_memory_mb": 256},
}


def _finished_trials(runs, log=None) -> dict[str, int]:
    """Trial id -> metric records, for trials whose Train run reached max_steps (and, given Tune's
    log, that Tune itself has marked completed: its experiment state is what a resume reads)."""
    text = log.read_text() if log is not None and log.exists() else None
    done = {}
    for path in glob.glob(str(runs / "sw" / "trials" / "*" / "metrics.jsonl")):
        trial = os.path.basename(os.path.dirname(path))
        records = [json.loads(line) for line in open(path) if line.strip()]
        if not (records and records[-1].get("step") == MAX_STEPS and records[-1].get("checkpoint_path")):
            continue
        if text is None or f"Trial _run_trial_{trial} completed after" in text:
            done[trial] = len(records)
    return done


@pytest.mark.slow  # over the default run's time budget on 2 cores (docs/LOG.md)
def test_sweep_with_asha_is_interrupted_and_resumed(tmp_path):
    corpus, runs = tmp_path / "corpus", tmp_path / "runs"
    synthesize(tiny_config(**{"data.root": str(corpus)}).synth, str(corpus), log=lambda s: None)
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump(SWEEP))
    args = CLI + ["tune", "--config", "examples/conformer_ctc_tiny.yaml", "--space", str(sweep_file),
                  f"data.root={corpus}", f"run.storage_path={runs}", "run.local_num_cpus=4", *TINY_SYNTH]
    root = os.path.join(os.path.dirname(__file__), "..", "..")

    log = tmp_path / "first.log"  # a file, not a pipe: Tune's tables would fill a pipe nobody reads
    with open(log, "w") as out_file:
        first = subprocess.Popen(args, cwd=root, stdout=out_file, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 420
        while not _finished_trials(runs, log) and first.poll() is None and time.time() < deadline:
            time.sleep(1)
        assert first.poll() is None, "the sweep ended before it could be interrupted:\n" + log.read_text()[-4000:]
        finished_before = _finished_trials(runs, log)
        assert finished_before, "no trial finished in time:\n" + log.read_text()[-4000:]
        first.send_signal(signal.SIGINT)  # Ctrl+C
        first.wait(timeout=180)
    out = log.read_text()
    assert first.returncode == 130, out[-4000:]
    assert "re-run the same command to resume" in out

    second = subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=600)
    out = second.stdout + second.stderr
    (tmp_path / "second.log").write_text(out)
    assert second.returncode == 0, out[-5000:]
    assert "resuming sweep sw" in out

    # Trials finished before the interrupt were not run again.
    after = _finished_trials(runs)
    for trial, records in finished_before.items():
        assert after.get(trial) == records, (trial, records, after.get(trial))

    results = json.loads((runs / "sw" / "results.json").read_text())
    statuses = [t["status"] for t in results["trials"]]
    assert len(statuses) == 4 and set(statuses) <= {"completed", "stopped by ASHA"}, statuses
    assert "stopped by ASHA" in statuses
    stopped = [t for t in results["trials"] if t["status"] == "stopped by ASHA"]
    assert all(t["steps"] < MAX_STEPS for t in stopped)

    # ASHA's rungs survived the resume: the first rung (step 8) holds every trial, from both sessions.
    asha = json.loads((runs / "sw" / "asha_state.json").read_text())
    assert sorted(asha["rungs"][0][-1]) == sorted(t["trial_id"] for t in results["trials"])
    assert sorted(asha["stopped"]) == sorted(t["trial_id"] for t in stopped)

    best = next(t for t in results["trials"] if t["trial_id"] == results["best_trial"])
    assert best["params"]["optim.lr_peak"] == 3.0e-3  # the far-too-small LR never wins
    assert results["best_checkpoint"] and os.path.isdir(results["best_checkpoint"])
    cfg = load_config(str(runs / "sw" / "best_config.yaml"))
    assert cfg.optim.lr_peak == best["params"]["optim.lr_peak"]
    assert cfg.augment.span_mask_prob == best["params"]["augment.span_mask_prob"]
    assert cfg.run.name == "sw-best" and cfg.run.num_workers == 2  # the recipe's, not the trials'
    assert (runs / "sw" / "valid_loss_per_trial.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| trial |" in second.stdout and "best config:" in second.stdout


@pytest.mark.slow  # ~2 min on 2 cores, most of it Ray Train and Ray Data starting per trial (docs/LOG.md)
def test_quickstart_sweep_with_the_command_line_over_the_sweep_file(tmp_path):
    """The shipped quickstart sweep through the CLI on the tiny corpus: --num-samples and sweep.* set
    the sweep, key=value beats the file's overrides (its 40 steps become 8 in every trial)."""
    corpus, runs = tmp_path / "corpus", tmp_path / "runs"
    synthesize(tiny_config(**{"data.root": str(corpus)}).synth, str(corpus), log=lambda s: None)
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    args = CLI + ["tune", "--config", "examples/conformer_ctc_tiny.yaml", "--space", "examples/sweeps/quickstart.yaml",
                  "--num-samples", "2", f"data.root={corpus}", f"run.storage_path={runs}", "train.max_steps=8",
                  "train.validate_every_steps=4", "train.checkpoint_every_steps=4", "optim.warmup_steps=2",
                  "sweep.scheduler.grace_period_steps=4", *TINY_SYNTH]
    done = subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-5000:]
    results = json.loads((runs / "quickstart" / "results.json").read_text())
    assert len(results["trials"]) == 2
    for trial in results["trials"]:
        records = [json.loads(line) for line in open(runs / "quickstart" / "trials" / trial["trial_id"] / "metrics.jsonl")]
        assert records[-1]["step"] == 8 and records[-1]["valid_loss"] is not None  # 8 from the command line
        assert [r["step"] for r in records if r.get("valid_loss") is not None] == [4, 8]
        assert 1e-3 <= trial["params"]["optim.lr_peak"] <= 1e-2
    assert "| trial |" in done.stdout and "best config:" in done.stdout


def test_a_swept_key_set_on_the_command_line_is_one_line_before_ray_starts():
    args = CLI + ["tune", "--config", "examples/conformer_ctc_tiny.yaml", "--space", "examples/sweeps/quickstart.yaml",
                  "optim.lr_peak=0.002"]
    done = subprocess.run(args, cwd=os.path.join(os.path.dirname(__file__), "..", ".."), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: optim.lr_peak is both swept (the sweep file's space) and set on the "
                                   "command line; drop one of them")
