"""The Conformer families beyond CTC: hybrid CTC/attention (conformer_aed) and masked pretraining (conformer_mlm)."""

import numpy as np
import torch

from raytrain_speech.config import ModelSpec, OptimConfig, StepConfig
from raytrain_speech.data.batching import Utterance, collate
from raytrain_speech.models.masking import model_span_mask
from raytrain_speech.models.registry import build_model, objective_for
from raytrain_speech.train.optim import build_optimizer
from raytrain_speech.train.step import Stepper


def _batch(n=3, frames=160, seed=0):
    rng = np.random.default_rng(seed)
    utts = [Utterance(i, f"u{i}", frames / 100, rng.standard_normal((frames - 12 * i, 80)).astype(np.float32),
                      rng.integers(2, 29, size=6 + i)) for i in range(n)]
    return collate(utts)


def _overfit(spec, batch, steps=40, lr=3e-3):
    torch.manual_seed(0)
    model = build_model(spec, 29)
    objective = objective_for(spec)
    stepper = Stepper(model, build_optimizer(model, OptimConfig(lr_peak=lr)), StepConfig(precision="fp32"),
                      objective.loss, torch.device("cpu"))
    units = objective.units(batch)
    first = stepper.step([batch], units, 1)
    for _ in range(steps):
        last = stepper.step([batch], units, 1)
    return model, first, last


def test_conformer_aed_hybrid_loss_falls_and_greedy_decodes_the_overfitted_batch():
    spec = ModelSpec("conformer_aed", overrides={"num_layers": 1, "dropout": 0.0, "decoder_layers": 1})
    b = _batch()
    model, first, last = _overfit(spec, b, steps=80)
    assert last.loss_sum < 0.3 * first.loss_sum
    assert set(last.extra_sums) == {"ctc_loss_sum", "attention_loss_sum", "accuracy_sum"}
    model.eval()
    hyps = model.transcribe(b)
    refs = [b.targets_BL[i, :n].tolist() for i, n in enumerate(b.target_lengths_B.tolist())]
    assert sum(h == r for h, r in zip(hyps, refs)) >= 2


def test_conformer_mlm_masks_its_input_and_reconstruction_loss_falls():
    spec = ModelSpec("conformer_mlm", overrides={"num_layers": 1, "dropout": 0.0})
    b = _batch()
    model = build_model(spec, 29)
    mask = model_span_mask(model, b)
    b.mask_BT = mask
    out = model(b)
    assert out["mask_BT"].float().mean() > 0.5  # ~80% of valid frames
    # A masked frame's prediction must not depend on the input under it (no leak through the convs).
    b2 = collate([Utterance(u, f"u{u}", 1.0, b.features_BFM[u, :n].numpy().copy(), np.ones(3, np.int64))
                  for u, n in enumerate(b.feature_lengths_B.tolist())])
    b2.mask_BT = mask
    t = int(torch.nonzero(out["mask_BT"][0])[5])
    b2.features_BFM[0, 4 * t: 4 * t + 4] += 5.0
    model.eval()
    assert torch.allclose(model(b)["pred_BTP"][0, t], model(b2)["pred_BTP"][0, t], atol=1e-5)
    _, first, last = _overfit(spec, b, steps=40)
    assert last.loss_sum < 0.8 * first.loss_sum


def test_conformer_aed_initialises_from_an_mlm_encoder_by_name():
    mlm = build_model(ModelSpec("conformer_mlm"), 29)
    aed = build_model(ModelSpec("conformer_aed"), 29)
    own = aed.state_dict()
    shared = {k: v for k, v in mlm.state_dict().items() if k in own and own[k].shape == v.shape}
    assert any(k.startswith("encoder.") for k in shared) and any(k.startswith("subsampling.") for k in shared)
    assert not any(k.startswith("head.") for k in shared)  # reconstruction head != CTC head
