"""Per-layer cost of the compiled training step, from XLA's statistics of a tiny model (no
timing): the gated MLP keeps only its two inputs for the backward pass, and the op table of
benchmarks/depth_stats.py sees it."""

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpeft._ops import activation
from jpeft.models import _layers as L

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import _common as C  # noqa: E402
import depth_stats  # noqa: E402


@pytest.mark.parametrize("act", ["silu", "gelu_new"])
def test_gated_equals_the_plain_product(act):
    f = activation(act)
    g, u, ct = (jax.random.normal(k, (3, 5, 7)) for k in jax.random.split(jax.random.key(0), 3))
    (y1, vjp1), (y2, vjp2) = jax.vjp(lambda g, u: L.gated(f, g, u), g, u), jax.vjp(lambda g, u: f(g) * u, g, u)
    np.testing.assert_allclose(y1, y2, rtol=1e-6, atol=1e-6)
    for a, b in zip(vjp1(ct), vjp2(ct)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_gated_mlp_writes_one_activation_sized_tensor_forward():
    """Of the forward pass's non-matmul ops in a layer's MLP, one writes a ``[tokens,
    intermediate]`` tensor (the product); saving the activation for the backward pass wrote
    three (``sigmoid(g)``, ``silu(g)``, the product)."""
    size = dataclasses.replace(C.SIZES["toy"], layers=2, intermediate=96, seq=40)  # activations [80, 96] (weights [64, 96])
    rows = depth_stats.layer_ops(depth_stats.compile_step(size, "auto", 2, False, False).as_text())
    act_bytes = size.batch * size.seq * size.intermediate * 4
    fwd = [r for r in rows if r["pass"] == "forward" and r["part"] == "mlp" and r["kind"] == "other"
           and r["written"] == act_bytes]
    assert len(fwd) == 1, fwd
    assert any(r["pass"] == "backward" and r["part"] == "mlp" for r in rows)  # the table sees both passes
