#!/usr/bin/env python3
"""Submit a raytrain-speech command to a Ray cluster as a job, printing the exact `ray job submit` line.

    python jobs/submit.py [--address URL] [--runtime-env FILE] [--no-wait] [--dry-run] -- \
        train --config examples/conformer_ctc_tiny.yaml run.storage_path=s3://bucket/runs

Inside the job, `raytrain-speech` sees RAY_ADDRESS (set by Ray's job supervisor) and joins the
cluster instead of starting a local Ray. With token auth on (RAY_AUTH_MODE=token, the default of
our cluster configs), the `ray` client sends the token from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
~/.ray/auth_token; nothing here handles it. Standard library only, so it runs from any checkout.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from urllib.parse import urlparse

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_RUNTIME_ENV = os.path.join("jobs", "runtime_env.yaml")
DEFAULT_ADDRESS = "http://127.0.0.1:8265"  # `ray dashboard cluster/aws-a100.yaml` forwards it here


def ray_binary() -> str:
    beside = os.path.join(os.path.dirname(sys.executable), "ray")
    return beside if os.path.exists(beside) else (shutil.which("ray") or "ray")


def build_command(command: list[str], address: str, runtime_env: str, working_dir: str = ".",
                  submission_id: str | None = None, wait: bool = True) -> list[str]:
    """The `ray job submit` argv for one raytrain-speech sub-command."""
    if not command:
        raise ValueError("no raytrain-speech command given after --, e.g. -- train --config examples/x.yaml")
    argv = [ray_binary(), "job", "submit", "--address", address, "--working-dir", working_dir,
            "--runtime-env", runtime_env]
    if submission_id:
        argv += ["--submission-id", submission_id]
    if not wait:
        argv.append("--no-wait")
    return argv + ["--", "raytrain-speech", *command]


def storage_warning(command: list[str], address: str) -> str | None:
    """Multi-node runs need shared storage: a local storage_path on a remote cluster loses checkpoints."""
    host = urlparse(address).hostname or address
    if host in ("127.0.0.1", "localhost"):
        return None  # may be a port-forward to a real cluster, but also the local test head
    for arg in command:
        if arg.startswith("run.storage_path=") and "://" not in arg:
            return (f"warning: {arg} is a local path on a cluster at {address}; use s3:// (or gs://) so "
                    "every node reads and writes the same checkpoints")
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" in argv:
        split = argv.index("--")
        ours, command = argv[:split], argv[split + 1:]
    else:
        ours, command = argv, []
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS") or DEFAULT_ADDRESS,
                    help=f"job API of the cluster (default $RAY_API_SERVER_ADDRESS or {DEFAULT_ADDRESS})")
    ap.add_argument("--runtime-env", default=DEFAULT_RUNTIME_ENV, help="runtime_env YAML")
    ap.add_argument("--working-dir", default=".", help="directory uploaded as the job's code (the checkout)")
    ap.add_argument("--submission-id", help="job id (default: Ray picks one)")
    ap.add_argument("--no-wait", action="store_true", help="return after submitting instead of tailing logs")
    ap.add_argument("--dry-run", action="store_true", help="print the command only")
    args = ap.parse_args(ours)
    if not os.path.isfile(args.runtime_env):
        print(f"error: runtime env file {args.runtime_env} not found (run from the repository root)", file=sys.stderr)
        return 2
    try:
        cmd = build_command(command, args.address, args.runtime_env, args.working_dir,
                            args.submission_id, wait=not args.no_wait)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    warning = storage_warning(command, args.address)
    if warning:
        print(warning, file=sys.stderr)
    print(shlex.join(cmd), flush=True)
    if args.dry_run:
        return 0
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
