"""Every method of tests/test_properties.py's table (``CASES``) trained on eight emulated CPU
devices: one device, a 2 x 4 (data x fsdp) mesh and a 2 x 2 x 2 (data x fsdp x tensor) mesh with
the Llama tensor-parallel rules, the user's way (docs/SCALING.md: ``shard_params``,
``shard_adapter``, ``init_opt_state``, ``make_sharded_train_step``), each adapter tensor random at
the start; then the mesh-trained adapter saved with ``jpeft.save_adapter`` and loaded back on one
device. Run as a script by tests/test_mesh_methods.py (XLA_FLAGS must be set before JAX is
imported); prints one JSON object with the measured numbers, and the test asserts on them.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/_mesh_methods_worker.py OUT_DIR
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

STEPS = 3
BATCH = 8  # rows: one per device on the 2 x 4 mesh, whose batch is split over data x fsdp


def adalora_schedule(config, steps: int):
    """The table's AdaLoRA with a schedule that allocates within ``steps`` updates (the budget
    falls at steps 1 .. steps - 1, the final mask at ``steps - 1``), so the allocation step, which
    ranks the triplets of every site against each other, runs on the mesh."""
    return dataclasses.replace(config, total_step=steps, tinit=0, tfinal=1, deltaT=1)


def run(out_dir: str, steps: int = STEPS) -> dict:
    import jax
    import numpy as np
    import optax

    import jpeft
    import test_properties as T
    from _models_tiny import randomize_adapter

    jax.config.update("jax_numpy_rank_promotion", "raise")
    randomize = jax.jit(randomize_adapter, static_argnums=1)  # one compile per adapter, not one per array
    t0, c0 = time.perf_counter(), time.process_time()
    out: dict = {"devices": jax.device_count(), "cases": {}}
    data = [jax.random.randint(jax.random.key(100 + i), (BATCH, 6), 0, T.CFG.vocab_size) for i in range(steps)]
    meshes = {"2x4": (jpeft.make_mesh(data=2, fsdp=4), None),
              "2x2x2": (jpeft.make_mesh(data=2, fsdp=2, tensor=2), jpeft.tensor_parallel_rules())}

    def host(tree):
        return jax.tree.map(np.asarray, tree)

    def max_diff(a, b) -> float:
        la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
        assert jax.tree.structure(a) == jax.tree.structure(b) and len(la) == len(lb)
        return max((float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)), initial=0.0))
                    for x, y in zip(la, lb)), default=0.0)

    def rel_diff(a, b) -> float:  # the largest difference of each array relative to its largest entry
        la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
        assert jax.tree.structure(a) == jax.tree.structure(b) and len(la) == len(lb)
        out = 0.0
        for x, y in zip(la, lb):
            x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
            if x.size:
                out = max(out, float(np.max(np.abs(x - y))) / max(float(np.max(np.abs(y))), 1e-30))
        return out

    def split_leaves(tree) -> list:  # the adapter's arrays no device holds whole
        return [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(tree)
                if not x.sharding.is_fully_replicated]

    placed: dict = {}
    for i, (name, case) in enumerate(T.CASES.items()):
        config = case.config
        if name == "adalora":
            config = adalora_schedule(config, steps)
        params, ad0 = T.make(name)
        ad0 = randomize(ad0, 1000 + i)
        opt = config.wrap_optimizer(optax.adamw(1e-2, weight_decay=0.1))

        def loss(p, a, b, k, config=config):
            reg = config.regularizer(a)
            value = T.loss_fn(p, a, b, k)
            return value if reg is None else value + reg

        rec: dict = {}
        step = jpeft.make_train_step(loss, opt, donate=False)
        ref, st = ad0, jpeft.init_opt_state(opt, ad0)
        ref_losses = []
        for s, b in enumerate(data):
            ref, st, m = step(params, ref, st, b, jax.random.key(s))
            ref_losses.append(float(m["loss"]))
        ref, ref_state = host(ref), host(st)
        rec["change"] = max_diff(ref, ad0)
        rec["losses"] = ref_losses
        if name == "adalora":
            rec["single/rank_pattern"] = config.trained_config(st).rank_pattern
        for tag, (mesh, rules) in meshes.items():
            if (tag, id(params)) not in placed:  # the table's base, placed once per mesh (a residual base: its own)
                placed[tag, id(params)] = (params, jpeft.shard_params(params, mesh, rules))
            p_s = placed[tag, id(params)][1]
            a_s = jpeft.shard_adapter(ad0, mesh, p_s)
            s_s = jpeft.init_opt_state(opt, a_s)
            rec[f"{tag}/split"] = split_leaves(a_s)
            rec[f"{tag}/base_split"] = len(split_leaves(p_s))
            mstep = jpeft.make_sharded_train_step(loss, opt, mesh)
            losses = []
            for s, b in enumerate(data):
                a_s, s_s, m = mstep(p_s, a_s, s_s, b, jax.random.key(s))
                losses.append(float(m["loss"]))
            rec[f"{tag}/split_after"] = split_leaves(a_s)
            rec[f"{tag}/loss_diff"] = float(np.max(np.abs(np.array(losses) - np.array(ref_losses))))
            rec[f"{tag}/adapter_diff"] = max_diff(host(a_s), ref)
            # Adam's moments (and AdaLoRA's sensitivity averages and kept triplets): scale-sensitive, where
            # Adam's normalised update is not (a gradient off by a constant factor would move the adapter alike)
            rec[f"{tag}/opt_state_rel_diff"] = rel_diff(host(s_s), ref_state)
            if name == "adalora":
                rec[f"{tag}/rank_pattern"] = config.trained_config(s_s).rank_pattern
            if tag == "2x4":  # saved from the mesh, loaded on one device
                folder = os.path.join(out_dir, name)
                jpeft.save_adapter(folder, config.trained_config(s_s), a_s, params=p_s)
                _, back = jpeft.load_adapter(folder, params)
                rec["saved/diff"] = max_diff(host(back), host(a_s))
                rec["saved/same_tree"] = jax.tree.structure(back) == jax.tree.structure(ad0)
        rec["cpu_seconds"] = time.process_time() - c0
        out["cases"][name] = rec
    out["seconds"], out["cpu_seconds"] = time.perf_counter() - t0, time.process_time() - c0
    return out


if __name__ == "__main__":
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    result = run(sys.argv[1])
    print("JSON:" + json.dumps(result))
