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
from tests.integration.leaks import assert_no_secrets, files_under

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
LEAK_ENV = {"AWS_ACCESS_KEY_ID": f"rts-job-key-{secrets.token_hex(6)}",
            "AWS_SECRET_ACCESS_KEY": f"rts-job-secret-{secrets.token_hex(12)}"}
"""Credentials in the head's (and so the job's) environment, for the leak scan: the job never uses them."""


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
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, **LEAK_ENV,
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
        yield url, token, env, port
    finally:
        stop_head(head, temp)


@pytest.mark.slow  # over the default run's budget on the 2-core Zen-1 AVX2 box (docs/LOG.md, 2026-12-03)
def test_job_submit_with_token_auth_trains_and_checkpoints(token_head, tmp_path):
    url, token, env, port = token_head
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

    # A job whose training workers would take every CPU of the head (2 x 2 of its 4) is refused at start
    # by the CPU preflight, in one line in its logs, instead of waiting forever for data.
    starved_id = f"rts-test-{secrets.token_hex(4)}"
    starved_cmd = [sys.executable, "jobs/submit.py", "--address", url, "--submission-id", starved_id, "--",
                   "train", "--config", "examples/conformer_ctc_tiny.yaml", "--no-progress",
                   f"data.root={corpus}", f"run.storage_path={runs}", "run.name=starved", "run.num_workers=2",
                   "run.cpus_per_worker=2", "train.max_steps=2", *TINY_SYNTH]
    starved = subprocess.run(starved_cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert starved.returncode != 0, (starved.stdout + starved.stderr)[-3000:]
    starved_logs = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ray"), "job", "logs",
                                   "--address", url, starved_id], env=env, capture_output=True, text=True,
                                  timeout=60).stdout
    errors = [line for line in starved_logs.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no CPU left for data" in errors[0] and "run.cpus_per_worker" in errors[0], \
        starved_logs[-3000:]
    assert "Traceback" not in starved_logs, starved_logs[-3000:]
    assert not any((runs / "starved").rglob("checkpoint_*"))

    # The Ray token and the AWS credentials the job's processes had are in nothing it left behind.
    secrets_ = {"RAY_AUTH_TOKEN": token, "AWS_ACCESS_KEY_ID": LEAK_ENV["AWS_ACCESS_KEY_ID"],
                "AWS_SECRET_ACCESS_KEY": LEAK_ENV["AWS_SECRET_ACCESS_KEY"]}
    assert_no_secrets(secrets_, files_under(str(runs)), {"submit output": out, "job logs": logs,
                                                         "refused job's logs": starved_logs})


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


JOIN = """
import sys, ray
try:
    ray.init(address=sys.argv[1], logging_level="ERROR")
except Exception as err:
    print("REFUSED", type(err).__name__, str(err).splitlines()[0] if str(err) else "")
    sys.exit(3)
print("JOINED", ray.cluster_resources().get("CPU"))
"""


@pytest.mark.slow  # ~55 s: a head of its own, and each refused client retries ~20 s before giving up
def test_a_client_without_the_token_cannot_join_the_cluster(token_head, tmp_path):
    """Token auth guards the cluster itself, not only the job API: a driver without the token (no
    RAY_AUTH_TOKEN, no token file under its HOME) or with a wrong one is refused; with it, it joins."""
    url, token, env, port = token_head
    address = f"127.0.0.1:{port}"
    bare = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    runs = {
        "no token": {**bare, "HOME": str(tmp_path)},
        "wrong token": {**bare, "HOME": str(tmp_path), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64},
        "the token": env,
    }
    results = {}
    for name, run_env in runs.items():
        proc = subprocess.run([sys.executable, "-c", JOIN, address], env=run_env, capture_output=True, text=True,
                              timeout=120)
        results[name] = (proc.returncode, proc.stdout.strip(), proc.stderr)
    assert results["the token"][0] == 0 and results["the token"][1].startswith("JOINED"), results["the token"]
    for name in ("no token", "wrong token"):
        code, out, err = results[name]
        assert code == 3 and out.startswith("REFUSED"), (name, out, err[-2000:])
        assert "InvalidAuthToken" in err, (name, err[-2000:])  # refused for the token, not unreachable
