import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raytrain_speech.data import audio, shards
from raytrain_speech.storage import StorageError


def _row(i):
    wav = np.sin(np.arange(8000) / 10).astype(np.float32) * 0.3
    return {"index": i, "id": f"u{i}", "audio": audio.encode_flac(wav, 16000), "sample_rate_hz": 16000,
            "duration_s": 0.5, "text": "hello world", "language": "en", "speaker": "s1"}


def test_round_trip(tmp_path):
    table = shards.rows_to_table([_row(i) for i in range(5)])
    shards.write_shard(str(tmp_path), shards.shard_name("train", 0), table)
    m = shards.Manifest(splits={"train": shards.SplitInfo(["train/shard-00000.parquet"], [5], 0.01)})
    shards.write_manifest(str(tmp_path), m)
    uris = shards.shard_uris(str(tmp_path), "train")
    back = shards.read_shard(uris[0])
    assert back.to_pylist() == table.to_pylist()


def test_missing_corpus_split_columns_and_non_parquet(tmp_path):
    with pytest.raises(StorageError, match="raytrain-speech synth"):
        shards.read_manifest(str(tmp_path))
    shards.write_manifest(str(tmp_path), shards.Manifest(splits={"train": shards.SplitInfo()}))
    with pytest.raises(StorageError, match="no split 'test'"):
        shards.shard_uris(str(tmp_path), "test")
    pq.write_table(pa.table({"id": ["a"]}), tmp_path / "bad.parquet")
    with pytest.raises(StorageError, match="missing columns"):
        shards.read_shard(str(tmp_path / "bad.parquet"))
    (tmp_path / "junk.parquet").write_bytes(b"definitely not parquet")
    with pytest.raises(StorageError, match="not a readable Parquet"):
        shards.read_shard(str(tmp_path / "junk.parquet"))


def test_check_shards_sets_unreadable_shards_aside_with_their_index_ranges(tmp_path):
    rows = [{"index": i, "id": f"u{i}", "audio": b"x", "sample_rate_hz": 16000, "duration_s": 1.0, "text": "a"}
            for i in range(10)]
    shards.write_shard(str(tmp_path), "train/shard-00000.parquet", shards.rows_to_table(rows[:4]))
    (tmp_path / "train" / "shard-00001.parquet").write_bytes(b"PK\x03\x04 a zip file, not Parquet")
    pq.write_table(pa.table({"index": [7, 8], "id": ["u7", "u8"]}), tmp_path / "train" / "shard-00002.parquet")
    shards.write_shard(str(tmp_path), "train/shard-00003.parquet", shards.rows_to_table(rows[9:]))
    names = [f"train/shard-0000{i}.parquet" for i in range(5)]  # shard 4 is listed but was never written
    shards.write_manifest(str(tmp_path), shards.Manifest(splits={"train": shards.SplitInfo(names, [4, 3, 2, 1, 5])}))
    good, bad = shards.check_shards(str(tmp_path), "train")
    assert good == [str(tmp_path / names[0]), str(tmp_path / names[3])]
    assert [(b.uri.rsplit("/", 1)[1], b.first_index, b.utterances) for b in bad] == [
        ("shard-00001.parquet", 4, 3), ("shard-00002.parquet", 7, 2), ("shard-00004.parquet", 10, 5)]
    assert "not a Parquet shard" in bad[0].reason and "missing columns audio" in bad[1].reason
    assert "missing" in bad[2].reason
