"""WavLM (the published waveform architecture, ``models/wavlm_waveform.py``) <-> transformers'
``WavLMForCTC`` / ``WavLMModel``: wav2vec 2.0's map (``hf/wav2vec2.py``) under ``wavlm.``, whose
attention tensors (``gru_rel_pos_const``, ``gru_rel_pos_linear``, the first layer's
``rel_attn_embed``) keep their names on our side too. transformers has no WavLM pretraining head."""

from __future__ import annotations

import torch

from raytrain_speech.hf import wav2vec2 as w2v
from raytrain_speech.hf.mapping import FamilyMap

MODEL_TYPE = "wavlm"
PREFIX = "wavlm."
check_values = w2v.check_values
features_from_preprocessor = w2v.features_from_preprocessor
generation_json = w2v.generation_json
tokenizer_files = w2v.tokenizer_files


def overrides_from_config(hf: dict, source: str) -> dict:
    out = w2v.overrides_from_config({**hf, "position_embeddings_type": None}, source)
    for key in ("codebook_groups", "codebook_entries", "codevector_dim", "final_dim", "num_negatives",
                "logit_temperature"):
        out.pop(key, None)  # no pretraining head here
    out.update(num_buckets=hf.get("num_buckets", 320), max_distance=hf.get("max_bucket_distance", 800))
    return out


def family_map(model, tokenizer=None) -> FamilyMap:
    return w2v.family_map(model, tokenizer, PREFIX)


def prepare_state(theirs: dict[str, torch.Tensor], tokenizer) -> dict[str, torch.Tensor]:
    return w2v.prepare_state(theirs, tokenizer, PREFIX)


def export_state(model) -> dict[str, torch.Tensor]:
    return w2v.export_state(model, PREFIX)


def config_json(model) -> dict:
    c = model.cfg
    return {**w2v.config_json(model, "WavLMForCTC", MODEL_TYPE), "num_buckets": c.num_buckets,
            "max_bucket_distance": c.max_distance}


def preprocessor_json(features, model=None) -> dict:
    return w2v.preprocessor_json(features, model)
