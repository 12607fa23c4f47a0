"""transformers' Reformer checkpoint format: its config.json fields and weight names.

A `ReformerModelWithLMHead` is this library's reversible causal LM with the switches that
`ReformerConfig.compat` keeps for checkpoints trained elsewhere set to transformers' semantics:
the chunk layout with look-back wrap and no duplicate correction, its key normalisation,
ReLU (both released checkpoints), no attention output bias, per-kind chunk lengths, explicit
bucket factors and, when its config sets one, its hash seed. Everything else maps one to one
(the axial tables squeezed). A `ReformerForMaskedLM` (is_decoder false) is the same with
causal=False and local attention that wraps around the ends, as transformers' does. Nothing
here imports transformers.
"""

from __future__ import annotations

import math
from typing import Any, NoReturn

from torch import Tensor

from ..attention.common import padded_length
from ..attention.hashing import auto_n_buckets, bucket_factors
from ..config import HFCompat, ReformerConfig


class InteropError(ValueError):
    """A checkpoint or model that the other side cannot represent; the message names the
    field and what to do."""


# Semantics transformers' Reformer has and this library's defaults do not: its LSH layout,
# and the `compat` switches that every import sets (ReformerConfig's keywords, in one dict).
HF_SWITCHES = dict(lsh_wrap=True, lsh_dedup=False, key_norm="rms", attn_out_bias=False)
TRANSFORMERS_SEMANTICS = dict(lsh_mode="chunk", **HF_SWITCHES)
HF_ACTIVATIONS = {"relu": "relu", "gelu": "gelu"}  # transformers' hidden_act -> ours


def _need(hf: dict[str, Any], key: str) -> Any:
    if key not in hf:
        raise InteropError(f"transformers config has no field {key!r}: not a Reformer config")
    return hf[key]


def _lcm_pad(kinds: set[str], lsh_c: int, local_c: int) -> int | None:
    """transformers pads to the least common multiple of its chunk lengths: our pad_multiple
    (None where that is the LSH chunk length itself, as in both released checkpoints)."""
    if "lsh" not in kinds or "local" not in kinds:
        return None
    lcm = math.lcm(lsh_c, local_c)
    return None if lcm == lsh_c else lcm


def config_from_hf(hf: dict[str, Any]) -> ReformerConfig:
    """transformers' ReformerConfig (as a config.json dict) -> our ReformerConfig, or an
    InteropError naming the field that has no counterpart here."""
    causal, kinds = _hf_layers(hf)
    around = _hf_chunk_neighbours(hf, kinds, causal)
    act = hf.get("hidden_act", "relu")
    if act not in HF_ACTIVATIONS:
        raise InteropError(f"config.json hidden_act={act!r}; supported: {sorted(HF_ACTIVATIONS)}")
    lsh_c, local_c = _hf_chunk_lengths(hf)
    factors = _hf_bucket_factors(hf, kinds)
    pos = _hf_positions(hf)
    try:
        return ReformerConfig(
            vocab_size=int(_need(hf, "vocab_size")),
            d_model=int(_need(hf, "hidden_size")),
            n_heads=int(_need(hf, "num_attention_heads")),
            d_head=int(_need(hf, "attention_head_size")),
            d_ff=int(_need(hf, "feed_forward_size")),
            n_layers=len(kinds),
            max_seq_len=int(_need(hf, "max_position_embeddings")),
            attention=",".join(kinds),
            n_hashes=int(hf.get("num_hashes", 1)),
            chunk_len=lsh_c if "lsh" in kinds else local_c,
            lsh_mode=TRANSFORMERS_SEMANTICS["lsh_mode"],
            causal=causal,
            chunks_before=None if causal else around[0],
            chunks_after=None if causal else around[1],
            reversible=True,
            dropout=float(hf.get("hidden_dropout_prob", 0.05)),  # transformers' default
            layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
            **pos,
            compat=HFCompat(
                ff_activation=HF_ACTIVATIONS[act],
                lsh_chunk_len=lsh_c,
                local_chunk_len=local_c,
                bucket_factors=factors,
                hash_seed=hf.get("hash_seed"),
                pad_multiple=_lcm_pad(set(kinds), lsh_c, local_c),
                local_wrap=not causal and "local" in kinds,
                **HF_SWITCHES,
            ),
        )
    except (TypeError, ValueError) as e:
        raise InteropError(f"config.json cannot be represented here: {e}") from e


def _hf_layers(hf: dict[str, Any]) -> tuple[bool, list[str]]:
    """(causal, attention kind per layer) of a transformers config, checked against its
    architecture and layer count."""
    if hf.get("model_type", "reformer") != "reformer":
        raise InteropError(f"config.json model_type is {hf.get('model_type')!r}, not 'reformer'")
    causal = bool(hf.get("is_decoder", False))
    archs = hf.get("architectures") or []
    # transformers itself refuses these pairs when it builds the model
    if ("ReformerModelWithLMHead" in archs and not causal) or (
        "ReformerForMaskedLM" in archs and causal
    ):
        raise InteropError(
            f"config.json architectures {archs} with is_decoder={causal}: a "
            "ReformerModelWithLMHead needs is_decoder true, a ReformerForMaskedLM false"
        )
    kinds = list(_need(hf, "attn_layers"))
    bad = sorted(set(kinds) - {"lsh", "local"})
    if bad:
        raise InteropError(f"config.json attn_layers holds {bad}; known: 'lsh', 'local'")
    n_layers = int(hf.get("num_hidden_layers", len(kinds)))
    if n_layers != len(kinds):
        raise InteropError(
            f"config.json num_hidden_layers={n_layers} but attn_layers has {len(kinds)} entries; "
            "transformers builds one layer per attn_layers entry"
        )
    return causal, kinds


def _hf_chunk_neighbours(hf: dict[str, Any], kinds: list[str], causal: bool) -> tuple[int, int]:
    """The one (chunks_before, chunks_after) that every layer kind of the config uses."""
    arounds = {
        kind: (hf.get(f"{kind}_num_chunks_before", 1), hf.get(f"{kind}_num_chunks_after", 0))
        for kind in sorted(set(kinds))
    }
    for kind, (before, after) in arounds.items():
        # Causal models and LSH's wrapped look-back: the paper's one chunk back. Encoders'
        # local layers: any neighbours (one setting for all of them here).
        if (causal or kind == "lsh") and (before, after) != (1, 0):
            raise InteropError(
                f"config.json {kind}_num_chunks_before={before}, {kind}_num_chunks_after="
                f"{after}: only 1 and 0 are supported for "
                f"{'causal models' if causal else 'LSH layers'} (each chunk attends to "
                "itself and the one before, the paper's layout and both released checkpoints)"
            )
    if len(set(arounds.values())) > 1:
        raise InteropError(
            f"config.json sets different chunk neighbours per kind ({arounds}); this library "
            "has one chunks_before / chunks_after setting for all layers"
        )
    return next(iter(arounds.values()))


def _hf_chunk_lengths(hf: dict[str, Any]) -> tuple[int, int]:
    """(LSH chunk length, local chunk length), each a positive int."""
    lsh_c, local_c = hf.get("lsh_attn_chunk_length", 64), hf.get("local_attn_chunk_length", 64)
    for field, value in (("lsh_attn_chunk_length", lsh_c), ("local_attn_chunk_length", local_c)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InteropError(
                f"config.json {field}={value!r}: a positive int is needed (null, transformers' "
                "whole-sequence attention, is not supported)"
            )
    return lsh_c, local_c


def _hf_bucket_factors(hf: dict[str, Any], kinds: list[str]) -> tuple[int, ...] | None:
    """transformers' num_buckets as our bucket_factors (None without LSH layers)."""
    if "lsh" not in kinds:
        return None
    nb = hf.get("num_buckets")
    if nb is None:
        raise InteropError(
            "config.json num_buckets is null: transformers then picks the bucket count on "
            "its first forward from that call's length and writes it into the config. Set "
            "num_buckets in config.json to the count the model was trained with"
        )
    return (int(nb),) if isinstance(nb, int) else tuple(int(f) for f in nb)


def _hf_positions(hf: dict[str, Any]) -> dict[str, Any]:
    """Our position-embedding fields for transformers' axial or absolute embeddings."""
    if hf.get("axial_pos_embds", True):
        return dict(
            pos_emb="axial",
            axial_shape=tuple(_need(hf, "axial_pos_shape")),
            axial_dims=tuple(_need(hf, "axial_pos_embds_dim")),
        )
    return dict(pos_emb="absolute")


def hf_buckets(cfg: ReformerConfig, seq_len: int | None) -> int | list[int]:
    """Our bucket rule -> transformers' num_buckets (an int is never factorised there; a
    list is factors with the first least significant)."""
    if cfg.compat.bucket_factors is not None:
        f = list(cfg.compat.bucket_factors)
        return f[0] if len(f) == 1 else f
    K = cfg.n_buckets
    if K is None:
        if seq_len is None:
            raise InteropError(
                "ReformerConfig.n_buckets is None (chosen from each call's length), which "
                "transformers cannot represent: pass seq_len (the training length) to fix the "
                "count the model was trained with, or set n_buckets / compat.bucket_factors"
            )
        C = cfg.chunk_len_for("lsh")
        K = auto_n_buckets(padded_length(seq_len, cfg.compat.pad_multiple or C), C)
    ours = bucket_factors(K)  # most significant first
    if len(ours) > 1 and cfg.compat.hash_seed is not None:
        raise InteropError(
            f"ReformerConfig.n_buckets={K} is factorised here as {ours} with one rotation "
            "tensor per factor, but transformers slices one tensor: with compat.hash_seed set "
            f"the rotations would differ. Use compat.bucket_factors={tuple(reversed(ours))} and "
            "n_buckets=None instead"
        )
    return ours[0] if len(ours) == 1 else list(reversed(ours))


def config_to_hf(cfg: ReformerConfig, seq_len: int | None = None) -> dict[str, Any]:
    """Our ReformerConfig -> transformers' config.json dict, or an InteropError naming the
    field transformers cannot represent and the setting that it can."""
    kinds = cfg.layer_kinds
    _check_hf_attention(cfg, kinds)
    _check_hf_layers(cfg, kinds)
    lsh_c, local_c = cfg.chunk_len_for("lsh"), cfg.chunk_len_for("local")
    hf: dict[str, Any] = {
        "architectures": ["ReformerModelWithLMHead"],
        "model_type": "reformer",
        "is_decoder": True,
        "attn_layers": list(kinds),
        "num_hidden_layers": len(kinds),
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_attention_heads": cfg.n_heads,
        "attention_head_size": cfg.head_dim,
        "feed_forward_size": cfg.d_ff,
        "hidden_act": cfg.compat.ff_activation,
        "max_position_embeddings": cfg.max_seq_len,
        "num_hashes": cfg.n_hashes,
        "hash_seed": cfg.compat.hash_seed,
        "lsh_attn_chunk_length": lsh_c,
        "local_attn_chunk_length": local_c,
        "lsh_num_chunks_before": 1,
        "lsh_num_chunks_after": 0,
        "local_num_chunks_before": 1,
        "local_num_chunks_after": 0,
        "layer_norm_eps": cfg.layer_norm_eps,
        "hidden_dropout_prob": cfg.dropout,
        "lsh_attention_probs_dropout_prob": 0.0,
        "local_attention_probs_dropout_prob": 0.0,
        "chunk_size_feed_forward": 0,
        "chunk_size_lm_head": 0,
        "axial_pos_embds": cfg.pos_emb == "axial",
        "tie_word_embeddings": False,
        "pad_token_id": 0,
        "eos_token_id": None,
        "use_cache": False,
    }
    hf["num_buckets"] = hf_buckets(cfg, seq_len) if "lsh" in kinds else None
    if cfg.pos_emb == "axial":
        hf["axial_pos_shape"] = list(cfg.resolved_axial_shape)
        hf["axial_pos_embds_dim"] = list(cfg.resolved_axial_dims)
    return hf


def _refuse(field: str, value: Any, fix: str) -> NoReturn:
    """Raise the InteropError for a field transformers cannot represent, with the fix."""
    raise InteropError(
        f"ReformerConfig.{field}={value!r} cannot be represented in transformers' Reformer: {fix}"
    )


def _check_hf_attention(cfg: ReformerConfig, kinds: tuple[str, ...]) -> None:
    """Refuse a model whose direction, residuals or attention kinds transformers lacks."""
    if not cfg.causal:
        _refuse("causal", cfg.causal, "its ReformerModelWithLMHead is a causal model")
    if not cfg.reversible:
        _refuse("reversible", cfg.reversible, "its layers are always reversible")
    if "full" in kinds:
        _refuse("attention", cfg.attention, "its layers are 'lsh' or 'local' only")
    if "local" in kinds and cfg.shared_qk_for("local"):
        _refuse("shared_qk", cfg.shared_qk, "its local attention has separate query and key")
    if "lsh" in kinds:
        for field in ("lsh_mode", "lsh_wrap", "lsh_dedup"):
            have = cfg.resolved_lsh_mode if field == "lsh_mode" else getattr(cfg.compat, field)
            want = TRANSFORMERS_SEMANTICS[field]
            if have != want:
                _refuse(
                    field if field == "lsh_mode" else f"compat.{field}",
                    have,
                    f"its LSH is the chunk layout with look-back wrap and no duplicate "
                    f"correction ({field}={want!r}); setting that here changes the model's "
                    "outputs, so fine-tune with it before exporting",
                )


def _check_hf_layers(cfg: ReformerConfig, kinds: tuple[str, ...]) -> None:
    """Refuse projections, key norm, position embeddings or padding that transformers lacks."""
    if cfg.compat.attn_out_bias:
        _refuse("compat.attn_out_bias", True, "its attention output projection has no bias")
    if cfg.tie_embeddings:
        _refuse("tie_embeddings", True, "its output layer is an untied Linear(2 d, vocab)")
    if cfg.compat.key_norm != "rms" and any(cfg.shared_qk_for(k) for k in kinds):
        _refuse(
            "compat.key_norm",
            cfg.compat.key_norm,
            "it normalises keys as 'rms' (about 1e-8 apart from 'l2'; set compat.key_norm='rms')",
        )
    if cfg.pos_emb == "none" or (cfg.pos_emb == "axial" and len(cfg.resolved_axial_shape) != 2):
        _refuse(
            "pos_emb",
            cfg.pos_emb if cfg.pos_emb == "none" else cfg.resolved_axial_shape,
            "it has 2-axis axial or absolute position embeddings only",
        )
    lsh_c, local_c = cfg.chunk_len_for("lsh"), cfg.chunk_len_for("local")
    want_pad = _lcm_pad(set(kinds), lsh_c, local_c)
    if (cfg.compat.pad_multiple or lsh_c) != (want_pad or lsh_c) and "lsh" in kinds:
        _refuse("compat.pad_multiple", cfg.compat.pad_multiple, f"it pads to {want_pad or lsh_c}")


# --- weights ----------------------------------------------------------------------------------
def _layer_names(i: int, kind: str) -> dict[str, str]:
    """Our parameter name -> transformers' for layer i."""
    hf = f"reformer.encoder.layers.{i}."
    attn = hf + "attention.self_attention."
    names = {
        "attn_norm.weight": hf + "attention.layer_norm.weight",
        "attn_norm.bias": hf + "attention.layer_norm.bias",
        "attn.v.weight": attn + "value.weight",
        "attn.out.weight": hf + "attention.output.dense.weight",
        "ff_norm.weight": hf + "feed_forward.layer_norm.weight",
        "ff_norm.bias": hf + "feed_forward.layer_norm.bias",
        "ff.w_in.weight": hf + "feed_forward.dense.dense.weight",
        "ff.w_in.bias": hf + "feed_forward.dense.dense.bias",
        "ff.w_out.weight": hf + "feed_forward.output.dense.weight",
        "ff.w_out.bias": hf + "feed_forward.output.dense.bias",
    }
    if kind == "lsh":
        names["attn.qk.weight"] = attn + "query_key.weight"
    else:
        names["attn.q.weight"] = attn + "query.weight"
        names["attn.k.weight"] = attn + "key.weight"
    return {f"blocks.{i}.{k}": v for k, v in names.items()}


def weight_names(cfg: ReformerConfig) -> dict[str, str]:
    """Every parameter of our ReformerLM -> its transformers name."""
    names = {
        "token_emb.weight": "reformer.embeddings.word_embeddings.weight",
        "norm.weight": "reformer.encoder.layer_norm.weight",
        "norm.bias": "reformer.encoder.layer_norm.bias",
        "head.weight": "lm_head.decoder.weight",
        "head.bias": "lm_head.decoder.bias",
    }
    if cfg.pos_emb == "axial":
        for k in range(len(cfg.resolved_axial_shape)):
            names[f"pos_emb.weights.{k}"] = f"reformer.embeddings.position_embeddings.weights.{k}"
    else:
        names["pos_emb.weight"] = "reformer.embeddings.position_embeddings.embedding.weight"
    for i, kind in enumerate(cfg.layer_kinds):
        names.update(_layer_names(i, kind))
    return names


def state_from_hf(cfg: ReformerConfig, hf_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers' state dict -> ours (the axial tables squeezed to (n_k, d_k))."""
    state = dict(hf_state)
    if "lm_head.decoder.bias" not in state and "lm_head.bias" in state:
        state["lm_head.decoder.bias"] = state["lm_head.bias"]  # older files tie the two
    out, missing = {}, []
    for ours, theirs in weight_names(cfg).items():
        if theirs not in state:
            missing.append(theirs)
            continue
        t = state[theirs]
        out[ours] = t.reshape(-1, t.shape[-1]) if ours.startswith("pos_emb.weights.") else t
    if missing:
        raise InteropError(
            f"the transformers weights lack {len(missing)} tensor(s) the config needs, e.g. "
            f"{missing[:3]}: the weights do not belong to this config.json"
        )
    return out


def state_to_hf(cfg: ReformerConfig, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our state dict -> transformers' (axial tables as (n_1, 1, d_1) and (1, n_2, d_2);
    lm_head.bias written beside lm_head.decoder.bias, as transformers' files hold both)."""
    out: dict[str, Tensor] = {}
    n_axes = len(cfg.resolved_axial_shape)
    for ours, theirs in weight_names(cfg).items():
        t = state[ours].detach().cpu()
        if ours.startswith("pos_emb.weights."):
            k = int(ours.rsplit(".", 1)[1])
            shape = [1] * n_axes
            shape[k] = t.shape[0]
            t = t.reshape(*shape, t.shape[-1])
        out[theirs] = t.contiguous().clone()
    out["lm_head.bias"] = out["lm_head.decoder.bias"].clone()
    return out
