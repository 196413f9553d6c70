"""Flax NNX models (#20): the same two-tree PEFT on ``nnx.Module``.

Three NNX models written here (an MLP, a transformer block with ``nnx.MultiHeadAttention``,
a conv net with an embedding), each with its linen equivalent (same submodule names, same
params): the same targets give the same sites, and the same adapter (every tensor random)
gives the same outputs on both; identity at init, merge equals apply, unmerge restores the
base, jit/grad/vmap, training with ``jpeft.fit`` with the base state bit-identical, adapter
files and the PEFT format, and named errors where a method does not apply.
"""

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jpeft
from jpeft import _nnx, hf  # noqa: F401  (jpeft.hf)
from jpeft.errors import UnsupportedModuleError
from jpeft.tree import nnx_params, nnx_with_params

D = 16


# -- the models, NNX and linen -------------------------------------------------------------------

class MLP(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(8, D, rngs=rngs)
        self.fc2 = nnx.Linear(D, 4, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.relu(self.fc1(x)))


class LinenMLP(nn.Module):
    def setup(self):
        self.fc1 = nn.Dense(D)
        self.fc2 = nn.Dense(4)

    def __call__(self, x):
        return self.fc2(jax.nn.relu(self.fc1(x)))


class Block(nnx.Module):
    def __init__(self, rngs):
        self.ln = nnx.LayerNorm(D, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=D, qkv_features=D, decode=False, rngs=rngs)
        self.up = nnx.LinearGeneral(D, (2, 8), rngs=rngs)
        self.down = nnx.Einsum("bthk,hkd->btd", (2, 8, D), (D,), rngs=rngs)

    def __call__(self, x):
        h = x + self.attn(self.ln(x))
        return h + self.down(jax.nn.gelu(self.up(h)))


class LinenBlock(nn.Module):
    def setup(self):
        self.ln = nn.LayerNorm()
        self.attn = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=D, out_features=D)
        self.up = nn.DenseGeneral((2, 8))
        self.down = nn.Einsum((2, 8, D), "bthk,hkd->btd")

    def __call__(self, x):
        h = x + self.attn(self.ln(x))
        return h + self.down(jax.nn.gelu(self.up(h)))


class ConvNet(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(10, 8, rngs=rngs)
        self.conv = nnx.Conv(8, 8, (3, 3), padding="SAME", rngs=rngs)
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, ids):
        h = jax.nn.relu(self.conv(self.embed(ids)))
        return self.head(h.mean(axis=(1, 2)))


class LinenConvNet(nn.Module):
    def setup(self):
        self.embed = nn.Embed(10, 8)
        self.conv = nn.Conv(8, (3, 3), padding="SAME")
        self.head = nn.Dense(3)

    def __call__(self, ids):
        h = jax.nn.relu(self.conv(self.embed(ids)))
        return self.head(h.mean(axis=(1, 2)))


def _build(make, seed=0):
    """``make()``'s module with random NumPy weights: built abstractly (``nnx.eval_shape``), so
    no initializer is compiled per parameter shape."""
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda t: jnp.asarray(0.3 * rng.standard_normal(t.shape), t.dtype), nnx_params(abstract))
    return nnx.merge(graphdef, nnx_with_params(abstract, params))


def _x(name):
    if name == "conv":
        return jax.random.randint(jax.random.key(7), (2, 4, 4), 0, 10)
    shape = {"mlp": (3, 8), "block": (2, 5, D)}[name]
    return jax.random.normal(jax.random.key(7), shape)


_MODELS = {"mlp": (MLP, LinenMLP), "block": (Block, LinenBlock), "conv": (ConvNet, LinenConvNet)}
# per model: (LoRA / DoRA targets, IA3 config)
_TARGETS = {
    "mlp": (["fc1", "fc2"], dict(target_modules=["fc1", "fc2"], feedforward_modules=["fc2"])),
    "block": (".*(query|key|value|out|up|down)", dict(target_modules=["query", "value", "out", "down"],
                                                      feedforward_modules=["out", "down"])),
    "conv": (["embed", "conv", "head"], dict(target_modules=["conv", "head"], feedforward_modules=["head"])),
}


def _configs(name):
    lora_t, ia3 = _TARGETS[name]
    cfgs = {"lora": jpeft.LoraConfig(r=2, alpha=4, target_modules=lora_t), "ia3": jpeft.IA3Config(**ia3)}
    if name != "conv":  # PEFT's DoRA has no embedding layers; jpeft follows it
        cfgs["dora"] = jpeft.LoraConfig(r=2, alpha=4, use_dora=True, target_modules=lora_t)
    return cfgs


@pytest.fixture(scope="module", params=sorted(_MODELS))
def case(request):
    name = request.param
    nnx_cls, linen_cls = _MODELS[name]
    model = _build(lambda: nnx_cls(nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    x = _x(name)
    linen_model = linen_cls()
    linen_params = {"params": nnx_params(state)}  # the same weights, under the same names
    return name, model, graphdef, state, x, linen_model, linen_params


def _randomize(adapter, seed=3):
    """Every adapter tensor random (far from its identity init)."""
    rng = np.random.default_rng(seed)  # NumPy: no XLA compile per shape
    return jax.tree.map(lambda t: jnp.asarray(0.3 * rng.standard_normal(t.shape), t.dtype), adapter)


# -- tests ------------------------------------------------------------------------------------------

def test_linen_twins_compute_what_the_nnx_modules_compute():
    """The sites' math runs on each NNX module's linen twin: it must be the same function."""
    x3 = jax.random.normal(jax.random.key(0), (2, 3, 6))
    mods = [
        (lambda: nnx.Linear(6, 5, rngs=nnx.Rngs(1)), x3),
        (lambda: nnx.LinearGeneral(6, (2, 3), rngs=nnx.Rngs(1)), x3),
        (lambda: nnx.LinearGeneral((3, 6), 4, axis=(-2, -1), rngs=nnx.Rngs(1)), x3),
        (lambda: nnx.Einsum("btd,dhk->bthk", (6, 2, 3), (2, 3), rngs=nnx.Rngs(1)), x3),
        (lambda: nnx.Conv(6, 4, (2,), strides=2, padding="VALID", rngs=nnx.Rngs(1)), x3),
        (lambda: nnx.Embed(7, 6, rngs=nnx.Rngs(1)), jnp.array([[0, 3, 6]])),
        (lambda: nnx.LayerNorm(6, rngs=nnx.Rngs(1)), x3),
        (lambda: nnx.RMSNorm(6, rngs=nnx.Rngs(1)), x3),
    ]
    for make, x in mods:
        mod = _build(make, seed=5)
        own = nnx_params(nnx.state(mod))
        tw = _nnx.twin(mod, "m")
        np.testing.assert_allclose(tw.apply({"params": own}, x), mod(x), rtol=1e-6, atol=1e-6,
                                   err_msg=type(mod).__name__)


# per model: the other methods with a site on its modules, compared with linen alongside _configs' three
_MORE = {
    "mlp": {"loha": jpeft.LoHaConfig(r=2, alpha=4, target_modules=["fc1", "fc2"]),
            "vera": jpeft.VeraConfig(r=2, target_modules=["fc1", "fc2"]),
            "adalora": jpeft.AdaLoraConfig(init_r=3, target_r=2, total_step=10, target_modules=["fc1", "fc2"]),
            "oft": jpeft.OFTConfig(oft_block_size=4, target_modules=["fc1", "fc2"])},
    "block": {"ln_tuning": jpeft.LNTuningConfig(target_modules=["ln"]),
              "bottleneck": jpeft.BottleneckConfig(target_modules=["attn", "down"], reduction_factor=2)},
    "conv": {"tokens_saved": jpeft.LoraConfig(r=2, alpha=4, target_modules=["head"],
                                              trainable_token_indices={"embed": [1, 3]}, modules_to_save=["conv"])},
}


def test_same_targets_give_the_same_sites_outputs_and_gradients_as_linen(case):
    """Every method with a site on the model's modules, every adapter tensor random: the NNX model's sites,
    outputs and adapter gradients are the linen twin's."""
    name, model, graphdef, state, x, linen_model, linen_params = case
    np.testing.assert_allclose(linen_model.apply(linen_params, x), model(x), rtol=1e-5, atol=1e-5)
    for method, cfg in {**_configs(name), **_MORE[name]}.items():
        a_nnx = jpeft.init(cfg, state, jax.random.key(1), graphdef, x)
        a_linen = jpeft.init(cfg, linen_params, jax.random.key(1), linen_model, x)
        assert sorted(a_nnx) == sorted(a_linen), method
        assert {p: getattr(n, "layout", None) for p, n in a_nnx.items()} == \
            {p: getattr(n, "layout", None) for p, n in a_linen.items()}, method
        assert jax.tree.structure(a_nnx) == jax.tree.structure(a_linen), method
        adapter = _randomize(a_linen)
        # jitted: one compile each (op by op, the gradients' many small ops compile one by one: this file took 43 s of
        # CPU, not 33)
        y_linen, g_linen = jax.jit(jax.value_and_grad(
            lambda a: jnp.tanh(jpeft.apply(linen_model, linen_params, a, x)).sum()))(adapter)
        y_nnx, g_nnx = jax.jit(jax.value_and_grad(lambda a: jnp.tanh(jpeft.apply(graphdef, state, a, x)).sum()))(adapter)
        assert float(jnp.abs(jpeft.apply(graphdef, state, adapter, x) - model(x)).max()) > 1e-2, method  # it acts
        np.testing.assert_allclose(y_nnx, y_linen, rtol=1e-5, atol=1e-5, err_msg=method)
        assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(jpeft.split_frozen(g_nnx)[0])), method
        # the block's attention rounds differently in NNX and linen: gradients of ~15 seen ~3e-5 relative apart
        chex.assert_trees_all_close(g_nnx, g_linen, rtol=1e-4, atol=1e-5)


def test_identity_merge_unmerge(case):
    name, model, graphdef, state, x, _, _ = case
    y0 = model(x)
    for method, cfg in _configs(name).items():
        adapter = jpeft.init(cfg, model, jax.random.key(1), model, x)  # an nnx.Module in place of (graphdef, state)
        np.testing.assert_allclose(jpeft.apply(model, None, adapter, x), y0, rtol=1e-5, atol=1e-6, err_msg=method)
        adapter = _randomize(adapter)
        y = jpeft.apply(graphdef, state, adapter, x)
        merged = jpeft.merge(state, adapter)
        assert isinstance(merged, nnx.State)
        np.testing.assert_allclose(nnx.merge(graphdef, merged)(x), y, rtol=1e-4, atol=1e-5, err_msg=method)
        np.testing.assert_allclose(jpeft.merge(model, adapter)(x), y, rtol=1e-4, atol=1e-5, err_msg=method)
        if method == "dora":  # m * V / ||V|| forgets ||V||: refused by name, as for linen
            with pytest.raises(jpeft.errors.NotInvertibleError):
                jpeft.unmerge(merged, adapter)
        else:
            restored = jpeft.unmerge(merged, adapter)
            for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=method)
        s = jpeft.summary(state, adapter, print_fn=None)
        assert s["trainable"] == sum(v.size for v in jax.tree.leaves(adapter))
        assert s["base"] == sum(v.size for v in jax.tree.leaves(nnx_params(state)))


def test_jit_grad_vmap():
    """The proxies live in a copy built inside the traced function, so every transform sees a pure
    function (the MLP keeps it quick; the other models run under jit in the property suite)."""
    model = _build(lambda: MLP(nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    x = _x("mlp")
    adapter = _randomize(jpeft.init(jpeft.LoraConfig(r=2, target_modules=["fc1", "fc2"]), state,
                                    jax.random.key(1), graphdef, x))
    f = jax.jit(jpeft.apply, static_argnums=0)
    y = jpeft.apply(graphdef, state, adapter, x)
    np.testing.assert_allclose(f(graphdef, state, adapter, x), y, rtol=1e-5, atol=1e-5)
    yv = jax.vmap(lambda xi: jpeft.apply(graphdef, state, adapter, xi[None])[0])(x)
    np.testing.assert_allclose(yv, y, rtol=1e-5, atol=1e-5)

    @jax.jit
    def loss(a):
        return jnp.mean(jpeft.apply(graphdef, state, a, x) ** 2)

    # LoRA dropout draws from rngs={"dropout": key}, as for linen: same key, same output
    drop = {p: dataclasses.replace(n, dropout=0.5) if p == "fc1" else n for p, n in adapter.items()}
    y1 = jpeft.apply(graphdef, state, drop, x, rngs={"dropout": jax.random.key(5)})
    assert not np.allclose(y1, y)
    np.testing.assert_array_equal(y1, jpeft.apply(graphdef, state, drop, x, rngs={"dropout": jax.random.key(5)}))
    np.testing.assert_array_equal(jpeft.apply(graphdef, state, drop, x), y)  # no key: no dropout

    g = jax.jit(jax.grad(loss))(adapter)
    assert jax.tree.structure(g) == jax.tree.structure(adapter)
    # a central difference along the (unit) gradient direction equals the gradient's norm
    norm = float(optax.global_norm(g))
    eps = 1e-2
    step = jax.tree.map(lambda t: eps * t / norm, g)
    d = (loss(jax.tree.map(jnp.add, adapter, step)) - loss(jax.tree.map(jnp.subtract, adapter, step))) / (2 * eps)
    np.testing.assert_allclose(float(d), norm, rtol=2e-2)


def test_fit_trains_the_adapter_with_the_base_state_bit_identical(tmp_path):
    model = _build(lambda: MLP(nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    before = jax.tree.map(np.array, state)
    cfg = jpeft.LoraConfig(r=4, alpha=8, target_modules=["fc1", "fc2"])
    adapter = jpeft.init(cfg, state, jax.random.key(1), graphdef, _x("mlp"))
    xs = jax.random.normal(jax.random.key(2), (64, 8))
    ys = jnp.sin(xs[:, :4] * 2.0)

    def loss_fn(params, adapter, batch, key):
        return jnp.mean((jpeft.apply(graphdef, params, adapter, batch["x"]) - batch["y"]) ** 2)

    opt = optax.adam(1e-2)
    step = jpeft.make_train_step(loss_fn, opt)
    batches = [{"x": xs, "y": ys}] * 60
    loss0 = float(loss_fn(state, adapter, batches[0], None))
    ckpt = jpeft.checkpoint.CheckpointManager(tmp_path / "ckpt", cfg, state, optimizer=opt, model=graphdef,
                                              example_args=(_x("mlp"),), save_every=30, async_save=False)
    res = jpeft.fit(step, state, adapter, opt.init(adapter), batches, key=jax.random.key(3), checkpoint=ckpt)
    loss1 = float(loss_fn(state, res.adapter, batches[0], None))
    assert loss1 < 0.5 * loss0, (loss0, loss1)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, state), before)
    # the checkpoint holds the adapter only, and restores onto the same base
    restored = jpeft.checkpoint.CheckpointManager(tmp_path / "ckpt", cfg, state, optimizer=opt, model=graphdef,
                                                  example_args=(_x("mlp"),)).restore()
    assert restored.step == 60
    jax.tree.map(np.testing.assert_array_equal, restored.adapter, res.adapter)
    # adapter files and the Hugging Face PEFT format, as for linen
    d = jpeft.save_adapter(str(tmp_path / "adapter"), cfg, res.adapter, params=state)
    cfg2, a2 = jpeft.load_adapter(d, state, graphdef, _x("mlp"))
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, a2, res.adapter)
    # the mesh-sharded step takes the NNX state as it takes linen params (one device here; the
    # placement rules are the ones tests/test_parallel.py runs on several)
    mesh = jpeft.make_mesh(data=1, fsdp=1)
    sharded = jpeft.make_sharded_train_step(loss_fn, opt, mesh)
    placed = jpeft.shard_params(state, mesh)
    assert isinstance(placed, nnx.State)
    ad_s = jpeft.shard_adapter(res.adapter, mesh, placed)
    _, _, m = sharded(placed, ad_s, jpeft.init_opt_state(opt, ad_s), batches[0], jax.random.key(4))
    np.testing.assert_allclose(float(m["loss"]), loss1, rtol=1e-5)
    jpeft.hf.save_peft(str(tmp_path / "peft"), cfg, res.adapter)
    cfg3, a3 = jpeft.hf.load_peft(str(tmp_path / "peft"), state)
    np.testing.assert_allclose(jpeft.apply(graphdef, state, a3, xs), jpeft.apply(graphdef, state, res.adapter, xs),
                               rtol=1e-6, atol=1e-6)


def test_more_methods_on_nnx_sites():
    """Methods whose sites exist on NNX models beyond LoRA, DoRA, IA3 (the rest of the table runs on the
    NNX Llama in tests/test_properties.py): merge equals apply, or the output changes (bottleneck)."""
    model = _build(lambda: Block(nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    x = _x("block")
    cfgs = [jpeft.LoHaConfig(r=2, target_modules=["query"]),  # a LinearGeneral with two output axes
            jpeft.LNTuningConfig(target_modules=["ln"]),  # nnx.LayerNorm's twin
            jpeft.LoraConfig(r=2, target_modules=["up"], modules_to_save=["down"])]  # reruns the Einsum's twin
    for cfg in cfgs:
        adapter = _randomize(jpeft.init(cfg, state, jax.random.key(1), graphdef, x))
        y = jpeft.apply(graphdef, state, adapter, x)
        assert float(jnp.abs(y - model(x)).max()) > 1e-3, type(cfg).__name__
        np.testing.assert_allclose(nnx.merge(graphdef, jpeft.merge(state, adapter))(x), y, rtol=1e-4, atol=1e-5,
                                   err_msg=type(cfg).__name__)
    adapter = _randomize(jpeft.init(jpeft.BottleneckConfig(target_modules=["attn"]), state, jax.random.key(1),
                                    graphdef, x))
    assert float(jnp.abs(jpeft.apply(graphdef, state, adapter, x) - model(x)).max()) > 1e-3
    mlp = _build(lambda: MLP(nnx.Rngs(0)))
    adapter = _randomize(jpeft.init(jpeft.OFTConfig(oft_block_size=8, target_modules=["fc1"]), mlp,
                                    jax.random.key(1), mlp, _x("mlp")))
    np.testing.assert_allclose(jpeft.merge(mlp, adapter)(_x("mlp")), jpeft.apply(mlp, None, adapter, _x("mlp")),
                               rtol=1e-4, atol=1e-5)


def test_named_errors_where_a_method_does_not_apply():
    model = _build(lambda: Block(nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    x = _x("block")
    # a site at the model's root (full fine-tuning) needs the linen model itself
    full = jpeft.init(jpeft.FullFinetuneConfig(), state, jax.random.key(1))
    with pytest.raises(UnsupportedModuleError, match="root"):
        jpeft.apply(graphdef, state, full, x)
    # a model that is one nnx.Linear: its LoRA site is at the root (this was called full
    # fine-tuning, prefix or prompt tuning)
    lin_g, lin_s = nnx.split(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
    lora = jpeft.init(jpeft.LoraConfig(r=2, target_modules=".*"), lin_s, jax.random.key(1))
    with pytest.raises(UnsupportedModuleError, match="Wrap it in a module of your own"):
        jpeft.apply(lin_g, lin_s, lora, jnp.ones((2, 4)))
    # modules_to_save on a module of the user's own, which has no linen twin to rerun
    class Gain(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.full((4,), 2.0))

        def __call__(self, x):
            return x * self.w[...][None]

    class Scaled(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(8, 4, rngs=rngs)
            self.gain = Gain()

        def __call__(self, x):
            return self.gain(self.fc(x))

    scaled = _build(lambda: Scaled(nnx.Rngs(0)))
    cfg = jpeft.LoraConfig(r=2, target_modules=["fc"], modules_to_save=["gain"])
    adapter = jpeft.init(cfg, scaled, jax.random.key(1), scaled, _x("mlp"))
    with pytest.raises(UnsupportedModuleError, match="Gain"):
        jpeft.apply(scaled, None, adapter, _x("mlp"))
    # a transposed convolution is not a linear module LoRA adapts
    deconv = _build(lambda: nnx.ConvTranspose(4, 4, (2,), rngs=nnx.Rngs(0)))
    with pytest.raises(UnsupportedModuleError, match="ConvTranspose"):
        jpeft.init(jpeft.LoraConfig(r=2, target_modules=".*"), deconv, jax.random.key(1), deconv, jnp.ones((1, 3, 4)))
    # an adapter made for another model
    other = jpeft.init(jpeft.LoraConfig(r=2, target_modules=["fc1"]), _build(lambda: MLP(nnx.Rngs(0))), jax.random.key(1))
    with pytest.raises(jpeft.TargetNotFoundError):
        jpeft.apply(graphdef, state, other, x)


def test_lists_and_sequential_name_paths_like_nnx_split():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.blocks = nnx.List([nnx.Linear(4, 4, rngs=rngs) for _ in range(2)])
            self.seq = nnx.Sequential(nnx.Linear(4, 4, rngs=rngs), nnx.Linear(4, 4, rngs=rngs))

        def __call__(self, x):
            for b in self.blocks:
                x = b(x)
            return self.seq(x)

    net = _build(lambda: Net(nnx.Rngs(0)))
    x = jnp.ones((2, 4))
    # a regex on the path or on its Hugging Face name ("blocks.1"), as for linen
    cfg = jpeft.LoraConfig(r=2, target_modules=r"blocks\.1|seq/layers/0")
    adapter = _randomize(jpeft.init(cfg, net, jax.random.key(1), net, x))
    assert sorted(adapter) == ["blocks/1", "seq/layers/0"]
    y = jpeft.apply(net, None, adapter, x)
    assert float(jnp.abs(y - net(x)).max()) > 1e-2
    np.testing.assert_allclose(jpeft.merge(net, adapter)(x), y, rtol=1e-5, atol=1e-5)


def test_a_list_named_layers_is_no_layer_scan_and_its_peft_files_load(tmp_path):
    # self.layers = nnx.List([...]) (and nnx.Sequential's own `layers`) was taken for a layer-scanned base
    # (a 'layers' subtree with array leaves): load_peft of the file jpeft itself wrote was a BaseMismatchError
    # (PEFT's 'layers.0.fc' read back as 'layers_0/fc'), LN tuning's init a ShapeMismatchError about the scan
    class Block(nnx.Module):
        def __init__(self, rngs):
            self.ln = nnx.LayerNorm(4, rngs=rngs)
            self.fc = nnx.Linear(4, 4, rngs=rngs)

        def __call__(self, x):
            return x + self.fc(self.ln(x))

    class Net(nnx.Module):
        def __init__(self, rngs, extra=False):
            self.layers = nnx.List([Block(rngs) for _ in range(2)])
            self.seq = nnx.Sequential(nnx.Linear(4, 4, rngs=rngs))
            if extra:  # PEFT's name of layers_0/fc is layers.0.fc, as the list entry's
                self.layers_0 = Block(rngs)

        def __call__(self, x):
            for b in self.layers:
                x = b(x)
            return self.seq(x)

    net = _build(lambda: Net(nnx.Rngs(0)))
    graphdef, state = nnx.split(net)
    x = jax.random.normal(jax.random.key(0), (2, 4))
    assert jpeft.scan.num_stacked_layers(nnx_params(state)) is None
    for cfg in (jpeft.LoraConfig(r=2, target_modules=["fc", "seq/layers/0"]), jpeft.LNTuningConfig(target_modules=["ln"])):
        adapter = _randomize(jpeft.init(cfg, state, jax.random.key(1), graphdef, x))
        y = jpeft.apply(graphdef, state, adapter, x)
        assert float(jnp.abs(y - net(x)).max()) > 1e-2
        out = str(tmp_path / cfg.peft_type)
        hf.save_peft(out, cfg, adapter)
        for base in (state, net):  # the nnx.Module in place of its state, as jpeft.load_adapter takes it
            _, loaded = hf.load_peft(out, base)  # the Module was an AttributeError ('Net' object has no 'items')
            assert sorted(loaded) == sorted(adapter)
            np.testing.assert_allclose(jpeft.apply(graphdef, state, loaded, x), y, rtol=1e-6, atol=1e-6)
            assert hf.load_peft_with_base(out, base)[1] is base  # no residual init: the base as given
    # two modules with one PEFT name: refused by name on save and on load, never one of them dropped
    net2 = _build(lambda: Net(nnx.Rngs(0), extra=True))
    graphdef2, state2 = nnx.split(net2)
    cfg = jpeft.LoraConfig(r=2, target_modules=["fc"])
    adapter2 = jpeft.init(cfg, state2, jax.random.key(1), graphdef2, x)
    assert sorted(adapter2) == ["layers/0/fc", "layers/1/fc", "layers_0/fc"]
    with pytest.raises(jpeft.errors.ConfigError, match="one Hugging Face module name"):
        hf.save_peft(str(tmp_path / "both"), cfg, adapter2)
    assert not (tmp_path / "both").exists()
    with pytest.raises(jpeft.errors.BaseMismatchError, match="two modules with one Hugging Face name"):
        hf.load_peft(str(tmp_path / "LORA"), state2)


def test_method_by_name_or_function_as_for_linen():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(4, 4, rngs=rngs)

        def __call__(self, x):
            return self.fc(x)

        def encode(self, x):
            return 2 * self.fc(x)

    net = _build(lambda: Net(nnx.Rngs(0)))
    x = jnp.ones((2, 4))
    adapter = _randomize(jpeft.init(jpeft.LoraConfig(r=2, target_modules=["fc"]), net, jax.random.key(1)))
    y = jpeft.apply(net, None, adapter, x)
    # linen's method=Model.encode was flax's TypeError (attribute name); a bound net.encode (linen unbinds it) was
    # called with the adapted copy as its input, and named an NNX transform as the cause
    for method in ("encode", Net.encode, net.encode):
        np.testing.assert_allclose(jpeft.apply(net, None, adapter, x, method=method), 2 * y, rtol=1e-6)
    with pytest.raises(jpeft.errors.ConfigError, match="no such method"):
        jpeft.apply(net, None, adapter, x, method="decode")


def test_sites_in_nested_plain_containers_are_adapted():
    # nnx.data([[...]]) / a dict of tuples: plain containers nested in one attribute; a site in
    # one of them was left the bare module (silently, once another site was called)
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(4, 4, rngs=rngs)
            self.stages = nnx.data([[nnx.Linear(4, 4, rngs=rngs)], [nnx.Linear(4, 4, rngs=rngs)]])
            self.heads = nnx.data({"a": (nnx.Linear(4, 4, rngs=rngs),)})

        def __call__(self, x):
            x = self.fc(x)
            for stage in self.stages:
                for layer in stage:
                    x = layer(x)
            return self.heads["a"][0](x)

    net = _build(lambda: Net(nnx.Rngs(0)))
    x = jnp.ones((2, 4))
    adapter = _randomize(jpeft.init(jpeft.LoraConfig(r=2, target_modules=".*"), net, jax.random.key(1), net, x))
    assert sorted(adapter) == ["fc", "heads/a/0", "stages/0/0", "stages/1/0"]
    for ad in (adapter, {k: v for k, v in adapter.items() if k != "fc"}):
        y = jpeft.apply(net, None, ad, x)
        np.testing.assert_allclose(jpeft.merge(net, ad)(x), y, rtol=1e-5, atol=1e-5)


def test_subclasses_with_their_own_forward_and_untargeted_custom_modules():
    class ScaledLinear(nnx.Linear):  # not nnx.Linear's function: its twin would drop the scale
        def __call__(self, x):
            return 2.0 * super().__call__(x) + 1.0

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.fc = ScaledLinear(8, 8, rngs=rngs)
            self.out = nnx.Linear(8, 4, rngs=rngs)

        def __call__(self, x):
            return self.out(jax.nn.tanh(self.fc(x)))

    net = _build(lambda: Net(nnx.Rngs(0)))
    x = _x("mlp")
    for cfg in (jpeft.LoraConfig(r=2, target_modules=["fc"]), jpeft.LoraConfig(r=2, modules_to_save=["fc"],
                                                                              target_modules=["out"])):
        with pytest.raises(UnsupportedModuleError, match="ScaledLinear subclasses nnx.Linear"):
            jpeft.apply(net, None, jpeft.init(cfg, nnx.split(net)[1], jax.random.key(1)), x)
    with pytest.raises(UnsupportedModuleError, match="ScaledLinear subclasses nnx.Linear"):
        jpeft.init(jpeft.LoraConfig(r=2, target_modules=["fc"]), net, jax.random.key(1), net, x)
    # a module jpeft cannot adapt (custom promote_dtype) that is not targeted does not stop init
    class Plain(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(8, 8, rngs=rngs)
            self.out = nnx.Linear(8, 4, promote_dtype=lambda a, dtype=None, inexact=True: a, rngs=rngs)

        def __call__(self, x):
            return self.out(self.fc(x))

    plain = _build(lambda: Plain(nnx.Rngs(0)))
    assert sorted(jpeft.init(jpeft.LoraConfig(r=2, target_modules=["fc"]), plain, jax.random.key(1), plain, x)) == ["fc"]


def _quarters(lhs, rhs, dims, **kwargs):
    """A fake-quantizing dot_general: the kernel rounded to quarters."""
    return jax.lax.dot_general(lhs, jnp.round(4 * rhs) / 4, dims, **kwargs)


def _quarters_einsum(eq, x, kernel, **kwargs):
    return jnp.einsum(eq, x, jnp.round(4 * kernel) / 4, **kwargs)


@jpeft.transparent_dot_general
def _highest(lhs, rhs, dims, precision=None, **kwargs):
    return jax.lax.dot_general(lhs, rhs, dims, precision=jax.lax.Precision.HIGHEST, **kwargs)


@jpeft.transparent_dot_general
def _plain_einsum(eq, x, kernel, **kwargs):
    return jnp.einsum(eq, x, kernel, **kwargs)


class _Quantized(nnx.Module):
    """One module 'm' built with the given function of its kernel."""

    def __init__(self, kind, fn, rngs):
        if kind == "linear":
            self.m = nnx.Linear(5, 6, dot_general=fn, rngs=rngs)
        elif kind == "linear_general_cls":
            self.m = nnx.LinearGeneral(5, (2, 3), dot_general_cls=fn, rngs=rngs)
        else:
            self.m = nnx.Einsum("bi,io->bo", (5, 6), (6,), einsum_op=fn, rngs=rngs)

    def __call__(self, x):
        return self.m(x)


@pytest.mark.parametrize("kind, fn", [("linear", _quarters), ("linear_general_cls", lambda: _quarters),
                                      ("einsum", _quarters_einsum)], ids=["linear", "linear_general-cls", "einsum"])
def test_a_kernel_changing_dot_general_is_refused_at_merge_and_a_declared_one_merges(kind, fn):
    """nnx.Linear(dot_general=...), nnx.LinearGeneral(dot_general_cls=...) and nnx.Einsum(einsum_op=...) rounding the
    kernel to quarters: merge folded the update into the kernel the function rounds, apply added it to the rounded
    product: LoRA 0.46 off (DoRA 0.35, IA3 0.67), without a word. Now merge is a NotMergeableError naming the
    function (an adapter from the params alone: a LayoutError at apply), and a wrapper declared with
    jpeft.transparent_dot_general merges as it applies, every adapter tensor random."""
    x = jax.random.normal(jax.random.key(0), (3, 5))
    cfgs = [jpeft.LoraConfig(r=2, target_modules=["m"]), jpeft.LoraConfig(r=2, target_modules=["m"], use_dora=True),
            jpeft.IA3Config(target_modules=["m"], feedforward_modules=[])]
    net = _build(lambda: _Quantized(kind, fn, nnx.Rngs(0)))
    field = {"linear": "dot_general", "linear_general_cls": "dot_general_cls", "einsum": "einsum_op"}[kind]
    for cfg in cfgs:
        adapter = _randomize(jpeft.init(cfg, net, jax.random.key(1), net, x))
        y = jpeft.apply(net, None, adapter, x)
        if cfg is cfgs[0]:  # the factored form, by hand: the update beside the rounded product
            lw = adapter["m"]
            np.testing.assert_allclose(y, net(x) + (lw.scale * x @ lw.lora_A @ lw.lora_B).reshape(y.shape),
                                       rtol=1e-5, atol=1e-5)
        with pytest.raises(jpeft.errors.NotMergeableError, match=rf"site 'm' is on a module that computes with its own "
                                                                 rf"{field}="):
            jpeft.merge(net, adapter)
    if kind == "linear":
        bare = _randomize(jpeft.init(cfgs[0], net, jax.random.key(1)))
        with pytest.raises(jpeft.errors.LayoutError, match="'m' computes with its own dot_general=.*_quarters"):
            jpeft.apply(net, None, bare, x)
    fn = {"linear": _highest, "linear_general_cls": jpeft.transparent_dot_general(lambda: _highest),
          "einsum": _plain_einsum}[kind]
    declared = _build(lambda: _Quantized(kind, fn, nnx.Rngs(0)))
    for cfg in cfgs:
        adapter = _randomize(jpeft.init(cfg, declared, jax.random.key(1), declared, x))
        y = jpeft.apply(declared, None, adapter, x)
        np.testing.assert_allclose(y, jpeft.merge(declared, adapter)(x), rtol=1e-5, atol=1e-5)
        assert float(jnp.abs(y - declared(x)).max()) > 0.1


def test_one_part_of_a_filtered_split_is_a_named_error_and_the_merged_state_works():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(8, 4, rngs=rngs)
            self.bn = nnx.BatchNorm(4, use_running_average=True, rngs=rngs)

        def __call__(self, x):
            return self.bn(self.fc(x))

    graphdef, params, rest = nnx.split(Net(nnx.Rngs(0)), nnx.Param, ...)
    cfg = jpeft.LoraConfig(r=2, target_modules=["fc"])
    adapter = _randomize(jpeft.init(cfg, params, jax.random.key(1)))
    with pytest.raises(jpeft.errors.ConfigError, match="merge_state"):
        jpeft.apply(graphdef, params, adapter, _x("mlp"))
    with pytest.raises(jpeft.errors.ConfigError, match="merge_state"):
        jpeft.init(cfg, params, jax.random.key(1), graphdef, _x("mlp"))
    state = nnx.merge_state(params, rest)
    np.testing.assert_allclose(nnx.merge(graphdef, jpeft.merge(state, adapter))(_x("mlp")),
                               jpeft.apply(graphdef, state, adapter, _x("mlp")), rtol=1e-5, atol=1e-5)


def test_the_callers_state_is_never_mutated_and_base_dropout_follows_the_key():
    """jpeft.apply ran the NNX model on the caller's own Variables: eagerly it advanced the
    state's batch statistics and RNG counters in place (the docs promise a throw-away copy),
    under jit it raised flax's TraceContextError, and the base's own dropout drew one mask
    whatever key was passed. The copy is now fresh, and its RNG streams are reseeded from the
    dropout key: a new mask per key, the same mask for the same key."""

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.fc1 = nnx.Linear(8, 16, rngs=rngs)
            self.bn = nnx.BatchNorm(16, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)
            self.fc2 = nnx.Linear(16, 4, rngs=rngs)

        def __call__(self, x):
            return self.fc2(self.drop(jax.nn.relu(self.bn(self.fc1(x)))))

    model = Net(nnx.Rngs(0))
    model.train()
    gd, st = nnx.split(model)

    def snap(s):
        return {p: np.asarray(jax.random.key_data(v.get_value()) if jnp.issubdtype(v.get_value().dtype, jax.dtypes.prng_key)
                              else v.get_value()) for p, v in nnx.to_flat_state(s)}

    before = snap(st)
    cfg = jpeft.LoraConfig(r=2, target_modules=["fc1"], init_weights="random")
    ad = jpeft.init(cfg, st, jax.random.key(1))
    x = jax.random.normal(jax.random.key(0), (4, 8))
    y1 = jpeft.apply(gd, st, ad, x, rngs={"dropout": jax.random.key(5)})
    y2 = jpeft.apply(gd, st, ad, x, rngs={"dropout": jax.random.key(5)})
    y3 = jpeft.apply(gd, st, ad, x, rngs={"dropout": jax.random.key(6)})
    after = snap(st)
    assert all(np.array_equal(before[p], after[p]) for p in before)
    np.testing.assert_array_equal(y1, y2)
    assert not np.allclose(y1, y3)
    # under jit, in the one training loop: runs, and a zero learning rate leaves losses that differ per step
    opt = optax.sgd(0.0)
    def loss(p, a, b, k):
        return jnp.sum(jpeft.apply(gd, p, a, b, rngs={"dropout": k}))

    step = jpeft.make_train_step(loss, opt)
    res = jpeft.fit(step, st, ad, opt.init(ad), [x] * 3, key=jax.random.key(3), progress=False)
    losses = [h["loss"] for h in res.history]
    assert len(set(losses)) == 3
    assert all(np.array_equal(before[p], v) for p, v in snap(st).items())
    # the mesh-sharded step places the whole state, its nnx.RngKey (a PRNG key array) too: shard_params raised
    # NumPy's TypeError "Cannot interpret 'key<fry>' as a data type" on it; the loss is the one-device step's
    mesh = jpeft.make_mesh(data=1, fsdp=1)
    placed = jpeft.shard_params(st, mesh)
    assert jnp.issubdtype(placed["drop"]["rngs"]["key"].get_value().dtype, jax.dtypes.prng_key)
    ad_s = jpeft.shard_adapter(jpeft.init(cfg, st, jax.random.key(1)), mesh, placed)  # fit donated ad
    _, _, m = jpeft.make_sharded_train_step(loss, opt, mesh)(placed, ad_s, jpeft.init_opt_state(opt, ad_s), x,
                                                             jax.random.key(9))
    _, _, want = step(st, jpeft.init(cfg, st, jax.random.key(1)), opt.init(ad_s), x, jax.random.key(9))
    np.testing.assert_allclose(float(m["loss"]), float(want["loss"]), rtol=1e-6)


def test_an_nnx_rngs_or_a_seed_as_rngs_is_a_named_error():
    """jpeft.apply(graphdef, state, adapter, x, rngs=nnx.Rngs(0)), the NNX way to hand out keys, raised JAX's raw
    TypeError "unexpected PRNG key type <class 'flax.nnx.rnglib.Rngs'>" (and a seed, rngs=0, a raw error of JAX or
    flax, on NNX and linen models alike). A key, or a dict of keys, still works."""
    model = _build(lambda: MLP(nnx.Rngs(0)))
    gd, st = nnx.split(model)
    x = _x("mlp")
    ad = jpeft.init(jpeft.LoraConfig(r=2, target_modules=["fc1"], lora_dropout=0.5), st, jax.random.key(1))
    with pytest.raises(jpeft.errors.InputValidationError, match=r"found Rngs.*rngs=\{'dropout': rngs.dropout\(\)\}"):
        jpeft.apply(gd, st, ad, x, rngs=nnx.Rngs(0))
    linen_params = {"params": nnx_params(st)}
    for m, p in [(gd, st), (LinenMLP(), linen_params)]:
        with pytest.raises(jpeft.errors.InputValidationError, match="found int 0"):
            jpeft.apply(m, p, ad, x, rngs=0)
    key = nnx.Rngs(dropout=4).dropout()
    np.testing.assert_array_equal(jpeft.apply(gd, st, ad, x, rngs=key), jpeft.apply(gd, st, ad, x, rngs={"dropout": key}))


def test_corda_on_an_nnx_model_equals_linen_and_residual_inits_refuse_a_module():
    """jpeft.init_corda(config, state, None, graphdef, calibration) ran graphdef.apply (an NNX GraphDef's own
    method) under linen's method interception, so no module input was recorded: "the calibration data never
    reached the modules ['fc1', 'fc2']" for data that did; with the nnx.Module in place of the graphdef, a raw
    AttributeError ('MLP' object has no attribute 'apply'). The residual inits given the nnx.Module as params
    raised a raw "'MLP' object is not subscriptable"."""
    model = _build(lambda: MLP(nnx.Rngs(0)))
    gd, st = nnx.split(model)
    linen_params = {"params": nnx_params(st)}
    xs = [jax.random.normal(jax.random.key(i), (5, 8)) for i in range(3)]
    cfg = jpeft.LoraConfig(r=2, alpha=2, target_modules=["fc1", "fc2"])
    ref_res, ref_ad = jpeft.init_corda(cfg, linen_params, None, LinenMLP(), xs)
    for m in (gd, model):
        res, ad = jpeft.init_corda(cfg, st, None, m, xs)
        for a, b in zip(jax.tree.leaves(ad), jax.tree.leaves(ref_ad)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        for a, b in zip(jax.tree.leaves(nnx_params(res)), jax.tree.leaves(ref_res["params"])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(jpeft.apply(gd, res, ad, xs[0]), model(xs[0]), rtol=1e-5, atol=1e-5)
    with pytest.raises(jpeft.errors.ConfigError, match="init_pissa got the nnx.Module MLP.*nnx.split"):
        jpeft.init_pissa(cfg, model, jax.random.key(0))


def test_quantize_refuses_an_nnx_state_by_name():
    """jpeft.quantize(state) walked the nnx.State, whose leaves sit under ".../kernel/value", so no kernel
    was selected: the state came back in full precision with no error (a QLoRA run that was not one),
    and with target_modules=["fc1"] the error said that name matched nothing."""
    model = _build(lambda: MLP(nnx.Rngs(0)))
    _, state = nnx.split(model)
    for arg, kw in [(state, {}), (state, {"target_modules": ["fc1"]}), (model, {})]:
        with pytest.raises(jpeft.errors.QuantizationError, match="nnx"):
            jpeft.quantize(arg, "int8", **kw)


def test_adapted_submodules_under_nnx_transforms_are_refused_by_name():
    """A forward pass handing an adapted submodule to nnx.remat / nnx.jit (/ nnx.vmap, nnx.cond) raised flax's
    TypeError ('DynamicJaxprTracer' object is not callable, '_SiteProxy ... is not a valid JAX type'), and
    jpeft.init tracing such a model raised 'Cannot interpret value of type _Recorder'."""

    class Net(nnx.Module):
        def __init__(self, how, rngs):
            self.how = how
            self.fc = nnx.Linear(8, 8, rngs=rngs)

        def __call__(self, x):
            if self.how == "remat":
                return nnx.remat(lambda m, x: m(x))(self.fc, x)
            return nnx.jit(lambda m, x: m(x))(self.fc, x)

    x = jnp.ones((2, 8))
    cfg = jpeft.LoraConfig(r=2, target_modules=["fc"], init_weights="random")
    for how in ("remat", "jit"):
        graphdef, state = nnx.split(Net(how, nnx.Rngs(0)))
        adapter = jpeft.init(cfg, state, jax.random.key(1))
        with pytest.raises(UnsupportedModuleError, match="nnx.remat"):
            jpeft.apply(graphdef, state, adapter, x)
    graphdef, state = nnx.split(Net("remat", nnx.Rngs(0)))
    with pytest.raises(UnsupportedModuleError, match="without the model"):
        jpeft.init(cfg, state, jax.random.key(1), graphdef, x)


class _Stack(nnx.Module):
    """Three blocks made by nnx.vmap (kernels stacked [3, 8, 8]), run by nnx.scan, and a head outside it."""

    def __init__(self, rngs):
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return _Stack.Block(rngs)

        self.blocks = make(rngs)
        self.head = nnx.Linear(8, 4, rngs=rngs)

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(8, 8, rngs=rngs)

        def __call__(self, h):
            return jnp.tanh(self.fc(h))

    def trunk(self, x):
        return nnx.scan(lambda h, block: block(h), in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(x, self.blocks)

    def __call__(self, x):
        return self.head(self.trunk(x))


def test_a_scanned_stack_is_refused_by_name_and_sites_outside_it_work():
    """jpeft.init given a model whose blocks run under nnx.scan raised flax's raw ValueError ('Expected an array,
    got _Recorder args[1]'), not the named refusal the other transforms get. Without the model, a site outside the
    scan (the head) is adapted: its output is the head's with the LoRA update, every adapter tensor random."""
    model = _Stack(nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    x = jax.random.normal(jax.random.key(0), (2, 8))
    cfg = jpeft.LoraConfig(r=2, alpha=4, target_modules=["head"])
    with pytest.raises(UnsupportedModuleError, match="without the model"):
        jpeft.init(cfg, state, jax.random.key(1), graphdef, x)
    with pytest.raises(jpeft.errors.LayoutError, match="blocks/fc"):  # a stacked kernel's axes: not guessed
        jpeft.init(jpeft.LoraConfig(r=2, target_modules=["fc"]), state, jax.random.key(1))
    ad = _randomize(jpeft.init(cfg, state, jax.random.key(1)))
    h, node = model.trunk(x), ad["head"]
    want = model.head(h) + node.scale * (h @ node.lora_A) @ node.lora_B
    y = jpeft.apply(graphdef, state, ad, x)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(nnx.merge(graphdef, jpeft.merge(state, ad))(x), want, rtol=1e-5, atol=1e-5)
    out = {"blocks/fc": _randomize(jpeft.init(jpeft.BottleneckConfig(target_modules=["blocks/fc"], reduction_factor=2),
                                              state, jax.random.key(1))["blocks/fc"])}
    with pytest.raises(UnsupportedModuleError, match="nnx.scan"):  # a site inside the scan
        jpeft.apply(graphdef, state, out, x)


def test_a_merged_nnx_model_shares_no_variables_with_the_original():
    """jpeft.merge(module, adapter) (and nnx.merge of jpeft.merge(state, adapter)) returned a
    model holding the original's own BatchStat and RNG Variables: running the merged copy in
    training mode moved the original model's batch statistics and dropout counter."""

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.fc1 = nnx.Linear(4, 6, rngs=rngs)
            self.bn = nnx.BatchNorm(6, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)

        def __call__(self, x):
            return self.drop(self.bn(self.fc1(x)))

    def snap(m):
        return [np.asarray(jax.random.key_data(v) if jnp.issubdtype(v.dtype, jax.dtypes.prng_key) else v)
                for v in jax.tree.leaves(nnx.state(m))]

    model = Net(nnx.Rngs(0))
    model.train()
    x = jax.random.normal(jax.random.key(1), (3, 4))
    ad = jpeft.init(jpeft.LoraConfig(r=2, target_modules=["fc1"], init_weights="random"), model, jax.random.key(2))
    before = snap(model)
    gd, st = nnx.split(model)
    for merged in (jpeft.merge(model, ad), nnx.merge(gd, jpeft.merge(st, ad))):
        merged(x)
        assert merged.bn.mean is not model.bn.mean
        assert all(np.array_equal(a, b) for a, b in zip(before, snap(model)))


def test_merging_a_site_on_a_param_shared_with_another_module_is_refused():
    """`self.b.kernel = self.a.kernel`: apply adapts a's calls only, but merge folded the update
    into the shared kernel, so b changed too (0.31 off apply on a tiny model). A whole module
    shared under two names still merges (every call of it is adapted)."""
    class Tied(nnx.Module):
        def __init__(self):
            self.a = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
            self.b = nnx.Linear(4, 4, rngs=nnx.Rngs(1))
            self.b.kernel = self.a.kernel
            self.alias = self.a
            self.head = nnx.Linear(4, 2, rngs=nnx.Rngs(2))

        def __call__(self, x):
            return self.head(self.b(self.alias(self.a(x))))

    model, x = Tied(), jnp.ones((2, 4))
    ad = jpeft.init(jpeft.LoraConfig(r=2, target_modules=["a", "head"]), model, jax.random.key(0))
    ad = jax.tree.map(lambda v: jax.random.normal(jax.random.key(3), v.shape), ad)
    with pytest.raises(jpeft.errors.NotMergeableError, match=r"site 'a' is on a module whose weights another.*b/kernel"):
        jpeft.merge(model, ad)
    head = {k: v for k, v in ad.items() if k == "head"}
    np.testing.assert_allclose(jpeft.merge(model, head)(x), jpeft.apply(model, None, head, x), atol=1e-6)
    assert _nnx.shared_params(model) == {"a": ["b/kernel"], "b": ["a/kernel"]}
