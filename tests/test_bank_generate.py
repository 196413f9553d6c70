"""A routed bank through jpeft's Llama and greedy generation: each row generates exactly what it
generates with its own adapter alone, and swapping adapters does not recompile generate."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np

import jpeft
from jpeft.bank import AdapterBank

CFG = jpeft.models.LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                               num_kv_heads=1, max_position_embeddings=64)
MODEL = jpeft.models.LlamaForCausalLM(CFG)
PROMPT = jax.random.randint(jax.random.key(0), (5, 6), 1, 48)
MASK = jnp.ones((5, 6), jnp.int32).at[1, :2].set(0).at[3, :3].set(0)  # left-padded rows
PARAMS = MODEL.init(jax.random.key(1), PROMPT)
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj", "lm_head"]


def _adapter(r, key, rslora=False):
    cfg = jpeft.LoraConfig(r=r, alpha=2 * r, target_modules=TARGETS, init="random", use_rslora=rslora)
    return jpeft.init(cfg, PARAMS, key)


ADAPTERS = {"a": _adapter(2, jax.random.key(2)), "b": _adapter(4, jax.random.key(3), rslora=True), "c": _adapter(2, jax.random.key(4))}
NAMES = ["b", "a", None, "c", "b"]


def test_routed_forward_and_greedy_generation_match_each_adapter_alone():
    bank = AdapterBank.from_adapters(ADAPTERS, capacity=4)
    routed = bank.route(NAMES)
    fwd = jax.jit(lambda p, a, x, m: jpeft.apply(MODEL, p, a, x, attention_mask=m))
    y = fwd(PARAMS, routed, PROMPT, MASK)
    out = jpeft.generate(MODEL, PARAMS, routed, PROMPT, 8, attention_mask=MASK)
    alone = {}
    for name in set(NAMES):
        ad = None if name is None else ADAPTERS[name]
        alone[name] = (fwd(PARAMS, ad, PROMPT, MASK), jpeft.generate(MODEL, PARAMS, ad, PROMPT, 8, attention_mask=MASK))
    for i, name in enumerate(NAMES):
        np.testing.assert_allclose(y[i], alone[name][0][i], atol=1e-5, rtol=0)
        np.testing.assert_array_equal(out[i], alone[name][1][i])
    # the adapters change what is generated (otherwise the comparison would prove nothing)
    gens = {n: tuple(np.asarray(g[1][0, 6:]).tolist()) for n, g in alone.items()}
    assert len(set(gens.values())) == len(gens)

    # hot swap under generate: no backend compilation at all, and the new contents take effect
    b2 = bank.replace("a", ADAPTERS["c"]).remove("b").add("b2", ADAPTERS["b"])
    routed2 = b2.route(["a", "b2", None, "c", "b2"])
    with count_compiles() as compiles:
        out2 = jpeft.generate(MODEL, PARAMS, routed2, PROMPT, 8, attention_mask=MASK)
        out2.block_until_ready()
    assert compiles == []
    np.testing.assert_array_equal(out2[0], alone["c"][1][0])
    np.testing.assert_array_equal(out2[1], alone["b"][1][1])
    np.testing.assert_array_equal(out2[2], alone[None][1][2])


@contextlib.contextmanager
def count_compiles():
    """Records every XLA backend compilation (jax.monitoring's compile-duration event)."""
    seen = []

    def listener(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            seen.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_a_bank_on_layer_scanned_params_says_so():
    """The same base with scan_layers was refused as 'the bank belongs to another base model'."""
    import pytest
    from jpeft.errors import BankShapeError

    bank = AdapterBank.from_adapters(ADAPTERS, capacity=4)
    with pytest.raises(BankShapeError, match=r"layer-scanned .* Serve the unrolled model"):
        bank.check(jpeft.scan.stack_params(PARAMS))
    bank.check(PARAMS)
    from jpeft.errors import BankError

    stacked = jpeft.scan.stack_adapter(ADAPTERS["a"], CFG.num_layers)  # a layer-scanned adapter: the hint names it
    assert jpeft.scan.is_stacked(stacked)
    with pytest.raises(BankError, match="layer-scanned jpeft.scan.Stacked; unstack the adapter"):
        bank.add("stacked", stacked)
