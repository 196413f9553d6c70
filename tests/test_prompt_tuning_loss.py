"""Prompt tuning's training loss against Hugging Face PEFT: PEFT pads the labels with -100 for
the virtual tokens only, so the last virtual token's prediction of the first real token is part
of its loss (and of the prompt's gradient); ``jpeft.lm_loss`` must score it too."""

import copy
import os
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
import jpeft.models
from jpeft import PromptWeights

torch = __import__("torch")  # a test dependency: missing means a broken install, not a skip
peft = __import__("peft")  # a test dependency: missing means a broken install, not a skip
sys.path.insert(0, os.path.dirname(__file__))
import _models_tiny as tiny  # noqa: E402

T = 3


@pytest.mark.parametrize("family", ["llama3", "gpt2"])
def test_prompt_tuning_loss_and_gradient_equal_peft(family):
    hf, folder = tiny.hf_model(family)
    model, params = jpeft.models.from_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(hf), peft.PromptTuningConfig(num_virtual_tokens=T, task_type="CAUSAL_LM"))
    emb = pm.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        emb.copy_(torch.randn(emb.shape, generator=torch.Generator().manual_seed(3)))
    pm.eval()
    ids, mask = tiny.batch(family)
    mask = np.ones_like(mask)  # PEFT drops position_ids for prompt tuning: unpadded rows
    mask[2, 5:] = 0  # one right-padded row
    ids = np.where(mask == 1, ids, 0)
    out = pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
             labels=torch.tensor(np.where(mask == 1, ids, -100)))
    out.loss.backward()
    path = "model/embed_tokens" if family != "gpt2" else "transformer/wte"
    adapter = {"": PromptWeights(jnp.asarray(emb.detach().numpy()), path)}

    def loss(a):
        return jpeft.lm_loss(model, params, a, jnp.asarray(ids), jnp.asarray(mask), attention_mask=jnp.asarray(mask))

    (value, n), grads = jax.value_and_grad(loss, has_aux=True)(adapter)
    np.testing.assert_allclose(float(value), float(out.loss.detach()), rtol=1e-5, atol=1e-5)
    assert int(n) == int(mask.sum())  # every real token is a target, the first one included
    np.testing.assert_allclose(np.asarray(grads[""].embedding), emb.grad.numpy(), rtol=1e-4, atol=1e-5)
    # jpeft.apply still returns the real tokens' logits only
    assert jpeft.apply(model, params, adapter, jnp.asarray(ids)).shape == (3, 8, hf.config.vocab_size)
