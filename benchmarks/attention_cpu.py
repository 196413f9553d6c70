"""The attention kernel alone on the CPU: jpeft's blockwise kernel against PyTorch's fused
scaled-dot-product attention (what Hugging Face's Llama calls), forward + backward of causal
attention over the current tokens, the shapes of the issue-24 Llama (8 heads of 64).
``--tokens`` fixes the tokens per batch instead of the batch (``bench_scaling.py``'s sequence
axis: 4,096 tokens as 32 x 128 ... 1 x 4096); block ``0`` is the kernel's automatic block
(what the models use by default: square tiles, or 256 queries by 512 keys from 513
tokens on), and ``QxK`` tiles of ``Q`` queries by ``K`` keys (``key_block_size`` of
``blockwise_attention``).

Each framework runs in its own process, one process at a time, alternating from round to
round (torch first in odd rounds, jpeft first in even ones), by default in the same process
environment: ``--huge-pages`` as in ``bench_scaling.py`` (the `jpeft` command's glibc tunables
for both processes, for jpeft's only, or for none). The earlier results in docs/results/scaling/
were measured before this option followed ``bench_scaling.py``: their ``args.huge_pages`` of
``jpeft`` gave jpeft's process alone ``glibc.malloc.hugetlb=1``. Each process compiles / warms up,
then times ``--reps`` back-to-back forward+backward calls and reports their minimum and median.
The table gives, per sequence length, the median over rounds of each process's median, and
the ratio jpeft / torch. A kernel timing, not a training step: ``bench_scaling.py`` measures the
step.

Examples:
  python benchmarks/attention_cpu.py                                  # 1024, 2048, 4096 tokens
  python benchmarks/attention_cpu.py --seq 4096 --blocks 256,512,1024 # block sizes
  python benchmarks/attention_cpu.py --seq 256 --rounds 1 --reps 2    # seconds (smoke)
  python benchmarks/attention_cpu.py --seq 128,256,512,1024 --tokens 4096 --blocks 0   # the sweep's shapes
  python benchmarks/attention_cpu.py --seq 1024,4096 --tokens 4096 --blocks 0,256x512  # tile shapes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _common as C  # noqa: E402


def parse_block(spec: str) -> tuple[int, int | None]:
    """``"512"`` -> ``(512, None)`` (square tiles; ``0`` automatic), ``"256x512"`` -> ``(256, 512)``."""
    parts = spec.strip().lower().split("x")
    ok = len(parts) in (1, 2) and all(x.isdigit() for x in parts) and (len(parts) == 1 or min(map(int, parts)) > 0)
    if not ok:
        raise SystemExit(f"--blocks: expected a block size (0: automatic) or QUERIESxKEYS such as 256x512, got {spec!r}")
    return int(parts[0]), (int(parts[1]) if len(parts) == 2 else None)


def worker(framework: str, seq: int, batch: int, heads: int, dim: int, spec: str, reps: int) -> dict:
    if framework == "torch":
        import torch

        torch.manual_seed(0)
        q, k, v = (torch.randn(batch, heads, seq, dim, requires_grad=True) for _ in range(3))
        ct = torch.randn(batch, heads, seq, dim)

        def call():
            for x in (q, k, v):
                x.grad = None
            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).backward(ct)
            return q.grad
    else:
        sys.path.insert(0, os.path.dirname(HERE))
        import jax
        import jax.numpy as jnp

        from jpeft.models import _attention as A
        from jpeft.models._layers import causal_mask

        ks = jax.random.split(jax.random.key(0), 4)
        q, k, v, ct = (jax.random.normal(kk, (batch, seq, heads, dim)) for kk in ks)
        mask, _ = causal_mask(jnp.ones((batch, seq), bool), None, padded=False)

        block, key_block = parse_block(spec)
        if not block:  # 0: the tiles the models pick
            block = A.auto_block_size(seq, mask)
            key_block = A.auto_key_block_size(block, mask)

        def f(q, k, v):
            out = A.blockwise_attention(q, k, v, mask, scale=dim ** -0.5, block_size=block, key_block_size=key_block)
            return jnp.vdot(out, ct)

        g = jax.jit(jax.grad(f, argnums=(0, 1, 2)))

        def call():
            return jax.block_until_ready(g(q, k, v))

    call()
    call()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        call()
        ts.append(time.perf_counter() - t)
    if framework == "torch":
        return {"min_s": min(ts), "median_s": statistics.median(ts), "block": 0}
    return {"min_s": min(ts), "median_s": statistics.median(ts),
            "block": block if key_block is None else f"{block}x{key_block}"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", default="1024,2048,4096", help="comma list of sequence lengths")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=0,
                   help="tokens per batch: the batch of each sequence length is tokens / seq (default 0: --batch)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64, help="head width")
    p.add_argument("--blocks", default="512",
                   help="comma list of jpeft attention block sizes (0: the kernel's automatic block) or "
                        "QUERIESxKEYS tiles (256x512)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=5, help="timed back-to-back calls per process")
    C.add_huge_pages_arg(p)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--worker", nargs=7, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        fw, seq, batch, heads, dim, block, reps = a.worker
        print(json.dumps(worker(fw, int(seq), int(batch), int(heads), int(dim), block, int(reps))))
        return
    seqs = [int(s) for s in a.seq.split(",")]
    blocks = [b.strip().lower() for b in a.blocks.split(",")]
    for b in blocks:
        parse_block(b)
    batch_of = lambda seq: max(1, a.tokens // seq) if a.tokens else a.batch
    runs = {}
    # each framework's process environment (GLIBC_TUNABLES): the same for both unless --huge-pages says otherwise
    envs = {fw: C.host_pages_env("jpeft" if fw == "jpeft" else "hf", a.huge_pages) for fw in ("torch", "jpeft")}
    for rnd in range(a.rounds):
        for seq in seqs:
            order = [("torch", "0")] + [("jpeft", b) for b in blocks]
            if rnd % 2:
                order.reverse()
            for fw, block in order:
                env = {**os.environ, **envs[fw]}
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", fw, str(seq), str(batch_of(seq)),
                       str(a.heads), str(a.dim), block, str(a.reps)]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
                res = json.loads(out.strip().splitlines()[-1])
                runs.setdefault((seq, fw, block), []).append(res)
                what = "" if fw == "torch" else f" block {block if block != '0' else 'auto'}"
                print(f"round {rnd + 1} seq {seq} {fw}{what}: "
                      f"min {res['min_s'] * 1e3:.0f} ms, median {res['median_s'] * 1e3:.0f} ms", file=sys.stderr)
    rows = []
    print("| sequence x batch | kernel | forward+backward ms (median over rounds of each process's median) | / torch |")
    print("|---:|---|---:|---:|")
    for seq in seqs:
        t_torch = statistics.median(r["median_s"] for r in runs[(seq, "torch", "0")])
        print(f"| {seq} x {batch_of(seq)} | torch SDPA | {t_torch * 1e3:.0f} | 1.00 |")
        for b in blocks:
            t = statistics.median(r["median_s"] for r in runs[(seq, "jpeft", b)])
            qb, kb = parse_block(b)
            if kb is not None:
                name = f"tiles of {qb} x {kb}"
            else:
                name = f"blocks of {qb}" if qb else f"automatic blocks ({runs[(seq, 'jpeft', b)][0]['block']})"
            print(f"| {seq} x {batch_of(seq)} | jpeft blockwise, {name} | {t * 1e3:.0f} | {t / t_torch:.2f} |")
            rows.append({"seq": seq, "batch": batch_of(seq), "block": b if "x" in b else int(b), "jpeft_s": t, "torch_s": t_torch,
                         "ratio": t / t_torch})
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "cpu": C.cpu_model(), "env": envs, "rows": rows,
                       "runs": {"/".join(map(str, k)): v for k, v in runs.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
