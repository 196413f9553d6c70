"""LoKr (Edalati et al. 2022, KronA; the LyCORIS form): a Kronecker product update, as Hugging
Face PEFT 0.21's ``LoKrModel`` computes it.

PEFT factors a module's widths as ``out = a * b`` and ``in = c * d`` (:func:`factorization`,
``decompose_factor``) and builds the update of the PyTorch weight ``W: [out, in]`` as

``dW = (alpha / r) * kron(w1, w2)``,   ``w1: [a, c]``,   ``w2: [b, d]``

where ``w2`` is itself low rank, ``w2_a @ w2_b`` (``[b, r] @ [r, d]``), unless ``r`` is at
least half its larger side (then ``w2`` is a full matrix), and ``w1`` is ``w1_a @ w1_b`` only
with ``decompose_both`` and ``r`` below half of ``max(a, c)``. For a convolution ``w2`` carries
the window (``[b, d, kh, kw]``, or ``w2_a @ w2_b`` with ``w2_b: [r, d * kh * kw]``, or with
``use_effective_conv2d`` PEFT's CP form ``t2: [r, r, kh, kw]``, ``w2_a: [r, b]``,
``w2_b: [r, d]``).

``init_weights=True`` sets ``w1`` (or ``w1_a``) to zero and draws the rest Kaiming-uniform, so
the adapter starts as the identity; ``"lycoris"`` zeroes ``w2`` (or ``w2_b``) instead; ``False``
draws every tensor (for tests). Tensors are stored as PEFT names and orients them
(``lokr_w1``, ...; :mod:`jpeft.methods._lycoris`). Sites: ``nn.Dense``, ``nn.DenseGeneral``,
``nn.Einsum`` (as the matrix ``[out, in]``) and 1-D / 2-D ``nn.Conv``; embeddings are refused.

>>> import jax
>>> from jpeft.methods.base import Layout
>>> from jpeft.methods.lokr import LoKrConfig, factorization, shapes
>>> factorization(4096), factorization(128, 4)
((64, 64), (4, 32))
>>> shapes(LoKrConfig(r=1), Layout("dense", (16, 8), (0,), (1,)), 1)  # Dense 16 -> 8: 8 = 2 * 4, 16 = 4 * 4
{'lokr_w1': (2, 4), 'lokr_w2_a': (4, 1), 'lokr_w2_b': (1, 4)}
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.errors import ConfigError, UnsupportedModuleError
from jpeft.methods import _lycoris
from jpeft.methods.base import Layout, register_method, static_field

TENSORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)`` with ``m * n == dimension`` and ``m <= n``, as PEFT (and LyCORIS) choose them:
    ``m = factor`` when ``factor > 0`` divides ``dimension``; otherwise the divisor pair nearest
    the square root whose smaller side does not exceed ``factor`` (any size for ``-1``)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


@dataclasses.dataclass(frozen=True)
class LoKrConfig(_lycoris.LycorisConfig):
    """Configuration of a LoKr adapter (Hugging Face PEFT's ``LoKrConfig``, same field names).

    Args:
      r: rank of the low-rank Kronecker factor(s) (``> 0``); ``rank_pattern`` per module.
      alpha: the update is scaled by ``alpha / r``; ``alpha_pattern`` per module.
      rank_dropout: in training (``rngs={"dropout": key}``), the probability of zeroing each
        output row of the update (rescaled by the kept share only with ``rank_dropout_scale``).
      module_dropout: in training, the probability of skipping the whole update for a call.
      use_effective_conv2d: PEFT's CP form of ``w2`` for convolutions with a window larger than 1.
      decompose_both: factor ``w1`` as ``w1_a @ w1_b`` too (when ``r`` is below half its side).
      decompose_factor: the preferred size of the first factor of each width (``-1``: near
        the square root); see :func:`factorization`.
      rank_dropout_scale: divide rank dropout's kept rows by their share.
      target_modules: a regex or a list of names / path suffixes, ``"all-linear"`` included.
        The default is PEFT's choice for Llama.
      init_weights: ``True`` (identity at init: ``w1`` zero), ``"lycoris"`` (identity at init:
        ``w2`` zero) or ``False`` (every tensor random).
      rank_pattern / alpha_pattern: ``{module regex: value}``, matched as PEFT does.

    PEFT's ``exclude_modules``, ``layers_to_transform``, ``layers_pattern`` and
    ``modules_to_save`` are not implemented: ``from_dict`` and :func:`jpeft.hf.load_peft`
    refuse any value other than PEFT's default by name.

    >>> c = LoKrConfig(r=4, decompose_both=True, decompose_factor=8)
    >>> LoKrConfig.from_dict(c.to_dict()) == c
    True
    """

    peft_type: ClassVar[str] = "LOKR"
    _init_values: ClassVar[tuple] = (True, False, "lycoris")

    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False

    def __post_init__(self):
        super().__post_init__()
        for f in ("decompose_both", "rank_dropout_scale"):
            if not isinstance(getattr(self, f), bool):
                raise ConfigError(f"LoKrConfig.{f} must be true or false, found {getattr(self, f)!r}.")
        f = self.decompose_factor
        if isinstance(f, bool) or not isinstance(f, (int, np.integer)) or (f != -1 and f <= 0):
            raise ConfigError(f"LoKrConfig.decompose_factor must be -1 (near the square root) or a positive integer, "
                              f"found {f!r}.")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoKrWeights(_lycoris.LycorisSite):
    """One LoKr site, tensors in PyTorch's orientation (PEFT's names): ``lokr_w1: [a, c]`` or
    ``lokr_w1_a: [a, r]``, ``lokr_w1_b: [r, c]``; ``lokr_w2: [b, d(, *window)]`` or
    ``lokr_w2_a: [b, r]``, ``lokr_w2_b: [r, d * window]`` or, in the CP form,
    ``lokr_t2: [r, r, kh, kw]``, ``lokr_w2_a: [r, b]``, ``lokr_w2_b: [r, d]``. Absent ones are
    ``None``."""

    lokr_w1: Optional[jax.Array] = None
    lokr_w1_a: Optional[jax.Array] = None
    lokr_w1_b: Optional[jax.Array] = None
    lokr_w2: Optional[jax.Array] = None
    lokr_w2_a: Optional[jax.Array] = None
    lokr_w2_b: Optional[jax.Array] = None
    lokr_t2: Optional[jax.Array] = None
    rank_dropout_scale: bool = static_field(default=False)

    @property
    def rescale_rank_dropout(self) -> bool:  # type: ignore[override]
        return self.rank_dropout_scale

    def dense_update(self, x2):
        """``x @ dW`` from the Kronecker factors (:func:`dense_update`), never forming ``dW``."""
        return dense_update(x2, self.lokr_w1, self.lokr_w1_a, self.lokr_w1_b, self.lokr_w2, self.lokr_w2_a,
                            self.lokr_w2_b, self.scale)

    def torch_delta(self):
        """``dW`` in PyTorch's weight shape, float32."""
        return delta(self.lokr_w1, self.lokr_w1_a, self.lokr_w1_b, self.lokr_w2, self.lokr_w2_a, self.lokr_w2_b,
                     self.lokr_t2, self.scale).reshape(_lycoris.torch_shape(self.layout))


def dense_update(x2, w1=None, w1_a=None, w1_b=None, w2=None, w2_a=None, w2_b=None, scale: float = 1.0):
    """``x2 @ dW.T`` for ``dW = s * kron(w1, w2)`` (``w1: [a, c]``, ``w2: [b, d]``, ``x2:
    [tokens, c * d]``) without forming ``dW``: with the input viewed as ``[tokens, c, d]``,
    ``y[t, p, q] = s * sum_uv x[t, u, v] w1[p, u] w2[q, v]``, ``tokens * b * c * (a + d)``
    multiply-adds instead of ``tokens * a * b * c * d``.

    >>> import jax, jax.numpy as jnp
    >>> w1, w2, x = (jax.random.normal(jax.random.key(i), s) for i, s in enumerate([(2, 3), (4, 5), (6, 15)]))
    >>> bool(jnp.allclose(dense_update(x, w1=w1, w2=w2, scale=0.5), x @ delta(w1=w1, w2=w2, scale=0.5).T, atol=1e-4))
    True
    """
    dt = x2.dtype
    one = (w1 if w1 is not None else w1_a.astype(jnp.float32) @ w1_b.astype(jnp.float32)).astype(dt)
    a, c = one.shape
    x3 = x2.reshape(x2.shape[0], c, -1)
    if w2 is not None:
        h = jnp.einsum("tuv,qv->tuq", x3, w2.astype(dt))
    else:
        h = jnp.einsum("tur,qr->tuq", jnp.einsum("tuv,rv->tur", x3, w2_b.astype(dt)), w2_a.astype(dt))
    return jnp.einsum("tuq,pu->tpq", h, one).reshape(x2.shape[0], -1) * scale


def delta(w1=None, w1_a=None, w1_b=None, w2=None, w2_a=None, w2_b=None, t2=None, scale: float = 1.0):
    """PEFT's ``get_delta_weight`` before the reshape: ``s * kron(w1, w2)`` with each factor
    full or rebuilt from its parts (``t2``: PEFT's ``make_weight_cp``). A 4-D ``w2`` gets ``w1``
    as ``[a, c, 1, 1]`` (PEFT's ``make_kron``); otherwise ``jnp.kron`` prepends unit axes as
    ``torch.kron`` does.

    >>> import jax.numpy as jnp
    >>> delta(w1=jnp.eye(2), w2=jnp.ones((1, 2)), scale=2.0).tolist()
    [[2.0, 2.0, 0.0, 0.0], [0.0, 0.0, 2.0, 2.0]]
    """
    f32 = jnp.float32
    one = w1.astype(f32) if w1 is not None else w1_a.astype(f32) @ w1_b.astype(f32)
    if w2 is not None:
        two = w2.astype(f32)
    elif t2 is not None:
        two = jnp.einsum("ijkl,ip,jr->prkl", t2.astype(f32), w2_a.astype(f32), w2_b.astype(f32))
    else:
        two = w2_a.astype(f32) @ w2_b.astype(f32)
    if two.ndim == 4:
        one = one[:, :, None, None]
    return jnp.kron(one, two) * scale


def shapes(config: LoKrConfig, lay: Layout, r: int) -> dict:
    """``{tensor: PyTorch shape}`` of a site (PEFT's ``update_layer`` and
    ``create_adapter_parameters``)."""
    in_dim, out_dim, win = _lycoris.in_channels(lay), lay.out_features, _lycoris.window(lay)
    in_m, in_n = factorization(in_dim, config.decompose_factor)
    out_l, out_k = factorization(out_dim, config.decompose_factor)
    use_w1 = not (config.decompose_both and r < max(out_l, in_m) / 2)
    use_w2 = not (r < max(out_k, in_n) / 2)
    out = dict(lokr_w1=(out_l, in_m)) if use_w1 else dict(lokr_w1_a=(out_l, r), lokr_w1_b=(r, in_m))
    if use_w2:
        out["lokr_w2"] = (out_k, in_n) + win
    elif config.effective_conv(lay):
        if len(win) == 1:
            raise UnsupportedModuleError(
                "LoKr with use_effective_conv2d on a 1-D convolution: Hugging Face PEFT 0.21 builds this update with "
                "torch.kron on a [b, d, k, 1] CP factor and fails (a view error), so there is no reference to match. "
                "Use use_effective_conv2d=False for 1-D convolutions (the flattened form), or a rank r >= max(b, d) / 2."
            )
        out.update(lokr_t2=(r, r) + (win if len(win) == 2 else win + (1,)), lokr_w2_a=(r, out_k), lokr_w2_b=(r, in_n))
    else:
        out.update(lokr_w2_a=(out_k, r), lokr_w2_b=(r, in_n * int(np.prod(win, dtype=np.int64))))
    return out


def make_node(config: LoKrConfig, lay: Layout, r: int, alpha: float, key) -> LoKrWeights:
    """A freshly initialised site (PEFT's ``reset_adapter_parameters``, ``..._lycoris_way`` or
    ``..._random``)."""
    zero = {True: ("lokr_w1", "lokr_w1_a"), "lycoris": ("lokr_w2", "lokr_w2_b")}.get(config.init_weights, ())
    arrays = _lycoris.kaiming_uniform(key, shapes(config, lay, r), zero=zero)
    return LoKrWeights(layout=lay, scale=float(alpha / r), rank_dropout=float(config.rank_dropout),
                       module_dropout=float(config.module_dropout), rank_dropout_scale=bool(config.rank_dropout_scale),
                       **arrays)


LOKR = register_method(_lycoris.method(LoKrConfig, LoKrWeights, "LoKr", TENSORS, make_node))
