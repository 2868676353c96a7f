"""The linear heads the probes fit on frozen features, and their scores (plain torch, no model, no data).

Shapes: N = rows (utterances, or frames for the F0 probe), K = feature width, T = frames of one
utterance, D = frame-feature width, C = phone classes + blank.

Every head is linear on standardized features (probe-train statistics), so a score says what is
linearly readable from the features, not what a deeper head could compute from them; each fit is
deterministic (closed form, L-BFGS from zeros, or Adam from zeros over a seeded batch order).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ProbeSettings:
    """How the heads are fitted (the same for the pretrained and the random-init encoder)."""

    speaker_l2: float = 1e-3
    """L2 weight of the speaker-id logistic regression."""
    f0_ridge_l2_grid: tuple[float, ...] = (1.0, 10.0, 100.0, 1000.0, 10000.0)
    """Ridge weights the F0 regression chooses from (on standardized features; the bias is not
    penalised), by cross-validation over probe-train utterances (``choose_ridge_l2``)."""
    f0_ridge_folds: int = 4
    """Folds of that cross-validation (whole utterances per fold: neighbouring frames are near copies)."""
    ctc_steps: int = 400
    """Adam steps of the phoneme CTC head."""
    ctc_lr: float = 1e-2
    """Adam learning rate of the phoneme CTC head."""
    ctc_batch_utterances: int = 32
    """Probe-train utterances per CTC step (drawn without replacement, reshuffled each pass)."""
    seed: int = 0
    """Seed of the CTC head's batch order."""


def standardize(x_NK: np.ndarray, train_N: np.ndarray) -> torch.Tensor:
    """``x_NK`` scaled by the probe-train rows' mean and std (float64)."""
    mu, sd = x_NK[train_N].mean(0), x_NK[train_N].std(0) + 1e-6
    return torch.from_numpy((x_NK - mu) / sd).double()


def speaker_accuracy(x_NK: np.ndarray, speaker_N: np.ndarray, train_N: np.ndarray, l2: float = 1e-3) -> float:
    """Multinomial logistic regression (L-BFGS, L2 ``l2``) on probe-train rows; accuracy on the rest."""
    classes, y_N = np.unique(speaker_N, return_inverse=True)
    x = standardize(x_NK, train_N)
    y = torch.from_numpy(y_N)
    tr = torch.from_numpy(train_N)
    w = torch.zeros(x.shape[1], len(classes), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(len(classes), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=500, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x[tr] @ w + b, y[tr]) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((x[~tr] @ w + b).argmax(1) == y[~tr]).double().mean())


def _ridge_fit(x: torch.Tensor, y: torch.Tensor, l2: float) -> torch.Tensor:
    """Coefficients of ridge regression on ``x`` with a bias column last (not penalised)."""
    reg = l2 * torch.eye(x.shape[1], dtype=x.dtype)
    reg[-1, -1] = 0.0
    return torch.linalg.solve(x.T @ x + reg, x.T @ y)


def _with_bias(x_NK: np.ndarray, train_N: np.ndarray) -> torch.Tensor:
    x = standardize(x_NK, train_N)
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)


def ridge_rmse(x_NK: np.ndarray, y_N: np.ndarray, train_N: np.ndarray, l2: float = 10.0) -> float:
    """Ridge regression (closed form, L2 ``l2`` on standardized features, unpenalised bias) fitted on
    probe-train rows; RMSE on the rest, in ``y_N``'s unit."""
    x = _with_bias(x_NK, train_N)
    y = torch.from_numpy(np.asarray(y_N, dtype=np.float64))
    tr = torch.from_numpy(train_N)
    err = x[~tr] @ _ridge_fit(x[tr], y[tr], l2) - y[~tr]
    return float(err.pow(2).mean().sqrt())


def choose_ridge_l2(x_NK: np.ndarray, y_N: np.ndarray, train_N: np.ndarray, groups_N: np.ndarray,
                    grid: tuple[float, ...], folds: int = 4) -> float:
    """The ridge weight of ``grid`` with the lowest cross-validated RMSE over the probe-train rows,
    folds made of whole groups (utterances); probe-test rows are never looked at. Why choose: the
    right weight depends on how many frames there are per feature (a fixed one overfits a small
    corpus and barely acts on a large one)."""
    x = _with_bias(x_NK, train_N)[torch.from_numpy(train_N)]
    y = torch.from_numpy(np.asarray(y_N, dtype=np.float64)[train_N])
    _, group_idx = np.unique(groups_N[train_N], return_inverse=True)
    if group_idx.max(initial=0) < 1:  # one utterance: nothing to hold out
        return grid[len(grid) // 2]
    fold_N = torch.from_numpy(group_idx % max(2, min(folds, group_idx.max() + 1)))
    best, best_err = grid[0], float("inf")
    for l2 in grid:
        sq = 0.0
        for k in fold_N.unique():
            held = fold_N == k
            sq += float((x[held] @ _ridge_fit(x[~held], y[~held], l2) - y[held]).pow(2).sum())
        if sq < best_err:
            best, best_err = l2, sq
    return best


def mean_rmse(y_N: np.ndarray, train_N: np.ndarray) -> float:
    """RMSE on the probe-test rows of always predicting the probe-train mean: the floor a probe must beat."""
    y = np.asarray(y_N, dtype=np.float64)
    return float(np.sqrt(((y[~train_N] - y[train_N].mean()) ** 2).mean()))


def edit_distance(ref: list, hyp: list) -> int:
    """Levenshtein distance (substitutions, deletions, insertions all cost 1) between two sequences."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, start=1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, start=1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def phone_error_rate(refs: list[list[str]], hyps: list[list[str]]) -> float:
    """Corpus PER: edit distances summed over utterances, divided by the reference phones (nan if none)."""
    total = sum(len(r) for r in refs)
    if total == 0:
        return float("nan")
    return sum(edit_distance(r, h) for r, h in zip(refs, hyps)) / total


def ctc_feasible(targets_L: list[int], n_frames: int) -> bool:
    """Whether CTC can align ``targets_L`` to ``n_frames`` frames (a blank between repeats)."""
    repeats = sum(a == b for a, b in zip(targets_L, targets_L[1:]))
    return 0 < len(targets_L) + repeats <= n_frames


def _padded(feats: list[np.ndarray], mu: np.ndarray, sd: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardized features padded to (B, T, D), and their lengths."""
    lengths = torch.tensor([len(f) for f in feats])
    x = torch.zeros(len(feats), int(lengths.max()), feats[0].shape[1])
    for i, f in enumerate(feats):
        x[i, : len(f)] = torch.from_numpy((f - mu) / sd)
    return x, lengths


def ctc_phone_probe(train_feats: list[np.ndarray], train_targets: list[list[int]], test_feats: list[np.ndarray],
                    n_phones: int, settings: ProbeSettings = ProbeSettings()) -> list[list[int]]:
    """A linear CTC head (frame features -> ``n_phones`` phone classes + blank 0, phone ids 1..n) fitted
    with Adam from zeros on the probe-train utterances; greedy CTC decodes of the probe-test ones.

    Utterances CTC cannot align (more phones than frames) must be left out of ``train_*`` by the caller
    (``ctc_feasible``); test utterances are all decoded."""
    frames = np.concatenate(train_feats)
    mu, sd = frames.mean(0), frames.std(0) + 1e-6
    dim = frames.shape[1]
    head = torch.nn.Linear(dim, n_phones + 1)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.Adam(head.parameters(), lr=settings.ctc_lr)
    ctc = torch.nn.CTCLoss(blank=0, reduction="mean", zero_infinity=True)
    gen = torch.Generator().manual_seed(settings.seed)
    n = len(train_feats)
    order: list[int] = []
    for _ in range(settings.ctc_steps):
        if len(order) < min(settings.ctc_batch_utterances, n):
            order = torch.randperm(n, generator=gen).tolist()
        rows, order = order[: settings.ctc_batch_utterances], order[settings.ctc_batch_utterances:]
        x_BTD, lengths_B = _padded([train_feats[i] for i in rows], mu, sd)
        targets = torch.tensor([p for i in rows for p in train_targets[i]], dtype=torch.long)
        target_lengths = torch.tensor([len(train_targets[i]) for i in rows])
        log_probs_TBC = head(x_BTD).log_softmax(-1).transpose(0, 1)
        loss = ctc(log_probs_TBC, targets, lengths_B, target_lengths)
        opt.zero_grad()
        loss.backward()
        opt.step()
    hyps = []
    with torch.no_grad():
        for f in test_feats:
            best = head(torch.from_numpy((f - mu) / sd).float()).argmax(-1).tolist()
            hyps.append([p for k, p in enumerate(best) if p != 0 and (k == 0 or p != best[k - 1])])
    return hyps
