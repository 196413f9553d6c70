"""Checks at the host boundary, before anything is traced or jitted.

Inside a jitted step JAX cannot raise on data: a token id past the vocabulary is silently
clamped by the embedding gather, a sequence longer than the position table silently reuses
the last position, an empty dataset just trains zero steps. These helpers look at the
concrete host values first and raise :class:`~jpeft.errors.InputValidationError` saying what
was expected, what was found and how to fix it. Every public entry point that takes data
(:func:`jpeft.loop.fit`, the models' entry points) calls them; use them in your own loops too.

>>> import numpy as np
>>> from jpeft import validate
>>> validate.check_token_ids(np.array([[1, 2, 50]]), vocab_size=32)
Traceback (most recent call last):
...
jpeft.errors.InputValidationError: input_ids holds token id 50 at position (0, 2), outside the vocabulary [0, 32). Check the tokenizer matches the model (its vocab_size is 32), or resize the embeddings.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import numpy as np

from jpeft.errors import InputValidationError
from jpeft.tree import host_array, is_typed_key

__all__ = [
    "check_batch",
    "check_like",
    "check_token_ids",
    "check_sequence_length",
    "check_not_empty",
    "check_finite",
    "check_key",
    "check_tokens",
    "batch_spec",
    "position_limit",
]


def _dtype_ok(got, want) -> bool:
    if want is None:
        return True
    got = np.dtype(got)
    if isinstance(want, str) and want in ("integer", "floating", "inexact", "bool", "signedinteger"):
        kinds = {"integer": np.integer, "floating": np.floating, "inexact": np.inexact, "bool": np.bool_,
                 "signedinteger": np.signedinteger}
        return jax.dtypes.issubdtype(got, kinds[want])
    if isinstance(want, type) and issubclass(want, np.generic) and want in (np.integer, np.floating, np.inexact, np.number):
        return jax.dtypes.issubdtype(got, want)
    return got == np.dtype(want)


def check_batch(batch: Mapping[str, Any], spec: Mapping[str, tuple], *, name: str = "batch") -> None:
    """Checks a batch dict against ``spec = {key: (shape, dtype)}``.

    ``shape`` is a tuple whose entries are ints or ``None`` (any size); ``dtype`` is a numpy
    dtype, ``None`` (any) or one of ``"integer"``, ``"floating"``, ``"inexact"``, ``"bool"``.

    >>> import numpy as np
    >>> check_batch({"x": np.zeros((4, 8), np.int32)}, {"x": ((None, 8), "integer")})
    >>> check_batch({"x": np.zeros((4, 9), np.int32)}, {"x": ((None, 8), "integer")})
    Traceback (most recent call last):
    ...
    jpeft.errors.InputValidationError: batch['x'] has shape (4, 9), expected (None, 8) (None = any size).
    """
    if not isinstance(batch, Mapping):
        raise InputValidationError(f"{name} must be a dict of arrays, found {type(batch).__name__}.")
    missing = [k for k in spec if k not in batch]
    if missing:
        raise InputValidationError(f"{name} lacks key {missing[0]!r}; it has {sorted(map(str, batch))}, expected {sorted(spec)}.")
    for k, (shape, dtype) in spec.items():
        x = batch[k]
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise InputValidationError(f"{name}[{k!r}] must be an array, found {type(x).__name__}.")
        got = tuple(x.shape)
        if shape is not None:
            if len(got) != len(shape) or any(w is not None and w != g for w, g in zip(shape, got)):
                raise InputValidationError(f"{name}[{k!r}] has shape {got}, expected {tuple(shape)} (None = any size).")
        if not _dtype_ok(x.dtype, dtype):
            raise InputValidationError(f"{name}[{k!r}] has dtype {np.dtype(x.dtype)}, expected {dtype}.")


def batch_spec(batch: Mapping[str, Any], *, free_leading: bool = False) -> dict:
    """The spec :func:`check_batch` takes, read off an example batch (``free_leading`` leaves
    the leading batch dimension free)."""
    out = {}
    for k, x in batch.items():
        shape = tuple(x.shape)
        if free_leading and shape:
            shape = (None,) + shape[1:]
        out[k] = (shape, np.dtype(x.dtype))
    return out


def _dtype(x) -> np.dtype:
    """The dtype of a leaf without reading its values (a global ``jax.Array`` of a multi-host
    run cannot be fetched by one process)."""
    return np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype


def check_like(batch, reference, *, name: str = "batch") -> None:
    """Checks that ``batch`` has the tree structure, shapes and dtypes of ``reference`` (a
    batch of a different shape would re-trigger compilation or fail deep inside the step).
    """
    try:
        ts, tr = jax.tree.structure(batch), jax.tree.structure(reference)
    except Exception as e:  # pragma: no cover - jax accepts any object as a leaf
        raise InputValidationError(f"{name} is not a pytree: {e}") from None
    if ts != tr:
        raise InputValidationError(f"{name} has structure {ts}, expected {tr} (the structure of the first batch).")
    for (kp, x), y in zip(jax.tree_util.tree_flatten_with_path(batch)[0], jax.tree.leaves(reference)):
        where = f"{name}{jax.tree_util.keystr(kp)}"
        xs, ys = tuple(np.shape(x)), tuple(np.shape(y))
        if xs != ys:
            raise InputValidationError(f"{where} has shape {xs}, expected {ys} (as in the first batch). Pad or drop the remainder batch.")
        xd, yd = _dtype(x), _dtype(y)
        if xd != yd:
            raise InputValidationError(f"{where} has dtype {xd}, expected {yd} (as in the first batch).")


def check_token_ids(ids, vocab_size: int, *, name: str = "input_ids") -> None:
    """Raises when a token id is negative or ``>= vocab_size`` (JAX would clamp it silently).

    The check runs on host values, before any jitted call."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or vocab_size <= 0:
        raise InputValidationError(f"vocab_size must be a positive integer, found {vocab_size!r}.")
    a = host_array(ids)
    if not jax.dtypes.issubdtype(a.dtype, np.integer):
        raise InputValidationError(f"{name} must hold integer token ids, found dtype {a.dtype}. Cast with .astype(np.int32).")
    if a.size == 0:
        return
    bad = (a < 0) | (a >= vocab_size)
    if bad.any():
        pos = tuple(int(i) for i in np.argwhere(bad)[0])
        val = int(a[pos])
        raise InputValidationError(
            f"{name} holds token id {val} at position {pos}, outside the vocabulary [0, {vocab_size}). Check the "
            f"tokenizer matches the model (its vocab_size is {vocab_size}), or resize the embeddings."
        )


def check_sequence_length(ids, max_positions: int, *, axis: int = -1, name: str = "input_ids") -> None:
    """Raises when ``ids.shape[axis] > max_positions`` (the model's position table)."""
    shape = tuple(np.shape(ids))
    if not shape:
        raise InputValidationError(f"{name} must have a sequence axis, found a scalar.")
    n = shape[axis]
    if n > max_positions:
        raise InputValidationError(
            f"{name} has sequences of length {n} (shape {shape}), longer than the model's {max_positions} positions. "
            f"Truncate or chunk the sequences to at most {max_positions} tokens."
        )


def position_limit(config) -> Optional[int]:
    """How many positions a model with this config (a jpeft model config: ``model.config``) can
    read: ``max_position_embeddings`` for a learned position table (GPT-2, BERT: past it the lookup
    fails or gives NaN); ``None`` (no limit) for a rotary model (a config with ``rope_theta``:
    Llama, Mistral, Qwen2/3), whose rotations are computed at any position, as transformers
    computes them, so jpeft, transformers and PEFT run it past ``max_position_embeddings``
    (extrapolating). Prefix and prompt tuning check their virtual tokens plus the input against
    it; ``jpeft train`` and ``jpeft eval`` check their rows' length.

    >>> from jpeft.models import GPT2Config, LlamaConfig
    >>> position_limit(GPT2Config(max_position_embeddings=64)), position_limit(LlamaConfig(max_position_embeddings=64))
    (64, None)
    """
    if getattr(config, "rope_theta", None) is not None:
        return None
    n = getattr(config, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and not isinstance(n, bool) else None


def check_tokens(batch, *, vocab_size: Optional[int] = None, max_positions: Optional[int] = None,
                 key: str = "input_ids", name: str = "batch") -> None:
    """:func:`check_token_ids` and :func:`check_sequence_length` on ``batch[key]`` (or on
    ``batch`` itself when it is an array)."""
    ids = batch[key] if isinstance(batch, Mapping) else batch
    label = f"{name}[{key!r}]" if isinstance(batch, Mapping) else name
    if isinstance(batch, Mapping) and key not in batch:
        raise InputValidationError(f"{name} has no {key!r}; it has {sorted(map(str, batch))}.")
    if vocab_size is not None:
        check_token_ids(ids, vocab_size, name=label)
    if max_positions is not None:
        check_sequence_length(ids, max_positions, name=label)


def check_not_empty(data, *, name: str = "dataset") -> None:
    """Raises for a dataset (a sized collection or array) with no examples.

    >>> check_not_empty([], name="train_data")
    Traceback (most recent call last):
    ...
    jpeft.errors.InputValidationError: train_data is empty: expected at least one example, found 0. Check the data path and any filters applied to it.
    """
    try:
        n = len(data)
    except TypeError:
        return
    if n == 0:
        raise InputValidationError(
            f"{name} is empty: expected at least one example, found 0. Check the data path and any filters applied to it."
        )


def check_finite(tree, *, name: str = "batch") -> None:
    """Raises when a floating-point leaf of ``tree`` holds a NaN or an infinity."""
    for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = host_array(x)
        if jax.dtypes.issubdtype(a.dtype, np.inexact) and not np.isfinite(a).all():
            pos = tuple(int(i) for i in np.argwhere(~np.isfinite(a))[0]) if a.ndim else ()
            raise InputValidationError(f"{name}{jax.tree_util.keystr(kp)} holds a non-finite value {a[pos]} at {pos}.")


_RAW_KEY_SHAPES: dict = {}  # the default PRNG implementation's name -> its legacy keys' shape


def _raw_key_shape() -> tuple:
    """The shape of a legacy key (``jax.random.PRNGKey``) under JAX's default PRNG
    implementation: ``(2,)`` for threefry, ``(4,)`` for ``jax_default_prng_impl = "rbg"``."""
    impl = str(jax.config.jax_default_prng_impl)
    if impl not in _RAW_KEY_SHAPES:
        _RAW_KEY_SHAPES[impl] = tuple(jax.random.key_data(jax.random.key(0)).shape)
    return _RAW_KEY_SHAPES[impl]


def is_single_key(key) -> bool:
    """Whether ``key`` is one ``jax.random`` key: a typed key (``jax.random.key``) of shape ``()``
    or a legacy ``uint32`` one (``jax.random.PRNGKey``: ``[2]``, or ``[4]`` when JAX's default
    PRNG implementation is ``rbg``)."""
    if not isinstance(key, (jax.Array, np.ndarray)):
        return False
    if is_typed_key(key):
        return key.shape == ()
    return key.dtype == np.uint32 and tuple(key.shape) == _raw_key_shape()


def check_key(key, *, name: str = "key", where: str = "") -> None:
    """Raises unless ``key`` is one ``jax.random`` key (``jax.random.key(seed)`` or the legacy
    ``jax.random.PRNGKey(seed)``): a seed, a batch of keys or ``None`` would otherwise fail deep
    inside JAX with its invalid-key error.

    >>> import jax
    >>> check_key(jax.random.key(0))
    >>> check_key(0, where="jpeft.init")
    Traceback (most recent call last):
    ...
    jpeft.errors.InputValidationError: jpeft.init: key must be one jax.random key (jax.random.key(seed) or jax.random.PRNGKey(seed)), found int 0; pass jax.random.key(seed), not a seed or a batch of keys.
    """
    if is_single_key(key):
        return
    if isinstance(key, (jax.Array, np.ndarray)):
        found = f"{type(key).__name__} {key.dtype} of shape {tuple(key.shape)}"
    else:
        found = f"{type(key).__name__} {key!r}"[:120]
    raise InputValidationError(
        f"{where + ': ' if where else ''}{name} must be one jax.random key (jax.random.key(seed) or "
        f"jax.random.PRNGKey(seed)), found {found}; pass jax.random.key(seed), not a seed or a batch of keys."
    )
