"""The one Ray Data chain: shards in storage -> decoded, augmented, featurized, tokenized rows.

    check shard footers -> one task per piece of a readable shard, reading it row group by row group
      (consumed rows left out, corrupt row groups and misplaced indices as named rows:
      corpus.parquet_row_tables) and preprocessing each row batch as it is read
      (preprocess_training_rows: duration filter, decode, resample, speed + noise, [log-mel])
      (an indexed WebDataset split instead: one such task per tar streaming it, tars.py)
      -> (streaming_split by Train)

The map is ``data.preprocess.preprocess_training_rows``, the same function the local backend calls in
its own process, so the two backends cannot disagree on what a training row is. Training workers
turn the rows into duration-bucketed batches themselves (``preprocess.worker_batches``), so the chain
stays a plain row transform that Ray Data can stream, backpressure and parallelise.

Waveform augmentation is drawn from (seed, epoch, index), but a Ray Data task cannot know which epoch
of a dataset it is serving: Train re-executes the same dataset every epoch. ``EpochClock`` (a tiny
named actor per run) carries the epoch from rank 0 to the tasks; rank 0 sets it, behind a barrier,
before any rank starts the next epoch's iteration.
"""

from __future__ import annotations

import hashlib

import numpy as np
import ray
import ray.data

from raytrain_speech.config import Config
from raytrain_speech.data import corpus, mixture, shards, tars
from raytrain_speech.data.preprocess import TrainingRecipe, preprocess_training_rows

CLOCK_NAMESPACE = "raytrain_speech"


@ray.remote(num_cpus=0, max_restarts=-1)
class EpochClock:
    """The epoch a run's training workers are on, for the waveform augmentation inside Ray Data."""

    def __init__(self):
        self.epoch = 0

    def set(self, epoch: int) -> None:
        self.epoch = epoch

    def get(self) -> int:
        return self.epoch


def needs_epoch_clock(cfg: Config) -> bool:
    """Whether the chain's tasks need the epoch: for waveform augmentation, and for a mixture of
    corpora (data.sources), whose epochs differ in which utterances they read."""
    return cfg.augment.waveform_enabled or bool(cfg.data.sources)


def epoch_clock_name(cfg: Config) -> str:
    """One clock per run (run name + storage), so concurrent runs and sweep trials never share one."""
    key = hashlib.sha256(f"{cfg.run.storage_path}/{cfg.run.name}".encode()).hexdigest()[:16]
    return f"epoch-clock-{key}"


_CLOCK_HANDLES: dict[tuple[str, str], object] = {}


def epoch_clock(name: str):
    """The run's clock actor, created by whoever asks first. The handle is kept for the life of this
    process (the Train controller, a worker): Ray garbage-collects an actor, named or not, once no
    handle to it is left."""
    key = (name, ray.get_runtime_context().get_node_id())  # a process may see several clusters (tests)
    if key not in _CLOCK_HANDLES:
        _CLOCK_HANDLES[key] = EpochClock.options(name=name, namespace=CLOCK_NAMESPACE, get_if_exists=True).remote()
    return _CLOCK_HANDLES[key]


def build_dataset(cfg: Config, split: str, consumed: np.ndarray | None = None) -> ray.data.Dataset:
    """The training chain for one split (lazy: nothing runs until a consumer iterates).

    ``consumed`` (a bitmap over the split's utterance indices) drops rows before they are decoded:
    that is how a resumed epoch skips what the checkpoint says was already trained on. Unreadable
    shards are left out here; the training workers count their utterances as bad input.

    One task reads its items (a piece of a shard, or a tar) and preprocesses their rows, a row batch
    at a time: no hop through the object store between reading and preprocessing, and as many tasks
    to spread over the cores as there are items. (A read operator followed by a preprocessing one
    gave Ray Data 3 preprocessing tasks for a 0.25 h pass, so one of 2 cores did two thirds of the
    work; docs/LOG.md, 2026-12-03.)
    """
    clock = None
    if needs_epoch_clock(cfg):
        clock = epoch_clock_name(cfg)
        epoch_clock(clock)  # exists before any task or worker asks for it
    kwargs = {"read": _read_kwargs(cfg, consumed), "recipe": TrainingRecipe.from_config(cfg),
              "seed": cfg.train.seed, "clock": clock}
    if cfg.data.sources:  # a mixture: every source's shards, read once here for the tasks' plans
        mix = mixture.build_mixture(cfg)
        items = mix.items(cfg.data.blocks_per_shard)
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.randomize_block_order() if cfg.data.shuffle_blocks else ds
        fn, kwargs = _mixture_read_and_preprocess, {**kwargs, "mix": mix}
    else:
        uris, _ = corpus.readable_shards(cfg.data.root, split, cfg.storage)
        ds, fn = _items_dataset(cfg, split, uris, cfg.data.shuffle_blocks), _read_and_preprocess
    ds.context.target_max_block_size = int(cfg.data.block_mb * 2**20)
    return ds.map_batches(fn, fn_kwargs=kwargs, batch_size=1, batch_format="numpy", num_cpus=cfg.data.preprocess_cpus,
                          label_selector=cfg.data.node_labels or None)


def source_dataset(cfg: Config, split: str, uris: list[str], consumed: np.ndarray | None = None,
                   shuffle: bool = False) -> ray.data.Dataset:
    """The raw rows (the preprocessing's input columns) of the split's shards ``uris`` as a Dataset,
    consumed rows left out (evaluation maps its decoder actors over it)."""
    # Reading is storage-bound: half a CPU lets it overlap with the tasks that use its rows.
    return _items_dataset(cfg, split, uris, shuffle).map_batches(
        _read_items, fn_kwargs=_read_kwargs(cfg, consumed), batch_size=1, batch_format="numpy", num_cpus=0.5,
        label_selector=cfg.data.node_labels or None)


def _items_dataset(cfg: Config, split: str, uris: list[str], shuffle: bool) -> ray.data.Dataset:
    """What the read tasks are handed, one block per item: pieces of the readable Parquet shards
    (``data.blocks_per_shard`` runs of contiguous row groups each), or indexed tars (one item each).

    Parquet shards are read by our own tasks (``corpus.parquet_row_tables``), not ``read_parquet``: row
    group by row group, so a corrupt page costs its row group's rows (named bad input) instead of a
    task that fails on every retry; indices checked against the manifest; the shard list from the
    manifest, so no pass lists files. Several pieces per shard, because Train's unequal streaming
    split hands out whole blocks: at the end of an epoch one rank can hold up to a block more than the
    others and train alone with filler steps; smaller pieces make that tail shorter. A tar is streamed
    from storage by one task, consumed indices left out before their audio is read."""
    uris, _ = corpus.readable_shards(cfg.data.root, split, cfg.storage)
    if tars.is_indexed(cfg.data.root, split, cfg.storage):
        items = [{"index_uri": shards.absolute(u)} for u in uris]
    else:
        firsts = corpus.first_index_of(cfg.data.root, split, cfg.storage)
        items = [{"uri": shards.absolute(u), "first_index": firsts[u], "piece": k}
                 for u in uris for k in range(cfg.data.blocks_per_shard)]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    return ds.randomize_block_order() if shuffle else ds


def _read_kwargs(cfg: Config, consumed: np.ndarray | None) -> dict:
    return {"storage_cfg": cfg.storage, "consumed": consumed if consumed is not None and consumed.any() else None,
            "rows_per_batch": cfg.data.preprocess_batch_rows, "pieces": cfg.data.blocks_per_shard}


def _read_items(items: dict, storage_cfg, consumed: np.ndarray | None, rows_per_batch: int, pieces: int):
    """Ray Data task body: the raw rows of the shard pieces (or tars) named in ``items``, as tables."""
    if "index_uri" in items:
        for uri in items["index_uri"]:
            yield from tars.read_batches(str(uri), storage_cfg, consumed, rows_per_batch)
        return
    for uri, first, piece in zip(items["uri"], items["first_index"], items["piece"]):
        yield from corpus.parquet_row_tables(str(uri), int(first), storage_cfg, consumed, rows_per_batch,
                                             int(piece), pieces)


def _read_and_preprocess(items: dict, read: dict, recipe: TrainingRecipe, seed: int, clock: str | None):
    """Ray Data task body: the training rows of the shard pieces (or tars) named in ``items``, at the
    epoch the run's clock says (asked once per task: a task belongs to one epoch's execution)."""
    epoch = None
    for table in _read_items(items, **read):
        if epoch is None:
            epoch = ray.get(epoch_clock(clock).get.remote()) if clock is not None else 0
        yield _preprocess_rows(corpus.numpy_batch(table), recipe, seed, epoch)


def _mixture_read_and_preprocess(items: dict, read: dict, recipe: TrainingRecipe, seed: int, clock: str,
                                 mix: mixture.Mixture):
    """Ray Data task body for a mixture: the epoch first (it says which rows to read), then the
    item's rows once per occurrence left to train (data/mixture.py)."""
    epoch = ray.get(epoch_clock(clock).get.remote())
    for k in range(len(items["source"])):
        item = {key: items[key][k] for key in items}
        for batch in mixture.item_batches(mix, item, epoch, read["consumed"], read["rows_per_batch"], read["pieces"]):
            yield _preprocess_rows(batch, recipe, seed, epoch)


_THREADS_SET = False


def _preprocess_rows(batch: dict, recipe: TrainingRecipe, seed: int, epoch: int) -> dict:
    """The training rows of a raw row batch, in a Ray Data task (one torch thread)."""
    global _THREADS_SET
    if not _THREADS_SET:
        import torch

        torch.set_num_threads(1)  # data tasks share the cores with the training workers
        _THREADS_SET = True
    return preprocess_training_rows(batch, recipe, seed, epoch)


def _shard_transcripts(row: dict, storage_cfg, normalizer: str) -> list[dict]:
    from raytrain_speech.data.normalize import normalize

    texts = shards.read_column(row["uri"], "text", storage_cfg).to_pylist()
    return [{"text": t} for t in (normalize(x or "", normalizer) for x in texts) if t]


def transcripts_on_ray(root: str, split: str, storage_cfg, normalizer: str):
    """A split's normalised transcripts read by Ray Data tasks, one per shard (the text column only,
    never the audio), streamed back in order: for tokenizers learned from large corpora."""
    uris = corpus.shard_uris(root, split, storage_cfg)
    ds = ray.data.from_items([{"uri": u} for u in uris], override_num_blocks=max(1, len(uris)))
    ds = ds.flat_map(_shard_transcripts, fn_kwargs={"storage_cfg": storage_cfg, "normalizer": normalizer})
    for batch in ds.iter_batches(batch_size=4096, batch_format="pyarrow"):
        yield from batch.column("text").to_pylist()
