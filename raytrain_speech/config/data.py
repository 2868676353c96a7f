"""Config sections of the data path: where the corpus is and how it is reached, synthesized, decoded,
featurized, tokenized, augmented and batched.

Plain dataclasses and the checks that need nothing but their own fields; each component module reads
its section from here (``data/pipeline.py`` reads ``DataConfig``, ``data/features.py``
``FeatureConfig``, ...), and this module imports none of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from raytrain_speech.config.schema import require


@dataclass
class StorageConfig:
    """How to reach object storage (credentials come from the environment, never from here)."""

    endpoint_url: str | None = None
    """S3-compatible endpoint, e.g. http://127.0.0.1:9000 (MinIO); None = AWS (or $AWS_ENDPOINT_URL)."""
    region: str | None = None
    """S3 region; None = $AWS_REGION / $AWS_DEFAULT_REGION / us-east-1."""
    connect_timeout_s: float = 10.0
    """Give up connecting after this long, so an unreachable endpoint fails instead of hanging."""
    request_timeout_s: float = 60.0
    """Give up on one request after this long."""
    max_attempts: int = 5
    """Attempts per request (retries with backoff on throttling and 5xx)."""


@dataclass
class SourceConfig:
    """One corpus of a training mixture (``data.sources``)."""

    name: str = ""
    """Short name of the source in metrics, the run card and the bad-input log (letters, digits, - and _)."""
    root: str = ""
    """Corpus root (local path or s3://bucket/prefix) holding manifest.json: Parquet shards or indexed tars."""
    split: str = "train"
    """The source's split that is trained on."""
    weight: float = 1.0
    """This source's share of the training audio hours (or utterances: data.mix_unit); the weights are
    normalised to sum to 1. A source whose share is larger than its size's share is repeated (a new
    epoch of it starts when it runs out), a larger one is spread over several mixture epochs."""
    storage: StorageConfig | None = None
    """How to reach this source's storage when it differs from the run's (storage.*); null = storage.*."""
    valid_split: str | None = None
    """A held-out split of this source, validated on its own at every validation (metrics
    source.<name>.valid_loss / valid_wer / valid_cer); null = none (data.valid_split of data.root is
    validated either way)."""

    def validate(self) -> None:
        require(bool(re.fullmatch(r"[A-Za-z0-9_-]+", self.name)), "data.sources[].name",
                f"{self.name!r} must be letters, digits, - or _ (it names the source in metrics)")
        require(bool(self.root), f"data.sources[{self.name}].root", "must name a corpus (local path or s3://...)")
        require(self.weight > 0, f"data.sources[{self.name}].weight", "must be positive")


@dataclass
class DataConfig:
    """Where the shards are and how Ray Data streams them."""

    root: str = "data/demo"
    """Corpus root (local path or s3://bucket/prefix) holding manifest.json and split folders. With
    data.sources: the corpus whose valid_split validates (and eval reads by default), the first
    source's root unless set."""
    sources: tuple[SourceConfig, ...] = ()
    """Train on a weighted mixture of corpora instead of data.root's train_split: a list of
    {name, root, split, weight[, storage]}. Each source keeps its own epochs: every utterance of a
    source is trained on once per epoch of that source, and exactly once across restarts
    (docs/data.md, "Mixing corpora"). () = data.root alone."""
    mix_unit: Literal["hours", "utterances"] = "hours"
    """What data.sources' weights share out: audio hours or utterances."""
    train_split: str = "train"
    """Split trained on."""
    valid_split: str = "dev"
    """Split for validation during training (train.validate_every_steps)."""
    preprocess_batch_rows: int = 32
    """Rows per Ray Data preprocessing task batch."""
    preprocess_cpus: float = 1.0
    """CPUs reserved by each preprocessing task."""
    shuffle_blocks: bool = True
    """Randomize shard order every epoch."""
    blocks_per_shard: int = 4
    """Ray Data blocks each shard is read into (read_parquet's override_num_blocks; Ray 2.60 reads a
    task's files into one block regardless, so block_mb is what splits them now)."""
    block_mb: float = 16.0
    """Ray Data's target block size for this chain: a shard's rows are cut into blocks of about this
    size, so several preprocessing tasks share a shard and Train's unequal split ends an epoch with a
    short tail. Ray's default (128 MB) puts a whole shard, or several, in one block: one core does
    all the preprocessing. Much smaller blocks pay Ray's per-task overhead: 4 MB made a 36-step test
    run on 2 cores 24% slower than 128 MB (docs/LOG.md)."""
    node_labels: dict = field(default_factory=dict)
    """Node labels the data chain's tasks require (a Ray label selector), so decoding and augmentation
    run only on nodes of that type, e.g. {raytrain-speech/role: data} for the cpu-data group of
    cluster/*.yaml and KubeRay; the training workers stay where their GPUs are. {} = any node with a
    free CPU."""
    prefetch_batches: int = 4
    """Row batches each training worker prefetches."""
    stall_timeout_s: float | None = 900.0
    """A training worker that waits this long for its next row batch fails its attempt with one line
    saying so (Ray Train retries it up to run.max_failures) instead of hanging: a pipeline with no CPU
    to run on, a data node lost without notice, storage that stopped answering. Pipeline fill and epoch
    boundaries take seconds to minutes; raise it for clusters whose data nodes autoscale from zero.
    None = wait forever."""
    min_duration_s: float | None = None
    """Training leaves out utterances shorter than this (from the duration_s column, before decoding;
    counted as filtered, not bad). None = no lower limit."""
    max_duration_s: float | None = 60.0
    """Training leaves out utterances longer than this (30 s for Whisper), from the duration_s column
    and again from the audio header before decoding (a mislabelled 3-hour file is never decoded, so it
    cannot exhaust a worker's memory and be retried). Long-form audio belongs segmented at prepare
    time. None = no upper limit (each utterance is decoded whole, so size workers for the longest)."""
    crop_s: float | None = None
    """Training only, self-supervised families: each utterance longer than this is cut to a random
    window of crop_s seconds, drawn from (seed, epoch, index) after waveform augmentation and before
    the front end, so features.normalize=utterance normalises per segment (the WavLM write-up's
    ~16 s segments). A new window every epoch; validation and eval read whole utterances. None = whole
    utterances."""
    max_bad_fraction: float = 0.05
    """Stop the run with an error when more than this fraction of the training utterances seen so far
    were bad input (corrupt audio, bad transcripts, unreadable shards); judged once
    bad_fraction_min_utterances were seen, and at every epoch end."""
    bad_fraction_min_utterances: int = 200
    """Utterances seen before max_bad_fraction is judged (a few bad files early on are no verdict)."""

    def __post_init__(self) -> None:
        if self.sources and self.root == DataConfig.root and all(s.root != self.root for s in self.sources):
            self.root = self.sources[0].root  # validation reads a corpus of the mixture, not the demo's

    def validate(self) -> None:
        require(bool(self.root), "data.root", "must name a corpus (local path or s3://bucket/prefix)")
        require(all(isinstance(v, str) and v for v in self.node_labels.values()), "data.node_labels",
                "must map label names to non-empty strings")
        names = [s.name for s in self.sources]
        require(len(set(names)) == len(names), "data.sources", f"source names must be unique, got {names}")
        require(self.preprocess_batch_rows >= 1, "data.preprocess_batch_rows", "must be >= 1")
        require(self.blocks_per_shard >= 1, "data.blocks_per_shard", "must be >= 1")
        require(self.block_mb > 0, "data.block_mb", "must be positive")
        require(self.stall_timeout_s is None or self.stall_timeout_s > 0, "data.stall_timeout_s",
                "must be positive or null")
        for key in ("min_duration_s", "max_duration_s"):
            value = getattr(self, key)
            require(value is None or value >= 0, f"data.{key}", "must be >= 0 or null")
        require(self.min_duration_s is None or self.max_duration_s is None
                or self.min_duration_s <= self.max_duration_s, "data.min_duration_s", "must be <= data.max_duration_s")
        require(self.crop_s is None or self.crop_s > 0, "data.crop_s", "must be positive or null")
        require(0.0 <= self.max_bad_fraction <= 1.0, "data.max_bad_fraction", "must be in [0, 1]")
        require(self.bad_fraction_min_utterances >= 1, "data.bad_fraction_min_utterances", "must be >= 1")


@dataclass
class SynthConfig:
    """The synthesized corpus: its size, speakers and prosody ranges."""

    seed: int = 1234
    """Everything (speakers, sentences, prosody, silence) derives from this."""
    train_hours: float = 6.0
    """Approximate hours of training audio (the manifest records the exact figure)."""
    dev_utterances: int | None = None
    """Utterances in the dev split (held-out speakers and sentences); None = scaled with train_hours:
    200 from 6 h up, 200 x train_hours / 6 below, at least 10 (filled in when the config is built)."""
    test_utterances: int | None = None
    """Utterances in the test split (held-out speakers and sentences); None = scaled with train_hours
    like dev: 400 from 6 h up, at least 20."""
    train_speakers: int = 160
    """Distinct speakers (accent x variant, with their own pitch and rate) in train."""
    heldout_speakers: int = 16
    """Speakers in dev and in test each; never used in train."""
    heldout_accents: tuple[str, ...] = ("en-gb-scotland",)
    """English accent families no train, dev or test speaker has: heldout_speakers voices of them say
    the test_accents split, the harder test of an accent never heard (() = no such split, the corpus
    as before the split existed)."""
    test_accents_utterances: int | None = None
    """Utterances in test_accents (None = as many as test_utterances)."""
    min_words: int = 3
    """Shortest sentence in words."""
    max_words: int = 8
    """Longest sentence in words."""
    rate_wpm: tuple[int, int] = (130, 210)
    """Range of speakers' base speaking rates (words per minute)."""
    pitch: tuple[int, int] = (20, 80)
    """Range of speakers' base pitch (espeak 0-100)."""
    sample_rate_hz: int = 16000
    """Output sample rate (espeak renders at 22.05 kHz and is resampled)."""
    shard_utterances: int = 500
    """Utterances per Parquet shard."""
    workers: int = 0
    """Synthesis processes; 0 = one per CPU core."""
    second_language: str = ""
    """Code of an optional second language (one of SECOND_LANGUAGES, e.g. "es"); "" = English only."""
    second_language_share: float = 0.2
    """Fraction of the utterances of every split (train, dev, test) spoken in the second language."""
    punctuation: bool = False
    """Written transcripts: English sentences get casing, commas, full stops, question marks and
    digits, the second language its accents and punctuation (false = the lower-case a-z' corpus)."""

    def __post_init__(self) -> None:
        # A small corpus gets held-out splits to match (0.05 h of train was 5x smaller than its test
        # split), a large one no more than the default's: WER on 400 utterances is precise to ~1 point.
        scale = min(1.0, self.train_hours / 6.0)
        if self.dev_utterances is None:
            self.dev_utterances = max(10, round(200 * scale))
        if self.test_utterances is None:
            self.test_utterances = max(20, round(400 * scale))

    def validate(self) -> None:
        """Field ranges; the checks against espeak-ng's voice inventory (enough accent x variant
        combinations, a known second language) are ``data.synth.check_config``'s."""
        require(self.train_hours > 0, "synth.train_hours", "must be positive")
        require(1 <= self.min_words <= self.max_words, "synth.min_words", "must be >= 1 and <= max_words")
        require(self.train_speakers >= 1 and self.heldout_speakers >= 1, "synth.train_speakers",
                "train_speakers and heldout_speakers must be >= 1")
        require(self.shard_utterances >= 1, "synth.shard_utterances", "must be >= 1")
        require(0 < self.second_language_share < 1, "synth.second_language_share", "must be in (0, 1)")


@dataclass
class FeatureConfig:
    """The acoustic front end (defaults: 80 log-mel, 25 ms Hamming window, 10 ms hop, 16 kHz)."""

    sample_rate_hz: int = 16000
    """Every utterance is resampled to this rate before features."""
    n_mels: int = 80
    """Mel bins."""
    win_length_ms: float = 25.0
    """Analysis window length."""
    hop_length_ms: float = 10.0
    """Frame shift."""
    n_fft: int = 400
    """FFT size in samples (>= window length in samples)."""
    window: Literal["hamming", "hann"] = "hamming"
    """Analysis window shape."""
    log_floor: float = 1e-6
    """Added to mel power before the log so silence does not give -inf."""
    normalize: Literal["utterance", "none"] = "utterance"
    """Per-utterance zero-mean unit-variance per mel bin, or raw log-mel."""
    kind: Literal["log_mel", "whisper_log_mel", "waveform"] = "log_mel"
    """log_mel for spectrogram models; whisper_log_mel = WhisperFeatureExtractor's front end exactly
    (Hann, slaney mel, log10, max - 8 clamp, (x + 4) / 4; for published Whisper checkpoints; set
    normalize=none and window=hann); waveform for raw-audio models (no front end)."""
    pad_to_s: float | None = None
    """whisper_log_mel: zero-pad each waveform to this many seconds before the front end, as
    WhisperFeatureExtractor pads to its 30 s chunk (published Whisper encoders were only ever shown
    30 s windows); 0 = no padding (faster; the encoder masks the padding it is batched with); null =
    the checkpoint's chunk with model.from_hf, else no padding."""
    waveform_normalize: bool = False
    """waveform: zero-mean unit-variance each utterance's samples before the model (the
    `do_normalize` of Wav2Vec2FeatureExtractor, which XLS-R / Large checkpoints were trained with)."""
    placement: Literal["data", "worker"] = "data"
    """Where training computes log-mel: data = on CPU inside Ray Data; worker = batched on the
    training device (rows carry waveforms). Validation and eval always compute it in-process.
    Ignored for waveform models."""

    @property
    def win_length(self) -> int:
        return round(self.sample_rate_hz * self.win_length_ms / 1000)

    @property
    def hop_length(self) -> int:
        return round(self.sample_rate_hz * self.hop_length_ms / 1000)

    def validate(self) -> None:
        require(self.sample_rate_hz > 0, "features.sample_rate_hz", "must be positive")
        require(self.n_mels > 0, "features.n_mels", "must be positive")
        require(0 < self.hop_length_ms <= self.win_length_ms, "features.hop_length_ms",
                "must be positive and at most win_length_ms")
        require(self.n_fft >= self.win_length, "features.n_fft",
                f"must be >= the window length in samples ({self.win_length})")
        require(self.pad_to_s is None or self.pad_to_s >= 0, "features.pad_to_s", "must be >= 0 or null")
        require(self.kind == "whisper_log_mel" or not self.pad_to_s, "features.pad_to_s",
                "pads only the whisper_log_mel front end (features.kind=whisper_log_mel)")
        require(self.kind == "waveform" or not self.waveform_normalize, "features.waveform_normalize",
                "applies to waveform input only (features.kind=waveform)")
        if self.kind == "whisper_log_mel":
            require(self.normalize == "none", "features.normalize",
                    "must be none with whisper_log_mel (it scales its own output as Whisper does)")
            require(self.window == "hann", "features.window", "must be hann with whisper_log_mel (Whisper's window)")
            require(self.placement == "data", "features.placement",
                    "must be data with whisper_log_mel (its max - 8 dB clamp is per utterance, computed on CPU)")
            require(self.win_length == self.n_fft, "features.win_length_ms",
                    f"must equal n_fft ({self.n_fft} samples) with whisper_log_mel")

    def num_frames(self, num_samples: int) -> int:
        return 1 + num_samples // self.hop_length


@dataclass
class TextConfig:
    """How transcripts become token ids (data/text.py, docs/text.md)."""

    normalizer: Literal["none", "basic", "english"] = "basic"
    """Target normaliser: none (NFC only: cased, punctuated), basic (any script: lower-case, no
    punctuation or symbols), english (basic + spellings, contractions, numbers as words)."""
    tokenizer: Literal["char", "sentencepiece", "hf", "ctc_vocab"] = "char"
    """char (alphabet below), sentencepiece (a .model file), hf (a tokenizer.json, e.g. Whisper's),
    ctc_vocab (a wav2vec 2.0 CTC checkpoint's vocab.json: its characters, '|' between words)."""
    alphabet: str = "abcdefghijklmnopqrstuvwxyz'"
    """char: characters the model can emit besides space and the CTC blank (after normalising);
    auto = the training split's characters, resolved at run start into the run's config."""
    tokenizer_path: str | None = None
    """sentencepiece / hf: the tokenizer file (local or s3://); copied into the run directory. Unset =
    trained on the training split at run start (text.vocab_size units): a SentencePiece model, or for
    hf a byte-level BPE tokenizer.json with Whisper's special tokens (exports to transformers)."""
    vocab_size: int = 256
    """sentencepiece / hf trained here: units to learn (an upper bound: a small corpus may give fewer;
    hf: text ids, Whisper's 108 special tokens come on top)."""
    subword_model: Literal["unigram", "bpe"] = "unigram"
    """sentencepiece trained here: the SentencePiece model type."""
    character_coverage: float = 1.0
    """sentencepiece trained here: share of characters covered (0.9995 for CJK-sized alphabets)."""
    max_target_tokens: int | None = None
    """Longest target in tokens; longer utterances are filtered and counted (null = the decoder's
    positions minus its prompt; CTC models also filter targets longer than their encoder frames)."""

    def validate(self) -> None:
        if self.alphabet != "auto":
            require(len(set(self.alphabet)) == len(self.alphabet), "text.alphabet", "has repeated characters")
            require(" " not in self.alphabet, "text.alphabet", "must not contain space (it is always included)")
        require(self.vocab_size >= 2, "text.vocab_size", "must be >= 2")
        require(0.9 <= self.character_coverage <= 1.0, "text.character_coverage", "must be in [0.9, 1]")
        require(self.max_target_tokens is None or self.max_target_tokens >= 1, "text.max_target_tokens",
                "must be >= 1 or null")


DEFAULT_DURATION_BUCKETS = 24
"""Chosen on the demo corpus (default SynthConfig, 9476 utterances, each of 2 workers' halves) at its
60 padded-s per-worker budget: padding 2.8-2.9% vs 3.3% for the 512-utterance sort window, holding at
most ~520 utterances (the window holds 512); 16 buckets pad 4.0-4.4%, 32 pad 2.2% but hold ~620 and
flush more partial batches at the end of an epoch."""


@dataclass
class BatchingConfig:
    """How a worker groups its stream of utterances into batches."""

    sort_window_utterances: int = 512
    """Utterances gathered and sorted by duration before cutting batches (bigger = less padding)."""
    max_batch_utterances: int | None = None
    """Optional cap on utterances per micro-batch, on top of the audio-seconds budget."""
    duration_buckets: int = DEFAULT_DURATION_BUCKETS
    """Duration buckets cut at quantiles of the split's utterance durations; 0 = the sort window instead."""

    def validate(self) -> None:
        require(self.sort_window_utterances >= 1, "batching.sort_window_utterances", "must be >= 1")
        require(self.duration_buckets >= 0, "batching.duration_buckets", "must be >= 0 (0 = sort window)")
        require(self.max_batch_utterances is None or self.max_batch_utterances >= 1,
                "batching.max_batch_utterances", "must be >= 1 or null")


@dataclass
class AugmentConfig:
    """Masking applied to each training batch (off by default; validation and eval never mask)."""

    freq_masks: int = 0
    """SpecAugment frequency masks per utterance (recipes: 2)."""
    freq_mask_max_bins: int = 27
    """Widest frequency mask, in mel bins (SpecAugment's F; Whisper: 27)."""
    time_masks: int = 0
    """SpecAugment time masks per utterance (recipes: 2)."""
    time_mask_max_frames: int = 100
    """Widest time mask, in frames (SpecAugment's T; Whisper: 100), capped at 20% of the utterance."""
    span_mask_prob: float = 0.0
    """Probability that a masked span starts at each frame (wav2vec 2.0's p; its recipe: 0.065)."""
    span_mask_frames: int = 10
    """Length of each masked span in frames (10 frames = 100 ms of log-mel)."""
    speed_factors: tuple[float, ...] = ()
    """Speed perturbation: each training utterance is played at one of these rates, drawn uniformly
    (tempo and pitch change together, Kaldi/ESPnet style; recipes: [0.9, 1.0, 1.1]); empty = off."""
    noise_root: str | None = None
    """Shard corpus of noise clips (MUSAN prepared with `raytrain-speech prepare`, or `synth-noise`)
    mixed into training utterances; None = no additive noise."""
    noise_split: str = "noise"
    """Split of noise_root holding the clips (`prepare` writes 'train', `synth-noise` writes 'noise')."""
    noise_prob: float = 1.0
    """Fraction of training utterances that get noise when noise_root is set."""
    noise_snr_db: tuple[float, float] = (5.0, 20.0)
    """Signal-to-noise ratio range in dB; each noisy utterance draws one uniformly."""
    noise_max_clips: int = 256
    """Noise clips each data process holds in memory (the first this many of the split)."""

    def validate(self) -> None:
        for key in ("freq_masks", "time_masks"):
            require(getattr(self, key) >= 0, f"augment.{key}", "must be >= 0")
        require(self.freq_mask_max_bins >= 1, "augment.freq_mask_max_bins", "must be >= 1")
        require(self.time_mask_max_frames >= 1, "augment.time_mask_max_frames", "must be >= 1")
        require(0.0 <= self.span_mask_prob < 1.0, "augment.span_mask_prob", "must be in [0, 1)")
        require(self.span_mask_frames >= 1, "augment.span_mask_frames", "must be >= 1")
        require(all(0.5 <= f <= 2.0 for f in self.speed_factors), "augment.speed_factors",
                "must be rates between 0.5 and 2.0, e.g. [0.9, 1.0, 1.1]")
        require(0.0 <= self.noise_prob <= 1.0, "augment.noise_prob", "must be in [0, 1]")
        lo, hi = self.noise_snr_db
        require(lo <= hi, "augment.noise_snr_db", "must be [low, high] with low <= high")
        require(self.noise_max_clips >= 1, "augment.noise_max_clips", "must be >= 1")

    @property
    def enabled(self) -> bool:
        """Masks on the training device (SpecAugment or span masks)."""
        return self.freq_masks > 0 or self.time_masks > 0 or self.span_mask_prob > 0

    @property
    def waveform_enabled(self) -> bool:
        """Waveform augmentation inside Ray Data (speed perturbation or additive noise)."""
        return any(f != 1.0 for f in self.speed_factors) or (self.noise_root is not None and self.noise_prob > 0)
