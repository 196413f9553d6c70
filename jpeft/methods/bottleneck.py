"""Bottleneck adapters: Houlsby et al. 2019 and Pfeiffer et al. 2020 (AdapterHub's ``double_seq_bn``
and ``seq_bn``), attached to the output of any module matched by path.

For a targeted module with output ``y: [..., d]`` the adapted output is

``y + scaling * up(act(down(y)))`` with ``down: d -> d // reduction_factor`` and ``up`` back to ``d``

(dense layers with biases). *Houlsby* places one adapter after the attention block's output
projection and one after the feed-forward block's; *Pfeiffer* only after the feed-forward block.
Because the site is a module's output, this works on any flax linen model: name the modules in
``target_modules`` (their output must be one array whose last axis is the feature axis).

Initialisation (``init_weights``): ``"bert"`` draws both projections from a normal with standard
deviation ``init_std`` (0.02) and zero biases, so the adapter starts *near* the identity
(AdapterHub's default); ``"mam"`` uses a Kaiming-uniform ``down`` and a zero ``up``, so it
starts *exactly* at the identity. The non-linearity makes the adapter impossible to merge into
the base weights; :func:`jpeft.merge` raises :class:`~jpeft.errors.NotMergeableError`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp

from jpeft._inject import scanned_refusal
from jpeft._ops import ACTIVATIONS
from jpeft.config import AdapterConfig
from jpeft.errors import BottleneckTargetError, ConfigError, NotMergeableError
from jpeft.methods.base import Call, Method, Site, register_method, static_field
from jpeft.tree import module_leaves, select

_INITS = ("bert", "mam")

HOULSBY_TARGETS = ("self_attn/o_proj", "mlp/down_proj")
PFEIFFER_TARGETS = ("mlp/down_proj",)


@dataclasses.dataclass(frozen=True)
class BottleneckConfig(AdapterConfig):
    """Configuration of bottleneck adapters.

    Use :meth:`houlsby` or :meth:`pfeiffer` for the two standard placements, or give
    ``target_modules`` yourself.

    Args:
      target_modules: modules whose *output* gets an adapter (a regex or a list of names /
        path suffixes, as for :class:`jpeft.LoraConfig`).
      reduction_factor: the bottleneck width is ``d // reduction_factor`` for a module output
        of width ``d``.
      non_linearity: an activation by its Hugging Face name (``ACT2FN``): ``relu``, ``swish``
        (= ``silu``), ``gelu`` (exact), ``gelu_new`` (= ``gelu_pytorch_tanh``, ``gelu_fast``: the tanh
        approximation), ``tanh``, ``sigmoid``, ``linear`` (the table the models use too).
      init_weights: ``"bert"`` (near identity, normal with std ``init_std``) or ``"mam"``
        (exact identity: zero ``up``).
      init_std: standard deviation for ``"bert"`` initialisation.
      scaling: factor on the adapter's contribution.
      kind: ``"houlsby"``, ``"pfeiffer"`` or ``"custom"``; informational (set by the presets).

    >>> from jpeft.methods.bottleneck import BottleneckConfig
    >>> c = BottleneckConfig.houlsby(reduction_factor=16)
    >>> c.target_modules, c.non_linearity
    (('self_attn/o_proj', 'mlp/down_proj'), 'swish')
    >>> BottleneckConfig.from_dict(c.to_dict()) == c
    True
    """

    peft_type: ClassVar[str] = "BOTTLENECK"

    target_modules: Any = PFEIFFER_TARGETS
    reduction_factor: float = 16
    non_linearity: str = "relu"
    init_weights: str = "bert"
    init_std: float = 0.02
    scaling: float = 1.0
    kind: str = "custom"

    def __post_init__(self):
        self._set_targets("name the modules whose output gets an adapter, e.g. ['mlp/down_proj']")
        rf = self.reduction_factor
        if isinstance(rf, bool) or not isinstance(rf, (int, float)) or not rf >= 1:
            raise ConfigError(f"BottleneckConfig.reduction_factor must be a number >= 1, found {rf!r}. Typical values: 2 to 64.")
        if self.non_linearity not in ACTIVATIONS:
            raise ConfigError(f"BottleneckConfig.non_linearity must be one of {sorted(ACTIVATIONS)}, found {self.non_linearity!r}.")
        if self.init_weights not in _INITS:
            raise ConfigError(f"BottleneckConfig.init_weights must be one of {_INITS}, found {self.init_weights!r}.")
        if not (isinstance(self.init_std, (int, float)) and self.init_std >= 0):
            raise ConfigError(f"BottleneckConfig.init_std must be >= 0, found {self.init_std!r}.")
        if not isinstance(self.scaling, (int, float)) or isinstance(self.scaling, bool):
            raise ConfigError(f"BottleneckConfig.scaling must be a number, found {self.scaling!r}.")
        if self.kind not in ("houlsby", "pfeiffer", "custom"):
            raise ConfigError(f"BottleneckConfig.kind must be 'houlsby', 'pfeiffer' or 'custom', found {self.kind!r}.")

    @classmethod
    def houlsby(cls, target_modules=HOULSBY_TARGETS, **kw) -> "BottleneckConfig":
        """Houlsby placement: after the attention output projection and after the feed-forward
        output projection (Llama names by default; GPT-2: ``["attn/c_proj", "mlp/c_proj"]``),
        swish, as AdapterHub's ``DoubleSeqBnConfig``."""
        kw.setdefault("non_linearity", "swish")
        return cls(target_modules=target_modules, kind="houlsby", **kw)

    @classmethod
    def pfeiffer(cls, target_modules=PFEIFFER_TARGETS, **kw) -> "BottleneckConfig":
        """Pfeiffer placement: after the feed-forward output projection only, relu, as
        AdapterHub's ``SeqBnConfig``."""
        kw.setdefault("non_linearity", "relu")
        return cls(target_modules=target_modules, kind="pfeiffer", **kw)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BottleneckWeights(Site):
    """One bottleneck adapter on a module output of width ``d``: ``down_kernel: [d, b]``,
    ``down_bias: [b]``, ``up_kernel: [b, d]``, ``up_bias: [d]``."""

    down_kernel: jax.Array
    down_bias: jax.Array
    up_kernel: jax.Array
    up_bias: jax.Array
    non_linearity: str = static_field(default="relu")
    scaling: float = static_field(default=1.0)

    site: ClassVar[str] = "output"
    mergeable: ClassVar[bool] = False

    @property
    def width(self) -> int:
        return int(self.down_kernel.shape[0])

    def adapter_fn(self, y):
        """``scaling * up(act(down(y)))`` on the last axis of ``y``."""
        dt = y.dtype
        nd = y.ndim
        h = y @ self.down_kernel.astype(dt) + self.down_bias.astype(dt).reshape((1,) * (nd - 1) + (-1,))
        h = ACTIVATIONS[self.non_linearity](h)
        out = h @ self.up_kernel.astype(dt) + self.up_bias.astype(dt).reshape((1,) * (nd - 1) + (-1,))
        return (self.scaling * out).astype(dt)

    def intercept(self, call: Call):
        y = call.run()
        if not hasattr(y, "shape") or not hasattr(y, "dtype"):
            raise BottleneckTargetError(
                f"module {call.path!r} returns a {type(y).__name__}, not one array; a bottleneck adapter needs a module "
                "whose output is a single [..., features] array. Target the projection inside it instead "
                "(e.g. 'self_attn/o_proj' rather than 'self_attn')."
            )
        if y.ndim == 0 or y.shape[-1] != self.width:
            raise BottleneckTargetError(
                f"the bottleneck adapter at {call.path!r} was built for an output width of {self.width}, but the module "
                f"returns shape {tuple(y.shape)}. Re-create the adapter for this model with "
                "jpeft.init(config, params, key, model, x) so jpeft can trace each target's output."
            )
        return y + self.adapter_fn(y)

    def merge(self, module_params):
        raise NotMergeableError(
            "bottleneck adapters apply a non-linearity to a module's output, so they cannot be folded into the base "
            "weights; serve them with jpeft.apply (or choose LoRA / IA3, which merge)."
        )


def _all_module_paths(params: Mapping[str, Any]) -> list[str]:
    out = []
    for path in module_leaves(params):
        comps = path.split("/") if path else []
        for i in range(len(comps) + 1):
            p = "/".join(comps[:i])
            if p not in out:
                out.append(p)
    return out


def _width_from_params(path: str, params) -> int:
    leaves = module_leaves(params)
    own = leaves.get(path, {})
    for name in ("kernel", "embedding"):
        if name in own and hasattr(own[name], "shape"):
            return int(own[name].shape[-1])
    raise BottleneckTargetError(
        f"cannot tell the output width of module {path!r} from the parameters alone (it holds no kernel of its own); "
        "pass the model and an example input so jpeft can trace it: jpeft.init(config, params, key, model, x)."
    )


def init(config: BottleneckConfig, params, key, infos) -> dict:
    """Creates one bottleneck adapter per targeted module output. The width comes from the
    traced output shape when a model was given, else from the module's kernel (last axis)."""
    if infos is not None:
        cands = [p for p in infos]
    else:
        cands = _all_module_paths(params)
    paths = select(config.target_modules, cands, what="module")
    # sorted: the adapter must not depend on the params dict's key order (jit returns sorted dicts)
    paths = sorted(paths)
    # a module inside a layer scan (told exactly by the traced model: the module sees one layer's slice of the
    # stacked params) would share one node among every layer: refused here as jpeft.apply would. Without the
    # model the params alone cannot tell a stacked kernel from a 3-D one, so that case is refused at apply.
    inside = [p for p in paths if infos is not None and p in infos and infos[p].scanned_layers]
    if inside:
        raise scanned_refusal(inside[0], BottleneckWeights.__name__, infos[inside[0]].scanned_layers)
    keys = jax.random.split(key, len(paths))
    out = {}
    for k, path in zip(keys, paths):
        if infos is not None and path in infos:
            shp = infos[path].out_shape
            if not isinstance(shp, jax.ShapeDtypeStruct) or len(shp.shape) == 0:
                raise BottleneckTargetError(
                    f"module {path!r} returns {shp!r}, not a single [..., features] array; a bottleneck adapter "
                    "attaches to a module output. Target a module that returns one array (e.g. a projection)."
                )
            d = int(shp.shape[-1])
        else:
            d = _width_from_params(path, params)
        b = int(d // config.reduction_factor)
        if b < 1:
            raise ConfigError(
                f"reduction_factor={config.reduction_factor} leaves no bottleneck for module {path!r} of width {d}; "
                f"use a reduction_factor of at most {d}."
            )
        kd, ku = jax.random.split(k)
        if config.init_weights == "bert":
            down = config.init_std * jax.random.normal(kd, (d, b), jnp.float32)
            up = config.init_std * jax.random.normal(ku, (b, d), jnp.float32)
        else:  # "mam": Kaiming-uniform (a=sqrt(5)) down, zero up
            bound = 1.0 / math.sqrt(d)
            down = jax.random.uniform(kd, (d, b), jnp.float32, -bound, bound)
            up = jnp.zeros((b, d), jnp.float32)
        out[path] = BottleneckWeights(down, jnp.zeros((b,), jnp.float32), up, jnp.zeros((d,), jnp.float32),
                                      config.non_linearity, float(config.scaling))
    return out


def budget_rows(model_type: str, targets):
    """``Method.budget``: Houlsby and Pfeiffer adapters (reduction 16) after the family's modules."""
    hou, pf = targets["houlsby"], targets["pfeiffer"]
    return [
        ("Houlsby", f"reduction 16, after {' and '.join(hou)}",
         lambda: BottleneckConfig.houlsby(target_modules=hou, reduction_factor=16)),
        ("Pfeiffer", f"reduction 16, after {pf if isinstance(pf, str) else '+'.join(pf)}",
         lambda: BottleneckConfig.pfeiffer(target_modules=pf, reduction_factor=16)),
    ]


BOTTLENECK = register_method(Method(config=BottleneckConfig, init=init, nodes=(BottleneckWeights,), budget=budget_rows))
