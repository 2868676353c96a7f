"""Back-off n-gram language model over characters or words, for shallow fusion in beam search.

Smoothing is *interpolated modified Kneser-Ney* (Chen & Goodman 1998): three discounts per order
(for n-grams seen once, twice, three or more times) estimated from the count-of-counts, lower orders
trained on continuation counts (how many distinct units precede an n-gram, not how often it occurs),
and every order interpolated with the next lower one down to a uniform distribution over the
vocabulary. ``smoothing="kn"`` uses one discount per order (plain interpolated Kneser-Ney). Both
give a proper distribution: for any context the probabilities of all vocabulary units plus ``</s>``
sum to 1, because each context hands exactly the mass it discounts to its lower order.

N-grams that start with ``<s>`` keep their raw counts at every order (as in KenLM): nothing can
precede the sentence start, so a continuation count would be 1 for all of them.

Unknown units: words seen fewer than ``min_word_count`` times in training are replaced by ``<unk>``
before counting, so ``<unk>`` gets the probability that rare words had in the training text (the
Good-Turing intuition: the rate of once-seen words estimates the rate of new ones), and every unit is
also reachable through the uniform floor. At query time any unit outside the vocabulary is scored
as ``<unk>``. Character models keep every character seen (plus the ``units`` passed to ``train``).

Pure Python and plain data: tables are dicts of tuples, saved as JSON (no pickle), and the
probabilities of a context are cached once computed.
"""

from __future__ import annotations

import json
import math
import operator
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

from raytrain_speech.config import NGramConfig, from_dict

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
_FORMAT = "raytrain_speech.ngram/1"
_DISTRIBUTION_MAX_VOCAB = 512  # above this (word models), cache per (context, unit) instead of whole rows
_CACHE_MAX_ENTRIES = 500_000  # the caches are dropped wholesale beyond this, bounding memory in long evals


def _units(text: str, unit: str) -> list[str]:
    """Characters or words of ``text``, already under the target normaliser (evaluate/runner.py)."""
    norm = " ".join(text.split())
    return list(norm) if unit == "char" else norm.split()


def _discounts(adjusted: Counter, smoothing: str) -> tuple[float, float, float]:
    """(D1, D2, D3+) from the count-of-counts; falls back to plain KN, then 0.5, where data is too thin."""
    n = Counter(min(c, 5) for c in adjusted.values())
    n1, n2, n3, n4 = n[1], n[2], n[3], n[4]
    y = n1 / (n1 + 2 * n2) if n1 and n2 else 0.5
    if smoothing == "modified_kn" and n1 and n2 and n3 and n4:
        d = (1 - 2 * y * n2 / n1, 2 - 3 * y * n3 / n2, 3 - 4 * y * n4 / n3)
        if all(0 < di <= i + 1 for i, di in enumerate(d)):
            return d
    y = min(max(y, 0.05), 0.95)  # a discount in (0, 1): unseen units keep mass, seen ones stay positive
    return (y, y, y)


class NGramLM:
    """Interpolated (modified) Kneser-Ney n-gram model; contexts are tuples of units (``<s>`` first at a start)."""

    def __init__(self, cfg: NGramConfig, vocab: list[str], discounts: list[tuple[float, float, float]],
                 counts: list[dict[tuple[str, ...], int]]):
        self.cfg = cfg
        self.order = cfg.resolved_order
        self.vocab = vocab  # predictable units: everything but <s>; </s> and <unk> included
        self._known = set(vocab)
        self.discounts = discounts  # per order (index 0 = unigrams)
        self.counts = counts  # per order: n-gram tuple -> adjusted count
        # Per context: (total adjusted count, mass handed to the lower order = sum of discounts).
        self._contexts: list[dict[tuple[str, ...], tuple[int, float]]] = []
        for k, table in enumerate(counts):
            d1, d2, d3 = discounts[k]
            stats: dict[tuple[str, ...], list[float]] = {}
            for gram, c in table.items():
                s = stats.get(gram[:-1])
                if s is None:
                    s = stats[gram[:-1]] = [0, 0.0]
                s[0] += c
                s[1] += d1 if c == 1 else d2 if c == 2 else d3
            self._contexts.append({h: (int(s[0]), s[1]) for h, s in stats.items()})
        self._rows: dict[tuple[str, ...], dict[str, float]] = {}
        self._pairs: dict[tuple[tuple[str, ...], str], float] = {}

    # ----------------------------------------------------------------------------------------- training
    @classmethod
    def train(cls, texts: Iterable[str], cfg: NGramConfig | None = None, units: Iterable[str] = ()) -> NGramLM:
        """Count ``texts`` (normalised like the targets); ``units`` are added to the vocabulary even if unseen."""
        cfg = cfg or NGramConfig()
        cfg.validate()
        n = cfg.resolved_order
        sentences = [u for u in (_units(t, cfg.unit) for t in texts) if u]
        if cfg.unit == "word" and cfg.min_word_count > 1:
            freq = Counter(w for s in sentences for w in s)
            sentences = [[w if freq[w] >= cfg.min_word_count else UNK for w in s] for s in sentences]
        # Highest order: raw counts. Lower orders: raw counts of the n-grams that start with <s> (the
        # sentence-initial ones, shorter than n), continuation counts for the rest (filled below).
        counts: list[Counter] = [Counter() for _ in range(n)]
        for s in sentences:
            toks = [BOS, *s, EOS] if n > 1 else [*s, EOS]
            counts[n - 1].update(zip(*(toks[j:] for j in range(n))))
            for k in range(2, min(n - 1, len(toks)) + 1):
                counts[k - 1][tuple(toks[:k])] += 1
        drop_first = operator.itemgetter(slice(1, None))
        for k in range(n - 1, 0, -1):  # order k from the distinct (k+1)-grams
            counts[k - 1].update(map(drop_first, counts[k]))
        seen = {g[0] for g in counts[0]}
        extra = {u for u in units if u not in (BOS, EOS, UNK)}
        vocab = [EOS, UNK, *sorted((seen | extra) - {EOS, UNK, BOS})]
        discounts = [_discounts(c, cfg.smoothing) for c in counts]
        return cls(cfg, vocab, discounts, [dict(c) for c in counts])

    # ----------------------------------------------------------------------------------------- queries
    def begin(self) -> tuple[str, ...]:
        """The context at a sentence start."""
        return (BOS,) if self.order > 1 else ()

    def extend(self, context: tuple[str, ...], unit: str) -> tuple[str, ...]:
        """The context after ``unit``, cut to the ``order - 1`` units the model looks at."""
        keep = self.order - 1
        if keep <= 0:
            return ()
        unit = unit if unit in self._known else UNK
        out = context + (unit,)
        return out[len(out) - keep:] if len(out) > keep else out

    def _context(self, context: tuple[str, ...]) -> tuple[str, ...]:
        keep = self.order - 1
        if keep <= 0:
            return ()
        ctx = context[len(context) - keep:] if len(context) > keep else tuple(context)
        if any(u not in self._known and u != BOS for u in ctx):
            ctx = tuple(u if u in self._known or u == BOS else UNK for u in ctx)
        return ctx

    def distribution(self, context: tuple[str, ...]) -> dict[str, float]:
        """Natural-log probabilities of every vocabulary unit (``</s>`` and ``<unk>`` included) after ``context``."""
        ctx = self._context(context)
        row = self._rows.get(ctx)
        if row is not None:
            return row
        if ctx:
            lower = self.distribution(ctx[1:])
            p = {u: math.exp(lp) for u, lp in lower.items()}
        else:
            p = dict.fromkeys(self.vocab, 1.0 / len(self.vocab))
        k = len(ctx)
        stats = self._contexts[k].get(ctx)
        if stats is not None:
            total, backoff = stats
            d1, d2, d3 = self.discounts[k]
            table = self.counts[k]
            for u in self.vocab:
                c = table.get(ctx + (u,), 0)
                seen = max(c - (d1 if c == 1 else d2 if c == 2 else d3), 0.0) if c else 0.0
                p[u] = (seen + backoff * p[u]) / total
        row = {u: math.log(v) if v > 0 else -math.inf for u, v in p.items()}
        if len(self._rows) >= _CACHE_MAX_ENTRIES:
            self._rows.clear()
        self._rows[ctx] = row
        return row

    def logprob(self, context: tuple[str, ...], unit: str) -> float:
        """ln P(unit | context); ``context`` starts with ``<s>`` at a sentence start; unknown units score as <unk>."""
        unit = unit if unit in self._known else UNK
        if len(self.vocab) <= _DISTRIBUTION_MAX_VOCAB:
            return self.distribution(context)[unit]
        ctx = self._context(context)
        key = (ctx, unit)
        lp = self._pairs.get(key)
        if lp is None:
            lp = math.log(self._prob(ctx, unit))
            if len(self._pairs) >= _CACHE_MAX_ENTRIES:
                self._pairs.clear()
            self._pairs[key] = lp
        return lp

    def _prob(self, ctx: tuple[str, ...], unit: str) -> float:
        """P(unit | ctx) from the uniform floor up through the orders (stops at the first unseen context)."""
        p = 1.0 / len(self.vocab)
        for k in range(len(ctx) + 1):
            h = ctx[len(ctx) - k:] if k else ()
            stats = self._contexts[k].get(h)
            if stats is None:  # a longer context containing an unseen one is unseen too
                break
            total, backoff = stats
            c = self.counts[k].get(h + (unit,), 0)
            d1, d2, d3 = self.discounts[k]
            seen = max(c - (d1 if c == 1 else d2 if c == 2 else d3), 0.0) if c else 0.0
            p = (seen + backoff * p) / total
        return p

    def score(self, text: str) -> float:
        """Total ln-probability of a transcript, end of sentence included."""
        ctx, total = self.begin(), 0.0
        for u in _units(text, self.cfg.unit):
            total += self.logprob(ctx, u)
            ctx = self.extend(ctx, u)
        return total + self.logprob(ctx, EOS)

    def perplexity(self, texts: Iterable[str]) -> float:
        """exp of the mean negative ln-probability per predicted unit (``</s>`` counted)."""
        total, n = 0.0, 0
        for t in texts:
            total += self.score(t)
            n += len(_units(t, self.cfg.unit)) + 1
        return math.exp(-total / max(n, 1))

    # ----------------------------------------------------------------------------------------- storage
    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> NGramLM:
        return cls.from_json(Path(path).read_text(), str(path))

    def to_json(self) -> str:
        """JSON: the config, the vocabulary, discounts and every n-gram as [unit ids..., count]."""
        ids = {u: i for i, u in enumerate([BOS, *self.vocab])}
        data = {
            "format": _FORMAT,
            "config": asdict(self.cfg),
            "vocab": [BOS, *self.vocab],
            "discounts": [list(d) for d in self.discounts],
            "ngrams": [[[*(ids[u] for u in g), c] for g, c in table.items()] for table in self.counts],
        }
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str, where: str = "LM") -> NGramLM:
        data = json.loads(text)
        if data.get("format") != _FORMAT:
            raise ValueError(f"{where}: not a {_FORMAT} file (format {data.get('format')!r})")
        cfg = from_dict(NGramConfig, data["config"])
        symbols = data["vocab"]
        counts = [{tuple(symbols[i] for i in row[:-1]): row[-1] for row in table} for table in data["ngrams"]]
        return cls(cfg, symbols[1:], [tuple(d) for d in data["discounts"]], counts)
