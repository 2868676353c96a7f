"""The memory planner (train/memory_plan.py): static arithmetic on full presets (meta device), and the
activation trace it extrapolates (one block, one utterance of half the duration) against full-depth
traces of the whole micro-batch, per family, within 15% (20% with activation checkpointing for
wav2vec 2.0's contrastive pretraining, whose masking is not linear in a short trace: it errs high)."""

from __future__ import annotations

import pytest

from raytrain_speech import cli
from raytrain_speech.config import ModelSpec, load_config
from raytrain_speech.models.registry import FAMILIES, build_meta, count_parameters
from raytrain_speech.train import memory_plan as mp


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_the_extrapolated_trace_is_within_15_percent_of_the_full_one(name):
    spec = ModelSpec(family=name, preset="tiny")
    full = mp.trace(spec, 29, None, rows=2, duration_s=8.0, tokens=32, precision="fp32", blocks=None)
    planned = mp.trace(spec, 29, None, rows=1, duration_s=8.0 / mp.TRACE_FRACTION, tokens=32 // mp.TRACE_FRACTION,
                       precision="fp32").scaled(2 * mp.TRACE_FRACTION)
    assert full.depth == planned.depth and full.total(0) > 0
    assert planned.total(0) == pytest.approx(full.total(0), rel=0.15)
    assert planned.total(1) == pytest.approx(full.total(1), rel=0.20 if name == "wav2vec2" else 0.15)
    assert full.total(1) < 0.7 * full.total(0)  # checkpointing every block keeps much less
    assert full.total(0) > full.total(2) > full.total(1)  # every_2 lies in between


def test_half_precision_keeps_less_and_weight_copies_are_not_activations():
    spec = ModelSpec(family="whisper", preset="tiny")
    fp32 = mp.trace(spec, 29, None, 2, 4.0, 16, "fp32")
    half = mp.trace(spec, 29, None, 2, 4.0, 16, "bf16")
    # autocast keeps half-precision activations (and some fp32 ones); its weight casts are counted
    # once, as the static "weights" line, never per block
    assert 0.4 * fp32.total(0) < half.total(0) < 0.95 * fp32.total(0)


def test_static_memory_arithmetic_on_the_full_whisper_preset():
    cfg = load_config("examples/whisper_large_v3.yaml", [])
    vocab, specials = mp.vocabulary(cfg)
    n = count_parameters(build_meta(cfg.model, vocab, specials))
    assert 1.54e9 < n < 1.56e9
    ddp = mp.static_bytes(n, "fp16", ema=False, parallelism="ddp", workers=32, largest_block_params=10**7)
    assert ddp == {"weights": 6 * n, "gradients": 4 * n, "optimizer": 8 * n, "buffers": 0.0}
    fsdp = mp.static_bytes(n, "fp16", ema=True, parallelism="fsdp", workers=32, largest_block_params=10**7)
    assert fsdp["optimizer"] == pytest.approx(8 * n / 32) and fsdp["gradients"] == pytest.approx(4 * n / 32)
    assert fsdp["weights"] == pytest.approx(8 * n / 32 + 2 * 10**7 * 2)


def test_gpu_names():
    assert mp.gpu_gib("a100-40gb") == ("a100-40gb", 40.0) and mp.gpu_gib("rtx4090:24") == ("rtx4090", 24.0)
    with pytest.raises(ValueError, match="--gpu 'a100': not one of a100-40gb"):
        mp.gpu_gib("a100")


def test_plan_command_prints_the_table_and_verdicts(capsys):
    recipe = "examples/conformer_ctc_tiny.yaml"
    plans = {(p.parallelism, p.activation_checkpointing): p.total
             for p in mp.plan_recipe(load_config(recipe, []), "any:80", 2).plans}
    between = (plans[("ddp", "none")] + plans[("ddp", "blocks")]) / 2 / mp.GIB  # a GPU only checkpointing fits
    assert cli.main(["plan", "--config", recipe, "--gpu", f"small:{between:.4f}", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "| ddp + AC none |" in out and "| fsdp + AC blocks |" in out
    assert "ddp with activation checkpointing none (the recipe's setting): does not fit" in out
    assert "ddp with activation checkpointing blocks: fits" in out
    assert "largest micro-batch (utterances) per bucket" in out
    assert cli.main(["plan", "--config", "examples/conformer_ctc_tiny.yaml", "--gpu", "a100"]) == 2
