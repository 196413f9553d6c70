"""MiLoRA initialisation (minor singular components in the adapter, principal part in the base):
the residual plus the adapter reconstructs the base, against a torch SVD closed form and
against the minor subspace of Hugging Face PEFT's ``init_lora_weights="mica"`` on the same
weights (PEFT 0.21 has no MiLoRA init of its own)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft

torch = __import__("torch")  # a test dependency: missing means a broken install, not a skip
peft = __import__("peft")  # a test dependency: missing means a broken install, not a skip


def _t(x):
    return np.asarray(x.detach().numpy())


def test_milora_reconstructs_base_and_holds_minor_components():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(12, 9))
    w0 = _t(net[0].weight).copy()  # PEFT's [out, in]
    b0 = _t(net[0].bias).copy()
    r, alpha = 3, 6
    model = nn.Dense(9)
    params = {"params": {"kernel": jnp.asarray(w0.T), "bias": jnp.asarray(b0)}}
    res, ad = jpeft.init_milora(jpeft.LoraConfig(r=r, alpha=alpha, target_modules=".*"), params, jax.random.key(0))
    node = ad[""]
    assert node.residual == "milora"

    # closed form from torch's SVD: the minor part U[:, -r:] S[-r:] V[:, -r:]^T goes to the adapter
    u, s, vh = (_t(t) for t in torch.linalg.svd(torch.tensor(w0), full_matrices=False))
    minor = (u[:, -r:] * s[-r:]) @ vh[-r:]  # [out, in]
    np.testing.assert_allclose(node.delta_matrix(), minor.T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(res["params"]["kernel"], (w0 - minor).T, rtol=1e-4, atol=1e-5)
    # each factor holds sqrt(S/scale) times its singular vectors (up to sign, as PiSSA's)
    scale = alpha / r
    np.testing.assert_allclose(np.abs(node.lora_B), np.abs(np.sqrt(s[-r:] / scale)[:, None] * u[:, -r:].T), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.abs(node.lora_A), np.abs(vh[-r:].T * np.sqrt(s[-r:] / scale)[None]), rtol=1e-4, atol=1e-5)

    # residual + adapter == the base, as a function and merged
    x = np.random.RandomState(0).randn(4, 12).astype(np.float32)
    np.testing.assert_allclose(jpeft.apply(model, res, ad, jnp.asarray(x)), model.apply(params, jnp.asarray(x)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(jpeft.merge(res, ad)["params"]["kernel"], w0.T, rtol=1e-5, atol=1e-5)
    # the base keeps the principal spectrum, rank min(in, out) - r
    s_res = np.linalg.svd(np.asarray(res["params"]["kernel"]), compute_uv=False)
    np.testing.assert_allclose(s_res[: 9 - r], s[: 9 - r], rtol=1e-4, atol=1e-5)
    assert s_res[9 - r:].max() < 1e-5

    # PEFT's MiCA init takes lora_B from the same minor left singular vectors: equal subspaces
    pm = peft.get_peft_model(net, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["0"], init_lora_weights="mica"))
    mica_B = _t(pm.base_model.model[0].lora_B["default"].weight)  # [out, r], orthonormal columns
    q, _ = np.linalg.qr(np.asarray(node.lora_B).T)  # jpeft's B^T spans the same out-space
    np.testing.assert_allclose(q @ q.T, mica_B @ mica_B.T, atol=1e-5)


def test_milora_refusals(tmp_path):
    model = nn.Dense(3)
    params = model.init(jax.random.key(0), jnp.ones((1, 4)))
    with pytest.raises(jpeft.ConfigError, match="init_milora"):
        jpeft.init(jpeft.LoraConfig(r=2, target_modules=".*", init_weights="milora"), params, jax.random.key(0))
    with pytest.raises(jpeft.ConfigError, match="exceeds the rank"):
        jpeft.init_milora(jpeft.LoraConfig(r=4, target_modules=".*"), params, jax.random.key(0))
    res, ad = jpeft.init_milora(jpeft.LoraConfig(r=2, target_modules=".*"), params, jax.random.key(0))
    with pytest.raises(jpeft.errors.UnsupportedAdapterError, match="no MiLoRA init"):
        jpeft.hf.save_peft(str(tmp_path / "milora"), jpeft.LoraConfig(r=2, target_modules=".*", init_weights="milora"), ad, params=res)


def test_key_is_optional_where_it_is_unused():
    # init_milora / init_olora document their key as unused (init_corda takes None), but
    # key=None raised a bare TypeError from jax.random.split
    model = nn.Dense(3)
    params = model.init(jax.random.key(0), jnp.ones((1, 4)))
    cfg = jpeft.LoraConfig(r=2, alpha=2, target_modules=".*")
    for make in (jpeft.init_milora, jpeft.init_olora, jpeft.init_pissa):
        res, ad = make(cfg, params, None)
        ref_res, ref_ad = make(cfg, params, jax.random.key(3))
        np.testing.assert_allclose(ad[""].delta_matrix(), ref_ad[""].delta_matrix(), atol=1e-6)
