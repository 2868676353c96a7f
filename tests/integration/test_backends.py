"""One run, two backends, over the S3 wire protocol: synth -> s3:// shards; ``run.backend=local`` trains
with Ray never imported and writes checkpoints to s3://; the same command with ``run.backend=ray`` and
more steps resumes from that checkpoint on a real local Ray cluster (Ray Data reading s3://, Ray Train
uploading its checkpoints there), the data cursor carrying across (no utterance of an epoch twice);
the local backend then resumes from Ray's checkpoint; eval from the s3:// checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from raytrain_speech.data.synth import synthesize
from raytrain_speech.evaluate.runner import evaluate_checkpoint
from raytrain_speech.train.fit import fit
from raytrain_speech.train.metrics import read_metrics
from tests.conftest import S3_ENV, TINY_SYNTH, tiny_config
from tests.integration.audit import assert_exactly_once, assert_no_stale_rows
from tests.integration.leaks import assert_no_secrets, files_under, objects_under

RECIPE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "conformer_ctc_tiny.yaml")
BUCKET = "rts-backends-test"

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


@pytest.mark.slow  # over the default run's budget on the 2-core Zen-1 AVX2 box (docs/LOG.md, 2026-12-03)
def test_local_run_without_ray_then_resumed_under_ray(ray_local, s3_endpoint, s3fs_client, tmp_path, capfd):
    s3fs_client.mkdir(BUCKET)
    runs = f"s3://{BUCKET}/runs"
    run = {"run.storage_path": runs, "run.name": "both", "data.root": f"s3://{BUCKET}/corpus",
           "storage.endpoint_url": s3_endpoint, "train.checkpoint_every_steps": 10, "train.log_every_steps": 5,
           "train.global_batch_audio_s": 30, "train.trained_log_dir": str(tmp_path / "trained")}
    cfg = tiny_config(**run)
    manifest = synthesize(cfg.synth, cfg.data.root, cfg.storage, log=lambda s: None)

    args = ["train", "--config", RECIPE, "--no-progress", "run.backend=local", "train.max_steps=30",
            *TINY_SYNTH, *(f"{k}={v}" for k, v in run.items())]
    local = subprocess.run([sys.executable, "-c", NO_RAY, *args], capture_output=True, text=True, timeout=600)
    assert local.returncode == 0, local.stderr[-3000:]
    assert "starting fresh" in local.stdout and "run both: step 30" in local.stdout, local.stdout
    assert s3fs_client.exists(f"{BUCKET}/runs/both/checkpoint_step00000030/state.pt")
    assert s3fs_client.exists(f"{BUCKET}/runs/both/config.yaml")
    assert s3fs_client.exists(f"{BUCKET}/runs/both/local_checkpoints.json")

    outcome = fit(tiny_config(**run, **{"run.backend": "ray", "train.max_steps": 40}), progress=False)
    assert outcome.metrics["step"] == 40 and outcome.metrics["attempt"] == 2
    assert outcome.checkpoint_uri == f"{runs}/both/checkpoint_step00000040"
    assert s3fs_client.exists(f"{BUCKET}/runs/both/checkpoint_step00000040/state.pt")
    records = read_metrics(f"{runs}/both/metrics.jsonl", cfg.storage)
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert [r["world_size"] for r in records] == [1] * 6 + [2] * 2
    losses = [r["loss"] for r in records]
    assert losses[-1] < 0.9 * losses[0], losses  # past the initial CTC loss, onto the blank plateau
    assert_no_stale_rows(records)
    attempts = assert_exactly_once(str(tmp_path / "trained"), manifest.splits["train"].num_utterances, 40)
    assert [(a["restored_step"], a["world_size"]) for a in attempts] == [(0, 1), (30, 2)]

    # And back: the local backend finds Ray Train's committed checkpoint (its snapshot in s3://).
    last = fit(tiny_config(**run, **{"run.backend": "local", "train.max_steps": 45}), progress=False)
    assert last.metrics["step"] == 45 and last.metrics["attempt"] == 3
    assert last.checkpoint_uri == f"{runs}/both/checkpoint_step00000045"

    # TensorBoard (run.trackers' default) got every record of the three processes, once per step, in s3://.
    s3fs_client.get(f"{BUCKET}/runs/both/tensorboard", str(tmp_path / "tb"), recursive=True)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    records = read_metrics(f"{runs}/both/metrics.jsonl", cfg.storage)
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [
        (r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in records]
    assert [e.value for e in events.Scalars("world_size")] == [1] * 6 + [2] * 2 + [1]

    result = evaluate_checkpoint(last.checkpoint_uri, cfg.storage, split="test")
    assert result["utterances"] == manifest.splits["test"].num_utterances
    assert result["step"] == 45 and 0.0 <= result["cer"] <= 1.5

    # The credentials every process had in its environment are in nothing the run left behind.
    captured = capfd.readouterr()
    blobs = {**objects_under(s3fs_client, f"{BUCKET}/runs"), **files_under(str(tmp_path / "trained"))}
    assert any(k.endswith("state.pt") for k in blobs) and any(k.endswith("run_card.json") for k in blobs)
    assert_no_secrets({"AWS_ACCESS_KEY_ID": S3_ENV["AWS_ACCESS_KEY_ID"],
                       "AWS_SECRET_ACCESS_KEY": S3_ENV["AWS_SECRET_ACCESS_KEY"]}, blobs,
                      {"local run stdout": local.stdout, "local run stderr": local.stderr,
                       "stdout": captured.out, "stderr": captured.err})
