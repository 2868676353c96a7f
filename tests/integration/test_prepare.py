"""`prepare` end to end over the S3 wire protocol, on a real local Ray: one tiny synthesized corpus,
rewritten as a JSONL manifest of FLAC/WAV/OGG files, as LibriSpeech and as WebDataset tars (both
read from s3://), each with a corrupt audio file and an empty transcript -> shards in s3:// -> a resumed
re-run through the CLI -> one prepared corpus through the Ray Data chain, and (slow) a few
training steps on it."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from raytrain_speech.config import StorageConfig, from_dict
from raytrain_speech.data import shards
from raytrain_speech.data.prepare import STATE_FILE, PrepareConfig, prepare
from raytrain_speech.train.fit import fit
from raytrain_speech.train.metrics import read_metrics
from tests.conftest import tiny_config
from tests.unit.test_prepare import (
    build_damaged_layout,
    build_librispeech_layout,
    build_manifest_layout,
    build_webdataset_layout,
    check_prepared,
    check_shard_indices,
    rendered_records,
    speech_records,
    synthesized_train_rows,
)

BUCKET = "rts-prepare-test"
LAYOUTS = ("manifest", "librispeech", "webdataset")
SHARD_UTTERANCES = 12


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, s3_endpoint, s3fs_client):
    """The three layouts of one ~35-utterance synthesized corpus; LibriSpeech and the WebDataset tars
    are read from s3://, the manifest's mixed FLAC/WAV/OGG files from local disk."""
    tmp = tmp_path_factory.mktemp("prepare-inputs")
    rows = synthesized_train_rows(tmp / "synth")
    records = speech_records(rows)
    s3fs_client.mkdir(BUCKET)
    wds_local, wds_good, wds_bad = build_webdataset_layout(tmp / "wds", records, n_tars=3)
    s3fs_client.put(wds_local, f"{BUCKET}/inputs/wds", recursive=True)
    libri_local, libri_good, libri_bad = build_librispeech_layout(tmp / "LibriSpeech" / "train-tiny", records)
    s3fs_client.put(libri_local, f"{BUCKET}/inputs/LibriSpeech/train-tiny", recursive=True)
    return {
        "manifest": build_manifest_layout(tmp / "manifest", records, "jsonl"),
        "librispeech": (f"s3://{BUCKET}/inputs/LibriSpeech/train-tiny", libri_good, libri_bad),
        "webdataset": (f"s3://{BUCKET}/inputs/wds/part-*.tar", wds_good, wds_bad),
    }


@pytest.fixture(scope="module")
def prepared(ray_local, s3_endpoint, inputs):
    """Each layout prepared into s3://BUCKET/<layout> by Ray tasks (2 in flight)."""
    storage_cfg = StorageConfig(endpoint_url=s3_endpoint)
    outcomes = {}
    for layout in LAYOUTS:
        cfg = from_dict(PrepareConfig, {"layout": layout, "input": inputs[layout][0], "workers": 2,
                                        "shard_utterances": SHARD_UTTERANCES})
        outcomes[layout] = prepare(cfg, f"s3://{BUCKET}/{layout}", storage_cfg, log=lambda s: None)
    return storage_cfg, outcomes


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_is_prepared_into_s3(prepared, inputs, s3fs_client, layout):
    storage_cfg, outcomes = prepared
    _, good, bad = inputs[layout]
    outcome = outcomes[layout]
    assert len(good) >= 30 and outcome.skipped == 2 and outcome.shards_reused == 0
    rows = check_prepared(f"s3://{BUCKET}/{layout}", good, bad, storage_cfg=storage_cfg)
    manifest = shards.read_manifest(f"s3://{BUCKET}/{layout}", storage_cfg)
    assert manifest.splits["train"].utterances[:-1] == [SHARD_UTTERANCES] * (len(manifest.splits["train"].shards) - 1)
    assert manifest.source["layout"] == layout and manifest.source["skipped"] == 2
    assert manifest.splits["train"].hours == pytest.approx(sum(r["duration_s"] for r in rows) / 3600, abs=1e-4)
    assert s3fs_client.exists(f"{BUCKET}/{layout}/train/{STATE_FILE}")


def test_rerun_resumes_and_writes_only_the_missing_shard(prepared, inputs, s3_endpoint, s3fs_client):
    """The CLI, re-run after a shard was lost, rewrites that shard alone (no Ray: --workers 0)."""
    _, outcomes = prepared
    layout = "librispeech"
    listing = outcomes[layout].manifest.splits["train"].shards
    assert len(listing) >= 3
    before = {rel: s3fs_client.info(f"{BUCKET}/{layout}/{rel}")["LastModified"] for rel in listing}
    s3fs_client.rm(f"{BUCKET}/{layout}/{listing[1]}")
    time.sleep(1.1)  # LastModified has one-second resolution
    proc = subprocess.run(
        [sys.executable, "-m", "raytrain_speech.cli", "prepare", "--input", inputs[layout][0], "--layout", layout,
         "--out", f"s3://{BUCKET}/{layout}", "--shard-utterances", str(SHARD_UTTERANCES), "--workers", "0",
         f"storage.endpoint_url={s3_endpoint}"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"({1} written, {len(listing) - 1} already there from an earlier run)" in proc.stdout, proc.stdout
    assert "skipped 2 bad inputs" in proc.stdout
    after = {rel: s3fs_client.info(f"{BUCKET}/{layout}/{rel}")["LastModified"] for rel in listing}
    assert [rel for rel in listing if after[rel] != before[rel]] == [listing[1]]
    _, good, bad = inputs[layout]
    check_prepared(f"s3://{BUCKET}/{layout}", good, bad, storage_cfg=prepared[0])


def test_files_left_out_when_decoded_close_up_the_indices_under_ray(ray_local, tmp_path):
    """Ray tasks (2 in flight, a shard per utterance) write shards while earlier ones are still being
    decoded; truncated and NaN files left out there must give exactly the shards a serial run gives."""
    import pyarrow.parquet as pq

    path, good, bad = build_damaged_layout(tmp_path / "in", rendered_records())
    outcomes = {}
    for workers in (0, 2):
        cfg = from_dict(PrepareConfig, {"layout": "manifest", "input": path, "workers": workers, "shard_utterances": 1})
        outcomes[workers] = prepare(cfg, str(tmp_path / f"out{workers}"), log=lambda s: None)
        check_prepared(str(tmp_path / f"out{workers}"), good, bad)
        check_shard_indices(str(tmp_path / f"out{workers}"))
    assert outcomes[2].skipped == 3 and outcomes[2].manifest.splits["train"] == outcomes[0].manifest.splits["train"]
    for rel in outcomes[0].manifest.splits["train"].shards:
        assert pq.read_table(tmp_path / "out2" / rel).equals(pq.read_table(tmp_path / "out0" / rel)), rel


def _train_cfg(s3_endpoint, root):
    return tiny_config(**{
        "storage.endpoint_url": s3_endpoint, "data.root": root, "run.storage_path": f"s3://{BUCKET}/runs",
        "run.name": "from-prepared", "run.num_workers": 1, "train.max_steps": 4, "train.log_every_steps": 2,
        "train.checkpoint_every_steps": 4, "train.global_batch_audio_s": 20, "optim.warmup_steps": 2,
    })


def test_prepared_corpus_streams_through_the_ray_data_pipeline(prepared, inputs, s3_endpoint):
    """The manifest corpus mixes FLAC, WAV and OGG bytes: the unchanged Ray Data chain (read_parquet
    from s3://, decode, resample, featurize, tokenize) turns every row into features, none into an error."""
    from raytrain_speech.data.pipeline import build_dataset

    cfg = _train_cfg(s3_endpoint, f"s3://{BUCKET}/manifest")
    ids, errors = [], []
    for batch in build_dataset(cfg, "train").iter_batches(batch_format="numpy", batch_size=None):
        ids += [str(i) for i in batch["id"]]
        errors += [str(e) for e in batch["error"] if e]
    assert errors == [] and sorted(ids) == sorted(inputs["manifest"][1])


@pytest.mark.slow  # ~1 min of Ray Train start-up per layout on 2 cores
@pytest.mark.parametrize("layout", LAYOUTS)
def test_train_from_a_prepared_s3_corpus(prepared, s3_endpoint, s3fs_client, layout):
    """A few optimizer steps on each prepared corpus, read from and checkpointed to s3://."""
    cfg = _train_cfg(s3_endpoint, f"s3://{BUCKET}/{layout}")
    cfg.run.name = f"from-prepared-{layout}"
    metrics = check_short_s3_run(fit(cfg, progress=False), cfg, s3fs_client, BUCKET)
    assert metrics[-1]["bad_utterances"] == 0


def check_short_s3_run(outcome, cfg, s3fs_client, bucket: str) -> list[dict]:
    """A 4-step run reporting every 2 steps: checkpoint in s3://bucket/runs, finite loss; its metrics."""
    assert outcome.metrics["step"] == 4
    assert s3fs_client.exists(f"{bucket}/runs/{cfg.run.name}/checkpoint_step00000004/state.pt")
    metrics = read_metrics(f"s3://{bucket}/runs/{cfg.run.name}/metrics.jsonl", cfg.storage)
    assert [m["step"] for m in metrics] == [2, 4]
    assert all(m["loss"] == m["loss"] and m["loss"] > 0 for m in metrics)  # finite, not NaN
    return metrics
