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
