"""Our Conformer blocks (models/conformer_blocks.py): torchaudio parity without positions, ESPnet's
relative positional attention with, padding invariance, and the three Conformer families on top."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchaudio

from raytrain_speech.config import Config, ConfigError, ModelSpec, dump_yaml
from raytrain_speech.data.batching import Utterance, collate
from raytrain_speech.evaluate.loading import load_model
from raytrain_speech.models.conformer import checkpoint_attention
from raytrain_speech.models.conformer_blocks import Conformer, SelfAttention, relative_sinusoids
from raytrain_speech.models.layers import sinusoids
from raytrain_speech.models.masking import model_span_mask
from raytrain_speech.models.registry import build_model, resolve
from raytrain_speech.train import checkpoint

D, H = 16, 2
REL_POS_TENSORS = ("self_attn.linear_pos.weight", "self_attn.pos_bias_u", "self_attn.pos_bias_v")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: a second intra-op thread only spins, and on a busy 2-core box it turns
    milliseconds into seconds."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _espnet_table(t: int, d: int) -> torch.Tensor:
    """ESPnet's RelPositionalEncoding.extend_pe, transcribed: positive offsets flipped, then negative."""
    pos = torch.arange(t, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * -(math.log(10000.0) / d))
    pe_pos, pe_neg = torch.zeros(t, d), torch.zeros(t, d)
    pe_pos[:, 0::2], pe_pos[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
    pe_neg[:, 0::2], pe_neg[:, 1::2] = torch.sin(-pos * div), torch.cos(-pos * div)
    return torch.cat([torch.flip(pe_pos, [0]), pe_neg[1:]])


def _espnet_attention(attn: SelfAttention, x_BTD, pad_BT):
    """ESPnet's RelPositionMultiHeadedAttention, spelled out: explicit scores, pad-and-reshape rel_shift."""
    b, t, _ = x_BTD.shape
    q, k, v = (y.view(b, t, H, D // H) for y in F.linear(x_BTD, attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1))
    p = attn.linear_pos(_espnet_table(t, D)).view(-1, H, D // H).transpose(0, 1)  # H, P, K
    ac = (q + attn.pos_bias_u).transpose(1, 2) @ k.permute(0, 2, 3, 1)
    bd = (q + attn.pos_bias_v).transpose(1, 2) @ p.transpose(1, 2)  # B, H, T, 2T-1
    padded = torch.cat([bd.new_zeros(b, H, t, 1), bd], dim=-1).view(b, H, 2 * t, t)
    bd = padded[:, :, 1:].reshape(b, H, t, 2 * t - 1)[:, :, :, :t]
    scores = ((ac + bd) / math.sqrt(D // H)).masked_fill(pad_BT[:, None, None, :], float("-inf"))
    y = scores.softmax(-1) @ v.transpose(1, 2)
    return attn.out_proj(y.transpose(1, 2).reshape(b, t, D))


@pytest.mark.parametrize("convolution_first", [False, True])
def test_attention_none_is_torchaudio_bit_for_bit(convolution_first):
    torch.manual_seed(0)
    kw = dict(input_dim=D, num_heads=H, ffn_dim=32, num_layers=2, depthwise_conv_kernel_size=5, dropout=0.0,
              convolution_first=convolution_first)
    ref = torchaudio.models.Conformer(**kw)
    ours = Conformer(**kw, attention="none", mask_conv_padding=False)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x_BTD, lengths_B = torch.randn(3, 19, D), torch.tensor([19, 12, 5])
    for train in (True, False):  # train: BatchNorm's batch statistics, padded frames included as torchaudio
        ref.train(train), ours.train(train)
        (want, _), (got, got_lengths) = ref(x_BTD, lengths_B), ours(x_BTD, lengths_B)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert torch.equal(got_lengths, lengths_B)
    with_pos = set(Conformer(**kw).state_dict()) - set(ref.state_dict())
    assert with_pos == {f"conformer_layers.{i}.{n}" for i in range(2) for n in REL_POS_TENSORS}


def test_rel_pos_attention_is_espnet_math_forward_and_backward():
    torch.manual_seed(0)
    assert torch.allclose(relative_sinusoids(7, D), _espnet_table(7, D), atol=1e-6)
    attn = SelfAttention(D, H, rel_pos=True)
    x_BTD = torch.randn(2, 9, D)
    pad_BT = torch.arange(9)[None, :] >= torch.tensor([9, 6])[:, None]
    got = attn(x_BTD, pad_BT, relative_sinusoids(9, D))
    grads = torch.autograd.grad(got[~pad_BT].square().sum(), list(attn.parameters()))
    want = _espnet_attention(attn, x_BTD, pad_BT)
    want_grads = torch.autograd.grad(want[~pad_BT].square().sum(), list(attn.parameters()))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def _shift_and_order(attn, pos=None, absolute=False):
    """(output of z at frames 0..L-1 == output of z at frames s..s+L-1 among ignored keys,
    output of z reversed == output of z, reversed): the first holds for relative positions (and none),
    the second only for none: together they single out relative positions."""
    torch.manual_seed(1)
    z, junk = torch.randn(1, 6, D), torch.randn(1, 5, D)
    far = torch.cat([junk, z, junk[:, :3]], dim=1)  # z at frames 5..10, every other key ignored
    pad = torch.ones(1, 14, dtype=torch.bool)
    pad[:, 5:11] = False

    def run(x, pad_BT=None):
        if absolute:  # a control: absolute sinusoids added to the frames, position-free attention
            x = x + sinusoids(x.shape[1], D)
        return attn(x, pad_BT, relative_sinusoids(x.shape[1], D) if pos else None)

    near = run(z)
    shifted = torch.allclose(run(far, pad)[:, 5:11], near, atol=1e-5)
    order_blind = torch.allclose(run(z.flip(1)), near.flip(1), atol=1e-5)
    return shifted, order_blind


def test_rel_pos_scores_depend_on_offsets_only():
    torch.manual_seed(0)
    with torch.no_grad():
        assert _shift_and_order(SelfAttention(D, H, rel_pos=True).eval(), pos=True) == (True, False)
        none = SelfAttention(D, H, rel_pos=False).eval()
        assert _shift_and_order(none) == (True, True)  # no positions: blind to order
        assert _shift_and_order(none, absolute=True)[0] is False  # absolute positions: not shift-invariant


@pytest.mark.parametrize("attention", ["rel_pos", "none"])
def test_a_padded_row_computes_what_it_computes_alone(attention):
    torch.manual_seed(0)
    enc = Conformer(D, H, 32, 2, 5, dropout=0.1, attention=attention, mask_conv_padding=attention != "none").eval()
    enc.conformer_layers[0].conv_module.sequential[3].running_mean.normal_()  # non-trivial BatchNorm
    x_BTD, lengths_B = torch.randn(2, 24, D), torch.tensor([24, 15])
    with torch.no_grad():
        together = enc(x_BTD, lengths_B)[0][1, :15]
        alone = enc(x_BTD[1:, :15], lengths_B[1:])[0][0]
    # attention="none" is torchaudio's: its depthwise convolution reads the padding (the reason for the mask).
    assert torch.allclose(together, alone, atol=1e-5) == (attention == "rel_pos")


def test_gradients_reach_the_position_parameters_of_every_block():
    torch.manual_seed(0)
    enc = Conformer(D, H, 32, 3, 5, dropout=0.1, attention="rel_pos")
    y_BTD, _ = enc(torch.randn(2, 11, D), torch.tensor([11, 7]))
    y_BTD.square().mean().backward()
    for layer in enc.conformer_layers:
        for p in (layer.self_attn.linear_pos.weight, layer.self_attn.pos_bias_u, layer.self_attn.pos_bias_v):
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["conformer_ctc", "conformer_aed", "conformer_mlm"])
def test_attention_must_be_a_known_kind(family):
    assert resolve(ModelSpec(family)).attention == "rel_pos"
    with pytest.raises(ConfigError, match=r"model\.overrides\.attention.*rel_pos, none"):
        resolve(ModelSpec(family, overrides={"attention": "absolute"}))


def _batch(n=2, frames=90):
    rng = np.random.default_rng(0)
    return collate([Utterance(i, f"u{i}", frames / 100, rng.standard_normal((frames - 20 * i, 80)).astype(np.float32),
                              rng.integers(2, 29, size=5 + i)) for i in range(n)])


def test_the_three_families_run_with_rel_pos_and_mlm_initialises_ctc_with_it():
    torch.manual_seed(0)
    b = _batch()
    spec = {name: ModelSpec(name, overrides={"num_layers": 2}) for name in ("conformer_ctc", "conformer_aed",
                                                                          "conformer_mlm")}
    models = {name: build_model(s, 29) for name, s in spec.items()}
    out = models["conformer_ctc"](b)
    assert out["log_probs_BTV"].shape[:2] == (2, int(out["lengths_B"].max())) and out["log_probs_BTV"].isfinite().all()
    assert models["conformer_aed"](b)["logits_BLV"].isfinite().all()
    b.mask_BT = model_span_mask(models["conformer_mlm"], b)
    assert models["conformer_mlm"](b)["pred_BTP"].isfinite().all()

    mlm_state = models["conformer_mlm"].state_dict()
    left, unused = models["conformer_ctc"].load_pretrained(mlm_state)
    assert left == ["head.bias", "head.weight"] and unused == ["head.bias", "head.weight", "mask_emb"]
    ctc_state = models["conformer_ctc"].state_dict()
    for name in (f"encoder.conformer_layers.{i}.{t}" for i in range(2) for t in REL_POS_TENSORS):
        assert torch.equal(ctc_state[name], mlm_state[name])


def test_a_checkpoint_from_before_rel_pos_loads_as_it_was_trained(tmp_path):
    """Its saved config does not name ``attention`` (so now means rel_pos); its weights have no
    position biases: eval, transcribe, export and probes must build it position-free."""
    cfg = Config()
    cfg.model.overrides = {"num_layers": 1}
    torch.manual_seed(0)
    old = build_model(ModelSpec("conformer_ctc", overrides={"num_layers": 1, "attention": "none"}), 29).eval()
    assert checkpoint_attention(old.state_dict()) == "none"
    checkpoint.save(str(tmp_path), old, None, None, checkpoint.TrainState(step=3), dump_yaml(cfg))
    loaded = load_model(str(tmp_path), need_text=False)
    assert loaded.model.encoder.attention == "none" and loaded.cfg.model.overrides["attention"] == "none"
    b = _batch()
    with torch.no_grad():
        assert torch.equal(loaded.model(b)["log_probs_BTV"], old(b)["log_probs_BTV"])
    assert checkpoint_attention(build_model(ModelSpec("conformer_ctc"), 29).state_dict()) == "rel_pos"
