"""Full fine-tuning as a jpeft method, so that it runs through the same code as every adapter.

The "adapter" of :class:`FullFinetuneConfig` is a trainable copy of the whole parameter tree,
held by one node at the root module path ``""``. :func:`jpeft.apply` runs the model with that
copy in place of the base parameters, :func:`jpeft.make_train_step` differentiates it, and
every regularizer in :mod:`jpeft.forgetting.regularizers` (EWC, L2-SP, distillation) and
replay treat it exactly as they treat a LoRA or IA3 adapter. This is the baseline every
forgetting comparison needs: "full" is one more entry in the list of methods.

Memory: the base tree stays frozen and the copy is trained, so parameters are held twice
(plus the optimizer state for the copy); that is the honest price of full fine-tuning in a
two-tree design. The model still has one set of parameters, so :func:`jpeft.summary` reports
100 % trainable (the copy stands in for the base; it is not counted on top of it).

>>> import jax, jax.numpy as jnp, flax.linen as nn, jpeft
>>> from jpeft import FullFinetuneConfig
>>> model = nn.Dense(2); x = jnp.ones((1, 3))
>>> params = model.init(jax.random.key(0), x)
>>> adapter = jpeft.init(FullFinetuneConfig(), params, jax.random.key(1))
>>> list(adapter)
['']
>>> bool(jnp.allclose(jpeft.apply(model, params, adapter, x), model.apply(params, x)))
True
>>> moved = jax.tree.map(lambda w: w + 1.0, adapter)
>>> bool(jnp.allclose(jpeft.apply(model, params, moved, x), model.apply(jpeft.merge(params, moved), x)))
True
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional

import jax
import jax.numpy as jnp

from jpeft import _inject, quant
from jpeft.config import AdapterConfig
from jpeft.errors import ConfigError, NotInvertibleError, ShapeMismatchError
from jpeft.methods._common import copy_partition_specs
from jpeft.methods.base import Call, Method, Site, register_method

_DTYPES = (None, "float32", "bfloat16", "float16", "float64")


@dataclasses.dataclass(frozen=True)
class FullFinetuneConfig(AdapterConfig):
    """Full fine-tuning: every parameter of the model is trainable.

    Args:
      dtype: dtype of the trainable copy (``None`` keeps each leaf's own dtype). Training in
        ``"float32"`` over a ``bfloat16`` base is the usual mixed-precision choice.

    >>> from jpeft import FullFinetuneConfig
    >>> FullFinetuneConfig.from_dict(FullFinetuneConfig(dtype="float32").to_dict())
    FullFinetuneConfig(dtype='float32')
    """

    peft_type: ClassVar[str] = "FULL_FINETUNE"
    trains_every_weight: ClassVar[bool] = True

    dtype: Optional[str] = None

    def __post_init__(self):
        if self.dtype not in _DTYPES:
            raise ConfigError(f"FullFinetuneConfig.dtype must be one of {_DTYPES}, found {self.dtype!r}.")


def _same_structure(a, b) -> bool:
    a = quant.abstract(a)  # a quantized base (jpeft.quantize): the kernels its leaves stand for
    sa = jax.tree.map(lambda x: tuple(x.shape), a)
    sb = jax.tree.map(lambda x: tuple(x.shape), b)
    return jax.tree.structure(sa) == jax.tree.structure(sb) and jax.tree.leaves(sa) == jax.tree.leaves(sb)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FullParams(Site):
    """The trainable copy of the whole params tree, applied at the root module (path ``""``).

    Intercepts the first method call on the root module and runs the model there with
    ``params`` replacing the base parameters (other variable collections and the dropout rng
    are passed through); the calls nested inside run un-intercepted.
    """

    params: Any

    site: ClassVar[str] = "model"
    mergeable: ClassVar[bool] = True
    replaces_base: ClassVar[bool] = True

    def handles(self, method_name: str) -> bool:
        return method_name == "__call__" or not (method_name.startswith("_") or method_name == "setup")

    def check(self, path: str, module) -> None:
        own = module.variables.get("params", {})
        if not _same_structure(own, self.params):
            raise ShapeMismatchError(
                "the full fine-tuning adapter does not have the structure and shapes of the model's params; "
                "it was made for another model. Re-create it with jpeft.init(FullFinetuneConfig(), params, key)."
            )

    def check_params(self, path: str, own) -> None:
        if not _same_structure(own, self.params):
            raise ShapeMismatchError(
                "the full fine-tuning adapter does not have the structure and shapes of these params; "
                "it was made for another model."
            )

    def intercept(self, call: Call):
        mod = call.module
        variables = {k: v for k, v in mod.variables.items() if k != "params"}
        base = mod.variables.get("params", {})
        variables["params"] = jax.tree.map(lambda new, old: new.astype(old.dtype), self.params, quant.abstract(base))
        key = call.dropout_key()
        with _inject.bypass():  # what the model writes (sow, batch_stats) is kept, as model.apply keeps it
            return _inject.rerun(mod, variables, call.method_name, call.args, call.kwargs,
                                 rngs=None if key is None else {"dropout": key})

    def partition_specs(self, module_specs):
        """Every weight of the copy is sharded as the base weight it copies: on an fsdp mesh the copy
        and Adam's two moments are split like the base (before, each device held all three whole)."""
        return dataclasses.replace(self, params=copy_partition_specs(
            dict(self.params), module_specs, "the full fine-tuning copy"))

    def effective(self, own):
        """L2-SP's effective weights: the weights themselves (so its start is the pre-trained model)."""
        return self.params

    def merge(self, own):
        self.check_params("", own)
        return jax.tree.map(lambda new, old: new.astype(old.dtype), self.params, quant.abstract(own))

    def unmerge(self, own):
        raise NotInvertibleError(
            "full fine-tuning replaces every weight, so the base cannot be recovered from merged weights; "
            "keep the base params tree (jpeft never modifies it) instead of calling unmerge."
        )


def _init_full(config: FullFinetuneConfig, params, key, infos) -> dict:
    dt = None if config.dtype is None else jnp.dtype(config.dtype)
    copy = jax.tree.map(lambda x: jnp.array(x, dtype=dt or x.dtype, copy=True), dict(params))
    return {"": FullParams(copy)}


FULL = register_method(Method(config=FullFinetuneConfig, init=_init_full, nodes=(FullParams,)))
