"""Adapters on layer-scanned models: one program for all layers.

A model that runs its decoder layers with ``flax.linen.scan`` (``jpeft.models.LlamaConfig(
scan_layers=True)``) holds every layer's weights stacked along a new leading axis, under one
module path (``model/layers/self_attn/q_proj`` with a kernel ``[num_layers, in, out]``), and
XLA compiles one layer instead of ``num_layers`` copies. Compile time and the compiler's
memory then no longer grow with depth, and the ``while`` loop bounds the live activations.

:func:`jpeft.init` (given the model and an example input) makes a :class:`Stacked` node for
such a site: the per-layer node (e.g. :class:`jpeft.LoraWeights`) with each array stacked the
same way. :func:`jpeft.apply` hands each layer its slice through the ``nn.scan``, so
training, :func:`jpeft.merge`, :func:`jpeft.save_adapter` and checkpoints work unchanged.

The model's ``nn.scan`` must slice the adapter collection like its params:
``variable_axes={"params": 0, jpeft.scan.COLLECTION: 0}`` (jpeft's models do). So must an
``nn.vmap`` that stacks a module's params (an ensemble): its sites are stacked the same way.

Layer-indexed names (Hugging Face PEFT files, ``target_modules`` regexes naming a layer) use
the unrolled layout, ``model/layers_3/...``; :func:`unstack_adapter` / :func:`stack_adapter`
and :func:`unstack_params` / :func:`stack_params` convert between the two, and
:func:`jpeft.hf.save_peft` / :func:`jpeft.hf.load_peft` call them for you.

>>> import jax, jax.numpy as jnp, jpeft
>>> cfg = jpeft.models.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
...                                num_layers=3, num_heads=4, scan_layers=True)
>>> model = jpeft.models.LlamaForCausalLM(cfg)
>>> ids = jnp.ones((1, 5), jnp.int32)
>>> params = model.init(jax.random.key(0), ids)
>>> adapter = jpeft.init(jpeft.LoraConfig(r=4, target_modules=["q_proj"]), params,
...                      jax.random.key(1), model, ids)
>>> node = adapter["model/layers/self_attn/q_proj"]
>>> node.length, node.inner.lora_A.shape
(3, (3, 32, 4))
>>> sorted(jpeft.scan.unstack_adapter(adapter))
['model/layers_0/self_attn/q_proj', 'model/layers_1/self_attn/q_proj', 'model/layers_2/self_attn/q_proj']
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import _hostmem
from jpeft.errors import ConfigError, LayoutError, ShapeMismatchError
from jpeft.methods.base import Site, static_field
from jpeft.tree import matches

#: The flax variable collection :func:`jpeft.apply` passes stacked adapter arrays in.
COLLECTION = "jpeft_adapter"
_VAR = "stacked"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Stacked(Site):
    """A site inside a layer scan: ``inner`` is the per-layer node with every array stacked
    along a new leading axis of size ``length`` (layer ``i`` is ``inner``'s arrays at ``[i]``)."""

    inner: Any
    length: int = static_field(default=1)

    @property
    def mergeable(self) -> bool:  # type: ignore[override]
        return bool(getattr(self.inner, "mergeable", False))

    def added_params(self, trainable) -> int:
        return self.inner.added_params(trainable.inner)

    def load_note(self):
        return self.inner.load_note()

    @property
    def residual(self):  # type: ignore[override]
        return getattr(self.inner, "residual", None)

    @property
    def unstacked(self):  # type: ignore[override]
        return self.inner

    @property
    def site(self) -> str:  # type: ignore[override]
        return getattr(self.inner, "site", "linear")

    def handles(self, method_name: str) -> bool:
        return self.inner.handles(method_name)

    def layer(self, i: int):
        """The node of layer ``i``."""
        return jax.tree.map(lambda x: x[i], self.inner)

    def at_site(self, module, path: str):
        """The node for the layer being traced: its slice of the stacked arrays, which the
        model's ``nn.scan`` passes in through the :data:`COLLECTION` variables."""
        if not module.has_variable(COLLECTION, _VAR):
            raise LayoutError(
                f"adapter site {path!r} holds weights stacked over {self.length} scanned layers, but the module "
                f"was called without its slice. Either the model does not scan this module, or its nn.scan (or the "
                f"nn.vmap of a module whose params it stacks, an ensemble) does not pass jpeft's collection: use "
                f"variable_axes={{'params': 0, {COLLECTION!r}: 0}} there."
            )
        leaves = list(module.get_variable(COLLECTION, _VAR))
        want = [x.shape[1:] for x in jax.tree.leaves(self.inner)]
        if [tuple(x.shape) for x in leaves] != [tuple(s) for s in want]:
            raise LayoutError(
                f"adapter site {path!r}: the stacked adapter arrays reached the module unsliced (shapes "
                f"{[tuple(x.shape) for x in leaves]}, one layer is {[tuple(s) for s in want]}); the module must "
                "run inside the nn.scan over its layers."
            )
        return jax.tree.unflatten(jax.tree.structure(self.inner), leaves)

    def check_params(self, path: str, own: Mapping[str, Any]) -> None:
        bad = sorted({tuple(x.shape)[:1] for x in jax.tree.leaves(own)} - {(self.length,)})
        if bad:
            raise ShapeMismatchError(
                f"adapter at {path!r} is stacked over {self.length} layers, but the module's params have "
                f"leading sizes {bad}. Re-create the adapter for this base model."
            )
        if hasattr(self.inner, "check_params"):  # one layer's node against one layer's params (shapes only)
            one = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), self.inner)
            one.check_params(path, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), own))

    def after_update(self):
        return dataclasses.replace(self, inner=jax.vmap(lambda node: node.after_update())(self.inner))

    def _per_layer(self, how: str, own):
        if not self.mergeable:
            return getattr(self.inner, how)(own)  # raises the method's NotMergeableError
        return jax.vmap(lambda node, p: getattr(node, how)(p))(self.inner, own)

    def merge(self, own):
        return self._per_layer("merge", own)

    def unmerge(self, own):
        return self._per_layer("unmerge", own)

    def effective(self, own):
        """The inner node's effective weights, per layer (stacked)."""
        if own is None:
            return jax.vmap(lambda node: node.effective(None))(self.inner)
        return jax.vmap(lambda node, p: node.effective(p))(self.inner, own)

    def partition_specs(self, module_specs):
        """The inner node's specs; its arrays lead with the layer axis, which the base's
        stacked kernel spec carries too."""
        return dataclasses.replace(self, inner=self.inner.partition_specs(module_specs))

    def split_frozen(self):
        t, f = self.inner.split_frozen()
        return dataclasses.replace(self, inner=t), (None if f is None else dataclasses.replace(self, inner=f))

    def join_frozen(self, frozen):
        return dataclasses.replace(self, inner=self.inner.join_frozen(None if frozen is None else frozen.inner))


def layer_paths(path: str, layout, own, name: str = "layers") -> Optional[list]:
    """The unrolled model's per-layer names of a site inside a layer scan (``model/layers_0/...``,
    ``model/layers_1/...``: the names PEFT files and the unrolled model use), or ``None`` for an
    ordinary site (its params have no extra leading axis, or its path no ``name`` component)."""
    kernel = own.get(layout.param_name)
    if kernel is None or kernel.ndim != len(layout.kernel_shape) + 1 or name not in path.split("/"):
        return None
    head, tail = _split(path, name)
    return [_join(head, f"{name}_{i}", tail) for i in range(int(kernel.shape[0]))]


def site_rank_alpha(config, path: str, layout, own) -> tuple:
    """``config.rank_alpha`` of a site. For a site inside a layer scan the ``rank_pattern`` /
    ``alpha_pattern`` keys are matched against each layer's own name (as for the unrolled model
    and in PEFT: a key ``model\\.layers\\.\\d+\\.self_attn\\.v_proj`` reaches every layer); a
    stacked site runs one program with one rank and one scale, so patterns that give its
    layers different values are refused instead of giving every layer the stacked name's."""
    names = layer_paths(path, layout, own)
    if names is None:
        return config.rank_alpha(path)
    per_layer = {config.rank_alpha(p) for p in names}
    if len(per_layer) != 1:
        raise ConfigError(
            f"{type(config).__name__}.rank_pattern / alpha_pattern give the {len(names)} layers of the layer-scanned "
            f"module {path!r} different (r, alpha): {sorted(per_layer)}; a scanned model uses one rank and one alpha "
            "for all its layers. Use patterns that name the module in every layer (e.g. 'q_proj'), or an unrolled "
            "model (scan_layers=False)."
        )
    return per_layer.pop()


def check_every_layer_selected(config, path: str, names: list) -> None:
    """A stacked site adapts all its layers: a config whose ``exclude_modules`` (or other
    per-layer selection) would leave some of the unrolled model's layers out is refused rather
    than silently adapting them."""
    selects = getattr(config, "selects", None)
    if selects is None:
        return
    off = [i for i, p in enumerate(names) if matches(config.target_modules, p) and not selects(p)]
    if off:
        raise ConfigError(
            f"site {path!r} runs inside a layer scan of {len(names)} layers, but the config leaves out layers "
            f"{off[:8]} (exclude_modules / layers_to_transform); a scanned model adapts every layer alike. Use an "
            "unrolled model (scan_layers=False) to adapt some layers only."
        )


def make_site(make, path: str, layout, key, own, config=None):
    """``make(key, own)`` for an ordinary site; for a site inside a layer scan (its params
    have one more leading axis than the kernel the module sees) a :class:`Stacked` node with
    one independently initialised node per layer. Method ``init`` functions call this with
    the layout from the traced model; given the method's ``config``, a stacked site is
    checked with :func:`check_every_layer_selected` (its rank and scale come from
    :func:`site_rank_alpha`)."""
    kernel = own.get(layout.param_name)
    extra = (kernel.ndim - len(layout.kernel_shape)) if kernel is not None else 0
    if extra == 0:
        return make(key, own)
    if extra != 1 or tuple(kernel.shape[1:]) != tuple(layout.kernel_shape):
        raise ShapeMismatchError(
            f"module {path!r} sees a {layout.param_name} of shape {tuple(layout.kernel_shape)}, but the params hold "
            f"{tuple(kernel.shape)}; jpeft supports one scanned (stacked) leading axis."
        )
    n = int(kernel.shape[0])
    if config is not None:
        check_every_layer_selected(config, path, layer_paths(path, layout, own) or [])
    return Stacked(jax.vmap(make)(jax.random.split(key, n), dict(own)), n)


def variables_for(adapter: Mapping[str, Any]) -> dict:
    """The :data:`COLLECTION` tree holding the stacked arrays of ``adapter``'s
    :class:`Stacked` nodes at their module paths (empty when there are none)."""
    out: dict = {}
    for path, node in adapter.items():
        if isinstance(node, Stacked):
            d = out
            for comp in [c for c in path.split("/") if c]:
                d = d.setdefault(comp, {})
            d[_VAR] = tuple(jax.tree.leaves(node.inner))
    return out


def is_stacked(adapter: Mapping[str, Any]) -> bool:
    """Whether ``adapter`` has a :class:`Stacked` (layer-scanned) site."""
    return any(isinstance(n, Stacked) for n in adapter.values())


def num_stacked_layers(params: Mapping[str, Any], name: str = "layers"):
    """The layer count of a scanned params tree (the leading size of the leaves under a
    ``{name}`` subtree), or ``None`` when the params are unrolled. A ``{name}`` subtree keyed
    by list indices (``"0"``, ``"1"``, ...: an NNX model's ``self.layers = nnx.List([...])``,
    ``nnx.Sequential``'s ``layers``) holds one module per entry, not a stack; so does one whose
    arrays differ in leading size (a plain module named ``{name}``: ``nn.Dense(16, name="layers")``'s
    ``[8, 16]`` kernel and ``[16]`` bias), as a scan slices every array on its first axis."""
    stack = [params]
    while stack:
        d = stack.pop()
        if not isinstance(d, Mapping):
            continue
        for k, v in d.items():
            if k == name and isinstance(v, Mapping) and not (v and all(str(c).isdigit() for c in v)):
                lead = {tuple(getattr(x, "shape", ()))[:1] for x in jax.tree.leaves(v)}
                if len(lead) == 1 and lead != {()}:
                    return int(lead.pop()[0])
            stack.append(v)
    return None


def _split(path: str, name: str) -> tuple[str, str]:
    comps = path.split("/")
    if name not in comps:
        raise LayoutError(
            f"stacked adapter site {path!r} has no path component {name!r}; pass name= the scanned module's name."
        )
    i = comps.index(name)
    return "/".join(comps[:i]), "/".join(comps[i + 1:])


def _join(*parts: str) -> str:
    return "/".join(p for p in parts if p)


def _holds_whole_params(path: str, node) -> bool:
    """Whether ``node`` holds a copy of the whole params tree (full fine-tuning's node at the
    root, which replaces the base), whose layers are stacked or not as the model's params are."""
    return path == "" and bool(getattr(node, "replaces_base", False)) and isinstance(getattr(node, "params", None), Mapping)


def unstack_adapter(adapter: Mapping[str, Any], name: str = "layers") -> dict:
    """Per-layer nodes for every :class:`Stacked` site: ``model/layers/X`` becomes
    ``model/layers_0/X``, ``model/layers_1/X``, ... (the unrolled model's paths, which
    Hugging Face names ``model.layers.0.X``). A full fine-tuning node's copy of the params is
    split with :func:`unstack_params`. Other nodes are kept as they are.

    Raises:
      ConfigError: a layer's path is also another site's (a module named ``{name}_0`` beside
        the scanned ``{name}``): one of the two would be dropped.
    """
    out, source = {}, {}

    def put(path, node, src):
        if path in out:
            raise ConfigError(
                f"the adapter's sites {source[path]!r} and {src!r} both unstack to {path!r} (a module named "
                f"'{name}_<i>' beside the layer-scanned '{name}'), so one of the two would be dropped. Rename that "
                "module, or keep the adapter stacked (jpeft.save_adapter).")
        out[path], source[path] = node, src

    for path, node in adapter.items():
        if _holds_whole_params(path, node):  # full fine-tuning: its copy of the params is per layer too
            put(path, dataclasses.replace(node, params=unstack_params(node.params, name)), path)
            continue
        if not isinstance(node, Stacked):
            put(path, node, path)
            continue
        head, tail = _split(path, name)
        for i in range(node.length):
            put(_join(head, f"{name}_{i}", tail), node.layer(i), path)
    return out


def _layer_pattern(name: str):
    return re.compile(rf"^(.*?)(?:^|/){re.escape(name)}_(\d+)(/.*)?$")


def stacked_path(path: str, name: str = "layers") -> Optional[str]:
    """The scanned model's path of the unrolled module ``path`` (``model/layers_3/mlp`` ->
    ``model/layers/mlp``), or ``None`` for a module outside the layers.

    >>> stacked_path("model/layers_3/mlp"), stacked_path("lm_head")
    ('model/layers/mlp', None)
    """
    m = _layer_pattern(name).match(path)
    return None if m is None else _join(m.group(1), name, (m.group(3) or "").lstrip("/"))


def stack_adapter(adapter: Mapping[str, Any], num_layers: int, name: str = "layers") -> dict:
    """Inverse of :func:`unstack_adapter`: per-layer nodes at ``.../{name}_{i}/X`` for
    ``i < num_layers`` become one :class:`Stacked` node at ``.../{name}/X``. Every layer
    must have the site (a scanned model runs the same program for every layer)."""
    groups: dict[str, dict[int, Any]] = {}
    out = {}
    for path, node in adapter.items():
        if _holds_whole_params(path, node):
            out[path] = dataclasses.replace(node, params=stack_params(node.params, name))
            continue
        m = _layer_pattern(name).match(path)
        if not m:
            out[path] = node
            continue
        groups.setdefault(stacked_path(path, name), {})[int(m.group(2))] = node
    for path, by_layer in sorted(groups.items()):
        missing = sorted(set(range(num_layers)) - set(by_layer))
        extra = sorted(set(by_layer) - set(range(num_layers)))
        if missing or extra:
            raise ShapeMismatchError(
                f"a scanned model of {num_layers} layers needs the adapter site {path!r} on every layer; "
                f"missing layers {missing[:8]}, layers out of range {extra[:8]}. Use an unrolled model "
                "(scan_layers=False) for adapters on some layers only."
            )
        nodes = [by_layer[i] for i in range(num_layers)]
        structs = {jax.tree.structure(n) for n in nodes}
        if len(structs) != 1:
            raise ShapeMismatchError(
                f"site {path!r}: the per-layer adapters differ in kind or static settings (e.g. rank or alpha "
                "patterns per layer), so they cannot be stacked for a scanned model; use scan_layers=False."
            )
        out[path] = Stacked(jax.tree.map(lambda *xs: jnp.stack(xs), *nodes), num_layers)
    return out


def _get(tree, keys):
    for k in keys:
        tree = tree[k]
    return tree


def unstack_params(params: Mapping[str, Any], name: str = "layers") -> dict:
    """A params tree with every ``{name: stacked}`` subtree split into ``{name}_0``,
    ``{name}_1``, ... (the unrolled model's layout). Works on arrays and on
    ``jax.ShapeDtypeStruct`` trees; the stacked leaves are sliced, not kept."""

    def split(x, i):
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
        return x[i]

    def walk(d):
        if not isinstance(d, Mapping):
            return d
        out = {}
        for k, v in d.items():
            if k == name and isinstance(v, Mapping):
                n = {tuple(x.shape)[:1] for x in jax.tree.leaves(v)}
                if len(n) != 1 or not next(iter(n)):
                    raise ShapeMismatchError(f"params under {name!r} are not stacked along one leading axis: {sorted(n)}.")
                for i in range(next(iter(n))[0]):
                    out[f"{name}_{i}"] = jax.tree.map(lambda x, i=i: split(x, i), v)
            else:
                out[k] = walk(v)
        return out

    return walk(params)


def layer_module(params: Mapping[str, Any], path: str, name: str = "layers") -> Optional[dict]:
    """The own params (``{param name: array}``) of the unrolled model's module ``path`` in a
    layer-scanned params tree: for ``model/layers_3/mlp/down_proj`` layer 3's slice of the stacked
    ``model/layers/mlp/down_proj`` arrays (this module's only, sliced when asked), for a module
    outside the scan its params as they are. ``None`` when the params hold no such module.

    >>> import jax.numpy as jnp
    >>> p = {"model": {"layers": {"fc": {"kernel": jnp.arange(6.0).reshape(3, 2, 1)}}}}
    >>> layer_module(p, "model/layers_2/fc")["kernel"].ravel().tolist()
    [4.0, 5.0]
    """
    node, index = params, None
    for comp in [c for c in path.split("/") if c]:
        if not isinstance(node, Mapping):
            return None
        m = re.fullmatch(rf"{re.escape(name)}_(\d+)", comp)
        if comp not in node and m and index is None and isinstance(node.get(name), Mapping):
            node, index = node[name], int(m.group(1))
        elif comp in node:
            node = node[comp]
        else:
            return None
    if not isinstance(node, Mapping):
        return None
    own = {k: v for k, v in node.items() if not isinstance(v, Mapping)}
    if index is None:
        return own

    def one(x):
        n = tuple(getattr(x, "shape", ()))[:1]
        if not n or not 0 <= index < n[0]:
            return None
        if isinstance(x, jax.ShapeDtypeStruct) or not isinstance(x, (jax.Array, np.ndarray)):
            # abstract, or quantized (its shape is the kernel's): the layer's shape only
            return jax.ShapeDtypeStruct(tuple(x.shape)[1:], x.dtype)
        return x[index]

    out = {k: one(v) for k, v in own.items()}
    return None if any(v is None for v in out.values()) else out


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(buf, x, i):
    return jax.lax.dynamic_update_index_in_dim(buf, x.astype(buf.dtype), i, 0)


def set_layer(buf: jax.Array, x, i: int) -> jax.Array:
    """``buf.at[i].set(x)`` for a stacked ``[num_layers, ...]`` array, written in place
    (``buf`` is donated: use the returned array). Fills stacked weights one layer at a time
    without a second copy of the whole stack."""
    return _set_layer(buf, jnp.asarray(x), jnp.int32(i))


def stack_params(params: Mapping[str, Any], name: str = "layers", *, consume: bool = False) -> dict:
    """Inverse of :func:`unstack_params`: ``{name}_0 ... {name}_{n-1}`` subtrees (which must
    all be present and alike) become one ``{name}`` subtree of stacked leaves.

    With ``consume=True`` the per-layer subtrees are removed from ``params`` (which must be
    plain dicts) as they are copied into the stack, and each stacked leaf is filled in place
    layer by layer, so loading a checkpoint into a scanned model needs about one layer of
    extra memory instead of a second copy of the model (:func:`jpeft.models.from_pretrained`
    does this)."""

    def walk(d):
        if not isinstance(d, Mapping):
            return d
        keys = list(d)
        idx = {}
        out = {}
        for k in keys:
            v = d[k]
            m = re.fullmatch(rf"{re.escape(name)}_(\d+)", k)
            if m and isinstance(v, Mapping):
                idx[int(m.group(1))] = v
                if consume:
                    del d[k]
            else:
                out[k] = walk(v)
        if idx:
            n = len(idx)
            if sorted(idx) != list(range(n)):
                raise ShapeMismatchError(f"layers {sorted(idx)} are not numbered 0..{n - 1}; cannot stack them.")
            layers = [idx.pop(i) for i in range(n)]
            if len({jax.tree.structure(x) for x in layers}) != 1:
                raise ShapeMismatchError(f"the {n} {name!r} subtrees differ in structure; they cannot be stacked.")
            treedef = jax.tree.structure(layers[0])
            flat = [jax.tree.leaves(x) for x in layers]
            del layers
            leaves = []
            for j in range(len(flat[0])):
                first = flat[0][j]
                if consume:
                    buf = jnp.zeros((n,) + tuple(first.shape), first.dtype)
                    for i in range(n):
                        buf = set_layer(buf, flat[i][j], i)
                        flat[i][j] = None  # drop the per-layer copy as soon as it is in the stack
                    buf.block_until_ready()
                    _hostmem.release()  # the freed per-layer blocks go back before the next stack
                else:
                    buf = jnp.stack([flat[i][j] for i in range(n)])
                leaves.append(buf)
            out[name] = jax.tree.unflatten(treedef, leaves)
        return out

    return walk(params)


__all__ = [
    "COLLECTION",
    "Stacked",
    "make_site",
    "site_rank_alpha",
    "layer_paths",
    "layer_module",
    "stacked_path",
    "variables_for",
    "is_stacked",
    "num_stacked_layers",
    "unstack_adapter",
    "stack_adapter",
    "unstack_params",
    "stack_params",
    "set_layer",
]
