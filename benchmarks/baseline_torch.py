"""Plain-torch baseline: the demo's model, front end and step with no Ray, for calibration.

Loads a shard corpus into memory once, trains the tiny Conformer-CTC with the project's Stepper on
this process's threads, and prints throughput (audio-seconds per second) and test WER at intervals.
The Ray demo's throughput divided by this one is Ray's overhead ratio (see docs/LOG.md).

    python benchmarks/baseline_torch.py --data data/demo --steps 600 --batch-audio-s 120
"""

from __future__ import annotations

import argparse
import time

import torch

from raytrain_speech.config import (
    BatchingConfig,
    FeatureConfig,
    ModelSpec,
    OptimConfig,
    StepConfig,
    TextConfig,
)
from raytrain_speech.data import corpus
from raytrain_speech.data.batching import batch_by_duration, collate
from raytrain_speech.data.preprocess import Preprocessor, iter_table, to_utterances
from raytrain_speech.evaluate.decode import ctc_greedy
from raytrain_speech.evaluate.wer import error_rates
from raytrain_speech.models.registry import build_model, count_parameters
from raytrain_speech.objectives import ctc
from raytrain_speech.train.optim import build_optimizer, lr_at, set_lr
from raytrain_speech.train.step import Stepper


def load_split(root: str, split: str, pre: Preprocessor):
    utts = []
    for uri in corpus.shard_uris(root, split):
        for batch in iter_table(corpus.read_shard(uri), pre):
            utts.extend(to_utterances(batch)[0])
    return utts


@torch.no_grad()
def evaluate(model, utts, tokenizer, batch_audio_s=200.0):
    model.eval()
    refs, hyps = [], []
    for group in batch_by_duration(utts, batch_audio_s, BatchingConfig()):
        b = collate(group)
        out = model(b)
        hyps += [tokenizer.decode(ids) for ids in ctc_greedy(out["log_probs_BTV"], out["lengths_B"])]
        refs += b.texts
    return error_rates(refs, hyps)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-audio-s", type=float, default=120.0)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--preset", default="tiny")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    pre = Preprocessor(FeatureConfig(), TextConfig())
    t0 = time.time()
    train = load_split(args.data, "train", pre)
    test = load_split(args.data, "test", pre)
    print(f"loaded {len(train)} train / {len(test)} test utterances in {time.time() - t0:.0f} s "
          f"({sum(u.duration_s for u in train) / 3600:.2f} h train)")

    model = build_model(ModelSpec(preset=args.preset), pre.tokenizer.vocab_size)
    print(f"parameters: {count_parameters(model) / 1e6:.2f} M")
    ocfg = OptimConfig(lr_peak=args.lr, warmup_steps=args.warmup)
    opt = build_optimizer(model, ocfg)
    stepper = Stepper(model, opt, StepConfig(precision=args.precision), ctc.loss, torch.device("cpu"))

    step, epoch, audio_s, t_train = 0, 0, 0.0, time.time()
    while step < args.steps:
        for group in batch_by_duration(train, args.batch_audio_s, BatchingConfig(), seed=epoch):
            b = collate(group)
            set_lr(opt, lr_at(step, args.steps, ocfg))
            res = stepper.step([b], float(b.target_lengths_B.sum()), 1)
            step += 1
            audio_s += b.audio_s
            if step % 50 == 0:
                el = time.time() - t_train
                print(f"step {step} epoch {epoch} loss {res.loss_sum / res.tokens:.3f} "
                      f"{audio_s / el:.0f} audio-s/s elapsed {el:.0f} s", flush=True)
            if step % args.eval_every == 0 or step == args.steps:
                r = evaluate(model, test, pre.tokenizer)
                print(f"  eval step {step}: test WER {r['wer']:.3f} CER {r['cer']:.3f} "
                      f"(train time {time.time() - t_train:.0f} s)", flush=True)
            if step >= args.steps:
                break
        epoch += 1


if __name__ == "__main__":
    main()
