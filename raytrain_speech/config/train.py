"""Config sections of training: the run on its cluster (``run``), the loop (``train``), the optimizer and
schedule (``optim``) and the numerics of one step (``step``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from raytrain_speech.config.schema import require


@dataclass
class LaunchConfig:
    """The Ray side of a run: its name and storage, workers, fault budget, cluster connection."""

    backend: Literal["ray", "local"] = "ray"
    """ray: Ray Train workers fed by Ray Data (one per GPU, elastic, fault tolerant); local: the same
    Trainer and preprocessing in this one process on one device, with no Ray at all (debugging,
    single-GPU boxes, GPU machines without Ray). Same checkpoints either way: a run resumes under
    the other backend."""
    name: str = "demo"
    """Run name; re-running with the same name and storage_path resumes from the last checkpoint."""
    storage_path: str = "runs"
    """Where run directories go: a local path or s3://bucket/prefix."""
    num_workers: int | tuple[int, int] = 2
    """Training workers (one per GPU when use_gpu); [min, max] makes the run elastic: it starts with
    what the cluster can place, grows when nodes appear and shrinks when they go."""
    use_gpu: bool = False
    """One GPU per worker."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per training worker."""
    worker_resources: dict = field(default_factory=dict)
    """Extra Ray resources per training worker, e.g. {A100: 1} to keep workers on one node group."""
    elastic_resize_interval_s: float = 60.0
    """With [min, max] workers: how often Train looks for room to grow the worker group."""
    max_failures: int = 3
    """Worker-group restarts allowed after failures (-1 = unlimited)."""
    checkpoints_to_keep: int = 2
    """Checkpoints kept in storage (the latest is always kept, whatever its score)."""
    checkpoint_score_attribute: str | None = None
    """Keep the best checkpoints by this reported metric (e.g. valid_loss) instead of the latest;
    validation then runs at every checkpoint."""
    checkpoint_score_order: Literal["min", "max"] = "min"
    """Whether a lower or higher checkpoint_score_attribute is better."""
    max_preemption_failures: int = -1
    """Node preemptions (spot reclaims) to recover from, counted apart from max_failures (-1 = no limit)."""
    ray_address: str | None = None
    """Cluster to join (e.g. auto); None = $RAY_ADDRESS if set, else start a local Ray."""
    local_num_cpus: int | None = None
    """Logical CPUs of a local Ray; None = cores + training workers' CPUs, so data tasks still run."""
    object_store_memory_mb: int = 1536
    """Object store size of a local Ray (the default, 30% of RAM, is too much on a laptop)."""
    trackers: tuple[str, ...] = ("tensorboard",)
    """Where rank 0's metrics go besides metrics.jsonl: tensorboard = event files under
    <run dir>/tensorboard (`tensorboard --logdir runs/`); [] = none (train/trackers.py)."""

    def validate(self) -> None:
        require(bool(self.name) and "/" not in self.name, "run.name", "must be a non-empty name without '/'")
        lo, hi = self.worker_range
        require(1 <= lo <= hi, "run.num_workers", "must be >= 1 (or [min, max] with 1 <= min <= max)")
        require(self.cpus_per_worker > 0, "run.cpus_per_worker", "must be positive")
        require(self.checkpoints_to_keep >= 1, "run.checkpoints_to_keep", "must be >= 1")


    @property
    def worker_range(self) -> tuple[int, int]:
        n = self.num_workers
        return (n, n) if isinstance(n, int) else (n[0], n[1])


@dataclass
class TrainConfig:
    """Length of training, the global batch promise, and reporting cadence."""

    seed: int = 0
    """Seeds model init and per-epoch batch shuffling."""
    max_steps: int = 1500
    """Optimizer steps in the whole run (the LR schedule spans these)."""
    max_epochs: int | None = None
    """Stop earlier after this many passes over the train split (None = no limit)."""
    global_batch_audio_s: float = 120.0
    """Padded audio seconds per optimizer step summed over all workers and micro-batches; kept
    constant when the worker count changes (accumulation absorbs the difference)."""
    micro_batch_audio_s: float | None = None
    """Most padded audio seconds one worker processes at once (its memory bound); gradient
    accumulation = ceil(global / (workers x this)). None = no accumulation."""
    global_batch_utterances: int | None = None
    """Utterances per optimizer step over all workers (recipes that state the batch as a count, e.g.
    2048); replaces global_batch_audio_s when set. Micro-batches are then cut by count, still
    duration-sorted so padding stays low."""
    micro_batch_utterances: int | None = None
    """Most utterances one worker processes at once when the global batch is a count; accumulation
    = ceil(global / (workers x this)). None = no accumulation."""
    init_from: str | None = None
    """Fine-tuning: a checkpoint (or a run directory: its latest checkpoint) of a pretraining run
    whose encoder initialises this model, or hf:PATH, a Hugging Face model directory. Ignored when the run resumes from its own checkpoint."""
    init_strict: bool = True
    """Fine-tuning from hf:PATH: a checkpoint tensor that nothing takes, or one of another shape, is
    an error naming it (false: load what fits and report the rest)."""
    freeze_feature_encoder_steps: int = 0
    """Fine-tuning: keep the pretrained convolutional feature encoder fixed for this many steps."""
    freeze_pretrained_steps: int = 0
    """Fine-tuning: train only the new parameters (the output head) for this many steps, with every
    parameter loaded by init_from fixed, so a random head's first gradients cannot wreck the pretrained
    encoder (fairseq's freeze_finetune_updates)."""
    malloc_trim_every_steps: int = 10
    """Give freed heap memory back to the OS every this many steps (glibc ``malloc_trim``; 0 = never):
    variable-length batches otherwise fragment the heap and a CPU worker's RSS grows by GBs an hour."""
    log_every_steps: int = 10
    """Report metrics (a barrier across ranks) every this many steps."""
    checkpoint_every_steps: int = 250
    """Save a full-state checkpoint every this many steps (and always at the last step)."""
    torch_threads: int = 1
    """torch intra-op threads per worker (CPU training: cores / workers)."""
    validate_every_steps: int | None = None
    """Loss and greedy WER on data.valid_split every this many steps (None = only if a checkpoint
    score needs it)."""
    early_stop_patience: int | None = None
    """Stop after this many validations in a row without improving early_stop_metric (None = never)."""
    early_stop_metric: Literal["valid_loss", "valid_wer"] = "valid_loss"
    """Validation metric that early stopping watches (lower is better)."""
    early_stop_min_delta: float = 0.0
    """Smallest decrease that counts as an improvement."""
    checkpoint_upload: Literal["async", "sync"] = "async"
    """async: training continues while Ray uploads the checkpoint; sync: the step waits for it."""
    checkpoint_on_preemption: bool = True
    """When Ray reports that a node of this run is being drained (spot reclaim), checkpoint at once."""
    trained_log_dir: str | None = None
    """Audit/test hook: each rank appends the utterance indices of every step to a JSONL file here."""
    fault_checkpoint_delay_s: float = 0.0
    """Fault-injection hook for tests: rank 0 sleeps this long inside each checkpoint write of the
    run's first attempt, so a test can kill it mid-write."""

    def validate(self) -> None:
        require(self.max_steps >= 1, "train.max_steps", "must be >= 1")
        require(self.global_batch_audio_s > 0, "train.global_batch_audio_s", "must be positive")
        require(self.micro_batch_audio_s is None or self.micro_batch_audio_s > 0, "train.micro_batch_audio_s",
                "must be positive or null")
        require(self.log_every_steps >= 1, "train.log_every_steps", "must be >= 1")
        require(self.checkpoint_every_steps >= 1, "train.checkpoint_every_steps", "must be >= 1")
        require(self.torch_threads >= 1, "train.torch_threads", "must be >= 1")
        require(self.validate_every_steps is None or self.validate_every_steps >= 1, "train.validate_every_steps",
                "must be >= 1 or null")
        require(self.early_stop_patience is None or self.validate_every_steps is not None,
                "train.early_stop_patience", "needs train.validate_every_steps")
        require(self.global_batch_utterances is None or self.global_batch_utterances >= 1,
                "train.global_batch_utterances", "must be >= 1 or null")
        require(self.micro_batch_utterances is None or self.micro_batch_utterances >= 1,
                "train.micro_batch_utterances", "must be >= 1 or null")
        require(self.micro_batch_utterances is None or self.global_batch_utterances is not None,
                "train.micro_batch_utterances", "needs train.global_batch_utterances")
        require(self.freeze_feature_encoder_steps >= 0, "train.freeze_feature_encoder_steps", "must be >= 0")
        require(self.freeze_pretrained_steps >= 0, "train.freeze_pretrained_steps", "must be >= 0")
        require(self.malloc_trim_every_steps >= 0, "train.malloc_trim_every_steps", "must be >= 0")

    def utterance_cap(self, world_size: int) -> int | None:
        """Utterances per micro-batch when the global batch is a count (None = cut by seconds).

        Rounded up when the count does not divide evenly over workers x micro-batches; the run card
        records the effective global batch (workers x accumulation x this)."""
        if self.global_batch_utterances is None:
            return None
        accum, _ = self.accumulation(world_size)
        return math.ceil(self.global_batch_utterances / (world_size * accum))

    def accumulation(self, world_size: int) -> tuple[int, float]:
        """(micro-batches per worker per step, padded-seconds budget per micro-batch) at this size."""
        if self.global_batch_utterances is not None:
            per_micro = self.micro_batch_utterances or self.global_batch_utterances
            return math.ceil(self.global_batch_utterances / (world_size * per_micro) - 1e-9), math.inf
        if self.micro_batch_audio_s is None:
            return 1, self.global_batch_audio_s / world_size
        accum = math.ceil(self.global_batch_audio_s / (world_size * self.micro_batch_audio_s) - 1e-9)
        return accum, self.global_batch_audio_s / (world_size * accum)


@dataclass
class OptimConfig:
    """Optimizer and LR schedule."""

    name: Literal["adamw", "adam", "adam_l2"] = "adamw"
    """adamw or adam: Adam with decoupled weight decay (fairseq's ``adam`` is this AdamW variant: it
    shrinks the weights by lr x decay before the moment update, exactly torch.optim.AdamW); adam_l2:
    classic Adam with the decay added to the gradient (torch.optim.Adam's weight_decay), a much weaker
    regulariser under Adam's normalisation, for reproducing runs that used it."""
    lr_peak: float = 3e-3
    """LR reached at the end of warmup."""
    betas: tuple[float, float] = (0.9, 0.98)
    """Adam moment decay rates."""
    eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 0.01
    """Weight decay on matrices and convolution kernels (never on norms and biases)."""
    warmup_steps: int = 200
    """Linear warmup from 0 to lr_peak, in optimizer steps."""
    warmup_fraction: float | None = None
    """Warmup as a fraction of total steps; replaces warmup_steps when set."""
    schedule: Literal["cosine", "polynomial", "constant", "tri_stage"] = "cosine"
    """Decay after warmup; tri_stage = fairseq's fine-tuning schedule: hold lr_peak for
    hold_fraction of the steps, then decay exponentially to lr_final."""
    hold_fraction: float = 0.4
    """tri_stage: share of all steps held at lr_peak after warmup (fairseq: 0.4 of 0.1/0.4/0.5)."""
    lr_final: float = 1e-6
    """LR at the last step (cosine and polynomial)."""
    poly_power: float = 1.0
    """Exponent of polynomial decay (0.5 = square-root decay)."""
    pretrained_lr_peak: float | None = None
    """Fine-tuning: peak LR of the parameters loaded by train.init_from (e.g. 1e-5) while new layers
    use lr_peak; both follow the same schedule shape. None = lr_peak for all."""

    def validate(self) -> None:
        require(self.lr_peak > 0, "optim.lr_peak", "must be positive")
        require(0 <= self.lr_final <= self.lr_peak, "optim.lr_final", "must be in [0, lr_peak]")
        require(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        require(self.warmup_fraction is None or 0 <= self.warmup_fraction < 1, "optim.warmup_fraction",
                "must be in [0, 1)")
        require(all(0 <= b < 1 for b in self.betas), "optim.betas", "must be in [0, 1)")
        require(0 <= self.hold_fraction < 1, "optim.hold_fraction", "must be in [0, 1)")
        require(self.schedule != "tri_stage" or self.lr_final > 0, "optim.lr_final",
                "must be positive with tri_stage (exponential decay; fairseq: 0.05 x lr_peak)")
        require(self.pretrained_lr_peak is None or self.pretrained_lr_peak > 0, "optim.pretrained_lr_peak",
                "must be positive or null")


@dataclass
class StepConfig:
    """Numerics of one optimizer step."""

    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """fp32; bf16 autocast; fp16 autocast with dynamic loss scaling; auto = bf16 where the
    hardware computes it natively (Ampere+ GPUs, CPUs with AVX512-BF16/AMX), else fp32."""
    grad_clip_norm: float | None = None
    """Clip the global gradient L2 norm to this (None = no clipping)."""
    ema_decay: float | None = None
    """Keep an exponential moving average of the weights with this per-step decay (e.g. 0.999);
    it is saved in checkpoints and used for validation and evaluation. None = no EMA."""

    def validate(self) -> None:
        require(self.grad_clip_norm is None or self.grad_clip_norm > 0, "step.grad_clip_norm",
                "must be positive or null")
        require(self.ema_decay is None or 0 < self.ema_decay < 1, "step.ema_decay", "must be in (0, 1) or null")
