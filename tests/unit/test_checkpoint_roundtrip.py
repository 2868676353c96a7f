"""Checkpoint round trip: every piece of training state is bit-equal after save -> restore, and the step
after a restore is bit-equal to the step the uninterrupted run takes (no Ray: the local backend, and
two ranks of a gloo group under DDP).

"State" is everything the next optimizer step reads: the model's state_dict (weights and BatchNorm
statistics), the optimizer's moments and step counts and its param groups (the LR of the last step),
the AMP grad scaler (fp16; on CPU too), the EMA shadow, torch's CPU RNG (dropout), the TrainState
counters, the LR the schedule gives the next step (a pure function of the step: optim.lr_at) and the
data cursor (epoch and consumed bitmap). numpy's and Python's global generators are not checkpointed
and need not be: the training path draws only from seeded generators (seeding.py), which
``test_training_leaves_the_global_numpy_and_python_generators_alone`` checks. Equality is of bits
(``-0.0`` differs from ``0.0``), never a tolerance.

Restore points: the Trainer checkpoints only at optimizer-step boundaries (``Trainer._after_step``,
after ``Stepper.step`` has consumed all ``grad_accum`` micro-batches and set every gradient to None),
so there is no mid-accumulation restore point to test; the fp32 and two-rank runs here accumulate (4
and 2 micro-batches per step) and ``test_checkpoints_are_taken_only_at_optimizer_step_boundaries``
asserts that no partial gradient exists when one is written or after it is restored.

The resumed step is fed the same micro-batches as the uninterrupted one: a resumed epoch re-batches the
utterances the cursor has not consumed, so the two runs see the same data but not in the same batches
(exactly once is promised, not the same batch order); what is checked is that the saved state is
complete, i.e. that the same input gives the same update.
"""

from __future__ import annotations

import copy
import datetime
import os
import random
import socket
import struct
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raytrain_speech.data.synth import synthesize
from raytrain_speech.train import checkpoint, collectives
from raytrain_speech.train.local import LocalRuntime
from raytrain_speech.train.metrics import METRICS_FILE, read_metrics
from raytrain_speech.train.optim import lr_at
from raytrain_speech.train.step import unwrap
from raytrain_speech.train.trainer import Trainer
from tests.conftest import tiny_config
from tests.unit.test_trainer import _RankedLocalRuntime

CKPT_STEP = 3
"""The checkpoint the local runs restore (train.checkpoint_every_steps); the runs go on to step 4."""
SETTINGS = {
    # fp32 (this box's ``auto``) with 4 micro-batches per step; fp16 autocast with the dynamic loss
    # scaler (emulated on a CPU, ~10x slower: one small micro-batch per step).
    "fp32": {"step.precision": "fp32", "train.global_batch_audio_s": 32, "train.micro_batch_audio_s": 8},
    "fp16": {"step.precision": "fp16", "train.global_batch_audio_s": 2},
}
DESIGNED_DIFFERENCES = ("state.attempts", "state.world_sizes", "state.bad_utterances",
                        "state.filtered_utterances", "state.train_wall_s")
"""TrainState fields a restored Trainer does not take from its live predecessor by design: a restore
is one more attempt (at its world size), and the bad/filtered counts are the run's totals the
checkpoint's report synced (the live fields count only earlier attempts)."""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("roundtrip") / "corpus")
    synthesize(tiny_config().synth, root, log=lambda s: None)
    return root


def _cfg(root: str, runs: str, **overrides):
    return tiny_config(**{"run.backend": "local", "data.root": root, "run.storage_path": runs,
                          "run.name": "t",
                          "train.max_steps": 50, "train.checkpoint_every_steps": CKPT_STEP,
                          "train.log_every_steps": 1000, "optim.warmup_steps": 2, "step.ema_decay": 0.9,
                          "step.grad_clip_norm": 1.0, **overrides})


# -- capture and compare --------------------------------------------------------------------------------


def capture(tr: Trainer) -> dict:
    """Every piece of state the next step reads, flattened to key -> tensor / array / plain value
    (copies: the trainer may go on training). torch's RNG is the process's, read now."""
    s, plain = tr.stepper, unwrap(tr.stepper.model)
    out: dict = {f"model.{k}": v.detach().clone() for k, v in plain.state_dict().items()}
    out.update({f"grad.{n}": None if p.grad is None else p.grad.clone() for n, p in plain.named_parameters()})
    opt = s.optimizer.state_dict()
    for i, per_param in opt["state"].items():
        out.update({f"optim.state.{i}.{k}": copy.deepcopy(v) for k, v in per_param.items()})
    for i, group in enumerate(opt["param_groups"]):
        out.update({f"optim.group.{i}.{k}": copy.deepcopy(v) for k, v in group.items()})
    out["scaler.enabled"] = s.scaler.is_enabled()
    out.update({f"scaler.{k}": v for k, v in s.scaler.state_dict().items()})
    out["ema.decay"] = s.ema.decay
    out.update({f"ema.{k}": v.clone() for k, v in s.ema.shadow.items()})
    out["rng.torch"] = torch.get_rng_state()
    out.update({f"state.{k}": copy.deepcopy(v) for k, v in asdict(tr.state).items()})
    out["lr.next_step"] = lr_at(tr.state.step, tr.tc.max_steps, tr.cfg.optim)
    out.update({"cursor.epoch": tr.cursor.epoch, "cursor.num_utterances": tr.cursor.num_utterances,
                "cursor.consumed": tr.cursor.consumed.copy(), "accum": tr.accum,
                "micro_budget_s": tr.micro_budget_s})
    return out


def _differs(a, b) -> str:
    """'' when ``a`` and ``b`` are bit-equal (same type, dtype, shape and bytes), else how they differ."""
    if type(a) is not type(b):
        return f"type {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"{a.dtype}{tuple(a.shape)} != {b.dtype}{tuple(b.shape)}"
        bits_a, bits_b = (t.detach().cpu().reshape(-1).view(torch.uint8) for t in (a, b))
        return "" if torch.equal(bits_a, bits_b) else "bits differ"
    if isinstance(a, np.ndarray):
        same = a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
        return "" if same else "array differs"
    if isinstance(a, float):
        return "" if struct.pack("<d", a) == struct.pack("<d", b) else f"{a!r} != {b!r}"
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return f"length {len(a)} != {len(b)}"
        return next((f"[{i}] {d}" for i, (x, y) in enumerate(zip(a, b)) if (d := _differs(x, y))), "")
    if isinstance(a, dict):
        if a.keys() != b.keys():
            return f"keys {sorted(a)} != {sorted(b)}"
        return next((f"[{k!r}] {d}" for k in a if (d := _differs(a[k], b[k]))), "")
    return "" if a == b else f"{a!r} != {b!r}"


def assert_bit_equal(expected: dict, actual: dict) -> None:
    """Raise naming every key whose value is not bit-equal (or is missing on one side)."""
    problems = [f"{k}: only in expected" for k in expected if k not in actual]
    problems += [f"{k}: only in actual" for k in actual if k not in expected]
    problems += [f"{k}: {d}" for k in expected if k in actual and (d := _differs(expected[k], actual[k]))]
    if problems:
        raise AssertionError(f"{len(problems)} piece(s) of state differ: " + "; ".join(problems[:12]))


def as_restored(live: dict, checkpoint_report: dict, world: int) -> dict:
    """What a Trainer restored from the checkpoint ``live`` was saved at holds (DESIGNED_DIFFERENCES)."""
    return {**live, "state.attempts": live["state.attempts"] + 1,
            "state.world_sizes": [*live["state.world_sizes"], world],
            "state.bad_utterances": checkpoint_report["bad_utterances"],
            "state.filtered_utterances": checkpoint_report["filtered_utterances"],
            # Wall time is measured, not state: the checkpoint holds rank 0's at the report, while the
            # live trainer's clock ran on through the report itself.
            "state.train_wall_s": checkpoint_report["train_wall_s"]}


def _report_at(run: str, step: int) -> dict:
    reports = read_metrics(os.path.join(run, METRICS_FILE))
    return next(m for m in reports if m["checkpoint"] and m["step"] == step)


# -- driving the real loop ----------------------------------------------------------------------------


def _train_to_checkpoint(tr: Trainer, steps: int):
    """The first epoch's loop of ``Trainer.run`` for ``steps`` steps (the last one checkpoints through the
    runtime's real report); returns the open batch stream, positioned at the next step's micro-batches."""
    tr._start_epoch()
    stream = collectives.lockstep(tr._epoch_batches(None), tr.accum, tr.device, tr.objective.units)
    for _ in range(steps):
        tr._step(*next(stream))
    assert tr.last_ckpt_step == steps, "the run was meant to checkpoint at its last step"
    return stream


def _step_both(live: Trainer, restored: Trainer, group, totals, live_rng: torch.Tensor) -> None:
    """One more step of each, from the same micro-batches: the restored Trainer with the RNG its
    checkpoint restored, the live one with the RNG the process had when the checkpoint was written."""
    restored._step(copy.deepcopy(group), list(totals))
    torch.set_rng_state(live_rng)
    live._step(copy.deepcopy(group), list(totals))


@pytest.fixture(scope="module", params=sorted(SETTINGS))
def local_run(request, corpus, tmp_path_factory) -> dict:
    """A local run checkpointed at CKPT_STEP, a fresh Trainer restored from it, and both after one more
    step: captures of each (``live``, ``restored``, ``live_next``, ``restored_next``)."""
    torch.set_num_threads(1)
    runs = str(tmp_path_factory.mktemp(f"runs_{request.param}"))
    cfg = _cfg(corpus, runs, **SETTINGS[request.param])
    global_rngs = (np.random.get_state(), random.getstate())
    live = Trainer(cfg, LocalRuntime(cfg))
    stream = _train_to_checkpoint(live, CKPT_STEP)
    group, totals = next(stream)  # the micro-batches of the step after the checkpoint
    stream.close()
    out = {"precision": request.param, "world": 1, "live": capture(live),
           "global_rngs": (global_rngs, (np.random.get_state(), random.getstate()))}
    restored = Trainer(cfg, LocalRuntime(cfg))
    out["restored"] = capture(restored)
    _step_both(live, restored, group, totals, out["live"]["rng.torch"])
    out.update(live_next=capture(live), restored_next=capture(restored),
               report=_report_at(os.path.join(runs, "t"), CKPT_STEP),
               committed=[e["dir"] for e in checkpoint.read_local_record(os.path.join(runs, "t"))])
    return out


# -- the local backend ----------------------------------------------------------------------------------


def test_a_restored_trainer_holds_every_piece_of_state_bit_equal(local_run):
    live, restored = local_run["live"], local_run["restored"]
    assert_bit_equal(as_restored(live, local_run["report"], 1), restored)
    # The comparison covered what it claims: an EMA, optimizer moments, and in fp16 a scaler that has moved.
    assert any(k.startswith("ema.") for k in live) and live["state.step"] == CKPT_STEP
    moments = {k.rsplit(".", 1)[1] for k in live if k.startswith("optim.state.")}
    assert {"exp_avg", "exp_avg_sq", "step"} <= moments
    assert live["cursor.consumed"].any() and not live["cursor.consumed"].all()
    if local_run["precision"] == "fp16":
        # Moved: a step counted toward growth, or the scale itself changed (an overflow halves it and
        # resets the tracker to 0).
        moved = live["scaler._growth_tracker"] > 0 or live["scaler.scale"] != 2.0**16
        assert live["scaler.enabled"] and moved, {k: v for k, v in live.items() if k.startswith("scaler.")}


def test_the_step_after_a_restore_is_bit_equal_to_the_uninterrupted_one(local_run):
    live, live_next, restored_next = local_run["live"], local_run["live_next"], local_run["restored_next"]
    expected = as_restored(live_next, local_run["report"], 1)
    # Wall-clock time trained is the one counter that may not agree: it is time.
    expected["state.train_wall_s"] = restored_next["state.train_wall_s"]
    assert_bit_equal(expected, restored_next)
    assert live_next["state.step"] == CKPT_STEP + 1
    changed = [k for k in live if k.startswith("model.") and _differs(live[k], live_next[k])]
    assert changed, "the step changed no weight: the comparison would prove nothing"


def test_checkpoints_are_taken_only_at_optimizer_step_boundaries(local_run):
    """The Trainer has no mid-accumulation restore point: a checkpoint is written after the step's
    ``grad_accum`` micro-batches were all applied, when no partial gradient exists to save."""
    live, restored = local_run["live"], local_run["restored"]
    assert live["accum"] == (4 if local_run["precision"] == "fp32" else 1)
    assert local_run["committed"] == [checkpoint.dir_name(CKPT_STEP)]
    grads = [k for k in live if k.startswith("grad.")]
    assert grads and all(live[k] is None and restored[k] is None for k in grads)


def test_the_comparison_detects_a_one_ulp_change(local_run):
    restored = local_run["restored"]
    expected = as_restored(local_run["live"], local_run["report"], 1)
    assert_bit_equal(expected, restored)
    moment = next(k for k in restored if k.endswith(".exp_avg_sq"))
    weight = next(k for k in restored if k.startswith("model.") and restored[k].is_floating_point())

    def one_ulp_up(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        flat = t.view(-1)
        flat[0] = torch.nextafter(flat[0], torch.tensor(float("inf"), dtype=t.dtype))
        return t

    def flip_first_unconsumed(bitmap: np.ndarray) -> np.ndarray:
        bitmap = bitmap.copy()
        bitmap[np.flatnonzero(~bitmap)[0]] = True
        return bitmap

    signed_zero = torch.zeros(3)
    perturbations = {
        moment: one_ulp_up(restored[moment]),
        weight: one_ulp_up(restored[weight]),
        "rng.torch": torch.cat([restored["rng.torch"][:-1], restored["rng.torch"][-1:] ^ 1]),
        "cursor.consumed": flip_first_unconsumed(restored["cursor.consumed"]),
        "state.step": restored["state.step"] + 1,
        "lr.next_step": float(np.nextafter(restored["lr.next_step"], 1.0)),
        "state.world_sizes": [*restored["state.world_sizes"], 1],
    }
    for key, value in perturbations.items():
        with pytest.raises(AssertionError, match=rf"{key}: "):
            assert_bit_equal(expected, {**restored, key: value})
    with pytest.raises(AssertionError, match="bits differ"):  # equal values, different bits
        assert_bit_equal({"z": signed_zero}, {"z": -signed_zero})
    with pytest.raises(AssertionError, match="rng.torch: only in expected"):
        assert_bit_equal(expected, {k: v for k, v in restored.items() if k != "rng.torch"})


def test_training_leaves_the_global_numpy_and_python_generators_alone(local_run):
    """Why the checkpoint holds only torch's RNG: the global numpy and Python generators are never
    drawn from while training (batching, augmentation and shard order use seeded generators)."""
    (np_before, py_before), (np_after, py_after) = local_run["global_rngs"]
    assert not _differs(list(np_before), list(np_after)) and py_before == py_after


# -- two ranks (gloo, DDP) ------------------------------------------------------------------------------


class _RankRuntime(_RankedLocalRuntime):
    """test_trainer's gloo rank (DDP, rank 0 reports, as Ray's does) with an even share: every other shard."""

    def epoch_shards(self):
        return sorted(LocalRuntime.epoch_shards(self))[self.rank::self.world_size]


DDP_CKPT_STEP = 2


def _rank_main(rank: int, world: int, port: int, cfg_dict: dict, out_dir: str) -> None:
    from raytrain_speech.config import Config

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        cfg = Config.from_dict(cfg_dict)
        live = Trainer(cfg, _RankRuntime(cfg, rank, world))
        stream = _train_to_checkpoint(live, DDP_CKPT_STEP)
        group, totals = next(stream)
        stream.close()
        out = {"live": capture(live)}
        dist.barrier()  # rank 0 has committed the checkpoint (Ray's report is a barrier too)
        restored = Trainer(cfg, _RankRuntime(cfg, rank, world))
        out["restored"] = capture(restored)
        _step_both(live, restored, group, totals, out["live"]["rng.torch"])
        out.update(live_next=capture(live), restored_next=capture(restored))
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_run(corpus, tmp_path_factory) -> dict:
    runs = tmp_path_factory.mktemp("runs_ddp")
    cfg = _cfg(corpus, str(runs), **{"train.checkpoint_every_steps": DDP_CKPT_STEP, "step.precision": "fp32",
                                     "train.global_batch_audio_s": 16, "train.micro_batch_audio_s": 4})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank_main, args=(2, port, cfg.to_dict(), str(runs)), nprocs=2, start_method="spawn")
    ranks = [torch.load(runs / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return {"ranks": ranks, "report": _report_at(str(runs / "t"), DDP_CKPT_STEP)}


def _rank_local(key: str) -> bool:
    """State DDP leaves per rank: BatchNorm statistics (DDP broadcasts rank 0's at every forward), the
    EMA of them, the RNG, and each rank's measured wall time."""
    return key in ("rng.torch", "state.train_wall_s") or "running_" in key or "num_batches_tracked" in key


@pytest.mark.slow  # two gloo ranks in subprocesses: ~20 s
def test_every_rank_restores_the_state_rank_0_saved_bit_equal(ddp_run):
    (live0, live1), report = [r["live"] for r in ddp_run["ranks"]], ddp_run["report"]
    assert live0["accum"] == 2 and live0["state.step"] == DDP_CKPT_STEP and live0["cursor.consumed"].any()
    # Under DDP the ranks agree on everything but per-rank state; rank 0's is what the checkpoint holds.
    assert_bit_equal({k: v for k, v in live0.items() if not _rank_local(k)},
                     {k: v for k, v in live1.items() if not _rank_local(k)})
    for r in ddp_run["ranks"]:  # each rank's own RNG streams (the checkpoint holds every rank's)
        assert_bit_equal({**as_restored(live0, report, 2), "rng.torch": r["live"]["rng.torch"]}, r["restored"])


@pytest.mark.slow  # two gloo ranks in subprocesses: ~20 s
def test_the_step_after_a_restore_is_bit_equal_on_every_rank(ddp_run):
    for rank, r in enumerate(ddp_run["ranks"]):
        expected = as_restored(r["live_next"], ddp_run["report"], 2)
        expected["state.train_wall_s"] = r["restored_next"]["state.train_wall_s"]
        if rank > 0:  # rank 1's own BatchNorm statistics and EMA of them, which rank 0's replaced on restore
            expected.update({k: v for k, v in r["restored_next"].items()
                             if _rank_local(k) and k != "rng.torch"})
        assert_bit_equal(expected, r["restored_next"])
    live0, next0 = ddp_run["ranks"][0]["live"], ddp_run["ranks"][0]["live_next"]
    assert any(_differs(live0[k], next0[k]) for k in live0 if k.startswith("model."))


@pytest.mark.slow  # two gloo ranks in subprocesses: ~20 s
def test_each_rank_resumes_its_own_rng_stream(ddp_run):
    (r0, r1) = ddp_run["ranks"]
    # The ranks' streams differ by then (dropout over batches of different shapes), so restoring rank 0's
    # on rank 1 would be caught.
    assert _differs(r0["live"]["rng.torch"], r1["live"]["rng.torch"])
    for r in (r0, r1):
        assert not _differs(r["live"]["rng.torch"], r["restored"]["rng.torch"])
        assert not _differs(r["live_next"]["rng.torch"], r["restored_next"]["rng.torch"])


def _tiny_state(tmp_path, rng_per_rank=None) -> dict:
    model = torch.nn.Linear(2, 2)
    checkpoint.save(str(tmp_path), model, None, None, checkpoint.TrainState(step=7), "{}", rng_per_rank=rng_per_rank)
    return checkpoint.load(str(tmp_path))


def test_a_resume_at_another_world_size_gives_every_rank_a_stream_of_its_own(tmp_path):
    """Save at 2 ranks, resume at 3: ranks 0 and 1 get theirs back, rank 2 (which the saving world did not
    have) gets one derived from the step and its rank, the same on a rerun and unlike either saved one."""
    cpu = torch.device("cpu")
    saved = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        saved.append(checkpoint.rng_state(cpu))
    payload = _tiny_state(tmp_path, saved)
    after = {}
    for rank in range(3):
        torch.manual_seed(99)
        checkpoint.restore(payload, torch.nn.Linear(2, 2), None, None, rank=rank, device=cpu)
        after[rank] = torch.get_rng_state()
    assert not _differs(after[0], saved[0]["torch"]) and not _differs(after[1], saved[1]["torch"])
    assert _differs(after[2], saved[0]["torch"]) and _differs(after[2], saved[1]["torch"])
    torch.manual_seed(5)
    checkpoint.restore(payload, torch.nn.Linear(2, 2), None, None, rank=2, device=cpu)
    assert not _differs(torch.get_rng_state(), after[2])


def test_a_checkpoint_without_per_rank_streams_gives_every_rank_rank_0s(tmp_path):
    """Checkpoints written before per-rank RNG states restore as they did then."""
    torch.manual_seed(3)
    payload = _tiny_state(tmp_path)
    rank0 = payload["torch_rng"]
    del payload["rng_per_rank"]
    for rank in (0, 1):
        torch.manual_seed(99)
        checkpoint.restore(payload, torch.nn.Linear(2, 2), None, None, rank=rank, device=torch.device("cpu"))
        assert not _differs(torch.get_rng_state(), rank0)
