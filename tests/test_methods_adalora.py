"""AdaLoRA against Hugging Face PEFT 0.21 on the tiny random Llama-3-style model of
tests/_models_tiny.py: logits, the rank allocator step by step on the same
gradients (sensitivity averages, budget schedule, pruned triplets, rank_pattern), and the PEFT
format both ways with pruned ranks."""

import copy
import dataclasses
import json
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
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "helpers"))
import adalora_toy  # noqa: E402
from test_cli import hf_dir  # noqa: E402, F401  (the fixture: a tiny Llama folder with a tokenizer and JSONL)

import jpeft  # noqa: E402
import jpeft.cli._trainer  # noqa: E402
import jpeft.models  # noqa: E402
from jpeft import hf as H  # noqa: E402
from jpeft.errors import ConfigError, UnsupportedAdapterError, UnsupportedModuleError  # noqa: E402
from jpeft.methods import adalora as AL  # noqa: E402

torch = __import__("torch")  # a test dependency: missing means a broken install, not a skip
peft = __import__("peft")  # a test dependency: missing means a broken install, not a skip

FAMILY = "llama3"
TARGETS = ["q_proj", "v_proj", "down_proj"]  # widths differ: 32->32, 32->16, 64->32
SCHEDULE = dict(init_r=4, target_r=2, tinit=1, tfinal=2, total_step=7, deltaT=1, lora_alpha=6)


def _base():
    return jpeft.models.from_pretrained(tiny.hf_model(FAMILY)[1])


def _peft_model():
    hf, _ = tiny.hf_model(FAMILY)
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(hf), peft.AdaLoraConfig(
            target_modules=TARGETS, init_lora_weights=False, **SCHEDULE))  # A, E, B all random
    return pm


def _lora_params(pm):
    return {n: p for n, p in pm.named_parameters() if "lora_" in n}


def _path(torch_name):
    """``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default`` -> (jpeft path, tensor)."""
    mod, t, _ = torch_name[len("base_model.model."):].rsplit(".", 2)
    return jpeft.tree.from_hf_name(mod), t


def _to_jpeft(name, x):
    """A PEFT lora tensor (or its gradient) in jpeft's orientation."""
    x = np.asarray(x.detach().numpy() if hasattr(x, "detach") else x, np.float32)
    return x.reshape(-1) if name == "lora_E" else x.T


def _grads_tree(adapter, torch_grads):
    g = {}
    for n, v in torch_grads.items():
        path, t = _path(n)
        g.setdefault(path, {})[t] = jnp.asarray(_to_jpeft(t, v))
    return {p: AL.AdaLoraWeights(g[p]["lora_A"], g[p]["lora_E"], g[p]["lora_B"], node.scale, node.layout, node.dropout)
            for p, node in adapter.items()}


def _logits_jpeft(params, adapter, ids, mask):
    model, _ = _base()
    return np.asarray(jpeft.apply(model, params, adapter, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))


def _close(a, b, mask, atol=1e-4):
    """Equal up to f32 rounding: ``atol`` relative to the largest reference logit (about 3
    here). An absolute 1e-4 was too tight for merge-vs-apply on some CPUs: the merged kernels
    round differently, and XLA's CPU code depends on the host's vector units (1.05e-4 on one
    logit of 3.3, on the machine of session 19)."""
    sel = np.asarray(mask).astype(bool)
    np.testing.assert_allclose(a[sel], b[sel], atol=atol * max(1.0, float(np.abs(b[sel]).max())), rtol=0)


def test_logits_and_allocator_match_peft_step_by_step(tmp_path):
    pm = _peft_model()
    pm.save_pretrained(str(tmp_path / "start"))
    _, params = _base()
    config, ad = H.load_peft(str(tmp_path / "start"), params)
    assert isinstance(config, AL.AdaLoraConfig) and config.init_r == 4 and config.alpha == 6
    ids, mask = tiny.batch(FAMILY, seed=3)
    ref = tiny.peft_logits(pm, ids, mask)
    assert np.abs(ref - tiny.torch_logits(FAMILY, ids, mask)).max() > 1e-2
    _close(_logits_jpeft(params, ad, ids, mask), ref, mask)
    # the allocator over the whole schedule on the same (random) gradients; torch's parameters are
    # not stepped, so both sides see the same values, pruned in place by PEFT and returned by jpeft
    gen = torch.Generator().manual_seed(5)
    state, pattern, patterns = AL.AllocatorState(), None, []
    for step in range(1, SCHEDULE["total_step"] + 1):
        with torch.no_grad():
            for p in _lora_params(pm).values():
                p.grad = torch.randn(p.shape, generator=gen)
        grads = _grads_tree(ad, {n: p.grad for n, p in _lora_params(pm).items()})
        pm.base_model.update_and_allocate(step)
        ad, state, rp = AL.update_and_allocate(config, state, ad, grads, step)
        if rp is not None:
            pattern = rp
            config = config.replace(rank_pattern=rp)
            ref_rp = {k.replace(".default", ""): tuple(v) for k, v in pm.peft_config["default"].rank_pattern.items()}
            assert rp == ref_rp, step
            patterns.append(sum(map(sum, rp.values())))
        for n, p in _lora_params(pm).items():
            path, t = _path(n)
            np.testing.assert_allclose(getattr(ad[path], t), _to_jpeft(t, p), atol=1e-6)
    # the budget fell from 6 sites * 4 towards 6 * 2 kept triplets on the cubic schedule (PEFT's numbers: 17, 13, 12, 12)
    assert patterns == [17, 13, 12, 12], patterns
    assert any(not all(v) for v in pattern.values())
    # pruned: the same logits, and both ways through the PEFT format (only the kept triplets written)
    pm.eval()
    ref = tiny.peft_logits(pm, ids, mask)
    _close(_logits_jpeft(params, ad, ids, mask), ref, mask)
    H.save_peft(str(tmp_path / "jpeft"), config, ad, base_model_name_or_path=tiny.hf_model(FAMILY)[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(copy.deepcopy(tiny.hf_model(FAMILY)[0]), str(tmp_path / "jpeft")).eval()
    kept = {jpeft.tree.from_hf_name(k[: -len(".lora_E")]): sum(v) for k, v in pattern.items()}
    for path, r in kept.items():
        assert back.base_model.model.get_submodule(jpeft.tree.hf_name(path)).lora_E["default"].shape == (r, 1)
    _close(tiny.peft_logits(back, ids, mask), ref, mask)
    pm.save_pretrained(str(tmp_path / "peft"))
    config2, ad2 = H.load_peft(str(tmp_path / "peft"), params)
    assert config2.rank_pattern == config.rank_pattern
    _close(_logits_jpeft(params, ad2, ids, mask), ref, mask)
    # resuming from a pruned file: PEFT's modules hold the kept triplets only, jpeft's the dropped
    # ones as zeros; the orthogonal penalty is PEFT's (over the kept ones) either way
    norms = []
    for n, p in back.base_model.model.named_parameters():
        if n.endswith(("lora_A.default", "lora_B.default")):
            x = p.detach().double().numpy()
            gram = x @ x.T if "lora_A" in n else x.T @ x
            norms.append(np.linalg.norm(gram - np.eye(gram.shape[0])))
    _, ad3 = H.load_peft(str(tmp_path / "jpeft"), params)
    for loaded in (ad2, ad3):
        np.testing.assert_allclose(float(AL.orthogonal_regularization(loaded)), np.mean(norms), rtol=1e-5)
        g = jax.grad(AL.orthogonal_regularization)(loaded)
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(g))
    # merge equals apply; unmerge restores
    merged = jpeft.merge(params, ad2)
    _close(_logits_jpeft(merged, {}, ids, mask), ref, mask)
    for a, b in zip(jax.tree.leaves(jpeft.unmerge(merged, ad2)), jax.tree.leaves(params)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_budget_schedule_is_peft_cubic():
    cfg = AL.AdaLoraConfig(init_r=12, target_r=4, tinit=10, tfinal=20, total_step=100, deltaT=5)
    hf, _ = tiny.hf_model(FAMILY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(hf), peft.AdaLoraConfig(init_r=12, target_r=4, tinit=10, tfinal=20,
                                                                        total_step=100, deltaT=5, target_modules=TARGETS))
    alloc = pm.base_model.rankallocator
    for step in range(0, 101):
        assert AL.budget_schedule(cfg, step, alloc.init_bgt, alloc.target_bgt) == alloc.budget_schedule(step), step


def test_identity_at_init_orthogonal_penalty_and_refusals():
    model, params = _base()
    cfg = AL.AdaLoraConfig(init_r=3, target_r=2, total_step=10, target_modules=TARGETS)
    ad = jpeft.init(cfg, params, jax.random.key(0))
    ids, mask = tiny.batch(FAMILY)
    _close(_logits_jpeft(params, ad, ids, mask), _logits_jpeft(params, {}, ids, mask), mask, atol=1e-6)
    node = ad["model/layers_0/mlp/down_proj"]
    assert node.lora_A.shape == (64, 3) and node.lora_E.shape == (3,) and node.lora_B.shape == (3, 32)
    assert 0.015 < float(jnp.std(node.lora_A)) < 0.025  # PEFT's N(0, 0.02^2)
    # PEFT's penalty: mean over A and B of ||gram - I||_F
    expect = np.mean([np.linalg.norm(np.asarray(n.lora_A).T @ np.asarray(n.lora_A) - np.eye(3)) for n in ad.values()]
                     + [np.linalg.norm(np.asarray(n.lora_B) @ np.asarray(n.lora_B).T - np.eye(3)) for n in ad.values()])
    np.testing.assert_allclose(float(AL.orthogonal_regularization(ad)), expect, rtol=1e-5)
    with pytest.raises(ConfigError, match="total_step is required"):
        AL.AdaLoraConfig()
    with pytest.raises(ConfigError, match="no budgeting phase"):
        AL.AdaLoraConfig(total_step=10, tinit=5, tfinal=5)
    for opt in ({"use_rslora": True}, {"bias": "all"}, {"modules_to_save": ["lm_head"]}, {"use_dora": True}):
        with pytest.raises(ConfigError, match="does not implement"):
            AL.AdaLoraConfig.from_dict({**cfg.to_dict(), **opt})
    with pytest.raises(UnsupportedModuleError, match="embedding"):
        jpeft.init(cfg.replace(target_modules=["embed_tokens"]), params, jax.random.key(0))
    with pytest.raises(ConfigError, match="rank_pattern"):
        cfg.replace(rank_pattern={"model.layers.0.self_attn.q_proj.lora_E": [True]})
    with pytest.raises(UnsupportedModuleError, match="unrolled model"):  # the allocator ranks across modules
        AL.mask_using_rank_pattern({"model/layers/self_attn/q_proj": jpeft.scan.Stacked(node, 1)}, {})
    # the penalty is per module: on a layer-scanned adapter it is the unrolled one's (it was refused, naming the
    # allocator, so AdaLoRA's training loss could not be computed on a scanned model)
    stacked = jpeft.scan.stack_adapter(ad, len({p.split("/")[1] for p in ad}))
    assert any(isinstance(n, jpeft.scan.Stacked) for n in stacked.values())
    np.testing.assert_allclose(float(AL.orthogonal_regularization(stacked)), expect, rtol=1e-5)
    with pytest.raises(UnsupportedAdapterError, match="LoraWeights"):
        AL.orthogonal_regularization(jpeft.init(jpeft.LoraConfig(target_modules=["q_proj"]), params, jax.random.key(0)))


def test_llama2_7b_budget_row_is_peft_count():
    """PEFT counts lora_A + lora_B + lora_E per site (a 1-layer Llama: 232 for init_r=4 on q, v, the same
    per-site formula); for Llama-2-7B on q_proj and v_proj with init_r=12: 64 * 12 * (4096 + 4096 + 1)."""
    from jpeft import budget

    rows = {(r["method"], r["settings"]): r for r in budget.budget_rows(budget.LlamaConfig_7b(), progress=False)}
    assert rows[("AdaLoRA", "init_r=12, target_r=8, q_proj+v_proj (at the start)")]["trainable"] == 6_292_224


def test_layer_scanned_model_equals_unrolled():
    kw = dict(vocab_size=tiny.VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    scanned = jpeft.models.LlamaForCausalLM(jpeft.models.LlamaConfig(**kw, scan_layers=True))
    unrolled = jpeft.models.LlamaForCausalLM(jpeft.models.LlamaConfig(**kw))
    ids = jnp.asarray(tiny.batch(FAMILY)[0])
    params = scanned.init(jax.random.key(0), ids)
    cfg = AL.AdaLoraConfig(init_r=3, target_r=2, total_step=10, target_modules=["v_proj", "down_proj"], init_lora_weights=False)
    ad = jpeft.init(cfg, params, jax.random.key(1), scanned, ids)
    assert ad["model/layers/mlp/down_proj"].inner.lora_A.shape == (2, 64, 3)
    flat_params, flat_ad = jpeft.scan.unstack_params(params), jpeft.scan.unstack_adapter(ad)
    np.testing.assert_allclose(jpeft.apply(unrolled, flat_params, flat_ad, ids), jpeft.apply(scanned, params, ad, ids),
                               atol=1e-5)
    for a, b in zip(jax.tree.leaves(jpeft.scan.unstack_params(jpeft.merge(params, ad))),
                    jax.tree.leaves(jpeft.merge(flat_params, flat_ad))):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_gpt2_conv1d_to_peft_and_back(tmp_path):
    """GPT-2's Conv1D layers (PEFT's fan_in_fan_out): a random jpeft adapter loads in PEFT with the same logits."""
    hf, folder = tiny.hf_model("gpt2")
    model, params = jpeft.models.from_pretrained(folder)
    cfg = AL.AdaLoraConfig(init_r=3, target_r=2, total_step=10, target_modules=["c_attn", "c_fc"], init_lora_weights=False)
    ad = jpeft.init(cfg, params, jax.random.key(0))
    H.save_peft(str(tmp_path), cfg, ad, base_model_name_or_path=folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path)).eval()
    ids, mask = tiny.batch("gpt2", seed=3)
    ref = tiny.peft_logits(pm, ids, mask)
    assert np.abs(ref - tiny.torch_logits("gpt2", ids, mask)).max() > 1e-2
    out = np.asarray(jpeft.apply(model, params, ad, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    _close(out, ref, mask)
    _, back = H.load_peft(str(tmp_path), params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(ad)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("init", ["gaussian", "pissa", "astra"])
def test_a_peft_file_with_a_lora_init_name_loads_as_peft_reads_it(tmp_path, init):
    """AdaLoraConfig inherits LoraConfig's init_lora_weights (True, False or an init's name); PEFT's AdaLoRA
    takes any true value for its own init, and a loaded file's tensors are what counts. jpeft refused such a
    file by name; it now loads (as True) with PEFT's logits, every tensor random. PEFT 0.22's AdaLoRA files
    carry LoRA's new astra_config (null, or Astra's options beside init "astra", which AdaLoRA's layers never
    read): jpeft warned of an unknown key; it loads them quietly."""
    hf, _ = tiny.hf_model(FAMILY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(hf), peft.AdaLoraConfig(target_modules=TARGETS, init_lora_weights=init,
                                                                        **SCHEDULE))
    torch.manual_seed(4)
    for n, p in _lora_params(pm).items():
        torch.nn.init.normal_(p, std=0.3)
    pm.save_pretrained(str(tmp_path))
    d = json.load(open(tmp_path / "adapter_config.json"))
    assert d["init_lora_weights"] == init
    peft_22 = tiny.peft_at_least(0, 22)
    assert ("astra_config" in d) == peft_22
    if init == "astra":  # PEFT >= 0.22 fills in Astra's default options; written so by hand for PEFT 0.21's file
        if peft_22:
            assert d["astra_config"]["prune_temporary_fields"] is True
        d["astra_config"] = {"cache_file": None, "covariance_file": None, "verbose": False,
                             "use_float16_for_covariance": False, "prune_temporary_fields": True}
        (tmp_path / "adapter_config.json").write_text(json.dumps(d))
    pm.eval()
    _, params = _base()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg, ad = H.load_peft(str(tmp_path), params)
    assert cfg.init_weights is True
    ids, mask = tiny.batch(FAMILY, seed=5)
    ref = tiny.peft_logits(pm, ids, mask)
    assert np.abs(ref - tiny.torch_logits(FAMILY, ids, mask)).max() > 1e-2
    _close(_logits_jpeft(params, ad, ids, mask), ref, mask)


def test_dense_general_conv_and_einsum_merge_equals_apply(tmp_path):
    """jpeft's other linear layouts through the shared dispatch: merge equals the factored apply,
    unmerge restores; the PEFT export (dense modules only) refuses them by name."""
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, img):
            h = nn.DenseGeneral((2, 3), name="k_proj")(x)
            h = nn.Einsum((2, 3, 4), "btnh,nhd->btd", name="o_proj")(h)
            return h, nn.Conv(4, (3, 3), padding="VALID", name="conv")(img)

    x = jax.random.normal(jax.random.key(0), (2, 3, 5))
    img = jax.random.normal(jax.random.key(3), (2, 6, 6, 3))
    model = Net()
    params = model.init(jax.random.key(1), x, img)
    cfg = AL.AdaLoraConfig(init_r=2, target_r=1, total_step=10, target_modules=["k_proj", "o_proj", "conv"],
                           init_lora_weights=False)
    ad = jpeft.init(cfg, params, jax.random.key(2), model, x, img)
    y = jpeft.apply(model, params, ad, x, img)
    assert all(float(jnp.abs(a - b).max()) > 1e-3 for a, b in zip(y, model.apply(params, x, img)))
    merged = jpeft.merge(params, ad)
    chex.assert_trees_all_close(model.apply(merged, x, img), y, rtol=1e-4, atol=1e-4)
    chex.assert_trees_all_close(jpeft.unmerge(merged, ad), params, rtol=1e-4, atol=1e-5)
    with pytest.raises(UnsupportedAdapterError, match="dense"):
        H.save_peft(str(tmp_path), cfg, ad)


def test_sharding_specs_follow_the_kernel():
    from jax.sharding import PartitionSpec as P

    _, params = _base()
    ad = jpeft.init(AL.AdaLoraConfig(init_r=2, target_r=1, total_step=5, target_modules=["q_proj"]), params,
                    jax.random.key(0))
    specs = jax.tree.map(lambda x: P("fsdp", "tensor") if x.ndim == 2 else P(), params)
    node = jpeft.adapter_specs(ad, specs)["model/layers_0/self_attn/q_proj"]
    assert (node.lora_A, node.lora_E, node.lora_B) == (P("fsdp", None), P(None), P(None, "tensor"))


def test_allocator_misuse_is_refused_by_name():
    """A gradient tree of another shape (a raw pytree error), the final allocation with an empty
    state (a restarted run: a TypeError deep in the scoring) and a rank pattern missing this
    adapter's sites (it masked the others and skipped them silently) are named errors."""
    from jpeft.errors import InputValidationError

    params = {"params": {"q": nn.Dense(6).init(jax.random.key(0), jnp.ones((1, 6)))["params"],
                         "v": nn.Dense(6).init(jax.random.key(1), jnp.ones((1, 6)))["params"]}}
    config = AL.AdaLoraConfig(target_modules=["q", "v"], init_r=4, target_r=2, tinit=1, tfinal=2, total_step=6,
                              deltaT=1)
    ad = jpeft.init(config, params, jax.random.key(2))
    grads = jax.tree.map(jnp.ones_like, ad)
    with pytest.raises(InputValidationError, match="gradient tree of this adapter"):
        AL.update_and_allocate(config, AL.AllocatorState(), ad, {"q": grads["q"]}, 1)
    with pytest.raises(ConfigError, match="AllocatorState is empty"):
        AL.update_and_allocate(config, AL.AllocatorState(), ad, grads, 4)
    _, state, _ = AL.update_and_allocate(config, AL.AllocatorState(), ad, grads, 1)
    _, _, pattern = AL.update_and_allocate(config, state, ad, grads, 4)  # with the kept state it allocates
    assert sorted(pattern) == [AL.rank_key("q"), AL.rank_key("v")]
    with pytest.raises(ConfigError, match="rank_pattern has no entry"):
        AL.mask_using_rank_pattern(ad, {AL.rank_key("q"): pattern[AL.rank_key("q")]})


def test_a_run_shorter_than_the_schedule_is_warned_about():
    """A run whose length is known (`jpeft train`'s train.steps, the forgetting runner's steps per
    task) and ends before the final allocation at total_step - tfinal keeps more than target_r
    triplets per module: wrap_optimizer says so; a run that reaches it (or runs past total_step,
    keeping the final mask) is not warned about."""
    import warnings

    from jpeft.cli._trainer import make_optimizer

    config = AL.AdaLoraConfig(target_modules=["q"], init_r=4, target_r=2, tinit=1, tfinal=2, total_step=10)
    with pytest.warns(UserWarning, match=r"final rank allocation at step 8, but this run has 7 steps"):
        config.wrap_optimizer(optax.adam(1e-2), 7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for n in (None, 8, 10, 50):
            config.wrap_optimizer(optax.adam(1e-2), n)
    t = {"learning_rate": 1e-2, "warmup_steps": 0, "max_grad_norm": 1.0, "weight_decay": 0.0}
    with pytest.warns(UserWarning, match="Set total_step to the run's number of steps \\(5\\)"):
        make_optimizer(t, 5, method=config)


def test_allocator_reads_clipped_gradients_as_peft_under_the_trainer():
    """PEFT's allocator reads ``p.grad`` after the step, which the Trainer's
    ``clip_grad_norm_`` has scaled; a jpeft loop clipping in its optimizer passed raw gradients
    and ranked other triplets (an audit: 12 steps, deltaT=1, a different triplet pruned at step 5,
    losses 3.7e-4 apart after it). ``max_grad_norm=c`` scales them as torch does."""
    params = {"params": {"q": nn.Dense(6).init(jax.random.key(0), jnp.ones((1, 6)))["params"],
                         "v": nn.Dense(6).init(jax.random.key(1), jnp.ones((1, 6)))["params"]}}
    config = AL.AdaLoraConfig(target_modules=["q", "v"], init_r=4, target_r=1, tinit=0, tfinal=1, total_step=5,
                              deltaT=1, init_lora_weights=False)
    ad = jpeft.init(config, params, jax.random.key(2))
    keys = iter(jax.random.split(jax.random.key(3), 64))
    states = {"kw": AL.AllocatorState(), "torch": AL.AllocatorState(), "raw": AL.AllocatorState()}
    for step in range(1, 3):
        # per-leaf scales make the clipped and raw scores rank differently
        grads = jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape) * jax.random.uniform(next(keys), (), minval=0.1, maxval=5.0), ad)
        tg = [torch.tensor(np.asarray(g)) for g in jax.tree.leaves(grads)]
        for t in tg:
            t.grad = t.clone()
        torch.nn.utils.clip_grad_norm_(tg, 0.5)
        clipped = jax.tree.unflatten(jax.tree.structure(grads), [jnp.asarray(t.grad.numpy()) for t in tg])
        _, states["kw"], p_kw = AL.update_and_allocate(config, states["kw"], ad, grads, step, max_grad_norm=0.5)
        _, states["torch"], p_t = AL.update_and_allocate(config, states["torch"], ad, clipped, step)
        _, states["raw"], _ = AL.update_and_allocate(config, states["raw"], ad, grads, step)
        assert p_kw == p_t
    chex.assert_trees_all_close(states["kw"], states["torch"], rtol=1e-6, atol=0)
    assert not np.allclose(np.asarray(states["kw"].ipt["q"].lora_E), np.asarray(states["raw"].ipt["q"].lora_E))
    for bad in (0, -1.0, float("nan"), True, "1"):
        with pytest.raises(ConfigError, match="max_grad_norm must be None or a finite number > 0"):
            AL.update_and_allocate(config, AL.AllocatorState(), ad, grads, 1, max_grad_norm=bad)


# -- the rank allocator in the one training loop (jpeft.fit, `jpeft train`) ------------------------

def test_allocator_in_the_jitted_step_equals_the_host_loop_step_by_step():
    """``chain(clip, allocator(config, adamw))`` in ``jpeft.make_train_step`` against the host loop
    (``update_and_allocate`` after each update, equal to PEFT's; ``max_grad_norm=c`` with the raw
    gradients), over a run that crosses tinit, several deltaT allocations, the final allocation
    and steps past total_step: the adapters to 1e-6 and the same rank pattern after every step."""
    config = AL.AdaLoraConfig(target_modules=["q", "v", "o"], init_r=4, target_r=2, tinit=2, tfinal=3, total_step=14,
                              deltaT=3)
    params, ad, loss_fn, batch = adalora_toy.net_problem(config)
    clip = 0.05  # active from step 2 on (step 1's norm is below it)
    head = [optax.clip_by_global_norm(clip)]
    host_opt = optax.chain(*head, optax.adamw(5e-2, weight_decay=0.01))
    opt = optax.chain(*head, jpeft.adalora_allocator(config, optax.adamw(5e-2, weight_decay=0.01)))
    assert config.wrap_optimizer(host_opt).update is not host_opt.update
    step = jpeft.make_train_step(loss_fn, opt, donate=False)
    a_h, st, alloc, cfg, pattern = ad, host_opt.init(ad), AL.AllocatorState(), config, None
    a_w, ost = ad, jpeft.init_opt_state(opt, ad)
    norms, kept = [], []

    @jax.jit
    def host_update(a, st, b):
        g = jax.grad(lambda a: loss_fn(params, a, b, None))(a)
        u, st = host_opt.update(g, st, a)
        return optax.apply_updates(a, u), st, g

    for s in range(1, 17):
        a_h, st, g = host_update(a_h, st, batch(s))
        a_h, alloc, rp = AL.update_and_allocate(cfg, alloc, a_h, g, s, max_grad_norm=clip)
        if rp is not None:
            pattern, cfg = rp, cfg.replace(rank_pattern=rp)
        a_w, ost, m = step(params, a_w, ost, batch(s), jax.random.key(0))
        norms.append(float(m["grad_norm"]))
        chex.assert_trees_all_close(a_w, a_h, atol=1e-6, rtol=0)
        assert AL.rank_pattern(ost) == pattern, s
        assert config.trained_config(ost) == (config if pattern is None else config.replace(rank_pattern=pattern))
        kept.append(None if pattern is None else sum(map(sum, pattern.values())))
    # allocations at 3, 6, 9 (deltaT) and the final one at 11 = 14 - 3, then fixed
    assert kept[:3] == [None, None, 10] and kept[5] == 7 and kept[-1] == 6, kept
    pruned = [i for i, b in enumerate(pattern[AL.rank_key("q")]) if not b]
    assert pruned and all(float(a_w["q"].lora_E[i]) == 0.0 for i in pruned)
    assert norms[0] < clip and all(n > clip for n in norms[1:])  # clipping active from step 2
    # misuse: named errors
    with pytest.raises(ConfigError, match="rank_pattern reads the state of one"):
        AL.rank_pattern(optax.adam(1e-3).init(ad))
    assert config.trained_config(None) is config
    with pytest.raises(ConfigError, match="needs params"):
        opt.update(jax.tree.map(jnp.ones_like, ad), jpeft.init_opt_state(opt, ad))
    with pytest.raises(UnsupportedAdapterError, match="AdaLoraWeights"):
        jpeft.adalora_allocator(config, optax.adam(1e-3)).init(
            jpeft.init(jpeft.LoraConfig(target_modules=["q"]), params, jax.random.key(0)))
    with pytest.raises(UnsupportedModuleError, match="unrolled model"):
        jpeft.adalora_allocator(config, optax.adam(1e-3)).init(
            {"model/layers/q": jpeft.scan.Stacked(ad["q"], 1)})
    with pytest.raises(ConfigError, match="needs an AdaLoraConfig"):
        AL.allocator(jpeft.LoraConfig(), optax.adam(1e-3))


def _adalora_run(root, name, **kw):
    """A ``jpeft train`` config of AdaLoRA on the tiny Llama of tests/test_cli.py (6 steps,
    allocations at 2, 3 and the final one at 4, fixed after), clipping and weight decay on."""
    from test_cli import write_config

    path = write_config(root, name, **kw)
    text = path.read_text().replace('name = "lora"\nr = 4\nlora_alpha = 8\n', 'name = "adalora"\ninit_r = 4\ntarget_r = 2\n'
                                    'tinit = 1\ntfinal = 2\ntotal_step = 6\ndeltaT = 1\nlora_alpha = 8\n')
    path.write_text(text.replace("[train]", "[train]\nmax_grad_norm = 1.0\nweight_decay = 0.01"))
    return path


def test_jpeft_train_prunes_resumes_exactly_and_peft_loads_the_pruned_adapter(hf_dir, capsys, monkeypatch):
    """`jpeft train` with method = "adalora": the allocator rides in the optimizer state (every step
    jitted, clipped gradients), the orthogonal penalty in the loss; the finished adapter holds the
    rank pattern (target_r per module on average), `jpeft export` writes the kept triplets and
    PEFT loads them with the same logits; --max-steps then --resume equals the uninterrupted run
    (the allocator's averages and mask survive the checkpoint)."""
    from test_cli import adapter_arrays, jpeft_here
    import transformers as T

    r = jpeft_here(capsys, "train", "--config", _adalora_run(hf_dir, "ada_full", steps=6, save_every=3, eval_every=0),
                   "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "ADALORA" in r.stderr
    info = jpeft.read_adapter_info(str(hf_dir / "ada_full" / "adapter"))
    cfg = info.config
    assert isinstance(cfg, AL.AdaLoraConfig) and cfg.rank_pattern is not None
    assert len(cfg.rank_pattern) == 6 and sum(map(sum, cfg.rank_pattern.values())) == 2 * 6
    ref = adapter_arrays(hf_dir / "ada_full" / "adapter")
    # interrupted at 3, in the budget phase (its checkpoint), resumed
    split = _adalora_run(hf_dir, "ada_split", steps=6, save_every=3, eval_every=0)
    r = jpeft_here(capsys, "train", "--config", split, "--max-steps", "3", "--no-progress")
    assert r.returncode == 0 and "stopped at step 3 of 6" in r.stderr, r.stderr
    r = jpeft_here(capsys, "train", "--config", split, "--resume", "--no-progress")
    assert r.returncode == 0 and "resumed from step 3" in r.stderr, r.stderr
    got = adapter_arrays(hf_dir / "ada_split" / "adapter")
    assert sorted(got) == sorted(ref)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], atol=1e-6, rtol=0, err_msg=k)
    assert jpeft.read_adapter_info(str(hf_dir / "ada_split" / "adapter")).config == cfg
    # PEFT loads the export with the pruned ranks and the same logits
    out = hf_dir / "ada_peft"
    r = jpeft_here(capsys, "export", "--model", hf_dir / "tiny-llama", "--adapter", hf_dir / "ada_full", "--out", out)
    assert r.returncode == 0, r.stderr
    base = T.LlamaForCausalLM.from_pretrained(str(hf_dir / "tiny-llama"), attn_implementation="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(base, str(out)).eval()
    for k, keep in cfg.rank_pattern.items():
        assert pm.base_model.model.get_submodule(k[: -len(".lora_E")]).lora_E["default"].shape == (sum(keep), 1)
    model, params = jpeft.models.from_pretrained(str(hf_dir / "tiny-llama"))
    _, ad = jpeft.load_adapter(str(hf_dir / "ada_full" / "adapter"), params)
    for path, node in ad.items():  # the pruned triplets' E are zero
        keep = np.asarray(cfg.rank_pattern[AL.rank_key(path)])
        assert (np.asarray(node.lora_E)[~keep] == 0).all() and (np.asarray(node.lora_E)[keep] != 0).all()
    ids = np.arange(2 * 12).reshape(2, 12) % 200 + 3
    with torch.no_grad():
        want = pm(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(jpeft.apply(model, params, ad, jnp.asarray(ids))), want, atol=1e-5, rtol=0)
    assert np.abs(want - np.asarray(model.apply(params, jnp.asarray(ids)))).max() > 1e-4  # it trained
    # a layer-scanned run: refused by name, one line, before the weights load, nothing left behind
    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(jpeft.cli._trainer, "load_folder", no_load)
    r = jpeft_here(capsys, "train", "--config", _adalora_run(hf_dir, "ada_scan", steps=6, eval_every=0), "--no-progress",
                   "--set", "train.scan_layers=true")
    assert r.returncode == 2 and "method adalora cannot train a layer-scanned model" in r.stderr, r.stderr
    assert "Set train.scan_layers = false" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (hf_dir / "ada_scan").exists()
    # a checkpoint's export carries that step's rank pattern (the allocator's state)
    step_cfg = AL.AdaLoraConfig.from_dict(json.load(open(hf_dir / "ada_split" / "checkpoints" / "3" / "meta" / "metadata"))
                                          ["sites_config"])
    assert step_cfg.rank_pattern is not None


def test_fit_trains_adalora_and_peft_loads_the_pruned_result(tmp_path):
    """`jpeft.fit` with `jpeft.make_train_step`, the optimizer `config.wrap_optimizer(adamw)`
    and the loss plus `config.regularizer`: the budget is met, `config.trained_config(opt_state)`
    holds the rank pattern, and what `save_peft` writes with it loads in PEFT (pruned modules)
    with jpeft's logits."""
    model, params = _base()
    config = AL.AdaLoraConfig(init_r=4, target_r=2, tinit=1, tfinal=1, total_step=5, deltaT=1, target_modules=TARGETS,
                              init_lora_weights=False)
    ad = jpeft.init(config, params, jax.random.key(0))
    ad = {p: dataclasses.replace(n, lora_A=n.lora_A * 0.1, lora_B=n.lora_B * 0.1) for p, n in ad.items()}
    ids, mask = tiny.batch(FAMILY, seed=3)

    def loss_fn(params, a, batch, key):
        loss, _ = jpeft.lm_loss(model, params, a, batch["ids"], batch["mask"], attention_mask=batch["mask"])
        return loss + config.regularizer(a)

    opt = config.wrap_optimizer(optax.adamw(1e-2))
    batches = ({"ids": jnp.asarray(ids), "mask": jnp.asarray(mask)} for _ in range(6))
    res = jpeft.fit(jpeft.make_train_step(loss_fn, opt), params, ad, jpeft.init_opt_state(opt, ad), batches,
                    key=jax.random.key(1))
    assert res.step == 6 and all(np.isfinite(h["loss"]) for h in res.history)
    trained = config.trained_config(res.opt_state)
    assert sum(map(sum, trained.rank_pattern.values())) == 2 * len(ad)
    H.save_peft(str(tmp_path), trained, res.adapter, base_model_name_or_path=tiny.hf_model(FAMILY)[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(copy.deepcopy(tiny.hf_model(FAMILY)[0]), str(tmp_path)).eval()
    for k, keep in trained.rank_pattern.items():
        assert back.base_model.model.get_submodule(k[: -len(".lora_E")]).lora_E["default"].shape == (sum(keep), 1)
    _close(_logits_jpeft(params, res.adapter, ids, mask), tiny.peft_logits(back, ids, mask), mask, atol=1e-5)



def test_export_between_two_allocations_keeps_the_triplets_the_optimizer_moved_again(tmp_path):
    """With deltaT > 1 the steps between two allocations move the E entries the last one zeroed
    (Adam's momentum; PEFT's too), while trained_config's rank_pattern (what a checkpoint of that
    step records) still drops them: save_peft wrote only the allocation's triplets, and the
    exported adapter's logits left jpeft's by 0.11 (silently). Those triplets are written too."""
    model, params = _base()
    config = AL.AdaLoraConfig(init_r=4, target_r=1, tinit=1, tfinal=2, total_step=20, deltaT=3,
                              target_modules=["q_proj", "v_proj"])
    ad = jpeft.init(config, params, jax.random.key(0))
    ad = {p: dataclasses.replace(n, lora_E=0.1 * jax.random.normal(jax.random.fold_in(jax.random.key(4), i), n.lora_E.shape))
          for i, (p, n) in enumerate(sorted(ad.items()))}  # E random too (zero at init)
    ids, mask = tiny.batch(FAMILY, seed=3)

    def loss_fn(params, a, batch, key):
        loss, _ = jpeft.lm_loss(model, params, a, batch["ids"], batch["mask"], attention_mask=batch["mask"])
        return loss + config.regularizer(a)

    opt = config.wrap_optimizer(optax.adam(5e-2))
    step = jpeft.make_train_step(loss_fn, opt, donate=False)
    a, st = ad, jpeft.init_opt_state(opt, ad)
    for s in range(1, 6):  # allocations on PEFT's deltaT grid; step 5 is between two
        a, st, _ = step(params, a, st, {"ids": jnp.asarray(ids), "mask": jnp.asarray(mask)}, jax.random.key(s))
    trained = config.trained_config(st)
    dropped_but_moving = [p for p, n in a.items()
                          if np.any(~np.asarray(trained.rank_pattern[AL.rank_key(p)]) & (np.asarray(n.lora_E) != 0))]
    assert trained.rank_pattern is not None and dropped_but_moving
    H.save_peft(str(tmp_path), trained, a)
    _, back = H.load_peft(str(tmp_path), params)
    _close(_logits_jpeft(params, back, ids, mask), _logits_jpeft(params, a, ids, mask), mask, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(tiny.hf_model(FAMILY)[0]), str(tmp_path)).eval()
    _close(_logits_jpeft(params, a, ids, mask), tiny.peft_logits(pm, ids, mask), mask, atol=1e-5)


_MESH_WORKER = r"""
import dataclasses, json, sys
import flax.linen as nn, jax, jax.numpy as jnp, numpy as np, optax
import jpeft
from jpeft.methods import adalora as AL
sys.path.insert(0, sys.argv[1])
from adalora_toy import net_problem
assert jax.device_count() == 2
config = AL.AdaLoraConfig(target_modules=["q", "v", "o"], init_r=4, target_r=2, tinit=1, tfinal=2, total_step=7, deltaT=2)
params, ad, loss_fn, batch = net_problem(config)
opt = optax.chain(optax.clip_by_global_norm(0.05), config.wrap_optimizer(optax.adamw(5e-2, weight_decay=0.01)))
one = jpeft.make_train_step(loss_fn, opt, donate=False)
a1, s1 = ad, jpeft.init_opt_state(opt, ad)
mesh = jpeft.make_mesh(data=2)
p2 = jpeft.shard_params(params, mesh)
a2 = jpeft.shard_adapter(ad, mesh, p2)
s2 = jpeft.init_opt_state(opt, a2)
two = jpeft.make_sharded_train_step(loss_fn, opt, mesh, donate=False)
diffs, same = [], []
for s in range(1, 9):
    a1, s1, _ = one(params, a1, s1, batch(s), jax.random.key(0))
    a2, s2, _ = two(p2, a2, s2, jpeft.shard_batch(batch(s), mesh), jax.random.key(0))
    diffs.append(max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a1), jax.tree.leaves(a2))))
    same.append(AL.rank_pattern(s1) == AL.rank_pattern(s2))
# the masks split over the two devices of this process (a user's own sharding): read whole, not
# the first device's half
st = [x for x in jax.tree.leaves(s2, is_leaf=lambda x: isinstance(x, AL.RankAllocatorState))
      if isinstance(x, AL.RankAllocatorState)][0]
split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
st = st._replace(keep={p: jax.device_put(k, split) for p, k in st.keep.items()})
same.append(AL.rank_pattern(st) == AL.rank_pattern(s1))
print("JSON:" + json.dumps({"diffs": diffs, "same": same, "pattern": AL.rank_pattern(s2) is not None}))
"""


def test_allocator_on_a_two_device_mesh_equals_one_device():
    """The allocator's state is sharded like the adapter (its averages) or replicated (its mask,
    count): `make_sharded_train_step` over 2 emulated devices takes the steps of one device.
    ``rank_pattern`` reads masks split over the devices whole (it read the first device's half)."""
    import subprocess

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, "-c", _MESH_WORKER, os.path.join(here, "helpers")], env=env, cwd=here, capture_output=True, text=True,
                          timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("JSON:")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    r = json.loads(lines[-1][5:])
    assert r["pattern"] and all(r["same"]) and max(r["diffs"]) < 1e-6, r


def test_forgetting_runner_trains_adalora_with_its_budget():
    """The forgetting runner refused AdaLoRA by name; its adam is now wrapped in the allocator
    (each task runs the budget schedule, as a PEFT Trainer run): the adapter ends pruned to
    target_r per module on average."""
    from jpeft.forgetting import experiment
    from jpeft.forgetting.digits import SplitDigits

    bench = SplitDigits("task", steps_per_task=4, batch_size=4, hidden=(8,), num_tasks=2)
    cfg = AL.AdaLoraConfig(init_r=4, target_r=2, tinit=1, tfinal=1, total_step=4, target_modules=["Dense_0", "Dense_1"])
    out = experiment.run_one(bench, experiment.MethodSpec("adalora", cfg, lr=1e-2), 0, log=None, keep_adapter=True)
    kept = [int((np.asarray(n.lora_E) != 0).sum()) for n in out["adapter"].values()]
    assert sum(kept) == 2 * 2 and np.isfinite(out["metrics"]["acc"])


def test_rank_pattern_reads_a_pmap_steps_replicated_state():
    """``make_pmap_train_step``'s optimizer state carries a leading device axis (equal copies):
    ``rank_pattern`` and ``trained_config`` on it raised numpy's "truth value of an array with
    more than one element is ambiguous"; they read the first copy."""
    config = AL.AdaLoraConfig(target_modules=["q", "v", "o"], init_r=4, target_r=2, tinit=0, tfinal=1, total_step=4)
    params, ad, loss_fn, batch = adalora_toy.net_problem(config)
    opt = config.wrap_optimizer(optax.adam(5e-2))
    step = jpeft.make_train_step(loss_fn, opt, donate=False)
    a, st = ad, jpeft.init_opt_state(opt, ad)
    two = jax.tree.map(lambda x: jnp.stack([x, x]), st)  # as jpeft.parallel.replicate over 2 devices
    assert AL.rank_pattern(two) is None and config.trained_config(two) is config
    a, st, _ = step(params, a, st, batch(1), jax.random.key(0))
    two = jax.tree.map(lambda x: jnp.stack([x, x]), st)
    assert AL.rank_pattern(two) == AL.rank_pattern(st) is not None
    assert config.trained_config(two) == config.trained_config(st)
