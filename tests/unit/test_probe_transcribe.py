"""Linear probes on features with known structure, encoder pooling for each SSL family, and CTC word
times from a hand-made alignment."""

import numpy as np
import pytest
import torch

from raytrain_speech.batch import BLANK_ID
from raytrain_speech.config import ModelSpec
from raytrain_speech.data.batching import Utterance
from raytrain_speech.data.text import CharTokenizer
from raytrain_speech.evaluate import probe, probe_heads
from raytrain_speech.evaluate.transcribe import word_times
from raytrain_speech.models.registry import build_model


def _split(n_speakers=8, per=10):
    speaker_N = np.repeat([f"s{i}" for i in range(n_speakers)], per)
    train_N = np.tile(np.arange(per) % 2 == 0, n_speakers)
    return speaker_N, train_N


def test_speaker_probe_separates_speakers_and_not_noise():
    rng = np.random.default_rng(0)
    speaker_N, train_N = _split()
    centres = rng.standard_normal((8, 16)) * 3
    idx = np.unique(speaker_N, return_inverse=True)[1]
    informative = centres[idx] + rng.standard_normal((len(idx), 16))
    noise = rng.standard_normal((len(idx), 16))
    assert probe.speaker_accuracy(informative, speaker_N, train_N) > 0.9
    assert probe.speaker_accuracy(noise, speaker_N, train_N) < 0.4  # chance is 1/8


def test_ridge_probe_recovers_a_linear_target():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((200, 8))
    f0 = 50 + x @ rng.standard_normal(8) * 5
    train = np.arange(200) % 2 == 0
    assert probe_heads.ridge_rmse(x, f0, train) < 2.0  # ridge shrinkage on 100 points; the target's sd is ~14
    assert probe_heads.ridge_rmse(rng.standard_normal((200, 8)), f0, train) > 5.0


@pytest.mark.parametrize("family", ["wav2vec2", "wavlm", "conformer_mlm", "conformer_ctc"])
def test_pooled_features_cover_every_block_and_do_not_depend_on_batch_mates(family):
    torch.manual_seed(0)
    model = build_model(ModelSpec(family=family), CharTokenizer().vocab_size).eval()
    waveform = family == "wav2vec2"
    rng = np.random.default_rng(0)
    short = rng.standard_normal(8000 if waveform else (50, 80)).astype(np.float32)
    long = rng.standard_normal(24000 if waveform else (150, 80)).astype(np.float32)
    utts = [Utterance(0, "a", 0.5, short, np.zeros(1, np.int16)), Utterance(1, "b", 1.5, long, np.zeros(1, np.int16))]
    together = probe.pooled_features(model, utts)
    alone = probe.pooled_features(model, utts[:1])
    blocks, _ = probe._blocks(model)
    assert len(blocks) >= 2
    assert together["a"].shape == (2 * model_width(model),) and np.isfinite(together["a"]).all()
    np.testing.assert_allclose(together["a"], alone["a"], atol=1e-5)
    assert not np.allclose(together["a"], together["b"])


def model_width(model):
    blocks, _ = probe._blocks(model)
    return next(p for n, p in blocks[0].named_parameters() if p.dim() == 2).shape[1]


def test_word_times_follow_the_alignment():
    tok = CharTokenizer()
    space = tok.symbols.index(" ")
    ids = tok.encode("ab c")
    # 10 frames: a a _ b _ ' ' c c _ _  (blank between), frame = 0.1 s
    path = [ids[0], ids[0], BLANK_ID, ids[1], BLANK_ID, space, ids[3], ids[3], BLANK_ID, BLANK_ID]
    lp = torch.full((10, tok.vocab_size), -20.0)
    lp[torch.arange(10), torch.tensor(path)] = 0.0
    words = word_times(lp.log_softmax(-1), ids, space, 0.1)
    assert [(round(w.start_s, 2), round(w.end_s, 2)) for w in words] == [(0.0, 0.4), (0.6, 0.8)]
    assert word_times(lp, [], space, 0.1) is None
