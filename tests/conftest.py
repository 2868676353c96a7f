"""Shared fixtures: a real S3 wire-protocol server on 127.0.0.1, a real local Ray, a tiny real corpus.

Nothing here is mocked: the S3 server is moto's standalone server (HTTP on loopback), reached by
pyarrow and s3fs exactly as AWS would be; Ray is a real local cluster started with
``ray.init(address="local")`` and shut down after (never ``ray stop``).
"""

from __future__ import annotations

import logging
import os

import pytest

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "rts-test-key",
    "AWS_SECRET_ACCESS_KEY": "rts-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_endpoint():
    """URL of a local S3 server; credentials are in the environment, as on a real machine."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per S3 request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(S3_ENV)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def s3fs_client(s3_endpoint):
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=s3_endpoint, key=S3_ENV["AWS_ACCESS_KEY_ID"],
                             secret=S3_ENV["AWS_SECRET_ACCESS_KEY"], use_listings_cache=False)


class SharedRay:
    """One real local Ray cluster shared by the test modules that ask for ``ray_local`` (a start and
    shutdown cost ~10 s each on 2 cores). A module that drives Ray in this process its own way (a
    multi-node ``cluster_utils`` cluster, a sweep that sizes its own cluster) says so with
    ``OWNS_RAY = True``; the shared cluster is shut down before it and started again when needed.
    Subprocesses (the CLI, ``ray start --head``) start clusters of their own beside it."""

    def __init__(self):
        self.started = False

    def start(self):
        import ray

        from raytrain_speech.ray_session import dashboard_port, local_runtime_env

        if not self.started:
            ray.init(address="local", num_cpus=4, object_store_memory=512 * 2**20, include_dashboard=True,
                     dashboard_port=dashboard_port(), logging_level="WARNING",
                     runtime_env=local_runtime_env())
            self.started = True
        return ray

    def stop(self):
        if self.started:
            import ray

            ray.shutdown()
            self.started = False


_SHARED_RAY = SharedRay()


@pytest.fixture(scope="session", autouse=True)
def _shared_ray_shutdown():
    yield
    _SHARED_RAY.stop()


@pytest.fixture(scope="module", autouse=True)
def _ray_isolation(request):
    """Shut the shared cluster down before a module that starts Ray in this process its own way."""
    if getattr(request.module, "OWNS_RAY", False):
        _SHARED_RAY.stop()
    yield


@pytest.fixture(scope="module")
def ray_local(s3_endpoint):
    """A real local Ray cluster (started after the S3 env so workers inherit it), shared with the next
    modules that use it too (see SharedRay)."""
    return _SHARED_RAY.start()


BACKENDS = [pytest.param("local", id="local"), pytest.param("ray", id="ray", marks=pytest.mark.slow)]
"""Parametrize a training test over both backends: the Trainer's behaviour (local, in the default run)
and the same assertions through Ray Train and Ray Data (slow)."""


def backend_overrides(request, backend: str) -> dict:
    """``run.backend`` for a BACKENDS test; the Ray variant gets the shared local cluster."""
    if backend == "ray":
        request.getfixturevalue("ray_local")
    return {"run.backend": backend}


TINY_SYNTH = [
    "synth.train_hours=0.08", "synth.dev_utterances=12", "synth.test_utterances=24",
    "synth.shard_utterances=40", "synth.train_speakers=16", "synth.heldout_speakers=3", "synth.workers=2",
]


def tiny_config(**overrides: str):
    """The tiny CPU recipe with test-sized steps; ``overrides`` are dotted keys -> values."""
    from raytrain_speech.config import load_config

    items = [f"{k}={v}" for k, v in overrides.items()]
    return load_config(os.path.join(os.path.dirname(__file__), "..", "examples", "conformer_ctc_tiny.yaml"),
                       TINY_SYNTH + items)
