#!/usr/bin/env python
"""Step time and per-device memory of jpeft's scale-out strategies, as ratios to one device.

Strategies (same model, same global batch, same LoRA adapter, Adam):

  one device         jpeft.make_train_step
  pmap x8            jpeft.make_pmap_train_step (base replicated, lax.pmean of gradients)
  mesh data=8        jpeft.make_sharded_train_step, base replicated
  mesh 2x4 fsdp      data=2 x fsdp=4: base sharded 4 ways
  mesh 1x8 fsdp      fsdp=8: base sharded 8 ways
  accumulate x4      one device, 4 micro-batches per step (lax.scan)
  remat              one device, jax.checkpoint over each block (policy "full")
  bf16 base+compute  one device, base stored and computed in bfloat16, adapter/Adam in f32

Memory is XLA's own buffer assignment for the compiled step, per device:
``argument + output - aliased + temporaries`` from ``compiled.memory_analysis()``; it is
what one accelerator would have to hold. "XLA FLOPs" is the compiled per-device
program's own cost analysis (does not depend on machine load). "Frozen base on device 0" counts the bytes of the
base's shards that live on the first device (what FSDP divides). Step time is the median wall time of ``--steps``
steps after one warm-up step (the compile).

The eight devices are emulated on the host CPU
(``--xla_force_host_platform_device_count=8``, set here before JAX is imported) and share
its cores, so step-time ratios above 1 are expected here: they measure the partitioning and
collective overhead, not the speed-up that eight real chips would give. Memory ratios carry
over to real devices.

    python benchmarks/bench_parallel.py                      # markdown table
    python benchmarks/bench_parallel.py --width 128 --layers 4 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Step time and per-device memory of jpeft's scale-out strategies on 8 emulated CPU devices.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--devices", type=int, default=8, help="emulated CPU devices")
    p.add_argument("--width", type=int, default=64, help="hidden width of the demo transformer")
    p.add_argument("--layers", type=int, default=2, help="blocks")
    p.add_argument("--seq", type=int, default=32, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=32, help="global batch (sequences)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--steps", type=int, default=10, help="timed steps per strategy (after one warm-up)")
    p.add_argument("--only", nargs="*", help="run only these strategies (by key, e.g. single pmap fsdp4)")
    p.add_argument("--json", help="also write the results here")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices} " + os.environ.get("XLA_FLAGS", "")
    import importlib.util

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from tqdm import tqdm

    import jpeft

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("_train_multihost", os.path.join(root, "tpu", "train_multihost.py"))
    S = importlib.util.module_from_spec(spec)
    sys.modules["_train_multihost"] = S  # linen dataclasses look their module up
    spec.loader.exec_module(S)

    n = jax.device_count()
    data = S.corpus()
    batches = [{"tokens": S.global_rows(data, i, args.batch, args.seq)} for i in range(args.steps + 1)]
    optimizer = optax.adam(1e-3)
    key = jax.random.key(0)

    def build(remat=None):
        model = S.build_model(d=args.width, layers=args.layers, remat=remat)
        params = S.init_base(model, args.seq)
        adapter = jpeft.init(S.lora_config(args.rank), params, jax.random.key(1))
        return model, params, adapter, S.make_loss(model)

    def base_bytes(params) -> int:
        """Bytes of the frozen base held by the first device."""
        d0 = jax.devices()[0]
        total = 0
        for x in jax.tree.leaves(params):
            for sh in x.addressable_shards:
                if sh.device == d0:
                    total += sh.data.nbytes
        return total

    def flops(compiled) -> float:
        """XLA's FLOP count of the compiled (per-device) step: independent of machine load."""
        c = compiled.cost_analysis()
        c = c[0] if isinstance(c, (list, tuple)) else c
        return float(c.get("flops", float("nan")))

    def mem(compiled) -> int:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)

    def timed(call, state):
        times = []
        for i in range(args.steps + 1):
            t0 = time.perf_counter()
            state = call(state, batches[i], jax.random.fold_in(key, i))
            jax.block_until_ready(state)
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:]), times[0]

    def single(remat=None, accumulate=1, bf16=False):
        model, params, adapter, loss_fn = build(remat)
        if bf16:
            params = jpeft.cast_base(params, jnp.bfloat16)
            loss_fn = jpeft.with_precision(loss_fn, jnp.bfloat16)
        step = jpeft.make_train_step(loss_fn, optimizer, accumulate_steps=accumulate)
        opt_state = optimizer.init(adapter)
        b0 = jax.tree.map(jnp.asarray, batches[0])
        compiled = step.lower(params, adapter, opt_state, b0, key).compile()
        t, first = timed(lambda st, b, k: step(params, *st, b, k)[:2], (adapter, opt_state))
        return t, mem(compiled), first, flops(compiled), base_bytes(jax.device_put(params, jax.devices()[0]))

    def pmap():
        model, params, adapter, loss_fn = build()
        step = jpeft.make_pmap_train_step(loss_fn, optimizer)
        p_r, a_r, s_r = jpeft.replicate(params), jpeft.replicate(adapter), jpeft.replicate(optimizer.init(adapter))
        compiled = step.lower(p_r, a_r, s_r, jpeft.split_for_pmap(batches[0]), key).compile()
        t, first = timed(lambda st, b, k: step(p_r, *st, jpeft.split_for_pmap(b), k)[:2], (a_r, s_r))
        # pmap's compiled module is the per-device program
        return t, mem(compiled), first, flops(compiled), base_bytes(p_r)

    def mesh(data_axis, fsdp):
        model, params, adapter, loss_fn = build()
        m = jpeft.make_mesh(data=data_axis, fsdp=fsdp)
        p = jpeft.shard_params(params, m)
        a = jpeft.shard_adapter(adapter, m, p)
        s = jpeft.init_opt_state(optimizer, a)
        step = jpeft.make_sharded_train_step(loss_fn, optimizer, m)
        compiled = step.lower(p, a, s, batches[0], key).compile()
        t, first = timed(lambda st, b, k: step(p, *st, b, k)[:2], (a, s))
        return t, mem(compiled), first, flops(compiled), base_bytes(p)

    strategies = {
        "single": ("one device", lambda: single()),
        "pmap": (f"pmap x{n}", pmap),
        "dp": (f"mesh data={n}", lambda: mesh(n, 1)),
        "fsdp4": (f"mesh {n // 4}x4 (data x fsdp)", lambda: mesh(n // 4, 4)),
        "fsdp8": (f"mesh 1x{n} (fsdp={n})", lambda: mesh(1, n)),
        "accum4": ("one device, accumulate x4", lambda: single(accumulate=4)),
        "remat": ("one device, remat (full)", lambda: single(remat="full")),
        "bf16": ("one device, bf16 base + compute", lambda: single(bf16=True)),
    }
    keys = [k for k in strategies if not args.only or k in args.only]
    if "single" not in keys:
        keys.insert(0, "single")
    results = {}
    for k in tqdm(keys, desc="strategies", file=sys.stderr):
        t, m, first, fl, bb = strategies[k][1]()
        results[k] = {"name": strategies[k][0], "step_s": t, "mem_bytes": m, "first_step_s": first, "flops": fl,
                      "base_bytes": bb}
    base = results["single"]
    print(f"model: demo transformer width={args.width} layers={args.layers}, LoRA r={args.rank} on 5 projections/block, "
          f"Adam; global batch {args.batch} x {args.seq} tokens; {n} emulated CPU devices; jax {jax.__version__}")
    print()
    print("| strategy | step time (ms) | step time / one device | XLA FLOPs per device / one device "
          "| memory per device (KiB) | memory / one device | frozen base on device 0 (KiB) | base / one device |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for k in keys:
        r = results[k]
        print(f"| {r['name']} | {1e3 * r['step_s']:.1f} | {r['step_s'] / base['step_s']:.2f} | "
              f"{r['flops'] / base['flops']:.3f} | "
              f"{r['mem_bytes'] / 1024:.0f} | {r['mem_bytes'] / base['mem_bytes']:.2f} | "
              f"{r['base_bytes'] / 1024:.0f} | {r['base_bytes'] / base['base_bytes']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
