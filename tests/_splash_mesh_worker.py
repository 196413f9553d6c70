"""Subprocess helper of tests/test_attention.py: the mesh training step with attention="splash"
(the Pallas TPU kernel, interpreted on the CPU, mapped over the mesh with shard_map) against
the single-device step with the reference attention. Needs 4 devices (XLA_FLAGS set by the
caller); prints one ``JSON:`` line."""

from __future__ import annotations

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jpeft
from jpeft._splash import SplashInterpretWarning


def main():
    warnings.simplefilter("ignore", SplashInterpretWarning)
    assert jax.device_count() == 4, jax.devices()
    ids = jax.random.randint(jax.random.key(3), (4, 20), 1, 64)
    am = np.ones((4, 20), np.int32)
    am[1, :5] = 0  # left padding in one row
    batch = {"input_ids": np.asarray(ids), "attention_mask": am}

    def build(attention):
        cfg = jpeft.models.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                                       num_kv_heads=2, sliding_window=6,
                                       layer_types=("sliding_attention", "full_attention"), attention=attention)
        return jpeft.models.LlamaForCausalLM(cfg)

    ref_model, splash_model = build("reference"), build("splash")
    params = ref_model.init(jax.random.key(0), ids)
    ad = jpeft.init(jpeft.LoraConfig(r=2, alpha=4, target_modules=".*(q_proj|k_proj|v_proj|o_proj)"), params,
                    jax.random.key(1))
    leaves, tdef = jax.tree.flatten(ad)  # every adapter tensor random
    keys = jax.random.split(jax.random.key(2), len(leaves))
    ad = jax.tree.unflatten(tdef, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])

    def make_loss(model):
        def loss_fn(params, adapter, batch, key):
            logits = jpeft.apply(model, params, adapter, batch["input_ids"], batch["attention_mask"])
            lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
            tgt = batch["input_ids"][:, 1:]
            w = batch["attention_mask"][:, 1:].astype(jnp.float32)
            nll = -jnp.take_along_axis(lp, tgt[..., None], -1)[..., 0]
            return jnp.sum(nll * w) / jnp.sum(w)
        return loss_fn

    opt = optax.adam(1e-2)
    step1 = jpeft.make_train_step(make_loss(ref_model), opt, donate=False)
    a1, _, m1 = step1(params, ad, opt.init(ad), batch, jax.random.key(0))
    mesh = jpeft.make_mesh(data=2, fsdp=1, tensor=2)
    p = jpeft.shard_params(params, mesh)
    a = jpeft.shard_adapter(ad, mesh, p)
    s = jpeft.init_opt_state(opt, a)
    step = jpeft.make_sharded_train_step(make_loss(splash_model), opt, mesh)
    hlo = step.lower(p, a, s, batch, jax.random.key(0)).as_text()
    a2, s2, m2 = step(p, a, s, batch, jax.random.key(0))
    diff = max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a1), jax.tree.leaves(a2)))
    moved = max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a1), jax.tree.leaves(ad)))
    out = dict(loss_ref=float(m1["loss"]), loss_splash=float(m2["loss"]), adapter_diff=diff, adapter_moved=moved,
               shard_map_in_program=("manual" in hlo.lower()) or ("shard_map" in hlo.lower()))
    print("JSON:" + json.dumps(out))


if __name__ == "__main__":
    main()
