"""Synthesized speech corpus for the embedded demo and the tests (espeak-ng through ctypes).

Why synthesize: the demo and CI must run with no downloads beyond package registries, on real
audio with a real train/test gap. espeak-ng ships as a wheel (``espeakng-loader``); we drive
libespeak-ng directly with ctypes. A *speaker* is an accent x voice variant with its own base pitch,
pitch range and speaking rate; utterances jitter rate and pitch around that. Dev and test use
speakers (accent+variant combinations) and sentences that training never sees.

Optionally (``SynthConfig.second_language``, e.g. "es") a fixed share of every split is spoken in a
second language by its own speakers and words, so that evaluation's per-language WER table has a
second row; the default is English only and gives the same specs and audio as before the option.

Optionally (``SynthConfig.punctuation``) transcripts are written text rather than lower-case words:
sentence case, sometimes a comma, a full stop or a question mark (sometimes led by a question word);
English sentences sometimes hold a number in digits ("25", "300", "1999"), Spanish ones use accented
words too (``WORDS_ES_ACCENTED``) and are wrapped "¿...?" or "¡...!" when they ask or exclaim. espeak
is given exactly the transcript: it reads digits as numbers and pauses or rises at the punctuation.
The words, speakers and prosody are drawn exactly as without the option, and the choices of how to
write them come from a stream of their own, so the written corpus is the default corpus, decorated:
the same utterances, with the same words apart from the inserted number or question word and the
Spanish words swapped for accented ones. Off (the default), specs, audio and manifest are as before.

Everything is a function of ``SynthConfig.seed``: the same config gives the same audio bytes.
"""

from __future__ import annotations

import ctypes
import math
import multiprocessing
import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from raytrain_speech.config import StorageConfig, SynthConfig, require, to_dict
from raytrain_speech.data import audio, shards
from raytrain_speech.data.words import WORDS, WORDS_ES, WORDS_ES_ACCENTED

ACCENTS = ("en", "en-us", "en-029", "en-gb-scotland", "en-gb-x-rp", "en-us-nyc", "en-gb-x-gbclan",
           "en-gb-x-gbcwmd")
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5", "klatt",
            "klatt2", "klatt3", "klatt4", "Andy", "Annie", "adam", "anika", "boris", "caleb", "david",
            "edward", "ian", "iven", "john", "linda", "max", "Michael", "norbert", "steph", "travis",
            "victor", "paul", "robert", "quincy", "shelby", "benjamin", "belinda", "aunty", "grandpa")
SPLITS = ("train", "dev", "test")
ACCENT_SPLIT = "test_accents"
"""Split whose speakers all have an accent (``SynthConfig.heldout_accents``) no other split has."""


@dataclass(frozen=True)
class Language:
    """A language of the corpus: its code (the shards' ``language`` column), espeak accents and words."""

    code: str
    accents: tuple[str, ...]
    words: tuple[str, ...]


ENGLISH = Language("en", ACCENTS, WORDS)
SECOND_LANGUAGES = {
    "es": Language("es", ("es", "es-419"), WORDS_ES),  # Spain and Latin America
}
"""Supported ``SynthConfig.second_language`` values; their accents never overlap English's, so speaker
names (``<accent>+<variant>``) are unique across languages."""


def check_config(cfg: SynthConfig) -> None:
    """The checks of a SynthConfig against the voice inventory (its own field ranges are checked when
    it is loaded): enough accent x variant combinations for the speakers asked for, a known second
    language with enough voices of its own."""
    unknown = [a for a in cfg.heldout_accents if a not in ACCENTS]
    require(not unknown, "synth.heldout_accents", f"unknown accents {unknown}: choose among {', '.join(ACCENTS)}")
    require(len(set(cfg.heldout_accents)) < len(ACCENTS), "synth.heldout_accents", "must leave one accent")
    n_combos = (len(ACCENTS) - len(set(cfg.heldout_accents))) * len(VARIANTS)
    need = cfg.train_speakers + 2 * cfg.heldout_speakers
    require(need <= n_combos, "synth.train_speakers",
            f"train_speakers + 2*heldout_speakers must be <= {n_combos} voice combinations "
            "(accents not held out x variants)")
    n_held = len(set(cfg.heldout_accents)) * len(VARIANTS)
    require(cfg.heldout_speakers <= n_held or not n_held, "synth.heldout_speakers", f"must be <= {n_held} held-out voices")
    supported = ", ".join(repr(code) for code in sorted(SECOND_LANGUAGES))
    require(cfg.second_language in ("", *SECOND_LANGUAGES), "synth.second_language",
            f"unknown language {cfg.second_language!r}: must be '' (English only) or one of {supported}")
    if cfg.second_language:
        n_second = len(SECOND_LANGUAGES[cfg.second_language].accents) * len(VARIANTS)
        require(2 * cfg.heldout_speakers < n_second, "synth.heldout_speakers",
                f"2*heldout_speakers must be < {n_second} {cfg.second_language!r} voice combinations "
                "(dev and test each need their own speakers and train at least one)")


def splits(cfg: SynthConfig) -> tuple[str, ...]:
    """The corpus's splits: train, dev, test, and test_accents when accents are held out."""
    return SPLITS + ((ACCENT_SPLIT,) if cfg.heldout_accents else ())


def languages(cfg: SynthConfig) -> tuple[Language, ...]:
    """English, then the second language if any."""
    return (ENGLISH,) + ((SECOND_LANGUAGES[cfg.second_language],) if cfg.second_language else ())


@dataclass(frozen=True)
class Speaker:
    name: str
    voice: str
    pitch: int
    pitch_range: int
    rate_wpm: int
    language: str = "en"


@dataclass(frozen=True)
class UtteranceSpec:
    index: int
    split: str
    text: str
    speaker: Speaker
    rate_wpm: int
    pitch: int
    lead_s: float
    tail_s: float
    gain: float
    seed: int

    @property
    def id(self) -> str:
        return f"{self.split}-{self.index:06d}"

    @property
    def language(self) -> str:
        return self.speaker.language


def _rng(cfg: SynthConfig, stream: str, lang: Language) -> random.Random:
    """English keeps the streams it had before there was a second language; others get their own."""
    return random.Random(f"{cfg.seed}/{stream}" if lang is ENGLISH else f"{cfg.seed}/{stream}/{lang.code}")


def make_speakers(cfg: SynthConfig) -> dict[str, list[Speaker]]:
    """Draw speakers without replacement from accent x variant so splits share no voice.

    Each language draws from its own accents with its own random stream (English's is the one it always
    had). The second language has ``heldout_speakers`` in dev and in test like English, and in train
    ``train_speakers`` or as many as its remaining voice combinations allow. English speakers come first
    in each split's list.

    Accents in ``heldout_accents`` have no train, dev or test voice; ``heldout_speakers`` of their voices,
    drawn from a stream of their own, speak ``test_accents``.
    """
    out: dict[str, list[Speaker]] = {split: [] for split in ("dev", "test", "train")}
    held = set(cfg.heldout_accents)
    if held:
        rng = _rng(cfg, "speakers/heldout_accents", ENGLISH)
        combos = [(a, v) for a in ACCENTS if a in held for v in VARIANTS]
        rng.shuffle(combos)
        out[ACCENT_SPLIT] = [Speaker(f"{a}+{v}", f"{a}+{v}", rng.randint(*cfg.pitch), rng.randint(30, 90),
                                     rng.randint(*cfg.rate_wpm), ENGLISH.code)
                             for a, v in combos[: cfg.heldout_speakers]]
    for lang in languages(cfg):
        rng = _rng(cfg, "speakers", lang)
        combos = [(a, v) for a in lang.accents if a not in held for v in VARIANTS]
        rng.shuffle(combos)
        n_train = min(cfg.train_speakers, len(combos) - 2 * cfg.heldout_speakers)
        counts = {"dev": cfg.heldout_speakers, "test": cfg.heldout_speakers, "train": n_train}
        pos = 0
        for split in ("dev", "test", "train"):
            for accent, variant in combos[pos: pos + counts[split]]:
                pitch = rng.randint(*cfg.pitch)
                rate = rng.randint(*cfg.rate_wpm)
                out[split].append(Speaker(f"{accent}+{variant}", f"{accent}+{variant}", pitch,
                                          rng.randint(30, 90), rate, lang.code))
            pos += counts[split]
    return out


PUNCTUATION_STREAM = "punctuation"
"""Random stream (per split and language) of the written form's choices: drawing them never moves the
streams that pick words, speakers and prosody."""
QUESTION_SHARE = 0.25
"""Share of sentences written as questions (in Spanish, another ``EXCLAMATION_SHARE`` exclaim)."""
EXCLAMATION_SHARE = 0.15
QUESTION_WORD_SHARE = 0.5
"""Share of questions led by an added question word."""
COMMA_SHARE = 0.3
"""Share of sentences of four words or more with a comma inside (two words or more on each side)."""
NUMBER_SHARE = 0.3
"""Share of English sentences with an added number in digits."""
QUESTION_WORDS = {"en": ("what", "when", "why"), "es": ("cómo", "cuándo", "cuánto", "quién")}
"""Question words that may lead a question: all in the language's written vocabulary."""
NUMBER_WORDS = frozenset(WORDS) & frozenset(
    "zero one two three four five six seven eight nine ten eleven twelve hundred thousand and".split())
"""Words of ``WORDS`` that espeak could merge with an adjacent number ("300 five" is read as "305")."""


def _number(rng: random.Random) -> str:
    """13-99, a few hundred, or a year. Never 0-12: their spoken forms ("five", "twelve") are words of
    ``WORDS``, and the same sound must not be written sometimes as a word and sometimes in digits."""
    kind = rng.random()
    if kind < 0.4:
        return str(rng.randint(13, 99))
    if kind < 0.7:
        return str(rng.randint(1, 9) * 100 + (rng.randint(1, 99) if rng.random() < 0.5 else 0))
    return str(rng.randint(1900, 2029))


def _add_comma(words: list[str], rng: random.Random) -> None:
    if len(words) >= 4 and rng.random() < COMMA_SHARE:
        words[rng.randrange(1, len(words) - 2)] += ","


def _sentence_case(text: str) -> str:
    return text[:1].upper() + text[1:]


def _write_english(words: Sequence[str], rng: random.Random) -> str:
    words = list(words)
    question = rng.random() < QUESTION_SHARE
    if rng.random() < NUMBER_SHARE:
        slots = [i for i in range(len(words) + 1) if not NUMBER_WORDS.intersection(words[max(0, i - 1): i + 1])]
        if slots:
            words.insert(rng.choice(slots), _number(rng))
    if question and rng.random() < QUESTION_WORD_SHARE:
        words.insert(0, rng.choice(QUESTION_WORDS["en"]))
    _add_comma(words, rng)
    return _sentence_case(" ".join(words)) + ("?" if question else ".")


def _write_spanish(words: Sequence[str], rng: random.Random) -> str:
    # Each word is swapped for an accented one with the accented list's share of both lists, so that the
    # words of a written Spanish sentence are uniform over WORDS_ES + WORDS_ES_ACCENTED.
    share = len(WORDS_ES_ACCENTED) / (len(WORDS_ES) + len(WORDS_ES_ACCENTED))
    words = [rng.choice(WORDS_ES_ACCENTED) if rng.random() < share else w for w in words]
    kind = rng.random()
    question = kind < QUESTION_SHARE
    exclamation = not question and kind < QUESTION_SHARE + EXCLAMATION_SHARE
    if question and rng.random() < QUESTION_WORD_SHARE:
        words.insert(0, rng.choice(QUESTION_WORDS["es"]))
    _add_comma(words, rng)
    text = _sentence_case(" ".join(words))
    return f"¿{text}?" if question else f"¡{text}!" if exclamation else f"{text}."


WRITERS: dict[str, Callable[[Sequence[str], random.Random], str]] = {"en": _write_english, "es": _write_spanish}
"""The written form of a sentence's words, per language (``SynthConfig.punctuation``)."""


def spoken_words(text: str) -> str:
    """A transcript without case and punctuation: the words (and numbers) that are heard."""
    return " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())


def _written(lang: Language, words: Sequence[str], rng: random.Random, taken: set[str]) -> str:
    """The written form of ``words``, redrawn until its spoken words are new: an added word could
    otherwise make it sound like another sentence (of another split, even), which held-out splits forbid."""
    for _ in range(1000):
        text = WRITERS[lang.code](words, rng)
        if spoken_words(text) not in taken:
            taken.add(spoken_words(text))
            return text
    raise RuntimeError(f"no new written form of {' '.join(words)!r}")


def _estimate_duration_s(n_words: int, rate_wpm: int) -> float:
    return n_words * 60.0 / rate_wpm * 0.97 + 0.4


def is_second_language(index: int, share: float) -> bool:
    """Whether utterance ``index`` of a split is in the second language: spread evenly, so that any first
    n utterances of a split (and so every split, whatever its size) hold floor(n * share) of them."""
    return math.floor((index + 1) * share) > math.floor(index * share)


def split_utterances(cfg: SynthConfig, split: str) -> int:
    """Utterances of a held-out split; test_accents has as many as test unless set."""
    if split == ACCENT_SPLIT:
        return cfg.test_utterances if cfg.test_accents_utterances is None else cfg.test_accents_utterances
    return getattr(cfg, f"{split}_utterances")


def make_specs(cfg: SynthConfig) -> dict[str, list[UtteranceSpec]]:
    """All utterance specs; held-out sentences are drawn first and excluded from train.

    Each language has its own random stream per split (English's is the one it always had), so English
    only draws for English utterances: with no second language the specs are exactly as before it existed.
    With ``punctuation`` the same words are drawn and then written out from the ``PUNCTUATION_STREAM``
    streams; the train split's size still counts the drawn words, so it holds the same utterances.
    """
    check_config(cfg)
    speakers = make_speakers(cfg)
    langs = languages(cfg)
    used: set[str] = set()
    written: set[str] = set()
    specs: dict[str, list[UtteranceSpec]] = {}
    for split in ("dev", "test", *((ACCENT_SPLIT,) if cfg.heldout_accents else ()), "train"):
        rngs = {lang.code: _rng(cfg, split, lang) for lang in langs}
        punct_rngs = {lang.code: _rng(cfg, f"{PUNCTUATION_STREAM}/{split}", lang) for lang in langs}
        pools = {lang.code: [s for s in speakers[split] if s.language == lang.code] for lang in langs}
        out: list[UtteranceSpec] = []
        total_s = 0.0
        while True:
            if split == "train" and total_s >= cfg.train_hours * 3600:
                break
            if split != "train" and len(out) >= split_utterances(cfg, split):
                break
            lang = langs[-1] if len(langs) > 1 and split != ACCENT_SPLIT and is_second_language(
                len(out), cfg.second_language_share) else ENGLISH
            rng = rngs[lang.code]
            words = rng.choices(lang.words, k=rng.randint(cfg.min_words, cfg.max_words))
            text = " ".join(words)
            if text in used:
                continue
            used.add(text)
            if cfg.punctuation:
                text = _written(lang, words, punct_rngs[lang.code], written)
            spk = rng.choice(pools[lang.code])
            rate = max(80, round(spk.rate_wpm * rng.uniform(0.9, 1.1)))
            pitch = min(99, max(0, spk.pitch + rng.randint(-6, 6)))
            spec = UtteranceSpec(len(out), split, text, spk, rate, pitch, rng.uniform(0.05, 0.3),
                                 rng.uniform(0.05, 0.3), rng.uniform(0.3, 0.9), rng.getrandbits(31))
            out.append(spec)
            total_s += _estimate_duration_s(len(words), rate)
        specs[split] = out
    return specs


class Espeak:
    """Synchronous libespeak-ng bound through ctypes; one instance per process (the library is global)."""

    AUDIO_OUTPUT_SYNCHRONOUS = 2
    RATE, VOLUME, PITCH, RANGE = 1, 2, 3, 4
    CHARS_UTF8 = 1
    _CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

    def __init__(self):
        import espeakng_loader

        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self.data_path = espeakng_loader.get_data_path()
        self.sample_rate_hz = self.lib.espeak_Initialize(
            self.AUDIO_OUTPUT_SYNCHRONOUS, 0, self.data_path.encode(), 0)
        if self.sample_rate_hz <= 0:
            raise RuntimeError(f"espeak-ng failed to initialise with data at {self.data_path}")
        self._chunks: list[np.ndarray] = []
        self._cb = self._CALLBACK(self._on_audio)  # keep a reference: ctypes does not
        self.lib.espeak_SetSynthCallback(self._cb)

    def _on_audio(self, wav, n, _events) -> int:
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0

    class _Voice(ctypes.Structure):  # espeak_VOICE
        _fields_ = [("name", ctypes.c_char_p), ("languages", ctypes.c_char_p), ("identifier", ctypes.c_char_p),
                    ("gender", ctypes.c_ubyte), ("age", ctypes.c_ubyte), ("variant", ctypes.c_ubyte),
                    ("xx1", ctypes.c_ubyte), ("score", ctypes.c_int), ("spare", ctypes.c_void_p)]

    def current_voice(self) -> tuple[str, str]:
        """(name, language) of the voice last selected, e.g. ("Spanish (Latin America)", "es-419")."""
        self.lib.espeak_GetCurrentVoice.restype = ctypes.POINTER(self._Voice)
        voice = self.lib.espeak_GetCurrentVoice().contents
        return voice.name.decode(), voice.languages[1:].decode()  # languages starts with a priority byte

    def has_variant(self, variant: str) -> bool:
        return os.path.exists(os.path.join(self.data_path, "voices", "!v", variant))

    def synthesize(self, text: str, voice: str, rate_wpm: int, pitch: int, pitch_range: int,
                   seed: int) -> np.ndarray:
        """int16 samples at ``self.sample_rate_hz``; ``seed`` fixes espeak's internal noise/jitter."""
        self.lib.espeak_ng_SetRandSeed(ctypes.c_long(seed))
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise RuntimeError(f"espeak-ng voice {voice!r} not found")
        for param, value in ((self.RATE, rate_wpm), (self.PITCH, pitch), (self.RANGE, pitch_range)):
            self.lib.espeak_SetParameter(param, int(value), 0)
        self._chunks.clear()
        data = text.encode("utf-8")
        err = self.lib.espeak_Synth(data, len(data) + 1, 0, 0, 0, self.CHARS_UTF8, None, None)
        self.lib.espeak_Synchronize()
        if err != 0 or not self._chunks:
            raise RuntimeError(f"espeak-ng produced no audio for {text!r} (error {err})")
        return np.concatenate(self._chunks)


_ESPEAK: Espeak | None = None


def _espeak() -> Espeak:
    global _ESPEAK
    if _ESPEAK is None:
        _ESPEAK = Espeak()
    return _ESPEAK


def render(spec: UtteranceSpec, sample_rate_hz: int) -> np.ndarray:
    """One utterance as float32 at ``sample_rate_hz`` with its silence padding and gain."""
    engine = _espeak()
    pcm = engine.synthesize(spec.text, spec.speaker.voice, spec.rate_wpm, spec.pitch,
                            spec.speaker.pitch_range, seed=spec.seed)
    wav = audio.resample(pcm.astype(np.float32) / 32768.0, engine.sample_rate_hz, sample_rate_hz)
    peak = float(np.abs(wav).max()) or 1.0
    wav = wav * (spec.gain / peak)
    lead = np.zeros(int(spec.lead_s * sample_rate_hz), np.float32)
    tail = np.zeros(int(spec.tail_s * sample_rate_hz), np.float32)
    return np.concatenate([lead, wav, tail]).astype(np.float32)


def _adopt_environment(environ: dict) -> None:
    """Pool initializer: the caller's environment as of this ``synthesize`` call. A forkserver child
    inherits the server's environment from when it started (the first call in the process), so
    credentials or an endpoint set since then (``AWS_*``) would otherwise be missing in the writers."""
    os.environ.clear()
    os.environ.update(environ)


def _write_shard(job: tuple) -> tuple[str, int, float]:
    import torch

    torch.set_num_threads(1)
    root, relpath, specs, sample_rate_hz, storage_cfg = job
    rows = []
    for spec in specs:
        wav = render(spec, sample_rate_hz)
        rows.append({
            "index": spec.index, "id": spec.id, "audio": audio.encode_flac(wav, sample_rate_hz),
            "sample_rate_hz": sample_rate_hz, "duration_s": len(wav) / sample_rate_hz,
            "text": spec.text, "language": spec.language, "speaker": spec.speaker.name,
        })
    shards.write_shard(root, relpath, shards.rows_to_table(rows), storage_cfg)
    return relpath, len(rows), sum(r["duration_s"] for r in rows)


def check_voices(accents: tuple[str, ...] = ()) -> None:
    """Checks the voice files without loading the library (the parent must stay espeak-free): the
    variants, and the language files of ``accents`` (the second language's; English's are not checked)."""
    import espeakng_loader

    data_path = espeakng_loader.get_data_path()
    variants_dir = os.path.join(data_path, "voices", "!v")
    missing = [v for v in VARIANTS if not os.path.exists(os.path.join(variants_dir, v))]
    if missing:
        raise RuntimeError(f"espeak-ng data lacks voice variants {missing}; reinstall espeakng-loader")
    if accents:
        present = {name.lower() for _, _, files in os.walk(os.path.join(data_path, "lang")) for name in files}
        missing = [a for a in accents if a.lower() not in present]
        if missing:
            raise RuntimeError(f"espeak-ng data lacks voices {missing}; reinstall espeakng-loader")


def _source_config(cfg: SynthConfig) -> dict:
    """The config as the manifest records it; an English-only corpus leaves out the second-language
    fields, and one without punctuation the ``punctuation`` field, so that the default corpus's manifest
    stays byte-identical to one written before they existed."""
    data = to_dict(cfg)
    if not cfg.second_language:
        del data["second_language"], data["second_language_share"]
    if not cfg.punctuation:
        del data["punctuation"]
    if not cfg.heldout_accents:
        del data["heldout_accents"], data["test_accents_utterances"]
    return data


def synthesize(cfg: SynthConfig, out_uri: str, storage_cfg: StorageConfig | None = None,
               log=print) -> shards.Manifest:
    """Render every split to ``out_uri`` as shards, the manifest last (its presence = done); this config's
    corpus already there is returned, any other refused (``workers`` does not change a byte)."""
    found = shards.existing_corpus(out_uri, {"kind": "synth", "config": _source_config(cfg)}, storage_cfg, ("workers",))
    if found is not None:
        log(f"synth: {out_uri} already holds this corpus; nothing written")
        return found
    check_voices(SECOND_LANGUAGES[cfg.second_language].accents if cfg.second_language else ())
    specs = make_specs(cfg)
    jobs = []
    for split in splits(cfg):
        items = specs[split]
        for n in range(math.ceil(len(items) / cfg.shard_utterances)):
            chunk = items[n * cfg.shard_utterances: (n + 1) * cfg.shard_utterances]
            jobs.append((out_uri, shards.shard_name(split, n), chunk, cfg.sample_rate_hz, storage_cfg))
    workers = cfg.workers or os.cpu_count() or 1
    manifest = shards.Manifest(source={"kind": "synth", "config": _source_config(cfg)})
    for split in splits(cfg):
        manifest.splits[split] = shards.SplitInfo()
    # libespeak-ng keeps state between utterances (pitch flutter, wave generator phase) that neither
    # a seed nor re-initialisation resets, so each shard is rendered by a fresh process forked from a
    # clean server: shard bytes then depend only on the config, not on which worker ran what before.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    with ctx.Pool(processes=min(workers, len(jobs)), maxtasksperchild=1, initializer=_adopt_environment,
                  initargs=(dict(os.environ),)) as pool:
        for done, (relpath, n, seconds) in enumerate(pool.imap(_write_shard, jobs), start=1):
            info = manifest.splits[relpath.split("/")[0]]
            info.shards.append(relpath)
            info.utterances.append(n)
            info.hours += seconds / 3600
            log(f"synth: {done}/{len(jobs)} shards ({relpath}, {n} utterances, {seconds / 60:.1f} min)")
    shards.write_manifest(out_uri, manifest, storage_cfg)
    return manifest

