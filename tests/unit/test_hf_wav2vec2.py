"""wav2vec 2.0 against transformers (no network, no Ray): Wav2Vec2ForCTC in both extractor modes and
layer-norm placements imported with hf: (logits and the greedy transcript, the head's rows permuted
when the vocabulary's pad is not id 0), Wav2Vec2ForPreTraining into the pretraining model and into
a CTC model with a fresh head, our CTC model exported and loaded by from_pretrained, and the
XLS-R 300M map on the meta device."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from raytrain_speech.config import Config, ConfigError, TextConfig  # noqa: E402
from raytrain_speech.data.text import CharTokenizer  # noqa: E402
from raytrain_speech.evaluate.hf_export import export_hf  # noqa: E402
from raytrain_speech.evaluate.loading import load_model  # noqa: E402
from raytrain_speech.hf import importer, mapping  # noqa: E402
from raytrain_speech.hf import wav2vec2 as hf_w2v  # noqa: E402
from raytrain_speech.models.registry import build_meta, build_model  # noqa: E402

LETTERS = list("etaoinshrdlucmfwypvbgk'")


def _small(layer_norm: bool, vocab_size: int, **kw) -> transformers.Wav2Vec2Config:
    return transformers.Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, conv_dim=(16, 16, 16),
        conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
        feat_extract_norm="layer" if layer_norm else "group", do_stable_layer_norm=layer_norm, conv_bias=layer_norm,
        vocab_size=vocab_size, codevector_dim=16, proj_codevector_dim=8, num_codevectors_per_group=5,
        initializer_range=0.2, **kw)


def _vocab(pad_last: bool) -> dict[str, int]:
    if pad_last:  # as many community XLS-R fine-tunes write it: [UNK] and [PAD] after the letters
        names = ["|", *LETTERS.copy(), "[UNK]", "[PAD]"]
    else:  # facebook/wav2vec2-base-960h's layout, capital letters
        names = ["<pad>", "<s>", "</s>", "<unk>", "|", *(c.upper() for c in LETTERS)]
    return {t: i for i, t in enumerate(names)}


def _ctc_model(layer_norm: bool, vocab: dict[str, int], pad_id: int):
    model = transformers.Wav2Vec2ForCTC(_small(layer_norm, len(vocab), pad_token_id=pad_id)).eval()
    with torch.no_grad():  # a trained head never emits <s> / </s> / <unk>; a random one would, and
        for t in ("<s>", "</s>", "<unk>", "[UNK]"):  # decoders differ on such tokens between repeats
            if t in vocab:
                model.lm_head.bias[vocab[t]] = -1e4
    return model


def _save(tmp_path, model, vocab=None, name="hf_w2v"):
    d = tmp_path / name
    model.save_pretrained(d)
    transformers.Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=False).save_pretrained(d)
    if vocab is not None:
        (d / "vocab.json").write_text(json.dumps(vocab))
    return d


def _settled_pretraining(tmp_path, family: str, layer_norm: bool, seed: int):
    """A saved random Wav2Vec2ForPreTraining, and a config of ``family`` settled from its directory."""
    torch.manual_seed(seed)
    hf_model = transformers.Wav2Vec2ForPreTraining(_small(layer_norm, 32)).eval()
    d = _save(tmp_path, hf_model)
    cfg = Config()
    cfg.model.family = family
    cfg.model.from_hf = f"hf:{d}"
    importer.settle(cfg, log=None)
    return hf_model, d, cfg


def _wave(seconds=1.2, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    return (0.2 * np.sin(2 * np.pi * 180 * t) + 0.1 * rng.standard_normal(t.shape)).astype(np.float32)


@pytest.mark.parametrize("layer_norm,pad_last", [(False, False), (True, True)])
def test_an_imported_wav2vec2_for_ctc_gives_its_logits_and_transcript(tmp_path, layer_norm, pad_last):
    vocab = _vocab(pad_last)
    torch.manual_seed(0)
    pad_id = vocab["[PAD]" if pad_last else "<pad>"]
    hf_model = _ctc_model(layer_norm, vocab, pad_id)
    d = _save(tmp_path, hf_model, vocab)
    loaded = load_model(f"hf:{d}")
    assert loaded.cfg.text.tokenizer == "ctc_vocab" and loaded.cfg.features.waveform_normalize
    x = _wave()
    ours_in = torch.from_numpy(loaded.pre.features(x))[None]
    hf_in = transformers.Wav2Vec2FeatureExtractor(do_normalize=True)(x, sampling_rate=16000,
                                                                     return_tensors="pt").input_values
    assert (ours_in - hf_in).abs().max() < 1e-5
    with torch.no_grad():
        context, _ = loaded.model.encode(ours_in, torch.tensor([ours_in.shape[1]]))
        ours_logits = loaded.model.head(context)
        hf_logits = hf_model(hf_in).logits
    order = torch.tensor(loaded.pre.tokenizer.file_ids)  # our id -> the file's id
    assert (ours_logits - hf_logits[..., order]).abs().max() < 1e-4
    ours_text = loaded.pre.tokenizer.decode(_ctc_greedy(ours_logits[0]))
    # The CTC rule on HF's own logits and the file's vocabulary: merge repeats, drop the pad, '|' is a space.
    names = {i: t for t, i in vocab.items()}
    merged = [names[i] for i, _ in itertools.groupby(hf_logits[0].argmax(-1).tolist()) if i != pad_id]
    hf_text = " ".join("".join(merged).replace("|", " ").split()).lower()
    assert len(ours_text) > 20 and ours_text == hf_text


def _ctc_greedy(logits_TV: torch.Tensor) -> list[int]:
    ids = torch.unique_consecutive(logits_TV.argmax(-1)).tolist()
    return [i for i in ids if i != 0]


def test_pretraining_checkpoints_load_into_the_pretraining_model_and_a_fresh_ctc_head(tmp_path):
    hf_model, d, cfg = _settled_pretraining(tmp_path, "wav2vec2", layer_norm=True, seed=1)
    model = build_model(cfg.model, 1).eval()
    report = importer.load_weights(model, "wav2vec2", f"hf:{d}", log=None)
    assert not report.new and not report.unused
    assert torch.equal(model.quantizer.codevectors, hf_model.quantizer.codevectors)
    assert torch.equal(model.final_proj.weight, hf_model.project_hid.weight)
    x = torch.from_numpy(_wave())[None]
    with torch.no_grad():
        ours = model.encoder(x, torch.tensor([x.shape[1]])).context_BTD
        theirs = hf_model.wav2vec2(x).last_hidden_state
    assert (ours - theirs).abs().max() < 1e-4
    cfg.model.family = "wav2vec2_ctc"
    ctc = build_model(cfg.model, CharTokenizer().vocab_size)
    report = importer.load_weights(ctc, "wav2vec2_ctc", f"hf:{d}", log=None, tokenizer=CharTokenizer())
    assert report.new == ["head.bias", "head.weight"] and not report.unused and not report.missing


def test_export_hf_of_a_ctc_model_is_loaded_by_transformers(tmp_path):
    torch.manual_seed(2)
    hf_model = _ctc_model(False, _vocab(False), 0)
    d = _save(tmp_path, hf_model, _vocab(False))
    out = tmp_path / "export"
    export_hf(f"hf:{d}", str(out), log=None)
    reloaded = transformers.Wav2Vec2ForCTC.from_pretrained(out).eval()
    processor = transformers.Wav2Vec2Processor.from_pretrained(out)
    x = _wave(seed=4)
    inputs = processor(x, sampling_rate=16000, return_tensors="pt").input_values
    loaded = load_model(f"hf:{d}")
    with torch.no_grad():
        context, _ = loaded.model.encode(inputs, torch.tensor([inputs.shape[1]]))
        assert (loaded.model.head(context) - reloaded(inputs).logits).abs().max() < 1e-4
        text = processor.batch_decode(reloaded(inputs).logits.argmax(-1))[0]
    assert text.lower() == loaded.pre.tokenizer.decode(_ctc_greedy(loaded.model.head(context)[0]))


def test_xls_r_300m_maps_every_tensor_on_the_meta_device():
    hf_cfg = transformers.Wav2Vec2Config(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
        feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True, codevector_dim=768,
        proj_codevector_dim=768, num_codevectors_per_group=320, vocab_size=32)
    with torch.device("meta"):
        hf_model = transformers.Wav2Vec2ForPreTraining(hf_cfg)
    cfg = Config()
    cfg.model.family = "wav2vec2"
    cfg.model.overrides = hf_w2v.overrides_from_config(hf_cfg.to_dict(), "hf:xls-r-300m")
    ours = build_meta(cfg.model, 1)
    report = mapping.match({k: tuple(v.shape) for k, v in ours.state_dict().items()},
                           {k: tuple(v.shape) for k, v in hf_model.state_dict().items()},
                           hf_w2v.family_map(ours), {n for n, _ in ours.named_parameters()})
    assert not report.mismatched and not report.missing and not report.unused and not report.new
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf_model.parameters())


def test_a_wrong_family_or_vocab_fails_with_one_line(tmp_path):
    torch.manual_seed(3)
    d = _save(tmp_path, transformers.Wav2Vec2ForPreTraining(_small(False, 32)).eval())
    cfg = Config()
    cfg.model.family = "wav2vec2_ctc"
    cfg.train.init_from = f"hf:{d}"
    cfg.text = TextConfig(tokenizer="ctc_vocab")
    with pytest.raises(ConfigError, match="no vocab.json"):
        importer.settle(cfg, log=None)
    cfg.model.family = "whisper"
    with pytest.raises(ConfigError, match="initialises wav2vec2_ctc"):
        importer.settle(cfg, log=None)



def test_the_model_pt_export_reads_an_hf_directory_too(tmp_path):
    from raytrain_speech.evaluate.quantize import export_checkpoint

    d = _save(tmp_path, _ctc_model(False, _vocab(False), 0), _vocab(False))
    report = export_checkpoint(f"hf:{d}", str(tmp_path / "artifact"), "int8", evaluate=False, log=lambda s: None)
    assert report["family"] == "wav2vec2_ctc" and report["bytes"]["checkpoint_state"] > 0
    exported = load_model(str(tmp_path / "artifact"))
    original = load_model(f"hf:{d}")
    x = torch.from_numpy(original.pre.features(_wave()))[None]
    with torch.no_grad():
        a, _ = exported.model.encode(x, torch.tensor([x.shape[1]]))
        b, _ = original.model.encode(x, torch.tensor([x.shape[1]]))
    assert (a - b).abs().max() < 0.1 * b.abs().max()  # int8 weights: close, not equal
    assert exported.pre.tokenizer.vocab_size == original.pre.tokenizer.vocab_size


def test_nar_ctc_starts_its_refinement_decoder_fresh_and_exports_without_it(tmp_path):
    """transformers has no Mask-CTC decoder: import leaves nar_ctc's fresh (not an error), export drops it."""
    _, d, cfg = _settled_pretraining(tmp_path, "nar_ctc", layer_norm=False, seed=3)
    model = build_model(cfg.model, CharTokenizer().vocab_size)
    assert model.decoder is not None
    report = importer.load_weights(model, "nar_ctc", f"hf:{d}", log=None, tokenizer=CharTokenizer())
    assert not report.missing and not report.unused
    assert any(k.startswith("decoder.") for k in report.new) and "head.weight" in report.new
    state = hf_w2v.export_state(model)
    assert not any("decoder" in k for k in state) and "lm_head.weight" in state
    plain = hf_w2v.export_state(build_model(replace(cfg.model, family="wav2vec2_ctc"), CharTokenizer().vocab_size))
    assert set(state) == set(plain)
