"""Subprocess of tests/test_checkpoint.py (run with XLA_FLAGS=--xla_force_host_platform_device_count
set by the parent). argv: mode, checkpoint dir, reference dir.

* save8: trains 2 steps, shards adapter and Adam state over an 8-device mesh, saves step 2,
  writes the host values as a reference adapter.
* restore1: on 1 device, restores step 2 with no template (default: first device), checks the
  values against the reference, trains 2 more steps, saves step 4 and its reference.
* restore8: on 8 devices, restores step 4 with target shardings over the mesh, checks that the
  arrays are really split over 8 devices and equal the reference, and runs one step on the mesh.
Prints one JSON line."""

import json
import os
import sys

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import ckpt_common as C
import jpeft


def spec(shape):
    if len(shape) >= 1 and shape[0] % 8 == 0:
        return P("x")
    if len(shape) == 2 and shape[1] % 8 == 0:
        return P(None, "x")
    return P()


def main():
    mode, ckpt, ref = sys.argv[1], sys.argv[2], sys.argv[3]
    params, cfg, adapter, opt, opt_state, key = C.setup()
    step_fn = jpeft.make_train_step(C.loss_fn(), opt, donate=False)
    out = {"mode": mode, "devices": jax.device_count()}
    mngr = jpeft.checkpoint.CheckpointManager(ckpt, cfg, params, optimizer=opt, async_save=False)
    if mode == "save8":
        res = jpeft.fit(step_fn, params, adapter, opt_state, C.batches(0, 2), key=key)
        mesh = Mesh(np.array(jax.devices()), ("x",))
        put = lambda x: jax.device_put(x, NamedSharding(mesh, spec(x.shape)))  # noqa: E731
        a8, o8 = jax.tree.map(put, res.adapter), jax.tree.map(put, res.opt_state)
        out["sharded_leaves"] = sum(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
                                    for x in jax.tree.leaves((a8, o8)))
        mngr.save(2, a8, o8, key, data_position=2)
        jpeft.save_adapter(os.path.join(ref, "step2"), cfg, res.adapter, params=params)
    elif mode == "restore1":
        st = mngr.restore(2)
        _, want = jpeft.load_adapter(os.path.join(ref, "step2"), params)
        out["equal"] = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(st.adapter), jax.tree.leaves(want)))
        out["single_device"] = all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves((st.adapter, st.opt_state)))
        res = jpeft.fit(step_fn, params, st.adapter, st.opt_state, C.batches(2, 4), key=st.key, start_step=2, data_position=2)
        mngr.save(4, res.adapter, res.opt_state, st.key, data_position=res.data_position)
        jpeft.save_adapter(os.path.join(ref, "step4"), cfg, res.adapter, params=params)
        jpeft.save_adapter(os.path.join(ref, "step4_mu"), cfg, res.opt_state[0].mu, params=params)
    elif mode == "restore8":
        mesh = Mesh(np.array(jax.devices()), ("x",))
        st = mngr.restore(4, shardings=lambda name, shape: NamedSharding(mesh, spec(shape)))
        _, want = jpeft.load_adapter(os.path.join(ref, "step4"), params)
        _, want_mu = jpeft.load_adapter(os.path.join(ref, "step4_mu"), params)
        leaves = jax.tree.leaves((st.adapter, st.opt_state))
        out["equal"] = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(st.adapter), jax.tree.leaves(want)))
        out["mu_equal"] = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(st.opt_state[0].mu), jax.tree.leaves(want_mu)))
        out["sharded_leaves"] = sum(len(x.addressable_shards) == 8 and not x.sharding.is_fully_replicated for x in leaves)
        out["all_on_mesh"] = all(len(x.sharding.device_set) == 8 for x in leaves)
        p8 = jax.device_put(params, NamedSharding(mesh, P()))
        a, o, m = step_fn(p8, st.adapter, st.opt_state, C.batch(4), jax.random.fold_in(st.key, 5))
        out["step_on_mesh_finite"] = bool(np.isfinite(float(m["loss"])))
    mngr.close()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
