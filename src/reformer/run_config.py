"""Run configuration: typed dataclasses, presets, and the layering of config sources.

Layering (lowest to highest): dataclass defaults < `--preset` < `--config FILE` (YAML or
TOML) < command-line overrides. Unknown keys are errors at every layer.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import warnings
from collections.abc import Iterator
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from .config import HFCompat, ReformerConfig, nest_compat, nest_run_compat
from .validate import at_least, check_annotations, within

# The model fields a translation run reads (its encoder-decoder's shared sizes).
TRANSLATION_MODEL_FIELDS = frozenset(
    ("d_model", "d_ff", "n_heads", "n_layers", "dropout", "reversible", "n_hashes", "chunk_len")
)


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule."""

    name: Literal["adafactor", "adamw"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: Literal["rsqrt", "cosine", "constant"] = "rsqrt"
    """rsqrt: linear warm-up then lr * sqrt(warmup / step) (the authors'); cosine: warm-up
    then cosine decay to min_lr_ratio * lr at the last step."""
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
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


ENCODER_TASKS = ("mlm", "classify", "listops")


@dataclass
class EncoderConfig:
    """Encoder runs (tasks mlm, classify, listops): masking, the classification head, the
    tokenizer of labelled text, the generated ListOps data."""

    mask_rate: float = 0.15
    """mlm: share of real positions chosen for prediction (BERT: 0.15)."""
    mask_token: float = 0.8
    """mlm: share of the chosen positions whose input becomes the mask token."""
    random_token: float = 0.1
    """mlm: share of the chosen positions whose input becomes a random byte (the rest keep
    their own)."""
    pooling: Literal["mean", "first"] = "mean"
    """classify, listops: the sequence's state is the mean over its real positions, or the
    state of a CLS token put first."""
    vocab: Literal["bytes", "sentencepiece"] = "bytes"
    """classify: UTF-8 bytes, or sentencepiece subwords (the model in --tokenizer, else one
    trained on the training texts and saved as DIR/spm.model)."""
    spm_vocab_size: int = 2000
    """classify with vocab sentencepiece and no --tokenizer: size of the trained model."""
    listops_train: int = 10000
    """listops: generated training examples."""
    listops_val: int = 1000
    """listops: generated validation (and, separately, test) examples."""
    listops_min_len: int = 32
    """listops: shortest expression in tokens (the longest is seq_len)."""
    listops_max_depth: int = 10
    listops_max_args: int = 10
    listops_seed: int = 0
    """listops: the generator's seed (the data stay the same whatever the run's seed)."""

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
        at_least("encoder.spm_vocab_size", self.spm_vocab_size, 16)
        for name in ("listops_train", "listops_val", "listops_max_depth"):
            at_least(f"encoder.{name}", getattr(self, name), 1)
        # Lists have >= 2 arguments; with at most 3 some lengths cannot be built.
        at_least("encoder.listops_min_len", self.listops_min_len, 4)
        at_least("encoder.listops_max_args", self.listops_max_args, 4)
        at_least("encoder.listops_seed", self.listops_seed, 0)


@dataclass
class TrainConfig:
    """A training run. `reformer train --help` lists every field as a flag."""

    model: ReformerConfig = field(default_factory=ReformerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    translation: TranslationConfig = field(default_factory=TranslationConfig)
    """Used by task "translation" only."""
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    """Used by the encoder tasks (mlm, classify, listops) only."""
    task: Literal[
        "duplication", "enwik8", "text", "images", "translation", "mlm", "classify", "listops"
    ] = "duplication"
    data: str | None = None
    """Data path: enwik8 file (raw or .zip), text file, npz image directory, (translation)
    a directory of aligned {split}.{lang} files (one sentence per line, or WMT .sgm), (mlm)
    any byte file, (classify) a directory of {train,val,test}.jsonl or .tsv files."""
    seq_len: int = 1024
    """Training sequence length (images: fixed by image_side)."""
    image_side: int = 64
    """Images are downsampled to image_side x image_side x 3 tokens (64 = imagenet64)."""
    steps: int = 1000
    batch_size: int = 8
    """Sequences per micro-batch (per process)."""
    seed: int = 0
    out: str = "runs/run"
    """Run directory: config.yaml, metrics.jsonl, checkpoints/, plots/."""
    resume: bool = False
    """Continue the run in --out from its newest checkpoint."""
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    eval_every: int = 100
    eval_batches: int = 4
    eval_batch_size: int | None = None
    """Default: the global micro-batch, batch_size x number of processes."""
    eval_hashes: tuple[int, ...] = (1, 2, 4, 8)
    """Hash-round counts of the evaluation table printed at the end (LSH models)."""
    log_every: int = 10
    max_minutes: float | None = None
    """Stop (with a checkpoint) after this much wall-clock time."""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda, cuda:N."""
    precision: Literal["fp32", "bf16", "auto"] = "fp32"
    """bf16: autocast to bfloat16 (fp32 weights, softmax statistics and accumulation); auto:
    bf16 where the device multiplies bf16 natively (CPUs with AMX or AVX-512 BF16, CUDA with
    bf16), else fp32. The run's config saves the choice; --resume keeps it."""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """Multi-process training (torchrun): ddp replicates the model on every rank; fsdp
    shards parameters, gradients and optimiser state over the ranks (FSDP2). Ignored in a
    single process."""
    progress: bool = True
    tensorboard: bool = False
    """Also log every metric to DIR/tensorboard (TensorBoard event files; needs the
    tensorboard package, `pip install '.[tensorboard]'`)."""
    preset: str | None = None
    """Named starting point: see `reformer train --list-presets`."""
    config: str | None = None
    """YAML or TOML file of overrides (same keys as the flags, nested: model.d_model)."""
    init_from: str | None = None
    """Start from the weights of this run or checkpoint directory (e.g. one written by
    `reformer convert --from-transformers`) with a fresh optimiser and schedule; on the CLI
    its model config is the base the other layers override."""
    byte_offset: int = 0
    """enwik8 and text tasks: token id = byte + byte_offset (transformers' enwik8 model
    reserves ids 0 and 1: byte_offset 2)."""
    tokenizer: str | None = None
    """text and classify tasks: a sentencepiece model file to encode the text with instead
    of bytes (a relative path is looked up in the run directory first)."""

    def __post_init__(self) -> None:
        if isinstance(self.eval_hashes, list):
            self.eval_hashes = tuple(self.eval_hashes)
        check_annotations(self, "")
        for name in ("steps", "batch_size", "checkpoint_every", "keep_checkpoints", "seq_len"):
            at_least(name, getattr(self, name), 1)
        for name in ("eval_every", "log_every", "eval_batches"):
            at_least(name, getattr(self, name), 0)
        for n in self.eval_hashes:
            within("eval_hashes", n, 1, 64)
        if self.eval_batch_size is not None:
            at_least("eval_batch_size", self.eval_batch_size, 1)
        if self.max_minutes is not None:
            at_least("max_minutes", self.max_minutes, 0, strict=True)
        at_least("byte_offset", self.byte_offset, 0)
        self._refuse_unused()
        if self.byte_offset and self.task not in ("enwik8", "text"):
            raise ValueError(
                f"TrainConfig.byte_offset={self.byte_offset} applies to the byte-level tasks "
                f"enwik8 and text only; task is {self.task!r}"
            )
        if self.tokenizer is not None and not (
            (self.task == "text" and not self.byte_offset)
            or (self.task == "classify" and self.encoder.vocab == "sentencepiece")
        ):
            raise ValueError(
                f"TrainConfig.tokenizer is for task 'text' without byte_offset, or task "
                f"'classify' with encoder.vocab 'sentencepiece' (got task={self.task!r}, "
                f"byte_offset={self.byte_offset}, encoder.vocab={self.encoder.vocab!r}): "
                "the text is encoded with it"
            )
        if self.task in ENCODER_TASKS and self.model.causal:
            raise ValueError(
                f"task {self.task!r} trains an encoder: set --model.no-causal (model.causal: "
                "false in a config file), or start from an encoder preset: mlm-small, "
                "classify-small, listops-small"
            )
        if self.task in ("duplication", "enwik8", "text", "images") and not self.model.causal:
            raise ValueError(
                f"task {self.task!r} trains a next-token language model, which must be causal "
                "(a non-causal one sees the token it predicts): remove --model.no-causal, "
                "or use task mlm for a bidirectional model"
            )
        enc = self.encoder
        if (
            self.task == "classify"
            and enc.vocab == "sentencepiece"
            and self.tokenizer is None
            and self.model.vocab_size < enc.spm_vocab_size + 2
        ):
            raise ValueError(
                f"model.vocab_size={self.model.vocab_size} cannot hold the sentencepiece "
                f"vocabulary of encoder.spm_vocab_size={enc.spm_vocab_size} plus the mask and "
                f"CLS tokens; set --model.vocab-size {enc.spm_vocab_size + 2}"
            )
        if not 1 <= self.image_side <= 64 or 64 % self.image_side:
            raise ValueError(f"image_side must divide 64 (1..64); got {self.image_side}")

    def _refuse_unused(self) -> None:
        """A field the task does not read is refused when set, not silently ignored.

        Under `unused_fields("defer")` (the CLI's intermediate layers) nothing is checked;
        under `unused_fields("reset")` (configs read back from checkpoints, which may hold
        such fields from versions without this check) they go back to their defaults, with
        a warning."""
        mode = _UNUSED_MODE.get()
        if mode == "defer":
            return
        default = TrainConfig.__new__(TrainConfig)  # the field defaults, without validation
        for f in fields(TrainConfig):
            if f.default is not MISSING:
                setattr(default, f.name, f.default)
        unused = self._unused_sections(default) | self._unused_encoder_fields()
        if self.task in ENCODER_TASKS and self.eval_hashes not in ((), default.eval_hashes):
            unused["eval_hashes"] = "encoder runs print no hash-round table"
        if self.task != "images" and self.image_side != default.image_side:
            unused["image_side"] = "read by task 'images' only"
        if self.task in ("duplication", "listops") and self.data is not None:
            unused["data"] = f"the {self.task} task generates its data"
        if not unused:
            return
        listing = "; ".join(f"{name} ({why})" for name, why in unused.items())
        if mode == "reset":
            warnings.warn(
                f"the saved config sets fields its task {self.task!r} does not use, reset to "
                f"their defaults: {listing}",
                stacklevel=2,
            )
            self._reset_fields(unused, default)
            return
        raise ValueError(
            f"task {self.task!r} does not use {listing}; remove "
            f"{'it' if len(unused) == 1 else 'them'} or choose the task that does"
        )

    def _unused_sections(self, default: TrainConfig) -> dict[str, str]:
        """Set fields that the task does not read, field -> why: a translation run's model
        fields beyond the shared ones, seq_len and eval_hashes; any other run's translation.*."""
        unused: dict[str, str] = {}
        if self.task == "translation":
            base = ReformerConfig()
            why = (
                "translation runs take d_model, d_ff, n_heads, n_layers, dropout, reversible, "
                "n_hashes and chunk_len from model, the rest from translation.*"
            )
            for f in fields(ReformerConfig):
                name = f.name
                if name not in TRANSLATION_MODEL_FIELDS and (
                    getattr(self.model, name) != getattr(base, name)
                ):
                    unused[f"model.{name}"] = why
            if self.seq_len != default.seq_len:
                unused["seq_len"] = "translation lengths are translation.max_len"
            if self.eval_hashes not in ((), default.eval_hashes):
                unused["eval_hashes"] = "translation runs print no hash-round table"
        else:
            base_t = TranslationConfig()
            for f in fields(TranslationConfig):
                if getattr(self.translation, f.name) != getattr(base_t, f.name):
                    unused[f"translation.{f.name}"] = "read by task 'translation' only"
        return unused

    def _unused_encoder_fields(self) -> dict[str, str]:
        """Set encoder.* fields that the task does not read, field -> why (each field's
        readers known by its name's prefix: mask_ and random_ mlm, listops_ listops)."""
        unused: dict[str, str] = {}
        base_e = EncoderConfig()
        readers = {"mask_": ("mlm",), "random_": ("mlm",), "listops_": ("listops",)}
        readers |= {"vocab": ("classify",), "spm_": ("classify",)}
        for f in fields(EncoderConfig):
            if getattr(self.encoder, f.name) == getattr(base_e, f.name):
                continue
            tasks = next(
                (t for prefix, t in readers.items() if f.name.startswith(prefix)),
                ("classify", "listops"),
            )
            if self.task not in tasks:
                unused[f"encoder.{f.name}"] = f"read by task {' and '.join(tasks)} only"
        return unused

    def _reset_fields(self, names: dict[str, str], default: TrainConfig) -> None:
        """Set each named field ("seq_len", "model.n_buckets", ...) back to its default."""
        for name in names:
            section, _, field_name = name.rpartition(".")
            obj = getattr(self, section) if section else self
            base_obj = {
                "model": ReformerConfig,
                "translation": TranslationConfig,
                "encoder": EncoderConfig,
            }.get(section)
            value = getattr(base_obj(), field_name) if base_obj else getattr(default, name)
            object.__setattr__(obj, field_name, value)


_UNUSED_MODE: contextvars.ContextVar[str] = contextvars.ContextVar("unused", default="refuse")


@contextlib.contextmanager
def unused_fields(mode: str) -> Iterator[None]:
    """How TrainConfigs built inside the block treat fields their task does not use:
    "refuse" (the default), "defer" (not checked: an intermediate layer of the CLI, whose
    flags may still change the task) or "reset" (back to defaults with a warning: configs
    saved before the rule)."""
    assert mode in ("refuse", "defer", "reset"), mode
    token = _UNUSED_MODE.set(mode)
    try:
        yield
    finally:
        _UNUSED_MODE.reset(token)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` merged into `base` key by key, either's flat model compat keys nested first."""
    out = copy.deepcopy(nest_run_compat(base))
    for key, value in nest_run_compat(over).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# --- presets ---------------------------------------------------------------------------------
# One YAML file per preset in the package (presets/NAME.yaml), in the same nested keys as a
# --config file; `reformer train --list-presets` lists them.
PRESET_DIR = Path(__file__).resolve().parent / "presets"


def _load_presets() -> dict[str, dict[str, Any]]:
    presets = {}
    for path in sorted(PRESET_DIR.glob("*.yaml"), key=lambda p: p.stem):
        data = yaml.safe_load(path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"preset file {path} must hold a mapping of config keys")
        presets[path.stem] = data
    return presets


PRESETS: dict[str, dict[str, Any]] = _load_presets()


# --- config plumbing ---------------------------------------------------------------------------
def _strict(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; allowed: {sorted(known)}")
    return data


def config_from_dict(data: dict[str, Any], where: str = "config") -> TrainConfig:
    """Build a TrainConfig from nested plain data, rejecting unknown keys."""
    data = dict(_strict(TrainConfig, data, where))
    model = nest_compat(dict(data.pop("model", {}) or {}))
    model = _strict(ReformerConfig, model, f"{where} [model]")
    compat = _strict(HFCompat, dict(model.pop("compat", {}) or {}), f"{where} [model.compat]")
    optim = _strict(OptimConfig, dict(data.pop("optim", {}) or {}), f"{where} [optim]")
    translation = _strict(
        TranslationConfig, dict(data.pop("translation", {}) or {}), f"{where} [translation]"
    )
    encoder = _strict(EncoderConfig, dict(data.pop("encoder", {}) or {}), f"{where} [encoder]")
    if isinstance(data.get("eval_hashes"), list):
        data["eval_hashes"] = tuple(data["eval_hashes"])
    return TrainConfig(
        model=ReformerConfig(**model, compat=HFCompat(**compat)),
        optim=OptimConfig(**optim),
        translation=TranslationConfig(**translation),
        encoder=EncoderConfig(**encoder),
        **data,
    )


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested data (lists for tuples) for YAML/JSON."""

    def plain(x: Any) -> Any:
        if is_dataclass(x):
            return {k: plain(v) for k, v in asdict(x).items()}
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return plain(cfg)


def load_config_file(path: str) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml) or TOML (.toml) file of nested overrides."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--config {path}: no such file")
    text = p.read_text()
    if p.suffix == ".toml":
        import tomllib

        data = tomllib.loads(text)
    else:
        data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of config keys at the top level")
    return data


def preset_dict(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return _merge(PRESETS[name], {"preset": name})
