"""The method protocol (jpeft.methods.base): a toy method defined here, outside the package,
through the public protocol only, gets init, apply, merge, save/load, sharding specs and
summary with no change to jpeft; frozen adapter arrays get no gradient and no optimizer state;
and the import graph keeps methods behind the protocol."""

from __future__ import annotations

import ast
import dataclasses
import functools
import pathlib
import re
from typing import Any, ClassVar

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import jpeft
from jpeft.config import AdapterConfig, _as_targets
from jpeft.methods._common import (broadcast_out, down_project, from_matrix, linear_candidates, linear_layout, to_matrix,
                                   up_project)
from jpeft.methods.base import (Call, Method, Site, method_of, register_method, registered_methods, split_frozen,
                                static_field)
from jpeft.scan import make_site
from jpeft.tree import select

ROOT = pathlib.Path(__file__).resolve().parents[1] / "jpeft"


# -- a toy method, written the way docs/ARCHITECTURE.md "Adding a method" says --------------------------
@dataclasses.dataclass(frozen=True)
class ToyConfig(AdapterConfig):
    """``y + s * (x @ P) * d``: a frozen random projection ``P: [in, out]`` (saved, never
    trained) and a trainable per-output scale ``d`` (zero at init, so the start is the base)."""

    peft_type: ClassVar[str] = "JPEFT_TEST_TOY"
    target_modules: Any = ".*"
    scale: float = 0.5

    def __post_init__(self):
        object.__setattr__(self, "target_modules", _as_targets(self.target_modules))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ToyWeights(Site):
    d: jax.Array
    proj: jax.Array
    layout: Any = static_field(default=None)
    scale: float = static_field(default=1.0)

    mergeable: ClassVar[bool] = True
    frozen: ClassVar[tuple] = ("proj",)

    def delta(self):
        return self.scale * self.proj * self.d[None, :]

    def intercept(self, call: Call):
        y = call.run()
        x = call.args[0]
        h = down_project(x.astype(y.dtype), self.proj.astype(y.dtype), self.layout, call.module)
        return y + self.scale * h * broadcast_out(self.d.astype(y.dtype), h.ndim, self.layout)

    def merge(self, own):
        k = self.layout.param_name
        return {**own, k: from_matrix(to_matrix(own[k], self.layout) + self.delta(), self.layout).astype(own[k].dtype)}

    def unmerge(self, own):
        k = self.layout.param_name
        return {**own, k: from_matrix(to_matrix(own[k], self.layout) - self.delta(), self.layout).astype(own[k].dtype)}


def toy_init(config: ToyConfig, params, key, infos):
    leaves, cands = linear_candidates(params)
    out = {}
    for k, path in zip(jax.random.split(key, len(cands)), sorted(select(config.target_modules, cands))):
        lay = linear_layout(path, leaves[path], infos)

        def make(kk, own, lay=lay):
            proj = jax.random.normal(kk, (lay.in_features, lay.out_features)) / np.sqrt(lay.in_features)
            return ToyWeights(jnp.zeros((lay.out_features,)), proj, lay, config.scale)

        out[path] = make_site(make, path, lay, k, leaves[path])
    return out


TOY = register_method(Method(config=ToyConfig, init=toy_init, nodes=(ToyWeights,)))


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="out")(jax.nn.relu(nn.Dense(5, name="hidden")(x)))


@pytest.fixture(scope="module")
def setup():
    model = Net()
    x = jax.random.normal(jax.random.key(0), (4, 6))
    params = model.init(jax.random.key(1), x)
    adapter = jpeft.init(ToyConfig(), params, jax.random.key(2), model, x)
    # every adapter tensor random (d is zero at init: identity; moved here so nothing is a no-op)
    adapter = {p: dataclasses.replace(n, d=jax.random.normal(jax.random.fold_in(jax.random.key(3), i), n.d.shape))
               for i, (p, n) in enumerate(sorted(adapter.items()))}
    return model, params, x, adapter


def _closed_form(params, adapter, x):
    p = params["params"]
    h = x @ p["hidden"]["kernel"] + p["hidden"]["bias"][None, :]
    n = adapter["hidden"]
    h = h + n.scale * (x @ n.proj) * n.d[None, :]
    h = jax.nn.relu(h)
    y = h @ p["out"]["kernel"] + p["out"]["bias"][None, :]
    n = adapter["out"]
    return y + n.scale * (h @ n.proj) * n.d[None, :]


def test_toy_registered_through_the_protocol():
    assert method_of(ToyConfig()) is TOY and TOY in registered_methods()
    assert AdapterConfig.from_dict(ToyConfig(scale=0.25).to_dict()) == ToyConfig(scale=0.25)


def test_toy_init_apply_merge(setup):
    model, params, x, adapter = setup
    fresh = jpeft.init(ToyConfig(), params, jax.random.key(2), model, x)
    chex.assert_trees_all_equal(jpeft.apply(model, params, fresh, x), model.apply(params, x))  # identity at init
    y = jpeft.apply(model, params, adapter, x)
    chex.assert_trees_all_close(y, _closed_form(params, adapter, x), atol=1e-5)
    assert float(jnp.max(jnp.abs(y - model.apply(params, x)))) > 1e-2
    merged = jpeft.merge(params, adapter)
    chex.assert_trees_all_close(model.apply(merged, x), y, atol=1e-5)
    chex.assert_trees_all_close(jpeft.unmerge(merged, adapter), params, atol=1e-5)


def test_toy_summary_counts_frozen_apart(setup):
    model, params, x, adapter = setup
    s = jpeft.summary(params, adapter, print_fn=None)
    assert s["trainable"] == 5 + 3
    assert s["frozen"] == 6 * 5 + 5 * 3
    assert s["trainable_bytes"] == 4 * (5 + 3)


def test_toy_save_load(setup, tmp_path):
    model, params, x, adapter = setup
    jpeft.save_adapter(tmp_path / "toy", ToyConfig(), adapter, params=params)
    config, loaded = jpeft.load_adapter(tmp_path / "toy", params, model, x)
    assert config == ToyConfig()
    chex.assert_trees_all_equal(loaded, adapter)


def test_toy_sharding_specs(setup):
    model, params, x, adapter = setup
    specs = jpeft.adapter_specs(adapter, jax.tree.map(lambda _: P(), params))
    assert set(specs) == set(adapter)
    assert all(s == P() for s in jax.tree.leaves(specs, is_leaf=lambda v: isinstance(v, P)))


def _loss(model):
    def loss_fn(params, adapter, batch, key):
        return jnp.mean((jpeft.apply(model, params, adapter, batch["x"]) - batch["y"]) ** 2)

    return loss_fn


def test_frozen_arrays_get_no_gradient_and_no_optimizer_state(setup):
    model, params, x, adapter = setup
    opt = optax.adam(1e-2)
    train, frozen = split_frozen(adapter)
    assert [n.proj for n in train.values()] == [None, None]
    state = jpeft.init_opt_state(opt, jax.device_put(adapter, jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",)), P())))
    mu = state[0].mu
    assert sorted(jax.tree.leaves(jax.tree.map(lambda a: a.size, mu))) == [3, 5]  # d only, no proj
    step = jpeft.make_train_step(_loss(model), opt, donate=False)
    batch = {"x": x, "y": jnp.ones((4, 3))}
    new, new_state, metrics = step(params, adapter, opt.init(jpeft.trainable(adapter)), batch, jax.random.key(0))
    assert int(metrics["skipped"]) == 0
    for p in adapter:
        chex.assert_trees_all_equal(new[p].proj, adapter[p].proj)  # frozen: unchanged
        assert not np.allclose(new[p].d, adapter[p].d)  # trained
    grads = jax.grad(lambda t: _loss(model)(params, jpeft.join_frozen(t, frozen), batch, None))(train)
    assert sorted(x.size for x in jax.tree.leaves(grads)) == [3, 5]


def test_checkpoint_restores_frozen_arrays_without_optimizer_state(setup, tmp_path):
    model, params, x, adapter = setup
    opt = optax.adam(1e-2)
    state = opt.init(jpeft.trainable(adapter))
    with jpeft.checkpoint.CheckpointManager(tmp_path / "ckpt", ToyConfig(), params, optimizer=opt) as mngr:
        mngr.save(3, adapter, state, jax.random.key(0), force=True)
        mngr.wait()
        got = mngr.restore_latest()
    chex.assert_trees_all_equal(got.adapter, adapter)  # the frozen projections come back with it
    chex.assert_trees_all_equal(got.opt_state, state)  # and the Adam state holds the trainable d only


def test_optimizer_state_over_frozen_arrays_is_refused(setup):
    model, params, x, adapter = setup
    opt = optax.adam(1e-2)
    step = jpeft.make_train_step(_loss(model), opt, donate=False)
    with pytest.raises(jpeft.ConfigError, match="init_opt_state"):
        step(params, adapter, opt.init(adapter), {"x": x, "y": jnp.ones((4, 3))}, jax.random.key(0))
    # the fix the error names works as written on one device, no mesh needed
    state = jpeft.init_opt_state(opt, adapter)
    chex.assert_trees_all_equal(state, opt.init(jpeft.trainable(adapter)))
    _, _, metrics = step(params, adapter, state, {"x": x, "y": jnp.ones((4, 3))}, jax.random.key(0))
    assert int(metrics["skipped"]) == 0


def test_repeated_steps_compile_once(setup):
    model, params, x, adapter = setup
    opt = optax.sgd(1e-2)
    step = jpeft.make_train_step(chex.assert_max_traces(_loss(model), n=1), opt, donate=False)
    state = opt.init(jpeft.trainable(adapter))
    for i in range(3):
        batch = {"x": x + i, "y": jnp.ones((4, 3))}
        adapter, state, _ = step(params, adapter, state, batch, jax.random.key(i))


def test_layout_dispatch_matches_the_kernel(setup):
    """down_project / up_project through a kernel's own matrix reproduce the module's output."""
    model, params, x, adapter = setup
    lay = adapter["hidden"].layout
    w = params["params"]["hidden"]["kernel"]
    mat = to_matrix(w, lay)
    got = up_project(down_project(x, mat[:, :2], lay), jnp.eye(2, lay.out_features), lay)
    chex.assert_shape(got, (4, 5))
    chex.assert_trees_all_close(got[:, :2], (x @ w)[:, :2], atol=1e-5)


# -- the import graph -------------------------------------------------------------------------------------
_PROTOCOL = {"jpeft.methods", "jpeft.methods.base", "jpeft.methods._common"}


@functools.lru_cache(maxsize=None)
def _parsed(path: pathlib.Path) -> ast.Module:
    """``path`` parsed once for the tests below that only read the tree."""
    return ast.parse(path.read_text())


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: pathlib.Path, known: set) -> set:
    """Every jpeft module ``path`` imports (at any depth: top level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known}
    return {m for m in out if m.startswith("jpeft")}


def test_import_graph_keeps_methods_behind_the_protocol():
    """Outside jpeft/methods/ no module imports a method module, jpeft/__init__.py included: it
    takes the methods' public names from ``jpeft.methods``, whose ``__init__`` imports them (and
    so registers them)."""
    files = sorted(ROOT.rglob("*.py"))
    known = {_module_name(f) for f in files}
    method_modules = {m for m in known if m.startswith("jpeft.methods.")} - _PROTOCOL
    registered = {m.config.__module__ for m in registered_methods()} | {
        n.__module__ for m in registered_methods() for n in m.nodes}
    # the protocol's own node (a module's full copy, SavedModule): LoRA's modules_to_save, and any method's copy of
    # a SEQ_CLS classifier read by jpeft.hf
    assert {m for m in registered if m.startswith("jpeft.")} <= method_modules | {"jpeft.methods._common"}
    bad = {}
    for f in files:
        name = _module_name(f)
        if name.startswith("jpeft.methods"):
            continue
        hits = _imports(f, known) & method_modules
        if hits:
            bad[name] = sorted(hits)
    assert bad == {}, f"modules outside jpeft/methods/ import method modules: {bad}"


def test_tests_benchmarks_and_examples_import_no_method_module():
    """Tests (but a method's own ``tests/test_methods_*.py``), benchmarks, examples and TPU scripts
    take the methods' public names from ``jpeft`` or the ``jpeft.methods`` package, as a user
    does, never from a method module."""
    known = {_module_name(f) for f in ROOT.rglob("*.py")}
    method_modules = {m for m in known if m.startswith("jpeft.methods.")} - _PROTOCOL
    top = ROOT.parent
    bad = {}
    for f in sorted(p for d in ("tests", "benchmarks", "examples", "tpu") for p in (top / d).rglob("*")
                    if p.suffix in (".py", ".ipynb")):
        if f.name.startswith("test_methods_"):
            continue
        if f.suffix == ".py":
            hits = _imports(f, known) & method_modules
        else:  # a notebook: its code cells' text
            hits = {m for m in method_modules if re.search(rf"\b{re.escape(m)}\b", f.read_text())}
            hits |= {m for m in method_modules if re.search(
                rf"from jpeft\.methods import [^\n]*\b{m.rsplit('.', 1)[1]}\b", f.read_text())}
        if hits:
            bad[str(f.relative_to(top))] = sorted(hits)
    assert bad == {}, f"files that import method modules: {bad}"


def test_no_node_class_is_named_outside_its_method():
    """The node classes of every registered method appear in no code outside jpeft/methods/
    (jpeft/__init__.py re-exports some for users from ``jpeft.methods``: an import, not a use)."""
    node_names = {n.__name__ for m in registered_methods() for n in m.nodes if n.__module__.startswith("jpeft.")}
    bad = {}
    for f in sorted(ROOT.rglob("*.py")):
        name = _module_name(f)
        if name.startswith("jpeft.methods"):
            continue
        used = {n.id for n in ast.walk(ast.parse(f.read_text())) if isinstance(n, ast.Name)}
        used |= {n.attr for n in ast.walk(ast.parse(f.read_text())) if isinstance(n, ast.Attribute)}
        if used & node_names:
            bad[name] = sorted(used & node_names)
    assert bad == {}, bad


# isinstance tests of a method's config class left outside jpeft/methods/, with the reason: the forgetting
# runner's CorDA and O-LoRA options are LoRA's own (they set, or penalise, LoRA's A and B).
_CONFIG_TYPE_TESTS_LEFT = {("jpeft.forgetting.benchmark", "LoraConfig")}


def test_code_outside_the_methods_asks_a_config_rather_than_testing_its_class():
    """Outside jpeft/methods/, code asks a config what it needs (``trains_every_weight``,
    ``residual_init``, ``adapts_lm_head()``, ...) rather than ``isinstance(config, SomeConfig)``:
    a new method then gets the behaviour by answering, with no consumer to change."""
    config_names = {m.config.__name__ for m in registered_methods() if m.config.__module__.startswith("jpeft.")}
    found = set()
    for f in sorted(ROOT.rglob("*.py")):
        name = _module_name(f)
        if name.startswith("jpeft.methods"):
            continue
        for node in ast.walk(_parsed(f)):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("isinstance", "issubclass"):
                names = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)}
                names |= {n.attr for n in ast.walk(node.args[1]) if isinstance(n, ast.Attribute)}
                found |= {(name, c) for c in names & config_names}
    assert found == _CONFIG_TYPE_TESTS_LEFT, sorted(found ^ _CONFIG_TYPE_TESTS_LEFT)


def test_the_protocol_imports_no_method():
    files = sorted(ROOT.rglob("*.py"))
    known = {_module_name(f) for f in files}
    method_modules = {m for m in known if m.startswith("jpeft.methods.")} - _PROTOCOL
    for mod in _PROTOCOL - {"jpeft.methods"}:  # the package itself imports every method: it registers them
        f = ROOT.parent / (mod.replace(".", "/") + ".py")
        assert not (_imports(f, known) & method_modules), mod


# The layered order of docs/ARCHITECTURE.md ("The dependency direction"), bottom up: a module
# here imports jpeft modules of lower layers only (the method modules may also import one
# another: LoRA's files, prompt tuning's to_prefix). Everything not listed (jpeft.models, the
# consumers, the CLI, jpeft/__init__.py) sits above and may import any of these.
_LAYERS = [
    {"jpeft.errors", "jpeft._version", "jpeft._hostmem", "jpeft._reads"},
    {"jpeft.tree", "jpeft._files", "jpeft._checksum", "jpeft._safe_read"},
    {"jpeft.config", "jpeft.validate", "jpeft.data", "jpeft._safetensors"},
    {"jpeft.methods.base"},
    {"jpeft.quant", "jpeft.peft_format", "jpeft._ops", "jpeft._hfconfig", "jpeft._splash"},
    {"jpeft.spectral", "jpeft.scan", "jpeft._fingerprint"},
    {"jpeft._inject"},
    {"jpeft._nnx"},
    {"jpeft.core"},
    {"jpeft.methods._common"},
    "the method modules",
    {"jpeft.methods"},
    {"jpeft.train", "jpeft.io"},
    {"jpeft.parallel"},
    {"jpeft.distributed"},
    {"jpeft.checkpoint"},
    "the model modules",
]


def _imported_modules(path: pathlib.Path, known: set) -> set:
    """The jpeft modules ``path`` imports, ``from jpeft import scan`` counted as ``jpeft.scan``
    (not as the package ``jpeft``), at any depth."""
    out = set()
    for node in ast.walk(_parsed(path)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            subs = {f"{node.module}.{a.name}" for a in node.names} & known
            out |= subs if subs else {node.module}
    return {m for m in out if m == "jpeft" or m.startswith("jpeft.")}


def test_dependencies_point_one_way():
    """Every module up to the models imports only jpeft modules of lower layers (``_LAYERS``;
    the method modules may import one another, as may the model modules): the methods import no
    part of ``jpeft.models`` (the low-level ops they share with the models are ``jpeft._ops`` and
    ``jpeft._hfconfig``), the training step, file formats, mesh code and checkpoints the models'
    loader uses import no model module back, and nothing they import imports them back, so
    importing ``jpeft.methods`` first (as ``jpeft/__init__.py`` does) loads everything in one
    order, with no module half-imported."""
    files = sorted(ROOT.rglob("*.py"))
    known = {_module_name(f) for f in files}
    method_modules = {m for m in known if m.startswith("jpeft.methods.")} - _PROTOCOL
    model_modules = {m for m in known if m == "jpeft.models" or m.startswith("jpeft.models.")}
    groups = {"the method modules": method_modules, "the model modules": model_modules}  # import one another
    layers = [groups.get(layer, layer) if isinstance(layer, str) else layer for layer in _LAYERS]
    listed = set().union(*layers)
    assert listed <= known, sorted(listed - known)
    level = {m: i for i, layer in enumerate(layers) for m in layer}
    bad = {}
    for f in files:
        me = _module_name(f)
        if me not in level:
            continue
        for dep in _imported_modules(f, known) - {me}:
            same_group = any(dep in g and me in g for g in groups.values())
            if not same_group and level.get(dep, len(layers)) >= level[me]:
                bad.setdefault(me, []).append(dep)
    assert bad == {}, f"modules that import a module of their own layer or above: {bad}"


def test_no_import_cycle_above_the_layers_either():
    """No module imports, at any depth, a module that imports it back through others:
    test_dependencies_point_one_way covers layers 1-17, this covers the consumers too (hf, merging,
    bank, loop, generate, budget, fuzz, forgetting, serve, cli), which may import anything below
    but not one another in a ring. Not counted: ``import jpeft`` (a consumer using the public names as a user does, at
    call time) and the parent packages an import runs first (``jpeft.methods`` when ``scan``
    imports ``jpeft.methods.base``), whose order test_any_first_import_registers_every_method checks."""
    files = sorted(ROOT.rglob("*.py"))
    known = {_module_name(f) for f in files}
    graph = {_module_name(f): _imported_modules(f, known) - {"jpeft", _module_name(f)} for f in files}
    index, low, stack, cycles = {}, {}, [], []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            ring = stack[stack.index(v):]
            del stack[stack.index(v):]
            if len(ring) > 1:
                cycles.append(sorted(ring))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == [], cycles


def test_no_module_imports_by_name_at_run_time():
    """No jpeft module imports another by a name it holds as data (``importlib.import_module``,
    ``__import__``): the import-graph tests above could not see such an import, so a ring through
    it would hide (the forgetting runner looked up its benchmarks so until audit round 23)."""
    found = sorted(f"{_module_name(f)}:{node.lineno}" for f in ROOT.rglob("*.py") for node in ast.walk(_parsed(f))
                   if isinstance(node, ast.Call) and (
                       (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                       or (isinstance(node.func, ast.Name) and node.func.id in ("__import__", "import_module"))))
    assert found == [], found


_FRESH = ("{stmt}\n"
          "from jpeft.methods.base import registered_methods\n"
          "print(sorted(m.config.peft_type for m in registered_methods()))")


@pytest.mark.parametrize("stmt", ["import jpeft.methods.base", "import jpeft.models", "import jpeft.scan", "import jpeft"])
def test_any_first_import_registers_every_method(stmt):
    """In a fresh interpreter, importing any part of jpeft first works and registers every method
    (``jpeft.methods`` imports the method modules; a submodule imported first runs
    ``jpeft/__init__.py``, which imports ``jpeft.methods`` before any helper that imports
    ``jpeft.methods.base``). Every ``register_method`` call in jpeft/methods/ is counted, so a new
    method file that ``jpeft/methods/__init__.py`` does not import fails here."""
    import os
    import subprocess
    import sys

    calls = sum(isinstance(n, ast.Call) and getattr(n.func, "id", None) == "register_method"
                for f in (ROOT / "methods").glob("*.py") for n in ast.walk(ast.parse(f.read_text())))
    want = sorted(m.config.peft_type for m in registered_methods() if m.config.__module__.startswith("jpeft."))
    assert len(want) == calls, (want, calls)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT.parent), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", _FRESH.format(stmt=stmt)], env=env, cwd=ROOT.parent,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == str(want), r.stdout


def test_public_names_are_the_methods_own_objects():
    """``jpeft`` re-exports the methods' public names from ``jpeft.methods`` (one list), each the
    very object its method module defines."""
    import jpeft.methods as methods

    for name in methods.__all__:
        assert name in jpeft.__all__ and getattr(jpeft, name) is getattr(methods, name), name
    assert jpeft.adalora_allocator is methods.adalora.allocator and jpeft.LoraConfig is methods.lora.LoraConfig


# The jpeft modules imported inside functions, each for a path only some calls take, because its
# import is slow (docs/ARCHITECTURE.md, "The dependency direction" and "Start-up time"): the
# server (Starlette and uvicorn, ``jpeft serve`` only), and the NNX adapter code and NNX Llama
# (flax.nnx), imported where an NNX value was found (``jpeft.tree.is_nnx``) or ``api="nnx"``
# asked for. They still count as imports for the layer order (test_dependencies_point_one_way).
_IMPORTED_IN_FUNCTIONS = {
    ("jpeft.cli.serve_cmd", "jpeft.serve.app"),
    ("jpeft.core", "jpeft._nnx"), ("jpeft.merging", "jpeft._nnx"), ("jpeft.methods.corda", "jpeft._nnx"),
    ("jpeft.hf", "jpeft._nnx"),
    ("jpeft.models.loading", "jpeft.models.llama_nnx"),
}


def test_jpeft_imports_inside_functions_are_optional_only():
    """An import inside a function is for an optional dependency or a slow path only some calls
    take, never to hide a cycle: the jpeft modules imported there are the listed ones, and the
    NNX ones are those that import flax.nnx (the reason they wait)."""
    known = {_module_name(f) for f in ROOT.rglob("*.py")}
    found = set()
    for f in sorted(ROOT.rglob("*.py")):
        for fn in ast.walk(ast.parse(f.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level:
                    names = ["jpeft (relative)"]
                elif isinstance(node, ast.ImportFrom):  # from jpeft import _nnx: the module jpeft._nnx
                    names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                             for a in node.names]
                else:
                    continue
                found |= {(_module_name(f), n) for n in names if n.startswith("jpeft")}
    assert found == _IMPORTED_IN_FUNCTIONS, sorted(found ^ _IMPORTED_IN_FUNCTIONS)
    nnx_importers = {_module_name(f) for f in ROOT.rglob("*.py")
                     if re.search(r"^(from flax import nnx|import flax\.nnx)", f.read_text(), re.M)}
    assert nnx_importers == {m for _, m in _IMPORTED_IN_FUNCTIONS} - {"jpeft.serve.app"}, nnx_importers


# The other modules imported inside functions (by name or dotted prefix), each optional or slow to import and
# needed by some calls only, with the reason; test_import_jpeft_leaves_flax_nnx_and_qwix_until_used checks that
# `import jpeft` (and every subcommand's module) loads none of them, but the one marked as loaded.
_OPTIONAL_IN_FUNCTIONS = {
    "transformers": "tokenizers (text data, prompt tuning's TEXT init); slow, and imported with torch hidden",
    "tokenizers": "the demo's byte-level tokenizer",
    "torch": "the fuzzer's reference; TensorBoard's writer; VeRA's projections of a PEFT file saved without them "
             "(save_projection=False), regenerated with torch's generator",
    "peft": "the fuzzer's reference loader",
    "tensorboardX": "TensorBoard logs without torch",
    "matplotlib": "plots",
    "sklearn": "the digits benchmark",
    "scipy": "the paired t-test (scipy.stats costs ~1.3 s of start-up)",
    "tqdm": "progress bars",
    "orbax": "training checkpoints",
    "qwix": "int8 and fp8 bases (it imports flax.nnx)",
    "flax.nnx": "NNX values, which exist only once their owner imported flax.nnx (jpeft.tree.loaded_nnx)",
    "tomllib": "TOML configs", "tomli": "TOML configs on Python 3.10",
    "pydoc_data": "the prose corpus; absent from stripped Python builds",
    "jax.experimental.pallas": "the TPU splash-attention kernel (attention='splash')",
    "jax.experimental.multihost_utils": "gathers and agreement across processes (multi-process runs)",
    "jax._src.distributed": "loaded: the one JAX-internal module jpeft reads (no public accessor), at its one use, so "
                            "that only that call breaks if JAX moves it",
}
# stdlib modules imported inside functions although `import jpeft` has loaded them: none left (the Ctrl-C
# handling and error report of jpeft/cli/__init__.py were the last, moved to its top in audit round 22).
_STDLIB_LEFT_IN_FUNCTIONS: set = set()


def _optional(name: str) -> bool:
    return any(name == m or name.startswith(m + ".") for m in _OPTIONAL_IN_FUNCTIONS)


def test_other_imports_inside_functions_are_optional_or_slow():
    """An import inside a function of a module that is not jpeft's is of an optional or slow
    dependency (``_OPTIONAL_IN_FUNCTIONS``, each with its reason), never of one every process
    has loaded already (``warnings``, ``numpy``, ``jax``, ``ml_dtypes``: they belong at the top)."""
    found = set()
    for f in sorted(ROOT.rglob("*.py")):
        for fn in ast.walk(_parsed(f)):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level:
                    names = [f"{node.module}.{a.name}" for a in node.names]
                else:
                    continue
                found |= {(_module_name(f), n) for n in names if not n.startswith("jpeft") and not _optional(n)}
    assert found == _STDLIB_LEFT_IN_FUNCTIONS, sorted(found ^ _STDLIB_LEFT_IN_FUNCTIONS)


_KINDS = {"dense", "dense_general", "conv", "einsum", "embed"}


def test_layout_kinds_are_named_by_the_enum():
    """A layout's kind is compared with the members of ``methods.base.Kind``, never with the
    strings they equal (``lay.kind == "embed"``, ``kind="conv"``): the enum is the one list
    of kinds, so a search for ``Kind.EMBED`` finds every place that treats embeddings apart."""
    assert {k.value for k in jpeft.methods.base.Kind} == _KINDS
    bad = []
    for f in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(_parsed(f)):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                kind = any(isinstance(n, ast.Attribute) and n.attr == "kind" or isinstance(n, ast.Name) and n.id == "kind"
                           for side in sides for n in ast.walk(side))
                strs = [n.value for side in sides for n in ast.walk(side)
                        if isinstance(n, ast.Constant) and n.value in _KINDS]
            elif isinstance(node, ast.keyword) and node.arg == "kind":
                kind, strs = True, [n.value for n in ast.walk(node.value) if isinstance(n, ast.Constant) and n.value in _KINDS]
            else:
                continue
            if kind and strs:
                bad.append(f"{f.relative_to(ROOT.parent)}:{node.lineno} {strs}")
    assert bad == [], bad


_STARTUP = """
import json, sys
import jpeft
from jpeft.cli import build_parser
build_parser()  # every subcommand's module
before = {m: m in sys.modules for m in ("flax.nnx", "qwix", "jpeft._nnx", "jpeft.models.llama_nnx")}
optional_loaded = sorted(m for m in json.loads(sys.argv[1]) if m in sys.modules)
import importlib
for pkg in ("jpeft", "jpeft.methods", "jpeft.models", "jpeft.forgetting", "jpeft.serve", "jpeft.cli"):
    mod = importlib.import_module(pkg)
    for name in mod.__all__:
        exec(f"from {pkg} import {name}")
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
class Net(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(3, 4, rngs=rngs)
    def __call__(self, x):
        return self.fc(x)
graphdef, state = nnx.split(Net(nnx.Rngs(0)))
adapter = jpeft.init(jpeft.LoraConfig(r=2, alpha=4, target_modules=["fc"]), state, jax.random.key(1), graphdef,
                     jnp.ones((1, 3)))
import dataclasses
node = adapter["fc"]
adapter = {"fc": dataclasses.replace(node, lora_B=jax.random.normal(jax.random.key(2), node.lora_B.shape))}
x = jax.random.normal(jax.random.key(3), (2, 3))
w, b = state["fc"]["kernel"].get_value(), state["fc"]["bias"].get_value()
want = x @ w + b + 2.0 * (x @ adapter["fc"].lora_A) @ adapter["fc"].lora_B
got = jpeft.apply(graphdef, state, adapter, x)
q = jpeft.quantize({"params": {"d": {"kernel": np.ones((4, 4), np.float32)}}}, "int8", target_modules=".*")
print(json.dumps({"before": before, "optional_loaded": optional_loaded, "nnx_err": float(jnp.abs(got - want).max()),
                  "int8": [jpeft.quant.is_quantized(q["params"]["d"]["kernel"]), "qwix" in sys.modules,
                           float(np.abs(np.asarray(jpeft.dequantize(q)["params"]["d"]["kernel"]) - 1).max())]}))
"""


def test_import_jpeft_leaves_flax_nnx_and_qwix_until_used():
    """A fresh ``import jpeft`` (and every ``jpeft`` subcommand's module) does not import
    ``flax.nnx`` (nor qwix, which imports it): about 0.4 CPU-s of every ``jpeft`` process and test
    subprocess (docs/ARCHITECTURE.md, "Start-up time"), nor the modules functions import for some
    calls only (``_OPTIONAL_IN_FUNCTIONS``). Every public name still resolves; a
    program that imports ``flax.nnx`` after jpeft adapts an NNX model with the numbers of the
    closed form ``x W + b + s (x A) B`` (random B); an int8 base quantizes and dequantizes."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT.parent), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", _STARTUP, json.dumps(sorted(_OPTIONAL_IN_FUNCTIONS))], env=env,
                       cwd=ROOT.parent, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["before"] == {"flax.nnx": False, "qwix": False, "jpeft._nnx": False, "jpeft.models.llama_nnx": False}
    # what functions import for some calls only is not loaded by every process anyway
    assert got["optional_loaded"] == sorted(m for m, why in _OPTIONAL_IN_FUNCTIONS.items() if why.startswith("loaded:"))
    assert got["nnx_err"] < 1e-5, got
    assert got["int8"][:2] == [True, True] and got["int8"][2] < 1e-2, got


# private names one module takes from another: none is left (a shared helper is public in the
# module that owns it); keep it empty. config._as_targets is the documented way a method config
# normalises target_modules (docs/ARCHITECTURE.md, "Adding a method").
_PRIVATE_IMPORTS_LEFT: set = set()


def test_no_module_takes_another_modules_private_names():
    """``from jpeft.x import _name`` or ``x._name`` (``x`` a jpeft module) in another module
    couples it to what ``x`` calls private; only the listed, older cases remain."""
    import importlib
    import importlib.util
    import types

    found = set()
    for f in sorted(ROOT.rglob("*.py")):
        tree = ast.parse(f.read_text())
        me = _module_name(f)
        modules = {}  # local name -> jpeft module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jpeft") and not node.level:
                src = importlib.import_module(node.module)
                for a in node.names:
                    obj = getattr(src, a.name, None)
                    if obj is None and importlib.util.find_spec(f"{node.module}.{a.name}") is not None:
                        obj = importlib.import_module(f"{node.module}.{a.name}")  # a submodule not imported yet
                    if isinstance(obj, types.ModuleType):
                        modules[a.asname or a.name] = obj.__name__
                    elif a.name.startswith("_") and not a.name.startswith("__") and a.name != "_as_targets":
                        found.add((me, f"{node.module}.{a.name}"))
            elif isinstance(node, ast.Import):
                modules.update({a.asname: a.name for a in node.names if a.asname and a.name.startswith("jpeft")})
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                    and node.attr.startswith("_") and not node.attr.startswith("__")
                    and modules[node.value.id] != me):
                found.add((me, f"{modules[node.value.id]}.{node.attr}"))
    assert found <= _PRIVATE_IMPORTS_LEFT, sorted(found - _PRIVATE_IMPORTS_LEFT)


def test_jpeft_info_counts_frozen_arrays_apart(capsys):
    """``jpeft info`` on Llama-2-7B (shapes only) with the toy method on q_proj: the frozen
    projections are not trainable parameters; Adam state is counted for the trainable ones only."""
    import json

    from jpeft.cli import main

    assert main(["info", "llama-2-7b", "--method", "jpeft_test_toy", "--target", "q_proj", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    layers, hidden = 32, 4096
    assert got["trainable_params"] == layers * hidden
    assert got["frozen_adapter_params"] == layers * hidden * hidden
    assert got["train_state_bytes"] == layers * hidden * 4 * 3 + layers * hidden * hidden * 4


def test_one_test_for_typed_keys_and_one_way_to_name_a_tree_path():
    """Typed PRNG keys are told apart in one place (``jpeft.tree.is_typed_key``; the checkpoint
    writer, the placer, the key check and ``host_array`` ask it), and a tree path is named one way
    (``jpeft.tree.path_str``, which ``jpeft.io.leaf_names`` and the checkpoints' array names use)."""
    from jpeft.io import leaf_names
    from jpeft.tree import is_typed_key, path_str

    assert is_typed_key(jax.random.key(0)) and is_typed_key(jax.eval_shape(jax.random.key, 0))
    assert not is_typed_key(jax.random.PRNGKey(0)) and not is_typed_key(np.zeros(2, np.uint32))
    assert not is_typed_key(0)
    users = sorted(_module_name(f) for f in ROOT.rglob("*.py") if "dtypes.prng_key" in f.read_text())
    assert users == ["jpeft.tree"], users
    tree = {"": {"w": jnp.zeros(1)}, "a/q": {"lora_A": jnp.zeros(1), "m": [jnp.zeros(1), {"": jnp.zeros(1)}]}}
    named = [n for n, _ in leaf_names(tree)]
    assert named == [path_str(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    assert named == ["w", "a/q/lora_A", "a/q/m/0", "a/q/m/1"]


def test_peft_task_types_are_the_configs_not_a_table_of_peft_types():
    """Which PEFT task types a saved adapter may carry is the config's ``peft_task_types``;
    ``jpeft.hf`` names no method's ``peft_type``."""
    from jpeft.hf import _task_type

    assert jpeft.PrefixTuningConfig.peft_task_types["encoder"] == ("FEATURE_EXTRACTION",)
    assert jpeft.PromptTuningConfig.peft_task_types["encoder"] == ("FEATURE_EXTRACTION", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")
    assert jpeft.IA3Config.peft_task_types is AdapterConfig.peft_task_types
    src = (ROOT / "hf.py").read_text()
    assert "PREFIX_TUNING" not in src and "PROMPT_TUNING" not in src
    bert = {"bert": {"x": {"kernel": np.zeros((2, 2))}}}
    assert _task_type(jpeft.PrefixTuningConfig(), [""], bert, "auto", None) == "FEATURE_EXTRACTION"
    with pytest.raises(jpeft.errors.UnsupportedAdapterError, match=r"it can take task_type in \['FEATURE_EXTRACTION'\]"):
        _task_type(jpeft.PrefixTuningConfig(), [""], bert, "SEQ_CLS", None)
    assert _task_type(jpeft.PromptTuningConfig(), [""], None, "auto", None) == "CAUSAL_LM"  # base unknown
    assert _task_type(ToyConfig(), ["hidden"], None, "auto", None) is None


def test_parallel_functions_have_one_public_name():
    """The mesh, sharding and pmap functions are public once: at the top level (``jpeft.make_mesh``,
    what README.md and docs/ name); ``jpeft.parallel``, where they live, exports only what the top
    level does not (docs/ARCHITECTURE.md, "One public name"), and the docs never name them
    through it."""
    from jpeft import parallel

    top = {n for n in jpeft.__all__ if getattr(getattr(jpeft, n), "__module__", None) == "jpeft.parallel"}
    assert len(top) == 20 and all(getattr(jpeft, n) is getattr(parallel, n) for n in top), sorted(top)
    assert not set(jpeft.__all__) & set(parallel.__all__), sorted(set(jpeft.__all__) & set(parallel.__all__))
    docs = [ROOT.parent / "README.md", *sorted((ROOT.parent / "docs").glob("*.md"))]
    twice = sorted({m for f in docs for m in re.findall(r"jpeft\.parallel\.(\w+)", f.read_text()) if m in top})
    assert twice == [], twice
