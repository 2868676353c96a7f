"""`raytrain-speech config show`: every key, its value, type and doc, as YAML that loads back."""

import glob

import pytest
import yaml

from raytrain_speech import cli
from raytrain_speech.config import Config, load_config, to_dict
from raytrain_speech.config.docs import first_sentence, key_docs
from raytrain_speech.models.registry import resolve


def show(capsys, *argv) -> str:
    assert cli.main(["config", "show", *argv]) == 0
    return capsys.readouterr().out


def test_every_key_of_every_section_has_a_doc():
    undocumented = [r.key for r in key_docs(load_config(None)) if not r.doc]
    assert undocumented == []


@pytest.mark.parametrize("recipe", sorted(glob.glob("examples/*_tiny.yaml"))[:3] + ["examples/whisper_large_v3.yaml"])
def test_output_loads_back_as_the_same_config(capsys, recipe):
    overrides = ["train.max_steps=7", "optim.lr_peak=0.002"]
    out = show(capsys, "--config", recipe, *overrides)
    cfg = load_config(recipe, overrides)
    shown = Config.from_dict(yaml.safe_load(out))
    assert shown.train.max_steps == 7 and shown.optim.lr_peak == 0.002
    # model.overrides lists the family's whole resolved architecture, so it builds the same model
    assert resolve(shown.model) == resolve(cfg.model)
    assert shown.model.overrides == to_dict(resolve(cfg.model))
    shown.model.overrides = cfg.model.overrides
    assert shown == cfg


def test_each_line_names_type_and_doc(capsys):
    lines = show(capsys).splitlines()
    line = next(x for x in lines if x.strip().startswith("max_steps:"))
    assert "# int: " in line
    endpoint = next(x for x in lines if x.strip().startswith("endpoint_url:"))
    assert "http://127.0.0.1:9000" in endpoint  # "e.g. x" does not end the one-line doc
    assert any(x.strip().startswith("d_model:") and "# int" in x for x in lines)  # the family's fields too


def test_first_sentence():
    assert first_sentence("Cluster to join (e.g. auto); None = local. More here.") == \
        "Cluster to join (e.g. auto); None = local."
    assert first_sentence("One sentence only") == "One sentence only"


def test_a_bad_key_is_one_line(capsys):
    assert cli.main(["config", "show", "train.bogus=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown config key 'train.bogus'") and "\n" not in err


@pytest.mark.parametrize("argv", [
    ["train", "--config", "examples/conformer_ctc_tiny.yaml", "train.max_steps=abc"],
    ["synth", "synth.bogus=1"],
    ["tune", "--config", "examples/conformer_ctc_tiny.yaml", "--space", "missing.yaml"],
    ["--help"],
])
def test_commands_that_only_parse_do_not_import_torch_or_ray(argv):
    """A config error is reported before torch (~2.5 s to import on 2 cores) or Ray is loaded."""
    import subprocess
    import sys

    code = ("import sys\nfrom raytrain_speech import cli\ntry:\n    rc = cli.main(sys.argv[1:])\n"
            "except SystemExit as e:\n    rc = e.code\n"
            "print('LOADED', sorted(m for m in ('torch', 'ray', 'torchaudio') if m in sys.modules), rc)")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60)
    line = next(x for x in out.stdout.splitlines() if x.startswith("LOADED"))
    assert line.split(" ", 1)[1] in ("[] 2", "[] 0"), (line, out.stderr[-500:])
