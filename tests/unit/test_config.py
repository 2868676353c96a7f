import pytest

from raytrain_speech.config import Config, ConfigError, apply_overrides, dump_yaml, load_config
from raytrain_speech.models.registry import check_config


def load_checked(overrides: list[str]) -> Config:
    """What every entry point does: load the sections, then check the model section against its family."""
    cfg = load_config(None, overrides)
    check_config(cfg)
    return cfg


def test_defaults_validate_and_round_trip_through_yaml():
    import yaml

    cfg = load_config(None)
    again = Config.from_dict(yaml.safe_load(dump_yaml(cfg)))
    assert again == cfg


def test_yaml_then_overrides_take_precedence(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  max_steps: 50\noptim:\n  lr_peak: 3e-3\n")
    cfg = load_config(str(path), ["train.max_steps=7", "model.overrides.num_layers=2"])
    assert cfg.train.max_steps == 7
    assert cfg.optim.lr_peak == pytest.approx(3e-3)  # YAML 1.1 reads 3e-3 as a string; we accept it
    assert cfg.model.overrides == {"num_layers": 2}


@pytest.mark.parametrize("override, names", [
    ("train.bogus=1", "train.bogus"),
    ("bogus.max_steps=1", "bogus"),
    ("train.max_steps=abc", "train.max_steps"),
    ("train.max_steps=0", "train.max_steps"),
    ("step.precision=fp8", "step.precision"),
    ("model.family=nope", "model.family"),
    ("model.preset=huge", "model.preset"),
    ("model.overrides.d_modell=3", "model.overrides.d_modell"),
    ("model.overrides.num_heads=5", "model.overrides.d_model"),
    ("features.n_mels=40", "features.n_mels"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("run.use_gpu=yes please", "run.use_gpu"),
    ("data.max_bad_fraction=1.5", "data.max_bad_fraction"),
    ("data.max_duration_s=-1", "data.max_duration_s"),
    ("batching.duration_buckets=-2", "batching.duration_buckets"),
    ("features.placement=gpu", "features.placement"),
    ("augment.speed_factors=[5.0]", "augment.speed_factors"),
    ("augment.noise_snr_db=[20, 5]", "augment.noise_snr_db"),
])
def test_bad_values_name_the_key(override, names):
    with pytest.raises(ConfigError) as err:
        load_checked([override])
    message = str(err.value)
    assert names in message
    assert "\n" not in message


def test_missing_file_and_bad_yaml_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))


def test_override_syntax_error():
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["train.max_steps"])


def test_example_recipes_load():
    import glob

    paths = glob.glob("examples/*.yaml")
    assert paths
    for p in paths:
        load_config(p)


def test_every_recipe_has_a_tiny_variant_and_starts_with_its_command():
    import glob
    import os

    recipes = {"whisper_large_v3", "nar_ctc", "conformer_aed", "wav2vec2_xl", "wavlm_large_plus"}
    for name in recipes:
        assert os.path.exists(f"examples/{name}.yaml") and os.path.exists(f"examples/{name}_tiny.yaml"), name
    for path in glob.glob("examples/*.yaml"):
        first = open(path).readline()
        assert first.startswith("# ") and ("raytrain-speech " in first or "jobs/submit.py" in first), path
        assert os.path.basename(path) in first or "--config" not in first or path in first, path


@pytest.mark.parametrize("overrides,key", [
    (["model.family=whisper", "train.freeze_feature_encoder_steps=10"], "train.freeze_feature_encoder_steps"),
    (["model.family=wavlm", "run.checkpoint_score_attribute=valid_wer"], "run.checkpoint_score_attribute"),
    (["model.family=wav2vec2"], "features.kind"),
    (["train.micro_batch_utterances=4"], "train.micro_batch_utterances"),
])
def test_cross_section_mistakes_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_checked(overrides)
