r"""Pytree utilities: module paths, target matching, parameter counts, host reads, partition/combine.

A *module path* is the ``/``-joined chain of linen submodule names from the root to a
module, e.g. ``"model/layers_0/self_attn/q_proj"``. Its *Hugging Face name* replaces
``/`` by ``.`` and a trailing ``_N`` list index by ``.N``
(``"model.layers.0.self_attn.q_proj"``), which is how Hugging Face PEFT names modules.

Target matching (one definition, used by every method):

* a ``str`` is a regular expression matched in full against the module path *or* its
  Hugging Face name, so regexes written for Hugging Face PEFT work unchanged. Matching uses
  RE2 (:func:`compile_pattern`), whose time is linear in the path's length whatever the
  pattern: a pattern such as ``(.|.)*X`` from a downloaded ``adapter_config.json`` cannot
  hang loading. RE2 does not accept look-arounds (``(?=``, ``(?!``, ``(?<=``, ``(?<!``),
  backreferences (``\1``, ``(?P=name)``), possessive quantifiers, atomic groups or
  ``\Z``; such a pattern raises :class:`~jpeft.errors.ConfigError` naming the construct;
* a list/tuple of names matches a module whose path equals a name or ends with it on a
  component boundary (``"q_proj"`` matches ``"model/layers_0/self_attn/q_proj"``;
  ``"self_attn.q_proj"`` and ``"self_attn/q_proj"`` are the same suffix);
* ``"all-linear"`` (any case; Hugging Face PEFT's shorthand) selects every linear module
  (a module with a ``kernel``: Dense, DenseGeneral, Conv, Einsum; no embeddings) except the
  output projection ``lm_head``; :func:`linear_only` applies the "no embeddings" part.
"""

from __future__ import annotations

import difflib
import functools
import re
import sys
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np
import re2
from flax.core import meta

from jpeft.errors import ConfigError, ShardingError, TargetNotFoundError

if TYPE_CHECKING:  # flax.nnx is imported where an NNX value is handled, not at start-up (loaded_nnx)
    from flax import nnx

_INDEX = re.compile(r"^(.*)_(\d+)$")
# Hugging Face module names that end in ``_<digit>`` but are not list entries (GPT-2's
# ``ln_1``/``ln_2``); hf_name keeps them whole.
_NOT_INDEXED = frozenset({"ln_1", "ln_2"})


def unbox(tree):
    """``tree`` with flax's metadata boxes (``nn.Partitioned`` from ``nn.with_partitioning``,
    ``nn.LogicallyPartitioned``) replaced by the arrays they hold, as ``model.apply`` reads
    them; the tree itself where it has none."""
    if not any(isinstance(x, meta.AxisMetadata) for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, meta.AxisMetadata))):
        return tree
    return meta.unbox(tree)


def loaded_nnx():
    """``flax.nnx`` if this process has imported it, else ``None``. A value can be an NNX module,
    graph definition, state or ``nnx.Rngs`` only once ``flax.nnx`` is imported, so telling NNX
    values apart (:func:`is_nnx`, :func:`is_nnx_module`, :func:`is_nnx_state`) needs no import,
    and a program that never uses NNX (a linen user, every ``jpeft`` command) does not pay for
    importing it (docs/ARCHITECTURE.md, "Start-up time")."""
    return sys.modules.get("flax.nnx")


def is_nnx(model) -> bool:
    """Whether ``model`` is an NNX module or the graph definition of one."""
    nnx = loaded_nnx()
    return nnx is not None and isinstance(model, (nnx.Module, nnx.GraphDef))


def is_nnx_module(x) -> bool:
    """Whether ``x`` is an ``nnx.Module``."""
    nnx = loaded_nnx()
    return nnx is not None and isinstance(x, nnx.Module)


def is_nnx_state(x) -> bool:
    """Whether ``x`` is an ``nnx.State`` (from ``nnx.split``)."""
    nnx = loaded_nnx()
    return nnx is not None and isinstance(x, nnx.State)


def nnx_state_of(params):
    """An ``nnx.Module``'s whole state (``nnx.split``'s), as every entry point taking params takes
    it; other params (a linen variables dict, an ``nnx.State``) as given."""
    return loaded_nnx().split(params)[1] if is_nnx_module(params) else params


def unwrap_params(variables: Mapping[str, Any]) -> tuple[Mapping[str, Any], bool]:
    """Returns ``(params_collection, was_wrapped)`` for either ``{'params': ...}`` or bare params,
    metadata boxes (``nn.with_partitioning``) unboxed (:func:`unbox`).
    An ``nnx.State`` (from ``nnx.split``) gives its :func:`nnx_params` dict."""
    if is_nnx_state(variables):
        return nnx_params(variables), True
    if isinstance(variables, Mapping) and "params" in variables and isinstance(variables["params"], Mapping):
        return unbox(variables["params"]), True
    return unbox(variables), False


def rewrap_params(variables: Mapping[str, Any], new_params: Mapping[str, Any], was_wrapped: bool):
    if is_nnx_state(variables):
        return nnx_with_params(variables, new_params)
    if not was_wrapped:
        return new_params
    out = dict(variables)
    out["params"] = new_params
    return type(variables)(out) if not isinstance(variables, dict) else out


def nnx_params(state: nnx.State) -> dict:
    """The ``nnx.Param`` values of an NNX state as the nested dict jpeft uses for linen params:
    keys are the attribute names and list indices (as strings), so module paths read
    ``"layers/0/attn/query"``. Other variables (batch statistics, RNG counters) are left out."""
    from flax import nnx  # an NNX value is handled, so flax.nnx is imported already (loaded_nnx)

    out: dict = {}
    for path, var in nnx.to_flat_state(state):
        if isinstance(var, nnx.Param):
            node = out
            for comp in path[:-1]:
                node = node.setdefault(str(comp), {})
            node[str(path[-1])] = var.get_value()
    return out


def nnx_with_params(state: nnx.State, params: Mapping[str, Any]) -> nnx.State:
    """A copy of ``state`` whose ``nnx.Param`` values are taken from ``params`` (a
    :func:`nnx_params`-shaped dict); every other variable keeps its value, in a Variable of
    its own: ``nnx.merge`` reuses a state's Variable objects, so a model made from the copy
    (``jpeft.merge(model, adapter)``) must not update ``state``'s batch statistics or RNG
    counters when it runs."""
    from flax import nnx  # an NNX value is handled, so flax.nnx is imported already (loaded_nnx)

    flat = []
    for path, var in nnx.to_flat_state(state):
        if isinstance(var, nnx.Param):
            node = params
            for comp in path:
                node = node[str(comp)]
            var = var.replace(node)
        else:
            var = var.copy()
        flat.append((path, var))
    return nnx.from_flat_state(flat)


def hf_name(path: str) -> str:
    """Hugging Face module name of a jpeft module path (``a/layers_3/q`` -> ``a.layers.3.q``)."""
    parts = []
    for comp in path.split("/"):
        m = None if comp in _NOT_INDEXED else _INDEX.match(comp)
        if m and m.group(1):
            parts.extend([m.group(1), m.group(2)])
        else:
            parts.append(comp)
    return ".".join(parts)


def from_hf_name(name: str) -> str:
    """Inverse of :func:`hf_name`: ``a.layers.3.q`` -> ``a/layers_3/q``."""
    comps = name.split(".")
    out: list[str] = []
    for c in comps:
        if c.isdigit() and out:
            out[-1] = f"{out[-1]}_{c}"
        else:
            out.append(c)
    return "/".join(out)


def module_leaves(params: Mapping[str, Any], prefix: str = "") -> dict[str, dict[str, Any]]:
    """Maps each module path to the dict of its own (non-module) parameter leaves."""
    out: dict[str, dict[str, Any]] = {}
    own: dict[str, Any] = {}
    for k, v in params.items():
        if isinstance(v, Mapping):
            out.update(module_leaves(v, f"{prefix}/{k}" if prefix else str(k)))
        else:
            own[str(k)] = v
    if own:
        out[prefix] = own
    return out


def get_subtree(params: Mapping[str, Any], path: str) -> Mapping[str, Any]:
    node = params
    for comp in path.split("/") if path else []:
        node = node[comp]
    return node


def set_subtree(params: Mapping[str, Any], path: str, value: Mapping[str, Any]) -> dict:
    """Returns a copy of ``params`` (copying only the dicts on the way) with ``path`` replaced."""
    if not path:
        return dict(value)
    comps = path.split("/")
    def rec(node, i):
        new = dict(node)
        if i == len(comps) - 1:
            new[comps[i]] = value
        else:
            new[comps[i]] = rec(node[comps[i]], i + 1)
        return new
    return rec(params, 0)


_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # the error is raised as a ConfigError, not logged to stderr


@functools.lru_cache(maxsize=512)
def compile_pattern(pattern: str):
    r"""``pattern`` compiled with RE2, a regex engine whose matching time is linear in the input
    (Python's :mod:`re` backtracks: ``(.|.)*X`` on a 31-character path takes minutes).

    Raises:
      ConfigError: ``pattern`` is not a string, or not a regex RE2 accepts (look-arounds,
        backreferences, possessive quantifiers, atomic groups and ``\Z`` are not supported).

    >>> bool(compile_pattern("(.|.)*X").fullmatch("model.layers.0.self_attn.q_proj"))
    False
    """
    if not isinstance(pattern, str):
        raise ConfigError(f"a module-path regex must be a string, found {type(pattern).__name__} {str(pattern)[:80]!r}.")
    try:
        return re2.compile(pattern, _RE2_OPTIONS)
    except re2.error as e:
        msg = e.args[0].decode() if e.args and isinstance(e.args[0], bytes) else str(e)
        raise ConfigError(
            f"{pattern[:200]!r} is not a valid module-path regex: {msg}. jpeft matches with RE2 (linear time), which "
            "does not accept look-arounds, backreferences, possessive quantifiers, atomic groups or \\Z; "
            "rewrite the pattern without them, or give a list of module names instead."
        ) from None


def regex_fullmatch(pattern: str, s: str) -> bool:
    """Whether RE2-compiled ``pattern`` matches all of ``s`` (see :func:`compile_pattern`)."""
    return compile_pattern(pattern).fullmatch(s) is not None


def _suffix_match(path: str, name: str) -> bool:
    name = name.replace(".", "/") if "/" not in name else name
    # Both the jpeft path and the HF-style name may be used as suffixes.
    for cand, nm in ((path, name), (hf_name(path).replace(".", "/"), name)):
        if cand == nm or cand.endswith("/" + nm):
            return True
    return False


ALL_LINEAR = "all-linear"


def is_all_linear(target_modules) -> bool:
    """True for Hugging Face PEFT's ``"all-linear"`` shorthand."""
    return isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR


def linear_only(target_modules, leaves: Mapping[str, Mapping[str, Any]], candidates: Iterable[str]) -> list[str]:
    """``candidates`` without embedding modules when ``target_modules`` is ``"all-linear"``
    (``leaves`` is :func:`module_leaves` of the params); unchanged otherwise."""
    if not is_all_linear(target_modules):
        return list(candidates)
    return [p for p in candidates if "kernel" in leaves.get(p, {})]


def matches(target_modules: str | Sequence[str], path: str) -> bool:
    """True when ``path`` is selected by ``target_modules`` (see the module docstring)."""
    if is_all_linear(target_modules):
        return path.split("/")[-1] != "lm_head"
    if isinstance(target_modules, str):
        return regex_fullmatch(target_modules, path) or regex_fullmatch(target_modules, hf_name(path))
    return any(_suffix_match(path, str(t)) for t in target_modules)


_TIED_INPUT_EMBEDDINGS = ("model/embed_tokens", "transformer/wte")  # jpeft.models decoders: tied when no lm_head


def tied_embedding(path: str, leaves: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The input embedding a tied decoder (``tie_word_embeddings``: no ``lm_head`` module, the
    logits come from the embedding) reads as ``path``'s output projection when ``path`` is an
    ``lm_head`` that ``leaves`` (:func:`module_leaves`) has no module for; else ``None``."""
    if path.split("/")[-1] != "lm_head" or path in leaves:
        return None
    return next((e for e in _TIED_INPUT_EMBEDDINGS if "embedding" in leaves.get(e, {})), None)


def _refuse_tied_lm_head(target_modules, candidates: list[str], hit: list[str]) -> None:
    """A list naming ``lm_head`` on a jpeft decoder with tied word embeddings (no ``lm_head``
    module: the logits come from the input embedding) would silently leave the head out, while
    Hugging Face PEFT on the same model adapts its ``lm_head``; refuse it by name."""
    if isinstance(target_modules, str) or any(p.split("/")[-1] == "lm_head" for p in hit):
        return
    named = [str(t) for t in target_modules if str(t).replace("/", ".").split(".")[-1] == "lm_head"]
    emb = [p for p in _TIED_INPUT_EMBEDDINGS if p in candidates]
    if named and emb and not any(p.split("/")[-1] == "lm_head" for p in candidates):
        raise TargetNotFoundError(
            f"target_modules names {named[0]!r}, but this model ties its output projection to the input embedding "
            f"{hf_name(emb[0])!r} (tie_word_embeddings): it has no lm_head of its own, so nothing would adapt the "
            "head, while Hugging Face PEFT adapts the tied model's lm_head. Remove 'lm_head' from target_modules, "
            f"target {emb[0].split('/')[-1]!r} with ensure_weight_tying=True (LoRA) to adapt input and output together, "
            "or load the base untied, jpeft.models.from_pretrained(folder, tie_word_embeddings=False): its lm_head "
            "starts as a copy of the embedding, as PEFT's adapted lm_head of a tied model does."
        )


_SCAN_INDEX = re.compile(r"(^|/)layers(?:/|_)\d+(/|$)")  # a layer's index in a module name (layers.3 / layers_3)


def _refuse_one_layer_entries(entries: list[str], candidates: list[str]) -> None:
    """Raises :class:`ConfigError` for entries (matching nothing) that name one layer's module,
    ``'model.layers.0.self_attn.v_proj'``, of a layer-scanned model (one ``'model/layers/...'``
    site for every layer): the scan cannot adapt one layer alone, and dropping the entry, or a
    hint to ``'v_proj'``, would change what the unrolled model adapts."""
    one_layer = [t for t in entries if (u := _SCAN_INDEX.sub(r"\1layers\2", t.replace(".", "/"))) != t.replace(".", "/")
                 and any(_suffix_match(p, u) for p in candidates)]
    if one_layer:
        raise ConfigError(
            f"target_modules entries {one_layer} name a module of one layer, but this model runs its layers in a "
            "layer scan (one site, e.g. 'model/layers/self_attn/q_proj', for every layer), which adapts a module in "
            f"every layer or in none. Name the module without its layer ({one_layer[0].replace('.', '/').split('/')[-1]!r}) to adapt "
            "every layer; to adapt some layers only, use an unrolled model (scan_layers=False; "
            "jpeft.scan.unstack_params unrolls scanned params), where such entries or layers_to_transform select "
            "layers."
        )


def _warn_unmatched_entries(target_modules, candidates: list[str], what: str) -> None:
    """Warns (``RuntimeWarning``) naming each entry of a ``target_modules`` list that matches none of
    ``candidates`` while other entries do: a typo (``'v_prj'``) or a module the method cannot adapt would
    otherwise leave those modules out without a word (Hugging Face PEFT ignores such an entry silently)."""
    if isinstance(target_modules, str) or is_all_linear(target_modules):
        return
    unmatched = [str(t) for t in target_modules if not any(_suffix_match(p, str(t)) for p in candidates)]
    if not unmatched:
        return
    _refuse_one_layer_entries(unmatched, candidates)
    names = sorted({p.split("/")[-1] for p in candidates})
    near = {t: difflib.get_close_matches(t.replace(".", "/").split("/")[-1], names, n=1, cutoff=0.6) for t in unmatched}
    hints = "".join(f" Did you mean {near[t][0]!r} (not {t!r})?" for t in unmatched if near[t])
    warnings.warn(
        f"target_modules entries {unmatched} matched no {what} (the other entries did); they are ignored, as Hugging "
        f"Face PEFT ignores them. {what[0].upper() + what[1:]} names here: {names[:20]}.{hints} Fix or remove them.",
        RuntimeWarning,
        stacklevel=3,
    )


def select(target_modules, candidates: Iterable[str], *, what: str = "module") -> list[str]:
    """Paths among ``candidates`` selected by ``target_modules``. An entry of a list that matches
    nothing while other entries match is named in a ``RuntimeWarning``.

    Raises:
      TargetNotFoundError: when nothing matches; the message lists up to 20 available
        paths, nearest to the targets first.
      ConfigError: an entry names one layer's module (``layers.0.self_attn.v_proj``) of a
        layer-scanned model, whose one site adapts every layer.
    """
    candidates = list(candidates)
    hit = [p for p in candidates if matches(target_modules, p)]
    _refuse_tied_lm_head(target_modules, candidates, hit)
    if hit:
        _warn_unmatched_entries(target_modules, candidates, what)
        return hit
    targets = [target_modules] if isinstance(target_modules, str) else [str(t) for t in target_modules]
    # a dotted name alone (a list's entry, or a string without regex syntax) naming one layer of a scanned model
    _refuse_one_layer_entries([t for t in targets if not isinstance(target_modules, str) or re.fullmatch(r"[\w.]+", t)],
                              candidates)
    def score(p):
        return max(
            max(difflib.SequenceMatcher(None, t, p).ratio(), difflib.SequenceMatcher(None, t, p.split("/")[-1]).ratio())
            for t in targets
        ) if targets else 0.0
    near = sorted(candidates, key=lambda p: (-score(p), p))[:20]
    listing = "\n  ".join(near) if near else "(none: the params hold no adaptable module)"
    raise TargetNotFoundError(
        f"target_modules={target_modules!r} matched no {what}. A string is a regex matched in full "
        f"against the module path (or its Hugging Face dotted name); a list matches names or path "
        f"suffixes; 'all-linear' selects every linear module but lm_head. Available {what} paths, nearest "
        f"first:\n  {listing}"
    )


def count(tree) -> int:
    """Number of scalar parameters in a pytree (works on ``jax.ShapeDtypeStruct`` leaves too)."""
    return int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree) if hasattr(x, "shape")))


def nbytes(tree) -> int:
    return int(sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree) if hasattr(x, "shape")))


def is_typed_key(x) -> bool:
    """Whether ``x`` is an array of typed PRNG keys (``jax.random.key``; a legacy
    ``jax.random.PRNGKey`` is plain ``uint32`` data and is not), the one test jpeft uses before
    taking a key's data (``jax.random.key_data``) to copy, place or save it."""
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def is_half_float(dtype) -> bool:
    """Whether ``dtype`` is a floating dtype narrower than 32 bits (bfloat16, float16): one whose
    rounding step (1/256 of a value in bfloat16) can swallow a small update."""
    return dtype is not None and jax.numpy.issubdtype(dtype, jax.numpy.floating) and np.dtype(dtype).itemsize < 4


def host_array(x) -> np.ndarray:
    """A host numpy copy of the whole value of ``x`` (a typed PRNG key as its key data).

    An array replicated over several processes is read from this process's own copy, once every
    device of this process holds it (JAX's ``addressable_data(0)`` alone waits for the first: a
    process that then ends could close its connections under another device's exchange of the
    program that made it); a single-process array sharded over devices (a pmap output too) is
    read whole. Only an array
    split across processes has no whole value here: that raises, since reading it takes every
    process (:func:`jpeft.distributed.gather`).

    Raises:
      ShardingError: ``x`` is split across processes.
    """
    if isinstance(x, jax.Array):
        if is_typed_key(x):
            x = jax.random.key_data(x)
        if not x.is_fully_addressable:
            if not x.is_fully_replicated:
                raise ShardingError(
                    f"an array of shape {tuple(x.shape)} is split across processes ({x.sharding}), so this process "
                    "holds only part of it and cannot read its value alone. Read it with "
                    "jpeft.distributed.gather(tree) on every process, or replicate it first."
                )
            return np.asarray(jax.block_until_ready(x).addressable_data(0))
    return np.asarray(jax.device_get(x))


def partition(tree, predicate: Callable[[tuple, Any], bool]):
    """Splits ``tree`` into ``(selected, rest)`` by ``predicate(path, leaf)``; the other side's
    leaves are ``None`` holes (equinox's ``partition``). :func:`combine` reverses it."""
    sel = jax.tree_util.tree_map_with_path(lambda p, x: x if predicate(p, x) else None, tree)
    rest = jax.tree_util.tree_map_with_path(lambda p, x: None if predicate(p, x) else x, tree)
    return sel, rest


def combine(*trees):
    """Joins partitions: at each position takes the first tree's leaf that is not ``None``."""
    def pick(*xs):
        for x in xs:
            if x is not None:
                return x
        return None
    return jax.tree.map(pick, *trees, is_leaf=lambda x: x is None)


def _key_str(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_str(keypath) -> str:
    """``jax.tree_util`` key path -> ``a/b/c``: dict keys, attribute names and sequence
    indices joined with ``/``, empty components dropped (an adapter's root site, path ``""``,
    adds none), the one way jpeft names a tree path (:func:`leaf_names` too).

    >>> import jax
    >>> [path_str(kp) for kp, _ in jax.tree_util.tree_flatten_with_path({"a": [1, {"": 2}]})[0]]
    ['a/0', 'a/1']
    """
    return "/".join(s for s in map(_key_str, keypath) if s != "")


def leaf_names(tree) -> list[tuple[str, Any]]:
    """``[(name, leaf)]`` in tree order, where ``name`` is the key path as
    :func:`jpeft.tree.path_str` writes it (``/``-joined, empty components dropped: the root
    module's path is ``""``).

    For an adapter the names are ``"<module path>/<field>"``:

    >>> import jax.numpy as jnp
    >>> [n for n, _ in leaf_names({"a/q": {"lora_A": jnp.zeros(1)}, "": {"w": jnp.zeros(1)}})]
    ['w', 'a/q/lora_A']

    Raises:
      ConfigError: when two leaves would get the same name.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    out, seen = [], set()
    for kp, leaf in flat:
        name = path_str(kp)
        if name in seen:
            raise ConfigError(f"two leaves of the tree are both named {name!r}; rename a module or a field.")
        seen.add(name)
        out.append((name, leaf))
    return out


__all__ = [
    "hf_name",
    "from_hf_name",
    "matches",
    "select",
    "compile_pattern",
    "regex_fullmatch",
    "is_all_linear",
    "linear_only",
    "module_leaves",
    "count",
    "nbytes",
    "is_typed_key",
    "host_array",
    "partition",
    "combine",
    "path_str",
    "leaf_names",
]
