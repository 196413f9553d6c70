"""The layout dispatch shared by the linear-site methods (LoRA, DoRA, IA3, PiSSA, and every
new method at a linear site): viewing a kernel as the matrix ``[in, out]``, projecting a
module's input through an ``[in, k]`` matrix and a ``[k, out]`` matrix back to the module's
output shape for each :class:`~jpeft.methods.base.Kind` of layout (:func:`down_project`,
:func:`up_project`), and broadcasting per-feature vectors against a module's input or output
without implicit rank promotion. A method writes its math on ``[in, out]`` matrices and lets
these helpers handle dense, dense_general, conv, einsum and embed modules.

Also the one node every method's adapter may hold: :class:`SavedModule`, a trainable full copy
of a module (PEFT's ``modules_to_save``: LoRA's option, and the task head copy of SEQ_CLS, TOKEN_CLS
and QUESTION_ANS that :mod:`jpeft.hf` reads and writes beside any method's sites), with its PEFT keys."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jpeft import _inject, quant
from jpeft.errors import (BaseMismatchError, CheckpointError, ConfigError, LayoutError, NotInvertibleError,
                          NotMergeableError, ShapeMismatchError, ShardingError, UnsupportedAdapterError,
                          UnsupportedModuleError)
from jpeft.methods.base import Call, Kind, Layout, LowRank, Site, check_input_only_embedding_merge, static_field
from jpeft.peft_format import CONV1D, peft_key, split_peft_key, to_np
from jpeft.tree import hf_name, linear_only, module_leaves, select


def master_copy(x):
    """A trainable copy of a base array: floating arrays in at least ``float32`` (a copy of a
    ``bfloat16`` norm or head would round away every optimizer update below its spacing, e.g.
    ``1e-4`` on a weight near ``1.0``; docs/SCALING.md "Mixed precision"), others as they are."""
    dt = x.dtype
    if jnp.issubdtype(dt, jnp.floating):
        dt = jnp.promote_types(dt, jnp.float32)
    return jnp.array(x, dtype=dt, copy=True)


def branch_dtype(out_dtype, *adapter_arrays):
    """The dtype an adapter's branch computes in at a site whose module outputs ``out_dtype``:
    the promotion of that dtype with the adapter arrays' (float32 for jpeft's adapters, whatever
    the base). Over a bfloat16 or float16 base the branch runs in float32 and its sum with the
    module's output is rounded once, to the output's dtype, as PEFT computes it (its default
    ``autocast_adapter_dtype=True`` keeps the adapter in float32, casts the layer's input to the
    adapter's dtype and casts the sum back; docs/SCALING.md "Mixed precision").

    >>> import jax.numpy as jnp
    >>> branch_dtype(jnp.bfloat16, jnp.zeros(2, jnp.float32))
    dtype('float32')
    """
    dt = jnp.dtype(out_dtype)
    for a in adapter_arrays:
        dt = jnp.promote_types(dt, a.dtype)
    return dt


def to_matrix(kernel, lay: Layout):
    """The kernel as ``[in_features, out_features]`` (input axes first, in layout order)."""
    order = tuple(lay.in_axes) + tuple(lay.out_axes)
    return jnp.transpose(kernel, order).reshape(lay.in_features, lay.out_features)


def svd_bottom(w, r: int):
    """The ``r`` smallest of the ``min(m, n)`` singular triplets ``(u, s, vh)`` of ``w: [m, n]``
    (exact SVD; a randomized SVD finds the top of the spectrum, not its tail): MiLoRA's factors
    and MiCA's frozen B."""
    u, s, vh = jnp.linalg.svd(w, full_matrices=False)
    return u[:, -r:], s[-r:], vh[-r:]


def from_matrix(mat, lay: Layout):
    """Inverse of :func:`to_matrix`."""
    order = tuple(lay.in_axes) + tuple(lay.out_axes)
    inv = tuple(int(i) for i in np.argsort(order))
    return jnp.transpose(mat.reshape(tuple(lay.in_dims) + tuple(lay.out_dims)), inv)


class AdditiveMerge:
    """``merge`` / ``unmerge`` for a site whose update is added to its kernel (``W + dW``, with
    ``dW = self.kernel_update(own)`` in the kernel's shape): the sum is taken in float32 and stored
    in the kernel's dtype. A site with a trained base bias (a ``base_bias`` field that is not
    ``None``: PEFT's ``bias`` option, e.g. VeRA's) merges that bias in place of the module's own,
    and refuses to unmerge (the base bias is gone). Mixed in before
    :class:`~jpeft.methods.base.Site` (AdaLoRA, VeRA, LoHa, LoKr)."""

    def kernel_update(self, own):
        """The update ``dW`` in the kernel's shape: :meth:`effective` unless a method's
        ``effective`` also holds other arrays (a trained bias)."""
        return self.effective(own)

    def _fold(self, own, sign: float):
        pname = self.layout.param_name
        w = own[pname]
        return {**own, pname: (w.astype(jnp.float32) + sign * self.kernel_update(own)).astype(w.dtype)}

    def merge(self, own):
        """Adds the update ``dW`` to the kernel (and writes a trained base bias)."""
        out = self._fold(own, 1.0)
        base_bias = getattr(self, "base_bias", None)
        if base_bias is not None:  # PEFT trains the base bias in place: it replaces the module's own
            out["bias"] = base_bias.reshape(own["bias"].shape).astype(own["bias"].dtype)
        return out

    def unmerge(self, own):
        """Subtracts ``dW`` from the kernel again (exact up to float rounding).

        Raises:
          NotInvertibleError: the site trains the base bias, which :meth:`merge` replaced."""
        if getattr(self, "base_bias", None) is not None:
            raise NotInvertibleError(
                f"this {type(self).__name__} site trains the base bias too (its config's bias option, PEFT's), which "
                "merge replaces, so the base bias cannot be recovered from merged params; keep the base params tree "
                "(jpeft never modifies it) instead."
            )
        return self._fold(own, -1.0)


def _einsum_letters(lay: Layout):
    lhs, out = lay.equation.replace(" ", "").split("->")
    x_sub, k_sub = lhs.split(",")
    return x_sub, k_sub, out


def _spelled_out(sub: str, ndim: int) -> str:
    """An einsum operand's subscripts with its ``...`` (``"...d,df->...f"``) written as one ``.``
    per axis it stands for in an operand of rank ``ndim``, so they index the operand's axes one to
    one (none of them is a kernel axis: broadcast shapes give them size 1)."""
    if "..." not in sub:
        return sub
    return sub.replace("...", "." * (ndim - (len(sub) - 3)))


def _einsum_operand(v, sub: str, ndim: int, lay: Layout, axes):
    """``v``, shaped as the kernel's dims ``axes`` in that order, with its axes in the order of
    the einsum operand ``sub`` (of rank ``ndim``) and size 1 elsewhere, to broadcast against it."""
    k_sub = _einsum_letters(lay)[1]
    sub = _spelled_out(sub, ndim)
    kept = [k_sub[i] for i in axes]
    v = jnp.transpose(v, tuple(kept.index(c) for c in sub if c in kept))
    return v.reshape(tuple(lay.kernel_shape[k_sub.index(c)] if c in kept else 1 for c in sub))


def broadcast_out(vec, ndim: int, lay: Layout):
    """A flat ``[out_features]`` vector (kernel output-axis order) shaped to broadcast
    against a module output of rank ``ndim``."""
    out_dims = tuple(lay.out_dims)
    v = vec.reshape(out_dims)
    if lay.kind == Kind.EINSUM:
        return _einsum_operand(v, _einsum_letters(lay)[2], ndim, lay, lay.out_axes)
    return v.reshape((1,) * (ndim - len(out_dims)) + out_dims)


def broadcast_bias(bias, ndim: int, lay: Optional[Layout]):
    """A module's bias shaped as the module itself adds it (flax conventions)."""
    if lay is not None and lay.kind == Kind.EINSUM:
        _, k_sub, out = _einsum_letters(lay)
        out = _spelled_out(out, ndim)
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
        return _einsum_operand(v, _einsum_letters(lay)[0], x_ndim, lay, lay.in_axes)
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


# the PEFT whose conv layers run every update as the base conv runs (its dilation and padding_mode), as jpeft's do
PEFT_CONV_FORWARD = (0, 22)


def refuse_old_peft_conv(path: str, differs: Optional[str], ctx, method: str, old: str, new: str) -> None:
    """Refuses a conv site of ``method``'s PEFT file (``ctx``: the reader's ``ImportContext``) that
    PEFT < 0.22 computes otherwise than jpeft (``differs``: why, from the site's :class:`Layout`;
    ``None``: it does not) in a file of PEFT < 0.22 or without ``peft_version``. ``old`` says what
    PEFT < 0.22 does, ``new`` what PEFT >= 0.22 does as jpeft."""
    if differs is None or (ctx.peft_version or (0, 0)) >= PEFT_CONV_FORWARD:
        return
    found = "%d.%d" % ctx.peft_version if ctx.peft_version is not None else "none (PEFT < 0.18, or not a version)"
    raise UnsupportedAdapterError(
        f"cannot load the PEFT {method} of conv site {hf_name(path)!r} in {ctx.folder!r}: the nn.Conv has {differs}, "
        f"and the file's peft_version is {found}. {old}, so that PEFT's unmerged output differs from its own merged "
        f"model and from jpeft's; PEFT >= 0.22 computes it as jpeft ({new}, as merging does). Merge it in the PEFT "
        "that wrote it (merge_and_unload) and load the full weights, or retrain it with PEFT >= 0.22."
    )


def peft_site_layout(path: str, own, ctx, method: str, *, convs: str, adapts: str, differs, old: str,
                     new: str) -> Layout:
    """The layout of the module at ``path`` for a site of ``method``'s PEFT file (``ctx``: the reader's
    ``ImportContext``): the traced one for an nn.Conv (``load_peft(..., model=, example_args=)``),
    refused by :func:`refuse_old_peft_conv` (``differs(layout)``, ``old``, ``new``) in a file of an
    older PEFT that computes it otherwise, else the one its kernel's shape alone tells (Dense, Embed).
    ``convs`` names PEFT's conv layers of the method (``"Conv1d/2d"``), ``adapts`` all its layers.

    Raises:
      LayoutError: a kernel that is not 2-D and no traced nn.Conv there (names the fix).
      UnsupportedAdapterError: :func:`refuse_old_peft_conv`."""
    traced = (ctx.layouts or {}).get(path)
    if traced is not None and traced.kind == Kind.CONV:
        refuse_old_peft_conv(path, differs(traced), ctx, method, old, new)
        return traced
    try:
        return _inject.infer_layout(path, own)
    except LayoutError:
        shape = tuple(own["kernel"].shape)
        if ctx.layouts is None:
            fix = (f"If it is an nn.Conv (PEFT's {method} on a torch {convs}), pass the model and an example input so "
                   "jpeft can see the module: jpeft.hf.load_peft(path, params, model=model, example_args=(x,)).")
        else:
            what = ("no layout there (a module example_args do not call, or one jpeft cannot adapt, such as a grouped "
                    "nn.Conv)" if traced is None else f"a {traced.kind} module")
            fix = f"Tracing the model found {what}; PEFT's {method} adapts {adapts}."
        raise LayoutError(
            f"adapter site {hf_name(path)!r}: the base module has a {len(shape)}-D kernel {shape}, whose input and "
            f"output axes its shape alone does not tell (expected a 2-D Dense kernel or a traced nn.Conv). {fix}"
        ) from None


def peft_padded_conv_layout(path: str, own, ctx, method: str, convs: str) -> Layout:
    """:func:`peft_site_layout` for LoHa, LoKr and AdaLoRA, whose PEFT conv layers (``convs``) add the
    update through ``F.conv1d`` / ``F.conv2d`` (zero-padded) before 0.22 and through the base's own
    ``_conv_forward`` since (:attr:`Layout.peft_padding_differs`)."""
    return peft_site_layout(
        path, own, ctx, method, convs=convs,
        adapts=f"Linear and {convs} layers, whose twins are nn.Dense and nn.Conv",
        differs=lambda lay: lay.peft_padding_differs,
        old=(f"PEFT < 0.22 adds {method}'s conv update through F.conv1d / F.conv2d with the base's stride, padding and "
             "dilation but zero-padded, whatever the base's padding_mode"),
        new="the update through the base conv's own _conv_forward, its padding mode included")


def conv_rows_from_torch(a_t, layout: Layout):
    """A PEFT tensor ``[k, in, *window]`` (or ``[k, in * prod(window)]``) whose rows act on an
    ``nn.Conv``'s input in PyTorch's ``(in, *window)`` order, as ``[prod(window) * in, k]`` in the
    order of the flax kernel's input axes ``(*window, in)`` (``layout``: the conv's)."""
    nd, k = len(layout.kernel_shape), a_t.shape[0]
    a = a_t.reshape((k, layout.kernel_shape[-2]) + tuple(layout.kernel_shape[:-2]))
    return a.transpose(tuple(range(2, nd)) + (1, 0)).reshape(-1, k)


def conv_rows_to_torch(a, layout: Layout):
    """The inverse of :func:`conv_rows_from_torch`: ``[prod(window) * in, k]`` as ``[k, in, *window]``."""
    nd, k = len(layout.kernel_shape), a.shape[1]
    return a.reshape(tuple(layout.in_dims) + (k,)).transpose((nd - 1, nd - 2) + tuple(range(nd - 2)))


def check_conv_for_peft(path: str, layout: Layout, what: str, ndims: tuple) -> None:
    """Refuses to write a ``what`` site in the Hugging Face PEFT format unless it adapts a dense
    kernel or an ``nn.Conv`` with ``len(window)`` in ``ndims`` (the PEFT layers of the method:
    ``(1, 2)`` for Conv1d and Conv2d).

    Raises:
      UnsupportedAdapterError: the site adapts a kernel of another kind (einsum, another conv)."""
    if layout.kind == Kind.CONV and len(layout.kernel_shape) - 2 in ndims:
        return
    if layout.kind == Kind.CONV:
        raise UnsupportedAdapterError(
            f"{what} site {path!r} adapts a {len(layout.kernel_shape) - 2}-D convolution; Hugging Face PEFT's {what} "
            f"has conv layers for {' and '.join(f'{n}-D' for n in ndims)} convolutions only, so it could not load the "
            "file. Keep this adapter in jpeft's own format (jpeft.save_adapter)."
        )
    check_dense_for_peft(path, layout, what)


def linear_candidates(params):
    """``(module_leaves, paths of modules holding a kernel or an embedding)``."""
    leaves = module_leaves(params)
    return leaves, [p for p, own in leaves.items() if ("kernel" in own or "embedding" in own)]


LINEAR_MODULES = "linear module (Dense, DenseGeneral, Conv, Einsum)"


def linear_targets(target_modules, params, what: str = LINEAR_MODULES) -> tuple[dict, list]:
    """``(module_leaves, sorted paths)`` of the modules ``target_modules`` selects among those of
    :func:`linear_candidates` (no embeddings for ``"all-linear"``, as in PEFT); ``what`` names
    them in :func:`jpeft.tree.select`'s error when nothing matches."""
    leaves, cands = linear_candidates(params)
    return leaves, sorted(select(target_modules, linear_only(target_modules, leaves, cands), what=what))


def linear_layouts(target_modules, params, infos, refusal: str) -> tuple[dict, dict]:
    """``(module_leaves, {path: layout})`` of :func:`linear_targets` for a method that adapts
    linear modules only: a selected embedding is refused with ``UnsupportedModuleError`` saying
    ``"module <path> is an embedding; <refusal>. Remove it from target_modules."``."""
    leaves, paths = linear_targets(target_modules, params)
    out = {}
    for path in paths:
        lay = linear_layout(path, leaves[path], infos)
        if lay.kind == Kind.EMBED:
            raise UnsupportedModuleError(f"module {path!r} is an embedding; {refusal}. Remove it from target_modules.")
        out[path] = lay
    return leaves, out


def check_dense_for_peft(path: str, layout: Layout, what: str) -> None:
    """Refuses to write a ``what`` site (``"VeRA"``) in the Hugging Face PEFT format unless it adapts
    a dense kernel (``nn.Dense``: the layers of jpeft.models, which PEFT builds as ``nn.Linear``).

    Raises:
      UnsupportedAdapterError: the site adapts a kernel of another kind (convolution, einsum, ...)."""
    if layout.kind != Kind.DENSE:
        raise UnsupportedAdapterError(
            f"{what} site {path!r} adapts a {layout.kind} kernel; jpeft writes the Hugging Face PEFT format for dense "
            "(nn.Dense) sites only, the layers of jpeft.models that PEFT builds as nn.Linear. Keep this adapter in "
            "jpeft's own format (jpeft.save_adapter)."
        )


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
        helper = _inject.update_module(module, features=k, dtype=jnp.promote_types(x.dtype, a.dtype))
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


# -- modules_to_save: a trainable full copy of a module ------------------------------------------

def copy_partition_specs(copy: Mapping[str, Any], module_specs, what: str) -> dict:
    """The partition specs of a trainable copy of a module's parameters (full fine-tuning's copy
    of the whole model, a ``modules_to_save`` copy): each array is sharded as the base array it
    copies (a quantized one: as its kernel), so on an fsdp mesh the copy, and the optimizer state
    laid out like it, are split like the base instead of held whole on every device.
    ``module_specs``: the base module's spec tree (:meth:`Site.partition_specs`)."""
    missing = None if module_specs is None else sorted(set(copy) - set(module_specs))
    if module_specs is None or missing:
        raise ShardingError(
            f"{what} holds {sorted(copy)}, but the base module at its path has "
            f"{None if module_specs is None else sorted(module_specs)}; was the adapter made for another model?")
    is_spec = lambda x: isinstance(x, P) or quant.is_quantized(x)  # noqa: E731
    specs = {k: jax.tree.map(quant.logical_spec, module_specs[k], is_leaf=is_spec) for k in copy}
    if jax.tree.structure(specs, is_leaf=lambda x: isinstance(x, P)) != jax.tree.structure(dict(copy)):
        raise ShardingError(f"{what} does not have the structure of the base module's parameters at its path; was "
                            "the adapter made for another model?")
    return specs


def _same_shapes(a, b) -> bool:
    sa = jax.tree.map(lambda x: tuple(x.shape), dict(a))
    sb = jax.tree.map(lambda x: tuple(x.shape), dict(b))
    return jax.tree.structure(sa) == jax.tree.structure(sb) and jax.tree.leaves(sa) == jax.tree.leaves(sb)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SavedModule(Site):
    """One of ``LoraConfig.modules_to_save``: a trainable full copy of a module's parameters
    (Hugging Face PEFT's ``ModulesToSaveWrapper``), or with ``LoraConfig(bias="all")`` a copy of
    just its ``bias``. The module runs with ``params`` in place of its own;
    :func:`jpeft.merge` writes the copy into the base (not invertible).

    For an embedding, ``tied_output`` says whether the model also reads it as its tied output
    projection (``attend``; ``None``: unknown) and ``tie_output`` whether the copy acts there
    too (``LoraConfig(ensure_weight_tying=True)``, PEFT's copy shared with ``lm_head``); by
    default the copy changes the input lookup only, as PEFT's, and such a copy of a tied
    embedding is not merged (the shared weight would change the output projection too)."""

    params: Any
    tie_output: bool = static_field(default=False)
    tied_output: Optional[bool] = static_field(default=None)

    site: ClassVar[str] = "linear"
    mergeable: ClassVar[bool] = True

    def handles(self, method_name: str) -> bool:
        return method_name == "__call__" or (method_name == "attend" and bool(self.tie_output))

    def added_params(self, trainable) -> int:
        # a bias-only copy (LoraConfig.bias="all") is the base's bias, which PEFT trains in place; a module's full
        # copy (modules_to_save) sits beside its original, and PEFT counts both
        return 0 if set(self.params) == {"bias"} else super().added_params(trainable)

    def check_params(self, path: str, own: Mapping[str, Any]) -> None:
        own = {k: v for k, v in dict(own).items() if k in self.params}  # a bias-only copy (LoraConfig.bias='all')
        if not _same_shapes(own, self.params):
            raise ShapeMismatchError(
                f"the saved copy of module {path!r} (modules_to_save) has parameters "
                f"{jax.tree.map(lambda x: tuple(x.shape), dict(self.params))}, the model's module has "
                f"{jax.tree.map(lambda x: tuple(x.shape), dict(own))}. Was the adapter made for another model?"
            )

    def partition_specs(self, module_specs):
        """The copy is sharded as the module's own parameters (:func:`copy_partition_specs`)."""
        return dataclasses.replace(self, params=copy_partition_specs(
            dict(self.params), module_specs, "a modules_to_save copy"))

    def _cast(self, own):
        own = dict(own)
        return {**own, **{k: jax.tree.map(lambda new, old: new.astype(old.dtype), v, own[k])
                          for k, v in dict(self.params).items()}}

    def intercept(self, call: Call):
        mod = call.module
        variables = {k: v for k, v in mod.variables.items() if k != "params"}
        variables["params"] = self._cast(mod.variables.get("params", {}))
        key = call.dropout_key()
        # at its path, not bypassed: the copies of its submodules (a module named in modules_to_save is copied
        # whole, each submodule's params a site of their own) act in the re-run, as jpeft.merge folds them
        return _inject.rerun(mod, variables, call.method_name, call.args, call.kwargs,
                             rngs=None if key is None else {"dropout": key}, at=call.path)

    def routed_low_rank(self) -> LowRank:
        """What the adapter bank routes: the copy of an ``nn.Dense`` kernel (and bias) or an
        ``nn.Embed`` table (PEFT's mixed batch runs each row's own copy of a ``Linear`` or
        ``Embedding``), as rank 0 with ``saved`` set; other modules are refused as by :meth:`low_rank`."""
        own = dict(self.params)
        kernel, table = own.get("kernel"), own.get("embedding")
        if kernel is not None and kernel.ndim == 2 and set(own) <= {"kernel", "bias"}:
            layout = Layout(Kind.DENSE, tuple(kernel.shape), (0,), (1,))
        elif table is not None and table.ndim == 2 and set(own) == {"embedding"}:
            layout = Layout(Kind.EMBED, tuple(table.shape), (0,), (1,))
        else:
            return self.low_rank()
        n_in, n_out = layout.kernel_shape
        return LowRank(jnp.zeros((n_in, 0), jnp.float32), jnp.zeros((0, n_out), jnp.float32), 0.0, layout,
                       tied_output=self.tied_output, tie_output=bool(self.tie_output), saved=own)

    def low_rank(self) -> LowRank:
        what = ("a trained copy of the module's bias (LoraConfig.bias='all' or 'lora_only')" if set(self.params) == {"bias"}
                else "a trained full copy of the module (LoraConfig.modules_to_save; PEFT adds the classification head "
                     "of a SEQ_CLS / TOKEN_CLS adapter there itself)")
        raise NotMergeableError(
            f"this site is {what}: it replaces the module's weights, it is not a low-rank update s*A@B, so adapter "
            "merging and the adapter bank cannot combine it with other adapters. Serve the adapter alone with "
            "jpeft.apply, or fold it into its own copy of the base with jpeft.merge."
        )

    def merge(self, own):
        if "embedding" in self.params and not self.tie_output:
            check_input_only_embedding_merge(self.tied_output, "a modules_to_save copy", stacklevel=4)
        return self._cast(own)

    def unmerge(self, own):
        raise NotInvertibleError(
            "a module of modules_to_save is replaced by its trained copy when merged, so its base weights cannot be "
            "recovered from the merged params; keep the base params tree (jpeft never modifies it) instead."
        )


def init_saved(path: str, own: Mapping[str, Any], *, tie_output: bool = False,
               tied_output: Optional[bool] = None) -> SavedModule:
    """The copy of one module of ``modules_to_save``: its parameters, as they are (PEFT's start),
    floating ones in ``float32`` at least (the master copy; the module runs in its own dtype)."""
    return SavedModule(jax.tree.map(master_copy, dict(own)), tie_output, tied_output)


class TrainedBiasOption:
    """The part of a config (LoRA's, OFT's, VeRA's) that holds PEFT's ``bias`` option: ``"none"``,
    ``"<method>_only"`` (the adapted modules' base biases trained too) or ``"all"`` (every bias of the
    model); the trained biases are made by :func:`with_trainable_biases`."""

    def _check_bias(self, only: str) -> None:
        """Reads null (``None``) as ``"none"``, for every config with the option (LoRA's, OFT's,
        VeRA's) as for the options jpeft's other configs accept only at PEFT's defaults
        (``AdapterConfig._unsupported_hf_options``): PEFT writes ``"none"``, and itself fails on a
        hand-written null (``AttributeError`` in ``_mark_only_adapters_as_trainable``, peft 0.21),
        so null can only mean the default. Called from ``__post_init__`` of a frozen dataclass;
        ``only`` is the method's ``"<method>_only"``.

        Raises:
          ConfigError: another value."""
        if self.bias is None:
            object.__setattr__(self, "bias", "none")
        if self.bias not in ("none", only, "all"):
            raise ConfigError(f"{type(self).__name__}.bias must be 'none', {only!r} or 'all' (PEFT's options), "
                              f"found {self.bias!r}.")

    def layer_scan_refusal(self) -> Optional[str]:
        """Trainable base biases (``bias`` other than ``"none"``) are not implemented for stacked layers."""
        return None if self.bias == "none" else f"bias = {self.bias!r} (trainable base biases)"


def with_trainable_biases(bias: str, field: str, leaves: Mapping[str, Mapping[str, Any]],
                          sites: Mapping[str, Any]) -> dict:
    """PEFT's ``bias`` option of a method (``field`` names it in errors, e.g. ``"LoraConfig.bias"``):
    ``"<method>_only"`` makes the base bias of every site whose node has a ``base_bias`` field
    trainable (a copy in that field, which replaces the module's own); ``"all"`` also every other
    module's bias (a bias-only :class:`SavedModule`), as PEFT trains every parameter named ``bias``.

    Raises:
      ConfigError: a layer-scanned site (not implemented)."""
    out = dict(sites)
    for path, node in sites.items():
        if getattr(node, "unstacked", node) is not node:  # a layer scan's site (jpeft.scan.Stacked)
            raise ConfigError(
                f"{field}={bias!r} is not implemented for layer-scanned models (site {path!r}); "
                "use an unrolled model (scan_layers=False)."
            )
        b = leaves[path].get("bias")
        if b is not None and "base_bias" in {f.name for f in dataclasses.fields(node)}:
            out[path] = dataclasses.replace(node, base_bias=jnp.array(b, jnp.float32, copy=True))
    if bias == "all":
        for path, own in leaves.items():
            if path not in out and "bias" in own:
                out[path] = SavedModule({"bias": jnp.array(own["bias"], jnp.float32, copy=True)})
    return out


def trained_biases_from_hf(found: Mapping[str, Any], bias: str, leaves: Mapping[str, Mapping[str, Any]], dtype,
                           taken) -> dict:
    """The bias-only :class:`SavedModule` sites of PEFT's ``bias`` option read from a file (LoRA's and
    OFT's ``<module>.bias`` keys): ``found`` maps a module path to its trained bias, checked against the
    base's bias shape; with ``bias="all"`` every other module's bias not in ``taken`` (paths that hold a
    site already) too, at the base's value (PEFT trains every bias; one missing from the file keeps it).

    Raises:
      BaseMismatchError: a trained bias of another shape than the base's."""
    out = {}
    for path, v in found.items():
        b = leaves[path]["bias"]
        if tuple(np.shape(v)) != tuple(np.shape(b)):
            raise BaseMismatchError(f"the bias of {hf_name(path)!r} has shape {np.shape(v)}, the base's {tuple(np.shape(b))}.")
        out[path] = SavedModule({"bias": jnp.asarray(v, dtype)})
    if bias == "all":
        for path, own in leaves.items():
            if path not in taken and path not in out and "bias" in own:
                out[path] = SavedModule({"bias": jnp.asarray(np.asarray(own["bias"], np.float32), dtype)})
    return out


# PEFT's key of a site's trained base bias (a method's ``bias="<method>_only"`` / ``"all"``), beside the site's tensors
BASE_BIAS = "base_layer.bias"


def refuse_all_with_heads(bias: str, leaves: Mapping[str, Mapping[str, Any]], error: type, what: str,
                          only: str) -> None:
    """PEFT's ``bias="all"`` trains the bias of a task head too (BERT's classifier): jpeft reads such a
    bias-only copy as the head copy PEFT keeps for a SEQ_CLS / QUESTION_ANS model, so a method whose
    config has no ``modules_to_save`` refuses it (``what`` names the config or file, ``only`` the
    method's ``"<method>_only"``; LoRA's own format tells the two apart).

    Raises:
      error: ``bias="all"`` and the base has a task head with a bias."""
    heads = [h for h in HEAD_MODULES if "bias" in leaves.get(h, {})]
    if bias == "all" and heads:
        raise error(
            f"{what} trains every bias of the model, the task head's {heads} too, which jpeft cannot tell from the "
            f"head copy PEFT keeps for a SEQ_CLS / QUESTION_ANS model. Use bias={only!r}, or LoRA "
            "(LoraConfig(bias='all') handles heads), or the bare encoder's params (jpeft.models.BertModel)."
        )


def trained_biases_to_hf(path: str, node, bias: str, field: str) -> dict:
    """PEFT's keys of one node of PEFT's ``bias`` option (``field`` names it, e.g. ``"VeraConfig.bias"``):
    a bias-only :class:`SavedModule` (``bias="all"``, a module without a site) as ``<module>.bias``, a
    site's trained ``base_bias`` as ``<module>.base_layer.bias``; ``{}`` for a site without one.

    Raises:
      UnsupportedAdapterError: the node is not what ``bias`` makes (the config is not the one the
        adapter was made with)."""
    if isinstance(node, SavedModule):
        if bias != "all" or set(node.params) != {"bias"}:
            raise UnsupportedAdapterError(
                f"the adapter holds a copy of {path!r}'s {sorted(node.params)}, which only {field}='all' makes (a "
                f"trained bias), but the config says bias={bias!r}; save with the config the adapter was made with."
            )
        return {peft_key(path, "bias"): to_np(node.params["bias"]).reshape(-1)}
    if getattr(node, "base_bias", None) is None:
        return {}
    if bias == "none":
        raise UnsupportedAdapterError(
            f"the site {path!r} trains its base bias, but the config says {field}='none'; save with the config the "
            "adapter was made with."
        )
    return {peft_key(path, BASE_BIAS): to_np(node.base_bias).reshape(-1)}


def other_bias_keys(tensors: Mapping[str, Any], bias: str, leaves: Mapping[str, Mapping[str, Any]]) -> dict:
    """``{key: module path}``: the ``<module>.bias`` keys of a PEFT file with ``bias="all"`` (the
    trained biases of modules without a site; a site's is ``<module>.base_layer.bias``), which
    :func:`jpeft.peft_format.site_tensors` is to skip and :func:`trained_biases_from_hf` reads."""
    if bias != "all":
        return {}
    out = {}
    for k in tensors:
        sp = split_peft_key(k, ("bias",))
        if sp is not None and not k.endswith("." + BASE_BIAS) and "bias" in leaves.get(sp[0], {}):
            out[k] = sp[0]
    return out


def base_bias_from_hf(got: Mapping[str, Any], bias: str, own: Mapping[str, Any], path: str, folder: str, dtype):
    """A site's trained base bias from its PEFT tensors ``got`` (``base_layer.bias``), or ``None``
    where ``bias`` is ``"none"`` or the module has no bias; PEFT keeps the base's value for a bias
    missing from the file.

    Raises:
      BaseMismatchError: a bias of another shape than the base's.
      CheckpointError: a trained bias in a file whose config says ``bias="none"`` (or on a module
        without a bias)."""
    own_b = own.get("bias")
    if bias != "none" and own_b is not None:
        b = np.asarray(got.get(BASE_BIAS, own_b), np.float32)
        if b.shape != tuple(np.shape(own_b)):
            raise BaseMismatchError(f"site {hf_name(path)!r}: {BASE_BIAS} has shape {b.shape}, the base's bias "
                                    f"{tuple(np.shape(own_b))}.")
        return jnp.asarray(b, dtype)
    if BASE_BIAS in got:
        raise CheckpointError(
            f"site {hf_name(path)!r} in {folder!r} carries a trained {BASE_BIAS}, but adapter_config.json says "
            f"bias={bias!r}{'' if own_b is not None else ' and the base module has no bias'}. The files do not "
            "belong together."
        )
    return None


def saved_to_hf(path: str, node: SavedModule) -> dict:
    """PEFT's keys for a module of modules_to_save: the module's own PyTorch parameter names
    (PEFT saves the copy without its ``modules_to_save.<adapter>`` infix)."""
    out = {}
    for name, x in dict(node.params).items():
        x = to_np(x)
        if name == "kernel" and x.ndim == 2:
            out[peft_key(path, "weight")] = x.copy() if CONV1D.match(path) else x.T.copy()
        elif name in ("embedding", "scale") and x.ndim <= 2 or name == "bias" and x.ndim == 1:
            out[peft_key(path, "bias" if name == "bias" else "weight")] = x.copy()
        else:
            raise UnsupportedAdapterError(
                f"modules_to_save copy of {path!r} has a parameter {name!r} of shape {x.shape}; jpeft writes PEFT's "
                "copies of Dense, Embed and LayerNorm modules only (kernel, embedding, scale, bias)."
            )
    return out


def saved_from_hf(path: str, t: Mapping[str, np.ndarray], own: Mapping[str, Any], folder: str, dtype) -> SavedModule:
    """A module of modules_to_save from PEFT's keys (``weight``/``bias``), checked against the base module."""
    want = "kernel" if "kernel" in own else "embedding" if "embedding" in own else "scale" if "scale" in own else None
    names = {"weight": want, "bias": "bias"}
    got = {names[k]: v for k, v in t.items()}
    if want is None or set(got) != set(own):
        raise CheckpointError(
            f"the adapter in {folder!r} saves a copy of {hf_name(path)!r} with {sorted(t)}, but the base module has "
            f"parameters {sorted(own)}; jpeft loads copies of Dense, Embed and LayerNorm modules with every parameter."
        )
    if want == "kernel" and got[want].ndim == 2 and not CONV1D.match(path):
        got[want] = got[want].T
    for k, v in got.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise BaseMismatchError(
                f"the saved copy of {hf_name(path)!r} has {k} of shape {tuple(v.shape)}, the base module "
                f"{tuple(own[k].shape)}. Load the adapter on the base it was made for."
            )
    return SavedModule({k: jnp.asarray(v, dtype) for k, v in got.items()})


# the head modules PEFT keeps as modules to save (trains a copy of) for each task type: BERT's classifier, a
# decoder's score, BERT's qa_outputs. jpeft writes these in a file's modules_to_save: each PEFT completes the list
# with its own defaults when it loads the file (:data:`PEFT_TASK_HEADS`)
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}
# the names PEFT itself adds to modules_to_save for each task type, and so writes into every file of that task: PEFT
# >= 0.22 adds DistilBERT's pre_classifier for SEQ_CLS and TOKEN_CLS (peft_model.CLASSIFIER_MODULE_NAMES). No jpeft
# base has such a module; a file that names one and holds no tensor of it loads nothing for it, as in PEFT
PEFT_TASK_HEADS = {t: heads + (("pre_classifier",) if t in ("SEQ_CLS", "TOKEN_CLS") else ())
                   for t, heads in TASK_HEADS.items()}
HEAD_MODULES = tuple(dict.fromkeys(m for heads in PEFT_TASK_HEADS.values() for m in heads))


def has_modules_to_save(config) -> bool:
    """Whether a method's config (class or instance) has PEFT's ``modules_to_save`` (LoRA): its
    own init and format make and read the copies it names."""
    return "modules_to_save" in {f.name for f in dataclasses.fields(config)}


def head_copies(config, adapter: Mapping[str, Any]) -> dict:
    """``{path: SavedModule}``: the copies of a task head (:data:`HEAD_MODULES`) an adapter holds
    beside the sites of a method whose config has no ``modules_to_save`` (read by
    :func:`jpeft.hf.load_peft` from a SEQ_CLS, TOKEN_CLS or QUESTION_ANS file; PEFT trains them); ``{}`` for LoRA, whose config names its copies. The
    writers (:mod:`jpeft.hf`, :func:`jpeft.save_adapter`, the checkpoint manager) record them
    apart, since the config cannot rebuild them (:func:`with_head_copies` does)."""
    if has_modules_to_save(config):
        return {}
    return {p: n for p, n in adapter.items() if p in HEAD_MODULES and isinstance(n, SavedModule)}


def with_head_copies(adapter: Mapping[str, Any], params, paths, where: str) -> dict:
    """``adapter`` with a fresh copy (:func:`init_saved`) of each module in ``paths`` (the
    :func:`head_copies` a writer recorded), as abstract arrays when ``params`` are: the template
    a loader fills with the saved arrays.

    Raises:
      ShapeMismatchError: ``params`` have no such module."""
    leaves = module_leaves(params)
    missing = [p for p in paths if p not in leaves]
    if missing:
        raise ShapeMismatchError(f"{where} holds a copy of the module {missing[0]!r} (a task head), which this base "
                                 f"does not have; load it on the base it was saved for.")
    copies = jax.eval_shape(lambda own: {p: init_saved(p, own[p]) for p in paths}, {p: leaves[p] for p in paths})
    return {**adapter, **copies}
