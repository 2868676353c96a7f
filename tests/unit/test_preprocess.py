import numpy as np
import pytest

from raytrain_speech.config import FeatureConfig, TextConfig
from raytrain_speech.data import audio
from raytrain_speech.data.preprocess import Preprocessor, to_utterances


def test_bad_rows_are_reported_with_id_and_reason_not_dropped():
    good = audio.encode_flac(np.sin(np.arange(16000) / 7).astype(np.float32) * 0.2, 16000)
    batch = {
        "index": [0, 1, 2, 3], "id": ["ok", "corrupt", "badtext", "empty"],
        "audio": [good, b"garbage bytes", good, b""], "duration_s": [1.0, 1.0, 1.0, 0.0],
        "text": ["hello there", "hello", "caf\u00e9 42", "hi"],
    }
    out = Preprocessor(FeatureConfig(), TextConfig())(batch)
    utts, bad = to_utterances(out)
    assert [u.id for u in utts] == ["ok"]
    assert utts[0].features_FM.shape == (101, 80)
    reasons = {utt_id: reason for _, utt_id, reason in bad}
    assert sorted(index for index, _, _ in bad) == [1, 2, 3]
    assert set(reasons) == {"corrupt", "badtext", "empty"}
    assert "decode" in reasons["corrupt"] and "transcript" in reasons["badtext"] and "empty" in reasons["empty"]


def _row_batch(n: int = 3):
    good = audio.encode_flac(np.sin(np.arange(16000) / 7).astype(np.float32) * 0.2, 16000)
    return {"index": list(range(n)), "id": [f"u{i}" for i in range(n)], "audio": [good] * n,
            "duration_s": [1.0] * n, "text": ["hello there"] * n}


def test_duration_filter_rejects_from_metadata_without_decoding():
    from raytrain_speech.data.preprocess import is_filtered

    batch = _row_batch()
    batch["duration_s"] = [0.2, 1.0, 40.0]
    batch["audio"][0] = batch["audio"][2] = b"not audio: a filtered row is never decoded"
    utts, bad = to_utterances(Preprocessor(FeatureConfig(), TextConfig(), duration_range_s=(0.5, 30.0))(batch))
    assert [u.id for u in utts] == ["u1"]
    assert [b[1] for b in bad] == ["u0", "u2"] and all(is_filtered(b[2]) for b in bad)
    assert "data.max_duration_s" in bad[1][2]


def test_binary_transcripts_decode_as_utf8_or_are_bad_input():
    batch = _row_batch()
    batch["text"] = [b"hello there", b"caf\xe9 latte", None]
    utts, bad = to_utterances(Preprocessor(FeatureConfig(), TextConfig())(batch))
    assert [u.text for u in utts] == ["hello there"]
    reasons = {utt_id: reason for _, utt_id, reason in bad}
    assert "not valid UTF-8" in reasons["u1"] and "empty transcript" in reasons["u2"]


def test_worker_placement_ships_center_padded_waveforms_and_augmented_durations():
    from raytrain_speech.config import AugmentConfig
    from raytrain_speech.data.augment import WaveformAugmenter

    aug = WaveformAugmenter(AugmentConfig(speed_factors=(1.1,)))
    out = Preprocessor(FeatureConfig(), TextConfig(), augmenter=aug, frontend_on_worker=True)(_row_batch(1), 0, 0)
    (utt,), _ = to_utterances(out)
    samples = -(-16000 * 10 // 11)  # ceil: torchaudio keeps the partial last sample
    assert utt.features_FM.shape == (samples + 400,)  # n_fft // 2 reflected at each end
    assert utt.duration_s == pytest.approx(samples / 16000, abs=1e-4)


def test_crop_cuts_a_fresh_window_per_epoch_and_normalises_per_segment():
    from raytrain_speech.data.preprocess import random_crop

    rng = np.random.default_rng(0)
    wav = (rng.standard_normal(16000 * 3) * np.linspace(0.01, 1.0, 16000 * 3)).astype(np.float32)  # loudness rises
    a = random_crop(wav, 8000, seed=1, epoch=0, index=5)
    assert a.shape == (8000,) and np.array_equal(a, random_crop(wav, 8000, 1, 0, 5))
    start = int(np.flatnonzero(wav == a[0])[0])
    assert np.array_equal(wav[start:start + 8000], a)  # a contiguous window, not resampled
    starts = {int(np.flatnonzero(wav == random_crop(wav, 8000, 1, e, 5)[0])[0]) for e in range(6)}
    assert len(starts) >= 5  # a new window each epoch
    assert random_crop(wav[:4000], 8000, 1, 0, 5).shape == (4000,)  # shorter: kept whole, never padded

    batch = {"index": [0, 1], "id": ["u0", "u1"], "audio": [audio.encode_flac(wav, 16000)] * 2,
             "duration_s": [3.0, 3.0], "text": ["a", "b"]}
    out = Preprocessor(FeatureConfig(), TextConfig(), crop_s=0.5)(batch, seed=0, epoch=0)
    assert list(out["duration_s"]) == [0.5, 0.5] and not any(out["error"])
    for feats in out["features"]:
        assert feats.shape[0] == 51  # 0.5 s at 10 ms hops, centred
        assert np.abs(feats.mean(axis=0)).max() < 1e-4  # normalised over the segment, not the utterance
    whole = Preprocessor(FeatureConfig(), TextConfig())(batch)
    assert whole["features"][0].shape[0] == 301


def test_crop_is_for_self_supervised_families_only():
    from raytrain_speech.config import ConfigError, load_config
    from raytrain_speech.models.registry import check_config

    check_config(load_config(None, ["model.family=wavlm", "data.crop_s=16"]))
    with pytest.raises(ConfigError, match=r"data\.crop_s"):
        check_config(load_config(None, ["model.family=conformer_ctc", "data.crop_s=16"]))


def _wav(n_samples: int, rate_hz: int = 16000) -> bytes:
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, (np.sin(np.arange(n_samples) / 7) * 0.2).astype(np.float32), rate_hz, format="WAV",
             subtype="PCM_16")
    return buf.getvalue()


def test_poison_pills_become_named_rows_and_the_good_ones_train():
    """The issue's pills, one batch: a 16-sample WAV (crashed torch.stft), a file whose header is
    far longer than its duration_s says, a wrong sample_rate_hz, a header above data.max_duration_s.
    Each is a row with a reason; none raises; the good row keeps its features."""
    from raytrain_speech.data.preprocess import is_filtered

    batch = _row_batch(5)
    batch["id"] = ["good", "tiny", "liar", "rate", "long"]
    batch["audio"][1] = _wav(16)  # 44-byte header + 32 bytes: 1 ms
    batch["duration_s"][1] = 0.001
    batch["audio"][2] = _wav(16000 * 20)  # 20 s of audio labelled 1 s: the header tells before decoding
    batch["sample_rate_hz"] = [16000, 16000, 16000, 8000, 16000]
    batch["audio"][4] = _wav(16000 * 3)
    batch["duration_s"][4] = 3.0
    utts, bad = to_utterances(Preprocessor(FeatureConfig(), TextConfig(), duration_range_s=(None, 2.5))(batch))
    assert [u.id for u in utts] == ["good"]
    reasons = {utt_id: reason for _, utt_id, reason in bad}
    assert "audio too short: 16 samples" in reasons["tiny"] and "data.min_duration_s" in reasons["tiny"]
    assert "mislabelled audio: the header says 20.00 s" in reasons["liar"]
    assert "sample rate mismatch" in reasons["rate"] and "8000" in reasons["rate"]
    assert is_filtered(reasons["long"]) or "data.max_duration_s" in reasons["long"]


def test_header_checks_run_before_any_sample_is_decoded(monkeypatch):
    """A file whose header is above max_duration_s, or longer than duration_s says, is refused from
    its header: sf.SoundFile.read (which allocates the whole file) is never called."""
    import soundfile as sf

    calls = []
    real_read = sf.SoundFile.read
    monkeypatch.setattr(sf.SoundFile, "read", lambda self, *a, **k: calls.append(1) or real_read(self, *a, **k))
    four_s = _wav(16000 * 4)
    assert audio.load(four_s, 16000, 4.0, 16000, 30.0).shape == (64000,) and calls
    calls.clear()
    with pytest.raises(audio.AudioTooLong, match="longer than 3 s"):
        audio.load(four_s, 16000, None, None, 3.0)
    with pytest.raises(audio.AudioError, match="mislabelled"):
        audio.load(four_s, 16000, 1.0)
    assert not calls


def test_an_unexpected_exception_is_a_bad_row_naming_its_type(monkeypatch):
    """Anything the checks did not anticipate (here: the front end raising) is one row's reason, not
    a task failure that Ray Data would retry deterministically."""
    pre = Preprocessor(FeatureConfig(), TextConfig())

    def broken(samples):
        raise RuntimeError("padding (200, 200) at dimension 2 of input [1, 1, 16]\nsecond line")

    monkeypatch.setattr(pre, "features", broken)
    utts, bad = to_utterances(pre(_row_batch(2)))
    assert not utts and len(bad) == 2
    assert bad[0][2].startswith("preprocessing failed: RuntimeError: padding (200, 200)")
    assert "second line" not in bad[0][2]
