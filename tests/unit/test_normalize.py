import re
import unicodedata

import pytest

from raytrain_speech.data import normalize as normalize_module
from raytrain_speech.data.normalize import NORMALIZERS, normalize

ZWNJ = "\u200c"

LATIN = [
    ("¿Qué tal, Señor Núñez?", "qué tal señor núñez"),
    ("Que\u0301 tal", "qué tal"),  # decomposed accent composed by NFKC
    ("L'été, c'est l'œuvre !", "l'été c'est l'œuvre"),
    ("L\u2019été, c\u02bcest", "l'été c'est"),  # curly and modifier apostrophes become ASCII
    ("ﬁne", "fine"),
    ("ＡＢＣ １２３", "abc 123"),
    ("'quoted' and rock 'n' roll", "quoted and rock n roll"),
    ("the dogs' bone", "the dogs bone"),
    ("well-known a+b=c $5 50% 3.5", "well known a b c 5 50 3 5"),
    ("tab\tand\n\nnewline  ", "tab and newline"),
    ("soft\u00adhyphen zero\u200bwidth \ufeffbom \u200eltr", "softhyphen zerowidth bom ltr"),
    ("hi 👍! 👨\u200d👩\u200d👧", "hi"),
]
GERMAN = [
    ("Die Straße ist groß.", "die straße ist groß"),
    ("GROẞE STRAẞE", "große straße"),  # capital sharp s lower-cases to ß, not "ss"
]
CYRILLIC = [
    ("Привет, Мир! Ёлка.", "привет мир ёлка"),
    ("Пам’ять", "пам'ять"),
]
CJK = [
    ("你好，世界。", "你好 世界"),
    ("「こんにちは」、世界。", "こんにちは 世界"),
    ("ｶﾀｶﾅ", "カタカナ"),  # half-width katakana to full-width
    ("안녕하세요, 세계!", "안녕하세요 세계"),
]
ARABIC = [
    ("مرحبا، يا عالم؟", "مرحبا يا عالم"),
    ("مَرْحَبًا، يا عَالَم؟", "مَرْحَبًا يا عَالَم"),  # harakat kept
]
DEVANAGARI = [
    ("नमस्ते, दुनिया।", "नमस्ते दुनिया"),
    ("हिन्दी॥", "हिन्दी"),
]
PERSIAN = [
    (f"می{ZWNJ}خواهم.", f"می{ZWNJ}خواهم"),
    (f"کتاب{ZWNJ}ها، خوب!", f"کتاب{ZWNJ}ها خوب"),
    (f"سلام{ZWNJ}! {ZWNJ}خوب", "سلام خوب"),  # joiners that join nothing are dropped
]
THAI = [("สวัสดีครับ!", "สวัสดีครับ")]
BASIC = LATIN + GERMAN + CYRILLIC + CJK + ARABIC + DEVANAGARI + PERSIAN + THAI


@pytest.mark.parametrize(
    ("text", "expected"),
    [pytest.param(*case, id=name) for name, table in (
        ("latin", LATIN), ("german", GERMAN), ("cyrillic", CYRILLIC), ("cjk", CJK), ("arabic", ARABIC),
        ("devanagari", DEVANAGARI), ("persian", PERSIAN), ("thai", THAI),
    ) for case in table],
)  # fmt: skip
def test_basic(text, expected):
    assert normalize(text, "basic") == expected


@pytest.mark.parametrize(("text", "expected"), DEVANAGARI + ARABIC[1:] + THAI + PERSIAN[:2])
def test_basic_keeps_every_mark_and_joiner(text, expected):
    def kept(s):
        return [c for c in s if unicodedata.category(c)[0] == "M" or c == ZWNJ]

    assert kept(normalize(text, "basic")) == kept(text) != []


NONE = [
    ("Hello,  World!\n", "Hello, World!"),
    ("  Café\tau lait. ", "Café au lait."),
    ("e\u0301", "é"),
    ("ﬁ ＡＢＣ", "ﬁ ＡＢＣ"),  # NFC, not NFKC
    ("It's 5 O'Clock.", "It's 5 O'Clock."),
]


@pytest.mark.parametrize(("text", "expected"), NONE)
def test_none(text, expected):
    assert normalize(text, "none") == expected


SAME = [
    ("It's 5 o'clock.", "it is five o'clock"),
    ("The colour is grey", "the color is gray"),
    ("I won't go", "I will not go"),
    ("I can't, we don't", "i can not we do not"),
    ("50%", "fifty percent"),
    ("1,250 people", "one thousand two hundred fifty people"),
    ("the 21st of May", "the twenty first of may"),
    ("3.5", "three point five"),
    ("Mr Smith", "mister smith"),
    ("Mrs. Jones and Dr. Who", "missus jones and doctor who"),
    ("OK", "okay"),
    ("We’re here; they'll see", "we are here they will see"),
    ("Colours realised, travelled to the centre", "colors realized traveled to the center"),
]
DIFFERENT = [
    ("colour", "collar"),
    ("3.5", "35"),
    ("1st", "1"),
    ("mr", "mrs"),
    ("won't", "want"),
    ("John's car", "John is car"),  # possessive 's is not expanded
    ("st paul", "saint paul"),
]


@pytest.mark.parametrize(("reference", "hypothesis"), SAME)
def test_english_equal(reference, hypothesis):
    assert normalize(reference, "english") == normalize(hypothesis, "english")


@pytest.mark.parametrize(("reference", "hypothesis"), DIFFERENT)
def test_english_different(reference, hypothesis):
    assert normalize(reference, "english") != normalize(hypothesis, "english")


ENGLISH = [
    ("0", "zero"), ("7", "seven"), ("13", "thirteen"), ("20", "twenty"), ("21", "twenty one"),
    ("100", "one hundred"), ("105", "one hundred five"), ("110", "one hundred ten"),
    ("1000", "one thousand"), ("1001", "one thousand one"), ("1,000,000", "one million"),
    ("1234567", "one million two hundred thirty four thousand five hundred sixty seven"),
    ("999,999,999,999", "nine hundred ninety nine billion nine hundred ninety nine million "
                        "nine hundred ninety nine thousand nine hundred ninety nine"),
    ("1000000000000", "one" + " zero" * 12),
    ("007", "zero zero seven"),
    ("1,2345", "one two thousand three hundred forty five"),
    ("1st 2nd 3rd 4th", "first second third fourth"),
    ("11th 12th 20th 21st 100th 101st", "eleventh twelfth twentieth twenty first one hundredth one hundred first"),
    ("1,000th", "one thousandth"),
    ("0.25", "zero point two five"), ("3.14", "three point one four"),
    ("3.5%", "three point five percent"), ("100 %", "one hundred percent"),
    ("1.2.3", "one two three"), ("5:30", "five thirty"), ("mp3", "mp three"),
    ("won't can't shan't let's", "will not can not shall not let us"),
    ("it's that's what's there's he's she's", "it is that is what is there is he is she is"),
    ("isn't couldn't wouldn't've", "is not could not would not have"),
    ("you're we'll i've i'm she'd", "you are we will i have i am she would"),
    ("ain't", "ain't"), ("John's car", "john's car"), ("o'clock", "o'clock"),
    ("WON\u2019T", "will not"), ("colour's", "color's"),
    ("St. Paul", "st paul"), ("okay", "okay"), ("Dr.", "doctor"),
    ("Favourite programme!", "favorite program"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), ENGLISH)
def test_english(text, expected):
    assert normalize(text, "english") == expected


def test_english_includes_basic():
    for text, expected in CYRILLIC + CJK + ARABIC + DEVANAGARI + PERSIAN:
        assert normalize(text, "english") == expected


def test_spelling_table_does_not_chain():
    for table in (normalize_module._SPELLINGS, normalize_module._SPOKEN):
        assert not set(table.values()) & set(table), "a rewrite target is itself rewritten"
    assert len(normalize_module._SPELLINGS) >= 60


ALL_INPUTS = sorted({t for table in (BASIC, NONE, SAME, DIFFERENT, ENGLISH) for pair in table for t in pair})


@pytest.mark.parametrize("kind", NORMALIZERS)
@pytest.mark.parametrize("text", ALL_INPUTS)
def test_idempotent(text, kind):
    once = normalize(text, kind)
    assert normalize(once, kind) == once


@pytest.mark.parametrize("kind", NORMALIZERS)
def test_idempotent_over_planes_0_to_2(kind):
    # Planes 0-2 (every script, symbols, emoji, most CJK), in runs of 16 joined by apostrophes
    # (exercising the in-word apostrophe rule). All of Unicode was checked once by hand (2 min).
    points = [chr(i) for i in range(0x30000) if not 0xD800 <= i < 0xE000]
    bad = []
    for start in range(0, len(points), 16):
        text = "'".join(points[start : start + 16])
        once = normalize(text, kind)
        if normalize(once, kind) != once:
            bad.append(ascii(text))
    assert bad == []


@pytest.mark.parametrize("kind", NORMALIZERS)
def test_empty_and_blank(kind):
    assert normalize("", kind) == normalize(" \t\n", kind) == ""


def test_normalizer_names():
    assert NORMALIZERS == ("none", "basic", "english")


@pytest.mark.parametrize("kind", ["whisper", "Basic", "", "english "])
def test_unknown_kind(kind):
    with pytest.raises(ValueError, match=re.escape(f"unknown normalizer {kind!r}")) as info:
        normalize("text", kind)
    assert all(name in str(info.value) for name in NORMALIZERS)
