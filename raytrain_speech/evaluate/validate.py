"""Validation during training: loss and greedy WER on a held-out split, sharded over ranks (no Ray).

The split is small (a dev set), so each rank decodes it once into memory and keeps its slice
(every world_size-th utterance); each validation returns summable counts that the loop all-reduces,
so the numbers are corpus-level over the whole split whatever the worker count.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from raytrain_speech.batch import Batch
from raytrain_speech.config import BatchingConfig
from raytrain_speech.data import corpus
from raytrain_speech.data.batching import Utterance, batch_by_duration, collate
from raytrain_speech.data.preprocess import Preprocessor, iter_table, limits_for, to_utterances
from raytrain_speech.evaluate.decode import hypotheses
from raytrain_speech.evaluate.wer import error_counts
from raytrain_speech.models.masking import model_span_mask
from raytrain_speech.models.registry import family, objective_for


class Validator:
    def __init__(self, cfg, split: str, rank: int, world: int, batch_audio_s: float = 200.0):
        self.cfg, self.split, self.rank, self.world = cfg, split, rank, world
        self.batch_audio_s = batch_audio_s
        self.pre = Preprocessor(cfg.features, cfg.text, storage_cfg=cfg.storage, limits=limits_for(cfg))
        self.objective = objective_for(cfg.model)
        self.text_output = family(cfg.model).text_output
        self._utts: list[Utterance] | None = None

    def utterances(self) -> list[Utterance]:
        if self._utts is None:
            utts = []
            for uri in corpus.shard_uris(self.cfg.data.root, self.split, self.cfg.storage):
                for batch in iter_table(corpus.read_shard(uri, self.cfg.storage), self.pre):
                    utts.extend(to_utterances(batch)[0])
            utts.sort(key=lambda u: u.index)
            self._utts = utts[self.rank:: self.world]
        return self._utts

    @torch.inference_mode()
    def counts(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """Summed loss, units and (text families) edit counts of this rank's slice."""
        was_training = model.training
        model.eval()
        totals = {"loss_sum": 0.0, "tokens": 0.0, "word_errors": 0.0, "ref_words": 0.0, "char_errors": 0.0,
                  "ref_chars": 0.0}
        for group in batch_by_duration(self.utterances(), self.batch_audio_s, BatchingConfig()):
            b = with_fixed_ssl_mask(model, collate(group)).to(device)
            out = model(b)
            summed, units, _ = self.objective.loss(b, out)
            totals["loss_sum"] += float(summed)
            totals["tokens"] += units
            if self.text_output is None:
                continue
            hyps = [self.pre.tokenizer.decode(ids) for ids in hypotheses(model, b, out, self.text_output)]
            for k, v in error_counts(b.texts, hyps, cfg_normalizer(self.cfg)).items():
                totals[k] += v
        model.train(was_training)
        return totals


def source_validators(cfg, rank: int, world: int) -> list[tuple[str, Validator]]:
    """(metric prefix ``source.<name>.``, Validator) for each mixture source with a ``valid_split``:
    its own held-out split, read with its own storage settings."""
    out = []
    for src in cfg.data.sources:
        if src.valid_split:
            own = replace(cfg, data=replace(cfg.data, root=src.root), storage=src.storage or cfg.storage)
            out.append((f"source.{src.name}.", Validator(own, src.valid_split, rank, world)))
    return out


def cfg_normalizer(cfg) -> str:
    """The scoring normaliser (eval.normalizer) applied to both sides of validation WER."""
    return cfg.eval.normalizer


def with_fixed_ssl_mask(model: nn.Module, batch: Batch) -> Batch:
    """Masked-prediction families are validated under the same masks every time (seed 0, epoch 0), so
    valid_loss moves only with the model."""
    if model.span_masking is None:
        return batch
    return replace(batch, mask_BT=model_span_mask(model, batch))


def summarize(totals: dict[str, float]) -> dict[str, float]:
    out = {"valid_loss": totals["loss_sum"] / max(totals["tokens"], 1.0)}
    if totals["ref_words"] > 0:  # self-supervised families have no transcripts to score
        out["valid_wer"] = totals["word_errors"] / totals["ref_words"]
        out["valid_cer"] = totals["char_errors"] / max(totals["ref_chars"], 1.0)
    return out
