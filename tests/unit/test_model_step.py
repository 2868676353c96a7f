import math

import numpy as np
import torch

from raytrain_speech.config import ModelSpec, OptimConfig, StepConfig
from raytrain_speech.data.batching import Utterance, collate
from raytrain_speech.models.registry import build_model, count_parameters
from raytrain_speech.objectives import ctc
from raytrain_speech.train.optim import build_optimizer
from raytrain_speech.train.step import Stepper


def _batch(n=4, frames=200, seed=0):
    rng = np.random.default_rng(seed)
    utts = [Utterance(i, f"u{i}", frames / 100, rng.standard_normal((frames - 10 * i, 80)).astype(np.float32),
                      rng.integers(1, 29, size=8 + i)) for i in range(n)]
    return collate(utts)


def test_tiny_conformer_size_and_shapes():
    model = build_model(ModelSpec(), vocab_size=29)
    assert abs(count_parameters(model) - 2.23e6) / 2.23e6 < 0.01  # 2.15e6 with attention=none
    b = _batch()
    out = model(b)
    assert out["log_probs_BTV"].shape[0] == 4 and out["log_probs_BTV"].shape[2] == 29
    assert out["lengths_B"].tolist() == [((n - 1) // 2 - 1) // 2 for n in b.feature_lengths_B.tolist()]
    assert torch.allclose(out["log_probs_BTV"].exp().sum(-1), torch.ones(1), atol=1e-4)


def test_stepper_overfits_a_batch_in_fp32_bf16_and_fp16_with_loss_scaling():
    for precision in ("fp32", "bf16", "fp16"):
        torch.manual_seed(0)
        model = build_model(ModelSpec(overrides={"num_layers": 1, "dropout": 0.0}), 29)
        opt = build_optimizer(model, OptimConfig(lr_peak=3e-3))
        stepper = Stepper(model, opt, StepConfig(precision=precision, grad_clip_norm=5.0), ctc.loss, torch.device("cpu"))
        b = _batch()
        tokens = float(b.target_lengths_B.sum())
        first = stepper.step([b], tokens, 1)
        for _ in range(4):  # fp16 autocast is emulated on CPUs (~2 s a step here): a few steps show it learns
            last = stepper.step([b], tokens, 1)
        assert last.loss_sum < 0.5 * first.loss_sum, precision


class _FrameLinear(torch.nn.Module):
    """A batch-composition-independent model (no BatchNorm), so accumulation must be exact."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(80, 29)

    def forward(self, batch):
        return {"log_probs_BTV": self.proj(batch.features_BFM).log_softmax(-1), "lengths_B": batch.feature_lengths_B}


def test_accumulation_matches_one_big_batch():
    torch.manual_seed(0)
    a, b = _FrameLinear(), _FrameLinear()
    b.load_state_dict(a.state_dict())
    full = _batch(4)
    utts = _utts_of(full)
    halves = [collate(utts[:2]), collate(utts[2:])]
    tokens = float(full.target_lengths_B.sum())
    for model, micro in ((a, [full]), (b, halves)):
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        Stepper(model, opt, StepConfig(precision="fp32"), ctc.loss, torch.device("cpu")).step(micro, tokens, 1)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-5)


def test_the_stepper_normalises_by_the_global_units_times_the_world_size():
    """A rank holding half the global batch's units in a world of 2 makes the same update as one rank
    holding all of it (DDP then averages the two ranks' equal gradients): loss_sum * world / global."""
    torch.manual_seed(0)
    a, b, c = _FrameLinear(), _FrameLinear(), _FrameLinear()
    b.load_state_dict(a.state_dict())
    c.load_state_dict(a.state_dict())
    full = _batch(4)
    tokens = float(full.target_lengths_B.sum())
    for model, global_units, world in ((a, tokens, 1), (b, 2 * tokens, 2), (c, 2 * tokens, 1)):
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        res = Stepper(model, opt, StepConfig(precision="fp32"), ctc.loss, torch.device("cpu")).step(
            [full], global_units, world)
        assert res.tokens == tokens and res.loss_sum > 0
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6)
    assert not torch.allclose(a.proj.weight, c.proj.weight, atol=1e-4)  # half the units: half the step


def _utts_of(batch):
    return [Utterance(i, f"u{i}", 1.0, batch.features_BFM[i, : batch.feature_lengths_B[i]].numpy(),
                      batch.targets_BL[i, : batch.target_lengths_B[i]].numpy()) for i in range(batch.size)]


def test_non_finite_gradient_skips_the_update():
    torch.manual_seed(0)
    model = build_model(ModelSpec(overrides={"num_layers": 1}), 29)
    opt = build_optimizer(model, OptimConfig())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    b = _batch()
    b.features_BFM[0, 0, 0] = float("nan")
    res = Stepper(model, opt, StepConfig(), ctc.loss, torch.device("cpu")).step([b], 10.0, 1)
    assert res.skipped and not math.isfinite(res.grad_norm)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_ema_tracks_the_average_and_swaps_in_and_out():
    from raytrain_speech.train.step import EMA

    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.5)
    for value in (1.0, 1.0):
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update(model)
    assert torch.allclose(ema.shadow["weight"], torch.full((1, 2), 0.75))  # 0 -> 0.5 -> 0.75
    with ema.applied(model) as averaged:
        assert torch.allclose(averaged.weight, torch.full((1, 2), 0.75))
    assert torch.allclose(model.weight, torch.ones(1, 2))
