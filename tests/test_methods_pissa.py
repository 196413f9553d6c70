"""PiSSA initialisation against Hugging Face PEFT's ``init_lora_weights="pissa"``."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft.methods.pissa import init_pissa

torch = __import__("torch")  # a test dependency: missing means a broken install, not a skip
peft = __import__("peft")  # a test dependency: missing means a broken install, not a skip


def _t(x):
    return np.asarray(x.detach().numpy())


def test_matches_peft_pissa():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(12, 9))
    w0 = _t(net[0].weight).copy()
    b0 = _t(net[0].bias).copy()
    pm = peft.get_peft_model(net, peft.LoraConfig(r=3, lora_alpha=6, target_modules=["0"], init_lora_weights="pissa"))
    lay = pm.base_model.model[0]
    hf_A, hf_B, hf_res = _t(lay.lora_A["default"].weight), _t(lay.lora_B["default"].weight), _t(lay.base_layer.weight)

    model = nn.Dense(9)
    params = {"params": {"kernel": jnp.asarray(w0.T), "bias": jnp.asarray(b0)}}
    res, ad = init_pissa(jpeft.LoraConfig(r=3, alpha=6, target_modules=".*"), params, jax.random.key(0))
    node = ad[""]
    # residual base and the principal part equal PEFT's (singular vectors only up to sign)
    np.testing.assert_allclose(res["params"]["kernel"], hf_res.T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(node.delta_matrix(), 2.0 * (hf_B @ hf_A).T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.abs(node.lora_A), np.abs(hf_A.T), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.abs(node.lora_B), np.abs(hf_B.T), rtol=1e-4, atol=1e-5)
    x = np.random.RandomState(0).randn(4, 12).astype(np.float32)
    np.testing.assert_allclose(jpeft.apply(model, res, ad, jnp.asarray(x)), _t(pm(torch.tensor(x))), rtol=1e-4, atol=1e-5)
    # identity at the start: residual + adapter == original model
    np.testing.assert_allclose(jpeft.apply(model, res, ad, jnp.asarray(x)), model.apply(params, jnp.asarray(x)), rtol=1e-4, atol=1e-5)
    # the adapter holds the principal directions: the residual has the remaining singular values
    s_full = np.linalg.svd(w0, compute_uv=False)
    s_res = np.linalg.svd(np.asarray(res["params"]["kernel"]), compute_uv=False)
    np.testing.assert_allclose(s_res[: 9 - 3], s_full[3:], rtol=1e-4, atol=1e-5)


def test_randomized_svd_dora_and_layouts():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(7, name="b")(nn.DenseGeneral((3, 4), name="a")(x).reshape(x.shape[:-1] + (12,)))

    # a kernel with a clear spectral gap, so the randomized SVD finds the same top space
    model = Net()
    x = jax.random.normal(jax.random.key(0), (2, 10))
    params = model.init(jax.random.key(1), x)
    u, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(2), (10, 10)))
    v, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(3), (12, 12)))
    s = jnp.array([10.0, 8.0, 6.0] + [0.1] * 7)
    params["params"]["a"]["kernel"] = ((u * s.reshape(1, -1)) @ v[:10]).reshape(10, 3, 4)
    cfg = jpeft.LoraConfig(r=3, alpha=3, target_modules=["a", "b"], use_dora=True)
    res_e, ad_e = init_pissa(cfg, params, jax.random.key(4), model, x)
    res_r, ad_r = init_pissa(cfg, params, jax.random.key(4), model, x, niter=4)
    ref = model.apply(params, x)
    for res, ad in ((res_e, ad_e), (res_r, ad_r)):
        np.testing.assert_allclose(jpeft.apply(model, res, ad, x), ref, rtol=1e-4, atol=1e-4)
        assert ad["a"].magnitude is not None
    np.testing.assert_allclose(ad_r["a"].delta_matrix(), ad_e["a"].delta_matrix(), rtol=1e-3, atol=1e-3)


def test_errors():
    model = nn.Dense(3)
    params = model.init(jax.random.key(0), jnp.ones((1, 4)))
    with pytest.raises(jpeft.ConfigError, match="init_pissa"):
        jpeft.init(jpeft.LoraConfig(r=2, target_modules=".*", init="pissa"), params, jax.random.key(0))
    nan = jax.tree.map(lambda x: x.at[..., 0].set(jnp.nan) if x.ndim == 2 else x, params)
    for init in (jpeft.init_pissa, jpeft.init_olora, jpeft.init_milora):  # the factors were NaN, silently
        with pytest.raises(jpeft.errors.InputValidationError, match="NaN or inf"):
            init(jpeft.LoraConfig(r=2, target_modules=".*"), nan, jax.random.key(0))
    with pytest.raises(jpeft.ConfigError, match="exceeds the rank"):
        init_pissa(jpeft.LoraConfig(r=4, target_modules=".*"), params, jax.random.key(0))
    # PEFT refuses init_lora_weights='pissa'/'olora' with lora_bias=True (so would jpeft's LoraConfig):
    # init_pissa accepted it and save_peft wrote a folder PEFT could not load
    for make in (init_pissa, jpeft.init_olora, jpeft.init_milora):
        with pytest.raises(jpeft.ConfigError, match="lora_bias"):
            make(jpeft.LoraConfig(r=2, target_modules=".*", lora_bias=True), params, jax.random.key(0))


class _Two(nn.Module):
    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(10, 8, name="embed_tokens")(ids)
        h = nn.LayerNorm(name="norm")(nn.Dense(8, name="q_proj")(h))
        return nn.Dense(10, name="lm_head")(h)


@pytest.mark.parametrize("extra", [dict(modules_to_save=["lm_head"]), dict(bias="all"),
                                   dict(trainable_token_indices=[3, 5])])
def test_residual_inits_with_non_lora_sites(extra):
    # modules_to_save copies, bias-only copies and trainable tokens are not LoRA sites: the residual
    # inits failed on them with AttributeError: 'SavedModule' object has no attribute 'layout'
    model = _Two()
    ids = jnp.array([[1, 3, 5, 7]])
    params = model.init(jax.random.key(0), ids)
    cfg = jpeft.LoraConfig(r=2, alpha=4, target_modules=["q_proj"], **extra)
    base = model.apply(params, ids)
    for make in (init_pissa, jpeft.init_olora, jpeft.init_milora):
        res, ad = make(cfg, params, jax.random.key(1))
        assert isinstance(ad["q_proj"], jpeft.LoraWeights) and ad["q_proj"].residual is not None and len(ad) > 1
        np.testing.assert_allclose(jpeft.apply(model, res, ad, ids), base, atol=1e-5)
        # PEFT's residual base (jpeft.hf.load_peft_with_base) skips them too
        back = jpeft.methods.pissa.residual_params(cfg, params, ad, "olora" if make is jpeft.init_olora else "pissa")
        if make is not jpeft.init_milora:
            np.testing.assert_allclose(back["params"]["q_proj"]["kernel"], res["params"]["q_proj"]["kernel"], atol=1e-5)
    res, ad = jpeft.init_corda(cfg, params, None, model, [ids, ids + 1])
    np.testing.assert_allclose(jpeft.apply(model, res, ad, ids), base, atol=1e-4)


class _Tied(nn.Module):
    @nn.compact
    def __call__(self, ids):
        emb = nn.Embed(10, 8, name="embed_tokens")
        h = nn.Dense(8, name="q_proj")(emb(ids))
        return emb.attend(h)  # the output projection is the embedding table


def test_residual_inits_on_a_tied_embedding():
    # the residual inits rewrote the shared table while an embedding LoRA without ensure_weight_tying
    # adds its update to the input lookup only: the tied output head lost the initial factors and the
    # logits at init moved (by 2.1 on a tiny Llama-3 whose logits are about 3), silently
    model = _Tied()
    ids = jnp.array([[1, 3, 5, 7]])
    params = model.init(jax.random.key(0), ids)
    base = model.apply(params, ids)
    for make in (init_pissa, jpeft.init_olora, jpeft.init_milora):
        cfg = jpeft.LoraConfig(r=2, alpha=4, target_modules=["embed_tokens", "q_proj"])
        with pytest.raises(jpeft.ConfigError, match="tied output projection.*ensure_weight_tying=True"):
            make(cfg, params, jax.random.key(1), model, ids)
        with pytest.warns(UserWarning, match="cannot tell"):  # no model: the tie is unknown
            make(cfg, params, jax.random.key(1))
        res, ad = make(cfg.replace(ensure_weight_tying=True), params, jax.random.key(1), model, ids)
        np.testing.assert_allclose(jpeft.apply(model, res, ad, ids), base, atol=1e-5)
        np.testing.assert_allclose(model.apply(jpeft.merge(res, ad), ids), base, atol=1e-5)
    # jpeft.models params tell the tie without the model (Llama-style embed_tokens without lm_head)
    llama = jpeft.models.LlamaForCausalLM(jpeft.models.LlamaConfig(
        vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2, num_kv_heads=1, tie_word_embeddings=True))
    lparams = llama.init(jax.random.key(0), ids)
    with pytest.raises(jpeft.ConfigError, match="tied output projection"):
        init_pissa(jpeft.LoraConfig(r=2, target_modules=["embed_tokens"]), lparams, jax.random.key(1))


def test_load_adapter_says_the_adapter_needs_the_residual_base(tmp_path):
    # save_adapter / load_adapter of a PiSSA adapter, then jpeft.apply on the original params (what a
    # model loaded again from disk gives): the logits were silently the wrong model's (1.9 apart on a
    # tiny Llama whose logits are about 3), with no word that the base must be the residual
    model = nn.Dense(6)
    x = jnp.ones((2, 8))
    params = model.init(jax.random.key(0), x)
    cfg = jpeft.LoraConfig(r=2, alpha=2, target_modules=".*")
    for make, init in ((init_pissa, "pissa"), (jpeft.init_olora, "olora"), (jpeft.init_milora, "milora")):
        res, ad = make(cfg, params, jax.random.key(1))
        ad = jax.tree.map(lambda a: a + 0.3, ad)  # "trained"
        trained = jpeft.apply(model, res, ad, x)
        d = jpeft.save_adapter(str(tmp_path / init), cfg, ad, params=params)
        with pytest.warns(UserWarning, match=f"jpeft.init_{init}.*residual base"):
            cfg2, ad2 = jpeft.load_adapter(d, params)
        if init != "milora":  # PiSSA / OLoRA bases can be rebuilt from the original params
            back = jpeft.methods.pissa.residual_params(cfg2, params, ad2, init)
            np.testing.assert_allclose(jpeft.apply(model, back, ad2, x), trained, atol=1e-5)
    plain = jpeft.init(cfg, params, jax.random.key(1))
    d = jpeft.save_adapter(str(tmp_path / "plain"), cfg, plain, params=params)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jpeft.load_adapter(d, params)
