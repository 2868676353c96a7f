"""Hyperparameter sweeps: Ray Tune over a function trainable that runs one ``TorchTrainer`` per trial.

Ray 2.60 dropped ``Tuner(trainer)``; each trial is a plain function that builds the recipe's trainer
with the trial's overrides and a ``TuneReportCallback`` that forwards rank 0's reports to Tune, where
ASHA compares trials on the sweep metric at step milestones and stops the laggards.

Layout under ``<storage_path>/<sweep>/``: ``tune/`` (Tune's experiment), ``trials/<trial id>/`` (each
trial's Train run), and our results (results.json/.md, best_config.yaml, the plot, the ASHA record).
Each trial's Train run is named by its Tune trial id, so a trial restarted by ``Tuner.restore``
resumes its own Train checkpoint instead of starting over; re-running the same sweep command restores
the sweep, and trials that had finished are not run again; ASHA's rungs are reloaded from our record
(Tune itself does not save scheduler state).
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass

from raytrain_speech import ray_compat, storage
from raytrain_speech.config import ConfigError, require
from raytrain_speech.train.metrics import METRICS_FILE, read_metrics
from raytrain_speech.tune.asha import ASHA_RECORD, read_asha_record, scheduler
from raytrain_speech.tune.spaces import SweepConfig, corner_values, to_tune

TRIALS_DIR = "trials"
TUNE_DIR = "tune"
HEAD_NODE_RESOURCE = "node:__internal_head__"  # every head has 1 of it (Ray pins its own state actors so)
BEST_CONFIG = "best_config.yaml"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"


def set_dotted(data: dict, key: str, value) -> None:
    node = data
    parts = key.split(".")
    for k in parts[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {k} is not a config section")
    node[parts[-1]] = value


def sweep_dir(base_storage_path: str, sweep: SweepConfig) -> str:
    return storage.join(base_storage_path, sweep.name)


def trial_dict(base: dict, sweep: SweepConfig, params: dict, trial_name: str) -> dict:
    """The resolved config of one trial: recipe <- sweep overrides <- sampled params <- run identity."""
    data = copy.deepcopy(base)
    for key, value in {**sweep.overrides, **params}.items():
        set_dotted(data, key, value)
    data["run"]["name"] = trial_name
    data["run"]["storage_path"] = storage.join(sweep_dir(base["run"]["storage_path"], sweep), TRIALS_DIR)
    if sweep.trial_workers is not None:
        data["run"]["num_workers"] = sweep.trial_workers
    return data


def check_sweep(base: dict, sweep: SweepConfig):
    """Type-check every swept key at the edges of its range against the recipe, before Ray starts.

    Returns the config of a representative trial (first corner), used to size the cluster.
    """
    from raytrain_speech.config import Config
    from raytrain_speech.hf.importer import settle
    from raytrain_speech.models.registry import check_config

    sample = None
    for key, spec in sweep.space.items():
        for value in corner_values(spec):
            try:
                cfg = Config.from_dict(trial_dict(base, sweep, {key: value}, "check"))
                settle(cfg, log=None)
                check_config(cfg)
            except ConfigError as err:
                raise ConfigError(f"sweep space.{key}={value!r}: {err}") from None
            sample = sample or cfg
    require(sample.run.backend == "ray", "run.backend", "a sweep runs its trials as Ray Train runs; use run.backend=ray")
    metric_needs_validation = sweep.metric.startswith("valid_")
    require(not metric_needs_validation or sample.train.validate_every_steps is not None, "metric",
            f"{sweep.metric} is reported only with train.validate_every_steps set (in the recipe or overrides)")
    if sweep.scheduler.name == "asha":
        require(sweep.scheduler.grace_period_steps <= sample.train.max_steps, "scheduler.grace_period_steps",
                f"is beyond train.max_steps={sample.train.max_steps}")
    return sample


def concurrent_trials(resources: dict, trial_workers: int, cpus_per_worker: float, use_gpu: bool,
                      data_cpus_per_trial: float = 1.0) -> int:
    """Trials the cluster holds at once: GPUs / workers for GPU runs; CPUs / (workers + data slack) else.

    The slack leaves CPUs for each trial's Ray Data tasks, so a trial's input pipeline does not
    starve behind another trial's workers.
    """
    if use_gpu:
        n = resources.get("GPU", 0) // trial_workers
    else:
        n = resources.get("CPU", 0) // (trial_workers * cpus_per_worker + data_cpus_per_trial)
    return max(1, int(n))


def _metric_reports(metric: str):
    """Ray Train's TuneReportCallback, forwarding only the reports that carry the sweep metric.

    Tune rejects a result without its metric, and rank 0 reports every train.log_every_steps while
    valid_* exists only every train.validate_every_steps; the other reports still reach
    metrics.jsonl. (ASHA and the searchers read nothing else.)"""
    from ray.tune.integration.ray_train import TuneReportCallback

    class MetricReports(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metrics[0].get(metric) is not None:
                super().after_report(run_context, metrics, checkpoint)

    return MetricReports()


def _run_trial(params: dict, base: dict, sweep_data: dict) -> None:
    """The function trainable: one Train run per trial, reporting to Tune through the callback."""
    from ray import tune

    from raytrain_speech.config import Config, from_dict
    from raytrain_speech.train.fit import fit

    sweep = from_dict(SweepConfig, sweep_data)
    cfg = Config.from_dict(trial_dict(base, sweep, params, tune.get_context().get_trial_id()))
    fit(cfg, progress=False, callbacks=[_metric_reports(sweep.metric)])


def _trainable(base: dict, sweep: SweepConfig):
    from ray import tune

    from raytrain_speech.config import to_dict

    # The trial function only waits on its Train controller (which lives on the trial's node), so it
    # takes no CPU and is pinned to the head: drivers there survive spot-node loss, and a head with
    # CPU: 0 (our cluster configs) still hosts them. Tune needs a non-empty request; 1% of the head's
    # node marker allows 100 concurrent trials.
    trial_resources = {"CPU": 0, HEAD_NODE_RESOURCE: 0.01}
    return tune.with_resources(tune.with_parameters(_run_trial, base=base, sweep_data=to_dict(sweep)),
                               trial_resources)


def expected_trials(sweep: SweepConfig) -> int:
    """Trials the sweep will have in all: samples x every combination of grid entries."""
    count = sweep.num_samples
    for spec in sweep.space.values():
        kind, args = next(iter(spec.items()))
        if kind == "grid":
            count *= len(args)
    return count


def _searcher(sweep: SweepConfig, concurrency: int):
    """Tune honours max_concurrent_trials only for Searchers; the variant generator takes its own."""
    if sweep.searcher == "optuna":  # availability checked with the sweep file
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=sweep.seed), max_concurrent=concurrency)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=sweep.seed, max_concurrent=concurrency)


@dataclass
class TrialSummary:
    trial_id: str
    params: dict
    status: str
    steps: int
    last: float | None
    best: float | None
    checkpoint: str | None
    history: list[tuple[int, float]]


@dataclass
class SweepOutcome:
    directory: str
    trials: list[TrialSummary]
    interrupted: bool
    best: TrialSummary | None
    best_config_uri: str | None
    plot_uri: str | None


def run_sweep(cfg, sweep: SweepConfig, out=print) -> SweepOutcome:
    """Start (or resume) the sweep and return its summary; writes results, best config and a plot."""
    import ray
    from ray import tune

    from raytrain_speech.train.launch import connect, storage_args

    base = cfg.to_dict()
    sample = check_sweep(base, sweep)
    trial_workers = sample.run.worker_range[1]
    ray_cfg = copy.deepcopy(cfg)
    if cfg.run.local_num_cpus is None and not (cfg.run.ray_address or os.environ.get("RAY_ADDRESS")):
        slots = sweep.max_concurrent_trials or 2
        ray_cfg.run.local_num_cpus = (os.cpu_count() or 1) + int(slots * (trial_workers * sample.run.cpus_per_worker + 1))
    connect(ray_cfg)
    concurrency = sweep.max_concurrent_trials or concurrent_trials(
        ray.cluster_resources(), trial_workers, sample.run.cpus_per_worker, sample.run.use_gpu)
    directory = sweep_dir(cfg.run.storage_path, sweep)
    # Tune's experiment gets a directory of its own: Tune re-uploads its staged copy of that directory,
    # which would overwrite newer files of ours (trial runs, the ASHA record) kept beside it.
    args = storage_args(directory, cfg.storage)
    experiment_path = storage.join(args["storage_path"], TUNE_DIR) if "storage_filesystem" in args else \
        os.path.join(args["storage_path"], TUNE_DIR)
    trainable = _trainable(base, sweep)
    record_uri = storage.join(directory, ASHA_RECORD)
    if tune.Tuner.can_restore(experiment_path, storage_filesystem=args.get("storage_filesystem")):
        out(f"[tune] resuming sweep {sweep.name} from {directory} (finished trials are kept, unfinished ones resume)")
        tuner = tune.Tuner.restore(experiment_path, trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=args.get("storage_filesystem"))
    else:
        out(f"[tune] sweep {sweep.name}: {sweep.num_samples} sample(s) over {', '.join(sweep.space)}; "
            f"{concurrency} trial(s) at once x {trial_workers} worker(s); {sweep.scheduler.name} on {sweep.metric}")
        tuner = tune.Tuner(
            trainable,
            param_space=to_tune(sweep.space),
            tune_config=tune.TuneConfig(
                metric=sweep.metric, mode=sweep.mode, num_samples=sweep.num_samples,
                scheduler=scheduler(sweep, sample.train.max_steps, record_uri, cfg.storage),
                search_alg=_searcher(sweep, concurrency),
                trial_dirname_creator=lambda t: t.trial_id),
            run_config=tune.RunConfig(name=TUNE_DIR, **args, verbose=1,
                                      failure_config=tune.FailureConfig(max_failures=1)),
        )
    grid = tuner.fit()
    trials = summarize(grid, sweep, sample.train.max_steps, set(read_asha_record(record_uri, cfg.storage).get("stopped", [])), directory,
                       cfg.storage)
    interrupted = len(trials) < expected_trials(sweep) or any(t.status == "interrupted" for t in trials)
    return write_results(cfg, sweep, directory, trials, interrupted)


def summarize(grid, sweep: SweepConfig, max_steps: int, asha_stopped: set[str], directory: str,
              storage_cfg) -> list[TrialSummary]:
    """One summary per trial; status: completed | stopped by ASHA | error | interrupted.

    Histories come from each trial's own Train run (metrics.jsonl), which keeps every report across
    restarts; Tune resets a trial's result files when it restarts the trial after an interruption.
    """
    trials = ray_compat.result_grid_trials(grid)  # status and config of every trial, run or not
    out = []
    for trial in trials:
        trial_id = trial.trial_id
        records = read_metrics(storage.join(directory, TRIALS_DIR, trial_id, METRICS_FILE), storage_cfg)
        history = [(int(r["step"]), float(r[sweep.metric])) for r in records if r.get(sweep.metric) is not None]
        checkpoints = [r["checkpoint_path"] for r in records if r.get("checkpoint_path")]
        last = records[-1] if records else {}
        steps = int(last.get("step") or 0)
        if steps >= max_steps or last.get("stopped_early"):
            status = "completed"
        elif trial_id in asha_stopped:
            status = "stopped by ASHA"
        elif trial.status == "ERROR":
            status = "error"
        else:
            status = "interrupted"  # TERMINATED by Ctrl+C, or still RUNNING/PENDING when the driver stopped
        values = [v for _, v in history]
        pick = min if sweep.mode == "min" else max
        out.append(TrialSummary(trial_id, {k: trial.config.get(k) for k in sweep.space}, status, steps,
                                values[-1] if values else None, pick(values) if values else None,
                                checkpoints[-1] if checkpoints else None, history))
    return sorted(out, key=lambda t: t.trial_id)


def best_trial(trials: list[TrialSummary], mode: str) -> TrialSummary | None:
    scored = [t for t in trials if t.best is not None]
    if not scored:
        return None
    return (min if mode == "min" else max)(scored, key=lambda t: t.best)


def write_results(cfg, sweep: SweepConfig, directory: str, trials: list[TrialSummary],
                  interrupted: bool) -> SweepOutcome:
    import yaml

    from raytrain_speech.config import dump_yaml

    best = best_trial(trials, sweep.mode)
    best_uri = plot_uri = None
    if best is not None and not interrupted:
        data = cfg.to_dict()
        for key, value in best.params.items():
            set_dotted(data, key, value)
        data["run"]["name"] = f"{sweep.name}-best"
        from raytrain_speech.config import Config

        header = (f"# Best trial {best.trial_id} of sweep {sweep.name}: {sweep.metric} {best.best:.4f}\n"
                  f"# raytrain-speech train --config {BEST_CONFIG}\n"
                  f"# swept: {yaml.safe_dump(best.params, default_flow_style=True).strip()}\n")
        best_uri = storage.join(directory, BEST_CONFIG)
        storage.write_bytes(best_uri, (header + dump_yaml(Config.from_dict(data))).encode(), cfg.storage)
    if trials:
        plot_uri = storage.join(directory, f"{sweep.metric}_per_trial.png")
        storage.write_bytes(plot_uri, plot_png(trials, sweep.metric), cfg.storage)
    record = {"sweep": sweep.name, "metric": sweep.metric, "mode": sweep.mode, "interrupted": interrupted,
              "best_trial": best.trial_id if best else None, "best_checkpoint": best.checkpoint if best else None,
              "trials": [t.__dict__ for t in trials], "time": time.time()}
    storage.write_bytes(storage.join(directory, RESULTS_JSON), json.dumps(record, indent=2).encode(), cfg.storage)
    storage.write_bytes(storage.join(directory, RESULTS_MD), results_table(trials, sweep).encode(), cfg.storage)
    return SweepOutcome(directory, trials, interrupted, best, best_uri, plot_uri)


def results_table(trials: list[TrialSummary], sweep: SweepConfig) -> str:
    keys = list(sweep.space)
    head = ["trial", *keys, "status", "steps", f"last {sweep.metric}", f"best {sweep.metric}"]
    rows = [head, ["---"] * len(head)]

    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    for t in trials:
        rows.append([t.trial_id, *[fmt(t.params.get(k)) for k in keys], t.status, str(t.steps),
                     fmt(t.last) if t.last is not None else "-", fmt(t.best) if t.best is not None else "-"])
    return "\n".join("| " + " | ".join(r) + " |" for r in rows) + "\n"


def plot_png(trials: list[TrialSummary], metric: str) -> bytes:
    """The metric of every trial over training steps; trials ASHA stopped end early on the plot."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for t in trials:
        if t.history:
            steps, values = zip(*t.history)
            label = t.trial_id + " " + ", ".join(f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float)
                                                  else f"{k.split('.')[-1]}={v}" for k, v in t.params.items())
            ax.plot(steps, values, marker="o", markersize=3, label=label,
                    linestyle="--" if t.status == "stopped by ASHA" else "-")
    ax.set_xlabel("training step")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per trial (dashed: stopped early by ASHA)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
