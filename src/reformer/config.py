"""`ReformerConfig`: every architectural choice of a Reformer language model, validated.

A bad value raises at construction, naming the field, the value and what is allowed
(`ValueError` for a bad value, `TypeError` for a bad type), never later as a shape error
from deep inside a layer.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

ATTENTION_KINDS = ("lsh", "full", "local")
LSH_MODES = ("window", "chunk")
LSH_KERNELS = ("auto", "eager", "compiled")
POS_EMBS = ("axial", "absolute", "none")
FF_ACTIVATIONS = ("gelu", "relu")
KEY_NORMS = ("l2", "rms")
MAX_HASHES = 64  # LSH pair codes are int8 (attention/lsh.py)


def _check_int(name: str, value: Any, minimum: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        allowed = "an int or None" if optional else "an int"
        raise TypeError(f"ReformerConfig.{name} must be {allowed}; got {value!r}")
    if value < minimum:
        raise ValueError(f"ReformerConfig.{name} must be >= {minimum}; got {value}")


def _check_bool(name: str, value: Any, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, bool):
        raise TypeError(f"ReformerConfig.{name} must be True or False; got {value!r}")


def _int_tuple(name: str, value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, int) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise TypeError(f"ReformerConfig.{name} must be a sequence of ints; got {value!r}")
    out = tuple(value)
    if not out or min(out) < 1:
        raise ValueError(f"ReformerConfig.{name} must hold positive ints; got {value!r}")
    return out


def default_axial_shape(max_seq_len: int) -> tuple[int, int]:
    """Two factors n1 x n2 >= max_seq_len with n1 ~ sqrt(max_seq_len) (n1 a power of two)."""
    n1 = 2 ** math.ceil(math.log2(max(1, max_seq_len)) / 2)
    return n1, max(1, math.ceil(max_seq_len / n1))


@dataclass
class ReformerConfig:
    """Architecture of a Reformer language model, validated at construction.

    Attention per layer: `attention` is one kind for every layer ("lsh", "full" or "local")
    or a comma-separated pattern repeated over the layers, e.g. "local,local,lsh,local" (the
    authors' enwik8 model). A list or tuple of kinds is accepted too.
    """

    vocab_size: int = 256
    d_model: int = 256
    n_heads: int = 4
    d_ff: int = 1024
    n_layers: int = 6
    max_seq_len: int = 65536
    attention: str = "lsh"
    """'lsh' | 'full' | 'local', or a comma-separated per-layer pattern repeated over layers."""
    d_head: int | None = None
    """Per-head width; None: d_model // n_heads."""
    shared_qk: bool | None = None
    """Shared query-key projection. None: the kind's default (lsh and full True, local False).
    LSH requires True; full with False is the ordinary Transformer baseline."""
    n_hashes: int = 4
    """LSH hash rounds; can be changed for evaluation with `ReformerLM.set_n_hashes`."""
    chunk_len: int = 64
    """Chunk length m of LSH and local attention (each chunk attends to itself and the previous)."""
    n_buckets: int | None = None
    """Even number of LSH buckets; None: 2 * next_pow2(ceil(L / chunk_len)) for each length L."""
    lsh_mode: str | None = None
    """'window' (strictly causal; default if causal) or 'chunk' (the paper's; default if not)."""
    lsh_kernel: str = "auto"
    """How LSH runs the elementwise work on its score tiles: 'eager' (plain PyTorch, the
    reference), 'compiled' (torch.compile fuses it; needs a C++ compiler on CPU), or 'auto'
    (compiled for calls of >= 2^18 sorted slots, B * H * n_hashes * L, when a compiler is
    there; the environment variable REFORMER_LSH_KERNEL overrides it)."""
    causal: bool = True
    """Causal (a language model: position i sees j <= i) or not (an encoder: every position
    sees every other its attention kind offers)."""
    chunks_before: int | None = None
    """Neighbouring chunks before its own that each chunk of the LSH (chunk mode) and local
    layers attends to; None: 1. Causal models attend to exactly the previous one."""
    chunks_after: int | None = None
    """Neighbouring chunks after its own; None: 0 for causal models, 1 for encoders."""
    reversible: bool = True
    """Reversible residual layers (True) or ordinary pre-norm residual layers (False)."""
    dropout: float = 0.0
    """Dropout on the embeddings and on each sublayer's output."""
    ff_chunk_len: int | None = 4096
    """Positions per feed-forward chunk; None: unchunked."""
    loss_chunk_len: int | None = 4096
    """Positions per chunk of the output logits and loss; None: unchunked."""
    tie_embeddings: bool = False
    """Output logits through the token embedding matrix: norm -> Linear(W, d_model) ->
    E^T + bias (W = 2 d_model when reversible). False: an untied Linear(W, vocab_size).
    A classifier replaces the output layer by its class head, tied or not (so a tied masked
    LM fine-tunes into one)."""
    pos_emb: str = "axial"
    """'axial' | 'absolute' | 'none'."""
    axial_shape: tuple[int, ...] | None = None
    """Axial position grid (product >= max_seq_len); None: two factors near sqrt(max_seq_len)."""
    axial_dims: tuple[int, ...] | None = None
    """Width of each axial part (sum = d_model); None: d_model split in two halves."""
    layer_norm_eps: float = 1e-6
    # --- Switches for checkpoints trained elsewhere (transformers' and trax's Reformer); the
    # defaults are this library's choices. `reformer.interop` sets them when it imports.
    ff_activation: str = "gelu"
    """Feed-forward nonlinearity: 'gelu' (exact, erf) or 'relu' (both released checkpoints)."""
    lsh_chunk_len: int | None = None
    """Chunk length of the LSH layers; None: chunk_len."""
    local_chunk_len: int | None = None
    """Chunk length of the local layers; None: chunk_len (the enwik8 model: LSH 256, local 128)."""
    bucket_factors: tuple[int, ...] | None = None
    """Explicit LSH bucket factors in transformers' order (the first factor least significant
    in the bucket id), hashed with one rotation tensor of width sum(factors) / 2 sliced per
    factor, as transformers draws it; (512,) is an unfactorised 512. Needs n_buckets=None.
    None: n_buckets (or the automatic rule), factorised above 128 buckets."""
    lsh_wrap: bool = False
    """LSH look-back wraps around (transformers, trax): the first sorted chunk of each round
    sees the last chunk of the previous round (round 0: of the last round). Needs
    lsh_mode='chunk' and lsh_dedup=False. False: a round's first chunk has no look-back."""
    local_wrap: bool = False
    """Encoders' local attention wraps around the sequence's ends (transformers' encoders:
    the first chunk's look-back is the last chunk), padded to pad_multiple like LSH. Needs
    causal=False. False: chunks past the ends are masked."""
    lsh_dedup: bool = True
    """Duplicate correction: each LSH score minus log N_ij (N_ij the rounds whose candidate
    set holds j), which makes the rounds' combination exactly softmax over their union.
    False: rounds weighted by their log-sum-exps only (transformers, trax)."""
    key_norm: str = "l2"
    """Shared-QK keys: 'l2' (qk / max(|qk|, 1e-6)) or 'rms' (transformers: qk *
    rsqrt(mean(qk^2) + 1e-6) / sqrt(head_dim), about 1e-8 apart)."""
    attn_out_bias: bool = True
    """Bias in the attention output projection (transformers' has none)."""
    hash_seed: int | None = None
    """LSH rotations drawn on every call from a generator seeded with this, in the model's
    dtype, as transformers draws them when its config sets hash_seed (every layer and call
    then hashes alike). None: fresh rotations per call and layer from the layer's seed."""
    pad_multiple: int | None = None
    """LSH layers pad each sequence with masked positions to a multiple of this (a multiple
    of the LSH chunk length). None: the LSH chunk length. transformers pads to the least
    common multiple of its chunk lengths, which changes what a wrapped look-back sees."""

    def __post_init__(self) -> None:
        # The order of the checks is the order of the errors a user meets; keep it.
        self._check_field_types()
        self._check_interop_switches()
        self._check_shapes_and_rates()
        pattern = self._check_attention_pattern()
        self._check_lsh_and_windows(pattern)
        self._check_positions()

    def _check_field_types(self) -> None:
        """Every int field's type and lower bound, and the interop switches' bool types."""
        _check_int("vocab_size", self.vocab_size, 2)
        _check_int("d_model", self.d_model, 1)
        _check_int("n_heads", self.n_heads, 1)
        _check_int("d_ff", self.d_ff, 1)
        _check_int("n_layers", self.n_layers, 1)
        _check_int("max_seq_len", self.max_seq_len, 1)
        _check_int("d_head", self.d_head, 1, optional=True)
        _check_int("n_hashes", self.n_hashes, 1)
        _check_int("chunk_len", self.chunk_len, 1)
        if self.n_hashes > MAX_HASHES:
            raise ValueError(
                f"ReformerConfig.n_hashes must be <= {MAX_HASHES}; got {self.n_hashes}"
            )
        _check_int("n_buckets", self.n_buckets, 2, optional=True)
        _check_int("ff_chunk_len", self.ff_chunk_len, 1, optional=True)
        _check_int("loss_chunk_len", self.loss_chunk_len, 1, optional=True)
        _check_int("lsh_chunk_len", self.lsh_chunk_len, 1, optional=True)
        _check_int("local_chunk_len", self.local_chunk_len, 1, optional=True)
        _check_int("hash_seed", self.hash_seed, 0, optional=True)
        _check_int("pad_multiple", self.pad_multiple, 1, optional=True)
        _check_int("chunks_before", self.chunks_before, 0, optional=True)
        _check_int("chunks_after", self.chunks_after, 0, optional=True)
        _check_bool("lsh_wrap", self.lsh_wrap)
        _check_bool("lsh_dedup", self.lsh_dedup)
        _check_bool("local_wrap", self.local_wrap)
        _check_bool("attn_out_bias", self.attn_out_bias)
        _check_bool("tie_embeddings", self.tie_embeddings)

    def _check_interop_switches(self) -> None:
        """The switches for checkpoints trained elsewhere: activation, key norm, bucket factors."""
        if self.ff_activation not in FF_ACTIVATIONS:
            raise ValueError(
                f"ReformerConfig.ff_activation must be one of {FF_ACTIVATIONS}; "
                f"got {self.ff_activation!r}"
            )
        if self.key_norm not in KEY_NORMS:
            raise ValueError(
                f"ReformerConfig.key_norm must be one of {KEY_NORMS}; got {self.key_norm!r}"
            )
        self.bucket_factors = _int_tuple("bucket_factors", self.bucket_factors)
        if self.bucket_factors is not None:
            if self.n_buckets is not None:
                raise ValueError(
                    f"ReformerConfig.bucket_factors={self.bucket_factors} and n_buckets="
                    f"{self.n_buckets} are both set; give one (bucket_factors fixes the count "
                    "to their product)"
                )
            odd = [f for f in self.bucket_factors if f % 2]
            if odd or min(self.bucket_factors) < 2:
                raise ValueError(
                    f"ReformerConfig.bucket_factors {self.bucket_factors} must be even ints "
                    ">= 2 (each rotation gives +/- halves)"
                )

    def _check_shapes_and_rates(self) -> None:
        """Mode flags' types, head split, bucket count parity, dropout, layer-norm epsilon."""
        _check_bool("causal", self.causal)
        _check_bool("reversible", self.reversible)
        _check_bool("shared_qk", self.shared_qk, optional=True)
        if self.d_head is None and self.d_model % self.n_heads:
            raise ValueError(
                f"ReformerConfig.d_model ({self.d_model}) must be divisible by n_heads "
                f"({self.n_heads}), or set d_head explicitly"
            )
        if self.n_buckets is not None and self.n_buckets % 2:
            raise ValueError(
                f"ReformerConfig.n_buckets must be even (each rotation gives +/- halves); "
                f"got {self.n_buckets}. Use an even number or None for the automatic rule"
            )
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            raise TypeError(f"ReformerConfig.dropout must be a float; got {self.dropout!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ReformerConfig.dropout must be in [0, 1); got {self.dropout}")
        if not isinstance(self.layer_norm_eps, (int, float)) or self.layer_norm_eps <= 0:
            raise ValueError(
                f"ReformerConfig.layer_norm_eps must be a positive float; got {self.layer_norm_eps}"
            )

    def _check_attention_pattern(self) -> tuple[str, ...]:
        """Normalise `attention` to a comma-separated string of known kinds; return the kinds."""
        if isinstance(self.attention, (list, tuple)):
            self.attention = ",".join(self.attention)
        if not isinstance(self.attention, str):
            raise TypeError(
                f"ReformerConfig.attention must be a kind or a comma-separated pattern of "
                f"{ATTENTION_KINDS}; got {self.attention!r}"
            )
        pattern = tuple(k.strip() for k in self.attention.split(","))
        for kind in pattern:
            if kind not in ATTENTION_KINDS:
                raise ValueError(
                    f"ReformerConfig.attention has unknown kind {kind!r}; allowed: "
                    f"{', '.join(ATTENTION_KINDS)} (or a comma-separated pattern of them)"
                )
        self.attention = ",".join(pattern)
        if self.shared_qk is False and "lsh" in pattern:
            raise ValueError(
                "ReformerConfig.shared_qk=False is not possible with attention 'lsh': LSH "
                "hashes one shared query-key vector. Use shared_qk=None or True"
            )
        return pattern

    def _check_lsh_and_windows(self, pattern: tuple[str, ...]) -> None:
        """LSH mode, chunk windows, wrap-around, padding and kernel, given the layer kinds."""
        if self.lsh_mode is not None and self.lsh_mode not in LSH_MODES:
            raise ValueError(
                f"ReformerConfig.lsh_mode must be one of {LSH_MODES} or None; got {self.lsh_mode!r}"
            )
        if self.lsh_mode == "window" and not self.causal:
            raise ValueError(
                "ReformerConfig.lsh_mode='window' is the strictly causal mode and needs "
                "causal=True; non-causal models use lsh_mode='chunk'"
            )

        if self.causal and self.resolved_chunks != (1, 0):
            raise ValueError(
                f"ReformerConfig.chunks_before={self.chunks_before} and chunks_after="
                f"{self.chunks_after}: causal models attend to their own chunk and the one "
                "before it (the window mode and the decode cache rely on it); wider windows "
                "are for encoders (causal=False). Leave both None"
            )
        if self.local_wrap and self.causal:
            raise ValueError(
                "ReformerConfig.local_wrap=True needs causal=False: in a causal model the "
                "wrapped chunk lies in the future and is masked anyway"
            )
        if self.lsh_wrap and "lsh" in pattern and self.resolved_chunks != (1, 0):
            raise ValueError(
                f"ReformerConfig.lsh_wrap=True needs chunks_before=1 and chunks_after=0 (got "
                f"{self.resolved_chunks}): the wrap is transformers' one-chunk look-back"
            )
        if self.lsh_wrap and (self.resolved_lsh_mode != "chunk" or self.lsh_dedup):
            raise ValueError(
                "ReformerConfig.lsh_wrap=True needs lsh_mode='chunk' and lsh_dedup=False "
                f"(got lsh_mode={self.resolved_lsh_mode!r}, lsh_dedup={self.lsh_dedup}): the "
                "wrap belongs to the chunk layout, and through it a key can sit in a query's "
                "window twice, so N_ij no longer counts rounds"
            )
        if self.pad_multiple is not None and self.pad_multiple % self.chunk_len_for("lsh"):
            raise ValueError(
                f"ReformerConfig.pad_multiple={self.pad_multiple} must be a multiple of the "
                f"LSH chunk length {self.chunk_len_for('lsh')}"
            )

        if self.lsh_kernel not in LSH_KERNELS:
            raise ValueError(
                f"ReformerConfig.lsh_kernel must be one of {LSH_KERNELS}; got {self.lsh_kernel!r}"
            )

    def _check_positions(self) -> None:
        """Position embedding kind and, for axial, a grid that covers max_seq_len and d_model."""
        if self.pos_emb not in POS_EMBS:
            raise ValueError(
                f"ReformerConfig.pos_emb must be one of {POS_EMBS}; got {self.pos_emb!r}"
            )
        self.axial_shape = _int_tuple("axial_shape", self.axial_shape)
        self.axial_dims = _int_tuple("axial_dims", self.axial_dims)
        if self.pos_emb == "axial":
            shape = self.axial_shape or default_axial_shape(self.max_seq_len)
            if math.prod(shape) < self.max_seq_len:
                raise ValueError(
                    f"ReformerConfig.axial_shape {shape} covers {math.prod(shape)} positions, "
                    f"fewer than max_seq_len={self.max_seq_len}; its product must be >= it"
                )
            dims = self.axial_dims or (self.d_model // 2, self.d_model - self.d_model // 2)
            if len(dims) != len(shape):
                raise ValueError(
                    f"ReformerConfig.axial_dims {dims} must have one width per axis of "
                    f"axial_shape {shape}"
                )
            if sum(dims) != self.d_model:
                raise ValueError(
                    f"ReformerConfig.axial_dims {dims} must sum to d_model={self.d_model}"
                )
            if min(dims) < 1:
                raise ValueError(f"ReformerConfig.axial_dims {dims} must be positive")

    # Derived values -------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.d_head if self.d_head is not None else self.d_model // self.n_heads

    def chunk_len_for(self, kind: str) -> int:
        """The chunk length of layers of `kind` ("lsh" or "local"; "full" has none)."""
        own = {"lsh": self.lsh_chunk_len, "local": self.local_chunk_len}.get(kind)
        return own if own is not None else self.chunk_len

    @property
    def resolved_lsh_mode(self) -> str:
        """lsh_mode, with None resolved: "window" for causal models, "chunk" otherwise."""
        if self.lsh_mode is not None:
            return self.lsh_mode
        return "window" if self.causal else "chunk"

    @property
    def resolved_chunks(self) -> tuple[int, int]:
        """(chunks_before, chunks_after) with None resolved: (1, 0) causal, (1, 1) encoders."""
        before = 1 if self.chunks_before is None else self.chunks_before
        after = self.chunks_after if self.chunks_after is not None else int(not self.causal)
        return before, after

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        """The attention kind of each layer: the pattern repeated over `n_layers`."""
        pattern = self.attention.split(",")
        return tuple(pattern[i % len(pattern)] for i in range(self.n_layers))

    def shared_qk_for(self, kind: str) -> bool:
        if self.shared_qk is not None:
            return self.shared_qk or kind == "lsh"
        return kind in ("lsh", "full")

    @property
    def resolved_axial_shape(self) -> tuple[int, ...]:
        return self.axial_shape or default_axial_shape(self.max_seq_len)

    @property
    def resolved_axial_dims(self) -> tuple[int, ...]:
        return self.axial_dims or (self.d_model // 2, self.d_model - self.d_model // 2)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("axial_shape", "axial_dims", "bucket_factors"):
            if out[key] is not None:
                out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReformerConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown ReformerConfig field(s) {unknown}; known fields: {sorted(known)}"
            )
        return cls(**data)
