"""Every family trains under DistributedDataParallel as Ray Train wraps it: no parameter may sit out a
forward pass (DDP fails on the next step with "Expected to have finished reduction"), including
pretraining-only parameters such as a mask embedding in a fine-tuning model that does not mask."""

import numpy as np
import pytest
import torch
import torch.distributed as dist

from raytrain_speech.config import ModelSpec, OptimConfig, StepConfig
from raytrain_speech.data.batching import Utterance, collate
from raytrain_speech.models.masking import model_span_mask
from raytrain_speech.models.registry import FAMILIES, build_model, family, objective_for
from raytrain_speech.train.optim import build_optimizer
from raytrain_speech.train.step import Stepper


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    store = dist.FileStore(str(tmp_path_factory.mktemp("pg") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _batch(kind: str, seed: int):
    rng = np.random.default_rng(seed)
    shape = (lambda n: (n * 160,)) if kind == "waveform" else (lambda n: (n, 80))
    utts = [Utterance(i, f"u{i}", n / 100, rng.standard_normal(shape(n)).astype(np.float32),
                      rng.integers(2, 29, size=5 + i)) for i, n in enumerate((120, 100))]
    return collate(utts)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_steps_twice_under_ddp(process_group, name):
    torch.manual_seed(0)
    spec = ModelSpec(family=name, preset="tiny")
    model = build_model(spec, 29)
    objective = objective_for(spec)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    stepper = Stepper(ddp, build_optimizer(model, OptimConfig()), StepConfig(precision="fp32"), objective.loss,
                      torch.device("cpu"))
    for seed in (0, 1):
        b = _batch(family(spec).input_kind, seed)
        if model.span_masking is not None:
            b.mask_BT = model_span_mask(model, b, seed=0, epoch=seed)
        result = stepper.step([b], objective.units(b), 1)
        assert np.isfinite(result.grad_norm)
