"""Indexed WebDataset splits without Ray: `prepare --index-only` on a small local tar set (real
synthesized FLAC/WAV/OGG), the corpus API on such a root (check_shards, read_durations, read_shard),
and the tar reader: rows match the index, a member missing from a tar becomes a bad row by id."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest

from raytrain_speech.config import ConfigError, FeatureConfig, TextConfig, from_dict
from raytrain_speech.data import corpus, shards, tars
from raytrain_speech.data.prepare import PrepareConfig, prepare
from raytrain_speech.data.preprocess import Preprocessor, iter_table, to_utterances
from tests.unit import test_prepare
from tests.unit.test_prepare import build_webdataset_layout, read_skipped

records = test_prepare.records  # the same seven synthesized utterances (a module fixture)


def _cfg(**kw) -> PrepareConfig:
    return from_dict(PrepareConfig, {"workers": 0, "layout": "webdataset", **kw}, prefix="prepare.")


def _index(tmp_path, records, n_tars: int = 2):
    """(root, good, bad, tar dir): the tars indexed into tmp_path/root (they stay in tmp_path/wds)."""
    tar_dir, good, bad = build_webdataset_layout(tmp_path / "wds", records, n_tars=n_tars)
    root = str(tmp_path / "root")
    prepare(_cfg(input=tar_dir, index_only=True), root, log=lambda s: None)
    return root, good, bad, tar_dir


def _read_all(root: str, consumed=None) -> list[dict]:
    return [r for uri in corpus.shard_uris(root, "train") for r in tars.iter_rows(uri, consumed=consumed)]


def test_index_only_writes_a_manifest_of_tars_and_an_index_per_tar(tmp_path, records):
    root, good, bad, tar_dir = _index(tmp_path, records)
    manifest = shards.read_manifest(root)
    info = manifest.splits["train"]
    assert info.shards == [os.path.join(tar_dir, f"part-{n:04d}.tar") for n in range(2)]  # absolute: not under root
    record = manifest.source["splits"]["train"]
    assert record["kind"] == tars.INDEX_KIND and record["index"] == ["train/index-00000.parquet",
                                                                     "train/index-00001.parquet"]
    assert manifest.source["skipped"] == len(bad) == 2 and info.num_utterances == len(good)
    tables = [pq.read_table(os.path.join(root, rel)) for rel in record["index"]]
    assert [t.num_rows for t in tables] == info.utterances
    assert "audio" not in tables[0].column_names  # no audio bytes: the index is metadata only
    # Tar k holds consecutive indices (keys sorted inside it), as first_indices says.
    for table, first in zip(tables, shards.first_indices(info)):
        assert table.column("index").to_pylist() == list(range(first, first + table.num_rows))
        assert table.column("key").to_pylist() == sorted(table.column("key").to_pylist())
    keys = [k for t in tables for k in t.column("key").to_pylist()]
    assert sorted(keys) == sorted(good)
    for row in (r for t in tables for r in t.to_pylist()):
        truth = good[row["key"]]
        assert row["text"] == truth["text"] and row["speaker"] == truth["speaker"] and row["language"] == "en"
        assert row["duration_s"] == pytest.approx(truth["duration_s"], abs=1e-3)
        assert row["member"].startswith(row["key"] + ".") and row["size_bytes"] == len(truth["audio"])
    assert info.hours == pytest.approx(sum(g["duration_s"] for g in good.values()) / 3600, abs=1e-4)
    # Bad members are listed exactly as a full prepare lists them.
    full = str(tmp_path / "full")
    prepare(_cfg(input=tar_dir), full, log=lambda s: None)
    assert read_skipped(root) == read_skipped(full)
    durations = corpus.read_durations(root, "train")
    assert durations == pytest.approx([r["duration_s"] for t in tables for r in t.to_pylist()])


def test_tars_under_the_root_are_listed_relative(tmp_path, records):
    tar_dir, good, _ = build_webdataset_layout(tmp_path / "root" / "wds", records, n_tars=3)
    root = str(tmp_path / "root")
    prepare(_cfg(input=os.path.join(tar_dir, "part-*.tar"), index_only=True, split="dev"), root, log=lambda s: None)
    info = shards.read_manifest(root).splits["dev"]
    assert info.shards == [f"wds/part-{n:04d}.tar" for n in range(3)]
    good_uris, bad_shards = corpus.check_shards(root, "dev")
    assert bad_shards == [] and good_uris == [os.path.join(root, f"dev/index-{n:05d}.parquet") for n in range(3)]
    assert sorted(r["id"] for r in _read_all_split(root, "dev")) == sorted(good)


def _read_all_split(root: str, split: str) -> list[dict]:
    return [r for uri in corpus.shard_uris(root, split) for r in tars.iter_rows(uri)]


def test_reader_rows_match_the_index(tmp_path, records):
    root, good, _, _ = _index(tmp_path, records)
    rows = _read_all(root)
    assert sorted(r["index"] for r in rows) == list(range(len(good)))
    for r in rows:
        truth = good[r["id"]]
        assert r["read_error"] == "" and r["audio"] == truth["audio"]  # the tar's bytes, untouched
        assert r["text"] == truth["text"] and r["duration_s"] == pytest.approx(truth["duration_s"], abs=1e-3)
    # The Ray Data task's batches carry exactly the Preprocessor's columns (+ read_error).
    batches = list(tars.read_batches(corpus.shard_uris(root, "train")[0], rows_per_batch=2))
    assert batches[0].column_names == ["index", "id", "audio", "duration_s", "text", "language", "sample_rate_hz",
                                         "read_error"]
    assert all(b.num_rows <= 2 for b in batches)
    # The in-process readers (validation, eval) see an ordinary shard table.
    table = corpus.read_shard(corpus.shard_uris(root, "train")[1])
    assert table.schema.names == shards.SCHEMA.names
    assert table.column("sample_rate_hz").to_pylist() == [good[i]["sample_rate_hz"] for i in table.column("id").to_pylist()]


def test_consumed_rows_are_not_read(tmp_path, records):
    root, good, _, _ = _index(tmp_path, records)
    consumed = np.zeros(len(good), bool)
    consumed[::2] = True
    assert sorted(r["index"] for r in _read_all(root, consumed)) == list(range(1, len(good), 2))


def _rewrite_tar(path: str, drop: str) -> None:
    """The tar at ``path`` again, without member ``drop`` (a tar changed after it was indexed)."""
    with tarfile.open(path) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers() if m.name != drop]
    with tarfile.open(path, "w") as tf:
        for m, data in members:
            tf.addfile(m, io.BytesIO(data))


def test_a_member_missing_from_the_tar_is_a_bad_row_by_id(tmp_path, records):
    root, good, _, _ = _index(tmp_path, records)
    uri = corpus.shard_uris(root, "train")[0]
    index, tar_uri = tars.read_index(uri)
    lost = index.to_pylist()[1]
    _rewrite_tar(tar_uri, lost["member"])
    assert corpus.check_shards(root, "train")[1] == []  # the tar is there; only one member is not
    rows = list(tars.iter_rows(uri))
    assert sorted(r["index"] for r in rows) == index.column("index").to_pylist()  # nothing silently dropped
    missing = [r for r in rows if r["read_error"]]
    assert [r["id"] for r in missing] == [lost["key"]] and missing[0]["audio"] == b""
    assert "indexed member missing from the tar" in missing[0]["read_error"]
    # Through the in-process reader the Preprocessor rejects it by id, as bad input.
    pre = Preprocessor(FeatureConfig(), TextConfig())
    bad = [b for batch in iter_table(corpus.read_shard(uri), pre) for b in to_utterances(batch)[1]]
    assert bad == [(lost["index"], lost["key"], "empty audio bytes")]


def test_missing_tar_or_index_is_a_bad_shard_with_its_index_range(tmp_path, records):
    root, good, _, tar_dir = _index(tmp_path, records, n_tars=3)
    info = shards.read_manifest(root).splits["train"]
    os.remove(os.path.join(tar_dir, "part-0001.tar"))
    os.remove(os.path.join(root, "train", "index-00002.parquet"))
    good_uris, bad = corpus.check_shards(root, "train")
    assert good_uris == [os.path.join(root, "train", "index-00000.parquet")]
    assert [(b.uri, b.first_index, b.utterances) for b in bad] == [
        (info.shards[1], shards.first_indices(info)[1], info.utterances[1]),
        (info.shards[2], shards.first_indices(info)[2], info.utterances[2])]
    assert "tar listed in the manifest is missing" in bad[0].reason
    assert "index" in bad[1].reason and "--index-only" in bad[1].reason
    assert len(corpus.read_durations(root, "train", uris=good_uris)) == info.utterances[0]


def test_index_only_is_for_webdataset_and_cli_flag(tmp_path, records, capsys):
    with pytest.raises(ConfigError, match="prepare.index_only"):
        from_dict(PrepareConfig, {"layout": "manifest", "input": "x.tsv", "index_only": True}).validate()
    from raytrain_speech.cli import main

    tar_dir, good, _ = build_webdataset_layout(tmp_path / "wds", records)
    out = str(tmp_path / "out")
    assert main(["prepare", "--input", tar_dir, "--layout", "webdataset", "--out", out, "--index-only",
                 "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert f"train: {len(good)} utterances" in printed and "2 tars read in place" in printed
    assert tars.is_indexed(out, "train")
