"""Attention kernels on an accelerator: fidelity of each kernel against a float32 reference, and
forward+backward time, for the masks jpeft's models build.

For each mask kind (plain causal; causal with padding; sliding window; packed documents) and each
kernel (``reference``, ``blockwise``, ``cudnn`` where the backend has it), on random bfloat16
inputs with grouped-query heads, it reports the relative error ``||out - ref|| / ||ref||`` of
the output and of the gradients of ``q, k, v``, where ``ref`` is the reference kernel run in
float32 on the same (upcast) inputs; then it times a jitted forward+backward of each kernel at
several sequence lengths at a fixed number of tokens per batch (median of ``--reps`` after two
warm-ups).

Examples:
  python benchmarks/gpu_attention.py                      # on the GPU
  python benchmarks/gpu_attention.py --small --reps 2     # a smoke test on the CPU
  python benchmarks/gpu_attention.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jpeft._ops import segment_slots  # noqa: E402
from jpeft.models._attention import AttentionMask, dot_product_attention  # noqa: E402


def make_mask(kind: str, b: int, t: int, window: int) -> tuple[AttentionMask, bool]:
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    valid = jnp.ones((b, t), bool)
    if kind == "causal":
        return AttentionMask(valid, pos, pos, padded=False), True
    if kind == "padded":
        lengths = jnp.asarray([t - (i * t) // (2 * b) for i in range(b)])  # right padding, varied
        valid = pos < lengths[:, None]
        return AttentionMask(valid, pos, pos), False
    if kind == "window":
        return AttentionMask(valid, pos, pos, window=window, padded=False), True
    if kind == "packed":
        seg = (pos * 3) // t  # three documents per row
        slots = segment_slots(seg)
        return AttentionMask(valid, slots, slots, q_seg=seg, k_seg=seg, padded=False), False
    raise ValueError(kind)


def rel(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def fwd_bwd(impl: str, mask: AttentionMask, plain: bool, scale: float, block: int):
    def loss(q, k, v, ct):
        out = dot_product_attention(q, k, v, mask, scale=scale, implementation=impl, block_size=block,
                                    plain=plain and impl == "cudnn")
        return jnp.sum(out.astype(jnp.float32) * ct), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="tiny shapes (a CPU smoke test)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    on_gpu = jax.default_backend() in ("gpu", "cuda")
    impls = ["reference", "blockwise"] + (["cudnn"] if on_gpu else [])
    if args.small:
        heads, kv_heads, d, t_check, lengths, tokens, block = 4, 2, 16, 96, [64, 128], 256, 32
    else:
        heads, kv_heads, d, t_check, lengths, tokens, block = 32, 8, 128, 1024, [1024, 4096, 8192], 32768, 512
    dev = jax.devices()[0]
    print(f"device {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}; "
          f"heads {heads}, kv heads {kv_heads}, head dim {d}", flush=True)
    out = {"device": dev.device_kind, "jax": jax.__version__, "fidelity": [], "timing": []}
    scale = d ** -0.5

    # -- fidelity ------------------------------------------------------------------------------
    b = 2
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (b, t_check, heads, d), jnp.float32)
    k = jax.random.normal(ks[1], (b, t_check, kv_heads, d), jnp.float32)
    v = jax.random.normal(ks[2], (b, t_check, kv_heads, d), jnp.float32)
    ct = jax.random.normal(ks[3], (b, t_check, heads, d), jnp.float32)
    qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
    print(f"\nfidelity at {t_check} tokens, bf16 inputs, against the float32 reference "
          "(rel. error of out / dq / dk / dv):", flush=True)
    for kind in ("causal", "padded", "window", "packed"):
        mask, plain = make_mask(kind, b, t_check, window=t_check // 4)
        (_, ref_out), ref_g = fwd_bwd("reference", mask, False, scale, block)(
            *(x.astype(jnp.float32) for x in (qb, kb, vb)), ct)
        for impl in impls:
            try:
                (_, o), g = fwd_bwd(impl, mask, plain, scale, block)(qb, kb, vb, ct)
                if kind == "padded":  # padding query rows are not compared (no loss reads them)
                    keep = np.asarray(mask.kv_valid)[:, :, None, None]
                    errs = [rel(np.where(keep, o, 0), np.where(keep, ref_out, 0))]
                else:
                    errs = [rel(o, ref_out)]
                errs += [rel(a, r) for a, r in zip(g, ref_g)]
                row = {"mask": kind, "impl": impl, "out": errs[0], "dq": errs[1], "dk": errs[2], "dv": errs[3],
                       "finite": bool(np.isfinite(np.asarray(o, np.float32)).all())}
                print(f"  {kind:>7} {impl:>9}: " + " / ".join(f"{e:.2e}" for e in errs)
                      + ("" if row["finite"] else "  NON-FINITE"), flush=True)
            except Exception as e:  # noqa: BLE001 (report and go on: a kernel may not take a mask)
                row = {"mask": kind, "impl": impl, "error": f"{type(e).__name__}: {str(e)[:300]}"}
                print(f"  {kind:>7} {impl:>9}: ERROR {row['error']}", flush=True)
            out["fidelity"].append(row)

    # -- timing --------------------------------------------------------------------------------
    print(f"\nforward+backward ms (median of {args.reps}), {tokens} tokens per batch, bf16:", flush=True)
    for t in lengths:
        bt = max(1, tokens // t)
        ks = jax.random.split(jax.random.key(t), 4)
        q = jax.random.normal(ks[0], (bt, t, heads, d), jnp.bfloat16)
        k = jax.random.normal(ks[1], (bt, t, kv_heads, d), jnp.bfloat16)
        v = jax.random.normal(ks[2], (bt, t, kv_heads, d), jnp.bfloat16)
        ct = jax.random.normal(ks[3], (bt, t, heads, d), jnp.float32)
        for kind in ("causal", "packed"):
            mask, plain = make_mask(kind, bt, t, window=t // 4)
            for impl in impls:
                if impl == "reference" and t > 4096:
                    continue  # the score matrix alone would be bt*heads*t*t*4 bytes
                try:
                    f = fwd_bwd(impl, mask, plain, scale, block)
                    for _ in range(2):
                        jax.block_until_ready(f(q, k, v, ct))
                    ts = []
                    for _ in range(args.reps):
                        t0 = time.perf_counter()
                        jax.block_until_ready(f(q, k, v, ct))
                        ts.append(time.perf_counter() - t0)
                    ms = 1000 * float(np.median(ts))
                    # causal attention FLOPs, forward (2 matmuls) + backward (5 matmuls), half the square
                    flops = 7 * 2 * bt * heads * t * t * d / 2
                    row = {"seq": t, "batch": bt, "mask": kind, "impl": impl, "ms": ms,
                           "tflops": flops / (ms / 1000) / 1e12}
                    print(f"  seq {t:>5} x{bt:<3} {kind:>7} {impl:>9}: {ms:8.2f} ms  "
                          f"({row['tflops']:.0f} TFLOP/s causal-useful)", flush=True)
                except Exception as e:  # noqa: BLE001
                    row = {"seq": t, "mask": kind, "impl": impl, "error": f"{type(e).__name__}: {str(e)[:300]}"}
                    print(f"  seq {t:>5} {kind:>7} {impl:>9}: ERROR {row['error']}", flush=True)
                out["timing"].append(row)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
