"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024), as Hugging Face PEFT computes it.

Enabled with ``jpeft.LoraConfig(use_dora=True)``; the site node is the LoRA node
(:class:`jpeft.LoraWeights`) with its ``magnitude`` field set. Viewing the kernel as the
matrix ``W: [in, out]`` (one column per output feature), the adapted weight is

.. math::  W' = m \\odot \\frac{W + s A B}{\\lVert W + s A B \\rVert_c}

where :math:`\\lVert\\cdot\\rVert_c` is the L2 norm of each column (each output feature's
weights over all input features, as ``torch.linalg.norm(weight, dim=1)`` on the PyTorch
``[out, in]`` weight). ``m: [out]`` is trainable and starts at
:math:`\\lVert W + s A B\\rVert_c`, so the adapter starts as the identity. As in the paper
(section 4.3) and Hugging Face PEFT, the column norm is treated as a constant: it is
recomputed every call from the current ``A`` and ``B`` but receives no gradient
(``jax.lax.stop_gradient``).

The forward pass never forms ``W + s A B``: the column norms come from
:math:`\\lVert w_j\\rVert^2 + 2 s\\,(W^\\top A)_j\\cdot b_j + s^2\\, b_j^\\top (A^\\top A)\\, b_j`,
which needs ``[out, r]`` and ``[r, r]`` temporaries instead of ``[in, out]``. The output is

``y + (m/n - 1) * (y - bias) + (m/n) * s * (x @ A) @ B``

exactly Hugging Face PEFT's ``DoraLinearLayer.forward`` (the bias is not rescaled; with
``LoraConfig.bias`` it is the trained ``base_bias``, in the output and in the merge, as PEFT
trains the base layer's bias in place). With
dropout active the base term is recomputed on the dropped input, as PEFT does.

Merging folds ``W <- m/n * (W + s A B)``. It cannot be undone from the merged weights alone
(the merged columns have norm ``|m|`` whatever ``n`` was), so :func:`jpeft.unmerge` raises
:class:`~jpeft.errors.NotInvertibleError`; keep the original ``params``, which
:func:`jpeft.merge` never modifies.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jpeft import _inject
from jpeft.errors import NotInvertibleError
from jpeft.methods._common import (branch_dtype, broadcast_bias, broadcast_out, down_project, from_matrix, to_matrix,
                                  up_project)
from jpeft.methods.base import Call, Kind, dropout


def weight_norm(w_mat, lora_A, lora_B, scale: float):
    """Column norms ``||W + s A B||_c`` (one per output feature) without forming ``A @ B``.

    Args:
      w_mat: the base kernel as ``[in, out]``.
      lora_A: ``[in, r]``.
      lora_B: ``[r, out]``.
      scale: the LoRA scale ``s``.

    Returns:
      ``[out]`` float32 norms.

    >>> import jax, jax.numpy as jnp
    >>> w, a, b = (jax.random.normal(jax.random.key(i), s) for i, s in enumerate([(5, 3), (5, 2), (2, 3)]))
    >>> direct = jnp.linalg.norm(w + 0.5 * a @ b, axis=0)
    >>> bool(jnp.allclose(weight_norm(w, a, b, 0.5), direct, rtol=1e-5))
    True
    """
    w = w_mat.astype(jnp.float32)
    a = lora_A.astype(jnp.float32)
    b = lora_B.astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    w2 = jnp.sum(w * w, axis=0)
    wta = jnp.einsum("io,ir->or", w, a, precision=hi)
    cross = jnp.einsum("or,ro->o", wta, b, precision=hi)
    gram = jnp.einsum("ir,is->rs", a, a, precision=hi)
    quad = jnp.einsum("ro,rs,so->o", b, gram, b, precision=hi)
    sq = w2 + 2.0 * scale * cross + (scale * scale) * quad
    return jnp.sqrt(jnp.maximum(sq, 0.0))


def _base_matrix(node, own: Mapping[str, Any]):
    lay = node.layout
    return to_matrix(jnp.asarray(own[lay.param_name]), lay)


def with_magnitude(node, own: Mapping[str, Any]):
    """Returns ``node`` with its DoRA magnitude set to ``||W + s A B||_c`` (so the adapter
    starts as the identity, as Hugging Face PEFT initialises ``lora_magnitude_vector``)."""
    m = weight_norm(_base_matrix(node, own), node.lora_A, node.lora_B, node.scale)
    return dataclasses.replace(node, magnitude=m)


def _mag_scale(node, module):
    own = module.variables.get("params", {})
    w = _base_matrix(node, own)
    n = jax.lax.stop_gradient(weight_norm(w, node.lora_A, node.lora_B, node.scale))
    return node.magnitude.astype(jnp.float32) / n


def intercept(node, call: Call):
    """The DoRA forward at one site (see the module docstring)."""
    lay = node.layout
    mod = call.module
    mn = _mag_scale(node, mod)
    x = call.inputs
    if lay.kind == Kind.EMBED:
        return _embed(node, call, x, mn)
    key = call.dropout_key() if node.dropout > 0 else None
    y = call.run()
    # the branch in the adapter's dtype (float32) and one rounding of the sum, as PEFT (branch_dtype)
    dt = branch_dtype(y.dtype, node.lora_A, node.lora_B, node.magnitude)
    scale_b = broadcast_out(mn, y.ndim, lay).astype(dt)
    own = mod.variables.get("params", {})
    bias = own.get("bias") if getattr(mod, "use_bias", False) else None
    if key is not None:
        x_l = dropout(x.astype(dt), node.dropout, key)
        base = _linear_no_bias(node, x_l, mod, call, dt)
    else:
        x_l = x
        base = y if bias is None else y - broadcast_bias(bias.astype(y.dtype), y.ndim, lay)
    lora = _lora_out(node, x_l.astype(dt), mod, call, dt)
    out = y.astype(dt) + (scale_b - 1) * base.astype(dt) + scale_b * lora
    if node.base_bias is not None:  # LoraConfig.bias: the trained base bias replaces the module's own (not rescaled)
        out = out + broadcast_bias((node.base_bias.astype(dt) - bias.astype(dt)).reshape(bias.shape), y.ndim, lay)
    return out.astype(y.dtype)


def _linear_no_bias(node, x, mod, call, dt):
    """The module's linear map without its bias, on another input (a module may not be
    called twice inside one intercepted call, so this recomputes it from the kernel)."""
    lay = node.layout
    k = jnp.asarray(mod.variables["params"]["kernel"]).astype(dt)
    if lay.kind == Kind.DENSE:
        return x @ k
    if lay.kind == Kind.DENSE_GENERAL:
        axes = _inject.normalize_axes(mod.axis, x.ndim)
        return jnp.tensordot(x, k, axes=(axes, tuple(range(len(axes)))))
    if lay.kind == Kind.CONV:
        helper = mod.clone(parent=None, use_bias=False, name=None)
        with _inject.bypass():
            return helper.apply({"params": {"kernel": k}}, x)
    return jnp.einsum(lay.equation, x, k)


def _lora_out(node, x, mod, call, dt):
    """``s * (x @ A) @ B`` in the module's output layout."""
    lay = node.layout
    a = node.lora_A.astype(dt)
    b = node.lora_B.astype(dt)
    return node.scale * up_project(down_project(x, a, lay, mod), b, lay)


def _embed(node, call: Call, x, mn):
    a = node.lora_A
    b = node.lora_B
    if call.method_name == "attend":
        # attend(q) = q @ E'^T with E' = (E + s A B) * mn (per embedding feature)
        q = x * mn.reshape((1,) * (x.ndim - 1) + (-1,)).astype(x.dtype)
        rest = call.args[1:] if call.args else ()
        y = call.next_fun(q, *rest, **call.kwargs) if call.args else call.next_fun(**{**call.kwargs, "query": q})
        dt = branch_dtype(y.dtype, a, b)
        return (y.astype(dt) + node.scale * ((q.astype(dt) @ b.astype(dt).T) @ a.astype(dt).T)).astype(y.dtype)
    y = call.run()
    dt = branch_dtype(y.dtype, a, b, node.magnitude)
    h = jnp.take(a.astype(dt), x, axis=0)
    s = mn.reshape((1,) * (y.ndim - 1) + (-1,)).astype(dt)
    return (s * (y.astype(dt) + node.scale * (h @ b.astype(dt)))).astype(y.dtype)


def merge(node, own: Mapping[str, Any]):
    """``W <- m / ||W + s A B||_c * (W + s A B)`` in the kernel's own shape and dtype."""
    lay = node.layout
    pname = lay.param_name
    w = jnp.asarray(own[pname])
    wm = to_matrix(w.astype(jnp.float32), lay) + node.delta_matrix()
    n = jnp.linalg.norm(wm, axis=0)
    new = wm * (node.magnitude.astype(jnp.float32) / n).reshape(1, -1)
    out = dict(own)
    out[pname] = from_matrix(new, lay).astype(w.dtype)
    return out  # a trained base bias (LoraConfig.bias) is written by LoraWeights.merge, as without DoRA


def unmerge(node, own: Mapping[str, Any]):
    """Always raises: a DoRA merge cannot be inverted from the merged weights alone."""
    raise NotInvertibleError(
        "a merged DoRA adapter cannot be unmerged: the merged weight m * (W + sAB) / ||W + sAB|| has column "
        "norms |m| whatever ||W + sAB|| was, so W cannot be recovered from it. jpeft.merge never modifies its "
        "input, so keep the original params (Hugging Face PEFT caches the norm inside the module for this)."
    )
