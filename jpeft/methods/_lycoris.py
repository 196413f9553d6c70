"""What LoHa (:mod:`jpeft.methods.loha`) and LoKr (:mod:`jpeft.methods.lokr`) share, as
Hugging Face PEFT's ``lycoris_utils`` does for its two LyCORIS tuners.

Both methods build a full-size weight update from a few small tensors (a Hadamard product of
two low-rank matrices for LoHa, a Kronecker product for LoKr) and add the module's output on
that update: ``y = f(x; W) + f(x; dW)``. They store their tensors in **PyTorch's orientation
and under PEFT's names** (``hada_w1_a: [out, r]``, ``lokr_w1: [out_l, in_m]``, ...), so the
update is first formed as PEFT forms it, ``[out, in]`` (``[out, in, *window]`` for a
convolution), and then laid out as the module's kernel (:func:`kernel_from_torch`). The PEFT
format then needs no transposes, and the math here is PEFT's line for line.

Pieces kept as small pure functions (the method files hold the rest):

* :func:`torch_shape`, :func:`kernel_from_torch`, :func:`matrix_from_torch`: the update's
  PyTorch shape for a layout and its conversion to the flax kernel / the ``[in, out]`` matrix;
* :func:`kaiming_uniform`: ``torch.nn.init.kaiming_uniform_(t, a=sqrt(5))`` on PyTorch shapes;
* :class:`LycorisConfig`: the fields both configs share (rank and alpha, their per-module
  patterns, the two training-time dropouts, the effective-convolution switch);
* :class:`LycorisSite`: the node skeleton (forward, dropouts, merge) over a method's
  ``torch_delta()``;
* :func:`to_hf` / :func:`from_hf`: the PEFT format, driven by the method's tensor shapes;
* :func:`method`: the :class:`~jpeft.methods.base.Method` record built from these pieces.

Each method file registers itself with one :func:`jpeft.methods.base.register_method` call
(of :func:`method`'s record); this module is a helper of those two files only and registers
nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import _inject, scan
from jpeft.config import AdapterConfig, is_positive_number, python_scalar
from jpeft.errors import (BaseMismatchError, CheckpointError, ConfigError, UnsupportedAdapterError,
                          UnsupportedModuleError)
from jpeft.methods._common import (HEAD_MODULES, PEFT_CONV_FORWARD, AdditiveMerge, branch_dtype, check_conv_for_peft,
                                   linear_layout, linear_targets, peft_padded_conv_layout, to_matrix)
from jpeft.methods.base import Call, Kind, Layout, Method, Site, static_field
from jpeft.peft_format import (add_site_pattern, config_from_peft, needs_peft, overlap_fix, peft_key, site_tensors,
                                warn_overlapping_patterns)
from jpeft.tree import compile_pattern, hf_name, regex_fullmatch


# -- shapes and layouts -----------------------------------------------------------------------

def window(lay: Layout) -> tuple:
    """The spatial window of a convolution kernel (``()`` for every other layout)."""
    return tuple(lay.kernel_shape[:-2]) if lay.kind == Kind.CONV else ()


def in_channels(lay: Layout) -> int:
    """Input channels of a convolution, input features otherwise (PyTorch's ``weight.shape[1]``
    before the window)."""
    return int(lay.kernel_shape[-2]) if lay.kind == Kind.CONV else lay.in_features


def torch_shape(lay: Layout) -> tuple:
    """The shape PyTorch gives this module's weight: ``(out, in)``, or ``(out, in, *window)``
    for a convolution (flax's conv kernel is ``(*window, in, out)``)."""
    return (lay.out_features, in_channels(lay)) + window(lay)


def kernel_from_torch(delta, lay: Layout):
    """A weight update in PyTorch's shape (:func:`torch_shape`, or anything of that size) laid
    out as the module's kernel."""
    delta = delta.reshape(torch_shape(lay))
    if lay.kind == Kind.CONV:
        nd = delta.ndim
        return jnp.transpose(delta, tuple(range(2, nd)) + (1, 0))
    mat = delta.T  # [in, out] in the layout's input / output axis order
    order = tuple(lay.in_axes) + tuple(lay.out_axes)
    inv = tuple(int(i) for i in np.argsort(order))
    return jnp.transpose(mat.reshape(tuple(lay.in_dims) + tuple(lay.out_dims)), inv)


def matrix_from_torch(delta, lay: Layout):
    """The update as the matrix ``[in_features, out_features]`` (kernel input axes first, in
    layout order): the effective weight delta of a site in jpeft's matrix view."""
    return to_matrix(kernel_from_torch(delta, lay), lay)


def kaiming_bound(shape: tuple) -> float:
    """The bound of ``torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5))`` for a tensor of
    PyTorch shape ``shape``: ``1/sqrt(fan_in)`` with ``fan_in = shape[1] * prod(shape[2:])``."""
    fan_in = int(shape[1]) * int(math.prod(shape[2:])) if len(shape) > 1 else int(shape[0])
    return 1.0 / math.sqrt(fan_in)


def kaiming_uniform(key, shapes: Mapping[str, tuple], zero=()) -> dict:
    """``{name: array}``: each tensor of PyTorch shape ``shapes[name]`` uniform in
    ``+-kaiming_bound(shape)`` (PEFT's ``kaiming_uniform_(a=sqrt(5))``), those named in ``zero``
    zero. One jitted program per site signature draws all of a site's tensors (eager, every
    slice and random draw of each shape would compile on its own)."""
    spec = tuple((n, tuple(int(d) for d in s), n in zero) for n, s in shapes.items())
    return dict(zip(shapes, _draw(key, spec)))


@functools.partial(jax.jit, static_argnums=1)
def _draw(key, spec):
    total = sum(math.prod(s) for _, s, _ in spec)
    u = jax.random.uniform(key, (total,), jnp.float32, -1.0, 1.0)
    out, at = [], 0
    for _, s, is_zero in spec:
        n = math.prod(s)
        out.append(jnp.zeros(s, jnp.float32) if is_zero else u[at:at + n].reshape(s) * kaiming_bound(s))
        at += n
    return out


def check_site(path: str, lay: Layout, method: str) -> None:
    """Refuses the layouts PEFT's LyCORIS layers do not have: embeddings and convolutions
    with more than two spatial axes (PEFT adapts Linear, Conv1d and Conv2d)."""
    if lay.kind == Kind.EMBED:
        raise UnsupportedModuleError(
            f"module {path!r} is an embedding; {method} adapts linear and convolution modules, as in Hugging Face "
            "PEFT (which has no embedding layer for it). Remove it from target_modules."
        )
    if lay.kind == Kind.CONV and len(window(lay)) > 2:
        raise UnsupportedModuleError(
            f"module {path!r} is a {len(window(lay))}-D convolution; {method} adapts 1-D and 2-D convolutions, as "
            "Hugging Face PEFT does (Conv1d, Conv2d). Remove it from target_modules."
        )


# -- config -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LycorisConfig(AdapterConfig):
    """Fields LoHa and LoKr share (Hugging Face PEFT's ``LycorisConfig`` and the fields both
    tuners' configs declare), with PEFT's names and defaults (``r=8``, ``alpha=8``); the
    target default is PEFT's for Llama (``q_proj``, ``v_proj``)."""

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    target_modules: Any = ("q_proj", "v_proj")
    init_weights: Any = True
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)

    _init_values: ClassVar[tuple] = (True, False)
    _ordered_fields: ClassVar[tuple] = ("rank_pattern", "alpha_pattern")  # first matching key wins

    def __post_init__(self):
        name = type(self).__name__
        self._set_targets("give a regex or a list of module names such as ['q_proj', 'v_proj']")
        if not _positive_int(self.r):
            raise ConfigError(f"{name}.r must be a positive integer, found {self.r!r}. Typical values: 4 to 32.")
        if not is_positive_number(self.alpha):
            raise ConfigError(f"{name}.alpha must be > 0 and finite, found {self.alpha!r}; the update is scaled "
                              "by alpha / r.")
        for f in ("rank_dropout", "module_dropout"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
                raise ConfigError(f"{name}.{f} must be in [0, 1), found {v!r}.")
        if not isinstance(self.use_effective_conv2d, bool):
            raise ConfigError(f"{name}.use_effective_conv2d must be true or false, found {self.use_effective_conv2d!r}.")
        if not any(self.init_weights is v or (isinstance(v, str) and self.init_weights == v) for v in self._init_values):
            raise ConfigError(f"{name}.init_weights must be one of {list(self._init_values)}, found "
                              f"{self.init_weights!r}.")
        for f, ok, what in (("rank_pattern", _positive_int, "a positive integer"),
                            ("alpha_pattern", is_positive_number, "a positive finite number")):
            v = getattr(self, f)
            if v is not None and not isinstance(v, Mapping):
                raise ConfigError(f"{name}.{f} must be a dict {{module regex: value}}, found {type(v).__name__}.")
            object.__setattr__(self, f, {k: python_scalar(x) for k, x in (v or {}).items()})
            for k, val in getattr(self, f).items():
                compile_pattern(k)  # an invalid regex (or a key of another type) is a ConfigError
                if not ok(val):
                    raise ConfigError(f"{name}.{f}[{k!r}] must be {what}, found {val!r}.")

    def _hash_fields(self) -> tuple:
        return tuple(tuple(sorted(v.items())) if isinstance(v, dict) else v
                     for v in (getattr(self, f.name) for f in dataclasses.fields(self)))

    def __hash__(self):
        return hash((type(self).__name__,) + self._hash_fields())

    def rank_alpha(self, path: str) -> tuple[int, float]:
        """``(r, alpha)`` of one module: the first ``rank_pattern`` / ``alpha_pattern`` key that
        matches the end of its Hugging Face name (PEFT's ``get_pattern_key``:
        ``(.*\\.)?(key)`` in full), else ``r`` / ``alpha``."""
        name = hf_name(path)

        def lookup(pattern, default):
            for key, val in pattern.items():
                if regex_fullmatch(rf"(.*\.)?({key})", name):
                    return val
            return default

        return int(lookup(self.rank_pattern, self.r)), float(lookup(self.alpha_pattern, self.alpha))

    def saved_config(self, adapter) -> "LycorisConfig":
        """The config :func:`jpeft.save_adapter` (and a checkpoint) records: this one, or, where a
        site's scale is not this config's ``alpha / r`` for it (sites made with another alpha, or
        patterns changed since), one whose exact ``rank_pattern`` / ``alpha_pattern`` keys give each
        site its own (:func:`site_patterns`, as :func:`to_hf` writes them for PEFT), so that
        :func:`jpeft.load_adapter` rebuilds the scale the adapter was trained with. A layer-scanned
        adapter is recorded as it is (its stacked sites' names match no layer's key)."""
        if any(not isinstance(n, LycorisSite) for n in adapter.values()):
            return self
        scales = {p: self.rank_alpha(p) for p in adapter}
        if all(math.isclose(float(adapter[p].scale), a / r, rel_tol=1e-6) for p, (r, a) in scales.items()):
            return self
        rank_pattern, alpha_pattern = site_patterns(self, adapter)
        return dataclasses.replace(self, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)

    def effective_conv(self, lay: Layout) -> bool:
        """PEFT's ``use_effective_conv2d``, which it turns off for linear layers and for
        convolutions whose window is a single position (1x1)."""
        return bool(self.use_effective_conv2d) and lay.kind == Kind.CONV and math.prod(window(lay)) != 1


def _positive_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0


# -- the site node ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LycorisSite(AdditiveMerge, Site):
    """Skeleton of a LoHa / LoKr site: subclasses hold their tensors (PyTorch orientation) as
    pytree children and define :meth:`torch_delta`. Static fields: the module layout, the scale
    ``alpha / r`` and PEFT's two training-time dropouts.

    Forward: ``y = f(x; W) + f(x; dW)`` where ``f`` is the module itself run on the update as
    its kernel, without bias, as PEFT's layers add ``F.linear(x, dW)`` / ``F.conv2d(x, dW, ...)``
    to the base output. For ``nn.Dense`` the method's :meth:`dense_update` computes ``x @ dW``
    from the factors where that is cheaper than forming ``dW`` (the design's "factored while
    training"; a full-size ``dW`` is then only built by merge). With
    ``rngs={"dropout": key}`` given to :func:`jpeft.apply`, ``rank_dropout`` zeroes random
    output rows of ``dW`` and ``module_dropout`` skips the whole update, as PEFT does in training
    mode (LoHa rescales the kept rows by their mean; LoKr only with ``rank_dropout_scale``).
    """

    layout: Layout = static_field(default=None)
    scale: float = static_field(default=1.0)
    rank_dropout: float = static_field(default=0.0)
    module_dropout: float = static_field(default=0.0)

    site: ClassVar[str] = "linear"
    mergeable: ClassVar[bool] = True
    #: LoHa always rescales rank dropout's kept rows by their mean; LoKr when rank_dropout_scale.
    rescale_rank_dropout: ClassVar[bool] = True

    def delta_matrix(self):
        """``dW`` as ``[in, out]`` float32 (used by merge; the forward uses the kernel form)."""
        return matrix_from_torch(self.torch_delta(), self.layout)

    def kernel_delta(self, dtype=jnp.float32):
        """``dW`` in the kernel's own shape and axis order."""
        return kernel_from_torch(self.torch_delta(), self.layout).astype(dtype)

    # -- checks
    def check_params(self, path: str, own: Mapping[str, Any]) -> None:
        self.layout.check_params(path, own, what=f"{type(self).__name__} adapter")

    # -- forward
    def dense_update(self, x2):
        """``x2 @ dW`` for ``x2: [tokens, in]`` (an ``nn.Dense`` call) computed from the factors
        without forming ``dW``, or ``None`` where forming ``dW`` is cheaper (then the forward
        uses :meth:`kernel_delta`). Subclasses override it; output columns in PyTorch's row order."""
        return None

    def _dropout(self, key, n_out: int):
        """``(row_scale, keep)``: PEFT's training-time rank dropout as a scale per output row
        (``None`` when off) and module dropout as a 0/1 scalar (``None`` when off)."""
        if key is None or (self.rank_dropout <= 0 and self.module_dropout <= 0):
            return None, None
        k_rank, k_module = jax.random.split(key)
        rows = keep = None
        if self.rank_dropout > 0:
            rows = jax.random.bernoulli(k_rank, 1.0 - self.rank_dropout, (n_out,)).astype(jnp.float32)
            if self.rescale_rank_dropout:  # PEFT divides by the kept share; all rows dropped gives 0, not NaN
                mean = jnp.mean(rows)
                rows = jnp.where(mean > 0, rows / jnp.where(mean > 0, mean, 1.0), 0.0)
        if self.module_dropout > 0:
            keep = jax.random.bernoulli(k_module, 1.0 - self.module_dropout).astype(jnp.float32)
        return rows, keep

    def intercept(self, call: Call):
        lay = self.layout
        _inject.check_layout(call.path, lay, call.module, call.args, call.kwargs)
        y = call.run()
        # the update in the adapter's dtype (float32) and one rounding of the sum, as PEFT (branch_dtype)
        dt = branch_dtype(y.dtype, *jax.tree.leaves(self))
        key = call.dropout_key() if (self.rank_dropout > 0 or self.module_dropout > 0) else None
        rows, keep = self._dropout(key, lay.out_features)
        x = call.inputs
        if lay.kind == Kind.DENSE:
            x2 = x.astype(dt).reshape(-1, x.shape[-1])
            d = self.dense_update(x2)
            if d is None:
                d = x2 @ self.kernel_delta(dt)
            if rows is not None:
                d = d * rows.astype(dt).reshape(1, -1)
            if keep is not None:
                d = d * keep.astype(dt)
            return (y.astype(dt) + d.reshape(y.shape)).astype(y.dtype)
        delta = self.torch_delta()
        if rows is not None:
            delta = delta * rows.reshape((-1,) + (1,) * (delta.ndim - 1))
        if keep is not None:
            delta = delta * keep
        helper = _inject.update_module(call.module, dtype=dt)
        with _inject.bypass():
            d = helper.apply({"params": {"kernel": kernel_from_torch(delta, lay).astype(dt)}},
                             *call.args, **call.kwargs)
        return (y.astype(dt) + d).astype(y.dtype)

    def effective(self, own):
        """L2-SP's effective weights: the update ``dW`` in the kernel's shape (it is additive)."""
        return self.kernel_delta()


# -- init -------------------------------------------------------------------------------------

def init_sites(config: LycorisConfig, params, key, infos, *, method: str,
               make_node: Callable[[LycorisConfig, Layout, int, float, Any], Site]) -> dict:
    """``{path: node}`` for every module ``config.target_modules`` selects:
    ``make_node(config, layout, r, alpha, key)`` per site (stacked per layer for a scanned
    model), keys assigned in sorted path order."""
    leaves, paths = linear_targets(config.target_modules, params)
    out = {}
    for k, path in zip(jax.random.split(key, len(paths)), paths):
        lay = linear_layout(path, leaves[path], infos)
        check_site(path, lay, method)
        r, alpha = scan.site_rank_alpha(config, path, lay, leaves[path])
        out[path] = scan.make_site(lambda kk, own, lay=lay, r=r, alpha=alpha: make_node(config, lay, r, alpha, kk),
                                   path, lay, k, leaves[path], config)
    return out


# -- Hugging Face PEFT format -----------------------------------------------------------------

def site_patterns(config: LycorisConfig, sites) -> tuple[dict, dict]:
    """``(rank_pattern, alpha_pattern)`` with one exact key per site whose rank or alpha is not
    ``config.r`` / ``config.alpha``: the rank ``config`` gives the module's name (the one its
    tensors were built with) and the alpha that makes ``alpha / r`` the site's own scale."""
    rank_pattern, alpha_pattern = {}, {}
    for path in sorted(sites):
        r_site = config.rank_alpha(path)[0]
        add_site_pattern(rank_pattern, alpha_pattern, path, r_site, float(sites[path].scale) * r_site, config)
    return rank_pattern, alpha_pattern


def to_hf(config: LycorisConfig, adapter, ctx, *, tensor_names: tuple, name: str,
          make_node: Callable[[LycorisConfig, Layout, int, float, Any], Site]):
    """``(adapter_config dict, tensors)`` for PEFT: each site's tensors under
    ``base_model.model.<name>.<tensor>`` as they are (they are stored in PyTorch's orientation
    already). ``nn.Dense`` sites (the layers of jpeft.models, which PEFT builds as Linear) and 1-D /
    2-D ``nn.Conv`` sites (PEFT's Conv1d / Conv2d layers); a file with a circular- or reflect-padded
    conv records ``peft_version`` 0.22.0 and warns (:attr:`Layout.peft_padding_differs`: PEFT 0.21
    zero-pads the update).

    ``rank_pattern`` / ``alpha_pattern`` are written from the sites themselves (one exact key per
    module whose rank or alpha is not the config's default, as the LoRA exporter does), so PEFT
    rebuilds each site's own scale whatever the config's patterns (their order, which PEFT's
    first-match rule depends on, is not kept by the sorted JSON), and a site whose tensors are
    not what ``config`` builds for it is refused."""
    tensors, targets, padded = {}, [], {}
    for path in sorted(adapter):
        node = adapter[path]
        check_conv_for_peft(path, node.layout, name, (1, 2))
        if node.layout.peft_padding_differs is not None:
            padded[path] = node.layout.peft_padding_differs
        if ctx.fan_in_fan_out:
            raise UnsupportedAdapterError(
                f"{type(config).__name__} site {path!r} is a GPT-2 Conv1D layer (fan_in_fan_out): Hugging Face PEFT's "
                f"{config.peft_type} has no Conv1D layer, so it cannot load the adapter. Target another model's Linear layers."
            )
        r_site, alpha_cfg = config.rank_alpha(path)  # what PEFT derives for this module's name
        want = jax.eval_shape(lambda: make_node(config, node.layout, r_site, alpha_cfg, jax.random.key(0)))
        want_shapes = {n: tuple(getattr(want, n).shape) for n in tensor_names if getattr(want, n) is not None}
        got_shapes = {n: tuple(getattr(node, n).shape) for n in tensor_names if getattr(node, n) is not None}
        if got_shapes != want_shapes:
            raise UnsupportedAdapterError(
                f"{type(config).__name__} site {path!r} holds {got_shapes}, but the config given to save_peft builds "
                f"{want_shapes} for it (r={r_site} and the factorisation options), so PEFT could not load it as saved. "
                "Save with the config the adapter was made with."
            )
        for t in tensor_names:
            v = getattr(node, t)
            if v is not None:
                tensors[peft_key(path, t)] = np.asarray(v, np.float32)
        targets.append(hf_name(path))
    rank_pattern, alpha_pattern = site_patterns(config, adapter)  # each site's own alpha: PEFT's alpha / r is its scale
    d = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    d.update(target_modules=targets, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
             exclude_modules=None, layers_to_transform=None, layers_pattern=None, modules_to_save=None)
    needs_peft(d, PEFT_CONV_FORWARD, padded, f"their nn.Conv has {' / '.join(sorted(set(padded.values())))}, and PEFT "
               f"0.21 adds {name}'s conv update zero-padded (F.conv1d / F.conv2d), PEFT 0.22 through the "
               "base's own padding, as jpeft")
    return d, tensors


def from_hf(d, tensors, params, ctx, *, config_cls: type, tensor_names: tuple, method: str,
            make_node: Callable[[LycorisConfig, Layout, int, float, Any], Site]):
    """``(config, adapter)`` from a PEFT folder's config dict and tensors. Each site's tensors
    must be exactly those ``config`` gives that module (names and shapes, found by building the
    site under :func:`jax.eval_shape`); anything else names the mismatch."""
    if set(d.get("modules_to_save") or ()) - set(HEAD_MODULES):  # a task head's copy: checked by jpeft.hf
        raise UnsupportedAdapterError(
            f"the {method} adapter in {ctx.folder!r} has modules_to_save={d['modules_to_save']}; jpeft loads plain "
            f"{method} only (no trainable module copies)."
        )
    names = {f.name for f in dataclasses.fields(config_cls)}
    kept = {k: v for k, v in d.items() if k in names or k in config_cls._unsupported_hf_options}
    kept.pop("modules_to_save", None)
    if kept.get("target_modules") is None:
        raise UnsupportedAdapterError(f"the {method} adapter in {ctx.folder!r} has target_modules=null; set it explicitly.")
    for k in ("rank_pattern", "alpha_pattern"):
        if kept.get(k) is None:
            kept[k] = {}
    config = config_from_peft(config_cls, kept, ctx.folder)
    by_site = site_tensors(tensors, tensor_names, ctx.leaves, config.target_modules)
    warn_overlapping_patterns(d, by_site, ctx.folder)
    adapter = {}
    for path, got in sorted(by_site.items()):
        lay = peft_padded_conv_layout(path, ctx.leaves[path], ctx, method, "Conv1d/2d")
        check_site(path, lay, method)
        r, alpha = config.rank_alpha(path)
        want = jax.eval_shape(lambda: make_node(config, lay, r, alpha, jax.random.key(0)))
        want_shapes = {n: tuple(getattr(want, n).shape) for n in tensor_names if getattr(want, n) is not None}
        got_shapes = {n: tuple(v.shape) for n, v in got.items()}
        if got_shapes != want_shapes:
            err = BaseMismatchError if set(got_shapes) == set(want_shapes) else CheckpointError
            raise err(
                f"{method} site {hf_name(path)!r}: the file holds {got_shapes}, but the config (r={r}, and the "
                f"factorisation options) gives a module mapping {lay.in_features} -> {lay.out_features} features the "
                f"tensors {want_shapes}." + (overlap_fix(config.rank_pattern, path)
                                             or " Was the adapter made for another base model or with other options?")
            )
        arrays = {n: jnp.asarray(got[n], ctx.dtype) for n in want_shapes}
        adapter[path] = dataclasses.replace(want, **arrays)
    return config, adapter


# -- the Method record --------------------------------------------------------------------------

def method(config_cls: type, node_cls: type, name: str, tensor_names: tuple,
           make_node: Callable[[LycorisConfig, Layout, int, float, Any], Site]) -> Method:
    """The :class:`~jpeft.methods.base.Method` record of a LyCORIS method (the method file
    registers it): sites from :func:`init_sites`, the PEFT format from :func:`to_hf` /
    :func:`from_hf`, all driven by ``make_node`` and the PEFT ``tensor_names``, and a budget
    row with PEFT's defaults (r=8, alpha=8) on PEFT's default targets (LoRA's)."""

    def init(config, params, key, infos) -> dict:
        return init_sites(config, params, key, infos, method=name, make_node=make_node)

    def _to_hf(config, adapter, ctx):
        return to_hf(config, adapter, ctx, tensor_names=tensor_names, name=name, make_node=make_node)

    def _from_hf(d, tensors, params, ctx):
        return from_hf(d, tensors, params, ctx, config_cls=config_cls, tensor_names=tensor_names, method=name,
                       make_node=make_node)

    def budget_rows(model_type: str, targets):
        qv = targets["lora"]
        return [(name, f"r=8, alpha=8, {'+'.join(qv)}", lambda: config_cls(r=8, alpha=8, target_modules=qv))]

    return Method(config=config_cls, init=init, nodes=(node_cls,), to_hf=_to_hf, from_hf=_from_hf, budget=budget_rows)
