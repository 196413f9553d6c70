"""Layer-scanned models (``LlamaConfig(scan_layers=True)``) and stacked adapter sites
(``jpeft.scan``): everything must equal the unrolled model with the same weights, and the
Hugging Face interop must go through the per-layer names."""

import dataclasses
import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import _models_tiny as T  # noqa: E402

import jpeft  # noqa: E402
import jpeft.data  # noqa: E402
from jpeft import scan  # noqa: E402
from jpeft.errors import (  # noqa: E402
    ConfigError,
    LayoutError,
    ShapeMismatchError,
    TargetNotFoundError,
    UnsupportedModuleError,
)

peft = __import__("peft")  # a test dependency: missing means a broken install, not a skip
torch = __import__("torch")

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _pair(remat=False, **kw):
    cfg = jpeft.models.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                                   num_kv_heads=2, **kw)
    unrolled = jpeft.models.LlamaForCausalLM(cfg)
    scanned = jpeft.models.LlamaForCausalLM(cfg.replace(scan_layers=True, remat=remat))
    ids = jax.random.randint(jax.random.key(0), (2, 9), 0, 61)
    p0 = unrolled.init(jax.random.key(0), ids)
    p1 = {"params": scan.stack_params(p0["params"])}
    return unrolled, scanned, p0, p1, ids


def _trained_looking(adapter, seed=3):
    """Every B non-zero, as after some training steps (LoRA starts with B = 0)."""
    leaves, tree = jax.tree.flatten(adapter)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _max_diff(a, b):
    return max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_params_layout_and_conversions_round_trip():
    unrolled, scanned, p0, p1, ids = _pair()
    shapes = jax.eval_shape(scanned.init, jax.random.key(0), ids)
    assert jax.tree.structure(shapes) == jax.tree.structure(p1)
    assert p1["params"]["model"]["layers"]["self_attn"]["q_proj"]["kernel"].shape == (3, 32, 32)
    assert scan.num_stacked_layers(p1["params"]) == 3 and scan.num_stacked_layers(p0["params"]) is None
    back = scan.unstack_params(p1["params"])
    assert jax.tree.structure(back) == jax.tree.structure(p0["params"])
    assert _max_diff(back, p0["params"]) == 0.0
    abstract = scan.unstack_params(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), p1["params"]))
    assert jax.tree.map(lambda x: x.shape, abstract) == jax.tree.map(lambda x: x.shape, back)
    # consume=True (how from_pretrained stacks): fills in place and empties the per-layer input
    src = jax.tree.map(lambda x: x, back)
    src["model"] = dict(src["model"])
    consumed = scan.stack_params(src, consume=True)
    assert _max_diff(consumed, p1["params"]) == 0.0
    assert not any(k.startswith("layers_") for k in src["model"])
    buf = scan.set_layer(jnp.zeros((3, 2)), jnp.ones(2), 1)
    np.testing.assert_array_equal(buf, [[0, 0], [1, 1], [0, 0]])


SCAN_CASES = {
    "lora": jpeft.LoraConfig(r=4, alpha=8, target_modules=ALL),
    "dora": jpeft.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "down_proj"], use_dora=True),
    "ia3": jpeft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    # one of each other kind of node (the suite's time: LoHa, LoKr and lora_bias are LoRA-like sites)
    "oft": jpeft.OFTConfig(oft_block_size=4, target_modules=["q_proj", "v_proj"]),
    "vera": jpeft.VeraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"]),
    "adalora": jpeft.AdaLoraConfig(init_r=3, target_r=2, total_step=10, target_modules=["q_proj", "v_proj"]),
    "ln_tuning": jpeft.LNTuningConfig(target_modules=["input_layernorm", "post_attention_layernorm"]),
}


@pytest.mark.parametrize("method,remat", [(m, r) for m in ["lora", "dora", "ia3"] for r in (False, True)]
                         + [(m, False) for m in SCAN_CASES if m not in ("lora", "dora", "ia3")])
def test_scanned_equals_unrolled_outputs_and_gradients(method, remat):
    unrolled, scanned, p0, p1, ids = _pair(remat=remat)
    base = jax.jit(unrolled.apply)(p0, ids)  # compiled, as a user runs them: one program each
    np.testing.assert_allclose(jax.jit(scanned.apply)(p1, ids), base, atol=2e-6)
    cfg = SCAN_CASES[method]
    a1 = _trained_looking(jpeft.init(cfg, p1, jax.random.key(1), scanned, ids))
    assert all(isinstance(n, scan.Stacked) and n.length == 3 for n in a1.values())
    a0 = scan.unstack_adapter(a1)
    assert len(a0) == 3 * len(a1) and all("layers_" in p for p in a0)

    def loss(model, p):
        def f(a):
            y = jpeft.apply(model, p, a, ids)
            return jnp.mean(y ** 2), y

        return jax.jit(jax.grad(f, has_aux=True))

    g1, y1 = loss(scanned, p1)(a1)
    g0, y0 = loss(unrolled, p0)(a0)
    assert float(jnp.abs(y0 - base).max()) > 1e-2  # the adapter matters
    np.testing.assert_allclose(y1, y0, atol=2e-6)
    g1 = scan.unstack_adapter(g1)
    assert sorted(g1) == sorted(g0)
    assert _max_diff({k: g1[k] for k in g0}, g0) < 1e-6
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g0)) > 1e-4


def test_training_steps_equal_and_merge_unmerge():
    unrolled, scanned, p0, p1, ids = _pair()
    cfg = jpeft.LoraConfig(r=4, alpha=8, target_modules=ALL)
    a1 = jpeft.init(cfg, p1, jax.random.key(1), scanned, ids)
    a0 = scan.unstack_adapter(a1)
    opt = optax.adam(1e-2)

    def make(model):
        return jpeft.make_train_step(lambda p, a, b, k: jpeft.data.causal_lm_loss(
            jpeft.apply(model, p, a, b), b, jnp.ones_like(b))[0], opt)

    s0, s1 = make(unrolled), make(scanned)
    o0, o1 = opt.init(a0), opt.init(a1)
    losses = []
    for i in range(5):
        a0, o0, m0 = s0(p0, a0, o0, ids, None)
        a1, o1, m1 = s1(p1, a1, o1, ids, None)
        np.testing.assert_allclose(float(m1["loss"]), float(m0["loss"]), rtol=1e-6)
        losses.append(float(m0["loss"]))
    assert losses[-1] < losses[0] - 0.05
    u1 = scan.unstack_adapter(a1)
    assert _max_diff({k: u1[k] for k in a0}, a0) < 1e-5
    # the counts are the same adapter's
    c1, c0 = jpeft.summary(p1, a1, print_fn=None), jpeft.summary(p0, a0, print_fn=None)
    assert (c1["trainable"], c1["total"], c1["sites"]) == (c0["trainable"], c0["total"], c0["sites"])  # sites: per layer
    # merge into the stacked kernels == merge per layer; unmerge recovers the base
    m1, m0 = jpeft.merge(p1, a1), jpeft.merge(p0, a0)
    assert _max_diff(scan.unstack_params(m1["params"]), m0["params"]) < 1e-6
    np.testing.assert_allclose(scanned.apply(m1, ids), jpeft.apply(scanned, p1, a1, ids), atol=1e-5)
    assert _max_diff(jpeft.unmerge(m1, a1), p1) < 1e-6
    # and restacking the per-layer nodes gives the same adapter
    assert _max_diff(scan.stack_adapter(u1, 3), a1) == 0.0


def test_generation_with_tuple_and_stacked_caches():
    unrolled, scanned, p0, p1, ids = _pair()
    a1 = _trained_looking(jpeft.init(jpeft.LoraConfig(r=4, target_modules=ALL), p1, jax.random.key(1), scanned, ids))
    a0 = scan.unstack_adapter(a1)
    prompt = ids[:, :4]
    want = jpeft.generate(unrolled, p0, a0, prompt, max_new_tokens=6)
    got = jpeft.generate(scanned, p1, a1, prompt, max_new_tokens=6)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    cache = scanned.init_cache(2, 12)
    assert cache.keys.shape == (3, 2, 12, 2, 8)  # one stacked array
    legacy = jpeft.models.init_cache(unrolled.config, 2, 12)  # a tuple per layer also works
    _, c_stacked = jpeft.apply(scanned, p1, a1, prompt, cache=cache)
    _, c_tuple = jpeft.apply(scanned, p1, a1, prompt, cache=legacy)
    assert isinstance(c_tuple.keys, tuple) and len(c_tuple.keys) == 3
    np.testing.assert_allclose(np.asarray(c_stacked.keys), np.stack(c_tuple.keys), atol=1e-6)


def test_save_and_load_adapter_round_trip(tmp_path):
    _, scanned, _, p1, ids = _pair()
    cfg = jpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    a1 = _trained_looking(jpeft.init(cfg, p1, jax.random.key(1), scanned, ids))
    jpeft.save_adapter(tmp_path / "a", cfg, a1, params=p1)
    cfg2, back = jpeft.load_adapter(tmp_path / "a", p1, scanned, ids)
    assert cfg2 == cfg and isinstance(back["model/layers/self_attn/q_proj"], scan.Stacked)
    assert _max_diff(back, a1) == 0.0


def test_hugging_face_checkpoint_and_peft_adapter(tmp_path, caplog):
    """from_pretrained(scan_layers=True) reproduces transformers' logits; an adapter trained on
    the scanned model is written per layer, loads in peft with the same logits and loads back."""
    family = "llama3"  # GQA, tied embeddings, llama3 rope
    hf, folder = T.hf_model(family)
    model, params = jpeft.models.from_pretrained(folder, scan_layers=True)
    assert params["params"]["model"]["layers"]["mlp"]["up_proj"]["kernel"].shape[0] == 2
    ids, mask = T.batch(family, seed=5)
    pos = jnp.asarray(T.positions(mask))
    out = model.apply(params, jnp.asarray(ids), jnp.asarray(mask), position_ids=pos)
    ref = T.torch_logits(family, ids, mask)
    np.testing.assert_allclose(np.asarray(out)[mask == 1], ref[mask == 1], atol=1e-4)

    cfg = jpeft.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    small = jnp.asarray(ids[:1, :4])
    adapter = _trained_looking(jpeft.init(cfg, params, jax.random.key(2), model, small))
    jpeft.hf.save_peft(str(tmp_path), cfg, adapter, base_model_name_or_path=folder)
    from safetensors.numpy import load_file

    keys = sorted(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys and len(keys) == 2 * 3 * 2
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path))
    with torch.no_grad():
        pref = pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                  position_ids=torch.tensor(T.positions(mask))).logits.float().numpy()
    ours = np.asarray(jpeft.apply(model, params, adapter, jnp.asarray(ids), jnp.asarray(mask), position_ids=pos))
    np.testing.assert_allclose(ours[mask == 1], pref[mask == 1], atol=1e-4)
    assert np.abs(pref - ref).max() > 1e-2
    pm.unload()
    cfg2, back = jpeft.hf.load_peft(str(tmp_path), params)
    assert sorted(back) == sorted(adapter)
    assert _max_diff(back, adapter) < 1e-6
    # writing the scanned model as a Hugging Face checkpoint gives the per-layer tensors again
    jpeft.models.save_pretrained(str(tmp_path / "ckpt"), model, params)
    m2, p2 = jpeft.models.from_pretrained(str(tmp_path / "ckpt"))
    assert _max_diff(p2["params"], scan.unstack_params(params["params"])) == 0.0
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["num_hidden_layers"] == 2


def test_named_errors():
    unrolled, scanned, p0, p1, ids = _pair()
    cfg = jpeft.LoraConfig(r=2, target_modules=["q_proj"])
    with pytest.raises(LayoutError, match="scanned|stacks"):
        jpeft.init(cfg, p1, jax.random.key(0))  # 3-D kernels: the model is needed to see the layout
    a1 = jpeft.init(cfg, p1, jax.random.key(0), scanned, ids)
    with pytest.raises(TargetNotFoundError, match="layers_0"):
        jpeft.apply(unrolled, p0, a1, ids)  # stacked adapter on the unrolled model
    with pytest.raises(TargetNotFoundError):
        jpeft.apply(scanned, p1, scan.unstack_adapter(a1), ids)
    with pytest.raises(ShapeMismatchError, match="every layer"):
        u = scan.unstack_adapter(a1)
        u.pop("model/layers_1/self_attn/q_proj")
        scan.stack_adapter(u, 3)
    with pytest.raises(ConfigError, match="scan_layers"):
        jpeft.models.LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=2, num_heads=2,
                                 sliding_window=4, layer_types=("full_attention", "sliding_attention"), scan_layers=True)
    # a per-layer node would be shared by every scanned layer: refused
    bad = jpeft.init(jpeft.BottleneckConfig(target_modules=["down_proj"], reduction_factor=4), p1, jax.random.key(0))
    with pytest.raises(UnsupportedModuleError, match="scan"):
        jpeft.apply(scanned, p1, bad, ids)


def test_user_scan_without_the_adapter_collection_is_a_named_error():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return nn.tanh(nn.Dense(4, name="fc")(x)), None

    class Net(nn.Module):
        collections: tuple

        @nn.compact
        def __call__(self, x):
            axes = {c: 0 for c in self.collections}
            stack = nn.scan(Block, variable_axes=axes, split_rngs={"params": True}, length=3)(name="blocks")
            return stack(x, None)[0]

    x = jnp.ones((2, 4))
    good = Net(("params", scan.COLLECTION))
    params = good.init(jax.random.key(0), x)
    a = _trained_looking(jpeft.init(jpeft.LoraConfig(r=2, target_modules=["fc"]), params, jax.random.key(1), good, x))
    # the scanned result equals applying each layer's merged Dense in turn
    k = params["params"]["blocks"]["fc"]["kernel"]
    bias = params["params"]["blocks"]["fc"]["bias"]
    node = a["blocks/fc"]
    h = x
    for i in range(3):
        la = node.layer(i)
        h = jnp.tanh(h @ (k[i] + la.scale * la.lora_A @ la.lora_B) + bias[i][None])
    np.testing.assert_allclose(jpeft.apply(good, params, a, x), h, atol=1e-5)
    with pytest.raises(LayoutError, match=scan.COLLECTION):
        jpeft.apply(Net(("params",)), params, a, x)


def test_bf16_scanned_step_without_the_hoisted_float32_stack():
    """XLA's CPU backend upcasts bf16 matmuls; its loop-invariant code motion then converts the
    whole stacked weight array to f32 before the layer loop. compiler_options turns that pass
    off for this step: its temporaries shrink by about the f32 size of the stacked weights,
    and it computes the same thing."""
    cfg = jpeft.models.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
                                   dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, scan_layers=True, remat=True)
    model = jpeft.models.LlamaForCausalLM(cfg)
    ids = jax.random.randint(jax.random.key(0), (1, 16), 0, 64)
    params = model.init(jax.random.key(0), ids)
    a = jpeft.init(jpeft.LoraConfig(r=4, target_modules=ALL), params, jax.random.key(1), model, ids)
    opt = optax.adam(1e-3)

    def loss(p, a, b, k):
        return jpeft.data.causal_lm_loss(jpeft.apply(model, p, a, b), b, jnp.ones_like(b))[0]

    steps = {name: jpeft.make_train_step(loss, opt, donate=False, compiler_options=o) for name, o in
             [("default", None), ("no_licm", {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"})]}
    compiled = {n: s.lower(params, a, opt.init(a), ids, None).compile() for n, s in steps.items()}
    temp = {n: c.memory_analysis().temp_size_in_bytes for n, c in compiled.items()}
    stack_f32 = sum(x.size * 4 for x in jax.tree.leaves(params["params"]["model"]["layers"]))
    assert temp["default"] - temp["no_licm"] > 0.5 * stack_f32, (temp, stack_f32)
    outs = {n: s(params, a, opt.init(a), ids, None) for n, s in steps.items()}
    assert float(outs["default"][2]["loss"]) == pytest.approx(float(outs["no_licm"][2]["loss"]), rel=1e-6)
    assert _max_diff(outs["default"][0], outs["no_licm"][0]) < 1e-6


def test_sharding_specs_of_stacked_sites_follow_the_stacked_kernels():
    from jax.sharding import PartitionSpec as P

    _, scanned, _, p1, ids = _pair()
    a1 = jpeft.init(jpeft.LoraConfig(r=2, target_modules=["q_proj", "down_proj"]), p1, jax.random.key(1), scanned, ids)
    specs = jax.tree.map(lambda x: P(), p1)
    layers = specs["params"]["model"]["layers"]
    layers["self_attn"]["q_proj"]["kernel"] = P(None, "fsdp", None)  # [layers, in, out]: input dim sharded
    layers["mlp"]["down_proj"]["kernel"] = P(None, None, "fsdp")  # output dim sharded
    out = jpeft.adapter_specs(a1, specs)
    q, d = out["model/layers/self_attn/q_proj"], out["model/layers/mlp/down_proj"]
    assert isinstance(q, scan.Stacked)
    assert q.inner.lora_A == P(None, "fsdp", None) and q.inner.lora_B == P(None, None, None)
    assert d.inner.lora_A == P(None, None, None) and d.inner.lora_B == P(None, None, "fsdp")


@pytest.mark.parametrize("cfg", [jpeft.PrefixTuningConfig(num_virtual_tokens=3),
                                 jpeft.PromptTuningConfig(num_virtual_tokens=3)], ids=["prefix", "prompt"])
def test_prefix_and_prompt_tuning_act_at_the_top_and_work_on_scanned_models(cfg):
    unrolled, scanned, p0, p1, ids = _pair()
    a = _trained_looking(jpeft.init(cfg, p0, jax.random.key(1), unrolled, ids))
    y0 = jpeft.apply(unrolled, p0, a, ids)
    assert float(jnp.abs(y0 - unrolled.apply(p0, ids)).max()) > 1e-2
    np.testing.assert_allclose(jpeft.apply(scanned, p1, a, ids), y0, atol=2e-6)


def test_training_checkpoint_round_trip(tmp_path):
    _, scanned, _, p1, ids = _pair()
    cfg = jpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    a = _trained_looking(jpeft.init(cfg, p1, jax.random.key(1), scanned, ids))
    opt = optax.adam(1e-3)
    s = opt.init(a)
    m = jpeft.checkpoint.CheckpointManager(tmp_path / "ck", cfg, p1, optimizer=opt, model=scanned, example_args=(ids,))
    m.save(3, a, s, jax.random.key(0), force=True)
    m.wait()
    st = m.restore_latest()
    m.close()
    assert isinstance(st.adapter["model/layers/self_attn/q_proj"], scan.Stacked)
    assert _max_diff(st.adapter, a) == 0.0 and _max_diff(st.opt_state, s) == 0.0


def test_pissa_and_l2sp_on_stacked_sites():
    from jpeft.forgetting.regularizers import l2sp_penalty

    unrolled, scanned, p0, p1, ids = _pair()
    cfg = jpeft.LoraConfig(r=2, alpha=2, target_modules=["q_proj", "up_proj"])
    res1, ad1 = jpeft.init_pissa(cfg, p1, jax.random.key(3), scanned, ids)
    res0, ad0 = jpeft.init_pissa(cfg, p0, jax.random.key(3), unrolled, ids)
    assert isinstance(ad1["model/layers/mlp/up_proj"], scan.Stacked)
    # the start reproduces the base, and the residual equals the per-layer SVD's (sign-free)
    np.testing.assert_allclose(jpeft.apply(scanned, res1, ad1, ids), scanned.apply(p1, ids), atol=1e-5)
    assert _max_diff(scan.unstack_params(res1["params"]), res0["params"]) < 1e-5
    # L2-SP on LoRA's effective update: the same penalty stacked or per layer
    moved = _trained_looking(ad1)
    want = l2sp_penalty(p0, scan.unstack_adapter(moved), scan.unstack_adapter(ad1), strength=2.0)
    got = l2sp_penalty(p1, moved, ad1, strength=2.0)
    assert float(want) > 0
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)


def test_per_layer_options_are_refused_on_a_scanned_model():
    """A stacked site has one rank and one scale for all layers: per-layer rank/alpha patterns
    and per-layer exclusions were silently given the stacked path's setting (every layer got
    the default r / alpha, an excluded layer was adapted), so the run trained another model
    than the unrolled one with the same config. They are refused by name; patterns keyed by a
    module name without a layer index still apply to every layer."""
    unrolled, scanned, p0, p1, ids = _pair()
    layer0 = "model.layers.0.self_attn.q_proj"
    bad = [jpeft.LoraConfig(r=2, alpha=4, target_modules=["q_proj"], rank_pattern={layer0: 4}),
           jpeft.LoraConfig(r=2, alpha=4, target_modules=["q_proj"], alpha_pattern={layer0: 16}),
           jpeft.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"],
                            exclude_modules=["layers.1.self_attn.q_proj"]),
           jpeft.LoHaConfig(r=2, alpha=4, target_modules=["q_proj"], alpha_pattern={layer0: 16}),
           jpeft.LoKrConfig(r=2, alpha=4, target_modules=["q_proj"], rank_pattern={layer0: 4})]
    for cfg in bad:
        jpeft.init(cfg, p0, jax.random.key(1), unrolled, ids)  # fine layer by layer
        with pytest.raises(ConfigError, match="scan_layers=False"):
            jpeft.init(cfg, p1, jax.random.key(1), scanned, ids)
    ok = jpeft.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 4},
                          alpha_pattern={"v_proj": 16})
    a1 = jpeft.init(ok, p1, jax.random.key(1), scanned, ids)
    a0 = jpeft.init(ok, p0, jax.random.key(1), unrolled, ids)
    u1 = scan.unstack_adapter(a1)
    assert {p: (n.lora_A.shape, n.scale) for p, n in u1.items()} == {p: (n.lora_A.shape, n.scale) for p, n in a0.items()}


def test_layers_to_transform_on_a_scanned_model():
    """layers_to_transform was matched against the stacked path (``model/layers/...``, no layer
    index), so every scanned site was dropped: a list of every layer was refused, and a list of
    some layers got TargetNotFoundError's "widen those options" instead of the scan's refusal."""
    unrolled, scanned, p0, p1, ids = _pair()
    every = jpeft.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 1, 2])
    a1 = jpeft.init(every, p1, jax.random.key(1), scanned, ids)
    a0 = jpeft.init(every, p0, jax.random.key(1), unrolled, ids)
    assert {p: n.lora_A.shape for p, n in scan.unstack_adapter(a1).items()} == {p: n.lora_A.shape for p, n in a0.items()}
    for ltt in ([1], 2):
        some = jpeft.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"], layers_to_transform=ltt)
        jpeft.init(some, p0, jax.random.key(1), unrolled, ids)  # fine layer by layer
        with pytest.raises(ConfigError, match="scan_layers=False"):
            jpeft.init(some, p1, jax.random.key(1), scanned, ids)


def test_a_target_entry_naming_one_layer_on_a_scanned_model_is_refused():
    """['q_proj', 'model.layers.1.self_attn.v_proj'] adapts layer 1's v_proj on the unrolled model;
    on the scanned one the entry matched nothing and was dropped with a RuntimeWarning whose hint
    ('did you mean v_proj') would adapt every layer. It is refused by name, as layers_to_transform is."""
    import warnings

    unrolled, scanned, p0, p1, ids = _pair()
    cfg = jpeft.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "model.layers.1.self_attn.v_proj"])
    a0 = jpeft.init(cfg, p0, jax.random.key(1), unrolled, ids)
    assert "model/layers_1/self_attn/v_proj" in a0 and "model/layers_0/self_attn/v_proj" not in a0
    with pytest.raises(ConfigError, match=r"\['model.layers.1.self_attn.v_proj'\] name a module of one layer.*"
                                          r"scan_layers=False"):
        jpeft.init(cfg, p1, jax.random.key(1), scanned, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # every entry matches on the scanned model: no warning
        jpeft.init(jpeft.LoraConfig(r=2, target_modules=["q_proj", "self_attn.v_proj"]), p1, jax.random.key(1),
                   scanned, ids)
    # alone (a list of one, or the dotted name as a string) it matched nothing at all: a TargetNotFoundError whose
    # nearest path, 'model/layers/self_attn/v_proj', adapts every layer. The same named refusal
    for alone in (["model.layers.1.self_attn.v_proj"], "model.layers.1.self_attn.v_proj", ["model/layers_1/self_attn/v_proj"]):
        with pytest.raises(ConfigError, match=r"name a module of one layer.*in every layer or in none.*'v_proj'.*"
                                              r"scan_layers=False.*layers_to_transform"):
            jpeft.init(cfg.replace(target_modules=alone), p1, jax.random.key(1), scanned, ids)
    with pytest.raises(jpeft.errors.TargetNotFoundError):  # a regex is not read as one layer's name
        jpeft.init(cfg.replace(target_modules=r".*layers\.1\.self_attn\.v_proj"), p1, jax.random.key(1), scanned, ids)


def test_an_output_adapter_on_a_block_inside_the_scan_is_refused():
    """A bottleneck on a module without params of its own (the MLP block) inside the layer scan
    was one node shared by every layer (half the trainable parameters of the unrolled model's
    per-layer adapters), with no error; it is refused like one on a projection. Given the model,
    jpeft.init refuses it (the traced module sees one layer's slice of the stacked params: an exact
    test), with the message jpeft.apply gives; from the params alone it is refused at apply."""
    unrolled, scanned, p0, p1, ids = _pair()
    for target in ("mlp", "self_attn", "down_proj"):
        cfg = jpeft.BottleneckConfig(target_modules=[target], reduction_factor=4)
        with pytest.raises(UnsupportedModuleError, match=r"runs inside a layer scan \(its params are stacked over 3 "
                                                         r"layers\), but the adapter holds one BottleneckWeights"):
            jpeft.init(cfg, p1, jax.random.key(0), scanned, ids)
        if target == "down_proj":  # no model: the params alone cannot tell a stacked kernel from a 3-D one
            bad = jpeft.init(cfg, p1, jax.random.key(0))
            with pytest.raises(UnsupportedModuleError, match="runs inside a layer scan"):
                jpeft.apply(scanned, p1, bad, ids)
    # on the unrolled model, one per layer
    a0 = jpeft.init(jpeft.BottleneckConfig(target_modules=["mlp"]), p0, jax.random.key(0), unrolled, ids)
    assert sorted(a0) == ["model/layers_0/mlp", "model/layers_1/mlp", "model/layers_2/mlp"]
    jpeft.apply(unrolled, p0, a0, ids)


def test_a_bottleneck_on_an_unrolled_submodule_named_layers_is_made():
    """An unrolled model whose submodule is named ``layers`` (a reverted init-time refusal took it
    for a scan by that name) gets its bottleneck adapter, which runs."""

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(8, name="fc")(x)
            return nn.Dense(8, name="layers")(nn.Dense(8, name="proj")(h)[None])[0]

    model, x = Net(), jnp.ones((2, 3, 8))
    params = model.init(jax.random.key(0), x)
    for args in ((model, x), ()):
        a = jpeft.init(jpeft.BottleneckConfig(target_modules=["layers", "fc"], reduction_factor=4), params,
                       jax.random.key(1), *args)
        assert sorted(a) == ["fc", "layers"]
        a = jax.tree.map(lambda v: v + 0.5, a)  # every tensor random-looking (up/down biases start at zero)
        y = jpeft.apply(model, params, a, x)
        h = jpeft.apply(model, params, {"fc": a["fc"]}, x)
        assert not np.allclose(np.asarray(y), np.asarray(h))


def test_prefix_tuning_made_on_the_scanned_model_has_every_layer():
    """Prefix tuning counted the layers from the key projections' kernels, and the scanned
    model's one stacked k_proj ([layers, in, out]) counted as one layer: jpeft.init on the
    scanned model (and `jpeft train` with scan_layers) made a one-layer prefix that apply refused."""
    unrolled, scanned, p0, p1, ids = _pair()
    cfg = jpeft.PrefixTuningConfig(num_virtual_tokens=3)
    a1 = jpeft.init(cfg, p1, jax.random.key(1), scanned, ids)
    a0 = jpeft.init(cfg, p0, jax.random.key(1), unrolled, ids)
    assert (a1[""].num_layers, a1[""].token_dim) == (a0[""].num_layers, a0[""].token_dim) == (3, 16)
    a1 = _trained_looking(a1)
    np.testing.assert_allclose(jpeft.apply(scanned, p1, a1, ids), jpeft.apply(unrolled, p0, a1, ids), atol=2e-6)


def test_full_fine_tuning_converts_between_the_scanned_and_unrolled_layouts():
    """unstack_adapter kept full fine-tuning's copy of the params stacked, so a `jpeft train`
    run with scan_layers wrote a finished adapter that eval / merge / export refused."""
    unrolled, scanned, p0, p1, ids = _pair()
    a1 = _trained_looking(jpeft.init(jpeft.FullFinetuneConfig(), p1, jax.random.key(1)))
    a0 = scan.unstack_adapter(a1)
    assert _max_diff(a0[""].params, scan.unstack_params(a1[""].params)) == 0.0
    np.testing.assert_allclose(jpeft.apply(unrolled, p0, a0, ids), jpeft.apply(scanned, p1, a1, ids), atol=2e-6)
    assert _max_diff(scan.stack_adapter(a0, 3), a1) == 0.0


def test_an_adapter_of_the_other_layout_with_a_top_level_site_is_refused():
    """Only an adapter none of whose sites ran was refused: with one top-level site (the final
    norm of LN tuning, an lm_head in modules_to_save) an unrolled model's per-layer sites were
    silently left out on the scanned model (and the other way round)."""
    unrolled, scanned, p0, p1, ids = _pair()
    for cfg in (jpeft.LNTuningConfig(),
                jpeft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])):
        a0 = jpeft.init(cfg, p0, jax.random.key(1), unrolled, ids)
        a1 = jpeft.init(cfg, p1, jax.random.key(1), scanned, ids)
        with pytest.raises(TargetNotFoundError, match="unstack_adapter"):
            jpeft.apply(scanned, p1, a0, ids)
        with pytest.raises(TargetNotFoundError, match="params do not have"):
            jpeft.apply(unrolled, p0, a1, ids)
        with pytest.raises(TargetNotFoundError, match="params do not have"):
            jpeft.lm_loss(scanned, p1, a0, ids, jnp.ones_like(ids), chunk_tokens=8)
        jpeft.apply(scanned, p1, scan.stack_adapter(a0, 3), ids)  # converted, it runs


def test_remat_policies_that_need_arguments_are_refused_by_name():
    """remat_policy accepted any jax.checkpoint_policies attribute, and the policy factories
    (save_only_these_names, ...) then failed inside JAX's tracing with a TypeError."""
    for name in ("save_only_these_names", "offload_dot_with_no_batch_dims", "save_from_both_policies"):
        with pytest.raises(ConfigError, match="remat_policy"):
            jpeft.models.LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=2, num_heads=2,
                                     remat=True, remat_policy=name)
    for name in ("dots_saveable", "nothing_saveable", "checkpoint_dots"):
        jpeft.models.LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=2, num_heads=2,
                                 remat=True, remat_policy=name)
    # "full", jpeft.remat_policy's name for keeping only each layer's input, is the config's too (it was refused):
    # the same loss and gradient as no remat
    cfg = jpeft.models.LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2)
    ids = jnp.array([[1, 2, 3, 4]])
    params = jpeft.models.LlamaForCausalLM(cfg).init(jax.random.key(0), ids)

    def loss(c):
        m = jpeft.models.LlamaForCausalLM(c)
        return jax.jit(jax.value_and_grad(lambda p: jnp.sum(m.apply(p, ids) ** 2)))(params)

    (l0, g0), (l1, g1) = loss(cfg), loss(cfg.replace(remat=True, remat_policy="full"))
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    assert _max_diff(g1, g0) < 1e-4



def test_a_module_named_like_a_layer_beside_the_scan_is_refused_when_unstacking(tmp_path):
    """A linen model with a scanned ``layers`` and a block named ``layers_0`` beside it: unstacking
    (what save_peft does first) put the scan's layer 0 and that block at one path, and the PEFT
    file held the block's factors as layer 0's (the scan's layer 0 dropped, silently)."""

    class Layer(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return x + nn.Dense(4, name="fc")(x), None

    class Net(nn.Module):
        extra: str = "block"

        @nn.compact
        def __call__(self, x):
            x, _ = nn.scan(Layer, variable_axes={"params": 0, scan.COLLECTION: 0}, split_rngs={"params": True},
                           length=2)(name="layers")(x, None)
            if self.extra == "block":  # its fc is layers_0/fc, the unstacked layer 0's path
                return Layer(name="layers_0")(x, None)[0]
            return nn.Dense(4, name="layers_0")(x)  # layers_0 itself: no path of a layer's

    x = jnp.ones((2, 4))
    for extra, targets in (("dense", ["fc", "layers_0"]), ("block", ["fc"])):
        model = Net(extra)
        params = model.init(jax.random.key(0), x)
        cfg = jpeft.LoraConfig(r=2, target_modules=targets)
        adapter = jpeft.init(cfg, params, jax.random.key(1), model, x)
        assert sorted(adapter) == ["layers/fc", "layers_0" if extra == "dense" else "layers_0/fc"]
        if extra == "dense":  # nothing shared: unstacked and saved
            assert sorted(scan.unstack_adapter(adapter)) == ["layers_0", "layers_0/fc", "layers_1/fc"]
            jpeft.hf.save_peft(str(tmp_path / extra), cfg, adapter)
            continue
        with pytest.raises(ConfigError, match="both unstack to 'layers_0/fc'"):
            scan.unstack_adapter(adapter)
        with pytest.raises(ConfigError, match="both unstack to 'layers_0/fc'"):
            jpeft.hf.save_peft(str(tmp_path / extra), cfg, adapter)
        assert not (tmp_path / extra).exists()


def test_peft_files_of_an_unrolled_module_named_layers_load_back(tmp_path):
    """A plain ``nn.Dense(16, name="layers")`` (kernel [8, 16], bias [16]) was taken for a scan
    of 8 layers: the PEFT file jpeft wrote for its LoRA was a BaseMismatchError on load."""

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(16, name="layers")(nn.Dense(8, name="fc")(x))

    model, x = Net(), jnp.ones((2, 8))
    params = model.init(jax.random.key(0), x)
    assert scan.num_stacked_layers(params["params"]) is None
    cfg = jpeft.LoraConfig(r=2, target_modules=["fc", "layers"])
    adapter = _trained_looking(jpeft.init(cfg, params, jax.random.key(1), model, x))
    jpeft.hf.save_peft(str(tmp_path / "a"), cfg, adapter)
    _, loaded = jpeft.hf.load_peft(str(tmp_path / "a"), params)
    assert sorted(loaded) == ["fc", "layers"]
    np.testing.assert_allclose(jpeft.apply(model, params, loaded, x), jpeft.apply(model, params, adapter, x), atol=1e-6)


def test_qwen3_scanned_equals_unrolled_with_its_q_and_k_norms():
    """The tiny Qwen3 (per-head q_norm/k_norm with random weights, head_dim 16 != 32 / 4) loaded
    layer-scanned gives transformers' logits, and with a LoRA on q/k/v/o plus LN tuning of the
    q/k norms (random, stacked) the unrolled model's logits."""
    family = "qwen3"
    _, folder = T.hf_model(family)
    unrolled, p0 = jpeft.models.from_pretrained(folder)
    scanned, p1 = jpeft.models.from_pretrained(folder, scan_layers=True)
    assert p1["params"]["model"]["layers"]["self_attn"]["q_norm"]["scale"].shape == (2, 16)
    ids, mask = T.batch(family, seed=5)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    sel = np.asarray(mask) == 1
    ref = T.torch_logits(family, np.asarray(ids), np.asarray(mask))
    fwd = jax.jit(jpeft.apply, static_argnums=0)
    np.testing.assert_allclose(np.asarray(fwd(scanned, p1, {}, ids, mask))[sel], ref[sel], atol=1e-4)
    a0 = {}
    for cfg in (jpeft.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
                jpeft.LNTuningConfig(target_modules=["q_norm", "k_norm"])):
        a0.update(_trained_looking(jpeft.init(cfg, p0, jax.random.key(1))))
    assert {p for p in a0 if p.endswith("_norm")} == {f"model/layers_{i}/self_attn/{n}" for i in (0, 1)
                                                      for n in ("q_norm", "k_norm")}
    a1 = scan.stack_adapter(a0, 2)
    y1, y0 = fwd(scanned, p1, a1, ids, mask), fwd(unrolled, p0, a0, ids, mask)
    assert float(np.abs(np.asarray(y0) - ref)[sel].max()) > 1e-2  # the adapter matters
    np.testing.assert_allclose(np.asarray(y1)[sel], np.asarray(y0)[sel], atol=2e-5)


@pytest.mark.parametrize("saved", [["input_layernorm"], ["mlp"]])
def test_modules_to_save_inside_the_scan_run_and_merge_per_layer(saved):
    """A modules_to_save module inside the scan (a layer's norm, its MLP): jpeft.init on the scanned
    model made one unstacked copy, which the first apply refused (UnsupportedModuleError "which
    every layer would share"), and the stacked copy a PEFT file loads as (scan.stack_adapter, what
    load_peft does on a scanned base) ran, but jpeft.merge refused it ("the saved copy ... has
    parameters (3, 32), the model's module has (32,). Was the adapter made for another model?").
    Both now run and merge per layer, equal to the unrolled model's."""
    unrolled, scanned, p0, p1, ids = _pair()
    cfg = jpeft.LoraConfig(r=2, alpha=4, target_modules=["q_proj"], modules_to_save=saved)
    a0 = _trained_looking(jpeft.init(cfg, p0, jax.random.key(1), unrolled, ids))
    ref = jpeft.apply(unrolled, p0, a0, ids)
    assert float(jnp.abs(ref - unrolled.apply(p0, ids)).max()) > 1e-2  # the copies matter
    a1 = _trained_looking(jpeft.init(cfg, p1, jax.random.key(1), scanned, ids))
    assert all(isinstance(n, scan.Stacked) and n.length == 3 for n in a1.values())
    assert jax.tree.structure(a1) == jax.tree.structure(scan.stack_adapter(a0, 3))
    for a in (a1, scan.stack_adapter(a0, 3)):
        own = jpeft.apply(unrolled, p0, scan.unstack_adapter(a), ids)
        np.testing.assert_allclose(jpeft.apply(scanned, p1, a, ids), own, atol=2e-6)
        np.testing.assert_allclose(scanned.apply(jpeft.merge(p1, a), ids), own, atol=2e-6)
    np.testing.assert_allclose(scanned.apply(jpeft.merge(p1, scan.stack_adapter(a0, 3)), ids), ref, atol=2e-6)


def test_mica_scanned_equals_unrolled_and_keeps_b_frozen(tmp_path):
    """MiCA (lora_B the minor left singular vectors, frozen) on a layer-scanned model: the init equals the unrolled
    model's layer by layer; with every tensor random, outputs and the gradients of A equal the unrolled model's, B
    gets none; an AdamW step (weight decay) moves A as on the unrolled model and leaves B bit-identical; the
    adapter saves and loads stacked, B still frozen."""
    unrolled, scanned, p0, p1, ids = _pair()
    cfg = jpeft.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_weights="mica")
    a1 = jpeft.init(cfg, p1, jax.random.key(1), scanned, ids)
    ref = jpeft.init(cfg, p0, jax.random.key(1), unrolled, ids)
    assert all(isinstance(n, scan.Stacked) and n.inner.frozen_b for n in a1.values())
    u1 = scan.unstack_adapter(a1)
    assert sorted(u1) == sorted(ref)
    for p, n in ref.items():  # per layer: the same zero A and (up to each vector's sign) the same minor B
        np.testing.assert_array_equal(u1[p].lora_A, n.lora_A)
        got, want = np.asarray(u1[p].lora_B), np.asarray(n.lora_B)
        np.testing.assert_allclose(got * np.sign(np.sum(got * want, axis=1, keepdims=True)), want, atol=1e-5)
    keys = iter(jax.random.split(jax.random.key(5), len(a1)))  # every tensor random: A (trainable), then B
    a1 = {p: dataclasses.replace(n, inner=dataclasses.replace(n.inner, lora_B=0.3 * jax.random.normal(
              next(keys), n.inner.lora_B.shape))) for p, n in T.randomize_adapter(a1, 4, 0.3).items()}
    a0 = scan.unstack_adapter(a1)
    assert all(n.frozen_b for n in a0.values())

    def grads(model, p, a):
        t, f = jpeft.split_frozen(a)

        def loss(t):
            y = jpeft.apply(model, p, jpeft.join_frozen(t, f), ids)
            return jnp.mean(y ** 2), y

        return jax.jit(jax.grad(loss, has_aux=True))(t)

    g1, y1 = grads(scanned, p1, a1)
    g0, y0 = grads(unrolled, p0, a0)
    assert float(jnp.abs(y0 - unrolled.apply(p0, ids)).max()) > 1e-2  # the adapter matters
    np.testing.assert_allclose(y1, y0, atol=2e-6)
    g1 = scan.unstack_adapter(g1)
    assert all(g.lora_B is None for g in list(g1.values()) + list(g0.values()))  # no gradient for B
    assert _max_diff({k: g1[k] for k in g0}, g0) < 1e-6
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g0)) > 1e-4

    opt = optax.adamw(1e-2, weight_decay=0.1)

    def step(model, p, a):
        s = jpeft.make_train_step(lambda p, a, b, k: jnp.mean(jpeft.apply(model, p, a, b) ** 2), opt, donate=False)
        return s(p, a, jpeft.init_opt_state(opt, a), ids, None)[0]

    n1, n0 = scan.unstack_adapter(step(scanned, p1, a1)), step(unrolled, p0, a0)
    for p in a0:
        np.testing.assert_array_equal(n1[p].lora_B, a0[p].lora_B)
        np.testing.assert_array_equal(n0[p].lora_B, a0[p].lora_B)
        np.testing.assert_allclose(n1[p].lora_A, n0[p].lora_A, atol=1e-6)
    assert max(float(jnp.abs(n0[p].lora_A - a0[p].lora_A).max()) for p in a0) > 1e-3  # the step moved A

    jpeft.save_adapter(tmp_path / "a", cfg, a1, params=p1)
    cfg2, back = jpeft.load_adapter(tmp_path / "a", p1, scanned, ids)
    assert cfg2.init_weights == "mica" and all(isinstance(n, scan.Stacked) and n.inner.frozen_b for n in back.values())
    assert jax.tree.structure(back) == jax.tree.structure(a1) and _max_diff(back, a1) == 0.0
