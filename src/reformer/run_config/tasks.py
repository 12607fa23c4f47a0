"""One typed config per task: `TrainConfig` holds the fields every run reads, and each task's
class (`TASK_CONFIGS`) adds only the fields that task reads, so a field it would ignore
cannot be given to it: `Enwik8Run(image_side=16)` is an unknown keyword, and
`TrainConfig(task="enwik8", image_side=16)` (which builds the task's class) a ValueError
naming the field, the task and the tasks that read it.

    TrainConfig                 model, optim, task, steps, batch_size, ..., init_from
      LMRun                     + seq_len, eval_hashes (next-token language models)
        DuplicationRun          (its data are generated)
        Enwik8Run               + data, byte_offset
        TextRun                 + data, byte_offset, tokenizer
        ImagesRun               + data, image_side
      EncoderRun                + seq_len (bidirectional encoders)
        MLMRun                  + data, encoder: MaskingConfig
        ClassifyRun             + data, tokenizer, encoder: ClassifyConfig
        ListOpsRun              + encoder: ListOpsConfig (its data are generated)
      TranslationRun            + data, translation; model: TranslationModelConfig
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal

from ..config import ReformerConfig, sequence_parallel_problem
from ..validate import at_least, check_annotations, within
from .sections import (
    ClassifyConfig,
    ListOpsConfig,
    MaskingConfig,
    OptimConfig,
    TranslationConfig,
    TranslationModelConfig,
)

Task = Literal[
    "duplication", "enwik8", "text", "images", "translation", "mlm", "classify", "listops"
]
TASKS: tuple[str, ...] = Task.__args__
LM_TASKS = ("duplication", "enwik8", "text", "images")
ENCODER_TASKS = ("mlm", "classify", "listops")


class _ByTask(type):
    """`TrainConfig(task=T, **fields)` builds task T's class; a field T's class does not
    have is refused by name (`refuse_unread`) rather than as an unexpected keyword."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if cls is TrainConfig:
            cls = config_class(kwargs.get("task", "duplication"))
            refuse_unread(cls, kwargs)
        return super().__call__(*args, **kwargs)


@dataclass
class TrainConfig(metaclass=_ByTask):
    """A training run: the fields every task reads. `TrainConfig(task=T, ...)` builds task
    T's class (`TASK_CONFIGS[T]`); `reformer train --task T --help` lists its flags."""

    model: ReformerConfig = field(default_factory=ReformerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    task: Task = "duplication"
    """duplication, enwik8, text, images (language models), mlm, classify, listops
    (encoders), translation (an encoder-decoder)."""
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
    log_every: int = 10
    max_minutes: float | None = None
    """Stop (with a checkpoint) after this much wall-clock time."""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda, cuda:N."""
    cpu_cache_gib: float = 0.0
    """On the CPU: serve tensors from a caching allocator that keeps up to this many GiB of
    freed blocks for reuse (reformer.cpu_cache: no page faults for a step's repeated shapes;
    built with the system's C++ compiler, else a warning); 0: PyTorch's allocator."""
    precision: Literal["fp32", "bf16", "auto"] = "fp32"
    """bf16: autocast to bfloat16 (fp32 weights, softmax statistics and accumulation); auto:
    bf16 where the device multiplies bf16 natively (CPUs with AMX or AVX-512 BF16, CUDA with
    bf16), else fp32. The run's config saves the choice; --resume keeps it."""
    parallel: Literal["ddp", "fsdp", "sequence"] = "ddp"
    """Multi-process training (torchrun): ddp replicates the model on every rank; fsdp
    shards parameters, gradients and optimiser state over the ranks (FSDP2); sequence
    splits every sequence over --sequence-ranks ranks (LSH and local layers; language
    models and encoders). A single process trains as usual, but the model and task must
    still be ones that sequence can split (checked with the config)."""
    sequence_ranks: int | None = None
    """--parallel sequence: ranks that share one sequence (default: all of them); the
    world size over it splits the batch (data parallel)."""
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

    # What a task without these fields reads in their place (its class has no such field).
    data: ClassVar[str | None] = None
    byte_offset: ClassVar[int] = 0
    tokenizer: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        check_annotations(self, "")
        for name in ("steps", "batch_size", "checkpoint_every", "keep_checkpoints"):
            at_least(name, getattr(self, name), 1)
        for name in ("eval_every", "log_every", "eval_batches"):
            at_least(name, getattr(self, name), 0)
        if self.eval_batch_size is not None:
            at_least("eval_batch_size", self.eval_batch_size, 1)
        at_least("cpu_cache_gib", self.cpu_cache_gib, 0)
        if self.max_minutes is not None:
            at_least("max_minutes", self.max_minutes, 0, strict=True)
        if self.sequence_ranks is not None:
            at_least("sequence_ranks", self.sequence_ranks, 1)
            if self.parallel != "sequence":
                raise ValueError(
                    "sequence_ranks applies to --parallel sequence only; add --parallel "
                    "sequence or drop --sequence-ranks"
                )
        if self.parallel == "sequence" and self.task == "translation":
            raise ValueError(
                "--parallel sequence does not split the encoder-decoder (task translation); "
                "use --parallel ddp or fsdp"
            )
        if self.parallel == "sequence" and sequence_parallel_problem(self.model, 0):
            raise ValueError(sequence_parallel_problem(self.model, 0))


@dataclass
class LMRun(TrainConfig):
    """Next-token language models (tasks duplication, enwik8, text, images)."""

    seq_len: int = 1024
    """Training sequence length (images: fixed by image_side)."""
    eval_hashes: tuple[int, ...] = (1, 2, 4, 8)
    """Hash-round counts of the evaluation table printed at the end (LSH models)."""
    image_side: ClassVar[int] = 64  # (a field of task images only)

    def __post_init__(self) -> None:
        if isinstance(self.eval_hashes, list):
            self.eval_hashes = tuple(self.eval_hashes)
        super().__post_init__()
        at_least("seq_len", self.seq_len, 1)
        for n in self.eval_hashes:
            within("eval_hashes", n, 1, 64)
        if not self.model.causal:
            raise ValueError(
                f"task {self.task!r} trains a next-token language model, which must be causal "
                "(a non-causal one sees the token it predicts): remove --model.no-causal, "
                "or use task mlm for a bidirectional model"
            )


@dataclass
class DuplicationRun(LMRun):
    """The paper's synthetic duplication task (section 5): `0 w 0 w`, data generated."""

    task: Literal["duplication"] = "duplication"


@dataclass
class Enwik8Run(LMRun):
    """enwik8 bytes, in bits per character."""

    task: Literal["enwik8"] = "enwik8"
    data: str | None = None
    """The enwik8 file (raw or .zip)."""
    byte_offset: int = 0
    """Token id = byte + byte_offset (transformers' enwik8 model reserves ids 0 and 1:
    byte_offset 2)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        at_least("byte_offset", self.byte_offset, 0)


@dataclass
class TextRun(Enwik8Run):
    """Any text file, as bytes or (with --tokenizer) sentencepiece subwords."""

    task: Literal["text"] = "text"
    data: str | None = None
    """A text file."""
    tokenizer: str | None = None
    """A sentencepiece model file to encode the text with instead of bytes (a relative path
    is looked up in the run directory first)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tokenizer is not None and self.byte_offset:
            raise ValueError(
                f"TrainConfig.tokenizer is for task 'text' without byte_offset (got "
                f"byte_offset={self.byte_offset}): the text is encoded with it, not as bytes"
            )


@dataclass
class ImagesRun(LMRun):
    """Downsampled ImageNet (npz files) flattened to 3 x side^2 tokens, in bits per dim."""

    task: Literal["images"] = "images"
    data: str | None = None
    """A directory of npz image files."""
    image_side: int = 64
    """Images are downsampled to image_side x image_side pixels (64 = imagenet64)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.image_side <= 64 or 64 % self.image_side:
            raise ValueError(f"image_side must divide 64 (1..64); got {self.image_side}")


@dataclass
class EncoderRun(TrainConfig):
    """Bidirectional encoders (tasks mlm, classify, listops)."""

    seq_len: int = 1024
    """Training sequence length (the longest example)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        at_least("seq_len", self.seq_len, 1)
        if self.model.causal:
            raise ValueError(
                f"task {self.task!r} trains an encoder: set --model.no-causal (model.causal: "
                "false in a config file), or start from an encoder preset: mlm-small, "
                "classify-small, listops-small"
            )


@dataclass
class MLMRun(EncoderRun):
    """Masked-language-model pre-training on any byte file."""

    task: Literal["mlm"] = "mlm"
    data: str | None = None
    """Any byte file (enwik8 raw or .zip, a text file)."""
    encoder: MaskingConfig = field(default_factory=MaskingConfig)


@dataclass
class ClassifyRun(EncoderRun):
    """Text classification from labelled examples."""

    task: Literal["classify"] = "classify"
    data: str | None = None
    """A directory of {train,val,test}.jsonl or .tsv files."""
    tokenizer: str | None = None
    """With encoder.vocab sentencepiece: a sentencepiece model file to encode the text with
    (a relative path is looked up in the run directory first)."""
    encoder: ClassifyConfig = field(default_factory=ClassifyConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        enc = self.encoder
        if self.tokenizer is not None and enc.vocab != "sentencepiece":
            raise ValueError(
                f"TrainConfig.tokenizer is for task 'classify' with encoder.vocab "
                f"'sentencepiece' (got encoder.vocab={enc.vocab!r}): the text is encoded with it"
            )
        if (
            enc.vocab == "sentencepiece"
            and self.tokenizer is None
            and self.model.vocab_size < enc.spm_vocab_size + 2
        ):
            raise ValueError(
                f"model.vocab_size={self.model.vocab_size} cannot hold the sentencepiece "
                f"vocabulary of encoder.spm_vocab_size={enc.spm_vocab_size} plus the mask and "
                f"CLS tokens; set --model.vocab-size {enc.spm_vocab_size + 2}"
            )


@dataclass
class ListOpsRun(EncoderRun):
    """ListOps (Long Range Arena): generated expressions, their value the label."""

    task: Literal["listops"] = "listops"
    encoder: ListOpsConfig = field(default_factory=ListOpsConfig)


@dataclass
class TranslationRun(TrainConfig):
    """A reversible encoder-decoder (the paper's WMT14 en-de), in BLEU."""

    model: TranslationModelConfig = field(default_factory=TranslationModelConfig)
    task: Literal["translation"] = "translation"
    data: str | None = None
    """A directory of aligned {split}.{lang} files (one sentence per line, or WMT .sgm)."""
    translation: TranslationConfig = field(default_factory=TranslationConfig)


TASK_CONFIGS: dict[str, type[TrainConfig]] = {
    "duplication": DuplicationRun,
    "enwik8": Enwik8Run,
    "text": TextRun,
    "images": ImagesRun,
    "translation": TranslationRun,
    "mlm": MLMRun,
    "classify": ClassifyRun,
    "listops": ListOpsRun,
}


def config_class(task: Any) -> type[TrainConfig]:
    """The config class of `task`; a ValueError naming the tasks for any other value."""
    if not isinstance(task, str) or task not in TASK_CONFIGS:
        raise ValueError(f"task must be one of {' | '.join(map(repr, TASKS))}; got {task!r}")
    return TASK_CONFIGS[task]


# Why a task does not read a field, where "read by task X only" would not say enough.
_WHY = {
    ("translation", "seq_len"): "translation lengths are translation.max_len",
    ("translation", "eval_hashes"): "translation runs print no hash-round table",
    **{(t, "eval_hashes"): "encoder runs print no hash-round table" for t in ENCODER_TASKS},
    **{(t, "data"): f"the {t} task generates its data" for t in ("duplication", "listops")},
}
_TRANSLATION_MODEL = (
    "translation runs take d_model, d_ff, n_heads, n_layers, dropout, reversible, n_hashes "
    "and chunk_len from model, the rest from translation.*"
)


def field_paths(cls: type) -> dict[str, Any]:
    """Every field of dataclass `cls` by dotted path ("seq_len", "model.compat.hash_seed")
    -> its default; a section's own path maps to its class."""
    out: dict[str, Any] = {}
    for f in fields(cls):
        factory = f.default_factory
        if isinstance(factory, type) and hasattr(factory, "__dataclass_fields__"):
            out[f.name] = factory
            out |= {f"{f.name}.{k}": v for k, v in field_paths(factory).items()}
        else:
            out[f.name] = f.default
    return out


@functools.cache
def task_paths() -> dict[str, dict[str, Any]]:
    """`field_paths` of each task's class, by task."""
    return {t: field_paths(cls) for t, cls in TASK_CONFIGS.items()}


@functools.cache
def any_task_paths() -> dict[str, Any]:
    """The dotted paths of the fields some task reads -> their defaults (the same in every
    class that has the field)."""
    out: dict[str, Any] = {}
    for paths in task_paths().values():
        out |= {k: v for k, v in paths.items() if k not in out}
    return out


def readers(path: str) -> list[str]:
    """The tasks whose config has the field at dotted `path`."""
    return [t for t, paths in task_paths().items() if path in paths]


def unread_reason(task: str, path: str) -> str:
    """Why `task` has no field `path` (which another task reads)."""
    if task == "translation" and path.startswith("model."):
        return _TRANSLATION_MODEL
    tasks = readers(path)
    plural = "s" if len(tasks) > 1 else ""
    return _WHY.get((task, path), f"read by task{plural} {' and '.join(tasks)} only")


def refusal(task: str, paths: list[str]) -> ValueError:
    """The error for fields that `task` does not read, each named with its reason."""
    listing = "; ".join(f"{p} ({unread_reason(task, p)})" for p in paths)
    them = "it" if len(paths) == 1 else "them"
    return ValueError(
        f"task {task!r} does not use {listing}; remove {them} or choose the task that does"
    )


def refuse_unread(cls: type[TrainConfig], kwargs: dict[str, Any]) -> None:
    """A ValueError naming the keyword arguments that `cls` has no field for."""
    own = {f.name for f in fields(cls)}
    unread = [k for k in kwargs if k not in own and readers(k)]
    if unread:  # (a name no task has is left to the constructor's TypeError)
        raise refusal(cls.task, unread)
