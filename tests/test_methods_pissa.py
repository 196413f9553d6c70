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
        jpeft.init(jpeft.LoraConfig(r=2, target_modules=".*", init_weights="pissa"), params, jax.random.key(0))
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


def _tiny_llama(scan_layers=False):
    cfg = jpeft.models.LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2,
                                   num_kv_heads=1, tie_word_embeddings=True, scan_layers=scan_layers)
    return jpeft.models.LlamaForCausalLM(cfg)


def _randomized(adapter, seed):
    leaves, tdef = jax.tree.flatten(adapter)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tdef, [x + 0.2 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def _convert_cases():
    model = _tiny_llama()
    ids = jax.random.randint(jax.random.key(9), (2, 6), 3, 48)
    params = model.init(jax.random.key(0), ids)
    calib = [jax.random.randint(jax.random.key(i), (1, 5), 3, 48) for i in range(2)]
    t = ["q_proj", "v_proj", "down_proj"]
    cases = [
        (lambda c, p: init_pissa(c, p, jax.random.key(1), model, ids), dict(target_modules=t + ["embed_tokens"],
                                                                           ensure_weight_tying=True)),
        (lambda c, p: init_pissa(c, p, jax.random.key(1), model, ids, niter=1), dict(use_dora=True)),
        (lambda c, p: jpeft.init_olora(c, p, None, model, ids), dict(use_rslora=True, rank_pattern={"v_proj": 2},
                                                                     alpha_pattern={"down_proj": 7})),
        (lambda c, p: jpeft.init_milora(c, p, None, model, ids), {}),
        (lambda c, p: jpeft.init_corda(c, p, None, model, calib), dict(modules_to_save=["o_proj"])),
    ]
    return model, params, ids, t, cases


def _check_converted(model, params, ids, t, cases):
    plains = {}
    for i, (make, extra) in enumerate(cases):
        res, ad = make(jpeft.LoraConfig(**{"r": 3, "alpha": 5, "target_modules": t, **extra}), params)
        ad = _randomized(ad, i)
        want = jpeft.apply(model, res, ad, ids)
        assert float(jnp.abs(want - model.apply(params, ids)).max()) > 0.1  # the adapter matters
        plain = jpeft.convert_residual_adapter(ad, params, res)
        assert all(getattr(n, "residual", None) is None for n in plain.values())
        assert plain["model/layers_0/self_attn/q_proj"].r == 6
        np.testing.assert_allclose(jpeft.apply(model, params, plain, ids), want, atol=1e-5)
        np.testing.assert_allclose(model.apply(jpeft.merge(params, plain), ids), model.apply(jpeft.merge(res, ad), ids),
                                   atol=1e-5)
        if not extra:
            plains[i] = plain
    return plains


def test_convert_residual_adapter_gives_the_same_model_on_the_original_params():
    # every residual init (randomized-SVD PiSSA and CorDA too, whose initial factors the original params alone
    # cannot rebuild), DoRA, rsLoRA with patterns, a tied embedding, modules_to_save: the plain LoRA of the original
    # params applies and merges to the residual model's numbers, every adapter tensor random
    model, params, ids, t, cases = _convert_cases()
    _check_converted(model, params, ids, t, cases[:3])


def test_converted_residual_adapters_merge_join_a_bank_and_scan():
    model, params, ids, t, cases = _convert_cases()
    plains = _check_converted(model, params, ids, t, cases[3:])
    # the plain adapters merge (jpeft.merging) and join an AdapterBank, which refused the residual ones
    (i, plain), = plains.items()
    both = jpeft.merging.merge_adapters([plain, plain], [0.5, 0.5])
    np.testing.assert_allclose(jpeft.apply(model, params, both, ids), jpeft.apply(model, params, plain, ids), atol=1e-5)
    bank = jpeft.AdapterBank.from_adapters({"p": plain})
    np.testing.assert_allclose(jpeft.apply(model, params, bank.route(["p"]), ids[:1]),
                               jpeft.apply(model, params, plain, ids[:1]), atol=1e-5)
    # a layer-scanned model: one factorisation per layer, the stacked site kept
    smodel = _tiny_llama(scan_layers=True)
    sparams = jpeft.scan.stack_params(params)
    res, ad = init_pissa(jpeft.LoraConfig(r=2, alpha=4, target_modules=t), sparams, jax.random.key(1), smodel, ids,
                         niter=2)
    ad = _randomized(ad, 7)
    plain = jpeft.convert_residual_adapter(ad, sparams, res)
    assert isinstance(plain["model/layers/self_attn/q_proj"], jpeft.scan.Stacked)
    np.testing.assert_allclose(jpeft.apply(smodel, sparams, plain, ids), jpeft.apply(smodel, res, ad, ids), atol=1e-5)
    # the config: r and alpha doubled (alpha * sqrt(2) under rsLoRA), as PEFT writes its conversion
    c = jpeft.convert_residual_config(jpeft.LoraConfig(r=3, alpha=5, init_weights="pissa", use_rslora=True,
                                                       rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 4}))
    assert (c.init_weights, c.r, c.rank_pattern) == ("default", 6, {"v_proj": 4})
    np.testing.assert_allclose([c.alpha, c.alpha_pattern["v_proj"]], [5 * 2 ** 0.5, 4 * 2 ** 0.5])


def test_convert_residual_adapter_refuses_what_is_not_the_pair():
    model = nn.Dense(6)
    x = jnp.ones((2, 8))
    params = model.init(jax.random.key(0), x)
    cfg = jpeft.LoraConfig(r=2, alpha=2, target_modules=".*")
    res, ad = init_pissa(cfg, params, jax.random.key(1))
    E = jpeft.errors
    with pytest.raises(jpeft.ConfigError, match="no site from a residual init"):
        jpeft.convert_residual_adapter(jpeft.init(cfg, params, jax.random.key(1)), params, res)
    with pytest.raises(E.InputValidationError, match="identical at every residual site"):
        jpeft.convert_residual_adapter(ad, params, params)  # the original twice: the update would be silently dropped
    merged = jpeft.merge(res, _randomized(ad, 0))
    with pytest.raises(E.InputValidationError, match="not an update of rank r=2"):
        jpeft.convert_residual_adapter(ad, params, merged)
    other = dict(res["params"], bias=res["params"]["bias"] + 1)
    with pytest.raises(E.InputValidationError, match="differ at 'bias'"):
        jpeft.convert_residual_adapter(ad, params, {"params": other})
    with pytest.raises(E.ShapeMismatchError, match="'kernel' is float32\\[8, 6\\] in original_params"):
        jpeft.convert_residual_adapter(ad, params, {"params": dict(other, kernel=jnp.zeros((8, 5)))})
    with pytest.raises(E.ShapeMismatchError, match="different structures"):
        jpeft.convert_residual_adapter(ad, params, {"params": {"kernel": res["params"]["kernel"]}})
    with pytest.raises(E.QuantizationError, match="quantize the original params"):
        jpeft.convert_residual_adapter(ad, params, jpeft.quantize(res, "int8"))
    # a kernel large for its rank (the factors are fitted by a randomized range finder there): exact, and a
    # residual that differs by more than rank r is still refused
    big = nn.Dense(72)
    bparams = big.init(jax.random.key(0), jnp.ones((1, 64)))
    xb = jax.random.normal(jax.random.key(3), (3, 64))
    for make in (init_pissa, jpeft.init_milora):
        res, ad = make(cfg, bparams, jax.random.key(1))
        ad = _randomized(ad, 2)
        plain = jpeft.convert_residual_adapter(ad, bparams, res)
        np.testing.assert_allclose(jpeft.apply(big, bparams, plain, xb), jpeft.apply(big, res, ad, xb), atol=1e-5)
    with pytest.raises(E.InputValidationError, match="not an update of rank r=2"):
        jpeft.convert_residual_adapter(ad, bparams, jpeft.merge(res, _randomized(ad, 0)))


def test_converted_adapter_saves_for_peft_as_peft_converts(tmp_path):
    # save_peft of the converted adapter loads in PEFT on the original base to the logits of PEFT's own conversion
    # (save_pretrained(..., path_initial_model_for_weight_conversion=...)) of the same trained PiSSA adapter
    import copy
    import json
    import sys
    import warnings

    sys.path.insert(0, __import__("os").path.dirname(__file__))
    import _models_tiny as T

    base, folder = T.hf_model("llama2")
    targets = ["q_proj", "v_proj", "down_proj"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=2, lora_alpha=6, target_modules=targets, init_lora_weights="pissa"))
        fresh.save_pretrained(tmp_path / "init")
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for n, p in fresh.named_parameters():
                if "lora_" in n:
                    p.add_(0.3 * torch.randn(p.shape, generator=g))
        fresh.save_pretrained(tmp_path / "trained")
        fresh.save_pretrained(tmp_path / "peft_conv", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    _, params = jpeft.models.from_pretrained(folder)
    config, res, ad = jpeft.hf.load_peft_with_base(str(tmp_path / "trained"), params)
    plain = jpeft.convert_residual_adapter(ad, params, res)
    jpeft.hf.save_peft(str(tmp_path / "ours"), jpeft.convert_residual_config(config), plain)
    ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "peft_conv" / "adapter_config.json").read_text())
    assert [ours[k] for k in ("r", "lora_alpha", "init_lora_weights")] == [theirs[k] for k in
                                                                           ("r", "lora_alpha", "init_lora_weights")]
    ids, mask = T.batch("llama2")
    kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
              position_ids=torch.tensor(T.positions(mask)))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft_conv")).eval()(**kw).logits
        got = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()(**kw).logits
        assert float((want - base(**kw).logits).abs().max()) > 0.1
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5)
    # the residual is taken from the full-precision weights: a quantized base is refused by name
    with pytest.raises(jpeft.errors.QuantizationError, match="full-precision params, then quantize the residual"):
        jpeft.hf.load_peft_with_base(str(tmp_path / "trained"), jpeft.quantize(params, "int8"))


def test_residual_params_of_a_layer_scanned_adapter_is_refused_and_unrolled_matches():
    """Rebuilding the residual base from the original params is per layer: residual_params
    returned the original params unchanged for stacked sites (the wrong base, silently); it
    refuses them by name, and on the unrolled model it gives init_pissa's residual."""
    from jpeft import scan
    from jpeft.methods.pissa import residual_params

    cfg_m = jpeft.models.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                                     num_kv_heads=2)
    unrolled = jpeft.models.LlamaForCausalLM(cfg_m)
    scanned = jpeft.models.LlamaForCausalLM(cfg_m.replace(scan_layers=True))
    ids = jax.random.randint(jax.random.key(0), (2, 9), 0, 61)
    p0 = unrolled.init(jax.random.key(0), ids)
    p1 = {"params": scan.stack_params(p0["params"])}
    cfg = jpeft.LoraConfig(r=2, alpha=2, target_modules=["q_proj", "up_proj"])
    _, ad1 = init_pissa(cfg, p1, jax.random.key(3), scanned, ids)
    res0, ad0 = init_pissa(cfg, p0, jax.random.key(3), unrolled, ids)
    with pytest.raises(jpeft.ConfigError, match="layer-scanned"):
        residual_params(cfg, p1, ad1, "pissa")
    got = jax.tree.leaves(residual_params(cfg, p0, ad0, "pissa")["params"])
    for x, y in zip(got, jax.tree.leaves(res0["params"])):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)


def test_a_peft_pissa_file_with_ensure_weight_tying_on_a_tied_embedding_is_refused_with_the_fix(tmp_path):
    """PEFT's PiSSA/OLoRA with ``ensure_weight_tying`` on a tied base targeting the embedding puts the
    residual init on the tied lm_head, which rewrites the shared table the file saves as the embedding's
    base copy (PEFT reloads it to its own logits). jpeft said ``BaseMismatchError``: "put the saved weight
    into the params (re-initialised or resized token rows)", advice that would apply the residual twice.
    Now the refusal names the setting and the fix; the file trained as told loads with PEFT's logits."""
    import copy
    import os
    import sys
    import warnings

    sys.path.insert(0, os.path.dirname(__file__))
    import _models_tiny as T

    hf, folder = T.hf_model("llama3")  # tied word embeddings
    model, params = jpeft.models.from_pretrained(folder)
    ids, mask = T.batch("llama3", seed=5)
    for init in ("pissa", "olora"):
        for tie in (True, False):
            out = tmp_path / f"{init}-{tie}"
            torch.manual_seed(2)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(
                    r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], init_lora_weights=init,
                    ensure_weight_tying=tie))
                with torch.no_grad():  # "train": move every factor
                    for n, p in pm.named_parameters():
                        if "lora_" in n:
                            p.add_(0.1 * torch.randn_like(p))
                pm.save_pretrained(out)
                ref = T.peft_logits(peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(out)).eval(), ids, mask)
            T.assert_close_at_tokens(T.peft_logits(pm.eval(), ids, mask), ref, mask)  # PEFT reads its file back
            assert np.abs(ref - T.torch_logits("llama3", ids, mask)).max() > 1e-2
            if tie:
                with pytest.raises(jpeft.errors.UnsupportedAdapterError,
                                   match=rf"init_lora_weights='{init}' and ensure_weight_tying=True.*tied lm_head.*"
                                         "without ensure_weight_tying"):
                    jpeft.hf.load_peft_with_base(str(out), params)
                continue
            _, res, ad = jpeft.hf.load_peft_with_base(str(out), params)
            got = np.asarray(jpeft.apply(model, res, ad, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
            T.assert_close_at_tokens(got, ref, mask)
