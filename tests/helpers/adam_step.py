"""One jitted Adam step on an MSE loss through ``jpeft.apply``: the shared check of the tests of
adapter sites that hold new trainable values (lora_bias, modules_to_save, trainable tokens)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jpeft


def step_moves_adapter_only(model, params, adapter, x, y_shape):
    """Takes one Adam step (lr 1e-2) toward random targets of ``y_shape``; asserts the base is
    bit-identical afterwards and the loss went down. Returns the new adapter."""
    before = jax.tree.map(np.array, params)
    y = jax.random.normal(jax.random.key(5), y_shape)

    def loss(p, a):
        return jnp.mean((jpeft.apply(model, p, a, x) - y) ** 2)

    opt = optax.adam(1e-2)

    @jax.jit
    def step(p, a, s):
        g = jax.grad(loss, argnums=1)(p, a)
        u, s = opt.update(g, s, a)
        return optax.apply_updates(a, u), s

    new, _ = step(params, adapter, opt.init(adapter))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(before)):
        np.testing.assert_array_equal(a, b)
    assert float(loss(params, new)) < float(loss(params, adapter))
    return new
