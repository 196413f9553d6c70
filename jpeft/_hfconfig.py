"""Fields of a Hugging Face ``config.json`` read as transformers reads them, below both the
checkpoint loader (:mod:`jpeft.models.loading`, which builds the model configs) and the
methods' PEFT converters (prefix tuning checks its head count against the base's), so the
two read a field one way. Imports nothing of jpeft but its errors.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from jpeft.errors import ConfigError


_REQUIRED = object()


def number(d: Mapping[str, Any], name: str, default: Any = _REQUIRED, *, integer: bool = False):
    """A numeric field of ``config.json`` (``default`` when the key is absent; without one a
    missing key is a ``KeyError``, which :func:`jpeft.models.loading.config_from_hf` names). A
    null, a quoted value, a boolean or, for a count, a fraction is refused by name:
    ``float(None)`` raised a raw ``TypeError`` and ``int(2.5)`` silently read 2."""
    value = d[name] if default is _REQUIRED else d.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        also = "" if default is _REQUIRED else f", or remove it for transformers' default ({default})"
        raise ConfigError(
            f"config.json field {name!r} must be {'a whole number' if integer else 'a number'}, found {value!r} "
            f"({type(value).__name__}). Write it as a JSON number without quotes{also}.")
    return int(value) if integer else float(value)


_KV_HEADS_DEFAULT = {"mistral": 8, "qwen2": 32, "qwen3": 32}


def num_kv_heads(d: Mapping[str, Any]) -> Optional[int]:
    """The key/value heads a Hugging Face ``config.json`` dict gives its attention, as
    transformers reads it: ``num_key_value_heads``; without the key, MistralConfig's 8,
    Qwen2Config's and Qwen3Config's 32, else (and for an explicit null) the attention heads (``n_head`` for
    GPT-2); ``None`` when the dict names no heads."""
    heads = d.get("num_attention_heads", d.get("n_head"))
    kv = d.get("num_key_value_heads", _KV_HEADS_DEFAULT.get(d.get("model_type"), heads))
    kv = heads if kv is None else kv
    # a quoted "4" was read as 4 and a fraction 2.5 as 2 by int(); the field is named as every other count
    name = "num_key_value_heads" if d.get("num_key_value_heads") is not None else (
        "num_attention_heads" if "num_attention_heads" in d else "n_head")
    return None if kv is None else number({name: kv}, name, integer=True)
