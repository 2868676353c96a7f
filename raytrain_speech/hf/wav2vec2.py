"""wav2vec 2.0 <-> transformers' ``Wav2Vec2ForCTC`` / ``Wav2Vec2ForPreTraining`` / ``Wav2Vec2Model``
(plain torch and dicts; ``transformers`` is not imported).

Our encoder keeps torchaudio's module names, which are transformers' own under ``wav2vec2.``
(torchaudio's ``import_huggingface_model`` copies them as they are), so the map is a prefix per
part: feature extractor, projection, Transformer (weight-normed positional conv included), the mask
embedding; then the CTC head (``lm_head``) or the pretraining heads (quantizer, ``project_hid``,
``project_q``). Both extractor modes and both layer-norm placements are the same modules with a
flag. A CTC head is kept with the checkpoint's own vocab.json (rows permuted so the blank is id 0);
with any other tokenizer the head starts fresh and the checkpoint's is left out on purpose.
"""

from __future__ import annotations

import torch

from raytrain_speech.config import ConfigError, require
from raytrain_speech.hf.mapping import FamilyMap, rename
from raytrain_speech.models.wav2vec2 import Wav2Vec2CTC, Wav2Vec2Pretraining

MODEL_TYPE = "wav2vec2"
PRETRAINING_HEADS = [("quantizer.codevectors", "quantizer.codevectors"),
                     ("quantizer.weight_proj.weight", "quantizer.weight_proj.weight"),
                     ("quantizer.weight_proj.bias", "quantizer.weight_proj.bias"),
                     ("final_proj.weight", "project_hid.weight"), ("final_proj.bias", "project_hid.bias"),
                     ("project_q.weight", "project_q.weight"), ("project_q.bias", "project_q.bias")]
CTC_HEAD = [("head.weight", "lm_head.weight"), ("head.bias", "lm_head.bias")]


PREFIX = "wav2vec2."
"""transformers' attribute holding the encoder (WavLM: ``wavlm.``)."""


def encoder_pairs(own_names, prefix: str = PREFIX) -> list[tuple[str, str]]:
    """(ours, HF) for every encoder tensor of ours: encoder.X <- wav2vec2.X, the Transformer under
    wav2vec2.encoder, the mask embedding as masked_spec_embed."""
    pairs = []
    for name in own_names:
        if not name.startswith("encoder."):
            continue
        rest = name.removeprefix("encoder.")
        if rest == "mask_embedding":
            pairs.append((name, prefix + "masked_spec_embed"))
        elif rest.startswith("transformer."):
            pairs.append((name, prefix + "encoder." + rest.removeprefix("transformer.")))
        else:
            pairs.append((name, prefix + rest))
    return pairs


def with_prefix(theirs: dict, prefix: str = PREFIX) -> dict:
    """A bare ``Wav2Vec2Model`` saves its tensors without the ``wav2vec2.`` prefix; add it."""
    if any(k.startswith(prefix) for k in theirs):
        return theirs
    return {f"{prefix}{k}": v for k, v in theirs.items()}


def overrides_from_config(hf: dict, source: str) -> dict:
    """Our Wav2Vec2Config fields from an HF config.json; ConfigError naming what we cannot build."""
    conv = list(hf["conv_dim"])
    require(len(set(conv)) == 1, f"{source} config.json conv_dim", f"is {conv}; ours has one width for every conv")
    for key, want in (("hidden_act", "gelu"), ("feat_extract_activation", "gelu"), ("add_adapter", False),
                      ("use_weighted_layer_sum", False), ("position_embeddings_type", None)):
        require(hf.get(key, want) == want, f"{source} config.json {key}", f"is {hf.get(key)!r}; ours is {want!r}")
    return {"conv_channels": conv[0], "conv_kernels": tuple(hf["conv_kernel"]), "conv_strides": tuple(hf["conv_stride"]),
            "extractor_mode": f"{hf['feat_extract_norm']}_norm", "conv_bias": bool(hf["conv_bias"]),
            "normalize_waveform": False,  # the feature extractor's do_normalize does it (features.waveform_normalize)
            "d_model": hf["hidden_size"], "num_layers": hf["num_hidden_layers"], "num_heads": hf["num_attention_heads"],
            "ffn_dim": hf["intermediate_size"], "layer_norm_first": bool(hf["do_stable_layer_norm"]),
            "pos_conv_kernel": hf["num_conv_pos_embeddings"], "pos_conv_groups": hf["num_conv_pos_embedding_groups"],
            "dropout": float(hf.get("hidden_dropout", 0.1)), "attention_dropout": float(hf.get("attention_dropout", 0.1)),
            "activation_dropout": float(hf.get("activation_dropout", 0.0)),
            "input_dropout": float(hf.get("feat_proj_dropout", 0.0)), "layer_drop": float(hf.get("layerdrop", 0.0)),
            "final_dropout": float(hf.get("final_dropout", 0.0)),
            "codebook_groups": hf.get("num_codevector_groups", 2), "codebook_entries": hf.get("num_codevectors_per_group", 320),
            "codevector_dim": hf.get("codevector_dim", 256), "final_dim": hf.get("proj_codevector_dim", 256),
            "num_negatives": hf.get("num_negatives", 100),
            "logit_temperature": float(hf.get("contrastive_logits_temperature", 0.1))}


def features_from_preprocessor(pre: dict | None, hf: dict) -> dict:
    pre = pre or {}
    return {"kind": "waveform", "sample_rate_hz": int(pre.get("sampling_rate", 16000)),
            "waveform_normalize": bool(pre.get("do_normalize", True))}


def family_map(model, tokenizer=None, prefix: str = PREFIX) -> FamilyMap:
    """Encoder always; pretraining heads into the pretraining model (and left out of a CTC model);
    the CTC head only with a vocab.json tokenizer (text.tokenizer=ctc_vocab: the checkpoint's own)."""
    keep_head = getattr(tokenizer, "kind", None) == "ctc_vocab"
    pairs = encoder_pairs(model.state_dict(), prefix)
    if isinstance(model, Wav2Vec2Pretraining):
        return FamilyMap(pairs + PRETRAINING_HEADS, checked=["lm_head.weight", "lm_head.bias"])
    left_out = [hf for _, hf in PRETRAINING_HEADS] + ([] if keep_head else [hf for _, hf in CTC_HEAD])
    # nar_ctc's Mask-CTC refinement decoder has no transformers counterpart: it starts fresh.
    return FamilyMap(pairs + (CTC_HEAD if keep_head else []), checked=left_out, fresh_ok=("head.", "decoder."))


def prepare_state(theirs: dict[str, torch.Tensor], tokenizer, prefix: str = PREFIX) -> dict[str, torch.Tensor]:
    """The checkpoint under ``wav2vec2.`` names, its CTC head's rows in our tokenizer's order."""
    theirs = with_prefix(theirs, prefix)
    order = getattr(tokenizer, "file_ids", None)
    if order is not None and "lm_head.weight" in theirs:
        rows = theirs["lm_head.weight"].shape[0]
        if rows != len(order):
            raise ConfigError(f"lm_head.weight has {rows} rows but the vocab.json {len(order)} tokens")
        index = torch.tensor(order)
        theirs = {**theirs, "lm_head.weight": theirs["lm_head.weight"][index], "lm_head.bias": theirs["lm_head.bias"][index]}
    return theirs


def check_values(theirs: dict[str, torch.Tensor], source: str) -> None:
    """Nothing is computed instead of stored here."""


def export_state(model: Wav2Vec2CTC, prefix: str = PREFIX) -> dict[str, torch.Tensor]:
    """The encoder and CTC head under transformers' names. nar_ctc's refinement decoder is left out:
    Wav2Vec2ForCTC has no such part, so the export decodes as greedy / beam CTC."""
    if not isinstance(model, Wav2Vec2CTC):
        raise ConfigError("export --format hf: only the CTC model (Wav2Vec2ForCTC) is exported")
    return rename(model.state_dict(), encoder_pairs(model.state_dict(), prefix) + CTC_HEAD)


def config_json(model: Wav2Vec2CTC, architecture: str = "Wav2Vec2ForCTC", model_type: str = MODEL_TYPE) -> dict:
    c = model.cfg
    return {"architectures": [architecture], "model_type": model_type, "vocab_size": model.head.out_features,
            "conv_dim": [c.conv_channels] * len(c.conv_kernels), "conv_kernel": list(c.conv_kernels),
            "conv_stride": list(c.conv_strides), "num_feat_extract_layers": len(c.conv_kernels),
            "feat_extract_norm": c.extractor_mode.removesuffix("_norm"), "conv_bias": c.conv_bias,
            "feat_extract_activation": "gelu", "hidden_act": "gelu", "hidden_size": c.d_model,
            "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads, "intermediate_size": c.ffn_dim,
            "do_stable_layer_norm": c.layer_norm_first, "num_conv_pos_embeddings": c.pos_conv_kernel,
            "num_conv_pos_embedding_groups": c.pos_conv_groups, "hidden_dropout": c.dropout,
            "attention_dropout": c.attention_dropout, "activation_dropout": c.activation_dropout,
            "feat_proj_dropout": c.input_dropout, "layerdrop": c.layer_drop, "final_dropout": c.final_dropout,
            "layer_norm_eps": 1e-5, "pad_token_id": 0, "ctc_loss_reduction": "mean", "ctc_zero_infinity": True,
            "apply_spec_augment": False, "dtype": "float32"}


def preprocessor_json(features, model=None) -> dict:
    normalize = bool(features.waveform_normalize or (model is not None and model.cfg.normalize_waveform))
    return {"feature_extractor_type": "Wav2Vec2FeatureExtractor", "processor_class": "Wav2Vec2Processor",
            "feature_size": 1, "sampling_rate": features.sample_rate_hz, "padding_value": 0.0,
            "padding_side": "right", "do_normalize": normalize, "return_attention_mask": model is not None
            and model.cfg.extractor_mode == "layer_norm"}


def generation_json(model) -> None:
    return None


def tokenizer_files(tokenizer, data: bytes | None = None) -> dict[str, bytes]:
    """vocab.json in our order and the tokenizer_config.json transformers' Wav2Vec2CTCTokenizer reads."""
    import json

    vocab = getattr(tokenizer, "vocab_json", None)
    if vocab is None:
        raise ConfigError("export --format hf: transformers' Wav2Vec2CTCTokenizer needs a character vocabulary; "
                          f"text.tokenizer={tokenizer.kind} cannot be written as one (use char or ctc_vocab)")
    vocab_tokens = json.loads(vocab())
    pad = next(t for t, i in vocab_tokens.items() if i == 0)
    config = {"tokenizer_class": "Wav2Vec2CTCTokenizer", "pad_token": pad, "word_delimiter_token": "|",
              "do_lower_case": False, "bos_token": None, "eos_token": None,
              "unk_token": next((t for t in ("<unk>", "[UNK]") if t in vocab_tokens), pad)}
    return {"vocab.json": vocab(), "tokenizer_config.json": (json.dumps(config, indent=2) + "\n").encode()}
