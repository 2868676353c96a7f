"""The one Ray Data chain: shards in storage -> decoded, augmented, featurized, tokenized rows.

    check shard footers -> read_parquet(readable shard URIs, pyarrow filesystem) -> [drop consumed]
      (an indexed WebDataset split instead: one task per tar streaming it, consumed rows left out, wds.py)
      -> map_batches(Preprocessor: duration filter, decode, resample, speed + noise, [log-mel])
      -> (streaming_split by Train)

Training workers turn the rows into duration-bucketed batches themselves (``worker_batches``), so
the chain stays a plain row transform that Ray Data can stream, backpressure and parallelise.

Waveform augmentation is drawn from (seed, epoch, index), but a Ray Data task cannot know which epoch
of a dataset it is serving: Train re-executes the same dataset every epoch. ``EpochClock`` (a tiny
named actor per run) carries the epoch from rank 0 to the tasks; rank 0 sets it, behind a barrier,
before any rank starts the next epoch's iteration.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import ray
import ray.data
from ray.train import DataConfig as RayTrainDataConfig

from raytrain_speech import storage
from raytrain_speech.config import BatchingConfig
from raytrain_speech.data import shards, wds
from raytrain_speech.data.augment import WaveformAugmenter
from raytrain_speech.data.batching import Batch, batch_by_buckets, batch_by_duration, collate
from raytrain_speech.data.preprocess import Preprocessor, input_columns, to_utterances
from raytrain_speech.data.progress import drop_consumed
from raytrain_speech.storage import StorageError

if TYPE_CHECKING:
    from raytrain_speech.config import Config


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


def readable_shards(cfg: Config, split: str) -> tuple[list[str], list[shards.BadShard]]:
    """The split's shards that can be read, and those that cannot (skipped, counted as bad input)."""
    good, bad = shards.check_shards(cfg.data.root, split, cfg.storage)
    if not good:
        raise StorageError(f"{cfg.data.root}: no readable shard in split '{split}' "
                           f"({bad[0].uri}: {bad[0].reason}); re-run `raytrain-speech prepare` or fix data.root")
    return good, bad


def build_dataset(cfg: Config, split: str, consumed: np.ndarray | None = None) -> ray.data.Dataset:
    """The training chain for one split (lazy: nothing runs until a consumer iterates).

    ``consumed`` (a bitmap over the split's utterance indices) drops rows before they are decoded:
    that is how a resumed epoch skips what the checkpoint says was already trained on. Unreadable
    shards are left out here; the training workers count their utterances as bad input.
    """
    uris, _ = readable_shards(cfg, split)
    if wds.is_indexed(cfg.data.root, split, cfg.storage):  # WebDataset tars read in place
        ds = tar_dataset(cfg, uris, consumed, cfg.data.shuffle_blocks)
    else:
        ds = _parquet_dataset(cfg, uris, consumed)
    waveform_aug = cfg.augment.waveform_enabled
    recipe = {"features": cfg.features, "text": cfg.text, "augment": cfg.augment if waveform_aug else None,
              "frontend_on_worker": cfg.features.placement == "worker",
              "duration_range_s": (cfg.data.min_duration_s, cfg.data.max_duration_s), "storage": cfg.storage}
    clock = None
    if waveform_aug:
        clock = epoch_clock_name(cfg)
        epoch_clock(clock)  # exists before any task or worker asks for it
    ds.context.target_max_block_size = int(cfg.data.block_mb * 2**20)
    return ds.map_batches(
        _preprocess, fn_kwargs={"recipe": recipe, "seed": cfg.train.seed, "clock": clock},
        batch_size=cfg.data.preprocess_batch_rows, batch_format="numpy", num_cpus=cfg.data.preprocess_cpus,
    )


def _parquet_dataset(cfg: Config, uris: list[str], consumed: np.ndarray | None) -> ray.data.Dataset:
    fs, _ = storage.resolve(cfg.data.root, cfg.storage)
    paths = [storage.resolve(u, cfg.storage)[1] for u in uris]
    # Several blocks per shard: Train's unequal streaming split hands out whole blocks, so at the end
    # of an epoch one rank can hold up to a block more than the others and train alone with filler
    # steps on the rest; smaller blocks make that tail shorter.
    ds = ray.data.read_parquet(paths, filesystem=fs, override_num_blocks=len(paths) * cfg.data.blocks_per_shard)
    ds = ds.select_columns(input_columns(ds.schema().names))
    if cfg.data.shuffle_blocks:
        ds = ds.randomize_block_order()
    if consumed is not None and consumed.any():
        ds = ds.map_batches(drop_consumed, fn_kwargs={"consumed": consumed}, batch_format="numpy",
                            batch_size=None, num_cpus=0.25)
    return ds


def tar_dataset(cfg: Config, index_uris: list[str], consumed: np.ndarray | None = None,
                shuffle: bool = False) -> ray.data.Dataset:
    """An indexed WebDataset split (data/wds.py): one read task per tar, streaming it from storage and
    leaving out ``consumed`` indices before their audio is read (so no drop_consumed step after it)."""
    items = [{"index_uri": wds.absolute(u)} for u in index_uris]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    if shuffle:
        ds = ds.randomize_block_order()
    kwargs = {"storage_cfg": cfg.storage, "consumed": consumed if consumed is not None and consumed.any() else None,
              "rows_per_batch": cfg.data.preprocess_batch_rows}
    # Reading a tar is network-bound: half a CPU lets it overlap with the preprocessing tasks.
    return ds.map_batches(_read_tars, fn_kwargs=kwargs, batch_size=1, batch_format="numpy", num_cpus=0.5)


def _read_tars(batch: dict, storage_cfg, consumed: np.ndarray | None, rows_per_batch: int):
    """Ray Data task body: the rows of each tar named in the batch, a table of ``wds.ROW_SCHEMA`` at a time."""
    for uri in batch["index_uri"]:
        yield from wds.read_batches(str(uri), storage_cfg, consumed, rows_per_batch)


def decode_rows(cfg: Config, split: str, decoder_cls: type, decoder_kwargs: dict) -> list[dict]:
    """Evaluation on Ray Data: the split's shards -> ``map_batches(decoder_cls)`` on a pool of
    ``eval.actors`` model actors -> one output row per utterance, gathered on the driver.

    ``decoder_cls`` (evaluate/runner.py ``BatchDecoder``) loads the model once per actor; shards
    stream through the pool, so a test set of any size is decoded with only a few row batches in
    flight. Joins ``run.ray_address`` / $RAY_ADDRESS, or starts a local Ray sized to the pool.
    """
    import os

    if not ray.is_initialized():
        address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, logging_level="WARNING")
        else:
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(cfg.eval.actors * cfg.eval.actor_cpus) + 1),
                     object_store_memory=cfg.run.object_store_memory_mb * 2**20, include_dashboard=False,
                     logging_level="WARNING")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = ctx.print_on_execution_start = False  # one result line per test set instead
    uris = shards.shard_uris(cfg.data.root, split, cfg.storage)
    if wds.is_indexed(cfg.data.root, split, cfg.storage):
        ds = tar_dataset(cfg, uris)
    else:
        fs, _ = storage.resolve(cfg.data.root, cfg.storage)
        ds = ray.data.read_parquet([storage.resolve(u, cfg.storage)[1] for u in uris], filesystem=fs)
        ds = ds.select_columns(input_columns(ds.schema().names))
    gpus = {"num_gpus": cfg.eval.actor_gpus} if cfg.eval.actor_gpus else {}
    ds = ds.map_batches(
        decoder_cls, fn_constructor_kwargs=decoder_kwargs, batch_size=cfg.eval.actor_batch_rows,
        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=cfg.eval.actors),
        num_cpus=cfg.eval.actor_cpus, **gpus,
    )
    return [{k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()} for row in ds.iter_rows()]


_PREPROCESSORS: dict[str, Preprocessor] = {}


def make_preprocessor(recipe: dict) -> Preprocessor:
    """A training Preprocessor; loads the noise set (once per process) when noise is on."""
    augment = recipe["augment"]
    augmenter = None
    if augment is not None:
        clips = None
        if augment.noise_root is not None and augment.noise_prob > 0:
            from raytrain_speech.data.noise import load_noise_clips

            clips = load_noise_clips(augment.noise_root, recipe["storage"], split=augment.noise_split,
                                     max_clips=augment.noise_max_clips,
                                     sample_rate_hz=recipe["features"].sample_rate_hz)
        augmenter = WaveformAugmenter(augment, clips)
    return Preprocessor(recipe["features"], recipe["text"], augmenter, recipe["frontend_on_worker"],
                        recipe["duration_range_s"])


def _preprocess(batch: dict, recipe: dict, seed: int, clock: str | None) -> dict:
    """Ray Data task body; keeps one Preprocessor (mel filterbank, noise clips) per process and recipe."""
    key = repr(recipe)
    if key not in _PREPROCESSORS:
        import torch

        torch.set_num_threads(1)  # data tasks share the cores with training workers
        _PREPROCESSORS[key] = make_preprocessor(recipe)
    epoch = 0
    if clock is not None:
        epoch = ray.get(epoch_clock(clock).get.remote())
    out = _PREPROCESSORS[key](batch, seed, epoch)
    if "read_error" in batch:  # a tar's row that has no audio: say why, not just "empty audio bytes"
        out["error"] = np.asarray([r or e for r, e in zip(batch["read_error"], out["error"])], dtype=object)
    return out


def worker_batches(
    rows: Iterator[dict], max_padded_s: float, batching: BatchingConfig, seed: int,
    on_bad=None, boundaries_s: list[float] | None = None,
) -> Iterator[Batch]:
    """Row batches from a dataset shard -> padded training batches bounded by audio seconds.

    ``on_bad(index, id, reason)`` is called for every row the preprocessor rejected; with
    ``boundaries_s`` (duration quantiles of the split) batches are cut per duration bucket, else
    from a sorted window.
    """

    def utterances():
        for rb in rows:
            good, bad = to_utterances(rb)
            for index, utt_id, reason in bad:
                if on_bad is not None:
                    on_bad(index, utt_id, reason)
            yield from good

    if boundaries_s:
        groups = batch_by_buckets(utterances(), boundaries_s, max_padded_s, batching, seed=seed)
    else:
        groups = batch_by_duration(utterances(), max_padded_s, batching, seed=seed)
    for group in groups:
        yield collate(group)


class UnequalSplitDataConfig(RayTrainDataConfig):
    """Ray Train's DataConfig splits with ``equal=True``, which drops up to world_size-1 rows per epoch.

    Exactly-once needs every row, so this splits with ``equal=False``; the training loop's lockstep
    (filler micro-steps on ranks that run dry first) absorbs the uneven row counts.
    """

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            if ds.name is None:
                ds.set_name(name)
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options(name)
            hints = worker_node_ids if getattr(self, "_enable_shard_locality", False) else None
            for i, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=hints)):
                output[i][name] = split
        return output
