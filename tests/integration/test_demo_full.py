"""The full embedded demo and its accuracy target (slow; `make test-slow`).

Its length is the box's: ~15 minutes where two cores step the demo recipe at ~200 audio-s/s, ~30 where
they manage ~90 (the 2-core Xeon of 2026-12-01, docs/LOG.md). The timeout is a hang guard, not a target.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_full_demo_reaches_25_percent_wer_on_unseen_voices(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "raytrain_speech.cli", "demo", f"data.root={tmp_path}/corpus",
         f"run.storage_path={tmp_path}/runs"],
        capture_output=True, text=True, timeout=75 * 60,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "demo" / "summary.json").read_text())
    assert summary["eval"]["split"] == "test"
    assert summary["eval"]["wer"] <= 0.25, summary["eval"]
