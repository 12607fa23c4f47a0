"""`ReformerConfig`: every architectural choice of a Reformer language model, validated.

A bad value raises at construction, naming the field, the value and what is allowed
(`ValueError` for a bad value, `TypeError` for a bad type), never later as a shape error
from deep inside a layer. Types and choices are checked against the annotations by
`validate.py`, as the run configs are; the checks between fields are grouped below.

The switches that reproduce transformers' Reformer sit in one section, `compat`
(`HFCompat`). Configs written before the section, with those keys flat among the others,
still load: `from_dict` (and `run_config.config_from_dict`) moves flat keys into `compat`,
and `ReformerConfig(local_wrap=True)` and `cfg.local_wrap` still work.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from typing import Any, Literal, get_args

from .validate import at_least, check_annotations, within

AttentionKind = Literal["lsh", "full", "local"]
LshKernel = Literal["auto", "eager", "compiled"]
ATTENTION_KINDS: tuple[str, ...] = get_args(AttentionKind)
LSH_KERNELS: tuple[str, ...] = get_args(LshKernel)
MAX_HASHES = 64  # LSH pair codes are int8 (attention/lsh.py)


def _positive_tuple(name: str, value: tuple[int, ...] | list[int] | None) -> tuple[int, ...] | None:
    """A list or tuple of ints (its type already checked) as a non-empty tuple of ints >= 1."""
    if value is None:
        return None
    if not value or min(value) < 1:
        raise ValueError(f"{name} must hold positive ints; got {value!r}")
    return tuple(value)


def default_axial_shape(max_seq_len: int) -> tuple[int, int]:
    """Two factors n1 x n2 >= max_seq_len with n1 ~ sqrt(max_seq_len) (n1 a power of two)."""
    n1 = 2 ** math.ceil(math.log2(max(1, max_seq_len)) / 2)
    return n1, max(1, math.ceil(max_seq_len / n1))


@dataclass
class HFCompat:
    """Switches that reproduce transformers' (and trax's) Reformer, for checkpoints trained there.

    Each switch reproduces one behaviour of transformers' Reformer where this library's
    default differs; `reformer.interop.from_transformers` sets them all when it imports a
    checkpoint, and `to_transformers` refuses a model whose switches transformers cannot
    represent (docs/interop.md tables them). The defaults are this library's choices.
    """

    ff_activation: Literal["gelu", "relu"] = "gelu"
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
    key_norm: Literal["l2", "rms"] = "l2"
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
        prefix = "ReformerConfig.compat."
        check_annotations(self, prefix)
        for name, low in (("lsh_chunk_len", 1), ("local_chunk_len", 1), ("pad_multiple", 1)):
            if getattr(self, name) is not None:
                at_least(prefix + name, getattr(self, name), low)
        if self.hash_seed is not None:
            at_least(prefix + "hash_seed", self.hash_seed, 0)
        self.bucket_factors = _positive_tuple(prefix + "bucket_factors", self.bucket_factors)
        if self.bucket_factors is not None and (
            any(f % 2 for f in self.bucket_factors) or min(self.bucket_factors) < 2
        ):
            raise ValueError(
                f"{prefix}bucket_factors {self.bucket_factors} must be even ints >= 2 (each "
                "rotation gives +/- halves)"
            )


COMPAT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(HFCompat))


def nest_compat(model: dict[str, Any]) -> dict[str, Any]:
    """A model section (plain data) with the compat switches written flat, as configs saved
    before the `compat` section hold them, moved into it. A flat key wins over the same key
    in `compat` (in one mapping, it is the later spelling)."""
    flat = {k: model[k] for k in COMPAT_FIELDS if k in model}
    if not flat:
        return model
    compat = model.get("compat") or {}
    compat = asdict(compat) if is_dataclass(compat) else dict(compat)
    return {k: v for k, v in model.items() if k not in flat} | {"compat": compat | flat}


def nest_run_compat(run: dict[str, Any]) -> dict[str, Any]:
    """A run config (plain data, as a layer of `reformer train`'s) with `nest_compat` applied
    to its model section. Each layer is nested before the layers merge, so that a higher
    layer's switch wins whichever way each layer spells it."""
    model = run.get("model")
    return run | {"model": nest_compat(model)} if isinstance(model, dict) else run


def moved_compat_flag(arg: str) -> str | None:
    """The command-line flag that replaced `arg` when it is an old flat one for a compat
    switch (`--model.lsh-wrap`, `--model.no_lsh_wrap`, `--model.key-norm=rms`), else None."""
    m = re.fullmatch(r"--model\.(no[-_])?([a-z_-]+)(=.*)?", arg)
    if m is None or m.group(2).replace("-", "_") not in COMPAT_FIELDS:
        return None
    return f"--model.compat.{m.group(1) or ''}{m.group(2)}".replace("_", "-")


# Lower bounds of the int fields (None, where a field allows it, means "derived").
_MINIMUM = dict(
    vocab_size=2, d_model=1, n_heads=1, d_ff=1, n_layers=1, max_seq_len=1, d_head=1,
    n_hashes=1, chunk_len=1, n_buckets=2, chunks_before=0, chunks_after=0, ff_chunk_len=1,
    loss_chunk_len=1,
)  # fmt: skip


@dataclass
class ReformerConfig:
    """Architecture of a Reformer language model, validated at construction.

    Attention per layer: `attention` is one kind for every layer ("lsh", "full" or "local")
    or a comma-separated pattern repeated over the layers, e.g. "local,local,lsh,local" (the
    authors' enwik8 model). A list or tuple of kinds is accepted too.

    `compat` holds the switches that reproduce transformers' Reformer (`HFCompat`).
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
    lsh_mode: Literal["window", "chunk"] | None = None
    """'window' (strictly causal; default if causal) or 'chunk' (the paper's; default if not)."""
    lsh_kernel: LshKernel = "auto"
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
    pos_emb: Literal["axial", "absolute", "none"] = "axial"
    """'axial' | 'absolute' | 'none'."""
    axial_shape: tuple[int, ...] | None = None
    """Axial position grid (product >= max_seq_len); None: two factors near sqrt(max_seq_len)."""
    axial_dims: tuple[int, ...] | None = None
    """Width of each axial part (sum = d_model); None: d_model split in two halves."""
    layer_norm_eps: float = 1e-6
    compat: HFCompat = field(default_factory=HFCompat)
    """Switches for checkpoints trained with transformers' Reformer (`HFCompat`); the
    defaults are this library's choices, `reformer.interop` sets them when it imports."""

    def __post_init__(self) -> None:
        # The order of the checks is the order of the errors a user meets; keep it.
        self._normalise_attention()
        check_annotations(self, "ReformerConfig.")
        self._check_ranges()
        pattern = self._check_attention_pattern()
        self._check_lsh_and_windows()
        self._check_compat(pattern)
        self._check_positions()

    def _normalise_attention(self) -> None:
        """A list or tuple of kinds as one comma-separated string; anything else refused."""
        if isinstance(self.attention, (list, tuple)) and all(
            isinstance(k, str) for k in self.attention
        ):
            self.attention = ",".join(self.attention)
        if not isinstance(self.attention, str):
            raise TypeError(
                f"ReformerConfig.attention must be a kind or a comma-separated pattern of "
                f"{ATTENTION_KINDS}; got {self.attention!r}"
            )

    def _check_ranges(self) -> None:
        """Each number within its range, the head split and the bucket count's parity."""
        for name, low in _MINIMUM.items():
            if getattr(self, name) is not None:
                at_least(f"ReformerConfig.{name}", getattr(self, name), low)
        within("ReformerConfig.n_hashes", self.n_hashes, 1, MAX_HASHES)
        within("ReformerConfig.dropout", self.dropout, 0, 1, open_high=True)
        at_least("ReformerConfig.layer_norm_eps", self.layer_norm_eps, 0, strict=True)
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

    def _check_attention_pattern(self) -> tuple[str, ...]:
        """Normalise `attention` to a comma-separated string of known kinds; return the kinds."""
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

    def _check_lsh_and_windows(self) -> None:
        """LSH mode against causality, and the chunk windows a causal model allows."""
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

    def _check_compat(self, pattern: tuple[str, ...]) -> None:
        """The transformers switches against the rest: buckets, wrap-arounds, padding."""
        c = self.compat
        if c.bucket_factors is not None and self.n_buckets is not None:
            raise ValueError(
                f"ReformerConfig.compat.bucket_factors={c.bucket_factors} and n_buckets="
                f"{self.n_buckets} are both set; give one (bucket_factors fixes the count "
                "to their product)"
            )
        if c.local_wrap and self.causal:
            raise ValueError(
                "ReformerConfig.compat.local_wrap=True needs causal=False: in a causal model "
                "the wrapped chunk lies in the future and is masked anyway"
            )
        if c.lsh_wrap and "lsh" in pattern and self.resolved_chunks != (1, 0):
            raise ValueError(
                f"ReformerConfig.compat.lsh_wrap=True needs chunks_before=1 and chunks_after=0 "
                f"(got {self.resolved_chunks}): the wrap is transformers' one-chunk look-back"
            )
        if c.lsh_wrap and (self.resolved_lsh_mode != "chunk" or c.lsh_dedup):
            raise ValueError(
                "ReformerConfig.compat.lsh_wrap=True needs lsh_mode='chunk' and lsh_dedup=False "
                f"(got lsh_mode={self.resolved_lsh_mode!r}, lsh_dedup={c.lsh_dedup}): the "
                "wrap belongs to the chunk layout, and through it a key can sit in a query's "
                "window twice, so N_ij no longer counts rounds"
            )
        if c.pad_multiple is not None and c.pad_multiple % self.chunk_len_for("lsh"):
            raise ValueError(
                f"ReformerConfig.compat.pad_multiple={c.pad_multiple} must be a multiple of "
                f"the LSH chunk length {self.chunk_len_for('lsh')}"
            )

    def _check_positions(self) -> None:
        """For axial position embeddings, a grid that covers max_seq_len and d_model."""
        self.axial_shape = _positive_tuple("ReformerConfig.axial_shape", self.axial_shape)
        self.axial_dims = _positive_tuple("ReformerConfig.axial_dims", self.axial_dims)
        if self.pos_emb != "axial":
            return
        shape, dims = self.resolved_axial_shape, self.resolved_axial_dims
        if math.prod(shape) < self.max_seq_len:
            raise ValueError(
                f"ReformerConfig.axial_shape {shape} covers {math.prod(shape)} positions, "
                f"fewer than max_seq_len={self.max_seq_len}; its product must be >= it"
            )
        if len(dims) != len(shape):
            raise ValueError(
                f"ReformerConfig.axial_dims {dims} must have one width per axis of "
                f"axial_shape {shape}"
            )
        if sum(dims) != self.d_model:
            raise ValueError(f"ReformerConfig.axial_dims {dims} must sum to d_model={self.d_model}")
        if min(dims) < 1:
            raise ValueError(f"ReformerConfig.axial_dims {dims} must be positive")

    # Derived values -------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.d_head if self.d_head is not None else self.d_model // self.n_heads

    def chunk_len_for(self, kind: str) -> int:
        """The chunk length of layers of `kind` ("lsh" or "local"; "full" has none)."""
        own = {"lsh": self.compat.lsh_chunk_len, "local": self.compat.local_chunk_len}.get(kind)
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
        """Plain data (lists for tuples), `compat` as a nested mapping."""

        def plain(x: Any) -> Any:
            return list(x) if isinstance(x, tuple) else x

        out = {k: plain(v) for k, v in asdict(self).items()}
        out["compat"] = {k: plain(v) for k, v in out["compat"].items()}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReformerConfig:
        """From plain data, `compat` nested or its keys flat (configs saved before it);
        unknown keys are errors."""
        data = nest_compat(data)
        _refuse_unknown(cls, data, "ReformerConfig")
        compat = data.get("compat", {})
        if isinstance(compat, dict):
            _refuse_unknown(HFCompat, compat, "ReformerConfig.compat")
            data = data | {"compat": HFCompat(**compat)}
        return cls(**data)


def _refuse_unknown(cls: type, data: dict[str, Any], name: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {name} field(s) {unknown}; known fields: {sorted(known)}")


def _accept_flat_compat(init: Any) -> Any:
    """ReformerConfig's __init__, also taking the compat switches as keywords (as before the
    section existed): they replace those of `compat` (or of the default HFCompat)."""

    @functools.wraps(init)
    def __init__(self: ReformerConfig, *args: Any, **kwargs: Any) -> None:
        flat = {k: kwargs.pop(k) for k in COMPAT_FIELDS if k in kwargs}
        if flat:
            kwargs["compat"] = replace(kwargs.get("compat") or HFCompat(), **flat)
        init(self, *args, **kwargs)

    return __init__


def _forward_to_compat(name: str) -> property:
    def get(self: ReformerConfig) -> Any:
        return getattr(self.compat, name)

    def set_(self: ReformerConfig, value: Any) -> None:
        setattr(self.compat, name, value)

    return property(get, set_, doc=f"`compat.{name}`, read and set through the section.")


# After @dataclass, which wrote the __init__ wrapped here; the properties are no fields.
ReformerConfig.__init__ = _accept_flat_compat(ReformerConfig.__init__)
for _name in COMPAT_FIELDS:
    setattr(ReformerConfig, _name, _forward_to_compat(_name))


def sequence_parallel_problem(config: ReformerConfig, length: int) -> str | None:
    """Why a model (its config) cannot split sequences of `length` over ranks, or None."""
    if "full" in config.layer_kinds:
        return (
            "--parallel sequence: full attention needs the whole sequence on one rank "
            f"(layers {config.layer_kinds}); use lsh or local layers (--model.attention lsh "
            "or local,lsh), or --parallel ddp"
        )
    if config.compat.lsh_wrap or config.compat.local_wrap:
        return (
            "--parallel sequence: wrapped chunks (compat.lsh_wrap / compat.local_wrap, "
            "transformers' layout) are not supported; convert the model without them"
        )
    if config.pos_emb != "none" and length > config.max_seq_len:
        return (
            f"--parallel sequence: sequences of {length} positions exceed "
            f"model.max_seq_len={config.max_seq_len}; raise --model.max-seq-len"
        )
    return None
