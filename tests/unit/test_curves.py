"""curves.png / curves.json from a run's metrics records: a restart's rolled-back steps are replaced by
the next attempt's, the worker panel keeps every attempt, and the PNG is a PNG."""

from __future__ import annotations

import json

from raytrain_speech.train.curves import CURVES_JSON, CURVES_PNG, curve_data, write_curves
from raytrain_speech.train.metrics import write_run_card


def _record(step, attempt, t, world, loss, hours, wall, **extra):
    return {"step": step, "attempt_id": attempt, "time": 1000.0 + t, "world_size": world, "loss": loss,
            "lr": step * 1e-4, "audio_hours_seen": hours, "train_wall_s": wall, **extra}


RECORDS = [
    _record(10, "a", 0, 2, 3.0, 0.01, 10.0),
    _record(20, "a", 10, 2, 2.5, 0.02, 20.0, valid_loss=2.7, valid_wer=0.9),
    _record(30, "a", 20, 2, 2.2, 0.03, 30.0),  # rolled back: attempt b resumes from step 20
    _record(30, "b", 60, 1, 2.1, 0.03, 45.0),
    _record(40, "b", 75, 1, 1.9, 0.04, 60.0, valid_loss=2.0, valid_wer=float("nan")),
]


def test_steps_take_their_latest_attempts_values_and_workers_keep_every_attempt():
    data = curve_data(RECORDS)
    assert data["step"] == [10, 20, 30, 40]
    assert data["loss"] == [3.0, 2.5, 2.1, 1.9]  # step 30 is attempt b's
    assert data["lr"] == [10e-4, 20e-4, 30e-4, 40e-4]
    # window throughput: audio between reports of one attempt over their training time
    assert data["throughput_audio_s_per_s"][0] is None and data["throughput_audio_s_per_s"][2] is None
    assert abs(data["throughput_audio_s_per_s"][1] - 36.0 / 10.0) < 1e-9
    assert abs(data["throughput_audio_s_per_s"][3] - 36.0 / 15.0) < 1e-9
    assert data["valid"] == {"step": [20, 40], "loss": [2.7, 2.0], "wer": [0.9, None]}  # NaN is not plotted
    assert data["workers"] == {"elapsed_s": [0.0, 10.0, 20.0, 60.0, 75.0], "world_size": [2, 2, 2, 1, 1]}
    assert data["attempt_starts"] == [{"elapsed_s": 0.0, "step": 10, "world_size": 2},
                                      {"elapsed_s": 60.0, "step": 30, "world_size": 1}]


def test_the_files_are_a_png_and_strict_json_of_the_same_data(tmp_path):
    data = write_curves(str(tmp_path), RECORDS, None, title="t")
    assert (tmp_path / CURVES_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    assert json.loads((tmp_path / CURVES_JSON).read_text(), parse_constant=refuse) == json.loads(json.dumps(data))


def test_the_run_card_writes_the_curves_beside_it(tmp_path):
    write_run_card(str(tmp_path), RECORDS, {"name": "r", "family": "f", "preset": "p"}, None)
    assert (tmp_path / "run_card.md").exists() and (tmp_path / CURVES_PNG).exists()
    assert json.loads((tmp_path / CURVES_JSON).read_text())["step"] == [10, 20, 30, 40]
