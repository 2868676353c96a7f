"""Phone sequences for the phoneme probe: espeak-ng's own phonemizer, and a corpus's ``phonemes`` column.

Why espeak's phonemizer for synthesized corpora: the audio of a ``synth`` utterance is espeak's rendering
of the phonemes its translator makes of the transcript in the utterance's voice, and
``espeak_TextToPhonemes`` runs that same translator on the same text and voice. So its output is what
was said, not an outside guess, and it can be recomputed for any synth corpus already on disk from
the shards' ``text`` and ``speaker`` columns (a synth speaker's name is its espeak voice); so ``synth``
writes no ``phonemes`` column, and its shards keep the bytes they had before the probe. Phonemes are
IPA, one symbol per phone (espeak's own phoneme boundaries, so "aɪ" and "oʊ" are single phones),
without stress marks; a length mark stays part of its vowel ("iː" differs from "i").

Why a child process: libespeak-ng keeps global state between calls (synth.py renders each shard in a
fresh process for that reason), and the caller may be a process that also renders audio (the tests
do). ``phonemize`` runs one fresh interpreter for the whole list, so phonemizing never changes what
the caller renders and the result depends only on (text, voice). This module imports only the
standard library and ``espeakng_loader``, so that interpreter starts in well under a second.

A corpus that is not synthesized can bring its own labels: a ``phonemes`` column of phone symbols
separated by whitespace (``prepare`` copies one from its manifest; docs/shards.md).
"""

from __future__ import annotations

import ctypes
import json
import re
import subprocess
import sys

STRESS_MARKS = "ˈˌ"
"""IPA primary and secondary stress: prosody on a syllable, not phones of their own."""
SEPARATOR = "_"
"""Between phones of a word in espeak's output (bits 8-23 of its phoneme mode)."""
_NO_STRESS = str.maketrans("", "", STRESS_MARKS)
_IPA = 0x02
_CHARS_UTF8 = 1
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_LANGUAGE_SWITCH = re.compile(r"\([a-z\-]+\)")
"""espeak marks a word read in another language's rules as ``(en)...(es)``: markers, not phones."""


def split_phones(espeak_ipa: str) -> list[str]:
    """espeak's separated IPA (``"h_ə_l_ˈoʊ w_ˈɜː_l_d"``) -> phones (``["h", "ə", "l", "oʊ", ...]``)."""
    text = _LANGUAGE_SWITCH.sub(" ", espeak_ipa)
    phones = []
    for word in text.split():
        for phone in word.split(SEPARATOR):
            phone = phone.translate(_NO_STRESS)
            if phone:
                phones.append(phone)
    return phones


def parse_column(value) -> list[str]:
    """A ``phonemes`` cell (phone symbols separated by whitespace) -> phones; [] for null or empty."""
    return value.split() if isinstance(value, str) else []


class _Phonemizer:
    """libespeak-ng's translator through ctypes, in the process that owns it (the child)."""

    def __init__(self):
        import espeakng_loader

        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        if self.lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0) <= 0:
            raise RuntimeError("espeak-ng failed to initialise")
        self.lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
        self.lib.espeak_TextToPhonemes.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int]

    def __call__(self, text: str, voice: str) -> list[str]:
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"espeak-ng voice {voice!r} not found")
        buf = ctypes.create_string_buffer(text.encode("utf-8"))
        ptr = ctypes.c_void_p(ctypes.addressof(buf))
        clauses = []
        while ptr.value:  # one clause per call; the pointer moves on and is NULL after the last
            out = self.lib.espeak_TextToPhonemes(ctypes.byref(ptr), _CHARS_UTF8, _IPA | (ord(SEPARATOR) << 8))
            clauses.append((out or b"").decode("utf-8", "replace"))
        return split_phones(" ".join(clauses))


def _serve() -> None:
    """Child: stdin JSON [[text, voice], ...] -> stdout JSON [[phones] or "error reason", ...]."""
    items = json.load(sys.stdin)
    phonemizer = _Phonemizer()
    out: list = []
    for text, voice in items:
        try:
            out.append(phonemizer(text, voice))
        except ValueError as err:
            out.append(str(err))
    json.dump(out, sys.stdout)


def phonemize(items: list[tuple[str, str]], timeout_s: float = 600.0) -> list[list[str] | str]:
    """espeak-ng phones of each (text, voice), in one fresh child process; an item that cannot be
    phonemized (unknown voice) gives its reason as a str instead of a list."""
    if not items:
        return []
    proc = subprocess.run([sys.executable, "-m", __name__], input=json.dumps(items), capture_output=True,
                          text=True, timeout=timeout_s)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"espeak-ng phonemizer failed: {tail[0]}")
    return json.loads(proc.stdout)


if __name__ == "__main__":
    _serve()
