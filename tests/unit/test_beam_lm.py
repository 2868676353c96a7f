import itertools
import math
import random

import pytest
import torch

from raytrain_speech.config import ConfigError, NGramConfig, TextConfig
from raytrain_speech.data.text import CharTokenizer
from raytrain_speech.evaluate.beam import attention_beam_search, ctc_beam_batch, ctc_prefix_beam_search
from raytrain_speech.evaluate.decode import ctc_greedy
from raytrain_speech.evaluate.lm import EOS, NGramLM
from raytrain_speech.models.layers import TransformerDecoder

TOK = CharTokenizer(TextConfig(alphabet="ab"))  # 0 blank, 1 space, 2 a, 3 b
WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "to", "big", "red", "house", "and", "it"]


def _corpus(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(3, 8))) for _ in range(n)]


def _collapse(path) -> tuple[int, ...]:
    out, prev = [], None
    for k in path:
        if k != prev and k != 0:
            out.append(k)
        prev = k
    return tuple(out)


def _brute_force(lp_TV: torch.Tensor) -> dict[tuple[int, ...], float]:
    """log P(labelling) by summing every one of the V^T alignments that collapses to it."""
    t, v = lp_TV.shape
    rows = lp_TV.tolist()
    probs: dict[tuple[int, ...], float] = {}
    for path in itertools.product(range(v), repeat=t):
        p = math.exp(sum(rows[i][k] for i, k in enumerate(path)))
        lab = _collapse(path)
        probs[lab] = probs.get(lab, 0.0) + p
    return {k: math.log(p) for k, p in probs.items()}


@pytest.mark.parametrize("seed", range(6))
def test_ctc_beam_finds_the_brute_force_best_labelling(seed):
    g = torch.Generator().manual_seed(seed)
    t = 4 + seed % 3  # 4..6 frames
    lp_TV = (torch.randn(t, 4, generator=g) * 1.5).log_softmax(-1)
    exact = _brute_force(lp_TV)
    best = max(exact, key=exact.get)
    hyps = ctc_prefix_beam_search(lp_TV, beam_width=2000, token_min_logp=-math.inf, tokenizer=TOK)
    assert tuple(hyps[0][0]) == best
    assert hyps[0][1] == pytest.approx(exact[best], abs=1e-9)
    for ids, score in hyps[:10]:  # every n-best entry carries its exact labelling probability
        assert score == pytest.approx(exact[tuple(ids)], abs=1e-9)


def test_beam_one_equals_greedy_on_peaky_logits():
    g = torch.Generator().manual_seed(0)
    path = torch.randint(0, 4, (3, 12), generator=g)
    logits_BTV = torch.randn(3, 12, 4, generator=g) + 6.0 * torch.nn.functional.one_hot(path, 4)
    lp_BTV = logits_BTV.log_softmax(-1)
    lengths_B = torch.tensor([12, 9, 5])
    assert ctc_beam_batch(lp_BTV, lengths_B, beam_width=1) == ctc_greedy(lp_BTV, lengths_B)
    assert ctc_beam_batch(lp_BTV, lengths_B, beam_width=8) == ctc_greedy(lp_BTV, lengths_B)


def test_lm_fusion_switches_to_the_preferred_labelling():
    # Acoustics: "ab" slightly ahead of "ba"; the LM has only ever seen "ba".
    p = torch.tensor([[0.0, 0.0, 0.55, 0.45], [0.0, 0.0, 0.45, 0.55]]).clamp(min=1e-6)
    lp_TV = p.log() - p.sum(-1, keepdim=True).log()
    lm = NGramLM.train(["ba"] * 50 + ["b a"] * 5, NGramConfig(order=3), units=TOK.symbols[1:])
    plain = ctc_prefix_beam_search(lp_TV, beam_width=8, tokenizer=TOK)
    fused = ctc_prefix_beam_search(lp_TV, beam_width=8, lm=lm, lm_weight=1.0, tokenizer=TOK)
    assert TOK.decode(plain[0][0]) == "ab"
    assert TOK.decode(fused[0][0]) == "ba"
    word_lm = NGramLM.train(["ba"] * 50 + ["b a"] * 5, NGramConfig(unit="word", min_word_count=1))
    fused_w = ctc_prefix_beam_search(lp_TV, beam_width=8, lm=word_lm, lm_weight=1.0, tokenizer=TOK)
    assert TOK.decode(fused_w[0][0]) == "ba"


@pytest.mark.parametrize("cfg", [NGramConfig(), NGramConfig(smoothing="kn", order=4),
                                 NGramConfig(unit="word"), NGramConfig(unit="word", order=2, min_word_count=1)])
def test_lm_probabilities_sum_to_one(cfg):
    lm = NGramLM.train(_corpus(), cfg, units=CharTokenizer().symbols[1:] if cfg.unit == "char" else ())
    contexts = [lm.begin(), ("<s>", "t"), tuple("the ca"), ("q", "x", "z"), ("cat", "sat"), ("nope",), ("the",)]
    for ctx in contexts:
        total = sum(math.exp(lm.logprob(ctx, u)) for u in lm.vocab)
        assert total == pytest.approx(1.0, abs=1e-9), ctx
    assert EOS in lm.vocab and "<unk>" in lm.vocab


@pytest.mark.parametrize("unit", ["char", "word"])
def test_lm_scores_save_load_and_perplexity(unit, tmp_path):
    texts = _corpus()
    lm = NGramLM.train(texts, NGramConfig(unit=unit))
    seen = texts[0]
    shuffled = " ".join(reversed(seen.split())) if unit == "word" else "".join(sorted(seen))
    assert lm.score(seen) > lm.score(shuffled)
    lm.save(tmp_path / "lm.json")
    back = NGramLM.load(tmp_path / "lm.json")
    for t in texts[:20] + ["zebra quux", "the cat"]:
        assert back.score(t) == pytest.approx(lm.score(t), abs=1e-12)
    rng = random.Random(1)
    noise = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz ", k=30)).strip() or "x" for _ in range(20)]
    assert lm.perplexity(texts[:50]) < lm.perplexity(noise)


def test_lm_config_validation():
    with pytest.raises(ConfigError, match="eval.lm.order"):
        NGramConfig(order=0).validate()
    assert NGramConfig().resolved_order == 6 and NGramConfig(unit="word").resolved_order == 3


@pytest.fixture
def one_thread():
    """The decoder here is tiny: intra-op threads only contend (10x slower on a busy 2-core box)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _decoder_and_memory(seed: int):
    torch.manual_seed(seed)
    dec = TransformerDecoder(vocab_size=8, d_model=16, num_heads=2, ffn_dim=32, num_layers=1, max_positions=20).eval()
    # Sharpen the tied projection so the distributions are not flat and beams actually compete.
    with torch.no_grad():
        dec.embed.weight.mul_(10.0)
    memory_BSD = torch.randn(3, 5, 16)
    lengths_B = torch.tensor([5, 3, 4])
    prefix_BP = torch.full((3, 1), 7, dtype=torch.int64)
    allowed_V = torch.ones(8, dtype=torch.bool)
    allowed_V[[0, 7]] = False
    return dec, memory_BSD, lengths_B, prefix_BP, allowed_V


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_attention_beam_one_is_greedy_and_wider_beams_score_no_worse(seed, one_thread):
    dec, memory_BSD, lengths_B, prefix_BP, allowed_V = _decoder_and_memory(seed)
    greedy = dec.greedy(memory_BSD, lengths_B, prefix_BP, eot_id=6, max_len=10, allowed_V=allowed_V)
    one = attention_beam_search(dec, memory_BSD, lengths_B, prefix_BP, 6, 10, beam_width=1, allowed_V=allowed_V)
    assert [nb[0][0] for nb in one] == greedy
    four = attention_beam_search(dec, memory_BSD, lengths_B, prefix_BP, 6, 10, beam_width=4, allowed_V=allowed_V)
    for a, b in zip(one, four):
        assert b[0][1] >= a[0][1] - 1e-6
        assert [h[1] for h in b] == sorted((h[1] for h in b), reverse=True)


def test_attention_beam_score_is_decoder_plus_weighted_lm_plus_bonus(one_thread):
    dec, memory_BSD, lengths_B, prefix_BP, allowed_V = _decoder_and_memory(2)
    tok = CharTokenizer(TextConfig(alphabet="abcd"))  # ids 1..5 are " abcd"; 6 eot, 7 sot
    lm = NGramLM.train(["abc abc", "ab cd", "dcba"], NGramConfig(order=3), units=tok.symbols[1:])
    out = attention_beam_search(dec, memory_BSD, lengths_B, prefix_BP, 6, 10, beam_width=3, allowed_V=allowed_V,
                                lm=lm, lm_weight=0.5, length_bonus=0.2, id_to_unit=tok.symbols)
    assert len(out) == 3 and all(1 <= len(nb) <= 3 for nb in out)
    lengths = []
    for b, nbest in enumerate(out):
        for ids, score in nbest:
            assert all(0 < t < 6 for t in ids)
            ended = len(ids) < 10
            tokens_1L = torch.tensor([[7, *ids]])
            logits_LV = dec(tokens_1L, memory_BSD[b: b + 1], lengths_B[b: b + 1])[0].float()
            lp_LV = logits_LV.masked_fill(~allowed_V, float("-inf")).log_softmax(-1)  # eot (6) is allowed
            targets = ids + [6] if ended else ids
            model = sum(lp_LV[i, t].item() for i, t in enumerate(targets))
            ctx, lm_total = lm.begin(), 0.0
            for t in ids:
                lm_total += lm.logprob(ctx, tok.symbols[t])
                ctx = lm.extend(ctx, tok.symbols[t])
            lm_total += lm.logprob(ctx, EOS)
            assert score == pytest.approx(model + 0.5 * lm_total + 0.2 * len(ids), abs=1e-4)
            lengths.append(len(ids))
    assert max(lengths) > 0 and min(lengths) < 10  # both emitted characters and ended ones were checked
