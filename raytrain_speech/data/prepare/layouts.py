"""Input layouts: where a corpus's utterances are and what is known of them before the audio is read.

Three layouts: a transcript manifest (TSV or JSONL) beside audio files, LibriSpeech
(``<speaker>/<chapter>/<speaker>-<chapter>.trans.txt``), and WebDataset tar shards (members grouped
by key, surveyed a task per tar). ``locate`` finds what to read before Ray starts, so a wrong --input
fails at once; ``survey`` reads every audio header, in parallel through the executor's map.

A bad file in a corpus of 100k is not worth stopping for: missing, empty or unreadable audio and
empty or non-UTF-8 transcripts become a ``Skip`` with id and reason (listed in
``<root>/<split>/prepare_skipped.jsonl`` by write.py). Storage that cannot be reached still stops
the run.
"""

from __future__ import annotations

import fnmatch
import io
import json
import posixpath
import tarfile
from collections.abc import Iterator
from typing import NoReturn

import pyarrow.fs as pafs

from raytrain_speech import storage
from raytrain_speech.config import ConfigError, StorageConfig
from raytrain_speech.data import shards
from raytrain_speech.data.prepare.plan import LAYOUT_HINTS, PrepareConfig, Skip, Utterance, check_unique_ids
from raytrain_speech.data.prepare.probe import probe_files, probe_header
from raytrain_speech.storage import StorageError

AUDIO_EXTENSIONS = ("flac", "wav", "ogg")
"""Audio the pipeline decodes, in order of preference when one utterance has several."""
PROBE_BATCH = 256
"""Files whose headers one survey task reads: few enough that a corpus spreads over every worker."""


# ---------------------------------------------------------------------------------------- listing

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
    """A header row (``path<TAB>text[<TAB>speaker<TAB>language]``, any order, optional ``id`` and
    ``phonemes``) names the columns; without one every line is ``path<TAB>text``."""
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
                                   language=_label(record.get("language")) or language,
                                   phonemes=_label(record.get("phonemes"))))
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
            opened = open(shards.absolute(tar_uri), "rb")
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
            probe = probe_header(f if seekable else io.BytesIO(f.read()))
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
        nothing_found(input_uri, cfg.layout)
    check_unique_ids(found, input_uri)  # before reading any audio
    return found, skipped


def nothing_found(input_uri: str, layout: str) -> NoReturn:
    """Stop: ``input_uri`` holds nothing that ``layout`` would read (a wrong --input or --layout)."""
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
