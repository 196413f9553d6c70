"""A small host-side training loop with the non-finite guard, input validation and
checkpointing wired in.

The jitted step (:func:`jpeft.make_train_step`) already skips an update whose loss or
gradients are not finite and reports ``metrics["skipped"] = 1``. On the host,
:class:`NonFiniteGuard` counts consecutive skips and raises
:class:`~jpeft.errors.NonFiniteError` naming the step once ``max_consecutive`` is reached;
:func:`fit` never saves a checkpoint while skips are pending, so the last good checkpoint
stays untouched and restorable.

The step key is ``jax.random.fold_in(key, step)``: it depends on the step number only, so a
run resumed from a checkpoint draws exactly the keys the uninterrupted run would have drawn.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Iterable, Mapping, Optional

import jax
import numpy as np

from jpeft import validate as _validate
from jpeft.errors import ConfigError, InputValidationError, NonFiniteError

__all__ = ["NonFiniteGuard", "FitResult", "fit"]


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
    jpeft.errors.NonFiniteError: step 4: the loss or gradients were not finite for 3 consecutive steps (steps 2 to 4; limit 2), so training stopped. The last step with a finite update was 1. Lower the learning rate, enable gradient clipping (optax.clip_by_global_norm), or check the data around these steps.
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
            last = "none" if self.last_good_step is None else str(self.last_good_step)
            raise NonFiniteError(
                f"step {step}: the loss or gradients were not finite for {self.consecutive} consecutive steps "
                f"(steps {self._first_bad} to {step}; limit {self.max_consecutive}), so training stopped. The last step "
                f"with a finite update was {last}. Lower the learning rate, enable gradient clipping "
                "(optax.clip_by_global_norm), or check the data around these steps."
            )
        return True


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns: the final state and the per-step history.

    ``history`` holds one dict per step with ``step``, ``loss``, ``skipped`` and the other
    scalar metrics, as Python floats."""

    adapter: Any
    opt_state: Any
    key: Any
    step: int
    data_position: int
    history: list
    skipped: int


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
    max_consecutive_skips: int = 5,
    vocab_size: Optional[int] = None,
    max_positions: Optional[int] = None,
    token_key: str = "input_ids",
    progress: bool = False,
    on_step: Optional[Callable[[int, dict], None]] = None,
) -> FitResult:
    """Runs ``step_fn`` over ``batches`` with the guard, validation and checkpoints.

    Args:
      step_fn: ``step(params, adapter, opt_state, batch, key) -> (adapter, opt_state, metrics)``
        as made by :func:`jpeft.make_train_step`.
      params, adapter, opt_state: the frozen base, the adapter and the optimizer state.
      batches: an iterable of batches, already positioned at ``data_position``.
      key: the run's base key; step ``s`` uses ``jax.random.fold_in(key, s)``.
      num_steps: stop after this many steps (default: when ``batches`` ends).
      start_step: the number of steps already done (``state.step`` after a restore).
      data_position: the number of batches already consumed (``state.data_position``).
      checkpoint: a :class:`jpeft.checkpoint.CheckpointManager`; after each step whose
        update was finite, ``checkpoint.save`` is called (it writes every ``save_every``
        steps) with ``data_position`` and ``{"loss": ...}``. Nothing is saved while
        non-finite steps are pending.
      max_consecutive_skips: see :class:`NonFiniteGuard`.
      vocab_size, max_positions, token_key: when given, ``batch[token_key]`` is checked
        before each step (:func:`jpeft.validate.check_tokens`).
      progress: show a tqdm progress bar.
      on_step: called as ``on_step(step, metrics)`` with host floats after each step.

    Returns:
      A :class:`FitResult`.

    Raises:
      NonFiniteError: too many consecutive non-finite steps (names the step).
      InputValidationError: an empty dataset, a batch whose structure, shape or dtype
        differs from the first batch's, or bad token ids / sequence lengths.
    """
    _validate.check_not_empty(batches, name="batches")
    guard = NonFiniteGuard(max_consecutive_skips)
    history: list[dict] = []
    step = int(start_step)
    pos = int(data_position)
    reference = None
    it = iter(batches)
    if num_steps is not None:
        it = itertools.islice(it, int(num_steps))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_steps, desc="fit", unit="step")
    ran = 0
    try:
        for batch in it:
            if reference is None:
                reference = batch
            else:
                _validate.check_like(batch, reference, name=f"batch {pos}")
            if vocab_size is not None or max_positions is not None:
                _validate.check_tokens(batch, vocab_size=vocab_size, max_positions=max_positions, key=token_key,
                                       name=f"batch {pos}")
            step += 1
            adapter, opt_state, metrics = step_fn(params, adapter, opt_state, batch, jax.random.fold_in(key, step))
            pos += 1
            ran += 1
            host = {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items() if np.ndim(v) == 0}
            host["step"] = step
            history.append(host)
            if on_step is not None:
                on_step(step, host)
            skipped = guard.update(step, host)  # raises NonFiniteError after too many
            if checkpoint is not None and not skipped:
                checkpoint.save(step, adapter, opt_state, key, data_position=pos,
                                metrics={"loss": host["loss"]} if "loss" in host else None)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=host.get("loss"), skipped=guard.total_skipped)
    except NonFiniteError:
        if checkpoint is not None:
            checkpoint.wait()
        raise
    finally:
        if bar is not None:
            bar.close()
    if ran == 0:
        raise InputValidationError("batches yielded no batch: expected at least one. Check the data source and its filters.")
    if checkpoint is not None:
        checkpoint.wait()
    return FitResult(adapter, opt_state, key, step, pos, history, guard.total_skipped)
