"""What ``prepare`` will write, decided on the driver between the survey and the writers: which inputs
are left out, the stable index of every utterance, and where the shards are cut.

Exactly-once accounting keys on a stable index per utterance, so the index must not depend on the
order files were listed in, or on which task finished first: utterances are sorted by id, bad ones
are dropped *before* numbering, and indices 0..n-1 follow the sorted order. That needs every header
read before the first shard is cut, hence a plan between the two parallel phases (run.py). The plan's
fingerprint is what a resumed run is checked against (write.py).

A file whose header reads but whose samples do not decode in full (cut short, corrupt, NaN/Inf) is
found only by the writer, which reads every byte anyway: it is left out there and the indices after it
close up (write.py), so the indices are still 0..n-1 in id order over the utterances written, and
still the same for the same input. The plan's indices and shard counts are what they would be if every
file decoded.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from raytrain_speech.config import ConfigError, require
from raytrain_speech.data import shards

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
    """webdataset only: write an index over the tars (data/prepare/index.py, read by data/tars.py)
    instead of copying their audio into Parquet shards; training then streams the tars where they are."""

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
    phonemes: str | None = None
    """Phone symbols separated by whitespace, when the input gives them (the phoneme probe's labels)."""
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
    """One output shard: its path and utterances, which get indices first_index, first_index+1, ...; as
    planned, first_index assumes every earlier file decodes, and the writer's job gets it less the files
    left out before it (write.py)."""

    relpath: str
    first_index: int
    utterances: list[Utterance]
    phonemes: bool = False
    """Write a ``phonemes`` column: some utterance of the plan has phonemes (every shard of a split then
    has the column, so the split has one schema)."""


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
    text_rules: str = ""
    """The text rules transcripts were checked against (text.normalizer, text.tokenizer)."""
    text_skipped: dict = field(default_factory=dict)
    """Transcripts the text rules cannot encode, per reason: count and example ids (also listed)."""


def check_unique_ids(utterances: list[Utterance], where: str) -> None:
    seen: dict[str, str] = {}
    for u in sorted(utterances, key=lambda u: (u.id, u.source)):
        if u.id in seen:
            raise ConfigError(f"{where}: duplicate utterance id {u.id!r} ({seen[u.id]} and {u.source}); ids "
                              "must be unique within a split: remove or rename one (a manifest can set ids in "
                              "an id column)")
        seen[u.id] = u.source


def duration_problem(duration_s: float, cfg: PrepareConfig) -> str:
    """Why an utterance of ``duration_s`` is outside the config's duration limits ("" = inside)."""
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
            row = [u.id, u.source, u.size_bytes, u.sample_rate_hz, round(u.duration_s, 6), u.text, u.speaker,
                   u.language] + ([u.phonemes] if u.phonemes is not None else [])  # old plans keep their prints
            digest.update(json.dumps(row).encode())
    return digest.hexdigest()


TEXT_REASON = "transcript: "
"""Reason prefix of utterances whose transcript the text rules (text.*) cannot encode."""


def make_plan(found: list[Utterance], skipped: list[Skip], cfg: PrepareConfig,
              text_problem: Callable[[str], str] | None = None) -> Plan:
    """Drop what cannot be used, number the rest in id order, and cut shards; a pure function of
    the survey, the config and ``text_problem`` (why a transcript cannot be encoded, '' if it can),
    so the same input always gives the same indices and shards."""
    check_unique_ids(found, cfg.input)
    skipped = list(skipped)
    good = []
    for u in sorted(found, key=lambda u: u.id):
        reason = u.problem or duration_problem(u.duration_s, cfg)
        if not reason and text_problem is not None:
            why = text_problem(u.text)
            reason = f"{TEXT_REASON}{why}" if why else ""
        if reason:
            skipped.append(Skip(u.id, u.source, reason, filtered=not u.problem))
        else:
            good.append(u)
    skipped.sort(key=lambda s: (s.id or "", s.source))
    jobs = cut_shards(good, cfg.split, cfg.shard_target_mb * 2**20, cfg.shard_utterances)
    if any(u.phonemes for u in good):
        for job in jobs:
            job.phonemes = True
    return Plan(jobs, skipped, _fingerprint(cfg.split, jobs))
