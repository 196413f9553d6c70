"""CorDA (Yang et al. 2024, "CorDA: Context-Oriented Decomposition Adaptation of Large Language
Models"): a residual-base LoRA init from the SVD of each weight times the covariance of its
inputs on calibration data, as Hugging Face PEFT's ``init_lora_weights="corda"`` with
``preprocess_corda`` computes it.

For a targeted linear layer with PEFT's weight ``W: [out, in]`` and calibration inputs ``X``
(one ``[tokens, in]`` matrix per forward pass, each divided by ``|max(X)|``), ``C`` is the mean
of ``X^T X`` over the passes, damped to ``C + d * mean(diag C) * I`` (``d = 0.01``, doubled
until the inverse is accurate), and ``W C = U S V_h``. With ``V = (V_h C^-1)^T``:

* **KPM** (knowledge-preserved mode, ``mode="kpm"``): the adapter takes the ``r`` *smallest*
  components, so the directions the calibration data (what must not be forgotten) uses most
  stay in the frozen base;
* **IPM** (instruction-previewed mode, ``mode="ipm"``): the ``r`` largest.

``lora_A = sqrt(S_r / s) V_r^T``, ``lora_B = U_r sqrt(S_r / s)`` (PEFT's orientation) and the
base becomes ``W - s B A``, so the model is unchanged at the start. PEFT rebuilds that base on
load only after rerunning ``preprocess_corda`` on the same data, so :func:`jpeft.hf.save_peft`
refuses these adapters; merge them to share the result.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import numpy as np

from jpeft import _inject, core
from jpeft.errors import ConfigError, InputValidationError
from jpeft.methods.base import Kind
from jpeft.methods.lora import LoraWeights
from jpeft.methods.pissa import residual_init, refuse_quantized
from jpeft.scan import Stacked
from jpeft.tree import is_nnx, is_nnx_module

__all__ = ["init_corda", "input_covariances"]


def input_covariances(model, params, paths, calibration, **model_kwargs) -> dict:
    """``{path: C}`` (``float32 [in, in]``): the mean over the calibration passes of
    ``X^T X / max(X)^2``, with ``X`` the ``[tokens, in]`` inputs of the module at ``path`` in
    one pass (PEFT's CorDA hook: each input divided by the absolute value of its largest
    entry). ``calibration``: an iterable of model inputs, each a tuple of positional arguments
    (or one array); every item is one forward pass."""
    paths = sorted(paths)
    if is_nnx(model):  # the graphdef (or nnx.Module) and its state, as jpeft.init takes them
        from jpeft import _nnx  # flax.nnx: on the NNX path only (docs/ARCHITECTURE.md, "Start-up time")

        model, params = _nnx.split(model, None if is_nnx_module(params) else params)
        capture = functools.partial(_nnx.call_inputs, model)
    else:
        capture = functools.partial(_inject.call_inputs, model)

    @jax.jit
    def one(p, args):
        got = capture(p, paths, *args, **model_kwargs)
        out = {}
        for path, xs in got.items():
            covs = []
            for x in xs:
                x = x.reshape(-1, x.shape[-1]).astype(np.float32)
                x = x / abs(x.max())
                covs.append(x.T @ x)
            out[path] = (sum(covs), len(covs))
        return out

    total, count = {}, {}
    for item in calibration:
        args = item if isinstance(item, tuple) else (item,)
        for path, (c, n) in one(params, args).items():
            if n:
                total[path] = total.get(path, 0) + np.asarray(c, np.float64)
                count[path] = count.get(path, 0) + n
    missing = [p for p in paths if not count.get(p)]
    if missing:
        raise ConfigError(f"CorDA: the calibration data never reached the modules {missing}; give inputs that run "
                          "through the whole model (and at least one pass).")
    bad = [p for p in paths if not np.isfinite(total[p]).all()]
    if bad:  # PEFT raises too; left in, the damping loop of _damped_inverse would never end on a NaN covariance
        raise InputValidationError(
            f"CorDA: the calibration inputs of the modules {bad} give a non-finite covariance: a pass whose inputs "
            "to such a module are all zero (or whose largest entry is 0) cannot be divided by |max(X)|, as PEFT's "
            "CorDA hook does, or the inputs hold NaN/inf. Give calibration data that reaches these modules with "
            "nonzero, finite activations (or leave them out of target_modules)."
        )
    return {p: (total[p] / count[p]).astype(np.float32) for p in paths}


def _damped_inverse(c):
    """PEFT's ``collect_eigens_for_layer``: ``C + d * mean(diag C) * I`` and its inverse, with
    ``d`` doubled from 0.01 until ``||C_d C_d^-1 - I|| < 0.05``."""
    damp = 0.01
    eye = np.eye(c.shape[0], dtype=np.float32)
    while True:
        fix = c + eye * np.float32(np.mean(np.diag(c)) * damp)
        inv = np.linalg.inv(fix)
        if np.linalg.norm(fix @ inv - eye) < 0.05:
            return fix, inv
        damp *= 2


def init_corda(config, params, key, model, calibration, *, mode: Literal["kpm", "ipm"] = "kpm", **model_kwargs):
    """Creates a CorDA-initialised LoRA adapter and the residual base (module docstring).

    Args:
      config: a :class:`jpeft.LoraConfig` (``r``, ``alpha``, ``rank_pattern``,
        ``alpha_pattern`` and the target options are honoured; not DoRA).
      params: the base model's variables.
      key: unused (the init is deterministic); kept for the common signature.
      model: the Flax model (needed to run the calibration data through it): a linen module, or
        an NNX model's ``graphdef`` (or the ``nnx.Module``) with ``params`` its ``nnx.State``.
      calibration: an iterable of model inputs, each a tuple of positional arguments (or one
        array); one forward pass each. To match PEFT exactly, give each pass one sequence
        (PEFT's hook assumes batch size 1).
      mode: ``"kpm"`` (knowledge-preserved: the adapter starts in the directions the
        calibration data uses least; give data of what must not be forgotten) or ``"ipm"``
        (instruction-previewed: the most used; give data of the new task).

    Returns:
      ``(residual_params, adapter)``, as :func:`jpeft.init_pissa`.

    >>> import jax, jax.numpy as jnp, flax.linen as nn, jpeft
    >>> model = nn.Dense(6); xs = [jax.random.normal(jax.random.key(i), (5, 8)) for i in range(3)]
    >>> params = model.init(jax.random.key(0), xs[0])
    >>> res, ad = jpeft.init_corda(jpeft.LoraConfig(r=2, alpha=2, target_modules=".*"), params, None, model, xs)
    >>> bool(jnp.allclose(jpeft.apply(model, res, ad, xs[0]), model.apply(params, xs[0]), atol=1e-4))
    True
    """
    if mode not in ("kpm", "ipm"):
        raise ConfigError(f"init_corda: mode must be 'kpm' or 'ipm', found {mode!r}.")
    if getattr(config, "use_dora", False):
        raise ConfigError("init_corda: CorDA with DoRA is not implemented (PEFT's CorDA sets only lora_A/lora_B); "
                          "use use_dora=False.")
    refuse_quantized("init_corda", params)  # before the calibration pass, which would run model.apply on it
    calibration = [c if isinstance(c, tuple) else (c,) for c in calibration]
    if not calibration:
        raise ConfigError("init_corda: calibration is empty; give at least one model input.")
    key = jax.random.key(0) if key is None else key
    skeleton = core.init(dataclasses.replace(config, init_weights="default"), params, key, model, *calibration[0], **model_kwargs)
    # the LoRA sites (modules_to_save copies, trainable biases and tokens need no statistics)
    skeleton = {p: n for p, n in skeleton.items() if isinstance(n.inner if isinstance(n, Stacked) else n, LoraWeights)}
    for path, node in skeleton.items():
        if isinstance(node, Stacked):
            raise ConfigError(f"init_corda: site {path!r} is layer-scanned (jpeft.scan); CorDA needs per-layer "
                              "calibration statistics. Load the model unrolled (scan_layers=False).")
        if node.layout.kind != Kind.DENSE:
            raise ConfigError(f"init_corda: site {path!r} is a {node.layout.kind} site; CorDA supports plain dense "
                              "layers (nn.Dense), as PEFT's supports nn.Linear. Narrow target_modules.")
    covs = input_covariances(model, params, sorted(skeleton), calibration, **model_kwargs)

    def factors(mat, r, scale, k, path):
        w = np.asarray(mat, np.float32).T  # PEFT's [out, in]
        c = covs[path]
        if c.shape[0] != w.shape[1]:
            raise ConfigError(f"init_corda: module {path!r} receives inputs of width {c.shape[0]} but its kernel "
                              f"has {w.shape[1]} inputs; CorDA supports plain dense layers (nn.Dense).")
        fix, inv = _damped_inverse(c)
        u, s, vh = np.linalg.svd(w @ fix, full_matrices=False)
        v = (vh @ inv).T
        sl = slice(-r, None) if mode == "kpm" else slice(0, r)
        u, s, v = u[:, sl], s[sl] / scale, v[:, sl]
        a_peft = v.T * np.sqrt(s)[:, None]  # [r, in]
        b_peft = u * np.sqrt(s)[None, :]  # [out, r]
        return jax.numpy.asarray(a_peft.T), jax.numpy.asarray(b_peft.T)

    return residual_init("init_corda", f"corda_{mode}", factors, config, params, key, model, calibration[0],
                          model_kwargs)
