"""LoRA's ``modules_to_save`` (Hugging Face PEFT's option): a trainable full copy of the named
modules, used by apply, written into the base by merge, and trained while the base stays
bit-identical. The PEFT format both ways is in tests/test_interop_matrix.py (row
``modules_to_save``) and tests/test_methods_hf.py (SEQ_CLS's trained classifier)."""

from __future__ import annotations

import os
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "helpers"))
from adam_step import step_moves_adapter_only  # noqa: E402
from apply_checks import assert_same_output_and_writes  # noqa: E402

import jpeft
from jpeft.errors import ConfigError, NotInvertibleError, TargetNotFoundError


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(6, name="d")(x)
        h = nn.LayerNorm(name="norm")(h)
        return nn.Dense(3, name="head")(h)


X = jax.random.normal(jax.random.key(0), (2, 5, 4))


def _setup(**kw):
    model = Net()
    params = model.init(jax.random.key(1), X)
    cfg = jpeft.LoraConfig(r=2, alpha=4, target_modules=["d"], modules_to_save=["head", "norm"], init_weights="random", **kw)
    ad = jpeft.init(cfg, params, jax.random.key(2), model, X)
    leaves, tdef = jax.tree.flatten(ad)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    ad = jax.tree.unflatten(tdef, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    return model, params, cfg, ad


def test_copy_starts_equal_and_is_used_by_apply():
    model = Net()
    params = model.init(jax.random.key(1), X)
    cfg = jpeft.LoraConfig(r=2, target_modules=["d"], modules_to_save=["head"])
    ad = jpeft.init(cfg, params, jax.random.key(2))
    assert isinstance(ad["head"], jpeft.SavedModule) and set(ad) == {"d", "head"}
    np.testing.assert_array_equal(ad["head"].params["kernel"], params["params"]["head"]["kernel"])
    np.testing.assert_array_equal(jpeft.apply(model, params, ad, X), model.apply(params, X))
    # the copy, not the base's head, computes the output: closed form with the copy's weights
    p2 = jax.tree.map(lambda x: x + 1.0, ad["head"].params)
    ad2 = dict(ad, head=jpeft.SavedModule(p2))
    h = nn.LayerNorm().apply({"params": params["params"]["norm"]}, nn.Dense(6).apply({"params": params["params"]["d"]}, X))
    want = h @ p2["kernel"] + p2["bias"].reshape(1, 1, 3)
    np.testing.assert_allclose(jpeft.apply(model, params, ad2, X), want, rtol=1e-5, atol=1e-5)


def test_merge_equals_apply_and_unmerge_refuses():
    model, params, cfg, ad = _setup()
    fact = jpeft.apply(model, params, ad, X)
    assert np.abs(np.asarray(fact) - np.asarray(model.apply(params, X))).max() > 1e-2
    merged = jpeft.merge(params, ad)
    np.testing.assert_allclose(model.apply(merged, X), fact, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(merged["params"]["head"]["kernel"], ad["head"].params["kernel"])
    with pytest.raises(NotInvertibleError, match="keep the base params"):
        jpeft.unmerge(merged, ad)


def test_training_moves_the_copy_and_leaves_the_base_alone():
    model, params, cfg, ad = _setup()
    new = step_moves_adapter_only(model, params, ad, X, (2, 5, 3))
    for path in ("head", "norm"):
        for k in ad[path].params:
            assert np.abs(np.asarray(new[path].params[k] - ad[path].params[k])).min() > 0, (path, k)


def test_config_round_trip_and_refusals():
    c = jpeft.LoraConfig(r=2, target_modules=["d"], modules_to_save=["head"])
    assert c.to_dict()["modules_to_save"] == ["head"]
    assert jpeft.LoraConfig.from_dict(c.to_dict()) == c
    assert jpeft.LoraConfig(modules_to_save="head").modules_to_save == ("head",)
    with pytest.raises(ConfigError, match="list of module names"):
        jpeft.LoraConfig(modules_to_save=[3])
    model = Net()
    params = model.init(jax.random.key(1), X)
    # a target that modules_to_save names (by whole components) is copied whole and not adapted, as in PEFT
    ad = jpeft.init(jpeft.LoraConfig(r=2, target_modules=["d", "head"], modules_to_save=["head"]), params, jax.random.key(0))
    assert isinstance(ad["head"], jpeft.SavedModule) and not isinstance(ad["d"], jpeft.SavedModule)
    # a name ending a target's name without whole components: PEFT would wrap the module and adapt it too
    with pytest.raises(ConfigError, match="both LoRA targets and modules_to_save"):
        jpeft.init(jpeft.LoraConfig(r=2, target_modules=["d", "head"], modules_to_save=["ead"]), params, jax.random.key(0))
    with pytest.raises(TargetNotFoundError, match="no lm_head of its own"):
        jpeft.init(jpeft.LoraConfig(r=2, target_modules=["d"], modules_to_save=["lm_head"]), params, jax.random.key(0))
    # one name of several that selects nothing left that module frozen without a word (PEFT ignores it too)
    with pytest.raises(TargetNotFoundError, match=r"names \['hed'\], which select no module"):
        jpeft.init(jpeft.LoraConfig(r=2, target_modules=["d"], modules_to_save=["head", "hed"]), params, jax.random.key(0))
    # PEFT's SEQ_CLS names both heads ("classifier" on BERT, "score" on decoders): one of them may be absent
    ad = jpeft.init(jpeft.LoraConfig(r=2, target_modules=["d"], modules_to_save=["head", "score"]), params, jax.random.key(0))
    assert set(ad) == {"d", "head"}


def test_copies_of_a_bfloat16_base_are_float32_master_copies():
    """On a bfloat16 base the copies (modules_to_save, and LN tuning's) are float32, as the
    adapter's master copy is (docs/SCALING.md): a bfloat16 copy rounded away every Adam update
    below its spacing (1e-4 on a weight near 1: no value moved in 5 steps). The module still
    runs in its own dtype, so the output at init equals the base's bit for bit, and merge
    writes the base's dtype."""
    import jax.numpy as jnp
    import optax

    model = Net()
    params = jpeft.cast_base(model.init(jax.random.key(1), X), jnp.bfloat16)
    x = X.astype(jnp.bfloat16)
    for cfg in (jpeft.LoraConfig(r=2, target_modules=["d"], modules_to_save=["head", "norm"]),
                jpeft.LNTuningConfig(target_modules=["norm"])):
        ad = jpeft.init(cfg, params, jax.random.key(2), model, x)
        copies = [ad[p].params for p in ("head", "norm") if p in ad]
        assert copies and all(v.dtype == jnp.float32 for c in copies for v in jax.tree.leaves(c))
        out = jpeft.apply(model, params, ad, x)
        assert out.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(model.apply(params, x), np.float32))
        merged = jpeft.merge(params, ad)
        assert {v.dtype for v in jax.tree.leaves(merged)} == {jnp.dtype(jnp.bfloat16)}
        loss_fn = lambda p, a, b, k: jnp.mean(jpeft.apply(model, p, a, b).astype(jnp.float32) ** 2)  # noqa: E731
        opt = optax.adam(1e-4)
        state = opt.init(jpeft.trainable(ad))
        step = jpeft.make_train_step(loss_fn, opt, donate=False)
        new = ad
        for i in range(2):
            new, state, _ = step(params, new, state, x, jax.random.key(i))
        moved = [np.mean(np.asarray(n) != np.asarray(o)) for p in ("head", "norm") if p in ad
                 for n, o in zip(jax.tree.leaves(new[p].params), jax.tree.leaves(ad[p].params))]
        assert min(moved) > 0.5, moved


def test_jpeft_paths_name_the_same_modules_as_dotted_names():
    """``target_modules`` takes a jpeft path (``block/norm``) or PEFT's dotted name; ``modules_to_save`` and
    ``trainable_token_indices`` took only the dotted one (``block/norm`` selected nothing: a
    TargetNotFoundError). Both now read a path as its dotted name, and the config records the dotted
    name, the one PEFT's adapter_config.json needs."""
    class Block(nn.Module):
        @nn.compact
        def __call__(self, ids):
            h = nn.Embed(10, 4, name="emb")(ids)
            return nn.LayerNorm(name="norm")(nn.Dense(4, name="d")(h))

    class Outer(nn.Module):
        @nn.compact
        def __call__(self, ids):
            return nn.Dense(3, name="head")(Block(name="layers_0")(ids))

    model, ids = Outer(), jax.numpy.array([[1, 2, 3]])
    params = model.init(jax.random.key(1), ids)
    made = {}
    for style, norm, emb in (("path", "layers_0/norm", "layers_0/emb"), ("dotted", "layers.0.norm", "layers.0.emb")):
        cfg = jpeft.LoraConfig(r=2, target_modules=["head"], modules_to_save=[norm], trainable_token_indices={emb: [2, 5]})
        assert cfg.modules_to_save == ("layers.0.norm",) and cfg.trainable_token_indices == {"layers.0.emb": (2, 5)}
        made[style] = jpeft.init(cfg, params, jax.random.key(2), model, ids)
    assert set(made["path"]) == set(made["dotted"]) == {"head", "layers_0/norm", "layers_0/emb"}
    assert isinstance(made["path"]["layers_0/norm"], jpeft.SavedModule)
    for a, b in zip(jax.tree.leaves(made["path"]), jax.tree.leaves(made["dotted"])):
        np.testing.assert_array_equal(a, b)


class Classifier(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="classifier")(nn.relu(nn.Dense(6, name="d")(x)))


@pytest.mark.parametrize("method", ["ia3", "vera"])
def test_classifier_copy_beside_another_method_saves_and_restores(method, tmp_path):
    """jpeft.hf.load_peft gives the adapter of any method SEQ_CLS's classifier copy (a SavedModule
    at ``classifier``, which PEFT trains); jpeft's own format rebuilds only the sites the config
    makes, so save_adapter refused such an adapter and a checkpoint of it restored only with the
    adapter as template. The copy's path is recorded, and both load it back as it was."""
    import optax

    from jpeft.checkpoint import CheckpointManager

    model = Classifier()
    params = model.init(jax.random.key(1), X)
    cfg = (jpeft.IA3Config(target_modules=["d"], feedforward_modules=[]) if method == "ia3"
           else jpeft.VeraConfig(r=2, target_modules=["d"]))
    train, frozen = jpeft.split_frozen(jpeft.init(cfg, params, jax.random.key(2)))
    leaves, tdef = jax.tree.flatten(train)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    ad = jpeft.join_frozen(jax.tree.unflatten(tdef, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]),
                           frozen)
    plain = jpeft.apply(model, params, ad, X)
    ad["classifier"] = jpeft.SavedModule(jax.tree.map(lambda x: x + 0.5, dict(params["params"]["classifier"])))
    want = jpeft.apply(model, params, ad, X)
    assert np.abs(np.asarray(want - plain)).max() > 0.1
    d = jpeft.save_adapter(tmp_path / "a", cfg, ad, params=params)
    assert jpeft.read_adapter_info(d).module_copies == ("classifier",)
    _, loaded = jpeft.load_adapter(d, params)
    assert isinstance(loaded["classifier"], jpeft.SavedModule)
    np.testing.assert_allclose(jpeft.apply(model, params, loaded, X), want, rtol=1e-6, atol=1e-6)
    opt = optax.adam(1e-3)
    mngr = CheckpointManager(tmp_path / "c", cfg, params, optimizer=opt)
    mngr.save(1, ad, opt.init(jpeft.trainable(ad)))
    mngr.close()
    state = CheckpointManager(tmp_path / "c", cfg, params, optimizer=opt).restore(1)
    np.testing.assert_allclose(jpeft.apply(model, params, state.adapter, X), want, rtol=1e-6, atol=1e-6)


class _Writes(nn.Module):
    """A module with its own kernel that sows what it computes and keeps a running sum in batch_stats."""

    @nn.compact
    def __call__(self, x, train):
        h = x @ self.param("kernel", nn.initializers.normal(1.0), (4, 6))
        self.sow("intermediates", "h", h)
        seen = self.variable("batch_stats", "seen", lambda: jax.numpy.zeros((6,)))
        if train and not self.is_initializing():
            seen.value = seen.value + h.mean(axis=(0, 1))
        return h


class _WritingNet(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        h = nn.BatchNorm(use_running_average=not train, momentum=0.5, name="bn")(_Writes(name="w")(x, train))
        return nn.Dense(3, name="head")(h)


@pytest.mark.parametrize("cfg", [jpeft.LoraConfig(r=2, target_modules=["head"], modules_to_save=["w"]),
                                 jpeft.FullFinetuneConfig()], ids=["modules_to_save", "full"])
def test_a_module_run_on_the_adapters_copy_keeps_what_it_writes(cfg):
    """modules_to_save and full fine-tuning run the module (full: the whole model) on their own
    copy of its params, a clone applied with nothing mutable: with model.apply(..., mutable=
    ["intermediates"]) or capture_intermediates=True every sow and captured output of that
    module (full: of the whole model) was dropped with no word, and a train-mode BatchNorm
    (mutable=["batch_stats"]) raised flax's raw ModifyScopeVariableError. Now the re-run keeps
    what it writes, equal to model.apply on the merged params, under jit and grad too."""
    model = _WritingNet()
    v = model.init(jax.random.key(1), X)
    ad = jpeft.init(cfg, v, jax.random.key(2), model, X)
    leaves, tdef = jax.tree.flatten(ad)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    ad = jax.tree.unflatten(tdef, [x + 0.5 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])
    merged = {**v, "params": jpeft.merge(v["params"], ad)}
    for kw in (dict(mutable=["intermediates"]), dict(capture_intermediates=True),
               dict(train=True, mutable=["batch_stats", "intermediates"])):
        (got, got_vars), (want, want_vars) = jpeft.apply(model, v, ad, X, **kw), model.apply(merged, X, **kw)
        assert_same_output_and_writes((got, got_vars), (want, want_vars), kw)
    assert "h" in got_vars["intermediates"]["w"] and "seen" in got_vars["batch_stats"]["w"]

    @jax.jit
    def grad(a):
        def loss(a):
            out, new = jpeft.apply(model, v, a, X, train=True, mutable=["batch_stats"])
            return jax.numpy.mean(jax.numpy.sin(out)), new
        return jax.value_and_grad(loss, has_aux=True)(a)

    (_, new), g = grad(ad)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(want_vars["batch_stats"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(g)) and any(np.abs(x).max() > 0 for x in jax.tree.leaves(g))


class _OwnAndChild(nn.Module):
    """A module with a kernel of its own and a child nn.Dense 'inner'."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(8, name="inner")(x @ self.param("kernel", nn.initializers.normal(1.0), (x.shape[-1], 64)))


class _OuterNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="head")(_OwnAndChild(name="outer")(x))


@pytest.mark.parametrize("how", ["modules_to_save", "quantized"])
def test_a_capture_filter_keyed_on_module_paths_sees_the_paths_inside_a_rerun(how):
    """A module re-run on other params (a modules_to_save copy, a quantized kernel of its own) runs
    as a clone whose children's paths start at the clone: a capture_intermediates filter keyed on
    m.path (m.path == ("outer", "inner")) saw ("inner",) there and captured nothing, with no word,
    where model.apply captures the child's output. The filter now sees the paths the apply in
    progress names, and captures what model.apply on the merged (or dequantized) params does."""
    model, x = _OuterNet(), jax.random.normal(jax.random.key(0), (2, 64))
    v = model.init(jax.random.key(1), x)
    seen = []

    def by_path(m, name):
        seen.append(m.path)
        return m.path == ("outer", "inner")

    if how == "quantized":
        v = {"params": jpeft.quantize(v["params"], "int8")}
        ref = {"params": jpeft.dequantize(v["params"])}
        cfg = jpeft.LoraConfig(r=2, target_modules=["head", "inner"])
    else:
        cfg = jpeft.LoraConfig(r=2, target_modules=["head"], modules_to_save=["outer"])
    ad = jpeft.init(cfg, v, jax.random.key(2), model, x)
    leaves, tdef = jax.tree.flatten(ad)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    ad = jax.tree.unflatten(tdef, [a + 0.5 * jax.random.normal(k, a.shape, a.dtype) for a, k in zip(leaves, keys)])
    if how == "modules_to_save":
        ref = {"params": jpeft.merge(v["params"], ad)}
        want = model.apply(ref, x, capture_intermediates=by_path)
    else:
        want = jpeft.apply(model, ref, ad, x, capture_intermediates=by_path)
    seen.clear()
    got = jpeft.apply(model, v, ad, x, capture_intermediates=by_path)
    assert ("inner",) not in seen and ("outer", "inner") in seen, seen
    assert_same_output_and_writes(got, want, how)
    assert got[1]["intermediates"]["outer"]["inner"]["__call__"][0].shape == (2, 8)


class _Block(nn.Module):
    """A module with a param of its own and a child nn.Dense."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(5, name="inner")(x @ self.param("kernel", nn.initializers.normal(1.0), (4, 6)))


class _BlockNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="head")(_Block(name="outer")(x))


def test_the_copy_of_a_module_with_submodules_runs_its_submodules_copies():
    """modules_to_save=["outer"] copies the module whole, as PEFT's ModulesToSaveWrapper does:
    a copy of its own params and one of each submodule's ('outer/inner'). jpeft.apply re-ran
    'outer' with every site inside bypassed, so the submodule's copy never acted (its gradient
    was exactly 0) while jpeft.merge folded it: the merged model 19.95 off the adapted one on a
    tiny block, without a word. The copies now act inside the re-run, equal to model.apply on the
    merged params, and every copy gets a gradient."""
    model = _BlockNet()
    params = model.init(jax.random.key(1), X)
    cfg = jpeft.LoraConfig(r=2, target_modules=["head"], modules_to_save=["outer"])
    ad = jpeft.init(cfg, params, jax.random.key(2), model, X)
    assert {"outer", "outer/inner"} <= set(ad)
    leaves, tdef = jax.tree.flatten(ad)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    ad = jax.tree.unflatten(tdef, [x + 0.5 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])
    own = params["params"]["outer"]
    copy, inner = ad["outer"].params, ad["outer/inner"].params
    assert np.abs(np.asarray(inner["kernel"] - own["inner"]["kernel"])).max() > 0.1  # the copy differs from the base
    h = X @ copy["kernel"] @ inner["kernel"] + inner["bias"][None, None]
    want = h @ (params["params"]["head"]["kernel"] + ad["head"].delta_matrix()) + params["params"]["head"]["bias"][None, None]
    got = jpeft.apply(model, params, ad, X)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(model.apply(jpeft.merge(params, ad), X), got, rtol=1e-4, atol=1e-4)
    g = jax.jit(jax.grad(lambda a: jax.numpy.sum(jpeft.apply(model, params, a, X) ** 2)))(ad)
    assert all(np.abs(np.asarray(x)).max() > 0 for x in jax.tree.leaves((g["outer"], g["outer/inner"])))
