"""One name for the init option in every method's config: ``init_weights`` (docs/ARCHITECTURE.md
"One public name"). AdaLoRA's and IA3's former field names are their PEFT keys: taken by the
constructor, ``replace`` and ``from_dict`` as every PEFT key is, and written to
``adapter_config.json``; reading them as attributes warns, naming ``init_weights``. LoRA's former
name, ``init``, is no PEFT key (PEFT's, ``init_lora_weights``, is taken as every PEFT key): the
constructor, ``replace`` and ``from_dict`` take it with a DeprecationWarning naming
``init_weights``, reading it warns the same way, and no file jpeft writes holds it."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft.methods.base import registered_methods

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _models_tiny import BoxedMLP, randomize_adapter  # noqa: E402

_INIT_NAMES = {"init", "init_weights", "init_lora_weights", "init_ia3_weights"}


def test_every_config_names_its_init_option_init_weights():
    names = {m.config.__name__: f.name for m in registered_methods() for f in dataclasses.fields(m.config)
             if f.name in _INIT_NAMES}
    assert set(names.values()) == {"init_weights"}, names
    assert names["LoraConfig"] == names["AdaLoraConfig"] == names["IA3Config"] == names["VeraConfig"] == "init_weights"


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


_LORA_INIT = r"LoraConfig\.init is deprecated: the option is LoraConfig\.init_weights"


def test_lora_init_weights_takes_pefts_key_silently_and_writes_it_alone():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the field's name and PEFT's key: no warning
        cfg = jpeft.LoraConfig(r=2, alpha=3.0, target_modules=".*", init_weights="gaussian")
        assert jpeft.LoraConfig(r=2, alpha=3.0, target_modules=".*", init_lora_weights="gaussian") == cfg
        assert jpeft.LoraConfig(init_lora_weights=False).init_weights == "random"  # PEFT's booleans
        assert jpeft.LoraConfig(init_weights=True).init_weights == "default"
        d = cfg.to_dict()
        assert d["init_lora_weights"] == "gaussian" and not {"init", "init_weights"} & set(d)
        assert jpeft.LoraConfig.from_dict(json.loads(json.dumps(d))) == cfg
        assert jpeft.LoraConfig.field_of("init") == jpeft.LoraConfig.field_of("init_lora_weights") == "init_weights"
        assert "init" not in jpeft.LoraConfig.known_hf_keys()  # a PEFT file's "init" is no key of PEFT's


def test_lora_init_still_works_everywhere_with_one_deprecation_warning_naming_init_weights():
    """``init=`` in the constructor, ``replace`` and ``from_dict`` (so TOML and ``--set``): the
    config and the adapter jpeft.init builds from it (every tensor random) are those of
    ``init_weights=``; each use warns once, from the caller's line."""
    kw = dict(r=2, alpha=3.0, target_modules=".*")
    new = jpeft.LoraConfig(**kw, init_weights="random")
    with pytest.warns(DeprecationWarning, match=_LORA_INIT + r".*; write init_weights") as seen:
        old = jpeft.LoraConfig(**kw, init="random")
    assert len(seen) == 1 and seen[0].filename == __file__
    assert old == new and hash(old) == hash(new) and old.to_dict() == new.to_dict()
    with pytest.warns(DeprecationWarning, match=_LORA_INIT) as seen:
        assert new.replace(init="gaussian") == new.replace(init_weights="gaussian")
    assert len(seen) == 1 and seen[0].filename == __file__
    d = {k: v for k, v in new.to_dict().items() if k != "init_lora_weights"}
    with pytest.warns(DeprecationWarning, match=_LORA_INIT) as seen:
        assert jpeft.LoraConfig.from_dict(dict(d, init=False)) == new  # PEFT's False: "random"
        assert jpeft.AdapterConfig.from_dict(dict(d, init="random")) == new  # dispatched on peft_type
    assert len(seen) == 2 and {w.filename for w in seen} == {__file__}
    with pytest.warns(DeprecationWarning, match=_LORA_INIT + r", its name .* \(its Hugging Face PEFT key init_lora_weights"):
        assert new.init == "random"
    x = jax.random.normal(jax.random.key(0), (3, 5))
    model = BoxedMLP(hidden=4, out=3)
    params = model.init(jax.random.key(1), x)
    with pytest.warns(DeprecationWarning, match=_LORA_INIT):
        a_old = jpeft.init(jpeft.LoraConfig(**kw, init="random"), params, jax.random.key(2), model, x)
    a_new = jpeft.init(new, params, jax.random.key(2), model, x)
    leaves_old, leaves_new = jax.tree.leaves(a_old), jax.tree.leaves(a_new)
    assert len(leaves_new) == 4 and all(float(jnp.abs(v).min()) > 0 for v in leaves_new)  # A and B random
    for u, v in zip(leaves_old, leaves_new, strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    np.testing.assert_array_equal(np.asarray(jpeft.apply(model, params, a_old, x)),
                                  np.asarray(jpeft.apply(model, params, a_new, x)))


@pytest.mark.parametrize("other", ["init_weights", "init_lora_weights"])
def test_lora_init_beside_init_weights_is_refused_by_name(other):
    both = {"init": "gaussian", other: "gaussian"}
    with pytest.raises(jpeft.ConfigError, match=f"LoraConfig got both {other}= and init=, the option's former name"):
        jpeft.LoraConfig(**both)
    with pytest.raises(jpeft.ConfigError, match=f"LoraConfig.replace got both {other}= and init="):
        jpeft.LoraConfig().replace(**both)
    with pytest.raises(jpeft.ConfigError, match=f"LoraConfig.from_dict got both {other}= and init="):
        jpeft.LoraConfig.from_dict(both)


def test_a_saved_lora_adapter_holds_init_lora_weights_and_loads_to_the_same_arrays_and_config(tmp_path):
    """What jpeft.save_adapter writes never held ``init`` (``to_dict`` has written PEFT's
    ``init_lora_weights`` since the first commit): a folder saved with the config made either way
    is the same bytes, and loads to the same config and arrays, without a warning."""
    x = jax.random.normal(jax.random.key(0), (3, 5))
    model = BoxedMLP(hidden=4, out=3)
    params = model.init(jax.random.key(1), x)
    new = jpeft.LoraConfig(r=2, alpha=3.0, target_modules=".*", init_weights="gaussian")
    with pytest.warns(DeprecationWarning, match=_LORA_INIT):
        old = jpeft.LoraConfig(r=2, alpha=3.0, target_modules=".*", init="gaussian")
    adapter = randomize_adapter(jpeft.init(new, params, jax.random.key(2), model, x), seed=3)
    jpeft.save_adapter(str(tmp_path / "new"), new, adapter)
    jpeft.save_adapter(str(tmp_path / "old"), old, adapter)
    files = sorted(p.name for p in (tmp_path / "new").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "old").iterdir())
    for name in files:
        assert (tmp_path / "new" / name).read_bytes() == (tmp_path / "old" / name).read_bytes(), name
    meta = json.loads((tmp_path / "new" / "jpeft_adapter.json").read_text())
    assert meta["config"]["init_lora_weights"] == "gaussian" and not {"init", "init_weights"} & set(meta["config"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg, loaded = jpeft.load_adapter(str(tmp_path / "new"), params)
    assert cfg == new
    for u, v in zip(jax.tree.leaves(loaded), jax.tree.leaves(adapter), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
