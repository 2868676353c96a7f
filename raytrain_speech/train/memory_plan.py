"""Will a recipe fit its GPUs? Per-GPU training memory, before anything is launched (``raytrain-speech plan``).

Static memory is arithmetic on the parameter count (the full preset on the meta device, no memory):
fp32 weights, fp32 gradients (views into DDP's buckets, so one copy), AdamW's two fp32 moments (fused
on CUDA: no full-size temporaries at the step), autocast's half-precision weight copies for bf16/fp16,
an EMA copy when ``step.ema_decay`` is set; FSDP2 shards all of it over the workers and gathers one
block at a time (plus the next, prefetched).

Activations are not a formula: the model is traced (``train/activation_trace.py``: two of each
stack's blocks on 2 utterances of 4 s and 8 s, fitted in T and T^2, scaled to the micro-batch).

What the trace does not see, and the plan adds as one ``CONTEXT_GIB`` line: the CUDA context, cuBLAS
workspaces, the allocator's fragmentation, backward's transient gradients of activations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from raytrain_speech.config import Config, ModelSpec
from raytrain_speech.models import activation_checkpointing
from raytrain_speech.models.registry import build_meta, count_parameters, target_limits
from raytrain_speech.train.activation_trace import TRACE_S, ActivationModel, trace

GIB = 2**30
GPUS_GIB = {"a100-40gb": 40.0, "a100-80gb": 80.0, "h100-80gb": 80.0, "h100-94gb": 94.0, "h200": 141.0,
            "l40s": 48.0, "a10g": 24.0}
"""Memory of the GPUs --gpu names (GiB, as nvidia-smi reports them); NAME:GiB for any other."""
CONTEXT_GIB = 1.0
TOKENS_PER_S = {"char": 15.0}
"""Target tokens per second of audio for the planned batch (characters); subword tokenizers: 4."""


def gpu_gib(name: str) -> tuple[str, float]:
    """(label, GiB) of --gpu: a known name or NAME:GiB; ValueError naming the choices."""
    if ":" in name:
        label, size = name.rsplit(":", 1)
        try:
            return label, float(size)
        except ValueError:
            pass
    if name in GPUS_GIB:
        return name, GPUS_GIB[name]
    raise ValueError(f"--gpu {name!r}: not one of {', '.join(GPUS_GIB)} (or NAME:GiB, e.g. rtx4090:24)")


@dataclass
class MemoryPlan:
    """One GPU's training memory for one setting (bytes)."""

    parallelism: str
    activation_checkpointing: str
    weights: float
    gradients: float
    optimizer: float
    buffers: float
    activations: float
    context: float = CONTEXT_GIB * GIB
    notes: list[str] = field(default_factory=list)

    @property
    def static(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.buffers + self.context

    @property
    def total(self) -> float:
        return self.static + self.activations


def static_bytes(n_params: int, precision: str, ema: bool, parallelism: str, workers: int,
                 largest_block_params: int) -> dict[str, float]:
    """Weights, gradients, optimizer state and buffers per GPU for AdamW training."""
    half = precision in ("bf16", "fp16")
    if parallelism == "ddp":  # the gradients are views into DDP's buckets (train/worker.py): one copy
        return {"weights": n_params * (4 + (2 if half else 0) + (4 if ema else 0)), "gradients": n_params * 4,
                "optimizer": n_params * 8, "buffers": 0.0}
    shard = n_params / workers  # FSDP2: every rank holds 1/N of weights, gradients, moments (and EMA)
    gathered = 2 * largest_block_params * (2 if half else 4)  # one block all-gathered + the next prefetched
    return {"weights": shard * (4 + (4 if ema else 0)) + gathered, "gradients": shard * 4,
            "optimizer": shard * 8, "buffers": largest_block_params * 4}  # reduce-scatter of one block


@dataclass
class RecipePlan:
    """The plan of a recipe on ``workers`` GPUs of ``gpu_gib`` each."""

    gpu: str
    gpu_gib: float
    workers: int
    n_params: int
    rows: int
    duration_s: float
    tokens: int
    accumulation: int
    plans: list[MemoryPlan]
    largest_rows: dict[float, dict[str, int]]
    """Longest duration of a bucket -> setting label -> the largest micro-batch (rows) that fits."""
    recipe_setting: str

    def fits(self, plan: MemoryPlan) -> bool:
        return plan.total <= self.gpu_gib * GIB


def _rows_and_accumulation(cfg: Config, workers: int) -> tuple[int, float, int]:
    """(rows of the recipe's micro-batch at its longest utterances, that duration, accumulation)."""
    tc = cfg.train
    longest = cfg.data.max_duration_s or 30.0
    if cfg.data.crop_s:  # self-supervised recipes train on windows of at most crop_s
        longest = min(longest, cfg.data.crop_s)
    if cfg.features.pad_to_s:
        longest = max(longest, cfg.features.pad_to_s)
    accum, budget_s = tc.accumulation(workers)
    if tc.global_batch_utterances is not None:
        rows = tc.micro_batch_utterances or math.ceil(tc.global_batch_utterances / workers)
    else:
        rows = max(1, int(budget_s // longest))
    return rows, longest, accum


def plan_recipe(cfg: Config, gpu: str, workers: int | None = None, vocab_size: int | None = None,
                specials: dict | None = None, durations_s: list[float] | None = None) -> RecipePlan:
    label, gib = gpu_gib(gpu)
    workers = workers or cfg.run.worker_range[1]
    spec = cfg.model
    if vocab_size is None:
        vocab_size, specials = vocabulary(cfg)
    vocab = vocab_size
    meta = build_meta(ModelSpec(family=spec.family, preset=spec.preset, overrides=dict(spec.overrides)), vocab,
                      specials)
    n_params = count_parameters(meta)
    largest_block = max((count_parameters(b) for _, s in activation_checkpointing.block_stacks(meta) for b in s),
                        default=0)
    precision = cfg.step.precision if cfg.step.precision != "auto" else ("bf16" if cfg.run.use_gpu else "fp32")
    rows, longest, accum = _rows_and_accumulation(cfg, workers)
    tokens = _tokens(cfg, longest, specials)
    fitted = activation_model(spec, vocab, specials, cfg, longest, rows, precision)
    act = fitted.at(longest, rows)
    settings = [("ddp", "none"), ("ddp", "blocks"), ("fsdp", "none"), ("fsdp", "blocks")]
    if spec.activation_checkpointing not in ("none", "blocks"):
        settings.append(("ddp", spec.activation_checkpointing))
    plans = []
    for parallelism, ac in settings:
        s = static_bytes(n_params, precision, cfg.step.ema_decay is not None, parallelism, workers, largest_block)
        p = MemoryPlan(parallelism, ac, activations=act.total(activation_checkpointing.parse(ac)), **s)
        if parallelism == "fsdp":
            p.notes.append("train.parallelism=fsdp is not built yet (issue 17): its figures are for planning")
        plans.append(p)
    # Per bucket: the same fit at the bucket's longest duration, one row, then as many rows as fit.
    largest: dict[float, dict[str, int]] = {}
    for d in durations_s or _bucket_durations(cfg, longest):
        largest[d] = {}
        one = fitted.at(d, 1)
        for p in plans:
            per_row = one.total(activation_checkpointing.parse(p.activation_checkpointing))
            largest[d][f"{p.parallelism}+{p.activation_checkpointing}"] = max(0, int((gib * GIB - p.static) // per_row))
    return RecipePlan(label, gib, workers, n_params, rows, longest, tokens, accum, plans, largest,
                      f"ddp+{spec.activation_checkpointing}")


def activation_model(spec: ModelSpec, vocab: int, specials: dict | None, cfg: Config, duration_s: float,
                     rows: int, precision: str) -> ActivationModel:
    """Traces of (at most) 2 rows at TRACE_S and 2 x TRACE_S (or the longest duration, if shorter):
    a whole micro-batch of the 1.5 B Whisper under CPU autocast (emulated bf16 on an AVX2 CPU) took
    100 s to trace here, one 30 s row of a large Conformer over 5 minutes."""
    traced_rows = min(rows, 2)
    short_s = min(duration_s, TRACE_S)
    model = ActivationModel(trace(spec, vocab, specials, traced_rows, short_s, _tokens(cfg, short_s, specials),
                                  precision), short_s, traced_rows=traced_rows)
    if short_s < duration_s:
        model.longer_s = min(duration_s, 2 * TRACE_S)
        model.longer = trace(spec, vocab, specials, traced_rows, model.longer_s,
                             _tokens(cfg, model.longer_s, specials), precision)
    return model


def _tokens(cfg: Config, duration_s: float, specials: dict | None = None) -> int:
    """Target tokens of a planned utterance: ~15 characters or ~4 subword tokens per second, at most
    what the family and text.max_target_tokens allow."""
    tokens = math.ceil(duration_s * TOKENS_PER_S.get(cfg.text.tokenizer, 4.0))
    limit = target_limits(cfg.model, specials, cfg.text.max_target_tokens).get("max_tokens")
    return min(tokens, limit) if limit else tokens


def _bucket_durations(cfg: Config, longest: float) -> list[float]:
    """Longest durations of the planned buckets: ``batching.duration_buckets`` (at most 6) equal steps up
    to the longest (the recipe's edges are quantiles of its corpus, which the plan does not read); one
    bucket when the front end pads every utterance to the same length."""
    if cfg.features.pad_to_s:
        return [longest]
    n = max(1, min(6, cfg.batching.duration_buckets))
    return [round(longest * k / n, 1) for k in range(1, n + 1)]


def vocabulary(cfg: Config) -> tuple[int, dict | None]:
    """(vocabulary size, special tokens) the recipe trains with: its tokenizer when this machine can
    read it, else (a tokenizer file in a bucket out of reach) the preset's published vocabulary
    (Whisper's), or the character tokenizer's."""
    from raytrain_speech.data.text import CharTokenizer
    from raytrain_speech.data.tokenizer import load_tokenizer
    from raytrain_speech.models import whisper
    from raytrain_speech.models.registry import resolve

    try:
        tokenizer = load_tokenizer(cfg.text, cfg.storage)
        return tokenizer.vocab_size, tokenizer.specials or None
    except Exception:
        arch = resolve(cfg.model)
        if cfg.model.family == "whisper" and getattr(arch, "vocab_size", None):
            return arch.vocab_size, whisper.published_specials(arch)
        return CharTokenizer().vocab_size, None


def render(plan: RecipePlan) -> str:
    """The plan as a console table, the verdicts, and the largest micro-batch per bucket."""
    gb = lambda b: f"{b / GIB:6.1f}"  # noqa: E731
    lines = [f"{plan.workers} x {plan.gpu} ({plan.gpu_gib:g} GiB each), {plan.n_params / 1e9:.3f} B parameters, "
             f"micro-batch {plan.rows} x {plan.duration_s:g} s ({plan.tokens} target tokens), "
             f"accumulation {plan.accumulation}",
             "", "| setting | weights | grads | optimizer | buffers | activations | context | total GiB | fits |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for p in plan.plans:
        name = f"{p.parallelism} + AC {p.activation_checkpointing}"
        lines.append(f"| {name} | {gb(p.weights)} | {gb(p.gradients)} | {gb(p.optimizer)} | {gb(p.buffers)} | "
                     f"{gb(p.activations)} | {gb(p.context)} | {gb(p.total)} | {'yes' if plan.fits(p) else 'NO'} |")
    lines.append("")
    for p in plan.plans:
        verdict = "fits" if plan.fits(p) else "does not fit"
        mark = " (the recipe's setting)" if f"{p.parallelism}+{p.activation_checkpointing}" == plan.recipe_setting else ""
        lines.append(f"{p.parallelism} with activation checkpointing {p.activation_checkpointing}{mark}: {verdict} "
                     f"({p.total / GIB:.1f} of {plan.gpu_gib:g} GiB)" + "".join(f"; {n}" for n in p.notes))
    lines += ["", "largest micro-batch (utterances) per bucket, by its longest duration:",
              "| bucket up to | " + " | ".join(plan.largest_rows[next(iter(plan.largest_rows))]) + " |",
              "|---|" + "---:|" * len(plan.plans)]
    for d, by in plan.largest_rows.items():
        lines.append(f"| {d:g} s | " + " | ".join(str(v) for v in by.values()) + " |")
    return "\n".join(lines)


def plan_command(cfg: Config, gpu: str, workers: int | None) -> int:
    """``raytrain-speech plan``: the plan printed; 2 and one line for an unknown --gpu."""
    import sys

    try:
        gpu_gib(gpu)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"[plan] tracing {cfg.model.family}/{cfg.model.preset} on this CPU (two of its blocks on 2 utterances "
          "of 4 s and of 8 s: seconds for small models, ~30 s for 1.5 B) ...", flush=True)
    print(render(plan_recipe(cfg, gpu, workers)))
    return 0

