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

from _jpeft_args import FORGETTING_DESCRIPTION, FORGETTING_EPILOG, add_forgetting, forgetting_options
from jpeft.errors import ConfigError, JpeftError
from jpeft.forgetting import experiment
from jpeft.forgetting.experiment import get_benchmark
from jpeft.forgetting import sweep as SW
from jpeft.forgetting.sweep import STRENGTHS, SweepSpec


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower())


LR_FACTORS = (0.25, 0.5, 1.0, 2.0)  # --lr-factors and --strength-factors of a --sweep that gives none
STRENGTH_FACTORS = (1.0,)




def build_parser(prog: str = "python -m jpeft.forgetting") -> argparse.ArgumentParser:
    """The standalone parser (``python -m jpeft.forgetting``)."""
    p = argparse.ArgumentParser(prog=prog, description=FORGETTING_DESCRIPTION, epilog=FORGETTING_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    return forgetting_options(p)


def add_parser(subparsers, name: str = "forgetting") -> argparse.ArgumentParser:
    """Adds the runner as a subcommand to an ``argparse`` subparsers object; run the parsed
    namespace with :func:`run_from_args`."""
    return add_forgetting(subparsers, name, command="python -m jpeft.forgetting")


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
