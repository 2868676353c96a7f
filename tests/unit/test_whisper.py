import numpy as np
import pytest
import torch

from raytrain_speech.config import ConfigError, from_dict
from raytrain_speech.data.batching import Utterance, collate
from raytrain_speech.models.layers import MultiHeadAttention, sinusoids, teacher_forcing
from raytrain_speech.models.whisper import PRESETS, Whisper, WhisperConfig, published_specials
from raytrain_speech.objectives import seq2seq

VOCAB = 29  # the default char tokenizer: blank, space, a-z, apostrophe


def _batch(n=3, frames=60, seed=0, languages=None):
    rng = np.random.default_rng(seed)
    utts = [Utterance(i, f"u{i}", frames / 100, rng.standard_normal((frames - 7 * i, 80)).astype(np.float32),
                      rng.integers(1, VOCAB, size=6 + i), language=(languages or [""] * n)[i]) for i in range(n)]
    return collate(utts)


def _targets(b):
    return [t[:n].tolist() for t, n in zip(b.targets_BL, b.target_lengths_B)]


def _small(**over):
    return Whisper(WhisperConfig(**{"d_model": 96, "encoder_layers": 1, "decoder_layers": 1, "dropout": 0.0,
                                    **over}), VOCAB)


def test_large_v3_parameter_count_on_meta():
    with torch.device("meta"):
        cfg = from_dict(WhisperConfig, PRESETS["large_v3"], prefix="model.overrides.")
        model = Whisper(cfg, cfg.vocab_size, published_specials(cfg))  # Whisper's own tokenizer: 51,866 ids
    assert model.decoder.embed.num_embeddings == 51_866
    count = sum(p.numel() for p in model.parameters())
    assert count == 1_541_509_120
    assert abs(count - 1.55e9) / 1.55e9 < 0.01


def test_tiny_forward_shapes_and_special_layout():
    torch.manual_seed(0)
    model = Whisper(from_dict(WhisperConfig, PRESETS["tiny"]), VOCAB)
    assert 1e6 < sum(p.numel() for p in model.parameters()) < 2e6
    b = _batch(languages=["en", "", "EN"])
    out = model(b)
    p, length = 3, b.targets_BL.shape[1]
    assert out["logits_BLV"].shape == (3, p + length, VOCAB + 3 + 1)
    assert out["lengths_B"].tolist() == [(f + 1) // 2 for f in b.feature_lengths_B.tolist()]
    assert out["decoder_targets_BL"].shape == (3, p + length)
    assert int((out["decoder_targets_BL"] != seq2seq.IGNORE_ID).sum()) == seq2seq.units(b)
    assert model.eot_id == VOCAB and model.sot_id == VOCAB + 1 and model.transcribe_id == VOCAB + 2
    assert model.prefix(["en", ""], 2).tolist() == [[VOCAB + 1, VOCAB + 3, VOCAB + 2]] * 2


def test_padding_does_not_change_a_row():
    torch.manual_seed(0)
    model = _small().eval()
    b = _batch()
    one = collate([Utterance(2, "u2", 0.46, b.features_BFM[2, :46].numpy(), b.targets_BL[2, :8].numpy())])
    with torch.no_grad():
        full, alone = model(b), model(one)
    n = 3 + 8 + 1
    assert torch.allclose(full["logits_BLV"][2, :n], alone["logits_BLV"][0, :n], atol=1e-4)


def test_teacher_forcing_shifts_targets_behind_the_prompt():
    targets_BL = torch.tensor([[5, 6, 7], [8, 0, 0]])
    prefix_BP = torch.tensor([[100, 101, 102], [100, 103, 102]])
    dec_in, dec_out = teacher_forcing(targets_BL, torch.tensor([3, 1]), prefix_BP, eot_id=99, pad_id=99)
    assert dec_in.tolist() == [[100, 101, 102, 5, 6, 7], [100, 103, 102, 8, 99, 99]]
    assert dec_out.tolist() == [[-100, -100, 5, 6, 7, 99], [-100, -100, 8, 99, -100, -100]]


def test_overfit_one_batch_then_greedy_returns_the_targets():
    torch.manual_seed(0)
    model = _small()
    b = _batch()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    units = seq2seq.units(b)
    history = []
    for _ in range(30):
        loss_sum, n, stats = seq2seq.loss(b, model(b))
        opt.zero_grad()
        (loss_sum / units).backward()
        opt.step()
        history.append({**stats, "loss_sum": float(loss_sum.detach()), "tokens": n})
    assert history[-1]["loss_sum"] < 0.1 * history[0]["loss_sum"]
    assert history[-1]["tokens"] == units == float(b.target_lengths_B.sum()) + 3
    assert history[-1]["accuracy_sum"] == units
    model.eval()
    assert model.transcribe(b) == _targets(b)
    assert [len(h) for h in model.transcribe(b, max_len=2)] == [2, 2, 2]


def test_label_smoothing_changes_the_summed_loss():
    torch.manual_seed(0)
    model = _small()
    b = _batch()
    out = model(b)
    plain, n, _ = seq2seq.loss(b, out)
    smoothed, n_smoothed, _ = seq2seq.loss(b, out, label_smoothing=0.1)
    assert n == n_smoothed == seq2seq.units(b) and not torch.isclose(plain, smoothed)


def test_bf16_autocast_gradients_are_finite():
    torch.manual_seed(0)
    model = _small(dropout=0.1)
    b = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(b)
        loss, _, _ = seq2seq.loss(b, out)
    assert loss.dtype == torch.float32
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert np.isfinite(float(loss.detach()))


def test_errors_name_what_is_wrong():
    model = _small(languages=["en", "de"])
    with pytest.raises(ValueError, match="'xx'"):
        model(_batch(languages=["en", "de", "xx"]))
    with pytest.raises(ValueError, match="max_source_positions"):
        _small(max_source_positions=20)(_batch(frames=60))
    with pytest.raises(ConfigError, match=r"lacks Whisper's special token\(s\) <\|startoftranscript\|>"):
        Whisper(from_dict(WhisperConfig, {}), 40, {"<|endoftext|>": 39})
    with pytest.raises(ConfigError, match="num_heads"):
        from_dict(WhisperConfig, {"d_model": 100, "num_heads": 3})


def test_attention_layers():
    assert sinusoids(4, 6).shape == (4, 6)
    assert torch.equal(sinusoids(3, 4)[0], torch.tensor([0.0, 0.0, 1.0, 1.0]))
    torch.manual_seed(0)
    attn = MultiHeadAttention(8, 2).eval()
    x = torch.randn(1, 5, 8)
    causal = attn(x, causal=True)
    assert torch.allclose(causal[:, :3], attn(x[:, :3], causal=True), atol=1e-6)  # no peeking ahead
    padded = attn(x, key_lengths_B=torch.tensor([3]), causal=True)
    assert torch.allclose(padded[:, :3], causal[:, :3], atol=1e-6)
