"""Linear probes of a frozen encoder: what do its features know about who speaks and how high?

SUPERB-style: the encoder is frozen, each Transformer/Conformer block's output is mean- and
std-pooled over the utterance's frames, the blocks are averaged with equal weights, and only a linear
map is trained on top:

* **speaker id**: multinomial logistic regression over the held-out speakers of the corpus (dev + test
  splits: voices the encoder never heard in pretraining); each speaker's utterances alternate between
  probe-train and probe-test; reported as accuracy;
* **pitch**: ridge regression to the synthesizer's per-utterance pitch setting (espeak 0-100, recovered
  from the corpus manifest's synth config), the stand-in for F0; reported as RMSE (the WavLM write-up's
  F0 metric), beside the RMSE of always predicting the training mean.

Every probe is also fitted on the features of a randomly initialised encoder of the same family and
preset, with the same data and procedure: the gap is what pretraining taught the encoder.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from raytrain_speech.config import ConfigError, StorageConfig, from_dict
from raytrain_speech.data import corpus, shards
from raytrain_speech.data.batching import collate
from raytrain_speech.data.preprocess import iter_table, to_utterances
from raytrain_speech.evaluate.loading import load_model
from raytrain_speech.models.base import SpeechModel
from raytrain_speech.models.registry import build_model


@dataclass
class ProbeData:
    features_NK: np.ndarray
    speaker_N: np.ndarray
    pitch_N: np.ndarray | None
    train_N: np.ndarray
    """True = probe-train row, False = probe-test row."""


def _blocks(model: SpeechModel) -> tuple[torch.nn.ModuleList, bool]:
    """The encoder's block list, and whether the blocks' outputs are time-first (torchaudio Conformer)."""
    try:
        return model.encoder_blocks()
    except NotImplementedError:
        raise ConfigError(f"{type(model).__name__}: no encoder block list to probe (probes support the wav2vec2, "
                          "wavlm and conformer families)") from None


def _encode(model: SpeechModel, batch) -> torch.Tensor:
    """Run the encoder without masking; returns the encoder-frame lengths."""
    return model.encode(batch.features_BFM, batch.feature_lengths_B)[1]


@torch.inference_mode()
def pooled_features(model: torch.nn.Module, utts: list) -> dict[str, np.ndarray]:
    """id -> [mean ; std] over frames of the equally weighted average of every block's output.

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
            group = [u]
            b = collate(group)
            outputs.clear()
            lengths_B = _encode(model, b)
            stacked = torch.stack([o.transpose(0, 1) if time_first else o for o in outputs]).float()
            h_BTD = stacked.mean(0)
            valid_BT1 = (torch.arange(h_BTD.shape[1])[None, :] < lengths_B[:, None])[..., None].float()
            n_B1 = valid_BT1.sum(1).clamp(min=1)
            mean_BD = (h_BTD * valid_BT1).sum(1) / n_B1
            std_BD = (((h_BTD - mean_BD[:, None]) ** 2 * valid_BT1).sum(1) / n_B1).sqrt()
            for u, row in zip(group, torch.cat([mean_BD, std_BD], dim=1).numpy()):
                feats[u.id] = row
    finally:
        for h in hooks:
            h.remove()
    return feats


def _standardize(x_NK: np.ndarray, train_N: np.ndarray) -> torch.Tensor:
    mu, sd = x_NK[train_N].mean(0), x_NK[train_N].std(0) + 1e-6
    return torch.from_numpy((x_NK - mu) / sd).double()


def speaker_accuracy(x_NK: np.ndarray, speaker_N: np.ndarray, train_N: np.ndarray, l2: float = 1e-3) -> float:
    """Multinomial logistic regression (L-BFGS, L2 ``l2``) on probe-train rows; accuracy on the rest."""
    classes, y_N = np.unique(speaker_N, return_inverse=True)
    x = _standardize(x_NK, train_N)
    y = torch.from_numpy(y_N)
    tr = torch.from_numpy(train_N)
    w = torch.zeros(x.shape[1], len(classes), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(len(classes), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=500, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x[tr] @ w + b, y[tr]) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((x[~tr] @ w + b).argmax(1) == y[~tr]).double().mean())


def pitch_rmse(x_NK: np.ndarray, pitch_N: np.ndarray, train_N: np.ndarray, l2: float = 10.0) -> float:
    """Ridge regression (closed form, L2 ``l2`` on standardized features); RMSE on probe-test rows."""
    x = _standardize(x_NK, train_N)
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    y = torch.from_numpy(pitch_N.astype(np.float64))
    xt, yt = x[torch.from_numpy(train_N)], y[torch.from_numpy(train_N)]
    reg = l2 * torch.eye(x.shape[1], dtype=x.dtype)
    reg[-1, -1] = 0.0
    coef = torch.linalg.solve(xt.T @ xt + reg, xt.T @ yt)
    err = x[torch.from_numpy(~train_N)] @ coef - y[torch.from_numpy(~train_N)]
    return float(err.pow(2).mean().sqrt())


def synth_pitches(root: str, storage_cfg: StorageConfig | None) -> dict[str, int] | None:
    """id -> the synthesizer's pitch setting, when the corpus was made by ``synth`` (None otherwise)."""
    from raytrain_speech.config import SynthConfig
    from raytrain_speech.data.synth import make_specs

    source = shards.read_manifest(root, storage_cfg).source or {}
    if source.get("kind") != "synth":
        return None
    specs = make_specs(from_dict(SynthConfig, source["config"]))
    return {s.id: s.pitch for split in specs.values() for s in split}


def probe_checkpoint(uri: str, storage_cfg: StorageConfig | None = None, splits: tuple[str, ...] = ("dev", "test"),
                     data_root: str | None = None, seed: int = 0, overrides=(), log=print) -> dict:
    """Speaker-id and pitch probes on ``uri``'s encoder and on a random-init encoder of the same preset."""
    loaded = load_model(uri, storage_cfg, overrides, need_text=False)
    cfg = loaded.cfg
    root = data_root or cfg.data.root
    start = time.time()
    utts, speakers = [], {}
    for split in splits:
        for shard in corpus.shard_uris(root, split, cfg.storage):
            table = corpus.read_shard(shard, cfg.storage)
            if "speaker" not in table.column_names:
                raise ConfigError(f"{shard}: no speaker column, so there is nothing to probe speaker id against")
            speakers.update(zip(table.column("id").to_pylist(), table.column("speaker").to_pylist()))
            for batch in iter_table(table, loaded.pre):
                utts += to_utterances(batch)[0]
    utts = [u for u in utts if speakers.get(u.id)]
    if len({speakers[u.id] for u in utts}) < 2:
        raise ConfigError(f"{root} {'+'.join(splits)}: fewer than 2 labelled speakers; nothing to classify")
    pitches = synth_pitches(root, cfg.storage)
    utts.sort(key=lambda u: u.id)
    seen: dict[str, int] = {}
    train = []
    for u in utts:  # alternate each speaker's utterances between probe-train and probe-test
        k = seen.get(speakers[u.id], 0)
        seen[speakers[u.id]] = k + 1
        train.append(k % 2 == 0)
    train_N = np.asarray(train)
    speaker_N = np.asarray([speakers[u.id] for u in utts])
    pitch_N = np.asarray([pitches[u.id] for u in utts], dtype=np.float64) if pitches else None

    torch.manual_seed(seed)
    tok = loaded.pre.tokenizer
    random_model = build_model(cfg.model, tok.vocab_size, tok.specials or None).eval()
    result = {"checkpoint": uri, "step": loaded.step, "family": cfg.model.family, "preset": cfg.model.preset,
              "weights": loaded.weights, "data_root": root, "splits": list(splits), "utterances": len(utts),
              "speakers": int(len(set(speaker_N))), "probe_train_utterances": int(train_N.sum()),
              "chance_accuracy": float(1 / len(set(speaker_N))), "pooling": "mean+std over frames of the block average"}
    for name, model in (("pretrained", loaded.model), ("random_init", random_model)):
        feats = pooled_features(model, utts)
        x_NK = np.stack([feats[u.id] for u in utts])
        result[name] = {"speaker_accuracy": speaker_accuracy(x_NK, speaker_N, train_N)}
        if pitch_N is not None:
            result[name]["pitch_rmse"] = pitch_rmse(x_NK, pitch_N, train_N)
        log(f"[probe] {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in result[name].items()))
    if pitch_N is not None:
        result["pitch_rmse_predict_mean"] = float(np.sqrt(((pitch_N[~train_N] - pitch_N[train_N].mean()) ** 2).mean()))
    else:
        log(f"[probe] {root} is not a synth corpus: no pitch labels, pitch probe skipped")
    result["wall_s"] = time.time() - start
    return result
