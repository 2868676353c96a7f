"""Whisper <-> ``WhisperForConditionalGeneration`` (transformers' layout): config, tensors, the
generation and feature-extractor files (plain torch and dicts; ``transformers`` is not imported).

Our Whisper is the published architecture with three storage differences, each mapped exactly:
- the key projections of HF have no bias; ours do. A key bias adds q . b to every key of a query,
  which softmax cancels, so import sets it to 0 and export drops it without changing any output;
- HF stores the encoder's sinusoidal table (a frozen 1500 x D embedding); ours computes it, so
  import checks the stored table is that table (and refuses a checkpoint that trained it);
- HF's output projection ``proj_out`` is tied to the token embedding, as ours is; an untied one
  that differs is refused.
"""

from __future__ import annotations

import torch

from raytrain_speech.config import ConfigError, require
from raytrain_speech.hf.mapping import FamilyMap, rename
from raytrain_speech.models.layers import sinusoids
from raytrain_speech.models.whisper import Whisper, WhisperConfig

ARCHITECTURE = "WhisperForConditionalGeneration"
MODEL_TYPE = "whisper"

_ATTN = [("q.weight", "q_proj.weight"), ("q.bias", "q_proj.bias"), ("k.weight", "k_proj.weight"),
         ("v.weight", "v_proj.weight"), ("v.bias", "v_proj.bias"), ("out.weight", "out_proj.weight"),
         ("out.bias", "out_proj.bias")]
_LN = [("weight", "weight"), ("bias", "bias")]


def _block(ours: str, hf: str, parts: list[tuple[str, str, list[tuple[str, str]]]]) -> list[tuple[str, str]]:
    return [(f"{ours}.{o}.{a}", f"{hf}.{h}.{b}") for o, h, leaf in parts for a, b in leaf]


def tensor_pairs(cfg: WhisperConfig) -> list[tuple[str, str]]:
    """(our name, HF name) for every tensor both have."""
    pairs = [(f"conv{i}.{p}", f"model.encoder.conv{i}.{p}") for i in (1, 2) for p in ("weight", "bias")]
    for i in range(cfg.encoder_layers):
        pairs += _block(f"encoder.layers.{i}", f"model.encoder.layers.{i}", [
            ("attn_norm", "self_attn_layer_norm", _LN), ("attn", "self_attn", _ATTN),
            ("mlp_norm", "final_layer_norm", _LN), ("mlp.0", "fc1", _LN), ("mlp.2", "fc2", _LN)])
    pairs += [(f"encoder.norm.{p}", f"model.encoder.layer_norm.{p}") for p in ("weight", "bias")]
    pairs += [("decoder.embed.weight", "model.decoder.embed_tokens.weight"),
              ("decoder.positions.weight", "model.decoder.embed_positions.weight")]
    for i in range(cfg.decoder_layers):
        pairs += _block(f"decoder.layers.{i}", f"model.decoder.layers.{i}", [
            ("self_norm", "self_attn_layer_norm", _LN), ("self_attn", "self_attn", _ATTN),
            ("cross_norm", "encoder_attn_layer_norm", _LN), ("cross_attn", "encoder_attn", _ATTN),
            ("mlp_norm", "final_layer_norm", _LN), ("mlp.0", "fc1", _LN), ("mlp.2", "fc2", _LN)])
    pairs += [(f"decoder.norm.{p}", f"model.decoder.layer_norm.{p}") for p in ("weight", "bias")]
    return pairs


def key_biases(cfg: WhisperConfig) -> list[str]:
    """Our key-projection biases, which HF's attention does not have (import sets them to 0)."""
    names = [f"encoder.layers.{i}.attn.k.bias" for i in range(cfg.encoder_layers)]
    for i in range(cfg.decoder_layers):
        names += [f"decoder.layers.{i}.self_attn.k.bias", f"decoder.layers.{i}.cross_attn.k.bias"]
    return names


def overrides_from_config(hf: dict, source: str) -> dict:
    """Our WhisperConfig fields from an HF config.json; ConfigError naming a field we cannot build."""
    for key, want in (("activation_function", "gelu"), ("scale_embedding", False)):
        require(hf.get(key, want) == want, f"{source} config.json {key}",
                f"is {hf.get(key)!r}; this Whisper is built with {want!r}")
    require(hf["encoder_attention_heads"] == hf["decoder_attention_heads"], f"{source} config.json",
            "encoder_attention_heads != decoder_attention_heads (ours shares one head count)")
    require(hf["encoder_ffn_dim"] == hf["decoder_ffn_dim"], f"{source} config.json",
            "encoder_ffn_dim != decoder_ffn_dim (ours shares one MLP width)")
    return {"n_mels": hf["num_mel_bins"], "d_model": hf["d_model"], "encoder_layers": hf["encoder_layers"],
            "decoder_layers": hf["decoder_layers"], "num_heads": hf["encoder_attention_heads"],
            "ffn_dim": hf["encoder_ffn_dim"], "max_source_positions": hf["max_source_positions"],
            "max_target_positions": hf["max_target_positions"], "dropout": float(hf.get("dropout", 0.0)),
            "vocab_size": hf["vocab_size"]}


def languages_from_generation(generation: dict | None) -> list[str] | None:
    """The prompt languages a checkpoint's generation_config.json lists (in id order)."""
    lang_to_id = (generation or {}).get("lang_to_id") or {}
    return [tok.strip("<|>") for tok, _ in sorted(lang_to_id.items(), key=lambda kv: kv[1])] or None


def features_from_preprocessor(pre: dict | None, hf: dict) -> dict:
    """``features.*`` that reproduce the checkpoint's WhisperFeatureExtractor."""
    pre = pre or {}
    rate = int(pre.get("sampling_rate", 16000))
    n_fft, hop = int(pre.get("n_fft", 400)), int(pre.get("hop_length", 160))
    return {"kind": "whisper_log_mel", "n_mels": int(pre.get("feature_size", hf["num_mel_bins"])),
            "sample_rate_hz": rate, "n_fft": n_fft, "win_length_ms": 1000.0 * n_fft / rate,
            "hop_length_ms": 1000.0 * hop / rate, "window": "hann", "normalize": "none",
            "placement": "data"}


def family_map(model: Whisper, tokenizer=None) -> FamilyMap:
    cfg = model.cfg
    return FamilyMap(tensor_pairs(cfg), zeros=key_biases(cfg),
                     checked=["model.encoder.embed_positions.weight", "proj_out.weight"])


def prepare_state(theirs: dict[str, torch.Tensor], tokenizer=None) -> dict[str, torch.Tensor]:
    return theirs


def check_values(theirs: dict[str, torch.Tensor], source: str) -> None:
    """The checked tensors are what ours computes: the encoder's table is the sinusoids, and a stored
    ``proj_out`` is the embedding (tied)."""
    table = theirs.get("model.encoder.embed_positions.weight")
    if table is not None:
        want = sinusoids(table.shape[0], table.shape[1])
        if not torch.allclose(table.float(), want, atol=1e-4):
            raise ConfigError(f"{source}: model.encoder.embed_positions.weight is not Whisper's sinusoidal table "
                              "(a checkpoint that trained it cannot be loaded into this encoder)")
    out = theirs.get("proj_out.weight")
    if out is not None:
        embed = theirs.get("model.decoder.embed_tokens.weight")
        if embed is None or out.shape != embed.shape or not torch.equal(out, embed):
            raise ConfigError(f"{source}: proj_out.weight differs from model.decoder.embed_tokens.weight "
                              "(untied output head; this decoder ties them)")


def export_state(model: Whisper) -> dict[str, torch.Tensor]:
    """Our weights under HF's names, with the fixed encoder table HF stores (key biases dropped:
    softmax cancels them, see the module docstring)."""
    cfg = model.cfg
    state = rename(model.state_dict(), tensor_pairs(cfg))
    state["model.encoder.embed_positions.weight"] = sinusoids(cfg.max_source_positions, cfg.d_model)
    return state


def _need_file_layout(model: Whisper) -> dict[str, int]:
    if model.own_layout:
        raise ConfigError("export --format hf: this Whisper was trained with text.tokenizer=char/sentencepiece "
                          "(its own special-token layout); transformers' Whisper needs a Whisper tokenizer.json "
                          "(text.tokenizer=hf): train with one, or use the default model.pt export")
    return model.specials


def config_json(model: Whisper) -> dict:
    cfg = model.cfg
    _need_file_layout(model)
    return {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE,
            "vocab_size": model.decoder.embed.num_embeddings, "num_mel_bins": cfg.n_mels, "d_model": cfg.d_model,
            "encoder_layers": cfg.encoder_layers, "decoder_layers": cfg.decoder_layers,
            "encoder_attention_heads": cfg.num_heads, "decoder_attention_heads": cfg.num_heads,
            "encoder_ffn_dim": cfg.ffn_dim or 4 * cfg.d_model, "decoder_ffn_dim": cfg.ffn_dim or 4 * cfg.d_model,
            "max_source_positions": cfg.max_source_positions, "max_target_positions": cfg.max_target_positions,
            "activation_function": "gelu", "scale_embedding": False, "dropout": cfg.dropout,
            "attention_dropout": cfg.dropout, "activation_dropout": 0.0, "tie_word_embeddings": True,
            "pad_token_id": model.eot_id, "bos_token_id": model.eot_id, "eos_token_id": model.eot_id,
            "decoder_start_token_id": model.sot_id, "begin_suppress_tokens": None, "suppress_tokens": None,
            "use_cache": True, "dtype": "float32"}


def generation_json(model: Whisper) -> dict:
    """HF ``generate`` set up to decode as ours does: the same prompt (``language=``, ``task=
    'transcribe'``, no timestamps) and every special token but the end suppressed."""
    specials = _need_file_layout(model)
    require("<|notimestamps|>" in specials, "text.tokenizer_path",
            "has no <|notimestamps|>, which transformers' Whisper generate needs")
    tasks = {t: specials[f"<|{t}|>"] for t in ("transcribe", "translate") if f"<|{t}|>" in specials}
    return {"decoder_start_token_id": model.sot_id, "eos_token_id": model.eot_id, "pad_token_id": model.eot_id,
            "bos_token_id": model.eot_id, "max_length": model.cfg.max_target_positions, "is_multilingual": True,
            "lang_to_id": {f"<|{c}|>": i for c, i in model.language_ids.items()}, "task_to_id": tasks,
            "no_timestamps_token_id": specials["<|notimestamps|>"],
            "suppress_tokens": sorted(set(model.special_ids) - {model.eot_id}), "begin_suppress_tokens": [],
            "forced_decoder_ids": None, "return_timestamps": False}


def preprocessor_json(features, model=None) -> dict:
    """WhisperFeatureExtractor's settings for our ``features`` (which must be whisper_log_mel)."""
    if features.kind != "whisper_log_mel":
        raise ConfigError("export --format hf: this Whisper reads features.kind=log_mel (our front end); "
                          "transformers' WhisperFeatureExtractor computes only whisper_log_mel: train with "
                          "features.kind=whisper_log_mel to export for transformers")
    chunk_s = 30  # transformers' encoder takes exactly 3000 frames, whatever we trained on
    return {"feature_extractor_type": "WhisperFeatureExtractor", "processor_class": "WhisperProcessor",
            "feature_size": features.n_mels, "sampling_rate": features.sample_rate_hz,
            "hop_length": features.hop_length, "n_fft": features.n_fft, "chunk_length": chunk_s,
            "n_samples": chunk_s * features.sample_rate_hz,
            "nb_max_frames": chunk_s * features.sample_rate_hz // features.hop_length,
            "padding_side": "right", "padding_value": 0.0, "return_attention_mask": False, "dither": 0.0}


def tokenizer_files(tokenizer, data: bytes) -> dict[str, bytes]:
    """The run's tokenizer.json and the tokenizer_config.json that makes it a WhisperTokenizer."""
    import json

    config = {"tokenizer_class": "WhisperTokenizer", "model_max_length": 1024, "errors": "replace",
              "add_prefix_space": False, "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
              "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    return {"tokenizer.json": data, "tokenizer_config.json": (json.dumps(config, indent=2) + "\n").encode()}
