"""A split of a corpus root, whichever kind its shards are: Parquet shards (``shards.py``) or WebDataset
tars read in place through an index per tar (``tars.py``).

Readers that may be pointed at either kind call these: the shard (or index) URIs of a split, the
footer check that sets unreadable ones aside, every ``duration_s`` (for duration buckets), one shard
as an ordinary table, and ``read_batches``: the split's raw rows, one shard or tar at a time, without
Ray, as the columns the Ray Data chain (``pipeline.py``) reads, with the consumed indices left out.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raytrain_speech import storage
from raytrain_speech.config import StorageConfig
from raytrain_speech.data import shards, tars
from raytrain_speech.storage import StorageError

OPTIONAL_COLUMNS = ("language", "sample_rate_hz")
"""Columns a Parquet shard may lack; a row batch carries them only where the shard has them."""


def row_columns(available) -> list[str]:
    """The columns of a raw row batch from a Parquet shard with ``available`` columns: what the Ray Data
    chain reads (the Preprocessor's input columns, ``preprocess.input_columns``), i.e. a tar's
    ``tars.ROW_SCHEMA`` without ``read_error``. Spelled out here rather than imported so the format
    layer does not depend on preprocessing; tests/unit/test_corpus.py holds the two together."""
    names = set(available)
    return [c for c in tars.ROW_SCHEMA.names if c != "read_error" and (c not in OPTIONAL_COLUMNS or c in names)]


def shard_uris(root: str, split: str, cfg: StorageConfig | None = None) -> list[str]:
    """What readers open for each shard: the Parquet shard, or for an indexed WebDataset split the
    tar's index, which ``read_shard`` turns into the same table."""
    manifest = shards.read_manifest(root, cfg)
    info = shards.split_info(root, manifest, split)
    if tars.index_record(manifest, split) is not None:
        return tars.index_uris(root, manifest, split)
    return [shards.entry_uri(root, s) for s in info.shards]


def check_shards(root: str, split: str, cfg: StorageConfig | None = None
                 ) -> tuple[list[str], list[shards.BadShard]]:
    """(readable shard URIs, unreadable ones) of a split, from each shard's Parquet footer only.

    An indexed WebDataset split gives its index URIs, checked by ``tars.check_split`` (the tar must
    exist, its index must be readable and match the manifest's count).
    """
    manifest = shards.read_manifest(root, cfg)
    shards.split_info(root, manifest, split)
    if tars.index_record(manifest, split) is not None:
        return tars.check_split(root, manifest, split, cfg)
    return shards.check_split(root, manifest, split, cfg)


def readable_shards(root: str, split: str, cfg: StorageConfig | None = None
                    ) -> tuple[list[str], list[shards.BadShard]]:
    """``check_shards``, and an error naming the fix when no shard of the split can be read at all
    (the unreadable ones are otherwise skipped, and counted as bad input by the Trainer)."""
    good, bad = check_shards(root, split, cfg)
    if not good:
        raise StorageError(f"{root}: no readable shard in split '{split}' ({bad[0].uri}: {bad[0].reason}); "
                           "re-run `raytrain-speech prepare` or fix data.root")
    return good, bad


def read_durations(root: str, split: str, storage_cfg: StorageConfig | None = None,
                   uris: list[str] | None = None) -> np.ndarray:
    """Every utterance's ``duration_s`` in the split, in shard order (for duration-bucket edges); an
    index holds the same column as a shard. ``uris``: only these shards (the readable ones)."""
    return shards.read_duration_column(shard_uris(root, split, storage_cfg) if uris is None else uris,
                                       storage_cfg)


def read_shard(uri: str, cfg: StorageConfig | None = None) -> pa.Table:
    """Read one shard as a ``shards.SCHEMA`` table, checking it is Parquet with the required columns;
    a tar's index streams its tar into such a table (``tars.read_table``)."""
    table = shards.read_parquet(uri, cfg)
    if tars.is_index_table(table):  # an indexed WebDataset split: stream the tar it names
        return tars.read_table(uri, cfg, table)
    return shards.require_columns(uri, table)


def read_batches(root: str, split: str, storage_cfg: StorageConfig | None = None, uris: list[str] | None = None,
                 consumed: np.ndarray | None = None, rows_per_batch: int = 32) -> Iterator[dict]:
    """The split's raw rows as column batches (dicts of numpy arrays), shard by shard in ``uris`` order
    (default: every shard), at most ``rows_per_batch`` rows each; rows whose ``index`` is set in the
    ``consumed`` bitmap are left out before their audio is handed on.

    The columns are those the Ray Data chain reads, plus ``read_error`` (``tars.ROW_SCHEMA``; for
    Parquet shards ``language`` and ``sample_rate_hz`` only where the shards have them). Streams:
    one shard (row group by row group) or one tar is read at a time.
    """
    uris = shard_uris(root, split, storage_cfg) if uris is None else uris
    consumed = consumed if consumed is not None and consumed.any() else None
    if tars.is_indexed(root, split, storage_cfg):
        for uri in uris:
            for table in tars.read_batches(uri, storage_cfg, consumed, rows_per_batch):
                yield numpy_batch(table)
        return
    firsts = first_index_of(root, split, storage_cfg)
    for uri in uris:
        for table in parquet_row_tables(uri, firsts[uri], storage_cfg, consumed, rows_per_batch):
            yield numpy_batch(table)


def first_index_of(root: str, split: str, storage_cfg: StorageConfig | None = None) -> dict[str, int]:
    """Each Parquet shard URI of the split -> the index of its first utterance (manifest order)."""
    info = shards.split_info(root, shards.read_manifest(root, storage_cfg), split)
    return {shards.entry_uri(root, rel): first for rel, first in zip(info.shards, shards.first_indices(info))}


def parquet_row_tables(uri: str, first_index: int, storage_cfg: StorageConfig | None = None,
                       consumed: np.ndarray | None = None, rows_per_batch: int = 32, piece: int = 0,
                       pieces: int = 1) -> Iterator[pa.Table]:
    """Piece ``piece`` of ``pieces`` (contiguous row groups) of one Parquet shard as row tables: the
    input columns plus ``read_error``, the consumed rows left out. Both backends read through this
    (the Ray Data read task, and ``read_batches``), so neither trusts a shard more than the other.

    A shard is read row group by row group, and a row group that cannot be decoded (a corrupt page
    under a valid footer) costs only its own rows: they come out with no audio and a ``read_error``
    naming the shard, the row group and the index range, and the shard's other row groups train. A
    row whose ``index`` is not the one its position gives (``first_index`` + row number: shards hold
    consecutive indices) is a duplicate or out-of-range index; it keeps its position's index, so
    exactly-once accounting stays sound, and is bad input with that reason. Unreachable storage is
    not bad input: it raises StorageError.
    """
    fs, path = storage.resolve(uri, storage_cfg)
    try:
        f = fs.open_input_file(path)
        parquet = pq.ParquetFile(f)
    except pa.ArrowInvalid as err:
        raise StorageError(f"{uri}: not a readable Parquet shard ({str(err).splitlines()[0]})") from None
    except OSError as err:  # storage, not bad input
        raise StorageError(storage.describe_error(uri, err)) from None
    with f:
        meta = parquet.metadata
        columns = row_columns(parquet.schema_arrow.names)
        offsets = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
        lo, hi = (meta.num_row_groups * piece) // pieces, (meta.num_row_groups * (piece + 1)) // pieces
        for group in range(lo, hi):
            position = np.arange(offsets[group], offsets[group + 1]) + first_index
            if consumed is not None and consumed[position].all():
                continue  # a resumed epoch: nothing of this row group is left to read
            table = _row_group(parquet, f, uri, group, columns, position)
            if consumed is not None:
                table = table.filter(pa.array(~consumed[position]))
            for start in range(0, table.num_rows, rows_per_batch):
                yield table.slice(start, rows_per_batch)


def _row_group(parquet: pq.ParquetFile, f, uri: str, group: int, columns: list[str], position: np.ndarray
               ) -> pa.Table:
    """Row group ``group`` with ``read_error`` (and its index checked against ``position``)."""
    schema = pa.schema([tars.ROW_SCHEMA.field(c) for c in columns + ["read_error"]])
    try:
        table = parquet.read_row_group(group, columns=columns)
    except (pa.ArrowException, OSError) as err:
        _raise_if_unreachable(f, parquet, group, uri, err)
        n = len(position)
        reason = (f"{uri}: row group {group} (indices {int(position[0])}..{int(position[-1])}) cannot be decoded "
                  f"({str(err).splitlines()[0] if str(err) else type(err).__name__}); re-run prepare for this shard")
        filler = {"index": position, "id": [f"{uri}#{int(i)}" for i in position], "audio": [b""] * n,
                  "duration_s": np.zeros(n, np.float32), "text": [""] * n, "language": [None] * n,
                  "sample_rate_hz": np.zeros(n, np.int32), "read_error": [reason] * n}
        return pa.table({c: filler[c] for c in schema.names}, schema=schema)
    errors = [""] * table.num_rows
    index = table.column("index").to_numpy()
    misplaced = np.flatnonzero(index != position)
    if misplaced.size:
        for k in misplaced:
            errors[k] = (f"{uri}: row {int(k)} of row group {group} has index {int(index[k])} where its position "
                         f"gives {int(position[k])} (a duplicated or out-of-range index); re-run prepare")
        table = table.set_column(table.schema.get_field_index("index"), "index", pa.array(position, pa.int64()))
    return table.append_column("read_error", pa.array(errors, pa.string())).cast(schema)


def _raise_if_unreachable(f, parquet: pq.ParquetFile, group: int, uri: str, err: BaseException) -> None:
    """A row group that fails to decode is bad input only if its bytes can be read: read them raw
    (the column chunks' byte range); if that fails too, storage is the problem, not the shard."""
    rg = parquet.metadata.row_group(group)
    starts, ends = [], []
    for c in range(rg.num_columns):
        col = rg.column(c)
        start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
        starts.append(start)
        ends.append(start + col.total_compressed_size)
    try:
        f.read_at(max(ends) - min(starts), min(starts))
    except OSError as raw_err:
        raise StorageError(storage.describe_error(uri, raw_err)) from err


def numpy_batch(table: pa.Table) -> dict:
    """A table as Ray Data's ``batch_format="numpy"`` hands it on: a numpy array per column (strings
    and bytes as object arrays)."""
    return {name: table.column(name).to_numpy() for name in table.column_names}
