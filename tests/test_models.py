"""jpeft.models against transformers: logits of every family on a padded batch, loading
(sharded, bf16), the KV cache, key/value prefixes, remat, and every bad checkpoint."""

import copy
import functools
import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import _models_tiny as T  # noqa: E402

import jpeft  # noqa: E402
from jpeft import models as M  # noqa: E402
from jpeft.errors import (  # noqa: E402
    CheckpointError,
    InputValidationError,
    LoadError,
    UnsafeFileError,
    UnsupportedModelError,
    WeightShapeError,
)


@functools.lru_cache(maxsize=None)
def loaded(family, dtype_name="float32"):
    _, folder = T.hf_model(family)
    return M.from_pretrained(folder, dtype=jnp.dtype(dtype_name))


@pytest.mark.parametrize("family", T.FAMILIES)
def test_logits_equal_transformers_with_padding(family):
    ids, mask = T.batch(family)
    ref = T.torch_logits(family, ids, mask)
    model, params = loaded(family)
    out = np.asarray(jax.jit(model.apply)(params, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    assert out.shape == ref.shape
    if family == "bert":
        np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
    else:  # padded query positions are garbage in both libraries; compare the real tokens
        sel = mask.astype(bool)
        np.testing.assert_allclose(out[sel], ref[sel], atol=1e-4, rtol=0)
    assert np.abs(ref).max() > 0.5  # the random model is far from trivial


@pytest.mark.parametrize("family", ["llama2", "gpt2"])
def test_a_mask_of_other_nonzero_values_reads_as_ones(family):
    """transformers reads any nonzero attention_mask value as a real token (mask.bool()); the
    default positions counted cumsum(mask) - 1 of the raw values, so a mask of 2s, 0.5s or
    document numbers (1, 1, 2, 2) moved every position (logits off by 0.8-2.7)."""
    ids, mask = T.batch(family)
    model, params = loaded(family)
    want = np.asarray(model.apply(params, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    for other in (2 * mask, 0.5 * mask, mask.astype(bool), mask * np.arange(1, 9) // 4 + mask):
        got = np.asarray(model.apply(params, jnp.asarray(ids), attention_mask=jnp.asarray(other)))
        sel = mask.astype(bool)
        np.testing.assert_allclose(got[sel], want[sel], atol=1e-5, rtol=0)


def test_config_fields_and_names():
    model, params = loaded("llama3")
    c = model.config
    assert (c.vocab_size, c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (100, 32, 2, 4, 2, 8)
    assert c.max_position_embeddings == 128 and c.tie_word_embeddings and dict(c.rope_scaling)["rope_type"] == "llama3"
    assert "lm_head" not in params["params"]  # tied
    paths = set(jpeft.tree.module_leaves(params["params"]))
    assert "model/layers_0/self_attn/q_proj" in paths and "model/layers_1/mlp/gate_proj" in paths
    g, gp = loaded("gpt2")
    assert "transformer/h_0/attn/c_attn" in jpeft.tree.module_leaves(gp["params"])
    assert jpeft.tree.hf_name("transformer/h_0/ln_1") == "transformer.h.0.ln_1"
    b, bp = loaded("bert")
    assert "bert/encoder/layer_0/attention/self/query" in jpeft.tree.module_leaves(bp["params"])
    assert bp["params"]["classifier"]["kernel"].shape == (32, 3)
    q, qp = loaded("qwen2")
    assert "bias" in qp["params"]["model"]["layers_0"]["self_attn"]["q_proj"]
    assert "bias" not in qp["params"]["model"]["layers_0"]["self_attn"]["o_proj"]


def test_gpt2_conv1d_weights_are_not_transposed():
    hf, _ = T.hf_model("gpt2")
    _, params = loaded("gpt2")
    w = hf.transformer.h[0].attn.c_attn.weight.detach().numpy()  # Conv1D: [in, out]
    np.testing.assert_array_equal(np.asarray(params["params"]["transformer"]["h_0"]["attn"]["c_attn"]["kernel"]), w)
    hl, _ = T.hf_model("llama2")
    _, lp = loaded("llama2")
    wq = hl.model.layers[0].self_attn.q_proj.weight.detach().numpy()  # Linear: [out, in]
    np.testing.assert_array_equal(np.asarray(lp["params"]["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]), wq.T)


def test_hf_target_modules_select_the_same_modules():
    model, params = loaded("llama2")
    cfg = jpeft.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"], init_weights="random")
    adapter = jpeft.init(cfg, params, jax.random.key(0))
    assert sorted(adapter) == [f"model/layers_{i}/self_attn/{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    regex = jpeft.LoraConfig(r=2, target_modules=r".*\.layers\.1\.mlp\.(up|down)_proj")
    assert sorted(jpeft.init(regex, params, jax.random.key(0))) == ["model/layers_1/mlp/down_proj", "model/layers_1/mlp/up_proj"]
    ids, mask = T.batch("llama2")
    out = jpeft.apply(model, params, adapter, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    merged = model.apply(jpeft.merge(params, adapter), jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(out), np.asarray(merged), atol=1e-4)
    base = model.apply(params, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    assert np.abs(np.asarray(out) - np.asarray(base)).max() > 1e-2


def test_sharded_checkpoint_loads(tmp_path):
    hf, _ = T.hf_model("llama2")
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    model, params = M.from_pretrained(str(tmp_path))
    _, ref_params = loaded("llama2")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, ref_params)


def test_bf16_loading(tmp_path):
    import torch

    ids, mask = T.batch("llama2")
    ref = T.torch_logits("llama2", ids, mask)
    model, params = loaded("llama2", "bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params)) and model.config.dtype == jnp.bfloat16
    out = np.asarray(model.apply(params, jnp.asarray(ids), attention_mask=jnp.asarray(mask))).astype(np.float32)
    sel = mask.astype(bool)
    err = np.abs(out[sel] - ref[sel])
    assert err.max() < 0.25 and err.mean() < 0.05  # bf16 has ~3 significant digits
    # A checkpoint stored in bf16 loads exactly into f32 parameters.
    hf, _ = T.hf_model("gpt2")
    import copy

    copy.deepcopy(hf).to(torch.bfloat16).save_pretrained(tmp_path)
    _, p16 = M.from_pretrained(str(tmp_path), dtype=jnp.float32)
    w = hf.transformer.wte.weight.detach().to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(np.asarray(p16["params"]["transformer"]["wte"]["embedding"]), w)


@pytest.mark.parametrize("family", ["llama2", "bert"])
def test_float16_models_compile_and_match_transformers(family):
    """A float16 model under jax.jit (every training step, generate, eval) failed to compile on
    the CPU with a raw ValueError ("The precision 'F16_F16_F32' is not supported by dot_general
    on CPU") from jax.nn.dot_product_attention's dot algorithm, for every sequence short enough
    for the reference kernel; only eager calls ran."""
    ids, mask = T.batch(family)
    ref = T.torch_logits(family, ids, mask)
    model, params = loaded(family, "float16")
    ids, mask_j = jnp.asarray(ids), jnp.asarray(mask)
    out = jax.jit(model.apply)(params, ids, attention_mask=mask_j)
    assert out.dtype == jnp.float16
    sel = mask.astype(bool) if family != "bert" else slice(None)
    err = np.abs(np.asarray(out, np.float32)[sel] - ref[sel])
    assert err.max() < 0.02 * ref[sel].std()  # float16 rounding (seen: 0.006 of the spread)
    grad = jax.jit(jax.grad(lambda p: model.apply(p, ids, attention_mask=mask_j).astype(jnp.float32).sum()))(params)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grad))


def test_a_dtype_that_is_not_a_float_compute_dtype_is_refused_by_name():
    """from_pretrained(dtype="int8") failed inside flax's initializer with a bare ValueError
    ("dtype argument to `normal` must be a float"), and a misspelt dtype ("bf16") was reported as
    "config.json holds an invalid value ... re-save the checkpoint", blaming the file."""
    from jpeft.errors import ConfigError

    _, folder = T.hf_model("llama2")
    with pytest.raises(ConfigError, match=r"LlamaConfig.dtype .*must be a floating dtype.*found 'int8'.*quantize='int8'"):
        M.from_pretrained(folder, dtype="int8")
    with pytest.raises(ConfigError, match=r"LlamaConfig.param_dtype must be a floating dtype.*found <class 'jax.numpy.int8'>"):
        M.from_pretrained(folder, param_dtype=jnp.int8)
    with pytest.raises(ConfigError, match=r"LlamaConfig.dtype .*float32, bfloat16, float16, float64.*found 'bf16'"):
        M.from_pretrained(folder, dtype="bf16")
    with pytest.raises(ConfigError, match=r"GPT2Config.dtype .*found 'float8_e4m3fn'"):  # storage only, not compute
        M.from_pretrained(T.hf_model("gpt2")[1], dtype="float8_e4m3fn")
    assert M.from_pretrained(folder, dtype="float16")[0].config.dtype == jnp.float16  # names work as dtypes do


def test_kv_cache_chunks_equal_full_forward():
    model, params = loaded("mistral")  # sliding window 5 over 8 tokens
    ids, mask = T.batch("mistral")
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    full = model.apply(params, ids, attention_mask=mask)
    cache = model.init_cache(3, 8)
    a, cache = model.apply(params, ids[:, :5], attention_mask=mask[:, :5], cache=cache)
    b, cache = model.apply(params, ids[:, 5:], attention_mask=mask[:, 5:], cache=cache)
    got = np.concatenate([np.asarray(a), np.asarray(b)], axis=1)
    sel = np.asarray(mask).astype(bool)
    np.testing.assert_allclose(got[sel], np.asarray(full)[sel], atol=1e-5)
    assert int(cache.index) == 8 and np.array_equal(np.asarray(cache.mask), sel)


@pytest.mark.parametrize("family", ["llama3", "gpt2"])
def test_prefix_kv_is_attended_like_earlier_tokens(family):
    """Keys/values of the first tokens given as prefix_kv reproduce the full-sequence logits
    of the remaining tokens (the prefix is always attended and never masked)."""
    model, params = loaded(family)
    ids = jnp.asarray(T.batch(family)[0][:1])  # one unpadded row of 8
    full = model.apply(params, ids)
    _, cache = model.apply(params, ids[:, :3], cache=model.init_cache(1, 3))
    prefix = [(k, v) for k, v in zip(cache.keys, cache.values)]
    rest = model.apply(params, ids[:, 3:], prefix_kv=prefix, position_ids=jnp.arange(3, 8)[None])
    np.testing.assert_allclose(np.asarray(rest), np.asarray(full[:, 3:]), atol=1e-5)


def test_prefix_kv_reaches_the_attention_module_as_a_keyword():
    model, params = loaded("llama2")
    seen = []

    def spy(next_fun, args, kwargs, ctx):
        if type(ctx.module).__name__ == "LlamaAttention":
            seen.append(("prefix_kv" in kwargs, ctx.module.path))
        return next_fun(*args, **kwargs)

    import flax.linen as nn

    with nn.intercept_methods(spy):
        model.apply(params, jnp.ones((1, 3), jnp.int32))
    assert seen == [(True, ("model", "layers_0", "self_attn")), (True, ("model", "layers_1", "self_attn"))]


def test_inputs_embeds_equal_input_ids():
    model, params = loaded("qwen2")
    ids, mask = (jnp.asarray(x) for x in T.batch("qwen2"))
    emb = params["params"]["model"]["embed_tokens"]["embedding"][ids]
    np.testing.assert_allclose(
        np.asarray(model.apply(params, inputs_embeds=emb, attention_mask=mask)),
        np.asarray(model.apply(params, ids, attention_mask=mask)), atol=1e-6,
    )
    with pytest.raises(InputValidationError, match="either input_ids or inputs_embeds"):
        model.apply(params, ids, inputs_embeds=emb)
    with pytest.raises(InputValidationError, match=r"attention_mask must have the shape"):
        model.apply(params, ids, attention_mask=mask[:, :3])


def test_remat_gives_the_same_values_and_gradients():
    model, params = loaded("llama2")
    rmodel = M.LlamaForCausalLM(model.config.replace(remat=True, remat_policy="nothing_saveable"))
    ids = jnp.asarray(T.batch("llama2")[0])
    cfg = jpeft.LoraConfig(r=2, target_modules=["q_proj", "down_proj"], init_weights="random")
    adapter = jpeft.init(cfg, params, jax.random.key(1))

    def loss(m):
        return lambda a: jnp.mean(jpeft.apply(m, params, a, ids) ** 2)

    v1, g1 = jax.value_and_grad(loss(model))(adapter)
    v2, g2 = jax.value_and_grad(loss(rmodel))(adapter)
    np.testing.assert_allclose(float(v1), float(v2), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6), g1, g2)
    with pytest.raises(jpeft.ConfigError, match="jax.checkpoint_policies"):
        model.config.replace(remat=True, remat_policy="no_such_policy")


def test_tiny_model_from_config_without_files():
    cfg = M.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    model = M.LlamaForCausalLM(cfg)
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    assert jpeft.tree.count(params) == 256 * 32 + 2 * (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64 + 2 * 32) + 32
    assert model.apply(params, jnp.zeros((2, 5), jnp.int32)).shape == (2, 5, 256)
    with pytest.raises(jpeft.ConfigError, match="multiple of num_kv_heads"):
        M.LlamaConfig(num_heads=4, num_kv_heads=3, hidden_size=32)
    with pytest.raises(UnsupportedModelError, match="rope_type 'proportional'"):
        M.LlamaConfig(hidden_size=32, num_heads=4, rope_scaling={"rope_type": "proportional", "factor": 2.0})


# -- the Dense product over flattened tokens ----------------------------------------------------------

def test_flat_dot_general_equals_dot_general_values_and_gradients():
    """jpeft's Dense product flattens the token axes of a ``[..., in] x [in, out]`` contraction
    (same numbers, forward and backward) and passes every other contraction through unchanged."""
    from jax import lax

    from jpeft._ops import flat_dot_general

    rng = np.random.default_rng(0)
    r = lambda *s: jnp.asarray(rng.normal(size=s).astype(np.float32))  # noqa: E731
    cases = [
        (r(2, 3, 5), r(5, 4), (((2,), (0,)), ((), ()))),          # [batch, seq, in]: flattened
        (r(2, 3, 2, 5), r(5, 4), (((3,), (0,)), ((), ()))),       # more leading axes: flattened
        (r(3, 5), r(5, 4), (((1,), (0,)), ((), ()))),             # already 2-D
        (r(5, 3), r(5, 4), (((0,), (0,)), ((), ()))),             # another contraction: passed through
        (r(2, 3, 5), r(2, 5, 4), (((2,), (1,)), ((0,), (0,)))),   # batch dims: passed through
        (r(2, 3, 512), r(512, 2048), (((2,), (0,)), ((), ()))),   # a wide weight: its gradient from a copy of x^T
        (r(6, 512), r(512, 2048), (((1,), (0,)), ((), ()))),      # the same, already 2-D
    ]
    for x, w, dims in cases:
        ref = lambda x, w: lax.dot_general(x, w, dims, precision=lax.Precision.HIGHEST)  # noqa: E731,B023
        got = lambda x, w: flat_dot_general(x, w, dims, precision=lax.Precision.HIGHEST)  # noqa: E731,B023
        np.testing.assert_allclose(got(x, w), ref(x, w), rtol=1e-6, atol=1e-6)
        assert got(x, w).shape == ref(x, w).shape
        g = r(*ref(x, w).shape)
        _, vjp_ref = jax.vjp(ref, x, w)
        _, vjp_got = jax.vjp(got, x, w)
        for a, b in zip(vjp_got(g), vjp_ref(g)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        # forward mode, and forward over reverse (a Hessian-vector product), work and agree
        tx, tw = r(*x.shape), r(*w.shape)
        np.testing.assert_allclose(jax.jvp(got, (x, w), (tx, tw))[1], jax.jvp(ref, (x, w), (tx, tw))[1],
                                   rtol=1e-5, atol=1e-4)
        hvp = lambda f: jax.jvp(jax.grad(lambda w: jnp.sum(jnp.tanh(f(x, w)) * g)), (w,), (tw,))[1]  # noqa: E731,B023
        np.testing.assert_allclose(hvp(got), hvp(ref), rtol=1e-4, atol=1e-4)


def test_wide_weight_gradient_multiplies_a_transposed_copy_of_the_input():
    """On the CPU, a weight gradient ``x^T dy`` at least 2,048 features wide is computed from a
    copy of ``x^T`` as a row-major product (XLA's CPU backend runs the product with ``x`` as it
    is, column-major, at about half the speed; docs/BENCHMARKS.md, session 31). The compiled
    gradient shows it; a frozen weight's program has no such copy; a Llama whose output layer is
    that wide (tied or not) gets the same gradients either way. Statistics of the compiled
    program and a comparison of numbers, not timings."""
    import re

    from jpeft import _ops

    if jax.default_backend() != "cpu":
        pytest.skip("the transposed copy is made on the CPU only")
    x = jnp.ones((8, 512), jnp.float32)
    w = jnp.ones((512, 2048), jnp.float32)

    def wgrad_dot(argnums):
        f = lambda x, w: jnp.sum(jnp.tanh(_ops.flat_dot_general(x, w, (((1,), (0,)), ((), ())))))  # noqa: E731
        hlo = jax.jit(jax.grad(f, argnums=argnums)).lower(x, w).compile().as_text()
        return hlo, re.findall(r"= f32\[512,2048\]\{1,0\} dot\([^)]*\), lhs_contracting_dims=\{(\d)\}", hlo)

    hlo, dots = wgrad_dot((0, 1))
    assert dots == ["1"], dots  # x^T [512, 8] (a real array) @ dy [8, 2048]
    assert re.search(r"= f32\[512,8\]\{1,0\} (?:fusion|copy|transpose)\(", hlo)
    hlo, dots = wgrad_dot(0)  # the weight frozen: no weight gradient, no copy
    assert not dots and not re.search(r"= f32\[512,8\]\{1,0\} (?:fusion|copy|transpose)\(", hlo)

    for tied in (False, True):
        cfg = M.LlamaConfig(vocab_size=2048, hidden_size=512, intermediate_size=64, num_layers=1, num_heads=8,
                            num_kv_heads=8, max_position_embeddings=16, tie_word_embeddings=tied)
        model = M.LlamaForCausalLM(cfg)
        ids = jnp.asarray(np.random.default_rng(1).integers(0, 2048, (2, 4)), jnp.int32)
        params = model.init(jax.random.key(0), ids)
        loss = lambda p: jnp.mean(jax.nn.log_softmax(model.apply(p, ids)) ** 2)  # noqa: E731,B023
        got = jax.jit(jax.grad(loss))(params)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(_ops, "_WIDE_OUT", 1 << 30)  # the plain product (a new jit: traced again)
            want = jax.jit(jax.grad(loss))(params)
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7 * float(jnp.max(jnp.abs(b))), err_msg=str(path))


@pytest.mark.parametrize("tied", [False, True])
def test_weight_gradients_need_no_transposed_copy_of_activations(tied):
    """Full fine-tuning of a jpeft Llama: the weight gradients ``x^T dy`` contract the tokens of
    the activations as XLA holds them. With the 3-D product (batch and sequence both contracted)
    XLA's CPU backend wrote a transposed ``[features, tokens]`` copy of each layer's output
    gradient first (11 in this tiny model; ~23 % of the step of the benchmark's Llama); the
    compiled gradient must contain none, also for the logits of a tied embedding (``attend``).
    A statistic of the compiled program, not a timing."""
    import re

    cfg = M.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                        num_kv_heads=2, max_position_embeddings=64, tie_word_embeddings=tied)
    model = M.LlamaForCausalLM(cfg)
    ids = jnp.zeros((4, 24), jnp.int32)  # 96 tokens
    params = model.init(jax.random.key(0), ids)
    hlo = jax.jit(jax.grad(lambda p: jnp.mean(model.apply(p, ids) ** 2))).lower(params).compile().as_text()
    transposed = re.findall(r"= f32\[(?:32|48|64),96\]\{1,0\} (?:fusion|copy|transpose)\(", hlo)
    assert not transposed, transposed
    # LoRA's merged form still applies to jpeft's Dense layers (it computes its own product)
    a = jpeft.init(jpeft.LoraConfig(r=2, target_modules=["q_proj", "up_proj"]), params, jax.random.key(1))
    assert "name=_merged_matmul" in str(jax.make_jaxpr(lambda a: jpeft.apply(model, params, a, ids))(a))


# -- bad checkpoints -------------------------------------------------------------------------------

def _copy(family, tmp_path):
    _, folder = T.hf_model(family)
    dst = tmp_path / family
    shutil.copytree(folder, dst)
    return dst


def test_missing_folder_config_and_weights(tmp_path):
    with pytest.raises(LoadError, match="is not a folder"):
        M.from_pretrained(str(tmp_path / "nope"))
    d = _copy("llama2", tmp_path)
    os.remove(d / "config.json")
    with pytest.raises(LoadError, match="has no config.json"):
        M.from_pretrained(str(d))
    d2 = _copy("gpt2", tmp_path)
    os.remove(d2 / "model.safetensors")
    with pytest.raises(LoadError, match="no weights: expected model.safetensors"):
        M.from_pretrained(str(d2))
    (d2 / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(UnsafeFileError, match="only pickle weights"):
        M.from_pretrained(str(d2))


def test_config_fields_read_as_transformers_reads_them():
    """Defaults and overrides transformers applies to config.json: Mistral / Qwen2 without a
    sliding_window key take 4096 (an explicit null: none); a Mistral config with layer_types
    (Ministral) windows per layer; llama3 rope takes a top-level original_max_position_embeddings
    over the one in rope_parameters (and max_position_embeddings when neither is given);
    the attention dropout rates of every family are read (and written back by save_pretrained)."""
    import warnings as W

    from jpeft.models.loading import config_from_hf

    base = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)
    assert config_from_hf(dict(base, model_type="mistral")).sliding_window == 4096
    assert config_from_hf(dict(base, model_type="mistral", sliding_window=None)).sliding_window is None
    c = config_from_hf(dict(base, model_type="mistral", sliding_window=8,
                            layer_types=["sliding_attention", "full_attention"]))
    assert c.sliding_window == 8 and c.layer_types == ("sliding_attention", "full_attention")
    qwen = config_from_hf(dict(base, model_type="qwen2", use_sliding_window=True, max_window_layers=1))
    assert qwen.sliding_window == 4096
    assert config_from_hf(dict(base, model_type="qwen2")).sliding_window is None
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16, "rope_theta": 10000.0}
    c = config_from_hf(dict(base, model_type="llama", rope_parameters=rope, original_max_position_embeddings=32))
    assert c.rope_scaling_dict["original_max_position_embeddings"] == 32
    c = config_from_hf(dict(base, model_type="llama",
                            rope_parameters={k: v for k, v in rope.items() if k != "original_max_position_embeddings"}))
    assert c.rope_scaling_dict["original_max_position_embeddings"] == 64
    for kind in ({"rope_type": "yarn", "factor": 4.0}, {"rope_type": "longrope", "short_factor": [1.0] * 4,
                                                        "long_factor": [2.0] * 4}):  # yarn and longrope too
        c = config_from_hf(dict(base, model_type="llama", rope_parameters=dict(kind, original_max_position_embeddings=16),
                                original_max_position_embeddings=32))
        assert c.rope_scaling_dict["original_max_position_embeddings"] == 32
        c = config_from_hf(dict(base, model_type="llama", rope_parameters=kind))
        assert c.rope_scaling_dict["original_max_position_embeddings"] == 64
    with W.catch_warnings():
        W.simplefilter("error")
        assert config_from_hf(dict(base, model_type="llama", attention_dropout=0.1)).attention_dropout == 0.1
        assert config_from_hf(dict(base, model_type="llama", attention_dropout=0.0)).attention_dropout == 0.0
    from jpeft.models.loading import config_to_hf

    gpt2 = dict(model_type="gpt2", vocab_size=100, n_embd=32, n_layer=2, n_head=4)
    bert = dict(model_type="bert", vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64)
    for d, field, hf, default in ((gpt2, "attn_pdrop", "attn_pdrop", 0.1),
                                  (bert, "attention_probs_dropout_prob", "attention_probs_dropout_prob", 0.1),
                                  (dict(base, model_type="llama"), "attention_dropout", "attention_dropout", 0.0)):
        assert getattr(config_from_hf(d), field) == default  # transformers' default when config.json has no key
        c = config_from_hf(dict(d, **{hf: 0.25}))
        assert getattr(c, field) == 0.25 and config_to_hf(c)[hf] == 0.25  # kept through save_pretrained


def test_a_quoted_boolean_in_config_json_is_refused_by_name():
    """bool("false") is True: a hand-edited ``"tie_word_embeddings": "false"`` read as tied (the
    untied lm_head dropped, logits from the embedding). transformers refuses a non-boolean there;
    jpeft names the field and the fix."""
    from jpeft.errors import ConfigError
    from jpeft.models.loading import config_from_hf

    llama = dict(model_type="llama", vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4)
    gpt2 = dict(model_type="gpt2", vocab_size=100, n_embd=32, n_layer=2, n_head=4)
    assert config_from_hf(dict(llama, tie_word_embeddings=False)).tie_word_embeddings is False
    assert config_from_hf(gpt2).tie_word_embeddings is True
    for d, field, value in ((llama, "tie_word_embeddings", "false"), (llama, "attention_bias", 1),
                            (gpt2, "tie_word_embeddings", "false"), (gpt2, "scale_attn_weights", None)):
        with pytest.raises(ConfigError, match=f"{field}.*must be true or false.*{value!r}"):
            config_from_hf(dict(d, **{field: value}))


def test_key_value_heads_without_the_key_default_as_in_transformers():
    """transformers' MistralConfig and Qwen2Config take 8 and 32 key/value heads when config.json
    has no num_key_value_heads (LlamaConfig, or Qwen2's explicit null: the attention heads); jpeft took
    the attention heads for all three, so such a Mistral folder (32 heads, weights of 8) was
    refused with a WeightShapeError telling the user to fix config.json."""
    import transformers

    from jpeft._hfconfig import num_kv_heads
    from jpeft.models.loading import config_from_hf

    d = dict(vocab_size=100, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=32)
    for mt, cls in (("llama", transformers.LlamaConfig), ("mistral", transformers.MistralConfig),
                    ("qwen2", transformers.Qwen2Config), ("qwen3", transformers.Qwen3Config)):
        for extra in ({}, {"num_key_value_heads": None}):
            try:
                want = cls(**d, **extra).num_key_value_heads
            except Exception:  # MistralConfig refuses an explicit null (a strict-dataclass error)
                continue
            assert config_from_hf(dict(d, model_type=mt, **extra)).num_kv_heads == want, (mt, extra)
            assert num_kv_heads(dict(d, model_type=mt, **extra)) == want  # the one reading (prefix export too)
    assert config_from_hf(dict(d, model_type="mistral")).num_kv_heads == 8


def test_max_position_embeddings_without_the_key_defaults_as_in_transformers(tmp_path):
    """Without a max_position_embeddings key transformers' MistralConfig takes 131072 and Qwen2Config
    32768 (LlamaConfig 2048); jpeft took 2048 for all three (prompt tuning then refused longer inputs,
    save_pretrained wrote 2048 back). llama3 rope without original_max_position_embeddings falls back
    to that default in transformers: jpeft refused such a file with a ConfigError unless the key was
    written. The logits of such a folder now equal transformers'."""
    import torch
    import transformers

    from jpeft.models.loading import config_from_hf

    d = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
    for mt, cls in (("llama", transformers.LlamaConfig), ("mistral", transformers.MistralConfig),
                    ("qwen2", transformers.Qwen2Config), ("qwen3", transformers.Qwen3Config)):
        assert config_from_hf(dict(d, model_type=mt)).max_position_embeddings == cls(**d).max_position_embeddings, mt
    torch.manual_seed(0)
    rope = {"rope_type": "llama3", "rope_theta": 1e6, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16}
    hf = T._randomize(transformers.LlamaForCausalLM(transformers.LlamaConfig(**d, rope_parameters=rope)), seed=5)
    hf.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    cfg = json.loads(path.read_text())
    cfg.pop("max_position_embeddings")
    cfg["rope_parameters"].pop("original_max_position_embeddings")
    path.write_text(json.dumps(cfg))
    ref_model = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert ref_model.config.rope_parameters["original_max_position_embeddings"] == 2048
    ids = np.random.default_rng(0).integers(3, 100, size=(2, 12))
    with torch.no_grad():
        ref = ref_model(input_ids=torch.tensor(ids)).logits.numpy()
    model, params = M.from_pretrained(str(tmp_path))
    assert model.config.rope_scaling_dict["original_max_position_embeddings"] == 2048
    np.testing.assert_allclose(np.asarray(model.apply(params, jnp.asarray(ids))), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("model_type,field,value", [
    ("llama", "rms_norm_eps", None), ("llama", "max_position_embeddings", "4096"), ("qwen2", "max_window_layers", 1.5),
    ("llama", "intermediate_size", 64.5), ("gpt2", "layer_norm_epsilon", None), ("gpt2", "n_positions", True),
    ("bert", "type_vocab_size", None), ("bert", "layer_norm_eps", "1e-12"), ("llama", "rope_theta", "1e4"),
    ("llama", "num_key_value_heads", "4"), ("llama", "num_key_value_heads", 2.5), ("mistral", "attention_dropout", "0.1"),
])
def test_a_null_quoted_or_fractional_number_in_config_json_is_refused_by_name(model_type, field, value):
    """(A quoted attention_dropout was read by float(), unlike every other number.) float(None) / int("4096") raised a raw TypeError / ValueError from from_pretrained, and int()
    truncated a fraction silently (max_window_layers 1.5 read as 1: transformers windows layers
    i >= 1.5, jpeft windowed layer 1 too; num_key_value_heads "4" was read as 4 and 2.5 as 2). Each is a
    ConfigError naming the field and the fix."""
    from jpeft.errors import ConfigError
    from jpeft.models.loading import config_from_hf

    d = {"llama": dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4),
         "gpt2": dict(vocab_size=100, n_embd=32, n_layer=2, n_head=4),
         "bert": dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64)}[model_type if model_type not in ("qwen2", "mistral") else "llama"]
    d = dict(d, model_type=model_type, use_sliding_window=True) if model_type == "qwen2" else dict(d, model_type=model_type)
    config_from_hf(dict(d, **{field: 2.0 if "max_window" in field else 0.1 if "dropout" in field else d.get(field, 7)}))  # a number reads
    with pytest.raises(ConfigError, match=f"field '{field}' must be a .*number, found {value!r}.*JSON number"):
        config_from_hf(dict(d, **{field: value}))


def test_unsupported_model_type(tmp_path):
    d = _copy("llama2", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "t5"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=r"'t5' is not supported.*\['bert', 'gpt2', 'llama', 'mistral', 'qwen2', 'qwen3'\]"):
        M.from_pretrained(str(d))


def test_model_types_of_a_model_class():
    """The one place that says which model types load as which jpeft model (the CLI's causal-LM,
    scan_layers and tensor-axis checks ask it rather than reading class names)."""
    from jpeft.models import loading
    from jpeft.models._layers import CausalLM
    assert loading.model_types_of(M.LlamaForCausalLM) == ["llama", "mistral", "qwen2", "qwen3"]
    assert loading.model_types_of(CausalLM) == ["gpt2", "llama", "mistral", "qwen2", "qwen3"]
    assert loading.model_types_of(M.BertForSequenceClassification) == ["bert"]


def test_a_prequantized_checkpoint_is_refused_by_name(tmp_path):
    """A bitsandbytes 8-bit folder as transformers saves it (int8 weights of the full shape plus
    ``SCB`` / ``weight_format`` tensors, and a ``quantization_config``) was refused as weights
    that "do not match its config.json", asking whether the config came from another model;
    a leftover quantization_config over full-precision weights (which transformers quantizes on
    load) loaded unquantized. Both now name the quantization and the way to load the model."""
    from safetensors.numpy import load_file, save_file

    d = _copy("llama2", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=r"quantization_config \(quant_method 'bitsandbytes'\).*quantize='nf4'"):
        M.from_pretrained(str(d))
    tensors = load_file(str(d / "model.safetensors"))
    w = tensors["model.layers.0.mlp.up_proj.weight"]
    tensors["model.layers.0.mlp.up_proj.weight"] = np.clip(np.round(w * 400), -127, 127).astype(np.int8)
    tensors["model.layers.0.mlp.up_proj.SCB"] = np.abs(w).max(axis=1).astype(np.float32)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UnsupportedModelError, match="pre-quantized checkpoint"):
        M.from_pretrained(str(d))


def test_heads_jpeft_does_not_implement_and_a_stray_untied_head_are_refused(tmp_path):
    """A checkpoint of a head jpeft has no model for (GPT-2's double heads) could load onto another
    head (BertForTokenClassification's loaded as the sequence classifier before; it now loads as
    jpeft's token classifier, and BertForMultipleChoice's as jpeft's multiple-choice model, whose
    one-output classifier refuses the sequence classifier's weights by shape: tests/test_bert_task_heads.py). A tied config whose file also
    holds a different lm_head.weight (an untied fine-tune) is what transformers uses untied: jpeft's
    tied model would compute other logits. Both refused by name; an identical copy still loads."""
    from safetensors.numpy import load_file, save_file

    d = _copy("bert", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["BertForTokenClassification"]
    (d / "config.json").write_text(json.dumps(cfg))
    assert type(M.from_pretrained(str(d))[0]).__name__ == "BertForTokenClassification"
    # a multiple-choice classifier ([hidden, 1]) and a decoder's sequence-classification head
    # (score in place of lm_head) were refused as shape or missing-weight errors
    cfg["architectures"] = ["BertForMultipleChoice"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(jpeft.errors.WeightShapeError, match=r"classifier.* has shape \(3,\).* implies \(1,\)"):
        M.from_pretrained(str(d))  # the sequence classifier's 3 outputs, where the multiple-choice head has 1
    for fam, arch in (("gpt2", "GPT2DoubleHeadsModel"), ("llama2", "LlamaForSequenceClassification"),
                      ("gpt2", "GPT2ForSequenceClassification"),
                      ("llama2", "LlamaForTokenClassification"), ("gpt2", "GPT2ForQuestionAnswering")):
        d = _copy(fam, tmp_path / arch)
        cfg = json.loads((d / "config.json").read_text())
        cfg["architectures"] = [arch]
        (d / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(UnsupportedModelError, match=f"names '{arch}'.*causal language models only"):
            M.from_pretrained(str(d))
    d = _copy("gpt2", tmp_path)
    assert json.loads((d / "config.json").read_text()).get("tie_word_embeddings", True)
    w = load_file(str(d / "model.safetensors"))
    emb = next(k for k in w if k.endswith("wte.weight"))
    save_file({**w, "lm_head.weight": w[emb] + 1.0}, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"tie_word_embeddings=true, but the weights also hold an lm_head"):
        M.from_pretrained(str(d))
    save_file({**w, "lm_head.weight": w[emb].copy()}, str(d / "model.safetensors"), metadata={"format": "pt"})
    _, params = M.from_pretrained(str(d))
    assert "lm_head" not in params["params"]



_TIED_HEAD_PEAK = """
import json, sys
from jpeft.models import loading
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
loading._COMPARE_BYTES = 1 << 20
real, seen = loading._check_stored_head_is_tied, {}
def check(*a):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak resident set is reset to the current one
    rss = status("VmRSS:")
    real(*a)
    seen["rise"] = status("VmHWM:") - rss
loading._check_stored_head_is_tied = check
loading.from_pretrained(sys.argv[1])
print("RISE", json.dumps(seen))
"""


def test_a_stored_copy_of_a_tied_head_is_compared_a_block_at_a_time(tmp_path, monkeypatch):
    """A tied checkpoint that also stores lm_head.weight (a copy some exporters write) has the two
    tables compared before loading, on every process of a sharded load. They were read whole
    (safetensors' get_tensor: mapped pages and a JAX copy of each, then a boolean array): on a
    random 22M-parameter Llama with a 24 MiB table the load's peak rose from +51 to +169 MiB on one
    process and to +174 MiB on each of two fsdp=2 processes, whose own shards are 30 MiB. Now they
    are read and compared a block of rows at a time: the check's own peak stays within a few
    blocks, and a head differing only in its last row is still refused."""
    import subprocess

    from safetensors.numpy import load_file, save_file

    from jpeft.models import loading

    vocab, hidden = 8192, 512  # a 16 MiB float32 table; blocks of 1 MiB in the child process
    cfg = M.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_layers=1, num_heads=4,
                        num_kv_heads=2, head_dim=128, tie_word_embeddings=True)
    model = M.model_from_config(cfg)
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    d = tmp_path / "tied"
    M.save_pretrained(str(d), model, params)
    w = load_file(str(d / "model.safetensors"))
    emb = w["model.embed_tokens.weight"]
    assert emb.nbytes == 16 << 20 and np.abs(emb).max() > 0
    save_file({**w, "lm_head.weight": emb.copy()}, str(d / "model.safetensors"), metadata={"format": "pt"})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(jpeft.__file__)),
                                                       os.environ.get("PYTHONPATH", "")]), JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _TIED_HEAD_PEAK, str(d)], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    rise = json.loads(out.stdout.split("RISE", 1)[1])["rise"]
    assert rise < emb.nbytes // 4, f"comparing the stored head with the embedding raised the peak by {rise / 2**20:.1f} MiB"
    _, got = M.from_pretrained(str(d))  # an equal copy loads, tied, with the table's own values
    np.testing.assert_array_equal(np.asarray(got["params"]["model"]["embed_tokens"]["embedding"]), emb)
    assert "lm_head" not in got["params"]
    head = emb.copy()
    head[-1, -1] = np.nextafter(head[-1, -1], np.float32(np.inf))  # one value of the last block, one step off
    save_file({**w, "lm_head.weight": head}, str(d / "model.safetensors"), metadata={"format": "pt"})
    monkeypatch.setattr(loading, "_COMPARE_BYTES", 1 << 20)
    with pytest.raises(CheckpointError, match=r"tie_word_embeddings=true, but the weights also hold an lm_head"):
        M.from_pretrained(str(d))


@pytest.mark.parametrize("family", ["llama3", "gpt2"])
def test_tied_matrix_stored_only_as_lm_head_loads_as_the_embedding(family, tmp_path):
    """safetensors.torch.save_model keeps one of a tied tensor's names, the first in order:
    "lm_head.weight". transformers loads such a file as the tied embedding; it was refused as
    missing its embedding."""
    from safetensors.torch import save_model

    hf, _ = T.hf_model(family)
    d = _copy(family, tmp_path)
    os.remove(d / "model.safetensors")
    save_model(hf, str(d / "model.safetensors"))
    from safetensors import safe_open

    with safe_open(str(d / "model.safetensors"), "np") as f:
        keys = set(f.keys())
    assert "lm_head.weight" in keys and not any(k.endswith(("embed_tokens.weight", "wte.weight")) for k in keys)
    model, params = M.from_pretrained(str(d))
    assert "lm_head" not in params["params"]
    ids, mask = T.batch(family)
    out = model.apply(params, jnp.asarray(ids), attention_mask=jnp.asarray(mask), position_ids=jnp.asarray(T.positions(mask)))
    ref = T.torch_logits(family, ids, mask)
    sel = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(out)[sel], ref[sel], atol=1e-5, rtol=0)

def test_weight_shape_disagrees_with_config(tmp_path):
    d = _copy("llama2", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightShapeError, match=r"model\.layers\.0\.mlp\.down_proj\.weight.*\(32, 64\).*\(32, 48\)"):
        M.from_pretrained(str(d))
    cfg["intermediate_size"] = 64
    cfg["num_hidden_layers"] = 3
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"missing 16 weights \['model\.layers\.2\."):
        M.from_pretrained(str(d))


def test_truncated_safetensors(tmp_path):
    d = _copy("qwen2", tmp_path)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        M.from_pretrained(str(d))


def test_bert_task_head_missing_is_freshly_initialised(tmp_path):
    import transformers as t

    hf, _ = T.hf_model("bert")
    base = t.BertModel(hf.config)
    base.load_state_dict(hf.bert.state_dict())
    base.save_pretrained(tmp_path)  # keys without the "bert." prefix, no classifier
    with pytest.warns(UserWarning, match="freshly initialised"):
        model, params = M.from_pretrained(str(tmp_path))
    _, ref = loaded("bert")
    np.testing.assert_array_equal(
        np.asarray(params["params"]["bert"]["encoder"]["layer_1"]["output"]["dense"]["kernel"]),
        np.asarray(ref["params"]["bert"]["encoder"]["layer_1"]["output"]["dense"]["kernel"]),
    )
    assert params["params"]["classifier"]["kernel"].shape == (32, 3)


def test_bf16_model_generates_and_load_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model, params = loaded("llama3", "bfloat16")
    out = jpeft.generate(model, params, None, jnp.asarray(T.batch("llama3")[0]), 3)
    assert out.shape == (3, 11) and out.dtype == jnp.int32
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "hello", "world", "jax"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(tmp_path)
    t = M.load_tokenizer(str(tmp_path))
    assert t("hello jax world")["input_ids"] == [2, 4, 3]
    with pytest.raises(LoadError, match="is not a folder"):
        M.load_tokenizer(str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LoadError, match="no usable tokenizer"):
        M.load_tokenizer(str(empty))
    # a model folder without tokenizer files was told "(Couldn't instantiate the backend tokenizer from one of: )"
    (empty / "config.json").write_text("{}")
    with pytest.raises(LoadError, match=r"no usable tokenizer in .* \(it holds no tokenizer file: no tokenizer.json"):
        M.load_tokenizer(str(empty))


@pytest.mark.parametrize("kind", ["llama", "qwen3", "bert"])
def test_save_pretrained_loads_in_transformers(kind, tmp_path):
    """A model built and adapted in JAX, merged and saved, gives the same logits in transformers
    (Qwen3: head_dim 16 != hidden / heads, q/k/v/o biases, and q_norm/k_norm weights made random,
    since a norm weight of ones would hide a norm missing on either side)."""
    import torch
    import transformers as t

    if kind == "qwen3":
        cfg = M.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                            num_kv_heads=2, head_dim=16, attention_bias=True, tie_word_embeddings=True,
                            initializer_range=0.2, rope_theta=1e6)
        model = M.Qwen3ForCausalLM(cfg)
        ids = np.array([[0, 0, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6]])
        mask = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    elif kind == "llama":
        cfg = M.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                            num_kv_heads=2, tie_word_embeddings=True, initializer_range=0.2, rope_theta=500000.0,
                            rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8})
        model = M.LlamaForCausalLM(cfg)
        ids = np.array([[0, 0, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6]])
        mask = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    else:
        cfg = M.BertConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48,
                           num_labels=3, initializer_range=0.2)
        model = M.BertForSequenceClassification(cfg)
        ids = np.array([[5, 6, 7, 8, 0, 0], [1, 2, 3, 4, 5, 6]])
        mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    if kind == "qwen3":  # every norm weight and bias random (init: ones and zeros)
        params = jax.tree_util.tree_map_with_path(
            lambda kp, x: x + 0.3 * jax.random.normal(jax.random.key(len(jax.tree_util.keystr(kp))), x.shape)
            if kp[-1].key in ("scale", "bias") else x, params)
    targets = {"llama": ["q_proj", "gate_proj"], "qwen3": ["q_proj", "k_proj", "gate_proj"],
               "bert": ["query", "classifier"]}[kind]
    adapter = jpeft.init(jpeft.LoraConfig(r=2, target_modules=targets, init_weights="random"), params, jax.random.key(1))
    want = np.asarray(jpeft.apply(model, params, adapter, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    M.save_pretrained(str(tmp_path), model, jpeft.merge(params, adapter))
    hf = t.AutoModelForCausalLM if kind != "bert" else t.AutoModelForSequenceClassification
    tm = hf.from_pretrained(str(tmp_path)).eval()
    if kind == "qwen3":
        assert type(tm).__name__ == "Qwen3ForCausalLM" and tm.config.head_dim == 16
    with torch.no_grad():
        kw = dict(position_ids=torch.tensor(T.positions(mask))) if kind != "bert" else {}
        got = tm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **kw).logits.numpy()
    sel = mask.astype(bool) if kind != "bert" else slice(None)
    np.testing.assert_allclose(got[sel], want[sel], atol=1e-4)
    m2, p2 = M.from_pretrained(str(tmp_path))
    assert m2.config == model.config
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), p2, jpeft.merge(params, adapter))


def test_qwen3_config_json_reads_as_transformers_reads_it():
    """Qwen3's config.json defaults are not Llama's: without a head_dim key transformers' Qwen3Config
    takes 128 (not hidden_size / heads), 32 key/value heads and 32,768 positions; attention_bias
    biases q/k/v and o_proj; there is no MLP bias; and the sliding-window options are Qwen2's. The
    MoE variant and a config jpeft cannot write as a Qwen3 checkpoint are refused by name."""
    import transformers

    from jpeft.models.loading import config_from_hf, config_to_hf

    d = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=4)  # without the key, 32: test_key_value_heads_without_the_key_default_...
    for extra in ({}, {"head_dim": 16, "num_key_value_heads": 2, "attention_bias": True, "mlp_bias": True},
                  {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1},
                  {"use_sliding_window": False, "sliding_window": 3},
                  {"use_sliding_window": True,
                   "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}):
        want = transformers.Qwen3Config(**{**d, **extra})
        got = config_from_hf({**d, **extra, "model_type": "qwen3"})
        assert (got.head_dim, got.num_kv_heads, got.max_position_embeddings, got.qk_norm) == (
            want.head_dim, want.num_key_value_heads, want.max_position_embeddings, True), extra
        assert (got.attention_bias, got.attention_out_bias, got.mlp_bias) == (want.attention_bias,) * 2 + (False,)
        assert [got.window(i) for i in range(3)] == [
            want.sliding_window if t == "sliding_attention" else None for t in want.layer_types], extra
    assert config_from_hf(dict(d, model_type="qwen3")).head_dim == 128  # not 32 / 4
    with pytest.raises(UnsupportedModelError, match=r"'qwen3_moe' is not supported.*'qwen3'\]"):
        config_from_hf(dict(d, model_type="qwen3_moe"))
    with pytest.raises(UnsupportedModelError, match="has qk_norm=True"):
        config_to_hf(M.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4,
                                   qk_norm=True))
    with pytest.raises(UnsupportedModelError, match="always has q_norm/k_norm"):
        config_to_hf(M.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4,
                                   qk_norm=False))
    with pytest.raises(UnsupportedModelError, match="one attention_bias flag"):
        config_to_hf(M.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4,
                                   attention_bias=True, attention_out_bias=False))


def test_qwen3_sliding_window_layers_equal_transformers(tmp_path):
    """A Qwen3 with use_sliding_window (window 3 on the layers from max_window_layers=1 on) and random
    q_norm/k_norm weights gives transformers' logits on padded rows longer than the window."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(vocab_size=T.VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, use_sliding_window=True,
                                   sliding_window=3, max_window_layers=1, max_position_embeddings=64)
    hf = T._randomize(transformers.Qwen3ForCausalLM(cfg), seed=9)
    hf.save_pretrained(tmp_path)
    model, params = M.from_pretrained(str(tmp_path))
    assert [model.config.window(i) for i in range(2)] == [None, 3]
    ids, mask = T.batch("qwen3", seed=2)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(T.positions(mask))).logits.numpy()
    out = np.asarray(model.apply(params, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    sel = mask.astype(bool)
    np.testing.assert_allclose(out[sel], ref[sel], atol=1e-4, rtol=0)


def test_rope_scaling_older_type_key_survives_save_pretrained(tmp_path):
    """LlamaConfig(rope_scaling={"type": "linear", ...}) (an older config.json's key, which the
    model honours) was written as rope_parameters {"rope_type": "default", "type": "linear"}, which
    transformers and jpeft's loader read as unscaled rope (4.1 off in the logits)."""
    import torch
    import transformers as t

    cfg = M.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4,
                        initializer_range=0.2, rope_scaling={"type": "linear", "factor": 4.0})
    assert cfg.rope_scaling_dict == {"rope_type": "linear", "factor": 4.0}
    assert cfg == cfg.replace(rope_scaling={"rope_type": "linear", "factor": 4.0})
    model = M.LlamaForCausalLM(cfg)
    ids = np.arange(2, 22).reshape(1, 20)
    params = model.init(jax.random.key(0), jnp.asarray(ids))
    M.save_pretrained(str(tmp_path), model, params)
    want = np.asarray(model.apply(params, jnp.asarray(ids)))
    m2, p2 = M.from_pretrained(str(tmp_path))
    assert m2.config.rope_scaling_dict == {"rope_type": "linear", "factor": 4.0}
    np.testing.assert_array_equal(np.asarray(m2.apply(p2, jnp.asarray(ids))), want)
    tm = t.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        got = tm(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_rope_theta_inside_rope_scaling_is_the_models_theta():
    """transformers 5's rope_parameters hold rope_theta: LlamaConfig(rope_scaling=hf.rope_parameters)
    used 10000 (its rope_theta default) but save_pretrained wrote the dict's 500000 (0.18 off)."""
    cfg = M.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4,
                        rope_scaling={"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0})
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling_dict == {"rope_type": "linear", "factor": 2.0}
    assert cfg == M.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4,
                                rope_theta=500000.0, rope_scaling={"rope_type": "linear", "factor": 2.0})
    assert M.config_to_hf(cfg)["rope_parameters"]["rope_theta"] == 500000.0
    assert cfg.replace(rope_theta=1000.0).rope_theta == 1000.0


def test_rope_scaling_wins_over_rope_parameters_as_in_transformers():
    """A config.json holding both an older rope_scaling (added by hand to extend the context)
    and transformers 5's rope_parameters: transformers uses rope_scaling, with the top-level
    rope_theta (else 10000); jpeft read rope_parameters (found by an audit: 2.2 in the logits)."""
    from jpeft.models.loading import config_from_hf

    base = dict(model_type="llama", vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    c = config_from_hf(dict(base, rope_scaling={"type": "linear", "factor": 4.0}))
    assert c.rope_theta == 10000.0 and c.rope_scaling_dict == {"rope_type": "linear", "factor": 4.0}
    c = config_from_hf(dict(base, rope_scaling={"type": "linear", "factor": 4.0}, rope_theta=1000.0))
    assert c.rope_theta == 1000.0
    c = config_from_hf(dict(base, rope_scaling=None))  # a null rope_scaling: rope_parameters as before
    assert c.rope_theta == 500000.0 and c.rope_scaling is None


def test_rope_parameters_per_layer_type_are_refused_not_read_as_default():
    """transformers 5 writes rope_parameters per layer type for some families; on a Llama-family
    config.json it was read as one dict without rope_type: default rope with theta 10000, silently."""
    from jpeft.models import config_from_hf

    d = dict(model_type="qwen2", vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                                     "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    with pytest.raises(UnsupportedModelError, match=r"per layer type \(\['full_attention', 'sliding_attention'\]\)"):
        config_from_hf(d)


@pytest.mark.parametrize("bad, match", [
    (dict(rope_scaling={"rope_type": "linear"}), "lacks 'factor'"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "lacks 'low_freq_factor'"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 0.0}), "factor must be positive"),
    (dict(rope_scaling={"rope_type": "yarn", "original_max_position_embeddings": 8}), "lacks 'factor'"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "attention_factor": -1.0}), "attention_factor must be positive"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": None}), "factor is null"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "beta_fast": "32"}), "beta_fast must be a number"),
    (dict(rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4, "factor": 4.0,
                        "original_max_position_embeddings": 1}), "non-finite rotary frequencies"),
    (dict(rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 4}), "lacks 'long_factor'"),
    (dict(rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 3}),
     r"long_factor must be a list of head_dim // 2 = 4 positive numbers"),
    (dict(rope_theta=0.0), "rope_theta"),
    (dict(rms_norm_eps=-1.0), "rms_norm_eps"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(head_dim=0), "head_dim"),
    (dict(num_kv_heads=0), "num_kv_heads"),
])
def test_llama_config_values_that_give_nan_or_a_raw_error_are_refused(bad, match):
    """Each of these gave NaN logits, or a KeyError / ZeroDivisionError from inside the config (the
    yarn / dynamic / longrope ones: a raw KeyError, a shape error or a sign flip in transformers)."""
    from jpeft.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        M.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, **bad)



@pytest.mark.parametrize("cls, field, bad", [("LlamaConfig", "intermediate_size", -1),
                                             ("GPT2Config", "intermediate_size", -4), ("BertConfig", "type_vocab_size", 0),
                                             ("BertConfig", "intermediate_size", -1),
                                             ("GPT2Config", "max_position_embeddings", 0)])
def test_sizes_that_gave_a_raw_jax_error_are_refused_by_the_config(cls, field, bad):
    """A negative MLP width or an empty token-type table was accepted and failed at the first call
    inside JAX (TypeError "reshape new_sizes must all be positive", IndexError "non-empty
    jnp.take() from an empty axis"); a config.json holding one now gets a named error."""
    from jpeft.errors import ConfigError

    kw = dict(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, max_position_embeddings=16)
    if cls != "GPT2Config":
        kw["intermediate_size"] = 32
    with pytest.raises(ConfigError, match=rf"{cls}\.{field} must be a positive integer"):
        getattr(M, cls)(**{**kw, field: bad})


@pytest.mark.parametrize("cls, field", [("LlamaConfig", "attention_dropout"), ("GPT2Config", "attn_pdrop"),
                                        ("BertConfig", "attention_probs_dropout_prob")])
def test_attention_dropout_rates_are_checked_by_the_config(cls, field):
    """A rate outside [0, 1) is refused by the config, naming its field (it was accepted and
    refused at the first forward with an unnamed 'attention dropout rate'); a numpy float rate
    is a rate (it was refused as 'must be a number in [0, 1), found np.float32(0.1)')."""
    from jpeft.errors import ConfigError

    kw = dict(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, max_position_embeddings=16)
    if cls != "GPT2Config":
        kw["intermediate_size"] = 32
    for bad in (1.0, -0.1, "0.1"):
        with pytest.raises(ConfigError, match=rf"{cls}\.{field} must be a number in \[0, 1\)"):
            getattr(M, cls)(**kw, **{field: bad})
    c = getattr(M, cls)(**kw, **{field: np.float32(0.5)})
    model = (M.BertForSequenceClassification if cls == "BertConfig" else
             M.GPT2LMHeadModel if cls == "GPT2Config" else M.LlamaForCausalLM)(c)
    ids = jnp.ones((1, 8), jnp.int32)
    params = model.init(jax.random.key(0), ids)
    out = [model.apply(params, ids, deterministic=False, rngs={"dropout": jax.random.key(k)}) for k in (1, 2)]
    assert float(jnp.abs(jax.tree.leaves(out[0])[0] - jax.tree.leaves(out[1])[0]).max()) > 0  # it drops

def _scaled(params, factor):
    return jax.tree.map(lambda x: x * factor, params)


def test_save_pretrained_over_a_sharded_checkpoint_replaces_it(tmp_path):
    """Saving into the folder of a sharded checkpoint wrote model.safetensors next to the old
    index and shards; jpeft's loader then read the index (the old weights, silently) while
    transformers read model.safetensors (found by an audit). The stale shards are now removed
    as transformers removes them, and a folder holding both loads model.safetensors, as in
    transformers."""
    hf, _ = T.hf_model("llama2")
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    model, params = M.from_pretrained(str(tmp_path))
    new = _scaled(params, 1.5)
    M.save_pretrained(str(tmp_path), model, new)
    assert not list(tmp_path.glob("model-*.safetensors")) and not (tmp_path / "model.safetensors.index.json").exists()
    assert not [p for p in os.listdir(tmp_path) if "tmp" in p]
    _, p2 = M.from_pretrained(str(tmp_path))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), p2, new)
    # a folder with both (copied together, or saved by another tool): model.safetensors, as transformers
    old = tmp_path / "old"
    hf.save_pretrained(old, max_shard_size="40KB")
    for f in os.listdir(old):
        if f.startswith("model"):
            shutil.copy(old / f, tmp_path / f)
    _, p3 = M.from_pretrained(str(tmp_path))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), p3, new)


def test_save_pretrained_failure_keeps_the_previous_checkpoint_and_quantized_bases_save(tmp_path, monkeypatch):
    """A failed save left a half-written model.safetensors in place of the previous one (it was
    written in place); a quantized base raised AttributeError from deep in the key map."""
    from jpeft.errors import SaveError
    from jpeft.models import loading

    model, params = loaded("llama2")
    M.save_pretrained(str(tmp_path), model, params)
    before = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)}

    def fail(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(loading, "save_file", fail)
    with pytest.raises(SaveError, match="No space left"):
        M.save_pretrained(str(tmp_path), model, _scaled(params, 2.0))
    assert {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)} == before
    monkeypatch.undo()
    q = jpeft.quantize(params, "int8")
    M.save_pretrained(str(tmp_path / "q"), model, q)
    _, pq = M.from_pretrained(str(tmp_path / "q"))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), pq,
                 jpeft.quant.dequantize(q))


def test_save_pretrained_refuses_params_that_are_not_the_models(tmp_path):
    """save_pretrained wrote whatever tree it was given under the model's config.json: a resized
    embedding gave a folder neither library loads, and params missing a layer gave one that
    transformers loads with that layer freshly initialised (a load report, no error). Both are
    refused by name before anything is written, and an earlier save in the folder is kept."""
    model, params = loaded("llama2")
    M.save_pretrained(str(tmp_path), model, params)
    before = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)}
    inner = dict(params["params"])
    inner["model"] = dict(inner["model"])
    emb = inner["model"]["embed_tokens"]["embedding"]
    inner["model"]["embed_tokens"] = {"embedding": jnp.concatenate([emb, jnp.zeros((8, emb.shape[1]), emb.dtype)])}
    with pytest.raises(WeightShapeError, match="embed_tokens/embedding"):
        M.save_pretrained(str(tmp_path), model, {"params": inner})
    inner = dict(params["params"])
    inner["model"] = {k: v for k, v in inner["model"].items() if k != "layers_1"}
    with pytest.raises(CheckpointError, match=r"missing 16 \['model/layers_1/"):
        M.save_pretrained(str(tmp_path), model, {"params": inner})
    assert {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)} == before
    M.save_pretrained(str(tmp_path / "scanned"), *M.from_pretrained(T.hf_model("llama2")[1], scan_layers=True))


def test_config_replace_derives_what_the_constructor_derived():
    """replace() kept the values derived from the old sizes: LlamaConfig(num_heads=4).replace(
    num_heads=8) had num_kv_heads 4 (grouped-query attention nobody asked for) and head_dim 8,
    where LlamaConfig(num_heads=8) has 8 and 4; GPT-2's default n_inner stayed 4x the old width.
    Values given explicitly (or read from config.json) are kept."""
    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1)
    for change in (dict(num_heads=8), dict(hidden_size=64), dict(hidden_size=64, num_heads=2)):
        got, want = M.LlamaConfig(**kw, num_heads=4).replace(**change), M.LlamaConfig(**{**kw, "num_heads": 4, **change})
        assert (got.num_kv_heads, got.head_dim) == (want.num_kv_heads, want.head_dim) and got == want
    explicit = M.LlamaConfig(**kw, num_heads=4, num_kv_heads=2, head_dim=8).replace(num_heads=8, hidden_size=64)
    assert (explicit.num_kv_heads, explicit.head_dim) == (2, 8)
    assert M.LlamaConfig(**kw, num_heads=4).replace(num_kv_heads=1).num_kv_heads == 1
    g = M.GPT2Config(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4)
    assert g.replace(hidden_size=64).intermediate_size == 256 and g.replace(num_layers=2) == g.replace(num_layers=2)
    assert M.GPT2Config(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=40).replace(
        hidden_size=64).intermediate_size == 40


def test_from_pretrained_names_an_unknown_override():
    """from_pretrained(path, num_layer=3) raised dataclasses' TypeError; it is a ConfigError that lists the fields."""
    from jpeft.errors import ConfigError

    with pytest.raises(ConfigError, match=r"\['num_layer'\] are not fields of LlamaConfig.*'num_layers'"):
        M.from_pretrained(T.hf_model("llama2")[1], num_layer=3)


def test_gpt2_token_type_ids_match_transformers_with_and_without_lora():
    """transformers' GPT-2 adds wte(token_type_ids) to the embeddings; jpeft raised a bare TypeError
    (model(**batch) with a tokenizer's token_type_ids). Other families refuse them by name."""
    import copy
    import tempfile
    import warnings

    import peft
    import torch
    from jpeft import hf as H

    hf, folder = T.hf_model("gpt2")
    model, params = M.from_pretrained(folder)
    ids, mask = T.batch("gpt2", seed=3)
    tt = np.random.default_rng(5).integers(0, T.VOCAB, size=ids.shape)
    sel = mask.astype(bool)
    kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(T.positions(mask)),
              token_type_ids=torch.tensor(tt))
    with torch.no_grad():
        ref = hf(**kw).logits.numpy()
    out = np.asarray(model.apply(params, jnp.asarray(ids), jnp.asarray(mask), token_type_ids=jnp.asarray(tt)))
    np.testing.assert_allclose(out[sel], ref[sel], atol=1e-5, rtol=0)
    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(init_lora_weights=False, r=3, lora_alpha=6,
                             target_modules=["c_attn", "wte"], fan_in_fan_out=True)).eval()
    d = tempfile.mkdtemp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(d)
    with torch.no_grad():
        pref = pm(**kw).logits.numpy()
    assert np.abs(pref - ref)[sel].max() > 1e-2  # every B is random: the adapter moves the logits
    _, adapter = H.load_peft(d, params)
    out = np.asarray(jpeft.apply(model, params, adapter, jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                                 token_type_ids=jnp.asarray(tt)))
    np.testing.assert_allclose(out[sel], pref[sel], atol=1e-5, rtol=0)
    with pytest.raises(InputValidationError, match="token_type_ids"):
        model.apply(params, jnp.asarray(ids), token_type_ids=jnp.asarray(tt[:, :3]))
    with pytest.raises(InputValidationError, match="outside the vocabulary"):
        model.apply(params, jnp.asarray(ids), token_type_ids=jnp.asarray(tt + T.VOCAB))
    lm, lp = M.from_pretrained(T.hf_model("llama2")[1])
    with pytest.raises(InputValidationError, match="no token type embeddings"):
        lm.apply(lp, jnp.asarray(ids), token_type_ids=jnp.asarray(tt))
    # PEFT drops token types (with a warning) under prompt and prefix tuning on a causal LM: refused, not
    # computed another way
    for cfg, msg in ((jpeft.PromptTuningConfig(num_virtual_tokens=2), "prompt tuning: token_type_ids"),
                     (jpeft.PrefixTuningConfig(num_virtual_tokens=2), "token_type_ids cannot be used with prefix")):
        ad = jpeft.init(cfg, params, jax.random.key(1), model, jnp.asarray(ids))
        with pytest.raises(InputValidationError, match=msg):
            jpeft.apply(model, params, ad, jnp.asarray(ids), token_type_ids=jnp.asarray(tt))


def test_a_list_of_end_ids_in_config_json_keeps_the_gpt2_config_hashable(tmp_path):
    """transformers' GPT2Config takes a list of eos ids (as Llama 3.1's config.json has); jpeft's
    GPT2Config kept the list, so the config was unhashable and jpeft.generate (whose model is a
    static argument) failed with a raw JAX 'Non-hashable static arguments' error. The ids are a tuple
    now in every family, and generation stops at them as transformers' does."""
    import torch

    hf, folder = T.hf_model("gpt2")
    ids, mask = T.batch("gpt2", seed=6)
    model, params = loaded("gpt2")
    free = np.asarray(jpeft.generate(model, params, None, ids, 8, attention_mask=mask))
    eos = [int(free[0, 10]), int(free[1, 8])]
    shutil.copytree(folder, tmp_path / "m")
    with open(tmp_path / "m" / "config.json") as f:
        d = json.load(f)
    with open(tmp_path / "m" / "config.json", "w") as f:
        json.dump(dict(d, eos_token_id=eos), f)
    model, params = M.from_pretrained(str(tmp_path / "m"))
    assert model.config.eos_token_id == tuple(eos) and hash(model.config) == hash(model.config.replace())
    out = np.asarray(jpeft.generate(model, params, None, ids, 8, attention_mask=mask,
                                    eos_token_id=model.config.eos_token_id))
    with torch.no_grad():
        ref = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=8, do_sample=False,
                          eos_token_id=eos, pad_token_id=0).numpy()
    assert (ref[:2, 11:] == 0).all()  # rows 0 and 1 ended: the ids are read
    np.testing.assert_array_equal(out, ref)
    lcfg = M.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                         bos_token_id=[1], eos_token_id=[2, 3], pad_token_id=0)
    assert (lcfg.bos_token_id, lcfg.eos_token_id) == ((1,), (2, 3)) and hash(lcfg)


@pytest.mark.parametrize("family", ["llama2", "bert"])
def test_lists_and_torch_tensors_as_model_inputs_are_refused_by_name(family):
    """A tokenizer's lists (tokenizer(texts)["input_ids"]) or its torch tensors (return_tensors="pt")
    passed to model.apply failed with a raw AttributeError ('list' object has no attribute 'ndim') or
    TypeError (Cannot interpret 'torch.int64' as a data type); the error now names the input and the
    conversion. numpy and JAX arrays run as before. inputs_embeds of another width than the model's
    hidden size failed with a raw TypeError deep in the first layer; named too."""
    import torch

    model, params = loaded(family)
    ids, mask = T.batch(family)
    want = np.asarray(model.apply(params, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    np.testing.assert_array_equal(np.asarray(model.apply(params, ids, attention_mask=mask)), want)
    for kw, name in ((dict(input_ids=ids.tolist(), attention_mask=mask), "input_ids"),
                     (dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)), "input_ids"),
                     (dict(input_ids=ids, attention_mask=mask.tolist()), "attention_mask")):
        with pytest.raises(InputValidationError, match=f"{name} must be a numpy or JAX array"):
            model.apply(params, **kw)
    with pytest.raises(InputValidationError, match="inputs_embeds must be .* hidden size 32"):
        model.apply(params, None, jnp.asarray(mask), inputs_embeds=jnp.ones(ids.shape + (7,)))


# -- rotary scaling types against transformers ----------------------------------------------------

_ROPE_CASES = {  # (rope parameters, max_position_embeddings): every type, the optional yarn/longrope fields set
    "default": ({"rope_type": "default"}, 32),
    "linear": ({"rope_type": "linear", "factor": 2.5}, 32),
    "llama3": ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16}, 32),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 8,
              "beta_slow": 2}, 64),
    "yarn_mscale": ({"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 16, "mscale": 0.8,
                     "mscale_all_dim": 0.5, "truncate": False}, 48),
    "yarn_attention_factor": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                               "attention_factor": 1.3}, 64),
    "longrope": ({"rope_type": "longrope", "short_factor": [1.0, 1.3, 1.7, 2.1], "long_factor": [2.0, 3.5, 5.0, 7.5],
                  "original_max_position_embeddings": 16}, 64),
    "longrope_factor": ({"rope_type": "longrope", "short_factor": [1.0, 1.3, 1.7, 2.1],
                         "long_factor": [2.0, 3.5, 5.0, 7.5], "original_max_position_embeddings": 16, "factor": 3.0}, 64),
    "dynamic": ({"rope_type": "dynamic", "factor": 3.0}, 16),
}


def _rope_hf_config(case, family="llama", **kw):
    import transformers as t

    rope, mpe = _ROPE_CASES[case]
    cls = {"llama": t.LlamaConfig, "mistral": t.MistralConfig, "qwen2": t.Qwen2Config}[family]
    common = dict(vocab_size=T.VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=mpe, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return cls(**dict(common, **kw), rope_parameters=dict(copy.deepcopy(rope), rope_theta=10000.0))


@pytest.mark.parametrize("case", list(_ROPE_CASES))
def test_rotary_cos_sin_equal_transformers_at_every_length(case):
    """cos and sin (attention factor included) of each rope type equal transformers' rotary
    embedding for calls shorter and longer than original_max_position_embeddings (16) and
    max_position_embeddings: longrope switches to its long factors past 16, dynamic NTK grows its
    base past max_position_embeddings; jpeft refused yarn, longrope and dynamic."""
    import torch
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from jpeft.models import _layers as L

    hf_config = _rope_hf_config(case)
    config = M.config_from_hf(hf_config.to_dict())
    rotary = LlamaRotaryEmbedding(hf_config)  # stateful for dynamic: the lengths only grow, as in generation
    for n in (8, 16, 17, 33, 50):
        with torch.no_grad():
            cos, sin = rotary(torch.zeros(1, n, 8), torch.arange(n)[None])
        got = L.rotary(jnp.arange(n)[None], config)
        np.testing.assert_allclose(np.asarray(got[0]), cos.numpy(), atol=2e-6, rtol=0)
        np.testing.assert_allclose(np.asarray(got[1]), sin.numpy(), atol=2e-6, rtol=0)


@functools.lru_cache(maxsize=None)
def _rope_peft_model(case, family):
    """A tiny transformers model of ``family`` with ``case``'s rope and a PEFT LoRA whose every
    tensor is random, saved; with the jpeft model, params and adapter loaded from the folders."""
    import tempfile

    import transformers as t

    cls = {"llama": t.LlamaForCausalLM, "mistral": t.MistralForCausalLM, "qwen2": t.Qwen2ForCausalLM}[family]
    kw = {"llama": dict(attention_bias=True), "mistral": dict(sliding_window=None), "qwen2": {}}[family]
    hf = T._randomize(cls(_rope_hf_config(case, family, **kw)), seed=3)
    folder = tempfile.mkdtemp(dir=T.ROOT)
    hf.save_pretrained(folder + "/base")
    pm = T.peft_with_adapters(hf, {"default": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                      "down_proj"])})
    pm.save_pretrained(folder + "/lora")
    model, params = M.from_pretrained(folder + "/base")
    _, adapter = jpeft.hf.load_peft(folder + "/lora", params)
    return pm, model, params, adapter


@pytest.mark.parametrize("case, family", [("yarn", "qwen2"), ("longrope", "llama"), ("dynamic", "mistral")])
def test_scaled_rope_model_with_lora_equals_peft_past_the_original_length(case, family):
    """Logits of a loaded yarn / longrope / dynamic checkpoint with a random LoRA equal transformers
    + PEFT on a left-padded batch whose longest row (24 tokens) runs past the original length
    (16) and one whose rows all stay within it (the short factors, the unscaled NTK base)."""
    import torch

    pm, model, params, adapter = _rope_peft_model(case, family)
    fwd = jax.jit(lambda p, a, i, m: jpeft.apply(model, p, a, i, attention_mask=m))
    rng = np.random.default_rng(0)
    # the short batch first: transformers' dynamic NTK keeps the base of its longest call so far until a call
    # shorter than max_position_embeddings (path-dependent); jpeft's is that of each call, a fresh model's
    for lengths in ([12, 5, 16], [24, 17, 9]):
        s = max(lengths)
        mask = np.array([[0] * (s - n) + [1] * n for n in lengths])
        ids = np.where(mask == 1, rng.integers(3, T.VOCAB, size=mask.shape), 0)
        with torch.no_grad():
            want = pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                      position_ids=torch.tensor(T.positions(mask))).logits.numpy()
        got = np.asarray(fwd(params, adapter, jnp.asarray(ids), jnp.asarray(mask)))
        sel = mask.astype(bool)
        np.testing.assert_allclose(got[sel], want[sel], atol=1e-4, rtol=0)
        assert np.abs(want).max() > 0.5


@pytest.mark.parametrize("case, family", [("longrope", "llama"), ("dynamic", "mistral")])
def test_length_dependent_rope_generates_as_transformers_past_the_original_length(case, family):
    """Greedy generation with the KV cache growing past the length where longrope switches to its
    long factors and dynamic NTK starts growing its base (16): each step rotates with the
    frequencies of its own length while the cached keys keep theirs, token for token as
    transformers + PEFT."""
    import torch

    pm, model, params, adapter = _rope_peft_model(case, family)
    ids, mask = T.batch("llama", seed=2)  # [3, 8], left padded
    out = np.asarray(jpeft.generate(model, params, adapter, jnp.asarray(ids), 16, attention_mask=jnp.asarray(mask)))
    with torch.no_grad():
        ref = pm.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=16,
                          do_sample=False, pad_token_id=0, eos_token_id=None).numpy()
    np.testing.assert_array_equal(out, ref)
    assert len(set(out[:, 8:].ravel().tolist())) > 3


def test_packed_documents_take_the_frequencies_of_their_own_length_not_the_paddings():
    """A packed row's padding tail restarts its positions (a document of its own): after documents
    of 6 and 5 tokens, 19 padding tokens made the call "19 long", so longrope took its long
    factors (past 16) for both documents (1.8 off their logits). The call's length is now that
    of its real tokens: each document equals transformers + PEFT on it alone."""
    import torch

    pm, model, params, adapter = _rope_peft_model("longrope", "llama")
    rng = np.random.default_rng(1)
    docs = [rng.integers(3, T.VOCAB, 6), rng.integers(3, T.VOCAB, 5)]
    ids = np.concatenate(docs + [np.zeros(19, np.int64)])[None]
    seg = np.concatenate([np.full(6, 1), np.full(5, 2), np.zeros(19, np.int64)])[None]
    got = np.asarray(jpeft.apply(model, params, adapter, jnp.asarray(ids), attention_mask=jnp.asarray(seg > 0),
                                 segment_ids=jnp.asarray(seg)))
    start = 0
    for d in docs:
        with torch.no_grad():
            want = pm(input_ids=torch.tensor(d[None])).logits.numpy()[0]
        np.testing.assert_allclose(got[0, start:start + len(d)], want, atol=1e-4, rtol=0)
        start += len(d)
