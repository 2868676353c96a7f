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

OPTIONAL_COLUMNS = ("language",)
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

    The columns are those the Ray Data chain reads: for Parquet shards the Preprocessor's input
    columns (``language`` where the shards have it), for an indexed tar ``tars.ROW_SCHEMA`` (with
    ``read_error``). Streams: one shard (row group by row group) or one tar is read at a time.
    """
    uris = shard_uris(root, split, storage_cfg) if uris is None else uris
    consumed = consumed if consumed is not None and consumed.any() else None
    if tars.is_indexed(root, split, storage_cfg):
        for uri in uris:
            for table in tars.read_batches(uri, storage_cfg, consumed, rows_per_batch):
                yield _numpy(table)
        return
    for uri in uris:
        yield from _parquet_batches(uri, storage_cfg, consumed, rows_per_batch)


def _parquet_batches(uri: str, storage_cfg: StorageConfig | None, consumed: np.ndarray | None,
                     rows_per_batch: int) -> Iterator[dict]:
    """One Parquet shard's input columns, row group by row group through a random-access file."""
    fs, path = storage.resolve(uri, storage_cfg)
    try:
        with fs.open_input_file(path) as f:
            parquet = pq.ParquetFile(f)
            columns = row_columns(parquet.schema_arrow.names)
            for batch in parquet.iter_batches(batch_size=rows_per_batch, columns=columns):
                if consumed is not None:
                    batch = batch.filter(pa.array(~consumed[batch.column("index").to_numpy()]))
                if batch.num_rows:
                    yield _numpy(pa.Table.from_batches([batch]))
    except pa.ArrowInvalid as err:
        raise StorageError(f"{uri}: not a readable Parquet shard ({str(err).splitlines()[0]})") from None
    except OSError as err:  # storage, not bad input
        raise StorageError(storage.describe_error(uri, err)) from None


def _numpy(table: pa.Table) -> dict:
    """A table as Ray Data's ``batch_format="numpy"`` hands it on: a numpy array per column (strings
    and bytes as object arrays)."""
    return {name: table.column(name).to_numpy() for name in table.column_names}
