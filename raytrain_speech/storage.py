"""One place that turns a storage URI into a pyarrow filesystem.

Shards, checkpoints, metrics and run cards all live under URIs that may be local paths, ``file://``
URIs or ``s3://bucket/prefix``. Every reader and writer goes through ``resolve`` so that a custom
endpoint (MinIO, Ceph, the test server) and the retry/timeout policy are set once. Credentials are
never part of the config: pyarrow takes them from the standard AWS environment, profile or instance
role, so they cannot leak into saved configs or logs.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
from urllib.parse import urlparse

import pyarrow.fs as pafs

from raytrain_speech.config import StorageConfig


class StorageError(RuntimeError):
    """Storage is unreachable or a path is missing; the message names the URI and the fix."""


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def _endpoint(storage: StorageConfig) -> str | None:
    return storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def s3_filesystem(storage: StorageConfig) -> pafs.S3FileSystem:
    """An S3 filesystem for the configured endpoint; the same object is passed to Ray Data and Train."""
    kwargs: dict = {
        "region": storage.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        or "us-east-1",
        "connect_timeout": storage.connect_timeout_s,
        "request_timeout": storage.request_timeout_s,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=storage.max_attempts),
    }
    endpoint = _endpoint(storage)
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str, storage: StorageConfig | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path, file:// URI or s3:// URI."""
    storage = storage or StorageConfig()
    if uri.startswith("file://"):
        return pafs.LocalFileSystem(), os.path.abspath(uri[len("file://"):])
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    scheme, rest = uri.split("://", 1)
    if scheme == "s3":
        return s3_filesystem(storage), rest.rstrip("/")
    if scheme in ("gs", "gcs"):
        return pafs.GcsFileSystem(), rest.rstrip("/")
    raise StorageError(f"unsupported storage scheme '{scheme}://' in {uri}; use a local path, s3:// or gs://")


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI without touching its scheme."""
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://{posixpath.join(rest, *parts)}"
    return os.path.join(uri, *parts)


NETWORK_FAILURES = ("NETWORK_CONNECTION", "curlCode", "Connection reset", "Connection refused", "timed out",
                    "Timeout", "Could not connect", "Connection was closed")
"""Markers of a storage error that is the network's, not the request's (as the AWS SDK words them)."""


def describe_error(uri: str, err: Exception) -> str:
    """One line: the URI, the first line of the cause, and the fix for that kind of failure."""
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    if not is_remote(uri):
        fix = "check that the path exists"
    elif any(marker in reason for marker in NETWORK_FAILURES):
        fix = ("the storage stopped answering within storage.max_attempts attempts: check storage.endpoint_url "
               "and the network; once it answers, the same command resumes from the last committed checkpoint")
    else:
        fix = "check the bucket name, endpoint_url and AWS credentials in the environment"
    return f"{uri}: {reason} ({fix})"


def read_bytes(uri: str, storage: StorageConfig | None = None) -> bytes:
    fs, path = resolve(uri, storage)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except (OSError, FileNotFoundError) as err:
        raise StorageError(describe_error(uri, err)) from None


def write_bytes(uri: str, data: bytes, storage: StorageConfig | None = None) -> None:
    """Write a whole object (object stores have no append: callers rewrite small files)."""
    fs, path = resolve(uri, storage)
    try:
        parent = posixpath.dirname(path) if is_remote(uri) else os.path.dirname(path)
        if parent:
            fs.create_dir(parent, recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(data)
    except OSError as err:
        raise StorageError(describe_error(uri, err)) from None


def upload_dir(local_dir: str, uri: str, storage: StorageConfig | None = None) -> None:
    """Copy a local directory's files to ``uri`` (streamed, not read into memory)."""
    fs, path = resolve(uri, storage)
    try:
        fs.create_dir(path, recursive=True)
        pafs.copy_files(local_dir, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    except OSError as err:
        raise StorageError(describe_error(uri, err)) from None


def delete_dir(uri: str, storage: StorageConfig | None = None) -> None:
    """Remove a directory and everything under it (no error if it is gone already)."""
    fs, path = resolve(uri, storage)
    try:
        fs.delete_dir(path)
    except FileNotFoundError:
        pass
    except OSError as err:
        raise StorageError(describe_error(uri, err)) from None


def exists(uri: str, storage: StorageConfig | None = None) -> bool:
    fs, path = resolve(uri, storage)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as err:
        raise StorageError(describe_error(uri, err)) from None


PREFLIGHT_DEADLINE_S = 25.0
"""Longest the start-up check of a bucket may take before the run fails with the fix."""


def check_reachable(uri: str, storage: StorageConfig | None = None) -> None:
    """Fail fast with one line if the bucket/endpoint behind ``uri`` cannot be listed.

    Runs with its own short timeouts (at most 2 attempts of 4 s to connect + 8 s to answer): an
    endpoint that accepts connections but never answers would otherwise hold a run's start for
    attempts x request_timeout_s (5 minutes with the defaults) before saying anything.
    """
    if not is_remote(uri):
        return
    storage = storage or StorageConfig()
    quick = dataclasses.replace(storage, connect_timeout_s=min(storage.connect_timeout_s, 4.0),
                                request_timeout_s=min(storage.request_timeout_s, 8.0),
                                max_attempts=min(storage.max_attempts, 2))
    fs, path = resolve(uri, quick)
    bucket = path.split("/", 1)[0]
    try:
        info = fs.get_file_info(bucket)
    except OSError as err:
        raise StorageError(describe_error(uri, err)) from None
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"{uri}: bucket '{bucket}' does not exist (create it, or fix the URI)")
