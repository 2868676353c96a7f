"""``raytrain-speech demo``: the embedded default run end to end, for a first look.

The corpus at ``data.root`` (synthesized with espeak-ng when absent), training on the configured backend
(2 local Ray Train workers by default), greedy WER on the test split and on ``test_accents`` (an accent
family no other split has), and one table naming where the arithmetic ran; ``summary.json`` in the run
directory keeps all of it. Kept out of cli.py so the command-line module stays an argument parser.
"""

from __future__ import annotations

import json
import os
import time

from raytrain_speech import storage


def _ensure_corpus(cfg) -> None:
    """The demo's corpus: found at data.root, or synthesized there (synth.*)."""
    from raytrain_speech.data import shards
    from raytrain_speech.data.synth import synthesize

    storage.check_reachable(cfg.data.root, cfg.storage)
    if storage.exists(storage.join(cfg.data.root, shards.MANIFEST), cfg.storage):
        print(f"[demo] corpus found at {cfg.data.root}")
        return
    print(f"[demo] synthesizing ~{cfg.synth.train_hours:g} h of speech with espeak-ng into {cfg.data.root} ...")
    start = time.time()
    manifest = synthesize(cfg.synth, cfg.data.root, cfg.storage, log=lambda s: None)
    hours = {k: f"{v.hours:.2f} h" for k, v in manifest.splits.items()}
    print(f"[demo] synthesized {hours} in {time.time() - start:.0f} s")


def _compute_description(cfg) -> str:
    """Where the demo's arithmetic ran: precision step.precision resolved to, and the device or CPU ISA
    (torch's kernel level: AVX2, AVX512, ...), so a table's timings say what they were measured on."""
    import torch

    from raytrain_speech.train.step import resolve_precision

    device = torch.device("cuda" if cfg.run.use_gpu and torch.cuda.is_available() else "cpu")
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores")
    return f"{resolve_precision(cfg.step.precision, device)} ({cfg.step.precision}) on {where}"


def _demo_test_splits(cfg) -> list[str]:
    """The demo's test sets: eval.split, and the held-out-accent split when the corpus has one."""
    from raytrain_speech.data import shards
    from raytrain_speech.data.synth import ACCENT_SPLIT

    manifest = shards.read_manifest(cfg.data.root, cfg.storage)
    return [cfg.eval.split] + ([ACCENT_SPLIT] if ACCENT_SPLIT in manifest.splits and cfg.eval.split != ACCENT_SPLIT
                               else [])


def run_demo(cfg) -> int:
    """``raytrain-speech demo``: the corpus (synthesized if absent), training, both test sets, the table."""
    from raytrain_speech.evaluate.runner import evaluate_checkpoint
    from raytrain_speech.train.curves import CURVES_PNG
    from raytrain_speech.train.fit import fit
    from raytrain_speech.train.metrics import format_duration, summary_table

    start = time.time()
    _ensure_corpus(cfg)
    where = (f"with {cfg.run.num_workers} Ray Train workers" if cfg.run.backend == "ray"
             else "in this process (run.backend=local)")
    print(f"[demo] training {cfg.model.family}/{cfg.model.preset} {where} for {cfg.train.max_steps} steps; "
          f"run directory {storage.join(cfg.run.storage_path, cfg.run.name)}")
    outcome = fit(cfg, progress=True)
    splits = _demo_test_splits(cfg)
    print(f"[demo] evaluating {outcome.checkpoint_uri} on {' and '.join(splits)} "
          "(speakers and sentences never seen in training; test_accents: an accent never heard) ...")
    res = evaluate_checkpoint(outcome.checkpoint_uri, cfg.storage, split=splits)
    m = outcome.metrics
    compute = _compute_description(cfg)
    rows = [
        ("steps", str(m.get("step"))),
        ("audio hours seen", f"{m.get('audio_hours_seen', 0):.2f}"),
        ("throughput", f"{m.get('throughput_audio_s_per_s', 0):.0f} audio-s/s "
                       f"({m.get('world_size', cfg.run.num_workers)} workers)"),
        ("precision", compute),
        ("training time", format_duration(m.get("train_wall_s", 0))),
        ("wall time (demo)", format_duration(time.time() - start)),
    ]
    for test in res["sets"]:
        rows += [(f"{test['split']} WER", f"{100 * test['wer']:.2f}%"),
                 (f"{test['split']} CER", f"{100 * test['cer']:.2f}%")]
    rows += [
        ("bad input", outcome.bad_input_summary.removeprefix("bad input: ").split(";")[0]),
        ("run directory", outcome.run_dir),
        ("curves", storage.join(outcome.run_dir, CURVES_PNG)),
    ]
    print(summary_table(rows))
    summary = {"metrics": m, "eval": res, "compute": compute, "wall_s": time.time() - start}
    storage.write_bytes(storage.join(outcome.run_dir, "summary.json"),
                        json.dumps(summary, indent=2).encode(), cfg.storage)
    return 0
