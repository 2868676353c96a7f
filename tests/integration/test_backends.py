"""One run, two backends: ``run.backend=local`` trains with Ray never imported and writes checkpoints; the
same command with ``run.backend=ray`` and more steps resumes from the local checkpoint on a real local
Ray cluster, and the data cursor carries across (no utterance of the epoch twice)."""

from __future__ import annotations

import os
import subprocess
import sys

from raytrain_speech.data.synth import synthesize
from raytrain_speech.train.fit import fit
from raytrain_speech.train.metrics import read_metrics
from tests.conftest import TINY_SYNTH, tiny_config
from tests.integration.audit import assert_exactly_once

RECIPE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "conformer_ctc_tiny.yaml")

NO_RAY = """
import importlib.abc, sys

class NoRay(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"this process must not import {name}")

sys.meta_path.insert(0, NoRay())
from raytrain_speech.cli import main
rc = main(sys.argv[1:])
assert not [m for m in sys.modules if m == "ray" or m.startswith("ray.")], "ray was imported"
sys.exit(rc)
"""


def test_local_run_without_ray_then_resumed_under_ray(ray_local, tmp_path):
    corpus = str(tmp_path / "corpus")
    run = {"run.storage_path": str(tmp_path / "runs"), "run.name": "both", "train.checkpoint_every_steps": 10,
           "train.trained_log_dir": str(tmp_path / "trained"), "data.root": corpus,
           "train.global_batch_audio_s": 30, "train.log_every_steps": 5}
    cfg = tiny_config(**run)
    manifest = synthesize(cfg.synth, corpus, log=lambda s: None)
    args = ["train", "--config", RECIPE, "--no-progress", "run.backend=local", "train.max_steps=30",
            *TINY_SYNTH, *(f"{k}={v}" for k, v in run.items())]
    local = subprocess.run([sys.executable, "-c", NO_RAY, *args], capture_output=True, text=True, timeout=600)
    assert local.returncode == 0, local.stderr[-3000:]
    assert "starting fresh" in local.stdout and "run both: step 30" in local.stdout, local.stdout
    assert (tmp_path / "runs" / "both" / "checkpoint_step00000030" / "state.pt").exists()

    outcome = fit(tiny_config(**run, **{"run.backend": "ray", "train.max_steps": 40}), progress=False)
    assert outcome.metrics["step"] == 40 and outcome.metrics["attempt"] == 2
    records = read_metrics(str(tmp_path / "runs" / "both" / "metrics.jsonl"))
    second = [r for r in records if r["attempt"] == 2]
    assert second[0]["step"] > 30 and second[0]["world_size"] == 2
    attempts = assert_exactly_once(str(tmp_path / "trained"), manifest.splits["train"].num_utterances, 40)
    assert [(a["restored_step"], a["world_size"]) for a in attempts] == [(0, 1), (30, 2)]
