"""DoRA against Hugging Face PEFT's own implementation (outputs, gradients, initial magnitude, merge)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft.methods import dora

torch = __import__("torch")  # a test dependency: missing means a broken install, not a skip
peft = __import__("peft")  # a test dependency: missing means a broken install, not a skip
rep = dataclasses.replace


class TorchNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 5)
        self.emb = torch.nn.Embedding(10, 6)
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x, ids, img):
        return self.lin(x), self.emb(ids), self.conv(img)


class FlaxNet(nn.Module):
    @nn.compact
    def __call__(self, x, ids, img):
        return nn.Dense(5, name="lin")(x), nn.Embed(10, 6, name="emb")(ids), nn.Conv(4, (3, 3), padding="VALID", name="conv")(img)


def _t(x):
    return jnp.asarray(x.detach().numpy())


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    tnet = TorchNet()
    cfg = peft.LoraConfig(r=2, lora_alpha=3, target_modules=["lin", "emb", "conv"], use_dora=True, init_lora_weights=False)
    pm = peft.get_peft_model(tnet, cfg).eval()
    b = pm.base_model.model
    params = {
        "lin": {"kernel": _t(b.lin.base_layer.weight).T, "bias": _t(b.lin.base_layer.bias)},
        "emb": {"embedding": _t(b.emb.base_layer.weight)},
        "conv": {"kernel": _t(b.conv.base_layer.weight).transpose(2, 3, 1, 0), "bias": _t(b.conv.base_layer.bias)},
    }
    # jpeft adapter with the same arrays (JAX orientation)
    x = np.random.RandomState(1).randn(3, 6).astype(np.float32)
    ids = np.array([[1, 4, 9], [0, 2, 2]])
    img = np.random.RandomState(2).randn(2, 3, 5, 5).astype(np.float32)
    fparams = {"params": params}
    jcfg = jpeft.LoraConfig(r=2, alpha=3, target_modules=["lin", "emb", "conv"], use_dora=True, init_weights="random")
    model = FlaxNet()
    ad = jpeft.init(jcfg, fparams, jax.random.key(0), model, jnp.asarray(x), jnp.asarray(ids), jnp.asarray(img).transpose(0, 2, 3, 1))
    r = 2
    ca = _t(b.conv.lora_A["default"].weight).transpose(2, 3, 1, 0).reshape(-1, r)
    cb = _t(b.conv.lora_B["default"].weight).reshape(4, r).T
    ad = {
        "lin": rep(ad["lin"], lora_A=_t(b.lin.lora_A["default"].weight).T, lora_B=_t(b.lin.lora_B["default"].weight).T),
        "emb": rep(ad["emb"], lora_A=_t(b.emb.lora_embedding_A["default"]).T, lora_B=_t(b.emb.lora_embedding_B["default"]).T),
        "conv": rep(ad["conv"], lora_A=ca, lora_B=cb),
    }
    ad = {k: dora.with_magnitude(v, params[k]) for k, v in ad.items()}
    return pm, model, fparams, ad, (x, ids, img)


def test_initial_magnitude_matches_peft(pair):
    pm, model, fparams, ad, _ = pair
    b = pm.base_model.model
    np.testing.assert_allclose(ad["lin"].magnitude, _t(b.lin.lora_magnitude_vector["default"].weight), rtol=1e-5)
    np.testing.assert_allclose(ad["emb"].magnitude, _t(b.emb.lora_magnitude_vector["default"].weight), rtol=1e-5)
    np.testing.assert_allclose(ad["conv"].magnitude, _t(b.conv.lora_magnitude_vector["default"].weight).reshape(-1), rtol=1e-5)


def _perturb_torch_magnitudes(pm, ad):
    """Train-like state: magnitudes away from their initial norms (same values on both sides)."""
    b = pm.base_model.model
    new = {}
    for name, mod in (("lin", b.lin), ("emb", b.emb), ("conv", b.conv)):
        w = mod.lora_magnitude_vector["default"].weight
        with torch.no_grad():
            w.mul_(torch.linspace(0.5, 1.5, w.numel()).reshape(w.shape))
        new[name] = rep(ad[name], magnitude=_t(w).reshape(-1))
    return new


def test_forward_and_gradients_match_peft(pair):
    pm, model, fparams, ad, (x, ids, img) = pair
    ad = _perturb_torch_magnitudes(pm, ad)
    tx, tids, timg = torch.tensor(x), torch.tensor(ids), torch.tensor(img)
    outs = pm(tx, tids, timg)
    loss_t = sum((o * torch.arange(o.numel()).reshape(o.shape).float().sin()).sum() for o in outs)
    pm.zero_grad()
    loss_t.backward()

    def loss(adapter):
        o = jpeft.apply(model, fparams, adapter, jnp.asarray(x), jnp.asarray(ids), jnp.asarray(img).transpose(0, 2, 3, 1))
        o = (o[0], o[1], o[2].transpose(0, 3, 1, 2))
        return sum((v * jnp.sin(jnp.arange(v.size, dtype=jnp.float32)).reshape(v.shape)).sum() for v in o), o

    (lj, oj), g = jax.value_and_grad(loss, has_aux=True)(ad)
    for a, b in zip(oj, outs):
        np.testing.assert_allclose(a, _t(b), rtol=1e-4, atol=1e-5)
    b = pm.base_model.model
    np.testing.assert_allclose(g["lin"].magnitude, _t(b.lin.lora_magnitude_vector["default"].weight.grad), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(g["lin"].lora_A, _t(b.lin.lora_A["default"].weight.grad).T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(g["lin"].lora_B, _t(b.lin.lora_B["default"].weight.grad).T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(g["emb"].magnitude, _t(b.emb.lora_magnitude_vector["default"].weight.grad), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(g["emb"].lora_B, _t(b.emb.lora_embedding_B["default"].grad).T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(g["conv"].magnitude, _t(b.conv.lora_magnitude_vector["default"].weight.grad).reshape(-1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        g["conv"].lora_A, _t(b.conv.lora_A["default"].weight.grad).transpose(2, 3, 1, 0).reshape(-1, 2), rtol=1e-4, atol=1e-5
    )

    # merged weights equal PEFT's merge_and_unload
    merged = jpeft.merge(fparams, ad)
    unloaded = pm.merge_and_unload()
    np.testing.assert_allclose(merged["params"]["lin"]["kernel"], _t(unloaded.lin.weight).T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(merged["params"]["emb"]["embedding"], _t(unloaded.emb.weight), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        merged["params"]["conv"]["kernel"], _t(unloaded.conv.weight).transpose(2, 3, 1, 0), rtol=1e-5, atol=1e-6
    )


def test_merge_equals_factored_for_every_layout():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, ids):
            h = nn.DenseGeneral((2, 3), name="dg")(x)  # [b, t, 2, 3]
            h = nn.Einsum((2, 3, 4), "btnh,nhd->btd", name="ein")(h)
            e = nn.Embed(7, 4, name="emb")
            return h + e(ids), e.attend(h)

    x = jax.random.normal(jax.random.key(0), (2, 3, 5))
    ids = jnp.array([[1, 2, 3], [4, 5, 6]])
    model = Net()
    params = model.init(jax.random.key(1), x, ids)
    # the embedding is also read through attend: ensure_weight_tying adapts both uses, so merging is exact
    cfg = jpeft.LoraConfig(r=2, alpha=4, target_modules=["dg", "ein", "emb"], use_dora=True, init_weights="random",
                           ensure_weight_tying=True)
    ad = jpeft.init(cfg, params, jax.random.key(2), model, x, ids)
    ad = {k: rep(v, magnitude=v.magnitude * jnp.linspace(0.7, 1.3, v.magnitude.size)) for k, v in ad.items()}
    fact = jpeft.apply(model, params, ad, x, ids)
    merged = model.apply(jpeft.merge(params, ad), x, ids)
    for a, b in zip(fact, merged):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # reference: the fully computed DoRA weight for the DenseGeneral kernel
    w = params["params"]["dg"]["kernel"].reshape(5, 6)
    node = ad["dg"]
    full = w + node.scale * node.lora_A @ node.lora_B
    ref = node.magnitude.reshape(1, -1) * full / jnp.linalg.norm(full, axis=0, keepdims=True)
    np.testing.assert_allclose(jpeft.merge(params, ad)["params"]["dg"]["kernel"].reshape(5, 6), ref, rtol=1e-5, atol=1e-6)


def test_identity_at_init_and_unmerge_refuses():
    model = nn.Dense(4)
    x = jax.random.normal(jax.random.key(0), (3, 6))
    params = model.init(jax.random.key(1), x)
    ad = jpeft.init(jpeft.LoraConfig(r=2, target_modules=".*", use_dora=True), params, jax.random.key(2))
    np.testing.assert_allclose(jpeft.apply(model, params, ad, x), model.apply(params, x), rtol=1e-5, atol=1e-6)
    merged = jpeft.merge(params, ad)
    with pytest.raises(jpeft.errors.NotInvertibleError, match="keep the original params"):
        jpeft.unmerge(merged, ad)


def test_dropout_recomputes_base_on_dropped_input():
    model = nn.Dense(4)
    x = jax.random.normal(jax.random.key(0), (64, 6))
    params = model.init(jax.random.key(1), x)
    ad = jpeft.init(jpeft.LoraConfig(r=2, target_modules=".*", use_dora=True, dropout=0.5, init_weights="random"), params, jax.random.key(2))
    ad = {k: rep(v, magnitude=v.magnitude * 1.5) for k, v in ad.items()}
    y0 = jpeft.apply(model, params, ad, x)
    y1 = jpeft.apply(model, params, ad, x, rngs={"dropout": jax.random.key(3)})
    assert not np.allclose(y0, y1)
    # with a magnitude equal to the norms and B = 0 the output is the base, dropout or not
    ad0 = jpeft.init(jpeft.LoraConfig(r=2, target_modules=".*", use_dora=True, dropout=0.5), params, jax.random.key(2))
    np.testing.assert_allclose(jpeft.apply(model, params, ad0, x, rngs={"dropout": jax.random.key(3)}), model.apply(params, x), rtol=1e-5, atol=1e-5)
