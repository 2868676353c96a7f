import pytest
import torch

from raytrain_speech.train.optim import OptimConfig, build_optimizer, lr_at, param_groups


def test_warmup_then_cosine_to_floor():
    cfg = OptimConfig(lr_peak=1e-3, warmup_steps=10, lr_final=1e-6, schedule="cosine")
    assert lr_at(0, 100, cfg) == pytest.approx(1e-4)
    assert lr_at(9, 100, cfg) == pytest.approx(1e-3)
    assert lr_at(55, 100, cfg) == pytest.approx((1e-3 + 1e-6) / 2, rel=1e-3)
    assert lr_at(100, 100, cfg) == pytest.approx(1e-6)
    lrs = [lr_at(s, 100, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_warmup_fraction_and_polynomial_power():
    cfg = OptimConfig(lr_peak=1.0, warmup_fraction=0.1, lr_final=0.0, schedule="polynomial", poly_power=0.5)
    assert lr_at(9, 100, cfg) == pytest.approx(1.0)
    assert lr_at(10 + 45, 100, cfg) == pytest.approx(0.5 ** 0.5)


def test_no_weight_decay_on_norms_and_biases():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(model, 0.01)
    assert len(decay["params"]) == 1 and len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0
    opt = build_optimizer(model, OptimConfig(betas=(0.9, 0.98)))
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.98)
