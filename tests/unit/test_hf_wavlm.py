"""WavLM's published (waveform) architecture against transformers (no network, no Ray): WavLMForCTC
in both layer-norm placements imported with hf: gives its logits (the gated relative position bias
included), exports back to a WavLMForCTC with the same logits, and WavLM Large maps tensor for
tensor on the meta device."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from raytrain_speech.config import Config  # noqa: E402
from raytrain_speech.data.subword import CTCVocabTokenizer  # noqa: E402
from raytrain_speech.evaluate.hf_export import export_hf  # noqa: E402
from raytrain_speech.evaluate.loading import load_model  # noqa: E402
from raytrain_speech.hf import mapping  # noqa: E402
from raytrain_speech.hf import wavlm as hf_wavlm  # noqa: E402
from raytrain_speech.models.registry import build_meta  # noqa: E402
from tests.unit.test_hf_wav2vec2 import _save, _vocab, _wave  # noqa: E402


def _wavlm(stable: bool, vocab: dict[str, int]):
    cfg = transformers.WavLMConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, conv_dim=(16, 16, 16),
        conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
        feat_extract_norm="layer" if stable else "group", do_stable_layer_norm=stable, conv_bias=stable,
        vocab_size=len(vocab), pad_token_id=0, initializer_range=0.2, num_buckets=32, max_bucket_distance=60)
    torch.manual_seed(5)
    model = transformers.WavLMForCTC(cfg).eval()
    with torch.no_grad():  # give the bias table and the gates values a trained model would have
        for layer in model.wavlm.encoder.layers:
            layer.attention.gru_rel_pos_const.uniform_(0.5, 1.5)
        model.wavlm.encoder.layers[0].attention.rel_attn_embed.weight.normal_(0, 1.0)
    return model


@pytest.mark.parametrize("stable", [False, True])
def test_an_imported_wavlm_for_ctc_gives_its_logits_and_exports_back(tmp_path, stable):
    vocab = _vocab(False)
    hf_model = _wavlm(stable, vocab)
    d = _save(tmp_path, hf_model, vocab)
    loaded = load_model(f"hf:{d}")
    assert loaded.cfg.model.family == "wavlm_waveform_ctc"
    x = torch.from_numpy(loaded.pre.features(_wave(2.0)))[None]  # 2 s: 99 frames, past the exact buckets
    with torch.no_grad():
        context, _ = loaded.model.encode(x, torch.tensor([x.shape[1]]))
        ours = loaded.model.head(context)
        theirs = hf_model(x).logits
        assert (ours - theirs).abs().max() < 1e-4
        out = tmp_path / "export"
        export_hf(f"hf:{d}", str(out), log=None)
        reloaded = transformers.WavLMForCTC.from_pretrained(out).eval()
        assert (reloaded(x).logits - ours).abs().max() < 1e-4


def test_wavlm_large_maps_every_tensor_on_the_meta_device():
    hf_cfg = transformers.WavLMConfig(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
        feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True, vocab_size=32)
    with torch.device("meta"):
        hf_model = transformers.WavLMForCTC(hf_cfg)
    cfg = Config()
    cfg.model.family = "wavlm_waveform_ctc"
    cfg.model.overrides = hf_wavlm.overrides_from_config(hf_cfg.to_dict(), "hf:wavlm-large")
    ours = build_meta(cfg.model, 32)
    vocab = CTCVocabTokenizer(json.dumps({f"t{i}" if i else "<pad>": i for i in range(32)}).encode())
    report = mapping.match({k: tuple(v.shape) for k, v in ours.state_dict().items()},
                           {k: tuple(v.shape) for k, v in hf_model.state_dict().items()},
                           hf_wavlm.family_map(ours, vocab), {n for n, _ in ours.named_parameters()})
    assert not report.mismatched and not report.missing and not report.unused and not report.new
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf_model.parameters())
