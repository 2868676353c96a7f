"""Every check that must fail before any worker starts, in one line naming the input and the fix.

Called by ``fit`` (so a run started from Python is checked exactly as one started by the CLI) and by
sweeps before Tune starts: the model section against its family, storage reachable, the corpus and
its train split present, the noise set present, the fine-tuning source of a compatible family. What
can only be known while reading data (a corrupt shard, a bad transcript) is the Trainer's bad-input
accounting instead, and never stops the run on its own.
"""

from __future__ import annotations

from raytrain_speech import storage
from raytrain_speech.config import Config
from raytrain_speech.data import corpus
from raytrain_speech.models.registry import check_config
from raytrain_speech.storage import StorageError
from raytrain_speech.train.finetune import check_init_from


def check(cfg: Config) -> None:
    """Raise ConfigError / StorageError (one line each) for anything that would fail every worker."""
    check_config(cfg)
    if cfg.train.init_from:  # first: a checkpoint that cannot fit says so before any data is looked at
        check_init_from(cfg)
    storage.check_reachable(cfg.data.root, cfg.storage)
    storage.check_reachable(cfg.run.storage_path, cfg.storage)
    corpus.shard_uris(cfg.data.root, cfg.data.train_split, cfg.storage)
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
