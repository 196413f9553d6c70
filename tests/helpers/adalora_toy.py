"""A toy problem for AdaLoRA's rank allocator (tests/test_methods_adalora.py and its 2-device
worker): three linear layers of different widths, every adapter tensor random."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jpeft


class Net(nn.Module):
    """6 -> 8 -> 5 -> 3."""

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(8, name="q")(x))
        h = jnp.tanh(nn.Dense(5, name="v")(h))
        return nn.Dense(3, name="o")(h)


def net_problem(config):
    """``(params, adapter, loss_fn, batch)``: the toy net with every adapter tensor random (E too,
    zero at init) and ``batch(step)`` cycling over 32 examples 8 at a time."""
    net = Net()
    x = jax.random.normal(jax.random.key(0), (32, 6))
    y = jax.random.normal(jax.random.key(1), (32, 3))
    params = net.init(jax.random.key(2), x)
    ad = jpeft.init(config, params, jax.random.key(3))
    ad = {p: dataclasses.replace(n, lora_E=jax.random.normal(jax.random.fold_in(jax.random.key(4), i), n.lora_E.shape))
          for i, (p, n) in enumerate(sorted(ad.items()))}

    def loss_fn(params, a, batch, key):
        return jnp.mean((jpeft.apply(net, params, a, batch["x"]) - batch["y"]) ** 2)

    def batch(s):
        i = (np.arange(8) + 8 * s) % 32
        return {"x": x[i], "y": y[i]}

    return params, ad, loss_fn, batch
