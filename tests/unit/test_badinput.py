"""The run's bad-input log: one record per (epoch, utterance), counts per reason, shards count whole."""

from raytrain_speech.data.badinput import (
    BAD_INPUTS_FILE,
    BadInputLog,
    category,
    read_bad_inputs,
    summary_line,
)


def test_records_are_kept_once_and_persisted(tmp_path):
    log = BadInputLog(str(tmp_path))
    first = [{"epoch": 0, "index": 3, "id": "u3", "reason": "cannot decode audio: Format not recognised"},
             {"epoch": 0, "index": 1, "id": "u1", "reason": "bad transcript: empty transcript"}]
    assert log.add(first) == 2
    # After a restart the same rows are rejected again (they came after the last checkpoint): no duplicates.
    again = BadInputLog(str(tmp_path))
    assert again.add([first[0], {"epoch": 1, "index": 3, "id": "u3", "reason": first[0]["reason"]}]) == 1
    assert again.add([{"epoch": 0, "shard": "s3://b/train/shard-00002.parquet", "first_index": 40,
                       "utterances": 20, "reason": "not a Parquet shard (Parquet magic bytes not found)"}]) == 1
    records = read_bad_inputs(str(tmp_path / BAD_INPUTS_FILE))
    assert [(r["epoch"], r.get("index", r.get("first_index"))) for r in records] == [(0, 1), (0, 3), (0, 40), (1, 3)]
    assert again.count == 23
    line = summary_line(records, "RUN/bad_inputs.jsonl")
    assert line == ("bad input: 23 utterance(s) skipped (not a Parquet shard 20, cannot decode audio 2, "
                    "bad transcript 1); listed in RUN/bad_inputs.jsonl")


def test_write_false_keeps_counts_without_touching_storage(tmp_path):
    log = BadInputLog(str(tmp_path))
    log.add([{"epoch": 0, "index": 0, "id": "a", "reason": "zero-length audio"}], write=False)
    assert log.count == 1 and not (tmp_path / BAD_INPUTS_FILE).exists()
    assert summary_line([], "x") == "bad input: none"
    assert category("audio contains NaN or Inf samples") == "audio contains NaN or Inf samples"
