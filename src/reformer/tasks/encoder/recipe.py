"""Training, evaluation and loading of encoder runs: tasks mlm, classify and listops.

  mlm       masked-LM pre-training on any byte file (enwik8, a text file): BERT's masking
            rule (`masking.py`), loss on the masked positions only; reports masked-token
            accuracy and bits per masked byte.
  classify  sequence classification of labelled local files (`data.py`: JSONL or TSV),
            bytes or sentencepiece; accuracy and macro-F1. `--init-from` an mlm run loads
            its encoder with a fresh head.
  listops   the Long Range Arena's ListOps (`listops.py`), generated from a seed.

Every batch is a pure function of (seed, step), so a run resumed after a kill continues
bit-exactly, as the language models do (the loop is the shared `training.Trainer`).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...attention.chunked import chunk_slices
from ...attention.common import upcast
from ...checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_checkpoint_state,
    resolve_checkpoint,
)
from ...data._common import IGNORE_INDEX, make_generator
from ...data.bytes import ByteCorpus, load_enwik8, load_text
from ...distributed import barrier
from ...model import ReformerLM
from ...run_config import TrainConfig
from ...training import Recipe
from ...training.common import autocast_for
from ...training.evaluation import seeded_eval
from ...training.runs import resolve_tokenizer, saved_run_config
from . import listops
from .data import (
    ByteTokenizer,
    LabelledSet,
    ListOpsTokenizer,
    SentencePieceTokenizer,
    read_labelled,
    split_file,
    tokenizer_from_spec,
)
from .masking import MaskingRule
from .model import ReformerClassifier

SPM_FILE = "spm.model"


def byte_corpus(path: str | None) -> ByteCorpus:
    """The mlm task's bytes: enwik8 (.zip) or any raw file, split 90/5/5."""
    if path is None:
        raise ValueError(
            "task 'mlm' needs --data PATH: any local byte file, e.g. "
            "../shared/data/enwik8/enwik8-prefix-4M or a text file"
        )
    return load_enwik8(path) if str(path).endswith(".zip") else load_text(path)


def check_model_fits(cfg: TrainConfig, vocab_size: int, what: str) -> None:
    if cfg.model.vocab_size < vocab_size:
        raise ValueError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the {what} vocabulary "
            f"with its mask and CLS tokens ({vocab_size}); set --model.vocab-size {vocab_size}"
        )
    if cfg.model.max_seq_len < cfg.seq_len:
        raise ValueError(
            f"model.max_seq_len={cfg.model.max_seq_len} is shorter than --seq-len "
            f"{cfg.seq_len}; set --model.max-seq-len {cfg.seq_len} or a shorter --seq-len"
        )


def labelled_set(
    cfg: TrainConfig, examples: list, tokenizer: Any, label_names: list[str] | None
) -> LabelledSet:
    """Examples encoded as a run encodes them: cut to seq_len, a CLS token first when the
    run pools by the first position."""
    return LabelledSet.from_examples(
        examples,
        tokenizer,
        label_names,
        max_len=cfg.seq_len,
        add_cls=cfg.encoder.pooling == "first",
    )


def masking_rule(cfg: TrainConfig, tokenizer: Any) -> MaskingRule:
    enc = cfg.encoder
    return MaskingRule(
        mask_id=tokenizer.mask_id,
        n_ordinary=tokenizer.base_size,
        rate=enc.mask_rate,
        mask=enc.mask_token,
        random=enc.random_token,
    )


# --- evaluation --------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_mlm(
    model: ReformerLM,
    corpus: ByteCorpus,
    rule: MaskingRule,
    *,
    seq_len: int,
    split: str = "val",
    batch_size: int = 8,
    max_batches: int | None = 4,
    device: torch.device | None = None,
    precision: str = "fp32",
    seed: int = 0,
) -> dict[str, float]:
    """Loss (nats per masked token), bits and accuracy of the masked positions of `split`'s
    consecutive windows, masked by `rule` with generators seeded from `seed` (the same
    masks at every evaluation), on a forked RNG (the training stream is untouched)."""
    device = device or next(model.parameters()).device
    total, count, correct = 0.0, 0, 0
    with seeded_eval(model, seed, device):
        batches = corpus.eval_batches(split, seq_len, batch_size, max_batches)
        for i, (ids, _) in enumerate(batches):
            inputs, targets = rule.apply(ids, make_generator(seed, "mlm-eval", i))
            inputs, targets = inputs.to(device), targets.to(device)
            with autocast_for(device, precision):
                hidden = model.hidden_states(inputs)
                scored = targets != IGNORE_INDEX
                h, t = hidden[scored], targets[scored]  # (M, W), (M,)
                for sl in chunk_slices(t.numel(), model.config.loss_chunk_len):
                    logits = upcast(model.logits_from_hidden(h[sl][None])[0])
                    total += float(F.cross_entropy(logits, t[sl], reduction="sum"))
                    correct += int((logits.argmax(-1) == t[sl]).sum())
            count += int(t.numel())
    if count == 0:
        raise ValueError(f"no masked tokens in the {split!r} split (too short for seq_len?)")
    loss = total / count
    return {"loss": loss, "bits": loss / math.log(2), "masked_accuracy": correct / count}


def classification_metrics(preds: Tensor, labels: Tensor) -> dict[str, float]:
    """Accuracy and macro-F1 (the unweighted mean of per-class F1 over the classes that
    occur among the labels or the predictions) of (N,) predicted and true class ids."""
    accuracy = float((preds == labels).float().mean())
    f1s = []
    for c in torch.unique(torch.cat([preds, labels])).tolist():
        tp = int(((preds == c) & (labels == c)).sum())
        fp = int(((preds == c) & (labels != c)).sum())
        fn = int(((preds != c) & (labels == c)).sum())
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": accuracy, "macro_f1": sum(f1s) / len(f1s)}


@torch.no_grad()
def evaluate_classifier(
    model: ReformerClassifier,
    dataset: LabelledSet,
    *,
    batch_size: int = 8,
    max_batches: int | None = None,
    device: torch.device | None = None,
    precision: str = "fp32",
    seed: int = 0,
) -> dict[str, float]:
    """Loss (nats), accuracy and macro-F1 over `dataset` (the first max_batches batches)."""
    device = device or next(model.parameters()).device
    preds, labels, total = [], [], 0.0
    with seeded_eval(model, seed, device):
        for ids, mask, y in dataset.eval_batches(batch_size, max_batches):
            ids, mask, y = ids.to(device), mask.to(device), y.to(device)
            with autocast_for(device, precision):
                logits = upcast(model(ids, mask))
            total += float(F.cross_entropy(logits, y, reduction="sum"))
            preds.append(logits.argmax(-1).cpu())
            labels.append(y.cpu())
    if not labels:
        raise ValueError("the evaluation split holds no examples")
    p, y = torch.cat(preds), torch.cat(labels)
    return {"loss": total / y.numel()} | classification_metrics(p, y)


# --- recipes -----------------------------------------------------------------------------------
class MLMRecipe(Recipe):
    """Masked-LM pre-training: windows of seq_len bytes, BERT-masked per (seed, step)."""

    resume_sections = ("model", "encoder")

    def prepare(self, out: Path) -> None:
        self.corpus = byte_corpus(self.cfg.data)
        self.tokenizer = ByteTokenizer()
        self.rule = masking_rule(self.cfg, self.tokenizer)
        check_model_fits(self.cfg, self.tokenizer.vocab_size, "byte")

    def build_model(self) -> ReformerLM:
        return ReformerLM(copy.deepcopy(self.cfg.model)).to(self.device)

    def loss(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
        return model.loss(inputs, targets)

    def micro_batches(self, step: int) -> list[tuple[Tensor, ...]]:
        cfg, acc = self.cfg, self.cfg.optim.accumulate
        out = []
        for micro in range(acc):
            i = step * acc + micro
            ids, _ = self.corpus.train_batch(
                i, cfg.batch_size, cfg.seq_len, cfg.seed, self.data_rank, self.data_world
            )
            gen = make_generator(cfg.seed, "mlm-mask", i)
            inputs, targets = self.rule.apply(
                ids, gen, rank=self.data_rank, world_size=self.data_world
            )
            out.append((inputs.to(self.device), targets.to(self.device)))
        return out

    def micro_loss(self, output: Tensor, micros) -> Tensor:
        return output / len(micros)

    def tokens(self, micros) -> int:
        return sum(ids.numel() for ids, _ in micros) * self.data_world

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return evaluate_mlm(
            model, self.corpus, self.rule, seq_len=self.cfg.seq_len, **self.eval_settings()
        )

    def state(self, step: int) -> dict[str, Any]:
        return {"step": step, "tokenizer": self.tokenizer.spec()}


class ClassifyRecipe(Recipe):
    """Sequence classification of labelled files: DATA/{train,val}.jsonl (or .tsv)."""

    resume_sections = ("model", "encoder")
    # class ids are positions in the label list: a resumed run must see the same list
    resume_state = ("labels", "tokenizer")

    def prepare(self, out: Path) -> None:
        cfg = self.cfg
        if cfg.data is None:
            raise ValueError(
                "task 'classify' needs --data DIR: a directory with train.jsonl and val.jsonl "
                '(lines {"text": ..., "label": ...}) or train.tsv and val.tsv (a header '
                "row naming the text and label columns)"
            )
        train = read_labelled(split_file(cfg.data, "train"))
        val = read_labelled(split_file(cfg.data, "val"))
        self.tokenizer = self._tokenizer(out, [text for text, _ in train])
        self._sets(train, val, None)

    def _sets(self, train, val, names: list[str] | None) -> None:
        cfg = self.cfg
        self.train_set = labelled_set(cfg, train, self.tokenizer, names)
        names = self.train_set.label_names
        self.val_set = labelled_set(cfg, val, self.tokenizer, names)
        if self.train_set.n_classes < 2:
            raise ValueError(
                f"the training data has {self.train_set.n_classes} label ({names}); "
                "classification needs at least 2"
            )
        check_model_fits(cfg, self.tokenizer.vocab_size, self.tokenizer.name)

    def _tokenizer(self, out: Path, texts: list[str]):
        cfg = self.cfg
        if cfg.encoder.vocab == "bytes":
            return ByteTokenizer()
        if cfg.tokenizer is not None:
            return SentencePieceTokenizer(resolve_tokenizer(cfg))
        path = out / SPM_FILE
        if self.rank == 0 and not path.exists():
            out.mkdir(parents=True, exist_ok=True)
            try:
                SentencePieceTokenizer.train(texts, cfg.encoder.spm_vocab_size, path, seed=cfg.seed)
            except ValueError as e:
                raise ValueError(
                    f"encoder.spm_vocab_size={cfg.encoder.spm_vocab_size}: {e} (set "
                    "--encoder.spm-vocab-size lower, or give a trained model as --tokenizer)"
                ) from e
        barrier()  # the other ranks load the model rank 0 wrote
        tokenizer = SentencePieceTokenizer(path)
        if tokenizer.base_size != cfg.encoder.spm_vocab_size:
            raise ValueError(
                f"{path} has {tokenizer.base_size} pieces, not encoder.spm_vocab_size="
                f"{cfg.encoder.spm_vocab_size}: the run directory holds another run's model; "
                "choose another --out (or pass that model as --tokenizer)"
            )
        return tokenizer

    def build_model(self) -> ReformerClassifier:
        model = ReformerClassifier(
            copy.deepcopy(self.cfg.model), self.train_set.n_classes, self.cfg.encoder.pooling
        )
        return model.to(self.device)

    def init_from(self, path: Path, model: nn.Module) -> Any:
        # The encoder of the source run (an mlm run, or another classifier); the head, and a
        # tied masked LM's output bias, start fresh.
        return load_checkpoint(path, model, restore_rng=False, fresh=("head", "out_bias"))

    def loss(self, model: nn.Module, ids: Tensor, mask: Tensor, labels: Tensor) -> Tensor:
        return model.loss(ids, labels, mask)

    def micro_batches(self, step: int) -> list[tuple[Tensor, ...]]:
        cfg, acc = self.cfg, self.cfg.optim.accumulate
        out = []
        for micro in range(acc):
            batch = self.train_set.train_batch(
                step * acc + micro, cfg.batch_size, cfg.seed, self.data_rank, self.data_world
            )
            out.append(tuple(t.to(self.device) for t in batch))
        return out

    def micro_loss(self, output: Tensor, micros) -> Tensor:
        return output / len(micros)

    def tokens(self, micros) -> int:
        return sum(int(mask.sum()) for _, mask, _ in micros) * self.data_world

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return evaluate_classifier(model, self.val_set, **self.eval_settings())

    def state(self, step: int) -> dict[str, Any]:
        spec = self.tokenizer.spec()
        if spec.get("model"):
            # Inside the run directory: relative to it (the run can move); else absolute.
            model, run = Path(spec["model"]).resolve(), Path(self.cfg.out).resolve()
            spec["model"] = str(model.relative_to(run) if model.is_relative_to(run) else model)
        return {"step": step, "labels": self.train_set.label_names, "tokenizer": spec}

    def describe(self, model: nn.Module) -> str | None:
        t, v = self.train_set, self.val_set
        return (
            f"{self.cfg.task}: {len(t)} training and {len(v)} validation examples, "
            f"{t.n_classes} classes, {self.tokenizer.name} tokens, longest {int(t.lengths.max())}"
        )


LISTOPS_LABELS = [str(i) for i in range(10)]


def listops_split(cfg: TrainConfig, split: str) -> list[tuple[str, str]]:
    """The generated ListOps examples of a split (train, val, test: different seeds)."""
    enc = cfg.encoder
    n = enc.listops_train if split == "train" else enc.listops_val
    offset = {"train": 0, "val": 1, "test": 2}[split]
    longest = cfg.seq_len - (enc.pooling == "first")  # room for the CLS token
    if longest < enc.listops_min_len:
        raise ValueError(
            f"--seq-len {cfg.seq_len} leaves {longest} tokens for an expression, below "
            f"encoder.listops_min_len={enc.listops_min_len}; raise --seq-len or lower it"
        )
    try:
        examples = listops.generate(
            n,
            seed=enc.listops_seed * 3 + offset,
            min_length=enc.listops_min_len,
            max_length=longest,
            max_depth=enc.listops_max_depth,
            max_args=enc.listops_max_args,
        )
    except ValueError as e:
        raise ValueError(
            f"ListOps cannot be generated with --seq-len {cfg.seq_len}, "
            f"--encoder.listops-min-len {enc.listops_min_len}, --encoder.listops-max-depth "
            f"{enc.listops_max_depth} and --encoder.listops-max-args {enc.listops_max_args} "
            f"({e})"
        ) from e
    return [(text, str(label)) for text, label in examples]


class ListOpsRecipe(ClassifyRecipe):
    """ListOps: the classify recipe on generated expressions, ten classes (the values)."""

    def prepare(self, out: Path) -> None:
        self.tokenizer = ListOpsTokenizer()
        train, val = (listops_split(self.cfg, s) for s in ("train", "val"))
        self._sets(train, val, LISTOPS_LABELS)


# --- loading a run -----------------------------------------------------------------------------
def load_encoder_run(
    path: Path, device: torch.device
) -> tuple[nn.Module, TrainConfig, Path, int, dict[str, Any]]:
    """A run or checkpoint directory of an encoder task -> (model in eval mode, its run
    config, the checkpoint directory, its step, its saved state: labels and tokenizer)."""
    ckpt = resolve_checkpoint(path)
    cfg = saved_run_config(ckpt)
    state = read_checkpoint_state(ckpt)
    if cfg.task == "mlm":
        model: nn.Module = ReformerLM(cfg.model)
    else:
        labels = state.get("labels")
        if not labels:
            raise CheckpointError(f"{ckpt}: a {cfg.task} checkpoint without its label names")
        model = ReformerClassifier(cfg.model, len(labels), cfg.encoder.pooling)
    model = model.to(device)
    step = load_checkpoint(ckpt, model, restore_rng=False).step
    return model.eval(), cfg, ckpt, step, state


def evaluate_split(
    model: nn.Module,
    cfg: TrainConfig,
    state: dict[str, Any],
    split: str,
    *,
    data: str | None = None,
    batch_size: int,
    max_batches: int | None,
    precision: str = "fp32",
    seed: int = 0,
) -> dict[str, float]:
    """A loaded run's metrics (`load_encoder_run`) on `split` of its data, or of `data`:
    masked-LM loss and accuracy (mlm), classification metrics (classify, listops)."""
    common = dict(batch_size=batch_size, max_batches=max_batches, precision=precision, seed=seed)
    tokenizer = run_tokenizer(cfg, state)
    if cfg.task == "mlm":
        corpus = byte_corpus(data or cfg.data)
        rule = masking_rule(cfg, tokenizer)
        return evaluate_mlm(model, corpus, rule, seq_len=cfg.seq_len, split=split, **common)
    if cfg.task == "listops":
        examples = listops_split(cfg, split)
    else:
        examples = read_labelled(split_file(data or cfg.data, split))
    dataset = labelled_set(cfg, examples, tokenizer, state["labels"])
    return evaluate_classifier(model, dataset, **common)


def run_tokenizer(cfg: TrainConfig, state: dict[str, Any]):
    """The tokenizer a run was trained with (its sentencepiece model found in its run
    directory when the run trained it)."""
    spec = dict(state.get("tokenizer") or {"name": "bytes"})
    if spec.get("model") and not Path(spec["model"]).is_absolute():
        spec["model"] = str(Path(cfg.out) / spec["model"])
    return tokenizer_from_spec(spec)
