"""The command line as a user meets it: real subprocesses, real exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from tests.conftest import TINY_SYNTH

CLI = [sys.executable, "-m", "raytrain_speech.cli"]


def _run(args, timeout=600, **kw):
    return subprocess.run(CLI + args, capture_output=True, text=True, timeout=timeout, **kw)


def _run_in(cwd, args, timeout=600):
    return _run(args, timeout=timeout, cwd=cwd)


def test_config_errors_fail_fast_with_one_line_before_ray_starts(tmp_path):
    cases = [
        (["train", "train.bogus=1"], "train.bogus"),
        (["train", "--config", str(tmp_path / "nope.yaml")], "nope.yaml"),
        (["train", "optim.lr_peak=fast"], "optim.lr_peak"),
        (["demo", f"data.root={tmp_path}/missing", "synth.train_hours=-1"], "synth.train_hours"),
    ]
    for args, name in cases:
        start = time.time()
        proc = _run(args, timeout=60)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and name in lines[0], proc.stderr
        assert "Started a local Ray instance" not in proc.stderr + proc.stdout
        assert time.time() - start < 30


def test_missing_corpus_is_a_clear_error(tmp_path):
    proc = _run(["train", f"data.root={tmp_path}/nothing-here", f"run.storage_path={tmp_path}/runs"], timeout=120)
    assert proc.returncode == 2
    assert "manifest.json not found" in proc.stderr and "raytrain-speech synth" in proc.stderr


def test_unreachable_storage_is_a_clear_error(tmp_path):
    proc = _run(["train", "data.root=s3://no-bucket/x", "storage.endpoint_url=http://127.0.0.1:9",
                 "storage.connect_timeout_s=1", "storage.max_attempts=1"], timeout=120,
                env={**os.environ, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "s3://no-bucket/x" in lines[0] and "endpoint_url" in lines[0]


def test_demo_end_to_end_small(tmp_path):
    """`raytrain-speech demo` on a tiny corpus: synth -> train 2 workers -> eval -> summary table.

    Paths are relative to the working directory, as in the README (Ray Train runs workers elsewhere)."""
    args = ["demo", "data.root=corpus", "run.storage_path=runs", "run.name=mini",
            "train.max_steps=16", "train.log_every_steps=4", "train.checkpoint_every_steps=8",
            "train.global_batch_audio_s=40", "run.object_store_memory_mb=512", *TINY_SYNTH]
    proc = _run_in(tmp_path, args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "[demo] synthesizing" in out
    for row in ("steps", "audio hours seen", "throughput", "test WER", "test CER"):
        assert f"| {row}" in out, out
    run = tmp_path / "runs" / "mini"
    assert (run / "config.yaml").exists() and (run / "metrics.jsonl").exists()
    assert (run / "checkpoint_step00000016" / "state.pt").exists()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["metrics"]["step"] == 16 and 0 <= summary["eval"]["wer"] <= 2.0

    # The corpus is reused, and the finished run resumes at its last step instead of retraining.
    again = _run_in(tmp_path, args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "corpus found" in again.stdout
    assert "synthesizing" not in again.stdout
    proc = _run_in(tmp_path, ["eval", "--checkpoint", "runs/mini", "--split", "dev"])
    assert proc.returncode == 0, proc.stderr
    assert "dev: WER" in proc.stdout
    beam = _run_in(tmp_path, ["eval", "--checkpoint", "runs/mini", "--split", "dev", "--out", "beam.json",
                              "eval.beam_width=4", "eval.lm_weight=0.5", "eval.lm.order=4"])
    assert beam.returncode == 0, beam.stderr
    assert "4-gram char LM on" in beam.stdout
    decoding = json.loads((tmp_path / "beam.json").read_text())["decoding"]
    assert decoding["beam_width"] == 4 and decoding["lm"]["order"] == 4
