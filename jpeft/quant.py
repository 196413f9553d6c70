"""Quantized frozen bases (QLoRA): NF4, int8 and fp8 kernels as pytree leaves.

``quantize(params, "nf4")`` replaces the base's linear kernels with quantized leaves; every
other jpeft call takes the result where it takes ``params``. The leaves are dequantized at the
point of use, one module call at a time inside the jitted step (``jpeft/_inject.py``), and
the backward pass keeps codes, not dequantized kernels. (On the CPU that holds for a
layer-scanned model only: unrolled, XLA's CPU backend keeps every layer's dequantized kernel
for the backward pass; docs/MODELS.md, docs/BENCHMARKS.md "QLoRA".)

* ``"int8"`` (absmax per output channel) and ``"fp8"`` (``float8_e4m3fn``, absmax per output
  channel) are qwix's :class:`qwix.QArray` (``qwix.quantize`` / ``qwix.dequantize``).
* ``"nf4"`` is :class:`NF4Array`, written here because qwix has no double quantization and
  stores NF4 as one ``uint4`` per code: the QLoRA layout of bitsandbytes' ``quantize_4bit``
  (Dettmers et al. 2023): the kernel in PyTorch's ``[out, in]`` orientation, flattened, cut
  into blocks of 64; each block's absmax scales it into ``[-1, 1]``, each value becomes the
  index of the nearest of the 16 NF4 levels (:data:`NF4_LEVELS`), two indices a byte (the
  first in the high nibble). The fp32 absmaxes are double-quantized: an offset is
  subtracted and the rest quantized blockwise (256 a block) to the 8-bit signed dynamic code
  (:func:`dynamic_code`) with one fp32 scale a block. About 4.127 bits per weight. The offset
  is the absmaxes' mean, as in bitsandbytes, summed pairwise in a fixed order
  (:func:`_pairwise_mean`) so that its bits do not depend on XLA's reduction order.
  Against bitsandbytes 0.50's own ``quantize_4bit`` on the CPU (tests/test_quantize.py): the
  4-bit codes are equal bit for bit, the offset to an ulp, and given the same offset the
  absmax scales bit for bit; the absmax codes are the nearest code, where bitsandbytes' CPU
  binary search (not an exact nearest) takes a neighbour for 0.2-2% of them.

Leading kernel axes (a layer-scanned model's stacked layers) stay leading axes of every array
of a quantized leaf, so ``nn.scan`` slices a quantized kernel like a plain one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
from typing import Any, Callable, Literal, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from jax.sharding import NamedSharding, PartitionSpec as P

from jpeft.config import _as_targets
from jpeft.errors import LoadError, QuantizationError, SaveError
from jpeft.tree import host_array, is_all_linear, is_nnx_module, is_nnx_state, matches, path_str, unbox

Scheme = Literal["nf4", "int8", "fp8"]
SCHEMES: tuple = ("nf4", "int8", "fp8")
BLOCK = 64  # NF4 block (QLoRA)
BLOCK2 = 256  # block of the double quantization of the absmaxes (QLoRA)

#: The 16 NF4 levels (QLoRA, appendix E; bitsandbytes' ``get_4bit_type("nf4")``).
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], np.float32)


def dynamic_code() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic code (``create_dynamic_map(signed=True)``, Dettmers
    2016): for each decade ``10**-6 .. 10**0``, 2**i evenly spaced fractions of it with either
    sign, plus 0 and 1; 256 float32 values, sorted."""
    vals = []
    for i in range(7):
        bounds = np.linspace(0.1, 1, 2 ** i + 1, dtype=np.float32)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2)
        scaled = (np.float32(10.0 ** (i - 6)) * means).astype(np.float32)
        vals += list(scaled) + list(-scaled)
    vals += [np.float32(0.0), np.float32(1.0)]
    return np.sort(np.asarray(vals, np.float32))


_DYN = dynamic_code()


def _nearest(levels: np.ndarray, x):
    """Index of the nearest level (sorted ``levels``); a tie goes to the lower one."""
    mids = jnp.asarray((levels[:-1] + levels[1:]) / np.float32(2))
    return jnp.searchsorted(mids, x, side="left").astype(jnp.uint8)


def _pairwise_mean(x, inv_n):
    """Mean over the last axis, summed pairwise in a fixed order (zero-padded to a power of
    two) and multiplied by ``inv_n``, the float32 ``1 / n`` of the ``n`` values averaged (the
    rest of the axis is zeros): the same bits whatever order XLA would pick for a reduction, and
    whichever fusion computes it (XLA turns a division by a constant into a multiplication in
    some fusions and not in others). Zeros past the next power of two above ``n`` add exact
    zeros at the end, so the sum does not depend on how far the axis is padded."""
    width = 1 << max(0, (x.shape[-1] - 1).bit_length())
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])
    while x.shape[-1] > 1:
        x = x[..., 0::2] + x[..., 1::2]
    return x[..., 0] * inv_n


def _safe(s):
    return jnp.where(s == 0, jnp.ones_like(s), s)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NF4Array:
    """A kernel ``[..., in, out]`` in NF4 with double-quantized block scales (see the module
    docstring). ``shape`` and ``dtype`` are the kernel's; :meth:`dequantize` rebuilds it."""

    codes: jax.Array  # uint8 [..., nblocks * 32]
    absmax_codes: jax.Array  # uint8 [..., nblocks]
    absmax_scales: jax.Array  # float32 [..., ceil(nblocks / 256)]
    absmax_offset: jax.Array  # float32 [...]
    matrix: tuple = dataclasses.field(metadata=dict(static=True), default=())  # (in, out)
    dtype_name: str = dataclasses.field(metadata=dict(static=True), default="float32")

    @property
    def shape(self) -> tuple:
        return tuple(self.absmax_offset.shape) + tuple(self.matrix)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self):
        return jnp.dtype(self.dtype_name)

    @property
    def size(self) -> int:
        return int(math.prod(self.shape))

    def dequantize(self) -> jax.Array:
        return _nf4_dequantize(self)


NF4_MIN_BLOCKS = 64  # the fewest blocks an NF4 program is compiled for (4096 weights)


def _bucket(n: int, least: int = 1) -> int:
    """The power of two at or above ``max(n, least)``."""
    return 1 << max(0, (max(n, least) - 1).bit_length())


def _on_host(w) -> bool:
    """Whether ``w`` is a NumPy array, or a JAX array on the CPU where the CPU is JAX's default
    backend: its layout work (transposes, padding, slicing, finiteness checks) is then done in
    NumPy, with no XLA program compiled per kernel shape. Elsewhere (a tracer, an accelerator's
    array) those steps stay JAX operations, on the array's device or in the caller's program."""
    if isinstance(w, np.ndarray):
        return True
    if isinstance(w, jax.core.Tracer) or not isinstance(w, jax.Array) or jax.default_backend() != "cpu":
        return False
    return all(d.platform == "cpu" for d in w.devices())


def _nf4_quantize(w) -> NF4Array:
    """NF4 with double quantization, in two compiled programs: the 4-bit codes and the block
    absmaxes' offset, then the absmaxes' 8-bit codes. The offset is an input of the second
    program, so the value subtracted from the absmaxes is the stored one to the last bit; in
    one program XLA fuses the mean into the subtraction and may contract its multiplication
    and subtraction into one fused multiply-add, which rounds differently.

    The programs see the kernel already cut into blocks, ``[layers, blocks, 64]`` with both
    counts zero-padded to a power of two (at least :data:`NF4_MIN_BLOCKS` blocks), and take the
    number of real blocks as an argument: a model's kernels share a few compiled programs
    instead of two per kernel shape (a tiny model's dozen shapes took 6 CPU-s to compile). The
    padding changes no bit: a zero block's absmax is 0, which adds exact zeros to the pairwise
    sum of the offset, and the absmaxes past the real ones are left out of the double
    quantization's blocks as the zeros they were padded with before."""
    if jnp.ndim(w) < 2:
        raise QuantizationError(f"NF4 quantizes kernels of 2 or more dims; found shape {tuple(jnp.shape(w))}.")
    xp = np if _on_host(w) else jnp
    w = xp.asarray(w)
    lead, (i, o) = tuple(w.shape[:-2]), tuple(w.shape[-2:])
    rows, n = math.prod(lead), i * o
    nb = -(-n // BLOCK)
    ng = -(-nb // BLOCK2)
    rows_p, nb_p = _bucket(rows), _bucket(nb, NF4_MIN_BLOCKS)
    blocks = (_to_blocks(np, w, rows_p, nb_p) if xp is np else
              _to_blocks_jit(jnp, w, rows_p, nb_p))
    codes, absmax, offset = _nf4_codes(blocks, np.float32(1.0 / nb))
    q2, scale2 = _nf4_absmax_codes(absmax, offset, np.int32(nb))

    def cut(x, width=None):  # the real rows (and columns) of a program's output, with the kernel's leading axes
        x = np.asarray(x) if xp is np else x
        x = x[:rows] if width is None else x[:rows, :width]
        return jnp.asarray(x.reshape(lead + x.shape[1:]))

    return NF4Array(cut(codes, nb * BLOCK // 2), cut(q2, nb), cut(scale2, ng), cut(offset), (i, o),
                    jax.dtypes.canonicalize_dtype(w.dtype).name)


def _to_blocks(xp, w, rows_p: int, nb_p: int):
    """``w [..., in, out]`` as ``[rows_p, nb_p, 64]`` float32 blocks of its transpose, zero-padded
    (``xp``: NumPy on the host; jitted JAX on a device or under a trace, where one fused program
    per kernel shape keeps a single float32 copy of the kernel rather than one per step)."""
    lead, (i, o) = tuple(w.shape[:-2]), tuple(w.shape[-2:])
    rows, n = math.prod(lead), i * o
    flat = xp.swapaxes(w, -1, -2).astype(np.float32).reshape(rows, n)
    return xp.pad(flat, [(0, rows_p - rows), (0, nb_p * BLOCK - n)]).reshape(rows_p, nb_p, BLOCK)


_to_blocks_jit = jax.jit(_to_blocks, static_argnums=(0, 2, 3))


def _nf4_codes_fn(blocks, inv_nb):
    """The packed 4-bit codes, the block absmaxes and their mean (``inv_nb``: ``1 / blocks``)."""
    rows, nb = blocks.shape[:2]
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    idx = _nearest(NF4_LEVELS, blocks / _safe(absmax)[..., None])
    codes = ((idx[..., 0::2] << 4) | idx[..., 1::2]).reshape(rows, nb * BLOCK // 2)
    return codes, absmax, _pairwise_mean(absmax, inv_nb)


_nf4_codes = jax.jit(_nf4_codes_fn)


def _nf4_absmax_codes_fn(absmax, offset, nb):
    """The absmaxes' 8-bit codes and one scale per block of 256 (the first ``nb`` absmaxes are
    real; the rest count as zeros after the offset is subtracted, as the last block's padding)."""
    rows, nb_p = absmax.shape
    ng = -(-nb_p // BLOCK2)
    real = jnp.arange(nb_p) < nb
    centred = jnp.pad(jnp.where(real, absmax - offset[:, None], 0.0), [(0, 0), (0, ng * BLOCK2 - nb_p)])
    groups = centred.reshape(rows, ng, BLOCK2)
    scale2 = jnp.max(jnp.abs(groups), axis=-1)
    q2 = _nearest(_DYN, groups / _safe(scale2)[..., None]).reshape(rows, ng * BLOCK2)
    return q2, scale2


_nf4_absmax_codes = jax.jit(_nf4_absmax_codes_fn)


def nf4_absmax(q: NF4Array) -> jax.Array:
    """The block absmaxes a :class:`NF4Array` decodes to (double quantization undone)."""
    lead = q.absmax_offset.shape
    nb = q.absmax_codes.shape[-1]
    ng = q.absmax_scales.shape[-1]
    vals = jnp.asarray(_DYN)[q.absmax_codes.astype(jnp.int32)]
    vals = jnp.pad(vals, [(0, 0)] * len(lead) + [(0, ng * BLOCK2 - nb)]).reshape(lead + (ng, BLOCK2))
    vals = (vals * q.absmax_scales[..., None]).reshape(lead + (ng * BLOCK2,))[..., :nb]
    return vals + q.absmax_offset[..., None]


def _nf4_dequantize(q: NF4Array) -> jax.Array:
    lead = q.absmax_offset.shape
    i, o = q.matrix
    nb = q.absmax_codes.shape[-1]
    packed = q.codes.reshape(lead + (nb, BLOCK // 2))
    idx = jnp.stack([packed >> 4, packed & 15], axis=-1).reshape(lead + (nb, BLOCK)).astype(jnp.int32)
    vals = jnp.asarray(NF4_LEVELS)[idx] * nf4_absmax(q)[..., None]
    mat = vals.reshape(lead + (nb * BLOCK,))[..., : i * o].reshape(lead + (o, i))
    return jnp.swapaxes(mat, -1, -2).astype(q.dtype)


def _channel_axes(ndim: int) -> tuple:
    """Every axis but the input axis (``-2``): one scale per output channel (and per layer)."""
    return tuple(a for a in range(ndim) if a != ndim - 2)


def quantize_array(w, scheme: Scheme, where: str = ""):
    """One kernel ``[..., in, out]`` quantized with ``scheme`` (see :data:`SCHEMES`) by compiled
    programs, so :func:`quantize` and ``from_pretrained(quantize=...)`` give the same bits.
    (Traced inside a caller's ``jax.jit``, NF4's programs are fused into the caller's and an
    absmax scale may come out an ulp apart.)"""
    what = f"the kernel {where!r}" if where else "a kernel"  # named in the errors below
    if scheme not in SCHEMES:
        raise QuantizationError(f"unknown quantization scheme {scheme!r}; expected one of {list(SCHEMES)}.")
    dtype = jnp.dtype(getattr(w, "dtype", None) or jnp.asarray(w).dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        # NF4 cast an int, bool or complex kernel to float32 and back (integers rounded to NF4 levels, imaginary
        # parts dropped) with no error; qwix raised a bare ValueError
        raise QuantizationError(
            f"{what} of shape {tuple(jnp.shape(w))} has dtype {dtype.name}; {scheme} quantizes floating-point "
            "kernels only. Leave it out (target_modules=) or cast it to a float dtype first."
        )
    if 0 in tuple(jnp.shape(w)):
        raise QuantizationError(f"{what} of shape {tuple(jnp.shape(w))} is empty; there is nothing to quantize. "
                                "Leave it out with target_modules=.")
    if not isinstance(w, jax.core.Tracer) and not _all_finite(w):
        raise _not_finite(what, jnp.shape(w))
    if scheme == "nf4":
        q = _nf4_quantize(w)
        if not isinstance(w, jax.core.Tracer) and not (_all_finite(q.absmax_offset) and _all_finite(q.absmax_scales)):
            raise _offset_overflows(what, jnp.shape(w), jnp.max(jnp.abs(w)))
        return q
    return _quantize_jit(w, scheme)


def _not_finite(what, shape) -> QuantizationError:
    # NF4's absmax and qwix's rounding turn a NaN into a finite code (a block's absmax, or 0)
    return QuantizationError(
        f"{what} of shape {tuple(shape)} holds NaN or inf values; quantizing would turn them into "
        "finite codes (NF4, int8) or poison its whole kernel (inf in NF4), silently. Fix the checkpoint first.")


def _offset_overflows(what, shape, top) -> QuantizationError:
    # the double quantization's mean of the block absmaxes overflows float32 (NaN weights, silently)
    return QuantizationError(
        f"{what} of shape {tuple(shape)} holds values up to {float(top):.3g}: the mean of "
        "its NF4 block scales (double quantization) overflows float32, and the kernel would dequantize to NaN. "
        "Scale the kernel down, or quantize it with 'int8' or 'fp8' (one scale per output channel).")


def abstract_quantized(leaf, scheme: Scheme):
    """The quantized leaf ``scheme`` makes of a kernel of ``leaf``'s shape and dtype (a
    ``jax.ShapeDtypeStruct`` or an array), its arrays as ``jax.ShapeDtypeStruct`` s: the specs
    of a base not yet quantized (:func:`jpeft.param_specs`, then :func:`quantize_sharded`)."""
    sds = jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype)
    if scheme == "nf4":
        return jax.eval_shape(_nf4_quantize, sds)
    return jax.eval_shape(lambda w: _quantize_array(w, scheme), sds)


def quantize_sharded(read: Callable, shape: tuple, dtype, shardings, scheme: Scheme, where: str = ""):
    """One kernel ``[..., in, out]`` of ``shape`` and ``dtype``, quantized straight into
    ``shardings`` (the quantized leaf's tree of ``NamedSharding`` s: :func:`jpeft.param_shardings`
    of :func:`abstract_quantized`), every process reading only the part of the kernel its own
    devices' shards are made from: ``read(index)`` gives ``kernel[index]`` (a tuple of slices) as
    a NumPy array in ``dtype``. The same bits as :func:`quantize_array` of the whole kernel:

    * int8 / fp8: the float kernel is placed in the values' own sharding and quantized by the
      same program with those shardings; an output channel's absmax spanning devices is a
      maximum across them (exact in any order).
    * NF4: the kernel's 64-value blocks (of its ``[out, in]`` flattening) are read straight into
      the devices that hold their codes (the flat codes are cut along output rows), each block
      whole, so its absmax and codes are computed where they are stored; the absmaxes' mean
      (the double quantization's offset, a fixed pairwise sum) and the 8-bit codes of the
      absmaxes need them all: the two programs of :func:`_nf4_quantize`, compiled with these
      shardings, gather them (``nblocks`` float32 values, 1/16 of the float32 kernel) across
      the devices. Where the codes' mesh axis does not divide the number of blocks (an odd
      count over 2 devices: the codes are cut inside a block, or not at all), every device
      reads the whole kernel's blocks (one kernel at a time) and keeps its slice of the codes.

    Raises:
      QuantizationError: as :func:`quantize_array` (NaN or inf values, NF4's offset overflowing).
    """
    what = f"the kernel {where!r}" if where else "a kernel"
    if scheme not in SCHEMES:
        raise QuantizationError(f"unknown quantization scheme {scheme!r}; expected one of {list(SCHEMES)}.")
    if scheme != "nf4":
        w = jax.make_array_from_callback(tuple(shape), shardings.qvalue, read)
        q, finite = _quantize_into(shardings, scheme)(w)
        if not host_array(finite).item():
            raise _not_finite(what, shape)
        return q
    lead, (i, o) = tuple(shape[:-2]), tuple(shape[-2:])
    rows, n = math.prod(lead), i * o
    nb = -(-n // BLOCK)
    mesh, codes_spec = shardings.codes.mesh, tuple(shardings.codes.spec) + (None,) * (len(lead) + 1)
    row_e = codes_spec[0] if len(lead) == 1 else None  # several leading axes (none in jpeft's models): rows whole
    flat_e = codes_spec[len(lead)]
    blk_e = flat_e if flat_e is not None and nb % _entry_size(dict(mesh.shape), flat_e) == 0 else None

    def blocks_of(index):  # float32 [rows, blocks, 64] of the kernel's [out, in] flattening, zero-padded
        rr, bb = range(rows)[index[0]], range(nb)[index[1]]
        out = np.zeros((len(rr), len(bb) * BLOCK), np.float32)
        s, e = bb.start * BLOCK, min(bb.stop * BLOCK, n)
        o0, o1 = s // i, -(-e // i)  # the output rows the blocks cover (at most two of them in part)
        for k, r in enumerate(rr):
            at = tuple(slice(c, c + 1) for c in np.unravel_index(r, lead)) if lead else ()
            part = read(at + (slice(None), slice(o0, o1)))
            out[k, : e - s] = part.reshape(part.shape[-2:]).T.astype(np.float32).reshape(-1)[s - o0 * i: e - o0 * i]
        return out.reshape(len(rr), len(bb), BLOCK)

    blocks = jax.make_array_from_callback((rows, nb, BLOCK), NamedSharding(mesh, P(row_e, blk_e, None)), blocks_of)
    codes, absmax, offset, finite = _nf4_codes_into(shardings.codes, NamedSharding(mesh, P(row_e, blk_e)),
                                                    NamedSharding(mesh, P(row_e)), lead)(blocks, np.float32(1.0 / nb))
    del blocks
    if not host_array(finite).item():
        raise _not_finite(what, shape)
    q2, scale2, offset, finite = _nf4_absmax_codes_into(shardings, lead)(absmax, offset, np.int32(nb))
    if not host_array(finite).item():
        raise _offset_overflows(what, shape, host_array(jnp.max(absmax)).item())
    return NF4Array(codes, q2, scale2, offset, (i, o), jax.dtypes.canonicalize_dtype(dtype).name)


def _all_finite_flag(*xs):
    """Inside a program of :func:`quantize_sharded`: whether ``xs`` hold no NaN or inf (one more
    output of the program that computes them, not one more program per kernel shape)."""
    return functools.reduce(jnp.logical_and, [jnp.all(jnp.isfinite(x)) for x in xs])


@functools.lru_cache(maxsize=None)
def _quantize_into(shardings, scheme):
    """:func:`_quantize_array` into ``shardings``, and whether the kernel was finite."""
    replicated = NamedSharding(shardings.qvalue.mesh, P())
    return jax.jit(lambda w: (_quantize_array(w, scheme), _all_finite_flag(w)), out_shardings=(shardings, replicated))


@functools.lru_cache(maxsize=None)
def _nf4_codes_into(codes_sharding, absmax_sharding, offset_sharding, lead):
    """:func:`_nf4_codes` on unpadded blocks, the codes in their final shape and sharding, and
    whether the blocks were finite."""
    def run(blocks, inv_nb):
        codes, absmax, offset = _nf4_codes_fn(blocks, inv_nb)
        return codes.reshape(lead + codes.shape[1:]), absmax, offset, _all_finite_flag(blocks)

    replicated = NamedSharding(codes_sharding.mesh, P())
    return jax.jit(run, out_shardings=(codes_sharding, absmax_sharding, offset_sharding, replicated))


@functools.lru_cache(maxsize=None)
def _nf4_absmax_codes_into(shardings, lead):
    """:func:`_nf4_absmax_codes`, its outputs cut to the real absmaxes and in their final shapes
    and shardings, and whether the offset and scales are finite."""
    def run(absmax, offset, nb):
        q2, scale2 = _nf4_absmax_codes_fn(absmax, offset, nb)
        return (q2[:, :absmax.shape[1]].reshape(lead + (-1,)), scale2.reshape(lead + (-1,)), offset.reshape(lead),
                _all_finite_flag(offset, scale2))

    replicated = NamedSharding(shardings.codes.mesh, P())
    return jax.jit(run, out_shardings=(shardings.absmax_codes, shardings.absmax_scales, shardings.absmax_offset,
                                       replicated))


def _all_finite(x) -> bool:
    """Whether the concrete array ``x`` holds no NaN or inf (in NumPy where it is on the host:
    no XLA program compiled per shape)."""
    if _on_host(x):
        x = np.asarray(x)  # in the dtype JAX would hold it in (float64 is float32 unless x64 is on)
        return bool(np.isfinite(x.astype(jax.dtypes.canonicalize_dtype(x.dtype), copy=False)).all())
    return bool(jnp.all(jnp.isfinite(jnp.asarray(x))))


def _quantize_array(w, scheme):
    import qwix  # int8 / fp8 only: qwix imports flax.nnx (see _is_qarray)

    w = jnp.asarray(w)
    if w.ndim < 2:
        raise QuantizationError(f"{scheme} quantizes kernels of 2 or more dims; found shape {tuple(w.shape)}.")
    if scheme not in ("int8", "fp8"):
        raise QuantizationError(f"unknown quantization scheme {scheme!r}; expected one of {list(SCHEMES)}.")
    qtype = jnp.int8 if scheme == "int8" else jnp.float8_e4m3fn
    if w.dtype == jnp.float16:
        # qwix computes the scale in the kernel's dtype and replaces a scale below sqrt(finfo.tiny) by 1: float16's
        # is 0.0078, so every output channel of absmax below 1.0 (int8; 3.5 for fp8) got scale 1, all-zero int8
        # codes (the kernel dequantized to zeros) or fp8 codes of the raw values. Computed in float32, the scale
        # kept in float16 (qwix's convention: the dequantized dtype is the scale's)
        q = qwix.quantize(w.astype(jnp.float32), qtype, channelwise_axes=_channel_axes(w.ndim))
        return dataclasses.replace(q, scale=q.scale.astype(jnp.float16))
    return qwix.quantize(w, qtype, channelwise_axes=_channel_axes(w.ndim))


_quantize_jit = jax.jit(_quantize_array, static_argnums=1)


def _is_qarray(x) -> bool:
    """Whether ``x`` is a :class:`qwix.QArray`, asked with no import: one exists only once qwix is
    imported, and qwix imports ``flax.nnx``, which a program without int8/fp8 bases need not pay
    for at start-up (docs/ARCHITECTURE.md, "Start-up time"). Where one is built or computed with
    (:func:`quantize`, :func:`from_tensors`, :func:`dequantize_array`), qwix is imported there."""
    qwix = sys.modules.get("qwix")
    return qwix is not None and isinstance(x, qwix.QArray)


def is_quantized(x) -> bool:
    """Whether ``x`` is a quantized leaf (:class:`NF4Array` or :class:`qwix.QArray`)."""
    return isinstance(x, NF4Array) or _is_qarray(x)


def has_quantized(tree) -> bool:
    return any(is_quantized(x) for x in jax.tree.leaves(tree, is_leaf=is_quantized))


def dequantize_array(x):
    """A quantized leaf as a plain array in its original dtype (other leaves pass through;
    an fp8 leaf whose values :func:`as_bytes` holds as bytes is read back as fp8 first)."""
    if isinstance(x, NF4Array):
        return x.dequantize()
    if _is_qarray(x):
        import qwix  # imported already: x is a QArray

        if jnp.dtype(x.qvalue.dtype) == jnp.uint8 and _is_fp8(x.qtype):
            x = dataclasses.replace(x, qvalue=jax.lax.bitcast_convert_type(x.qvalue, jnp.float8_e4m3fn))
        return qwix.dequantize(x)
    return x


def astype(x, dtype):
    """A quantized leaf that dequantizes to ``dtype``. NF4 keeps its float32 block scales and
    changes only the dtype it dequantizes to (casting the scales rounded every block's absmax
    and left the kernel float32); a qwix int8/fp8 array's scale is cast, qwix's convention
    (its dtype is its scale's)."""
    dtype = jnp.dtype(dtype)
    if isinstance(x, NF4Array):
        return x if x.dtype == dtype else dataclasses.replace(x, dtype_name=dtype.name)
    if _is_qarray(x):
        return x if x.dtype == dtype else x.astype(dtype)
    raise QuantizationError(f"quant.astype takes a quantized leaf, found {type(x).__name__}.")


def _is_fp8(qtype) -> bool:
    try:
        return jnp.dtype(qtype) == jnp.float8_e4m3fn
    except TypeError:  # a qwix name that is no dtype ("nf4", ...)
        return False


def as_bytes(params):
    """``params`` with the values of every stacked fp8 leaf bitcast to ``uint8`` (the same bits),
    for the duration of one ``jpeft.apply``; :func:`dequantize_array` reads them back.

    Why: under a layer scan each layer's fp8 kernel is a slice of the stacked one, and XLA's
    CPU backend, which has no fp8 slicing, converted the whole stacked fp8 kernel to float16
    before the loop, so a training step held a 16-bit copy of every fp8 kernel (twice the fp8
    base's bytes). Slicing bytes keeps the per-layer conversion inside the loop (XLA still
    copies the stacked bytes once for the loops: one byte per element, not two). Only stacked
    leaves (more than 2 dims) are changed: on an unrolled model the same bitcast made XLA keep
    more dequantized temporaries (measured: step 0.21 -> 0.26 s)."""
    def one(x):
        if _is_qarray(x) and jnp.dtype(x.qvalue.dtype) == jnp.float8_e4m3fn and x.qvalue.ndim > 2:
            return dataclasses.replace(x, qvalue=jax.lax.bitcast_convert_type(x.qvalue, jnp.uint8))
        return x

    if not any(_is_qarray(x) for x in jax.tree.leaves(params, is_leaf=is_quantized)):
        return params  # the common case: the caller's tree untouched
    return jax.tree.map(one, params, is_leaf=is_quantized)


def dequantize(params):
    """``params`` with every quantized leaf dequantized (the whole model at once: for
    :func:`jpeft.merge` and export, not for training, which dequantizes layer by layer)."""
    return jax.tree.map(dequantize_array, params, is_leaf=is_quantized)


def abstract(params):
    """``params`` with every quantized leaf as a ``jax.ShapeDtypeStruct`` of the kernel it
    stands for (parameter counts, tracing)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if is_quantized(x) else x, params,
                        is_leaf=is_quantized)


def scheme_of(x) -> Optional[str]:
    if isinstance(x, NF4Array):
        return "nf4"
    if _is_qarray(x):
        return "int8" if jnp.dtype(x.qvalue.dtype) == jnp.int8 else "fp8"
    return None


# the output layer of a language model or a classifier: transformers with bitsandbytes keeps a model's
# last module in full precision, and a classifier's few outputs would share NF4 blocks across labels
DEFAULT_SKIP = ("lm_head", "classifier")


def selects(path: str, name: str, leaf, target_modules=None, skip=DEFAULT_SKIP) -> bool:
    """Whether the leaf ``name`` of module ``path`` is quantized: by default every ``kernel``
    of 2+ dims except the LM head's and a classifier's; with ``target_modules`` (matched as PEFT's, see
    :func:`jpeft.tree.matches`) the kernels and embeddings of those modules (``"all-linear"``: the
    kernels of every module but the LM head, no embedding)."""
    if getattr(leaf, "ndim", len(getattr(leaf, "shape", ()))) < 2 or is_quantized(leaf):
        return False
    if target_modules is not None:
        # "all-linear" names the linear layers (as LoraConfig's): an embedding table is not one (it was quantized too)
        names = ("kernel",) if is_all_linear(target_modules) else ("kernel", "embedding")
        return name in names and matches(target_modules, path)
    if name != "kernel":
        return False
    last = path.rsplit("/", 1)[-1]
    return last not in skip


def quantize(params, scheme: Scheme = "nf4", *, target_modules=None):
    """The base ``params`` with its linear kernels quantized: NF4 (block 64, double-quantized
    scales), int8 or fp8 e4m3 (absmax per output channel). Embeddings, norms, biases, the
    LM head and a sequence classifier's head keep their dtype unless ``target_modules`` names them (a regex or list, as
    ``LoraConfig.target_modules``; then those modules' kernels and embeddings are quantized).

    The result goes wherever ``params`` go (:func:`jpeft.init`, :func:`jpeft.apply`, training,
    sharding, checkpoints); :func:`jpeft.merge` returns a dequantized merged tree. Params boxed by
    ``nn.with_partitioning`` come back unboxed (as from :func:`jpeft.merge`).

    >>> import jax, jax.numpy as jnp, flax.linen as nn, jpeft
    >>> model = nn.Dense(128); x = jnp.ones((2, 64))
    >>> params = model.init(jax.random.key(0), x)
    >>> q = jpeft.quantize(params, "int8", target_modules=".*")
    >>> y = jpeft.apply(model, q, None, x)
    >>> bool(jnp.allclose(y, model.apply(params, x), atol=0.05))
    True
    """
    if scheme not in SCHEMES:
        raise QuantizationError(f"unknown quantization scheme {scheme!r}; expected one of {list(SCHEMES)}.")
    target_modules = _as_targets(target_modules)  # a regex or names, as a method config's (else a named ConfigError)
    if is_nnx_state(params) or is_nnx_module(params):
        # its leaves sit under ".../kernel/value", which no kernel selector matches: the state came back
        # unchanged (full precision, no error), and with target_modules the error blamed the names
        raise QuantizationError(
            f"jpeft.quantize got an {type(params).__name__} of a flax.nnx model; quantized bases are linen trees "
            "(an NNX module cannot run on quantized kernels). Load the model with "
            "jpeft.models.from_pretrained(path, quantize=...) (api='linen'), or train the NNX model unquantized."
        )
    # nn.with_partitioning's boxes: their kernels' paths end in ".../kernel/value", which no selector matched (the
    # default left them full precision with no word; target_modules naming them blamed the names)
    params = unbox(params)

    def one(kp, leaf):
        parts = path_str(kp).split("/")
        if parts and parts[0] == "params" and isinstance(params, Mapping) and "params" in params:
            parts = parts[1:]
        path, name = "/".join(parts[:-1]), parts[-1]
        if is_quantized(leaf) and scheme_of(leaf) != scheme and selects(path, name, abstract(leaf), target_modules):
            # it was kept as it was: asked for int8, the tree stayed NF4 with no word
            raise QuantizationError(
                f"{path_str(kp)!r} is already quantized ({scheme_of(leaf)}); jpeft.quantize does not re-quantize it "
                f"to {scheme}. Quantize the full-precision base, or jpeft.quantize(jpeft.dequantize(params), "
                f"{scheme!r}) (which adds the first rounding's error to the second's)."
            )
        return quantize_array(leaf, scheme, path_str(kp)) if selects(path, name, leaf, target_modules) else leaf

    out = jax.tree_util.tree_map_with_path(one, params, is_leaf=is_quantized)
    if target_modules is not None and not has_quantized(out):
        raise QuantizationError(
            f"target_modules={target_modules!r} selected no kernel or embedding to quantize; "
            "name module paths such as 'q_proj' or a regex over 'model/layers_0/self_attn/q_proj'."
        )
    return out


# ------------------------------------------------------------------------------ safetensors
def to_tensors(params) -> tuple[dict, dict]:
    """``(tensors, metadata)`` for ``safetensors``: every leaf of ``params`` under its ``/``
    path, a quantized leaf as its arrays (``path.codes``, ``path.qvalue``, ...; fp8 values as
    their raw bytes, ``uint8``) and a metadata entry (``{path: json}``) saying how to rebuild
    it. :func:`from_tensors` inverts it bit for bit."""
    tensors, meta = {}, {}
    flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)
    for kp, x in flat:
        name = path_str(kp)
        if isinstance(x, NF4Array):
            for f in ("codes", "absmax_codes", "absmax_scales", "absmax_offset"):
                tensors[f"{name}.{f}"] = np.asarray(getattr(x, f))
            meta[name] = json.dumps({"scheme": "nf4", "matrix": list(x.matrix), "dtype": x.dtype_name})
        elif _is_qarray(x):
            qv = np.asarray(x.qvalue)
            tensors[f"{name}.qvalue"] = qv.view(np.uint8) if scheme_of(x) == "fp8" else qv
            tensors[f"{name}.scale"] = np.asarray(x.scale)
            meta[name] = json.dumps({"scheme": scheme_of(x)})
        else:
            tensors[name] = np.asarray(x)
    return tensors, meta


def from_tensors(tensors: Mapping[str, Any], metadata: Mapping[str, str]) -> dict:
    """Inverse of :func:`to_tensors` (a nested dict of ``jax.Array`` s and quantized leaves)."""
    out: dict = {}

    def put(name, value):
        node = out
        *parents, last = name.split("/")
        for c in parents:
            node = node.setdefault(c, {})
        node[last] = value

    for name, js in metadata.items():
        if not isinstance(js, str) or not js.startswith("{"):
            continue
        try:
            m = json.loads(js)
        except ValueError:
            m = None
        if not isinstance(m, dict) or m.get("scheme") not in SCHEMES:
            # a damaged entry was a JSONDecodeError, and an unknown scheme was read as fp8 with no word
            raise QuantizationError(f"the file's metadata for the quantized leaf {name!r} is {js[:120]!r}: expected JSON "
                                    f"with a scheme in {list(SCHEMES)}. The file is damaged or not written by "
                                    "jpeft.quant.save; save the base again.")
        try:
            if m["scheme"] == "nf4":
                arrs = [np.asarray(tensors[f"{name}.{f}"]) for f in ("codes", "absmax_codes", "absmax_scales", "absmax_offset")]
                _check_nf4_arrays(name, m, arrs)
                arrs[2:] = [a.astype(np.float32) for a in arrs[2:]]
                put(name, NF4Array(*[jnp.asarray(a) for a in arrs], tuple(m["matrix"]), m["dtype"]))
            else:
                qv = np.asarray(tensors[f"{name}.qvalue"])
                scale = np.asarray(tensors[f"{name}.scale"])
                _check_qwix_arrays(name, m, qv, scale)
                qtype = jnp.int8 if m["scheme"] == "int8" else jnp.float8_e4m3fn
                qv = qv.view(qtype) if m["scheme"] == "fp8" else qv
                import qwix  # a file with int8 / fp8 leaves only (see _is_qarray)

                put(name, qwix.QArray(jnp.asarray(qv), jnp.asarray(scale), None, qtype))
        except KeyError as e:
            raise QuantizationError(f"the file has a quantized leaf {name!r} ({m}) without its array {e}; is it truncated?") from None
    for name, value in tensors.items():
        if name.rsplit(".", 1)[0] in metadata and name not in metadata:
            continue
        put(name, jnp.asarray(value))
    return out


def _mismatch(name, m, what) -> QuantizationError:
    return QuantizationError(f"the file's quantized leaf {name!r} ({m}) does not hold together: {what}. The file is damaged "
                             "or its arrays were edited; save the base again with jpeft.quant.save.")


def _is_float(dt) -> bool:
    return np.issubdtype(dt, np.floating) or np.dtype(dt).name == "bfloat16"


def _check_nf4_arrays(name, m, arrs) -> None:
    """The shapes and dtypes :func:`to_tensors` writes for an NF4 leaf of ``m["matrix"]``; a
    damaged file dequantized to another shape with no error, or failed in a reshape."""
    codes, q2, scale2, offset = arrs
    matrix = m.get("matrix")
    if (not isinstance(matrix, list) or len(matrix) != 2 or not all(isinstance(d, int) and d > 0 for d in matrix)):
        raise _mismatch(name, m, f"'matrix' must be [in, out] of positive ints, found {matrix!r}")
    try:
        ok_dtype = jnp.issubdtype(jnp.dtype(m.get("dtype")), jnp.floating)
    except TypeError:
        ok_dtype = False
    if not ok_dtype:
        raise _mismatch(name, m, f"'dtype' must be a float dtype, found {m.get('dtype')!r}")
    lead = tuple(offset.shape)
    nb = -(-matrix[0] * matrix[1] // BLOCK)
    want = {"codes": (codes, lead + (nb * BLOCK // 2,), np.uint8), "absmax_codes": (q2, lead + (nb,), np.uint8),
            "absmax_scales": (scale2, lead + (-(-nb // BLOCK2),), np.float32), "absmax_offset": (offset, lead, np.float32)}
    for f, (a, shape, dt) in want.items():
        # the scales in another float dtype: a base cast by jpeft.cast_base before it kept NF4's float32 scales
        # (bf16), read back as float32 (exactly; dequantizing computed in float32 either way)
        if tuple(a.shape) != shape or a.dtype != dt and not (dt == np.float32 and _is_float(a.dtype)):
            raise _mismatch(name, m, f"its {f} is {a.dtype}{list(a.shape)}, a {matrix[0]} x {matrix[1]} kernel "
                                     f"(leading axes {list(lead)}) needs {np.dtype(dt).name}{list(shape)}")


def _check_qwix_arrays(name, m, qv, scale) -> None:
    """int8 / fp8: values of 2+ dims (int8, or fp8 as bytes) and one scale per output channel."""
    dt = np.int8 if m["scheme"] == "int8" else np.uint8
    if qv.ndim < 2 or qv.dtype != dt:
        raise _mismatch(name, m, f"its qvalue is {qv.dtype}{list(qv.shape)}; expected {np.dtype(dt).name} of 2+ dims")
    want = tuple(qv.shape[:-2]) + (1, qv.shape[-1])
    if tuple(scale.shape) != want or not _is_float(scale.dtype):
        raise _mismatch(name, m, f"its scale is {scale.dtype}{list(scale.shape)}; values of shape {list(qv.shape)} need "
                                 f"a float scale of shape {list(want)} (one per output channel)")


def save(path: str, params, *, overwrite: bool = False) -> None:
    """Writes a (quantized) base to one safetensors file; :func:`load` reads it back bit for bit.
    An existing ``path`` is replaced only with ``overwrite=True`` (a model folder's own
    ``model.safetensors`` given by mistake was replaced by the quantized base, its full-precision
    weights lost), as :func:`jpeft.save_adapter` does.

    Raises:
      SaveError: ``path`` exists (without ``overwrite``) or is a folder, or the write failed.
    """
    if os.path.lexists(path) and not overwrite:
        raise SaveError(f"{path!r} already exists; jpeft.quant.save does not replace it (it may be the full-precision "
                        "weights the base was quantized from). Choose another path, or pass overwrite=True.")
    if os.path.isdir(path):
        raise SaveError(f"{path!r} is a folder; jpeft.quant.save writes one file. Give a file name such as "
                        f"{os.path.join(path, 'base.safetensors')!r}.")
    tensors, meta = to_tensors(params)
    try:
        save_file(tensors, path, metadata={"jpeft_quantized": "1", **meta})
    except (OSError, SafetensorError) as e:  # a full disk, a missing folder, no permission: safetensors' own error
        raise SaveError(f"could not write the quantized base to {path!r}: {e}. Free space, create the folder or fix "
                        "its permissions, and save again.") from None


def load(path: str) -> dict:
    """Reads a file written by :func:`save`.

    Raises:
      LoadError: ``path`` does not exist or is a folder.
      QuantizationError: a truncated or damaged file, one :func:`save` did not write (a model's
        own ``model.safetensors``), or arrays that do not fit the recorded kernels.
    """
    if not os.path.isfile(path):  # safetensors' FileNotFoundError, or "No such device (os error 19)" for a folder
        raise LoadError(f"{path!r} {'is a folder' if os.path.isdir(path) else 'does not exist'}; jpeft.quant.load reads "
                        "the one file jpeft.quant.save wrote (such as 'base.safetensors').")
    try:
        with safe_open(path, framework="numpy") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:  # a truncated or damaged file: safetensors' own error, not jpeft's
        raise QuantizationError(f"{path!r} is not a readable safetensors file ({e}); is it truncated? "
                                "Copy it again or save the base again with jpeft.quant.save.") from None
    if meta.pop("jpeft_quantized", None) is None:
        # a Hugging Face model.safetensors came back as a flat dict of its torch tensor names, full precision, no error
        raise QuantizationError(f"{path!r} was not written by jpeft.quant.save (its metadata has no 'jpeft_quantized' "
                                "mark); to quantize a Hugging Face model folder while reading it, use "
                                "jpeft.models.from_pretrained(folder, quantize='nf4').")
    return from_tensors(tensors, meta)


def logical_spec(spec_node):
    """The kernel's own partition spec from a quantized leaf's tree of specs."""
    if _is_qarray(spec_node):
        return spec_node.qvalue
    if isinstance(spec_node, NF4Array):  # leaf_specs records it; a tree-mapped copy replicates the matrix
        return getattr(spec_node, "matrix_spec", None) or P(*spec_node.absmax_offset, None, None)
    return spec_node


def _entry_size(mesh_shape: Mapping[str, int], entry) -> int:
    if entry is None:
        return 1
    names = entry if isinstance(entry, tuple) else (entry,)
    return int(math.prod(mesh_shape[a] for a in names))


def leaf_specs(leaf, spec: P, mesh_shape: Mapping[str, int]):
    """The quantized ``leaf`` with a :class:`PartitionSpec` per array, from the kernel's own
    ``spec``: leading (layer) axes keep their entries; int8/fp8 values shard like the kernel and
    their scales like it on the axes they keep; NF4's flat arrays take the kernel's output (else
    input) entry where the mesh axis divides them, which cuts them along output rows."""
    e = list(spec) + [None] * (leaf.ndim - len(spec))
    if _is_qarray(leaf):
        scale = P(*[en if leaf.scale.shape[d] == leaf.shape[d] else None for d, en in enumerate(e)])
        return dataclasses.replace(leaf, qvalue=P(*e), scale=scale,
                                   zero_point=None if leaf.zero_point is None else scale)
    lead = e[: leaf.ndim - 2]
    flat = e[-1] if e[-1] is not None else e[-2]

    def cut(n):
        return P(*lead, flat if flat is not None and n % _entry_size(mesh_shape, flat) == 0 else None)

    out = NF4Array(cut(leaf.codes.shape[-1]), cut(leaf.absmax_codes.shape[-1]), P(*lead, None), P(*lead),
                   leaf.matrix, leaf.dtype_name)
    object.__setattr__(out, "matrix_spec", P(*e))
    return out


__all__ = ["quantize", "dequantize", "is_quantized", "has_quantized", "NF4Array", "NF4_LEVELS", "SCHEMES",
           "dynamic_code", "quantize_array", "dequantize_array", "scheme_of"]
