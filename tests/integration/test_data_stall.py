"""A data pipeline that stalls mid-run ends the run with one line instead of hanging (data.stall_timeout_s).

The corpus is on the local S3 server, reached through a TCP proxy in this test. Once training has
taken a few steps the proxy stops forwarding: connections stay open and requests go unanswered (a
wedged gateway, a storage node that hangs), so the S3 client's own timeouts (60 s per request, five
attempts) would hold the run for minutes. The watchdog ends it after data.stall_timeout_s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from urllib.parse import urlparse

import pytest

from raytrain_speech.data.synth import synthesize
from tests.conftest import TINY_SYNTH, tiny_config
from tests.integration.audit import read_attempts
from tests.integration.proxy import StallingProxy

RECIPE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "conformer_ctc_tiny.yaml")
BUCKET = "stall"


def _corpus_behind_proxy(bucket: str, s3_endpoint: str, s3fs_client):
    """The tiny corpus synthesized into ``s3://<bucket>/corpus`` (directly), and a proxy in front of the
    server for the run to reach it through: (proxy, manifest)."""
    s3fs_client.mkdir(bucket)
    cfg = tiny_config(**{"data.root": f"s3://{bucket}/corpus", "storage.endpoint_url": s3_endpoint})
    manifest = synthesize(cfg.synth, cfg.data.root, cfg.storage, log=lambda s: None)
    url = urlparse(s3_endpoint)
    return StallingProxy((url.hostname, url.port)), manifest


def test_a_pipeline_that_stalls_mid_run_fails_with_one_line(s3_endpoint, s3fs_client, tmp_path):
    proxy, _ = _corpus_behind_proxy(BUCKET, s3_endpoint, s3fs_client)
    log_dir = tmp_path / "trained"
    args = ["train", "--config", RECIPE, "--no-progress", "run.backend=local", *TINY_SYNTH,
            f"data.root=s3://{BUCKET}/corpus", f"storage.endpoint_url=http://127.0.0.1:{proxy.port}",
            f"run.storage_path={tmp_path / 'runs'}", "run.name=stall", "train.max_steps=1000",
            "train.max_epochs=4", "train.log_every_steps=2", "train.checkpoint_every_steps=4",
            "train.global_batch_audio_s=20", f"train.trained_log_dir={log_dir}", "data.stall_timeout_s=5"]
    proc = subprocess.Popen([sys.executable, "-m", "raytrain_speech.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            attempts = read_attempts(str(log_dir)) if log_dir.exists() else []
            if attempts and max(attempts[-1]["steps"], default=0) >= 3:
                proxy.stall.set()
                stalled_at = time.time()
                break
            time.sleep(0.1)
        assert proxy.stall.is_set(), "training never reached step 3 through the proxy"
        out, err = proc.communicate(timeout=120)
        ended_s = time.time() - stalled_at
    finally:
        if proc.poll() is None:
            proc.kill()
        proxy.close()
    assert proc.returncode == 1, err[-3000:]
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    line = lines[0]
    assert "DataStalled: rank 0 waited 5 s for its next training batch" in line, line
    assert f"s3://{BUCKET}/corpus split train" in line and "data.stall_timeout_s" in line, line
    # Within the watchdog's 5 s and the run's exit, not the S3 client's minutes of retries.
    assert ended_s < 45, f"the run took {ended_s:.0f} s to end after the stall"
    # What was trained before the stall is committed and resumable: the checkpoints are on local disk.
    record = json.loads((tmp_path / "runs" / "stall" / "local_checkpoints.json").read_text())
    assert record["checkpoints"], "no committed checkpoint before the stall"


@pytest.mark.slow  # over the default run's budget on the 2-core Zen-1 AVX2 box (docs/LOG.md, 2026-12-03)
def test_an_outage_beyond_the_retry_budget_ends_with_one_line_and_the_rerun_resumes_exactly(
        s3_endpoint, s3fs_client, tmp_path):
    """Corpus and run directory on S3, behind the proxy; mid-run the storage goes down for longer than
    storage.max_attempts covers: the run ends with one line naming the storage, nothing half-written
    counts as committed, and the same command after the outage resumes from the last committed
    checkpoint with every utterance trained exactly once."""
    from tests.integration.audit import assert_exactly_once

    bucket = "outage"
    proxy, manifest = _corpus_behind_proxy(bucket, s3_endpoint, s3fs_client)
    log_dir = tmp_path / "trained"
    args = [sys.executable, "-m", "raytrain_speech.cli", "train", "--config", RECIPE, "--no-progress",
            "run.backend=local", *TINY_SYNTH, f"data.root=s3://{bucket}/corpus",
            f"storage.endpoint_url=http://127.0.0.1:{proxy.port}", "storage.max_attempts=2",
            "storage.connect_timeout_s=2", "storage.request_timeout_s=5", f"run.storage_path=s3://{bucket}/runs",
            "run.name=outage", "train.max_steps=24", "train.log_every_steps=2", "train.checkpoint_every_steps=4",
            "train.global_batch_audio_s=20", f"train.trained_log_dir={log_dir}"]
    try:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            attempts = read_attempts(str(log_dir)) if log_dir.exists() else []
            if attempts and max(attempts[-1]["steps"], default=0) >= 6:
                proxy.down.set()
                break
            time.sleep(0.05)
        assert proxy.down.is_set(), "training never reached step 6 through the proxy"
        out, err = proc.communicate(timeout=180)
        assert proc.returncode != 0, "the run did not notice the outage"
        errors = [line for line in err.strip().splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"s3://{bucket}/" in errors[0], err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        assert "stopped answering" in errors[0] and "resumes from the last committed checkpoint" in errors[0], errors
        proxy.down.clear()  # the outage ends; the user runs the same command again
        again = subprocess.run(args, capture_output=True, text=True, timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        proxy.close()
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming at step" in again.stdout, again.stdout
    attempts = assert_exactly_once(str(log_dir), manifest.splits["train"].num_utterances, final_step=24,
                                   complete_epochs=1)
    assert len(attempts) == 2 and attempts[1]["restored_step"] % 4 == 0 and attempts[1]["restored_step"] >= 4


@pytest.mark.slow  # a Ray run of its own with the corpus behind the proxy: ~1 min
def test_a_stalled_ray_data_pipeline_fails_the_attempt_with_the_watchdogs_line(ray_local, s3_endpoint, s3fs_client,
                                                                               tmp_path):
    """The Ray backend: Ray Data's read tasks hang on storage that stopped answering; each training
    worker's watchdog fails the attempt, and with no failure budget left the run ends with its line."""
    from raytrain_speech.train.fit import TrainingFailed, fit

    bucket = "raystall"
    proxy, _ = _corpus_behind_proxy(bucket, s3_endpoint, s3fs_client)
    log_dir = tmp_path / "trained"
    cfg = tiny_config(**{
        "data.root": f"s3://{bucket}/corpus", "storage.endpoint_url": f"http://127.0.0.1:{proxy.port}",
        # the stuck read tasks give up soon after the watchdog has spoken, so they free their CPUs
        "storage.request_timeout_s": 45, "storage.max_attempts": 1, "data.stall_timeout_s": 20,
        "run.storage_path": str(tmp_path / "runs"), "run.name": "raystall", "run.max_failures": 0,
        "train.max_steps": 1000, "train.max_epochs": 3, "train.log_every_steps": 2,
        "train.checkpoint_every_steps": 1000, "train.global_batch_audio_s": 20, "train.trained_log_dir": str(log_dir)})

    def stall_after_step_2():
        deadline = time.time() + 240
        while time.time() < deadline:
            attempts = read_attempts(str(log_dir)) if log_dir.exists() else []
            if attempts and max(attempts[-1]["steps"], default=0) >= 2:
                proxy.stall.set()
                return
            time.sleep(0.05)

    import threading

    threading.Thread(target=stall_after_step_2, daemon=True).start()
    try:
        with pytest.raises(TrainingFailed) as err:
            fit(cfg, progress=False)
    finally:
        proxy.close()
    assert proxy.stall.is_set(), f"training never reached step 2: {err.value}"
    message = str(err.value)
    assert "\n" not in message and "waited 20 s for its next training batch" in message, message
    assert f"s3://{bucket}/corpus split train" in message and "data.stall_timeout_s" in message, message
