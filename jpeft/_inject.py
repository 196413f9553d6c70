"""The one place that knows about ``flax.linen.intercept_methods``.

Everything else in jpeft sees adapters as plain dicts ``{module_path: node}``; here each
module call made during ``model.apply`` is looked up by its path and handed to the node.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import sys
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes as _linen_dtypes
from flax.linen import module as _linen_module  # only the capture_intermediates filter of the apply in progress

from jpeft import _reads, quant, scan
from jpeft._ops import flat_dot_general
from jpeft.errors import LayoutError, TargetNotFoundError, UnsupportedModuleError
from jpeft.methods.base import Call, Kind, Layout, ModuleInfo, module_input
from jpeft.tree import unbox

_BYPASS = contextvars.ContextVar("jpeft_bypass", default=False)
# (path, node, check): set while a module with quantized params re-runs on its dequantized params
_REDIRECT = contextvars.ContextVar("jpeft_redirect", default=None)
# the path of the module that re-runs (a clone, whose submodules' own paths start at the clone)
_PREFIX = contextvars.ContextVar("jpeft_prefix", default="")


class bypass:
    """Context manager: module calls made inside run un-adapted (used by nodes that apply
    helper modules of their own)."""

    def __enter__(self):
        self._tok = _BYPASS.set(True)

    def __exit__(self, *exc):
        _BYPASS.reset(self._tok)


def module_path(module) -> str:
    try:
        return "/".join(str(p) for p in module.path)
    except Exception:  # unbound helper modules
        return ""


def _site_path(module) -> str:
    """The module's path in the whole model: inside a quantized module's re-run (a clone applied
    on its own) a submodule's path starts at the clone, so the re-run module's path goes first."""
    prefix, own = _PREFIX.get(), module_path(module)
    return "/".join(p for p in (prefix, own) if p)


def _flat_leaves(tree, prefix=()) -> dict:
    """``{key path: leaf}`` of a nested params dict (a module's own params and those of its
    submodules)."""
    out = {}
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            out.update(_flat_leaves(v, prefix + (k,)))
    else:
        out[prefix] = tree
    return out


def _flat_shapes(tree) -> dict:
    """``{key path: shape}`` of the arrays in a nested params dict."""
    return {k: tuple(v.shape) for k, v in _flat_leaves(tree).items() if hasattr(v, "shape")}


def _subtree(params, path: str):
    """The params dict at a module's path, or ``None`` where there is none."""
    node = params
    for comp in [c for c in path.split("/") if c]:
        if not isinstance(node, Mapping) or comp not in node:
            return None
        node = node[comp]
    return node if isinstance(node, Mapping) else None


def _outer_shapes(params, path: str):
    node = _subtree(params, path)
    return None if node is None else _flat_shapes(node)


def mapped_refusal(path: str, module, params) -> Optional[UnsupportedModuleError]:
    """The error for a module that runs inside ``nn.map_variables`` on a view of its params
    (``trans_in_fn``) other than the arrays stored at its path, else ``None``.

    An adapter acts on the kernel the module sees (``trans_in_fn(W)``), but :func:`jpeft.merge`
    folds it into the stored ``W`` and :func:`jpeft.init` reads the stored ``W`` (DoRA's norms,
    PiSSA's SVD): what ``trans_in_fn`` does jpeft cannot know, so the merged model would differ
    from the applied one. Told by the scope's ``debug_path`` (flax writes ``map_variables(name)``
    there) and by the module's params not being the very arrays ``params`` holds at ``path``
    (an identity ``trans_in_fn`` passes them through unchanged, jitted or not)."""
    return _view_refusal(path, _debug_path(module), _own_params(module), params)


def _debug_path(module) -> Optional[tuple]:
    try:
        return tuple(module.scope.debug_path)
    except Exception:  # unbound helper modules
        return None


def _view_refusal(path: str, debug: Optional[tuple], own_params, params) -> Optional[UnsupportedModuleError]:
    """:func:`mapped_refusal` of a module whose scope's ``debug_path`` and own params are given."""
    if debug is None or not any("map_variables(" in str(c) for c in debug) or params is None:
        return None
    own = _flat_leaves(own_params)
    stored = _flat_leaves(_subtree(params, path) or {})
    if all(k in stored and stored[k] is v for k, v in own.items()):
        return None
    return UnsupportedModuleError(
        f"module {path!r} runs inside nn.map_variables ({'/'.join(map(str, debug))}; nn.WeightNorm and "
        "nn.SpectralNorm wrap their layer in it), which hands it a transformed view of its params (trans_in_fn) "
        "instead of the arrays stored at its path. An adapter there would act on the view while jpeft.merge folds "
        "it into the stored params (and jpeft.init reads them), so the merged model would differ from the applied "
        "one. Apply the transform to the params yourself and call the module without the wrapper, or remove this "
        "module from target_modules."
    )


def _scanned_layers(path: str, module, params) -> Optional[int]:
    """The number of layers a module's params are stacked over when it runs inside a layer scan
    (the module sees one layer's slice of the stacked arrays the params hold at its path), else
    ``None``."""
    return _stacked_layers(path, _own_params(module), params)


def _stacked_layers(path: str, own_params, params) -> Optional[int]:
    """:func:`_scanned_layers` of a module whose own params are given."""
    outer = _outer_shapes(params, path) if params is not None else None
    if not outer:
        return None
    own = _flat_shapes(own_params)  # the module's own params and its submodules' (a bottleneck on a whole MLP block)
    stacked = [outer[k][0] for k, s in own.items() if k in outer and len(outer[k]) == len(s) + 1 and outer[k][1:] == s]
    return stacked[0] if stacked else None


def scanned_refusal(path: str, node_name: str, layers: int) -> UnsupportedModuleError:
    """The error for a per-layer node on a module inside a layer scan (raised by :func:`jpeft.apply`,
    and by a method's ``init`` that sees it in the traced model's :attr:`ModuleInfo.scanned_layers`)."""
    return UnsupportedModuleError(
        f"module {path!r} runs inside a layer scan (its params are stacked over {layers} layers), "
        f"but the adapter holds one {node_name} for it, which every layer would share. jpeft.init "
        "makes stacked (per-layer) sites when given the model (jpeft.init(config, params, key, model, x); prefix "
        "and prompt tuning act at the top level); a method that refuses them needs an unrolled model "
        "(scan_layers=False)."
    )


def _check_not_scanned(path: str, node, module, params) -> None:
    """A per-layer node met inside a layer scan would be shared by every layer; refuse."""
    n = _scanned_layers(path, module, params)
    if n is not None:
        raise scanned_refusal(path, type(node).__name__, n)


def _own_params(module) -> Mapping[str, Any]:
    try:
        return module.variables.get("params", {})
    except Exception:  # unbound helper modules
        return {}


def _dequantized_call(ctx, args, kwargs, redirect):
    """Runs the module's method on its own params dequantized (a clone applied to them), so
    one layer's kernel is dequantized at a time inside the traced step. The re-run's first
    call is handed to the adapter node at the original path (``_REDIRECT``).

    The re-run is a ``jax.checkpoint`` that saves nothing: the backward pass dequantizes the
    kernel again instead of keeping every layer's full-precision kernel alive from the forward
    pass to the backward pass (which would hold a dequantized copy of the model).

    The clone runs with the collections the caller's apply may change (``mutable=``, e.g.
    ``"intermediates"`` or ``"batch_stats"``) and its ``capture_intermediates`` filter, and what
    it wrote goes back into the module's own scope: a ``sow`` inside the module or its children
    was dropped with no word, and a child's ``batch_stats`` update raised flax's raw
    ``ModifyScopeVariableError``."""
    mod = ctx.module
    own = _own_params(mod)
    others = {k: v for k, v in mod.variables.items() if k not in ("params", scan.COLLECTION)}
    rng = mod.make_rng("dropout") if mod.has_rng("dropout") else None
    leaves, tree = jax.tree.flatten((args, kwargs))
    where = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array)]

    def run(own, rng, arrays):
        full = list(leaves)
        for i, x in zip(where, arrays):
            full[i] = x
        a, kw = jax.tree.unflatten(tree, full)
        variables = {**others, "params": {k: quant.dequantize_array(v) for k, v in own.items()}}
        with _redirected(redirect):
            return clone_apply(mod, variables, ctx.method_name, a, kw, rngs=None if rng is None else {"dropout": rng})

    arrays = [leaves[i] for i in where]
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((own, rng, arrays, redirect[1]))):
        run = jax.checkpoint(run, policy=jax.checkpoint_policies.nothing_saveable)
    # else: eager, nothing to differentiate (and a checkpoint would compile at every call)
    out, written = run(own, rng, arrays)
    write_back(mod, written)
    return out


def clone_apply(mod, variables, method_name: str, args, kwargs, rngs=None):
    """Re-runs ``mod``'s method on a clone applied to ``variables`` (a quantized module's
    dequantized params, a method's own copy of them), as the apply in progress would run it:
    with the collections it may change (``mutable=``, e.g. ``"intermediates"`` or
    ``"batch_stats"``) and its ``capture_intermediates`` filter. Returns ``(out, written)``,
    what the clone wrote, for :func:`write_back`; a clone applied with nothing mutable dropped a
    ``sow`` in the module or its children with no word, and a BatchNorm's ``batch_stats``
    update raised flax's raw ``ModifyScopeVariableError``. Nothing mutable: ``written`` is ``{}``."""
    scope = getattr(mod, "scope", None)
    mutable = scope.mutable if scope is not None else False
    out = mod.clone(parent=None).apply(variables, *args, method=method_name, mutable=mutable,
                                       capture_intermediates=_capture_below_root(scope.path if scope is not None else ()),
                                       rngs=rngs, **kwargs)
    return out if mutable is not False else (out, {})


def write_back(mod, written) -> None:
    """Puts what a :func:`clone_apply` re-run wrote into ``mod``'s own scope (not its params:
    the clone ran on another copy of them)."""
    for col, tree in written.items():
        if col not in ("params", scan.COLLECTION):
            for name, value in tree.items():
                mod.put_variable(col, name, value)


def rerun(mod, variables, method_name: str, args, kwargs, rngs=None, at: Optional[str] = None):
    """:func:`clone_apply` and :func:`write_back` in one: the output of ``mod``'s method run on
    ``variables``, what it wrote kept (a method's site that runs the module on its own params:
    ``modules_to_save``, full fine-tuning, LN tuning, trainable tokens). Call it inside
    :class:`bypass`, or give ``at``, the module's path: the re-run module itself then runs as it
    is, and the sites on its submodules act (their paths start at ``at``, as in a quantized
    module's re-run)."""
    with contextlib.nullcontext() if at is None else _redirected((at, None, False)):
        out, written = clone_apply(mod, variables, method_name, args, kwargs, rngs=rngs)
    write_back(mod, written)
    return out


@contextlib.contextmanager
def _redirected(redirect):
    """A re-run of the module at ``redirect[0]`` (``(path, node, check)``, see ``_REDIRECT``):
    its first call goes to ``node``, and its submodules' paths start at ``path``."""
    token, prefix = _REDIRECT.set(redirect), _PREFIX.set(redirect[0])
    try:
        yield
    finally:
        _PREFIX.reset(prefix)
        _REDIRECT.reset(token)


def _capture_below_root(prefix: tuple):
    """The ``capture_intermediates`` filter of the apply in progress, for a module's re-run
    (:func:`clone_apply`) at path ``prefix``: it captures its children's outputs; its own output
    is captured where it was called. The clone's children have paths that start at the clone
    (``("inner",)``), so while the filter runs their scope's path is put under ``prefix``
    (``("outer", "inner")``, as the apply in progress names them; a re-run inside a re-run adds
    each prefix in turn): a filter keyed on ``m.path`` captured nothing there, with no word."""
    stack = _linen_module._context.capture_stack
    outer = stack[-1] if stack else False
    if not outer:
        return False

    def capture(m, name):
        if not isinstance(m.parent, nn.Module):
            return False
        own = m.scope.path
        m.scope.path = tuple(prefix) + tuple(own)
        try:
            return outer(m, name)
        finally:
            m.scope.path = own

    return capture


def _interceptor(adapter: Mapping[str, Any], checked: set, params=None):
    methods_checked: set = set()  # (path, method) pairs whose override_refusal ran

    def intercept(next_fun, args, kwargs, ctx):
        if _BYPASS.get():
            return next_fun(*args, **kwargs)
        redirect = _REDIRECT.get()
        if redirect is not None and ctx.method_name == "setup":  # the clone's lazy setup: not the re-run call
            return next_fun(*args, **kwargs)
        if redirect is not None:  # a quantized module's re-run: its own method, at its original path
            _REDIRECT.set(None)
            path, node, check = redirect
            if node is None:
                return next_fun(*args, **kwargs)
            if check:
                node.check(path, ctx.module)
            return node.intercept(Call(ctx.module, ctx.method_name, next_fun, tuple(args), dict(kwargs), path))
        path = _site_path(ctx.module)
        node = adapter.get(path)
        if node is not None and not node.handles(ctx.method_name):
            if ctx.method_name == "attend":  # a site on the lookup, read through attend: check_called looks
                checked.add((path, "attend"))
            node = None
        check = False
        if node is not None:
            stacked = getattr(node, "at_site", None) is not None
            if stacked:  # a jpeft.scan.Stacked site: this layer's slice
                node = node.at_site(ctx.module, path)
            if path not in checked:
                checked.add(path)
                check = True
                if not stacked:
                    _check_not_scanned(path, node, ctx.module, params)
                if getattr(node, "mergeable", False) or getattr(node, "site", None) == "linear":  # folds into or reads the kernel
                    err = mapped_refusal(path, ctx.module, params)
                    if err is not None:
                        raise err
            if getattr(node, "layout", None) is not None and (path, ctx.method_name) not in methods_checked:
                methods_checked.add((path, ctx.method_name))  # once per site and method, as the checks above
                # a linear site computes with the flax class's own function
                err = override_refusal(path, ctx.module, (ctx.method_name,))
                if err is not None:
                    raise err
        if any(quant.is_quantized(v) for v in _own_params(ctx.module).values()):
            return _dequantized_call(ctx, args, kwargs, (path, node, check))
        if node is None:
            return next_fun(*args, **kwargs)
        if check:
            node.check(path, ctx.module)
        return node.intercept(Call(ctx.module, ctx.method_name, next_fun, tuple(args), dict(kwargs), path))

    return intercept


def apply_with(model: nn.Module, variables, adapter, *args, called: Optional[set] = None, **kwargs):
    """``model.apply(variables, *args, **kwargs)`` with every adapter node at its site.

    ``called``: a set the paths of the sites this call ran are added to (and ``(path, "attend")``
    for a site's module read through ``attend``, which the site does not act on), for a caller
    that runs the model in parts (``method=``) and checks once, over all of them, with
    :func:`check_called`; without it, the check runs here."""
    stacked = scan.variables_for(adapter)
    if stacked:
        variables = {**variables, scan.COLLECTION: stacked}
    if "params" in variables:
        variables = {**variables, "params": quant.as_bytes(variables["params"])}
    checked: set = set() if called is None else called
    with nn.intercept_methods(_interceptor(adapter, checked, variables.get("params"))):
        out = model.apply(variables, *args, **kwargs)
    if called is None:
        check_called(adapter, checked, variables.get("params"))
    return out


_LAYOUT_HINT = ("A layer-scanned model (scan_layers=True) names its layers 'model/layers/...', an unrolled one "
                "'model/layers_0/...'; convert with jpeft.scan.stack_adapter / unstack_adapter.")


def _has_module(params, path: str) -> bool:
    node = params
    for comp in [c for c in path.split("/") if c]:
        if not isinstance(node, Mapping) or comp not in node:
            return False
        node = node[comp]
    return True


def check_called(adapter, checked: set, params=None) -> None:
    """Raises :class:`TargetNotFoundError` when ``adapter`` has sites and none of them ran, or
    (given the model's ``params``) when a site that did not run names a module the params do
    not have: it would be left out silently while the others act (an unrolled model's
    per-layer sites next to a top-level one, on a layer-scanned model); and
    :class:`UnsupportedModuleError` for a site on an embedding's lookup whose module the call
    read through ``attend`` only (an adapter made from params alone, without the model
    :func:`jpeft.init` refuses it with): the site never acted, its arrays got no gradient."""
    attend_only = sorted({c[0] for c in checked if isinstance(c, tuple)} - checked)
    if attend_only:
        raise UnsupportedModuleError(
            f"the adapter's site {attend_only[0]!r} acts on the embedding's lookup, but this call read that embedding "
            "through attend only (as an output projection, e.g. class embeddings), so the site never acted: its "
            "arrays would get no gradient, and jpeft.merge would still fold them into the table attend reads. "
            "jpeft.init refuses such a site when given the model; the adapter was made from the params alone. "
            "To fix: make it with LoraConfig(ensure_weight_tying=True) (the LoRA or modules_to_save copy then acts on "
            "attend too), or remove the module from the config's target_modules / modules_to_save / "
            "trainable_token_indices." + (f" Also: {attend_only[1:4]}." if len(attend_only) > 1 else ""))
    checked = {c for c in checked if isinstance(c, str)}
    if adapter and not checked:
        raise TargetNotFoundError(
            f"none of the adapter's {len(adapter)} sites (e.g. {sorted(adapter)[:3]}) was called by the model, so "
            "the output would be the bare base's. Was the adapter made for another model? " + _LAYOUT_HINT
        )
    if not adapter or not isinstance(params, Mapping):
        return
    missing = sorted(p for p in set(adapter) - set(checked) if not _has_module(params, p))
    if missing:
        raise TargetNotFoundError(
            f"{len(missing)} of the adapter's {len(adapter)} sites (e.g. {missing[:3]}) name modules this model's "
            "params do not have, so they would be left out while the other sites act. Was the adapter made for "
            "another model? " + _LAYOUT_HINT
        )


def normalize_axes(axis, ndim):
    """``axis`` as non-negative axes in increasing order, as ``nn.DenseGeneral`` normalizes them (its
    kernel's input axes follow that order, so ``axis=(-1, -2)`` has the kernel ``[x.shape[-2], x.shape[-1], ...]``)."""
    axis = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(sorted(a % ndim for a in axis))


def input_axes(module, args, kwargs) -> tuple | None:
    """The axes of a ``nn.Dense`` / ``nn.DenseGeneral`` call's input that its kernel contracts
    (non-negative, sorted), or ``None`` for other modules."""
    x = module_input(args, kwargs)
    ndim = getattr(x, "ndim", None)
    if ndim is None:
        return None
    if isinstance(module, nn.Dense):
        return (ndim - 1,)
    if isinstance(module, nn.DenseGeneral):
        axis = module.axis
        return tuple(sorted(a % ndim for a in ((axis,) if isinstance(axis, int) else axis)))
    return None


#: the flax classes whose own functions the linear adapters compute with (:func:`layout_of`)
LINEAR_CLASSES = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.Einsum, nn.Embed)


def overridden(module, bases, names=("__call__", "attend")) -> tuple[Optional[type], list[str]]:
    """``(base, methods)``: the first class of ``bases`` that ``module`` is an instance of (``None``:
    none), and those of its ``names`` that ``module``'s class defines again. A class lists in
    ``same_function_as_base`` the methods it defines again that compute what the base's do
    (jpeft's models' ``Embed.attend``, a faster product of the same numbers)."""
    base = next((c for c in bases if isinstance(module, c)), None)
    if base is None:
        return None, []
    same = tuple(getattr(type(module), "same_function_as_base", ()))
    return base, [n for n in names if n not in same and hasattr(base, n)
                  and getattr(type(module), n) is not getattr(base, n)]


def override_refusal(path: str, module, names=("__call__",)) -> Optional[UnsupportedModuleError]:
    """The error for a linear site on a subclass of a flax linear class that defines ``names``
    (of the methods the site adapts) again, else ``None``. The adapters add their update to,
    or scale, what the call returns, while :func:`jpeft.merge` folds it into the kernel that
    the flax class's own function reads: for a method of one's own (``2 * super().__call__(x)``)
    the two differ, and flax hands the adapter both the subclass's call and, through
    ``super()``, the flax class's, which adapted the output twice (LoRA 15.9 off the merged model)."""
    base, own = overridden(module, LINEAR_CLASSES, names)
    if not own:
        return None
    return UnsupportedModuleError(
        f"module {path!r}: {type(module).__name__} subclasses nn.{base.__name__} with its own "
        f"{' and '.join(own)}, but jpeft's linear adapters act on the kernel as nn.{base.__name__}'s own function "
        f"uses it (as jpeft.merge folds them into it), so the adapted outputs would not be this module's with the "
        f"merged kernel. Call an nn.{base.__name__} submodule from the class and target that one, set "
        f"same_function_as_base = {tuple(own)!r} on the class if its {' and '.join(own)} computes what "
        f"nn.{base.__name__}'s does, or remove it from target_modules."
    )


#: the functions of its kernel a flax module computes with by default, and jpeft's own product over
#: flattened tokens: each computes the plain product of the kernel it is given
_TRANSPARENT = (jax.lax.dot_general, jax.lax.conv_general_dilated, jnp.einsum, flat_dot_general,
                _linen_dtypes.promote_dtype)
#: where NNX's default promote_dtype, transparent too, lives: looked up there, not imported, since only an NNX module
#: (and so an imported flax.nnx) can hold it (jpeft.tree.loaded_nnx; docs/ARCHITECTURE.md, "Start-up time")
_NNX_DTYPES = "flax.nnx.nn.dtypes"
#: the module fields holding such a function (a ``*_cls`` one, when set, is called for the function instead)
_KERNEL_FIELDS = ("promote_dtype", "dot_general_cls", "dot_general", "conv_general_dilated_cls",
                  "conv_general_dilated", "einsum_op")
_MARK = "__jpeft_transparent__"


def transparent_dot_general(fn):
    """Declares ``fn`` (a linear module's ``dot_general``, ``dot_general_cls``,
    ``conv_general_dilated``, ``einsum_op`` or ``promote_dtype``) to compute the plain product of
    the kernel it is given, as ``jax.lax.dot_general`` does (a precision, sharding or logging
    wrapper), so :func:`jpeft.merge` folds adapters into the kernels of modules built with it.
    Returns ``fn`` itself, marked (a function, class or ``functools.partial``), or a marked
    wrapper of an object that takes no attribute; usable as a decorator.

    Without it jpeft records, for every targeted module built with a function it does not know
    (:func:`kernel_fn`), that the adapter acts on what the function returns, and refuses to merge
    it (a fake-quantizing or kernel-scaling function would give another model).

    >>> import jax, jax.numpy as jnp, flax.linen as nn, jpeft
    >>> @jpeft.transparent_dot_general
    ... def highest(lhs, rhs, dims, precision=None, **kw):
    ...     return jax.lax.dot_general(lhs, rhs, dims, precision=jax.lax.Precision.HIGHEST, **kw)
    >>> model, x = nn.Dense(4, dot_general=highest), jnp.ones((2, 3))
    >>> params = model.init(jax.random.key(0), x)
    >>> cfg = jpeft.LoraConfig(r=2, target_modules=".*", init_weights="random")
    >>> adapter = jpeft.init(cfg, params, jax.random.key(1), model, x)
    >>> bool(jnp.allclose(model.apply(jpeft.merge(params, adapter), x), jpeft.apply(model, params, adapter, x), atol=1e-5))
    True
    """
    try:
        setattr(fn, _MARK, True)
        return fn
    except Exception:  # an object that takes no attribute (a builtin function): a marked wrapper
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            return fn(*args, **kwargs)

        setattr(wrapped, _MARK, True)
        return wrapped


def _transparent(fn) -> bool:
    if fn is None or getattr(fn, _MARK, False) is True:
        return True
    if isinstance(fn, functools.partial):  # functools.partial(jax.lax.dot_general, precision=...)
        return not fn.args and set(fn.keywords) <= {"precision", "preferred_element_type"} and _transparent(fn.func)
    nnx_dtypes = sys.modules.get(_NNX_DTYPES)
    return any(fn is f for f in _TRANSPARENT) or (nnx_dtypes is not None and fn is nnx_dtypes.promote_dtype)


def _fn_name(fn) -> str:
    if isinstance(fn, functools.partial):
        parts = [_fn_name(fn.func)] + ["..."] * len(fn.args) + [f"{k}=..." for k in fn.keywords]
        return f"functools.partial({', '.join(parts)})"
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    module = getattr(fn, "__module__", None)
    return f"{module}.{name}" if module and module != "builtins" else name


def kernel_fn(module) -> Optional[str]:
    """``"dot_general=<name>"``: the first function of its kernel a linear module (linen or NNX)
    computes with that jpeft does not know to compute the plain product of the kernel it is
    given (a fake-quantizing ``dot_general``, an AQT ``dot_general_cls``, a kernel-scaling
    ``einsum_op``), else ``None``. Known: flax's defaults, ``functools.partial`` of them with
    ``precision`` / ``preferred_element_type``, jpeft's ``flat_dot_general``, and every
    function declared with :func:`transparent_dot_general`."""
    called = set()  # the plain fields a set *_cls field stands in for
    for field in _KERNEL_FIELDS:
        fn = getattr(module, field, None)
        if field in called or fn is None:
            continue
        if field.endswith("_cls"):
            called.add(field[:-len("_cls")])
        if not _transparent(fn):
            return f"{field}={_fn_name(fn)}"
    return None


def update_module(module, **changes):
    """A clone of a linear module (unbound, without bias, with ``changes``) for an adapter's own
    product (LoRA's conv projection, LyCORIS's update through the module's layout). The module's
    own function of its kernel (:func:`kernel_fn`) is replaced by flax's plain one: it acts on the
    base kernel only, as PEFT runs its adapters beside a quantized base layer, and through it a
    fake-quantizing function rounded the update and zeroed its gradients (LoHa's, LoKr's, a conv
    LoRA's ``A``: never trained). Known and declared functions are kept (a precision wrapper)."""
    plain = {f: None for f in _KERNEL_FIELDS if f != "promote_dtype" and not _transparent(getattr(module, f, None))}
    if not _transparent(getattr(module, "promote_dtype", None)):
        plain["promote_dtype"] = _linen_dtypes.promote_dtype
    return module.clone(parent=None, name=None, use_bias=False, **plain, **changes)


def check_kernel_fn(path: str, layout: Layout, module) -> None:
    """At apply time: an adapter whose layout does not record the module's own function of its
    kernel (:func:`kernel_fn`; built from the params alone, which cannot show it) would be merged
    through that function later, without a word; refuse it here, where the module is seen."""
    fn = kernel_fn(module)
    if fn is None or layout.kernel_fn is not None:
        return
    raise LayoutError(
        f"module {path!r} computes with its own {fn}, which jpeft does not know to compute the plain product of the "
        "kernel it is given, but the adapter was built without seeing the module (from the params alone), so it does "
        "not record it: jpeft.apply adds the update to what the function returns, while jpeft.merge would fold it "
        "into the kernel the function transforms, and the merged model would differ. Build (or load) the adapter "
        "with the model: jpeft.init(config, params, key, model, x) or jpeft.load_adapter(folder, params, model, x) "
        "(jpeft.merge then refuses this site); or, if the function computes the plain product of the kernel, "
        "declare it with jpeft.transparent_dot_general(fn)."
    )


def _peft_conv_differs(module, window: tuple) -> tuple[Optional[str], Optional[str]]:
    """Why PEFT < 0.22 on the torch twin of the ``nn.Conv`` ``module`` computes another update than
    jpeft's: ``(for LoRA, for LoHa / LoKr / AdaLoRA)``, each ``None`` where it does not
    (:attr:`Layout.peft_lora_differs`, :attr:`Layout.peft_padding_differs`). jpeft runs each update
    through a conv with the module's own options, so its unmerged output equals its merged one.
    PEFT 0.21 builds LoRA's ``lora_A`` from the base's ``kernel_size``, ``stride`` and ``padding``
    alone, undilated and zero-padded, and adds LoHa's, LoKr's and AdaLoRA's update through
    ``F.conv1d`` / ``F.conv2d`` with the base's stride, padding and dilation, zero-padded; so where
    those differ from the module its unmerged model is neither jpeft's nor its own merged one.
    PEFT 0.22 runs them all with the base's dilation and ``padding_mode``, as jpeft does."""
    def per_axis(v):
        return (1,) * len(window) if v is None else (v,) * len(window) if isinstance(v, int) else tuple(v)

    why = []
    if any(d != 1 and w > 1 for d, w in zip(per_axis(module.kernel_dilation), window)):
        why.append(f"kernel_dilation={module.kernel_dilation!r} (torch's dilation)")
    if any(d != 1 for d in per_axis(module.input_dilation)):
        why.append(f"input_dilation={module.input_dilation!r}, which a torch ConvNd does not have")
    mode = module.padding.upper() if isinstance(module.padding, str) else None
    pads = None
    if mode in ("CIRCULAR", "REFLECT"):  # flax pads the input itself, as torch's padding_mode does
        pads = f"padding={mode!r} (torch's padding_mode={mode.lower()!r})"
        why.append(pads)
    return " and ".join(why) or None, pads


def layout_of(module, kernel_shape: tuple, args, kwargs, path: str) -> Layout | None:
    """The layout of a supported module instance, or ``None`` for modules without a kernel.

    Raises:
      UnsupportedModuleError: a module the linear adapters cannot adapt (a grouped or masked
        convolution, ``batch_dims``, a subclass with its own ``__call__``: :func:`override_refusal`)."""
    refusal = override_refusal(path, module)
    if refusal is not None:
        raise refusal
    fn = kernel_fn(module) if isinstance(module, LINEAR_CLASSES) else None  # (a stand-in answers no attribute)
    nd = len(kernel_shape)
    if isinstance(module, nn.Embed):
        return Layout(Kind.EMBED, kernel_shape, (0,), (1,), kernel_fn=fn)
    if isinstance(module, nn.Dense):
        return Layout(Kind.DENSE, kernel_shape, (0,), (1,), kernel_fn=fn)
    if isinstance(module, nn.DenseGeneral):
        if tuple(module.batch_dims) if not isinstance(module.batch_dims, int) else (module.batch_dims,):
            raise UnsupportedModuleError(
                f"module {path!r}: nn.DenseGeneral with batch_dims={module.batch_dims!r} is not supported "
                "by jpeft's linear adapters; target the projections without batch_dims."
            )
        axis = module.axis
        n_in = 1 if isinstance(axis, int) else len(axis)
        return Layout(Kind.DENSE_GENERAL, kernel_shape, tuple(range(n_in)), tuple(range(n_in, nd)), kernel_fn=fn)
    if isinstance(module, nn.Conv):
        if module.feature_group_count != 1:
            raise UnsupportedModuleError(
                f"module {path!r}: grouped convolutions (feature_group_count={module.feature_group_count}) "
                "are not supported by jpeft's linear adapters; exclude this module from target_modules."
            )
        if getattr(module, "mask", None) is not None:
            raise UnsupportedModuleError(
                f"module {path!r}: a masked convolution (nn.Conv(mask=...)) multiplies its kernel by the mask, which "
                "jpeft's linear adapters do not apply to their update; exclude this module from target_modules."
            )
        lora_differs, padding_differs = _peft_conv_differs(module, kernel_shape[:-2])
        return Layout(Kind.CONV, kernel_shape, tuple(range(nd - 1)), (nd - 1,), kernel_fn=fn,
                      peft_lora_differs=lora_differs, peft_padding_differs=padding_differs)
    if isinstance(module, nn.Einsum):
        eq = kwargs.get("einsum_str") or (args[1] if len(args) > 1 else None) or module.einsum_str
        eq = eq.replace(" ", "")
        lhs, out = eq.split("->")
        x_sub, k_sub = lhs.split(",")
        in_axes = tuple(i for i, c in enumerate(k_sub) if c in x_sub and c not in out)
        out_axes = tuple(i for i, c in enumerate(k_sub) if c in out and c not in x_sub)
        if len(in_axes) + len(out_axes) != len(k_sub):
            raise UnsupportedModuleError(
                f"module {path!r}: einsum {eq!r} has kernel axes that are neither contracted nor output-only; "
                "jpeft can adapt einsums whose kernel axes are each an input or an output axis."
            )
        return Layout(Kind.EINSUM, kernel_shape, in_axes, out_axes, eq, kernel_fn=fn)
    return None


def trace(model: nn.Module, variables, *args, **kwargs) -> dict[str, ModuleInfo]:
    """Runs ``model.apply`` abstractly (``jax.make_jaxpr``, nothing computed) and records,
    for every module called, its class, kernel layout and output shape, and where the model
    reads the module's params outside the module's own calls (:mod:`jpeft._reads`)."""
    scopes = _reads.Scopes()
    intercept, finish = _recorder(scopes)
    out = []

    def run(v):
        with nn.intercept_methods(intercept):
            y = model.apply(v, *args, **kwargs)
        out.append(finish(v))
        return [leaf for leaf in jax.tree.leaves(y) if isinstance(leaf, jax.Array)]

    closed = _reads.traced(run, variables)
    infos = out[0]
    keys = [_reads.key_names(k) for k, _ in jax.tree_util.tree_flatten_with_path(variables)[0]]
    owners = _reads.owners_of([k[1:] if k[:1] == ("params",) else None for k in keys], infos)
    for path, where in _reads.outside_reads(closed, owners, scopes).items():
        infos[path] = infos[path]._replace(read_outside=tuple(where))
    return infos


def init_and_trace(model: nn.Module, key, *args, **kwargs):
    """``(variables, infos)``: ``model.init(key, *args, **kwargs)``'s variables as
    ``jax.ShapeDtypeStruct`` and :func:`trace`'s record of the same call, from one abstract run
    of ``model.init`` (``jax.eval_shape``): the forward pass is traced once instead of twice
    (``jpeft info``: 0.9 of its 3 CPU-seconds on Llama-2-7B). Unlike :func:`trace` it does not
    record params read outside their modules' calls (``ModuleInfo.read_outside``): the params are
    made in this run, not given to it; ``jpeft info`` runs jpeft.models, which read none."""
    intercept, finish = _recorder()
    out = []

    def run(k, *a):
        with nn.intercept_methods(intercept):
            v = model.init(k, *a, **kwargs)
        out.append(finish(v))
        return v

    variables = jax.eval_shape(run, key, *args)
    return variables, out[0]


def _recorder(scopes: Optional[_reads.Scopes] = None):
    """``(intercept, finish)``: a ``nn.intercept_methods`` interceptor that records every module
    call of a model run, and ``finish(variables)``, called in the same trace once the run is over,
    which returns the record (``{path: ModuleInfo}``), the module's place in ``variables``
    (a view of its params inside ``nn.map_variables``, its layers in a scan) read from them.
    Given ``scopes``, every method of a module runs in the module's named scope."""
    record: dict[str, tuple] = {}  # path -> (ModuleInfo without what the variables tell, own params, debug path)
    other: dict[str, set] = {}  # module path -> methods besides __call__ (a tied embedding's attend)

    def intercept(next_fun, a, kw, ctx):
        with contextlib.nullcontext() if scopes is None else scopes.of(module_path(ctx.module)):
            out = next_fun(*a, **kw)
        if ctx.method_name != "__call__":
            if not ctx.method_name.startswith("_"):
                other.setdefault(module_path(ctx.module), set()).add(ctx.method_name)
            return out
        mod = ctx.module
        path = module_path(mod)
        if path in record:
            return out
        layout = None
        own = unbox(_own_params(mod))  # model.init's are boxed where the model boxes them (nn.with_partitioning)
        pname = "embedding" if isinstance(mod, nn.Embed) else "kernel"
        refusal = None
        if pname in own and not isinstance(own[pname], Mapping):
            try:
                layout = layout_of(mod, tuple(own[pname].shape), a, kw, path)
            except UnsupportedModuleError as e:  # refused when targeted (linear_layout), not for being in the model
                refusal = str(e)
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if hasattr(x, "shape") else x, out)
        in_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if hasattr(x, "shape") else x, a[:1])
        record[path] = (ModuleInfo(type(mod).__name__, layout, shapes, in_shapes[0] if in_shapes else None,
                                   refusal=refusal, input_axes=input_axes(mod, a, kw)), own, _debug_path(mod))
        return out

    def finish(variables) -> dict[str, ModuleInfo]:
        params = unbox(variables).get("params")
        infos = {}
        for path, (info, own, debug) in record.items():
            mapped = _view_refusal(path, debug, own, params)
            if mapped is not None:  # no layout: a linear method refuses it when targeted
                info = info._replace(layout=None, refusal=str(mapped))
            infos[path] = info._replace(scanned_layers=_stacked_layers(path, own, params),
                                        methods=frozenset(other.get(path, ())))
        return infos

    return intercept, finish


def call_inputs(model: nn.Module, variables, paths, *args, **kwargs) -> dict[str, list]:
    """``{path: [x, ...]}``: the first argument of every ``__call__`` of the modules at
    ``paths`` during ``model.apply(variables, *args, **kwargs)`` (one entry per call, in call
    order; traceable, so it runs under ``jax.jit``). For data-dependent inits (CorDA)."""
    want = set(paths)
    got: dict[str, list] = {p: [] for p in want}

    def intercept(next_fun, a, kw, ctx):
        if ctx.method_name == "__call__" and a:
            path = module_path(ctx.module)
            if path in want:
                got[path].append(a[0])
        return next_fun(*a, **kw)

    with nn.intercept_methods(intercept):
        model.apply(variables, *args, **kwargs)
    return got


def infer_layout(path: str, own: Mapping[str, Any]) -> Layout:
    """Layout from a module's parameters alone; only unambiguous (2-D) cases."""
    if "embedding" in own and "kernel" not in own:
        shape = tuple(own["embedding"].shape)
        return Layout(Kind.EMBED, shape, (0,), (1,))
    shape = tuple(own["kernel"].shape)
    if len(shape) == 2:
        return Layout(Kind.DENSE, shape, (0,), (1,))
    raise LayoutError(
        f"module {path!r} has a {len(shape)}-D kernel {shape}; from the parameters alone jpeft cannot tell "
        "which axes are inputs and which outputs (nn.DenseGeneral, nn.Conv and nn.Einsum differ, and a "
        "layer-scanned model stacks its layers' kernels along a leading axis). Pass the model and an example "
        "input so jpeft can look: jpeft.init(config, params, key, model, x)."
    )


def check_layout(path: str, node_layout: Layout, module, args, kwargs) -> None:
    """At apply time: the module the adapter meets must have the layout it was built for. A
    module jpeft has no layout for (one of the user's own, holding a ``kernel``) is refused for
    every method: even where the adapted call needs none (IA3 and OFT scale or rotate the
    module's input or output alone), :func:`jpeft.merge` folds the update into the kernel as an
    ``[in, out]`` matrix, which such a module's kernel need not be."""
    own = module.variables.get("params", {})
    pname = node_layout.param_name
    if pname not in own:
        raise UnsupportedModuleError(f"module {path!r} has no {pname!r} parameter; it cannot hold this adapter.")
    actual = layout_of(module, tuple(own[pname].shape), args, kwargs, path)
    if actual is None:
        name = getattr(module, "module_class", None) or type(module).__name__  # an NNX module's class (jpeft._nnx)
        raise UnsupportedModuleError(
            f"module {path!r} is a {name}; linear adapters support nn.Dense, nn.DenseGeneral, "
            "nn.Conv, nn.Einsum and nn.Embed. Remove it from target_modules."
        )
    check_kernel_fn(path, node_layout, module)
    if node_layout.kind == Kind.DENSE and actual.kind == Kind.DENSE_GENERAL:
        # a dense layout (from the kernel's shape alone) takes the input's last axis; a 2-D
        # DenseGeneral kernel may contract another one (axis=1 of a 3-D input)
        x_axes = input_axes(module, args, kwargs)
        x = module_input(args, kwargs)
        if x_axes is not None and x_axes != (x.ndim - 1,):
            raise LayoutError(
                f"module {path!r}: the adapter was built for a dense layout (from the kernel's shape alone), which "
                f"takes the input's last axis, but the module is a dense_general contracting axes {x_axes} of a "
                f"{x.ndim}-D input. Rebuild the adapter with jpeft.init(config, params, key, model, x) so jpeft can "
                "see the module."
            )
    if (actual.kind, actual.in_axes, actual.out_axes) != (node_layout.kind, node_layout.in_axes, node_layout.out_axes) and not (
        {actual.kind, node_layout.kind} <= {Kind.DENSE, Kind.DENSE_GENERAL} and actual.in_axes == node_layout.in_axes
    ):
        if actual.kind != node_layout.kind and (actual.in_axes, actual.out_axes) == (node_layout.in_axes, node_layout.out_axes):
            found = (f"the module is a {actual.kind}, whose kernel's axes the {node_layout.kind} layout read from the "
                     "kernel's shape alone cannot be told to match")
        else:
            found = f"the module is a {actual.kind} with input axes {actual.in_axes}"
        raise LayoutError(
            f"module {path!r}: the adapter was built for a {node_layout.kind} layout with input axes "
            f"{node_layout.in_axes}, but {found}. "
            "Rebuild the adapter with jpeft.init(config, params, key, model, x) so jpeft can see the module. " + _ONE_WAY
        )
    if actual.kind == Kind.EINSUM and node_layout.equation is not None \
            and actual.equation != node_layout.equation.replace(" ", ""):
        # the sites project with the adapter's equation (down_project, up_project): the same kernel axes in
        # another output order added the update transposed (LoRA 17.1 off the merged model), silently
        raise LayoutError(
            f"module {path!r} is called with the einsum {actual.equation!r}, but the adapter was built for "
            f"{node_layout.equation!r}; the adapter's update is computed with that equation, so its output would be "
            "laid out otherwise than the module's. Rebuild the adapter with jpeft.init(config, params, key, model, x) "
            "on the model that calls it so. " + _ONE_WAY
        )


_ONE_WAY = ("If the adapter was built so, the module is called in more than one way (two einsum equations): an "
            "adapter site has one layout, so give each use a module of its own.")


def prod(xs) -> int:
    return int(math.prod(xs))
