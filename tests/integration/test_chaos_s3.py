"""Chaos on the storage side: the S3 endpoint goes away for several seconds mid-epoch."""

from __future__ import annotations

import logging
import socket
import threading
import time

import pytest
from moto.server import ThreadedMotoServer

from raytrain_speech.data.synth import synthesize
from raytrain_speech.train.fit import fit
from tests.conftest import tiny_config
from tests.integration.audit import assert_exactly_once, read_attempts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_storage_outage_is_ridden_out_with_retries(ray_local, tmp_path):
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    import s3fs

    s3fs.S3FileSystem(endpoint_url=endpoint).mkdir("outage")
    cfg = tiny_config(**{"storage.endpoint_url": endpoint})
    manifest = synthesize(cfg.synth, "s3://outage/corpus", cfg.storage, log=lambda s: None)
    log_dir = str(tmp_path / "trained")
    cfg = tiny_config(**{
        "storage.endpoint_url": endpoint, "data.root": "s3://outage/corpus", "run.storage_path": "s3://outage/runs",
        "run.name": "outage", "train.max_steps": 30, "train.log_every_steps": 2, "train.checkpoint_every_steps": 6,
        "train.global_batch_audio_s": 20, "train.trained_log_dir": log_dir, "optim.warmup_steps": 5,
    })
    outage = {}

    def take_storage_down():
        nonlocal server
        deadline = time.time() + 300
        while time.time() < deadline:
            attempts = read_attempts(log_dir)
            if attempts and max(attempts[-1]["steps"], default=0) >= 9:
                server.stop()
                outage["start"] = time.time()
                time.sleep(5)
                server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
                server.start()
                outage["end"] = time.time()
                return
            time.sleep(0.1)

    threading.Thread(target=take_storage_down, daemon=True).start()
    try:
        outcome = fit(cfg, progress=False)
    finally:
        time.sleep(1)
        server.stop()
    assert outage.get("end"), "the outage never happened"
    assert outcome.metrics["step"] == 30
    attempts = assert_exactly_once(log_dir, manifest.splits["train"].num_utterances, final_step=30)
    # Retries carry the run through a 5 s outage; a restart would also be correct but is not needed.
    assert len(attempts) == 1, [a["restored_step"] for a in attempts]
