"""Every tiny recipe in examples/ trains end to end through ``raytrain-speech train`` on 2 CPU workers
(real local Ray, a small espeak-ng corpus): the loss falls, a checkpoint lands, and ``raytrain-speech
eval`` scores the text-output recipes. Pretraining recipes run first and their fine-tuning recipe
starts from them (train.init_from), as a user would chain them.

The two stages of each self-supervised recipe are one test. All are ``slow`` (~1-3 min each): the
default run is at the CI budget's edge; tests/unit/test_ddp_families.py steps every family under DDP
there, and test_cli/test_train_* drive the same loop through Ray.
"""

from __future__ import annotations

import json
import os

import pytest

from raytrain_speech import cli
from raytrain_speech.data.synth import synthesize
from raytrain_speech.train.metrics import read_metrics
from tests.conftest import TINY_SYNTH, tiny_config

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("recipes") / "corpus")
    cfg = tiny_config(**{"data.root": root})
    synthesize(cfg.synth, root, log=lambda s: None)
    return root


def _train(recipe: str, corpus: str, runs: str, steps: int, *extra: str) -> list[dict]:
    """``raytrain-speech train`` on a tiny recipe, test-sized; returns its metrics records."""
    name = recipe.replace("_", "-")
    argv = ["train", "--config", os.path.join(EXAMPLES, f"{recipe}.yaml"), "--no-progress",
            f"data.root={corpus}", f"run.storage_path={runs}", f"run.name={name}", f"train.max_steps={steps}",
            "train.log_every_steps=2", f"train.checkpoint_every_steps={steps}", "optim.warmup_steps=2",
            "run.object_store_memory_mb=512", *TINY_SYNTH, *extra]
    assert cli.main(argv) == 0, recipe
    metrics = read_metrics(os.path.join(runs, name, "metrics.jsonl"))
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) >= 3 and losses[-1] < losses[0], (recipe, losses)
    assert metrics[-1]["checkpoint"] and metrics[-1]["step"] == steps
    assert any(e.startswith("checkpoint_") for e in os.listdir(os.path.join(runs, name)))
    return metrics


def _eval(recipe: str, runs: str, tmp_path, *extra: str) -> dict:
    out = tmp_path / f"{recipe}-eval{len(extra)}.json"
    assert cli.main(["eval", "--checkpoint", os.path.join(runs, recipe.replace("_", "-")), "--out", str(out),
                     *extra]) == 0
    result = json.loads(out.read_text())
    assert result["utterances"] > 0 and 0.0 <= result["wer"]
    return result


@pytest.mark.slow
def test_whisper_tiny_recipe(ray_local, corpus, tmp_path):
    runs = str(tmp_path / "runs")
    metrics = _train("whisper_large_v3_tiny", corpus, runs, 16, "optim.lr_peak=3e-3")
    assert 0.0 <= metrics[-1]["accuracy"] <= 1.0
    _eval("whisper_large_v3_tiny", runs, tmp_path)


@pytest.mark.slow
def test_conformer_aed_pretrain_then_finetune(ray_local, corpus, tmp_path):
    runs = str(tmp_path / "runs")
    _train("conformer_aed_pretrain_tiny", corpus, runs, 12)
    metrics = _train("conformer_aed_tiny", corpus, runs, 16,
                     f"train.init_from={os.path.join(runs, 'conformer-aed-pretrain-tiny')}")
    assert {"ctc_loss", "attention_loss", "accuracy"} <= set(metrics[-1])
    _eval("conformer_aed_tiny", runs, tmp_path)


@pytest.mark.slow
def test_wavlm_pretrain_then_ctc_finetune(ray_local, corpus, tmp_path):
    runs = str(tmp_path / "runs")
    _train("wavlm_large_plus_tiny", corpus, runs, 12)
    _train("wavlm_large_plus_ctc_tiny", corpus, runs, 16, f"train.init_from={os.path.join(runs, 'wavlm-large-plus-tiny')}",
           "train.freeze_feature_encoder_steps=4", "train.freeze_pretrained_steps=4")
    _eval("wavlm_large_plus_ctc_tiny", runs, tmp_path)


@pytest.mark.slow
def test_wav2vec2_pretrain_then_ctc_finetune(ray_local, corpus, tmp_path):
    runs = str(tmp_path / "runs")
    metrics = _train("wav2vec2_xl_tiny", corpus, runs, 12)
    assert {"accuracy", "diversity", "code_perplexity"} <= set(metrics[-1])
    _train("wav2vec2_xl_ctc_tiny", corpus, runs, 16, f"train.init_from={os.path.join(runs, 'wav2vec2-xl-tiny')}",
           "train.freeze_feature_encoder_steps=4", "train.freeze_pretrained_steps=4")
    _eval("wav2vec2_xl_ctc_tiny", runs, tmp_path)


@pytest.mark.slow
def test_nar_ctc_pretrain_then_finetune(ray_local, corpus, tmp_path):
    """The write-up's two stages: contrastive pre-training of the raw-waveform encoder with channel
    masks, then CTC + Mask-CTC fine-tuning from it with SpecAugment's fixed counts of time and channel
    masks; scored with beam + LM (the recipe's eval) and with the refinement decoder."""
    runs = str(tmp_path / "runs")
    metrics = _train("nar_ctc_pretrain_tiny", corpus, runs, 12)
    assert {"accuracy", "diversity"} <= set(metrics[-1])
    metrics = _train("nar_ctc_tiny", corpus, runs, 16, "optim.lr_peak=3e-3",
                     f"train.init_from={os.path.join(runs, 'nar-ctc-pretrain-tiny')}")
    assert {"ctc_loss", "mlm_loss", "mlm_accuracy"} <= set(metrics[-1])
    _eval("nar_ctc_tiny", runs, tmp_path)
    _eval("nar_ctc_tiny", runs, tmp_path, "eval.refine_iterations=10", "eval.beam_width=1",
          "eval.lm_weight=0", "eval.length_bonus=0")
