"""Tokenizers (char, SentencePiece, a tokenizer.json with Whisper's special tokens), the target
length filter and int32 ids (no Ray)."""

import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from raytrain_speech.batch import BLANK_ID
from raytrain_speech.config import ConfigError, ModelSpec, TextConfig
from raytrain_speech.data.preprocess import FILTERED, TargetLimits
from raytrain_speech.data.subword import HFTokenizer, SentencePieceTokenizer, train_sentencepiece
from raytrain_speech.data.text import CharTokenizer, TextError, encode_transcript
from raytrain_speech.data.tokenizer import build_tokenizer
from raytrain_speech.data.vocab import learn_alphabet
from raytrain_speech.models.registry import build_model, check_tokenizer, target_limits

SENTENCES = [
    "hello world it is five o'clock", "the quick brown fox jumps over the lazy dog",
    "qué tal señor núñez", "el niño come una canción", "¿dónde está el pingüino?",
    "a cat sat on the mat", "we went to the market in the morning", "mañana será otro día",
] * 20


def test_char_round_trip_under_the_target_normaliser():
    tok, cfg = CharTokenizer(), TextConfig()
    ids = encode_transcript("  Hello,   World's! ", cfg, tok)
    assert BLANK_ID not in ids
    assert tok.decode(ids) == "hello world's"


@pytest.mark.parametrize("text, reason", [("", "empty"), ("   ", "empty"), ("?!", "empty"), ("héllo", "outside"),
                                          ("a1", "outside")])
def test_bad_transcripts_name_the_reason(text, reason):
    with pytest.raises(TextError, match=reason):
        encode_transcript(text, TextConfig(), CharTokenizer())


def test_learned_alphabet_encodes_any_script():
    texts = ["привет мир", "你好 世界", "qué tal", "مرحبا"]
    cfg = TextConfig(alphabet=learn_alphabet(texts))
    tok = CharTokenizer(cfg)
    for t in texts:
        assert tok.decode(tok.encode(t)) == t


def test_sentencepiece_trains_round_trips_and_keeps_id_0_for_the_blank():
    tok = SentencePieceTokenizer(train_sentencepiece(SENTENCES, vocab_size=60), "sp")
    for text in ("qué tal señor", "the lazy dog", "mañana será otro día"):
        ids = tok.encode(text)
        assert min(ids) >= 1 and max(ids) < tok.vocab_size
        assert tok.decode(ids) == text
    assert len(tok.encode("the quick brown fox")) < len("the quick brown fox")  # subwords, not characters
    with pytest.raises(TextError, match="cannot encode: 'ж'"):
        tok.encode("the жdog")


def _whisper_like_tokenizer_json(languages=("en", "es")) -> bytes:
    """A byte-level BPE trained on a few sentences, with Whisper's special tokens after the text ids."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(SENTENCES, trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(["<|endoftext|>", "<|startoftranscript|>", *(f"<|{c}|>" for c in languages),
                            "<|translate|>", "<|transcribe|>", "<|notimestamps|>"])
    return tok.to_str().encode()


def test_hf_tokenizer_maps_whisper_special_tokens_onto_the_decoder():
    tok = HFTokenizer(_whisper_like_tokenizer_json(), "tokenizer.json")
    text = "¿Dónde está el pingüino? Hello, World!"
    assert tok.decode(tok.encode(text)) == text  # byte-level: any text, cased and punctuated
    spec = ModelSpec(family="whisper", overrides={"languages": ["en", "es"]})
    model = build_model(spec, tok.vocab_size, tok.specials)
    assert model.decoder.embed.num_embeddings == tok.vocab_size  # no unused rows
    prompt = model.prefix(["es", ""], 2)
    s = tok.specials
    assert prompt.tolist() == [[s["<|startoftranscript|>"], s["<|es|>"], s["<|transcribe|>"], s["<|notimestamps|>"]],
                               [s["<|startoftranscript|>"], s["<|en|>"], s["<|transcribe|>"], s["<|notimestamps|>"]]]
    assert model.eot_id == s["<|endoftext|>"]
    assert target_limits(spec, tok.specials) == {"max_tokens": 448 - 4}
    with pytest.raises(TextError, match="special token"):
        tok.encode("say <|endoftext|> now")


def test_hf_tokenizer_without_a_language_token_or_with_a_ctc_model_is_a_config_error():
    tok = HFTokenizer(_whisper_like_tokenizer_json(languages=("en",)), "tokenizer.json")
    with pytest.raises(ConfigError, match=r"lacks Whisper's special token\(s\) <\|es\|>"):
        build_model(ModelSpec(family="whisper", overrides={"languages": ["en", "es"]}), tok.vocab_size, tok.specials)
    with pytest.raises(ConfigError, match="needs a blank"):
        check_tokenizer(ModelSpec(family="conformer_ctc"), tok)
    with pytest.raises(ConfigError, match="not a tokenizer.json"):
        build_tokenizer(TextConfig(tokenizer="hf", tokenizer_path="x.json"), b"not json")


def test_int32_ids_above_32767_survive_arrow_blocks_and_checkpoints():
    targets = np.asarray([1, 32767, 32768, 51865], dtype=np.int32)
    table = pa.table({"targets": pa.array([targets.tolist()], type=pa.list_(pa.int32()))})
    assert table.column("targets").to_pylist()[0] == targets.tolist()
    buf = io.BytesIO()
    torch.save({"targets": torch.from_numpy(targets)}, buf)
    back = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)["targets"]
    assert back.dtype == torch.int32 and back.tolist() == targets.tolist()


def test_over_long_targets_are_filtered_with_the_limit_named():
    limits = TargetLimits(max_tokens=5)
    assert limits.reason(np.arange(5), 100) == ""
    assert limits.reason(np.arange(6), 100).startswith(FILTERED) and "text.max_target_tokens" in limits.reason(
        np.arange(6), 100)
    ctc = TargetLimits(**target_limits(ModelSpec(family="conformer_ctc")))
    # 100 feature frames -> 24 encoder frames: 20 distinct tokens fit, 20 with 5 repeats need 25.
    assert ctc.reason(np.arange(1, 21), 100) == ""
    assert "CTC frames" in ctc.reason(np.asarray([1, 1, 2, 2, 3, 3, 4, 4, 5, 5] + list(range(6, 16))), 100)


def test_the_preprocessor_filters_an_over_long_target_before_decoding_its_audio():
    from raytrain_speech.config import FeatureConfig
    from raytrain_speech.data.preprocess import Preprocessor, is_filtered, to_utterances

    pre = Preprocessor(FeatureConfig(), TextConfig(), limits=TargetLimits(max_tokens=10))
    out = pre({"index": [0, 1], "id": ["long", "bad"], "audio": [b"not audio", b"not audio"],
               "duration_s": [1.0, 1.0], "text": ["this transcript is far too long", "short"]})
    _, bad = to_utterances(out)
    reasons = {utt_id: reason for _, utt_id, reason in bad}
    assert is_filtered(reasons["long"]) and "31 tokens is longer than 10" in reasons["long"]
    assert not is_filtered(reasons["bad"])  # a short target gets to the audio, which is bad input


def _text_corpus(root, texts) -> str:
    """A one-split corpus whose audio is a placeholder: `tokenizer train` must never read it."""
    from raytrain_speech.data import shards

    rows = [{"index": i, "id": f"u{i}", "audio": b"never read", "sample_rate_hz": 16000, "duration_s": 1.0,
             "text": t, "language": "es" if "ñ" in t else "en", "speaker": "s"} for i, t in enumerate(texts)]
    names = []
    for k in range(0, len(rows), 50):
        names.append(shards.shard_name("train", k // 50))
        shards.write_shard(str(root), names[-1], shards.rows_to_table(rows[k:k + 50]))
    shards.write_manifest(str(root), shards.Manifest(splits={"train": shards.SplitInfo(
        names, [len(rows[k:k + 50]) for k in range(0, len(rows), 50)], 0.1)}))
    return str(root)


def test_tokenizer_train_cli_learns_a_sentencepiece_model_from_the_transcripts(tmp_path, capsys):
    from raytrain_speech import cli

    root = _text_corpus(tmp_path / "corpus", [s.capitalize() + "!" for s in SENTENCES])
    out = str(tmp_path / "spm.model")
    assert cli.main(["tokenizer", "train", "--data", root, "--out", out, "text.tokenizer=sentencepiece",
                     "text.vocab_size=80", "text.subword_model=bpe"]) == 0
    assert "bpe SentencePiece" in capsys.readouterr().out
    tok = build_tokenizer(TextConfig(tokenizer="sentencepiece", tokenizer_path=out), open(out, "rb").read())
    assert 40 < tok.vocab_size <= 81
    # The basic normaliser was applied before learning: no capitals or '!' pieces to encode them with.
    assert tok.decode(tok.encode("mañana será otro día")) == "mañana será otro día"
    with pytest.raises(TextError):
        tok.encode("Mañana!")
    assert cli.main(["tokenizer", "train", "--data", root, "--out", out]) != 0
    assert "learns sentencepiece models" in capsys.readouterr().err
