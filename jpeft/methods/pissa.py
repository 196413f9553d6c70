"""Residual-base initialisations of LoRA: PiSSA (Meng et al. 2024; principal singular values
and vectors), MiLoRA (Wang et al. 2024; minor singular values and vectors) and OLoRA
(Büyükakyüz 2024; QR factors).

With ``W = U S V^T`` (the kernel viewed as ``[in, out]``) and the LoRA scale ``s``, PiSSA sets

``A = U_r sqrt(S_r / s)``, ``B = sqrt(S_r / s) V_r^T`` and the base to the residual ``W - s A B``,

so the model's function is unchanged at the start while the adapter holds the ``r`` principal
directions of ``W`` (Hugging Face PEFT's ``init_lora_weights="pissa"``, same formulas). Because
the base changes, PiSSA needs its own entry point, :func:`init_pissa`, which returns the residual
params with the adapter; ``jpeft.init`` with ``LoraConfig(init_weights="pissa")`` refuses and points here.
:func:`init_milora` takes the ``r`` *smallest* singular triplets instead, so the base keeps the
principal part and the adapter starts in the directions the pretrained weight uses least (the
aim is to disturb pretrained knowledge less). :func:`init_olora` does the same with ``W^T = Q R``. The sites record their init
(``LoraWeights.residual``) so :func:`jpeft.hf.save_peft` can tell Hugging Face PEFT which
residual base to recompute on load.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import core, quant
from jpeft.errors import ConfigError, InputValidationError, QuantizationError, ShapeMismatchError
from jpeft.methods import dora
from jpeft.methods._common import from_matrix, svd_bottom, to_matrix
from jpeft.methods.base import Kind
from jpeft.methods.lora import LoraConfig, LoraWeights
from jpeft.scan import Stacked
from jpeft.tree import get_subtree, is_nnx_module, path_str, rewrap_params, set_subtree, unwrap_params


def _svd_top(w, r: int, niter: Optional[int], key):
    """Top-``r`` singular triplets of ``w: [m, n]`` (exact, or randomized with ``niter``
    subspace iterations as ``torch.svd_lowrank`` does, oversampling ``min(r, ...)``)."""
    if niter is None:
        u, s, vh = jnp.linalg.svd(w, full_matrices=False)
        return u[:, :r], s[:r], vh[:r]
    m, n = w.shape
    q = min(r + min(r, 10), m, n)  # a little oversampling
    omega = jax.random.normal(key, (n, q), w.dtype)
    y, _ = jnp.linalg.qr(w @ omega)
    for _ in range(int(niter)):
        z, _ = jnp.linalg.qr(w.T @ y)
        y, _ = jnp.linalg.qr(w @ z)
    b = y.T @ w
    ub, s, vh = jnp.linalg.svd(b, full_matrices=False)
    u = y @ ub
    return u[:, :r], s[:r], vh[:r]


def init_pissa(config, params, key, model=None, *model_args, niter: Optional[int] = None, **model_kwargs):
    """Creates a PiSSA-initialised LoRA (or DoRA) adapter and the residual base.

    Args:
      config: a :class:`jpeft.LoraConfig` (its ``init_weights`` field is ignored; ``use_dora``,
        ``rank_pattern`` and ``alpha_pattern`` are honoured).
      params: the base model's variables.
      key: a ``jax.random`` key (used only by the randomized SVD).
      model, *model_args: optional, as for :func:`jpeft.init` (needed for modules whose kernel
        layout cannot be told from its shape).
      niter: ``None`` for an exact SVD; an integer for a randomized SVD with that many power
        iterations (Hugging Face PEFT's ``"pissa_niter_K"``), much faster on large kernels.

    Returns:
      ``(residual_params, adapter)``: ``jpeft.apply(model, residual_params, adapter, x)``
      equals ``model.apply(params, x)`` at the start (up to float rounding), and
      ``jpeft.merge(residual_params, adapter)`` gives the trained full weights.

    >>> import jax, jax.numpy as jnp, flax.linen as nn, jpeft
    >>> from jpeft.methods.pissa import init_pissa
    >>> model = nn.Dense(6); x = jnp.ones((2, 8))
    >>> params = model.init(jax.random.key(0), x)
    >>> res, ad = init_pissa(jpeft.LoraConfig(r=2, alpha=2, target_modules=".*"), params, jax.random.key(1))
    >>> bool(jnp.allclose(jpeft.apply(model, res, ad, x), model.apply(params, x), atol=1e-5))
    True
    """
    if niter is not None and (isinstance(niter, bool) or not isinstance(niter, int) or niter < 0):
        raise ConfigError(f"init_pissa: niter must be None (exact SVD) or a non-negative integer, found {niter!r}.")

    def factors(mat, r, scale, k, path):
        u, s, vh = _svd_top(mat, r, niter, k)
        sr = jnp.sqrt(s / scale)
        return u * sr.reshape(1, -1), sr.reshape(-1, 1) * vh

    tag = "pissa" if niter is None else f"pissa_niter_{niter}"
    return residual_init("init_pissa", tag, factors, config, params, key, model, model_args, model_kwargs)


def init_milora(config, params, key, model=None, *model_args, **model_kwargs):
    """Creates a MiLoRA-initialised LoRA (or DoRA) adapter (Wang et al. 2024, "MiLoRA:
    Harnessing Minor Singular Components for Parameter-Efficient LLM Finetuning") and the
    residual base.

    As :func:`init_pissa`, but from the ``r`` *minor* singular triplets of each kernel
    (``W = U S V^T``, singular values in decreasing order): ``A = U[:, -r:] sqrt(S[-r:] / s)``,
    ``B = sqrt(S[-r:] / s) V[:, -r:]^T`` and the base becomes ``W - s A B``, the principal part
    (the paper's code does the same in PEFT's PiSSA routine with the last ``r`` components).
    Hugging Face PEFT 0.21 has no MiLoRA init (its ``"mica"`` also uses the minor left singular
    vectors, but zeroes ``A``, freezes ``B`` and keeps the base), so :func:`jpeft.hf.save_peft`
    refuses these adapters; merge them to share the result.

    Args and returns: as :func:`init_pissa` (exact SVD only; ``key`` is unused).

    >>> import jax, jax.numpy as jnp, flax.linen as nn, jpeft
    >>> model = nn.Dense(6); x = jnp.ones((2, 8))
    >>> params = model.init(jax.random.key(0), x)
    >>> res, ad = jpeft.init_milora(jpeft.LoraConfig(r=2, alpha=2, target_modules=".*"), params, jax.random.key(1))
    >>> bool(jnp.allclose(jpeft.apply(model, res, ad, x), model.apply(params, x), atol=1e-5))
    True
    """

    def factors(mat, r, scale, k, path):
        u, s, vh = svd_bottom(mat, r)
        sr = jnp.sqrt(s / scale)
        return u * sr.reshape(1, -1), sr.reshape(-1, 1) * vh

    return residual_init("init_milora", "milora", factors, config, params, key, model, model_args, model_kwargs)


def init_olora(config, params, key, model=None, *model_args, **model_kwargs):
    """Creates an OLoRA-initialised LoRA (or DoRA) adapter (Büyükakyüz 2024) and the residual base.

    With the kernel as Hugging Face stores it, ``W_t = W^T: [out, in] = Q R`` (QR decomposition),
    OLoRA sets PEFT's ``lora_B = Q[:, :r]``, ``lora_A = R[:r]`` (so jpeft's ``lora_A = R[:r]^T``,
    ``lora_B = Q[:, :r]^T``) and the base to ``W - s A B``, as Hugging Face PEFT's
    ``init_lora_weights="olora"`` does. ``Q_r R_r`` is unique, so the residual matches PEFT's
    whatever sign convention the QR routine uses.

    Args and returns: as :func:`init_pissa` (``key`` is unused; the QR is deterministic).

    >>> import jax, jax.numpy as jnp, flax.linen as nn, jpeft
    >>> model = nn.Dense(6); x = jnp.ones((2, 8))
    >>> params = model.init(jax.random.key(0), x)
    >>> res, ad = jpeft.init_olora(jpeft.LoraConfig(r=2, alpha=2, target_modules=".*"), params, jax.random.key(1))
    >>> bool(jnp.allclose(jpeft.apply(model, res, ad, x), model.apply(params, x), atol=1e-5))
    True
    """

    def factors(mat, r, scale, k, path):
        q, rr = jnp.linalg.qr(mat.T)  # mat.T is PEFT's [out, in] weight
        return rr[:r].T, q[:, :r].T

    return residual_init("init_olora", "olora", factors, config, params, key, model, model_args, model_kwargs)


def residual_params(config, params, adapter, init: str):
    """The residual base Hugging Face PEFT computes when it loads an adapter saved with
    ``init_lora_weights=init`` (``"pissa"`` or ``"olora"``): for each site of ``adapter``,
    ``W - s A0 B0`` with ``A0, B0`` the initial factors of the base's ``W`` (exact SVD or QR).
    Used by :func:`jpeft.hf.load_peft_with_base`."""
    inner, wrapped = unwrap_params(params)
    new = inner
    for path in sorted(adapter):
        if isinstance(adapter[path], Stacked) and isinstance(adapter[path].inner, LoraWeights):
            raise ConfigError(
                f"residual_params: site {path!r} is layer-scanned (stacked); the residual base is computed per layer. "
                "Use params and an adapter of the unrolled model (scan_layers=False; jpeft.scan.unstack_params / "
                "unstack_adapter), then stack the result."
            )
        if not isinstance(adapter[path], LoraWeights):  # modules_to_save copies, trainable biases and tokens
            continue
        lay = adapter[path].layout
        if lay.kind == Kind.EMBED:  # PEFT's Embedding layer has no PiSSA/OLoRA init: its base is unchanged
            continue
        r, alpha = config.rank_alpha(path)
        scale = config.scale(r, alpha)
        own = dict(get_subtree(new, path))
        w = jnp.asarray(own[lay.param_name])
        mat = to_matrix(w.astype(jnp.float32), lay)
        if init == "pissa":
            u, s, vh = _svd_top(mat, r, None, None)
            delta = (u * s.reshape(1, -1)) @ vh
        elif init == "olora":
            q, rr = jnp.linalg.qr(mat.T)
            delta = scale * (q[:, :r] @ rr[:r]).T
        else:
            raise ConfigError(f"no residual base is known for init_lora_weights={init!r}; expected 'pissa' or 'olora'.")
        own[lay.param_name] = from_matrix(mat - delta, lay).astype(w.dtype)
        new = set_subtree(new, path, own)
    return rewrap_params(params, new, wrapped)


def convert_residual_config(config):
    """The config of :func:`convert_residual_adapter`'s plain adapter, as Hugging Face PEFT's
    ``save_pretrained(..., path_initial_model_for_weight_conversion=...)`` writes it: ``init_weights``
    back to ``"default"`` and every rank doubled (``r`` and ``rank_pattern``), with ``alpha``
    (and ``alpha_pattern``) doubled, or multiplied by ``sqrt(2)`` under ``use_rslora``, so each
    site keeps its scale. Give it to :func:`jpeft.hf.save_peft` / :func:`jpeft.save_adapter`
    with the converted adapter.

    >>> import jpeft
    >>> c = jpeft.convert_residual_config(jpeft.LoraConfig(r=4, alpha=8, init_weights="pissa", target_modules=".*"))
    >>> (c.r, c.alpha, c.init_weights)
    (8, 16.0, 'default')
    """
    if not isinstance(config, LoraConfig):
        raise ConfigError(f"convert_residual_config expects a jpeft.LoraConfig, found {type(config).__name__}.")
    f = 2 ** 0.5 if config.use_rslora else 2.0
    return dataclasses.replace(
        config, init_weights="default", r=2 * int(config.r), alpha=f * float(config.alpha),
        rank_pattern={k: 2 * int(v) for k, v in config.rank_pattern.items()},
        alpha_pattern={k: f * float(v) for k, v in config.alpha_pattern.items()})


def _initial_delta(w, w_res, lay, r: int, scale: float):
    """``(a0, b0, tail, size)`` for one kernel: ``s * a0 @ b0`` is the best rank-``r`` fit of
    ``W - W_res`` (the initial update the residual init moved out of the base, as rounded into
    the residual's dtype), ``tail`` the Frobenius norm of what that fit leaves out and ``size``
    the rounding level it may not exceed (the residual's dtype on ``W_res``, plus float32 SVD error)."""
    wm = to_matrix(w.astype(jnp.float32), lay)
    rm = to_matrix(w_res.astype(jnp.float32), lay)
    d = wm - rm
    if 4 * min(2 * r, r + 10) < min(d.shape):
        # a large kernel: W - W_res is rank r up to rounding, which a randomized range finder (two power
        # iterations) captures exactly, at O(m n r) instead of a full SVD's O(m n min(m, n))
        u, s, vh = _svd_top(d, r, 2, jax.random.key(0))
    else:
        u, s, vh = jnp.linalg.svd(d, full_matrices=False)
    u, s, vh = u[:, :r], s[:r], vh[:r]
    sr = jnp.sqrt(s / scale)
    a0 = u * sr.reshape(1, -1)
    b0 = sr.reshape(-1, 1) * vh
    tail = jnp.linalg.norm(d - (u * s.reshape(1, -1)) @ vh)  # what the rank-r fit leaves out
    eps = float(jnp.finfo(jnp.dtype(w_res.dtype)).eps)
    size = eps * jnp.linalg.norm(rm) + 64 * float(jnp.finfo(jnp.float32).eps) * (jnp.linalg.norm(d) + jnp.linalg.norm(wm))
    return a0, b0, tail, size


def convert_residual_adapter(adapter, original_params, residual_params):
    """A residual-base adapter (:func:`init_pissa` with or without ``niter``, :func:`init_olora`,
    :func:`init_milora`, :func:`jpeft.init_corda`) as a plain LoRA of the *original* weights.

    The residual init set the base to ``W_res = W - s A0 B0``; after training the adapter holds
    ``A, B``, so the model is ``W_res + s A B = W + s (A B - A0 B0)``: each marked site becomes
    ``lora_A = [A | A0]``, ``lora_B = [B ; -B0]`` (rank ``2r``, same scale, unmarked), as Hugging
    Face PEFT's ``save_pretrained(..., path_initial_model_for_weight_conversion=...)`` writes it.
    ``A0, B0`` are read from the two params trees (a rank-``r`` SVD of ``W - W_res``), so every
    init converts, the randomized-SVD PiSSA and CorDA included, without its key or calibration
    data, and layer-scanned (stacked) sites per layer. The result applies, merges, joins
    :mod:`jpeft.merging` and an :class:`jpeft.AdapterBank`, and saves for PEFT on the original
    base; save it with :func:`convert_residual_config` of the config.

    ``jpeft.apply(model, original_params, plain, x)`` equals ``jpeft.apply(model,
    residual_params, adapter, x)`` and ``jpeft.merge(original_params, plain)`` equals
    ``jpeft.merge(residual_params, adapter)`` (up to float rounding, at the residual's precision:
    ``W - W_res`` carries its rounding), in inference. Under training-time dropout the two
    differ, as PEFT's conversion does: the dropout now also drops inputs of ``-s A0 B0``. A DoRA
    site converts exactly too (its magnitude is kept: ``W + s A'B'`` is the same matrix, so its
    column norms are), though PEFT's conversion drops the magnitude. Sites that are not marked
    (plain LoRA, modules_to_save copies, trainable biases and tokens) are kept as they are.

    Args:
      adapter: the adapter the residual init returned, trained or not.
      original_params: the base before the init (what ``init_pissa`` & co. were given).
      residual_params: the residual base that call returned. The order matters: swapped, the
        update would be subtracted twice.

    Returns:
      the plain adapter, for ``original_params``.

    Raises:
      ConfigError: ``adapter`` has no residual-marked site.
      QuantizationError: either params tree is quantized (the residual must be the float one the
        init returned; quantize after converting).
      ShapeMismatchError: the two trees differ in structure, shapes or dtypes.
      InputValidationError: they are not the adapter's original/residual pair (they differ outside
        its sites, are identical at every site, or differ at a site by more than a rank-``r`` update).

    >>> import jax, jax.numpy as jnp, flax.linen as nn, jpeft
    >>> model = nn.Dense(6); x = jnp.ones((2, 8))
    >>> params = model.init(jax.random.key(0), x)
    >>> res, ad = jpeft.init_pissa(jpeft.LoraConfig(r=2, alpha=2, target_modules=".*"), params, jax.random.key(1))
    >>> ad = jax.tree.map(lambda a: a + 0.1, ad)  # "trained"
    >>> plain = jpeft.convert_residual_adapter(ad, params, res)
    >>> (plain[""].r, plain[""].residual)
    (4, None)
    >>> bool(jnp.allclose(jpeft.apply(model, params, plain, x), jpeft.apply(model, res, ad, x), atol=1e-5))
    True
    """
    marked = {p: n for p, n in adapter.items()
              if isinstance(getattr(n, "unstacked", n), LoraWeights) and n.unstacked.residual is not None}
    if not marked:
        raise ConfigError("convert_residual_adapter: the adapter has no site from a residual init (jpeft.init_pissa, "
                          "init_olora, init_milora, init_corda); a plain LoRA already applies to the original params.")
    for name, tree in (("original_params", original_params), ("residual_params", residual_params)):
        if quant.has_quantized(tree):
            raise QuantizationError(
                f"convert_residual_adapter: {name} is quantized (jpeft.quantize); the initial factors are read from "
                "W - W_res, which a quantized residual rounds away. Convert with the full-precision params the init "
                "took and returned, then quantize the original params for the converted adapter.")
    orig, _ = unwrap_params(original_params)
    res, _ = unwrap_params(residual_params)
    flat_o, tdef_o = jax.tree_util.tree_flatten_with_path(orig)
    flat_r, tdef_r = jax.tree_util.tree_flatten_with_path(res)
    if tdef_o != tdef_r:
        raise ShapeMismatchError(
            "convert_residual_adapter: original_params and residual_params have different structures; give the "
            "params the residual init took and the residual params it returned.")
    sites = {(p, n.unstacked.layout.param_name) for p, n in marked.items()}
    names = [path_str(kp) for kp, _ in flat_o]
    for name, (_, a), (_, b) in zip(names, flat_o, flat_r):
        if (jnp.shape(a), jnp.result_type(a)) != (jnp.shape(b), jnp.result_type(b)):
            raise ShapeMismatchError(
                f"convert_residual_adapter: {name!r} is {jnp.result_type(a)}{list(jnp.shape(a))} in original_params but "
                f"{jnp.result_type(b)}{list(jnp.shape(b))} in residual_params; give the params the residual init took "
                "and the residual params it returned.")
    for name, (_, a), (_, b) in zip(names, flat_o, flat_r):
        where = tuple(name.rsplit("/", 1)) if "/" in name else ("", name)
        if where not in sites and a is not b and not bool(jnp.array_equal(a, b)):
            raise InputValidationError(
                f"convert_residual_adapter: original_params and residual_params differ at {name!r}, which no "
                "residual site of the adapter covers; they are not the pair the residual init took and returned "
                "(a residual init changes only the kernels it adapts).")
    out, same = {}, True
    for path, node in adapter.items():
        if path not in marked:
            out[path] = node
            continue
        inner = node.unstacked
        pname = inner.layout.param_name
        w, w_res = get_subtree(orig, path)[pname], get_subtree(res, path)[pname]
        same = same and bool(jnp.array_equal(w, w_res))
        fn = lambda a, b: _initial_delta(a, b, inner.layout, inner.r, inner.scale)  # noqa: E731
        a0, b0, tail, size = jax.vmap(fn)(w, w_res) if isinstance(node, Stacked) else fn(w, w_res)
        bad = np.flatnonzero(np.atleast_1d(np.asarray(tail > size)))
        if bad.size:
            where = "" if not isinstance(node, Stacked) else f" (layer {int(bad[0])} of the stack)"
            raise InputValidationError(
                f"convert_residual_adapter: at {path!r}{where} original_params - residual_params is not an update "
                f"of rank r={inner.r} (what is left beyond rank r: {float(np.atleast_1d(np.asarray(tail))[bad[0]]):.3g},"
                f" rounding allows {float(np.atleast_1d(np.asarray(size))[bad[0]]):.3g}); they are not the params this "
                "adapter's residual init took and returned (merged params, another model, or an edited base?).")
        new = dataclasses.replace(
            inner, residual=None,
            lora_A=jnp.concatenate([inner.lora_A, a0.astype(inner.lora_A.dtype)], axis=-1),
            lora_B=jnp.concatenate([inner.lora_B, -b0.astype(inner.lora_B.dtype)], axis=-2))
        out[path] = Stacked(new, node.length) if isinstance(node, Stacked) else new
    if same:
        raise InputValidationError(
            "convert_residual_adapter: original_params and residual_params are identical at every residual site; "
            "give the params the residual init took and the residual params it returned (not the same tree twice).")
    return out


def _check_untied_embedding(name, path, tied_output):
    """A residual init rewrites the embedding table, but an embedding LoRA without
    ``ensure_weight_tying`` adds its update to the input lookup only: where the model also reads
    the table as its tied output projection (``attend``), the outputs would change."""
    if tied_output:
        raise ConfigError(
            f"{name}: the embedding {path!r} is also the model's tied output projection (attend). The residual init "
            "replaces the shared table by the residual, but this embedding LoRA adds its update to the input lookup "
            "only, so the output projection would lose the initial factors and the model would change. Set "
            "LoraConfig(ensure_weight_tying=True) to adapt both, or leave the embedding out of target_modules."
        )
    if tied_output is None:
        warnings.warn(
            f"{name}: jpeft cannot tell whether the model also reads the embedding {path!r} as a tied output "
            "projection (attend); if it does, the residual base changes that projection while the adapter does not "
            f"act there. Pass the model to {name} (it then refuses such a site), or set "
            "LoraConfig(ensure_weight_tying=True) to adapt both.", UserWarning, stacklevel=4)


def refuse_quantized(name: str, params) -> None:
    """A residual init rewrites the base kernels it adapts: on a quantized base the residual would be
    re-quantized (rounding away most of the principal part it moved to the adapter); PEFT refuses
    PiSSA on a quantized layer too and asks for the init on the float base, then quantizing the residual."""
    if quant.has_quantized(params):
        raise QuantizationError(
            f"{name} rewrites the base kernels into a residual, and these params are quantized (jpeft.quantize); "
            f"as in PEFT, run {name} on the full-precision base, then quantize the residual it returns: "
            f"residual, adapter = jpeft.{name}(config, params, key, ...); q = jpeft.quantize(residual, 'nf4')."
        )


def residual_init(name, tag, factors, config, params, key, model, model_args, model_kwargs):
    if not isinstance(config, LoraConfig):
        raise ConfigError(f"{name} expects a jpeft.LoraConfig, found {type(config).__name__}.")
    if is_nnx_module(params):
        raise ConfigError(
            f"{name} got the nnx.Module {type(params).__name__} as params; it returns the residual base as a new state, "
            f"so pass the model's state: graphdef, state = nnx.split(model), then residual, adapter = {name}(config, "
            "state, key, graphdef, ...) and nnx.merge(graphdef, residual) for the residual model."
        )
    refuse_quantized(name, params)
    if config.lora_bias:
        raise ConfigError(
            f"{name}: lora_bias=True works with the default and random inits only (LoraConfig refuses it with init_weights="
            f"'pissa'/'olora', and Hugging Face PEFT refuses init_lora_weights='pissa' etc. with lora_bias=True, so a "
            "saved adapter would not load there). Use lora_bias=False."
        )
    base_cfg = dataclasses.replace(config, init_weights="default", use_dora=False)
    skeleton = core.init(base_cfg, params, jax.random.key(0), model, *model_args, **model_kwargs)
    inner, wrapped = unwrap_params(params)
    new = inner
    out = {}
    # init_olora / init_milora / init_corda and exact PiSSA do not use the key (documented so): None is fine
    keys = jax.random.split(jax.random.key(0) if key is None else key, max(len(skeleton), 1))

    def one(node, own, k, path):
        lay = node.layout
        pname = lay.param_name
        if lay.kind == Kind.EMBED and not node.tie_output:
            _check_untied_embedding(name, path, node.tied_output)
        w = jnp.asarray(own[pname])
        r = node.r
        if r > min(lay.in_features, lay.out_features):
            raise ConfigError(
                f"{name}: rank r={r} exceeds the rank of module {path!r} ({lay.in_features} x {lay.out_features}); "
                "lower r (or its rank_pattern entry)."
            )
        mat = to_matrix(w.astype(jnp.float32), lay)
        a, b = factors(mat, r, node.scale, k, path)
        node = dataclasses.replace(node, lora_A=a, lora_B=b, residual=tag)
        residual = mat - node.delta_matrix()
        own_new = dict(own)
        own_new[pname] = from_matrix(residual, lay).astype(w.dtype)
        if config.use_dora:
            node = dora.with_magnitude(node, own_new)
        return node, own_new

    for k, (path, node) in zip(keys, skeleton.items()):
        if not isinstance(node.inner if isinstance(node, Stacked) else node, LoraWeights):
            # modules_to_save copies, trainable biases and tokens start at the original values: no residual
            out[path] = node
            continue
        own = dict(get_subtree(new, path))
        w = own[(node.inner if isinstance(node, Stacked) else node).layout.param_name]
        if (isinstance(w, (jax.Array, np.ndarray)) and not isinstance(w, jax.core.Tracer)
                and not bool(jnp.all(jnp.isfinite(jnp.asarray(w, jnp.float32))))):
            # the factorisation of a NaN or inf weight is NaN: the adapter and residual would be silently NaN
            raise InputValidationError(f"{name}: the base weight of {path!r} holds NaN or inf values; its factorisation "
                                       "would be NaN. Load a finite checkpoint.")
        if isinstance(node, Stacked):  # a layer-scanned site: one factorisation per layer
            inner, own_new = jax.vmap(lambda n, o, kk: one(n, o, kk, path))(
                node.inner, own, jax.random.split(k, node.length))
            node = Stacked(inner, node.length)
        else:
            node, own_new = one(node, own, k, path)
        new = set_subtree(new, path, own_new)
        out[path] = node
    return rewrap_params(params, new, wrapped), out
