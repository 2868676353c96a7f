"""Published checkpoints through the whole path (real local Ray, 2 CPU workers, an espeak-ng corpus,
transformers models built in the test): a transformers Whisper and a wav2vec 2.0 pretraining
directory are fine-tuned with ``train.init_from=hf:`` via the tiny fine-tuning recipes, exported
with ``export --format hf``, loaded back by ``from_pretrained``, and give our logits (< 1e-4) and
our transcript. ``slow``: a few minutes with the Ray start-up."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from raytrain_speech import cli
from raytrain_speech.data import shards
from raytrain_speech.data.subword import HFTokenizer, train_whisper_bpe
from raytrain_speech.data.synth import synthesize
from raytrain_speech.evaluate.loading import load_model
from raytrain_speech.train.metrics import read_metrics
from tests.conftest import TINY_SYNTH, tiny_config

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow
EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("hf") / "corpus")
    synthesize(tiny_config(**{"data.root": root}).synth, root, log=lambda s: None)
    return root


def _first_test_row(root: str) -> dict:
    rel = shards.read_manifest(root).splits["test"].shards[0]
    return shards.read_shard(os.path.join(root, rel)).to_pylist()[0]


def _train(recipe: str, corpus: str, runs: str, steps: int, *extra: str, capsys=None) -> list[dict]:
    name = recipe.replace("_", "-")
    argv = ["train", "--config", os.path.join(EXAMPLES, f"{recipe}.yaml"), "--no-progress", f"data.root={corpus}",
            f"run.storage_path={runs}", f"run.name={name}", f"train.max_steps={steps}", "train.log_every_steps=2",
            f"train.checkpoint_every_steps={steps}", "optim.warmup_steps=2", "optim.warmup_fraction=null",
            "run.object_store_memory_mb=512", *TINY_SYNTH, *extra]
    assert cli.main(argv) == 0, recipe
    metrics = read_metrics(os.path.join(runs, name, "metrics.jsonl"))
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) >= 2 and all(np.isfinite(losses)), losses
    return metrics


def _whisper_dir(tmp_path, corpus) -> tuple[str, HFTokenizer]:
    texts = [r["text"] for r in shards.read_shard(os.path.join(corpus, shards.read_manifest(corpus)
                                                                .splits["train"].shards[0])).to_pylist()]
    tok_json = train_whisper_bpe(texts * 3, 300)
    tok = HFTokenizer(tok_json)
    s = tok.specials
    eot = s["<|endoftext|>"]
    cfg = transformers.WhisperConfig(
        vocab_size=tok.vocab_size, num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
        max_source_positions=1500, max_target_positions=64, pad_token_id=eot, bos_token_id=eot, eos_token_id=eot,
        decoder_start_token_id=s["<|startoftranscript|>"], begin_suppress_tokens=None)
    torch.manual_seed(0)
    model = transformers.WhisperForConditionalGeneration(cfg)
    g = model.generation_config
    g.lang_to_id, g.task_to_id = {"<|en|>": s["<|en|>"]}, {"transcribe": s["<|transcribe|>"]}
    g.no_timestamps_token_id, g.is_multilingual = s["<|notimestamps|>"], True
    d = tmp_path / "whisper-hf"
    model.save_pretrained(d)
    (d / "tokenizer.json").write_bytes(tok_json)
    transformers.WhisperFeatureExtractor(feature_size=80).save_pretrained(d)
    return str(d), tok


def test_whisper_import_finetune_export_reload(ray_local, corpus, tmp_path, capsys):
    d, tok = _whisper_dir(tmp_path, corpus)
    runs = str(tmp_path / "runs")
    # pad_to_s=30 as the published checkpoint's extractor: transformers' encoder takes only 3000 frames.
    _train("whisper_finetune_tiny", corpus, runs, 4, f"train.init_from=hf:{d}", "features.pad_to_s=30",
           "train.global_batch_utterances=8", "optim.lr_peak=1e-3")
    assert "tensors mapped, 0 newly initialised, 0 unused" in capsys.readouterr().out
    out = str(tmp_path / "export")
    assert cli.main(["export", "--format", "hf", "--checkpoint", os.path.join(runs, "whisper-finetune-tiny"),
                     "--out", out]) == 0
    reloaded = transformers.WhisperForConditionalGeneration.from_pretrained(out).eval()
    processor = transformers.WhisperProcessor.from_pretrained(out)
    ours = load_model(os.path.join(runs, "whisper-finetune-tiny"))
    row = _first_test_row(corpus)
    from raytrain_speech.data import audio

    x = audio.load(row["audio"], 16000)
    feats_hf = processor(x, sampling_rate=16000, return_tensors="pt").input_features
    feats = torch.from_numpy(ours.pre.features(x))[None]
    assert (feats.transpose(1, 2) - feats_hf).abs().max() < 1e-4
    prompt = ours.model.prefix(["en"], 1)
    with torch.no_grad():
        enc, lengths = ours.model.encode(feats, torch.tensor([feats.shape[1]]))
        ours_logits = ours.model.decoder(prompt, enc, lengths)
        assert (ours_logits - reloaded(input_features=feats_hf, decoder_input_ids=prompt).logits).abs().max() < 1e-4
    # transcribe (ours) and generate (transformers) print the same text
    wav = tmp_path / "utt.wav"
    wav.write_bytes(row["audio"])
    assert cli.main(["transcribe", "--checkpoint", os.path.join(runs, "whisper-finetune-tiny"), str(wav)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    gen = reloaded.generate(feats_hf, language="en", task="transcribe", max_new_tokens=60)[0]
    text = processor.batch_decode(gen[None], skip_special_tokens=True)[0].strip()
    assert text and text in printed, (text, printed)
    # the exported directory itself decodes the same through --checkpoint hf: (30 s windows, as exported)
    assert cli.main(["transcribe", "--checkpoint", f"hf:{out}", str(wav)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == printed


def test_wav2vec2_pretraining_dir_finetunes_with_a_fresh_head_and_exports(ray_local, corpus, tmp_path, capsys):
    cfg = transformers.Wav2Vec2Config(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96,
        conv_dim=(32, 32, 32, 32), conv_kernel=(10, 3, 3, 3), conv_stride=(5, 2, 2, 2),
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, codevector_dim=32, proj_codevector_dim=16,
        num_codevectors_per_group=8, feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)
    torch.manual_seed(0)
    d = tmp_path / "w2v-hf"
    transformers.Wav2Vec2ForPreTraining(cfg).save_pretrained(d)
    transformers.Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True).save_pretrained(d)
    runs = str(tmp_path / "runs")
    _train("wav2vec2_ctc_finetune_tiny", corpus, runs, 6, f"train.init_from=hf:{d}", "train.freeze_pretrained_steps=2")
    out_text = capsys.readouterr().out
    assert "2 newly initialised (head.bias, head.weight)" in out_text
    out = str(tmp_path / "export")
    assert cli.main(["export", "--format", "hf", "--checkpoint", os.path.join(runs, "wav2vec2-ctc-finetune-tiny"),
                     "--out", out]) == 0
    reloaded = transformers.Wav2Vec2ForCTC.from_pretrained(out).eval()
    processor = transformers.Wav2Vec2Processor.from_pretrained(out)
    assert json.loads(open(os.path.join(out, "vocab.json")).read())["<pad>"] == 0
    ours = load_model(os.path.join(runs, "wav2vec2-ctc-finetune-tiny"))
    from raytrain_speech.data import audio

    x = audio.load(_first_test_row(corpus)["audio"], 16000)
    inputs = processor(x, sampling_rate=16000, return_tensors="pt").input_values
    assert (torch.from_numpy(ours.pre.features(x))[None] - inputs).abs().max() < 1e-5
    with torch.no_grad():
        context, _ = ours.model.encode(inputs, torch.tensor([inputs.shape[1]]))
        assert (ours.model.head(context) - reloaded(inputs).logits).abs().max() < 1e-4
