"""Training-step throughput of our model families against Hugging Face ``transformers``, same process.

Why: the recipes promise that our plain-torch models train at least as fast as the reference
implementation people would otherwise use (goal: >= 1.3x the HF step throughput, and MFU >= 40% in
bf16 on an H100 for the Transformer-dominated presets). This measures it on the step that training
runs: our side is ``train.step.Stepper`` with the family's objective (``registry.objective_for``),
so autocast, the loss normaliser, gradient clipping, the device syncs for the logged stats and the
AdamW update (``train.optim.build_optimizer``) are all timed. The HF side is a plain loop (autocast
forward, ``loss.backward()``, clip to 1.0, the same AdamW parameter groups). Both see the same
batch (B rows of ``--clip-s`` seconds, no padding, the same random log-mel / waveform values),
the same architecture config, dropout, precision and optimizer; steps alternate between the two
(ours, HF, HF, ours, ...) so a busy machine slows both alike. Printed: audio-seconds per second at
the median step time of each, ratio = HF median step time / ours (> 1: ours is faster), and the
best-step ratio (fastest HF step / fastest of ours), which a shared machine's load disturbs least.

What is compared, per family:

- whisper: ``models.whisper.Whisper`` vs ``WhisperForConditionalGeneration`` with SDPA attention (same
  width, depth, heads, MLP, no dropout as in Whisper, vocabulary = our character ids + specials,
  decoder input = our prompt + transcript, labels = our teacher-forced targets; HF's encoder takes
  no padding mask, ours builds one from the lengths).
- wavlm: ``models.wavlm.WavLMPretraining`` (masked log-mel reconstruction) vs HF ``WavLMModel``'s
  ``masked_spec_embed`` + ``encoder`` (grouped pos-conv + gated relative-position Transformer; HF
  has only an eager attention for WavLM) behind OUR log-mel conv front end and a Linear head with
  the same masked L1 loss: HF WavLM only reads waveforms through its own CNN, so the front end,
  head and loss are the same code on both sides and the difference is the Transformer (and the
  step around it).
- wav2vec2: ``models.wav2vec2.Wav2Vec2Pretraining`` vs ``Wav2Vec2ForPreTraining`` with SDPA attention
  (same CNN, Transformer, quantizer, 100 negatives); HF gets our span mask as ``mask_time_indices``
  and negatives drawn once by its own ``_sample_negative_indices`` (its data collator's job,
  untimed), and its summed loss is divided by the masked frames. HF quantizes and scores every
  frame, ours only the masked ones. Layer drop is 0 on both so every step does the same work.

MFU (CUDA only) = model FLOPs of one training step / median step time / the device's dense bf16
peak (table below; ``--peak-tflops`` for others). Model FLOPs are those of OUR step (forward and
backward) counted from op shapes by ``torch.utils.flop_counter.FlopCounterMode``: matmuls,
convolutions and attention (full T x S even where causal); norms, softmax, elementwise ops and the
optimizer are not counted. The same count is used for both columns, so MFU_ours / MFU_hf = ratio.

Run (pure torch + transformers, no Ray needed; ``pip install transformers``):

    python benchmarks/step.py --device cuda                  # mid-size presets, bf16 where native
    python benchmarks/step.py --device cpu                   # small sizes, ~1-2 minutes on 2 idle cores
    python benchmarks/step.py --device cuda --families whisper --override whisper.d_model=1024

Shapes: B = rows, F = log-mel frames (10 ms), M = mel bins, S = waveform samples, T = encoder
frames, L = decoder tokens, P = predicted values per encoder frame, K = negatives.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import yaml
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

try:
    import transformers
    from transformers.models.wav2vec2.modeling_wav2vec2 import _sample_negative_indices
except ImportError:
    raise SystemExit("benchmarks/step.py compares against Hugging Face transformers, which the project does "
                     "not depend on: pip install transformers") from None

from raytrain_speech.batch import Batch
from raytrain_speech.config import OptimConfig, StepConfig
from raytrain_speech.data.text import CharTokenizer
from raytrain_speech.models import registry
from raytrain_speech.models.layers import teacher_forcing
from raytrain_speech.models.masking import model_span_mask
from raytrain_speech.models.wavlm import SUBSAMPLING, LogMelConvEncoder
from raytrain_speech.train.optim import build_optimizer
from raytrain_speech.train.step import Stepper, resolve_precision

OPTIM = OptimConfig(lr_peak=1e-4)
CLIP_NORM = 1.0
CHARS_PER_S = 15.0
"""Transcript length per second of speech (read English) for the decoder's token count."""

# (family, our preset, overrides) per size; "mid" is the mid-size preset per family.
SIZES: dict[str, dict[str, tuple[str, dict]]] = {
    "small": {  # 256 wide, 2 Transformer blocks (per stack): minutes on a 2-core CPU
        "whisper": ("tiny", {"d_model": 256, "encoder_layers": 2, "decoder_layers": 2, "num_heads": 4,
                             "ffn_dim": 1024, "dropout": 0.0}),
        "wavlm": ("tiny", {"d_model": 256, "num_layers": 2, "num_heads": 4, "ffn_dim": 1024,
                           "conv_channels": 32, "layer_norm_first": False}),
        "wav2vec2": ("base", {"conv_channels": 64, "d_model": 256, "num_layers": 2, "num_heads": 4,
                              "ffn_dim": 1024, "pos_conv_kernel": 64, "layer_drop": 0.0}),
    },
    "mid": {  # Whisper "small" (768 wide, 12 + 12 layers), WavLM Base+, wav2vec 2.0 Base
        "whisper": ("tiny", {"d_model": 768, "encoder_layers": 12, "decoder_layers": 12, "num_heads": 12,
                             "ffn_dim": 3072, "dropout": 0.0}),
        "wavlm": ("base_plus", {}),
        "wav2vec2": ("base", {"layer_drop": 0.0}),
    },
}

PEAK_BF16_FLOPS = (  # dense (no sparsity) bf16 tensor-core peak by device-name substring, first match wins
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("H800", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12),
)


@dataclass
class Pair:
    """One family's two step functions over the same batch."""

    family: str
    compared: str
    ours: Callable[[], None]
    hf: Callable[[], None]
    audio_s: float
    flops: float = 0.0


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision])


def our_step(spec: registry.ModelSpec, model: nn.Module, batch: Batch, device: torch.device,
             precision: str) -> Callable[[], None]:
    """Exactly the training path: the loop's unit count, then one Stepper step of one micro-batch."""
    objective = registry.objective_for(spec)
    stepper = Stepper(model, build_optimizer(model, OPTIM), StepConfig(precision=precision, grad_clip_norm=CLIP_NORM),
                      objective.loss, device)
    return lambda: stepper.step([batch], objective.units(batch), 1)


def hf_step(model: nn.Module, loss_fn: Callable[[], torch.Tensor], device: torch.device,
            precision: str) -> Callable[[], None]:
    """A plain HF-style step: autocast forward and loss, backward, clip, AdamW."""
    optimizer = build_optimizer(model, OPTIM)
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        with autocast(device, precision):
            loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def make_batch(features: torch.Tensor, lengths_B: torch.Tensor, targets_BL: torch.Tensor, audio_s: float) -> Batch:
    b = features.shape[0]
    return Batch(features, lengths_B, targets_BL, torch.full((b,), targets_BL.shape[1], dtype=torch.int64,
                 device=targets_BL.device), indices=list(range(b)), audio_s=audio_s, languages=["en"] * b)


def build_ours(family: str, preset: str, overrides: dict, device: torch.device):
    spec = registry.ModelSpec(family=family, preset=preset, overrides=overrides)
    return spec, registry.resolve(spec), registry.build_model(spec, CharTokenizer().vocab_size).to(device).train()


def whisper_pair(preset, overrides, rows, clip_s, device, precision) -> Pair:
    spec, cfg, model = build_ours("whisper", preset, overrides, device)
    frames, chars = 2 * round(clip_s * 50), round(clip_s * CHARS_PER_S)  # F even: HF wants exactly 2 x T
    vocab = model.decoder.embed.num_embeddings
    feats_BFM = torch.randn(rows, frames, cfg.n_mels, device=device)
    targets_BL = torch.randint(2, CharTokenizer().vocab_size, (rows, chars), device=device)
    batch = make_batch(feats_BFM, torch.full((rows,), frames, device=device), targets_BL, rows * clip_s)
    decoder_in_BL, decoder_out_BL = teacher_forcing(  # our layout: HF gets the same decoder input and labels
        targets_BL, batch.target_lengths_B, model.prefix(batch.languages, rows, device), model.eot_id, model.eot_id)
    hf_cfg = transformers.WhisperConfig(
        vocab_size=vocab, num_mel_bins=cfg.n_mels, d_model=cfg.d_model, encoder_layers=cfg.encoder_layers,
        decoder_layers=cfg.decoder_layers, encoder_attention_heads=cfg.num_heads, decoder_attention_heads=cfg.num_heads,
        encoder_ffn_dim=cfg.ffn_dim or 4 * cfg.d_model, decoder_ffn_dim=cfg.ffn_dim or 4 * cfg.d_model,
        max_source_positions=frames // 2, max_target_positions=cfg.max_target_positions, dropout=cfg.dropout,
        attention_dropout=cfg.dropout, activation_dropout=0.0, pad_token_id=model.eot_id, eos_token_id=model.eot_id,
        bos_token_id=model.sot_id, decoder_start_token_id=model.sot_id, suppress_tokens=None,
        begin_suppress_tokens=None, use_cache=False, attn_implementation="sdpa")
    hf = transformers.WhisperForConditionalGeneration(hf_cfg).to(device).train()
    feats_BMF = feats_BFM.transpose(1, 2).contiguous()

    def hf_loss() -> torch.Tensor:
        return hf(input_features=feats_BMF, decoder_input_ids=decoder_in_BL, labels=decoder_out_BL).loss
    return Pair("whisper", "full models: Whisper vs WhisperForConditionalGeneration",
                our_step(spec, model, batch, device, precision), hf_step(hf, hf_loss, device, precision),
                batch.audio_s)


class HFWavLMMasked(nn.Module):
    """Our log-mel front end, then HF WavLMModel's mask embedding and Transformer encoder, then a
    Linear head under the masked L1 loss: HF's Transformer doing the work that ours does."""

    def __init__(self, cfg, hf_cfg: transformers.WavLMConfig):
        super().__init__()
        hf = transformers.WavLMModel(hf_cfg)
        self.front = LogMelConvEncoder(cfg.n_mels, cfg.conv_channels, cfg.d_model, cfg.dropout)
        self.mask_emb, self.encoder = hf.masked_spec_embed, hf.encoder
        self.head = nn.Linear(cfg.d_model, SUBSAMPLING * cfg.n_mels)

    def forward(self, features_BFM: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
        x_BTD = self.front(features_BFM)
        b, t, _ = x_BTD.shape
        x_BTD = torch.where(mask_BT[..., None], self.mask_emb.to(x_BTD.dtype), x_BTD)
        pred_BTP = self.head(self.encoder(x_BTD).last_hidden_state).float()
        target_BTP = features_BFM[:, : t * SUBSAMPLING].reshape(b, t, -1)
        error_BT = (pred_BTP - target_BTP).abs().mean(dim=-1)
        return torch.where(mask_BT, error_BT, 0.0).sum() / mask_BT.sum()


def wavlm_pair(preset, overrides, rows, clip_s, device, precision) -> Pair:
    spec, cfg, model = build_ours("wavlm", preset, overrides, device)
    frames = SUBSAMPLING * round(clip_s * 100 / SUBSAMPLING)
    lengths_B = torch.full((rows,), frames, device=device)
    batch = make_batch(torch.randn(rows, frames, cfg.n_mels, device=device), lengths_B,
                       torch.zeros(rows, 1, dtype=torch.int64, device=device), rows * clip_s)
    batch.mask_BT = model_span_mask(model, batch)
    hf_cfg = transformers.WavLMConfig(
        hidden_size=cfg.d_model, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.ffn_dim, hidden_dropout=cfg.dropout, attention_dropout=cfg.dropout,
        activation_dropout=cfg.dropout, feat_proj_dropout=cfg.dropout, layerdrop=0.0,
        num_conv_pos_embeddings=cfg.pos_conv_kernel, num_conv_pos_embedding_groups=cfg.pos_conv_groups,
        num_buckets=cfg.num_buckets, max_bucket_distance=cfg.max_distance_frames,
        do_stable_layer_norm=cfg.layer_norm_first)
    hf = HFWavLMMasked(cfg, hf_cfg).to(device).train()
    return Pair("wavlm", "WavLMPretraining vs our log-mel front end + HF WavLMModel.encoder + same head and L1 loss",
                our_step(spec, model, batch, device, precision),
                hf_step(hf, lambda: hf(batch.features_BFM, batch.mask_BT), device, precision), batch.audio_s)


def wav2vec2_pair(preset, overrides, rows, clip_s, device, precision) -> Pair:
    spec, cfg, model = build_ours("wav2vec2", preset, overrides, device)
    samples = round(clip_s * cfg.sample_rate_hz)
    lengths_B = torch.full((rows,), samples, device=device)
    batch = make_batch(0.1 * torch.randn(rows, samples, device=device), lengths_B,
                       torch.zeros(rows, 1, dtype=torch.int64, device=device), rows * clip_s)
    batch.mask_BT = model_span_mask(model, batch)
    hf_cfg = transformers.Wav2Vec2Config(
        conv_dim=[cfg.conv_channels] * len(cfg.conv_kernels), conv_kernel=list(cfg.conv_kernels),
        conv_stride=list(cfg.conv_strides), conv_bias=cfg.conv_bias,
        feat_extract_norm="group" if cfg.extractor_mode == "group_norm" else "layer",
        do_stable_layer_norm=cfg.layer_norm_first, hidden_size=cfg.d_model, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.ffn_dim, num_conv_pos_embeddings=cfg.pos_conv_kernel,
        num_conv_pos_embedding_groups=cfg.pos_conv_groups, hidden_dropout=cfg.dropout,
        attention_dropout=cfg.attention_dropout, activation_dropout=cfg.activation_dropout,
        feat_proj_dropout=cfg.input_dropout, feat_quantizer_dropout=cfg.feature_dropout, layerdrop=cfg.layer_drop,
        num_codevector_groups=cfg.codebook_groups, num_codevectors_per_group=cfg.codebook_entries,
        codevector_dim=cfg.codevector_dim, proj_codevector_dim=cfg.final_dim, num_negatives=cfg.num_negatives,
        contrastive_logits_temperature=cfg.logit_temperature, diversity_loss_weight=cfg.diversity_weight,
        apply_spec_augment=True, mask_feature_prob=0.0, attn_implementation="sdpa")
    hf = transformers.Wav2Vec2ForPreTraining(hf_cfg).to(device).train()
    hf.set_gumbel_temperature(model.gumbel_temperature)
    mask_BT = batch.mask_BT
    negatives_BTK = torch.from_numpy(_sample_negative_indices(tuple(mask_BT.shape), cfg.num_negatives,
                                                              mask_BT.cpu().numpy())).to(device)

    def hf_loss() -> torch.Tensor:  # HF's loss is a sum; divide by masked frames like ours
        out = hf(batch.features_BFM, mask_time_indices=mask_BT, sampled_negative_indices=negatives_BTK)
        return out.loss / mask_BT.sum()
    return Pair("wav2vec2", "full models: Wav2Vec2Pretraining vs Wav2Vec2ForPreTraining",
                our_step(spec, model, batch, device, precision), hf_step(hf, hf_loss, device, precision),
                batch.audio_s)


BUILDERS = {"whisper": whisper_pair, "wavlm": wavlm_pair, "wav2vec2": wav2vec2_pair}


def count_flops(step: Callable[[], None]) -> float:
    """FLOPs of one call (see the module docstring); the CPU flash-attention kernels are added by hand
    because torch's table only knows the CUDA ones."""
    cpu_attention = {
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default:
            lambda q, k, v, *args, out_shape=None, **kw: sdpa_flop_count(q, k, v),
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default:
            lambda grad, q, k, v, *args, out_shape=None, **kw: sdpa_backward_flop_count(grad, q, k, v),
    }
    counter = FlopCounterMode(display=False, custom_mapping=cpu_attention)
    with counter:
        step()
    return float(counter.get_total_flops())


def time_interleaved(pair: Pair, steps: int, warmup: int, sync: Callable[[], None]) -> tuple[list, list]:
    """Per-step wall times of ours and HF, alternating which goes first so drift hits both alike."""
    for _ in range(warmup):
        pair.ours()
        pair.hf()
    times: dict[str, list[float]] = {"ours": [], "hf": []}
    for i in range(steps):
        for name in (("ours", "hf") if i % 2 == 0 else ("hf", "ours")):
            sync()
            start = time.perf_counter()
            getattr(pair, name)()
            sync()
            times[name].append(time.perf_counter() - start)
    return times["ours"], times["hf"]


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def parse_overrides(items: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for item in items:
        key, _, value = item.partition("=")
        family, _, field = key.partition(".")
        if not field or not value:
            raise SystemExit(f"--override {item!r}: expected FAMILY.FIELD=VALUE")
        out.setdefault(family, {})[field] = yaml.safe_load(value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--families", default="whisper,wavlm,wav2vec2")
    ap.add_argument("--size", choices=sorted(SIZES), help="model sizes (default: mid on cuda, small on cpu)")
    ap.add_argument("--override", action="append", default=[], metavar="FAMILY.FIELD=VALUE",
                    help="a field of our family config (the HF config follows), e.g. whisper.d_model=1024")
    ap.add_argument("--batch-audio-s", type=float, help="audio seconds per step (default: 320 cuda, 8 cpu)")
    ap.add_argument("--clip-s", type=float, help="seconds per row, no padding (default: 16 cuda, 4 cpu)")
    ap.add_argument("--steps", type=int, help="timed steps per implementation (default: 20 cuda, 30 cpu)")
    ap.add_argument("--warmup-steps", type=int, default=3, help="untimed steps of each first")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                    help="auto = bf16 where native (as training's default), else fp32")
    ap.add_argument("--peak-tflops", type=float, help="dense bf16 peak for MFU when the device is not in the table")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    size = args.size or ("mid" if cuda else "small")
    batch_s, clip_s = args.batch_audio_s or (320.0 if cuda else 8.0), args.clip_s or (16.0 if cuda else 4.0)
    steps = args.steps or (20 if cuda else 30)
    rows = max(1, round(batch_s / clip_s))
    device = torch.device(args.device)
    precision = resolve_precision(args.precision, device)
    overrides = parse_overrides(args.override)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    peak = peak_flops(device, args.peak_tflops)
    where = torch.cuda.get_device_name(device) if cuda else f"cpu, {torch.get_num_threads()} threads"
    print(f"# {where} | torch {torch.__version__} | transformers {transformers.__version__} | {precision} | "
          f"size {size} | {rows} rows x {clip_s:g} s = {rows * clip_s:g} audio-s per step | "
          f"median of {steps} interleaved steps after {args.warmup_steps} warm-up")
    results = []
    for family in [f.strip() for f in args.families.split(",") if f.strip()]:
        if family not in BUILDERS:
            raise SystemExit(f"--families: unknown {family!r} (known: {', '.join(BUILDERS)})")
        preset, fields = SIZES[size][family]
        torch.manual_seed(0)
        pair = BUILDERS[family](preset, {**fields, **overrides.get(family, {})}, rows, clip_s, device, precision)
        pair.flops = count_flops(pair.ours)
        ours_s, hf_s = time_interleaved(pair, steps, args.warmup_steps, sync)
        results.append((family, pair.compared, pair.audio_s, pair.flops, ours_s, hf_s))
        print(f"# {family}: step s ours {min(ours_s):.3f}-{max(ours_s):.3f}, HF {min(hf_s):.3f}-{max(hf_s):.3f}",
              flush=True)
        del pair  # frees both models before the next family is built
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    header = f"{'family':<10} {'ours a-s/s':>11} {'HF a-s/s':>10} {'ratio':>7} {'best-step ratio':>16} {'GFLOP/step':>11}"
    header += f" {'MFU ours':>9} {'MFU HF':>8}" if peak else ""
    print(header + "  compared")
    for family, compared, audio_s, flops, ours_s, hf_s in results:
        ours_t, hf_t = statistics.median(ours_s), statistics.median(hf_s)
        line = (f"{family:<10} {audio_s / ours_t:>11.1f} {audio_s / hf_t:>10.1f} "
                f"{hf_t / ours_t:>6.2f}x {min(hf_s) / min(ours_s):>15.2f}x {flops / 1e9:>11.1f}")
        if peak:
            line += f" {flops / ours_t / peak:>9.1%} {flops / hf_t / peak:>8.1%}"
        print(f"{line}  {compared}")


if __name__ == "__main__":
    main()
