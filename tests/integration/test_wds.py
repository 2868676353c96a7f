"""Training reads WebDataset tars in place, over the S3 wire protocol on a real local Ray: tars in
s3:// -> `prepare --index-only` (Ray survey tasks) -> build_dataset streams each tar in one Ray Data
task -> every good id once, with its stable index; a member removed from a tar after indexing arrives
as a bad row by id. (slow) A few training steps from the indexed root with `fit`."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest

from raytrain_speech.config import StorageConfig, from_dict
from raytrain_speech.data import corpus, shards, tars
from raytrain_speech.data.prepare import PrepareConfig, prepare
from tests.conftest import tiny_config
from tests.unit.test_prepare import build_webdataset_layout, speech_records, synthesized_train_rows

BUCKET = "rts-wds-test"
ROOT = f"s3://{BUCKET}/indexed"


@pytest.fixture(scope="module")
def indexed(ray_local, tmp_path_factory, s3_endpoint, s3fs_client):
    """~35 synthesized utterances as 3 tars in s3://BUCKET/inputs, indexed into s3://BUCKET/indexed.
    Returns (storage config, {good id: truth}, {id: index})."""
    tmp = tmp_path_factory.mktemp("wds-inputs")
    rows = synthesized_train_rows(tmp / "synth")
    local, good, _ = build_webdataset_layout(tmp / "wds", speech_records(rows), n_tars=3)
    s3fs_client.mkdir(BUCKET)
    s3fs_client.put(local, f"{BUCKET}/inputs", recursive=True)
    storage_cfg = StorageConfig(endpoint_url=s3_endpoint)
    cfg = from_dict(PrepareConfig, {"layout": "webdataset", "input": f"s3://{BUCKET}/inputs/part-*.tar",
                                    "workers": 2, "index_only": True})
    prepare(cfg, ROOT, storage_cfg, log=lambda s: None)
    indices = {r["key"]: r["index"] for uri in corpus.shard_uris(ROOT, "train", storage_cfg)
               for r in tars.read_index(uri, storage_cfg)[0].to_pylist()}
    return storage_cfg, good, indices


def _cfg(s3_endpoint, **kw):
    return tiny_config(**{"storage.endpoint_url": s3_endpoint, "data.root": ROOT,
                          "run.storage_path": f"s3://{BUCKET}/runs", **kw})


def _collect(ds) -> tuple[dict, dict]:
    """({id: index} of the good rows, {id: error} of the rejected ones); fails on a repeated id."""
    seen, errors = {}, {}
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        for index, uid, error in zip(batch["index"], batch["id"], batch["error"]):
            assert str(uid) not in seen and str(uid) not in errors, f"{uid} arrived twice"
            (errors if error else seen)[str(uid)] = str(error) if error else int(index)
    return seen, errors


def test_indexed_s3_tars_stream_through_build_dataset(indexed, s3_endpoint, s3fs_client):
    from raytrain_speech.data.pipeline import build_dataset

    storage_cfg, good, indices = indexed
    cfg = _cfg(s3_endpoint)
    manifest = shards.read_manifest(ROOT, storage_cfg)
    assert manifest.splits["train"].shards[0].startswith(f"s3://{BUCKET}/inputs/")  # read in place, not copied
    assert not s3fs_client.glob(f"{BUCKET}/indexed/**/*.tar")
    assert sorted(indices) == sorted(good) and sorted(indices.values()) == list(range(len(good)))
    seen, errors = _collect(build_dataset(cfg, "train"))
    assert errors == {} and seen == indices  # every good id once, with its stable index

    consumed = np.zeros(len(good), bool)
    consumed[: len(good) // 2] = True  # a resumed epoch: the first half was trained on
    seen, errors = _collect(build_dataset(cfg, "train", consumed))
    assert errors == {} and sorted(seen.values()) == list(range(len(good) // 2, len(good)))


def test_a_member_removed_after_indexing_is_a_bad_row(indexed, s3_endpoint, s3fs_client):
    """Run last in this module: it rewrites one tar in the bucket without one of its members."""
    from raytrain_speech.data.pipeline import build_dataset

    storage_cfg, good, indices = indexed
    index, tar_uri = tars.read_index(corpus.shard_uris(ROOT, "train", storage_cfg)[2], storage_cfg)
    lost = index.to_pylist()[0]
    key = tar_uri.split("://", 1)[1]
    with tarfile.open(fileobj=io.BytesIO(s3fs_client.cat(key))) as tf:
        kept = [(m, tf.extractfile(m).read()) for m in tf.getmembers() if m.name != lost["member"]]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for m, data in kept:
            tf.addfile(m, io.BytesIO(data))
    s3fs_client.pipe(key, buf.getvalue())
    seen, errors = _collect(build_dataset(_cfg(s3_endpoint), "train"))
    assert list(errors) == [lost["key"]] and "indexed member missing from the tar" in errors[lost["key"]]
    assert seen == {k: v for k, v in indices.items() if k != lost["key"]}


@pytest.mark.slow  # Ray Train start-up: ~1 min on 2 cores
def test_train_from_an_indexed_s3_webdataset_root(indexed, s3_endpoint, s3fs_client):
    """A few optimizer steps streamed from the tars in s3://, with duration buckets from the index."""
    from raytrain_speech.train.fit import fit
    from tests.integration.test_prepare import check_short_s3_run

    cfg = _cfg(s3_endpoint, **{"run.name": "from-wds", "run.num_workers": 1, "train.max_steps": 4,
                               "train.log_every_steps": 2, "train.checkpoint_every_steps": 4,
                               "train.global_batch_audio_s": 20, "optim.warmup_steps": 2})
    check_short_s3_run(fit(cfg, progress=False), cfg, s3fs_client, BUCKET)
