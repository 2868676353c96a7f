from dataclasses import replace

import numpy as np
import pytest
import torch

from raytrain_speech.config import FeatureConfig, SynthConfig, from_dict
from raytrain_speech.data.batching import Utterance, collate
from raytrain_speech.data.features import FeatureExtractor
from raytrain_speech.data.synth import make_specs, render
from raytrain_speech.data.text import CharTokenizer
from raytrain_speech.models.masking import frame_span_mask, model_span_mask
from raytrain_speech.models.wavlm import (
    PRESETS,
    GatedRelativeAttention,
    WavLMConfig,
    WavLMCTC,
    WavLMPretraining,
    expected_mask_coverage,
    relative_position_bucket,
)
from raytrain_speech.objectives import ctc, masked

VOCAB = CharTokenizer().vocab_size


def _cfg(preset: str, **overrides) -> WavLMConfig:
    return from_dict(WavLMConfig, {**PRESETS[preset], **overrides})


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def speech_batch():
    """Four real (espeak-synthesized) utterances as normalised 80-bin log-mel, with transcripts."""
    specs = make_specs(SynthConfig(train_hours=0.005, dev_utterances=4, test_utterances=4, train_speakers=4,
                                   heldout_speakers=2))["dev"][:4]
    fx, tok = FeatureExtractor(FeatureConfig()), CharTokenizer()
    utts = []
    for i, spec in enumerate(specs):
        wav = render(spec, 16000)
        utts.append(Utterance(i, spec.id, len(wav) / 16000, fx(wav), np.array(tok.encode(spec.text)), spec.text))
    return collate(utts)


def _draw_mask(model, batch, epoch: int = 0):
    batch.mask_BT = model_span_mask(model, batch, seed=0, epoch=epoch)
    return batch


def test_preset_sizes_on_meta():
    with torch.device("meta"):
        large = WavLMPretraining(_cfg("large_plus"), VOCAB)
        base = WavLMPretraining(_cfg("base_plus"), VOCAB)
        tiny = WavLMPretraining(_cfg("tiny"), VOCAB)
    assert abs(_count(large) - 600e6) / 600e6 < 0.01
    assert abs(_count(base) - 95e6) / 95e6 < 0.02
    assert 1e6 <= _count(tiny) <= 3e6


def test_relative_position_buckets_are_exact_near_and_log_spaced_far():
    rel = torch.arange(-2000, 2001)
    b = relative_position_bucket(rel, 320, 800)
    assert b.min() >= 0 and b.max() < 320
    assert b[2000 + 5] - b[2000 + 4] == 1 and b[2000 - 5] != b[2000 + 5]  # exact, and direction-aware
    assert b[2000 + 800] == b[2000 + 2000] == 319 and b[2000 - 2000] == 159  # saturates at max distance


def test_gated_bias_shapes_and_gate_depends_on_the_query():
    torch.manual_seed(0)
    attn = GatedRelativeAttention(d_model=32, num_heads=4, dropout=0.0, gated=True)
    bias_HTS = torch.randn(4, 6, 6)
    q_BHTK = torch.randn(2, 4, 6, 8)
    gated = attn.gated_bias(q_BHTK, bias_HTS)
    assert gated.shape == (2, 4, 6, 6)
    factor = gated / bias_HTS
    assert torch.allclose(factor, factor[..., :1].expand_as(factor), atol=1e-5)  # one gate per query row
    assert (factor > 1).all() and (factor < 2).all()  # (1, max(2, 1 + s)) with s initialised to 1
    assert not torch.allclose(attn.gated_bias(q_BHTK * 3, bias_HTS), gated)  # a different query, another gate
    assert not torch.allclose(factor[0, :, 0], factor[0, :, 1])  # rows (queries) get their own gates
    ungated = GatedRelativeAttention(32, 4, 0.0, gated=False).gated_bias(q_BHTK, bias_HTS)
    assert torch.equal(ungated, bias_HTS.expand(2, -1, -1, -1))


def test_preset_mask_parameters_cover_80_percent_of_long_utterances():
    cfg = _cfg("large_plus")
    lengths_B = torch.full((32,), 2000)  # 80 s at 40 ms frames: the edges do not matter
    mask_BT = frame_span_mask(lengths_B, list(range(32)), cfg.mask_prob, cfg.mask_span_frames, 7, 0, cfg.min_masks)
    coverage = float(mask_BT.float().mean())
    assert abs(coverage - 0.80) < 0.05
    assert abs(coverage - expected_mask_coverage(cfg.mask_prob, cfg.mask_span_frames, 2000)) < 0.01
    segment = frame_span_mask(torch.full((64,), 400), list(range(64)), cfg.mask_prob, cfg.mask_span_frames, 7, 0)
    assert abs(float(segment.float().mean()) - 0.80) < 0.05  # the recipe's 16 s segments


def test_encoder_frame_sees_only_its_own_four_input_frames():
    model = WavLMPretraining(_cfg("tiny"), VOCAB)
    x_BFM = torch.randn(1, 40, 80, requires_grad=True)
    model.encoder.feature_encoder(x_BFM)[0, 3].sum().backward()
    touched = x_BFM.grad[0].abs().sum(-1).nonzero().flatten().tolist()
    assert touched == [12, 13, 14, 15]  # masking frame 3 hides its whole target; no neighbour leaks it


def test_forward_shapes_targets_and_mask(speech_batch):
    torch.manual_seed(0)
    model = WavLMPretraining(_cfg("tiny"), VOCAB).eval()
    batch = speech_batch
    batch.mask_BT = None
    out = model(batch)  # draws its own mask when the loop has not
    lengths_B = batch.feature_lengths_B // 4
    assert out["lengths_B"].tolist() == lengths_B.tolist()
    t = int(lengths_B.max())
    assert out["pred_BTP"].shape == out["target_BTP"].shape == (batch.size, t, 320)
    assert out["pred_BTP"].dtype == torch.float32
    assert torch.equal(out["target_BTP"][0, 2], batch.features_BFM[0, 8:12].reshape(-1))  # from the unmasked input
    drawn = _draw_mask(model, batch).mask_BT
    assert torch.equal(out["mask_BT"], drawn)
    assert 0.6 < masked.units(batch) / float(lengths_B.sum()) < 0.9
    batch.mask_BT = None
    with pytest.raises(ValueError, match="mask_BT"):
        masked.units(batch)


def test_masked_reconstruction_loss_falls_on_real_speech(speech_batch):
    torch.manual_seed(0)
    model = WavLMPretraining(_cfg("tiny", dropout=0.0), VOCAB)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses, zero_baseline = [], []
    for step in range(40):
        batch = _draw_mask(model, speech_batch, epoch=step)  # a fresh mask every step: no memorising
        units = masked.units(batch)
        out = model(batch)
        loss_sum, n, _ = masked.loss(batch, out)
        assert n == units
        opt.zero_grad()
        (loss_sum / units).backward()
        opt.step()
        losses.append(float(loss_sum.detach()) / units)
        zero_baseline.append(float(out["target_BTP"].abs().mean(-1)[out["mask_BT"]].mean()))
    assert np.mean(losses[-5:]) < 0.85 * np.mean(losses[:3])
    assert np.mean(losses[-5:]) < 0.95 * np.mean(zero_baseline[-5:])  # better than predicting the mean


def test_loss_counts_exactly_the_masked_valid_frames(speech_batch):
    model = WavLMPretraining(_cfg("tiny"), VOCAB).eval()
    batch = _draw_mask(model, speech_batch)
    out = model(batch)
    loss_sum, n, _ = masked.loss(batch, out)
    assert n == masked.units(batch) == float(out["mask_BT"].sum()) > 0
    error_BT = (out["pred_BTP"] - out["target_BTP"]).abs().mean(-1)
    assert loss_sum.item() == pytest.approx(float(error_BT[out["mask_BT"]].detach().sum()), rel=1e-5)


def test_grads_finite_under_bf16_autocast_on_cpu(speech_batch):
    torch.manual_seed(0)
    model = WavLMPretraining(_cfg("tiny"), VOCAB)
    batch = _draw_mask(model, speech_batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
        loss, _, _ = masked.loss(batch, out)
    assert loss.dtype == torch.float32
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_ctc_model_loads_the_pretrained_encoder_and_learns(speech_batch):
    torch.manual_seed(0)
    pre = WavLMPretraining(_cfg("tiny", dropout=0.0), VOCAB)
    model = WavLMCTC(_cfg("tiny", dropout=0.0), VOCAB)
    missing, unexpected = model.load_pretrained(pre.state_dict())
    assert missing == [] and unexpected == []
    for k, v in pre.encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[k], v), k
    batch = speech_batch
    batch.mask_BT = None
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        out = model(batch)
        assert out["log_probs_BTV"].dtype == torch.float32 and out["log_probs_BTV"].shape[-1] == VOCAB
        loss_sum, n, _ = ctc.loss(batch, out)
        opt.zero_grad()
        (loss_sum / n).backward()
        opt.step()
        losses.append(float(loss_sum.detach()) / n)
    assert losses[-1] < 0.5 * losses[0]


def test_variants_post_ln_ungated_no_pos_conv_and_renormalised_targets(speech_batch):
    torch.manual_seed(0)
    cfg = _cfg("tiny", layer_norm_first=False, gated_position_bias=False, pos_conv_kernel=0,
               target_kind="log_mel_renorm", num_layers=1)
    model = WavLMPretraining(cfg, VOCAB)
    batch = _draw_mask(model, speech_batch)
    scaled = batch.features_BFM * 3.0 + 1.0  # un-normalised features: renorm recovers the same targets
    out = model(batch)
    out_scaled = model(replace(batch, features_BFM=scaled))
    valid = out["mask_BT"]
    assert torch.allclose(out["target_BTP"][valid], out_scaled["target_BTP"][valid], atol=1e-4)
    loss, _, _ = masked.loss(batch, out)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
