"""`reformer convert`: transformers' Reformer directories <-> run directories.

    reformer convert --from-transformers DIR --out RUN [--data FILE] [--seq-len L]
    reformer convert --to-transformers RUN --out DIR

An imported run holds the resolved config, a step-0 checkpoint (weights only) and the
tokenizer: bytes + offset for a byte-level vocabulary (258 = bytes + 2 for
google/reformer-enwik8), or the directory's sentencepiece model. `reformer eval` and
`generate` accept it, and `reformer train --init-from RUN` fine-tunes it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro
import yaml

from ..checkpoint import latest_checkpoint, save_checkpoint
from ..files import atomic_output, atomic_write
from ..interop import SPM_FILES, check_config, from_transformers, to_transformers
from ..run_config import TrainConfig, config_to_dict
from ..training.runs import load_run, resolve_tokenizer

TOKENIZER_FILE = "spm.model"


@dataclass
class ConvertArgs:
    """Convert between transformers' Reformer format and this library's run directories."""

    out: str
    """Import: the run directory to write. Export: the transformers directory to write."""
    from_transformers: str | None = None
    """A transformers model directory (config.json and model.safetensors or
    pytorch_model.bin) of a ReformerModelWithLMHead to import as a run."""
    to_transformers: str | None = None
    """A run or checkpoint directory to export as a transformers model directory."""
    task: Literal["enwik8", "text"] | None = None
    """Import: the task the run evaluates and fine-tunes on. Default: text with the
    directory's sentencepiece model, else enwik8 (bytes + offset)."""
    data: str | None = None
    """Import: the data file recorded in the run (eval and train take --data too)."""
    byte_offset: int | None = None
    """Import, byte-level: token id = byte + offset. Default: vocab_size - 256."""
    seq_len: int | None = None
    """Import: the run's sequence length (default min(max_seq_len, 4096)). Export: the
    length that fixes the bucket count of a model with n_buckets=None (default: the run's)."""


def _import(args: ConvertArgs) -> int:
    src, out = Path(args.from_transformers), Path(args.out)
    if out.exists() and latest_checkpoint(out) is not None:
        raise ValueError(f"--out {out} already holds a run; choose another directory")
    lm = from_transformers(src)  # every refusal happens here, before anything is written
    cfg_m = lm.config
    if not cfg_m.causal:
        raise ValueError(
            f"{src} is an encoder (ReformerForMaskedLM): `reformer convert` writes language-"
            "model runs; load it in Python with reformer.interop.from_transformers (its "
            "vocabulary is its own tokenizer's, not this library's byte + mask scheme)"
        )
    spm = next((src / f for f in SPM_FILES if (src / f).is_file()), None)
    task = args.task or ("text" if spm is not None else "enwik8")
    tokenizer = None
    offset = 0
    if task == "text" and spm is not None:
        tokenizer = TOKENIZER_FILE
    else:
        offset = cfg_m.vocab_size - 256 if args.byte_offset is None else args.byte_offset
        if offset < 0:
            raise ValueError(
                f"the model's vocabulary ({cfg_m.vocab_size}) is smaller than bytes (256) and "
                f"{src} has no sentencepiece model ({', '.join(SPM_FILES)}): no tokenizer fits"
            )
        if 256 + offset > cfg_m.vocab_size:
            raise ValueError(
                f"--byte-offset {offset}: bytes + offset reach id {255 + offset}, past the "
                f"model's vocabulary of {cfg_m.vocab_size}; the largest offset is "
                f"{cfg_m.vocab_size - 256}"
            )
    seq_len = args.seq_len or min(cfg_m.max_seq_len, 4096)
    if seq_len > cfg_m.max_seq_len:
        raise ValueError(
            f"--seq-len {seq_len} exceeds the model's max_seq_len={cfg_m.max_seq_len} "
            "(max_position_embeddings in config.json)"
        )
    cfg = TrainConfig(
        model=cfg_m, task=task, data=args.data, seq_len=seq_len, out=str(out),
        byte_offset=offset, steps=1, eval_hashes=(),
        **({"tokenizer": tokenizer} if tokenizer else {}),  # (a field of task text only)
    )  # fmt: skip
    resolved = config_to_dict(cfg)
    out.mkdir(parents=True, exist_ok=True)
    if spm is not None:
        with atomic_output(out / TOKENIZER_FILE) as tmp:
            shutil.copyfile(spm, tmp)
    save_checkpoint(out, 0, lm.float(), config=resolved, keep=1)
    atomic_write(out / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
    what = f"sentencepiece ({TOKENIZER_FILE})" if tokenizer else f"bytes + {offset}"
    print(
        f"wrote {out}: {cfg_m.n_layers} layers ({cfg_m.attention}), d_model {cfg_m.d_model}, "
        f"vocabulary {cfg_m.vocab_size} ({what}), task {task}"
    )
    return 0


def _export(args: ConvertArgs) -> int:
    run = Path(args.to_transformers)
    model, cfg, ckpt, step = load_run(run, torch.device("cpu"))
    seq_len = args.seq_len or cfg.seq_len
    check_config(model.config, seq_len)  # refuse before writing
    tok = resolve_tokenizer(cfg)
    if tok is not None and not Path(tok).is_file():
        raise FileNotFoundError(f"the run's tokenizer {tok} is missing; nothing was written")
    out = to_transformers(model, args.out, seq_len=seq_len)
    if tok is not None:
        with atomic_output(out / "spiece.model") as tmp:
            shutil.copyfile(tok, tmp)
    print(f"wrote {out} (config.json, model.safetensors) from {ckpt} (step {step})")
    return 0


def cmd_convert(argv: list[str]) -> int:
    args = tyro.cli(ConvertArgs, args=argv, prog="reformer convert")
    if (args.from_transformers is None) == (args.to_transformers is None):
        raise ValueError("reformer convert needs exactly one of --from-transformers DIR and "
                         "--to-transformers RUN")  # fmt: skip
    return _import(args) if args.from_transformers else _export(args)
