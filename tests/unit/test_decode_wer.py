import torch

from raytrain_speech.evaluate.decode import ctc_greedy
from raytrain_speech.evaluate.wer import error_rates


def test_greedy_merges_repeats_and_drops_blanks():
    path = [1, 1, 0, 1, 2, 2, 0, 0, 3]
    lp = torch.full((1, len(path), 4), -10.0)
    for t, k in enumerate(path):
        lp[0, t, k] = 0.0
    assert ctc_greedy(lp, torch.tensor([len(path)])) == [[1, 1, 2, 3]]
    assert ctc_greedy(lp, torch.tensor([3])) == [[1]]


def test_wer_and_cer_by_hand():
    r = error_rates(["the cat sat", "a b"], ["the hat sat", "a b"])
    assert abs(r["wer"] - 1 / 5) < 1e-9
    assert abs(r["cer"] - 1 / 14) < 1e-9
    empty = error_rates(["one two three"], [""])
    assert empty["wer"] == 1.0
