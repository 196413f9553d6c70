"""Command line of the forgetting experiments: ``python -m jpeft.forgetting`` (also
``jpeft forgetting ...``).

:func:`build_parser` / :func:`add_parser` build the argparse parser (standalone or as a
subcommand), :func:`run_from_args` runs parsed arguments and :func:`main` does both.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from typing import Optional, Sequence

from jpeft.errors import ConfigError, JpeftError
from jpeft.forgetting import experiment
from jpeft.forgetting.experiment import BENCHMARKS, get_benchmark
from jpeft.forgetting import sweep as SW
from jpeft.forgetting.sweep import STRENGTHS, SweepSpec

DESCRIPTION = """\
Measure catastrophic forgetting: train a list of methods over a sequence of tasks for several
seeds and write the score matrices (scores.json), per-seed metrics (metrics.csv), a markdown
table of mean ± std (results.md) and two plots (learning vs forgetting; score-matrix heat maps).

Benchmarks (data ships with the installed software, nothing is downloaded):
  split-digits-task   sklearn digits as 5 two-class tasks, task identity given (multi-head)
  split-digits-class  the same, class-incremental (choose among every class seen so far)
  language            byte-level Llama pretrained on Python stdlib code (task A, cached on
                      disk), then adapted to English prose from pydoc_data.topics (task B);
                      forgetting = rise of held-out code loss, learning = fall of prose loss
  language3           the same code model (default size small), then prose, then CSV data
                      files shipped with scikit-learn: three domains in sequence
"""

EPILOG = """\
examples:
  python -m jpeft.forgetting split-digits-task --list-methods
  python -m jpeft.forgetting split-digits-task --seeds 0 1 2 --out runs/digits-task
  python -m jpeft.forgetting split-digits-class --seeds 0 1 2 --methods naive,replay,lwf
  python -m jpeft.forgetting split-digits-class --methods naive,replay --replay-sizes 10 50 200 --out runs/replay-sizes
                                                       # the replay buffer at several sizes
  python -m jpeft.forgetting language --seeds 0 1 2 --out runs/language
  python -m jpeft.forgetting language --methods full,lora-r16 --steps 20 --pretrain-steps 50 \\
      --cache-dir /tmp/jpeft-cache --no-plots          # a quick smoke run
  python -m jpeft.forgetting language --sweep --seeds 0 1 2 3 4 --methods full,full+distill,lora-r4 \\
      --lr-factors 0.25 0.5 1 2 --strength-factors 0.3 1 3 --checkpoints 50 100 200
                                                       # learning-vs-forgetting curves and Pareto fronts

Method names are matched case-insensitively ignoring spaces and punctuation ("online-ewc"
selects "online EWC"). Seeds change initialisation (digits) and batch order; the pretrained
language model is trained once (its own fixed seed) and cached, so every seed adapts the same base.
"""


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower())


LR_FACTORS = (0.25, 0.5, 1.0, 2.0)  # --lr-factors and --strength-factors of a --sweep that gives none
STRENGTH_FACTORS = (1.0,)


def _configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("benchmark", choices=sorted(BENCHMARKS), help="which benchmark to run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds, one full run each (default: 0 1 2)")
    p.add_argument("--methods", default=None, help="comma-separated method names (default: all of the benchmark's)")
    p.add_argument("--list-methods", action="store_true", help="print the benchmark's methods and exit")
    p.add_argument("--steps", type=int, default=None, help="training steps per task (default: digits 300, language 300)")
    p.add_argument("--batch-size", type=int, default=None, help="examples per step (digits 32; language 16)")
    p.add_argument("--out", default=None, help="output folder (default: forgetting_results/<benchmark>; with --sweep "
                                               "forgetting_results/<benchmark>-sweep)")
    p.add_argument("--replay-sizes", type=int, nargs="+", default=None,
                   help="run every selected replay method once per buffer size (examples of earlier tasks kept), "
                        "named '<method> buffer N'")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--force", action="store_true",
                   help="replace the results of an earlier run in the output folder (refused without it)")
    g = p.add_argument_group("sweep (learning-vs-forgetting curves; see jpeft.forgetting.sweep)")
    g.add_argument("--sweep", action="store_true",
                   help="sweep every selected method over learning rates (and regularizer strengths) and checkpoints; "
                        "writes sweep.json, points.csv, summary.csv, report.md and a Pareto plot")
    g.add_argument("--lr-factors", type=float, nargs="+", default=None,
                   help="with --sweep: learning rates as multiples of each method's own (default: 0.25 0.5 1 2)")
    g.add_argument("--strength-factors", type=float, nargs="+", default=None,
                   help="with --sweep: regularizer strengths (EWC lambda, L2-SP, distillation weight, replay share) "
                        "as multiples of each method's own (default: 1)")
    g.add_argument("--checkpoints", type=int, nargs="+", default=[],
                   help="with --sweep: steps of the last task at which every task is also evaluated (the last step always is)")
    g = p.add_argument_group("language benchmark")
    g.add_argument("--pretrain-steps", type=int, default=None, help="steps of code pretraining when not cached (default 1500)")
    g.add_argument("--cache-dir", default=None, help="where the pretrained code model is cached (default $JPEFT_CACHE or ~/.cache/jpeft)")
    g.add_argument("--seq-len", type=int, default=None, help="bytes per training sequence (default 64)")
    g.add_argument("--model-size", dest="size", choices=("micro", "tiny", "small", "base"), default=None,
                   help="byte-level Llama size: micro ~0.03M, tiny ~0.13M (default for language), small ~0.9M (default for "
                        "language3), base ~5M parameters")
    return p


def build_parser(prog: str = "python -m jpeft.forgetting") -> argparse.ArgumentParser:
    """The standalone parser (``python -m jpeft.forgetting``)."""
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    return _configure(p)


def add_parser(subparsers, name: str = "forgetting") -> argparse.ArgumentParser:
    """Adds the runner as a subcommand to an ``argparse`` subparsers object; run the parsed
    namespace with :func:`run_from_args`."""
    p = subparsers.add_parser(name, help="run the catastrophic-forgetting benchmarks", description=DESCRIPTION,
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    return _configure(p)


def benchmark_from_args(args):
    kw = {}
    if args.steps is not None:
        if args.steps < 1:
            raise ConfigError(f"--steps must be >= 1, found {args.steps}.")
        kw["steps_per_task"] = args.steps
    if args.batch_size is not None:
        if args.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, found {args.batch_size}.")
        kw["batch_size"] = args.batch_size
    lang = {k: getattr(args, k) for k in ("pretrain_steps", "cache_dir", "seq_len", "size") if getattr(args, k) is not None}
    if lang and not args.benchmark.startswith("language"):
        opts = ", ".join("--model-size" if k == "size" else f"--{k.replace('_', '-')}" for k in lang)
        raise ConfigError(f"{opts} only apply to the language benchmarks (language, language3).")
    kw.update(lang)
    if args.benchmark.startswith("language"):  # its pretraining has a progress bar of its own
        kw["progress"] = not args.no_progress
    return get_benchmark(args.benchmark, **kw)


def select_methods(bench, names: Optional[str]):
    methods = bench.default_methods()
    if not names:
        return methods
    by = {_slug(m.name): m for m in methods}
    out = []
    for n in names.split(","):
        n = n.strip()
        if not n:
            continue
        m = by.get(_slug(n))
        if m is None:
            raise ConfigError(f"unknown method {n!r} for {bench.name}; available: {', '.join(m.name for m in methods)}.")
        out.append(m)
    return out


def with_replay_sizes(methods, sizes) -> list:
    """``methods`` with every replay method (``replay > 0``) replaced by one copy per buffer
    size in ``sizes``, named ``"<name> buffer <size>"``; the others unchanged."""
    if not sizes:
        return list(methods)
    if any(n < 1 for n in sizes):
        raise ConfigError(f"--replay-sizes must be positive integers, found {sizes}.")
    if not any(m.replay for m in methods):
        raise ConfigError("--replay-sizes given, but none of the selected methods uses replay; select one "
                          f"(available: {', '.join(m.name for m in methods)}).")
    out = []
    for m in methods:
        if m.replay:
            out += [dataclasses.replace(m, name=f"{m.name} buffer {n}", replay_capacity=int(n)) for n in sizes]
        else:
            out.append(m)
    return out


def run_from_args(args) -> int:
    bench = benchmark_from_args(args)
    methods = with_replay_sizes(select_methods(bench, args.methods), args.replay_sizes)
    if args.list_methods:
        for m in bench.default_methods():
            print(f"{m.name:>20s}  {m.describe()}")
        return 0
    if args.sweep:
        return _run_sweep(args, bench, methods)
    # a sweep's options would be ignored by the plain run: refused rather than dropped
    given = [o for o, v in (("--lr-factors", args.lr_factors), ("--strength-factors", args.strength_factors),
                            ("--checkpoints", args.checkpoints)) if v]
    if given:
        raise ConfigError(f"{', '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} with --sweep; add --sweep "
                          "for learning-vs-forgetting curves, or leave them out.")
    out = args.out or f"forgetting_results/{bench.name}"
    experiment.run(bench, methods, seeds=args.seeds, out_dir=out, progress=not args.no_progress, plots=not args.no_plots,
                   overwrite=args.force)
    print(f"wrote {out}/scores.json, metrics.csv, results.md" + ("" if args.no_plots else " and the PNG plots"))
    print(open(f"{out}/results.md").read())
    return 0


def families_from_args(methods, lr_factors, strength_factors) -> list:
    """One :class:`~jpeft.forgetting.sweep.SweepSpec` per method: its learning rate times each of
    ``lr_factors`` and, for a method with a regularizer, its strength times each of
    ``strength_factors``."""
    if any(not f > 0 for f in list(lr_factors) + list(strength_factors)):
        raise ConfigError(f"--lr-factors and --strength-factors must be > 0, found {lr_factors} and {strength_factors}.")
    fams = []
    for m in methods:
        regs = [k for k in STRENGTHS if getattr(m, k)]
        if len(regs) > 1:
            raise ConfigError(f"method {m.name!r} combines {regs}; a sweep scales one strength per family.")
        strength = regs[0] if regs else None
        strengths = [getattr(m, strength) * f for f in strength_factors] if strength else []
        fams.append(SweepSpec(m.name, m, lrs=[m.lr * f for f in lr_factors], strength=strength, strengths=strengths))
    return fams


def _run_sweep(args, bench, methods) -> int:
    fams = families_from_args(methods, args.lr_factors or LR_FACTORS, args.strength_factors or STRENGTH_FACTORS)
    out = args.out or f"forgetting_results/{bench.name}-sweep"
    SW.sweep(bench, fams, seeds=args.seeds, checkpoints=args.checkpoints, out_dir=out, progress=not args.no_progress,
             plots=not args.no_plots, overwrite=args.force)
    print(f"wrote {out}/sweep.json, points.csv, summary.csv, report.md" + ("" if args.no_plots else " and the Pareto plot"))
    print(open(f"{out}/report.md").read())
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parses ``argv`` (default ``sys.argv[1:]``) and runs. Returns the exit status; a
    :class:`~jpeft.errors.JpeftError` is printed as one line and gives status 2."""
    args = build_parser().parse_args(argv)
    try:
        return run_from_args(args)
    except JpeftError as e:
        print(f"error: {e}")
        return 2
