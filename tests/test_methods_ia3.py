"""(IA)^3 against Hugging Face PEFT (outputs, merged weights), plus layouts PEFT lacks."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft.methods.ia3 import IA3Config

torch = __import__("torch")  # a test dependency: missing means a broken install, not a skip
peft = __import__("peft")  # a test dependency: missing means a broken install, not a skip


class TorchNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.k_proj = torch.nn.Linear(6, 5)
        self.down_proj = torch.nn.Linear(5, 4)
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.conv_ff = torch.nn.Conv2d(4, 2, 3)

    def forward(self, x, img):
        return self.down_proj(torch.relu(self.k_proj(x))), self.conv_ff(self.conv(img))


class FlaxNet(nn.Module):
    @nn.compact
    def __call__(self, x, img):
        h = nn.Conv(4, (3, 3), padding="VALID", name="conv")(img)
        return nn.Dense(4, name="down_proj")(nn.relu(nn.Dense(5, name="k_proj")(x))), nn.Conv(2, (3, 3), padding="VALID", name="conv_ff")(h)


def _t(x):
    return jnp.asarray(x.detach().numpy())


def test_matches_peft_forward_and_merge():
    torch.manual_seed(0)
    cfg = peft.IA3Config(
        target_modules=["k_proj", "down_proj", "conv", "conv_ff"], feedforward_modules=["down_proj", "conv_ff"], init_ia3_weights=False
    )
    pm = peft.get_peft_model(TorchNet(), cfg).eval()
    b = pm.base_model.model
    lin = lambda m: {"kernel": _t(m.base_layer.weight).T, "bias": _t(m.base_layer.bias)}
    conv = lambda m: {"kernel": _t(m.base_layer.weight).transpose(2, 3, 1, 0), "bias": _t(m.base_layer.bias)}
    params = {"params": {"k_proj": lin(b.k_proj), "down_proj": lin(b.down_proj), "conv": conv(b.conv), "conv_ff": conv(b.conv_ff)}}
    x = np.random.RandomState(0).randn(3, 6).astype(np.float32)
    img = np.random.RandomState(1).randn(2, 3, 7, 7).astype(np.float32)
    jimg = jnp.asarray(img).transpose(0, 2, 3, 1)
    model = FlaxNet()
    jcfg = IA3Config(target_modules=["k_proj", "down_proj", "conv", "conv_ff"], feedforward_modules=["down_proj", "conv_ff"])
    ad = jpeft.init(jcfg, params, jax.random.key(0), model, jnp.asarray(x), jimg)
    assert {k: (v.ia3_l.shape, v.feedforward) for k, v in ad.items()} == {
        "k_proj": ((5,), False), "down_proj": ((5,), True), "conv": ((4,), False), "conv_ff": ((4,), True)
    }
    np.testing.assert_array_equal(ad["k_proj"].ia3_l, np.ones(5))
    ad = {k: type(v)(_t(getattr(b, k).ia3_l["default"]).reshape(-1), v.layout, v.feedforward) for k, v in ad.items()}
    ty, timg = pm(torch.tensor(x), torch.tensor(img))
    jy, jimg_out = jpeft.apply(model, params, ad, jnp.asarray(x), jimg)
    np.testing.assert_allclose(jy, _t(ty), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jimg_out, _t(timg).transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)

    merged = jpeft.merge(params, ad)["params"]
    un = pm.merge_and_unload()
    np.testing.assert_allclose(merged["k_proj"]["kernel"], _t(un.k_proj.weight).T, rtol=1e-6)
    np.testing.assert_allclose(merged["k_proj"]["bias"], _t(un.k_proj.bias), rtol=1e-6)
    np.testing.assert_allclose(merged["down_proj"]["kernel"], _t(un.down_proj.weight).T, rtol=1e-6)
    np.testing.assert_allclose(merged["down_proj"]["bias"], _t(un.down_proj.bias), rtol=1e-6)
    np.testing.assert_allclose(merged["conv"]["kernel"], _t(un.conv.weight).transpose(2, 3, 1, 0), rtol=1e-6)
    np.testing.assert_allclose(merged["conv"]["bias"], _t(un.conv.bias), rtol=1e-6)
    np.testing.assert_allclose(merged["conv_ff"]["kernel"], _t(un.conv_ff.weight).transpose(2, 3, 1, 0), rtol=1e-6)


def test_dense_general_and_einsum_merge_equals_factored():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.DenseGeneral((2, 3), name="k_proj")(x)
            h = nn.Einsum((2, 3, 4), "btnh,nhd->btd", name="o_proj")(h)
            h = nn.DenseGeneral(3, axis=(-2, -1), name="ff")(h.reshape(h.shape[:-1] + (2, 2)))
            return nn.Einsum((3, 5), "btd,de->bte", name="down")(h)

    x = jax.random.normal(jax.random.key(0), (2, 3, 5))
    model = Net()
    params = model.init(jax.random.key(1), x)
    cfg = IA3Config(target_modules=["k_proj", "o_proj", "ff", "down"], feedforward_modules=["ff", "down"], init_ia3_weights=False)
    ad = jpeft.init(cfg, params, jax.random.key(2), model, x)
    assert ad["ff"].ia3_l.shape == (4,) and ad["k_proj"].ia3_l.shape == (6,)
    y = jpeft.apply(model, params, ad, x)
    merged = jpeft.merge(params, ad)
    np.testing.assert_allclose(y, model.apply(merged, x), rtol=1e-4, atol=1e-5)
    back = jpeft.unmerge(merged, ad)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # reference for the output side: y * l on the k_proj DenseGeneral
    k = params["params"]["k_proj"]
    ref = (jnp.einsum("bti,inh->btnh", x, k["kernel"]) + k["bias"][None, None]) * ad["k_proj"].ia3_l.reshape(1, 1, 2, 3)
    got = jpeft.apply(nn.DenseGeneral((2, 3)), {"params": k}, {"": ad["k_proj"]}, x)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_config_errors():
    with pytest.raises(jpeft.ConfigError, match="subset of target_modules"):
        IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"])
    # q/v only, feedforward_modules not given: its default down_proj is no target; the error named a field the
    # user never set without saying so
    with pytest.raises(jpeft.ConfigError, match=r"\['down_proj'\] are not targets.*feedforward_modules = \[\] where no "
                                                r"target is a feed-forward layer; the default is \['down_proj'\]"):
        IA3Config(target_modules=["q_proj", "v_proj"])
    assert IA3Config(target_modules=["q_proj", "v_proj"], feedforward_modules=[]).feedforward_modules == ()
    model = nn.Embed(5, 3)
    params = model.init(jax.random.key(0), jnp.array([1]))
    with pytest.raises(jpeft.errors.UnsupportedModuleError, match="embedding"):
        jpeft.init(IA3Config(target_modules=".*", feedforward_modules=()), params, jax.random.key(0))


def test_unmerge_refuses_zero_vector():
    model = nn.Dense(3)
    params = model.init(jax.random.key(0), jnp.ones((1, 2)))
    ad = jpeft.init(IA3Config(target_modules=".*", feedforward_modules=()), params, jax.random.key(0))
    ad = {"": type(ad[""])(jnp.array([1.0, 0.0, 2.0]), ad[""].layout, False)}
    with pytest.raises(jpeft.errors.NotInvertibleError, match="zero entries"):
        jpeft.unmerge(jpeft.merge(params, ad), ad)


def test_save_adapter_refuses_a_config_that_moves_a_vector_to_the_other_side(tmp_path):
    """An adapter with o_proj as a feed-forward site (its input scaled) saved by jpeft.save_adapter
    under a config without it was written without a word, and load_adapter rebuilt o_proj from that
    config: the same vector on its output (o_proj maps 32 -> 32, so no shape told them apart; logits
    2.56 apart in a probe on the tiny Mistral). save_peft writes each site's side from the site;
    save_adapter (and a checkpoint) now refuses such a config by name, and the adapter saved with its
    own config loads to PEFT's logits."""
    import copy
    import os
    import sys
    import warnings

    import jpeft.models

    sys.path.insert(0, os.path.dirname(__file__))
    import _models_tiny as tiny

    hf_model, folder = tiny.hf_model("mistral")
    model, params = jpeft.models.from_pretrained(folder)
    cfg = IA3Config(target_modules=["q_proj", "o_proj"], feedforward_modules=["o_proj"], init_ia3_weights=False)
    ad = jpeft.init(cfg, params, jax.random.key(0))  # init_ia3_weights=False: every vector N(0, 1)
    for other, sites in ((cfg.replace(feedforward_modules=()), "'model.layers.0.self_attn.o_proj': 'input'"),
                         (cfg.replace(feedforward_modules=["q_proj"]), "'model.layers.0.self_attn.o_proj': 'input'"),
                         (cfg.replace(feedforward_modules=["q_proj", "o_proj"]),
                          "'model.layers.0.self_attn.q_proj': 'output'")):
        with pytest.raises(jpeft.ConfigError, match=f"config given to save_adapter .*{sites}"):
            jpeft.save_adapter(str(tmp_path / "bad"), other, ad)
        assert not (tmp_path / "bad").exists()
    jpeft.save_adapter(str(tmp_path / "good"), cfg, ad)
    _, loaded = jpeft.load_adapter(str(tmp_path / "good"), params)
    jpeft.hf.save_peft(str(tmp_path / "peft"), cfg, ad, base_model_name_or_path=folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf_model), str(tmp_path / "peft")).eval()
    ids, mask = tiny.batch("mistral", seed=3)
    with torch.no_grad():
        ref = pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(tiny.positions(mask))).logits.numpy()
    got = np.asarray(jpeft.apply(model, params, loaded, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    sel = mask.astype(bool)
    np.testing.assert_allclose(got[sel], ref[sel], atol=1e-4, rtol=0)
