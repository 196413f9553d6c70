"""QLoRA (issue 19): LoRA on a Llama whose frozen base is f32, bf16, int8, fp8 or NF4.

For each base, in its own process (so peak memory is that base's alone): the base's bytes
(scales included) against the bf16 base's, the logit error against the bf16 model on
held-out text, the LoRA step time (median after the compiling steps) and peak memory
(device ``peak_bytes_in_use`` on an accelerator, the process's peak RSS on the CPU), and the
held-out loss after the same short fine-tune (same data, seed and steps on every base).

The model is built from its config with random weights (nothing is downloaded); the text is
Python's own documentation (``pydoc_data.topics``) as bytes, the first 90 % for training and
the rest held out. Quantized bases dequantize to bf16 (the QLoRA recipe: bf16 compute).

Examples:
  python benchmarks/bench_quant.py --size cpu                # ~3M-parameter Llama, ~3 minutes on an idle 2-core CPU
  python benchmarks/bench_quant.py --size 1b-cpu              # the same ~1.1B, batch 1 x 128, 40 steps: ~15 minutes on 2 cores
  python benchmarks/bench_quant.py --size 1b --json out.json # ~1.1B (TinyLlama shape), on a GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Size:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    batch: int
    seq: int
    steps: int
    held: int = 8  # held-out rows of seq tokens


SIZES = {
    "toy": Size(64, 1, 4, 2, 128, 256, 2, 32, 3),
    "cpu": Size(256, 4, 8, 4, 704, 256, 4, 128, 40),
    # the same 1.1B model as "1b" at a batch a 2-core CPU steps through in 2-4 s: the largest
    # Llama whose f32 run (the f32 base beside the bf16 reference: 11.8 GB peak RSS) fits a
    # 24 GiB machine with room to spare
    "1b-cpu": Size(2048, 22, 32, 4, 5632, 32000, 1, 128, 40),
    "1b": Size(2048, 22, 32, 4, 5632, 32000, 4, 1024, 60),
}
BASES = ("f32", "bf16", "int8", "fp8", "nf4")  # and "nf4-all": every kernel and embedding, LM head included
RANK = 16


def _text():
    from pydoc_data.topics import topics

    import numpy as np

    data = np.frombuffer("\n".join(topics[k] for k in sorted(topics)).encode("utf-8"), np.uint8).astype(np.int32)
    cut = int(0.9 * len(data))
    return data[:cut], data[cut:]


def _rows(data, n, seq, seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(data) - seq - 1, size=n)
    return np.stack([data[s:s + seq + 1] for s in starts])


def worker(size: Size, base: str, compute: str = "", scan_layers: bool = False) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import jpeft
    from jpeft.tree import nbytes

    dt = jnp.float32 if base == "f32" else jnp.bfloat16
    cdt = {"": dt, "f32": jnp.float32, "bf16": jnp.bfloat16}[compute]  # --compute overrides the compute dtype
    cfg = jpeft.models.LlamaConfig(vocab_size=size.vocab, hidden_size=size.hidden, intermediate_size=size.intermediate,
                                   num_layers=size.layers, num_heads=size.heads, num_kv_heads=size.kv_heads,
                                   dtype=cdt, param_dtype=dt, scan_layers=scan_layers)
    model = jpeft.models.LlamaForCausalLM(cfg)
    bf16_model = jpeft.models.LlamaForCausalLM(cfg.replace(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16))
    dummy = jnp.zeros((1, 8), jnp.int32)
    ref = jax.jit(bf16_model.init)(jax.random.key(0), dummy)  # the same random weights for every base
    ref = jax.tree.map(lambda x: (x.astype(jnp.float32) * 2.5).astype(jnp.bfloat16)
                       if x.ndim >= 2 else x, ref)  # std ~0.05: logits far from uniform
    ref_bytes = nbytes(ref)
    if base == "f32":
        params = jax.tree.map(lambda x: x.astype(jnp.float32), ref)
    elif base == "bf16":
        params = ref
    elif base == "nf4-all":  # the embeddings and the LM head in NF4 too (QLoRA keeps them in bf16)
        params = jpeft.quantize(ref, "nf4", target_modules=".*")
    else:
        params = jpeft.quantize(ref, base)
    train, held = _text()
    held_rows = jnp.asarray(_rows(held, size.held, size.seq, 123))
    dev = jax.devices()[0]
    fwd = jax.jit(lambda p, a, x: jpeft.apply(model, p, a, x).astype(jnp.float32))
    ref_logits = jax.jit(lambda p, x: bf16_model.apply(p, x).astype(jnp.float32))(ref, held_rows[:, :-1])
    logits = fwd(params, None, held_rows[:, :-1])
    logit_err = float(jnp.mean(jnp.abs(logits - ref_logits)) / jnp.mean(jnp.abs(ref_logits)))

    def xent(logits, rows):
        return optax.softmax_cross_entropy_with_integer_labels(logits, rows[:, 1:]).mean()

    def loss_fn(p, a, rows, key):
        return xent(jpeft.apply(model, p, a, rows[:, :-1]).astype(jnp.float32), rows)

    kernel_ratio = _kernel_ratio(params, ref)
    lcfg = jpeft.LoraConfig(r=RANK, alpha=2 * RANK, target_modules="all-linear")
    adapter = jpeft.init(lcfg, params, jax.random.key(1), model, dummy)
    opt = optax.adamw(2e-3)
    state = opt.init(adapter)
    batches = [jnp.asarray(_rows(train, size.batch, size.seq, i)) for i in range(size.steps)]
    # compiled ahead, so that the peak below is the training's (this base, the adapter, Adam,
    # activations, the runtime), not XLA's compiler's; the bf16 reference model is freed first
    step = jpeft.make_train_step(loss_fn, opt).lower(params, adapter, state, batches[0], jax.random.key(0)).compile()
    evaluate = fwd.lower(params, adapter, held_rows[:, :-1]).compile()
    logits.block_until_ready()
    del ref
    if dev.platform == "cpu":
        peak_rss = C.PeakRSS()
    times, losses = [], []
    for i, rows in enumerate(batches):
        t0 = time.perf_counter()
        adapter, state, m = step(params, adapter, state, rows, jax.random.key(i))
        losses.append(float(m["loss"]))  # blocks
        times.append(time.perf_counter() - t0)
        print(f"[{base}] step {i + 1}/{size.steps}: loss {losses[-1]:.3f}, {times[-1]:.2f} s", file=sys.stderr, flush=True)
    held_loss = float(xent(evaluate(params, adapter, held_rows[:, :-1]), held_rows))
    held_loss0 = float(xent(logits, held_rows))
    stats = dev.memory_stats() if dev.platform != "cpu" else None
    peak = stats.get("peak_bytes_in_use") if stats else peak_rss.peak()
    return {
        "base": base + (f" ({compute} compute)" if compute else "") + (", layer scan" if scan_layers else ""), "device": dev.device_kind, "params": int(jpeft.summary(params, None, print_fn=None)["base"]),
        "bytes": nbytes(params), "bf16_bytes": ref_bytes, "bytes_vs_bf16": nbytes(params) / ref_bytes,
        "kernel_bytes_vs_bf16": kernel_ratio, "logit_rel_err_vs_bf16": logit_err,
        "heldout_loss_before": held_loss0, "heldout_loss_after": held_loss, "train_loss_first": losses[0],
        "train_loss_last": losses[-1], "step_s_median": float(np.median(times[2:] if len(times) > 3 else times)),
        "peak_bytes": int(peak), "rss_at_training_start": None if stats else int(peak_rss.baseline),
        "peak_kind": "device peak_bytes_in_use" if stats else "host peak RSS while training",
    }


def _kernel_ratio(params, ref) -> float:
    """Bytes of the quantized leaves (their scales included) over the same kernels in bf16."""
    import jax

    from jpeft import quant
    from jpeft.tree import nbytes

    q = [x for x in jax.tree.leaves(params, is_leaf=quant.is_quantized) if quant.is_quantized(x)]
    if not q:
        return nbytes(params) / nbytes(ref)
    return sum(nbytes(x) for x in q) / sum(2 * math.prod(x.shape) for x in q)


def kernel_eval(shape=(2048, 2048), reps: int = 20) -> list:
    """qwix against jpeft on one kernel: bytes, dequantization error, and the time of
    ``x @ dequantize(w)`` (jitted, median of ``reps``). Decides what jpeft hand-writes."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import qwix

    from jpeft import quant
    from jpeft.tree import nbytes

    w = jax.random.normal(jax.random.key(0), shape, jnp.float32) * 0.02
    x = jax.random.normal(jax.random.key(1), (16, shape[0]), jnp.float32)
    cands = {
        "qwix int8 per-channel": qwix.quantize(w, jnp.int8, channelwise_axes=(1,)),
        "qwix fp8 e4m3 per-channel": qwix.quantize(w, jnp.float8_e4m3fn, channelwise_axes=(1,)),
        "qwix nf4 block 64 (uint4, fp32 scales)": qwix.quantize(w, "nf4", channelwise_axes=(1,), tiled_axes={0: 64}),
        "jpeft nf4 block 64 + double quant": quant.quantize_array(w, "nf4"),
    }
    out = []
    for name, q in cands.items():
        deq = quant.dequantize_array(q) if quant.is_quantized(q) else qwix.dequantize(q)
        f = jax.jit(lambda x, q: x @ (quant.dequantize_array(q) if quant.is_quantized(q) else qwix.dequantize(q)))
        f(x, q).block_until_ready()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            f(x, q).block_until_ready()
            ts.append(time.perf_counter() - t0)
        leaves = jax.tree.leaves(q)
        logical = sum(int(np.prod(l.shape)) * (0.5 if "int4" in str(l.dtype) else np.dtype(l.dtype).itemsize)
                      for l in leaves)
        out.append({"kernel": name, "shape": list(shape), "bytes_reported": nbytes(q), "bytes_packed": logical,
                    "bits_per_weight": 8 * nbytes(q) / w.size, "rel_err": float(jnp.linalg.norm(deq - w) / jnp.linalg.norm(w)),
                    "max_abs_err": float(jnp.abs(deq - w).max()), "matmul_ms": 1e3 * float(np.median(ts))})
    return out


def markdown(report: dict) -> str:
    lines = [f"Llama {report['size']} ({report['rows'][0]['params']:,} parameters), device {report['rows'][0]['device']}, "
             f"LoRA r={RANK} on all linear layers, {report['steps']} steps of batch {report['batch']} x {report['seq']}, "
             f"held-out loss on {report.get('held', 8)} rows.", "",
             "| base | bytes | vs bf16 (all) | kernels vs bf16 | logit rel. err vs bf16 | step (s) | peak memory | "
             "held-out loss before -> after |", "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        start = r.get("rss_at_training_start")
        peak = f"{r['peak_bytes'] / 2**20:.0f} MiB ({r['peak_kind']}" + (
            f"; {start / 2**20:.0f} MiB when it started)" if start else ")")
        lines.append(f"| {r['base']} | {r['bytes'] / 2**20:.1f} MiB | {r['bytes_vs_bf16']:.3f} | {r['kernel_bytes_vs_bf16']:.3f} | "
                     f"{r['logit_rel_err_vs_bf16']:.4f} | {r['step_s_median']:.3f} | {peak} | "
                     f"{r['heldout_loss_before']:.3f} -> {r['heldout_loss_after']:.3f} |")
    if report.get("kernels"):
        lines += ["", "| one kernel | bits/weight (jax nbytes) | bits/weight (uint4 packed) | rel. error | max abs error | x @ dequant(w) (ms) |",
                  "|---|---|---|---|---|---|"]
        for k in report["kernels"]:
            lines.append(f"| {k['kernel']} {tuple(k['shape'])} | {k['bits_per_weight']:.3f} | "
                         f"{8 * k['bytes_packed'] / math.prod(k['shape']):.3f} | {k['rel_err']:.4f} | "
                         f"{k['max_abs_err']:.5f} | {k['matmul_ms']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="cpu")
    ap.add_argument("--bases", default=",".join(BASES),
                    help="comma list of f32, bf16, int8, fp8, nf4 and nf4-all (NF4 for the embeddings and the LM head too)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--compute", default="", choices=["", "f32", "bf16"],
                    help="compute dtype for every base (default: f32 for the f32 base, bf16 for the others)")
    ap.add_argument("--scan-layers", action="store_true",
                    help="run the decoder layers with nn.scan (LlamaConfig(scan_layers=True)); on the CPU this is "
                         "what keeps a quantized base's training memory near its quantized size (docs/MODELS.md)")
    ap.add_argument("--json", default=None, help="write the report here")
    ap.add_argument("--no-kernel-eval", action="store_true")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    size = SIZES[args.size]
    if args.steps:
        size = dataclasses.replace(size, steps=args.steps)
    if args.worker:
        print("JSON:" + json.dumps(worker(size, args.worker, args.compute, args.scan_layers)), flush=True)
        return {}
    rows = []
    for base in args.bases.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--size", args.size, "--worker", base,
               "--steps", str(size.steps), "--compute", args.compute] + ["--scan-layers"] * args.scan_layers
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # the worker's progress goes to stderr
        got = [ln for ln in proc.stdout.splitlines() if ln.startswith("JSON:")]
        if proc.returncode or not got:
            raise SystemExit(f"worker {base} failed (exit {proc.returncode}); its output is above")
        rows.append(json.loads(got[-1][5:]))
        print(f"{base}: {rows[-1]}", file=sys.stderr, flush=True)
    report = {"size": args.size, "scan_layers": args.scan_layers, "steps": size.steps, "batch": size.batch, "seq": size.seq, "held": size.held, "rows": rows,
              "kernels": None if args.no_kernel_eval else kernel_eval()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
