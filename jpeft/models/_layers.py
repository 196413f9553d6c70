"""Building blocks shared by jpeft's model families: norms, rotary embeddings, activations,
attention masks, the key/value cache and the attention kernel call.

Everything here is numerically matched to the Hugging Face PyTorch implementations
(``transformers`` 5): statistics of norms in float32, rotary frequencies in float32. The
attention kernels and their structured mask live in :mod:`jpeft.models._attention`; the
activation table, the Dense product over flattened tokens and the segment and position
numbering, which adapter methods use too, in :mod:`jpeft._ops` (below the methods).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, ClassVar, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jpeft._ops import (check_activation, check_float_dtype, default_positions, flat_dot_general, segment_runs,
                        segment_slots)
from jpeft.errors import ConfigError, InputValidationError, UnsupportedModelError
from jpeft.models._attention import AttentionMask, check_dropout, check_implementation, dot_product_attention
from jpeft.scan import COLLECTION
from jpeft.validate import check_token_ids

Array = jax.Array


# -- activations -----------------------------------------------------------------------------

def gated(act, g, u):
    """``act(g) * u`` (a gated MLP's product) that keeps only ``g`` and ``u`` for the backward
    pass and recomputes the activation there: XLA then writes one activation-sized tensor per
    layer here instead of three (``sigmoid(g)``, ``silu(g)`` and the product), fewer bytes per
    layer for the same FLOPs (docs/BENCHMARKS.md, "Depth")."""
    return jax.checkpoint(lambda g, u: act(g) * u)(g, u)


# -- norms ---------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """Root-mean-square norm as Llama computes it: statistics in float32, the result cast back
    to the compute dtype and then multiplied by ``scale`` (parameter name ``scale``)."""

    features: int
    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (self.features,), self.param_dtype)
        h = x.astype(jnp.float32)
        var = jnp.mean(h * h, axis=-1, keepdims=True)
        h = h * jax.lax.rsqrt(var + self.eps)
        scale = scale.reshape((1,) * (x.ndim - 1) + (-1,))
        return scale.astype(self.dtype) * h.astype(self.dtype)


def layer_norm(eps: float, dtype, param_dtype, name: str):
    """``nn.LayerNorm`` (parameters ``scale`` and ``bias``; Flax computes its statistics in at
    least float32)."""
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False, name=name)


# -- rotary position embeddings -------------------------------------------------------------------

# transformers' keys of each rope_type (RotaryEmbeddingConfigMixin._validate_<type>_rope_parameters) besides
# rope_type and rope_theta: (required, optional). Keys outside them are ignored, as transformers ignores them.
ROPE_KEYS = {
    "default": ((), ()),
    "linear": (("factor",), ()),
    "dynamic": (("factor",), ()),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"), ()),
    "yarn": (("factor", "original_max_position_embeddings"),
             ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate")),
    "longrope": (("short_factor", "long_factor", "original_max_position_embeddings"), ("attention_factor", "factor")),
}
# the types whose frequencies depend on the length of the call (transformers' dynamic_rope_update)
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def rope_kind(scaling: Optional[dict]) -> str:
    """The ``rope_type`` of ``scaling`` (an older file's ``type`` key read as it; ``"default"`` for none)."""
    return (scaling or {}).get("rope_type", (scaling or {}).get("type", "default")) or "default"


def _default_inv_freq(head_dim: int, theta: float):
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
    return inv.astype(np.float32)


def _yarn_mscale(scale, mscale=1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _scaled_factor(scaling: dict, max_position_embeddings) -> float:
    """``factor``, or (yarn, longrope without one) ``max_position_embeddings / original_max_position_embeddings``."""
    factor = scaling.get("factor")
    if factor is None:
        factor = max_position_embeddings / scaling["original_max_position_embeddings"]
    return float(factor)


def rope_attention_factor(scaling: Optional[dict], max_position_embeddings: Optional[int] = None) -> float:
    """The factor transformers multiplies ``cos`` and ``sin`` by (its ``attention_scaling``): 1 but for
    yarn (``attention_factor``, else ``0.1 ln(factor) + 1``, or the ratio of ``mscale`` to
    ``mscale_all_dim``'s when both are set) and longrope (``attention_factor``, else
    ``sqrt(1 + ln(factor) / ln(original_max_position_embeddings))`` when ``factor > 1``)."""
    kind = rope_kind(scaling)
    if kind not in ("yarn", "longrope"):
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = _scaled_factor(scaling, max_position_embeddings)
    if kind == "yarn":
        mscale, all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and all_dim:
            return float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, all_dim))
        return _yarn_mscale(factor)
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(factor) / math.log(scaling["original_max_position_embeddings"]))


def _yarn_inv_freq(head_dim: int, theta: float, scaling: dict, max_position_embeddings):
    f32 = np.float32
    dim = head_dim
    factor = _scaled_factor(scaling, max_position_embeddings)
    original = scaling["original_max_position_embeddings"]
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations):
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no zero-width ramp
    pos = (theta ** (np.arange(0, dim, 2).astype(f32) / f32(dim))).astype(f32)
    extrapolation = (f32(1) / pos).astype(f32)
    interpolation = (f32(1) / (f32(factor) * pos)).astype(f32)
    ramp = np.clip((np.arange(dim // 2, dtype=f32) - f32(low)) / f32(high - low), 0, 1).astype(f32)
    keep = (f32(1) - ramp).astype(f32)  # the extrapolation's share
    return (interpolation * (f32(1) - keep) + extrapolation * keep).astype(f32)


def _longrope_inv_freq(head_dim: int, theta: float, factors):
    shape = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (np.float32(1) / (np.asarray(factors, np.float32) * (theta ** shape).astype(np.float32))).astype(np.float32)


def _dynamic_inv_freq(head_dim: int, theta: float, factor: float, max_position_embeddings: int, seq_len):
    """Dynamic NTK frequencies for ``seq_len`` positions (a traced scalar is fine), in float32 as
    transformers computes them once the length grows past ``max_position_embeddings``."""
    n = jnp.maximum(jnp.asarray(seq_len, jnp.int32), max_position_embeddings).astype(jnp.float32)
    base = theta * ((factor * n / max_position_embeddings) - (factor - 1)) ** (head_dim / (head_dim - 2))
    exps = jnp.asarray(np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim))
    return 1.0 / (base ** exps)


def rope_inv_freq(head_dim: int, theta: float, scaling: Optional[dict], max_position_embeddings: Optional[int] = None,
                  seq_len=None) -> Any:
    """Inverse frequencies ``[head_dim // 2]`` (float32) of ``rope_type`` default, linear, llama3,
    yarn, longrope or dynamic, as transformers 5 computes them (``ROPE_INIT_FUNCTIONS``).

    ``seq_len`` is the length of the call (``max(position_ids) + 1`` over the batch; ``None``: a
    short one), which only longrope (its ``long_factor`` past ``original_max_position_embeddings``,
    else ``short_factor``) and dynamic NTK (a larger base past ``max_position_embeddings``) read;
    a traced scalar gives a traced result. ``max_position_embeddings`` is needed by dynamic, and
    by yarn and longrope without a ``factor``. The factor ``cos`` and ``sin`` are then multiplied
    by is :func:`rope_attention_factor`."""
    kind = rope_kind(scaling)
    if kind in ("yarn", "longrope", "dynamic") and max_position_embeddings is None:
        # a family computing cos/sin by hand would drop the attention factor and the length of the call
        raise ConfigError(f"rope_type {kind!r} needs max_position_embeddings, and its cos/sin an attention factor "
                          "or the call's length: compute them with jpeft.models._layers.rotary(position_ids, config).")
    inv = _default_inv_freq(head_dim, theta)
    if kind == "default":
        return inv
    if kind == "linear":
        return (inv / np.float32(scaling["factor"])).astype(np.float32)
    if kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling["low_freq_factor"])
        high = float(scaling["high_freq_factor"])
        old = float(scaling["original_max_position_embeddings"])
        low_wl, high_wl = old / low, old / high
        wavelen = (2 * math.pi / inv).astype(np.float32)
        inv_l = np.where(wavelen > low_wl, inv / np.float32(factor), inv).astype(np.float32)
        smooth = ((old / wavelen - low) / (high - low)).astype(np.float32)
        smoothed = ((1 - smooth) * inv_l / np.float32(factor) + smooth * inv_l).astype(np.float32)
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        return np.where(medium, smoothed, inv_l).astype(np.float32)
    if kind == "yarn":
        return _yarn_inv_freq(head_dim, theta, scaling, max_position_embeddings)
    if kind == "longrope":
        short = _longrope_inv_freq(head_dim, theta, scaling["short_factor"])
        if seq_len is None:
            return short
        long = _longrope_inv_freq(head_dim, theta, scaling["long_factor"])
        return jnp.where(seq_len > scaling["original_max_position_embeddings"], long, short)
    if kind == "dynamic":
        if seq_len is None:
            return inv
        grown = _dynamic_inv_freq(head_dim, theta, float(scaling["factor"]), max_position_embeddings, seq_len)
        return jnp.where(seq_len > max_position_embeddings, grown, inv)
    raise UnsupportedModelError(
        f"rope_type {kind!r} is not supported; jpeft implements {', '.join(repr(k) for k in ROPE_KEYS)}."
    )


def rope_cos_sin(position_ids: Array, inv_freq, attention_factor: float = 1.0) -> tuple[Array, Array]:
    """``cos, sin`` of shape ``[batch, seq, head_dim]`` in float32 (Hugging Face layout: the
    frequencies repeated twice, for ``rotate_half``), times ``attention_factor``."""
    inv = jnp.asarray(inv_freq, jnp.float32).reshape((1,) * position_ids.ndim + (-1,))
    freqs = position_ids.astype(jnp.float32)[..., None] * inv
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    if attention_factor == 1.0:
        return jnp.cos(emb), jnp.sin(emb)
    return jnp.cos(emb) * attention_factor, jnp.sin(emb) * attention_factor


def rotary(position_ids: Array, config, attention_mask: Optional[Array] = None) -> tuple[Array, Array]:
    """``cos, sin`` (:func:`rope_cos_sin`) of a Llama-family ``config`` (its ``head_dim``,
    ``rope_theta``, ``rope_scaling_dict`` and ``max_position_embeddings``) at ``position_ids``:
    the one rotary embedding of every family. For dynamic NTK and longrope the frequencies are
    those of the call's length, ``max(position_ids) + 1`` over the batch's real tokens (those
    ``attention_mask`` marks), as transformers' ``dynamic_rope_update`` reads its
    ``position_ids``, computed on device, so one compiled step serves every length. Padding is
    left out so that it changes no row: a packed row's padding tail restarts its positions (as
    a document of its own) and would otherwise pick the long frequencies for every document."""
    scaling = config.rope_scaling_dict
    mpe = config.max_position_embeddings
    seq_len = None
    if rope_kind(scaling) in LENGTH_DEPENDENT_ROPE:
        real = position_ids if attention_mask is None else jnp.where(attention_mask.astype(bool), position_ids, 0)
        seq_len = jnp.max(real) + 1
    inv = rope_inv_freq(config.head_dim, config.rope_theta, scaling, mpe, seq_len)
    return rope_cos_sin(position_ids, inv, rope_attention_factor(scaling, mpe))


def rope_fixed_length(config) -> Optional[int]:
    """The longest call (``max(position_ids) + 1``) whose rotary frequencies are those of every
    shorter one: longrope's ``original_max_position_embeddings`` (its short factors), dynamic
    NTK's ``max_position_embeddings`` (its unscaled base); ``None`` where the frequencies never
    depend on the length (every other type, and models without ``rope_scaling``). Past it, a
    prompt fed in chunks, or rows of different requests decoded together, are rotated
    differently from one call over the whole prompt (``jpeft.generate``, transformers)."""
    scaling = getattr(config, "rope_scaling_dict", None)
    kind = rope_kind(scaling)
    if kind == "longrope":
        return int(scaling["original_max_position_embeddings"])
    if kind == "dynamic":
        return int(config.max_position_embeddings)
    return None


def check_rope_scaling(scaling: Optional[dict], head_dim: int, theta: float, max_position_embeddings: int,
                       what: str) -> None:
    """Raises :class:`~jpeft.errors.ConfigError` for rope parameters transformers refuses (a
    required key missing) or that give meaningless frequencies (a factor that is not a positive
    number, longrope factors of the wrong length), and
    :class:`~jpeft.errors.UnsupportedModelError` for a rope type jpeft does not implement."""
    if not scaling:
        return
    kind = rope_kind(scaling)
    if kind not in ROPE_KEYS:
        rope_inv_freq(head_dim, theta, scaling, max_position_embeddings)  # the UnsupportedModelError
    required, _ = ROPE_KEYS[kind]
    missing = [k for k in required if k not in scaling]
    if missing:
        raise ConfigError(
            f"{what}.rope_scaling of rope_type {kind!r} lacks {missing[0]!r} (transformers requires "
            f"{', '.join(required)}); found {scaling}. Add it (as in the model's config.json rope_parameters)."
        )
    prf = scaling.get("partial_rotary_factor")
    if prf is not None and float(prf) != 1.0:
        raise UnsupportedModelError(
            f"{what}.rope_scaling has partial_rotary_factor {prf!r}; jpeft's Llama-family models rotate the whole "
            "head (transformers' Llama, Mistral and Qwen2 cannot run a partial rotation either). Remove it or set 1.0."
        )
    known = set(ROPE_KEYS[kind][0]) | set(ROPE_KEYS[kind][1])
    positive = ["factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings", "attention_factor"]
    for key in (k for k in positive if k in known):
        v = scaling.get(key)
        if key in scaling and v is None and key in required and key != "factor":
            raise ConfigError(f"{what}.rope_scaling {key} is null for rope_type {kind!r}; give a positive number.")
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0):
            raise ConfigError(f"{what}.rope_scaling {key} must be positive (a number), found {v!r} (rope_type {kind!r}).")
    for key in (k for k in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim") if k in known):
        v = scaling.get(key)  # null or 0: transformers' default (beta_fast 32, beta_slow 1; no mscale)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
            raise ConfigError(f"{what}.rope_scaling {key} must be a number >= 0 or null, found {v!r} (rope_type {kind!r}).")
    if kind in ("linear", "dynamic", "llama3") and scaling.get("factor") is None:
        raise ConfigError(f"{what}.rope_scaling factor is null for rope_type {kind!r}; give a positive number.")
    if kind == "longrope":
        for key in ("short_factor", "long_factor"):
            v = scaling[key]
            ok = isinstance(v, (list, tuple)) and all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0
                                                      for x in v)
            if not ok or len(v) != head_dim // 2:
                raise ConfigError(
                    f"{what}.rope_scaling {key} must be a list of head_dim // 2 = {head_dim // 2} positive numbers "
                    f"(one per rotary frequency), found {v!r}."
                )
    for seq_len in ((None,) if kind not in LENGTH_DEPENDENT_ROPE else (None, 2 * max_position_embeddings + 2)):
        try:
            inv = np.asarray(rope_inv_freq(head_dim, theta, scaling, max_position_embeddings, seq_len))
            finite = np.all(np.isfinite(inv)) and np.isfinite(rope_attention_factor(scaling, max_position_embeddings))
        except (ZeroDivisionError, ValueError, OverflowError):  # e.g. an original length of 1: log(1) divides
            finite = False
        if not finite:
            raise ConfigError(f"{what}.rope_scaling {scaling} gives non-finite rotary frequencies; check its values.")


def _rotate_half(x):
    h = x.shape[-1] // 2
    return jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotates ``x: [batch, seq, heads, head_dim]`` (cos/sin cast to ``x``'s dtype, as HF does)."""
    c = cos[:, :, None, :].astype(x.dtype)
    s = sin[:, :, None, :].astype(x.dtype)
    return x * c + _rotate_half(x) * s


# -- key/value cache ------------------------------------------------------------------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Key/value cache for decoding, a pytree (jit and ``lax`` loops carry it).

    Attributes:
      keys, values: one array per layer, ``[batch, max_length, num_kv_heads, head_dim]``
        (a tuple), or for a layer-scanned model (``scan_layers=True``) one stacked array
        ``[num_layers, batch, max_length, num_kv_heads, head_dim]``.
      mask: ``[batch, max_length]`` bool, True where a slot holds a real (non-padding) token.
      index: int32 scalar, the next slot to write; or int32 ``[batch]``, each row's own next
        slot (rows written at different offsets, as a continuous-batching server keeps them:
        ``jpeft.serve``). The caller keeps ``index + seq_len <= max_length``.
    """

    keys: tuple
    values: tuple
    mask: Array
    index: Array

    @property
    def max_length(self) -> int:
        return int(self.mask.shape[1])


def init_cache(config, batch_size: int, max_length: int, dtype=None) -> KVCache:
    """An empty :class:`KVCache` for a decoder ``config`` (a jpeft model config).

    >>> import jpeft
    >>> cfg = jpeft.models.LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16,
    ...                                num_layers=2, num_heads=2, num_kv_heads=1)
    >>> c = jpeft.models.init_cache(cfg, batch_size=3, max_length=5)
    >>> len(c.keys), c.keys[0].shape, c.mask.shape
    (2, (3, 5, 1, 4), (3, 5))
    """
    dtype = dtype or config.dtype
    shape = (batch_size, max_length, config.num_kv_heads, config.head_dim)
    if getattr(config, "scan_layers", False):
        ks = jnp.zeros((config.num_layers,) + shape, dtype)
        vs = jnp.zeros((config.num_layers,) + shape, dtype)
    else:
        ks = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
        vs = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
    return KVCache(ks, vs, jnp.zeros((batch_size, max_length), bool), jnp.zeros((), jnp.int32))


def _row_index(index: Array) -> Array:
    """A cache index as a column broadcastable against ``[batch, seq]`` (scalar stays scalar)."""
    index = jnp.asarray(index)
    return index if index.ndim == 0 else index[:, None]


def write_at(buf: Array, update: Array, index: Array) -> Array:
    """``buf[:, index:index + seq] = update`` along axis 1 (``buf: [batch, length, ...]``), with
    one ``index`` for every row (a scalar) or one per row (``[batch]``)."""
    index = jnp.asarray(index)
    if index.ndim == 0:
        return jax.lax.dynamic_update_slice(buf, update, (0, index) + (0,) * (buf.ndim - 2))
    row = lambda b, u, i: jax.lax.dynamic_update_slice(b, u, (i,) + (0,) * (b.ndim - 1))  # noqa: E731
    return jax.vmap(row)(buf, update, index)


# -- masks and positions ----------------------------------------------------------------------------

def padding_ids_in_range(input_ids, attention_mask, vocab_size: Optional[int]):
    """``input_ids`` with the ids at padded positions (``attention_mask`` 0) clipped into the
    vocabulary. :func:`check_ids_mask` does not check padding (a collator's ``-100``), but the
    embedding lookup still runs there, and an out-of-range id gives NaN, which the attention
    carried into the real tokens (``0 * NaN``). Real positions are left as they are."""
    if input_ids is None or attention_mask is None or vocab_size is None \
            or tuple(attention_mask.shape) != tuple(input_ids.shape):
        return input_ids
    return jnp.where(attention_mask.astype(bool), input_ids, jnp.clip(input_ids, 0, int(vocab_size) - 1))


def check_ids_mask(input_ids, attention_mask, inputs_embeds, what: str, vocab_size: Optional[int] = None,
                   hidden_size: Optional[int] = None):
    """Validates the input triple; returns ``(batch, seq)``. When ``vocab_size`` is given and
    the ids are concrete (a call outside ``jit``), real tokens outside ``[0, vocab_size)`` raise:
    the embedding gather would silently clamp them to another row (issue 16). ``inputs_embeds``
    of another width than ``hidden_size`` (when given) raise."""
    if input_ids is None and inputs_embeds is None:
        raise InputValidationError(f"{what}: pass input_ids [batch, seq] (or inputs_embeds [batch, seq, hidden]).")
    for name, x in (("input_ids", input_ids), ("attention_mask", attention_mask), ("inputs_embeds", inputs_embeds)):
        if x is not None and not isinstance(x, (np.ndarray, jax.Array)):
            # a tokenizer's lists or a torch tensor failed with a raw AttributeError ('list' object has no
            # attribute 'ndim') or TypeError (Cannot interpret 'torch.int64' as a data type)
            raise InputValidationError(
                f"{what}: {name} must be a numpy or JAX array, found {type(x).__module__}.{type(x).__qualname__}. "
                "Convert it with jnp.asarray(...) (a torch tensor with .numpy() first), or ask the tokenizer for "
                "arrays: tokenizer(texts, return_tensors='np')."
            )
    if input_ids is not None and inputs_embeds is not None:
        raise InputValidationError(f"{what}: pass either input_ids or inputs_embeds, not both.")
    if inputs_embeds is not None:
        if inputs_embeds.ndim != 3:
            raise InputValidationError(
                f"{what}: inputs_embeds must be [batch, seq, hidden], found shape {tuple(inputs_embeds.shape)}."
            )
        if hidden_size is not None and inputs_embeds.shape[-1] != hidden_size:
            # a raw TypeError ('mul got incompatible shapes') deep in the first layer before
            raise InputValidationError(
                f"{what}: inputs_embeds must be [batch, seq, hidden] with the model's hidden size {hidden_size}, "
                f"found shape {tuple(inputs_embeds.shape)}."
            )
        b, s = inputs_embeds.shape[:2]
    else:
        if input_ids.ndim != 2:
            raise InputValidationError(
                f"{what}: input_ids must be [batch, seq], found shape {tuple(input_ids.shape)}; "
                "add a batch axis with input_ids[None]."
            )
        if not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise InputValidationError(f"{what}: input_ids must be integers, found dtype {input_ids.dtype}.")
        b, s = input_ids.shape
        concrete = not any(isinstance(x, jax.core.Tracer) for x in (input_ids, attention_mask))
        if vocab_size is not None and concrete:
            ids = np.asarray(input_ids)
            if attention_mask is not None and tuple(np.shape(attention_mask)) == ids.shape:
                ids = np.where(np.asarray(attention_mask).astype(bool), ids, 0)  # padding never reaches a row
            check_token_ids(ids, int(vocab_size), name=f"{what}: input_ids")
    if attention_mask is not None and tuple(attention_mask.shape) != (b, s):
        raise InputValidationError(
            f"{what}: attention_mask must have the shape of the inputs ({b}, {s}), found {tuple(attention_mask.shape)}."
        )
    return b, s


def learned_positions(position_ids: Array, attention_mask: Array, n_positions: int, what: str) -> Array:
    """Position ids for a learned position table of ``n_positions`` rows (GPT-2's ``wpe``,
    BERT's ``position_embeddings``).

    The gather gives NaN past the table (transformers raises ``IndexError``), so when the ids
    are concrete (a call outside ``jit``) a real token's position outside ``[0, n_positions)``
    raises; padded positions (``attention_mask`` 0) are clipped into the table, as
    :func:`padding_ids_in_range` does for token ids, so that their NaN cannot reach the real
    tokens through the attention."""
    mask = attention_mask.astype(bool)
    if not any(isinstance(x, jax.core.Tracer) for x in (position_ids, attention_mask)):
        pos = np.where(np.asarray(mask), np.asarray(position_ids), 0)
        bad = (pos < 0) | (pos >= n_positions)
        if bad.any():
            at = tuple(int(i) for i in np.argwhere(bad)[0])
            raise InputValidationError(
                f"{what}: position_ids holds {int(pos[at])} at {at}, outside the model's {n_positions} learned "
                f"positions [0, {n_positions}) (max_position_embeddings); the lookup would give NaN. Pass positions "
                f"below {n_positions}, or shorten the sequences."
            )
    return jnp.where(mask, position_ids, jnp.clip(position_ids, 0, n_positions - 1))


def window_slots(kv_valid: Array) -> Array:
    """``[batch, length]`` int32: each cache slot's place for a sliding window, its index less
    the padding slots between the row's first real token and it.

    A right-padded prompt leaves its padding in the cache between its last real token and the
    generated ones; counted as slots, it would take places in the window that belong to real
    tokens (a generated token would see fewer prompt tokens than the same prompt unpadded).
    Leading padding (left padding) still counts, as Hugging Face counts it (it only ever lies
    before every real token, where it changes nothing but how far a prefix reaches). Padding
    slots are masked whatever their place; the real slots keep their order, so causality is
    unchanged.

    >>> import jax.numpy as jnp
    >>> window_slots(jnp.array([[1, 1, 0, 0, 1, 1], [0, 0, 1, 1, 1, 0]], bool)).tolist()
    [[0, 1, 2, 2, 2, 3], [0, 1, 2, 3, 4, 5]]
    """
    pad = ~kv_valid
    pads_before = jnp.cumsum(pad, axis=1, dtype=jnp.int32) - pad.astype(jnp.int32)
    first_real = jnp.argmax(kv_valid, axis=1)[:, None].astype(jnp.int32)
    slots = jnp.arange(kv_valid.shape[1], dtype=jnp.int32)[None, :]
    return slots - jnp.maximum(pads_before - first_real, 0)


def causal_mask(attention_mask: Array, cache: Optional[KVCache], sliding_window: Optional[int] = None, *,
                segment_ids: Optional[Array] = None, padded: bool = True):
    """The :class:`AttentionMask` of causal attention over the current tokens (no cache) or
    over all cache slots (with a cache), plus the updated slot mask.

    Args:
      attention_mask: ``[batch, seq]``, True/1 for real tokens.
      cache: the :class:`KVCache` being extended, or None.
      sliding_window: window width of a sliding-attention layer.
      segment_ids: ``[batch, seq]`` document ids of packed rows (block-diagonal causal
        attention; the window counts slots inside each document). A document is one
        contiguous run of an id (as :func:`jpeft.data.pack_documents` makes them): slots
        restart wherever the id changes, and an id that comes back after another starts a new
        document (:func:`segment_runs`). Not with a cache.
      padded: False when the caller passed no attention mask (every token is real).

    Returns:
      ``(mask, kv_valid)``, ``kv_valid`` being the cache's new slot mask (or ``attention_mask``).
    """
    b, s = attention_mask.shape
    valid = attention_mask.astype(bool)
    q_seg = None
    if cache is None:
        kv_valid = valid
        if segment_ids is not None:
            q_pos = segment_slots(segment_ids.astype(jnp.int32))
            q_seg = segment_runs(segment_ids.astype(jnp.int32))
        else:
            q_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        k_pos = q_pos
    else:
        if segment_ids is not None:
            raise InputValidationError(
                "segment_ids (packed documents) cannot be combined with a KV cache; decode one document per row."
            )
        kv_valid = write_at(cache.mask, valid, cache.index)
        q_slot = jnp.broadcast_to(_row_index(cache.index) + jnp.arange(s, dtype=jnp.int32)[None], (b, s))
        k_pos = jnp.broadcast_to(jnp.arange(cache.mask.shape[1], dtype=jnp.int32), (b, cache.mask.shape[1]))
        q_pos = q_slot
        if sliding_window is not None:
            k_pos = window_slots(kv_valid)
            q_pos = jnp.take_along_axis(k_pos, q_slot, axis=1)
        padded = True
    mask = AttentionMask(kv_valid, q_pos, k_pos, q_seg, q_seg, causal=True, window=sliding_window, padded=padded,
                         diagonal=0 if cache is None else None)
    return mask, kv_valid


def bidirectional_mask(attention_mask: Array, *, segment_ids: Optional[Array] = None,
                       padded: bool = True) -> AttentionMask:
    """The :class:`AttentionMask` of an encoder (every real token sees every real token of
    its segment)."""
    b, s = attention_mask.shape
    pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    seg = None if segment_ids is None else segment_runs(segment_ids.astype(jnp.int32))
    return AttentionMask(attention_mask.astype(bool), pos, pos, seg, seg, causal=False, window=None, padded=padded)


# -- attention -------------------------------------------------------------------------------------------

def check_prefix(prefix_kv, batch: int, num_kv_heads: int, head_dim: int, path: str = "attention"):
    if prefix_kv is None:
        return None
    if not isinstance(prefix_kv, (tuple, list)) or len(prefix_kv) != 2:
        raise InputValidationError(
            f"{path}: prefix_kv must be a pair (k, v) of arrays [batch, n_prefix, num_kv_heads, head_dim], "
            f"found {type(prefix_kv).__name__}."
        )
    pk, pv = prefix_kv
    for name, a in (("k", pk), ("v", pv)):
        if a.ndim != 4 or a.shape[0] not in (1, batch) or tuple(a.shape[2:]) != (num_kv_heads, head_dim):
            raise InputValidationError(
                f"{path}: prefix {name} must be [batch, n_prefix, {num_kv_heads}, {head_dim}] (batch {batch} or 1), "
                f"found {tuple(a.shape)}."
            )
    if pk.shape[1] != pv.shape[1]:
        raise InputValidationError(f"{path}: prefix k and v have different lengths {pk.shape[1]} and {pv.shape[1]}.")
    return pk, pv


def attention_dropout_key(module: nn.Module, rate: float, deterministic: bool):
    """The key of a layer's attention-probability dropout: drawn from the module's
    ``"dropout"`` rng stream when training (``deterministic=False``) with ``rate > 0``, else
    ``None`` (no dropout, no rng needed)."""
    if deterministic or not rate:
        return None
    return module.make_rng("dropout")


def attend(q, k, v, mask: AttentionMask, *, scale: float, cache_layer=None, prefix_kv=None, dtype=jnp.float32,
           implementation: str = "auto", block_size: int = 0, dropout_rate: float = 0.0, dropout_key=None):
    """Scaled dot-product attention with an optional cache write and an optional prefix.

    Args:
      q: ``[batch, q_len, heads, head_dim]``; k, v: ``[batch, q_len, kv_heads, head_dim]``.
      mask: the :class:`AttentionMask` over the current keys (or all cache slots).
      cache_layer: ``(k_cache, v_cache, index)`` or ``None``.
      prefix_kv: ``(k, v)`` ``[batch, n_prefix, kv_heads, head_dim]``, attended by every query
        (inside the sliding window, if the layer has one: the prefix sits before slot 0).
      implementation, block_size: the kernel and its block (0: automatic; :mod:`jpeft.models._attention`).
      dropout_rate, dropout_key: attention-probability dropout, active when both are set.

    Returns:
      ``(out [batch, q_len, heads, head_dim], (k_cache, v_cache) or None)``.
    """
    new_cache = None
    plain = not mask.padded and mask.q_seg is None and cache_layer is None and prefix_kv is None
    if cache_layer is not None:
        kc, vc, idx = cache_layer
        kc = write_at(kc, k.astype(kc.dtype), idx)
        vc = write_at(vc, v.astype(vc.dtype), idx)
        new_cache = (kc, vc)
        k, v = kc.astype(dtype), vc.astype(dtype)
    b = q.shape[0]
    if prefix_kv is not None:
        pk, pv = prefix_kv
        pk = jnp.broadcast_to(pk, (b,) + tuple(pk.shape[1:])).astype(k.dtype)
        pv = jnp.broadcast_to(pv, (b,) + tuple(pv.shape[1:])).astype(v.dtype)
        k = jnp.concatenate([pk, k], axis=1)
        v = jnp.concatenate([pv, v], axis=1)
        mask = mask.with_prefix(pk.shape[1])
    out = dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, scale=scale,
                                implementation=implementation, block_size=block_size, plain=plain,
                                dropout_rate=dropout_rate, dropout_key=dropout_key)
    return out, new_cache


class Embed(nn.Embed):
    """``nn.Embed`` whose ``attend`` (a tied output projection, ``query @ embedding.T``)
    multiplies over flattened tokens, as :func:`flat_dot_general` does for Dense layers: the
    embedding's gradient through the logits then needs no transposed copy of the logits'
    gradient (the largest activation of a language model). Same parameters and numbers as
    ``nn.Embed``; adapters intercepting ``attend`` see the query unchanged (so it computes what
    ``nn.Embed.attend`` does: ``same_function_as_base``, read by the linear adapters)."""

    same_function_as_base: ClassVar[tuple] = ("attend",)

    def attend(self, query):
        query, embedding = self.promote_dtype(query, self.embedding, dtype=self.dtype)
        return flat_dot_general(query, embedding.T, (((query.ndim - 1,), (0,)), ((), ())))


def dense(features: int, use_bias: bool, cfg, name: str):
    """``nn.Dense`` with the config's dtypes, normal(initializer_range) kernels and
    :func:`flat_dot_general` (the product over flattened tokens)."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        kernel_init=nn.initializers.normal(cfg.initializer_range),
        dot_general=flat_dot_general,
        name=name,
    )


def is_policy_name(name) -> bool:
    """Whether ``jax.checkpoint_policies.<name>`` is a policy itself (``dots_saveable``), not a
    function that builds one from arguments (``save_only_these_names``), which the config
    cannot pass: used as a policy it fails inside JAX's tracing with a TypeError."""
    fn = getattr(jax.checkpoint_policies, name, None) if isinstance(name, str) and not name.startswith("_") else None
    if not callable(fn):
        return False
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def remat_wrap(cls, cfg, static_argnums: Sequence[int]):
    """``nn.remat(cls)`` with ``cfg.remat_policy`` when ``cfg.remat``; otherwise ``cls``."""
    if not cfg.remat:
        return cls
    policy = None
    if cfg.remat_policy and cfg.remat_policy != "full":  # "full": keep only each layer's input, as jpeft.remat_policy
        policy = getattr(jax.checkpoint_policies, cfg.remat_policy, None) if is_policy_name(cfg.remat_policy) else None
        if policy is None:
            raise ConfigError(
                f"remat_policy {cfg.remat_policy!r} is not a jax.checkpoint_policies name; try "
                "'nothing_saveable', 'dots_saveable' or 'dots_with_no_batch_dims_saveable'."
            )
    return nn.remat(cls, policy=policy, static_argnums=tuple(static_argnums))


def scan_layers(layer_cls, num_layers: int):
    """``nn.scan`` of a decoder layer over ``num_layers`` layers whose params (and jpeft's
    stacked adapter arrays) carry a leading layer axis. The layer is called as
    ``layer(hidden, mask, rope, kv, prefix_kv, deterministic, cache_index)`` with ``kv`` and
    ``prefix_kv`` stacked per layer (or ``None``) and returns ``(hidden, new_kv_or_None)``."""
    return nn.scan(
        layer_cls,
        variable_axes={"params": 0, COLLECTION: 0, "intermediates": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, nn.broadcast, 0, 0, nn.broadcast, nn.broadcast),
        length=num_layers,
    )


def run_scanned(layers, hidden, mask, rope, cache, kv_valid, prefix_kv, deterministic):
    """Runs a :func:`scan_layers` stack: stacks per-layer caches / prefixes for the scan and
    returns ``(hidden, new_cache_or_None)`` with the cache in the form it was given (a tuple
    per layer or one stacked array)."""
    kv = None
    if cache is not None:
        as_tuple = isinstance(cache.keys, (tuple, list))
        kv = (jnp.stack(cache.keys), jnp.stack(cache.values)) if as_tuple else (cache.keys, cache.values)
    pre = None
    if prefix_kv is not None:
        pre = (jnp.stack([p[0] for p in prefix_kv]), jnp.stack([p[1] for p in prefix_kv]))
    hidden, new = layers(hidden, mask, rope, kv, pre, deterministic, None if cache is None else cache.index)
    if cache is None:
        return hidden, None
    ks, vs = new
    if as_tuple:
        ks, vs = tuple(ks), tuple(vs)
    return hidden, KVCache(ks, vs, kv_valid, cache.index + hidden.shape[1])


# -- decoder plumbing shared by the families ------------------------------------------------------

def decoder_inputs(input_ids, attention_mask, inputs_embeds, position_ids, cache, embeds, what, segment_ids=None):
    """Shared prologue of the decoders: embeddings, the mask and the positions.

    If the embedding module returns more positions than ``input_ids`` has (an input-site
    adapter prepending virtual tokens), the extra leading positions are treated as real
    tokens: the mask gets leading ones and default positions are recomputed.

    With ``segment_ids`` (packed documents, ``[batch, seq]`` int, 0 or any id for padding
    that ``attention_mask`` marks) default positions restart at 0 in every document.

    Returns:
      ``(hidden, attention_mask, position_ids, padded)``, ``padded`` being False when no
      attention mask was given (every token is real, known at trace time).
    """
    vocab = getattr(embeds, "num_embeddings", None)
    b, s = check_ids_mask(input_ids, attention_mask, inputs_embeds, what, vocab, getattr(embeds, "features", None))
    input_ids = padding_ids_in_range(input_ids, attention_mask, vocab)
    hidden = embeds(input_ids) if inputs_embeds is None else inputs_embeds
    padded = attention_mask is not None
    if attention_mask is None:
        attention_mask = jnp.ones((b, s), bool)
    if segment_ids is not None:
        if tuple(segment_ids.shape) != (b, s) or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise InputValidationError(
                f"{what}: segment_ids must be integers of shape {(b, s)} (one document id per token), "
                f"found {segment_ids.dtype} {tuple(segment_ids.shape)}."
            )
    n_extra = hidden.shape[1] - s
    if n_extra:
        if segment_ids is not None:
            raise InputValidationError(
                f"{what}: the embeddings have {n_extra} more positions than input_ids (virtual tokens of prompt "
                "tuning, prepended once per row), which cannot be shared by packed documents; pass no "
                "segment_ids (in `jpeft train`, set packing = \"stream\" in [data])."
            )
        attention_mask = jnp.concatenate([jnp.ones((b, n_extra), attention_mask.dtype), attention_mask], axis=1)
        if position_ids is not None:
            raise InputValidationError(
                f"{what}: the embeddings have {n_extra} more positions than input_ids (virtual tokens), "
                "so explicit position_ids cannot be used; leave position_ids=None."
            )
    if position_ids is None:
        if segment_ids is not None:
            position_ids = segment_slots(segment_ids.astype(jnp.int32))
        else:
            position_ids = default_positions(attention_mask, cache)
    elif tuple(position_ids.shape) != tuple(attention_mask.shape):
        raise InputValidationError(
            f"{what}: position_ids must have shape {tuple(attention_mask.shape)}, found {tuple(position_ids.shape)}."
        )
    return hidden, attention_mask, position_ids, padded


def check_prefix_count(prefix_kv, num_layers: int) -> None:
    """``prefix_kv`` (prefix tuning's per-layer keys and values) must hold one pair per layer."""
    if prefix_kv is not None and len(prefix_kv) != num_layers:
        raise InputValidationError(
            f"prefix_kv must hold one (k, v) pair per layer ({num_layers}), found {len(prefix_kv)}."
        )


def run_unrolled(layers, hidden, cache, kv_valid, call):
    """Runs an unrolled layer list, threading the key/value cache: ``call(i, layer, hidden,
    layer_cache)`` returns the layer's output (``(hidden, (k, v))`` when a cache is given).
    Returns ``(hidden, new_cache_or_None)``, as :func:`run_scanned` does for a scanned stack."""
    new_k, new_v = [], []
    for i, layer in enumerate(layers):
        layer_cache = None if cache is None else (cache.keys[i], cache.values[i], cache.index)
        out = call(i, layer, hidden, layer_cache)
        if cache is None:
            hidden = out
        else:
            hidden, (kc, vc) = out
            new_k.append(kc)
            new_v.append(vc)
    if cache is None:
        return hidden, None
    return hidden, KVCache(tuple(new_k), tuple(new_v), kv_valid, cache.index + hidden.shape[1])


class CausalLM(nn.Module):
    """The causal language-model wrapper every decoder family shares: a trunk module (the
    attribute ``trunk_name``, of class ``trunk_class``, returning ``(hidden, new_cache)``) and
    the output layer: the trunk's input embedding (attribute ``embed_name``) transposed when
    ``tie_word_embeddings``, else ``lm_head``. A family subclasses it with its config field
    and the three names (their Hugging Face module names)."""

    trunk_name: ClassVar[str]
    trunk_class: ClassVar[type]
    embed_name: ClassVar[str]
    # whether the trunk takes ``token_type_ids`` (GPT-2 adds ``wte(token_type_ids)``, as transformers
    # does); the other families have no token types and refuse them by name, not with a TypeError
    takes_token_type_ids: ClassVar[bool] = False

    def setup(self):
        setattr(self, self.trunk_name, self.trunk_class(self.config))
        if not self.config.tie_word_embeddings:
            self.lm_head = dense(self.config.vocab_size, False, self.config, "lm_head")

    def __call__(self, input_ids=None, attention_mask=None, *, inputs_embeds=None, position_ids=None,
                 segment_ids=None, cache=None, prefix_kv=None, deterministic=True, token_type_ids=None):
        hidden, new_cache = getattr(self, self.trunk_name)(
            input_ids, attention_mask, inputs_embeds=inputs_embeds, position_ids=position_ids,
            segment_ids=segment_ids, cache=cache, prefix_kv=prefix_kv, deterministic=deterministic,
            **self._token_types(token_type_ids),
        )
        logits = self.logits(hidden)
        return logits if cache is None else (logits, new_cache)

    def hidden_states(self, input_ids=None, attention_mask=None, *, inputs_embeds=None, position_ids=None,
                      segment_ids=None, prefix_kv=None, deterministic=True, token_type_ids=None):
        """The final hidden states ``[batch, seq, hidden]`` (after the last norm): the call
        without its output layer, so ``logits(hidden_states(...))`` is the call's output.
        :func:`jpeft.data.causal_lm_loss_chunked` takes the loss from here a few positions at a time."""
        return getattr(self, self.trunk_name)(
            input_ids, attention_mask, inputs_embeds=inputs_embeds, position_ids=position_ids,
            segment_ids=segment_ids, prefix_kv=prefix_kv, deterministic=deterministic,
            **self._token_types(token_type_ids),
        )[0]

    def _token_types(self, token_type_ids) -> dict:
        """The trunk's ``token_type_ids`` keyword, or :class:`InputValidationError` for a family without
        token types (a tokenizer's batch passed whole, ``model(**batch)``)."""
        if token_type_ids is None:
            return {}
        if not self.takes_token_type_ids:
            raise InputValidationError(
                f"{type(self).__name__} has no token type embeddings, so token_type_ids would change nothing "
                "(transformers' model ignores them); drop them from the batch, e.g. "
                "model(input_ids, attention_mask) instead of model(**batch)."
            )
        return {"token_type_ids": token_type_ids}

    def logits(self, hidden):
        """The output layer: ``[..., hidden] -> [..., vocab]`` (``lm_head``, or the input
        embedding's transpose when ``tie_word_embeddings``)."""
        if self.config.tie_word_embeddings:
            return getattr(getattr(self, self.trunk_name), self.embed_name).attend(hidden)
        return self.lm_head(hidden)

    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> KVCache:
        """An empty cache for ``batch_size`` sequences of up to ``max_length`` tokens."""
        return init_cache(self.config, batch_size, max_length, dtype)


# -- configs ---------------------------------------------------------------------------------------

class ConfigMethods:
    """Methods every model config (a frozen dataclass) shares."""

    def replace(self, **kw):
        """A copy with the given fields changed (validated again). A field that was derived from
        others when this config was made (left ``None``: a Llama's ``num_kv_heads`` and
        ``head_dim``, GPT-2's ``intermediate_size``) is derived again from the new values, as the
        constructor would, unless ``kw`` sets it."""
        for f in getattr(self, "_derived", ()):
            kw.setdefault(f, None)
        return dataclasses.replace(self, **kw)

    def _note_derived(self, *names: str) -> None:
        """Records which of ``names`` were left ``None`` (to be derived), for :meth:`replace`."""
        object.__setattr__(self, "_derived", tuple(n for n in names if getattr(self, n) is None))

    def _finish(self, name: str) -> None:
        """The end of ``__post_init__`` common to the families: special-token lists made tuples,
        dtypes made canonical, the shared checks (:func:`validate_common`) and the activation name."""
        for f in ("bos_token_id", "eos_token_id", "pad_token_id"):
            # a config.json list (Llama 3.1's eos ids; transformers' GPT2Config takes one too) as a tuple:
            # a list left the config unhashable, and jpeft.generate, whose model is a static argument, failed
            if isinstance(getattr(self, f, None), list):
                object.__setattr__(self, f, tuple(getattr(self, f)))
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype, f"{name}.dtype (the compute dtype)", COMPUTE_DTYPES))
        object.__setattr__(self, "param_dtype", canonical_dtype(self.param_dtype, f"{name}.param_dtype"))
        validate_common(self, name)
        check_activation(self.hidden_act)


class FullHeadsConfig(ConfigMethods):
    """A config whose attention gives every head its own keys and values, of width
    ``hidden_size // num_heads`` (GPT-2, BERT)."""

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


COMPUTE_DTYPES = ("float32", "bfloat16", "float16", "float64")  # the dtypes the models compute in


def canonical_dtype(x, what: str = "dtype", allowed=None):
    return check_float_dtype(x, what, allowed) if x is not None else None


def validate_common(cfg, name: str):
    """Checks shared by all configs (positive sizes, head divisibility)."""
    for f in ("vocab_size", "hidden_size", "num_layers", "num_heads"):
        v = getattr(cfg, f)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ConfigError(f"{name}.{f} must be a positive integer, found {v!r}.")
    for f in ("num_kv_heads", "head_dim", "intermediate_size", "max_position_embeddings", "type_vocab_size"):
        if not hasattr(cfg, f):  # type_vocab_size: BERT only
            continue
        v = getattr(cfg, f)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ConfigError(f"{name}.{f} must be a positive integer, found {v!r}.")
    if cfg.num_heads % cfg.num_kv_heads:
        raise ConfigError(
            f"{name}: num_heads ({cfg.num_heads}) must be a multiple of num_kv_heads ({cfg.num_kv_heads})."
        )
    if cfg.remat_policy not in (None, "full") and not is_policy_name(cfg.remat_policy):
        raise ConfigError(
            f"{name}.remat_policy {cfg.remat_policy!r} is not a jax.checkpoint_policies policy name (those that build "
            "a policy from arguments, like save_only_these_names, cannot be named here); try 'full' (as "
            "jpeft.remat_policy: keep only each layer's input), 'dots_saveable' or 'dots_with_no_batch_dims_saveable'."
        )
    check_implementation(cfg.attention, f"{name}.attention")
    for f in ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob"):  # Llama, GPT-2, BERT
        if hasattr(cfg, f):
            check_dropout(getattr(cfg, f), f"{name}.{f}")
    bs = cfg.attention_block_size
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 0:
        raise ConfigError(f"{name}.attention_block_size must be a positive integer or 0 (automatic), found {bs!r}.")
