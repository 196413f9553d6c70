"""Attention for jpeft's model families: a structured mask and three kernels behind one call.

The mask is never built as a ``[q, k]`` matrix unless a kernel needs one: an
:class:`AttentionMask` holds per-token arrays (which key slots hold real tokens, each token's
slot or position inside its document, optional segment ids) and static flags (causal,
sliding window), and each kernel computes the part of ``[q, k]`` it needs from them.

Kernels (``implementation=``):

* ``"reference"``: the dense mask and ``jax.nn.dot_product_attention`` (XLA); the score
  matrix ``[batch, heads, q, k]`` is materialised, so memory grows with ``q * k``. On the CPU
  backend float16 inputs are computed in float32 (XLA's CPU backend cannot compile the
  float16 dot algorithm ``jax.nn`` asks for).
* ``"blockwise"``: online-softmax attention over tiles of ``block_size`` queries by
  ``block_size`` keys (as in memory-efficient / flash attention), one ``jax.lax.scan`` over a
  static list of tiles (unrolled when the tiles are small and few, :func:`should_unroll`),
  with a ``custom_vjp`` whose backward pass recomputes each tile's
  probabilities from each row's saved log-sum-exp. Forward and backward hold one
  ``[batch, heads, block_size, block_size]`` tile at a time (an unrolled loop, at most 16
  small tiles, may hold several), so memory grows linearly with the sequence length. Causal attention over the current tokens (``AttentionMask.diagonal``)
  computes only the tiles on or below the diagonal and inside the sliding window, about half
  of them at long sequences (a window of ``w`` keeps about ``w / block_size + 1`` per query
  block), and the tiles wholly below the diagonal and inside the window (28 of the 36 at 4096
  tokens with blocks of 512) skip the causal and window masks (padding and segments still
  apply); other masks (a cache, bidirectional) take one query tile of the whole length over
  every key block. Queries are laid out heads-first (``[kv_heads, group * block, d]``, the
  query heads of one key/value head stacked), so each tile is a plain batched matmul, and the
  backward pass recomputes a tile key-major so that the key and value gradients are plain
  matmuls too; from key blocks of 128 on it forms each tile's query gradient transposed,
  ``K^T dS`` (the tile's keys copied transposed), since XLA's CPU dot runs the product that
  contracts its left operand's rows (``dS^T K``) ~1.7x slower (:data:`DQ_TRANSPOSED_MIN_KEYS`;
  the reason the Dense layer's wide weight gradients take a transposed copy of the input,
  ``jpeft._ops._dense_product``). It equals the reference to float32 rounding
  (tests/test_attention.py), including fully masked (padding) query rows, which both average
  the values of every key.
* ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")``, the fused kernel on
  NVIDIA GPUs; float16/bfloat16 only. A plain causal or sliding-window mask with no padding
  information, no prefix and no cache is passed as ``is_causal`` / ``local_window_size``;
  anything else goes as the dense boolean mask.
* ``"splash"``: the Pallas TPU splash-attention kernel that JAX ships (fused, skips masked
  blocks), behind the same call (:mod:`jpeft._splash` translates the mask: causal or
  sliding over the current tokens, prefixes, packed documents, padding, grouped-query heads,
  bidirectional; not a KV cache, not prefix keys with packed documents). Equal to the
  reference on every row. Off a TPU it runs in Pallas' interpret mode (exact, slow, with a
  warning): the way to check on a CPU what a TPU computes.
* ``"auto"`` (the default): ``"cudnn"`` on a GPU backend for float16/bfloat16 and a head
  width cuDNN takes (a multiple of 8, at most 128); ``"splash"`` on a TPU backend for a mask
  it expresses, where a Pallas kernel can run (a one-device process, or jpeft's mesh step,
  which maps it over the mesh with ``shard_map``); elsewhere ``"blockwise"`` when the keys
  span more than one block, and ``"reference"`` when they fit in one (the blockwise kernel
  would then hold the same score matrix and only add the backward recomputation).

The block size (``block_size=0``, the models' default, picks it: :func:`auto_block_size`):
causal attention over the current tokens (a training or prefill step) takes about four query
blocks per row, a power of two from 64 to 256 (64 up to 256 tokens, 128 at 512, 256 from
513 on), so the causal skip leaves out the wholly masked tiles while each stays large; any other
mask (a cache, bidirectional) takes blocks of 512. Measured in the training step on the CPU
(docs/BENCHMARKS.md, "Session 21"); an explicit ``block_size`` overrides it. Where that block is
256 (from 513 tokens on) the tiles take keys in blocks of 512 (:func:`auto_key_block_size`):
fewer, wider products, 8-12 % off the LoRA training step at 1,024 tokens on the CPU
(docs/BENCHMARKS.md, "Session 35"), and 4-8 % at 2,048 and 4,096 tokens against the square
512 x 512 tiles these lengths took before, in one process (the paired runs against HF PEFT
did not show it: "Session 36"). 128 x 256 at 512 tokens, 128 x 512
and 256 x 1,024 at 4,096 measured slower. The rule is the same on every backend the blockwise
kernel runs on (measured on the CPU only).
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.errors import ConfigError, InputValidationError
from jpeft import _splash

Array = jax.Array

IMPLEMENTATIONS = ("auto", "blockwise", "reference", "cudnn", "splash")

# The value jax.nn.dot_product_attention gives masked logits (-0.7 * float32 max): a row whose
# keys are all masked then averages every key, and the blockwise kernel does the same.
_MASKED = float(-0.7 * np.finfo(np.float32).max)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["kv_valid", "q_pos", "k_pos", "q_seg", "k_seg"],
    meta_fields=["causal", "window", "padded", "diagonal"],
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
      diagonal: a static promise about the layout, or None: query index ``i`` sees no key
        index ``j > i + diagonal`` and, with a ``window``, none with ``i + diagonal - j >=
        window``. :func:`jpeft.models._layers.causal_mask` gives it (0) over the current tokens
        without a cache (documents are contiguous runs, so slots grow with the index inside
        each); the blockwise kernel then skips the key blocks that lie wholly outside.
    """

    kv_valid: Array
    q_pos: Array
    k_pos: Array
    q_seg: Optional[Array] = None
    k_seg: Optional[Array] = None
    causal: bool = True
    window: Optional[int] = None
    padded: bool = True
    diagonal: Optional[int] = None

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
        diagonal = None if self.diagonal is None else self.diagonal + n
        if k_seg is not None:
            k_seg = jnp.concatenate([jnp.full((b, n), -1, k_seg.dtype), k_seg], axis=1)
            if self.window is not None:
                diagonal = None  # a later document's slots restart: the prefix is in its window again
        return dataclasses.replace(self, kv_valid=kv_valid, k_pos=k_pos, k_seg=k_seg, diagonal=diagonal)


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


# -- attention-probability dropout ---------------------------------------------------------------
# Which probabilities survive is a hash of (seed, batch row, query head, query index, key index),
# not a draw of a random array of the tile's shape: every kernel and every tiling then drops the
# same entries, so the blockwise kernel equals the reference with dropout too, and its backward
# pass recomputes each tile's mask from the indices alone (nothing [q, k]-sized is kept).

_GOLDEN = np.uint32(0x9E3779B9)


def _fmix(h):
    """MurmurHash3's 32-bit finaliser (full avalanche) on a uint32 array."""
    h = h ^ (h >> 16)
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def dropout_seed(key) -> Array:
    """The uint32 seed of the dropout masks drawn from a JAX ``key``."""
    return jax.random.bits(key, (), jnp.uint32)


def row_hash(seed, b_idx, h_idx, q_idx) -> Array:
    """The hash of each query row (broadcast of the three index arrays), uint32."""
    h = _fmix(jnp.asarray(seed, jnp.uint32) ^ (jnp.asarray(b_idx, jnp.uint32) * _GOLDEN))
    h = _fmix(h ^ (jnp.asarray(h_idx, jnp.uint32) * np.uint32(0x7FEB352D)))
    return _fmix(h ^ (jnp.asarray(q_idx, jnp.uint32) * np.uint32(0x846CA68B)))


def keep_scale(rows, k_idx, rate: float) -> Array:
    """``1 / (1 - rate)`` where a probability is kept, else 0 (float32): row hashes against key
    indices, two arrays of one rank that broadcast (``[..., q, 1]`` and ``[..., 1, k]``)."""
    bits = _fmix(rows ^ (jnp.asarray(k_idx, jnp.uint32) * _GOLDEN))
    threshold = np.uint32(min(int(round(rate * 2.0 ** 32)), 2 ** 32 - 1))
    return jnp.where(bits >= threshold, np.float32(1.0 / (1.0 - rate)), np.float32(0.0))


def check_dropout(rate, what: str = "attention dropout rate") -> float:
    """``rate`` as a float in ``[0, 1)`` (numpy scalars included), else a ``ConfigError`` naming ``what``."""
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0.0 <= float(rate) < 1.0:
        raise ConfigError(f"{what} must be a number in [0, 1), found {rate!r}.")
    return float(rate)


def _reference_with_dropout(q, k, v, mask: AttentionMask, scale: float, rate: float, seed):
    """The reference attention with dropout on the probabilities (``softmax``, then each kept
    entry scaled by ``1 / (1 - rate)``, as torch's attention dropout): the dense ``[b, h, q,
    k]`` scores. Fully masked query rows (padding) average every key, undropped, as the
    blockwise kernel does."""
    b, sq, h, _ = q.shape
    sk, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    kr, vr = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, kr, preferred_element_type=jnp.float32) * np.float32(scale)
    allowed = mask.dense()
    s = jnp.where(allowed, s, _MASKED)
    p = jax.nn.softmax(s, axis=-1)
    rows = row_hash(seed, jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None], jnp.arange(sq)[None, None, :])
    keep = keep_scale(rows[..., None], jnp.arange(sk)[None, None, None, :], rate)
    full = ~allowed.any(-1, keepdims=True)
    p = p * jnp.where(full, np.float32(1.0), keep)
    return jnp.einsum("bhqk,bkhd->bqhd", p, vr.astype(jnp.float32)).astype(q.dtype)


# -- kernels -------------------------------------------------------------------------------------


def check_implementation(name: str, what: str = "attention") -> None:
    if name not in IMPLEMENTATIONS:
        raise ConfigError(
            f"{what} implementation {name!r} is not known; use one of {list(IMPLEMENTATIONS)} "
            "('auto' picks cuDNN on GPU for 16-bit dtypes, the splash kernel on TPU, blockwise elsewhere)."
        )


DEFAULT_BLOCK = 512  # the block of masks other than causal-over-current-tokens
CAUSAL_MAX_BLOCK = 256  # the largest automatic query block under causal attention over the current tokens


def auto_block_size(q_len: int, mask: AttentionMask) -> int:
    """The blockwise kernel's block for ``q_len`` queries under ``mask`` (``block_size=0``):
    with ``mask.diagonal`` (causal over the current tokens) the smallest power of two at least
    ``q_len / 4``, clamped to 64..256 (with keys in blocks of 512 at 256:
    :func:`auto_key_block_size`); otherwise 512."""
    if not (mask.causal and mask.diagonal is not None):
        return DEFAULT_BLOCK
    quarter = max(1, -(-q_len // 4))
    return int(min(CAUSAL_MAX_BLOCK, max(64, 1 << (quarter - 1).bit_length())))


def auto_key_block_size(block: int, mask: AttentionMask) -> Optional[int]:
    """The key block that goes with the automatic query ``block`` under ``mask`` (``None``:
    square tiles): 512 keys for 256 queries under causal attention over the current tokens,
    the one shape that measured faster than square tiles in the CPU training step, from 1,024
    to 4,096 tokens (docs/BENCHMARKS.md, "Session 35" and "Session 36")."""
    if block == CAUSAL_MAX_BLOCK and mask.causal and mask.diagonal is not None:
        return DEFAULT_BLOCK
    return None


def resolve(implementation: str, dtype, head_dim: int, k_len: Optional[int] = None, block_size: int = 512) -> str:
    """The kernel ``implementation`` stands for on this backend (``"auto"`` resolved for
    ``k_len`` keys taken in blocks of ``block_size``: with at most one key block the blockwise
    kernel would hold the whole score matrix anyway, so the reference program, which keeps the
    probabilities for the backward pass instead of recomputing them, is used)."""
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
                          block_size: int = 0, plain: bool = False, dropout_rate: float = 0.0, dropout_key=None):
    """Attention of ``q [b, q, heads, d]`` over ``k, v [b, k, kv_heads, d]`` (grouped-query when
    ``kv_heads < heads``) under ``mask``; returns ``[b, q, heads, d]`` in ``q``'s dtype.

    ``block_size``: the blockwise kernel's block; ``0`` picks it (:func:`auto_block_size`, and
    the keys' with :func:`auto_key_block_size`); the splash kernel rounds it to a multiple of
    128 (``0``: 512).
    ``plain``: the caller knows the mask is exactly ``mask.causal`` / ``mask.window`` over the
    current tokens (no cache, no prefix, no padding, no segments), which lets the cuDNN kernel
    run without a dense mask.
    ``dropout_rate``, ``dropout_key``: dropout on the attention probabilities (a training step's
    ``attn_pdrop``), active when both are set: each probability is dropped with that rate and
    the kept ones scaled by ``1 / (1 - rate)``. The same entries are dropped by the reference
    and the blockwise kernel (a hash of the indices, see :func:`keep_scale`); the fused cuDNN and
    splash kernels take no dropout, so ``"auto"`` then runs the blockwise kernel (or the
    reference) and naming one of them is a ``ConfigError``.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 0:
        raise ConfigError(f"attention block_size must be a positive integer or 0 (automatic), found {block_size!r}.")
    rate = check_dropout(dropout_rate)
    seed = dropout_seed(dropout_key) if rate > 0.0 and dropout_key is not None else None
    if seed is not None and implementation in ("cudnn", "splash"):
        raise ConfigError(
            f"attention={implementation!r} has no attention-probability dropout, but this call drops with rate {rate}; "
            "use attention='auto' or 'blockwise' for training with dropout (or train with the dropout rate at 0).")
    if seed is None and (implementation == "splash"
                         or (implementation == "auto" and _splash_fits(mask, q.shape[1], k.shape[1]))):
        return _splash.splash_attention(q, k, v, mask, scale=scale, block_size=block_size)
    key_block = None
    if not block_size:
        block_size = auto_block_size(q.shape[1], mask)
        key_block = auto_key_block_size(block_size, mask)
    if seed is None:
        impl = resolve(implementation, q.dtype, q.shape[-1], k.shape[1], key_block or block_size)
    else:  # the fused kernels take no dropout: the reference where the keys fit one block, else the blockwise one
        check_implementation(implementation)
        one_block = implementation == "auto" and k.shape[1] <= (key_block or block_size)
        impl = "reference" if implementation == "reference" or one_block else "blockwise"
    if impl == "reference":
        if seed is not None:
            return _reference_with_dropout(q, k, v, mask, scale, rate, seed)
        dt = q.dtype
        if jnp.dtype(dt) == jnp.dtype(jnp.float16) and jax.default_backend() == "cpu":
            # jax.nn asks for the F16_F16_F32 dot algorithm, which XLA's CPU backend cannot compile: every
            # jitted float16 call failed with a raw ValueError (eagerly jax.nn falls back). Float32 there.
            q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
        return jax.nn.dot_product_attention(q, k, v, mask=mask.dense(), scale=scale).astype(dt)
    if impl == "cudnn":
        if plain:
            window = None if mask.window is None else (mask.window - 1, 0)
            return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=mask.causal,
                                                local_window_size=window, implementation="cudnn")
        return jax.nn.dot_product_attention(q, k, v, mask=mask.dense(), scale=scale, implementation="cudnn")
    return blockwise_attention(q, k, v, mask, scale=scale, block_size=block_size, key_block_size=key_block,
                               dropout_rate=rate if seed is not None else 0.0, dropout_seed=seed)


def _splash_fits(mask: AttentionMask, sq: int, sk: int) -> bool:
    """Whether ``"auto"`` takes the Pallas splash kernel: on a TPU, for a mask it expresses,
    where a Pallas kernel can run (:func:`jpeft._splash.auto_safe`)."""
    return (jax.default_backend() == "tpu" and _splash.unsupported(mask, sq, sk) is None
            and _splash.auto_safe())


def blockwise_attention(q, k, v, mask: AttentionMask, *, scale: float, block_size: int = 512,
                        unroll: Optional[bool] = None, key_block_size: Optional[int] = None,
                        dropout_rate: float = 0.0, dropout_seed=None):
    """Online-softmax attention over tiles of ``block_size`` queries by ``block_size`` keys (see
    the module docstring). With ``mask.diagonal`` set (causal attention over the current tokens)
    only the tiles on or below the diagonal, and inside the sliding window, are computed, and the
    tiles wholly below the diagonal and inside the window skip the causal and window masks
    (they still apply padding and segments when the mask has them).

    ``key_block_size``: the tiles' keys, when they should differ from their queries
    (``block_size``); ``None`` keeps the tiles square. :func:`dot_product_attention`'s
    automatic choice sets it (:func:`auto_key_block_size`); ``benchmarks/attention_cpu.py
    --blocks 256x512`` times other shapes.

    ``dropout_rate``, ``dropout_seed``: dropout on the probabilities (:func:`dot_product_attention`),
    each tile's mask recomputed from its indices in both passes.

    ``unroll``: unroll the loops over tiles instead of scanning them (the numbers are the same).
    ``None`` (the default) unrolls small tiles only: at most :data:`UNROLL_TILE` queries and
    keys each, and at most :data:`UNROLL_TILES` of them (see :func:`should_unroll`). ``True``
    also serves XLA's cost analysis, which counts a loop's body once.
    """
    b, sq, h, d = q.shape
    sk, kvh = k.shape[1], k.shape[2]
    if h % kvh:
        raise InputValidationError(f"attention: {h} query heads are not a multiple of {kvh} key/value heads.")
    g = h // kvh
    if key_block_size is not None and (isinstance(key_block_size, bool) or not isinstance(key_block_size, int)
                                       or key_block_size < 1):
        raise ConfigError(f"attention key_block_size must be a positive integer or None, found {key_block_size!r}.")
    bk = min(key_block_size or block_size, sk)
    nk = -(-sk // bk)
    skip = mask.causal and mask.diagonal is not None
    # Without a diagonal every query sees every key block: one query tile of the whole length.
    bq = min(block_size, sq) if skip else sq
    nq = -(-sq // bq)
    pairs = block_pairs(sq, bq, nk, bk, mask.diagonal if skip else None, mask.window)
    inner = interior_pairs(pairs, sq, sk, bq, bk, mask.diagonal, mask.window) if skip else frozenset()
    edge = tuple(p for p in pairs if p not in inner)
    inner = tuple(p for p in pairs if p in inner)

    def blocks(x, n, size):
        """``[b, n * size, ...]`` (zero-padded) -> ``[n, b, size, ...]``."""
        pad = n * size - x.shape[1]
        if pad:
            x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape((b, n, size) + x.shape[2:]), 1, 0)

    # Heads first, the query heads of one key/value head and their queries as one row axis
    # ([n, b, kv_heads, g * block, d]): every tile is then a plain batched matmul on each side.
    kb = jnp.moveaxis(blocks(k, nk, bk), 3, 2)  # [nk, b, kvh, bk, d]
    vb = jnp.moveaxis(blocks(v, nk, bk), 3, 2)
    # float32 queries are scaled once here rather than every tile's logits; lower precisions
    # keep the reference's order (logits scaled in float32), where scaling q would round it again
    prescale = jnp.dtype(q.dtype) == jnp.dtype(jnp.float32)
    qs = (q * jnp.asarray(scale, q.dtype) if prescale else q).reshape(b, sq, kvh, g, d)
    qb = jnp.transpose(blocks(qs, nq, bq), (0, 1, 3, 4, 2, 5)).reshape(nq, b, kvh, g * bq, d)
    kvb, kpb = blocks(mask.kv_valid, nk, bk), blocks(mask.k_pos, nk, bk)
    ksb = None if mask.k_seg is None else blocks(mask.k_seg, nk, bk)
    qpb = blocks(mask.q_pos, nq, bq)
    qsb = None if mask.q_seg is None else blocks(mask.q_seg, nq, bq)
    if unroll is None:
        unroll = should_unroll(bq, bk, len(pairs))
    rate = check_dropout(dropout_rate) if dropout_seed is not None else 0.0
    static = _Static(1.0 if prescale else float(scale), bool(mask.causal), mask.window, bool(mask.padded),
                     mask.diagonal if skip else None, int(sk), int(bq), int(bk), int(g), edge, inner, bool(unroll),
                     bool(bk >= DQ_TRANSPOSED_MIN_KEYS), rate)
    rhb = None
    if rate > 0.0:  # each query row's hash, laid out as the query tiles' rows [nq, b, kvh, g * bq]
        r = jnp.arange(g * bq)
        qi = jnp.arange(nq)[:, None, None, None] * bq + (r % bq)[None, None, None, :]
        head = jnp.arange(kvh)[None, None, :, None] * g + (r // bq)[None, None, None, :]
        rhb = row_hash(dropout_seed, jnp.arange(b)[None, :, None, None], head, qi)
    out = _flash(static, qb, kb, vb, kvb, kpb, ksb, qpb, qsb, rhb)  # [nq, b, kvh, g * bq, d]
    out = out.reshape(nq, b, kvh, g, bq, -1)
    out = jnp.transpose(out, (1, 0, 4, 2, 3, 5)).reshape(b, nq * bq, h, -1)[:, :sq]
    return out.astype(q.dtype)


# Small tiles are unrolled: a scanned tile loop reads and writes its carries (the running
# output, the gradients) through dynamic slices, about a fifth of the kernel's time at tiles of
# 64 (docs/BENCHMARKS.md, "Session 22"); from tiles of 256 on, unrolling was slower.
UNROLL_TILE = 128
UNROLL_TILES = 16

# From key blocks of this size on, the backward pass forms each tile's query gradient
# transposed, K^T @ dS (the tile's keys transposed, a small copy), rather than dS^T @ K: both
# products contract dS over its key rows, but XLA's CPU dot ran the first ~1.7x faster at tiles
# of 512 keys (the kernel's forward + backward 0.90-1.00x at 512-4,096 tokens and 0.80x at
# 8,192, in one process); at tiles of 64 the two products took the same time and the copy made
# the kernel ~6 % slower (docs/BENCHMARKS.md, "Session 37"). The keys are transposed tile by
# tile, not once for the whole loop: a transposed copy of all keys held through it added 32 MiB
# to the 4,096-token step's temporaries with no clear gain in time. blockwise_attention decides
# once per call (``_Static.dq_transposed``), so the jitted backward pass is keyed by the choice.
DQ_TRANSPOSED_MIN_KEYS = 128


def should_unroll(bq: int, bk: int, n_tiles: int) -> bool:
    """Whether the blockwise kernel unrolls its loop over ``n_tiles`` tiles of ``bq`` queries
    by ``bk`` keys (``unroll=None``): when both sides are at most :data:`UNROLL_TILE` and the
    tiles at most :data:`UNROLL_TILES` (the automatic block gives at most 10 up to 512 tokens;
    more would mostly lengthen compilation)."""
    return max(bq, bk) <= UNROLL_TILE and n_tiles <= UNROLL_TILES


def block_pairs(sq: int, bq: int, nk: int, bk: int, diagonal: Optional[int], window: Optional[int]):
    """The ``(query block, key block)`` tiles the blockwise kernel computes, as a tuple of pairs.

    With ``diagonal`` (see :class:`AttentionMask`) query block ``a`` needs only the key blocks
    holding a key index ``<= i + diagonal`` for some query ``i`` of the block, and, with a
    ``window``, one ``> i + diagonal - window``; every other tile is wholly masked. Without it,
    every tile.
    """
    nq = -(-sq // bq)
    pairs = []
    for a in range(nq):
        lo, hi = 0, nk - 1
        if diagonal is not None:
            hi = min(hi, (min(sq, (a + 1) * bq) - 1 + diagonal) // bk)
            if window is not None:
                lo = min(hi, max(0, a * bq + diagonal - window + 1) // bk)
        pairs.extend((a, j) for j in range(lo, hi + 1))
    return tuple(pairs)


def interior_pairs(pairs, sq: int, sk: int, bq: int, bk: int, diagonal: int, window: Optional[int]) -> frozenset:
    """The tiles of ``pairs`` whose every (query ``i < sq``, key ``j``) pair satisfies the
    causal mask and the window by the ``diagonal`` promise (``j <= i + diagonal`` and ``i +
    diagonal - j < window``) and that hold no key block padding: the causal and window masks
    are all true there (rows past the last query are block padding, computed and dropped)."""
    out = set()
    for a, j in pairs:
        q_lo, q_hi = a * bq, min(sq, (a + 1) * bq) - 1
        k_lo, k_hi = j * bk, (j + 1) * bk - 1
        if k_hi >= sk or k_hi > q_lo + diagonal:
            continue
        if window is not None and q_hi + diagonal - k_lo >= window:
            continue
        out.add((a, j))
    return frozenset(out)


@dataclasses.dataclass(frozen=True)
class _Static:
    """The kernel's static settings (hashable: the ``custom_vjp``'s non-differentiable
    argument)."""

    scale: float  # applied to the logits inside the kernel (1.0 when the queries were pre-scaled)
    causal: bool
    window: Optional[int]
    padded: bool
    diagonal: Optional[int]  # the mask's diagonal when tiles were skipped by it, else None
    sk: int
    bq: int
    bk: int
    g: int
    edge: tuple  # tiles that need the causal / window / block-padding masks
    inner: tuple  # tiles wholly inside them (only padding and segments, if any)
    unroll: bool
    dq_transposed: bool  # the backward pass forms K^T @ dS (see DQ_TRANSPOSED_MIN_KEYS)
    dropout: float = 0.0  # attention-probability dropout rate (the masks from the row hashes)


def _tile_mask(static: _Static, interior: bool, kv_valid, k_pos, k_seg, q_pos, q_seg, a, j):
    """Where tile ``(a, j)``'s logits are allowed, ``[b, bq, bk]`` bool (or ``[1, bq, bk]``;
    block padding is left to :func:`_masked`); None when all are (an interior tile of a mask
    with no padding and no segments).

    With a ``diagonal`` the causal and window terms are computed from the tile's token indices
    (the diagonal promise makes them equal to the slot comparisons wherever the segments
    match), not from the slot arrays: XLA's CPU fusion of a compare between two broadcasts of
    one dynamically sliced array ran about 4x slower than the logits' own exp."""
    ok = None
    if static.padded:
        ok = kv_valid[:, None, :]
    if q_seg is not None:
        same = (q_seg[:, :, None] == k_seg[:, None, :]) | (k_seg[:, None, :] < 0)
        ok = same if ok is None else ok & same
    if interior:
        return ok
    if static.diagonal is None:
        pos = _allowed(q_pos, None, jnp.ones_like(kv_valid), k_pos, None, static.causal, static.window)
    else:
        kidx = j * static.bk + jnp.arange(static.bk)
        qidx = a * static.bq + jnp.arange(static.bq) + static.diagonal
        pos = kidx[None, :] <= qidx[:, None]
        if static.window is not None:
            pos = pos & (qidx[:, None] - kidx[None, :] < static.window)
        pos = pos[None]
    return pos if ok is None else ok & pos


def _masked(s, ok, static: _Static, key_major: bool, interior: bool, j):
    """``s`` (``[b, kvh, g * bq, bk]``, or ``[b, kvh, bk, g * bq]`` when ``key_major``) with the
    disallowed logits set to the reference's masked value, and block padding to ``-inf``.

    The tile's mask is repeated over the ``g`` query heads of a key/value head (a small tensor)
    so that ``s`` keeps its 4-d layout: reshaping it to split the heads from the queries made
    XLA's CPU fusion several times slower."""
    if ok is None:
        return s
    bias = jnp.where(ok, 0.0, _MASKED)
    if not interior:  # block padding never counts, not even in a fully masked row
        kidx = j * static.bk + jnp.arange(static.bk)
        bias = jnp.where((kidx < static.sk)[None, None, :], bias, -jnp.inf)
    b, bq, bk = bias.shape[0], static.bq, static.bk
    bias = jnp.broadcast_to(bias[:, None], (b, static.g, bq, bk)).reshape(b, static.g * bq, bk)
    if key_major:
        bias = jnp.swapaxes(bias, 1, 2)
    bias = bias[:, None]
    return jnp.where(bias == 0, s, bias)


def _take(x, i):
    return None if x is None else jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False)


def _put(x, i, value):
    return jax.lax.dynamic_update_index_in_dim(x, value, i, 0)


def _tiles(static: _Static, body, carry):
    """``body(interior, carry, (a, j))`` over the edge tiles, then the interior ones: one
    ``lax.scan`` each over its static list."""
    for interior, pairs in ((False, static.edge), (True, static.inner)):
        if not pairs:
            continue
        idx = np.asarray(pairs, np.int32).reshape(-1, 2)
        step = functools.partial(body, interior)
        carry, _ = jax.lax.scan(lambda c, x: (step(c, x), None), carry, (idx[:, 0], idx[:, 1]),
                                unroll=static.unroll)
    return carry


def _forward(static: _Static, qb, kb, vb, kvb, kpb, ksb, qpb, qsb, rhb=None):
    """Returns the output ``[nq, b, kvh, g * bq, d]`` (f32), each row's log-sum-exp ``[nq, b,
    kvh, g * bq]`` (``+inf`` on fully masked rows) and the fully-masked flags."""
    nq, b, kvh, gq, _ = qb.shape
    dv = vb.shape[-1]
    m0 = jnp.full((nq, b, kvh, gq), _MASKED, jnp.float32)
    l0 = jnp.zeros((nq, b, kvh, gq), jnp.float32)
    a0 = jnp.zeros((nq, b, kvh, gq, dv), jnp.float32)

    def step(interior, carry, ij):
        m, l, acc = carry
        a, j = ij
        s = jnp.einsum("bkqd,bksd->bkqs", _take(qb, a), _take(kb, j), preferred_element_type=jnp.float32)
        if static.scale != 1.0:
            s = s * static.scale
        ok = _tile_mask(static, interior, _take(kvb, j), _take(kpb, j), _take(ksb, j), _take(qpb, a),
                        _take(qsb, a), a, j)
        s = _masked(s, ok, static, False, interior, j)
        ma, la, acca = _take(m, a), _take(l, a), _take(acc, a)
        m_new = jnp.maximum(ma, s.max(-1))
        corr = jnp.exp(ma - m_new)
        p = jnp.exp(s - m_new[..., None])
        la = la * corr + p.sum(-1)
        vblk = _take(vb, j)
        if static.dropout:  # the normaliser counts every probability; the values see the kept ones
            kidx = (j * static.bk + jnp.arange(static.bk))[None, None, None, :]
            p = p * keep_scale(_take(rhb, a)[..., None], kidx, static.dropout)
        pv = jnp.einsum("bkqs,bksd->bkqd", p.astype(vblk.dtype), vblk, preferred_element_type=jnp.float32)
        acca = acca * corr[..., None] + pv
        return _put(m, a, m_new), _put(l, a, la), _put(acc, a, acca)

    m, l, acc = _tiles(static, step, (m0, l0, a0))
    # A query row with no allowed key (padding) averages every key, as the reference does; the
    # tiles it skipped would have counted too, so it is taken from the mean of all values.
    full = m <= _MASKED
    vmean = vb.astype(jnp.float32).sum((0, 3)) / static.sk  # [b, kvh, d]; block padding holds zeros
    out = jnp.where(full[..., None], vmean[None, :, :, None, :], acc / l[..., None])
    # log-sum-exp of each row, +inf on fully masked rows: exp(logit - lse) is then the
    # probability, and exactly 0 on every key of a fully masked row (handled by `full`)
    lse = jnp.where(full, jnp.inf, m + jnp.log(l))
    return out, lse, full


# The kernel's two passes are compiled as units (``static`` is their static argument): inside a
# jitted step they are inlined as before, and a model applied eagerly (op by op) runs each pass
# as one cached program instead of dispatching (and compiling) every tile's ops one at a time.
_forward_jit = jax.jit(_forward, static_argnums=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(static, qb, kb, vb, kvb, kpb, ksb, qpb, qsb, rhb):
    return _forward_jit(static, qb, kb, vb, kvb, kpb, ksb, qpb, qsb, rhb)[0].astype(qb.dtype)


def _flash_fwd(static, qb, kb, vb, kvb, kpb, ksb, qpb, qsb, rhb):
    out, lse, full = _forward_jit(static, qb, kb, vb, kvb, kpb, ksb, qpb, qsb, rhb)
    out = out.astype(qb.dtype)
    return out, (qb, kb, vb, kvb, kpb, ksb, qpb, qsb, out, lse, full, rhb)


def _flash_bwd(static: _Static, res, dout):
    kvb, kpb, ksb, qpb, qsb = res[3:8]  # the masks' inputs: no gradient (float0 zeros)
    dq, dk, dv = _backward(static, res, dout)
    float0 = lambda x: None if x is None else jnp.zeros(x.shape, jax.dtypes.float0)
    return dq, dk, dv, float0(kvb), float0(kpb), float0(ksb), float0(qpb), float0(qsb), float0(res[11])


@functools.partial(jax.jit, static_argnums=0)
def _backward(static: _Static, res, dout):
    """Recomputes each tile's probabilities key-major (``[b, kvh, bk, g * bq]``), so the value
    and key gradients are plain matmuls and the score-sized tensors are written in one layout."""
    qb, kb, vb, kvb, kpb, ksb, qpb, qsb, out, lse, full, rhb = res
    dob = dout.astype(jnp.float32)  # [nq, b, kvh, g * bq, d]
    # D_i = sum_d dO_id O_id, the row term of the softmax backward.
    dsum = jnp.einsum("nbkqd,nbkqd->nbkq", dob, out.astype(jnp.float32))

    def step(interior, carry, ij):
        dq, dk, dv = carry
        a, j = ij
        qa, kj, vj, doa = _take(qb, a), _take(kb, j), _take(vb, j), _take(dob, a)
        st = jnp.einsum("bksd,bkqd->bksq", kj, qa, preferred_element_type=jnp.float32)
        if static.scale != 1.0:
            st = st * static.scale
        ok = _tile_mask(static, interior, _take(kvb, j), _take(kpb, j), _take(ksb, j), _take(qpb, a),
                        _take(qsb, a), a, j)
        st = _masked(st, ok, static, True, interior, j)
        # disallowed logits give exactly 0 (exp of the masked value, or of -inf)
        pt = jnp.exp(st - _take(lse, a)[:, :, None, :])
        dpt = jnp.einsum("bksd,bkqd->bksq", vj.astype(jnp.float32), doa)
        if static.dropout:  # the values saw the kept probabilities, scaled: so do their gradients
            kidx = (j * static.bk + jnp.arange(static.bk))[None, None, :, None]
            keep = keep_scale(_take(rhb, a)[:, :, None, :], kidx, static.dropout)
            dvj = jnp.einsum("bksq,bkqd->bksd", pt * keep, doa)
            dpt = dpt * keep
        else:
            dvj = jnp.einsum("bksq,bkqd->bksd", pt, doa)
        dst = pt * (dpt - _take(dsum, a)[:, :, None, :])
        if static.scale != 1.0:
            dst = dst * static.scale
        dkj = jnp.einsum("bksq,bkqd->bksd", dst, qa.astype(jnp.float32))
        if static.dq_transposed:  # [b, kvh, d, g * bq]: see DQ_TRANSPOSED_MIN_KEYS
            dqa = jnp.einsum("bkds,bksq->bkdq", jnp.swapaxes(kj, -1, -2).astype(jnp.float32), dst)
        else:
            dqa = jnp.einsum("bksq,bksd->bkqd", dst, kj.astype(jnp.float32))
        return (_put(dq, a, _take(dq, a) + dqa), _put(dk, j, _take(dk, j) + dkj), _put(dv, j, _take(dv, j) + dvj))

    zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
    nq, b, kvh, gq, d = qb.shape
    dq0 = jnp.zeros((nq, b, kvh, d, gq) if static.dq_transposed else qb.shape, jnp.float32)
    dq, dk, dv = _tiles(static, step, (dq0, zeros(kb), zeros(vb)))
    if static.dq_transposed:
        dq = jnp.swapaxes(dq, -1, -2)
    # Fully masked rows took the mean of all values: each key's value gets 1/sk of their cotangent.
    dfull = jnp.einsum("nbkqd,nbkq->bkd", dob, full.astype(jnp.float32)) / static.sk
    dv = dv + dfull[None, :, :, None, :]  # block padding rows are dropped by the padding's own transpose
    return dq.astype(qb.dtype), dk.astype(kb.dtype), dv.astype(vb.dtype)


_flash.defvjp(_flash_fwd, _flash_bwd)
