"""Shared checks of an adapted ``apply`` against its reference."""

import jax
import numpy as np


def assert_same_output_and_writes(got, want, what="") -> None:
    """``got`` and ``want`` are ``(output, written variables)`` of ``apply(..., mutable=...)``:
    equal outputs, and the same collections written, leaf by leaf (float32 tolerance)."""
    (out, written), (ref, ref_written) = got, want
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert jax.tree.structure(written) == jax.tree.structure(ref_written), what
    for a, b in zip(jax.tree.leaves(written), jax.tree.leaves(ref_written)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
