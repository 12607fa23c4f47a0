"""ReformerEncDec: a reversible encoder-decoder for translation (the paper's WMT14 model).

    source ids -> embed -> encoder (self-attention: full or LSH, non-causal; feed-forward)
               -> memory (B, S, d)
    target ids -> embed -> decoder (causal self-attention; cross-attention to memory with
               separate queries, keys and values; feed-forward) -> logits (B, T, V)

Reversible stacks follow the authors' layout: every sublayer is a half-residual step on one
half of the (x1, x2) pair, alternating halves (`reversible.reversible_chain`), so no layer's
activations are stored; the two halves are averaged at the end of each stack. With
`reversible=False` the same sublayers form ordinary pre-norm residual layers.

Legend: B batch, S source length, T target length, d d_model, H heads, D head dim.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...attention import Attention
from ...attention.cache import LayerCache
from ...config import ReformerConfig
from ...embeddings import AbsolutePositionalEmbedding
from ...feedforward import FeedForward
from ...model import ReformerBlock
from ...reversible import Branch, reversible_chain
from ...seeding import dropout_mask
from ...seeding import seeded_generator as make_generator

IGNORE_INDEX = -100


@dataclass
class EncDecConfig:
    """Architecture of a `ReformerEncDec` (defaults: the paper's base model)."""

    vocab_size: int = 32000
    """Shared source/target subword vocabulary size (the tokenizer's)."""
    d_model: int = 512
    d_ff: int = 2048
    n_heads: int = 8
    n_enc_layers: int = 6
    n_dec_layers: int = 6
    enc_attention: str = "full"
    """Encoder self-attention: 'full' (separate Q/K, the paper's choice for sentences shorter
    than an LSH chunk) or 'lsh' (shared QK, non-causal chunk mode)."""
    n_hashes: int = 4
    chunk_len: int = 64
    reversible: bool = True
    dropout: float = 0.1
    max_src_len: int = 256
    max_tgt_len: int = 256
    tie_embeddings: bool = True
    """One embedding matrix for source tokens, target tokens and the output layer."""
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "d_model",
            "d_ff",
            "n_heads",
            "n_enc_layers",
            "n_dec_layers",
            "n_hashes",
            "chunk_len",
            "max_src_len",
            "max_tgt_len",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EncDecConfig.{name} must be a positive int; got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"EncDecConfig: d_model ({self.d_model}) must be divisible by n_heads "
                f"({self.n_heads})"
            )
        if self.enc_attention not in ("full", "lsh"):
            raise ValueError(
                f"EncDecConfig.enc_attention must be 'full' or 'lsh'; got {self.enc_attention!r}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"EncDecConfig.dropout must be in [0, 1); got {self.dropout}")
        ids = {"pad_id": self.pad_id, "bos_id": self.bos_id, "eos_id": self.eos_id}
        for name, value in ids.items():
            if not 0 <= value < self.vocab_size:
                raise ValueError(f"EncDecConfig.{name} must be in [0, vocab_size); got {value}")
        if len(set(ids.values())) != 3:
            raise ValueError(f"EncDecConfig: pad, bos and eos ids must differ; got {ids}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def block_config(self, causal: bool, attention: str) -> ReformerConfig:
        """The ReformerConfig of one stack's self-attention layers."""
        return ReformerConfig(
            vocab_size=self.vocab_size,
            d_model=self.d_model,
            n_heads=self.n_heads,
            d_ff=self.d_ff,
            n_layers=self.n_dec_layers if causal else self.n_enc_layers,
            max_seq_len=self.max_tgt_len if causal else self.max_src_len,
            attention=attention,
            shared_qk=None if attention == "lsh" else False,
            n_hashes=self.n_hashes,
            chunk_len=self.chunk_len,
            lsh_mode=None,
            causal=causal,
            # The LSH encoder's layout since translation runs were first saved: the chunk
            # and the one before it (the encoder models' default also looks one ahead).
            chunks_before=1,
            chunks_after=0,
            reversible=self.reversible,
            dropout=self.dropout,
            ff_chunk_len=None,
            loss_chunk_len=None,
            pos_emb="none",
            layer_norm_eps=self.layer_norm_eps,
        )


class CrossAttention(nn.Module):
    """Decoder-to-encoder attention: queries from the decoder, separate keys and values from
    the encoder output; padded source positions are masked."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.k = nn.Linear(d_model, d_model, bias=False)
        self.v = nn.Linear(d_model, d_model, bias=False)
        self.out = nn.Linear(d_model, d_model)

    def _heads(self, x: Tensor) -> Tensor:  # (B, L, H * D) -> (B, H, L, D)
        B, L, _ = x.shape
        return x.view(B, L, self.n_heads, self.head_dim).transpose(1, 2)

    def memory_kv(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        return self._heads(self.k(memory)), self._heads(self.v(memory))

    def forward(
        self, x: Tensor, kv: tuple[Tensor, Tensor], src_mask: Tensor | None
    ) -> Tensor:  # (B, T, d), ((B, H, S, D) x2), (B, S) -> (B, T, d)
        B, T, _ = x.shape
        mask = None if src_mask is None else src_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(self._heads(self.q(x)), *kv, attn_mask=mask)
        return self.out(out.transpose(1, 2).reshape(B, T, -1))


class DecoderBlock(nn.Module):
    """Causal self-attention, cross-attention and feed-forward, each pre-normalised with
    dropout on its output."""

    def __init__(self, config: EncDecConfig) -> None:
        super().__init__()
        d, eps = config.d_model, config.layer_norm_eps
        self.self_norm = nn.LayerNorm(d, eps=eps)
        self.self_attn = Attention(config.block_config(causal=True, attention="full"), "full")
        self.cross_norm = nn.LayerNorm(d, eps=eps)
        self.cross_attn = CrossAttention(d, config.n_heads)
        self.ff_norm = nn.LayerNorm(d, eps=eps)
        self.ff = FeedForward(d, config.d_ff)
        self.dropout = config.dropout

    def _drop(self, out: Tensor, seed: int) -> Tensor:
        if not (self.training and self.dropout > 0):
            return out
        gen = make_generator(seed, out.device)
        return out * dropout_mask(out.shape, self.dropout, gen, out.device, out.dtype)

    def self_branch(
        self, x: Tensor, seed: int, cache: LayerCache | None = None, pos: int = 0
    ) -> Tensor:
        """cache, pos: decoding, through the attention's own cache (`Attention.forward`)."""
        return self._drop(self.self_attn(self.self_norm(x), cache=cache, pos=pos), seed)

    def cross_branch(
        self,
        x: Tensor,
        memory: Tensor | None,
        src_mask: Tensor | None,
        seed: int,
        kv: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """kv: the memory's keys and values when already computed (decoding)."""
        kv = self.cross_attn.memory_kv(memory) if kv is None else kv
        return self._drop(self.cross_attn(self.cross_norm(x), kv, src_mask), seed)

    def ff_branch(self, x: Tensor, seed: int) -> Tensor:
        return self._drop(self.ff(self.ff_norm(x)), seed)

    def params_of(self, part: str) -> list[nn.Parameter]:
        norm, module = {
            "self": (self.self_norm, self.self_attn),
            "cross": (self.cross_norm, self.cross_attn),
            "ff": (self.ff_norm, self.ff),
        }[part]
        return list(norm.parameters()) + list(module.parameters())


@dataclass
class DecodeState:
    """What incremental decoding keeps between steps, for B' = batch x beam rows."""

    cross_kv: list[tuple[Tensor, Tensor]]  # per layer: keys, values of the memory (B', H, S, D)
    self_cache: list[LayerCache]  # per layer: the self-attention's decode cache
    src_mask: Tensor  # (B', S)
    length: int = 0

    def reorder(self, index: Tensor) -> None:
        """Keep rows `index` (beam search: each new beam's parent)."""
        self.cross_kv = [
            (k.index_select(0, index), v.index_select(0, index)) for k, v in self.cross_kv
        ]
        for lc in self.self_cache:
            lc.reorder(index)
        self.src_mask = self.src_mask.index_select(0, index)


class ReformerEncDec(nn.Module):
    """Reversible (or ordinary) Transformer encoder-decoder with shared or separate embeddings.

    `model(src, tgt_in, src_mask) -> logits (B, T, V)`; `model.loss(...)` with label smoothing;
    `model.encode` / `model.start` / `model.step` for cached decoding (`translation.search`).
    src_mask: (B, S), True at real source tokens (default: src != pad_id). Targets are right
    padded; causal self-attention never lets a real target position see padding.
    """

    def __init__(self, config: EncDecConfig) -> None:
        super().__init__()
        if not isinstance(config, EncDecConfig):
            raise TypeError(f"ReformerEncDec needs an EncDecConfig; got {type(config).__name__}")
        self.config = config
        d = config.d_model
        self.src_emb = nn.Embedding(config.vocab_size, d)
        self.tgt_emb = self.src_emb if config.tie_embeddings else nn.Embedding(config.vocab_size, d)
        self.src_pos = AbsolutePositionalEmbedding(config.max_src_len, d)
        self.tgt_pos = AbsolutePositionalEmbedding(config.max_tgt_len, d)
        enc_cfg = config.block_config(causal=False, attention=config.enc_attention)
        self.encoder = nn.ModuleList(
            ReformerBlock(enc_cfg, config.enc_attention) for _ in range(config.n_enc_layers)
        )
        self.decoder = nn.ModuleList(DecoderBlock(config) for _ in range(config.n_dec_layers))
        self.enc_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.dec_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.out_bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.out_proj = (
            None if config.tie_embeddings else nn.Linear(d, config.vocab_size, bias=False)
        )
        self.custom_backward = True  # False: the reversible stacks under plain autograd (tests)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        d = self.config.d_model
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=d**-0.5)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for pos in (self.src_pos, self.tgt_pos):
            nn.init.normal_(pos.weight, std=0.02)

    # --- embedding and stacks ----------------------------------------------------------------
    def _embed(
        self,
        emb: nn.Embedding,
        pos: AbsolutePositionalEmbedding,
        ids: Tensor,
        offset: int,
        seed: int,
    ) -> Tensor:
        x = emb(ids) * math.sqrt(self.config.d_model) + pos(ids.shape[1], offset)
        if self.training and self.config.dropout > 0:
            gen = make_generator(seed, x.device)
            x = x * dropout_mask(x.shape, self.config.dropout, gen, x.device, x.dtype)
        return x

    def _seeds(self, n: int) -> list[int]:
        # Training draws fresh seeds (dropout masks, LSH rotations); evaluation is fixed.
        if not self.training:
            return [0] * n
        return torch.randint(0, 2**62, (n,)).tolist()

    def _check(self, ids: Tensor, name: str, limit: int) -> None:
        if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point:
            raise ValueError(f"{name} must be an integer tensor of shape (batch, length)")
        if ids.shape[1] == 0 or ids.shape[1] > limit:
            raise ValueError(
                f"{name} has length {ids.shape[1]}; this model takes 1..{limit} tokens (raise "
                f"max_{'src' if name == 'src' else 'tgt'}_len or drop longer sentences)"
            )
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise ValueError(f"{name} holds ids outside [0, {self.config.vocab_size})")

    def encode(self, src: Tensor, src_mask: Tensor | None = None) -> Tensor:
        """(B, S) source ids -> (B, S, d) memory."""
        self._check(src, "src", self.config.max_src_len)
        if src_mask is None:
            src_mask = src != self.config.pad_id
        if not bool(src_mask.any(dim=1).all()):
            raise ValueError("every source sentence needs at least one real (unmasked) token")
        seeds = self._seeds(1 + 2 * len(self.encoder))
        x = self._embed(self.src_emb, self.src_pos, src, 0, seeds[0])
        branches = []
        for block in self.encoder:
            branches.append(
                Branch(lambda h, _c, s, b=block: b.attn_branch(h, src_mask, s), block.attn_params())
            )
            branches.append(Branch(lambda h, _c, s, b=block: b.ff_branch(h, s), block.ff_params()))
        x = self._run(branches, x, None, seeds[1:])
        return self.enc_norm(x)

    def _run(
        self, branches: list[Branch], x: Tensor, context: Tensor | None, seeds: list[int]
    ) -> Tensor:
        if self.config.reversible:
            y1, y2 = reversible_chain(branches, x, x, context, seeds, self.custom_backward)
            return (y1 + y2) / 2
        for branch, seed in zip(branches, seeds):
            x = x + branch.fn(x, context, seed)
        return x

    def _dec_branches(self, src_mask: Tensor, state: DecodeState | None = None) -> list[Branch]:
        """The decoder's half-residual steps; with `state`, decoding position state.length
        through the self-attention caches and the memory's precomputed keys and values."""
        branches = []
        pos = 0 if state is None else state.length
        for i, b in enumerate(self.decoder):
            lc, kv = (None, None) if state is None else (state.self_cache[i], state.cross_kv[i])
            branches += [
                Branch(
                    lambda h, _m, s, b=b, lc=lc: b.self_branch(h, s, lc, pos), b.params_of("self")
                ),
                Branch(
                    lambda h, m, s, b=b, kv=kv: b.cross_branch(h, m, src_mask, s, kv),
                    b.params_of("cross"),
                ),
                Branch(lambda h, _m, s, b=b: b.ff_branch(h, s), b.params_of("ff")),
            ]
        return branches

    def logits_from_hidden(self, h: Tensor) -> Tensor:
        h = self.dec_norm(h)
        weight = self.tgt_emb.weight if self.out_proj is None else self.out_proj.weight
        return F.linear(h, weight, self.out_bias)

    def forward(self, src: Tensor, tgt_in: Tensor, src_mask: Tensor | None = None) -> Tensor:
        """(B, S) source ids, (B, T) decoder input ids ([bos] + target) -> (B, T, V) logits."""
        if src_mask is None:
            src_mask = src != self.config.pad_id
        memory = self.encode(src, src_mask)
        self._check(tgt_in, "tgt_in", self.config.max_tgt_len)
        seeds = self._seeds(1 + 3 * len(self.decoder))
        x = self._embed(self.tgt_emb, self.tgt_pos, tgt_in, 0, seeds[0])
        x = self._run(self._dec_branches(src_mask), x, memory, seeds[1:])
        return self.logits_from_hidden(x)

    def loss(
        self,
        src: Tensor,
        tgt_in: Tensor,
        tgt_out: Tensor,
        src_mask: Tensor | None = None,
        label_smoothing: float = 0.0,
    ) -> tuple[Tensor, int]:
        """Label-smoothed cross-entropy summed over real target tokens, and their count
        (tgt_out holds IGNORE_INDEX at padding)."""
        logits = self(src, tgt_in, src_mask)
        n = int((tgt_out != IGNORE_INDEX).sum())
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(),
            tgt_out.flatten(),
            ignore_index=IGNORE_INDEX,
            label_smoothing=label_smoothing,
            reduction="sum",
        )
        return loss, n

    # --- cached decoding -----------------------------------------------------------------------
    @torch.no_grad()
    def start(self, src: Tensor, src_mask: Tensor | None = None) -> DecodeState:
        """Encode the source and precompute every layer's cross-attention keys and values."""
        if src_mask is None:
            src_mask = src != self.config.pad_id
        memory = self.encode(src, src_mask)
        cross = [b.cross_attn.memory_kv(memory) for b in self.decoder]
        caches = [LayerCache(self.config.max_tgt_len) for _ in self.decoder]
        return DecodeState(cross, caches, src_mask)

    @torch.no_grad()
    def step(self, tokens: Tensor, state: DecodeState) -> Tensor:
        """Feed one token per row (B',) at position state.length -> next-token logits (B', V).

        Equal to the full forward's logits at that position (the tests check it): causal
        self-attention only needs the keys and values of earlier positions, kept in `state`.
        """
        t = state.length
        if t >= self.config.max_tgt_len:
            raise ValueError(f"decoding past max_tgt_len ({self.config.max_tgt_len})")
        x = self._embed(self.tgt_emb, self.tgt_pos, tokens[:, None], t, 0)  # (B', 1, d)
        # The decoder's own forward, one position, through the caches (eval seeds are 0).
        h = self._run(
            self._dec_branches(state.src_mask, state), x, None, [0] * 3 * len(self.decoder)
        )
        state.length = t + 1
        return self.logits_from_hidden(h)[:, 0]
