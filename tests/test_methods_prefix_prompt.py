"""Prefix tuning and prompt tuning on jpeft's models: references computed by hand through the
models' own ``prefix_kv`` / ``inputs_embeds`` inputs, positions and masks, and the named errors."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
import jpeft.models
from jpeft import PrefixMLPWeights, PrefixTuningConfig, PrefixWeights, PromptTuningConfig, PromptWeights, fold_prefix, to_prefix

T = 3


@functools.lru_cache(maxsize=None)
def _llama(**kw):
    cfg = jpeft.models.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4,
                                   num_kv_heads=2, max_position_embeddings=32, **kw)
    model = jpeft.models.LlamaForCausalLM(cfg)
    ids = jax.random.randint(jax.random.key(5), (2, 6), 0, 40)
    return model, model.init(jax.random.key(0), ids), ids


@functools.lru_cache(maxsize=None)
def _gpt2():
    cfg = jpeft.models.GPT2Config(vocab_size=40, hidden_size=16, num_layers=2, num_heads=2, max_position_embeddings=12)
    model = jpeft.models.GPT2LMHeadModel(cfg)
    ids = jax.random.randint(jax.random.key(5), (2, 6), 0, 40)
    return model, model.init(jax.random.key(0), ids), ids


MASK = jnp.array([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])


def test_prefix_equals_manual_prefix_kv_and_shifted_positions():
    model, params, ids = _llama()
    ad = jpeft.init(PrefixTuningConfig(num_virtual_tokens=T), params, jax.random.key(1))
    node = ad[""]
    assert (node.num_layers, node.token_dim, node.prefix_embeddings.shape) == (2, 8, (T, 2 * 2 * 8))
    got = jpeft.apply(model, params, ad, ids, MASK)
    # reference: Hugging Face's layout [T, L*2, H, hd]; layer i keys at 2i, values at 2i+1
    kv = node.prefix_embeddings.reshape(T, 4, 2, 4)
    prefix_kv = [(kv[None, :, 2 * i], kv[None, :, 2 * i + 1]) for i in range(2)]
    pos = jnp.maximum(jnp.cumsum(MASK, axis=1) - 1, 0) + T
    ref = model.apply(params, ids, MASK, prefix_kv=prefix_kv, position_ids=pos)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # explicit positions for the real tokens are shifted past the prefix, as PEFT does
    p = jnp.broadcast_to(jnp.arange(6)[None], (2, 6))
    np.testing.assert_allclose(jpeft.apply(model, params, ad, ids, MASK, position_ids=p),
                               model.apply(params, ids, MASK, prefix_kv=prefix_kv, position_ids=p + T), rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, model.apply(params, ids, MASK))


def test_prefix_projection_folds_and_trains():
    model, params, ids = _llama()
    cfg = PrefixTuningConfig(num_virtual_tokens=T, prefix_projection=True, encoder_hidden_size=12)
    ad = jpeft.init(cfg, params, jax.random.key(1))
    node = ad[""]
    assert isinstance(node, PrefixMLPWeights) and node.w1.shape == (8, 12) and node.w2.shape == (12, 32)
    ref = jnp.tanh(node.embedding @ node.w1 + node.b1[None]) @ node.w2 + node.b2[None]
    folded = fold_prefix(ad)
    assert isinstance(folded[""], PrefixWeights)
    np.testing.assert_allclose(folded[""].prefix_embeddings, ref, rtol=1e-6)
    np.testing.assert_allclose(jpeft.apply(model, params, folded, ids), jpeft.apply(model, params, ad, ids), rtol=1e-5, atol=1e-5)
    zero = jpeft.init(cfg.replace(init_weights="zero"), params, jax.random.key(1))
    np.testing.assert_array_equal(fold_prefix(zero)[""].prefix_embeddings, 0.0)


def test_prefix_generation_with_cache_matches_full_recompute():
    model, params, ids = _llama()
    ad = jpeft.init(PrefixTuningConfig(num_virtual_tokens=T), params, jax.random.key(1))
    cache = model.init_cache(2, 8)
    logits, cache = jpeft.apply(model, params, ad, ids, MASK, cache=cache)
    nxt = jnp.argmax(logits[:, -1], -1)[:, None]
    step, _ = jpeft.apply(model, params, ad, nxt, jnp.ones((2, 1), jnp.int32), cache=cache)
    full = jpeft.apply(model, params, ad, jnp.concatenate([ids, nxt], 1), jnp.concatenate([MASK, jnp.ones((2, 1), jnp.int32)], 1))
    np.testing.assert_allclose(step[:, 0], full[:, -1], rtol=1e-4, atol=1e-4)
    # jpeft.generate with the prefix adapter: greedy tokens equal step-by-step full recomputation
    out = jpeft.generate(model, params, ad, ids, 2, attention_mask=MASK)
    seq, mask = ids, MASK
    for _ in range(2):
        tok = jnp.argmax(jpeft.apply(model, params, ad, seq, mask)[:, -1], -1)[:, None].astype(seq.dtype)
        seq, mask = jnp.concatenate([seq, tok], 1), jnp.concatenate([mask, jnp.ones((2, 1), mask.dtype)], 1)
    np.testing.assert_array_equal(out, seq)


def test_prefix_errors():
    class NoPrefix(nn.Module):
        @nn.compact
        def __call__(self, ids):
            h = nn.Embed(10, 8)(ids)
            return nn.Dense(8, name="k_proj")(h)

    m = NoPrefix()
    ids = jnp.ones((1, 4), jnp.int32)
    p = m.init(jax.random.key(0), ids)
    ad = jpeft.init(PrefixTuningConfig(num_virtual_tokens=2, num_attention_heads=2), p, jax.random.key(0))
    with pytest.raises(jpeft.errors.PrefixNotSupportedError, match="takes no prefix_kv"):
        jpeft.apply(m, p, ad, ids)
    with pytest.raises(jpeft.NotMergeableError, match="key/value positions"):
        jpeft.merge(p, ad)
    model, params, ids = _gpt2()
    ad = jpeft.init(PrefixTuningConfig(num_virtual_tokens=8), params, jax.random.key(0))
    with pytest.raises(jpeft.errors.PromptTooLongError, match="max_position_embeddings=12"):
        jpeft.apply(model, params, ad, ids)
    lmodel, lparams, _ = _llama()
    with pytest.raises(jpeft.ShapeMismatchError, match="Re-create the adapter"):
        jpeft.apply(lmodel, lparams, jpeft.init(PrefixTuningConfig(num_virtual_tokens=2), params, jax.random.key(0)), ids)
    with pytest.raises(jpeft.ConfigError, match="num_layers"):
        jpeft.init(PrefixTuningConfig(), {"params": {"dense": {"kernel": jnp.ones((2, 2))}}}, jax.random.key(0))


def test_prefix_num_attention_heads_other_than_the_kv_heads_is_named(tmp_path):
    """PrefixTuningConfig.num_attention_heads is the key/value head count. Given the query heads
    (4 on a model with 2 kv heads), apply named the widths as if the adapter were for another
    model, and save_peft wrote the value: PEFT splits the prefix with it on GPT-2 (a raw torch
    error) and silently overrides it on grouped-query models."""
    import json

    model, params, ids = _llama()  # 4 query heads, 2 key/value heads of width 4: token_dim 8
    ad = jpeft.init(PrefixTuningConfig(num_virtual_tokens=2, num_attention_heads=4), params, jax.random.key(0))
    with pytest.raises(jpeft.ShapeMismatchError, match="num_attention_heads=4.*2 key/value heads.*set it to 2"):
        jpeft.apply(model, params, ad, ids)
    right = jpeft.init(PrefixTuningConfig(num_virtual_tokens=2, num_attention_heads=2), params, jax.random.key(0))
    assert jpeft.apply(model, params, right, ids).shape == (2, 6, 40)
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "num_attention_heads": 4,
                                                  "num_key_value_heads": 2, "hidden_size": 16, "num_hidden_layers": 2}))
    with pytest.raises(jpeft.errors.UnsupportedAdapterError, match="num_attention_heads=4.*2 key/value heads"):
        jpeft.hf.save_peft(str(tmp_path / "out"), PrefixTuningConfig(num_virtual_tokens=2, num_attention_heads=4), ad,
                           base_model_name_or_path=str(base))
    assert not (tmp_path / "out" / "adapter_config.json").exists()
    jpeft.hf.save_peft(str(tmp_path / "ok"), PrefixTuningConfig(num_virtual_tokens=2), right,
                       base_model_name_or_path=str(base))
    assert json.loads((tmp_path / "ok" / "adapter_config.json").read_text())["num_attention_heads"] == 2


def test_prompt_equals_manual_inputs_embeds_with_mask_and_positions():
    model, params, ids = _llama()
    ad = jpeft.init(PromptTuningConfig(num_virtual_tokens=T), params, jax.random.key(1))
    node = ad[""]
    assert node.embed_path == "model/embed_tokens" and node.embedding.shape == (T, 16)
    got = jpeft.apply(model, params, ad, ids, MASK)
    table = params["params"]["model"]["embed_tokens"]["embedding"]
    emb = jnp.concatenate([jnp.broadcast_to(node.embedding[None], (2, T, 16)), table[ids]], axis=1)
    mask = jnp.concatenate([jnp.ones((2, T), MASK.dtype), MASK], axis=1)
    ref = model.apply(params, inputs_embeds=emb, attention_mask=mask)[:, T:]
    assert got.shape == (2, 6, 40)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # explicit positions: virtual tokens at 0..T-1, real tokens shifted by T
    p = jnp.broadcast_to(jnp.arange(6)[None], (2, 6))
    full_p = jnp.concatenate([jnp.broadcast_to(jnp.arange(T)[None], (2, T)), p + T], axis=1)
    np.testing.assert_allclose(jpeft.apply(model, params, ad, ids, MASK, position_ids=p),
                               model.apply(params, inputs_embeds=emb, attention_mask=mask, position_ids=full_p)[:, T:],
                               rtol=1e-5, atol=1e-5)


def test_to_prefix_in_bfloat16_equals_the_prompt_it_replaces():
    """On a bfloat16 model prompt tuning prepends its (float32) virtual tokens cast to the embedding table's dtype,
    as PEFT casts them; to_prefix ran them through the model in float32, so on GPT-2 (whose positions are added to
    the embeddings before the cast) the prefix gave logits 0.0098 off the prompt's, where the two must be one
    computation."""
    cfg = jpeft.models.GPT2Config(vocab_size=40, hidden_size=16, num_layers=2, num_heads=2, max_position_embeddings=12,
                                  dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    model = jpeft.models.GPT2LMHeadModel(cfg)
    ids = jax.random.randint(jax.random.key(5), (2, 6), 0, 40)
    leaves, tree = jax.tree.flatten(model.init(jax.random.key(0), ids))
    keys = jax.random.split(jax.random.key(1), len(leaves))  # every weight at a useful scale, not the init's 0.02
    params = jax.tree.unflatten(tree, [(0.3 * jax.random.normal(k, x.shape)).astype(x.dtype) for x, k in zip(leaves, keys)])
    prompt = jpeft.init(PromptTuningConfig(num_virtual_tokens=T), params, jax.random.key(2))
    assert prompt[""].embedding.dtype == jnp.float32
    want = np.asarray(jpeft.apply(model, params, prompt, ids), np.float32)
    got = np.asarray(jpeft.apply(model, params, to_prefix(model, params, prompt), ids), np.float32)
    np.testing.assert_array_equal(got, want)


def test_prompt_inits():
    model, params, _ = _llama()
    table = params["params"]["model"]["embed_tokens"]["embedding"]
    ad = jpeft.init(PromptTuningConfig(num_virtual_tokens=5, prompt_tuning_init="TEXT", init_token_ids=[7, 9]), params, jax.random.key(0))
    np.testing.assert_array_equal(ad[""].embedding, table[jnp.array([7, 9, 7, 9, 7])])
    sv = jpeft.init(PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="SAMPLE_VOCAB"), params, jax.random.key(0))[""].embedding
    assert all(bool(jnp.any(jnp.all(jnp.abs(table - row[None]) < 1e-7, axis=1))) for row in sv)
    with pytest.raises(jpeft.ConfigError, match="outside the vocabulary"):
        jpeft.init(PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT", init_token_ids=[99]), params, jax.random.key(0))
    with pytest.raises(jpeft.ConfigError, match="tokenizer_name_or_path"):
        PromptTuningConfig(prompt_tuning_init="TEXT")


def test_prompt_text_init_with_a_local_tokenizer(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {"[UNK]": 0, "classify": 5, "the": 6, "sentiment": 7}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(str(tmp_path))
    model, params, _ = _llama()
    cfg = PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="TEXT", prompt_tuning_init_text="classify the sentiment",
                             tokenizer_name_or_path=str(tmp_path))
    emb = jpeft.init(cfg, params, jax.random.key(0))[""].embedding
    table = params["params"]["model"]["embed_tokens"]["embedding"]
    np.testing.assert_array_equal(emb, table[jnp.array([5, 6, 7, 5])])


def test_prompt_text_init_never_trusts_remote_code(tmp_path, monkeypatch):
    """A TEXT init's tokenizer_kwargs may come from an adapter_config.json; as PEFT's
    PromptEmbedding, jpeft drops trust_remote_code (the folder's tokenizer code is never run)."""
    transformers = pytest.importorskip("transformers")
    seen = []
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda name, **kw: seen.append(kw) or (lambda text: {"input_ids": [5, 6]}))
    _, params, _ = _llama()
    cfg = PromptTuningConfig.from_dict({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3, "prompt_tuning_init": "TEXT",
                                        "prompt_tuning_init_text": "classify the", "tokenizer_name_or_path": str(tmp_path),
                                        "tokenizer_kwargs": {"trust_remote_code": True, "use_fast": True}})
    emb = jpeft.init(cfg, params, jax.random.key(0))[""].embedding
    np.testing.assert_array_equal(emb, params["params"]["model"]["embed_tokens"]["embedding"][jnp.array([5, 6, 5])])
    assert seen == [{"use_fast": True, "local_files_only": True}]


def test_prompt_errors_and_to_prefix():
    model, params, ids = _gpt2()
    ad = jpeft.init(PromptTuningConfig(num_virtual_tokens=7), params, jax.random.key(0))
    with pytest.raises(jpeft.errors.PromptTooLongError, match="at most 5 tokens"):
        jpeft.apply(model, params, ad, ids)
    with pytest.raises(jpeft.NotMergeableError):
        jpeft.merge(params, ad)
    lmodel, lparams, lids = _llama()
    pad = jpeft.init(PromptTuningConfig(num_virtual_tokens=T), lparams, jax.random.key(0))
    with pytest.raises(jpeft.InputValidationError, match="to_prefix"):
        jpeft.apply(lmodel, lparams, pad, lids, cache=lmodel.init_cache(2, 12))
    # the equivalent prefix adapter gives the same logits and works with a cache
    pre = to_prefix(lmodel, lparams, pad)
    real = np.asarray(MASK).astype(bool)  # padded positions' outputs are don't-cares
    np.testing.assert_allclose(np.asarray(jpeft.apply(lmodel, lparams, pre, lids, MASK))[real],
                               np.asarray(jpeft.apply(lmodel, lparams, pad, lids, MASK))[real], rtol=1e-4, atol=1e-5)
    # under a sliding window the prefix leaves the window as the virtual tokens do
    smodel, sparams, sids = _llama(sliding_window=2)
    spad = jpeft.init(PromptTuningConfig(num_virtual_tokens=T), sparams, jax.random.key(0))
    spre = to_prefix(smodel, sparams, spad)
    np.testing.assert_allclose(np.asarray(jpeft.apply(smodel, sparams, spre, sids, MASK))[real],
                               np.asarray(jpeft.apply(smodel, sparams, spad, sids, MASK))[real], rtol=1e-4, atol=1e-5)

    class NoEmbeds(nn.Module):
        @nn.compact
        def __call__(self, ids):
            return nn.Embed(10, 4, name="embed_tokens")(ids)

    m = NoEmbeds()
    p = m.init(jax.random.key(0), jnp.ones((1, 2), jnp.int32))
    with pytest.raises(jpeft.errors.UnsupportedModuleError, match="inputs_embeds"):
        jpeft.apply(m, p, jpeft.init(PromptTuningConfig(num_virtual_tokens=2), p, jax.random.key(0)), jnp.ones((1, 2), jnp.int32))

