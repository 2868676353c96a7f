"""Linear probes of a frozen encoder: what do its features know about who speaks, what is said, and
how high?

SUPERB-style: the encoder is frozen, each Transformer/Conformer block's output is averaged over the
blocks with equal weights (one feature vector per encoder frame), and only a linear map is trained on
top (probe_heads.py):

* **speaker id**: the frame features mean- and std-pooled over the utterance; multinomial logistic
  regression over the held-out speakers of the corpus (dev + test splits: voices the encoder never
  heard in pretraining); reported as accuracy;
* **phonemes**: a linear CTC head from the frame features to phones (a few hundred Adam steps), greedy
  decoding, reported as phone error rate (PER: edit distance over phone sequences / reference phones).
  The phones come from a ``phonemes`` column when the shards have one (``prepare`` copies it from a
  manifest), else, for a ``synth`` corpus, from espeak-ng's own phonemizer run on each transcript with
  the utterance's voice (data/phonemes.py: the translator that made the audio); for any other corpus
  the probe is skipped with a one-line reason. The phone inventory is the probe-train utterances';
* **F0**: labels measured from the waveform by a YIN tracker (pitch.py) with its voicing decision, put
  on the encoder's frame grid; ridge regression from the frame features of voiced frames to F0 in Hz
  (its weight cross-validated over probe-train utterances), reported as F0-RMSE in Hz on the
  probe-test voiced frames, beside the RMSE of always predicting the probe-train mean. Measured rather
  than taken from the synthesizer's pitch setting (the probe this one replaces), so it runs on any audio.

Each speaker's utterances alternate between probe-train and probe-test; every probe uses that split.
Every probe is also fitted on the features of a randomly initialised encoder of the same family and
preset, with the same data and procedure: the gap is what pretraining taught the encoder.

An utterance that cannot serve a probe (bad audio, no phones, no voiced frame, more phones than
encoder frames for CTC training) is left out of that probe and counted in ``skipped`` by reason.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from raytrain_speech.config import ConfigError, StorageConfig
from raytrain_speech.data import audio, corpus, phonemes, shards
from raytrain_speech.data.batching import Utterance, collate
from raytrain_speech.data.preprocess import iter_table, to_utterances
from raytrain_speech.evaluate import pitch
from raytrain_speech.evaluate.loading import load_model
from raytrain_speech.evaluate.probe_heads import (
    ProbeSettings,
    choose_ridge_l2,
    ctc_feasible,
    ctc_phone_probe,
    mean_rmse,
    phone_error_rate,
    ridge_rmse,
    speaker_accuracy,
)
from raytrain_speech.models.base import SpeechModel
from raytrain_speech.models.registry import build_model

__all__ = ["frame_features", "pooled_features", "probe_checkpoint", "speaker_accuracy"]


def _blocks(model: SpeechModel) -> tuple[torch.nn.ModuleList, bool]:
    """The encoder's block list, and whether the blocks' outputs are time-first (torchaudio Conformer)."""
    try:
        return model.encoder_blocks()
    except NotImplementedError:
        raise ConfigError(f"{type(model).__name__}: no encoder block list to probe (probes support the wav2vec2, "
                          "wavlm and conformer families)") from None


@torch.inference_mode()
def frame_features(model: torch.nn.Module, utts: list[Utterance]) -> dict[str, np.ndarray]:
    """id -> (T, D): the equally weighted average of every block's output at each encoder frame.

    One utterance per forward pass: wav2vec 2.0's group-normed first convolution and the Conformer's
    convolutions see padded samples, so batching would make an utterance's features depend on its
    batch mates; a probe must see the same features for the same audio."""
    blocks, time_first = _blocks(model)
    outputs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda _m, _i, out: outputs.append(out[0] if isinstance(out, tuple) else out))
             for b in blocks]
    feats = {}
    try:
        for u in utts:
            b = collate([u])
            outputs.clear()
            n_frames = int(model.encode(b.features_BFM, b.feature_lengths_B)[1][0])
            stacked = torch.stack([o.transpose(0, 1) if time_first else o for o in outputs]).float()
            feats[u.id] = stacked.mean(0)[0, :n_frames].numpy()
    finally:
        for h in hooks:
            h.remove()
    return feats


def pool(h_TD: np.ndarray) -> np.ndarray:
    """[mean ; std] over an utterance's frames (2D)."""
    return np.concatenate([h_TD.mean(0), h_TD.std(0)])


def pooled_features(model: torch.nn.Module, utts: list[Utterance]) -> dict[str, np.ndarray]:
    """id -> [mean ; std] over frames of the block-averaged features (``frame_features``)."""
    return {k: pool(v) for k, v in frame_features(model, utts).items()}


def _phone_labels(root: str, column: dict[str, object], texts: dict[str, tuple[str, str]],
                  storage_cfg: StorageConfig | None, skipped: Counter) -> tuple[dict[str, list[str]], str]:
    """(id -> phones, where they came from) for the probed ids (``texts``: id -> (text, speaker)), from
    the shards' ``phonemes`` cells (``column``) or espeak-ng; the source is '' when there are none."""
    cells = {k: phonemes.parse_column(column.get(k)) for k in texts}
    if any(cells.values()):  # a column of nothing but nulls is no column
        skipped["phonemes: no phonemes in the column"] += sum(not v for v in cells.values())
        return {k: v for k, v in cells.items() if v}, "phonemes column"
    source = shards.read_manifest(root, storage_cfg).source or {}
    if source.get("kind") != "synth":
        return {}, ""
    ids = sorted(texts)
    got = phonemes.phonemize([texts[k] for k in ids])  # (text, voice): a synth speaker is its espeak voice
    out = {}
    for k, phones in zip(ids, got):
        if isinstance(phones, str) or not phones:
            skipped[f"phonemes: {phones or 'espeak gave no phones'}"] += 1
        else:
            out[k] = phones
    return out, "espeak-ng phonemizer (synth voices)"


def _f0_probe(tracks: dict[str, pitch.F0Track], feats: dict[str, np.ndarray], utts: list[Utterance],
              train: dict[str, bool], settings: ProbeSettings) -> dict | None:
    """F0-RMSE (Hz) of ridge regression on the voiced frames of every tracked utterance, the ridge
    weight chosen on probe-train utterances, and the predict-the-mean RMSE; None without voiced frames
    on both sides."""
    xs, ys, trs, groups = [], [], [], []
    for n, u in enumerate(utts):
        if u.id not in tracks:
            continue
        h_TD = feats[u.id]
        f0_T, voiced_T = pitch.to_encoder_frames(tracks[u.id], len(h_TD), u.duration_s / max(len(h_TD), 1))
        xs.append(h_TD[voiced_T])
        ys.append(f0_T[voiced_T])
        trs.append(np.full(int(voiced_T.sum()), train[u.id]))
        groups.append(np.full(int(voiced_T.sum()), n))
    train_F = np.concatenate(trs) if trs else np.zeros(0, bool)
    if not train_F.any() or train_F.all():
        return None
    x_FD, f0_F, groups_F = np.concatenate(xs), np.concatenate(ys), np.concatenate(groups)
    l2 = choose_ridge_l2(x_FD, f0_F, train_F, groups_F, settings.f0_ridge_l2_grid, settings.f0_ridge_folds)
    return {"f0_rmse_hz": ridge_rmse(x_FD, f0_F, train_F, l2), "f0_ridge_l2": l2,
            "voiced_train_frames": int(train_F.sum()), "voiced_test_frames": int((~train_F).sum()),
            "f0_rmse_hz_predict_mean": mean_rmse(f0_F, train_F)}


def _phoneme_per(phones: dict[str, list[str]], feats: dict[str, np.ndarray], utts: list[Utterance],
                 train: dict[str, bool], settings: ProbeSettings, skipped: Counter | None) -> tuple[float, dict]:
    """PER of the CTC head, and the counts behind it; ``skipped`` (once, for the first encoder) counts
    the probe-train utterances CTC cannot align."""
    train_ids = [u.id for u in utts if u.id in phones and train[u.id]]
    test_ids = [u.id for u in utts if u.id in phones and not train[u.id]]
    inventory = sorted({p for k in train_ids for p in phones[k]})
    ids = {p: i + 1 for i, p in enumerate(inventory)}
    usable = [k for k in train_ids if ctc_feasible([ids[p] for p in phones[k]], len(feats[k]))]
    if skipped is not None and len(usable) < len(train_ids):
        skipped["phonemes: more phones than encoder frames (left out of CTC training)"] += len(train_ids) - len(usable)
    if not usable or not test_ids:
        return float("nan"), {"phones": len(inventory), "train_utterances": len(usable), "test_utterances": 0}
    hyps = ctc_phone_probe([feats[k] for k in usable], [[ids[p] for p in phones[k]] for k in usable],
                           [feats[k] for k in test_ids], len(inventory), settings)
    per = phone_error_rate([phones[k] for k in test_ids], [[inventory[i - 1] for i in h] for h in hyps])
    return per, {"phones": len(inventory), "train_utterances": len(usable), "test_utterances": len(test_ids),
                 "test_phones": sum(len(phones[k]) for k in test_ids)}


@dataclass
class ProbeSet:
    """The probed utterances and every probe's labels, read once for both encoders."""

    utts: list[Utterance]
    """Utterances with a speaker label, sorted by id."""
    speakers: dict[str, str]
    train: dict[str, bool]
    """id -> probe-train (True) or probe-test: each speaker's utterances alternate."""
    tracks: dict[str, pitch.F0Track]
    """id -> the F0 track of its waveform (utterances with at least one voiced frame)."""
    texts: dict[str, tuple[str, str]]
    """id -> (transcript, speaker): what espeak-ng phonemizes for a synth corpus."""
    column_phonemes: dict[str, object]
    """id -> the shards' ``phonemes`` cell, where the shards have that column."""
    skipped: Counter = field(default_factory=Counter)


def read_probe_set(root: str, splits: tuple[str, ...], pre, storage_cfg: StorageConfig | None) -> ProbeSet:
    """Every shard of ``splits``: featurized utterances (``pre``), speakers, texts, phonemes cells, and
    each waveform's F0 track; rows the preprocessor rejects are counted by reason."""
    rate_hz = pre.features_cfg.sample_rate_hz
    ps = ProbeSet([], {}, {}, {}, {}, {})
    for split in splits:
        for shard in corpus.shard_uris(root, split, storage_cfg):
            table = corpus.read_shard(shard, storage_cfg)
            if "speaker" not in table.column_names:
                raise ConfigError(f"{shard}: no speaker column, so there is nothing to probe speaker id against")
            ids, spk = table.column("id").to_pylist(), table.column("speaker").to_pylist()
            ps.speakers.update(zip(ids, spk))
            ps.texts.update((k, (t, s)) for k, t, s in zip(ids, table.column("text").to_pylist(), spk) if s)
            if "phonemes" in table.column_names:
                ps.column_phonemes.update(zip(ids, table.column("phonemes").to_pylist()))
            for batch in iter_table(table, pre):
                good, bad = to_utterances(batch)
                ps.utts += good
                ps.skipped.update("audio or transcript: " + reason.split(":")[0] for _, _, reason in bad)
            for k, blob, dur in zip(ids, table.column("audio").to_pylist(), table.column("duration_s").to_pylist()):
                try:
                    track = pitch.track_f0(audio.load(blob, rate_hz, dur), rate_hz)
                except audio.AudioError:
                    continue  # counted above, by the preprocessor
                if track.voiced_N.any():
                    ps.tracks[k] = track
                else:
                    ps.skipped["f0: no voiced frame"] += 1
    ps.utts = sorted((u for u in ps.utts if ps.speakers.get(u.id)), key=lambda u: u.id)
    seen: dict[str, int] = {}
    for u in ps.utts:  # alternate each speaker's utterances between probe-train and probe-test
        k = seen.get(ps.speakers[u.id], 0)
        seen[ps.speakers[u.id]] = k + 1
        ps.train[u.id] = k % 2 == 0
    return ps


def probe_checkpoint(uri: str, storage_cfg: StorageConfig | None = None, splits: tuple[str, ...] = ("dev", "test"),
                     data_root: str | None = None, seed: int = 0, overrides=(), log=print,
                     settings: ProbeSettings | None = None) -> dict:
    """Speaker-id, phoneme and F0 probes on ``uri``'s encoder and on a random-init encoder of the same preset."""
    settings = settings or ProbeSettings(seed=seed)
    loaded = load_model(uri, storage_cfg, overrides, need_text=False)
    cfg = loaded.cfg
    root = data_root or cfg.data.root
    start = time.time()
    ps = read_probe_set(root, splits, loaded.pre, cfg.storage)
    utts = ps.utts
    speaker_N = np.asarray([ps.speakers[u.id] for u in utts])
    train_N = np.asarray([ps.train[u.id] for u in utts], dtype=bool)
    if len(set(speaker_N)) < 2:
        raise ConfigError(f"{root} {'+'.join(splits)}: fewer than 2 labelled speakers; nothing to classify")
    phones, phone_source = _phone_labels(root, ps.column_phonemes, {u.id: ps.texts[u.id] for u in utts},
                                         cfg.storage, ps.skipped)
    if not phone_source:
        log(f"[probe] phoneme probe skipped: {root} has no phonemes column and is not a synth corpus")

    torch.manual_seed(seed)
    tok = loaded.pre.tokenizer
    random_model = build_model(cfg.model, tok.vocab_size, tok.specials or None).eval()
    result = {"checkpoint": uri, "step": loaded.step, "family": cfg.model.family, "preset": cfg.model.preset,
              "weights": loaded.weights, "data_root": root, "splits": list(splits), "utterances": len(utts),
              "speakers": int(len(set(speaker_N))), "probe_train_utterances": int(train_N.sum()),
              "chance_accuracy": float(1 / len(set(speaker_N))),
              "features": "equally weighted average of every block's output; speaker id: mean+std over frames",
              "phoneme_source": phone_source or None, "f0_tracker": "yin"}
    for name, model in (("pretrained", loaded.model), ("random_init", random_model)):
        feats = frame_features(model, utts)
        x_NK = np.stack([pool(feats[u.id]) for u in utts])
        result[name] = {"speaker_accuracy": speaker_accuracy(x_NK, speaker_N, train_N, settings.speaker_l2)}
        if phone_source:
            per, counts = _phoneme_per(phones, feats, utts, ps.train, settings,
                                       ps.skipped if name == "pretrained" else None)
            result[name]["phone_error_rate"] = per
            result.setdefault("phoneme_probe", counts)
        f0 = _f0_probe(ps.tracks, feats, utts, ps.train, settings)
        if f0 is not None:
            result[name]["f0_rmse_hz"] = f0.pop("f0_rmse_hz")
            result[name]["f0_ridge_l2"] = f0.pop("f0_ridge_l2")
            result.setdefault("f0_probe", f0)
        log(f"[probe] {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in result[name].items()))
    if "f0_probe" not in result:
        log("[probe] F0 probe skipped: no voiced frames in probe-train or probe-test")
    result["skipped"] = dict(sorted(ps.skipped.items()))
    if ps.skipped:
        log("[probe] skipped: " + "; ".join(f"{v} {k}" for k, v in sorted(ps.skipped.items())))
    result["wall_s"] = time.time() - start
    return result
