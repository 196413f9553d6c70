"""OFT (Qiu et al. 2023), orthogonal fine-tuning, as Hugging Face PEFT 0.21 computes it.

A targeted linear module ``y = x @ W + b`` (``W: [in, out]``) becomes ``y = (x @ R) @ W + b``:
``R`` is a block-diagonal ``[in, in]`` matrix of ``n`` orthogonal blocks of size ``k``
(``n * k = in``), so OFT rotates the module's *input* features block by block and leaves the
bias alone. Each block comes from a skew-symmetric matrix ``Q = U - U^T`` (``U``: the strictly
upper triangle, ``k (k - 1) / 2`` trainable numbers per block, stored as ``oft_R: [n, k(k-1)/2]``
in PEFT's row-major triangle order) by the Cayley transform

* exact (``use_cayley_neumann=False``): ``R_j = (I - Q) (I + Q)^-1``;
* Cayley-Neumann (the default): PEFT's truncated series
  ``R_j = I + 2 Q + 2 Q^2 + ... + 2 Q^(t-2) + Q^(t-1)`` with ``t = num_cayley_neumann_terms``
  (for ``t <= 4`` the terms PEFT's loop actually adds; see :func:`cayley`).

``oft_R = 0`` is the identity, so the adapter starts as the base model. ``block_share`` keeps one
block for all ``n`` positions; ``coft`` (constrained OFT) projects each block's ``Q`` onto the
Frobenius ball of radius ``eps / sqrt(stored blocks)`` before the transform.

Merging folds the rotation into the kernel, ``W' = R @ W``; unmerging solves with each block
(``R`` is exactly orthogonal only for the exact Cayley transform, so the inverse is not taken
as the transpose), as PEFT's ``torch.linalg.inv`` does.

On a 2-D ``nn.Conv`` (kernel ``[kh, kw, in, out]``) ``R`` acts on the ``in * kh * kw`` inputs of each
filter, the rows of the flattened weight in PyTorch's ``(in, kh, kw)`` order (PEFT 0.22's ``Conv2d``:
its ``oft_R`` file loads as it is), and the forward adds the conv of ``W' - W`` to the module's own
output: PEFT 0.22's unmerged model, which is its merged one.

Differences from PEFT, by name:

* ``coft``: PEFT writes the projected value back into ``oft_R`` in place at every forward;
  jpeft is pure, so it projects in the forward with a straight-through gradient (the same
  outputs and the same gradient at the projected point), and the train step projects the
  stored array after each update (:meth:`OFTWeights.after_update`), so training steps from the
  projected value as PEFT's does. Saved adapters give the same outputs in both libraries.
* ``module_dropout``: PEFT (0.21 and 0.22) builds its multiplicative dropout but neither its
  ``Linear`` nor its ``Conv2d`` forward calls it. jpeft applies it as PEFT documents it, at every
  site, dense and conv alike (each training step, with a dropout key, ``int(p * n)`` random
  blocks are replaced by the identity), so training with ``module_dropout > 0`` differs from
  PEFT's; inference is the same.
* Sites: PEFT 0.21's Conv2d forward rotates stride-1, unpadded input patches and sums them back
  with ``F.fold``, which is not the merged convolution (but on a 1x1 window); PEFT 0.22's rotates
  the flattened ``[out, in * kh * kw]`` weight, the merged convolution, as jpeft: a PEFT file of a
  conv wider than 1x1 loads from PEFT >= 0.22 only, and ``save_peft`` records ``peft_version``
  0.22.0 for one. PEFT's OFT also adapts Embedding (the lookup is rotated; merging also changes a
  tied output head). jpeft adapts ``nn.Dense`` kernels (and 2-D ``DenseGeneral`` with its last axis
  as input) and 2-D ``nn.Conv`` and refuses other modules with
  :class:`~jpeft.errors.UnsupportedModuleError`. A block size that does not divide a targeted
  module's input width is refused with :class:`~jpeft.errors.ConfigError` (PEFT warns and picks
  another size; jpeft names it instead).
* ``bias``: PEFT's ``"oft_only"`` trains the base bias of every OFT-adapted module, ``"all"``
  every bias of the model; jpeft holds the first as :attr:`OFTWeights.base_bias` (the trained
  bias replaces the module's own: merging writes it, unmerging is refused) and the others as
  bias-only :class:`~jpeft.methods._common.SavedModule` sites, as for ``LoraConfig.bias``, and
  reads and writes PEFT's ``base_layer.bias`` / ``<module>.bias`` keys. ``"all"`` on a model with
  a task head (BERT's ``classifier`` / ``qa_outputs``) is refused
  (:class:`~jpeft.errors.ConfigError`; :class:`~jpeft.errors.UnsupportedAdapterError` for a
  PEFT file): jpeft reads the head's bias copy as PEFT's module to save of a SEQ_CLS model.
* Files: a Cayley-Neumann adapter written by PEFT < 0.18 (whose series differed) is refused with
  :class:`~jpeft.errors.UnsupportedAdapterError`; files jpeft writes say ``peft_version: 0.18.0``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jpeft import _inject, scan
from jpeft.config import AdapterConfig
from jpeft.errors import (
    BaseMismatchError,
    CheckpointError,
    ConfigError,
    NotInvertibleError,
    UnsupportedAdapterError,
    UnsupportedModuleError,
)
from jpeft.methods._common import (BASE_BIAS, HEAD_MODULES, SavedModule, TrainedBiasOption, base_bias_from_hf,
                                   PEFT_CONV_FORWARD, check_conv_for_peft, conv_rows_from_torch, conv_rows_to_torch,
                                   linear_layout, linear_targets, other_bias_keys, peft_site_layout,
                                   refuse_all_with_heads, trained_biases_from_hf, trained_biases_to_hf,
                                   with_trainable_biases)
from jpeft.methods.base import Call, Kind, Layout, Method, Site, register_method, static_field
from jpeft.peft_format import config_from_peft, needs_peft, peft_key, peft_version_of, site_tensors
from jpeft.tree import hf_name


@dataclasses.dataclass(frozen=True)
class OFTConfig(TrainedBiasOption, AdapterConfig):
    """Configuration of an OFT adapter (Hugging Face PEFT's ``OFTConfig`` names and defaults).

    Args:
      r: number of blocks per module; give either ``r`` or ``oft_block_size`` (the other ``0``).
      oft_block_size: size ``k`` of each orthogonal block (must divide every targeted module's
        input width); the default ``32`` with ``r=0`` is PEFT's.
      target_modules: as for :class:`jpeft.LoraConfig`; the default is PEFT's for Llama.
      module_dropout: probability of replacing a block by the identity during training
        (with ``rngs={"dropout": key}``); see the module notes for how PEFT 0.21 differs.
      coft, eps: constrained OFT and its radius.
      block_share: one block shared by all positions of a module.
      use_cayley_neumann, num_cayley_neumann_terms: the truncated-series Cayley transform.
      init_weights: ``True`` starts at the identity (``oft_R = 0``); ``False`` draws
        ``oft_R ~ N(0, 0.1^2)`` as PEFT does (for tests).
      bias: ``"none"``, ``"oft_only"`` (the base biases of the OFT-adapted modules are trained
        too, held as ``OFTWeights.base_bias``) or ``"all"`` (every base bias of the model, the
        others as bias-only :class:`jpeft.SavedModule` sites), as PEFT's option of that name.
        ``None`` (a null) reads as ``"none"``.

    >>> from jpeft.methods.oft import OFTConfig
    >>> c = OFTConfig(oft_block_size=4, target_modules=["q_proj", "v_proj"])
    >>> OFTConfig.from_dict(c.to_dict()) == c
    True
    >>> c.to_dict()["peft_type"]
    'OFT'
    """

    peft_type: ClassVar[str] = "OFT"

    r: int = 0
    oft_block_size: int = 32
    target_modules: Any = ("q_proj", "v_proj")
    module_dropout: float = 0.0
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5
    init_weights: bool = True
    bias: Optional[str] = "none"  # None: "none" (TrainedBiasOption)

    def __post_init__(self):
        self._set_targets("give a regex or names such as ['q_proj', 'v_proj']")
        self._check_bias("oft_only")  # PEFT's bias option (TrainedBiasOption)
        for name in ("r", "oft_block_size", "num_cayley_neumann_terms"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"OFTConfig.{name} must be a non-negative integer, found {v!r}.")
        if (self.r == 0) == (self.oft_block_size == 0):
            raise ConfigError(
                f"OFTConfig needs exactly one of r (blocks per module) and oft_block_size (block size) non-zero, as in "
                f"Hugging Face PEFT (r x oft_block_size = in_features); found r={self.r}, "
                f"oft_block_size={self.oft_block_size}. Set the other one to 0."
            )
        for name in ("coft", "block_share", "use_cayley_neumann", "init_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"OFTConfig.{name} must be a bool, found {getattr(self, name)!r}.")
        if self.use_cayley_neumann and self.num_cayley_neumann_terms < 2:
            raise ConfigError(
                f"OFTConfig.num_cayley_neumann_terms={self.num_cayley_neumann_terms} keeps only the series' first term, "
                "the identity: every rotation would be I whatever oft_R holds, so the adapter would never change the "
                "model (Hugging Face PEFT computes the same identity). Use 2 or more terms (the default is 5), or "
                "use_cayley_neumann=False for the exact Cayley transform."
            )
        if isinstance(self.module_dropout, bool) or not isinstance(self.module_dropout, (int, float)) \
                or not 0.0 <= self.module_dropout < 1.0:
            raise ConfigError(f"OFTConfig.module_dropout must be in [0, 1), found {self.module_dropout!r}.")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not 0 < self.eps < math.inf:
            raise ConfigError(f"OFTConfig.eps must be a positive finite number, found {self.eps!r}.")

    def saved_config(self, adapter) -> "OFTConfig":
        """The config :func:`jpeft.save_adapter` (and a checkpoint) records: this one, after
        checking that every site was made with its settings (block size and sharing, the Cayley
        form, the series' terms, coft's eps), as :func:`jpeft.hf.save_peft` checks them:
        :func:`jpeft.load_adapter` rebuilds the sites from it, and would compute another rotation
        from the same ``oft_R``. Raises :class:`~jpeft.errors.ConfigError` naming the settings."""
        for path, node in adapter.items():
            node = getattr(node, "unstacked", node)  # a layer-scanned site: its per-layer node
            if isinstance(node, OFTWeights):
                _check_node_matches(self, path, node, saver="save_adapter", reader="jpeft.load_adapter",
                                    error=ConfigError)
        return self


# -- the math, as small pure functions --------------------------------------------------------------

def n_elements(block_size: int) -> int:
    """Trainable numbers per block: the strict upper triangle of a ``[k, k]`` matrix."""
    return block_size * (block_size - 1) // 2


def block_size_of(n_elem: int) -> int:
    """Inverse of :func:`n_elements` (``-1`` when ``n_elem`` is not a triangle number)."""
    k = int(round((1 + math.sqrt(1 + 8 * n_elem)) / 2))
    return k if n_elements(k) == n_elem and k >= 1 else -1


def blocks_for(config: OFTConfig, in_features: int, path: str) -> tuple[int, int]:
    """``(blocks, block_size)`` of a module with ``in_features`` inputs, or a ConfigError."""
    given, name = (config.r, "r") if config.r else (config.oft_block_size, "oft_block_size")
    if given > in_features or in_features % given:
        divisors = [d for d in range(1, in_features + 1) if in_features % d == 0]
        near = min(divisors, key=lambda d: (abs(d - given), d))
        raise ConfigError(
            f"OFTConfig.{name}={given} does not divide the {in_features} input features of {path!r}; OFT needs "
            f"r x oft_block_size = in_features. Use a divisor of {in_features}, e.g. {name}={near} (Hugging Face PEFT "
            "would pick another size for this layer with a warning)."
        )
    other = in_features // given
    return (given, other) if config.r else (other, given)


def skew(vec, block_size: int):
    """``[b, k(k-1)/2] -> [b, k, k]``: ``U - U^T`` with ``U``'s strict upper triangle filled
    row by row (PEFT's ``torch.triu_indices`` order)."""
    rows, cols = np.triu_indices(block_size, 1)
    u = jnp.zeros(vec.shape[:-1] + (block_size, block_size), vec.dtype).at[..., rows, cols].set(vec)
    return u - jnp.swapaxes(u, -1, -2)


def coft_project(vec, block_size: int, eps: float):
    """Constrained OFT: each block's ``Q`` scaled onto the Frobenius ball of radius
    ``eps / sqrt(b)`` (``b`` stored blocks) when outside it (PEFT's ``_project_batch``)."""
    q = skew(vec, block_size)
    radius = eps / math.sqrt(vec.shape[-2])  # stored blocks (a layer-scanned node has the layers first)
    norm = jnp.sqrt(jnp.sum(q * q, axis=(-2, -1), keepdims=True))
    safe = jnp.where(norm > radius, norm, 1.0)
    out = jnp.where(norm <= radius, q, radius * q / safe)
    rows, cols = np.triu_indices(block_size, 1)
    return out[..., rows, cols]


def cayley(vec, block_size: int, neumann: bool, terms: int):
    """The orthogonal blocks ``[b, k, k]`` from ``oft_R: [b, k(k-1)/2]`` (float32)."""
    q = skew(vec.astype(jnp.float32), block_size)
    eye = jnp.broadcast_to(jnp.eye(block_size, dtype=jnp.float32), q.shape)
    if not neumann:
        # R (I + Q) = I - Q, i.e. R = (I - Q)(I + Q)^-1: solve (I + Q)^T R^T = (I - Q)^T
        return jnp.swapaxes(jnp.linalg.solve(jnp.swapaxes(eye + q, -1, -2), jnp.swapaxes(eye - q, -1, -2)), -1, -2)
    r = eye
    if terms > 1:  # PEFT's series, term for term (for 3 and 4 terms it adds the same powers)
        r = r + 2.0 * q
        if terms > 2:
            power = q @ q
            r = r + 2.0 * power
            for _ in range(3, terms - 1):
                power = power @ q
                r = r + 2.0 * power
            r = r + power @ q
    return r


def rotation_blocks(oft_r, *, blocks: int, block_size: int, neumann: bool, terms: int, coft: bool, eps: float):
    """``[blocks, k, k]``: the rotation's diagonal blocks (one stored block repeated under
    ``block_share``). ``coft`` projects with a straight-through gradient."""
    v = oft_r.astype(jnp.float32)
    if coft:
        v = v + jax.lax.stop_gradient(coft_project(v, block_size, eps) - v)
    r = cayley(v, block_size, neumann, terms)
    if r.shape[0] != blocks:
        r = jnp.broadcast_to(r, (blocks,) + r.shape[1:])
    return r


def rotate(x, r_blocks):
    """``x @ R`` on the last axis of ``x`` (``[..., n*k]``), block by block."""
    n, k, _ = r_blocks.shape
    xs = x.reshape(x.shape[:-1] + (n, k))
    return jnp.einsum("...rk,rkc->...rc", xs, r_blocks.astype(x.dtype)).reshape(x.shape)


def merge_matrix(r_blocks, w):
    """``R @ W`` for ``W: [in, out]`` (the merged kernel)."""
    n, k, _ = r_blocks.shape
    return jnp.einsum("rkc,rco->rko", r_blocks, w.reshape(n, k, -1)).reshape(w.shape)


def unmerge_matrix(r_blocks, w):
    """``R^-1 @ W``: one linear solve per block."""
    n, k, _ = r_blocks.shape
    return jnp.linalg.solve(r_blocks, w.reshape(n, k, -1)).reshape(w.shape)


def block_dropout(r_blocks, rate: float, key):
    """PEFT's documented multiplicative dropout: ``int(rate * n)`` random blocks become the
    identity (none when one block is shared, or without a key)."""
    stored = r_blocks.shape[0]
    drop = int(rate * stored)
    if key is None or rate <= 0.0 or drop == 0:
        return r_blocks
    mask = jax.random.permutation(key, jnp.arange(stored) < drop).astype(r_blocks.dtype)[:, None, None]
    eye = jnp.eye(r_blocks.shape[-1], dtype=r_blocks.dtype)[None]
    return (1.0 - mask) * r_blocks + mask * eye


# -- the site node ----------------------------------------------------------------------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class OFTWeights(Site):
    """One OFT site: ``oft_R: [stored blocks, k(k-1)/2]`` (stored blocks: ``blocks``, or 1 with
    ``block_share``), rotating the input of an ``nn.Dense`` kernel of ``blocks * block_size``
    input features, or the ``in * kh * kw`` inputs of each filter of a 2-D ``nn.Conv``, taken in
    PyTorch's ``(in, kh, kw)`` order as PEFT's ``Conv2d`` takes them (:meth:`rotate_kernel`)."""

    oft_R: jax.Array
    layout: Layout = static_field(default=None)
    blocks: int = static_field(default=1)
    block_size: int = static_field(default=1)
    neumann: bool = static_field(default=True)
    terms: int = static_field(default=5)
    coft: bool = static_field(default=False)
    eps: float = static_field(default=6e-5)
    module_dropout: float = static_field(default=0.0)
    # OFTConfig.bias: the module's trained base bias [out], used in place of its own (PEFT trains it in place)
    base_bias: Any = None

    site: ClassVar[str] = "linear"
    mergeable: ClassVar[bool] = True

    def rotation(self):
        """The ``[blocks, k, k]`` orthogonal blocks (float32)."""
        return rotation_blocks(self.oft_R, blocks=self.blocks, block_size=self.block_size, neumann=self.neumann,
                               terms=self.terms, coft=self.coft, eps=self.eps)

    def after_update(self):
        """``coft``: ``oft_R`` projected onto its ball after each update, as PEFT writes the
        projection back into the parameter at its next forward (its optimizer then steps from
        the projected value)."""
        if not self.coft:
            return self
        return dataclasses.replace(self, oft_R=coft_project(self.oft_R.astype(jnp.float32), self.block_size,
                                                           self.eps).astype(self.oft_R.dtype))

    def check_params(self, path: str, own: Mapping[str, Any]) -> None:
        self.layout.check_params(path, own, what="OFT adapter")

    @staticmethod
    def _check_axis(module, ndim: int, path: str) -> None:
        """OFT rotates the input's last axis: a DenseGeneral must contract that axis alone
        (``axis=-1``, or its non-negative form for this input's rank)."""
        axis = getattr(module, "axis", -1)
        axes = (axis,) if isinstance(axis, int) else tuple(axis)
        if tuple(a % ndim for a in axes) != (ndim - 1,):
            raise UnsupportedModuleError(
                f"OFT at {path!r} rotates the input's last axis, but "
                f"the module contracts axis {axis!r} of a {ndim}-D input; target nn.Dense modules (or DenseGeneral "
                "contracting the last axis only)."
            )

    def rotate_kernel(self, kernel, fn, r_blocks=None):
        """``fn(R, W)`` (:func:`merge_matrix`, :func:`unmerge_matrix`) on the kernel as the matrix
        ``W: [in, out]`` whose rows the rotation acts on (float32, the kernel's shape): for a conv
        ``[kh, kw, in, out]``, PyTorch's ``[in * kh * kw, out]``, the flattened weight PEFT rotates."""
        r = self.rotation() if r_blocks is None else r_blocks
        lay = self.layout
        mat = kernel.astype(jnp.float32).reshape(lay.in_features, -1)
        if lay.kind != Kind.CONV:
            return fn(r, mat).reshape(kernel.shape)
        t = conv_rows_to_torch(mat, lay).reshape(mat.shape[1], -1).T  # [in * kh * kw, out]
        return conv_rows_from_torch(fn(r, t).T, lay).reshape(kernel.shape)

    def intercept(self, call: Call):
        x = call.inputs
        if self.layout.kind != Kind.CONV:
            self._check_axis(call.module, x.ndim, call.path)
        _inject.check_layout(call.path, self.layout, call.module, call.args, call.kwargs)
        r = self.rotation()
        if self.module_dropout > 0.0 and self.oft_R.shape[0] > 1:  # PEFT: a shared block is never dropped
            r = block_dropout(r, self.module_dropout, call.dropout_key())
        if self.layout.kind == Kind.CONV:  # the rotated weight, as PEFT 0.22 (the rotated patches overlap)
            y = call.run()
            k = jnp.asarray(call.module.variables["params"]["kernel"])
            dk = self.rotate_kernel(k, merge_matrix, r) - k.astype(jnp.float32)
            helper = _inject.update_module(call.module, dtype=jnp.float32)
            with _inject.bypass():
                d = helper.apply({"params": {"kernel": dk}}, *call.args, **call.kwargs)
            y = (y.astype(jnp.float32) + d).astype(y.dtype)
        else:
            xr = rotate(x.astype(jnp.float32), r).astype(x.dtype)
            if call.args:
                y = call.next_fun(xr, *call.args[1:], **call.kwargs)
            else:
                y = call.next_fun(**{**call.kwargs, "inputs": xr})
        if self.base_bias is not None:  # OFTConfig.bias: the trained base bias replaces the module's own
            own_b = call.module.variables["params"]["bias"]
            d = (self.base_bias.astype(y.dtype) - own_b.astype(y.dtype)).reshape(own_b.shape)
            y = y + d.reshape((1,) * (y.ndim - own_b.ndim) + own_b.shape)
        return y

    def partition_specs(self, module_specs):
        """Replicated: ``oft_R`` is small (``in * (k - 1) / 2`` numbers per site), and its block
        axis need not divide by the mesh axis that shards the kernel's input."""
        return dataclasses.replace(self, oft_R=P(), base_bias=None if self.base_bias is None else P())

    def _fold(self, own, fn):
        w = jnp.asarray(own["kernel"])
        out = dict(own)
        out["kernel"] = self.rotate_kernel(w, fn).astype(w.dtype)
        return out

    def merge(self, own):
        """``W' = R @ W`` (the bias is not rotated; a trained base bias, ``OFTConfig.bias``, replaces it)."""
        out = self._fold(own, merge_matrix)
        if self.base_bias is not None:
            out["bias"] = self.base_bias.reshape(own["bias"].shape).astype(own["bias"].dtype)
        return out

    def unmerge(self, own):
        """``W = R^-1 @ W'``, one solve per block."""
        if self.base_bias is not None:
            raise NotInvertibleError(
                "this OFT adapter trains the base bias too (OFTConfig.bias), which merge replaces, so the base bias "
                "cannot be recovered from merged params; keep the base params tree (jpeft never modifies it) instead."
            )
        return self._fold(own, unmerge_matrix)


def _check_site(path: str, lay: Layout, error: type = UnsupportedModuleError) -> None:
    """Refuses (``error``) a module OFT does not adapt: it rotates the input of a dense kernel
    (``nn.Dense``, a ``DenseGeneral`` contracting one axis) or each filter's inputs of a 2-D
    ``nn.Conv`` (Hugging Face PEFT's OFT adapts Linear and Conv2d)."""
    if lay.kind == Kind.CONV and len(lay.kernel_shape) == 4:
        return
    if lay.kind not in (Kind.DENSE, Kind.DENSE_GENERAL) or len(lay.in_axes) != 1 or tuple(lay.in_axes) != (0,):
        what = (f"a {len(lay.kernel_shape) - 2}-D nn.Conv" if lay.kind == Kind.CONV else
                f"a {lay.kind} module{'' if lay.kind != Kind.DENSE_GENERAL else ' with several input axes'}")
        raise error(
            f"module {path!r} is {what}; jpeft's OFT adapts nn.Dense kernels and 2-D nn.Conv (Hugging Face PEFT's "
            "OFT on torch.nn.Linear and torch.nn.Conv2d). Remove it from target_modules."
        )


def _site_layout(path: str, own, infos) -> Layout:
    lay = linear_layout(path, own, infos)
    _check_site(path, lay)
    if lay.kind == Kind.CONV:
        return lay
    info = infos.get(path) if infos else None  # traced (jpeft.init given the model): refused before any apply
    if info is not None and info.input_axes is not None and info.in_shape is not None:
        ndim = len(info.in_shape.shape)
        if info.input_axes != (ndim - 1,):
            raise UnsupportedModuleError(
                f"OFT at {path!r} rotates the input's last axis, but the module contracts axis "
                f"{info.input_axes[0] if len(info.input_axes) == 1 else info.input_axes} of a {ndim}-D input; target "
                "nn.Dense modules (or DenseGeneral contracting the last axis only)."
            )
    return lay


# what PEFT 0.21's OFT Conv2d computes unmerged (its merged model is the rotated weight's, as PEFT 0.22's)
_OFT_CONV_021 = ("rotates the conv's input in stride-1, unpadded kh x kw patches and sums the overlapping patches back "
                 "(F.fold) before the base conv, which for a window larger than 1x1 is not the rotated weight's conv")


def _peft_oft_differs(lay: Layout):
    """Why PEFT < 0.22's OFT computes another output than jpeft's on a conv of layout ``lay``
    (a window larger than 1x1), else ``None``."""
    window = tuple(lay.kernel_shape[:-2]) if lay.kind == Kind.CONV else ()
    return f"a {'x'.join(map(str, window))} window" if math.prod(window) > 1 else None


def init(config: OFTConfig, params, key, infos) -> dict:
    """Creates the OFT parameters for every targeted ``nn.Dense`` (and 2-D ``nn.Conv``) module."""
    leaves, paths = linear_targets(config.target_modules, params, what="linear module (Dense)")
    keys = jax.random.split(key, len(paths))
    out = {}
    for k, path in zip(keys, paths):
        lay = _site_layout(path, leaves[path], infos)
        blocks, size = blocks_for(config, lay.in_features, path)
        stored = 1 if config.block_share else blocks

        def make(k, own, lay=lay, blocks=blocks, size=size, stored=stored):
            shape = (stored, n_elements(size))
            v = jnp.zeros(shape, jnp.float32) if config.init_weights else 0.1 * jax.random.normal(k, shape, jnp.float32)
            return OFTWeights(v, lay, blocks, size, config.use_cayley_neumann, config.num_cayley_neumann_terms,
                              config.coft, float(config.eps), float(config.module_dropout))

        out[path] = scan.make_site(make, path, lay, k, leaves[path])
    if config.bias != "none":
        refuse_all_with_heads(config.bias, leaves, ConfigError, "OFTConfig(bias='all')", "oft_only")
        out = with_trainable_biases(config.bias, "OFTConfig.bias", leaves, out)
    return out


# -- Hugging Face PEFT format -----------------------------------------------------------------------

TENSOR = "oft_R.weight"


def _check_node_matches(config: OFTConfig, path: str, node: OFTWeights, *, saver: str = "save_peft",
                        reader: str = "PEFT", error: type = UnsupportedAdapterError) -> None:
    """Refuses (``error``) a site whose static settings are not what ``config`` gives it: the file
    ``saver`` writes records the config's, and ``reader`` would compute another rotation from the
    same ``oft_R``."""
    try:
        blocks, size = blocks_for(config, node.layout.in_features, path)
    except ConfigError as e:
        raise error(f"{e} Save with the config the adapter was made with.") from None
    got = dict(blocks=node.blocks, block_size=node.block_size, stored=int(node.oft_R.shape[-2]),
               use_cayley_neumann=node.neumann, coft=node.coft)
    want = dict(blocks=blocks, block_size=size, stored=1 if config.block_share else blocks,
                use_cayley_neumann=config.use_cayley_neumann, coft=config.coft)
    if node.neumann:
        got["num_cayley_neumann_terms"], want["num_cayley_neumann_terms"] = node.terms, config.num_cayley_neumann_terms
    if node.coft:
        got["eps"], want["eps"] = float(node.eps), float(config.eps)
    diff = {k: (got[k], want[k]) for k in got if got[k] != want[k]}
    if diff:
        raise error(
            f"OFT site {path!r} was made with other settings than the config given to {saver} "
            f"(site, config): {diff}; {reader} would compute another rotation from the same oft_R. Save with the "
            "config the adapter was made with."
        )


def _to_hf(config: OFTConfig, adapter, ctx):
    if ctx.fan_in_fan_out:
        raise UnsupportedAdapterError(
            "these OFT sites are GPT-2 Conv1D layers (fan_in_fan_out); Hugging Face PEFT's OFT adapts torch.nn.Linear "
            "only and cannot load them. Nothing was written; keep the adapter in jpeft's format (jpeft.save_adapter)."
        )
    tensors, targets, patches = {}, [], {}
    for path in sorted(adapter):
        node = adapter[path]
        tensors.update(trained_biases_to_hf(path, node, config.bias, "OFTConfig.bias"))
        if isinstance(node, SavedModule):  # bias="all": the trained bias of a module without a site
            continue
        check_conv_for_peft(path, node.layout, "OFT", (2,))
        if _peft_oft_differs(node.layout) is not None:
            patches[path] = _peft_oft_differs(node.layout)
        _check_node_matches(config, path, node)
        tensors[peft_key(path, TENSOR)] = np.asarray(node.oft_R, np.float32)
        targets.append(hf_name(path))
    d = {f: getattr(config, f) for f in ("r", "oft_block_size", "module_dropout", "coft", "eps", "block_share",
                                          "use_cayley_neumann", "num_cayley_neumann_terms", "init_weights")}
    d.update(target_modules=targets, fan_in_fan_out=False, bias=config.bias, modules_to_save=None, exclude_modules=None,
             layers_to_transform=None, layers_pattern=None,
             # the Cayley-Neumann series as PEFT >= 0.18 computes it; without a version PEFT warns that the
             # adapter may use the older series
             peft_version="0.18.0")
    needs_peft(d, PEFT_CONV_FORWARD, patches, f"their nn.Conv has {' / '.join(sorted(set(patches.values())))}: "
               f"{_OFT_CONV_021}, while PEFT 0.22 rotates the conv's weight, as jpeft")
    return d, tensors


def _from_hf(d, tensors, params, ctx):
    embedded = sorted(k for k in tensors if ".oft_embedding_R" in k)
    if embedded:
        raise UnsupportedAdapterError(
            f"the OFT adapter in {ctx.folder!r} adapts embedding layers (first: {embedded[0]!r}); jpeft's OFT adapts "
            "linear (nn.Dense) modules only. Retrain it in PEFT without the embedding in target_modules."
        )
    if d.get("target_modules") is None:
        raise UnsupportedAdapterError(f"the OFT adapter in {ctx.folder!r} has target_modules=null; set it explicitly.")
    if "oft_block_size" not in d:
        raise UnsupportedAdapterError(
            f"the OFT adapter in {ctx.folder!r} has no oft_block_size: it was written by PEFT < 0.14, whose OFT "
            "parametrisation differs (PEFT itself refuses it). Retrain it with a current PEFT."
        )
    version = peft_version_of(d)
    if d.get("use_cayley_neumann", True) and (version is None or version < (0, 18)):
        raise UnsupportedAdapterError(
            f"the OFT adapter in {ctx.folder!r} uses the Cayley-Neumann series and was written by PEFT "
            f"{d.get('peft_version') or '< 0.18 (no peft_version)'}; PEFT 0.18 changed that series, and jpeft computes "
            "the new one, so its outputs would differ. Retrain it with PEFT >= 0.18 (PEFT itself warns about this)."
        )
    kept = dict(d)
    if set(kept.get("modules_to_save") or ()) <= set(HEAD_MODULES):  # a task head's copy: checked by jpeft.hf
        kept["modules_to_save"] = None
    config = config_from_peft(OFTConfig, kept, ctx.folder)
    refuse_all_with_heads(config.bias, ctx.leaves, UnsupportedAdapterError, f"the OFT adapter in {ctx.folder!r} (bias='all')",
                          "oft_only")
    biases = other_bias_keys(tensors, config.bias, ctx.leaves)  # bias="all": <module>.bias of modules without a site
    by_site = site_tensors(tensors, (TENSOR, BASE_BIAS), ctx.leaves, config.target_modules, skip=tuple(biases))
    adapter = {}
    for path, got in sorted(by_site.items()):
        if TENSOR not in got:
            raise CheckpointError(f"OFT site {hf_name(path)!r} in {ctx.folder!r} has {sorted(got)} but no {TENSOR}; "
                                  "the file is incomplete.")
        v = got[TENSOR]
        lay = peft_site_layout(path, ctx.leaves[path], ctx, "OFT", convs="Conv2d",
                               adapts="Linear and Conv2d layers, whose twins are nn.Dense and nn.Conv",
                               differs=_peft_oft_differs, old=f"PEFT < 0.22 {_OFT_CONV_021}",
                               new="the conv's weight rotated")
        _check_site(path, lay, UnsupportedAdapterError)
        try:
            blocks, size = blocks_for(config, lay.in_features, path)
        except ConfigError as e:
            raise UnsupportedAdapterError(
                f"the OFT adapter in {ctx.folder!r}: {e} (PEFT changed the block size of this layer when it built the "
                "adapter; jpeft keeps one block size per config)."
            ) from None
        want = (1 if config.block_share else blocks, n_elements(size))
        if tuple(v.shape) != want:
            raise (BaseMismatchError if v.ndim == 2 and block_size_of(v.shape[1]) != size else CheckpointError)(
                f"OFT site {hf_name(path)!r}: oft_R has shape {tuple(v.shape)}, expected {want} for a module with "
                f"{lay.in_features} input features, {blocks} blocks of size {size}"
                f"{' (one shared block)' if config.block_share else ''}."
            )
        base_bias = base_bias_from_hf(got, config.bias, ctx.leaves[path], path, ctx.folder, ctx.dtype)
        adapter[path] = OFTWeights(jnp.asarray(v, ctx.dtype), lay, blocks, size, config.use_cayley_neumann,
                                   config.num_cayley_neumann_terms, config.coft, float(config.eps),
                                   float(config.module_dropout), base_bias)
    for k, path in biases.items():
        if path in adapter:
            raise CheckpointError(f"the OFT adapter in {ctx.folder!r} has {k!r}, the bias of an OFT site, which PEFT "
                                  "saves as base_layer.bias; the file is not PEFT's.")
    adapter.update(trained_biases_from_hf({path: tensors[k] for k, path in biases.items()}, config.bias, ctx.leaves,
                                          ctx.dtype, adapter))
    return config, adapter


def budget_rows(model_type: str, targets):
    """``Method.budget``: PEFT's default OFT (block size 32) on its default targets (LoRA's)."""
    qv = targets["lora"]
    names = qv if isinstance(qv, str) else "+".join(qv)
    return [("OFT", f"oft_block_size=32, {names}", lambda: OFTConfig(oft_block_size=32, target_modules=qv))]


OFT = register_method(Method(config=OFTConfig, init=init, nodes=(OFTWeights, SavedModule), to_hf=_to_hf,
                             from_hf=_from_hf, budget=budget_rows))
