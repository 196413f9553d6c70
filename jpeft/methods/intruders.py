"""Intruder dimensions of a LoRA adapter and their post-hoc reduction.

Shuttleworth et al. (2024), "LoRA vs Full Fine-tuning: An Illusion of Equivalence", find that
LoRA's merged weights acquire high-ranking singular vectors nearly orthogonal to every
singular vector of the pretrained matrix ("intruder dimensions"), and that scaling them down
after training recovers pretrained behaviour (less forgetting) at some cost in the new task.
Hugging Face PEFT (0.21 on) ships the mitigation as
``peft.tuners.lora.intruders.reduce_intruder_dimension``; :func:`reduce_intruder_dimension`
here computes the same adapter from the same weights (tested against PEFT: factors equal up to
the sign of each singular pair, delta weights and logits equal to float tolerance).

Per LoRA site, with the base matrix ``W`` and ``W' = W + s * dW`` viewed as ``[out, in]``:

1. intruders: among the first ``top_k`` left singular vectors of ``W'``, those whose largest
   ``|cos|`` with a left singular vector of ``W`` is below ``threshold_epsilon``
   (:func:`jpeft.spectral.intruder_dimensions`);
2. none: the site is returned unchanged; otherwise ``W'' = W' + (mitigation_lambda - 1) *
   sum_i s_i u_i v_i^T`` over the intruders, so each intruder keeps ``mitigation_lambda`` of
   its singular value;
3. the new factors are the rank-``r`` truncated SVD of ``(W'' - W) / s``, split as
   ``B = U sqrt(S)``, ``A = sqrt(S) V^T`` (PyTorch orientation; jpeft stores their transposes).

Only plain LoRA on dense-type kernels (``nn.Dense``, ``nn.DenseGeneral``, ``nn.Einsum``) and
embeddings (``nn.Embed``: the table ``[vocab, d]`` is ``[in, out]``, so ``W`` is its transpose, as
PEFT 0.22 views an embedding; a tied table too) is handled; DoRA, convolutions and scanned
(stacked) layers are refused with a :class:`~jpeft.errors.ConfigError`, as PEFT refuses every
method but LoRA. PEFT before 0.22 decomposed embedding and GPT-2 ``Conv1D`` (fan_in_fan_out)
weights as stored, ``[in, out]``, and wrote factors its layers cannot run; jpeft's numbers on
those sites are PEFT 0.22's (``tests/test_intruders.py``). On a quantized base
(:func:`jpeft.quantize`) ``W`` is the kernel it dequantizes to, the one the adapter acts on.

>>> import jax, jax.numpy as jnp, flax.linen as nn, jpeft
>>> model = nn.Dense(8)
>>> params = model.init(jax.random.key(0), jnp.ones((1, 8)))
>>> cfg = jpeft.LoraConfig(r=2, target_modules=".*", init_weights="random")
>>> ad = jpeft.init(cfg, params, jax.random.key(1), model, jnp.ones((1, 8)))
>>> sorted(intruder_report(params, ad))
['']
>>> new = reduce_intruder_dimension(params, ad, top_k=4)
>>> new[""].lora_A.shape == ad[""].lora_A.shape
True
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from jpeft import quant, spectral
from jpeft.errors import ConfigError
from jpeft.methods.base import Kind
from jpeft.methods.lora import LoraWeights
from jpeft.tree import get_subtree, unwrap_params

__all__ = ["intruder_report", "reduce_intruder_dimension"]


def _sites(params, adapter: Mapping[str, Any]):
    """``(path, node, W [out, in] float64)`` for every LoRA site (an embedding table ``[vocab, d]`` is ``[in, out]``,
    as a Dense kernel); refuses what PEFT's method does not cover."""
    inner, _ = unwrap_params(params)
    for path, node in adapter.items():
        if not isinstance(node, LoraWeights):
            raise ConfigError(
                f"intruder-dimension reduction is defined for LoRA adapters only (as in PEFT), but the site {path!r} "
                f"is a {type(node).__name__}. Pass a LoRA adapter.")
        lay = node.layout
        if node.magnitude is not None:
            raise ConfigError(f"the LoRA site {path!r} is a DoRA site (use_dora=True); PEFT's intruder reduction "
                              "rewrites B @ A without the magnitude, which changes a DoRA update. Use plain LoRA.")
        if lay.kind not in (Kind.DENSE, Kind.DENSE_GENERAL, Kind.EINSUM, Kind.EMBED) or np.ndim(node.lora_A) != 2:
            what = "a scanned (stacked) layer" if np.ndim(node.lora_A) != 2 else f"a {lay.kind} layer"
            raise ConfigError(f"the LoRA site {path!r} adapts {what}; intruder reduction handles dense-type kernels "
                              "and embeddings only (nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Embed). Restrict the "
                              "adapter to those sites.")
        # a quantized base (jpeft.quantize): the kernel it stands for, which the adapter was trained on
        k = np.asarray(quant.dequantize_array(get_subtree(inner, path)[lay.param_name]), np.float64)
        m = np.transpose(k, tuple(lay.in_axes) + tuple(lay.out_axes)).reshape(lay.in_features, lay.out_features)
        yield path, node, m.T


def _delta(node) -> np.ndarray:
    """``s * dW`` as ``[out, in]`` (float64)."""
    a = np.asarray(node.lora_A, np.float64)
    b = np.asarray(node.lora_B, np.float64)
    return node.scale * (a @ b).T


def intruder_report(params, adapter: Mapping[str, Any], *, top_k: int = 10, threshold_epsilon: float = 0.5) -> dict:
    """Per LoRA site: ``{"indices", "similarity"}`` of :func:`jpeft.spectral.intruder_dimensions`
    on the base matrix and the merged one (both ``[out, in]``)."""
    return {path: spectral.intruder_dimensions(w, w + _delta(node), top_k=top_k, epsilon=threshold_epsilon)
            for path, node, w in _sites(params, adapter)}


def reduce_intruder_dimension(params, adapter: Mapping[str, Any], *, top_k: int = 10, threshold_epsilon: float = 0.5,
                              mitigation_lambda: float = 0.75) -> dict:
    """A new LoRA adapter whose intruder dimensions keep ``mitigation_lambda`` of their singular
    values (module docstring; the arguments are PEFT's). Sites without intruders are returned
    unchanged; the others get new ``lora_A``/``lora_B`` of the same rank and dtype. Pure: the
    inputs are not modified."""
    if not 0.0 <= mitigation_lambda <= 1.0:
        raise ConfigError(f"mitigation_lambda must be in [0, 1] (the share of each intruder kept), found {mitigation_lambda}.")
    out = dict(adapter)
    for path, node, w in _sites(params, adapter):
        merged = w + _delta(node)
        idx = spectral.intruder_dimensions(w, merged, top_k=top_k, epsilon=threshold_epsilon)["indices"]
        if not idx:
            continue
        u, s, vt = np.linalg.svd(merged, full_matrices=False)
        intruders = (u[:, idx] * s[idx]) @ vt[idx]
        d = (merged + (mitigation_lambda - 1.0) * intruders - w) / node.scale
        ud, sd, vtd = np.linalg.svd(d, full_matrices=False)
        r = node.r
        root = np.sqrt(sd[:r])
        b_torch = ud[:, :r] * root  # [out, r]
        a_torch = root[:, None] * vtd[:r]  # [r, in]
        out[path] = dataclasses.replace(node, lora_A=jnp.asarray(a_torch.T, node.lora_A.dtype),
                                        lora_B=jnp.asarray(b_torch.T, node.lora_B.dtype))
    return out
