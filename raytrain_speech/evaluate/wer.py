"""WER and CER with jiwer, after the scoring normaliser (``eval.normalizer``) on both sides."""

from __future__ import annotations

import jiwer

from raytrain_speech.data.normalize import normalize

EMPTY = "\u2205"
"""Stands in for an empty hypothesis (jiwer rejects empty strings): scored as all deletions."""


def _pairs(references: list[str], hypotheses: list[str], normalizer: str) -> tuple[list[str], list[str], int]:
    """Normalised (refs, hyps) without the pairs whose reference normalises to nothing (counted)."""
    refs, hyps, empty = [], [], 0
    for r, h in zip(references, hypotheses):
        r = normalize(r, normalizer)
        if not r:
            empty += 1
            continue
        refs.append(r)
        hyps.append(normalize(h, normalizer) or EMPTY)
    return refs, hyps, empty


def error_rates(references: list[str], hypotheses: list[str], normalizer: str = "basic") -> dict[str, float]:
    """Corpus-level WER and CER (errors summed over utterances, divided by reference length).
    References with no words under ``normalizer`` cannot be scored and are counted in
    ``empty_references``."""
    refs, hyps, empty = _pairs(references, hypotheses, normalizer)
    if not refs:
        return {"wer": float("nan"), "cer": float("nan"), "utterances": 0, "empty_references": empty}
    words = jiwer.process_words(refs, hyps)
    chars = jiwer.process_characters(refs, hyps)
    return {"wer": words.wer, "cer": chars.cer, "utterances": len(refs), "empty_references": empty}


def error_counts(references: list[str], hypotheses: list[str], normalizer: str = "basic") -> dict[str, float]:
    """Summable edit counts (so ranks can all-reduce them into one corpus-level WER/CER)."""
    refs, hyps, _ = _pairs(references, hypotheses, normalizer)
    if not refs:
        return {"word_errors": 0.0, "ref_words": 0.0, "char_errors": 0.0, "ref_chars": 0.0}
    w = jiwer.process_words(refs, hyps)
    c = jiwer.process_characters(refs, hyps)
    return {
        "word_errors": float(w.substitutions + w.deletions + w.insertions),
        "ref_words": float(w.substitutions + w.deletions + w.hits),
        "char_errors": float(c.substitutions + c.deletions + c.insertions),
        "ref_chars": float(c.substitutions + c.deletions + c.hits),
    }
