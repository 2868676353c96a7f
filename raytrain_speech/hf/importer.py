"""Starting from a published checkpoint: ``model.from_hf`` / ``train.init_from=hf:PATH`` (no Ray).

``settle`` runs before any check or worker: it reads the directory's config.json (and
preprocessor_config.json, generation_config.json, the tokenizer) and writes what they say into the
run's config — the architecture into ``model.overrides`` (a user's own overrides still win), the
front end into ``features.*`` (a checkpoint only works on the features it was trained on), and the
tokenizer file into ``text.tokenizer_path`` when none is given — so the saved config of the run
says exactly what was built, and a restart or ``eval`` needs no Hugging Face file again.
``load_weights`` then copies the tensors by the family's explicit map and reports the counts.
"""

from __future__ import annotations

from types import ModuleType

from raytrain_speech import storage
from raytrain_speech.config import Config, ConfigError, StorageConfig
from raytrain_speech.hf import directory as hfdir
from raytrain_speech.hf import mapping
from raytrain_speech.hf import wav2vec2 as hf_wav2vec2
from raytrain_speech.hf import wavlm as hf_wavlm
from raytrain_speech.hf import whisper as hf_whisper
from raytrain_speech.models.base import SpeechModel

FAMILY_MODULES: dict[str, dict[str, ModuleType]] = {
    "whisper": {"whisper": hf_whisper},
    "wav2vec2": {"wav2vec2_ctc": hf_wav2vec2, "nar_ctc": hf_wav2vec2, "wav2vec2": hf_wav2vec2},
    "wavlm": {"wavlm_waveform_ctc": hf_wavlm},
}
"""HF ``model_type`` -> {our family that can start from it: its map module}."""

DEFAULT_FAMILY = {"WhisperForConditionalGeneration": ("whisper", {}),
                  "Wav2Vec2ForCTC": ("wav2vec2_ctc", {"text": {"tokenizer": "ctc_vocab"}}),
                  "WavLMForCTC": ("wavlm_waveform_ctc", {"text": {"tokenizer": "ctc_vocab"}})}
"""The family (and text settings) a checkpoint is decoded as (``--checkpoint hf:PATH``), by its
architecture."""


def module_for(hf: dict, family: str, source: str) -> ModuleType:
    """The map of ``family`` for this config.json; ConfigError naming ``model_type`` when none."""
    model_type = hf.get("model_type")
    if model_type not in FAMILY_MODULES:
        raise ConfigError(f"{source}: config.json model_type {model_type!r} is not one we import "
                          f"(known: {', '.join(sorted(FAMILY_MODULES))})")
    families = FAMILY_MODULES[model_type]
    if family not in families:
        raise ConfigError(f"model.family={family}: a {model_type} checkpoint ({source}) initialises "
                          f"{', '.join(families)}; set model.family accordingly")
    return families[family]


def settle(cfg: Config, log=print) -> None:
    """Fill the run's config from ``model.from_hf`` (implied by ``train.init_from=hf:PATH``)."""
    if hfdir.is_hf(cfg.train.init_from) and not cfg.model.from_hf:
        cfg.model.from_hf = cfg.train.init_from
    if not cfg.model.from_hf:
        return
    source = cfg.model.from_hf if hfdir.is_hf(cfg.model.from_hf) else hfdir.PREFIX + cfg.model.from_hf
    directory = hfdir.path_of(source)
    hf = hfdir.read_json(directory, hfdir.CONFIG, cfg.storage)
    module = module_for(hf, cfg.model.family, source)
    overrides = module.overrides_from_config(hf, source)
    languages = getattr(module, "languages_from_generation", lambda _: None)(
        hfdir.read_json(directory, hfdir.GENERATION, cfg.storage, required=False))
    if languages:
        overrides["languages"] = languages
    cfg.model.overrides = {**overrides, **cfg.model.overrides}
    pre = hfdir.read_json(directory, hfdir.PREPROCESSOR, cfg.storage, required=False)
    for key, value in module.features_from_preprocessor(pre, hf).items():
        setattr(cfg.features, key, value)
    if cfg.features.kind == "whisper_log_mel" and cfg.features.pad_to_s is None:
        cfg.features.pad_to_s = float((pre or {}).get("chunk_length", 30))
    cfg.features.validate()
    cfg.validate()  # the cross-section rules again, on the front end the checkpoint brought
    _settle_tokenizer(cfg, directory, module, source)
    if log:
        log(f"[raytrain-speech] model from {source}: {cfg.model.family} {hf.get('model_type')} "
            f"({', '.join(f'{k}={v}' for k, v in overrides.items() if k != 'languages')}); features.kind="
            f"{cfg.features.kind}, text.tokenizer={cfg.text.tokenizer}")


def _settle_tokenizer(cfg: Config, directory: str, module: ModuleType, source: str) -> None:
    """The checkpoint's own tokenizer unless ``text.tokenizer_path`` names another (a CTC family with
    a fresh head may bring its own)."""
    if cfg.text.tokenizer_path:
        return
    if module is hf_whisper:
        uri = storage.join(directory, "tokenizer.json")
        if not storage.exists(uri, cfg.storage):
            raise ConfigError(f"{source}: no tokenizer.json (Whisper's tokenizer; transformers' "
                              "WhisperTokenizerFast.save_pretrained writes it), or set text.tokenizer_path")
        cfg.text.tokenizer, cfg.text.tokenizer_path = "hf", uri
    elif cfg.text.tokenizer == "ctc_vocab":  # keep the checkpoint's CTC head and its characters
        uri = storage.join(directory, "vocab.json")
        if not storage.exists(uri, cfg.storage):
            raise ConfigError(f"{source}: no vocab.json for text.tokenizer=ctc_vocab (a pretraining checkpoint "
                              "has no CTC head: use text.tokenizer=char for a fresh one)")
        cfg.text.tokenizer_path = uri


def load_weights(model: SpeechModel, family: str, uri: str, storage_cfg: StorageConfig | None = None,
                 strict: bool = True, log=print, tokenizer=None) -> mapping.ImportReport:
    """Copy the checkpoint at ``hf:PATH`` into ``model`` by ``family``'s map; with ``strict``, a
    checkpoint tensor nothing takes or one of another shape is a ConfigError naming it. ``tokenizer``
    decides whether a CTC head is kept (the checkpoint's vocab.json) and in which row order."""
    directory = hfdir.path_of(uri)
    hf = hfdir.read_json(directory, hfdir.CONFIG, storage_cfg)
    module = module_for(hf, family, uri)
    theirs = module.prepare_state(hfdir.read_state(directory, storage_cfg), tokenizer)
    module.check_values(theirs, uri)
    report = mapping.apply(model, theirs, module.family_map(model, tokenizer))
    report.check(uri, strict)
    if log:
        log(report.line(uri))
    return report


def config_for_eval(uri: str, storage_cfg: StorageConfig | None, overrides=()) -> Config:
    """A Config that decodes the checkpoint at ``hf:PATH`` as it is (``--checkpoint hf:PATH``):
    the family its architecture names, its front end and its tokenizer; ``overrides`` on top."""
    from raytrain_speech.config import apply_overrides

    directory = hfdir.path_of(uri)
    hf = hfdir.read_json(directory, hfdir.CONFIG, storage_cfg)
    arch = (hf.get("architectures") or [""])[0]
    if arch not in DEFAULT_FAMILY:
        raise ConfigError(f"{uri}: config.json architectures {arch!r} has no decoder here "
                          f"(known: {', '.join(DEFAULT_FAMILY)})")
    family, sections = DEFAULT_FAMILY[arch]
    cfg = Config.from_dict(apply_overrides({"model": {"family": family, "from_hf": uri}, **sections},
                                           list(overrides)))
    if storage_cfg is not None:
        cfg.storage = storage_cfg
    settle(cfg, log=None)
    return cfg


def preflight(cfg: Config) -> None:
    """``train.init_from=hf:PATH`` checked before any worker starts, from the safetensors headers and
    a meta-device model: a missing tensor, a shape mismatch or an unused tensor (with
    ``train.init_strict``) is one ConfigError naming it."""
    from raytrain_speech.data.tokenizer import load_tokenizer
    from raytrain_speech.models.registry import build_meta

    uri = cfg.train.init_from
    directory = hfdir.path_of(uri)
    module = module_for(hfdir.read_json(directory, hfdir.CONFIG, cfg.storage), cfg.model.family, uri)
    try:
        tokenizer = load_tokenizer(cfg.text, cfg.storage)
    except ConfigError:  # learned when the run starts (alphabet=auto, a tokenizer to train): a fresh head,
        tokenizer = None  # whose size the map does not compare
    model = build_meta(cfg.model, tokenizer.vocab_size if tokenizer else 64,
                       (tokenizer.specials or None) if tokenizer else None)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = hfdir.read_shapes(directory, cfg.storage)
    if module in (hf_wav2vec2, hf_wavlm):
        theirs = hf_wav2vec2.with_prefix(theirs, module.PREFIX)
    report = mapping.match(own, theirs, module.family_map(model, tokenizer), {n for n, _ in model.named_parameters()})
    report.check(uri, cfg.train.init_strict)
