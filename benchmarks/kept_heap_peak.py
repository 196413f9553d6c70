"""Peak host memory of a training run through ``jpeft.fit`` under the `jpeft` command's kept
heap (issue 24): with and without fit's ``malloc_trim`` after the first step and after each
evaluation (``--no-release``), or around a step whose temporaries were cut off from the top of the
heap (``--no-step-release``).

The model is the issue's Llama (hidden 512, MLP 1376, vocabulary 8192) saved by transformers and
loaded with ``jpeft.models.from_pretrained``, as `jpeft train` loads it; batch 16 x 256 tokens
(``--seq``, ``--tokens``),
Adam; ``--full`` trains every parameter, otherwise LoRA r=8 on every projection. Prints each
step's time and resident memory above the baseline, then the peak (VmHWM). Run it under the
tunables the `jpeft` command sets on the CPU:

    T=$(python -c "import _jpeft_launcher as L; print(L.huge_pages_env()['GLIBC_TUNABLES'])")
    GLIBC_TUNABLES=$T python benchmarks/kept_heap_peak.py --full
    GLIBC_TUNABLES=$T python benchmarks/kept_heap_peak.py --full --no-release
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import time


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+)", f.read()).group(1)) * 1024


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--seq", type=int, default=256, help="sequence length (default 256)")
    ap.add_argument("--tokens", type=int, default=4096,
                    help="tokens per batch (default 4096): batch = tokens / seq, as in bench_scaling.py")
    ap.add_argument("--full", action="store_true", help="full fine-tuning (default: LoRA r=8, all linear)")
    ap.add_argument("--no-release", action="store_true",
                    help="make jpeft.fit's malloc_trim a no-op (the A/B): after the first step, after evaluations, "
                         "and around steps whose temporaries were cut off from the top of the heap (StepHeap)")
    ap.add_argument("--no-step-release", action="store_true",
                    help="keep fit's wait after each step but not its release of a hole cut off from the top of the "
                         "heap (StepHeap with max_releases=0; the A/B of session 26)")
    ap.add_argument("--eval-every", type=int, default=0, help="evaluate (a jitted loss) every N steps")
    ap.add_argument("--dir", default="", help="where the transformers model is saved (default: a temporary folder)")
    args = ap.parse_args(argv)

    import tempfile

    import jax
    import optax
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import jpeft
    import jpeft.models

    folder = args.dir or tempfile.mkdtemp(prefix="kept-heap-")
    if not os.path.exists(os.path.join(folder, "config.json")):
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1376,
                                     num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
                                     max_position_embeddings=max(512, args.seq))).save_pretrained(folder)
    if args.no_release:
        jpeft._hostmem.release = lambda: False
    if args.no_step_release:
        jpeft._hostmem.StepHeap = functools.partial(jpeft._hostmem.StepHeap, max_releases=0)
    base = _status("VmRSS")
    model, params = jpeft.models.from_pretrained(folder)
    ids = jax.random.randint(jax.random.key(0), (max(1, args.tokens // args.seq), args.seq + 1), 0, 8192)
    if args.full:
        frozen, adapter = {}, params
    else:
        frozen, adapter = params, jpeft.init(jpeft.LoraConfig(r=8, target_modules="all-linear"), params,
                                             jax.random.key(1), model, ids[:, :8])

    def loss_fn(p, a, rows, key):
        logits = model.apply(a, rows[:, :-1]) if args.full else jpeft.apply(model, p, a, rows[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, rows[:, 1:]).mean()

    opt = optax.adam(1e-4)
    step = jpeft.make_train_step(loss_fn, opt)
    rows = []

    def on_step(i, metrics):
        rows.append({"step": i, "rss_mib": (_status("VmRSS") - base) / 2**20, "t": time.perf_counter()})

    eval_loss = jax.jit(lambda a: loss_fn(frozen, a, ids, None))
    jpeft.fit(step, frozen, adapter, opt.init(adapter), (ids for _ in range(args.steps)), key=jax.random.key(0),
              num_steps=args.steps, on_step=on_step, eval_every=args.eval_every,
              eval_fn=(lambda a, i: {"loss": float(eval_loss(a))}) if args.eval_every else None)
    peak = (_status("VmHWM") - base) / 2**20
    for a, b in zip(rows, rows[1:]):
        print(f"step {b['step']}: {b['t'] - a['t']:.2f} s, resident {b['rss_mib']:.0f} MiB above baseline")
    print(f"{'full' if args.full else 'LoRA'}, {args.layers} layers, batch {ids.shape[0]} x {args.seq}, GLIBC_TUNABLES="
          f"{os.environ.get('GLIBC_TUNABLES', '')!r}, fit's release {'off' if args.no_release else 'on'}"
          f"{', step releases off' if args.no_step_release else ''}: "
          f"peak {peak:.0f} MiB above baseline")
    return {"peak_mib": peak, "steps": rows}


if __name__ == "__main__":
    main()
