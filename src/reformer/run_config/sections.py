"""The sections of a run config that not every task has: the optimiser (every task), the
translation run's model and translation sections, and the encoder tasks' `encoder` sections
(one per task, each with the fields its task reads)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from ..config import ReformerConfig
from ..validate import at_least, check_annotations, within


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule."""

    name: Literal["adafactor", "adamw"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: Literal["rsqrt", "cosine", "constant", "wsd"] = "rsqrt"
    """rsqrt: linear warm-up then lr * sqrt(warmup / step) (the authors'); cosine: warm-up
    then cosine decay to min_lr_ratio * lr at the last step; constant: warm-up then lr;
    wsd (warm-up, stable, decay): constant, then linear decay to min_lr_ratio * lr over
    decay_steps steps."""
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    decay_steps: int = 0
    """wsd: steps of the linear decay (> 0)."""
    decay_start: int | None = None
    """wsd: the step the decay starts at; None: steps - decay_steps (the run's last
    decay_steps). Fixed, it makes the schedule independent of the run's length, so a run
    trained in stages (--steps 100, 200, ...) follows one schedule."""
    clip: float = 1.0
    """Gradient-norm clipping threshold; 0 disables."""
    accumulate: int = 1
    """Micro-batches per optimiser step (gradient accumulation)."""

    def __post_init__(self) -> None:
        check_annotations(self, "optim.")
        at_least("optim.lr", self.lr, 0, strict=True)
        at_least("optim.weight_decay", self.weight_decay, 0)
        at_least("optim.warmup_steps", self.warmup_steps, 0)
        within("optim.min_lr_ratio", self.min_lr_ratio, 0, 1)
        at_least("optim.decay_steps", self.decay_steps, 0)
        if self.decay_start is not None:
            at_least("optim.decay_start", self.decay_start, 0)
        if self.schedule == "wsd" and self.decay_steps == 0:
            raise ValueError(
                "optim.decay_steps must be > 0 with optim.schedule wsd (the length of the "
                "decay); set e.g. --optim.decay-steps 1000"
            )
        if self.schedule != "wsd" and (self.decay_steps or self.decay_start is not None):
            raise ValueError(
                f"optim.decay_steps and optim.decay_start apply to optim.schedule wsd only, "
                f"not {self.schedule}; set --optim.schedule wsd or drop them"
            )
        at_least("optim.clip", self.clip, 0)
        at_least("optim.accumulate", self.accumulate, 1)


@dataclass
class TranslationConfig:
    """Translation runs (task "translation"): the encoder-decoder's own fields and its data.

    The shared fields come from `model`: d_model, d_ff, n_heads, n_layers (decoder layers),
    dropout, reversible, n_hashes and chunk_len (an LSH encoder). The vocabulary is the
    sentencepiece model's, trained on the training text and saved as DIR/spm.model."""

    src_lang: str = "en"
    tgt_lang: str = "de"
    vocab_size: int = 8000
    """Shared source/target subword vocabulary (sentencepiece unigram)."""
    n_enc_layers: int = 6
    enc_attention: Literal["full", "lsh"] = "full"
    tie_embeddings: bool = True
    """One embedding matrix for source, target and output (the shared vocabulary)."""
    label_smoothing: float = 0.1
    max_len: int = 128
    """Longest sentence in subword tokens; longer training pairs are dropped."""
    max_tokens: int = 4096
    """Padded tokens per training batch (sentences x longest sentence)."""
    eval_beam: int = 1
    """Beam width of the BLEU evaluation during training (1: greedy, fastest)."""
    beam: int = 4
    """Beam width of `reformer eval` and `reformer translate`."""
    length_penalty: float = 0.6
    bleu_sentences: int = 0
    """Validation sentences translated for BLEU at each evaluation (0: all)."""

    def __post_init__(self) -> None:
        check_annotations(self, "translation.")
        for name in ("src_lang", "tgt_lang"):
            if not getattr(self, name).strip():
                raise ValueError(f"translation.{name} must be a language code such as 'en'")
        if self.src_lang == self.tgt_lang:
            raise ValueError(
                f"translation.src_lang and tgt_lang are both {self.src_lang!r}; they must differ"
            )
        # sentencepiece needs room for its 4 special pieces and some real ones
        at_least("translation.vocab_size", self.vocab_size, 16)
        for name in ("n_enc_layers", "max_len", "max_tokens", "eval_beam", "beam"):
            at_least(f"translation.{name}", getattr(self, name), 1)
        within("translation.label_smoothing", self.label_smoothing, 0, 1, open_high=True)
        at_least("translation.length_penalty", self.length_penalty, 0)
        at_least("translation.bleu_sentences", self.bleu_sentences, 0)
        if self.max_tokens < self.max_len:
            raise ValueError(
                f"translation.max_tokens={self.max_tokens} is below translation.max_len="
                f"{self.max_len}: a batch must hold at least one sentence of the longest length"
            )


@dataclass
class TranslationModelConfig:
    """A translation run's `model` section: the encoder-decoder's shared sizes (the rest is
    in `translation`). Defaults and checks are ReformerConfig's."""

    d_model: int = ReformerConfig.d_model
    d_ff: int = ReformerConfig.d_ff
    n_heads: int = ReformerConfig.n_heads
    n_layers: int = ReformerConfig.n_layers
    """Decoder layers (the encoder's: translation.n_enc_layers)."""
    dropout: float = ReformerConfig.dropout
    reversible: bool = ReformerConfig.reversible
    n_hashes: int = ReformerConfig.n_hashes
    """Hash rounds of an LSH encoder (translation.enc_attention lsh)."""
    chunk_len: int = ReformerConfig.chunk_len

    def __post_init__(self) -> None:
        ReformerConfig(**asdict(self))  # the same checks and messages as an LM's model


@dataclass
class MaskingConfig:
    """The `encoder` section of task mlm: which positions are predicted, and their input."""

    mask_rate: float = 0.15
    """Share of real positions chosen for prediction (BERT: 0.15)."""
    mask_token: float = 0.8
    """Share of the chosen positions whose input becomes the mask token."""
    random_token: float = 0.1
    """Share of the chosen positions whose input becomes a random byte (the rest keep
    their own)."""

    def __post_init__(self) -> None:
        check_annotations(self, "encoder.")
        for name in ("mask_rate", "mask_token", "random_token"):
            within(f"encoder.{name}", getattr(self, name), 0, 1)
        at_least("encoder.mask_rate", self.mask_rate, 0, strict=True)
        if self.mask_token + self.random_token > 1:
            raise ValueError(
                f"encoder.mask_token={self.mask_token} + encoder.random_token="
                f"{self.random_token} exceed 1: they are shares of the chosen positions"
            )


Pooling = Literal["mean", "first"]


@dataclass
class ClassifyConfig:
    """The `encoder` section of task classify: the head's pooling and the text's tokens."""

    pooling: Pooling = "mean"
    """The sequence's state is the mean over its real positions, or the state of a CLS
    token put first."""
    vocab: Literal["bytes", "sentencepiece"] = "bytes"
    """UTF-8 bytes, or sentencepiece subwords (the model in --tokenizer, else one trained
    on the training texts and saved as DIR/spm.model)."""
    spm_vocab_size: int = 2000
    """With vocab sentencepiece and no --tokenizer: size of the trained model."""

    def __post_init__(self) -> None:
        check_annotations(self, "encoder.")
        at_least("encoder.spm_vocab_size", self.spm_vocab_size, 16)


@dataclass
class ListOpsConfig:
    """The `encoder` section of task listops: the head's pooling and the generated data."""

    pooling: Pooling = "mean"
    """The sequence's state is the mean over its real positions, or the state of a CLS
    token put first."""
    listops_train: int = 10000
    """Generated training examples."""
    listops_val: int = 1000
    """Generated validation (and, separately, test) examples."""
    listops_min_len: int = 32
    """Shortest expression in tokens (the longest is seq_len)."""
    listops_max_depth: int = 10
    listops_max_args: int = 10
    listops_seed: int = 0
    """The generator's seed (the data stay the same whatever the run's seed)."""

    def __post_init__(self) -> None:
        check_annotations(self, "encoder.")
        for name in ("listops_train", "listops_val", "listops_max_depth"):
            at_least(f"encoder.{name}", getattr(self, name), 1)
        # Lists have >= 2 arguments; with at most 3 some lengths cannot be built.
        at_least("encoder.listops_min_len", self.listops_min_len, 4)
        at_least("encoder.listops_max_args", self.listops_max_args, 4)
        at_least("encoder.listops_seed", self.listops_seed, 0)
