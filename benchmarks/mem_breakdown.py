"""Where the LoRA step's memory goes: resident memory after each phase.

Builds a random jpeft Llama (hidden 1024, 8 layers, vocab 8192, f32: 118M parameters, 450 MiB),
then reports the process's resident memory above its post-import baseline after: creating
the params, ``jpeft.init``, lowering the jitted LoRA step, compiling it, and the first steps,
with XLA's own memory analysis of the compiled step. Run it twice with different targets to see
how compilation memory grows with the number of adapted sites.

Examples:
  python benchmarks/mem_breakdown.py --targets q_proj
  python benchmarks/mem_breakdown.py --targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj
  python benchmarks/mem_breakdown.py --full          # full fine-tuning with Adam, for comparison
  python benchmarks/mem_breakdown.py --scan --remat  # the layer-scanned model, rematerialised
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax
import psutil

import jpeft


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                   help="comma-separated LoRA target modules (default: all linear layers)")
    p.add_argument("--layers", type=int, default=8, help="decoder layers (default 8)")
    p.add_argument("--full", action="store_true", help="full fine-tuning (Adam on every parameter) instead of LoRA")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--scan", action="store_true", help="layer-scanned model (LlamaConfig(scan_layers=True))")
    p.add_argument("--remat", action="store_true", help="rematerialise each layer (LlamaConfig(remat=True))")
    args = p.parse_args(argv)

    proc = psutil.Process()
    rss = lambda: proc.memory_info().rss / 2**20  # noqa: E731
    base = rss()
    row = lambda what: print(f"{what:<28s} {rss() - base:8.0f} MiB above baseline")  # noqa: E731

    cfg = jpeft.models.LlamaConfig(vocab_size=8192, hidden_size=1024, intermediate_size=2752,
                                   num_layers=args.layers, num_heads=16, scan_layers=args.scan, remat=args.remat)
    model = jpeft.models.LlamaForCausalLM(cfg)
    ids = jnp.zeros((1, 128), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), ids)
    params = jax.tree.map(lambda s: jnp.full(s.shape, 0.01, s.dtype), shapes)
    jax.block_until_ready(params)
    print(f"params: {jpeft.tree.count(params):,} ({jpeft.tree.nbytes(params) / 2**20:.0f} MiB)")
    row("params")

    def lm_loss(logits, ids):
        lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
        return -jnp.mean(jnp.take_along_axis(lp, ids[:, 1:, None], -1))

    opt = optax.adam(1e-3)
    if args.full:
        def step_fn(p, s, b):
            loss, g = jax.value_and_grad(lambda p: lm_loss(model.apply(p, b), b))(p)
            u, s = opt.update(g, s, p)
            return optax.apply_updates(p, u), s, {"loss": loss}

        step = jax.jit(step_fn, donate_argnums=(0, 1))
        state = opt.init(params)
        row("optimizer state")
        lowered = step.lower(params, state, ids)
    else:
        adapter = jpeft.init(jpeft.LoraConfig(r=8, target_modules=args.targets.split(",")), params, jax.random.key(1),
                             model, ids)
        row("jpeft.init")
        state = opt.init(adapter)
        step = jpeft.make_train_step(lambda p, a, b, k: lm_loss(jpeft.apply(model, p, a, b), b), opt)
        lowered = step.lower(params, adapter, state, ids, jax.random.key(0))
    row("lowered")
    compiled = lowered.compile()
    row("compiled")
    ma = compiled.memory_analysis()
    print(f"XLA memory analysis: temp {ma.temp_size_in_bytes / 2**20:.0f} MiB, arguments "
          f"{ma.argument_size_in_bytes / 2**20:.0f} MiB, outputs {ma.output_size_in_bytes / 2**20:.0f} MiB")
    for i in range(args.steps):
        if args.full:
            params, state, m = step(params, state, ids)
        else:
            adapter, state, m = step(params, adapter, state, ids, jax.random.key(i))
        float(m["loss"])
        row(f"after step {i}")


if __name__ == "__main__":
    main()
