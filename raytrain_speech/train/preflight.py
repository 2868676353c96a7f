"""Every check that must fail before any worker starts, in one line naming the input and the fix.

Called by ``fit`` (so a run started from Python is checked exactly as one started by the CLI) and by
sweeps before Tune starts: the model section against its family, storage reachable, the corpus and
its train split present, the noise set present, the fine-tuning source of a compatible family. What
can only be known while reading data (a corrupt shard, a bad transcript) is the Trainer's bad-input
accounting instead, and never stops the run on its own.
"""

from __future__ import annotations

from raytrain_speech import storage
from raytrain_speech.config import Config, ConfigError
from raytrain_speech.data import corpus
from raytrain_speech.data.mixture import build_mixture
from raytrain_speech.models.registry import check_config
from raytrain_speech.storage import StorageError
from raytrain_speech.train.finetune import check_init_from
from raytrain_speech.train.trackers import check_trackers


def check(cfg: Config) -> None:
    """Raise ConfigError / StorageError (one line each) for anything that would fail every worker."""
    check_config(cfg)
    check_trackers(cfg.run.trackers)
    if cfg.train.init_from:  # first: a checkpoint that cannot fit says so before any data is looked at
        check_init_from(cfg)
    storage.check_reachable(cfg.data.root, cfg.storage)
    storage.check_reachable(cfg.run.storage_path, cfg.storage)
    if not cfg.data.sources:
        corpus.shard_uris(cfg.data.root, cfg.data.train_split, cfg.storage)
    for src in cfg.data.sources:
        try:
            storage.check_reachable(src.root, src.storage or cfg.storage)
            corpus.shard_uris(src.root, src.split, src.storage or cfg.storage)
        except StorageError as err:
            raise StorageError(f"data.sources {src.name}: {err}") from None
    if cfg.data.sources:  # a source with nothing to train on is a config error, before Ray starts
        try:
            build_mixture(cfg)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    check_noise(cfg)


def check_noise(cfg: Config) -> None:
    noise_root = cfg.augment.noise_root
    if noise_root is None or cfg.augment.noise_prob <= 0:
        return
    storage.check_reachable(noise_root, cfg.storage)
    try:
        corpus.shard_uris(noise_root, cfg.augment.noise_split, cfg.storage)
    except StorageError as err:
        raise StorageError(f"augment.noise_root: {err} (make one with `raytrain-speech synth-noise --out "
                           f"{noise_root}`, or set augment.noise_split)") from None


def cpu_room_problem(cluster: dict[str, float], autoscaler_max: dict[str, float] | None, cfg: Config) -> str:
    """'' or why the training workers would leave no CPU for the data pipeline (one line, the fix).

    Train places as many workers as fit (up to the top of ``run.num_workers``, and no more than the
    GPUs and ``run.worker_resources`` allow), each reserving ``run.cpus_per_worker``; Ray Data then
    needs at least one preprocessing task's ``data.preprocess_cpus`` to make any progress. Without it
    the run does not fail: it waits forever at 0% with nothing in its log, which is what this check
    prevents. ``cluster`` is ``ray.cluster_resources()``; with an autoscaler, each resource counts at
    the most it may grow to (``autoscaler_max``)."""
    run = cfg.run
    limits = autoscaler_max or {}
    capacity = {k: max(float(cluster.get(k, 0.0)), float(limits.get(k, 0.0))) for k in {*cluster, *limits}}
    per_worker = {**({"GPU": 1.0} if run.use_gpu else {}), **{k: float(v) for k, v in run.worker_resources.items()}}
    workers = run.worker_range[1]
    for key, amount in per_worker.items():
        if amount > 0:
            workers = min(workers, int(capacity.get(key, 0.0) // amount))
    cpus, training, need = capacity.get("CPU", 0.0), workers * run.cpus_per_worker, cfg.data.preprocess_cpus
    if cpus - training >= need:
        return ""
    grown = " (the autoscaler's maximum)" if float(limits.get("CPU", 0.0)) > float(cluster.get("CPU", 0.0)) else ""
    return (f"no CPU left for data: the cluster has {cpus:g} CPUs{grown}, {workers} training worker(s) x "
            f"run.cpus_per_worker={run.cpus_per_worker:g} reserve {training:g}, and the data pipeline needs at "
            f"least data.preprocess_cpus={need:g}; lower run.cpus_per_worker or run.num_workers, or add CPU "
            "nodes (the run would otherwise wait for data forever)")


def data_nodes_problem(nodes: list[dict], autoscaler_max: dict[str, float] | None, cfg: Config) -> str:
    """'' or why the data chain could never run with ``data.node_labels`` set: no live node carries
    the labels (or none with a CPU for one preprocessing task) and no autoscaler could add one.
    ``nodes`` is ``ray.nodes()``. With an autoscaler the labelled group may come up later (the
    chain waits, data.stall_timeout_s bounds it)."""
    labels = cfg.data.node_labels
    if not labels or autoscaler_max is not None:
        return ""
    matching = [n for n in nodes if n.get("Alive") and all(n.get("Labels", {}).get(k) == v for k, v in labels.items())]
    cpus = max((float(n.get("Resources", {}).get("CPU", 0.0)) for n in matching), default=0.0)
    if cpus >= cfg.data.preprocess_cpus:
        return ""
    wanted = ",".join(f"{k}={v}" for k, v in labels.items())
    found = f"{len(matching)} node(s) carry them, none with" if matching else "no node carries them, so none has"
    return (f"data.node_labels {labels}: {found} data.preprocess_cpus={cfg.data.preprocess_cpus:g} CPU free for the "
            f"data chain; start data nodes with `ray start --labels={wanted}` (the cpu-data group of cluster/*.yaml "
            "and KubeRay has them), or set data.node_labels={} (the run would otherwise wait for data forever)")

