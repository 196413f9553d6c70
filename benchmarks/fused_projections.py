"""LoRA projections that share an input, one product each (as jpeft runs them) or one fused
product per group, forward and backward, on the CPU (docs/BENCHMARKS.md, "Session 35").

A Llama layer's q, k and v projections read the same normed hidden state, and so do gate and
up. jpeft's LoRA path runs each as its own ``x @ (W + s A B)`` (timed here through
``jpeft.apply`` on an ``nn.Dense``: LoRA's merged training form, the adapter's gradients from
rank-``r`` products, none the size of ``W``). Fused, a group is one ``x @ [W_1 + s A_1 B_1 | W_2 + ...]`` whose backward forms ``dx``
in one product over the concatenated weights and the adapters' gradients from one pass of
``x`` through ``[A_1 | A_2 | ...]``. Fusing them in jpeft would mean a site that spans modules
(the adapter is one node per module); this script measures what it could save before anyone
writes that.

Both variants are jitted gradients, with respect to every A, B and the input, of the same
scalar (the outputs against fixed random cotangents); the gradients are compared. Rounds
alternate which variant runs first; each times ``--reps`` back-to-back calls and keeps their
mean; the table gives the median over rounds and fused / separate. A kernel timing in one
process (both are JAX), not a training step.

Examples:
  python benchmarks/fused_projections.py                     # the issue Llama's layer at 4,096 tokens
  python benchmarks/fused_projections.py --tokens 16384 --rounds 5
  python benchmarks/fused_projections.py --tokens 64 --hidden 32 --intermediate 48 --rounds 1 --reps 1   # seconds
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096, help="rows of x: batch x sequence (default 4096)")
    p.add_argument("--hidden", type=int, default=512, help="the layer's width, q/k/v's in and out (default 512)")
    p.add_argument("--intermediate", type=int, default=1376, help="gate/up's out (default 1376)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--rounds", type=int, default=8, help="rounds, alternating which variant runs first (default 8)")
    p.add_argument("--reps", type=int, default=5, help="back-to-back calls timed per variant and round (default 5)")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    for name in ("tokens", "hidden", "intermediate", "rank", "rounds", "reps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1, found {getattr(args, name)}")

    import jax
    import jax.numpy as jnp
    import numpy as np

    import dataclasses

    import flax.linen as nn

    import jpeft

    scale = 2.0

    @functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
    def fused(x, ws, as_, bs, s):
        return x @ jnp.concatenate([w + s * (a @ b) for w, a, b in zip(ws, as_, bs)], axis=1)

    def fused_fwd(x, ws, as_, bs, s):
        return fused(x, ws, as_, bs, s), (x, ws, as_, bs)

    def fused_bwd(s, res, dy):
        x, ws, as_, bs = res
        w = jnp.concatenate([w + s * (a @ b) for w, a, b in zip(ws, as_, bs)], axis=1)
        dys = jnp.split(dy, np.cumsum([w_.shape[1] for w_ in ws])[:-1].tolist(), axis=1)
        r = as_[0].shape[1]
        xa = x @ jnp.concatenate(as_, axis=1)                                   # one pass over x
        da = s * (x.T @ jnp.concatenate([d @ b.T for d, b in zip(dys, bs)], axis=1))
        return (dy @ w.T, [jnp.zeros_like(w_) for w_ in ws],
                [da[:, i * r:(i + 1) * r] for i in range(len(ws))],
                [s * (xa[:, i * r:(i + 1) * r].T @ d) for i, d in enumerate(dys)])

    fused.defvjp(fused_fwd, fused_bwd)

    def project(x, w, a, b):
        """``x @ (W + s A B)`` as jpeft's LoRA runs an ``nn.Dense`` call in training (its merged form)."""
        dense = nn.Dense(w.shape[1], use_bias=False)
        params = {"params": {"kernel": w}}
        site = jpeft.init(jpeft.LoraConfig(r=a.shape[1], alpha=scale * a.shape[1], target_modules=".*"), params,
                          jax.random.key(0))[""]
        return jpeft.apply(dense, params, {"": dataclasses.replace(site, lora_A=a, lora_B=b)}, x)

    def separate_loss(ad, x, ws, cots):
        return sum(jnp.vdot(project(x, w, a, b), c) for w, (a, b), c in zip(ws, ad, cots))

    def fused_loss(ad, x, ws, cots):
        y = fused(x, ws, [a for a, _ in ad], [b for _, b in ad], scale)
        return jnp.vdot(y, jnp.concatenate(cots, axis=1))

    variants = {"separate": jax.jit(jax.grad(separate_loss, argnums=(0, 1))),
                "fused": jax.jit(jax.grad(fused_loss, argnums=(0, 1)))}
    h, t, r = args.hidden, args.tokens, args.rank
    groups = {"q/k/v": [h, h, h], "gate/up": [args.intermediate] * 2}
    rng = np.random.default_rng(0)
    f32 = lambda *shape, sd=1.0: jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * sd)  # noqa: E731
    x = f32(t, h)
    rows = []
    for group, outs in groups.items():
        ws = [f32(h, n, sd=0.02) for n in outs]
        ad = [(f32(h, r, sd=0.1), f32(r, n, sd=0.1)) for n in outs]  # every adapter tensor random
        cots = [f32(t, n) for n in outs]
        got = {k: f(ad, x, ws, cots) for k, f in variants.items()}
        err = max(float(jnp.max(jnp.abs(u - v)) / jnp.max(jnp.abs(u)))
                  for u, v in zip(jax.tree.leaves(got["separate"]), jax.tree.leaves(got["fused"])))
        times = {k: [] for k in variants}
        for i in range(args.rounds):
            for k in (list(variants) if i % 2 == 0 else list(variants)[::-1]):
                t0 = time.perf_counter()
                for _ in range(args.reps):
                    out = variants[k](ad, x, ws, cots)
                jax.block_until_ready(out)
                times[k].append((time.perf_counter() - t0) / args.reps)
        ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        rows.append({"group": group, "tokens": t, "in": h, "outs": outs, "rank": r,
                     "separate_ms": ms["separate"], "fused_ms": ms["fused"],
                     "fused_over_separate": ms["fused"] / ms["separate"], "saved_ms": ms["separate"] - ms["fused"],
                     "separate_ms_rounds": times["separate"], "fused_ms_rounds": times["fused"],
                     "max_rel_grad_diff": err})
        if err > 1e-4:
            raise SystemExit(f"{group}: fused and separate gradients differ by {err:.2e} (relative); not timed further")
    print(f"{'group':8} {'tokens x in -> outs':28} {'separate ms':>12} {'fused ms':>9} {'fused/sep':>9} {'grad diff':>9}")
    for row in rows:
        shape = f"{row['tokens']} x {row['in']} -> {'+'.join(map(str, row['outs']))}"
        print(f"{row['group']:8} {shape:28} {row['separate_ms']:12.1f} {row['fused_ms']:9.1f} "
              f"{row['fused_over_separate']:9.3f} {row['max_rel_grad_diff']:9.1e}")
    report = {"rows": rows, "args": vars(args), "jax": jax.__version__, "backend": jax.default_backend(),
              "cpu": C.cpu_model(), "env": C.env_summary()}
    if args.json:
        C.write_report(report, "", json_path=args.json)
    return report


if __name__ == "__main__":
    main()
    sys.exit(0)
