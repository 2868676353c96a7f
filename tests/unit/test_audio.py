import io

import numpy as np
import pytest
import soundfile as sf

from raytrain_speech.data import audio


def _wav_bytes(samples, rate, fmt="WAV", subtype="PCM_16"):
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def test_flac_round_trip_and_stereo_to_mono():
    t = np.arange(16000) / 16000
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    back, rate = audio.decode(audio.encode_flac(tone, 16000))
    assert rate == 16000 and np.max(np.abs(back - tone)) < 1e-3
    stereo = np.stack([tone, -tone * 0 + tone], axis=1)
    mono, _ = audio.decode(_wav_bytes(stereo, 16000))
    assert mono.ndim == 1 and np.allclose(mono, tone, atol=1e-3)


def test_resample_keeps_the_frequency():
    rate_in = 22050
    t = np.arange(rate_in) / rate_in
    tone = np.sin(2 * np.pi * 1000 * t).astype(np.float32)
    out = audio.load(_wav_bytes(tone, rate_in, subtype="FLOAT"), 16000)
    assert abs(len(out) - 16000) <= 1
    peak_hz = np.argmax(np.abs(np.fft.rfft(out))) * 16000 / len(out)
    assert abs(peak_hz - 1000) < 5


@pytest.mark.parametrize("data, reason", [
    (b"", "empty"),
    (b"not audio at all" * 10, "cannot decode"),
])
def test_corrupt_bytes(data, reason):
    with pytest.raises(audio.AudioError, match=reason) as err:
        audio.load(data, 16000)
    assert "BytesIO" not in str(err.value) and " at 0x" not in str(err.value)  # no in-memory file's repr


def test_truncated_flac_and_nan_and_zero_length():
    good = audio.encode_flac(np.zeros(16000, np.float32) + 0.1, 16000)
    with pytest.raises(audio.AudioError):
        audio.load(good[:40], 16000)
    nan = np.full(1000, np.nan, np.float32)
    with pytest.raises(audio.AudioError, match="NaN"):
        audio.load(_wav_bytes(nan, 16000, subtype="FLOAT"), 16000)
    with pytest.raises(audio.AudioError, match="zero-length"):
        audio.load(_wav_bytes(np.zeros(0, np.float32), 16000), 16000)
