"""Hugging Face PEFT adapter folders in and out: ``adapter_config.json`` +
``adapter_model.safetensors`` exactly as ``peft`` writes and reads them.

* :func:`save_peft` writes a jpeft adapter so that ``peft.PeftModel.from_pretrained(model,
  path)`` loads it with no missing- or unexpected-key warning;
* :func:`load_peft` reads one (made by ``peft`` or by :func:`save_peft`) for a jpeft base.

Keys: an adapter site at jpeft module path ``p`` is saved under
``base_model.model.<hf_name(p)>.<tensor>``, e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``, in PyTorch's
orientation (``lora_A.weight: [r, in]``, ``lora_B.weight: [out, r]``; jpeft stores
``lora_A: [in, r]``, ``lora_B: [r, out]``). Embedding sites use ``lora_embedding_A: [r, num]``
and ``lora_embedding_B: [dim, r]``; DoRA adds ``lora_magnitude_vector: [out]`` and
``lora_bias=True`` adds ``lora_B.bias: [out]``.

Each method's format is a pair of functions in a small registry keyed by the Hugging Face
``peft_type`` (:func:`register_peft_format`), so a method adds its format from its own file.
LoRA (with rsLoRA, rank_pattern, alpha_pattern, DoRA, and GPT-2's ``fan_in_fan_out``) is
registered here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import _inject, scan
from jpeft.config import AdapterConfig, _as_targets
from jpeft.errors import (
    BaseMismatchError,
    CheckpointError,
    ConfigError,
    JpeftError,
    LoadError,
    SaveError,
    UnsafeFileError,
    UnsupportedAdapterError,
)
from jpeft.io import MAX_JSON_BYTES, open_regular, read_bounded, read_json, read_safetensors, safetensors_index
from jpeft.methods import pissa
from jpeft.methods.lora import LoraConfig, LoraWeights, SavedModule, TrainableTokens, tied_output_from_params, token_sites
from jpeft.tree import (compile_pattern, count, from_hf_name, hf_name, linear_only, matches, module_leaves,
                        regex_fullmatch, unwrap_params)

PEFT_PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# GPT-2's Conv1D modules (weights stored [in, out]); PEFT needs fan_in_fan_out=True for them.
_CONV1D = re.compile(r"(^|.*/)h_\d+/(attn/c_attn|attn/c_proj|mlp/c_fc|mlp/c_proj)$")


@dataclasses.dataclass(frozen=True)
class ExportContext:
    """What a format's ``to_hf`` may need besides the config and the adapter."""

    fan_in_fan_out: bool
    # the base's Hugging Face config.json when save_peft can read it (base_model_name_or_path is a local folder)
    hf_config: Optional[Mapping[str, Any]] = None


@dataclasses.dataclass(frozen=True)
class ImportContext:
    """What a format's ``from_hf`` may need: the base params' module leaves and the folder."""

    leaves: Mapping[str, Mapping[str, Any]]  # {module_path: {param_name: array}}
    folder: str
    dtype: Any


@dataclasses.dataclass(frozen=True)
class PeftFormat:
    config_cls: type
    to_hf: Callable[..., tuple[dict, dict]]
    from_hf: Callable[..., tuple[AdapterConfig, dict]]


_FORMATS: dict[str, PeftFormat] = {}


def register_peft_format(config_cls: type, *, to_hf: Callable, from_hf: Callable) -> None:
    """Registers the Hugging Face PEFT format of a method, keyed by ``config_cls.peft_type``.

    Args:
      config_cls: the method's config class (its ``peft_type`` is the Hugging Face one,
        e.g. ``"IA3"``, ``"PREFIX_TUNING"``).
      to_hf: ``to_hf(config, adapter, ctx: ExportContext) -> (config_dict, tensors)`` where
        ``config_dict`` holds the method's own ``adapter_config.json`` keys (``save_peft``
        adds ``peft_type``, ``task_type``, ``base_model_name_or_path``, ...) and ``tensors``
        maps full PEFT keys (use :func:`peft_key`) to numpy arrays in PyTorch orientation.
      from_hf: ``from_hf(config_dict, tensors, params, ctx: ImportContext) -> (config, adapter)``;
        ``tensors`` maps the file's keys to float32 numpy arrays. Raise
        :class:`~jpeft.errors.BaseMismatchError` (use :func:`check_keys`) when keys do not
        match the base.
    """
    peft_type = getattr(config_cls, "peft_type", "")
    if not peft_type:
        raise ConfigError(f"{config_cls.__name__} has no peft_type; set the Hugging Face PEFT type name on the class.")
    _FORMATS[peft_type] = PeftFormat(config_cls, to_hf, from_hf)


def supported_peft_types() -> list[str]:
    """The ``peft_type`` values :func:`save_peft` / :func:`load_peft` handle."""
    return sorted(_FORMATS)


def peft_key(path: str, tensor: str) -> str:
    """The PEFT state-dict key of ``tensor`` at jpeft module ``path``.

    >>> peft_key("model/layers_0/self_attn/q_proj", "lora_A.weight")
    'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'
    """
    return f"{PEFT_PREFIX}{hf_name(path)}.{tensor}"


def split_peft_key(key: str, tensor_names) -> Optional[tuple[str, str]]:
    """``(module_path, tensor)`` for a PEFT key ending in one of ``tensor_names``, else ``None``."""
    if not key.startswith(PEFT_PREFIX):
        return None
    rest = key[len(PEFT_PREFIX):]
    for t in sorted(tensor_names, key=len, reverse=True):
        if rest.endswith("." + t):
            return from_hf_name(rest[: -len(t) - 1]), t
    return None


def check_keys(adapter_paths, expected_paths, *, unmatched_keys=(), what: str = "adapter") -> None:
    """Raises :class:`~jpeft.errors.BaseMismatchError` listing the first unmatched names on
    both sides when ``adapter_paths`` (modules the file adapts) and ``expected_paths``
    (modules of the base the config targets) differ, or when ``unmatched_keys`` is non-empty."""
    a, e = set(adapter_paths), set(expected_paths)
    only_file = sorted({hf_name(p) for p in a - e}) + sorted(unmatched_keys)
    only_base = sorted(hf_name(p) for p in e - a)
    if only_file or only_base:
        hint = ""
        if any(".lm_head." in k or k.startswith("lm_head") for k in only_file):
            hint = (" (lm_head: with tie_word_embeddings the jpeft model computes logits with the input embedding "
                    "and has no separate lm_head module; adapt the embedding instead)")
        raise BaseMismatchError(
            f"the {what} does not match the base model: {len(only_file)} key(s) of the file have no matching module "
            f"in the base (first: {only_file[:5]}){hint}, and {len(only_base)} targeted module(s) of the base have no "
            f"weights in the file (first: {only_base[:5]}). Was the adapter trained on another model (or a different "
            "number of layers)? Load it on the base it was made for."
        )


# -- LoRA ------------------------------------------------------------------------------------

def _to_np(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(jnp.asarray(x, jnp.float32)))


def _hf_targets(config: LoraConfig, paths) -> Any:
    names = [hf_name(p) for p in paths]
    t = config.target_modules
    if isinstance(t, str):
        if all(regex_fullmatch(t, n) for n in names):
            return t
        return sorted(names)
    conv = [hf_name(str(x).replace(".", "/")) for x in t]
    # keep the user's names when Hugging Face's suffix rule selects every site with them
    if all(any(n == c or n.endswith("." + c) for c in conv) for n in names):
        return sorted(set(conv))
    return sorted(names)


def _saved_to_hf(path: str, node: SavedModule) -> dict:
    """PEFT's keys for a module of modules_to_save: the module's own PyTorch parameter names
    (PEFT saves the copy without its ``modules_to_save.<adapter>`` infix)."""
    out = {}
    for name, x in dict(node.params).items():
        x = _to_np(x)
        if name == "kernel" and x.ndim == 2:
            out[peft_key(path, "weight")] = x.copy() if _CONV1D.match(path) else x.T.copy()
        elif name in ("embedding", "scale") and x.ndim <= 2 or name == "bias" and x.ndim == 1:
            out[peft_key(path, "bias" if name == "bias" else "weight")] = x.copy()
        else:
            raise UnsupportedAdapterError(
                f"modules_to_save copy of {path!r} has a parameter {name!r} of shape {x.shape}; jpeft writes PEFT's "
                "copies of Dense, Embed and LayerNorm modules only (kernel, embedding, scale, bias)."
            )
    return out


def _saved_from_hf(path: str, t: Mapping[str, np.ndarray], own: Mapping[str, Any], folder: str, dtype) -> SavedModule:
    """A module of modules_to_save from PEFT's keys (``weight``/``bias``), checked against the base module."""
    want = "kernel" if "kernel" in own else "embedding" if "embedding" in own else "scale" if "scale" in own else None
    names = {"weight": want, "bias": "bias"}
    got = {names[k]: v for k, v in t.items()}
    if want is None or set(got) != set(own):
        raise CheckpointError(
            f"the adapter in {folder!r} saves a copy of {hf_name(path)!r} with {sorted(t)}, but the base module has "
            f"parameters {sorted(own)}; jpeft loads copies of Dense, Embed and LayerNorm modules with every parameter."
        )
    if want == "kernel" and got[want].ndim == 2 and not _CONV1D.match(path):
        got[want] = got[want].T
    for k, v in got.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise BaseMismatchError(
                f"the saved copy of {hf_name(path)!r} has {k} of shape {tuple(v.shape)}, the base module "
                f"{tuple(own[k].shape)}. Load the adapter on the base it was made for."
            )
    return SavedModule({k: jnp.asarray(v, dtype) for k, v in got.items()})


def _lora_to_hf(config: LoraConfig, adapter, ctx: ExportContext):
    tensors: dict[str, np.ndarray] = {}
    rank_pattern, alpha_pattern = {}, {}
    saved = {p: n for p, n in adapter.items() if isinstance(n, SavedModule)}
    for path, node in saved.items():
        if not config.saves(path) and not (config.bias == "all" and set(node.params) == {"bias"}):
            raise UnsupportedAdapterError(
                f"the adapter holds a full copy of {path!r}, but the config's modules_to_save="
                f"{list(config.modules_to_save or [])} does not name it; save with the config the adapter was made with."
            )
        tensors.update(_saved_to_hf(path, node))
    adapter = {p: n for p, n in adapter.items() if p not in saved}
    tokens = {p: n for p, n in adapter.items() if isinstance(n, TrainableTokens)}
    for path, node in tokens.items():
        _check_peft_token_tie(path, node)
        tensors[peft_key(path, _TOKENS_KEY)] = _to_np(node.values)
    token_indices = _hf_token_indices(config, tokens)
    adapter = {p: n for p, n in adapter.items() if p not in tokens}
    paths = sorted(adapter)
    tied = False
    for path in paths:
        node = adapter[path]
        if not isinstance(node, LoraWeights):
            raise UnsupportedAdapterError(
                f"a LoraConfig adapter holds a {type(node).__name__} at {path!r}; save each method's sites with its "
                "own config (split the adapter dict by method)."
            )
        r = node.r
        alpha = node.scale * (math.sqrt(r) if config.use_rslora else r)
        name = hf_name(path)
        if r != config.r:
            rank_pattern[re.escape(name)] = r
        if not math.isclose(alpha, config.alpha, rel_tol=1e-6):
            alpha_pattern[re.escape(name)] = float(alpha)
        if node.layout.kind == "embed":
            tensors[peft_key(path, "lora_embedding_A")] = _to_np(node.lora_A).T.copy()
            tensors[peft_key(path, "lora_embedding_B")] = _to_np(node.lora_B).T.copy()
            if node.tie_output and node.tied_output is not False:
                _check_peft_ties(path, node)
                # PEFT's ensure_weight_tying gives lm_head a LoRA sharing the embedding's factors
                tensors[peft_key("lm_head", "lora_A.weight")] = _to_np(node.lora_B).copy()
                tensors[peft_key("lm_head", "lora_B.weight")] = _to_np(node.lora_A).copy()
                tied = True
        elif node.layout.kind == "dense":
            tensors[peft_key(path, "lora_A.weight")] = _to_np(node.lora_A).T.copy()
            tensors[peft_key(path, "lora_B.weight")] = _to_np(node.lora_B).T.copy()
            if node.lora_bias is not None:
                tensors[peft_key(path, "lora_B.bias")] = _to_np(node.lora_bias)
            if node.base_bias is not None:
                if config.bias == "none":
                    raise UnsupportedAdapterError(
                        f"the site {path!r} trains its base bias, but the config says bias='none'; save with the config "
                        "the adapter was made with (bias='lora_only' or 'all')."
                    )
                tensors[peft_key(path, "base_layer.bias")] = _to_np(node.base_bias).reshape(-1)
        else:
            raise UnsupportedAdapterError(
                f"site {path!r} adapts a {node.layout.kind} kernel; the Hugging Face PEFT format is written for "
                "nn.Dense and nn.Embed sites (the layers of jpeft.models)."
            )
        if node.magnitude is not None:
            tensors[peft_key(path, "lora_magnitude_vector")] = _to_np(node.magnitude)
        if (node.lora_bias is not None) != config.lora_bias:
            raise UnsupportedAdapterError(
                f"the config says lora_bias={config.lora_bias}, but the site {path!r} "
                f"{'has' if node.lora_bias is not None else 'has no'} LoRA bias; PEFT records one lora_bias per adapter. "
                "Save with the config the adapter was made with."
            )
    init = _residual_init_for_peft(config, adapter, ctx)
    d = config.to_dict()
    d.pop("peft_type", None)
    d.update(
        target_modules=_hf_targets(config, paths),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        fan_in_fan_out=ctx.fan_in_fan_out,
        bias=config.bias,
        modules_to_save=list(config.modules_to_save) if config.modules_to_save else None,
        trainable_token_indices=token_indices,
        lora_bias=config.lora_bias,
        ensure_weight_tying=tied,
        # PEFT re-runs the init when it loads: True leaves the base alone; "pissa"/"olora" make it
        # recompute the residual base these factors are relative to (jpeft.init_pissa/init_olora)
        init_lora_weights=init,
    )
    return d, tensors


_TOKENS_KEY = "token_adapter.trainable_tokens_delta"


def _hf_token_indices(config: LoraConfig, tokens: Mapping[str, TrainableTokens]):
    """``trainable_token_indices`` as PEFT reads it: the config's list when one site holds it,
    else ``{dotted embedding name: ids}``."""
    if not tokens:
        if config.trainable_token_indices is not None:
            raise UnsupportedAdapterError(
                "the config sets trainable_token_indices, but the adapter has no trainable tokens; save with the "
                "config the adapter was made with."
            )
        return None
    if isinstance(config.trainable_token_indices, tuple) and len(tokens) == 1:
        (node,) = tokens.values()
        if node.indices == config.trainable_token_indices:
            return list(node.indices)
    return {hf_name(p): list(n.indices) for p, n in sorted(tokens.items())}


def _check_peft_token_tie(path, node):
    """PEFT applies trainable tokens to a tied output projection exactly when the model ties its
    word embeddings; refuse a site whose tie PEFT would not reproduce."""
    if node.tie_output is None:
        raise UnsupportedAdapterError(
            f"the trainable tokens at {path!r} do not know whether the model reads the embedding as its tied output "
            "projection (PEFT then uses the rows there too); create the adapter with jpeft.init(config, params, key, "
            "model, *example_inputs) or on jpeft.models params."
        )


def _check_peft_ties(path, node):
    if path != "model/embed_tokens" or node.tied_output is None:
        raise UnsupportedAdapterError(
            f"site {path!r} adapts the embedding and its tied output projection together (ensure_weight_tying), but "
            "PEFT ties the output projection's LoRA only for Llama-style models with tie_word_embeddings "
            "(model.embed_tokens -> lm_head); for this model its unmerged adapter changes the input embedding only. "
            "Use LoraConfig(ensure_weight_tying=False) to save an adapter PEFT reproduces."
        )
    if node.residual is not None or node.magnitude is not None:
        raise UnsupportedAdapterError(f"site {path!r}: a tied embedding LoRA is saved for PEFT as plain LoRA only.")


def _residual_init_for_peft(config, adapter, ctx: ExportContext):
    """``init_lora_weights`` to write: ``True``, or the residual init every site shares, after
    refusing what PEFT would rebuild differently on load."""
    kinds = {node.residual for node in adapter.values() if isinstance(node, LoraWeights)}
    if kinds == {None}:
        if config.init in ("pissa", "olora"):
            raise UnsupportedAdapterError(
                f"the config says init={config.init!r}, but the adapter's sites are not relative to a residual base "
                f"(they do not come from jpeft.init_{config.init}); PEFT would subtract the initial factors from the "
                "base on load. Save with the config the adapter was made with (init='default')."
            )
        return True
    if len(kinds) > 1:
        raise UnsupportedAdapterError(
            f"the adapter mixes sites relative to different bases ({sorted(map(str, kinds))}); PEFT records one "
            "init_lora_weights per adapter. Save the sites of each init as separate adapters."
        )
    (kind,) = kinds
    if kind.startswith("pissa_niter_"):
        raise UnsupportedAdapterError(
            f"this adapter comes from jpeft.init_pissa(..., niter={kind.rsplit('_', 1)[1]}): its base is the residual "
            "of a randomized SVD, which PEFT would redo with its own random draw on load (a different base). "
            "Re-create it with niter=None (exact SVD, which PEFT reproduces), or merge it "
            "(jpeft.merge(residual_params, adapter)) and save full weights with jpeft.models.save_pretrained."
        )
    embeds = [p for p, n in adapter.items() if isinstance(n, LoraWeights) and n.layout.kind == "embed"]
    if embeds:
        raise UnsupportedAdapterError(
            f"sites {embeds} are {kind} embeddings, but PEFT's LoRA Embedding layer has no {kind} init (it would load "
            "the factors onto the unchanged embedding). Leave embeddings out of target_modules for PiSSA/OLoRA."
        )
    if kind == "olora" and ctx.fan_in_fan_out:
        raise UnsupportedAdapterError(
            "PEFT's OLoRA init factors the stored weight without honouring fan_in_fan_out (GPT-2's Conv1D), so it "
            "cannot rebuild this adapter's base; use PiSSA (jpeft.init_pissa) or plain LoRA on GPT-2."
        )
    return kind


_LORA_TENSORS = ("lora_A.weight", "lora_B.weight", "lora_B.bias", "base_layer.bias", _TOKENS_KEY, "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
                 "base_layer.weight")


def _lora_from_hf(d: Mapping[str, Any], tensors: Mapping[str, np.ndarray], params, ctx: ImportContext):
    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    # the PEFT options jpeft does not implement, at anything but their "off" value (one list:
    # LoraConfig._unsupported_hf_options)
    bad = {k: d[k] for k, ok in LoraConfig._unsupported_hf_options.items()
           if k in d and k not in fields and not any(d[k] is v or (type(d[k]) is type(v) and d[k] == v) for v in ok)}
    if bad:
        raise UnsupportedAdapterError(
            f"the LoRA adapter in {ctx.folder!r} uses options jpeft cannot load: {bad}. Supported: plain LoRA, "
            "rsLoRA, DoRA, PiSSA/OLoRA, rank_pattern, alpha_pattern, ensure_weight_tying, exclude_modules, "
            "layers_to_transform/layers_pattern, lora_bias, modules_to_save, trainable_token_indices and bias."
        )
    hf_keys = {LoraConfig._hf_keys.get(n, n) for n in fields}
    kept = {k: v for k, v in d.items() if k in hf_keys}
    residual = _residual_of(kept.get("init_lora_weights", True), ctx.folder)
    kept["init_lora_weights"] = residual or True  # besides the residual inits, the init does not matter for loading
    tm = kept.get("target_modules")
    if tm is None:
        raise UnsupportedAdapterError(
            f"the LoRA adapter in {ctx.folder!r} has target_modules=null (PEFT's per-architecture default); "
            "set target_modules in adapter_config.json explicitly."
        )
    try:
        config = LoraConfig.from_dict(kept)
    except ConfigError as e:
        raise LoadError(f"{os.path.join(ctx.folder, CONFIG_FILE)!r}: {e}") from None

    by_site: dict[str, dict[str, np.ndarray]] = {}
    saved: dict[str, dict[str, np.ndarray]] = {}
    token_values: dict[str, np.ndarray] = {}
    biases: dict[str, np.ndarray] = {}  # bias="all": the biases of modules without a LoRA site
    unmatched = []
    for k, v in tensors.items():
        sp = split_peft_key(k, _LORA_TENSORS)
        if sp is None:
            sm = split_peft_key(k, ("weight", "bias")) if config.modules_to_save or config.bias == "all" else None
            if sm is not None and sm[0] in ctx.leaves and config.saves(sm[0]):
                saved.setdefault(sm[0], {})[sm[1]] = v
            elif sm is not None and sm[1] == "bias" and config.bias == "all" and "bias" in ctx.leaves.get(sm[0], {}):
                biases[sm[0]] = v
            else:
                unmatched.append(k)
            continue
        path, t = sp
        if t == "base_layer.weight":  # PEFT saves the base embedding next to an embedding LoRA; jpeft keeps params'
            continue
        if t == _TOKENS_KEY:
            token_values[path] = v
            continue
        by_site.setdefault(path, {})[t] = v
    leaves = ctx.leaves
    tied_paths = _take_tied_output(d, by_site, leaves, ctx.folder)
    candidates = [p for p, own in leaves.items() if "kernel" in own or "embedding" in own]
    candidates = linear_only(config.target_modules, leaves, candidates)
    expected = [p for p in candidates if config.selects(p)]
    unknown = [p for p in by_site if p not in leaves]
    check_keys([p for p in by_site if p in leaves], expected,
               unmatched_keys=unmatched + [k for p in unknown for k in _keys_of(p, by_site[p])])

    adapter = {}
    for path in sorted(by_site):
        t = by_site[path]
        own = leaves[path]
        layout = _inject.infer_layout(path, own)
        if layout.kind == "embed":
            need = ("lora_embedding_A", "lora_embedding_B")
        else:
            need = ("lora_A.weight", "lora_B.weight")
        miss = [n for n in need if n not in t]
        if miss:
            raise BaseMismatchError(
                f"adapter site {hf_name(path)!r} lacks {miss} (found {sorted(t)}); the base module is a "
                f"{layout.kind} layer. Was the adapter made for another architecture?"
            )
        a = np.asarray(t[need[0]]).T  # [in, r]
        b = np.asarray(t[need[1]]).T  # [r, out]
        r_cfg, alpha = config.rank_alpha(path)
        if a.shape[1] != b.shape[0] or a.shape[1] != r_cfg:
            raise CheckpointError(
                f"adapter site {hf_name(path)!r}: lora_A has rank {a.shape[1]}, lora_B rank {b.shape[0]}, "
                f"adapter_config.json says r={r_cfg}. The files do not belong together."
            )
        if (a.shape[0], b.shape[1]) != (layout.in_features, layout.out_features):
            raise BaseMismatchError(
                f"adapter site {hf_name(path)!r} maps {a.shape[0]} -> {b.shape[1]} features, but the base module "
                f"maps {layout.in_features} -> {layout.out_features}. Load the adapter on the base it was made for."
            )
        mag = t.get("lora_magnitude_vector")
        if config.use_dora and mag is None:
            raise CheckpointError(f"use_dora is set but site {hf_name(path)!r} has no lora_magnitude_vector.")
        base_bias = None
        if config.bias != "none" and "bias" in own:  # PEFT keeps the base's value for a bias missing from the file
            base_bias = np.asarray(t.get("base_layer.bias", own["bias"]), np.float32).reshape(np.shape(own["bias"]))
        elif "base_layer.bias" in t:
            raise CheckpointError(
                f"adapter site {hf_name(path)!r} carries a trained base_layer.bias, but adapter_config.json says "
                f"bias={config.bias!r}{'' if 'bias' in own else ' and the base module has no bias'}. The files do not belong together."
            )
        bias = t.get("lora_B.bias")
        if (bias is not None) != config.lora_bias or (bias is not None and bias.shape != (layout.out_features,)):
            raise CheckpointError(
                f"adapter site {hf_name(path)!r}: adapter_config.json says lora_bias={config.lora_bias}, the file "
                f"{'has a lora_B.bias of shape ' + str(tuple(bias.shape)) if bias is not None else 'has no lora_B.bias'}"
                f" (the module has {layout.out_features} outputs). The files do not belong together."
            )
        adapter[path] = LoraWeights(
            jnp.asarray(a, ctx.dtype), jnp.asarray(b, ctx.dtype),
            None if mag is None or not config.use_dora else jnp.asarray(mag, ctx.dtype),
            config.scale(r_cfg, alpha), layout, float(config.dropout),
            residual if layout.kind != "embed" else None,
            path in tied_paths,
            tied_output_from_params(path, leaves) if layout.kind == "embed" else None,
            None if bias is None else jnp.asarray(bias, ctx.dtype),
            None if base_bias is None else jnp.asarray(base_bias, ctx.dtype),
        )
    for path in sorted(saved):
        adapter[path] = _saved_from_hf(path, saved[path], leaves[path], ctx.folder, ctx.dtype)
    adapter.update(_tokens_from_hf(config, token_values, leaves, ctx))
    for path, v in biases.items():
        if path in adapter:
            continue  # a module of modules_to_save holds its bias already
        b = leaves[path]["bias"]
        if tuple(np.shape(v)) != tuple(np.shape(b)):
            raise BaseMismatchError(f"the bias of {hf_name(path)!r} has shape {np.shape(v)}, the base's {tuple(np.shape(b))}.")
        adapter[path] = SavedModule({"bias": jnp.asarray(v, ctx.dtype)})
    if config.bias == "all":  # PEFT trains every bias; one missing from the file keeps the base's value
        for path, own in leaves.items():
            if path not in adapter and "bias" in own:
                adapter[path] = SavedModule({"bias": jnp.asarray(np.asarray(own["bias"], np.float32), ctx.dtype)})
    return config, adapter


def _tokens_from_hf(config: LoraConfig, values: Mapping[str, np.ndarray], leaves, ctx: ImportContext) -> dict:
    """The TrainableTokens sites of a PEFT file (``...token_adapter.trainable_tokens_delta``)."""
    want = token_sites(config, leaves) if config.trainable_token_indices is not None else {}
    if set(want) != set(values):
        raise BaseMismatchError(
            f"the adapter in {ctx.folder!r} has trainable tokens for {sorted(hf_name(p) for p in values)}, but its "
            f"trainable_token_indices select {sorted(hf_name(p) for p in want)} in this base. Load it on the base it "
            "was made for."
        )
    out = {}
    for path, ids in want.items():
        v = np.asarray(values[path])
        e = leaves[path]["embedding"]
        if v.shape != (len(ids), e.shape[1]) or max(ids) >= e.shape[0]:
            raise BaseMismatchError(
                f"the trainable tokens of {hf_name(path)!r} have shape {v.shape} for ids {list(ids)[:8]}, but the base "
                f"embedding is {tuple(e.shape)}. Load the adapter on the base it was made for."
            )
        out[path] = TrainableTokens(jnp.asarray(v, ctx.dtype), tuple(ids), bool(tied_output_from_params(path, leaves)))
    return out


def _take_tied_output(d, by_site, leaves, folder) -> set:
    """PEFT's ``ensure_weight_tying=True`` on a Llama-style tied model also gives ``lm_head`` a
    LoRA whose factors are the embedding's, transposed: check that, drop those keys (jpeft
    applies the embedding site at ``attend`` too) and return the tied embedding paths."""
    head = by_site.get("lm_head")
    if head is None or "lm_head" in leaves:
        return set()
    emb = by_site.get("model/embed_tokens", {})
    if not d.get("ensure_weight_tying") or "lora_embedding_A" not in emb or set(head) != {"lora_A.weight", "lora_B.weight"}:
        raise BaseMismatchError(
            f"the adapter in {folder!r} has LoRA weights for lm_head, but this base ties lm_head to "
            "model.embed_tokens (no lm_head of its own); jpeft loads such weights only as PEFT's ensure_weight_tying "
            "copy of a model.embed_tokens LoRA. Load the adapter on a base with tie_word_embeddings=False."
        )
    same = (np.array_equal(head["lora_A.weight"], emb["lora_embedding_B"].T)
            and np.array_equal(head["lora_B.weight"], emb["lora_embedding_A"].T))
    if not same:
        raise CheckpointError(
            f"the adapter in {folder!r} says ensure_weight_tying=True, but lm_head's LoRA factors differ from "
            "model.embed_tokens' (transposed); the file is inconsistent. Re-save it with PEFT."
        )
    del by_site["lm_head"]
    return {"model/embed_tokens"}


# PEFT inits that leave the base weight alone: the file's factors are all there is to load
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


def _residual_of(init, folder) -> Optional[str]:
    """``None`` for an init that leaves the base alone, ``"pissa"``/``"olora"`` for one whose
    residual base jpeft recomputes as PEFT does; a named error for the others."""
    if any(init is v or (isinstance(init, str) and init == v) for v in _PLAIN_INITS):
        return None
    if init in ("pissa", "olora"):
        return init
    convert = (
        "Convert it with PEFT to a plain LoRA relative to the original base: "
        "peft_model.save_pretrained(out, path_initial_model_for_weight_conversion=<folder of the adapter saved before "
        "training>), then load `out`."
    )
    if isinstance(init, str) and init.startswith(("pissa_niter_", "corda", "loftq")):
        raise UnsupportedAdapterError(
            f"the LoRA adapter in {folder!r} was saved with init_lora_weights={init!r}: its factors are relative to a "
            "base PEFT rebuilds on load with a randomized SVD, data statistics or quantization, which jpeft cannot "
            f"reproduce. {convert}"
        )
    raise UnsupportedAdapterError(
        f"the LoRA adapter in {folder!r} has init_lora_weights={init!r}, which jpeft does not know; supported: "
        f"{list(_PLAIN_INITS)}, 'pissa' and 'olora'. {convert}"
    )


def _keys_of(path, t):
    return [peft_key(path, n) for n in sorted(t)]


register_peft_format(LoraConfig, to_hf=_lora_to_hf, from_hf=_lora_from_hf)


# -- save / load -------------------------------------------------------------------------------------

_ENCODER_ROOTS = ("bert",)
_DECODER_ROOTS = ("model", "transformer")
# PEFT task types that load and run on jpeft.models' bases, by (base kind, method kind);
# "SEQ_CLS" also needs the classifier PEFT keeps as a module to save (written from params).
_TASKS = {
    ("decoder", "linear"): (None, "CAUSAL_LM"),
    ("decoder", "prompt"): ("CAUSAL_LM",),
    ("decoder", "prefix"): ("CAUSAL_LM",),
    ("encoder", "linear"): (None, "FEATURE_EXTRACTION", "SEQ_CLS"),
    ("encoder", "prompt"): ("FEATURE_EXTRACTION", "SEQ_CLS"),
    ("encoder", "prefix"): (),  # PEFT's prefix tuning cannot build BERT's past_key_values
}
_DEFAULT_TASK = {"decoder": "CAUSAL_LM", "encoder": "FEATURE_EXTRACTION"}


def _base_kind(paths, params) -> Optional[str]:
    """``"encoder"`` (BERT), ``"decoder"`` (Llama family, GPT-2) or ``None`` when neither the
    params nor the adapter's site paths tell."""
    roots = set(unwrap_params(params)[0]) if params is not None else {p.split("/")[0] for p in paths if p}
    if roots & set(_ENCODER_ROOTS):
        return "encoder"
    if roots & set(_DECODER_ROOTS):
        return "decoder"
    return None


def _task_type(config, paths, params, requested, fmt_choice) -> Optional[str]:
    kind = _base_kind(paths, params)
    method = {"PREFIX_TUNING": "prefix", "PROMPT_TUNING": "prompt"}.get(config.peft_type, "linear")
    if requested == "auto":
        task = fmt_choice or _DEFAULT_TASK.get(kind, "CAUSAL_LM" if method != "linear" else None)
    else:
        task = requested
    ok = _TASKS.get((kind, method))
    if ok is not None and task not in ok:
        can = "nothing (PEFT cannot build this method for it)" if not ok else f"task_type in {list(ok)}"
        raise UnsupportedAdapterError(
            f"PEFT cannot load a {config.peft_type} adapter with task_type={task!r} on this {kind} base (jpeft.models' "
            f"{'BERT' if kind == 'encoder' else 'Llama/Mistral/Qwen2/GPT-2'}): it can take {can}. Nothing was written."
        )
    return task


def _classifier_tensors(config, params, prefix: str) -> dict:
    """The frozen classifier PEFT's SEQ_CLS keeps as a module to save, from the base params."""
    if params is None:
        raise UnsupportedAdapterError(
            "task_type='SEQ_CLS' makes PEFT load the classifier as a module to save: pass params= (the base the "
            "adapter was trained on) so save_peft can write it. Nothing was written."
        )
    own = module_leaves(unwrap_params(params)[0]).get("classifier")
    if own is None or "kernel" not in own:
        raise UnsupportedAdapterError("task_type='SEQ_CLS' needs a 'classifier' Dense in the base params; none was found.")
    out = {f"{prefix}classifier.weight": _to_np(own["kernel"]).T.copy()}
    if "bias" in own:
        out[f"{prefix}classifier.bias"] = _to_np(own["bias"]).copy()
    return out


def _take_frozen_classifier(d: Mapping[str, Any], tensors: dict, leaves, folder: str, prefix: str) -> None:
    """Removes from ``tensors`` the classifier a SEQ_CLS adapter file carries as PEFT's module to
    save, after checking it equals the base's (jpeft trains no copy of it); a trained copy or
    any other module to save is refused by name."""
    mts = d.get("modules_to_save") or []
    keys = [k for k in tensors if k[len(prefix):] in ("classifier.weight", "classifier.bias", "score.weight", "score.bias")
            and k.startswith(prefix)]
    if not mts and not keys:
        return
    if d.get("peft_type") == "LORA":  # LoRA loads modules_to_save; an untrained classifier copy is dropped below
        keys = [k for k in keys if _equals_base_classifier(k[len(prefix):], tensors[k], leaves.get("classifier", {}))]
        for k in keys:
            del tensors[k]
        return
    if not set(mts) <= {"classifier", "score"}:
        raise UnsupportedAdapterError(
            f"the adapter in {folder!r} has modules_to_save={list(mts)} (trainable full copies of modules), which jpeft "
            "does not load; only SEQ_CLS's untrained classifier copy is accepted."
        )
    own = leaves.get("classifier", {})
    for k in keys:
        name = k[len(prefix):]
        base = own.get({"classifier.weight": "kernel", "classifier.bias": "bias"}.get(name, ""))
        want = None if base is None else (np.asarray(base, np.float32).T if name.endswith("weight") else np.asarray(base, np.float32))
        if want is None or want.shape != tensors[k].shape or not np.allclose(tensors[k], want, atol=1e-6):
            raise UnsupportedAdapterError(
                f"the adapter in {folder!r} carries a trained copy of {name.rsplit('.', 1)[0]!r} (modules_to_save), which "
                "jpeft does not load; it differs from the base's. Only adapters that leave the classifier frozen load."
            )
        del tensors[k]


def _equals_base_classifier(name: str, x: np.ndarray, own) -> bool:
    base = own.get({"classifier.weight": "kernel", "classifier.bias": "bias"}.get(name, ""))
    want = None if base is None else (np.asarray(base, np.float32).T if name.endswith("weight") else np.asarray(base, np.float32))
    return want is not None and want.shape == x.shape and bool(np.allclose(x, want, atol=1e-6))


def save_peft(path: str, config: AdapterConfig, adapter: Mapping[str, Any], *, base_model_name_or_path: Optional[str] = None,
              task_type: Optional[str] = "auto", fan_in_fan_out: Optional[bool] = None, params=None) -> None:
    """Writes ``adapter`` as a Hugging Face PEFT folder (``adapter_config.json`` +
    ``adapter_model.safetensors``, float32) that ``peft.PeftModel.from_pretrained`` loads on
    the matching transformers model.

    Args:
      path: the folder (created; existing adapter files in it are replaced atomically).
      config: the adapter's method config (e.g. :class:`jpeft.LoraConfig`).
      adapter: the adapter dict from :func:`jpeft.init` / training, for a jpeft.models base
        (sites of a layer-scanned model are written per layer, as PEFT names them).
      base_model_name_or_path: recorded in adapter_config.json (where the base lives).
      task_type: PEFT's task type; ``"auto"`` writes the config's own ``task_type`` (prefix and
        prompt tuning) or ``"CAUSAL_LM"`` for decoders and ``"FEATURE_EXTRACTION"`` for BERT.
        A type PEFT cannot load for the base and method (e.g. ``"CAUSAL_LM"`` on BERT, any
        prefix tuning on BERT) is refused before anything is written; ``"SEQ_CLS"`` needs
        ``params`` to write the frozen classifier PEFT expects as a module to save.
      fan_in_fan_out: written for PEFT; ``None`` sets it when the sites are GPT-2 Conv1D layers.
      params: the base params (optional): tell the base's kind for prompt/prefix adapters and
        give the classifier for ``"SEQ_CLS"``.

    Raises:
      UnsupportedAdapterError: a method without a registered format, or sites PEFT cannot express.
      SaveError: writing failed (the previous files are left intact).
    """
    if not isinstance(config, AdapterConfig):
        raise ConfigError(f"save_peft needs the adapter's config (e.g. jpeft.LoraConfig), found {type(config).__name__}.")
    if not adapter:
        raise ConfigError("save_peft got an empty adapter; there is nothing to save.")
    fmt = _FORMATS.get(config.peft_type)
    if fmt is None:
        raise UnsupportedAdapterError(
            f"no Hugging Face PEFT format is registered for peft_type {config.peft_type!r}; supported: "
            f"{supported_peft_types()}."
        )
    if scan.is_stacked(adapter):  # PEFT names layers one by one: model.layers.{i}....
        adapter = scan.unstack_adapter(adapter)
    paths = sorted(adapter)
    if fan_in_fan_out is None:
        conv = [bool(_CONV1D.match(p)) for p in paths]
        fan_in_fan_out = any(conv)
    # "auto": the config's own choice (prefix/prompt tuning configs may carry one) or the base's default
    task = _task_type(config, paths, params, task_type, getattr(config, "task_type", None))
    d, tensors = fmt.to_hf(config, adapter, ExportContext(bool(fan_in_fan_out), _local_hf_config(base_model_name_or_path)))
    d = dict(d)
    d["peft_type"] = config.peft_type
    d["base_model_name_or_path"] = base_model_name_or_path
    d["task_type"] = task
    if d["task_type"] == "SEQ_CLS":
        prompt_learning = config.peft_type in ("PREFIX_TUNING", "PROMPT_TUNING")
        # a trained copy of the classifier (LoRA's modules_to_save) wins over the base's
        tensors = dict(_classifier_tensors(config, params, "base_model." if prompt_learning else PEFT_PREFIX), **tensors)
        d["modules_to_save"] = list(dict.fromkeys(list(d.get("modules_to_save") or []) + ["classifier", "score"]))
    d.setdefault("inference_mode", True)
    d.setdefault("revision", None)
    from safetensors.numpy import save_file

    config_bytes = json.dumps(d, indent=2, sort_keys=True).encode()
    tmp = None
    try:
        os.makedirs(path, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=_SAVE_PREFIX, dir=path)
        with open(os.path.join(tmp, CONFIG_FILE), "wb") as f:
            f.write(config_bytes)
        # the weights name their config, so a kill between the two replaces below is finished on load
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.path.join(tmp, WEIGHTS_FILE),
                  metadata={"format": "pt", _CONFIG_HASH: hashlib.sha256(config_bytes).hexdigest()})
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            os.replace(os.path.join(tmp, name), os.path.join(path, name))
    except OSError as e:
        raise SaveError(f"could not write the adapter to {path!r}: {e}. The previous files are left as they were.") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


_SAVE_PREFIX = ".jpeft_save_"
_CONFIG_HASH = "jpeft_config_sha256"


def _finish_interrupted_save(path: str) -> None:
    """A :func:`save_peft` killed between its two replaces leaves the new weights beside the old
    ``adapter_config.json``, with the new config still in its temporary folder: the weights'
    header names the SHA-256 of their config, so that config is put in place here."""
    wpath, cpath = os.path.join(path, WEIGHTS_FILE), os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(wpath) or not any(n.startswith(_SAVE_PREFIX) for n in os.listdir(path)):
        return
    want = safetensors_index(wpath)[1].get(_CONFIG_HASH)

    def sha(f):
        fd = open_regular(f, what="adapter_config.json")
        try:
            return hashlib.sha256(read_bounded(fd, MAX_JSON_BYTES + 1)).hexdigest()
        finally:
            os.close(fd)

    if not want or (os.path.isfile(cpath) and sha(cpath) == want):
        return
    for name in sorted(os.listdir(path)):
        cand = os.path.join(path, name, CONFIG_FILE)
        if name.startswith(_SAVE_PREFIX) and os.path.isfile(cand) and sha(cand) == want:
            os.replace(cand, cpath)
            shutil.rmtree(os.path.join(path, name), ignore_errors=True)
            return


def _local_hf_config(base) -> Optional[dict]:
    """The base's config.json when ``base`` is a local model folder, else ``None``."""
    if not isinstance(base, str) or not os.path.isfile(os.path.join(base, "config.json")):
        return None
    return read_json(os.path.join(base, "config.json"), what="config.json")


def read_peft_config(path: str) -> dict:
    """The parsed ``adapter_config.json`` of an adapter folder (named errors when absent/bad)."""
    if not os.path.isdir(path):
        raise LoadError(f"{path!r} is not a folder; pass the folder holding adapter_config.json.")
    try:
        _finish_interrupted_save(path)
    except JpeftError:
        raise
    except OSError as e:
        raise LoadError(f"cannot finish an interrupted save in {path!r}: {e}") from None
    cpath = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(cpath):
        raise LoadError(f"{path!r} has no adapter_config.json (found {sorted(os.listdir(path))[:10]}); it is not a PEFT adapter folder.")
    return read_json(cpath, what="adapter_config.json")


def _read_tensors(path: str, base_numel: int) -> dict[str, np.ndarray]:
    wpath = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(wpath):
        bins = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth"))]
        if bins:
            raise UnsafeFileError(
                f"{path!r} holds only pickle weights {bins}; jpeft reads adapter_model.safetensors only (unpickling can "
                "run code). Re-save with peft: model.save_pretrained(path, safe_serialization=True)."
            )
        raise LoadError(f"{path!r} has no {WEIGHTS_FILE}; save the adapter with weights next to adapter_config.json.")
    # The header is checked before any data is read: an adapter cannot hold more numbers than the
    # whole base model, so a (sparse) file declaring more is refused without allocating it.
    try:
        declared = sum(math.prod(shape) for _, shape, _, _ in safetensors_index(wpath)[0].values())
        if declared > max(base_numel, 1):
            raise CheckpointError(
                f"it declares {declared:,} adapter numbers, more than the {base_numel:,} parameters of the whole base model"
            )
        arrays, _ = read_safetensors(wpath)
    except CheckpointError as e:
        raise CheckpointError(f"cannot read {wpath!r}: {e}. The file is truncated or corrupted; copy it again.") from None
    return {k: np.asarray(v, np.float32) for k, v in arrays.items()}


# adapter_config.json keys read by jpeft's formats, and the JSON types their values may have
_VALUE_TYPES = {
    "r": (int,), "lora_alpha": (int, float), "lora_dropout": (int, float), "use_rslora": (bool,),
    "use_dora": (bool,), "fan_in_fan_out": (bool,), "bias": (str,), "target_modules": (str, list, type(None)),
    "rank_pattern": (dict, type(None)), "alpha_pattern": (dict, type(None)), "modules_to_save": (list, type(None)),
    "feedforward_modules": (str, list, type(None)), "task_type": (str, type(None)),
}


def check_config_values(d: Mapping[str, Any], where: str) -> None:
    """Checks the types of a loaded ``adapter_config.json``'s values before any format reads
    them: a wrongly typed value, a regex RE2 rejects, or a non-finite alpha is a
    :class:`~jpeft.errors.LoadError` that names the key (never a raw TypeError or ``re.error``)."""
    for k, types in _VALUE_TYPES.items():
        v = d.get(k)
        if k in d and (not isinstance(v, types) or (isinstance(v, bool) and bool not in types)):
            want = " or ".join("null" if t is type(None) else {"str": "a string", "list": "a list", "dict": "an object",
                                                               "int": "an integer", "float": "a number",
                                                               "bool": "true/false"}[t.__name__] for t in types)
            raise LoadError(f"{where}: {k!r} must be {want}, found {type(v).__name__} {str(v)[:80]}.")
    try:
        for k in ("target_modules", "feedforward_modules"):
            if d.get(k) is not None:
                _as_targets(d[k], k)
        for k in ("rank_pattern", "alpha_pattern"):
            for pat, v in (d.get(k) or {}).items():
                compile_pattern(pat)
                # rank_pattern: LoRA's ranks, or AdaLoRA's kept-triplet masks (checked by its config)
                ok = ((isinstance(v, int) and v > 0) or (isinstance(v, list) and all(isinstance(b, bool) for b in v))) \
                    if k == "rank_pattern" else (isinstance(v, (int, float)) and 0 < v <= float(np.finfo(np.float32).max))
                if isinstance(v, bool) or not ok:
                    raise ConfigError(f"{k}[{pat!r}] must be a positive {'integer' if k == 'rank_pattern' else 'finite number'}, "
                                      f"found {str(v)[:80]}")
        if "lora_alpha" in d and not 0 < d["lora_alpha"] <= float(np.finfo(np.float32).max):
            raise ConfigError(f"'lora_alpha' must be a positive finite number, found {d['lora_alpha']!r}")
    except ConfigError as e:
        raise LoadError(f"{where}: {e}") from None


def _load(path: str, params, dtype=jnp.float32) -> tuple[AdapterConfig, dict]:
    """The parsing behind :func:`load_peft` and :func:`load_peft_with_base` (see there)."""
    d = read_peft_config(path)
    check_config_values(d, os.path.join(path, CONFIG_FILE))
    ptype = d.get("peft_type")
    fmt = _FORMATS.get(ptype) if isinstance(ptype, str) else None
    if fmt is None:
        raise UnsupportedAdapterError(
            f"adapter type {ptype!r} in {path!r} is not supported by jpeft.hf; supported peft_type values: "
            f"{supported_peft_types()}."
        )
    inner, _ = unwrap_params(params)
    tensors = _read_tensors(path, count(inner))
    prefix = "base_model." if ptype in ("PREFIX_TUNING", "PROMPT_TUNING") else PEFT_PREFIX
    _take_frozen_classifier(d, tensors, module_leaves(inner), path, prefix)  # SEQ_CLS's copy of the base's classifier
    n_scanned = scan.num_stacked_layers(inner)
    if n_scanned is not None:  # a layer-scanned base: read per layer, then stack (jpeft.scan)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), inner)
        unrolled = scan.unstack_params(abstract)
        ctx = ImportContext(module_leaves(unrolled), path, dtype)
        config, adapter = fmt.from_hf(d, tensors, {"params": unrolled}, ctx)
        return config, scan.stack_adapter(adapter, n_scanned)
    ctx = ImportContext(module_leaves(inner), path, dtype)
    return fmt.from_hf(d, tensors, params, ctx)


def _residual_kind(adapter) -> Optional[str]:
    kinds = {getattr(n, "residual", None) for n in adapter.values()} - {None}
    return next(iter(kinds)) if kinds else None


def load_peft(path: str, params, *, dtype=jnp.float32) -> tuple[AdapterConfig, dict]:
    """Reads a Hugging Face PEFT adapter folder for a jpeft base.

    Args:
      path: folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
      params: the base (``{"params": ...}`` or bare) from :func:`jpeft.models.from_pretrained`;
        for a layer-scanned base the per-layer sites are stacked (:mod:`jpeft.scan`).
      dtype: dtype of the adapter arrays.

    Returns:
      ``(config, adapter)``: ``jpeft.apply(model, params, adapter, ids)`` gives the output of
      PEFT's unmerged ``PeftModel.from_pretrained``. lora_alpha, use_rslora, rank_pattern,
      alpha_pattern, DoRA and ensure_weight_tying are honoured.

    Raises:
      LoadError: missing folder/files or malformed config; UnsafeFileError: pickle only.
      UnsupportedAdapterError: a ``peft_type`` or option jpeft does not support (the
        supported types are listed), or a PiSSA/OLoRA adapter, which needs the residual base
        :func:`load_peft_with_base` returns.
      BaseMismatchError: the adapter's keys do not match the base (first unmatched keys on
        both sides are listed).
      CheckpointError: a truncated or corrupted weights file.
    """
    config, adapter = _load(path, params, dtype)
    kind = _residual_kind(adapter)
    if kind is not None:
        raise UnsupportedAdapterError(
            f"the adapter in {path!r} was saved with init_lora_weights={kind!r}: its factors are relative to the residual "
            f"base (the base minus its initial {kind} factors) that PEFT recomputes when it loads the adapter, so it "
            "cannot be applied to the original params. Use jpeft.hf.load_peft_with_base(path, params), which returns "
            "(config, residual_params, adapter), or convert it in PEFT with save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...) into a plain LoRA on the original base."
        )
    return config, adapter


def load_peft_with_base(path: str, params, *, dtype=jnp.float32) -> tuple[AdapterConfig, Any, dict]:
    """Like :func:`load_peft`, and also returns the base the adapter applies to, as
    ``peft.PeftModel.from_pretrained`` builds it: for an adapter saved with
    ``init_lora_weights="pissa"`` or ``"olora"`` the targeted kernels become the residual
    ``W - s A0 B0`` (``A0, B0``: the exact SVD / QR factors of ``W``, as PEFT computes them on
    load); for any other adapter ``params`` is returned unchanged.

    Returns:
      ``(config, params_for_the_adapter, adapter)``.

    Raises:
      as :func:`load_peft`; UnsupportedAdapterError also for a residual adapter on a
      layer-scanned base (load it on ``scan_layers=False`` params, then stack).
    """
    config, adapter = _load(path, params, dtype)
    kind = _residual_kind(adapter)
    if kind is None:
        return config, params, adapter
    if scan.is_stacked(adapter):
        raise UnsupportedAdapterError(
            f"the {kind} adapter in {path!r} needs its residual base computed per layer; load it on a base made with "
            "scan_layers=False, then stack with jpeft.scan.stack_params / stack_adapter."
        )
    return config, pissa.residual_params(config, params, adapter, kind), adapter


__all__ = [
    "save_peft",
    "load_peft",
    "load_peft_with_base",
    "register_peft_format",
    "supported_peft_types",
    "peft_key",
    "split_peft_key",
    "check_keys",
    "read_peft_config",
    "ExportContext",
    "ImportContext",
    "PEFT_PREFIX",
]
