"""The Trainer on the local backend (no Ray, no cluster): exactly-once across a resume, lockstep with
fillers on uneven ranks under gradient accumulation, validation and early stopping, bad-input
accounting and the max-bad-fraction stop, checkpoint retention.

Real parts throughout: a synthesized espeak-ng corpus, the real Trainer, LocalRuntime, preprocessing,
checkpoints and run records; the two-rank test runs two processes joined by a gloo process group.
"""

from __future__ import annotations

import datetime
import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raytrain_speech.data import shards
from raytrain_speech.data.badinput import BAD_INPUTS_FILE, read_bad_inputs
from raytrain_speech.data.synth import synthesize
from raytrain_speech.train import checkpoint
from raytrain_speech.train.fit import TrainingFailed, fit
from raytrain_speech.train.local import LocalRuntime
from raytrain_speech.train.metrics import METRICS_FILE, read_metrics
from raytrain_speech.train.trainer import Trainer
from tests.conftest import tiny_config
from tests.integration.audit import assert_exactly_once, assert_no_stale_rows, read_attempts

FAST = {"run.backend": "local", "train.global_batch_audio_s": 30, "train.log_every_steps": 2,
        "train.checkpoint_every_steps": 4, "optim.warmup_steps": 4}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[str, int]:
    root = str(tmp_path_factory.mktemp("trainer") / "corpus")
    manifest = synthesize(tiny_config().synth, root, log=lambda s: None)
    return root, manifest.splits["train"].num_utterances


def _cfg(tmp_path, root: str, **overrides):
    return tiny_config(**{**FAST, "data.root": root, "run.storage_path": str(tmp_path / "runs"),
                          "run.name": "t", "train.trained_log_dir": str(tmp_path / "trained"), **overrides})


def test_a_resumed_local_run_trains_every_utterance_of_the_epoch_exactly_once(tmp_path, corpus):
    root, n_train = corpus
    first = fit(_cfg(tmp_path, root, **{"train.max_steps": 6, "train.checkpoint_every_steps": 3}), progress=False)
    run = tmp_path / "runs" / "t"
    assert first.metrics["step"] == 6 and first.checkpoint_uri == str(run / "checkpoint_step00000006")
    assert [e["dir"] for e in checkpoint.read_local_record(str(run))] == ["checkpoint_step00000003",
                                                                            "checkpoint_step00000006"]
    second = fit(_cfg(tmp_path, root, **{"train.max_steps": 24, "train.checkpoint_every_steps": 3}), progress=False)
    assert second.metrics["step"] == 24 and second.metrics["epoch"] >= 1  # past the end of epoch 0
    attempts = assert_exactly_once(str(tmp_path / "trained"), n_train, final_step=24, complete_epochs=1)
    assert [a["restored_step"] for a in attempts] == [0, 6]
    assert_no_stale_rows(read_metrics(str(run / METRICS_FILE)))
    kept = [e["dir"] for e in checkpoint.read_local_record(str(run))]
    assert kept == ["checkpoint_step00000021", "checkpoint_step00000024"]  # run.checkpoints_to_keep: 2
    assert sorted(p.name for p in run.glob("checkpoint_step*")) == kept  # the others are deleted
    card = json.loads((run / "run_card.json").read_text())
    assert card["backend"] == "local" and card["restarts_survived"] == 1 and card["final"]["step"] == 24


def test_validation_runs_at_its_cadence_and_early_stopping_ends_the_run(tmp_path, corpus):
    root, _ = corpus
    cfg = _cfg(tmp_path, root, **{"train.max_steps": 40, "train.validate_every_steps": 2,
                                  "train.early_stop_patience": 2, "train.early_stop_min_delta": 100.0})
    out = fit(cfg, progress=False)
    metrics = read_metrics(str(tmp_path / "runs" / "t" / METRICS_FILE))
    validated = [m for m in metrics if "valid_loss" in m]
    assert [m["step"] for m in validated] == [2, 4, 6]  # best at 2, then two without a 100-point gain
    assert all(0 <= m["valid_wer"] and np.isfinite(m["valid_loss"]) for m in validated)
    assert out.metrics["stopped_early"] and out.metrics["step"] == 6 and metrics[-1]["checkpoint"]
    payload, _ = checkpoint.read_checkpoint(out.checkpoint_uri)
    assert payload["train_state"]["bad_validations"] == 2 and payload["train_state"]["stopped_early"]


def _corrupt(root: str, ids: list[int]) -> list[str]:
    """Overwrite the audio of the utterances with these indices by bytes no decoder reads."""
    manifest = shards.read_manifest(root)
    names = []
    for rel in manifest.splits["train"].shards:
        rows = shards.read_shard(os.path.join(root, rel)).to_pylist()
        for r in rows:
            if r["index"] in ids:
                r["audio"] = b"\x00\x01 not audio"
                names.append(r["id"])
        shards.write_shard(root, rel, shards.rows_to_table(rows))
    return names


def test_bad_input_is_listed_counted_as_consumed_and_too_much_stops_the_run(tmp_path):
    root = str(tmp_path / "corpus")
    manifest = synthesize(tiny_config().synth, root, log=lambda s: None)
    n_train = manifest.splits["train"].num_utterances
    bad_ids = _corrupt(root, [3, 50, 100])
    out = fit(_cfg(tmp_path, root, **{"train.max_steps": 200, "train.max_epochs": 1}), progress=False)
    records = read_bad_inputs(str(tmp_path / "runs" / "t" / BAD_INPUTS_FILE))
    assert sorted(r["id"] for r in records) == sorted(bad_ids)
    assert all("cannot decode audio" in r["reason"] for r in records)
    assert out.metrics["bad_utterances"] == 3 and "cannot decode audio 3" in out.bad_input_summary
    trained = {i for a in read_attempts(str(tmp_path / "trained")) for s in a["steps"].values() for i in s["indices"]}
    assert trained == set(range(n_train)) - {3, 50, 100}  # every good utterance, once the epoch is done
    strict = _cfg(tmp_path, root, **{"run.name": "strict", "train.max_steps": 200, "data.max_bad_fraction": 0.001,
                                     "data.bad_fraction_min_utterances": 10})
    with pytest.raises(TrainingFailed, match="too much bad input: 3 of .* data.max_bad_fraction=0.001"):
        fit(strict, progress=False)


class _RankedLocalRuntime(LocalRuntime):
    """LocalRuntime as one of several ranks of a gloo group: DDP, and a deliberately uneven share of the
    shards (rank 0 reads all but the last shard, rank 1 only the last, the smallest)."""

    def __init__(self, cfg, rank: int, world: int):
        super().__init__(cfg)
        self.rank, self.world_size = rank, world

    def prepare_model(self, model):
        return torch.nn.parallel.DistributedDataParallel(model.to(self.device))

    def epoch_shards(self):
        uris = sorted(super().epoch_shards())
        return uris[-1:] if self.rank == 1 else uris[:-1]

    def report(self, metrics, ckpt):
        if self.rank == 0:
            super().report(metrics, ckpt)


def _rank_main(rank: int, world: int, port: int, cfg_dict: dict) -> None:
    from raytrain_speech.config import Config

    # A short collective timeout: a rank left waiting in a collective (the hang lockstep prevents) fails the test.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        cfg = Config.from_dict(cfg_dict)
        torch.set_num_threads(1)
        Trainer(cfg, _RankedLocalRuntime(cfg, rank, world)).run()
    finally:
        dist.destroy_process_group()


def test_two_uneven_ranks_step_in_lockstep_with_fillers_and_accumulation(tmp_path, corpus):
    root, n_train = corpus
    cfg = _cfg(tmp_path, root, **{"train.max_steps": 1000, "train.max_epochs": 1, "train.micro_batch_audio_s": 8,
                                  "train.global_batch_audio_s": 32})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank_main, args=(2, port, cfg.to_dict()), nprocs=2, start_method="spawn")
    attempts = read_attempts(str(tmp_path / "trained"))
    assert len(attempts) == 1 and attempts[0]["world_size"] == 2 and attempts[0]["grad_accum"] == 2
    # Every step was taken by both ranks (the audit asserts each step was logged by every rank), the epoch
    # covered every utterance exactly once, though rank 1 held one shard and ran dry long before rank 0.
    steps = assert_exactly_once(str(tmp_path / "trained"), n_train, final_step=max(attempts[0]["steps"]),
                                complete_epochs=1, last_epoch_complete=True)[0]["steps"]
    metrics = read_metrics(str(tmp_path / "runs" / "t" / METRICS_FILE))
    assert metrics[-1]["checkpoint"] and metrics[-1]["grad_accum"] == 2 and metrics[-1]["world_size"] == 2
    assert sum(len(s["indices"]) for s in steps.values()) == n_train
