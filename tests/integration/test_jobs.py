"""`ray job submit` against a real head with token auth, through jobs/submit.py, as a user would.

The head is `ray start --head --block` with RAY_AUTH_MODE=token and a token of its own, stopped by its
pid. The job uploads the checkout (--working-dir .), trains a tiny run that joins the head's cluster
(not a local Ray of its own), and leaves its checkpoint in the run directory. The job API refuses a
request without the token (401) or with a wrong one (403) and serves it with the right one.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from raytrain_speech.data.synth import synthesize
from tests.conftest import TINY_SYNTH, tiny_config
from tests.integration.heads import free_port, short_temp_dir, start_head, stop_head

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def _request(url: str, token: str | None = None, body: dict | None = None) -> int:
    """HTTP status of a GET (or a POST of ``body``); 0 when nothing answers yet."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = None
    if body is not None:
        data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:  # not listening yet, refused, or timed out
        return 0


def _get(url: str, token: str | None = None) -> int:
    return _request(url, token)


def _post_job(url: str, token: str, entrypoint: str) -> int:
    return _request(f"{url}/api/jobs/", token, {"entrypoint": entrypoint})


@pytest.fixture
def token_head():
    temp, port, dash = short_temp_dir("rtsjob"), free_port(), free_port()
    token = secrets.token_hex(32)
    venv_bin = os.path.dirname(sys.executable)
    # The client side (ray job submit) finds the token in the environment, like a user's shell.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "PATH": venv_bin + os.pathsep + os.environ.get("PATH", "")}
    # Every port of its own: a fixed default (the agent's 52365) held by any other Ray on the machine
    # would leave this head without a job agent.
    ports = [f"--{name}={free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                     "metrics-export-port", "runtime-env-agent-port",
                                                     "ray-client-server-port")]
    head = start_head(temp, port, ["--num-cpus=4", "--object-store-memory=400000000", "--include-dashboard=true",
                                   "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", *ports], env)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        # Ready = the head's job agent takes a job (the HTTP API answers before the agent registers).
        codes = []
        while (code := _post_job(url, token, "true")) != 200:
            codes.append(code)
            assert head.poll() is None, "ray start --head exited"
            assert time.time() < deadline, f"the head's job agent did not come up (HTTP codes: {codes[-10:]})"
            time.sleep(1)
        yield url, token, env
    finally:
        stop_head(head, temp)


def test_job_submit_with_token_auth_trains_and_checkpoints(token_head, tmp_path):
    url, token, env = token_head
    assert _get(f"{url}/api/jobs/") == 401  # no token: refused
    assert _get(f"{url}/api/jobs/", "not-the-token") == 403  # wrong token: forbidden
    assert _get(f"{url}/api/jobs/", token) == 200

    corpus, runs = tmp_path / "corpus", tmp_path / "runs"
    synthesize(tiny_config(**{"data.root": str(corpus)}).synth, str(corpus), log=lambda s: None)
    job_id = f"rts-test-{secrets.token_hex(4)}"
    submit = [sys.executable, "jobs/submit.py", "--address", url, "--submission-id", job_id, "--",
              "train", "--config", "examples/conformer_ctc_tiny.yaml", "--no-progress",
              f"data.root={corpus}", f"run.storage_path={runs}", "run.name=job", "run.num_workers=1",
              "train.max_steps=6", "train.log_every_steps=3", "train.checkpoint_every_steps=3",
              "train.global_batch_audio_s=20", *TINY_SYNTH]
    proc = subprocess.run(submit, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    first = proc.stdout.splitlines()[0]
    assert first.split()[1:4] == ["job", "submit", "--address"] and "--working-dir . " in first, first
    assert "-- raytrain-speech train --config examples/conformer_ctc_tiny.yaml" in first
    assert proc.returncode == 0, out[-4000:]

    request = urllib.request.Request(f"{url}/api/jobs/{job_id}", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        info = json.load(response)
    assert info["status"] == "SUCCEEDED" and info["entrypoint"].startswith("raytrain-speech train"), info
    logs = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ray"), "job", "logs",
                           "--address", url, job_id], env=env, capture_output=True, text=True, timeout=60).stdout
    assert "run job: step 6" in logs, logs[-3000:]
    assert "Started a local Ray instance" not in logs  # it joined the head's cluster
    assert (runs / "job" / "checkpoint_step00000006" / "state.pt").exists()


def test_submit_helper_refuses_an_empty_command():
    proc = subprocess.run([sys.executable, "jobs/submit.py", "--dry-run", "--"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("error: no raytrain-speech command")


def test_submit_helper_dry_run_prints_the_exact_command_and_warns_on_local_storage():
    proc = subprocess.run([sys.executable, "jobs/submit.py", "--dry-run", "--address", "http://10.0.0.5:8265",
                           "--runtime-env", "jobs/runtime_env_gpu.yaml", "--", "train", "--config",
                           "examples/conformer_ctc_a100.yaml", "run.storage_path=runs"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith(
        "job submit --address http://10.0.0.5:8265 --working-dir . --runtime-env jobs/runtime_env_gpu.yaml "
        "-- raytrain-speech train --config examples/conformer_ctc_a100.yaml run.storage_path=runs")
    assert "use s3://" in proc.stderr
