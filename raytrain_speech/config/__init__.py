"""The whole run's config, a leaf package: it imports no component of ours, every component imports it.

One dataclass per section, grouped by area (``data.py``, ``model.py``, ``train.py``, ``eval.py``), on
the strict schema of ``schema.py``. Precedence: dataclass defaults <- recipe YAML <- ``key=value``
overrides from the command line. Loading validates every section's own fields and the cross-section
rules that need nothing else (an unknown key or a wrong type is a one-line error naming the key);
rules that need a component's knowledge (does the model family take log-mel? does its preset
exist?) are that component's (``models.registry.check_config``), run by ``train.preflight`` and the
CLI before anything starts. The resolved config is saved beside the checkpoints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import yaml

from raytrain_speech.config.data import (
    AugmentConfig,
    BatchingConfig,
    DataConfig,
    FeatureConfig,
    SourceConfig,
    StorageConfig,
    SynthConfig,
    TextConfig,
)
from raytrain_speech.config.eval import EvalConfig, NGramConfig
from raytrain_speech.config.model import ModelSpec
from raytrain_speech.config.schema import ConfigError, from_dict, load_yaml_mapping, require, to_dict
from raytrain_speech.config.train import LaunchConfig, OptimConfig, StepConfig, TrainConfig

__all__ = [
    "AugmentConfig", "BatchingConfig", "Config", "ConfigError", "DataConfig", "EvalConfig", "FeatureConfig",
    "LaunchConfig", "ModelSpec", "NGramConfig", "OptimConfig", "SourceConfig", "StepConfig", "StorageConfig", "SynthConfig",
    "TextConfig", "TrainConfig", "apply_overrides", "dump_yaml", "from_dict", "load_config", "require", "to_dict",
]


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
        """Rules across sections that need no component (each section validates its own fields; the
        model family's rules are ``models.registry.check_config``'s)."""
        require(not self.augment.enabled or self.features.kind != "waveform", "augment",
                "SpecAugment and span masks act on log-mel frames; waveform models mask inside the model")

    def absolutize_local_paths(self) -> Config:
        """Relative local paths -> absolute, against the directory the command runs in.

        Ray Train runs workers in a per-run artifacts directory, so a relative ``data/demo`` would
        point somewhere else inside a worker; the driver fixes paths once, before the config ships.
        """
        def fix(path: str | None) -> str | None:
            if path is not None and path.startswith("hf:"):  # a Hugging Face directory (hf/directory.py)
                return "hf:" + fix(path[3:])
            return path if path is None or "://" in path else os.path.abspath(os.path.expanduser(path))

        self.data.root = fix(self.data.root)
        for source in self.data.sources:
            source.root = fix(source.root)
        self.run.storage_path = fix(self.run.storage_path)
        self.train.trained_log_dir = fix(self.train.trained_log_dir)
        self.train.init_from = fix(self.train.init_from)
        self.model.from_hf = fix(self.model.from_hf)
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
