"""Credential-leak scan: no secret a run was given (the S3 fixture's access key and secret, a Ray
token) appears in anything the run leaves behind: files under a run directory (configs, metrics,
run cards, bad-input logs, checkpoints' saved configs and state files), object-store objects, or
captured output. Secrets are searched as bytes, so a pickled or compressed copy of the plain string
would still be found where it is stored uncompressed; state files are read raw."""

from __future__ import annotations

import os


def files_under(*roots: str) -> dict[str, bytes]:
    """Every file under local ``roots`` -> its bytes."""
    out = {}
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for name in names:
                path = os.path.join(dirpath, name)
                with open(path, "rb") as f:
                    out[path] = f.read()
    return out


def objects_under(s3fs_client, prefix: str) -> dict[str, bytes]:
    """Every object under ``bucket/prefix`` on the S3 server -> its bytes."""
    return {key: s3fs_client.cat_file(key) for key in s3fs_client.find(prefix)}


def assert_no_secrets(secrets: dict[str, str], blobs: dict[str, bytes], texts: dict[str, str]) -> None:
    """Fail naming the secret and where it was found; ``blobs`` must not be empty (a scan of nothing
    would pass vacuously)."""
    assert blobs, "the leak scan found no files to scan"
    found = []
    for label, secret in secrets.items():
        assert len(secret) >= 8, f"{label}: too short to scan for without false hits"
        needle = secret.encode()
        found += [f"{label} in {where}" for where, data in blobs.items() if needle in data]
        found += [f"{label} in {where}" for where, text in texts.items() if secret in text]
    assert not found, "credentials leaked: " + "; ".join(found)
