"""Array operations below both jpeft's models and its adapter methods: the activation table,
the Dense product over flattened tokens (:func:`flat_dot_general`) and token positions
(:func:`segment_slots`, :func:`segment_runs`, :func:`default_positions`), and the float dtype
check (:func:`check_float_dtype`) that the model configs and :mod:`jpeft.parallel` share.

They live here rather than in :mod:`jpeft.models` because methods compute with them too (LoRA
recognises the models' Dense product, the bottleneck adapters look their non-linearity up in
the activation table, prefix tuning numbers its positions as the models do; the mesh code
below the models' loader checks dtypes as the model configs do), and ``jpeft.models`` sits
above the methods and the mesh code (docs/ARCHITECTURE.md, "The dependency direction").
This module imports nothing of jpeft but its errors.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jpeft.errors import ConfigError, UnsupportedModelError

Array = jax.Array


# -- activations -----------------------------------------------------------------------------

def _gelu_exact(x):
    return jax.nn.gelu(x, approximate=False)


def _gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


def _identity(x):
    return x


# the one activation table (Hugging Face's ACT2FN names): the models' MLPs and the bottleneck
# adapters' non_linearity both look names up here
ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": _gelu_exact,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "linear": _identity,
}


def activation(name: str):
    """The activation function Hugging Face calls ``name`` (``ACT2FN``)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise UnsupportedModelError(
            f"activation {name!r} is not supported; jpeft implements {sorted(ACTIVATIONS)}. "
            "Pick one of these in the model config."
        ) from None


def check_activation(name: str) -> None:
    activation(name)


# -- the Dense product over flattened tokens ---------------------------------------------------

_DENSE_DIMS = (((1,), (0,)), ((), ()))

# Weight gradients ``x^T dy`` with at least this many output and input features are computed
# from a copy of ``x^T`` on the CPU, in float32 (:func:`_weight_grad_by_copy`). XLA runs
# ``x^T dy`` as a dot whose left operand is column-major, which its YNNPACK path refuses; on
# the 2-core Zen 3 VM of session 31 (docs/BENCHMARKS.md) the fallback took 1.02-2.0x as long
# as the row-major product after the copy at every shape measured with outputs 2,048-32,000
# features wide (8,192 wide: 377 against 192 ms), and for narrower outputs (<= 1,376) the copy
# took 0.94-1.16x the plain product's time, so those keep the plain product.
_WIDE_OUT = 2048
_WIDE_IN = 512


def _weight_grad_by_copy(x, w) -> bool:
    return (jax.default_backend() == "cpu" and x.dtype == jnp.float32 and w.dtype == jnp.float32
            and w.shape[1] >= _WIDE_OUT and w.shape[0] >= _WIDE_IN)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _dense_product(x, w, precision, preferred_element_type):
    """``x @ w`` for 2-D ``x [tokens, in]`` and ``w [in, out]``, whose derivative in ``w``
    multiplies by a transposed copy of ``x`` (see :func:`_dense_product_jvp`)."""
    return jax.lax.dot_general(x, w, _DENSE_DIMS, precision=precision, preferred_element_type=preferred_element_type)


@functools.partial(jax.checkpoint, static_argnums=(2, 3))
def _tangent_in_w(x, dw, precision, preferred_element_type):
    # ``x @ dw`` written as a product with ``x^T``; its transpose (the weight gradient) is then
    # ``x^T @ dy`` with ``x^T`` a real array, a plain row-major product. The barrier keeps XLA
    # from folding the copy back into the dot; the checkpoint makes the copy in the backward
    # pass (the forward keeps ``x`` as it would anyway), so no activation memory is added.
    xt = jax.lax.optimization_barrier(x.T)
    return jax.lax.dot_general(xt, dw, (((0,), (0,)), ((), ())), precision=precision,
                               preferred_element_type=preferred_element_type)


def _dense_product_jvp(precision, preferred_element_type, primals, tangents):
    x, w = primals
    dx, dw = tangents
    y = _dense_product(x, w, precision, preferred_element_type)
    dy = None
    if not isinstance(dx, SymbolicZero):
        dy = jax.lax.dot_general(dx, w, _DENSE_DIMS, precision=precision, preferred_element_type=preferred_element_type)
    if not isinstance(dw, SymbolicZero):  # frozen weights (adapter training) never get here
        t = _tangent_in_w(x, dw, precision, preferred_element_type)
        dy = t if dy is None else dy + t
    return y, (jnp.zeros_like(y) if dy is None else dy)


_dense_product.defjvp(_dense_product_jvp, symbolic_zeros=True)


def flat_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, out_sharding=None):
    """``jax.lax.dot_general`` that, for a Dense layer's product (``lhs [..., in]`` by ``rhs
    [in, out]``), flattens ``lhs``'s leading axes into one and restores them on the result.

    Same numbers as the plain product; the difference is in the backward pass: the weight
    gradient ``x^T dy`` then contracts one token axis instead of two (batch and sequence), and
    XLA's CPU backend runs a one-axis contraction on the activations as they are, where for
    two axes it first writes a transposed copy of ``dy`` (with the elementwise backward of the
    layer after it fused into that copy, at a fraction of memory bandwidth). For full fine-tuning
    of a Llama that copy was ~23 % of the step (docs/BENCHMARKS.md, "Session 21").

    On the CPU, in float32, a weight gradient at least 2,048 features wide (and 512 deep: an
    output layer over a vocabulary, a 7B model's projections) is computed from a transposed
    copy of ``x`` made in the backward pass, as a row-major product: XLA's CPU backend runs
    ``x^T dy`` with ``x`` as it is at about half the speed there (an 8,192-word output layer's
    weight gradient: 377 -> 192 ms; docs/BENCHMARKS.md, "Session 31"). Forward and reverse
    mode both work (a ``custom_jvp``); frozen weights are untouched. Any other contraction, and
    any call with an explicit ``out_sharding`` (nnx passes one), is passed to
    ``jax.lax.dot_general`` unchanged.
    """
    (lc, rc), (lb, rb) = dimension_numbers
    if (out_sharding is None and lhs.ndim >= 2 and rhs.ndim == 2 and not lb and not rb
            and tuple(lc) == (lhs.ndim - 1,) and tuple(rc) == (0,)):
        x2 = lhs.reshape(-1, lhs.shape[-1])
        if _weight_grad_by_copy(x2, rhs):
            out = _dense_product(x2, rhs, precision, preferred_element_type)
        else:
            out = jax.lax.dot_general(x2, rhs, _DENSE_DIMS, precision=precision,
                                      preferred_element_type=preferred_element_type)
        return out.reshape(lhs.shape[:-1] + rhs.shape[1:])
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, out_sharding=out_sharding)


# -- positions -------------------------------------------------------------------------------------

def _segment_starts(segment_ids: Array) -> Array:
    """``[batch, seq]`` bool, True at each row's first token and wherever the segment id changes."""
    return jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )


def segment_slots(segment_ids: Array) -> Array:
    """Index of each token inside its segment (document): ``[batch, seq]`` int32, 0 at every
    point where the segment id changes."""
    s = segment_ids.shape[1]
    idx = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), segment_ids.shape)
    start = jax.lax.cummax(jnp.where(_segment_starts(segment_ids), idx, 0), axis=1)
    return idx - start


def segment_runs(segment_ids: Array) -> Array:
    """The document of each token as the masks take it: ``[batch, seq]`` int32 numbering the
    contiguous runs of one id (1, 2, ... in each row), so that an id that comes back after
    another starts a new document, as :func:`segment_slots` restarts its slots there (the
    slots of two runs of one id would otherwise overlap: a token would see the later run's
    keys, and the kernels would disagree). Never negative (a negative key id marks a prefix key)."""
    return jnp.cumsum(_segment_starts(segment_ids), axis=1, dtype=jnp.int32)


def default_positions(attention_mask: Array, cache: Optional[Any]) -> Array:
    """Position ids counting only real tokens: ``cumsum(mask) - 1`` (clipped at 0), continued
    from the cache's real-token count. This matches Hugging Face ``generate`` with left padding
    and equals ``arange(seq)`` without padding. Any nonzero mask value is a real token (a mask
    of 2s, 0.5s or segment numbers counts each token once), as transformers reads the mask.
    ``cache`` is a :class:`jpeft.models.KVCache` (its ``mask`` is read) or ``None``."""
    m = attention_mask.astype(bool).astype(jnp.int32)
    pos = jnp.cumsum(m, axis=1) - 1
    if cache is not None:
        pos = pos + jnp.sum(cache.mask.astype(jnp.int32), axis=1, keepdims=True)
    return jnp.maximum(pos, 0)


# -- dtypes ------------------------------------------------------------------------------------

def check_float_dtype(dtype, what: str, allowed=None):
    """``jnp.dtype(dtype)``, or :class:`~jpeft.errors.ConfigError` when that is not a floating
    dtype (or not one of ``allowed``'s names): an integer dtype failed deep inside an initializer
    and a misspelt name (``"bf16"``) read as an invalid ``config.json``."""
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or not jnp.issubdtype(dt, jnp.floating) or (allowed is not None and dt.name not in allowed):
        names = ", ".join(allowed) if allowed is not None else "such as float32 or bfloat16"
        hint = (" For an int8, fp8 or NF4 base, load it in a float dtype with quantize='int8', 'fp8' or 'nf4' "
                "(jpeft.models.from_pretrained) or quantize it with jpeft.quantize."
                if dt is not None and dt.itemsize == 1 and dt.kind != "b" else "")
        raise ConfigError(f"{what} must be a floating dtype ({names}; a jnp dtype or its name), found {dtype!r}.{hint}")
    return dt
