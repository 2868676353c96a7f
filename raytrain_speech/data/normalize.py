"""Transcript normalisers: ``none``, ``basic`` (any script) and ``english``.

Why three. A normaliser is used in two places with different goals. ``text.normalizer`` is applied to
training *targets*: it decides what the model learns to write, so a cased, punctuated model (Whisper
style) wants ``none`` while a CTC character model wants a small alphabet (``basic``). ``eval.normalizer``
is applied to *both* the reference and the hypothesis before WER, so that differences nobody would call
a recognition error (case, punctuation, "colour"/"color", "5"/"five") are not counted. ``english`` exists
for scoring English; its rewrites (numbers to words, American spelling) would be wrong for other
languages, which is why ``basic`` stops at script-neutral steps. Whisper's ``EnglishTextNormalizer`` is
the inspiration; this is not a copy (Whisper turns number words into digits and expands every ``'s``;
this module does the reverse and leaves possessives alone). All three are idempotent.

``none``
  1. Unicode NFC (``"e\\u0301"`` becomes ``"é"``; compatibility characters such as ``"ﬁ"`` are kept).
  2. Every run of whitespace becomes one space; leading and trailing whitespace is stripped.
  Case and punctuation are kept.

``basic`` (any script; no word segmentation, so CJK and Thai text stays as written)
  1. Unicode NFKC (ligatures, full-width and half-width forms, superscripts become plain characters).
  2. ``str.lower()``.
  3. Control and format characters (categories Cc, Cf) are deleted (not replaced by a space), except
     whitespace and U+200C ZERO WIDTH NON-JOINER / U+200D ZERO WIDTH JOINER, which spell Persian and
     Indic words; U+200B ZERO WIDTH SPACE, soft hyphens, bidi marks and BOMs go.
  4. The apostrophes ``'``, U+2019 ``’`` and U+02BC ``ʼ`` become ASCII ``'``.
  5. An apostrophe stays only between two letters, marks or digits (``l'été``, ``c'est``, ``пам'ять``);
     any other apostrophe, and every character whose category starts with P (punctuation) or S
     (symbols: ``+ = $ % °``, emoji...), becomes a space. Letters (L*), marks (M*: Devanagari vowel
     signs, Arabic harakat, Thai vowels) and numbers (N*) are kept; digits stay digits.
  6. ZWNJ/ZWJ runs next to a space or at either end are deleted (they join nothing; e.g. emoji ZWJ
     sequences after step 5).
  7. Whitespace is collapsed to single spaces and stripped.

``english``: ``basic`` with four rewrites added, in this order
  1. NFKC, ``str.lower()``, control/format deletion and apostrophe unification (``basic`` steps 1-4).
  2. Numbers, before any punctuation is removed, all on ASCII digits, each result padded with spaces:
     a. thousands separators are removed inside numbers written with comma groups of three
        (``1,000`` and ``12,345,678``; not ``1,2345`` or ``1,000,00``);
     b. decimals ``3.5`` become ``three point five`` (integer part as in d, the fraction digit by digit:
        ``3.14`` is ``three point one four``); ``1.2.3`` is not a decimal;
     c. ordinals ``<digits>st|nd|rd|th`` become ordinal words: ``1st`` first, ``2nd`` second,
        ``21st`` twenty first, ``12th`` twelfth, ``100th`` one hundredth;
     d. ``%`` becomes `` percent``; then every remaining digit run becomes words: 0 to
        999,999,999,999 in English without "and" or hyphens (``twenty one``, ``one hundred five``,
        ``one thousand two hundred fifty``); longer runs, and runs with a leading zero (``007``), are
        spelled digit by digit (``zero zero seven``).
  3. Contractions, in this order: won't -> will not, can't -> can not, shan't -> shall not,
     let's -> let us, it's/that's/what's/there's/he's/she's -> "<word> is", any other n't -> " not"
     (ain't is left as is), 're -> " are", 'll -> " will", 've -> " have", 'm -> " am",
     'd -> " would". Any other ``'s`` (possessive) is left alone.
  4. ``basic`` steps 5-7 (punctuation and symbols to spaces, edge joiners, whitespace).
  5. British -> American spelling, word by word, from ``_SPELLINGS`` below (only the forms listed);
     a word is a run of characters other than whitespace and ``'``, so ``colour's`` becomes ``color's``.
  6. Spoken forms, word by word: mr -> mister, mrs -> missus, dr -> doctor, ok -> okay. ``st`` is left
     alone (saint or street).
  7. Whitespace is collapsed to single spaces and stripped.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable

__all__ = ["NORMALIZERS", "normalize"]

NORMALIZERS = ("none", "basic", "english")

_SPACES = re.compile(r"\s+")
_APOSTROPHES = "\u2019\u02bc"  # turned into ASCII "'"
_JOINERS = "\u200c\u200d"  # ZWNJ, ZWJ: part of Persian and Indic spelling
_EDGE_JOINERS = re.compile(r"(?:^|(?<=\s))[\u200c\u200d]+|[\u200c\u200d]+(?=\s|$)")
_WORD = re.compile(r"[^\s']+")

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen"
).split()
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_SCALES = ((10**9, "billion"), (10**6, "million"), (10**3, "thousand"), (1, ""))
_MAX_SPOKEN = 999_999_999_999
_ORDINAL_WORDS = {
    "one": "first", "two": "second", "three": "third", "five": "fifth",
    "eight": "eighth", "nine": "ninth", "twelve": "twelfth",
}  # fmt: skip

_THOUSANDS = re.compile(r"(?<![0-9.,])[0-9]{1,3}(?:,[0-9]{3})+(?!,?[0-9])")
_DECIMAL = re.compile(r"(?<![0-9.])([0-9]+)\.([0-9]+)(?!\.?[0-9])")
_ORDINAL = re.compile(r"(?<![0-9])([0-9]+)(?:st|nd|rd|th)\b")
_INTEGER = re.compile(r"[0-9]+")

_CONTRACTIONS = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (r"\bwon't\b", "will not"),
        (r"\bcan't\b", "can not"),
        (r"\bshan't\b", "shall not"),
        (r"\blet's\b", "let us"),
        (r"\b(it|that|what|there|he|she)'s\b", r"\1 is"),
        (r"(?<=\w)(?<!\bai)n't\b", " not"),
        (r"(?<=\w)'re\b", " are"),
        (r"(?<=\w)'ll\b", " will"),
        (r"(?<=\w)'ve\b", " have"),
        (r"(?<=\w)'m\b", " am"),
        (r"(?<=\w)'d\b", " would"),
    )
)

# British -> American. Only the forms listed are rewritten; no value may also be a key (idempotence).
_SPELLINGS = {
    "colour": "color", "colours": "colors", "coloured": "colored", "colouring": "coloring",
    "favour": "favor", "favours": "favors", "favoured": "favored",
    "favourite": "favorite", "favourites": "favorites",
    "honour": "honor", "honours": "honors", "honoured": "honored",
    "labour": "labor", "humour": "humor", "flavour": "flavor", "flavours": "flavors",
    "harbour": "harbor", "rumour": "rumor", "rumours": "rumors",
    "neighbour": "neighbor", "neighbours": "neighbors", "neighbourhood": "neighborhood",
    "behaviour": "behavior", "behaviours": "behaviors",
    "centre": "center", "centres": "centers", "theatre": "theater", "theatres": "theaters",
    "metre": "meter", "metres": "meters", "litre": "liter", "litres": "liters", "fibre": "fiber",
    "realise": "realize", "realised": "realized", "realises": "realizes", "realising": "realizing",
    "organise": "organize", "organised": "organized", "organises": "organizes",
    "organising": "organizing", "organisation": "organization", "organisations": "organizations",
    "recognise": "recognize", "recognised": "recognized", "recognising": "recognizing",
    "apologise": "apologize", "apologised": "apologized",
    "analyse": "analyze", "analysed": "analyzed", "analysing": "analyzing", "paralyse": "paralyze",
    "travelled": "traveled", "travelling": "traveling", "traveller": "traveler", "travellers": "travelers",
    "cancelled": "canceled", "cancelling": "canceling", "labelled": "labeled", "modelling": "modeling",
    "grey": "gray", "greys": "grays", "programme": "program", "programmes": "programs",
    "defence": "defense", "offence": "offense", "licence": "license", "practise": "practice",
    "catalogue": "catalog", "catalogues": "catalogs", "analogue": "analog",
    "tyre": "tire", "tyres": "tires", "aluminium": "aluminum", "jewellery": "jewelry",
    "cheque": "check", "cheques": "checks", "plough": "plow", "pyjamas": "pajamas",
    "sceptical": "skeptical", "mould": "mold", "manoeuvre": "maneuver", "moustache": "mustache",
    "cosy": "cozy", "draught": "draft", "judgement": "judgment", "ageing": "aging",
    "enrol": "enroll", "fulfil": "fulfill", "skilful": "skillful",
}  # fmt: skip

_SPOKEN = {"mr": "mister", "mrs": "missus", "dr": "doctor", "ok": "okay"}


def _collapse(text: str) -> str:
    return _SPACES.sub(" ", text).strip()


def _prepare(text: str) -> str:
    """NFKC, lower-case, drop control/format characters but ZWNJ/ZWJ, unify apostrophes."""
    # lower(), not casefold(): casefold() rewrites spelling (German "ß" -> "ss", "ſ" -> "s"), so a
    # target "straße" would be learnt as "strasse"; lower() changes case only.
    text = unicodedata.normalize("NFKC", text).lower()
    kept = (c for c in text if c.isspace() or c in _JOINERS or unicodedata.category(c) not in ("Cc", "Cf"))
    return "".join("'" if c in _APOSTROPHES else c for c in kept)


def _is_word_char(text: str, index: int) -> bool:
    return 0 <= index < len(text) and unicodedata.category(text[index])[0] in "LMN"


def _strip_punctuation(text: str) -> str:
    """P* and S* to spaces, an in-word apostrophe kept; then edge joiners dropped, spaces collapsed."""
    out = []
    for index, char in enumerate(text):
        if char == "'":
            inside = _is_word_char(text, index - 1) and _is_word_char(text, index + 1)
            out.append("'" if inside else " ")
        elif unicodedata.category(char)[0] in "PS":
            out.append(" ")
        else:
            out.append(char)
    return _collapse(_EDGE_JOINERS.sub("", "".join(out)))


def _below_thousand(number: int) -> list[str]:
    hundreds, rest = divmod(number, 100)
    words = [_ONES[hundreds], "hundred"] if hundreds else []
    if rest >= 20:
        tens, ones = divmod(rest, 10)
        words.append(_TENS[tens])
        if ones:
            words.append(_ONES[ones])
    elif rest:
        words.append(_ONES[rest])
    return words


def _cardinal(number: int) -> str:
    """0 <= number <= _MAX_SPOKEN in words: no "and", no hyphens."""
    if number == 0:
        return "zero"
    words: list[str] = []
    for scale, name in _SCALES:
        chunk, number = divmod(number, scale)
        if chunk:
            words += _below_thousand(chunk) + ([name] if name else [])
    return " ".join(words)


def _spell(digits: str) -> str:
    """A digit run in words; digit by digit past _MAX_SPOKEN or with a leading zero."""
    if (len(digits) > 1 and digits[0] == "0") or int(digits) > _MAX_SPOKEN:
        return " ".join(_ONES[int(d)] for d in digits)
    return _cardinal(int(digits))


def _ordinal(digits: str) -> str:
    head, _, last = _spell(digits).rpartition(" ")
    if last in _ORDINAL_WORDS:
        last = _ORDINAL_WORDS[last]
    elif last.endswith("y"):
        last = last[:-1] + "ieth"
    else:
        last += "th"
    return f"{head} {last}".strip()


def _numbers(text: str) -> str:
    text = _THOUSANDS.sub(lambda m: m[0].replace(",", ""), text)
    text = _DECIMAL.sub(lambda m: f" {_spell(m[1])} point {' '.join(_ONES[int(d)] for d in m[2])} ", text)
    text = _ORDINAL.sub(lambda m: f" {_ordinal(m[1])} ", text)
    text = text.replace("%", " percent ")
    return _INTEGER.sub(lambda m: f" {_spell(m[0])} ", text)


def _contractions(text: str) -> str:
    for pattern, replacement in _CONTRACTIONS:
        text = pattern.sub(replacement, text)
    return text


def _none(text: str) -> str:
    return _collapse(unicodedata.normalize("NFC", text))


def _basic(text: str) -> str:
    return _strip_punctuation(_prepare(text))


def _english(text: str) -> str:
    text = _strip_punctuation(_contractions(_numbers(_prepare(text))))
    text = _WORD.sub(lambda m: _SPELLINGS.get(m[0], m[0]), text)
    text = _WORD.sub(lambda m: _SPOKEN.get(m[0], m[0]), text)
    return _collapse(text)


_FUNCTIONS: dict[str, Callable[[str], str]] = {"none": _none, "basic": _basic, "english": _english}


def normalize(text: str, kind: str) -> str:
    """Normalise ``text`` with the normaliser ``kind`` (one of ``NORMALIZERS``; see the module doc)."""
    if kind not in NORMALIZERS:
        raise ValueError(f"unknown normalizer {kind!r}; expected one of: {', '.join(NORMALIZERS)}")
    return _FUNCTIONS[kind](text)
