"""Training, evaluation and loading of translation runs (`reformer train` with task
"translation", `reformer eval`, `reformer translate`).

A run directory holds config.yaml, spm.model (the shared subword vocabulary, trained on the
training text at the start of the run), metrics.jsonl and checkpoints/ like a language-model
run. Batches are a pure function of the step (`ParallelData.batch_at`), and the RNG state is
checkpointed, so a resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from ..checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    read_checkpoint_config,
    resolve_checkpoint,
    save_checkpoint,
)
from ..run_config import TrainConfig, config_from_dict, config_to_dict
from .data import ParallelData, Tokenizer, bleu, read_parallel, resolve_pair_paths
from .model import EncDecConfig, ReformerEncDec
from .search import beam_search, greedy


def encdec_config(cfg: TrainConfig, vocab_size: int) -> EncDecConfig:
    """The encoder-decoder of a translation run: shared fields from cfg.model, the rest from
    cfg.translation."""
    m, t = cfg.model, cfg.translation
    return EncDecConfig(
        vocab_size=vocab_size,
        d_model=m.d_model,
        d_ff=m.d_ff,
        n_heads=m.n_heads,
        n_enc_layers=t.n_enc_layers,
        n_dec_layers=m.n_layers,
        enc_attention=t.enc_attention,
        n_hashes=m.n_hashes,
        chunk_len=m.chunk_len,
        reversible=m.reversible,
        dropout=m.dropout,
        max_src_len=t.max_len,
        max_tgt_len=t.max_len + 1,  # [bos] + target / target + [eos]
        tie_embeddings=t.tie_embeddings,
    )


def _data_dir(cfg: TrainConfig) -> Path:
    if not cfg.data:
        raise ValueError(
            "task 'translation' needs --data DIR: a directory of aligned {split}.{lang} files, "
            "e.g. ../shared/data/translation/multi30k"
        )
    return Path(cfg.data)


def _pairs(cfg: TrainConfig, split: str) -> list[tuple[str, str]]:
    t = cfg.translation
    src, tgt = resolve_pair_paths(_data_dir(cfg), split, t.src_lang, t.tgt_lang)
    return read_parallel(src, tgt)


def translate_texts(
    model: ReformerEncDec,
    tok: Tokenizer,
    sentences: list[str],
    *,
    beam: int,
    alpha: float,
    max_tokens: int = 2048,
    device: torch.device | None = None,
) -> list[str]:
    """Translate sentences in length-sorted batches; returns detokenised text in input order."""
    device = device or next(model.parameters()).device
    limit = model.config.max_src_len
    ids = [tok.encode(s)[:limit] or [tok.eos_id] for s in sentences]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[str] = [""] * len(ids)
    i = 0
    while i < len(order):
        width = len(ids[order[i]])
        j = i
        while j < len(order) and (j - i + 1) * max(width, len(ids[order[j]])) * beam <= max_tokens:
            width = max(width, len(ids[order[j]]))
            j += 1
        j = max(j, i + 1)
        rows = order[i:j]
        src = torch.full((len(rows), width), tok.pad_id, dtype=torch.long)
        for r, k in enumerate(rows):
            src[r, : len(ids[k])] = torch.tensor(ids[k])
        src = src.to(device)
        max_len = min(model.config.max_tgt_len, 2 * width + 10)
        if beam == 1:
            hyps = greedy(model, src, max_len=max_len)
        else:
            hyps = beam_search(model, src, beam=beam, alpha=alpha, max_len=max_len)
        for k, h in zip(rows, hyps):
            out[k] = tok.decode(h)
        i = j
    return out


@torch.no_grad()
def evaluate_translation(
    model: ReformerEncDec,
    tok: Tokenizer,
    pairs: list[tuple[str, str]],
    *,
    beam: int,
    alpha: float,
    label_smoothing: float = 0.0,
    max_tokens: int = 2048,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Per-token loss (nats, no smoothing) and corpus BLEU (sacrebleu) of `pairs`."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        # Loss over pairs with a non-empty source (an empty one has nothing to attend to);
        # BLEU over all of them.
        scored = [(s, t) for s, t in pairs if tok.encode(s)]
        data = ParallelData.from_text(scored, tok, max_len=model.config.max_src_len)
        total, count = 0.0, 0
        for batch in data.eval_batches(max_tokens):
            batch = batch.to(device)
            loss, n = model.loss(batch.src, batch.tgt_in, batch.tgt_out, batch.src_mask)
            total, count = total + float(loss), count + n
        hyps = translate_texts(
            model, tok, [s for s, _ in pairs], beam=beam, alpha=alpha, device=device
        )
    finally:
        model.train(was_training)
    score, signature = bleu(hyps, [t for _, t in pairs])
    return {
        "loss": total / max(count, 1),
        "bleu": score,
        "signature": signature,
        "hypotheses": hyps,
        "scored_pairs": len(data),
    }


def _lr_schedule(cfg: TrainConfig):
    from ..train import lr_factor

    return lambda s: lr_factor(cfg.optim, cfg.steps, s)


def train_translation(cfg: TrainConfig, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
    """Train (or resume) a translation run in one process; returns the last evaluation."""
    from ..train import (
        MetricsLog,
        TrainingDiverged,
        _out_of_time,
        atomic_write_text,
        autocast_for,
        build_optimizer,
        resolve_device,
    )

    if world_size > 1:
        raise ValueError(
            "task 'translation' trains in one process; multi-process (torchrun) translation "
            "is not supported yet: run `reformer train` without torchrun"
        )
    t = cfg.translation
    out = Path(cfg.out)
    device = resolve_device(cfg.device)
    ckpt = latest_checkpoint(out) if out.exists() else None
    if ckpt is not None and not cfg.resume:
        raise ValueError(
            f"{out} already holds a run (checkpoint {ckpt.name}); pass --resume to continue it "
            "or choose another --out"
        )
    train_pairs = _pairs(cfg, "train")
    val_pairs = _pairs(cfg, "val")
    out.mkdir(parents=True, exist_ok=True)
    spm_path = out / "spm.model"
    if spm_path.exists():
        tok = Tokenizer.load(spm_path)
    else:
        print(
            f"training a {t.vocab_size}-piece sentencepiece vocabulary on "
            f"{len(train_pairs)} pairs -> {spm_path}",
            flush=True,
        )
        texts = [s for s, _ in train_pairs] + [x for _, x in train_pairs]
        tok = Tokenizer.train(texts, t.vocab_size, spm_path, seed=cfg.seed)
    data = ParallelData.from_text(train_pairs, tok, max_len=t.max_len)
    if t.bleu_sentences:
        val_pairs = val_pairs[: t.bleu_sentences]

    torch.manual_seed(cfg.seed)
    model = ReformerEncDec(encdec_config(cfg, tok.vocab_size)).to(device)
    opt = build_optimizer(model, cfg.optim)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_schedule(cfg))
    metrics = MetricsLog(out / "metrics.jsonl", out / "tensorboard" if cfg.tensorboard else None)
    resolved = config_to_dict(cfg)
    start = 0
    if ckpt is not None:
        saved = read_checkpoint_config(ckpt)
        for section in ("model", "translation"):
            if saved.get(section) != resolved[section]:
                raise ValueError(
                    f"--resume: {ckpt} was trained with a different {section} config; resume "
                    "with the run's own config (DIR/config.yaml) or start a new --out"
                )
        start = load_checkpoint(ckpt, model, opt, sched).step
        metrics.truncate_after(start)
        print(f"resuming {out} from step {start} ({ckpt.name})", flush=True)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
    print(
        f"{len(data)} training pairs ({data.dropped} longer than {t.max_len} tokens dropped), "
        f"{data.batches_per_epoch(t.max_tokens)} batches per epoch; "
        f"{sum(p.numel() for p in model.parameters()):,} parameters",
        flush=True,
    )

    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    t_start = t_log = time.perf_counter()
    tokens_since, loss_since, n_since = 0, 0.0, 0
    last_eval: dict[str, Any] = {}
    step = start
    model.train()
    while step < cfg.steps:
        loss_value = 0.0
        n_total = 0
        micro = [
            data.batch_at(step * cfg.optim.accumulate + k, t.max_tokens, cfg.seed)
            for k in range(cfg.optim.accumulate)
        ]
        n_total = sum(int((b.tgt_out != -100).sum()) for b in micro)
        for batch in micro:
            batch = batch.to(device)
            with autocast_for(device, cfg.precision):
                loss, n = model.loss(
                    batch.src,
                    batch.tgt_in,
                    batch.tgt_out,
                    batch.src_mask,
                    label_smoothing=t.label_smoothing,
                )
            (loss / n_total).backward()
            loss_value += float(loss.detach())
            tokens_since += int(batch.src_mask.sum()) + n
        if not math.isfinite(loss_value):
            raise TrainingDiverged(
                f"loss is {loss_value} at step {step + 1}; stopped. The last good checkpoint "
                f"in {out / 'checkpoints'} is kept: lower --optim.lr, then --resume"
            )
        grad_norm = None
        if cfg.optim.clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip))
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        loss_since, n_since = loss_since + loss_value, n_since + n_total
        if bar is not None:
            bar.update(1)
        last = step == cfg.steps
        out_of_time = _out_of_time(cfg, t_start)
        if cfg.log_every and (step % cfg.log_every == 0 or last or out_of_time):
            now = time.perf_counter()
            rec = {
                "step": step,
                "loss": loss_since / max(n_since, 1),
                "lr": lr,
                "tokens_per_s": tokens_since / max(now - t_log, 1e-9),
            }
            if grad_norm is not None:
                rec["grad_norm"] = grad_norm
            rec["elapsed_s"] = now - t_start
            metrics.write(rec)
            t_log, tokens_since, loss_since, n_since = now, 0, 0.0, 0
            if bar is not None:
                bar.set_postfix(loss=f"{rec['loss']:.3f}")
        if cfg.eval_every and (step % cfg.eval_every == 0 or last or out_of_time):
            t_eval = time.perf_counter()
            res = evaluate_translation(
                model, tok, val_pairs, beam=t.eval_beam, alpha=t.length_penalty, device=device
            )
            last_eval = {"loss": res["loss"], "bleu": res["bleu"]}
            metrics.write(
                {
                    "step": step,
                    "eval_loss": res["loss"],
                    "eval_bleu": res["bleu"],
                    "eval_s": time.perf_counter() - t_eval,
                }
            )
            msg = f"step {step}: val loss {res['loss']:.4f}, BLEU {res['bleu']:.2f}"
            bar.write(msg) if bar is not None else print(msg, flush=True)
        if step % cfg.checkpoint_every == 0 or last or out_of_time:
            save_checkpoint(
                out,
                step,
                model,
                opt,
                sched,
                state={"step": step},
                config=resolved,
                keep=cfg.keep_checkpoints,
            )
        if out_of_time:
            break
    if bar is not None:
        bar.close()
    return last_eval


@dataclass
class TranslationRun:
    model: ReformerEncDec
    tokenizer: Tokenizer
    config: TrainConfig
    checkpoint: Path
    step: int


def load_translation_run(path: Path, device: torch.device) -> TranslationRun:
    """A run or checkpoint directory of a translation run -> model (eval mode), tokenizer,
    config, checkpoint directory and step."""
    path = Path(path)
    ckpt = resolve_checkpoint(path)
    cfg = config_from_dict(read_checkpoint_config(ckpt), where=f"{ckpt}/config.json")
    if cfg.task != "translation":
        raise CheckpointError(f"{ckpt}: a {cfg.task!r} run, not a translation run")
    spm_path = ckpt.parent.parent / "spm.model"
    if not spm_path.exists():
        raise CheckpointError(f"{spm_path}: the run's sentencepiece model is missing")
    tok = Tokenizer.load(spm_path)
    model = ReformerEncDec(encdec_config(cfg, tok.vocab_size)).to(device)
    step = load_checkpoint(ckpt, model, restore_rng=False).step
    return TranslationRun(model.eval(), tok, cfg, ckpt, step)


def eval_pairs(cfg: TrainConfig, split: str | None, src: str | None, ref: str | None):
    """The pairs `reformer eval` scores: a split of the run's data dir, or two files."""
    if src or ref:
        if not (src and ref):
            raise ValueError("pass both --src FILE and --ref FILE (or neither, for a --split)")
        return read_parallel(src, ref)
    return _pairs(cfg, split or "test")
