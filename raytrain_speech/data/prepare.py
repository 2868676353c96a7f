"""``raytrain-speech prepare``: an existing corpus -> our shards (docs/shards.md), so real speech
trains through exactly the pipeline the synthesized corpus does.

Three input layouts: a transcript manifest (TSV or JSONL) beside audio files, LibriSpeech
(``<speaker>/<chapter>/<speaker>-<chapter>.trans.txt``), and WebDataset tar shards.

Why it is built this way:

- Audio bytes are copied as they are (FLAC/WAV/OGG); the pipeline decodes and resamples at read
  time. ``sample_rate_hz`` and ``duration_s`` come from the file header (``soundfile.info``), so
  preparing never decodes audio and is bound by I/O, not CPU.
- Exactly-once accounting keys on a stable index per utterance, so the index must not depend on the
  order files were listed in, or on which task finished first: utterances are sorted by id, bad
  ones are dropped *before* numbering, and indices 0..n-1 follow the sorted order. That needs every
  header read before the first shard is cut, hence two parallel phases with a plan between them::

      survey (headers only: a task per batch of files, or per tar) -> plan (driver: drop bad
      inputs, sort, number, cut shards by bytes/count) -> write (one Ray task per shard, copying
      bytes) -> manifest (last, merged with the splits already there)

- Resumable: the plan has a fingerprint, and ``<root>/<split>/.prepare-state.json`` records it and
  every finished shard. Re-running the same command writes only the shards still missing; a run
  whose input or settings changed is refused instead of mixing two plans in one split.
- A bad file in a corpus of 100k is not worth stopping for: missing, empty or unreadable audio and
  empty or non-UTF-8 transcripts are skipped and listed with id and reason in
  ``<root>/<split>/prepare_skipped.jsonl``. Storage that cannot be reached still stops the run.

Ray is imported only in ``_executor`` (lazily): the survey, plan and writers are plain functions,
and ``workers=0`` runs them all in this process.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import logging
import os
import posixpath
import tarfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Literal

import pyarrow.fs as pafs
import soundfile as sf

from raytrain_speech import storage
from raytrain_speech.config import ConfigError, StorageConfig, require, to_dict
from raytrain_speech.data import shards
from raytrain_speech.storage import StorageError

AUDIO_EXTENSIONS = ("flac", "wav", "ogg")
"""Audio the pipeline decodes, in order of preference when one utterance has several."""
STATE_FILE = ".prepare-state.json"
SKIPPED_FILE = "prepare_skipped.jsonl"
IO_THREADS = 8
"""Concurrent reads inside one task: an object store answers each request in tens of milliseconds,
so a task keeps several in flight to be bound by bandwidth rather than latency."""
PROBE_BATCH = 256
"""Files whose headers one survey task reads: few enough that a corpus spreads over every worker."""
LAYOUT_HINTS = {
    "manifest": "a .tsv (path<TAB>text, optional header row) or .jsonl (path/audio_filepath + text) "
                "manifest, or a directory holding exactly one",
    "librispeech": "a LibriSpeech root holding <speaker>/<chapter>/<speaker>-<chapter>.trans.txt beside "
                   "<utt-id>.flac files",
    "webdataset": "a .tar file, a directory of .tar files or a glob like shards/train-*.tar, whose members "
                  "are <key>.flac/.wav/.ogg with <key>.txt or <key>.json",
}


@dataclass
class PrepareConfig:
    """What to convert and how to cut it into shards (``raytrain-speech prepare``)."""

    layout: Literal["manifest", "librispeech", "webdataset"] = "manifest"
    """Input layout: manifest (TSV/JSONL of audio path + text), librispeech, or webdataset (tar shards)."""
    input: str = ""
    """The manifest file (or a directory with exactly one .tsv/.jsonl), the LibriSpeech root, or a
    .tar file / directory of .tar files / glob of them; local or s3://."""
    split: str = "train"
    """Split to write (<out>/<split>/shard-NNNNN.parquet); other splits already in the manifest are kept."""
    shard_target_mb: float = 128.0
    """Start a new shard before its audio passes this many MiB: large enough that a corpus is hundreds
    of objects, not millions; small enough that a writer task holds ~3x this in memory and Ray Data
    still gets a shard per reader."""
    shard_utterances: int | None = None
    """Also start a new shard after this many utterances (None = the size target alone decides)."""
    language: str = "en"
    """Language code of utterances whose input gives none."""
    min_duration_s: float | None = None
    """Leave out (and list in prepare_skipped.jsonl) utterances shorter than this; None = keep all."""
    max_duration_s: float | None = None
    """Leave out (and list) utterances longer than this, e.g. ones no batch could hold; None = keep all."""
    workers: int | None = None
    """Ray tasks in flight (and CPUs of a local Ray started for them); None = one per CPU; 0 = no Ray,
    everything in this process."""
    index_only: bool = False
    """webdataset only: write an index over the tars (data/wds.py) instead of copying their audio into
    Parquet shards; training then streams the tars where they are."""

    def validate(self) -> None:
        require(bool(self.input), "prepare.input", f"is required: {LAYOUT_HINTS.get(self.layout, 'the corpus')}")
        require(bool(self.split) and "/" not in self.split, "prepare.split", "must be a non-empty name without '/'")
        require(self.shard_target_mb > 0, "prepare.shard_target_mb", "must be positive")
        require(self.shard_utterances is None or self.shard_utterances >= 1, "prepare.shard_utterances",
                "must be >= 1 (or None)")
        for key in ("min_duration_s", "max_duration_s"):
            value = getattr(self, key)
            require(value is None or value >= 0, f"prepare.{key}", "must be >= 0 (or None)")
        require(self.min_duration_s is None or self.max_duration_s is None
                or self.min_duration_s <= self.max_duration_s, "prepare.min_duration_s", "must be <= max_duration_s")
        require(self.workers is None or self.workers >= 0, "prepare.workers", "must be >= 0 (0 = no Ray)")
        require(not self.index_only or self.layout == "webdataset", "prepare.index_only",
                "works only with layout webdataset (other layouts have no shards to read in place)")


@dataclass
class Utterance:
    """One utterance found in the input; the audio fields are filled in by the survey."""

    id: str
    text: str
    audio_uri: str
    """The audio file, or the tar that holds it (webdataset)."""
    speaker: str | None = None
    language: str | None = None
    member: str | None = None
    """Name of the audio member inside ``audio_uri`` (webdataset), else None."""
    member_offset: int | None = None
    """Byte offset of that member's data in the tar, so a writer reads it with one ranged read."""
    size_bytes: int = 0
    sample_rate_hz: int = 0
    duration_s: float = 0.0
    problem: str = ""
    """Why the audio is unusable ("" = fine); set by the survey, turned into a skip by the plan."""

    @property
    def source(self) -> str:
        return f"{self.audio_uri}#{self.member}" if self.member else self.audio_uri


@dataclass
class Skip:
    """An input left out of the shards, as listed in prepare_skipped.jsonl."""

    id: str | None
    source: str
    reason: str
    filtered: bool = False
    """True for a usable utterance left out by the duration limits (counted apart from bad inputs)."""


@dataclass
class ShardJob:
    """One output shard: its path and utterances, which get indices first_index, first_index+1, ..."""

    relpath: str
    first_index: int
    utterances: list[Utterance]


@dataclass
class Plan:
    shards: list[ShardJob]
    skipped: list[Skip]
    fingerprint: str
    """sha256 over every row's shard, id, audio source and size, header values and labels."""


@dataclass
class PrepareOutcome:
    manifest: shards.Manifest
    split: str
    skipped: int
    """Bad inputs left out (listed in ``skipped_uri``)."""
    filtered: int
    """Good utterances left out by min/max_duration_s (also listed)."""
    shards_written: int
    shards_reused: int
    """Shards an earlier run of the same plan had already written (not rewritten)."""
    skipped_uri: str
    wall_s: float


# ---------------------------------------------------------------------------------------- reading


class _Files:
    """Filesystems by scheme, built once per task: building an S3 client costs milliseconds, which is
    too much to pay per file of a corpus."""

    def __init__(self, storage_cfg: StorageConfig | None):
        self.storage_cfg = storage_cfg
        self._fs: dict[str, pafs.FileSystem] = {}

    def resolve(self, uri: str) -> tuple[pafs.FileSystem, str]:
        key = uri.split("://", 1)[0] if storage.is_remote(uri) else "local"
        if key not in self._fs:
            self._fs[key] = storage.resolve(uri, self.storage_cfg)[0]
        path = uri.split("://", 1)[1].rstrip("/") if key != "local" else _absolute(uri)  # as storage.resolve
        return self._fs[key], path


def _absolute(uri: str) -> str:
    """Local paths made absolute on the driver: Ray tasks run in another working directory."""
    if uri.startswith("file://"):
        return os.path.abspath(uri[len("file://"):])
    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


def _kind(uri: str, storage_cfg: StorageConfig | None) -> pafs.FileType:
    fs, path = storage.resolve(uri, storage_cfg)
    try:
        return fs.get_file_info(path).type
    except OSError as err:
        raise StorageError(f"{uri}: {str(err).splitlines()[0]} (check the path, endpoint_url and credentials)") from None


def _list_files(uri: str, storage_cfg: StorageConfig | None, recursive: bool) -> list[str]:
    """URIs of the files under directory ``uri`` (one listing request, not one per file)."""
    fs, path = storage.resolve(uri, storage_cfg)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive))
    except OSError as err:
        raise StorageError(f"{uri}: cannot list ({str(err).splitlines()[0]})") from None
    scheme = uri.split("://", 1)[0] + "://" if storage.is_remote(uri) else ""
    return sorted(scheme + i.path for i in infos if i.type == pafs.FileType.File)


def _lines(data: bytes) -> list[tuple[int, bytes]]:
    """(1-based line number, line) pairs; decoding is left to the caller, line by line, so that one
    bad byte costs one utterance rather than the whole transcript file."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    return [(n, line.rstrip(b"\r")) for n, line in enumerate(data.split(b"\n"), start=1)]


def _clean_text(raw) -> tuple[str | None, str]:
    """(text, "") or (None, why the transcript is unusable)."""
    if raw is None:
        return None, "no transcript"
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None, "transcript is not UTF-8"
    if not isinstance(raw, str):
        return None, f"transcript is not text ({type(raw).__name__})"
    text = raw.strip()
    return (text, "") if text else (None, "empty transcript")


def _label(value) -> str | None:
    """An id/path/speaker/language cell as text; a bad byte there only garbles a label, so it is replaced."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return str(value).strip()


def _probe_header(f) -> tuple[int, float, str]:
    """(sample_rate_hz, duration_s, problem) from the audio header only; never decodes the samples."""
    try:
        info = sf.info(f)
    except (sf.SoundFileError, RuntimeError, TypeError, ValueError) as err:
        reason = str(err).splitlines()[0].rsplit(": ", 1)[-1] if str(err) else type(err).__name__
        return 0, 0.0, f"unreadable audio ({reason})"
    if info.frames <= 0 or info.samplerate <= 0:
        return 0, 0.0, "audio has no samples"
    return int(info.samplerate), info.frames / info.samplerate, ""


class _BlockReader(io.RawIOBase):
    """A remote file read through cached 64 KiB blocks: libsndfile parses a header in many small reads
    (a dozen for WAV), each of which would otherwise be a request to the object store."""

    BLOCK = 64 * 1024

    def __init__(self, f):
        self.f, self.size, self.pos, self.blocks = f, f.size(), 0, {}

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: offset, 1: self.pos + offset, 2: self.size + offset}[whence]
        return self.pos

    def readinto(self, buf) -> int:
        n = max(0, min(len(buf), self.size - self.pos))
        out = bytearray()
        while len(out) < n:
            block, skip = divmod(self.pos + len(out), self.BLOCK)
            if block not in self.blocks:
                self.blocks[block] = self.f.read_at(self.BLOCK, block * self.BLOCK)
            piece = self.blocks[block][skip: skip + n - len(out)]
            if not piece:  # shorter than its listed size: end of file
                break
            out += piece
        n = len(out)
        buf[:n] = out
        self.pos += n
        return n


# ---------------------------------------------------------------------------------------- layouts


def _find_manifest(uri: str, storage_cfg: StorageConfig | None) -> str:
    if _kind(uri, storage_cfg) != pafs.FileType.Directory:
        return uri
    found = [u for u in _list_files(uri, storage_cfg, recursive=False) if u.endswith((".tsv", ".jsonl"))]
    if len(found) != 1:
        what = f"{len(found)} manifests ({', '.join(posixpath.basename(u) for u in found)})" if found else "no .tsv or .jsonl"
        raise ConfigError(f"{uri}: {what} in this directory; pass the manifest file itself as --input")
    return found[0]


def _tsv_records(lines: list[tuple[int, bytes]]) -> Iterator[tuple[int, dict | None, str]]:
    """A header row (``path<TAB>text[<TAB>speaker<TAB>language]``, any order, optional ``id``) names the
    columns; without one every line is ``path<TAB>text``."""
    names = None
    for n, raw in lines:
        if not raw.strip():
            continue
        cells = raw.split(b"\t")
        if names is None:
            first = [c.decode("utf-8", "replace").strip().lower() for c in cells]
            if "text" in first and ("path" in first or "audio_filepath" in first):
                names = first
                continue
            names = ["path", "text"]
        if names == ["path", "text"]:
            cells = raw.split(b"\t", 1)
        yield n, dict(zip(names, cells)), ""


def _jsonl_records(lines: list[tuple[int, bytes]]) -> Iterator[tuple[int, dict | None, str]]:
    for n, raw in lines:
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            yield n, None, "line is not UTF-8"
            continue
        except json.JSONDecodeError as err:
            yield n, None, f"not valid JSON ({err.msg})"
            continue
        yield (n, record, "") if isinstance(record, dict) else (n, None, "not a JSON object")


def _id_from_path(path: str) -> str:
    """``clips/a.flac`` -> ``clips/a``: unique as long as paths are, and readable in logs."""
    stem, ext = posixpath.splitext(posixpath.normpath(path))
    return stem if ext else path


def scan_manifest(uri: str, language: str, storage_cfg: StorageConfig | None = None
                  ) -> tuple[list[Utterance], list[Skip]]:
    """A TSV or JSONL transcript manifest -> utterances (audio not read yet) and unusable lines.
    Audio paths are relative to the manifest's directory (absolute paths and URIs are kept)."""
    manifest_uri = _find_manifest(uri, storage_cfg)
    base = posixpath.dirname(manifest_uri)
    lines = _lines(storage.read_bytes(manifest_uri, storage_cfg))
    first = next((line for _, line in lines if line.strip()), b"")
    records = _jsonl_records(lines) if first.lstrip().startswith(b"{") else _tsv_records(lines)
    found, skipped = [], []
    for n, record, problem in records:
        where = f"{manifest_uri}:{n}"
        if record is None:
            skipped.append(Skip(None, where, problem))
            continue
        path = _label(record.get("path")) or _label(record.get("audio_filepath"))
        uid = _label(record.get("id")) or (_id_from_path(path) if path else None)
        text, problem = _clean_text(record.get("text"))
        if path is None:
            skipped.append(Skip(uid, where, "no audio path"))
        elif text is None:
            skipped.append(Skip(uid, where, problem))
        else:
            audio_uri = path if "://" in path else storage.join(base, path)
            found.append(Utterance(uid, text, audio_uri, speaker=_label(record.get("speaker")),
                                   language=_label(record.get("language")) or language))
    return found, skipped


def scan_librispeech(root: str, language: str, storage_cfg: StorageConfig | None = None
                     ) -> tuple[list[Utterance], list[Skip]]:
    """``<root>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt`` lines ``<utt-id> <TRANSCRIPT>``
    beside ``<utt-id>.flac``. One recursive listing finds every file, so a missing audio file is
    known without a request per utterance."""
    files = _list_files(root, storage_cfg, recursive=True)
    audio: dict[tuple[str, str], str] = {}
    for uri in files:
        stem, _, ext = posixpath.basename(uri).rpartition(".")
        if ext.lower() in AUDIO_EXTENSIONS:
            key = (posixpath.dirname(uri), stem)
            if key not in audio or _preference(uri) < _preference(audio[key]):
                audio[key] = uri
    found, skipped = [], []
    for trans in (u for u in files if u.endswith(".trans.txt")):
        chapter_dir = posixpath.dirname(trans)
        speaker = posixpath.basename(posixpath.dirname(chapter_dir))
        for n, raw in _lines(storage.read_bytes(trans, storage_cfg)):
            if not raw.strip():
                continue
            parts = raw.strip().split(None, 1)
            uid = parts[0].decode("utf-8", "replace")
            text, problem = _clean_text(parts[1] if len(parts) > 1 else b"")
            audio_uri = audio.get((chapter_dir, uid))
            if text is None:
                skipped.append(Skip(uid, f"{trans}:{n}", problem))
            elif audio_uri is None:
                skipped.append(Skip(uid, posixpath.join(chapter_dir, f"{uid}.flac"), "audio file missing"))
            else:
                found.append(Utterance(uid, text, audio_uri, speaker=speaker, language=language))
    return found, skipped


def _preference(name: str) -> int:
    ext = name.rsplit(".", 1)[-1].lower()
    return AUDIO_EXTENSIONS.index(ext) if ext in AUDIO_EXTENSIONS else len(AUDIO_EXTENSIONS)


def find_tars(spec: str, storage_cfg: StorageConfig | None = None) -> list[str]:
    """A .tar file, a directory searched recursively for .tar files, or a glob in the file-name part."""
    if any(c in spec for c in "*?["):
        parent, pattern = posixpath.split(spec)
        if any(c in parent for c in "*?["):
            raise ConfigError(f"prepare.input={spec}: wildcards only work in the file-name part of the path")
        _require_input(parent, "webdataset", storage_cfg)
        tars = [u for u in _list_files(parent, storage_cfg, recursive=False)
                if fnmatch.fnmatchcase(posixpath.basename(u), pattern)]
    else:
        _require_input(spec, "webdataset", storage_cfg)
        if _kind(spec, storage_cfg) == pafs.FileType.Directory:
            tars = [u for u in _list_files(spec, storage_cfg, recursive=True) if u.endswith(".tar")]
        else:
            tars = [spec]
    if not tars:
        raise ConfigError(f"{spec}: no .tar files found (--input must be {LAYOUT_HINTS['webdataset']})")
    return tars


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the path up to the first '.' of the file name; the rest is the field."""
    directory, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.normpath(posixpath.join(directory, stem)), ext.lower()  # "./k" (tar c .) -> "k"


def survey_tar(job: tuple) -> tuple[list[Utterance], list[Skip]]:
    """One tar -> its utterances with audio headers read, and its unusable keys.

    A local tar is opened for random access, so only headers are read; a remote one is streamed
    once from start to end (one request rather than two per member)."""
    tar_uri, language, storage_cfg = job
    remote = storage.is_remote(tar_uri)
    groups: dict[str, dict] = {}
    try:
        if remote:
            fs, path = storage.resolve(tar_uri, storage_cfg)
            opened = fs.open_input_stream(path, buffer_size=8 * 2**20)  # else one request per 10 kB read
        else:
            opened = open(_absolute(tar_uri), "rb")
        with opened as f, tarfile.open(fileobj=f, mode="r|" if remote else "r:") as tf:
            for member in tf:
                if member.isfile():
                    _add_member(groups, tf, member, seekable=not remote)
    except tarfile.TarError as err:
        raise StorageError(f"{tar_uri}: not a readable tar ({str(err).splitlines()[0]}); "
                           "repair it or leave it out of --input") from None
    except OSError as err:
        raise StorageError(f"{tar_uri}: {str(err).splitlines()[0]} (check the path, endpoint_url and "
                           "credentials, then re-run)") from None
    found, skipped = [], []
    for key in sorted(groups):
        utt, skip = _group_to_utterance(tar_uri, key, groups[key], language)
        if utt is not None:
            found.append(utt)
        elif skip is not None:
            skipped.append(skip)
    return found, skipped


def _add_member(groups: dict, tf: tarfile.TarFile, member: tarfile.TarInfo, seekable: bool) -> None:
    key, ext = _split_key(member.name)
    group = groups.setdefault(key, {})
    if ext in AUDIO_EXTENSIONS:
        if "audio" in group and _preference(group["audio"][0]) <= _preference(member.name):
            return
        if member.size == 0:
            probe = (0, 0.0, "zero-length audio")
        else:
            f = tf.extractfile(member)
            probe = _probe_header(f if seekable else io.BytesIO(f.read()))
        group["audio"] = (member.name, member.offset_data, member.size, probe)
    elif ext in ("txt", "json"):
        group[ext] = tf.extractfile(member).read()


def _group_to_utterance(tar_uri: str, key: str, group: dict, language: str
                        ) -> tuple[Utterance | None, Skip | None]:
    meta, meta_problem = {}, ""
    if "json" in group:
        try:
            meta = json.loads(group["json"].decode("utf-8"))
            meta = meta if isinstance(meta, dict) else {}
        except (UnicodeDecodeError, json.JSONDecodeError):
            meta_problem = f"{key}.json is not valid UTF-8 JSON"
    if "audio" not in group:
        if "txt" in group or "json" in group:
            return None, Skip(key, f"{tar_uri}#{key}", "no audio member (.flac/.wav/.ogg)")
        return None, None  # a key of other fields only is not an utterance
    name, offset, size, (rate_hz, duration_s, problem) = group["audio"]
    if "txt" in group:
        text, text_problem = _clean_text(group["txt"])
    elif meta_problem:
        text, text_problem = None, meta_problem
    else:
        text, text_problem = _clean_text(meta.get("text"))
    if text is None:
        return None, Skip(key, f"{tar_uri}#{name}", text_problem)
    return Utterance(key, text, tar_uri, speaker=_label(meta.get("speaker")),
                     language=_label(meta.get("language")) or language, member=name, member_offset=offset,
                     size_bytes=size, sample_rate_hz=rate_hz, duration_s=duration_s, problem=problem), None


def probe_files(job: tuple) -> list[Utterance]:
    """Survey task for file layouts: size and header of each utterance's audio file."""
    utterances, storage_cfg = job
    files = _Files(storage_cfg)
    with ThreadPoolExecutor(IO_THREADS) as pool:
        return list(pool.map(lambda u: _probe_file(u, files), utterances))


def _probe_file(u: Utterance, files: _Files) -> Utterance:
    fs, path = files.resolve(u.audio_uri)
    try:
        with fs.open_input_file(path) as f:
            size = f.size()
            if size == 0:
                return replace(u, problem="zero-length audio file")
            rate_hz, duration_s, problem = _probe_header(_BlockReader(f) if storage.is_remote(u.audio_uri) else f)
    except FileNotFoundError:
        return replace(u, problem="audio file missing")
    except OSError as err:
        if storage.is_remote(u.audio_uri):  # a network or permission failure must not silently drop data
            raise StorageError(f"{u.audio_uri}: {str(err).splitlines()[0]} (check endpoint_url and "
                               "credentials, then re-run)") from None
        return replace(u, problem=f"cannot read audio file ({str(err).splitlines()[0]})")
    return replace(u, size_bytes=size, sample_rate_hz=rate_hz, duration_s=duration_s, problem=problem)


def _require_input(uri: str, layout: str, storage_cfg: StorageConfig | None) -> None:
    if _kind(uri, storage_cfg) == pafs.FileType.NotFound:
        raise StorageError(f"{uri}: not found (--input must be {LAYOUT_HINTS[layout]})")


def locate(cfg: PrepareConfig, input_uri: str, storage_cfg: StorageConfig | None) -> tuple[list, list[Skip]]:
    """What the survey will read: the tars (webdataset), or the utterances of a transcript layout with
    the lines already unusable. Runs before Ray starts, so a wrong --input fails at once, in one line."""
    if cfg.layout == "webdataset":
        return find_tars(input_uri, storage_cfg), []
    _require_input(input_uri, cfg.layout, storage_cfg)
    scan = scan_manifest if cfg.layout == "manifest" else scan_librispeech
    found, skipped = scan(input_uri, cfg.language, storage_cfg)
    if not found and not skipped:
        _nothing_found(input_uri, cfg.layout)
    check_unique_ids(found, input_uri)  # before reading any audio
    return found, skipped


def _nothing_found(input_uri: str, layout: str) -> None:
    raise ConfigError(f"{input_uri}: no utterances found for --layout {layout} (expected {LAYOUT_HINTS[layout]})")


def survey(cfg: PrepareConfig, located: list, skipped: list[Skip], storage_cfg: StorageConfig | None, run_all
           ) -> tuple[list[Utterance], list[Skip]]:
    """Every utterance with its audio header read (``problem`` set where unusable), and every input
    unusable before any audio was read (bad transcript lines, missing files)."""
    if cfg.layout == "webdataset":
        found, skipped = [], list(skipped)
        for _, (utts, skips) in run_all(survey_tar, [(t, cfg.language, storage_cfg) for t in located]):
            found += utts
            skipped += skips
        return found, skipped
    batches = [(located[i: i + PROBE_BATCH], storage_cfg) for i in range(0, len(located), PROBE_BATCH)]
    return [u for _, probed in run_all(probe_files, batches) for u in probed], skipped


# ---------------------------------------------------------------------------------------- plan


def check_unique_ids(utterances: list[Utterance], where: str) -> None:
    seen: dict[str, str] = {}
    for u in sorted(utterances, key=lambda u: (u.id, u.source)):
        if u.id in seen:
            raise ConfigError(f"{where}: duplicate utterance id {u.id!r} ({seen[u.id]} and {u.source}); ids "
                              "must be unique within a split: remove or rename one (a manifest can set ids in "
                              "an id column)")
        seen[u.id] = u.source


def _duration_problem(duration_s: float, cfg: PrepareConfig) -> str:
    if cfg.min_duration_s is not None and duration_s < cfg.min_duration_s:
        return f"duration {duration_s:.3f} s is below min_duration_s={cfg.min_duration_s:g}"
    if cfg.max_duration_s is not None and duration_s > cfg.max_duration_s:
        return f"duration {duration_s:.3f} s is above max_duration_s={cfg.max_duration_s:g}"
    return ""


def cut_shards(utterances: list[Utterance], split: str, target_bytes: float,
               max_utterances: int | None = None) -> list[ShardJob]:
    """Consecutive runs of ``utterances`` (already in index order): a shard ends before the one that
    would take its audio past ``target_bytes`` or its count past ``max_utterances``; an utterance
    larger than the target gets a shard of its own."""
    jobs: list[ShardJob] = []
    current: list[Utterance] = []
    size, first = 0, 0
    for u in utterances:
        full = max_utterances is not None and len(current) >= max_utterances
        if current and (full or size + u.size_bytes > target_bytes):
            jobs.append(ShardJob(shards.shard_name(split, len(jobs)), first, current))
            first, current, size = first + len(current), [], 0
        current.append(u)
        size += u.size_bytes
    if current:
        jobs.append(ShardJob(shards.shard_name(split, len(jobs)), first, current))
    return jobs


def _fingerprint(split: str, jobs: list[ShardJob]) -> str:
    digest = hashlib.sha256(f"{shards.FORMAT}\n{split}\n".encode())
    for job in jobs:
        digest.update(f"{job.relpath}\n".encode())
        for u in job.utterances:
            digest.update(json.dumps([u.id, u.source, u.size_bytes, u.sample_rate_hz, round(u.duration_s, 6),
                                      u.text, u.speaker, u.language]).encode())
    return digest.hexdigest()


def make_plan(found: list[Utterance], skipped: list[Skip], cfg: PrepareConfig) -> Plan:
    """Drop what cannot be used, number the rest in id order, and cut shards; a pure function of
    the survey and the config, so the same input always gives the same indices and shards."""
    check_unique_ids(found, cfg.input)
    skipped = list(skipped)
    good = []
    for u in sorted(found, key=lambda u: u.id):
        reason = u.problem or _duration_problem(u.duration_s, cfg)
        if reason:
            skipped.append(Skip(u.id, u.source, reason, filtered=not u.problem))
        else:
            good.append(u)
    skipped.sort(key=lambda s: (s.id or "", s.source))
    jobs = cut_shards(good, cfg.split, cfg.shard_target_mb * 2**20, cfg.shard_utterances)
    return Plan(jobs, skipped, _fingerprint(cfg.split, jobs))


# ---------------------------------------------------------------------------------------- writing


def _read_audio(u: Utterance, files: _Files, tars: dict) -> bytes:
    try:
        if u.member_offset is None:
            fs, path = files.resolve(u.audio_uri)
            with fs.open_input_stream(path) as f:
                data = f.read()
        else:
            data = tars[u.audio_uri].read_at(u.size_bytes, u.member_offset)  # positional: thread-safe
    except OSError as err:
        raise StorageError(f"{u.source}: {str(err).splitlines()[0]} (was readable when surveyed; "
                           "re-run to retry)") from None
    if len(data) != u.size_bytes:
        raise StorageError(f"{u.source}: {len(data)} bytes, {u.size_bytes} when surveyed: the input "
                           "changed while preparing; prepare it again into an empty --out")
    return data


def _open_tars(utterances: list[Utterance], files: _Files) -> dict:
    """Each tar a shard draws members from, opened once (not once per member)."""
    tars = {}
    for uri in sorted({u.audio_uri for u in utterances if u.member_offset is not None}):
        fs, path = files.resolve(uri)
        try:
            tars[uri] = fs.open_input_file(path)
        except OSError as err:
            raise StorageError(f"{uri}: {str(err).splitlines()[0]} (was readable when surveyed; re-run to retry)") from None
    return tars


def write_shard_job(job: tuple) -> tuple[str, int, float]:
    """Writer task: copy one shard's audio bytes as they are into a Parquet shard."""
    out_uri, shard, storage_cfg = job
    files = _Files(storage_cfg)
    tars = _open_tars(shard.utterances, files)
    try:
        with ThreadPoolExecutor(IO_THREADS) as pool:
            blobs = list(pool.map(lambda u: _read_audio(u, files, tars), shard.utterances))
    finally:
        for f in tars.values():
            f.close()
    rows = [{"index": shard.first_index + i, "id": u.id, "audio": data, "sample_rate_hz": u.sample_rate_hz,
             "duration_s": u.duration_s, "text": u.text, "language": u.language, "speaker": u.speaker}
            for i, (u, data) in enumerate(zip(shard.utterances, blobs))]
    shards.write_shard(out_uri, shard.relpath, shards.rows_to_table(rows), storage_cfg)
    return shard.relpath, len(rows), sum(u.duration_s for u in shard.utterances)


def _load_state(state_uri: str, out_uri: str, plan: Plan, record: dict,
                storage_cfg: StorageConfig | None) -> dict:
    """The resume state for this plan: shards an earlier run finished (and that still exist)."""
    fresh = {"fingerprint": plan.fingerprint, "layout": record["layout"], "input": record["input"],
             "config": record["config"], "utterances": sum(len(j.utterances) for j in plan.shards), "shards": {}}
    if not storage.exists(state_uri, storage_cfg):
        return fresh
    try:
        state = json.loads(storage.read_bytes(state_uri, storage_cfg).decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise StorageError(f"{state_uri}: not a valid prepare state file; delete it to start over") from None
    if state.get("fingerprint") != plan.fingerprint:
        split_dir = posixpath.dirname(state_uri)
        old_cfg = state.get("config", {})
        changed = [f"{k} {old_cfg.get(k)!r} -> {v!r}" for k, v in record["config"].items()
                   if k != "workers" and old_cfg.get(k) != v]
        why = (f"settings changed: {', '.join(changed)}" if changed and old_cfg else
               "the input files differ" if old_cfg else "input files or settings differ")
        raise ConfigError(
            f"{split_dir} holds a different prepare ({state.get('layout')} of {state.get('input')}, "
            f"{state.get('utterances')} utterances) than this one ({record['layout']} of {record['input']}, "
            f"{fresh['utterances']} utterances; {why}); "
            f"prepare never mixes two plans in a split: delete {split_dir} to start over, or write to another "
            "--out or --split")
    state["shards"] = {k: v for k, v in state.get("shards", {}).items()
                       if storage.exists(storage.join(out_uri, k), storage_cfg)}
    return state


def _write_shards(plan: Plan, state: dict, out_uri: str, split: str, storage_cfg, run_all, log
                  ) -> tuple[shards.SplitInfo, int, int]:
    """Run a writer task per shard the state does not list as done, recording each as it finishes."""
    state_uri = storage.join(out_uri, split, STATE_FILE)
    done = state["shards"]
    todo = [job for job in plan.shards if job.relpath not in done]
    reused = len(plan.shards) - len(todo)
    if reused:
        log(f"prepare: resuming: {reused} of {len(plan.shards)} shards already written, skipping them")
    storage.write_bytes(state_uri, json.dumps(state).encode(), storage_cfg)
    jobs = [(out_uri, job, storage_cfg) for job in todo]
    for n, (_, (relpath, count, seconds)) in enumerate(run_all(write_shard_job, jobs), start=1):
        done[relpath] = {"utterances": count, "duration_s": seconds}
        storage.write_bytes(state_uri, json.dumps(state).encode(), storage_cfg)  # object stores: no append
        log(f"prepare: {n}/{len(todo)} shards written ({relpath}, {count} utterances, {seconds / 60:.1f} min)")
    info = shards.SplitInfo()
    for job in plan.shards:
        info.shards.append(job.relpath)
        info.utterances.append(done[job.relpath]["utterances"])
        info.hours += done[job.relpath]["duration_s"] / 3600
    return info, len(todo), reused


def _write_skipped(uri: str, skipped: list[Skip], storage_cfg) -> None:
    lines = "".join(json.dumps({"id": s.id, "source": s.source, "reason": s.reason}) + "\n" for s in skipped)
    storage.write_bytes(uri, lines.encode(), storage_cfg)


def _merge_manifest(out_uri: str, split: str, info: shards.SplitInfo, record: dict,
                    storage_cfg) -> shards.Manifest:
    """Replace ``split`` in the root's manifest and keep every other split (e.g. preparing ``test``
    into a root that already has ``train``); ``source.splits`` keeps where each split came from."""
    if storage.exists(storage.join(out_uri, shards.MANIFEST), storage_cfg):
        manifest = shards.read_manifest(out_uri, storage_cfg)
    else:
        manifest = shards.Manifest()
    old = manifest.source or {}
    if old.get("kind") in ("prepare", "webdataset-index"):
        provenance = dict(old.get("splits", {}))
    else:  # e.g. a synthesized corpus getting a prepared split: its splits keep their source
        provenance = {name: old for name in manifest.splits} if old else {}
    provenance[split] = record
    manifest.splits[split] = info
    manifest.source = {**record, "split": split, "splits": provenance}
    shards.write_manifest(out_uri, manifest, storage_cfg)
    return manifest


# ---------------------------------------------------------------------------------------- driver


def _serial_map(fn: Callable, jobs: list) -> Iterator[tuple[int, object]]:
    for i, job in enumerate(jobs):
        yield i, fn(job)


def _ray_map(ray, in_flight: int, fn: Callable, jobs: list) -> Iterator[tuple[int, object]]:
    """(job number, result) in completion order, at most ``in_flight`` tasks at a time so that a
    corpus of thousands of shards never holds more than a few shards' audio in memory."""
    remote = ray.remote(num_cpus=1)(fn)
    pending: dict = {}
    queue = list(enumerate(jobs))[::-1]
    while queue or pending:
        while queue and len(pending) < in_flight:
            i, job = queue.pop()
            pending[remote.remote(job)] = i
        ready, _ = ray.wait(list(pending), num_returns=1)
        i = pending.pop(ready[0])
        try:
            result = ray.get(ready[0])
        except ray.exceptions.RayTaskError as err:
            cause = getattr(err, "cause", None)
            if isinstance(cause, (StorageError, ConfigError)):
                raise cause from None  # one line for the CLI, not a remote traceback
            raise
        yield i, result


@contextmanager
def _executor(workers: int | None):
    """A map over jobs: in this process (workers=0), or as Ray tasks on the cluster already joined,
    on $RAY_ADDRESS, or on a local Ray started here (and shut down after)."""
    if workers == 0:
        yield _serial_map
        return
    import ray

    started = not ray.is_initialized()
    if started:
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            ray.init(address="local", num_cpus=workers or os.cpu_count() or 1, include_dashboard=False,
                     object_store_memory=256 * 2**20, logging_level=logging.WARNING)
    try:
        in_flight = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        yield lambda fn, jobs: _ray_map(ray, in_flight, fn, jobs)
    finally:
        if started:
            ray.shutdown()


def prepare(cfg: PrepareConfig, out_uri: str, storage_cfg: StorageConfig | None = None,
            log: Callable[[str], None] = print) -> PrepareOutcome:
    """Convert ``cfg.input`` into split ``cfg.split`` of the shard corpus at ``out_uri``; the manifest
    is written last, so the split is usable exactly when this returns."""
    cfg.validate()
    if cfg.index_only:
        from raytrain_speech.data.wds import index_webdataset

        return index_webdataset(cfg, out_uri, storage_cfg, log)
    start = time.time()
    input_uri, out_uri = _absolute(cfg.input), _absolute(out_uri)
    storage.check_reachable(input_uri, storage_cfg)
    storage.check_reachable(out_uri, storage_cfg)
    record = {"kind": "prepare", "layout": cfg.layout, "input": input_uri,
              "config": to_dict(replace(cfg, input=input_uri))}
    skipped_uri = storage.join(out_uri, cfg.split, SKIPPED_FILE)
    located, skipped = locate(cfg, input_uri, storage_cfg)
    with _executor(cfg.workers) as run_all:
        found, skipped = survey(cfg, located, skipped, storage_cfg, run_all)
        if not found and not skipped:
            _nothing_found(input_uri, cfg.layout)
        plan = make_plan(found, skipped, replace(cfg, input=input_uri))
        n_filtered = sum(s.filtered for s in plan.skipped)
        record.update(skipped=len(plan.skipped) - n_filtered, filtered=n_filtered)
        n_good = sum(len(j.utterances) for j in plan.shards)
        log(f"prepare: {n_good} utterances in {len(plan.shards)} shards; {record['skipped']} bad inputs and "
            f"{n_filtered} outside the duration limits left out (surveyed in {time.time() - start:.0f} s)")
        state_uri = storage.join(out_uri, cfg.split, STATE_FILE)
        if not plan.shards:
            listed = ""
            if not storage.exists(state_uri, storage_cfg):  # never clobber another plan's list
                _write_skipped(skipped_uri, plan.skipped, storage_cfg)
                listed = f"; all listed in {skipped_uri}"
            raise ConfigError(f"{input_uri}: all {len(plan.skipped)} utterances found were left out "
                              f"(e.g. {plan.skipped[0].source}: {plan.skipped[0].reason}{listed})")
        state = _load_state(state_uri, out_uri, plan, record, storage_cfg)
        _write_skipped(skipped_uri, plan.skipped, storage_cfg)  # after the state check: never clobber another plan's
        info, written, reused = _write_shards(plan, state, out_uri, cfg.split, storage_cfg, run_all, log)
    manifest = _merge_manifest(out_uri, cfg.split, info, record, storage_cfg)
    return PrepareOutcome(manifest, cfg.split, record["skipped"], n_filtered, written, reused, skipped_uri,
                          time.time() - start)
