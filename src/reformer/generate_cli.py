"""`reformer generate`: sample text (or an image) from a trained checkpoint, with the cache."""

from __future__ import annotations

import codecs
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

from .generate import generate
from .train import load_run, resolve_device, resolve_tokenizer


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
    args = tyro.cli(GenerateArgs, args=argv, prog="reformer generate")
    device = resolve_device(args.device)
    model, cfg, _, _ = load_run(Path(args.checkpoint), device)
    sample = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                  seed=args.seed)  # fmt: skip
    if cfg.task == "images" or args.image:
        if cfg.task != "images":
            raise ValueError("--image needs a checkpoint trained on images (task 'images')")
        from .data.images import to_image

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
    if cfg.task == "duplication":
        raise ValueError(
            "duplication models take integer tokens, not text: use reformer.generate.generate "
            "from Python, or `reformer eval` for their accuracy"
        )
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    tokenizer = resolve_tokenizer(cfg)
    if tokenizer is not None:  # a subword model: ids of the prompt, pieces streamed back
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=tokenizer)
        prompt = sp.encode(text) or [sp.bos_id() if sp.bos_id() >= 0 else 0]
    else:  # bytes + offset
        off = cfg.byte_offset
        prompt = [b + off for b in text.encode("utf-8")] or [ord("\n") + off]
    if len(prompt) + args.max_new_tokens > cfg.model.max_seq_len:
        raise ValueError(
            f"prompt ({len(prompt)} tokens) + --max-new-tokens ({args.max_new_tokens}) exceeds "
            f"the model's max_seq_len={cfg.model.max_seq_len}"
        )
    ids = torch.tensor([prompt], device=device)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    sys.stdout.write(text)
    pieces: list[int] = []

    def stream(tok: torch.Tensor) -> None:
        t = int(tok[0])
        if tokenizer is not None:  # decode the whole continuation, print what is new
            before = sp.decode(pieces)
            if t < sp.get_piece_size():  # ids past the vocabulary's pieces print nothing
                pieces.append(t)
            sys.stdout.write(sp.decode(pieces)[len(before) :])
        elif t >= cfg.byte_offset:  # ids below the offset are specials, not bytes
            sys.stdout.write(decoder.decode(bytes([t - cfg.byte_offset])))
        sys.stdout.flush()

    t0 = time.perf_counter()
    generate(model, ids, args.max_new_tokens, on_token=stream, **sample)
    sys.stdout.write(decoder.decode(b"", final=True) + "\n")
    dt = time.perf_counter() - t0
    print(
        f"[{args.max_new_tokens} tokens in {dt:.1f} s, {args.max_new_tokens / dt:.1f} tokens/s]",
        file=sys.stderr,
    )
    return 0
