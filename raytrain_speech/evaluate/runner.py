"""Evaluate a checkpoint on a split: read shards, same front end as training, decode, score.

Runs in-process with plain torch (no Ray): a tiny model on a few hundred test utterances is faster
to score here than to schedule. The checkpoint carries its resolved config, so evaluation needs
nothing but the checkpoint URI (and, optionally, a different corpus root or split).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import yaml

from raytrain_speech.configlib import ConfigError, require, to_dict
from raytrain_speech.data import shards
from raytrain_speech.data.batching import BatchingConfig, batch_by_duration, collate
from raytrain_speech.data.preprocess import Preprocessor, iter_table, to_utterances
from raytrain_speech.data.text import normalize_text
from raytrain_speech.evaluate.decode import Search, hypotheses
from raytrain_speech.evaluate.lm import NGramConfig, NGramLM
from raytrain_speech.evaluate.wer import error_rates
from raytrain_speech.models.registry import build_model, family
from raytrain_speech.storage import StorageConfig
from raytrain_speech.train.checkpoint import read_checkpoint


@dataclass
class EvalConfig:
    """What to score and how to batch it."""

    split: str = "test"
    """Split of data.root to score."""
    batch_audio_s: float = 300.0
    """Padded audio seconds per decoding batch."""
    threads: int = 0
    """torch threads for decoding; 0 = all cores."""
    use_ema: bool = True
    """Score the EMA weights when the checkpoint has them (step.ema_decay)."""
    beam_width: int = 1
    """1 = greedy; more = CTC prefix beam search / attention beam search (recipes: 5)."""
    lm_weight: float = 0.0
    """Shallow-fusion weight of the n-gram LM trained on the corpus's train-split transcripts (0 = no LM)."""
    length_bonus: float = 0.0
    """Score added per emitted character (offsets the LM's preference for short outputs)."""
    lm: NGramConfig = field(default_factory=NGramConfig)
    """The fusion LM: unit (char/word), order, smoothing."""

    def validate(self) -> None:
        require(self.batch_audio_s > 0, "eval.batch_audio_s", "must be positive")
        require(self.beam_width >= 1, "eval.beam_width", "must be >= 1")
        require(self.lm_weight >= 0, "eval.lm_weight", "must be >= 0")
        self.lm.validate()


def train_transcripts(cfg, split: str | None = None) -> list[str]:
    """The normalised transcripts of a split (only the text column is decoded)."""
    texts = []
    for uri in shards.shard_uris(cfg.data.root, split or cfg.data.train_split, cfg.storage):
        texts += [normalize_text(t) for t in shards.read_shard(uri, cfg.storage).column("text").to_pylist() if t]
    return texts


def build_search(cfg, tokenizer, log=print) -> Search:
    """Greedy, or beam search with an LM trained here on the train split (a few seconds for 10k sentences)."""
    lm = None
    if cfg.eval.lm_weight > 0:
        start = time.time()
        texts = train_transcripts(cfg)
        lm = NGramLM.train(texts, cfg.eval.lm, units=tokenizer.symbols[1:])
        log(f"[eval] {cfg.eval.lm.resolved_order}-gram {cfg.eval.lm.unit} LM on {len(texts)} training transcripts "
            f"in {time.time() - start:.1f} s")
    return Search(cfg.eval.beam_width, lm, cfg.eval.lm_weight, cfg.eval.length_bonus, tokenizer)


def evaluate_checkpoint(checkpoint: str, storage_cfg: StorageConfig | None = None, split: str | None = None,
                        data_root: str | None = None, log=print, overrides: list[str] = ()) -> dict:
    """Decode ``split`` with the checkpoint's model (greedy, or beam + LM per ``eval.*``); WER/CER plus a
    few example transcripts. ``overrides`` (``eval.beam_width=5`` ...) apply to the checkpoint's config."""
    from raytrain_speech.config import Config, apply_overrides

    payload, config_yaml = read_checkpoint(checkpoint, storage_cfg)
    cfg = Config.from_dict(apply_overrides(yaml.safe_load(config_yaml), list(overrides)))
    if storage_cfg is not None:
        cfg.storage = storage_cfg
    split = split or cfg.eval.split
    root = cfg.data.root = data_root or cfg.data.root
    if cfg.eval.threads:
        torch.set_num_threads(cfg.eval.threads)
    pre = Preprocessor(cfg.features, cfg.text)
    text_output = family(cfg.model).text_output
    if text_output is None:
        raise ConfigError(f"{checkpoint}: model family {cfg.model.family} is self-supervised and has no text "
                          "output to score; fine-tune it first (train.init_from) and evaluate that run")
    model = build_model(cfg.model, pre.tokenizer.vocab_size)
    weights = payload["model"]
    if cfg.eval.use_ema and payload.get("ema"):
        weights = {**weights, **{k: v.to(weights[k].dtype) for k, v in payload["ema"].items()}}
    model.load_state_dict(weights)
    model.eval()

    search = build_search(cfg, pre.tokenizer, log)
    start = time.time()
    utts, bad = [], []
    for uri in shards.shard_uris(root, split, cfg.storage):
        for batch in iter_table(shards.read_shard(uri, cfg.storage), pre):
            good, rejected = to_utterances(batch)
            utts.extend(good)
            bad.extend(rejected)
    for _, utt_id, reason in bad[:5]:
        log(f"[eval] skipped {utt_id}: {reason}")
    refs, hyps, ids = [], [], []
    with torch.inference_mode():
        for group in batch_by_duration(utts, cfg.eval.batch_audio_s, BatchingConfig()):
            b = collate(group)
            # Encoder-decoder models search from their own encoder pass; the teacher-forced forward would
            # only be thrown away, so they need nothing here but the encoder lengths (the length cap).
            out = model(b) if text_output == "ctc" else {"lengths_B": model.output_lengths(b.feature_lengths_B)}
            hyps += [pre.tokenizer.decode(t) for t in hypotheses(model, b, out, text_output, search=search)]
            refs += b.texts
            ids += b.ids
    scores = error_rates(refs, hyps)
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    return {
        **scores, "split": split, "data_root": root, "checkpoint": checkpoint, "step": payload["train_state"]["step"],
        "weights": "ema" if cfg.eval.use_ema and payload.get("ema") else "live",
        "decoding": {"beam_width": cfg.eval.beam_width, "lm_weight": cfg.eval.lm_weight,
                     "length_bonus": cfg.eval.length_bonus, "lm": to_dict(cfg.eval.lm)},
        "bad_utterances": len(bad), "audio_s": sum(u.duration_s for u in utts), "eval_wall_s": time.time() - start,
        "examples": [{"id": ids[i], "ref": refs[i], "hyp": hyps[i]} for i in order[:5]],
    }
