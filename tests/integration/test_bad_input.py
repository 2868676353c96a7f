"""Bad input end to end on a real local Ray: a corpus seeded with every kind of bad row and bad shard
trains to completion, the run's bad-input log lists exactly the bad ids with their reasons, every good
utterance is trained on exactly once, and a corpus over data.max_bad_fraction stops with one clear line."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from raytrain_speech.data import audio, shards
from raytrain_speech.data.badinput import BAD_INPUTS_FILE, read_bad_inputs
from raytrain_speech.data.synth import synthesize
from raytrain_speech.train.fit import TrainingFailed, fit
from tests.conftest import BACKENDS, backend_overrides, tiny_config
from tests.integration.audit import read_attempts, surviving_steps


def _wav(samples: np.ndarray, rate_hz: int, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate_hz, format="WAV", subtype=subtype)
    return buf.getvalue()


def _bad_rows(rows: list[dict]) -> dict[str, str]:
    """Overwrite some rows in place with each kind of bad input; make two others odd but good.
    Returns {id: expected reason fragment}."""
    good_flac = rows[0]["audio"]
    samples, rate_hz = audio.decode(good_flac)
    nan = samples.copy()
    nan[len(nan) // 2] = np.nan
    edits = {
        1: ("audio", b"\x00\x01 not an audio file at all", "cannot decode audio"),
        2: ("audio", _wav(samples, rate_hz)[: len(samples)], "truncated"),  # a WAV cut short still decodes
        10: ("audio", good_flac[: len(good_flac) // 3], "cannot decode audio"),  # a FLAC cut short does not
        3: ("audio", _wav(np.zeros(0, np.float32), rate_hz), "zero-length audio"),  # a header, no samples
        11: ("audio", b"", "empty audio bytes"),
        4: ("audio", _wav(nan, rate_hz, "FLOAT"), "NaN or Inf"),
        5: ("audio", b"\x00\x00\x00\x20ftypM4A \x00\x00\x00\x00M4A mp42isom" + bytes(200), "cannot decode audio"),
        6: ("text", "", "empty transcript"),
        7: ("text", "caf\u00e9 \u4e2d\u6587", "outside the alphabet"),
        # Poison pills: a 16-sample WAV (crashed torch.stft inside Ray Data, retried 4 times); a
        # 2-hour file whose duration_s says ~2 s (refused from its header, never decoded); a
        # sample_rate_hz column that contradicts the header.
        12: ("audio", _wav(samples[:16], rate_hz), "audio too short: 16 samples"),
        13: ("audio", _two_hours_of_silence(rate_hz), "mislabelled audio: the header says 7200.00 s"),
        14: ("sample_rate_hz", 8000, "sample rate mismatch"),
    }
    expected = {}
    for i, (column, value, reason) in edits.items():
        rows[i][column] = value
        expected[rows[i]["id"]] = reason
    rows[12]["duration_s"] = 0.001
    # Good, though unusual: 8 kHz stereo WAV (resampled, downmixed) and 44.1 kHz float WAV.
    for i, (rate, stereo) in {8: (8000, True), 9: (44100, False)}.items():
        x, r = audio.decode(rows[i]["audio"])
        y = audio.resample(x, r, rate)
        rows[i]["audio"] = _wav(np.stack([y, y], axis=1) if stereo else y, rate, "PCM_16" if stereo else "FLOAT")
        rows[i]["sample_rate_hz"] = rate
    return expected


def _two_hours_of_silence(rate_hz: int) -> bytes:
    """A 2-hour FLAC (silence compresses to ~360 KB), written a minute at a time."""
    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", rate_hz, 1, format="FLAC", subtype="PCM_16") as f:
        for _ in range(120):
            f.write(np.zeros(rate_hz * 60, np.int16))
    return buf.getvalue()


def _corrupt_row_group(path, group: int) -> None:
    """Overwrite the page header of row group ``group``'s audio chunk: the footer stays valid."""
    col = pq.ParquetFile(path).metadata.row_group(group).column(2)
    data = bytearray(path.read_bytes())
    data[col.data_page_offset:col.data_page_offset + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))


LONG_TRANSCRIPT_ID_AT = 15
"""The row given a 10,000-character transcript: filtered (the CTC encoder cannot emit it) and listed."""


@pytest.fixture(scope="module")
def seeded_corpus(tmp_path_factory):
    """The tiny corpus re-sharded as: [rows with bad input][a shard that is not Parquet][a shard
    missing its text column][a shard with a corrupt row group and a duplicated index][the rest, good];
    indices stay consecutive in manifest order."""
    root = tmp_path_factory.mktemp("bad-corpus") / "corpus"
    cfg = tiny_config(**{"data.root": str(root)})
    manifest = synthesize(cfg.synth, str(root), log=lambda s: None)
    info = manifest.splits["train"]
    rows = sorted((r for rel in info.shards for r in shards.read_shard(str(root / rel)).to_pylist()),
                  key=lambda r: r["index"])
    for rel in info.shards:
        os.remove(root / rel)
    expected = _bad_rows(rows)
    long_id = rows[LONG_TRANSCRIPT_ID_AT]["id"]
    rows[LONG_TRANSCRIPT_ID_AT]["text"] = ("hello world " * 834)[:10_000]
    cuts = [0, 30, 36, 40, 48, len(rows)]
    names = [shards.shard_name("train", k) for k in range(5)]
    shards.write_shard(str(root), names[0], shards.rows_to_table(rows[0:30]))
    (root / names[1]).write_bytes(b"id,audio,text\nu1,xx,hello\n")  # a CSV where a shard should be
    table = shards.rows_to_table(rows[36:40]).drop_columns(["text"])
    pq.write_table(table, root / names[2])
    pages = [dict(r) for r in rows[40:48]]
    pages[6]["index"] = pages[5]["index"]  # row 46 claims 45's index: it would train twice
    pq.write_table(shards.rows_to_table(pages), root / names[3], row_group_size=2, compression={"audio": "none"})
    _corrupt_row_group(root / names[3], 1)  # rows 42, 43
    for i in (42, 43):
        expected[f"{shards.entry_uri(str(root), names[3])}#{i}"] = "row group 1 (indices 42..43) cannot be decoded"
    expected[rows[46]["id"]] = "has index 45 where its position gives 46"
    shards.write_shard(str(root), names[4], shards.rows_to_table(rows[48:]))
    manifest.splits["train"] = shards.SplitInfo(names, [b - a for a, b in zip(cuts, cuts[1:])], info.hours)
    shards.write_manifest(str(root), manifest)
    bad_indices = {r["index"] for r in rows if r["id"] in expected} | set(range(30, 40)) | {42, 43}
    good_indices = {r["index"] for r in rows} - bad_indices - {LONG_TRANSCRIPT_ID_AT}
    return root, rows, expected, bad_indices, good_indices, long_id


def _cfg(tmp_path, root, **extra):
    return tiny_config(**{
        "data.root": str(root), "run.storage_path": str(tmp_path / "runs"), "run.name": "bad",
        "train.max_steps": 10000, "train.max_epochs": 1, "train.log_every_steps": 2,
        "train.checkpoint_every_steps": 1000, "train.global_batch_audio_s": 60,
        "train.trained_log_dir": str(tmp_path / "trained"), **extra})


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_are_skipped_listed_and_every_good_utterance_trains(request, backend, tmp_path, seeded_corpus):
    root, rows, expected, bad_indices, good_indices, long_id = seeded_corpus
    cfg = _cfg(tmp_path, root, **backend_overrides(request, backend), **{"data.max_bad_fraction": 0.5})
    outcome = fit(cfg, progress=False)

    records = read_bad_inputs(str(tmp_path / "runs" / "bad" / BAD_INPUTS_FILE))
    filtered = [r for r in records if r.get("filtered")]
    assert [r["id"] for r in filtered] == [long_id] and "target of " in filtered[0]["reason"]
    by_id = {r["id"]: r["reason"] for r in records if "id" in r and not r.get("filtered")}
    assert set(by_id) == set(expected), by_id
    for utt_id, fragment in expected.items():
        assert fragment in by_id[utt_id], (utt_id, by_id[utt_id])
    shard_records = sorted((r["first_index"], r["utterances"], r["reason"]) for r in records if "shard" in r)
    assert [(a, n) for a, n, _ in shard_records] == [(30, 6), (36, 4)]
    assert "not a Parquet shard" in shard_records[0][2] and "missing columns text" in shard_records[1][2]

    trained = [i for rec in surviving_steps(read_attempts(str(tmp_path / "trained"))).values()
               for i in rec["indices"] if i >= 0]
    assert sorted(trained) == sorted(good_indices)  # every good utterance once, no bad one
    assert outcome.metrics["bad_utterances"] == len(bad_indices) == 25
    assert outcome.metrics["filtered_utterances"] == 1  # the long transcript
    assert outcome.bad_input_summary.startswith("bad input: 25 utterance(s) skipped (")
    assert "not a Parquet shard 6" in outcome.bad_input_summary


@pytest.mark.parametrize("backend", BACKENDS)
def test_too_much_bad_input_stops_the_run_with_one_line(request, backend, tmp_path, seeded_corpus):
    root, *_ = seeded_corpus
    cfg = _cfg(tmp_path, root, **backend_overrides(request, backend),
               **{"data.max_bad_fraction": 0.05, "data.bad_fraction_min_utterances": 20})
    with pytest.raises(TrainingFailed) as err:
        fit(cfg, progress=False)
    message = str(err.value)
    assert "\n" not in message and "too much bad input" in message and "data.max_bad_fraction=0.05" in message
    assert BAD_INPUTS_FILE in message
    written = json.loads((tmp_path / "runs" / "bad" / "metrics.jsonl").read_text().splitlines()[-1])
    assert written["stop_reason"].startswith("too much bad input")

