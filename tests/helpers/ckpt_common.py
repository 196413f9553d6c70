"""Shared by tests/test_checkpoint*.py, tests/test_reliability*.py and the ckpt_* subprocess
scripts: a tiny attention-like linen model with q_proj/v_proj, deterministic data, and the
LoRA training setup. Everything is a function of fixed seeds, so a fresh process rebuilds
exactly the same base, adapter and batches."""

from __future__ import annotations

import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
PY = sys.executable

VOCAB = 50
HIDDEN = 16
SEQ = 8
BATCH = 4


def model():
    import flax.linen as nn
    import jax.numpy as jnp

    class Block(nn.Module):
        hidden: int

        @nn.compact
        def __call__(self, h):
            q = nn.Dense(self.hidden, name="q_proj")(h)
            k = nn.Dense(self.hidden, name="k_proj")(h)
            v = nn.Dense(self.hidden, name="v_proj")(h)
            a = nn.softmax(q @ jnp.swapaxes(k, -1, -2) / jnp.sqrt(float(self.hidden)), axis=-1)
            return h + nn.Dense(self.hidden, name="o_proj")(a @ v)

    class Tiny(nn.Module):
        vocab: int = VOCAB
        hidden: int = HIDDEN
        layers: int = 2

        @nn.compact
        def __call__(self, ids):
            h = nn.Embed(self.vocab, self.hidden, name="embed")(ids)
            for i in range(self.layers):
                h = Block(self.hidden, name=f"layers_{i}")(h)
            return nn.Dense(self.vocab, name="lm_head")(h)

    return Tiny()


def params(seed: int = 0):
    import jax
    import jax.numpy as jnp

    return model().init(jax.random.key(seed), jnp.zeros((1, SEQ), jnp.int32))


def lora_config(dropout: float = 0.1):
    import jpeft

    return jpeft.LoraConfig(r=4, alpha=8, dropout=dropout, target_modules=["q_proj", "v_proj"])


def batch(i: int, *, vocab: int = VOCAB):
    """Batch number ``i`` of the deterministic stream."""
    rng = np.random.default_rng(1000 + i)
    ids = rng.integers(0, vocab, size=(BATCH, SEQ + 1)).astype(np.int32)
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}


def batches(start: int, stop: int):
    for i in range(start, stop):
        yield batch(i)


def loss_fn():
    import jax
    import jax.numpy as jnp
    import optax

    import jpeft

    m = model()

    def loss(params, adapter, batch, key):
        logits = jpeft.apply(m, params, adapter, batch["input_ids"], rngs={"dropout": key})
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]))

    return loss


def optimizer():
    import optax

    return optax.adam(3e-2)


def setup():
    """``(params, config, adapter, opt, opt_state, key)`` of a fresh run."""
    import jax

    import jpeft

    p = params()
    cfg = lora_config()
    adapter = jpeft.init(cfg, p, jax.random.key(1))
    opt = optimizer()
    return p, cfg, adapter, opt, opt.init(adapter), jax.random.key(2)


def env(devices: int = 1) -> dict:
    e = dict(os.environ)
    e["XLA_FLAGS"] = f"{e.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    e["JAX_PLATFORMS"] = "cpu"
    e["TF_CPP_MIN_LOG_LEVEL"] = "3"
    e["PYTHONPATH"] = HERE + os.pathsep + REPO + os.pathsep + e.get("PYTHONPATH", "")
    return e
