"""``curves.png`` and ``curves.json`` in a run directory: the run's metrics drawn for a person to look at.

Written with the run card (at every checkpoint and at the end of ``train``/``demo``), from the same
``metrics.jsonl`` records, so any process can redraw them. The curves against step show what the
weights went through: where a restart rolled steps back, the steps the next attempt ran again replace
the rolled-back ones (a step's value is its latest attempt's). The worker panel is against wall time
and keeps every attempt, so a resize or a restart shows where it happened. ``curves.json`` holds
exactly the plotted numbers (tests compare them with the metrics; scripts can replot them).
"""

from __future__ import annotations

import io
import json

from raytrain_speech import storage
from raytrain_speech.config import StorageConfig
from raytrain_speech.train.trackers import finite

CURVES_PNG = "curves.png"
CURVES_JSON = "curves.json"


def _attempt_key(m: dict):
    return m.get("attempt_id") or m.get("attempt", 1)


def curve_data(records: list[dict]) -> dict:
    """The plotted series. Per step (latest attempt wins): training loss, LR, window throughput
    (audio-s of training per second between this report and the previous one of the same attempt),
    validation loss/WER where reported. Per report in time order: elapsed wall time and workers;
    and where each attempt started."""
    by_step: dict[int, dict] = {}
    previous: dict = {}
    window: dict[int, float | None] = {}
    for m in records:
        if "step" not in m:
            continue
        key = _attempt_key(m)
        before = previous.get(key)
        if before is not None and m.get("train_wall_s", 0) > before.get("train_wall_s", 0):
            audio_s = (m.get("audio_hours_seen", 0) - before.get("audio_hours_seen", 0)) * 3600
            window[m["step"]] = audio_s / (m["train_wall_s"] - before["train_wall_s"])
        else:
            window[m["step"]] = None
        previous[key] = m
        by_step[m["step"]] = m
    steps = sorted(by_step)
    valid = [s for s in steps if finite(by_step[s].get("valid_loss")) is not None
             or finite(by_step[s].get("valid_wer")) is not None]
    t0 = next((m["time"] for m in records if "time" in m), 0.0)
    timed = [m for m in records if "time" in m and "step" in m]
    starts, seen = [], set()
    for m in timed:
        key = _attempt_key(m)
        if key not in seen:
            seen.add(key)
            starts.append({"elapsed_s": m["time"] - t0, "step": m["step"], "world_size": m.get("world_size")})
    return {
        "step": steps,
        "loss": [finite(by_step[s].get("loss")) for s in steps],
        "lr": [finite(by_step[s].get("lr")) for s in steps],
        "throughput_audio_s_per_s": [finite(window[s]) for s in steps],
        "valid": {"step": valid, "loss": [finite(by_step[s].get("valid_loss")) for s in valid],
                  "wer": [finite(by_step[s].get("valid_wer")) for s in valid]},
        "workers": {"elapsed_s": [m["time"] - t0 for m in timed], "world_size": [m.get("world_size") for m in timed]},
        "attempt_starts": starts,
    }


def render_png(data: dict, title: str = "") -> bytes:
    """Five panels: loss (training, validation), validation WER, LR, throughput, workers over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(5, 1, figsize=(8, 13), constrained_layout=True)
    ax = axes[0]
    ax.plot(data["step"], [float("nan") if v is None else v for v in data["loss"]], label="training")
    if data["valid"]["step"]:
        ax.plot(data["valid"]["step"], [float("nan") if v is None else v for v in data["valid"]["loss"]],
                "o-", label="validation")
    ax.set(ylabel="loss", xlabel="step", title=title)
    ax.legend()
    ax = axes[1]
    if data["valid"]["step"]:
        ax.plot(data["valid"]["step"], [float("nan") if v is None else 100 * v for v in data["valid"]["wer"]], "o-")
    else:
        ax.text(0.5, 0.5, "no validation reported (train.validate_every_steps)", ha="center", va="center",
                transform=ax.transAxes)
    ax.set(ylabel="validation WER (%)", xlabel="step")
    for ax, key, label in ((axes[2], "lr", "learning rate"), (axes[3], "throughput_audio_s_per_s", "audio-s/s")):
        ax.plot(data["step"], [float("nan") if v is None else v for v in data[key]])
        ax.set(ylabel=label, xlabel="step")
    ax = axes[4]
    minutes = [t / 60 for t in data["workers"]["elapsed_s"]]
    ax.step(minutes, data["workers"]["world_size"], where="post")
    for i, start in enumerate(data["attempt_starts"][1:], start=2):
        ax.axvline(start["elapsed_s"] / 60, color="tab:red", linestyle="--", linewidth=1)
        ax.annotate(f"attempt {i} (step {start['step']})", (start["elapsed_s"] / 60, 0.05),
                    xycoords=("data", "axes fraction"), rotation=90, fontsize=8, color="tab:red")
    sizes = [w for w in data["workers"]["world_size"] if w is not None]
    ax.set(ylabel="workers", xlabel="wall time (min)", ylim=(0, max(sizes, default=1) + 1))
    ax.yaxis.get_major_locator().set_params(integer=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def write_curves(directory: str, records: list[dict], storage_cfg: StorageConfig | None, title: str = "") -> dict:
    """curves.json and curves.png under ``directory``; the data."""
    data = curve_data(records)
    storage.write_bytes(storage.join(directory, CURVES_JSON), json.dumps(data, indent=1).encode(), storage_cfg)
    storage.write_bytes(storage.join(directory, CURVES_PNG), render_png(data, title), storage_cfg)
    return data
