"""End to end over the S3 wire protocol: synth -> s3:// shards -> Ray Data -> 2 Ray Train workers ->
checkpoints in s3:// -> resume by run name (on the local backend, from the same bucket) -> eval from
the s3:// checkpoint."""

from __future__ import annotations

import pytest

from raytrain_speech.data.synth import synthesize
from raytrain_speech.evaluate.runner import evaluate_checkpoint
from raytrain_speech.train.fit import fit
from raytrain_speech.train.metrics import read_metrics
from tests.conftest import tiny_config

BUCKET = "rts-train-test"


@pytest.fixture(scope="module")
def s3_corpus(s3_endpoint, s3fs_client):
    s3fs_client.mkdir(BUCKET)
    cfg = tiny_config(**{"storage.endpoint_url": s3_endpoint})
    root = f"s3://{BUCKET}/corpus"
    manifest = synthesize(cfg.synth, root, cfg.storage, log=lambda s: None)
    assert s3fs_client.exists(f"{BUCKET}/corpus/manifest.json")
    return root, manifest


def _cfg(s3_endpoint, root, max_steps, backend="ray"):
    return tiny_config(**{
        "storage.endpoint_url": s3_endpoint, "data.root": root, "run.backend": backend,
        "run.storage_path": f"s3://{BUCKET}/runs", "run.name": "resume-me", "run.num_workers": 2,
        "train.max_steps": max_steps, "train.log_every_steps": 4, "train.checkpoint_every_steps": 8,
        "train.global_batch_audio_s": 40, "optim.warmup_steps": 5, "optim.lr_peak": 2e-3,
    })


def test_train_from_s3_checkpoint_to_s3_and_resume(ray_local, s3_endpoint, s3fs_client, s3_corpus):
    root, manifest = s3_corpus
    cfg = _cfg(s3_endpoint, root, max_steps=16)
    first = fit(cfg, progress=False)
    assert first.metrics["step"] == 16
    assert first.checkpoint_uri == f"s3://{BUCKET}/runs/resume-me/checkpoint_step00000016"
    listing = s3fs_client.ls(f"{BUCKET}/runs/resume-me")
    assert f"{BUCKET}/runs/resume-me/checkpoint_step00000016" in listing
    assert s3fs_client.exists(f"{BUCKET}/runs/resume-me/checkpoint_step00000016/state.pt")
    assert s3fs_client.exists(f"{BUCKET}/runs/resume-me/config.yaml")

    metrics = read_metrics(f"s3://{BUCKET}/runs/resume-me/metrics.jsonl", cfg.storage)
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert [m["step"] for m in metrics] == [4, 8, 12, 16]
    assert losses[-1] < 0.9 * losses[0], losses  # past the initial CTC loss, onto the blank plateau
    assert all(m["world_size"] == 2 for m in metrics)

    # Same run name, longer schedule: continues from step 16, not from zero; here on the local backend,
    # which finds Ray Train's committed checkpoint in s3:// and writes its own there.
    second = fit(_cfg(s3_endpoint, root, max_steps=24, backend="local"), progress=False)
    metrics = read_metrics(f"s3://{BUCKET}/runs/resume-me/metrics.jsonl", cfg.storage)
    resumed = [m for m in metrics if m.get("attempt") == 2]
    assert [m["step"] for m in resumed] == [20, 24] and resumed[0]["world_size"] == 1
    assert resumed[0]["audio_hours_seen"] > metrics[3]["audio_hours_seen"]
    assert second.checkpoint_uri == f"s3://{BUCKET}/runs/resume-me/checkpoint_step00000024"
    assert s3fs_client.exists(f"{BUCKET}/runs/resume-me/local_checkpoints.json")

    result = evaluate_checkpoint(second.checkpoint_uri, cfg.storage, split="test")
    assert result["utterances"] == manifest.splits["test"].num_utterances
    assert result["step"] == 24 and 0.0 <= result["cer"] <= 1.5
