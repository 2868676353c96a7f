"""Whisper-style encoder-decoder over log-mel features (plain torch; no Ray).

Shapes: B = batch, F = input frames (10 ms), M = mel bins, T = encoder frames (F/2), D = model width,
L = decoder tokens (prompt + transcript), P = prompt tokens (3, or 4 with a Whisper tokenizer.json), V = decoder vocabulary.

Token layout. With a char or SentencePiece tokenizer (ids 0 .. c - 1, 0 = the blank, never emitted
here) the decoder appends its special tokens right after them:

    c + 0 = <|endoftext|>   c + 1 = <|startoftranscript|>   c + 2 = <|transcribe|>
    c + 3 + i = <|language i|> for i, language in enumerate(cfg.languages)

and prompts every row with ``<|startoftranscript|> <|lang|> <|transcribe|>``. With a tokenizer.json
that defines Whisper's special tokens (``text.tokenizer=hf``, ``specials``), the decoder uses the
file's ids instead: the embedding has exactly the file's rows (51,866 for large-v3: none unused), and
the prompt is Whisper's ``<|startoftranscript|> <|lang|> <|transcribe|> <|notimestamps|>``. Either
way the row is trained to emit its transcript's tokens then ``<|endoftext|>``, and no special token
is ever a search's output. ``cfg.vocab_size`` is the vocabulary a preset is published with; it sizes
``raytrain-speech models --list`` and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from raytrain_speech.batch import BLANK_ID, Batch
from raytrain_speech.config import require
from raytrain_speech.models.base import Seq2SeqModel
from raytrain_speech.models.layers import (
    TransformerDecoder,
    TransformerEncoder,
    padding_mask,
    sinusoids,
    teacher_forcing,
)

NUM_FIXED_SPECIALS = 3
"""<|endoftext|>, <|startoftranscript|>, <|transcribe|>; the language tokens follow them."""

# The 99 languages of Whisper's tokenizer, in its order (large-v3 adds "yue", its 100th).
WHISPER_LANGUAGES = (
    "en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da hu ta no th ur hr bg lt la "
    "mi ml cy sk te fa lv bn sr az sl kn et mk br eu is hy ne mn bs kk sq sw gl mr pa si km sn yo so af oc ka be "
    "tg sd gu am yi lo uz fo ht ps tk nn mt sa lb my bo tl mg as tt haw ln ha ba jw su"
).split()


@dataclass
class WhisperConfig:
    """Whisper encoder-decoder size, prompt languages and regularisation."""

    n_mels: int = 80
    """Input feature bins (must match features.n_mels)."""
    d_model: int = 144
    """Width of the encoder and the decoder."""
    encoder_layers: int = 2
    """Pre-norm Transformer encoder blocks."""
    decoder_layers: int = 2
    """Pre-norm Transformer decoder blocks (self-attention, cross-attention, MLP)."""
    num_heads: int = 4
    """Attention heads in every attention layer."""
    ffn_dim: int | None = None
    """MLP hidden width; null = 4 * d_model."""
    max_source_positions: int = 1500
    """Longest encoder input in encoder frames (2 input frames each: 1500 = 30 s of 10 ms frames)."""
    max_target_positions: int = 448
    """Longest decoder input in tokens, prompt included (learned positional embedding rows)."""
    dropout: float = 0.1
    """Dropout on residual branches, attention weights and embeddings (Whisper itself used none)."""
    vocab_size: int | None = None
    """The tokenizer vocabulary the preset is published with (large-v3: Whisper's 51,866); counts
    parameters in `models --list` only: the embedding always has the run tokenizer's size."""
    languages: list[str] = field(default_factory=lambda: ["en"])
    """Language codes with a prompt token; a row whose language is '' is prompted with the first."""

    def validate(self) -> None:
        require(self.d_model % self.num_heads == 0, "model.overrides.d_model",
                f"must be divisible by num_heads ({self.num_heads})")
        require(self.d_model % 2 == 0 and self.d_model >= 4, "model.overrides.d_model",
                "must be even and >= 4 (sinusoidal positions)")
        require(self.encoder_layers >= 1, "model.overrides.encoder_layers", "must be >= 1")
        require(self.decoder_layers >= 1, "model.overrides.decoder_layers", "must be >= 1")
        require(self.ffn_dim is None or self.ffn_dim >= 1, "model.overrides.ffn_dim", "must be >= 1 or null")
        require(self.max_source_positions >= 1, "model.overrides.max_source_positions", "must be >= 1")
        require(self.max_target_positions >= NUM_FIXED_SPECIALS + 1, "model.overrides.max_target_positions",
                "must leave room for the 3-token prompt and one token")
        require(0.0 <= self.dropout < 1.0, "model.overrides.dropout", "must be in [0, 1)")
        require(self.vocab_size is None or self.vocab_size >= 1, "model.overrides.vocab_size", "must be >= 1 or null")
        require(len(self.languages) >= 1, "model.overrides.languages", "needs at least one language")
        require(len(set(self.languages)) == len(self.languages), "model.overrides.languages", "has repeats")
        require(all(code and code == code.strip().lower() for code in self.languages), "model.overrides.languages",
                "codes must be non-empty, lower-case and without spaces")


PRESETS: dict[str, dict] = {
    # 1,337,328 parameters with the 29-symbol char tokenizer: trains on a 2-core CPU.
    "tiny": {},
    # Whisper large-v3 per RECIPES.md: 32 + 32 layers, width 1280, 20 heads, MLP 5120, 51,866-row
    # embedding, 1500/448 positions. 1,541,509,120 parameters here (-0.55% of the recipe's 1.55e9;
    # HF WhisperForConditionalGeneration large-v3 has 1,543,490,560). The differences from the released
    # checkpoint: it reads 128 mel bins, not the recipe's 80 (its first conv has 48 x 3 x 1280 = 184,320
    # more weights, and the front end must use features.n_mels=128: set n_mels=128 here to match it);
    # it stores the encoder's sinusoidal table as a frozen 1500 x 1280 embedding (+1,920,000; ours is
    # computed); and its key projections have no bias (-122,880 against ours). Whisper used no dropout.
    "large_v3": {"d_model": 1280, "encoder_layers": 32, "decoder_layers": 32, "num_heads": 20, "ffn_dim": 5120,
                 "max_source_positions": 1500, "max_target_positions": 448, "n_mels": 80, "dropout": 0.0,
                 "vocab_size": 51866, "languages": [*WHISPER_LANGUAGES, "yue"]},
}


WHISPER_TIMESTAMPS = 1501
"""<|0.00|> .. <|30.00|>: the last ids of Whisper's tokenizer."""


def published_specials(cfg: WhisperConfig) -> dict[str, int]:
    """The special-token ids of Whisper's own tokenizer of ``cfg.vocab_size`` ids (v2: 51,865, v3:
    51,866): <|endoftext|>, <|startoftranscript|>, the languages, <|translate|> <|transcribe|>
    <|startoflm|> <|startofprev|> <|nospeech|> <|notimestamps|>, then the timestamps. For counting
    a preset's parameters without the file; a run reads the ids from its tokenizer.json."""
    eot = cfg.vocab_size - WHISPER_TIMESTAMPS - 6 - len(cfg.languages) - 2
    names = ["<|endoftext|>", "<|startoftranscript|>", *(f"<|{c}|>" for c in cfg.languages), "<|translate|>",
             "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"]
    out = {name: eot + i for i, name in enumerate(names)}
    out.update({f"<|{i * 0.02:.2f}|>": eot + len(names) + i for i in range(WHISPER_TIMESTAMPS)})
    return out


def prompt_length(specials: dict[str, int] | None) -> int:
    """Tokens of the prompt every row starts with: 3, or 4 with a tokenizer file's <|notimestamps|>."""
    return NUM_FIXED_SPECIALS + int(bool(specials) and "<|notimestamps|>" in specials)


class Whisper(Seq2SeqModel):
    """log-mel -> conv stem (2x) -> Transformer encoder -> autoregressive token decoder."""

    def __init__(self, cfg: WhisperConfig, vocab_size: int, specials: dict[str, int] | None = None):
        super().__init__()
        self.cfg = cfg
        self.own_layout = not specials
        self.specials: dict[str, int] = dict(specials or {})
        if specials:
            embed_rows = self._use_file_specials(vocab_size, specials)
        else:
            self.special_ids = [vocab_size + i for i in range(NUM_FIXED_SPECIALS + len(cfg.languages))]
            self.eot_id, self.sot_id, self.transcribe_id = self.special_ids[:NUM_FIXED_SPECIALS]
            self.language_ids = {code: vocab_size + NUM_FIXED_SPECIALS + i for i, code in enumerate(cfg.languages)}
            self.prompt_tail: list[int] = []
            embed_rows = vocab_size + NUM_FIXED_SPECIALS + len(cfg.languages)
        ffn_dim = cfg.ffn_dim or 4 * cfg.d_model
        self.conv1 = nn.Conv1d(cfg.n_mels, cfg.d_model, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(cfg.d_model, cfg.d_model, kernel_size=3, stride=2, padding=1)
        self.encoder = TransformerEncoder(cfg.encoder_layers, cfg.d_model, cfg.num_heads, ffn_dim, cfg.dropout)
        self.decoder = TransformerDecoder(embed_rows, cfg.d_model, cfg.num_heads, ffn_dim, cfg.decoder_layers,
                                          cfg.max_target_positions, cfg.dropout)

    def _use_file_specials(self, vocab_size: int, specials: dict[str, int]) -> int:
        """Prompt and end ids from a tokenizer file's special tokens; the embedding rows (its size)."""
        need = ["<|endoftext|>", "<|startoftranscript|>", "<|transcribe|>",
                *(f"<|{code}|>" for code in self.cfg.languages)]
        missing = [t for t in need if t not in specials]
        require(not missing, "text.tokenizer_path",
                f"the tokenizer.json lacks Whisper's special token(s) {', '.join(missing[:5])}"
                f"{' ...' if len(missing) > 5 else ''} (model.overrides.languages must be languages it has)")
        require(max(specials.values()) < vocab_size, "text.tokenizer_path", "special token ids past the vocabulary")
        self.eot_id, self.sot_id, self.transcribe_id = (specials[t] for t in need[:NUM_FIXED_SPECIALS])
        self.language_ids = {code: specials[f"<|{code}|>"] for code in self.cfg.languages}
        self.prompt_tail = [specials["<|notimestamps|>"]] if "<|notimestamps|>" in specials else []
        self.special_ids = sorted(specials.values())
        return vocab_size

    def output_lengths(self, lengths_B: torch.Tensor) -> torch.Tensor:
        """Encoder frames of the stride-2, kernel-3, padding-1 conv: ceil(F / 2)."""
        return ((lengths_B - 1) // 2 + 1).clamp(min=1)

    def encode(self, features_BFM: torch.Tensor, lengths_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(encoder memory h_BTD, its lengths)."""
        _, frames, mels = features_BFM.shape
        limit = 2 * self.cfg.max_source_positions
        if frames > limit:
            raise ValueError(f"input of {frames} frames is longer than 2 * max_source_positions = {limit} frames "
                             f"(model.overrides.max_source_positions = {self.cfg.max_source_positions})")
        if mels != self.cfg.n_mels:
            raise ValueError(f"features have {mels} mel bins, the model expects n_mels = {self.cfg.n_mels}")
        # Zero the padding so the conv stem's edge frames do not depend on what the batch padded with.
        x_BFM = features_BFM.masked_fill(padding_mask(lengths_B, frames)[:, :, None], 0.0)
        h_BDT = F.gelu(self.conv2(F.gelu(self.conv1(x_BFM.transpose(1, 2)))))
        h_BTD = h_BDT.transpose(1, 2)
        h_BTD = h_BTD + sinusoids(h_BTD.shape[1], h_BTD.shape[2]).to(h_BTD.device, h_BTD.dtype)
        out_lengths_B = self.output_lengths(lengths_B).clamp(max=h_BTD.shape[1])
        return self.encoder(h_BTD, out_lengths_B), out_lengths_B

    def encoder_blocks(self) -> tuple[nn.ModuleList, bool]:
        return self.encoder.layers, False

    def prefix(self, languages: list[str], batch_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The prompt (B, P): <|sot|> <|lang|> <|transcribe|> [<|notimestamps|>]; '' or missing languages
        use cfg.languages[0]."""
        default = self.cfg.languages[0]
        rows = []
        for i in range(batch_size):
            code = (languages[i] if i < len(languages) else "").strip().lower() or default
            if code not in self.language_ids:
                raise ValueError(f"language {code!r} has no token (model.overrides.languages: "
                                 f"{', '.join(self.cfg.languages)})")
            rows.append([self.sot_id, self.language_ids[code], self.transcribe_id, *self.prompt_tail])
        return torch.tensor(rows, dtype=torch.int64, device=device)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Teacher forcing: logits for every prompt/target position and the targets the loss compares with."""
        memory_BTD, lengths_B = self.encode(batch.features_BFM, batch.feature_lengths_B)
        prefix_BP = self.prefix(batch.languages, batch.targets_BL.shape[0], batch.targets_BL.device)
        decoder_in_BL, decoder_out_BL = teacher_forcing(batch.targets_BL, batch.target_lengths_B, prefix_BP,
                                                        eot_id=self.eot_id, pad_id=self.eot_id)
        logits_BLV = self.decoder(decoder_in_BL, memory_BTD, lengths_B)
        return {"logits_BLV": logits_BLV, "lengths_B": lengths_B, "decoder_targets_BL": decoder_out_BL}

    @torch.no_grad()
    def decoding_inputs(self, batch: Batch) -> dict:
        """What a decoder search needs (keyword arguments of TransformerDecoder.greedy and of
        evaluate.beam.attention_beam_search): encoder memory, prompt, end token, allowed ids, length cap."""
        memory_BTD, lengths_B = self.encode(batch.features_BFM, batch.feature_lengths_B)
        prefix_BP = self.prefix(batch.languages, memory_BTD.shape[0], memory_BTD.device)
        allowed_V = torch.ones(self.decoder.embed.num_embeddings, dtype=torch.bool, device=memory_BTD.device)
        allowed_V[self.special_ids] = False
        if self.own_layout:  # id 0 is the char / SentencePiece blank, never a target
            allowed_V[BLANK_ID] = False
        return {"memory_BSD": memory_BTD, "memory_lengths_B": lengths_B, "prefix_BP": prefix_BP,
                "eot_id": self.eot_id, "allowed_V": allowed_V,
                "max_len": self.cfg.max_target_positions - prefix_BP.shape[1]}

    @torch.no_grad()
    def transcribe(self, batch: Batch, max_len: int | None = None) -> list[list[int]]:
        """Greedy transcripts as tokenizer ids (no specials, no blank); for evaluation."""
        return super().transcribe(batch, max_len)
