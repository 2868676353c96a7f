"""A state file carrying a pickle payload (a ``__reduce__`` that would run a command) is refused by every
loader with one line naming the file, and the command never runs; a damaged file gets the same line."""

from __future__ import annotations

import os

import pytest
import torch

from raytrain_speech import cli
from raytrain_speech.evaluate import artifact
from raytrain_speech.storage import StorageError
from raytrain_speech.train import checkpoint


class Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def evil(tmp_path):
    marker = tmp_path / "PWNED"
    ckpt = tmp_path / "checkpoint_step00000001"
    ckpt.mkdir()
    torch.save({"model": Payload(str(marker)), "train_state": {}}, ckpt / checkpoint.STATE_FILE)
    (ckpt / checkpoint.CONFIG_FILE).write_text("model: {family: conformer_ctc, preset: tiny}\n")
    art = tmp_path / "artifact"
    art.mkdir()
    torch.save({"format": artifact.FORMAT, "state": Payload(str(marker))}, art / artifact.ARTIFACT_FILE)
    return ckpt, art, marker


def test_every_loader_refuses_a_pickle_payload_in_one_line(evil, capsys):
    ckpt, art, marker = evil
    for load in (lambda: checkpoint.load(str(ckpt)), lambda: checkpoint.read_checkpoint(str(ckpt)),
                 lambda: checkpoint.read_restored(str(ckpt)), lambda: artifact.read_artifact(str(art))):
        with pytest.raises(StorageError, match=r"refused to load: not a plain tensor file .*GLOBAL") as err:
            load()
        assert "\n" not in str(err.value)
    for argv in (["eval", "--checkpoint", str(ckpt)], ["eval", "--checkpoint", str(ckpt.parent)],
                 ["export", "--checkpoint", str(ckpt), "--out", str(ckpt.parent / "out")]):
        assert cli.main(argv) == cli.USAGE_ERROR
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and "state.pt: refused to load" in err[0], err
    assert not marker.exists()  # the payload never ran


def test_a_damaged_state_file_is_named_too(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save({"model": {"w": torch.zeros(1000)}}, ckpt / checkpoint.STATE_FILE)
    data = (ckpt / checkpoint.STATE_FILE).read_bytes()
    (ckpt / checkpoint.STATE_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(StorageError, match=r"state\.pt: refused to load"):
        checkpoint.load(str(ckpt))
