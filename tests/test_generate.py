"""jpeft.generate: greedy tokens identical to transformers' generate for every decoder family,
adapters of any kind through jpeft.apply (checked against cache-free decoding), sampling
options, EOS, and bad input."""

import copy
import dataclasses
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import _models_tiny as T  # noqa: E402

import jpeft  # noqa: E402
from jpeft import models as M  # noqa: E402
from jpeft.errors import InputValidationError  # noqa: E402
from jpeft.methods.base import Site  # noqa: E402


@functools.lru_cache(maxsize=None)
def loaded(family):
    return M.from_pretrained(T.hf_model(family)[1])


@pytest.mark.parametrize("family", T.DECODERS)
def test_greedy_equals_transformers_generate(family):
    import torch

    hf, _ = T.hf_model(family)
    ids, mask = T.batch(family, seed=1)
    model, params = loaded(family)
    out = np.asarray(jpeft.generate(model, params, None, jnp.asarray(ids), 20, attention_mask=jnp.asarray(mask)))
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=20,
                          do_sample=False, pad_token_id=0).numpy()
    assert out.shape == (3, 28)
    np.testing.assert_array_equal(out, ref)
    assert len(set(out[:, 8:].ravel().tolist())) > 3  # not a degenerate repetition


def _naive_greedy(model, params, adapter, ids, mask, n):
    """Reference without a cache: the whole (fixed-length, causally masked) buffer is re-run
    for every new token; positions after the current one cannot influence it."""
    b, s = ids.shape
    buf = np.concatenate([np.asarray(ids), np.zeros((b, n), np.asarray(ids).dtype)], axis=1)
    m = np.concatenate([np.asarray(mask), np.zeros((b, n), np.asarray(mask).dtype)], axis=1)
    fwd = jax.jit(lambda p, a, i, mm: jpeft.apply(model, p, a, i, attention_mask=mm))
    for t in range(n):
        logits = fwd(params, adapter, jnp.asarray(buf), jnp.asarray(m))
        buf[:, s + t] = np.asarray(jnp.argmax(logits[:, s + t - 1], axis=-1))
        m[:, s + t] = 1
    return buf


def test_lora_adapter_equals_merged_and_cache_free_decoding():
    model, params = loaded("llama3")
    ids, mask = T.batch("llama3", seed=2)
    cfg = jpeft.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_weights="random")
    adapter = jpeft.init(cfg, params, jax.random.key(3))
    out = np.asarray(jpeft.generate(model, params, adapter, ids, 8, attention_mask=mask))
    merged = np.asarray(jpeft.generate(model, jpeft.merge(params, adapter), None, ids, 8, attention_mask=mask))
    base = np.asarray(jpeft.generate(model, params, None, ids, 8, attention_mask=mask))
    np.testing.assert_array_equal(out, merged)
    np.testing.assert_array_equal(out, _naive_greedy(model, params, adapter, ids, mask, 8))
    assert not np.array_equal(out, base)
    # deterministic and compiled once per shape
    again = np.asarray(jpeft.generate(model, params, adapter, ids, 8, attention_mask=mask))
    np.testing.assert_array_equal(out, again)


def _peft_config(method, family):
    import peft

    gpt2 = family == "gpt2"
    targets = ["c_attn", "c_fc"] if gpt2 else ["q_proj", "v_proj", "up_proj"]
    if method in ("lora", "dora"):
        return peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=method == "dora",
                               fan_in_fan_out=gpt2)
    if method == "tti":  # a third of the vocabulary: generated tokens fed back hit the adapter's rows
        return peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=gpt2,
                               trainable_token_indices=list(range(3, T.VOCAB, 3)))
    if method == "ia3":
        sites, ff = ((["c_attn", "mlp.c_proj"], ["mlp.c_proj"]) if gpt2 else
                     (["k_proj", "v_proj", "down_proj"], ["down_proj"]))
        return peft.IA3Config(target_modules=sites, feedforward_modules=ff, fan_in_fan_out=gpt2)
    if method == "oft":
        return peft.OFTConfig(r=0, oft_block_size=4, target_modules=targets)
    if method == "prompt":
        return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    return peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)


def _peft_forward_greedy(pm, ids, mask, n, positions=True):
    """(tokens, per-step logits [n, batch, vocab]) of greedy decoding by the ``PeftModel``'s forward over the whole
    sequence, with generate's position ids (``positions``)."""
    import torch

    seq, m, logits = torch.tensor(ids), torch.tensor(mask), []
    for _ in range(n):
        kw = {"position_ids": torch.tensor(T.positions(m.numpy()))} if positions else {}
        lg = pm(input_ids=seq, attention_mask=m, **kw).logits[:, -1]
        logits.append(lg.numpy())
        seq = torch.cat([seq, lg.argmax(-1)[:, None]], 1)
        m = torch.cat([m, torch.ones((len(ids), 1), dtype=m.dtype)], 1)
    return seq.numpy(), np.stack(logits)


@pytest.mark.parametrize("family,method", [("mistral", "lora"), ("llama3", "dora"), ("qwen2", "ia3"),
                                           ("gpt2", "dora"), ("qwen2", "prefix"), ("llama3", "tti"),
                                           ("mistral", "oft"), ("qwen3", "prompt")])
def test_peft_adapters_generate_transformers_tokens_and_logits_at_every_step(family, method, tmp_path):
    """A PEFT adapter (every tensor random) loaded into jpeft generates, on a left-padded batch of prompts of
    8, 6 and 3 tokens, 14 new tokens (past Mistral's window of 5 and Qwen2's 4; grouped-query heads; Llama 3's,
    Qwen2's, Qwen3's and GPT-2's tied embeddings, where trainable tokens act in the tied output layer too) equal to
    transformers' ``generate`` on the ``PeftModel``, and the logits of the cached decoding path (the prefill, then
    one token a step, as ``jpeft.generate`` runs them) equal transformers' ``output_logits`` at every step within
    1e-4 (measured: under 1e-5). Prefix tuning's reference is greedy decoding by the ``PeftModel``'s forward over
    the whole sequence with generate's position ids: peft 0.21's ``generate`` with a prefix on transformers 5 gives
    other tokens than its own forward, even unpadded; peft 0.22's gives the forward's. Prompt tuning (through
    ``jpeft.to_prefix``) is compared with the ``PeftModel``'s forward on each prompt alone: PEFT's forward and
    generate drop the position ids of prompt tuning, so in a left-padded batch a padded row's positions count its
    padding (docs/MODELS.md); jpeft gives each row the prompt alone's tokens."""
    import peft
    import torch

    from jpeft.models._layers import init_cache

    hf, _ = T.hf_model(family)
    model, params = loaded(family)
    pm = T.perturb_trainable(peft.get_peft_model(copy.deepcopy(hf), _peft_config(method, family)), 11)
    pm.save_pretrained(str(tmp_path))
    _, adapter = jpeft.hf.load_peft(str(tmp_path), params)
    if method == "prompt":
        adapter = jpeft.to_prefix(model, params, adapter)
    ids, mask = T.batch(family, seed=1)
    n = 14
    out = np.asarray(jpeft.generate(model, params, adapter, jnp.asarray(ids), n, attention_mask=jnp.asarray(mask)))
    with torch.no_grad():
        if method == "prefix":
            ref, ref_logits = _peft_forward_greedy(pm, ids, mask, n)
            r = pm.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=n,
                            do_sample=False, pad_token_id=0, eos_token_id=None)
            assert np.array_equal(r.numpy(), ref) == T.peft_at_least(0, 22)  # fixed in peft 0.22
        elif method == "prompt":
            alone = [_peft_forward_greedy(pm, i[m == 1][None], m[m == 1][None], n, positions=False)
                     for i, m in zip(ids, mask)]
            ref = np.stack([np.concatenate([i[m == 0], a[0][0]]) for (i, m), a in zip(zip(ids, mask), alone)])
            ref_logits = np.concatenate([a[1] for a in alone], axis=1)
            gen_alone = [pm.generate(input_ids=torch.tensor(i[m == 1][None]), max_new_tokens=n, do_sample=False,
                                     pad_token_id=0, eos_token_id=None).numpy()[0] for i, m in zip(ids, mask)]
            # PEFT's own generate on each prompt alone: its forward's tokens from peft 0.22 on, not before
            assert all(np.array_equal(g, a[0][0]) for g, a in zip(gen_alone, alone)) == T.peft_at_least(0, 22)
        else:
            r = pm.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=n,
                            do_sample=False, pad_token_id=0, eos_token_id=None, output_logits=True,
                            return_dict_in_generate=True)
            ref, ref_logits = r.sequences.numpy(), [lg.numpy() for lg in r.logits]
    np.testing.assert_array_equal(out, ref)
    # the cached path's logits at each step, fed transformers' tokens
    prefill = jax.jit(lambda a, x, mm, c: jpeft.apply(model, params, a, x, attention_mask=mm, cache=c))
    one = jnp.ones((3, 1), jnp.int32)
    step = jax.jit(lambda a, x, c: jpeft.apply(model, params, a, x, attention_mask=one, cache=c))
    logits, cache = prefill(adapter, jnp.asarray(ids), jnp.asarray(mask), init_cache(model.config, 3, 8 + n - 1))
    got = [np.asarray(logits[:, -1])]
    for t in range(1, n):
        logits, cache = step(adapter, jnp.asarray(ref[:, 8 + t - 1:8 + t]), cache)
        got.append(np.asarray(logits[:, -1]))
    np.testing.assert_allclose(np.stack(got), np.stack(ref_logits), atol=1e-4, rtol=0)
    base = np.asarray(jpeft.generate(model, params, None, jnp.asarray(ids), n, attention_mask=jnp.asarray(mask)))
    assert not np.array_equal(out, base) and len(set(out[:, 8:].ravel().tolist())) > 3  # the adapter matters


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _PrefixNode(Site):
    """A prefix node written the way another method would: it injects ``prefix_kv`` into the
    attention module's call."""

    k: jax.Array
    v: jax.Array

    def intercept(self, call):
        kw = dict(call.kwargs)
        kw["prefix_kv"] = (self.k, self.v)
        return call.next_fun(*call.args, **kw)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _RowBias(Site):
    """A per-example routed node: row ``i`` of the batch gets its own output bias."""

    bias: jax.Array  # [batch, out]

    def intercept(self, call):
        y = call.run()
        return y + self.bias[:, None, :].astype(y.dtype)


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_any_adapter_node_goes_through_jpeft_apply(family):
    model, params = loaded(family)
    c = model.config
    ids, mask = T.batch(family, seed=3)
    key = jax.random.key(0)
    attn = "self_attn" if family == "qwen2" else "attn"
    stack = "model/layers" if family == "qwen2" else "transformer/h"
    adapter = {
        f"{stack}_{i}/{attn}": _PrefixNode(
            jax.random.normal(jax.random.fold_in(key, i), (1, 3, c.num_kv_heads, c.head_dim)),
            jax.random.normal(jax.random.fold_in(key, 10 + i), (1, 3, c.num_kv_heads, c.head_dim)),
        )
        for i in range(c.num_layers)
    }
    out_mod = f"{stack}_1/mlp/down_proj" if family == "qwen2" else "transformer/h_1/mlp/c_proj"
    adapter[out_mod] = _RowBias(jax.random.normal(key, (3, c.hidden_size)))
    out = np.asarray(jpeft.generate(model, params, adapter, ids, 6, attention_mask=mask))
    np.testing.assert_array_equal(out, _naive_greedy(model, params, adapter, ids, mask, 6))
    assert not np.array_equal(out, np.asarray(jpeft.generate(model, params, None, ids, 6, attention_mask=mask)))


@pytest.mark.parametrize("family", ["llama2", "mistral", "qwen2"])
def test_left_and_right_padding_give_each_prompts_own_tokens(family):
    """Padding on either side gives each row what its prompt alone gives, also past the
    sliding window (Mistral 5, Qwen2 4 slots), where a right-padded prompt's padding lies in
    the cache between its last real token and the new ones and must not take window places."""
    model, params = loaded(family)
    ids, mask = T.batch(family, seed=4)
    n = 10
    left = np.asarray(jpeft.generate(model, params, None, ids, n, attention_mask=mask))
    right_ids = np.stack([np.roll(r, -int((m == 0).sum())) for r, m in zip(ids, mask)])
    right_mask = np.stack([np.roll(m, -int((m == 0).sum())) for m in mask])
    right = np.asarray(jpeft.generate(model, params, None, right_ids, n, attention_mask=right_mask))
    alone = [np.asarray(jpeft.generate(model, params, None, r[m == 1][None], n))[0, -n:] for r, m in zip(ids, mask)]
    np.testing.assert_array_equal(left[:, 8:], np.stack(alone))
    np.testing.assert_array_equal(right[:, 8:], np.stack(alone))


def test_sampling_options():
    model, params = loaded("gpt2")
    ids, mask = T.batch("gpt2", seed=5)
    greedy = np.asarray(jpeft.generate(model, params, None, ids, 6, attention_mask=mask))
    k = jax.random.key(7)
    top1 = jpeft.generate(model, params, None, ids, 6, attention_mask=mask, temperature=1.0, top_k=1, key=k)
    tiny_p = jpeft.generate(model, params, None, ids, 6, attention_mask=mask, temperature=0.7, top_p=1e-6, key=k)
    np.testing.assert_array_equal(np.asarray(top1), greedy)
    np.testing.assert_array_equal(np.asarray(tiny_p), greedy)
    s1 = np.asarray(jpeft.generate(model, params, None, ids, 6, attention_mask=mask, temperature=2.0, key=k))
    s2 = np.asarray(jpeft.generate(model, params, None, ids, 6, attention_mask=mask, temperature=2.0, key=k))
    s3 = np.asarray(jpeft.generate(model, params, None, ids, 6, attention_mask=mask, temperature=2.0,
                                   key=jax.random.key(8)))
    np.testing.assert_array_equal(s1, s2)
    assert not np.array_equal(s1, s3) and not np.array_equal(s1, greedy)


def test_top_k_and_top_p_restrict_the_support():
    from jpeft.generate import _sample, nucleus_tail

    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
    keys = jax.random.key(0)
    k2 = np.asarray(_sample(logits, keys, jnp.float32(1.0), 2, nucleus_tail(1.0), False))
    assert set(k2.tolist()) == {0, 1}
    p = np.asarray(_sample(logits, keys, jnp.float32(1.0), 0, nucleus_tail(0.7), False))
    assert set(p.tolist()) == {0, 1}  # 0.5 < 0.7 so token 1 is needed, token 2 is not
    assert abs((p == 0).mean() - 0.5 / 0.8) < 0.04
    full = np.asarray(_sample(logits, keys, jnp.float32(1.0), 0, nucleus_tail(1.0), False))
    np.testing.assert_allclose(np.bincount(full, minlength=4) / 2000, [0.5, 0.3, 0.15, 0.05], atol=0.04)


def test_filter_keeps_transformers_warpers_set_and_a_tiny_temperature_is_the_argmax():
    """jpeft's filter (temperature, top-k, top-p) keeps exactly the tokens transformers'
    warpers keep, in that order, with the same renormalised probabilities, including top_p
    near 1 on a large vocabulary (where a float32 descending sum lost whole tokens); a tiny
    temperature gives the argmax (logits / T overflowed to inf)."""
    import torch
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    from jpeft.generate import _filter, _sample, nucleus_tail

    rng = np.random.default_rng(0)
    for vocab, top_p, top_k, temp, rows in ((1000, 0.999, 0, 0.8, 200), (1000, 0.99999, 0, 1.0, 100),
                                            (100, 0.9, 7, 0.5, 200)):
        top_p = float(np.float32(top_p))  # the value jpeft computes with (float32), given to both
        logits = rng.normal(scale=3.0, size=(rows, vocab)).astype(np.float32)
        ref = TemperatureLogitsWarper(temp)(None, torch.tensor(logits))
        if top_k:
            ref = TopKLogitsWarper(top_k)(None, ref)
        ref = TopPLogitsWarper(top_p)(None, ref).numpy()
        got = np.asarray(_filter(jnp.asarray(logits), jnp.float32(temp), top_k, nucleus_tail(top_p)))
        neg = np.finfo(np.float32).min
        # a token whose mass-with-every-less-likely-token lies within 1e-8 of 1 - top_p is on the
        # boundary in float32 (transformers and jpeft may round either way): not compared
        z = np.where(np.isfinite(ref), logits.astype(np.float64) / temp, -np.inf)
        p64 = np.exp(z - z.max(-1, keepdims=True))
        p64 /= p64.sum(-1, keepdims=True)
        order = np.argsort(p64, -1, kind="stable")
        upto = np.empty_like(p64)
        np.put_along_axis(upto, order, np.cumsum(np.take_along_axis(p64, order, -1), -1), -1)
        sure = np.abs(upto - (1 - top_p)) > 1e-8
        np.testing.assert_array_equal((got > neg)[sure], np.isfinite(ref)[sure], err_msg=f"vocab {vocab}, top_p {top_p}")
        assert (~sure).sum() <= rows // 10  # the boundary cases are rare
        p_ref = np.asarray(torch.softmax(torch.tensor(ref), -1))
        rows_sure = sure.all(-1)
        p_got = np.asarray(jax.nn.softmax(jnp.asarray(got), -1))
        np.testing.assert_allclose(p_got[rows_sure], p_ref[rows_sure], atol=1e-6)
    logits = jnp.asarray(rng.normal(scale=10.0, size=(64, 40)).astype(np.float32))
    for top_p in (1.0, 0.9):
        picks = np.asarray(_sample(logits, jax.random.key(1), jnp.float32(2e-38), 0, nucleus_tail(top_p), False))
        np.testing.assert_array_equal(picks, np.asarray(jnp.argmax(logits, -1)))
    # generate(temperature=1e-50) passed the host check (> 0) and reached the step as float32 0, where
    # (logits - max) / 0 is NaN at the argmax (drawn only because argmax picks a NaN); debug_nans, op by op
    # (inside jit it sees the outputs alone), catches any NaN
    with jax.disable_jit(), jax.debug_nans(True):
        for top_k, top_p in ((0, 1.0), (5, 0.9)):
            picks = _sample(logits, jax.random.key(1), jnp.float32(1e-50), top_k, nucleus_tail(top_p), False)
            np.testing.assert_array_equal(np.asarray(picks), np.asarray(jnp.argmax(logits, -1)))


def test_top_p_threshold_is_one_minus_top_p_rounded_as_transformers_rounds_it():
    """transformers' TopPLogitsWarper(0.9) drops the least likely tokens while their mass is <=
    float32(1 - 0.9) = 0.1; jpeft rounded top_p to float32 first and compared with
    1 - float32(0.9) = 0.100000024, so a token whose tail mass lay between the two (here 0.10000002)
    was kept by transformers and never sampled by jpeft (library and engine), and a top_p within
    6e-8 of 1 became 1 (off) where transformers still drops the tail below 1 - top_p."""
    import torch
    from transformers.generation.logits_process import TopPLogitsWarper

    from jpeft.generate import _filter, nucleus_tail, sample_rows

    logits = np.array([[-2.1972243785858154, 0.0], [-22.0, 0.0]], np.float32)  # tails 0.10000002 and 2.8e-10
    for top_p in (0.9, 1 - 1e-9):
        ref = torch.softmax(TopPLogitsWarper(top_p)(None, torch.tensor(logits)), -1).numpy()
        got = np.asarray(jax.nn.softmax(_filter(jnp.asarray(logits), jnp.float32(1.0), 0, nucleus_tail(top_p)), -1))
        np.testing.assert_array_equal(got > 0, ref > 0, err_msg=f"top_p {top_p}")
        np.testing.assert_allclose(got, ref, atol=1e-7, err_msg=f"top_p {top_p}")
    assert ref[0, 0] > 0.09 and ref[1, 0] == 0  # transformers keeps the first boundary token, drops the second
    n = 2000
    drawn = np.asarray(sample_rows(jnp.asarray(np.repeat(logits[:1], n, 0)), jax.random.split(jax.random.key(0), n),
                                   jnp.ones((n,)), jnp.asarray(nucleus_tail(np.full(n, 0.9)))))
    assert 0.07 < (drawn == 0).mean() < 0.13  # was 0: the engine never drew it


def test_eos_pads_the_rest_of_the_row():
    model, params = loaded("mistral")
    ids, mask = T.batch("mistral", seed=6)
    free = np.asarray(jpeft.generate(model, params, None, ids, 10, attention_mask=mask))
    eos = int(free[0, 8 + 2])
    out = np.asarray(jpeft.generate(model, params, None, ids, 10, attention_mask=mask, eos_token_id=eos, pad_token_id=99))
    for row_free, row in zip(free[:, 8:], out[:, 8:]):
        hits = np.flatnonzero(row_free == eos)
        if hits.size:
            n = hits[0]
            np.testing.assert_array_equal(row[: n + 1], row_free[: n + 1])
            assert (row[n + 1:] == 99).all()
        else:
            np.testing.assert_array_equal(row, row_free)


def test_eos_list_and_unset_pad_as_transformers():
    """With a list of end ids and no pad_token_id, an ended row repeats the first end id, as
    transformers' generate fills it; jpeft filled it with token 0 (a real token, '!' in the
    Llama 3 and GPT-2 vocabularies), which decoding turned into text after the end. A model
    whose config.json has a pad_token_id (the tiny models: 0) fills with it, as transformers'
    generate does by default; jpeft filled with the end id there."""
    import torch

    hf, _ = T.hf_model("mistral")
    model, params = loaded("mistral")
    assert model.config.pad_token_id == 0 == hf.generation_config.pad_token_id
    no_pad = model.clone(config=dataclasses.replace(model.config, pad_token_id=None))
    ids, mask = T.batch("mistral", seed=6)
    free = np.asarray(jpeft.generate(model, params, None, ids, 12, attention_mask=mask))
    eos = [int(free[0, 10]), int(free[1, 8])]  # the second id ends rows 0 and 1 at their first new token
    assert eos[0] != eos[1] and not np.isin(free[2, 8:], eos).any() and 0 not in eos  # row 2 never ends
    for m, pad in ((no_pad, {"pad_token_id": None}), (model, {})):  # None: unset, as for a model without a pad token
        with torch.no_grad():
            ref = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=12, do_sample=False,
                              eos_token_id=eos, **pad).numpy()
        out = np.asarray(jpeft.generate(m, params, None, ids, 12, attention_mask=mask, eos_token_id=eos))
        assert ref.shape == (3, 20) and (ref[:2, 9:] == (eos[0] if pad else 0)).all()
        np.testing.assert_array_equal(out, ref)
    model = no_pad
    # an explicit pad id still fills, and one end id alone pads with itself
    out = np.asarray(jpeft.generate(model, params, None, ids, 12, attention_mask=mask, eos_token_id=eos, pad_token_id=0))
    assert (out[:2, 9:] == 0).all()
    out = np.asarray(jpeft.generate(model, params, None, ids, 12, attention_mask=mask, eos_token_id=eos[1]))
    assert (out[:2, 8:] == eos[1]).all()


def test_bad_input():
    model, params = loaded("gpt2")
    ids = jnp.ones((2, 4), jnp.int32)
    with pytest.raises(InputValidationError, match=r"input_ids must be an int array \[batch, prompt_len\]"):
        jpeft.generate(model, params, None, ids[0], 3)
    with pytest.raises(InputValidationError, match="max_new_tokens must be a positive int"):
        jpeft.generate(model, params, None, ids, 0)
    with pytest.raises(InputValidationError, match="needs key=jax.random.key"):
        jpeft.generate(model, params, None, ids, 3, temperature=0.8)
    with pytest.raises(InputValidationError, match="top_p must be in"):
        jpeft.generate(model, params, None, ids, 3, top_p=0.0)
    with pytest.raises(InputValidationError, match="attention_mask must have input_ids' shape"):
        jpeft.generate(model, params, None, ids, 3, attention_mask=jnp.ones((2, 3)))
    with pytest.raises(InputValidationError, match="all zeros"):
        jpeft.generate(model, params, None, ids, 3, attention_mask=jnp.zeros((2, 4)))
    with pytest.raises(InputValidationError, match="exceeds GPT-2's 64 learned positions"):
        jpeft.generate(model, params, None, ids, 62)
    # a seed or a batch of keys failed deep inside JAX; a float pad id was truncated; a bad eos id was a TypeError
    for key in (0, jax.random.split(jax.random.key(0), 2)):
        with pytest.raises(InputValidationError, match="key must be one jax.random key"):
            jpeft.generate(model, params, None, ids, 3, temperature=0.8, key=key)
    with pytest.raises(InputValidationError, match="pad_token_id must be a token id"):
        jpeft.generate(model, params, None, ids, 3, pad_token_id=1.5)
    for eos in ("a", 2.7, [2, None]):
        with pytest.raises(InputValidationError, match="eos_token_id must be a token id"):
            jpeft.generate(model, params, None, ids, 3, eos_token_id=eos)
    # an id outside the vocabulary never matches a generated token: the rows ran on past the end silently
    for eos in (-1, model.config.vocab_size, [2, 10 ** 6]):
        with pytest.raises(InputValidationError, match=r"eos_token_id holds ids outside the vocabulary"):
            jpeft.generate(model, params, None, ids, 3, eos_token_id=eos)


def test_gpt2_generates_up_to_one_past_its_positions_as_transformers():
    """The last new token is never read back, so prompt + max_new_tokens = n_positions + 1 reads
    n_positions positions: transformers generates it; jpeft refused it as past the positions."""
    import torch

    hf, _ = T.hf_model("gpt2")
    model, params = loaded("gpt2")
    ids = np.arange(3, 11)[None]
    n = 64 + 1 - ids.shape[1]
    with torch.no_grad():
        ref = hf.generate(torch.tensor(ids), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0).numpy()
    out = np.asarray(jpeft.generate(model, params, None, jnp.asarray(ids), n))
    assert out.shape == ref.shape == (1, 65)
    np.testing.assert_array_equal(out, ref)


def test_gpt2_prefix_tuning_generates_as_far_as_its_positions_and_no_further(tmp_path):
    """With peft's prefix (every tensor random) the real tokens' positions start after the virtual ones:
    prompt + max_new_tokens - 1 + num_virtual_tokens positions are read. jpeft sized its cache one longer
    and refused the last length that fits. The reference is greedy decoding by peft's forward over the whole
    sequence (peft's own generate scores differ from its forward by ~1 on this model, transformers 5.25 /
    peft 0.21, so they are not a reference); one token more reads past the position table (an IndexError
    in transformers), which jpeft refuses by name."""
    import peft
    import torch

    from jpeft.errors import PromptTooLongError

    hf, _ = T.hf_model("gpt2")
    model, params = loaded("gpt2")
    nv = 4
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=nv))
    torch.manual_seed(3)
    for p in pm.prompt_encoder.parameters():
        torch.nn.init.normal_(p, std=0.5)
    pm.save_pretrained(str(tmp_path))
    ids = np.arange(3, 11)[None]
    n = 64 + 1 - ids.shape[1] - nv
    seq = torch.tensor(ids)
    with torch.no_grad():
        for _ in range(n):
            seq = torch.cat([seq, pm(input_ids=seq).logits[:, -1].argmax(-1)[:, None]], 1)
        with pytest.raises(IndexError):  # transformers: the next token's logits read position 64 of 64
            pm(input_ids=seq)
    _, ad = jpeft.hf.load_peft(str(tmp_path), params)
    out = np.asarray(jpeft.generate(model, params, ad, jnp.asarray(ids), n))
    assert out.shape == tuple(seq.shape) == (1, 64 + 1 - nv)
    np.testing.assert_array_equal(out, seq.numpy())
    with pytest.raises(PromptTooLongError, match="max_position_embeddings=64"):
        jpeft.generate(model, params, ad, jnp.asarray(ids), n + 1)


def test_out_of_vocabulary_prompt_is_refused_before_compute():
    import jax
    import jax.numpy as jnp
    import pytest

    import jpeft

    cfg = jpeft.models.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2)
    model = jpeft.models.LlamaForCausalLM(cfg)
    params = model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    with pytest.raises(jpeft.InputValidationError) as e:
        jpeft.generate(model, params, None, jnp.array([[1, 2, 32]]), 2)
    assert "token id 32" in str(e.value) and "[0, 32)" in str(e.value)
    # int64 ids and mask values are read before JAX narrows them to int32: 2**32 + 5 was generated from as token 5,
    # and a mask value of 2**32 made a real token padding
    with pytest.raises(jpeft.InputValidationError, match="token id 4294967301"):
        jpeft.generate(model, params, None, np.array([[1, 2, 2 ** 32 + 5]], np.int64), 2)
    ones = jpeft.generate(model, params, None, jnp.array([[1, 2, 3]]), 2)
    big = jpeft.generate(model, params, None, jnp.array([[1, 2, 3]]), 2, attention_mask=np.array([[1, 1, 2 ** 32]], np.int64))
    np.testing.assert_array_equal(np.asarray(big), np.asarray(ones))
    # padding positions are not checked: a masked-out id does not reach the embedding table
    out = jpeft.generate(model, params, None, jnp.array([[99, 2, 3]]), 2, attention_mask=jnp.array([[0, 1, 1]]))
    assert out.shape == (1, 5)


def test_an_encoder_is_refused_by_name_not_deep_in_tracing():
    """BERT has no key/value cache: generate (and the serving engine) said so with a TypeError
    from inside jit tracing ('unexpected keyword argument cache')."""
    cfg = M.BertConfig(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                       max_position_embeddings=16)
    model = M.BertForSequenceClassification(cfg)
    params = model.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))
    with pytest.raises(InputValidationError, match="not a decoder with a key/value cache"):
        jpeft.generate(model, params, None, jnp.ones((1, 4), jnp.int32), 3)
    from jpeft.serve import Engine

    with pytest.raises(InputValidationError, match="Engine: BertForSequenceClassification is not a decoder"):
        Engine(model, params, None, slots=1, max_len=8)


def test_transformers_default_sampling_is_top_k_50():
    """transformers' generate(do_sample=True) samples after a TopKLogitsWarper(50) the caller never asked for;
    jpeft's top_k defaults to 0 (off). The next-token distribution equals transformers' with top_k=50 passed, and
    is another one without it (as docs/MODELS.md says)."""
    import torch

    from jpeft.generate import _filter, nucleus_tail

    hf, _ = T.hf_model("llama3")
    with torch.no_grad():
        r = hf.generate(torch.tensor([[5, 6, 7, 8]]), do_sample=True, temperature=0.7, max_new_tokens=1,
                        output_scores=True, output_logits=True, return_dict_in_generate=True, eos_token_id=None,
                        pad_token_id=0)
    p_ref = torch.softmax(r.scores[0], -1).numpy()
    assert np.isfinite(r.scores[0].numpy()).sum() == 50 < T.VOCAB
    dist = {k: np.asarray(jax.nn.softmax(_filter(jnp.asarray(r.logits[0].numpy()), jnp.float32(0.7), k,
                                                 nucleus_tail(1.0)), -1)) for k in (0, 50)}
    np.testing.assert_allclose(dist[50], p_ref, atol=1e-6)
    assert 0.5 * np.abs(dist[0] - p_ref).sum() > 0.05
