"""jpeft.hf against the real peft package: adapters made by peft load into jpeft with equal
logits, adapters saved by jpeft load in peft.PeftModel.from_pretrained with equal logits and
no key warnings (LoRA, rsLoRA, rank_pattern/alpha_pattern, GPT-2 fan_in_fan_out, embeddings,
DoRA), and bad adapters raise named errors."""

import copy
import dataclasses
import functools
import json
import logging
import os
import pathlib
import re
import shutil
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import _models_tiny as T  # noqa: E402

import jpeft  # noqa: E402
from jpeft import hf as H  # noqa: E402
from jpeft import models as M  # noqa: E402
from jpeft.errors import (  # noqa: E402
    BaseMismatchError,
    CheckpointError,
    LoadError,
    UnsafeFileError,
    UnsupportedAdapterError,
)

peft = __import__("peft")  # a test dependency: missing means a broken install, not a skip
torch = __import__("torch")  # a test dependency: missing means a broken install, not a skip
PEFT_22 = T.peft_at_least(0, 22)  # where PEFT 0.21 and 0.22 differ


@functools.lru_cache(maxsize=None)
def loaded(family):
    return M.from_pretrained(T.hf_model(family)[1])


def _peft_logits(pm, family, ids, mask):
    with torch.no_grad():
        if family == "bert":
            out = pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
        else:
            out = pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(T.positions(mask)))
    return out.logits.float().numpy()


def _jpeft_logits(family, adapter, ids, mask):
    model, params = loaded(family)
    return np.asarray(jpeft.apply(model, params, adapter, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))


def _close(family, a, b, mask):
    if family == "bert":
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    else:
        sel = mask.astype(bool)
        np.testing.assert_allclose(a[sel], b[sel], atol=1e-4, rtol=0)


PEFT_CASES = {
    "llama2": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"]),
    "qwen2": dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj", "o_proj", "down_proj"],
                  rank_pattern={"o_proj": 2, r"layers\.1\.self_attn\.q_proj": 6}, alpha_pattern={"down_proj": 3.0}),
    "gpt2": dict(r=3, lora_alpha=6, target_modules=["c_attn", "c_fc", "c_proj"], fan_in_fan_out=True),
    "bert": dict(r=2, lora_alpha=4, target_modules=["query", "value", "dense"]),
    "mistral": dict(r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj"], use_dora=True),
}


@pytest.mark.parametrize("family", list(PEFT_CASES))
def test_peft_made_adapter_loads_into_jpeft(family, tmp_path):
    hf, _ = T.hf_model(family)
    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(init_lora_weights=False, **PEFT_CASES[family]))
    pm.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(tmp_path)
    ids, mask = T.batch(family, seed=11)
    ref = _peft_logits(pm, family, ids, mask)
    base = T.torch_logits(family, ids, mask)
    assert np.abs(ref - base).max() > 1e-2  # lora_B is not zero: the adapter changes the output
    _, params = loaded(family)
    config, adapter = H.load_peft(str(tmp_path), params)
    assert isinstance(config, jpeft.LoraConfig)
    _close(family, _jpeft_logits(family, adapter, ids, mask), ref, mask)
    if family == "qwen2":
        assert config.use_rslora and adapter["model/layers_1/self_attn/q_proj"].r == 6
        assert adapter["model/layers_0/self_attn/o_proj"].r == 2
        np.testing.assert_allclose(adapter["model/layers_0/mlp/down_proj"].scale, 3.0 / 2.0)  # rsLoRA: 3/sqrt(4)


def test_nora_and_astra_files_load_as_peft_reads_them(tmp_path):
    """PEFT 0.22's NoRA init (init_lora_weights="nora": A's columns normalised, B = 0, base unchanged) was
    refused as an unknown init; its files hold both factors, so they load with PEFT 0.22's logits (every
    tensor random). PEFT 0.21 has no NoRA and refuses such a file itself; jpeft reads it as 0.22 does (the
    file, written by hand under 0.21 as 0.22 writes it, gives the trained model's logits). An astra_config
    beside another init is ignored by PEFT (with a warning) and so by jpeft; the Astra init, whose base
    PEFT rebuilds from calibration data, is refused by name with PEFT's conversion."""
    hf, _ = T.hf_model("mistral")
    kw = dict(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    torch.manual_seed(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(hf),
                                 peft.LoraConfig(**kw, init_lora_weights="nora" if PEFT_22 else False))
        if PEFT_22:  # NoRA's init: unit-norm columns of A, B zero
            a = pm.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.detach().numpy()
            np.testing.assert_allclose(np.linalg.norm(a, axis=0), 1.0, rtol=1e-5)
        pm = T.perturb_trainable(pm, 3)
        pm.save_pretrained(tmp_path)
    ids, mask = T.batch("mistral", seed=11)
    ref = _peft_logits(pm, "mistral", ids, mask)
    assert np.abs(ref - T.torch_logits("mistral", ids, mask)).max() > 1e-2
    f = tmp_path / "adapter_config.json"
    d = json.loads(f.read_text())
    if not PEFT_22:
        d.update(init_lora_weights="nora", astra_config=None, peft_version="0.22.0")
        f.write_text(json.dumps(d))
    assert d["init_lora_weights"] == "nora" and d["astra_config"] is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if PEFT_22:
            _close("mistral", _peft_logits(peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path)).eval(),
                                           "mistral", ids, mask), ref, mask)
        else:
            with pytest.raises(ValueError, match="Unknown initialization"):
                peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path))
    _, params = loaded("mistral")
    for astra in (None, {"cache_file": None, "verbose": True}):  # PEFT ignores Astra's options beside another init
        f.write_text(json.dumps(dict(d, astra_config=astra)))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            config, adapter = H.load_peft(str(tmp_path), params)
        assert len(adapter) == 4 and not any(n.frozen_b for n in adapter.values())
        _close("mistral", _jpeft_logits("mistral", adapter, ids, mask), ref, mask)
    f.write_text(json.dumps(dict(d, init_lora_weights="astra", astra_config={"verbose": False})))
    with pytest.raises(UnsupportedAdapterError, match=r"init_lora_weights='astra'.*calibration data.*"
                       r"path_initial_model_for_weight_conversion"):
        H.load_peft(str(tmp_path), params)


def test_pattern_keys_match_as_peft_not_on_jpeft_paths(tmp_path):
    """A rank/alpha_pattern key that fits jpeft's path (model/layers_1/...) but not PEFT's dotted
    name leaves the module at r / lora_alpha in PEFT, and so in jpeft (it was applied: 0.97 off)."""
    hf, _ = T.hf_model("mistral")
    torch.manual_seed(1)
    cfg = peft.LoraConfig(init_lora_weights=False, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                          alpha_pattern={r".*_1.*q_proj": 32, r".*\.1\.self_attn\.v_proj": 2})
    pm = peft.get_peft_model(copy.deepcopy(hf), cfg).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(tmp_path)
    ids, mask = T.batch("mistral", seed=11)
    _, params = loaded("mistral")
    config, adapter = H.load_peft(str(tmp_path), params)
    assert adapter["model/layers_1/self_attn/q_proj"].scale == 2.0  # PEFT: lora_alpha / r, the key does not apply
    assert adapter["model/layers_1/self_attn/v_proj"].scale == 0.5
    assert config.rank_alpha("model/layers_1/self_attn/q_proj") == (4, 8.0)  # the config agrees with the sites
    _close("mistral", _jpeft_logits("mistral", adapter, ids, mask), _peft_logits(pm, "mistral", ids, mask), mask)


def test_plain_inits_load_with_their_init_options(tmp_path):
    """An EVA-initialised adapter (PEFT writes init_lora_weights="eva" always with an eva_config, and the
    ranks / alphas EVA chose as rank_pattern / alpha_pattern) was refused ("options jpeft cannot load:
    {'eva_config': ...}"), though "eva" leaves the base alone and PEFT does not rerun it on load; so were
    corda_config / loftq_config / lora_ga_config beside an init that does not read them (PEFT ignores them).
    The inits that change the base stay refused by their name."""
    hf, _ = T.hf_model("mistral")
    torch.manual_seed(1)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="eva",
                          eva_config=peft.EvaConfig(rho=1.5), rank_pattern={r"layers\.0\.self_attn\.q_proj": 6},
                          alpha_pattern={"v_proj": 3.0})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(hf), cfg)
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:  # every factor random (EVA leaves lora_B at zero)
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
        pm.eval().save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["eva_config"]["rho"] == 1.5
    ids, mask = T.batch("mistral", seed=11)
    ref = _peft_logits(pm, "mistral", ids, mask)
    _, params = loaded("mistral")
    config, adapter = H.load_peft(str(tmp_path), params)
    assert adapter["model/layers_0/self_attn/q_proj"].r == 6 and adapter["model/layers_1/self_attn/v_proj"].scale == 0.75
    _close("mistral", _jpeft_logits("mistral", adapter, ids, mask), ref, mask)
    d = json.loads((tmp_path / "adapter_config.json").read_text())
    for k, v in (("corda_config", {"corda_method": "ipm"}), ("loftq_config", {"loftq_bits": 4}),
                 ("lora_ga_config", {"direction": "ArB2r"})):  # beside init True: PEFT ignores them
        (tmp_path / "adapter_config.json").write_text(json.dumps(dict(d, init_lora_weights=True, **{k: v})))
        _close("mistral", _jpeft_logits("mistral", H.load_peft(str(tmp_path), params)[1], ids, mask), ref, mask)
    for init, k in (("corda", "corda_config"), ("loftq", "loftq_config"), ("lora_ga", "lora_ga_config")):
        (tmp_path / "adapter_config.json").write_text(json.dumps(dict(d, init_lora_weights=init, **{k: {"a": 1}})))
        with pytest.raises(UnsupportedAdapterError, match=rf"init_lora_weights='{init}'.*path_initial_model"):
            H.load_peft(str(tmp_path), params)
    # MiCA leaves the base alone too and applies as LoRA with lora_B frozen (embeddings too): it loads with B
    # frozen, without a warning (it was refused as an unknown init, then loaded with both factors trained)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=4, lora_alpha=8, target_modules=[
            "embed_tokens", "q_proj"], init_lora_weights="mica"))
        init_b = {n: p.detach().numpy().copy() for n, p in pm.named_parameters()
                  if "lora_B" in n or "lora_embedding_B" in n}
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.add_(0.3 * torch.randn(p.shape, generator=g))
        pm.eval().save_pretrained(tmp_path / "mica")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg, adapter = H.load_peft(str(tmp_path / "mica"), params)
    assert cfg.init_weights == "mica" and all(n.frozen_b for n in adapter.values()) and len(adapter) == 3
    _close("mistral", _jpeft_logits("mistral", adapter, ids, mask), _peft_logits(pm, "mistral", ids, mask), mask)
    # jpeft's own MiCA init takes PEFT's B (up to each singular vector's sign), the embedding's too
    mine = jpeft.init(cfg, params, jax.random.key(0))
    assert len(init_b) == 3
    for n, want in init_b.items():
        path = n.split(".lora_")[0].replace("base_model.model.", "", 1).replace(".", "/").replace("layers/", "layers_")
        got = np.asarray(mine[path].lora_B).T
        np.testing.assert_allclose(got * np.sign(np.sum(got * want, axis=0)), want, atol=2e-5)


def test_bias_all_copies_under_the_wrapper_keys_are_checked(tmp_path):
    """bias="all" with modules_to_save: PEFT's file holds each copy's bias also as
    <module>.modules_to_save.bias (and the original's as <module>.original_module.bias); such files were
    refused as a mismatched base (tests/test_interop_matrix.py compares their logits). The second key of a
    copy's bias must be the same tensor: one that differs is named, not loaded either way."""
    from safetensors.numpy import load_file, save_file

    hf, _ = T.hf_model("bert")
    torch.manual_seed(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query"],
                                                                    bias="all", modules_to_save=["classifier"]))
        pm.save_pretrained(tmp_path)
    f = str(tmp_path / "adapter_model.safetensors")
    t = load_file(f)
    k = "base_model.model.classifier.modules_to_save.bias"
    assert k in t and "base_model.model.classifier.original_module.bias" in t
    _, params = loaded("bert")
    H.load_peft(str(tmp_path), params)
    save_file({**t, k: t[k] + 1.0}, f)
    with pytest.raises(CheckpointError, match=r"two different values for the bias of its modules_to_save copy of .classifier."):
        H.load_peft(str(tmp_path), params)


def test_null_flags_in_a_peft_config_read_as_false_as_peft_reads_them(tmp_path):
    """adapter_config.json files with null for a bool flag (older PEFT versions, other writers):
    PEFT tests each flag by truth value, so null is false; jpeft refused the file (a ConfigError
    "must be true or false, found NoneType None")."""
    hf, _ = T.hf_model("mistral")
    torch.manual_seed(1)
    cfg = peft.LoraConfig(init_lora_weights=False, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(copy.deepcopy(hf), cfg).save_pretrained(tmp_path)
    d = json.loads((tmp_path / "adapter_config.json").read_text())
    d.update(use_rslora=None, use_dora=None, lora_bias=None)
    (tmp_path / "adapter_config.json").write_text(json.dumps(d))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path)).eval()
    ids, mask = T.batch("mistral", seed=11)
    config, adapter = H.load_peft(str(tmp_path), loaded("mistral")[1])
    assert (config.use_rslora, config.use_dora, config.lora_bias) == (False, False, False)
    _close("mistral", _jpeft_logits("mistral", adapter, ids, mask), _peft_logits(pm, "mistral", ids, mask), mask)
    # NumPy's bool (its type is named "bool" in NumPy 2) is a bool too, kept as Python's so to_dict writes JSON
    c = jpeft.LoraConfig(r=2, target_modules=["q_proj"], use_rslora=np.True_)
    assert c.use_rslora is True and json.loads(c.to_json())["use_rslora"] is True


def test_a_peft_config_without_lora_alpha_gets_pefts_default(saved_llama, tmp_path):
    """PEFT's LoraConfig defaults lora_alpha to 8, jpeft's LoraConfig to 16: a hand-written
    adapter_config.json without it loaded with every update scaled 2x (as alpha 16), silently;
    peft itself reads it as 8."""
    d = tmp_path / "no_alpha"
    shutil.copytree(saved_llama, d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    del cfg["lora_alpha"]
    cfg.pop("alpha_pattern", None)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    assert peft.LoraConfig.from_pretrained(str(d)).lora_alpha == 8
    config, adapter = H.load_peft(str(d), loaded("llama2")[1])
    assert config.alpha == 8 and {float(n.scale) for n in adapter.values()} == {8 / cfg["r"]}


def test_dora_magnitudes_with_a_config_without_use_dora_are_refused(tmp_path):
    """A DoRA file whose adapter_config.json says use_dora=false (hand-edited, or a config copied
    from another run) loaded as a plain LoRA with every lora_magnitude_vector dropped silently (1.6
    in the logits on the tiny Llama); the same mismatch for lora_bias was already a CheckpointError."""
    hf, _ = T.hf_model("llama2")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
        pm.save_pretrained(str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["use_dora"] = False
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="lora_magnitude_vector.*use_dora=False"):
        H.load_peft(str(tmp_path), loaded("llama2")[1])


@pytest.mark.parametrize("family", ["mistral", "llama3"])
def test_save_embedding_layers_copies_load_when_equal_to_the_base(family, tmp_path):
    """PEFT's save_pretrained(save_embedding_layers=True) (and "auto" after a vocabulary resize)
    writes full copies of model.embed_tokens and lm_head, which PeftModel.from_pretrained loads into
    the model: they were refused as keys "with no matching module in the base" (with a hint about
    tied embeddings even on the untied Mistral); equal to the base they load, changed they are named."""
    hf, _ = T.hf_model(family)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                                     init_lora_weights=False)).eval()
        pm.save_pretrained(str(tmp_path / "a"), save_embedding_layers=True)
    ids, mask = T.batch(family, seed=1)
    _, adapter = H.load_peft(str(tmp_path / "a"), loaded(family)[1])
    _close(family, _jpeft_logits(family, adapter, ids, mask), _peft_logits(pm, family, ids, mask), mask)
    with torch.no_grad():
        pm.get_input_embeddings().weight[5] += 1.0  # a re-initialised row PEFT would load
        pm.save_pretrained(str(tmp_path / "b"), save_embedding_layers=True)
    with pytest.raises(BaseMismatchError, match="differs from the base's in 1 row"):
        H.load_peft(str(tmp_path / "b"), loaded(family)[1])


# save_embedding_layers=True with a wrapped embedding or lm_head: (family, PEFT options, the key that duplicates a
# trained array, the key that copies the base weight)
WRAPPED_EMBEDDINGS = {
    "copy of a tied embedding": ("llama3", dict(modules_to_save=["embed_tokens"]),
                                 "model.embed_tokens.modules_to_save.weight", "model.embed_tokens.original_module.weight"),
    "tokens on a tied embedding": ("llama3", dict(trainable_token_indices=[3, 5]),
                                   "lm_head.token_adapter.trainable_tokens_delta", "lm_head.token_adapter.base_layer.weight"),
    "copy of an untied lm_head": ("mistral", dict(modules_to_save=["lm_head"]),
                                  "lm_head.modules_to_save.weight", "lm_head.original_module.weight"),
    "tied copy, ensure_weight_tying": ("qwen2", dict(modules_to_save=["embed_tokens"], ensure_weight_tying=True),
                                       "lm_head.modules_to_save.weight", "lm_head.original_module.weight"),
}


@pytest.mark.parametrize("case", list(WRAPPED_EMBEDDINGS))
def test_save_embedding_layers_with_wrapped_embeddings(case, tmp_path):
    """save_embedding_layers=True (also what "auto" does after resize_token_embeddings) saves every
    state-dict entry of a modules_to_save or trainable-tokens wrapper on an embedding or lm_head:
    ``original_module.weight`` / ``token_adapter.base_layer.weight`` (the base weight),
    ``modules_to_save.weight`` (the trained copy again) and, on a tied model, lm_head's shared token
    delta and its base ``lm_head.weight``. PeftModel.from_pretrained loads such files; jpeft refused
    every one as "trained on another model". They load, and a copy that disagrees is named."""
    family, opts, dup, base_copy = WRAPPED_EMBEDDINGS[case]
    from safetensors.numpy import load_file, save_file

    hf, _ = T.hf_model(family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                                     init_lora_weights=False, **opts))
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():  # every trainable tensor off its start (copies equal the base, deltas zero)
            for _, p in pm.named_parameters():
                if p.requires_grad:
                    p.add_(0.3 * torch.randn(p.shape, generator=g))
        pm.eval().save_pretrained(str(tmp_path / "a"), save_embedding_layers=True)
    weights = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    assert {H.PEFT_PREFIX + dup, H.PEFT_PREFIX + base_copy} <= set(tensors)
    ids, mask = T.batch(family, seed=1)
    ref = _peft_logits(pm, family, ids, mask)
    assert np.abs(ref - _peft_logits(hf, family, ids, mask)).max() > 1e-2
    _, adapter = H.load_peft(str(tmp_path / "a"), loaded(family)[1])
    _close(family, _jpeft_logits(family, adapter, ids, mask), ref, mask)
    for key, err, match in ((dup, CheckpointError, "inconsistent"), (base_copy, BaseMismatchError, "differs from the base")):
        bad = dict(tensors)
        bad[H.PEFT_PREFIX + key] = bad[H.PEFT_PREFIX + key] + 1.0
        save_file(bad, str(weights))
        with pytest.raises(err, match=match):
            H.load_peft(str(tmp_path / "a"), loaded(family)[1])


def test_trainable_token_keys_match_as_the_files_peft_matches_them(tmp_path):
    """PEFT's _set_trainable, which wraps the embeddings a dict trainable_token_indices names, matches
    each key as a suffix of a module's dotted name before 0.22 and on whole components from 0.22 on
    (utils/other.py _is_valid_match): {"type_embeddings": ids} selects BERT's token_type_embeddings in
    PEFT 0.21 and nothing in PEFT 0.22 (get_peft_model and from_pretrained raise). jpeft read such keys
    by the suffix alone, so a 0.22 file that PEFT 0.22 cannot load loaded. Now the file's
    peft_version decides: a 0.21 file gives PEFT's logits (every tensor random), a 0.22 one is
    refused by name, as PEFT 0.22 refuses it."""
    from jpeft.errors import TargetNotFoundError

    hf, _ = T.hf_model("bert")
    ids, mask = T.batch("bert", seed=2)
    full = "bert.embeddings.token_type_embeddings"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if PEFT_22:  # the short key selects no module in PEFT 0.22
            with pytest.raises(ValueError, match="not found in the base model"):
                peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(
                    r=2, target_modules=["query"], trainable_token_indices={"type_embeddings": [0, 1]}))
        key = full if PEFT_22 else "type_embeddings"  # PEFT 0.21 writes the short key itself
        pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=2, target_modules=["query"],
                                                                     trainable_token_indices={key: [0, 1]}))
        T.perturb_trainable(pm, seed=4)
        pm.save_pretrained(str(tmp_path / "native"))
    ref = _peft_logits(pm, "bert", ids, mask)
    assert np.abs(ref - _peft_logits(hf, "bert", ids, mask)).max() > 1e-2  # the token rows and the LoRA act
    for version in ("0.21.2", "0.22.0"):
        d = tmp_path / version
        shutil.copytree(tmp_path / "native", d)
        cfg = json.loads((d / "adapter_config.json").read_text())
        (d / "adapter_config.json").write_text(json.dumps(
            {**cfg, "peft_version": version, "trainable_token_indices": {"type_embeddings": [0, 1]}}))
        if version == "0.21.2":
            _, adapter = H.load_peft(str(d), loaded("bert")[1])
            _close("bert", _jpeft_logits("bert", adapter, ids, mask), ref, mask)
            continue
        with pytest.raises(TargetNotFoundError, match=r"PEFT 0\.22, which matches such a name on whole components.*"
                                                      r"'bert\.embeddings\.token_type_embeddings'"):
            H.load_peft(str(d), loaded("bert")[1])
        if PEFT_22:
            with warnings.catch_warnings(), pytest.raises(ValueError, match="not found in the base model"):
                warnings.simplefilter("ignore")
                peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(d))


@pytest.mark.parametrize("option", ["kasa_config", "monteclora_config", "velora_config"])
def test_lora_variants_are_refused_by_name(saved_llama, tmp_path, option):
    """PEFT 0.21's KaSA / MonteCLoRA / VeLoRA LoRA variants are named in the refusal (they were a
    BaseMismatchError saying the adapter was made for another model)."""
    d = tmp_path / "v"
    shutil.copytree(saved_llama, d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg[option] = {}
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedAdapterError, match=option):
        H.load_peft(str(d), loaded("llama2")[1])


def _key_warnings(records):
    return [str(r) for r in records if any(w in str(r).lower() for w in ("missing", "unexpected"))]


def _peft_load_quietly(hf, path, caplog):
    with warnings.catch_warnings(record=True) as rec, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(path))
    msgs = [str(w.message) for w in rec] + [r.getMessage() for r in caplog.records]
    assert _key_warnings(msgs) == [], msgs
    pm.eval()
    return pm


def _random_adapter(family, cfg, seed=0):
    model, params = loaded(family)
    adapter = jpeft.init(cfg, params, jax.random.key(seed))
    # trained-looking: every factor random and non-zero (an embedding LoRA starts with A = 0)
    keys = iter(jax.random.split(jax.random.key(seed + 100), 2 * len(adapter)))
    return {p: dataclasses.replace(n, lora_A=n.lora_A + 0.2 * jax.random.normal(next(keys), n.lora_A.shape),
                                   lora_B=0.2 * jax.random.normal(next(keys), n.lora_B.shape))
            for p, n in adapter.items()}


JPEFT_CASES = {
    "llama3": jpeft.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"]),
    "qwen2": jpeft.LoraConfig(r=4, alpha=4, use_rslora=True, target_modules=r".*\.(q_proj|o_proj|up_proj)",
                              rank_pattern={"o_proj": 2}, alpha_pattern={"layers_1/mlp/up_proj": 10.0}),
    "gpt2": jpeft.LoraConfig(r=2, alpha=5, target_modules=["c_attn", "c_proj", "wte"]),
    "bert": jpeft.LoraConfig(r=2, alpha=4, target_modules=["query", "value"]),
    "llama2": jpeft.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj"], use_dora=True),
}


@pytest.mark.parametrize("family", list(JPEFT_CASES))
def test_jpeft_adapter_loads_in_peft_without_key_warnings(family, tmp_path, caplog):
    cfg = JPEFT_CASES[family]
    adapter = _random_adapter(family, cfg)
    H.save_peft(str(tmp_path), cfg, adapter, base_model_name_or_path=T.hf_model(family)[1])
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    hf, _ = T.hf_model(family)
    pm = _peft_load_quietly(hf, tmp_path, caplog)
    # exactly the keys and shapes peft itself would save for this config
    from safetensors.numpy import load_file

    ours = load_file(str(tmp_path / "adapter_model.safetensors"))
    theirs = peft.get_peft_model_state_dict(pm)
    theirs = {k: v for k, v in theirs.items() if not k.endswith("base_layer.weight")}
    assert {k: v.shape for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    ids, mask = T.batch(family, seed=12)
    ref = _peft_logits(pm, family, ids, mask)
    out = _jpeft_logits(family, adapter, ids, mask)
    _close(family, out, ref, mask)
    assert np.abs(out - T.torch_logits(family, ids, mask)).max() > 1e-2
    if family == "gpt2":
        assert saved["fan_in_fan_out"] is True
    if family == "qwen2":
        assert saved["use_rslora"] and saved["rank_pattern"] and saved["alpha_pattern"]
        assert pm.base_model.model.model.layers[0].self_attn.o_proj.r["default"] == 2
    # and back into jpeft: same arrays
    config2, adapter2 = H.load_peft(str(tmp_path), loaded(family)[1])
    assert sorted(adapter2) == sorted(adapter)
    for p in adapter:
        np.testing.assert_allclose(np.asarray(adapter2[p].lora_B), np.asarray(adapter[p].lora_B), rtol=1e-6)
        assert adapter2[p].scale == pytest.approx(adapter[p].scale)


# -- bad adapters ---------------------------------------------------------------------------------------

@pytest.fixture()
def saved_llama(tmp_path):
    cfg = jpeft.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"])
    H.save_peft(str(tmp_path / "a"), cfg, _random_adapter("llama2", cfg))
    return tmp_path / "a"


def test_params_without_arrays_are_named_not_called_a_corrupt_file(saved_llama):
    """load_peft given the graphdef of from_pretrained(..., api="nnx") (whose state it needs), or an
    empty tree, said the adapter file "declares 896 adapter numbers, more than the 0 parameters of
    the whole base model... truncated or corrupted; copy it again"; it now names the params."""
    graphdef, state = M.from_pretrained(T.hf_model("llama2")[1], api="nnx")
    for wrong in (graphdef, {"params": {}}):
        with pytest.raises(jpeft.ConfigError, match=r"hold no parameter arrays .* the state"):
            H.load_peft(str(saved_llama), wrong)
    assert len(H.load_peft(str(saved_llama), state)[1]) == 4  # the state reads


def test_unsupported_adapter_type(saved_llama):
    d = json.loads((saved_llama / "adapter_config.json").read_text())
    d["peft_type"] = "BOFT"
    (saved_llama / "adapter_config.json").write_text(json.dumps(d))
    with pytest.raises(UnsupportedAdapterError, match=r"adapter type 'BOFT'.*supported peft_type values: \[.*'LORA'"):
        H.load_peft(str(saved_llama), loaded("llama2")[1])
    # PEFT's standalone trainable tokens: the refusal says how to get them into jpeft
    (saved_llama / "adapter_config.json").write_text(json.dumps({"peft_type": "TRAINABLE_TOKENS", "token_indices": [3]}))
    with pytest.raises(UnsupportedAdapterError, match=r"'TRAINABLE_TOKENS'.*LoraConfig\(target_modules=.*trainable_token_indices"):
        H.load_peft(str(saved_llama), loaded("llama2")[1])


def test_unsupported_lora_options(saved_llama):
    d = json.loads((saved_llama / "adapter_config.json").read_text())
    for k, v in (("layer_replication", [[0, 1]]), ("use_bdlora", True)):
        e = dict(d, **{k: v})
        (saved_llama / "adapter_config.json").write_text(json.dumps(e))
        with pytest.raises(UnsupportedAdapterError, match=rf"options jpeft cannot load: \{{'{k}'"):
            H.load_peft(str(saved_llama), loaded("llama2")[1])
        # and the same options in a config (jpeft train's [method] table, LoraConfig.from_dict) are refused too
        with pytest.raises(jpeft.ConfigError, match=rf"options jpeft does not implement: \{{'{k}'"):
            jpeft.LoraConfig.from_dict({"r": 2, k: v})


def test_keys_that_do_not_match_the_base(saved_llama):
    # a Llama adapter on GPT-2: nothing matches on either side
    d = json.loads((saved_llama / "adapter_config.json").read_text())
    d["target_modules"] = ["c_attn", "q_proj"]
    (saved_llama / "adapter_config.json").write_text(json.dumps(d))
    with pytest.raises(BaseMismatchError, match=r"(?s)8 key\(s\) of the file.*first: \['base_model\.model\.model\.layers\.0\."
                       r"self_attn\.q_proj\.lora_A\.weight'.*2 targeted module\(s\) of the base.*'transformer\.h\.0\.attn\.c_attn'"):
        H.load_peft(str(saved_llama), loaded("gpt2")[1])


def test_adapter_for_more_layers_than_the_base(saved_llama):
    from safetensors.numpy import load_file, save_file

    t = load_file(str(saved_llama / "adapter_model.safetensors"))
    extra = {k.replace("layers.1.", "layers.7."): v for k, v in t.items() if "layers.1." in k}
    save_file({**t, **extra}, str(saved_llama / "adapter_model.safetensors"))
    with pytest.raises(BaseMismatchError, match=r"4 key\(s\) of the file have no matching module.*layers\.7\.self_attn"):
        H.load_peft(str(saved_llama), loaded("llama2")[1])


def test_an_adapter_of_another_model_names_the_base_its_config_names(saved_llama):
    """A new user's PEFT folder from another model: the error said "Load it on the base it was made
    for" without saying which that is, though adapter_config.json names it; and a side with
    nothing unmatched read "0 targeted module(s) of the base have no weights in the file (first:
    [])". The base is named, and an empty side left out."""
    d = json.loads((saved_llama / "adapter_config.json").read_text())
    (saved_llama / "adapter_config.json").write_text(json.dumps(dict(d, base_model_name_or_path="meta-llama/Llama-2-7b-hf")))
    names_it = re.escape(f"{saved_llama / 'adapter_config.json'} names its base: 'meta-llama/Llama-2-7b-hf'.") + "$"
    with pytest.raises(BaseMismatchError) as e:
        H.load_peft(str(saved_llama), loaded("gpt2")[1])  # no key matches; GPT-2 has no q_proj / v_proj to miss theirs
    assert re.search(r"8 key\(s\) of the file have no matching module.*" + names_it, str(e.value))
    assert "targeted module(s)" not in str(e.value)
    with pytest.raises(BaseMismatchError, match=r"maps 32 -> 32 features, but the base module maps 32 -> 16.*" + names_it):
        H.load_peft(str(saved_llama), loaded("qwen2")[1])  # the modules match, their widths do not


def test_shape_mismatch_with_the_base(saved_llama):
    # llama2 has 4 kv heads (v_proj 32 -> 32); qwen2 has 2 (v_proj 32 -> 16)
    with pytest.raises(BaseMismatchError, match=r"maps 32 -> 32 features, but the base module maps 32 -> 16"):
        H.load_peft(str(saved_llama), loaded("qwen2")[1])


def test_missing_and_truncated_files(saved_llama, tmp_path):
    params = loaded("llama2")[1]
    with pytest.raises(LoadError, match="is not a folder"):
        H.load_peft(str(tmp_path / "nope"), params)
    b = tmp_path / "b"
    shutil.copytree(saved_llama, b)
    f = b / "adapter_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-64])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        H.load_peft(str(b), params)
    os.remove(f)
    with pytest.raises(LoadError, match="has no adapter_model.safetensors"):
        H.load_peft(str(b), params)
    (b / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(UnsafeFileError, match="only pickle weights"):
        H.load_peft(str(b), params)
    os.remove(b / "adapter_config.json")
    with pytest.raises(LoadError, match="has no adapter_config.json"):
        H.load_peft(str(b), params)
    # PEFT saves adapters named other than "default" in subfolders of their names: the error names them
    named = tmp_path / "named"
    for name in ("foo", "bar"):
        shutil.copytree(saved_llama, named / name)
    with pytest.raises(LoadError, match=r"its subfolders \['bar', 'foo'\] each hold one.*e\.g\. '.*named/bar'"):
        H.load_peft(str(named), params)
    H.load_peft(str(named / "bar"), params)


def test_a_config_value_jpeft_rejects_is_one_error_type(saved_llama, tmp_path):
    """Every method's importer turns a PEFT config value that jpeft's config rejects into
    UnsupportedAdapterError (a LoadError) naming the file (jpeft.peft_format.config_from_peft)."""
    import json

    from jpeft.errors import UnsupportedAdapterError

    b = tmp_path / "b"
    shutil.copytree(saved_llama, b)
    cfg = json.loads((b / "adapter_config.json").read_text())
    (b / "adapter_config.json").write_text(json.dumps({**cfg, "r": 0}))
    with pytest.raises(UnsupportedAdapterError, match=r"adapter_config\.json.*cannot be loaded by jpeft.*r"):
        H.load_peft(str(b), loaded("llama2")[1])
    from jpeft.peft_format import config_from_peft

    for cls, bad in [(jpeft.IA3Config, {"target_modules": 3}), (jpeft.VeraConfig, {"r": -1}),
                     (jpeft.OFTConfig, {"r": 0, "oft_block_size": 0})]:
        with pytest.raises(UnsupportedAdapterError, match="cannot be loaded by jpeft"):
            config_from_peft(cls, bad, "somewhere")


def test_registry_and_save_errors(tmp_path):
    assert "LORA" in H.supported_peft_types()
    with pytest.raises(jpeft.ConfigError, match="empty adapter"):
        H.save_peft(str(tmp_path), jpeft.LoraConfig(), {})
    # base_model_name_or_path as a pathlib.Path is recorded as its string (it was a raw TypeError from json)
    params = loaded("llama2")[1]
    cfg = jpeft.LoraConfig(r=2, target_modules=["q_proj"])
    adapter = jpeft.init(cfg, params, jax.random.key(0))
    folder = T.hf_model("llama2")[1]
    H.save_peft(tmp_path / "p", cfg, adapter, base_model_name_or_path=pathlib.Path(folder))
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["base_model_name_or_path"] == folder
    with pytest.raises(jpeft.ConfigError, match="base_model_name_or_path must be a string"):
        H.save_peft(str(tmp_path / "q"), cfg, adapter, base_model_name_or_path=3)
    assert not (tmp_path / "q").exists()
    # a method PEFT has no format for: the error says what to do instead (`jpeft export` of a `name = "full"` run
    # ended with the list of formats alone); a full fine-tune is a model, which `jpeft merge` writes
    model = loaded("llama2")[0]
    for other, fix in [(jpeft.FullFinetuneConfig(), r"whole model.*jpeft merge --model BASE --adapter RUN --out DIR"),
                       (jpeft.BottleneckConfig(target_modules=["mlp"]), r"jpeft.load_adapter.*train one of the methods")]:
        held = jpeft.init(other, params, jax.random.key(0), model, jax.numpy.zeros((1, 4), int))
        with pytest.raises(UnsupportedAdapterError, match=rf"'{other.peft_type}'; supported: .*Nothing was written; .*{fix}"):
            H.save_peft(str(tmp_path / "x"), other, held)
        assert not (tmp_path / "x").exists()
    assert H.split_peft_key("base_model.model.transformer.h.0.ln_1.lora_A.weight", ["lora_A.weight"]) == (
        "transformer/h_0/ln_1", "lora_A.weight")


# -- PiSSA / OLoRA: adapters relative to a residual base ---------------------------------------------------

def _perturbed(adapter, seed):
    """Every factor moved away from its initial value (as after training)."""
    leaves, tdef = jax.tree.flatten(adapter)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tdef, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("init,family,embed", [("pissa", "llama2", False), ("olora", "qwen2", False),
                                               ("pissa", "gpt2", False), ("pissa", "llama2", True),
                                               ("olora", "llama2", True), ("pissa", "llama2", "only")])
def test_residual_inits_peft_to_jpeft(init, family, embed, tmp_path):
    """A PEFT PiSSA/OLoRA file loads onto the residual base PEFT recomputes, and saves back as the
    same PEFT adapter. With an embedding among the targets (which PEFT's Embedding layer starts
    plain, on the unchanged table) it loaded with PEFT's logits, but save_peft refused it as mixing
    "sites relative to different bases" (with the embedding alone: as "not relative to a residual
    base"), so `jpeft export` of the folder failed."""
    hf, _ = T.hf_model(family)
    targets = ["c_attn", "c_fc"] if family == "gpt2" else ["q_proj", "v_proj", "down_proj"]
    targets = ["embed_tokens"] if embed == "only" else targets + (["embed_tokens"] if embed else [])
    torch.manual_seed(2)
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                init_lora_weights=init))
    with torch.no_grad():  # "train": move every factor
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(0.1 * torch.randn_like(p))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(tmp_path)
        # what a user gets from PEFT: the residual base is recomputed from the original weights
        ref_model = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path)).eval()
    ids, mask = T.batch(family, seed=5)
    ref = _peft_logits(ref_model, family, ids, mask)
    assert np.abs(ref - T.torch_logits(family, ids, mask)).max() > 1e-2
    model, params = loaded(family)
    if embed != "only":  # (an embedding alone keeps its base: load_peft takes it)
        with pytest.raises(UnsupportedAdapterError, match=rf"init_lora_weights='{init}'.*load_peft_with_base"):
            H.load_peft(str(tmp_path), params)
    config, res, adapter = H.load_peft_with_base(str(tmp_path), params)
    assert config.init_weights == init
    out = np.asarray(jpeft.apply(model, res, adapter, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    _close(family, out, ref, mask)
    H.save_peft(str(tmp_path / "back"), config, adapter, params=params)  # and back: PEFT rebuilds the same model
    assert json.loads((tmp_path / "back" / "adapter_config.json").read_text())["init_lora_weights"] == (
        True if embed == "only" else init)  # an embedding alone is plain LoRA in PEFT's eyes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "back")).eval()
    _close(family, _peft_logits(back, family, ids, mask), ref, mask)
    # and jpeft's own format: save_adapter refused the embedding case ("mixes LoRA sites relative to different
    # bases"); load_adapter gives the same sites, marks and outputs, and save_peft of the loaded one PEFT's file
    jpeft.save_adapter(str(tmp_path / "own"), config, adapter, params=params)
    config2, adapter2 = jpeft.load_adapter(str(tmp_path / "own"), params)
    assert {p: n.residual for p, n in adapter2.items()} == {p: n.residual for p, n in adapter.items()}
    out2 = np.asarray(jpeft.apply(model, res, adapter2, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    np.testing.assert_array_equal(out2, out)
    H.save_peft(str(tmp_path / "back2"), config2, adapter2, params=params)
    assert json.loads((tmp_path / "back2" / "adapter_config.json").read_text())["init_lora_weights"] == (
        True if embed == "only" else init)


@pytest.mark.parametrize("init,family", [("pissa", "llama2"), ("olora", "llama2"), ("pissa", "gpt2")])
def test_residual_inits_jpeft_to_peft(init, family, tmp_path, caplog):
    model, params = loaded(family)
    targets = ["c_attn", "c_proj"] if family == "gpt2" else ["q_proj", "o_proj", "up_proj"]
    cfg = jpeft.LoraConfig(r=4, alpha=8, target_modules=targets)
    make = jpeft.init_pissa if init == "pissa" else jpeft.init_olora
    res, adapter = make(cfg, params, jax.random.key(0))
    adapter = _perturbed(adapter, 1)
    H.save_peft(str(tmp_path), cfg, adapter)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == init
    pm = _peft_load_quietly(T.hf_model(family)[0], tmp_path, caplog)
    ids, mask = T.batch(family, seed=6)
    out = np.asarray(jpeft.apply(model, res, adapter, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    _close(family, out, _peft_logits(pm, family, ids, mask), mask)
    # and back: the residual base recomputed from the original params is the one init_* returned
    _, res2, adapter2 = H.load_peft_with_base(str(tmp_path), params)
    out2 = np.asarray(jpeft.apply(model, res2, adapter2, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    _close(family, out2, out, mask)


def test_olora_on_gpt2_conv1d_follows_the_peft_that_wrote_it(tmp_path):
    """PEFT's OLoRA init on GPT-2's Conv1D (weights stored [in, out], fan_in_fan_out) factored the stored
    weight before PEFT 0.22 (a residual base unlike jpeft's; lora_A of the wrong shape where in != out, so
    only the square attn.c_proj trains) and honours fan_in_fan_out from 0.22 on, as jpeft.init_olora does.
    jpeft loaded a 0.21 file with 0.22's base (logits up to 1.46 off) and refused to export any GPT-2 OLoRA
    adapter. Now a file of PEFT >= 0.22 loads with its logits (every tensor random), an older one (or one
    without peft_version) is refused by name, and the export writes peft_version 0.22.0 with a warning
    naming the sites: PEFT 0.22 rebuilds jpeft's model, PEFT 0.21 another one."""
    hf, _ = T.hf_model("gpt2")
    model, params = loaded("gpt2")
    ids, mask = T.batch("gpt2", seed=6)
    targets = ["c_attn", "c_proj", "c_fc"] if PEFT_22 else ["attn.c_proj"]  # 0.21 runs the square sites only
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = T.perturb_trainable(peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=targets, init_lora_weights="olora")), 4)
        pm.save_pretrained(tmp_path / "p")
        ref = _peft_logits(peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "p")).eval(), "gpt2",
                           ids, mask)
    _close("gpt2", _peft_logits(pm, "gpt2", ids, mask), ref, mask)  # PEFT reloads its own file
    f = tmp_path / "p" / "adapter_config.json"
    d = json.loads(f.read_text())
    assert d["peft_version"].startswith(peft.__version__) and d["fan_in_fan_out"] is True  # PEFT sets it for Conv1D
    if PEFT_22:
        config, res, adapter = H.load_peft_with_base(str(tmp_path / "p"), params)
        out = np.asarray(jpeft.apply(model, res, adapter, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
        _close("gpt2", out, ref, mask)
        assert {n.residual for n in adapter.values()} == {"olora"} and len(adapter) == 4 * hf.config.n_layer
        assert np.abs(out - T.torch_logits("gpt2", ids, mask)).max() > 1e-2
    for version in ("0.21.2", None):  # what an older PEFT wrote (or PEFT before 0.18, without peft_version)
        f.write_text(json.dumps({k: v for k, v in dict(d, peft_version=version).items() if v is not None}))
        with pytest.raises(UnsupportedAdapterError,
                           match=r"GPT-2 Conv1D modules \[[^]]*'transformer\.h\.0\.attn\.c_proj'.*"
                           rf"written by PEFT {version or 'before 0.18'}.*expected PEFT >= 0\.22.*merge_and_unload"):
            H.load_peft_with_base(str(tmp_path / "p"), params)
    # jpeft's export: the file says which PEFT rebuilds it
    cfg = jpeft.LoraConfig(r=4, alpha=8, target_modules=targets)
    res, adapter = jpeft.init_olora(cfg, params, jax.random.key(0))
    adapter = T.randomize_adapter(adapter, 5)
    with pytest.warns(UserWarning, match=r"only PEFT >= 0\.22 computes as jpeft does \([^)]*transformer\.h\.0\.attn\.c_proj.*OLoRA residual base"):
        H.save_peft(str(tmp_path / "j"), cfg, adapter)
    d = json.loads((tmp_path / "j" / "adapter_config.json").read_text())
    assert (d["init_lora_weights"], d["peft_version"]) == ("olora", "0.22.0")
    out = np.asarray(jpeft.apply(model, res, adapter, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = _peft_logits(peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "j")).eval(), "gpt2",
                            ids, mask)
    if PEFT_22:
        _close("gpt2", back, out, mask)
    else:  # PEFT 0.21 rebuilds another base: what the warning and the file's peft_version say
        assert np.abs(back - out)[mask.astype(bool)].max() > 1e-2
    config, res2, adapter2 = H.load_peft_with_base(str(tmp_path / "j"), params)  # and jpeft reads its file back
    _close("gpt2", np.asarray(jpeft.apply(model, res2, adapter2, jnp.asarray(ids), attention_mask=jnp.asarray(mask))),
           out, mask)


def test_residual_inits_peft_cannot_rebuild_are_refused(tmp_path):
    model, params = loaded("llama2")
    cfg = jpeft.LoraConfig(r=2, alpha=4, target_modules=["q_proj"])
    _, ad = jpeft.init_pissa(cfg, params, jax.random.key(0), niter=2)
    with pytest.raises(UnsupportedAdapterError, match=r"niter=2.*randomized SVD.*niter=None"):
        H.save_peft(str(tmp_path / "a"), cfg, ad)
    _, ad = jpeft.init_pissa(jpeft.LoraConfig(r=2, alpha=4, target_modules=["embed_tokens"]), params, jax.random.key(0))
    with pytest.raises(UnsupportedAdapterError, match="no pissa init"):
        H.save_peft(str(tmp_path / "b"), cfg, ad)
    # a config that claims a residual init for plain sites would make PEFT subtract factors from the base
    with pytest.raises(UnsupportedAdapterError, match="not relative to a residual base"):
        H.save_peft(str(tmp_path / "e"), cfg.replace(init_weights="pissa"), _random_adapter("llama2", cfg))
    # PEFT files whose base PEFT itself rebuilds at random (or from data) are refused with the conversion
    H.save_peft(str(tmp_path / "d"), cfg, _random_adapter("llama2", cfg))
    for init in ("pissa_niter_4", "corda", "loftq", "something_new"):
        d = json.loads((tmp_path / "d" / "adapter_config.json").read_text())
        d["init_lora_weights"] = init
        (tmp_path / "d" / "adapter_config.json").write_text(json.dumps(d))
        with pytest.raises(UnsupportedAdapterError, match=rf"{init}.*path_initial_model_for_weight_conversion"):
            H.load_peft(str(tmp_path / "d"), params)


def test_residual_mark_survives_save_adapter(tmp_path):
    # jpeft.save_adapter wrote the config as given and load_adapter rebuilt the sites from it, so a
    # PiSSA adapter saved with its plain LoraConfig came back unmarked and save_peft wrote
    # init_lora_weights=True (PEFT then kept the principal part twice: logits 1.3 off of 2.9); a
    # pissa_niter / CorDA / MiLoRA adapter lost the mark that makes save_peft refuse it
    model, params = loaded("llama2")
    cfg = jpeft.LoraConfig(r=2, alpha=4, target_modules=["q_proj"])
    calib = [jnp.asarray(np.random.default_rng(i).integers(3, T.VOCAB, (1, 16))) for i in range(4)]
    made = {
        "pissa": (jpeft.init_pissa(cfg, params, jax.random.key(0)), cfg),
        "pissa_niter_1": (jpeft.init_pissa(cfg, params, jax.random.key(0), niter=1), cfg.replace(init_weights="pissa")),
        "corda_kpm": (jpeft.init_corda(cfg, params, None, model, calib), cfg),
        "milora": (jpeft.init_milora(cfg, params, jax.random.key(0)), cfg.replace(init_weights="gaussian")),
    }
    for mark, ((res, ad), save_cfg) in made.items():
        jpeft.save_adapter(tmp_path / mark, save_cfg, ad)
        cfg2, ad2 = jpeft.load_adapter(tmp_path / mark, res)
        assert cfg2.init_weights == mark and {n.residual for n in ad2.values()} == {mark}, mark
        if mark == "pissa":
            H.save_peft(str(tmp_path / "peft"), cfg2, ad2)
            assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
        else:
            with pytest.raises(UnsupportedAdapterError, match=mark.split("_")[0]):
                H.save_peft(str(tmp_path / f"peft_{mark}"), cfg2, ad2)
    # plain sites saved with a residual init in the config come back plain; a mixed adapter is refused
    plain = jpeft.init(cfg, params, jax.random.key(1))
    jpeft.save_adapter(tmp_path / "plain", cfg.replace(init_weights="pissa"), plain)
    cfg3, ad3 = jpeft.load_adapter(tmp_path / "plain", params)
    assert cfg3.init_weights == "default" and {n.residual for n in ad3.values()} == {None}
    mixed = {**made["pissa"][0][1], "x": made["milora"][0][1]["model/layers_0/self_attn/q_proj"]}
    with pytest.raises(jpeft.ConfigError, match="mixes LoRA sites"):
        jpeft.save_adapter(tmp_path / "mixed", cfg, mixed)
    assert not (tmp_path / "mixed").exists()
    with pytest.raises(jpeft.ConfigError, match=r"jpeft.init_corda\("):
        jpeft.init(cfg.replace(init_weights="corda_kpm"), params, jax.random.key(0))


# -- tied embeddings ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,emb", [("llama3", "embed_tokens"), ("gpt2", "wte")])
def test_tied_embedding_lora_is_the_unmerged_peft_model(family, emb, tmp_path, caplog):
    """A LoRA on the input embedding of a tied model adapts the lookup only (PEFT's unmerged
    model), both ways; merging into the shared weight is refused rather than changing lm_head."""
    model, params = loaded(family)
    cfg = jpeft.LoraConfig(r=2, alpha=4, target_modules=[emb])
    adapter = _random_adapter(family, cfg)
    site = adapter[next(iter(adapter))]
    assert site.tied_output is True and not site.tie_output
    H.save_peft(str(tmp_path / "j"), cfg, adapter)
    pm = _peft_load_quietly(T.hf_model(family)[0], tmp_path / "j", caplog)
    ids, mask = T.batch(family, seed=7)
    out = _jpeft_logits(family, adapter, ids, mask)
    _close(family, out, _peft_logits(pm, family, ids, mask), mask)
    with pytest.raises(jpeft.NotMergeableError, match="tied output projection"):
        jpeft.merge(params, adapter)
    # PEFT-made, every factor random
    torch.manual_seed(4)
    pm = peft.get_peft_model(copy.deepcopy(T.hf_model(family)[0]),
                             peft.LoraConfig(r=2, lora_alpha=4, target_modules=[emb, "c_attn" if family == "gpt2" else "q_proj"],
                                             init_lora_weights=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(tmp_path / "p")
    _, ad = H.load_peft(str(tmp_path / "p"), params)
    _close(family, _jpeft_logits(family, ad, ids, mask), _peft_logits(pm.eval(), family, ids, mask), mask)


@pytest.mark.parametrize("family,tables", [("gpt2", ["wpe"]),
                                           ("bert", ["position_embeddings", "token_type_embeddings"])])
def test_merging_lora_on_position_tables_does_not_warn_of_a_tie(family, tables, tmp_path):
    """A LoRA on GPT-2's wpe or BERT's position / token-type tables (PEFT-made, every factor
    random) merges to PEFT's logits; the merge warned that jpeft "cannot tell whether the model
    also reads this embedding as a tied output projection", which jpeft's models never do with
    these tables. A real tie (GPT-2's wte) is still refused, and an embedding of a model jpeft
    does not know still warns."""
    hf, _ = T.hf_model(family)
    model, params = loaded(family)
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=2, lora_alpha=4, target_modules=tables))
    T.perturb_trainable(pm, seed=11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(tmp_path / "p")
    _, ad = H.load_peft(str(tmp_path / "p"), params)
    assert all(ad[p].tied_output is False for p in ad)
    ids, mask = T.batch(family, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no tie warning
        merged = jpeft.merge(params, ad)
    out = np.asarray(model.apply(merged, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    _close(family, out, _peft_logits(pm, family, ids, mask), mask)
    if family == "gpt2":  # wte is read by attend too: refused, as before
        real = _random_adapter(family, jpeft.LoraConfig(r=2, target_modules=["wte"]))
        with pytest.raises(jpeft.NotMergeableError, match="tied output projection"):
            jpeft.merge(params, real)
    other = {"params": {"wpe": {"embedding": jnp.ones((5, 4))}}}  # not jpeft.models' GPT-2 (no wte beside it)
    with pytest.warns(UserWarning, match="cannot tell whether"):
        jpeft.merge(other, jpeft.init(jpeft.LoraConfig(r=2, target_modules=["wpe"], init_weights="random"), other,
                                      jax.random.key(0)))


def test_ensure_weight_tying_both_ways(tmp_path, caplog):
    """PEFT's ensure_weight_tying=True on a tied Llama gives lm_head the embedding's LoRA:
    jpeft loads it as one embedding site applied at attend too, saves it back the same way,
    and merging is then exact."""
    family = "llama3"
    model, params = loaded(family)
    hf = T.hf_model(family)[0]
    torch.manual_seed(5)
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["embed_tokens", "q_proj"],
                                                                init_lora_weights=False, ensure_weight_tying=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(tmp_path / "p")
    ids, mask = T.batch(family, seed=8)
    ref = _peft_logits(pm.eval(), family, ids, mask)
    config, ad = H.load_peft(str(tmp_path / "p"), params)
    assert config.ensure_weight_tying and ad["model/embed_tokens"].tie_output
    out = _jpeft_logits(family, ad, ids, mask)
    _close(family, out, ref, mask)
    merged = np.asarray(model.apply(jpeft.merge(params, ad), jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    _close(family, merged, out, mask)
    # jpeft-made, saved for PEFT: lm_head's tied copy is written, no key warnings
    cfg = jpeft.LoraConfig(r=2, alpha=4, target_modules=["embed_tokens"], ensure_weight_tying=True)
    adapter = _random_adapter(family, cfg, seed=3)
    H.save_peft(str(tmp_path / "j"), cfg, adapter)
    assert json.loads((tmp_path / "j" / "adapter_config.json").read_text())["ensure_weight_tying"] is True
    pm2 = _peft_load_quietly(hf, tmp_path / "j", caplog)
    _close(family, _jpeft_logits(family, adapter, ids, mask), _peft_logits(pm2, family, ids, mask), mask)
    # GPT-2: PEFT does not tie its lm_head's LoRA, so a tied jpeft site cannot be written
    gcfg = jpeft.LoraConfig(r=2, alpha=4, target_modules=["wte"], ensure_weight_tying=True)
    with pytest.raises(UnsupportedAdapterError, match=r"ties the output projection \(its LoRA.*only for Llama-style"):
        H.save_peft(str(tmp_path / "g"), gcfg, _random_adapter("gpt2", gcfg))
    # with DoRA PEFT gives the tied lm_head magnitudes of its own: named as such (it was "load the adapter on a base
    # with tie_word_embeddings=False", the base it was made for)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(
            r=2, lora_alpha=4, target_modules=["embed_tokens"], init_lora_weights=False, use_dora=True,
            ensure_weight_tying=True)).save_pretrained(tmp_path / "d")
    with pytest.raises(UnsupportedAdapterError, match=r"ensure_weight_tying\) with DoRA.*without use_dora"):
        H.load_peft(str(tmp_path / "d"), params)


def test_ensure_weight_tying_with_the_embeddings_own_rank_or_alpha_both_ways(tmp_path, caplog):
    """PEFT scales the tied lm_head's copy of the embedding's factors by lm_head's own r / alpha.
    save_peft wrote the embedding's rank_pattern / alpha_pattern key only, so a merged adapter
    (scale 1) or a config with an embed_tokens pattern loaded in PEFT with lm_head at the default
    alpha / r (logits 90 to 600 off, no warning); and a PEFT file whose two scales differ loaded
    as one scale (134 off). Now the key is written for lm_head too, and such a file is refused;
    jpeft.init of such a config warns (not refuses: adapters saved before lm_head's key was
    recorded rebuild through it)."""
    from jpeft.merging import merge_adapters

    family = "llama3"
    hf = T.hf_model(family)[0]
    ids, mask = T.batch(family, seed=9)
    cfg = jpeft.LoraConfig(r=2, alpha=6, target_modules=["embed_tokens", "q_proj"], ensure_weight_tying=True)
    a, b = _random_adapter(family, cfg, seed=4), _random_adapter(family, cfg.replace(r=4), seed=5)
    # an embed_tokens pattern lm_head does not share: PEFT would scale its lm_head copy by lm_head's own r / alpha,
    # jpeft's tied site by the embedding's (warned); the export writes lm_head's key, so PEFT loads jpeft's model
    with pytest.warns(UserWarning, match=r"different scales: model.embed_tokens r=2, alpha=2 .*lm_head r=2, alpha=6"):
        patterned_ad = _random_adapter(family, cfg.replace(alpha_pattern={"embed_tokens": 2.0}), seed=6)
    patterned = cfg.replace(alpha_pattern={"embed_tokens": 2.0})
    for name, c, ad in (("merged", cfg, merge_adapters([a, b], [0.6, -0.8], method="cat")),
                        ("pattern", patterned, patterned_ad)):
        H.save_peft(str(tmp_path / name), c, ad)
        pm = _peft_load_quietly(hf, tmp_path / name, caplog)
        _close(family, _jpeft_logits(family, ad, ids, mask), _peft_logits(pm, family, ids, mask), mask)
        # jpeft's own format: the saved config gives lm_head the tied site's r / alpha too, so it loads back
        jpeft.save_adapter(str(tmp_path / f"{name}-jpeft"), c, ad)
        _, back = jpeft.load_adapter(str(tmp_path / f"{name}-jpeft"), loaded(family)[1])
        np.testing.assert_allclose(_jpeft_logits(family, back, ids, mask), _jpeft_logits(family, ad, ids, mask), atol=1e-5)
    # PEFT-made with two scales: refused by name; with one (both keys) loaded as PEFT computes it
    _, params = loaded(family)
    for pattern in ({"embed_tokens": 2.0}, {"embed_tokens": 2.0, "lm_head": 2.0}):
        torch.manual_seed(6)
        pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(
            r=4, lora_alpha=8, alpha_pattern=pattern, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False,
            ensure_weight_tying=True))
        folder = tmp_path / f"p{len(pattern)}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm.save_pretrained(folder)
        if len(pattern) == 1:
            with pytest.raises(UnsupportedAdapterError, match=r"different scales: model.embed_tokens r=4, alpha=2 .*"
                                                              r"lm_head r=4, alpha=8"):
                H.load_peft(str(folder), params)
        else:
            _, ad = H.load_peft(str(folder), params)
            _close(family, _jpeft_logits(family, ad, ids, mask), _peft_logits(pm.eval(), family, ids, mask), mask)


@pytest.mark.parametrize("tie", [False, True], ids=["input-only", "ensure_weight_tying"])
def test_modules_to_save_tied_embedding_both_ways(tmp_path, caplog, tie):
    """A modules_to_save copy of a tied Llama's embedding: by default PEFT's copy changes the
    input lookup only (merging it would change the tied output projection too: refused); with
    ensure_weight_tying=True PEFT shares the copy with lm_head, and so does jpeft (and merging
    is then exact). Every tensor of the adapter random, both directions against PEFT."""
    family = "llama3"
    model, params = loaded(family)
    hf = T.hf_model(family)[0]
    torch.manual_seed(6)
    opts = dict(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["embed_tokens"], init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(**opts, ensure_weight_tying=tie))
    with torch.no_grad():  # the copy trained away from the base
        for n, t in pm.named_parameters():
            if "modules_to_save" in n and "embed_tokens" in n:
                t.add_(0.5 * torch.randn_like(t))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(tmp_path / "p")
    ids, mask = T.batch(family, seed=9)
    ref = _peft_logits(pm.eval(), family, ids, mask)
    base_out = _peft_logits(peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(**opts)).eval(), family, ids, mask)
    assert np.abs(ref - base_out)[mask.astype(bool)].max() > 1e-2  # the copy's change is visible in the logits
    config, ad = H.load_peft(str(tmp_path / "p"), params)
    node = ad["model/embed_tokens"]
    assert config.ensure_weight_tying == tie and node.tie_output == tie and node.tied_output is True
    out = _jpeft_logits(family, ad, ids, mask)
    _close(family, out, ref, mask)
    if tie:
        merged = np.asarray(model.apply(jpeft.merge(params, ad), jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
        _close(family, merged, out, mask)
    else:
        with pytest.raises(jpeft.NotMergeableError, match="modules_to_save copy here changes the input embedding only"):
            jpeft.merge(params, ad)
    # jpeft-made, saved for PEFT (lm_head.weight written as PEFT writes it when tied), loaded back by PEFT
    cfg = jpeft.LoraConfig(r=2, alpha=4, target_modules=["q_proj"], modules_to_save=["embed_tokens"],
                           ensure_weight_tying=tie)
    adapter = jpeft.init(cfg, params, jax.random.key(2), model, jnp.asarray(ids))
    rng = np.random.default_rng(4)
    adapter = jax.tree.map(lambda t: t + 0.3 * jnp.asarray(rng.normal(size=t.shape), t.dtype), adapter)
    assert adapter["model/embed_tokens"].tie_output == tie and adapter["model/embed_tokens"].tied_output is True
    H.save_peft(str(tmp_path / "j"), cfg, adapter)
    assert json.loads((tmp_path / "j" / "adapter_config.json").read_text())["ensure_weight_tying"] is tie
    pm2 = _peft_load_quietly(hf, tmp_path / "j", caplog)
    _close(family, _jpeft_logits(family, adapter, ids, mask), _peft_logits(pm2, family, ids, mask), mask)
    if tie:  # GPT-2: PEFT ties only model.embed_tokens' copy, so a tied wte copy cannot be written
        gcfg = jpeft.LoraConfig(r=2, alpha=4, target_modules=["c_attn"], modules_to_save=["wte"],
                                ensure_weight_tying=True)
        gm, gp = loaded("gpt2")
        with pytest.raises(UnsupportedAdapterError, match="only for Llama-style"):
            H.save_peft(str(tmp_path / "g"), gcfg, jpeft.init(gcfg, gp, jax.random.key(0)))


# -- config names and targets as PEFT spells them ----------------------------------------------------------

def test_peft_key_names_are_config_aliases():
    c = jpeft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.1, init_lora_weights=False, target_modules=["q_proj"])
    assert c == jpeft.LoraConfig(r=4, alpha=16, dropout=0.1, init_weights="random", target_modules=["q_proj"])
    assert c.replace(alpha=8).alpha == 8
    with pytest.raises(jpeft.ConfigError, match="both alpha= and its Hugging Face PEFT alias lora_alpha="):
        jpeft.LoraConfig(alpha=8, lora_alpha=16)
    # the same pair in a dict (a `jpeft train` [method] table, adapter_config.json, `jpeft info --alpha
    # --set lora_alpha=`) was accepted with one value silently dropped
    for d, pair in (({"lora_alpha": 16, "alpha": 8}, "'lora_alpha' .16. and 'alpha' .8."),
                    ({"dropout": 0.2, "lora_dropout": 0.1}, "'dropout' .0.2. and 'lora_dropout' .0.1.")):
        with pytest.raises(jpeft.ConfigError, match=f"from_dict got both {pair}"):
            jpeft.LoraConfig.from_dict({"r": 4, **d})
    with pytest.raises(jpeft.ConfigError, match="got both 'lora_alpha'"):
        jpeft.AdapterConfig.from_dict({"peft_type": "ADALORA", "lora_alpha": 16, "alpha": 8})


def test_all_linear_selects_what_peft_selects():
    """PEFT's "all-linear": every Linear/Conv1D but the output projection, no embeddings."""
    for family in ("mistral", "gpt2", "bert"):
        _, params = loaded(family)
        ad = jpeft.init(jpeft.LoraConfig(r=2, target_modules="all-linear"), params, jax.random.key(0))
        hf, _ = T.hf_model(family)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=2, target_modules="all-linear"))
        theirs = {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if hasattr(m, "lora_A")
                  and not n.endswith(("lora_A", "lora_B"))}
        assert {jpeft.tree.hf_name(p) for p in ad} == theirs, family
        assert all(ad[p].layout.kind != "embed" for p in ad) and "lm_head" not in ad


def test_layer_and_exclude_filters_select_as_peft():
    """layers_to_transform / layers_pattern / exclude_modules pick the same sites as PEFT."""
    _, params = loaded("llama2")
    cases = [dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1], layers_pattern="layers"),
             dict(target_modules=["q_proj", "v_proj"], layers_to_transform=0),
             dict(target_modules="all-linear", exclude_modules=["v_proj", "down_proj"]),
             dict(target_modules=r".*\.(q_proj|o_proj)", exclude_modules=r".*layers\.0\..*")]
    for kw in cases:
        ad = jpeft.init(jpeft.LoraConfig(r=2, **kw), params, jax.random.key(0))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = peft.get_peft_model(copy.deepcopy(T.hf_model("llama2")[0]), peft.LoraConfig(r=2, **kw))
        theirs = {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if hasattr(m, "lora_A")
                  and not n.endswith(("lora_A", "lora_B"))}
        assert {jpeft.tree.hf_name(p) for p in ad} == theirs, kw
    with pytest.raises(jpeft.TargetNotFoundError, match="removed every one of them"):
        jpeft.init(jpeft.LoraConfig(target_modules=["q_proj"], exclude_modules=["q_proj"]), params, jax.random.key(0))
    with pytest.raises(jpeft.ConfigError, match="layers_to_transform"):
        jpeft.LoraConfig(layers_to_transform=[-1])
    with pytest.raises(jpeft.ConfigError, match="put the layer indices in the regex"):  # PEFT refuses it too
        jpeft.LoraConfig(target_modules=".*q_proj", layers_to_transform=[0])


def test_train_method_table_refuses_unimplemented_options():
    """`jpeft train`'s [method] table goes through LoraConfig.from_dict: an option jpeft would not
    apply is refused by name instead of being dropped."""
    from jpeft.cli._common import method_of

    for k, v in (("layer_replication", [[0, 1]]), ("use_qalora", True)):
        with pytest.raises(jpeft.ConfigError, match=rf"does not implement: \{{'{k}'"):
            method_of({"method": {"name": "lora", "r": 4, k: v}}, "llama")
    cfg = method_of({"method": {"name": "lora", "r": 4, "layers_to_transform": [1], "layers_pattern": "layers",
                                "exclude_modules": ["o_proj"]}}, "llama")
    assert cfg.layers_to_transform == (1,) and cfg.exclude_modules == ("o_proj",)
    cfg = method_of({"method": {"name": "lora", "r": 4, "lora_bias": True, "modules_to_save": ["lm_head"],
                                "trainable_token_indices": [3], "bias": "all"}}, "llama")
    assert cfg.lora_bias and cfg.modules_to_save == ("lm_head",) and cfg.trainable_token_indices == (3,)
    assert cfg.bias == "all"


def test_peft_base_copies_are_checked_on_a_layer_scanned_base(tmp_path):
    """On a layer-scanned base (scan_layers=True) load_peft compared PEFT's base-weight copies
    with an abstract unrolled view of the params, i.e. never: a file whose embed_tokens copy differs
    from the params (another base, or re-initialised rows), refused on the unrolled base, loaded
    on the scanned one without a word. Now both compare the same weights (the embedding as it is,
    a per-layer module's copy against its layer's slice of the stacked kernel); an abstract base
    (jax.eval_shape) is compared by shape."""
    import safetensors.numpy as stn

    hf, base_folder = T.hf_model("mistral")
    _, p0 = loaded("mistral")
    _, p1 = M.from_pretrained(base_folder, scan_layers=True)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folder = str(tmp_path / "same")
        peft.get_peft_model(copy.deepcopy(hf), cfg).save_pretrained(folder)
    same = stn.load_file(os.path.join(folder, "adapter_model.safetensors"))
    emb = "base_model.model.model.embed_tokens.base_layer.weight"
    assert emb in same
    _, a0 = H.load_peft(folder, p0)
    _, a1 = H.load_peft(folder, p1)  # the same weights: loads, and is the unrolled base's adapter stacked
    u1 = jpeft.scan.unstack_adapter(a1)
    assert sorted(u1) == sorted(a0)
    for k in a0:
        for x, y in zip(jax.tree.leaves(a0[k]), jax.tree.leaves(u1[k])):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    q1 = "base_model.model.model.layers.1.self_attn.q_proj.base_layer.weight"
    q1_w = hf.model.layers[1].self_attn.q_proj.weight.detach().numpy()
    rows = lambda n, at: (np.arange(n)[:, None] >= at[0]) & (np.arange(n)[:, None] < at[1])  # noqa: E731
    variants = {
        "embed": ({emb: same[emb] + rows(100, (90, 100)).astype(np.float32)},
                  r"embed_tokens\.base_layer\.weight.*10 row\(s\) \(first: \[90"),
        "layer": ({q1: q1_w + 0.5 * rows(32, (5, 6)).astype(np.float32)},
                  r"layers\.1\.self_attn\.q_proj\.base_layer\.weight.*1 row\(s\) \(first: \[5\]"),
        "shape": ({q1: np.zeros((7, 32), np.float32)}, r"q_proj' with shape \(32, 7\)"),
        # a copy of a module this base does not have (another architecture's file): was skipped without a word
        "stray": ({q1.replace("q_proj", "qkv_proj"): q1_w}, r"qkv_proj\.base_layer\.weight"),
    }
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), p1)
    for name, (change, msg) in variants.items():
        d = tmp_path / name
        shutil.copytree(folder, d)
        stn.save_file({**same, **change}, str(d / "adapter_model.safetensors"))
        for p in (p0, p1):
            with pytest.raises(BaseMismatchError, match=msg):
                H.load_peft(str(d), p)
        if name in ("shape", "stray"):  # no values to compare on an abstract base: the shapes and names still are
            with pytest.raises(BaseMismatchError, match=msg):
                H.load_peft(str(d), abstract)
    H.load_peft(folder, abstract)


def test_peft_copy_of_a_changed_base_embedding_is_refused(tmp_path):
    """PEFT saves a targeted embedding's base weight (``...embed_tokens.base_layer.weight``) and
    PeftModel.from_pretrained loads it into the model: when it differs from jpeft's params (rows
    re-initialised before training, here), load_peft names the mismatch instead of silently
    keeping the params' rows (the logits differed by 0.11 on the tiny Mistral); an unchanged copy
    still loads, with PEFT's logits."""
    hf, _ = T.hf_model("mistral")
    _, params = loaded("mistral")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False)
    ids = np.array([[5, 91, 17, 95, 40, 99, 3, 92]]); mask = np.ones_like(ids)
    for changed in (False, True):
        work = copy.deepcopy(hf)
        if changed:
            with torch.no_grad():
                work.model.embed_tokens.weight[90:] = work.model.embed_tokens.weight[:90].mean(0, keepdim=True)
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = peft.get_peft_model(work, cfg).eval()
            folder = str(tmp_path / str(changed))
            pm.save_pretrained(folder)
            ref = _peft_logits(peft.PeftModel.from_pretrained(copy.deepcopy(hf), folder).eval(), "mistral", ids, mask)
        if changed:
            with pytest.raises(BaseMismatchError, match=r"embed_tokens\.base_layer\.weight.*10 row\(s\) \(first: \[90"):
                H.load_peft(folder, params)
        else:
            _, ad = H.load_peft(folder, params)
            np.testing.assert_allclose(_jpeft_logits("mistral", ad, ids, mask), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("config", [jpeft.IA3Config(target_modules=["q"], feedforward_modules=[]),
                                    jpeft.VeraConfig(r=2, target_modules=["q"]),
                                    jpeft.LoHaConfig(r=2, target_modules=["q"]),
                                    jpeft.LoraConfig(r=2, target_modules=["q"])],
                         ids=["ia3", "vera", "loha", "lora"])
def test_an_adapter_of_another_method_is_refused_by_both_writers_in_one_place(config, tmp_path):
    """save_peft and save_adapter ask one check (``foreign_site``: the config's method makes these
    nodes) instead of six exporters' copies of it: an adapter of another method (here a merged LoRA
    adapter, or an IA3 one under a LoraConfig) is refused by name and nothing is written."""
    import flax.linen as nn

    params = {"params": {"q": nn.Dense(4).init(jax.random.key(0), jnp.ones((1, 4)))["params"]}}
    other = jpeft.IA3Config(target_modules=["q"], feedforward_modules=[]) if isinstance(config, jpeft.LoraConfig) \
        else jpeft.LoraConfig(r=2, target_modules=["q"])
    adapter = jpeft.init(other, params, jax.random.key(1))
    held = type(adapter["q"]).__name__
    with pytest.raises(UnsupportedAdapterError, match=rf"{type(config).__name__} adapter .* holds a {held} at 'q'"):
        H.save_peft(str(tmp_path / "p"), config, adapter)
    with pytest.raises(jpeft.ConfigError, match=rf"{type(config).__name__} adapter .* holds a {held} at 'q'"):
        jpeft.save_adapter(str(tmp_path / "j"), config, adapter, params=params)
    assert not (tmp_path / "p").exists() and not (tmp_path / "j").exists()
