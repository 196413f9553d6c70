"""Every method config's fields take only values of their declared type (jpeft.config's one check),
from every entry point: Python keywords, ``replace``, and ``from_dict`` (TOML's [method] table,
``adapter_config.json``); lists of ids and names are checked where the config reads them."""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import jax
import numpy as np
import pytest

import jpeft
from jpeft.config import AdapterConfig, is_kind, registered_configs, scalar_kinds
from jpeft import hf as H
from jpeft.errors import ConfigError

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _models_tiny as T  # noqa: E402

# values of the wrong type for each declared scalar type: a quoted number, a float for an int
# (8.5 was kept; int() would truncate it), a bool for a number (True is 1), NaN / inf / beyond
# float32 (AdaLoRA's alpha=1e39 made its float32 scale inf; 10**400 raised a bare OverflowError), a list
_WRONG = {
    "int": ["8", 8.5, 2.0, True, [8], None],
    "float": ["16", True, float("nan"), float("inf"), 1e39, [1.0], None, 10 ** 400],  # 1e39: inf in float32
    "str": [5, 1.5, True, ["relu"], {"a": 1}, None],
    "bool": ["false", 0, 1, None],
}
_VALID = {"AdaLoraConfig": {"total_step": 100}}  # a field without which the config cannot be built


def _scalar_fields():
    for cls in registered_configs().values():
        if cls.__module__.startswith("jpeft."):
            for f in dataclasses.fields(cls):
                decl = scalar_kinds(f.type)
                if f.init and decl is not None:
                    yield cls, f.name, decl


def test_every_scalar_field_refuses_a_value_of_another_type():
    """token_dim="16", num_layers=2.5 (PromptTuningConfig), init_std=True (a std of 1.0, BottleneckConfig),
    scaling=nan (every output NaN), AdaLoraConfig(alpha=1e39), task_type=5 were kept as given; non_linearity=["relu"] raised a bare
    TypeError; now each is a ConfigError naming the config, the field, what it takes and what it got,
    from the constructor, replace and from_dict (TOML, adapter_config.json) alike."""
    checked = 0
    for cls, name, (kinds, optional) in _scalar_fields():
        base = dict(_VALID.get(cls.__name__, {}))
        for kind in kinds:
            for v in _WRONG[kind]:
                if any(k != kind and is_kind(v, k) for k in kinds) or (v is None and optional):
                    continue  # right for another declared type ("str | bool"), or None where it is optional
                want = rf"{cls.__name__}\.{name} must be "
                with pytest.raises(ConfigError, match=want):
                    cls(**{**base, name: v})
                with pytest.raises(ConfigError, match=want):
                    cls(**base).replace(**{name: v})
                d = cls(**base).to_dict()
                d[cls._hf_keys.get(name, name)] = v
                if kinds == ("bool",) and v is None:  # a null flag in adapter_config.json is false, as PEFT reads it
                    try:
                        assert getattr(AdapterConfig.from_dict(d), name) is False
                    except ConfigError as e:  # false is refused by the config itself (VeRA's save_projection)
                        assert "must be true or false" not in str(e), e
                    continue
                with pytest.raises(ConfigError, match=want):
                    AdapterConfig.from_dict(d)
                checked += 1
    assert checked > 150
    with pytest.raises(ConfigError, match=r"LoraConfig\.r must be an integer, found float 8\.5 \(a whole number"):
        jpeft.LoraConfig(r=8.5)
    with pytest.raises(ConfigError, match=r"LoraConfig\.alpha must be a number, found str '16' \(a quoted number"):
        jpeft.LoraConfig(alpha="16")
    with pytest.raises(ConfigError, match=r"BottleneckConfig\.scaling must be a finite number, found float nan"):
        jpeft.BottleneckConfig(scaling=float("nan"))
    with pytest.raises(ConfigError, match=r"LoraConfig\.r must be an integer"):
        jpeft.LoraConfig("8")  # a positional value is checked too


def test_every_default_config_round_trips_and_takes_numpy_scalars():
    """The declared types agree with what the configs hold (bias None is "none", prompt tuning's
    num_transformer_submodules may be null as PEFT's dataclass default is), and numpy's scalars count."""
    for cls in registered_configs().values():
        if cls.__module__.startswith("jpeft."):
            c = cls(**_VALID.get(cls.__name__, {}))
            assert AdapterConfig.from_json(c.to_json()) == c
    c = jpeft.LoraConfig(r=np.int64(4), alpha=np.float32(8.0), dropout=np.float64(0.1), bias=None)
    assert (c.r, c.alpha, c.bias) == (4, 8.0, "none")
    assert jpeft.PromptTuningConfig(num_virtual_tokens=2, num_transformer_submodules=None).num_transformer_submodules is None


def test_a_null_bias_reads_as_none_for_every_config_with_pefts_bias_option(tmp_path):
    """PEFT's bias option: LoraConfig read null as "none", OFTConfig and VeraConfig refused it
    ("must be a string, found NoneType None"), and jpeft.hf.load_peft refused a file's "bias": null
    for all three. One rule now (PEFT writes "none" and fails on null itself):
    null is the default, from Python and from a PEFT file (whose check refused a null even for LoRA),
    which then loads the adapter saved, as the same file with "none" does; another non-string is refused."""
    with_bias = [c for c in registered_configs().values()
                 if c.__module__.startswith("jpeft.") and "bias" in {f.name for f in dataclasses.fields(c)}]
    assert {c.__name__ for c in with_bias} == {"LoraConfig", "OFTConfig", "VeraConfig"}
    for cls in with_bias:
        assert cls(bias=None).bias == "none" and cls(bias=None) == cls()
        assert cls.from_dict({**cls().to_dict(), "bias": None}) == cls()
        with pytest.raises(ConfigError, match=rf"{cls.__name__}\.bias must be a string \(or None\), found int 3"):
            cls(bias=3)
    k = jax.random.normal(jax.random.key(5), (16, 16))
    params = {"params": {"model": {"layers_0": {"self_attn": {"q_proj": {"kernel": k}, "v_proj": {"kernel": -k}}}}}}
    for cfg in (jpeft.LoraConfig(r=2, target_modules=["q_proj"]), jpeft.OFTConfig(oft_block_size=4, target_modules=["q_proj"]),
                jpeft.VeraConfig(r=4, target_modules=["q_proj"])):
        ad = T.randomize_adapter(jpeft.init(cfg, params, jax.random.key(0)), 1)
        for bias in ("none", None):
            d = tmp_path / f"{cfg.peft_type}_{bias}"
            H.save_peft(str(d), cfg, ad, params=params)
            f = d / "adapter_config.json"
            f.write_text(json.dumps({**json.loads(f.read_text()), "bias": bias}))
            got_cfg, got = H.load_peft(str(d), params)
            assert got_cfg.bias == "none" and jax.tree.structure(got) == jax.tree.structure(ad)
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ad)):
                np.testing.assert_array_equal(a, b)


def test_prompt_init_token_ids_are_not_rounded_or_read_from_a_string():
    """init_token_ids="12" started the prompt from tokens (1, 2), [8.5] from token 8 and [True] from
    token 1, without a word (int() of each item); ["q"] or 3 raised a bare ValueError / TypeError."""
    PromptTuningConfig = jpeft.PromptTuningConfig

    for bad in ("12", [8.5], [True], ["q"], 3, [-1], {"a": 1}):
        with pytest.raises(ConfigError, match=r"PromptTuningConfig\.init_token_ids must be a list of token ids"):
            PromptTuningConfig(prompt_tuning_init="TEXT", init_token_ids=bad)
    assert PromptTuningConfig(prompt_tuning_init="TEXT", init_token_ids=np.array([5, 6])).init_token_ids == (5, 6)
    with pytest.raises(ConfigError, match=r"tokenizer_kwargs must be a dict"):
        PromptTuningConfig(tokenizer_kwargs="use_fast=False")
    for f in ("token_dim", "num_layers", "num_attention_heads"):  # counts PEFT records: 0 or negative was kept
        with pytest.raises(ConfigError, match=rf"PromptTuningConfig\.{f} must be a positive integer .*found 0"):
            PromptTuningConfig(**{f: 0})
    assert PromptTuningConfig(token_dim=16, num_layers=2, num_attention_heads=4).num_layers == 2


@pytest.mark.parametrize("field, bad, msg", [
    ("modules_to_save", 5, "modules_to_save must be a list of module names"),
    ("modules_to_save", {"lm_head": 1}, "modules_to_save must be a list of module names"),  # was its keys
    ("layers_pattern", 3, "layers_pattern must be the name of the layers' list"),
    ("layers_pattern", [1], "layers_pattern must be the name of the layers' list"),  # was "1"
    ("layers_to_transform", 1.5, "layers_to_transform must be a layer index or a list of them"),
    ("layers_to_transform", {"0": 1}, "layers_to_transform must be a layer index or a list of them"),
    ("trainable_token_indices", 1.5, "trainable_token_indices must be distinct token ids"),
])
def test_lora_list_fields_of_another_type_are_named(field, bad, msg):
    """Each raised a bare TypeError ('float' object is not iterable) or kept a dict's keys."""
    kw = {"target_modules": ["q_proj"]}
    with pytest.raises(ConfigError, match=msg):
        jpeft.LoraConfig(**kw, **{field: bad})
    assert jpeft.LoraConfig(**kw, layers_to_transform=range(2)).layers_to_transform == (0, 1)
    assert jpeft.LoraConfig(trainable_token_indices=np.array([3, 4])).trainable_token_indices == (3, 4)


@pytest.mark.parametrize("cls, kw", [
    ("LoraConfig", {"layers_to_transform": np.arange(2)}),
    ("LoraConfig", {"layers_to_transform": np.int64(1)}),
    ("LoraConfig", {"rank_pattern": {"v_proj": np.int64(2)}, "alpha_pattern": {"q_proj": np.float32(3.0)}}),
    ("LoHaConfig", {"rank_pattern": {"v_proj": np.int64(2)}, "alpha_pattern": {"q_proj": np.float32(3.0)}}),
])
def test_numpy_values_in_list_and_dict_fields_are_kept_as_pythons(cls, kw, tmp_path):
    """np.arange(2) for layers_to_transform or np.int64 / np.float32 values in rank_pattern and
    alpha_pattern were taken and trained with, then jpeft.save_adapter failed ("metadata must be
    JSON-able: Object of type int64 ...", naming no field) and save_peft raised a bare TypeError."""
    import jax
    import jax.numpy as jnp
    from jpeft.models import LlamaConfig, LlamaForCausalLM

    c = getattr(jpeft, cls)(r=4, target_modules=["q_proj", "v_proj"], **kw)
    d = c.to_dict()
    assert AdapterConfig.from_json(c.to_json()) == c
    for k, v in kw.items():  # the same values, as Python's own
        got = d[k]
        want = (v.tolist() if isinstance(v, np.ndarray) else v.item() if isinstance(v, np.generic)
                else {n: x.item() for n, x in v.items()})
        assert got == want and type(got) is type(want), (k, got)
        assert all(type(x) in (int, float) for x in (got.values() if isinstance(got, dict)
                                                     else got if isinstance(got, list) else [got]))
    m = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                                     num_kv_heads=2))
    p = m.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))
    jpeft.save_adapter(str(tmp_path / "a"), c, jpeft.init(c, p, jax.random.key(1)))
    assert jpeft.load_adapter(str(tmp_path / "a"), p)[0] == c


def test_adalora_rank_pattern_takes_numpy_bools_as_pythons():
    """A pattern of numpy bools (a mask's rows: list(mask[i]) or the array itself) was refused as not
    booleans; kept, the config would not have saved as JSON either."""
    mask = np.array([True, False, True, True])
    c = jpeft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, rank_pattern={
        "model.layers.0.self_attn.q_proj.lora_E": list(mask), "model.layers.0.self_attn.v_proj.lora_E": mask})
    assert set(c.rank_pattern.values()) == {(True, False, True, True)}
    assert all(type(b) is bool for v in c.rank_pattern.values() for b in v)
    assert AdapterConfig.from_json(c.to_json()) == c


def test_layers_to_transform_past_the_last_layer_is_named_in_a_warning():
    """layers_to_transform=[0, 5] on a 2-layer model adapted layer 0 alone, without a word (PEFT ignores
    such indices too): the ignored indices are named, as an unmatched target_modules entry is."""
    import warnings

    import jax
    import jax.numpy as jnp
    from jpeft.models import LlamaConfig, LlamaForCausalLM

    m = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                                     num_kv_heads=2))
    x = jnp.ones((1, 4), jnp.int32)
    p = m.init(jax.random.key(0), x)
    cfg = jpeft.LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[0, 5])
    with pytest.warns(RuntimeWarning, match=r"layers_to_transform \[5\] select no layer .*layer indices: \[0, 1\]"):
        ad = jpeft.init(cfg, p, jax.random.key(1), m, x)
    assert sorted(ad) == ["model/layers_0/self_attn/q_proj"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        jpeft.init(cfg.replace(layers_to_transform=[1]), p, jax.random.key(1), m, x)
    # a layer-scanned base without the model: no layer index can be read, so the config's layers seemed to select
    # nothing ("layer indices: []" in a warning, then "removed every one of them; widen those options"); the
    # missing model is what is named, as without layers_to_transform
    from jpeft.errors import LayoutError

    scanned = LlamaForCausalLM(m.config.replace(scan_layers=True))
    ps = scanned.init(jax.random.key(0), x)
    for c in (cfg.replace(layers_to_transform=[0, 1]), cfg.replace(layers_to_transform=None)):
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            with pytest.raises(LayoutError, match=r"Pass the model and an example input"):
                jpeft.init(c, ps, jax.random.key(1))
    assert sorted(jpeft.init(cfg.replace(layers_to_transform=[0, 1]), ps, jax.random.key(1), scanned, x)) == [
        "model/layers/self_attn/q_proj"]
