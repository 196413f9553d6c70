"""Shared pieces of the scale-out tests (issue 5): the demo model, data and loss of
``tpu/train_multihost.py`` (one definition, loaded from the script), and the single-device
reference run. Imported by tests/test_parallel.py and by the subprocess helpers; importing
it has no side effects (pytest's doctest collection imports every module under tests/)."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tpu", "train_multihost.py")

# The sizes every parallel test uses: every dimension divisible by 4 (fsdp) and 8 (data).
WIDTH, LAYERS, SEQ, BATCH, RANK = 16, 1, 8, 16, 4


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a ``jax.distributed`` coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(commands, *, env, timeout: float = 300, cwd: str = ROOT, stdin=None) -> tuple[list[str], list[int]]:
    """Runs one process per command at once (stdout and stderr together), waits for each and kills
    any still running after ``timeout`` seconds (or an error); ``(outputs, return codes)``.
    ``stdin``: the text each process reads from its standard input (what is typed at its prompt)."""
    procs = [subprocess.Popen(c, env=env, cwd=cwd, stdin=None if stdin is None else subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in commands]
    try:
        for p, text in zip(procs, stdin or ()):  # every process's whole input first: each may wait for another's
            p.stdin.write(text)
            p.stdin.close()  # a prompt reading a pipe reads up to its end
            p.stdin = None  # communicate then only reads
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outs, [p.returncode for p in procs]


def script():
    """The ``tpu/train_multihost.py`` module (loaded once, not run)."""
    mod = sys.modules.get("_jpeft_train_multihost")
    if mod is None:
        spec = importlib.util.spec_from_file_location("_jpeft_train_multihost", SCRIPT)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["_jpeft_train_multihost"] = mod
        spec.loader.exec_module(mod)
    return mod


def setup(width=WIDTH, layers=LAYERS, seq=SEQ, rank=RANK, seed=0, remat=None):
    """``(model, params, adapter, loss_fn)``, exactly as the script builds them (unsharded)."""
    import jax

    import jpeft

    s = script()
    model = s.build_model(d=width, layers=layers, remat=remat)
    params = s.init_base(model, seq, seed)
    adapter = jpeft.init(s.lora_config(rank), params, jax.random.key(seed + 1))
    return model, params, adapter, s.make_loss(model)


def batches(steps, batch=BATCH, seq=SEQ, seed=0):
    import numpy as np

    s = script()
    data = s.corpus()
    return [{"tokens": np.asarray(s.global_rows(data, i, batch, seq, seed))} for i in range(steps)]


def random_adapter(adapter, seed=7):
    """The adapter with B (zero at init) replaced by small random values, so the first steps
    already move every factor and gradients are not trivially zero for A."""
    import dataclasses

    import jax

    out = {}
    for i, (path, node) in enumerate(sorted(adapter.items())):
        b = 0.05 * jax.random.normal(jax.random.key(seed + i), node.lora_B.shape, node.lora_B.dtype)
        out[path] = dataclasses.replace(node, lora_B=b)
    return out


def single_device_run(loss_fn, optimizer, params, adapter, data, *, key_seed=0, accumulate_steps=1,
                      loss_weight=None):
    """Reference: ``jpeft.make_train_step`` on one device; returns (losses, adapter)."""
    import jax

    import jpeft

    step = jpeft.make_train_step(loss_fn, optimizer, donate=False, accumulate_steps=accumulate_steps,
                                 loss_weight=loss_weight)
    opt_state = optimizer.init(adapter)
    key = jax.random.key(key_seed)
    losses = []
    for i, b in enumerate(data):
        adapter, opt_state, m = step(params, adapter, opt_state, b, jax.random.fold_in(key, i))
        losses.append(float(m["loss"]))
    return losses, adapter


def max_diff(a, b) -> float:
    import jax
    import numpy as np

    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))) for x, y in zip(la, lb))


def token_mean_loss(model):
    """A per-token mean over ``batch["mask"]`` (rows with different numbers of loss tokens,
    as padding and prompt/completion masks make them), with the count as the aux metric
    ``targets``: the case where micro-batches and devices must count by their tokens."""
    import jax.numpy as jnp
    import optax

    import jpeft

    def loss_fn(params, adapter, batch, key):
        tokens, mask = batch["tokens"], batch["mask"].astype(jnp.float32)
        logits = jpeft.apply(model, params, adapter, tokens[:, :-1])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tokens[:, 1:])
        n = mask.sum()
        return (ce * mask).sum() / jnp.maximum(n, 1.0), {"targets": n}

    return loss_fn


def with_uneven_masks(data):
    """``data`` with a ``mask [batch, targets]`` (``targets`` = tokens per row - 1) whose row
    ``i`` keeps its last ``1 + (5 * i) % targets`` targets, so every strided micro-batch and
    every device shard holds a different number of loss tokens."""
    import numpy as np

    out = []
    for b in data:
        n, t = b["tokens"].shape[0], b["tokens"].shape[1] - 1
        keep = 1 + (5 * np.arange(n)) % t
        mask = (np.arange(t)[None, :] >= (t - keep)[:, None]).astype(np.float32)
        out.append({**b, "mask": mask})
    return out
