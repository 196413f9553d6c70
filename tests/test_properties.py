"""One shared property suite over a table of every method (as Hugging Face PEFT's common tester
does): identity at init where the method defines it, merged == factored for the mergeable ones,
save/load round trip, jit / grad / vmap, only adapter leaves trained, a few training steps
on a toy task reduce the loss, a bfloat16 base, the chunked loss and the NNX Llama. All on one
tiny Llama (grouped-query attention, one layer); then the linear methods on a model of the user's own
(linen and NNX: every linear module kind, a module called twice, a layer scan, an ensemble's vmap)
against each method's formula on the base weights."""

import dataclasses
import functools
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jpeft
import jpeft.models
from jpeft.models import llama_nnx
from jpeft import BottleneckConfig
from jpeft import IA3Config
from jpeft import LoHaConfig
from jpeft import LoKrConfig
from jpeft import LNTuningConfig
from jpeft import OFTConfig
from jpeft import init_corda, init_milora, init_olora, init_pissa
from jpeft import PrefixTuningConfig, PrefixWeights, fold_prefix
from jpeft import PromptTuningConfig

CFG = jpeft.models.LlamaConfig(vocab_size=24, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2,
                               num_kv_heads=1, max_position_embeddings=32, initializer_range=0.3)
MODEL = jpeft.models.LlamaForCausalLM(CFG)
IDS = jax.random.randint(jax.random.key(7), (4, 6), 0, 24)
PARAMS = MODEL.init(jax.random.key(0), IDS)


@dataclasses.dataclass(frozen=True)
class Case:
    config: object
    identity: bool  # the method defines an identity start
    mergeable: bool
    invertible: bool = True  # unmerge recovers the base
    residual: object = None  # init_pissa / init_olora: the adapter comes with a residual base
    merge_refusal: str = "cannot be folded|jpeft.apply"  # what a non-mergeable case's NotMergeableError says


CASES = {
    "lora": Case(jpeft.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]), True, True),
    "rslora": Case(jpeft.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"], use_rslora=True), True, True),
    "dora": Case(jpeft.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj", "up_proj"], use_dora=True), True, True,
                 invertible=False),
    "ia3": Case(IA3Config(), True, True),
    "houlsby": Case(BottleneckConfig.houlsby(reduction_factor=4, init_weights="mam"), True, False),
    "pfeiffer": Case(BottleneckConfig.pfeiffer(reduction_factor=4, init_weights="mam"), True, False),
    "prefix": Case(PrefixTuningConfig(num_virtual_tokens=2), False, False),
    "prompt": Case(PromptTuningConfig(num_virtual_tokens=2), False, False),
    "pissa": Case(jpeft.LoraConfig(r=2, alpha=2, target_modules=["q_proj", "v_proj", "up_proj"], init_weights="pissa"), True, True,
                  residual=init_pissa),
    "olora": Case(jpeft.LoraConfig(r=2, alpha=2, target_modules=["q_proj", "v_proj"], init_weights="olora"), True, True,
                  residual=init_olora),
    # trainable tokens (PEFT's trainable_token_indices): rows 1 and 3 of the embedding, beside LoRA on q
    "tokens": Case(jpeft.LoraConfig(r=2, alpha=4, target_modules=["q_proj"], trainable_token_indices=[1, 3]), True, True,
                   invertible=False),  # merged rows replace the base rows
    "loha": Case(LoHaConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]), True, True),
    "lokr": Case(LoKrConfig(r=1, alpha=2, target_modules=["q_proj", "v_proj", "up_proj"]), True, True),
    "oft": Case(OFTConfig(oft_block_size=4, target_modules=["q_proj", "v_proj"]), True, True),
    "ln_tuning": Case(LNTuningConfig(), True, True, invertible=False),
    "vera": Case(jpeft.VeraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"]), True, True),
    "adalora": Case(jpeft.AdaLoraConfig(init_r=3, target_r=2, total_step=10, target_modules=["q_proj", "v_proj"]), True, True),
    # LoRA's other options and inits, and the other variants of the table's methods
    # this Llama's projections have no bias to fold lora_bias into (PEFT refuses that merge too)
    "lora_bias": Case(jpeft.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"], lora_bias=True), True, False,
                      merge_refusal="no bias to fold it into"),
    "patterns": Case(jpeft.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj", "up_proj"], rank_pattern={"v_proj": 3},
                                      alpha_pattern={"up_proj": 8.0}), True, True),
    "modules_to_save": Case(jpeft.LoraConfig(r=2, alpha=4, target_modules=["q_proj"], modules_to_save=["lm_head"]), True, True,
                            invertible=False),  # the merged copy replaces the base head
    "milora": Case(jpeft.LoraConfig(r=2, alpha=2, target_modules=["q_proj", "v_proj"], init_weights="milora"), True, True,
                   residual=init_milora),
    "corda": Case(jpeft.LoraConfig(r=2, alpha=2, target_modules=["q_proj", "v_proj"], init_weights="corda_kpm"), True, True,
                  residual=lambda cfg, p, key: init_corda(cfg, p, key, MODEL, [IDS[i:i + 1] for i in range(4)])),
    "oft_block_share": Case(OFTConfig(oft_block_size=4, block_share=True, target_modules=["q_proj", "v_proj"]), True, True),
    "oft_coft": Case(OFTConfig(oft_block_size=4, coft=True, eps=2.0, target_modules=["q_proj", "v_proj"]), True, True),
    "lokr_both": Case(LoKrConfig(r=1, alpha=2, decompose_both=True, target_modules=["q_proj", "up_proj"]), True, True),
    "full": Case(jpeft.FullFinetuneConfig(), True, True, invertible=False),
}


def make(name, key=jax.random.key(1)):
    """``(params, adapter)`` for a case (PiSSA and OLoRA return the residual base)."""
    c = CASES[name]
    if c.residual is not None:
        return c.residual(c.config, PARAMS, key)
    return PARAMS, jpeft.init(c.config, PARAMS, key)


def perturb(adapter, key, scale=0.3):
    """Random non-identity values, as after training (every leaf moved)."""
    leaves, tdef = jax.tree.flatten(adapter)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(tdef, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def loss_fn(params, adapter, batch, key=None):
    logits = jpeft.apply(MODEL, params, adapter, batch)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp, batch[:, 1:, None], axis=-1))


# One jitted entry point, compiled once per adapter structure and reused by every property.
APPLY = jax.jit(lambda p, a, x: jpeft.apply(MODEL, p, a, x))
BASE_APPLY = jax.jit(MODEL.apply)  # the bare model (merged params share this compile)
BASE = BASE_APPLY(PARAMS, IDS)


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.identity])
def test_identity_at_init(name):
    params, ad = make(name)
    np.testing.assert_allclose(APPLY(params, ad, IDS), BASE, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_merge(name):
    c = CASES[name]
    params, ad = make(name)
    ad = perturb(ad, jax.random.key(2))
    if not c.mergeable:
        with pytest.raises(jpeft.NotMergeableError, match=c.merge_refusal):
            jpeft.merge(params, ad)
        return
    merged = jpeft.merge(params, ad)
    np.testing.assert_allclose(BASE_APPLY(merged, IDS), APPLY(params, ad, IDS), rtol=1e-5, atol=1e-5)  # ~1e-6 seen
    if c.invertible:
        chex.assert_trees_all_close(jpeft.unmerge(merged, ad), params, rtol=1e-5, atol=1e-6)  # ~3e-8 seen
    else:
        with pytest.raises(jpeft.errors.NotInvertibleError):
            jpeft.unmerge(merged, ad)


@pytest.mark.parametrize("name", list(CASES))
def test_save_load_roundtrip(name, tmp_path):
    c = CASES[name]
    params, ad = make(name)
    ad = perturb(ad, jax.random.key(3))
    jpeft.save_adapter(tmp_path / "a", c.config, ad, params=params, metadata={"method": name})
    config, loaded = jpeft.load_adapter(tmp_path / "a", params)
    assert config == c.config and config.to_dict() == c.config.to_dict()
    chex.assert_trees_all_equal(loaded, ad)  # structure (node types, static fields) and every array
    # the config alone round-trips through JSON with Hugging Face key names
    assert type(c.config).from_json(c.config.to_json()) == c.config


@pytest.mark.parametrize("name", list(CASES))
def test_jit_vmap(name):
    params, ad = make(name)
    ad = perturb(ad, jax.random.key(4))
    eager = jpeft.apply(MODEL, params, ad, IDS)  # op by op, no jit
    np.testing.assert_allclose(APPLY(params, ad, IDS), eager, rtol=1e-5, atol=1e-5)
    # vmap over a stack of two adapters equals running each (e.g. per-task adapters)
    ad2 = perturb(ad, jax.random.key(5))
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), ad, ad2)
    out = jax.jit(jax.vmap(lambda a: jpeft.apply(MODEL, params, a, IDS)))(stacked)
    np.testing.assert_allclose(out[0], eager, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out[1], APPLY(params, ad2, IDS), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_grad_training_reduces_loss_and_touches_only_the_adapter(name):
    params, ad = make(name)
    before = jax.tree.map(np.asarray, params)
    opt = optax.adam(1e-1)
    state = opt.init(jpeft.trainable(ad))
    # the optimizer state exists for the adapter's trainable leaves only (not its frozen arrays, if any)
    n_ad = sum(x.size for x in jax.tree.leaves(jpeft.trainable(ad)))
    assert sum(x.size for x in jax.tree.leaves(state) if x.ndim) == 2 * n_ad
    step = jpeft.make_train_step(loss_fn, opt, donate=False)
    ad = perturb(ad, jax.random.key(4), scale=0.05)  # off the identity start, where some gradients are exactly 0
    first, state1, m = step(params, ad, state, IDS, jax.random.key(0))
    # grad (inside the jitted step): finite, and every adapter leaf receives a non-zero gradient, so Adam
    # moves every leaf (a leaf with a zero gradient would not move)
    assert float(m["grad_norm"]) > 0 and np.isfinite(float(m["grad_norm"]))
    train0, frozen0 = jpeft.split_frozen(ad)
    train1, frozen1 = jpeft.split_frozen(first)
    for name_, a, b in zip(jax.tree.leaves(jax.tree_util.tree_map_with_path(lambda p, x: jax.tree_util.keystr(p), train0)),
                           jax.tree.leaves(train1), jax.tree.leaves(train0)):
        assert float(jnp.abs(a - b).max()) > 0, f"{name_} received no gradient"
    chex.assert_trees_all_equal(frozen1, frozen0)  # frozen arrays (if any) are never updated
    losses = [float(m["loss"])]
    ad, state = first, state1
    for i in range(1, 25):
        ad, state, m = step(params, ad, state, IDS, jax.random.key(i))
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.9 * losses[0], losses
    chex.assert_trees_all_equal(params, before)


@pytest.mark.parametrize("name", list(CASES))
def test_bfloat16_base(name):
    """On a bfloat16 base (``jpeft.cast_base``) with a float32 adapter, every random adapter gives
    the float32 outputs to bfloat16 precision (seen: up to 0.06 on logits of 2 to 4, the bare
    model's own bfloat16 error being 0.03), and merging keeps the base's bfloat16 dtype."""
    params, ad = make(name)
    ad = perturb(ad, jax.random.key(2))
    want = APPLY(params, ad, IDS)
    assert float(jnp.abs(want - BASE_APPLY(params, IDS)).max()) > 1.0  # the adapter moves logits far past the tolerance
    p16 = jpeft.cast_base(params, jnp.bfloat16)
    got = APPLY(p16, ad, IDS)
    np.testing.assert_allclose(got.astype(jnp.float32), want, atol=0.15, rtol=0)
    if CASES[name].mergeable:
        merged = jpeft.merge(p16, ad)
        assert {x.dtype for x in jax.tree.leaves(merged)} == {jnp.dtype(jnp.bfloat16)}
        np.testing.assert_allclose(BASE_APPLY(merged, IDS).astype(jnp.float32), want, atol=0.15, rtol=0)


def _with_head(name):
    """``make(name)`` with the output layer targeted too where the method takes a list of
    modules (so the chunked loss runs the method's own node at ``lm_head``)."""
    c = CASES[name]
    tm = getattr(c.config, "target_modules", None)
    if not isinstance(tm, (list, tuple)) or name in ("tokens", "modules_to_save"):
        return make(name)
    cfg = dataclasses.replace(c.config, target_modules=[*tm, "lm_head"])
    if c.residual is not None:
        return c.residual(cfg, PARAMS, jax.random.key(1))
    return PARAMS, jpeft.init(cfg, PARAMS, jax.random.key(1))


LOSS_MASK = (jax.random.uniform(jax.random.key(9), IDS.shape) > 0.25).astype(jnp.int32)


@pytest.mark.parametrize("name", list(CASES))
def test_chunked_loss_equals_whole_logits(name):
    """``jpeft.lm_loss`` (the output layer and the loss a few positions at a time) gives the
    loss and every adapter gradient of the whole-logits loss, with every adapter tensor
    random and ``lm_head`` among the targets where the method takes a module list."""
    params, ad = _with_head(name)
    ad = perturb(ad, jax.random.key(8))

    def whole(a):
        if name == "prompt":  # lm_loss also scores the last virtual token's prediction of token 0, as PEFT does
            a = dict(a, **{"": dataclasses.replace(a[""], keep_last_virtual=True)})
            lead = jnp.zeros_like(IDS[:, :1])
            return jpeft.data.causal_lm_loss(jpeft.apply(MODEL, params, a, IDS), jnp.concatenate([lead, IDS], 1),
                                             jnp.concatenate([lead.astype(LOSS_MASK.dtype), LOSS_MASK], 1))[0]
        return jpeft.data.causal_lm_loss(jpeft.apply(MODEL, params, a, IDS), IDS, LOSS_MASK)[0]

    def chunked(a):  # 4 rows x 2 positions a chunk: three chunks
        return jpeft.lm_loss(MODEL, params, a, IDS, LOSS_MASK, chunk_tokens=8)[0]

    want, gw = jax.jit(jax.value_and_grad(whole))(ad)
    got, gc = jax.jit(jax.value_and_grad(chunked))(ad)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    chex.assert_trees_all_close(gc, gw, rtol=1e-5, atol=1e-6)
    assert all(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(jpeft.trainable(gc)))


def test_summary_counts_every_method():
    """Trainable counts are the closed-form sizes of each method's arrays."""
    h, L, inter, kv, T = 8, 1, 16, 4, 2  # hidden, layers, ffn width, kv width (1 head x 4), virtual tokens
    expected = {
        "lora": L * (2 * (h * 2 + 2 * h) // 1) - L * 2 * (2 * h - 2 * kv) // 1,  # q: h->h, v: h->kv
        "dora": None,
        "ia3": L * (kv + kv + inter),
        "houlsby": 2 * L * (h * 2 + 2 + 2 * h + h),
        "pfeiffer": L * (h * 2 + 2 + 2 * h + h),
        "prefix": T * L * 2 * kv,
        "prompt": T * h,
        "loha": L * 2 * 2 * ((h + h) + (h + kv)),  # two rank-2 pairs [out, r], [r, in] on q (8->8) and v (8->4)
        # w1 [a, c] + w2_a [b, 1] + w2_b [1, d] with out = a*b, in = c*d: q 8=2*4 <- 8=2*4, v 4=2*2 <- 8, up 16=4*4 <- 8
        "lokr": L * ((2 * 2 + 4 + 4) + (2 * 2 + 2 + 4) + (4 * 2 + 4 + 4)),
        "oft": L * 2 * (h // 4) * (4 * 3 // 2),  # q, v: h/4 blocks of 4, 6 numbers each
        "vera": L * (3 * 4 + h + kv + inter),  # lambda_d [r=4] + lambda_b [out] on q, v, up; projections are frozen
        "adalora": L * (3 * (h + h) + 3 + 3 * (h + kv) + 3),  # A [in, 3], B [3, out], E [3] on q and v
        "olora": None,  # LoRA's count
        "tokens": L * (h * 2 + 2 * h) + 2 * h,  # LoRA r=2 on q, plus two embedding rows of width h
    }
    expected["lora"] = L * ((h * 2 + 2 * h) + (h * 2 + 2 * kv))
    expected["dora"] = expected["lora"] + L * (h + kv) + L * ((h * 2 + 2 * inter) + inter)
    expected["olora"] = expected["lora"]
    for name, n in expected.items():
        _, ad = make(name)
        s = jpeft.summary(PARAMS, ad, print_fn=None)
        assert s["trainable"] == n, (name, s["trainable"], n)
        assert s["base"] == sum(x.size for x in jax.tree.leaves(PARAMS))
        assert s["share"] == pytest.approx(n / (n + s["base"]))
    # LN tuning's copies are counted beside the norms' own parameters, as PEFT counts them
    s = jpeft.summary(PARAMS, make("ln_tuning")[1], print_fn=None)
    assert s["trainable"] == 2 * L * h + h and s["total"] == s["base"] + s["trainable"]


def test_prefix_mlp_folds_saves_and_trains(tmp_path):
    """The reparameterised prefix (not in the table, to keep the suite fast): folding keeps the
    outputs, it saves and loads, and every MLP leaf receives a gradient."""
    cfg = PrefixTuningConfig(num_virtual_tokens=2, prefix_projection=True)
    ad = perturb(jpeft.init(cfg, PARAMS, jax.random.key(1)), jax.random.key(6))
    g = jax.jit(jax.grad(loss_fn, argnums=1))(PARAMS, ad, IDS)
    assert all(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(g))
    np.testing.assert_allclose(APPLY(PARAMS, fold_prefix(ad), IDS), APPLY(PARAMS, ad, IDS),
                               rtol=1e-5, atol=1e-5)
    assert isinstance(fold_prefix(ad)[""], PrefixWeights)
    jpeft.save_adapter(tmp_path / "a", cfg, ad, params=PARAMS)
    _, loaded = jpeft.load_adapter(tmp_path / "a", PARAMS)
    chex.assert_trees_all_equal(loaded, ad)


# -- the same table on the NNX Llama (#20): same weights, same module paths, same adapters --------
# prefix and prompt tuning act at the model's root (the linen models' prefix_kv= / inputs_embeds=),
# and full fine-tuning swaps the root's params, which NNX models refuse by name (tests/test_nnx.py);
# every other method runs here.
NNX_GRAPH, NNX_STATE = llama_nnx.from_params(CFG, PARAMS)
# op by op (no jit): the ops' compiles are shared by every case, a jit would compile each case's graph
NNX_APPLY = functools.partial(jpeft.apply, NNX_GRAPH)
NNX_BASE = jax.jit(lambda s, x: nnx.merge(NNX_GRAPH, s)(x))  # one structure for every case: one compile


@pytest.mark.parametrize("name", [n for n in CASES if n not in ("prefix", "prompt", "full")])
def test_nnx_model_identity_same_outputs_and_merge(name):
    c = CASES[name]
    params, ad = make(name)
    state = llama_nnx.from_params(CFG, params)[1]  # PiSSA/OLoRA's residual base, as NNX state
    np.testing.assert_allclose(NNX_BASE(NNX_STATE, IDS), BASE, rtol=1e-5, atol=1e-5)
    if c.identity:
        np.testing.assert_allclose(NNX_APPLY(state, ad, IDS), BASE, rtol=1e-4, atol=1e-5)
    ad = perturb(ad, jax.random.key(2))
    y = NNX_APPLY(state, ad, IDS)
    np.testing.assert_allclose(y, APPLY(params, ad, IDS), rtol=1e-5, atol=1e-5)
    if c.mergeable:
        np.testing.assert_allclose(NNX_BASE(jpeft.merge(state, ad), IDS), y, rtol=1e-5, atol=1e-5)


# -- a model of the user's own (linen and NNX), not one of jpeft's: every linear module kind (an
# nn.Conv, nn.DenseGeneral with several output and several input axes, an nn.Einsum, an nn.Embed),
# a module called twice, a layer scan and an nn.remat module; each method's apply and merge against
# its formula on the base weights, written here, with every adapter tensor random -------------------
class _UserLayer(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        g = nn.DenseGeneral((2, 3), name="split")(h)  # kernel [6, 2, 3]: one input axis, two output axes
        return jnp.tanh(nn.DenseGeneral(6, axis=(-2, -1), name="join")(g)), None  # kernel [2, 3, 6]


class _UserNet(nn.Module):
    @nn.compact
    def __call__(self, ids):
        h = nn.Conv(6, (3,), name="conv")(nn.Embed(11, 6, name="emb")(ids))
        scan = nn.scan(_UserLayer, variable_axes={"params": 0, jpeft.scan.COLLECTION: 0},
                       split_rngs={"params": True}, length=2)
        h, _ = scan(name="layers")(h, None)
        h = nn.Einsum((6, 2, 3), "btd,dhk->bthk", name="mix")(h).reshape(h.shape[:2] + (6,))
        shared = nn.Dense(6, name="shared")
        h = shared(jnp.tanh(shared(nn.LayerNorm(name="ln")(h))))  # one module, two calls
        return nn.remat(nn.Dense)(11, name="head")(h)


class _UserNnx(nnx.Module):
    """_UserNet without the scan (NNX transforms are refused by name, docs/NNX.md): two layers in a list."""

    def __init__(self, rngs):
        self.emb = nnx.Embed(11, 6, rngs=rngs)
        self.conv = nnx.Conv(6, 6, (3,), rngs=rngs)
        self.layers = nnx.List([nnx.Dict(split=nnx.LinearGeneral(6, (2, 3), rngs=rngs),
                                         join=nnx.LinearGeneral((2, 3), 6, axis=(-2, -1), rngs=rngs)) for _ in range(2)])
        self.mix = nnx.Einsum("btd,dhk->bthk", (6, 2, 3), (2, 3), rngs=rngs)
        self.ln = nnx.LayerNorm(6, rngs=rngs)
        self.shared = nnx.Linear(6, 6, rngs=rngs)
        self.head = nnx.Linear(6, 11, rngs=rngs)

    def __call__(self, ids):
        h = self.conv(self.emb(ids))
        for layer in self.layers:
            h = jnp.tanh(layer["join"](layer["split"](h)))
        h = self.mix(h).reshape(h.shape[:2] + (6,))
        return self.head(self.shared(jnp.tanh(self.shared(self.ln(h)))))


USER_MODEL, USER_IDS = _UserNet(), jax.random.randint(jax.random.key(8), (3, 7), 0, 11)
USER_PARAMS = USER_MODEL.init(jax.random.key(9), USER_IDS)
USER_GRAPH, USER_STATE = nnx.split(_UserNnx(nnx.Rngs(9)))
# each kernel's (input axes, output axes), written out, not read from jpeft's layouts (a site on the wrong
# axis of a DenseGeneral or Einsum kernel would follow a wrong layout here too)
_AXES = {"emb": ((0,), (1,)), "conv": ((0, 1), (2,)), "member": ((0,), (1,)), "split": ((0,), (1, 2)), "join": ((0, 1), (2,)),
         "mix": ((0,), (1, 2)), "shared": ((0,), (1,)), "head": ((0,), (1,))}
_LINEAR = ["conv", "split", "join", "mix", "shared", "head"]
USER_CASES = {
    "lora": jpeft.LoraConfig(r=2, alpha=4, target_modules=["emb"] + _LINEAR),
    "dora": jpeft.LoraConfig(r=2, alpha=4, target_modules=["emb"] + _LINEAR, use_dora=True),
    "ia3": IA3Config(target_modules=_LINEAR, feedforward_modules=["conv", "join", "shared"]),  # input side for these
    "vera": jpeft.VeraConfig(r=2, target_modules=_LINEAR),
    "loha": LoHaConfig(r=2, alpha=4, target_modules=_LINEAR),
    "lokr": LoKrConfig(r=1, alpha=2, target_modules=_LINEAR),
    "oft": OFTConfig(oft_block_size=2, target_modules=["split", "shared", "head"]),  # OFT: one input axis only
    "ln_tuning": LNTuningConfig(target_modules=["ln"]),
}


def _as_matrix(w, name):
    ins, outs = _AXES[name]
    return jnp.transpose(w, ins + outs).reshape(math.prod(w.shape[i] for i in ins), -1)


def _from_matrix(m, w, name):
    order = _AXES[name][0] + _AXES[name][1]
    return jnp.transpose(m.reshape([w.shape[i] for i in order]), np.argsort(order))


def _torch_update(d, w, name):
    """PEFT's ``[out, in]`` update (a convolution's ``in`` flattened channel-major, ``[out, in, k]``) as ``[in, out]``."""
    if name == "conv":
        k, c_in, c_out = w.shape
        return d.reshape(c_out, c_in, k).transpose(2, 1, 0).reshape(k * c_in, c_out)
    return d.T


def _oft_rotation(node):
    """Block-diagonal R from PEFT's Neumann series with five terms, I + 2Q + 2Q^2 + 2Q^3 + Q^4 (k = 2:
    one angle a block, Q = [[0, v], [-v, 0]])."""
    blocks = []
    for v in node.oft_R[:, 0]:
        q = jnp.array([[0.0, v], [-v, 0.0]])
        blocks.append(jnp.eye(2) + 2 * q + 2 * q @ q + 2 * q @ q @ q + q @ q @ q @ q)
    return jax.scipy.linalg.block_diag(*blocks)


def _formula(method, node, w, name):
    """The kernel ``w`` of module ``name`` with ``node``'s update folded in by the method's formula."""
    m = _as_matrix(w, name)
    if method in ("lora", "dora"):
        m = m + node.scale * node.lora_A @ node.lora_B
        if method == "dora":
            m = m * (node.magnitude / jnp.linalg.norm(m, axis=0))[None]
    elif method == "ia3":
        scale = jnp.tile(node.ia3_l, m.shape[0] // node.ia3_l.shape[0])  # per input channel, repeated over a conv window
        m = m * (scale[:, None] if node.feedforward else node.ia3_l[None])
    elif method == "vera":
        m = m + (node.vera_A * node.lambda_d[None]) @ (node.vera_B * node.lambda_b[None])
    elif method == "loha":
        m = m + _torch_update(node.scale * (node.hada_w1_a @ node.hada_w1_b) * (node.hada_w2_a @ node.hada_w2_b), w, name)
    elif method == "lokr":
        w1 = node.lokr_w1 if node.lokr_w1 is not None else node.lokr_w1_a @ node.lokr_w1_b
        w2 = node.lokr_w2 if node.lokr_w2 is not None else node.lokr_w2_a @ node.lokr_w2_b
        m = m + _torch_update(node.scale * jnp.kron(w1, w2), w, name)
    elif method == "oft":
        m = _oft_rotation(node) @ m
    return _from_matrix(m, w, name)


def _by_formula(method, params, adapter):
    """``params`` (nested dicts of arrays) with every site's update folded in by :func:`_formula`; a site
    in the layer scan holds one node a layer (``Stacked``), folded into its layer's slice of the kernel."""
    params = jax.tree.map(lambda x: x, params)  # a copy of the dicts
    for path, node in adapter.items():
        *parents, leaf = path.split("/")
        own = functools.reduce(lambda d, k: d[k if k in d else int(k)], parents, params)[leaf]  # NNX: list indices
        if method == "ln_tuning":
            own.update(node.params)
            continue
        pname = "embedding" if leaf == "emb" else "kernel"
        if isinstance(node, jpeft.scan.Stacked):
            own[pname] = jnp.stack([_formula(method, jax.tree.map(lambda a: a[i], node.inner), own[pname][i], leaf)
                                    for i in range(node.length)])
        else:
            own[pname] = _formula(method, node, own[pname], leaf)
    return params


@pytest.mark.parametrize("name", list(USER_CASES))
def test_user_linen_model_matches_each_methods_formula(name, tmp_path):
    cfg = USER_CASES[name]
    ad = perturb(jpeft.init(cfg, USER_PARAMS, jax.random.key(1), USER_MODEL, USER_IDS), jax.random.key(2))
    want_sites = {"ln"} if name == "ln_tuning" else {p if p in ("emb", "conv", "mix", "shared", "head") else f"layers/{p}"
                                                     for p in cfg.target_modules}
    assert set(ad) == want_sites
    y = jpeft.apply(USER_MODEL, USER_PARAMS, ad, USER_IDS)
    want = USER_MODEL.apply({"params": _by_formula(name, USER_PARAMS["params"], ad)}, USER_IDS)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)  # ~1e-6 seen
    assert float(jnp.abs(y - USER_MODEL.apply(USER_PARAMS, USER_IDS)).max()) > 0.1
    merged = jpeft.merge(USER_PARAMS, ad)
    np.testing.assert_allclose(USER_MODEL.apply(merged, USER_IDS), want, rtol=1e-5, atol=1e-5)
    if name not in ("dora", "ln_tuning"):  # the two that cannot be unmerged (NotInvertibleError)
        chex.assert_trees_all_close(jpeft.unmerge(merged, ad), USER_PARAMS, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jax.jit(functools.partial(jpeft.apply, USER_MODEL))(USER_PARAMS, ad, USER_IDS), y,
                               rtol=1e-5, atol=1e-5)

    def loss(a):
        logits = jpeft.apply(USER_MODEL, USER_PARAMS, a, USER_IDS)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], USER_IDS[:, 1:]))

    train, _ = jpeft.split_frozen(jax.grad(loss)(ad))
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(train))  # every trainable tensor gets a gradient
    jpeft.save_adapter(tmp_path / "a", cfg, ad, params=USER_PARAMS)
    _, loaded = jpeft.load_adapter(tmp_path / "a", USER_PARAMS, USER_MODEL, USER_IDS)
    chex.assert_trees_all_equal(loaded, ad)


@pytest.mark.parametrize("name", list(USER_CASES))
def test_user_nnx_model_matches_each_methods_formula(name):
    ad = perturb(jpeft.init(USER_CASES[name], USER_STATE, jax.random.key(1), USER_GRAPH, USER_IDS), jax.random.key(2))
    y = jpeft.apply(USER_GRAPH, USER_STATE, ad, USER_IDS)
    model = nnx.merge(USER_GRAPH, USER_STATE, copy=True)
    nnx.update(model, _by_formula(name, nnx.to_pure_dict(USER_STATE), ad))
    want = model(USER_IDS)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(y - nnx.merge(USER_GRAPH, USER_STATE)(USER_IDS)).max()) > 0.1
    np.testing.assert_allclose(nnx.merge(USER_GRAPH, jpeft.merge(USER_STATE, ad))(USER_IDS), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jpeft.merge(nnx.merge(USER_GRAPH, USER_STATE), ad)(USER_IDS), want, rtol=1e-5, atol=1e-5)


def test_user_linen_model_trains_with_fit():
    """jpeft.fit, the one loop, on the user's model (a scanned DenseGeneral pair, a conv, an einsum, a module
    called twice): the loss falls and the base params are the same arrays after."""
    cfg = USER_CASES["lora"]
    ad = jpeft.init(cfg, USER_PARAMS, jax.random.key(1), USER_MODEL, USER_IDS)

    def loss(params, adapter, batch, key=None):
        logits = jpeft.apply(USER_MODEL, params, adapter, batch)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], batch[:, 1:]))

    opt = optax.adam(3e-2)
    result = jpeft.fit(jpeft.make_train_step(loss, opt), USER_PARAMS, ad, opt.init(ad), [USER_IDS] * 20,
                       key=jax.random.key(3))
    assert result.history[-1]["loss"] < 0.8 * result.history[0]["loss"], [h["loss"] for h in result.history]
    chex.assert_trees_all_equal(USER_PARAMS, USER_MODEL.init(jax.random.key(9), USER_IDS))


class _TiedRead(nn.Module):
    """An autoencoder whose decoder reads the encoder's kernel itself (weight tying by reading the array,
    not by calling the module; GPT-2 ports that compute ``h @ self.wte.embedding.T`` do the same)."""

    @nn.compact
    def __call__(self, x):
        enc = nn.Dense(4, use_bias=False, name="enc")
        return jnp.tanh(enc(x)) @ enc.variables["params"]["kernel"].T


class _Gpt2Port(nn.Module):
    """A GPT-2 port's tie: logits from ``h @ self.wte.embedding.T`` (``tied=True``: ``self.wte.attend(h)``),
    its blocks in an ``nn.scan`` whose layer reads its ``fc`` kernel outside ``fc``'s call too
    (``read_in_scan=True``)."""

    tied: bool = False
    read_in_scan: bool = False

    def setup(self):
        self.wte = nn.Embed(11, 6)
        self.blocks = nn.scan(nn.remat(_Gpt2Block), variable_axes={"params": 0, jpeft.scan.COLLECTION: 0},
                              split_rngs={"params": True},
                              length=2)(self.read_in_scan)

    def __call__(self, ids):
        h, _ = self.blocks(self.wte(ids), None)
        return self.wte.attend(h) if self.tied else h @ self.wte.embedding.T


class _Gpt2Block(nn.Module):
    read: bool

    @nn.compact
    def __call__(self, h, _):
        fc = nn.Dense(6, name="fc")
        y = jnp.tanh(fc(h))
        return (y @ fc.variables["params"]["kernel"] if self.read else y), None


class _TiedReadNnx(nnx.Module):
    def __init__(self, rngs):
        self.enc = nnx.Linear(6, 4, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return jnp.tanh(self.enc(x)) @ self.enc.kernel[...].T


def test_a_kernel_read_outside_its_modules_call_is_refused_at_init(tmp_path):
    """A model that computes with a targeted module's kernel outside the module's call: jpeft.apply adapts the
    call only (the formula with the update on the encoder's call), while jpeft.merge folds the update into the
    stored kernel, which the decoder's read sees too (the merged model was 4.37 off on a tiny GPT-2 port, without a
    word). jpeft.init given the model sees the read in its trace (jpeft/_reads.py) and refuses the site by name,
    saying where; a site that does not fold into the kernel (a bottleneck adapter on the module's output) is
    made, and so is LoRA elsewhere in the model."""
    model, x = _TiedRead(), jax.random.normal(jax.random.key(0), (3, 6))
    params = model.init(jax.random.key(1), x)
    cfg = jpeft.LoraConfig(r=2, alpha=4, target_modules=["enc"])
    ad = perturb(jpeft.init(cfg, params, jax.random.key(2)), jax.random.key(3))  # from the params alone: not seen
    w, node = params["params"]["enc"]["kernel"], ad["enc"]
    want = jnp.tanh(x @ (w + node.scale * node.lora_A @ node.lora_B)) @ w.T
    np.testing.assert_allclose(jpeft.apply(model, params, ad, x), want, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(model.apply(jpeft.merge(params, ad), x) - want).max()) > 0.1  # why it is refused
    with pytest.raises(jpeft.errors.UnsupportedModuleError, match=r"'enc'.*outside the module's own call: "
                       r"dot_general at .*test_properties.py:\d+ \(_TiedRead.__call__\).*target_modules"):
        jpeft.init(cfg, params, jax.random.key(2), model, x)
    jpeft.save_adapter(tmp_path / "a", cfg, ad)  # loading it onto the traced model refuses it alike
    with pytest.raises(jpeft.errors.UnsupportedModuleError, match=r"'enc'.*outside the module's own call"):
        jpeft.load_adapter(tmp_path / "a", params, model, x)
    jpeft.hf.save_peft(tmp_path / "p", cfg, ad)
    with pytest.raises(jpeft.errors.UnsupportedModuleError, match=r"'enc'.*outside the module's own call"):
        jpeft.hf.load_peft(tmp_path / "p", params, model=model, example_args=(x,))
    chex.assert_trees_all_close(jpeft.hf.load_peft(tmp_path / "p", params)[1], ad)  # without the model: not seen
    out = jpeft.init(BottleneckConfig(target_modules=["enc"], reduction_factor=2), params, jax.random.key(2), model, x)
    assert set(out) == {"enc"}

    ids = jax.random.randint(jax.random.key(4), (2, 5), 0, 11)
    for port, target, where in ((_Gpt2Port(), "wte", r"_Gpt2Port.__call__"),
                                (_Gpt2Port(tied=True, read_in_scan=True), "fc", r"_Gpt2Block.__call__")):
        params, other = port.init(jax.random.key(5), ids), "fc" if target == "wte" else "wte"
        for cfg in (jpeft.LoraConfig(r=2, alpha=4, target_modules=[target]),
                    jpeft.LoraConfig(r=2, target_modules=[other], modules_to_save=[target])):
            with pytest.raises(jpeft.errors.UnsupportedModuleError, match=rf"{target}'.*outside the module's own "
                               rf"call.*{where}"):
                jpeft.init(cfg, params, jax.random.key(6), port, ids)
        assert set(jpeft.init(jpeft.LoraConfig(r=2, target_modules=[other]), params, jax.random.key(6), port, ids)) \
            == {other if other == "wte" else "blocks/fc"}


def test_a_tie_through_attend_and_a_scanned_remat_layer_are_not_refused():
    """No false positive: the same GPT-2 port tied through ``wte.attend`` (the embedding's own method) with its
    blocks in an nn.scan of nn.remat: LoRA on both ends (ensure_weight_tying) and on the scanned layer is made, and
    its merged model equals jpeft.apply, every adapter tensor random."""
    model, ids = _Gpt2Port(tied=True), jax.random.randint(jax.random.key(4), (2, 5), 0, 11)
    params = model.init(jax.random.key(5), ids)
    cfg = jpeft.LoraConfig(r=2, alpha=4, target_modules=["wte", "fc"], ensure_weight_tying=True)
    ad = perturb(jpeft.init(cfg, params, jax.random.key(6), model, ids), jax.random.key(7))
    y = jpeft.apply(model, params, ad, ids)
    assert float(jnp.abs(y - model.apply(params, ids)).max()) > 0.1
    np.testing.assert_allclose(model.apply(jpeft.merge(params, ad), ids), y, rtol=1e-5, atol=1e-5)


def test_an_nnx_kernel_read_outside_its_modules_call_is_refused_at_init():
    """NNX: ``self.enc.kernel[...]`` outside ``self.enc(...)``: jpeft.apply adapts the call only, jpeft.merge
    changes the read too; jpeft.init given the model refuses the site."""
    graph, state = nnx.split(_TiedReadNnx(nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(0), (3, 6))
    cfg = jpeft.LoraConfig(r=2, alpha=4, target_modules=["enc"])
    ad = perturb(jpeft.init(cfg, state, jax.random.key(2)), jax.random.key(3))
    w, node = state["enc"]["kernel"][...], ad["enc"]
    want = jnp.tanh(x @ (w + node.scale * node.lora_A @ node.lora_B)) @ w.T
    np.testing.assert_allclose(jpeft.apply(graph, state, ad, x), want, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(nnx.merge(graph, jpeft.merge(state, ad))(x) - want).max()) > 0.1
    with pytest.raises(jpeft.errors.UnsupportedModuleError, match=r"'enc'.*outside the module's own call.*"
                       r"_TiedReadNnx.__call__"):
        jpeft.init(cfg, state, jax.random.key(2), graph, x)


class _Ensemble(nn.Module):
    """Four members of one nn.Dense, their params stacked by nn.vmap; ``adapted=False``: the vmap slices the
    params only, not jpeft's collection."""

    adapted: bool = True

    @nn.compact
    def __call__(self, x):  # x: [members, batch, 6]
        axes = {"params": 0, jpeft.scan.COLLECTION: 0} if self.adapted else {"params": 0}
        members = nn.vmap(nn.Dense, variable_axes=axes, split_rngs={"params": True}, in_axes=0)
        return members(3, name="member")(x)


def test_an_ensembles_vmap_gets_one_site_a_member_and_names_the_collection_when_it_does_not_pass_it():
    x = jax.random.normal(jax.random.key(0), (4, 2, 6))
    model = _Ensemble()
    params = model.init(jax.random.key(1), x)
    ad = perturb(jpeft.init(jpeft.LoraConfig(r=2, alpha=4, target_modules=["member"]), params, jax.random.key(2),
                            model, x), jax.random.key(3))
    y = jpeft.apply(model, params, ad, x)
    np.testing.assert_allclose(y, model.apply({"params": _by_formula("lora", params["params"], ad)}, x), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(model.apply(jpeft.merge(params, ad), x), y, rtol=1e-5, atol=1e-5)
    with pytest.raises(jpeft.errors.LayoutError, match=r"nn.vmap.*variable_axes=\{'params': 0, 'jpeft_adapter': 0\}"):
        jpeft.apply(_Ensemble(adapted=False), params, ad, x)
