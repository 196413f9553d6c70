"""A Dense layer's weight gradient ``x^T dy`` alone on the CPU: as JAX's autodiff builds it
for a plain ``lax.dot_general`` against jpeft's ``flat_dot_general``, which for weights at
least 2,048 features wide (and 512 deep) multiplies a transposed copy of ``x`` instead
(docs/BENCHMARKS.md, "Session 31"; docs/MODELS.md).

For each shape ``tokens x in x out``, both are the pullback of ``x @ w`` with respect to ``w``
only (``jax.vjp``), jitted, applied to the same random ``dy``. Rounds alternate which runs
first; each round times ``--reps`` back-to-back calls of each and keeps their median; the table
gives the median over rounds, GFLOP/s and the ratio jpeft / plain, and which path jpeft took
(``copy`` or ``plain``). A kernel timing in one process (both are JAX), not a training step:
``bench_scaling.py --axes mode`` measures the full fine-tuning step.

Examples:
  python benchmarks/weight_grad_cpu.py                                 # the issue Llama's shapes and wider ones
  python benchmarks/weight_grad_cpu.py --shapes 4096x512x8192 --rounds 5
  python benchmarks/weight_grad_cpu.py --shapes 64x512x2048 --rounds 1 --reps 2   # seconds (smoke)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

DEFAULT_SHAPES = ("4096x512x512,4096x512x1376,4096x1376x512,4096x512x2048,4096x512x8192,"
                  "2048x2048x2048,1024x4096x4096,2048x5632x2048,4096x512x32000")


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    out = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise SystemExit(f"--shapes: expected TOKENSxINxOUT items such as 4096x512x8192, got {item!r}")
        out.append(tuple(int(p) for p in parts))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated TOKENSxINxOUT (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, alternating which variant runs first (default 3)")
    p.add_argument("--reps", type=int, default=7, help="back-to-back calls timed per variant and round (default 7)")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    shapes = parse_shapes(args.shapes)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jpeft import _ops

    if jax.default_backend() != "cpu":
        print(f"note: the default backend is {jax.default_backend()}; jpeft takes the copy path on the CPU only",
              file=sys.stderr)
    dims = (((1,), (0,)), ((), ()))
    rows = []
    for tokens, n_in, n_out in shapes:
        k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(k1, (tokens, n_in), jnp.float32)
        w = jax.random.normal(k2, (n_in, n_out), jnp.float32)
        dy = jax.random.normal(k3, (tokens, n_out), jnp.float32)

        def pullback(product):
            return jax.jit(lambda x, w, dy: jax.vjp(lambda w: product(x, w, dims), w)[1](dy)[0])

        fns = {"plain": pullback(jax.lax.dot_general), "jpeft": pullback(_ops.flat_dot_general)}
        a, b = (np.asarray(f(x, w, dy)) for f in fns.values())
        err = float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30))
        times = {name: [] for name in fns}
        for r in range(args.rounds):
            order = list(fns) if r % 2 == 0 else list(fns)[::-1]
            for name in order:
                f = fns[name]
                jax.block_until_ready(f(x, w, dy))
                ts = []
                for _ in range(args.reps):
                    t = time.perf_counter()
                    jax.block_until_ready(f(x, w, dy))
                    ts.append(time.perf_counter() - t)
                times[name].append(statistics.median(ts))
        flop = 2 * tokens * n_in * n_out
        plain, ours = statistics.median(times["plain"]), statistics.median(times["jpeft"])
        row = {
            "shape": f"{tokens}x{n_in}x{n_out}", "path": "copy" if _ops._weight_grad_by_copy(x, w) else "plain",
            "plain_ms": plain * 1e3, "jpeft_ms": ours * 1e3, "ratio": ours / plain,
            "plain_gflops": flop / plain / 1e9, "jpeft_gflops": flop / ours / 1e9, "max_rel_diff": err,
        }
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    print("| tokens x in x out | jpeft path | plain ms (GFLOP/s) | jpeft ms (GFLOP/s) | jpeft / plain | max rel. diff |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['shape']} | {r['path']} | {r['plain_ms']:.1f} ({r['plain_gflops']:.0f}) | "
              f"{r['jpeft_ms']:.1f} ({r['jpeft_gflops']:.0f}) | {r['ratio']:.2f} | {r['max_rel_diff']:.1e} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "rounds": args.rounds, "reps": args.reps}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
