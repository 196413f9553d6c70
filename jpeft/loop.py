"""The training loop: every trainer in jpeft (``jpeft train``, ``jpeft demo``, the
forgetting runner, the code-model pretraining and the multi-host entry point in ``tpu/``)
runs :func:`fit`.

:func:`fit` owns what every run needs: host-side batch validation, the jitted step (any
``step(params, adapter, opt_state, batch, key)``: single device, pmap or mesh-sharded, with
gradient accumulation inside it), the non-finite guard, evaluation every N steps,
checkpoints through :class:`jpeft.checkpoint.CheckpointManager` with exact resume, Ctrl-C and SIGTERM
handling, a progress bar and metric records (:class:`MetricLog`: JSONL, TensorBoard when
installed, log lines). What a caller adds (regularisers, replay, extra metrics) rides in
the batches it feeds and in the ``on_step`` / ``eval_fn`` callbacks.

The jitted step (:func:`jpeft.make_train_step`) already skips an update whose loss, gradients or
resulting adapter and optimizer state are not finite and reports ``metrics["skipped"] = 1``. On the host,
:class:`NonFiniteGuard` counts consecutive skips and raises
:class:`~jpeft.errors.NonFiniteError` naming the step once ``max_consecutive`` is reached;
a run that *ends* with skipped steps pending raises too, so a diverged run never looks like
a finished one. :func:`fit` never saves a checkpoint of a skipped step while the run goes on, so
the last good checkpoint stays untouched and restorable. A *stop* on skipped steps (``num_steps``
before ``total_steps``, Ctrl-C) is not an end: its ``save_last`` checkpoint holds the last finite
step's state (a skipped step changes nothing) and loss, and the skips still pending, which a run
resumed from it counts on. A step made with ``loss_weight`` whose batch held
no loss term (every label masked) changes nothing and reports ``metrics["no_targets"] = 1``;
:func:`fit` lists such steps (``FitResult.no_target_steps``) and warns of them once, at the end.

The step key is ``jax.random.fold_in(key, step)``: it depends on the step number only, so a
run resumed from a checkpoint draws exactly the keys the uninterrupted run would have drawn.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import itertools
import os
import signal
import sys
import threading
import time
import warnings
from typing import Any, Callable, Iterable, Mapping, Optional

import jax
import numpy as np

from jpeft import _hostmem
from jpeft import validate as _validate
from jpeft.config import strict_json
from jpeft.distributed import StopAgreement
from jpeft.errors import ConfigError, InputValidationError, NonFiniteError
from jpeft.methods.base import trainable as _trainable
from jpeft.tree import is_half_float

__all__ = ["NonFiniteGuard", "FitResult", "MetricLog", "fit"]


class NonFiniteGuard:
    """Counts steps skipped by the non-finite guard and stops a diverging run.

    Args:
      max_consecutive: how many consecutive skipped steps are tolerated; the next one raises.

    >>> g = NonFiniteGuard(max_consecutive=2)
    >>> g.update(1, {"skipped": 0}), g.update(2, {"skipped": 1}), g.update(3, {"skipped": 1})
    (False, True, True)
    >>> g.update(4, {"skipped": 1})
    Traceback (most recent call last):
    ...
    jpeft.errors.NonFiniteError: step 4: the loss, gradients or update were not finite for 3 consecutive steps (steps 2 to 4; limit 2), so training stopped. The last step with a finite update was 1. Lower the learning rate, enable gradient clipping (optax.clip_by_global_norm), or check the data around these steps.
    """

    def __init__(self, max_consecutive: int = 5):
        if isinstance(max_consecutive, bool) or not isinstance(max_consecutive, int) or max_consecutive < 0:
            raise ConfigError(f"max_consecutive must be a non-negative integer, found {max_consecutive!r}.")
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total_skipped = 0
        self.last_good_step: Optional[int] = None
        self._first_bad: Optional[int] = None

    def update(self, step: int, metrics: Mapping[str, Any]) -> bool:
        """Records the metrics of ``step``; returns whether it was skipped.

        Raises:
          NonFiniteError: more than ``max_consecutive`` steps in a row were skipped.
        """
        skipped = metrics.get("skipped")
        if skipped is None:  # a step function without the guard: judge by the loss
            loss = metrics.get("loss")
            skipped = loss is not None and not np.isfinite(np.asarray(jax.device_get(loss))).all()
        skipped = bool(np.asarray(jax.device_get(skipped)))
        if not skipped:
            self.consecutive = 0
            self._first_bad = None
            self.last_good_step = step
            return False
        self.total_skipped += 1
        self.consecutive += 1
        if self._first_bad is None:
            self._first_bad = step
        if self.consecutive > self.max_consecutive:
            raise NonFiniteError(
                f"step {step}: the loss, gradients or update were not finite for {self.consecutive} consecutive steps "
                f"(steps {self._first_bad} to {step}; limit {self.max_consecutive}), so training stopped. {self._last()} "
                "Lower the learning rate, enable gradient clipping (optax.clip_by_global_norm), or check the data "
                "around these steps."
            )
        return True

    def _last(self) -> str:
        last = "none" if self.last_good_step is None else str(self.last_good_step)
        return f"The last step with a finite update was {last}."

    def pending(self) -> Optional[dict]:
        """The skipped steps still pending (``None`` when the last step was finite), as numbers
        for a checkpoint's metrics: :func:`fit` saves them with a stop (``num_steps``, Ctrl-C) on a
        skipped step, and a run resumed from that checkpoint counts on from them (:meth:`resume`).

        >>> g = NonFiniteGuard(max_consecutive=2)
        >>> g.update(1, {"skipped": 0}), g.update(2, {"skipped": 1})
        (False, True)
        >>> g.pending()
        {'skips_pending': 1, 'first_skipped_step': 2, 'last_finite_step': 1}
        """
        if not self.consecutive:
            return None
        last = {} if self.last_good_step is None else {"last_finite_step": self.last_good_step}
        return {"skips_pending": self.consecutive, "first_skipped_step": self._first_bad, **last}

    def resume(self, metrics: Optional[Mapping[str, Any]]) -> None:
        """Counts on from the skipped steps a checkpoint's ``metrics`` hold (:meth:`pending`;
        nothing when they hold none), as the uninterrupted run would have."""
        if not metrics or not metrics.get("skips_pending"):
            return
        self.consecutive = int(metrics["skips_pending"])
        self._first_bad = int(metrics["first_skipped_step"])
        last = metrics.get("last_finite_step")
        self.last_good_step = None if last is None else int(last)

    def check_finished(self, step: int) -> None:
        """Raises when the run ends while skipped steps are pending: its last updates were
        not finite, so its result must not pass for a finished run.

        Raises:
          NonFiniteError: the last ``consecutive`` steps were skipped.
        """
        if self.consecutive:
            raise NonFiniteError(
                f"step {step}: the run ended with {self.consecutive} consecutive non-finite step(s) (steps "
                f"{self._first_bad} to {step}), so its adapter is not a trained result and was not saved. {self._last()} "
                "Check the base weights and the data for NaN/inf (`jpeft info` on the model folder), lower the "
                "learning rate, or enable gradient clipping (train.max_grad_norm)."
            )


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns: the final state and the per-step history.

    ``history`` holds one dict per step with ``step``, ``loss``, ``skipped`` and the other
    scalar metrics, as Python floats. ``step_seconds`` is each step's wall time (host to
    host, the first one includes compilation); ``eval`` the last ``eval_fn`` result;
    ``interrupted`` whether Ctrl-C stopped the run; ``forgetting`` the forgetting guard's
    report (``None`` without a guard): on a stop, ``adapter`` and ``opt_state`` are those of
    step ``forgetting["kept_step"]`` while ``step`` is the step that crossed the budget.
    ``no_target_steps`` lists the steps whose batch held no loss term (``metrics["no_targets"]``,
    a step made with ``loss_weight``): they changed neither the adapter nor the optimizer state."""

    adapter: Any
    opt_state: Any
    key: Any
    step: int
    data_position: int
    history: list
    skipped: int
    interrupted: bool = False
    eval: Optional[dict] = None
    step_seconds: list = dataclasses.field(default_factory=list)
    forgetting: Optional[dict] = None
    no_target_steps: list = dataclasses.field(default_factory=list)


class _Interrupt:
    """SIGINT (Ctrl-C) and SIGTERM (what a scheduler, Kubernetes, Slurm or a spot pre-emption sends
    before SIGKILL) set a flag: the loop finishes the running step, saves and stops; a second
    signal stops at once (KeyboardInterrupt). The handlers are only installed in the main thread
    (signal handlers cannot be set elsewhere) and the previous ones are put back on exit.

    With several processes (``jax.process_count() > 1``) a signal usually reaches one of them:
    :meth:`stop_now` makes every process stop after the same step
    (:class:`jpeft.distributed.StopAgreement`), so none is left waiting in the next step's
    collectives; it costs nothing per step until a signal arrives."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.hit = False
        self._old: dict = {}
        self._agree = None

    def __enter__(self):
        if self.enabled and jax.process_count() > 1:
            self._agree = StopAgreement()
        if self.enabled and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True
        said = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\njpeft: {said}: saving a checkpoint, then stopping (Ctrl-C or SIGTERM again to abort)",
              file=sys.stderr)

    def stop_now(self, step: int) -> bool:
        """Whether the loop stops before its next step (``step`` steps done): this process got a
        signal, or (several processes) the step the processes agreed on is reached."""
        if self._agree is None:
            return self.hit
        return self._agree.stop_now(step, self.hit)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            # None: the handler found was not set from Python (an embedding program's);
            # Python's own is the nearest that can be put back.
            signal.signal(sig, old if old is not None else
                          signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
        self._old = {}
        if self._agree is not None:
            self._agree.close()
            self._agree = None


# fit waits for the heap to settle after steps at least this long (see _hostmem.settle)
SETTLE_MIN_STEP_S = 0.5


def _summary_writer(logdir: str, purge_step: Optional[int] = None):
    """A TensorBoard SummaryWriter when tensorboard or tensorboardX is installed, else None
    (TensorBoard is optional: metrics always go to the JSONL file). ``purge_step``: see :class:`MetricLog`."""
    SummaryWriter = None
    # torch's writer needs the tensorboard package: without it, importing torch (seconds) finds nothing
    if importlib.util.find_spec("tensorboard") is not None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            pass
    if SummaryWriter is None:
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            return None
    try:
        return SummaryWriter(logdir, **({} if purge_step is None else {"purge_step": int(purge_step)}))
    except Exception as e:  # an unwritable folder, a broken install: said, not a silently missing log
        warnings.warn(f"TensorBoard logging is off for this run: SummaryWriter({logdir!r}) failed "
                      f"({type(e).__name__}: {e}); the metrics still go to the JSONL log.", UserWarning, stacklevel=3)
        return None


class MetricLog:
    """Metric records of a run: one JSON object per line in ``jsonl``, scalars to
    TensorBoard under ``tensorboard`` (when tensorboard or tensorboardX is installed) and,
    with ``echo``, a short line on stderr. Only the main process (``jax.process_index() == 0``)
    writes, so a multi-host run has one log.

    ``purge_step``: the first step whose records this log writes anew into a ``tensorboard`` folder an
    earlier run wrote into (a resumed run: the step after its checkpoint). It is handed to the
    SummaryWriter (``purge_step``), whose first event tells TensorBoard to hide that folder's older
    events of this step and later, so the steps the resumed run repeats are not shown twice. The JSONL file is
    appended to as it is (``jpeft train`` removes those records from it before the run).

    >>> import tempfile, os, json
    >>> d = tempfile.mkdtemp()
    >>> with MetricLog(os.path.join(d, "m.jsonl")) as log:
    ...     log({"step": 1, "loss": 2.5})
    >>> json.loads(open(os.path.join(d, "m.jsonl")).read())
    {'step': 1, 'loss': 2.5}
    """

    def __init__(self, jsonl: Optional[str] = None, *, tensorboard: Optional[str] = None, echo: bool = False,
                 purge_step: Optional[int] = None):
        self.main = jax.process_index() == 0
        self.echo = echo
        self._f = open(jsonl, "a") if (jsonl and self.main) else None
        if self._f is not None and self._f.tell() > 0:
            # a record cut off mid-write by a killed run: end its line, so that the next record is not glued
            # onto it (both unreadable)
            with open(jsonl, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    self._f.write("\n")
        self._tb = _summary_writer(tensorboard, purge_step) if (tensorboard and self.main) else None

    def __call__(self, rec: Mapping[str, Any]) -> None:
        if not self.main:
            return
        if self._f is not None:
            self._f.write(strict_json(dict(rec)) + "\n")
            self._f.flush()
        if self._tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, rec["step"])
        if self.echo:
            parts = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()
                     if k not in ("step", "elapsed_s") and v is not None]
            print(f"step {rec.get('step')}: " + ", ".join(parts), file=sys.stderr)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _stderr(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, file=sys.stderr)


def _tokens(batch, token_key: str) -> int:
    """The number of tokens in ``batch[token_key]`` (in a batch that is one array, its size); 0 for a
    batch without such an array (a tuple ``(x, y)``, a dict without ``token_key``)."""
    x = batch.get(token_key) if isinstance(batch, Mapping) else batch
    if not hasattr(x, "shape"):
        return 0
    return int(np.prod(np.shape(x)))


def _check_fit_args(batches, key, eval_every, log_every, num_steps, forgetting, forgetting_state) -> None:
    """:func:`fit`'s argument checks, before anything runs."""
    _validate.check_not_empty(batches, name="batches")
    _validate.check_key(key, where="fit")
    for name, v in (("eval_every", eval_every), ("log_every", log_every), ("num_steps", num_steps)):
        if name == "num_steps" and v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ConfigError(f"{name} must be a non-negative integer, found {v!r}.")
    if forgetting_state is not None and forgetting is None:
        # the guard's saved state would be dropped with no word: the resumed run would train unguarded
        raise ConfigError("fit got forgetting_state (a resumed forgetting guard's state) but no forgetting guard; pass "
                          "the guard it belongs to as forgetting=, or leave forgetting_state out.")


def _check_checkpoint(checkpoint, save_last: bool, forgetting) -> None:
    """Refuses, before the first step, a ``checkpoint`` object that lacks a method or a ``save`` keyword this
    run will call it with (the protocol of :func:`fit`'s ``checkpoint`` argument, which
    :class:`jpeft.checkpoint.CheckpointManager` follows): a custom object failed with a bare ``TypeError``
    or ``AttributeError`` only where the call came, a stop on skipped steps (``ranked``) at the end of the run."""
    if checkpoint is None:
        return
    lacking = [m for m in ("save", "all_steps", "metrics", "wait") if not callable(getattr(checkpoint, m, None))]
    need = ["data_position", "metrics"]
    need += ["force"] if save_last else []
    # a stop on skipped steps before any finite step is saved unranked where the object keeps the best by a metric
    need += ["ranked"] if save_last and getattr(checkpoint, "keep_best", 0) else []
    need += ["extra"] if forgetting is not None else []
    try:
        params = inspect.signature(checkpoint.save).parameters.values() if not lacking else ()
    except (TypeError, ValueError):  # a callable whose signature Python cannot read: it is taken at its word
        params = [inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)]
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if not lacking and not any(p.kind is p.VAR_KEYWORD for p in params):
        lacking = [f"save(..., {k}=)" for k in need if k not in named]
    if lacking:
        raise ConfigError(
            f"fit's checkpoint object ({type(checkpoint).__name__}) lacks {lacking}, which this run calls. fit calls "
            "save(step, adapter, opt_state, key, data_position=, metrics=) after finite steps, with force= for "
            "save_last, extra= with a forgetting guard, and ranked=False where the object has a keep_best and "
            "save_last stops on skipped steps before any finite step (no loss to rank that state by: keep its "
            "metrics, never rank it), and all_steps(), metrics(step) and wait(). Use "
            "jpeft.checkpoint.CheckpointManager, add what is missing, or run without the option that needs it "
            "(docs/CHECKPOINTS.md).")


def _warn_half_precision(adapter) -> None:
    """Warns when trainable arrays are bfloat16/float16: an update below a weight's rounding step (1/256 of it in
    bfloat16) rounds away, so at the usual learning rates such an adapter silently stops learning."""
    train = _trainable(adapter) if isinstance(adapter, Mapping) else adapter
    found = [(jax.tree_util.keystr(p), x.dtype) for p, x in jax.tree_util.tree_leaves_with_path(train)
             if is_half_float(getattr(x, "dtype", None))]
    if found:
        n = len(jax.tree.leaves(train))
        warnings.warn(
            f"jpeft.fit: {len(found)} of {n} trainable arrays are half precision (e.g. {found[0][0]}: {found[0][1]}); an "
            "optimizer update smaller than a weight's rounding step (1/256 of it in bfloat16) rounds away, so at small "
            "learning rates they stop learning. Keep trainable arrays in float32 (jpeft.init's default; a model's dtype= "
            "still computes in bfloat16).", RuntimeWarning, stacklevel=3)


def _eval_floats(result, step: int) -> dict:
    """``eval_fn``'s result as Python numbers: a JAX or NumPy scalar (``{"loss": loss_fn(...)}``)
    would reach the JSONL log as an array, which ``json`` cannot write (a raw TypeError after the
    run's steps), and ``FitResult.eval`` would hold device arrays."""
    if not isinstance(result, Mapping):
        raise ConfigError(f"eval_fn(adapter, step) must return a dict of numbers, found {type(result).__name__} at "
                          f"step {step}.")
    out = {}
    for k, v in result.items():
        if isinstance(v, (int, float)):  # a bool too ({"improved": True}: logged as true)
            out[k] = v
            continue
        a = np.asarray(jax.device_get(v))
        if a.ndim != 0 or not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
            raise ConfigError(f"eval_fn(adapter, step) must return a dict of numbers; at step {step} its {k!r} is "
                              f"{type(v).__name__} of shape {a.shape}. Reduce it to one number (e.g. its mean).")
        out[k] = a.item()  # an int, a float or a bool
    return out


def _host_metrics(metrics: Mapping[str, Any]) -> dict:
    """A step's scalar metrics as host floats, in one copy: a per-example metric may be split
    across processes, so only scalars are read. A pmap step's metrics lead with its device axis
    (its ``loss``, one number per call elsewhere, is then one per device, every device holding
    the same reduced values): the first device's copy is read, as :func:`jpeft.unreplicate`
    takes it, so the loss is logged and a skipped step is counted as for the other steps."""
    def per_device(v) -> bool:  # one element on each of the devices it spans
        return (isinstance(v, jax.Array) and v.ndim == 1 and len(v.sharding.device_set) == v.shape[0]
                and all(sh.data.shape == (1,) for sh in v.addressable_shards))

    pmapped = per_device(metrics.get("loss"))
    picked = {k: (v.addressable_shards[0].data.reshape(()) if np.ndim(v) else v) for k, v in metrics.items()
              if np.ndim(v) == 0 or (pmapped and per_device(v))}
    return {k: float(np.asarray(v)) for k, v in jax.device_get(picked).items()}


def _check_batch(batch, reference, pos: int, vocab_size, max_positions, token_key) -> Any:
    """:func:`fit`'s host checks of batch ``pos`` before its step: the structure, shapes and dtypes
    of the first batch (``reference``; the first batch becomes it, and is returned), the token ids
    and sequence lengths."""
    if reference is None:
        reference = batch
    else:
        _validate.check_like(batch, reference, name=f"batch {pos}")
    if vocab_size is not None or max_positions is not None:
        _validate.check_tokens(batch, vocab_size=vocab_size, max_positions=max_positions, key=token_key,
                               name=f"batch {pos}")
    return reference


def _stop_save_args(history: list, guard: NonFiniteGuard, resumed: Mapping[str, Any], checkpoint) -> dict:
    """The metrics (and ranking) of the checkpoint saved where the run stops, as ``save`` keywords. After
    skipped steps its state is the last finite step's, so it carries that step's loss (from this call,
    else from the checkpoint resumed from), never the skipped step's NaN that ``keep_best`` would rank,
    and the skips still pending (:meth:`NonFiniteGuard.pending`). Without a finite loss known (every step
    skipped since step 0) it carries the pending skips alone, saved unranked (``ranked=False``) when the
    manager keeps the best by the loss: nothing to rank it by, and a resumed run still counts them on."""
    pending = guard.pending()
    if pending is None:
        return {"metrics": {"loss": history[-1]["loss"]} if "loss" in history[-1] else None}
    kept = next((h for h in reversed(history) if not h.get("skipped")), resumed)
    loss = {"loss": kept["loss"]} if "loss" in kept else {}
    unranked = not loss and getattr(checkpoint, "keep_best", 0)
    return {"metrics": {**loss, **pending}, **({"ranked": False} if unranked else {})}


def fit(
    step_fn: Callable,
    params,
    adapter,
    opt_state,
    batches: Iterable,
    *,
    key,
    num_steps: Optional[int] = None,
    start_step: int = 0,
    data_position: int = 0,
    checkpoint=None,
    save_last: bool = False,
    max_consecutive_skips: int = 5,
    vocab_size: Optional[int] = None,
    max_positions: Optional[int] = None,
    token_key: str = "input_ids",
    progress: bool = False,
    desc: str = "fit",
    on_step: Optional[Callable[[int, dict], None]] = None,
    eval_fn: Optional[Callable[[Any, int], dict]] = None,
    eval_every: int = 0,
    total_steps: Optional[int] = None,
    log: Optional[Callable[[dict], None]] = None,
    log_every: int = 1,
    schedule: Optional[Callable] = None,
    lr_fn: Optional[Callable] = None,
    handle_interrupt: bool = False,
    forgetting=None,
    forgetting_state: Optional[dict] = None,
) -> FitResult:
    """Runs ``step_fn`` over ``batches`` with the guard, validation, evaluation, logging and
    checkpoints.

    Args:
      step_fn: ``step(params, adapter, opt_state, batch, key) -> (adapter, opt_state, metrics)``
        as made by :func:`jpeft.make_train_step`, :func:`jpeft.make_pmap_train_step` or
        :func:`jpeft.make_sharded_train_step`.
      params, adapter, opt_state: the frozen base, the adapter and the optimizer state.
      batches: an iterable of batches, already positioned at ``data_position``.
      key: the run's base key; step ``s`` uses ``jax.random.fold_in(key, s)``.
      num_steps: stop after this many steps of this call (default: when ``batches`` ends).
      start_step: the number of steps already done (``state.step`` after a restore).
      data_position: the number of batches already consumed (``state.data_position``).
      checkpoint: a :class:`jpeft.checkpoint.CheckpointManager`; after each step whose
        update was finite, ``checkpoint.save`` is called (it writes every ``save_every``
        steps) with ``data_position`` and ``{"loss": ...}``. Nothing is saved while
        non-finite steps are pending, except by ``save_last`` at a stop. Resuming (``start_step``
        a step of ``checkpoint``), the skipped steps that checkpoint stopped on count on. Another
        object works if it has what the run calls: ``save(step, adapter, opt_state, key, *,
        data_position, metrics)``, plus ``force`` with ``save_last``, ``extra`` with ``forgetting``, and
        ``ranked`` with ``save_last`` where it has a truthy ``keep_best`` (``ranked=False``: a stop on skipped
        steps before any finite step, whose state has no loss to rank it by), and ``all_steps()``,
        ``metrics(step)`` and ``wait()``; one that lacks any of them is refused before the first step.
      save_last: also save the last step (finished, stopped by ``num_steps`` or by Ctrl-C)
        when ``save_every`` did not, so the run can be resumed from where it stopped. A stop on
        skipped steps saves the last finite step's state with that step's loss and the skips
        pending (:meth:`NonFiniteGuard.pending`), and warns; a run that ends on them raises.
      max_consecutive_skips: see :class:`NonFiniteGuard`.
      vocab_size, max_positions, token_key: when given, ``batch[token_key]`` is checked
        before each step (:func:`jpeft.validate.check_tokens`).
      progress, desc: show a tqdm progress bar (on the main process) labelled ``desc``; each
        evaluation's line, written above it on stdout (``"{desc}: step {step}: eval {name} {value},
        ..."``), says ``desc`` too, so that the lines of several runs in stdout redirected to a file
        tell which run they belong to.
      on_step: called as ``on_step(step, metrics)`` with host floats after each step.
      eval_fn: ``eval_fn(adapter, step) -> dict`` of numbers (Python, NumPy or JAX scalars; kept
        and logged as Python numbers), run every ``eval_every`` steps
        and at ``total_steps`` (without ``total_steps`` and ``num_steps``: at the last step, when
        the batches end); its result is logged with an ``eval_`` prefix.
      total_steps: the length of the whole run (progress bar, final evaluation); default
        ``start_step + num_steps``.
      log, log_every: ``log(record)`` (e.g. a :class:`MetricLog`) receives ``step``,
        ``loss``, ``grad_norm``, ``no_targets`` (1, only for a step whose batch held no loss term),
        ``lr`` (from ``schedule``), ``tokens_per_s`` (tokens of
        ``batch[token_key]``, the first, compiling step left out; ``None`` for batches without
        that array, such as a tuple ``(x, y)``) and ``elapsed_s`` every
        ``log_every`` steps and at the last step (``total_steps``, or when the batches end), and
        every evaluation.
      schedule: the optimizer's learning-rate schedule, for the ``lr`` record: ``schedule(step - 1)``,
        which is the rate applied only while no step was skipped and nothing rewound the optimizer
        state (a forgetting-guard rollback restores an older state, schedule count included).
      lr_fn: ``lr_fn(opt_state, skipped) -> float``, the rate the step's update applied read from the
        optimizer state after it (``skipped``: the guard kept the state); used instead of ``schedule``.
      handle_interrupt: catch Ctrl-C (SIGINT) and SIGTERM (a scheduler's or a pre-emption's
        notice): finish the running step, save it (``save_last``) and return with
        ``interrupted=True``; a second signal aborts (``KeyboardInterrupt``). A signal during
        the last step interrupts nothing: the run finishes as without it. The previous
        handlers are put back on return (installed only from the main thread). With several
        processes, a signal reaching any of them stops every process after the same step (no
        cost per step until a signal comes); every process must pass ``handle_interrupt=True``.
      forgetting: a :class:`jpeft.ForgettingGuard`: canary loss rise and KL from the base
        measured at the start and every ``forgetting.every`` steps (and at ``total_steps``; without
        ``total_steps``, at the last step, also when the batches end before ``num_steps``),
        logged (``canary_loss``, ``canary_loss_rise``, ``canary_kl``) and shown in the
        progress bar. Over budget, ``"stop"`` ends the run and returns the state of the last
        within-budget check (no ``save_last`` checkpoint of the over-budget state);
        ``"rollback"`` continues from that state with a lower learning rate. The guard's
        report is ``FitResult.forgetting``. Within budget the run is bit-identical to one
        without the guard. Every checkpoint also holds the guard's state (its kept adapter and
        optimizer state, checks and rollback count: ``ForgettingGuard.state``).
      forgetting_state: resuming a run that had ``forgetting``: the guard's state from the
        checkpoint resumed from (``TrainState.extra``), so the guard continues as in the
        uninterrupted run (same kept state, checks and rollbacks). Without it a resumed guard
        starts afresh from the resumed state.

    Returns:
      A :class:`FitResult`.

    Raises:
      NonFiniteError: too many consecutive non-finite steps, or the run ended on
        non-finite steps (names the step): its last batch, or ``total_steps``, reached (a stop by
        ``num_steps`` before ``total_steps`` or by Ctrl-C is not an end).
      InputValidationError: an empty dataset, a batch whose structure, shape or dtype
        differs from the first batch's, or bad token ids / sequence lengths.
      ConfigError: a bad argument, or a ``checkpoint`` object lacking a method or ``save`` keyword this run calls.

    >>> import jax, jax.numpy as jnp, flax.linen as nn, optax, jpeft
    >>> model, x = nn.Dense(1), jax.random.normal(jax.random.key(0), (32, 4))
    >>> params = model.init(jax.random.key(1), x)
    >>> adapter = jpeft.init(jpeft.LoraConfig(r=2, target_modules=".*"), params, jax.random.key(2))
    >>> loss_fn = lambda p, a, b, k: jnp.mean((jpeft.apply(model, p, a, b["x"]) - b["x"].sum(-1, keepdims=True)) ** 2)
    >>> opt = optax.adam(1e-2)
    >>> step = jpeft.make_train_step(loss_fn, opt)
    >>> result = jpeft.fit(step, params, adapter, opt.init(adapter), [{"x": x}] * 20, key=jax.random.key(3))
    >>> result.step, len(result.history), result.skipped
    (20, 20, 0)
    >>> result.history[-1]["loss"] < result.history[0]["loss"]
    True
    """
    _check_fit_args(batches, key, eval_every, log_every, num_steps, forgetting, forgetting_state)
    _check_checkpoint(checkpoint, save_last, forgetting)
    _warn_half_precision(adapter)
    guard = NonFiniteGuard(max_consecutive_skips)
    history: list[dict] = []
    step = int(start_step)
    resumed = {}  # the metrics of the checkpoint this run resumes from: skipped steps it stopped on are still pending
    if checkpoint is not None and step > 0 and step in checkpoint.all_steps():
        resumed = checkpoint.metrics(step) or {}
        guard.resume(resumed)
    pos = int(data_position)
    open_end = total_steps is None  # no length given: the run may end with its batches
    if total_steps is None and num_steps is not None:
        total_steps = step + int(num_steps)
    reference = None
    it = iter(batches)
    if num_steps is not None:
        it = itertools.islice(it, int(num_steps))
    main = jax.process_index() == 0
    bar = None
    if progress and main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr)
    ran = 0
    last_eval = None
    logged = evaluated = None  # the last step logged / evaluated
    seconds: list[float] = []
    tokens, timed = 0, 0.0
    t_start = time.perf_counter()
    interrupted = False
    canary = None  # the last canary metrics, for the progress bar
    no_targets: list[int] = []  # the steps whose batch held no loss term (metrics["no_targets"])
    if forgetting is not None:
        canary = forgetting.start(params, adapter, opt_state, step, resumed=forgetting_state)
        if log is not None and forgetting_state is None:  # a resumed guard's checks were logged by its run
            log({"step": step, **canary})

    def evaluate(step):
        nonlocal last_eval, evaluated
        last_eval = _eval_floats(eval_fn(adapter, step), step)
        evaluated = step
        if log is not None:
            log({"step": step, **{f"eval_{k}": v for k, v in last_eval.items()}})
        if bar is not None:
            bar.write(f"{desc}: step {step}: eval " + ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items()))

    def log_step(step, host):
        nonlocal logged
        rec = {"step": step, "loss": host.get("loss"), "grad_norm": host.get("grad_norm")}
        if lr_fn is not None:  # a step without targets kept the state as a skipped one does
            rec["lr"] = float(lr_fn(opt_state, bool(host.get("skipped") or host.get("no_targets"))))
        elif schedule is not None:
            rec["lr"] = float(schedule(step - 1))
        rec["tokens_per_s"] = tokens / timed if timed > 0 and tokens else None  # None: no token ids to count
        rec["elapsed_s"] = time.perf_counter() - t_start
        if host.get("skipped"):
            rec["skipped"] = 1
        if host.get("no_targets"):
            rec["no_targets"] = 1
        log(rec)
        logged = step

    def canary_check(step):
        """The forgetting guard's check at ``step``; over budget, the state it returns replaces the run's."""
        nonlocal canary, adapter, opt_state
        canary, decision, kept = forgetting.check(params, adapter, opt_state, step)
        if log is not None:
            log({"step": step, **canary, **({} if decision == "ok" else {"canary_action": decision})})
        if decision != "ok":
            adapter, opt_state = kept
            msg = f"jpeft: forgetting guard: {forgetting.message}"
            if bar is not None:
                bar.write(msg, file=sys.stderr)
            else:
                _stderr(msg)
        return decision

    heap = _hostmem.StepHeap()
    try:
        with _Interrupt(handle_interrupt) as intr:
            for batch in it:
                if intr.stop_now(step):
                    interrupted = True
                    break
                reference = _check_batch(batch, reference, pos, vocab_size, max_positions, token_key)
                t0 = time.perf_counter()
                # the C heap around the step (_hostmem.StepHeap): not watched around the first
                # step (it compiles), nor when steps are short (a look costs a few milliseconds)
                heap.before(bool(ran) and seconds[-1] >= SETTLE_MIN_STEP_S)
                adapter, opt_state, metrics = step_fn(params, adapter, opt_state, batch, jax.random.fold_in(key, step + 1))
                host = _host_metrics(metrics)
                # XLA frees the step's temporaries just after its outputs are ready: wait for that
                # before the next step allocates its own, and hand back their hole if something
                # came to lie between it and the top of the heap
                heap.after()
                dt = time.perf_counter() - t0
                step += 1
                pos += 1
                ran += 1
                seconds.append(dt)
                if ran > 1:  # the first step includes compilation
                    tokens += _tokens(batch, token_key)
                    timed += dt
                host["step"] = step
                history.append(host)
                if on_step is not None:
                    on_step(step, host)
                if host.get("no_targets"):  # nothing was updated, and nothing diverged: the guard does not count it
                    no_targets.append(step)
                    skipped = False
                else:
                    skipped = guard.update(step, host)  # raises NonFiniteError after too many
                if log is not None and ((log_every and step % log_every == 0) or step == total_steps):
                    log_step(step, host)
                decision = "ok"
                other_work = ran == 1  # the first step compiled
                if forgetting is not None and not skipped and forgetting.due(step, total_steps):
                    other_work = True
                    decision = canary_check(step)
                if eval_fn is not None and not skipped and ((eval_every and step % eval_every == 0) or step == total_steps):
                    evaluate(step)  # after the guard: of the state that is kept
                    other_work = True
                if other_work:
                    # Under the `jpeft` command's kept heap on the CPU (docs/ARCHITECTURE.md,
                    # "Host memory pages"), work other than a training step (compiling, an
                    # evaluation, a canary check) leaves allocations inside the hole the last
                    # step's temporaries left; the next step's temporaries then go above it and
                    # the peak grows by a step's temporaries. Handing the hole's pages back here
                    # avoids that (full fine-tuning, issue size: peak 2,767 -> 1,729 MiB); plain
                    # steps keep reusing the previous step's pages.
                    jax.block_until_ready((adapter, opt_state))
                    # (after long work only: watching for temporaries freed late costs ~50 ms)
                    heap.release(wait=_hostmem.RELEASE_WAIT if seconds[-1] >= SETTLE_MIN_STEP_S else 0.0)
                if checkpoint is not None and not skipped and decision != "stop":
                    checkpoint.save(step, adapter, opt_state, key, data_position=pos,
                                    metrics={"loss": host["loss"]} if "loss" in host else None,
                                    **({} if forgetting is None else {"extra": forgetting.state()}))
                if bar is not None:
                    bar.update(1)
                    tps = f"{tokens / timed:,.0f}" if timed > 0 and tokens else "-"
                    extra = {} if canary is None else {"canary_rise": f"{canary['canary_loss_rise']:.4f}",
                                                       "canary_kl": f"{canary['canary_kl']:.4f}"}
                    bar.set_postfix(loss=f"{host.get('loss', float('nan')):.4f}", tok_s=tps,
                                    skipped=guard.total_skipped, refresh=False, **extra)
                if decision == "stop":
                    break
            # a signal during the last step (the batches ended, or the guard stopped, after it) interrupts
            # nothing: the run ends as it would have without it (its final log, check, evaluation and save)
        if ran == 0 and not interrupted:
            raise InputValidationError("batches yielded no batch: expected at least one. Check the data source and its filters.")
        # the run ends with its batches (not with Ctrl-C or a forgetting-guard stop)
        ends = total_steps is None and ran and not interrupted and not (forgetting is not None
                                                                      and forgetting.report["stopped"])
        if ends and log is not None and logged != step:  # its last step's record, as total_steps would have it
            log_step(step, history[-1])
        # stopped by num_steps before total_steps, or by Ctrl-C: not the end of the run, so skipped steps
        # still pending are no diverged result (its state is the last finite step's; a resumed run counts on)
        early = interrupted or (num_steps is not None and ran == int(num_steps) and step < total_steps)
        if not early:
            guard.check_finished(step)
        if (forgetting is not None and open_end and ran and not interrupted
                and not forgetting.report["stopped"] and forgetting.report["checks"][-1]["step"] != step):
            # no total_steps: the run ends with its batches (also before num_steps, which is at most), so its last
            # step is checked as total_steps would be; over budget the kept state is returned (a rollback has no
            # batch left). Unchecked, the adapter returned could be far over the budget with no word.
            # (With total_steps given, batches that end first leave a run that a later call continues.)
            if canary_check(step) != "ok" and eval_fn is not None and last_eval is not None:
                evaluate(step)  # of the state that is returned
        stopped = forgetting is not None and forgetting.report["stopped"]
        if ends and not stopped and eval_fn is not None and evaluated != step and not history[-1].get("skipped"):
            evaluate(step)  # likewise the final evaluation
        if checkpoint is not None and save_last and ran and not stopped and step not in checkpoint.all_steps():
            checkpoint.save(step, adapter, opt_state, key, data_position=pos, force=True,
                            **_stop_save_args(history, guard, resumed, checkpoint),
                            **({} if forgetting is None else {"extra": forgetting.state()}))
        if early and guard.consecutive:
            warnings.warn(
                f"jpeft.fit: stopped at step {step} with {guard.consecutive} non-finite step(s) pending (steps "
                f"{guard._first_bad} to {step}): they changed nothing, so the adapter and optimizer state are those of "
                f"the last finite step ({'none' if guard.last_good_step is None else guard.last_good_step}). A run "
                "resumed from this step counts them on; check the data around these steps.", RuntimeWarning, stacklevel=2)
    except NonFiniteError:
        if checkpoint is not None:
            checkpoint.wait()
        raise
    finally:
        if bar is not None:
            bar.close()
    if checkpoint is not None:
        checkpoint.wait()
    if no_targets:
        shown = ", ".join(map(str, no_targets[:8])) + (", ..." if len(no_targets) > 8 else "")
        warnings.warn(
            f"jpeft.fit: {len(no_targets)} of {ran} steps (step {shown}) had a batch without a single target token "
            "(every label masked: a prompt/completion row whose completion the sequence length cut off, or rows of "
            "prompts only), so they changed neither the adapter nor the optimizer state. Check the data's lengths "
            "and loss masks (a longer seq_len, shorter prompts).", RuntimeWarning, stacklevel=2)
    return FitResult(adapter, opt_state, key, step, pos, history, guard.total_skipped, interrupted, last_eval, seconds,
                     None if forgetting is None else forgetting.report, no_targets)
