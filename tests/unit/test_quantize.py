"""int8 export: every text family exports, loads back with weights_only, decodes close to float, and the
artifact is well over 60% smaller than the float export."""

import io

import numpy as np
import pytest
import torch

from raytrain_speech.config import ModelSpec
from raytrain_speech.data.batching import Utterance, collate
from raytrain_speech.data.text import CharTokenizer
from raytrain_speech.evaluate import artifact, quantize
from raytrain_speech.evaluate.decode import hypotheses
from raytrain_speech.models.registry import FAMILIES, build_model

TEXT_FAMILIES = sorted(n for n, f in FAMILIES.items() if f.text_output is not None)


class _Cfg:
    def __init__(self, name):
        self.model = ModelSpec(family=name)


def _batch(kind: str):
    rng = np.random.default_rng(0)
    shape = (lambda n: (n * 160,)) if kind == "waveform" else (lambda n: (n, 80))
    utts = [Utterance(i, f"u{i}", n / 100, rng.standard_normal(shape(n)).astype(np.float32) * 0.3,
                      rng.integers(2, 29, size=5).astype(np.int16)) for i, n in enumerate((150, 110))]
    return collate(utts)


@pytest.mark.parametrize("name", TEXT_FAMILIES)
def test_int8_artifact_round_trips_and_stays_close(name):
    torch.manual_seed(0)
    model = build_model(ModelSpec(family=name), 29).eval()
    exported = quantize.export_model(model, "model: {}", step=7, quantize="int8")
    raw = quantize.payload_bytes(exported.payload)
    float_raw = quantize.payload_bytes(quantize.export_model(model, "model: {}", 7, "none").payload)
    assert 1 - len(raw) / len(float_raw) > 0.6, (len(raw), len(float_raw))

    payload = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    assert payload["quantize"] == "int8" and payload["step"] == 7
    loaded = artifact.build_from_artifact(payload, _Cfg(name), CharTokenizer())
    assert any(type(m).__module__.startswith("torch.ao.nn.quantized.dynamic") for m in loaded.modules())
    batch = _batch(FAMILIES[name].input_kind)
    with torch.inference_mode():
        if FAMILIES[name].text_output == "ctc":
            ref = model(batch)["log_probs_BTV"].exp()
            got = loaded(batch)["log_probs_BTV"].exp()
            same = exported.quantized_model(batch)["log_probs_BTV"].exp()
            # The artifact computes exactly what export scored, and stays close to the float model.
            assert torch.equal(got, same)
            assert (got - ref).abs().max() < 0.05
        else:
            out = {"lengths_B": model.output_lengths(batch.feature_lengths_B)}
            assert hypotheses(loaded, batch, out, "seq2seq") == hypotheses(exported.quantized_model, batch, out,
                                                                            "seq2seq")


def test_float_export_is_lossless():
    torch.manual_seed(0)
    model = build_model(ModelSpec(family="conformer_ctc"), 29).eval()
    payload = torch.load(io.BytesIO(quantize.payload_bytes(quantize.export_model(model, "", 1, "none").payload)),
                         weights_only=True)
    loaded = artifact.build_from_artifact(payload, _Cfg("conformer_ctc"), CharTokenizer())
    batch = _batch("log_mel")
    with torch.inference_mode():
        assert torch.equal(model(batch)["log_probs_BTV"], loaded(batch)["log_probs_BTV"])


def test_int8_rows_error_is_bounded_by_half_a_step():
    w = torch.randn(64, 3, 5)
    entry = quantize._int8_rows(w)
    step = w.reshape(64, -1).abs().amax(1) / 127
    err = (artifact.dequant_rows(entry) - w).reshape(64, -1).abs().amax(1)
    assert torch.all(err <= step / 2 + 1e-7)


def test_unknown_quantization_is_an_error():
    with pytest.raises(ValueError, match="int8"):
        quantize.export_model(torch.nn.Linear(2, 2), "", 0, "int4")
