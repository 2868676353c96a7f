from dataclasses import replace

import numpy as np
import pytest
import torch
import torchaudio

from raytrain_speech.config import SynthConfig, from_dict
from raytrain_speech.data.batching import Utterance, collate
from raytrain_speech.data.synth import make_specs, render
from raytrain_speech.data.text import CharTokenizer
from raytrain_speech.models.base import SpanMasking
from raytrain_speech.models.masking import frame_span_mask, model_span_mask
from raytrain_speech.models.wav2vec2 import Wav2Vec2CTC, Wav2Vec2Pretraining, sample_negative_indices
from raytrain_speech.models.wav2vec2_encoder import (
    PRESETS,
    Wav2Vec2Config,
    Wav2Vec2Encoder,
    from_torchaudio_state_dict,
    to_torchaudio_state_dict,
)
from raytrain_speech.objectives import contrastive, ctc

TOK = CharTokenizer()


def _cfg(preset: str = "tiny", **overrides) -> Wav2Vec2Config:
    return from_dict(Wav2Vec2Config, {**PRESETS[preset], **overrides})


@pytest.fixture(scope="module")
def speech():
    """A few real (espeak-ng) utterances as a padded waveform batch: 16 kHz, different lengths."""
    specs = make_specs(SynthConfig(train_hours=0.005, dev_utterances=1, test_utterances=1, train_speakers=4,
                                   heldout_speakers=1, min_words=3, max_words=4))["train"][:4]
    utts = []
    for spec in specs:
        wav = render(spec, 16000)
        utts.append(Utterance(spec.index, spec.id, len(wav) / 16000, wav, np.array(TOK.encode(spec.text))))
    return collate(utts)


@pytest.mark.parametrize("mode,layer_norm_first", [("group_norm", False), ("group_norm", True),
                                                   ("layer_norm", False), ("layer_norm", True)])
def test_encoder_matches_torchaudio(mode, layer_norm_first):
    torch.manual_seed(0)
    ta = torchaudio.models.wav2vec2_model(
        mode, [(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2, mode == "layer_norm", 64, 0.1, 16, 4, 2, 4,
        0.1, 128, 0.1, 0.1, layer_norm_first, 0.1, None).eval()
    cfg = from_dict(Wav2Vec2Config, dict(conv_channels=32, extractor_mode=mode, conv_bias=mode == "layer_norm",
                                         d_model=64, num_layers=2, num_heads=4, ffn_dim=128, pos_conv_kernel=16,
                                         pos_conv_groups=4, layer_norm_first=layer_norm_first))
    ours = Wav2Vec2Encoder(cfg).eval()
    missing, unexpected = ours.load_state_dict(from_torchaudio_state_dict(ta.state_dict()), strict=False)
    assert missing == ["mask_embedding"] and unexpected == []
    assert set(to_torchaudio_state_dict(ours.state_dict())) == set(ta.state_dict())
    wav = torch.randn(2, 16000)
    lengths = torch.tensor([16000, 11000])
    wav[1, 11000:] = 0
    with torch.no_grad():
        ref_BTD, ref_lengths = ta(wav, lengths)
        out = ours(wav, lengths)
    assert out.lengths_B.tolist() == ref_lengths.tolist() == [49, 34]
    assert (out.context_BTD - ref_BTD)[out.valid_BT].abs().max() < 1e-4
    if mode == "layer_norm":  # no statistic over padding: a row's frames do not depend on its batch
        with torch.no_grad():
            alone = ours(wav[1:, :11000], lengths[1:]).context_BTD
        assert (alone[0] - out.context_BTD[1, :34]).abs().max() < 1e-4


def test_xl_is_the_317m_recipe_model_with_65ms_spans():
    cfg = _cfg("xl")
    with torch.device("meta"):
        model = Wav2Vec2Pretraining(cfg, 29)
    n = sum(p.numel() for p in model.parameters())
    assert n == 317_390_592 and abs(n - 317e6) / 317e6 < 0.01
    assert (cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.ffn_dim, cfg.layer_norm_first) == (1024, 24, 16, 4096, True)
    assert model.span_masking == SpanMasking(prob=0.065, span_frames=3, min_spans=2)
    assert _cfg("xl_10frame").span_frames(200.0) == 10
    with torch.device("meta"):
        base = Wav2Vec2Pretraining(_cfg("base"), 29)
        tiny = Wav2Vec2Pretraining(_cfg("tiny"), 29)
    assert abs(sum(p.numel() for p in base.parameters()) - 95.0e6) / 95e6 < 0.01
    assert 1.0e6 < sum(p.numel() for p in tiny.parameters()) < 2.0e6


def test_gumbel_temperature_anneals_with_the_step():
    model = Wav2Vec2Pretraining(_cfg("tiny"), 29)
    assert model.gumbel_temperature == 2.0
    model.set_step(100_000)
    assert model.gumbel_temperature == pytest.approx(2.0 * 0.999995 ** 100_000)
    model.set_step(10_000_000)
    assert model.gumbel_temperature == 0.5


def test_negatives_come_from_other_masked_frames_of_the_same_utterance():
    torch.manual_seed(0)
    mask_BT = torch.zeros(3, 20, dtype=torch.bool)
    mask_BT[0, 2:9] = True
    mask_BT[1, [0, 5, 6, 19]] = True
    mask_BT[2, 7] = True  # a single masked frame can only point at itself
    idx_NK = sample_negative_indices(mask_BT, 50)
    row_N = mask_BT.nonzero()[:, 0]
    n = torch.arange(len(row_N))
    assert (row_N[idx_NK] == row_N[:, None]).all()
    assert (idx_NK[row_N < 2] != n[row_N < 2, None]).all()
    assert (idx_NK[row_N == 2] == n[row_N == 2, None]).all()
    assert len(set(idx_NK[row_N == 1].flatten().tolist())) == 4  # every other frame is drawn


def test_negatives_equal_to_the_positive_are_masked_out():
    targets_NF = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    negatives_NKF = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]]])
    context_NF = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    out = {"context_NF": context_NF, "targets_NF": targets_NF, "negatives_NKF": negatives_NKF,
           "logit_temperature": torch.tensor(0.1)}
    logits_NJ = contrastive.logits(out)
    assert torch.isinf(logits_NJ[0, 1]) and torch.isfinite(logits_NJ[0, 2])
    assert torch.isfinite(logits_NJ[1]).all()


def _pretraining_batch(speech, model):
    """The batch as the training loop hands it over: span mask drawn over encoder frames."""
    mask = model_span_mask(model, speech, seed=7, epoch=0)
    return replace(speech, mask_BT=mask)


def test_forward_without_a_mask_draws_the_loops_mask_and_layer_drop_keeps_every_grad(speech):
    torch.manual_seed(0)
    model = Wav2Vec2Pretraining(_cfg("tiny", layer_drop=0.99), 29)
    with pytest.raises(ValueError, match="mask_BT is None"):
        contrastive.units(speech)
    out = model(speech)  # mask_BT None: frame_span_mask at (seed 0, epoch 0), as validation would
    spec = model.span_masking
    expected = frame_span_mask(model.output_lengths(speech.feature_lengths_B), speech.indices, spec.prob,
                               spec.span_frames, 0, 0, spec.min_spans)
    assert torch.equal(out["mask_BT"], expected) and out["context_NF"].shape[0] == int(expected.sum())
    loss, units, _ = contrastive.loss(speech, out)
    assert units == float(expected.sum())
    loss.backward()  # blocks were (almost surely) skipped, yet DDP would see a gradient for every parameter
    assert all(p.grad is not None for p in model.parameters())


def test_contrastive_accuracy_beats_chance_on_real_speech(speech):
    torch.manual_seed(0)
    model = Wav2Vec2Pretraining(_cfg("tiny", num_negatives=50, mask_prob=0.1), 29)
    batch = _pretraining_batch(speech, model)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    units = contrastive.units(batch)
    assert units == float(batch.mask_BT.sum()) > 0
    history = []
    for step in range(12):
        model.set_step(step)
        loss_sum, n, stats = contrastive.loss(batch, model(batch))
        opt.zero_grad()
        (loss_sum / units).backward()
        opt.step()
        history.append(stats)
    assert n == units
    model.eval()
    with torch.no_grad():
        _, _, stats = contrastive.loss(batch, model(batch))
    chance = 1 / (1 + 50)
    assert stats["accuracy_sum"] / units > 5 * chance, stats
    assert stats["code_perplexity_sum"] / units > 4  # not won by collapsing the codebook
    assert history[-1]["contrastive_sum"] < 0.8 * history[0]["contrastive_sum"]


def test_bf16_autocast_grads_finite_and_masks_honoured(speech):
    torch.manual_seed(0)
    model = Wav2Vec2Pretraining(_cfg("tiny"), 29)
    batch = _pretraining_batch(speech, model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
        loss, _, _ = contrastive.loss(batch, out)
    assert loss.dtype == torch.float32 and np.isfinite(float(loss.detach()))
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.encoder.mask_embedding.grad.abs().sum() > 0
    assert torch.equal(out["mask_BT"], batch.mask_BT)
    # The Transformer sees the mask embedding at exactly the masked frames.
    seen = {}
    hook = model.encoder.transformer.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    with torch.no_grad():
        model.eval()(batch)
    hook.remove()
    x_BTD, emb = seen["x"], model.encoder.mask_embedding
    assert torch.equal(x_BTD[batch.mask_BT], emb.expand(int(batch.mask_BT.sum()), -1))
    assert not (x_BTD[~batch.mask_BT] == emb).all(-1).any()


def test_ctc_loads_the_pretrained_encoder_and_learns(speech):
    torch.manual_seed(0)
    cfg = _cfg("tiny", num_layers=1, dropout=0.0, attention_dropout=0.0, input_dropout=0.0)
    pre = Wav2Vec2Pretraining(cfg, 29)
    model = Wav2Vec2CTC(cfg, TOK.vocab_size)
    state = {f"module.{k}": v for k, v in pre.state_dict().items()}  # as saved from a DDP wrapper
    missing, unexpected = model.load_pretrained(state)
    assert missing == [] and unexpected == []
    for name, tensor in model.encoder.state_dict().items():
        assert torch.equal(tensor, pre.encoder.state_dict()[name]), name
    assert {id(p) for p in model.feature_encoder_parameters()} == {
        id(p) for p in model.encoder.feature_extractor.parameters()}
    assert model.span_masking is None  # finetune_mask_prob 0: no fine-tuning time masks
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    tokens = ctc.units(speech)
    losses = []
    for _ in range(15):
        out = model(speech)
        assert out["log_probs_BTV"].dtype == torch.float32
        assert out["lengths_B"].tolist() == model.output_lengths(speech.feature_lengths_B).tolist()
        loss_sum, n, _ = ctc.loss(speech, out)
        assert n == tokens
        opt.zero_grad()
        (loss_sum / tokens).backward()
        opt.step()
        losses.append(float(loss_sum.detach()))
    assert losses[-1] < 0.7 * losses[0]


def test_channel_masks_follow_fairseq_counts_and_are_reproducible():
    from raytrain_speech.models.masking import channel_mask
    idx = list(range(400))
    mask = channel_mask(256, idx, prob=0.25, span_channels=16, seed=3, epoch=1)
    assert mask.shape == (400, 256) and mask.dtype == torch.bool
    # int(0.25 x 256 / 16 + u) = 4 blocks of 16 each: 25% before overlaps, a little less after.
    share = float(mask.float().mean())
    assert 0.18 < share <= 0.25
    runs = torch.diff(mask[0].int(), prepend=torch.zeros(1, dtype=torch.int32)).eq(1).sum()
    assert 1 <= int(runs) <= 4
    assert torch.equal(mask, channel_mask(256, idx, 0.25, 16, 3, 1))
    assert not torch.equal(mask, channel_mask(256, idx, 0.25, 16, 3, 2))  # a new epoch, new masks
    # SpecAugment's two frequency masks: prob 0, two fixed-width blocks, every row.
    spec = channel_mask(64, idx, prob=0.0, span_channels=8, seed=0, epoch=0, min_spans=2)
    per_row = spec.sum(dim=1)
    assert int(per_row.min()) >= 8 and int(per_row.max()) <= 16
    assert not channel_mask(64, idx, 0.0, 8, 0, 0).any()


def test_channel_masks_zero_the_encoders_input_channels_in_training_only(speech):
    from raytrain_speech.models.masking import model_channel_mask
    torch.manual_seed(0)
    model = Wav2Vec2CTC(_cfg(mask_channel_prob=0.3, mask_channel_span=12, dropout=0.0, attention_dropout=0.0,
                             activation_dropout=0.0, input_dropout=0.0, layer_drop=0.0), TOK.vocab_size)
    spec = model.channel_masking
    assert spec is not None and spec.num_channels == model.cfg.d_model
    assert Wav2Vec2CTC(_cfg(), TOK.vocab_size).channel_masking is None
    batch = replace(speech, channel_mask_BC=model_channel_mask(model, speech, seed=0, epoch=0))
    assert batch.channel_mask_BC.any(dim=1).all()
    seen = {}
    model.encoder.transformer.register_forward_pre_hook(lambda m, args: seen.update(x=args[0].detach()))
    model.train()
    masked_out = model(batch)["log_probs_BTV"]
    x_BTD = seen["x"]
    masked_BD = batch.channel_mask_BC
    assert x_BTD.masked_select(masked_BD[:, None, :].expand_as(x_BTD)).abs().max() == 0
    assert x_BTD.masked_select(~masked_BD[:, None, :].expand_as(x_BTD)).abs().max() > 0
    assert not torch.allclose(masked_out, model(speech)["log_probs_BTV"])
    model.eval()  # never at validation or eval
    with torch.no_grad():
        assert torch.equal(model(batch)["log_probs_BTV"], model(speech)["log_probs_BTV"])


def test_specaugment_time_masks_with_a_fixed_count():
    """finetune_mask_prob 0 with finetune_min_masks 2: exactly two time masks per utterance (SpecAugment's
    count), instead of no masking."""
    model = Wav2Vec2CTC(_cfg(finetune_mask_prob=0.0, finetune_min_masks=2, finetune_mask_span_ms=100.0),
                        TOK.vocab_size)
    assert model.span_masking is not None and model.span_masking.min_spans == 2
    lengths = torch.tensor([16000 * 3, 16000 * 2])
    frames = model.output_lengths(lengths)
    mask = frame_span_mask(frames, [0, 1], 0.0, model.cfg.span_frames(100.0), seed=0, epoch=0, min_spans=2)
    per_row = mask.sum(dim=1)
    assert bool((per_row >= 5).all()) and bool((per_row <= 10).all())  # two 5-frame spans, maybe overlapping
