"""Subprocess of tests/test_checkpoint.py: saves checkpoints in a tight loop until it is
SIGKILLed. Step s holds adapter and optimizer leaves all equal to s, so a reader can tell a
complete checkpoint from a partial one. Prints "ready" once step 1 is on disk.
argv: directory, "sync" | "async"."""

import sys

import jax
import jax.numpy as jnp

import ckpt_common as C
import jpeft


def state_at(step, adapter, opt_state):
    fill = lambda x: jnp.full(x.shape, step, x.dtype)  # noqa: E731
    return jax.tree.map(fill, adapter), jax.tree.map(fill, opt_state)


def main():
    directory, mode = sys.argv[1], sys.argv[2]
    params, cfg, adapter, opt, opt_state, key = C.setup()
    mngr = jpeft.checkpoint.CheckpointManager(directory, cfg, params, optimizer=opt, keep_last=2,
                                              async_save=(mode == "async"))
    step = 1
    while True:
        a, o = state_at(step, adapter, opt_state)
        mngr.save(step, a, o, key, data_position=10 * step)
        if step == 1:
            mngr.wait()
            print("ready", flush=True)
        step += 1


if __name__ == "__main__":
    main()
