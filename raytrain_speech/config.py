"""The whole run's config: one section per component, each section owned by that component's module.

Precedence: dataclass defaults <- recipe YAML <- ``key=value`` overrides from the command line. The
resolved config is validated before Ray starts (an unknown key or a wrong type is a one-line error
naming the key) and saved beside the checkpoints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import yaml

from raytrain_speech.configlib import ConfigError, from_dict, load_yaml_mapping, require, to_dict
from raytrain_speech.data.augment import AugmentConfig
from raytrain_speech.data.batching import BatchingConfig
from raytrain_speech.data.features import FeatureConfig
from raytrain_speech.data.pipeline import DataConfig
from raytrain_speech.data.synth import SynthConfig
from raytrain_speech.data.text import TextConfig
from raytrain_speech.evaluate.runner import EvalConfig
from raytrain_speech.models.registry import ModelSpec, family, resolve
from raytrain_speech.storage import StorageConfig
from raytrain_speech.train.launch import LaunchConfig
from raytrain_speech.train.loop import TrainConfig
from raytrain_speech.train.optim import OptimConfig
from raytrain_speech.train.step import StepConfig

__all__ = ["Config", "ConfigError", "load_config", "apply_overrides", "dump_yaml"]


@dataclass
class Config:
    """A run: where the data is, what to train, how, on how many workers, and how to evaluate."""

    run: LaunchConfig = field(default_factory=LaunchConfig)
    data: DataConfig = field(default_factory=DataConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    text: TextConfig = field(default_factory=TextConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelSpec = field(default_factory=ModelSpec)
    optim: OptimConfig = field(default_factory=OptimConfig)
    step: StepConfig = field(default_factory=StepConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        """Checks that span sections (each section validates its own fields)."""
        fam = family(self.model)
        require(fam.input_kind == self.features.kind, "features.kind",
                f"model family {self.model.family} needs {fam.input_kind!r} input")
        require(not self.augment.enabled or self.features.kind == "log_mel", "augment",
                "SpecAugment and span masks act on log-mel frames; waveform models mask inside the model")
        if self.train.freeze_feature_encoder_steps:
            require(hasattr(fam.builder, "feature_encoder_parameters"), "train.freeze_feature_encoder_steps",
                    f"model family {self.model.family} has no separate feature encoder to freeze")
        if fam.text_output is None:
            for key, value in (("train.early_stop_metric", self.train.early_stop_metric if
                                self.train.early_stop_patience else None),
                               ("run.checkpoint_score_attribute", self.run.checkpoint_score_attribute)):
                require(value not in ("valid_wer", "valid_cer"), key,
                        f"{self.model.family} is self-supervised (no transcripts out); use valid_loss")
        model_cfg = resolve(self.model)
        if hasattr(model_cfg, "n_mels"):
            require(model_cfg.n_mels == self.features.n_mels, "features.n_mels",
                    f"is {self.features.n_mels} but the model expects {model_cfg.n_mels}")

    def absolutize_local_paths(self) -> Config:
        """Relative local paths -> absolute, against the directory the command runs in.

        Ray Train runs workers in a per-run artifacts directory, so a relative ``data/demo`` would
        point somewhere else inside a worker; the driver fixes paths once, before the config ships.
        """
        def fix(path: str | None) -> str | None:
            return path if path is None or "://" in path else os.path.abspath(os.path.expanduser(path))

        self.data.root = fix(self.data.root)
        self.run.storage_path = fix(self.run.storage_path)
        self.train.trained_log_dir = fix(self.train.trained_log_dir)
        self.train.init_from = fix(self.train.init_from)
        return self

    @classmethod
    def from_dict(cls, data: dict) -> Config:
        return from_dict(cls, data)

    def to_dict(self) -> dict:
        return to_dict(self)


def _parse_value(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a raw config dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = data
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {dotted}: {k} is not a section")
            node = child
        node[keys[-1]] = _parse_value(raw)
    return data


def load_config(path: str | None, overrides: list[str] | None = None) -> Config:
    """Recipe YAML (optional) + overrides -> validated Config; all errors are ConfigError."""
    data = load_yaml_mapping(path, "config") if path is not None else {}
    apply_overrides(data, list(overrides or []))
    return Config.from_dict(data).absolutize_local_paths()


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
