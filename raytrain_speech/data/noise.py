"""A synthesized noise-shard set that stands in for MUSAN, and the loader augmentation reads noise with.

Training mixes additive noise into speech at a random SNR, drawing clips from a noise-shard set: a
corpus in the ordinary shard format (docs/shards.md) whose rows are noise clips, ``text`` "" and
``speaker`` the kind of noise. Real runs point at MUSAN prepared with ``raytrain-speech prepare``; the
tests and the demo need one that costs no download, so this module generates it.

Kinds, and why each is there:

- ``white``, ``pink``, ``brown``: Gaussian noise shaped in the FFT domain to a power spectrum of
  1/f^alpha (alpha 0, 1, 2), the stationary broadband noise of fans, rain and rumble. Everything
  below ``LOWEST_HZ`` is removed, since it would only eat into the SNR budget without being heard.
- ``hum``: mains hum, a 50 or 60 Hz fundamental and a few harmonics over a little broadband noise.
- ``babble``: 4-6 talkers from the espeak-ng synthesizer of ``synth.py`` speaking at once. It has to be
  real speech: babble is the noise that shares speech's spectrum and envelope, which Gaussian noise
  does not imitate.

Everything is a function of ``NoiseSetConfig.seed``: the same config gives the same audio bytes.
libespeak-ng keeps state between utterances that its seed does not reset (see ``synth.synthesize``),
so each babble clip's speech is rendered in a fresh process forked from a clean server.
"""

from __future__ import annotations

import math
import multiprocessing
import random
from collections import Counter
from dataclasses import dataclass

import numpy as np

from raytrain_speech import storage
from raytrain_speech.config import ConfigError, StorageConfig, require, to_dict
from raytrain_speech.data import audio, corpus, shards
from raytrain_speech.storage import StorageError

KINDS = ("white", "pink", "brown", "babble", "hum")
COLOR_ALPHA = {"white": 0.0, "pink": 1.0, "brown": 2.0}
"""Exponent of the 1/f^alpha power spectrum of each coloured noise."""
LOWEST_HZ = 20.0
"""Coloured noise and hum's broadband floor carry nothing below this (inaudible, yet it would count
in the noise power an SNR is set against, and dominate brown noise)."""
MAINS_HZ = (50, 60)
HUM_HARMONICS = (3, 6)
"""Range of the number of harmonics of a hum clip, the fundamental included."""
HUM_FLOOR_DB = -30.0
"""Level of hum's broadband noise relative to the tones (a little hiss, as on a real line)."""
BABBLE_TALKERS = (4, 6)
"""Range of the number of simultaneous talkers in a babble clip."""
SPLIT = "noise"
SILENT_PEAK = 1e-4
"""A loaded clip whose peak is below this (about -80 dBFS, a few 16-bit steps) has no level to mix at."""


@dataclass
class NoiseSetConfig:
    """The synthesized noise set: how many clips, how long, and which kinds."""

    seed: int = 4321
    """Every clip's kind order, level, noise and babble speech derive from this."""
    clips: int = 48
    """Clips in the set; kinds take turns, so each kind gets clips // len(kinds) or one more."""
    clip_duration_s: float = 8.0
    """Length of every clip (the mixer loops or crops a clip to the utterance's length)."""
    sample_rate_hz: int = 16000
    """Sample rate of the written audio."""
    kinds: tuple[str, ...] = KINDS
    """Kinds of noise to generate (a subset of KINDS), in the order they take turns."""
    shard_utterances: int = 16
    """Clips per Parquet shard."""
    peak_range: tuple[float, float] = (0.1, 0.9)
    """Range of the random peak level each clip is normalised to (the mixer rescales to the SNR anyway;
    varied levels keep it honest about that)."""

    def validate(self) -> None:
        require(self.clips >= 1, "noise.clips", "must be >= 1")
        require(self.clip_duration_s >= 0.5, "noise.clip_duration_s", "must be >= 0.5 (seconds)")
        require(self.sample_rate_hz >= 8000, "noise.sample_rate_hz", "must be >= 8000")
        require(len(self.kinds) >= 1, "noise.kinds", f"must name at least one of {', '.join(KINDS)}")
        for kind in self.kinds:
            require(kind in KINDS, "noise.kinds", f"unknown kind {kind!r} (known: {', '.join(KINDS)})")
        require(len(set(self.kinds)) == len(self.kinds), "noise.kinds", "lists a kind twice")
        require(self.shard_utterances >= 1, "noise.shard_utterances", "must be >= 1")
        low, high = self.peak_range
        require(0 < low <= high <= 1, "noise.peak_range", "must satisfy 0 < low <= high <= 1")


@dataclass(frozen=True)
class NoiseClipSpec:
    """One clip of the set: everything ``synthesize_clip`` needs to render it."""

    index: int
    kind: str
    seed: int
    duration_s: float
    peak: float

    @property
    def id(self) -> str:
        return f"{SPLIT}-{self.index:06d}"


def make_clip_specs(cfg: NoiseSetConfig) -> list[NoiseClipSpec]:
    """Kinds take turns (so any first n clips cover every kind); each clip has its own seed and level."""
    rng = random.Random(f"{cfg.seed}/noise")
    return [NoiseClipSpec(i, cfg.kinds[i % len(cfg.kinds)], rng.getrandbits(31), cfg.clip_duration_s,
                          rng.uniform(*cfg.peak_range)) for i in range(cfg.clips)]


def _colored(rng: np.random.Generator, n: int, sample_rate_hz: int, alpha: float) -> np.ndarray:
    """Gaussian noise with a 1/f^alpha power spectrum above LOWEST_HZ (zero-mean, unit variance)."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs_hz = np.fft.rfftfreq(n, 1.0 / sample_rate_hz)
    gain = np.zeros_like(freqs_hz)
    audible = freqs_hz >= LOWEST_HZ
    gain[audible] = freqs_hz[audible] ** (-alpha / 2)  # amplitude goes as the square root of power
    x = np.fft.irfft(spectrum * gain, n)
    return x / (x.std() or 1.0)


def _hum(rng: np.random.Generator, n: int, sample_rate_hz: int) -> np.ndarray:
    t_s = np.arange(n) / sample_rate_hz
    f0_hz = float(rng.choice(MAINS_HZ))
    x = np.zeros(n)
    for k in range(1, int(rng.integers(HUM_HARMONICS[0], HUM_HARMONICS[1] + 1)) + 1):
        if k * f0_hz >= sample_rate_hz / 2:
            break
        amplitude = 1.0 if k == 1 else rng.uniform(0.1, 0.7) / k ** 0.5
        x += amplitude * np.sin(2 * np.pi * k * f0_hz * t_s + rng.uniform(0, 2 * np.pi))
    return x + x.std() * 10 ** (HUM_FLOOR_DB / 20) * _colored(rng, n, sample_rate_hz, 1.0)


def _talker_streams(seed: int, n: int, sample_rate_hz: int) -> list[np.ndarray]:
    """Each talker's speech, ``n`` samples of back-to-back sentences; runs in a fresh process."""
    import torch

    from raytrain_speech.data import synth
    from raytrain_speech.data.words import WORDS

    torch.set_num_threads(1)
    rng = random.Random(seed)
    voices = [s for split in synth.make_speakers(synth.SynthConfig()).values() for s in split]
    streams = []
    for talker in rng.sample(voices, rng.randint(*BABBLE_TALKERS)):
        level = rng.uniform(0.4, 1.0)
        offset = rng.randrange(sample_rate_hz)  # talkers do not all start on a sentence boundary
        parts, have = [], 0
        while have < n + offset:
            spec = synth.UtteranceSpec(
                len(parts), "babble", " ".join(rng.choices(WORDS, k=rng.randint(4, 10))), talker,
                max(80, round(talker.rate_wpm * rng.uniform(0.9, 1.1))),
                min(99, max(0, talker.pitch + rng.randint(-6, 6))), rng.uniform(0.02, 0.25),
                rng.uniform(0.02, 0.25), level * rng.uniform(0.8, 1.0), rng.getrandbits(31))
            parts.append(synth.render(spec, sample_rate_hz))
            have += len(parts[-1])
        streams.append(np.concatenate(parts)[offset: offset + n])
    return streams


def _babble(seed: int, n: int, sample_rate_hz: int) -> np.ndarray:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["raytrain_speech.data.synth"])  # no effect once the server runs
    with ctx.Pool(processes=1, maxtasksperchild=1) as pool:
        streams = pool.apply(_talker_streams, (seed, n, sample_rate_hz))
    return np.sum(streams, axis=0, dtype=np.float64)


def synthesize_clip(kind: str, seed: int, duration_s: float = 8.0, sample_rate_hz: int = 16000,
                    peak: float = 0.5) -> np.ndarray:
    """One clip as float32 with peak ``peak``: a pure function of its arguments, babble included, since
    its speech comes from a fresh espeak-ng process whatever this process rendered before (so a script
    that asks for babble needs the ``if __name__ == "__main__":`` guard multiprocessing always wants)."""
    if kind not in KINDS:
        raise ConfigError(f"noise kind {kind!r} is not one of {', '.join(KINDS)}")
    n = round(duration_s * sample_rate_hz)
    if kind == "babble":
        x = _babble(seed, n, sample_rate_hz)
    elif kind == "hum":
        x = _hum(np.random.default_rng(seed), n, sample_rate_hz)
    else:
        x = _colored(np.random.default_rng(seed), n, sample_rate_hz, COLOR_ALPHA[kind])
    return (x * (peak / (np.abs(x).max() or 1.0))).astype(np.float32)


def render_clip(spec: NoiseClipSpec, sample_rate_hz: int) -> np.ndarray:
    return synthesize_clip(spec.kind, spec.seed, spec.duration_s, sample_rate_hz, spec.peak)


def _check_root(out_uri: str, storage_cfg: StorageConfig | None) -> None:
    """A root that holds a speech corpus is not overwritten: its manifest would lose every split."""
    uri = storage.join(out_uri, shards.MANIFEST)
    if storage.exists(uri, storage_cfg):
        source = shards.read_manifest(out_uri, storage_cfg).source
        if source.get("kind") != "noise":
            raise StorageError(f"{out_uri} already holds a {source.get('kind', 'shard')} corpus; "
                               "write the noise set to its own root")


def write_noise_set(cfg: NoiseSetConfig, out_uri: str, storage_cfg: StorageConfig | None = None,
                    log=print) -> shards.Manifest:
    """Render every clip to ``out_uri`` as split "noise" and write the manifest last (its presence = done)."""
    _check_root(out_uri, storage_cfg)
    if "babble" in cfg.kinds:
        from raytrain_speech.data.synth import check_voices

        check_voices()
    specs = make_clip_specs(cfg)
    info = shards.SplitInfo()
    n_shards = math.ceil(len(specs) / cfg.shard_utterances)
    for number in range(n_shards):
        rows = []
        for spec in specs[number * cfg.shard_utterances: (number + 1) * cfg.shard_utterances]:
            wav = render_clip(spec, cfg.sample_rate_hz)
            rows.append({
                "index": spec.index, "id": spec.id, "audio": audio.encode_flac(wav, cfg.sample_rate_hz),
                "sample_rate_hz": cfg.sample_rate_hz, "duration_s": len(wav) / cfg.sample_rate_hz,
                "text": "", "language": "", "speaker": spec.kind,
            })
        relpath = shards.shard_name(SPLIT, number)
        shards.write_shard(out_uri, relpath, shards.rows_to_table(rows), storage_cfg)
        info.shards.append(relpath)
        info.utterances.append(len(rows))
        info.hours += sum(r["duration_s"] for r in rows) / 3600
        log(f"synth-noise: {number + 1}/{n_shards} shards ({relpath}, {len(rows)} clips)")
    manifest = shards.Manifest(splits={SPLIT: info}, source={"kind": "noise", "config": to_dict(cfg)})
    shards.write_manifest(out_uri, manifest, storage_cfg)
    return manifest


def kind_counts(cfg: NoiseSetConfig) -> dict[str, int]:
    """Clips per kind, in ``cfg.kinds`` order (for the one line the CLI prints)."""
    counts = Counter(spec.kind for spec in make_clip_specs(cfg))
    return {kind: counts[kind] for kind in cfg.kinds}


def _load_clip(clip_id: str, data: bytes, sample_rate_hz: int) -> np.ndarray:
    try:
        wav = audio.load(data, sample_rate_hz)
    except audio.AudioError as err:
        raise audio.AudioError(f"noise clip {clip_id}: {err}") from None
    if float(np.abs(wav).max()) < SILENT_PEAK:
        raise audio.AudioError(f"noise clip {clip_id}: silent (peak below {SILENT_PEAK:g}), "
                               "so there is no level to mix it at an SNR")
    return np.ascontiguousarray(wav, dtype=np.float32)


def load_noise_clips(root: str, storage_cfg: StorageConfig | None = None, split: str = SPLIT,
                     max_clips: int | None = None, sample_rate_hz: int = 16000) -> list[np.ndarray]:
    """Every clip of ``split`` (the first ``max_clips`` in index order), decoded and resampled.

    Any split of any shard corpus works (MUSAN prepared with ``raytrain-speech prepare`` is split
    "train"). A clip that cannot be decoded, or is silent, raises AudioError naming its id: a noise set
    with a bad clip should stop a run at its start, not skip noise silently for hours.
    """
    if max_clips is not None and max_clips < 1:
        raise ConfigError(f"max_clips: must be >= 1 or None, got {max_clips}")
    if not storage.exists(storage.join(root, shards.MANIFEST), storage_cfg):
        raise StorageError(f"{root}: no noise set there (no {shards.MANIFEST}; write one with "
                           f"`raytrain-speech synth-noise --out {root}` or prepare MUSAN into it)")
    clips: list[np.ndarray] = []
    for uri in corpus.shard_uris(root, split, storage_cfg):
        table = corpus.read_shard(uri, storage_cfg).select(["id", "audio"])
        for clip_id, data in zip(table["id"].to_pylist(), table["audio"].to_pylist()):
            if max_clips is not None and len(clips) >= max_clips:
                return clips
            clips.append(_load_clip(clip_id, data, sample_rate_hz))
    if not clips:
        raise StorageError(f"{root}: split '{split}' holds no noise clips")
    return clips
