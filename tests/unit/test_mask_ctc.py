"""Mask-CTC (nar_ctc's refinement decoder): training masks, the non-causal decoder, the joint objective,
confidence-masked refinement, and the config rules around it."""

import pytest
import torch

from raytrain_speech.batch import BLANK_ID, Batch
from raytrain_speech.config import Config, ConfigError, ModelSpec, from_dict
from raytrain_speech.evaluate.decode import Search, hypotheses
from raytrain_speech.evaluate.loading import _nar_decoder_of
from raytrain_speech.models.mask_ctc import (
    MaskCTC,
    MaskCTCConfig,
    MaskedTokenDecoder,
    mask_tokens,
    token_confidences,
)
from raytrain_speech.models.registry import build_model, check_config, objective_for
from raytrain_speech.models.wav2vec2 import Wav2Vec2Pretraining
from raytrain_speech.models.wav2vec2_encoder import PRESETS
from raytrain_speech.objectives import ctc
from raytrain_speech.objectives import mask_ctc as objective

V = 12


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cfg(**overrides) -> MaskCTCConfig:
    small = dict(conv_channels=16, d_model=32, num_layers=1, num_heads=2, ffn_dim=64, pos_conv_kernel=8,
                 pos_conv_groups=2, codebook_entries=8, codevector_dim=16, final_dim=16, layer_drop=0.0,
                 dropout=0.0, attention_dropout=0.0, input_dropout=0.0, decoder_dropout=0.0, decoder_layers=1)
    return from_dict(MaskCTCConfig, {**PRESETS["tiny"], **small, **overrides})


def _batch(lengths=(5, 3), seconds=(1.0, 0.8)) -> Batch:
    torch.manual_seed(1)
    samples = [int(16000 * s) for s in seconds]
    wav = torch.randn(len(samples), max(samples))
    for i, n in enumerate(samples):
        wav[i, n:] = 0
    targets = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for i, n in enumerate(lengths):
        targets[i, :n] = torch.randint(1, V, (n,))
    return Batch(wav, torch.tensor(samples), targets, torch.tensor(lengths), indices=list(range(len(lengths))))


def test_mask_tokens_draws_uniform_counts_and_weights_rows_to_their_length():
    lengths = torch.tensor([6, 1, 0, 4])
    targets = torch.arange(1, 7).repeat(4, 1)
    gen = torch.Generator().manual_seed(0)
    counts = {6: [], 1: [], 4: []}
    for _ in range(600):
        tokens, weights = mask_tokens(targets, lengths, V, gen)
        masked = tokens == V
        assert not masked[2].any() and weights[2].eq(0).all()  # an empty transcript has nothing to mask
        for i, n in ((0, 6), (1, 1), (3, 4)):
            k = int(masked[i].sum())
            counts[n].append(k)
            assert not masked[i, n:].any()  # padding is never masked ...
            assert tokens[i, n:].eq(BLANK_ID).all()  # ... and reads as blank
            assert torch.equal(tokens[i, :n][~masked[i, :n]], targets[i, :n][~masked[i, :n]])
            assert float(weights[i].sum()) == pytest.approx(n)  # L / k per masked token: L per row
    for n, seen in counts.items():
        assert set(seen) == set(range(1, n + 1))  # U{1..L}: every count occurs, none outside
        assert sum(seen) / len(seen) == pytest.approx((n + 1) / 2, abs=0.25)


def test_decoder_is_not_causal_and_ignores_padding():
    torch.manual_seed(0)
    dec = MaskedTokenDecoder(V, 32, 2, 64, 2, 0.0).eval()
    memory = torch.randn(1, 7, 32)
    tokens = torch.tensor([[3, 4, 5, 6, 0, 0]])
    lengths, mem_lengths = torch.tensor([4]), torch.tensor([7])
    base = dec(tokens, lengths, memory, mem_lengths)
    later = tokens.clone()
    later[0, 3] = 9
    changed = dec(later, lengths, memory, mem_lengths)
    assert (changed[0, 0] - base[0, 0]).abs().max() > 1e-4  # position 0 sees position 3
    padded = tokens.clone()
    padded[0, 4:] = 7
    assert torch.allclose(dec(padded, lengths, memory, mem_lengths)[0, :4], base[0, :4], atol=1e-6)
    assert torch.allclose(dec(tokens[:, :4], lengths, memory, mem_lengths)[0], base[0, :4], atol=1e-5)


def test_token_confidences_take_the_best_frame_of_each_run():
    probs = torch.full((1, 6, 4), 0.01)
    frames = [(1, 0.6), (1, 0.9), (0, 0.97), (2, 0.5), (2, 0.7), (1, 0.8)]
    for t, (tok, p) in enumerate(frames):
        probs[0, t, tok] = p
    [(ids, confs)] = token_confidences(probs.log(), torch.tensor([6]))
    assert ids == [1, 2, 1]
    assert confs == pytest.approx([0.9, 0.7, 0.8])
    [(ids, _)] = token_confidences(probs.log(), torch.tensor([4]))
    assert ids == [1, 2]


def test_forward_and_joint_objective():
    model = MaskCTC(_cfg(ctc_weight=0.3), V)
    batch = _batch()
    torch.manual_seed(3)
    out = model(batch)
    assert out["mlm_logits_BLV"].shape == (2, 5, V) and out["memory_BTD"].shape[-1] == 32
    obj = objective_for(ModelSpec("nar_ctc", "tiny"))
    assert obj.name == "mask_ctc" and obj.units(batch) == 8.0  # target tokens, known before the forward
    summed, units, stats = obj.loss(batch, out)
    ctc_sum, _, _ = ctc.loss(batch, out)
    mlm_sum, _ = objective.masked_lm_loss(batch, out)
    assert units == 8.0
    assert float(summed.detach()) == pytest.approx(0.3 * float(ctc_sum.detach()) + 0.7 * float(mlm_sum.detach()), rel=1e-5)
    assert stats["ctc_loss_sum"] == pytest.approx(float(ctc_sum), rel=1e-5)
    summed.backward()
    assert model.decoder.out.weight.grad.abs().sum() > 0 and model.head.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():  # validation masks from a fixed seed: the same loss twice
        a, b = (float(obj.loss(batch, model(batch))[0]) for _ in range(2))
    assert a == b


def test_without_a_decoder_it_is_plain_ctc():
    model = MaskCTC(_cfg(decoder_layers=0), V)
    out = model(_batch())
    assert model.decoder is None and set(out) == {"log_probs_BTV", "lengths_B"}
    assert objective_for(ModelSpec("nar_ctc", "tiny", {"decoder_layers": 0})).name == "ctc"
    assert model.refine(out, 10, 0.999) == hypotheses(model, None, out, "ctc")


def _confident(ids_rows, conf, T=None, frames_per_token=2):
    """log_probs (B, T, V) that emit each row's ids (a run of frames each, blank between and after) at
    confidence ``conf``, and the lengths T."""
    T = T or max(len(r) for r in ids_rows) * (frames_per_token + 1)
    probs = torch.full((len(ids_rows), T, V), (1 - conf) / (V - 1))
    probs[:, :, BLANK_ID] = conf
    for i, ids in enumerate(ids_rows):
        for k, tok in enumerate(ids):
            for f in range(frames_per_token):
                t = k * (frames_per_token + 1) + f
                probs[i, t] = (1 - conf) / (V - 1)
                probs[i, t, tok] = conf
    return probs.log(), torch.tensor([T] * len(ids_rows))


def test_refine_keeps_confident_tokens_and_counts_passes():
    torch.manual_seed(0)
    model = MaskCTC(_cfg(), V).eval()
    calls = []
    model.decoder.register_forward_hook(lambda *_: calls.append(1))
    log_probs, lengths = _confident([[3, 4, 5, 6, 7], [8, 9]], 0.9995)
    out = {"log_probs_BTV": log_probs, "lengths_B": lengths, "memory_BTD": torch.randn(2, 15, 32)}
    assert model.refine(out, 10, 0.999) == [[3, 4, 5, 6, 7], [8, 9]] and not calls  # nothing to refine
    log_probs, lengths = _confident([[3, 4, 5, 6, 7], [8, 9]], 0.6)
    out["log_probs_BTV"], out["lengths_B"] = log_probs, lengths
    hyps = model.refine(out, 3, 0.999)
    assert [len(h) for h in hyps] == [5, 2] and all(0 < t < V for h in hyps for t in h)
    assert len(calls) == 3  # min(K, masks) passes: the 5-token row needs 3, the 2-token row 2
    calls.clear()
    model.refine(out, 10, 0.999)
    assert len(calls) == 5


def test_refinement_learns_to_fill_masked_tokens():
    """Trained on one batch, the decoder fills an all-masked hypothesis with the transcript: the whole
    path (masking, weights, loss, non-causal attention, iterative filling) has to work for this."""
    torch.manual_seed(0)
    model = MaskCTC(_cfg(decoder_layers=2), V)
    batch = _batch(lengths=(6, 4))
    obj = objective.objective(model.cfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        opt.zero_grad()
        summed, units, _ = obj.loss(batch, model(batch))
        (summed / units).backward()
        opt.step()
    model.eval()
    targets = [batch.targets_BL[i, :n].tolist() for i, n in enumerate(batch.target_lengths_B.tolist())]
    wrong = [[(t % (V - 1)) + 1 for t in row] for row in targets]  # right length, every token wrong
    with torch.no_grad():
        out = model(batch)
    # The CTC hypothesis is replaced by ``wrong`` at confidence 0.5 over the encoder's own frames.
    out["log_probs_BTV"], _ = _confident(wrong, 0.5, T=out["log_probs_BTV"].shape[1])
    refined = model.refine(out, 10, 0.999)
    assert refined == targets
    assert hypotheses(model, batch, out, "ctc", search=Search(refine_iterations=10)) == targets
    assert hypotheses(model, batch, out, "ctc") == wrong  # without refinement: the CTC hypothesis


def test_refine_config_rules():
    cfg = Config.from_dict({"model": {"family": "conformer_ctc", "preset": "tiny"}, "eval": {"refine_iterations": 10}})
    with pytest.raises(ConfigError, match="eval.refine_iterations"):
        check_config(cfg)
    check_config(Config.from_dict({"model": {"family": "nar_ctc", "preset": "tiny"}, "features": {"kind": "waveform"},
                                   "eval": {"refine_iterations": 10}}))
    with pytest.raises(ConfigError, match="eval.refine_iterations.*beam_width=1"):
        Config.from_dict({"eval": {"refine_iterations": 10, "beam_width": 5}})
    with pytest.raises(ConfigError, match="eval.refine_iterations"):
        hypotheses(build_model(ModelSpec("conformer_ctc", "tiny"), V), None, {}, "ctc",
                   search=Search(refine_iterations=2))


def test_presets_init_from_and_old_checkpoints():
    model = build_model(ModelSpec("nar_ctc", "tiny"), 32)
    assert isinstance(model, MaskCTC) and len(model.decoder.layers) == 2
    pre = Wav2Vec2Pretraining(from_dict(MaskCTCConfig, PRESETS["tiny"]), 0)
    missing, unexpected = model.load_pretrained(pre.state_dict())
    assert missing == [] and unexpected == []  # the encoder comes from wav2vec2; the decoder starts fresh
    cfg = Config.from_dict({"model": {"family": "nar_ctc", "preset": "tiny"}, "features": {"kind": "waveform"}})
    old = {"model": {k: v for k, v in model.state_dict().items() if not k.startswith("decoder.")}}
    _nar_decoder_of(cfg, old, is_artifact=False)
    assert cfg.model.overrides["decoder_layers"] == 0
    build_model(cfg.model, 32).load_state_dict(old["model"])  # loads strictly as it was trained
    cfg = Config.from_dict({"model": {"family": "nar_ctc", "preset": "tiny"}, "features": {"kind": "waveform"}})
    _nar_decoder_of(cfg, {"model": model.state_dict()}, is_artifact=False)
    assert "decoder_layers" not in cfg.model.overrides
