"""jpeft's LoRA training step under XLA compiler options, against the same step without them,
in one process: ``jpeft.make_train_step(..., compiler_options=...)``, the per-step way to try
an XLA option (a flag in ``XLA_FLAGS`` applies to every program of the process instead).

For the issue Llama of ``--size`` (random weights, LoRA on all seven projections with every
adapter tensor random, Adam), each variant is compiled once and reported with its compile
time and XLA temporary memory; its adapter gradient on one batch is compared with the default
compilation's (largest ``|difference| / max |default|`` over the adapter's leaves: options
that change the arithmetic show here); then the compiled steps take turns, ``--per-turn``
back-to-back steps each, for ``--rounds`` rounds in alternating order, with jpeft's training
loop's host-heap handling around each step. The table gives each variant's median step time
and its ratio to the default. One process, so both see the same machine state; it is not a
comparison with Hugging Face PEFT (``bench_scaling.py --xla-flags ...`` pairs a flag with HF
PEFT in separate processes).

A variant is ``LABEL:KEY=VALUE`` (more options joined with ``;``). XLA's list-valued options
take enum names, e.g. ``xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT,
LIBRARY_FUSION_TYPE_ELTWISE`` (the ``XLA_FLAGS`` spelling ``dot,eltwise`` is refused here).

Examples:
  python benchmarks/step_options.py --size issue:seq=1024,batch=4 \\
      --variant 'ynn-eltwise:xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE'
  python benchmarks/step_options.py --size toy --rounds 1 --per-turn 1 \\
      --variant 'no-fast-min-max:xla_cpu_enable_fast_min_max=false'     # seconds (smoke)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def parse_variant(text: str) -> tuple[str, dict]:
    """``LABEL:KEY=VALUE[;KEY=VALUE...]`` -> ``(label, {key: value})``; values ``true`` /
    ``false`` and integers become bool / int."""
    label, sep, rest = text.partition(":")
    items = [kv for kv in rest.split(";") if kv.strip()]
    if not sep or not label.strip() or not items or any("=" not in kv for kv in items):
        raise SystemExit(f"--variant: expected LABEL:KEY=VALUE[;KEY=VALUE...], e.g. "
                         f"'fastmath:xla_cpu_enable_fast_math=true', got {text!r}")
    if label.strip() == "default":
        raise SystemExit("--variant: the label 'default' is the step without options; pick another label")
    opts = {}
    for kv in items:
        key, value = (s.strip() for s in kv.split("=", 1))
        low = value.lower()
        opts[key] = True if low == "true" else False if low == "false" else int(value) if value.lstrip("-").isdigit() else value
    return label.strip(), opts


def _refused(label: str, opts: dict, e: Exception) -> str:
    return (f"--variant {label!r}: XLA refused the options {opts}: {str(e).rstrip('.')}. List-valued options take "
            "enum names (LIBRARY_FUSION_TYPE_DOT, not dot).")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="issue:seq=256,batch=16",
                   help="model and batch, as in bench_scaling.py (default %(default)s; 'toy' for seconds)")
    p.add_argument("--variant", action="append", required=True, metavar="LABEL:KEY=VALUE[;KEY=VALUE]",
                   help="compiler options of one variant (repeatable); the default compilation always runs too")
    p.add_argument("--r", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--rounds", type=int, default=6, help="rounds, alternating the variants' order (default 6)")
    p.add_argument("--per-turn", type=int, default=2, help="back-to-back steps per variant and round (default 2)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    variants = {"default": None}
    for v in args.variant:
        label, opts = parse_variant(v)
        if label in variants:
            raise SystemExit(f"--variant: the label {label!r} is given twice")
        variants[label] = opts

    import _common as C
    import _jpeft_worker as W
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import jpeft

    sys.stdout = sys.__stdout__  # importing the worker sent prints to stderr (its stdout is a protocol); the table goes to stdout
    for label, opts in variants.items():  # options XLA refuses end the run before the model is built and the default
        if opts:                            # step compiled (minutes at the issue size); any program shows the refusal
            try:
                jax.jit(lambda x: x + 1, compiler_options=opts).lower(jnp.float32(0)).compile()
            except Exception as e:
                raise SystemExit(_refused(label, opts, e)) from None
    size = C.size(args.size)
    model, params = W.build_random(size, jnp.float32)  # the sweep worker's random Llama
    data = [jnp.asarray(b) for b in C.batches(size, 2, seed=1)]
    adapter = jpeft.init(W.lora_config(args.r), params, jax.random.key(1), model, data[0][:1])
    # every adapter tensor random (LoRA's B starts at zero, which would leave A's gradient zero)
    leaves, tree = jax.tree_util.tree_flatten(adapter)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    adapter = jax.tree_util.tree_unflatten(
        tree, [0.02 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])
    opt = optax.adam(1e-4)

    def loss_fn(params, adapter, ids, key):
        return W.step_loss(model, params, adapter, ids)

    key = jax.random.key(3)
    rows, compiled, grads = {}, {}, {}
    for label, opts in variants.items():
        step = jpeft.make_train_step(loss_fn, opt, compiler_options=opts)
        t = time.perf_counter()
        try:
            compiled[label] = step.lower(params, adapter, opt.init(adapter), data[0], key).compile()
        except Exception as e:  # XLA names the option and the value it refused
            raise SystemExit(_refused(label, opts, e)) from None
        rows[label] = {"options": opts or {}, "compile_s": time.perf_counter() - t,
                       "xla_temp_mib": compiled[label].memory_analysis().temp_size_in_bytes / 2**20}
        grad = jax.jit(jax.grad(loss_fn, argnums=1), compiler_options=opts)(params, adapter, data[0], key)
        grads[label] = [np.asarray(g) for g in jax.tree_util.tree_leaves(grad)]
        ref = grads["default"]
        rows[label]["grad_max_rel_diff"] = max(
            float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30)) for a, b in zip(grads[label], ref))
        print(json.dumps({"variant": label, **rows[label]}), file=sys.stderr, flush=True)

    times = W.alternate_steps(compiled, params, adapter, opt, data, key, args.rounds, args.per_turn)
    base = statistics.median(times["default"])
    for label in variants:
        rows[label].update(step_s=statistics.median(times[label]), steps_s=times[label],
                           ratio=statistics.median(times[label]) / base)
    print(f"{args.size}, LoRA r={args.r}: {args.rounds} rounds x {args.per_turn} steps per variant")
    print("| variant | step s (median) | / default | XLA temporary MiB | compile s | adapter gradient max rel. diff |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, row in rows.items():
        print(f"| {label} | {row['step_s']:.3f} | {row['ratio']:.3f} | {row['xla_temp_mib']:.0f} | "
              f"{row['compile_s']:.1f} | {row['grad_max_rel_diff']:.1e} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": args.size, "r": args.r, "rounds": args.rounds, "per_turn": args.per_turn,
                       "env": C.env_summary(), "variants": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
