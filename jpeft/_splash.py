"""``attention="splash"``: the Pallas TPU splash-attention kernel behind jpeft's attention call.

jpeft does not write a TPU kernel: it calls the one JAX ships
(``jax.experimental.pallas.ops.tpu.splash_attention``, the fused flash-attention kernel that
skips masked blocks), and this module only translates jpeft's :class:`AttentionMask` into
what that kernel takes:

* causal attention over the current tokens (``mask.diagonal``; a prefix of ``n`` keys gives
  ``diagonal == n``) -> ``CausalMask(offset=n)``, with a sliding window ``w`` ->
  ``LocalMask(window_size=(w - 1, 0), offset=n)``; bidirectional attention -> ``FullMask``;
* packed documents -> the kernel's segment ids; padding keys -> one more segment id
  (:data:`PAD`), so no query sees them (queries keep their document's id, so a padding query
  sees what the reference lets it see);
* grouped-query heads -> the kernel's multi-query form, mapped over the key/value heads (the
  ``g`` query heads of a key/value head share its keys, which are never repeated);
* lengths that are not a multiple of the block -> zero padding in segment :data:`PAD`
  (cut off again), keys padded at least as far as the queries, so every block-padding query
  sees at least one key;
* a query that sees no key at all (a left-padding row) -> the mean of every value, set
  outside the kernel, as the reference and the blockwise kernel give it (the kernel itself
  would average the keys of the blocks it visited).

What it cannot express it refuses (:func:`unsupported` says why): a KV cache (decoding), or
prefix keys together with packed documents (a prefix key is seen by every document, which
segment ids cannot say). ``"auto"`` then uses the blockwise kernel; an explicit ``"splash"``
raises :class:`jpeft.ConfigError`.

Exactness: every output row, padding rows included, and every gradient equal the reference
attention to float32 rounding (tests/test_attention.py, in interpret mode). The queries are
scaled before the kernel (it takes no scale), which in bfloat16 is one more rounding than the
reference's scaling of the float32 logits. The masks number the documents 1, 2, ... whatever
ids the caller gave (:func:`jpeft._ops.segment_runs`), so a negative key id is
only ever the masks' mark of a prefix key, seen by every document.

Off a TPU the kernel runs in Pallas' interpret mode (the same program as ordinary JAX ops:
exact, but far slower than the blockwise kernel), with a :class:`SplashInterpretWarning`; it
is there to check on a CPU what a TPU computes, and is how the tests exercise this module.

Under a multi-device ``jax.jit`` a Pallas TPU kernel must run inside ``shard_map``: jpeft's
mesh training step (:func:`jpeft.parallel.make_sharded_train_step`) traces its body inside
:func:`partitioned`, and the kernel is then mapped over the mesh, the batch split over the
step's batch axes and the heads over the tensor axis where they divide. Outside that context
``"auto"`` picks the kernel only when the process has one device.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import warnings
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.errors import ConfigError

# Segment id of padding tokens and of the block padding (real segment ids are >= 0).
PAD = int(np.iinfo(np.int32).min)
DEFAULT_BLOCK = 512  # the kernel's query and key block (a multiple of 128, the TPU lane width)


class SplashInterpretWarning(UserWarning):
    """The splash kernel runs in Pallas' interpret mode (not on a TPU): exact, slow."""


def unsupported(mask, sq: int, sk: int) -> Optional[str]:
    """Why the splash kernel cannot run ``mask`` over ``sq`` queries and ``sk`` keys, or None."""
    n = sk - sq
    if n < 0:
        return f"fewer keys ({sk}) than queries ({sq})"
    if mask.causal:
        if mask.diagonal is None:
            return "causal attention over KV-cache slots (decoding)"
        if mask.diagonal != n:
            return f"a causal diagonal of {mask.diagonal} with {n} keys before the queries"
    elif mask.window is not None:
        return "a sliding window without a causal mask"
    if n and mask.k_seg is not None:
        return "prefix keys together with packed documents (a prefix key is seen by every document)"
    return None


# -- the mesh the kernel is mapped over ----------------------------------------------------------

_PARTITION: contextvars.ContextVar = contextvars.ContextVar("jpeft_splash_partition", default=None)


@contextlib.contextmanager
def partitioned(mesh, batch_axes=(), head_axis: Optional[str] = None):
    """While tracing a step jitted over ``mesh``: run the splash kernel inside ``shard_map``
    over it, the batch split over ``batch_axes`` and the heads over ``head_axis`` (each only
    where it divides the array; otherwise that dimension is gathered)."""
    token = _PARTITION.set((mesh, tuple(batch_axes), head_axis))
    try:
        yield
    finally:
        _PARTITION.reset(token)


def auto_safe() -> bool:
    """Whether ``attention="auto"`` may pick the kernel here: inside :func:`partitioned`, or in a
    process with one device (a Pallas TPU kernel cannot be partitioned by a multi-device jit)."""
    return _PARTITION.get() is not None or jax.device_count() == 1


# -- the kernel ------------------------------------------------------------------------------------


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@functools.lru_cache(maxsize=64)
def _kernel(sq_pad: int, sk_pad: int, g: int, causal: bool, window: Optional[int], offset: int, bq: int, bkv: int,
            interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk_lib
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

    shape = (sq_pad, sk_pad)
    with jax.ensure_compile_time_eval():  # the mask tables are constants, never a trace's tracers
        return _make(sk_lib, mask_lib, shape, g, causal, window, offset, bq, bkv, interpret)


def _make(sk_lib, mask_lib, shape, g, causal, window, offset, bq, bkv, interpret):
    if not causal:
        head = mask_lib.FullMask(shape)
    elif window is None:
        head = mask_lib.CausalMask(shape, offset=offset)
    else:
        head = mask_lib.LocalMask(shape, window_size=(window - 1, 0), offset=offset)
    blocks = sk_lib.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                               block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    return sk_lib.make_splash_mqa(mask_lib.MultiHeadMask([head] * g), block_sizes=blocks, head_shards=1,
                                  q_seq_shards=1, interpret=interpret)


def splash_attention(q, k, v, mask, *, scale: float, block_size: int = 0, interpret: Optional[bool] = None):
    """Attention of ``q [b, q, heads, d]`` over ``k, v [b, k, kv_heads, d]`` under ``mask``
    with the splash kernel; returns ``[b, q, heads, d]`` in ``q``'s dtype.

    ``block_size``: the kernel's query and key block, rounded to a multiple of 128 (``0``:
    512, or the padded length when shorter). ``interpret``: run in Pallas' interpret mode
    (default: off a TPU).

    Raises:
      ConfigError: the mask is one the kernel cannot express (:func:`unsupported`).
    """
    sq, sk = q.shape[1], k.shape[1]
    why = unsupported(mask, sq, sk)
    if why is not None:
        raise ConfigError(f"attention='splash' cannot express {why}; use attention='auto' or 'blockwise'.")
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    if interpret:
        warnings.warn(
            f"attention='splash' runs the TPU kernel in Pallas interpret mode on {jax.default_backend()!r}: exact "
            "but much slower than attention='blockwise'; use it to check what a TPU computes.",
            SplashInterpretWarning, stacklevel=3,
        )
    part = _PARTITION.get()
    run = functools.partial(_local, scale=scale, block_size=block_size, interpret=interpret)
    if part is None:
        return run(q, k, v, mask)
    mesh, batch_axes, head_axis = part
    P = jax.sharding.PartitionSpec

    def size(axes):
        return int(np.prod([mesh.shape[a] for a in axes])) if axes else 1

    bspec = tuple(a for a in batch_axes if a in mesh.shape)
    bspec = bspec if bspec and q.shape[0] % size(bspec) == 0 else None
    hspec = head_axis if head_axis in mesh.shape and k.shape[2] % mesh.shape[head_axis] == 0 else None
    rows = P(bspec, None)
    heads = P(bspec, None, hspec, None)
    mspec = dataclasses.replace(mask, kv_valid=rows, q_pos=rows, k_pos=rows,
                                q_seg=None if mask.q_seg is None else rows, k_seg=None if mask.k_seg is None else rows)
    return jax.shard_map(run, mesh=mesh, in_specs=(heads, heads, heads, mspec), out_specs=heads,
                         check_vma=False)(q, k, v, mask)


def _local(q, k, v, mask, *, scale, block_size, interpret):
    """The kernel on one device's shard of the batch (and heads)."""
    b, sq, h, d = q.shape
    sk, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    n = sk - sq
    blk = max(128, _round_up(block_size or DEFAULT_BLOCK, 128))
    bq = min(blk, _round_up(sq, 128))
    sq_pad = _round_up(sq, bq)
    bkv = min(blk, _round_up(sq_pad + n, 128))
    sk_pad = _round_up(sq_pad + n, bkv)  # at least sq_pad + n: key i + n exists for every padding query i

    # Segment ids: every query keeps its document (0 without documents), padding keys and the
    # block padding get PAD. Query i then sees key j exactly when the reference does (the
    # kernel's causal / local mask on indices equals the one on slots inside a document).
    qs = jnp.zeros((b, sq), jnp.int32) if mask.q_seg is None else mask.q_seg.astype(jnp.int32)
    ks = jnp.zeros((b, sk), jnp.int32) if mask.k_seg is None else mask.k_seg.astype(jnp.int32)
    if mask.padded:
        ks = jnp.where(mask.kv_valid, ks, PAD)
    qs = jnp.pad(qs, ((0, 0), (0, sq_pad - sq)), constant_values=PAD)
    ks = jnp.pad(ks, ((0, 0), (0, sk_pad - sk)), constant_values=PAD)

    qh = (q * jnp.asarray(scale, q.dtype)).reshape(b, sq, kvh, g, d)
    qh = jnp.pad(qh, ((0, 0), (0, sq_pad - sq), (0, 0), (0, 0), (0, 0))).transpose(0, 2, 3, 1, 4)  # [b, kvh, g, sq, d]
    kh = jnp.pad(k, ((0, 0), (0, sk_pad - sk), (0, 0), (0, 0))).transpose(0, 2, 1, 3)  # [b, kvh, sk, d]
    vh = jnp.pad(v, ((0, 0), (0, sk_pad - sk), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    kernel = _kernel(sq_pad, sk_pad, g, bool(mask.causal), mask.window, n, bq, bkv, bool(interpret))
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

    # Without padding, documents or block padding every id is 0: the kernel then skips them.
    no_ids = not mask.padded and mask.q_seg is None and sq_pad == sq and sk_pad == sk

    def one(qg, kk, vv, qseg, kseg):  # [g, sq, d], [sk, d], [sk, d], [sq], [sk]
        return kernel(qg, kk, vv, segment_ids=None if no_ids else SegmentIds(qseg, kseg))

    per_head = jax.vmap(one, in_axes=(0, 0, 0, None, None))
    out = jax.vmap(per_head)(qh, kh, vh, qs, ks)  # [b, kvh, g, sq_pad, d]
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, sq_pad, h, -1)[:, :sq]
    if mask.padded or mask.q_seg is not None:
        # A query with no allowed key (left padding) averages every key's value, as the
        # reference does; the kernel gave it the mean over the blocks it visited instead.
        # (A reduction of the mask's compares; XLA fuses it, no [q, k] array is kept.)
        full = ~mask.allowed().any(-1)  # [b, sq]
        vmean = jnp.repeat(v.astype(jnp.float32).mean(1), g, axis=1)  # [b, h, d]
        out = jnp.where(full[:, :, None, None], vmean[:, None].astype(out.dtype), out)
    return out.astype(q.dtype)
