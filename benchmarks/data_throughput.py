"""CPU data-path throughput of our Ray Data chain against the obvious torch DataLoader, same process.

Why: the data path must keep GPUs fed, and it is the part a user would otherwise write as a plain
``torch.utils.data.DataLoader``. The goal (issue #3) is our chain at >= 1.5x that DataLoader per CPU
core and >= 1000x realtime per core on decode + resample + speed perturbation + additive noise +
log-mel. Both sides read the SAME Parquet shards and mix the SAME noise clips with the SAME transform
settings, on the same number of processes with one torch thread each:

- ours: ``data.pipeline.build_dataset(cfg, "train")`` (one Ray Data task per shard piece, reading it
  and running the Preprocessor with a WaveformAugmenter on each row batch, epoch from the run's
  EpochClock actor once per task) iterated to exhaustion on the driver
  with ``iter_batches(batch_format="numpy", batch_size=None)``; Ray gets ``--cores`` CPUs.
- baseline: a map-style Dataset over the shards' rows (read with pyarrow once, before timing) whose
  ``__getitem__`` does soundfile decode -> ``torchaudio.functional.resample`` (if the rate differs) ->
  speed perturbation with ``torchaudio.functional.resample(orig=round(100 * factor), new=100)`` ->
  ``torchaudio.functional.add_noise`` at an SNR drawn from [5, 20] dB -> ``MelSpectrogram`` log-mel
  (80 mels, 25 ms Hamming, 10 ms hop, n_fft 400, htk) normalised per utterance; ``DataLoader(
  num_workers=--cores, batch_size=32, persistent_workers=True)``, ``torch.set_num_threads(1)`` per
  worker.

Audio seconds are counted after speed perturbation on both sides (what the model sees). Per-core
figure = audio-s / wall-s / cores. One warm-up pass of each side and chain comes first (Ray start,
worker processes, torch import, noise clips and filterbanks built once per process) and is not
timed; then the repetitions alternate between the sides (ours first on odd repetitions, baseline
first on even ones) so a busy machine slows both alike. The front-end-only chain (decode + log-mel,
no augmentation) is measured the same way, for context. A one-thread, in-process stage breakdown
(decode, speed, noise, log-mel of each side's own functions) tells where the time goes.

The on-device front end (``features.DeviceLogMel`` on a padded batch of center-padded waveforms +
``augment.mask_batch`` SpecAugment, 2 frequency masks F=27 and 2 time masks T=100, on ~200 audio-s)
runs on CUDA where available, else on CPU (labelled so). It needs no Ray: ``--device-only`` runs just
that part, for GPU boxes that get our pure-torch entry points only.

    python benchmarks/data_throughput.py                          # synthesized 0.25 h corpus + 16 noise clips
    python benchmarks/data_throughput.py --data data/demo --noise data/noise --repeats 5 --cores 2
    python benchmarks/data_throughput.py --device-only --device cuda

Shapes: T = samples, B = utterances, F = frames, M = mel bins.
"""

from __future__ import annotations

import argparse
import functools
import io
import math
import os
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import soundfile as sf
import torch
import torchaudio
import torchaudio.functional as AF

from raytrain_speech.config import AugmentConfig, FeatureConfig
from raytrain_speech.data import audio, shards
from raytrain_speech.data.augment import WaveformAugmenter, mask_batch, mix_noise, speed_perturb
from raytrain_speech.data.features import DeviceLogMel, FeatureExtractor, center_pad

GOAL_RATIO = 1.5
"""Ours per core / baseline per core (augmented chain)."""
GOAL_REALTIME_PER_CORE = 1000.0
"""Audio-seconds per wall-second per core, ours (augmented chain)."""
SPEED_FACTORS = (0.9, 1.0, 1.1)
SNR_DB = (5.0, 20.0)
SEED = 0
BATCH_ROWS = 32
"""Rows per batch on both sides (our data.preprocess_batch_rows default)."""
CHAINS = ("augmented", "front end only")


# -- inputs --------------------------------------------------------------------------------------------

def synthesize_inputs(work_dir: str, cores: int, data: str | None, noise: str | None) -> tuple[str, str]:
    """The inputs not given: a 0.25 h speech corpus and a 16-clip noise set under ``work_dir`` (seconds)."""
    from raytrain_speech.config import SynthConfig
    from raytrain_speech.data.noise import NoiseSetConfig, write_noise_set
    from raytrain_speech.data.synth import synthesize

    quiet = lambda _msg: None  # noqa: E731
    if data is None:
        data = os.path.join(work_dir, "corpus")
        synthesize(SynthConfig(train_hours=0.25, workers=cores, dev_utterances=8, test_utterances=8), data,
                   log=quiet)
    if noise is None:
        noise = os.path.join(work_dir, "noise")
        write_noise_set(NoiseSetConfig(clips=16), noise, log=quiet)
    return data, noise


def read_noise_clips(root: str, rate_hz: int) -> list[torch.Tensor]:
    """The noise set's clips as the baseline's user would load them: pyarrow + soundfile, resampled."""
    clips = []
    for uri in shards.shard_uris(root, "noise"):
        for data in pq.read_table(uri, columns=["audio"])["audio"].to_pylist():
            wav, source_hz = baseline_decode(data)
            clips.append(AF.resample(wav, source_hz, rate_hz) if source_hz != rate_hz else wav)
    return clips


# -- the baseline: the obvious DataLoader ---------------------------------------------------------------

def baseline_decode(data: bytes) -> tuple[torch.Tensor, int]:
    samples, rate_hz = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return torch.from_numpy(np.ascontiguousarray(samples.mean(axis=1), dtype=np.float32)), int(rate_hz)


def baseline_speed(wav_T: torch.Tensor, factor: float) -> torch.Tensor:
    return wav_T if factor == 1.0 else AF.resample(wav_T, round(100 * factor), 100)


def baseline_noise(wav_T: torch.Tensor, noise_T: torch.Tensor, snr_db: float, offset: int) -> torch.Tensor:
    """The clip looped from ``offset`` to the utterance's length, mixed at ``snr_db``."""
    n = wav_T.shape[0]
    looped = torch.roll(noise_T, -offset).repeat(math.ceil(n / noise_T.shape[0]))[:n]
    return AF.add_noise(wav_T, looped, torch.tensor(snr_db))


def baseline_mel(cfg: FeatureConfig) -> torchaudio.transforms.MelSpectrogram:
    return torchaudio.transforms.MelSpectrogram(
        sample_rate=cfg.sample_rate_hz, n_fft=cfg.n_fft, win_length=cfg.win_length, hop_length=cfg.hop_length,
        n_mels=cfg.n_mels, window_fn=torch.hamming_window, power=2.0, mel_scale="htk")


def baseline_logmel(mel: torchaudio.transforms.MelSpectrogram, wav_T: torch.Tensor) -> torch.Tensor:
    feats_FM = torch.log(mel(wav_T) + 1e-6).T
    return (feats_FM - feats_FM.mean(0)) / feats_FM.std(0, unbiased=False).clamp_min(1e-5)


@dataclass
class Draw:
    speed: float
    clip: int
    offset_u: float
    snr_db: float


def baseline_draw(index: int, n_clips: int) -> Draw:
    rng = np.random.default_rng([SEED, index])
    return Draw(float(rng.choice(SPEED_FACTORS)), int(rng.integers(n_clips)), float(rng.random()),
                float(rng.uniform(*SNR_DB)))


class ShardDataset(torch.utils.data.Dataset):
    """The shards' rows held in memory; every item is decoded and transformed in the worker."""

    def __init__(self, data_root: str, noise_clips: list[torch.Tensor] | None, cfg: FeatureConfig):
        tables = [pq.read_table(u, columns=["index", "audio"]) for u in shards.shard_uris(data_root, "train")]
        self.indices = [i for t in tables for i in t["index"].to_pylist()]
        self.audio = [b for t in tables for b in t["audio"].to_pylist()]
        self.noise_clips = noise_clips
        self.rate_hz = cfg.sample_rate_hz
        self.mel = baseline_mel(cfg)

    def __len__(self) -> int:
        return len(self.audio)

    @torch.no_grad()
    def __getitem__(self, i: int) -> tuple[torch.Tensor, float]:
        wav, source_hz = baseline_decode(self.audio[i])
        if source_hz != self.rate_hz:
            wav = AF.resample(wav, source_hz, self.rate_hz)
        if self.noise_clips is not None:
            d = baseline_draw(self.indices[i], len(self.noise_clips))
            wav = baseline_speed(wav, d.speed)
            noise = self.noise_clips[d.clip]
            wav = baseline_noise(wav, noise, d.snr_db, int(d.offset_u * noise.shape[0]))
        return baseline_logmel(self.mel, wav), wav.shape[0] / self.rate_hz


def one_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)


def as_list(items: list) -> list:
    return items


def baseline_loader(data_root: str, noise_clips, cores: int) -> torch.utils.data.DataLoader:
    ds = ShardDataset(data_root, noise_clips, FeatureConfig())
    return torch.utils.data.DataLoader(ds, batch_size=BATCH_ROWS, num_workers=cores, collate_fn=as_list,
                                       worker_init_fn=one_thread, persistent_workers=True)


def baseline_pass(loader) -> float:
    """Audio seconds of one full pass."""
    return sum(duration_s for batch in loader for _feats, duration_s in batch)


# -- ours: the project's Ray Data chain -------------------------------------------------------------------

def start_ray(cores: int) -> None:
    import ray
    import ray.data

    ray.init(address="local", num_cpus=cores, object_store_memory=512 * 2**20, include_dashboard=False,
             logging_level="WARNING")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = ctx.print_on_execution_start = False


def ours_dataset(data_root: str, noise_root: str | None, storage_dir: str):
    """``build_dataset`` with waveform augmentation (``noise_root`` given) or the front end alone."""
    from raytrain_speech.config import load_config
    from raytrain_speech.data.pipeline import build_dataset

    overrides = [f"data.root={data_root}", "data.preprocess_cpus=1", f"data.preprocess_batch_rows={BATCH_ROWS}",
                 "run.name=bench", f"run.storage_path={storage_dir}", f"train.seed={SEED}"]
    if noise_root is not None:
        overrides += [f"augment.speed_factors=[{','.join(map(str, SPEED_FACTORS))}]",
                      f"augment.noise_root={noise_root}", f"augment.noise_snr_db=[{SNR_DB[0]},{SNR_DB[1]}]"]
    return build_dataset(load_config(None, overrides), "train")


def ours_pass(ds) -> float:
    audio_s = 0.0
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        ok = batch["error"] == ""
        audio_s += float(np.asarray(batch["duration_s"])[ok].sum())
    return audio_s


def _seconds(value: str, unit: str) -> float:
    return float(value) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[unit]


def ours_task_summary(ds, audio_s: float) -> list[str]:
    """Per operator of the last pass (Ray Data's stats): tasks, wall and CPU seconds: where our pass
    time goes besides the preprocessing itself, and how many cores the preprocessing could use."""
    lines = []
    pattern = (r"Operator \d+ (\S+): (\d+) tasks executed.*?Remote wall time: .*?([\d.]+)(us|ms|s) total"
               r".*?Remote cpu time: .*?([\d.]+)(us|ms|s) total")
    for m in re.finditer(pattern, ds.stats(), re.S):
        name, tasks = m.group(1), int(m.group(2))
        wall_s, cpu_s = _seconds(m.group(3), m.group(4)), _seconds(m.group(5), m.group(6))
        rate = f", {audio_s / wall_s:.0f}x realtime per task-second" if "_preprocess" in name else ""
        lines.append(f"  {name}: {tasks} task(s), {wall_s:.2f} s wall, {cpu_s:.2f} s CPU in total{rate}")
    return lines


# -- measurement -------------------------------------------------------------------------------------------

def timed_pass(run: Callable[[], float]) -> tuple[float, float]:
    """(audio seconds, wall seconds) of one pass."""
    t0 = time.perf_counter()
    audio_s = run()
    return audio_s, time.perf_counter() - t0


def warm_up(passes: dict[tuple[str, str], Callable[[], float]]) -> None:
    """One untimed pass each: worker processes start, torch imports, per-process caches fill."""
    for key, run in passes.items():
        audio_s, wall_s = timed_pass(run)
        print(f"warm-up {key[0]:8s} {key[1]:15s} {audio_s:7.1f} audio-s in {wall_s:5.2f} s (not counted)", flush=True)


def measure(passes: dict[tuple[str, str], Callable[[], float]], repeats: int, cores: int) -> dict:
    """x realtime per core for every (side, chain) and repetition, the sides alternating."""
    results: dict[tuple[str, str], list[float]] = {key: [] for key in passes}
    for rep in range(repeats):
        for chain in CHAINS:
            sides = ("ours", "baseline") if rep % 2 == 0 else ("baseline", "ours")
            for side in sides:
                audio_s, wall_s = timed_pass(passes[(side, chain)])
                results[(side, chain)].append(audio_s / wall_s / cores)
                print(f"rep {rep + 1} {side:8s} {chain:15s} {audio_s:7.1f} audio-s in {wall_s:5.2f} s", flush=True)
    return results


def print_table(results: dict, repeats: int) -> None:
    print("\n| rep | chain | ours x RT/core | baseline x RT/core | ours / baseline |")
    print("|---|---|---:|---:|---:|")
    for chain in CHAINS:
        ours, base = results[("ours", chain)], results[("baseline", chain)]
        for rep in range(repeats):
            print(f"| {rep + 1} | {chain} | {ours[rep]:.0f} | {base[rep]:.0f} | {ours[rep] / base[rep]:.2f} |")
    for chain in CHAINS:
        ours, base = results[("ours", chain)], results[("baseline", chain)]
        ratio = statistics.median(o / b for o, b in zip(ours, base))
        print(f"| **median** | {chain} | **{statistics.median(ours):.0f}** | **{statistics.median(base):.0f}** "
              f"| **{ratio:.2f}** |")


def print_goals(results: dict) -> None:
    ours, base = results[("ours", "augmented")], results[("baseline", "augmented")]
    ratio = statistics.median(o / b for o, b in zip(ours, base))
    rt = statistics.median(ours)
    print(f"\ngoal: ours >= {GOAL_RATIO}x baseline per core: {'MET' if ratio >= GOAL_RATIO else 'NOT MET'} "
          f"(median ratio {ratio:.2f}, augmented chain)")
    print(f"goal: >= {GOAL_REALTIME_PER_CORE:.0f}x realtime per core: "
          f"{'MET' if rt >= GOAL_REALTIME_PER_CORE else 'NOT MET'} (ours median {rt:.0f}x, augmented chain)")


# -- where the time goes: one thread, in process ----------------------------------------------------------

def sample_rows(data_root: str, n: int) -> list[tuple[int, bytes, float]]:
    table = pq.read_table(shards.shard_uris(data_root, "train")[0], columns=["index", "audio", "duration_s"])
    return list(zip(table["index"].to_pylist(), table["audio"].to_pylist(), table["duration_s"].to_pylist()))[:n]


def ours_stages(rows, augmenter: WaveformAugmenter, fe: FeatureExtractor, clock: dict) -> float:
    """Our Preprocessor's per-utterance steps, one at a time (same calls as WaveformAugmenter.__call__)."""
    audio_s = 0.0
    for index, data, duration_s in rows:
        with clock_stage(clock, "decode"):
            wav = audio.load(data, fe.cfg.sample_rate_hz, duration_s)
        with clock_stage(clock, "draw"):
            d = augmenter.draw(SEED, 0, index)
        with clock_stage(clock, "speed"):
            wav = speed_perturb(wav, d["speed"])
        with clock_stage(clock, "noise"):
            noise = augmenter.noise_clips[d["clip"]]
            wav = mix_noise(wav, noise, d["snr_db"], offset=int(d["offset_u"] * len(noise)))
        with clock_stage(clock, "log-mel"):
            fe(wav)
        audio_s += wav.shape[0] / fe.cfg.sample_rate_hz
    return audio_s


def baseline_stages(rows, noise_clips, mel, clock: dict) -> float:
    audio_s = 0.0
    for index, data, _duration_s in rows:
        with clock_stage(clock, "decode"):
            wav, _rate_hz = baseline_decode(data)
        with clock_stage(clock, "draw"):
            d = baseline_draw(index, len(noise_clips))
        with clock_stage(clock, "speed"):
            wav = baseline_speed(wav, d.speed)
        with clock_stage(clock, "noise"):
            noise = noise_clips[d.clip]
            wav = baseline_noise(wav, noise, d.snr_db, int(d.offset_u * noise.shape[0]))
        with clock_stage(clock, "log-mel"):
            baseline_logmel(mel, wav)
        audio_s += wav.shape[0] / 16000
    return audio_s


class clock_stage:  # noqa: N801 (used like a function)
    def __init__(self, clock: dict, name: str):
        self.clock, self.name = clock, name

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.clock[self.name] = self.clock.get(self.name, 0.0) + time.perf_counter() - self.t0


@torch.no_grad()
def stage_breakdown(data_root: str, noise_root: str, n_rows: int = 96, rounds: int = 3) -> None:
    """x realtime of each stage on one thread, both sides interleaved, best of ``rounds``."""
    from raytrain_speech.data.noise import load_noise_clips

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = sample_rows(data_root, n_rows)
    cfg = FeatureConfig()
    aug_cfg = AugmentConfig(speed_factors=SPEED_FACTORS, noise_root=noise_root, noise_snr_db=SNR_DB)
    augmenter = WaveformAugmenter(aug_cfg, load_noise_clips(noise_root, sample_rate_hz=cfg.sample_rate_hz))
    fe, clips, mel = FeatureExtractor(cfg), read_noise_clips(noise_root, cfg.sample_rate_hz), baseline_mel(cfg)
    best: dict[str, dict[str, float]] = {"ours": {}, "baseline": {}}
    for round_ in range(rounds + 1):  # round 0 warms caches (resampler kernels, allocator) and is dropped
        for side, run in (("ours", lambda c: ours_stages(rows, augmenter, fe, c)),
                          ("baseline", lambda c: baseline_stages(rows, clips, mel, c))):
            clock: dict[str, float] = {}
            clock["audio_s"] = run(clock)
            if round_ > 0:
                best[side] = {k: min(v, best[side].get(k, math.inf)) for k, v in clock.items()}
    torch.set_num_threads(threads)
    audio_s = best["ours"].pop("audio_s")
    best["baseline"].pop("audio_s")
    print(f"\nstage breakdown, one thread in this process, {len(rows)} utterances ({audio_s:.0f} audio-s), "
          f"best of {rounds}: x realtime (share of the side's time)")
    print("| stage | ours | baseline |\n|---|---:|---:|")
    totals = {side: sum(best[side].values()) for side in best}
    for stage in best["ours"]:
        cells = [f"{audio_s / best[s][stage]:.0f}x ({100 * best[s][stage] / totals[s]:.0f}%)" for s in best]
        print(f"| {stage} | {cells[0]} | {cells[1]} |")
    print(f"| all | {audio_s / totals['ours']:.0f}x | {audio_s / totals['baseline']:.0f}x |")


# -- the on-device front end (no Ray) ------------------------------------------------------------------

def padded_batch(audio_s: float, cfg: FeatureConfig) -> tuple[np.ndarray, np.ndarray, float]:
    """(center-padded waveforms zero-padded to the longest (B, T), their lengths, audio seconds): random
    2-6 s utterances, as ``features.placement: worker`` rows arrive on a training worker."""
    rng = np.random.default_rng(SEED)
    rows, total_s = [], 0.0
    while total_s < audio_s:
        n = int(rng.uniform(2.0, 6.0) * cfg.sample_rate_hz)
        rows.append(center_pad((0.1 * rng.standard_normal(n)).astype(np.float32), cfg))
        total_s += n / cfg.sample_rate_hz
    lengths_B = np.array([len(r) for r in rows], dtype=np.int64)
    padded_BT = np.zeros((len(rows), lengths_B.max()), dtype=np.float32)
    for b, r in enumerate(rows):
        padded_BT[b, :len(r)] = r
    return padded_BT, lengths_B, total_s


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time_s(fn: Callable[[], None], device: torch.device, iters: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def device_frontend(device: torch.device, audio_s: float, iters: int) -> None:
    """DeviceLogMel + SpecAugment masks on one padded batch: with and without the host->device copy."""
    cfg = FeatureConfig()
    masks = AugmentConfig(freq_masks=2, freq_mask_max_bins=27, time_masks=2, time_mask_max_frames=100)
    padded_np, lengths_np, total_s = padded_batch(audio_s, cfg)
    host = torch.from_numpy(padded_np)
    if device.type == "cuda":
        host = host.pin_memory()
    on_device, lengths = host.to(device), torch.from_numpy(lengths_np).to(device)
    frontend = DeviceLogMel(cfg).to(device)
    indices = list(range(len(lengths_np)))

    def compute(x_BT: torch.Tensor) -> None:
        feats_BFM, frames_B = frontend(x_BT, lengths)
        mask_batch(feats_BFM, frames_B, indices, masks, SEED, 0)

    label = device.type if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    with_copy_s = median_time_s(lambda: compute(host.to(device, non_blocking=True)), device, iters)
    compute_s = median_time_s(lambda: compute(on_device), device, iters)
    print(f"\non-device front end ({label}): DeviceLogMel + mask_batch (2 freq masks F=27, 2 time masks T=100), "
          f"batch of {len(indices)} utterances = {total_s:.0f} audio-s, median of {iters}:")
    print(f"  compute only:          {1000 * compute_s:8.2f} ms  = {total_s / compute_s:10.0f} audio-s/s")
    if device.type == "cuda":  # on CPU the copy is a no-op and the second line would only show noise
        print(f"  with host->device copy: {1000 * with_copy_s:7.2f} ms  = {total_s / with_copy_s:10.0f} audio-s/s")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# -- main ----------------------------------------------------------------------------------------------------

def cpu_comparison(args, data_root: str, noise_root: str, storage_dir: str) -> None:
    import ray

    print(f"{args.cores} cores each side; Ray: {args.cores} CPUs, data.preprocess_cpus=1; "
          f"DataLoader: {args.cores} workers; one torch thread per process", flush=True)
    clips = read_noise_clips(noise_root, FeatureConfig().sample_rate_hz)
    passes = {}
    for chain, chain_clips in zip(CHAINS, (clips, None)):
        passes[("baseline", chain)] = functools.partial(baseline_pass, baseline_loader(data_root, chain_clips,
                                                                                      args.cores))
    warm_up(passes)  # the DataLoader workers fork before Ray's threads exist in this process
    start_ray(args.cores)
    try:
        for chain, chain_noise in zip(CHAINS, (noise_root, None)):
            passes[("ours", chain)] = functools.partial(ours_pass, ours_dataset(data_root, chain_noise, storage_dir))
        warm_up({key: run for key, run in passes.items() if key[0] == "ours"})
        results = measure(passes, args.repeats, args.cores)
        for chain in CHAINS:
            ds = passes[("ours", chain)].args[0]
            print(f"ours, Ray Data stats of the last {chain} pass:")
            print("\n".join(ours_task_summary(ds, ours_pass(ds))))
    finally:
        ray.shutdown()
    print(f"\nx realtime per core = audio-s / wall-s / {args.cores} cores; start-up (Ray init, first worker "
          "spawn, per-process noise clips and filterbanks) excluded by one warm-up pass of each side and chain")
    print_table(results, args.repeats)
    print_goals(results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", help="shard corpus root (default: synthesize 0.25 h into a temp dir)")
    ap.add_argument("--noise", help="noise-shard set root (default: synthesize 16 clips into a temp dir)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--device-only", action="store_true", help="only the on-device front end (no Ray, no shards)")
    ap.add_argument("--device", default="auto", help="device of the on-device front end: auto, cuda, cpu")
    ap.add_argument("--device-audio-s", type=float, default=200.0, help="audio seconds in the front-end batch")
    ap.add_argument("--device-iters", type=int, default=20)
    args = ap.parse_args()
    device = pick_device(args.device)
    if not args.device_only:
        with tempfile.TemporaryDirectory(prefix="data_throughput_") as work_dir:
            data_root, noise_root = synthesize_inputs(work_dir, args.cores, args.data, args.noise)
            cpu_comparison(args, data_root, noise_root, os.path.join(work_dir, "runs"))
            stage_breakdown(data_root, noise_root)
    if device.type != "cuda" and not args.device_only:
        print("\n(no CUDA device: the on-device front end below ran on CPU, not on a GPU)")
    device_frontend(device, args.device_audio_s, args.device_iters)


if __name__ == "__main__":
    main()
