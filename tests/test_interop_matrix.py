"""The Hugging Face interop matrix (issue #15): every method x option x model family, both ways
through the PEFT format, against the real ``peft`` package on tiny random models.

Each cell either matches the unmerged ``peft.PeftModel`` (logits to 1e-4, every adapter tensor
random; greedy generation token for token for plain LoRA on the decoders) or is a named jpeft
error, asserted as such. ``MATRIX`` is the one source: the tests are parametrised from it and
docs/MODELS.md carries it as a table (``test_models_md_table_is_the_matrix`` checks the copy;
``python tests/test_interop_matrix.py`` prints it).

Kept fast: one tiny saved model per family (tests/_models_tiny.py, cached per process), eager
jpeft forwards on [3, 8] batches, no training, PyTorch on one thread (tests/conftest.py).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import _models_tiny as tiny  # noqa: E402

import jpeft  # noqa: E402
import jpeft.models  # noqa: E402
from jpeft import hf as H  # noqa: E402
from jpeft.errors import BaseMismatchError, TargetNotFoundError, UnsupportedAdapterError  # noqa: E402
from jpeft import IA3Config  # noqa: E402
from jpeft import PrefixTuningConfig  # noqa: E402
from jpeft import PromptTuningConfig  # noqa: E402

peft = __import__("peft")  # a test dependency: missing means a broken install, not a skip
PEFT_22 = tiny.peft_at_least(0, 22)
torch = __import__("torch")  # a test dependency: missing means a broken install, not a skip

FAMILIES = {"Llama": "llama3", "Mistral": "mistral", "Qwen2": "qwen2", "Qwen3": "qwen3", "GPT-2": "gpt2",
            "BERT": "bert"}
# Llama here is the tiny llama3 model (tie_word_embeddings=True); Mistral is untied. Qwen3's q_norm/k_norm
# weights are random too (tests/_models_tiny.py), so a missing or misplaced norm shows in every cell.
TIED = {"llama3", "qwen2", "qwen3", "gpt2"}
SLIDING = {"mistral", "qwen2"}  # windows 5 and 4: prefix/prompt cases stay inside them (issue #15 item 3)
T = 2  # virtual tokens

TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"]}
REGEX = {"llama": r".*\.(q_proj|v_proj)", "gpt2": r".*\.c_attn", "bert": r".*\.(query|value)"}
PATTERNS = {  # targets, rank_pattern, alpha_pattern
    "llama": (["q_proj", "v_proj", "o_proj"], {"o_proj": 2}, {"v_proj": 3.0}),
    "gpt2": (["c_attn", "c_fc"], {"c_fc": 2}, {"c_attn": 3.0}),
    "bert": (["query", "value"], {"value": 2}, {"query": 3.0}),
}
EMBED = {"llama": "embed_tokens", "gpt2": "wte", "bert": "word_embeddings"}
IA3_TARGETS = {  # PEFT's defaults per model type
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
}
# modules_to_save naming modules that hold layers (not parameters) themselves, beside a plain one for BERT
SUBMODULES = {"llama": ["mlp"], "gpt2": ["mlp"], "bert": ["classifier", "pooler"]}
LAYERS_PATTERN = {"llama": "layers", "gpt2": "h", "bert": "layer"}
LN = {"llama": ["input_layernorm", "post_attention_layernorm", "norm"], "gpt2": ["ln_1", "ln_2", "ln_f"],
      "bert": ["LayerNorm"]}
# the other methods with a PEFT format: (peft_type, PEFT's options), one dict for both sides' configs
OTHER = {
    "LoHa": ("LOHA", lambda k: dict(r=2, alpha=3, target_modules=TARGETS[k])),
    "LoKr": ("LOKR", lambda k: dict(r=2, alpha=3, target_modules=TARGETS[k])),
    "OFT": ("OFT", lambda k: dict(r=0, oft_block_size=4, target_modules=TARGETS[k])),
    "VeRA": ("VERA", lambda k: dict(r=4, target_modules=TARGETS[k])),
    "AdaLoRA": ("ADALORA", lambda k: dict(init_r=3, target_r=2, total_step=10, lora_alpha=4, target_modules=TARGETS[k])),
    "LN tuning": ("LN_TUNING", lambda k: dict(target_modules=LN[k])),
}


def kind(family):
    return {"gpt2": "gpt2", "bert": "bert"}.get(family, "llama")


def lora(family, **kw):
    return {"r": 4, "lora_alpha": 8, "target_modules": TARGETS[kind(family)], **kw}


def _opts(case, family):
    """The case's LoRA options in PEFT's names (shared by both directions)."""
    k = kind(family)
    if case == "LoRA list":
        return lora(family)
    if case == "LoRA regex":
        return lora(family, target_modules=REGEX[k])
    if case == "LoRA all-linear":
        return lora(family, target_modules="all-linear")
    if case == "rsLoRA":
        return lora(family, use_rslora=True)
    if case == "rank/alpha patterns":
        t, rp, ap = PATTERNS[k]
        return lora(family, target_modules=t, rank_pattern=rp, alpha_pattern=ap)
    if case == "DoRA":
        return lora(family, use_dora=True)
    if case in ("PiSSA", "OLoRA"):
        return lora(family, init_lora_weights=case.lower())
    if case == "embedding":
        return lora(family, target_modules=[EMBED[k]] + TARGETS[k][:1])
    if case == "embedding, ensure_weight_tying":
        return lora(family, target_modules=[EMBED[k]] + TARGETS[k][:1], ensure_weight_tying=True)
    if case == "modules_to_save":
        return lora(family, modules_to_save=["lm_head" if k != "bert" else "classifier"])
    if case == "modules_to_save, a module with submodules":  # PEFT copies the whole module (jpeft: each of its layers)
        return lora(family, modules_to_save=SUBMODULES[k])
    if case == "modules_to_save over targets":  # PEFT copies each MLP (BERT: pooler) whole and adapts none of its layers
        return lora(family, target_modules="all-linear", modules_to_save=SUBMODULES[k])
    if case == "modules_to_save, bias='all'":  # PEFT's file holds each copy's biases under its wrapper's keys too
        return lora(family, modules_to_save=SUBMODULES[k], bias="all")
    if case == "bias='lora_only'":
        return lora(family, bias="lora_only")
    if case == "bias='all'":
        return lora(family, bias="all")
    if case == "lora_bias":
        return lora(family, lora_bias=True)
    if case == "layers_to_transform":
        return lora(family, layers_to_transform=[0], layers_pattern=LAYERS_PATTERN[k])
    if case == "exclude_modules":
        return lora(family, target_modules="all-linear", exclude_modules=TARGETS[k][:1])
    if case == "trainable_token_indices":
        return lora(family, trainable_token_indices=[3, 5, 8, 13, 21, 34])
    raise KeyError(case)


# -- the matrix ---------------------------------------------------------------------------------------
# cell: "match", or (error class, regex) for a named refusal, or "peft cannot" (PEFT itself fails
# to build or load that combination, so there is nothing for jpeft to match).

OK = "match"
PEFT_CANNOT = "peft cannot"
# "match" with PEFT >= 0.22; with an older PEFT, PEFT fails to load jpeft's file (save_peft warns so) and jpeft
# refuses PEFT's file by name (that PEFT computed it otherwise)
NEEDS_22 = "peft >= 0.22"


def _cells(case, family):
    both = {"jpeft->peft": OK, "peft->jpeft": OK}
    k = kind(family)
    if case == "OLoRA" and k == "gpt2":  # PEFT's OLoRA honours fan_in_fan_out (GPT-2's Conv1D) from 0.22 on
        return {"jpeft->peft": NEEDS_22, "peft->jpeft": NEEDS_22}
    if case == "embedding, ensure_weight_tying" and k == "gpt2":  # PEFT does not tie GPT-2's lm_head LoRA
        return {"jpeft->peft": (UnsupportedAdapterError, "only for Llama-style"), "peft->jpeft": OK}
    if case == "modules_to_save" and family in TIED:  # PEFT unties lm_head into a copy; jpeft's tied models have none
        return {"jpeft->peft": (TargetNotFoundError, "no lm_head of its own"),
                "peft->jpeft": (BaseMismatchError, "lm_head: with tie_word_embeddings")}
    if case in ("LoHa", "LoKr", "OFT") and k == "gpt2":  # PEFT's LyCORIS layers and OFT take no Conv1D
        return {"jpeft->peft": (UnsupportedAdapterError, "Conv1D"), "peft->jpeft": PEFT_CANNOT}
    return both


CASES = ["LoRA list", "LoRA regex", "LoRA all-linear", "rsLoRA", "rank/alpha patterns", "DoRA", "PiSSA", "OLoRA",
         "embedding", "embedding, ensure_weight_tying", "IA3", "prefix", "prefix + projection", "prompt",
         "modules_to_save", "modules_to_save, a module with submodules", "modules_to_save over targets",
         "bias='lora_only'", "bias='all'",
         "modules_to_save, bias='all'", "lora_bias",
         "layers_to_transform", "exclude_modules", "trainable_token_indices", *OTHER]
MATRIX = {(case, fam): _cells(case, fam) for case in CASES for fam in FAMILIES.values()}
PARAMS = [(case, fam, d) for (case, fam), cells in MATRIX.items() for d in ("jpeft->peft", "peft->jpeft")
          if cells[d] != PEFT_CANNOT]


# -- helpers ------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def base(family):
    return jpeft.models.from_pretrained(tiny.hf_model(family)[1])


def _batch(case, family):
    ids, mask = tiny.batch(family, seed=3)
    if case.startswith(("prefix", "prompt")):
        if family in SLIDING:  # virtual + real tokens inside the window (sliding-window prefixes: item 3)
            ids, mask = ids[:, -2:].copy(), np.ones((3, 2), np.int64)
        elif case == "prompt" and family != "bert":  # PEFT drops position_ids for prompt tuning: unpadded rows
            mask = np.ones_like(mask)
    return ids, mask


def _torch_logits(pm, case, family, ids, mask):
    kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    if family != "bert" and case != "prompt":
        kw["position_ids"] = torch.tensor(tiny.positions(mask))
    with torch.no_grad():
        out = pm(**kw).logits.float().numpy()
    if case == "prompt" and family != "bert":
        out = out[:, T:]  # PEFT returns the virtual positions too; jpeft returns the real tokens' logits
    return out


def _jpeft_logits(family, params, adapter, ids, mask):
    model, _ = base(family)
    return np.asarray(jpeft.apply(model, params, adapter, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))


def _close(family, a, b, mask):
    if family == "bert":
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    else:
        sel = np.asarray(mask).astype(bool)
        np.testing.assert_allclose(a[sel], b[sel], atol=1e-4, rtol=0)


def _randomize(adapter, seed):
    """Every trainable adapter tensor random (never a zero B): x + 0.3 N(0, 1). Frozen arrays
    (VeRA's shared projections, random already) stay: PEFT stores one pair for every site."""
    train, frozen = jpeft.split_frozen(adapter)
    leaves, tdef = jax.tree.flatten(train)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    train = jax.tree.unflatten(tdef, [x + 0.3 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])
    return jpeft.join_frozen(train, frozen)


def _jpeft_config(case, family):
    k = kind(family)
    if case in OTHER:
        ptype, opts = OTHER[case]
        return jpeft.config.AdapterConfig.from_dict({"peft_type": ptype, **opts(k)})
    if case == "IA3":
        t, ff = IA3_TARGETS[k]
        return IA3Config(target_modules=t, feedforward_modules=ff)
    if case.startswith("prefix"):
        return PrefixTuningConfig(num_virtual_tokens=T, prefix_projection=case.endswith("projection"))
    if case == "prompt":
        return PromptTuningConfig(num_virtual_tokens=T)
    opts = dict(_opts(case, family))
    if case in ("PiSSA", "OLoRA"):
        opts.pop("init_lora_weights")
    return jpeft.LoraConfig.from_dict(opts)  # PEFT's key names: the same dict makes both sides' configs


def _peft_config(case, family):
    k = kind(family)
    if case in OTHER:
        ptype, opts = OTHER[case]
        cls = {"LOHA": peft.LoHaConfig, "LOKR": peft.LoKrConfig, "OFT": peft.OFTConfig, "VERA": peft.VeraConfig,
               "ADALORA": peft.AdaLoraConfig, "LN_TUNING": peft.LNTuningConfig}[ptype]
        return cls(**opts(k))  # every trainable tensor is then moved off its start by _peft_randomize
    if case == "IA3":
        t, ff = IA3_TARGETS[k]
        return peft.IA3Config(target_modules=t, feedforward_modules=ff, init_ia3_weights=False)
    if case.startswith("prefix"):
        return peft.PrefixTuningConfig(num_virtual_tokens=T, prefix_projection=case.endswith("projection"),
                                       task_type="FEATURE_EXTRACTION" if k == "bert" else "CAUSAL_LM")
    if case == "prompt":
        return peft.PromptTuningConfig(num_virtual_tokens=T,
                                       task_type="FEATURE_EXTRACTION" if k == "bert" else "CAUSAL_LM")
    opts = _opts(case, family)
    if "init_lora_weights" not in opts:
        opts = dict(opts, init_lora_weights=False)  # A and B random
    return peft.LoraConfig(**opts)


def _peft_randomize(pm, case):
    """Moves every trainable PEFT tensor away from its initial value (PiSSA/OLoRA factors, DoRA
    magnitudes, prefix MLP), as training would."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


# -- the tests ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("case,family,direction", PARAMS, ids=[f"{c}|{f}|{d}" for c, f, d in PARAMS])
def test_interop(case, family, direction, tmp_path):
    cell = MATRIX[(case, family)][direction]
    hf, folder = tiny.hf_model(family)
    model, params = base(family)
    needs_22, cell = cell == NEEDS_22, OK if cell == NEEDS_22 else cell
    if needs_22 and not PEFT_22:
        return _before_peft_22(case, family, direction, params, tmp_path)
    if direction == "jpeft->peft":
        if cell != OK:
            err, pattern = cell
            with pytest.raises(err, match=pattern):
                cfg = _jpeft_config(case, family)
                _, ad = (jpeft.init_olora(cfg, params, jax.random.key(0)) if case == "OLoRA"
                         else (params, jpeft.init(cfg, params, jax.random.key(0))))
                H.save_peft(str(tmp_path), cfg, ad, base_model_name_or_path=folder, params=params)
            assert not (tmp_path / "adapter_config.json").exists()
            return
        cfg = _jpeft_config(case, family)
        if case in ("PiSSA", "OLoRA"):
            run_params, ad = (jpeft.init_pissa if case == "PiSSA" else jpeft.init_olora)(cfg, params, jax.random.key(0))
        else:
            run_params, ad = params, jpeft.init(cfg, params, jax.random.key(0))
        ad = _randomize(ad, 1)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            H.save_peft(str(tmp_path), cfg, ad, base_model_name_or_path=folder, params=params)
        assert needs_22 == any("PEFT >= 0.22" in str(w.message) for w in rec), [str(w.message) for w in rec]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path)).eval()
        ids, mask = _batch(case, family)
        ref = _torch_logits(pm, case, family, ids, mask)
        out = _jpeft_logits(family, run_params, ad, ids, mask)
        if case != "prompt":  # the adapter really changes the output (the comparison has teeth)
            assert np.abs(out - _jpeft_logits(family, params, {}, ids, mask)).max() > 1e-3
        _close(family, out, ref, mask)
        if case == "LoRA list" and family != "bert":
            _greedy_tokens_match(pm, model, run_params, ad, family)
        return
    # peft -> jpeft
    torch.manual_seed(11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(hf), _peft_config(case, family))
        if case in ("PiSSA", "OLoRA", "DoRA", "prefix + projection", "modules_to_save", "trainable_token_indices",
                    "modules_to_save, a module with submodules", "modules_to_save over targets", "bias='lora_only'",
                    "bias='all'",
                    "modules_to_save, bias='all'", *OTHER):
            _peft_randomize(pm, case)
        pm.eval()
        pm.save_pretrained(str(tmp_path))
    if cell != OK:
        err, pattern = cell
        with pytest.raises(err, match=pattern):
            H.load_peft_with_base(str(tmp_path), params)
        return
    ids, mask = _batch(case, family)
    ref = _torch_logits(pm, case, family, ids, mask)
    if case != "prompt":  # the adapter really changes the output (the comparison has teeth)
        assert np.abs(ref - _torch_logits(hf, case, family, ids, mask)).max() > 1e-3
    if case in ("PiSSA", "OLoRA"):
        with pytest.raises(UnsupportedAdapterError, match="load_peft_with_base"):
            H.load_peft(str(tmp_path), params)
    _, run_params, ad = H.load_peft_with_base(str(tmp_path), params)
    _close(family, _jpeft_logits(family, run_params, ad, ids, mask), ref, mask)


def test_reference_models_run_on_one_torch_thread():
    """tests/conftest.py gives PyTorch one intra-op thread in each test process: with one thread per
    core (its default) every tiny product of the reference models waited on an OpenMP team whose
    spin-waits, on the 2-core host where the two xdist workers already use both cores, cost this
    file about a third of its CPU time."""
    assert torch.get_num_threads() == 1


def _greedy_tokens_match(pm, model, params, adapter, family):
    ids = np.asarray(tiny.batch(family, seed=4)[0][:1, :5])  # one unpadded prompt
    got = np.asarray(jpeft.generate(model, params, adapter, jnp.asarray(ids), 6, eos_token_id=None))
    with torch.no_grad():
        ref = pm.generate(input_ids=torch.tensor(ids), attention_mask=torch.ones_like(torch.tensor(ids)),
                          max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0).numpy()
    np.testing.assert_array_equal(got[:, -6:], ref[:, -6:])


@pytest.mark.parametrize("family", ["llama3", "gpt2"])
def test_lm_head_target_on_a_tied_model_is_refused_not_dropped(family):
    """PEFT adapts a tied model's lm_head when target_modules names it; jpeft's tied models have no
    lm_head, so every method refuses the name instead of silently adapting the rest only."""
    hf, _ = tiny.hf_model(family)
    _, params = base(family)
    t = ["lm_head"] + TARGETS[kind(family)][:1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=2, target_modules=t))
    assert any(n.startswith("base_model.model.lm_head.lora_A") for n, _ in pm.named_parameters())
    for cfg in (jpeft.LoraConfig(r=2, target_modules=t), IA3Config(target_modules=t, feedforward_modules=[]),
                jpeft.LoHaConfig(r=2, target_modules=t), jpeft.VeraConfig(r=2, target_modules=t)):
        with pytest.raises(TargetNotFoundError, match="no lm_head of its own"):
            jpeft.init(cfg, params, jax.random.key(0))
    ad = jpeft.init(jpeft.LoraConfig(r=2, target_modules=["lm_head", "q_proj"]), base("mistral")[1], jax.random.key(0))
    assert "lm_head" in ad  # an untied model's head is adapted as before


@pytest.mark.parametrize("family,opts", [("llama3", dict(modules_to_save=["lm_head"])),
                                         ("gpt2", dict(target_modules=["c_attn", "lm_head"]))])
def test_a_tied_base_loaded_untied_takes_peft_lm_head_adapters(family, opts, tmp_path):
    """PEFT adapts a tied model's lm_head (a LoRA on it, or a modules_to_save copy) apart from the
    input embedding; jpeft's refusals said to "load the base with tie_word_embeddings=False", but
    from_pretrained(folder, tie_word_embeddings=False) of a tied checkpoint failed ("missing
    lm_head.weight... Is config.json from the same model?"). The head now starts as a copy of the
    embedding: the base's logits, PEFT's adapter loads both ways, and the merge saves an untied
    model that transformers runs as PEFT's unmerged model."""
    hf, folder = tiny.hf_model(family)
    model, params = jpeft.models.from_pretrained(folder, tie_word_embeddings=False)
    assert "lm_head" in params["params"]
    ids, mask = tiny.batch(family, seed=3)
    _close(family, _jpeft_logits_of(model, params, {}, ids, mask), tiny.torch_logits(family, ids, mask), mask)
    q = TARGETS[kind(family)][:1]
    cfg = {"r": 2, "lora_alpha": 4, "target_modules": q, **opts}
    with pytest.raises(TargetNotFoundError, match=r"from_pretrained\(folder, tie_word_embeddings=False\)"):
        jpeft.init(jpeft.LoraConfig.from_dict(cfg), base(family)[1], jax.random.key(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(init_lora_weights=False, **cfg))
        _peft_randomize(pm, "modules_to_save")
        pm.eval().save_pretrained(str(tmp_path / "p"))
    ref = _torch_logits(pm, "LoRA list", family, ids, mask)
    assert np.abs(ref - tiny.torch_logits(family, ids, mask))[mask.astype(bool)].max() > 1e-2
    _, ad = H.load_peft(str(tmp_path / "p"), params)
    _close(family, _jpeft_logits_of(model, params, ad, ids, mask), ref, mask)
    # jpeft -> PEFT on the tied transformers model
    jcfg = jpeft.LoraConfig.from_dict(cfg)
    ad = _randomize(jpeft.init(jcfg, params, jax.random.key(0)), 1)
    out = _jpeft_logits_of(model, params, ad, ids, mask)
    H.save_peft(str(tmp_path / "j"), jcfg, ad, base_model_name_or_path=folder, params=params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pj = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "j")).eval()
    _close(family, out, _torch_logits(pj, "LoRA list", family, ids, mask), mask)
    # merged: an untied checkpoint giving the unmerged logits
    jpeft.models.save_pretrained(str(tmp_path / "m"), model, jpeft.merge(params, ad))
    merged = type(hf).from_pretrained(str(tmp_path / "m")).eval()
    assert merged.config.tie_word_embeddings is False
    _close(family, _torch_logits(merged, "LoRA list", family, ids, mask), out, mask)


def test_trainable_tokens_on_a_base_untied_from_its_tied_checkpoint_are_refused(tmp_path):
    """PEFT applies trainable tokens in a tied model's lm_head too; on the same checkpoint loaded
    untied (tie_word_embeddings=False) jpeft's tokens change the input lookup only, so both
    directions gave logits 3 to 5 away from PEFT's without a word. Where the adapter's
    base_model_name_or_path is a local folder whose config.json says otherwise, both are refused."""
    family = "llama3"
    hf, folder = tiny.hf_model(family)
    model, params = jpeft.models.from_pretrained(folder, tie_word_embeddings=False)
    cfg = jpeft.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[3, 5, 9])
    ad = _randomize(jpeft.init(cfg, params, jax.random.key(0)), 1)
    with pytest.raises(UnsupportedAdapterError, match="tie_word_embeddings=true"):
        H.save_peft(str(tmp_path / "j"), cfg, ad, base_model_name_or_path=folder, params=params)
    H.save_peft(str(tmp_path / "j"), cfg, ad, params=params)  # no base folder named: PEFT's base is the user's call
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(type(hf).from_pretrained(folder),
                                 peft.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[3, 5, 9]))
        _peft_randomize(pm, "trainable_token_indices")
        pm.save_pretrained(str(tmp_path / "p"))
    with pytest.raises(BaseMismatchError, match="jpeft's base here does not tie"):
        H.load_peft(str(tmp_path / "p"), params)
    _, tied_ad = H.load_peft(str(tmp_path / "p"), base(family)[1])  # on the base as its config.json says: PEFT's
    ids, mask = tiny.batch(family, seed=3)
    _close(family, _jpeft_logits_of(base(family)[0], base(family)[1], tied_ad, ids, mask),
           _torch_logits(pm.eval(), "LoRA list", family, ids, mask), mask)


def test_trainable_tokens_saved_with_embedding_layers_tell_a_tied_base_without_its_folder(tmp_path):
    """What a PEFT file of trainable tokens says of its base's tie, when base_model_name_or_path is
    a Hub id (no local config.json to read): peft 0.21's default save writes the same keys and
    adapter_config.json for a tied and an untied base (the embedding's delta only), so nothing
    tells; with save_embedding_layers=True a tied base's file also holds the delta at lm_head. That
    file on the checkpoint loaded untied was refused as made for another model ("Load it on the
    base it was made for", the very checkpoint); the refusal now names the tie and the fix."""
    from safetensors import safe_open

    family = "llama3"
    hf, folder = tiny.hf_model(family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(hf),
                                 peft.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[3, 5, 9]))
        _peft_randomize(pm, "trainable_token_indices")
        for sel in (False, True):
            pm.save_pretrained(str(tmp_path / str(sel)), save_embedding_layers=sel)
            d = json.loads((tmp_path / str(sel) / "adapter_config.json").read_text())
            (tmp_path / str(sel) / "adapter_config.json").write_text(json.dumps({**d, "base_model_name_or_path": "org/m"}))
    keys = {}
    for sel in (False, True):
        with safe_open(str(tmp_path / str(sel) / "adapter_model.safetensors"), "np") as f:
            keys[sel] = {k for k in f.keys() if "token_adapter.trainable_tokens_delta" in k}
    assert keys[False] == {"base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"}
    assert keys[True] == keys[False] | {"base_model.model.lm_head.token_adapter.trainable_tokens_delta"}
    _, params = jpeft.models.from_pretrained(folder, tie_word_embeddings=False)
    with pytest.raises(BaseMismatchError, match=r"as PEFT saves them for a model whose lm_head is tied .* Load the base "
                                                r"as its config.json says"):
        H.load_peft(str(tmp_path / "True"), params)
    ids, mask = tiny.batch(family, seed=3)
    _, tied_ad = H.load_peft(str(tmp_path / "True"), base(family)[1])  # on the tied base: PEFT's numbers
    _close(family, _jpeft_logits_of(base(family)[0], base(family)[1], tied_ad, ids, mask),
           _torch_logits(pm.eval(), "LoRA list", family, ids, mask), mask)


def test_trainable_tokens_from_a_hub_id_on_a_base_untied_from_its_tied_checkpoint_are_refused(tmp_path):
    """The silent case the test above leaves: a file of trainable tokens saved by default (the
    embedding's delta only) naming a Hub id loaded onto a tied checkpoint loaded untied; jpeft
    applied the rows to the input lookup only, where PEFT on the checkpoint as it is (tied) uses
    them in lm_head too: logits up to 3.2 apart on the tiny Llama 3, without a word. The untied base's lm_head is then an
    exact copy of the embedding, which tells: load_peft refuses, naming both fixes; following the
    second (the file naming a folder saved from the untied base) loads PEFT's numbers on that
    untied model, and the first (the base tied) PEFT's on the checkpoint."""
    family = "llama3"
    hf, folder = tiny.hf_model(family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(hf),
                                 peft.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[3, 5, 9]))
        _peft_randomize(pm, "trainable_token_indices")
        pm.save_pretrained(str(tmp_path / "p"))
    f = tmp_path / "p" / "adapter_config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "base_model_name_or_path": "org/m"}))
    model, params = jpeft.models.from_pretrained(folder, tie_word_embeddings=False)
    with pytest.raises(BaseMismatchError, match=r"lm_head is an exact copy of the embedding .* load the base as its "
                                                r"config.json says .*\(jpeft.models.save_pretrained\)"):
        H.load_peft(str(tmp_path / "p"), params)
    ids, mask = tiny.batch(family, seed=3)
    _, tied_ad = H.load_peft(str(tmp_path / "p"), base(family)[1])
    _close(family, _jpeft_logits_of(base(family)[0], base(family)[1], tied_ad, ids, mask),
           _torch_logits(pm.eval(), "LoRA list", family, ids, mask), mask)
    jpeft.models.save_pretrained(str(tmp_path / "u"), model, params)
    f.write_text(json.dumps({**json.loads(f.read_text()), "base_model_name_or_path": str(tmp_path / "u")}))
    _, ad = H.load_peft(str(tmp_path / "p"), params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        untied = peft.PeftModel.from_pretrained(type(hf).from_pretrained(str(tmp_path / "u")), str(tmp_path / "p"))
    assert untied.base_model.model.config.tie_word_embeddings is False
    _close(family, _jpeft_logits_of(model, params, ad, ids, mask), _torch_logits(untied.eval(), "LoRA list", family, ids, mask),
           mask)


def test_exclude_modules_as_jpeft_paths_exclude_what_peft_excludes_and_an_unused_one_warns(tmp_path):
    """exclude_modules given as jpeft paths (``model/layers_0/self_attn/q_proj``, the form
    target_modules and modules_to_save take) excluded nothing, without a word: jpeft matched them
    against the dotted name only, so the module was adapted, trained and exported. They now read as
    the dotted names PEFT matches (and are written so); an exclude_modules that names no module (a
    regex written on jpeft paths, a typo) warns, as PEFT's get_peft_model does."""
    family = "mistral"
    hf, folder = tiny.hf_model(family)
    model, params = base(family)
    cfg = jpeft.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"],
                           exclude_modules=["model/layers_0/self_attn/q_proj", "layers_1/self_attn/v_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(
            r=2, target_modules=["q_proj", "v_proj"],
            exclude_modules=["model.layers.0.self_attn.q_proj", "layers.1.self_attn.v_proj"]))
    ad = _randomize(jpeft.init(cfg, params, jax.random.key(0)), 1)
    assert sorted(jpeft.tree.hf_name(p) for p in ad) == sorted(pm.targeted_module_names)
    H.save_peft(str(tmp_path), cfg, ad, base_model_name_or_path=folder, params=params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pj = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path)).eval()
    assert sorted(pj.targeted_module_names) == sorted(pm.targeted_module_names)
    ids, mask = tiny.batch(family, seed=3)
    _close(family, _jpeft_logits(family, params, ad, ids, mask), _torch_logits(pj, "LoRA list", family, ids, mask), mask)
    for unused in (r"model/layers_0/.*", ["q_prj"]):
        with pytest.warns(RuntimeWarning, match="names no module of this model"):
            ad = jpeft.init(jpeft.LoraConfig(r=2, target_modules=["q_proj"], exclude_modules=unused), params,
                            jax.random.key(0))
        assert len(ad) == 2  # nothing excluded, as in PEFT


def _jpeft_logits_of(model, params, adapter, ids, mask):
    return np.asarray(jpeft.apply(model, params, adapter, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))


# -- the docs table -----------------------------------------------------------------------------------

def _cell_text(cell):
    if cell == OK:
        return "yes"
    if cell == PEFT_CANNOT:
        return "PEFT cannot"
    if cell == NEEDS_22:
        return "yes (PEFT >= 0.22)"
    return f"refused ({cell[0].__name__})"


def table() -> str:
    """The matrix as the Markdown table docs/MODELS.md carries."""
    fams = list(FAMILIES)
    head = "| method / option | " + " | ".join(f"{f} jpeft→PEFT | {f} PEFT→jpeft" for f in fams) + " |"
    sep = "|---|" + "---|---|" * len(fams)
    rows = [head, sep]
    for case in CASES:
        cells = []
        for f in fams:
            c = MATRIX[(case, FAMILIES[f])]
            cells += [_cell_text(c["jpeft->peft"]), _cell_text(c["peft->jpeft"])]
        rows.append(f"| {case} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _before_peft_22(case, family, direction, params, tmp_path):
    """A NEEDS_22 cell under PEFT before 0.22: jpeft writes its file with a warning naming PEFT >= 0.22 (and
    peft_version 0.22.0), which this PEFT fails to load; this PEFT's own file is refused by name."""
    hf, folder = tiny.hf_model(family)
    if direction == "jpeft->peft":
        cfg = _jpeft_config(case, family)
        _, ad = jpeft.init_olora(cfg, params, jax.random.key(0))
        with pytest.warns(UserWarning, match="PEFT >= 0.22"):
            H.save_peft(str(tmp_path), cfg, _randomize(ad, 1), base_model_name_or_path=folder, params=params)
        assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_version"] == "0.22.0"
        with warnings.catch_warnings(), pytest.raises(RuntimeError, match="size mismatch"):
            warnings.simplefilter("ignore")
            peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path))
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(hf), _peft_config(case, family))
        _peft_randomize(pm, case)
        pm.save_pretrained(str(tmp_path))
    with pytest.raises(UnsupportedAdapterError, match="expected PEFT >= 0.22"):
        H.load_peft_with_base(str(tmp_path), params)


def test_models_md_table_is_the_matrix():
    path = os.path.join(os.path.dirname(__file__), "..", "docs", "MODELS.md")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    assert table() in text, "docs/MODELS.md's interop table differs from tests/test_interop_matrix.py: paste " \
                            "the output of `python tests/test_interop_matrix.py`"


if __name__ == "__main__":
    print(table())
