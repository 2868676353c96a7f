"""Sweep files are checked against the recipe before Ray starts; concurrency follows the cluster."""

from __future__ import annotations

import glob
import os

import pytest

from raytrain_speech.config import ConfigError, from_dict, load_config
from raytrain_speech.tune.spaces import SweepConfig, load_sweep, split_sweep_items, with_command_line
from raytrain_speech.tune.sweep import check_sweep, concurrent_trials, trial_dict

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
RECIPE = os.path.join(ROOT, "examples", "conformer_ctc_tiny.yaml")


def base() -> dict:
    return load_config(RECIPE).to_dict()


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "examples", "sweeps", "*.yaml"))),
                         ids=os.path.basename)
def test_shipped_sweeps_check_against_the_recipe_their_command_names(path):
    command = open(path).readline()
    recipe = command.split("--config ")[1].split()[0]
    space = command.split("--space ")[1].split()[0]
    assert os.path.normpath(os.path.join(ROOT, space)) == os.path.normpath(path)
    sweep = load_sweep(path)
    cfg = check_sweep(load_config(os.path.join(ROOT, recipe)).to_dict(), sweep)
    assert cfg.run.num_workers == sweep.trial_workers


def test_trial_config_layers_recipe_overrides_params_and_identity():
    sweep = from_dict(SweepConfig, {"name": "s", "space": {"optim.lr_peak": {"grid": [1e-3]}},
                                    "overrides": {"train.max_steps": 50}, "trial_workers": 1})
    data = trial_dict(base(), sweep, {"optim.lr_peak": 1e-3}, "abc_00001")
    assert data["optim"]["lr_peak"] == 1e-3 and data["train"]["max_steps"] == 50
    assert data["run"]["name"] == "abc_00001" and data["run"]["storage_path"].endswith("s/trials")


def test_command_line_beats_the_sweep_files_overrides():
    """recipe <- sweep overrides <- command line <- sampled params: a key=value on the command line
    (already in the recipe's resolved dict) is not replaced by the sweep file's value for that key."""
    sweep = from_dict(SweepConfig, {"name": "s", "space": {"optim.lr_peak": {"grid": [1e-3]}},
                                    "overrides": {"train.max_steps": 50, "train.log_every_steps": 5,
                                                  "model.overrides.num_layers": 2}})
    items = ["train.max_steps=7", "model.overrides={num_layers: 3}"]
    amended = with_command_line(sweep, items, num_samples=3)
    assert amended.num_samples == 3 and sweep.num_samples == 4  # the file's is not changed in place
    assert amended.overrides == {"train.log_every_steps": 5}
    data = trial_dict(load_config(RECIPE, items).to_dict(), amended, {"optim.lr_peak": 1e-3}, "t")
    assert data["train"]["max_steps"] == 7 and data["train"]["log_every_steps"] == 5
    assert data["model"]["overrides"] == {"num_layers": 3}


def test_a_swept_key_on_the_command_line_is_an_error():
    sweep = from_dict(SweepConfig, {"name": "s", "space": {"optim.lr_peak": {"grid": [1e-3]}}})
    with pytest.raises(ConfigError, match="optim.lr_peak is both swept"):
        with_command_line(sweep, ["optim.lr_peak=0.1"], None)
    with pytest.raises(ConfigError, match="--num-samples"):
        with_command_line(sweep, [], 0)


def test_sweep_items_set_the_sweep_files_own_fields(tmp_path):
    mine, theirs = split_sweep_items(["sweep.scheduler.grace_period_steps=4", "train.max_steps=8",
                                      "sweep.num_samples=2"])
    assert theirs == ["train.max_steps=8"]
    path = tmp_path / "s.yaml"
    path.write_text("name: s\nspace: {optim.lr_peak: {grid: [0.001]}}\n")
    sweep = load_sweep(str(path), mine)
    assert sweep.scheduler.grace_period_steps == 4 and sweep.num_samples == 2
    with pytest.raises(ConfigError, match="s.yaml: unknown config key 'bogus'"):
        load_sweep(str(path), ["bogus=1"])


@pytest.mark.parametrize("space,needle", [
    ({"optim.lr_peek": {"uniform": [1e-4, 1e-3]}}, "optim.lr_peek"),
    ({"augment.span_mask_prob": {"uniform": [0.0, 1.5]}}, "augment.span_mask_prob"),
    ({"optim.lr_peak": {"gaussian": [0, 1]}}, "unknown distribution"),
    ({"optim.lr_peak": {"loguniform": [0, 1e-3]}}, "low > 0"),
    ({"optim.warmup_steps": {"choice": ["many"]}}, "optim.warmup_steps"),
])
def test_bad_spaces_are_one_line_errors_naming_the_key(space, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")) as err:
        check_sweep(base(), from_dict(SweepConfig, {"space": space,
                                                    "overrides": {"train.validate_every_steps": 10}}))
    assert "\n" not in str(err.value)


def test_validation_metric_needs_validation():
    with pytest.raises(ConfigError, match="validate_every_steps"):
        check_sweep(base(), from_dict(SweepConfig, {"space": {"optim.lr_peak": {"grid": [1e-3]}}}))


def test_concurrency_from_cluster_resources():
    assert concurrent_trials({"CPU": 4}, 1, 1.0, use_gpu=False) == 2
    assert concurrent_trials({"CPU": 64, "GPU": 16}, 4, 8.0, use_gpu=True) == 4
    assert concurrent_trials({"CPU": 2}, 4, 1.0, use_gpu=False) == 1  # never zero: trials queue for nodes


def test_optuna_searcher_needs_optuna_and_no_grid():
    import importlib.util

    spec = {"searcher": "optuna", "space": {"optim.lr_peak": {"grid": [1e-3, 2e-3]}}}
    needle = "grid is not supported" if importlib.util.find_spec("optuna") else "optuna is not installed"
    with pytest.raises(ConfigError, match=needle):
        from_dict(SweepConfig, spec)
