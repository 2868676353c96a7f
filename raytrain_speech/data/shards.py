"""The shard format: Parquet files of encoded utterances plus a JSON manifest (see docs/shards.md).

A corpus root holds ``manifest.json`` and ``<split>/shard-NNNNN.parquet``. The manifest lists each
split's shards with their utterance counts and hours so readers never need to list a bucket, and
gives every utterance a stable integer ``index`` (0..n-1 per split) that exactly-once accounting
keys on.

This module knows Parquet splits only; ``tars.py`` reads indexed WebDataset splits and ``corpus.py``
dispatches between the two for readers that may see either.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raytrain_speech import storage
from raytrain_speech.config import ConfigError, StorageConfig
from raytrain_speech.storage import StorageError

FORMAT = "raytrain-speech-shards/1"
MANIFEST = "manifest.json"

SCHEMA = pa.schema([
    pa.field("index", pa.int64(), nullable=False),
    pa.field("id", pa.string(), nullable=False),
    pa.field("audio", pa.binary(), nullable=False),
    pa.field("sample_rate_hz", pa.int32(), nullable=False),
    pa.field("duration_s", pa.float32(), nullable=False),
    pa.field("text", pa.string(), nullable=False),
    pa.field("language", pa.string()),
    pa.field("speaker", pa.string()),
])
REQUIRED_COLUMNS = ("index", "id", "audio", "sample_rate_hz", "duration_s", "text")
PHONEMES = pa.field("phonemes", pa.string())
"""Optional column after ``SCHEMA``'s: phone symbols separated by whitespace, the phoneme probe's labels
(``prepare`` copies them from a manifest). Shards written without it are exactly as before it existed."""


@dataclass
class SplitInfo:
    shards: list[str] = field(default_factory=list)
    utterances: list[int] = field(default_factory=list)
    hours: float = 0.0

    @property
    def num_utterances(self) -> int:
        return sum(self.utterances)


@dataclass
class Manifest:
    splits: dict[str, SplitInfo] = field(default_factory=dict)
    source: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({
            "format": FORMAT,
            "splits": {k: {"shards": v.shards, "utterances": v.utterances, "hours": round(v.hours, 4)}
                       for k, v in self.splits.items()},
            "source": self.source,
        }, indent=2)

    @classmethod
    def from_json(cls, text: str, where: str) -> Manifest:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise StorageError(f"{where}: not a valid manifest ({err})") from None
        if raw.get("format") != FORMAT:
            raise StorageError(f"{where}: manifest format {raw.get('format')!r}, expected {FORMAT!r}")
        splits = {k: SplitInfo(v["shards"], v["utterances"], v["hours"]) for k, v in raw["splits"].items()}
        return cls(splits=splits, source=raw.get("source", {}))


def rows_to_table(rows: list[dict], phonemes: bool = False) -> pa.Table:
    """``rows`` as a ``SCHEMA`` table, with the optional ``phonemes`` column when asked."""
    return pa.Table.from_pylist(rows, schema=SCHEMA.append(PHONEMES) if phonemes else SCHEMA)


def shard_name(split: str, number: int) -> str:
    return f"{split}/shard-{number:05d}.parquet"


def write_shard(root: str, relpath: str, table: pa.Table, cfg: StorageConfig | None = None) -> None:
    """Write one shard; audio is already FLAC so only the small columns get compressed."""
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=128, compression={"audio": "none"},
                   use_dictionary=["language", "speaker"])
    storage.write_bytes(storage.join(root, relpath), buf.getvalue(), cfg)


def write_manifest(root: str, manifest: Manifest, cfg: StorageConfig | None = None) -> None:
    storage.write_bytes(storage.join(root, MANIFEST), manifest.to_json().encode(), cfg)


def read_manifest(root: str, cfg: StorageConfig | None = None) -> Manifest:
    uri = storage.join(root, MANIFEST)
    if not storage.exists(uri, cfg):
        raise StorageError(f"{uri} not found: no shard corpus at {root} "
                           f"(run `raytrain-speech synth --out {root}` or fix data.root)")
    return Manifest.from_json(storage.read_bytes(uri, cfg).decode(), uri)


def absolute(uri: str) -> str:
    """A local path made absolute on the driver (Ray tasks run in another working directory); URIs as
    they are."""
    if uri.startswith("file://"):
        return os.path.abspath(uri[len("file://"):])
    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


def entry_uri(root: str, entry: str) -> str:
    """A manifest's shard entry as a URI: relative to the root, or absolute (tars read in place)."""
    return entry if "://" in entry or entry.startswith("/") else storage.join(root, entry)


def split_info(root: str, manifest: Manifest, split: str) -> SplitInfo:
    """The manifest's entry for ``split``, or an error naming the splits there are."""
    if split not in manifest.splits:
        raise StorageError(f"{root}: no split '{split}' (have: {', '.join(sorted(manifest.splits))})")
    return manifest.splits[split]


def shard_uris(root: str, split: str, cfg: StorageConfig | None = None) -> list[str]:
    """URIs of a Parquet split's shards, in manifest order (``corpus.shard_uris`` also knows indexed
    WebDataset splits, whose readers open an index per tar instead)."""
    manifest = read_manifest(root, cfg)
    return [entry_uri(root, s) for s in split_info(root, manifest, split).shards]


def read_parquet(uri: str, cfg: StorageConfig | None = None) -> pa.Table:
    """One Parquet file read whole, as a table; anything else is a StorageError naming the file."""
    data = storage.read_bytes(uri, cfg)
    try:
        return pq.read_table(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as err:
        raise StorageError(f"{uri}: not a readable Parquet shard ({str(err).splitlines()[0]})") from None


def require_columns(uri: str, table: pa.Table) -> pa.Table:
    """``table`` (read from shard ``uri``) if it has every required column."""
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise StorageError(f"{uri}: shard is missing columns {', '.join(missing)}")
    return table


def read_shard(uri: str, cfg: StorageConfig | None = None) -> pa.Table:
    """Read one Parquet shard, checking it is Parquet with the required columns."""
    return require_columns(uri, read_parquet(uri, cfg))


def read_durations(root: str, split: str, storage_cfg: StorageConfig | None = None,
                   uris: list[str] | None = None) -> np.ndarray:
    """Every utterance's ``duration_s`` in a Parquet split, in shard order (for duration-bucket edges);
    ``uris``: only these shards (the readable ones)."""
    return read_duration_column(shard_uris(root, split, storage_cfg) if uris is None else uris, storage_cfg)


def read_duration_column(uris: list[str], storage_cfg: StorageConfig | None = None) -> np.ndarray:
    """The ``duration_s`` column of each file (a shard, or a tar's index), concatenated in order."""
    parts = [read_column(uri, "duration_s", storage_cfg).to_numpy().astype(np.float64) for uri in uris]
    return np.concatenate(parts) if parts else np.zeros(0, np.float64)


def read_column(uri: str, column: str, storage_cfg: StorageConfig | None = None) -> pa.ChunkedArray:
    """One column of a file (a shard, or a tar's index), never its audio.

    Through a random-access file, Parquet fetches the footer and the one column chunk per row group,
    so on object storage these are small range reads rather than whole shards of audio.
    """
    fs, path = storage.resolve(uri, storage_cfg)
    try:
        with fs.open_input_file(path) as f:
            return pq.read_table(f, columns=[column]).column(column)
    except (pa.ArrowInvalid, OSError, KeyError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise StorageError(f"{uri}: cannot read the {column} column of this shard ({reason})") from None


@dataclass
class BadShard:
    """A listed shard that cannot be read; its utterances are skipped and counted as bad input."""

    uri: str
    reason: str
    first_index: int
    utterances: int


def first_indices(info: SplitInfo) -> list[int]:
    """Index of each shard's first utterance: shards hold consecutive indices in manifest order
    (``synth`` and ``prepare`` both write them so), which is how an unreadable shard's utterances are
    still accounted for."""
    out, total = [], 0
    for n in info.utterances:
        out.append(total)
        total += n
    return out


def check_shards(root: str, split: str, cfg: StorageConfig | None = None) -> tuple[list[str], list[BadShard]]:
    """(readable shard URIs, unreadable ones) of a Parquet split, from each shard's Parquet footer only
    (``corpus.check_shards`` also checks indexed WebDataset splits)."""
    return check_split(root, read_manifest(root, cfg), split, cfg)


def check_split(root: str, manifest: Manifest, split: str, cfg: StorageConfig | None = None
                ) -> tuple[list[str], list[BadShard]]:
    """(readable shard URIs, unreadable ones) of a Parquet split of ``manifest``.

    A file that is not Parquet, or lacks a required column, would otherwise fail inside Ray Data's
    read and take the run down with it (or, retried, forever); here it becomes one counted skip.
    """
    info = split_info(root, manifest, split)
    good, bad = [], []
    for rel, n, first in zip(info.shards, info.utterances, first_indices(info)):
        uri = entry_uri(root, rel)
        reason = _footer_problem(uri, cfg, n)
        if reason:
            bad.append(BadShard(uri, reason, first, n))
        else:
            good.append(uri)
    return good, bad


def _footer_problem(uri: str, cfg: StorageConfig | None, utterances: int | None = None) -> str:
    """Why shard ``uri`` cannot be read ("" = it can), from its footer: not Parquet, a required
    column missing, or a row count other than the manifest's ``utterances`` (its indices would then
    run into the next shard's)."""
    fs, path = storage.resolve(uri, cfg)
    try:
        with fs.open_input_file(path) as f:
            parquet = pq.ParquetFile(f)
            names, rows = parquet.schema_arrow.names, parquet.metadata.num_rows
    except FileNotFoundError:
        return "shard listed in the manifest is missing"
    except pa.ArrowInvalid as err:
        return f"not a Parquet shard ({str(err).splitlines()[0]})"
    except OSError as err:  # unreachable storage is not bad input: fail with the fix
        raise StorageError(storage.describe_error(uri, err)) from None
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        return f"shard is missing columns {', '.join(missing)}"
    if utterances is not None and rows != utterances:
        return f"shard holds {rows} rows but the manifest lists {utterances} (re-run prepare)"
    return ""


def existing_corpus(root: str, source: dict, cfg: StorageConfig | None = None, ignore: tuple[str, ...] = (),
                    command: str = "synth") -> Manifest | None:
    """The finished corpus at ``root`` when its manifest records this ``source`` (None: no corpus there).
    Any other corpus there is refused with one line naming what differs: a writer never overwrites a
    corpus it did not make. Config keys in ``ignore`` do not count."""
    if not storage.exists(storage.join(root, MANIFEST), cfg):
        return None
    manifest = read_manifest(root, cfg)

    def settings(src: dict) -> dict:
        return {k: v for k, v in src.get("config", {}).items() if k not in ignore}

    theirs, ours = manifest.source, source
    if theirs.get("kind") == ours.get("kind") and settings(theirs) == settings(ours):
        return manifest
    if theirs.get("kind") != ours.get("kind"):
        what = f"a corpus made by {theirs.get('kind') or 'another tool'}"
    else:
        old = settings(theirs)
        what = "a corpus of other settings (" + ", ".join(
            f"{k} {old.get(k)!r} -> {v!r}" for k, v in settings(ours).items() if old.get(k) != v)[:300] + ")"
    raise ConfigError(f"{root} already holds {what}; {command} never overwrites a corpus: write to another "
                      "--out (or data.root), or delete it first")
