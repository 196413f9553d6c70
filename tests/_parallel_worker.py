"""Eight emulated CPU devices: pmap, data-parallel mesh and 2 x 4 (data x fsdp) mesh against one
device. Run as a script by tests/test_parallel.py (XLA_FLAGS must be set before JAX is
imported, so this cannot run inside the pytest process); prints one JSON object with the
measured numbers, and the test asserts on them.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/_parallel_worker.py
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys


def run(steps: int = 20) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import NamedSharding, PartitionSpec as P

    import jpeft
    import _parallel_common as C
    from _models_tiny import randomize_adapter

    jax.config.update("jax_numpy_rank_promotion", "raise")
    out: dict = {"devices": jax.device_count()}
    model, params, adapter0, loss_fn = C.setup()
    adapter0 = C.random_adapter(adapter0)
    data = C.batches(steps)
    optimizers = {"sgd": optax.sgd(0.5), "adam": optax.adam(1e-3)}
    key = jax.random.key(0)

    def host(tree):
        return jax.tree.map(np.asarray, tree)

    refs = {}
    for name, opt in optimizers.items():
        losses, ad = C.single_device_run(loss_fn, opt, params, adapter0, data)
        refs[name] = (losses, host(ad))
        out[f"single/{name}/losses"] = losses
        out[f"single/{name}/adapter_change"] = C.max_diff(ad, adapter0)

    def record(tag, name, losses, ad):
        ref_losses, ref_ad = refs[name]
        out[f"{tag}/{name}/loss_diff"] = float(np.max(np.abs(np.array(losses) - np.array(ref_losses))))
        out[f"{tag}/{name}/adapter_diff"] = C.max_diff(host(ad), ref_ad)

    # ---- pmap over 8 devices
    for name, opt in optimizers.items():
        step = jpeft.make_pmap_train_step(loss_fn, opt)
        p_r, a_r = jpeft.replicate(params), jpeft.replicate(adapter0)
        s_r = jpeft.replicate(opt.init(adapter0))
        losses = []
        for i, b in enumerate(data):
            a_r, s_r, m = step(p_r, a_r, s_r, jpeft.split_for_pmap(b), jax.random.fold_in(key, i))
            losses.append(float(m["loss"][0]))
        out[f"pmap/{name}/replicas_equal"] = C.max_diff(jax.tree.map(lambda x: x[0], a_r), jax.tree.map(lambda x: x[-1], a_r))
        record("pmap", name, losses, jpeft.unreplicate(a_r))

    # ---- meshes: 8 x 1 (data parallel) and 2 x 4 (data x fsdp); plus accumulation on 2 x 4
    cases = [("mesh8", 8, 1, 1), ("mesh2x4", 2, 4, 1), ("mesh2x4_acc2", 2, 4, 2)]
    for tag, dp, fsdp, acc in cases:
        mesh = jpeft.make_mesh(data=dp, fsdp=fsdp)
        p_s = jpeft.shard_params(params, mesh)
        for name, opt in optimizers.items():
            if acc > 1 and name == "sgd":
                continue
            a_s = jpeft.shard_adapter(adapter0, mesh, p_s)
            s_s = jpeft.init_opt_state(opt, a_s)
            step = jpeft.make_sharded_train_step(loss_fn, opt, mesh, accumulate_steps=acc)
            losses = []
            for i, b in enumerate(data):
                a_s, s_s, m = step(p_s, a_s, s_s, b, jax.random.fold_in(key, i))
                losses.append(float(m["loss"]))
            record(tag, name, losses, a_s)
            if tag == "mesh2x4" and name == "adam":
                # the adapter and Adam's mu / nu stay laid out like their base weights
                a_specs = jax.tree.map(lambda x: x.sharding.spec, a_s)
                want = jpeft.adapter_specs(adapter0, p_s)
                out["mesh2x4/adapter_specs_kept"] = jax.tree.leaves(a_specs) == jax.tree.leaves(want)
                mu_specs = jax.tree.map(lambda x: x.sharding.spec, s_s[0].mu)
                nu_specs = jax.tree.map(lambda x: x.sharding.spec, s_s[0].nu)
                out["mesh2x4/opt_specs_follow_adapter"] = (
                    jax.tree.leaves(mu_specs) == jax.tree.leaves(want) == jax.tree.leaves(nu_specs)
                )
                out["mesh2x4/opt_count_replicated"] = bool(s_s[0].count.sharding.is_fully_replicated)
                site = "layers_0/up_proj"
                out["mesh2x4/example_specs"] = {
                    "kernel": str(p_s["params"]["layers_0"]["up_proj"]["kernel"].sharding.spec),
                    "lora_A": str(a_s[site].lora_A.sharding.spec),
                    "lora_B": str(a_s[site].lora_B.sharding.spec),
                    "q_kernel": str(p_s["params"]["layers_0"]["q_proj"]["kernel"].sharding.spec),
                    "q_lora_A": str(a_s["layers_0/q_proj"].lora_A.sharding.spec),
                    "q_lora_B": str(a_s["layers_0/q_proj"].lora_B.sharding.spec),
                }
        if fsdp == 4 and acc == 1:
            shards = []
            for path, x in jax.tree_util.tree_flatten_with_path(p_s)[0]:
                spec = x.sharding.spec
                if not any(e is not None for e in spec):
                    continue
                per_dev = {}
                for sh in x.addressable_shards:
                    per_dev[sh.device.id] = int(np.prod(sh.data.shape))
                full = int(np.prod(x.shape))
                shards.append({
                    "path": jax.tree_util.keystr(path), "shape": list(x.shape), "spec": str(spec),
                    "fractions": sorted({n / full for n in per_dev.values()}), "devices": len(per_dev),
                })
            n_leaves = len(jax.tree.leaves(p_s))
            out["fsdp4/sharded"] = shards
            out["fsdp4/n_leaves"] = n_leaves

    # ---- full fine-tuning on the 2 x 4 mesh: the trainable copy and Adam's moments are split over fsdp like the
    # base (they were replicated: every device held the whole model three times), and 5 steps equal one device's
    # (SGD: Adam turns the summation order's last-bit differences of near-zero gradients into steps of size lr)
    full0 = jpeft.init(jpeft.FullFinetuneConfig(), params, jax.random.key(3))
    ref_losses, ref_full = C.single_device_run(loss_fn, optimizers["sgd"], params, full0, data[:5])
    mesh = jpeft.make_mesh(data=2, fsdp=4)
    p_s = jpeft.shard_params(params, mesh)
    a_s = jpeft.shard_adapter(full0, mesh, p_s)
    s_s = jpeft.init_opt_state(optimizers["adam"], a_s)
    step = jpeft.make_sharded_train_step(loss_fn, optimizers["sgd"], mesh)
    losses, sgd_state = [], jpeft.init_opt_state(optimizers["sgd"], a_s)
    for i, b in enumerate(data[:5]):
        a_s, sgd_state, m = step(p_s, a_s, sgd_state, b, jax.random.fold_in(key, i))
        losses.append(float(m["loss"]))
    out["full/loss_diff"] = float(np.max(np.abs(np.array(losses) - np.array(ref_losses))))
    out["full/adapter_diff"] = C.max_diff(host(a_s), host(ref_full))
    out["full/adapter_change"] = C.max_diff(host(ref_full), host(full0))

    def on_one_device(tree):  # the share of the tree's elements one device holds
        leaves = jax.tree.leaves(tree)
        return sum(x.addressable_shards[0].data.size for x in leaves) / sum(x.size for x in leaves)

    out["full/device_share"] = {"base": on_one_device(p_s), "copy": on_one_device(a_s),
                                "mu": on_one_device(s_s[0].mu), "nu": on_one_device(s_s[0].nu)}
    out["full/specs_follow_base"] = (jax.tree.leaves(jax.tree.map(lambda x: x.sharding.spec, a_s[""].params))
                                     == jax.tree.leaves(jax.tree.map(lambda x: x.sharding.spec, p_s["params"])))

    # ---- a per-token mean over rows with different numbers of loss tokens: with
    # loss_weight="targets" devices (pmap) and micro-batches (mesh + accumulation) count by their
    # tokens and equal one device on the whole batch; pmap's plain mean of means does not
    tok_loss, tok_data, sgd = C.token_mean_loss(model), C.with_uneven_masks(data[:3]), optax.sgd(0.5)
    ref_losses, ref_ad = C.single_device_run(tok_loss, sgd, params, adapter0, tok_data)
    out["tokens/total"] = float(sum(b["mask"].sum() for b in tok_data))

    def record_tokens(tag, losses, ad, counted):
        out[f"tokens/{tag}/loss_diff"] = float(np.max(np.abs(np.array(losses) - np.array(ref_losses))))
        out[f"tokens/{tag}/adapter_diff"] = C.max_diff(host(ad), host(ref_ad))
        out[f"tokens/{tag}/counted"] = counted

    for tag, weight in (("pmap", "targets"), ("pmap_unweighted", None)):
        step = jpeft.make_pmap_train_step(tok_loss, sgd, loss_weight=weight)
        p_r, a_r, s_r = jpeft.replicate(params), jpeft.replicate(adapter0), jpeft.replicate(sgd.init(adapter0))
        losses, counted = [], 0.0
        for i, b in enumerate(tok_data):
            a_r, s_r, m = step(p_r, a_r, s_r, jpeft.split_for_pmap(b), jax.random.fold_in(key, i))
            losses.append(float(m["loss"][0]))
            counted += float(m["targets"][0])
        record_tokens(tag, losses, jpeft.unreplicate(a_r), counted)
    mesh = jpeft.make_mesh(data=2, fsdp=4)
    p_s = jpeft.shard_params(params, mesh)
    a_s = jpeft.shard_adapter(adapter0, mesh, p_s)
    s_s = jpeft.init_opt_state(sgd, a_s)
    step = jpeft.make_sharded_train_step(tok_loss, sgd, mesh, accumulate_steps=2, loss_weight="targets")
    losses, counted = [], 0.0
    for i, b in enumerate(tok_data):
        a_s, s_s, m = step(p_s, a_s, s_s, b, jax.random.fold_in(key, i))
        losses.append(float(m["loss"]))
        counted += float(m["targets"])
    record_tokens("mesh2x4_acc2", losses, a_s, counted)

    # ---- MiCA (lora_B frozen: split off, no optimizer state) on pmap and the 2 x 4 mesh: 3 AdamW steps (weight decay:
    # a B the optimizer saw would shrink) leave every B bit-identical and move A as one device does
    mica0 = jpeft.init(dataclasses.replace(C.script().lora_config(C.RANK), init_weights="mica"), params, key)
    mica0 = randomize_adapter(mica0, 11)  # A random (zero at init); B the init's frozen minor singular vectors
    mica0 = {p: dataclasses.replace(n, lora_B=0.5 * jax.random.normal(jax.random.fold_in(key, i), n.lora_B.shape))
             for i, (p, n) in enumerate(sorted(mica0.items()))}  # every tensor random, B too
    adamw = optax.adamw(1e-2, weight_decay=0.1)
    step = jpeft.make_train_step(loss_fn, adamw, donate=False)
    ref, st = mica0, jpeft.init_opt_state(adamw, mica0)
    for i, b in enumerate(data[:3]):
        ref, st, _ = step(params, ref, st, b, jax.random.fold_in(key, i))

    def factor(ad, name):  # one factor of every site, in the order of the paths
        return [np.asarray(getattr(ad[p], name)) for p in sorted(mica0)]

    out["mica/single/a_change"] = C.max_diff(factor(ref, "lora_A"), factor(mica0, "lora_A"))

    def record_mica(tag, ad):
        out[f"mica/{tag}/frozen_b"] = sorted(ad) == sorted(mica0) and all(n.frozen_b for n in ad.values())
        out[f"mica/{tag}/b_diff"] = C.max_diff(factor(ad, "lora_B"), factor(mica0, "lora_B"))
        out[f"mica/{tag}/a_diff"] = C.max_diff(factor(ad, "lora_A"), factor(ref, "lora_A"))

    step = jpeft.make_pmap_train_step(loss_fn, adamw)
    p_r, a_r, s_r = jpeft.replicate(params), jpeft.replicate(mica0), jpeft.replicate(jpeft.init_opt_state(adamw, mica0))
    for i, b in enumerate(data[:3]):
        a_r, s_r, _ = step(p_r, a_r, s_r, jpeft.split_for_pmap(b), jax.random.fold_in(key, i))
    record_mica("pmap", jpeft.unreplicate(a_r))
    mesh = jpeft.make_mesh(data=2, fsdp=4)
    p_s = jpeft.shard_params(params, mesh)
    a_s = jpeft.shard_adapter(mica0, mesh, p_s)
    s_s = jpeft.init_opt_state(adamw, a_s)
    step = jpeft.make_sharded_train_step(loss_fn, adamw, mesh)
    for i, b in enumerate(data[:3]):
        a_s, s_s, _ = step(p_s, a_s, s_s, b, jax.random.fold_in(key, i))
    record_mica("mesh2x4", host(a_s))

    # ---- an AdapterBank of that MiCA adapter and the plain LoRA, trained through the bank (AdamW, weight decay) on one
    # device and on the 2 x 4 mesh (stacks replicated, base and batch sharded): the MiCA slot's B stays bit-identical
    # (the step puts it back after the update) and every factor moves as one device's step moves it
    bank = jpeft.AdapterBank.from_adapters({"mica": mica0, "lora": adapter0})
    slots = np.asarray([0, 1, -1, 0] * (len(data[0]["tokens"]) // 4), np.int32)
    bank_data = [dict(b, ids=slots) for b in data[:3]]

    def bank_loss(p, w, batch, key):
        return loss_fn(p, jpeft.bank.route(w, None, batch["ids"]), batch, key)

    start = host(bank.weights)
    step = jpeft.make_train_step(bank_loss, adamw, donate=False)
    w, st = bank.weights, jpeft.init_opt_state(adamw, bank.weights)
    for i, b in enumerate(bank_data):
        w, st, _ = step(params, w, st, b, jax.random.fold_in(key, i))
    w_s = jax.device_put(jax.tree.map(jnp.copy, bank.weights), NamedSharding(mesh, P()))  # may alias; the step donates
    s_s = jpeft.init_opt_state(adamw, w_s)
    step = jpeft.make_sharded_train_step(bank_loss, adamw, mesh)
    for i, b in enumerate(bank_data):
        w_s, s_s, _ = step(p_s, w_s, s_s, b, jax.random.fold_in(key, i))
    out["bank/mesh2x4/diff"] = C.max_diff(host(w_s), host(w))

    def slot(ws, name, k):
        return [np.asarray(getattr(ws[p], name)[k]) for p in sorted(ws)]

    for tag, ws in (("single", host(w)), ("mesh2x4", host(w_s))):
        out[f"bank/{tag}/mica_b_diff"] = C.max_diff(slot(ws, "lora_B", 0), slot(start, "lora_B", 0))
        out[f"bank/{tag}/mica_a_change"] = C.max_diff(slot(ws, "lora_A", 0), slot(start, "lora_A", 0))
        out[f"bank/{tag}/lora_b_change"] = C.max_diff(slot(ws, "lora_B", 1), slot(start, "lora_B", 1))
        back = bank.with_weights(jax.tree.map(jnp.asarray, ws)).get("mica")
        out[f"bank/{tag}/mica_frozen_b"] = all(n.frozen_b for n in back.values())
    return out


if __name__ == "__main__":
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    result = run(steps)
    print("JSON:" + json.dumps(result))
