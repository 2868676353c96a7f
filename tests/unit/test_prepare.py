"""`prepare` without Ray (workers=0): each input layout, stable indices, bad inputs, shard cutting,
resume and refusal of a changed input. Inputs are real synthesized speech written as FLAC/WAV/OGG.

The layout builders here are shared with tests/integration/test_prepare.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from raytrain_speech import cli
from raytrain_speech.config import ConfigError, TextConfig, from_dict
from raytrain_speech.data import audio, shards
from raytrain_speech.data.prepare import (
    SKIPPED_FILE,
    STATE_FILE,
    PrepareConfig,
    Utterance,
    cut_shards,
    prepare,
    scan_librispeech,
    scan_manifest,
    survey_tar,
)
from raytrain_speech.storage import StorageError

FORMATS = {"flac": ("FLAC", "PCM_16"), "wav": ("WAV", "PCM_16"), "ogg": ("OGG", "VORBIS")}
GARBAGE = b"this is not audio at all " * 8


# ------------------------------------------------------------------------------ input builders


def encode(flac: bytes, ext: str) -> bytes:
    """The same speech in another container (FLAC bytes are passed through untouched)."""
    if ext == "flac":
        return flac
    samples, rate_hz = audio.decode(flac)
    buf = io.BytesIO()
    fmt, subtype = FORMATS[ext]
    sf.write(buf, samples, rate_hz, format=fmt, subtype=subtype)
    return buf.getvalue()


def synthesized_train_rows(directory) -> list[dict]:
    """The train rows of a ~35-utterance synthesized corpus written to ``directory`` (one shard)."""
    from raytrain_speech.config import SynthConfig
    from raytrain_speech.data import shards
    from raytrain_speech.data.synth import synthesize

    synth = SynthConfig(train_hours=0.025, dev_utterances=2, test_utterances=2, train_speakers=6,
                        heldout_speakers=1, shard_utterances=100, workers=1)
    synthesize(synth, str(directory), log=lambda s: None)
    return [r for rel in shards.read_manifest(str(directory)).splits["train"].shards
            for r in shards.read_shard(str(directory / rel)).to_pylist()]


def speech_records(rows: list[dict]) -> list[dict]:
    """Shard rows (id, text, speaker, FLAC audio) -> builder records with a per-utterance format."""
    exts = list(FORMATS)
    return [{"name": r["id"], "text": r["text"], "speaker": r["speaker"], "ext": exts[i % len(exts)],
             "audio": encode(r["audio"], exts[i % len(exts)])} for i, r in enumerate(rows)]


def _truth(uid, rec) -> dict:
    samples, rate_hz = audio.decode(rec["audio"])
    return {"text": rec["text"], "speaker": rec["speaker"], "audio": rec["audio"], "duration_s": len(samples) / rate_hz,
            "sample_rate_hz": rate_hz}


def build_manifest_layout(root, records, fmt: str = "tsv") -> tuple[str, dict, dict]:
    """``root/clips/<name>.<ext>`` + ``root/manifest.<fmt>``; the first record's audio is corrupt and
    the second's transcript empty. Returns (input, {id: truth}, {bad id: reason fragment})."""
    os.makedirs(os.path.join(root, "clips"), exist_ok=True)
    good, bad, lines = {}, {}, []
    for i, rec in enumerate(records):
        rel = f"clips/{rec['name']}.{rec['ext']}"
        data, text = rec["audio"], rec["text"]
        uid = rec["name"] if fmt == "jsonl" else f"clips/{rec['name']}"
        if i == 0:
            data, bad[uid] = GARBAGE, "unreadable audio"
        elif i == 1:
            text, bad[uid] = "  ", "empty transcript"
        else:
            good[uid] = _truth(uid, rec)
        with open(os.path.join(root, rel), "wb") as f:
            f.write(data)
        if fmt == "jsonl":
            lines.append(json.dumps({"audio_filepath": rel, "text": text, "id": uid, "speaker": rec["speaker"],
                                     "duration": 1.0}))
        else:
            lines.append(f"{rel}\t{text}\t{rec['speaker']}")
    header = [] if fmt == "jsonl" else ["path\ttext\tspeaker"]
    path = os.path.join(root, f"manifest.{fmt}")
    with open(path, "w") as f:
        f.write("\n".join(header + lines) + "\n")
    return path, good, bad


def build_librispeech_layout(root, records) -> tuple[str, dict, dict]:
    """``root/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt`` + FLAC; speakers numbered like
    LibriSpeech's; the first utterance's FLAC is corrupt, the second has no transcript text."""
    speakers = {s: str(100 + n) for n, s in enumerate(sorted({r["speaker"] for r in records}))}
    good, bad, trans = {}, {}, {}
    for i, rec in enumerate(records):
        spk = speakers[rec["speaker"]]
        chapter = str(10 + i % 2)
        uid = f"{spk}-{chapter}-{i:04d}"
        folder = os.path.join(root, spk, chapter)
        os.makedirs(folder, exist_ok=True)
        flac, text = rec["audio"] if rec["ext"] == "flac" else _as_flac(rec), rec["text"].upper()
        if i == 0:
            flac, bad[uid] = GARBAGE, "unreadable audio"
        elif i == 1:
            text, bad[uid] = "", "empty transcript"
        else:
            good[uid] = {**_truth(uid, {**rec, "audio": flac}), "text": text, "speaker": spk}
        with open(os.path.join(folder, f"{uid}.flac"), "wb") as f:
            f.write(flac)
        trans.setdefault(folder, []).append(f"{uid} {text}".rstrip())
    for folder, lines in trans.items():
        spk, chapter = folder.split(os.sep)[-2:]
        with open(os.path.join(folder, f"{spk}-{chapter}.trans.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return str(root), good, bad


def _as_flac(rec) -> bytes:
    samples, rate_hz = audio.decode(rec["audio"])
    return audio.encode_flac(samples, rate_hz)


def build_webdataset_layout(root, records, n_tars: int = 2) -> tuple[str, dict, dict]:
    """``root/part-NNNN.tar`` with ``<key>.<ext>`` + ``<key>.txt`` (even records) or ``<key>.json``
    (odd, with speaker); the first key's audio is corrupt, the second's transcript empty."""
    os.makedirs(root, exist_ok=True)
    good, bad = {}, {}
    tars = [tarfile.open(os.path.join(root, f"part-{n:04d}.tar"), "w") for n in range(n_tars)]
    for i, rec in enumerate(records):
        key, data, text = rec["name"], rec["audio"], rec["text"]
        if i == 0:
            data, bad[key] = GARBAGE, "unreadable audio"
        elif i == 1:
            text, bad[key] = "", "empty transcript"
        else:
            good[key] = {**_truth(key, rec), "speaker": rec["speaker"] if i % 2 else None}
        meta = (f"{key}.txt", text.encode()) if i % 2 == 0 else \
            (f"{key}.json", json.dumps({"text": text, "speaker": rec["speaker"]}).encode())
        for name, payload in ((f"{key}.{rec['ext']}", data), meta):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tars[i % n_tars].addfile(info, io.BytesIO(payload))
    for tf in tars:
        tf.close()
    return str(root), good, bad


def read_split(root: str, split: str = "train", storage_cfg=None) -> list[dict]:
    manifest = shards.read_manifest(root, storage_cfg)
    rows = []
    for rel in manifest.splits[split].shards:
        rows += shards.read_shard(shards.storage.join(root, rel), storage_cfg).to_pylist()
    return rows


def read_skipped(root: str, split: str = "train", storage_cfg=None) -> dict:
    text = shards.storage.read_bytes(shards.storage.join(root, split, SKIPPED_FILE), storage_cfg).decode()
    return {r["id"]: r for r in map(json.loads, text.splitlines())}


def check_prepared(root: str, good: dict, bad: dict, split: str = "train", storage_cfg=None) -> list[dict]:
    """Every good utterance exactly once, with its text, speaker and original bytes; indices 0..n-1 in
    id order; the bad ones listed with their reasons and counted in the manifest."""
    rows = read_split(root, split, storage_cfg)
    assert [r["id"] for r in rows] == sorted(good)
    assert [r["index"] for r in rows] == list(range(len(good)))
    for r in rows:
        truth = good[r["id"]]
        assert r["text"] == truth["text"] and r["speaker"] == truth["speaker"] and r["language"] == "en"
        assert r["audio"] == truth["audio"]  # stored as-is, never re-encoded
        assert r["sample_rate_hz"] == truth["sample_rate_hz"]
        assert r["duration_s"] == pytest.approx(truth["duration_s"], abs=1e-3)
    skipped = read_skipped(root, split, storage_cfg)
    assert set(skipped) == set(bad)
    for uid, fragment in bad.items():
        assert fragment in skipped[uid]["reason"], skipped[uid]
    manifest = shards.read_manifest(root, storage_cfg)
    assert manifest.splits[split].num_utterances == len(good)
    assert manifest.source["skipped"] == len(bad) and manifest.source["kind"] == "prepare"
    return rows


# ------------------------------------------------------------------------------ fixtures


def rendered_records() -> list[dict]:
    """Seven real synthesized utterances (a few seconds each), cycling through FLAC, WAV and OGG."""
    from raytrain_speech.config import SynthConfig
    from raytrain_speech.data.synth import make_specs, render

    cfg = SynthConfig(train_hours=0.01, dev_utterances=6, test_utterances=8, train_speakers=8, heldout_speakers=2)
    rows = [{"id": s.id, "text": s.text, "speaker": s.speaker.name,
             "audio": audio.encode_flac(render(s, 16000), 16000)} for s in make_specs(cfg)["test"][:7]]
    return speech_records(rows)


@pytest.fixture(scope="module")
def records():
    return rendered_records()


def _cfg(**kw) -> PrepareConfig:
    return from_dict(PrepareConfig, {"workers": 0, **kw}, prefix="prepare.")


def _quiet(_line: str) -> None:
    pass


# ------------------------------------------------------------------------------ layouts


@pytest.mark.parametrize("fmt", ["tsv", "jsonl"])
def test_manifest_layout(tmp_path, records, fmt):
    path, good, bad = build_manifest_layout(tmp_path / "in", records, fmt)
    out = prepare(_cfg(layout="manifest", input=path), str(tmp_path / "out"), log=_quiet)
    assert (out.skipped, out.filtered, out.shards_written, out.shards_reused) == (2, 0, 1, 0)
    rows = check_prepared(str(tmp_path / "out"), good, bad)
    assert {r["audio"][:4] for r in rows} == {b"fLaC", b"RIFF", b"OggS"}
    assert out.manifest.source["layout"] == "manifest" and out.manifest.source["input"] == path


WRITTEN = ["Hello, World! It's 5 o'clock.", "¿Qué tal, señor Núñez?", "The SHOP is open."]


def test_prepare_reports_transcripts_the_text_rules_cannot_encode(tmp_path, records, capsys):
    """A user's cased, punctuated transcripts with digits and accents: under the default rules (basic
    normaliser, char a-z') the ones with digits or accents are named at prepare time, per reason with
    examples, and listed; under text.alphabet=auto every one is kept."""
    recs = [{**r, "text": WRITTEN[i % len(WRITTEN)]} for i, r in enumerate(records[2:])]
    path, good, _ = build_manifest_layout(tmp_path / "in", records[:2] + recs, "jsonl")
    assert cli.main(["prepare", "--layout", "manifest", "--input", path, "--out", str(tmp_path / "strict"),
                     "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert "transcripts checked against text.normalizer=basic, text.tokenizer=char" in printed
    assert "characters outside the alphabet: '5'" in printed and "characters outside the alphabet: 'éñú'" in printed
    skipped = [json.loads(line) for line in open(tmp_path / "strict" / "train" / SKIPPED_FILE)]
    text_skips = {s["id"]: s["reason"] for s in skipped if s["reason"].startswith("transcript: ")}
    expected = {uid for uid, t in good.items() if t["text"] != WRITTEN[2]}
    assert set(text_skips) == expected, text_skips
    source = shards.read_manifest(str(tmp_path / "strict")).source
    assert sum(r["count"] for r in source["text_skipped"].values()) == len(expected)
    out = prepare(_cfg(layout="manifest", input=path), str(tmp_path / "auto"), log=_quiet,
                  text=from_dict(TextConfig, {"alphabet": "auto"}))
    assert out.text_skipped == {} and out.skipped == 2  # only the corrupt audio and the empty transcript


def test_manifest_directory_input_and_headerless_tsv(tmp_path, records):
    folder = tmp_path / "in"
    path, good, bad = build_manifest_layout(folder, records, "tsv")
    lines = open(path).read().splitlines()[1:]  # drop the header: path<TAB>text only
    with open(path, "w") as f:
        f.write("\n".join("\t".join(line.split("\t")[:2]) for line in lines) + "\n")
    found, skipped = scan_manifest(str(folder), "fr")
    assert sorted(u.id for u in found) == sorted([*good, "clips/" + records[0]["name"]])
    assert {u.speaker for u in found} == {None} and {u.language for u in found} == {"fr"}
    assert [(s.id, s.reason) for s in skipped] == [("clips/" + records[1]["name"], "empty transcript")]


def test_manifest_bad_lines_are_listed_not_fatal(tmp_path, records):
    path, good, _ = build_manifest_layout(tmp_path / "in", records[:4], "tsv")
    with open(path, "ab") as f:
        f.write(b"clips/missing.flac\thello there\n")
        f.write(b"clips/latin1.flac\tcaf\xe9 au lait\n")
    open(tmp_path / "in" / "clips" / "empty.wav", "wb").close()
    with open(path, "ab") as f:
        f.write(b"clips/empty.wav\tnothing here\n")
    prepare(_cfg(layout="manifest", input=path), str(tmp_path / "out"), log=_quiet)
    skipped = read_skipped(str(tmp_path / "out"))
    assert skipped["clips/missing"]["reason"] == "audio file missing"
    assert skipped["clips/latin1"]["reason"] == "transcript is not UTF-8"
    assert skipped["clips/empty"]["reason"] == "zero-length audio file"
    assert skipped["clips/missing"]["source"].endswith("clips/missing.flac")
    assert len(read_split(str(tmp_path / "out"))) == len(good)


def test_librispeech_layout(tmp_path, records):
    root, good, bad = build_librispeech_layout(tmp_path / "LibriSpeech" / "dev-clean", records)
    found, skipped = scan_librispeech(root, "en")
    corrupt, empty = bad  # the corrupt FLAC is only found out when its header is read
    assert sorted(u.id for u in found) == sorted([*good, corrupt])
    assert all(u.speaker == u.id.split("-")[0] and u.audio_uri.endswith(f"{u.id}.flac") for u in found)
    assert [(s.id, s.reason) for s in skipped] == [(empty, "empty transcript")]
    out = prepare(_cfg(layout="librispeech", input=root), str(tmp_path / "out"), log=_quiet)
    assert out.skipped == 2
    check_prepared(str(tmp_path / "out"), good, bad)
    out = prepare(_cfg(layout="librispeech", input=root, language="en-GB", split="dev"), str(tmp_path / "out"),
                  log=_quiet)
    assert {r["language"] for r in read_split(str(tmp_path / "out"), "dev")} == {"en-GB"}


def test_webdataset_layout(tmp_path, records):
    root, good, bad = build_webdataset_layout(tmp_path / "wds", records)
    found, _ = survey_tar((os.path.join(root, "part-0000.tar"), "en", None))
    assert all(u.member_offset is not None and u.size_bytes > 0 for u in found if not u.problem)
    out = prepare(_cfg(layout="webdataset", input=os.path.join(root, "part-*.tar")), str(tmp_path / "out"),
                  log=_quiet)
    assert out.skipped == 2
    check_prepared(str(tmp_path / "out"), good, bad)


def test_webdataset_keys_follow_webdataset_and_a_directory_is_searched(tmp_path, records):
    folder = tmp_path / "wds" / "nested"
    folder.mkdir(parents=True)
    flac = next(r for r in records if r["ext"] == "flac")
    members = [("./a.flac", flac["audio"]), ("./a.json", json.dumps({"text": "hello", "language": "de"}).encode()),
               ("./a.wav", encode(flac["audio"], "wav")),  # a second take of key a: FLAC is preferred
               ("./b.txt", b"text without audio"), ("./c.cls", b"3")]
    with tarfile.open(folder / "x.tar", "w") as tf:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    out = prepare(_cfg(layout="webdataset", input=str(tmp_path / "wds")), str(tmp_path / "out"), log=_quiet)
    rows = read_split(str(tmp_path / "out"))
    assert [(r["id"], r["text"], r["language"], r["speaker"]) for r in rows] == [("a", "hello", "de", None)]
    assert rows[0]["audio"] == flac["audio"]
    assert out.skipped == 1 and read_skipped(str(tmp_path / "out"))["b"]["reason"].startswith("no audio member")


# ------------------------------------------------------------------------------ plan


def test_indices_are_stable_under_input_order(tmp_path, records):
    path, good, _ = build_manifest_layout(tmp_path / "in", records, "jsonl")
    lines = open(path).read().splitlines()
    tables = []
    for seed in (0, 1):
        random.Random(seed).shuffle(lines)
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        out = prepare(_cfg(layout="manifest", input=path, shard_utterances=2), str(tmp_path / f"out{seed}"),
                      log=_quiet)
        assert len(out.manifest.splits["train"].shards) == 3
        tables.append([pq.read_table(tmp_path / f"out{seed}" / rel) for rel in out.manifest.splits["train"].shards])
    assert all(a.equals(b) for a, b in zip(*tables))
    assert [r["id"] for t in tables[0] for r in t.to_pylist()] == sorted(good)


def test_duplicate_id_is_a_one_line_error(tmp_path, records):
    path, _, _ = build_manifest_layout(tmp_path / "in", records, "jsonl")
    entries = [json.loads(line) for line in open(path)]
    entries[3]["id"] = entries[2]["id"]
    with open(path, "w") as f:
        f.write("".join(json.dumps(e) + "\n" for e in entries))
    with pytest.raises(ConfigError) as err:
        prepare(_cfg(layout="manifest", input=path), str(tmp_path / "out"), log=_quiet)
    message = str(err.value)
    assert f"duplicate utterance id {entries[2]['id']!r}" in message and "\n" not in message
    assert not (tmp_path / "out").exists()  # refused before writing anything


def test_cut_shards_respects_size_target_and_cap():
    utts = [Utterance(f"u{i}", "t", f"/a/{i}", size_bytes=size) for i, size in enumerate([40, 40, 40, 100, 10, 10, 10])]
    by_size = cut_shards(utts, "train", target_bytes=100)
    assert [[u.id for u in j.utterances] for j in by_size] == [["u0", "u1"], ["u2"], ["u3"], ["u4", "u5", "u6"]]
    assert [j.first_index for j in by_size] == [0, 2, 3, 4]
    assert [j.relpath for j in by_size] == [shards.shard_name("train", n) for n in range(4)]
    both = cut_shards(utts, "train", target_bytes=100, max_utterances=2)
    assert [len(j.utterances) for j in both] == [2, 1, 1, 2, 1]
    assert all(sum(u.size_bytes for u in j.utterances) <= 100 for j in both)


def test_duration_limits_leave_out_and_list(tmp_path, records):
    path, good, bad = build_manifest_layout(tmp_path / "in", records, "tsv")
    cut_s = sorted(t["duration_s"] for t in good.values())[len(good) // 2]
    out = prepare(_cfg(layout="manifest", input=path, min_duration_s=cut_s), str(tmp_path / "out"), log=_quiet)
    short = {k for k, t in good.items() if t["duration_s"] < cut_s}
    assert out.filtered == len(short) > 0 and out.skipped == 2
    assert {r["id"] for r in read_split(str(tmp_path / "out"))} == set(good) - short
    skipped = read_skipped(str(tmp_path / "out"))
    assert set(skipped) == set(bad) | short
    assert all("below min_duration_s" in skipped[k]["reason"] for k in short)


# ------------------------------------------------------------------------------ resume, merge, errors


def test_resume_rewrites_only_missing_shards_and_refuses_a_changed_input(tmp_path, records):
    path, good, bad = build_manifest_layout(tmp_path / "in", records, "tsv")
    out_dir = tmp_path / "out"
    cfg = _cfg(layout="manifest", input=path, shard_utterances=2)
    first = prepare(cfg, str(out_dir), log=_quiet)
    assert (first.shards_written, first.shards_reused) == (3, 0)
    assert json.loads((out_dir / "train" / STATE_FILE).read_text())["shards"].keys() == set(
        first.manifest.splits["train"].shards)
    mtimes = {p: os.stat(out_dir / p).st_mtime_ns for p in first.manifest.splits["train"].shards}
    os.remove(out_dir / "train" / "shard-00001.parquet")  # as if the run had died before this shard
    lines = []
    second = prepare(cfg, str(out_dir), log=lines.append)
    assert (second.shards_written, second.shards_reused) == (1, 2)
    assert any("resuming: 2 of 3 shards already written" in line for line in lines)
    assert os.stat(out_dir / "train" / "shard-00000.parquet").st_mtime_ns == mtimes["train/shard-00000.parquet"]
    check_prepared(str(out_dir), good, bad)

    with pytest.raises(ConfigError, match="holds a different prepare .*settings changed: shard_utterances 2 -> 3"
                                          ".*delete .*train to start over"):
        prepare(_cfg(layout="manifest", input=path, shard_utterances=3), str(out_dir), log=_quiet)
    extra = tmp_path / "in" / "clips" / f"extra.{records[2]['ext']}"
    extra.write_bytes(records[2]["audio"])
    with open(path, "a") as f:  # the input grows by one utterance
        f.write(f"clips/{extra.name}\tanother take\tx\n")
    with pytest.raises(ConfigError, match="holds a different prepare .*the input files differ"):
        prepare(cfg, str(out_dir), log=_quiet)
    check_prepared(str(out_dir), good, bad)  # untouched by the refused runs


def test_second_split_is_merged_into_the_manifest(tmp_path, records):
    out_dir = str(tmp_path / "out")
    path, _, _ = build_manifest_layout(tmp_path / "a", records[:4], "tsv")
    prepare(_cfg(layout="manifest", input=path), out_dir, log=_quiet)
    root, good, bad = build_librispeech_layout(tmp_path / "b", records[4:])
    out = prepare(_cfg(layout="librispeech", input=root, split="test"), out_dir, log=_quiet)
    manifest = shards.read_manifest(out_dir)
    assert set(manifest.splits) == {"train", "test"} and manifest.splits["train"].num_utterances == 2
    assert manifest.source["splits"]["train"]["layout"] == "manifest"
    assert manifest.source["splits"]["test"]["layout"] == "librispeech" == manifest.source["layout"]
    assert out.manifest.splits["test"].num_utterances == len(good)


def test_input_errors_name_the_path_and_the_fix(tmp_path):
    with pytest.raises(StorageError, match=re.escape(f"{tmp_path}/nope: not found") + ".*LibriSpeech root"):
        prepare(_cfg(layout="librispeech", input=str(tmp_path / "nope")), str(tmp_path / "out"), log=_quiet)
    with pytest.raises(StorageError, match="nope.tar: not found .*<key>.flac"):
        prepare(_cfg(layout="webdataset", input=str(tmp_path / "nope.tar")), str(tmp_path / "out"), log=_quiet)
    with pytest.raises(ConfigError, match="prepare.layout: 'kaldi' is not one of"):
        _cfg(layout="kaldi", input=str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no utterances found for --layout librispeech .*trans.txt"):
        prepare(_cfg(layout="librispeech", input=str(tmp_path / "empty")), str(tmp_path / "out"), log=_quiet)
    with pytest.raises(ConfigError, match="no .tar files found"):
        prepare(_cfg(layout="webdataset", input=str(tmp_path / "empty" / "*.tar")), str(tmp_path / "out"), log=_quiet)
    with pytest.raises(ConfigError, match="no .tsv or .jsonl"):
        prepare(_cfg(layout="manifest", input=str(tmp_path / "empty")), str(tmp_path / "out"), log=_quiet)
    with pytest.raises(ConfigError, match="prepare.input: is required"):
        _cfg(layout="manifest")


def test_cli_prepare(tmp_path, records, capsys):
    from raytrain_speech.cli import main

    path, good, _ = build_manifest_layout(tmp_path / "in", records, "tsv")
    out = str(tmp_path / "out")
    assert main(["prepare", "--input", path, "--layout", "manifest", "--out", out, "--split", "dev",
                 "--shard-mb", "0.05", "--workers", "0", "prepare.language=en"]) == 0
    printed = capsys.readouterr().out
    assert f"dev: {len(good)} utterances" in printed and "skipped 2 bad inputs" in printed
    assert len(shards.read_manifest(out).splits["dev"].shards) > 1  # 50 kB target: several shards
    assert main(["prepare", "--input", str(tmp_path / "missing"), "--layout", "manifest", "--out", out]) == 2
    assert main(["prepare", "--input", path, "--layout", "kaldi", "--out", out]) == 2
    assert main(["prepare", "--input", path, "--layout", "manifest", "--out", out, "train.max_steps=3"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(e.startswith("error: ") for e in errors), errors
    assert "missing: not found" in errors[0] and "prepare.layout" in errors[1] and "train.*" in errors[2]


# ------------------------------------------------------------------------------ decode check at write time


def build_damaged_layout(root, records) -> tuple[str, dict, dict]:
    """A TSV manifest whose good files (FLAC, WAV, OGG) alternate, in id order, with three whose headers
    read but whose samples do not: a FLAC cut to a third of its bytes (its header keeps the full length),
    a WAV whose data chunk is cut (libsndfile trims its own count; the chunk's size field does not), and
    a float WAV holding a NaN. Returns (manifest, {id: truth}, {bad id: reason fragment})."""
    flac, wav = next(r for r in records if r["ext"] == "flac"), next(r for r in records if r["ext"] == "wav")
    samples, rate_hz = audio.decode(records[4]["audio"])
    samples[len(samples) // 2] = float("nan")
    buf = io.BytesIO()
    sf.write(buf, samples, rate_hz, format="WAV", subtype="FLOAT")
    truncated = "truncated"
    files = [("u0-good", records[3], None), ("u1-cut", flac, flac["audio"][: len(flac["audio"]) // 3]),
             ("u2-good", records[1], None), ("u3-cut", wav, wav["audio"][: len(wav["audio"]) // 3]),
             ("u4-good", records[2], None), ("u5-nan", wav, buf.getvalue()), ("u6-good", records[6], None)]
    reasons = {"u1-cut": truncated, "u3-cut": truncated, "u5-nan": "audio contains NaN or Inf samples"}
    os.makedirs(os.path.join(root, "clips"), exist_ok=True)
    good, bad, lines = {}, {}, ["path\ttext\tspeaker"]
    for name, rec, damaged in files:
        uid, rel = f"clips/{name}", f"clips/{name}.{rec['ext']}"
        with open(os.path.join(root, rel), "wb") as f:
            f.write(rec["audio"] if damaged is None else damaged)
        lines.append(f"{rel}\t{rec['text']}\t{rec['speaker']}")
        if damaged is None:
            good[uid] = _truth(uid, rec)
        else:
            bad[uid] = reasons[name]
    path = os.path.join(root, "manifest.tsv")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path, good, bad


def check_shard_indices(root: str, split: str = "train") -> None:
    """Each listed shard holds the consecutive indices its manifest position gives, and the training
    reader takes every row as it is (no read errors)."""
    from raytrain_speech.data import corpus

    info = shards.read_manifest(root).splits[split]
    for rel, n, first in zip(info.shards, info.utterances, shards.first_indices(info)):
        table = shards.read_shard(os.path.join(root, rel))
        assert n > 0 and table.column("index").to_pylist() == list(range(first, first + n)), rel
        read = list(corpus.parquet_row_tables(os.path.join(root, rel), first))
        assert all(e == "" for t in read for e in t.column("read_error").to_pylist()), rel


@pytest.mark.parametrize("shard_utterances", [1, 2, None])
def test_files_that_do_not_decode_in_full_are_listed_not_shipped(tmp_path, records, shard_utterances):
    """Truncated FLAC and WAV files and a NaN WAV pass the header survey; the writer decodes them, leaves
    them out with the cause and the fix, and the indices close up over the rest (a shard left empty is
    not listed)."""
    path, good, bad = build_damaged_layout(tmp_path / "in", records)
    lines = []
    out = prepare(_cfg(layout="manifest", input=path, shard_utterances=shard_utterances), str(tmp_path / "out"),
                  log=lines.append)
    assert out.skipped == len(bad) == 3 and out.filtered == 0
    rows = check_prepared(str(tmp_path / "out"), good, bad)  # ids, indices 0..n-1, bytes, reasons, counts
    check_shard_indices(str(tmp_path / "out"))
    skipped = read_skipped(str(tmp_path / "out"))
    assert re.fullmatch(r"truncated or corrupt audio: decodes for \d+\.\d\d s of the \d+\.\d\d s its header says, "
                        r"then fails \(flac decoder lost sync\) \(re-encode or re-copy the file\)",
                        skipped["clips/u1-cut"]["reason"]), skipped["clips/u1-cut"]
    assert re.fullmatch(r"truncated audio: decodes to \d+\.\d\d s but its header says \d+\.\d\d s "
                        r"\(re-encode or re-copy the file\)", skipped["clips/u3-cut"]["reason"]), skipped["clips/u3-cut"]
    assert skipped["clips/u1-cut"]["source"].endswith("clips/u1-cut.flac")
    assert skipped["clips/u3-cut"]["source"].endswith("clips/u3-cut.wav")
    info = out.manifest.splits["train"]
    assert info.num_utterances == len(good) and len(rows) == len(good)
    assert info.hours == pytest.approx(sum(t["duration_s"] for t in good.values()) / 3600, abs=1e-6)
    assert out.manifest.source["skipped"] == 3
    assert any("3 files failed the decode check" in line for line in lines), lines
    assert not any("renumbering" in line for line in lines)  # one job at a time: each numbered right away
    if shard_utterances == 1:
        assert len(info.shards) == len(good) and out.shards_written == 7  # the 3 emptied shards: unlisted


def test_decode_check_and_the_readers_tolerance_agree():
    """The writer's bar for 'materially fewer frames' is audio.check_duration's, either side of it."""
    from raytrain_speech.data.prepare import probe

    rate_hz, seconds = 16000, 3.1
    full = probe.duration_tolerance_s(seconds)
    for short_s, rejected in ((0.9 * full, False), (1.1 * full, True)):
        samples = np.zeros(int(round((seconds - short_s) * rate_hz)), np.float32)
        with pytest.raises(audio.AudioError) if rejected else contextlib.nullcontext():
            audio.check_duration(samples, rate_hz, seconds)
        buf = io.BytesIO()
        sf.write(buf, np.zeros(int(seconds * rate_hz), np.float32), rate_hz, format="WAV", subtype="PCM_16")
        data = buf.getvalue()
        cut = data[: len(data) - int(round(short_s * rate_hz)) * 2]
        assert bool(probe.decode_check(cut)[2]) == rejected
    streamed = bytearray(data)  # a WAV written to a pipe: sizes unknown (0xFFFFFFFF), never "truncated"
    streamed[40:44] = b"\xff\xff\xff\xff"
    assert probe.wav_declared_frames(bytes(streamed)) is None and probe.wav_declared_frames(data) == len(data) // 2 - 22


def test_shards_written_ahead_are_renumbered_and_a_resume_keeps_the_write_time_skips(tmp_path, records,
                                                                                  monkeypatch):
    """Ray hands out several shards before the earlier ones finish, so a file left out of one can move
    shards already written: an executor that numbers every job up front (the worst case) must end with
    the same shards as the serial one. A resumed run keeps the files left out in its list and counts."""
    from contextlib import contextmanager

    from raytrain_speech.data.prepare import executor as executor_module
    from raytrain_speech.data.prepare import run as run_module

    path, good, bad = build_damaged_layout(tmp_path / "in", records)
    cfg = _cfg(layout="manifest", input=path, shard_utterances=2)
    serial = prepare(cfg, str(tmp_path / "serial"), log=_quiet)

    @contextmanager
    def all_at_once(workers):
        yield lambda fn, jobs: executor_module.serial_map(fn, list(jobs))

    monkeypatch.setattr(run_module, "executor", all_at_once)
    lines = []
    ahead = prepare(cfg, str(tmp_path / "ahead"), log=lines.append)
    assert any("renumbering 3 shards" in line for line in lines), lines
    check_prepared(str(tmp_path / "ahead"), good, bad)
    check_shard_indices(str(tmp_path / "ahead"))
    assert ahead.manifest.splits["train"] == serial.manifest.splits["train"]
    for rel in serial.manifest.splits["train"].shards:
        assert pq.read_table(tmp_path / "ahead" / rel).equals(pq.read_table(tmp_path / "serial" / rel)), rel
    monkeypatch.undo()

    listing = serial.manifest.splits["train"].shards
    os.remove(tmp_path / "serial" / listing[-1])  # as if the run had died before its last shard
    again = prepare(cfg, str(tmp_path / "serial"), log=_quiet)
    assert (again.shards_written, again.shards_reused, again.skipped) == (1, len(listing) - 1, 3)
    check_prepared(str(tmp_path / "serial"), good, bad)
    check_shard_indices(str(tmp_path / "serial"))


def test_cli_prepare_counts_files_left_out_when_decoded(tmp_path, records, capsys):
    path, good, _ = build_damaged_layout(tmp_path / "in", records)
    assert cli.main(["prepare", "--input", path, "--layout", "manifest", "--out", str(tmp_path / "out"),
                     "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert f"train: {len(good)} utterances" in printed and "skipped 3 bad inputs" in printed, printed


def test_resume_accepts_the_state_of_a_run_before_the_decode_check(tmp_path, records):
    """State entries written before the decode check have no first_index or skip list: such a run wrote
    every planned row at its planned index, and a resume takes them so."""
    path, good, bad = build_manifest_layout(tmp_path / "in", records, "tsv")
    cfg = _cfg(layout="manifest", input=path, shard_utterances=2)
    first = prepare(cfg, str(tmp_path / "out"), log=_quiet)
    state_path = tmp_path / "out" / "train" / STATE_FILE
    state = json.loads(state_path.read_text())
    state["shards"] = {k: {"utterances": v["utterances"], "duration_s": v["duration_s"]} for k, v in state["shards"].items()}
    state_path.write_text(json.dumps(state))
    os.remove(tmp_path / "out" / first.manifest.splits["train"].shards[1])
    lines = []
    again = prepare(cfg, str(tmp_path / "out"), log=lines.append)
    assert (again.shards_written, again.skipped) == (1, 2) and not any("renumbering" in line for line in lines)
    check_prepared(str(tmp_path / "out"), good, bad)
    check_shard_indices(str(tmp_path / "out"))
