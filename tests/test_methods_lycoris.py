"""LoHa and LoKr against Hugging Face PEFT 0.21: the same base weights and every adapter tensor
random (``init_weights=False``), outputs and merged weights on Linear, Conv2d (3x3 and 1x1) and
Conv1d layers, and a tiny Llama through the PEFT format in both directions (logits to 1e-4).
The shared properties (identity at init, merge, save/load, jit/grad/vmap) are in
tests/test_properties.py."""

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
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import _models_tiny as tiny  # noqa: E402

import jpeft  # noqa: E402
import jpeft.models  # noqa: E402
from jpeft import scan  # noqa: E402
from jpeft.errors import ConfigError, UnsupportedAdapterError, UnsupportedModuleError  # noqa: E402
from jpeft.methods import loha, lokr  # noqa: E402
from jpeft.methods.loha import LoHaConfig  # noqa: E402
from jpeft.methods.lokr import LoKrConfig  # noqa: E402

torch = __import__("torch")  # a test dependency: missing means a broken install, not a skip
peft = __import__("peft")  # a test dependency: missing means a broken install, not a skip

TARGETS = ["q_proj", "v_proj", "conv", "conv1x1", "conv1d"]


class TorchNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(16, 12)
        self.v_proj = torch.nn.Linear(12, 8)
        self.conv = torch.nn.Conv2d(4, 6, 3, padding=1)
        self.conv1x1 = torch.nn.Conv2d(6, 8, 1)
        self.conv1d = torch.nn.Conv1d(4, 6, 3)

    def forward(self, x, img, seq):
        return self.v_proj(torch.relu(self.q_proj(x))), self.conv1x1(self.conv(img)), self.conv1d(seq)


class FlaxNet(nn.Module):
    @nn.compact
    def __call__(self, x, img, seq):
        h = nn.Conv(6, (3, 3), padding=1, name="conv")(img)
        y = nn.Dense(8, name="v_proj")(nn.relu(nn.Dense(12, name="q_proj")(x)))
        return y, nn.Conv(8, (1, 1), name="conv1x1")(h), nn.Conv(6, (3,), padding="VALID", name="conv1d")(seq)


# (name, PEFT config class, jpeft config class, options in PEFT's names)
CASES = [
    ("loha", peft.LoHaConfig, LoHaConfig, dict(r=2, alpha=3, rank_pattern={"v_proj": 3}, alpha_pattern={"conv": 5})),
    ("loha-cp", peft.LoHaConfig, LoHaConfig, dict(r=2, alpha=4, use_effective_conv2d=True)),
    ("lokr-both", peft.LoKrConfig, LoKrConfig, dict(r=1, alpha=3, decompose_both=True)),
    # PEFT fails on LoKr's CP form for Conv1d (jpeft refuses it, test_config_refusals): rank 4 keeps conv1d's w2 full
    ("lokr-cp", peft.LoKrConfig, LoKrConfig, dict(r=1, alpha=2, use_effective_conv2d=True, decompose_factor=2,
                                                  rank_pattern={"conv1d": 4})),
    ("lokr-full", peft.LoKrConfig, LoKrConfig, dict(r=4, alpha=2, rank_pattern={"conv1d": 1})),
]


def _t(x):
    return jnp.asarray(x.detach().numpy())


def _inputs():
    rs = np.random.RandomState(0)
    x, img, seq = rs.randn(3, 16), rs.randn(2, 4, 5, 5), rs.randn(2, 4, 9)
    return [a.astype(np.float32) for a in (x, img, seq)]


def _jax_inputs(x, img, seq):
    return jnp.asarray(x), jnp.asarray(img).transpose(0, 2, 3, 1), jnp.asarray(seq).transpose(0, 2, 1)


def _flax_params(b):
    lin = lambda m: {"kernel": _t(m.weight).T, "bias": _t(m.bias)}
    conv = lambda m: {"kernel": _t(m.weight).transpose(tuple(range(2, m.weight.ndim)) + (1, 0)), "bias": _t(m.bias)}
    return {"params": {n: (lin if n.endswith("proj") else conv)(getattr(b, n).get_base_layer()
                                                                   if hasattr(getattr(b, n), "base_layer") else getattr(b, n))
                       for n in TARGETS}}


def _from_peft(ad, b, names):
    """jpeft's nodes with PEFT's tensors; the tensor names and shapes must be PEFT's exactly."""
    out = {}
    for path, node in ad.items():
        layer = getattr(b, path)
        theirs = {n: _t(getattr(layer, n)["default"]) for n in names if "default" in getattr(layer, n)}
        ours = {n: getattr(node, n) for n in names if getattr(node, n) is not None}
        assert {n: v.shape for n, v in ours.items()} == {n: v.shape for n, v in theirs.items()}, path
        out[path] = dataclasses.replace(node, **theirs)
    return out


def _autograd_weight_cp(t1, w1a, w1b, t2, w2a, w2b, scale):
    """PEFT's LoHa CP forward (``make_weight_cp``) differentiated by autograd: PEFT 0.21's
    hand-written ``HadaWeightCP.backward`` returns wrong gradients for ``hada_w1_a`` and
    ``hada_w2_a`` (it contracts each with the other factor's partial product), so under PEFT 0.21
    the reference gradient is autograd of PEFT's own forward formula; PEFT 0.22 fixed that
    backward, and its own gradients are the reference."""
    one = torch.einsum("i j k l, j r, i p -> p r k l", t1, w1b, w1a)
    return one * torch.einsum("i j k l, j r, i p -> p r k l", t2, w2b, w2a) * scale


@pytest.mark.parametrize("name,pcls,jcls,opts", CASES, ids=[c[0] for c in CASES])
def test_matches_peft_forward_gradients_and_merge_on_linear_and_conv(name, pcls, jcls, opts, monkeypatch):
    if not tiny.peft_at_least(0, 22):
        monkeypatch.setattr(peft.tuners.loha.layer, "make_weight_cp", _autograd_weight_cp)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(TorchNet(), pcls(target_modules=TARGETS, init_weights=False, **opts)).eval()
    b = pm.base_model.model
    params = _flax_params(b)
    x, img, seq = _inputs()
    jx = _jax_inputs(x, img, seq)
    model = FlaxNet()
    cfg = jcls(target_modules=TARGETS, init_weights=False, **opts)
    ad = jax.eval_shape(lambda: jpeft.init(cfg, params, jax.random.key(0), model, *jx))  # shapes; values: PEFT's
    names = loha.TENSORS if jcls is LoHaConfig else lokr.TENSORS
    ad = _from_peft(ad, b, names)
    touts = pm(torch.tensor(x), torch.tensor(img), torch.tensor(seq))
    sum(o.pow(2).sum() for o in touts).backward()  # PEFT's gradients (its own HadaWeight backward for LoHa)
    ref = [_t(touts[0]), _t(touts[1]).transpose(0, 2, 3, 1), _t(touts[2]).transpose(0, 2, 1)]
    def loss(a):
        outs = jpeft.apply(model, params, a, *jx)
        return sum(jnp.sum(o ** 2) for o in outs), outs

    grads, out = jax.jit(jax.grad(loss, has_aux=True))(ad)  # one compile: outputs and gradients
    for got, want in zip(out, ref):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert all(float(jnp.abs(o - r).max()) > 1e-3 for o, r in zip(out, model.apply(params, *jx)))  # the adapter matters
    for path, node in grads.items():
        for n in names:
            if getattr(node, n) is not None:
                want = _t(getattr(getattr(b, path), n)["default"].grad)
                np.testing.assert_allclose(getattr(node, n), want, rtol=1e-3, atol=1e-4 * float(jnp.abs(want).max()))
    merged, back = jax.jit(lambda p, a: (jpeft.merge(p, a), jpeft.unmerge(jpeft.merge(p, a), a)))(params, ad)
    merged = merged["params"]
    un = pm.merge_and_unload()
    for n in TARGETS:
        w = _t(getattr(un, n).weight)
        want = w.T if n.endswith("proj") else w.transpose(tuple(range(2, w.ndim)) + (1, 0))
        np.testing.assert_allclose(merged[n]["kernel"], want, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(back, params, atol=1e-5)


# -- the PEFT format on a tiny Llama, both ways ------------------------------------------------------

FAMILY = "llama2"  # untied, attention and MLP biases
LLAMA = {  # method: (PEFT config, jpeft config, options, tiny family: llama3 is tied with grouped-query attention)
    "loha": (peft.LoHaConfig, LoHaConfig, "llama2", dict(r=2, alpha=3, target_modules=["q_proj", "v_proj", "down_proj"],
                                                rank_pattern={"down_proj": 3}, alpha_pattern={"v_proj": 5})),
    "lokr": (peft.LoKrConfig, LoKrConfig, "llama3", dict(r=2, alpha=3, target_modules="all-linear", decompose_both=True,
                                                decompose_factor=4, rank_pattern={"o_proj": 8})),
}


def _llama_logits_torch(pm, ids, mask):
    with torch.no_grad():
        return pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                  position_ids=torch.tensor(tiny.positions(mask))).logits.float().numpy()


def _random_like(adapter, seed):
    """Every tensor random, N(0, 0.3^2) drawn with numpy (no compile per shape); the structure
    (sites, tensor names and shapes) is the adapter's."""
    rs = np.random.RandomState(seed)
    return jax.tree.map(lambda x: jnp.asarray(0.3 * rs.randn(*x.shape), jnp.float32), adapter)


def _llama_case(family):
    """The tiny transformers model of ``family``, its folder, jpeft params, a padded batch (ids,
    mask, the real positions) and a jitted ``run(params, adapter)`` of jpeft's logits on it."""
    hf_model, folder = tiny.hf_model(family)
    model, params = jpeft.models.from_pretrained(folder)
    ids, mask = tiny.batch(family, seed=3)
    run = jax.jit(lambda p, a: jpeft.apply(model, p, a, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    return hf_model, folder, params, ids, mask, mask.astype(bool), run


@pytest.mark.parametrize("method", sorted(LLAMA))
def test_peft_format_both_ways_on_llama(method, tmp_path):
    pcls, jcls, family, opts = LLAMA[method]
    hf_model, folder, params, ids, mask, sel, run = _llama_case(family)
    jlogits = lambda p, a: np.asarray(run(p, a))  # one compile for both directions (same adapter structure)

    # jpeft -> peft: every tensor random (init_weights=False, then moved)
    cfg = jcls.from_dict(dict(opts, init_weights=False))
    ad = _random_like(jax.eval_shape(lambda: jpeft.init(cfg, params, jax.random.key(0))), 1)
    jpeft.hf.save_peft(str(tmp_path / "j"), cfg, ad, base_model_name_or_path=folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf_model), str(tmp_path / "j")).eval()
    ref = _llama_logits_torch(pm, ids, mask)
    assert np.abs(ref - _llama_logits_torch(hf_model, ids, mask))[sel].max() > 1e-3  # the adapter matters
    np.testing.assert_allclose(jlogits(params, ad)[sel], ref[sel], atol=1e-4, rtol=0)

    # peft -> jpeft
    torch.manual_seed(11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(hf_model), pcls(init_weights=False, **opts)).eval()
        pm.save_pretrained(str(tmp_path / "p"))
    ref = _llama_logits_torch(pm, ids, mask)
    config, loaded = jpeft.hf.load_peft(str(tmp_path / "p"), params)
    assert isinstance(config, jcls) and config.r == 2 and config.init_weights is False
    assert sorted(loaded) == sorted(ad)  # the same sites, and (below) the same tensor shapes as jpeft.init makes
    chex.assert_trees_all_equal_shapes_and_dtypes(loaded, ad)
    np.testing.assert_allclose(jlogits(params, loaded)[sel], ref[sel], atol=1e-4, rtol=0)
    # the trainable count is PEFT's own
    n_peft = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert jpeft.summary(params, loaded, print_fn=None)["trainable"] == n_peft


@pytest.mark.parametrize("method", sorted(LLAMA))
def test_save_adapter_keeps_each_sites_scale_as_save_peft_does(method, tmp_path):
    """A LoHa / LoKr adapter made with alpha=3 (and rank/alpha patterns) but saved with
    jpeft.save_adapter under its config without them (alpha 8, no patterns: a config rebuilt by
    hand) came back from load_adapter with alpha / r of that config, the update silently rescaled
    (logits 1.65 apart in a probe on the tiny Mistral), while save_peft of the same adapter and config writes each
    site's own alpha. The recorded config now gives every site its own scale, as PEFT reads it."""
    pcls, jcls, family, opts = LLAMA[method]
    hf_model, folder, params, ids, mask, sel, run = _llama_case(family)
    cfg = jcls.from_dict(dict(opts, init_weights=False))
    ad = _random_like(jax.eval_shape(lambda: jpeft.init(cfg, params, jax.random.key(0))), 2)
    other = cfg.replace(alpha=8, alpha_pattern={})  # the same tensors (ranks), another scale
    jpeft.save_adapter(str(tmp_path / "j"), other, ad)
    loaded_cfg, loaded = jpeft.load_adapter(str(tmp_path / "j"), params)
    chex.assert_trees_all_equal(loaded, ad)  # the scales are static fields: the sites as they were made
    want = np.asarray(run(params, ad))
    np.testing.assert_allclose(np.asarray(run(params, loaded))[sel], want[sel], atol=1e-5, rtol=0)
    assert loaded_cfg.saved_config(loaded) == loaded_cfg  # saved again: recorded as it is
    assert jcls.from_dict(dict(opts, init_weights=False)).saved_config(ad) == cfg  # a matching config is kept
    # the same adapter and config through the PEFT format: PEFT computes the same logits
    jpeft.hf.save_peft(str(tmp_path / "p"), other, ad, base_model_name_or_path=folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf_model), str(tmp_path / "p")).eval()
    np.testing.assert_allclose(want[sel], _llama_logits_torch(pm, ids, mask)[sel], atol=1e-4, rtol=0)


def test_peft_format_refusals(tmp_path):
    _, folder = tiny.hf_model(FAMILY)
    model, params = jpeft.models.from_pretrained(folder)
    ad = jpeft.init(LoHaConfig(), params, jax.random.key(0))
    jpeft.hf.save_peft(str(tmp_path), LoHaConfig(), ad)

    d = json.loads((tmp_path / "adapter_config.json").read_text())
    # a PEFT option jpeft does not implement is refused by name, never dropped
    (tmp_path / "adapter_config.json").write_text(json.dumps(dict(d, layers_to_transform=[0])))
    with pytest.raises(jpeft.LoadError, match="layers_to_transform"):
        jpeft.hf.load_peft(str(tmp_path), params)
    # a LoKr config written over LoHa tensors: the sites' tensors do not match what the config builds
    (tmp_path / "adapter_config.json").write_text(json.dumps(dict(d, peft_type="LOKR")))
    with pytest.raises(jpeft.errors.BaseMismatchError, match="no matching module"):
        jpeft.hf.load_peft(str(tmp_path), params)
    # wrong rank in the config: same tensor names, other shapes
    (tmp_path / "adapter_config.json").write_text(json.dumps(dict(d, r=3)))
    with pytest.raises(jpeft.LoadError, match="r=3"):
        jpeft.hf.load_peft(str(tmp_path), params)
    # GPT-2's Conv1D layers: PEFT's LoHa/LoKr have no layer for them
    _, gfolder = tiny.hf_model("gpt2")
    _, gparams = jpeft.models.from_pretrained(gfolder)
    gad = jpeft.init(LoKrConfig(target_modules=["c_attn"]), gparams, jax.random.key(0))
    with pytest.raises(UnsupportedAdapterError, match="Conv1D"):
        jpeft.hf.save_peft(str(tmp_path / "g"), LoKrConfig(target_modules=["c_attn"]), gad)


def test_llama2_7b_budget_is_peft_count():
    """The budget table's LoHa and LoKr rows (python -m jpeft.budget) equal the trainable
    count PEFT itself reports for the same configs on a Llama-2-7B built on the meta device."""
    import transformers

    from jpeft import budget
    from jpeft.models.published import PUBLISHED

    abstract = budget.abstract_model(budget.LlamaConfig_7b())
    rows = {name: (settings, make()) for name, settings, make in budget.methods("llama") if name in ("LoHa", "LoKr")}
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in PUBLISHED["llama-2-7b"].items()
                                         if k not in ("architectures", "model_type")})
    for name, (settings, cfg) in rows.items():
        assert settings == "r=8, alpha=8, q_proj+v_proj"
        ours = budget.budget(None, cfg, abstract=abstract, trace=False)["trainable"]
        pcls = peft.LoHaConfig if name == "LoHa" else peft.LoKrConfig
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = peft.get_peft_model(transformers.LlamaForCausalLM(hf_cfg),
                                     pcls(r=cfg.r, alpha=cfg.alpha, target_modules=list(cfg.target_modules)))
        assert ours == sum(p.numel() for p in pm.parameters() if p.requires_grad), name
    assert budget.budget(None, rows["LoHa"][1], abstract=abstract, trace=False)["trainable"] == 8_388_608


# -- what PEFT does not have, and refusals -----------------------------------------------------------

def test_config_refusals():
    with pytest.raises(ConfigError, match="layers_to_transform"):
        LoHaConfig.from_dict({"peft_type": "LOHA", "layers_to_transform": [0]})
    with pytest.raises(ConfigError, match="exclude_modules"):
        LoKrConfig.from_dict({"peft_type": "LOKR", "exclude_modules": ["q_proj"]})
    with pytest.raises(ConfigError, match="modules_to_save"):
        LoKrConfig.from_dict({"peft_type": "LOKR", "modules_to_save": ["lm_head"]})
    with pytest.raises(ConfigError, match="init_weights"):
        LoHaConfig(init_weights="lycoris")  # LoKr only
    assert LoKrConfig(init_weights="lycoris").init_weights == "lycoris"
    with pytest.raises(ConfigError, match="r must be"):
        LoKrConfig(r=0)
    with pytest.raises(ConfigError, match="rank_dropout"):
        LoHaConfig(rank_dropout=1.0)
    with pytest.raises(ConfigError, match="decompose_factor"):
        LoKrConfig(decompose_factor=0)
    with pytest.raises(ConfigError, match="rank_pattern"):
        LoHaConfig(rank_pattern={"q_proj": 0})
    conv1d = nn.Conv(4, (3,))
    p = conv1d.init(jax.random.key(0), jnp.ones((1, 5, 6)))
    with pytest.raises(UnsupportedModuleError, match="1-D convolution"):
        jpeft.init(LoKrConfig(r=1, target_modules=".*", use_effective_conv2d=True), p, jax.random.key(0), conv1d,
                   jnp.ones((1, 5, 6)))
    emb = nn.Embed(7, 4)
    p = emb.init(jax.random.key(0), jnp.array([1]))
    with pytest.raises(UnsupportedModuleError, match="embedding"):
        jpeft.init(LoHaConfig(target_modules=".*"), p, jax.random.key(0))


def test_identity_inits_and_kaiming_bounds():
    lay = jpeft.methods.base.Layout("dense", (16, 12), (0,), (1,))
    for cfg, zero in [(LoHaConfig(r=2), "hada_w2_b"), (LoKrConfig(r=1), "lokr_w1"),
                      (LoKrConfig(r=1, init_weights="lycoris"), "lokr_w2_b"),
                      (LoKrConfig(r=1, decompose_both=True), "lokr_w1_a")]:
        node = (loha if isinstance(cfg, LoHaConfig) else lokr).make_node(cfg, lay, cfg.r, cfg.alpha, jax.random.key(0))
        assert float(jnp.abs(getattr(node, zero)).max()) == 0.0, (cfg, zero)
        assert float(jnp.abs(node.delta_matrix()).max()) == 0.0
        for n, v in vars(node).items():
            if hasattr(v, "shape") and n != zero:  # torch's kaiming_uniform_(a=sqrt(5)): U(+-1/sqrt(fan_in))
                bound = 1 / np.sqrt(np.prod(v.shape[1:]))
                assert 0.5 * bound < float(jnp.abs(v).max()) <= bound, (n, v.shape)


def test_dense_general_and_einsum_merge_equals_apply():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.DenseGeneral((2, 4), name="k_proj")(x)
            h = nn.Einsum((2, 4, 6), "btnh,nhd->btd", name="o_proj")(h)
            return nn.DenseGeneral(4, axis=(-2, -1), name="ff")(h.reshape(h.shape[:-1] + (2, 3)))

    x = jax.random.normal(jax.random.key(0), (2, 3, 6))
    model = Net()
    params = model.init(jax.random.key(1), x)
    run = jax.jit(lambda p, a: jpeft.apply(model, p, a, x))
    for cfg in (LoHaConfig(r=2, target_modules=".*", init_weights=False),
                LoKrConfig(r=1, target_modules=".*", init_weights=False, decompose_both=True)):
        ad = _random_like(jax.eval_shape(lambda: jpeft.init(cfg, params, jax.random.key(2), model, x)), 0)
        y = run(params, ad)
        assert float(jnp.abs(y - run(params, {})).max()) > 1e-3
        np.testing.assert_allclose(y, run(jax.jit(jpeft.merge)(params, ad), {}), rtol=1e-4, atol=1e-5)
        # the update on k_proj is x @ dW with dW the [in, out] matrix
        node = ad["k_proj"]
        k = params["params"]["k_proj"]
        want = (x @ (k["kernel"].reshape(6, 8) + node.delta_matrix())).reshape(2, 3, 2, 4) + k["bias"][None, None]
        got = jpeft.apply(nn.DenseGeneral((2, 4)), {"params": k}, {"": node}, x)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_rank_and_module_dropout_in_training_only():
    model = nn.Dense(8)
    x = jax.random.normal(jax.random.key(0), (5, 16))
    params = model.init(jax.random.key(1), x)
    base = model.apply(params, x)
    plain = jax.jit(lambda a: jpeft.apply(model, params, a, x))
    train = jax.jit(lambda a, k: jpeft.apply(model, params, a, x, rngs={"dropout": k}))
    for cfg in (LoKrConfig(r=1, target_modules=".*", init_weights=False, rank_dropout=0.5),
                LoHaConfig(r=2, target_modules=".*", init_weights=False, rank_dropout=0.5)):
        ad = jpeft.init(cfg, params, jax.random.key(2))
        full = plain(ad) - base  # no rngs: no dropout
        assert float(jnp.abs(full).max()) > 1e-2
        d = train(ad, jax.random.key(3)) - base
        # each output feature's update is dropped (0) or kept: LoKr as is, LoHa rescaled by the kept share
        kept = np.asarray(jnp.abs(d).max(axis=0) > 1e-6)
        assert 0 < kept.sum() < 8
        factor = 8 / kept.sum() if isinstance(cfg, LoHaConfig) else 1.0
        np.testing.assert_allclose(d[:, kept], factor * full[:, kept], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(d[:, ~kept], 0.0, atol=1e-6)
    ad = jpeft.init(LoHaConfig(r=2, target_modules=".*", init_weights=False, module_dropout=0.5), params,
                    jax.random.key(2))
    outs = {bool(jnp.abs(train(ad, jax.random.key(i)) - base).max() > 1e-6) for i in range(12)}
    assert outs == {True, False}  # some calls skip the whole update, some keep it


def test_scanned_llama_equals_unrolled():
    """Stacked (layer-scanned) sites: one vmapped init per site, the same outputs as the unrolled
    model with the per-layer nodes, and merge per layer (LoKr's absent tensors are None leaves)."""
    cfg = jpeft.models.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                                   num_kv_heads=1)
    unrolled = jpeft.models.LlamaForCausalLM(cfg)
    scanned = jpeft.models.LlamaForCausalLM(cfg.replace(scan_layers=True))
    ids = jax.random.randint(jax.random.key(0), (2, 5), 0, 40)
    p0 = jax.jit(unrolled.init)(jax.random.key(0), ids)
    p1 = {"params": scan.stack_params(p0["params"])}
    run = jax.jit(lambda m, p, a: jpeft.apply(m, p, a, ids), static_argnums=0)
    a1 = {}
    for c in (LoHaConfig(r=2, init_weights=False, target_modules=["q_proj", "down_proj"]),
              LoKrConfig(r=1, init_weights=False, target_modules=["v_proj", "up_proj"])):
        a1.update(jpeft.init(c, p1, jax.random.key(1), scanned, ids))
    assert all(isinstance(n, scan.Stacked) and n.length == 2 for n in a1.values()) and len(a1) == 4
    a0 = scan.unstack_adapter(a1)
    y = run(scanned, p1, a1)
    np.testing.assert_allclose(y, run(unrolled, p0, a0), atol=2e-5)
    merged = jax.jit(jpeft.merge)(p1, a1)
    kernel = lambda p: p["params"]["model"]["layers"]["mlp"]["down_proj"]["kernel"]
    assert float(jnp.abs(kernel(merged) - kernel(p1)).max(axis=(1, 2)).min()) > 1e-3  # every layer's update is non-zero
    np.testing.assert_allclose(run(scanned, merged, {}), y, atol=2e-5)


def test_partition_specs_and_l2sp_through_the_protocol():
    """Sharding specs follow the kernel's (LoHa's factors take its output / input entries, LoKr's
    small Kronecker factors are replicated), and L2-SP penalises the update dW itself."""
    from jax.sharding import PartitionSpec as P

    from jpeft.forgetting.regularizers import l2sp_penalty

    model = nn.Dense(8)
    x = jnp.ones((2, 16))
    params = model.init(jax.random.key(0), x)
    pspecs = {"params": {"kernel": P("fsdp", "tensor"), "bias": P()}}
    ha = _random_like(jax.eval_shape(lambda: jpeft.init(LoHaConfig(r=2, target_modules=".*"), params,
                                                        jax.random.key(1))), 2)
    s = jpeft.adapter_specs(ha, pspecs)[""]
    assert (s.hada_w1_a, s.hada_w2_a, s.hada_w1_b, s.hada_w2_b) == (P("tensor", None),) * 2 + (P(None, "fsdp"),) * 2
    kr = _random_like(jax.eval_shape(lambda: jpeft.init(LoKrConfig(r=1, target_modules=".*"), params,
                                                        jax.random.key(1))), 3)
    assert all(v == P() for v in jax.tree.leaves(jpeft.adapter_specs(kr, pspecs), is_leaf=lambda v: isinstance(v, P)))
    for ad in (ha, kr):
        start = jax.tree.map(jnp.zeros_like, ad)  # dW = 0
        dw = ad[""].delta_matrix()
        np.testing.assert_allclose(l2sp_penalty(params, ad, start, strength=2.0), jnp.sum(dw ** 2), rtol=1e-5)
