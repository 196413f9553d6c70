"""The layout dispatch shared by the linear-site methods (LoRA, DoRA, IA3, PiSSA, and every
new method at a linear site): viewing a kernel as the matrix ``[in, out]``, projecting a
module's input through an ``[in, k]`` matrix and a ``[k, out]`` matrix back to the module's
output shape for each :class:`~jpeft.methods.base.Kind` of layout (:func:`down_project`,
:func:`up_project`), and broadcasting per-feature vectors against a module's input or output
without implicit rank promotion. A method writes its math on ``[in, out]`` matrices and lets
these helpers handle dense, dense_general, conv, einsum and embed modules."""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import numpy as np

from jpeft import _inject
from jpeft.errors import UnsupportedModuleError
from jpeft.methods.base import Kind, Layout
from jpeft.tree import module_leaves


def master_copy(x):
    """A trainable copy of a base array: floating arrays in at least ``float32`` (a copy of a
    ``bfloat16`` norm or head would round away every optimizer update below its spacing, e.g.
    ``1e-4`` on a weight near ``1.0``; docs/SCALING.md "Mixed precision"), others as they are."""
    dt = x.dtype
    if jnp.issubdtype(dt, jnp.floating):
        dt = jnp.promote_types(dt, jnp.float32)
    return jnp.array(x, dtype=dt, copy=True)


def to_matrix(kernel, lay: Layout):
    """The kernel as ``[in_features, out_features]`` (input axes first, in layout order)."""
    order = tuple(lay.in_axes) + tuple(lay.out_axes)
    return jnp.transpose(kernel, order).reshape(lay.in_features, lay.out_features)


def from_matrix(mat, lay: Layout):
    """Inverse of :func:`to_matrix`."""
    order = tuple(lay.in_axes) + tuple(lay.out_axes)
    inv = tuple(int(i) for i in np.argsort(order))
    return jnp.transpose(mat.reshape(tuple(lay.in_dims) + tuple(lay.out_dims)), inv)


class AdditiveMerge:
    """``merge`` / ``unmerge`` for a site whose update is added to its kernel (``W + dW``, with
    ``dW = self.effective(own)`` in the kernel's shape): the sum is taken in float32 and stored
    in the kernel's dtype. Mixed in before :class:`~jpeft.methods.base.Site` (AdaLoRA, VeRA,
    LoHa, LoKr)."""

    def _fold(self, own, sign: float):
        pname = self.layout.param_name
        w = own[pname]
        return {**own, pname: (w.astype(jnp.float32) + sign * self.effective(own)).astype(w.dtype)}

    def merge(self, own):
        """Adds the update ``dW`` to the kernel."""
        return self._fold(own, 1.0)

    def unmerge(self, own):
        """Subtracts ``dW`` from the kernel again (exact up to float rounding)."""
        return self._fold(own, -1.0)


def _einsum_letters(lay: Layout):
    lhs, out = lay.equation.replace(" ", "").split("->")
    x_sub, k_sub = lhs.split(",")
    return x_sub, k_sub, out


def broadcast_out(vec, ndim: int, lay: Layout):
    """A flat ``[out_features]`` vector (kernel output-axis order) shaped to broadcast
    against a module output of rank ``ndim``."""
    out_dims = tuple(lay.out_dims)
    v = vec.reshape(out_dims)
    if lay.kind == Kind.EINSUM:
        _, k_sub, out = _einsum_letters(lay)
        ko = [k_sub[i] for i in lay.out_axes]
        ro = [c for c in out if c in ko]
        v = jnp.transpose(v, tuple(ko.index(c) for c in ro))
        shape = tuple(lay.kernel_shape[k_sub.index(c)] if c in ko else 1 for c in out)
        return v.reshape(shape)
    return v.reshape((1,) * (ndim - len(out_dims)) + out_dims)


def broadcast_bias(bias, ndim: int, lay: Optional[Layout]):
    """A module's bias shaped as the module itself adds it (flax conventions)."""
    if lay is not None and lay.kind == Kind.EINSUM:
        _, k_sub, out = _einsum_letters(lay)
        ko = {k_sub[i] for i in lay.out_axes}
        shape = tuple(lay.kernel_shape[k_sub.index(c)] if c in ko else 1 for c in out)
        return bias.reshape(shape)
    return bias.reshape((1,) * (ndim - bias.ndim) + tuple(bias.shape))


def broadcast_in(vec, x_ndim: int, lay: Layout, module=None):
    """A flat ``[in_features]`` vector (kernel input-axis order) shaped to broadcast against a
    module's input of rank ``x_ndim``. For ``conv`` the vector is per input channel."""
    if lay.kind == Kind.CONV:
        return vec.reshape((1,) * (x_ndim - 1) + (-1,))
    in_dims = tuple(lay.in_dims)
    v = vec.reshape(in_dims)
    if lay.kind == Kind.DENSE:
        return v.reshape((1,) * (x_ndim - 1) + in_dims)
    if lay.kind == Kind.DENSE_GENERAL:
        axis = module.axis if module is not None else -1
        axes = (axis,) if isinstance(axis, int) else tuple(axis)
        axes = sorted(a % x_ndim for a in axes)  # flax sorts them; the kernel follows that order
        shape = [1] * x_ndim
        for i, a in enumerate(axes):
            shape[a] = in_dims[i]
        return v.reshape(shape)
    if lay.kind == Kind.EINSUM:
        x_sub, k_sub, _ = _einsum_letters(lay)
        ki = [k_sub[i] for i in lay.in_axes]
        xo = [c for c in x_sub if c in ki]
        v = jnp.transpose(v, tuple(ki.index(c) for c in xo))
        return v.reshape(tuple(lay.kernel_shape[k_sub.index(c)] if c in ki else 1 for c in x_sub))
    raise ValueError(f"no input-side broadcast for a {lay.kind} layout")


def linear_layout(path: str, own, infos):
    """The layout of a targeted linear module, from the traced model when given, else from
    its parameters (unambiguous 2-D kernels and embeddings only)."""
    if infos is not None and path in infos:
        if infos[path].layout is None:
            if infos[path].refusal:
                raise UnsupportedModuleError(infos[path].refusal)
            raise UnsupportedModuleError(
                f"module {path!r} is a {infos[path].cls_name}, not a linear module this method can adapt "
                "(nn.Dense, nn.DenseGeneral, nn.Conv, nn.Einsum, nn.Embed). Remove it from target_modules."
            )
        return infos[path].layout
    return _inject.infer_layout(path, own)


def linear_candidates(params):
    """``(module_leaves, paths of modules holding a kernel or an embedding)``."""
    leaves = module_leaves(params)
    return leaves, [p for p, own in leaves.items() if ("kernel" in own or "embedding" in own)]


def _free_letter(eq: str) -> str:
    for c in "zyxwvutsrqponmlkjihgfedcbaZYXWVUTSRQPONMLKJIHGFEDCBA":
        if c not in eq:
            return c
    raise UnsupportedModuleError(f"the einsum {eq!r} uses every letter; jpeft needs one free letter for the rank axis.")


def down_project(x, a, lay: Layout, module=None):
    """``x`` (the module's input) through ``a: [in_features, k]`` (kernel input-axis order):
    ``[..., k]``, contracting the axes the module's kernel contracts. For ``embed`` ``x`` holds
    ids and the result is ``a``'s rows; ``dense_general`` and ``conv`` need the bound
    ``module`` (its ``axis``, its strides and padding)."""
    k = a.shape[-1]
    if lay.kind == Kind.EMBED:
        return jnp.take(a, x, axis=0)
    if lay.kind == Kind.DENSE:
        return x @ a
    if lay.kind == Kind.DENSE_GENERAL:
        axes = _inject.normalize_axes(module.axis, x.ndim)
        ak = a.reshape(tuple(lay.in_dims) + (k,))
        return jnp.tensordot(x, ak, axes=(axes, tuple(range(len(axes)))))
    if lay.kind == Kind.CONV:
        ak = a.reshape(tuple(lay.in_dims) + (k,))
        helper = module.clone(parent=None, features=k, use_bias=False, name=None)
        with _inject.bypass():
            return helper.apply({"params": {"kernel": ak}}, x)
    if lay.kind == Kind.EINSUM:
        x_sub, k_sub, out = _einsum_letters(lay)
        free = _free_letter(lay.equation)
        in_letters = "".join(k_sub[i] for i in lay.in_axes)
        batch = "".join(c for c in out if c in x_sub)
        ak = a.reshape(tuple(lay.in_dims) + (k,))
        return jnp.einsum(f"{x_sub},{in_letters}{free}->{batch}{free}", x, ak)
    raise UnsupportedModuleError(f"no input projection for a {lay.kind} layout")


def up_project(h, b, lay: Layout):
    """``h: [..., k]`` (from :func:`down_project`) through ``b: [k, out_features]`` (kernel
    output-axis order), shaped as the module's output so it can be added to it."""
    if lay.kind == Kind.EINSUM:
        _, k_sub, out = _einsum_letters(lay)
        x_sub = _einsum_letters(lay)[0]
        free = _free_letter(lay.equation)
        out_letters = "".join(k_sub[i] for i in lay.out_axes)
        batch = "".join(c for c in out if c in x_sub)
        bk = b.reshape((b.shape[0],) + tuple(lay.out_dims))
        return jnp.einsum(f"{batch}{free},{free}{out_letters}->{out}", h, bk)
    d = h @ b
    return d.reshape(d.shape[:-1] + tuple(lay.out_dims))
