"""LoRA and full fine-tuning steps on an accelerator: tokens/s, MFU and peak device memory,
with Hugging Face PEFT on the same device when torch sees it.

A ~1.1B-parameter Llama (hidden 2048, 22 layers, 32 heads, 4 KV heads, MLP 5632, vocabulary
32000: the TinyLlama shape) is built from its config with random weights (nothing is
downloaded) in bfloat16. Each measurement runs in its own process (so one framework's memory
pool never counts against another's), trains through ``jpeft.fit`` (the project's one
training loop) and reports the median step time after the compiling step:

* ``jpeft-lora``: LoRA r=16 on all seven projections, AdamW on the adapter (:data:`ADAMW`: lr 1e-4,
  weight decay 0.01, eps 1e-8, in both frameworks);
* ``jpeft-full``: full fine-tuning (``FullFinetuneConfig``), AdamW on every weight;
* ``peft-lora``: transformers + peft, the same LoRA, AdamW, ``torch.cuda`` (when available).

MFU is model FLOPs per second (``benchmarks/_common.lora_step_flops`` for LoRA,
``full_step_flops`` for full fine-tuning: the same count plus the weight gradients, another
``2 T W``) over the device's
dense bf16 peak (a table of known devices; ``--peak-tflops`` overrides it; on an unknown
device a measured bf16 matmul peak is used and said so).

With ``--rounds N`` the list of runs is repeated N times, interleaved (jpeft, PEFT, jpeft, PEFT,
...): each run is a fresh process, and the report gives each run's median over rounds and the
per-round step-time ratio jpeft-lora / peft-lora with its median. ``--seq`` / ``--batch`` /
``--layers`` change the shape (``--seq 4096 --batch 2`` keeps 8,192 tokens per batch).

Examples:
  python benchmarks/accelerator.py                        # on the accelerator: ~1.1B, batch 8 x 1024
  python benchmarks/accelerator.py --runs jpeft-lora,peft-lora --rounds 2 --seq 4096 --batch 2
  python benchmarks/accelerator.py --size toy --steps 3   # a smoke test at toy size (CPU)
  python benchmarks/accelerator.py --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _common as C  # noqa: E402

_STDOUT = sys.stdout  # the worker module sends prints to stderr; results go here

SIZES = {
    "1b": C.Size(hidden=2048, layers=22, heads=32, kv_heads=4, intermediate=5632, vocab=32000, batch=8, seq=1024),
    "toy": C.SIZES["toy"],
}

# dense bf16 peak FLOP/s per device, from the vendors' data sheets (no sparsity); the first name
# found in the device's kind counts, so a variant comes before its family (an H100 PCIe runs at
# 756, not the SXM part's 989)
PEAK_BF16 = {
    "H200 NVL": 835e12, "H200": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
}
RANK = 16
# one AdamW for both frameworks: optax's and torch's defaults differ (weight decay 1e-4 against
# 1e-2), so both are given every setting (betas and eps are 0.9, 0.999 and 1e-8 in both)
ADAMW = {"lr": 1e-4, "weight_decay": 1e-2, "eps": 1e-8}


def _peak(kind: str, override, measure) -> tuple[float, str]:
    if override:
        return override * 1e12, "given (--peak-tflops)"
    for name, flops in PEAK_BF16.items():
        if name.lower() in kind.lower():
            return flops, f"data sheet ({name}, dense bf16)"
    return measure(), "measured (bf16 matmul, unknown device)"


def run_jpeft(size: C.Size, mode: str, steps: int, peak_override) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    import _jpeft_worker as W
    import jpeft

    model, params = W.build_random(size, jnp.bfloat16)
    cfg = W.lora_config(RANK) if mode == "lora" else jpeft.FullFinetuneConfig()
    adapter = jpeft.init(cfg, params, jax.random.key(0))
    opt = optax.adamw(ADAMW["lr"], eps=ADAMW["eps"], weight_decay=ADAMW["weight_decay"])

    def loss_fn(params, adapter, batch, key):
        return W.step_loss(model, params, adapter, batch)

    step = jpeft.make_train_step(loss_fn, opt)
    data = [jnp.asarray(b) for b in C.batches(size, 4, seed=1)]
    batches = (data[i % len(data)] for i in range(steps + 1))
    res = jpeft.fit(step, params, adapter, opt.init(adapter), batches, key=jax.random.key(1), num_steps=steps + 1,
                    token_key="input_ids")
    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}

    def measure():
        # ten back-to-back products, or as many as fit in ~2 s after the second: one takes
        # ~1 ms on a GPU but ~1.2 s on a 2-core CPU, where ten took most of a toy run's time.
        # On a CPU 2048^2 products: as fast per FLOP as 4096^2 ones there (bf16, 2-core EPYC:
        # 69 and 70 GFLOP per CPU-second) at an eighth of the work (the toy run's two processes
        # spent ~10 of their 27 CPU-seconds on 4096^2 ones)
        n = 2048 if dev.platform == "cpu" else 4096
        a = jnp.ones((n, n), jnp.bfloat16)
        f = jax.jit(jnp.dot)
        f(a, a).block_until_ready()
        t, reps = time.perf_counter(), 0
        while reps < 10 and (reps < 2 or time.perf_counter() - t < 2.0):
            out = f(a, a)
            reps += 1
            if reps == 2:  # a slow device shows here; a fast one queues the rest
                out.block_until_ready()
        out.block_until_ready()
        return reps * 2 * n**3 / (time.perf_counter() - t)

    secs = sorted(res.step_seconds[1:])
    s = secs[len(secs) // 2]
    flops = (C.lora_step_flops(size, RANK) if mode == "lora" else C.full_step_flops(size))["step"]
    peak, how = _peak(dev.device_kind, peak_override, measure)
    return {"framework": "jpeft", "mode": mode, "device": dev.device_kind, "platform": dev.platform,
            "params": int(jpeft.tree.count(params)), "trainable": int(jpeft.tree.count(res.adapter)),
            "step_s": s, "tokens_per_s": size.tokens / s, "mfu": flops / s / peak, "peak_flops": peak, "peak_source": how,
            "peak_device_mem_gib": stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None,
            "first_step_s": res.step_seconds[0], "loss": [h["loss"] for h in res.history]}


def run_peft(size: C.Size, steps: int, peak_override) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    if not torch.cuda.is_available():
        return {"framework": "peft", "mode": "lora", "skipped": "torch sees no CUDA device"}
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**size.hf_config_kwargs())).to(torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0,
                                             target_modules=list(C.LORA_TARGETS)))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **ADAMW)
    data = [torch.as_tensor(b, dtype=torch.long, device="cuda") for b in C.batches(size, 4, seed=1)]
    secs, losses = [], []
    torch.cuda.reset_peak_memory_stats()
    for i in range(steps + 1):
        x = data[i % len(data)]
        torch.cuda.synchronize()
        t = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        torch.cuda.synchronize()
        secs.append(time.perf_counter() - t)
    s = sorted(secs[1:])[len(secs[1:]) // 2]
    kind = torch.cuda.get_device_name()
    peak, how = _peak(kind, peak_override, lambda: float("nan"))
    return {"framework": "peft", "mode": "lora", "device": kind, "step_s": s, "tokens_per_s": size.tokens / s,
            "mfu": C.lora_step_flops(size, RANK)["step"] / s / peak, "peak_flops": peak, "peak_source": how,
            "peak_device_mem_gib": torch.cuda.max_memory_allocated() / 2**30, "loss": losses}


def summarise(results: list, runs: list, rounds: int) -> dict:
    """Each run's median step over the rounds it finished, and the per-round ratio jpeft-lora /
    peft-lora (a round counts only where both finished)."""
    step = {(r["run"], r["round"]): r["step_s"] for r in results if "step_s" in r}
    med = {run: float(np.median(v)) for run in runs if (v := [s for (n, _), s in step.items() if n == run])}
    ratios = [step["jpeft-lora", i] / step["peft-lora", i] for i in range(rounds)
              if ("jpeft-lora", i) in step and ("peft-lora", i) in step]
    return {"median_step_s": med, "ratios": ratios, "ratio_median": float(np.median(ratios)) if ratios else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="1b", choices=sorted(SIZES))
    p.add_argument("--steps", type=int, default=10, help="measured steps after the compiling one")
    p.add_argument("--runs", default="jpeft-lora,jpeft-full,peft-lora", help="comma-separated")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, TFLOP/s")
    p.add_argument("--rounds", type=int, default=1, help="repeat the runs this many times, interleaved")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: the size's)")
    p.add_argument("--batch", type=int, default=None, help="rows per batch (default: the size's)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the size's)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    shape = {k: v for k, v in (("seq", args.seq), ("batch", args.batch), ("layers", args.layers)) if v is not None}
    bad = {k: v for k, v in shape.items() if v < 1}
    if bad:
        p.error(f"--seq/--batch/--layers must be positive, got {bad}")
    size = dataclasses.replace(SIZES[args.size], **shape)
    if args._one:
        fw, mode = args._one.split("-")
        out = run_jpeft(size, mode, args.steps, args.peak_tflops) if fw == "jpeft" else run_peft(size, args.steps,
                                                                                                   args.peak_tflops)
        print("RESULT:" + json.dumps(out), file=_STDOUT, flush=True)
        return 0
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", TF_CPP_MIN_LOG_LEVEL="3")
    results = []
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    for rnd, run in [(i, r) for i in range(args.rounds) for r in runs]:
        cmd = [sys.executable, __file__, "--_one", run, "--size", args.size, "--steps", str(args.steps)]
        cmd += [f"--{k}={v}" for k, v in shape.items()]
        if args.peak_tflops:
            cmd += ["--peak-tflops", str(args.peak_tflops)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT:")]
        r = json.loads(lines[-1][7:]) if proc.returncode == 0 and lines else {
            "run": run, "error": (proc.stderr or proc.stdout)[-1500:]}
        r["run"], r["round"] = run, rnd
        results.append(r)
        if "step_s" in r:
            mem = "-" if r["peak_device_mem_gib"] is None else f"{r['peak_device_mem_gib']:.1f} GiB"
            print(f"{run:>10} (round {rnd + 1}) on {r['device']}: step {1000 * r['step_s']:.1f} ms, {r['tokens_per_s']:,.0f} tokens/s, "
                  f"MFU {100 * r['mfu']:.1f}% (peak {r['peak_flops'] / 1e12:.3g} TFLOP/s, {r['peak_source']}), "
                  f"peak device memory {mem}")
        else:
            print(f"{run:>10}: {r.get('skipped') or r.get('error')}")
    summary = summarise(results, runs, args.rounds)
    for run, med in summary["median_step_s"].items():
        print(f"{run:>10}: median step over {args.rounds} round(s) {1000 * med:.1f} ms")
    if summary["ratios"]:
        print("jpeft-lora / peft-lora step time per round: " + ", ".join(f"{x:.3f}" for x in summary["ratios"])
              + f"; median {summary['ratio_median']:.3f}")
    print(f"size {args.size}: {size.n_params() / 1e6:,.1f} M parameters, {size.layers} layers, batch {size.batch} x "
          f"{size.seq} tokens, bf16, LoRA r={RANK} on {', '.join(C.LORA_TARGETS)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": args.size, "shape": dataclasses.asdict(size), "rounds": args.rounds,
                       "summary": summary, "results": results}, f, indent=1)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
