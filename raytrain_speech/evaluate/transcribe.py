"""Transcribe audio files with a checkpoint or an exported artifact (plain torch, no Ray).

Files go through the same front end as training (decode any rate/channels -> 16 kHz mono -> features),
are decoded with the checkpoint's ``eval.*`` search (override on the command line), and for CTC models
each word gets start/end times from a CTC forced alignment of the final hypothesis to the model's
frame posteriors (torchaudio ``forced_align``), so beam + LM output is timed as exactly as greedy output.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torchaudio.functional as AF

from raytrain_speech import storage
from raytrain_speech.batch import BLANK_ID
from raytrain_speech.config import StorageConfig
from raytrain_speech.data import audio
from raytrain_speech.data.batching import Utterance, collate
from raytrain_speech.evaluate.decode import hypotheses
from raytrain_speech.evaluate.loading import load_model
from raytrain_speech.evaluate.runner import build_search


@dataclass
class Word:
    word: str
    start_s: float
    end_s: float


@dataclass
class Transcript:
    path: str
    text: str
    duration_s: float
    words: list[Word] = field(default_factory=list)
    """Per-word times (CTC models only; empty for encoder-decoder models)."""


def word_times(log_probs_TV: torch.Tensor, ids: list[int], space_id: int, frame_s: float) -> list[Word] | None:
    """Align ``ids`` to the frames with CTC and read each word's first and last emitting frame."""
    if not ids or len(ids) > log_probs_TV.shape[0]:
        return None
    try:
        path_T, _ = AF.forced_align(log_probs_TV[None].float().cpu(), torch.tensor([ids], dtype=torch.int32),
                                    blank=BLANK_ID)
    except RuntimeError:  # more repeats than frames: no valid alignment
        return None
    # Token k of ids is emitted at the frames where the path enters it; walk the path once.
    words, current, k, prev = [], None, -1, BLANK_ID
    for t, tok in enumerate(path_T[0].tolist()):
        if tok != BLANK_ID and (tok != prev or prev == BLANK_ID):
            k += 1
            if ids[k] == space_id:
                current = None
            elif current is None:
                current = [t, t]
                words.append(current)
        if tok != BLANK_ID and current is not None and ids[k] != space_id:
            current[1] = t
        prev = tok
    return [Word("", s * frame_s, (e + 1) * frame_s) for s, e in words]


def transcribe(uri: str, paths: list[str], storage_cfg: StorageConfig | None = None, overrides=(),
               log=print) -> list[Transcript]:
    """Text (and CTC word times) for each audio file (local path or s3:// URI)."""
    loaded = load_model(uri, storage_cfg, overrides)
    cfg, tok = loaded.cfg, loaded.pre.tokenizer
    search = build_search(cfg, tok, log)
    out = []
    for i, path in enumerate(paths):
        if not path.startswith(("s3://", "gs://")) and not os.path.exists(path):
            raise storage.StorageError(f"{path}: no such audio file")
        try:
            samples = audio.load(storage.read_bytes(path, storage_cfg), cfg.features.sample_rate_hz)
        except audio.AudioError as err:
            raise audio.AudioError(f"{path}: {err} (give a WAV/FLAC/OGG file with speech in it)") from None
        duration_s = len(samples) / cfg.features.sample_rate_hz
        utt = Utterance(i, os.path.basename(path), duration_s, loaded.pre.features(samples),
                        torch.zeros(0, dtype=torch.int32).numpy())
        b = collate([utt])
        with torch.inference_mode():
            res = (loaded.model(b) if loaded.text_output == "ctc"
                   else {"lengths_B": loaded.model.output_lengths(b.feature_lengths_B)})
            ids = hypotheses(loaded.model, b, res, loaded.text_output, search=search)[0]
        text = tok.decode(ids)
        words: list[Word] = []
        if loaded.text_output == "ctc" and tok.symbols is not None:  # word times from the space symbol
            n = int(res["lengths_B"][0])
            times = word_times(res["log_probs_BTV"][0, :n], ids, tok.symbols.index(" "), duration_s / max(n, 1))
            if times is not None:
                words = [Word(w, t.start_s, t.end_s) for w, t in zip(text.split(), times)]
        out.append(Transcript(path, text, duration_s, words))
    return out
