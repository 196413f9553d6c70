"""CorDA initialisation (knowledge-preserved and instruction-previewed modes) against Hugging
Face PEFT 0.21's ``preprocess_corda`` + ``init_lora_weights="corda"`` on the same tiny Llama
and the same calibration sequences."""

import copy
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

peft = __import__("peft")  # a test dependency: missing means a broken install, not a skip
torch = __import__("torch")  # a test dependency: missing means a broken install, not a skip
from peft.tuners.lora.config import CordaConfig  # noqa: E402
from peft.tuners.lora.corda import preprocess_corda  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]


@functools.lru_cache(maxsize=None)
def _loaded():
    return M.from_pretrained(T.hf_model("llama2")[1])


def _calibration(n=8, length=16):
    # 128 tokens, more than the widest input (64): a full-rank covariance, as PEFT asks for
    rng = np.random.default_rng(3)
    return [rng.integers(3, T.VOCAB, size=(1, length)).astype(np.int64) for _ in range(n)]


@pytest.mark.parametrize("mode", ["kpm", "ipm"])
def test_matches_peft_corda(mode):
    calib = _calibration()
    hf = copy.deepcopy(T.hf_model("llama2")[0])
    lc = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="corda",
                         corda_config=CordaConfig(corda_method=mode))

    def run_model():
        with torch.no_grad():
            for ids in calib:
                hf(input_ids=torch.tensor(ids))

    preprocess_corda(hf, lc, run_model=run_model)
    pm = peft.get_peft_model(hf, lc).eval()

    model, params = _loaded()
    cfg = jpeft.LoraConfig(r=4, alpha=8, target_modules=TARGETS)
    res, ad = jpeft.init_corda(cfg, params, jax.random.key(0), model, [jnp.asarray(c) for c in calib], mode=mode)
    assert len(ad) == 6
    for layer in range(2):
        hl = pm.base_model.model.model.layers[layer]
        for name, mod in (("q_proj", hl.self_attn.q_proj), ("v_proj", hl.self_attn.v_proj), ("down_proj", hl.mlp.down_proj)):
            sub = "self_attn" if name != "down_proj" else "mlp"
            path = f"model/layers_{layer}/{sub}/{name}"
            node = ad[path]
            hf_A = mod.lora_A["default"].weight.detach().numpy()
            hf_B = mod.lora_B["default"].weight.detach().numpy()
            hf_W = mod.base_layer.weight.detach().numpy()
            scale = np.abs(hf_B @ hf_A).max()
            # the update s*B*A and the residual base equal PEFT's; the factors up to the sign of each component
            np.testing.assert_allclose(node.delta_matrix(), 2.0 * (hf_B @ hf_A).T, rtol=1e-3, atol=1e-4 * scale)
            np.testing.assert_allclose(res["params"]["model"][f"layers_{layer}"][sub][name]["kernel"], hf_W.T,
                                       rtol=1e-3, atol=1e-4 * scale)
            np.testing.assert_allclose(np.abs(node.lora_A), np.abs(hf_A.T), rtol=1e-3, atol=1e-4 * np.abs(hf_A).max())
            np.testing.assert_allclose(np.abs(node.lora_B), np.abs(hf_B.T), rtol=1e-3, atol=1e-4 * np.abs(hf_B).max())
    # the same function at the start, and equal to PEFT's model
    ids, mask = T.batch("llama2", seed=5)
    ours = np.asarray(jpeft.apply(model, res, ad, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    base = np.asarray(model.apply(params, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    with torch.no_grad():
        theirs = pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(T.positions(mask))).logits.numpy()
    keep = mask.astype(bool)
    np.testing.assert_allclose(ours[keep], base[keep], atol=2e-4)
    np.testing.assert_allclose(ours[keep], theirs[keep], atol=2e-4)


def test_corda_refusals(tmp_path):
    model, params = _loaded()
    calib = [jnp.asarray(c) for c in _calibration(1, 6)]
    cfg = jpeft.LoraConfig(r=2, alpha=4, target_modules=["q_proj"])
    with pytest.raises(jpeft.ConfigError, match="mode must be"):
        jpeft.init_corda(cfg, params, None, model, calib, mode="xpm")
    with pytest.raises(jpeft.ConfigError, match="calibration is empty"):
        jpeft.init_corda(cfg, params, None, model, [])
    with pytest.raises(jpeft.ConfigError, match="plain dense"):
        jpeft.init_corda(jpeft.LoraConfig(r=2, target_modules=["embed_tokens"]), params, None, model, calib)
    res, ad = jpeft.init_corda(cfg, params, None, model, calib)
    with pytest.raises(jpeft.errors.UnsupportedAdapterError, match="preprocess_corda"):
        jpeft.hf.save_peft(str(tmp_path / "c"), cfg, ad)


@pytest.mark.parametrize("bad", ["zeros", "nan"])
def test_corda_non_finite_covariance_is_a_named_error(bad):
    # inputs whose largest entry is 0 (0 / |max| = NaN, as in PEFT's hook) or NaN gave a NaN covariance,
    # and the damping loop doubled `damp` forever: init_corda never returned
    import flax.linen as nn

    model = nn.Dense(6)
    params = model.init(jax.random.key(0), jnp.ones((5, 8)))
    x = jnp.zeros((5, 8)) if bad == "zeros" else jnp.ones((5, 8)).at[0, 0].set(jnp.nan)
    with pytest.raises(jpeft.errors.InputValidationError, match=r"non-finite covariance.*\|max\(X\)\|"):
        jpeft.init_corda(jpeft.LoraConfig(r=2, alpha=2, target_modules=".*"), params, None, model, [jnp.ones((5, 8)), x])
