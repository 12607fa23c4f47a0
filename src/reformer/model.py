"""ReformerLM: embeddings -> reversible (or ordinary residual) blocks -> norm -> logits.

Legend: B batch, L length, d d_model, V vocab size, W width of the final hidden state
(2 d for the reversible stack: the concatenation [Y1; Y2], as in the authors' code).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention.cache import LayerCache
from .attention.common import upcast
from .block import ReformerBlock
from .config import ReformerConfig, sequence_parallel_problem
from .embeddings import AbsolutePositionalEmbedding, AxialPositionalEmbedding
from .feedforward import chunked_cross_entropy
from .memory import fixed_mmap_threshold
from .reversible import reversible_forward
from .seeding import dropout_mask, rank_generator
from .seeding import seeded_generator as make_generator
from .sequence import SequenceShard


@dataclass(frozen=True)
class ForwardSeeds:
    """Every random draw of one forward call: (attention, feed-forward) seeds per block and
    the embedding dropout's. A reversible backward pass and a decoder replay them."""

    layers: list[tuple[int, int]]
    embedding: int

    @classmethod
    def draw(cls, n_layers: int) -> ForwardSeeds:
        """From torch's global RNG, so `torch.manual_seed(s)` before a call reproduces it."""
        draws = torch.randint(0, 2**62, (n_layers, 2))
        embedding = int(torch.randint(0, 2**62, ()))
        return cls([(int(a), int(b)) for a, b in draws.tolist()], embedding)


@dataclass
class DecodeCache:
    """State of an incremental decode; `ReformerLM.decode` creates it (cache=None)."""

    total_len: int
    seeds: ForwardSeeds
    layers: list[LayerCache]
    length: int = 0
    batch: int | None = None


def not_decodable(config: ReformerConfig | nn.Module) -> str | None:
    """Why a cache cannot reproduce the full forward of a model (or of its config), or None."""
    config = getattr(config, "config", config)
    if not config.causal:
        return "decode needs a causal model (config.causal=True)"
    if "lsh" in config.layer_kinds and config.resolved_lsh_mode != "window":
        return (
            "decode needs lsh_mode='window': in 'chunk' mode future tokens move earlier "
            "tokens' chunks, so no cache can reproduce the full forward"
        )
    if "lsh" in config.layer_kinds and not config.compat.lsh_dedup:
        return (
            "decode needs compat.lsh_dedup=True: the cache attends to the union of the rounds' "
            "candidates, which is the full forward only with the duplicate correction"
        )
    return None


class ReformerLM(nn.Module):
    """A Reformer language model, `model(input_ids) -> logits`, built from a `ReformerConfig`.

    input_ids: LongTensor (B, L), any L <= max_seq_len. attention_mask: optional (B, L),
    True/1 at real tokens, False/0 at padding (padded positions never change real outputs).
    """

    def __init__(self, config: ReformerConfig) -> None:
        super().__init__()
        if not isinstance(config, ReformerConfig):
            raise TypeError(f"ReformerLM needs a ReformerConfig; got {type(config).__name__}")
        self.config = config
        d = config.d_model
        self.token_emb = nn.Embedding(config.vocab_size, d)
        if config.pos_emb == "axial":
            self.pos_emb = AxialPositionalEmbedding(
                config.resolved_axial_shape, config.resolved_axial_dims
            )
        elif config.pos_emb == "absolute":
            self.pos_emb = AbsolutePositionalEmbedding(config.max_seq_len, d)
        else:
            self.pos_emb = None
        self.blocks = nn.ModuleList(ReformerBlock(config, kind) for kind in config.layer_kinds)
        width = 2 * d if config.reversible else d
        self.norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        if config.tie_embeddings:
            # Tied: the final state mapped to d_model, then scored against the embeddings.
            self.head = nn.Linear(width, d)
            self.out_bias = nn.Parameter(torch.zeros(config.vocab_size))
        else:
            self.head = nn.Linear(width, config.vocab_size)
        # Debug/test switch: False runs the reversible stack under plain autograd.
        self.custom_backward = True
        self.shard: SequenceShard | None = None  # set by `shard_sequence`
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if self.pos_emb is not None:
            for p in self.pos_emb.parameters():
                nn.init.normal_(p, std=0.02)

    # ---------------------------------------------------------------------------------------
    def set_n_hashes(self, n_hashes: int) -> None:
        """Change the number of LSH hash rounds (e.g. for evaluation); weights are untouched."""
        if isinstance(n_hashes, bool) or not isinstance(n_hashes, int) or not 1 <= n_hashes <= 64:
            raise ValueError(f"n_hashes must be an int in 1..64; got {n_hashes!r}")
        self.config.n_hashes = n_hashes
        for block in self.blocks:
            block.attn.n_hashes = n_hashes

    def set_attention(self, kind: str | None) -> None:
        """Run every shared-QK "lsh" or "full" layer as `kind` ("lsh" or "full"); None
        restores the configured kinds. The two kinds have the same weights (one query-key
        projection), so a model trained with one can be evaluated with the other: the
        paper's Table 2. Local and separate-QK layers are left as they are."""
        if kind not in (None, "lsh", "full"):
            raise ValueError(f"set_attention: kind must be 'lsh', 'full' or None; got {kind!r}")
        configured = self.config.layer_kinds
        swappable = [
            i
            for i, k in enumerate(configured)
            if k in ("lsh", "full") and self.blocks[i].attn.shared_qk
        ]
        if kind is not None and not swappable:
            raise ValueError(
                f"set_attention({kind!r}): the model has no shared-QK lsh or full layer to swap "
                f"(attention={self.config.attention!r}, shared_qk={self.config.shared_qk}); a "
                "separate-QK layer has no LSH counterpart"
            )
        if kind == "full" and self.shard is not None:
            raise ValueError(
                "set_attention('full'): the model runs on one rank's slice of each sequence "
                "(shard_sequence), and full attention needs the whole sequence: call "
                "shard_sequence(None) first"
            )
        for i in swappable:
            self.blocks[i].attn.kind = kind or configured[i]

    def shard_sequence(self, shard: SequenceShard | None) -> None:
        """Run on one rank's slice of every sequence (`--parallel sequence`): input_ids are
        the positions [shard.start, shard.stop) of sequences of shard.length, and attention
        reaches the other ranks' positions through `attention/routed.py`. None: whole
        sequences again. Refuses what cannot be split (full attention, wrapped chunks)."""
        if shard is not None:
            problem = sequence_parallel_problem(self.config, shard.length)
            if problem:
                raise ValueError(problem)
            if any(block.attn.kind == "full" for block in self.blocks):
                raise ValueError(
                    "shard_sequence: a layer runs full attention (set_attention('full')), "
                    "which needs the whole sequence: call set_attention(None) first"
                )
            _check_group(shard)
            if shard.size > 1 and self.token_emb.weight.device.type == "cpu":
                fixed_mmap_threshold()  # a rank's peak is its live tensors (memory.py)
        self.shard = shard
        for block in self.blocks:
            block.attn.shard = shard
            block.shard_rank = None if shard is None else shard.rank

    def fit_shard(self, length: int) -> None:
        """Under `shard_sequence`: split sequences of `length` from now on (a batch padded
        only to its longest row), as one process runs that batch (LSH's bucket count follows
        the length). The shard stays: the backward pass recomputes with it."""
        if self.shard is not None and self.shard.length != length:
            self.shard_sequence(dataclasses.replace(self.shard, length=length))

    def _check_slice(self, input_ids: Tensor) -> None:
        """Under `shard_sequence` the model's forward takes this rank's slice only."""
        shard = self.shard
        if input_ids.shape[1] != shard.stop - shard.start:
            raise ValueError(
                f"input_ids has {input_ids.shape[1]} positions, but rank {shard.rank} of this "
                f"sequence group holds positions [{shard.start}, {shard.stop}) of "
                f"{shard.length}: pass shard.local(ids) to the forward, or whole sequences "
                "to loss"
            )

    def _check_ids(self, input_ids: Tensor, name: str = "input_ids") -> None:
        if not isinstance(input_ids, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of token ids; got {type(input_ids)}")
        if (
            input_ids.dtype.is_floating_point
            or input_ids.dtype.is_complex
            or (input_ids.dtype == torch.bool)
        ):
            raise TypeError(
                f"{name} must be an integer tensor (torch.long) of token ids; got {input_ids.dtype}"
            )
        if input_ids.dim() != 2:
            raise ValueError(
                f"{name} must have shape (batch, length); got {tuple(input_ids.shape)}"
            )
        L = input_ids.shape[1]
        if L == 0 or self.config.max_seq_len < L:
            raise ValueError(
                f"{name} length {L} is outside 1..max_seq_len={self.config.max_seq_len}; "
                "shorten the input or build the model with a larger max_seq_len"
            )
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(
                f"{name} holds ids in [{lo}, {hi}], outside [0, vocab_size="
                f"{self.config.vocab_size}); check the tokenizer or the config's vocab_size"
            )

    def _check_mask(self, attention_mask: Tensor | None, input_ids: Tensor) -> None:
        if attention_mask is None:
            return
        if not isinstance(attention_mask, Tensor) or attention_mask.dtype.is_floating_point:
            raise TypeError(
                "attention_mask must be a bool or integer tensor (True/1 = real token); got "
                f"{getattr(attention_mask, 'dtype', type(attention_mask))}"
            )
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids shape "
                f"{tuple(input_ids.shape)}"
            )

    def embed(self, input_ids: Tensor, offset: int = 0) -> Tensor:
        """Token plus positional embeddings of ids at positions offset.. : (B, L) -> (B, L, d)."""
        x = self.token_emb(input_ids)
        if self.pos_emb is not None:
            x = x + self.pos_emb(input_ids.shape[1], offset=offset).to(x.dtype)
        return x

    def hidden_states(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        seeds: ForwardSeeds | None = None,
        cache: DecodeCache | None = None,
    ) -> Tensor:
        """Final hidden states before the output norm: (B, L) -> (B, L, W).

        seeds: every random draw of the call (default: drawn from torch's global RNG).
        cache: decoding (`decode`): the tokens sit at positions cache.length.., attention goes
        through the per-layer caches, and the seeds are the cache's. One forward either way.
        """
        if cache is None:  # decode checks its ids once, for all positions
            self._check_ids(input_ids)
            self._check_mask(attention_mask, input_ids)
        pos = 0 if cache is None else cache.length
        if self.shard is not None:
            self._check_slice(input_ids)
            pos = self.shard.start
        if cache is not None:
            seeds = cache.seeds
        seeds = seeds or ForwardSeeds.draw(len(self.blocks))
        caches = [None] * len(self.blocks) if cache is None else cache.layers
        x = self.embed(input_ids, offset=pos)  # (B, L, d)
        if self.training and self.config.dropout > 0:
            gen = make_generator(seeds.embedding, x.device)
            if self.shard is not None:
                gen = rank_generator(gen, self.shard.rank, x.device)
            x = x * dropout_mask(x.shape, self.config.dropout, gen, x.device, x.dtype)
        if self.config.reversible:
            y1, y2 = reversible_forward(
                self.blocks, x, x, attention_mask, seeds.layers,
                custom_backward=self.custom_backward, caches=caches, pos=pos,
            )  # fmt: skip
            return torch.cat([y1, y2], dim=-1)  # (B, L, 2d)
        for block, (seed_f, seed_g), lc in zip(self.blocks, seeds.layers, caches):
            x = x + block.attn_branch(x, attention_mask, seed_f, lc, pos)
            x = x + block.ff_branch(x, seed_g)
        return x

    @torch.no_grad()
    def decode(
        self, input_ids: Tensor, cache: DecodeCache | None = None, total_len: int | None = None
    ) -> tuple[Tensor, DecodeCache]:
        """Cached incremental decoding: `logits, cache = model.decode(ids, cache)`.

        Returns the logits (B, T, V) of the new tokens `input_ids` and the updated cache.
        With cache=None a cache is created for sequences of `total_len` tokens (default:
        max_seq_len), with the seeds of one full forward drawn from torch's global RNG (so
        `torch.manual_seed(s)` before both makes them hash alike), and the logits equal those
        of `model(full_ids)` for full_ids of length total_len. The first call runs the prompt
        through the forward, filling the cache; later calls decode one token at a time, the
        same forward through the cache. Models must be causal, with lsh_mode='window' and the
        duplicate correction; call in eval mode (no dropout), without padding.
        """
        reason = not_decodable(self.config)
        if self.shard is not None:
            reason = "decode runs on whole sequences: call model.shard_sequence(None) first"
        if reason is not None:
            raise ValueError(reason)
        self._check_ids(input_ids)
        B, T = input_ids.shape
        if cache is None:
            total = total_len or self.config.max_seq_len
            if not 1 <= total <= self.config.max_seq_len:
                raise ValueError(
                    f"total_len={total} must be in 1..max_seq_len={self.config.max_seq_len}"
                )
            seeds = ForwardSeeds.draw(len(self.blocks))
            cache = DecodeCache(total, seeds, [LayerCache(total) for _ in self.blocks])
        if cache.length + T > cache.total_len:
            raise ValueError(
                f"decoding {T} more tokens would exceed the cache's total_len="
                f"{cache.total_len} (at {cache.length}); create the cache with a larger total_len"
            )
        if cache.batch is not None and cache.batch != B:
            raise ValueError(f"batch size {B} differs from the cache's {cache.batch}")
        cache.batch = B
        # The prompt in one forward; every later token on its own (its position's output).
        steps = [input_ids] if cache.length == 0 else input_ids.split(1, dim=1)
        outs = []
        for ids in steps:
            outs.append(self.logits_from_hidden(self.hidden_states(ids, cache=cache)))
            cache.length += ids.shape[1]
        return torch.cat(outs, dim=1), cache

    def logits_from_hidden(self, hidden: Tensor) -> Tensor:
        """(B, l, W) -> (B, l, V)."""
        out = self.head(self.norm(hidden))
        if self.config.tie_embeddings:
            return F.linear(out, self.token_emb.weight.to(out.dtype), self.out_bias.to(out.dtype))
        return out

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, L) token ids -> (B, L, V) logits."""
        return self.logits_from_hidden(self.hidden_states(input_ids, attention_mask))

    def loss(
        self,
        input_ids: Tensor,
        targets: Tensor,
        attention_mask: Tensor | None = None,
        ignore_index: int = -100,
    ) -> Tensor:
        """Mean cross-entropy (nats) over targets != ignore_index, computed in chunks of
        `loss_chunk_len` positions: the (B, L, V) logits never exist at once.

        targets: (B, L) next-token ids aligned with input_ids (targets[:, t] is the token
        predicted from input_ids[:, :t + 1]); for a masked LM (causal=False), the original
        ids at the masked positions and ignore_index elsewhere. When fewer than half of the
        positions are scored (a masked LM's 15%), only their hidden states reach the
        output layer. Under `shard_sequence`: every rank of the group passes the whole
        sequences and gets its slice's share of the group's mean (the shares sum to it); a
        batch of another width than the shard's is split as it is (`fit_shard`).
        """
        if self.shard is not None:  # this rank's slice; the count is the group's
            self._check_targets(targets, input_ids, ignore_index)
            self.fit_shard(input_ids.shape[1])
            local = [self.shard.local(t) for t in (input_ids, targets)]
            mask = None if attention_mask is None else self.shard.local(attention_mask)
            total, count = self.loss_terms(*local, mask, ignore_index)
            count = self.shard.total(count)
        else:
            total, count = self.loss_terms(input_ids, targets, attention_mask, ignore_index)
        if int(count) == 0:
            raise ValueError("targets has no scored position (all equal ignore_index)")
        return total / count

    def loss_terms(
        self,
        input_ids: Tensor,
        targets: Tensor,
        attention_mask: Tensor | None = None,
        ignore_index: int = -100,
    ) -> tuple[Tensor, Tensor]:
        """`loss` as (summed cross-entropy, number of scored positions): what a rank of a
        sequence group adds to its group's (whose loss is sum over ranks / count over ranks)."""
        self._check_targets(targets, input_ids, ignore_index)
        hidden = self.hidden_states(input_ids, attention_mask)
        scored = targets != ignore_index
        if 2 * int(scored.sum()) < scored.numel():
            hidden, targets = hidden[scored][None], targets[scored][None]  # (1, M, W), (1, M)
        total, count = chunked_cross_entropy(
            hidden,
            targets,
            self.logits_from_hidden,
            chunk_len=self.config.loss_chunk_len,
            ignore_index=ignore_index,
        )
        if self.shard is not None and int(count) == 0:
            # A slice with nothing to score (a duplication task's first half) still runs its
            # backward pass: the other ranks' attention exchanges wait for its part.
            total = total + 0.0 * hidden.sum()
        return total, count

    def _check_targets(self, targets: Tensor, input_ids: Tensor, ignore_index: int) -> None:
        if not isinstance(targets, Tensor) or targets.dtype.is_floating_point:
            raise TypeError(
                "targets must be an integer tensor of token ids; got "
                f"{getattr(targets, 'dtype', type(targets))}"
            )
        if targets.shape != input_ids.shape:
            raise ValueError(
                f"targets shape {tuple(targets.shape)} must equal input_ids shape "
                f"{tuple(input_ids.shape)}"
            )
        scored = targets[targets != ignore_index]
        if scored.numel() and (
            int(scored.min()) < 0 or int(scored.max()) >= self.config.vocab_size
        ):
            raise ValueError(
                f"targets holds ids outside [0, vocab_size={self.config.vocab_size}) "
                f"(other than ignore_index={ignore_index})"
            )


def cross_entropy_reference(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Unchunked mean cross-entropy: the reference for `ReformerLM.loss`."""
    return F.cross_entropy(
        upcast(logits.flatten(0, 1)), targets.flatten(), ignore_index=ignore_index
    )


def _check_group(shard: SequenceShard) -> None:
    """The shard's rank and size are those of its process group (when one is running)."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    size = torch.distributed.get_world_size(shard.group)
    rank = torch.distributed.get_rank(shard.group)
    if (shard.rank, shard.size) != (rank, size):
        raise ValueError(
            f"SequenceShard(rank={shard.rank}, size={shard.size}) does not match its process "
            f"group (rank {rank} of {size}): pass the group's own rank and size"
        )
