"""The phoneme and F0 probes: the YIN tracker on signals of known F0, espeak-ng's phonemizer, PER, the
CTC head on features that carry the phones, a ``phonemes`` column through prepare, and both probes end
to end on a tiny synthesized corpus and an untrained Conformer checkpoint."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

from raytrain_speech.config import SynthConfig, dump_yaml, from_dict, to_dict
from raytrain_speech.data import audio, phonemes, shards
from raytrain_speech.data.text import CharTokenizer
from raytrain_speech.evaluate import pitch, probe, probe_heads
from raytrain_speech.evaluate.probe_heads import ProbeSettings
from raytrain_speech.models.registry import build_model
from raytrain_speech.train import checkpoint
from tests.conftest import tiny_config

SR = 16000


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """One intra-op thread: these small tensors gain nothing from two, and on a busy 2-core box the
    second thread's spin-waits made the CTC fits 6x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tone(f0_hz: float, seconds: float = 0.8, harmonics: int = 1, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    x = sum(0.8 ** (k - 1) * np.sin(2 * np.pi * f0_hz * k * t + k) for k in range(1, harmonics + 1))
    x = 0.3 * x / np.abs(x).max()
    return x + noise * np.random.default_rng(seed).standard_normal(len(t))


# ------------------------------------------------------------------------------------------- F0


@pytest.mark.parametrize("f0_hz, harmonics, noise", [(70.0, 1, 0.0), (147.3, 1, 0.0), (310.0, 1, 0.0),
                                                      (95.0, 10, 0.0), (210.0, 10, 0.02), (480.0, 4, 0.0)])
def test_yin_recovers_the_f0_of_tones_and_harmonic_signals(f0_hz, harmonics, noise):
    track = pitch.track_f0(_tone(f0_hz, harmonics=harmonics, noise=noise), SR)
    assert track.voiced_N.mean() > 0.9
    err = track.f0_hz_N[track.voiced_N] - f0_hz
    assert abs(float(np.median(err))) < 0.5 and float(np.sqrt((err ** 2).mean())) < 2.0


def test_yin_marks_silence_and_noise_unvoiced():
    rng = np.random.default_rng(1)
    assert not pitch.track_f0(np.zeros(SR), SR).voiced_N.any()
    assert pitch.track_f0(0.3 * rng.standard_normal(SR), SR).voiced_N.mean() < 0.02
    # tone, silence, noise: voiced only where the tone is (tracker frames are 10 ms apart)
    x = np.concatenate([_tone(180.0, 0.5), np.zeros(SR // 2), 0.3 * rng.standard_normal(SR // 2)])
    v = pitch.track_f0(x, SR).voiced_N
    assert v[3:47].all() and not v[53:97].any() and v[103:].mean() < 0.05


def test_f0_on_the_encoder_grid_votes_and_takes_the_voiced_median():
    f0 = np.array([100, 102, 0, 0, 0, 0, 200, 0, 150, 151, 152, 153], np.float32)
    track = pitch.F0Track(f0, f0 > 0, np.zeros(12, np.float32), hop_s=0.01)
    f0_T, voiced_T = pitch.to_encoder_frames(track, 3, 0.04)  # 40 ms frames: tracker frames 0-3, 4-7, 8-11
    assert voiced_T.tolist() == [False, False, True] and f0_T[2] == pytest.approx(151.5)
    f0_T, voiced_T = pitch.to_encoder_frames(track, 24, 0.005)  # shorter than the hop: nearest frame
    assert voiced_T[0] and f0_T[0] == 100 and f0_T[1] == 102 and not voiced_T[5]


# ------------------------------------------------------------------------------------ phonemes


def test_espeak_phonemes_are_phones_and_do_not_depend_on_what_came_before():
    items = [("The cat sat on the mat.", "en-us+m3"), ("¿Cómo está el niño?", "es-419+f2"),
             ("It is 25 past nine", "en-gb-x-rp+klatt"), ("hello", "nope+m1")]
    first = phonemes.phonemize(items)
    again = phonemes.phonemize(items[::-1])[::-1]
    assert first == again
    cat, nino, number, unknown = first
    assert cat[:2] == ["ð", "ə"] and "æ" in cat and not any("ˈ" in p or "_" in p for p in cat)
    assert "ɲ" in nino and len(number) > 10  # digits are read as words
    assert isinstance(unknown, str) and "nope+m1" in unknown
    assert phonemes.split_phones("h_ə_l_ˈoʊ (fr)b_ˈɔ̃(en) w_ˈɜː_l_d") == ["h", "ə", "l", "oʊ", "b", "ɔ̃", "w", "ɜː",
                                                                          "l", "d"]
    assert phonemes.parse_column(" h ə  l oʊ ") == ["h", "ə", "l", "oʊ"] and phonemes.parse_column(None) == []


def test_phone_error_rate_on_known_pairs():
    ed = probe_heads.edit_distance
    assert ed([], []) == 0 and ed(list("abc"), []) == 3 and ed([], list("ab")) == 2
    assert ed(list("kitten"), list("sitting")) == 3 and ed(["aɪ", "t"], ["aɪ", "t"]) == 0
    refs, hyps = [["a", "b", "c", "d"], ["e", "f"]], [["a", "x", "c"], ["e", "f", "g"]]
    assert probe_heads.phone_error_rate(refs, hyps) == pytest.approx(3 / 6)  # 1 sub + 1 del; 1 ins
    assert math.isnan(probe_heads.phone_error_rate([], []))


def _phone_utterances(n: int, centres: np.ndarray, rng) -> tuple[list[np.ndarray], list[list[int]]]:
    feats, targets = [], []
    for _ in range(n):
        seq = list(rng.integers(1, len(centres) + 1, size=rng.integers(5, 9)))
        frames = [centres[p - 1] for p in seq for _ in range(rng.integers(2, 5))]
        feats.append((np.stack(frames) + 0.5 * rng.standard_normal((len(frames), centres.shape[1]))).astype(np.float32))
        targets.append([int(p) for p in seq])
    return feats, targets


def test_the_ctc_head_learns_phones_from_features_that_carry_them_and_not_from_noise():
    rng = np.random.default_rng(0)
    centres = 2.0 * rng.standard_normal((6, 12))
    train_x, train_y = _phone_utterances(40, centres, rng)
    test_x, test_y = _phone_utterances(20, centres, rng)
    settings = ProbeSettings(ctc_steps=60, ctc_lr=0.1, ctc_batch_utterances=16)
    hyps = probe_heads.ctc_phone_probe(train_x, train_y, test_x, 6, settings)
    assert probe_heads.phone_error_rate(test_y, hyps) < 0.25  # 0.13 when written
    short = ProbeSettings(ctc_steps=10, ctc_lr=0.1, ctc_batch_utterances=16)
    assert (probe_heads.ctc_phone_probe(train_x, train_y, test_x, 6, short)
            == probe_heads.ctc_phone_probe(train_x, train_y, test_x, 6, short))  # deterministic
    noise = [rng.standard_normal(x.shape).astype(np.float32) for x in train_x]
    hyps = probe_heads.ctc_phone_probe(noise, train_y, [rng.standard_normal(x.shape).astype(np.float32)
                                                        for x in test_x], 6, settings)
    assert probe_heads.phone_error_rate(test_y, hyps) > 0.5
    assert probe_heads.ctc_feasible([1, 1, 2], 4) and not probe_heads.ctc_feasible([1, 1, 2], 3)


def test_ridge_weight_is_chosen_on_probe_train_utterances():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((400, 30))
    y = x[:, 0] * 20 + 150
    groups, train = np.arange(400) // 10, (np.arange(400) // 10) % 2 == 0
    grid = (1.0, 1e5)
    assert probe_heads.choose_ridge_l2(x, y, train, groups, grid) == 1.0  # signal: little shrinkage
    noise_y = rng.standard_normal(400) * 20 + 150
    assert probe_heads.choose_ridge_l2(x, noise_y, train, groups, grid) == 1e5  # noise: shrink to the mean
    assert probe_heads.ridge_rmse(x, y, train, 1.0) < 1.0 < probe_heads.mean_rmse(y, train)


# ------------------------------------------------------------------------- prepare's phonemes column


def test_prepare_copies_a_manifests_phonemes_into_the_shards(tmp_path):
    from raytrain_speech.data.prepare import PrepareConfig, prepare

    inp = tmp_path / "in"
    inp.mkdir()
    for name in ("a", "b"):
        sf.write(inp / f"{name}.wav", _tone(150.0, 0.5), SR, subtype="PCM_16")
    (inp / "m.jsonl").write_text(json.dumps({"path": "a.wav", "text": "hi", "phonemes": "h aɪ"}) + "\n"
                                 + json.dumps({"path": "b.wav", "text": "ho"}) + "\n")
    (inp / "plain.tsv").write_text("path\ttext\na.wav\thi\n")
    cfg = from_dict(PrepareConfig, {"workers": 0, "layout": "manifest", "input": str(inp / "m.jsonl")}, prefix="prepare.")
    prepare(cfg, str(tmp_path / "out"), log=lambda s: None)
    table = shards.read_shard(str(tmp_path / "out" / "train" / "shard-00000.parquet"))
    assert dict(zip(table.column("id").to_pylist(), table.column("phonemes").to_pylist())) == {"a": "h aɪ", "b": None}
    plain = from_dict(PrepareConfig, {"workers": 0, "layout": "manifest", "input": str(inp / "plain.tsv")},
                      prefix="prepare.")
    prepare(plain, str(tmp_path / "plain"), log=lambda s: None)
    table = shards.read_shard(str(tmp_path / "plain" / "train" / "shard-00000.parquet"))
    assert table.schema == shards.SCHEMA  # no phonemes: the shard is as it was before the column existed


# ---------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory):
    """A synth corpus of 16 held-out utterances (4 speakers; rendered here, as ``synth`` renders them),
    and a checkpoint of an untrained Conformer-CTC tiny."""
    from raytrain_speech.data.synth import make_specs, render

    root = tmp_path_factory.mktemp("probe_corpus")
    synth = SynthConfig(train_hours=0.001, dev_utterances=8, test_utterances=8, train_speakers=2, heldout_speakers=2)
    manifest = shards.Manifest(source={"kind": "synth", "config": to_dict(synth)})
    for split, specs in make_specs(synth).items():
        rows = []
        for s in specs:
            wav = render(s, SR)
            rows.append({"index": s.index, "id": s.id, "audio": audio.encode_flac(wav, SR), "sample_rate_hz": SR,
                         "duration_s": len(wav) / SR, "text": s.text, "language": s.language,
                         "speaker": s.speaker.name})
        shards.write_shard(str(root), shards.shard_name(split, 0), shards.rows_to_table(rows))
        manifest.splits[split] = shards.SplitInfo([shards.shard_name(split, 0)], [len(rows)],
                                                  sum(r["duration_s"] for r in rows) / 3600)
    shards.write_manifest(str(root), manifest)
    cfg = tiny_config(**{"data.root": str(root)})
    torch.manual_seed(1)
    ck = tmp_path_factory.mktemp("ck")
    checkpoint.save(str(ck), build_model(cfg.model, CharTokenizer().vocab_size), None, None,
                    checkpoint.TrainState(step=1), dump_yaml(cfg))
    return root, ck


def test_both_probes_run_end_to_end_and_return_numbers(probe_run):
    root, ck = probe_run
    lines: list[str] = []
    res = probe.probe_checkpoint(str(ck), log=lines.append, settings=ProbeSettings(ctc_steps=40))
    assert res["utterances"] == 16 and res["speakers"] == 4
    assert res["phoneme_source"].startswith("espeak-ng") and res["phoneme_probe"]["phones"] > 10
    assert res["f0_probe"]["voiced_test_frames"] > 50 and res["f0_probe"]["f0_rmse_hz_predict_mean"] > 1
    for which in ("pretrained", "random_init"):
        r = res[which]
        assert 0 <= r["speaker_accuracy"] <= 1 and 0 <= r["phone_error_rate"] < 2 and r["f0_rmse_hz"] > 0
    assert res["skipped"] == {} and any("pretrained: speaker_accuracy" in line for line in lines)
    json.dumps(res)  # the CLI writes it as JSON


def test_a_corpus_without_phonemes_skips_the_phoneme_probe_with_one_line(probe_run, tmp_path):
    root, _ = probe_run
    other = tmp_path / "prepared"
    shutil.copytree(root, other)
    manifest = shards.read_manifest(str(other))
    manifest.source = {"kind": "prepare", "layout": "manifest"}
    shards.write_manifest(str(other), manifest)
    texts = {"dev-000000": ("hello", "en+m1"), "dev-000001": ("world", "en+m1")}
    skipped = probe.Counter()
    assert probe._phone_labels(str(other), {}, texts, None, skipped) == ({}, "")
    column = {"dev-000000": "h ə l oʊ", "dev-000001": None}
    got = probe._phone_labels(str(other), column, texts, None, skipped)
    assert got == ({"dev-000000": ["h", "ə", "l", "oʊ"]}, "phonemes column") and sum(skipped.values()) == 1


def test_the_cli_table_has_a_row_per_probe(monkeypatch, capsys):
    from raytrain_speech import cli

    fake = {"speakers": 4, "chance_accuracy": 0.25, "phoneme_source": "phonemes column",
            "phoneme_probe": {"phones": 40}, "f0_probe": {"f0_rmse_hz_predict_mean": 30.0, "voiced_test_frames": 900},
            "pretrained": {"speaker_accuracy": 0.9, "phone_error_rate": 0.31, "f0_rmse_hz": 12.5},
            "random_init": {"speaker_accuracy": 0.5, "phone_error_rate": 0.72, "f0_rmse_hz": 21.0}}
    monkeypatch.setattr(probe, "probe_checkpoint", lambda *a, **k: fake)
    assert cli.main(["probe", "--checkpoint", "x"]) == 0
    out = capsys.readouterr().out
    assert "PER" in out and "0.310" in out and "0.720" in out
    assert "F0 RMSE (Hz)" in out and "12.50" in out and "predicting the mean: 30.00" in out
