"""Four emulated CPU devices: LoRA training on an NF4 base sharded over a 2 x 2 (data x fsdp)
mesh against one device. Run by tests/test_quantize.py (XLA_FLAGS must be set before JAX is
imported); prints one JSON line that the test asserts on.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/_quant_mesh_worker.py
"""

from __future__ import annotations

import json


def run(steps: int = 2) -> dict:
    import jax
    import numpy as np
    import optax

    import jpeft

    cfg = jpeft.models.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                                   num_kv_heads=2)
    model = jpeft.models.LlamaForCausalLM(cfg)
    ids = np.asarray(jax.random.randint(jax.random.key(0), (4, 13), 0, 64))
    q = jpeft.quantize(model.init(jax.random.key(0), ids[:, :-1]), "nf4")
    frozen = [np.array(x) for x in jax.tree.leaves(q)]
    adapter = jpeft.init(jpeft.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj"]), q, jax.random.key(1), model,
                         ids[:, :-1])

    def loss_fn(p, a, batch, key):
        logits = jpeft.apply(model, p, a, batch["ids"][:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["ids"][:, 1:]).mean()

    opt = optax.adam(5e-2)
    step = jpeft.make_train_step(loss_fn, opt, donate=False)
    a1, s1, ref = adapter, opt.init(adapter), []
    for i in range(steps):
        a1, s1, m = step(q, a1, s1, {"ids": ids}, jax.random.key(i))
        ref.append(float(m["loss"]))

    mesh = jpeft.make_mesh(data=2, fsdp=2)
    qs = jpeft.shard_params(q, mesh)
    sharded = sum(1 for x in jax.tree.leaves(qs) if any(e is not None for e in x.sharding.spec))
    a2 = jpeft.shard_adapter(adapter, mesh, qs)
    s2 = jpeft.init_opt_state(opt, a2)
    mstep = jpeft.make_sharded_train_step(loss_fn, opt, mesh)
    got = []
    for i in range(steps):
        a2, s2, m = mstep(qs, a2, s2, {"ids": ids}, jax.random.key(i))
        got.append(float(m["loss"]))
    diff = max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(jax.tree.leaves(a1), jax.tree.leaves(a2)))
    unchanged = all(np.array_equal(np.asarray(x), y) for x, y in zip(jax.tree.leaves(qs), frozen))
    return {"devices": jax.device_count(), "sharded_leaves": sharded, "loss_fell": got[-1] < got[0] - 1e-3,
            "base_unchanged": unchanged, "loss_diff": float(np.abs(np.array(got) - np.array(ref)).max()),
            "adapter_diff": diff, "losses": got}


if __name__ == "__main__":
    print("JSON:" + json.dumps(run()))
