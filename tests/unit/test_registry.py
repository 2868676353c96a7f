"""The model registry as users see it: every family/preset builds on meta, the full-size presets have
the recipe sizes, and every family has the tiny preset its recipe trains on a CPU."""

import pytest

from raytrain_speech import cli
from raytrain_speech.config import ConfigError, ModelSpec, load_config
from raytrain_speech.models import registry, whisper
from raytrain_speech.models.registry import FAMILIES, build_meta, count_parameters, objective_for, resolve

RECIPE_SIZES = {("whisper", "large_v3"): 1.55e9, ("wav2vec2", "xl"): 317e6, ("wavlm", "large_plus"): 600e6}


@pytest.mark.parametrize("family_preset,expected", sorted(RECIPE_SIZES.items()))
def test_full_presets_are_within_one_percent_of_the_recipe_sizes(family_preset, expected):
    family, preset = family_preset
    spec = ModelSpec(family=family, preset=preset)
    published = getattr(resolve(spec), "vocab_size", None) if family == "whisper" else None
    # Whisper large-v3 is published with Whisper's tokenizer (51,866 ids); the rest with characters.
    n = count_parameters(build_meta(spec, published, whisper.published_specials(resolve(spec))) if published
                         else build_meta(spec, vocab_size=29))
    assert abs(n - expected) / expected < 0.01, n


def test_every_family_has_a_tiny_preset_and_an_objective():
    for name in FAMILIES:
        spec = ModelSpec(family=name, preset="tiny")
        assert count_parameters(build_meta(spec, 29)) < 5e6
        objective = objective_for(spec)
        assert callable(objective.units) and callable(objective.loss)


def test_models_list_prints_every_family_and_preset(capsys):
    assert cli.main(["models", "--list"]) == 0
    out = capsys.readouterr().out
    for name, fam in FAMILIES.items():
        for preset in fam.presets:
            assert any(line.split()[:2] == [name, preset] for line in out.splitlines()), (name, preset)
    assert "1,541,509,120" in out and "317,390,592" in out and "599,561,084" in out


def test_unknown_family_and_preset_are_one_line_errors():
    with pytest.raises(ConfigError, match="model.family"):
        registry.resolve(ModelSpec(family="wav2vec3"))
    with pytest.raises(ConfigError, match="model.preset"):
        registry.check_config(load_config(None, ["model.family=whisper", "model.preset=huge"]))
