"""`jpeft serve`'s engine under load: many distinct LoRA adapters against the merged model.

The same concurrent load (``--requests`` requests, ``--prompt`` prompt tokens and ``--new-tokens``
generated tokens each, all submitted at once to an engine with ``--slots`` decode rows) is run on:

* ``merged``: one adapter folded into the base weights, served with no bank (the single-tenant
  ceiling);
* ``bank, k adapters`` for k in ``--adapters`` (default 1, 8, 64): a bank of k LoRA adapters,
  request i routed to adapter ``i % k``.

It measures, per configuration: throughput (generated tokens / wall time from the first submit to
the last token), time to first token (TTFT: submit -> first token, queueing included; p50, p99)
and the per-token latency (the gaps between one request's consecutive tokens; p50, p99). Each
configuration runs ``--repeats`` times after one warm-up (compile) run, in a round-robin order,
and the median repeat is reported. The ratio column is tokens/s over ``merged``'s; the issue's
goal is 64 adapters at >= 0.8. On a shared machine wall-clock ratios swing with other
processes' load, so the table also gives the ratio of generated tokens per CPU-second of this
process (``time.process_time``, all threads), which counts only this process's work.

This times the engine (``jpeft.serve.Engine``) in-process, without HTTP, so the numbers are the
batching engine's, not the client's or the ASGI server's.

Example (docs/BENCHMARKS.md)::

    .venv/bin/python benchmarks/bench_serve.py --requests 64 --slots 16 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

import jpeft
from jpeft.bank import AdapterBank
from jpeft.serve import Engine, Request


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--targets", default="q_proj,v_proj", help="LoRA target modules (default q_proj,v_proj)")
    p.add_argument("--adapters", default="1,8,64", help="distinct adapters per configuration (default 1,8,64)")
    p.add_argument("--requests", type=int, default=64, help="requests per run (default 64)")
    p.add_argument("--slots", type=int, default=16, help="decode slots (default 16)")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens (default 32)")
    p.add_argument("--new-tokens", type=int, default=32, help="generated tokens per request (default 32)")
    p.add_argument("--chunk", type=int, default=32, help="prefill chunk (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (default 3)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p.parse_args(argv)


def run_load(engine: Engine, adapters, args, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    n = args.requests
    first, stamps, done = [None] * n, [[] for _ in range(n)], threading.Event()
    left = [n]
    lock = threading.Lock()

    def sink_for(i):
        def sink(ev):
            now = time.perf_counter()
            if ev.kind == "text":
                stamps[i].append(now)
            else:
                with lock:
                    left[0] -= 1
                    if left[0] == 0:
                        done.set()
        return sink

    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(n):
        prompt = rng.integers(1, args.vocab, args.prompt).tolist()
        engine.submit(Request(prompt, adapters[i % len(adapters)] if adapters else None, args.new_tokens,
                              sink_for(i), temperature=0.0))
    if not done.wait(600):
        raise RuntimeError(f"the load did not finish in 600 s: {engine.stats()}")
    wall = max(s[-1] for s in stamps) - t0
    cpu = time.process_time() - c0
    tokens = sum(len(s) for s in stamps)
    ttft = [s[0] - t0 for s in stamps]
    gaps = [b - a for s in stamps for a, b in zip(s, s[1:])]
    return {"tokens_per_s": tokens / wall, "wall_s": wall, "tokens": tokens, "tokens_per_cpu_s": tokens / cpu,
            "ttft_p50_ms": 1e3 * float(np.percentile(ttft, 50)), "ttft_p99_ms": 1e3 * float(np.percentile(ttft, 99)),
            "tpot_p50_ms": 1e3 * float(np.percentile(gaps, 50)), "tpot_p99_ms": 1e3 * float(np.percentile(gaps, 99))}


def main(argv=None):
    args = parse_args(argv)
    cfg = jpeft.models.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                                   num_layers=args.layers, num_heads=args.heads,
                                   max_position_embeddings=args.prompt + args.new_tokens + 8)
    model = jpeft.models.LlamaForCausalLM(cfg)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    lcfg = jpeft.LoraConfig(r=args.rank, alpha=2 * args.rank, target_modules=args.targets.split(","), init_weights="random")
    counts = [int(k) for k in args.adapters.split(",")]
    pool = {f"t{i}": jpeft.init(lcfg, params, jax.random.key(100 + i)) for i in range(max(counts))}
    max_len = args.prompt + args.new_tokens
    common = dict(slots=args.slots, max_len=max_len, chunk=args.chunk, max_queue=args.requests)
    engines = {"merged": (Engine(model, jpeft.merge(params, pool["t0"]), None, **common), [])}
    for k in counts:
        names = [f"t{i}" for i in range(k)]
        bank = AdapterBank.from_adapters({n: pool[n] for n in names}, capacity=max(counts), max_rank=args.rank)
        engines[f"bank, {k} adapter{'s' if k > 1 else ''}"] = (Engine(model, params, bank, **common), names)
    results = {name: [] for name in engines}
    for name, (eng, names) in engines.items():
        eng.start()
        run_load(eng, names, args, seed=0)  # compile
    for r in range(args.repeats):
        order = list(engines)
        np.random.default_rng(r).shuffle(order)
        for name in order:
            eng, names = engines[name]
            results[name].append(run_load(eng, names, args, seed=r + 1))
    for eng, _ in engines.values():
        eng.stop()
    table = {}
    for name, runs in results.items():
        med = sorted(runs, key=lambda x: x["tokens_per_s"])[len(runs) // 2]
        table[name] = med
    ref = table["merged"]["tokens_per_s"]
    dev = jax.devices()[0]
    print(f"device: {dev.platform} ({dev.device_kind}); model: {args.layers} layers x {args.hidden}, vocab {args.vocab}; "
          f"LoRA r={args.rank} on {args.targets}; {args.requests} requests x ({args.prompt} prompt + "
          f"{args.new_tokens} new) tokens, {args.slots} slots, median of {args.repeats}")
    cref = statistics.median(r["tokens_per_cpu_s"] for r in results["merged"])
    print(f"{'configuration':<20} {'tokens/s':>9} {'x merged':>9} {'x (CPU s)':>9} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'tok p50':>8} {'tok p99':>8}  (ms)")
    for name, m in table.items():
        cpu_ratio = statistics.median(r["tokens_per_cpu_s"] for r in results[name]) / cref
        print(f"{name:<20} {m['tokens_per_s']:>9.0f} {m['tokens_per_s'] / ref:>9.2f} {cpu_ratio:>9.2f} "
              f"{m['ttft_p50_ms']:>9.1f} {m['ttft_p99_ms']:>9.1f} {m['tpot_p50_ms']:>8.2f} {m['tpot_p99_ms']:>8.2f}")
    traces = {name: dict(eng.traces) for name, (eng, _) in engines.items()}
    print(f"compiled programs per engine (prefill, decode): {set(tuple(t.values()) for t in traces.values())}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": str(dev.device_kind), "results": results, "median": table,
                       "traces": traces}, f, indent=1)
    return table


if __name__ == "__main__":
    main()
