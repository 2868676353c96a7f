"""Beam search for CTC and attention decoders, with optional shallow fusion of an n-gram LM.

Shapes: B = batch, T = encoder frames, V = vocabulary, S = memory frames, D = model width, P = prompt tokens.

Fused score of a hypothesis (natural logs):
    log P_model(y) + lm_weight * log P_lm(y) + length_bonus * |y|
where |y| counts emitted characters. A character LM scores every emitted character (space included);
a word LM scores a word when a space completes it, and the last word at the end. Both add
``</s>`` at the end, so a hypothesis that stops mid-sentence pays for it. Without a length bonus, the
LM's per-unit cost favours short outputs (deletions); a positive bonus offsets that.

Pure Python over ``tolist()`` rows for CTC (prefix bookkeeping is dict work, not tensor work); the
attention search batches the live beams of one utterance through the decoder.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence

import torch

from raytrain_speech.batch import BLANK_ID
from raytrain_speech.data.text import CharTokenizer, Tokenizer
from raytrain_speech.evaluate.lm import EOS, NGramLM

NEG_INF = -math.inf
_STEP_CACHE_MAX = 200_000


def _logaddexp(a: float, b: float) -> float:
    if a < b:
        a, b = b, a
    if b == NEG_INF:
        return a
    return a + math.log1p(math.exp(b - a))


class LMFusion:
    """Incremental, weighted LM score of emitted token ids; a state is (LM context, unfinished word).

    Token ids without a unit (``None`` in ``id_to_unit``, or out of its range: prompts, specials)
    leave the state unchanged and score 0.
    """

    def __init__(self, lm: NGramLM, id_to_unit: Sequence[str | None] | Mapping[int, str | None], weight: float):
        self.lm = lm
        self.weight = weight
        self.words = lm.cfg.unit == "word"
        self.id_to_unit = dict(id_to_unit) if isinstance(id_to_unit, Mapping) else dict(enumerate(id_to_unit))
        self._cache: dict[tuple, tuple[float, tuple]] = {}

    def start(self) -> tuple[tuple[str, ...], str]:
        return (self.lm.begin(), "")

    def step(self, state: tuple[tuple[str, ...], str], token: int) -> tuple[float, tuple[tuple[str, ...], str]]:
        """(weighted LM log-prob added by emitting ``token``, the next state)."""
        key = (state, token)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        unit = self.id_to_unit.get(token)
        ctx, word = state
        delta = 0.0
        if unit is None:
            out = state
        elif not self.words:
            delta = self.weight * self.lm.logprob(ctx, unit)
            out = (self.lm.extend(ctx, unit), "")
        elif unit == " ":
            if word:  # a space after letters completes a word; leading/double spaces add nothing
                delta = self.weight * self.lm.logprob(ctx, word)
                ctx = self.lm.extend(ctx, word)
            out = (ctx, "")
        else:
            out = (ctx, word + unit)
        if len(self._cache) >= _STEP_CACHE_MAX:
            self._cache.clear()
        self._cache[key] = (delta, out)
        return delta, out

    def end(self, state: tuple[tuple[str, ...], str]) -> float:
        """Weighted log-prob of ending here: the unfinished word (word LM), then ``</s>``."""
        ctx, word = state
        total = 0.0
        if word:
            total += self.lm.logprob(ctx, word)
            ctx = self.lm.extend(ctx, word)
        return self.weight * (total + self.lm.logprob(ctx, EOS))


def _ctc_fusion(lm: NGramLM | None, lm_weight: float, tokenizer: Tokenizer | None) -> LMFusion | None:
    if lm is None or lm_weight == 0.0:
        return None
    symbols = (tokenizer or CharTokenizer()).symbols
    return LMFusion(lm, [None if i == BLANK_ID else s for i, s in enumerate(symbols)], lm_weight)


def _rows(log_probs_TV) -> list[list[float]]:
    if isinstance(log_probs_TV, torch.Tensor):
        return log_probs_TV.detach().float().cpu().tolist()
    if hasattr(log_probs_TV, "tolist"):  # numpy
        return log_probs_TV.astype("float64").tolist()
    return [list(map(float, row)) for row in log_probs_TV]


def _frame_candidates(row: list[float], token_min_logp: float, token_top_k: int | None) -> list[tuple[int, float]]:
    """Per-frame token pruning: tokens at or above ``token_min_logp``, the frame's best always, at most top-k."""
    cands = [(v, lp) for v, lp in enumerate(row) if lp >= token_min_logp]
    if not cands:
        best = max(range(len(row)), key=row.__getitem__)
        cands = [(best, row[best])]
    if token_top_k is not None and len(cands) > token_top_k:
        cands = heapq.nlargest(token_top_k, cands, key=lambda c: c[1])
    return cands


def _ctc_search(rows: list[list[float]], beam_width: int, fusion: LMFusion | None, length_bonus: float,
                token_min_logp: float, token_top_k: int | None, nbest: int) -> list[tuple[list[int], float]]:
    # Per prefix: [log P(prefix, path ends in blank), log P(prefix, path ends in its last char)].
    beams: dict[tuple[int, ...], list[float]] = {(): [0.0, NEG_INF]}
    # Per prefix: (LM state, lm_weight * LM score + length_bonus * length); a function of the prefix alone.
    extra: dict[tuple[int, ...], tuple[tuple | None, float]] = {(): (fusion.start() if fusion else None, 0.0)}
    for row in rows:
        cands = _frame_candidates(row, token_min_logp, token_top_k)
        nxt: dict[tuple[int, ...], list[float]] = {}
        for prefix, (p_b, p_nb) in beams.items():
            p_all = _logaddexp(p_b, p_nb)
            last = prefix[-1] if prefix else None
            for v, lp in cands:
                if v == BLANK_ID:
                    cell = nxt.setdefault(prefix, [NEG_INF, NEG_INF])
                    cell[0] = _logaddexp(cell[0], p_all + lp)
                    continue
                new = prefix + (v,)
                cell = nxt.setdefault(new, [NEG_INF, NEG_INF])
                if v == last:  # a repeat only extends the prefix across a blank; otherwise it merges
                    cell[1] = _logaddexp(cell[1], p_b + lp)
                    same = nxt.setdefault(prefix, [NEG_INF, NEG_INF])
                    same[1] = _logaddexp(same[1], p_nb + lp)
                else:
                    cell[1] = _logaddexp(cell[1], p_all + lp)
                if new not in extra:
                    state, bonus = extra[prefix]
                    delta = 0.0
                    if fusion is not None:
                        delta, state = fusion.step(state, v)
                    extra[new] = (state, bonus + delta + length_bonus)
        scored = ((_logaddexp(*cell) + extra[p][1], p) for p, cell in nxt.items())
        kept = heapq.nlargest(beam_width, scored, key=lambda s: s[0])
        beams = {p: nxt[p] for _, p in kept}
        extra = {p: extra[p] for p in beams}
    final = []
    for prefix, cell in beams.items():
        state, bonus = extra[prefix]
        score = _logaddexp(*cell) + bonus + (fusion.end(state) if fusion is not None else 0.0)
        final.append((list(prefix), score))
    final.sort(key=lambda h: h[1], reverse=True)
    return final[:nbest]


def ctc_prefix_beam_search(log_probs_TV, beam_width: int = 5, lm: NGramLM | None = None, lm_weight: float = 0.0,
                           length_bonus: float = 0.0, tokenizer: Tokenizer | None = None,
                           token_min_logp: float = -10.0, token_top_k: int | None = None,
                           nbest: int | None = None) -> list[tuple[list[int], float]]:
    """CTC prefix beam search (Hannun et al. 2014) over one utterance's (T, V) log-probs; n-best, best first.

    Each prefix keeps the probability of its alignments ending in blank and ending in its last
    character, so the same labelling reached by different alignments is summed, not duplicated, and a
    repeated character is a new character only across a blank. Scores are the fused score in the
    module docstring (``</s>`` added when the search ends).

    Pruning: at each frame only tokens with log-prob >= ``token_min_logp`` (default -10, i.e. p < 4.5e-5
    is never extended; the frame's best token always is) and at most ``token_top_k`` of them (None: no
    cap) are expanded; then the ``beam_width`` best prefixes by fused score survive. With a trained
    (peaky) model only one to three tokens per frame pass the threshold.
    """
    if beam_width < 1:
        raise ValueError(f"beam_width must be >= 1, got {beam_width}")
    return _ctc_search(_rows(log_probs_TV), beam_width, _ctc_fusion(lm, lm_weight, tokenizer), length_bonus,
                       token_min_logp, token_top_k, nbest or beam_width)


def ctc_beam_batch(log_probs_BTV: torch.Tensor, lengths_B: torch.Tensor, beam_width: int = 5,
                   lm: NGramLM | None = None, lm_weight: float = 0.0, length_bonus: float = 0.0,
                   tokenizer: Tokenizer | None = None, token_min_logp: float = -10.0,
                   token_top_k: int | None = None) -> list[list[int]]:
    """Best labelling per row (drop-in for ``ctc_greedy``); one LM cache is shared across the rows."""
    if beam_width < 1:
        raise ValueError(f"beam_width must be >= 1, got {beam_width}")
    fusion = _ctc_fusion(lm, lm_weight, tokenizer)
    rows_BTV = log_probs_BTV.detach().float().cpu()
    out = []
    for b, n in enumerate(lengths_B.cpu().tolist()):
        best = _ctc_search(rows_BTV[b, :n].tolist(), beam_width, fusion, length_bonus, token_min_logp,
                           token_top_k, 1)
        out.append(best[0][0])
    return out


@torch.no_grad()
def attention_beam_search(decoder: torch.nn.Module, memory_BSD: torch.Tensor, memory_lengths_B: torch.Tensor | None,
                          prefix_BP: torch.Tensor, eot_id: int, max_len: int, beam_width: int = 5,
                          allowed_V: torch.Tensor | None = None, lm: NGramLM | None = None, lm_weight: float = 0.0,
                          length_bonus: float = 0.0,
                          id_to_unit: Sequence[str | None] | Mapping[int, str | None] | None = None,
                          nbest: int | None = None) -> list[list[tuple[list[int], float]]]:
    """Beam search with a ``TransformerDecoder`` (same arguments as its ``greedy``); n-best per row, best first.

    Returned ids exclude the prompt and ``eot_id``. Score = sum of the decoder's log-probs (renormalised
    over ``allowed_V`` + eot) + ``lm_weight`` * LM + ``length_bonus`` per emitted token; ``id_to_unit``
    maps token ids to LM units (the char tokenizer's symbols; ids past its end, e.g. specials, have none).

    Each step ranks every (live hypothesis, token) pair; hypotheses ending in eot within the top
    ``beam_width`` are finished, and the live set is refilled to ``beam_width`` from the next best
    pairs. The search stops when no live hypothesis can still beat the best finished one (exact when
    scores never increase: ``length_bonus <= 0``), else once ``beam_width`` are finished, or at
    ``max_len`` (live hypotheses then count as finished, like ``greedy``'s truncated rows). With
    ``beam_width = 1`` and no LM/bonus this is exactly ``greedy``. With an LM, each hypothesis is
    extended only by its ``max(2 * beam_width, 10)`` best tokens by decoder score (a pre-beam, as in
    ESPnet) so the LM is not queried for hopeless tokens.
    """
    if beam_width < 1:
        raise ValueError(f"beam_width must be >= 1, got {beam_width}")
    fusion = None
    if lm is not None and lm_weight != 0.0:
        fusion = LMFusion(lm, id_to_unit if id_to_unit is not None else CharTokenizer().symbols, lm_weight)
    p = prefix_BP.shape[1]
    max_len = max(0, min(max_len, decoder.max_positions - p))
    v_total = decoder.embed.num_embeddings
    suppress_V = None
    if allowed_V is not None:
        suppress_V = ~allowed_V.to(memory_BSD.device).clone()
        suppress_V[eot_id] = False
    n_open = v_total if suppress_V is None else int((~suppress_V).sum())
    # +1: a row whose eot is in the top beam_width may still need beam_width non-eot tokens to refill.
    pre_beam = min(n_open, beam_width + 1 if fusion is None else max(2 * beam_width, 10))
    monotone = length_bonus <= 0 and lm_weight >= 0
    results = []
    for b in range(memory_BSD.shape[0]):
        prompt = prefix_BP[b].tolist()
        live: list[tuple[list[int], float, tuple | None]] = [([], 0.0, fusion.start() if fusion else None)]
        finished: list[tuple[list[int], float]] = []
        for _ in range(max_len):
            tokens_NL = torch.tensor([prompt + h for h, _, _ in live], dtype=torch.int64, device=memory_BSD.device)
            n = tokens_NL.shape[0]
            memory_NSD = memory_BSD[b: b + 1].expand(n, -1, -1)
            lengths_N = None if memory_lengths_B is None else memory_lengths_B[b: b + 1].expand(n)
            logits_NV = decoder(tokens_NL, memory_NSD, lengths_N)[:, -1].float()
            if suppress_V is not None:
                logits_NV = logits_NV.masked_fill(suppress_V, NEG_INF)
            top_lp_NK, top_id_NK = logits_NV.log_softmax(-1).topk(pre_beam, dim=-1)
            cands = []
            for i, (lps, ids) in enumerate(zip(top_lp_NK.tolist(), top_id_NK.tolist())):
                hyp, score, state = live[i]
                for lp, tok in zip(lps, ids):
                    if tok == eot_id:
                        cands.append((score + lp + (fusion.end(state) if fusion else 0.0), i, tok, state))
                    else:
                        delta, nstate = fusion.step(state, tok) if fusion else (0.0, None)
                        cands.append((score + lp + delta + length_bonus, i, tok, nstate))
            cands.sort(key=lambda c: c[0], reverse=True)
            new_live = []
            for rank, (score, i, tok, state) in enumerate(cands):
                if tok == eot_id:
                    if rank < beam_width:
                        finished.append((live[i][0], score))
                elif len(new_live) < beam_width:
                    new_live.append((live[i][0] + [tok], score, state))
                if rank >= beam_width and len(new_live) >= beam_width:
                    break
            live = new_live
            if not live:
                break
            best_done = max((s for _, s in finished), default=NEG_INF)
            if monotone and best_done >= max(s for _, s, _ in live):
                break
            if not monotone and len(finished) >= beam_width:
                break
        else:
            for hyp, score, state in live:  # ran out of length: truncated, like greedy
                finished.append((hyp, score + (fusion.end(state) if fusion else 0.0)))
        if not finished:  # max_len == 0
            finished = [([], 0.0)]
        finished.sort(key=lambda h: h[1], reverse=True)
        results.append(finished[: nbest or beam_width])
    return results
