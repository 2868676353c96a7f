import pytest
import torch

from raytrain_speech.config import OptimConfig
from raytrain_speech.train.optim import build_optimizer, lr_at, param_groups


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
    no_decay, decay = param_groups(model, OptimConfig(weight_decay=0.01))
    assert len(decay["params"]) == 1 and len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0
    opt = build_optimizer(model, OptimConfig(betas=(0.9, 0.98)))
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.98)


def test_pretrained_groups_get_their_own_lr_and_frozen_groups_wait():
    from raytrain_speech.train.optim import set_lr

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    cfg = OptimConfig(lr_peak=1e-3, pretrained_lr_peak=1e-5)
    opt = build_optimizer(model, cfg, pretrained={"0.weight", "0.bias"}, frozen={"0.weight"}, frozen_steps=10)
    by_param = {}
    for step in (0, 10):
        set_lr(opt, 1e-3, step)
        for g in opt.param_groups:
            for p in g["params"]:
                by_param[(step, id(p))] = g["lr"]
    w0, b0, w1 = model[0].weight, model[0].bias, model[1].weight
    assert by_param[(0, id(w0))] == 0.0 and by_param[(10, id(w0))] == pytest.approx(1e-5)
    assert by_param[(0, id(b0))] == pytest.approx(1e-5) and by_param[(0, id(w1))] == pytest.approx(1e-3)


def test_per_parameter_freeze_lengths():
    """freeze_pretrained_steps (all loaded weights) and freeze_feature_encoder_steps (the CNN) differ."""
    from raytrain_speech.train.optim import set_lr

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    cfg = OptimConfig(lr_peak=1e-3)
    opt = build_optimizer(model, cfg, pretrained={"0.weight", "1.weight"}, frozen={"0.weight": 50, "1.weight": 20})
    lr = {}
    for step in (0, 20, 50):
        set_lr(opt, 1e-3, step)
        for g in opt.param_groups:
            for p in g["params"]:
                lr[(step, id(p))] = g["lr"]
    w0, w1, w2 = model[0].weight, model[1].weight, model[2].weight
    assert [lr[(s, id(w0))] for s in (0, 20, 50)] == [0.0, 0.0, 1e-3]
    assert [lr[(s, id(w1))] for s in (0, 20, 50)] == [0.0, 1e-3, 1e-3]
    assert [lr[(s, id(w2))] for s in (0, 20, 50)] == [1e-3, 1e-3, 1e-3]


def test_tri_stage_warms_up_holds_then_decays_exponentially_to_the_final_lr():
    """fairseq's fine-tuning schedule (phase ratios 0.1 / 0.4 / 0.5, final 0.05 x peak)."""
    cfg = OptimConfig(lr_peak=1e-4, lr_final=5e-6, warmup_fraction=0.1, schedule="tri_stage", hold_fraction=0.4)
    assert lr_at(9, 100, cfg) == pytest.approx(1e-4)
    assert lr_at(10, 100, cfg) == lr_at(49, 100, cfg) == pytest.approx(1e-4)
    mid = lr_at(75, 100, cfg)
    assert mid == pytest.approx(1e-4 * 0.05 ** 0.5, rel=1e-6)  # geometric halfway between peak and final
    assert lr_at(100, 100, cfg) == pytest.approx(5e-6)


def _one_step(name: str, reference=None) -> list[torch.Tensor]:
    """Parameters after one step of our optimizer ``name`` (or of ``reference``) from the same start."""
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    with torch.no_grad():
        model.weight.mul_(50.0)  # large weights, so decoupled and L2 decay differ visibly
    grads = [torch.randn_like(p) for p in model.parameters()]
    cfg = OptimConfig(name=name, lr_peak=1e-2, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-8)
    if reference is None:
        opt = build_optimizer(model, cfg)
    else:  # one decayed group for the weight, an undecayed one for the bias, as param_groups makes
        opt = reference([{"params": [model.weight], "weight_decay": 0.1}, {"params": [model.bias], "weight_decay": 0.0}],
                        lr=1e-2, betas=(0.9, 0.98), eps=1e-8)
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_adam_decays_decoupled_like_fairseq_and_adamw_bit_for_bit():
    ours = _one_step("adam")
    reference = _one_step("adam", torch.optim.AdamW)
    assert all(torch.equal(a, b) for a, b in zip(ours, reference))
    l2 = _one_step("adam_l2")
    assert all(torch.equal(a, b) for a, b in zip(l2, _one_step("adam_l2", torch.optim.Adam)))
    # With L2 the decay passes through Adam's normalisation and nearly vanishes for large weights:
    # the weights move differently; the undecayed bias moves identically.
    assert not torch.allclose(ours[0], l2[0], atol=1e-4) and torch.equal(ours[1], l2[1])
