"""Indexed WebDataset splits, the reading side: train straight from ``.tar`` shards, without copying
their audio (``prepare/index.py`` writes the index; docs/shards.md shows the layout)::

    <root>/manifest.json                  split lists the tars as its shards (relative to the root when
                                          they are under it, else absolute URIs), with utterance counts
    <root>/<split>/index-00000.parquet    index, key, member, size_bytes, sample_rate_hz, duration_s,
                                          text, language, speaker; key-value metadata names its tar
    <root>/<split>/prepare_skipped.jsonl  bad members, as prepare lists them (they get no index)

Why an index rather than reading tars as they are: exactly-once accounting needs a stable index
0..n-1 per split and ``n`` before the first batch, unreadable shards are accounted for by their index
range (tar k holds consecutive indices, keys in sorted order), and duration buckets and the duration
filter need every ``duration_s`` before anything is decoded. The index gives all of that for the
price of one header scan; the audio stays where it is.

To readers the index file stands in for the shard: ``corpus.shard_uris`` and ``corpus.check_shards``
return index URIs for such a split, ``corpus.read_durations`` reads their ``duration_s`` column
unchanged, and ``corpus.read_shard`` on an index streams its tar into an ordinary shard table
(validation, eval). The training chain streams each tar once, in order (``tarfile`` mode ``r|*``),
joining members with index rows by member name; an indexed member that is no longer in the tar (or
changed size) is a bad-input row with its reason, never a silent drop. No Ray here: ``pipeline.py``
runs ``read_batches`` as one Ray Data task per tar.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raytrain_speech import storage
from raytrain_speech.config import StorageConfig
from raytrain_speech.data import shards
from raytrain_speech.storage import StorageError

INDEX_KIND = "webdataset-index"
"""``source.kind`` of a split whose shards are WebDataset tars read through an index."""
TAR_KEY = b"raytrain_speech.tar"
"""Index Parquet metadata key naming its tar, as the manifest lists it (relative to the root or absolute)."""
STREAM_BUFFER_BYTES = 8 * 2**20
"""Read-ahead of a streamed tar: without it an object store gets one request per 10 kB read."""

INDEX_SCHEMA = pa.schema([
    pa.field("index", pa.int64(), nullable=False),
    pa.field("key", pa.string(), nullable=False),
    pa.field("member", pa.string(), nullable=False),
    pa.field("size_bytes", pa.int64(), nullable=False),
    pa.field("sample_rate_hz", pa.int32(), nullable=False),
    pa.field("duration_s", pa.float32(), nullable=False),
    pa.field("text", pa.string(), nullable=False),
    pa.field("language", pa.string()),
    pa.field("speaker", pa.string()),
])
INDEX_COLUMNS = tuple(INDEX_SCHEMA.names)

ROW_SCHEMA = pa.schema([
    pa.field("index", pa.int64()),
    pa.field("id", pa.string()),
    pa.field("audio", pa.binary()),
    pa.field("duration_s", pa.float32()),
    pa.field("text", pa.string()),
    pa.field("language", pa.string()),
    pa.field("sample_rate_hz", pa.int32()),
    pa.field("read_error", pa.string()),
])
"""What the training chain reads from a tar: the Preprocessor's input columns plus ``read_error``, the
reason a row has no audio ("" when it has)."""


# ---------------------------------------------------------------------------------------- manifest


def index_record(manifest: shards.Manifest, split: str) -> dict | None:
    """The split's provenance record when its shards are indexed tars, else None."""
    record = (manifest.source or {}).get("splits", {}).get(split)
    return record if isinstance(record, dict) and record.get("kind") == INDEX_KIND else None


def is_indexed(root: str, split: str, storage_cfg: StorageConfig | None = None) -> bool:
    return index_record(shards.read_manifest(root, storage_cfg), split) is not None


def index_uris(root: str, manifest: shards.Manifest, split: str) -> list[str]:
    """URIs of the split's index files, one per tar in manifest order."""
    record = index_record(manifest, split)
    listed = record.get("index", [])
    if len(listed) != len(manifest.splits[split].shards):
        raise StorageError(f"{storage.join(root, shards.MANIFEST)}: split '{split}' lists "
                           f"{len(manifest.splits[split].shards)} tars but {len(listed)} index files; "
                           "re-run `raytrain-speech prepare --layout webdataset --index-only`")
    return [storage.join(root, rel) for rel in listed]


def check_split(root: str, manifest: shards.Manifest, split: str, storage_cfg: StorageConfig | None = None
                ) -> tuple[list[str], list[shards.BadShard]]:
    """(index URIs of the usable tars, unusable tars): each tar must exist and its index must be a
    readable Parquet footer with the index columns and as many rows as the manifest counts."""
    info = manifest.splits[split]
    good, bad = [], []
    for entry, index_uri, n, first in zip(info.shards, index_uris(root, manifest, split), info.utterances,
                                          shards.first_indices(info)):
        tar_uri = shards.entry_uri(root, entry)
        reason = _tar_problem(tar_uri, storage_cfg) or _index_problem(index_uri, n, storage_cfg)
        if reason:
            bad.append(shards.BadShard(tar_uri, reason, first, n))
        else:
            good.append(index_uri)
    return good, bad


def _tar_problem(tar_uri: str, storage_cfg: StorageConfig | None) -> str:
    fs, path = storage.resolve(tar_uri, storage_cfg)
    try:
        found = fs.get_file_info(path).type == pafs.FileType.File
    except OSError as err:  # unreachable storage is not bad input: fail with the fix
        raise StorageError(storage.describe_error(tar_uri, err)) from None
    return "" if found else "tar listed in the manifest is missing"


def _index_problem(index_uri: str, n: int, storage_cfg: StorageConfig | None) -> str:
    fix = "re-run `raytrain-speech prepare --layout webdataset --index-only`"
    fs, path = storage.resolve(index_uri, storage_cfg)
    try:
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
    except FileNotFoundError:
        return f"its index {index_uri} is missing ({fix})"
    except pa.ArrowInvalid as err:
        return f"its index {index_uri} is not Parquet ({str(err).splitlines()[0]}; {fix})"
    except OSError as err:
        raise StorageError(storage.describe_error(index_uri, err)) from None
    names = meta.schema.to_arrow_schema().names
    missing = [c for c in INDEX_COLUMNS if c not in names and c not in ("language", "speaker")]
    if missing:
        return f"its index {index_uri} is missing columns {', '.join(missing)} ({fix})"
    if meta.num_rows != n:
        return f"its index {index_uri} has {meta.num_rows} rows, the manifest counts {n} ({fix})"
    return ""


# ---------------------------------------------------------------------------------------- reading


def read_index(index_uri: str, storage_cfg: StorageConfig | None = None,
               table: pa.Table | None = None) -> tuple[pa.Table, str]:
    """(index table, URI of its tar); ``table``: the index already read."""
    if table is None:
        try:
            table = pq.read_table(io.BytesIO(storage.read_bytes(index_uri, storage_cfg)))
        except pa.ArrowInvalid as err:
            raise StorageError(f"{index_uri}: not a readable index ({str(err).splitlines()[0]})") from None
    ref = (table.schema.metadata or {}).get(TAR_KEY)
    if ref is None:
        raise StorageError(f"{index_uri}: index names no tar; re-run `raytrain-speech prepare --index-only`")
    root = index_uri.rsplit("/", 2)[0]  # <root>/<split>/index-NNNNN.parquet
    return table, shards.entry_uri(root, ref.decode())


def is_index_table(table: pa.Table) -> bool:
    return TAR_KEY in (table.schema.metadata or {})


def iter_rows(index_uri: str, storage_cfg: StorageConfig | None = None, consumed: np.ndarray | None = None,
              table: pa.Table | None = None) -> Iterator[dict]:
    """Every index row of one tar (those not ``consumed``) with its audio bytes, streaming the tar once.

    Rows come in tar order; an indexed member the tar no longer has (or whose size changed, or that
    lies past a point where the tar stops being readable) comes last with ``audio`` b"" and the
    reason in ``read_error``. Once every wanted member was read the rest of the tar is not fetched.
    """
    table, tar_uri = read_index(index_uri, storage_cfg, table)
    wanted = {r["member"]: r for r in table.to_pylist() if consumed is None or not consumed[r["index"]]}
    fs, path = storage.resolve(tar_uri, storage_cfg)
    broken = ""
    try:
        with fs.open_input_stream(path, buffer_size=STREAM_BUFFER_BYTES) as f, \
                tarfile.open(fileobj=f, mode="r|*") as tf:
            for member in tf:
                if not wanted:
                    break
                row = wanted.pop(member.name, None) if member.isfile() else None
                if row is None:
                    continue
                if member.size != row["size_bytes"]:
                    yield _row(row, b"", f"{tar_uri}#{member.name}: {member.size} bytes, {row['size_bytes']} when "
                                         "indexed (the tar changed: re-run prepare --index-only)")
                else:
                    yield _row(row, tf.extractfile(member).read(), "")
    except tarfile.TarError as err:
        broken = f"{tar_uri}: tar unreadable before this member ({str(err).splitlines()[0]})"
    except OSError as err:  # storage, not bad input: let the task fail (and Ray retry it)
        raise StorageError(storage.describe_error(tar_uri, err)) from None
    for row in sorted(wanted.values(), key=lambda r: r["index"]):
        yield _row(row, b"", broken or f"{tar_uri}#{row['member']}: indexed member missing from the tar "
                                       "(the tar changed: re-run prepare --index-only)")


def _row(index_row: dict, audio: bytes, read_error: str) -> dict:
    return {"index": index_row["index"], "id": index_row["key"], "audio": audio,
            "sample_rate_hz": index_row["sample_rate_hz"], "duration_s": index_row["duration_s"],
            "text": index_row["text"], "language": index_row.get("language"),
            "speaker": index_row.get("speaker"), "read_error": read_error}


def read_batches(index_uri: str, storage_cfg: StorageConfig | None = None, consumed: np.ndarray | None = None,
                 rows_per_batch: int = 32) -> Iterator[pa.Table]:
    """One tar as tables of ``ROW_SCHEMA`` (the Ray Data read task's output)."""
    rows: list[dict] = []
    for row in iter_rows(index_uri, storage_cfg, consumed):
        rows.append(row)
        if len(rows) >= rows_per_batch:
            yield _row_table(rows)
            rows = []
    if rows:
        yield _row_table(rows)


def _row_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist([{k: r[k] for k in ROW_SCHEMA.names} for r in rows], schema=ROW_SCHEMA)


def read_table(index_uri: str, storage_cfg: StorageConfig | None = None, table: pa.Table | None = None) -> pa.Table:
    """One tar as an ordinary shard table (``shards.SCHEMA``), for the in-process readers; a missing
    member is a row with empty audio, which the Preprocessor rejects as bad input."""
    rows = [{k: r[k] for k in shards.SCHEMA.names} for r in iter_rows(index_uri, storage_cfg, table=table)]
    return shards.rows_to_table(rows)
