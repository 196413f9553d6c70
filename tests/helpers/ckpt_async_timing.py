"""How long CheckpointManager.save() holds the training loop, sync vs async, for LoRA r=8 on q/v
of the 109.6M-parameter base of tests/test_checkpoint.py (adapter + Adam state, 3.5 MB).
A 0.5 s pause stands in for the training steps between saves.

    python tests/helpers/ckpt_async_timing.py
"""

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import jpeft  # noqa: E402
from test_checkpoint import _big_model  # noqa: E402


def main():
    m = _big_model()
    abstract = jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    cfg = jpeft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"])
    opt = optax.adam(1e-3)
    adapter = jpeft.init(cfg, abstract, jax.random.key(1))
    state = opt.init(adapter)
    for async_save in (False, True, False, True):
        with jpeft.checkpoint.CheckpointManager(tempfile.mkdtemp(), cfg, abstract, optimizer=opt, async_save=async_save) as mg:
            held = []
            for s in range(1, 6):
                time.sleep(0.5)
                t = time.perf_counter()
                mg.save(s, adapter, state, jax.random.key(0))
                held.append(time.perf_counter() - t)
            t = time.perf_counter()
            mg.wait()
            tail = time.perf_counter() - t
        print(f"{'async' if async_save else 'sync '}: save() holds the loop {sorted(held)[2]:.3f} s (median of 5); "
              f"final wait {tail:.3f} s")


if __name__ == "__main__":
    main()
