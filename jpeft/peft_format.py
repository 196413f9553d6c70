"""The Hugging Face PEFT format's shared vocabulary, for the methods' converters.

A method's :class:`~jpeft.methods.base.Method` gives ``to_hf`` / ``from_hf`` functions;
:func:`jpeft.hf.save_peft` and :func:`jpeft.hf.load_peft` call them with the contexts below.
The helpers name PEFT state-dict keys (:func:`peft_key`, :func:`split_peft_key`) and check a
file's sites against the base (:func:`check_keys`). This module imports no method, so a
method's file can import it.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.errors import BaseMismatchError, CheckpointError, ConfigError, UnsupportedAdapterError
from jpeft.tree import from_hf_name, hf_name, matches, regex_fullmatch, tied_embedding

PEFT_PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# GPT-2's Conv1D modules (weights stored [in, out]); PEFT needs fan_in_fan_out=True for them.
CONV1D = re.compile(r"(^|.*/)h_\d+/(attn/c_attn|attn/c_proj|mlp/c_fc|mlp/c_proj)$")


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
    # the config.json of the file's base_model_name_or_path when that is a local model folder (PEFT's base)
    hf_config: Optional[Mapping[str, Any]] = None
    # {module_path: Layout} from tracing the model (load_peft's model=, example_args=), else None: the
    # layouts of modules whose kernel's shape alone does not tell them (nn.Conv)
    layouts: Optional[Mapping[str, Any]] = None
    # (major, minor) of the PEFT that wrote the file (peft_version_of), None when it does not say
    peft_version: Optional[tuple[int, int]] = None


def peft_version_of(d: Mapping[str, Any]) -> Optional[tuple[int, int]]:
    """``(major, minor)`` of the PEFT that wrote an ``adapter_config.json`` (its ``peft_version``),
    or ``None`` when the file does not say (PEFT < 0.18 wrote none) or says something that is not
    a version. A dev build's ``"0.21.1.dev0@<commit>"`` reads as ``(0, 21)``: PEFT's main branch
    keeps the last release's minor version until the next release, so its dev builds may or may
    not compute as that release does, and a reader gating on ``>= (0, 22)`` treats them as older.

    >>> peft_version_of({"peft_version": "0.22.0"}), peft_version_of({"peft_version": "0.21.1.dev0@3f2a1b"})
    ((0, 22), (0, 21))
    >>> peft_version_of({}) is None and peft_version_of({"peft_version": "UNKNOWN"}) is None
    True
    """
    v = d.get("peft_version") if isinstance(d, Mapping) else None
    m = re.match(r"\s*v?(\d+)\.(\d+)", v.partition("@")[0]) if isinstance(v, str) else None
    return (int(m.group(1)), int(m.group(2))) if m else None


def needs_peft(d: dict, version: tuple[int, int], sites, why: str) -> None:
    """For an exported ``adapter_config.json`` ``d`` whose ``sites`` only PEFT >= ``version``
    computes as jpeft does (``why``: what older PEFTs do instead): records that version as the
    file's ``peft_version`` (kept where the file already needs a newer one), so jpeft and a PEFT
    that gates on it read the file as that PEFT computes it, and warns once, naming the sites,
    that an older PEFT loads the file with other outputs."""
    sites = sorted(sites)
    if not sites:
        return
    have = peft_version_of(d)
    if have is None or have < tuple(version):
        d["peft_version"] = f"{version[0]}.{version[1]}.0"
    warnings.warn(
        f"the PEFT file holds sites that only PEFT >= {version[0]}.{version[1]} computes as jpeft does "
        f"({', '.join(map(hf_name, sites[:8]))}{', ...' if len(sites) > 8 else ''}): {why}. It records peft_version "
        f"{d['peft_version']!r}; load it with PEFT >= {version[0]}.{version[1]}.", UserWarning, stacklevel=4)


def ties_word_embeddings(hf_config: Optional[Mapping[str, Any]]) -> Optional[bool]:
    """Whether a Hugging Face ``config.json`` ties ``lm_head`` to the input embedding (GPT-2's
    default), where PEFT applies trainable tokens at both ends; ``None`` when it does not say."""
    if not isinstance(hf_config, Mapping):
        return None
    tie = hf_config.get("tie_word_embeddings")
    if isinstance(tie, bool):
        return tie
    return True if hf_config.get("model_type") == "gpt2" else None



def config_from_peft(config_cls, d: Mapping[str, Any], where: str):
    """``config_cls.from_dict(d)`` for a config read from a PEFT ``adapter_config.json`` at
    ``where``: a value jpeft's config rejects becomes one error type for every method,
    :class:`~jpeft.errors.UnsupportedAdapterError` (a :class:`~jpeft.errors.LoadError`), naming
    the file and what was rejected."""
    try:
        return config_cls.from_dict(d)
    except ConfigError as e:
        raise UnsupportedAdapterError(f"the adapter in {where!r} cannot be loaded by jpeft: {e}") from None


def to_np(x) -> np.ndarray:
    """A float32, C-contiguous numpy copy of an array (what the PEFT file stores)."""
    return np.ascontiguousarray(np.asarray(jnp.asarray(x, jnp.float32)))


def add_site_pattern(rank_pattern: dict, alpha_pattern: dict, path: str, r: int, alpha: float, config) -> None:
    """Records a site's own rank and alpha as exact-name ``rank_pattern`` / ``alpha_pattern``
    keys where they differ from ``config.r`` / ``config.alpha``: PEFT takes the first matching
    key and writes ``adapter_config.json`` with sorted keys, so a config's own overlapping
    patterns could change meaning in the file; one exact key per site cannot."""
    key = re.escape(hf_name(path))
    if r != config.r:
        rank_pattern[key] = int(r)
    if not math.isclose(float(alpha), float(config.alpha), rel_tol=1e-6):
        alpha_pattern[key] = float(alpha)


def overlapping_keys(pattern: Optional[Mapping[str, Any]], path: str) -> dict:
    """The keys of a PEFT file's ``rank_pattern`` / ``alpha_pattern`` ``pattern`` that match the
    module at ``path`` (PEFT's rule: the end of its dotted name) when they give it different
    values, in the file's order (the first is the one PEFT and jpeft apply), else ``{}``."""
    name = hf_name(path)
    keys = {k: v for k, v in (pattern or {}).items() if regex_fullmatch(rf"(.*\.)?({k})", name)}
    return keys if len({repr(v) for v in keys.values()}) > 1 else {}


def overlap_fix(pattern: Optional[Mapping[str, Any]], path: str, field: str = "rank_pattern") -> str:
    """For the error refusing a PEFT file's site whose tensors do not have the shapes its
    ``field`` value gives it: a sentence naming the keys that overlap at that module (PEFT's
    ``save_pretrained`` sorts them, so the first in the file, the one applied, may not be the
    one it was trained with) and the fix, or ``""`` when the keys do not overlap there."""
    keys = overlapping_keys(pattern, path)
    if not keys:
        return ""
    return (f" Its {field} keys {keys} overlap at this module: PEFT and jpeft apply the first in the file, and the "
            "save_pretrained of PEFT before 0.22 sorts them, so it may not be the one the adapter was trained with "
            "(peft.PeftModel.from_pretrained refuses this file too). Put an exact key for the module first in "
            f"adapter_config.json's {field}, {re.escape(hf_name(path))!r}, with the value its tensors hold.")


def warn_overlapping_patterns(d: Mapping[str, Any], paths, folder: str) -> None:
    """Warns where a site of a PEFT file matches two or more keys of its ``rank_pattern`` /
    ``alpha_pattern`` that give it different values. PEFT takes the first matching key, but its
    ``save_pretrained`` wrote ``adapter_config.json`` with sorted keys before 0.22, so the key first in the
    file (the one jpeft applies, as PEFT's ``from_pretrained`` does) may not be the one the
    adapter was trained with: the loaded outputs can then differ from the trained model's,
    in PEFT and in jpeft alike. (A different rank shows in the tensors' shapes; an alpha does not.)
    PEFT >= 0.22 writes these two dicts in their own order (its ``CONFIG_KEYS_WITH_PRESERVED_ORDER``),
    so the first key of such a file is the one the adapter was trained with: no warning."""
    if (peft_version_of(d) or (0, 0)) >= (0, 22):
        return
    for field in ("rank_pattern", "alpha_pattern"):
        hits = {hf_name(p): keys for p in sorted(paths) if (keys := overlapping_keys(d.get(field), p))}
        if hits:
            first = dict(list(hits.items())[:3])
            warnings.warn(
                f"the adapter in {folder!r} has {field} keys that overlap with different values at {len(hits)} "
                f"module(s) (first: {first}). PEFT applies the first matching key, and the save_pretrained of PEFT "
                f"{d.get('peft_version') or 'before 0.18'} (before 0.22) sorts the keys, so the value used here (the "
                "first key in adapter_config.json, as PEFT's from_pretrained uses) may differ from the one the adapter "
                "was trained with, and the outputs with it. Check the values; give each module one exact key (e.g. "
                "'model.layers.1.self_attn.q_proj') to remove the ambiguity.",
                UserWarning, stacklevel=5)


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


def site_tensors(tensors: Mapping[str, np.ndarray], tensor_names, leaves: Mapping[str, Any], targets, *,
                 is_site=lambda own: "kernel" in own, skip=()) -> dict[str, dict[str, np.ndarray]]:
    """A PEFT file's tensors grouped by the module they adapt, ``{path: {tensor name: array}}``.

    ``leaves`` are the base's modules (``{path: module params}``), ``targets`` the config's
    ``target_modules``, ``is_site`` which modules a method can adapt (a kernel by default) and
    ``skip`` keys that are not per-site (shared tensors). Raises
    :class:`~jpeft.errors.BaseMismatchError` (:func:`check_keys`) unless the file adapts exactly
    the modules ``targets`` selects, so a key that names no module of the base is never dropped.
    """
    by_site: dict[str, dict[str, np.ndarray]] = {}
    unmatched = []
    for k, v in tensors.items():
        if k in skip:
            continue
        sp = split_peft_key(k, tensor_names)
        if sp is None or sp[0] not in leaves or not is_site(leaves[sp[0]]):
            unmatched.append(k)
            continue
        by_site.setdefault(sp[0], {})[sp[1]] = v
    expected = [p for p, own in leaves.items() if is_site(own) and matches(targets, p)]
    check_keys(list(by_site), expected, unmatched_keys=unmatched)
    return by_site


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
                    "and has no separate lm_head module; adapt the embedding instead, or load the base untied: "
                    "jpeft.models.from_pretrained(folder, tie_word_embeddings=False))")
        sides = ([f"{len(only_file)} key(s) of the file have no matching module in the base (first: "
                  f"{only_file[:5]}){hint}"] if only_file else []) + \
                ([f"{len(only_base)} targeted module(s) of the base have no weights in the file (first: "
                  f"{only_base[:5]})"] if only_base else [])
        raise BaseMismatchError(
            f"the {what} does not match the base model: {', and '.join(sides)}. Was the adapter trained on another "
            "model (or a different number of layers)? Load it on the base it was made for."
        )


def check_base_copy(path: str, v: np.ndarray, own: Mapping[str, Any], folder: str) -> None:
    """PEFT saves the base weight of a targeted embedding or ``lm_head`` (``save_embedding_layers``, e.g. after
    the vocabulary was resized or rows were re-initialised) and ``PeftModel.from_pretrained``
    loads it into the model; jpeft keeps the params' weight, so the two must be the same weights
    (compared at the coarser of the two dtypes), else the outputs would differ silently. Params
    whose values cannot be read here (abstract ``jax.ShapeDtypeStruct`` params, arrays sharded
    across processes, quantized kernels) are compared by shape only."""
    name = "embedding" if "embedding" in own else "kernel" if "kernel" in own else None
    ref = own.get(name) if name else None
    if ref is None or getattr(ref, "shape", None) is None:
        return
    f = np.asarray(v)
    if name == "kernel" and f.ndim == 2 and not CONV1D.match(path):
        f = f.T
    if f.shape != tuple(ref.shape):
        raise BaseMismatchError(
            f"the adapter in {folder!r} carries PEFT's copy of the base weight of {hf_name(path)!r} with shape "
            f"{f.shape}, but the base's is {tuple(ref.shape)} (a resized vocabulary?). PeftModel.from_pretrained would "
            "load that copy into the model; give jpeft params holding the same weight."
        )
    if isinstance(ref, jax.ShapeDtypeStruct) or not getattr(ref, "is_fully_addressable", True) \
            or not isinstance(ref, (jax.Array, np.ndarray)) or not jnp.issubdtype(ref.dtype, jnp.floating):
        return  # abstract, sharded across processes or quantized params: the shape is all there is to compare
    p = np.asarray(ref)
    same = (np.array_equal(f.astype(np.float32), p.astype(f.dtype).astype(np.float32))
            or np.array_equal(f.astype(p.dtype).astype(np.float32), p.astype(np.float32)))
    if not same:
        # rows as PyTorch stores the weight (a token's row of an embedding or of lm_head)
        f0, p0 = (f.T, p.T) if name == "kernel" and f.ndim == 2 and not CONV1D.match(path) else (f, p)
        bad = np.unique(np.nonzero(np.any(f0.astype(np.float32) != p0.astype(np.float32),
                                          axis=tuple(range(1, f0.ndim))))[0])
        raise BaseMismatchError(
            f"the adapter in {folder!r} carries PEFT's copy of the base weight of {hf_name(path)!r} "
            f"({hf_name(path)}.base_layer.weight), and it differs from the base's in {bad.size} row(s) (first: "
            f"{bad[:8].tolist()}); PeftModel.from_pretrained loads that copy into the model, so jpeft's outputs "
            "would differ from PEFT's. Put the saved weight into the params first (e.g. re-initialised or "
            "resized token rows), or load the adapter on the base it was trained on."
        )


# PEFT's copies of a wrapped module's base weight: a LoRA layer's, and (save_embedding_layers, which saves
# every state-dict entry of an embedding or lm_head) a trainable-tokens wrapper's and a modules_to_save wrapper's
_BASE_COPIES = ("base_layer.weight", "token_adapter.base_layer.weight", "original_module.weight")


def check_same_copies(a, b, folder: str, what: str) -> None:
    """Raises :class:`CheckpointError` unless ``a`` and ``b`` are equal: two keys of a PEFT file
    that PEFT writes from one tensor (``what`` names them), so a difference means the file was
    edited or damaged, and which one PEFT would read is not for jpeft to guess."""
    if not np.array_equal(np.asarray(a), np.asarray(b)):
        raise CheckpointError(
            f"the adapter in {folder!r} holds two different values for {what}, which PEFT writes from one tensor; the "
            "file is inconsistent. Re-save it with PEFT.")


def take_base_copies(tensors: dict, leaves: Mapping[str, Mapping[str, Any]], folder: str, own_of=None) -> None:
    """Removes from ``tensors`` PEFT's copies of base weights (``<module>.base_layer.weight``, saved
    for any method whose targets include an embedding-like module such as ``lm_head``;
    ``<module>.token_adapter.base_layer.weight`` and ``<module>.original_module.weight``, which
    ``save_embedding_layers`` adds for trainable tokens and ``modules_to_save`` on an embedding or
    ``lm_head``), after :func:`check_base_copy` found each equal to the base's; one of no module is
    left in place, so the format's key check names it. The wrappers' copies of a tied ``lm_head`` (no
    module of its own here) are compared with the embedding it reads. ``own_of(path)`` gives the params
    to compare with when ``leaves`` only names the modules: for a layer-scanned base ``leaves`` are the
    unrolled model's (abstract, never a copy of the weights) and ``own_of`` is
    :func:`jpeft.scan.layer_module` on the stacked params (the layer's slice of one module)."""
    for k in sorted(tensors):
        sp = split_peft_key(k, _BASE_COPIES)
        if sp is None:
            continue
        path = sp[0]
        if path not in leaves and sp[1] != "base_layer.weight":
            path = tied_embedding(path, leaves)  # a LoRA's copy of a tied lm_head is the format's (its key check)
        if path is not None and path in leaves:
            own = own_of(path) if own_of is not None else None
            check_base_copy(sp[0], tensors[k], leaves[path] if own is None else own, folder)
            del tensors[k]


def take_embedding_copies(tensors: dict, leaves: Mapping[str, Mapping[str, Any]], folder: str, saved=(),
                          tied_copy: bool = False) -> None:
    """Removes from ``tensors`` the full copies of the input and output embeddings that PEFT's
    ``save_pretrained(..., save_embedding_layers=True)`` writes (``model.embed_tokens.weight``,
    ``lm_head.weight``; ``"auto"`` does so after a vocabulary resize), after :func:`check_base_copy`
    found each equal to the base's (``PeftModel.from_pretrained`` loads them into the model). A tied
    ``lm_head`` (no module of its own here) is compared with the embedding it reads. Keys of a module
    that ``saved`` (the config's ``modules_to_save``) names are a trained copy, left to the format, as
    is a tied ``lm_head``'s key beside a saved embedding when ``tied_copy`` (the file's
    ``ensure_weight_tying``: lm_head then reads the trained copy; without it, the base weight)."""
    names = tuple(saved or ())
    for k in sorted(tensors):
        # save_embedding_layers also writes a modules_to_save wrapper's trained copy under its state-dict name,
        # beside the key PEFT loads it from (``<module>.weight``): the same array, or the file is inconsistent
        sp = split_peft_key(k, ("modules_to_save.weight",))
        loaded = None if sp is None else peft_key(sp[0], "weight")
        if loaded in tensors:
            check_same_copies(tensors[k], tensors[loaded], folder,
                              f"the trained copy of {hf_name(sp[0])!r}: {loaded} (the one PeftModel.from_pretrained loads) "
                              f"and {k} (save_embedding_layers' copy of the same module)")
            del tensors[k]
    for k in sorted(tensors):
        sp = split_peft_key(k, ("weight",))
        if sp is None:
            continue
        path, name = sp[0], hf_name(sp[0])
        own = leaves.get(path)
        emb = tied_embedding(path, leaves)
        if emb is not None:  # tied: the embedding is the output projection
            if tied_copy and any(hf_name(emb).endswith(m) for m in names):
                continue  # ensure_weight_tying's copy of a saved embedding: the format checks it
            own = leaves[emb]
        elif own is None or not ("embedding" in own or path.split("/")[-1] == "lm_head"):
            continue
        if any(name.endswith(m) for m in names):
            continue
        check_base_copy(path, tensors[k], own, folder)
        del tensors[k]


# JSON types an adapter_config.json value may have: a null flag is false, as PEFT, which tests flags by truth
# value, reads it (AdapterConfig.from_dict)
FLAG = (bool, type(None))
_TYPE_WORDS = {"str": "a string", "list": "a list", "dict": "an object", "int": "an integer", "float": "a number",
               "bool": "true/false", "NoneType": "null"}


def check_value_types(d: Mapping[str, Any], types: Mapping[str, tuple]) -> None:
    """Checks that each key of ``types`` present in the ``adapter_config.json`` dict ``d`` has one
    of its JSON types (``bool`` only where listed), before any format reads it.

    Raises:
      ConfigError: naming the key, the types it may have and the value found.
    """
    for k, allowed in types.items():
        v = d.get(k)
        if k in d and (not isinstance(v, allowed) or (isinstance(v, bool) and bool not in allowed)):
            want = " or ".join(_TYPE_WORDS[t.__name__] for t in allowed)
            raise ConfigError(f"{k!r} must be {want}, found {type(v).__name__} {str(v)[:80]}.")
