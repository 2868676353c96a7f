"""Decoding: CTC greedy, and the dispatch to beam search with shallow LM fusion (evaluate/beam.py), to
Mask-CTC refinement of the greedy hypothesis (models/mask_ctc.py), or to a family's own decoder.

Shapes: B = batch, T = encoder frames, V = vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raytrain_speech.batch import BLANK_ID
from raytrain_speech.config import ConfigError
from raytrain_speech.data.text import Tokenizer
from raytrain_speech.evaluate.beam import attention_beam_search, ctc_beam_batch
from raytrain_speech.evaluate.lm import NGramLM


def ctc_greedy(log_probs_BTV: torch.Tensor, lengths_B: torch.Tensor) -> list[list[int]]:
    """Best path: argmax per frame, merge repeats, drop blanks."""
    best_BT = log_probs_BTV.argmax(dim=-1).cpu()
    out = []
    for row, n in zip(best_BT.tolist(), lengths_B.cpu().tolist()):
        ids, prev = [], None
        for tok in row[:n]:
            if tok != prev and tok != BLANK_ID:
                ids.append(tok)
            prev = tok
        out.append(ids)
    return out


@dataclass
class Search:
    """How to turn model outputs into text: greedy (beam_width 1, no LM) or beam search with fusion."""

    beam_width: int = 1
    lm: NGramLM | None = None
    lm_weight: float = 0.0
    length_bonus: float = 0.0
    tokenizer: Tokenizer | None = None
    refine_iterations: int = 0
    """Mask-CTC refinement passes over the greedy CTC hypothesis (0 = none; models with a refine decoder)."""
    refine_threshold: float = 0.999
    """CTC token confidence below which refinement masks and re-predicts a token."""

    @classmethod
    def from_eval(cls, eval_cfg, lm: NGramLM | None, tokenizer: Tokenizer | None) -> Search:
        """The search an ``eval`` config section asks for, with its fusion LM."""
        return cls(eval_cfg.beam_width, lm, eval_cfg.lm_weight, eval_cfg.length_bonus, tokenizer,
                   eval_cfg.refine_iterations, eval_cfg.refine_threshold)

    @property
    def greedy(self) -> bool:
        return self.beam_width == 1 and (self.lm is None or self.lm_weight == 0.0) and self.length_bonus == 0.0


def hypotheses(model: torch.nn.Module, batch, out: dict, text_output: str, max_len: int = 448,
               search: Search | None = None) -> list[list[int]]:
    """Token ids per row: best CTC path / prefix beam search, or the attention decoder's greedy / beam search."""
    search = search or Search()
    if text_output == "ctc":
        if search.refine_iterations:
            refine = getattr(model, "refine", None)
            if refine is None or getattr(model, "decoder", None) is None:
                raise ConfigError(f"eval.refine_iterations: {type(model).__name__} has no refinement decoder "
                                  "(nar_ctc with model.overrides.decoder_layers > 0 has one); set it to 0")
            if not search.greedy:
                raise ConfigError("eval.refine_iterations: refinement starts from the greedy CTC hypothesis; "
                                  "set eval.beam_width=1 eval.lm_weight=0 eval.length_bonus=0 (or refine_iterations=0)")
            return refine(out, search.refine_iterations, search.refine_threshold)
        if search.greedy:
            return ctc_greedy(out["log_probs_BTV"], out["lengths_B"])
        return ctc_beam_batch(out["log_probs_BTV"], out["lengths_B"], search.beam_width, search.lm, search.lm_weight,
                              search.length_bonus, search.tokenizer)
    if text_output == "seq2seq":
        # A transcript never has more characters than the encoder has frames (>= 25 per second; speech
        # is ~15 characters per second): the cap that stops an untrained decoder that never ends.
        max_len = min(max_len, int(out["lengths_B"].max()))
        if search.greedy:
            return model.transcribe(batch, max_len)
        inputs = model.decoding_inputs(batch)
        inputs["max_len"] = min(inputs["max_len"], max_len)
        symbols = search.tokenizer.symbols if search.tokenizer is not None else None
        nbest = attention_beam_search(model.decoder, **inputs, beam_width=search.beam_width, lm=search.lm,
                                      lm_weight=search.lm_weight, length_bonus=search.length_bonus,
                                      id_to_unit=symbols)
        return [rows[0][0] if rows else [] for rows in nbest]
    raise ValueError(f"no text output kind {text_output!r}")
