"""WER and CER with jiwer, after the same text normalisation training uses."""

from __future__ import annotations

import jiwer

from raytrain_speech.data.text import normalize_text


def error_rates(references: list[str], hypotheses: list[str]) -> dict[str, float]:
    """Corpus-level WER and CER (errors summed over utterances, divided by reference length).

    An empty hypothesis is scored as all deletions (jiwer rejects empty strings, so we count them).
    """
    refs = [normalize_text(r) for r in references]
    hyps = [normalize_text(h) for h in hypotheses]
    if not refs:
        return {"wer": float("nan"), "cer": float("nan"), "utterances": 0}
    words = jiwer.process_words(refs, [h if h else "\u2205" for h in hyps])
    chars = jiwer.process_characters(refs, [h if h else "\u2205" for h in hyps])
    return {"wer": words.wer, "cer": chars.cer, "utterances": len(refs)}


def error_counts(references: list[str], hypotheses: list[str]) -> dict[str, float]:
    """Summable edit counts (so ranks can all-reduce them into one corpus-level WER/CER)."""
    if not references:
        return {"word_errors": 0.0, "ref_words": 0.0, "char_errors": 0.0, "ref_chars": 0.0}
    refs = [normalize_text(r) for r in references]
    hyps = [normalize_text(h) or "\u2205" for h in hypotheses]
    w = jiwer.process_words(refs, hyps)
    c = jiwer.process_characters(refs, hyps)
    return {
        "word_errors": float(w.substitutions + w.deletions + w.insertions),
        "ref_words": float(w.substitutions + w.deletions + w.hits),
        "char_errors": float(c.substitutions + c.deletions + c.insertions),
        "ref_chars": float(c.substitutions + c.deletions + c.hits),
    }
