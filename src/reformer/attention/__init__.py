"""One attention interface, `Attention`, with the kinds behind it: "lsh", "full", "local".

Layering: core functions on (B, H, L, D) tensors (`lsh_attention`, `local_attention`,
`full_attention`) -> the `Attention` module (projections, heads, hash rotations) -> blocks.
`reference.py` holds the naive versions the tests compare against.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..config import ReformerConfig
from ..sequence import SequenceShard
from .cache import LayerCache, attend_one, fill
from .common import pad_to, padded_length, unit_keys, valid_positions
from .full import full_attention
from .halo import halo_local_attention
from .hashing import auto_n_buckets, bucket_factors, draw_rotations, hash_vectors
from .local import local_attention
from .lsh import lsh_attention
from .routed import Route, routed_attention

__all__ = [
    "Attention",
    "auto_n_buckets",
    "bucket_factors",
    "draw_rotations",
    "full_attention",
    "hash_vectors",
    "local_attention",
    "lsh_attention",
]


class Attention(nn.Module):
    """Multi-head self-attention of one kind: "lsh", "full" or "local".

    Shared-QK kinds have one query-key projection; the others separate Q and K projections.
    LSH draws fresh hash rotations on every call from the generator it is given (so a
    reversible backward pass can replay them) or from torch's global RNG.
    """

    def __init__(self, config: ReformerConfig, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.causal = config.causal
        self.chunk_lens = {
            "lsh": config.chunk_len_for("lsh"),
            "local": config.chunk_len_for("local"),
        }
        self.n_hashes = config.n_hashes
        self.n_buckets = config.n_buckets
        self.bucket_factors = config.compat.bucket_factors
        self.lsh_mode = config.resolved_lsh_mode
        self.lsh_kernel = config.lsh_kernel
        self.lsh_wrap = config.compat.lsh_wrap
        self.lsh_dedup = config.compat.lsh_dedup
        self.key_norm = config.compat.key_norm
        self.hash_seed = config.compat.hash_seed
        self.pad_multiple = config.compat.pad_multiple
        self.local_wrap = config.compat.local_wrap
        self.chunks_before, self.chunks_after = config.resolved_chunks
        self.shared_qk = config.shared_qk_for(kind)
        inner = self.n_heads * self.head_dim
        if self.shared_qk:
            self.qk = nn.Linear(config.d_model, inner, bias=False)
        else:
            self.q = nn.Linear(config.d_model, inner, bias=False)
            self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.out = nn.Linear(inner, config.d_model, bias=config.compat.attn_out_bias)
        # this rank's slice of every sequence under sequence parallelism (`ReformerLM.shard`)
        self.shard: SequenceShard | None = None

    @property
    def chunk_len(self) -> int:
        """The chunk length of the current kind (LSH and local may differ)."""
        return self.chunk_lens.get(self.kind, self.chunk_lens["lsh"])

    def keys_of(self, qk: Tensor) -> Tensor:
        """Shared-QK keys of query-key vectors (B, H, L, D), as this layer normalises them."""
        return unit_keys(qk, self.key_norm)

    def extra_repr(self) -> str:
        extra = f", n_hashes={self.n_hashes}, mode={self.lsh_mode}" if self.kind == "lsh" else ""
        return f"kind={self.kind}, heads={self.n_heads}, head_dim={self.head_dim}{extra}"

    def _heads(self, x: Tensor) -> Tensor:  # (B, L, H * D) -> (B, H, L, D)
        B, L, _ = x.shape
        return x.view(B, L, self.n_heads, self.head_dim).transpose(1, 2)

    def buckets_for(self, length: int) -> int:
        """The bucket count LSH uses for a sequence of `length` tokens."""
        if self.bucket_factors is not None:
            return math.prod(self.bucket_factors)
        if self.n_buckets is not None:
            return self.n_buckets
        C = self.chunk_lens["lsh"]
        return auto_n_buckets(padded_length(length, self.pad_multiple or C), C)

    def draw_rotations(
        self, length: int, generator: torch.Generator | None, device: torch.device, dtype
    ) -> tuple[Tensor, ...]:
        # Drawn in float32 whatever the model's dtype, so a float64 copy of a model hashes
        # with the same rotations (upcast) as the float32 original; with transformers'
        # hash_seed: the same rotations on every call and in every layer, drawn in the
        # vectors' own dtype from a generator seeded afresh, as transformers draws them.
        draw_dtype = torch.float32
        if self.shard is not None:  # the buckets follow the whole sequence's length
            length = self.shard.length
        if self.hash_seed is not None:
            generator = torch.Generator(device=device).manual_seed(self.hash_seed)
            draw_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        rotations = draw_rotations(
            self.n_heads,
            self.head_dim,
            self.n_hashes,
            self.buckets_for(length),
            generator=generator,
            device=device,
            dtype=draw_dtype,
            factors=self.bucket_factors,
        )
        return tuple(r.to(dtype) for r in rotations) if dtype == torch.float64 else rotations

    def project(self, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        """(B, L, d_model) -> q (or shared qk), k (None when shared), v: (B, H, L, D) views."""
        v = self._heads(self.v(x))
        if self.shared_qk:
            return self._heads(self.qk(x)), None, v
        return self._heads(self.q(x)), self._heads(self.k(x)), v

    def projections(self) -> list[nn.Linear]:
        """The input projections `project` applies, in its order (q or qk, k, then v)."""
        first = [self.qk] if self.shared_qk else [self.q, self.k]
        return [*first, self.v]

    def _pad(self, q: Tensor, k: Tensor | None, v: Tensor, attention_mask: Tensor | None):
        """Heads (B, H, L, D) and mask padded to a multiple of pad_multiple with masked
        positions (unchanged when L is one already)."""
        B, _, L, _ = q.shape
        Lp = padded_length(L, self.pad_multiple or 1)
        if Lp == L:
            return q, k, v, attention_mask
        mask = torch.ones(B, L, dtype=torch.bool, device=q.device)
        if attention_mask is not None:
            mask = attention_mask.to(device=q.device, dtype=torch.bool)
        q, v = pad_to(q, Lp, dim=2), pad_to(v, Lp, dim=2)
        k = None if k is None else pad_to(k, Lp, dim=2)
        return q, k, v, pad_to(mask, Lp, dim=1)

    def _routed(
        self,
        q: Tensor,
        k: Tensor | None,
        v: Tensor,
        attention_mask: Tensor | None,
        rotations: tuple[Tensor, ...] | None,
    ) -> Tensor:
        """`core` on this rank's slice of a sequence split over ranks: LSH routed by its sort
        (`routed.py`), local attention with a halo from the neighbours (`halo.py`)."""
        assert self.shard is not None and self.kind in ("lsh", "local"), self.kind
        B, _, l, _ = q.shape
        valid = valid_positions(B, l, l, attention_mask, q.device)
        C, causal = self.chunk_len, self.causal
        around = (self.chunks_before, self.chunks_after)
        if self.kind == "lsh":
            assert rotations is not None
            buckets = hash_vectors(q, rotations)
            route = Route(C, self.lsh_mode, causal, *around, self.lsh_dedup, self.key_norm)
            return routed_attention(q, v, buckets, valid, self.shard, route)
        return halo_local_attention(
            q, k, v, valid, self.shard, chunk_len=C, causal=causal, key_norm=self.key_norm,
            chunks_before=around[0], chunks_after=around[1],
        )  # fmt: skip

    def core(
        self,
        q: Tensor,
        k: Tensor | None,
        v: Tensor,
        attention_mask: Tensor | None,
        rotations: tuple[Tensor, ...] | None,
    ) -> Tensor:
        """The attention of this kind on (B, H, L, D) heads (k None: shared QK), before the
        output projection; rotations: LSH's, from `draw_rotations`."""
        L = q.shape[2]
        if self.shard is not None:
            return self._routed(q, k, v, attention_mask, rotations)
        if self.kind == "lsh":
            assert rotations is not None
            q, k, v, attention_mask = self._pad(q, k, v, attention_mask)
            return lsh_attention(
                q,
                v,
                rotations,
                chunk_len=self.chunk_len,
                causal=self.causal,
                mode=self.lsh_mode,
                attention_mask=attention_mask,
                kernel=self.lsh_kernel,
                wrap=self.lsh_wrap,
                dedup=self.lsh_dedup,
                key_norm=self.key_norm,
                chunks_before=self.chunks_before,
                chunks_after=self.chunks_after,
            )[:, :, :L]
        if self.kind == "local":
            if self.local_wrap:
                # transformers pads every layer to the same multiple: which chunk is the
                # last one (chunk 0's wrapped look-back) depends on it.
                q, k, v, attention_mask = self._pad(q, k, v, attention_mask)
            return local_attention(
                q,
                k,
                v,
                chunk_len=self.chunk_len,
                causal=self.causal,
                attention_mask=attention_mask,
                key_norm=self.key_norm,
                chunks_before=self.chunks_before,
                chunks_after=self.chunks_after,
                wrap=self.local_wrap,
            )[:, :, :L]
        return full_attention(
            q, k, v, causal=self.causal, attention_mask=attention_mask, key_norm=self.key_norm
        )

    def forward(
        self,
        x: Tensor,
        attention_mask: Tensor | None = None,
        generator: torch.Generator | None = None,
        cache: LayerCache | None = None,
        pos: int = 0,
    ) -> Tensor:
        """(B, L, d_model) -> (B, L, d_model). attention_mask: (B, L), True at real tokens.

        cache: decoding. At pos 0 the tokens are a prompt: it runs as any forward, hashed as a
        sequence of cache.total_len tokens would be (the bucket count), and fills the cache;
        at pos > 0, x is the one token at position pos, attending through the cache (exactly
        the full forward's output there, `cache.py` says why).
        """
        B, L, _ = x.shape
        q, k, v = self.project(x)
        if cache is not None and pos > 0:
            if L != 1:
                raise ValueError(
                    f"decoding at position {pos} takes one token at a time; got {L} (decode "
                    "the prompt first, then each new token)"
                )
            stored = self.keys_of(q) if k is None else k
            out = attend_one(cache, self.kind, self.shared_qk, self.chunk_len, q, stored, v, pos)
            return self.out(out.reshape(B, 1, -1))
        # A prompt hashes as the full forward of cache.total_len tokens (its bucket count).
        hash_len = L if cache is None else cache.total_len
        rotations = None
        if self.kind == "lsh":
            rotations = self.draw_rotations(hash_len, generator, x.device, q.dtype)
        if cache is not None:
            assert attention_mask is None, "decoding takes no padding mask"
            K = self.buckets_for(hash_len) if self.kind == "lsh" else 0
            stored = self.keys_of(q) if k is None else k
            fill(cache, self.kind, q, stored, v, rotations, K, self.chunk_len)
        out = self.core(q, k, v, attention_mask, rotations)
        return self.out(out.transpose(1, 2).reshape(B, L, -1))
