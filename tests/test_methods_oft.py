"""OFT against Hugging Face PEFT 0.21 (forward, merge, unmerge; every option jpeft supports),
through the PEFT format both ways on a tiny Mistral, on a layer-scanned Llama, and its refusals.

Every adapter tensor is random (``init_weights=False`` draws ``oft_R ~ N(0, 0.1^2)`` in both
libraries, plus a perturbation), so no block is the identity."""

import copy
import dataclasses
import functools
import json
import os
import sys
import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import _models_tiny as tiny  # noqa: E402

import jpeft  # noqa: E402
import jpeft.models  # noqa: E402
from jpeft import hf as H  # noqa: E402
from jpeft import scan  # noqa: E402
from jpeft.cli import _configs, main  # noqa: E402
from jpeft.methods import oft  # noqa: E402
from jpeft.methods.oft import OFTConfig  # noqa: E402

torch = __import__("torch")  # a test dependency: missing means a broken install, not a skip
peft = __import__("peft")  # a test dependency: missing means a broken install, not a skip
transformers = __import__("transformers")


class TorchNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(8, 12)
        self.v_proj = torch.nn.Linear(12, 5)

    def forward(self, x):
        return self.v_proj(torch.tanh(self.q_proj(x)))


class FlaxNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(5, name="v_proj")(jnp.tanh(nn.Dense(12, name="q_proj")(x)))


def _t(x):
    return jnp.asarray(x.detach().numpy())


# (PEFT / jpeft options): block size and count, both Cayley forms and several series lengths,
# a shared block, constrained OFT with a radius that clips some blocks and not others
OPTIONS = {
    "neumann5": dict(oft_block_size=4),
    "neumann3": dict(oft_block_size=4, num_cayley_neumann_terms=3),
    "neumann8": dict(oft_block_size=2, num_cayley_neumann_terms=8),
    "exact": dict(oft_block_size=4, use_cayley_neumann=False),
    "r=2": dict(r=2, oft_block_size=0),
    "block_share": dict(oft_block_size=4, block_share=True),
    "coft": dict(oft_block_size=4, coft=True, eps=0.5),
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_matches_peft_forward_merge_unmerge(name):
    opts = OPTIONS[name]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(TorchNet(), peft.OFTConfig(target_modules=["q_proj", "v_proj"], init_weights=False,
                                                            **opts)).eval()
    b = pm.base_model.model
    with torch.no_grad():  # move every block further from the identity
        for n, p in pm.named_parameters():
            if "oft_R" in n:
                p.add_(0.3 * torch.randn(p.shape))
    raw = {k: _t(getattr(b, k).oft_R["default"].weight) for k in ("q_proj", "v_proj")}  # before PEFT's coft write-back
    params = {"params": {k: {"kernel": _t(getattr(b, k).base_layer.weight).T, "bias": _t(getattr(b, k).base_layer.bias)}
                         for k in ("q_proj", "v_proj")}}
    x = np.random.RandomState(0).randn(3, 2, 8).astype(np.float32)
    cfg = OFTConfig(target_modules=["q_proj", "v_proj"], **opts)
    ad = jpeft.init(cfg, params, jax.random.key(0))
    stored = 1 if opts.get("block_share") else None
    assert {k: v.oft_R.shape for k, v in ad.items()} == {k: tuple(raw[k].shape) for k in raw}
    assert all(v.oft_R.shape[0] == (stored or v.blocks) for v in ad.values())
    np.testing.assert_array_equal(ad["q_proj"].oft_R, 0.0)  # the identity start
    ad = {k: dataclasses.replace(v, oft_R=raw[k]) for k, v in ad.items()}
    cot = np.random.RandomState(1).randn(3, 2, 5).astype(np.float32)
    out = pm(torch.tensor(x))
    (out * torch.tensor(cot)).sum().backward()  # PEFT's gradients w.r.t. oft_R (at the projected point for coft)
    ref = _t(out)
    base = FlaxNet().apply(params, jnp.asarray(x))
    assert float(jnp.abs(ref - base).max()) > 1e-2  # the rotation matters
    got = jpeft.apply(FlaxNet(), params, ad, jnp.asarray(x))
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
    grads = jax.grad(lambda a: jnp.sum(jpeft.apply(FlaxNet(), params, a, jnp.asarray(x)) * cot))(ad)
    for k in ("q_proj", "v_proj"):
        np.testing.assert_allclose(grads[k].oft_R, _t(getattr(b, k).oft_R["default"].weight.grad), atol=1e-5, rtol=1e-4)
    if opts.get("coft"):  # some blocks were clipped, some not (the projection has teeth both ways)
        q = oft.skew(raw["q_proj"], 4)
        norms = np.sqrt((np.asarray(q) ** 2).sum((-2, -1)))
        radius = 0.5 / np.sqrt(q.shape[0])
        assert (norms > radius).any()

    merged = jpeft.merge(params, ad)
    np.testing.assert_allclose(FlaxNet().apply(merged, jnp.asarray(x)), ref, atol=1e-5, rtol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.merge_adapter()
    for k in ("q_proj", "v_proj"):
        np.testing.assert_allclose(merged["params"][k]["kernel"], _t(getattr(b, k).base_layer.weight).T, atol=2e-6)
        np.testing.assert_array_equal(merged["params"][k]["bias"], params["params"][k]["bias"])
    back = jpeft.unmerge(merged, ad)
    chex.assert_trees_all_close(back, params, atol=1e-5)
    # the effective weights (L2-SP) of this multiplicative method: the merged kernel R @ W
    eff = ad["q_proj"].effective(params["params"]["q_proj"])
    np.testing.assert_allclose(eff["kernel"], merged["params"]["q_proj"]["kernel"], atol=1e-6)


def test_coft_training_steps_from_the_projected_point_as_peft_does():
    """PEFT writes the projection back into ``oft_R`` at each forward, so its optimizer steps
    from the projected value; jpeft's train step projects after each update (the node's
    ``after_update``): three SGD steps give PEFT's outputs, and the stored ``oft_R`` is PEFT's
    after its next forward."""
    import optax

    opts = dict(oft_block_size=4, coft=True, eps=1e-2)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(TorchNet(), peft.OFTConfig(target_modules=["q_proj", "v_proj"], init_weights=False,
                                                            **opts))
    b = pm.base_model.model
    raw = {k: _t(getattr(b, k).oft_R["default"].weight) for k in ("q_proj", "v_proj")}
    params = {"params": {k: {"kernel": _t(getattr(b, k).base_layer.weight).T, "bias": _t(getattr(b, k).base_layer.bias)}
                         for k in ("q_proj", "v_proj")}}
    x = np.random.RandomState(0).randn(3, 2, 8).astype(np.float32)
    cot = np.random.RandomState(1).randn(3, 2, 5).astype(np.float32)
    sgd = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        sgd.zero_grad()
        (pm(torch.tensor(x)) * torch.tensor(cot)).sum().backward()
        sgd.step()
    ref = _t(pm(torch.tensor(x)))  # this forward projects the stored oft_R once more
    stored = {k: _t(getattr(b, k).oft_R["default"].weight) for k in ("q_proj", "v_proj")}

    ad = jpeft.init(OFTConfig(target_modules=["q_proj", "v_proj"], **opts), params, jax.random.key(0))
    ad = {k: dataclasses.replace(v, oft_R=raw[k]) for k, v in ad.items()}

    def loss(p, a, batch, key):
        return jnp.sum(jpeft.apply(FlaxNet(), p, a, batch) * cot)

    step = jpeft.make_train_step(loss, optax.sgd(0.5), donate=False)
    state, trained, plain = optax.sgd(0.5).init(ad), ad, ad
    for i in range(3):
        trained, state, _ = step(params, trained, state, jnp.asarray(x), jax.random.key(i))
        g = jax.grad(lambda a: loss(params, a, jnp.asarray(x), None))(plain)  # no projection after the update
        plain = jax.tree.map(lambda w, d: w - 0.5 * d, plain, g)
    got = jpeft.apply(FlaxNet(), params, trained, jnp.asarray(x))
    np.testing.assert_allclose(got, ref, atol=2e-6, rtol=1e-5)
    for k in ("q_proj", "v_proj"):
        np.testing.assert_allclose(trained[k].oft_R, stored[k], atol=1e-6)
    effect = float(jnp.abs(got - FlaxNet().apply(params, jnp.asarray(x))).max())
    unprojected = float(jnp.abs(jpeft.apply(FlaxNet(), params, plain, jnp.asarray(x)) - got).max())
    # without the projection after each step the outputs miss PEFT's by ~100x the tolerance (3e-4 of an effect of 1e-2)
    assert unprojected > 1e-4 and effect > 5e-3, (unprojected, effect)


def test_cayley_blocks_are_orthogonal_exactly_and_nearly():
    v = 0.05 * jax.random.normal(jax.random.key(0), (3, oft.n_elements(5)))
    exact = oft.cayley(v, 5, False, 0)
    np.testing.assert_allclose(jnp.einsum("bij,bkj->bik", exact, exact), np.broadcast_to(np.eye(5), (3, 5, 5)), atol=1e-6)
    series = oft.cayley(v, 5, True, 12)
    # PEFT's series approximates the Cayley transform of -Q (R^T of the exact form)
    np.testing.assert_allclose(series, jnp.swapaxes(exact, -1, -2), atol=1e-5)
    assert oft.block_size_of(oft.n_elements(7)) == 7 and oft.block_size_of(4) == -1


# -- through the PEFT format, on a tiny Mistral -------------------------------------------------------

FAMILY = "mistral"


def _base():
    return jpeft.models.from_pretrained(tiny.hf_model(FAMILY)[1])


def _logits(model, params, adapter, ids, mask):
    return np.asarray(jpeft.apply(model, params, adapter, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))


def _randomize(adapter, seed):
    leaves, tdef = jax.tree.flatten(adapter)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tdef, [x + 0.3 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def test_jpeft_to_peft(tmp_path):
    hf_model, folder = tiny.hf_model(FAMILY)
    model, params = _base()
    cfg = OFTConfig(target_modules=["q_proj", "v_proj", "down_proj"], oft_block_size=8)
    ad = _randomize(jpeft.init(cfg, params, jax.random.key(0)), 1)
    H.save_peft(str(tmp_path), cfg, ad, base_model_name_or_path=folder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf_model), str(tmp_path)).eval()
    assert not [w for w in caught if "cayley" in str(w.message).lower()]  # the file says which series it uses
    ids, mask = tiny.batch(FAMILY, seed=3)
    ref = tiny.peft_logits(pm, ids, mask)
    assert np.abs(ref - tiny.peft_logits(hf_model, ids, mask)).max() > 1e-3
    tiny.assert_close_at_tokens(_logits(model, params, ad, ids, mask), ref, mask)


def test_peft_to_jpeft_and_scanned(tmp_path):
    hf_model, folder = tiny.hf_model(FAMILY)
    model, params = _base()
    torch.manual_seed(11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(hf_model), peft.OFTConfig(
            target_modules=["q_proj", "v_proj", "o_proj"], oft_block_size=4, coft=True, eps=0.3,
            num_cayley_neumann_terms=4, init_weights=False)).eval()
        pm.save_pretrained(str(tmp_path))
    ids, mask = tiny.batch(FAMILY, seed=3)
    ref = tiny.peft_logits(pm, ids, mask)
    assert np.abs(ref - tiny.peft_logits(hf_model, ids, mask)).max() > 1e-3
    cfg, ad = H.load_peft(str(tmp_path), params)
    assert sorted(cfg.target_modules) == ["o_proj", "q_proj", "v_proj"]  # PEFT writes a set: any order
    assert cfg.replace(target_modules=("o_proj",)) == OFTConfig(target_modules=["o_proj"], oft_block_size=4, coft=True, eps=0.3,
                            num_cayley_neumann_terms=4, init_weights=False)
    assert len(ad) == 6 and all(n.oft_R.shape == (8, 6) for n in ad.values())
    tiny.assert_close_at_tokens(_logits(model, params, ad, ids, mask), ref, mask)
    # merged weights serve the same logits
    tiny.assert_close_at_tokens(_logits(model, jpeft.merge(params, ad), {}, ids, mask), ref, mask)
    # the same file on the layer-scanned model: stacked sites, same logits, merge per layer
    smodel, sparams = jpeft.models.from_pretrained(folder, scan_layers=True)
    _, sad = H.load_peft(str(tmp_path), sparams)
    assert all(isinstance(n, scan.Stacked) and n.length == 2 for n in sad.values())
    tiny.assert_close_at_tokens(_logits(smodel, sparams, sad, ids, mask), ref, mask)
    tiny.assert_close_at_tokens(_logits(smodel, jpeft.merge(sparams, sad), {}, ids, mask), ref, mask)
    # and init on the scanned model (traced) makes the same structure as the loaded adapter
    init_sc = jpeft.init(cfg, sparams, jax.random.key(0), smodel, jnp.asarray(ids))
    assert jax.tree.structure(init_sc) == jax.tree.structure(sad)


@pytest.mark.parametrize("bias", ["oft_only", "all"])
def test_trained_base_biases_match_peft_both_ways(bias, tmp_path):
    """PEFT's OFTConfig(bias="oft_only") trains the base bias of every OFT-adapted module, "all" every bias of
    the model (Llama with attention and MLP biases: the unadapted k_proj, gate_proj, ... too). jpeft refused
    both ("does not implement"); now, with every tensor random (oft_R and the trained biases), PEFT's file loads
    with PEFT's logits, merged too, and jpeft's file loads in PEFT with jpeft's logits."""
    hf_model, folder = tiny.hf_model("llama2")
    model, params = jpeft.models.from_pretrained(folder)
    targets = ["q_proj", "v_proj", "down_proj"]
    torch.manual_seed(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(hf_model), peft.OFTConfig(
            target_modules=targets, oft_block_size=8, init_weights=False, bias=bias))
        tiny.perturb_trainable(pm, seed=3)
        pm.save_pretrained(str(tmp_path / "p"))
    ids, mask = tiny.batch("llama2", seed=3)
    ref = tiny.peft_logits(pm, ids, mask)
    cfg, ad = H.load_peft(str(tmp_path / "p"), params)
    assert cfg.bias == bias
    sites = {p: n for p, n in ad.items() if isinstance(n, oft.OFTWeights)}
    assert len(sites) == 6 and all(n.base_bias is not None for n in sites.values())
    copies = [p for p in ad if p not in sites]
    assert (copies == []) if bias == "oft_only" else ("model/layers_1/self_attn/k_proj" in copies)
    own = params["params"]["model"]["layers_0"]["self_attn"]["q_proj"]["bias"]
    assert float(jnp.abs(sites["model/layers_0/self_attn/q_proj"].base_bias - own).max()) > 0.1  # trained
    tiny.assert_close_at_tokens(_logits(model, params, ad, ids, mask), ref, mask)
    tiny.assert_close_at_tokens(_logits(model, jpeft.merge(params, ad), {}, ids, mask), ref, mask)
    with pytest.raises(jpeft.errors.NotInvertibleError, match="OFTConfig.bias"):
        jpeft.unmerge(jpeft.merge(params, ad), ad)
    # jpeft -> PEFT: an adapter of jpeft.init with every tensor random
    mine = _randomize(jpeft.init(cfg, params, jax.random.key(0)), 2)
    assert jax.tree.structure(mine) == jax.tree.structure(ad)
    H.save_peft(str(tmp_path / "j"), cfg, mine, base_model_name_or_path=folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(copy.deepcopy(hf_model), str(tmp_path / "j")).eval()
    ref2 = tiny.peft_logits(back, ids, mask)
    assert np.abs(ref2 - tiny.peft_logits(hf_model, ids, mask)).max() > 1e-2
    tiny.assert_close_at_tokens(_logits(model, params, mine, ids, mask), ref2, mask)
    if bias == "all":  # BERT's classifier bias would read as PEFT's SEQ_CLS head copy: refused by name
        _, bparams = jpeft.models.from_pretrained(tiny.hf_model("bert")[1])
        with pytest.raises(jpeft.ConfigError, match="task head"):
            jpeft.init(cfg.replace(target_modules=("query",)), bparams, jax.random.key(0))


def test_save_adapter_refuses_a_config_the_sites_were_not_made_with(tmp_path):
    """An adapter made with the exact Cayley transform (or 3 series terms, or coft) saved by
    jpeft.save_adapter under a config with other settings was written without a word, and
    load_adapter rebuilt the sites from that config: another rotation of the same oft_R (logits
    3.7 apart in a probe on the tiny Mistral). save_peft refused it by name; save_adapter (and a checkpoint)
    now does too, and the adapter saved with its own config loads to PEFT's logits."""
    hf_model, folder = tiny.hf_model(FAMILY)
    model, params = _base()
    cfg = OFTConfig(target_modules=["q_proj", "down_proj"], oft_block_size=8, use_cayley_neumann=False,
                    init_weights=False)
    ad = _randomize(jpeft.init(cfg, params, jax.random.key(0)), 3)
    for other, name in ((cfg.replace(use_cayley_neumann=True), "use_cayley_neumann"),
                        (cfg.replace(use_cayley_neumann=True, num_cayley_neumann_terms=3), "use_cayley_neumann"),
                        (cfg.replace(coft=True, eps=0.5), "coft"), (cfg.replace(block_share=True), "stored"),
                        (cfg.replace(oft_block_size=4), "block_size")):
        with pytest.raises(jpeft.ConfigError, match=f"config given to save_adapter .*'{name}'"):
            jpeft.save_adapter(str(tmp_path / "bad"), other, ad)
        assert not (tmp_path / "bad").exists()
    jpeft.save_adapter(str(tmp_path / "good"), cfg, ad)
    _, loaded = jpeft.load_adapter(str(tmp_path / "good"), params)
    H.save_peft(str(tmp_path / "peft"), cfg, ad, base_model_name_or_path=folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf_model), str(tmp_path / "peft")).eval()
    ids, mask = tiny.batch(FAMILY, seed=3)
    tiny.assert_close_at_tokens(_logits(model, params, loaded, ids, mask), tiny.peft_logits(pm, ids, mask), mask)
    # a layer-scanned adapter is checked layer by layer (its stacked node's per-layer settings)
    smodel, sparams = jpeft.models.from_pretrained(folder, scan_layers=True)
    sad = jpeft.init(cfg, sparams, jax.random.key(0), smodel, jnp.asarray(ids))
    assert all(isinstance(n, scan.Stacked) for n in sad.values())
    assert cfg.saved_config(sad) is cfg
    with pytest.raises(jpeft.ConfigError, match="use_cayley_neumann"):
        cfg.replace(use_cayley_neumann=True).saved_config(sad)


@functools.lru_cache(maxsize=None)
def _scan_pair():
    cfg = jpeft.models.LlamaConfig(vocab_size=24, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2,
                                   num_kv_heads=1)
    unrolled, scanned = jpeft.models.LlamaForCausalLM(cfg), jpeft.models.LlamaForCausalLM(cfg.replace(scan_layers=True))
    ids = jax.random.randint(jax.random.key(0), (2, 5), 0, 24)
    p0 = jax.jit(unrolled.init)(jax.random.key(0), ids)
    return unrolled, scanned, ids, p0, {"params": scan.stack_params(p0["params"])}


@pytest.mark.parametrize("method", ["oft", "ln_tuning"])
def test_scanned_gradients_equal_unrolled(method):
    unrolled, scanned, ids, p0, p1 = _scan_pair()
    config = (OFTConfig(oft_block_size=4, target_modules=["q_proj", "down_proj"], init_weights=False) if method == "oft"
              else jpeft.LNTuningConfig())
    a1 = jpeft.init(config, p1, jax.random.key(1), scanned, ids)
    leaves, tdef = jax.tree.flatten(a1)
    a1 = jax.tree.unflatten(tdef, [x + 0.1 * np.random.RandomState(i).randn(*x.shape).astype(np.float32)
                                   for i, x in enumerate(leaves)])
    a0 = scan.unstack_adapter(a1)
    assert any(isinstance(n, scan.Stacked) for n in a1.values())

    def loss(model, p):
        return lambda a: jnp.mean(jpeft.apply(model, p, a, ids) ** 2)

    if method == "oft":  # coft's projection after an update, layer by layer on the stacked node
        from jpeft.methods.base import after_update

        c1 = {k: dataclasses.replace(v, inner=dataclasses.replace(v.inner, coft=True, eps=0.2)) for k, v in a1.items()}
        c0 = {k: dataclasses.replace(v, coft=True, eps=0.2) for k, v in a0.items()}
        projected = after_update(c0)
        assert any(float(jnp.abs(projected[k].oft_R - c0[k].oft_R).max()) > 1e-3 for k in c0)
        chex.assert_trees_all_close(scan.unstack_adapter(after_update(c1)), projected, atol=1e-7)
    g1 = scan.unstack_adapter(jax.jit(jax.grad(loss(scanned, p1)))(a1))
    g0 = jax.jit(jax.grad(loss(unrolled, p0)))(a0)
    assert sorted(g1) == sorted(g0)
    assert all(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(g0))
    chex.assert_trees_all_close({k: g1[k] for k in g0}, g0, atol=1e-8, rtol=1e-4)


def test_module_dropout_replaces_blocks_by_identity_only_in_training():
    model = FlaxNet()
    x = jnp.ones((2, 8))
    params = model.init(jax.random.key(0), x)
    cfg = OFTConfig(target_modules=["q_proj"], oft_block_size=2, module_dropout=0.5, init_weights=False)
    ad = jpeft.init(cfg, params, jax.random.key(1))
    r = ad["q_proj"].rotation()
    dropped = oft.block_dropout(r, 0.5, jax.random.key(3))
    is_eye = [bool(jnp.allclose(b, jnp.eye(2))) for b in dropped]
    assert sum(is_eye) == 2 and not any(bool(jnp.allclose(b, jnp.eye(2))) for b in r)  # int(0.5 * 4) blocks
    eval_out = jpeft.apply(model, params, ad, x)  # no dropout key: no dropout
    np.testing.assert_array_equal(eval_out, jpeft.apply(model, params, ad, x, rngs={}))
    train_out = jpeft.apply(model, params, ad, x, rngs={"dropout": jax.random.key(3)})
    assert float(jnp.abs(train_out - eval_out).max()) > 1e-4


def test_module_dropout_acts_on_conv_sites_too_where_peft_applies_it_nowhere():
    """The docs said PEFT 0.21's Linear forward never applies OFT's module_dropout, read as Linear-only:
    PEFT 0.21 and 0.22 build the dropout layer but neither their Linear nor their Conv2d forward calls
    it (a training-mode forward gives the eval outputs). jpeft applies it on every site, as PEFT
    documents it: a conv site drops blocks in training as a Dense site does (one rule for both), and
    gives the eval outputs without a dropout key."""
    conv = nn.Conv(4, (3, 3), padding="VALID")
    img = jax.random.normal(jax.random.key(0), (1, 5, 5, 8))
    params = conv.init(jax.random.key(1), img)
    cfg = OFTConfig(target_modules=".*", oft_block_size=2, module_dropout=0.5, init_weights=False)
    ad = jpeft.init(cfg, params, jax.random.key(2), conv, img)
    ad = {k: dataclasses.replace(n, oft_R=0.3 * jax.random.normal(jax.random.key(3), n.oft_R.shape)) for k, n in ad.items()}
    eval_out = jpeft.apply(conv, params, ad, img)
    assert float(jnp.abs(eval_out - conv.apply(params, img)).max()) > 1e-2
    train_out = jpeft.apply(conv, params, ad, img, rngs={"dropout": jax.random.key(4)})
    assert float(jnp.abs(train_out - eval_out).max()) > 1e-3

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.conv = torch.nn.Linear(8, 8), torch.nn.Conv2d(8, 4, 3)

        def forward(self, x, im):
            return self.lin(x), self.conv(im)

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(Net(), peft.OFTConfig(target_modules=["lin", "conv"], oft_block_size=2,
                                                       module_dropout=0.5, init_weights=False))
    args = torch.randn(2, 8), torch.tensor(np.asarray(img).transpose(0, 3, 1, 2))
    with torch.no_grad():
        pm.eval()
        ref = pm(*args)
        with pm.disable_adapter():
            assert all(float((a - b).abs().max()) > 1e-2 for a, b in zip(ref, pm(*args)))  # the adapter acts
        pm.train()
        for seed in range(3):
            torch.manual_seed(seed)
            for a, b in zip(pm(*args), ref):
                torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_refusals(tmp_path):
    for terms in (0, 1):  # the series' first term only: an identity whatever oft_R holds (silently, in PEFT)
        with pytest.raises(jpeft.ConfigError, match=f"num_cayley_neumann_terms={terms} .*the identity"):
            jpeft.OFTConfig(oft_block_size=4, target_modules=["q"], num_cayley_neumann_terms=terms)
    jpeft.OFTConfig(oft_block_size=4, target_modules=["q"], num_cayley_neumann_terms=1, use_cayley_neumann=False)
    with pytest.raises(jpeft.ConfigError, match="exactly one of r"):
        OFTConfig(r=4, oft_block_size=8)
    with pytest.raises(jpeft.ConfigError, match="bias must be 'none', 'oft_only' or 'all'"):
        OFTConfig.from_dict({"peft_type": "OFT", "bias": "lora_only", "oft_block_size": 4})
    model = FlaxNet()
    params = model.init(jax.random.key(0), jnp.ones((1, 8)))
    with pytest.raises(jpeft.ConfigError, match="does not divide the 12 input features.*oft_block_size=4"):
        jpeft.init(OFTConfig(target_modules=["v_proj"], oft_block_size=5), params, jax.random.key(0))
    emb = nn.Embed(10, 8)
    eparams = emb.init(jax.random.key(0), jnp.array([1]))
    with pytest.raises(jpeft.errors.UnsupportedModuleError, match="nn.Dense"):
        jpeft.init(OFTConfig(target_modules=".*", oft_block_size=4), eparams, jax.random.key(0))
    # a PEFT < 0.14 OFT file (no oft_block_size) is refused by name
    hf_model, folder = tiny.hf_model(FAMILY)
    _, mparams = _base()
    cfg = OFTConfig(target_modules=["q_proj"], oft_block_size=8)
    H.save_peft(str(tmp_path), cfg, jpeft.init(cfg, mparams, jax.random.key(0)))
    d = json.loads((tmp_path / "adapter_config.json").read_text())
    del d["oft_block_size"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(d))
    with pytest.raises(jpeft.errors.UnsupportedAdapterError, match="PEFT < 0.14"):
        H.load_peft(str(tmp_path), mparams)
    d["oft_block_size"], d["peft_version"] = 8, "0.17.1"  # the Cayley-Neumann series before PEFT 0.18
    (tmp_path / "adapter_config.json").write_text(json.dumps(d))
    with pytest.raises(jpeft.errors.UnsupportedAdapterError, match="PEFT 0.18 changed that series"):
        H.load_peft(str(tmp_path), mparams)
    # GPT-2's Conv1D sites: PEFT's OFT cannot build them, so nothing is written
    _, gparams = jpeft.models.from_pretrained(tiny.hf_model("gpt2")[1])
    gcfg = OFTConfig(target_modules=["c_attn"], oft_block_size=8)
    with pytest.raises(jpeft.errors.UnsupportedAdapterError, match="Conv1D"):
        H.save_peft(str(tmp_path / "gpt2"), gcfg, jpeft.init(gcfg, gparams, jax.random.key(0)))
    assert not (tmp_path / "gpt2" / "adapter_config.json").exists()


def test_peft_oft_on_an_embedding_is_refused_by_name(tmp_path):
    """PEFT 0.21's OFT also wraps nn.Embedding (``oft_embedding_R``); jpeft's adapts Dense only, so
    the file is refused as such, not as a base mismatch."""
    hf_model, _ = tiny.hf_model(FAMILY)
    _, mparams = _base()
    pm = peft.get_peft_model(copy.deepcopy(hf_model), peft.OFTConfig(r=0, oft_block_size=8,
                                                                      target_modules=["embed_tokens", "q_proj"]))
    pm.save_pretrained(str(tmp_path))
    with pytest.raises(jpeft.errors.UnsupportedAdapterError, match="adapts embedding layers"):
        H.load_peft(str(tmp_path), mparams)


def test_info_llama2_7b_matches_peft_counts(capsys):
    """``jpeft info`` with PEFT's default targets counts what PEFT's own
    ``get_nb_trainable_parameters`` counts for OFTConfig() and LNTuningConfig() on Llama-2-7B
    (built by transformers on the meta device: nothing allocated)."""
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in _configs.PUBLISHED["llama-2-7b"].items()
                            if k not in ("model_type", "architectures")})
    for method, pcfg in (("oft", peft.OFTConfig(task_type="CAUSAL_LM")), ("ln_tuning", peft.LNTuningConfig(task_type="CAUSAL_LM"))):
        assert main(["info", "llama-2-7b", "--method", method, "--json"]) == 0
        got = json.loads(capsys.readouterr().out)
        with torch.device("meta"):
            ref = transformers.LlamaForCausalLM(hf_cfg)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainable, total = peft.get_peft_model(ref, pcfg).get_nb_trainable_parameters()
        assert got["trainable_params"] == trainable == {"oft": 4_063_232, "ln_tuning": 266_240}[method]
        # PEFT keeps LN tuning's original norms beside the copies and counts both, as jpeft now does
        assert got["total_params"] == total


def test_dense_general_contracting_the_last_axis_is_adapted_and_another_axis_refused():
    """OFT rotates the input's last axis: DenseGeneral(axis=2) on a 3-D input contracts it (it
    was refused because the check compared the axis with -1 literally) and equals the merged
    kernel; axis=1 is refused by name."""
    x = jax.random.normal(jax.random.key(1), (2, 3, 8))
    for axis, ok in ((2, True), (-1, True), ((2,), True), (1, False)):
        model = nn.DenseGeneral(6, axis=axis)
        xin = x if axis != 1 else jnp.swapaxes(x, 1, 2)
        params = model.init(jax.random.key(0), xin)
        cfg = OFTConfig(target_modules=".*", oft_block_size=4)
        ad = jpeft.init(cfg, params, jax.random.key(2))
        ad = jax.tree.map(lambda a: jax.random.normal(jax.random.key(3), a.shape, a.dtype) * 0.3, ad)
        if ok:
            got = jpeft.apply(model, params, ad, xin)
            want = model.apply(jpeft.merge(params, ad), xin)
            np.testing.assert_allclose(got, want, atol=2e-5)
        else:
            with pytest.raises(jpeft.errors.UnsupportedModuleError, match="contracts axis 1 of a 3-D input"):
                jpeft.apply(model, params, ad, xin)
            # given the model, jpeft.init refuses it before any adapter exists (it was refused at apply only)
            with pytest.raises(jpeft.errors.UnsupportedModuleError, match="contracts axis 1 of a 3-D input"):
                jpeft.init(cfg, params, jax.random.key(2), model, xin)
        if ok:  # and the traced init adapts it as the untraced one does
            ad2 = jpeft.init(cfg, params, jax.random.key(2), model, xin)
            ad2 = jax.tree.map(lambda a: jax.random.normal(jax.random.key(3), a.shape, a.dtype) * 0.3, ad2)
            np.testing.assert_allclose(jpeft.apply(model, params, ad2, xin), want, atol=2e-5)
