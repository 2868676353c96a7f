"""What prepare learns about each audio file: its header in the survey, its samples in the writer.

Audio bytes are copied into the shards as they are (FLAC/WAV/OGG); the pipeline decodes and resamples
at read time. The survey reads headers only (``soundfile.info``): it must see every file before the
plan can number them (plan.py), and a header is a few small reads. A header does not prove the file
is whole, though: a FLAC cut short by an interrupted copy keeps its full-length header, and so does a
WAV whose data chunk was cut (libsndfile then quietly shortens its frame count). So the writer, which
reads every byte anyway to copy it, also decodes it (``decode_check``, streamed in blocks from the
bytes in memory) and leaves out a file that fails to decode, decodes to materially fewer frames than
its header says, or holds NaN/Inf. Decoding costs CPU in the writer tasks; a bad file found there is
listed in prepare_skipped.jsonl like one the survey found, instead of failing every epoch in training.
"""

from __future__ import annotations

import io
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
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


DECODE_BLOCK_FRAMES = 16384
"""Frames decoded at a time by ``decode_check`` (about 1 s at 16 kHz): a long file costs a block of floats
in memory, not its length. A read that fails returns nothing of its block, so the decoded length a
skip reports is a lower bound by up to a block; smaller blocks are slower (4096 decodes FLAC ~20% slower)."""

FIX = "re-encode or re-copy the file"


def duration_tolerance_s(expected_s: float) -> float:
    """How far a decoded length may fall short of its header before the file counts as truncated: the
    tolerance of ``audio.check_duration``, so prepare never ships a file a reader would reject."""
    return max(0.05, 0.02 * expected_s)


def decode_check(data: bytes) -> tuple[int, float, str]:
    """(sample_rate_hz, decoded duration_s, problem) of a whole audio file in memory, decoded block by
    block and every frame counted ("" problem = it decodes in full, to finite samples)."""
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            rate_hz, header_frames = int(f.samplerate), max(int(f.frames), wav_declared_frames(data) or 0)
            frames, error = 0, ""
            try:
                while True:
                    block = f.read(DECODE_BLOCK_FRAMES, dtype="float32", always_2d=True)
                    if not len(block):
                        break
                    if not np.isfinite(block).all():
                        at_s = (frames + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])) / rate_hz
                        return rate_hz, 0.0, (f"audio contains NaN or Inf samples (the first at {at_s:.2f} s; "
                                              "re-encode the file from its source)")
                    frames += len(block)
            except (sf.SoundFileError, RuntimeError, ValueError) as err:
                error = _first_line(err)
    except (sf.SoundFileError, RuntimeError, TypeError, ValueError) as err:
        return 0, 0.0, f"unreadable audio ({_first_line(err)}; {FIX})"
    if rate_hz <= 0:
        return 0, 0.0, "audio has no sample rate"
    got_s, header_s = frames / rate_hz, header_frames / rate_hz
    if error:  # a FLAC cut short and one damaged mid-stream fail alike ("lost sync")
        return rate_hz, got_s, (f"truncated or corrupt audio: decodes for {got_s:.2f} s of the {header_s:.2f} s its "
                                f"header says, then fails ({error}) ({FIX})")
    if header_s - got_s > duration_tolerance_s(header_s):
        return rate_hz, got_s, f"truncated audio: decodes to {got_s:.2f} s but its header says {header_s:.2f} s ({FIX})"
    if frames == 0:
        return rate_hz, 0.0, "audio has no samples"
    return rate_hz, got_s, ""


WAV_SAMPLE_FORMATS = {1, 3, 6, 7, 0xFFFE}
"""WAVE format tags whose block align is one frame: PCM, IEEE float, A-law, mu-law, extensible."""


def wav_declared_frames(data: bytes) -> int | None:
    """Frames a RIFF WAV's data chunk says it holds, from its size field. libsndfile trims its own frame
    count to the bytes present, so only this field shows a cut; None when the bytes are not such a WAV
    or the size is unknown (0 or 0xFFFFFFFF, as a WAV streamed to a pipe has)."""
    if len(data) < 12 or data[:4] not in (b"RIFF", b"RIFX") or data[8:12] != b"WAVE":
        return None
    order = "<" if data[:4] == b"RIFF" else ">"
    pos, block_align = 12, 0
    while pos + 8 <= len(data):
        chunk, size = data[pos: pos + 4], struct.unpack(order + "I", data[pos + 4: pos + 8])[0]
        if chunk == b"fmt " and pos + 22 <= len(data):
            tag, _, _, _, align = struct.unpack(order + "HHIIH", data[pos + 8: pos + 22])
            block_align = align if tag in WAV_SAMPLE_FORMATS else 0
        elif chunk == b"data":
            return size // block_align if block_align and size not in (0, 0xFFFFFFFF) else None
        pos += 8 + size + (size & 1)
    return None


def _first_line(err: BaseException) -> str:
    """libsndfile's reason without its prefix ("Error : flac decoder lost sync." -> "flac decoder lost sync")."""
    text = str(err)
    return text.splitlines()[0].rsplit(": ", 1)[-1].rstrip(".") if text else type(err).__name__


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
