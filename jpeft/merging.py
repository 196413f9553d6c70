"""Merging several LoRA adapters into one, or into the base weights.

Every method works on the adapters' **effective updates** ``ΔW_i = s_i * A_i @ B_i`` (with
each adapter's own scale, ``alpha / r`` or ``alpha / sqrt(r)`` with rsLoRA; see
:meth:`jpeft.LoraWeights.delta_matrix`), site by site, viewed as ``[in, out]`` matrices. With
weights ``w_i``:

* ``"linear"``: ``Σ w_i ΔW_i`` (task arithmetic).
* ``"cat"``: the same update, built *factored and exact* by concatenating the factors:
  ``A = [A_1 | ... | A_n]``, ``B = [w_1 s_1 B_1; ...; w_n s_n B_n]`` (rank ``Σ r_i``, scale 1).
* ``"svd"``: ``Σ w_i ΔW_i`` truncated to ``rank`` by a singular value decomposition.
* ``"ties"`` (Yadav et al. 2023): trim each ``ΔW_i`` to its ``density`` fraction of largest
  magnitudes, elect each entry's sign from the sum of the trimmed updates (``"total"``) or from
  the count of signs (``"frequency"``), then average the weighted entries that agree with it.
* ``"dare_linear"`` / ``"dare_ties"`` (Yu et al. 2024): drop each entry of ``ΔW_i`` with
  probability ``1 - density`` and rescale the kept ones by ``1 / density`` (so the update is
  unchanged in expectation), then merge linearly or with TIES' sign election.
* ``"magnitude_prune"``: trim each ``ΔW_i`` as TIES does, then ``Σ w_i trim(ΔW_i)`` (no sign
  election).

These follow Hugging Face PEFT's ``peft.utils.merge_utils`` functions (same trimming, sign
election and disjoint mean). One difference: PEFT's ``add_weighted_adapter`` applies
``"linear"``, ``"ties"``, ``"dare_*"`` and ``"magnitude_prune"`` to the A and B factors
separately (``"linear"`` then carries cross terms ``A_i B_j``); jpeft merges the effective
updates, which is what the methods are defined on (PEFT's ``*_svd`` variants: jpeft's
``"ties"`` is PEFT's ``"ties_svd"``). ``merge_adapters(..., factors=True)`` combines the factors
as PEFT's ``add_weighted_adapter`` does, for code that must give PEFT's numbers.

Three entry points:

* :func:`merge_deltas` -> ``{path: [in, out] merged update}``;
* :func:`merge_adapters` -> a LoRA adapter ``{path: LoraWeights}`` (exact for ``"linear"`` and
  ``"cat"``; SVD-truncated to ``rank`` for the others), usable with :func:`jpeft.apply`, a
  bank, or :func:`jpeft.merge`;
* :func:`merge_into_base` -> base params with the merged update folded in (exact, no
  truncation), for serving one tenant with no adapter overhead.

Inputs with a ``lora_bias`` (``LoraConfig.lora_bias=True``) merge to the bias
``Σ w_i s_i lora_bias_i`` at each site, whatever the method, as PEFT >= 0.22's
``add_weighted_adapter`` gives it (the bias adds to the output apart from the factors; no
trimming, sign election or dropping, which act on the kernels' entries): :func:`merge_adapters`
gives its merged adapter that ``lora_bias``, :func:`merge_deltas` gives it beside each kernel
update (``{"kernel": ..., "bias": ...}``), and :func:`merge_into_base` adds it to the base
layer's bias, as :func:`jpeft.merge` folds one adapter's (refused where that layer has none).

MiCA adapters (``LoraConfig(init_weights="mica")``: ``lora_B`` the base's minor left singular
vectors, frozen, ``lora_A`` trained). The exact concatenation (``"cat"``, and ``"linear"``
without a rank) of MiCA adapters only is MiCA again: its B stacks the inputs' frozen B's (each
scaled by ``w_i s_i``), still in the base's minor subspace, so :func:`merge_adapters` keeps
``lora_B`` frozen (``LoraWeights.frozen_b``) and further training moves the A's only, as it
did for each input. Every other result is a plain LoRA (both factors trained) with a
``UserWarning``: the SVD re-factorisations (``"svd"``, ``"ties"``, ``"dare_*"``,
``"magnitude_prune"``, a ``rank``) and ``factors=True`` build a B that is not the base's minor
singular vectors, a mix of MiCA and plain inputs holds B's of both kinds, which no single
frozen flag describes, and a concatenation of rank above ``min(in, out)`` is no MiCA (PEFT's
``mica_init`` refuses that rank; saved as MiCA it would not load). Hugging Face PEFT's
``add_weighted_adapter`` instead copies the first input's config, so its result freezes
whatever B it built when the first input is MiCA (an SVD factor, or a plain input's trained B)
and trains it when the first is plain: jpeft does not let the order of the inputs decide what
trains.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
import zlib
from typing import Any, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import quant
from jpeft.core import RoundingTally
from jpeft.errors import ConfigError, NotMergeableError, ShapeMismatchError
from jpeft.methods.base import (Kind, Layout, LowRank, check_adapter, check_kernel_fn_merge, check_tied_merge,
                               low_rank_node, residual_refusal)
from jpeft.scan import Stacked
from jpeft.tree import get_subtree, is_nnx_module, rewrap_params, set_subtree, unwrap_params

METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
#: the methods ``merge_adapters(..., factors=True)`` applies to A and B separately, as PEFT's
#: ``add_weighted_adapter`` applies the combination types of these names
FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_SIGN_METHODS = ("total", "frequency")

#: an adapter whose sites are low-rank updates (``node.low_rank()``: LoRA)
Adapter = Mapping[str, Any]


# ----------------------------------------------------------------------------------------------
# the elementwise merges on stacked task tensors [n, ...] (PEFT's merge_utils, in JAX)
# ----------------------------------------------------------------------------------------------
def magnitude_prune(x: jax.Array, density: float) -> jax.Array:
    """Keeps the ``int(density * x.size)`` entries of largest magnitude, zeroes the rest.

    >>> import jax.numpy as jnp
    >>> magnitude_prune(jnp.array([[1., -4.], [3., -2.]]), 0.5).tolist()
    [[0.0, -4.0], [3.0, 0.0]]
    """
    if density >= 1:
        return x
    k = int(density * x.size)
    if k <= 0:
        return jnp.zeros_like(x)
    flat = x.reshape(-1)
    _, idx = jax.lax.top_k(jnp.abs(flat), k)
    mask = jnp.zeros(flat.shape, bool).at[idx].set(True)
    return jnp.where(mask, flat, jnp.zeros((), x.dtype)).reshape(x.shape)


def random_prune(x: jax.Array, density: float, key, *, rescale: bool = True) -> jax.Array:
    """DARE's drop-and-rescale: keeps each entry with probability ``density`` and (with
    ``rescale``) divides the kept ones by ``density``, so ``E[random_prune(x)] == x``."""
    if density >= 1:
        return x
    keep = jax.random.bernoulli(key, density, x.shape)
    out = jnp.where(keep, x, jnp.zeros((), x.dtype))
    return out / density if rescale else out


def majority_sign_mask(stacked: jax.Array, method: str = "total") -> jax.Array:
    """``[n, ...]`` bool: entries whose sign equals the elected sign (ties elect ``+``)."""
    sign = jnp.sign(stacked)
    if method == "total":
        mag = stacked.sum(axis=0)
    elif method == "frequency":
        mag = sign.sum(axis=0)
    else:
        raise ConfigError(f"majority_sign must be one of {_SIGN_METHODS}, found {method!r}.")
    elected = jnp.where(mag >= 0, 1.0, -1.0).astype(stacked.dtype)
    return sign == elected[None]


def disjoint_merge(weighted: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over the ``n`` axis of the entries kept by ``mask`` (0 where none is kept)."""
    total = jnp.where(mask, weighted, jnp.zeros((), weighted.dtype)).sum(axis=0)
    kept = mask.sum(axis=0).astype(weighted.dtype)
    return total / jnp.maximum(kept, 1.0)


def _weighted(stacked, w):
    return stacked * w.reshape((-1,) + (1,) * (stacked.ndim - 1))


def combine(
    tensors: Sequence[jax.Array],
    weights: Sequence[float],
    method: str,
    *,
    density: Optional[float] = None,
    majority_sign: str = "total",
    key=None,
) -> jax.Array:
    """Merges same-shaped task tensors (e.g. the effective updates of one site).

    ``"linear"``, ``"cat"`` and ``"svd"`` all give ``Σ w_i t_i`` here (they differ only in how
    :func:`merge_adapters` factors the result).

    >>> import jax.numpy as jnp
    >>> t1 = jnp.array([3., -1., 2., 0.5]); t2 = jnp.array([-1., -2., -4., 1.])
    >>> combine([t1, t2], [1.0, 1.0], "ties", density=0.5).tolist()
    [3.0, -2.0, -4.0, 0.0]
    """
    _check_method(method, density, key, "tensor")
    w = jnp.asarray(weights, jnp.float32)
    if w.ndim != 1 or w.shape[0] != len(tensors):
        raise ConfigError(f"got {len(tensors)} tensors but weights of shape {tuple(w.shape)}; give one weight per tensor.")
    return _combine(tensors, w, method, density, majority_sign, key)


def _combine(tensors, w, method, density, majority_sign, key):
    """:func:`combine` on checked inputs (``w``: the weights as a float32 vector)."""
    stacked = jnp.stack([jnp.asarray(t, jnp.float32) for t in tensors])
    if method in ("linear", "cat", "svd"):
        return _weighted(stacked, w).sum(axis=0)
    if method in ("ties", "magnitude_prune"):
        trimmed = jnp.stack([magnitude_prune(t, density) for t in stacked])
        if method == "magnitude_prune":
            return _weighted(trimmed, w).sum(axis=0)
        mask = majority_sign_mask(trimmed, majority_sign)
        return disjoint_merge(_weighted(trimmed, w), mask)
    if method in ("dare_linear", "dare_ties"):
        keys = jax.random.split(key, stacked.shape[0])
        dropped = jnp.stack([random_prune(t, density, k) for t, k in zip(stacked, keys)])
        if method == "dare_linear":
            return _weighted(dropped, w).sum(axis=0)
        mask = majority_sign_mask(dropped, majority_sign)
        return disjoint_merge(_weighted(dropped, w), mask)


# ----------------------------------------------------------------------------------------------
# adapters
# ----------------------------------------------------------------------------------------------
def _is_number(x) -> bool:
    """A real number: a Python or NumPy scalar, or a 0-d JAX array (not a bool, not a string)."""
    if isinstance(x, jax.Array):
        return x.ndim == 0 and bool(jnp.issubdtype(x.dtype, jnp.number))
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _site_key(key, path: str):
    """The key of one site's random draws (DARE), or ``None`` without ``key``: it follows from the
    site's path, not from where it stands in the adapters' dicts (a jit, a save/load or a site
    only some adapters have reorders them)."""
    return None if key is None else jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def _check_method(method, density, key, what: str) -> None:
    """The merge method's own arguments: a known method, ``density`` in (0, 1] where it prunes,
    a ``jax.random`` key where it drops at random (``what``: the things merged, for the message)."""
    if method not in METHODS:
        peft = ""
        if isinstance(method, str) and method.endswith("_svd") and method[:-4] in METHODS:
            peft = (f" (Hugging Face PEFT's {method!r} combines the updates, then factors them by SVD: that is "
                    f"jpeft's {method[:-4]!r}, with rank= for svd_rank)")
        raise ConfigError(f"unknown merge method {method!r}; choose one of {METHODS}{peft}.")
    if method in _NEEDS_DENSITY and (not _is_number(density) or not 0.0 < float(density) <= 1.0):
        raise ConfigError(f"method {method!r} needs density in (0, 1] (the fraction of each {what}'s entries kept); "
                          f"found {density!r}.")
    if method.startswith("dare"):
        try:
            jax.random.fold_in(key, 0)
        except (TypeError, ValueError):
            raise ConfigError(f"method {method!r} drops entries at random; pass key=jax.random.key(...), found "
                              f"{type(key).__name__} {str(key)[:40]}.") from None


def _validate(adapters, weights, method, density, majority_sign, key, *, fold: bool = False):
    """The checked inputs ``(low, weights, sites)``: each adapter as ``{path: LowRank}``, the weights
    as floats, and each merged site as an empty :class:`LowRank` holding its layout, tie and merged
    ``lora_bias`` (:func:`_merged_biases`; ``fold``: for :func:`merge_into_base`)."""
    _check_method(method, density, key, "update")
    if isinstance(adapters, Mapping):
        raise ConfigError(
            "merging takes a list of adapters ([adapter_a, adapter_b, ...]); found a single dict. "
            "Wrap it in a list, or use bank.get(name) for adapters held in a bank."
        )
    adapters = list(adapters)
    if not adapters:
        raise ConfigError("merging needs at least one adapter; found an empty list.")
    if weights is None:
        weights = [1.0] * len(adapters)
    try:
        weights = [float(w) for w in weights]
    except (TypeError, ValueError):
        raise ConfigError(f"weights must be a list of numbers, one per adapter; found {weights!r}.") from None
    if len(weights) != len(adapters):
        raise ConfigError(f"got {len(adapters)} adapters but {len(weights)} weights; give one weight per adapter.")
    if not all(math.isfinite(w) for w in weights):
        raise ConfigError(f"weights must be finite numbers; found {weights} (a NaN or infinite weight makes every merged "
                          "weight NaN or infinite).")
    if majority_sign not in _SIGN_METHODS:
        raise ConfigError(f"majority_sign must be one of {_SIGN_METHODS}, found {majority_sign!r}.")
    layouts: dict[str, Layout] = {}
    ties: dict[str, tuple] = {}  # path -> (first adapter, tied_output, tie_output)
    low: list[dict[str, LowRank]] = []
    for i, ad in enumerate(adapters):
        check_adapter(ad, f"merging: adapter {i}", low_rank_ok=True)
        low.append({})
        for path, node in ad.items():
            try:
                lr = node if isinstance(node, LowRank) else _low_rank_of(node)
            except NotMergeableError as e:
                hint = (" (for a layer-scanned model's stacked sites, merge jpeft.scan.unstack_adapter(a) of each and "
                        "restack with jpeft.scan.stack_adapter)") if isinstance(node, Stacked) else ""
                raise NotMergeableError(f"adapter {i} at {path!r}: {e}{hint}") from None
            if lr.residual is not None:
                raise NotMergeableError(residual_refusal(f"adapter {i} at {path!r}", lr.residual, "merged"))
            low[i][path] = lr
            lay = layouts.get(path)
            if lay is None:
                layouts[path] = lr.layout
                ties[path] = (i, lr.tied_output, bool(lr.tie_output))
            elif tuple(lay.kernel_shape) != tuple(lr.layout.kernel_shape) or lay.in_axes != lr.layout.in_axes:
                raise ShapeMismatchError(
                    f"adapter {i} has a {tuple(lr.layout.kernel_shape)} kernel at {path!r} but an earlier adapter has "
                    f"{tuple(lay.kernel_shape)}: the adapters were made for different base models."
                )
            else:
                if lay.kernel_fn is None and lr.layout.kernel_fn is not None:  # the merged site keeps what any input records
                    layouts[path] = dataclasses.replace(lay, kernel_fn=lr.layout.kernel_fn)
                j, tied, tie = ties[path]
                if bool(lr.tie_output) != tie:
                    raise NotMergeableError(
                        f"adapter {i} {'adapts' if lr.tie_output else 'does not adapt'} the tied output projection at "
                        f"{path!r} (LoraConfig.ensure_weight_tying) but adapter {j} "
                        f"{'does' if tie else 'does not'}: their updates act on different places, so no merged "
                        "adapter equals their sum. Train them with the same ensure_weight_tying."
                    )
                ties[path] = (j, tied if tied is not None else lr.tied_output, tie)
    biases = _merged_biases(low, weights, layouts, fold)
    # each merged site as an empty LowRank: its layout, its embedding tied as its inputs' were, its lora_bias
    sites = {path: LowRank(None, None, 1.0, lay, ties[path][1], ties[path][2], bias=biases.get(path))
             for path, lay in layouts.items()}
    return low, weights, sites


def _low_rank_of(node) -> LowRank:
    """``node.low_rank()``, or for a LoRA with ``lora_bias`` its update with :attr:`LowRank.bias`
    (``node.routed_low_rank()``), which merging combines as PEFT >= 0.22's ``add_weighted_adapter``
    does; what else ``low_rank()`` refuses (DoRA, a trained base bias, trainable tokens, a
    ``modules_to_save`` copy) stays refused with its reason."""
    try:
        return node.low_rank()
    except NotMergeableError as e:
        lr = node.routed_low_rank()
        if lr.bias is None or lr.tokens is not None or lr.saved is not None:
            raise e from None
        return lr


def _merged_biases(low, weights, layouts, fold: bool = False) -> dict:
    """``{path: Σ w_i s_i lora_bias_i}`` (float32 ``[out]``, zero where no input has one) at every
    merged site when any input has a ``lora_bias``, else ``{}``: PEFT >= 0.22's
    ``add_weighted_adapter`` gives the merged adapter (scale 1) ``lora_bias=True`` as soon as one
    input has it, and that sum, whatever the combination type (the bias adds to the output apart
    from the factors). PEFT 0.21 kept the merged bias at zero (its outputs lack the inputs' biases).

    ``fold`` (:func:`merge_into_base`, which folds the biases into the base and records no adapter):
    embedding sites get no bias (``None``) instead of the refusal below.

    Raises:
      NotMergeableError: inputs with a ``lora_bias`` and an embedding site, which has no bias (as
        PEFT 0.22 refuses; PEFT records one ``lora_bias`` per adapter, so the merged adapter
        could not be saved)."""
    have = [i for i, ad in enumerate(low) if any(lr.bias is not None for lr in ad.values())]
    if not have:
        return {}
    embeds = sorted(p for p, lay in layouts.items() if lay.kind == Kind.EMBED)
    if embeds and not fold:
        raise NotMergeableError(
            f"adapters {have} have a lora_bias (LoraConfig.lora_bias=True), and the adapters also adapt the "
            f"embedding(s) {embeds[:4]}, which take no bias: the merged adapter would need lora_bias at some sites and "
            "not at others, which one LoraConfig cannot record (PEFT 0.22's add_weighted_adapter refuses this too). "
            "Merge the embedding adapters and the lora_bias ones in separate calls, or drop the embeddings' sites.")
    out = {}
    for path, lay in layouts.items():
        if lay.kind == Kind.EMBED:
            continue
        total = jnp.zeros((lay.out_features,), jnp.float32)
        for ad, w in zip(low, weights):
            lr = ad.get(path)
            if lr is not None and lr.bias is not None:
                total = total + (w * float(lr.scale)) * jnp.asarray(lr.bias, jnp.float32).reshape(-1)
        out[path] = total
    return out


def _fold_bias(own: dict, upd: dict, bias: jax.Array, path: str, have: list) -> jax.Array:
    """Adds the merged ``lora_bias`` ``bias`` (``Σ w_i s_i lora_bias_i``, :func:`_merged_biases`) to the
    base bias in ``upd``, as :func:`jpeft.merge` folds one adapter's (``have``: the inputs with a
    ``lora_bias`` at ``path``); returns the new bias exactly (float32), for the rounding tally.

    Raises:
      NotMergeableError: the base layer has no bias of the output's size to fold it into (PEFT's
        ``merge_and_unload`` refuses the merged adapter there too)."""
    b = own.get("bias")
    n = int(bias.shape[0])
    if b is None or getattr(b, "size", None) != n:
        found = "no bias" if b is None else f"a bias of shape {tuple(getattr(b, 'shape', ()))}"
        raise NotMergeableError(
            f"jpeft.merging.merge_into_base: adapters {have} have a lora_bias (LoraConfig.lora_bias=True) at {path!r}, "
            f"but the base layer has {found} to fold the merged bias [{n}] into (PEFT refuses this merge too). Serve "
            "jpeft.merging.merge_adapters's result unmerged with jpeft.apply, or merge adapters trained with "
            "lora_bias=False at this layer.")
    exact = jnp.asarray(b, jnp.float32) + bias.reshape(b.shape)
    upd["bias"] = exact.astype(b.dtype)
    return exact


def _mica_inputs(adapters: Sequence[Mapping[str, LowRank]]) -> tuple[bool, bool]:
    """``(any, all)``: whether any / every input site is MiCA's (``lora_B`` frozen)."""
    flags = [bool(lr.frozen_b) for ad in adapters for lr in ad.values()]
    return any(flags), bool(flags) and all(flags)


def _warn_mica_dropped(adapters, why: str, stacklevel: int = 3) -> None:
    """One warning per merge whose inputs include MiCA adapters but whose result trains both factors."""
    if _mica_inputs(adapters)[0]:
        warnings.warn(
            f"jpeft.merging.merge_adapters: {why}, so the merged adapter is a plain LoRA (lora_B trained, not frozen "
            "as MiCA's): its update is the merge's, but training it moves both factors. Only method 'cat' (or "
            "'linear' without a rank) of MiCA adapters alone keeps lora_B frozen.", UserWarning, stacklevel=stacklevel)


def merge_deltas(
    adapters: Sequence[Adapter],
    weights: Optional[Sequence[float]] = None,
    *,
    method: str = "linear",
    density: Optional[float] = None,
    majority_sign: str = "total",
    key=None,
) -> dict:
    """The merged effective update ``[in, out]`` (float32) at every site of any adapter.

    Args:
      adapters: a list of LoRA adapters ``{path: LoraWeights}``. A site missing from an adapter
        counts as a zero update for it.
      weights: one weight per adapter (default: all 1).
      method: one of ``"linear"``, ``"cat"``, ``"svd"``, ``"ties"``, ``"dare_linear"``,
        ``"dare_ties"``, ``"magnitude_prune"`` (see the module docstring).
      density: for TIES, DARE and magnitude pruning, the fraction of entries kept, in ``(0, 1]``.
      majority_sign: TIES sign election, ``"total"`` or ``"frequency"``.
      key: a ``jax.random`` key (DARE only).

    ``lora_bias`` inputs (``LoraConfig.lora_bias=True``): as soon as one input has a ``lora_bias``,
    every site's value is ``{"kernel": [in, out] update, "bias": [out] Σ w_i s_i lora_bias_i}``
    (zero where no input has one; the bias adds to the output apart from the kernel), the bias
    :func:`merge_adapters` gives its merged adapter, whatever the method: Hugging Face PEFT 0.22's
    ``add_weighted_adapter`` sums the biases so for every combination type (no trimming, sign
    election or dropping: those act on the kernels' entries).

    Raises:
      ConfigError: an unknown method, a missing density or key, weights of the wrong length.
      NotMergeableError: a non-LoRA or DoRA adapter; ``lora_bias`` inputs beside an embedding
        site (:func:`merge_adapters` refuses them too).
      ShapeMismatchError: adapters made for different base models.
    """
    adapters, weights, sites = _validate(adapters, weights, method, density, majority_sign, key)
    deltas = _deltas(adapters, weights, sites, method, density, majority_sign, key)
    if not any(site.bias is not None for site in sites.values()):
        return deltas
    return {path: {"kernel": d, "bias": sites[path].bias} for path, d in deltas.items()}


def _deltas(adapters, weights, sites, method, density, majority_sign, key) -> dict:
    """:func:`merge_deltas` of checked inputs (:func:`_validate`'s)."""
    w = jnp.asarray(weights, jnp.float32)
    out = {}
    for path, site in sites.items():
        lay = site.layout
        zero = jnp.zeros((lay.in_features, lay.out_features), jnp.float32)
        deltas = [_delta(ad[path]) if path in ad else zero for ad in adapters]
        out[path] = _combine(deltas, w, method, density, majority_sign, _site_key(key, path))
    return out


def _delta(lr: LowRank) -> jax.Array:
    """``s * A @ B`` as ``[in, out]`` float32."""
    return lr.scale * (jnp.asarray(lr.a, jnp.float32) @ jnp.asarray(lr.b, jnp.float32))


def _factor(delta: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """Best rank-``rank`` factors of ``delta`` (Eckart-Young), balanced: ``A = U√S``, ``B = √S Vᵀ``."""
    u, s, vt = jnp.linalg.svd(delta, full_matrices=False)
    k = min(rank, s.shape[0])
    root = jnp.sqrt(s[:k])
    a = u[:, :k] * root[None, :]
    b = root[:, None] * vt[:k]
    if k < rank:  # pad so every site has the requested rank
        a = jnp.pad(a, ((0, 0), (0, rank - k)))
        b = jnp.pad(b, ((0, rank - k), (0, 0)))
    return a, b


def merge_adapters(
    adapters: Sequence[Adapter],
    weights: Optional[Sequence[float]] = None,
    *,
    method: str = "linear",
    rank: Union[int, str, None] = None,
    density: Optional[float] = None,
    majority_sign: str = "total",
    key=None,
    factors: bool = False,
) -> dict:
    """Merges LoRA adapters into one LoRA adapter (``scale`` 1, factors in float32).

    Args:
      adapters, weights, method, density, majority_sign, key: as in :func:`merge_deltas`.
      factors: ``True`` combines the A factors and the B factors separately, as Hugging Face
        PEFT's ``add_weighted_adapter`` does for the combination types ``"linear"``, ``"ties"``,
        ``"dare_linear"``, ``"dare_ties"`` and ``"magnitude_prune"`` (weights
        ``±sqrt(|w_i s_i|)`` on A, ``sqrt(|w_i s_i|)`` on B; the update is then not
        ``Σ w_i ΔW_i`` but carries cross terms ``A_i B_j``): for code that must give PEFT's
        numbers. It needs equal ranks at each site, takes no ``rank``, and, as PEFT, merges a
        single adapter linearly. ``False`` (default) merges the effective updates ``ΔW_i``, as
        the methods are defined (PEFT's ``"cat"``, ``"svd"`` and ``*_svd`` types do the same).
      rank: the merged adapter's rank. ``None`` means: for ``"linear"`` and ``"cat"`` the
        exact concatenation (rank ``Σ r_i`` per site; no truncation), for the other methods
        the largest input rank (as Hugging Face PEFT's ``*_svd`` merges do). An integer
        truncates by SVD (``"linear"`` with a rank is ``"svd"``); ``"full"`` keeps every
        singular value (exact, rank ``min(in, out)``). ``"cat"`` is always exact and refuses
        a rank.

    ``lora_bias`` inputs (``LoraConfig.lora_bias=True``): the merged adapter has a ``lora_bias`` at
    every site, ``Σ w_i s_i lora_bias_i`` (zero where no input has one), whatever the method and
    ``factors``, as PEFT >= 0.22's ``add_weighted_adapter`` gives it (PEFT 0.21 left it at zero);
    refused (:class:`NotMergeableError`) beside an embedding site, which takes no bias (PEFT 0.22
    refuses too). Saved with ``LoraConfig(lora_bias=True, ...)`` it loads in either PEFT.

    MiCA inputs (``lora_B`` frozen): the exact concatenation of MiCA adapters only keeps
    ``lora_B`` frozen (where its rank stays within ``min(in, out)``); any other method, ``rank``,
    ``factors=True`` or a mix of MiCA and plain inputs gives a plain LoRA and warns
    (``UserWarning``, once per call; see the module docstring).

    >>> import jax, jax.numpy as jnp, flax.linen as nn, jpeft
    >>> from jpeft.merging import merge_adapters
    >>> model = nn.Dense(3); x = jnp.ones((1, 4))
    >>> params = model.init(jax.random.key(0), x)
    >>> cfg = jpeft.LoraConfig(r=2, target_modules=".*", init_weights="random")
    >>> a, b = (jpeft.init(cfg, params, jax.random.key(i)) for i in (1, 2))
    >>> m = merge_adapters([a, b], [0.5, 2.0], method="cat")
    >>> m[""].r
    4
    >>> want = 0.5 * a[""].delta_matrix() + 2.0 * b[""].delta_matrix()
    >>> bool(jnp.allclose(m[""].delta_matrix(), want, atol=1e-6))
    True
    """
    if factors:
        return _merge_factors(adapters, weights, method, rank, density, majority_sign, key)
    if method == "cat" and rank is not None:
        raise ConfigError("method 'cat' is exact (its rank is the sum of the input ranks); use method='svd' with a rank.")
    if rank is not None and rank != "full" and (not isinstance(rank, (int, np.integer)) or isinstance(rank, bool) or rank < 1):
        raise ConfigError(f"rank must be a positive integer, 'full' or None; found {rank!r}.")
    adapters, weights, sites = _validate(adapters, weights, method, density, majority_sign, key)
    if method in ("linear", "cat") and rank is None:
        return _cat(adapters, weights, sites)
    _warn_mica_dropped(adapters, f"method {method!r} with rank={rank!r} builds a lora_B from an SVD of the merged "
                                 "update, not the base's minor singular vectors (MiCA's)")
    if method == "linear":
        method = "svd"
    deltas = _deltas(adapters, weights, sites, method, density, majority_sign, key)
    default_rank = max(int(lr.a.shape[-1]) for ad in adapters for lr in ad.values())
    out = {}
    for path, d in deltas.items():
        lay = sites[path].layout
        r = min(lay.in_features, lay.out_features) if rank == "full" else int(rank or default_rank)
        a, b = _factor(d, r)
        out[path] = low_rank_node(sites[path]._replace(a=a, b=b))
    return out


def _merge_factors(adapters, weights, method, rank, density, majority_sign, key) -> dict:
    """PEFT's ``add_weighted_adapter`` for the types it applies to A and B separately
    (``_generalized_task_arithmetic_weighted_adapter``)."""
    adapters, weights, sites = _validate(adapters, weights, method, density, majority_sign, key)
    if method not in FACTOR_METHODS:
        raise ConfigError(f"factors=True combines the A and B factors separately, as PEFT's add_weighted_adapter "
                          f"does for {FACTOR_METHODS}; found method {method!r}, which PEFT computes as jpeft does "
                          "without factors (use factors=False).")
    if rank is not None:
        raise ConfigError(f"factors=True keeps the inputs' rank (PEFT's add_weighted_adapter does for {method!r}); "
                          f"found rank={rank!r}. Leave rank out, or use factors=False to factor the merged update.")
    if len(adapters) == 1:  # as PEFT: one adapter is merged linearly (density ignored)
        method = "linear"
    _warn_mica_dropped(adapters, "factors=True combines the inputs' lora_B entrywise (PEFT's add_weighted_adapter), "
                                 "which is not in general the base's minor singular vectors (MiCA's)", 4)
    out = {}
    for path, site in sites.items():
        have = [(ad[path], w) for ad, w in zip(adapters, weights) if path in ad]
        ranks = sorted({int(lr.a.shape[-1]) for lr, _ in have})
        if len(ranks) > 1:
            raise ConfigError(f"factors=True adds the adapters' A and B factors entrywise, as PEFT's "
                              f"add_weighted_adapter does for {method!r}, which needs equal ranks; found ranks {ranks} "
                              f"at {path!r}. Use factors=False (the updates), or method 'cat' or 'svd'.")
        sw = [w * float(lr.scale) for lr, w in have]
        wa = jnp.asarray([math.copysign(math.sqrt(abs(x)), x) for x in sw], jnp.float32)
        wb = jnp.asarray([math.sqrt(abs(x)) for x in sw], jnp.float32)
        k = _site_key(key, path)
        ka, kb = (None, None) if k is None else jax.random.split(k)
        a = _combine([lr.a for lr, _ in have], wa, method, density, majority_sign, ka)
        b = _combine([lr.b for lr, _ in have], wb, method, density, majority_sign, kb)
        out[path] = low_rank_node(site._replace(a=a, b=b))
    return out


def _cat(adapters, weights, sites) -> dict:
    some, every = _mica_inputs(adapters)
    if some and not every:
        _warn_mica_dropped(adapters, "the inputs mix MiCA adapters (lora_B frozen) with plain ones (lora_B trained)", 4)
    if every:  # MiCA needs r <= min(in, out) (PEFT's mica_init refuses more; a saved MiCA would not load)
        for path, site in sites.items():
            lay, r = site.layout, sum(int(ad[path].a.shape[-1]) for ad in adapters if path in ad)
            most = min(lay.in_features, lay.out_features)
            if r > most:
                every = False
                _warn_mica_dropped(adapters, f"the concatenation has rank {r} at {path!r}, above min(in, out) = "
                                             f"{most}, which MiCA cannot have", 4)
                break
    out = {}
    for path, site in sites.items():
        As, Bs = [], []
        for ad, w in zip(adapters, weights):
            node = ad.get(path)
            if node is None:
                continue
            As.append(jnp.asarray(node.a, jnp.float32))
            Bs.append((w * node.scale) * jnp.asarray(node.b, jnp.float32))
        out[path] = low_rank_node(site._replace(a=jnp.concatenate(As, axis=1), b=jnp.concatenate(Bs, axis=0),
                                                frozen_b=every))
    return out


def _kernel_shaped(lay: Layout, delta: jax.Array) -> jax.Array:
    d = delta.reshape(tuple(lay.in_dims) + tuple(lay.out_dims))
    order = tuple(lay.in_axes) + tuple(lay.out_axes)
    return jnp.transpose(d, tuple(int(i) for i in np.argsort(order)))


def merge_into_base(
    params,
    adapters: Sequence[Adapter],
    weights: Optional[Sequence[float]] = None,
    *,
    method: str = "linear",
    density: Optional[float] = None,
    majority_sign: str = "total",
    key=None,
):
    """A copy of ``params`` with the merged update of ``adapters`` added to the base kernels
    (exactly, without rank truncation), for single-tenant serving with no adapter overhead.
    With one adapter and ``method="linear"`` this equals :func:`jpeft.merge` (on a quantized base,
    too: the result is the dequantized base with the update folded in; for an ``nnx.Module``, a
    new merged module, and for its ``nnx.State``, the merged state), and like it refuses
    an embedding update that would also act on the model's tied output projection where the
    unmerged adapters act on the input lookup only.

    Adapters with a ``lora_bias``: their merged bias ``Σ w_i s_i lora_bias_i`` (:func:`merge_deltas`)
    is added to the base layer's bias wherever an input has one, for every method (as PEFT 0.22's
    ``add_weighted_adapter`` then ``merge_and_unload``).

    Raises:
      ShapeMismatchError: an adapter site the params do not have, or of another shape.
      NotMergeableError: an input's ``lora_bias`` at a layer with no bias to fold it into (as
        :func:`jpeft.merge` and PEFT refuse); an embedding the model also reads as its tied output projection,
        adapted on its input lookup only (no ``ensure_weight_tying``); for an ``nnx.Module``, a
        site on a module whose weights another module also holds (as :func:`jpeft.merge`); a site
        on a module that computes with its own function of its kernel (as :func:`jpeft.merge`).
      (and what :func:`merge_deltas` raises)
    """
    low, weights, sites = _validate(adapters, weights, method, density, majority_sign, key, fold=True)
    # the sites where an input has a lora_bias (elsewhere the merged bias is zero: nothing to fold)
    biased = {path: [i for i, ad in enumerate(low) if path in ad and ad[path].bias is not None] for path in sites}
    biased = {path: have for path, have in biased.items() if have}
    for path, site in sites.items():
        check_tied_merge(site)
        check_kernel_fn_merge(path, site.layout, "jpeft.merging.merge_into_base")
    if is_nnx_module(params):  # an NNX model in, a new NNX model out (as jpeft.merge)
        from jpeft import _nnx  # flax.nnx: on the NNX path only (docs/ARCHITECTURE.md, "Start-up time")

        return _nnx.fold_module(params, sites, lambda state: merge_into_base(
            state, adapters, weights, method=method, density=density, majority_sign=majority_sign, key=key))
    deltas = _deltas(low, weights, sites, method, density, majority_sign, key)
    if quant.has_quantized(params):  # as jpeft.merge: the dequantized base, the update folded in
        params = quant.dequantize(params)
    inner, wrapped = unwrap_params(params)
    new = inner
    tally = RoundingTally()
    for path, d in deltas.items():
        lay = sites[path].layout
        try:
            own = get_subtree(new, path)
        except (KeyError, TypeError):
            raise ShapeMismatchError(
                f"the adapters have a site {path!r} that the params do not have; were they made for another model?"
            ) from None
        pname = lay.param_name
        if pname not in own or tuple(own[pname].shape) != tuple(lay.kernel_shape):
            got = tuple(own[pname].shape) if pname in own else None
            raise ShapeMismatchError(
                f"the adapters were made for a {pname} of shape {tuple(lay.kernel_shape)} at {path!r}; the params hold "
                f"{got}. Merge into the base model the adapters were trained on."
            )
        w = own[pname]
        upd = dict(own)
        exact = {pname: w.astype(jnp.float32) + _kernel_shaped(lay, d)}
        upd[pname] = exact[pname].astype(w.dtype)
        if path in biased:
            exact["bias"] = _fold_bias(own, upd, sites[path].bias, path, biased[path])
        tally.add(own, exact, upd)
        new = set_subtree(new, path, upd)
    tally.warn("jpeft.merging.merge_into_base", stacklevel=3)
    return rewrap_params(params, new, wrapped)


__all__ = [
    "METHODS",
    "FACTOR_METHODS",
    "merge_adapters",
    "merge_deltas",
    "merge_into_base",
    "combine",
    "magnitude_prune",
    "random_prune",
    "majority_sign_mask",
    "disjoint_merge",
]
