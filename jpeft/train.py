"""Jitted training steps that differentiate the adapter only.

``loss_fn(params, adapter, batch, key)`` returns a scalar loss or ``(loss, aux)`` where
``aux`` is a dict of extra metrics. The step returned by :func:`make_train_step` is::

    adapter, opt_state, metrics = step(params, adapter, opt_state, batch, key)

``params`` (the frozen base) is never differentiated, never copied and never handed to the
optimizer; ``opt_state = optimizer.init(adapter)`` exists for adapter leaves only.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax


def _split_loss(out):
    if isinstance(out, tuple) and len(out) == 2:
        loss, aux = out
        return loss, (aux if aux is not None else {})
    return out, {}


def all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    if not leaves:
        return jnp.asarray(True)
    return jnp.stack(leaves).all()


def loss_and_grad(loss_fn: Callable, params, adapter, batch, key):
    """``(loss, aux), grads`` with gradients for the adapter only."""

    def f(adapter):
        return _split_loss(loss_fn(params, adapter, batch, key))

    return jax.value_and_grad(f, has_aux=True)(adapter)


def apply_update(optimizer: optax.GradientTransformation, adapter, opt_state, grads, loss, aux, *, skip_nonfinite=True):
    """Optimizer update with the non-finite guard: a step whose loss or gradients are not
    finite leaves the adapter and optimizer state unchanged and reports ``skipped = 1``."""
    updates, new_state = optimizer.update(grads, opt_state, adapter)
    new_adapter = optax.apply_updates(adapter, updates)
    finite = jnp.isfinite(loss) & all_finite(grads)
    if skip_nonfinite:
        keep = lambda new, old: jnp.where(finite, new, old)
        new_adapter = jax.tree.map(keep, new_adapter, adapter)
        new_state = jax.tree.map(keep, new_state, opt_state)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "skipped": (~finite).astype(jnp.int32)}
    if isinstance(aux, dict):
        metrics.update(aux)
    elif aux is not None and aux != {}:
        metrics["aux"] = aux
    return new_adapter, new_state, metrics


def make_step_fn(loss_fn: Callable, optimizer: optax.GradientTransformation, *, skip_nonfinite: bool = True):
    """The un-jitted step body, for composing into pmap / shard_map / custom loops."""

    def step(params, adapter, opt_state, batch, key):
        (loss, aux), grads = loss_and_grad(loss_fn, params, adapter, batch, key)
        return apply_update(optimizer, adapter, opt_state, grads, loss, aux, skip_nonfinite=skip_nonfinite)

    return step


def make_train_step(
    loss_fn: Callable,
    optimizer: optax.GradientTransformation,
    *,
    donate: bool = True,
    skip_nonfinite: bool = True,
):
    """A jitted ``step(params, adapter, opt_state, batch, key) -> (adapter, opt_state, metrics)``.

    The adapter and optimizer-state buffers are donated (pass ``donate=False`` to keep the
    inputs usable). ``metrics`` holds ``loss``, ``grad_norm``, ``skipped`` (1 when the
    non-finite guard skipped the update) and whatever dict ``loss_fn`` returned as aux.

    >>> import jax, jax.numpy as jnp, flax.linen as nn, optax, jpeft
    >>> model = nn.Dense(1); x = jnp.ones((8, 3)); y = jnp.zeros((8, 1))
    >>> params = model.init(jax.random.key(0), x)
    >>> adapter = jpeft.init(jpeft.LoraConfig(r=2, target_modules=".*"), params, jax.random.key(1))
    >>> def loss_fn(params, adapter, batch, key):
    ...     pred = jpeft.apply(model, params, adapter, batch["x"])
    ...     return jnp.mean((pred - batch["y"]) ** 2)
    >>> opt = optax.adam(1e-2)
    >>> step = jpeft.make_train_step(loss_fn, opt)
    >>> adapter, state, metrics = step(params, adapter, opt.init(adapter), {"x": x, "y": y}, jax.random.key(2))
    >>> sorted(metrics)
    ['grad_norm', 'loss', 'skipped']
    """
    body = make_step_fn(loss_fn, optimizer, skip_nonfinite=skip_nonfinite)
    return jax.jit(body, donate_argnums=(1, 2) if donate else ())
