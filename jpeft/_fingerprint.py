"""The fingerprint of a base model (its config, and every parameter's path, shape and dtype,
optionally a hash of its bytes), which saved adapters and checkpoints record so that loading
onto another base is refused by name (:func:`check_base`). :mod:`jpeft.io` re-exports the
public names."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import warnings
from typing import Mapping, Optional

import jax
import numpy as np

from jpeft import quant
from jpeft.errors import BaseMismatchError, ConfigError
from jpeft.tree import host_array, leaf_names, unwrap_params

# config keys that describe the software, not the model; ignored by the fingerprint
_VOLATILE_CONFIG_KEYS = frozenset(
    {"transformers_version", "use_cache", "output_attentions", "output_hidden_states", "return_dict",
     "torch_dtype", "dtype", "name_or_path", "architectures"}
)


def _config_dict(base_config) -> Optional[dict]:
    if base_config is None:
        return None
    if isinstance(base_config, Mapping):
        d = dict(base_config)
    elif hasattr(base_config, "to_dict"):
        d = base_config.to_dict()
    elif dataclasses.is_dataclass(base_config) and not isinstance(base_config, type):
        d = dataclasses.asdict(base_config)
    else:
        raise ConfigError(
            f"base_config must be a dict, a dataclass or an object with to_dict() (a transformers config), "
            f"found {type(base_config).__name__}."
        )
    d = {k: v for k, v in d.items() if not str(k).startswith("_") and k not in _VOLATILE_CONFIG_KEYS}
    return json.loads(json.dumps(d, sort_keys=True, default=str))


def content_hash(params) -> str:
    """SHA-256 over every parameter's path, shape, dtype and bytes (in path order)."""
    inner, _ = unwrap_params(params)
    h = hashlib.sha256()
    for name, leaf in sorted(leaf_names(inner), key=lambda t: t[0]):
        if isinstance(leaf, jax.ShapeDtypeStruct):
            raise ConfigError(
                "content_hash needs the base weights themselves, found an abstract jax.ShapeDtypeStruct "
                f"at {name!r}. Pass concrete params, or content_hash=False."
            )
        a = host_array(leaf)
        h.update(f"{name}|{a.shape}|{a.dtype}|".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return "sha256:" + h.hexdigest()


def base_fingerprint(params, base_config=None, *, with_content_hash: bool = False) -> dict:
    """A JSON-able fingerprint of a base model: its config (when given) and every parameter's
    path, shape and dtype, plus optionally a hash of the weights' bytes.

    Works on ``jax.ShapeDtypeStruct`` trees (no weights needed) unless ``with_content_hash``.

    >>> import jax.numpy as jnp
    >>> fp = base_fingerprint({"params": {"q": {"kernel": jnp.zeros((2, 3))}}}, {"hidden_size": 3})
    >>> fp["params"], fp["config"]
    ([['q/kernel', [2, 3], 'float32']], {'hidden_size': 3})
    """
    inner, _ = unwrap_params(params)
    inner = quant.abstract(inner)  # a quantized base has the fingerprint of the model it stands for
    rows = []
    for name, leaf in leaf_names(inner):
        if not hasattr(leaf, "shape"):
            continue
        rows.append([name, [int(d) for d in leaf.shape], str(np.dtype(leaf.dtype))])
    return {
        "config": _config_dict(base_config),
        "params": rows,
        "num_params": int(sum(math.prod(r[1]) for r in rows)),
        "content_hash": content_hash(params) if with_content_hash else None,
    }


def fingerprint_difference(saved: Mapping, current: Mapping) -> Optional[str]:
    """What differs between two :func:`base_fingerprint` s, in words, or ``None`` when they
    describe the same base (the config's first differing key, else the first parameter whose
    name, shape or dtype differs)."""
    sc, cc = saved.get("config"), current.get("config")
    if sc is not None and cc is not None and sc != cc:
        for k in sorted(set(sc) | set(cc)):
            if sc.get(k, "<absent>") != cc.get(k, "<absent>"):
                return f"base config field {k!r}: saved {sc.get(k, '<absent>')!r}, this base {cc.get(k, '<absent>')!r}"
    sp = {r[0]: (tuple(r[1]), r[2]) for r in saved.get("params", [])}
    cp = {r[0]: (tuple(r[1]), r[2]) for r in current.get("params", [])}
    for name, (shape, dtype) in sp.items():
        if name not in cp:
            return f"parameter {name!r} ({shape}, {dtype}) is missing from this base"
        cs, cd = cp[name]
        if cs != shape:
            return f"parameter {name!r} has shape {cs} in this base, the saved base had {shape}"
        if cd != dtype:
            return f"parameter {name!r} has dtype {cd} in this base, the saved base had {dtype}"
    extra = [n for n in cp if n not in sp]
    if extra:
        return f"this base has parameter {extra[0]!r} that the saved base did not have ({len(extra)} extra in all)"
    return None


def check_base(saved: Optional[Mapping], params, base_config=None, *, allow_base_mismatch: bool = False,
               what: str = "adapter") -> None:
    """Compares a stored fingerprint with ``params`` (and ``base_config`` when given).

    Raises:
      BaseMismatchError: naming the first config field, or the first parameter whose
        presence, shape or dtype differs, or a differing content hash. With
        ``allow_base_mismatch=True`` a :class:`UserWarning` is issued instead.
    """
    if saved is None or params is None:
        return
    current = base_fingerprint(params, base_config)
    diff = fingerprint_difference(saved, current)
    if diff is None and saved.get("content_hash"):
        leaves = jax.tree.leaves(params)
        if leaves and not any(isinstance(x, jax.ShapeDtypeStruct) for x in leaves):
            got = content_hash(params)
            if got != saved["content_hash"]:
                diff = "the base weights' content hash differs (same shapes, different values)"
    if diff is None:
        return
    if allow_base_mismatch:
        warnings.warn(base_mismatch_message(what, diff, ", or allow_base_mismatch=True was given"), stacklevel=3)
        return
    err = BaseMismatchError(base_mismatch_message(what, diff))
    err.what, err.difference = what, diff  # for callers that word the fix their own way (the CLI)
    raise err


def base_mismatch_message(what: str, diff: str, fix: str = ", or pass allow_base_mismatch=True to load it anyway") -> str:
    """:func:`check_base`'s message: what differs, and ``fix``."""
    return f"this {what} was saved for a different base model: {diff}. Load it onto the base it was trained on{fix}."


# --------------------------------------------------------------------------------------------

__all__ = ["base_fingerprint", "content_hash", "fingerprint_difference", "check_base", "base_mismatch_message"]
