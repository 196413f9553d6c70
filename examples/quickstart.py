"""LoRA on your own Flax linen model in about 15 lines (the README's quickstart).

Run: python examples/quickstart.py
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import jpeft


class MLP(nn.Module):  # any linen model: no jpeft code inside
    @nn.compact
    def __call__(self, x):
        return nn.Dense(1, name="head")(nn.relu(nn.Dense(64, name="hidden")(x)))


x = jax.random.normal(jax.random.key(0), (256, 8))
y = jnp.sin(x.sum(-1, keepdims=True))
model = MLP()
params = model.init(jax.random.key(1), x)  # the frozen base

config = jpeft.LoraConfig(r=4, alpha=8, target_modules=["hidden", "head"])
adapter = jpeft.init(config, params, jax.random.key(2))  # the trainable tree
jpeft.summary(params, adapter)


def loss_fn(params, adapter, batch, key):
    pred = jpeft.apply(model, params, adapter, batch["x"])
    return jnp.mean((pred - batch["y"]) ** 2)


opt = optax.adam(3e-2)
opt_state = opt.init(adapter)  # optimizer state for adapter leaves only
step = jpeft.make_train_step(loss_fn, opt)
for i in range(200):
    adapter, opt_state, metrics = step(params, adapter, opt_state, {"x": x, "y": y}, jax.random.key(i))
    if i in (0, 199):
        print(f"step {i:3d}  loss {float(metrics['loss']):.4f}")

merged = jpeft.merge(params, adapter)  # plain params for serving
print("merged == factored:", bool(jnp.allclose(model.apply(merged, x), jpeft.apply(model, params, adapter, x), atol=1e-5)))
