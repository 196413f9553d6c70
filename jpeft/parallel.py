"""Scale-out training: one step body run on one device, with ``jax.pmap`` or on a sharded mesh.

The step body is :func:`jpeft.train.make_step_fn` (value and gradient with respect to the
adapter, optional gradient accumulation, optional gradient reduction, optimizer update with
the non-finite guard). This module only decides where the arrays live:

* :func:`make_pmap_train_step`: data parallel with ``jax.pmap``; the base, adapter and
  optimizer state are replicated (leading device axis, see :func:`replicate`) and gradients,
  loss and float metrics are averaged with ``lax.pmean``.
* :func:`make_sharded_train_step`: ``jax.jit`` over a :class:`jax.sharding.Mesh` with a
  ``data`` axis (the batch) and an ``fsdp`` axis (the frozen base, sharded by
  :func:`shard_params`). XLA's SPMD partitioner inserts the collectives; the body is the
  single-device one. A ``data`` only mesh is plain data parallelism; ``fsdp > 1`` is ZeRO-3
  style: every device holds ``1/fsdp`` of each base weight and sees its own examples.

Placement helpers:

* :func:`param_specs` / :func:`shard_params`: each frozen weight is sharded along ``fsdp`` on
  its largest dimension divisible by the axis size (a stacked layer axis is never chosen);
  path-regex ``rules`` override the choice.
* :func:`adapter_specs` / :func:`shard_adapter`: a LoRA site follows its base weight: ``lora_A
  [in, r]`` takes the kernel's input-dimension sharding, ``lora_B [r, out]`` the output one.
* :func:`opt_state_shardings` / :func:`init_opt_state`: every copy of the adapter inside the
  optimizer state (Adam's ``mu`` and ``nu``, ...) is sharded like the adapter; counters are
  replicated.

Mixed precision: :func:`cast_base` stores the frozen base in ``bfloat16`` (or any float
dtype); :func:`with_precision` runs the loss in a compute dtype while the adapter (the master
weights), its gradients and the optimizer state stay ``float32``. Rematerialization:
:func:`remat` / :func:`remat_policy` (``jax.checkpoint`` over a linen layer).

A complete 2 x 4 run on eight devices::

    mesh = jpeft.make_mesh(data=2, fsdp=4)
    params = jpeft.shard_params(params, mesh)
    adapter = jpeft.shard_adapter(adapter, mesh, params)
    opt_state = jpeft.init_opt_state(optimizer, adapter)
    step = jpeft.make_sharded_train_step(loss_fn, optimizer, mesh)
    adapter, opt_state, metrics = step(params, adapter, opt_state, batch, key)
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jpeft import quant
from jpeft.errors import ConfigError, InputValidationError, ShardingError
from jpeft.methods.base import trainable
from jpeft import _splash
from jpeft._ops import check_float_dtype
from jpeft.train import DonationNamed, make_step_fn, split_loss, weighted_sum
from jpeft.tree import is_typed_key, path_str, unwrap_params

DATA = "data"
FSDP = "fsdp"
TENSOR = "tensor"
BATCH_AXES = (DATA, FSDP)

# The mesh, sharding and pmap functions' one public name is the top level (``jpeft.make_mesh``,
# ``jpeft.shard_params``, ...: jpeft/__init__.py's __all__, what README.md and docs/ name); this
# module is where they live, and its __all__ lists only what jpeft does not re-export
# (docs/ARCHITECTURE.md, "One public name"; tests/test_protocol.py checks the two never overlap).
__all__ = ["kernels_on"]


# ------------------------------------------------------------------------------------- mesh
def make_mesh(data: Optional[int] = None, fsdp: int = 1, *, tensor: int = 1,
              devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A ``(data, fsdp)`` mesh over ``devices`` (default: every device of every process), or a
    ``(data, fsdp, tensor)`` mesh when ``tensor > 1``.

    Args:
      data: size of the batch axis; default ``len(devices) // (fsdp * tensor)``.
      fsdp: size of the axis the frozen base is sharded over (``1``: pure data parallel).
      tensor: size of the tensor-parallel axis (Megatron-style splits of each layer's
        matmuls; place the base with :func:`tensor_parallel_rules`). The batch is not split
        over it.
      devices: the devices to use; default ``jax.devices()``.

    Raises:
      ShardingError: when ``data * fsdp * tensor`` is not the number of devices.

    >>> import jpeft
    >>> mesh = jpeft.make_mesh()
    >>> dict(mesh.shape) == {"data": len(mesh.devices.flat), "fsdp": 1}
    True
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    for name, v in (("data", data), ("fsdp", fsdp), ("tensor", tensor)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1):
            raise ShardingError(f"make_mesh: {name} must be a positive integer, found {v!r}.")
    model = fsdp * tensor
    axes, sizes = ("fsdp", f"fsdp={fsdp}") if tensor == 1 else ("fsdp * tensor", f"fsdp={fsdp}, tensor={tensor}")
    if data is None:
        if n % model:
            raise ShardingError(
                f"make_mesh: {sizes} does not divide the {n} available devices; choose {axes} among "
                f"{[d for d in range(1, n + 1) if n % d == 0]}."
            )
        data = n // model
    if data * model != n:
        mesh_shape = f"{data} x {fsdp}" + ("" if tensor == 1 else f" x {tensor}")
        fix = (f"Pass devices=jax.devices()[:{data * model}] to use fewer devices." if data * model < n else
               f"To try a {mesh_shape} mesh on a CPU, emulate {data * model} devices: set "
               f"XLA_FLAGS=--xla_force_host_platform_device_count={data * model} in the environment before JAX "
               "starts (before `import jax`).")
        raise ShardingError(
            f"make_mesh: data * {axes} must equal the number of devices ({n}), found data={data}, {sizes} "
            f"(product {data * model}). {fix}"
        )
    if tensor == 1:
        return jax.make_mesh((data, fsdp), (DATA, FSDP), axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)
    return jax.make_mesh((data, fsdp, tensor), (DATA, FSDP, TENSOR), axis_types=(AxisType.Auto,) * 3, devices=devices)


def tensor_parallel_rules(*, stacked: bool = False, tensor: str = TENSOR, fsdp: str = FSDP) -> list:
    """Megatron-style :func:`param_specs` rules for the Llama family (jpeft's Llama, Mistral,
    Qwen2 module names): ``q/k/v/gate/up_proj`` kernels ``[in, out]`` split column-wise
    (``out`` over ``tensor``), ``o_proj`` and ``down_proj`` row-wise (``in`` over ``tensor``),
    the embedding and ``lm_head`` by vocabulary; the other dimension of each goes over
    ``fsdp``. Norms and biases fall back to the default spec. LoRA factors follow their base
    weight (:func:`adapter_specs`): a column-split layer's ``lora_B`` is split by columns, a
    row-split layer's ``lora_A`` by rows, so no base weight is all-gathered for the adapter.
    ``stacked``: the layer-scanned layout (a leading layer axis, never split).

    >>> tensor_parallel_rules()[0]
    ('.*(q_proj|k_proj|v_proj|gate_proj|up_proj)/kernel', ('fsdp', 'tensor'))
    """
    lead = (None,) if stacked else ()
    return [
        (r".*(q_proj|k_proj|v_proj|gate_proj|up_proj)/kernel", lead + (fsdp, tensor)),
        (r".*(o_proj|down_proj)/kernel", lead + (tensor, fsdp)),
        (r".*embed_tokens/embedding", (tensor, fsdp)),
        (r".*lm_head/kernel", (fsdp, tensor)),
    ]


# -------------------------------------------------------------------------------- placing
def put_leaf(x, sharding, copy: bool = False):
    """``jax.device_put`` that also works for shardings spanning several processes: a value
    every process holds in full (host array, local array) is cut into this process's shards.

    ``copy``: never share a buffer with ``x`` (``device_put`` reuses the source buffer for the
    shard on its own device even with ``may_alias=False``; a donated step would then delete
    ``x``)."""
    if sharding.is_fully_addressable:
        if copy and isinstance(x, jax.Array):
            x = jnp.copy(x)
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.device_put(x, sharding)  # global -> global: a reshard
    if isinstance(x, jax.Array) and is_typed_key(x):
        data = put_leaf(jax.random.key_data(x), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def _put(tree, shardings, copy: bool = False):
    """:func:`put_leaf` over a tree (``shardings``: a tree of shardings or one sharding)."""
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: put_leaf(x, shardings, copy), tree)
    return jax.tree.map(lambda x, s: put_leaf(x, s, copy), tree, shardings)


# -------------------------------------------------------------------------- partition specs
def _leaf_paths(tree):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=quant.is_quantized)
    return [path_str(kp) for kp, _ in leaves], [x for _, x in leaves], treedef


def _axis_size(mesh: Mesh, entry) -> int:
    if entry is None:
        return 1
    names = entry if isinstance(entry, tuple) else (entry,)
    return int(math.prod(mesh.shape[a] for a in names))


def _check_spec(path: str, shape: tuple, spec: P, mesh: Mesh) -> P:
    if len(spec) > len(shape):
        raise ShardingError(
            f"the rule for {path!r} gives the partition spec {spec} with {len(spec)} entries, but the "
            f"array has shape {shape} ({len(shape)} dims). Give at most one entry per dimension."
        )
    for dim, entry in enumerate(spec):
        names = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
        for a in names:
            if a not in mesh.shape:
                raise ShardingError(
                    f"the rule for {path!r} names the mesh axis {a!r}, but the mesh has axes {tuple(mesh.shape)}."
                )
        size = _axis_size(mesh, entry)
        if shape[dim] % size:
            raise ShardingError(
                f"the rule for {path!r} shards dimension {dim} (size {shape[dim]}) over {entry!r} "
                f"(size {size}), which does not divide it. Pick another dimension or replicate it (None)."
            )
    return spec


def _default_spec(shape: tuple, size: int, axis: str, skip_leading: bool, min_size: int) -> P:
    if size == 1 or int(math.prod(shape)) < max(min_size, 1):
        return P()
    start = 1 if skip_leading else 0
    best = None
    for d in range(start, len(shape)):
        if shape[d] % size == 0 and (best is None or shape[d] > shape[best]):
            best = d
    if best is None:
        return P()
    return P(*([None] * best + [axis]))


def _as_spec(spec) -> P:
    if spec is None:
        return P()
    if isinstance(spec, P):
        return spec
    if isinstance(spec, (tuple, list)):
        return P(*spec)
    if isinstance(spec, str):
        return P(spec)
    raise ShardingError(f"a sharding rule must map to a PartitionSpec, a tuple of axis names or None; found {spec!r}.")


def param_specs(
    params,
    mesh: Mesh,
    rules: Optional[Sequence[tuple[str, Any]]] = None,
    *,
    axis: str = FSDP,
    stacked: Optional[str] = None,
    min_size: int = 0,
):
    """The :class:`~jax.sharding.PartitionSpec` of every leaf of the frozen base.

    Args:
      params: the base variables (``{"params": ...}`` or a bare tree; arrays or
        ``jax.ShapeDtypeStruct``, so the specs can be computed before anything is allocated).
      mesh: the mesh; its ``axis`` entry is the sharding axis (``1`` or absent: all replicated).
      rules: ``[(regex, spec), ...]``; the first regex that :func:`re.fullmatch` es a leaf's path
        (``"layers_0/q_proj/kernel"``, without the ``params/`` prefix) gives its spec: a
        ``PartitionSpec``, a tuple of mesh axis names / ``None`` per dimension, or ``None``
        (replicated). Leaves no rule matches get the default.
      axis: the mesh axis the default shards over.
      stacked: a regex matched like ``rules``: leaves whose first dimension stacks layers (a
        ``nn.scan`` over blocks). The default never shards that dimension, so each scan
        iteration gathers only its own layer.
      min_size: leaves with fewer elements stay replicated.

    Default: the largest dimension divisible by the ``axis`` size is sharded (the first
    such on ties); a leaf with no divisible dimension is replicated. Such leaves holding 1% of
    the base's bytes or more are named in a ``UserWarning`` (their bytes, and the ``axis``
    sizes of this mesh's device count that would split them), and when no leaf at all is
    sharded over ``axis`` a ``ShardingError`` says so: every device would hold the whole base.

    Raises:
      ShardingError: a rule names an unknown mesh axis, has too many entries, or shards a
        dimension the mesh axis does not divide; or the ``axis`` size divides no dimension of
        any leaf (nothing would be sharded).

    ``mesh`` may be a :class:`jax.sharding.AbstractMesh` (only its axis sizes are read):

    >>> import jax, jpeft
    >>> from jax import ShapeDtypeStruct as S
    >>> mesh = jax.sharding.AbstractMesh((2, 4), ("data", "fsdp"))
    >>> base = {"params": {"up": {"kernel": S((16, 64), "f4")}, "norm": {"scale": S((6,), "f4")}}}
    >>> specs = jpeft.param_specs(base, mesh, rules=[(".*norm/.*", None)])
    >>> specs["params"]["up"]["kernel"], specs["params"]["norm"]["scale"]
    (P(None, 'fsdp'), P())
    """
    size = int(mesh.shape[axis]) if axis in mesh.shape else 1
    _, wrapped = unwrap_params(params) if isinstance(params, Mapping) else (params, False)
    paths, leaves, treedef = _leaf_paths(params)
    rules = list(rules or [])
    compiled = []
    for item in rules:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
            raise ShardingError(f"rules must be a sequence of (regex, spec) pairs; found the entry {item!r}.")
        compiled.append((re.compile(item[0]), _as_spec(item[1])))
    stacked_re = re.compile(stacked) if stacked else None
    specs, whole, sharded, total = [], [], False, 0
    for path, leaf in zip(paths, leaves):
        rel = path[len("params/"):] if wrapped and path.startswith("params/") else path
        shape = tuple(getattr(leaf, "shape", ()))
        total += _nbytes(leaf)
        for rx, spec in compiled:
            if rx.fullmatch(rel):
                spec = _check_spec(rel, shape, spec, mesh)
                break
        else:
            is_stacked = bool(stacked_re and stacked_re.fullmatch(rel))
            spec = _default_spec(shape, size, axis, is_stacked, min_size)
            if size > 1 and spec == P() and len(shape) > is_stacked and math.prod(shape) >= max(min_size, 1):
                whole.append((rel, shape, _nbytes(leaf), shape[is_stacked:]))  # no dimension the axis divides
        sharded = sharded or any(axis in (e if isinstance(e, tuple) else (e,)) for e in spec)
        # a quantized kernel (jpeft.quantize): the kernel's spec, carried to each of its arrays
        specs.append(quant.leaf_specs(leaf, spec, dict(mesh.shape)) if quant.is_quantized(leaf) else spec)
    if whole:
        _say_whole(whole, sharded, total, axis, size, mesh)
    return jax.tree_util.tree_unflatten(treedef, specs)


# a warning names the weights an fsdp size leaves whole when they hold at least this share of the base's bytes
_WHOLE_SHARE = 0.01


def _nbytes(leaf) -> int:
    """Bytes of a base leaf (an array, a ``jax.ShapeDtypeStruct`` or a quantized kernel's arrays; a
    PRNG key array, such as an NNX state's ``nnx.RngKey``, whose key dtype NumPy cannot read)."""
    return int(sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(leaf)
                   if hasattr(x, "shape") and hasattr(x, "dtype")))


def _mib(n: int) -> str:
    return f"{n / 2 ** 20:,.1f} MiB" if n >= 2 ** 17 else f"{n:,} bytes"


def _say_whole(whole, sharded: bool, total: int, axis: str, size: int, mesh) -> None:
    """Refuses a mesh whose ``axis`` size divides no dimension of any base weight (each device
    would hold the whole base: the memory ``fsdp`` was asked to save is not saved), and warns when
    the weights it leaves whole hold at least 1% of the base's bytes, naming them, their bytes and
    the sizes that would split them."""
    kept = sum(w[2] for w in whole)
    if sharded and kept < _WHOLE_SHARE * total:
        return
    whole = sorted(whole, key=lambda w: -w[2])
    devices = int(math.prod(mesh.shape.values()))
    # (a stacked leaf's leading layer axis is never split: its dims to split exclude it)
    fits = [s for s in range(2, devices + 1) if devices % s == 0 and s != size
            and all(any(d % s == 0 for d in dims) for _, _, _, dims in whole)]
    named = ", ".join(f"{p!r} {shape} {_mib(b)}" for p, shape, b, _ in whole[:5])
    if len(whole) > 5:
        named += f" and {len(whole) - 5} more"
    if fits:
        would = (f"The {axis} sizes (divisors of this mesh's {devices} devices) that split them all: "
                 f"{', '.join(map(str, fits))}")
    else:
        would = f"No {axis} size that divides this mesh's {devices} devices splits them all"
    if not sharded:
        raise ShardingError(
            f"{axis} = {size} divides no dimension of any weight of the base, so nothing would be sharded and every "
            f"device would hold the whole base ({_mib(kept)}): {named}. {would}. Use "
            + ("one of those sizes, or " if fits else "") + f"{axis} = 1 (plain data parallelism) to replicate the "
            "base on purpose.")
    warnings.warn(
        f"{axis} = {size} divides no dimension of {len(whole)} weight(s) of the base, which every device therefore "
        f"holds whole (replicated: {_mib(kept)} of the base's {_mib(total)}): {named}. {would}"
        + ("; use one of them to save their memory." if fits else ": they stay whole at any such size."), stacklevel=3)


def param_shardings(params, mesh: Mesh, rules=None, **kw):
    """:func:`param_specs` as :class:`~jax.sharding.NamedSharding` s on ``mesh``."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(params, mesh, rules, **kw),
                        is_leaf=lambda x: isinstance(x, P))


def shard_params(params, mesh: Mesh, rules=None, **kw):
    """Places the frozen base on ``mesh`` as :func:`param_specs` says (see there for
    ``rules``, ``axis``, ``stacked`` and ``min_size``). Returns the placed tree.

    With ``fsdp = 4`` every device holds a quarter of each sharded weight::

        params = jpeft.shard_params(params, jpeft.make_mesh(data=2, fsdp=4))
    """
    return _put(params, param_shardings(params, mesh, rules, **kw))


def _specs_of(params, mesh: Mesh):
    """Specs of placed params (NamedShardings on ``mesh``) or a tree of specs as given."""

    def one(x):
        if isinstance(x, P):
            return x
        if isinstance(x, NamedSharding):
            return x.spec
        sh = getattr(x, "sharding", None)
        if isinstance(sh, NamedSharding) and sh.mesh.shape == mesh.shape and sh.mesh.axis_names == mesh.axis_names:
            return sh.spec
        if sh is not None and len(getattr(sh, "device_set", ())) == 1:
            return P()
        raise ShardingError(
            f"cannot read a mesh placement from a params leaf placed with {sh!r}; place the base with "
            "jpeft.shard_params(params, mesh) first, or pass the tree of specs from jpeft.param_specs."
        )

    return jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, (P, NamedSharding)))


def _site_specs(path: str, node, base_specs):
    """The node's own ``partition_specs`` (:class:`jpeft.methods.base.Site`), given the base
    module's spec subtree at ``path`` (``None`` where the base has no such module)."""
    own = base_specs
    try:
        for comp in (path.split("/") if path else ()):
            own = own[comp]
    except (KeyError, TypeError):
        own = None
    if isinstance(own, Mapping):  # a quantized kernel's spec tree -> the kernel's own spec
        own = {k: quant.logical_spec(v) for k, v in own.items()}
    try:
        return node.partition_specs(own if isinstance(own, Mapping) else None)
    except ShardingError as e:
        raise ShardingError(f"the adapter site {path!r} {e}") from None


def adapter_specs(adapter: Mapping[str, Any], params_or_specs, mesh: Optional[Mesh] = None):
    """Partition specs of an adapter, derived from its base weights' specs.

    ``params_or_specs`` is either the placed base (from :func:`shard_params`) or the tree
    from :func:`param_specs`. A LoRA site's ``lora_A [in, r]`` takes the kernel's
    input-dimension entry, ``lora_B [r, out]`` (and the DoRA magnitude) its output entry, so
    ``x @ A`` and ``h @ B`` need no more communication than the base matmul itself. When a
    kernel has several input (or output) axes only a sharded *major* axis carries over to the
    flattened matrix; other patterns leave that factor replicated. Each site node says how in its
    ``partition_specs`` (LoHa, AdaLoRA and VeRA follow the kernel as LoRA does, a trainable copy of
    base weights is laid out as they are); the default, and IA3's, LoKr's, OFT's, the bottleneck's,
    prefix and prompt tuning's, is replicated.
    """
    if mesh is None:
        leaves = jax.tree.leaves(params_or_specs, is_leaf=lambda x: isinstance(x, (P, NamedSharding)))
        mesh = next((getattr(getattr(x, "sharding", x), "mesh", None) for x in leaves
                     if isinstance(getattr(x, "sharding", x), NamedSharding)), None)
    specs = params_or_specs if mesh is None else _specs_of(params_or_specs, mesh)
    inner, _ = unwrap_params(specs) if isinstance(specs, Mapping) else (specs, False)
    return {path: _site_specs(path, node, inner) for path, node in adapter.items()}


def adapter_shardings(adapter: Mapping[str, Any], mesh: Mesh, params_or_specs):
    """:func:`adapter_specs` as :class:`~jax.sharding.NamedSharding` s on ``mesh`` (what
    :func:`shard_adapter` places the adapter with).

    >>> import jax, jax.numpy as jnp, flax.linen as nn, jpeft
    >>> params = nn.Dense(4).init(jax.random.key(0), jnp.ones((1, 3)))
    >>> adapter = jpeft.init(jpeft.LoraConfig(r=2, target_modules=".*"), params, jax.random.key(1))
    >>> mesh = jpeft.make_mesh(data=jax.device_count())
    >>> s = jpeft.adapter_shardings(adapter, mesh, params)
    >>> tuple(s[""].lora_A.spec), tuple(s[""].lora_B.spec)  # this small kernel stays replicated
    ((None, None), (None, None))
    >>> jpeft.shard_adapter(adapter, mesh, params)[""].lora_B.sharding == s[""].lora_B
    True
    """
    specs = adapter_specs(adapter, params_or_specs, mesh)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def shard_adapter(adapter: Mapping[str, Any], mesh: Mesh, params_or_specs):
    """Places the adapter next to its base weights (see :func:`adapter_specs`). The result
    never shares buffers with ``adapter``, so a donating step leaves ``adapter`` usable."""
    return _put(adapter, adapter_shardings(adapter, mesh, params_or_specs), copy=True)


def _tree_shardings(tree):
    return jax.tree.map(lambda x: x.sharding, tree)


def opt_state_shardings(optimizer: optax.GradientTransformation, adapter, adapter_shardings_tree=None):
    """Shardings of ``optimizer.init(jpeft.trainable(adapter))`` (an adapter's frozen arrays get
    no optimizer state): each subtree shaped like the adapter (Adam's
    ``mu``, ``nu``, ...) gets the adapter's shardings; every other leaf (step counters, scalar
    schedule state, a factored state's ``v_row`` / ``v_col``, shaped unlike the adapter) is
    replicated on the adapter's mesh.

    ``adapter_shardings_tree`` defaults to the shardings of the (placed) adapter's arrays.
    """
    adapter = trainable(adapter) if isinstance(adapter, Mapping) else adapter
    if adapter_shardings_tree is None:
        adapter_shardings_tree = _tree_shardings(adapter)
    elif isinstance(adapter_shardings_tree, Mapping):
        adapter_shardings_tree = trainable(adapter_shardings_tree)
    leaves = jax.tree.leaves(adapter_shardings_tree)
    first = leaves[0] if leaves else None
    if not isinstance(first, NamedSharding):
        raise ShardingError(
            "opt_state_shardings needs the adapter placed on a mesh (NamedSharding leaves); found "
            f"{first!r}. Place it with jpeft.shard_adapter(adapter, mesh, params) first."
        )
    replicated = NamedSharding(first.mesh, P())
    shapes = jax.eval_shape(optimizer.init, adapter)
    target = jax.tree.structure(adapter)

    def is_adapter_like(x):
        try:
            return jax.tree.structure(x) == target
        except Exception:  # pragma: no cover - exotic nodes
            return False

    shapes_of_adapter = jax.tree.map(jnp.shape, adapter)

    def pick(x):
        if is_adapter_like(x):
            # a factored state (Adafactor's v_row / v_col) has the adapter's structure but not its shapes
            return jax.tree.map(lambda leaf, s, shape: s if tuple(leaf.shape) == tuple(shape) else replicated,
                                x, adapter_shardings_tree, shapes_of_adapter)
        return replicated

    return jax.tree.map(pick, shapes, is_leaf=is_adapter_like)


def init_opt_state(optimizer: optax.GradientTransformation, adapter, adapter_shardings_tree=None):
    """``optimizer.init(jpeft.trainable(adapter))`` (no state for an adapter's frozen arrays).

    For an adapter placed on a mesh (:func:`shard_adapter`) the state is created directly in
    place, sharded like the adapter (see :func:`opt_state_shardings`); nothing is gathered on
    one device. An adapter that is not on a mesh (one device, the usual single-process case)
    gets the plain ``optimizer.init`` of its trainable arrays.

    >>> import jax, optax, jpeft
    >>> params = {"params": {"dense": {"kernel": jax.numpy.ones((4, 4))}}}
    >>> adapter = jpeft.init(jpeft.VeraConfig(r=2, target_modules=["dense"]), params, jax.random.key(0))
    >>> state = jpeft.init_opt_state(optax.adam(1e-3), adapter)   # no state for VeRA's frozen projections
    >>> jax.tree.structure(state) == jax.tree.structure(optax.adam(1e-3).init(jpeft.trainable(adapter)))
    True
    """
    train = trainable(adapter) if isinstance(adapter, Mapping) else adapter
    if adapter_shardings_tree is None:
        leaves = jax.tree.leaves(train)
        if not any(isinstance(getattr(x, "sharding", None), NamedSharding) for x in leaves):
            return optimizer.init(train)
    out = opt_state_shardings(optimizer, adapter, adapter_shardings_tree)
    return jax.jit(optimizer.init, out_shardings=out)(train)


def kernels_on(mesh: Optional[Mesh], batch_axes=BATCH_AXES):
    """Context for tracing a function that is jitted over ``mesh`` with its batch split over
    ``batch_axes``: a Pallas TPU kernel (``attention="splash"``) cannot be partitioned by XLA,
    so inside it the models' attention runs that kernel in ``shard_map`` over the mesh (the
    batch over ``batch_axes``, the heads over ``tensor``). ``mesh=None``: no effect."""
    if mesh is None:
        return contextlib.nullcontext()
    entry = batch_entry(mesh, batch_axes)
    axes = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
    return _splash.partitioned(mesh, axes, TENSOR)


# -------------------------------------------------------------------------------- batches
def batch_entry(mesh: Mesh, batch_axes) -> Any:
    """The ``PartitionSpec`` entry of a batch's leading axis: the axes of ``batch_axes`` that ``mesh`` has
    (``None`` when it has none, one name for one axis)."""
    axes = tuple(a for a in ((batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)) if a in mesh.shape)
    if not axes:
        return None
    return axes if len(axes) > 1 else axes[0]


def shard_batch(batch, mesh: Mesh, batch_axes=BATCH_AXES):
    """Places a host batch on ``mesh`` with its first axis split over ``batch_axes`` (default
    ``("data", "fsdp")``: every device gets its own examples). In a multi-process job use
    :func:`jpeft.distributed.global_batch`, which assembles the global batch from each
    process's shard. :func:`make_sharded_train_step` calls it on a host batch.

    >>> import jax, jax.numpy as jnp, jpeft
    >>> mesh = jpeft.make_mesh(data=jax.device_count())
    >>> batch = jpeft.shard_batch({"input_ids": jnp.zeros((8 * jax.device_count(), 16), jnp.int32)}, mesh)
    >>> tuple(batch["input_ids"].sharding.spec)  # rows split over data x fsdp
    (('data', 'fsdp'),)
    """
    entry = batch_entry(mesh, batch_axes)
    n = _axis_size(mesh, entry)

    def put(x):
        x = x if isinstance(x, jax.Array) else np.asarray(x)
        if x.ndim == 0 or x.shape[0] % n:
            raise InputValidationError(
                f"the batch is split over the mesh axes {entry!r} ({n} devices) along its first axis, but a "
                f"leaf has shape {tuple(x.shape)}; use a batch size that is a multiple of {n}."
            )
        if jax.process_count() > 1 and not (isinstance(x, jax.Array) and not x.is_fully_addressable):
            raise ShardingError(
                "shard_batch: in a multi-process job a host batch is ambiguous (global or this process's rows?); "
                "build the global batch with jpeft.distributed.global_batch(local_rows, mesh)."
            )
        return put_leaf(x, NamedSharding(mesh, P(entry)))

    return jax.tree.map(put, batch)


# -------------------------------------------------------------------------- sharded step
def make_sharded_train_step(
    loss_fn: Callable,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    *,
    batch_axes=BATCH_AXES,
    accumulate_steps: int = 1,
    loss_weight: Optional[str] = None,
    donate: bool = True,
    skip_nonfinite: bool = True,
    adapter_shardings_tree=None,
    opt_state_shardings_tree=None,
):
    """The training step jitted over a mesh: ``step(params, adapter, opt_state, batch, key)
    -> (adapter, opt_state, metrics)``, the same call as :func:`jpeft.make_train_step`.

    The body is the single-device one (:func:`jpeft.train.make_step_fn`); XLA partitions it
    from the placements: the base as :func:`shard_params` put it, the batch split over
    ``batch_axes`` (host arrays are placed by the step; global arrays from
    :func:`jpeft.distributed.global_batch` are used as they are), and the adapter and
    optimizer state kept where they are (their shardings are read from the first call's
    arguments unless given). Metrics come back replicated. The body is traced inside
    :func:`kernels_on`, so on a TPU the models' attention runs the Pallas splash kernel in
    ``shard_map`` over the mesh.

    Args:
      loss_fn: ``loss_fn(params, adapter, batch, key)``, as for :func:`jpeft.make_train_step`.
      optimizer: an optax transformation.
      mesh: from :func:`make_mesh`.
      batch_axes: mesh axes the batch's first axis is split over.
      accumulate_steps: micro-batches per step (``lax.scan`` inside the step).
      loss_weight: the aux metric counting the loss's terms, to weigh micro-batches by it
        (as for :func:`jpeft.make_train_step`).
      donate: donate the adapter and optimizer-state buffers.
      skip_nonfinite: the non-finite guard of :func:`jpeft.train.apply_update`.
      adapter_shardings_tree, opt_state_shardings_tree: explicit output shardings.

    Raises:
      ShardingError: (at the first call) when the adapter or optimizer state is not placed
        on ``mesh``; place them with :func:`shard_adapter` and :func:`init_opt_state`.
    """
    step_fn = make_step_fn(loss_fn, optimizer, skip_nonfinite=skip_nonfinite, accumulate_steps=accumulate_steps,
                           loss_weight=loss_weight)
    entry = batch_entry(mesh, batch_axes)

    def body(*args):
        with kernels_on(mesh, batch_axes):
            return step_fn(*args)

    batch_sharding = NamedSharding(mesh, P(entry))
    replicated = NamedSharding(mesh, P())
    cache: dict = {}

    def _placed(tree, what, fix):
        shs = _tree_shardings(tree)
        for s in jax.tree.leaves(shs):
            if not (isinstance(s, NamedSharding) and s.mesh.shape == mesh.shape
                    and set(s.mesh.devices.flat) == set(mesh.devices.flat)):
                raise ShardingError(
                    f"the {what} is not placed on the step's mesh {dict(mesh.shape)}: found a leaf placed with "
                    f"{s!r}. {fix}"
                )
        return shs

    mesh_devices = set(mesh.devices.flat)

    def _check_params(params):
        for x in jax.tree.leaves(params):
            sh = getattr(x, "sharding", None)
            if sh is None or set(sh.device_set) != mesh_devices:
                raise ShardingError(
                    f"the frozen base is not placed on the step's mesh {dict(mesh.shape)}: found a leaf of shape "
                    f"{tuple(getattr(x, 'shape', ()))} placed with {sh!r}. Place it once with "
                    "jpeft.shard_params(params, mesh) (otherwise it would be copied to every device each step)."
                )

    def _compiled(params, adapter, opt_state):
        key = (jax.tree.structure(params), jax.tree.structure(adapter), jax.tree.structure(opt_state))
        fn = cache.get(key)
        if fn is None:
            _check_params(params)
            a_sh = adapter_shardings_tree or _placed(
                adapter, "adapter", "Place it with jpeft.shard_adapter(adapter, mesh, params).")
            o_sh = opt_state_shardings_tree or _placed(
                opt_state, "optimizer state", "Create it with jpeft.init_opt_state(optimizer, adapter).")
            fn = jax.jit(body, out_shardings=(a_sh, o_sh, replicated), donate_argnums=(1, 2) if donate else ())
            cache[key] = fn
        return fn

    def _prepare(params, adapter, opt_state, batch, key):
        fn = _compiled(params, adapter, opt_state)
        batch = jax.tree.map(lambda x: x if isinstance(x, jax.Array) and x.sharding == batch_sharding
                             else shard_batch(x, mesh, batch_axes), batch)
        if key is not None:
            key = put_leaf(key, replicated)
        return fn, (params, adapter, opt_state, batch, key)

    def step(params, adapter, opt_state, batch, key):
        fn, args = _prepare(params, adapter, opt_state, batch, key)
        return fn(*args)

    def lower(params, adapter, opt_state, batch, key):
        """``jax.jit(...).lower`` of the step for these arguments (inspect the HLO, or
        ``.compile().memory_analysis()`` for per-device memory); runs nothing."""
        fn, args = _prepare(params, adapter, opt_state, batch, key)
        return fn.lower(*args)

    step.lower = lower
    return DonationNamed(step, "jpeft.make_sharded_train_step") if donate else step


# ----------------------------------------------------------------------------- pmap step
def replicate(tree, devices: Optional[Sequence[Any]] = None):
    """Copies every leaf onto each device with a leading device axis, as ``jax.pmap`` takes
    replicated arguments (the base, adapter and optimizer state)."""
    devices = list(jax.local_devices() if devices is None else devices)
    mesh = Mesh(np.array(devices), ("_pmap",))
    sharding = NamedSharding(mesh, P("_pmap"))

    def rep(x):
        x = jnp.asarray(x)
        return jax.device_put(jnp.broadcast_to(x[None], (len(devices),) + x.shape), sharding)

    return jax.tree.map(rep, tree)


def unreplicate(tree):
    """The first device's copy of a replicated tree (drops the leading device axis). Every
    leaf of a tree :func:`replicate` or a pmap step made leads with the same device axis; a
    tree whose leaves do not (one that was never replicated) raises
    :class:`~jpeft.errors.InputValidationError` instead of coming back cut to its first rows."""
    shapes = [tuple(np.shape(x)) for x in jax.tree.leaves(tree)]
    if any(not s for s in shapes) or len({s[0] for s in shapes}) > 1:
        bad = next((s for s in shapes if not s), None)
        found = f"a leaf of shape {bad}" if bad is not None else \
            f"leaves leading with {sorted({s[0] for s in shapes})} entries"
        raise InputValidationError(
            f"unreplicate expects a replicated tree, every leaf leading with one device axis (as jpeft.replicate "
            f"and a pmap step's outputs have), but found {found}. Pass the tree the pmap step returned, or use "
            f"the tree as it is if it was never replicated."
        )
    return jax.tree.map(lambda x: x[0], tree)


def split_for_pmap(batch, n: Optional[int] = None):
    """``[B, ...] -> [n, B // n, ...]`` for every batch leaf (``n`` defaults to the local
    device count); device ``i`` gets examples ``i * B/n`` to ``(i + 1) * B/n``.

    >>> import jax, jax.numpy as jnp, jpeft
    >>> n = jax.local_device_count()
    >>> jpeft.split_for_pmap({"x": jnp.ones((4 * n, 3))})["x"].shape == (n, 4, 3)
    True
    >>> w = jpeft.replicate({"w": jnp.ones(3)})  # the base, adapter, optimizer state
    >>> w["w"].shape == (n, 3), jpeft.unreplicate(w)["w"].shape
    (True, (3,))
    """
    n = jax.local_device_count() if n is None else n

    def split(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.ndim == 0 or x.shape[0] % n:
            raise InputValidationError(
                f"split_for_pmap: every batch leaf is split over {n} devices along its first axis, but a leaf "
                f"has shape {tuple(x.shape)}; use a batch size that is a multiple of {n}."
            )
        return x.reshape((n, x.shape[0] // n) + tuple(x.shape[1:]))

    sizes = {path_str(kp) or "<the batch>": np.shape(x)[0]
             for kp, x in jax.tree_util.tree_leaves_with_path(batch) if np.ndim(x)}
    if len(set(sizes.values())) > 1:  # each device would pair rows of one leaf with other rows of another
        raise InputValidationError(
            f"split_for_pmap: every batch leaf must hold the same number of examples along its first axis, found "
            f"{dict(list(sizes.items())[:6])}; give every leaf the batch's rows."
        )
    return jax.tree.map(split, batch)


def _pmean_floats(tree, axis_name):
    def red(x):
        x = jnp.asarray(x)
        if jnp.issubdtype(x.dtype, jnp.inexact):
            return jax.lax.pmean(x, axis_name)
        return jax.lax.psum(x, axis_name)

    return jax.tree.map(red, tree)


def make_pmap_train_step(
    loss_fn: Callable,
    optimizer: optax.GradientTransformation,
    *,
    axis_name: str = "batch",
    devices: Optional[Sequence[Any]] = None,
    accumulate_steps: int = 1,
    loss_weight: Optional[str] = None,
    donate: bool = True,
    skip_nonfinite: bool = True,
):
    """Data-parallel step with ``jax.pmap``: ``step(params, adapter, opt_state, batch, key)``.

    ``params``, ``adapter`` and ``opt_state`` carry a leading device axis (:func:`replicate`),
    ``batch`` is split per device (:func:`split_for_pmap`), ``key`` is one key (each device
    folds in its index, so dropout masks differ across devices). Gradients, the loss and
    float metrics are averaged over devices with ``lax.pmean`` before the (identical)
    optimizer update on every device; integer metrics are summed. With ``loss_weight`` (the
    aux metric counting the loss's terms, as for :func:`jpeft.make_train_step`) each device
    counts by its terms instead, so a per-token mean over the devices' shards equals the one
    over the whole batch. Outputs keep the leading device axis; :func:`unreplicate` takes one
    copy.

    The step body is :func:`jpeft.train.make_step_fn`, the single-device one.
    """
    body = make_step_fn(
        loss_fn,
        optimizer,
        skip_nonfinite=skip_nonfinite,
        accumulate_steps=accumulate_steps,
        loss_weight=loss_weight,
        grad_reduce=((lambda t: _pmean_floats(t, axis_name)) if loss_weight is None else
                     (lambda t: weighted_sum(t, loss_weight, lambda x: jax.lax.psum(x, axis_name)))),
    )

    def per_device(params, adapter, opt_state, batch, key):
        if key is not None:
            key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
        return body(params, adapter, opt_state, batch, key)

    stepped = jax.pmap(
        per_device,
        axis_name=axis_name,
        in_axes=(0, 0, 0, 0, None),
        devices=devices,
        donate_argnums=(1, 2) if donate else (),
    )
    return DonationNamed(stepped, "jpeft.make_pmap_train_step") if donate else stepped


# ------------------------------------------------------------------------ mixed precision
def _cast_floats(tree, dtype):
    def c(x):
        if quant.is_quantized(x):
            return quant.astype(x, dtype)  # the dtype it dequantizes to, not its codes or NF4's scales
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype:
            return x.astype(dtype)
        return x

    return jax.tree.map(c, tree, is_leaf=quant.is_quantized)


def cast_base(params, dtype=jnp.bfloat16):
    """The frozen base stored in ``dtype``: every floating leaf cast, others untouched
    (keeps placements). ``bfloat16`` halves the memory of an ``float32`` base; the adapter
    is not touched and stays ``float32``. A quantized kernel keeps its codes and then
    dequantizes to ``dtype`` (NF4 keeps its float32 block scales; int8/fp8 cast their scale,
    as qwix's ``astype`` does).

    >>> import jax.numpy as jnp, jpeft
    >>> jpeft.cast_base({"w": jnp.ones(2), "i": jnp.arange(2)})["w"].dtype
    dtype(bfloat16)
    """
    return _cast_floats(params, check_float_dtype(dtype, "cast_base: dtype"))


def with_precision(loss_fn: Callable, compute_dtype=jnp.bfloat16, *, cast_batch: bool = True) -> Callable:
    """Wraps ``loss_fn`` so the forward pass runs in ``compute_dtype``.

    Inside the step, the frozen base (and, with ``cast_batch``, the floating leaves of the
    batch; integer token ids and labels are left alone) is cast to ``compute_dtype``, so
    flax layers with ``dtype=None`` compute in it; an adapter's branch computes in float32 and
    its sum with the module's output is rounded once to it, as PEFT's (docs/SCALING.md, "Mixed
    precision"). The adapter itself is not cast: it stays the
    ``float32`` master copy, its gradients come back ``float32`` through the cast, and the
    optimizer state is ``float32``. The loss is returned as ``float32``.

    Combine with :func:`cast_base` to also *store* the base in ``bfloat16``. Modules with a
    fixed ``dtype`` (jpeft's own models: their config's ``dtype``) keep computing in it: load
    them with ``from_pretrained(path, dtype=jnp.bfloat16)`` for bf16 compute.

    >>> import jax, jax.numpy as jnp, flax.linen as nn, jpeft
    >>> model = nn.Dense(2); x = jnp.ones((4, 3))
    >>> params = model.init(jax.random.key(0), x)
    >>> def loss_fn(params, adapter, batch, key):
    ...     return jnp.mean(jpeft.apply(model, params, adapter, batch) ** 2)
    >>> jpeft.with_precision(loss_fn, jnp.bfloat16)(params, None, x, None).dtype
    dtype('float32')
    """
    dt = check_float_dtype(compute_dtype, "with_precision: compute_dtype")

    def wrapped(params, adapter, batch, key):
        p = _cast_floats(params, dt)
        b = _cast_floats(batch, dt) if cast_batch else batch
        out = loss_fn(p, adapter, b, key)
        loss, aux = split_loss(out)
        loss = jnp.asarray(loss).astype(jnp.float32)
        return (loss, aux) if isinstance(out, tuple) else loss

    wrapped.__name__ = getattr(loss_fn, "__name__", "loss_fn")
    wrapped.__doc__ = getattr(loss_fn, "__doc__", None)
    return wrapped


# ------------------------------------------------------------------------ rematerialization
REMAT_POLICIES = {
    "full": None,  # save nothing inside the layer: recompute every activation
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}


def remat_policy(name):
    """The ``jax.checkpoint`` policy named ``name`` (one of :data:`REMAT_POLICIES`), or a
    policy callable returned as is.

    * ``"full"`` / ``"nothing_saveable"``: keep only each layer's input; least memory, one
      extra forward per layer in the backward pass.
    * ``"dots_saveable"``: keep matmul outputs, recompute the cheap elementwise ops.
    * ``"dots_with_no_batch_dims_saveable"``: keep only weight matmuls (not attention's
      batched ``q @ k``).
    * ``"everything_saveable"``: keep all (no saving; for comparison).

    >>> import jpeft
    >>> jpeft.remat_policy("full") is None
    True
    """
    if callable(name):
        return name
    if name not in REMAT_POLICIES:
        raise ConfigError(f"remat policy must be one of {sorted(REMAT_POLICIES)} or a jax.checkpoint policy, found {name!r}.")
    return REMAT_POLICIES[name]


def remat(module_cls, policy="full", *, static_argnums=(), prevent_cse: bool = True):
    """``nn.remat`` (``jax.checkpoint``) of a linen layer class with a named policy: use it
    for each transformer block, ``Block = jpeft.remat(Block, "dots_saveable")``.
    ``static_argnums`` counts ``self`` as argument 0 (flax's convention), e.g. ``(2,)`` for a
    ``deterministic`` flag passed positionally after the input."""
    return nn.remat(module_cls, policy=remat_policy(policy), static_argnums=static_argnums, prevent_cse=prevent_cse)
