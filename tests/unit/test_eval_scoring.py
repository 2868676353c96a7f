"""Scoring decoder rows per language, skips listed by id, and the Markdown table."""

from raytrain_speech.evaluate.runner import NO_LANGUAGE, results_markdown, score_rows


def _row(i, lang, ref, hyp, error=""):
    return {"id": f"u{i}", "index": i, "language": lang, "ref": ref, "hyp": hyp, "duration_s": 2.0, "error": error}


def test_scores_per_language_and_lists_skips():
    rows = [_row(0, "en", "a b c d", "a b c d"), _row(1, "en", "e f", "e x"), _row(2, "es", "uno dos", ""),
            _row(3, "", "x y", "x y"), _row(4, "es", "", "", error="cannot decode audio: truncated")]
    logged = []
    res = score_rows(rows, "test", log=logged.append)
    assert res["utterances"] == 4 and res["bad_utterances"] == 1
    assert res["skipped"] == [{"id": "u4", "reason": "cannot decode audio: truncated"}]
    assert any("u4" in line for line in logged)
    by = res["by_language"]
    assert set(by) == {"en", "es", NO_LANGUAGE}
    assert by["en"]["wer"] == 1 / 6 and by["es"]["wer"] == 1.0 and by[NO_LANGUAGE]["wer"] == 0.0
    assert res["wer"] == 3 / 10  # corpus level: (0 + 1 + 2 + 0) errors over 10 reference words
    assert by["en"]["audio_s"] == 4.0


def test_markdown_has_a_row_per_language_and_a_total_per_test_set():
    sets = [score_rows([_row(0, "en", "a", "a"), _row(1, "es", "b", "c")], name, log=lambda s: None)
            for name in ("test", "dev")]
    res = {"checkpoint": "runs/x", "step": 3, "weights": "live", "sets": sets,
           "normalisation": "lower-case",
           "decoding": {"beam_width": 5, "lm_weight": 0.5, "length_bonus": 1.0, "lm": {"unit": "char"},
                        "where": "in-process"}}
    md = results_markdown(res)
    assert "beam 5 + char LM (weight 0.5" in md
    for name in ("test", "dev"):
        assert f"| {name} | en | 1 |" in md and f"| {name} | es | 1 |" in md
        assert f"| **{name}** | **all** | 2 |" in md
