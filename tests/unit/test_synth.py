import dataclasses
import hashlib
import re
import unicodedata

import pyarrow.parquet as pq
import pytest

from raytrain_speech.config import ConfigError, SynthConfig
from raytrain_speech.data import audio, shards
from raytrain_speech.data.synth import (
    ACCENTS,
    QUESTION_WORDS,
    SECOND_LANGUAGES,
    VARIANTS,
    _espeak,
    _source_config,
    check_config,
    make_speakers,
    make_specs,
    render,
    spoken_words,
    synthesize,
)
from raytrain_speech.data.words import WORDS, WORDS_ES, WORDS_ES_ACCENTED

SMALL = SynthConfig(train_hours=0.01, dev_utterances=6, test_utterances=8, train_speakers=8, heldout_speakers=2,
                    shard_utterances=10, workers=1)


def test_heldout_speakers_and_sentences_never_in_train():
    specs = make_specs(SynthConfig())
    train_spk = {s.speaker.voice for s in specs["train"]}
    train_txt = {s.text for s in specs["train"]}
    for split in ("dev", "test"):
        assert not train_spk & {s.speaker.voice for s in specs[split]}
        assert not train_txt & {s.text for s in specs[split]}
    lengths = [len(s.text.split()) for s in specs["train"]]
    assert min(lengths) == 3 and max(lengths) == 8
    assert len({s.speaker.voice for s in specs["train"]}) > 100
    assert len({s.rate_wpm for s in specs["train"]}) > 20 and len({s.pitch for s in specs["train"]}) > 20


def test_render_gives_16khz_speech_with_padding_and_gain():
    spec = make_specs(SMALL)["test"][0]
    a = render(spec, 16000)
    assert 0.5 < len(a) / 16000 < 6.0
    assert abs(a).max() == pytest.approx(spec.gain, rel=1e-3)
    lead = int(spec.lead_s * 16000)
    assert not a[:lead].any() and a[lead: lead + 1600].any()


def test_synthesize_writes_shards_and_manifest_deterministically(tmp_path):
    m1 = synthesize(SMALL, str(tmp_path / "a"), log=lambda s: None)
    synthesize(SMALL, str(tmp_path / "b"), log=lambda s: None)
    assert m1.splits.keys() == {"train", "dev", "test", "test_accents"}
    assert m1.splits["dev"].num_utterances == 6
    assert m1.splits["test_accents"].num_utterances == 8  # as many as test unless set
    for split, info in m1.splits.items():
        for rel in info.shards:
            t1 = pq.read_table(tmp_path / "a" / rel)
            t2 = pq.read_table(tmp_path / "b" / rel)
            assert t1.equals(t2)
            assert set(shards.REQUIRED_COLUMNS) <= set(t1.column_names)
            row = t1.slice(0, 1).to_pylist()[0]
            samples, rate = audio.decode(row["audio"])
            assert rate == 16000 and abs(len(samples) / rate - row["duration_s"]) < 1e-3
            assert row["text"] and row["id"].startswith(split)
            assert set(t1["language"].to_pylist()) == {"en"}
    manifest = shards.read_manifest(str(tmp_path / "a"))
    assert "second_language" not in manifest.source["config"]  # English-only manifests are as before
    assert "punctuation" not in manifest.source["config"]  # and so are manifests without punctuation
    assert manifest.splits["test"].num_utterances == 8
    indices = [i for rel in manifest.splits["train"].shards for i in pq.read_table(tmp_path / "a" / rel)["index"].to_pylist()]
    assert indices == list(range(len(indices)))


def _fingerprint(specs, splits=("dev", "test", "train")) -> tuple[int, str]:
    rows = [(s.id, s.split, s.index, s.text, s.speaker.name, s.speaker.voice, s.speaker.pitch, s.speaker.pitch_range,
             s.speaker.rate_wpm, s.rate_wpm, s.pitch, repr(s.lead_s), repr(s.tail_s), repr(s.gain), s.seed)
            for split in splits for s in specs[split]]
    return len(rows), hashlib.sha256(repr(rows).encode()).hexdigest()


def test_english_only_default_specs_are_pinned():
    """Regression pin, computed before the second language existed: existing corpora and recorded
    measurements depend on the default config giving exactly these specs (and so these audio bytes)."""
    small = make_specs(SynthConfig(train_hours=0.05, dev_utterances=10, test_utterances=10, heldout_accents=()))
    assert _fingerprint(small) == (101, "d25df91070c8092267eaa55b21454fe2ba08e2102ff7819c699bef0cc57c59d1")
    assert small["dev"][0].text == "hammer finish zero" and small["dev"][0].speaker.name == "en-gb-x-gbcwmd+m5"
    before = make_specs(SynthConfig(heldout_accents=()))
    assert _fingerprint(before) == (10076, "dc76c9dd801fe25fe809a738ebd02ffff9f998290d2ae6fc0109a3e541e1c04c")
    assert {s.language for split in before.values() for s in split} == {"en"}
    assert "heldout_accents" not in _source_config(SynthConfig(heldout_accents=()))


def test_default_specs_with_a_heldout_accent_are_pinned():
    """Regression pin of the default corpus since it holds out an accent (the demo's, docs/LOG.md)."""
    default = make_specs(SynthConfig())
    assert _fingerprint(default, ("dev", "test", "test_accents", "train")) == (
        10578, "a809aaa437cd0c2ac7e78f541c91d9878bf37677cd99a7908a377d3729bfb712")


def test_heldout_accent_split_has_only_voices_of_accents_no_other_split_has():
    cfg = SynthConfig()
    specs = make_specs(cfg)
    accent_of = lambda spec: spec.speaker.voice.split("+")[0]  # noqa: E731
    held = {accent_of(s) for s in specs["test_accents"]}
    assert held == set(cfg.heldout_accents)
    for split in ("train", "dev", "test"):
        assert not held & {accent_of(s) for s in specs[split]}
    assert len(specs["test_accents"]) == cfg.test_utterances
    assert len({s.speaker.voice for s in specs["test_accents"]}) == cfg.heldout_speakers
    train_txt = {s.text for s in specs["train"]}
    assert not train_txt & {s.text for s in specs["test_accents"]}
    other_heldout = {s.text for split in ("dev", "test") for s in specs[split]}
    assert not other_heldout & {s.text for s in specs["test_accents"]}
    assert len(make_specs(dataclasses.replace(cfg, test_accents_utterances=5))["test_accents"]) == 5


@pytest.mark.parametrize("override", [{"heldout_accents": ("en-gb-moon",)}, {"heldout_accents": ACCENTS}])
def test_heldout_accents_validation(override):
    with pytest.raises(ConfigError, match="synth.heldout_accents"):
        check_config(dataclasses.replace(SynthConfig(), **override))


def test_spanish_word_list_fits_the_alphabet():
    assert len(WORDS_ES) >= 300 and len(set(WORDS_ES)) == len(WORDS_ES)
    assert all(re.fullmatch(r"[a-z']+", w) for w in WORDS_ES)
    assert not set(WORDS_ES) & set(WORDS)


def test_second_language_share_voices_and_words_per_split():
    cfg = SynthConfig(second_language="es", second_language_share=0.25)
    cfg.validate()
    specs = make_specs(cfg)
    es_voices = {f"{a}+{v}" for a in SECOND_LANGUAGES["es"].accents for v in VARIANTS}
    en_voices = {f"{a}+{v}" for a in ACCENTS for v in VARIANTS}
    voices_by_split = {}
    assert {s.language for s in specs["test_accents"]} == {"en"}  # the held-out accents are English ones
    for split, items in ((k, v) for k, v in specs.items() if k != "test_accents"):
        es = [s for s in items if s.language == "es"]
        assert {s.language for s in items} == {"en", "es"}
        assert abs(len(es) / len(items) - 0.25) < 0.01, split
        assert {s.speaker.voice for s in es} <= es_voices
        assert {s.speaker.voice for s in items if s.language == "en"} <= en_voices
        assert all(w in WORDS_ES for s in es for w in s.text.split())
        assert [s.index for s in items] == list(range(len(items)))
        voices_by_split[split] = {s.speaker.voice for s in items}
    assert not voices_by_split["train"] & voices_by_split["dev"]
    assert not voices_by_split["train"] & voices_by_split["test"]
    assert not voices_by_split["dev"] & voices_by_split["test"]
    train_txt = {s.text for s in specs["train"]}
    assert not train_txt & {s.text for split in ("dev", "test") for s in specs[split]}
    speakers = make_speakers(cfg)
    names = [s.name for split in speakers.values() for s in split]
    assert len(names) == len(set(names))
    assert sum(s.language == "es" for s in speakers["dev"]) == cfg.heldout_speakers
    # English utterances draw from English's own random streams, exactly as without the option.
    english_only = make_specs(SynthConfig())
    assert [s.text for s in specs["dev"] if s.language == "en"] == [s.text for s in english_only["dev"][:150]]


@pytest.mark.parametrize("override, key", [
    ({"second_language": "fr"}, "synth.second_language"),
    ({"second_language": "es", "second_language_share": 0.0}, "synth.second_language_share"),
    ({"second_language": "es", "second_language_share": 1.0}, "synth.second_language_share"),
    ({"second_language": "es", "train_speakers": 8, "heldout_speakers": 43}, "synth.heldout_speakers"),
])
def test_second_language_validation(override, key):
    with pytest.raises(ConfigError, match=key) as err:
        cfg = SynthConfig(**override)
        cfg.validate()  # field ranges (when the config is loaded)
        check_config(cfg)  # against the voice inventory (when specs are drawn)
    if key == "synth.second_language":
        assert "'es'" in str(err.value)


def test_spanish_voices_render_and_shards_record_the_language(tmp_path):
    cfg = dataclasses.replace(SMALL, dev_utterances=10, test_utterances=10, second_language="es",
                              heldout_accents=())  # a corpus as before the accent split: train, dev, test
    es_specs = [s for split in make_specs(cfg).values() for s in split if s.language == "es"]
    for accent in SECOND_LANGUAGES["es"].accents:  # espeak resolves both Spanish voices to Spanish
        spec = next(s for s in es_specs if s.speaker.voice.split("+")[0] == accent)
        a = render(spec, 16000)
        assert 0.5 < len(a) / 16000 < 8.0 and abs(a).max() == pytest.approx(spec.gain, rel=1e-3)
        name, language = _espeak().current_voice()
        assert name.startswith("Spanish") and language == accent
    manifest = synthesize(cfg, str(tmp_path), log=lambda s: None)
    assert manifest.source["config"]["second_language"] == "es"
    for split, info in manifest.splits.items():
        rows = [r for rel in info.shards for r in shards.read_shard(str(tmp_path / rel)).to_pylist()]
        es = [r for r in rows if r["language"] == "es"]
        assert es and {r["language"] for r in rows} == {"en", "es"}, split
        assert all(r["speaker"].split("+")[0] in SECOND_LANGUAGES["es"].accents for r in es)
        assert all(r["duration_s"] > 0.5 for r in es)
    assert len(es) == 2  # test: floor(10 * 0.2)


def test_shard_writers_see_the_environment_of_this_call(s3_endpoint, s3fs_client, tmp_path, monkeypatch):
    """Writers are forked from a server started by the first call in the process; an endpoint (or
    credentials) set in the environment after it must still reach them."""
    tiny = dataclasses.replace(SMALL, train_hours=0.002, dev_utterances=1, test_utterances=1)
    synthesize(tiny, str(tmp_path / "first"), log=lambda s: None)  # the forkserver is up now
    s3fs_client.mkdir("synth-env")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    from raytrain_speech.config import StorageConfig

    no_endpoint = StorageConfig(connect_timeout_s=2, request_timeout_s=5, max_attempts=1)
    manifest = synthesize(tiny, "s3://synth-env/corpus", no_endpoint, log=lambda s: None)
    keys = {p.split("/", 2)[2] for p in s3fs_client.find("synth-env/corpus")}
    written = {k for k in keys if k and not k.endswith("/")}  # pyarrow also writes directory markers
    assert {rel for info in manifest.splits.values() for rel in info.shards} | {"manifest.json"} == written


def _unmarked(word: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFD", word) if not unicodedata.combining(c))


def _sounds(word: str) -> str:
    """A rough Spanish pronunciation key: seseo, yeismo, b/v, silent h, and c/qu/g/j spellings of one sound."""
    w = word.replace("gü", "gw").replace("ñ", "\0")
    w = _unmarked(w).replace("\0", "ñ").replace("ch", "C").replace("h", "").replace("ll", "y").replace("v", "b")
    w = re.sub(r"g(?=[ei])", "x", w).replace("j", "x").replace("gu", "g")
    w = re.sub(r"c(?=[ei])", "s", w).replace("z", "s").replace("qu", "k").replace("c", "k")
    return re.sub(r"y$", "i", w)


def test_accented_spanish_word_list():
    assert len(WORDS_ES_ACCENTED) >= 100 and len(set(WORDS_ES_ACCENTED)) == len(WORDS_ES_ACCENTED)
    assert all(re.fullmatch(r"[a-záéíóúüñ]+", w) and re.search("[áéíóúüñ]", w) for w in WORDS_ES_ACCENTED)
    assert set("áéíóúüñ") <= set("".join(WORDS_ES_ACCENTED))
    unmarked = {_unmarked(w) for w in WORDS_ES_ACCENTED}
    assert len(unmarked) == len(WORDS_ES_ACCENTED) and not unmarked & (set(WORDS_ES) | set(WORDS))
    keys = [_sounds(w) for w in WORDS_ES + WORDS_ES_ACCENTED]
    assert len(set(keys)) == len(keys)
    assert set(QUESTION_WORDS["en"]) <= set(WORDS) and set(QUESTION_WORDS["es"]) <= set(WORDS_ES_ACCENTED)


PUNCTUATED = SynthConfig(train_hours=0.05, dev_utterances=100, test_utterances=100, second_language="es",
                         punctuation=True)


def test_punctuation_writes_the_same_utterances_out():
    written = make_specs(PUNCTUATED)
    plain = make_specs(dataclasses.replace(PUNCTUATED, punctuation=False))
    texts = {"en": [], "es": []}
    for split in ("dev", "test", "train"):
        assert len(written[split]) == len(plain[split])
        for w, p in zip(written[split], plain[split]):
            # Everything but the text is drawn as without punctuation.
            assert dataclasses.replace(w, text=p.text) == p
            texts[w.language].append(w.text)
            words, drawn = spoken_words(w.text).split(), p.text.split()
            if w.language == "en":
                words = [t for t in words if not t.isdigit()]
            if len(words) == len(drawn) + 1:
                assert words.pop(0) in QUESTION_WORDS[w.language]
            if w.language == "en":
                assert words == drawn, (w.text, p.text)
            else:
                assert len(words) == len(drawn), (w.text, p.text)
                assert all(a == b or a in WORDS_ES_ACCENTED for a, b in zip(words, drawn)), (w.text, p.text)
    en, es = texts["en"], texts["es"]
    assert all(re.fullmatch(r"[A-Z0-9][a-z0-9, ]*[.?]", t) for t in en)
    for mark in (",", ".", "?"):
        assert sum(mark in t for t in en) > len(en) / 10, mark
    numbers = [int(t) for text in en for t in spoken_words(text).split() if t.isdigit()]
    assert len(numbers) > len(en) / 10 and min(numbers) >= 13 and max(numbers) > 1000
    assert sum(t.split()[0].lower() in QUESTION_WORDS["en"] for t in en if t.endswith("?")) > 0
    for t in es:
        assert t[0] not in "¿¡" or t[1].isupper()
        assert t.startswith("¿") == t.endswith("?") and t.startswith("¡") == t.endswith("!")
        assert t[0] in "¿¡" or (t[0].isupper() and t.endswith("."))
    for mark in ("¿", "¡", ",", "."):
        assert sum(mark in t for t in es) > len(es) / 20, mark
    assert sum(bool(re.search("[áéíóúüñ]", t)) for t in es) > len(es) / 3
    assert set("áéíóúñ") <= set("".join(es).lower())  # ü is rare: 3 words (the list test checks it)
    # No two utterances, even across splits, have the same spoken words once written out.
    heard = [spoken_words(s.text) for split in written.values() for s in split]
    assert len(set(heard)) == len(heard)
    assert _source_config(PUNCTUATED)["punctuation"] is True
    assert make_specs(PUNCTUATED)["dev"] == written["dev"]  # deterministic


def test_punctuated_transcripts_are_what_espeak_says():
    specs = [s for split in make_specs(PUNCTUATED).values() for s in split]
    en = next(s for s in specs if s.language == "en" and re.search(r"\b\d{4}\b", s.text) and len(s.text.split()) <= 5)
    es = next(s for s in specs if s.language == "es" and s.text[0] in "¿¡" and re.search("[áéíóúñ]", s.text)
              and len(s.text.split()) <= 5)
    with_number = render(en, 16000)
    without = render(dataclasses.replace(en, text=re.sub(r" ?\b\d+\b", "", en.text)), 16000)
    assert 0.5 < len(with_number) / 16000 < 10.0
    assert len(with_number) - len(without) > 0.5 * 16000  # a four-digit number is said, not skipped
    a = render(es, 16000)
    assert 0.5 < len(a) / 16000 < 10.0 and abs(a).max() == pytest.approx(es.gain, rel=1e-3)
    assert _espeak().current_voice()[0].startswith("Spanish")


def test_synth_returns_its_own_corpus_and_refuses_to_overwrite_another(tmp_path):
    out = str(tmp_path / "c")
    first = synthesize(SMALL, out, log=lambda s: None)
    shard = tmp_path / "c" / first.splits["train"].shards[0]
    before = shard.stat().st_mtime_ns
    said = []
    again = synthesize(dataclasses.replace(SMALL, workers=2), out, log=said.append)  # workers change no byte
    assert again.splits["train"].shards == first.splits["train"].shards and shard.stat().st_mtime_ns == before
    assert said == [f"synth: {out} already holds this corpus; nothing written"]
    with pytest.raises(ConfigError, match=r"already holds a corpus of other settings \(seed 1234 -> 7\).*another --out"):
        synthesize(dataclasses.replace(SMALL, seed=7), out, log=lambda s: None)
    assert shard.stat().st_mtime_ns == before


def test_held_out_splits_scale_with_train_hours_unless_set():
    """0.05 h of train used to get 200 dev and 400 test utterances, 5x the train split."""
    small = SynthConfig(train_hours=0.05)
    assert (small.dev_utterances, small.test_utterances) == (10, 20)
    assert (SynthConfig(train_hours=3.0).dev_utterances, SynthConfig(train_hours=3.0).test_utterances) == (100, 200)
    assert (SynthConfig().dev_utterances, SynthConfig(train_hours=60).test_utterances) == (200, 400)
    assert SynthConfig(train_hours=0.05, test_utterances=7).test_utterances == 7
    specs = make_specs(dataclasses.replace(small, heldout_accents=("en-gb-scotland",)))
    assert len(specs["dev"]) == 10 and len(specs["test"]) == len(specs["test_accents"]) == 20
    assert len(specs["train"]) > len(specs["test"])
