"""(IA)^3 (Liu et al. 2022): learned vectors that rescale activations, as Hugging Face PEFT does it.

For a targeted linear module ``y = x @ W + b`` the adapter holds one vector ``l``:

* on an ordinary target (keys, values): ``y' = y * l`` with ``l: [out]`` (the bias is scaled
  too, exactly as PEFT's ``IA3Layer`` multiplies the module's result);
* on a *feed-forward* target (``feedforward_modules``, e.g. ``down_proj``):
  ``y' = (x * l) @ W + b`` with ``l: [in]`` (per input channel for convolutions).

Both fold into the weights: ``merge`` scales the kernel's output columns and bias, or its
input rows. ``l`` starts at ones, so the adapter starts as the identity.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import _inject, scan
from jpeft.config import AdapterConfig, _as_targets, renamed_option
from jpeft.errors import (BaseMismatchError, CheckpointError, ConfigError, NotInvertibleError,
                          UnsupportedAdapterError)
from jpeft.methods._common import (
    HEAD_MODULES,
    branch_dtype,
    broadcast_bias,
    broadcast_in,
    broadcast_out,
    check_dense_for_peft,
    from_matrix,
    linear_layouts,
    to_matrix,
)
from jpeft.methods.base import Call, Kind, Layout, Method, Site, register_method, static_field
from jpeft.peft_format import config_from_peft, peft_key, site_tensors
from jpeft.tree import hf_name, matches


@dataclasses.dataclass(frozen=True)
class IA3Config(AdapterConfig):
    """Configuration of an (IA)^3 adapter.

    Args:
      target_modules: modules to rescale (a regex or a list of names / path suffixes, as for
        :class:`jpeft.LoraConfig`). The default is Hugging Face PEFT's choice for Llama.
      feedforward_modules: the subset of the targets whose *input* is rescaled (the
        feed-forward output projection in the paper); the others have their output rescaled.
      init_weights: start the vectors at one (identity); ``False`` draws them from a
        standard normal, as Hugging Face PEFT does (useful for tests only). PEFT's name,
        ``init_ia3_weights``, is taken too (and is the ``adapter_config.json`` key); the attribute
        ``init_ia3_weights`` is deprecated.

    >>> from jpeft.methods.ia3 import IA3Config
    >>> c = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    >>> IA3Config.from_dict(c.to_dict()) == c
    True
    >>> c.to_dict()["peft_type"]
    'IA3'
    """

    peft_type: ClassVar[str] = "IA3"
    _hf_keys: ClassVar[Mapping[str, str]] = {"init_weights": "init_ia3_weights"}

    target_modules: Any = ("k_proj", "v_proj", "down_proj")
    feedforward_modules: Any = ("down_proj",)
    init_weights: bool = True
    init_ia3_weights = renamed_option("init_ia3_weights")

    def __post_init__(self):
        self._set_targets("give a regex or names such as ['k_proj', 'v_proj', 'down_proj']")
        object.__setattr__(self, "feedforward_modules", _as_targets(self.feedforward_modules, "feedforward_modules") or ())
        if not isinstance(self.target_modules, str) and not isinstance(self.feedforward_modules, str):
            extra = [m for m in self.feedforward_modules if m not in self.target_modules]
            if extra:
                raise ConfigError(
                    f"IA3Config.feedforward_modules must be a subset of target_modules (as in Hugging Face PEFT); "
                    f"{extra} are not targets {list(self.target_modules)}. Add them to target_modules or remove them "
                    f"(feedforward_modules = [] where no target is a feed-forward layer; the default is "
                    f"{list(type(self).feedforward_modules)}, applied when it is not given)."
                )
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"IA3Config.init_weights (init_ia3_weights) must be a bool, found {self.init_weights!r}.")

    def __hash__(self):
        return hash((self.target_modules, self.feedforward_modules, self.init_weights))

    def saved_config(self, adapter) -> "IA3Config":
        """The config :func:`jpeft.save_adapter` (and a checkpoint) records: this one, after
        checking that it makes each site scale the side its vector scales (the input of a
        feed-forward site, else the output), as :func:`jpeft.hf.save_peft` writes it from the
        sites: :func:`jpeft.load_adapter` rebuilds the sites from this config, and a module whose
        input and output widths are equal would take the same vector on the other side without
        a word. Raises :class:`~jpeft.errors.ConfigError` naming the sites."""
        flipped = {}
        for path, node in adapter.items():
            node = getattr(node, "unstacked", node)  # a layer-scanned site: its per-layer node
            if isinstance(node, IA3Weights) and node.feedforward != is_feedforward(self.feedforward_modules, path):
                flipped[hf_name(path)] = "input" if node.feedforward else "output"
        if flipped:
            first = dict(list(flipped.items())[:4])
            raise ConfigError(
                f"{len(flipped)} IA3 site(s) scale another side of their module than the config given to save_adapter "
                f"makes them scale (feedforward_modules={self.feedforward_modules!r}; site: the side it scales, first: "
                f"{first}); jpeft.load_adapter rebuilds the sites from that config, so the same vectors would scale "
                "the other side. Save with the config the adapter was made with."
            )
        return self


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class IA3Weights(Site):
    """One (IA)^3 site: ``ia3_l`` is ``[out_features]`` (output side) or ``[in_features]``
    (``feedforward``; per input channel for convolutions)."""

    ia3_l: jax.Array
    layout: Layout = static_field(default=None)
    feedforward: bool = static_field(default=False)

    site: ClassVar[str] = "linear"
    mergeable: ClassVar[bool] = True

    def check_params(self, path: str, own: Mapping[str, Any]) -> None:
        self.layout.check_params(path, own, what="(IA)^3 adapter")

    def intercept(self, call: Call):
        lay = self.layout
        _inject.check_layout(call.path, lay, call.module, call.args, call.kwargs)
        # the product in the adapter's dtype (float32), rounded once to the base's, as PEFT (branch_dtype)
        if not self.feedforward:
            y = call.run()
            dt = branch_dtype(y.dtype, self.ia3_l)
            return (y.astype(dt) * broadcast_out(self.ia3_l, y.ndim, lay).astype(dt)).astype(y.dtype)
        x = call.inputs
        dt = branch_dtype(x.dtype, self.ia3_l)
        xs = (x.astype(dt) * broadcast_in(self.ia3_l, x.ndim, lay, call.module).astype(dt)).astype(x.dtype)
        if call.args:
            return call.next_fun(xs, *call.args[1:], **call.kwargs)
        return call.next_fun(**{**call.kwargs, "inputs": xs})

    def _row_scale(self):
        lay = self.layout
        if lay.kind == Kind.CONV:  # per input channel, repeated over the kernel window
            return jnp.broadcast_to(self.ia3_l.astype(jnp.float32), tuple(lay.in_dims)).reshape(-1, 1)
        return self.ia3_l.astype(jnp.float32).reshape(-1, 1)

    def _fold(self, own, invert: bool):
        lay = self.layout
        pname = lay.param_name
        w = jnp.asarray(own[pname])
        l = self.ia3_l.astype(jnp.float32)
        if invert:
            l = 1.0 / l
        mat = to_matrix(w.astype(jnp.float32), lay)
        if self.feedforward:
            rows = self._row_scale() if not invert else 1.0 / self._row_scale()
            mat = mat * rows
        else:
            mat = mat * l.reshape(1, -1)
        out = dict(own)
        out[pname] = from_matrix(mat, lay).astype(w.dtype)
        if not self.feedforward and "bias" in own and own["bias"] is not None:
            b = jnp.asarray(own["bias"])
            nd = len(lay.equation.split("->")[1]) if lay.kind == Kind.EINSUM else b.ndim
            bb = broadcast_bias(b.astype(jnp.float32), nd, lay) * broadcast_out(l, nd, lay)
            out["bias"] = bb.reshape(b.shape).astype(b.dtype)
        return out

    def merge(self, own):
        """Scales the kernel's output columns and bias (or its input rows for feed-forward
        targets) by ``ia3_l``."""
        return self._fold(own, invert=False)

    def unmerge(self, own):
        """Divides the scaling back out. Raises
        :class:`~jpeft.errors.NotInvertibleError` when a vector entry is zero."""
        try:
            has_zero = bool(np.any(np.asarray(self.ia3_l) == 0))
        except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
            has_zero = False  # under jit: cannot look; the division gives inf there
        if has_zero:
            raise NotInvertibleError(
                "this (IA)^3 adapter has zero entries in ia3_l, which erased those features when merged; "
                "they cannot be recovered. Keep the original params (jpeft.merge never modifies them)."
            )
        return self._fold(own, invert=True)


def is_feedforward(feedforward_modules, path: str) -> bool:
    """Whether the site at ``path`` is a feed-forward one, by PEFT's rule: a regex string
    full-matches the module's name; a list entry is a plain suffix of its Hugging Face name,
    without a dot boundary (PEFT's ``key.endswith(target_key)``: ``"proj"`` takes every
    ``*_proj``), or a suffix of its path as for ``target_modules``."""
    if not feedforward_modules:
        return False
    if isinstance(feedforward_modules, str):
        return matches(feedforward_modules, path)
    name = hf_name(path)
    return matches(feedforward_modules, path) or any(name.endswith(str(t)) for t in feedforward_modules)


def init(config: IA3Config, params, key, infos) -> dict:
    """Creates the (IA)^3 vectors for every targeted linear module."""
    leaves, layouts = linear_layouts(config.target_modules, params, infos,
                                     "(IA)^3 rescales linear and convolution modules (as in Hugging Face PEFT)")
    keys = jax.random.split(key, len(layouts))  # in sorted path order: independent of the params dict's key order
    out = {}
    for k, (path, lay) in zip(keys, layouts.items()):
        ff = is_feedforward(config.feedforward_modules, path)
        n = (lay.in_dims[-1] if lay.kind == Kind.CONV else lay.in_features) if ff else lay.out_features

        def make(k, own, n=n, lay=lay, ff=ff):
            vec = jnp.ones((n,), jnp.float32) if config.init_weights else jax.random.normal(k, (n,), jnp.float32)
            return IA3Weights(vec, lay, ff)

        out[path] = scan.make_site(make, path, lay, k, leaves[path])
    return out


# -- Hugging Face PEFT format ----------------------------------------------------------------

def _to_hf(config: IA3Config, adapter, ctx):
    tensors, targets, ff = {}, [], []
    for path in sorted(adapter):
        node = adapter[path]
        check_dense_for_peft(path, node.layout, "IA3")
        v = np.asarray(node.ia3_l, np.float32)
        tensors[peft_key(path, "ia3_l")] = v.reshape(1, -1) if node.feedforward else v.reshape(-1, 1)
        targets.append(hf_name(path))
        if node.feedforward:
            ff.append(hf_name(path))
    d = {
        "target_modules": targets,
        "feedforward_modules": ff,
        "init_ia3_weights": bool(config.init_weights),
        "fan_in_fan_out": ctx.fan_in_fan_out,
        "modules_to_save": None,
        "exclude_modules": None,
    }
    return d, tensors


def _from_hf(d, tensors, params, ctx):
    if set(d.get("modules_to_save") or ()) - set(HEAD_MODULES):  # a task head's copy: checked by jpeft.hf
        raise UnsupportedAdapterError(f"the IA3 adapter in {ctx.folder!r} has modules_to_save={d['modules_to_save']}; jpeft loads plain IA3 only.")
    if d.get("exclude_modules"):
        raise UnsupportedAdapterError(
            f"the IA3 adapter in {ctx.folder!r} has exclude_modules={d['exclude_modules']!r}, which jpeft's IA3Config does "
            "not implement; save it from PEFT with the modules left out of target_modules instead (a regex string can "
            "exclude them)."
        )
    keys = {f.name for f in dataclasses.fields(IA3Config)}
    kept = {k: v for k, v in d.items() if k in keys}
    if kept.get("target_modules") is None:
        raise UnsupportedAdapterError(f"the IA3 adapter in {ctx.folder!r} has target_modules=null; set it explicitly.")
    kept.setdefault("feedforward_modules", ())
    if kept["feedforward_modules"] is None:
        kept["feedforward_modules"] = ()
    config = config_from_peft(IA3Config, kept, ctx.folder)
    by_site = site_tensors(tensors, ("ia3_l",), ctx.leaves, config.target_modules)
    adapter = {}
    for path, got in sorted(by_site.items()):
        v = got["ia3_l"]
        lay = _inject.infer_layout(path, ctx.leaves[path])
        ff = is_feedforward(config.feedforward_modules, path)
        n = lay.in_features if ff else lay.out_features
        want = (1, n) if ff else (n, 1)
        if tuple(v.shape) != want:
            raise (BaseMismatchError if v.size != n else CheckpointError)(
                f"IA3 site {hf_name(path)!r}: ia3_l has shape {tuple(v.shape)}, expected {want} for a "
                f"{'feed-forward ' if ff else ''}module mapping {lay.in_features} -> {lay.out_features} features."
            )
        adapter[path] = IA3Weights(jnp.asarray(v.reshape(-1), ctx.dtype), lay, ff)
    return config, adapter


def budget_rows(model_type: str, targets):
    """``Method.budget``: IA3 on PEFT's default targets and feed-forward modules."""
    ia3, ff = targets["ia3"]
    return [("IA3", ", ".join(n + (" (feed-forward)" if n in ff else "") for n in ia3),
             lambda: IA3Config(target_modules=ia3, feedforward_modules=ff))]


IA3 = register_method(Method(config=IA3Config, init=init, nodes=(IA3Weights,), to_hf=_to_hf, from_hf=_from_hf,
                             budget=budget_rows))
