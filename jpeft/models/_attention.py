"""Attention for jpeft's model families: a structured mask and three kernels behind one call.

The mask is never built as a ``[q, k]`` matrix unless a kernel needs one: an
:class:`AttentionMask` holds per-token arrays (which key slots hold real tokens, each token's
slot or position inside its document, optional segment ids) and static flags (causal,
sliding window), and each kernel computes the part of ``[q, k]`` it needs from them.

Kernels (``implementation=``):

* ``"reference"``: the dense mask and ``jax.nn.dot_product_attention`` (XLA); the score
  matrix ``[batch, heads, q, k]`` is materialised, so memory grows with ``q * k``.
* ``"blockwise"``: online-softmax attention over key blocks of ``block_size`` (as in
  memory-efficient / flash attention), written with ``jax.lax.scan``, with a ``custom_vjp``
  whose backward pass recomputes each block's probabilities from the saved row maximum and
  normaliser. Forward and backward hold one ``[batch, heads, q, block_size]`` tile at a time,
  so memory grows linearly with the sequence length. It equals the reference to float32
  rounding (tests/test_attention.py), including fully masked (padding) query rows, which
  both average the values of every real key.
* ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")``, the fused kernel on
  NVIDIA GPUs; float16/bfloat16 only. A plain causal or sliding-window mask with no padding
  information, no prefix and no cache is passed as ``is_causal`` / ``local_window_size``;
  anything else goes as the dense boolean mask.
* ``"auto"`` (the default): ``"cudnn"`` on a GPU backend for float16/bfloat16 and a head
  width cuDNN takes (a multiple of 8, at most 128); elsewhere ``"blockwise"`` when the keys
  span more than one block, and ``"reference"`` when they fit in one (the blockwise kernel
  would then hold the same score matrix and only add the backward recomputation).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.errors import ConfigError, InputValidationError

Array = jax.Array

IMPLEMENTATIONS = ("auto", "blockwise", "reference", "cudnn")

# The value jax.nn.dot_product_attention gives masked logits (-0.7 * float32 max): a row whose
# keys are all masked then averages every key, and the blockwise kernel does the same.
_MASKED = float(-0.7 * np.finfo(np.float32).max)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["kv_valid", "q_pos", "k_pos", "q_seg", "k_seg"],
    meta_fields=["causal", "window", "padded"],
)
@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """Which keys each query may attend to, as per-token arrays (a pytree).

    Query ``i`` of row ``b`` sees key ``j`` when ``kv_valid[b, j]`` and, if ``causal``,
    ``k_pos[b, j] <= q_pos[b, i]``, and, with a ``window``, ``q_pos[b, i] - k_pos[b, j] <
    window``, and, with segments, ``q_seg[b, i] == k_seg[b, j]`` or ``k_seg[b, j] < 0`` (a
    prefix key, seen by every segment).

    Attributes:
      kv_valid: ``[batch, k]`` bool, True for real (non-padding) key slots.
      q_pos, k_pos: ``[batch, q]`` / ``[batch, k]`` int32 slot of each token (its index in the
        row or cache; inside its document for packed rows). Prefix keys get ``-n .. -1``.
      q_seg, k_seg: ``[batch, q]`` / ``[batch, k]`` int32 document ids of packed rows, or None.
      causal: keys after the query are hidden.
      window: sliding-window width (Mistral / Qwen2 sliding layers) or None.
      padded: False when the caller knows statically that every key slot is real.
    """

    kv_valid: Array
    q_pos: Array
    k_pos: Array
    q_seg: Optional[Array] = None
    k_seg: Optional[Array] = None
    causal: bool = True
    window: Optional[int] = None
    padded: bool = True

    def allowed(self, kv_valid=None, k_pos=None, k_seg=None) -> Array:
        """``[batch, q, k]`` bool for the given key arrays (default: all keys)."""
        kv_valid = self.kv_valid if kv_valid is None else kv_valid
        k_pos = self.k_pos if k_pos is None else k_pos
        k_seg = self.k_seg if k_seg is None else k_seg
        return _allowed(self.q_pos, self.q_seg, kv_valid, k_pos, k_seg, self.causal, self.window)

    def dense(self) -> Array:
        """The mask as ``[batch, 1, q, k]`` bool (what ``jax.nn.dot_product_attention`` takes)."""
        return self.allowed()[:, None]

    def with_prefix(self, n: int) -> "AttentionMask":
        """The mask over ``n`` prefix keys followed by these keys: prefix key ``j`` sits at slot
        ``j - n`` (so a sliding window hides it once the query is ``window`` slots past it, as in
        transformers, where the prefix fills the first cache slots), is always real and is
        seen by every segment."""
        b = self.kv_valid.shape[0]
        kv_valid = jnp.concatenate([jnp.ones((b, n), bool), self.kv_valid], axis=1)
        pre_pos = jnp.broadcast_to(jnp.arange(-n, 0, dtype=self.k_pos.dtype), (b, n))
        k_pos = jnp.concatenate([pre_pos, self.k_pos], axis=1)
        k_seg = self.k_seg
        if k_seg is not None:
            k_seg = jnp.concatenate([jnp.full((b, n), -1, k_seg.dtype), k_seg], axis=1)
        return dataclasses.replace(self, kv_valid=kv_valid, k_pos=k_pos, k_seg=k_seg)


def _allowed(q_pos, q_seg, kv_valid, k_pos, k_seg, causal, window):
    m = kv_valid[:, None, :]
    qp = q_pos[:, :, None]
    kp = k_pos[:, None, :]
    if causal:
        m = m & (kp <= qp)
    if window is not None:
        m = m & ((qp - kp) < window)
    if q_seg is not None:
        m = m & ((q_seg[:, :, None] == k_seg[:, None, :]) | (k_seg[:, None, :] < 0))
    return m


def segment_slots(segment_ids: Array) -> Array:
    """Index of each token inside its segment (document): ``[batch, seq]`` int32, 0 at every
    point where the segment id changes."""
    s = segment_ids.shape[1]
    idx = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), segment_ids.shape)
    change = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    start = jax.lax.cummax(jnp.where(change, idx, 0), axis=1)
    return idx - start


# -- kernels -------------------------------------------------------------------------------------


def check_implementation(name: str, what: str = "attention") -> None:
    if name not in IMPLEMENTATIONS:
        raise ConfigError(
            f"{what} implementation {name!r} is not known; use one of {list(IMPLEMENTATIONS)} "
            "('auto' picks cuDNN on GPU for 16-bit dtypes, blockwise elsewhere)."
        )


def resolve(implementation: str, dtype, head_dim: int, k_len: Optional[int] = None, block_size: int = 512) -> str:
    """The kernel ``implementation`` stands for on this backend (``"auto"`` resolved for
    ``k_len`` keys: with at most one key block the blockwise kernel would hold the whole score
    matrix anyway, so the reference program, which keeps the probabilities for the backward
    pass instead of recomputing them, is used)."""
    check_implementation(implementation)
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if implementation == "auto":
        on_gpu = jax.default_backend() in ("gpu", "cuda", "rocm")
        if on_gpu and half and head_dim % 8 == 0 and head_dim <= 128:
            return "cudnn"
        return "reference" if (k_len is not None and k_len <= block_size) else "blockwise"
    if implementation == "cudnn":
        if jax.default_backend() not in ("gpu", "cuda"):
            raise ConfigError(
                f"attention='cudnn' needs an NVIDIA GPU backend, but JAX runs on {jax.default_backend()!r}; "
                "use attention='auto' or 'blockwise'."
            )
        if not half:
            raise ConfigError(
                f"attention='cudnn' takes float16 or bfloat16, but the model computes in {jnp.dtype(dtype)}; "
                "set dtype='bfloat16' or use attention='blockwise'."
            )
    return implementation


def dot_product_attention(q, k, v, mask: AttentionMask, *, scale: float, implementation: str = "auto",
                          block_size: int = 512, plain: bool = False):
    """Attention of ``q [b, q, heads, d]`` over ``k, v [b, k, kv_heads, d]`` (grouped-query when
    ``kv_heads < heads``) under ``mask``; returns ``[b, q, heads, d]`` in ``q``'s dtype.

    ``plain``: the caller knows the mask is exactly ``mask.causal`` / ``mask.window`` over the
    current tokens (no cache, no prefix, no padding, no segments), which lets the cuDNN kernel
    run without a dense mask.
    """
    impl = resolve(implementation, q.dtype, q.shape[-1], k.shape[1], block_size)
    if impl == "reference":
        return jax.nn.dot_product_attention(q, k, v, mask=mask.dense(), scale=scale).astype(q.dtype)
    if impl == "cudnn":
        if plain:
            window = None if mask.window is None else (mask.window - 1, 0)
            return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=mask.causal,
                                                local_window_size=window, implementation="cudnn")
        return jax.nn.dot_product_attention(q, k, v, mask=mask.dense(), scale=scale, implementation="cudnn")
    if not isinstance(block_size, int) or block_size < 1:
        raise ConfigError(f"attention block_size must be a positive integer, found {block_size!r}.")
    return blockwise_attention(q, k, v, mask, scale=scale, block_size=block_size)


def blockwise_attention(q, k, v, mask: AttentionMask, *, scale: float, block_size: int = 512):
    """Online-softmax attention over key blocks of ``block_size`` (see the module docstring)."""
    b, sq, h, d = q.shape
    sk, kvh = k.shape[1], k.shape[2]
    if h % kvh:
        raise InputValidationError(f"attention: {h} query heads are not a multiple of {kvh} key/value heads.")
    bk = min(block_size, sk)
    nk = -(-sk // bk)
    pad = nk * bk - sk

    def blocks(x, fill):
        if pad:
            widths = [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)
            x = jnp.pad(x, widths, constant_values=fill)
        return jnp.moveaxis(x.reshape((b, nk, bk) + x.shape[2:]), 1, 0)

    kb, vb = blocks(k, 0), blocks(v, 0)
    kvb, kpb = blocks(mask.kv_valid, False), blocks(mask.k_pos, 0)
    ksb = None if mask.k_seg is None else blocks(mask.k_seg, 0)
    static = (float(scale), bool(mask.causal), mask.window, int(sk), int(bk))
    out = _flash(static, q, kb, vb, kvb, kpb, ksb, mask.q_pos, mask.q_seg)
    return out.astype(q.dtype)


def _block_logits(static, qg, kblk, kv_valid, k_pos, k_seg, q_pos, q_seg, start):
    """Masked logits ``[b, kvh, g, q, bk]`` (f32) of one key block, and where they are allowed."""
    scale, causal, window, sk, bk = static
    s = jnp.einsum("bqkgd,bskd->bkgqs", qg, kblk, preferred_element_type=jnp.float32) * scale
    ok = _allowed(q_pos, q_seg, kv_valid, k_pos, k_seg, causal, window)[:, None, None]
    s = jnp.where(ok, s, _MASKED)
    in_range = ((start + jnp.arange(bk)) < sk).reshape(1, 1, 1, 1, bk)  # block padding never counts
    s = jnp.where(in_range, s, -jnp.inf)
    return s, ok & in_range


def _group(q, kvh):
    b, sq, h, d = q.shape
    return q.reshape(b, sq, kvh, h // kvh, d)


def _forward(static, q, kb, vb, kvb, kpb, ksb, q_pos, q_seg):
    bk = static[4]
    b, sq, h, d = q.shape
    kvh = kb.shape[3]
    qg = _group(q, kvh)
    g = h // kvh
    m0 = jnp.full((b, kvh, g, sq), _MASKED, jnp.float32)
    l0 = jnp.zeros((b, kvh, g, sq), jnp.float32)
    a0 = jnp.zeros((b, kvh, g, sq, vb.shape[-1]), jnp.float32)

    def step(carry, xs):
        m, l, acc = carry
        i, kblk, vblk, kv, kp, ks = xs
        s, _ = _block_logits(static, qg, kblk, kv, kp, ks, q_pos, q_seg, i * bk)
        m_new = jnp.maximum(m, s.max(-1))
        corr = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[..., None])
        l = l * corr + p.sum(-1)
        pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(vblk.dtype), vblk, preferred_element_type=jnp.float32)
        acc = acc * corr[..., None] + pv
        return (m_new, l, acc), None

    nk = kb.shape[0]
    (m, l, acc), _ = jax.lax.scan(step, (m0, l0, a0), (jnp.arange(nk), kb, vb, kvb, kpb, ksb))
    out = acc / l[..., None]  # [b, kvh, g, q, d]
    out = jnp.moveaxis(out, 3, 1).reshape(b, sq, h, -1)
    return out, m, l


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(static, q, kb, vb, kvb, kpb, ksb, q_pos, q_seg):
    return _forward(static, q, kb, vb, kvb, kpb, ksb, q_pos, q_seg)[0].astype(q.dtype)


def _flash_fwd(static, q, kb, vb, kvb, kpb, ksb, q_pos, q_seg):
    out, m, l = _forward(static, q, kb, vb, kvb, kpb, ksb, q_pos, q_seg)
    out = out.astype(q.dtype)
    return out, (q, kb, vb, kvb, kpb, ksb, q_pos, q_seg, out, m, l)


def _flash_bwd(static, res, dout):
    q, kb, vb, kvb, kpb, ksb, q_pos, q_seg, out, m, l = res
    scale, bk = static[0], static[4]
    b, sq, h, d = q.shape
    kvh = kb.shape[3]
    qg = _group(q, kvh)
    dog = _group(dout, kvh).astype(jnp.float32)
    # D_i = sum_d dO_id O_id, the row term of the softmax backward.
    dsum = jnp.einsum("bqkgd,bqkgd->bkgq", dog, _group(out, kvh).astype(jnp.float32))

    def step(dq, xs):
        i, kblk, vblk, kv, kp, ks = xs
        s, ok = _block_logits(static, qg, kblk, kv, kp, ks, q_pos, q_seg, i * bk)
        p = jnp.exp(s - m[..., None]) / l[..., None]
        dv = jnp.einsum("bkgqs,bqkgd->bskd", p, dog)
        dp = jnp.einsum("bqkgd,bskd->bkgqs", dog, vblk.astype(jnp.float32))
        ds = jnp.where(ok, p * (dp - dsum[..., None]), 0.0) * scale
        dq = dq + jnp.einsum("bkgqs,bskd->bqkgd", ds, kblk.astype(jnp.float32))
        dk = jnp.einsum("bkgqs,bqkgd->bskd", ds, qg.astype(jnp.float32))
        return dq, (dk.astype(kblk.dtype), dv.astype(vblk.dtype))

    nk = kb.shape[0]
    dq0 = jnp.zeros(qg.shape, jnp.float32)
    dq, (dkb, dvb) = jax.lax.scan(step, dq0, (jnp.arange(nk), kb, vb, kvb, kpb, ksb))
    zeros_like = lambda x: None if x is None else jnp.zeros(x.shape, jax.dtypes.float0)
    return (dq.reshape(q.shape).astype(q.dtype), dkb, dvb, zeros_like(kvb), zeros_like(kpb), zeros_like(ksb),
            zeros_like(q_pos), zeros_like(q_seg))


_flash.defvjp(_flash_fwd, _flash_bwd)
