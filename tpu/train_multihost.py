#!/usr/bin/env python
"""Multi-host LoRA fine-tuning with jpeft: the same script runs on every process.

Runs on a TPU VM pod slice (one process per host, ``--cluster-auto``), on multi-node GPUs
(one process per node or per GPU, e.g. under SLURM, see ``tpu/slurm_gpu.sbatch``) or as
several processes on one machine (``--coordinator 127.0.0.1:PORT``; CPU processes use the
gloo collectives). Without a coordinator it is a plain single-process run.

What each process does:

1. ``jpeft.distributed.initialize`` joins the job;
2. a ``(data, fsdp)`` mesh spans the devices of all processes; the frozen base is created
   directly sharded (``jax.jit`` with ``out_shardings`` from ``jpeft.param_shardings``; no
   process ever holds a full copy), optionally stored in bfloat16;
3. the LoRA adapter and the Adam state are created in place, laid out like their base
   weights;
4. each step, every process builds only its rows of the global batch
   (``process_slice``), ``global_batch`` assembles the global array, and
   :func:`jpeft.fit` (the one training loop: non-finite guard, validation, progress,
   logging) runs the jitted sharded step;
5. process 0 logs; every process takes part in writing the adapter to ``--out`` with
   :func:`jpeft.save_adapter` (``gather=jpeft.distributed.gather_array``: one array gathered at a
   time and written by process 0, so no process holds the whole adapter), which
   :func:`jpeft.load_adapter` reads back.

The model is ``--model tiny``: a small byte-level transformer defined below, so the script
runs anywhere without downloads; swap ``build_model`` for your own linen model.

Examples::

    # one process, all local devices, 2-way FSDP
    python tpu/train_multihost.py --steps 20 --fsdp 2 --out /tmp/adapter

    # two processes on this machine
    python tpu/train_multihost.py --coordinator 127.0.0.1:12355 --num-processes 2 --process-id 0 &
    python tpu/train_multihost.py --coordinator 127.0.0.1:12355 --num-processes 2 --process-id 1

    # every worker of a TPU pod slice (see tpu/launch_pod.sh)
    python tpu/train_multihost.py --cluster-auto --fsdp 4 --param-dtype bfloat16 --compute-dtype bfloat16
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="train_multihost.py",
        description="Multi-host LoRA fine-tuning with jpeft (run the same command on every process).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Single process: omit --coordinator. Processes on one machine: --coordinator 127.0.0.1:PORT "
        "--num-processes N --process-id I. TPU pods / SLURM: --cluster-auto.",
    )
    g = p.add_argument_group("job")
    g.add_argument("--coordinator", help="host:port of process 0 (omit for one process or with --cluster-auto)")
    g.add_argument("--num-processes", type=int, help="number of processes in the job")
    g.add_argument("--process-id", type=int, help="index of this process, 0..N-1")
    g.add_argument("--cluster-auto", action="store_true",
                   help="let JAX detect the cluster (TPU VM pod slices, SLURM, Open MPI)")
    g = p.add_argument_group("parallelism")
    g.add_argument("--fsdp", type=int, default=1, help="size of the mesh axis the frozen base is sharded over")
    g.add_argument("--accumulate-steps", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16"], help="storage dtype of the frozen base")
    g.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of the forward pass")
    g.add_argument("--remat", default=None, help="rematerialize each block with this policy (full, dots_saveable, ...)")
    g = p.add_argument_group("training")
    g.add_argument("--model", default="tiny", choices=["tiny"], help="the base model")
    g.add_argument("--width", type=int, default=32, help="hidden width of the tiny model")
    g.add_argument("--layers", type=int, default=2, help="blocks of the tiny model")
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--global-batch", type=int, default=16, help="sequences per step over all processes")
    g.add_argument("--seq-len", type=int, default=32)
    g.add_argument("--lr", type=float, default=1e-2)
    g.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    g.add_argument("--rank", type=int, default=4, help="LoRA rank")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("output")
    g.add_argument("--out", help="directory for the adapter (jpeft.save_adapter's format, written by process 0; "
                   "one holding an earlier adapter is replaced)")
    g.add_argument("--write-every-process", action="store_true",
                   help="every process also writes adapter.process<I>.npz and losses.process<I>.json to --out "
                   "(to check that all processes agree)")
    g.add_argument("--log-every", type=int, default=1)
    return p.parse_args(argv)


# ------------------------------------------------------------------------ the demo model
def _modules():
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    import jpeft

    class Block(nn.Module):
        d: int
        heads: int

        @nn.compact
        def __call__(self, x):
            b, t, d = x.shape
            hd = d // self.heads
            h = nn.LayerNorm(name="ln1")(x)
            q = nn.Dense(d, name="q_proj")(h).reshape(b, t, self.heads, hd)
            k = nn.Dense(d, name="k_proj")(h).reshape(b, t, self.heads, hd)
            v = nn.Dense(d, name="v_proj")(h).reshape(b, t, self.heads, hd)
            s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.asarray(hd, q.dtype))
            causal = jnp.tril(jnp.ones((t, t), bool))
            s = jnp.where(causal[None, None], s, jnp.finfo(s.dtype).min)
            a = jax.nn.softmax(s.astype(jnp.float32), axis=-1).astype(v.dtype)
            o = jnp.einsum("bhqk,bkhd->bqhd", a, v).reshape(b, t, d)
            x = x + nn.Dense(d, name="o_proj")(o)
            h = nn.LayerNorm(name="ln2")(x)
            h = nn.Dense(4 * d, name="up_proj")(h)
            return x + nn.Dense(d, name="down_proj")(nn.gelu(h))

    class TinyLM(nn.Module):
        """A byte-level decoder: ``embed``, ``layers_{i}`` (each optionally rematerialized),
        ``ln_f``, ``lm_head``."""

        vocab: int = 256
        d: int = 32
        layers: int = 2
        heads: int = 4
        remat: bool = False
        remat_policy: str = "full"

        @nn.compact
        def __call__(self, tokens):
            x = nn.Embed(self.vocab, self.d, name="embed")(tokens)
            block = jpeft.remat(Block, self.remat_policy) if self.remat else Block
            for i in range(self.layers):
                x = block(self.d, self.heads, name=f"layers_{i}")(x)
            x = nn.LayerNorm(name="ln_f")(x)
            return nn.Dense(self.vocab, name="lm_head")(x)

    return Block, TinyLM


def build_model(vocab=256, d=32, layers=2, heads=4, remat=None):
    """The demo base model (any flax.linen model works the same way)."""
    _, TinyLM = _modules()
    return TinyLM(vocab, d, layers, heads, remat=remat is not None, remat_policy=remat or "full")


def corpus():
    """Bytes of the Python documentation topics (English prose shipped with Python)."""
    import numpy as np
    import pydoc_data.topics as t

    text = "\n".join(t.topics[k] for k in sorted(t.topics))
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)


def global_rows(data, step: int, global_batch: int, seq_len: int, seed: int = 0):
    """The token windows ``[global_batch, seq_len + 1]`` of step ``step``: the same on every
    process (a seeded choice of offsets), so each process can take its own rows."""
    import numpy as np

    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(data) - seq_len - 1, size=global_batch)
    return np.stack([data[s:s + seq_len + 1] for s in starts])


def make_loss(model):
    """Mean next-token cross-entropy of the adapted model."""
    import jax.numpy as jnp
    import optax

    import jpeft

    def loss_fn(params, adapter, batch, key):
        tokens = batch["tokens"]
        logits = jpeft.apply(model, params, adapter, tokens[:, :-1])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tokens[:, 1:])
        return jnp.mean(ce)

    return loss_fn


def lora_config(rank=4):
    import jpeft

    return jpeft.LoraConfig(r=rank, alpha=2 * rank, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"])


def make_optimizer(name, lr):
    import optax

    return optax.adam(lr) if name == "adam" else optax.sgd(lr)


def init_base(model, seq_len, seed=0):
    """Unsharded base variables (for single-device references)."""
    import jax
    import jax.numpy as jnp

    return model.init(jax.random.key(seed), jnp.zeros((1, seq_len), jnp.int32))


# -------------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    import jax

    from jpeft import distributed as dist

    info = dist.initialize(args.coordinator, args.num_processes, args.process_id, auto=args.cluster_auto or None)

    import jax.numpy as jnp
    import numpy as np

    import jpeft

    dist.log(f"jpeft multihost: {info['process_count']} process(es), {info['global_devices']} devices "
             f"({info['local_devices']} local), backend {jax.default_backend()}")
    mesh = jpeft.make_mesh(fsdp=args.fsdp)
    model = build_model(d=args.width, layers=args.layers, remat=args.remat)
    dummy = jnp.zeros((1, args.seq_len), jnp.int32)

    # The frozen base, created directly sharded: no process holds a full copy.
    init_fn = lambda k: jpeft.cast_base(model.init(k, dummy), args.param_dtype)
    key = jax.random.key(args.seed)
    shapes = jax.eval_shape(init_fn, key)
    p_shard = jpeft.param_shardings(shapes, mesh)
    params = jax.jit(init_fn, out_shardings=p_shard)(key)

    # The adapter and optimizer state, laid out like their base weights.
    config = lora_config(args.rank)
    a_key = jax.random.key(args.seed + 1)
    ad_fn = lambda p, k: jpeft.init(config, p, k)
    a_shard = jpeft.adapter_shardings(jax.eval_shape(ad_fn, params, a_key), mesh, p_shard)
    adapter = jax.jit(ad_fn, out_shardings=a_shard)(params, a_key)
    optimizer = make_optimizer(args.optimizer, args.lr)
    opt_state = jpeft.init_opt_state(optimizer, adapter)

    loss_fn = make_loss(model)
    if args.compute_dtype != "float32":
        loss_fn = jpeft.with_precision(loss_fn, args.compute_dtype)
    step = jpeft.make_sharded_train_step(loss_fn, optimizer, mesh, accumulate_steps=args.accumulate_steps)

    data = corpus()

    def batches():
        for i in itertools.count():
            rows = global_rows(data, i, args.global_batch, args.seq_len, args.seed)
            local = dist.host_local_batch({"tokens": rows})  # in a real loader: read only these rows
            yield dist.global_batch(local, mesh)

    def log(rec):
        dist.log(f"step {rec['step']:4d}  loss {rec['loss']:.5f}  grad_norm {rec['grad_norm']:.4f}")

    t0 = time.perf_counter()
    result = jpeft.fit(step, params, adapter, opt_state, batches(), key=key, num_steps=args.steps,
                       token_key="tokens", progress=dist.is_main_process(), desc="train",
                       log=log if args.log_every else None, log_every=args.log_every)
    adapter = result.adapter
    losses = [h["loss"] for h in result.history]
    dist.log(f"{args.steps} steps in {time.perf_counter() - t0:.2f} s")

    if args.out:
        # every process takes part: each array is gathered in turn (a collective) and written by process 0,
        # so no process holds the whole adapter on its host
        jpeft.save_adapter(args.out, config, adapter, params=params, overwrite=True, gather=dist.gather_array,
                           metadata={"steps": args.steps})
        dist.log(f"adapter written to {args.out}")
        if args.write_every_process:
            dist.barrier("jpeft_adapter_written")  # process 0's folder is in place before files join it
            host = dist.gather(adapter)  # a check that every process ends with the same adapter: each holds it all
            pi = jax.process_index()
            flat = {f"{p}.{n}": np.asarray(getattr(node, n)) for p, node in host.items() for n in ("lora_A", "lora_B")}
            np.savez(os.path.join(args.out, f"adapter.process{pi}.npz"), **flat)
            with open(os.path.join(args.out, f"losses.process{pi}.json"), "w") as f:
                json.dump({"losses": losses, **info}, f)
    dist.barrier("jpeft_done")
    dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
