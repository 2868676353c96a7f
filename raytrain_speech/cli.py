"""``raytrain-speech``: synth, prepare, train, tune, eval, transcribe, export, probe, models, demo.

Configs are loaded and validated before anything starts Ray, and every expected failure (bad
config, missing corpus, unreachable storage, a training error) ends as one ``error:`` line and exit
status 2 rather than a stack trace.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from raytrain_speech import VERBOSE_ENV
from raytrain_speech.config import ConfigError

USAGE_ERROR = 2


def _load(args) -> object:
    """The recipe + overrides, checked section by section and against the model family."""
    from raytrain_speech.config import load_config

    cfg = load_config(getattr(args, "config", None), args.overrides)  # key and type errors: no torch imported yet
    from raytrain_speech.hf.importer import settle
    from raytrain_speech.models.registry import check_config

    settle(cfg, log=None)  # model.from_hf / train.init_from=hf: fill the architecture first
    check_config(cfg)
    return cfg


def cmd_synth(args) -> int:
    cfg = _load(args)
    from raytrain_speech.data.synth import synthesize

    out = args.out or cfg.data.root
    start = time.time()
    said = []
    manifest = synthesize(cfg.synth, out, cfg.storage, log=print if args.verbose else said.append)
    for split, info in manifest.splits.items():
        print(f"{split}: {info.num_utterances} utterances, {info.hours:.2f} h, {len(info.shards)} shards")
    reused = [line for line in said if "already holds this corpus" in line]
    print(reused[0] if reused else f"wrote {out} in {time.time() - start:.0f} s")
    return 0


def _flags_and_overrides(command: str, section: str, cls: type, flags: dict, overrides: list[str],
                         also: tuple[str, ...] = ()):
    """(``cls`` from the set flags with ``section.*`` overrides on top, StorageConfig from ``storage.*``):
    the commands that take no recipe YAML, only their own section and storage (and the sections in
    ``also``, which the caller reads from the returned overrides)."""
    from raytrain_speech.config import StorageConfig, apply_overrides, from_dict

    data = apply_overrides({section: {k: v for k, v in flags.items() if v is not None}}, overrides)
    unknown = sorted(set(data) - {section, "storage", *also})
    if unknown:
        extra = "".join(f", {a}.*" for a in also)
        raise ConfigError(f"override {unknown[0]}.*: {command} takes only {section}.*{extra} and storage.* keys")
    return (from_dict(cls, data[section], prefix=f"{section}."),
            from_dict(StorageConfig, data.get("storage", {}), prefix="storage."))


def cmd_synth_noise(args) -> int:
    """Flags fill a NoiseSetConfig; ``noise.*`` and ``storage.*`` key=value overrides go on top."""
    from raytrain_speech import storage
    from raytrain_speech.data.noise import NoiseSetConfig, kind_counts, write_noise_set

    flags = {"clips": args.clips, "clip_duration_s": args.clip_seconds, "seed": args.seed}
    cfg, storage_cfg = _flags_and_overrides("synth-noise", "noise", NoiseSetConfig, flags, args.overrides)
    storage.check_reachable(args.out, storage_cfg)
    start = time.time()
    info = write_noise_set(cfg, args.out, storage_cfg, log=lambda s: None).splits["noise"]
    kinds = ", ".join(f"{n} {kind}" for kind, n in kind_counts(cfg).items())
    print(f"wrote {args.out}: split noise, {info.num_utterances} clips ({kinds}) of "
          f"{cfg.clip_duration_s:g} s each, {len(info.shards)} shards, in {time.time() - start:.0f} s")
    return 0


def cmd_prepare(args) -> int:
    """Flags fill a PrepareConfig; ``prepare.*`` and ``storage.*`` key=value overrides go on top."""
    from raytrain_speech.data.prepare import PrepareConfig, prepare

    flags = {"layout": args.layout, "input": args.input, "split": args.split, "shard_target_mb": args.shard_mb,
             "shard_utterances": args.shard_utterances, "language": args.language,
             "min_duration_s": args.min_duration_s, "max_duration_s": args.max_duration_s, "workers": args.workers,
             "index_only": True if args.index_only else None}
    cfg, storage_cfg = _flags_and_overrides("prepare", "prepare", PrepareConfig, flags, args.overrides, also=("text",))
    text = _text_rules(args.config, args.overrides)
    outcome = prepare(cfg, args.out, storage_cfg, log=print if args.verbose else (lambda s: None), text=text)
    info = outcome.manifest.splits[outcome.split]
    if cfg.index_only:
        print(f"{outcome.split}: {info.num_utterances} utterances, {info.hours:.2f} h, {len(info.shards)} tars "
              "read in place (an index written for each)")
    else:
        print(f"{outcome.split}: {info.num_utterances} utterances, {info.hours:.2f} h, {len(info.shards)} shards "
              f"({outcome.shards_written} written, {outcome.shards_reused} already there from an earlier run)")
    print(f"skipped {outcome.skipped} bad inputs and {outcome.filtered} outside the duration limits "
          f"(listed in {outcome.skipped_uri})")
    n_text = sum(r["count"] for r in outcome.text_skipped.values())
    print(f"transcripts checked against {outcome.text_rules}: {n_text} cannot be encoded"
          + ("" if not n_text else " (change the rules with --config RECIPE or text.* overrides, e.g. "
             "text.alphabet=auto)"))
    for reason, r in sorted(outcome.text_skipped.items(), key=lambda kv: -kv[1]["count"])[:5]:
        print(f"  {r['count']:>6} {reason} (e.g. {', '.join(str(e) for e in r['examples'])})")
    print(f"wrote {args.out} in {outcome.wall_s:.0f} s")
    return 0


def _text_rules(config_path: str | None, overrides: list[str]):
    """The text section prepare checks transcripts against: the recipe's (``--config``) with ``text.*``
    overrides on top; TextConfig's defaults without either."""
    from raytrain_speech.config import load_config

    return load_config(config_path, [o for o in overrides if o.split("=", 1)[0].startswith("text.")]).text


def cmd_train(args) -> int:
    cfg = _load(args)  # a config error is reported before torch and Ray are imported
    from raytrain_speech.train.fit import fit

    outcome = fit(cfg, progress=not args.no_progress)
    from raytrain_speech import storage
    from raytrain_speech.train.curves import CURVES_PNG

    print(f"run {cfg.run.name}: step {outcome.metrics.get('step')} in {outcome.wall_s:.0f} s; "
          f"checkpoint {outcome.checkpoint_uri}; curves {storage.join(outcome.run_dir, CURVES_PNG)}")
    print(outcome.bad_input_summary)
    return 0


def cmd_config(args) -> int:
    """Every key of the resolved config (defaults <- recipe <- overrides) with type and doc, as YAML."""
    cfg = _load(args)
    from raytrain_speech.config.docs import show_config
    from raytrain_speech.models.registry import resolve

    print(show_config(cfg, resolve(cfg.model), args.config, args.overrides), end="")
    return 0


def cmd_plan(args) -> int:
    """Per-GPU training memory of a recipe (train/memory_plan.py)."""
    cfg = _load(args)
    from raytrain_speech.train.memory_plan import plan_command

    return plan_command(cfg, args.gpu, args.workers)


def cmd_tune(args) -> int:
    from raytrain_speech.tune.spaces import load_sweep, split_sweep_items, with_command_line

    # the sweep file and the recipe are checked before torch and Ray load; key=value beats the file's overrides
    sweep_items, args.overrides = split_sweep_items(args.overrides)
    sweep = with_command_line(load_sweep(args.space, sweep_items), args.overrides, args.num_samples)
    cfg = _load(args)
    from raytrain_speech.train import preflight
    from raytrain_speech.tune.sweep import results_table, run_sweep

    preflight.check(cfg)
    outcome = run_sweep(cfg, sweep)
    print(results_table(outcome.trials, sweep), end="")
    if outcome.interrupted:
        print(f"sweep {sweep.name} interrupted; re-run the same command to resume it "
              "(finished trials are kept)", file=sys.stderr)
        return 130
    if outcome.best is None:
        print(f"error: no trial reported {sweep.metric}; see {outcome.directory}", file=sys.stderr)
        return 1
    print(f"best trial {outcome.best.trial_id}: {sweep.metric} {outcome.best.best:.4f} with {outcome.best.params}")
    print(f"best config:     {outcome.best_config_uri}")
    print(f"best checkpoint: {outcome.best.checkpoint}")
    print(f"plot:            {outcome.plot_uri}")
    return 0


def _storage_from(overrides):
    from raytrain_speech.config import Config, apply_overrides

    return Config.from_dict(apply_overrides({}, [o for o in overrides if o.startswith("storage.")])).storage


def _write_text(path: str, text: str, storage_cfg) -> None:
    from raytrain_speech import storage

    storage.write_bytes(path, text.encode(), storage_cfg)


def cmd_eval(args) -> int:
    from raytrain_speech.evaluate.runner import evaluate_checkpoint, results_markdown

    storage_cfg = _storage_from(args.overrides)
    res = evaluate_checkpoint(args.checkpoint, storage_cfg, split=args.split, data_root=args.data,
                              overrides=args.overrides)
    for s in res["sets"]:
        print(f"{s['split']}: WER {100 * s['wer']:.2f}%  CER {100 * s['cer']:.2f}%  "
              f"({s['utterances']} utterances, step {res['step']}, {s['bad_utterances']} skipped)")
        if len(s["by_language"]) > 1:
            for lang, r in s["by_language"].items():
                print(f"  {lang}: WER {100 * r['wer']:.2f}%  CER {100 * r['cer']:.2f}%  ({r['utterances']} utterances)")
    for ex in res["examples"][:3]:
        print(f"  {ex['id']}  ref: {ex['ref']}\n  {' ' * len(ex['id'])}  hyp: {ex['hyp']}")
    if args.out:
        _write_text(args.out, json.dumps(res, indent=2), storage_cfg)
        md = args.out[:-5] + ".md" if args.out.endswith(".json") else args.out + ".md"
        _write_text(md, results_markdown(res), storage_cfg)
        print(f"wrote {args.out} and {md}")
    return 0


def cmd_transcribe(args) -> int:
    from raytrain_speech.evaluate.transcribe import transcribe

    storage_cfg = _storage_from(args.overrides)
    results = transcribe(args.checkpoint, args.audio, storage_cfg, overrides=args.overrides,
                         log=lambda s: print(s, file=sys.stderr))
    for t in results:
        print(f"{t.path}\t{t.text}")
        if args.timestamps:
            for w in t.words:
                print(f"  {w.start_s:7.2f} {w.end_s:7.2f}  {w.word}")
    if args.out:
        from dataclasses import asdict

        _write_text(args.out, json.dumps([asdict(t) for t in results], indent=2), storage_cfg)
    return 0


def cmd_export(args) -> int:
    storage_cfg = _storage_from(args.overrides)
    if args.format == "hf":
        from raytrain_speech.evaluate.hf_export import export_hf

        export_hf(args.checkpoint, args.out, storage_cfg, overrides=args.overrides)
        return 0
    from raytrain_speech.evaluate.quantize import export_checkpoint

    rep = export_checkpoint(args.checkpoint, args.out, args.quantize, storage_cfg, split=args.split,
                            overrides=args.overrides, evaluate=not args.no_eval)
    size = rep["bytes"]
    print(f"wrote {args.out}: {args.quantize} artifact {size['artifact'] / 2**20:.2f} MiB; float export "
          f"{size['float_export'] / 2**20:.2f} MiB ({100 * rep['size_reduction_vs_float']:.1f}% smaller); "
          f"training checkpoint {size['checkpoint_state'] / 2**20:.2f} MiB")
    if "eval" in rep:
        e = rep["eval"]
        print(f"{e['split']} WER: float {100 * e['float']['wer']:.2f}% -> {args.quantize} "
              f"{100 * e[args.quantize]['wer']:.2f}% ({100 * e['wer_relative_change']:+.1f}% relative); "
              f"decode {e['float']['decode_wall_s']:.1f} s -> {e[args.quantize]['decode_wall_s']:.1f} s")
    return 0


def cmd_probe(args) -> int:
    from raytrain_speech.evaluate.probe import probe_checkpoint

    storage_cfg = _storage_from(args.overrides)
    res = probe_checkpoint(args.checkpoint, storage_cfg, splits=tuple(args.split or ["dev", "test"]),
                           data_root=args.data, overrides=args.overrides)
    print(f"{'probe':<20} {'pretrained':>11} {'random init':>12}")
    print(f"{'speaker accuracy':<20} {res['pretrained']['speaker_accuracy']:>11.3f} "
          f"{res['random_init']['speaker_accuracy']:>12.3f}   ({res['speakers']} speakers, "
          f"chance {res['chance_accuracy']:.3f})")
    if "phone_error_rate" in res["pretrained"]:
        print(f"{'PER':<20} {res['pretrained']['phone_error_rate']:>11.3f} {res['random_init']['phone_error_rate']:>12.3f}"
              f"   ({res['phoneme_probe']['phones']} phones; {res['phoneme_source']})")
    if "f0_rmse_hz" in res["pretrained"]:
        print(f"{'F0 RMSE (Hz)':<20} {res['pretrained']['f0_rmse_hz']:>11.2f} {res['random_init']['f0_rmse_hz']:>12.2f}"
              f"   (predicting the mean: {res['f0_probe']['f0_rmse_hz_predict_mean']:.2f}; "
              f"{res['f0_probe']['voiced_test_frames']} voiced test frames)")
    if args.out:
        _write_text(args.out, json.dumps(res, indent=2), storage_cfg)
    return 0


def cmd_demo(args) -> int:
    from raytrain_speech.demo import run_demo

    return run_demo(_load(args))


def cmd_models(args) -> int:
    """One line per (family, preset), parameters counted on the meta device (models.registry.presets_table)."""
    from raytrain_speech.data.text import CharTokenizer
    from raytrain_speech.models.registry import FAMILIES, presets_table

    print("\n".join(presets_table([args.family] if args.family else list(FAMILIES), CharTokenizer().vocab_size)))
    return 0


def cmd_tokenizer(args) -> int:
    """Learn a tokenizer from a corpus split's transcripts (never the audio): data/vocab.py."""
    from raytrain_speech import storage
    from raytrain_speech.config import load_config
    from raytrain_speech.data import vocab
    from raytrain_speech.data.tokenizer import build_tokenizer

    cfg = load_config(args.config, [*args.overrides, f"data.root={args.data}"])
    start = time.time()
    data, n_texts, n_shards = vocab.train_from_split(cfg, args.split, use_ray=args.ray)
    storage.write_bytes(args.out, data, cfg.storage)
    t = cfg.text
    tok = build_tokenizer(t, data)
    kind = ("byte-level BPE in Whisper's layout" if t.tokenizer == "hf" else f"{t.subword_model} SentencePiece")
    units = f"{tok.vocab_size - len(tok.specials)} units + {len(tok.specials)} special tokens" \
        if t.tokenizer == "hf" else f"{tok.vocab_size - 1} units (+ blank)"
    print(f"wrote {args.out}: {kind}, {units} from {n_texts} {args.split} transcripts of {n_shards} shards, "
          f"text.normalizer={t.normalizer}, in {time.time() - start:.1f} s; train with "
          f"text.tokenizer={t.tokenizer} text.tokenizer_path={args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="raytrain-speech", description=__doc__.splitlines()[0].replace("``", ""))
    sub = ap.add_subparsers(dest="command", required=True)

    def with_config(p, required=False):
        p.add_argument("--config", required=required, help="recipe YAML (e.g. examples/conformer_ctc_tiny.yaml)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="override config fields, e.g. train.max_steps=50")

    p = sub.add_parser("synth", help="synthesize the espeak-ng demo corpus into shards (its keys: synth.*, "
                                     "listed with their meaning by `raytrain-speech config show`)")
    with_config(p)
    p.add_argument("--out", help="corpus root (local path or s3://bucket/prefix); default data.root")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(fn=cmd_synth)

    p = sub.add_parser("synth-noise", help="synthesize a noise-shard set (white, pink, brown, babble, hum) "
                                           "that stands in for MUSAN")
    p.add_argument("--out", required=True, help="noise set root to write (local path or s3://bucket/prefix)")
    p.add_argument("--clips", type=int, help="number of clips (default 48)")
    p.add_argument("--clip-seconds", type=float, help="length of each clip in seconds (default 8)")
    p.add_argument("--seed", type=int, help="random seed; the same seed writes the same audio (default 4321)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="noise.* and storage.* settings, e.g. noise.kinds=[white,babble]")
    p.set_defaults(fn=cmd_synth_noise)

    p = sub.add_parser("prepare", help="convert a corpus (TSV/JSONL manifest, LibriSpeech, WebDataset tars) into "
                                       "shards (re-run to resume)")
    p.add_argument("--input", required=True, help="manifest file, LibriSpeech root, or .tar file/dir/glob "
                                                  "(local or s3://)")
    p.add_argument("--layout", required=True, help="manifest, librispeech or webdataset")
    p.add_argument("--out", required=True, help="corpus root to write (local path or s3://bucket/prefix)")
    p.add_argument("--split", help="split to write (default train); other splits in the root are kept")
    p.add_argument("--shard-mb", type=float, help="target audio MiB per shard (default 128)")
    p.add_argument("--shard-utterances", type=int, help="at most this many utterances per shard")
    p.add_argument("--language", help="language code where the input gives none (default en)")
    p.add_argument("--min-duration-s", type=float, help="leave out shorter utterances")
    p.add_argument("--max-duration-s", type=float, help="leave out longer utterances")
    p.add_argument("--workers", type=int, help="Ray tasks in flight (default: one per CPU; 0 = no Ray)")
    p.add_argument("--index-only", action="store_true",
                   help="webdataset: index the tars and train from them in place instead of copying the audio")
    p.add_argument("--config", help="recipe YAML whose text.* rules transcripts are checked against "
                                    "(default: text.* defaults and overrides)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="prepare.*, text.* and storage.* settings, e.g. storage.endpoint_url=http://127.0.0.1:9000 "
                        "(text.* and storage.* keys: `raytrain-speech config show`)")
    p.set_defaults(fn=cmd_prepare)

    p = sub.add_parser("tokenizer", help="tokenizers: `tokenizer train` learns a SentencePiece model (or, with "
                                         "text.tokenizer=hf, a Whisper-layout BPE) from a corpus split's transcripts")
    p = p.add_subparsers(dest="action", required=True).add_parser(
        "train", help="learn a SentencePiece model or a Whisper-layout tokenizer.json (text.tokenizer=hf) from a "
                      "split's transcripts (never its audio)")
    p.add_argument("--data", required=True, help="corpus root (local path or s3://)")
    p.add_argument("--split", default="train", help="split whose transcripts to learn from (default train)")
    p.add_argument("--out", required=True, help="the .model / tokenizer.json file to write (local path or s3://)")
    p.add_argument("--ray", action="store_true", help="read with Ray Data tasks even below 32 shards")
    with_config(p)
    p.set_defaults(fn=cmd_tokenizer)

    p = sub.add_parser("train", help="train with Ray Train, or in this process with run.backend=local "
                                     "(resumes a run of the same name)")
    with_config(p)
    p.add_argument("--no-progress", action="store_true", help="no progress lines")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("config", help="configs: `config show` prints every key of a recipe with its value, type "
                                      "and meaning")
    p = p.add_subparsers(dest="action", required=True).add_parser(
        "show", help="every key of the resolved config (defaults <- --config recipe <- key=value) with its value, "
                     "type and one-line doc, as YAML")
    with_config(p)
    p.set_defaults(fn=cmd_config)

    p = sub.add_parser("plan", help="will the recipe fit its GPUs? per-GPU memory (weights, gradients, optimizer, "
                                    "activations) for DDP and FSDP, with and without activation checkpointing")
    with_config(p)
    p.add_argument("--gpu", default="a100-80gb",
                   help="a100-40gb, a100-80gb, h100-80gb, h100-94gb, h200, l40s, a10g, or NAME:GiB (default a100-80gb)")
    p.add_argument("--workers", type=int, help="GPUs (default: the top of run.num_workers)")
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("tune", help="hyperparameter sweep with Ray Tune + ASHA (re-run to resume)")
    with_config(p, required=True)
    p.add_argument("--space", required=True, help="sweep YAML (e.g. examples/sweeps/quickstart.yaml, minutes on "
                                                  "2 cores); key=value overrides beat its overrides: section, "
                                                  "sweep.KEY=VALUE sets its own fields")
    p.add_argument("--num-samples", type=int, help="trials to sample (replaces the sweep file's num_samples)")
    p.set_defaults(fn=cmd_tune)

    p = sub.add_parser("eval", help="WER/CER per test set and language of a checkpoint, run dir or exported artifact")
    p.add_argument("--checkpoint", required=True, help="checkpoint dir, run dir, export dir or hf:DIR (local or s3://)")
    p.add_argument("--split", action="append",
                   help="split to score; repeat for several test sets (default: the config's eval.split)")
    p.add_argument("--data", help="corpus root (default: the checkpoint config's data.root)")
    p.add_argument("--out", help="write the full result as JSON here, and the table as Markdown beside it (.md)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="decoding, placement and storage settings, e.g. eval.beam_width=5 eval.lm_weight=0.5 "
                        "eval.actors=4 eval.actor_gpus=1 storage.endpoint_url=...")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("transcribe", help="print the text of audio files (word times for CTC models)")
    p.add_argument("--checkpoint", required=True, help="checkpoint dir, run dir, export dir or hf:DIR (local or s3://)")
    p.add_argument("--timestamps", action="store_true", help="print start/end seconds of each word (CTC models)")
    p.add_argument("--out", help="write the transcripts (with word times) as JSON here")
    p.add_argument("audio", nargs="+", help="WAV/FLAC/OGG files (any sample rate; local or s3://)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="key=value",
                   help="decoding or storage setting, e.g. --set eval.beam_width=5 (repeatable)")
    p.set_defaults(fn=cmd_transcribe)

    p = sub.add_parser("export", help="standalone inference artifact, optionally int8, with size and WER before/after; "
                                      "or --format hf: a directory transformers loads")
    p.add_argument("--checkpoint", required=True, help="checkpoint dir, run dir or hf:DIR (local or s3://)")
    p.add_argument("--out", required=True, help="artifact directory to write (local or s3://)")
    p.add_argument("--format", choices=["artifact", "hf"], default="artifact",
                   help="artifact: our model.pt (+ int8), any family (default); hf: transformers' "
                        "from_pretrained layout (config.json, model.safetensors, tokenizer, feature extractor)")
    p.add_argument("--quantize", choices=["int8", "none"], default="int8",
                   help="int8: dynamic int8 Linear layers + int8-stored other matrices (default); none: float")
    p.add_argument("--split", help="split to score before/after (default: the config's eval.split)")
    p.add_argument("--no-eval", action="store_true", help="skip the WER before/after")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="decoding and storage settings")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("probe", help="linear probes (speaker id, phonemes, F0) of a frozen encoder vs a random-init one")
    p.add_argument("--checkpoint", required=True, help="checkpoint or run dir of an SSL or fine-tuned model")
    p.add_argument("--split", action="append", help="splits whose speakers are probed (default: dev and test)")
    p.add_argument("--data", help="corpus root (default: the checkpoint config's data.root)")
    p.add_argument("--out", help="write the result as JSON here")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="storage settings")
    p.set_defaults(fn=cmd_probe)

    p = sub.add_parser("models", help="model families and presets with parameter counts (built on meta)")
    p.add_argument("--list", action="store_true", help="list every family and preset (the default)")
    p.add_argument("--family", help="only this family")
    p.set_defaults(fn=cmd_models)

    p = sub.add_parser("demo", help="synth (if absent) -> train 2 workers on local Ray -> eval, with a summary table")
    with_config(p)
    p.set_defaults(fn=cmd_demo)

    for name in ("train", "tune", "eval", "demo"):  # synth and prepare have their own (more of their log)
        sub.choices[name].add_argument("-v", "--verbose", action="store_true",
                                       help="Ray's own console output as Ray prints it (by default the lines a "
                                            "user cannot act on are left in Ray's session logs)")
    return ap


def _loaded(module: str, name: str) -> tuple[type, ...]:
    """``module.name`` if that module was imported, else nothing: an error class of a module never
    imported cannot have been raised, and importing one here would cost a config error torch's start-up."""
    mod = sys.modules.get(module)
    return (getattr(mod, name),) if mod is not None else ()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "verbose", False):
        os.environ[VERBOSE_ENV] = "1"  # read by ray_session where Ray starts
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    except Exception as err:
        expected = (ConfigError, *_loaded("raytrain_speech.storage", "StorageError"),
                    *_loaded("raytrain_speech.data.audio", "AudioError"))
        if isinstance(err, expected):
            print(f"error: {err}", file=sys.stderr)
            return USAGE_ERROR
        if isinstance(err, _loaded("raytrain_speech.train.fit", "TrainingFailed")):
            print(f"error: training failed: {err}", file=sys.stderr)
            if err.reader_stuck:  # a read blocked for good would hold up the interpreter's exit
                os._exit(sys.stdout.flush() or sys.stderr.flush() or 1)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
