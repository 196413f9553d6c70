"""LoRA's ``trainable_token_indices`` (Hugging Face PEFT's TrainableTokens): chosen embedding rows
are trained, in the lookup and, on a tied model, in the output projection; merge == apply;
training moves only those rows' values and leaves the base bit-identical. The PEFT format both
ways, on every family, is in tests/test_interop_matrix.py (row ``trainable_token_indices``)."""

from __future__ import annotations

import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "helpers"))
from adam_step import step_moves_adapter_only  # noqa: E402

import jpeft
from jpeft.errors import ConfigError, NotInvertibleError, TargetNotFoundError

IDS = jnp.array([[1, 3, 4, 5], [5, 0, 2, 3]])
IDX = [3, 5]


class Tied(nn.Module):
    @nn.compact
    def __call__(self, ids):
        e = nn.Embed(8, 4, name="embed_tokens")
        h = nn.Dense(4, name="d")(e(ids))
        return e.attend(h)


def _setup(model=None, **kw):
    model = model or Tied()
    params = model.init(jax.random.key(1), IDS)
    cfg = jpeft.LoraConfig(r=2, target_modules=["d"], trainable_token_indices=IDX, init_weights="random", **kw)
    ad = jpeft.init(cfg, params, jax.random.key(2), model, IDS)
    leaves, tdef = jax.tree.flatten(ad)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    ad = jax.tree.unflatten(tdef, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    return model, params, cfg, ad


def test_closed_form_with_the_tied_output_projection():
    model, params, cfg, ad = _setup()
    node = ad["embed_tokens"]
    assert isinstance(node, jpeft.TrainableTokens) and node.indices == (3, 5) and node.tie_output
    e = params["params"]["embed_tokens"]["embedding"].at[jnp.array(IDX)].set(node.values)
    d = params["params"]["d"]
    lo = ad["d"]
    h = e[IDS] @ (d["kernel"] + lo.scale * lo.lora_A @ lo.lora_B) + d["bias"].reshape(1, 1, 4)
    np.testing.assert_allclose(jpeft.apply(model, params, ad, IDS), h @ e.T, rtol=1e-5, atol=1e-5)


def test_starts_as_the_base_and_merge_equals_apply():
    model = Tied()
    params = model.init(jax.random.key(1), IDS)
    cfg = jpeft.LoraConfig(r=2, target_modules=["d"], trainable_token_indices=IDX)
    ad0 = jpeft.init(cfg, params, jax.random.key(2), model, IDS)
    np.testing.assert_array_equal(jpeft.apply(model, params, ad0, IDS), model.apply(params, IDS))
    model, params, cfg, ad = _setup()
    fact = jpeft.apply(model, params, ad, IDS)
    assert np.abs(np.asarray(fact) - np.asarray(model.apply(params, IDS))).max() > 1e-2
    merged = jpeft.merge(params, ad)
    np.testing.assert_allclose(model.apply(merged, IDS), fact, rtol=1e-4, atol=1e-5)
    rows = np.setdiff1d(np.arange(8), IDX)
    np.testing.assert_array_equal(merged["params"]["embed_tokens"]["embedding"][rows],
                                  params["params"]["embed_tokens"]["embedding"][rows])
    with pytest.raises(NotInvertibleError, match="keep the base params"):
        jpeft.unmerge(merged, ad)


def test_training_moves_the_rows_and_leaves_the_base_alone():
    model, params, cfg, ad = _setup()
    new = step_moves_adapter_only(model, params, ad, IDS, (2, 4, 8))
    assert np.abs(np.asarray(new["embed_tokens"].values - ad["embed_tokens"].values)).min() > 0


def test_config_forms_and_refusals():
    c = jpeft.LoraConfig(target_modules=["d"], trainable_token_indices={"embed_tokens": [1, 2]})
    assert c.trainable_token_indices == {"embed_tokens": (1, 2)}
    assert jpeft.LoraConfig.from_dict(c.to_dict()) == c
    for bad in ([], [1, 1], [-1], [True]):
        with pytest.raises(ConfigError, match="distinct token ids"):
            jpeft.LoraConfig(trainable_token_indices=bad)
    model = Tied()
    params = model.init(jax.random.key(1), IDS)
    with pytest.raises(ConfigError, match="both in target_modules"):
        jpeft.init(jpeft.LoraConfig(target_modules=["embed_tokens"], trainable_token_indices=[1]), params,
                   jax.random.key(0), model, IDS)
    with pytest.raises(ConfigError, match="reach past"):
        jpeft.init(jpeft.LoraConfig(target_modules=["d"], trainable_token_indices=[8]), params, jax.random.key(0))
    with pytest.raises(TargetNotFoundError, match="matches 0 embeddings"):
        jpeft.init(jpeft.LoraConfig(target_modules=["d"], trainable_token_indices={"wte": [1]}), params,
                   jax.random.key(0))
    # PEFT also takes token rows of an output Linear; the refusal did not say why lm_head matched nothing
    with pytest.raises(TargetNotFoundError, match=r"matches 0 embeddings.*embeddings only, not of an output layer such "
                                                  r"as lm_head.*modules_to_save=\['lm_head'\]"):
        jpeft.init(jpeft.LoraConfig(target_modules=["d"], trainable_token_indices={"lm_head": [1]}), params,
                   jax.random.key(0))
