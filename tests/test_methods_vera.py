"""VeRA against Hugging Face PEFT 0.21 (logits, merged weights, the PEFT format both ways), on the
tiny random models of tests/_models_tiny.py; plus what jpeft refuses and the scanned model."""

import copy
import dataclasses
import os
import sys
import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import _models_tiny as tiny  # noqa: E402

import jpeft  # noqa: E402
import jpeft.models  # noqa: E402
from jpeft import hf as H  # noqa: E402
from jpeft.errors import ConfigError, UnsupportedAdapterError, UnsupportedModuleError  # noqa: E402
from jpeft.methods import vera as VM  # noqa: E402
from jpeft.methods.vera import VeraConfig  # noqa: E402

torch = __import__("torch")  # a test dependency: missing means a broken install, not a skip
peft = __import__("peft")  # a test dependency: missing means a broken install, not a skip

# modules of different widths, so that every site uses a different slice of the shared projections
# (llama3: q 32->32, v 32->16 (2 kv heads), up 32->64, down 64->32; gpt2: c_attn 32->96, c_fc 32->128)
TARGETS = {"llama3": ["q_proj", "v_proj", "up_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}
R = 4


def _base(family):
    return jpeft.models.from_pretrained(tiny.hf_model(family)[1])


def _logits_jpeft(family, params, adapter, ids, mask):
    model, _ = _base(family)
    return np.asarray(jpeft.apply(model, params, adapter, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))


def _randomize(adapter, seed):
    """Every trainable vector random and away from its start (lambda_b is zero at init)."""
    keys = iter(jax.random.split(jax.random.key(seed), 2 * len(adapter)))
    return {p: dataclasses.replace(n, lambda_d=n.lambda_d + 0.5 * jax.random.normal(next(keys), n.lambda_d.shape),
                                   lambda_b=n.lambda_b + 0.5 * jax.random.normal(next(keys), n.lambda_b.shape))
            for p, n in adapter.items()}


def _peft_model(family, **kw):
    hf, _ = tiny.hf_model(family)
    torch.manual_seed(11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(hf), peft.VeraConfig(r=R, target_modules=TARGETS[family],
                                                                     init_weights=False, **kw))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # every trainable vector random (init_weights=False leaves lambda_b at one)
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    return pm.eval()


@pytest.mark.parametrize("family", ["llama3", "gpt2"])
def test_peft_to_jpeft_logits_merge_and_projections(family, tmp_path):
    pm = _peft_model(family)
    pm.save_pretrained(str(tmp_path))
    _, params = _base(family)
    ids, mask = tiny.batch(family, seed=3)
    ref = tiny.peft_logits(pm, ids, mask)
    assert np.abs(ref - tiny.torch_logits(family, ids, mask)).max() > 1e-2  # the adapter changes the output
    config, ad = H.load_peft(str(tmp_path), params)
    assert isinstance(config, VeraConfig) and config.r == R
    tiny.assert_close_at_tokens(_logits_jpeft(family, params, ad, ids, mask), ref, mask)
    # each site holds its slices of PEFT's own shared pair (not regenerated)
    full_a, full_b = pm.base_model.vera_A["default"].numpy().T, pm.base_model.vera_B["default"].numpy().T
    for n in ad.values():
        np.testing.assert_array_equal(n.vera_A, full_a[:n.layout.in_features])
        np.testing.assert_array_equal(n.vera_B, full_b[:, :n.layout.out_features])
    # the weight update equals PEFT's get_delta_weight at every site (torch [out, in]; GPT-2's Conv1D [in, out])
    mods = dict(pm.base_model.model.named_modules())
    for path, node in ad.items():
        ref_delta = mods[jpeft.tree.hf_name(path)].get_delta_weight("default").detach().numpy()
        got = np.asarray(node.delta_matrix())
        np.testing.assert_allclose(got, ref_delta if family == "gpt2" else ref_delta.T, atol=1e-6, rtol=1e-5)
    # merged params give the adapter's logits, and unmerge gives the base back
    merged = jpeft.merge(params, ad)
    tiny.assert_close_at_tokens(_logits_jpeft(family, merged, {}, ids, mask), ref, mask)
    for a, b in zip(jax.tree.leaves(jpeft.unmerge(merged, ad)), jax.tree.leaves(params)):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("family", ["llama3", "gpt2"])
def test_jpeft_to_peft_logits(family, tmp_path):
    hf, folder = tiny.hf_model(family)
    _, params = _base(family)
    cfg = VeraConfig(r=R, target_modules=TARGETS[family], projection_prng_key=3)
    ad = _randomize(jpeft.init(cfg, params, jax.random.key(0)), 1)
    H.save_peft(str(tmp_path), cfg, ad, base_model_name_or_path=folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path)).eval()
    # PEFT's keys and shapes: the shared pair once, at the targets' largest widths
    a = pm.base_model.vera_A["default"].numpy()
    widths = [(n.layout.in_features, n.layout.out_features) for n in ad.values()]
    assert a.shape == (R, max(w[0] for w in widths))
    assert pm.base_model.vera_B["default"].shape == (max(w[1] for w in widths), R)
    widest = max(ad.values(), key=lambda n: n.layout.in_features)
    np.testing.assert_array_equal(a, np.asarray(widest.vera_A).T)
    ids, mask = tiny.batch(family, seed=3)
    ref = tiny.peft_logits(pm, ids, mask)
    assert np.abs(ref - tiny.torch_logits(family, ids, mask)).max() > 1e-2
    tiny.assert_close_at_tokens(_logits_jpeft(family, params, ad, ids, mask), ref, mask)


def test_init_is_identity_and_projections_are_shared_and_deterministic():
    _, params = _base("llama3")
    cfg = VeraConfig(r=R, target_modules=TARGETS["llama3"], d_initial=0.3)
    ad = jpeft.init(cfg, params, jax.random.key(0))
    # every site holds its slices of one shared pair, made for the widest targets (64 in, 64 out)
    full_a, full_b = VM.make_projections(0, R, 64, 64)
    for n in ad.values():
        np.testing.assert_array_equal(n.vera_A, full_a[:n.layout.in_features])
        np.testing.assert_array_equal(n.vera_B, full_b[:, :n.layout.out_features])
        np.testing.assert_array_equal(n.lambda_d, np.full(R, 0.3, np.float32))
        assert float(jnp.abs(n.lambda_b).max()) == 0
    assert ad["model/layers_0/mlp/down_proj"].vera_A.shape == (64, R)
    # another key, same projection_prng_key: the same projections (as in PEFT, where every adapter shares them)
    again = jpeft.init(cfg, params, jax.random.key(5))
    chex.assert_trees_all_equal(jpeft.split_frozen(again)[1], jpeft.split_frozen(ad)[1])
    other = jpeft.init(cfg.replace(projection_prng_key=1), params, jax.random.key(0))
    assert not np.array_equal(next(iter(other.values())).vera_A, next(iter(ad.values())).vera_A)
    # seeds differing above 32 bits give different projections too (jax.random.key alone would truncate them)
    big = [VM.make_projections(s, R, 8, 8)[0] for s in (2 ** 40, 2 ** 40 + 2 ** 32, 0)]
    assert not np.array_equal(big[0], big[1]) and not np.array_equal(big[0], big[2])
    # PEFT's distribution: Kaiming-uniform bounds sqrt(6 / fan_in) on PEFT's second axis
    assert np.sqrt(6 / 64) * 0.9 < float(jnp.abs(full_a).max()) <= np.sqrt(6 / 64)
    assert float(jnp.abs(full_b).max()) <= np.sqrt(6 / R)


@pytest.mark.parametrize("family", ["llama3", "gpt2"])
def test_peft_adapter_without_projections_is_regenerated_with_torch(family, tmp_path, monkeypatch):
    """A PEFT adapter saved with save_projection=False holds only projection_prng_key; PEFT regenerates the
    pair with torch's generator at load. It was refused; now jpeft regenerates it with torch, bit for bit equal
    to PEFT's, and its logits (every vector random) equal PEFT's; saved back, PEFT loads jpeft's file with the
    pair in it. Without torch the refusal names the two ways out."""
    pm = _peft_model(family, save_projection=False, projection_prng_key=2 ** 40 + 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(str(tmp_path / "p"))
    saved = __import__("safetensors.numpy").numpy.load_file(str(tmp_path / "p" / "adapter_model.safetensors"))
    assert not [k for k in saved if "vera_A" in k or "vera_B" in k]
    _, params = _base(family)
    config, ad = H.load_peft(str(tmp_path / "p"), params)
    full_a, full_b = pm.base_model.vera_A["default"].numpy().T, pm.base_model.vera_B["default"].numpy().T
    for n in ad.values():
        np.testing.assert_array_equal(n.vera_A, full_a[:n.layout.in_features])
        np.testing.assert_array_equal(n.vera_B, full_b[:, :n.layout.out_features])
    ids, mask = tiny.batch(family, seed=5)
    ref = tiny.peft_logits(pm, ids, mask)
    tiny.assert_close_at_tokens(_logits_jpeft(family, params, ad, ids, mask), ref, mask)
    assert config.save_projection is True and config.projection_prng_key == 2 ** 40 + 5
    H.save_peft(str(tmp_path / "j"), config, ad)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(copy.deepcopy(tiny.hf_model(family)[0]), str(tmp_path / "j")).eval()
    tiny.assert_close_at_tokens(tiny.peft_logits(back, ids, mask), ref, mask)
    monkeypatch.setitem(sys.modules, "torch", None)  # torch not installed
    with pytest.raises(UnsupportedAdapterError, match="Install torch.*save_projection=True"):
        H.load_peft(str(tmp_path / "p"), params)


def test_unsupported_options_are_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match="save_projection must be True"):
        VeraConfig(save_projection=False)
    for opt in ({"modules_to_save": ["lm_head"]}, {"layers_to_transform": [0]}):
        with pytest.raises(ConfigError, match="does not implement"):
            VeraConfig.from_dict({**VeraConfig().to_dict(), **opt})
    with pytest.raises(ConfigError, match="positive integer"):
        VeraConfig(r=0)
    with pytest.raises(ConfigError, match="'none', 'vera_only' or 'all'"):
        VeraConfig(bias="lora_only")
    # a PEFT file with such an option: named refusal, not a silently different adapter
    pm = _peft_model("llama3", layers_to_transform=[0])
    pm.save_pretrained(str(tmp_path))
    with pytest.raises(UnsupportedAdapterError, match="layers_to_transform"):
        H.load_peft(str(tmp_path), _base("llama3")[1])


def test_embedding_and_mixed_projections_are_refused(tmp_path):
    _, params = _base("llama3")
    with pytest.raises(UnsupportedModuleError, match="embedding"):
        jpeft.init(VeraConfig(r=R, target_modules=["embed_tokens"]), params, jax.random.key(0))
    cfg = VeraConfig(r=R, target_modules=["q_proj"])
    a = jpeft.init(cfg, params, jax.random.key(0))
    b = jpeft.init(cfg.replace(projection_prng_key=9, target_modules=["v_proj"]), params, jax.random.key(0))
    with pytest.raises(UnsupportedAdapterError, match="different projections"):
        H.save_peft(str(tmp_path), cfg, {**a, **b})
    assert not (tmp_path / "adapter_config.json").exists()


def test_dropout_only_with_a_dropout_key():
    model, params = _base("llama3")
    cfg = VeraConfig(r=R, target_modules=["q_proj"], dropout=0.5)
    ad = _randomize(jpeft.init(cfg, params, jax.random.key(0)), 2)
    ids = jnp.asarray(tiny.batch("llama3")[0])
    plain = jpeft.apply(model, params, ad, ids)
    np.testing.assert_array_equal(plain, jpeft.apply(model, params, ad, ids))
    dropped = jpeft.apply(model, params, ad, ids, rngs={"dropout": jax.random.key(1)})
    assert float(jnp.abs(dropped - plain).max()) > 1e-4


def test_layer_scanned_model_equals_unrolled_and_exports(tmp_path):
    # the widths and batch shape of the tests above, so the eager ops are already compiled
    kw = dict(vocab_size=tiny.VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    scanned = jpeft.models.LlamaForCausalLM(jpeft.models.LlamaConfig(**kw, scan_layers=True))
    unrolled = jpeft.models.LlamaForCausalLM(jpeft.models.LlamaConfig(**kw))
    ids = jnp.asarray(tiny.batch("llama3")[0])
    params = scanned.init(jax.random.key(0), ids)
    cfg = VeraConfig(r=R, target_modules=["v_proj", "down_proj"])
    ad = jpeft.init(cfg, params, jax.random.key(1), scanned, ids)
    node = ad["model/layers/self_attn/v_proj"]
    assert node.length == 2 and node.inner.lambda_b.shape == (2, 16) and node.inner.vera_A.shape == (2, 32, R)
    ad = {p: dataclasses.replace(n, inner=_randomize({p: n.inner}, 3)[p]) for p, n in ad.items()}  # the projections stay shared
    out = jpeft.apply(scanned, params, ad, ids)
    flat_params, flat_ad = jpeft.scan.unstack_params(params), jpeft.scan.unstack_adapter(ad)
    np.testing.assert_allclose(jpeft.apply(unrolled, flat_params, flat_ad, ids), out, atol=1e-5)
    # merge is the per-layer merge (vmapped); the PEFT format round trip gives the same arrays back
    for a, b in zip(jax.tree.leaves(jpeft.scan.unstack_params(jpeft.merge(params, ad))),
                    jax.tree.leaves(jpeft.merge(flat_params, flat_ad))):
        np.testing.assert_allclose(a, b, atol=1e-6)
    H.save_peft(str(tmp_path), cfg, ad)
    _, back = H.load_peft(str(tmp_path), params)
    assert jax.tree.structure(back) == jax.tree.structure(ad)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(ad)):
        np.testing.assert_array_equal(a, b)


def test_projections_are_frozen_state():
    """The slices of the shared projections get no gradient and no optimizer state, are not counted as
    trainable (PEFT counts lambda_b + lambda_d only), stay bitwise unchanged through training steps (which
    donate the adapter), and are saved and loaded with it."""
    model, params = _base("llama3")
    ids = jnp.asarray(tiny.batch("llama3")[0])
    ad = _randomize(jpeft.init(VeraConfig(r=R, target_modules=["q_proj", "v_proj"]), params, jax.random.key(0)), 4)
    train, frozen = jpeft.split_frozen(ad)
    assert all(n.vera_A is None and n.vera_B is None for n in train.values())
    s = jpeft.summary(params, ad, print_fn=None)
    assert s["trainable"] == sum(R + n.layout.out_features for n in ad.values())  # 2 layers x (q: 4 + 32, v: 4 + 16)
    assert s["frozen"] == sum(R * (n.layout.in_features + n.layout.out_features) for n in ad.values())
    opt = optax.adam(1e-2)
    state = opt.init(jpeft.trainable(ad))
    assert sum(x.size for x in jax.tree.leaves(state) if x.ndim) == 2 * s["trainable"]

    def loss_fn(p, a, batch, key=None):
        logp = jax.nn.log_softmax(jpeft.apply(model, p, a, batch)[:, :-1])
        return -jnp.mean(jnp.take_along_axis(logp, batch[:, 1:, None], axis=-1))

    g = jax.grad(loss_fn, argnums=1)(params, ad, ids)  # differentiating the whole adapter: the projections have a gradient
    assert float(jnp.abs(g["model/layers_0/self_attn/q_proj"].vera_A).max()) > 0  # ... which the step never takes
    frozen0, lambdas0 = jax.tree.map(np.array, frozen), {p: np.array(n.lambda_b) for p, n in train.items()}
    step = jpeft.make_train_step(loss_fn, opt)  # donates the adapter and the optimizer state
    new, state, m = step(params, ad, state, ids, jax.random.key(1))
    new, state, m = step(params, new, state, ids, jax.random.key(2))
    chex.assert_trees_all_equal(jpeft.split_frozen(new)[1], frozen0)
    assert all(float(np.abs(np.asarray(new[p].lambda_b) - b).max()) > 0 for p, b in lambdas0.items())


@pytest.mark.parametrize("bias", ["none", "vera_only"])
def test_dense_general_conv_and_einsum_merge_equals_apply(bias, tmp_path):
    """jpeft's other linear layouts (PEFT has nn.Linear only): merge equals the factored apply,
    unmerge restores, and the PEFT export refuses them by name. With bias="vera_only" the trained
    base bias (random) is added in each layout's output shape as merge writes it into the module."""
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, img):
            h = nn.DenseGeneral((2, 3), name="k_proj")(x)
            h = nn.Einsum((2, 3, 4), "btnh,nhd->btd", name="o_proj")(h)
            h = nn.DenseGeneral(3, axis=(-2, -1), name="ff")(h.reshape(h.shape[:-1] + (2, 2)))
            return h, nn.Conv(4, (3, 3), padding="VALID", name="conv")(img)

    x = jax.random.normal(jax.random.key(0), (2, 3, 5))
    img = jax.random.normal(jax.random.key(3), (2, 6, 6, 3))
    model = Net()
    params = model.init(jax.random.key(1), x, img)
    cfg = VeraConfig(r=3, target_modules=["k_proj", "o_proj", "ff", "conv"], init_weights=False, bias=bias)
    ad = tiny.randomize_adapter(jpeft.init(cfg, params, jax.random.key(2), model, x, img), 5, scale=0.3)
    assert ad["conv"].vera_A.shape == (27, 3) and ad["k_proj"].lambda_b.shape == (6,)
    assert all((n.base_bias is None) == (bias == "none") for n in ad.values())
    y = jpeft.apply(model, params, ad, x, img)
    base = model.apply(params, x, img)
    assert all(float(jnp.abs(a - b).max()) > 1e-3 for a, b in zip(y, base))
    merged = jpeft.merge(params, ad)
    chex.assert_trees_all_close(model.apply(merged, x, img), y, rtol=1e-4, atol=1e-5)
    if bias == "none":
        chex.assert_trees_all_close(jpeft.unmerge(merged, ad), params, rtol=1e-4, atol=1e-5)
    else:  # the bias's effect alone: the site without its vectors' update (lambda_b = 0) shifts by the bias
        flat = {p: dataclasses.replace(n, lambda_b=jnp.zeros_like(n.lambda_b)) for p, n in ad.items()}
        shifted = jax.tree_util.tree_map_with_path(
            lambda kp, v: ad[kp[1].key].base_bias.reshape(v.shape) if kp[-1].key == "bias" and kp[1].key in ad else v,
            params)
        chex.assert_trees_all_close(jpeft.apply(model, params, flat, x, img), model.apply(shifted, x, img),
                                    rtol=1e-5, atol=1e-5)
    with pytest.raises(UnsupportedAdapterError, match="nn.Linear"):
        H.save_peft(str(tmp_path), cfg, ad)


def test_llama2_7b_budget_row_is_peft_count():
    """PEFT's print_trainable_parameters for VeraConfig(r=256) on Llama-2-7B (meta device, its default targets
    q_proj, v_proj): 278,528 = 64 sites x (256 + 4096); the frozen projections are not counted."""
    from jpeft import budget

    rows = {(r["method"], r["settings"]): r for r in budget.budget_rows(budget.LlamaConfig_7b(), progress=False)}
    assert rows[("VeRA", "r=256, q_proj+v_proj")]["trainable"] == 278_528


def test_jpeft_info_counts_vera_as_peft_prints(capsys):
    """`jpeft info`: PEFT's "trainable params: 278,528 || all params: 6,738,694,144" (VeraConfig(r=256) on a
    meta-device Llama-2-7B), and the frozen projections apart (64 sites x 256 x (4096 + 4096))."""
    import json

    from jpeft.cli import main

    assert main(["info", "llama-2-7b", "--method", "vera", "-r", "256", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert (res["trainable_params"], res["total_params"], res["frozen_adapter_params"]) == (278_528, 6_738_694_144,
                                                                                           134_217_728)


def test_sharding_specs_follow_the_kernel():
    """vera_A takes the kernel's input entry, vera_B and lambda_b its output entry (as LoRA's A and B);
    lambda_d is replicated."""
    from jax.sharding import PartitionSpec as P

    _, params = _base("llama3")
    ad = jpeft.init(VeraConfig(r=R, target_modules=["q_proj"]), params, jax.random.key(0))
    specs = jax.tree.map(lambda x: P("fsdp", "tensor") if x.ndim == 2 else P(), params)
    node = jpeft.adapter_specs(ad, specs)["model/layers_0/self_attn/q_proj"]
    assert (node.vera_A, node.vera_B, node.lambda_b, node.lambda_d) == (P("fsdp", None), P(None, "tensor"),
                                                                        P("tensor"), P(None))


def test_low_rank_form_merges_with_lora_adapters():
    """VeRA's update is (A * lambda_d) @ (B * lambda_b): adapter merging combines it with a LoRA
    adapter, and the merged LoRA adapter computes the same outputs as the two applied together."""
    model = nn.Dense(6)
    x = jax.random.normal(jax.random.key(0), (2, 4))
    params = model.init(jax.random.key(1), x)
    vera = _randomize(jpeft.init(VeraConfig(r=3, target_modules=".*"), params, jax.random.key(2)), 6)
    lora = jpeft.init(jpeft.LoraConfig(r=2, target_modules=".*", init_weights="random"), params, jax.random.key(3))
    merged = jpeft.merge_adapters([vera, lora], [1.0, 1.0], method="cat")
    both = model.apply(jpeft.merge(jpeft.merge(params, vera), lora), x)
    np.testing.assert_allclose(jpeft.apply(model, params, merged, x), both, rtol=1e-5, atol=1e-5)


# PEFT's bias option: "vera_only" trains the base bias of every VeRA-adapted module, "all" every bias of the model;
# llama2 has attention and MLP biases (k_proj, o_proj, gate_proj unadapted), gpt2 Conv1D and LayerNorm biases
BIAS_TARGETS = {"llama2": ["q_proj", "v_proj", "up_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}
BIAS_CASES = [("llama2", "vera_only", True), ("llama2", "all", False), ("gpt2", "vera_only", False),
              ("gpt2", "all", True)]


@pytest.mark.parametrize("family,bias,save_projection", BIAS_CASES)
def test_trained_base_biases_match_peft_both_ways(family, bias, save_projection, tmp_path):
    """PEFT's VeraConfig(bias="vera_only" / "all") trains biases beside VeRA's vectors; jpeft refused both ("does not
    implement"). Now, with every tensor random (lambda_b, lambda_d, every trained bias; the projections PEFT's own,
    saved or regenerated from the seed with save_projection=False): PEFT's file loads to PEFT's logits, merged too;
    the trainable count is PEFT's; a jpeft adapter saved to PEFT loads there to jpeft's logits."""
    hf, folder = tiny.hf_model(family)
    model, params = _base(family)
    targets = BIAS_TARGETS[family]
    torch.manual_seed(11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(hf), peft.VeraConfig(
            r=R, target_modules=targets, init_weights=False, bias=bias, save_projection=save_projection))
        tiny.perturb_trainable(pm, seed=3)
        pm.save_pretrained(str(tmp_path / "p"))
    ids, mask = tiny.batch(family, seed=3)
    ref = tiny.peft_logits(pm, ids, mask)
    cfg, ad = H.load_peft(str(tmp_path / "p"), params)
    assert cfg.bias == bias and cfg.save_projection is True
    sites = {p: n for p, n in ad.items() if isinstance(n, VM.VeraWeights)}
    assert len(sites) == 2 * len(targets) and all(n.base_bias is not None for n in sites.values())
    copies = sorted(p for p in ad if p not in sites)
    other = {"llama2": "model/layers_1/self_attn/k_proj", "gpt2": "transformer/h_1/ln_1"}[family]
    assert (copies == []) if bias == "vera_only" else (other in copies)
    hf_sd = dict(pm.named_parameters())
    key = {"llama2": "model.layers.0.mlp.down_proj", "gpt2": "transformer.h.0.mlp.c_fc"}[family]
    site = sites[key.replace(".", "/").replace("layers/", "layers_").replace("h/", "h_")]
    np.testing.assert_allclose(site.base_bias, hf_sd[f"base_model.model.{key}.base_layer.bias"].detach().numpy(),
                               atol=1e-7)
    tiny.assert_close_at_tokens(_logits_jpeft(family, params, ad, ids, mask), ref, mask)
    tiny.assert_close_at_tokens(_logits_jpeft(family, jpeft.merge(params, ad), {}, ids, mask), ref, mask)
    with pytest.raises(jpeft.errors.NotInvertibleError, match="base bias"):
        jpeft.unmerge(jpeft.merge(params, ad), ad)
    s = jpeft.summary(params, ad, print_fn=None)
    assert (s["trainable"], s["total"]) == pm.get_nb_trainable_parameters()
    # jpeft -> PEFT: an adapter of jpeft.init with every trainable tensor random
    cfg = cfg.replace(init_weights=True)
    mine = jpeft.init(cfg, params, jax.random.key(0))
    assert jax.tree.structure(mine) == jax.tree.structure(ad)
    np.testing.assert_allclose(_logits_jpeft(family, params, mine, ids, mask),
                               _logits_jpeft(family, params, {}, ids, mask), atol=1e-6)  # the identity at init
    mine = tiny.randomize_adapter(mine, 2, scale=0.3)
    H.save_peft(str(tmp_path / "j"), cfg, mine, base_model_name_or_path=folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "j")).eval()
    ref2 = tiny.peft_logits(back, ids, mask)
    assert np.abs(ref2 - tiny.torch_logits(family, ids, mask)).max() > 1e-2
    tiny.assert_close_at_tokens(_logits_jpeft(family, params, mine, ids, mask), ref2, mask)
    # and the PEFT file back into jpeft, and jpeft's own format, give the same arrays
    for loaded in (H.load_peft(str(tmp_path / "j"), params)[1],
                   (jpeft.save_adapter(str(tmp_path / "own"), cfg, mine), jpeft.load_adapter(str(tmp_path / "own"), params)[1])[1]):
        assert jax.tree.structure(loaded) == jax.tree.structure(mine)
        for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(mine)):
            np.testing.assert_array_equal(a, b)


def test_trained_base_biases_train_and_are_refused_where_they_would_be_dropped(tmp_path):
    """The trained base bias gets a gradient and moves (the base stays bit-identical); adapter merging and the
    adapter bank, which combine (A * lambda_d) @ (B * lambda_b), refuse such a site by name rather than drop the
    bias; a layer-scanned base is refused by name."""
    model, params = _base("llama2")
    cfg = VeraConfig(r=R, target_modules=["q_proj", "v_proj"], bias="vera_only")
    ad = tiny.randomize_adapter(jpeft.init(cfg, params, jax.random.key(0)), 4, scale=0.3)
    ids = jnp.asarray(tiny.batch("llama2")[0])

    def loss_fn(p, a, batch, key=None):
        logp = jax.nn.log_softmax(jpeft.apply(model, p, a, batch)[:, :-1])
        return -jnp.mean(jnp.take_along_axis(logp, batch[:, 1:, None], axis=-1))

    g = jax.grad(loss_fn, argnums=1)(params, ad, ids)
    assert float(jnp.abs(g["model/layers_0/self_attn/q_proj"].base_bias).min()) > 0
    opt = optax.adam(1e-2)
    base0, bias0 = jax.tree.map(np.array, params), {p: np.array(n.base_bias) for p, n in ad.items()}
    state = opt.init(jpeft.trainable(ad))
    new, _, _ = jpeft.make_train_step(loss_fn, opt)(params, ad, state, ids, jax.random.key(1))  # donates ad
    assert all(float(jnp.abs(new[p].base_bias - b).min()) > 0 for p, b in bias0.items())
    chex.assert_trees_all_equal(params, base0)
    ad = new
    with pytest.raises(jpeft.errors.NotMergeableError, match="VeraConfig.bias"):
        jpeft.merge_adapters([ad, ad], [0.5, 0.5], method="cat")
    with pytest.raises(jpeft.errors.BankError, match="VeraConfig.bias"):
        jpeft.AdapterBank.from_adapters({"a": ad})
    kw = dict(vocab_size=tiny.VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    scanned = jpeft.models.LlamaForCausalLM(jpeft.models.LlamaConfig(**kw, scan_layers=True, attention_bias=True))
    sparams = scanned.init(jax.random.key(0), ids)
    with pytest.raises(ConfigError, match="scan"):
        jpeft.init(cfg, sparams, jax.random.key(1), scanned, ids)


def test_task_head_bias_vera_only_matches_peft_and_all_is_refused(tmp_path):
    """BERT SEQ_CLS: PEFT trains the classifier's copy (modules_to_save) and, with bias="vera_only", the base biases
    of query and value: jpeft loads both and matches PEFT's logits (merged too), and its file loads back in PEFT.
    bias="all" would train the classifier's bias too, which jpeft reads as PEFT's head copy: refused by name, from
    a config and from PEFT's file."""
    hf, folder = tiny.hf_model("bert")
    model, params = _base("bert")
    torch.manual_seed(11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(hf), peft.VeraConfig(r=R, target_modules=["query", "value"],
                                                                     init_weights=False, bias="vera_only",
                                                                     task_type="SEQ_CLS"))
        tiny.perturb_trainable(pm, seed=3)
        pm.save_pretrained(str(tmp_path / "p"))
    ids, mask = tiny.batch("bert", seed=3)
    with torch.no_grad():
        ref = pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.float().numpy()
    cfg, ad = H.load_peft(str(tmp_path / "p"), params)
    assert cfg.bias == "vera_only" and isinstance(ad["classifier"], jpeft.SavedModule)
    assert sum(isinstance(n, VM.VeraWeights) and n.base_bias is not None for n in ad.values()) == 4
    got = jpeft.apply(model, params, ad, jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-4, rtol=0)
    merged = jpeft.apply(model, jpeft.merge(params, ad), {}, jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(merged), ref, atol=1e-4, rtol=0)
    s = jpeft.summary(params, ad, print_fn=None)
    assert (s["trainable"], s["total"]) == pm.get_nb_trainable_parameters()
    H.save_peft(str(tmp_path / "j"), cfg, ad, task_type="SEQ_CLS", params=params, base_model_name_or_path=folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "j")).eval()
    with torch.no_grad():
        np.testing.assert_allclose(back(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy(),
                                   ref, atol=1e-4, rtol=0)
    with pytest.raises(ConfigError, match="task head.*vera_only"):
        jpeft.init(cfg.replace(bias="all"), params, jax.random.key(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pa = peft.get_peft_model(copy.deepcopy(hf), peft.VeraConfig(r=R, target_modules=["query"], bias="all",
                                                                     task_type="SEQ_CLS"))
        pa.save_pretrained(str(tmp_path / "a"))
    with pytest.raises(UnsupportedAdapterError, match="task head.*vera_only"):
        H.load_peft(str(tmp_path / "a"), params)
