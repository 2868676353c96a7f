"""The synthesized noise set: deterministic clips of the right colour, hum and babble, written as shards
and loaded back the way augmentation loads MUSAN."""

import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from raytrain_speech.cli import main
from raytrain_speech.config import ConfigError, SynthConfig, from_dict
from raytrain_speech.data import audio, shards
from raytrain_speech.data.noise import (
    KINDS,
    NoiseSetConfig,
    load_noise_clips,
    make_clip_specs,
    synthesize_clip,
    write_noise_set,
)
from raytrain_speech.data.synth import make_specs, render
from raytrain_speech.storage import StorageError

SR = 16000
SMALL = NoiseSetConfig(seed=11, clips=7, clip_duration_s=1.0, shard_utterances=3)


def band_power_ratio(x: np.ndarray) -> float:
    """Mean power per Hz in 100-500 Hz over that in 2-6 kHz: 1 for white noise, larger the redder."""
    power = np.abs(np.fft.rfft(x)) ** 2
    freqs_hz = np.fft.rfftfreq(len(x), 1 / SR)
    low = power[(freqs_hz >= 100) & (freqs_hz < 500)].mean()
    return low / power[(freqs_hz >= 2000) & (freqs_hz < 6000)].mean()


def envelope_spread_db(x: np.ndarray, frame_s: float = 0.05) -> float:
    frame = int(frame_s * SR)
    energy = (x[: len(x) // frame * frame].reshape(-1, frame).astype(np.float64) ** 2).mean(axis=1)
    return float(np.std(10 * np.log10(energy + 1e-12)))


def phase_randomised(x: np.ndarray) -> np.ndarray:
    """Gaussian noise with exactly x's power spectrum: what x would be if it were stationary noise."""
    spectrum = np.fft.rfft(x)
    phases = np.exp(2j * np.pi * np.random.default_rng(0).random(len(spectrum)))
    return np.fft.irfft(np.abs(spectrum) * phases, len(x))


@pytest.mark.parametrize("kind", KINDS)
def test_clip_is_deterministic_and_seed_dependent(kind):
    a = synthesize_clip(kind, seed=5, duration_s=1.0, peak=0.4)
    if kind == "babble":  # espeak-ng state left by an unrelated render in this process must not leak in
        tiny = SynthConfig(train_hours=0.001, dev_utterances=1, test_utterances=1, train_speakers=4,
                           heldout_speakers=1)
        render(make_specs(tiny)["dev"][0], SR)
    b = synthesize_clip(kind, seed=5, duration_s=1.0, peak=0.4)
    assert a.dtype == np.float32 and a.shape == (SR,)
    assert np.array_equal(a, b)
    assert np.abs(a).max() == pytest.approx(0.4, rel=1e-5)
    assert not np.array_equal(a, synthesize_clip(kind, seed=6, duration_s=1.0, peak=0.4))


def test_spectral_slope_orders_white_pink_brown():
    for seed in (1, 2):
        white, pink, brown = (band_power_ratio(synthesize_clip(kind, seed, 2.0))
                              for kind in ("white", "pink", "brown"))
        assert 0.7 < white < 1.4  # flat
        assert 4 * white < pink < brown / 4  # 1/f: ~15x over this band pair; 1/f^2: ~250x


def test_hum_energy_is_on_mains_harmonics():
    found = set()
    for seed in range(6):
        x = synthesize_clip("hum", seed, 2.0)
        power = np.abs(np.fft.rfft(x * np.hanning(len(x)))) ** 2
        freqs_hz = np.fft.rfftfreq(len(x), 1 / SR)
        on = {}
        for f0 in (50, 60):
            near = np.zeros(len(freqs_hz), bool)
            for k in range(1, 20):
                near |= np.abs(freqs_hz - k * f0) <= 3
            on[f0] = power[near].sum() / power.sum()
        f0 = max(on, key=on.get)
        assert on[f0] > 0.95, on
        assert freqs_hz[power.argmax()] == pytest.approx(round(freqs_hz[power.argmax()] / f0) * f0, abs=1)
        found.add(f0)
    assert found == {50, 60}


def test_babble_is_non_stationary_like_speech():
    for seed in (0, 1, 2):
        babble = synthesize_clip("babble", seed, 2.0)
        assert envelope_spread_db(babble) > 2 * envelope_spread_db(phase_randomised(babble))
    # The measure is about the envelope, not the spectrum: brown noise is as steady as its own surrogate.
    brown = synthesize_clip("brown", 0, 2.0)
    assert envelope_spread_db(brown) < 1.5 * envelope_spread_db(phase_randomised(brown))


def test_specs_take_turns_over_kinds_with_their_own_levels():
    specs = make_clip_specs(NoiseSetConfig(clips=12))
    assert [s.kind for s in specs[:5]] == list(KINDS) and [s.index for s in specs] == list(range(12))
    assert len({s.seed for s in specs}) == 12 and all(0.1 <= s.peak <= 0.9 for s in specs)
    assert len({s.peak for s in specs}) == 12


@pytest.mark.parametrize("data, key", [
    ({"kinds": ["white", "static"]}, "noise.kinds"), ({"kinds": []}, "noise.kinds"),
    ({"clips": 0}, "noise.clips"), ({"peak_range": [0.5, 0.2]}, "noise.peak_range"),
])
def test_config_errors_name_the_key(data, key):
    with pytest.raises(ConfigError, match=key):
        from_dict(NoiseSetConfig, data, prefix="noise.")


def test_write_and_load_round_trip(tmp_path):
    root = str(tmp_path / "noise")
    manifest = write_noise_set(SMALL, root, log=lambda s: None)
    info = manifest.splits["noise"]
    assert info.utterances == [3, 3, 1] and info.shards[0] == "noise/shard-00000.parquet"
    assert shards.read_manifest(root).source["kind"] == "noise"
    rows = [r for rel in info.shards for r in pq.read_table(tmp_path / "noise" / rel).to_pylist()]
    assert [r["index"] for r in rows] == list(range(7)) and [r["id"] for r in rows][-1] == "noise-000006"
    assert [r["speaker"] for r in rows] == [KINDS[i % 5] for i in range(7)]
    assert {r["text"] for r in rows} == {""} and {r["sample_rate_hz"] for r in rows} == {SR}
    clips = load_noise_clips(root)
    assert len(clips) == 7 and all(c.dtype == np.float32 and len(c) == SR for c in clips)
    spec = make_clip_specs(SMALL)[3]  # babble: what the shard holds is the pure function's clip, 16-bit
    assert np.abs(clips[3] - synthesize_clip(spec.kind, spec.seed, 1.0, SR, spec.peak)).max() < 1e-4
    at_8k = load_noise_clips(root, max_clips=2, sample_rate_hz=8000)
    assert len(at_8k) == 2 and all(len(c) == 8000 for c in at_8k)
    again = tmp_path / "again"
    write_noise_set(SMALL, str(again), log=lambda s: None)
    for rel in info.shards:
        assert (again / rel).read_bytes() == (tmp_path / "noise" / rel).read_bytes()


def _write_split(root, split, clips: list[tuple[str, bytes, int]]):
    rows = [{"index": i, "id": cid, "audio": data, "sample_rate_hz": rate, "duration_s": 1.0, "text": "",
             "language": "", "speaker": "x"} for i, (cid, data, rate) in enumerate(clips)]
    info = shards.SplitInfo()
    if rows:
        shards.write_shard(str(root), shards.shard_name(split, 0), shards.rows_to_table(rows))
        info = shards.SplitInfo([shards.shard_name(split, 0)], [len(rows)], len(rows) / 3600)
    shards.write_manifest(str(root), shards.Manifest(splits={split: info}, source={"kind": "prepare"}))


def test_any_split_loads_and_is_resampled(tmp_path):
    """A MUSAN prepared with `prepare` is split "train" at whatever rate its files have."""
    tone = np.sin(np.linspace(0, 2000, 8000)).astype(np.float32) * 0.3
    _write_split(tmp_path, "train", [("musan-noise-0001", audio.encode_flac(tone, 8000), 8000)])
    (clip,) = load_noise_clips(str(tmp_path), split="train")
    assert len(clip) == SR and clip.dtype == np.float32
    with pytest.raises(StorageError, match="no split 'noise'"):
        load_noise_clips(str(tmp_path))


def test_bad_clip_stops_with_its_id(tmp_path):
    good = audio.encode_flac(np.full(SR, 0.1, np.float32), SR)
    _write_split(tmp_path / "a", "noise", [("noise-000000", good, SR), ("noise-000001", b"not audio", SR)])
    with pytest.raises(audio.AudioError, match="noise clip noise-000001: cannot decode") as err:
        load_noise_clips(str(tmp_path / "a"))
    assert "\n" not in str(err.value)
    assert len(load_noise_clips(str(tmp_path / "a"), max_clips=1)) == 1  # stops before the bad one
    silent = audio.encode_flac(np.zeros(SR, np.float32), SR)
    _write_split(tmp_path / "b", "noise", [("noise-000007", silent, SR)])
    with pytest.raises(audio.AudioError, match="noise clip noise-000007: silent"):
        load_noise_clips(str(tmp_path / "b"))


def test_empty_or_missing_set_names_the_root(tmp_path):
    _write_split(tmp_path / "empty", "noise", [])
    with pytest.raises(StorageError, match=f"{tmp_path / 'empty'}: split 'noise' holds no noise clips"):
        load_noise_clips(str(tmp_path / "empty"))
    with pytest.raises(StorageError, match=f"{tmp_path / 'absent'}: no noise set there"):
        load_noise_clips(str(tmp_path / "absent"))


def test_refuses_to_overwrite_a_speech_corpus(tmp_path):
    _write_split(tmp_path, "train", [])
    with pytest.raises(StorageError, match="already holds a prepare corpus"):
        write_noise_set(SMALL, str(tmp_path), log=lambda s: None)


def test_cli_writes_a_set_and_rejects_bad_settings(tmp_path, capsys):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "raytrain_speech.cli", "synth-noise", "--out", str(out)]
    flags = ["--clips", "6", "--clip-seconds", "0.5", "--seed", "3", "noise.shard_utterances=4"]
    done = subprocess.run(cmd + flags, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1
    assert "6 clips (2 white, 1 pink, 1 brown, 1 babble, 1 hum)" in done.stdout
    manifest = shards.read_manifest(str(out))
    assert manifest.splits["noise"].utterances == [4, 2] and manifest.source["config"]["seed"] == 3
    assert [len(c) for c in load_noise_clips(str(out))] == [SR // 2] * 6
    # In this process: a second interpreter start-up would double the test's time.
    assert main(["synth-noise", "--out", str(out), "noise.kinds=[white,static]"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: noise.kinds: unknown kind 'static'") and err.count("\n") == 1
