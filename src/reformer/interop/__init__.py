"""Read and write transformers' Reformer checkpoints (`ReformerModelWithLMHead`; import
also `ReformerForMaskedLM`, as a causal=False ReformerLM).

    lm = from_transformers("path/to/reformer-enwik8")      # a local directory, or an instance
    to_transformers(lm, "out/dir")                          # config.json + model.safetensors

Reading a directory needs no transformers install: config.json is plain JSON and the weights
are model.safetensors (possibly sharded) or pytorch_model.bin, loaded with
`weights_only=True` (nothing is unpickled). The imported model keeps the semantics it was
trained with (`hf.TRANSFORMERS_SEMANTICS`: the chunk layout with look-back wrap, no
duplicate correction); its logits equal transformers' to float64 rounding.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..config import ReformerConfig
from ..model import ReformerLM
from .hf import InteropError, config_from_hf, config_to_hf, state_from_hf, state_to_hf

__all__ = [
    "InteropError",
    "config_from_hf",
    "config_to_hf",
    "from_transformers",
    "read_transformers_dir",
    "to_transformers",
]

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"
IMPORTABLE = ("ReformerModelWithLMHead", "ReformerForMaskedLM")
SPM_FILES = ("spiece.model", "tokenizer.model", "spm.model")


def read_transformers_dir(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict]:
    """A transformers model directory -> (config.json dict, state dict), without transformers."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory (a transformers model directory)")
    cfg_path = root / CONFIG_FILE
    if not cfg_path.is_file():
        raise InteropError(f"{root} has no {CONFIG_FILE}: not a transformers model directory")
    hf = json.loads(cfg_path.read_text())
    if (root / SAFETENSORS_FILE).is_file():
        from safetensors.torch import load_file

        state = load_file(root / SAFETENSORS_FILE)
    elif (root / SAFETENSORS_INDEX).is_file():
        from safetensors.torch import load_file

        index = json.loads((root / SAFETENSORS_INDEX).read_text())
        state = {}
        for shard in sorted(set(index["weight_map"].values())):
            state.update(load_file(root / shard))
    elif (root / TORCH_FILE).is_file():
        try:
            state = torch.load(root / TORCH_FILE, map_location="cpu", weights_only=True)
        except Exception as e:  # an unpickling error is the file's fault, said plainly
            raise InteropError(
                f"{root / TORCH_FILE} does not load with weights_only=True ({e}); convert it "
                "to model.safetensors with transformers first"
            ) from e
    else:
        raise InteropError(
            f"{root} has no {SAFETENSORS_FILE}, {SAFETENSORS_INDEX} or {TORCH_FILE}: no weights"
        )
    return hf, state


def from_transformers(model_or_dir: Any) -> ReformerLM:
    """A transformers `ReformerModelWithLMHead` or `ReformerForMaskedLM` (instance) or a
    local directory holding one -> ReformerLM with the same weights and semantics (a masked
    LM: causal=False), in eval mode, in the weights' dtype.

    Raises InteropError naming the field that cannot be represented here (a classification
    head, LSH num_chunks_after > 0, an unknown activation, num_buckets null, ...).
    """
    if isinstance(model_or_dir, (str, os.PathLike)):
        hf, state = read_transformers_dir(model_or_dir)
        other = [a for a in hf.get("architectures") or [] if a not in IMPORTABLE]
        if other:
            raise InteropError(
                f"config.json architectures {other}: from_transformers imports "
                f"{' and '.join(IMPORTABLE)} checkpoints (a classification or question-"
                "answering head has no counterpart here; fine-tune with `reformer train "
                "--task classify` instead)"
            )
    else:
        name = type(model_or_dir).__name__
        if name not in IMPORTABLE:
            raise InteropError(
                "from_transformers takes a ReformerModelWithLMHead, a ReformerForMaskedLM or "
                f"a directory of one; got {name}"
            )
        hf, state = model_or_dir.config.to_dict(), model_or_dir.state_dict()
    cfg = config_from_hf(hf)
    ours = state_from_hf(cfg, state)
    dtype = ours["token_emb.weight"].dtype
    with torch.device("meta"):
        lm = ReformerLM(cfg)
    lm = lm.to_empty(device="cpu").to(dtype)
    missing, unexpected = lm.load_state_dict(ours, strict=False)
    if missing or unexpected:
        raise InteropError(
            f"weights do not fit the model: missing {missing}, unexpected {unexpected}"
        )
    return lm.eval()


def to_transformers(
    lm: ReformerLM, out_dir: str | os.PathLike[str], *, seq_len: int | None = None
) -> Path:
    """Write `lm` as a transformers model directory (config.json, model.safetensors) that
    `ReformerModelWithLMHead.from_pretrained(out_dir)` loads with the same logits.

    seq_len: the training length, needed when the model chooses its bucket count from the
    length (n_buckets=None), which transformers cannot. Raises InteropError, before writing
    anything, naming the field transformers cannot represent (window mode, full attention,
    duplicate correction, ...).
    """
    from ..checkpoint import save_tensors
    from ..files import atomic_output, atomic_write

    if not isinstance(lm, ReformerLM):
        raise TypeError(f"to_transformers takes a ReformerLM; got {type(lm).__name__}")
    hf = config_to_hf(lm.config, seq_len)
    tensors = state_to_hf(lm.config, lm.state_dict())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Each file written beside its final name and renamed over it: a crash leaves the old
    # file or the new one, never half of one; plain open() follows the user's umask.
    with atomic_output(out / SAFETENSORS_FILE) as tmp:
        save_tensors(tmp, tensors)
    atomic_write(out / CONFIG_FILE, json.dumps(hf, indent=2) + "\n")
    return out


def check_config(cfg: ReformerConfig, seq_len: int | None = None) -> None:
    """Raise InteropError if transformers cannot represent `cfg` (nothing is written)."""
    config_to_hf(cfg, seq_len)
