"""AdapterBank: per-example routing equals each adapter alone, hot swap without recompiling,
training several adapters at once, and the named errors."""

import copy
import dataclasses
import pickle

import chex
import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import optax
import pytest

import jpeft
from jpeft.bank import AdapterBank, BankedLora, LoraStack
from jpeft.errors import (
    BankCapacityError,
    BankError,
    BankRankError,
    BankShapeError,
    DuplicateAdapterError,
    InputValidationError,
    NotMergeableError,
    ShapeMismatchError,
    UnknownAdapterError,
)


class Tiny(nn.Module):
    """Embedding (called and attended), a multi-output DenseGeneral, a two-input-axis
    DenseGeneral and a Dense: every kernel layout the bank routes."""

    vocab: int = 11
    d: int = 8
    heads: int = 2

    @nn.compact
    def __call__(self, tok):
        emb = nn.Embed(self.vocab, self.d, name="embed")
        h = emb(tok)
        qkv = nn.DenseGeneral((3, self.heads, self.d // self.heads), name="qkv")(h)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        att = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / 2.0, axis=-1)
        o = jnp.einsum("bhqk,bkhd->bqhd", att, v)
        h = h + nn.DenseGeneral(self.d, axis=(-2, -1), name="o_proj")(o)
        h = h + nn.Dense(self.d, name="mlp")(jax.nn.gelu(h))
        return emb.attend(h)


MODEL = Tiny()
TOK = jax.random.randint(jax.random.key(0), (6, 5), 0, 11)
PARAMS = MODEL.init(jax.random.key(1), TOK)


def _adapters():
    specs = {
        # name: (rank, alpha, rslora, targets)
        "r1": (1, 3.0, False, ".*"),
        "r4": (4, 6.0, True, ".*"),
        "r2": (2, 5.0, False, ["qkv", "mlp"]),  # adapts a subset of the bank's sites
    }
    out = {}
    for i, (name, (r, alpha, rs, tgt)) in enumerate(specs.items()):
        cfg = jpeft.LoraConfig(r=r, alpha=alpha, use_rslora=rs, target_modules=tgt, init_weights="random")
        ad = jpeft.init(cfg, PARAMS, jax.random.key(10 + i), MODEL, TOK)
        out[name] = jax.tree.map(lambda x: 0.3 * x, ad)  # keeps the logits O(1), so 1e-5 is a tight tolerance
    return out


ADAPTERS = _adapters()
NAMES = ["r4", None, "r1", "r2", "r4", "r1"]


_FWD = jax.jit(lambda p, a, t: jpeft.apply(MODEL, p, a, t))
_REF = {}


def _alone(name):
    """Each example's reference: the whole batch through its own adapter (or the bare base)."""
    if name not in _REF:
        _REF[name] = _FWD(PARAMS, None if name is None else ADAPTERS[name], TOK)
    return _REF[name]


@pytest.mark.parametrize("strategy", ["gather", "ragged", "pregather"])
def test_mixed_batch_equals_each_adapter_alone(strategy):
    bank = AdapterBank.from_adapters(ADAPTERS, capacity=5, strategy=strategy)
    assert bank.max_rank == 4 and bank.capacity == 5 and bank.names == ("r1", "r4", "r2")
    routed = bank.route(NAMES)
    assert all(isinstance(n, BankedLora) and n.strategy == strategy for n in routed.values())
    y = _FWD(PARAMS, routed, TOK)
    for i, name in enumerate(NAMES):
        np.testing.assert_allclose(y[i], _alone(name)[i], atol=1e-5, rtol=1e-5)
    # the adapters really differ from each other and from the base (the test has teeth)
    assert float(jnp.abs(_alone("r1") - _alone("r4")).max()) > 1e-2
    assert float(jnp.abs(_alone("r2") - _alone(None)).max()) > 1e-2


@pytest.mark.parametrize("strategy", ["gather", "ragged", "pregather"])
def test_mixed_batch_over_a_bfloat16_base_equals_each_adapter_alone(strategy):
    """Over a bfloat16 base jpeft.apply runs a LoRA branch in float32 and rounds its sum with the base
    output once, as PEFT does (docs/SCALING.md, "Mixed precision"); the routed branch does the same, so
    each row equals its adapter alone bit for bit (both in bf16 before, rounded in other places: up to
    0.004 apart on logits of 1.5)."""
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), PARAMS)
    bank = AdapterBank.from_adapters(ADAPTERS, capacity=5, strategy=strategy)
    y = _FWD(p16, bank.route(NAMES), TOK)
    assert y.dtype == jnp.bfloat16
    for i, name in enumerate(NAMES):
        want = _FWD(p16, None if name is None else ADAPTERS[name], TOK)[i]
        np.testing.assert_array_equal(np.asarray(y[i], np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize("strategy", ["gather", "ragged", "pregather"])
def test_vera_and_adalora_adapters_route_as_each_alone(strategy):
    """The bank holds any adapter whose update is low-rank (their ``low_rank()``), with every
    tensor random: VeRA's lambdas (lambda_b starts at zero) and AdaLoRA's E (starts at zero)."""
    def rand(ad, seed):
        leaves, tree = jax.tree.flatten(ad)
        keys = jax.random.split(jax.random.key(seed), len(leaves))
        return jax.tree.unflatten(tree, [0.5 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])

    vera = rand(jpeft.init(jpeft.VeraConfig(r=3, target_modules=["mlp", "o_proj"]), PARAMS, jax.random.key(1), MODEL, TOK), 2)
    ada = rand(jpeft.init(jpeft.AdaLoraConfig(init_r=3, target_r=2, lora_alpha=5.0, target_modules=["qkv", "mlp"],
                                              total_step=10), PARAMS, jax.random.key(3), MODEL, TOK), 4)
    ads = {"vera": vera, "ada": ada, "r2": ADAPTERS["r2"]}
    bank = AdapterBank.from_adapters(ads, capacity=4, strategy=strategy)
    names = ["ada", None, "vera", "r2", "vera", "ada"]
    y = _FWD(PARAMS, bank.route(names), TOK)
    base = MODEL.apply(PARAMS, TOK)
    for i, n in enumerate(names):
        want = base if n is None else _FWD(PARAMS, ads[n], TOK)
        np.testing.assert_allclose(y[i], want[i], atol=1e-5, rtol=0)
        assert n is None or float(jnp.abs(want[i] - base[i]).max()) > 1e-2


def test_rank_and_alpha_patterns_route_as_the_adapter_alone():
    """An adapter whose sites have other ranks and alphas (``rank_pattern`` / ``alpha_pattern``,
    every tensor random) routes to its own outputs beside another adapter and the base."""
    cfg = jpeft.LoraConfig(r=2, alpha=4, target_modules=".*", rank_pattern={"mlp": 3}, alpha_pattern={"qkv": 7.0},
                           init_weights="random")
    pat = jax.tree.map(lambda x: 0.3 * x, jpeft.init(cfg, PARAMS, jax.random.key(20), MODEL, TOK))
    assert pat["mlp"].r == 3 and pat["qkv"].scale == pytest.approx(3.5) and pat["o_proj"].scale == pytest.approx(2.0)
    bank = AdapterBank.from_adapters({"pat": pat, "r1": ADAPTERS["r1"]}, capacity=3)
    names = ["pat", "r1", None, "pat", "r1", "pat"]
    y = _FWD(PARAMS, bank.route(names), TOK)
    want = _FWD(PARAMS, pat, TOK)
    assert float(jnp.abs(want - _alone(None)).max()) > 1e-2
    for i, name in enumerate(names):
        np.testing.assert_allclose(y[i], (want if name == "pat" else _alone(name))[i], atol=1e-5, rtol=1e-5)


def test_leading_batch_axis_of_any_rank_and_get_round_trip():
    bank = AdapterBank.from_adapters(ADAPTERS, capacity=3)
    # get() gives the adapter back at its own rank with its own (rsLoRA) scale
    back = bank.get("r4")
    for path, node in ADAPTERS["r4"].items():
        assert back[path].r == 4 and back[path].scale == pytest.approx(node.scale)
        np.testing.assert_array_equal(back[path].lora_A, node.lora_A)
    assert set(bank.get("r2")) == set(ADAPTERS["r2"])
    # inputs [batch, features] (no sequence axis) route by the leading axis too
    dense = nn.Dense(3)
    x = jax.random.normal(jax.random.key(3), (4, 5))
    p = dense.init(jax.random.key(4), x)
    ads = {n: jpeft.init(jpeft.LoraConfig(r=2, target_modules=".*", init_weights="random"), p, jax.random.key(i)) for i, n in enumerate("ab")}
    b2 = AdapterBank.from_adapters(ads)
    y = jpeft.apply(dense, p, b2.route(["b", "a", None, "b"]), x)
    np.testing.assert_allclose(y[0], jpeft.apply(dense, p, ads["b"], x)[0], atol=1e-6)
    np.testing.assert_allclose(y[1], jpeft.apply(dense, p, ads["a"], x)[1], atol=1e-6)
    np.testing.assert_allclose(y[2], dense.apply(p, x)[2], atol=1e-6)


def test_hot_swap_never_recompiles():
    """Replacing, removing and adding adapters keeps every array of the bank's routed tree at its
    shape and dtype, so a jitted forward is traced once (chex counts the traces) and nothing is
    lowered or compiled again (no /jax/core/compile/ event while the swapped banks run).

    (This read ``fwd._cache_size() == 1``, the size of JAX's C++ dispatch cache: in two CI runs
    it was 0, all three calls having taken JAX's Python path, after other test files had run in
    the same worker process, with no retrace and no compile; JAX's internal cache state, not
    jpeft's promise, so the test checks the promise with JAX's public monitoring events.)"""
    bank = AdapterBank.from_adapters(ADAPTERS, capacity=4)
    @jax.jit
    @chex.assert_max_traces(n=1)  # raises if jax traces the function a second time
    def fwd(params, routed, tok):
        return jpeft.apply(MODEL, params, routed, tok)

    fwd(PARAMS, bank.route(NAMES), TOK)
    # replace with an adapter of another rank, remove, add into the freed slot, reroute
    new = jpeft.init(jpeft.LoraConfig(r=3, alpha=2.0, target_modules=".*", init_weights="random"), PARAMS, jax.random.key(99), MODEL, TOK)
    b2 = bank.replace("r4", new)
    b3 = b2.remove("r1").add("fresh", ADAPTERS["r1"]).add("extra", ADAPTERS["r2"])
    names3 = ["extra", "fresh", "r4", None, "r2", "r4"]
    routed2, routed3 = b2.route(NAMES), b3.route(names3)  # routing runs small jitted ops of its own
    compiles = []

    def listen(event, secs, **kwargs):
        if event.startswith("/jax/core/compile/"):
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        y2 = jax.block_until_ready(fwd(PARAMS, routed2, TOK))
        y3 = jax.block_until_ready(fwd(PARAMS, routed3, TOK))
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert compiles == []
    # and the swaps took effect
    y_new = _FWD(PARAMS, new, TOK)
    np.testing.assert_allclose(y2[0], y_new[0], atol=1e-5)
    np.testing.assert_allclose(y3[0], _alone("r2")[0], atol=1e-5)
    np.testing.assert_allclose(y3[1], _alone("r1")[1], atol=1e-5)
    np.testing.assert_allclose(y3[2], y_new[2], atol=1e-5)
    assert b3.slots == ("fresh", "r4", "r2", "extra") and bank.slots == ("r1", "r4", "r2", None)  # old bank untouched


def test_removed_slot_acts_as_base_under_jit():
    bank = AdapterBank.from_adapters(ADAPTERS)
    ids = bank.ids(["r1", "r4"] + [None] * 4)
    y = _FWD(PARAMS, _route_unchecked(bank.remove("r1"), ids), TOK)
    np.testing.assert_allclose(y[0], _alone(None)[0], atol=1e-6)
    np.testing.assert_allclose(y[1], _alone("r4")[1], atol=1e-5)


def _route_unchecked(bank, ids):
    # what a server does with ids computed before a removal: routing inside jit skips the host check
    return jax.jit(lambda w, s, i: jpeft.bank.route(w, s, i))(bank.weights, bank.scales, ids)


def _per_example_loss(logits, tok):
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, tok[..., None], axis=-1)[..., 0].mean(axis=-1)  # [batch]


def test_training_several_adapters_gradients_stay_with_their_examples():
    bank = AdapterBank.from_adapters(ADAPTERS, capacity=4)
    names = ["r4", "r1", "r4", None, "r1", "r4"]
    ids = bank.ids(names)

    def loss(weights):
        logits = jpeft.apply(MODEL, PARAMS, bank.route(ids, weights=weights), TOK)
        return _per_example_loss(logits, TOK).sum()

    g = jax.jit(jax.grad(loss))(bank.weights)
    for name in ("r4", "r1"):
        k = bank.slot(name)
        mine = jnp.asarray([n == name for n in names])

        def own_loss(adapter):
            per = _per_example_loss(jpeft.apply(MODEL, PARAMS, adapter, TOK), TOK)
            return jnp.where(mine, per, 0.0).sum()

        ref = jax.jit(jax.grad(own_loss))(ADAPTERS[name])
        for path, node in ref.items():
            r = node.r
            np.testing.assert_allclose(g[path].lora_A[k, :, :r], node.lora_A, atol=1e-5, rtol=1e-4)
            np.testing.assert_allclose(g[path].lora_B[k, :r], node.lora_B, atol=1e-5, rtol=1e-4)
            assert float(jnp.abs(g[path].lora_A[k, :, r:]).max(initial=0.0)) == 0.0  # padding gets nothing
            assert float(jnp.abs(node.lora_A).max()) > 0
    # "r2" (slot 2) has no example in the batch and the free slot 3 neither: exactly zero gradient
    for path in g:
        for k in (bank.slot("r2"), 3):
            assert float(jnp.abs(g[path].lora_A[k]).max()) == 0.0 and float(jnp.abs(g[path].lora_B[k]).max()) == 0.0


def test_train_step_on_a_mixed_batch():
    cfgs = [jpeft.LoraConfig(r=r, target_modules=".*") for r in (2, 4)]  # default init: B = 0
    ads = {f"t{i}": jpeft.init(c, PARAMS, jax.random.key(20 + i), MODEL, TOK) for i, c in enumerate(cfgs)}
    bank = AdapterBank.from_adapters(ads, capacity=3)
    ids = bank.ids(["t0", "t1", "t0", "t1", "t0", "t1"])
    target = (TOK + 1) % 11

    def loss_fn(params, weights, batch, key):
        logits = jpeft.apply(MODEL, params, bank.route(batch["ids"], weights=weights), batch["tok"])
        return _per_example_loss(logits, batch["target"]).mean()

    opt = optax.adam(3e-2)
    step = jpeft.make_train_step(loss_fn, opt, donate=False)
    weights, state = bank.weights, jpeft.init_opt_state(opt, bank.weights)  # no state for the frozen scales
    losses = []
    for i in range(8):
        weights, state, m = step(PARAMS, weights, state, {"ids": ids, "tok": TOK, "target": target}, jax.random.key(i))
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] - 0.1
    trained = bank.with_weights(weights)
    for path in weights:  # the rank-2 adapter's zero padding is a fixed point of training
        k = trained.slot("t0")
        assert float(jnp.abs(weights[path].lora_A[k, :, 2:]).max()) == 0.0
        assert float(jnp.abs(weights[path].lora_B[k, 2:]).max()) == 0.0
        assert float(jnp.abs(weights[path].lora_B[trained.slot("t1")]).max()) > 0  # it moved
    # the trained adapter taken out of the bank gives the same outputs alone
    t1 = trained.get("t1")
    y = _FWD(PARAMS, trained.route(ids), TOK)
    np.testing.assert_allclose(y[1], _FWD(PARAMS, t1, TOK)[1], atol=1e-5)


def test_merged_params_for_single_tenant_serving():
    bank = AdapterBank.from_adapters(ADAPTERS)
    merged = bank.merged_params(PARAMS, "r2")
    np.testing.assert_allclose(_FWD(merged, None, TOK), _alone("r2"), atol=1e-5)
    # r4 adapts the embedding the model also reads as its tied output projection: a merge would change both
    with pytest.raises(NotMergeableError, match="tied output projection"):
        bank.merged_params(PARAMS, "r4")
    with pytest.raises(NotMergeableError, match="routed bank"):
        jpeft.merge(PARAMS, bank.route(NAMES))


# ---------------------------------------------------------------------------------------------
# named errors
# ---------------------------------------------------------------------------------------------
def test_over_capacity():
    bank = AdapterBank.from_adapters({"a": ADAPTERS["r1"], "b": ADAPTERS["r2"]})
    with pytest.raises(BankCapacityError, match=r"the bank is full: all 2 slots are taken by \['a', 'b'\].*bank.remove"):
        bank.add("c", ADAPTERS["r1"])
    # more adapters than capacity in one call: said "remove an adapter first" of a bank the user never filled
    with pytest.raises(BankCapacityError, match=r"from_adapters got 3 adapters \['r1', 'r4', 'r2'\] but capacity=2.*"
                                                r"capacity >= 3") as e:
        AdapterBank.from_adapters(ADAPTERS, capacity=2)
    assert "remove" not in str(e.value)
    small = AdapterBank.from_adapters({"a": ADAPTERS["r1"]}, capacity=2, max_rank=2)
    with pytest.raises(BankRankError, match=r"rank 4 .* above the bank's max_rank=2.*max_rank >= 4") as e:
        small.add("big", ADAPTERS["r4"])
    assert (e.value.rank, e.value.max_rank) == (4, 2)  # what a caller (jpeft serve) tells its user
    # pickled (a process pool's worker sends its error back) or copied, it is the same error: was a TypeError
    # "missing 2 required keyword-only arguments" in place of it
    for back in (pickle.loads(pickle.dumps(e.value)), copy.deepcopy(e.value)):
        assert type(back) is BankRankError and str(back) == str(e.value) and (back.rank, back.max_rank) == (4, 2)
    assert issubclass(BankRankError, BankCapacityError) and issubclass(BankCapacityError, BankError)


def test_adapter_for_another_base_shape():
    bank = AdapterBank.from_adapters(ADAPTERS, capacity=4)
    other = Tiny(d=12, heads=2)
    p_other = other.init(jax.random.key(5), TOK)
    foreign = jpeft.init(jpeft.LoraConfig(r=2, target_modules=".*", init_weights="random"), p_other, jax.random.key(6), other, TOK)
    with pytest.raises(BankShapeError, match=r"made for a dense kernel \(12, 12\) at 'mlp'.*kernel \(8, 8\).*another base model"):
        bank.add("foreign", {"mlp": foreign["mlp"]})
    # a site the bank does not hold
    dense = nn.Dense(8)
    pd = dense.init(jax.random.key(7), jnp.ones((1, 8)))
    stray = {"elsewhere/mlp": jpeft.init(jpeft.LoraConfig(r=1, target_modules=".*"), pd, jax.random.key(8))[""]}
    with pytest.raises(BankShapeError, match="site 'elsewhere/mlp' that the bank does not hold"):
        bank.add("stray", stray)
    # the bank applied to another model's params
    with pytest.raises(BankShapeError, match=r"built for a base whose embedding at 'embed' has shape \(11, 8\), but the params hold shape \(11, 12\)"):
        routed = bank.route(NAMES)  # outside the trace: inside it, the bank's arrays would be constants (refused)
        jax.eval_shape(lambda: jpeft.apply(other, p_other, routed, TOK))
    with pytest.raises(BankShapeError, match="another base model"):
        bank.check(p_other)
    bank.check(PARAMS)
    assert issubclass(BankShapeError, ShapeMismatchError)


def test_unknown_and_duplicate_names():
    bank = AdapterBank.from_adapters(ADAPTERS)
    for call in (lambda: bank.slot("nope"), lambda: bank.replace("nope", ADAPTERS["r1"]), lambda: bank.remove("nope"),
                 lambda: bank.get("nope"), lambda: bank.route(["r1", "nope"])):
        with pytest.raises(UnknownAdapterError, match=r"no adapter named 'nope' in the bank; it holds \['r1', 'r4', 'r2'\]"):
            call()
    with pytest.raises(DuplicateAdapterError, match="already holds an adapter named 'r1'.*bank.replace"):
        bank.add("r1", ADAPTERS["r2"])
    with pytest.raises(UnknownAdapterError, match=r"empty slots \[0\].*-1 for the bare base"):
        bank.remove("r1").route(jnp.asarray([0, 1], jnp.int32))
    assert issubclass(UnknownAdapterError, LookupError)
    # PEFT's adapter_names call the base rows "__base__": they were unknown names, and an adapter stored under
    # that name took them over, so rows a PEFT user meant for the base ran through it
    assert bank.ids(["r4", "__base__", None]).tolist() == [1, -1, -1]
    with pytest.raises(BankError, match="'__base__' names the bare base"):
        bank.remove("r1").add("__base__", ADAPTERS["r1"])


def test_routing_input_errors():
    bank = AdapterBank.from_adapters(ADAPTERS)
    with pytest.raises(InputValidationError, match=r"slots in \[0, 3\) or -1.*found \[7\]"):
        bank.route(jnp.asarray([0, 7], jnp.int32))
    with pytest.raises(InputValidationError, match="1-D integer array"):
        bank.route(jnp.zeros((2, 2), jnp.int32))
    with pytest.raises(InputValidationError, match=r"adapter_ids has 2 entries.*shape \(6, 5\).*leading \(batch\) axis"):
        routed = bank.route(["r1", "r4"])
        jax.eval_shape(lambda: jpeft.apply(MODEL, PARAMS, routed, TOK))
    with pytest.raises(BankError, match="DoRA") as e:
        dora = jpeft.init(jpeft.LoraConfig(r=2, target_modules=["mlp"], use_dora=True), PARAMS, jax.random.key(3), MODEL, TOK)
        bank.add("dora", dora)
    assert "unstack" not in str(e.value)  # the layer-scan hint was appended to every refusal, DoRA's and IA3's too
    with pytest.raises(jpeft.ConfigError, match="capacity must be a positive integer"):
        AdapterBank.create(ADAPTERS["r1"], capacity=0, max_rank=2)


@pytest.mark.parametrize("strategy", ["gather", "ragged", "pregather"])
def test_ids_outside_the_bank_are_refused_or_non_finite_never_the_base(strategy):
    """Traced ids cannot be checked, and a row routed outside ``[-1, capacity)`` (ids from a larger
    bank, an off-by-one) ran as the bare base without a word, where PEFT raises on an adapter name
    it does not hold: a jitted loss trained nothing on those rows. Such a row's outputs are NaN now
    (a loss over them is non-finite), the other rows unchanged; concrete ids are refused by name,
    by the pure ``jpeft.bank.route`` too (it routed them to the base)."""
    bank = AdapterBank.from_adapters(ADAPTERS, capacity=4, strategy=strategy)  # slot 3 empty
    fwd = jax.jit(lambda p, w, ids, t: jpeft.apply(MODEL, p, jpeft.bank.route(w, None, ids, strategy=strategy), t))
    y = np.asarray(fwd(PARAMS, bank.weights, jnp.asarray([1, 4, -2, -1, 3, 9], jnp.int32), TOK))
    for i, name in ((0, "r4"), (3, None), (4, None)):  # an empty slot, being zeros, is the base (documented)
        np.testing.assert_allclose(y[i], _alone(name)[i], atol=1e-5, rtol=1e-5)
    assert np.isnan(y[[1, 2, 5]]).all()
    with pytest.raises(InputValidationError, match=r"slots in \[0, 4\) or -1.*found \[4, -2\]"):
        jpeft.bank.route(bank.weights, None, jnp.asarray([0, 4, -2], jnp.int32), strategy=strategy)


def test_weights_are_a_trainable_pytree_of_floats_only():
    bank = AdapterBank.from_adapters(ADAPTERS, capacity=4)
    leaves = jax.tree.leaves(bank.weights)
    assert all(jnp.issubdtype(x.dtype, jnp.floating) for x in leaves)
    assert all(isinstance(v, LoraStack) for v in bank.weights.values())
    assert bank.weights["mlp"].lora_A.shape == (4, 8, 4) and bank.weights["mlp"].lora_B.shape == (4, 4, 8)
    assert bank.weights["embed"].lora_A.shape == (4, 11, 4)
    np.testing.assert_allclose(bank.scales["o_proj"], [3.0, 6.0 / 2.0, 0.0, 0.0])  # r1: 3/1; r4 (rsLoRA): 6/sqrt(4); r2 lacks o_proj


def test_route_takes_mixed_slots_and_names_numpy_names_and_an_empty_batch():
    model = nn.Dense(4)
    x = jnp.ones((3, 5))
    params = model.init(jax.random.key(0), x)
    cfg = jpeft.LoraConfig(r=2, target_modules=".*", init_weights="random")
    a, b = (jpeft.init(cfg, params, jax.random.key(i)) for i in (1, 2))
    bank = AdapterBank.from_adapters({"a": a, "b": b}, capacity=3)
    want = jpeft.apply(model, params, bank.route(jnp.asarray([1, -1, 0])), x)
    # [1, None, "a"] is slot 1, the base and adapter "a" (a bare 1 was looked up as a name)
    np.testing.assert_array_equal(jpeft.apply(model, params, bank.route([1, None, "a"]), x), want)
    np.testing.assert_array_equal(jpeft.apply(model, params, bank.route(np.array(["b", "a", "a"])), x)[0], want[0])
    # an empty batch routes nothing (was a ZeroDivisionError from a reshape)
    assert jpeft.apply(model, params, bank.route(jnp.zeros((0,), jnp.int32)), x[:0]).shape == (0, 4)


def test_check_takes_an_nnx_module_as_apply_does():
    """bank.check(model) on an nnx.Module was a raw AttributeError ('MLP' object has no attribute 'items'),
    while jpeft.apply, merge and merged_params take the module."""
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs, d=8):
            self.fc1 = nnx.Linear(4, d, rngs=rngs)
            self.fc2 = nnx.Linear(d, 3, rngs=rngs)

        def __call__(self, x):
            return self.fc2(jax.nn.relu(self.fc1(x)))

    m = MLP(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (3, 4))
    cfg = jpeft.LoraConfig(r=2, target_modules=["fc1", "fc2"], init_weights="random")
    ads = {n: jpeft.init(cfg, m, jax.random.key(i), None, x) for i, n in enumerate("ab")}
    bank = AdapterBank.from_adapters(ads)
    bank.check(m)
    bank.check(nnx.split(m)[1])
    with pytest.raises(BankShapeError, match=r"fc1' has shape \(4, 8\), but the params hold shape \(4, 16\)"):
        bank.check(MLP(nnx.Rngs(0), d=16))
    y = jpeft.apply(m, None, bank.route(["b", None, "a"]), x)
    np.testing.assert_allclose(y[0], jpeft.apply(m, None, ads["b"], x)[0], atol=1e-6)


def test_modules_to_save_of_other_modules_and_trained_base_biases_are_refused_by_their_option_name():
    """These sites are not routed; the refusal named the node class ('SavedModule is not a
    low-rank update'), not the LoraConfig / PEFT option the user set (a SEQ_CLS adapter's head is
    one). ``lora_bias``, trainable tokens and copies of Dense / Embed modules are routed (tests below)."""
    bank = AdapterBank.from_adapters(ADAPTERS, capacity=4)
    cases = {
        # a copy of a multi-axis DenseGeneral (PEFT mixes copies of Linear and Embedding modules only)
        "modules_to_save": (jpeft.LoraConfig(r=2, target_modules=["mlp"], modules_to_save=["qkv"]),
                            "modules_to_save.*jpeft.apply"),
        "base_bias": (jpeft.LoraConfig(r=2, target_modules=["mlp"], bias="lora_only"), r"LoraConfig.lora_bias or bias"),
    }
    for name, (cfg, says) in cases.items():
        ad = jpeft.init(cfg, PARAMS, jax.random.key(3), MODEL, TOK)
        with pytest.raises(BankError, match=says) as e:
            bank.add(name, ad)
        assert "SavedModule" not in str(e.value) and "TrainableTokens" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# scales travel with the weights: a compiled function never keeps a bank's old scales
# ---------------------------------------------------------------------------------------------
def test_a_compiled_forward_routes_adapters_added_and_replaced_after_it_compiled():
    """A jitted forward that routes inside (``bank.route(ids, weights=w)``, ``w`` an argument),
    compiled on a bank holding one adapter: after ``add`` and ``replace`` it gave the new
    adapters' rows scale 0 (the bare base) or the replaced adapter's old scale, with no word,
    because the scales were read from the bank object at trace time."""
    bank = AdapterBank.from_adapters({"r1": ADAPTERS["r1"]}, capacity=3, max_rank=4)

    @jax.jit
    @chex.assert_max_traces(n=1)  # and never recompiled by the swaps
    def fwd(params, weights, ids, tok):
        return jpeft.apply(MODEL, params, bank.route(ids, weights=weights), tok)

    fwd(PARAMS, bank.weights, bank.ids(["r1"] * 6), TOK)
    bank = bank.add("r4", ADAPTERS["r4"]).add("r2", ADAPTERS["r2"])
    y = fwd(PARAMS, bank.weights, bank.ids(NAMES), TOK)
    for i, name in enumerate(NAMES):
        np.testing.assert_allclose(y[i], _alone(name)[i], atol=1e-5, rtol=1e-5, err_msg=name)
    # replace r1 (scale 3) by an adapter of another scale (rank 2, alpha 7: 3.5) in the same slot
    new = jax.tree.map(lambda x: 0.3 * x, jpeft.init(jpeft.LoraConfig(r=2, alpha=7.0, target_modules=".*", init_weights="random"),
                                                     PARAMS, jax.random.key(77), MODEL, TOK))
    b2 = bank.replace("r1", new)
    y2 = fwd(PARAMS, b2.weights, b2.ids(NAMES), TOK)
    want = _FWD(PARAMS, new, TOK)
    for i, name in enumerate(NAMES):
        np.testing.assert_allclose(y2[i], (want if name == "r1" else _alone(name))[i], atol=1e-5, rtol=1e-5)
    assert float(jnp.abs(want - _alone(None)).max()) > 1e-2


def test_training_continues_after_an_add_and_never_changes_the_scales():
    """The documented loop (``loss_fn(params, weights, batch, key)`` closing over the bank) with
    AdamW's weight decay: the scales are frozen (no optimizer state, never decayed), and after
    ``bank.with_weights(w).add(...)`` the same compiled step computes the loss with the new
    adapter's scale (it used scale 0 for its rows: their loss was the bare base's)."""
    bank = AdapterBank.from_adapters({"r1": ADAPTERS["r1"]}, capacity=3, max_rank=4)
    target = (TOK + 1) % 11

    def loss_fn(params, weights, batch, key):
        logits = jpeft.apply(MODEL, params, bank.route(batch["ids"], weights=weights), batch["tok"])
        return _per_example_loss(logits, batch["target"]).mean()

    def ref_loss(b, ids):  # eager, from the bank itself: no compiled program involved
        return float(_per_example_loss(jpeft.apply(MODEL, PARAMS, b.route(ids), TOK), target).mean())

    opt = optax.adamw(3e-2, weight_decay=0.5)
    step = jpeft.make_train_step(loss_fn, opt, donate=False)
    weights, state = bank.weights, jpeft.init_opt_state(opt, bank.weights)
    assert len(jax.tree.leaves(state)) == 1 + 2 * 2 * len(ADAPTERS["r1"])  # count, mu and nu of A and B: no scales
    ids = bank.ids(["r1", None] * 3)
    for i in range(2):
        weights, state, m = step(PARAMS, weights, state, {"ids": ids, "tok": TOK, "target": target}, jax.random.key(i))
    bank = bank.with_weights(weights).add("r4", ADAPTERS["r4"])
    ids = bank.ids(["r4", "r1", None, "r4", "r4", "r1"])
    assert abs(ref_loss(bank, ids) - ref_loss(bank, bank.ids(["r1", "r1", None] + [None] * 3))) > 1e-2
    weights = bank.weights
    for i in range(2):
        before = ref_loss(bank.with_weights(weights), ids)
        weights, state, m = step(PARAMS, weights, state, {"ids": ids, "tok": TOK, "target": target}, jax.random.key(5 + i))
        np.testing.assert_allclose(float(m["loss"]), before, rtol=1e-5)
        for path in weights:  # weight decay 0.5 would have shrunk them
            np.testing.assert_array_equal(weights[path].scales, bank.scales[path])
    k = bank.slot("r4")
    assert float(jnp.abs(weights["mlp"].lora_A[k] - bank.weights["mlp"].lora_A[k]).max()) > 0  # the new slot trains
    np.testing.assert_allclose(bank.with_weights(weights).get("r4")["mlp"].scale, ADAPTERS["r4"]["mlp"].scale)


def test_stale_weights_and_routing_on_captured_arrays_are_refused():
    bank = AdapterBank.from_adapters({"r1": ADAPTERS["r1"]}, capacity=3, max_rank=4)
    ids = bank.ids(["r1"] * 6)
    # routing inside a traced function on the bank's own arrays would bake them into the program
    with pytest.raises(BankError, match=r"captured from the enclosing scope.*weights=bank.weights an argument"):
        jax.jit(lambda i, t: jpeft.apply(MODEL, PARAMS, bank.route(i), t))(ids, TOK)
    with pytest.raises(BankError, match="captured from the enclosing scope"):
        jax.jit(lambda i: bank.route(i, weights=bank.weights)["mlp"].lora_A)(ids)
    old = bank.weights
    bank2 = bank.add("r4", ADAPTERS["r4"])
    with pytest.raises(BankError, match=r"before it changed slot 1 \(now 'r4'.*bring the old adapter back"):
        bank2.with_weights(old)  # would have dropped r4 while the bank still named it
    # a replace by an adapter of the same scale at every site: only the edit number tells the weights apart
    # (with_weights(old) brought r1's old factors back under the new adapter's name, 2.87 off its logits)
    other = {p: dataclasses.replace(n, lora_B=-n.lora_B) for p, n in ADAPTERS["r1"].items()}
    swapped = bank2.replace("r1", other)
    assert swapped.slot_scales == bank2.slot_scales
    with pytest.raises(BankError, match=r"before it changed slot 0 \(now 'r1'"):
        swapped.with_weights(bank2.weights)
    np.testing.assert_allclose(jpeft.apply(MODEL, PARAMS, swapped.with_weights(swapped.weights).route(["r1"] * 6), TOK),
                               jpeft.apply(MODEL, PARAMS, other, TOK), atol=1e-5)
    decayed = {p: dataclasses.replace(st, scales=st.scales * 0.99) for p, st in bank2.weights.items()}
    with pytest.raises(BankError, match="an optimizer changed the scales"):
        bank2.with_weights(decayed)
    assert bank2.with_weights(bank2.weights).names == ("r1", "r4")
    assert bank2.remove("r4").with_weights(bank2.remove("r4").weights).names == ("r1",)


def test_a_bank_whose_arrays_a_training_step_donated_is_named_and_with_weights_goes_on():
    """make_train_step donates its adapter argument, so a step given bank.weights consumes the bank's arrays. Using
    that bank afterwards (get, route, add, remove, merged_params), or weights a later step donated, failed with JAX's
    bare "Array has been deleted" / "Buffer has been deleted or donated"; it is now a BankError saying which bank and
    array and how to go on. And the documented way on, bank = bank.with_weights(new_weights), failed the same way
    on a bank holding LoRA biases (it compared the new weights' frozen bias_on with the old bank's donated one): it
    now takes the weights, and the trained bank holds the trained arrays."""
    biased = _biased(30)
    bank = AdapterBank.from_adapters({"bias": biased, "r1": ADAPTERS["r1"]}, capacity=3)
    ids = bank.ids(["bias", "r1", None, "r1", "bias", "bias"])
    batch = {"ids": ids, "tok": TOK, "target": (TOK + 1) % 11}

    def loss_fn(params, weights, batch, key):
        logits = jpeft.apply(MODEL, params, bank.route(batch["ids"], weights=weights), batch["tok"])
        return _per_example_loss(logits, batch["target"]).mean()

    opt = optax.adam(1e-2)
    step = jpeft.make_train_step(loss_fn, opt)  # donates the weights and the optimizer state
    old_state = jpeft.init_opt_state(opt, bank.weights)
    w1, state, _ = step(PARAMS, bank.weights, old_state, batch, jax.random.key(0))
    own = r"this bank's arrays were donated to a jitted step and are gone \(embed\.lora_A is deleted\).*bank = " \
          r"bank\.with_weights\(new_weights\).*donate=False"
    # the step itself given the weights (or the optimizer state) it consumed: named, not JAX's "Buffer has been
    # deleted or donated"; nothing is looked at while the step runs (the check follows JAX's failure)
    with pytest.raises(InputValidationError, match=r"the adapter given to this training step was donated to an "
                       r"earlier call of it and is gone \(\['embed'\]\.lora_A is deleted; .*\).*bank = "
                       r"bank\.with_weights\(adapter\).*donate=False"):
        step(PARAMS, bank.weights, state, batch, jax.random.key(0))
    with pytest.raises(InputValidationError, match=r"the opt_state given to this training step was donated"):
        step(PARAMS, w1, old_state, batch, jax.random.key(0))
    for use in (lambda: bank.get("r1"), lambda: bank.route(ids), lambda: bank.add("r2", ADAPTERS["r2"]),
                lambda: bank.replace("r1", ADAPTERS["r2"]), lambda: bank.remove("r1"),
                lambda: bank.merged_params(PARAMS, "r1")):
        with pytest.raises(BankError, match=own):
            use()
    trained = bank.with_weights(w1)  # the documented way on, from the bank whose arrays the step took
    w2, state, _ = step(PARAMS, trained.weights, state, batch, jax.random.key(1))
    given = r"the weights passed in were donated to a jitted step and are gone \(embed\.lora_A is deleted\)"
    for use in (lambda: trained.with_weights(w1), lambda: bank.route(ids, weights=w1)):
        with pytest.raises(BankError, match=given):
            use()
    with pytest.raises(BankError, match=own):
        trained.get("bias")
    last = trained.with_weights(w2)  # holds the second step's arrays, the trained bias included
    k = last.slot("bias")
    for p, node in last.get("bias").items():
        np.testing.assert_array_equal(node.lora_A, w2[p].lora_A[k, :, :2])
        np.testing.assert_array_equal(node.lora_bias, w2[p].lora_bias[k])
        assert float(jnp.abs(node.lora_bias - biased[p].lora_bias).max()) > 0  # it trained


def test_summary_of_a_routed_bank_counts_the_factors_only():
    """Routing ids and scales are not parameters: summary counted them as trainable."""
    bank = AdapterBank.from_adapters(ADAPTERS, capacity=4)
    s = jpeft.summary(PARAMS, bank.route(NAMES), print_fn=lambda *a: None)
    factors = sum(st.lora_A.size + st.lora_B.size for st in bank.weights.values())
    assert s["trainable"] == factors and s["frozen"] == len(bank.weights) * (4 + len(NAMES))


# ---------------------------------------------------------------------------------------------
# LoRA biases (PEFT's lora_bias=True): PEFT mixes them in a batch, and so does the bank
# ---------------------------------------------------------------------------------------------
def _biased(seed, targets=("qkv", "mlp")):
    """A rank-2 LoRA with a lora_bias at ``targets`` (Dense and a multi-output DenseGeneral), every
    tensor random (PEFT's B and bias start at zero)."""
    cfg = jpeft.LoraConfig(r=2, alpha=5.0, target_modules=list(targets), lora_bias=True, init_weights="random")
    ad = jpeft.init(cfg, PARAMS, jax.random.key(seed), MODEL, TOK)
    leaves, tree = jax.tree.flatten(ad)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("strategy", ["gather", "ragged", "pregather"])
def test_lora_bias_adapters_route_as_each_alone_and_train_only_their_own_bias(strategy):
    """A lora_bias adapter was refused by the bank (BankError) although PEFT mixes it in a batch."""
    biased = _biased(30)
    ads = {"bias": biased, "r1": ADAPTERS["r1"], "r2": ADAPTERS["r2"]}
    bank = AdapterBank.from_adapters(ads, capacity=4, strategy=strategy)
    names = ["bias", None, "r1", "bias", "r2", "r1"]
    y = _FWD(PARAMS, bank.route(names), TOK)
    want = _FWD(PARAMS, biased, TOK)
    no_bias = _FWD(PARAMS, {p: dataclasses.replace(n, lora_bias=None) for p, n in biased.items()}, TOK)
    assert float(jnp.abs(want - no_bias).max()) > 1e-2  # the bias matters
    for i, n in enumerate(names):
        np.testing.assert_allclose(y[i], (want if n == "bias" else _alone(n))[i], atol=1e-5, rtol=1e-5, err_msg=n)
    back = bank.get("bias")
    for p, node in biased.items():
        np.testing.assert_array_equal(back[p].lora_bias, node.lora_bias)
    assert all(n.lora_bias is None for n in bank.get("r1").values())
    # gradients reach the bias of the slot whose adapter has one, and no other slot's
    ids = bank.ids(names)
    g = jax.grad(lambda w: _per_example_loss(_FWD(PARAMS, bank.route(ids, weights=w), TOK), TOK).sum())(bank.weights)
    for p in biased:
        assert float(jnp.abs(g[p].lora_bias[bank.slot("bias")]).max()) > 0
        others = [bank.slot("r1"), bank.slot("r2"), 3]
        assert float(jnp.abs(g[p].lora_bias[jnp.asarray(others)]).max()) == 0.0
        assert g[p].bias_on is not None and bank.weights[p].bias_on.tolist() == [1.0, 0.0, 0.0, 0.0]
    assert bank.weights["o_proj"].lora_bias is None  # only sites where some adapter has a bias hold them


def test_a_lora_bias_needs_a_bank_that_holds_biases_and_then_hot_swaps():
    bank = AdapterBank.from_adapters(ADAPTERS, capacity=4)
    with pytest.raises(BankError, match=r"has a LoRA bias .* at '(qkv|mlp)', but the bank holds no biases there.*"
                                        r"lora_bias=True"):
        bank.add("bias", _biased(30))
    bank = AdapterBank.create(ADAPTERS["r1"], capacity=3, max_rank=4, lora_bias=True).add("r1", ADAPTERS["r1"])
    assert bank.weights["embed"].lora_bias is None and bank.weights["mlp"].lora_bias is not None

    @jax.jit
    @chex.assert_max_traces(n=1)  # adding, replacing and removing biased adapters never recompiles
    def fwd(params, weights, ids, tok):
        return jpeft.apply(MODEL, params, bank.route(ids, weights=weights), tok)

    fwd(PARAMS, bank.weights, bank.ids(["r1"] * 6), TOK)
    b2 = bank.add("bias", _biased(30)).replace("r1", _biased(40, ("o_proj", "mlp")))
    names = ["bias", "r1", None, "r1", "bias", None]
    y = fwd(PARAMS, b2.weights, b2.ids(names), TOK)
    want = {"bias": _FWD(PARAMS, _biased(30), TOK), "r1": _FWD(PARAMS, _biased(40, ("o_proj", "mlp")), TOK)}
    for i, n in enumerate(names):
        np.testing.assert_allclose(y[i], (want[n] if n else _alone(None))[i], atol=1e-5, rtol=1e-5, err_msg=n)
    # the freed slot's bias is gone: a plain adapter added there has none
    b3 = b2.remove("bias").add("r2", ADAPTERS["r2"])
    y3 = fwd(PARAMS, b3.weights, b3.ids(["r2"] * 6), TOK)
    np.testing.assert_allclose(y3, _alone("r2"), atol=1e-5, rtol=1e-5)


def _saved_peft_adapters(tmp_path, family, cases, trained, load):
    """Each of ``cases`` (``{name: LoraConfig kwargs}``) made by PEFT on the tiny ``family`` model
    with every adapter tensor random (``lora_*`` and the parameters whose names hold ``trained``),
    saved under ``tmp_path / name``. Returns the PeftModel with the adapters named in ``load``
    loaded, jpeft's model and params of the same base, and the tiny-models module."""
    import os
    import sys

    import peft
    import torch

    sys.path.insert(0, os.path.dirname(__file__))
    import _models_tiny as T

    hf = T.hf_model(family)[0]
    for i, (name, kw) in enumerate(cases.items()):
        one = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(**kw))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for n, p in one.named_parameters():
                if "lora_" in n or trained in n:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
        one.save_pretrained(str(tmp_path / name))
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / load[0]), adapter_name=load[0])
    for name in load[1:]:
        pm.load_adapter(str(tmp_path / name), adapter_name=name)
    pm.eval()
    model, params = jpeft.models.from_pretrained(T.hf_model(family)[1])
    return pm, model, params, T


def _greedy_equals_peft(pm, model, params, bank, rows, ids):
    """Three greedy tokens after each row of ``ids``, under its adapter of ``rows``: the bank's
    (``jpeft.generate``) equal PEFT's mixed-batch ``generate``."""
    import torch

    with torch.no_grad():
        ref = pm.generate(input_ids=torch.tensor(ids), adapter_names=rows, max_new_tokens=3, do_sample=False,
                          pad_token_id=0, eos_token_id=None)
    out = np.asarray(jpeft.generate(model, params, bank.route(rows), jnp.asarray(ids), 3))
    n = ids.shape[1]
    np.testing.assert_array_equal(out[:, n:], ref[:, n:].numpy())


def test_peft_lora_bias_adapters_in_one_bank_equal_peft_mixed_batch(tmp_path):
    """PEFT adapters with lora_bias=True beside plain ones (other ranks, targets, rsLoRA), every
    adapter tensor random, loaded into one bank: each row of a mixed batch (``"__base__"`` rows
    too) gives PEFT's ``adapter_names`` forward, and greedy generation gives its tokens."""
    import os
    import sys

    import torch

    from jpeft.hf import load_peft

    sys.path.insert(0, os.path.dirname(__file__))
    import _models_tiny as T

    cases = {"b": dict(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"], lora_bias=True),
             "plain": dict(r=3, lora_alpha=5, use_rslora=True, target_modules=["v_proj", "down_proj", "lm_head"]),
             "b2": dict(r=4, lora_alpha=3, target_modules=["o_proj", "q_proj", "lm_head"], lora_bias=True)}
    hf = T.hf_model("llama2")[0]
    pm = T.peft_with_adapters(hf, cases)
    pm.save_pretrained(str(tmp_path))
    model, params = jpeft.models.from_pretrained(T.hf_model("llama2")[1])
    ads = {n: load_peft(str(tmp_path / n), params)[1] for n in cases}  # PEFT saves named adapters in subfolders
    assert ads["b"]["model/layers_0/self_attn/q_proj"].lora_bias is not None
    bank = AdapterBank.from_adapters(ads, capacity=4)
    rows = ["b", "__base__", "plain", "b2", "b"]
    ids = np.random.default_rng(0).integers(3, T.VOCAB, size=(len(rows), 7))
    got = np.asarray(jax.jit(lambda p, a, x: jpeft.apply(model, p, a, x))(params, bank.route(rows), jnp.asarray(ids)))
    bias = pm.base_model.model.model.layers[0].self_attn.q_proj.lora_B["b"].bias
    with torch.no_grad():
        want = pm(input_ids=torch.tensor(ids), adapter_names=rows).logits.numpy()
        kept = bias.clone()
        bias.zero_()  # one of b's biases matters to its rows
        without = pm(input_ids=torch.tensor(ids), adapter_names=rows).logits.numpy()
        bias.copy_(kept)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert np.abs(want[0] - without[0]).max() > 1e-2
    _greedy_equals_peft(pm, model, params, bank, rows, ids)


# ---------------------------------------------------------------------------------------------
# trainable tokens (PEFT's trainable_token_indices): PEFT mixes them in a batch, and so does the bank
# ---------------------------------------------------------------------------------------------
def _tokens(seed, ids, targets=("mlp",)):
    """A LoRA with trainable tokens ``ids`` of Tiny's embedding, every tensor random, acting on the
    input lookup only (``tie_output=False``: Tiny also reads the embedding as its output layer)."""
    cfg = jpeft.LoraConfig(r=2, alpha=3.0, target_modules=list(targets), trainable_token_indices={"embed": list(ids)},
                           init_weights="random")
    ad = jpeft.init(cfg, PARAMS, jax.random.key(seed), MODEL, TOK)
    ad["embed"] = dataclasses.replace(ad["embed"], tie_output=False)
    leaves, tree = jax.tree.flatten(ad)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(tree, [0.5 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("strategy", ["gather", "ragged", "pregather"])
def test_trainable_tokens_route_as_each_alone_beside_an_embedding_lora(strategy):
    """Adapters with trainable tokens were refused by the bank (BankError) although PEFT mixes
    them in a batch; here beside an adapter whose LoRA adapts the same embedding ("r4")."""
    ads = {"t3": _tokens(50, (1, 2, 5)), "r4": ADAPTERS["r4"], "t1": _tokens(52, (2,), ("qkv",))}
    bank = AdapterBank.from_adapters(ads, capacity=4, strategy=strategy)
    assert bank.weights["embed"].token_values.shape == (4, 3, 8) and bank.weights["mlp"].token_values is None
    names = ["t3", None, "r4", "t1", "t3", "t1"]
    y = _FWD(PARAMS, bank.route(names), TOK)
    for i, n in enumerate(names):
        want = _alone(n) if n in (None, "r4") else _FWD(PARAMS, ads[n], TOK)
        np.testing.assert_allclose(y[i], want[i], atol=1e-5, rtol=1e-5, err_msg=n)
        if n in ("t3", "t1"):  # the tokens matter to these rows
            no_tok = {p: x for p, x in ads[n].items() if p != "embed"}
            assert float(jnp.abs(want[i] - _FWD(PARAMS, no_tok, TOK)[i]).max()) > 1e-2
    back = bank.get("t3")["embed"]
    assert back.indices == (1, 2, 5) and back.tie_output is False
    np.testing.assert_array_equal(back.values, ads["t3"]["embed"].values)
    # gradients reach the values of the slot's own tokens only; the ids are frozen
    ids = bank.ids(names)
    g = jax.grad(lambda w: _per_example_loss(_FWD(PARAMS, bank.route(ids, weights=w), TOK), TOK).sum())(bank.weights)
    gv = g["embed"].token_values
    assert float(jnp.abs(gv[bank.slot("t3")]).max()) > 0 and float(jnp.abs(gv[bank.slot("t1"), 0]).max()) > 0
    assert float(jnp.abs(gv[bank.slot("t1"), 1:]).max()) == 0.0  # t1 has one token: the padding gets nothing
    assert float(jnp.abs(gv[bank.slot("r4")]).max()) == 0.0 and float(jnp.abs(gv[3]).max()) == 0.0
    assert "token_ids" in type(bank.weights["embed"]).frozen


def test_trainable_tokens_hot_swap_and_the_bank_s_token_capacity():
    bank = AdapterBank.from_adapters({"t1": _tokens(52, (2,), ("qkv",))}, capacity=3, max_rank=4)
    with pytest.raises(BankError, match=r"has 3 trainable tokens .* at 'embed', but the bank holds 1 per adapter there.*"
                                        r"max_tokens=3"):
        bank.add("t3", _tokens(50, (1, 2, 5)))
    with pytest.raises(BankError, match=r"has 3 trainable tokens .* the bank holds 0 per adapter"):
        AdapterBank.from_adapters(ADAPTERS, capacity=4).add("t3", _tokens(50, (1, 2, 5)))
    bank = AdapterBank.create(ADAPTERS["r4"], capacity=3, max_rank=4, max_tokens=3).add("t1", _tokens(52, (2,), ("qkv",)))

    @jax.jit
    @chex.assert_max_traces(n=1)  # adding, replacing and removing token adapters never recompiles
    def fwd(params, weights, ids, tok):
        return jpeft.apply(MODEL, params, bank.route(ids, weights=weights), tok)

    fwd(PARAMS, bank.weights, bank.ids(["t1"] * 6), TOK)
    b2 = bank.add("t3", _tokens(50, (1, 2, 5))).replace("t1", ADAPTERS["r4"])  # t1's slot: an embedding LoRA now
    names = ["t3", "t1", None, "t1", "t3", None]
    y = fwd(PARAMS, b2.weights, b2.ids(names), TOK)
    want = {"t3": _FWD(PARAMS, _tokens(50, (1, 2, 5)), TOK), "t1": _alone("r4"), None: _alone(None)}
    for i, n in enumerate(names):
        np.testing.assert_allclose(y[i], want[n][i], atol=1e-5, rtol=1e-5, err_msg=n)
    b3 = b2.remove("t3").add("r1", ADAPTERS["r1"])  # the freed slot's tokens are gone
    np.testing.assert_allclose(fwd(PARAMS, b3.weights, b3.ids(["r1"] * 6), TOK), _alone("r1"), atol=1e-5, rtol=1e-5)


def test_peft_trainable_tokens_adapters_in_one_bank_equal_peft_mixed_batch(tmp_path):
    """PEFT adapters with trainable tokens of Llama's (untied) embed_tokens, other token ids and
    LoRA targets, every adapter tensor random, loaded into one bank: each row of a mixed batch
    (``"__base__"`` rows too) gives PEFT's ``adapter_names`` forward and greedy generation. (PEFT
    loads no adapter without tokens beside them; the bank also mixes one, checked against it alone.)"""
    import torch

    from jpeft.hf import load_peft

    cases = {"t": dict(r=2, lora_alpha=4, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [3, 5, 9]}),
             "t2": dict(r=3, lora_alpha=3, target_modules=["o_proj", "lm_head"], trainable_token_indices=[5, 7]),
             "plain": dict(r=2, lora_alpha=5, target_modules=["v_proj"])}
    pm, model, params, T = _saved_peft_adapters(tmp_path, "llama2", cases, "trainable_tokens", load=("t", "t2"))
    ads = {n: load_peft(str(tmp_path / n), params)[1] for n in cases}
    bank = AdapterBank.from_adapters(ads, capacity=4)
    rows = ["t", "__base__", "t2", "t2", "t"]
    ids = np.random.default_rng(0).integers(3, 12, size=(len(rows), 7))  # ids 3..11: the tokens occur
    fwd = jax.jit(lambda p, a, x: jpeft.apply(model, p, a, x))
    got = np.asarray(fwd(params, bank.route(["t", "__base__", "plain", "t2", "t"]), jnp.asarray(ids)))
    with torch.no_grad():
        want = pm(input_ids=torch.tensor(ids), adapter_names=rows).logits.numpy()
        with pm.disable_adapter():
            base = pm(input_ids=torch.tensor(ids)).logits.numpy()
    peft_rows = [0, 1, 3, 4]  # row 2 is "plain", which PEFT cannot load beside them: it is checked alone
    np.testing.assert_allclose(got[peft_rows], want[peft_rows], atol=1e-4, rtol=0)
    assert np.abs(want[0] - base[0]).max() > 0.1 and np.abs(want[3] - base[3]).max() > 0.1
    np.testing.assert_allclose(got[2], np.asarray(fwd(params, ads["plain"], jnp.asarray(ids)))[2], atol=1e-5, rtol=0)
    _greedy_equals_peft(pm, model, params, bank, rows, ids)


# ---------------------------------------------------------------------------------------------
# modules_to_save copies of Dense / Embed modules: PEFT mixes them in a batch, and so does the bank
# ---------------------------------------------------------------------------------------------
def _saved(seed, modules=("mlp",), targets=("qkv",)):
    """A LoRA with trained copies of ``modules`` (PEFT's modules_to_save), every tensor random."""
    cfg = jpeft.LoraConfig(r=2, alpha=3.0, target_modules=list(targets), modules_to_save=list(modules), init_weights="random")
    ad = jpeft.init(cfg, PARAMS, jax.random.key(seed), MODEL, TOK)
    leaves, tree = jax.tree.flatten(ad)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(tree, [0.5 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("strategy", ["gather", "ragged", "pregather"])
def test_modules_to_save_copies_route_as_each_alone_beside_a_lora_of_the_same_module(strategy):
    """Adapters with modules_to_save copies were refused by the bank (BankError) although PEFT
    mixes copies of Linear and Embedding modules in a batch; here beside LoRAs of the same module."""
    ads = {"s1": _saved(60), "r1": ADAPTERS["r1"], "s2": _saved(62, ("mlp",), ("o_proj",))}
    bank = AdapterBank.from_adapters(ads, capacity=4, strategy=strategy)
    assert set(bank.weights["mlp"].saved) == {"kernel", "bias"} and bank.weights["qkv"].saved is None
    names = ["s1", None, "r1", "s2", "s1", "r1"]
    y = _FWD(PARAMS, bank.route(names), TOK)
    for i, n in enumerate(names):
        want = _alone(n) if n in (None, "r1") else _FWD(PARAMS, ads[n], TOK)
        np.testing.assert_allclose(y[i], want[i], atol=1e-5, rtol=1e-5, err_msg=n)
        if n in ("s1", "s2"):  # the copies matter to these rows
            without = {p: x for p, x in ads[n].items() if p != "mlp"}
            assert float(jnp.abs(want[i] - _FWD(PARAMS, without, TOK)[i]).max()) > 1e-2
    back = bank.get("s2")["mlp"]
    chex.assert_trees_all_equal(dict(back.params), dict(ads["s2"]["mlp"].params))
    # gradients reach the copy of the slot's own adapter only; saved_on is frozen
    ids = bank.ids(names)
    g = jax.grad(lambda w: _per_example_loss(_FWD(PARAMS, bank.route(ids, weights=w), TOK), TOK).sum())(bank.weights)
    gk = g["mlp"].saved["kernel"]
    assert float(jnp.abs(gk[bank.slot("s1")]).max()) > 0 and float(jnp.abs(gk[bank.slot("s2")]).max()) > 0
    assert float(jnp.abs(gk[bank.slot("r1")]).max()) == 0.0 and float(jnp.abs(gk[3]).max()) == 0.0
    assert "saved_on" in type(bank.weights["mlp"]).frozen


def test_modules_to_save_copies_need_a_bank_that_holds_them_and_hot_swap():
    with pytest.raises(BankError, match=r"has a trained copy of the module at 'mlp' \(LoraConfig.modules_to_save\), but the "
                                        r"bank holds no copies there"):
        AdapterBank.from_adapters(ADAPTERS, capacity=4).add("s1", _saved(60))
    bank = AdapterBank.from_adapters({"s1": _saved(60), "r4": ADAPTERS["r4"]}, capacity=3)

    @jax.jit
    @chex.assert_max_traces(n=1)  # adding, replacing and removing adapters with copies never recompiles
    def fwd(params, weights, ids, tok):
        return jpeft.apply(MODEL, params, bank.route(ids, weights=weights), tok)

    fwd(PARAMS, bank.weights, bank.ids(["s1"] * 6), TOK)
    s2 = _saved(62, ("mlp",), ("o_proj",))
    b2 = bank.replace("s1", ADAPTERS["r2"]).add("s2", s2)  # s1's slot: a LoRA of the copied module now
    names = ["s2", "s1", None, "r4", "s2", "s1"]
    y = fwd(PARAMS, b2.weights, b2.ids(names), TOK)
    want = {"s2": _FWD(PARAMS, s2, TOK), "s1": _alone("r2"), "r4": _alone("r4"), None: _alone(None)}
    for i, n in enumerate(names):
        np.testing.assert_allclose(y[i], want[n][i], atol=1e-5, rtol=1e-5, err_msg=n)
    b3 = b2.remove("s2").add("r1", ADAPTERS["r1"])  # the freed slot's copy is gone
    np.testing.assert_allclose(fwd(PARAMS, b3.weights, b3.ids(["r1"] * 6), TOK), _alone("r1"), atol=1e-5, rtol=1e-5)


class _WideHead(nn.Module):
    """A wide output layer (an lm_head's shape): one copy of its kernel is 32 x 4,096 floats."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(4096, name="head")(nn.Dense(32, name="proj")(x))


def test_routing_copies_of_a_wide_head_holds_one_copy_at_a_time_not_one_per_row():
    """The default strategies run each row with its slot's copy one row at a time: the compiled
    forward's temporaries stay near one copy of the kernel for 16 rows (XLA's memory analysis of
    the compiled program). Gathering every row's copy first held 16 of them (8 MiB here; for a
    real lm_head, batch x vocab x hidden weights)."""
    model, x = _WideHead(), jnp.ones((16, 1, 8))
    params = model.init(jax.random.key(0), x)
    cfg = jpeft.LoraConfig(r=2, target_modules=["proj"], modules_to_save=["head"], init_weights="random")
    ads = {n: jax.tree.map(lambda a: a + 0.1, jpeft.init(cfg, params, jax.random.key(i), model, x)) for i, n in enumerate("ab")}
    names = ["a", "b"] * 8
    one_copy = 32 * 4096 * 4
    for strategy in ("gather", "ragged"):
        bank = AdapterBank.from_adapters(ads, capacity=2, strategy=strategy)
        fwd = jax.jit(lambda w, ids, x: jpeft.apply(model, params, bank.route(ids, weights=w), x))
        ids = bank.ids(names)
        temp = fwd.lower(bank.weights, ids, x).compile().memory_analysis().temp_size_in_bytes
        assert temp < 4 * one_copy, (strategy, temp / one_copy)
        y = fwd(bank.weights, ids, x)
        for i, n in enumerate(names[:2]):
            np.testing.assert_allclose(y[i], jpeft.apply(model, params, ads[n], x)[i], atol=1e-5, rtol=1e-5)


def test_peft_modules_to_save_adapters_in_one_bank_equal_peft_mixed_batch(tmp_path):
    """PEFT adapters with copies of lm_head and embed_tokens (modules_to_save) beside LoRAs,
    every adapter tensor random, loaded into one bank: each row of a mixed batch (``"__base__"``
    rows too) gives PEFT's ``adapter_names`` forward and greedy generation."""
    import torch

    from jpeft.hf import load_peft

    cases = {"a": dict(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["lm_head", "embed_tokens"]),
             "b": dict(r=3, lora_alpha=5, use_rslora=True, target_modules=["v_proj", "down_proj"],
                       modules_to_save=["lm_head", "embed_tokens"])}
    pm, model, params, T = _saved_peft_adapters(tmp_path, "llama2", cases, "modules_to_save", load=("a", "b"))
    bank = AdapterBank.from_adapters({n: load_peft(str(tmp_path / n), params)[1] for n in cases}, capacity=3)
    rows = ["a", "__base__", "b", "b", "a"]
    ids = np.random.default_rng(0).integers(3, T.VOCAB, size=(len(rows), 7))
    got = np.asarray(jax.jit(lambda p, a, x: jpeft.apply(model, p, a, x))(params, bank.route(rows), jnp.asarray(ids)))
    with torch.no_grad():
        want = pm(input_ids=torch.tensor(ids), adapter_names=rows).logits.numpy()
        with pm.disable_adapter():
            base = pm(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert np.abs(want[0] - base[0]).max() > 0.1 and np.abs(want[2] - base[2]).max() > 0.1
    _greedy_equals_peft(pm, model, params, bank, rows, ids)


@pytest.mark.parametrize("strategy", ["gather", "pregather"])
def test_trainable_tokens_of_a_tied_embedding_act_in_its_attend_per_row(strategy):
    """Tiny reads its embedding as its output layer too (``attend``), where an adapter's token rows
    act as well (PEFT ties them to the tied lm_head): each row's logits of its adapter's token ids
    come from that adapter's rows. (Refused by the bank before, as any trainable tokens.)"""
    def tied(seed, ids, targets):
        ad = _tokens(seed, ids, targets)
        return {**ad, "embed": dataclasses.replace(ad["embed"], tie_output=True)}

    ads = {"t3": tied(50, (1, 2, 5), ("mlp",)), "t1": tied(52, (2, 7), ("qkv",)), "r2": ADAPTERS["r2"]}
    bank = AdapterBank.from_adapters(ads, capacity=4, strategy=strategy)
    assert bank.weights["embed"].tied_tokens and bank.get("t1")["embed"].tie_output is True
    names = ["t3", None, "r2", "t1", "t3", "t1"]
    y = _FWD(PARAMS, bank.route(names), TOK)
    for i, n in enumerate(names):
        want = _alone(n) if n in (None, "r2") else _FWD(PARAMS, ads[n], TOK)
        np.testing.assert_allclose(y[i], want[i], atol=1e-5, rtol=1e-5, err_msg=n)
        if n in ("t3", "t1"):  # the rows act in the output layer too
            lookup_only = {**ads[n], "embed": dataclasses.replace(ads[n]["embed"], tie_output=False)}
            assert float(jnp.abs(want[i] - _FWD(PARAMS, lookup_only, TOK)[i]).max()) > 1e-2
    with pytest.raises(BankError, match=r"act in the input lookup only, but the bank's tokens there act in the tied"):
        bank.add("untied", _tokens(54, (3,)))


def test_peft_trainable_tokens_of_gpt2s_tied_wte_in_one_bank_equal_peft_mixed_batch(tmp_path):
    """GPT-2 ties lm_head to wte, and PEFT's token rows act in both: adapters with tokens of wte
    (other ids, LoRAs of the Conv1D projections, every adapter tensor random) in one bank give
    PEFT's ``adapter_names`` forward and greedy generation, ``"__base__"`` rows too."""
    import torch

    from jpeft.hf import load_peft

    cases = {"t": dict(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True,
                       trainable_token_indices={"wte": [3, 5, 9]}),
             "t2": dict(r=3, lora_alpha=3, target_modules=["c_fc"], fan_in_fan_out=True, trainable_token_indices=[5, 7])}
    pm, model, params, T = _saved_peft_adapters(tmp_path, "gpt2", cases, "trainable_tokens", load=("t", "t2"))
    bank = AdapterBank.from_adapters({n: load_peft(str(tmp_path / n), params)[1] for n in cases}, capacity=3)
    rows = ["t", "__base__", "t2", "t2", "t"]
    ids = np.random.default_rng(0).integers(3, 12, size=(len(rows), 7))  # ids 3..11: the tokens occur
    got = np.asarray(jax.jit(lambda p, a, x: jpeft.apply(model, p, a, x))(params, bank.route(rows), jnp.asarray(ids)))
    with torch.no_grad():
        want = pm(input_ids=torch.tensor(ids), adapter_names=rows).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert np.abs(want[0][:, [3, 5, 9]] - T.torch_logits("gpt2", ids, np.ones_like(ids))[0][:, [3, 5, 9]]).max() > 0.1
    _greedy_equals_peft(pm, model, params, bank, rows, ids)
