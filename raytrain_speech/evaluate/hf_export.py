"""``raytrain-speech export --format hf``: a run's model as a directory ``transformers`` loads with
``from_pretrained`` (config.json, model.safetensors, tokenizer and feature-extractor files), so an
inference stack built on ``transformers`` serves what was trained here (no Ray; ``transformers``
is not needed to write it)."""

from __future__ import annotations

import json

from raytrain_speech import storage
from raytrain_speech.config import ConfigError, StorageConfig
from raytrain_speech.data.text import TOKENIZER_FILES
from raytrain_speech.data.tokenizer import tokenizer_file_in
from raytrain_speech.evaluate.loading import load_model
from raytrain_speech.hf import directory as hfdir
from raytrain_speech.hf import wav2vec2 as hf_wav2vec2
from raytrain_speech.hf import wavlm as hf_wavlm
from raytrain_speech.hf import whisper as hf_whisper

EXPORTERS = {"whisper": hf_whisper, "wav2vec2_ctc": hf_wav2vec2, "nar_ctc": hf_wav2vec2,
             "wavlm_waveform_ctc": hf_wavlm}
"""Our family -> the map module that writes its transformers layout."""


def _json(data: dict) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def export_hf(checkpoint: str, out: str, storage_cfg: StorageConfig | None = None, overrides=(),
              log=print) -> dict:
    """Write the checkpoint's model (the weights eval decodes with: EMA when the run kept one and
    eval.use_ema) to ``out`` in transformers' layout; a summary of what was written."""
    loaded = load_model(checkpoint, storage_cfg, overrides, need_text=False)
    cfg = loaded.cfg
    module = EXPORTERS.get(cfg.model.family)
    if module is None:
        raise ConfigError(f"export --format hf: no transformers layout for model family {cfg.model.family} "
                          f"(exported: {', '.join(EXPORTERS)}); the default export (model.pt) works for every family")
    model = loaded.model
    config = module.config_json(model)
    files = {hfdir.PREPROCESSOR: _json(module.preprocessor_json(cfg.features, model))}
    generation = module.generation_json(model)
    if generation is not None:
        files[hfdir.GENERATION] = _json(generation)
    data = None
    if cfg.text.tokenizer in TOKENIZER_FILES:
        data = tokenizer_file_in(hfdir.path_of(loaded.uri), cfg.text, storage_cfg)
    files.update(module.tokenizer_files(loaded.pre.tokenizer, data))
    state = module.export_state(model)
    hfdir.write_directory(out, config, state, files, storage_cfg)
    summary = {"checkpoint": loaded.uri, "out": out, "step": loaded.step, "weights": loaded.weights,
               "architecture": config["architectures"][0], "tensors": len(state),
               "parameters": sum(v.numel() for v in state.values()), "files": sorted([*files, hfdir.CONFIG,
                                                                                        hfdir.SAFETENSORS])}
    decoder = getattr(model, "decoder", None) if cfg.model.family == "nar_ctc" else None
    if decoder is not None:
        summary["left_out"] = {"refinement_decoder_parameters": sum(p.numel() for p in decoder.parameters())}
        if log:
            log(f"left out nar_ctc's refinement decoder ({summary['left_out']['refinement_decoder_parameters']:,} "
                "parameters): Wav2Vec2ForCTC has none, so the export decodes as CTC")
    storage.write_bytes(storage.join(out, "export.json"), _json(summary), storage_cfg)
    if log:
        log(f"wrote {out}: {summary['architecture']} ({summary['parameters']:,} parameters, step {loaded.step}, "
            f"{loaded.weights} weights); load it with transformers' from_pretrained")
    return summary
