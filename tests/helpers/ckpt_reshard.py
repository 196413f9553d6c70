"""Subprocess of tests/test_checkpoint.py (run with XLA_FLAGS=--xla_force_host_platform_device_count
set by the parent). argv: mode, checkpoint dir, reference dir.

* save8: changes adapter and Adam state deterministically, shards them over an 8-device mesh,
  saves step 2, writes the host values as a reference adapter.
* restore1: on 1 device, restores step 2 with no template (default: first device), checks the
  values against the reference, changes them again, saves step 4 and its reference.
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


def perturbed(tree, seed):
    """A deterministic, non-trivial change of every float leaf (integer leaves: +seed)."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) if jax.numpy.issubdtype(x.dtype, jax.numpy.floating) else x + seed
           for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, out)


def main():
    mode, ckpt, ref = sys.argv[1], sys.argv[2], sys.argv[3]
    params, cfg, adapter, opt, opt_state, key = C.setup()
    step_fn = jpeft.make_train_step(C.loss_fn(), opt, donate=False)
    out = {"mode": mode, "devices": jax.device_count()}
    mngr = jpeft.checkpoint.CheckpointManager(ckpt, cfg, params, optimizer=opt, async_save=False)
    if mode == "save8":
        a2, o2 = perturbed(adapter, 2), perturbed(opt_state, 2)
        mesh = Mesh(np.array(jax.devices()), ("x",))
        put = lambda x: jax.device_put(x, NamedSharding(mesh, spec(x.shape)))  # noqa: E731
        a8, o8 = jax.tree.map(put, a2), jax.tree.map(put, o2)
        out["sharded_leaves"] = sum(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
                                    for x in jax.tree.leaves((a8, o8)))
        mngr.save(2, a8, o8, key, data_position=2)
        jpeft.save_adapter(os.path.join(ref, "step2"), cfg, a2, params=params)
    elif mode == "restore1":
        st = mngr.restore(2)
        _, want = jpeft.load_adapter(os.path.join(ref, "step2"), params)
        out["equal"] = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(st.adapter), jax.tree.leaves(want)))
        out["single_device"] = all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves((st.adapter, st.opt_state)))
        a4, o4 = perturbed(st.adapter, 4), perturbed(st.opt_state, 4)
        mngr.save(4, a4, o4, st.key, data_position=4)
        jpeft.save_adapter(os.path.join(ref, "step4"), cfg, a4, params=params)
        jpeft.save_adapter(os.path.join(ref, "step4_mu"), cfg, o4[0].mu, params=params)
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
