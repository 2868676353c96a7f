import pyarrow.parquet as pq
import pytest

from raytrain_speech.data import audio, shards
from raytrain_speech.data.synth import SynthConfig, make_specs, render, synthesize

SMALL = SynthConfig(train_hours=0.01, dev_utterances=6, test_utterances=8, train_speakers=8, heldout_speakers=2,
                    shard_utterances=10, workers=1)


def test_heldout_speakers_and_sentences_never_in_train():
    specs = make_specs(SynthConfig())
    train_spk = {s.speaker.voice for s in specs["train"]}
    train_txt = {s.text for s in specs["train"]}
    for split in ("dev", "test"):
        assert not train_spk & {s.speaker.voice for s in specs[split]}
        assert not train_txt & {s.text for s in specs[split]}
    lengths = [len(s.text.split()) for s in specs["train"]]
    assert min(lengths) == 3 and max(lengths) == 8
    assert len({s.speaker.voice for s in specs["train"]}) > 100
    assert len({s.rate_wpm for s in specs["train"]}) > 20 and len({s.pitch for s in specs["train"]}) > 20


def test_render_gives_16khz_speech_with_padding_and_gain():
    spec = make_specs(SMALL)["test"][0]
    a = render(spec, 16000)
    assert 0.5 < len(a) / 16000 < 6.0
    assert abs(a).max() == pytest.approx(spec.gain, rel=1e-3)
    lead = int(spec.lead_s * 16000)
    assert not a[:lead].any() and a[lead: lead + 1600].any()


def test_synthesize_writes_shards_and_manifest_deterministically(tmp_path):
    m1 = synthesize(SMALL, str(tmp_path / "a"), log=lambda s: None)
    synthesize(SMALL, str(tmp_path / "b"), log=lambda s: None)
    assert m1.splits.keys() == {"train", "dev", "test"}
    assert m1.splits["dev"].num_utterances == 6
    for split, info in m1.splits.items():
        for rel in info.shards:
            t1 = pq.read_table(tmp_path / "a" / rel)
            t2 = pq.read_table(tmp_path / "b" / rel)
            assert t1.equals(t2)
            assert set(shards.REQUIRED_COLUMNS) <= set(t1.column_names)
            row = t1.slice(0, 1).to_pylist()[0]
            samples, rate = audio.decode(row["audio"])
            assert rate == 16000 and abs(len(samples) / rate - row["duration_s"]) < 1e-3
            assert row["text"] and row["id"].startswith(split)
    manifest = shards.read_manifest(str(tmp_path / "a"))
    assert manifest.splits["test"].num_utterances == 8
    indices = [i for rel in manifest.splits["train"].shards for i in pq.read_table(tmp_path / "a" / rel)["index"].to_pylist()]
    assert indices == list(range(len(indices)))
