import numpy as np

from raytrain_speech.data import audio
from raytrain_speech.data.features import FeatureConfig
from raytrain_speech.data.preprocess import Preprocessor, to_utterances
from raytrain_speech.data.text import TextConfig


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
