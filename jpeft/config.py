"""Base type for method configs: small frozen dataclasses that round-trip through JSON.

Each method's config subclasses :class:`AdapterConfig`, sets ``peft_type`` (the
Hugging Face PEFT name where one exists) and maps its field names to the key names of
Hugging Face PEFT's ``adapter_config.json`` through ``_hf_keys`` so that
``to_dict()`` writes, and ``from_dict()`` reads, the same keys Hugging Face uses.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar, Mapping

from jpeft.errors import ConfigError
from jpeft.tree import compile_pattern

_REGISTRY: dict[str, type["AdapterConfig"]] = {}


def register_config(cls):
    """Class decorator: makes ``AdapterConfig.from_dict`` able to find ``cls`` by ``peft_type``."""
    _REGISTRY[cls.peft_type] = cls
    return cls


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """Base class. Subclasses are frozen dataclasses with a ``peft_type`` class attribute."""

    peft_type: ClassVar[str] = ""
    # field name -> Hugging Face adapter_config.json key (only where they differ)
    _hf_keys: ClassVar[Mapping[str, str]] = {}
    # keys Hugging Face writes that jpeft accepts and ignores (documented per method)
    _ignored_hf_keys: ClassVar[frozenset] = frozenset(
        {
            "base_model_name_or_path", "revision", "task_type", "inference_mode", "auto_mapping",
            "peft_version", "modules_to_save", "bias", "fan_in_fan_out", "layers_to_transform",
            "layers_pattern", "megatron_config", "megatron_core", "loftq_config", "layer_replication",
            "runtime_config", "exclude_modules", "lora_bias", "eva_config", "corda_config",
            "trainable_token_indices", "qalora_group_size", "use_qalora", "target_parameters",
            "alora_invocation_tokens", "arrow_config", "ensure_weight_tying", "lora_ga_config",
        }
    )

    def replace(self, **changes) -> "AdapterConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict with Hugging Face PEFT key names and ``peft_type``."""
        out: dict[str, Any] = {"peft_type": self.peft_type}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, tuple):
                v = list(v)
            if isinstance(v, Mapping):
                v = dict(v)
            out[self._hf_keys.get(f.name, f.name)] = v
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AdapterConfig":
        """Inverse of :meth:`to_dict`. Called on ``AdapterConfig`` it dispatches on ``peft_type``.

        Raises:
          ConfigError: for an unknown ``peft_type`` or a key the config does not have.
        """
        d = dict(d)
        ptype = d.pop("peft_type", cls.peft_type or None)
        target = cls
        if cls is AdapterConfig or (ptype and ptype != cls.peft_type):
            if ptype not in _REGISTRY:
                raise ConfigError(
                    f"unknown peft_type {ptype!r}; jpeft supports {sorted(_REGISTRY)}. "
                    "Check the adapter_config.json, or use the config class of the method directly."
                )
            target = _REGISTRY[ptype]
        inv = {v: k for k, v in target._hf_keys.items()}
        names = {f.name for f in dataclasses.fields(target)}
        kwargs, unknown = {}, []
        for k, v in d.items():
            name = inv.get(k, k)
            if name in names:
                kwargs[name] = v
            elif k in target._ignored_hf_keys:
                continue
            else:
                unknown.append(k)
        if unknown:
            raise ConfigError(
                f"{target.__name__}.from_dict got unknown keys {sorted(unknown)}; "
                f"expected some of {sorted(target._hf_keys.get(n, n) for n in names)}. "
                "Remove them or fix their spelling."
            )
        return target(**kwargs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "AdapterConfig":
        try:
            d = json.loads(s)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"config JSON must be an object, found {type(d).__name__}")
        return cls.from_dict(d)


def registered_configs() -> dict[str, type[AdapterConfig]]:
    return dict(_REGISTRY)


def _as_targets(v, field: str = "target_modules"):
    """Normalises ``target_modules``: a str stays a regex (checked by RE2); a list becomes a
    tuple of names.

    Raises:
      ConfigError: a value of another type, a list holding a non-string, or an invalid regex.
    """
    if v is None:
        return None
    if isinstance(v, str):
        compile_pattern(v)
        return v
    if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
        raise ConfigError(
            f"{field} must be a regex string or a list of module names such as ['q_proj', 'v_proj'], found "
            f"{type(v).__name__} {str(v)[:120]}."
        )
    return tuple(v)
