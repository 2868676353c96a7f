"""model.activation_checkpointing: per family, the same loss, gradients and BatchNorm statistics with
and without, and fewer bytes kept for the backward pass (autograd's saved tensors, counted by hooks)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from raytrain_speech.config import ConfigError, ModelSpec, load_config
from raytrain_speech.data.batching import Utterance, collate
from raytrain_speech.models import activation_checkpointing
from raytrain_speech.models.masking import model_span_mask
from raytrain_speech.models.registry import FAMILIES, build_model, family, objective_for


def _batch(kind: str):
    rng = np.random.default_rng(0)
    shape = (lambda n: (n * 160,)) if kind == "waveform" else (lambda n: (n, 80))
    return collate([Utterance(i, f"u{i}", n / 100, rng.standard_normal(shape(n)).astype(np.float32),
                              rng.integers(2, 29, size=5 + i)) for i, n in enumerate((160, 120))])


def _saved_bytes() -> tuple[list[int], object]:
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    return total, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


def _loss_grads(name: str, mode: str):
    spec = ModelSpec(family=name, preset="tiny", activation_checkpointing=mode)
    torch.manual_seed(0)
    model = build_model(spec, 29).train()
    batch = _batch(family(spec).input_kind)
    if model.span_masking is not None:
        batch = dataclasses.replace(batch, mask_BT=model_span_mask(model, batch, seed=0, epoch=0))
    torch.manual_seed(1)  # dropout, negatives: the same draws in both runs
    total, hooks = _saved_bytes()
    with hooks:
        loss, _units, _stats = objective_for(spec).loss(batch, model(batch))
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    return float(loss.detach()), grads, buffers, total[0], model


DEFAULT_RUN = ("conformer_aed", "conformer_ctc", "wav2vec2_ctc", "wavlm_ctc", "whisper")
"""One family per model type in the default run (the others share their blocks); all in the slow run."""


@pytest.mark.parametrize("name", [n if n in DEFAULT_RUN else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(FAMILIES)])
def test_same_gradients_with_and_without_and_less_kept_for_backward(name):
    loss, grads, buffers, kept, _ = _loss_grads(name, "none")
    loss_ac, grads_ac, buffers_ac, kept_ac, model = _loss_grads(name, "blocks")
    assert activation_checkpointing.block_stacks(model), "no layer stack found"
    assert loss_ac == pytest.approx(loss, rel=1e-6)
    assert grads_ac.keys() == grads.keys()
    for k in grads:
        torch.testing.assert_close(grads_ac[k], grads[k], rtol=1e-5, atol=1e-6, msg=f"{name}: {k}")
    for k in buffers:  # BatchNorm statistics updated once, as without checkpointing
        torch.testing.assert_close(buffers_ac[k], buffers[k], msg=f"{name}: buffer {k}")
    assert kept_ac < 0.8 * kept, (name, kept, kept_ac)
    # parameter names (optimizer groups, checkpoints, exports) unchanged
    assert sorted(model.state_dict()) == sorted(build_model(ModelSpec(family=name, preset="tiny"), 29).state_dict())


def test_every_n_picks_every_nth_block_and_bad_modes_are_one_line():
    model = build_model(ModelSpec(family="whisper", preset="tiny", activation_checkpointing="every_2"), 29)
    stacks = activation_checkpointing.block_stacks(model)
    for _, stack in stacks:
        assert [getattr(b, "_rts_checkpointed", False) for b in stack] == [i % 2 == 0 for i in range(len(stack))]
    with pytest.raises(ConfigError, match="model.activation_checkpointing: 'every_0' is not none, blocks or every_N"):
        load_config("examples/conformer_ctc_tiny.yaml", ["model.activation_checkpointing=every_0"])
