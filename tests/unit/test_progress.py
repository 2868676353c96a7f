import pytest

from raytrain_speech.config import TrainConfig
from raytrain_speech.data.progress import DataCursor
from raytrain_speech.train.metrics import run_card, run_card_markdown


def test_cursor_marks_merges_and_round_trips():
    a, b = DataCursor(1000, epoch=3), DataCursor(1000, epoch=3)
    a.mark([0, 5, 999])
    b.mark([5, 6])
    a.merge(b)
    assert a.count == 4 and not a.empty and not a.complete
    back = DataCursor.from_bytes(a.to_bytes())
    assert back.epoch == 3 and (back.consumed == a.consumed).all()
    assert len(a.to_bytes()) < 1000  # packed bits, compressed
    nxt = back.next_epoch()
    assert nxt.epoch == 4 and nxt.empty
    with pytest.raises(ValueError):
        a.merge(nxt)
    with pytest.raises(IndexError):
        a.mark([1000])


def test_accumulation_keeps_the_global_batch_when_workers_change():
    cfg = TrainConfig(global_batch_audio_s=240, micro_batch_audio_s=60)
    for world, accum in ((4, 1), (2, 2), (1, 4), (3, 2)):
        got_accum, micro = cfg.accumulation(world)
        assert got_accum == accum and micro <= 60
        assert abs(world * got_accum * micro - 240) < 1e-9
    assert TrainConfig(global_batch_audio_s=120).accumulation(2) == (1, 60.0)


def test_run_card_records_restarts_and_worker_history():
    lines = [
        {"step": 2, "attempt": 1, "world_size": 2, "grad_accum": 1, "time": 100.0, "audio_hours_seen": 0.1,
         "train_wall_s": 10.0, "parameters": 5},
        {"step": 4, "attempt": 1, "world_size": 2, "grad_accum": 1, "time": 110.0, "audio_hours_seen": 0.2,
         "train_wall_s": 20.0},
        {"step": 4, "attempt": 2, "world_size": 1, "grad_accum": 2, "time": 200.0, "audio_hours_seen": 0.2,
         "train_wall_s": 20.0},
        {"step": 6, "attempt": 2, "world_size": 1, "grad_accum": 2, "time": 236.0, "audio_hours_seen": 0.3,
         "train_wall_s": 30.0, "loss": 1.5, "parameters": 5},
    ]
    card = run_card(lines, {"name": "r", "use_gpu": True})
    assert card["restarts_survived"] == 1
    assert [(a["world_size"], a["grad_accum"]) for a in card["worker_history"]] == [(2, 1), (1, 2)]
    assert card["gpu_hours"] == pytest.approx((10 * 2 + 36 * 1) / 3600, abs=1e-4)
    assert card["throughput_audio_s_per_s"] == pytest.approx(0.3 * 3600 / 30)
    assert card["final"]["loss"] == 1.5


def test_an_attempt_that_ended_before_its_first_checkpoint_keeps_its_own_row():
    """The autoscale case: attempt 1 (1 worker) runs steps 0..6 and ends before any checkpoint, so
    attempt 2 (2 workers) restores nothing and carries the same checkpointed attempt count. Both are
    in the card, and attempt 1's steps show as run and rolled back."""
    lines = [
        {"step": 2, "attempt": 1, "attempt_id": "a", "attempt_start_step": 0, "world_size": 1, "grad_accum": 2,
         "time": 100.0},
        {"step": 6, "attempt": 1, "attempt_id": "a", "attempt_start_step": 0, "world_size": 1, "grad_accum": 2,
         "time": 130.0},
        {"step": 2, "attempt": 1, "attempt_id": "b", "attempt_start_step": 0, "world_size": 2, "grad_accum": 1,
         "time": 200.0},
        {"step": 8, "attempt": 1, "attempt_id": "b", "attempt_start_step": 0, "world_size": 2, "grad_accum": 1,
         "time": 260.0, "train_wall_s": 90.0},
    ]
    card = run_card(lines, {"name": "r", "use_gpu": False})
    history = card["worker_history"]
    assert [(a["attempt"], a["world_size"]) for a in history] == [(1, 1), (2, 2)]
    assert [(a["steps_run"], a["steps_rolled_back"]) for a in history] == [(6, 6), (8, 0)]
    assert card["restarts_survived"] == 1
    assert card["cpu_worker_hours"] == pytest.approx((30 * 1 + 60 * 2) / 3600, abs=1e-4)
    assert "| 1 | 1 | 2 |" in run_card_markdown(card) and "| 6 | 6 |" in run_card_markdown(card)


def test_utterance_count_global_batch_recomputes_accumulation_per_world_size():
    cfg = TrainConfig(global_batch_utterances=2048, micro_batch_utterances=2)
    for world, accum in ((128, 8), (32, 32), (100, 11)):
        got_accum, budget_s = cfg.accumulation(world)
        cap = cfg.utterance_cap(world)
        assert got_accum == accum and budget_s == float("inf")
        assert cap <= 2 and world * got_accum * cap >= 2048  # never fewer than promised
        assert world * got_accum * cap - 2048 < world * got_accum  # over by under one row per micro-batch
    assert TrainConfig(global_batch_utterances=64).utterance_cap(2) == 32


def test_the_markdown_card_rounds_for_reading_and_the_json_keeps_every_digit():
    lines = [{"step": 4, "attempt": 1, "attempt_id": "a", "attempt_start_step": 0, "world_size": 1, "grad_accum": 1,
              "time": 100.0, "train_wall_s": 3.0, "loss": 3.4107051567743287, "lr": 0.0004401933816107721}]
    card = run_card(lines, {"name": "r", "use_gpu": False})
    md = run_card_markdown(card)
    assert "| final loss | 3.411 |" in md and "| final lr | 0.0004402 |" in md
    assert "3.4107051567743287" not in md
    assert card["final"]["loss"] == 3.4107051567743287
