"""Subprocess of tests/test_checkpoint.py: a fresh process restores the latest checkpoint in
argv[1], trains up to argv[3] steps, and writes the losses (float.hex) and the final adapter
into argv[2]."""

import json
import os
import sys

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")

import ckpt_common as C  # noqa: E402
import jpeft  # noqa: E402


def main():
    ckpt_dir, out_dir, total = sys.argv[1], sys.argv[2], int(sys.argv[3])
    params, cfg, _, opt, _, _ = C.setup()
    with jpeft.checkpoint.CheckpointManager(ckpt_dir, cfg, params, optimizer=opt, async_save=False) as mngr:
        state = mngr.restore_latest()
        step = jpeft.make_train_step(C.loss_fn(), opt)
        res = jpeft.fit(step, params, state.adapter, state.opt_state, C.batches(state.data_position, total),
                        key=state.key, start_step=state.step, data_position=state.data_position)
    jpeft.save_adapter(os.path.join(out_dir, "adapter"), cfg, res.adapter, params=params)
    with open(os.path.join(out_dir, "losses.json"), "w") as f:
        json.dump({"start": state.step, "losses": [float(h["loss"]).hex() for h in res.history]}, f)


if __name__ == "__main__":
    main()
