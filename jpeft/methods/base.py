"""What every method shares: the per-site node protocol and the module layout record.

A method is a frozen config dataclass, an ``init`` function and one small pytree node type
per site it attaches to. A node holds the trainable arrays as pytree children and the few
static facts it needs (scale, layout) as static fields, so ``jax.tree.leaves(adapter)`` is
exactly the trainable state and an optax optimizer built over it never sees a base weight.

Node protocol (duck-typed, see :class:`Site`):

* ``handles(method_name) -> bool``: which module methods the node intercepts;
* ``intercept(call) -> output``: the function applied at the site;
* ``check(path, module_params)``: raise :class:`~jpeft.errors.ShapeMismatchError` if the
  node does not fit the module's parameters;
* ``merge(module_params) / unmerge(module_params)``: fold into / out of the base
  (``mergeable`` is ``False`` where this is impossible).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar, Mapping, NamedTuple, Optional

import jax


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a module's kernel maps inputs to outputs.

    ``kind`` is one of ``dense``, ``dense_general``, ``conv``, ``einsum``, ``embed``.
    ``in_axes`` / ``out_axes`` index ``kernel_shape``; the adapter treats the kernel as the
    matrix ``[prod(in dims), prod(out dims)]``. ``equation`` is set for ``einsum``.
    """

    kind: str
    kernel_shape: tuple
    in_axes: tuple
    out_axes: tuple
    equation: Optional[str] = None

    @property
    def in_dims(self) -> tuple:
        return tuple(self.kernel_shape[i] for i in self.in_axes)

    @property
    def out_dims(self) -> tuple:
        return tuple(self.kernel_shape[i] for i in self.out_axes)

    @property
    def in_features(self) -> int:
        return int(math.prod(self.in_dims))

    @property
    def out_features(self) -> int:
        return int(math.prod(self.out_dims))

    @property
    def param_name(self) -> str:
        return "embedding" if self.kind == "embed" else "kernel"

    def check_params(self, path: str, own: Mapping[str, Any], *, what: str = "adapter") -> None:
        """Raises :class:`~jpeft.errors.ShapeMismatchError` unless the module params ``own``
        hold a kernel (or embedding) of exactly the shape this layout was made for."""
        from jpeft.errors import ShapeMismatchError

        pname = self.param_name
        if pname not in own:
            raise ShapeMismatchError(f"{what} at {path!r} expects a {pname!r} parameter; the params have {sorted(own)}.")
        got = tuple(own[pname].shape)
        if got != tuple(self.kernel_shape):
            raise ShapeMismatchError(
                f"{what} at {path!r} was built for a {pname} of shape {tuple(self.kernel_shape)}, "
                f"but the params hold shape {got}. Re-create the adapter for this base model."
            )


class ModuleInfo(NamedTuple):
    """What tracing the model once records about a module call."""

    cls_name: str
    layout: Optional[Layout]
    out_shape: Any  # pytree of jax.ShapeDtypeStruct, the module's __call__ output
    in_shape: Any
    methods: frozenset = frozenset()  # the module's other methods the model called ("attend", ...)


class Call(NamedTuple):
    """One intercepted module call, handed to a node's ``intercept``."""

    module: Any  # the bound flax.linen.Module
    method_name: str
    next_fun: Callable
    args: tuple
    kwargs: dict
    path: str

    def run(self):
        return self.next_fun(*self.args, **self.kwargs)

    def dropout_key(self):
        """A dropout key from the ``rngs`` given to :func:`jpeft.apply`, or ``None``."""
        if self.module.has_rng("dropout"):
            return self.module.make_rng("dropout")
        return None


class Site:
    """Base class of per-site nodes (documentation of the protocol, plus defaults)."""

    site: ClassVar[str] = "linear"
    mergeable: ClassVar[bool] = False
    methods: ClassVar[tuple] = ("__call__",)
    #: True for a node whose parameters stand in for the base's own (full fine-tuning's
    #: trainable copy): :func:`jpeft.summary` then counts them once, not on top of the base.
    replaces_base: ClassVar[bool] = False

    def handles(self, method_name: str) -> bool:
        return method_name in self.methods

    def intercept(self, call: Call):  # pragma: no cover - every node class defines it
        raise TypeError(f"{type(self).__name__} is a site node without an intercept(call) method; define one.")

    def check(self, path: str, module_params: Mapping[str, Any]) -> None:
        return None

    def merge(self, module_params):
        from jpeft.errors import NotMergeableError

        raise NotMergeableError(
            f"{type(self).__name__} adapters cannot be merged into the base weights; "
            "serve them with jpeft.apply instead."
        )

    def unmerge(self, module_params):
        return self.merge(module_params)


def static_field(**kw):
    return dataclasses.field(metadata=dict(static=True), **kw)


def dropout(x, rate: float, key):
    """Inverted dropout; identity when ``rate == 0`` or ``key is None``."""
    if rate <= 0.0 or key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jax.numpy.where(keep, x / (1.0 - rate), jax.numpy.zeros_like(x))
