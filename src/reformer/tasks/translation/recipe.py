"""Training, evaluation and loading of translation runs (`reformer train` with task
"translation", `reformer eval`, `reformer translate`).

A run directory holds config.yaml, spm.model (the shared subword vocabulary, trained on the
training text at the start of the run), metrics.jsonl and checkpoints/ like a language-model
run. Batches are a pure function of the step (`ParallelData.batch_at`), and the RNG state is
checkpointed, so a resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...checkpoint import (
    CheckpointError,
    load_checkpoint,
    resolve_checkpoint,
)
from ...data.subword import Tokenizer
from ...distributed import all_reduce_sum, barrier
from ...run_config import TrainConfig
from ...training import Recipe
from ...training.runs import saved_run_config
from .batches import ParallelData
from .data import bleu, read_parallel, resolve_pair_paths
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


class TranslationRecipe(Recipe):
    """Translation with the reversible encoder-decoder: token-budget batches of sentence
    pairs (`translation.max_tokens` padded tokens for all ranks together), each rank its
    rows r::world_size of the same global batch; loss per target token."""

    resume_sections = ("model", "translation")

    def prepare(self, out: Path) -> None:
        cfg, t = self.cfg, self.cfg.translation
        train_pairs = _pairs(cfg, "train")
        val_pairs = _pairs(cfg, "val")
        spm_path = out / "spm.model"
        if self.rank == 0 and not spm_path.exists():
            out.mkdir(parents=True, exist_ok=True)
            print(
                f"training a {t.vocab_size}-piece sentencepiece vocabulary on "
                f"{len(train_pairs)} pairs -> {spm_path}",
                flush=True,
            )
            texts = [s for s, _ in train_pairs] + [x for _, x in train_pairs]
            Tokenizer.train(texts, t.vocab_size, spm_path, seed=cfg.seed)
        if self.world_size > 1:
            barrier()  # rank 0 has written the vocabulary; every rank reads that one
        self.tok = Tokenizer.load(spm_path)
        self.data = ParallelData.from_text(train_pairs, self.tok, max_len=t.max_len)
        self.val_pairs = val_pairs[: t.bleu_sentences] if t.bleu_sentences else val_pairs
        self._since = (0.0, 0.0)  # loss sum and target tokens since the last log line

    def build_model(self) -> ReformerEncDec:
        return ReformerEncDec(encdec_config(self.cfg, self.tok.vocab_size)).to(self.device)

    def describe(self, model: torch.nn.Module) -> str:
        t = self.cfg.translation
        return (
            f"{len(self.data)} training pairs ({self.data.dropped} longer than {t.max_len} "
            f"tokens dropped), {self.data.batches_per_epoch(t.max_tokens)} batches per epoch; "
            f"{sum(p.numel() for p in model.parameters()):,} parameters"
        )

    def loss(self, model, src, tgt_in, tgt_out):
        return model.loss(
            src, tgt_in, tgt_out, src != self.tok.pad_id,
            label_smoothing=self.cfg.translation.label_smoothing,
        )  # fmt: skip

    def micro_batches(self, step: int) -> list[tuple[torch.Tensor, ...]]:
        cfg, t = self.cfg, self.cfg.translation
        acc, r, w = cfg.optim.accumulate, self.rank, self.world_size
        micros = []
        for k in range(acc):
            batch = self.data.batch_at(step * acc + k, t.max_tokens, cfg.seed)
            if batch.src.shape[0] < w:
                raise ValueError(
                    f"a batch of translation.max_tokens={t.max_tokens} holds "
                    f"{batch.src.shape[0]} sentence pairs, fewer than the {w} ranks; raise "
                    "translation.max_tokens"
                )
            rows = slice(r, None, w)
            micros.append(
                tuple(x[rows].to(self.device) for x in (batch.src, batch.tgt_in, batch.tgt_out))
            )
        # Target tokens of the whole step on all ranks: the loss is their mean.
        n = sum(int((tgt_out != -100).sum()) for _, _, tgt_out in micros)
        tokens = sum(int((src != self.tok.pad_id).sum()) for src, _, _ in micros) + n
        if w > 1:
            n, tokens = all_reduce_sum([float(n), float(tokens)], self.device)
        self._n_total, self._tokens = float(n), int(tokens)
        return micros

    def micro_loss(self, output, micros) -> torch.Tensor:
        loss_sum, _ = output
        # Summed over micro-batches and averaged over ranks (as DDP averages gradients):
        # the step's loss per target token.
        return loss_sum * (self.world_size / self._n_total)

    def tokens(self, micros) -> int:
        return self._tokens

    def logged_loss(self, step_loss: float, micros) -> float:
        # The token-weighted mean since the last log line (as translation logged it before
        # the shared engine), not the last step's alone.
        total, count = self._since
        self._since = (total + step_loss * self._n_total, count + self._n_total)
        return self._since[0] / self._since[1]

    def reset_logged_loss(self) -> None:
        self._since = (0.0, 0.0)

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        t = self.cfg.translation
        res = evaluate_translation(
            model, self.tok, self.val_pairs, beam=t.eval_beam, alpha=t.length_penalty,
            device=self.device,
        )  # fmt: skip
        return {"loss": res["loss"], "bleu": res["bleu"]}


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
    cfg = saved_run_config(ckpt)
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
