"""Evaluate a checkpoint on one or more test sets: read shards, same front end as training, decode, score.

Two ways to run the same decoder (``BatchDecoder``, a callable on a column batch of shard rows):

* in this process (``eval.actors: 0``, the default): a tiny model on a few hundred test utterances is
  faster to score here than to schedule;
* as Ray Data ``map_batches`` over the test shards with a pool of ``eval.actors`` model actors
  (``eval.actor_gpus`` each), for full-size models and test sets (evaluate/ray_decode.py).

The checkpoint carries its resolved config, so evaluation needs nothing but the checkpoint URI (or an
exported artifact, evaluate/quantize.py) and, optionally, other splits or another corpus root. Scores
are reported per test set and per language (the shards' ``language`` column) as JSON and Markdown.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from raytrain_speech.config import BatchingConfig, ConfigError, StorageConfig, to_dict
from raytrain_speech.data import corpus
from raytrain_speech.data.batching import batch_by_duration, collate
from raytrain_speech.data.preprocess import input_columns, to_utterances
from raytrain_speech.data.vocab import transcripts
from raytrain_speech.evaluate.decode import Search, hypotheses
from raytrain_speech.evaluate.lm import NGramLM
from raytrain_speech.evaluate.loading import LoadedModel, load_model
from raytrain_speech.evaluate.wer import error_rates

NO_LANGUAGE = "-"
"""Row label in the per-language table for utterances whose shard has no language."""


def train_transcripts(cfg, split: str | None = None) -> list[str]:
    """The transcripts of a split under the target normaliser (only the text column is read)."""
    return list(transcripts(cfg.data.root, split or cfg.data.train_split, cfg.storage, cfg.text.normalizer))


def build_lm(cfg, tokenizer, log=print) -> NGramLM | None:
    """The fusion LM, trained here on the train split (a few seconds for 10k sentences); None without fusion."""
    if cfg.eval.lm_weight <= 0:
        return None
    if tokenizer.symbols is None:
        raise ConfigError(f"eval.lm_weight: shallow fusion scores character units, and text.tokenizer="
                          f"{tokenizer.kind} emits subwords; use eval.lm_weight=0 (beam search still works)")
    start = time.time()
    texts = train_transcripts(cfg)
    lm = NGramLM.train(texts, cfg.eval.lm, units=tokenizer.symbols[1:])
    log(f"[eval] {cfg.eval.lm.resolved_order}-gram {cfg.eval.lm.unit} LM on {len(texts)} training transcripts "
        f"in {time.time() - start:.1f} s")
    return lm


def build_search(cfg, tokenizer, log=print, lm: NGramLM | None = None) -> Search:
    """Greedy, or beam search with shallow fusion of ``lm`` (trained from the train split when not given)."""
    if lm is None:
        lm = build_lm(cfg, tokenizer, log)
    return Search.from_eval(cfg.eval, lm, tokenizer)


class BatchDecoder:
    """Shard rows (a column batch: index, id, audio, duration_s, text, language) -> one output row per
    input row: id, language, reference, hypothesis, and the skip reason of rows that could not be read.

    The same class decodes in-process and as a Ray Data actor (built from the checkpoint URI there,
    with the driver's LM passed as JSON so every actor fuses the same LM without re-reading the corpus).
    """

    def __init__(self, checkpoint: str = "", storage_cfg: StorageConfig | None = None, overrides=(),
                 lm_json: str | None = None, gpus: float = 0.0, threads: int = 0,
                 loaded: LoadedModel | None = None, search: Search | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.loaded = loaded or load_model(checkpoint, storage_cfg, overrides)
        self.device = torch.device("cuda" if gpus > 0 and torch.cuda.is_available() else "cpu")
        self.loaded.model.to(self.device)
        cfg = self.loaded.cfg
        lm = NGramLM.from_json(lm_json) if lm_json else None
        self.search = search or Search.from_eval(cfg.eval, lm, self.loaded.pre.tokenizer)

    def __call__(self, batch: dict) -> dict:
        loaded, cfg = self.loaded, self.loaded.cfg
        prepared = loaded.pre(batch)
        good, bad = to_utterances(prepared)
        out = {"id": [], "index": [], "language": [], "ref": [], "hyp": [], "duration_s": [], "error": []}

        def emit(index, utt_id, language, ref, hyp, duration_s, error):
            for key, v in zip(out, (utt_id, index, language, ref, hyp, duration_s, error)):
                out[key].append(v)

        languages = dict(zip((int(i) for i in prepared["index"]), prepared["language"]))
        for index, utt_id, reason in bad:
            emit(index, utt_id, languages.get(index, ""), "", "", 0.0, reason)
        with torch.inference_mode():
            for group in batch_by_duration(good, cfg.eval.batch_audio_s, BatchingConfig()):
                b = collate(group).to(self.device)
                # Encoder-decoder models search from their own encoder pass; a teacher-forced forward
                # would only be thrown away, so they need just the encoder lengths (the length cap).
                res = (loaded.model(b) if loaded.text_output == "ctc"
                       else {"lengths_B": loaded.model.output_lengths(b.feature_lengths_B)})
                for u, ids in zip(group, hypotheses(loaded.model, b, res, loaded.text_output, search=self.search)):
                    emit(u.index, u.id, u.language, u.text, loaded.pre.tokenizer.decode(ids), u.duration_s, "")
        return {k: np.asarray(v, dtype=object if k not in ("index", "duration_s") else None)
                for k, v in out.items()}


def score_rows(rows: list[dict], split: str, log=print, normalizer: str = "basic") -> dict:
    """WER/CER of one test set, overall and per language, from decoder output rows; reference and
    hypothesis both under ``normalizer`` (eval.normalizer)."""
    bad = [r for r in rows if r["error"]]
    good = sorted((r for r in rows if not r["error"]), key=lambda r: r["id"])
    for r in bad[:5]:
        log(f"[eval] {split}: skipped {r['id']}: {r['error']}")
    if len(bad) > 5:
        log(f"[eval] {split}: ... and {len(bad) - 5} more skipped (all listed in the JSON output)")
    by_language = {}
    for lang in sorted({r["language"] or NO_LANGUAGE for r in good}):
        part = [r for r in good if (r["language"] or NO_LANGUAGE) == lang]
        by_language[lang] = {**error_rates([r["ref"] for r in part], [r["hyp"] for r in part], normalizer),
                             "audio_s": float(sum(r["duration_s"] for r in part))}
    return {
        **error_rates([r["ref"] for r in good], [r["hyp"] for r in good], normalizer), "split": split,
        "by_language": by_language, "audio_s": float(sum(r["duration_s"] for r in good)),
        "bad_utterances": len(bad), "skipped": [{"id": r["id"], "reason": r["error"]} for r in bad],
        "examples": [{"id": r["id"], "language": r["language"], "ref": r["ref"], "hyp": r["hyp"]} for r in good[:5]],
    }


def rows_in_process(decoder: BatchDecoder, cfg, split: str) -> list[dict]:
    rows = []
    for uri in corpus.shard_uris(cfg.data.root, split, cfg.storage):
        table = corpus.read_shard(uri, cfg.storage)
        table = table.select(input_columns(table.column_names))
        # Whole slices of up to 1024 rows, not the file's row groups: padding-sensitive models (the
        # Conformer's convolutions see padded frames) then batch a shard the same way however it was written.
        for offset in range(0, len(table), 1024):
            res = decoder(table.slice(offset, 1024).to_pydict())
            rows += [dict(zip(res, vals)) for vals in zip(*res.values())]
    return rows


def evaluate_checkpoint(checkpoint: str, storage_cfg: StorageConfig | None = None,
                        split: str | list[str] | None = None, data_root: str | None = None, log=print,
                        overrides: list[str] = ()) -> dict:
    """Decode each test set with the checkpoint's model (greedy, or beam + LM per ``eval.*``), in-process
    or on Ray Data actors (``eval.actors``); WER/CER per test set and language, plus example transcripts.

    The top-level ``wer``/``cer``/``utterances``/``split``/``examples`` are the first test set's (what
    scripts and the demo read); ``sets`` has every test set. ``overrides`` (``eval.beam_width=5`` ...)
    apply to the checkpoint's config.
    """
    loaded = load_model(checkpoint, storage_cfg, overrides)
    cfg = loaded.cfg
    splits = [split] if isinstance(split, str) else list(split or [cfg.eval.split])
    cfg.data.root = data_root or cfg.data.root
    if cfg.eval.threads:
        torch.set_num_threads(cfg.eval.threads)
    lm = build_lm(cfg, loaded.pre.tokenizer, log)
    sets = []
    for name in splits:
        start = time.time()
        if cfg.eval.actors:
            from raytrain_speech.evaluate.ray_decode import decode_rows

            kwargs = {"checkpoint": loaded.uri, "storage_cfg": cfg.storage, "overrides": list(overrides),
                      "lm_json": lm.to_json() if lm is not None else None, "gpus": cfg.eval.actor_gpus,
                      "threads": max(1, int(np.ceil(cfg.eval.actor_cpus)))}
            rows = decode_rows(cfg, name, BatchDecoder, kwargs)
        else:
            decoder = BatchDecoder(loaded=loaded, search=build_search(cfg, loaded.pre.tokenizer, log, lm=lm))
            rows = rows_in_process(decoder, cfg, name)
        res = score_rows(rows, name, log, cfg.eval.normalizer)
        res["eval_wall_s"] = time.time() - start
        sets.append(res)
    first = sets[0]
    return {
        "wer": first["wer"], "cer": first["cer"], "utterances": first["utterances"], "split": first["split"],
        "bad_utterances": first["bad_utterances"], "audio_s": first["audio_s"], "eval_wall_s": first["eval_wall_s"],
        "examples": first["examples"], "sets": sets,
        "data_root": cfg.data.root, "checkpoint": loaded.uri, "step": loaded.step, "weights": loaded.weights,
        "decoding": {"beam_width": cfg.eval.beam_width, "lm_weight": cfg.eval.lm_weight,
                     "length_bonus": cfg.eval.length_bonus, "lm": to_dict(cfg.eval.lm),
                     "where": f"{cfg.eval.actors} Ray Data actors" if cfg.eval.actors else "in-process"},
        "normalisation": f"eval.normalizer={cfg.eval.normalizer} on reference and hypothesis (docs/text.md); "
                         f"targets trained with text.normalizer={cfg.text.normalizer}",
    }


def results_markdown(res: dict) -> str:
    """The per-test-set, per-language table of ``evaluate_checkpoint``'s result."""
    d = res["decoding"]
    how = "greedy" if d["beam_width"] == 1 and not d["lm_weight"] else (
        f"beam {d['beam_width']}" + (f" + {d['lm']['unit']} LM (weight {d['lm_weight']:g}, "
                                      f"length bonus {d['length_bonus']:g})" if d["lm_weight"] else ""))
    lines = [f"# Evaluation of `{res['checkpoint']}`", "",
             f"Step {res['step']}, {res['weights']} weights, {how}, decoded {d['where']}. "
             f"Text normalisation: {res['normalisation']}.", "",
             "| test set | language | utterances | audio (min) | WER | CER | skipped |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for s in res["sets"]:
        for lang, r in s["by_language"].items():
            lines.append(f"| {s['split']} | {lang} | {r['utterances']} | {r['audio_s'] / 60:.1f} | "
                         f"{100 * r['wer']:.2f}% | {100 * r['cer']:.2f}% | |")
        lines.append(f"| **{s['split']}** | **all** | {s['utterances']} | {s['audio_s'] / 60:.1f} | "
                     f"**{100 * s['wer']:.2f}%** | **{100 * s['cer']:.2f}%** | {s['bad_utterances']} |")
    return "\n".join(lines) + "\n"
