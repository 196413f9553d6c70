"""The forgetting experiment runner: a list of methods x a sequence of tasks x several seeds.

:func:`run` trains every :class:`MethodSpec` over the tasks of a :class:`Benchmark`, one seed
at a time, through the same code path for all of them (``jpeft.init`` / ``jpeft.apply`` /
``jpeft.make_train_step`` and :func:`jpeft.fit`, the one training loop; full fine-tuning is :class:`~jpeft.FullFinetuneConfig`),
measures the score matrix ``R[i, j]`` (task ``j`` after training through task ``i``) and
writes into ``out_dir``:

* ``scores.json``: every score matrix, baseline row, metrics and timings, per method and seed;
* ``metrics.csv``: one row per (method, seed) with ``acc, bwt, forgetting, retention, fwt,
  learning`` and the benchmark's extra metrics;
* ``results.md``: a markdown table of mean +- sample standard deviation over the seeds;
* ``forgetting_<bench>_tradeoff.png``: learning against forgetting, one point per method
  (mean, with error bars over seeds);
* ``forgetting_<bench>_matrices.png``: the mean score matrix of every method as a heat map.

:func:`run_one` also evaluates every task at ``checkpoints`` along the last task's training
(the training-length axis of :mod:`jpeft.forgetting.sweep`, which sweeps learning rates and
regularizer strengths over it). The learning rate lives in the optimizer state and the
strengths in the batch, so neither recompiles a method's step.

Regularizers and replay compose with any method (:class:`MethodSpec` fields ``ewc``,
``ewc_gamma``, ``l2sp``, ``distill``, ``replay``); their state (EWC memory, start point,
teacher) rides in the batch, so each method's step is compiled once. ``orthogonal`` is O-LoRA
(a fresh LoRA per task, earlier ones merged into the frozen base, their ``A`` subspaces
penalised; :func:`jpeft.forgetting.regularizers.orthogonal_penalty`). Residual-base LoRA
inits (``LoraConfig(init_weights="pissa" | "olora" | "milora")``) and CorDA (``MethodSpec(corda="kpm" |
"ipm")``, calibrated on the benchmark's :meth:`Benchmark.calibration_inputs`) go through
:func:`init_adapter`.

Benchmarks (see :func:`get_benchmark`): ``split-digits-task``, ``split-digits-class``
(:mod:`jpeft.forgetting.digits`), ``language`` and ``language3`` (code, then prose, then CSV
data; :mod:`jpeft.forgetting.language`).

>>> from jpeft.forgetting import experiment
>>> sorted(experiment.BENCHMARKS)
['language', 'language3', 'split-digits-class', 'split-digits-task']
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import math
import os
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jpeft
from jpeft.config import strict_json
from jpeft.errors import ConfigError, OverwriteError
from jpeft._files import atomic_write, check_folder
from jpeft.forgetting import digits, language
from jpeft.forgetting import metrics as M
from jpeft.forgetting import regularizers as R
from jpeft.forgetting import replay as RP
from jpeft.forgetting.benchmark import Benchmark, MethodSpec  # re-exported: jpeft.forgetting.experiment.Benchmark

__all__ = ["MethodSpec", "Benchmark", "BENCHMARKS", "get_benchmark", "run"]


# name -> (benchmark class, constructor settings); the benchmarks import only jpeft.forgetting.benchmark,
# so the runner imports them, one way (they were looked up by module name through importlib, a hidden ring)
BENCHMARKS = {
    "split-digits-task": (digits.SplitDigits, {"scenario": "task"}),
    "split-digits-class": (digits.SplitDigits, {"scenario": "class"}),
    "language": (language.CodeToProse, {}),
    "language3": (language.CodeProseData, {}),
}


def get_benchmark(name: str, **kwargs) -> Benchmark:
    """A built-in benchmark by name (``split-digits-task``, ``split-digits-class``, ``language``, ``language3``);
    ``kwargs`` go to its constructor."""
    if name not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {name!r}; built in: {sorted(BENCHMARKS)}.")
    cls, kw = BENCHMARKS[name]
    return cls(**{**kw, **kwargs})


# -- one (method, seed) ---------------------------------------------------------------------------


def _make_loss(bench: Benchmark, spec: MethodSpec, config=None):
    """The training loss of ``spec``; ``config`` (the method config of the adapter trained, by
    default ``spec.config``) adds its :meth:`jpeft.AdapterConfig.regularizer` (AdaLoRA's
    orthogonal penalty, reported as ``method_reg``)."""
    config = spec.config if config is None else config

    def loss_fn(params, adapter, batch, key):
        data, t = batch["data"], batch["t"]
        out = bench.forward(params, adapter, data)
        task = bench.loss(out, data, t)
        loss = task
        aux = {"task_loss": task}
        reg = config.regularizer(adapter)
        if reg is not None:
            loss = loss + reg
            aux["method_reg"] = reg
        coef = batch.get("coef", {})  # strengths ride in the batch: a sweep over them compiles once
        if spec.ewc:
            pen = R.ewc_penalty(batch["ewc"], adapter, strength=coef["ewc"])
            loss = loss + pen
            aux["ewc"] = pen
        if spec.l2sp:
            pen = R.l2sp_penalty(params, adapter, batch["start"], strength=coef["l2sp"])
            loss = loss + pen
            aux["l2sp"] = pen
        if spec.orthogonal:
            pen = R.orthogonal_penalty(batch["orth"], adapter, strength=coef["orthogonal"])
            loss = loss + pen
            aux["orthogonal"] = pen
        if spec.distill:
            teacher = jax.lax.stop_gradient(bench.forward(params, batch["teacher"], data))
            d = bench.distill(out, teacher, data, t, spec.temperature)
            loss = loss + coef["distill"] * d
            aux["distill"] = d
        return loss, aux

    return loss_fn


def init_adapter(bench: Benchmark, config, key, params, *, corda: Optional[str] = None, calibration_examples: int = 128):
    """``(params, adapter)``: a fresh adapter of ``config`` on the benchmark's model. For a
    residual-base LoRA init (``LoraConfig(init_weights="pissa" | "olora" | "milora")``, or
    ``corda="kpm" | "ipm"``) ``params`` becomes the residual base (:func:`jpeft.init_pissa`,
    :func:`jpeft.init_olora`, :func:`jpeft.init_milora`, :func:`jpeft.init_corda`); otherwise
    it is returned unchanged.

    CorDA calibrates on ``calibration_examples`` examples of the benchmark's pretrained tasks
    (``"kpm"``: what must not be forgotten; refused when the benchmark has none) or of its first
    trained task (``"ipm"``), from :meth:`Benchmark.calibration_inputs`. Its result does not
    depend on ``key``, so it is computed once per benchmark, base and config."""
    args = bench.example_input()
    if corda is not None:
        if corda == "kpm":
            if bench.pretrained_tasks < 1:
                raise ConfigError(f"CorDA KPM keeps what the base already knows, and benchmark {bench.name!r} has no "
                                  "pretrained task to calibrate on; use corda='ipm' or another init.")
            tasks = range(bench.pretrained_tasks)
        else:
            tasks = [bench.pretrained_tasks]
        cache = bench.__dict__.setdefault("_corda_cache", {})
        ck = (repr(config), corda, int(calibration_examples))
        hit = cache.get(ck)
        if hit is not None and hit[0] is params:
            return hit[1], hit[2]
        per = -(-int(calibration_examples) // len(tasks))
        calib = [c for t in tasks for c in bench.calibration_inputs(t, per)][: int(calibration_examples)]
        res, adapter = jpeft.init_corda(config, params, key, bench.model, calib, mode=corda)
        cache[ck] = (params, res, adapter)
        return res, adapter
    init = config.residual_init
    if init is not None:  # corda_* marks are refused by MethodSpec (the runner calibrates CorDA itself)
        base, _, niter = init.partition("_niter_")
        make = {"pissa": jpeft.init_pissa, "olora": jpeft.init_olora, "milora": jpeft.init_milora}[base]
        return make(config, params, key, bench.model, *args, **({"niter": int(niter)} if niter else {}))
    return params, jpeft.init(config, params, key, bench.model, *args)


def _snapshot(tree):
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def _after_task(bench: Benchmark, spec: MethodSpec, seed: int, t: int, params, adapter, ewc_state, buf):
    """``(ewc_state, buf)`` after task ``t``: its Fisher consolidated into the EWC memory
    (``spec.ewc``), its training set offered to the replay reservoir (``spec.replay``)."""
    if spec.ewc:
        out_fn, inputs, labels, mask = bench.fisher_data(t, spec.fisher_examples)
        F = R.fisher_diagonal(out_fn, params, adapter, inputs, labels, mask=mask,
                              estimator=spec.fisher or bench.fisher_estimator,
                              key=jax.random.fold_in(jax.random.key(seed), 1000 + t), batch_size=16)
        ewc_state = R.ewc_consolidate(ewc_state, adapter, F, gamma=spec.ewc_gamma)
    if spec.replay:
        data = bench.train_set(t)
        n = len(next(iter(data.values())))
        # its own generator: drawing from run_one's batch generator would shift the batch order of every later task,
        # which must be the same for every method of a seed (the sweep pairs methods by seed)
        order = np.random.default_rng((seed, 2000 + t)).permutation(n)
        data = {k: jnp.asarray(v[order]) for k, v in data.items()}
        if buf is None:
            buf = RP.reservoir_init({k: v[0] for k, v in data.items()}, spec.replay_capacity)
        buf = RP.reservoir_add(buf, data, jax.random.fold_in(jax.random.key(seed), 2000 + t))
    return ewc_state, buf


def _compiled_step(bench: Benchmark, spec: MethodSpec, config, opt, adapter):
    """The jitted train step of ``spec`` (trained as ``config``) for ``adapter``, kept on the
    benchmark per (method, adapter structure), so the seeds after the first reuse it."""
    steps_cache = bench.__dict__.setdefault("_step_cache", {})
    # what the compiled step depends on: not the name, learning rate or strengths (those are data)
    shape = (spec.config, bool(spec.ewc), bool(spec.l2sp), bool(spec.distill), spec.temperature,
             bool(spec.orthogonal))
    try:
        sig = (hash(shape), shape, jax.tree.structure(adapter))
    except TypeError:  # a config with an unhashable field: cache per spec object
        sig = (id(spec), jax.tree.structure(adapter))
    if sig not in steps_cache:
        steps_cache[sig] = jpeft.make_train_step(_make_loss(bench, spec, config), opt, donate=False)
    return steps_cache[sig]


def _batch_state(spec: MethodSpec, t: int, adapter, orth, ewc_state) -> dict:
    """What every batch of task ``t`` carries besides its data: the task index, the
    regularizers' strengths and their state (O-LoRA's subspaces, the EWC memory, the start point
    for L2-SP and the teacher for distillation, both copies of ``adapter``)."""
    extra = {"t": jnp.asarray(t, jnp.int32),
             "coef": {k: jnp.asarray(getattr(spec, k), jnp.float32) for k in ("ewc", "l2sp", "distill", "orthogonal")}}
    if spec.orthogonal:
        extra["orth"] = orth
    if spec.ewc:
        extra["ewc"] = ewc_state
    if spec.l2sp:
        extra["start"] = _snapshot(adapter)
    if spec.distill:
        extra["teacher"] = _snapshot(adapter)
    return extra


def _batches(bench: Benchmark, spec: MethodSpec, t: int, rng: np.random.Generator, buf, key, extra: dict):
    """Task ``t``'s training batches, endless: ``bench.batch_size`` rows drawn with ``rng``,
    mixed with the replay reservoir ``buf`` (``spec.replay``, keyed by ``key`` and the step),
    each with ``extra`` (:func:`_batch_state`)."""
    data = bench.train_set(t)
    n = len(next(iter(data.values())))
    for s in itertools.count():
        idx = rng.integers(0, n, bench.batch_size)
        batch = {k: jnp.asarray(v[idx]) for k, v in data.items()}
        if spec.replay and buf is not None:
            batch = RP.mix_batch(batch, buf, spec.replay, jax.random.fold_in(key, s))
        yield {"data": batch, **extra}


def _metrics(bench: Benchmark, Rm, baseline) -> dict:
    """The summary metrics of score matrix ``Rm`` (FWT only when no task is pretrained) and ``learning``."""
    met = M.summarize(Rm, baseline if bench.pretrained_tasks == 0 else None, higher_is_better=bench.higher_is_better)
    met["learning"] = bench.learning(Rm, baseline)
    return met


def run_one(bench: Benchmark, spec: MethodSpec, seed: int, *, progress=None, log: Callable = print,
            checkpoints: Sequence[int] = (), keep_adapter: bool = False) -> dict:
    """Trains ``spec`` over the tasks of ``bench`` with one seed. Returns
    ``{"R", "baseline", "metrics", "extra", "trainable", "seconds", "curve"}``.

    ``checkpoints``: steps of the last task's training at which every task is evaluated, along
    the one run (the training-length axis of a sweep). ``curve`` holds, per checkpoint and for
    the final step, ``{"step", "R", "metrics"}`` where ``R`` is the score matrix with its last
    row measured at that step. ``keep_adapter``: also return the final ``"params"`` and
    ``"adapter"``, and ``"base"``, the benchmark's base params (for
    :func:`jpeft.spectral.update_spectrum`: the update is ``merge(params, adapter) - base``,
    which differs from what merging adds when ``params`` is a residual base or holds the
    merged adapters of earlier tasks).
    """
    T = len(bench.task_names)
    checkpoints = sorted({int(c) for c in checkpoints})
    if checkpoints and (checkpoints[0] < 1 or checkpoints[-1] > bench.steps_per_task):
        raise ConfigError(f"checkpoints must lie in [1, steps_per_task = {bench.steps_per_task}], found {checkpoints}.")
    if checkpoints and spec.per_task_adapter:
        raise ConfigError(f"MethodSpec {spec.name!r}: checkpoints along a run are not supported with per_task_adapter; "
                          "drop one of the two.")
    check_replay(bench, [spec])
    key = jax.random.key(seed)
    params = base = bench.base_params(seed)
    # the learning rate lives in the optimizer state, so a sweep over it compiles each method once; the method
    # wraps it (AdaLoRA's rank allocator: each task's training runs its budget schedule, as a PEFT Trainer run)
    adam = optax.inject_hyperparams(optax.adam)(learning_rate=spec.lr)
    rng = np.random.default_rng(seed)

    key, k0 = jax.random.split(key)
    if spec.per_task_adapter:
        adapters = [None] * T
        adapter = None
    else:
        params, adapter = init_adapter(bench, spec.config, k0, params, corda=spec.corda,
                                       calibration_examples=spec.calibration_examples)
    cur = lambda j: adapters[j] if spec.per_task_adapter else adapter

    # baseline: each task before any training on it
    # (for a benchmark whose first tasks are pretrained, the base model's scores: FWT is then not reported)
    pre = spec.per_task_adapter or bench.pretrained_tasks > 0
    # (the pretrained model is the benchmark's base: params may already be a residual base here)
    baseline = np.array([bench.evaluate(base if pre else params, None if pre else adapter, j, j) for j in range(T)])
    Rm = np.full((T, T), np.nan)
    ewc_state = R.ewc_init()
    orth = R.orthogonal_init()  # O-LoRA: the A's of the earlier tasks' adapters
    buf = None
    trainable = 0
    curve = []  # (step, last row of R) at the checkpoints
    t0 = time.perf_counter()

    for t in range(T):
        if t < bench.pretrained_tasks:
            ewc_state, buf = _after_task(bench, spec, seed, t, params, adapter, ewc_state, buf)
            Rm[t] = [bench.evaluate(base, None, j, t) for j in range(T)]
            continue
        # per-task adapters: the first task trains the whole network, which is then shared and frozen
        cfg = jpeft.FullFinetuneConfig() if spec.per_task_adapter and t == 0 else spec.config
        if spec.per_task_adapter:
            key, kt = jax.random.split(key)
            _, a = init_adapter(bench, cfg, kt, params)
        elif spec.orthogonal and t > bench.pretrained_tasks:
            # O-LoRA: the finished task's adapter joins the frozen base; a fresh one learns this task
            orth = R.orthogonal_consolidate(orth, adapter)
            params = jpeft.merge(params, adapter)
            key, kt = jax.random.split(key)
            params, a = init_adapter(bench, spec.config, kt, params)
            adapter = a
        else:
            a = adapter
        trainable = jpeft.summary(params, a, print_fn=None)["trainable"]  # per-task adapters: the last one's size
        opt = cfg.wrap_optimizer(adam, bench.steps_per_task)
        step = _compiled_step(bench, spec, cfg, opt, a)
        opt_state = opt.init(jpeft.trainable(a))
        key, kt, km = jax.random.split(key, 3)
        batches = _batches(bench, spec, t, rng, buf, km, _batch_state(spec, t, a, orth, ewc_state))

        def on_step(s, m, t=t):
            if progress is not None:
                progress.update(1)
                if (s - 1) % 20 == 0:
                    progress.set_postfix(method=spec.name, seed=seed, task=t, loss=f"{m['task_loss']:.3f}", refresh=False)

        eval_fn = None
        if checkpoints and t == T - 1:
            def eval_fn(a_now, s, t=t):
                if s in checkpoints and s != bench.steps_per_task:  # the final step is the last row of R
                    curve.append((s, [bench.evaluate(params, a_now, j, t) for j in range(T)]))
                return {}

        a = jpeft.fit(step, params, a, opt_state, batches, key=kt, num_steps=bench.steps_per_task,
                      on_step=on_step, eval_fn=eval_fn, eval_every=1 if eval_fn is not None else 0).adapter
        if spec.per_task_adapter and t == 0:
            params = jpeft.merge(params, a)  # the shared network, frozen from now on
            adapters[0] = None
        elif spec.per_task_adapter:
            adapters[t] = a
        else:
            adapter = a
        if not spec.per_task_adapter:
            ewc_state, buf = _after_task(bench, spec, seed, t, params, adapter, ewc_state, buf)
        Rm[t] = [bench.evaluate(params, cur(j), j, t) for j in range(T)]
    seconds = time.perf_counter() - t0
    final_adapter = adapter if not spec.per_task_adapter else adapters[-1]
    extra_m = bench.extra_metrics(params, final_adapter)
    points = []
    for s, row in curve + [(bench.steps_per_task, Rm[T - 1].tolist())]:
        Rc = Rm.copy()
        Rc[T - 1] = row
        points.append({"step": int(s), "R": Rc.tolist(), "metrics": _metrics(bench, Rc, baseline)})
    out = {"R": Rm.tolist(), "baseline": baseline.tolist(), "metrics": _metrics(bench, Rm, baseline), "extra": extra_m,
           "trainable": int(trainable), "seconds": seconds, "curve": points}
    if keep_adapter:
        out.update(params=params, adapter=final_adapter, base=base)
    return out


# -- the whole experiment ----------------------------------------------------------------------------


def _finite_values(xs) -> list:
    return [float(x) for x in xs if x is not None and np.isfinite(x)]


def _mean_std(xs):
    """Mean and sample standard deviation (``ddof=1``) of the finite values among ``xs``; the
    standard deviation of a single value is undefined (``nan``), not 0: one seed shows no
    spread, it does not show that there is none."""
    xs = np.asarray(_finite_values(xs), dtype=np.float64)
    if xs.size == 0:
        return float("nan"), float("nan")
    return float(xs.mean()), float(xs.std(ddof=1)) if xs.size > 1 else float("nan")


def run(
    benchmark: Benchmark | str,
    methods: Optional[Sequence[MethodSpec]] = None,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    out_dir: str | os.PathLike = "forgetting_results",
    progress: bool = True,
    plots: bool = True,
    log: Callable = print,
    overwrite: bool = False,
) -> dict:
    """Trains every method over the benchmark's tasks for every seed and writes the artifacts.

    Args:
      benchmark: a :class:`Benchmark` or a built-in name (:data:`BENCHMARKS`).
      methods: the :class:`MethodSpec` list (default: the benchmark's own list).
      seeds: one full run per seed; tables report mean and sample std over them.
      out_dir: where ``scores.json``, ``metrics.csv``, ``results.md`` and the PNGs go.
      progress: show a tqdm progress bar over all training steps.
      plots: write the PNG plots (matplotlib, Agg backend).
      log: where to print one line per finished (method, seed).
      overwrite: replace the results of an earlier run in ``out_dir``; without it such a
        folder is refused before anything is trained.

    Returns:
      The dict written to ``scores.json``.

    Raises:
      ConfigError: no method or seed, repeated method names or seeds.
      OverwriteError: ``out_dir`` holds an earlier run's results and ``overwrite`` is false.
    """
    bench = get_benchmark(benchmark) if isinstance(benchmark, str) else benchmark
    methods = check_names(methods if methods is not None else bench.default_methods(),
                          "run() needs at least one method.", "method")
    seeds = check_seeds(seeds, "run()")
    check_replay(bench, methods)
    check_out_dir(out_dir, _ARTIFACTS, overwrite)
    os.makedirs(out_dir, exist_ok=True)
    T = len(bench.task_names)
    trained = T - bench.pretrained_tasks
    total = len(seeds) * len(methods) * trained * bench.steps_per_task
    results = {
        "benchmark": bench.name,
        "tasks": list(bench.task_names),
        "score": bench.score_name,
        "higher_is_better": bench.higher_is_better,
        "learning": bench.learning_name,
        "steps_per_task": bench.steps_per_task,
        "batch_size": bench.batch_size,
        "seeds": seeds,
        "methods": {},
    }
    for spec in methods:
        results["methods"][spec.name] = {"description": spec.describe(), "seeds": {}}
    with progress_bar(progress, total, f"forgetting:{bench.name}") as bar:
        for seed in seeds:
            for spec in methods:
                r = run_one(bench, spec, seed, progress=bar, log=log)
                results["methods"][spec.name]["seeds"][str(seed)] = r
                say(bar, log, f"[{bench.name}] {spec.name:>18s} seed {seed}: "
                    + " ".join(f"{k}={v:.4f}" for k, v in r["metrics"].items()) + f" ({r['seconds']:.1f}s)")
                _write(results, out_dir, bench, plots=False)  # partial results survive an interrupt
    _write(results, out_dir, bench, plots=plots)
    return results


_COLS = ("acc", "bwt", "forgetting", "retention", "fwt", "learning")
_ARTIFACTS = ("scores.json", "metrics.csv", "results.md")


def check_names(items, empty: str, kind: str) -> list:
    """``items`` (each with a ``name``) as a list; refused when empty (``empty`` is the message)
    or when a name repeats (``kind`` says whose names)."""
    items = list(items)
    if not items:
        raise ConfigError(empty)
    names = [x.name for x in items]
    if len(set(names)) != len(names):
        raise ConfigError(f"{kind} names must be unique, found {names}.")
    return items


@contextlib.contextmanager
def progress_bar(on: bool, total: int, desc: str):
    """A tqdm bar over ``total`` training steps (``None`` when ``on`` is false), closed on exit."""
    bar = None
    if on:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)
    try:
        yield bar
    finally:
        if bar is not None:
            bar.close()


def say(bar, log: Optional[Callable], msg: str) -> None:
    """``msg`` above the progress bar ``bar``, else through ``log`` (nowhere when it is ``None``)."""
    if bar is not None:
        bar.write(msg)
    elif log is not None:
        log(msg)


def check_seeds(seeds, what: str) -> list:
    """``seeds`` as a list of ints; refused when empty or when a seed repeats (a repeated seed is
    the same run again: it would count twice in the means, the standard deviations and the
    paired tests)."""
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ConfigError(f"{what} needs at least one seed.")
    dup = sorted({s for s in seeds if seeds.count(s) > 1})
    if dup:
        raise ConfigError(f"{what}: seeds must be distinct, found {seeds} (repeated: {dup}); a repeated seed is "
                          "the same run again and would count as extra evidence in the statistics.")
    return seeds


def check_replay(bench: Benchmark, specs) -> None:
    """Refuses, before anything is trained, a replay share that rounds to no row of the
    benchmark's batch, or to all of them (:func:`jpeft.forgetting.replay.replay_rows`;
    :func:`~jpeft.forgetting.replay.mix_batch` would refuse it only at the first batch of the
    second trained task, after the earlier runs)."""
    for spec in specs:
        if spec.replay:
            try:
                RP.replay_rows(spec.replay, bench.batch_size)
            except ConfigError as e:
                raise ConfigError(f"MethodSpec {spec.name!r}: {e}") from None


def check_out_dir(out_dir, artifacts, overwrite: bool) -> None:
    """Refuses an ``out_dir`` that holds any of ``artifacts`` from an earlier run, unless ``overwrite``,
    and one that is a file."""
    check_folder(out_dir, "the output folder (--out)")
    found = [a for a in artifacts if os.path.exists(os.path.join(out_dir, a))]
    if found and not overwrite:
        raise OverwriteError(f"{out_dir} already holds the results of an earlier run ({', '.join(found)}); a new run "
                             "would replace them. Choose another output folder (--out), or pass overwrite=True "
                             "(--force) to replace them.")


def _rows(results):
    for name, m in results["methods"].items():
        for seed, r in m["seeds"].items():
            row = {"method": name, "seed": int(seed)}
            row.update({k: r["metrics"].get(k, float("nan")) for k in _COLS})
            row.update(r.get("extra", {}))
            row["trainable_params"] = r["trainable"]
            row["train_seconds"] = r["seconds"]
            yield row


def _write(results, out_dir, bench, *, plots):
    atomic_write(os.path.join(out_dir, "scores.json"), strict_json(results, indent=1))
    rows = list(_rows(results))
    if not rows:
        return
    fields = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    for row in rows:
        w.writerow(row)
    atomic_write(os.path.join(out_dir, "metrics.csv"), buf.getvalue())
    atomic_write(os.path.join(out_dir, "results.md"), markdown_table(results))
    if plots:
        plot(results, out_dir)


def markdown_table(results: dict) -> str:
    """Mean +- sample std over seeds of every metric, one row per method."""
    hib = results["higher_is_better"]
    rows = list(_rows(results))
    extra_keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in ("method", "seed", "trainable_params", "train_seconds") + _COLS]
    cols = ["acc", "learning", "forgetting", "bwt", "retention", "fwt"] + extra_keys
    heads = {
        "acc": f"final mean {results['score']}",
        "learning": results["learning"],
        "forgetting": "forgetting (Chaudhry)" + ("" if hib else ", loss rise"),
        "bwt": "BWT",
        "retention": "retention",
        "fwt": "FWT",
    }
    nseeds = len(results["seeds"])
    over = (f"mean ± sample std over {nseeds} seed(s) {results['seeds']}" if nseeds > 1 else
            f"one seed {results['seeds']}: single values, no spread (run several seeds to measure one)")
    out = [f"Benchmark `{results['benchmark']}`; tasks {', '.join(results['tasks'])}; score: {results['score']} "
           f"({'higher' if hib else 'lower'} is better); {results['steps_per_task']} steps/task, batch "
           f"{results['batch_size']}; {over}.\n",
           "| method | trainable params | " + " | ".join(heads.get(c, c) for c in cols) + " | train s |",
           "|---|---:|" + "---:|" * len(cols) + "---:|"]
    for name, m in results["methods"].items():
        rs = list(m["seeds"].values())
        if not rs:
            continue
        cells = []
        for c in cols:
            vals = _finite_values(r["metrics"].get(c, r.get("extra", {}).get(c)) for r in rs)
            mu, sd = _mean_std(vals)
            cell = "n/a" if math.isnan(mu) else f"{mu:.3f}" if math.isnan(sd) else f"{mu:.3f} ± {sd:.3f}"
            if 0 < len(vals) < len(rs):  # a seed without a finite value is not silently averaged away
                cell += f" ({len(vals)} of {len(rs)} seeds)"
            cells.append(cell)
        secs = _mean_std([r["seconds"] for r in rs])[0]
        out.append(f"| {name} | {rs[0]['trainable']:,} | " + " | ".join(cells) + f" | {secs:.0f} |")
    out.append("")
    out.append("Methods: " + "; ".join(f"**{n}**: {m['description']}" for n, m in results["methods"].items()) + ".")
    return "\n".join(out) + "\n"


def forgetting_unit(tasks, score) -> str:
    """What a lower-is-better forgetting axis measures: the rise of the first task's score, or
    with more than two tasks the mean rise over every task before the last (Chaudhry's
    forgetting averages them).

    >>> forgetting_unit(("code (A)", "prose (B)"), "loss")
    ': rise in code (A) loss'
    >>> forgetting_unit(("code (A)", "prose (B)", "data (C)"), "loss")
    ': mean rise in the loss of code (A), prose (B)'
    """
    if len(tasks) <= 2:
        return f": rise in {tasks[0]} {score}"
    return f": mean rise in the {score} of {', '.join(tasks[:-1])}"


def save_png(fig, path) -> None:
    """``fig`` as a PNG at ``path`` through a renamed temporary (:func:`jpeft.io.atomic_write`), so an
    interrupted write leaves the previous file, never half a picture."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write(path, buf.getvalue())


def plot(results: dict, out_dir) -> list:
    """Writes the learning-vs-forgetting plot and the score-matrix heat maps; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bname = results["benchmark"]
    hib = results["higher_is_better"]
    names = [n for n, m in results["methods"].items() if m["seeds"]]
    paths = []
    # 1. learning vs forgetting
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    markers = "osD^vP*Xhp<>"
    for i, n in enumerate(names):
        color = cmap(i % cmap.N)
        rs = list(results["methods"][n]["seeds"].values())
        # float(): a scores.json read back holds a NaN or infinity as a string (jpeft.config.strict_json)
        fx = [float(r["metrics"]["forgetting"]) for r in rs]
        ly = [float(r["metrics"]["learning"]) for r in rs]
        (mx, sx), (my, sy) = _mean_std(fx), _mean_std(ly)
        sx, sy = np.nan_to_num(sx), np.nan_to_num(sy)  # one seed: no error bar
        ax.errorbar(mx, my, xerr=sx, yerr=sy, fmt=markers[i % len(markers)], color=color, capsize=3, label=n)
        ax.scatter(fx, ly, s=8, color=color, alpha=0.35)
        ax.annotate(n, (mx, my), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("forgetting (Chaudhry 2018)" + ("" if hib else forgetting_unit(results["tasks"], results["score"])) + "  →  worse")
    ax.set_ylabel(results["learning"] + "  →  better")
    ns = len(results["seeds"])
    ax.set_title(f"{bname}: learning vs forgetting " + (f"(mean ± std, {ns} seeds)" if ns > 1 else "(one seed)"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    p = os.path.join(out_dir, f"forgetting_{bname}_tradeoff.png")
    save_png(fig, p)
    plt.close(fig)
    paths.append(p)
    # 2. score matrices
    n = len(names)
    cols = min(4, n)
    rows = int(math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.6 * rows), squeeze=False)
    fig.subplots_adjust(hspace=0.75, wspace=0.6)
    T = len(results["tasks"])
    mats = [np.mean([np.asarray(r["R"], float) for r in results["methods"][nm]["seeds"].values()], axis=0) for nm in names]
    vmin, vmax = float(np.min(mats)), float(np.max(mats))
    cmap = "viridis" if hib else "viridis_r"
    for k, (nm, Rm) in enumerate(zip(names, mats)):
        ax = axes[k // cols][k % cols]
        im = ax.imshow(Rm, vmin=vmin, vmax=vmax, cmap=cmap)
        ax.set_title(nm, fontsize=9)
        ax.set_xticks(range(T))
        ax.set_yticks(range(T))
        ax.set_xticklabels(results["tasks"], fontsize=6, rotation=45)
        ax.set_yticklabels(results["tasks"], fontsize=6)
        ax.set_xlabel("evaluated task", fontsize=7)
        ax.set_ylabel("trained through", fontsize=7)
        for i in range(T):
            for j in range(T):
                r, g, b, _ = im.cmap(im.norm(Rm[i, j]))
                ax.text(j, i, f"{Rm[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="k" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "w")
    for k in range(n, rows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label=results["score"])
    fig.suptitle(f"{bname}: score matrix R[i, j] (mean over seeds)", fontsize=10)
    p = os.path.join(out_dir, f"forgetting_{bname}_matrices.png")
    save_png(fig, p)
    plt.close(fig)
    paths.append(p)
    return paths
