"""One name for the init option in every method's config: ``init_weights`` (LoRA's ``init`` is
the one left, docs/ARCHITECTURE.md "One public name"). AdaLoRA's and IA3's former field names are
their PEFT keys: taken by the constructor, ``replace`` and ``from_dict`` as every PEFT key is, and
written to ``adapter_config.json``; reading them as attributes warns, naming ``init_weights``."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest

import jpeft
from jpeft.methods.base import registered_methods

_INIT_NAMES = {"init", "init_weights", "init_lora_weights", "init_ia3_weights"}


def test_every_config_names_its_init_option_init_weights():
    names = {m.config.__name__: f.name for m in registered_methods() for f in dataclasses.fields(m.config)
             if f.name in _INIT_NAMES}
    assert {n for n in names.values()} <= {"init_weights", "init"}, names
    assert {c for c, n in names.items() if n != "init_weights"} == {"LoraConfig"}, names
    assert names["AdaLoraConfig"] == names["IA3Config"] == names["VeraConfig"] == "init_weights"


@pytest.mark.parametrize("cls, old, extra", [
    (jpeft.AdaLoraConfig, "init_lora_weights", {"total_step": 10}),
    (jpeft.IA3Config, "init_ia3_weights", {}),
])
def test_the_former_names_are_peft_keys_and_deprecated_attributes(cls, old, extra):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PEFT's name as a keyword: no warning, as for every PEFT key
        cfg = cls(**{old: False}, **extra)
        assert cfg.init_weights is False and cls(init_weights=False, **extra) == cfg
        assert cfg.replace(**{old: True}).init_weights is True
        d = cfg.to_dict()
        assert d[old] is False and "init_weights" not in d  # the adapter_config.json key is PEFT's
        assert cls.from_dict(json.loads(json.dumps(d))) == cfg
    with pytest.warns(DeprecationWarning, match=rf"{cls.__name__}\.{old} is deprecated: the option is "
                                                rf"{cls.__name__}\.init_weights"):
        assert getattr(cfg, old) is False
    with pytest.raises(jpeft.ConfigError, match=f"got both init_weights= and its Hugging Face PEFT alias {old}="):
        cls(**{old: False, "init_weights": False}, **extra)
