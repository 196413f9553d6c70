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
