"""Learning-versus-forgetting curves: a sweep per method over the learning rate, the training
length and, for regularizers, their strength, with Pareto fronts, bootstrap confidence
intervals over seeds and paired tests at equal learning.

A :class:`SweepSpec` is one *family* (a method, e.g. "LoRA r=4", or "full+distill") and the
grid it is swept over: learning rates and, for a regularizer, strengths. :func:`sweep` trains
every grid point for every seed with :func:`jpeft.forgetting.experiment.run_one` (the same
code path as :func:`jpeft.forgetting.run`), evaluating every task at ``checkpoints`` along the
last task's training (one run gives the whole training-length axis), and writes into
``out_dir``:

* ``sweep.json``: every point, the budgets and the analysis below;
* ``points.csv``: one row per (family, lr, strength, step, seed): learning, forgetting and the
  other matrix metrics;
* ``summary.csv``: one row per (family, lr, strength, step): mean and 95 % bootstrap interval
  over the seeds of learning and forgetting, and whether the point is on the family's front;
* ``sweep_<bench>_pareto.png``: learning against forgetting, every grid point (mean over
  seeds) and each family's Pareto front with bootstrap intervals;
* ``report.md``: the budgets, the fronts, and which families forget less *at equal learning*:
  per seed, each family's front is interpolated at common learning levels
  (:func:`jpeft.forgetting.stats.forgetting_at_learning`), and every pair of families is
  compared over the same seeds with :func:`jpeft.forgetting.stats.paired_test`.

Budgets (stated in the report): steps and examples (tokens, for a language benchmark) per
trained task are the same for every family; distillation adds one teacher forward pass per
training example; EWC reads ``fisher_examples`` examples of each finished task (forward and
backward) and keeps their Fisher; replay keeps ``replay_capacity`` examples of earlier tasks
and spends ``replay`` of each batch on them.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import math
import os
from typing import Callable, Optional, Sequence

import numpy as np

import jpeft
from jpeft import spectral
from jpeft.config import strict_json
from jpeft.errors import ConfigError, NotMergeableError
from jpeft.forgetting import stats as S
from jpeft.forgetting.experiment import (Benchmark, MethodSpec, check_names, check_out_dir, check_replay, check_seeds,
                                         forgetting_unit, get_benchmark, progress_bar, run_one, save_png, say)
from jpeft.forgetting.replay import replay_rows
from jpeft._files import atomic_write

__all__ = ["SweepSpec", "sweep", "combine", "write", "report", "budget", "analyse", "plot_sweep", "STRENGTHS"]

STRENGTHS = ("ewc", "l2sp", "distill", "replay", "orthogonal")


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """One family of a sweep: ``method`` with its ``lr`` (and ``strength`` field) replaced by
    every value of ``lrs`` (and ``strengths``).

    >>> from jpeft import FullFinetuneConfig
    >>> fam = SweepSpec("full+distill", MethodSpec("x", FullFinetuneConfig(), distill=1.0), lrs=(1e-3, 3e-3),
    ...                 strength="distill", strengths=(0.5, 2.0))
    >>> [(m.lr, m.distill) for m in fam.grid()]
    [(0.001, 0.5), (0.001, 2.0), (0.003, 0.5), (0.003, 2.0)]
    """

    name: str
    method: MethodSpec
    lrs: tuple = ()
    strength: Optional[str] = None
    strengths: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "lrs", tuple(float(x) for x in self.lrs) or (self.method.lr,))
        object.__setattr__(self, "strengths", tuple(float(x) for x in self.strengths))
        if any(not x > 0 for x in self.lrs):
            raise ConfigError(f"SweepSpec {self.name!r}: learning rates must be > 0, found {self.lrs}.")
        if self.strength is None and self.strengths:
            raise ConfigError(f"SweepSpec {self.name!r}: strengths {self.strengths} given without the field they set; "
                              f"pass strength= one of {STRENGTHS}.")
        if self.strength is not None:
            if self.strength not in STRENGTHS:
                raise ConfigError(f"SweepSpec {self.name!r}: strength must be one of {STRENGTHS}, found {self.strength!r}.")
            if not getattr(self.method, self.strength):
                raise ConfigError(f"SweepSpec {self.name!r}: the method's {self.strength} is 0, so it is not a "
                                  f"{self.strength} method; set it to a positive default.")
            if not self.strengths:
                object.__setattr__(self, "strengths", (float(getattr(self.method, self.strength)),))

    def grid(self) -> list:
        """The :class:`MethodSpec` of every (lr, strength) of the family (lr-major order)."""
        out = []
        for lr in self.lrs:
            for s in self.strengths or (None,):
                kw = {"lr": lr} if s is None else {"lr": lr, self.strength: s}
                tag = f"lr={lr:g}" + ("" if s is None else f" {self.strength}={s:g}")
                out.append(dataclasses.replace(self.method, name=f"{self.name} {tag}", **kw))
        return out


def budget(bench: Benchmark, spec: MethodSpec | SweepSpec) -> dict:
    """What one run of ``spec`` on ``bench`` spends, per trained task: steps, examples (and
    tokens when the benchmark has ``tokens_per_example``), extra forward passes, and access
    to the data of earlier tasks. For a :class:`SweepSpec` that sweeps the replay share, the
    shares of its grid (not only its method's default)."""
    shares = ()
    if isinstance(spec, SweepSpec):
        shares = spec.strengths if spec.strength == "replay" else ()
        spec = spec.method
    steps, bs = bench.steps_per_task, bench.batch_size
    out = {"steps": steps, "examples": steps * bs}
    tpe = getattr(bench, "tokens_per_example", None)
    if tpe:
        out["tokens"] = steps * bs * int(tpe)
    out["teacher_forward_examples"] = steps * bs if spec.distill else 0
    old = []
    if spec.replay:
        shares = sorted(set(shares)) or [spec.replay]
        old.append(f"replay buffer of {spec.replay_capacity} earlier examples, {', '.join(f'{x:g}' for x in shares)} of "
                   f"each batch ({', '.join(str(replay_rows(x, bs)) for x in shares)} of {bs})")
    if spec.ewc:
        old.append(f"Fisher from {spec.fisher_examples} examples of each finished task")
    out["old_data"] = "; ".join(old) or "none"
    return out


def _key(p):
    return (p["family"], p["lr"], p["strength"], p["step"])


def _fmt(x, nd=3):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _ci(lo_hi, nd=3):
    lo, hi = lo_hi
    return "n/a" if math.isnan(lo) else f"[{lo:.{nd}f}, {hi:.{nd}f}]"


def _reach(points, family, seeds):
    """The learning interval that ``family``'s per-seed Pareto fronts all cover (``None`` if empty)."""
    lo, hi = -math.inf, math.inf
    for sd in seeds:
        ps = [p for p in points if p["family"] == family and p["seed"] == sd]
        if not ps:
            return None
        ls = np.array([p["learning"] for p in ps])[S.pareto_front([p["learning"] for p in ps],
                                                                  [p["forgetting"] for p in ps])]
        lo, hi = max(lo, ls.min()), min(hi, ls.max())
    return (lo, hi) if lo <= hi else None


def _learning_levels(points, families, seeds, n=7):
    """``n`` evenly spaced learning levels over the range some family reaches in every seed,
    keeping those that at least two families reach (so that a paired comparison exists)."""
    reach = [r for r in (_reach(points, f, seeds) for f in families) if r is not None]
    if len(reach) < 2:
        return []
    lo, hi = min(r[0] for r in reach), max(r[1] for r in reach)
    cands = np.linspace(lo, hi, n) if hi > lo else np.array([lo])
    return [float(x) for x in cands if sum(r[0] <= x <= r[1] for r in reach) >= 2]


def analyse(points: Sequence[dict], seeds: Sequence[int], *, levels: Optional[Sequence[float]] = None,
            n_resamples: int = 10_000, alpha: float = 0.05) -> dict:
    """The statistics of a sweep's points (dicts with ``family, lr, strength, step, seed,
    learning, forgetting``).

    Returns ``{"configs", "fronts", "levels", "at_level", "pairs"}``: per grid point (family,
    lr, strength, step) the mean and bootstrap interval over seeds of learning and forgetting;
    per family the keys of its Pareto front (of the mean points); the learning levels; per
    level and family the per-seed forgetting on that seed's front (``nan`` where the front
    does not reach the level) with mean and interval when every seed reaches it; per level and
    pair of families reached in every seed, the paired test of their forgetting, ``a - b``
    (negative: ``a`` forgets less), its Holm-adjusted t-test p-value ``p_holm`` over all the
    sweep's (level, pair) tests, and ``"less"`` naming the one that forgets significantly less
    (``p_holm < alpha`` and the interval excludes 0) or ``None``. With one seed there is no
    paired test (``pairs`` is empty; the intervals are ``nan``).

    Raises:
      ConfigError: no seed, or a repeated seed (its runs would count twice in every paired test).
    """
    seeds = check_seeds(seeds, "the sweep analysis")
    finite = [p for p in points if np.isfinite(p["learning"]) and np.isfinite(p["forgetting"])]
    groups: dict = {}
    for p in finite:
        groups.setdefault(_key(p), []).append(p)
    configs = []
    for k, ps in groups.items():
        lv = [p["learning"] for p in ps]
        fv = [p["forgetting"] for p in ps]
        configs.append({"family": k[0], "lr": k[1], "strength": k[2], "step": k[3], "n": len(ps),
                        "learning": float(np.mean(lv)), "learning_ci": S.bootstrap_ci(lv, n_resamples=n_resamples),
                        "forgetting": float(np.mean(fv)), "forgetting_ci": S.bootstrap_ci(fv, n_resamples=n_resamples)})
    families = list(dict.fromkeys(p["family"] for p in finite))
    fronts = {}
    for fam in families:
        cs = [c for c in configs if c["family"] == fam]
        idx = S.pareto_front([c["learning"] for c in cs], [c["forgetting"] for c in cs])
        fronts[fam] = [[cs[i]["lr"], cs[i]["strength"], cs[i]["step"]] for i in idx]
    levels = list(levels) if levels is not None else _learning_levels(finite, families, seeds)
    at_level, pairs = [], []
    for L in levels:
        per = {}
        for fam in families:
            vals = []
            for sd in seeds:
                ps = [p for p in finite if p["family"] == fam and p["seed"] == sd]
                vals.append(S.forgetting_at_learning([p["learning"] for p in ps], [p["forgetting"] for p in ps], L)
                            if ps else float("nan"))
            ok = bool(vals) and all(np.isfinite(vals))
            per[fam] = {"per_seed": vals, "reached": ok,
                        "mean": float(np.mean(vals)) if ok else float("nan"),
                        "ci": S.bootstrap_ci(vals, n_resamples=n_resamples) if ok else (float("nan"), float("nan"))}
        at_level.append({"learning": float(L), "families": per})
        for a, b in itertools.combinations(families, 2):
            # one seed has no spread to test against: the fronts and means are reported, no paired test
            if len(seeds) < 2 or not (per[a]["reached"] and per[b]["reached"]):
                continue
            r = S.paired_test(per[a]["per_seed"], per[b]["per_seed"], n_resamples=n_resamples)
            pairs.append({"learning": float(L), "a": a, "b": b, **r})
    # the decision is corrected for all (level, pair) tests of the sweep (Holm-Bonferroni)
    for r, ph in zip(pairs, S.holm([r["p_t"] for r in pairs])):
        r["p_holm"] = float(ph)
        sig = np.isfinite(ph) and ph < alpha and (r["ci"][0] > 0 or r["ci"][1] < 0)
        r["less"] = (r["a"] if r["mean_diff"] < 0 else r["b"]) if sig else None
    return {"configs": configs, "fronts": fronts, "levels": levels, "at_level": at_level, "pairs": pairs,
            "alpha": alpha, "n_resamples": n_resamples}


def sweep(
    benchmark: Benchmark | str,
    families: Sequence[SweepSpec],
    *,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    checkpoints: Sequence[int] = (),
    out_dir: str | os.PathLike = "forgetting_sweep",
    levels: Optional[Sequence[float]] = None,
    n_resamples: int = 10_000,
    progress: bool = True,
    plots: bool = True,
    log: Optional[Callable] = print,
    overwrite: bool = False,
) -> dict:
    """Runs every family's grid for every seed and writes the artifacts (module docstring).

    Args:
      benchmark: a :class:`~jpeft.forgetting.experiment.Benchmark` or a built-in name.
      families: the :class:`SweepSpec` list (unique names).
      seeds: one run per grid point and seed; the analysis pairs families by seed (same data
        order).
      checkpoints: steps of the last task's training at which the tasks are also evaluated
        (the final step always is).
      out_dir: where the artifacts go.
      levels: learning levels for the equal-learning comparison (default: 7 evenly spaced
        over the learning range that some family's fronts cover in every seed, keeping those
        that at least two families reach).
      n_resamples: bootstrap resamples.
      progress, plots, log: a tqdm bar over all steps; the PNG; one line per finished run.
      overwrite: replace the results of an earlier sweep in ``out_dir``; without it such a
        folder is refused before anything is trained.

    Returns:
      The dict written to ``sweep.json``.

    Raises:
      ConfigError: no family or seed, repeated family names or seeds.
      OverwriteError: ``out_dir`` holds an earlier sweep's results and ``overwrite`` is false.
    """
    bench = get_benchmark(benchmark) if isinstance(benchmark, str) else benchmark
    families = check_names(families, "sweep() needs at least one SweepSpec.", "family")
    seeds = check_seeds(seeds, "sweep()")
    steps = sorted({int(c) for c in checkpoints} | {bench.steps_per_task})
    grids = {f.name: f.grid() for f in families}
    check_replay(bench, [m for g in grids.values() for m in g])
    check_out_dir(out_dir, _ARTIFACTS, overwrite)
    os.makedirs(out_dir, exist_ok=True)
    trained = len(bench.task_names) - bench.pretrained_tasks
    total = len(seeds) * sum(len(g) for g in grids.values()) * trained * bench.steps_per_task
    results = {
        "benchmark": bench.name, "tasks": list(bench.task_names), "score": bench.score_name,
        "higher_is_better": bench.higher_is_better, "learning_name": bench.learning_name,
        "steps_per_task": bench.steps_per_task, "batch_size": bench.batch_size, "seeds": seeds,
        "checkpoints": steps, "settings": bench.settings(),
        "families": {f.name: {"description": f.method.describe().rsplit(", lr=", 1)[0], "lrs": list(f.lrs), "strength": f.strength,
                              "strengths": list(f.strengths), "budget": budget(bench, f)} for f in families},
        "points": [], "runs": [],
    }
    with progress_bar(progress, total, f"sweep:{bench.name}") as bar:
        for seed in seeds:
            for f in families:
                for spec in grids[f.name]:
                    r = run_one(bench, spec, seed, progress=bar, log=log, checkpoints=steps, keep_adapter=True)
                    strength = None if f.strength is None else float(getattr(spec, f.strength))
                    results["runs"].append({"family": f.name, "lr": spec.lr, "strength": strength, "seed": seed,
                                            "trainable": r["trainable"], "seconds": r["seconds"], "extra": r["extra"],
                                            "learning": r["metrics"]["learning"], "forgetting": r["metrics"]["forgetting"],
                                            "spectrum": _spectrum(r["base"], r["params"], r["adapter"])})
                    for c in r["curve"]:
                        results["points"].append({"family": f.name, "lr": spec.lr, "strength": strength,
                                                  "step": c["step"], "seed": seed, **c["metrics"]})
                    say(bar, log, f"[sweep {bench.name}] {spec.name} seed {seed}: " + ", ".join(
                        f"step {c['step']} learn {c['metrics']['learning']:.4f} forget {c['metrics']['forgetting']:.4f}"
                        for c in r["curve"]) + f" ({r['seconds']:.1f}s)")
                _write_points(results, out_dir)  # partial results survive an interrupt
    results["analysis"] = analyse(results["points"], seeds, levels=levels, n_resamples=n_resamples)
    write(results, out_dir, plots=plots)
    return results


def _spectrum(base, params, adapter) -> dict:
    """The spectrum of the update from the benchmark's ``base`` to ``merge(params, adapter)``
    (:func:`jpeft.spectral.update_spectrum`; ``params`` differs from ``base`` for residual-base
    inits and O-LoRA's merged earlier adapters) or, for a method that cannot merge (prefix,
    prompt), the reason it has no weight update to measure."""
    try:
        merged = jpeft.merge(params, adapter)
    except NotMergeableError as e:
        return {"not_mergeable": str(e)}
    return spectral.update_spectrum(base, merged)


def spectrum_table(results: dict) -> list:
    """Markdown lines: per family and grid point, the final update's mean effective rank,
    90 %-energy rank (share of full), intruder dimensions (top 10, epsilon 0.5) and the
    forgetting, over seeds; then Spearman correlations over all runs."""
    out = ["| family | lr | strength | forgetting | learning | effective rank | 90 % energy rank (share) | intruders |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    groups = {}
    for r in results["runs"]:
        groups.setdefault((r["family"], r["lr"], r["strength"]), []).append(r)
    xs = {"effective_rank": [], "rank_share": [], "intruders": []}
    fy = []
    points = {k: [] for k in xs}, []  # the same columns, one mean over seeds per grid point
    for (fam, lr, st), rs in groups.items():
        sp = [r["spectrum"] for r in rs]
        strength = "-" if st is None else f"{st:g}"
        head = f"| {fam} | {lr:g} | {strength} | {np.mean([r['forgetting'] for r in rs]):.3f} | {np.mean([r['learning'] for r in rs]):.3f} | "
        if any("not_mergeable" in x for x in sp):
            out.append(head + "n/a (no weight update: not mergeable) | n/a | n/a |")
            continue
        out.append(head + f"{np.mean([x['mean_effective_rank'] for x in sp]):.1f} | "
                   f"{np.mean([x['mean_rank_for_energy'] for x in sp]):.1f} ({np.mean([x['mean_rank_share'] for x in sp]):.2f}) | "
                   f"{np.mean([x['intruders'] for x in sp]):.1f} |")
        changed = [(r, x) for r, x in zip(rs, sp) if x["changed"]]
        for r, x in changed:
            fy.append(r["forgetting"])
            xs["effective_rank"].append(x["mean_effective_rank"])
            xs["rank_share"].append(x["mean_rank_share"])
            xs["intruders"].append(x["intruders"])
        if changed:
            points[1].append(float(np.mean([r["forgetting"] for r, _ in changed])))
            for k, name in (("effective_rank", "mean_effective_rank"), ("rank_share", "mean_rank_share"),
                            ("intruders", "intruders")):
                points[0][k].append(float(np.mean([x[name] for _, x in changed])))
    out.append("")
    if len(fy) >= 3:
        if len(points[1]) >= 3 and len(points[1]) < len(fy):
            # the test: the seeds of one grid point share its settings (learning rate, rank), so its runs are not
            # independent samples; a p-value over runs would count each grid point once per seed
            out += [f"Spearman correlation with forgetting over {len(points[1])} grid points (means over seeds; "
                    "each family, learning rate and strength once): " + _spearman(*points, "grid point") + ".", ""]
        out.append(f"Spearman correlation with forgetting over {len(fy)} runs (every family, grid point and seed"
                   + ("; the p-values count each run as independent, which the seeds of one grid point are not: "
                      "the grid-point line above is the test" if len(points[1]) < len(fy) else "")
                   + "): " + _spearman(xs, fy, "run") + ".")
    return out


def _spearman(xs: dict, fy: list, unit: str) -> str:
    """``"k rho = +0.80 (p = 0.2); ..."``: each column of ``xs`` against ``fy`` (forgetting)."""
    import scipy.stats  # here, not at the top: scipy.stats costs ~1.3 s of every `jpeft` start-up

    cor = []
    for k, v in xs.items():
        constant = [name for name, col in ((k, v), ("forgetting", fy)) if np.ptp(col) <= S.rounding_of(col)]
        # a rank correlation needs both columns to vary (scipy returns nan with a warning), beyond their rounding
        # (forgetting 0.3 - 0.2 in one run and 0.4 - 0.3 in another ranked the runs by the last bit)
        if constant:
            cor.append(f"{k} rho undefined ({constant[0]} is the same in every {unit})")
            continue
        rho, p = scipy.stats.spearmanr(v, fy)
        cor.append(f"{k} rho = {rho:+.2f} (p = {p:.2g})")
    return "; ".join(cor)


_SAME = ("benchmark", "tasks", "score", "higher_is_better", "learning_name", "steps_per_task", "batch_size", "seeds",
         "checkpoints")


def combine(results: Sequence[dict], *, levels: Optional[Sequence[float]] = None, n_resamples: int = 10_000) -> dict:
    """One sweep from several run separately on the same benchmark, seeds, checkpoints, steps,
    batch size and benchmark settings (:meth:`Benchmark.settings`: the model size, sequence
    length, ...; so the seeds still pair: same model and data order), with distinct family
    names; the analysis is recomputed over all families. Write it with :func:`write`. (A sweep
    written before the settings were recorded has none, and is not checked for them.)"""
    if not results:
        raise ConfigError("combine() needs at least one sweep result.")
    first = results[0]
    out = {k: first[k] for k in _SAME}
    known = [r["settings"] for r in results if r.get("settings") is not None]
    out.update(settings=known[0] if known else None, families={}, points=[], runs=[])
    for r in results:
        diff = [(k, r[k], first[k]) for k in _SAME if r[k] != first[k]]
        if r.get("settings") is not None and r["settings"] != known[0]:
            diff.append(("settings", r["settings"], known[0]))
        if diff:
            raise ConfigError(f"sweeps to combine must share {', '.join(d[0] for d in diff)}; found {[d[1] for d in diff]} "
                              f"against {[d[2] for d in diff]}. Rerun one of them with the other's settings.")
        dup = set(r["families"]) & set(out["families"])
        if dup:
            raise ConfigError(f"sweeps to combine must have distinct families; {sorted(dup)} appear twice.")
        out["families"].update(r["families"])
        out["points"] += r["points"]
        out["runs"] += r["runs"]
    out["analysis"] = analyse(out["points"], out["seeds"], levels=levels, n_resamples=n_resamples)
    return out


_POINT_COLS = ("family", "lr", "strength", "step", "seed", "learning", "forgetting", "acc", "bwt", "retention", "fwt")


_ARTIFACTS = ("sweep.json", "points.csv", "summary.csv", "report.md")


def _write_points(results, out_dir):
    atomic_write(os.path.join(out_dir, "sweep.json"), strict_json(results, indent=1))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=_POINT_COLS, extrasaction="ignore")
    w.writeheader()
    for p in results["points"]:
        w.writerow({k: p.get(k, "") for k in _POINT_COLS})
    atomic_write(os.path.join(out_dir, "points.csv"), buf.getvalue())


def write(results: dict, out_dir, *, plots: bool = True) -> list:
    """Writes ``sweep.json``, ``points.csv``, ``summary.csv``, ``report.md`` and (``plots``)
    the PNG from a finished sweep's results (with ``"analysis"``) into ``out_dir`` (created if
    missing); returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    _write_points(results, out_dir)
    an = results["analysis"]
    on_front = {(fam, *k) for fam, ks in an["fronts"].items() for k in (tuple(x) for x in ks)}
    paths = [os.path.join(out_dir, n) for n in ("sweep.json", "points.csv", "summary.csv", "report.md")]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["family", "lr", "strength", "step", "n_seeds", "learning", "learning_lo", "learning_hi",
                "forgetting", "forgetting_lo", "forgetting_hi", "on_front"])
    for c in an["configs"]:
        w.writerow([c["family"], c["lr"], c["strength"], c["step"], c["n"], c["learning"], *c["learning_ci"],
                    c["forgetting"], *c["forgetting_ci"], int((c["family"], c["lr"], c["strength"], c["step"]) in on_front)])
    atomic_write(paths[2], buf.getvalue())
    atomic_write(paths[3], report(results))
    if plots:
        paths.append(plot_sweep(results, out_dir))
    return paths


def report(results: dict) -> str:
    """The markdown report of a finished sweep."""
    an = results["analysis"]
    n = len(results["seeds"])
    conf = "95 % percentile bootstrap interval over seeds"
    out = [f"# Sweep: {results['benchmark']}", "",
           f"Tasks {', '.join(results['tasks'])}; score {results['score']} "
           f"({'higher' if results['higher_is_better'] else 'lower'} is better). {results['learning_name'][0].upper()}"
           f"{results['learning_name'][1:]}. Forgetting: Chaudhry et al. 2018 ("
           f"{'best earlier score minus final' if results['higher_is_better'] else 'rise of the earlier tasks held-out loss'}). "
           f"{n} seeds {results['seeds']}; evaluated at steps {results['checkpoints']} of the last task "
           f"(one run per grid point and seed); batch {results['batch_size']}. Intervals: {conf} "
           f"({an['n_resamples']} resamples).{_coverage_note(n)}", "",
           "## Budgets (per trained task, at the last step)", "",
           "| family | grid | steps | examples | tokens | extra teacher forwards (examples) | data of earlier tasks |",
           "|---|---|---:|---:|---:|---:|---|"]
    for name, fam in results["families"].items():
        b = fam["budget"]
        grid = "lr " + ", ".join(f"{x:g}" for x in fam["lrs"])
        if fam["strength"]:
            grid += f"; {fam['strength']} " + ", ".join(f"{x:g}" for x in fam["strengths"])
        tokens = f"{b['tokens']:,}" if "tokens" in b else "n/a"
        out.append(f"| {name} | {grid} | {b['steps']:,} | {b['examples']:,} | {tokens} | "
                   f"{b['teacher_forward_examples']:,} | {b['old_data']} |")
    out += ["", "A checkpoint at step s has spent s/steps of these budgets.", "",
            "## Pareto fronts (mean over seeds)", "",
            "| family | lr | strength | step | learning | 95 % CI | forgetting | 95 % CI |", "|---|---:|---:|---:|---:|---|---:|---|"]
    byk = {(c["family"], c["lr"], c["strength"], c["step"]): c for c in an["configs"]}
    for fam, ks in an["fronts"].items():
        for k in ks:
            c = byk[(fam, *k)]
            strength = "-" if c["strength"] is None else f"{c['strength']:g}"
            out.append(f"| {fam} | {c['lr']:g} | {strength} | {c['step']} | {_fmt(c['learning'])} | {_ci(c['learning_ci'])} | "
                       f"{_fmt(c['forgetting'])} | {_ci(c['forgetting_ci'])} |")
    out += ["", "## Forgetting at equal learning", "",
            "Per seed, each family's Pareto front (over its learning rates, strengths and checkpoints) is "
            "interpolated linearly at the learning level; n/a: the front does not reach that learning in every seed "
            "(no extrapolation). Pairs are compared over the same seeds with the paired t-test (decision rule: its "
            f"p-value after the Holm-Bonferroni correction over all {len(an['pairs'])} tests below < alpha = {an['alpha']}, "
            f"and the bootstrap interval excludes 0), the exact sign-flip test (assumption-free; its smallest possible p with {n} seeds "
            f"is {2 / 2 ** n:.4g}) and the paired-bootstrap interval of the mean difference.", ""]
    fams = list(results["families"])
    if not an["at_level"]:
        out += ["No learning level is reached by the fronts of two families in every seed, so no comparison at "
                "equal learning is possible; widen the learning-rate grid or add checkpoints.", ""]
    out.append("| learning | " + " | ".join(fams) + " |")
    out.append("|---:|" + "---|" * len(fams))
    for lv in an["at_level"]:
        cells = []
        for fam in fams:
            d = lv["families"].get(fam)
            cells.append("n/a" if d is None or not d["reached"] else f"{d['mean']:.3f} {_ci(d['ci'])}")
        out.append(f"| {lv['learning']:.3f} | " + " | ".join(cells) + " |")
    if n < 2 and an["at_level"]:
        out += ["", f"No paired test: it needs at least 2 seeds and this sweep has {n}; rerun with more seeds "
                "(--seeds) to compare the families."]
    out += ["", "| learning | a | b | mean a - b | 95 % CI | t | p (t) | p (t, Holm) | p (sign flip) | forgets less |",
            "|---:|---|---|---:|---|---:|---:|---:|---:|---|"]
    for p in an["pairs"]:
        out.append(f"| {p['learning']:.3f} | {p['a']} | {p['b']} | {p['mean_diff']:+.3f} | {_ci(p['ci'])} | "
                   f"{p['t']:.2f} | {p['p_t']:.3g} | {p['p_holm']:.3g} | {p['p_sign_flip']:.3g} | "
                   f"{p['less'] or 'no significant difference'} |")
    out += ["", "## The update's spectrum and forgetting (last step)", "",
            "Per changed 2-D kernel of `jpeft.merge(params, adapter)` minus the base, analysed as `[out, in]`: "
            "effective rank (Roy & Vetterli 2007), the rank holding 90 % of the update's energy (Biderman et al. 2024) "
            "and the number of intruder dimensions (Shuttleworth et al. 2024: of the top 10 singular vectors of the "
            "tuned matrix, those with |cos| < 0.5 to every base singular vector), summed over kernels; means over seeds.", ""]
    out += spectrum_table(results)
    dom = _dominance(an)
    out += ["", "## Dominance at equal learning", ""]
    if not dom:
        out.append("No family forgets significantly less than another at every learning level both reach.")
    for a, b, nl in dom:
        out.append(f"* **{a}** forgets significantly less than **{b}** at all {nl} learning level(s) both reach.")
    out += ["", "Families: " + "; ".join(f"**{k}**: {v['description']}" for k, v in results["families"].items()) + ".", ""]
    return "\n".join(out)


def _coverage_note(n: int) -> str:
    """What a nominal 95 % percentile bootstrap interval of a mean over ``n`` seeds covers: it
    uses the plug-in spread and normal quantiles, so for normal values it holds the true mean
    ``P(|t_{n-1}| <= 1.96 sqrt((n-1)/n))`` of the time (0.85 for 5 seeds; the bootstrap's
    discreteness takes a little more off), where the t interval, ``t_{n-1}`` times as wide per
    unit of standard error, holds it 95 % of the time."""
    if n < 2:
        return ""
    import scipy.stats  # here, not at the top: scipy.stats costs ~1.3 s of every `jpeft` start-up

    z = scipy.stats.norm.ppf(0.975)
    cover = 2 * scipy.stats.t.cdf(z * math.sqrt((n - 1) / n), n - 1) - 1
    wider = scipy.stats.t.ppf(0.975, n - 1) / (z * math.sqrt((n - 1) / n))
    if round(100 * cover) >= 95:
        return ""
    return (f" With {n} seeds these intervals are narrower than their name says: for normal values such an interval "
            f"holds the true mean at most about {100 * cover:.0f} % of the time (the t interval, {wider:.1f} times as wide, 95 %); "
            "read them as a description of the spread over seeds, and the paired t-test below as the decision.")


def _dominance(an) -> list:
    """``(a, b, levels)``: ``a`` forgets significantly less than ``b`` at every level both reach."""
    by = {}
    for p in an["pairs"]:
        by.setdefault((p["a"], p["b"]), []).append(p["less"])
    out = []
    for (a, b), ls in by.items():
        for win, lose in ((a, b), (b, a)):
            if ls and all(x == win for x in ls):
                out.append((win, lose, len(ls)))
    return out


def plot_sweep(results: dict, out_dir) -> str:
    """Learning against forgetting: every grid point (mean over seeds; larger markers for later
    checkpoints) and each family's Pareto front with its bootstrap intervals. Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    an = results["analysis"]
    fams = list(results["families"])
    fig, ax = plt.subplots(figsize=(8.4, 5.4))
    cmap = plt.get_cmap("tab10" if len(fams) <= 10 else "tab20")
    steps = results["checkpoints"]
    byk = {(c["family"], c["lr"], c["strength"], c["step"]): c for c in an["configs"]}
    for i, fam in enumerate(fams):
        color = cmap(i % cmap.N)
        cs = [c for c in an["configs"] if c["family"] == fam]
        if not cs:
            continue
        sizes = [8 + 24 * (steps.index(c["step"]) + 1) / len(steps) for c in cs]
        ax.scatter([c["forgetting"] for c in cs], [c["learning"] for c in cs], s=sizes, color=color, alpha=0.35)
        fr = [byk[(fam, *k)] for k in an["fronts"][fam]]
        fx = np.array([c["forgetting"] for c in fr])
        ly = np.array([c["learning"] for c in fr])
        xerr = np.array([[c["forgetting"] - c["forgetting_ci"][0], c["forgetting_ci"][1] - c["forgetting"]] for c in fr]).T
        yerr = np.array([[c["learning"] - c["learning_ci"][0], c["learning_ci"][1] - c["learning"]] for c in fr]).T
        xerr, yerr = np.nan_to_num(xerr), np.nan_to_num(yerr)
        ax.errorbar(fx, ly, xerr=xerr, yerr=yerr, fmt="-o", color=color, ms=4, lw=1.5, capsize=2, label=fam)
    # the axes frame the fronts (diverged grid points would squeeze them); what falls outside is counted on the plot
    fr_all = [byk[(fam, *k)] for fam in fams for k in an["fronts"].get(fam, [])]
    if fr_all:
        fx_all = [c["forgetting_ci"][1] if np.isfinite(c["forgetting_ci"][1]) else c["forgetting"] for c in fr_all]
        ly_all = [c["learning_ci"][0] if np.isfinite(c["learning_ci"][0]) else c["learning"] for c in fr_all]
        x0, x1 = min(0.0, min(c["forgetting"] for c in fr_all)), max(fx_all)
        y0, y1 = min(ly_all), max(c["learning"] for c in fr_all)
        mx, my = 0.08 * (x1 - x0 or 1.0), 0.08 * (y1 - y0 or 1.0)
        ax.set_xlim(x0 - mx, x1 + mx)
        ax.set_ylim(y0 - my, y1 + my)
        outside = sum(not (x0 - mx <= c["forgetting"] <= x1 + mx and y0 - my <= c["learning"] <= y1 + my)
                      for c in an["configs"])
        if outside:
            ax.text(0.99, 0.01, f"{outside} grid point(s) outside these axes (summary.csv)", transform=ax.transAxes,
                    ha="right", va="bottom", fontsize=7, color="0.4")
    ax.set_xlabel("forgetting (Chaudhry 2018)" + ("" if results["higher_is_better"] else forgetting_unit(results["tasks"], "loss"))
                  + "  →  worse")
    ax.set_ylabel(results["learning_name"] + "  →  better")
    ax.set_title(f"{results['benchmark']}: learning vs forgetting, Pareto fronts "
                 f"({len(results['seeds'])} seeds, 95 % bootstrap CI)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    p = os.path.join(out_dir, f"sweep_{results['benchmark']}_pareto.png")
    save_png(fig, p)
    plt.close(fig)
    return p
