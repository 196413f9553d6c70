"""Residual-base initialisations of LoRA: PiSSA (Meng et al. 2024; principal singular values
and vectors), MiLoRA (Wang et al. 2024; minor singular values and vectors) and OLoRA
(Büyükakyüz 2024; QR factors).

With ``W = U S V^T`` (the kernel viewed as ``[in, out]``) and the LoRA scale ``s``, PiSSA sets

``A = U_r sqrt(S_r / s)``, ``B = sqrt(S_r / s) V_r^T`` and the base to the residual ``W - s A B``,

so the model's function is unchanged at the start while the adapter holds the ``r`` principal
directions of ``W`` (Hugging Face PEFT's ``init_lora_weights="pissa"``, same formulas). Because
the base changes, PiSSA needs its own entry point, :func:`init_pissa`, which returns the residual
params with the adapter; ``jpeft.init`` with ``LoraConfig(init="pissa")`` refuses and points here.
:func:`init_milora` takes the ``r`` *smallest* singular triplets instead, so the base keeps the
principal part and the adapter starts in the directions the pretrained weight uses least (the
aim is to disturb pretrained knowledge less). :func:`init_olora` does the same with ``W^T = Q R``. The sites record their init
(``LoraWeights.residual``) so :func:`jpeft.hf.save_peft` can tell Hugging Face PEFT which
residual base to recompute on load.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import core, quant
from jpeft.errors import ConfigError, InputValidationError, QuantizationError
from jpeft.methods import dora
from jpeft.methods._common import from_matrix, to_matrix
from jpeft.methods.base import Kind
from jpeft.methods.lora import LoraConfig, LoraWeights
from jpeft.scan import Stacked
from jpeft.tree import get_subtree, rewrap_params, set_subtree, unwrap_params


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
      config: a :class:`jpeft.LoraConfig` (its ``init`` field is ignored; ``use_dora``,
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
    return _residual_init("init_pissa", tag, factors, config, params, key, model, model_args, model_kwargs)


def _svd_bottom(w, r: int):
    """The ``r`` smallest of the ``min(m, n)`` singular triplets of ``w: [m, n]`` (exact SVD; a
    randomized SVD finds the top of the spectrum, not its tail)."""
    u, s, vh = jnp.linalg.svd(w, full_matrices=False)
    return u[:, -r:], s[-r:], vh[-r:]


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
        u, s, vh = _svd_bottom(mat, r)
        sr = jnp.sqrt(s / scale)
        return u * sr.reshape(1, -1), sr.reshape(-1, 1) * vh

    return _residual_init("init_milora", "milora", factors, config, params, key, model, model_args, model_kwargs)


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

    return _residual_init("init_olora", "olora", factors, config, params, key, model, model_args, model_kwargs)


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
        import warnings

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


def _residual_init(name, tag, factors, config, params, key, model, model_args, model_kwargs):
    if not isinstance(config, LoraConfig):
        raise ConfigError(f"{name} expects a jpeft.LoraConfig, found {type(config).__name__}.")
    refuse_quantized(name, params)
    if config.lora_bias:
        raise ConfigError(
            f"{name}: lora_bias=True works with the default and random inits only (LoraConfig refuses it with init="
            f"'pissa'/'olora', and Hugging Face PEFT refuses init_lora_weights='pissa' etc. with lora_bias=True, so a "
            "saved adapter would not load there). Use lora_bias=False."
        )
    base_cfg = dataclasses.replace(config, init="default", use_dora=False)
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
