"""Subprocess of tests/test_checkpoint.py: for each directory in argv, opens a new
CheckpointManager (which removes incomplete checkpoints), restores the latest step and checks
that every leaf equals the step. Prints one JSON line per directory."""

import json
import os
import sys

import jax
import numpy as np

import ckpt_common as C
import jpeft


def main():
    params, cfg, _, opt, _, _ = C.setup()
    for d in sys.argv[1:]:
        before = sorted(n for n in os.listdir(d) if "tmp" in n)
        out = {"dir": d, "incomplete_before": before}
        try:
            with jpeft.checkpoint.CheckpointManager(d, cfg, params, optimizer=opt, async_save=False) as mngr:
                st = mngr.restore_latest()
                out["steps"] = mngr.all_steps()
            leaves = jax.tree.leaves(st.adapter) + jax.tree.leaves(st.opt_state)
            out["step"] = st.step
            out["complete"] = bool(all(np.all(np.asarray(x) == st.step) for x in leaves)) and st.data_position == 10 * st.step
            out["n_leaves"] = len(leaves)
        except Exception as e:  # reported to the test, which fails on it
            out["error"] = f"{type(e).__name__}: {e}"
        out["incomplete_after"] = sorted(n for n in os.listdir(d) if "tmp" in n)
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
