"""Hugging Face side of benchmarks/bench_vs_hf.py: transformers + peft on the PyTorch CPU.

Two modes:

* ``--setup DIR``: builds the random Llama (seeded), writes it with ``save_pretrained`` to
  ``DIR/base`` and a LoRA adapter (r=8 on all linear layers, peft's default init) with peft's
  ``save_pretrained`` to ``DIR/adapter``. Both frameworks load these files, so they train the
  same numbers.
* worker (default): loads ``DIR/base`` + ``DIR/adapter`` (trainable), warms up, then runs one
  training step per ``{"cmd": "step"}`` line on stdin and answers with a JSON line; ``{"cmd":
  "done"}`` ends it with the peak resident memory above the baseline taken after imports.

Not meant to be run by hand; see ``bench_vs_hf.py --help``.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

C.quiet_stdout()

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

# peft where it is used (the setup and the LoRA worker), before the memory baseline; a full
# fine-tuning worker never calls it, and its import (bitsandbytes, which imports torch's
# inductor) cost that worker ~2 s of CPU
peft = None if "--full" in sys.argv[1:] and "--setup" not in sys.argv[1:] else importlib.import_module("peft")

mem = C.PeakRSS()  # baseline after imports


def setup(size: C.Size, out: str, seed: int, r: int) -> None:
    torch.manual_seed(seed)
    cfg = LlamaConfig(**size.hf_config_kwargs())
    model = LlamaForCausalLM(cfg).eval()
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(os.path.join(out, "base"))
    lcfg = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=list(C.LORA_TARGETS), bias="none")
    pm = peft.get_peft_model(model, lcfg)
    pm.save_pretrained(os.path.join(out, "adapter"))
    C.emit({"event": "setup", "n_params": n_params,
            "n_trainable": sum(p.numel() for p in pm.parameters() if p.requires_grad)})


def peak_matmul_flops(n: int = 2048, reps: int = 5) -> float:
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def worker(args) -> None:
    size = C.size(args.size)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = LlamaForCausalLM.from_pretrained(os.path.join(args.dir, "base"), dtype=dtype)
    if not args.full:
        model = peft.PeftModel.from_pretrained(model, os.path.join(args.dir, "adapter"), is_trainable=True)
    # peft keeps LoRA weights in f32 even on a bf16 base (autocast_adapter_dtype=True).
    model.train()
    load_s = time.perf_counter() - t0
    attn_impl = getattr(model.config, "_attn_implementation", None)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=args.lr)
    data = [torch.from_numpy(b.astype("int64")) for b in C.batches(size, args.n_batches, seed=1)]
    k = [0]

    def step():
        x = data[k[0] % len(data)]
        k[0] += 1
        t = time.perf_counter()
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = float(out.loss.detach())
        return time.perf_counter() - t, loss

    first_s, first_loss = step()
    warm = [step()[0] for _ in range(args.warmup)]
    peak = peak_matmul_flops(args.peak_flops) if args.peak_flops else None
    C.emit({
        "event": "ready", "framework": "hf", "load_s": load_s, "first_step_s": first_s, "first_loss": first_loss,
        "warmup_s": warm, "attn_implementation": attn_impl, "threads": torch.get_num_threads(),
        "peak_matmul_flops": peak, "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                                 "peft": peft and peft.__version__},
        "baseline_rss": mem.baseline, "mem_method": mem.method, "env": C.env_summary(),
    })
    for cmd in C.commands():
        if cmd["cmd"] == "step":
            s, loss = step()
            C.emit({"event": "step", "s": s, "loss": loss})
        elif cmd["cmd"] == "breakdown":
            C.emit({"event": "breakdown", **breakdown(model, opt, data[0], cmd.get("reps", 3))})
        elif cmd["cmd"] == "done":
            gc.collect()
            C.emit({"event": "done", "peak_rss_above_baseline": mem.above_baseline()})
            return


def breakdown(model, opt, x, reps):
    """Forward / backward / optimizer split of the step (best of ``reps``)."""
    fw, bw, op = [], [], []
    for _ in range(reps):
        t = time.perf_counter()
        out = model(input_ids=x, labels=x)
        t1 = time.perf_counter()
        out.loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        fw.append(t1 - t)
        bw.append(t2 - t1)
        op.append(t3 - t2)
    return {"forward_s": min(fw), "backward_s": min(bw), "optimizer_s": min(op)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", required=True)
    p.add_argument("--size", default="issue", help="a name of _common.SIZES, optionally ':field=value,...'")
    p.add_argument("--full", action="store_true", help="full fine-tuning (every parameter, no adapter)")
    p.add_argument("--setup", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--n-batches", type=int, default=4)
    p.add_argument("--peak-flops", type=int, nargs="?", const=2048, default=0, metavar="N",
                   help="measure the peak f32 matmul rate with N x N products (default N: 2048)")
    args = p.parse_args()
    if args.setup:
        setup(C.size(args.size), args.dir, args.seed, args.r)
    else:
        worker(args)


if __name__ == "__main__":
    main()
