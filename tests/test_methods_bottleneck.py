"""Bottleneck adapters (Houlsby, Pfeiffer) on user-written linen models and on jpeft's Llama."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
import jpeft.models
from jpeft.methods.bottleneck import BottleneckConfig


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(12, name="attn_out")(x)
        g = nn.gelu(nn.Dense(24, name="ff_in")(h))
        return nn.Dense(12, name="ff_out")(g), (h, g)


def _setup():
    model = Block()
    x = jax.random.normal(jax.random.key(0), (2, 5, 8))
    return model, x, model.init(jax.random.key(1), x)


def test_output_equals_closed_form():
    model, x, params = _setup()
    cfg = BottleneckConfig(target_modules=["attn_out", "ff_out"], reduction_factor=4, non_linearity="gelu", init_std=0.5)
    ad = jpeft.init(cfg, params, jax.random.key(2))
    assert {k: (v.down_kernel.shape, v.up_kernel.shape) for k, v in ad.items()} == {"attn_out": ((12, 3), (3, 12)), "ff_out": ((12, 3), (3, 12))}
    # non-zero biases so that every parameter matters
    ad = {k: type(v)(v.down_kernel, v.down_bias + 0.1, v.up_kernel, v.up_bias - 0.2, v.non_linearity, 1.5) for k, v in ad.items()}
    out, (h, g) = jpeft.apply(model, params, ad, x)
    p = params["params"]

    def f(node, y):
        z = jax.nn.gelu(jnp.einsum("btd,dk->btk", y, node.down_kernel) + node.down_bias[None, None], approximate=False)
        return y + 1.5 * (jnp.einsum("btk,kd->btd", z, node.up_kernel) + node.up_bias[None, None])

    h_ref = f(ad["attn_out"], jnp.einsum("bti,io->bto", x, p["attn_out"]["kernel"]) + p["attn_out"]["bias"][None, None])
    g_ref = jax.nn.gelu(jnp.einsum("bti,io->bto", h_ref, p["ff_in"]["kernel"]) + p["ff_in"]["bias"][None, None])
    o_ref = f(ad["ff_out"], jnp.einsum("bti,io->bto", g_ref, p["ff_out"]["kernel"]) + p["ff_out"]["bias"][None, None])
    np.testing.assert_allclose(h, h_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out, o_ref, rtol=1e-5, atol=1e-5)


def test_every_activation_name_is_hugging_faces():
    """One activation table serves the models' MLPs and the adapters' ``non_linearity``; each name
    computes what ``transformers.activations.ACT2FN`` computes under it, and an adapter with that
    name applies it."""
    import torch
    from transformers.activations import ACT2FN

    from jpeft._ops import ACTIVATIONS

    x = np.linspace(-6, 6, 97, dtype=np.float32)
    for name, fn in ACTIVATIONS.items():
        ref = ACT2FN[name](torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(np.asarray(fn(jnp.asarray(x))), ref, rtol=1e-5, atol=2e-6, err_msg=name)
    model, x, params = _setup()
    ad = jpeft.init(BottleneckConfig(target_modules=["ff_out"], reduction_factor=4, non_linearity="sigmoid", init_std=0.5),
                    params, jax.random.key(2))
    n = ad["ff_out"]
    y = model.apply(params, x)[0]
    want = y + jnp.einsum("btk,kd->btd", jax.nn.sigmoid(jnp.einsum("btd,dk->btk", y, n.down_kernel)), n.up_kernel)
    np.testing.assert_allclose(jpeft.apply(model, params, ad, x)[0], want, rtol=1e-5, atol=1e-5)


def test_init_identity_and_near_identity():
    model, x, params = _setup()
    base = model.apply(params, x)[0]
    exact = jpeft.init(BottleneckConfig(target_modules=["ff_out"], init_weights="mam", reduction_factor=4), params, jax.random.key(0))
    np.testing.assert_array_equal(jpeft.apply(model, params, exact, x)[0], base)
    near = jpeft.init(BottleneckConfig(target_modules=["ff_out"], reduction_factor=2), params, jax.random.key(0))
    diff = jnp.abs(jpeft.apply(model, params, near, x)[0] - base)
    assert 0 < float(diff.max()) < 0.01 * float(jnp.abs(base).max())


def test_width_from_tracing_any_module():
    model, x, params = _setup()
    # a module without parameters of its own: the whole root returns a tuple -> named error
    with pytest.raises(jpeft.errors.BottleneckTargetError, match="not a single"):
        jpeft.init(BottleneckConfig(target_modules="^$"), params, jax.random.key(0), model, x)
    with pytest.raises(jpeft.errors.BottleneckTargetError, match="pass the model"):
        jpeft.init(BottleneckConfig(target_modules="^$"), params, jax.random.key(0))

    class Outer(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.LayerNorm(name="ln")(nn.Dense(6, name="d")(x))

    m2 = Outer()
    p2 = m2.init(jax.random.key(0), x)
    ad = jpeft.init(BottleneckConfig(target_modules=["ln"], reduction_factor=3, init_std=0.3), p2, jax.random.key(1), m2, x)
    assert ad["ln"].width == 6 and ad["ln"].down_kernel.shape == (6, 2)
    assert not np.allclose(jpeft.apply(m2, p2, ad, x), m2.apply(p2, x))


def test_wrong_width_and_merge_errors():
    model, x, params = _setup()
    ad = jpeft.init(BottleneckConfig(target_modules=["ff_out"], reduction_factor=4), params, jax.random.key(0))
    wrong = {"ff_in": ad["ff_out"]}  # width 12 adapter on a width-24 output
    with pytest.raises(jpeft.errors.BottleneckTargetError, match="output width of 12"):
        jpeft.apply(model, params, wrong, x)
    with pytest.raises(jpeft.NotMergeableError, match="non-linearity"):
        jpeft.merge(params, ad)
    with pytest.raises(jpeft.ConfigError, match="reduction_factor"):
        BottleneckConfig(reduction_factor=0.5)
    with pytest.raises(jpeft.ConfigError, match="at most 12"):
        jpeft.init(BottleneckConfig(target_modules=["ff_out"], reduction_factor=13), params, jax.random.key(0))


def test_houlsby_and_pfeiffer_on_llama():
    cfg = jpeft.models.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2)
    model = jpeft.models.LlamaForCausalLM(cfg)
    ids = jnp.ones((1, 4), jnp.int32)
    params = model.init(jax.random.key(0), ids)
    h = jpeft.init(BottleneckConfig.houlsby(reduction_factor=4), params, jax.random.key(1))
    p = jpeft.init(BottleneckConfig.pfeiffer(reduction_factor=4), params, jax.random.key(1))
    assert sorted(h) == ["model/layers_0/mlp/down_proj", "model/layers_0/self_attn/o_proj",
                         "model/layers_1/mlp/down_proj", "model/layers_1/self_attn/o_proj"]
    assert sorted(p) == ["model/layers_0/mlp/down_proj", "model/layers_1/mlp/down_proj"]
    s = jpeft.summary(params, h, print_fn=None)
    assert s["trainable"] == 4 * (16 * 4 + 4 + 4 * 16 + 16)
    assert jpeft.apply(model, params, h, ids).shape == (1, 4, 32)
