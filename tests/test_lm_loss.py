"""The causal LM loss a few positions at a time (``jpeft.data.causal_lm_loss_chunked``,
``jpeft.lm_loss``) against the whole-logits loss (``jpeft.data.causal_lm_loss``): values and
gradients, every adapter tensor random, on the model families, a packed batch, a quantized
base and a layer-scanned model; only what is differentiated gets a gradient; the site check
still catches an adapter made for another model. Every method of the property suite is
checked too (tests/test_properties.py::test_chunked_loss_equals_whole_logits)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
import jpeft.models
from jpeft.data import causal_lm_loss, causal_lm_loss_chunked
from jpeft import PrefixTuningConfig

B, L, H, V = 3, 7, 8, 11
K = jax.random.split(jax.random.key(0), 8)
HID = jax.random.normal(K[0], (B, L, H))
HEAD = {"w": jax.random.normal(K[1], (H, V)), "b": jax.random.normal(K[2], (V,)),
        "lora": (jax.random.normal(K[3], (H, 2)), jax.random.normal(K[4], (2, V)))}
IDS = jax.random.randint(K[5], (B, L), 0, V)
MASK = (jax.random.uniform(K[6], (B, L)) > 0.3).astype(jnp.int32)


def head(p, x, i):
    a, b = p["lora"]
    return x @ p["w"] + p["b"][None, None] + (x @ a) @ b


def whole(p, h, mask=MASK):
    return causal_lm_loss(head(p, h, 0), IDS, mask)


@pytest.mark.parametrize("chunk_tokens", [1, 3, 6, 9, 21, 1000])  # 1 position a chunk .. one chunk; padded tails
def test_chunked_equals_whole_values_and_gradients(chunk_tokens):
    def chunked(p, h):
        return causal_lm_loss_chunked(head, p, h, IDS, MASK, chunk_tokens=chunk_tokens)

    want, n_want = whole(HEAD, HID)
    got, n_got = jax.jit(chunked)(HEAD, HID)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert int(n_got) == int(n_want) == int(MASK[:, 1:].sum())
    g_want = jax.grad(lambda p, h: whole(p, h)[0], (0, 1))(HEAD, HID)
    g_got = jax.jit(jax.grad(lambda p, h: chunked(p, h)[0], (0, 1)))(HEAD, HID)
    chex.assert_trees_all_close(g_got, g_want, rtol=2e-5, atol=1e-6)


def _dot_shapes(jaxpr) -> list:
    """The output shapes of every matrix product in ``jaxpr``, sub-programs (scan bodies,
    custom-VJP rules) included."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            out.append(tuple(eqn.outvars[0].aval.shape))
        for v in eqn.params.values():
            for sub in (v if isinstance(v, (tuple, list)) else (v,)):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    out += _dot_shapes(inner)
    return out


def test_only_the_differentiated_inputs_cost_work():
    """Differentiating the LoRA pair only, the gradient program has no product the size of
    the frozen weight (its gradient is not computed) and none for the hidden states' gradient;
    with the weight differentiated too, there is one."""
    def loss(lora, w=HEAD["w"], h=HID):
        return causal_lm_loss_chunked(head, {**HEAD, "w": w, "lora": lora}, h, IDS, MASK, chunk_tokens=6)[0]

    lora_only = _dot_shapes(jax.make_jaxpr(jax.grad(loss))(HEAD["lora"]).jaxpr)
    with_w = _dot_shapes(jax.make_jaxpr(jax.grad(loss, (0, 1)))(HEAD["lora"], HEAD["w"]).jaxpr)
    with_h = _dot_shapes(jax.make_jaxpr(jax.grad(loss, (0, 2)))(HEAD["lora"], HEAD["w"], HID).jaxpr)
    c = 2  # positions a chunk: 6 tokens over 3 rows
    frozen_grad = {(H, V), (V, H)}  # either layout
    assert not frozen_grad & set(lora_only) and frozen_grad & set(with_w)
    assert (B, c, H) not in lora_only and (B, c, H) in with_h
    chex.assert_trees_all_close(jax.grad(loss)(HEAD["lora"]),
                                jax.grad(lambda lo: whole({**HEAD, "lora": lo}, HID)[0])(HEAD["lora"]),
                                rtol=2e-5, atol=1e-6)


def test_bfloat16_gradients_keep_their_dtype():
    hb, wb = HID.astype(jnp.bfloat16), HEAD["w"].astype(jnp.bfloat16)
    plain = jax.grad(lambda w, h: causal_lm_loss(h @ w, IDS, MASK)[0], (0, 1))(wb, hb)
    chunk = jax.grad(lambda w, h: causal_lm_loss_chunked(lambda w, x, i: x @ w, w, h, IDS, MASK, chunk_tokens=6)[0],
                     (0, 1))(wb, hb)
    for a, b in zip(plain, chunk):
        assert b.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(a, np.float32), rtol=2e-2, atol=2e-2)


def test_no_targets_gives_zero_loss_and_gradients():
    zero = jnp.zeros_like(MASK)
    loss, n = causal_lm_loss_chunked(head, HEAD, HID, IDS, zero, chunk_tokens=4)
    assert float(loss) == 0.0 and int(n) == 0
    g = jax.grad(lambda h: causal_lm_loss_chunked(head, HEAD, h, IDS, zero, chunk_tokens=4)[0])(HID)
    assert float(jnp.abs(g).max()) == 0.0


def test_bad_arguments_are_named():
    with pytest.raises(jpeft.InputValidationError, match="chunk_tokens must be a positive int"):
        causal_lm_loss_chunked(head, HEAD, HID, IDS, MASK, chunk_tokens=0)
    with pytest.raises(jpeft.InputValidationError, match=r"hidden \[B, L, H\]"):
        causal_lm_loss_chunked(head, HEAD, HID[0], IDS, MASK)
    with pytest.raises(jpeft.ConfigError, match="'auto' or None"):
        jpeft.lm_loss(None, None, None, IDS, MASK, chunk_tokens="fast")


# -- jpeft.lm_loss on the model families -------------------------------------------------------

def _random(ad):
    leaves, tdef = jax.tree.flatten(ad)  # every adapter tensor random (no zero LoRA B)
    keys = jax.random.split(jax.random.key(5), len(leaves))
    return jax.tree.unflatten(tdef, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@functools.lru_cache(maxsize=None)
def _model(family, **kw):
    if family == "gpt2":  # tied output layer: the head is wte.attend
        cfg = jpeft.models.GPT2Config(vocab_size=40, hidden_size=16, num_layers=1, num_heads=2, **kw)
        return jpeft.models.GPT2LMHeadModel(cfg)
    cfg = jpeft.models.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2,
                                   num_kv_heads=1, **kw)
    return jpeft.models.LlamaForCausalLM(cfg)


IDS2 = jax.random.randint(jax.random.key(3), (2, 10), 0, 40)
MASK2 = jnp.ones_like(IDS2).at[0, :3].set(0)


def _compare(model, params, ad, rngs=None, chunk_tokens=6, **kw):
    def whole_loss(a):
        return causal_lm_loss(jpeft.apply(model, params, a, IDS2, rngs=rngs, **kw), IDS2, MASK2)[0]

    def chunked(a):
        return jpeft.lm_loss(model, params, a, IDS2, MASK2, rngs=rngs, chunk_tokens=chunk_tokens, **kw)[0]

    want, gw = jax.jit(jax.value_and_grad(whole_loss))(ad)
    got, gc = jax.jit(jax.value_and_grad(chunked))(ad)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    chex.assert_trees_all_close(gc, gw, rtol=1e-5, atol=1e-6)
    return gc


@pytest.mark.parametrize("family,config", [
    ("llama", jpeft.LoraConfig(r=2, target_modules=["q_proj", "down_proj", "lm_head"])),
    ("llama", jpeft.LoraConfig(r=2, target_modules=["lm_head"])),  # only the output layer: the body runs no site
    ("gpt2", jpeft.LoraConfig(r=2, target_modules=["c_attn"], trainable_token_indices=[1, 5])),  # rows read by attend too
    ("gpt2", jpeft.FullFinetuneConfig()),  # the whole model trained: the tied embedding's two gradients add up
])
def test_lm_loss_equals_whole_logits(family, config):
    model = _model(family)
    params = model.init(jax.random.key(0), IDS2)
    ad = _random(jpeft.init(config, params, jax.random.key(1), model, IDS2))
    g = _compare(model, params, ad)
    assert all(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(jpeft.trainable(g)))


def test_lm_loss_packed_rows_scan_layers_and_quantized_base():
    seg = jnp.array([[1] * 4 + [2] * 6, [1] * 7 + [0] * 3])
    pos = jnp.array([list(range(4)) + list(range(6)), list(range(7)) + [0] * 3])
    kw = {"attention_mask": seg > 0, "segment_ids": seg, "position_ids": pos}
    config = jpeft.LoraConfig(r=2, target_modules=["q_proj", "v_proj", "lm_head"])
    model = _model("llama")
    params = model.init(jax.random.key(0), IDS2)
    ad = _random(jpeft.init(config, params, jax.random.key(1), model, IDS2))
    _compare(model, params, ad, **kw)
    _compare(model, jpeft.quantize(params, "nf4"), ad, chunk_tokens=4)
    scanned = _model("llama", scan_layers=True)
    _compare(scanned, {"params": jpeft.scan.stack_params(params["params"])}, jpeft.scan.stack_adapter(ad, 2))


def test_dropout_in_the_body_draws_the_same_masks():
    """With LoRA dropout only before the output layer, both losses see the same masks (the
    body runs once, with the caller's key), so they agree exactly."""
    model = _model("llama")
    params = model.init(jax.random.key(0), IDS2)
    ad = _random(jpeft.init(jpeft.LoraConfig(r=2, dropout=0.5, target_modules=["q_proj"]), params, jax.random.key(1)))
    _compare(model, params, ad, rngs={"dropout": jax.random.key(4)})


def test_whole_model_adapters_take_the_whole_logits_and_the_site_check_holds():
    model = _model("llama")
    params = model.init(jax.random.key(0), IDS2)
    prefix = _random(jpeft.init(PrefixTuningConfig(num_virtual_tokens=2), params, jax.random.key(1), model, IDS2))
    _compare(model, params, prefix)  # the prefix acts on the whole call: not chunked, still equal
    other = _model("gpt2")
    foreign = jpeft.init(jpeft.LoraConfig(r=2, target_modules=["c_attn"]), other.init(jax.random.key(0), IDS2),
                         jax.random.key(1))
    with pytest.raises(jpeft.errors.TargetNotFoundError, match="none of the adapter's"):
        jpeft.lm_loss(model, params, foreign, IDS2, MASK2)
