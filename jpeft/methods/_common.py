"""Small helpers shared by the linear-site methods (DoRA, IA3, PiSSA): viewing a kernel as
the matrix ``[in, out]`` and broadcasting a per-output-feature vector against a module's
output without implicit rank promotion."""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import numpy as np

from jpeft.methods.base import Layout


def to_matrix(kernel, lay: Layout):
    """The kernel as ``[in_features, out_features]`` (input axes first, in layout order)."""
    order = tuple(lay.in_axes) + tuple(lay.out_axes)
    return jnp.transpose(kernel, order).reshape(lay.in_features, lay.out_features)


def from_matrix(mat, lay: Layout):
    """Inverse of :func:`to_matrix`."""
    order = tuple(lay.in_axes) + tuple(lay.out_axes)
    inv = tuple(int(i) for i in np.argsort(order))
    return jnp.transpose(mat.reshape(tuple(lay.in_dims) + tuple(lay.out_dims)), inv)


def _einsum_letters(lay: Layout):
    lhs, out = lay.equation.replace(" ", "").split("->")
    x_sub, k_sub = lhs.split(",")
    return x_sub, k_sub, out


def broadcast_out(vec, ndim: int, lay: Layout):
    """A flat ``[out_features]`` vector (kernel output-axis order) shaped to broadcast
    against a module output of rank ``ndim``."""
    out_dims = tuple(lay.out_dims)
    v = vec.reshape(out_dims)
    if lay.kind == "einsum":
        _, k_sub, out = _einsum_letters(lay)
        ko = [k_sub[i] for i in lay.out_axes]
        ro = [c for c in out if c in ko]
        v = jnp.transpose(v, tuple(ko.index(c) for c in ro))
        shape = tuple(lay.kernel_shape[k_sub.index(c)] if c in ko else 1 for c in out)
        return v.reshape(shape)
    return v.reshape((1,) * (ndim - len(out_dims)) + out_dims)


def broadcast_bias(bias, ndim: int, lay: Optional[Layout]):
    """A module's bias shaped as the module itself adds it (flax conventions)."""
    if lay is not None and lay.kind == "einsum":
        _, k_sub, out = _einsum_letters(lay)
        ko = {k_sub[i] for i in lay.out_axes}
        shape = tuple(lay.kernel_shape[k_sub.index(c)] if c in ko else 1 for c in out)
        return bias.reshape(shape)
    return bias.reshape((1,) * (ndim - bias.ndim) + tuple(bias.shape))


def broadcast_in(vec, x_ndim: int, lay: Layout, module=None):
    """A flat ``[in_features]`` vector (kernel input-axis order) shaped to broadcast against a
    module's input of rank ``x_ndim``. For ``conv`` the vector is per input channel."""
    if lay.kind == "conv":
        return vec.reshape((1,) * (x_ndim - 1) + (-1,))
    in_dims = tuple(lay.in_dims)
    v = vec.reshape(in_dims)
    if lay.kind == "dense":
        return v.reshape((1,) * (x_ndim - 1) + in_dims)
    if lay.kind == "dense_general":
        axis = module.axis if module is not None else -1
        axes = (axis,) if isinstance(axis, int) else tuple(axis)
        axes = sorted(a % x_ndim for a in axes)  # flax sorts them; the kernel follows that order
        shape = [1] * x_ndim
        for i, a in enumerate(axes):
            shape[a] = in_dims[i]
        return v.reshape(shape)
    if lay.kind == "einsum":
        x_sub, k_sub, _ = _einsum_letters(lay)
        ki = [k_sub[i] for i in lay.in_axes]
        xo = [c for c in x_sub if c in ki]
        v = jnp.transpose(v, tuple(ki.index(c) for c in xo))
        return v.reshape(tuple(lay.kernel_shape[k_sub.index(c)] if c in ki else 1 for c in x_sub))
    raise ValueError(f"no input-side broadcast for a {lay.kind} layout")


def linear_layout(path: str, own, infos):
    """The layout of a targeted linear module, from the traced model when given, else from
    its parameters (unambiguous 2-D kernels and embeddings only)."""
    from jpeft import _inject
    from jpeft.errors import UnsupportedModuleError

    if infos is not None and path in infos:
        if infos[path].layout is None:
            raise UnsupportedModuleError(
                f"module {path!r} is a {infos[path].cls_name}, not a linear module this method can adapt "
                "(nn.Dense, nn.DenseGeneral, nn.Conv, nn.Einsum, nn.Embed). Remove it from target_modules."
            )
        return infos[path].layout
    return _inject.infer_layout(path, own)


def linear_candidates(params):
    """``(module_leaves, paths of modules holding a kernel or an embedding)``."""
    from jpeft.tree import module_leaves

    leaves = module_leaves(params)
    return leaves, [p for p, own in leaves.items() if ("kernel" in own or "embedding" in own)]
