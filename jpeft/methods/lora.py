"""LoRA (Hu et al. 2021) and rsLoRA (Kalajdzievski 2023), computed factored.

For a kernel viewed as the matrix ``W: [in, out]`` the adapted output is
``x @ W + s * (dropout(x) @ A) @ B`` with ``A: [in, r]``, ``B: [r, out]`` and
``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA). ``W + s * A @ B`` is only formed by
:func:`jpeft.merge`. Embeddings use ``E + s * A @ B`` with ``A: [num_embeddings, r]``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import warnings
from typing import Any, ClassVar, Mapping, Optional

import jax
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero
from jax.sharding import PartitionSpec as P

from jpeft import _inject
from jpeft._ops import flat_dot_general
from jpeft.config import AdapterConfig, _as_targets, is_positive_number, python_scalar, renamed_option
from jpeft.errors import (ConfigError, NotInvertibleError, NotMergeableError, ShapeMismatchError, TargetNotFoundError,
                          UnsupportedModuleError)
from jpeft.methods import dora
from jpeft.methods._common import (PEFT_TASK_HEADS, SavedModule, TrainedBiasOption, branch_dtype, down_project, init_saved,
                                   linear_candidates, svd_bottom, to_matrix, up_project, with_trainable_biases)
from jpeft.methods.base import (Call, Kind, Layout, LowRank, Site, check_tied_merge,
                                dropout, flat_spec_entry, kernel_spec_entries, static_field)
from jpeft.peft_format import add_site_pattern
from jpeft.scan import Stacked, layer_paths, make_site, site_rank_alpha
from jpeft.tree import compile_pattern, hf_name, linear_only, matches, regex_fullmatch, select

_INITS = ("default", "gaussian", "pissa", "olora", "milora", "mica", "random")
# inits whose adapter is relative to a *residual* base (the base minus the initial adapter):
# jpeft.init_pissa / init_olora / init_milora return that base; Hugging Face PEFT recomputes it on
# load for "pissa" and "olora" (it has no MiLoRA init, so save_peft refuses those adapters)
RESIDUAL_INITS = ("pissa", "olora", "milora")
# marks of residual bases that only the call that made them can rebuild (a randomized SVD, calibration
# data): accepted as LoraConfig.init_weights so that jpeft.save_adapter / load_adapter keep a site's mark
# (LoraConfig.saved_config), never as a way to create an adapter
_MARK_INITS = ("corda_kpm", "corda_ipm")


def is_residual_init(init) -> bool:
    """Whether ``init`` (a ``LoraConfig.init_weights`` or a site's ``residual``) marks factors relative to a
    residual base: ``"pissa"``, ``"pissa_niter_K"``, ``"olora"``, ``"milora"``, ``"corda_kpm"``/``"corda_ipm"``."""
    return isinstance(init, str) and (init in RESIDUAL_INITS or init in _MARK_INITS
                                      or re.fullmatch(r"pissa_niter_[0-9]+", init) is not None)


# the first PEFT whose _set_trainable (the modules of modules_to_save, the embeddings a dict trainable_token_indices
# names) matches a name on whole components of a module's dotted name (utils/other.py _is_valid_match); PEFT before it
# and jpeft's own configs match a plain suffix
_COMPONENT_NAMES = (0, 22)


def peft_names_match(module: str, name: str, peft_version: Optional[tuple[int, int]] = None) -> bool:
    """Whether PEFT's ``_set_trainable`` of the PEFT ``peft_version`` (``(major, minor)`` of a file's
    ``peft_version``: :func:`jpeft.peft_format.peft_version_of`) matches ``name``, an entry of
    ``modules_to_save`` or a key of a dict ``trainable_token_indices``, to the module of dotted name
    ``module``: from PEFT 0.22 on, ``module`` is ``name`` or ends with ``"." + name``; before it
    (and for ``None``, jpeft's own configs), ``module`` ends with ``name``.

    >>> peft_names_match("model.embed_tokens", "tokens"), peft_names_match("model.embed_tokens", "tokens", (0, 22))
    (True, False)
    """
    if peft_version is not None and tuple(peft_version) >= _COMPONENT_NAMES:
        return module == name or module.endswith("." + name)
    return module.endswith(name)


def _hf_module_name(name: str) -> str:
    """A module name as Hugging Face PEFT writes it: a jpeft path (``model/layers_0/mlp``) as its
    dotted name (``model.layers.0.mlp``), as ``target_modules`` takes either; others as given."""
    return hf_name(name) if "/" in name else name


@dataclasses.dataclass(frozen=True)
class LoraConfig(TrainedBiasOption, AdapterConfig):
    """Configuration of a LoRA adapter.

    Args:
      r: rank of the update (``> 0``).
      alpha: scaling numerator; the update is scaled by ``alpha / r`` (``alpha / sqrt(r)``
        with ``use_rslora``).
      dropout: dropout rate on the LoRA branch's input, in ``[0, 1)``; active only when
        :func:`jpeft.apply` gets ``rngs={"dropout": key}``.
      target_modules: a regex (matched in full, with RE2, on the module path or its Hugging Face
        dotted name) or a list of names / path suffixes; see :mod:`jpeft.tree`.
      use_rslora: scale by ``alpha / sqrt(r)``.
      init_weights: ``"default"`` (A Kaiming-uniform, B zero, so the adapter starts as the identity),
        ``"gaussian"`` (A normal with std ``1/r``, B zero), ``"pissa"`` (principal singular
        vectors of W; use :func:`jpeft.init_pissa`, which also returns the residual base),
        ``"olora"`` (QR factors of W; :func:`jpeft.init_olora`, also with the residual base),
        ``"milora"`` (minor singular vectors of W; :func:`jpeft.init_milora`, with the residual base),
        ``"mica"`` (MiCA, Hugging Face PEFT's ``init_lora_weights="mica"``: B the ``r`` left singular
        vectors of PEFT's ``[out, in]`` weight with the smallest singular values, A zero, and B
        frozen: only A is trained; the base is unchanged; dense and embedding modules) or
        ``"random"`` (A and B both random: not the identity; useful for tests). Hugging Face
        PEFT's ``init_lora_weights`` values ``True``/``False`` map to ``"default"``/``"random"``.
        Its PEFT name, ``init_lora_weights``, is taken too (and is the ``adapter_config.json``
        key); its former name ``init`` (a keyword, a key, an attribute) is deprecated.
      use_dora: weight-decomposed LoRA (DoRA, Liu et al. 2024).
      rank_pattern / alpha_pattern: per-module overrides of ``r`` / ``alpha``, keyed by a
        name or regex matched as Hugging Face PEFT does.
      exclude_modules, layers_to_transform, layers_pattern: narrow the selection as Hugging
        Face PEFT's options of these names do (see :meth:`selects`); a ``layers_to_transform``
        index that no targeted module sits in is ignored, as in PEFT, and named in a ``RuntimeWarning``.
      lora_bias: give each site a trainable bias ``[out]`` on LoRA's B (Hugging Face PEFT's
        ``lora_bias=True``): the update becomes ``s * ((x @ A) @ B + lora_bias)``, and
        :func:`jpeft.merge` adds ``s * lora_bias`` to the base bias (refused where the base layer
        has none). Only with ``init_weights`` ``"default"`` (bias zero) or ``"random"``, not with DoRA,
        not on embeddings (as in PEFT).
      modules_to_save: names of modules trained in full, as Hugging Face PEFT's option of that name
        (e.g. ``["lm_head"]``, ``["classifier"]``): a module whose dotted name ends with one of
        them gets a :class:`SavedModule` site holding a trainable copy of its parameters, which
        :func:`jpeft.apply` uses instead of the base's and :func:`jpeft.merge` writes into the base
        (each layer of a matching module that holds layers, e.g. BERT's ``pooler``, as PEFT copies
        it whole). A name that selects no module is refused (``TargetNotFoundError``), but for one of
        PEFT's SEQ_CLS pair ``classifier`` / ``score`` beside the other.
      trainable_token_indices: train only these rows of an embedding (Hugging Face PEFT's
        option, its TrainableTokens): a list of token ids for the model's input embedding, or
        ``{embedding name: ids}``. The site (:class:`TrainableTokens`) holds the rows' new values;
        on a model whose output projection is tied to the embedding the rows act there too, as
        in PEFT.
      bias: ``"none"``, ``"lora_only"`` (the base biases of the LoRA-adapted layers are trained
        too, held as ``LoraWeights.base_bias``) or ``"all"`` (every base bias of the model, the
        others as :class:`SavedModule` sites holding only ``bias``), as Hugging Face PEFT's
        option of that name (with DoRA too: the trained bias is added after the magnitude
        scaling, unscaled, as PEFT's DoRA adds the base layer's bias).
        ``None`` (a null) reads as ``"none"``.
      ensure_weight_tying: on a targeted input embedding that the model also uses as its tied
        output projection, adapt both (PEFT's ``ensure_weight_tying=True``); by default only
        the input lookup is adapted, as in PEFT's unmerged model.

    ``alpha`` defaults to 16 (PEFT's ``LoraConfig`` to 8: give it when porting a PEFT config; a
    PEFT ``adapter_config.json`` without ``lora_alpha`` is read with PEFT's 8).

    >>> import jpeft
    >>> c = jpeft.LoraConfig(r=4, alpha=8, target_modules=["Dense_0"])
    >>> jpeft.LoraConfig.from_dict(c.to_dict()) == c
    True
    >>> c.to_dict()["lora_alpha"]
    8
    """

    peft_type: ClassVar[str] = "LORA"
    _hf_keys: ClassVar[Mapping[str, str]] = {
        "alpha": "lora_alpha",
        "dropout": "lora_dropout",
        "init_weights": "init_lora_weights",
    }
    _ordered_fields: ClassVar[tuple] = ("rank_pattern", "alpha_pattern")  # first matching key wins

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: Any = ("q_proj", "v_proj")
    use_rslora: bool = False
    init_weights: str | bool = "default"  # PEFT's True / False: "default" / "random" (__post_init__)
    init = renamed_option("init")
    use_dora: bool = False
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    ensure_weight_tying: bool = False
    exclude_modules: Any = None
    layers_to_transform: Any = None
    layers_pattern: Any = None
    lora_bias: bool = False
    modules_to_save: Any = None
    trainable_token_indices: Any = None
    bias: Optional[str] = "none"  # None: "none"

    def __post_init__(self):
        self._check_bias("lora_only")  # PEFT's bias option (TrainedBiasOption)
        tti = self.trainable_token_indices
        if tti is not None:
            def ids(v, where):
                v = (v,) if isinstance(v, (int, np.integer)) else tuple(v) if isinstance(v, _INDEX_LISTS) else v
                if not isinstance(v, tuple) or not v or len(set(v)) != len(v) \
                        or not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) and i >= 0 for i in v):
                    raise ConfigError(f"LoraConfig.trainable_token_indices{where} must be distinct token ids >= 0, found {v!r}.")
                return tuple(int(i) for i in v)

            if isinstance(tti, Mapping):
                # a jpeft path ("model/embed_tokens") as the Hugging Face name PEFT matches and writes
                tti = {_hf_module_name(str(k)): ids(v, f"[{k!r}]") for k, v in tti.items()} or None
            else:
                tti = ids(tti, "")
        object.__setattr__(self, "trainable_token_indices", tti)
        mts = self.modules_to_save
        if isinstance(mts, str):
            mts = (mts,)
        mts = None if mts is None else tuple(mts) if isinstance(mts, (list, tuple)) else mts
        if mts is not None and not (isinstance(mts, tuple) and all(isinstance(m, str) and m for m in mts)):
            raise ConfigError(f"LoraConfig.modules_to_save must be a list of module names, found {self.modules_to_save!r}.")
        object.__setattr__(self, "modules_to_save", tuple(_hf_module_name(m) for m in mts) if mts else None)
        self._set_targets("give a regex or a list of module names such as ['q_proj', 'v_proj']")
        ex = _as_targets(self.exclude_modules, "exclude_modules") or None
        if isinstance(ex, tuple):  # a jpeft path ("model/layers_0/mlp") as the dotted name PEFT matches and writes
            ex = tuple(_hf_module_name(e) for e in ex)
        object.__setattr__(self, "exclude_modules", ex)
        ltt = self.layers_to_transform
        if isinstance(ltt, _INDEX_LISTS):
            ltt = tuple(ltt) or None
        if ltt is not None and not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) and i >= 0
                                       for i in (ltt if isinstance(ltt, tuple) else (ltt,))):
            raise ConfigError(f"LoraConfig.layers_to_transform must be a layer index or a list of them, found {ltt!r}.")
        ltt = tuple(map(int, ltt)) if isinstance(ltt, tuple) else python_scalar(ltt)  # np.arange's too: JSON-able
        object.__setattr__(self, "layers_to_transform", ltt)
        lp = self.layers_pattern
        if lp is not None and not isinstance(lp, str):
            if not isinstance(lp, (list, tuple)) or not all(isinstance(x, str) for x in lp):
                raise ConfigError(f"LoraConfig.layers_pattern must be the name of the layers' list (e.g. 'layers') or a "
                                  f"list of such names, found {type(lp).__name__} {str(lp)[:80]}.")
            lp = tuple(lp) or None
        object.__setattr__(self, "layers_pattern", lp or None)
        if isinstance(self.target_modules, str) and (self.layers_to_transform is not None or self.layers_pattern):
            raise ConfigError(
                "LoraConfig.layers_to_transform / layers_pattern filter a list of target_modules (as in Hugging Face "
                f"PEFT); with the regex target_modules={self.target_modules!r} put the layer indices in the regex instead."
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("LoraConfig.layers_pattern needs layers_to_transform (the layer indices it selects).")
        for name in ("rank_pattern", "alpha_pattern"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, Mapping):
                raise ConfigError(f"LoraConfig.{name} must be a dict {{module regex: value}}, found {type(v).__name__} {str(v)[:80]}.")
            object.__setattr__(self, name, {k: python_scalar(x) for k, x in (v or {}).items()})
            for k in getattr(self, name):
                compile_pattern(k)  # a key of another type, or an invalid regex, is a ConfigError
        init = self.init_weights
        if init is True:
            init = "default"
        elif init is False:
            init = "random"
        object.__setattr__(self, "init_weights", init)
        if isinstance(self.r, bool) or not isinstance(self.r, (int, np.integer)) or self.r <= 0:
            raise ConfigError(f"LoraConfig.r must be a positive integer, found {self.r!r}. Typical values: 4 to 64.")
        if not is_positive_number(self.alpha):
            raise ConfigError(f"LoraConfig.alpha must be > 0 and finite (at most float32's 3.4e38), found {self.alpha!r}. A common choice is alpha = 2 * r.")
        if not isinstance(self.ensure_weight_tying, bool):
            raise ConfigError(f"LoraConfig.ensure_weight_tying must be true or false, found {self.ensure_weight_tying!r}.")
        if not isinstance(self.lora_bias, bool):
            raise ConfigError(f"LoraConfig.lora_bias must be true or false, found {self.lora_bias!r}.")
        if not isinstance(self.dropout, (int, float)) or not (0.0 <= self.dropout < 1.0):
            raise ConfigError(f"LoraConfig.dropout must be in [0, 1), found {self.dropout!r}.")
        if self.init_weights not in _INITS and not is_residual_init(self.init_weights):
            raise ConfigError(f"LoraConfig.init_weights (init_lora_weights) must be one of {_INITS} (or a residual mark "
                              f"jpeft.save_adapter records: 'pissa_niter_K', {', '.join(map(repr, _MARK_INITS))}), found "
                              f"{self.init_weights!r}.")
        if self.lora_bias and (self.use_dora or self.init_weights not in ("default", "random")):
            raise ConfigError(
                f"LoraConfig.lora_bias=True works with init_weights 'default' or 'random' and without DoRA (as in Hugging "
                f"Face PEFT), found init_weights={self.init_weights!r}, use_dora={self.use_dora}. Drop lora_bias or use a "
                "plain LoRA init."
            )
        if self.init_weights == "mica" and (self.use_dora or self.ensure_weight_tying):
            raise ConfigError(
                f"LoraConfig(init_weights='mica') is plain LoRA with a frozen B (Hugging Face PEFT's MiCA variant), found "
                f"use_dora={self.use_dora}, ensure_weight_tying={self.ensure_weight_tying}; jpeft does not combine them. "
                "Drop that option or use another init.")
        for k, v in self.rank_pattern.items():
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise ConfigError(f"LoraConfig.rank_pattern[{k!r}] must be a positive integer, found {v!r}.")
        for k, v in self.alpha_pattern.items():
            if not is_positive_number(v):
                raise ConfigError(f"LoraConfig.alpha_pattern[{k!r}] must be > 0 and finite (at most float32's 3.4e38), found {v!r}.")

    def __hash__(self):
        return hash((self.r, self.alpha, self.dropout, self.target_modules, self.use_rslora, self.init_weights,
                     self.use_dora, tuple(sorted(self.rank_pattern.items())), tuple(sorted(self.alpha_pattern.items())),
                     self.ensure_weight_tying, self.exclude_modules, self.layers_to_transform, self.layers_pattern,
                     self.lora_bias, self.modules_to_save,
                     tuple(sorted(self.trainable_token_indices.items())) if isinstance(self.trainable_token_indices, dict)
                     else self.trainable_token_indices, self.bias))

    def saved_config(self, adapter):
        """The config :func:`jpeft.save_adapter` records: ``init_weights`` set to the residual base the LoRA
        sites are relative to (their ``residual`` mark, e.g. ``"pissa_niter_4"`` or ``"corda_kpm"``,
        which ``jpeft.init_*`` set and the config given may not say), so that
        :func:`jpeft.load_adapter` rebuilds the mark and :func:`jpeft.hf.save_peft` still knows
        which base PEFT would rebuild (or refuses)."""
        nodes = [getattr(n, "unstacked", n) for n in adapter.values()]  # a LoraStack (no Site) as it is
        # a PEFT PiSSA/OLoRA file's embedding starts plain (PEFT's Embedding layer has no residual init):
        # jpeft.save_adapter records such sites by path (plain_sites), the config the others' init
        marks = {n.residual for n in nodes if isinstance(n, LoraWeights)
                 and not (n.residual is None and n.layout.kind == Kind.EMBED)} or \
            {n.residual for n in nodes if isinstance(n, LoraWeights)}
        if len(marks) > 1:
            raise ConfigError(
                f"the adapter mixes LoRA sites relative to different bases ({sorted(map(str, marks))}); one config "
                "records one init. Save the sites of each init as separate adapters."
            )
        (mark,) = marks or {None}
        frozen_b = {n.frozen_b for n in nodes if isinstance(n, LoraWeights)}
        if len(frozen_b) > 1:
            raise ConfigError("the adapter mixes MiCA sites (lora_B frozen) with sites that train both factors; one "
                              "config records one init. Save them as separate adapters.")
        if frozen_b == {True}:  # load_adapter rebuilds the frozen B from init_weights="mica"
            cfg = self if self.init_weights == "mica" else dataclasses.replace(self, init_weights="mica")
        elif mark is not None:
            cfg = self if self.init_weights == mark else dataclasses.replace(self, init_weights=mark)
        else:  # plain sites: a residual init (or "mica") in the config would make load_adapter mark them
            cfg = (dataclasses.replace(self, init_weights="default")
                   if is_residual_init(self.init_weights) or self.init_weights == "mica" else self)
        return cfg._with_site_ranks(adapter)

    def _with_site_ranks(self, adapter):
        """The config with each LoRA site's own rank and alpha (read from its factors and scale)
        as exact rank_pattern / alpha_pattern keys, where the config would rebuild another: an
        adapter from :func:`jpeft.merging.merge_adapters` has scale 1 and its own ranks, so saved
        with its inputs' config it would load with that config's ``alpha / r`` (the update
        silently rescaled) or fail to load. Unchanged when every site already agrees."""
        sites = {p: n for p, n in adapter.items() if isinstance(n, LoraWeights)}
        if not sites or any(isinstance(n, Stacked) for n in adapter.values()):
            return self
        want = {p: (n.r, n.scale * (math.sqrt(n.r) if self.use_rslora else n.r)) for p, n in sites.items()}
        for p, n in sites.items():  # PEFT's tied lm_head copy takes lm_head's own r / alpha: the embedding's too
            if n.tie_output and n.tied_output is not False:
                want.setdefault("lm_head", want[p])

        def agrees(path, r, alpha):
            r0, a0 = self.rank_alpha(path)
            return r0 == r and math.isclose(self.scale(r0, a0), self.scale(r, alpha), rel_tol=1e-6)

        if all(agrees(p, *v) for p, v in want.items()):
            return self
        rank_pattern, alpha_pattern = {}, {}
        for p, (r, alpha) in sorted(want.items()):
            add_site_pattern(rank_pattern, alpha_pattern, p, r, alpha, self)
        return dataclasses.replace(self, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)

    def to_dict(self):
        d = super().to_dict()
        d["init_lora_weights"] = {"default": True, "random": False}.get(self.init_weights, self.init_weights)
        return d

    def selects(self, path: str) -> bool:
        """Whether the module at ``path`` gets a site, as Hugging Face PEFT decides: it matches
        ``target_modules`` (:func:`jpeft.tree.matches`), is not in ``exclude_modules`` (a regex
        fullmatched against the dotted name, or names matched as suffixes), is not copied whole by
        ``modules_to_save`` (:meth:`copied_whole`) and, when
        ``layers_to_transform`` is set (``target_modules`` is then a list), sits in one of those
        layers (the index after ``layers_pattern``, or after the first numbered component)."""
        if not matches(self.target_modules, path) or self.excludes(path) or self.copied_whole(path):
            return False
        name = hf_name(path)
        ltt = self.layers_to_transform
        if ltt is None or name in self.target_modules:
            return True  # PEFT applies the layer filter to suffix matches only, not to full names
        idx = self.layer_index(path)
        if idx is None:
            return False
        return idx == ltt if isinstance(ltt, (int, np.integer)) else idx in ltt

    def excludes(self, path: str) -> bool:
        """Whether ``exclude_modules`` names the module at ``path``, as Hugging Face PEFT matches it:
        a regex fullmatched against the dotted name (``model.layers.0.self_attn.q_proj``), or
        names (a jpeft path is read as its dotted name) equal to it or ending it."""
        ex = self.exclude_modules
        if ex is None:
            return False
        name = hf_name(path)
        if isinstance(ex, str):
            return regex_fullmatch(ex, name)  # RE2: a downloaded pattern cannot hang loading
        return name in ex or any(name.endswith("." + e) for e in ex)

    def copied_whole(self, path: str) -> bool:
        r"""Whether a ``modules_to_save`` entry names the module at ``path`` or a module holding it,
        by whole components of the dotted name (Hugging Face PEFT's rule, ``(^|.*\.){name}($|\..*)``):
        PEFT then trains the module as a full copy and gives it no adapter, whatever
        ``target_modules`` says (``target_modules="all-linear"`` with ``modules_to_save=["mlp"]``
        adapts the attention and copies each MLP)."""
        name = hf_name(path)
        return any(regex_fullmatch(rf"(^|.*\.){m}($|\..*)", name) for m in (self.modules_to_save or ()))

    def layer_index(self, path: str) -> Optional[int]:
        """The layer index ``layers_to_transform`` is compared with for the module at ``path``: the
        number after ``layers_pattern``, or after the first numbered component; ``None`` if none."""
        name = hf_name(path)
        if self.layers_pattern is None:
            m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
        else:
            pats = (self.layers_pattern,) if isinstance(self.layers_pattern, str) else self.layers_pattern
            m = None
            for pat in pats:
                m = compile_pattern(rf"(?:^|.*?\.){pat}\.(?P<idx>\d+)\.").match(name)
                if m is not None:
                    break
        return None if m is None else int(m.group("idx"))

    def adapts_lm_head(self, peft_version: Optional[tuple[int, int]] = None) -> bool:
        """``lm_head`` gets a site (:meth:`selects`) or is saved whole (:meth:`saves` by the rule of
        ``peft_version``: ``modules_to_save=["head"]`` copies ``lm_head`` too before PEFT 0.22 and
        in jpeft, not from 0.22 on); not with ``ensure_weight_tying``, where the embedding's site
        covers the tied head."""
        return not self.ensure_weight_tying and (self.selects("lm_head") or self.saves("lm_head", peft_version))

    def untied_head_refusal(self) -> Optional[str]:
        """Trainable tokens: PEFT applies their rows in the tied ``lm_head`` too, an untied one would not."""
        if self.trainable_token_indices is None:
            return None
        return ("trainable_token_indices: PEFT applies the token rows in lm_head too, but jpeft's untied lm_head would "
                "not take them (train lm_head whole, modules_to_save = [\"lm_head\"], without them)")

    @property
    def residual_init(self) -> Optional[str]:
        """``init_weights`` when it makes factors relative to a residual base (:func:`is_residual_init`)."""
        return self.init_weights if is_residual_init(self.init_weights) else None

    def saves(self, path: str, peft_version: Optional[tuple[int, int]] = None) -> bool:
        """Whether the module at ``path`` is one of ``modules_to_save`` or sits inside one, as the
        PEFT of ``peft_version`` matches them (:func:`peft_names_match`; ``None``: jpeft's own rule,
        PEFT < 0.22's plain suffix test; PEFT copies a matching module with submodules, such as
        BERT's ``pooler``, whole)."""
        return any(self.saved_by(path, m, peft_version) for m in (self.modules_to_save or ()))

    @staticmethod
    def saved_by(path: str, name: str, peft_version: Optional[tuple[int, int]] = None) -> bool:
        """Whether the module at ``path`` is, or sits inside, a module whose dotted name one entry
        ``name`` of ``modules_to_save`` names by :func:`peft_names_match` (``None``: PEFT < 0.22's
        suffix rule, jpeft's own)."""
        parts = hf_name(path).split(".")
        return any(peft_names_match(".".join(parts[:i]), name, peft_version) for i in range(1, len(parts) + 1))

    @staticmethod
    def saved_by_component(path: str, name: str) -> bool:
        """:meth:`saved_by` as PEFT >= 0.22 matches ``modules_to_save``: ``norm`` names ``model.norm``
        but no longer each layer's ``input_layernorm``."""
        return LoraConfig.saved_by(path, name, _COMPONENT_NAMES)

    def rank_alpha(self, path: str, *, hf_only: bool = False) -> tuple[int, float]:
        """``(r, alpha)`` for one module, honouring rank_pattern / alpha_pattern as HF PEFT does.
        A key may also name the jpeft path (``layers_1/mlp/up_proj``, ``Dense_0``); with
        ``hf_only`` only PEFT's own rule applies (the end of the dotted name), as for a config
        read from an ``adapter_config.json``."""
        name = hf_name(path)

        def lookup(pattern, default):
            for key, val in pattern.items():
                k = key.replace("/", ".")
                if regex_fullmatch(rf"(.*\.)?({k})", name) or (not hf_only and regex_fullmatch(rf"(.*/)?({key})", path)):
                    return val
            return default

        return int(lookup(self.rank_pattern, self.r)), float(lookup(self.alpha_pattern, self.alpha))

    def scale(self, r: int, alpha: float) -> float:
        return float(alpha / math.sqrt(r)) if self.use_rslora else float(alpha / r)


_INDEX_LISTS = (list, tuple, range, np.ndarray)  # what layers_to_transform and trainable_token_indices list ids in


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraWeights(Site):
    """One LoRA site: ``lora_A: [in, r]``, ``lora_B: [r, out]`` (JAX orientation), plus the
    DoRA magnitude ``[out]`` when ``use_dora`` and the bias ``lora_bias: [out]`` on B when
    ``LoraConfig.lora_bias`` (the update is then ``s * ((x @ A) @ B + lora_bias)``).

    Static fields besides the scale, layout and dropout rate:

    * ``residual``: ``None``, or the init (``"pissa"``, ``"pissa_niter_K"``, ``"olora"``, ``"milora"``,
      ``"corda_kpm"``/``"corda_ipm"``) whose
      residual base this site's factors are relative to (set by :func:`jpeft.init_pissa` /
      :func:`jpeft.init_olora`; :func:`jpeft.hf.save_peft` writes it as ``init_lora_weights``).
    * ``tie_output`` (embeddings only): also adapt the embedding's ``attend`` (a tied output
      projection), as Hugging Face PEFT's ``ensure_weight_tying=True`` does on Llama-style
      models. ``False`` (PEFT's default) adapts the input lookup only.
    * ``tied_output`` (embeddings only): whether the model reads this embedding through
      ``attend`` too (known when :func:`jpeft.init` traced the model; ``None`` when unknown).
      :func:`jpeft.merge` uses it to refuse a merge that would change the output projection.
    * ``frozen_b``: ``lora_B`` is frozen (:attr:`frozen`: no gradient, no optimizer state), as
      MiCA (``LoraConfig(init_weights="mica")``) trains ``lora_A`` only.
    """

    lora_A: jax.Array
    lora_B: jax.Array
    magnitude: Optional[jax.Array] = None
    scale: float = static_field(default=1.0)
    layout: Layout = static_field(default=None)
    dropout: float = static_field(default=0.0)
    residual: Optional[str] = static_field(default=None)
    tie_output: bool = static_field(default=False)
    tied_output: Optional[bool] = static_field(default=None)
    lora_bias: Optional[jax.Array] = None
    base_bias: Optional[jax.Array] = None
    frozen_b: bool = static_field(default=False)

    site: ClassVar[str] = "linear"
    mergeable: ClassVar[bool] = True

    @property
    def frozen(self) -> tuple:  # FrozenFields: MiCA's B is carried along, never trained
        return ("lora_B",) if self.frozen_b else ()

    @property
    def r(self) -> int:
        return int(self.lora_A.shape[-1])

    def handles(self, method_name: str) -> bool:
        if self.layout.kind == Kind.EMBED and self.tie_output:
            return method_name in ("__call__", "attend")
        return method_name == "__call__"

    # -- checks (Site.check runs check_params on the bound module's params) ------------------
    def check_params(self, path: str, own: Mapping[str, Any]) -> None:
        self.layout.check_params(path, own)
        # the factors' trailing axes (a layer-stacked site's inner node has a leading layer axis):
        # a misfit either fails deep inside JAX or, in the merged-dense form, broadcasts silently
        a, b = tuple(self.lora_A.shape[-2:]), tuple(self.lora_B.shape[-2:])
        lay = self.layout
        if len(a) != 2 or len(b) != 2 or a[0] != lay.in_features or b[1] != lay.out_features or a[1] != b[0]:
            raise ShapeMismatchError(
                f"the LoRA site at {path!r} has lora_A of shape {tuple(self.lora_A.shape)} and lora_B of shape "
                f"{tuple(self.lora_B.shape)}, but the module's {lay.param_name} {tuple(lay.kernel_shape)} needs "
                f"lora_A [{lay.in_features}, r] and lora_B [r, {lay.out_features}] with the same r. Was the adapter "
                "made for another model, or its factors edited? Re-create it with jpeft.init."
            )
        if self.magnitude is not None and tuple(self.magnitude.shape[-1:]) != (lay.out_features,):
            raise ShapeMismatchError(
                f"the DoRA site at {path!r} has a magnitude of shape {tuple(self.magnitude.shape)}, but the module has "
                f"{lay.out_features} output features. Was the adapter made for another model?"
            )
        if self.lora_bias is not None and self.lora_bias.shape[-1:] != (self.layout.out_features,):
            raise ShapeMismatchError(
                f"the LoRA site at {path!r} has a lora_bias of shape {tuple(self.lora_bias.shape)}, but the module has "
                f"{self.layout.out_features} output features. Was the adapter made for another model?"
            )

    def _bias_out(self, dt, ndim: int) -> jax.Array:
        """``s * lora_bias`` shaped to broadcast over an output of ``ndim`` dims (output dims last)."""
        out = tuple(self.layout.out_dims)
        return (self.scale * self.lora_bias.astype(dt)).reshape((1,) * (ndim - len(out)) + out)

    # -- factored forward --------------------------------------------------------------------
    def delta_matrix(self) -> jax.Array:
        """``s * A @ B`` as ``[in, out]`` (used by merge, never while training)."""
        return self.scale * (self.lora_A.astype(jnp.float32) @ self.lora_B.astype(jnp.float32))

    def intercept(self, call: Call):
        lay = self.layout
        mod = call.module
        if lay.kind != Kind.EMBED:
            _inject.check_layout(call.path, lay, mod, call.args, call.kwargs)
        if self.magnitude is not None:
            return dora.intercept(self, call)
        x = call.inputs
        if lay.kind == Kind.DENSE:
            y = self._merged_dense(call, x)
            if y is not None:
                return y
        y0 = call.run()
        # the branch and its sum with the base output in the adapter's dtype (float32), rounded
        # once to the output's dtype, as PEFT does over a bfloat16 base (branch_dtype)
        dt = branch_dtype(y0.dtype, self.lora_A, self.lora_B)
        y = y0.astype(dt)
        if self.base_bias is not None:  # LoraConfig.bias: the trained base bias replaces the module's own
            own_b = mod.variables["params"]["bias"]
            y = y + (self.base_bias.astype(dt) - own_b.astype(dt)).reshape((1,) * (y.ndim - own_b.ndim) + own_b.shape)
        a = self.lora_A.astype(dt)
        b = self.lora_B.astype(dt)
        if lay.kind == Kind.EMBED:
            if call.method_name == "attend":
                return (y + self.scale * ((x.astype(dt) @ b.T) @ a.T)).astype(y0.dtype)
            h = jnp.take(a, x, axis=0)
            return (y + self.scale * (h @ b)).astype(y0.dtype)
        x = dropout(x.astype(dt), self.dropout, call.dropout_key())  # PEFT casts the input, then drops
        if lay.kind == Kind.DENSE:
            # Flatten the leading axes: the weight-gradient dots of 2-D operands contract one
            # axis, which XLA's CPU backend runs without the transposed copies of activations it
            # makes for several contracted axes (~25% of a Llama LoRA step; docs/BENCHMARKS.md).
            x2 = x.reshape(-1, x.shape[-1])
            d = ((x2 @ a) @ b) * self.scale
            y = y + d.reshape(y.shape)
        else:
            h = down_project(x, a, lay, mod)
            y = y + self.scale * up_project(h, b, lay)
        y = y if self.lora_bias is None else y + self._bias_out(dt, y.ndim)
        return y.astype(y0.dtype)

    def _merged_dense(self, call: Call, x):
        """``x @ (W + s A B) + bias`` for an ``nn.Dense`` call with many tokens, or ``None``.

        The factored form writes two activation-sized products per call (``(x A) B`` forward,
        ``(dy B^T) A^T`` backward), which costs more memory traffic than forming the
        weight-sized ``s A B`` once when ``tokens * (in + out) > in * out`` (a training batch;
        not decoding). The backward of :func:`_merged_matmul` still computes the adapter's
        gradients from rank-``r`` products and never a gradient the size of ``W``. Only for
        float32 kernels and computation (in lower precision ``W + s A B`` would round the
        update away) and without active dropout.
        """
        mod = call.module
        if type(mod) is not nn.Dense or getattr(mod, "dot_general", None) not in (None, flat_dot_general) \
                or getattr(mod, "dot_general_cls", None) is not None:
            return None
        if self.dropout > 0 and mod.has_rng("dropout"):
            return None
        own = mod.variables.get("params", {})
        w = own.get("kernel")
        if w is None or x is None or w.ndim != 2 or x.shape[-1] != w.shape[0]:
            return None
        f32 = jnp.dtype(jnp.float32)
        if w.dtype != f32 or x.dtype != f32 or (mod.dtype is not None and jnp.dtype(mod.dtype) != f32):
            return None
        n_in, n_out = w.shape
        tokens = math.prod(x.shape[:-1])
        if tokens * (n_in + n_out) <= n_in * n_out:
            return None
        x2 = x.reshape(-1, n_in)
        y = _merged_matmul(x2, w, self.lora_A.astype(f32), self.lora_B.astype(f32), float(self.scale), mod.precision)
        b = own.get("bias") if self.base_bias is None else self.base_bias
        if mod.use_bias and b is not None:
            y = y + b.astype(f32).reshape(1, n_out)
        if self.lora_bias is not None:
            y = y + self._bias_out(f32, 2)
        return y.reshape(x.shape[:-1] + (n_out,))

    # -- merge ----------------------------------------------------------------------------------
    def kernel_delta(self, dtype=jnp.float32) -> jax.Array:
        """The update in the kernel's own shape and axis order."""
        lay = self.layout
        d = self.delta_matrix().reshape(tuple(lay.in_dims) + tuple(lay.out_dims))
        order = tuple(lay.in_axes) + tuple(lay.out_axes)
        inv = tuple(int(i) for i in np.argsort(order))
        return jnp.transpose(d, inv).astype(dtype)

    def _check_tied_merge(self):
        check_tied_merge(LowRank(None, None, 0.0, self.layout, self.tied_output if self.layout.kind == Kind.EMBED
                                 else None, bool(self.tie_output)), stacklevel=5)

    def _merge_bias(self, own, out, sign: float) -> None:
        """Adds ``sign * s * lora_bias`` to the base bias in ``out`` (PEFT refuses too when there is none)."""
        if self.lora_bias is None:
            return
        b = out.get("bias")
        if b is None or b.size != self.layout.out_features:
            raise NotMergeableError(
                f"this LoRA has a lora_bias (LoraConfig.lora_bias=True), but the base layer has "
                f"{'no bias' if b is None else f'a bias of shape {tuple(b.shape)}'} to fold it into (PEFT refuses this "
                "merge too). Keep the adapter unmerged, or train it with lora_bias=False for a layer without a bias."
            )
        d = (sign * self.scale) * self.lora_bias.astype(jnp.float32).reshape(b.shape)
        out["bias"] = (b.astype(jnp.float32) + d).astype(b.dtype)

    def merge(self, own):
        self._check_tied_merge()
        if self.magnitude is not None:
            out = dora.merge(self, own)
        else:
            pname = self.layout.param_name
            w = own[pname]
            out = dict(own)
            out[pname] = (w.astype(jnp.float32) + self.kernel_delta()).astype(w.dtype)
        if self.base_bias is not None:  # LoraConfig.bias (with DoRA too): the trained bias, as PEFT trains it in place
            out["bias"] = self.base_bias.reshape(own["bias"].shape).astype(own["bias"].dtype)
        if self.magnitude is None:
            self._merge_bias(own, out, 1.0)
        return out

    def unmerge(self, own):
        self._check_tied_merge()
        if self.base_bias is not None:  # with DoRA too
            raise NotInvertibleError(
                "this LoRA trains the base bias too (LoraConfig.bias), which merge replaces, so the base bias cannot be "
                "recovered from merged params; keep the base params tree (jpeft never modifies it) instead."
            )
        if self.magnitude is not None:
            return dora.unmerge(self, own)
        pname = self.layout.param_name
        w = own[pname]
        out = dict(own)
        out[pname] = (w.astype(jnp.float32) - self.kernel_delta()).astype(w.dtype)
        self._merge_bias(own, out, -1.0)
        return out


    # -- the rest of the protocol ----------------------------------------------------------------
    def load_note(self):
        """A site marked ``residual`` (jpeft.init_pissa & co.): its factors are relative to the
        residual base that call returned, not to the original weights."""
        if self.residual is None:
            return None
        mark = str(self.residual)
        rebuild = (f", or rebuild them from the original params with jpeft.methods.pissa.residual_params(config, "
                   f"params, adapter, {mark!r})" if mark in ("pissa", "olora") else
                   "; the original params cannot rebuild them")
        return (f"it comes from jpeft.init_{mark.split('_')[0]} (sites marked {mark!r}): its factors are relative to "
                "the residual base that call returned, not to the original weights, so jpeft.apply with the original "
                "params gives other outputs. Apply it to the residual params you kept (jpeft.merge(residual, adapter) "
                f"gives the trained full weights), or convert it with them to a plain LoRA of the original params "
                f"(jpeft.convert_residual_adapter(adapter, params, residual)){rebuild}.")

    def effective(self, own):
        """L2-SP's effective weights: the update ``s * A @ B`` in the kernel's shape (plain LoRA;
        DoRA's is its merged kernel, which depends on the base). A LoRA that trains a bias too
        (``lora_bias``, or ``bias`` training the base bias) gives ``{"kernel": update, "bias":
        the bias it makes the layer use}``, so the bias's drift is penalised as well."""
        if self.magnitude is not None:
            return Site.effective(self, own)
        if self.lora_bias is None and self.base_bias is None:
            return self.kernel_delta()
        f = jnp.float32
        bias = jnp.zeros((self.layout.out_features,), f)
        if self.base_bias is not None:
            bias = bias + self.base_bias.astype(f).reshape(-1)
        if self.lora_bias is not None:
            bias = bias + self.scale * self.lora_bias.astype(f).reshape(-1)
        return {"kernel": self.kernel_delta(), "bias": bias}

    def low_rank(self) -> LowRank:
        if self.magnitude is not None:
            raise NotMergeableError(
                "this is a DoRA adapter (it has a magnitude); its update is not s*A@B, so it cannot be combined "
                "linearly. Merge it into the base alone with jpeft.merge."
            )
        if self.lora_bias is not None or self.base_bias is not None:
            raise NotMergeableError(
                "this LoRA trains a bias (LoraConfig.lora_bias or bias), which is no part of its update s*A@B (adapter "
                "merging and the bank take a lora_bias through routed_low_rank, never a trained base bias). Merge it "
                "into the base alone with jpeft.merge."
            )
        return self._low_rank(None)

    def _low_rank(self, bias) -> LowRank:
        return LowRank(self.lora_A, self.lora_B, self.scale, self.layout,
                       self.tied_output if self.layout.kind == Kind.EMBED else None, bool(self.tie_output),
                       float(self.dropout), self.residual, bias, frozen_b=bool(self.frozen_b))

    def routed_low_rank(self) -> LowRank:
        """The bank routes a ``lora_bias`` too (``s * (x @ A @ B + lora_bias)``, as PEFT's
        mixed-batch forward runs ``lora_B``'s bias); DoRA and a trained base bias are refused as
        by :meth:`low_rank`."""
        if self.lora_bias is None or self.magnitude is not None or self.base_bias is not None:
            return self.low_rank()
        return self._low_rank(self.lora_bias)

    def partition_specs(self, module_specs):
        """``lora_A [in, r]`` takes the kernel's input-dimension entry, ``lora_B [r, out]`` (and
        the DoRA magnitude, the LoRA bias) its output entry, so ``x @ A`` and ``h @ B`` need no
        more communication than the base matmul; a trained base bias is replicated."""
        lay = self.layout
        lead = self.lora_A.ndim - 2  # stacked (scanned) sites carry leading layer axes
        lead_e, kern_e = kernel_spec_entries(lay, module_specs, lead, "LoRA")
        a_in = flat_spec_entry(kern_e, lay.in_axes)
        b_out = flat_spec_entry(kern_e, lay.out_axes)
        out = P(*lead_e, b_out)
        return dataclasses.replace(
            self, lora_A=P(*lead_e, a_in, None), lora_B=P(*lead_e, None, b_out),
            magnitude=None if self.magnitude is None else out, lora_bias=None if self.lora_bias is None else out,
            base_bias=None if self.base_bias is None else P())


def from_low_rank(lr: LowRank) -> LoraWeights:
    """``Method.from_low_rank`` of LoRA: the LoRA site of a low-rank update (``lora_B`` frozen, as
    MiCA's, where :attr:`LowRank.frozen_b` says so)."""
    embed = lr.layout.kind == Kind.EMBED
    if lr.saved is not None:  # the bank's modules_to_save copy (routed_low_rank of SavedModule)
        return SavedModule(dict(lr.saved), tie_output=bool(lr.tie_output) and embed,
                           tied_output=lr.tied_output if embed else None)
    if lr.tokens is not None:  # the bank's trainable tokens (routed_low_rank of TrainableTokens)
        indices, values = lr.tokens
        return TrainableTokens(values, tuple(int(i) for i in indices), bool(lr.tie_output),
                               vocab=int(lr.layout.kernel_shape[0]))
    return LoraWeights(lr.a, lr.b, None, float(lr.scale), lr.layout, float(lr.dropout),
                       tie_output=bool(lr.tie_output) and embed, tied_output=lr.tied_output if embed else None,
                       lora_bias=lr.bias, frozen_b=bool(lr.frozen_b))

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainableTokens(Site):
    """``LoraConfig.trainable_token_indices`` on one embedding: ``values: [k, dim]`` replace the
    embedding's rows ``indices`` (Hugging Face PEFT's TrainableTokens; its
    ``trainable_tokens_delta`` holds these values, not a difference). With ``tie_output`` the
    embedding's ``attend`` (a tied output projection) uses the new rows too, as PEFT ties them.
    ``vocab``: the embedding's number of rows (what the adapter bank needs to hold the site)."""

    values: jax.Array
    indices: tuple = static_field(default=())
    tie_output: Optional[bool] = static_field(default=False)
    vocab: Optional[int] = static_field(default=None)

    site: ClassVar[str] = "linear"
    mergeable: ClassVar[bool] = True

    def handles(self, method_name: str) -> bool:
        return method_name == "__call__" or (method_name == "attend" and bool(self.tie_output))

    def check_params(self, path: str, own: Mapping[str, Any]) -> None:
        e = own.get("embedding")
        if e is None or e.ndim != 2 or self.values.shape != (len(self.indices), e.shape[1]) \
                or max(self.indices) >= e.shape[0]:
            raise ShapeMismatchError(
                f"the trainable tokens at {path!r} hold rows {list(self.indices)[:8]} of width "
                f"{self.values.shape[-1]}, but the module's embedding is "
                f"{None if e is None else tuple(e.shape)}. Was the adapter made for another model?"
            )

    def _table(self, e):
        return e.at[jnp.asarray(self.indices)].set(self.values.astype(e.dtype))

    def low_rank(self) -> LowRank:
        raise NotMergeableError(
            f"this site is trainable tokens (LoraConfig.trainable_token_indices, rows {list(self.indices)[:8]} of the "
            "embedding): they replace embedding rows, they are not a low-rank update s*A@B, so adapter merging and "
            "the adapter bank cannot combine them with other adapters. Serve the adapter alone with jpeft.apply, or "
            "fold it into its own copy of the base with jpeft.merge."
        )

    def routed_low_rank(self) -> LowRank:
        """What the adapter bank routes (PEFT's mixed batch replaces each row's token rows with
        its own adapter's): no low-rank part (rank 0, scale 0) and ``tokens=(indices, values)``."""
        if self.vocab is None:
            raise NotMergeableError(
                f"these trainable tokens (rows {list(self.indices)[:8]}) do not record their embedding's size (vocab), "
                "which the adapter bank needs; make the adapter with jpeft.init or load it with jpeft.load_adapter / "
                "jpeft.hf.load_peft."
            )
        d = int(self.values.shape[-1])
        layout = Layout(Kind.EMBED, (int(self.vocab), d), (0,), (1,))
        tied = None if self.tie_output is None else bool(self.tie_output)
        return LowRank(jnp.zeros((int(self.vocab), 0), jnp.float32), jnp.zeros((0, d), jnp.float32), 0.0, layout,
                       tied_output=tied, tie_output=bool(self.tie_output), tokens=(tuple(self.indices), self.values))

    def intercept(self, call: Call):
        mod = call.module
        variables = dict(mod.variables)
        params = dict(variables.get("params", {}))
        params["embedding"] = self._table(params["embedding"])
        variables["params"] = params
        with _inject.bypass():
            return _inject.rerun(mod, variables, call.method_name, call.args, call.kwargs)

    def merge(self, own):
        if self.tie_output is None:
            warnings.warn(
                "merging trainable tokens into an embedding: jpeft cannot tell whether the model also reads it as a "
                "tied output projection (attend), where the merged rows would act too. Pass the model to jpeft.init.",
                UserWarning, stacklevel=4)
        out = dict(own)
        out["embedding"] = self._table(own["embedding"])
        return out

    def unmerge(self, own):
        raise NotInvertibleError(
            "merged trainable tokens replace rows of the embedding, so the base rows cannot be recovered from the "
            "merged params; keep the base params tree (jpeft never modifies it) instead."
        )


_INPUT_EMBEDDINGS = ("model/embed_tokens", "transformer/wte", "bert/embeddings/word_embeddings")


def token_sites(config: LoraConfig, leaves: Mapping[str, Mapping[str, Any]],
                peft_version: Optional[tuple[int, int]] = None) -> dict[str, tuple]:
    """``{embedding path: token ids}`` for ``config.trainable_token_indices``: a list goes to the
    model's input embedding (jpeft.models' or a module named ``embed_tokens``, PEFT's default), a
    dict's keys match embedding names as the PEFT of ``peft_version`` (a file's; ``None``: jpeft's
    own configs, PEFT < 0.22's suffix rule) matches them (:func:`peft_names_match`)."""
    tti = config.trainable_token_indices
    embeds = [p for p, own in leaves.items() if "embedding" in own]
    if isinstance(tti, dict):
        out = {}
        for name, ids in tti.items():
            hits = [p for p in embeds if peft_names_match(hf_name(p), name, peft_version)]
            if len(hits) != 1:
                head = ""
                suffix = [hf_name(p) for p in embeds if peft_names_match(hf_name(p), name)]
                if not hits and suffix:  # a file of PEFT >= 0.22, which would not load it either
                    head = (f" The file was written by PEFT {'.'.join(map(str, peft_version))}, which matches such a "
                            f"name on whole components of a module's dotted name (PEFT before 0.22 matched a suffix: "
                            f"{suffix}), so it cannot load this file either; name the embedding by its dotted name, "
                            f"e.g. {{{suffix[0]!r}: ids}}.")
                elif not hits and name.endswith("lm_head"):
                    # PEFT also puts token rows on an output Linear; jpeft's trainable tokens are embedding rows
                    head = (" jpeft trains token rows of embeddings only, not of an output layer such as lm_head: on a "
                            "model with tied word embeddings the embedding's rows are its output rows too, so name the "
                            "embedding; on an untied model, train lm_head whole with modules_to_save=['lm_head'].")
                raise TargetNotFoundError(
                    f"trainable_token_indices names {name!r}, which matches {len(hits)} embeddings ({hits}); name "
                    f"exactly one of {[hf_name(p) for p in embeds]}.{head}"
                )
            out[hits[0]] = ids
        return out
    hits = [p for p in _INPUT_EMBEDDINGS if p in leaves] or [p for p in embeds if p.endswith("embed_tokens")]
    if len(hits) != 1:
        raise TargetNotFoundError(
            f"trainable_token_indices is a list, for the model's input embedding, but jpeft cannot tell which of "
            f"{[hf_name(p) for p in embeds]} that is. Give {{embedding name: ids}} instead."
        )
    return {hits[0]: tti}


def init_tokens(values_of: Mapping[str, Any], ids: tuple, tie_output: Optional[bool]) -> TrainableTokens:
    """The site for rows ``ids`` of an embedding: their current values (PEFT's start)."""
    e = values_of["embedding"]
    if max(ids) >= e.shape[0]:
        raise ConfigError(f"trainable_token_indices {list(ids)} reach past the embedding's {e.shape[0]} rows.")
    return TrainableTokens(jnp.asarray(e)[jnp.asarray(ids)].astype(jnp.float32), tuple(ids), tie_output,
                           vocab=int(e.shape[0]))


def saved_modules(config: LoraConfig, leaves, sites, infos=None) -> dict:
    """The trainable full copies of ``config.modules_to_save`` (modules holding parameters);
    ``infos`` (from tracing the model) tell whether an embedding is also a tied output projection."""
    saved = sorted(p for p in leaves if config.saves(p))
    # a name that selects nothing would leave a module the user meant to train frozen; PEFT's SEQ_CLS names every
    # head, "classifier" (BERT), "score" (decoders) and, from PEFT 0.22, "pre_classifier" (DistilBERT), so some
    # may be absent where another is saved
    missing = [m for m in config.modules_to_save if not any(config.saved_by(p, m) for p in leaves)]
    if missing and not (saved and set(missing) <= set(PEFT_TASK_HEADS["SEQ_CLS"])):
        tied = " (a model with tied word embeddings has no lm_head of its own: jpeft computes its logits with the " \
               "input embedding; to train an lm_head of its own, as PEFT's copy on a tied model does, load the base " \
               "untied: jpeft.models.from_pretrained(folder, tie_word_embeddings=False))" \
            if any(m.endswith("lm_head") for m in missing) else ""
        raise TargetNotFoundError(
            f"modules_to_save names {missing}, which select no module with parameters in these params{tied}; "
            f"modules with parameters end with e.g. {sorted({p.rsplit('/', 1)[-1] for p in leaves})[:12]}."
        )
    both = [p for p in saved if p in sites]
    if both:
        raise ConfigError(
            f"modules {both} are both LoRA targets and modules_to_save; a module is either adapted or trained in full. "
            "Remove them from one of target_modules and modules_to_save."
        )
    out = {}
    for p in saved:
        embed = "embedding" in leaves[p]
        tied = embedding_tied(config, p, leaves, infos, "modules_to_save") if embed else None
        node = init_saved(p, leaves[p], tie_output=bool(config.ensure_weight_tying) and embed, tied_output=tied)
        # inside a layer scan the module's params are stacked: one copy per layer, run on its layer's slice (an
        # unstacked node there was refused at the first apply, though a PEFT file loads onto the same module)
        n = getattr((infos or {}).get(p), "scanned_layers", None)
        out[p] = Stacked(node, n) if n else node
    return out


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5))
def _merged_matmul(x, w, a, b, scale, precision):
    """``x @ (w + scale * a @ b)`` for 2-D ``x``; gradients of ``a`` and ``b`` come from
    rank-``r`` products (``x^T (dy b^T)`` and ``(x a)^T dy``), and ``w``'s gradient ``x^T dy``
    only when ``w`` is differentiated (never in adapter training). A ``custom_jvp`` (the
    gradients are the transposes of :func:`_merged_matmul_jvp`'s terms), so forward mode
    (``jax.jvp``, ``jax.jacfwd``, Hessian-vector products) works as on the factored form."""
    return jnp.dot(x, w + scale * (a @ b), precision=precision)


@functools.partial(jax.checkpoint, static_argnums=(4, 5))
def _tangent_in_x(dx, w, a, b, scale, precision):
    # recomputes w + s a b in the backward pass instead of keeping an [in, out] array per layer
    return jnp.dot(dx, w + scale * (a @ b), precision=precision)


def _merged_matmul_jvp(scale, precision, primals, tangents):
    x, w, a, b = primals
    dx, dw, da, db = tangents
    y = _merged_matmul(x, w, a, b, scale, precision)
    terms = []
    if not isinstance(dx, SymbolicZero):
        terms.append(_tangent_in_x(dx, w, a, b, scale, precision))
    if not isinstance(dw, SymbolicZero):
        terms.append(jnp.dot(x, dw, precision=precision))
    if not isinstance(da, SymbolicZero):
        terms.append(scale * ((x @ da) @ b))
    if not isinstance(db, SymbolicZero):
        terms.append(scale * ((x @ a) @ db))
    return y, (sum(terms[1:], terms[0]) if terms else jnp.zeros_like(y))


_merged_matmul.defjvp(_merged_matmul_jvp, symbolic_zeros=True)


# embeddings of jpeft.models that a tied model also reads as its output projection (attend)
_TIEABLE_EMBEDDINGS = ("model/embed_tokens", "transformer/wte")
# the other embedding tables of jpeft.models, which they only look ids up in (GPT-2's positions, BERT's positions and
# token types; also in the bare GPT2Model's / BertModel's params), each beside the word table that tells the model:
# {table: word table}
_LOOKUP_ONLY_TABLES = {f"{pre}{t}": f"{pre}{word}"
                       for pre, word, tables in (("transformer/", "wte", ("wpe",)), ("", "wte", ("wpe",)),
                                                 ("bert/embeddings/", "word_embeddings",
                                                  ("position_embeddings", "token_type_embeddings")),
                                                 ("embeddings/", "word_embeddings",
                                                  ("position_embeddings", "token_type_embeddings")))
                       for t in tables}


_LOOKUP_ONLY = {"target_modules": ("a LoRA on an embedding adapts the lookup (Hugging Face PEFT's LoRA Embedding)",
                                    "set LoraConfig(ensure_weight_tying=True) to adapt attend too, "),
                 "modules_to_save": ("a modules_to_save copy of an embedding replaces the lookup's table (as PEFT's)",
                                     "set LoraConfig(ensure_weight_tying=True) to use the copy in attend too, "),
                 "trainable_token_indices": ("trainable tokens replace rows of the lookup", "")}


def embedding_tied(config, path: str, leaves: Mapping[str, Any], infos, field: str) -> Optional[bool]:
    """Whether the model also reads the embedding at ``path`` through ``attend`` (a tied output
    projection): from the traced model's calls (``infos``), else from the params
    (:func:`tied_output_from_params`; ``None`` when they cannot tell). ``field`` is the config
    field that put a site on it (a key of ``_LOOKUP_ONLY``).

    Raises:
      UnsupportedModuleError: the traced model never looks ids up in the embedding (it reads it
        through ``attend`` only), so a site acting on the lookup would never act: no gradient,
        yet folded by :func:`jpeft.merge` into the table ``attend`` reads."""
    if infos is not None and path in infos:
        return "attend" in infos[path].methods
    if infos is not None and not (config.ensure_weight_tying and field != "trainable_token_indices"):
        what, fix = _LOOKUP_ONLY[field]
        raise UnsupportedModuleError(
            f"module {path!r} is an embedding the traced model never looks ids up in (it reads the table through "
            f"attend only, as an output projection, or not at all in this call), but {what}: the site would never "
            "act, its arrays would get no gradient, and jpeft.merge would still fold them into the table attend "
            f"reads. To fix: {fix}trace the call that looks ids up (jpeft.init(config, params, key, "
            f"model, x, method=...)), or remove it from {field}."
        )
    return tied_output_from_params(path, leaves)


def tied_output_from_params(path: str, leaves: Mapping[str, Any]) -> Optional[bool]:
    """Whether the embedding at ``path`` is also the model's output projection, told from the
    params alone for jpeft.models (Llama/Mistral/Qwen2 ``model/embed_tokens`` with no
    ``lm_head``, GPT-2 ``transformer/wte``; BERT's word embeddings, GPT-2's ``wpe`` and BERT's
    position and token-type tables never); ``None`` when the params cannot tell.
    ``leaves`` is :func:`jpeft.tree.module_leaves` of the params."""
    if path == "bert/embeddings/word_embeddings":  # jpeft's BERT never reads it as an output projection
        return False
    if _LOOKUP_ONLY_TABLES.get(path) in leaves:  # a position / token-type table beside jpeft.models' word table
        return False
    if path not in _TIEABLE_EMBEDDINGS:
        return None
    return "lm_head" not in leaves


def _kaiming_uniform(key, shape, fan_in, dtype=jnp.float32):
    # torch.nn.init.kaiming_uniform_(a=sqrt(5)) as HF PEFT uses: bound = 1/sqrt(fan_in)
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def _mica_factors(path: str, layout: Layout, own: Mapping[str, Any], r: int):
    """MiCA's initial ``(lora_A, lora_B)`` as Hugging Face PEFT's ``LoraLayer.mica_init`` /
    ``Embedding.mica_init`` make them: PEFT's B is ``U[:, -r:]`` of the SVD (in float32) of its
    ``[out, in]`` weight (an embedding's ``weight.T``), its A zero; jpeft holds both transposed."""
    if layout.kind not in (Kind.DENSE, Kind.DENSE_GENERAL, Kind.EINSUM, Kind.EMBED):
        raise ConfigError(
            f"LoraConfig(init_weights='mica') cannot adapt the {layout.kind} module at {path!r}: Hugging Face PEFT's MiCA "
            "is for linear and embedding layers. Leave this module out of target_modules (exclude_modules).")
    w = own.get(layout.param_name)
    dt = getattr(w, "dtype", None)
    if dt is None or not jnp.issubdtype(jnp.dtype(dt), jnp.floating) or jnp.dtype(dt).itemsize < 2 \
            or not isinstance(w, (jax.Array, np.ndarray)):
        raise ConfigError(
            f"LoraConfig(init_weights='mica') takes the SVD of {path!r}'s {layout.param_name}, which is "
            f"{'missing' if w is None else type(w).__name__ if dt is None else jnp.dtype(dt).name}; expected float32, "
            "float16 or bfloat16 (as Hugging Face PEFT). Initialise MiCA on the unquantized base.")
    n_in, n_out = layout.in_features, layout.out_features
    if r > min(n_in, n_out):
        raise ConfigError(
            f"LoraConfig(init_weights='mica') needs r <= min(in_features, out_features) = {min(n_in, n_out)} for "
            f"{path!r} ([{n_in}, {n_out}]), found r={r} (Hugging Face PEFT refuses it too). Lower r or rank_pattern.")
    u, _, _ = svd_bottom(to_matrix(w.astype(jnp.float32), layout).T, r)  # PEFT's [out, in] weight
    return jnp.zeros((n_in, r), jnp.float32), jnp.asarray(u.T, jnp.float32)


def init_site(config: LoraConfig, path: str, layout: Layout, key, own: Mapping[str, Any],
              tied_output: Optional[bool] = None, rank_alpha: Optional[tuple] = None) -> LoraWeights:
    r, alpha = rank_alpha if rank_alpha is not None else config.rank_alpha(path)
    scale = config.scale(r, alpha)
    n_in, n_out = layout.in_features, layout.out_features
    ka, kb = jax.random.split(key)
    if config.init_weights == "mica":  # dense and embedding modules alike (PEFT's Linear and Embedding)
        a, b = _mica_factors(path, layout, own, r)
    elif layout.kind == Kind.EMBED:
        # HF PEFT: for embeddings A is zero and B normal, so the start is the identity.
        if config.init_weights == "random":
            a = jax.random.normal(ka, (n_in, r), jnp.float32)
        else:
            a = jnp.zeros((n_in, r), jnp.float32)
        b = jax.random.normal(kb, (r, n_out), jnp.float32)
    elif config.init_weights == "gaussian":
        a = jax.random.normal(ka, (n_in, r), jnp.float32) / r
        b = jnp.zeros((r, n_out), jnp.float32)
    elif config.init_weights == "random":
        a = _kaiming_uniform(ka, (n_in, r), n_in)
        b = _kaiming_uniform(kb, (r, n_out), r)
    else:  # default; "pissa" is handled by jpeft.init_pissa
        a = _kaiming_uniform(ka, (n_in, r), n_in)
        b = jnp.zeros((r, n_out), jnp.float32)
    residual = config.init_weights if is_residual_init(config.init_weights) else None
    tie = bool(config.ensure_weight_tying) and layout.kind == Kind.EMBED
    bias = None
    if config.lora_bias:
        if layout.kind not in (Kind.DENSE, Kind.DENSE_GENERAL, Kind.CONV):
            raise ConfigError(
                f"LoraConfig.lora_bias=True cannot adapt the {layout.kind} module at {path!r}: the LoRA bias is for "
                "dense and convolution layers (Hugging Face PEFT refuses it on embeddings too). Leave this module out "
                "of target_modules (exclude_modules) or set lora_bias=False."
            )
        # PEFT: zero with the default init (the identity), torch.nn.Linear's own init (bound 1/sqrt(r)) otherwise
        bias = (jnp.zeros((n_out,), jnp.float32) if config.init_weights == "default"
                else _kaiming_uniform(jax.random.fold_in(kb, 1), (n_out,), r))
    node = LoraWeights(a, b, None, scale, layout, float(config.dropout), residual, tie, tied_output, bias,
                       frozen_b=config.init_weights == "mica")
    if config.use_dora:
        node = dora.with_magnitude(node, own)
    return node


def tied_head_scales(config: LoraConfig, path: str, r: int, alpha: float, *, hf_only: bool = False) -> Optional[str]:
    """With ``ensure_weight_tying``, PEFT gives ``lm_head`` a LoRA sharing the embedding at
    ``path``'s factors and scales it by ``lm_head``'s own ``rank_pattern`` / ``alpha_pattern``
    entry; jpeft's tied site has one scale. ``None`` when the two scales agree, else the two
    settings, said for an error."""
    r_h, a_h = config.rank_alpha("lm_head", hf_only=hf_only)
    if math.isclose(config.scale(r, alpha), config.scale(r_h, a_h), rel_tol=1e-6):
        return None
    return (f"{hf_name(path)} r={r}, alpha={alpha:g} (scale {config.scale(r, alpha):g}) and lm_head r={r_h}, "
            f"alpha={a_h:g} (scale {config.scale(r_h, a_h):g})")


def _selects(config: LoraConfig, path: str, own: Mapping[str, Any], infos) -> bool:
    """``config.selects(path)``; for a site inside a layer scan (``model/layers/...``, which has
    no layer index) whether any of its layers' own names (``model/layers_0/...``) is selected:
    ``layers_to_transform`` naming every layer keeps the site, and one naming only some is
    refused by name in :func:`jpeft.scan.make_site` instead of dropping the site."""
    info = infos.get(path) if infos is not None else None
    names = layer_paths(path, info.layout, own) if info is not None and info.layout is not None else None
    if names:
        return any(config.selects(n) for n in names)
    return config.selects(path)


def _warn_unmatched_layers(config: LoraConfig, paths, leaves, infos) -> None:
    """A ``RuntimeWarning`` naming the ``layers_to_transform`` indices that no targeted module sits in
    (``[0, 5]`` on a 2-layer model adapted layer 0 alone, without a word; PEFT ignores them too), as
    :func:`jpeft.tree.select` names an unmatched ``target_modules`` entry."""
    ltt = config.layers_to_transform
    if ltt is None:
        return
    seen = set()
    for p in paths:
        info = infos.get(p) if infos is not None else None
        names = layer_paths(p, info.layout, leaves[p]) if info is not None and info.layout is not None else None
        seen |= {config.layer_index(n) for n in (names or [p])}
    missing = [int(i) for i in (ltt if isinstance(ltt, tuple) else (ltt,)) if i not in seen]
    if missing:
        warnings.warn(
            f"layers_to_transform {missing} select no layer of the targeted modules (their layer indices: "
            f"{sorted(i for i in seen if i is not None)}); those entries are ignored, as Hugging Face PEFT ignores "
            "them. Check the indices (they count from 0) and layers_pattern.", RuntimeWarning, stacklevel=3)


def _warn_unused_exclude(config: LoraConfig, leaves, infos) -> None:
    """A ``RuntimeWarning`` when ``exclude_modules`` names no module of the model (PEFT warns
    "no modules were excluded" too): a regex written for jpeft's paths (``model/layers_0/.*``;
    PEFT's, and so jpeft's, is matched against the dotted name) or a typo would otherwise adapt
    the modules the user meant to leave out, without a word."""
    if config.exclude_modules is None:
        return
    names = set()
    for p, own in leaves.items():
        info = infos.get(p) if infos is not None else None
        for n in (layer_paths(p, info.layout, own) if info is not None and info.layout is not None else None) or [p]:
            parts = n.split("/")
            names.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))  # PEFT matches every named module
    if any(config.excludes(n) for n in names):
        return
    warnings.warn(
        f"exclude_modules={config.exclude_modules!r} names no module of this model, so nothing is excluded (Hugging "
        "Face PEFT warns the same). It is matched as in PEFT: a regex in full against the dotted module name (e.g. "
        f"{hf_name(sorted(leaves)[0])!r}, not the jpeft path {sorted(leaves)[0]!r}), a list by names ending the "
        "dotted name. Fix the names or the regex.", RuntimeWarning, stacklevel=3)


def init_lora(config: LoraConfig, params, key, infos):
    """``Method.init`` of LoRA: a :class:`LoraWeights` site per selected linear module, plus the
    :class:`SavedModule` and :class:`TrainableTokens` sites of ``modules_to_save``, ``bias`` and
    ``trainable_token_indices``."""
    leaves, cands = linear_candidates(params)
    cands = linear_only(config.target_modules, leaves, cands)
    paths = select(config.target_modules, cands, what="linear module (Dense, DenseGeneral, Conv, Einsum, Embed)")
    kept = [p for p in paths if _selects(config, p, leaves[p], infos)]
    if not kept and infos is None:
        for p in paths:  # a layer-scanned kernel has no layer index to filter without the model: LayoutError says so
            _inject.infer_layout(p, leaves[p])
    _warn_unmatched_layers(config, paths, leaves, infos)
    _warn_unused_exclude(config, leaves, infos)
    paths = kept
    if not paths:
        raise TargetNotFoundError(
            f"target_modules={config.target_modules!r} matched modules, but exclude_modules={config.exclude_modules!r} / "
            f"layers_to_transform={config.layers_to_transform!r} (layers_pattern={config.layers_pattern!r}) / "
            f"modules_to_save={list(config.modules_to_save or [])} (copied whole, not adapted) removed "
            "every one of them; widen those options."
        )
    # Keys go to sites in sorted path order, so the adapter does not depend on the params
    # dict's insertion order (jax.jit / eval_shape outputs come back with sorted keys).
    site_key = dict(zip(sorted(paths), jax.random.split(key, len(paths))))
    out = {}
    for path in paths:
        k = site_key[path]
        own = leaves[path]
        if infos is not None and path in infos and infos[path].layout is not None:
            layout = infos[path].layout
        elif infos is not None and path in infos:
            if infos[path].refusal:
                raise UnsupportedModuleError(infos[path].refusal)
            raise UnsupportedModuleError(
                f"module {path!r} is a {infos[path].cls_name}, not a module LoRA can adapt "
                "(nn.Dense, nn.DenseGeneral, nn.Conv, nn.Einsum, nn.Embed). Remove it from target_modules."
            )
        else:
            layout = _inject.infer_layout(path, own)
        if is_residual_init(config.init_weights) and not isinstance(own.get(layout.param_name), jax.core.Tracer):
            # Under jax.eval_shape (loading a saved PiSSA adapter, budgets) only the structure is
            # built; with concrete weights jpeft.init would silently keep the principal part twice.
            raise ConfigError(
                f"LoraConfig(init_weights={config.init_weights!r}) also changes the base weights (the initial adapter is taken out "
                f"of them); create it with jpeft.init_{config.init_weights.split('_')[0]}(config, params, key, ...), which returns "
                "(residual_params, adapter)."
            )
        # an embedding the model also reads through attend (tied output projection); unknown without the model.
        # Other layouts keep None whether or not the model was traced, so an adapter from jpeft.init(..., model, x)
        # and the same adapter loaded from disk have one tree structure (an optimizer state fits both)
        if layout.kind != Kind.EMBED:
            tied = None
        else:
            tied = embedding_tied(config, path, leaves, infos, "target_modules")
        ra = site_rank_alpha(config, path, layout, own)
        differ = (tied_head_scales(config, path, *ra)
                  if config.ensure_weight_tying and layout.kind == Kind.EMBED and tied is True else None)
        if differ:
            # a warning, not a refusal: adapters saved before save_adapter recorded lm_head's key rebuild through here
            warnings.warn(
                f"LoraConfig(ensure_weight_tying=True) shares the embedding's LoRA factors with the tied lm_head, and "
                f"rank_pattern / alpha_pattern give them different scales: {differ}. jpeft's tied site applies the "
                "embedding's scale at both ends; PEFT's get_peft_model with this config would scale lm_head's copy by "
                "lm_head's own (jpeft.hf.save_peft writes lm_head's key, so PEFT loads jpeft's model). Give lm_head "
                "the embedding's r and alpha (a pattern key for each) to train the model PEFT would.",
                UserWarning, stacklevel=4)
        out[path] = make_site(lambda kk, o: init_site(config, path, layout, kk, o, tied, ra), path, layout, k, own,
                              config)
    if config.modules_to_save:
        out.update(saved_modules(config, leaves, out, infos))
    if config.bias != "none":
        out = with_trainable_biases(config.bias, "LoraConfig.bias", leaves, out)
    if config.trainable_token_indices is not None:
        for path, ids in token_sites(config, leaves).items():
            if path in out:
                raise ConfigError(
                    f"the embedding {path!r} is both in target_modules / modules_to_save and in trainable_token_indices "
                    "(PEFT refuses that too); use one of them."
                )
            out[path] = init_tokens(leaves[path], ids, embedding_tied(config, path, leaves, infos, "trainable_token_indices"))
    return out


def budget_rows(model_type: str, targets: Mapping[str, Any]) -> list:
    """``Method.budget`` of LoRA: the budget table's LoRA, rsLoRA, DoRA and PiSSA rows on
    PEFT's default targets (and LoRA on every linear layer)."""
    qv, every = targets["lora"], targets["linear"]
    names = "+".join(qv)
    return [
        ("LoRA", f"r=8, alpha=16, {names}", lambda: LoraConfig(r=8, alpha=16, target_modules=qv)),
        ("LoRA", "r=8, alpha=16, all linear layers", lambda: LoraConfig(r=8, alpha=16, target_modules=every)),
        ("rsLoRA", f"r=8, alpha=16, {names}", lambda: LoraConfig(r=8, alpha=16, target_modules=qv, use_rslora=True)),
        ("DoRA", f"r=8, alpha=16, {names}", lambda: LoraConfig(r=8, alpha=16, target_modules=qv, use_dora=True)),
        ("PiSSA", f"r=8, alpha=8, {names}", lambda: LoraConfig(r=8, alpha=8, target_modules=qv, init_weights="pissa")),
    ]
