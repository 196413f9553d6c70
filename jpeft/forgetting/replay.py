"""Experience replay with a reservoir buffer (Vitter's algorithm R), as pure functions.

:class:`ReservoirBuffer` is an immutable pytree: fixed-capacity storage (a pytree of arrays
with a leading ``capacity`` axis), the number of examples seen so far and the number held.
:func:`reservoir_add` returns a new buffer in which every example of the stream so far is
held with the same probability ``min(1, capacity / seen)``; :func:`mix_batch` replaces a set
share of each training batch with examples drawn uniformly from the buffer, so the batch
keeps its shape (and the jitted step is compiled once).

>>> import jax, jax.numpy as jnp
>>> from jpeft.forgetting import replay
>>> buf = replay.reservoir_init({"x": jnp.zeros((3,)), "y": jnp.zeros((), jnp.int32)}, capacity=4)
>>> batch = {"x": jnp.ones((6, 3)), "y": jnp.arange(6)}
>>> buf = replay.reservoir_add(buf, batch, jax.random.key(0))
>>> int(buf.seen), int(buf.size)
(6, 4)
>>> mixed = replay.mix_batch(batch, buf, 0.5, jax.random.key(1))
>>> mixed["x"].shape
(6, 3)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jpeft.errors import ConfigError, InputValidationError

__all__ = ["ReservoirBuffer", "reservoir_init", "reservoir_add", "reservoir_sample", "mix_batch"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ReservoirBuffer:
    """``data``: pytree of arrays ``[capacity, ...]``; ``seen``: examples offered so far;
    ``size``: examples held (``min(seen, capacity)``)."""

    data: Any
    seen: jax.Array
    size: jax.Array

    @property
    def capacity(self) -> int:
        return int(jax.tree.leaves(self.data)[0].shape[0])


def reservoir_init(example, capacity: int) -> ReservoirBuffer:
    """An empty buffer for examples shaped like ``example`` (one example, no batch axis).

    Args:
      example: a pytree of arrays (or ``jax.ShapeDtypeStruct``) giving one example's shapes.
      capacity: how many examples the buffer holds.
    """
    if not (isinstance(capacity, int) and capacity > 0):
        raise ConfigError(f"replay capacity must be a positive integer, found {capacity!r}.")
    data = jax.tree.map(lambda e: jnp.zeros((capacity,) + tuple(jnp.shape(e)), getattr(e, "dtype", jnp.float32)), example)
    return ReservoirBuffer(data, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


def _batch_size(batch) -> int:
    leaves = jax.tree.leaves(batch)
    if not leaves:
        raise InputValidationError("the batch is empty; expected a pytree of arrays with a leading example axis.")
    n = leaves[0].shape[0]
    if any(x.shape[0] != n for x in leaves):
        raise InputValidationError(f"every array in the batch must share the leading axis; found sizes {[x.shape[0] for x in leaves]}.")
    return int(n)


def _check_examples(batch, buffer: ReservoirBuffer) -> int:
    """The batch size of ``batch``, whose examples must have the buffer's structure and shapes
    (an example of another shape would be broadcast into a slot, or fail deep inside JAX)."""
    n = _batch_size(batch)
    tb, tbuf = jax.tree.structure(batch), jax.tree.structure(buffer.data)
    if tb != tbuf:
        raise InputValidationError(f"batch structure {tb} does not match the buffer's {tbuf}.")
    for (path, x), d in zip(jax.tree_util.tree_leaves_with_path(batch), jax.tree.leaves(buffer.data)):
        if tuple(x.shape[1:]) != tuple(d.shape[1:]):
            raise InputValidationError(
                f"the batch's examples at {jax.tree_util.keystr(path)} have shape {tuple(x.shape[1:])}, the replay "
                f"buffer's {tuple(d.shape[1:])} (reservoir_init's example); every batch must hold examples of the "
                "buffer's shapes.")
    return n


@jax.jit
def reservoir_add(buffer: ReservoirBuffer, batch, key) -> ReservoirBuffer:
    """Offers each example of ``batch`` (leading axis) to the reservoir, in order.

    The ``n``-th example of the stream (0-based) goes to slot ``n`` while the buffer is not
    full; afterwards it replaces a uniformly chosen slot with probability ``capacity/(n+1)``
    and is dropped otherwise. Pure: returns a new buffer.

    Raises:
      InputValidationError: examples of another structure or shape than the buffer's.
    """
    n = _check_examples(batch, buffer)
    cap = jax.tree.leaves(buffer.data)[0].shape[0]
    keys = jax.random.split(key, n)

    def step(carry, inp):
        data, seen = carry
        ex, k = inp
        j = jax.random.randint(k, (), 0, jnp.maximum(seen + 1, 1))
        slot = jnp.where(seen < cap, seen, j)
        keep = slot < cap
        slot = jnp.minimum(slot, cap - 1)
        data = jax.tree.map(lambda d, e: d.at[slot].set(jnp.where(keep, e.astype(d.dtype), d[slot])), data, ex)
        return (data, seen + 1), None

    (data, seen), _ = jax.lax.scan(step, (buffer.data, buffer.seen), (batch, keys))
    return ReservoirBuffer(data, seen, jnp.minimum(seen, cap).astype(jnp.int32))


def reservoir_sample(buffer: ReservoirBuffer, n: int, key):
    """``n`` examples drawn uniformly (with replacement) from the held ones.

    Raises:
      InputValidationError: if the buffer is empty.
    """
    if int(buffer.size) == 0:
        raise InputValidationError("the replay buffer is empty; add examples with reservoir_add before sampling.")
    idx = jax.random.randint(key, (n,), 0, buffer.size)
    return jax.tree.map(lambda d: d[idx], buffer.data)


def replay_rows(ratio: float, batch_size: int) -> int:
    """The rows of a batch of ``batch_size`` that :func:`mix_batch` replays at ``ratio``:
    ``round(ratio * batch_size)``.

    Raises:
      ConfigError: ``ratio`` outside ``[0, 1)``, or above 0 and rounding to no row, or rounding
        to every row (no example of the current task left).
    """
    if not (0.0 <= float(ratio) < 1.0):
        raise ConfigError(f"replay ratio must be in [0, 1), found {ratio}; it is the share of each batch drawn from the buffer.")
    B = int(batch_size)
    k = int(round(float(ratio) * B))
    if k == 0 and float(ratio) > 0:
        raise ConfigError(
            f"replay ratio {ratio:g} of a batch of {B} rounds to 0 replayed rows, so nothing would be replayed; use a "
            f"ratio of at least {1 / B:.3g} (one row in {B}) or a larger batch, or 0 to turn replay off."
        )
    if k == B:
        raise ConfigError(
            f"replay ratio {ratio:g} of a batch of {B} rounds to all {B} rows, so the batch would hold no example of "
            f"the current task; use a ratio of at most {(B - 1) / B:.6g} ({B - 1} rows of {B}) or a larger batch.")
    return k


def mix_batch(batch, buffer: ReservoirBuffer, ratio: float, key):
    """Replaces ``round(ratio * B)`` rows of ``batch`` (size ``B``) with uniform samples from
    ``buffer``; returns the batch unchanged while the buffer is empty or ``ratio == 0``.

    Args:
      batch: pytree of arrays with a leading example axis ``B``.
      buffer: a :class:`ReservoirBuffer` with the same per-example structure.
      ratio: share of each batch taken from the buffer, in ``[0, 1)``; a ratio above 0 that
        rounds to no row of this batch, or one that rounds to every row (no example of the current
        task left), is refused (``ConfigError``).
      key: ``jax.random`` key.

    Raises:
      InputValidationError: examples of another structure or shape than the buffer's.
    """
    B = _check_examples(batch, buffer)
    k = replay_rows(ratio, B)
    if k == 0 or int(buffer.size) == 0:
        return batch
    old = reservoir_sample(buffer, k, key)
    return jax.tree.map(lambda new, o: jnp.concatenate([new[: B - k], o.astype(new.dtype)], axis=0), batch, old)
