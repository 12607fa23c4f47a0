"""`reformer generate`: sample text (or an image) from a trained checkpoint, with the cache."""

from __future__ import annotations

import codecs
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import tyro

from ..generate import generate
from ..run_config import TrainConfig
from ..training.common import resolve_device
from ..training.runs import load_run, resolve_tokenizer


@dataclass
class GenerateArgs:
    """Generate from a checkpoint: text for byte-level models, a PNG for image models."""

    checkpoint: str
    """A run directory (its newest checkpoint is used) or a checkpoint directory."""
    prompt: str = ""
    """Text prompt (byte-level models); read from stdin when '-'."""
    max_new_tokens: int = 256
    temperature: float = 1.0
    """0: greedy."""
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    image: str | None = None
    """Image models: write the sampled image to this PNG (its first pixel value is drawn
    uniformly; the rest are sampled)."""
    device: str = "auto"


def cmd_generate(argv: list[str]) -> int:
    """`reformer generate ARGV`: stream sampled text to stdout (or write an image); returns
    the exit code."""
    args = tyro.cli(GenerateArgs, args=argv, prog="reformer generate")
    device = resolve_device(args.device)
    model, cfg, _, _ = load_run(Path(args.checkpoint), device)
    sample = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                  seed=args.seed)  # fmt: skip
    if cfg.task == "images" or args.image:
        return _generate_image(model, cfg, args, device, sample)
    if cfg.task == "duplication":
        raise ValueError(
            "duplication models take integer tokens, not text: use reformer.generate.generate "
            "from Python, or `reformer eval` for their accuracy"
        )
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    prompt, sp = _encode_prompt(cfg, text)
    if len(prompt) + args.max_new_tokens > cfg.model.max_seq_len:
        raise ValueError(
            f"prompt ({len(prompt)} tokens) + --max-new-tokens ({args.max_new_tokens}) exceeds "
            f"the model's max_seq_len={cfg.model.max_seq_len}"
        )
    ids = torch.tensor([prompt], device=device)
    sys.stdout.write(text)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    t0 = time.perf_counter()
    generate(model, ids, args.max_new_tokens, on_token=_token_printer(cfg, sp, decoder), **sample)
    sys.stdout.write(decoder.decode(b"", final=True) + "\n")
    dt = time.perf_counter() - t0
    print(
        f"[{args.max_new_tokens} tokens in {dt:.1f} s, {args.max_new_tokens / dt:.1f} tokens/s]",
        file=sys.stderr,
    )
    return 0


def _generate_image(
    model: torch.nn.Module, cfg: TrainConfig, args: GenerateArgs, device: torch.device, sample: dict
) -> int:
    """Sample one image (its first pixel value uniform) and write it as a PNG; exit code."""
    if cfg.task != "images":
        raise ValueError("--image needs a checkpoint trained on images (task 'images')")
    from ..data.images import to_image

    n = 3 * cfg.image_side**2
    g = torch.Generator().manual_seed(args.seed)
    first = torch.randint(0, 256, (1, 1), generator=g).to(device)
    t0 = time.perf_counter()
    ids = generate(model, first, n - 1, total_len=n, **sample)
    pixels = to_image(ids[0].cpu().numpy())  # (side, side, 3) uint8
    out = Path(args.image or "sample.png")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.imsave(out, pixels)
    print(
        f"wrote {out} ({cfg.image_side}x{cfg.image_side}, {n} tokens in "
        f"{time.perf_counter() - t0:.1f} s)"
    )
    return 0


def _encode_prompt(cfg: TrainConfig, text: str) -> tuple[list[int], Any]:
    """(prompt ids, the sentencepiece processor or None for byte-level runs); an empty
    prompt becomes one start token (BOS, or a newline byte)."""
    tokenizer = resolve_tokenizer(cfg)
    if tokenizer is not None:  # a subword model: ids of the prompt, pieces streamed back
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=tokenizer)
        return sp.encode(text) or [sp.bos_id() if sp.bos_id() >= 0 else 0], sp
    off = cfg.byte_offset  # bytes + offset
    return [b + off for b in text.encode("utf-8")] or [ord("\n") + off], None


def _token_printer(
    cfg: TrainConfig, sp: Any, decoder: codecs.IncrementalDecoder
) -> Callable[[torch.Tensor], None]:
    """The on_token callback that writes each sampled token's text to stdout as it comes."""
    pieces: list[int] = []

    def stream(tok: torch.Tensor) -> None:
        t = int(tok[0])
        if sp is not None:  # decode the whole continuation, print what is new
            before = sp.decode(pieces)
            if t < sp.get_piece_size():  # ids past the vocabulary's pieces print nothing
                pieces.append(t)
            sys.stdout.write(sp.decode(pieces)[len(before) :])
        elif t >= cfg.byte_offset:  # ids below the offset are specials, not bytes
            sys.stdout.write(decoder.decode(bytes([t - cfg.byte_offset])))
        sys.stdout.flush()

    return stream
