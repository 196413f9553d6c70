"""Core LoRA behaviour (issue 2): identity at init, factored == merged, training, errors."""

import dataclasses
import functools
import math
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
from jpeft import loop, tree

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _models_tiny import BoxedMLP  # noqa: E402


# ---------------------------------------------------------------- tiny models built in the test
class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Dense(24, name="fc1")(x))
        x = nn.gelu(nn.Dense(24, name="fc2")(x))
        return nn.Dense(3, name="head")(x)


class Block(nn.Module):
    """A transformer block made of flax's own MultiHeadDotProductAttention."""

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(name="ln1")(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=16, name="attn")(h, h)
        h = nn.LayerNorm(name="ln2")(x)
        h = nn.Dense(32, name="up")(h)
        return x + nn.Dense(x.shape[-1], name="down")(nn.relu(h))


class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(12, name="embed_in")(x)
        x = Block(name="block_0")(x)
        x = Block(name="block_1")(x)
        return nn.Dense(5, name="out_proj")(x)


class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, ids):
        e = nn.Embed(20, 6, name="tok")(ids)
        h = nn.relu(nn.Conv(10, (3,), name="conv1")(e))
        h = nn.Conv(7, (2,), strides=(1,), padding="VALID", name="conv2")(h)
        h = nn.Einsum((7, 4), "btc,cd->btd", name="mix")(h)
        return h.mean(axis=1)


def _mlp():
    m = MLP()
    x = jax.random.normal(jax.random.key(0), (5, 7))
    return m, m.init(jax.random.key(1), x), x


def _tiny():
    m = Tiny()
    x = jax.random.normal(jax.random.key(0), (2, 6, 9))
    return m, m.init(jax.random.key(1), x), x


def _conv():
    m = ConvNet()
    ids = jax.random.randint(jax.random.key(0), (3, 8), 0, 20)
    return m, m.init(jax.random.key(1), ids), ids


CASES = {
    "mlp": (_mlp, ["fc1", "fc2", "head"], False),
    "mha_transformer": (_tiny, ["query", "key", "value", "out", "up"], True),
    "conv_embed": (_conv, ["tok", "conv1", "conv2", "mix"], True),
}


def _adapter(case, init="default", r=4, **kw):
    build, targets, needs_model = CASES[case]
    model, params, x = build()
    cfg = jpeft.LoraConfig(r=r, alpha=2 * r, target_modules=targets, init_weights=init, **kw)
    if needs_model:
        a = jpeft.init(cfg, params, jax.random.key(7), model, x)
    else:
        a = jpeft.init(cfg, params, jax.random.key(7))
    return model, params, x, a


# ---------------------------------------------------------------- identity, merge, unmerge
@pytest.mark.parametrize("case", list(CASES))
def test_default_init_is_exact_identity(case):
    model, params, x, a = _adapter(case)
    assert len(a) >= 3
    np.testing.assert_array_equal(np.asarray(jpeft.apply(model, params, a, x)), np.asarray(model.apply(params, x)))


@pytest.mark.parametrize("case", list(CASES))
def test_factored_equals_merged_and_unmerge_recovers(case):
    model, params, x, a = _adapter(case, init="random")
    y = jpeft.apply(model, params, a, x)
    assert not np.allclose(y, model.apply(params, x), atol=1e-3), "random adapter should change the output"
    merged = jpeft.merge(params, a)
    np.testing.assert_allclose(np.asarray(model.apply(merged, x)), np.asarray(y), atol=1e-5, rtol=1e-5)
    back = jpeft.unmerge(merged, a)
    for p, q in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_allclose(np.asarray(p), np.asarray(q), atol=1e-6)
    # merge touched only the targeted kernels
    assert jax.tree.structure(merged) == jax.tree.structure(params)


def test_merge_and_unmerge_refuse_what_is_not_an_adapter_by_name(tmp_path):
    """The pair jpeft.load_adapter returns, None, a list or a dict of arrays ended in a raw
    AttributeError ('tuple' object has no attribute 'items') from inside merge/unmerge (and
    jpeft.apply: "'dict' object has no attribute 'handles'")."""
    model, params, x = _mlp()
    cfg = jpeft.LoraConfig(r=2, target_modules=["fc2"], init_weights="random")
    a = jpeft.init(cfg, params, jax.random.key(0))
    jpeft.save_adapter(str(tmp_path / "a"), cfg, a)
    loaded = jpeft.load_adapter(str(tmp_path / "a"), params)
    for fn in (jpeft.merge, jpeft.unmerge):
        with pytest.raises(jpeft.ConfigError, match=r"found tuple \(jpeft.load_adapter .* return a pair: unpack it"):
            fn(params, loaded)
        for bad in (None, [a]):
            with pytest.raises(jpeft.ConfigError, match=f"takes an adapter, a dict .* found {type(bad).__name__}"):
                fn(params, bad)
        with pytest.raises(jpeft.ConfigError, match="entry 'fc2' is a dict, not an adapter node"):
            fn(params, {"fc2": {"lora_A": a["fc2"].lora_A, "lora_B": a["fc2"].lora_B}})
    with pytest.raises(jpeft.ConfigError, match=r"jpeft.apply takes an adapter.* found tuple \(jpeft.load_adapter"):
        jpeft.apply(model, params, loaded, x)
    with pytest.raises(jpeft.ConfigError, match="jpeft.apply: the adapter's entry 'fc2' is a dict, not an adapter node"):
        jpeft.apply(model, params, {"fc2": {"lora_A": a["fc2"].lora_A, "lora_B": a["fc2"].lora_B}}, x)
    # the unpacked pair merges as before
    np.testing.assert_allclose(np.asarray(model.apply(jpeft.merge(params, loaded[1]), x)),
                               np.asarray(jpeft.apply(model, params, a, x)), atol=1e-5)


def test_swapped_params_and_adapter_or_a_left_out_model_are_named():
    """A new user's first slips: ``jpeft.apply(model, adapter, params, x)`` and ``jpeft.merge(adapter,
    params)`` said "the adapter's entry 'params' is a dict, not an adapter node", and
    ``jpeft.apply(params, adapter, x)`` (the model left out) "jpeft.apply takes an adapter ... found
    ArrayImpl", though an adapter was given; each now says what was swapped or left out."""
    model, params, x = _mlp()
    a = jpeft.init(jpeft.LoraConfig(r=2, target_modules=["fc1", "fc2"], init="random"), params, jax.random.key(0))
    for call, where in ((lambda: jpeft.apply(model, a, params, x), "jpeft.apply"), (lambda: jpeft.merge(a, params), "jpeft.merge"),
                        (lambda: jpeft.unmerge(a, params), "jpeft.unmerge")):
        with pytest.raises(jpeft.ConfigError, match=rf"{where}: the params and the adapter are swapped: the params "
                                                    r"argument holds an adapter \(sites \['fc1', 'fc2'\]\), the adapter "
                                                    "argument a dict. Pass the base params first"):
            call()
    with pytest.raises(jpeft.ConfigError, match=r"jpeft.apply\(model, params, adapter, \*inputs\) takes the model first "
                                                r".* found dict: was the model left out\?"):
        jpeft.apply(params, a, x)
    with pytest.raises(jpeft.ConfigError, match="takes the model first .* found ArrayImpl.$"):
        jpeft.apply(x, params, a)
    # the calls the right way round: the factored and the merged model agree (the adapter is random)
    y = jpeft.apply(model, params, a, x)
    assert not np.allclose(y, model.apply(params, x), atol=1e-3)
    np.testing.assert_allclose(np.asarray(model.apply(jpeft.merge(params, a), x)), np.asarray(y), atol=1e-5)


def test_a_merge_whose_update_rounds_away_in_a_16_bit_kernel_says_so():
    """A small update (mean |dW| 1e-4, as after a short fine-tune) merged into bfloat16 kernels
    of scale 0.02: the rounding kept 28% of the updated weights at their base value and lost 27%
    of the update, so the merged model differs from the adapter by two thirds of its effect, with
    no word. Now a warning says so; float32 params, a large update and jit stay quiet."""
    import dataclasses
    import warnings

    from jpeft.merging import merge_into_base

    model, x = nn.Dense(256), jax.random.normal(jax.random.key(0), (4, 256))
    p32 = model.init(jax.random.key(1), x)
    p32 = jax.tree.map(lambda w: w * 0.02 / w.std() if w.ndim == 2 else w, p32)
    p16 = jax.tree.map(lambda w: w.astype(jnp.bfloat16), p32)
    a = jpeft.init(jpeft.LoraConfig(r=8, alpha=16, target_modules=".*", init_weights="random"), p16, jax.random.key(2))
    big = a
    a = {"": dataclasses.replace(a[""], lora_B=a[""].lora_B * (1e-4 / float(jnp.abs(a[""].kernel_delta()).mean())))}
    for merge in (jpeft.merge, lambda p, ad: merge_into_base(p, [ad])):
        with pytest.warns(UserWarning, match=r"merged weights are bfloat16, whose rounding lost 2\d% of the adapter's "
                                             r"update .* 2\d% of the updated weights kept their base value"):
            merged = merge(p16, a)
        # the numbers are what they were: the update added in float32, then rounded to the kernel's dtype
        want = (p16["params"]["kernel"].astype(jnp.float32) + a[""].kernel_delta()).astype(jnp.bfloat16)
        np.testing.assert_array_equal(np.asarray(merged["params"]["kernel"], np.float32), np.asarray(want, np.float32))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            merge(p32, a)  # float32: exact
            merge(p16, big)  # an update far above the kernel's rounding
            jax.jit(merge)(p16, a)  # traced: not looked at


def _dense_lora(features, x, alpha):
    """An ``nn.Dense(features)`` on ``x`` with a random r=3 LoRA, and its W, b, A, B in float64."""
    model = nn.Dense(features)
    params = model.init(jax.random.key(0), x)
    a = jpeft.init(jpeft.LoraConfig(r=3, alpha=alpha, target_modules=".*", init_weights="random"), params, jax.random.key(1))
    f64 = lambda v: np.asarray(v, np.float64)  # noqa: E731
    p = params["params"]
    return model, params, a, f64(p["kernel"]), f64(p["bias"]), f64(a[""].lora_A), f64(a[""].lora_B)


def test_lora_matches_fully_computed_matrix():
    """Against the closed form x @ (W + s A B) + b, computed by hand in numpy."""
    x = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
    model, params, a, W, b, A, B = _dense_lora(6, x, alpha=5)
    want = x @ (W + (5 / 3) * A @ B) + b
    np.testing.assert_allclose(np.asarray(jpeft.apply(model, params, a, x)), want, atol=1e-5)


def test_lora_is_computed_factored_never_materialized():
    model, params, x = _mlp()
    a = jpeft.init(jpeft.LoraConfig(r=2, target_modules=["fc2"], init_weights="random"), params, jax.random.key(0))
    jaxpr = jax.make_jaxpr(lambda p, ad, x: jpeft.apply(model, p, ad, x))(params, a, x)
    shapes = [tuple(v.aval.shape) for eqn in jaxpr.jaxpr.eqns for v in eqn.outvars]
    assert (24, 24) not in shapes, "the merged [in, out] update must not be formed while applying"


def test_many_tokens_use_the_merged_form_with_factored_gradients():
    """With more tokens than in*out/(in+out) a Dense site computes x @ (W + s A B) (less memory
    traffic than the two activation-sized factored products); outputs and adapter gradients
    equal the closed form, and no [in, out] gradient is formed in adapter training."""
    x = np.random.default_rng(1).normal(size=(64, 16)).astype(np.float32)  # 64 * 40 > 16 * 24
    model, params, a, W, b, A, B = _dense_lora(24, x, alpha=6)
    np.testing.assert_allclose(np.asarray(jpeft.apply(model, params, a, x)), x @ (W + 2.0 * A @ B) + b, atol=1e-5)
    jaxpr = jax.make_jaxpr(lambda p, ad, x: jpeft.apply(model, p, ad, x))(params, a, x)
    assert "name=_merged_matmul" in str(jaxpr), "merged form expected"
    # gradients: loss = sum(y * G) -> dA = s x^T G B^T, dB = s A^T x^T G (closed form)
    G = np.random.default_rng(2).normal(size=(64, 24)).astype(np.float32)
    g = jax.grad(lambda ad: jnp.sum(jpeft.apply(model, params, ad, x) * G))(a)[""]
    np.testing.assert_allclose(np.asarray(g.lora_A), 2.0 * x.T @ G @ B.T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(g.lora_B), 2.0 * A.T @ x.T @ G, rtol=1e-4, atol=1e-4)
    # input gradients too (the residual stream flows through adapted layers)
    gx = jax.grad(lambda x: jnp.sum(jpeft.apply(model, params, a, x) * G))(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(gx), G @ (W + 2.0 * A @ B).T, rtol=1e-4, atol=1e-4)
    # the kernel's gradient x^T dy (a [16, 24] dot over the tokens) is computed only when asked for
    import re

    def weight_sized_products(f, *args):  # dots (or XLA CPU matmul fusions) with a [16, 24] result
        hlo = jax.jit(f).lower(*args).compile().as_text()
        return len(re.findall(r"= f32\[16,24\]\{[^}]*\} (?:dot|fusion)\(", hlo))

    loss = lambda p, ad, x: jnp.sum(jnp.tanh(jpeft.apply(model, p, ad, x)) * G)  # noqa: E731
    n_adapter = weight_sized_products(jax.grad(loss, argnums=1), params, a, x)
    n_both = weight_sized_products(jax.grad(loss, argnums=(0, 1)), params, a, x)
    assert n_both > n_adapter, (n_adapter, n_both)
    # the same with few tokens stays factored, and both forms agree
    few = x[:4]
    jaxpr = jax.make_jaxpr(lambda p, ad, x: jpeft.apply(model, p, ad, x))(params, a, few)
    assert "_merged_matmul" not in str(jaxpr)
    np.testing.assert_allclose(np.asarray(jpeft.apply(model, params, a, few)), np.asarray(jpeft.apply(model, params, a, x))[:4],
                               atol=1e-5)


def test_forward_mode_works_on_the_merged_form_as_on_the_factored_one():
    """jax.jvp, jax.jacfwd and Hessian-vector products through a Dense site with many tokens: the
    merged form was a custom_vjp, so they raised JAX's TypeError ("can't apply forward-mode
    autodiff (jvp) to a custom_vjp function") while the same call with few tokens worked."""
    x = np.random.default_rng(1).normal(size=(64, 16)).astype(np.float32)  # the merged form, as above
    model, params, a, W, b, A, B = _dense_lora(24, x, alpha=6)
    dA, dB = (np.random.default_rng(i).normal(size=v.shape) for i, v in ((3, A), (4, B)))
    t = {"": dataclasses.replace(a[""], lora_A=jnp.asarray(dA, jnp.float32), lora_B=jnp.asarray(dB, jnp.float32))}
    dx = np.random.default_rng(5).normal(size=x.shape).astype(np.float32)
    y, dy = jax.jvp(lambda ad, x: jpeft.apply(model, params, ad, x), (a, jnp.asarray(x)), (t, jnp.asarray(dx)))
    np.testing.assert_allclose(np.asarray(y), x @ (W + 2.0 * A @ B) + b, atol=1e-4)
    np.testing.assert_allclose(np.asarray(dy), dx @ (W + 2.0 * A @ B) + 2.0 * x @ (dA @ B + A @ dB),
                               rtol=1e-4, atol=1e-3)
    jac = jax.jacfwd(lambda x: jpeft.apply(model, params, a, x))(jnp.asarray(x[:8]).repeat(8, 0))
    np.testing.assert_allclose(np.asarray(jac[0, :, 0, :]), (W + 2.0 * A @ B).T, rtol=1e-4, atol=1e-4)
    # Hessian-vector product of 0.5 |y|^2 in lora_A along dA: 4 x^T x dA B B^T (closed form)
    loss = lambda ad: 0.5 * jnp.sum(jpeft.apply(model, params, ad, x) ** 2)  # noqa: E731
    zero_b = jnp.zeros_like(a[""].lora_B)
    hv = jax.jvp(jax.grad(loss), (a,), ({"": dataclasses.replace(t[""], lora_B=zero_b)},))[1][""]
    np.testing.assert_allclose(np.asarray(hv.lora_A), 4.0 * x.T @ x @ dA @ B @ B.T, rtol=1e-4, atol=1e-2)


def test_tied_embedding_lora():
    """An embedding LoRA adapts the lookup only (Hugging Face PEFT's unmerged model), so merging
    it into an embedding the model also reads through attend is refused; with
    ensure_weight_tying=True it adapts attend too and merging is exact."""
    class Tied(nn.Module):
        @nn.compact
        def __call__(self, ids):
            emb = nn.Embed(11, 4, name="wte")
            return emb.attend(emb(ids))

    m = Tied()
    ids = jnp.arange(6).reshape(2, 3)
    p = m.init(jax.random.key(0), ids)
    cfg = jpeft.LoraConfig(r=2, target_modules=["wte"], init_weights="random")
    a = jpeft.init(cfg, p, jax.random.key(1), m, ids)  # the trace sees attend: tied
    assert a["wte"].tied_output is True
    e = p["params"]["wte"]["embedding"]
    e2 = e + a["wte"].delta_matrix()
    np.testing.assert_allclose(jpeft.apply(m, p, a, ids), e2[ids] @ e.T, rtol=1e-5, atol=1e-5)
    with pytest.raises(jpeft.NotMergeableError, match="tied output projection"):
        jpeft.merge(p, a)
    b = jpeft.init(cfg.replace(ensure_weight_tying=True), p, jax.random.key(1), m, ids)
    np.testing.assert_allclose(jpeft.apply(m, p, b, ids), e2[ids] @ e2.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jpeft.apply(m, p, b, ids), m.apply(jpeft.merge(p, b), ids), rtol=1e-5, atol=1e-5)
    # without the model jpeft cannot tell whether the embedding is tied: merging says so
    c = jpeft.init(cfg, p, jax.random.key(1))
    assert c["wte"].tied_output is None
    with pytest.warns(UserWarning, match="cannot tell whether"):
        jpeft.merge(p, c)



class _ClassEmbeddings(nn.Module):
    """A classifier scoring a projection against class embeddings: the nn.Embed 'classes' is read through attend
    only, its lookup never runs."""

    @nn.compact
    def __call__(self, x):
        return nn.Embed(7, 4, name="classes").attend(nn.Dense(4, name="proj")(x))


def test_an_embedding_read_only_through_attend_is_refused_unless_lora_adapts_attend():
    """LoRA on an nn.Embed the model reads only through attend made a site that never acted, without a word: its
    factors got a zero gradient (never trained), and jpeft.merge folded them into the table attend reads anyway
    (the merged model 2140 off jpeft.apply on a tiny classifier; a modules_to_save copy or trainable tokens of it,
    28.4). Now jpeft.init given the model refuses them by name; with ensure_weight_tying=True the LoRA adapts
    attend, equal to the closed form h @ (E + s A B)^T."""
    m = _ClassEmbeddings()
    x = jax.random.normal(jax.random.key(0), (3, 5))
    p = m.init(jax.random.key(1), x)
    for cfg, fix in ((jpeft.LoraConfig(r=2, target_modules=["proj", "classes"]), "ensure_weight_tying=True"),
                     (jpeft.LoraConfig(r=2, target_modules=["classes"], use_dora=True), "ensure_weight_tying=True"),
                     (jpeft.LoraConfig(r=2, target_modules=["proj"], modules_to_save=["classes"]), "modules_to_save"),
                     (jpeft.LoraConfig(r=2, target_modules=["proj"], trainable_token_indices={"classes": [1, 2]}),
                      "trainable_token_indices")):
        with pytest.raises(jpeft.errors.UnsupportedModuleError, match=f"never looks ids up in.*{fix}"):
            jpeft.init(cfg, p, jax.random.key(2), m, x)
    cfg = jpeft.LoraConfig(r=2, target_modules=["proj", "classes"], ensure_weight_tying=True)
    a = _random_like(jpeft.init(cfg, p, jax.random.key(2), m, x), jax.random.key(3))
    y = jpeft.apply(m, p, a, x)
    own = p["params"]
    h = x @ (own["proj"]["kernel"] + a["proj"].delta_matrix()) + own["proj"]["bias"][None, :]
    np.testing.assert_allclose(y, h @ (own["classes"]["embedding"] + a["classes"].delta_matrix()).T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(m.apply(jpeft.merge(p, a), x), y, rtol=1e-4, atol=1e-4)
    g = jax.grad(lambda a: jnp.sum(jpeft.apply(m, p, a, x) ** 2))(a)
    assert all(float(jnp.abs(v).max()) > 0 for v in jax.tree.leaves(g["classes"]))

def test_a_site_made_from_params_alone_on_an_embedding_read_only_through_attend_is_refused_at_apply():
    """Without the model, jpeft.init cannot see that the nn.Embed 'classes' is read through attend only, and
    made LoRA, modules_to_save and trainable-token sites on its lookup: jpeft.apply then ran without them, without
    a word (their gradient exactly 0, so training never moved them; jpeft.merge folded them in anyway, with a
    warning, 294 off jpeft.apply for the LoRA). jpeft.apply now refuses such a site by name, under jit and grad
    too; with ensure_weight_tying=True the site made from the params alone acts on attend (closed form
    h @ (E + s A B)^T), and a tied embedding that is also looked up still applies as before."""
    m = _ClassEmbeddings()
    x = jax.random.normal(jax.random.key(0), (3, 5))
    p = m.init(jax.random.key(1), x)
    for cfg in (jpeft.LoraConfig(r=2, target_modules=["proj", "classes"]),
                jpeft.LoraConfig(r=2, target_modules=["proj"], modules_to_save=["classes"]),
                jpeft.LoraConfig(r=2, target_modules=["proj"], trainable_token_indices={"classes": [1, 2]})):
        a = _random_like(jpeft.init(cfg, p, jax.random.key(2)), jax.random.key(3))
        for run in (lambda a: jpeft.apply(m, p, a, x), jax.jit(lambda a: jpeft.apply(m, p, a, x)),
                    jax.grad(lambda a: jnp.sum(jpeft.apply(m, p, a, x) ** 2))):
            with pytest.raises(jpeft.errors.UnsupportedModuleError,
                               match="site 'classes' acts on the embedding's lookup, but this call read that embedding "
                                     "through attend only.*ensure_weight_tying=True"):
                run(a)
    cfg = jpeft.LoraConfig(r=2, target_modules=["proj", "classes"], ensure_weight_tying=True)
    a = _random_like(jpeft.init(cfg, p, jax.random.key(2)), jax.random.key(3))
    own = p["params"]
    h = x @ (own["proj"]["kernel"] + a["proj"].delta_matrix()) + own["proj"]["bias"][None, :]
    np.testing.assert_allclose(jpeft.apply(m, p, a, x), h @ (own["classes"]["embedding"] + a["classes"].delta_matrix()).T,
                               rtol=1e-4, atol=1e-4)

    class Tied(nn.Module):  # looked up and read through attend: the lookup's site acts, as in PEFT
        @nn.compact
        def __call__(self, ids):
            emb = nn.Embed(11, 4, name="wte")
            return emb.attend(emb(ids))

    ids = jnp.arange(6).reshape(2, 3)
    p = Tied().init(jax.random.key(0), ids)
    c = _random_like(jpeft.init(jpeft.LoraConfig(r=2, target_modules=["wte"]), p, jax.random.key(1)), jax.random.key(4))
    e = p["params"]["wte"]["embedding"]
    np.testing.assert_allclose(jpeft.apply(Tied(), p, c, ids), (e + c["wte"].delta_matrix())[ids] @ e.T, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- transforms
def test_jit_grad_vmap():
    model, params, x, a = _adapter("mha_transformer", init="random")
    f = jax.jit(lambda ad, x: jpeft.apply(model, params, ad, x))
    np.testing.assert_allclose(f(a, x), jpeft.apply(model, params, a, x), atol=1e-5)
    g = jax.grad(lambda ad: jnp.sum(jpeft.apply(model, params, ad, x) ** 2))(a)
    assert jax.tree.structure(g) == jax.tree.structure(a)
    assert all(float(jnp.abs(l).sum()) > 0 for l in jax.tree.leaves(g))
    v = jax.vmap(lambda xi: jpeft.apply(model, params, a, xi[None])[0])(x)
    np.testing.assert_allclose(v, jpeft.apply(model, params, a, x), atol=1e-5)


def test_rslora_scale_and_rank_pattern():
    model, params, x = _mlp()
    a = jpeft.init(jpeft.LoraConfig(r=16, alpha=8, use_rslora=True, target_modules=["fc1"]), params, jax.random.key(0))
    assert math.isclose(a["fc1"].scale, 8 / math.sqrt(16))
    a = jpeft.init(jpeft.LoraConfig(r=16, alpha=8, target_modules=["fc1"]), params, jax.random.key(0))
    assert math.isclose(a["fc1"].scale, 0.5)
    c = jpeft.LoraConfig(r=4, alpha=8, target_modules=["fc1", "fc2"], rank_pattern={"fc2": 2}, alpha_pattern={"fc2": 1})
    a = jpeft.init(c, params, jax.random.key(0))
    assert a["fc1"].r == 4 and a["fc2"].r == 2 and math.isclose(a["fc2"].scale, 0.5)


def test_dropout_uses_dropout_rng():
    model, params, x = _mlp()
    a = jpeft.init(jpeft.LoraConfig(r=4, dropout=0.5, target_modules=["fc1", "fc2"], init_weights="random"), params, jax.random.key(0))
    y0 = jpeft.apply(model, params, a, x)
    y1 = jpeft.apply(model, params, a, x, rngs={"dropout": jax.random.key(1)})
    y1b = jpeft.apply(model, params, a, x, rngs={"dropout": jax.random.key(1)})
    y2 = jpeft.apply(model, params, a, x, rngs={"dropout": jax.random.key(2)})
    np.testing.assert_array_equal(y1, y1b)
    assert not np.allclose(y0, y1) and not np.allclose(y1, y2)


def test_config_round_trip_with_hf_keys():
    c = jpeft.LoraConfig(r=8, alpha=16, dropout=0.1, target_modules=["q_proj", "v_proj"], use_rslora=True, init_weights="gaussian",
                         rank_pattern={"q_proj": 4})
    d = c.to_dict()
    assert d["lora_alpha"] == 16 and d["lora_dropout"] == 0.1 and d["r"] == 8 and d["use_rslora"] is True
    assert d["init_lora_weights"] == "gaussian" and d["peft_type"] == "LORA"
    assert jpeft.LoraConfig.from_dict(d) == c
    assert jpeft.AdapterConfig.from_dict(d) == c
    assert jpeft.LoraConfig.from_json(c.to_json()) == c
    assert jpeft.LoraConfig.from_dict(jpeft.LoraConfig().to_dict()).init_weights == "default"
    # keys Hugging Face writes that do not concern jpeft are accepted
    jpeft.LoraConfig.from_dict({**d, "task_type": "CAUSAL_LM", "base_model_name_or_path": "x", "bias": "none"})


def test_target_matching_follows_hf_peft():
    paths = ["model/layers_0/self_attn/q_proj", "model/layers_0/self_attn/qq_proj", "model/layers_1/mlp/up_proj"]
    assert tree.select(["q_proj"], paths) == paths[:1]
    assert tree.select(["self_attn.q_proj"], paths) == paths[:1]
    assert tree.select(r".*layers\.1\.mlp\.up_proj", paths) == paths[2:]  # HF dotted regex
    assert tree.select(r"model/layers_\d+/self_attn/q.*", paths) == paths[:2]
    assert tree.hf_name(paths[0]) == "model.layers.0.self_attn.q_proj"
    assert tree.from_hf_name("model.layers.0.self_attn.q_proj") == paths[0]
    with pytest.raises(jpeft.TargetNotFoundError):
        tree.select(["proj"], paths)  # suffixes match whole components only


# ---------------------------------------------------------------- training
def test_training_reduces_loss_and_leaves_base_untouched():
    model, params, _ = _mlp()
    kx, kw = jax.random.split(jax.random.key(3))
    X = jax.random.normal(kx, (64, 7))
    target_w = jax.random.normal(kw, (7, 3))
    Y = model.apply(params, X) + 0.5 * jnp.tanh(X @ target_w)
    base_copy = jax.tree.map(np.array, params)
    a = jpeft.init(jpeft.LoraConfig(r=4, alpha=8, target_modules=["fc1", "fc2", "head"]), params, jax.random.key(4))

    def loss_fn(params, adapter, batch, key):
        pred = jpeft.apply(model, params, adapter, batch["x"])
        return jnp.mean((pred - batch["y"]) ** 2), {"mae": jnp.mean(jnp.abs(pred - batch["y"]))}

    opt = optax.adam(1e-2)
    state = opt.init(a)
    base_shapes = {tuple(l.shape) for l in jax.tree.leaves(params)}
    assert not any(tuple(l.shape) in base_shapes for l in jax.tree.leaves(state) if getattr(l, "ndim", 0) > 0)
    step = jpeft.make_train_step(loss_fn, opt)
    losses = []
    for i in range(50):
        a, state, m = step(params, a, state, {"x": X, "y": Y}, jax.random.key(i))
        losses.append(float(m["loss"]))
        assert "mae" in m and int(m["skipped"]) == 0
    assert losses[-1] < losses[0] / 10, losses
    for p, q in zip(jax.tree.leaves(params), jax.tree.leaves(base_copy)):
        np.testing.assert_array_equal(np.asarray(p), q)


def test_nonfinite_step_is_skipped():
    model, params, x = _mlp()
    a = jpeft.init(jpeft.LoraConfig(r=2, target_modules=["fc1"]), params, jax.random.key(0))

    def loss_fn(params, adapter, batch, key):
        return jnp.mean(jpeft.apply(model, params, adapter, batch) ** 2)

    opt = optax.sgd(0.1)
    step = jpeft.make_train_step(loss_fn, opt, donate=False)
    bad = x.at[0, 0].set(jnp.nan)
    a2, s2, m = step(params, a, opt.init(a), bad, jax.random.key(0))
    assert int(m["skipped"]) == 1
    for p, q in zip(jax.tree.leaves(a2), jax.tree.leaves(a)):
        np.testing.assert_array_equal(p, q)


def test_summary_counts():
    model, params, x = _mlp()
    a = jpeft.init(jpeft.LoraConfig(r=2, target_modules=["fc1", "head"]), params, jax.random.key(0))
    lines = []
    s = jpeft.summary(params, a, print_fn=lines.append)
    assert s["trainable"] == (7 * 2 + 2 * 24) + (24 * 2 + 2 * 3)
    assert s["base"] == (7 * 24 + 24) + (24 * 24 + 24) + (24 * 3 + 3)
    assert s["total"] == s["base"] + s["trainable"] and math.isclose(s["share"], s["trainable"] / s["total"])
    assert "trainable params: 116" in lines[0]
    # works without allocating, on abstract shapes
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    assert jpeft.summary(abstract, None, print_fn=None)["base"] == s["base"]


# ---------------------------------------------------------------- errors
def test_target_not_found_lists_nearest_paths():
    model, params, x = _tiny()
    with pytest.raises(jpeft.TargetNotFoundError) as e:
        jpeft.init(jpeft.LoraConfig(target_modules=["qeury"]), params, jax.random.key(0), model, x)
    msg = str(e.value)
    assert "qeury" in msg and "block_0/attn/query" in msg
    listed = msg.split("nearest first:")[1].split()
    assert len(listed) <= 20 and listed[0].endswith("query")


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(r=0), "r must be a positive integer"),
        (dict(r=-2), "r must be a positive integer"),
        (dict(alpha=0), "alpha must be > 0"),
        (dict(alpha=-1.0), "alpha must be > 0"),
        (dict(dropout=1.0), "dropout must be in [0, 1)"),
        (dict(dropout=-0.1), "dropout must be in [0, 1)"),
        (dict(init_weights="kaiming"), "init_weights (init_lora_weights) must be one of"),
    ],
)
def test_bad_config_values(kwargs, needle):
    with pytest.raises(jpeft.ConfigError) as e:
        jpeft.LoraConfig(**kwargs)
    assert needle in str(e.value)


def test_from_dict_unknown_keys():
    with pytest.raises(jpeft.ConfigError) as e:
        jpeft.LoraConfig.from_dict({"r": 4, "lora_alpah": 8})
    assert "lora_alpah" in str(e.value) and "lora_alpha" in str(e.value)


def test_adapter_on_params_of_another_shape():
    model, params, x = _mlp()
    a = jpeft.init(jpeft.LoraConfig(r=2, target_modules=["fc2"]), params, jax.random.key(0))
    other = MLP().init(jax.random.key(1), jnp.ones((1, 9)))  # fc1 differs; make fc2 differ too
    other = jax.tree_util.tree_map_with_path(
        lambda p, v: jnp.zeros((24, 30)) if tree.path_str(p) == "params/fc2/kernel" else v, other)
    with pytest.raises(jpeft.ShapeMismatchError) as e:
        jpeft.merge(other, a)
    assert "fc2" in str(e.value) and "(24, 24)" in str(e.value) and "(24, 30)" in str(e.value)
    with pytest.raises(jpeft.ShapeMismatchError) as e:
        jpeft.apply(nn.Dense(30, name=None), {"params": {"kernel": jnp.zeros((7, 30)), "bias": jnp.zeros(30)}},
                    {"": a["fc2"]}, x)
    assert "(24, 24)" in str(e.value) and "(7, 30)" in str(e.value)


def test_nd_kernel_without_model_says_how_to_fix():
    model, params, x = _tiny()
    with pytest.raises(jpeft.errors.LayoutError) as e:
        jpeft.init(jpeft.LoraConfig(target_modules=["query"]), params, jax.random.key(0))
    assert "jpeft.init(config, params, key, model, x)" in str(e.value)


class _Axis1(nn.Module):
    """A 2-D kernel contracting axis 1 of a 3-D input: jpeft.init without the model sees a Dense."""

    @nn.compact
    def __call__(self, x):
        return nn.DenseGeneral(5, axis=1, name="m")(x)


class _OutIn(nn.Module):
    """A square 2-D kernel stored ``[out, in]`` (PyTorch's orientation)."""

    @nn.compact
    def __call__(self, x):
        return nn.Einsum((4, 4), "bi,oi->bo", name="m")(x)


@pytest.mark.parametrize("make", ["lora", "ia3", "oft"])
def test_a_kernel_shape_that_hides_its_layout_is_refused_at_apply(make):
    """Built from the params alone (no model), a 2-D kernel is taken as ``[in, out]`` on the input's
    last axis; where the module contracts another axis, or stores ``[out, in]``, apply used to
    compute another function than merge (silently); now a named LayoutError says how to fix."""
    rng = np.random.default_rng(0)
    cfg = {"lora": jpeft.LoraConfig(r=2, target_modules=["m"]),
           "ia3": jpeft.IA3Config(target_modules=["m"], feedforward_modules=["m"]),
           "oft": jpeft.OFTConfig(oft_block_size=2, r=0, target_modules=["m"])}[make]
    cases = []
    if make != "oft":  # OFT refuses this one with its own message (tests/test_methods_oft.py)
        cases.append((_Axis1(), np.ones((2, 4, 4), np.float32)))
    if make != "lora":  # LoRA refused this one already
        cases.append((_OutIn(), np.ones((3, 4), np.float32)))
    for model, x in cases:
        params = model.init(jax.random.key(0), x)
        adapter = jpeft.init(cfg, params, jax.random.key(1))
        adapter = jax.tree.map(lambda t: jnp.asarray(0.5 * rng.standard_normal(t.shape), t.dtype), adapter)
        with pytest.raises(jpeft.errors.LayoutError) as e:
            jpeft.apply(model, params, adapter, x)
        assert "jpeft.init(config, params, key, model, x)" in str(e.value)
        if make == "oft":  # OFT adapts nn.Dense only: refused by name at init given the model
            continue
        # built with the model, apply and merge compute the same function
        adapter = jpeft.init(cfg, params, jax.random.key(1), model, x)
        adapter = jax.tree.map(lambda t: jnp.asarray(0.5 * rng.standard_normal(t.shape), t.dtype), adapter)
        np.testing.assert_allclose(model.apply(jpeft.merge(params, adapter), x), jpeft.apply(model, params, adapter, x),
                                   rtol=1e-5, atol=1e-5)


class _OwnOutIn(nn.Module):
    """A module of one's own holding a square ``kernel`` stored ``[out, in]`` (PyTorch's orientation)."""

    @nn.compact
    def __call__(self, x):
        return x @ self.param("kernel", nn.initializers.normal(1.0), (4, 4)).T


class _WrapsOwn(nn.Module):
    @nn.compact
    def __call__(self, x):
        return _OwnOutIn(name="m")(x)


@pytest.mark.parametrize("make", ["ia3_ff", "ia3_out", "oft"])
def test_ia3_and_oft_refuse_a_module_of_ones_own_at_apply(make):
    """IA3 and OFT built from the params alone took any module holding a 2-D ``kernel`` and, at
    apply, scaled or rotated its input or output: right for apply, but merge folded the update
    into the kernel as ``[in, out]``, so for a module storing ``[out, in]`` the merged model was
    2.8 (IA3) and 6.1 (OFT) off apply, silently. Given the model, init refused it already; apply
    now refuses it too, by name (linen, and NNX's modules without a linen twin)."""
    from flax import nnx

    cfg = {"ia3_ff": jpeft.IA3Config(target_modules=["m"], feedforward_modules=["m"]),
           "ia3_out": jpeft.IA3Config(target_modules=["m"], feedforward_modules=[]),
           "oft": jpeft.OFTConfig(oft_block_size=2, r=0, target_modules=["m"])}[make]
    x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    model = _WrapsOwn()
    params = model.init(jax.random.key(0), x)
    adapter = jax.tree.map(lambda t: t + 0.5, jpeft.init(cfg, params, jax.random.key(1)))
    with pytest.raises(jpeft.errors.UnsupportedModuleError, match="'m' is a _OwnOutIn; linear adapters support"):
        jpeft.apply(model, params, adapter, x)
    with pytest.raises(jpeft.errors.UnsupportedModuleError, match="not a linear module this method can adapt"):
        jpeft.init(cfg, params, jax.random.key(1), model, x)

    class Own(nnx.Module):
        def __init__(self):
            self.kernel = nnx.Param(jnp.asarray(params["params"]["m"]["kernel"]))

        def __call__(self, x):
            return x @ self.kernel.T

    class Wrap(nnx.Module):
        def __init__(self):
            self.m = Own()

        def __call__(self, x):
            return self.m(x)

    graphdef, state = nnx.split(Wrap())
    adapter = jax.tree.map(lambda t: t + 0.5, jpeft.init(cfg, state, jax.random.key(1)))
    with pytest.raises(jpeft.errors.UnsupportedModuleError, match="'m' is an? Own( module)?;"):
        jpeft.apply(graphdef, state, adapter, x)

def test_nothing_half_built_on_error():
    """A failing init returns nothing; the params are not modified."""
    model, params, x = _mlp()
    before = jax.tree.map(np.array, params)
    with pytest.raises(jpeft.TargetNotFoundError):
        jpeft.init(jpeft.LoraConfig(target_modules=["fc1", "nope"][1:]), params, jax.random.key(0))
    for p, q in zip(jax.tree.leaves(params), jax.tree.leaves(before)):
        np.testing.assert_array_equal(np.asarray(p), q)


def test_adapter_does_not_depend_on_params_key_order():
    """jit and eval_shape return key-sorted dicts; the same params in another order give the same adapter."""
    model, params, x = _mlp()
    inner = params["params"]
    reordered = {"params": {k: inner[k] for k in reversed(list(inner))}}
    for cfg in (jpeft.LoraConfig(r=2, target_modules=["fc1", "fc2", "head"], init_weights="random"),
                jpeft.BottleneckConfig(target_modules=["fc1", "fc2"], reduction_factor=4)):
        a = jpeft.init(cfg, params, jax.random.key(0), model, x)
        b = jpeft.init(cfg, reordered, jax.random.key(0), model, x)
        assert sorted(a) == sorted(b)
        for k in a:
            for u, v in zip(jax.tree.leaves(a[k]), jax.tree.leaves(b[k])):
                np.testing.assert_array_equal(u, v)


class _UnsortedAxes(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.DenseGeneral(5, axis=(-1, -2), name="layer")(x)


def _random_leaves(adapter, seed=2):
    leaves, tdef = jax.tree.flatten(adapter)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tdef, [0.5 * jax.random.normal(k, v.shape) + (v.ndim == 1) for k, v in zip(keys, leaves)])


@pytest.mark.parametrize("cfg", [jpeft.LoraConfig(r=2, alpha=3, target_modules=["layer"]),
                                 jpeft.LoraConfig(r=2, alpha=3, use_dora=True, target_modules=["layer"]),
                                 jpeft.VeraConfig(r=2, target_modules=["layer"]),
                                 jpeft.AdaLoraConfig(init_r=2, target_r=1, total_step=4, target_modules=["layer"])],
                         ids=["lora", "dora", "vera", "adalora"])
def test_dense_general_axes_out_of_order_contract_as_flax_does(cfg):
    """nn.DenseGeneral sorts ``axis`` (its kernel for axis=(-1, -2) is [x.shape[-2], x.shape[-1], out]); the
    factored forward contracted the axes in the given order: equal sizes ran and gave another result (12.7 off)."""
    x = jnp.asarray(np.random.RandomState(0).randn(2, 3, 4, 4).astype(np.float32))
    model = _UnsortedAxes()
    params = model.init(jax.random.key(0), x)
    a = _random_leaves(jpeft.init(cfg, params, jax.random.key(1), model, x))
    got = jpeft.apply(model, params, a, x)
    np.testing.assert_allclose(got, model.apply(jpeft.merge(params, a), x), atol=1e-5)
    if isinstance(cfg, jpeft.LoraConfig) and not cfg.use_dora:
        n, w = a["layer"], np.asarray(params["params"]["layer"]["kernel"])
        w_eff = w + n.scale * (np.asarray(n.lora_A) @ np.asarray(n.lora_B)).reshape(w.shape)
        want = np.einsum("bsij,ijo->bso", np.asarray(x), w_eff) + np.asarray(params["params"]["layer"]["bias"])
        np.testing.assert_allclose(got, want, atol=1e-5)


class _DepthwiseThenDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(6, name="head")(nn.Conv(4, (3, 3), feature_group_count=4, name="dw")(x))


def test_a_grouped_conv_blocks_only_when_targeted():
    """A depthwise conv in the model must not make every jpeft.init fail; targeting it is refused by name."""
    x = jnp.ones((1, 5, 5, 4))
    model = _DepthwiseThenDense()
    params = model.init(jax.random.key(0), x)
    a = _random_leaves(jpeft.init(jpeft.LoraConfig(r=2, target_modules=["head"]), params, jax.random.key(1), model, x))
    np.testing.assert_allclose(jpeft.apply(model, params, a, x), model.apply(jpeft.merge(params, a), x), atol=1e-5)
    for cfg in (jpeft.LoraConfig(r=2, target_modules=["dw"]), jpeft.IA3Config(target_modules=["dw"], feedforward_modules=[])):
        with pytest.raises(jpeft.errors.UnsupportedModuleError, match="feature_group_count=4"):
            jpeft.init(cfg, params, jax.random.key(1), model, x)


def test_a_masked_conv_is_refused_at_init():
    """nn.Conv(mask=...) ran init and then failed inside flax at apply (the mask's shape against the rank-r helper)."""
    mask = np.ones((3, 3, 4, 6), np.float32)
    mask[1, 1] = 0
    x = jnp.ones((1, 5, 5, 4))

    class Wrap(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Conv(6, (3, 3), mask=jnp.asarray(mask), name="conv")(x)

    wrap = Wrap()
    params = wrap.init(jax.random.key(0), x)
    with pytest.raises(jpeft.errors.UnsupportedModuleError, match="masked convolution"):
        jpeft.init(jpeft.LoraConfig(r=2, target_modules=["conv"]), params, jax.random.key(1), wrap, x)


@pytest.mark.parametrize("field, shape", [("lora_A", (1, 2)), ("lora_B", (2, 1)), ("lora_A", (5, 2)), ("lora_B", (3, 8))])
def test_lora_factors_that_do_not_fit_the_module_are_refused_by_name(field, shape):
    # a (1, r) lora_A broadcast silently against the kernel in the merged-dense form (16 rows),
    # the other misfits failed deep inside JAX (a raw TypeError)
    import dataclasses

    model = nn.Dense(8)
    params = model.init(jax.random.key(0), jnp.ones((1, 6)))
    adapter = jpeft.init(jpeft.LoraConfig(r=2, target_modules=".*"), params, jax.random.key(1))
    bad = {"": dataclasses.replace(adapter[""], **{field: jnp.ones(shape)})}
    for rows in (16, 1):
        with pytest.raises(jpeft.ShapeMismatchError, match="lora_A"):
            jpeft.apply(model, params, bad, jnp.ones((rows, 6)))
    with pytest.raises(jpeft.ShapeMismatchError, match="lora_A"):
        jpeft.merge(params, bad)


def test_apply_takes_a_bare_key_as_the_dropout_key_as_for_nnx():
    # flax's model.apply(rngs=key) makes a bare key the "params" stream: LoRA dropout was off, silently
    model = nn.Dense(8)
    x = jax.random.normal(jax.random.key(0), (4, 8))
    params = model.init(jax.random.key(1), x)
    adapter = jpeft.init(jpeft.LoraConfig(r=2, dropout=0.5, target_modules=".*"), params, jax.random.key(2))
    adapter = {"": adapter[""].__class__(**{**adapter[""].__dict__, "lora_B": jnp.ones_like(adapter[""].lora_B)})}
    key = jax.random.key(3)
    bare = jpeft.apply(model, params, adapter, x, rngs=key)
    assert not np.allclose(bare, jpeft.apply(model, params, adapter, x))
    np.testing.assert_array_equal(bare, jpeft.apply(model, params, adapter, x, rngs={"dropout": key}))


@pytest.mark.parametrize("bad", [0, None, "key", np.uint32(7), "batch"])
def test_a_seed_or_a_batch_of_keys_is_refused_by_name_where_a_key_is_taken(bad, tmp_path):
    # jpeft.init(config, params, 0) raised JAX's "invalid PRNG key data" TypeError from inside a
    # method's init; fit(key=0) failed at the first step's fold_in, after the loop had started
    model = nn.Dense(4)
    params = model.init(jax.random.key(0), jnp.ones((1, 3)))
    if bad == "batch":
        bad = jax.random.split(jax.random.key(0), 2)
    with pytest.raises(jpeft.errors.InputValidationError, match=r"jpeft.init: key must be one jax.random key"):
        jpeft.init(jpeft.LoraConfig(target_modules=".*"), params, bad)
    adapter = jpeft.init(jpeft.LoraConfig(target_modules=".*"), params, jax.random.PRNGKey(1))  # legacy keys still work
    step = jpeft.make_train_step(lambda p, a, b, k: jnp.mean(jpeft.apply(model, p, a, b["x"]) ** 2), optax.sgd(0.1))
    with pytest.raises(jpeft.errors.InputValidationError, match=r"fit: key must be one jax.random key"):
        loop.fit(step, params, adapter, optax.sgd(0.1).init(adapter), [{"x": jnp.ones((2, 3))}], key=bad)


def test_a_legacy_key_of_the_default_prng_implementation_is_taken():
    # with jax_default_prng_impl = "rbg", jax.random.PRNGKey(seed) is uint32[4]: JAX and Flax take it, and
    # check_key refused it (it took uint32[2] legacy keys only); a uint32[4] under threefry is still refused
    model = nn.Dense(4)
    params = model.init(jax.random.key(0), jnp.ones((1, 3)))
    with jax.default_prng_impl("rbg"):
        key = jax.random.PRNGKey(1)
        assert key.shape == (4,)
        adapter = jpeft.init(jpeft.LoraConfig(target_modules=".*"), params, key)
        step = jpeft.make_train_step(lambda p, a, b, k: jnp.mean(jpeft.apply(model, p, a, b["x"]) ** 2), optax.sgd(0.1))
        loop.fit(step, params, adapter, optax.sgd(0.1).init(adapter), [{"x": jnp.ones((2, 3))}], key=key)
    with pytest.raises(jpeft.errors.InputValidationError, match=r"found ArrayImpl uint32 of shape \(4,\)"):
        jpeft.init(jpeft.LoraConfig(target_modules=".*"), params, key)


def test_every_method_config_refuses_an_unknown_keyword_by_name():
    """IA3Config(rnak=4) and co. raised Python's bare TypeError; every registered config now raises
    ConfigError naming the keyword, the accepted names and the nearest one."""
    from jpeft.config import registered_configs

    for cls in registered_configs().values():
        with pytest.raises(jpeft.ConfigError, match=r"unknown keyword \['rnak'\]; it accepts"):
            cls(rnak=4)
    with pytest.raises(jpeft.ConfigError, match=r"Did you mean 'r' \(not 'rank'\)"):
        jpeft.LoraConfig(rank=4)
    with pytest.raises(jpeft.ConfigError, match=r"Did you mean 'oft_block_size'"):
        jpeft.OFTConfig(r=0, oft_blocksize=4)
    with pytest.raises(jpeft.ConfigError, match="use_rslora"):
        jpeft.IA3Config(use_rslora=True)
    with pytest.raises(jpeft.ConfigError, match="rnak"):
        jpeft.LoraConfig().replace(rnak=2)
    assert jpeft.VeraConfig().replace(vera_dropout=0.1).dropout == 0.1  # an alias works in replace too
    # a PEFT key adapter_config.json carries and from_dict ignores is named as such (a PEFT user's task_type=)
    with pytest.raises(jpeft.ConfigError, match="'task_type' is a Hugging Face PEFT key that changes nothing"):
        jpeft.LoraConfig(r=8, task_type="CAUSAL_LM")


def test_an_unmatched_target_modules_entry_is_named_in_a_warning():
    """['q_proj', 'v_prj']: the typo matched nothing and was dropped silently (PEFT drops it silently too)."""

    class Two(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4, name="v_proj")(nn.Dense(8, name="q_proj")(x))

    x = jnp.ones((2, 4))
    m = Two()
    p = m.init(jax.random.key(0), x)
    with pytest.warns(RuntimeWarning, match=r"\['v_prj'\] matched no linear module.*Did you mean 'v_proj'"):
        ad = jpeft.init(jpeft.LoraConfig(r=2, target_modules=["q_proj", "v_prj"]), p, jax.random.key(1), m, x)
    assert sorted(ad) == ["q_proj"]
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        jpeft.init(jpeft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), p, jax.random.key(1), m, x)


def _random_like(adapter, key):
    """Every adapter array random (LoRA's B too), so an update that lands elsewhere shows."""
    leaves, td = jax.tree.flatten(adapter)
    ks = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(td, [0.3 * jax.random.normal(k, v.shape, v.dtype) + 1.0 for k, v in zip(ks, leaves)])


class _Mapped(nn.Module):
    """``nn.map_variables(nn.Dense)`` (with ``trans_in_fn``, if given) then a remat'd Dense."""
    trans_in_fn: object = None

    @nn.compact
    def __call__(self, x):
        kw = {} if self.trans_in_fn is None else {"trans_in_fn": self.trans_in_fn}
        h = nn.map_variables(nn.Dense, "params", init=True, **kw)(6, name="d")(x)
        return nn.remat(nn.Dense)(3, name="r")(h)


def _double(v):
    return jax.tree.map(lambda a: 2 * a, v)


def test_a_module_inside_map_variables_with_a_trans_in_fn_is_refused_by_name():
    """nn.map_variables(nn.Dense, "params", trans_in_fn=2*v): apply added the update to the kernel the
    Dense sees (2W + sAB), merge to the stored one (W + sAB): the merged model was 15.6 off, no warning."""
    Mapped, double = _Mapped, _double
    x = jax.random.normal(jax.random.key(0), (4, 5))
    m = Mapped(double)
    p = m.init(jax.random.key(1), x)
    for cfg in (jpeft.LoraConfig(r=2, target_modules=["d"]), jpeft.IA3Config(target_modules=["d"], feedforward_modules=[])):
        with pytest.raises(jpeft.errors.UnsupportedModuleError, match=r"'d' runs inside nn.map_variables.*trans_in_fn"):
            jpeft.init(cfg, p, jax.random.key(2), m, x)
        ad = _random_like(jpeft.init(cfg, p, jax.random.key(2)), jax.random.key(3))  # from the params alone
        with pytest.raises(jpeft.errors.UnsupportedModuleError, match="jpeft.merge folds it into the stored params"):
            jpeft.apply(m, p, ad, x)
        with pytest.raises(jpeft.errors.UnsupportedModuleError, match="nn.map_variables"):
            jax.jit(lambda p, a: jpeft.apply(m, p, a, x))(p, ad)
    # flax's nn.WeightNorm is such a view (LoRA's merge was 14.1 off, IA3's 1.53)
    wn = nn.WeightNorm(nn.Dense(6, name="d"))
    pw = wn.init(jax.random.key(1), x)
    ad = _random_like(jpeft.init(jpeft.LoraConfig(r=2, target_modules=["layer_instance"]), pw, jax.random.key(2)), jax.random.key(3))
    with pytest.raises(jpeft.errors.UnsupportedModuleError, match="nn.WeightNorm"):
        jpeft.apply(wn, pw, ad, x)
    # an identity view (no trans_in_fn) and a remat'd Dense see the stored arrays: merge == apply
    m = Mapped()
    p = m.init(jax.random.key(1), x)
    for cfg in (jpeft.LoraConfig(r=2, target_modules=["d", "r"]), jpeft.LoraConfig(r=2, use_dora=True, target_modules=["d", "r"])):
        ad = _random_like(jpeft.init(cfg, p, jax.random.key(2), m, x), jax.random.key(3))
        y = jax.jit(lambda p, a: jpeft.apply(m, p, a, x))(p, ad)
        np.testing.assert_allclose(y, m.apply(jpeft.merge(p, ad), x), rtol=1e-5, atol=1e-5)
        assert float(jnp.abs(y - m.apply(p, x)).max()) > 0.1


def test_init_and_trace_records_what_trace_records_from_one_run_of_init():
    """jpeft.budget (`jpeft info`) traced a model twice, in model.init for its abstract params and
    again in jpeft.init's trace (0.9 of `jpeft info llama-2-7b`'s 3 CPU-seconds); _inject.init_and_trace
    records the trace while model.init runs. Its record equals trace()'s on the initialised params for
    a view inside nn.map_variables (refused), an identity one, an embedding's `attend`, nn.WeightNorm,
    boxed params, a layer-scanned Llama (stacked sites), GPT-2 and BERT; so do the params' shapes."""
    from jpeft import _inject
    from jpeft.models import BertConfig, GPT2Config, LlamaConfig, model_from_config

    class Tied(nn.Module):  # an embedding whose attend gives the logits
        @nn.compact
        def __call__(self, ids):
            e = nn.Embed(64, 8, name="e")
            return e.attend(nn.Dense(8, name="d")(e(ids)))

    x, ids = jnp.ones((2, 5)), jnp.ones((1, 8), jnp.int32)
    llama = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                        head_dim=8, scan_layers=True)
    cases = [(_Mapped(_double), x), (_Mapped(), x), (Tied(), ids), (nn.WeightNorm(nn.Dense(6, name="d")), x), (BoxedMLP(6, 3), x),
             (model_from_config(llama), ids), (model_from_config(GPT2Config(vocab_size=64, hidden_size=16, num_layers=2,
                                                                            num_heads=2)), ids),
             (model_from_config(BertConfig(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2,
                                           intermediate_size=32)), ids)]
    seen = set()
    for model, inp in cases:
        variables = model.init(jax.random.key(0), inp)
        shapes, infos = _inject.init_and_trace(model, jax.random.key(0), inp)
        traced = _inject.trace(model, nn.unbox(variables), inp)
        # the params read outside their modules' calls (jpeft._reads), by trace() alone: the nn.map_variables
        # views' transforms (2 * W, WeightNorm's), computed outside the layer's call; init_and_trace makes the params
        reads = {p for p, i in traced.items() if i.read_outside}
        want = {"d"} if getattr(model, "trans_in_fn", None) is _double else \
            {"layer_instance"} if isinstance(model, nn.WeightNorm) else set()
        assert reads == want, (type(model).__name__, reads)
        assert infos == {p: i._replace(read_outside=()) for p, i in traced.items()}, type(model).__name__
        assert jax.tree.map(lambda a: (a.shape, a.dtype), shapes) == jax.tree.map(lambda a: (a.shape, a.dtype), variables)
        seen |= {k for i in infos.values() for k, v in (("refusal", i.refusal), ("scanned", i.scanned_layers),
                                                          ("attend", "attend" in i.methods)) if v}
    assert seen == {"refusal", "scanned", "attend"}  # each kind of record is compared


def test_params_boxed_by_with_partitioning_are_read_as_the_arrays_they_hold():
    """nn.with_partitioning boxes the kernel in nn.Partitioned: init, apply and merge raised a raw
    AttributeError ('Partitioned' object has no attribute 'shape'); model.apply reads the boxed array."""

    x = jax.random.normal(jax.random.key(0), (4, 5))
    m = BoxedMLP(6, 3)
    p = m.init(jax.random.key(1), x)
    assert isinstance(p["params"]["d"]["kernel"], nn.Partitioned)
    for cfg in (jpeft.LoraConfig(r=2, target_modules=["d"]), jpeft.LoraConfig(r=2, use_dora=True, target_modules=["d"])):
        ad = _random_like(jpeft.init(cfg, p, jax.random.key(2), m, x), jax.random.key(3))
        ref = _random_like(jpeft.init(cfg, nn.unbox(p), jax.random.key(2)), jax.random.key(3))
        y = jax.jit(lambda p, a: jpeft.apply(m, p, a, x))(p, ad)
        np.testing.assert_allclose(y, jpeft.apply(m, nn.unbox(p), ref, x), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(y, m.apply(jpeft.merge(p, ad), x), rtol=1e-5, atol=1e-5)
        assert float(jnp.abs(y - m.apply(p, x)).max()) > 0.1


class _ScaledDense(nn.Dense):
    """A Dense of one's own forward: flax hands the interceptor this call and, through super(), nn.Dense's."""

    def __call__(self, x):
        return 2.0 * super().__call__(x)


class _ScaledEmbed(nn.Embed):
    """Gemma-style: the looked-up rows times sqrt(features)."""

    def __call__(self, ids):
        return super().__call__(ids) * math.sqrt(self.features)


class _SameDense(nn.Dense):
    """Its own __call__ computes what nn.Dense's does, and says so."""

    same_function_as_base = ("__call__",)

    @nn.compact
    def __call__(self, x):
        w = self.param("kernel", nn.initializers.normal(1.0), (x.shape[-1], self.features))
        return x @ w + self.param("bias", nn.initializers.normal(1.0), (self.features,))[None]


class _Subclassed(nn.Module):
    cls: type

    @nn.compact
    def __call__(self, x):
        if issubclass(self.cls, nn.Embed):
            return self.cls(12, 6, name="m")(x)
        return self.cls(6, name="m")(x)


@pytest.mark.parametrize("cls, cfg", [(_ScaledDense, jpeft.LoraConfig(r=2, target_modules=["m"])),
                                      (_ScaledDense, jpeft.IA3Config(target_modules=["m"], feedforward_modules=[])),
                                      (_ScaledEmbed, jpeft.LoraConfig(r=2, target_modules=["m"]))],
                         ids=["dense-lora", "dense-ia3", "embed-lora"])
def test_a_subclass_of_a_linear_module_with_its_own_call_is_refused_by_name(cls, cfg):
    """LoRA on a subclass of nn.Dense whose __call__ returns 2 * super().__call__(x) was applied twice (once
    to the subclass's call, once to nn.Dense's inside it): 2 (xW + d) + d against the merged model's
    2 (xW + d), 15.9 off (IA3 2.67), without a word; a Gemma-style scaled nn.Embed got its update unscaled.
    Now refused by name, as NNX refuses such subclasses; a class that says its own __call__ computes
    nn.Dense's function (same_function_as_base) is adapted, merge equal to apply."""
    model = _Subclassed(cls)
    x = jnp.arange(12).reshape(3, 4) % 12 if cls is _ScaledEmbed else jax.random.normal(jax.random.key(0), (3, 5))
    params = model.init(jax.random.key(1), x)
    match = rf"'m': {cls.__name__} subclasses nn.{cls.__mro__[1].__name__} with its own __call__"
    with pytest.raises(jpeft.errors.UnsupportedModuleError, match=match):
        jpeft.init(cfg, params, jax.random.key(2), model, x)
    adapter = _random_like(jpeft.init(cfg, params, jax.random.key(2)), jax.random.key(3))  # from the params alone
    with pytest.raises(jpeft.errors.UnsupportedModuleError, match=match):
        jpeft.apply(model, params, adapter, x)
    same, x = _Subclassed(_SameDense), jax.random.normal(jax.random.key(0), (3, 5))
    params = same.init(jax.random.key(1), x)
    adapter = _random_like(jpeft.init(cfg, params, jax.random.key(2), same, x), jax.random.key(3))
    y = jpeft.apply(same, params, adapter, x)
    np.testing.assert_allclose(y, same.apply(jpeft.merge(params, adapter), x), rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(y - same.apply(params, x)).max()) > 0.1


class _EinsumAs(nn.Module):
    """One nn.Einsum whose equation is given at the call: the same kernel axes, outputs in either order."""

    equations: tuple = ("bi,ihd->bhd",)

    @nn.compact
    def __call__(self, x):
        e = nn.Einsum((6, 3, 3), name="m", use_bias=False)
        return sum(e(x, eq) for eq in self.equations)


@pytest.mark.parametrize("cfg", [jpeft.LoraConfig(r=2, target_modules=["m"]),
                                 jpeft.IA3Config(target_modules=["m"], feedforward_modules=[]),
                                 jpeft.VeraConfig(r=2, target_modules=["m"])], ids=["lora", "ia3", "vera"])
def test_an_einsum_called_with_another_equation_than_the_adapters_is_refused_by_name(cfg):
    """The sites project with the equation jpeft.init traced; a call with the same kernel axes in another output
    order ('bi,ihd->bdh' for 'bi,ihd->bhd', square h = d) added the update transposed: LoRA 17.1 off the merged
    model (IA3 0.68, VeRA 0.26), without a word, whether the adapter was traced on another model or the module
    is called with both equations. Now a LayoutError naming both equations."""
    x = jax.random.normal(jax.random.key(0), (2, 6))
    traced = _EinsumAs()
    params = traced.init(jax.random.key(1), x)
    adapter = _random_like(jpeft.init(cfg, params, jax.random.key(2), traced, x), jax.random.key(3))
    y = jpeft.apply(traced, params, adapter, x)
    np.testing.assert_allclose(y, traced.apply(jpeft.merge(params, adapter), x), rtol=1e-5, atol=1e-5)
    for model in (_EinsumAs(("bi,ihd->bdh",)), _EinsumAs(("bi,ihd->bhd", "bi,ihd->bdh"))):
        with pytest.raises(jpeft.errors.LayoutError, match=r"called with the einsum 'bi,ihd->bdh', but the adapter was "
                                                           r"built for 'bi,ihd->bhd'"):
            jpeft.apply(model, params, adapter, x)
    both = _EinsumAs(("bi,ihd->bhd", "bi,ihd->bdh"))
    with pytest.raises(jpeft.errors.LayoutError, match="give each use a module of its own"):
        jpeft.apply(both, params, _random_like(jpeft.init(cfg, params, jax.random.key(2), both, x), jax.random.key(3)), x)



class _EinsumEllipsis(nn.Module):
    """One nn.Einsum 'e' whose equation broadcasts the input's leading axes with '...'."""

    eq: str = "...d,df->...f"

    @nn.compact
    def __call__(self, x):
        return nn.Einsum((5, 6), self.eq, name="e")(x)


def _einsum_closed_form(cfg, node, w, b, x):
    """The adapted 'e' of _EinsumEllipsis computed by hand in numpy (an [in, out] kernel, a bias per output)."""
    w, b, x = (np.asarray(v, np.float64) for v in (w, b, x))
    if isinstance(cfg, jpeft.IA3Config):
        l = np.asarray(node.ia3_l, np.float64)
        return (x * l) @ w + b if cfg.feedforward_modules else (x @ w + b) * l
    if isinstance(cfg, jpeft.VeraConfig):
        f = lambda name: np.asarray(getattr(node, name), np.float64)
        return x @ w + b + (((x @ f("vera_A")) * f("lambda_d")) @ f("vera_B")) * f("lambda_b")
    wd = w + node.scale * np.asarray(node.lora_A, np.float64) @ np.asarray(node.lora_B, np.float64)
    if cfg.use_dora:
        wd = wd * np.asarray(node.magnitude, np.float64) / np.linalg.norm(wd, axis=0)
    return x @ wd + b


@pytest.mark.parametrize("eq", ["...d,df->...f", "b...d,df->b...f"])
@pytest.mark.parametrize("cfg", [jpeft.LoraConfig(r=2, target_modules=["e"], use_dora=True),
                                 jpeft.IA3Config(target_modules=["e"], feedforward_modules=[]),
                                 jpeft.IA3Config(target_modules=["e"], feedforward_modules=["e"]),
                                 jpeft.VeraConfig(r=2, target_modules=["e"]),
                                 jpeft.LoraConfig(r=2, target_modules=["e"])],
                         ids=["dora", "ia3", "ia3_feedforward", "vera", "lora"])
def test_an_einsum_with_an_ellipsis_adapts_to_the_closed_form(cfg, eq):
    """nn.Einsum('...d,df->...f'): DoRA, IA3 and VeRA shaped their per-feature vectors with the '...' counted as
    three axes, so under JAX's default rank promotion the adapted output of a (2, 4, 5) input came out
    (1, 2, 4, 6) (a 1-D input's (1, 1, 1, 6)), its values broadcast, without a word (a raw ValueError under
    jax_numpy_rank_promotion='raise'). Now each input rank gives the module's shape and the closed form."""
    model = _EinsumEllipsis(eq)
    x = jax.random.normal(jax.random.key(0), (2, 4, 5))
    params = model.init(jax.random.key(1), x)
    adapter = _random_like(jpeft.init(cfg, params, jax.random.key(2), model, x), jax.random.key(3))
    w, b = params["params"]["e"]["kernel"], params["params"]["e"]["bias"]
    merged = jpeft.merge(params, adapter)
    for shape in ((2, 4, 5), (3, 5), (2, 1, 3, 5)) + (((5,),) if eq.startswith("...") else ()):
        xs = jax.random.normal(jax.random.key(len(shape)), shape)
        with jax.numpy_rank_promotion("allow"):  # the default, under which the shape changed silently
            y = jpeft.apply(model, params, adapter, xs)
        assert y.shape == shape[:-1] + (6,)
        np.testing.assert_allclose(y, _einsum_closed_form(cfg, adapter["e"], w, b, xs), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(model.apply(merged, xs), y, rtol=1e-4, atol=1e-4)
        assert float(jnp.abs(y - model.apply(params, xs)).max()) > 0.1

def _quarters(lhs, rhs, dims, precision=None, preferred_element_type=None):
    """A fake-quantizing dot_general: the kernel rounded to quarters (AQT-style rounding)."""
    return jax.lax.dot_general(lhs, jnp.round(4 * rhs) / 4, dims, precision=precision,
                               preferred_element_type=preferred_element_type)


def _quarters_conv(lhs, rhs, *args, **kwargs):
    return jax.lax.conv_general_dilated(lhs, jnp.round(4 * rhs) / 4, *args, **kwargs)


@jpeft.transparent_dot_general
def _highest(lhs, rhs, dims, precision=None, preferred_element_type=None):
    """A user's precision wrapper, declared to compute lax.dot_general's product."""
    return jax.lax.dot_general(lhs, rhs, dims, precision=jax.lax.Precision.HIGHEST,
                               preferred_element_type=preferred_element_type)


class _QuartersCls:
    """AQT's form: a dot_general_cls, called for the function."""

    def __call__(self, *args, **kwargs):
        return _quarters(*args, **kwargs)


class _WithKernelFn(nn.Module):
    """One linear module 'm' built with the given function of its kernel."""

    kind: str = "dense"
    fn: object = None

    @nn.compact
    def __call__(self, x):
        if self.kind == "dense":
            return nn.Dense(6, name="m", dot_general=self.fn)(x)
        if self.kind == "dense_general":
            return nn.DenseGeneral((2, 3), name="m", dot_general=self.fn)(x)
        if self.kind == "dense_general_cls":
            return nn.DenseGeneral((2, 3), name="m", dot_general_cls=self.fn)(x)
        return nn.Conv(6, (3,), name="m", conv_general_dilated=self.fn)(x)


_KERNEL_FN_CFGS = [jpeft.LoraConfig(r=2, target_modules=["m"]), jpeft.LoraConfig(r=2, target_modules=["m"], use_dora=True),
                   jpeft.IA3Config(target_modules=["m"], feedforward_modules=[])]


def _kernel_fn_case(kind, fn, cfg):
    model = _WithKernelFn(kind, fn)
    x = jax.random.normal(jax.random.key(0), (2, 7, 5) if kind == "conv" else (3, 5))
    params = model.init(jax.random.key(1), x)
    return model, x, params, _random_like(jpeft.init(cfg, params, jax.random.key(2), model, x), jax.random.key(3))


@pytest.mark.parametrize("fn", [jpeft._ops.flat_dot_general,
                                functools.partial(jax.lax.dot_general, precision=jax.lax.Precision.HIGHEST),
                                _highest], ids=["flat_dot_general", "partial-precision", "declared"])
def test_a_transparent_dot_general_merges_as_it_applies(fn):
    """A Dense or DenseGeneral built with jpeft's flat_dot_general, a functools.partial of lax.dot_general with a
    precision, or a user's own wrapper declared with jpeft.transparent_dot_general: merge equals apply for LoRA,
    DoRA and IA3, every adapter tensor random (a function jpeft does not know is refused at merge, below)."""
    for kind in ("dense", "dense_general"):
        for cfg in _KERNEL_FN_CFGS:
            model, x, params, adapter = _kernel_fn_case(kind, fn, cfg)
            y = jpeft.apply(model, params, adapter, x)
            np.testing.assert_allclose(y, model.apply(jpeft.merge(params, adapter), x), rtol=1e-5, atol=1e-5)
            assert float(jnp.abs(y - model.apply(params, x)).max()) > 0.1


@pytest.mark.parametrize("kind, fn", [("dense", _quarters), ("dense_general_cls", _QuartersCls), ("conv", _quarters_conv)],
                         ids=["dense-dot_general", "dense_general-dot_general_cls", "conv-conv_general_dilated"])
def test_a_kernel_changing_dot_general_is_refused_at_merge_by_name(kind, fn, tmp_path):
    """A Dense whose dot_general rounds its kernel to quarters (fake quantization): apply added the update to the
    rounded product (as PEFT adds LoRA's beside a quantized layer), merge folded it into the kernel the function then
    rounds: LoRA 0.75 off apply (DoRA 0.47, IA3 0.41; a conv_general_dilated that rounds, LoRA 6.4), without a word.
    Now apply is the factored form and merge, merge_into_base, and a merge after save / load (with or without the
    model) are a NotMergeableError naming the site and the function; an adapter built from the params alone, which
    cannot record it, is a LayoutError at apply."""
    name = f"{'conv_general_dilated' if kind == 'conv' else 'dot_general_cls' if kind.endswith('cls') else 'dot_general'}="
    match = rf"site 'm' is on a module that computes with its own {name}\S*{fn.__name__} \(recorded when"
    for cfg in _KERNEL_FN_CFGS:
        model, x, params, adapter = _kernel_fn_case(kind, fn, cfg)
        y = jpeft.apply(model, params, adapter, x)
        if isinstance(cfg, jpeft.LoraConfig) and not cfg.use_dora and kind != "conv":  # the factored form, by hand
            a, b, s = adapter["m"].lora_A, adapter["m"].lora_B, adapter["m"].scale
            np.testing.assert_allclose(y, model.apply(params, x) + (s * x @ a @ b).reshape(y.shape), rtol=1e-5, atol=1e-5)
        with pytest.raises(jpeft.errors.NotMergeableError, match=match):
            jpeft.merge(params, adapter)
    with pytest.raises(jpeft.errors.NotMergeableError, match="merge_into_base: the site 'm'"):
        jpeft.merge_into_base(params, [_kernel_fn_case(kind, fn, _KERNEL_FN_CFGS[0])[3]])
    lora = _kernel_fn_case(kind, fn, _KERNEL_FN_CFGS[0])[3]
    jpeft.save_adapter(tmp_path / "a", _KERNEL_FN_CFGS[0], lora)
    for args in ((), (model, x)) if kind == "dense" else ((model, x),):  # a 3-D kernel needs the model to load
        _, loaded = jpeft.load_adapter(tmp_path / "a", params, *args)
        with pytest.raises(jpeft.errors.NotMergeableError, match=match):
            jpeft.merge(params, loaded)
    if kind == "dense":  # a training checkpoint keeps it too, restored with or without the model
        writer = jpeft.checkpoint.CheckpointManager(tmp_path / "c", _KERNEL_FN_CFGS[0], params)
        writer.save(1, lora, force=True)
        writer.close()
        restored = jpeft.checkpoint.CheckpointManager(tmp_path / "c", _KERNEL_FN_CFGS[0], params, read_only=True)
        with pytest.raises(jpeft.errors.NotMergeableError, match=match):
            jpeft.merge(params, restored.restore(1).adapter)
    if kind == "dense":  # the params alone show a 2-D kernel, not the function: refused where the module is seen
        bare = _random_like(jpeft.init(_KERNEL_FN_CFGS[0], params, jax.random.key(2)), jax.random.key(3))
        with pytest.raises(jpeft.errors.LayoutError, match=r"'m' computes with its own dot_general=.*_quarters.*"
                                                           r"jpeft.transparent_dot_general"):
            jpeft.apply(model, params, bare, x)
        for merged in (jpeft.merge_adapters([bare, lora]),  # what any input records, the combination keeps
                       jpeft.AdapterBank.from_adapters({"bare": bare, "traced": lora}).get("bare")):
            with pytest.raises(jpeft.errors.NotMergeableError, match=match):
                jpeft.merge(params, merged)


@pytest.mark.parametrize("kind, cfg", [("dense_general", jpeft.LoHaConfig(r=2, target_modules=["m"])),
                                       ("dense_general", jpeft.LoKrConfig(r=2, target_modules=["m"])),
                                       ("conv", jpeft.LoraConfig(r=2, target_modules=["m"]))],
                         ids=["loha-dense_general", "lokr-dense_general", "lora-conv"])
def test_an_adapters_own_product_does_not_go_through_the_modules_kernel_function(kind, cfg):
    """LoHa and LoKr compute their update through a copy of the module, and LoRA its conv projection x * A: the copy
    kept the module's fake-quantizing dot_general (conv_general_dilated), which rounded the update (LoHa 0.35 off the
    update x dW, LoKr 0.29, LoRA-conv 2.95) and zeroed the gradients of every LoHa / LoKr array and of LoRA's A:
    training changed nothing, without a word. Now the update is computed beside the module's function, as LoRA's on
    a Dense (and PEFT's beside a quantized layer), and every adapter array gets a gradient."""
    model, x, params, adapter = _kernel_fn_case(kind, _quarters_conv if kind == "conv" else _quarters, cfg)
    y = jpeft.apply(model, params, adapter, x)
    node = adapter["m"]
    if kind == "conv":  # the factored form, by hand: a plain conv with A, then B
        h = nn.Conv(2, (3,), use_bias=False).apply({"params": {"kernel": node.lora_A.reshape(3, 5, 2)}}, x)
        update = node.scale * h @ node.lora_B
    else:
        update = jnp.einsum("bi,ijk->bjk", x, node.kernel_delta(jnp.float32))
    np.testing.assert_allclose(y - model.apply(params, x), update, rtol=1e-4, atol=1e-4)
    grads = jax.grad(lambda a: jnp.sum(jpeft.apply(model, params, a, x) ** 2))(adapter)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(jpeft.trainable(grads)))
