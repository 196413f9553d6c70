"""jpeft versus Hugging Face PEFT (transformers + peft on the PyTorch CPU), side by side.

What it does, in one run on one machine:

1. builds a random Llama (default: hidden 512, 4 layers, 8 heads, intermediate 1376, vocab
   8192, float32) in transformers, saves it with ``save_pretrained``, adds a peft LoRA adapter
   (r=8, alpha=16 on q,k,v,o,gate,up,down) and saves that too;
2. loads both into separate worker processes: transformers + peft, and jpeft
   (``jpeft.models.from_pretrained`` + the same LoRA matrices), so both train identical numbers
   on identical batches (8 x 256 tokens) with Adam (lr 1e-3);
3. runs ``--rounds`` rounds. In each round every worker is started, loaded, compiled and
   warmed up (one at a time, so they never compete), then the workers take turns of
   ``--per-turn`` back-to-back training steps (A, B, C, D, B, C, D, A, ...) so machine noise
   hits them alike. Per round the ratio of median step times is taken; the report gives the
   median ratio over rounds and its spread;
4. reports per framework: median step time, tokens/s, compile time of the first step (jpeft),
   peak resident memory above the process's baseline after imports, and model FLOPs
   utilisation (analytic step FLOPs / step time / the peak f32 matmul FLOP/s measured in the
   same worker with a 2048^3 matmul);
5. checks that both frameworks compute the same thing (loss of every step, f32 vs f32) and
   how far jpeft's bf16 compute path strays from f32 (loss of every step);
6. (``--memory-size``) inside jpeft on a ~400M-parameter Llama (batch 1 x 128): peak memory
   of a LoRA step over that of plain full fine-tuning (Adam on all parameters, donated
   buffers), with a float32 and with a bfloat16 base, each in its own process, one at a time;
7. (``--profile``) a timing breakdown of both steps and the most expensive XLA ops of jpeft's
   step from a ``jax.profiler`` trace.

Examples::

    # the full comparison (about 15-25 minutes on an idle 2-core machine)
    python benchmarks/bench_vs_hf.py --json /tmp/bench.json --markdown /tmp/bench.md

    # quick: float32 only, one round, no 400M memory run
    python benchmarks/bench_vs_hf.py --rounds 1 --no-bf16 --memory-size none

    # toy sizes (the smoke test uses this; seconds)
    python benchmarks/bench_vs_hf.py --size toy --memory-size 400m-toy --rounds 1 --steps 2 --warmup 1

XLA flags for the jpeft worker can be given with ``--xla-flags`` (they are recorded in the
report); PyTorch uses its defaults (one intra-op thread per core).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
from _workers import Worker, run_once, work_folder  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    def tqdm(x, **kw):
        return x


# name -> (script, extra args)
WORKERS = {
    "hf_f32": ("_hf_worker.py", ["--dtype", "f32"]),
    "hf_bf16": ("_hf_worker.py", ["--dtype", "bf16"]),
    "jpeft_f32": ("_jpeft_worker.py", ["--dtype", "f32"]),
    "jpeft_bf16": ("_jpeft_worker.py", ["--dtype", "bf16"]),
}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def start(name, args, workdir, rnd, xla_flags):
    script, extra = WORKERS[name]
    env = {}
    if script == "_jpeft_worker.py" and xla_flags:
        env["XLA_FLAGS"] = xla_flags
    env.update(C.host_pages_env("jpeft" if script == "_jpeft_worker.py" else "hf", args.huge_pages))
    if args.threads == 1:
        # one compute thread in each framework: compares kernels, not how each runtime's
        # thread pool copes with an oversubscribed machine
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", BENCH_PIN_CPU="0")
        if script == "_jpeft_worker.py":
            env["XLA_FLAGS"] = (xla_flags + " --xla_cpu_multi_thread_eigen=false").strip()
    w = Worker(script, ["--dir", os.path.join(workdir, "model"), "--size", args.size, "--warmup", str(args.warmup),
                        "--peak-flops", str(args.peak_matmul)] + extra, os.path.join(workdir, f"{name}.round{rnd}.log"), env)
    try:
        ready = w.read("ready")
    except Exception:
        w.kill()
        raise
    return w, ready


def one_round(args, names, workdir, rnd, profile_dir=None):
    order = names[rnd % len(names):] + names[: rnd % len(names)]
    workers, info = {}, {}
    try:
        for n in order:
            log(f"  round {rnd + 1}: starting {n} (load, compile, {args.warmup} warm-up steps)")
            workers[n], info[n] = start(n, args, workdir, rnd, args.xla_flags)
        steps = {n: [] for n in names}
        losses = {n: [info[n]["first_loss"]] for n in names}
        for i in tqdm(range(args.steps), desc=f"round {rnd + 1}/{args.rounds} turns", file=sys.stderr):
            rot = order[i % len(order):] + order[: i % len(order)]
            for n in rot:
                for _ in range(args.per_turn):  # back-to-back steps: the first after another worker's turn
                    m = workers[n].ask("step", expect="step")
                    steps[n].append(m["s"])
                    losses[n].append(m["loss"])
        extra = {}
        if profile_dir is not None:
            for n in names:
                log(f"  profiling {n}")
                extra[n] = {"breakdown": workers[n].ask("breakdown", expect="breakdown", reps=3)}
                if n.startswith("jpeft"):
                    d = os.path.join(profile_dir, n)
                    extra[n]["profile"] = workers[n].ask("profile", expect="profile", dir=d, steps=2, top=30)
        done = {n: workers[n].finish() for n in order}
    finally:
        for w in workers.values():
            w.kill()
    return {"order": order, "ready": info, "steps": steps, "losses": losses, "done": done, "extra": extra}


def summarize_speed(size, rounds, names):
    flops = C.lora_step_flops(size)["step"]
    out = {}
    for n in names:
        med = [C.median(r["steps"][n]) for r in rounds]
        peak = [r["ready"][n]["peak_matmul_flops"] for r in rounds]
        step_s = C.median(med)
        out[n] = {
            "step_s_median": step_s, "step_s_per_round": med,
            "step_s_min": float(min(min(r["steps"][n]) for r in rounds)),
            "tokens_per_s": size.tokens / step_s,
            "peak_matmul_gflops": C.median(peak) / 1e9,
            "mfu": flops / step_s / C.median(peak),
            "peak_rss_above_baseline_mb": C.median([r["done"][n]["peak_rss_above_baseline"] for r in rounds]) / 2**20,
            "first_step_s": C.median([r["ready"][n]["first_step_s"] for r in rounds]),
        }
        if n.startswith("jpeft"):
            out[n]["compile_s"] = C.median([r["ready"][n]["lower_s"] + r["ready"][n]["compile_s"] for r in rounds])
            out[n]["xla_flops"] = rounds[0]["ready"][n]["xla_flops"]
    out["analytic_step_gflop"] = flops / 1e9
    return out


def ratio_stats(rounds, a, b):
    """Per round: median(a) / median(b), and the median of adjacent per-step ratios."""
    per_round = [C.median(r["steps"][a]) / C.median(r["steps"][b]) for r in rounds]
    pairwise = [C.median(np.asarray(r["steps"][a]) / np.asarray(r["steps"][b])) for r in rounds]
    return {"median": C.median(per_round), "min": float(min(per_round)), "max": float(max(per_round)),
            "per_round": per_round, "pairwise_step_median": C.median(pairwise)}


def loss_diffs(rounds, a, b):
    r = rounds[0]
    la, lb = np.asarray(r["losses"][a]), np.asarray(r["losses"][b])
    n = min(len(la), len(lb))
    d = np.abs(la[:n] - lb[:n])
    return {"steps": int(n), "max_abs": float(d.max()), "max_rel": float((d / np.abs(lb[:n])).max()),
            "first": [float(la[0]), float(lb[0])], "last": [float(la[n - 1]), float(lb[n - 1])]}


def memory_runs(args, workdir):
    res = {}
    for dtype in ("f32", "bf16"):
        for mode in ("lora", "full"):
            log(f"  400M-class memory run: {mode} with a {dtype} base")
            env = {"XLA_FLAGS": args.xla_flags} if args.xla_flags else {}
            env.update(C.host_pages_env("jpeft", args.huge_pages))
            layout = {"unrolled": [], "scan": ["--scan"], "scan-remat": ["--scan", "--remat"]}[args.memory_model]
            msgs = run_once("_jpeft_worker.py", ["--memory", mode, "--dtype", dtype, "--size", args.memory_size,
                                                 "--steps", str(args.memory_steps)] + layout,
                            os.path.join(workdir, f"memory_{mode}_{dtype}.log"), env)
            res[f"{mode}_{dtype}"] = m = [m for m in msgs if m.get("event") == "memory"][-1]
            log(f"    peak RSS above baseline {m['peak_rss_above_baseline'] / 2**20:.0f} MiB "
                f"(params {m['param_bytes'] / 2**20:.0f} MiB), steps {[round(t, 1) for t in m['step_s']]} s")
    for dtype in ("f32", "bf16"):
        lo, fu = res[f"lora_{dtype}"], res[f"full_{dtype}"]
        res[f"ratio_{dtype}"] = lo["peak_rss_above_baseline"] / fu["peak_rss_above_baseline"]
    # LoRA on a bf16 base against full fine-tuning as it is usually run (f32 weights and Adam state)
    res["ratio_bf16_vs_full_f32"] = res["lora_bf16"]["peak_rss_above_baseline"] / res["full_f32"]["peak_rss_above_baseline"]
    res["model"] = args.memory_model
    return res


def markdown(report) -> str:
    s = report["speed"]
    size = report["size"]
    L = []
    L.append(f"Model: Llama hidden {size['hidden']}, {size['layers']} layers, {size['heads']} heads, intermediate "
             f"{size['intermediate']}, vocab {size['vocab']}; batch {size['batch']} x {size['seq']} "
             f"({size['batch'] * size['seq']} tokens/step); LoRA r=8 on q,k,v,o,gate,up,down; Adam. "
             f"{report['rounds']} rounds x {report['steps']} interleaved turns x {report.get('per_turn', 1)} steps after "
             f"{report['warmup']} warm-up steps. "
             f"Analytic step FLOPs: {s['analytic_step_gflop']:.1f} GFLOP.")
    L.append("")
    L.append("| worker | median step (s) | tokens/s | first step (s) | compile (s) | peak RSS above baseline (MiB) | "
             "peak matmul (GFLOP/s) | MFU |")
    L.append("|---|---|---|---|---|---|---|---|")
    for n in report["workers"]:
        v = s[n]
        comp = f"{v['compile_s']:.1f}" if "compile_s" in v else "n/a (eager)"
        L.append(f"| {n} | {v['step_s_median']:.3f} | {v['tokens_per_s']:.0f} | {v['first_step_s']:.2f} | {comp} | "
                 f"{v['peak_rss_above_baseline_mb']:.0f} | {v['peak_matmul_gflops']:.0f} | {v['mfu'] * 100:.0f}% |")
    L.append("")
    L.append("| ratio | median over rounds | spread (min to max) | per-round | median of adjacent per-step ratios |")
    L.append("|---|---|---|---|---|")
    for k, v in report["ratios"].items():
        L.append(f"| {k} | {v['median']:.3f} | {v['min']:.3f} to {v['max']:.3f} | "
                 f"{', '.join(f'{x:.3f}' for x in v['per_round'])} | {v['pairwise_step_median']:.3f} |")
    L.append("")
    for k, v in report["memory_ratios"].items():
        L.append(f"* peak memory {k}: {v:.3f}")
    L.append("")
    for k, v in report["loss_checks"].items():
        L.append(f"* loss {k}: max |diff| {v['max_abs']:.2e} (max relative {v['max_rel']:.2e}) over {v['steps']} steps; "
                 f"first {v['first'][0]:.5f} vs {v['first'][1]:.5f}, last {v['last'][0]:.5f} vs {v['last'][1]:.5f}")
    if report.get("memory_400m"):
        m = report["memory_400m"]
        L.append("")
        L.append(f"400M-class memory ({report['memory_size']}: {m['lora_f32']['n_params'] / 1e6:.0f}M parameters, "
                 f"batch {report['memory_size_dims']['batch']} x {report['memory_size_dims']['seq']}, "
                 f"model layout {m.get('model', 'unrolled')}):")
        L.append("")
        L.append("| run | trainable | params (MiB) | RSS after params (MiB) | peak RSS above baseline (MiB) | step times (s) |")
        L.append("|---|---|---|---|---|---|")
        for k in ("lora_f32", "full_f32", "lora_bf16", "full_bf16"):
            v = m[k]
            L.append(f"| {k} | {v['n_trainable'] / 1e6:.2f}M | {v['param_bytes'] / 2**20:.0f} | "
                     f"{v['after_params_above_baseline'] / 2**20:.0f} | {v['peak_rss_above_baseline'] / 2**20:.0f} | "
                     f"{', '.join(f'{t:.1f}' for t in v['step_s'])} |")
        L.append("")
        L.append(f"* LoRA / full, f32 base: **{m['ratio_f32']:.3f}** (goal <= 0.30)")
        L.append(f"* LoRA / full, bf16 base, against full fine-tuning in f32: **{m['ratio_bf16_vs_full_f32']:.3f}** "
                 "(goal <= 0.20)")
        L.append(f"* LoRA / full, both with a bf16 base (pure-bf16 full fine-tuning, bf16 Adam state): "
                 f"{m['ratio_bf16']:.3f}")
    if report.get("profile"):
        L.append("")
        for n, p in report["profile"].items():
            L.append(f"Breakdown {n}: " + ", ".join(f"{k} {v:.3f}" for k, v in p["breakdown"].items()
                                                    if isinstance(v, float)))
            if "profile" in p:
                L.append("")
                L.append(f"Top XLA ops of the {n} step (jax.profiler, ms per step):")
                L.append("")
                L.append("| ms | share | op | HLO (truncated) |")
                L.append("|---|---|---|---|")
                for r in p["profile"]["top"][:20]:
                    h = r["hlo"][:110].replace("|", "\\|")
                    L.append(f"| {r['ms_per_step']:.1f} | {r['share'] * 100:.1f}% | {r['op']} | `{h}` |")
                L.append("")
    L.append("")
    L.append(f"Environment: {json.dumps(report['env'])}")
    return "\n".join(L)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="issue", choices=sorted(C.SIZES), help="model/batch size of the speed runs "
                   "(default: issue = the issue-10 Llama, 8 x 256 tokens)")
    p.add_argument("--rounds", type=int, default=3, help="fresh worker processes per round (default 3)")
    p.add_argument("--steps", type=int, default=10, help="turns per worker per round (default 10)")
    p.add_argument("--per-turn", type=int, default=3,
                   help="back-to-back timed steps per turn (default 3, as bench_scaling.py; the issue-10 numbers "
                        "in docs/BENCHMARKS.md were measured with 1)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after the first one (default 3)")
    p.add_argument("--peak-matmul", type=int, default=2048, metavar="N",
                   help="each worker's peak f32 matmul rate (MFU's denominator) from N x N products (default 2048; "
                        "the smoke test's toy run takes a small one)")
    p.add_argument("--no-bf16", action="store_true", help="skip the bf16 workers (jpeft bf16 path, HF bf16)")
    p.add_argument("--memory-size", default="400m", choices=sorted(C.SIZES) + ["none"],
                   help="size of the LoRA-vs-full memory runs (default 400m; 'none' skips them)")
    p.add_argument("--memory-steps", type=int, default=2, help="training steps of each memory run (default 2)")
    p.add_argument("--memory-only", action="store_true", help="only the LoRA-vs-full memory runs (no speed rounds)")
    p.add_argument("--memory-model", default="scan-remat", choices=["unrolled", "scan", "scan-remat"],
                   help="model layout of the memory runs, the same for LoRA and full fine-tuning: 'unrolled' "
                        "(one program per layer), 'scan' (LlamaConfig(scan_layers=True)) or 'scan-remat' (also "
                        "remat=True; default)")
    p.add_argument("--profile", action="store_true", help="after round 1: step breakdowns and jpeft's top XLA ops")
    p.add_argument("--xla-flags", default=os.environ.get("XLA_FLAGS", ""), help="XLA_FLAGS for the jpeft workers")
    C.add_huge_pages_arg(p)
    p.add_argument("--threads", type=int, choices=[0, 1], default=0,
                   help="0: each framework's default threading (default); 1: one core each: every worker "
                        "pinned to CPU 0 (sched_setaffinity) with OMP/MKL_NUM_THREADS=1 for PyTorch and "
                        "--xla_cpu_multi_thread_eigen=false for XLA")
    p.add_argument("--workdir", help="keep models, logs and traces here (default: a temporary folder, removed)")
    p.add_argument("--json", help="write the full results (every step time and loss) to this file")
    p.add_argument("--markdown", help="write the report table to this file")
    args = p.parse_args(argv)
    if min(args.rounds, args.steps, args.per_turn) < 1:
        p.error(f"--rounds, --steps and --per-turn must be >= 1 (nothing would be timed), found {args.rounds}, "
                f"{args.steps} and {args.per_turn}")

    size = C.SIZES[args.size]
    names = ["hf_f32", "jpeft_f32"] + ([] if args.no_bf16 else ["hf_bf16", "jpeft_bf16"])
    t_all = time.perf_counter()
    with work_folder(args.workdir, "jpeft_bench_", log) as workdir:
        if args.memory_only:
            if args.memory_size == "none":
                p.error("--memory-only needs a --memory-size")
            report = {"memory_400m": memory_runs(args, workdir), "memory_size": args.memory_size,
                      "memory_size_dims": {k: getattr(C.SIZES[args.memory_size], k) for k in ("batch", "seq")},
                      "env": {"xla_flags": args.xla_flags, "huge_pages": args.huge_pages, "threads": args.threads or "default", "cpus": os.cpu_count(), "cpu": C.cpu_model(), "load_avg_end": os.getloadavg()}}
            for k in ("ratio_f32", "ratio_bf16", "ratio_bf16_vs_full_f32"):
                print(f"LoRA / full peak memory, {k[6:]}: {report['memory_400m'][k]:.3f}")
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(report, f, indent=1)
            return report
        log(f"[setup] random Llama ({args.size}) and peft LoRA adapter -> {workdir}/model")
        setup = run_once("_hf_worker.py", ["--setup", "--dir", os.path.join(workdir, "model"), "--size", args.size],
                         os.path.join(workdir, "setup.log"))[-1]
        rounds = []
        for rnd in range(args.rounds):
            prof = os.path.join(workdir, "profile") if (args.profile and rnd == 0) else None
            rounds.append(one_round(args, names, workdir, rnd, prof))
        speed = summarize_speed(size, rounds, names)
        ratios = {"step time jpeft_f32 / hf_f32": ratio_stats(rounds, "jpeft_f32", "hf_f32")}
        if not args.no_bf16:
            ratios["step time jpeft_bf16 / hf_bf16"] = ratio_stats(rounds, "jpeft_bf16", "hf_bf16")
            ratios["step time jpeft_bf16 / hf_f32"] = ratio_stats(rounds, "jpeft_bf16", "hf_f32")
            ratios["step time jpeft_bf16 / jpeft_f32"] = ratio_stats(rounds, "jpeft_bf16", "jpeft_f32")
        mem_ratios = {"jpeft_f32 / hf_f32": speed["jpeft_f32"]["peak_rss_above_baseline_mb"]
                      / speed["hf_f32"]["peak_rss_above_baseline_mb"]}
        checks = {"jpeft_f32 vs hf_f32": loss_diffs(rounds, "jpeft_f32", "hf_f32")}
        if not args.no_bf16:
            mem_ratios["jpeft_bf16 / hf_bf16"] = (speed["jpeft_bf16"]["peak_rss_above_baseline_mb"]
                                                 / speed["hf_bf16"]["peak_rss_above_baseline_mb"])
            checks["jpeft_bf16 vs jpeft_f32"] = loss_diffs(rounds, "jpeft_bf16", "jpeft_f32")
            checks["hf_bf16 vs hf_f32"] = loss_diffs(rounds, "hf_bf16", "hf_f32")
        mem400 = None
        if args.memory_size != "none":
            log(f"[memory] LoRA vs full fine-tuning, {args.memory_size}")
            mem400 = memory_runs(args, workdir)
        report = {
            "size": vars(size) if not hasattr(size, "__dataclass_fields__") else {
                k: getattr(size, k) for k in size.__dataclass_fields__},
            "setup": setup, "rounds": args.rounds, "steps": args.steps, "per_turn": args.per_turn, "warmup": args.warmup,
            "workers": names,
            "speed": speed, "ratios": ratios, "memory_ratios": mem_ratios, "loss_checks": checks,
            "memory_400m": mem400, "memory_size": args.memory_size,
            "memory_size_dims": ({k: getattr(C.SIZES[args.memory_size], k) for k in ("batch", "seq")}
                                 if args.memory_size != "none" else None),
            "profile": rounds[0]["extra"] if args.profile else None,
            "env": {"xla_flags": args.xla_flags, "huge_pages": args.huge_pages, "threads": args.threads or "default", "cpus": os.cpu_count(), "cpu": C.cpu_model(), "load_avg_end": os.getloadavg(),
                    "versions": {**rounds[0]["ready"]["hf_f32"]["versions"],
                                 **rounds[0]["ready"]["jpeft_f32"]["versions"]},
                    "mem_method": rounds[0]["ready"]["jpeft_f32"]["mem_method"],
                    "wall_s": time.perf_counter() - t_all},
            "raw_rounds": rounds,
        }
        C.write_report(report, markdown(report), args.markdown, args.json)
        return report


if __name__ == "__main__":
    main()
