"""The memory planner (train/memory_plan.py): static arithmetic on full presets (meta device), and the
activation trace it extrapolates (one block, one short utterance) against full-depth
traces of the whole micro-batch, per family, within 15% (20% with activation checkpointing for
wav2vec 2.0's contrastive pretraining, whose masking is not linear in a short trace: it errs high)."""

from __future__ import annotations

import pytest

from raytrain_speech import cli
from raytrain_speech.config import ModelSpec, load_config
from raytrain_speech.models import whisper
from raytrain_speech.models.registry import FAMILIES, build_meta, count_parameters, resolve
from raytrain_speech.train import memory_plan as mp

DEFAULT_RUN = ("conformer_ctc", "wavlm_ctc", "whisper")
"""One family per kind of attention (relative-position bias, gated bias, plain) in the default run;
every family in the slow run."""


@pytest.mark.parametrize("name", [n if n in DEFAULT_RUN else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(FAMILIES)])
def test_the_extrapolated_trace_is_within_15_percent_of_the_full_one(name):
    spec = ModelSpec(family=name, preset="tiny")
    # what the plan of a 2 x 30 s micro-batch traces (one block, one TRACE_S utterance, scaled), against
    # the whole micro-batch traced at full depth
    full = mp.trace(spec, 29, None, rows=2, duration_s=30.0, tokens=120, precision="fp32", blocks=None)
    short = mp.trace(spec, 29, None, 2, mp.TRACE_S, round(4 * mp.TRACE_S), "fp32")
    longer = mp.trace(spec, 29, None, 2, 2 * mp.TRACE_S, round(8 * mp.TRACE_S), "fp32")
    planned = mp.ActivationModel(short, mp.TRACE_S, longer, 2 * mp.TRACE_S, traced_rows=2).at(30.0, rows=2)
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
    spec = ModelSpec(family="whisper", preset="large_v3")
    arch = resolve(spec)
    n = count_parameters(build_meta(spec, arch.vocab_size, whisper.published_specials(arch)))
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
