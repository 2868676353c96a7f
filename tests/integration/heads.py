"""A Ray head of the test's own: `ray start --head --block` as a subprocess, stopped by its pid.

Never `ray stop` (it kills every Ray process on the machine). The head gets a temp dir of its own,
whose name is in every process it spawns, so teardown kills exactly this cluster's processes.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_processes_mentioning(marker: str) -> None:
    """Stop exactly the processes of one test cluster (their command lines name its temp dir)."""
    me = os.getpid()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == me:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    os.kill(int(pid), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


def short_temp_dir(prefix: str) -> str:
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")  # short: Ray's socket paths have a length limit


def start_head(temp: str, port: int, args: list[str], env: dict) -> subprocess.Popen:
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    return subprocess.Popen(
        [ray_bin, "start", "--head", "--block", f"--port={port}", f"--temp-dir={temp}", *args],
        env={**env, "RAY_TMPDIR": temp}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)


def stop_head(head: subprocess.Popen, temp: str) -> None:
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(timeout=5)  # `ray start --block` often outlives SIGTERM; what is left is killed below
    except subprocess.TimeoutExpired:
        head.kill()
    kill_processes_mentioning(temp)
    shutil.rmtree(temp, ignore_errors=True)
