"""Whisper against transformers (no network, no Ray): our whisper_log_mel against
WhisperFeatureExtractor, a randomly initialised WhisperForConditionalGeneration imported with hf:
(encoder, logits and HF generate's transcript), our model exported with --format hf and loaded by
from_pretrained, and the large-v3 map on the meta device."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from raytrain_speech.batch import Batch  # noqa: E402
from raytrain_speech.config import Config, ConfigError, FeatureConfig  # noqa: E402
from raytrain_speech.data.features import FeatureExtractor  # noqa: E402
from raytrain_speech.data.subword import HFTokenizer, train_whisper_bpe  # noqa: E402
from raytrain_speech.evaluate.hf_export import export_hf  # noqa: E402
from raytrain_speech.evaluate.loading import load_model  # noqa: E402
from raytrain_speech.hf import importer, mapping  # noqa: E402
from raytrain_speech.hf import whisper as hf_whisper  # noqa: E402
from raytrain_speech.models.registry import build_meta  # noqa: E402

TEXTS = ["the cat sat on the mat", "a quick brown fox", "we went to the market", "hello world"] * 30


def _audio(seconds=2.0, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)


@pytest.mark.parametrize("n_mels", [80, 128])
@pytest.mark.parametrize("pad_to_s", [30.0, 0.0])
def test_whisper_log_mel_matches_the_feature_extractor(n_mels, pad_to_s):
    x = _audio(3.0)
    kw = {} if pad_to_s else {"padding": "longest"}
    ref = transformers.WhisperFeatureExtractor(feature_size=n_mels)(
        x, sampling_rate=16000, return_tensors="np", **kw).input_features[0].T
    ours = FeatureExtractor(FeatureConfig(kind="whisper_log_mel", n_mels=n_mels, window="hann", normalize="none",
                                          pad_to_s=pad_to_s))(x)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() < 1e-4


def _hf_whisper_dir(tmp_path, n_mels=80):
    """A random transformers Whisper at a small size with a Whisper-layout tokenizer.json."""
    tok_json = train_whisper_bpe(TEXTS, 300)
    tok = HFTokenizer(tok_json)
    s = tok.specials
    hf_cfg = transformers.WhisperConfig(
        vocab_size=tok.vocab_size, num_mel_bins=n_mels, d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
        max_source_positions=1500, max_target_positions=48, pad_token_id=s["<|endoftext|>"],
        bos_token_id=s["<|endoftext|>"], eos_token_id=s["<|endoftext|>"],
        decoder_start_token_id=s["<|startoftranscript|>"], begin_suppress_tokens=None,
        init_std=0.3)  # wide enough that a random decoder's greedy output changes from token to token
    torch.manual_seed(0)
    model = transformers.WhisperForConditionalGeneration(hf_cfg).eval()
    g = model.generation_config  # as a published checkpoint's generation_config.json has it
    g.lang_to_id = {"<|en|>": s["<|en|>"], "<|es|>": s["<|es|>"]}
    g.task_to_id = {"transcribe": s["<|transcribe|>"], "translate": s["<|translate|>"]}
    g.no_timestamps_token_id, g.is_multilingual = s["<|notimestamps|>"], True
    d = tmp_path / "hf_whisper"
    model.save_pretrained(d)
    (d / "tokenizer.json").write_bytes(tok_json)
    transformers.WhisperFeatureExtractor(feature_size=n_mels).save_pretrained(d)
    return d, model, tok


def _generation_kwargs(tok):
    s = tok.specials
    return {"language": "en", "task": "transcribe", "do_sample": False, "num_beams": 1,
            "suppress_tokens": sorted(set(s.values()) - {s["<|endoftext|>"]}), "begin_suppress_tokens": []}


def test_an_imported_transformers_whisper_gives_its_encoder_logits_and_transcript(tmp_path):
    d, hf_model, tok = _hf_whisper_dir(tmp_path)
    loaded = load_model(f"hf:{d}")
    assert loaded.cfg.features.kind == "whisper_log_mel" and loaded.cfg.features.pad_to_s == 30.0
    ours = loaded.model
    feats = torch.from_numpy(loaded.pre.features(_audio(2.0)))[None]  # 1, 3000, 80
    lengths = torch.tensor([feats.shape[1]])
    with torch.no_grad():
        enc_ours, _ = ours.encode(feats, lengths)
        enc_hf = hf_model.model.encoder(feats.transpose(1, 2)).last_hidden_state
        assert (enc_ours - enc_hf).abs().max() < 1e-4
        prompt = ours.prefix(["en"], 1)
        text = torch.tensor([tok.encode("the cat sat")])
        decoder_in = torch.cat([prompt, text], 1)
        logits_ours = ours.decoder(decoder_in, enc_ours, lengths)
        logits_hf = hf_model(input_features=feats.transpose(1, 2), decoder_input_ids=decoder_in).logits
        assert (logits_ours - logits_hf).abs().max() < 1e-4
    batch = Batch(features_BFM=feats, feature_lengths_B=lengths, targets_BL=torch.zeros(1, 1, dtype=torch.long),
                  target_lengths_B=torch.ones(1, dtype=torch.long), languages=["en"])
    gen = hf_model.generate(feats.transpose(1, 2), max_new_tokens=30, **_generation_kwargs(tok))[0].tolist()
    gen = [t for t in gen if t != tok.specials["<|endoftext|>"]]  # transformers 5 returns the new tokens only
    hyp_ours = ours.transcribe(batch, max_len=len(gen))[0]
    assert len(set(gen)) > 3 and hyp_ours == gen


def test_export_hf_is_loaded_by_transformers_with_the_same_logits_and_generate(tmp_path):
    d, _, tok = _hf_whisper_dir(tmp_path)
    loaded = load_model(f"hf:{d}")
    out = tmp_path / "export"
    # Exporting the imported directory itself: its own generation_config.json is not copied, ours is written.
    summary = export_hf(f"hf:{d}", str(out), log=None)
    assert summary["architecture"] == "WhisperForConditionalGeneration"
    reloaded = transformers.WhisperForConditionalGeneration.from_pretrained(out).eval()
    ours = load_model(f"hf:{d}").model
    feats = torch.from_numpy(loaded.pre.features(_audio(1.5, seed=3)))[None]
    prompt = ours.prefix(["en"], 1)
    with torch.no_grad():
        a = reloaded(input_features=feats.transpose(1, 2), decoder_input_ids=prompt).logits
        enc, lengths = ours.encode(feats, torch.tensor([feats.shape[1]]))
        b = ours.decoder(prompt, enc, lengths)
    assert (a - b).abs().max() < 1e-4
    assert transformers.AutoTokenizer.from_pretrained(out).decode(tok.encode("the cat")) == "the cat"
    pre = transformers.AutoFeatureExtractor.from_pretrained(out)
    assert pre.feature_size == 80 and type(pre).__name__ == "WhisperFeatureExtractor"
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["no_timestamps_token_id"] == tok.specials["<|notimestamps|>"]
    # transformers' generate with only the exported generation_config.json decodes as ours does.
    hyp_hf = reloaded.generate(feats.transpose(1, 2), language="en", task="transcribe", max_new_tokens=24)[0].tolist()
    hyp_hf = [t for t in hyp_hf if t != tok.specials["<|endoftext|>"]]
    batch = Batch(features_BFM=feats, feature_lengths_B=torch.tensor([feats.shape[1]]),
                  targets_BL=torch.zeros(1, 1, dtype=torch.long), target_lengths_B=torch.ones(1, dtype=torch.long),
                  languages=["en"])
    assert len(set(hyp_hf)) > 3 and ours.transcribe(batch, max_len=len(hyp_hf))[0] == hyp_hf


def test_export_of_our_own_trained_weights_round_trips_through_transformers(tmp_path):
    """Perturbed weights (as after training) -> export -> from_pretrained -> the same logits."""
    d, _, _ = _hf_whisper_dir(tmp_path)
    loaded = load_model(f"hf:{d}")
    model = loaded.model
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = hf_whisper.export_state(model)
    hf_cfg = transformers.WhisperConfig(**{k: v for k, v in hf_whisper.config_json(model).items()
                                           if k not in ("architectures", "model_type")})
    hf_model = transformers.WhisperForConditionalGeneration(hf_cfg).eval()
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    assert set(missing) <= {"proj_out.weight"} and not unexpected
    hf_model.tie_weights()
    feats = torch.randn(1, 3000, 80)
    prompt = model.prefix(["en"], 1)
    with torch.no_grad():
        enc, lengths = model.encode(feats, torch.tensor([3000]))
        assert (model.decoder(prompt, enc, lengths) -
                hf_model(input_features=feats.transpose(1, 2), decoder_input_ids=prompt).logits).abs().max() < 1e-4


def test_large_v3_maps_every_tensor_on_the_meta_device():
    hf_cfg = transformers.WhisperConfig(
        vocab_size=51866, num_mel_bins=128, d_model=1280, encoder_layers=32, decoder_layers=32,
        encoder_attention_heads=20, decoder_attention_heads=20, encoder_ffn_dim=5120, decoder_ffn_dim=5120,
        max_source_positions=1500, max_target_positions=448)
    with torch.device("meta"):
        hf_model = transformers.WhisperForConditionalGeneration(hf_cfg)
    theirs = {k: tuple(v.shape) for k, v in hf_model.state_dict().items()}
    cfg = Config()
    cfg.model.family = "whisper"
    cfg.model.overrides = hf_whisper.overrides_from_config(hf_cfg.to_dict(), "hf:large-v3")
    cfg.model.overrides["languages"] = ["en"]
    specials = {"<|endoftext|>": 50257, "<|startoftranscript|>": 50258, "<|en|>": 50259, "<|transcribe|>": 50360,
                "<|notimestamps|>": 50364}
    ours = build_meta(cfg.model, 51866, specials)
    report = mapping.match({k: tuple(v.shape) for k, v in ours.state_dict().items()}, theirs,
                           hf_whisper.family_map(ours), {n for n, _ in ours.named_parameters()})
    assert not report.mismatched and not report.missing and not report.unused, report
    hf_params = sum(p.numel() for p in hf_model.parameters())
    ours_params = sum(p.numel() for p in ours.parameters())
    # HF counts the stored 1500 x 1280 sinusoid table; ours has 64 key biases of 1280 more.
    assert ours_params == hf_params - 1500 * 1280 + 96 * 1280


def test_bad_directories_fail_naming_the_tensor_or_field(tmp_path):
    d, hf_model, _ = _hf_whisper_dir(tmp_path)
    cfg_json = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg_json, "model_type": "bart"}))
    with pytest.raises(ConfigError, match="model_type 'bart'"):
        load_model(f"hf:{d}")
    (d / "config.json").write_text(json.dumps(cfg_json))
    from safetensors.torch import load_file, save_file

    state = load_file(d / "model.safetensors")
    save_file({k: v for k, v in state.items() if k != "model.decoder.layers.1.fc2.bias"}, d / "model.safetensors")
    with pytest.raises(ConfigError, match=r"missing tensor\(s\) for: decoder.layers.1.mlp.2.bias"):
        load_model(f"hf:{d}")
    state["model.encoder.layers.0.fc1.weight"] = torch.zeros(7, 64)
    save_file(state, d / "model.safetensors")
    with pytest.raises(ConfigError, match=r"shape mismatch: encoder.layers.0.mlp.0.weight <- "
                                          r"model.encoder.layers.0.fc1.weight"):
        load_model(f"hf:{d}")


def test_settle_fills_the_run_config_from_the_directory(tmp_path):
    d, _, _ = _hf_whisper_dir(tmp_path, n_mels=128)
    cfg = Config()
    cfg.model.family = "whisper"
    cfg.train.init_from = f"hf:{d}"
    cfg.model.overrides = {"dropout": 0.2}
    importer.settle(cfg, log=None)
    assert cfg.model.from_hf == f"hf:{d}"
    assert cfg.model.overrides["d_model"] == 64 and cfg.model.overrides["dropout"] == 0.2
    assert cfg.features.kind == "whisper_log_mel" and cfg.features.n_mels == 128 and cfg.features.pad_to_s == 30
    assert cfg.text.tokenizer == "hf" and cfg.text.tokenizer_path.endswith("tokenizer.json")
    cfg.model.family = "conformer_ctc"
    with pytest.raises(ConfigError, match="initialises whisper"):
        importer.settle(cfg, log=None)


@pytest.mark.parametrize("layout", ["sharded", "bin"])
def test_sharded_safetensors_and_pytorch_bin_directories_import_the_same(tmp_path, layout):
    d, hf_model, _ = _hf_whisper_dir(tmp_path)
    other = tmp_path / layout
    if layout == "sharded":
        hf_model.save_pretrained(other, max_shard_size="200KB")
        assert (other / "model.safetensors.index.json").exists()
    else:
        other.mkdir()
        torch.save(hf_model.state_dict(), other / "pytorch_model.bin")
        (other / "config.json").write_text((d / "config.json").read_text())
    for name in ("tokenizer.json", "preprocessor_config.json", "generation_config.json"):
        (other / name).write_bytes((d / name).read_bytes())
    a, b = load_model(f"hf:{d}").model.state_dict(), load_model(f"hf:{other}").model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_s3_directory_imports_through_the_s3_wire_protocol(tmp_path, s3_endpoint, s3fs_client):
    d, _, _ = _hf_whisper_dir(tmp_path)
    s3fs_client.mkdir("hf-models")
    s3fs_client.put(str(d), "hf-models/whisper", recursive=True)
    from raytrain_speech.config import StorageConfig

    remote = load_model("hf:s3://hf-models/whisper", StorageConfig(endpoint_url=s3_endpoint))
    local = load_model(f"hf:{d}")
    assert all(torch.equal(v, local.model.state_dict()[k]) for k, v in remote.model.state_dict().items())


def test_train_from_a_broken_directory_fails_before_ray_with_one_line(tmp_path):
    import subprocess
    import sys

    d, _, _ = _hf_whisper_dir(tmp_path)
    from safetensors.torch import load_file, save_file

    state = load_file(d / "model.safetensors")
    state["model.decoder.layers.0.fc1.weight"] = torch.zeros(5, 64)
    save_file(state, d / "model.safetensors")
    proc = subprocess.run([sys.executable, "-m", "raytrain_speech.cli", "train", "--config",
                           "examples/whisper_finetune_tiny.yaml", f"train.init_from=hf:{d}",
                           f"data.root={tmp_path / 'nowhere'}", f"run.storage_path={tmp_path / 'runs'}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "shape mismatch: decoder.layers.0.mlp.0.weight <- model.decoder.layers.0.fc1.weight" \
        in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and "ray" not in proc.stderr.lower().replace("raytrain", "")


def test_init_strict_false_loads_what_fits_and_reports_the_rest(tmp_path):
    d, _, tok = _hf_whisper_dir(tmp_path)
    from safetensors.torch import load_file, save_file

    state = load_file(d / "model.safetensors")
    save_file({**state, "model.decoder.extra_adapter.weight": torch.ones(3)}, d / "model.safetensors")
    cfg = importer.config_for_eval(f"hf:{d}", None)
    from raytrain_speech.models.registry import build_model

    model = build_model(cfg.model, tok.vocab_size, tok.specials)
    with pytest.raises(ConfigError, match=r"unused checkpoint tensor\(s\): model.decoder.extra_adapter.weight"):
        importer.load_weights(model, "whisper", f"hf:{d}", log=None, tokenizer=tok)
    report = importer.load_weights(model, "whisper", f"hf:{d}", strict=False, log=None, tokenizer=tok)
    assert report.unused == ["model.decoder.extra_adapter.weight"] and not report.missing
    assert torch.equal(model.decoder.embed.weight, state["model.decoder.embed_tokens.weight"])
