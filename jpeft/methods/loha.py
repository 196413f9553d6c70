"""LoHa (Hyeon-Woo et al. 2022, FedPara; the LyCORIS form): a low-rank Hadamard product update,
as Hugging Face PEFT 0.21's ``LoHaModel`` computes it.

For a module whose weight PyTorch holds as ``W: [out, in]`` (a convolution flattened to
``[out, in * window]``) the update is

``dW = (alpha / r) * (w1_a @ w1_b) * (w2_a @ w2_b)``

with ``w1_a, w2_a: [out, r]`` and ``w1_b, w2_b: [r, in]``: each factor has rank ``r``, their
elementwise product rank up to ``r^2``, at the parameter cost of two rank-``r`` LoRAs. With
``use_effective_conv2d`` a ``k x k`` convolution (``k > 1``) uses PEFT's CP form instead:
``dW[o, i, :, :] = s * (t1 x1 w1_a x2 w1_b) * (t2 x1 w2_a x2 w2_b)`` with cores
``t1, t2: [r, r, kh, kw]`` and ``w*_a: [r, out]``, ``w*_b: [r, in]``.

``init_weights=True`` draws ``w1_a, w1_b, w2_a`` (and the cores) Kaiming-uniform and sets
``w2_b`` to zero, so the adapter starts as the identity; ``False`` draws every tensor (for tests).
The tensors are stored as PEFT names and orients them (``hada_w1_a``, ...), see
:mod:`jpeft.methods._lycoris`. Sites: ``nn.Dense``, ``nn.DenseGeneral``, ``nn.Einsum`` (as the
matrix ``[out, in]``) and 1-D / 2-D ``nn.Conv``; embeddings are refused, as PEFT has none.

>>> import jax
>>> from jpeft.methods.base import Layout
>>> from jpeft.methods.loha import LoHaConfig, make_node
>>> dense_4_to_6 = Layout("dense", (4, 6), (0,), (1,))
>>> node = make_node(LoHaConfig(r=2, alpha=4), dense_4_to_6, 2, 4.0, jax.random.key(1))
>>> node.hada_w1_a.shape, node.hada_w2_b.shape, node.scale, node.delta_matrix().shape
((6, 2), (2, 4), 2.0, (4, 6))
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jpeft.methods import _lycoris
from jpeft.methods.base import Kind, Layout, flat_spec_entry, kernel_spec_entries, register_method

TENSORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")


@dataclasses.dataclass(frozen=True)
class LoHaConfig(_lycoris.LycorisConfig):
    """Configuration of a LoHa adapter (Hugging Face PEFT's ``LoHaConfig``, same field names).

    Args:
      r: rank of each of the two factors (``> 0``); ``rank_pattern`` overrides it per module.
      alpha: the update is scaled by ``alpha / r``; ``alpha_pattern`` overrides it per module.
      rank_dropout: in training (``rngs={"dropout": key}``), the probability of zeroing each
        output row of the update; the kept rows are divided by their share, as in PEFT.
      module_dropout: in training, the probability of skipping the whole update for a call.
      use_effective_conv2d: PEFT's CP form for convolutions with a window larger than 1.
      target_modules: a regex or a list of names / path suffixes (see :mod:`jpeft.tree`),
        ``"all-linear"`` included. The default is PEFT's choice for Llama.
      init_weights: ``True`` (identity at init: ``hada_w2_b`` is zero) or ``False`` (every
        tensor random).
      rank_pattern / alpha_pattern: ``{module regex: value}``, matched as PEFT does.

    PEFT's ``exclude_modules``, ``layers_to_transform``, ``layers_pattern`` and
    ``modules_to_save`` are not implemented: ``from_dict`` and :func:`jpeft.hf.load_peft`
    refuse any value other than PEFT's default by name.

    >>> c = LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    >>> LoHaConfig.from_dict(c.to_dict()) == c
    True
    >>> c.to_dict()["peft_type"]
    'LOHA'
    """

    peft_type: ClassVar[str] = "LOHA"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoHaWeights(_lycoris.LycorisSite):
    """One LoHa site, tensors in PyTorch's orientation (PEFT's names): ``hada_w1_a,
    hada_w2_a: [out, r]``, ``hada_w1_b, hada_w2_b: [r, in]``; in the CP form
    ``hada_t1, hada_t2: [r, r, kh, kw]``, ``hada_w*_a: [r, out]``, ``hada_w*_b: [r, in]``."""

    hada_w1_a: jax.Array = None
    hada_w1_b: jax.Array = None
    hada_w2_a: jax.Array = None
    hada_w2_b: jax.Array = None
    hada_t1: Optional[jax.Array] = None
    hada_t2: Optional[jax.Array] = None

    @property
    def r(self) -> int:
        return int(self.hada_w1_b.shape[-2])

    def dense_update(self, x2):
        """The factored ``x @ dW`` (:func:`dense_update`) where ``r1 * r2 * (in + out)`` is
        below ``in * out``, the cost of forming ``dW``."""
        r1, r2 = self.hada_w1_a.shape[1], self.hada_w2_a.shape[1]
        out_f, in_f = self.hada_w1_a.shape[0], self.hada_w1_b.shape[1]
        if r1 * r2 * (in_f + out_f) >= in_f * out_f:
            return None
        return dense_update(x2, self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, self.scale)

    def partition_specs(self, module_specs):
        """``hada_w*_a [out, r]`` take the kernel's output-dimension entry and ``hada_w*_b
        [r, in]`` its input entry (as LoRA's factors do), so the update's rows and columns sit
        where the kernel's do; convolutions (whose PyTorch input order differs from flax's) and
        the CP form are replicated."""
        lay = self.layout
        lead = self.hada_w1_a.ndim - 2  # stacked (scanned) sites carry leading layer axes
        lead_e, kern_e = kernel_spec_entries(lay, module_specs, lead, "LoHa")
        if self.hada_t1 is not None or lay.kind == Kind.CONV:
            return super().partition_specs(module_specs)
        a = P(*lead_e, flat_spec_entry(kern_e, lay.out_axes), None)
        b = P(*lead_e, None, flat_spec_entry(kern_e, lay.in_axes))
        return dataclasses.replace(self, hada_w1_a=a, hada_w2_a=a, hada_w1_b=b, hada_w2_b=b)

    def torch_delta(self):
        """``dW`` in PyTorch's weight shape, float32."""
        return delta(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, self.hada_t1, self.hada_t2,
                     self.scale).reshape(_lycoris.torch_shape(self.layout))


def dense_update(x2, w1_a, w1_b, w2_a, w2_b, scale: float):
    """``x2 @ dW.T`` for ``dW = s * (w1_a @ w1_b) * (w2_a @ w2_b)`` without forming ``dW``:
    the Hadamard product of two rank-``r`` products is one rank-``r1 * r2`` product of their
    face-splitting products, ``(w1_a . w2_a) @ (w1_b . w2_b)`` (rows of ``w*_a`` and columns
    of ``w*_b`` multiplied pairwise), so the cost per token is ``r1 * r2 * (in + out)``.

    >>> import jax, jax.numpy as jnp
    >>> a1, b1, a2, b2, x = (jax.random.normal(jax.random.key(i), s)
    ...                      for i, s in enumerate([(7, 2), (2, 9), (7, 3), (3, 9), (4, 9)]))
    >>> bool(jnp.allclose(dense_update(x, a1, b1, a2, b2, 0.5), x @ delta(a1, b1, a2, b2, scale=0.5).T, atol=1e-4))
    True
    """
    dt = x2.dtype
    out_f, in_f = w1_a.shape[0], w1_b.shape[1]
    left = (w1_a[:, :, None] * w2_a[:, None, :]).reshape(out_f, -1).astype(dt)  # [out, r1 * r2]
    right = (w1_b[:, None, :] * w2_b[None, :, :]).reshape(-1, in_f).astype(dt)  # [r1 * r2, in]
    return ((x2 @ right.T) @ left.T) * scale


def delta(w1_a, w1_b, w2_a, w2_b, t1=None, t2=None, scale: float = 1.0):
    """PEFT's ``make_weight`` / ``make_weight_cp``: ``s * (w1_a @ w1_b) * (w2_a @ w2_b)``, or with
    cores ``s * einsum(t1, w1_b, w1_a) * einsum(t2, w2_b, w2_a)`` as ``[out, in, kh, kw]``.

    >>> import jax.numpy as jnp
    >>> a = jnp.ones((3, 1)); b = jnp.full((1, 2), 2.0)
    >>> delta(a, b, a, b, scale=0.5).tolist()
    [[2.0, 2.0], [2.0, 2.0], [2.0, 2.0]]
    """
    f32 = jnp.float32
    if t1 is None:
        return (w1_a.astype(f32) @ w1_b.astype(f32)) * (w2_a.astype(f32) @ w2_b.astype(f32)) * scale
    one = jnp.einsum("ijkl,jr,ip->prkl", t1.astype(f32), w1_b.astype(f32), w1_a.astype(f32))
    two = jnp.einsum("ijkl,jr,ip->prkl", t2.astype(f32), w2_b.astype(f32), w2_a.astype(f32))
    return one * two * scale


def shapes(config: LoHaConfig, lay: Layout, r: int) -> dict:
    """``{tensor: PyTorch shape}`` of a site (PEFT's ``create_adapter_parameters``)."""
    out_f, in_c, win = lay.out_features, _lycoris.in_channels(lay), _lycoris.window(lay)
    if config.effective_conv(lay):
        core = (r, r) + (win if len(win) == 2 else win + (1,))  # PEFT pads a 1-D window with a unit axis
        return dict(hada_w1_a=(r, out_f), hada_w1_b=(r, in_c), hada_w2_a=(r, out_f), hada_w2_b=(r, in_c),
                    hada_t1=core, hada_t2=core)
    n_in = lay.in_features  # a convolution flattened: in * window
    return dict(hada_w1_a=(out_f, r), hada_w1_b=(r, n_in), hada_w2_a=(out_f, r), hada_w2_b=(r, n_in))


def make_node(config: LoHaConfig, lay: Layout, r: int, alpha: float, key) -> LoHaWeights:
    """A freshly initialised site (PEFT's ``reset_adapter_parameters``, or ``..._random`` with
    ``init_weights=False``)."""
    arrays = _lycoris.kaiming_uniform(key, shapes(config, lay, r), zero=("hada_w2_b",) if config.init_weights else ())
    return LoHaWeights(layout=lay, scale=float(alpha / r), rank_dropout=float(config.rank_dropout),
                       module_dropout=float(config.module_dropout), **arrays)


LOHA = register_method(_lycoris.method(LoHaConfig, LoHaWeights, "LoHa", TENSORS, make_node))
