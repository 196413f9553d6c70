"""jpeft side of benchmarks/bench_vs_hf.py (JAX on the CPU).

Modes:

* worker (default): loads ``DIR/base`` with ``jpeft.models.from_pretrained`` and the LoRA
  adapter that peft wrote to ``DIR/adapter`` (so both frameworks start from the same numbers),
  compiles the training step (timed), warms up, then runs one step per ``{"cmd": "step"}``
  line on stdin; ``{"cmd": "breakdown"}`` times the parts of the step and ``{"cmd": "profile"}``
  writes a ``jax.profiler`` trace and answers with the most expensive XLA ops;
  ``{"cmd": "done"}`` answers with the peak resident memory above the baseline after imports.
* ``--memory lora|full``: the LoRA-versus-full-fine-tuning memory comparison on a randomly
  initialised model of ``--size`` (no files), a few steps, then the peak memory.

Not meant to be run by hand; see ``bench_vs_hf.py --help``.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

C.quiet_stdout()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import jpeft  # noqa: E402
import jpeft.data  # noqa: E402
import jpeft.models  # noqa: E402
from jpeft.core import logits_of  # noqa: E402

mem = C.PeakRSS()  # baseline after imports

DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}


# ------------------------------------------------------------------------------------- model
def step_loss(model, params, adapter, ids):
    """Mean next-token cross-entropy in float32 over every target (what transformers'
    ``ForCausalLMLoss`` computes), as ``jpeft train`` takes it (:func:`jpeft.lm_loss`: the output layer
    and the cross-entropy a chunk of tokens at a time), over every target; ``adapter=None``
    with ``params`` differentiated is full fine-tuning."""
    return jpeft.lm_loss(model, params, adapter, ids, jnp.ones_like(ids))[0]


def _value(v: str):
    return {"true": True, "false": False}.get(v.lower(), int(v) if v.lstrip("-").isdigit() else v)


def load(folder: str, dtype, attention: str = "auto", block: int = 0, config: str = ""):
    """The saved Llama; ``config`` is ``key=value,...`` of LlamaConfig fields (``scan_layers=true``)."""
    extra = {"attention_block_size": block} if block else {}
    extra.update({k: _value(v) for k, v in (kv.split("=", 1) for kv in config.split(",") if kv)})
    out = jpeft.models.from_pretrained(folder, dtype=dtype, attention=attention, **extra)
    model, params = (out.model, out.params) if hasattr(out, "model") else out
    return model, params


def build_random(size: C.Size, dtype, seed: int = 0, scan: bool = False, remat: bool = False):
    """A randomly initialised jpeft Llama of ``size`` with params created directly in ``dtype``
    (drawn in float32 one leaf at a time); ``scan``: layer-scanned (stacked weights),
    ``remat``: rematerialise each layer in the backward pass."""
    cfg = jpeft.models.LlamaConfig(
        vocab_size=size.vocab, hidden_size=size.hidden, intermediate_size=size.intermediate,
        num_layers=size.layers, num_heads=size.heads, num_kv_heads=size.kv_heads or size.heads,
        dtype=dtype, param_dtype=dtype, scan_layers=scan, remat=remat,
    )
    model = jpeft.models.LlamaForCausalLM(cfg)
    ids = jnp.zeros((size.batch, size.seq), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), ids)
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    # One small jitted generator per distinct (shape, dtype), leaf by leaf: a single jit over
    # all leaves takes minutes to compile and its peak would be charged to the runs. A
    # layer-stacked leaf is drawn one layer at a time into its buffer (jpeft.scan.set_layer),
    # as from_pretrained fills it, so no leaf ever exists twice.
    gen = jax.jit(lambda k, shape, dtype: (jax.random.normal(k, shape, jnp.float32) * 0.02).astype(dtype),
                  static_argnums=(1, 2))
    keys = jax.random.split(jax.random.key(seed), len(flat))
    out = []
    for k, (path, s) in zip(keys, flat):
        if scan and any(getattr(p, "key", None) == "layers" for p in path):
            buf = jnp.zeros(s.shape, s.dtype)
            for i, ki in enumerate(jax.random.split(k, s.shape[0])):
                buf = jpeft.scan.set_layer(buf, gen(ki, s.shape[1:], s.dtype), i)
            out.append(buf)
        else:
            out.append(gen(k, s.shape, s.dtype))
    return model, jax.tree.unflatten(treedef, out)


def lora_config(r: int):
    return jpeft.LoraConfig(r=r, alpha=2 * r, dropout=0.0, target_modules=list(C.LORA_TARGETS))


def alternate_steps(compiled: dict, params, adapter, opt, data, key, rounds: int, per_turn: int) -> dict:
    """Compiled training steps (``{label: step}``, each ``step(params, adapter, opt_state,
    batch, key)``) timed in turns in one process: each from its own copy of ``adapter`` and
    optimizer state, one warm-up step each, then ``rounds`` rounds in alternating order of
    ``per_turn`` back-to-back steps, with the training loop's host-heap handling around each
    step (``_hostmem.StepHeap``, as ``jpeft.fit``). Returns ``{label: [seconds, ...]}``."""
    from jpeft import _hostmem

    heap = _hostmem.StepHeap()
    state = {label: (jax.tree.map(jnp.copy, adapter), opt.init(adapter)) for label in compiled}
    count = [0]

    def one_step(label):
        a, o = state[label]
        count[0] += 1
        t = time.perf_counter()
        heap.before(count[0] > 1)
        a, o, metrics = compiled[label](params, a, o, data[count[0] % len(data)], key)
        jax.block_until_ready((a, o, metrics))  # waits for the whole step, the update included
        heap.after()
        state[label] = (a, o)
        return time.perf_counter() - t

    for label in compiled:
        one_step(label)
    heap.release()
    times = {label: [] for label in compiled}
    order = list(compiled)
    for r in range(rounds):
        for label in (order if r % 2 == 0 else order[::-1]):
            times[label].extend(one_step(label) for _ in range(per_turn))
    heap.release()
    return times


def load_peft_adapter(adapter, folder: str):
    """Replaces the LoRA matrices of ``adapter`` by those peft saved in ``folder`` (transposed
    to jpeft's ``[in, r] / [r, out]`` orientation)."""
    from safetensors.numpy import load_file

    from jpeft.tree import hf_name

    sd = load_file(os.path.join(folder, "adapter_model.safetensors"))
    out = {}
    for path, node in adapter.items():
        name = hf_name(path)
        ka = f"base_model.model.{name}.lora_A.weight"
        kb = f"base_model.model.{name}.lora_B.weight"
        if ka not in sd:
            raise KeyError(f"peft adapter has no {ka}; keys look like {sorted(sd)[:3]}")
        a = jnp.asarray(sd[ka].T, node.lora_A.dtype)
        b = jnp.asarray(sd[kb].T, node.lora_B.dtype)
        assert a.shape == node.lora_A.shape and b.shape == node.lora_B.shape, (path, a.shape, node.lora_A.shape)
        out[path] = type(node)(a, b, node.magnitude, node.scale, node.layout, node.dropout)
    return out


# --------------------------------------------------------------------------------- measuring
def peak_matmul_flops(n: int = 2048, reps: int = 5) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(jnp.dot)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def best_time(fn, *args, reps=3):
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return best


# ------------------------------------------------------------------------------------ worker
def worker(args) -> None:
    size = C.size(args.size)
    dtype = DTYPES[args.dtype]
    t0 = time.perf_counter()
    model, params = load(os.path.join(args.dir, "base"), dtype, args.attention, args.attention_block, args.config)
    data = [jnp.asarray(b) for b in C.batches(size, args.n_batches, seed=1)]
    if args.full:  # every parameter is the trainable tree; nothing frozen
        params, adapter = {}, params
    else:
        if "scan_layers=true" in args.config.lower():  # stacked sites: jpeft's own PEFT loader stacks them
            # float32 factors whatever the base dtype, as peft keeps them (autocast_adapter_dtype) and
            # as the unscanned path below gets them from jpeft.init: the same trainable numbers and
            # Adam state as the HF worker's
            _, adapter = jpeft.hf.load_peft(os.path.join(args.dir, "adapter"), params, dtype=jnp.float32)
        else:
            adapter = jpeft.init(lora_config(args.r), params, jax.random.key(0))
            adapter = load_peft_adapter(adapter, os.path.join(args.dir, "adapter"))
    jax.block_until_ready((params, adapter))
    load_s = time.perf_counter() - t0

    def loss_fn(params, adapter, batch, key):
        if args.full:
            return step_loss(model, adapter, None, batch)
        return step_loss(model, params, adapter, batch)

    opt = optax.adam(args.lr)
    opt_state = opt.init(adapter)
    step_fn = jpeft.make_train_step(loss_fn, opt)
    key = jax.random.key(0)

    t = time.perf_counter()
    lowered = step_fn.lower(params, adapter, opt_state, data[0], key)
    lower_s = time.perf_counter() - t
    t = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t
    try:
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        xla_flops = float(ca.get("flops", float("nan")))
    except Exception:  # cost analysis is best effort
        xla_flops = float("nan")
    try:
        xla_temp = int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # memory analysis is best effort (not every backend reports it)
        xla_temp = -1

    state = {"adapter": adapter, "opt_state": opt_state, "k": 0}
    heap = jpeft._hostmem.StepHeap()  # as jpeft.fit does around each step (counted in the step's time)

    def step():
        x = data[state["k"] % len(data)]
        state["k"] += 1
        t = time.perf_counter()
        heap.before(state["k"] > 1)
        a, o, m = compiled(params, state["adapter"], state["opt_state"], x, key)
        jax.block_until_ready((a, o))  # the update itself, not only the loss, is in the step's time
        loss = float(m["loss"])
        heap.after()
        s = time.perf_counter() - t
        state["adapter"], state["opt_state"] = a, o
        return s, loss

    first_s, first_loss = step()
    peak = peak_matmul_flops(args.peak_flops) if args.peak_flops else None
    jax.block_until_ready(state["adapter"])
    heap.release()  # as jpeft.fit (what `jpeft train` runs) does after its first step and other work
    warm = [step()[0] for _ in range(args.warmup)]
    C.emit({
        "event": "ready", "framework": "jpeft", "dtype": args.dtype, "load_s": load_s, "lower_s": lower_s,
        "compile_s": compile_s, "first_step_s": first_s, "first_loss": first_loss, "warmup_s": warm,
        "xla_flops": xla_flops, "xla_temp_bytes": xla_temp, "peak_matmul_flops": peak,
        "versions": {"jax": jax.__version__, "jpeft": jpeft.__version__},
        "baseline_rss": mem.baseline, "mem_method": mem.method, "env": C.env_summary(),
        "n_params": int(jpeft.tree.count(params)), "n_trainable": int(jpeft.tree.count(state["adapter"])),
    })
    for cmd in C.commands():
        if cmd["cmd"] == "step":
            s, loss = step()
            C.emit({"event": "step", "s": s, "loss": loss})
        elif cmd["cmd"] == "breakdown":
            C.emit({"event": "breakdown", **breakdown(model, params, state["adapter"], data[0], loss_fn,
                                                    cmd.get("reps", 3))})
        elif cmd["cmd"] == "profile":
            from _profile import top_ops

            d = cmd["dir"]
            with jax.profiler.trace(d, create_perfetto_trace=True):
                for _ in range(cmd.get("steps", 2)):
                    step()
            C.emit({"event": "profile", "dir": d, "top": top_ops(d, compiled.as_text(), n=cmd.get("top", 25),
                                                                steps=cmd.get("steps", 2))})
        elif cmd["cmd"] == "done":
            gc.collect()
            C.emit({"event": "done", "peak_rss_above_baseline": mem.above_baseline()})
            return


def breakdown(model, params, adapter, x, loss_fn, reps):
    """Times the pieces of the step: base forward, forward with LoRA, value_and_grad (best of
    ``reps``; the full step is timed by the caller)."""
    key = jax.random.key(0)
    fwd_base = jax.jit(lambda p, x: step_loss(model, p, None, x))
    fwd = jax.jit(lambda p, a, x: loss_fn(p, a, x, key))
    grad = jax.jit(lambda p, a, x: jax.value_and_grad(lambda a: loss_fn(p, a, x, key))(a))
    logits_only = jax.jit(lambda p, a, x: logits_of(jpeft.apply(model, p, a, x)))
    return {
        "forward_base_s": best_time(fwd_base, params, x, reps=reps),
        "forward_lora_s": best_time(fwd, params, adapter, x, reps=reps),
        "forward_logits_s": best_time(logits_only, params, adapter, x, reps=reps),
        "value_and_grad_s": best_time(grad, params, adapter, x, reps=reps),
    }


# ------------------------------------------------------------------------------------ memory
def memory(args) -> None:
    """LoRA or full fine-tuning on a random model; reports the peak RSS above the baseline."""
    size = C.size(args.size)
    dtype = DTYPES[args.dtype]
    model, params = build_random(size, dtype, scan=args.scan, remat=args.remat)
    jax.block_until_ready(params)
    after_params = mem.current_above_baseline()
    ids = jnp.asarray(C.batches(size, 1, seed=1)[0])
    key = jax.random.key(0)
    opt = optax.adam(args.lr)
    times = []
    marks = {}

    def after_step(i):
        if i == 0:  # the first step includes compilation; later steps show training alone
            marks["through_first_step"] = mem.above_baseline()
            marks["after_first_step_rss"] = mem.current_above_baseline()
            marks["reset"] = mem.reset_peak()

    if args.memory == "lora":
        adapter = jpeft.init(lora_config(args.r), params, jax.random.key(1), model, ids)

        def loss_fn(params, adapter, batch, key):
            return step_loss(model, params, adapter, batch)

        opt_state = opt.init(adapter)
        step = jpeft.make_train_step(loss_fn, opt)
        for i in range(args.steps):
            t = time.perf_counter()
            adapter, opt_state, m = step(params, adapter, opt_state, ids, key)
            loss = float(m["loss"])
            times.append(time.perf_counter() - t)
            after_step(i)
        trainable = jpeft.tree.count(adapter)
    else:
        # Plain full fine-tuning: differentiate every parameter, Adam on all of them, params and
        # optimizer state donated (the leanest full fine-tuning step there is in JAX).
        def loss_full(params, batch):
            return step_loss(model, params, None, batch)

        @jax.jit
        def _step(params, opt_state, batch):
            loss, grads = jax.value_and_grad(loss_full)(params, batch)
            updates, opt_state = opt.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        step = jax.jit(_step, donate_argnums=(0, 1))
        opt_state = opt.init(params)
        for i in range(args.steps):
            t = time.perf_counter()
            params, opt_state, loss = step(params, opt_state, ids)
            loss = float(loss)
            times.append(time.perf_counter() - t)
            after_step(i)
        trainable = jpeft.tree.count(params)
    gc.collect()
    C.emit({
        "event": "memory", "mode": args.memory, "dtype": args.dtype, "size": args.size, "scan": args.scan, "remat": args.remat,
        "n_params": int(jpeft.tree.count(params)), "n_trainable": int(trainable),
        "param_bytes": int(jpeft.tree.nbytes(params)), "after_params_above_baseline": int(after_params),
        "peak_rss_above_baseline": int(max(mem.above_baseline(), marks.get("through_first_step", 0))),
        "peak_rss_above_baseline_after_first_step": int(mem.above_baseline()) if marks.get("reset") else None,
        "through_first_step": marks.get("through_first_step"), "baseline_rss": mem.baseline,
        "mem_method": mem.method, "loss": loss, "step_s": times,
    })


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", help="folder with base/ and adapter/ written by _hf_worker.py --setup")
    p.add_argument("--size", default="issue", help="a name of _common.SIZES, optionally ':field=value,...'")
    p.add_argument("--full", action="store_true", help="full fine-tuning (every parameter trainable, Adam on all)")
    p.add_argument("--attention", default="auto", help="LlamaConfig.attention: auto, blockwise, reference, cudnn")
    p.add_argument("--attention-block", type=int, default=0, help="LlamaConfig.attention_block_size (0: the default)")
    p.add_argument("--config", default="", help="more LlamaConfig fields, key=value,... (e.g. scan_layers=true,remat=true)")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--dtype", default="f32", choices=sorted(DTYPES))
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--n-batches", type=int, default=4)
    p.add_argument("--peak-flops", type=int, nargs="?", const=2048, default=0, metavar="N",
                   help="measure the peak f32 matmul rate with N x N products (default N: 2048)")
    p.add_argument("--memory", choices=["lora", "full"])
    p.add_argument("--steps", type=int, default=3, help="steps of the --memory run")
    p.add_argument("--scan", action="store_true", help="--memory: layer-scanned model (LlamaConfig(scan_layers=True))")
    p.add_argument("--remat", action="store_true", help="--memory: rematerialise each layer (LlamaConfig(remat=True))")
    args = p.parse_args()
    if args.memory:
        memory(args)
    else:
        worker(args)


if __name__ == "__main__":
    main()
