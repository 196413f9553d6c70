"""The NNX Llama (#20): ``from_pretrained(path, api="nnx")`` equals transformers' logits and the
linen Llama's, and the Hugging Face PEFT format goes both ways with the real ``peft`` (every
adapter tensor random). The same adapters on the linen and the NNX Llama, for every method, are
compared in tests/test_properties.py."""

import copy
import os
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, os.path.dirname(__file__))
import _models_tiny as T  # noqa: E402

import jpeft  # noqa: E402
from jpeft import hf as H  # noqa: E402
from jpeft import models as M  # noqa: E402
from jpeft.errors import UnsupportedModelError  # noqa: E402

peft = __import__("peft")  # a test dependency: missing means a broken install, not a skip
torch = __import__("torch")  # a test dependency: missing means a broken install, not a skip

FAMILY = "qwen2"  # q/k/v biases, untied lm_head: the most parameter kinds of the family


@pytest.fixture(scope="module")
def both():
    _, folder = T.hf_model(FAMILY)
    model, params = M.from_pretrained(folder)
    graphdef, state = M.from_pretrained(folder, api="nnx")
    ids, mask = T.batch(FAMILY, seed=3)
    return model, params, graphdef, state, jnp.asarray(ids), jnp.asarray(mask)


def _logits_close(a, b, mask):
    sel = np.asarray(mask).astype(bool)
    np.testing.assert_allclose(np.asarray(a)[sel], np.asarray(b)[sel], atol=1e-4, rtol=0)


def test_nnx_llama_equals_transformers_and_linen(both):
    model, params, graphdef, state, ids, mask = both
    pos = jnp.asarray(T.positions(np.asarray(mask)))
    out = nnx.merge(graphdef, state)(ids, mask, position_ids=pos)
    _logits_close(out, T.torch_logits(FAMILY, np.asarray(ids), np.asarray(mask)), mask)
    np.testing.assert_allclose(out, model.apply(params, ids, mask, position_ids=pos), atol=1e-5, rtol=0)
    assert jpeft.tree.nnx_params(state).keys() == params["params"].keys()


def test_peft_adapters_both_ways(both, tmp_path, caplog):
    _, _, graphdef, state, ids, mask = both
    hf, _ = T.hf_model(FAMILY)
    pos = torch.tensor(T.positions(np.asarray(mask)))
    # made by peft, loaded onto the NNX Llama
    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                               target_modules=["q_proj", "v_proj", "up_proj"]))
    pm.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(tmp_path / "from_peft")
    with torch.no_grad():
        ref = pm(input_ids=torch.tensor(np.asarray(ids)), attention_mask=torch.tensor(np.asarray(mask)),
                 position_ids=pos).logits.numpy()
    _, adapter = H.load_peft(str(tmp_path / "from_peft"), state)
    _logits_close(jpeft.apply(graphdef, state, adapter, ids, mask, position_ids=jnp.asarray(pos.numpy())), ref, mask)
    # made on the NNX Llama (every tensor random), loaded by peft
    cfg = jpeft.LoraConfig(r=2, alpha=4, target_modules=["k_proj", "o_proj", "gate_proj"])
    rng = np.random.default_rng(1)
    adapter = jax.tree.map(lambda t: jnp.asarray(0.3 * rng.standard_normal(t.shape), t.dtype),
                           jpeft.init(cfg, state, jax.random.key(0), graphdef, ids))
    H.save_peft(str(tmp_path / "to_peft"), cfg, adapter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "to_peft")).eval()
    with torch.no_grad():
        ref2 = pm2(input_ids=torch.tensor(np.asarray(ids)), attention_mask=torch.tensor(np.asarray(mask)),
                   position_ids=pos).logits.numpy()
    _logits_close(jpeft.apply(graphdef, state, adapter, ids, mask, position_ids=jnp.asarray(pos.numpy())), ref2, mask)


def test_nnx_qwen3_with_its_q_and_k_norms_equals_transformers_and_linen():
    """Qwen3's per-head q_norm/k_norm (random weights) in the NNX Llama: transformers' logits, the
    linen model's parameter tree, and a random LoRA plus LN tuning of the q/k norms on it equal to the
    same adapter on the linen model."""
    _, folder = T.hf_model("qwen3")
    model, params = M.from_pretrained(folder)
    graphdef, state = M.from_pretrained(folder, api="nnx")
    ids, mask = (jnp.asarray(a) for a in T.batch("qwen3", seed=3))
    pos = jnp.asarray(T.positions(np.asarray(mask)))
    out = nnx.merge(graphdef, state)(ids, mask, position_ids=pos)
    _logits_close(out, T.torch_logits("qwen3", np.asarray(ids), np.asarray(mask)), mask)
    assert jax.tree.structure(jpeft.tree.nnx_params(state)) == jax.tree.structure(params["params"])
    rng = np.random.default_rng(2)
    adapter = {}
    for cfg in (jpeft.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "k_proj"]),
                jpeft.LNTuningConfig(target_modules=["q_norm", "k_norm"])):
        adapter.update(jax.tree.map(lambda t: t + jnp.asarray(0.3 * rng.standard_normal(t.shape), t.dtype),
                                    jpeft.init(cfg, state, jax.random.key(0), graphdef, ids)))
    got = jpeft.apply(graphdef, state, adapter, ids, mask, position_ids=pos)
    want = jpeft.apply(model, params, adapter, ids, mask, position_ids=pos)
    assert float(jnp.abs(want - out)[np.asarray(mask) == 1].max()) > 1e-2  # the adapter matters
    _logits_close(got, want, mask)


def test_nnx_api_is_for_the_llama_family():
    _, folder = T.hf_model("gpt2")
    with pytest.raises(UnsupportedModelError, match="Llama family"):
        M.from_pretrained(folder, api="nnx")


def test_generate_on_the_nnx_llama_says_to_use_the_linen_model(both):
    _, _, graphdef, state, ids, mask = both
    with pytest.raises(jpeft.errors.InputValidationError, match="no key/value cache"):
        jpeft.generate(graphdef, state, None, ids, 2, attention_mask=mask)
