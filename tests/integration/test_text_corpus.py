"""Real transcripts end to end: a synthesized corpus with cased, punctuated English with digits and
Spanish with its accents (``synth.punctuation``, ``synth.second_language=es``) is written out as a
JSONL manifest of audio files, ``raytrain-speech prepare --layout manifest`` shards it, and the tiny
Whisper and Conformer-AED recipes train on it with SentencePiece tokenizers learned at run start on
2 Ray workers. Nothing is rejected for its text, the loss falls, eval prints WER per language under
both scoring normalisers, and transcribe / export reproduce the run's tokenizer."""

from __future__ import annotations

import json
import os

import pytest

from raytrain_speech import cli
from raytrain_speech.config import SynthConfig
from raytrain_speech.data import shards
from raytrain_speech.data.synth import synthesize
from raytrain_speech.train.metrics import read_metrics
from tests.conftest import TINY_SYNTH

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples")
SPLITS = ("train", "dev", "test")


def _synth_config() -> SynthConfig:
    from raytrain_speech.config import load_config

    return load_config(None, [*TINY_SYNTH, "synth.second_language=es", "synth.second_language_share=0.35",
                              "synth.punctuation=true", "synth.train_hours=0.1"]).synth


def _write_manifest(synth_root: str, split: str, out_dir: str) -> str:
    """The split's utterances as FLAC files + a JSONL manifest (audio_filepath, text, speaker, language)."""
    os.makedirs(os.path.join(out_dir, "clips"), exist_ok=True)
    lines = []
    for rel in shards.read_manifest(synth_root).splits[split].shards:
        for row in shards.read_shard(os.path.join(synth_root, rel)).to_pylist():
            path = os.path.join("clips", f"{row['id']}.flac")
            with open(os.path.join(out_dir, path), "wb") as f:
                f.write(row["audio"])
            lines.append(json.dumps({"audio_filepath": path, "text": row["text"], "id": row["id"],
                                     "speaker": row["speaker"], "language": row["language"]}, ensure_ascii=False))
    manifest = os.path.join(out_dir, f"{split}.jsonl")
    with open(manifest, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return manifest


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("text-corpus")
    synth_root = str(tmp / "synth")
    synthesize(_synth_config(), synth_root, log=lambda s: None)
    root = str(tmp / "prepared")
    for split in SPLITS:
        manifest = _write_manifest(synth_root, split, str(tmp / "manifests" / split))
        assert cli.main(["prepare", "--layout", "manifest", "--input", manifest, "--split", split, "--out", root,
                         "--workers", "0", "text.tokenizer=sentencepiece", "text.normalizer=none"]) == 0
        record = shards.read_manifest(root).source["splits"][split] if "splits" in (
            shards.read_manifest(root).source or {}) else shards.read_manifest(root).source
        assert record.get("text_skipped") == {}, record.get("text_skipped")
    texts = [r["text"] for rel in shards.read_manifest(root).splits["train"].shards
             for r in shards.read_shard(os.path.join(root, rel)).to_pylist()]
    assert any(c in "".join(texts) for c in "áéíóúñ¿¡") and any(ch.isdigit() for t in texts for ch in t)
    assert any(t[:1].isupper() and t.endswith(("?", ".")) for t in texts)
    return root


def _train(recipe: str, corpus: str, runs: str, steps: int, *extra: str) -> str:
    name = recipe.replace("_", "-")
    argv = ["train", "--config", os.path.join(EXAMPLES, f"{recipe}.yaml"), "--no-progress", f"data.root={corpus}",
            f"run.storage_path={runs}", f"run.name={name}", f"train.max_steps={steps}", "train.log_every_steps=2",
            f"train.checkpoint_every_steps={steps}", "optim.warmup_steps=2", "run.object_store_memory_mb=512",
            "run.num_workers=2", "train.global_batch_utterances=16", *extra]
    assert cli.main(argv) == 0, recipe
    run_dir = os.path.join(runs, name)
    metrics = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) >= 3 and losses[-1] < losses[0], (recipe, losses)
    last = metrics[-1]
    assert last["step"] == steps and last["bad_utterances"] == 0, last  # nothing rejected for its text
    assert os.path.exists(os.path.join(run_dir, "tokenizer.model"))
    return run_dir


def _eval_both_normalisers(run_dir: str, tmp_path, tag: str) -> dict[str, dict]:
    out = {}
    for norm in ("basic", "none"):
        path = tmp_path / f"{tag}-{norm}.json"
        assert cli.main(["eval", "--checkpoint", run_dir, "--out", str(path), f"eval.normalizer={norm}"]) == 0
        res = json.loads(path.read_text())
        assert set(res["sets"][0]["by_language"]) == {"en", "es"}, res["sets"][0]["by_language"]
        assert res["bad_utterances"] == 0 and res["utterances"] > 0
        assert f"eval.normalizer={norm}" in res["normalisation"]
        assert "| test | es |" in (tmp_path / f"{tag}-{norm}.md").read_text()
        out[norm] = res
    # Case and punctuation count as errors under none: never fewer errors than under basic.
    assert out["none"]["cer"] >= out["basic"]["cer"] - 1e-9
    return out


def _tokenizer_travels(run_dir: str, corpus: str, tmp_path, capsys) -> None:
    """The checkpoint and its export carry the run's tokenizer file; transcribe reads it from either."""
    ckpt = sorted(d for d in os.listdir(run_dir) if d.startswith("checkpoint_"))[-1]
    run_tok = open(os.path.join(run_dir, "tokenizer.model"), "rb").read()
    assert open(os.path.join(run_dir, ckpt, "tokenizer.model"), "rb").read() == run_tok
    export = str(tmp_path / f"export-{os.path.basename(run_dir)}")
    assert cli.main(["export", "--checkpoint", run_dir, "--out", export, "--quantize", "none", "--no-eval"]) == 0
    assert open(os.path.join(export, "tokenizer.model"), "rb").read() == run_tok
    clip = os.path.join(str(tmp_path), "clip.flac")
    test_shard = shards.read_manifest(corpus).splits["test"].shards[0]
    with open(clip, "wb") as f:
        f.write(shards.read_shard(os.path.join(corpus, test_shard)).to_pylist()[0]["audio"])
    texts = []
    for source in (os.path.join(run_dir, ckpt), export):
        capsys.readouterr()
        assert cli.main(["transcribe", "--checkpoint", source, clip]) == 0
        texts.append(capsys.readouterr().out.strip().split("\t", 1)[-1])
    assert texts[0] == texts[1]


@pytest.mark.slow
def test_whisper_and_conformer_aed_train_on_cased_punctuated_bilingual_transcripts(ray_local, corpus, tmp_path,
                                                                                   capsys):
    runs = str(tmp_path / "runs")
    whisper = _train("whisper_large_v3_tiny", corpus, runs, 24, "model.overrides.languages=[en,es]",
                     "optim.lr_peak=3e-3")
    _eval_both_normalisers(whisper, tmp_path, "whisper")
    _tokenizer_travels(whisper, corpus, tmp_path, capsys)
    aed = _train("conformer_aed_tiny", corpus, runs, 24, "train.init_from=null", "optim.lr_peak=3e-3")
    _eval_both_normalisers(aed, tmp_path, "aed")


@pytest.mark.slow
def test_tokenizer_train_on_ray_reads_every_transcript(ray_local, corpus, tmp_path, capsys):
    from raytrain_speech.config import TextConfig
    from raytrain_speech.data.tokenizer import build_tokenizer
    from raytrain_speech.data.vocab import transcripts

    out = str(tmp_path / "spm.model")
    assert cli.main(["tokenizer", "train", "--ray", "--data", corpus, "--out", out, "text.tokenizer=sentencepiece",
                     "text.vocab_size=200", "text.normalizer=none"]) == 0
    texts = list(transcripts(corpus, "train", None, "none"))
    assert f"from {len(texts)} train transcripts" in capsys.readouterr().out
    tok = build_tokenizer(TextConfig(tokenizer="sentencepiece", tokenizer_path=out), open(out, "rb").read())
    assert all(tok.decode(tok.encode(t)) == t for t in texts)  # cased, punctuated, accented: all encodable
