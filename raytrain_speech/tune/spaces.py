"""Sweep files: which config fields to search, over what, judged by which metric, stopped by ASHA.

A sweep YAML names recipe fields by their dotted config keys (``optim.lr_peak``,
``augment.span_mask_prob``), so anything a recipe can set can be swept, and every sampled value goes
through the same typed validation as a ``key=value`` override. The file is checked before Ray starts:
an unknown key, a distribution that does not exist, or a value the recipe would reject is a one-line
error naming it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from raytrain_speech.config import ConfigError, apply_overrides, from_dict, load_yaml_mapping, require

DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice", "grid")


@dataclass
class SchedulerConfig:
    """ASHA early stopping (asynchronous successive halving) on the sweep metric."""

    name: Literal["asha", "fifo"] = "asha"
    """asha stops trials whose metric trails the others at each rung; fifo runs every trial to the end."""
    grace_period_steps: int = 100
    """Training steps every trial gets before it can be stopped (the first rung)."""
    reduction_factor: float = 2.0
    """Keep the best 1/reduction_factor of the trials at each rung."""

    def validate(self) -> None:
        require(self.grace_period_steps >= 1, "scheduler.grace_period_steps", "must be >= 1")
        require(self.reduction_factor > 1, "scheduler.reduction_factor", "must be > 1")


@dataclass
class SweepConfig:
    """One hyperparameter sweep over a recipe."""

    name: str = "sweep"
    """Sweep name; re-running with the same name resumes it (finished trials are not rerun)."""
    metric: str = "valid_loss"
    """Reported metric to optimise (valid_loss or valid_wer need train.validate_every_steps)."""
    mode: Literal["min", "max"] = "min"
    num_samples: int = 4
    """Trials to sample (with grid entries: samples per grid point)."""
    searcher: Literal["random", "optuna"] = "random"
    """random (Tune's variant generator; grid entries allowed) or optuna (TPE; needs `pip install optuna`)."""
    seed: int = 0
    """Seed of the searcher, so a sweep samples the same trials when run again."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    trial_workers: int | None = None
    """Training workers per trial (None = the recipe's run.num_workers)."""
    max_concurrent_trials: int | None = None
    """Trials at once; None = as many as the cluster's GPUs (or CPUs) hold at trial_workers each."""
    space: dict[str, Any] = field(default_factory=dict)
    """Dotted config key -> {uniform: [lo, hi]} | {loguniform: [lo, hi]} | {randint: [lo, hi]} |
    {choice: [values]} | {grid: [values]}."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Dotted config key -> value applied to every trial (e.g. shorter max_steps for the sweep)."""

    def validate(self) -> None:
        require(bool(self.name) and "/" not in self.name, "name", "must be a non-empty name without '/'")
        require(self.num_samples >= 1, "num_samples", "must be >= 1")
        require(bool(self.space), "space", "is empty: name at least one config key to search")
        require(self.trial_workers is None or self.trial_workers >= 1, "trial_workers", "must be >= 1")
        require(self.max_concurrent_trials is None or self.max_concurrent_trials >= 1,
                "max_concurrent_trials", "must be >= 1")
        if self.searcher == "optuna":
            import importlib.util

            require(importlib.util.find_spec("optuna") is not None, "searcher",
                    "optuna is not installed; `pip install optuna` or use searcher: random")
        for key, spec in self.space.items():
            parse_distribution(key, spec)
            if self.searcher == "optuna":
                require(next(iter(spec)) != "grid", f"space.{key}", "grid is not supported by optuna; use choice")


def with_command_line(sweep: SweepConfig, overrides: list[str], num_samples: int | None) -> SweepConfig:
    """The sweep as the command line amends it: a ``key=value`` there beats the sweep file's
    ``overrides:`` for that key (and every key under it), as it beats the recipe; ``--num-samples``
    replaces ``num_samples``. A swept key set on the command line is an error: which would win?"""
    keys = [item.split("=", 1)[0].strip() for item in overrides if "=" in item]

    def covered(key: str) -> bool:
        return any(key == k or key.startswith(k + ".") or k.startswith(key + ".") for k in keys)

    swept = [key for key in sweep.space if covered(key)]
    if swept:
        raise ConfigError(f"{swept[0]} is both swept (the sweep file's space) and set on the command line; "
                          "drop one of them")
    changes = {"overrides": {k: v for k, v in sweep.overrides.items() if not covered(k)}}
    if num_samples is not None:
        require(num_samples >= 1, "--num-samples", "must be >= 1")
        changes["num_samples"] = num_samples
    return dataclasses.replace(sweep, **changes)


def parse_distribution(key: str, spec: Any) -> tuple[str, list]:
    """``{kind: args}`` -> (kind, args), checked."""
    where = f"space.{key}"
    require(isinstance(spec, dict) and len(spec) == 1, where,
            f"must be one of {{{' | '.join(DISTRIBUTIONS)}: [...]}}, got {spec!r}")
    kind, args = next(iter(spec.items()))
    require(kind in DISTRIBUTIONS, where, f"unknown distribution {kind!r} (known: {', '.join(DISTRIBUTIONS)})")
    require(isinstance(args, list) and len(args) >= 1, where, f"{kind} needs a list of values")
    if kind in ("uniform", "loguniform", "randint"):
        require(len(args) == 2, where, f"{kind} needs [low, high]")
        try:
            lo, hi = float(args[0]), float(args[1])
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {kind} bounds must be numbers, got {args!r}") from None
        require(lo < hi, where, f"{kind} needs low < high, got {args!r}")
        require(kind != "loguniform" or lo > 0, where, "loguniform needs low > 0")
        args = [int(lo), int(hi)] if kind == "randint" else [lo, hi]
    return kind, args


def corner_values(spec: Any) -> list:
    """Values at the edges of a distribution: enough to type-check the key against the recipe."""
    kind, args = parse_distribution("", spec)
    if kind in ("choice", "grid"):
        return list(args)
    if kind == "randint":
        return [args[0], args[1] - 1]
    return [args[0], math.nextafter(args[1], args[0])]


def to_tune(space: dict[str, Any]) -> dict[str, Any]:
    """Our space -> Tune's search-space objects (keys stay dotted config keys)."""
    from ray import tune

    build = {"uniform": lambda a: tune.uniform(*a), "loguniform": lambda a: tune.loguniform(*a),
             "randint": lambda a: tune.randint(*a), "choice": tune.choice, "grid": tune.grid_search}
    out = {}
    for key, spec in space.items():
        kind, args = parse_distribution(key, spec)
        out[key] = build[kind](args)
    return out


SWEEP_PREFIX = "sweep."
"""Command-line ``key=value`` items under this prefix set the sweep file's own fields
(``sweep.scheduler.grace_period_steps=4``); every other item is a config key of the trials."""


def split_sweep_items(items: list[str]) -> tuple[list[str], list[str]]:
    """Command-line ``key=value`` items -> (the sweep file's, the trials' config's)."""
    mine = [item[len(SWEEP_PREFIX):] for item in items if item.startswith(SWEEP_PREFIX)]
    return mine, [item for item in items if not item.startswith(SWEEP_PREFIX)]


def load_sweep(path: str, items: list[str] = ()) -> SweepConfig:
    """The sweep file with ``items`` (``key=value`` of its own fields, e.g. num_samples=2) on top."""
    data = load_yaml_mapping(path, "sweep")
    try:
        data = apply_overrides(data, list(items))
        return from_dict(SweepConfig, data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
