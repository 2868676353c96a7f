"""Decoding: CTC greedy and the dispatch to a family's own decoder (beam search with LM fusion arrives
with the decoding issue).

Shapes: B = batch, T = encoder frames, V = vocabulary.
"""

from __future__ import annotations

import torch

from raytrain_speech.data.text import BLANK_ID


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


def hypotheses(model: torch.nn.Module, batch, out: dict, text_output: str, max_len: int = 448) -> list[list[int]]:
    """Greedy token ids per row: best CTC path, or the attention decoder's greedy search."""
    if text_output == "ctc":
        return ctc_greedy(out["log_probs_BTV"], out["lengths_B"])
    if text_output == "seq2seq":
        # A transcript never has more characters than the encoder has frames (>= 25 per second; speech
        # is ~15 characters per second): the cap that stops an untrained decoder that never ends.
        return model.transcribe(batch, min(max_len, int(out["lengths_B"].max())))
    raise ValueError(f"no text output kind {text_output!r}")
