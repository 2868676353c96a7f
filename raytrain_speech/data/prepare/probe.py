"""Audio header probing for the survey: each utterance's size, ``sample_rate_hz`` and ``duration_s``.

Audio bytes are copied into the shards as they are (FLAC/WAV/OGG); the pipeline decodes and resamples
at read time. ``sample_rate_hz`` and ``duration_s`` come from the file header (``soundfile.info``), so
preparing never decodes audio and is bound by I/O, not CPU.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pyarrow.fs as pafs
import soundfile as sf

from raytrain_speech import storage
from raytrain_speech.config import StorageConfig
from raytrain_speech.data import shards
from raytrain_speech.data.prepare.plan import Utterance
from raytrain_speech.storage import StorageError

IO_THREADS = 8
"""Concurrent reads inside one task: an object store answers each request in tens of milliseconds,
so a task keeps several in flight to be bound by bandwidth rather than latency."""


class Files:
    """Filesystems by scheme, built once per task: building an S3 client costs milliseconds, which is
    too much to pay per file of a corpus."""

    def __init__(self, storage_cfg: StorageConfig | None):
        self.storage_cfg = storage_cfg
        self._fs: dict[str, pafs.FileSystem] = {}

    def resolve(self, uri: str) -> tuple[pafs.FileSystem, str]:
        key = uri.split("://", 1)[0] if storage.is_remote(uri) else "local"
        if key not in self._fs:
            self._fs[key] = storage.resolve(uri, self.storage_cfg)[0]
        path = uri.split("://", 1)[1].rstrip("/") if key != "local" else shards.absolute(uri)  # as storage.resolve
        return self._fs[key], path


def probe_header(f) -> tuple[int, float, str]:
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


def probe_files(job: tuple) -> list[Utterance]:
    """Survey task for file layouts: size and header of each utterance's audio file."""
    utterances, storage_cfg = job
    files = Files(storage_cfg)
    with ThreadPoolExecutor(IO_THREADS) as pool:
        return list(pool.map(lambda u: _probe_file(u, files), utterances))


def _probe_file(u: Utterance, files: Files) -> Utterance:
    fs, path = files.resolve(u.audio_uri)
    try:
        with fs.open_input_file(path) as f:
            size = f.size()
            if size == 0:
                return replace(u, problem="zero-length audio file")
            rate_hz, duration_s, problem = probe_header(_BlockReader(f) if storage.is_remote(u.audio_uri) else f)
    except FileNotFoundError:
        return replace(u, problem="audio file missing")
    except OSError as err:
        if storage.is_remote(u.audio_uri):  # a network or permission failure must not silently drop data
            raise StorageError(f"{u.audio_uri}: {str(err).splitlines()[0]} (check endpoint_url and "
                               "credentials, then re-run)") from None
        return replace(u, problem=f"cannot read audio file ({str(err).splitlines()[0]})")
    return replace(u, size_bytes=size, sample_rate_hz=rate_hz, duration_s=duration_s, problem=problem)
