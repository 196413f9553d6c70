"""How jpeft's lead over Hugging Face PEFT holds as the work grows: a scaling sweep.

Axes (each point changes one thing from the base, the ``issue`` Llama of bench_vs_hf.py):

* ``seq``: sequence length 128 .. 4096 at a fixed number of tokens per batch (``--tokens``,
  default 4096: batch = tokens / seq);
* ``depth``: 2 .. 32 layers at sequence 256;
* ``rank``: LoRA rank 4 .. 256;
* ``mode``: LoRA against full fine-tuning (every parameter trainable, Adam on all), in both
  frameworks.

Every point is measured in the style of bench_vs_hf.py: each framework in its own process
(transformers + peft on the PyTorch CPU, jpeft), loaded from the same saved weights and the
same peft adapter, compiled and warmed up one at a time; then the workers take turns, each turn
``--per-turn`` back-to-back steps, so machine noise hits them alike; ``--rounds`` fresh rounds,
the per-round ratio of median step times, and the median over rounds. Reported per point:
step-time ratio jpeft / HF, model FLOPs utilisation of each (analytic step FLOPs / step time /
the peak f32 matmul FLOP/s measured in the same worker), peak resident memory above each
worker's baseline, XLA's compiled temporary memory of jpeft's step (load-independent), and
the MFU jpeft's step would need to meet the ratio goal at HF PEFT's measured time (against the
matmul rate measured in jpeft's worker; near 1, the whole step as fast as one large matmul).

Goals of issue 24: ratio <= 0.70 and jpeft MFU >= 0.45 at every point; peak memory growing
linearly with the sequence and at most HF PEFT's.

Examples::

    # the whole sweep (hours on a 2-core machine; run it on an idle one)
    python benchmarks/bench_scaling.py --json /tmp/scaling.json --markdown /tmp/scaling.md --plot /tmp/scaling.png

    # one axis
    python benchmarks/bench_scaling.py --axes seq --seq 256,1024,4096 --rounds 2

    # a sweep run axis by axis, joined into one report, table and plot
    python benchmarks/bench_scaling.py --axes seq,mode --json /tmp/a.json
    python benchmarks/bench_scaling.py --axes depth,rank --json /tmp/b.json
    python benchmarks/bench_scaling.py --merge /tmp/a.json /tmp/b.json --json /tmp/all.json --plot /tmp/all.png

    # toy sizes (the smoke test uses this)
    python benchmarks/bench_scaling.py --base toy --axes seq,mode --seq 16,32 --tokens 64 --rounds 1 --steps 1 --warmup 0
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


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def _ints(s):
    return [int(x) for x in s.split(",") if x]


def points(args):
    """``[(axis, value, size_spec, r, modes)]`` of the sweep."""
    out = []
    base = C.SIZES[args.base]
    seq0 = args.depth_seq or base.seq

    def spec(**kw):
        return args.base + ":" + ",".join(f"{k}={v}" for k, v in kw.items())

    axes = args.axes.split(",")
    if "seq" in axes:
        for s in _ints(args.seq):
            out.append(("seq", s, spec(seq=s, batch=max(1, args.tokens // s)), args.r, ("lora",)))
    if "depth" in axes:
        for n in _ints(args.depth):
            out.append(("depth", n, spec(layers=n, seq=seq0, batch=max(1, args.tokens // seq0)), args.r, ("lora",)))
    if "rank" in axes:
        for r in _ints(args.rank):
            out.append(("rank", r, spec(seq=seq0, batch=max(1, args.tokens // seq0)), r, ("lora",)))
    if "mode" in axes:
        out.append(("mode", "lora+full", spec(seq=seq0, batch=max(1, args.tokens // seq0)), args.r, ("lora", "full")))
    return out


def start(framework, mode, size_spec, r, args, workdir, tag):
    script = "_hf_worker.py" if framework == "hf" else "_jpeft_worker.py"
    argv = ["--dir", os.path.join(workdir, "model"), "--size", size_spec, "--r", str(r), "--warmup", str(args.warmup),
            "--peak-flops", str(args.peak_matmul), "--dtype", "f32"]
    if mode == "full":
        argv.append("--full")
    if framework == "jpeft":
        argv += ["--attention", args.attention, "--attention-block", str(args.attention_block), "--config", args.jpeft_config]
    env = {"XLA_FLAGS": args.xla_flags} if (framework == "jpeft" and args.xla_flags) else {}
    env.update(C.host_pages_env(framework, args.huge_pages))
    w = Worker(script, argv, os.path.join(workdir, f"{framework}_{mode}.{tag}.log"), env)
    try:
        return w, w.read("ready")
    except Exception:
        w.kill()
        raise


def one_point(args, axis, value, size_spec, r, modes, workdir):
    size = C.size(size_spec)
    log(f"[{axis}={value}] {size_spec}, r={r}: setup")
    run_once("_hf_worker.py", ["--setup", "--dir", os.path.join(workdir, "model"), "--size", size_spec, "--r", str(r)],
             os.path.join(workdir, f"setup.{axis}{value}.log"))
    names = [(f, m) for m in modes for f in ("hf", "jpeft")]
    rounds = []
    for rnd in range(args.rounds):
        order = names[rnd % len(names):] + names[: rnd % len(names)]
        workers, ready = {}, {}
        try:
            for n in order:
                log(f"  round {rnd + 1}: starting {n[0]} {n[1]}")
                workers[n], ready[n] = start(n[0], n[1], size_spec, r, args, workdir, f"{axis}{value}.r{rnd}")
            steps = {n: [] for n in names}
            losses = {n: [ready[n]["first_loss"]] for n in names}
            for i in range(args.steps):
                rot = order[i % len(order):] + order[: i % len(order)]
                for n in rot:
                    for _ in range(args.per_turn):
                        m = workers[n].ask("step", expect="step")
                        steps[n].append(m["s"])
                        losses[n].append(m["loss"])
            done = {n: workers[n].finish() for n in order}
        finally:
            for w in workers.values():
                w.kill()
        rounds.append({"steps": steps, "losses": losses, "ready": ready, "done": done})
    res = {"axis": axis, "value": value, "size": size_spec, "r": r, "tokens": size.tokens, "workers": {}}
    for f, m in names:
        def count(causal: bool) -> float:
            return (C.full_step_flops(size, causal=causal) if m == "full" else C.lora_step_flops(size, r, causal))["step"]

        flops, causal = count(False), count(True)
        step_s = C.median([C.median(rd["steps"][(f, m)]) for rd in rounds])
        peak = C.median([rd["ready"][(f, m)]["peak_matmul_flops"] for rd in rounds])
        peaks = [rd["done"][(f, m)]["peak_rss_above_baseline"] / 2**20 for rd in rounds]
        w = {"step_s": step_s, "mfu": flops / step_s / peak, "step_gflop": flops / 1e9,
             # the same with the attention FLOPs a causal kernel does (half the square): the
             # 'mfu' above counts the masked half too, which neither framework computes
             "mfu_causal": causal / step_s / peak, "step_gflop_causal": causal / 1e9,
             "peak_rss_mib": C.median(peaks), "peak_rss_mib_per_round": peaks}
        if f == "jpeft":
            w["xla_temp_mib"] = rounds[0]["ready"][(f, m)].get("xla_temp_bytes", -1) / 2**20
        res["workers"][f"{f}_{m}"] = w
    for m in modes:
        per_round = [C.median(rd["steps"][("jpeft", m)]) / C.median(rd["steps"][("hf", m)]) for rd in rounds]
        res[f"ratio_{m}"] = {"median": C.median(per_round), "min": float(min(per_round)),
                             "max": float(max(per_round)), "per_round": per_round}
        res[f"loss_check_{m}"] = same_work(rounds, m)
    return res


SAME_WORK_RTOL = 1e-3  # float32 round-off over a few Adam steps is ~1e-6 relative (bench_vs_hf's check)


def same_work(rounds, mode):
    """Whether the two workers of ``mode`` trained the same numbers: the loss of every step
    (the first, before any update, then one per timed step; the warm-up steps move both alike)
    of jpeft against HF PEFT, over every round. A point whose losses part measured different
    work (other weights, targets, rank, scale or update), and its ratio means nothing."""
    j = np.concatenate([np.asarray(rd["losses"][("jpeft", mode)], np.float64) for rd in rounds])
    h = np.concatenate([np.asarray(rd["losses"][("hf", mode)], np.float64) for rd in rounds])
    d = np.abs(j - h)
    rel = float((d / np.abs(h)).max())
    return {"steps": int(d.size), "max_abs": float(d.max()), "max_rel": rel, "first": [float(j[0]), float(h[0])],
            "same": bool(rel <= SAME_WORK_RTOL)}


RATIO_GOAL = 0.70  # issue 24: jpeft / HF PEFT step time at most this at every point


def goals(results):
    """Which of the issue's goals the measured points meet (None where not measured)."""
    lora = [p for p in results if "ratio_lora" in p]
    if not lora:
        return {}
    seq = sorted((p["value"], p["workers"]["jpeft_lora"]["peak_rss_mib"], p["workers"]["hf_lora"]["peak_rss_mib"])
                 for p in results if p["axis"] == "seq")
    out = {
        "ratio <= 0.70 at every point": all(p["ratio_lora"]["median"] <= RATIO_GOAL
                                            and p.get("loss_check_lora", {}).get("same", True) for p in lora),
        "jpeft MFU >= 0.45 at every point": all(p["workers"]["jpeft_lora"]["mfu"] >= 0.45 for p in lora),
    }
    if len(seq) >= 2:
        out["jpeft peak memory <= HF PEFT's at every sequence length"] = all(j <= h for _, j, h in seq)
        # linear: memory per extra token does not grow along the axis (within 25%), where growth
        # beyond that trend under 5% of the peak counts as noise (flat memory that rises by a few
        # MiB after falling is not superlinear; session 21's check without it said it was)
        slopes = [(b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(seq, seq[1:])]
        out["jpeft peak memory linear in sequence length"] = all(
            (s2 - 1.25 * max(s1, 0.0)) * (c[0] - b[0]) <= 0.05 * c[1]
            for s1, s2, b, c in zip(slopes, slopes[1:], seq[1:], seq[2:]))
    return out


def mfu_for_ratio(jpeft_worker, hf_worker, ratio: float = RATIO_GOAL) -> float:
    """The MFU jpeft's step would need for jpeft / HF = ``ratio`` at HF PEFT's measured step
    time, against the peak matmul rate measured in jpeft's own worker (XLA's, one large f32
    matmul). Near or above 1 the whole step, its norms, softmax, optimizer and small products
    included, would have to run as fast as that one large matmul alone."""
    return jpeft_worker["mfu"] * jpeft_worker["step_s"] / (ratio * hf_worker["step_s"])


def markdown(report) -> str:
    L = [f"Base size {report['base']}; {report['tokens']} tokens per batch; {report['rounds']} rounds x "
         f"{report['steps']} turns x {report['per_turn']} steps per worker; jpeft attention={report['attention']}"
         + (f", attention_block_size={report['attention_block']}" if report.get("attention_block") else "")
         + (f", {report['jpeft_config']}" if report.get("jpeft_config") else "") + ".",
         "", "| axis | value | size | r | jpeft / HF step (median, spread) | jpeft MFU | HF MFU | "
         "jpeft MFU the 0.70 goal needs | jpeft peak MiB | HF peak MiB | jpeft XLA temp MiB |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in report["points"]:
        for m in ("lora", "full"):
            if f"ratio_{m}" not in p:
                continue
            j, h, q = p["workers"][f"jpeft_{m}"], p["workers"][f"hf_{m}"], p[f"ratio_{m}"]
            L.append(f"| {p['axis']} ({m}) | {p['value']} | `{p['size']}` | {p['r']} | {q['median']:.3f} "
                     f"({q['min']:.3f}-{q['max']:.3f}) | {j['mfu']:.2f} | {h['mfu']:.2f} | {mfu_for_ratio(j, h):.2f} | "
                     f"{j['peak_rss_mib']:.0f} | "
                     f"{h['peak_rss_mib']:.0f} | {j.get('xla_temp_mib', -1):.1f} |")
    L.append("")
    for p in report["points"]:
        for m in ("lora", "full"):
            c = p.get(f"loss_check_{m}")
            if c is not None and not c["same"]:
                L.append(f"* **{p['axis']}={p['value']} ({m}): jpeft and HF PEFT losses differ** (max relative "
                         f"{c['max_rel']:.1e}, first {c['first'][0]:.5f} vs {c['first'][1]:.5f}): not the same work, "
                         "the ratio is not a comparison")
    for k, v in report["goals"].items():
        L.append(f"* {k}: {'met' if v else 'NOT met'} (as measured)")
    L.append("")
    L.append(f"Environment: {json.dumps(report['env'])}")
    return "\n".join(L)


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes = [a for a in ("seq", "depth", "rank") if any(p["axis"] == a for p in report["points"])]
    fig, ax = plt.subplots(1, max(1, len(axes)), figsize=(4.5 * max(1, len(axes)), 3.5), squeeze=False)
    for k, a in enumerate(axes):
        pts = sorted((p["value"], p["ratio_lora"]["median"], p["workers"]["jpeft_lora"]["mfu"])
                     for p in report["points"] if p["axis"] == a)
        x = [p[0] for p in pts]
        ax[0, k].plot(x, [p[1] for p in pts], "o-", label="step time jpeft / HF PEFT")
        ax[0, k].plot(x, [p[2] for p in pts], "s--", label="jpeft MFU")
        ax[0, k].axhline(0.70, color="grey", lw=0.8)
        ax[0, k].set_xscale("log", base=2)
        ax[0, k].set_xlabel(a)
        ax[0, k].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def summary(p) -> str:
    """One line per measured point, for the log while the sweep runs."""
    out = []
    for m in ("lora", "full"):
        if f"ratio_{m}" in p:
            j, h = p["workers"][f"jpeft_{m}"], p["workers"][f"hf_{m}"]
            out.append(f"{m}: jpeft/HF {p[f'ratio_{m}']['median']:.3f}, MFU {j['mfu']:.2f} vs {h['mfu']:.2f}, "
                       f"peak {j['peak_rss_mib']:.0f} vs {h['peak_rss_mib']:.0f} MiB")
    return f"{p['axis']}={p['value']}: " + "; ".join(out)


# the settings a merged report's parts must share: points measured otherwise are not one sweep
SHARED = ("base", "tokens", "rounds", "steps", "per_turn", "attention", "attention_block", "jpeft_config")
SHARED_ENV = ("cpu", "cpus", "xla_flags", "huge_pages")


def _report(args, results, t0, complete=True):
    return {"base": args.base, "tokens": args.tokens, "rounds": args.rounds, "steps": args.steps,
            "per_turn": args.per_turn, "attention": args.attention, "attention_block": args.attention_block,
            "jpeft_config": args.jpeft_config,
            "points": results,
            "goals": goals(results),
            "complete": complete,
            "env": {"cpus": os.cpu_count(), "cpu": C.cpu_model(), "load_avg_end": os.getloadavg(),
                    "xla_flags": args.xla_flags, "huge_pages": args.huge_pages, "wall_s": time.perf_counter() - t0}}


class MergeError(ValueError):
    """Reports given to ``--merge`` that are not parts of one sweep."""


def _load(path):
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, ValueError) as e:
        raise MergeError(f"--merge: cannot read {path!r} as a bench_scaling.py --json report: {e}") from None
    if not isinstance(report, dict) or "points" not in report:
        raise MergeError(f"--merge: {path!r} has no 'points': expected a report written by bench_scaling.py --json")
    report["_path"] = path
    return report


def merge(reports):
    """One report from the parts of a sweep run axis by axis (``--json`` of each run): the
    points in the order given, the goals judged over all of them. Parts must share the
    measuring settings and the CPU (:data:`SHARED`, :data:`SHARED_ENV`), and no point may be in
    two parts. A part written by a sweep stopped part-way (``complete: false``, as ``--json``
    stands until the last point) is refused: merged, its missing points would pass for a
    sweep judged whole."""
    if not reports:
        raise MergeError("--merge: no reports given")
    first = reports[0]
    for r in reports[1:]:
        diff = [k for k in SHARED if r.get(k) != first.get(k)]
        diff += [f"env.{k}" for k in SHARED_ENV if r.get("env", {}).get(k) != first.get("env", {}).get(k)]
        if diff:
            raise MergeError(f"--merge: {r['_path']!r} was measured with other settings than {first['_path']!r} "
                             f"({', '.join(diff)}); merge only parts of one sweep (same settings, same CPU)")
    seen = {}
    for r in reports:
        if r.get("complete") is False:
            raise MergeError(f"--merge: {r['_path']!r} is from a sweep stopped part-way (complete: false); "
                             "rerun its remaining points and merge that run's report instead")
        for p in r["points"]:
            key = (p["axis"], str(p["value"]))
            if key in seen:
                raise MergeError(f"--merge: point {key[0]}={key[1]} is in both {seen[key]!r} and {r['_path']!r}")
            seen[key] = r["_path"]
    results = [p for r in reports for p in r["points"]]
    out = {k: first.get(k) for k in SHARED}
    out.update(points=results, goals=goals(results), complete=True,
               env={**{k: first.get("env", {}).get(k) for k in SHARED_ENV},
                    "wall_s": sum(r.get("env", {}).get("wall_s", 0.0) for r in reports),
                    "load_avg_end": [r.get("env", {}).get("load_avg_end") for r in reports],
                    "merged_from": [os.path.basename(r["_path"]) for r in reports]})
    return out


def _write(report, args):
    C.write_report(report, markdown(report), args.markdown, args.json)
    if args.plot:
        plot(report, args.plot)
    return report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="issue", choices=sorted(C.SIZES), help="base size (default: issue)")
    p.add_argument("--axes", default="seq,depth,rank,mode", help="comma list of seq, depth, rank, mode")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per batch (default 4096)")
    p.add_argument("--seq", default="128,256,512,1024,2048,4096",
                   help="sequence lengths of the seq axis, a comma list (batch = --tokens / length; "
                        "default %(default)s)")
    p.add_argument("--depth", default="2,4,8,16,32", help="layer counts of the depth axis (default %(default)s)")
    p.add_argument("--depth-seq", type=int, default=256, help="sequence length of the depth/rank/mode points")
    p.add_argument("--rank", default="4,16,64,256", help="LoRA ranks of the rank axis (default %(default)s)")
    p.add_argument("--r", type=int, default=8, help="LoRA rank of the seq/depth/mode points (default 8)")
    p.add_argument("--rounds", type=int, default=3,
                   help="fresh rounds per point, each with new worker processes; the report takes the median "
                        "(default 3)")
    p.add_argument("--steps", type=int, default=4, help="turns per worker per round (default 4)")
    p.add_argument("--per-turn", type=int, default=3, help="back-to-back steps per turn (default 3)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per worker after compiling (default 2)")
    p.add_argument("--attention", default="auto", help="jpeft LlamaConfig.attention (default auto)")
    p.add_argument("--peak-matmul", type=int, default=2048, metavar="N",
                   help="each worker's peak f32 matmul rate (MFU's denominator) from N x N products (default 2048; "
                        "the smoke test's toy run takes a small one)")
    p.add_argument("--attention-block", type=int, default=0,
                   help="jpeft LlamaConfig.attention_block_size (default 0: the model's automatic tiles, "
                        "64-256 queries by up to 512 keys by the sequence length)")
    p.add_argument("--jpeft-config", default="",
                   help="more jpeft LlamaConfig fields, key=value,... (e.g. scan_layers=true,remat=true)")
    p.add_argument("--xla-flags", default=os.environ.get("XLA_FLAGS", ""),
                   help="XLA_FLAGS for jpeft's workers (default: this process's XLA_FLAGS)")
    C.add_huge_pages_arg(p)
    p.add_argument("--workdir", help="folder for the saved weights and adapter the workers load, and each worker's "
                                     "log (default: a new temporary one)")
    p.add_argument("--json", help="write the report (every worker's numbers, the goals) as JSON here")
    p.add_argument("--markdown", help="write the report's table as Markdown here (it is also printed)")
    p.add_argument("--plot", help="write a PNG plot (needs matplotlib)")
    p.add_argument("--merge", nargs="+", metavar="REPORT",
                   help="measure nothing: join the --json reports of a sweep run axis by axis (same settings, same "
                        "CPU) into one report, and write its --json/--markdown/--plot")
    args = p.parse_args(argv)
    if args.merge:
        try:
            return _write(merge([_load(f) for f in args.merge]), args)
        except MergeError as e:
            p.error(str(e))
    if min(args.rounds, args.steps, args.per_turn) < 1:
        p.error(f"--rounds, --steps and --per-turn must be >= 1 (nothing would be timed), found {args.rounds}, "
                f"{args.steps} and {args.per_turn}")
    if not points(args):
        p.error(f"no points to measure: --axes {args.axes!r} names none of seq, depth, rank, mode "
                "(or their value lists are empty)")
    t0 = time.perf_counter()
    with work_folder(args.workdir, "jpeft_scaling_", log) as workdir:
        todo, results = points(args), []
        for k, pt in enumerate(todo):
            results.append(one_point(args, *pt, workdir))
            log(f"  [{k + 1}/{len(todo)}] {summary(results[-1])}")
            report = _report(args, results, t0, complete=k + 1 == len(todo))
            if args.json:  # after every point: a sweep stopped part-way keeps what it measured
                C.write_report(report, "", json_path=args.json)
        return _write(report, args)


if __name__ == "__main__":
    main()
