"""LoRA with a bias on B (Hugging Face PEFT's ``lora_bias=True``): the closed form on every layout
it supports, merge == apply, training moves the bias and leaves the base bit-identical, and
the refusals PEFT makes too. The PEFT format both ways is in tests/test_interop_matrix.py
(row ``lora_bias``, every family)."""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "helpers"))
from adam_step import step_moves_adapter_only  # noqa: E402

import jpeft
from jpeft.bank import AdapterBank
from jpeft.errors import BankError, ConfigError, NotMergeableError
from jpeft.merging import merge_adapters


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(6, name="d")(x)  # [b, t, 6]
        h = nn.DenseGeneral((2, 3), name="dg")(h)  # [b, t, 2, 3]
        h = nn.Conv(6, (2,), name="conv")(h.reshape(h.shape[:-2] + (6,)))
        return nn.Dense(4, use_bias=False, name="nobias")(h)


X = jax.random.normal(jax.random.key(0), (2, 5, 4))


def _setup(targets=("d", "dg", "conv", "nobias"), **kw):
    model = Net()
    params = model.init(jax.random.key(1), X)
    cfg = jpeft.LoraConfig(r=2, alpha=4, target_modules=list(targets), lora_bias=True, init_weights="random", **kw)
    ad = jpeft.init(cfg, params, jax.random.key(2), model, X)
    # every adapter tensor random, the bias included
    leaves, tdef = jax.tree.flatten(ad)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    ad = jax.tree.unflatten(tdef, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    return model, params, cfg, ad


def test_default_init_is_identity_and_random_init_is_not():
    model = Net()
    params = model.init(jax.random.key(1), X)
    ad = jpeft.init(jpeft.LoraConfig(r=2, target_modules=["d"], lora_bias=True), params, jax.random.key(2))
    assert ad["d"].lora_bias.shape == (6,) and not ad["d"].lora_bias.any()
    np.testing.assert_array_equal(jpeft.apply(model, params, ad, X), model.apply(params, X))
    ad = jpeft.init(jpeft.LoraConfig(r=2, target_modules=["d"], lora_bias=True, init_weights="random"), params,
                    jax.random.key(2))
    b = np.asarray(ad["d"].lora_bias)
    assert np.abs(b).max() > 0 and np.abs(b).max() <= 1 / np.sqrt(2)  # torch.nn.Linear's bound 1/sqrt(r)


def test_closed_form_on_dense():
    model, params, cfg, ad = _setup(targets=("d",))
    n = ad["d"]
    p = params["params"]["d"]
    bias = (p["bias"] + n.scale * n.lora_bias).reshape(1, 1, 6)
    want = X @ (p["kernel"] + n.scale * n.lora_A @ n.lora_B) + bias
    np.testing.assert_allclose(jpeft.apply(nn.Dense(6), {"params": p}, {"": n}, X), want, rtol=1e-5, atol=1e-5)
    # many tokens take the merged-kernel path of nn.Dense: same formula
    xl = jax.random.normal(jax.random.key(4), (64, 4))
    wl = xl @ (p["kernel"] + n.scale * n.lora_A @ n.lora_B) + bias.reshape(1, 6)
    np.testing.assert_allclose(jpeft.apply(nn.Dense(6), {"params": p}, {"": n}, xl), wl, rtol=1e-5, atol=1e-5)


def test_merge_equals_apply_and_unmerge_restores():
    model, params, cfg, ad = _setup(targets=("d", "dg", "conv"))
    fact = jpeft.apply(model, params, ad, X)
    merged = jpeft.merge(params, ad)
    np.testing.assert_allclose(model.apply(merged, X), fact, rtol=1e-4, atol=1e-5)
    assert np.abs(np.asarray(fact) - np.asarray(model.apply(params, X))).max() > 1e-2  # the adapter has teeth
    n = ad["dg"]
    np.testing.assert_allclose(merged["params"]["dg"]["bias"],
                               params["params"]["dg"]["bias"] + n.scale * n.lora_bias.reshape(2, 3), rtol=1e-6, atol=1e-6)
    back = jpeft.unmerge(merged, ad)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_merge_refused_without_a_base_bias():
    model, params, cfg, ad = _setup()
    with pytest.raises(NotMergeableError, match="no bias"):
        jpeft.merge(params, ad)


def test_training_moves_the_bias_and_leaves_the_base_alone():
    model, params, cfg, ad = _setup()
    new = step_moves_adapter_only(model, params, ad, X, (2, 5, 4))
    for path in ad:
        assert np.abs(np.asarray(new[path].lora_bias - ad[path].lora_bias)).min() > 0, path


def test_config_round_trip_and_refusals():
    c = jpeft.LoraConfig(r=2, target_modules=["d"], lora_bias=True)
    assert c.to_dict()["lora_bias"] is True
    assert jpeft.LoraConfig.from_dict(c.to_dict()) == c
    assert hash(c) != hash(c.replace(lora_bias=False))
    with pytest.raises(ConfigError, match="DoRA|use_dora"):
        jpeft.LoraConfig(target_modules=["d"], lora_bias=True, use_dora=True)
    with pytest.raises(ConfigError, match="init_weights='gaussian'"):
        jpeft.LoraConfig(target_modules=["d"], lora_bias=True, init_weights="gaussian")
    with pytest.raises(ConfigError, match="true or false"):
        jpeft.LoraConfig(target_modules=["d"], lora_bias="yes")

    class Emb(nn.Module):
        @nn.compact
        def __call__(self, ids):
            return nn.Embed(7, 4, name="emb")(ids)

    ids = jnp.array([[1, 2]])
    p = Emb().init(jax.random.key(0), ids)
    with pytest.raises(ConfigError, match="embed module at 'emb'"):
        jpeft.init(jpeft.LoraConfig(r=2, target_modules=["emb"], lora_bias=True), p, jax.random.key(1), Emb(), ids)


def test_adapter_merging_sums_the_bias_the_bank_routes_it_and_both_refuse_base_biases():
    """merge_adapters combines lora_bias as PEFT 0.22's add_weighted_adapter does (sum_i w_i s_i b_i
    on a scale-1 adapter; tests/test_merging.py compares with PEFT) but not trained base biases; the
    bank routes a lora_bias, as PEFT's mixed batch does (each row its own adapter's output:
    tests/test_bank.py compares with PEFT), but refuses trained base biases (bias="lora_only"),
    which PEFT shares."""
    model, params, _, ad = _setup(targets=("d",))
    merged = merge_adapters([ad, ad], [0.5, 2.0])["d"]
    np.testing.assert_allclose(merged.lora_bias, 2.5 * ad["d"].scale * ad["d"].lora_bias, rtol=1e-6)
    np.testing.assert_allclose(merged.delta_matrix(), 2.5 * ad["d"].delta_matrix(), rtol=1e-5, atol=1e-6)
    scaled = {"d": dataclasses.replace(ad["d"], scale=2.5 * ad["d"].scale)}  # the same update and bias, unmerged
    np.testing.assert_allclose(jpeft.apply(model, params, {"d": merged}, X), jpeft.apply(model, params, scaled, X),
                               rtol=1e-5, atol=1e-5)
    bank = AdapterBank.from_adapters({"a": ad}, capacity=2)
    routed = jpeft.apply(model, params, bank.route(["a", None]), X)
    np.testing.assert_allclose(routed[0], jpeft.apply(model, params, ad, X)[0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(routed[1], model.apply(params, X)[1], atol=1e-5, rtol=1e-5)
    params = model.init(jax.random.key(1), X)
    ad = jpeft.init(jpeft.LoraConfig(r=2, target_modules=["d"], bias="lora_only"), params, jax.random.key(2))
    with pytest.raises(NotMergeableError, match="trains a bias"):
        merge_adapters([ad, ad])
    with pytest.raises(BankError, match="trains a bias"):
        AdapterBank.from_adapters({"a": ad})


# -- bias="lora_only" / "all": trainable base biases ---------------------------------------------------

@pytest.mark.parametrize("mode", ["lora_only", "all"])
def test_bias_modes_merge_train_and_refusals(mode):
    model = Net()
    params = model.init(jax.random.key(1), X)
    cfg = jpeft.LoraConfig(r=2, alpha=4, target_modules=["d"], bias=mode, init_weights="random")
    ad = jpeft.init(cfg, params, jax.random.key(2), model, X)
    assert ad["d"].base_bias.shape == (6,)
    assert set(ad) == ({"d", "dg", "conv"} if mode == "all" else {"d"})  # "nobias" has no bias to train
    if mode == "all":
        assert set(ad["dg"].params) == {"bias"}
    plain = jpeft.init(cfg.replace(bias="none"), params, jax.random.key(2), model, X)  # the copies start at the base's
    np.testing.assert_allclose(jpeft.apply(model, params, ad, X), jpeft.apply(model, params, plain, X), atol=1e-6)
    leaves, tdef = jax.tree.flatten(ad)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    ad = jax.tree.unflatten(tdef, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    fact = jpeft.apply(model, params, ad, X)
    merged = jpeft.merge(params, ad)
    np.testing.assert_allclose(model.apply(merged, X), fact, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(merged["params"]["d"]["bias"], ad["d"].base_bias, rtol=1e-6)
    with pytest.raises(NotMergeableError, match="keep the base params"):
        jpeft.unmerge(merged, ad)
    before = jax.tree.map(np.array, params)
    grads = jax.grad(lambda a: jnp.sum(jpeft.apply(model, params, a, X) ** 2))(ad)
    assert np.abs(np.asarray(grads["d"].base_bias)).min() > 0
    if mode == "all":
        assert np.abs(np.asarray(grads["conv"].params["bias"])).min() > 0
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(before)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ConfigError, match="'none', 'lora_only' or 'all'"):
        jpeft.LoraConfig(target_modules=["d"], bias="some")


@pytest.mark.parametrize("kw", [{"bias": "lora_only"}, {"bias": "all"}, {"bias": "all", "modules_to_save": ["ln_f"]}])
def test_summary_counts_trained_base_biases_as_peft_does(kw):
    """PEFT trains the base biases in place (``bias="lora_only"`` / ``"all"``), so its "all
    params" stays the base's; jpeft.summary counted its copies on top (an audit: 28,768 and
    29,216 for PEFT's 28,640 on a tiny Llama). A modules_to_save copy sits beside its original:
    both are counted."""
    import copy
    import warnings

    import peft

    sys.path.insert(0, os.path.dirname(__file__))
    import _models_tiny as tiny

    hf_model, folder = tiny.hf_model("gpt2")
    model, params = jpeft.models.from_pretrained(folder)
    targets = ["c_attn", "c_fc"]
    ad = jpeft.init(jpeft.LoraConfig(r=4, alpha=8, target_modules=targets, **kw), params, jax.random.key(0),
                    model, jnp.zeros((1, 4), jnp.int32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(hf_model), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                          **kw))
    trainable, total = pm.get_nb_trainable_parameters()
    got = jpeft.summary(params, ad, print_fn=None)
    assert (got["trainable"], got["total"]) == (trainable, total)


def test_peft_file_base_bias_is_written_and_read_back_and_a_wrong_size_is_named(tmp_path):
    """LoRA's PEFT reader reshaped a trained base_layer.bias to the module's bias shape: one of
    another size in the file raised numpy's bare ValueError ("cannot reshape array"), not the named
    BaseMismatchError OFT and VeRA give (now one shared reader). The key written is PEFT's
    ``base_layer.bias`` holding the trained bias, which reads back unchanged."""
    model, params = Net(), Net().init(jax.random.key(1), X)
    cfg = jpeft.LoraConfig(r=2, alpha=4, target_modules=["d"], init_weights="random", bias="lora_only")
    ad = jpeft.init(cfg, params, jax.random.key(2), model, X)
    leaves, tdef = jax.tree.flatten(ad)  # every adapter tensor random, the trained base bias included
    keys = jax.random.split(jax.random.key(3), len(leaves))
    ad = jax.tree.unflatten(tdef, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    jpeft.hf.save_peft(str(tmp_path / "p"), cfg, ad, params=params)
    t = load_file(str(tmp_path / "p" / "adapter_model.safetensors"))
    key = "base_model.model.d.base_layer.bias"
    np.testing.assert_array_equal(t[key], np.asarray(ad["d"].base_bias))
    _, back = jpeft.hf.load_peft(str(tmp_path / "p"), params)
    np.testing.assert_array_equal(np.asarray(back["d"].base_bias), np.asarray(ad["d"].base_bias))
    with pytest.raises(jpeft.errors.UnsupportedAdapterError, match="trains its base bias.*bias='none'"):
        jpeft.hf.save_peft(str(tmp_path / "none"), cfg.replace(bias="none"), ad, params=params)
    cfg_file = tmp_path / "p" / "adapter_config.json"
    d = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps(dict(d, bias="none")))
    with pytest.raises(jpeft.errors.CheckpointError, match="carries a trained base_layer.bias.*bias='none'"):
        jpeft.hf.load_peft(str(tmp_path / "p"), params)
    cfg_file.write_text(json.dumps(d))
    t[key] = np.zeros(7, np.float32)
    save_file(t, str(tmp_path / "p" / "adapter_model.safetensors"))
    with pytest.raises(jpeft.errors.BaseMismatchError, match=r"base_layer.bias has shape \(7,\), the base's bias \(6,\)"):
        jpeft.hf.load_peft(str(tmp_path / "p"), params)
