"""corpus.read_batches without Ray: a split's raw rows, shard by shard, as the Ray Data chain reads
them, on a hand-written Parquet corpus and on an indexed WebDataset split (real synthesized audio);
every row exactly once, in shard order, consumed indices left out."""

from __future__ import annotations

import numpy as np
import pytest

from raytrain_speech.config import from_dict
from raytrain_speech.data import corpus, shards, tars
from raytrain_speech.data.prepare import PrepareConfig, prepare
from raytrain_speech.data.preprocess import input_columns
from raytrain_speech.storage import StorageError
from tests.unit import test_prepare
from tests.unit.test_prepare import build_webdataset_layout

records = test_prepare.records  # seven synthesized utterances (a module fixture)

SHARD_SIZES = (4, 3, 5)
PARQUET_COLUMNS = ["index", "id", "audio", "duration_s", "text", "language", "sample_rate_hz", "read_error"]


def _row(i: int) -> dict:
    return {"index": i, "id": f"u{i:02d}", "audio": bytes([i]) * (10 + i), "sample_rate_hz": 16000,
            "duration_s": 0.5 + i / 10, "text": f"utterance {i}", "language": "en" if i % 2 else "es",
            "speaker": f"s{i % 3}"}


def _parquet_corpus(root, sizes=SHARD_SIZES, drop: tuple[str, ...] = ()) -> str:
    """Shards of ``sizes`` rows holding consecutive indices, as synth and prepare write them."""
    names, first = [], 0
    for k, n in enumerate(sizes):
        table = shards.rows_to_table([_row(i) for i in range(first, first + n)]).drop_columns(list(drop))
        names.append(shards.shard_name("train", k))
        shards.write_shard(str(root), names[-1], table)
        first += n
    shards.write_manifest(str(root), shards.Manifest(splits={"train": shards.SplitInfo(names, list(sizes), 0.01)}))
    return str(root)


def _rows(batches) -> list[dict]:
    """Column batches -> one dict per row."""
    return [{k: v[i] for k, v in b.items()} for b in batches for i in range(len(b["index"]))]


def test_parquet_split_yields_every_row_once_in_shard_order(tmp_path):
    root = _parquet_corpus(tmp_path)
    batches = list(corpus.read_batches(root, "train", rows_per_batch=2))
    assert all(list(b) == PARQUET_COLUMNS for b in batches)  # the Preprocessor's input columns + read_error
    assert all(isinstance(v, np.ndarray) and len(v) <= 2 for b in batches for v in b.values())
    rows = _rows(batches)
    assert [int(r["index"]) for r in rows] == list(range(sum(SHARD_SIZES)))
    for r in rows:
        truth = _row(int(r["index"]))
        assert (r["id"], r["audio"], r["text"], r["language"]) == (truth["id"], truth["audio"], truth["text"],
                                                                    truth["language"])
        assert r["duration_s"] == pytest.approx(truth["duration_s"])


def test_parquet_rows_are_those_of_read_shard(tmp_path):
    root = _parquet_corpus(tmp_path)
    for uri in shards.shard_uris(root, "train"):
        table = shards.read_shard(uri)
        rows = _rows(corpus.read_batches(root, "train", None, [uri], rows_per_batch=3))
        assert [r["id"] for r in rows] == table.column("id").to_pylist()
        assert [r["audio"] for r in rows] == table.column("audio").to_pylist()
        assert [int(r["index"]) for r in rows] == table.column("index").to_pylist()


def test_parquet_consumed_rows_are_left_out(tmp_path):
    root = _parquet_corpus(tmp_path)
    n = sum(SHARD_SIZES)
    consumed = np.zeros(n, bool)
    consumed[[0, 2, 3, 9]] = True
    consumed[4:7] = True  # the whole second shard
    rows = _rows(corpus.read_batches(root, "train", consumed=consumed, rows_per_batch=2))
    assert [int(r["index"]) for r in rows] == [i for i in range(n) if not consumed[i]]
    nothing = np.zeros(n, bool)
    assert _rows(corpus.read_batches(root, "train", consumed=nothing)) == _rows(corpus.read_batches(root, "train"))
    assert list(corpus.read_batches(root, "train", consumed=np.ones(n, bool))) == []


def test_parquet_only_the_given_shards_and_optional_language(tmp_path):
    root = _parquet_corpus(tmp_path / "a")
    uris = shards.shard_uris(root, "train")
    rows = _rows(corpus.read_batches(root, "train", None, [uris[2], uris[0]]))
    assert [int(r["index"]) for r in rows] == [7, 8, 9, 10, 11, 0, 1, 2, 3]  # in the order given
    plain = _parquet_corpus(tmp_path / "b", drop=("language", "speaker"))
    batches = list(corpus.read_batches(plain, "train"))
    expected = input_columns(["index", "id", "audio", "sample_rate_hz", "duration_s", "text"]) + ["read_error"]
    assert all(list(b) == expected for b in batches)
    (tmp_path / "a" / "train" / "shard-00001.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(StorageError, match="shard-00001.parquet"):
        list(corpus.read_batches(root, "train"))


@pytest.mark.parametrize("available", [
    ["index", "id", "audio", "sample_rate_hz", "duration_s", "text", "language", "speaker"],
    ["index", "id", "audio", "sample_rate_hz", "duration_s", "text", "speaker"],
    ["speaker", "text", "language", "duration_s", "audio", "id", "index"],
])
def test_row_columns_are_the_preprocessor_input_columns(available):
    assert corpus.row_columns(available) == input_columns(available)


def _indexed(tmp_path, records, n_tars: int = 3) -> tuple[str, dict]:
    tar_dir, good, _ = build_webdataset_layout(tmp_path / "wds", records, n_tars=n_tars)
    root = str(tmp_path / "root")
    cfg = from_dict(PrepareConfig, {"workers": 0, "layout": "webdataset", "input": tar_dir, "index_only": True},
                    prefix="prepare.")
    prepare(cfg, root, log=lambda s: None)
    return root, good


def _tar_of(index: int, info: shards.SplitInfo) -> int:
    firsts = shards.first_indices(info)
    return max(k for k, first in enumerate(firsts) if first <= index)


def test_indexed_tar_split_yields_every_row_once_in_shard_order(tmp_path, records):
    root, good = _indexed(tmp_path, records)
    info = shards.read_manifest(root).splits["train"]
    batches = list(corpus.read_batches(root, "train", rows_per_batch=2))
    assert all(list(b) == tars.ROW_SCHEMA.names and len(b["index"]) <= 2 for b in batches)  # incl. read_error
    rows = _rows(batches)
    assert sorted(int(r["index"]) for r in rows) == list(range(len(good)))
    order = [_tar_of(int(r["index"]), info) for r in rows]
    assert order == sorted(order) and len(set(order)) == len(info.shards)  # tar by tar, each tar once
    for r in rows:
        assert r["read_error"] == "" and r["audio"] == good[r["id"]]["audio"] and r["text"] == good[r["id"]]["text"]
    # The same rows, in the same order, as the Ray Data read task's tables.
    task_rows = [r for uri in corpus.shard_uris(root, "train") for t in tars.read_batches(uri) for r in t.to_pylist()]
    assert [(r["index"], r["id"]) for r in task_rows] == [(int(r["index"]), r["id"]) for r in rows]


def test_indexed_tar_split_leaves_out_consumed_rows(tmp_path, records):
    root, good = _indexed(tmp_path, records)
    consumed = np.zeros(len(good), bool)
    consumed[1::2] = True
    rows = _rows(corpus.read_batches(root, "train", consumed=consumed))
    assert sorted(int(r["index"]) for r in rows) == list(range(0, len(good), 2))
    uris = corpus.shard_uris(root, "train")
    only_last = _rows(corpus.read_batches(root, "train", None, uris[-1:]))
    assert {r["id"] for r in only_last} == set(tars.read_index(uris[-1])[0].column("key").to_pylist())


def _write_groups(root, rows: list[dict], rows_per_group: int = 2) -> str:
    """One shard of ``rows`` in row groups of ``rows_per_group``; returns its path."""
    import pyarrow.parquet as pq

    path = root / "train" / "shard-00000.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(shards.rows_to_table(rows), path, row_group_size=rows_per_group, compression="none")
    shards.write_manifest(str(root), shards.Manifest(splits={"train": shards.SplitInfo(
        [shards.shard_name("train", 0)], [len(rows)], 0.01)}))
    return str(path)


def test_a_corrupt_page_costs_its_row_group_only_and_names_it(tmp_path):
    """A valid footer over a corrupt page header: that row group's rows come out as named bad rows
    with their indices, every other row is read, and nothing raises (Ray Data would retry it)."""
    import pyarrow.parquet as pq

    path = _write_groups(tmp_path, [_row(i) for i in range(6)])
    col = pq.ParquetFile(path).metadata.row_group(1).column(2)  # the audio chunk of rows 2..3
    data = bytearray(open(path, "rb").read())
    data[col.data_page_offset:col.data_page_offset + 8] = b"\xff" * 8
    open(path, "wb").write(bytes(data))
    rows = _rows(corpus.read_batches(str(tmp_path), "train"))
    assert [int(r["index"]) for r in rows] == list(range(6))
    bad = {int(r["index"]): r["read_error"] for r in rows if r["read_error"]}
    assert sorted(bad) == [2, 3]
    assert "row group 1 (indices 2..3) cannot be decoded" in bad[2] and "shard-00000.parquet" in bad[2]
    assert all(r["audio"] == _row(int(r["index"]))["audio"] for r in rows if not r["read_error"])


def test_misplaced_indices_are_bad_rows_at_their_position(tmp_path):
    """A duplicated and an out-of-range index: each row keeps the index its position gives (so the
    cursor can never train a row twice or index past the split) and is bad input naming both."""
    rows = [_row(i) for i in range(5)]
    rows[2]["index"] = 1  # duplicate
    rows[4]["index"] = 10_000  # out of range
    _write_groups(tmp_path, rows)
    out = _rows(corpus.read_batches(str(tmp_path), "train"))
    assert [int(r["index"]) for r in out] == list(range(5))
    bad = {int(r["index"]): r["read_error"] for r in out if r["read_error"]}
    assert sorted(bad) == [2, 4]
    assert "has index 1 where its position gives 2" in bad[2] and "has index 10000" in bad[4]


def test_a_shard_whose_rows_disagree_with_the_manifest_is_set_aside(tmp_path):
    _write_groups(tmp_path, [_row(i) for i in range(5)])
    shards.write_manifest(str(tmp_path), shards.Manifest(splits={"train": shards.SplitInfo(
        [shards.shard_name("train", 0)], [4], 0.01)}))
    good, bad = shards.check_shards(str(tmp_path), "train")
    assert not good and "holds 5 rows but the manifest lists 4" in bad[0].reason


def test_pieces_of_a_shard_cover_its_row_groups_once(tmp_path):
    """The Ray Data read tasks each take a piece of a shard: together every row once, in order."""
    path = _write_groups(tmp_path, [_row(i) for i in range(9)])
    for pieces in (1, 2, 4, 7):
        got = [int(i) for k in range(pieces)
               for t in corpus.parquet_row_tables(path, 0, None, None, 32, k, pieces)
               for i in t.column("index").to_pylist()]
        assert got == list(range(9)), pieces
