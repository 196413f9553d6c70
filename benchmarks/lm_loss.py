"""jpeft's LoRA training step with the loss taken from the whole logits against
:func:`jpeft.lm_loss` (the output layer and the cross-entropy a chunk of tokens at a time, as
``jpeft train`` takes it), in one process.

Memory (always): for each vocabulary size and sequence length of the grid, the step of the
issue Llama with that vocabulary (LoRA r=8 on all seven projections, Adam) is compiled from
abstract shapes (nothing is allocated, so 128k-word vocabularies take seconds) and XLA's
temporary memory reported for the whole-logits loss and for each chunk size, beside the size
of the float32 logits themselves.

Time (``--time``): on the ``--size`` model with random weights and every adapter tensor
random, the adapter gradient of each chunk size is compared with the whole-logits one, then
the compiled steps take turns, ``--per-turn`` back-to-back steps each, for ``--rounds`` rounds
in alternating order, with the training loop's host-heap handling around each step. One
process, so both see the same machine state; not a comparison with Hugging Face PEFT
(``bench_scaling.py`` pairs jpeft, which takes its loss this way, with HF PEFT).

Examples:
  python benchmarks/lm_loss.py --vocab 8192,32000,128256 --seq 1024,4096        # memory, ~1 min
  python benchmarks/lm_loss.py --vocab 8192 --seq 128 --batch 32 --time --chunks 128,256,512
  python benchmarks/lm_loss.py --size toy --vocab 512 --seq 32 --batch 2 --time --rounds 1   # seconds (smoke)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def ints(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        out = []
    if not out or any(x <= 0 for x in out):
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="issue", help="model, as in bench_scaling.py (default %(default)s; 'toy' for seconds)")
    p.add_argument("--vocab", type=ints, default=[8192, 32000, 128256], help="vocabulary sizes (default %(default)s)")
    p.add_argument("--seq", type=ints, default=[1024, 4096], help="sequence lengths (default %(default)s)")
    p.add_argument("--batch", type=int, default=1, help="rows a batch (default %(default)s)")
    p.add_argument("--chunks", type=ints, default=[256], help="jpeft.lm_loss chunk_tokens values (default %(default)s)")
    p.add_argument("--time", action="store_true", help="also time the steps (first vocabulary and length of the grid)")
    p.add_argument("--rounds", type=int, default=6, help="--time: rounds, alternating the order (default %(default)s)")
    p.add_argument("--per-turn", type=int, default=2, help="--time: back-to-back steps a turn (default %(default)s)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    import _common as C
    import _jpeft_worker as W
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import jpeft

    sys.stdout = sys.__stdout__  # importing the worker sent prints to stderr (its stdout is a protocol)
    base = C.size(args.size)
    variants = {"whole": None, **{f"chunk {c}": c for c in args.chunks}}
    opt = optax.adam(1e-4)

    def loss_of(model, chunk):
        def loss_fn(params, adapter, ids, key):
            return jpeft.lm_loss(model, params, adapter, ids, jnp.ones_like(ids), chunk_tokens=chunk)[0]
        return loss_fn

    memory = []
    print(f"{args.size} Llama (hidden {base.hidden}, {base.layers} layers), batch {args.batch}, LoRA r=8: "
          "XLA temporary MiB of the training step")
    print("| vocabulary | sequence | float32 logits MiB | " + " | ".join(variants) + " |")
    print("|---:|---:|---:|" + "---:|" * len(variants))
    for vocab in args.vocab:
        for seq in args.seq:
            size = dataclasses.replace(base, vocab=vocab, seq=seq, batch=args.batch)
            cfg = jpeft.models.LlamaConfig(vocab_size=vocab, hidden_size=size.hidden, intermediate_size=size.intermediate,
                                           num_layers=size.layers, num_heads=size.heads, max_position_embeddings=seq)
            model = jpeft.models.LlamaForCausalLM(cfg)
            ids = jax.ShapeDtypeStruct((args.batch, seq), jnp.int32)
            params = jax.eval_shape(model.init, jax.random.key(0), ids)
            adapter = jax.eval_shape(lambda p: jpeft.init(W.lora_config(8), p, jax.random.key(1)), params)
            opt_state = jax.eval_shape(opt.init, adapter)
            row = {"vocab": vocab, "seq": seq, "batch": args.batch, "logits_mib": args.batch * seq * vocab * 4 / 2**20}
            for label, chunk in variants.items():
                step = jpeft.make_train_step(loss_of(model, chunk), opt)
                compiled = step.lower(params, adapter, opt_state, ids, jax.random.key(3)).compile()
                row[label] = compiled.memory_analysis().temp_size_in_bytes / 2**20
            memory.append(row)
            print(f"| {vocab:,} | {seq:,} | {row['logits_mib']:,.1f} | "
                  + " | ".join(f"{row[label]:,.1f}" for label in variants) + " |", flush=True)

    timing = None
    if args.time:
        size = dataclasses.replace(base, vocab=args.vocab[0], seq=args.seq[0], batch=args.batch)
        model, params = W.build_random(size, jnp.float32)
        data = [jnp.asarray(b) for b in C.batches(size, 2, seed=1)]
        adapter = jpeft.init(W.lora_config(8), params, jax.random.key(1), model, data[0][:1])
        leaves, tree = jax.tree_util.tree_flatten(adapter)  # every adapter tensor random (LoRA's B too)
        keys = jax.random.split(jax.random.key(2), len(leaves))
        adapter = jax.tree_util.tree_unflatten(tree, [0.02 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])
        key = jax.random.key(3)
        compiled, grads, timing = {}, {}, {}
        for label, chunk in variants.items():
            fn = loss_of(model, chunk)
            compiled[label] = jpeft.make_train_step(fn, opt).lower(params, adapter, opt.init(adapter), data[0], key).compile()
            grads[label] = [np.asarray(g) for g in jax.tree_util.tree_leaves(jax.jit(jax.grad(fn, argnums=1))(params, adapter, data[0], key))]
            timing[label] = {"grad_max_rel_diff": max(float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))
                                                      for a, b in zip(grads[label], grads["whole"]))}
        times = W.alternate_steps(compiled, params, adapter, opt, data, key, args.rounds, args.per_turn)
        ref = statistics.median(times["whole"])
        print(f"\n{args.size} Llama, vocabulary {size.vocab:,}, {args.batch} x {size.seq} tokens: "
              f"{args.rounds} rounds x {args.per_turn} steps per variant")
        print("| loss | step s (median) | / whole | adapter gradient max rel. diff |")
        print("|---|---:|---:|---:|")
        for label in variants:
            timing[label].update(step_s=statistics.median(times[label]), steps_s=times[label],
                                 ratio=statistics.median(times[label]) / ref)
            t = timing[label]
            print(f"| {label} | {t['step_s']:.3f} | {t['ratio']:.3f} | {t['grad_max_rel_diff']:.1e} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": args.size, "batch": args.batch, "chunks": args.chunks, "memory": memory, "time": timing,
                       "env": C.env_summary()}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
