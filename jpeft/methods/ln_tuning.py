"""LN tuning (Zhao et al. 2023, "Tuning LayerNorm in attention"), as Hugging Face PEFT's
``LNTuningConfig`` does it: the targeted normalisation layers get a trainable copy of their own
parameters (RMSNorm's ``scale``; LayerNorm's ``scale`` and ``bias``) and nothing else is trained.

In jpeft the copy is a node at the norm's path whose parameters the norm runs with in place of
its own. :func:`jpeft.summary` counts them as PEFT's ``get_nb_trainable_parameters`` does, which
keeps the original layer beside its copy: ``total = base + copies`` (unlike full fine-tuning's
copy, which ``replaces_base``). The copy starts equal to the base, so the adapter starts as the
identity.

``merge`` swaps the copy in (PEFT swaps the layers). ``unmerge`` cannot recover the base norms
from merged params alone and raises :class:`~jpeft.errors.NotInvertibleError`: keep the
original params, which :func:`jpeft.merge` never modifies.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import _inject, scan
from jpeft.config import AdapterConfig
from jpeft.errors import (
    BaseMismatchError,
    CheckpointError,
    NotInvertibleError,
    ShapeMismatchError,
    ShardingError,
    UnsupportedAdapterError,
)
from jpeft.methods._common import HEAD_MODULES, master_copy
from jpeft.methods.base import Call, Method, Site, register_method
from jpeft.peft_format import config_from_peft, peft_key, site_tensors, split_peft_key
from jpeft.tree import hf_name, module_leaves, select

#: the parameters of a norm layer LN tuning copies (flax names), and PEFT's names for them
NORM_PARAMS = {"scale": "weight", "bias": "bias"}


@dataclasses.dataclass(frozen=True)
class LNTuningConfig(AdapterConfig):
    """Configuration of LN tuning (Hugging Face PEFT's ``LNTuningConfig``).

    Args:
      target_modules: the norm layers to train (a regex or a list of names / path suffixes, as
        for :class:`jpeft.LoraConfig`); a target must be a module whose parameters are a
        ``scale`` and optionally a ``bias`` (``RMSNorm``, ``nn.LayerNorm``). The default is
        PEFT's for Llama: both norms of every layer and the final norm.

    >>> from jpeft.methods.ln_tuning import LNTuningConfig
    >>> c = LNTuningConfig()
    >>> LNTuningConfig.from_dict(c.to_dict()) == c
    True
    >>> c.to_dict()["peft_type"]
    'LN_TUNING'
    """

    peft_type: ClassVar[str] = "LN_TUNING"

    target_modules: Any = ("input_layernorm", "post_attention_layernorm", "norm")

    def __post_init__(self):
        self._set_targets("give a regex or norm names such as ['input_layernorm', 'post_attention_layernorm', 'norm']")


def is_norm(own: Mapping[str, Any]) -> bool:
    """Whether a module's own parameters are a norm's: ``scale`` and optionally ``bias``."""
    return "scale" in own and set(own) <= set(NORM_PARAMS)


def copy_params(own: Mapping[str, Any]) -> dict:
    """The trainable copy of a norm's parameters, in ``float32`` at least (the master copy; the
    norm runs with it cast to its own parameters' dtype)."""
    return {k: master_copy(v) for k, v in own.items()}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LNTuningWeights(Site):
    """One tuned norm: ``params`` is the trainable copy of the module's own parameters
    (``{"scale": [d]}`` or ``{"scale": [d], "bias": [d]}``), used in their place."""

    params: dict

    site: ClassVar[str] = "module"
    mergeable: ClassVar[bool] = True
    # not replaces_base: PEFT keeps the original norm beside its copy and counts both in "all params"

    def check(self, path: str, module) -> None:
        self.check_params(path, module.variables.get("params", {}), stacked=False)

    def check_params(self, path: str, own: Mapping[str, Any], *, stacked: bool = True) -> None:
        """``stacked``: accept the copy with a leading layer axis (the inner node of a
        :class:`jpeft.scan.Stacked` site is checked against one layer's parameters)."""
        mine = {k: tuple(v.shape) for k, v in self.params.items()}
        theirs = {k: tuple(v.shape) for k, v in own.items()}
        if set(mine) != set(theirs) or any(mine[k] != t and not (stacked and mine[k][1:] == t) for k, t in theirs.items()):
            raise ShapeMismatchError(
                f"the LN tuning copy at {path!r} holds {mine}, but the module's parameters are {theirs}; it was made "
                "for another model. Re-create it with jpeft.init(LNTuningConfig(...), params, key)."
            )

    def intercept(self, call: Call):
        mod = call.module
        base = mod.variables.get("params", {})
        variables = {k: v for k, v in mod.variables.items() if k not in ("params", scan.COLLECTION)}
        variables["params"] = {k: self.params[k].astype(v.dtype) for k, v in base.items()}
        with _inject.bypass():
            return _inject.rerun(mod, variables, call.method_name, call.args, call.kwargs)

    def partition_specs(self, module_specs):
        """The copy is sharded exactly as the norm's own parameters (for a layer-scanned site
        the base's specs carry the leading layer axis too)."""
        if module_specs is None or set(module_specs) != set(self.params):
            raise ShardingError(
                f"an LN tuning site holds {sorted(self.params)}, but the base module at its path has "
                f"{None if module_specs is None else sorted(module_specs)}; was the adapter made for another model?"
            )
        return dataclasses.replace(self, params={k: module_specs[k] for k in self.params})

    def merge(self, own):
        """The module's parameters replaced by the trained copy."""
        self.check_params("", own, stacked=False)
        return {k: self.params[k].astype(v.dtype) for k, v in own.items()}

    def unmerge(self, own):
        raise NotInvertibleError(
            "LN tuning replaced the norm parameters when merged, so merged params no longer hold the base's; keep "
            "the original params (jpeft.merge never modifies them) instead of calling unmerge."
        )


def _stacked_layers(path: str, own, params) -> int:
    """The layer count when ``path`` is a norm inside a layer scan (its params carry a leading
    layer axis), else 0."""
    n = scan.num_stacked_layers(params)
    if n is None or "layers" not in path.split("/"):
        return 0
    if own["scale"].ndim != 2 or own["scale"].shape[0] != n:
        raise ShapeMismatchError(
            f"norm {path!r} sits in the layer scan of {n} layers, but its scale has shape {tuple(own['scale'].shape)}; "
            "jpeft expects [layers, features]."
        )
    return n


def init(config: LNTuningConfig, params, key, infos) -> dict:
    """A trainable copy of every targeted norm's parameters."""
    leaves = module_leaves(params)
    cands = [p for p, own in leaves.items() if is_norm(own)]
    paths = sorted(select(config.target_modules, cands, what="norm layer (RMSNorm, LayerNorm)"))
    out = {}
    for path in paths:
        own = leaves[path]
        node = LNTuningWeights(copy_params(own))
        n = _stacked_layers(path, own, params)
        out[path] = scan.Stacked(node, n) if n else node
    return out


# -- Hugging Face PEFT format -----------------------------------------------------------------------

PREFIX = "ln_tuning_layers"
_TENSORS = tuple(f"{PREFIX}.{t}" for t in NORM_PARAMS.values())


def _to_hf(config: LNTuningConfig, adapter, ctx):
    tensors, targets = {}, []
    for path in sorted(adapter):
        node = adapter[path]
        for name, v in node.params.items():
            tensors[peft_key(path, f"{PREFIX}.{NORM_PARAMS[name]}")] = np.asarray(v, np.float32)
        targets.append(hf_name(path))
    return {"target_modules": targets, "exclude_modules": None, "modules_to_save": None}, tensors


def _from_hf(d, tensors, params, ctx):
    if d.get("target_modules") is None:
        raise UnsupportedAdapterError(
            f"the LN tuning adapter in {ctx.folder!r} has target_modules=null; set it explicitly."
        )
    kept = dict(d)
    if set(kept.get("modules_to_save") or ()) <= set(HEAD_MODULES):  # a task head's copy: checked by jpeft.hf
        kept["modules_to_save"] = None
    config = config_from_peft(LNTuningConfig, kept, ctx.folder)
    # PEFT's LN tuning trains a copy of whatever module target_modules names; jpeft's, of norm layers only
    others = sorted({hf_name(sp[0]) for sp in (split_peft_key(k, _TENSORS) for k in tensors)
                     if sp is not None and sp[0] in ctx.leaves and not is_norm(ctx.leaves[sp[0]])})
    if others:
        raise UnsupportedAdapterError(
            f"the LN tuning adapter in {ctx.folder!r} trains copies of {len(others)} module(s) that are not norm layers "
            f"(first: {others[:3]}): PEFT's LN tuning copies whatever target_modules names, jpeft's copies norm layers "
            "(RMSNorm, LayerNorm) only. Retrain it in PEFT with norm layers alone in target_modules (or train those "
            "modules with another method)."
        )
    flax_name = {v: k for k, v in NORM_PARAMS.items()}
    by_site = {path: {flax_name[t.split(".", 1)[1]]: v for t, v in got.items()}
               for path, got in site_tensors(tensors, _TENSORS, ctx.leaves, config.target_modules,
                                             is_site=is_norm).items()}
    adapter = {}
    for path, got in sorted(by_site.items()):
        own = ctx.leaves[path]
        want = {k: tuple(v.shape) for k, v in own.items()}
        have = {k: tuple(v.shape) for k, v in got.items()}
        if set(have) != set(want):
            raise CheckpointError(
                f"LN tuning site {hf_name(path)!r}: the file holds {sorted(NORM_PARAMS[k] for k in have)}, but the "
                f"base norm has {sorted(NORM_PARAMS[k] for k in want)}; the file is incomplete or for another norm type."
            )
        if have != want:
            raise BaseMismatchError(
                f"LN tuning site {hf_name(path)!r}: the file's shapes {have} differ from the base norm's {want}; was "
                "the adapter made for another model?"
            )
        adapter[path] = LNTuningWeights({k: jnp.asarray(v, ctx.dtype) for k, v in got.items()})
    return config, adapter


def budget_rows(model_type: str, targets):
    """``Method.budget``: the family's norm layers (PEFT's LN tuning targets for Llama, GPT-2)."""
    ln = targets["ln"]
    return [("LN tuning", ln if isinstance(ln, str) else "+".join(ln), lambda: LNTuningConfig(target_modules=ln))]


LN_TUNING = register_method(Method(config=LNTuningConfig, init=init, nodes=(LNTuningWeights,), to_hf=_to_hf,
                                   from_hf=_from_hf, budget=budget_rows))
