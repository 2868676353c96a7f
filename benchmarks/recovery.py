"""Recovery and checkpoint-stall benchmark on a local Ray cluster (2 workers, tiny model).

Three runs of the same recipe in one process, over a local S3 server (moto, so checkpoints cross a
real HTTP wire) or local disk:

  sync   no faults, checkpoint upload blocks the step loop      -> stall fraction
  async  no faults, Ray uploads in the background               -> stall fraction, vs sync
  fault  async, SIGKILL one worker mid-run                      -> seconds from the kill to the
                                                                   first step of the new attempt

Stall fraction = time the step loop spent inside checkpoint reports / elapsed time of the attempt.
Printed as ratios against the no-fault run's own step time. Goals (issue 5): recovery < 30 s,
async stall < 5%.

    python benchmarks/recovery.py [--storage s3|local] [--steps 60] [--checkpoint-every 5]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import ray  # noqa: E402

from raytrain_speech.config import load_config  # noqa: E402
from raytrain_speech.data.synth import synthesize  # noqa: E402
from raytrain_speech.train.fit import fit  # noqa: E402
from raytrain_speech.train.metrics import read_metrics  # noqa: E402
from tests.integration.audit import read_attempts  # noqa: E402

SYNTH = ["synth.train_hours=0.15", "synth.dev_utterances=10", "synth.test_utterances=10", "synth.shard_utterances=50",
         "synth.train_speakers=16", "synth.heldout_speakers=3"]


def run(name, base, tmp, steps, every, upload, kill_at=None):
    log_dir = os.path.join(tmp, f"trained-{name}")
    cfg = load_config("examples/conformer_ctc_tiny.yaml", SYNTH + base + [
        f"run.name={name}", f"train.max_steps={steps}", f"train.checkpoint_every_steps={every}",
        "train.log_every_steps=5", "train.global_batch_audio_s=40", f"train.checkpoint_upload={upload}",
        f"train.trained_log_dir={log_dir}", "optim.warmup_steps=5"])
    killed = {}
    if kill_at:
        def watch():
            while True:
                attempts = read_attempts(log_dir) if os.path.isdir(log_dir) else []
                if attempts and max(attempts[-1]["steps"], default=0) >= kill_at:
                    killed["time"] = time.time()
                    os.kill(attempts[-1]["pids"][1], signal.SIGKILL)
                    return
                time.sleep(0.02)
        threading.Thread(target=watch, daemon=True).start()
    start = time.time()
    outcome = fit(cfg, progress=False)
    wall = time.time() - start
    metrics = [m for m in read_metrics(os.path.join(outcome.run_dir, "metrics.jsonl"), cfg.storage)
               if m.get("attempt") == (2 if kill_at else 1) and "attempt_elapsed_s" in m]
    last = metrics[-1]
    attempts = read_attempts(log_dir)
    step_times = sorted(t for a in attempts for t in (rec.get("time") for rec in a["steps"].values()) if t)
    result = {"wall_s": wall, "stall": last["checkpoint_blocked_s"] / last["attempt_elapsed_s"],
              "step_s": last["attempt_elapsed_s"] / max(1, last["step"] - attempts[-1]["restored_step"])}
    if kill_at:
        result["recovery_s"] = min(t for t in step_times if t > killed["time"]) - killed["time"]
        result["attempts"] = len(attempts)
    return cfg, result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--storage", choices=["s3", "local"], default="s3")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--checkpoint-every", type=int, default=5)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="rts-recovery-")
    base = [f"data.root={tmp}/corpus", f"run.storage_path={tmp}/runs"]
    server = None
    if args.storage == "s3":
        from moto.server import ThreadedMotoServer

        os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        import logging

        import s3fs

        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        s3fs.S3FileSystem(endpoint_url=f"http://{host}:{port}").mkdir("bench")
        base = ["data.root=s3://bench/corpus", "run.storage_path=s3://bench/runs", f"storage.endpoint_url=http://{host}:{port}"]
    cfg = load_config("examples/conformer_ctc_tiny.yaml", SYNTH + base)
    synthesize(cfg.synth, cfg.data.root, cfg.storage, log=lambda s: None)
    ray.init(address="local", num_cpus=4, object_store_memory=512 * 2**20, logging_level="WARNING",
             runtime_env={"env_vars": {"RAY_DATA_LOG_LEVEL": "WARNING"}})
    try:
        _, sync = run("sync", base, tmp, args.steps, args.checkpoint_every, "sync")
        _, asyn = run("async", base, tmp, args.steps, args.checkpoint_every, "async")
        _, fault = run("fault", base, tmp, args.steps, args.checkpoint_every, "async", kill_at=args.steps // 2)
    finally:
        ray.shutdown()
        if server:
            server.stop()
    print(f"storage={args.storage} steps={args.steps} checkpoint every {args.checkpoint_every} steps, 2 workers")
    print(f"no-fault step time (async run): {asyn['step_s']:.3f} s")
    print(f"checkpoint stall, sync upload : {100 * sync['stall']:.1f}% of elapsed")
    print(f"checkpoint stall, async upload: {100 * asyn['stall']:.1f}% of elapsed "
          f"(async/sync = {asyn['stall'] / max(sync['stall'], 1e-9):.2f})")
    print(f"recovery (kill -> first new step): {fault['recovery_s']:.1f} s = "
          f"{fault['recovery_s'] / asyn['step_s']:.0f} no-fault step times ({fault['attempts']} attempts)")


if __name__ == "__main__":
    main()
