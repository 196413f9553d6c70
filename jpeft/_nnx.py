"""The one place that knows how to put adapter nodes into ``flax.nnx`` models.

NNX has no ``intercept_methods``. The adapted forward pass is therefore a pure function of
``(graphdef, state, adapter, inputs)`` that builds a *fresh* module with ``nnx.merge`` and,
in that throw-away copy only, puts a small proxy (:class:`_SiteProxy`) in place of each targeted
submodule; the user's module is never touched. The proxy hands the call to the node through
the same :class:`~jpeft.methods.base.Call` the linen interceptor builds, so every method's
math (LoRA, DoRA, IA3, ...) is the one written for linen: the call's ``module`` is the
module's *linen twin* (``nnx.Linear`` -> ``nn.Dense``, ``nnx.LinearGeneral`` ->
``nn.DenseGeneral``, ``nnx.Einsum`` -> ``nn.Einsum``, ``nnx.Conv`` -> ``nn.Conv``,
``nnx.Embed`` -> ``nn.Embed``, the norms for LN tuning) bound to the NNX module's own
parameters, and its ``next_fun`` is the NNX module's own method, so the base output is
exactly what the NNX model computes. ``tests/test_nnx.py`` checks each twin against its
NNX module.

This module imports ``flax.nnx``, so it is imported where an NNX value has been found
(``jpeft.tree.is_nnx``, which needs no import), not when ``jpeft`` is (docs/ARCHITECTURE.md,
"Start-up time").
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
from flax import nnx
from flax.nnx.nn import dtypes as _dtypes

from jpeft import _inject, _reads
from jpeft.errors import ConfigError, NotMergeableError, TargetNotFoundError, UnsupportedModuleError
from jpeft.methods.base import Call, ModuleInfo

_CONTAINERS = (nnx.List, nnx.Dict)


def split(model, state):
    """``(graphdef, state)`` from an ``nnx.Module`` (split here unless ``state`` is given) or a
    ``GraphDef`` and its state."""
    if isinstance(model, nnx.Module):
        graphdef, own = nnx.split(model)
        return graphdef, own if state is None else state
    if state is None:
        raise ConfigError(
            "jpeft got an nnx.GraphDef without its state; pass both: graphdef, state = nnx.split(model), then "
            "jpeft.apply(graphdef, state, adapter, x)."
        )
    return model, state


def merge(graphdef, state, *, copy: bool = False):
    """``nnx.merge(graphdef, state)``, with a named error when the state is not the model's
    whole state (one part of a filtered ``nnx.split``), which flax reports as a leaf count."""
    try:
        return nnx.merge(graphdef, state, copy=copy)
    except ValueError as e:
        raise ConfigError(
            f"the NNX state does not fit the graphdef ({e}). jpeft takes the model's whole state: graphdef, state = "
            "nnx.split(model). From a filtered split (graphdef, params, rest = nnx.split(model, nnx.Param, ...)) pass "
            "nnx.merge_state(params, rest); only its nnx.Param leaves are the base jpeft reads and merges into."
        ) from e


# -- linen twins ------------------------------------------------------------------------------

def _same_promote(m) -> bool:
    return getattr(m, "promote_dtype", _dtypes.promote_dtype) is _dtypes.promote_dtype \
        and getattr(m, "preferred_element_type", None) is None


def _dot_general(m):
    fn = getattr(m, "dot_general", None)
    return None if fn is jax.lax.dot_general else fn


#: the NNX classes jpeft knows the linen twin of (subclasses that keep their computation too)
_TWINNED = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv, nnx.Embed, nnx.LayerNorm, nnx.RMSNorm)


def twin(module, path: str) -> Optional[nn.Module]:
    """The linen module that computes what the NNX ``module`` computes from the same
    parameters, or ``None`` when jpeft has none for its class. A module of one's own can
    name its twin with a ``linen_twin()`` method (jpeft's NNX Llama's ``RMSNorm`` does)."""
    if callable(getattr(type(module), "linen_twin", None)):
        return module.linen_twin()
    base, own = _inject.overridden(module, _TWINNED)
    if base is None:
        return None
    if own:
        raise UnsupportedModuleError(
            f"module {path!r}: {type(module).__name__} subclasses nnx.{base.__name__} with its own "
            f"{' and '.join(own)}, but jpeft's adapters compute with nnx.{base.__name__}'s function (its linen twin), "
            "so saved copies, merges and the adapted outputs would not be this module's. Give the class a "
            "linen_twin() method returning the linen module that computes what it computes (docs/NNX.md), set "
            f"same_function_as_base = {tuple(own)!r} on it if its {' and '.join(own)} computes "
            f"nnx.{base.__name__}'s function, or remove it from target_modules."
        )
    if not _same_promote(module):
        raise UnsupportedModuleError(
            f"module {path!r}: an {type(module).__name__} with a custom promote_dtype or preferred_element_type is "
            "not supported by jpeft's adapters (their math assumes flax's default dtype promotion); remove it from "
            "target_modules."
        )
    m = module
    if isinstance(m, nnx.Linear):
        return nn.Dense(m.out_features, use_bias=m.use_bias, dtype=m.dtype, param_dtype=m.param_dtype,
                        precision=m.precision, dot_general=_dot_general(m), parent=None)
    if isinstance(m, nnx.LinearGeneral):
        if m.batch_axis:
            raise UnsupportedModuleError(
                f"module {path!r}: nnx.LinearGeneral with batch_axis={dict(m.batch_axis)!r} is not supported by "
                "jpeft's linear adapters; target the projections without batch axes."
            )
        return nn.DenseGeneral(m.out_features, axis=m.axis, use_bias=m.use_bias, dtype=m.dtype,
                               param_dtype=m.param_dtype, precision=m.precision, dot_general=_dot_general(m),
                               dot_general_cls=m.dot_general_cls, parent=None)
    if isinstance(m, nnx.Einsum):
        return nn.Einsum(m.kernel_shape, m.einsum_str, use_bias=m.bias_shape is not None, dtype=m.dtype,
                         param_dtype=m.param_dtype, precision=m.precision, parent=None)
    if isinstance(m, nnx.Conv):
        if m.conv_general_dilated is not jax.lax.conv_general_dilated:
            raise UnsupportedModuleError(
                f"module {path!r}: nnx.Conv with a custom conv_general_dilated is not supported; remove it from "
                "target_modules."
            )
        return nn.Conv(m.out_features, m.kernel_size, strides=m.strides, padding=m.padding,
                       input_dilation=m.input_dilation, kernel_dilation=m.kernel_dilation,
                       feature_group_count=m.feature_group_count, use_bias=m.use_bias, mask=m.mask, dtype=m.dtype,
                       param_dtype=m.param_dtype, precision=m.precision, parent=None)
    if isinstance(m, nnx.Embed):
        return nn.Embed(m.num_embeddings, m.features, dtype=m.dtype, param_dtype=m.param_dtype, parent=None)
    if isinstance(m, nnx.LayerNorm):
        return nn.LayerNorm(epsilon=m.epsilon, dtype=m.dtype, param_dtype=m.param_dtype, use_bias=m.use_bias,
                            use_scale=m.use_scale, reduction_axes=m.reduction_axes, feature_axes=m.feature_axes,
                            use_fast_variance=m.use_fast_variance, parent=None)
    return nn.RMSNorm(epsilon=m.epsilon, dtype=m.dtype, param_dtype=m.param_dtype, use_scale=m.use_scale,
                      reduction_axes=m.reduction_axes, feature_axes=m.feature_axes,
                      use_fast_variance=m.use_fast_variance, parent=None)


class _NoTwin:
    """Stands in for the linen module at a site whose NNX module has no linen twin: enough for
    nodes that only look at the params and the output (bottleneck adapters); anything else
    raises a named error instead of computing something else."""

    def __init__(self, module, path: str, own):
        self._cls = self.module_class = type(module).__name__  # module_class: named in _inject's refusals
        self._path = path
        self.variables = {"params": own}

    def has_rng(self, name) -> bool:
        return False

    def __getattr__(self, name):
        raise UnsupportedModuleError(
            f"module {self._path!r} is a {self._cls} module; the adapter at this site needs the module itself (its "
            f"{name!r}), which jpeft provides for nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv, nnx.Embed, "
            "nnx.LayerNorm and nnx.RMSNorm (and nnx.MultiHeadAttention's projections). Target one of those, or use a "
            "method acting on outputs (bottleneck adapters)."
        )


def _own_params(module) -> dict:
    own = {}
    for name, value in vars(module).items():
        if isinstance(value, nnx.Param):
            own[name] = value.get_value()
    return own


def _bound(module, path: str, own, rngs):
    tw = twin(module, path)
    if tw is None:
        return _NoTwin(module, path, own)
    return tw.bind({"params": own}, rngs=rngs)


# -- the proxies --------------------------------------------------------------------------------

class _SiteProxy:
    """In the throw-away copy, the stand-in for one targeted module: calls its node."""

    def __init__(self, module, path: str, node, ctx: "_Context"):
        self._module, self._path, self._node, self._ctx = module, path, node, ctx

    def __call__(self, *args, **kwargs):
        return self._run("__call__", args, kwargs)

    def __getattr__(self, name):
        attr = getattr(self._module, name)
        if inspect.ismethod(attr) and not name.startswith("_") and self._node.handles(name):
            return lambda *a, **k: self._run(name, a, k)
        return attr

    def _run(self, name: str, args, kwargs):
        fn = getattr(self._module, name)
        if not self._node.handles(name):
            return fn(*args, **kwargs)
        kwargs = dict(kwargs)
        sharding = kwargs.pop("out_sharding", None)

        def next_fun(*a, **k):
            return fn(*a, **k) if sharding is None else fn(*a, out_sharding=sharding, **k)

        bound = _bound(self._module, self._path, _own_params(self._module), self._ctx.rngs_for())
        if self._path not in self._ctx.checked:
            self._ctx.checked.add(self._path)
            self._node.check(self._path, bound)
            if getattr(self._node, "layout", None) is not None:  # the twin of an nnx.Einsum lacks its einsum_op
                _inject.check_kernel_fn(self._path, self._node.layout, self._module)
        return self._node.intercept(Call(bound, name, next_fun, tuple(args), kwargs, self._path))


class _Recorder:
    """In the traced copy, the stand-in for every module: records what ``init`` needs."""

    def __init__(self, module, path: str, record: dict, other: dict, scopes: _reads.Scopes):
        self._module, self._path, self._record, self._other, self._scopes = module, path, record, other, scopes

    def __call__(self, *args, **kwargs):
        with self._scopes.of(self._path):  # the module's own reads of its params (jpeft._reads)
            out = self._module(*args, **kwargs)
        if self._path not in self._record:
            self._record[self._path] = _info(self._module, self._path, args, kwargs, out)
        return out

    def __getattr__(self, name):
        attr = getattr(self._module, name)
        if inspect.ismethod(attr) and not name.startswith("_"):
            def method(*a, **k):
                self._other.setdefault(self._path, set()).add(name)
                with self._scopes.of(self._path):
                    return attr(*a, **k)
            return method
        return attr


def _shape(x):
    return jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype) if hasattr(v, "shape") else v, x)


def _info(module, path: str, args, kwargs, out) -> ModuleInfo:
    own = _own_params(module)
    layout, refusal, tw = None, None, None
    pname = "embedding" if isinstance(module, nnx.Embed) else "kernel"
    if pname in own:
        try:
            tw = twin(module, path)
            layout = None if tw is None else _inject.layout_of(tw, tuple(own[pname].shape), args, kwargs, path)
            if layout is not None:  # the NNX module's own function (an nnx.Einsum's einsum_op has no linen field)
                layout = dataclasses.replace(layout, kernel_fn=_inject.kernel_fn(module))
        except UnsupportedModuleError as e:  # refused when targeted (linear_layout), not for being in the model
            tw, refusal = None, str(e)
    return ModuleInfo(type(module).__name__, layout, _shape(out), _shape(args[0]) if args else None, refusal=refusal,
                      input_axes=None if tw is None else _inject.input_axes(tw, args, kwargs))


def _modules(root):
    """``{path: module}`` for every module in the graph (first path of a shared one)."""
    return {"/".join(str(c) for c in p): m for p, m in nnx.iter_graph(root) if isinstance(m, nnx.Module)}


def shared_params(root) -> dict[str, list[str]]:
    """``{module path: [other paths of its shared Params]}`` for every module one of whose
    Variables another module also holds (``self.b.kernel = self.a.kernel``): ``nnx.split``
    lists such a Variable once, under its first path, so only that module gets an adapter site,
    and folding the site into the shared kernel would change the other module too. A whole
    module shared under two names is not listed (every call of it is adapted)."""
    paths: dict[int, list[tuple]] = {}
    seen: set[int] = set()

    def walk(node, path):
        impl = nnx.graph.get_node_impl(node)
        if impl is None or id(node) in seen:
            return
        seen.add(id(node))
        for k, v in impl.node_dict(node).items():
            if isinstance(v, nnx.Variable):
                paths.setdefault(id(v), []).append(path + (k,))
            else:
                walk(v, path + (k,))

    walk(root, ())
    out: dict[str, list[str]] = {}
    for ps in paths.values():
        if len(ps) > 1:
            for p in ps:
                out.setdefault("/".join(map(str, p[:-1])), []).extend(
                    "/".join(map(str, q)) for q in ps if q != p)
    return out


def fold_module(model, paths, fold):
    """A new ``nnx.Module``: ``fold(state)`` of ``model``'s state merged back into its graph, for
    the functions that fold updates into the base weights (:func:`jpeft.merge`,
    :func:`jpeft.merging.merge_into_base`); ``paths`` are the adapted sites.

    Raises:
      NotMergeableError: a site is on a module whose weights another module also holds
        (:func:`shared_params`)."""
    shared = shared_params(model)
    tied = sorted(p for p in paths if p in shared)
    if tied:
        raise NotMergeableError(
            f"the adapter's site {tied[0]!r} is on a module whose weights another module also holds "
            f"({shared[tied[0]][:3]}): jpeft.apply adapts only {tied[0]!r}'s calls, but folding the update into the "
            "shared weight would change the other module's output too. Use jpeft.apply, or untie the weight."
        )
    graphdef, state = split(model, None)
    return nnx.merge(graphdef, fold(state))


def _swapped(value, wrap: Mapping[int, Any]):
    """``value`` with every module in ``wrap`` (by id) replaced by its proxy, through plain
    lists, tuples and dicts nested to any depth (``nnx.data([[block, ...], ...])``); ``value``
    itself when nothing in it changes. NNX containers (``nnx.List``, ``nnx.Dict``) are graph
    nodes of their own, handled as parents by :func:`_replace`."""
    if id(value) in wrap:
        return wrap[id(value)]
    if isinstance(value, (list, tuple)) and not isinstance(value, nnx.Pytree):
        items = [_swapped(v, wrap) for v in value]
        if all(a is b for a, b in zip(items, value)):
            return value
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, dict) and not isinstance(value, nnx.Pytree):
        items = {k: _swapped(v, wrap) for k, v in value.items()}
        if all(items[k] is v for k, v in value.items()):
            return value
        out = dict.copy(value) if type(value) is dict else type(value)(value)
        out.update(items)
        return out
    return value


def _replace(root, wrap: Mapping[int, Any]) -> None:
    """Points every reference to a module in ``wrap`` (by id) at its proxy, in the fresh copy only."""
    for _, parent in list(nnx.iter_graph(root)):
        if not isinstance(parent, nnx.Pytree):
            continue
        for name, value in list(vars(parent).items()):
            new = _swapped(value, wrap)
            if new is not value:
                object.__setattr__(parent, name, new)


#: ``fold_in`` data of the key the base model's RNG streams are reseeded from (the adapter's
#: dropout keys fold in 1, 2, ...).
_BASE_STREAMS = 0x7FFF_FFFF


class _Context:
    def __init__(self, rngs):
        self.checked: set = set()
        self._key = None if rngs is None else (rngs.get("dropout") if isinstance(rngs, Mapping) else rngs)
        self._count = 0

    def rngs_for(self):
        if self._key is None:
            return None
        self._count += 1
        return {"dropout": jax.random.fold_in(self._key, self._count)}


def apply_with(graphdef, state, adapter: Mapping[str, Any], *args, rngs=None, method: Any = "__call__", **kwargs):
    """The NNX model ``nnx.merge(graphdef, state)`` called on ``args`` with every adapter
    node at its site. Variables the call mutates (batch statistics, RNG counters) belong to
    the throw-away copy and are dropped: the result is the output only. Given a dropout key
    (``rngs``), the copy's RNG streams are reseeded from it, so the base model's own dropout
    draws a new mask for every key (its stored counter, never advanced, would repeat one)."""
    model = merge(graphdef, state, copy=True)  # the caller's state is never written to
    modules = _modules(model)
    ctx = _Context(rngs)
    if ctx._key is not None:
        tags = sorted({v.tag for _, v in nnx.iter_graph(model) if isinstance(v, nnx.RngStream)})
        if tags:
            base = jax.random.fold_in(ctx._key, _BASE_STREAMS)
            nnx.reseed(model, policy="match_shape", **{t: jax.random.fold_in(base, i) for i, t in enumerate(tags)})
    missing = [p for p in adapter if p not in modules]
    if missing:
        raise TargetNotFoundError(
            f"the adapter has sites {missing[:3]} that the NNX model does not have (its modules are e.g. "
            f"{sorted(modules)[:5]}). Was the adapter made for another model?"
        )
    for path, node in adapter.items():
        if getattr(node, "at_site", None) is not None:
            raise UnsupportedModuleError(
                f"the adapter's site {path!r} is a layer-stacked site (jpeft.scan.Stacked) made for a layer-scanned "
                "linen model; NNX models are adapted layer by layer. Convert it with jpeft.scan.unstack_adapter."
            )
    if "" in adapter and getattr(adapter[""], "site", None) in ("linear", "output", "module"):
        raise UnsupportedModuleError(
            f"the adapter has a {type(adapter['']).__name__} site at the model's root path '': the NNX model is itself "
            "the targeted module, and jpeft puts its stand-in for an adapted module inside a parent module. Wrap it "
            "in a module of your own (self.layer = nnx.Linear(...)) and target 'layer'."
        )
    if "" in adapter:
        raise UnsupportedModuleError(
            f"the adapter has a site at the model's root path '' (a {type(adapter['']).__name__}: "
            "full fine-tuning, prefix or prompt tuning), which acts on the whole linen model (its params, or the "
            "prefix_kv= / inputs_embeds= keywords of jpeft's models); an NNX model has no such hook. Use a method "
            "with sites at submodules (LoRA, DoRA, IA3, ...), or fine-tune the NNX model's state directly."
        )
    proxies = {path: _SiteProxy(modules[path], path, node, ctx) for path, node in adapter.items()}
    _replace(model, {id(modules[p]): proxy for p, proxy in proxies.items()})
    if isinstance(getattr(method, "__self__", None), nnx.Module):  # model.encode: bound to the caller's model,
        method = method.__func__  # which has no adapter; unbound as linen's apply unbinds it
    if callable(method):  # linen's form, method=Model.encode: called with the (adapted copy of the) model first
        fn = lambda *a, **k: method(model, *a, **k)  # noqa: E731
    elif method == "__call__":
        fn = model
    elif isinstance(method, str) and callable(getattr(model, method, None)):
        fn = getattr(model, method)
    else:
        raise ConfigError(
            f"method={method!r}: the NNX model ({type(model).__name__}) has no such method; pass the name of one "
            "(method=\"encode\") or the function (method=Model.encode)."
        )
    try:
        out = fn(*args, **kwargs)
    except (TypeError, ValueError) as e:
        if not _through_transform(e):
            raise
        raise UnsupportedModuleError(
            f"the NNX model's forward pass handed an adapted submodule (one of {sorted(adapter)[:3]}) to an NNX "
            "transform (nnx.remat, nnx.scan, nnx.vmap, nnx.jit, nnx.cond, ...), which jpeft's stand-in for an adapted "
            "module does not support (docs/NNX.md). Call the submodules directly inside the model, or use the linen "
            f"model (remat=True, scan_layers=True). Flax said: {e}"
        ) from e
    if adapter and not ctx.checked:
        raise TargetNotFoundError(
            f"none of the adapter's {len(adapter)} sites (e.g. {sorted(adapter)[:3]}) was called by the NNX model, so "
            "the output would be the bare base's. Was the adapter made for another model, or for a method the model "
            "does not call?"
        )
    return out


class _Tap:
    """In a throw-away copy, the stand-in for one module: keeps the first argument of each call."""

    def __init__(self, module, got: list):
        self._module, self._got = module, got

    def __call__(self, *args, **kwargs):
        if args:
            self._got.append(args[0])
        return self._module(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._module, name)


def call_inputs(graphdef, state, paths, *args, **kwargs) -> dict[str, list]:
    """:func:`jpeft._inject.call_inputs` for an NNX model: ``{path: [x, ...]}``, the first argument
    of every call of the modules at ``paths`` while ``nnx.merge(graphdef, state)`` runs on
    ``args`` (in a throw-away copy; traceable). For data-dependent inits (CorDA)."""
    model = merge(graphdef, state, copy=True)
    modules = _modules(model)
    got: dict[str, list] = {p: [] for p in paths}
    _replace(model, {id(modules[p]): _Tap(modules[p], got[p]) for p in got if p in modules})
    model(*args, **kwargs)
    return got


def _through_transform(e: Exception) -> bool:
    """Whether ``e`` is what flax raises when an NNX transform splits a module holding a
    :class:`_SiteProxy` (or, in :func:`trace`, a :class:`_Recorder`): the stand-in comes back
    as a traced leaf (``'DynamicJaxprTracer' object is not callable``) or is refused as an
    argument or output (a ``TypeError``, ``... _SiteProxy ... is not a valid JAX type``; from
    ``nnx.scan`` a ``ValueError``, ``Expected an array, got _Recorder``)."""
    msg = str(e)
    return "_SiteProxy" in msg or "_Recorder" in msg or "Tracer' object is not callable" in msg


def trace(graphdef, state, *args, **kwargs) -> dict[str, ModuleInfo]:
    """Runs the NNX model abstractly (``jax.eval_shape``, nothing computed) and records, for
    every module called, its class, kernel layout and output shape (as ``_inject.trace`` does
    for linen)."""
    record: dict[str, ModuleInfo] = {}
    other: dict[str, set] = {}
    scopes = _reads.Scopes()

    def run(s):
        model = merge(graphdef, s)
        modules = {p: m for p, m in _modules(model).items() if not isinstance(m, _CONTAINERS)}
        recs = {p: _Recorder(m, p, record, other, scopes) for p, m in modules.items()}
        root = recs.pop("", None)
        _replace(model, {id(modules[p]): r for p, r in recs.items()})
        y = (root if root is not None else model)(*args, **kwargs)
        return [leaf for leaf in jax.tree.leaves(y) if isinstance(leaf, jax.Array)]

    try:
        closed = _reads.traced(run, state)
    except (TypeError, ValueError) as e:
        if not _through_transform(e):
            raise
        raise UnsupportedModuleError(
            "jpeft.init traces the NNX model to read its modules' layouts and output widths, and the model's forward "
            "pass hands submodules to an NNX transform (nnx.remat, nnx.scan, nnx.vmap, nnx.jit, nnx.cond, ...), which "
            "jpeft's stand-ins for modules do not support (docs/NNX.md). Call jpeft.init without the model and example "
            f"input where the method allows it, call the submodules directly, or use the linen model. Flax said: {e}"
        ) from e
    infos = {p: info._replace(methods=frozenset(other.get(p, ()))) for p, info in record.items()}
    # the jaxpr's inputs are the state's leaves; an nnx.Param's is its array (jpeft._reads)
    params = [_reads.key_names(p) if isinstance(v, nnx.Param) else None
              for p, v in jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
              for _ in jax.tree.leaves(v)]
    for path, where in _reads.outside_reads(closed, _reads.owners_of(params, infos), scopes).items():
        infos[path] = infos[path]._replace(read_outside=tuple(where))
    return infos
