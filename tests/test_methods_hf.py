"""Hugging Face PEFT format round trips for DoRA, IA3, prefix tuning and prompt tuning, through the
real ``peft`` package on tiny randomly initialised transformers models: adapters saved by jpeft
load in peft and adapters saved by peft load in jpeft, with logits equal to 1e-4; and LoRA, DoRA,
IA3 and LoHa over a bfloat16 base computing and training as PEFT's float32 adapters do."""

import copy
import dataclasses
import json
import os
import sys
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
import jpeft.models
from jpeft.hf import load_peft, save_peft
from jpeft.tree import hf_name

torch = __import__("torch")  # a test dependency: missing means a broken install, not a skip
peft = __import__("peft")  # a test dependency: missing means a broken install, not a skip
sys.path.insert(0, os.path.dirname(__file__))
import _models_tiny as tiny  # noqa: E402

T = 4  # virtual tokens


def _jpeft_base(family):
    _, folder = tiny.hf_model(family)
    return jpeft.models.from_pretrained(folder)


def _close(j, t, mask):
    m = np.asarray(mask).astype(bool)
    np.testing.assert_allclose(np.asarray(j)[m], t[m], rtol=1e-4, atol=1e-4)


def _perturb(adapter, key):
    """Random non-identity values for every leaf (as after training)."""
    leaves, tdef = jax.tree.flatten(adapter)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(tdef, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


CASES = {
    "dora": (lambda fam: jpeft.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True),
             lambda fam: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True,
                                         init_lora_weights=False)),
    "ia3": (lambda fam: jpeft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
            lambda fam: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                                       init_ia3_weights=False)),
    "prefix": (lambda fam: jpeft.PrefixTuningConfig(num_virtual_tokens=T, prefix_projection=True),
               lambda fam: peft.PrefixTuningConfig(num_virtual_tokens=T, prefix_projection=True)),
    "prompt": (lambda fam: jpeft.PromptTuningConfig(num_virtual_tokens=T),
               lambda fam: peft.PromptTuningConfig(num_virtual_tokens=T)),
}


def _batch(method, family):
    ids, mask = tiny.batch(family)
    if method == "prompt":  # PEFT drops position_ids for prompt tuning; compare unpadded rows
        mask = np.ones_like(mask)
    return ids, mask


def _compare(method, j, t):
    return t[:, T:] if method == "prompt" else t


@pytest.mark.parametrize("method,family", [("dora", "llama3"), ("ia3", "llama3"), ("prefix", "llama3"), ("prompt", "llama3")])
def test_jpeft_to_peft(method, family, tmp_path):
    jcfg, _ = CASES[method]
    model, params = _jpeft_base(family)
    ad = _perturb(jpeft.init(jcfg(family), params, jax.random.key(0)), jax.random.key(1))
    ids, mask = _batch(method, family)
    j = jpeft.apply(model, params, ad, jnp.asarray(ids), jnp.asarray(mask))
    save_peft(str(tmp_path), jcfg(family), ad, base_model_name_or_path=tiny.hf_model(family)[1])
    hf, _ = tiny.hf_model(family)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path)).eval()
    t = tiny.peft_logits(pm, ids, mask, with_positions=method != "prompt")
    _close(j, _compare(method, j, t), mask)
    # and back into jpeft
    cfg2, ad2 = load_peft(str(tmp_path), params)
    _close(jpeft.apply(model, params, ad2, jnp.asarray(ids), jnp.asarray(mask)), np.asarray(j), mask)


@pytest.mark.parametrize("method,family", [("dora", "llama3"), ("ia3", "gpt2"), ("prefix", "gpt2"), ("prompt", "gpt2")])
def test_peft_to_jpeft(method, family, tmp_path):
    _, pcfg = CASES[method]
    hf, _ = tiny.hf_model(family)
    torch.manual_seed(3)
    pcfg = pcfg(family)
    pcfg.task_type = "CAUSAL_LM"
    if family == "gpt2" and method == "ia3":
        pcfg.target_modules, pcfg.feedforward_modules = ["c_attn", "mlp.c_proj"], ["mlp.c_proj"]
    pm = peft.get_peft_model(copy.deepcopy(hf), pcfg).eval()
    if method == "dora":  # move the magnitudes away from their initial norms
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_magnitude_vector" in n:
                    p.mul_(torch.linspace(0.5, 1.5, p.numel()))
    pm.save_pretrained(str(tmp_path))
    ids, mask = _batch(method, family)
    t = tiny.peft_logits(pm, ids, mask, with_positions=method != "prompt")
    model, params = _jpeft_base(family)
    cfg, ad = load_peft(str(tmp_path), params)
    assert cfg.peft_type == pcfg.peft_type.value if hasattr(pcfg.peft_type, "value") else pcfg.peft_type
    j = jpeft.apply(model, params, ad, jnp.asarray(ids), jnp.asarray(mask))
    _close(j, _compare(method, j, t), mask)


@pytest.mark.parametrize("rope", ["default", "dynamic"])
@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_virtual_tokens_past_max_position_embeddings_on_a_rope_model_match_peft(method, rope, tmp_path):
    """Virtual tokens plus the input past max_position_embeddings: a rotary model has no position
    table, so transformers rotates any position and PEFT runs it (extrapolating, as the base does on
    a longer input); jpeft refused it with PromptTooLongError. Now its logits equal PEFT's, every
    tensor random, for the default rope (fixed frequencies) and dynamic NTK (frequencies of the
    call's length, t + n), in both directions (a tiny Llama with 16 positions). GPT-2's learned
    table still refuses it (test_methods_prefix_prompt.py)."""
    transformers = __import__("transformers")
    torch.manual_seed(0)
    rope_parameters = {"rope_type": rope, "rope_theta": 10000.0, **({"factor": 2.0} if rope == "dynamic" else {})}
    c = transformers.LlamaConfig(vocab_size=tiny.VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                                 tie_word_embeddings=False, rope_parameters=rope_parameters)
    hf = tiny._randomize(transformers.LlamaForCausalLM(c), seed=3)
    folder = str(tmp_path / "base")
    hf.save_pretrained(folder)
    model, params = jpeft.models.from_pretrained(folder)
    limit = hf.config.max_position_embeddings
    n = limit - T + 3  # T virtual tokens + n > limit
    ids = np.random.default_rng(0).integers(3, tiny.VOCAB, size=(2, n))
    mask = np.ones_like(ids)
    pcfg = CASES[method][1]("llama3")
    pcfg.task_type = "CAUSAL_LM"
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(hf), pcfg)
        tiny.perturb_trainable(pm, seed=2)
        pm.save_pretrained(str(tmp_path / "p"))
        t = tiny.peft_logits(pm, ids, mask, with_positions=False)[:, -n:]
    _, ad = load_peft(str(tmp_path / "p"), params)
    _close(jpeft.apply(model, params, ad, jnp.asarray(ids), jnp.asarray(mask)), t, mask)
    # jpeft -> PEFT
    jcfg = CASES[method][0]("llama3")
    mine = _perturb(jpeft.init(jcfg, params, jax.random.key(0)), jax.random.key(4))
    save_peft(str(tmp_path / "j"), jcfg, mine, base_model_name_or_path=folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "j")).eval()
        t2 = tiny.peft_logits(back, ids, mask, with_positions=False)[:, -n:]
    _close(jpeft.apply(model, params, mine, jnp.asarray(ids), jnp.asarray(mask)), t2, mask)


@pytest.mark.parametrize("family", ["llama2", "gpt2"])
def test_prefix_on_left_padded_rows_without_position_ids_differs_from_peft_as_documented(family, tmp_path):
    """docs/METHODS.md, prefix tuning: without position_ids transformers numbers a left-padded row's
    tokens from the padding on (T, T+1, ... over every slot), jpeft its real tokens (as its models do
    without an adapter); PEFT shifts given position_ids by T as jpeft does, so with cumsum(mask) - 1
    passed to PEFT every real token's logits are equal, and without them the unpadded row is."""
    hf, _ = tiny.hf_model(family)
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    pm.eval().save_pretrained(str(tmp_path))
    model, params = _jpeft_base(family)
    _, ad = load_peft(str(tmp_path), params)
    ids, mask = tiny.batch(family, seed=3)  # rows of 8, 6 and 3 real tokens, left-padded
    j = np.asarray(jpeft.apply(model, params, ad, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    _close(j, tiny.peft_logits(pm, ids, mask), mask)
    t = tiny.peft_logits(pm, ids, mask, with_positions=False)
    real = mask.astype(bool)
    np.testing.assert_allclose(j[0], t[0], rtol=1e-4, atol=1e-4)
    assert all(np.abs(j[r][real[r]] - t[r][real[r]]).max() > 0.1 for r in (1, 2))  # the documented difference


def test_prefix_load_on_wrong_base_is_named(tmp_path):
    model, params = _jpeft_base("llama3")
    ad = jpeft.init(jpeft.PrefixTuningConfig(num_virtual_tokens=T), params, jax.random.key(0))
    save_peft(str(tmp_path), jpeft.PrefixTuningConfig(num_virtual_tokens=T), ad, base_model_name_or_path=tiny.hf_model("llama3")[1])
    _, gparams = _jpeft_base("gpt2")
    with pytest.raises(jpeft.errors.BaseMismatchError, match="layers of key width"):
        load_peft(str(tmp_path), gparams)


def test_prefix_records_kv_heads_for_peft(tmp_path):
    """Qwen2 has 2 key/value heads of width 8 and no head_dim in its config: PEFT splits the
    prefix by the num_attention_heads the file records, so save_peft writes the kv head count
    (read from the base folder's config.json) or refuses."""
    family = "qwen2"
    model, params = _jpeft_base(family)
    cfg = jpeft.PrefixTuningConfig(num_virtual_tokens=2)
    ad = _perturb(jpeft.init(cfg, params, jax.random.key(0)), jax.random.key(2))
    with pytest.raises(jpeft.errors.UnsupportedAdapterError, match="num_attention_heads"):
        save_peft(str(tmp_path / "x"), cfg, ad)
    save_peft(str(tmp_path), cfg, ad, base_model_name_or_path=tiny.hf_model(family)[1])
    import json

    assert json.loads((tmp_path / "adapter_config.json").read_text())["num_attention_heads"] == 2
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(tiny.hf_model(family)[0]), str(tmp_path)).eval()
    ids = np.asarray(tiny.batch(family)[0])
    # 2 virtual + 2 real tokens fit Qwen2's sliding window (4); longer rows are issue #15 item 3 (attention masking)
    ids = ids[:, :2].copy()
    mask = np.ones_like(ids)
    j = jpeft.apply(model, params, ad, jnp.asarray(ids), jnp.asarray(mask))
    _close(j, tiny.peft_logits(pm, ids, mask), mask)


def test_prefix_export_reads_kv_heads_as_transformers(tmp_path):
    """save_peft's num_attention_heads for a prefix comes from the base folder's config.json, read
    as transformers reads it: a Mistral config without num_key_value_heads has 8 key/value heads
    (MistralConfig's default), not its 16 attention heads, which a PEFT that trusts the file would
    split the prefix by."""
    import json

    model, params = _jpeft_base("qwen2")
    cfg = jpeft.PrefixTuningConfig(num_virtual_tokens=2)
    ad = jpeft.init(cfg, params, jax.random.key(0))
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "mistral", "num_attention_heads": 16}))
    save_peft(str(tmp_path / "a"), cfg, ad, base_model_name_or_path=str(base))
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["num_attention_heads"] == 8



@pytest.mark.parametrize("recorded", [dict(num_attention_heads=4), dict(num_attention_heads=4, token_dim=32)])
def test_prefix_file_heads_and_width_come_from_a_gqa_model_as_in_peft(recorded, tmp_path):
    """On a model whose config has num_key_value_heads (Llama, Mistral, Qwen2) PEFT replaces the
    file's num_attention_heads and token_dim by the model's key/value heads and key width when it
    loads a prefix; a file recording the query heads (4) or the hidden size (32) of the tiny GQA
    Llama (2 key/value heads of width 8) runs in PEFT. jpeft loaded it and then refused it
    (ShapeMismatchError at apply, BaseMismatchError at load)."""
    import json

    hf, _ = tiny.hf_model("llama3")
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.PrefixTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g))
    pm.save_pretrained(str(tmp_path))
    cfg_file = tmp_path / "adapter_config.json"
    cfg_file.write_text(json.dumps(dict(json.loads(cfg_file.read_text()), **recorded)))
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path)).eval()
    ids, mask = tiny.batch("llama3")
    model, params = _jpeft_base("llama3")
    cfg, ad = load_peft(str(tmp_path), params)
    assert cfg.token_dim == 16
    _close(jpeft.apply(model, params, ad, jnp.asarray(ids), jnp.asarray(mask)), tiny.peft_logits(ref, ids, mask), mask)


@pytest.mark.parametrize("task", ["FEATURE_EXTRACTION", "SEQ_CLS"])
def test_bert_prompt_token_type_ids_as_peft_or_refused(task, tmp_path):
    """PEFT's prompt tuning prepends T zeros to BERT's token_type_ids for SEQ_CLS but drops them
    (a warning) for FEATURE_EXTRACTION; jpeft used them for both, so a FEATURE_EXTRACTION adapter
    with token_type_ids gave outputs 0.08 away from PEFT's without a word. It is now refused."""
    hf, _ = tiny.hf_model("bert")
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.PromptTuningConfig(num_virtual_tokens=T, task_type=task))
    with torch.no_grad():
        emb = pm.prompt_encoder["default"].embedding.weight
        emb.copy_(torch.randn(emb.shape, generator=torch.Generator().manual_seed(4)))
    pm.eval().save_pretrained(str(tmp_path))
    ids, mask = tiny.batch("bert", seed=3)
    types = np.zeros_like(ids)
    types[:, 2:5] = 1
    model, params = _jpeft_base("bert")
    _, ad = load_peft(str(tmp_path), params)
    with torch.no_grad():
        plain = pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
        typed = pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types)).logits.numpy()
    np.testing.assert_allclose(np.asarray(jpeft.apply(model, params, ad, jnp.asarray(ids), jnp.asarray(mask))), plain,
                               atol=1e-4, rtol=0)
    if task == "FEATURE_EXTRACTION":
        with pytest.raises(jpeft.InputValidationError, match="FEATURE_EXTRACTION.*drops token_type_ids"):
            jpeft.apply(model, params, ad, jnp.asarray(ids), jnp.asarray(mask), token_type_ids=jnp.asarray(types))
        cfg = jpeft.PromptTuningConfig(num_virtual_tokens=T, task_type=task)  # made in jpeft: the same refusal
        with pytest.raises(jpeft.InputValidationError, match="drops token_type_ids"):
            jpeft.apply(model, params, jpeft.init(cfg, params, jax.random.key(0)), jnp.asarray(ids),
                        token_type_ids=jnp.asarray(types))
    else:
        got = jpeft.apply(model, params, ad, jnp.asarray(ids), jnp.asarray(mask), token_type_ids=jnp.asarray(types))
        assert np.abs(typed - plain).max() > 1e-2
        np.testing.assert_allclose(np.asarray(got), typed, atol=1e-4, rtol=0)

BERT_TASKS = [("lora", "auto", "FEATURE_EXTRACTION"), ("lora", "SEQ_CLS", "SEQ_CLS"), ("lora", None, None),
              ("prompt", "auto", "FEATURE_EXTRACTION"), ("prompt", "SEQ_CLS", "SEQ_CLS")]


@pytest.mark.parametrize("method,task,written", BERT_TASKS)
def test_bert_task_types_load_in_peft(method, task, written, tmp_path):
    """Each task type save_peft writes for BERT loads in PEFT with equal logits (SEQ_CLS with the
    frozen classifier PEFT expects as a module to save) and loads back into jpeft."""
    model, params = _jpeft_base("bert")
    cfg = jpeft.LoraConfig(r=2, alpha=4, target_modules=["query", "value"]) if method == "lora" else jpeft.PromptTuningConfig(num_virtual_tokens=T)
    ad = _perturb(jpeft.init(cfg, params, jax.random.key(0)), jax.random.key(1))
    save_peft(str(tmp_path), cfg, ad, task_type=task, params=params)
    import json

    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] == written
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(tiny.hf_model("bert")[0]), str(tmp_path)).eval()
    ids, mask = tiny.batch("bert")
    j = jpeft.apply(model, params, ad, jnp.asarray(ids), jnp.asarray(mask))
    t = tiny.peft_logits(pm, ids, mask, with_positions=False)
    np.testing.assert_allclose(np.asarray(j), t, rtol=1e-4, atol=1e-4)
    _, ad2 = load_peft(str(tmp_path), params)
    # SEQ_CLS: PEFT trains the classifier copy it names, so jpeft loads it as the adapter's copy, for every method
    assert isinstance(ad2.get("classifier"), jpeft.SavedModule) == (task == "SEQ_CLS")
    np.testing.assert_allclose(np.asarray(jpeft.apply(model, params, ad2, jnp.asarray(ids), jnp.asarray(mask))), np.asarray(j),
                               rtol=1e-5, atol=1e-5)


def test_task_types_peft_cannot_load_are_refused_before_writing(tmp_path):
    _, params = _jpeft_base("bert")
    lora = jpeft.LoraConfig(r=2, alpha=4, target_modules=["query"])
    ad = jpeft.init(lora, params, jax.random.key(0))
    with pytest.raises(jpeft.errors.UnsupportedAdapterError, match="task_type='CAUSAL_LM' on this encoder"):
        save_peft(str(tmp_path / "a"), lora, ad, task_type="CAUSAL_LM")
    with pytest.raises(jpeft.errors.UnsupportedAdapterError, match="pass params="):
        save_peft(str(tmp_path / "b"), lora, ad, task_type="SEQ_CLS")
    prefix = jpeft.PrefixTuningConfig(num_virtual_tokens=T)
    with pytest.raises(jpeft.errors.UnsupportedAdapterError, match=r"task_type='SEQ_CLS' on this encoder.*\['FEATURE_EXTRACTION'\]"):
        save_peft(str(tmp_path / "c"), prefix, jpeft.init(prefix, params, jax.random.key(0)), params=params, task_type="SEQ_CLS")
    prompt = jpeft.PromptTuningConfig(num_virtual_tokens=T)
    with pytest.raises(jpeft.errors.UnsupportedAdapterError, match="task_type='CAUSAL_LM'"):
        save_peft(str(tmp_path / "d"), prompt, jpeft.init(prompt, params, jax.random.key(0)), params=params, task_type="CAUSAL_LM")
    assert not any((tmp_path / n).exists() for n in "abcd")


@pytest.mark.parametrize("targets", ["all-linear", ["query", "classifier"]])
def test_seq_cls_with_a_classifier_site_is_refused_not_dropped_by_peft(targets, tmp_path):
    """PEFT's SEQ_CLS loads the classifier as a module to save and silently drops adapter weights on
    it (logits 4.1 apart for all-linear on the tiny BERT): save_peft refuses that before writing,
    FEATURE_EXTRACTION keeps the classifier LoRA in PEFT too, and load_peft refuses such a file."""
    import json

    hf, _ = tiny.hf_model("bert")
    model, params = _jpeft_base("bert")
    cfg = jpeft.LoraConfig(r=2, alpha=4, target_modules=targets)
    ad = _perturb(jpeft.init(cfg, params, jax.random.key(0)), jax.random.key(1))
    assert "classifier" in ad
    with pytest.raises(jpeft.errors.UnsupportedAdapterError, match="drop adapter weights on it"):
        save_peft(str(tmp_path / "a"), cfg, ad, task_type="SEQ_CLS", params=params)
    assert not (tmp_path / "a").exists()
    save_peft(str(tmp_path / "b"), cfg, ad, params=params)  # FEATURE_EXTRACTION: PEFT adapts the classifier
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "b")).eval()
    ids, mask = tiny.batch("bert")
    j = jpeft.apply(model, params, ad, jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(j), tiny.peft_logits(pm, ids, mask, with_positions=False),
                               rtol=1e-4, atol=1e-4)
    # the file an earlier save_peft wrote: PEFT ignores the classifier LoRA, so jpeft refuses it
    c = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    (tmp_path / "b" / "adapter_config.json").write_text(json.dumps(dict(c, task_type="SEQ_CLS", modules_to_save=["classifier", "score"])))
    with pytest.raises(jpeft.errors.UnsupportedAdapterError, match="ignores its LoRA weights"):
        load_peft(str(tmp_path / "b"), params)


def test_module_both_targeted_and_saved_in_a_peft_file_loads_as_peft_runs_it(tmp_path):
    """PEFT gives a module named in target_modules and modules_to_save a full copy and no LoRA; the
    file then lacks LoRA keys for it, which read as a base mismatch, then was refused by name; jpeft
    now selects as PEFT does (the copy, no LoRA) and gives PEFT's logits."""
    hf, _ = tiny.hf_model("mistral")
    torch.manual_seed(0)
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"],
                                                                modules_to_save=["lm_head"], init_lora_weights=False))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    pm.eval().save_pretrained(str(tmp_path))
    model, params = _jpeft_base("mistral")
    _, ad = load_peft(str(tmp_path), params)
    assert isinstance(ad["lm_head"], jpeft.SavedModule)
    ids, mask = tiny.batch("mistral")
    sel = mask.astype(bool)
    out = np.asarray(jpeft.apply(model, params, ad, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    np.testing.assert_allclose(out[sel], tiny.peft_logits(pm, ids, mask)[sel], atol=1e-4, rtol=0)


_NORMS = {"model/norm"} | {f"model/layers_{i}/{n}" for i in range(2)
                           for n in ("input_layernorm", "post_attention_layernorm")}


def test_modules_to_save_names_read_as_the_peft_that_wrote_the_file(tmp_path):
    """PEFT < 0.22 copies each module whose dotted name ends with a modules_to_save name ('norm':
    model.norm and every input_layernorm / post_attention_layernorm), PEFT 0.22 only on a component
    boundary (model.norm alone; 'proj' names no module). jpeft read every file by the old rule: the
    config it loaded from a 0.22 file copied all five norms once training went on, and a 0.22 file
    with 'proj' beside q_proj/v_proj LoRA was refused as naming modules both adapted and saved.
    Every tensor random: the installed PEFT's own files load to its logits, with a config that copies
    what that PEFT copied (the file's peft_version tells which rule)."""
    hf, _ = tiny.hf_model("llama2")
    new = tiny.peft_at_least(0, 22)
    model, params = _jpeft_base("llama2")
    ids, mask = tiny.batch("llama2")
    for name, copied in (("norm", {"model/norm"} if new else _NORMS), ("proj", set())):
        if name == "proj" and not new:
            continue  # PEFT < 0.22 would wrap the q_proj LoRA layers as copies: it refuses to build this model
        pm = tiny.perturb_trainable(peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(
            r=2, target_modules=["q_proj", "v_proj"], modules_to_save=[name])), 3)
        pm.save_pretrained(str(tmp_path / name))
        cfg, ad = load_peft(str(tmp_path / name), params)
        assert {p for p, n in ad.items() if isinstance(n, jpeft.SavedModule)} == copied
        _close(jpeft.apply(model, params, ad, jnp.asarray(ids), attention_mask=jnp.asarray(mask)),
               tiny.peft_logits(pm, ids, mask), mask)
        # the loaded config copies what the file's PEFT copied (training it further keeps PEFT's modules)
        again = jpeft.init(cfg, params, jax.random.key(0))
        assert {p for p, n in again.items() if isinstance(n, jpeft.SavedModule)} == copied


def test_modules_to_save_names_are_written_so_both_peft_versions_copy_jpefts_modules(tmp_path):
    """jpeft's modules_to_save=['norm'] copies every norm (PEFT < 0.22's suffix rule); the file
    kept the name, so PEFT 0.22 wrapped model.norm alone and loaded the four layer norms' trained
    copies into the base model's own weights: its logits matched, but disable_adapter() ran those
    trained norms as the base (3.49 off the base model's logits) and training froze them. The names
    written are now the copies' full dotted names, which every PEFT reads alike: the installed PEFT
    wraps the five norms, gives jpeft's logits (every tensor random), and the base's when disabled."""
    import safetensors.numpy as stn

    hf, _ = tiny.hf_model("llama2")
    model, params = _jpeft_base("llama2")
    cfg = jpeft.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"], modules_to_save=["norm"])
    ad = tiny.randomize_adapter(jpeft.init(cfg, params, jax.random.key(0)), 6)
    assert {p for p, n in ad.items() if isinstance(n, jpeft.SavedModule)} == _NORMS
    save_peft(str(tmp_path), cfg, ad)
    written = json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"]
    assert sorted(written) == sorted(hf_name(p) for p in _NORMS)
    assert {k for k in stn.load_file(str(tmp_path / "adapter_model.safetensors")) if "norm" in k} == {
        f"base_model.model.{hf_name(p)}.weight" for p in _NORMS}
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path)).eval()
    wrapped = {n for n, m in pm.named_modules() if isinstance(m, peft.utils.other.ModulesToSaveWrapper)}
    assert wrapped == {f"base_model.model.{hf_name(p)}" for p in _NORMS}
    ids, mask = tiny.batch("llama2")
    _close(jpeft.apply(model, params, ad, jnp.asarray(ids), attention_mask=jnp.asarray(mask)),
           tiny.peft_logits(pm, ids, mask), mask)
    with pm.disable_adapter():
        _close(np.asarray(model.apply(params, jnp.asarray(ids), attention_mask=jnp.asarray(mask))),
               tiny.peft_logits(pm, ids, mask), mask)


class _TwoNorms(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(name="prenorm")(nn.Dense(6, name="d")(x))
        return nn.Dense(3, name="head")(nn.LayerNorm(name="norm")(h))


def test_a_peft_022_modules_to_save_selection_jpeft_cannot_name_is_refused(tmp_path):
    """PEFT 0.22's modules_to_save=['norm'] copies 'norm' but not 'prenorm'; jpeft's suffix rule
    copies both and no list of names picks 'norm' alone: the file loaded, with a config that trained
    and saved a 'prenorm' copy PEFT never made. Now refused by name; the same file from PEFT 0.21
    (which copied both) loads."""
    import safetensors.numpy as stn

    params = _TwoNorms().init(jax.random.key(1), jnp.ones((2, 5, 4)))
    rng = np.random.default_rng(0)
    t = {"base_model.model.d.lora_A.weight": rng.normal(size=(2, 4)),
         "base_model.model.d.lora_B.weight": rng.normal(size=(6, 2)),
         "base_model.model.norm.weight": rng.normal(size=(6,)), "base_model.model.norm.bias": rng.normal(size=(6,))}
    stn.save_file({k: v.astype(np.float32) for k, v in t.items()}, str(tmp_path / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
    for version in ("0.22.0", "0.21.2"):
        (tmp_path / "adapter_config.json").write_text(json.dumps(dict(
            peft_type="LORA", r=2, lora_alpha=4, target_modules=["d"], modules_to_save=["norm"], peft_version=version)))
        if version == "0.22.0":
            with pytest.raises(jpeft.errors.UnsupportedAdapterError, match=r"would copy \['norm', 'prenorm'\]"):
                load_peft(str(tmp_path), params)
        else:
            cfg, ad = load_peft(str(tmp_path), params)
            assert cfg.modules_to_save == ("norm",) and isinstance(ad["norm"], jpeft.SavedModule)
            np.testing.assert_array_equal(ad["norm"].params["scale"], t["base_model.model.norm.weight"].astype(np.float32))


@pytest.mark.parametrize("method", ["ia3", "lokr", "oft"])
def test_non_lora_adapter_on_lm_head_loads_with_peft_base_weight_copy(method, tmp_path):
    """PEFT saves lm_head's base weight (``lm_head.base_layer.weight``) next to any method that targets
    it; those files were refused as a tied-embedding mismatch on an untied base. The copy is checked
    against the base (a different one is refused) and the adapter matches PEFT's logits."""
    import safetensors.numpy as stn

    hf, _ = tiny.hf_model("mistral")
    make = {"ia3": lambda: peft.IA3Config(target_modules=["lm_head", "k_proj"], feedforward_modules=[], init_ia3_weights=False),
            "lokr": lambda: peft.LoKrConfig(r=2, target_modules=["lm_head", "q_proj"], init_weights=False),
            "oft": lambda: peft.OFTConfig(r=0, oft_block_size=4, target_modules=["lm_head", "q_proj"], init_weights=False)}
    torch.manual_seed(0)
    pm = peft.get_peft_model(copy.deepcopy(hf), make[method]())
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape))
    pm.eval()
    pm.save_pretrained(str(tmp_path))
    f = str(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.lm_head.base_layer.weight" in stn.load_file(f)
    model, params = _jpeft_base("mistral")
    _, ad = load_peft(str(tmp_path), params)
    ids, mask = tiny.batch("mistral")
    _close(jpeft.apply(model, params, ad, jnp.asarray(ids), jnp.asarray(mask)), tiny.peft_logits(pm, ids, mask), mask)
    t = stn.load_file(f)
    t["base_model.model.lm_head.base_layer.weight"][3] += 1.0  # a resized / re-initialised head PEFT would load
    stn.save_file(t, f, metadata={"format": "pt"})
    with pytest.raises(jpeft.errors.BaseMismatchError, match="differs from the base's in 1 row"):
        load_peft(str(tmp_path), params)


def test_trained_classifier_copy_loads_as_module_to_save(tmp_path):
    """SEQ_CLS trains PEFT's classifier copy (modules_to_save): LoRA loads it as a SavedModule and
    matches PEFT's logits; saved back, PEFT reads the trained copy (not the base's)."""
    hf, _ = tiny.hf_model("bert")
    torch.manual_seed(0)
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS",
                                                                init_lora_weights=False))
    with torch.no_grad():
        pm.base_model.model.classifier.modules_to_save["default"].weight.add_(0.1)
        pm.base_model.model.classifier.modules_to_save["default"].bias.add_(0.1)
    pm.eval()
    pm.save_pretrained(str(tmp_path / "a"))
    model, params = _jpeft_base("bert")
    cfg, ad = load_peft(str(tmp_path / "a"), params)
    # the names each PEFT writes for SEQ_CLS: PEFT 0.22 adds DistilBERT's pre_classifier (no module of BERT's)
    new = tiny.peft_at_least(0, 22)
    assert isinstance(ad["classifier"], jpeft.SavedModule)
    assert cfg.modules_to_save == ("classifier", "score") + (("pre_classifier",) if new else ())
    ids, mask = tiny.batch("bert")
    t = tiny.peft_logits(pm, ids, mask, with_positions=False)
    j = jpeft.apply(model, params, ad, jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(j), t, rtol=1e-4, atol=1e-4)
    assert np.abs(np.asarray(model.apply(params, jnp.asarray(ids), jnp.asarray(mask))) - t).max() > 1e-3
    save_peft(str(tmp_path / "b"), cfg, ad, task_type="SEQ_CLS", params=params)
    pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "b")).eval()
    np.testing.assert_allclose(tiny.peft_logits(pm2, ids, mask, with_positions=False), t, rtol=1e-4, atol=1e-4)


SEQ_CLS_METHODS = {
    "ia3": lambda: peft.IA3Config(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"],
                                  task_type="SEQ_CLS"),
    "loha": lambda: peft.LoHaConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS"),
    "lokr": lambda: peft.LoKrConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS"),
    "oft": lambda: peft.OFTConfig(r=0, oft_block_size=4, target_modules=["query", "value"], task_type="SEQ_CLS"),
    "vera": lambda: peft.VeraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"),
    "adalora": lambda: peft.AdaLoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS", total_step=10),
    "prompt": lambda: peft.PromptTuningConfig(num_virtual_tokens=T, task_type="SEQ_CLS"),
    "ln_tuning": lambda: peft.LNTuningConfig(target_modules=["LayerNorm"], task_type="SEQ_CLS"),
}


@pytest.mark.parametrize("method", sorted(SEQ_CLS_METHODS))
def test_seq_cls_classifier_copy_of_every_method_round_trips_with_peft(method, tmp_path):
    """PEFT's SEQ_CLS trains a copy of BERT's classifier (modules_to_save) for every method; jpeft
    loaded it for LoRA only and refused the other methods' files ("a trained copy of 'classifier'
    ... which jpeft does not load"). Every trainable PEFT tensor random, the classifier copy too:
    jpeft's logits equal PEFT's; changed in jpeft and saved back, PEFT's logits equal jpeft's."""
    hf, _ = tiny.hf_model("bert")
    pm = peft.get_peft_model(copy.deepcopy(hf), SEQ_CLS_METHODS[method]())
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if p.requires_grad:  # the classifier copy, and IA3's / LN tuning's scales away from their init
                p.copy_(0.3 * torch.randn(p.shape, generator=g) + (1.0 if "ia3_l" in name else 0.0))
    pm.eval().save_pretrained(str(tmp_path / "a"))
    ids, mask = tiny.batch("bert")
    model, params = _jpeft_base("bert")
    cfg, ad = load_peft(str(tmp_path / "a"), params)
    assert isinstance(ad["classifier"], jpeft.SavedModule)
    t = tiny.peft_logits(pm, ids, mask, with_positions=False)
    assert np.abs(t - tiny.peft_logits(hf, ids, mask, with_positions=False)).max() > 1e-2
    j = jpeft.apply(model, params, ad, jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(j), t, rtol=1e-4, atol=1e-4)
    # as after more training in jpeft: every array moves, the classifier copy too (VeRA's shared projections
    # are not trained)
    train, frozen = jpeft.split_frozen(ad)
    ad2 = jpeft.join_frozen(_perturb(train, jax.random.key(2)), frozen)
    save_peft(str(tmp_path / "b"), cfg, ad2, params=params)  # "auto": SEQ_CLS, as the adapter carries the copy
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "b")).eval()
    j2 = jpeft.apply(model, params, ad2, jnp.asarray(ids), jnp.asarray(mask))
    assert np.abs(np.asarray(j2) - np.asarray(j)).max() > 1e-2
    np.testing.assert_allclose(tiny.peft_logits(pm2, ids, mask, with_positions=False), np.asarray(j2),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(jpeft.errors.UnsupportedAdapterError, match="task_type 'SEQ_CLS' only; found task_type='FEATURE_EXTRACTION'"):
        save_peft(str(tmp_path / "c"), cfg, ad2, params=params, task_type="FEATURE_EXTRACTION")
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("method", ["lora", "ia3", "prompt"])
def test_seq_cls_adapter_of_a_decoder_is_refused_as_a_head_jpeft_lacks(method, tmp_path):
    """A PEFT SEQ_CLS adapter trained on MistralForSequenceClassification carries its ``score``
    head; jpeft's Mistral is a causal LM without one. Refused before, but as a key mismatch (LoRA)
    or as a "trained copy that differs from the base's" (the others); now the message says that
    the head is one jpeft's decoders do not have."""
    import transformers

    _, folder = tiny.hf_model("mistral")
    _, params = _jpeft_base("mistral")
    torch.manual_seed(0)
    sc = transformers.MistralForSequenceClassification.from_pretrained(folder, num_labels=3)
    make = {"lora": lambda: peft.LoraConfig(r=2, target_modules=["q_proj"], task_type="SEQ_CLS"),
            "ia3": lambda: peft.IA3Config(target_modules=["k_proj"], feedforward_modules=[], task_type="SEQ_CLS"),
            "prompt": lambda: peft.PromptTuningConfig(num_virtual_tokens=T, task_type="SEQ_CLS")}
    peft.get_peft_model(sc, make[method]()).save_pretrained(str(tmp_path))
    with pytest.raises(jpeft.errors.UnsupportedAdapterError, match="head 'score' of a SEQ_CLS model.*without a classification head"):
        load_peft(str(tmp_path), params)


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_token_classification_adapter_is_refused_not_loaded_as_the_sequence_head(method, tmp_path):
    """PEFT's TOKEN_CLS saves the token classifier (BertForTokenClassification's ``classifier``, of
    the sequence classifier's shape) as SEQ_CLS saves its head: LoRA loaded it as the classifier of
    jpeft's sequence classifier, which applied the per-token head to the pooled first token with
    no word (logits [batch, labels] where the adapter's model gives [batch, seq, labels]). On the
    sequence classifier's params it is refused, naming jpeft's token classifier, where it loads
    (tests/test_bert_task_heads.py)."""
    import transformers

    hf, _ = tiny.hf_model("bert")
    _, params = _jpeft_base("bert")
    tok = transformers.BertForTokenClassification(hf.config)
    tok.load_state_dict({k: v for k, v in hf.state_dict().items() if ".pooler." not in k})
    make = {"lora": lambda: peft.LoraConfig(r=2, target_modules=["query"], task_type="TOKEN_CLS", init_lora_weights=False),
            "ia3": lambda: peft.IA3Config(target_modules=["key"], feedforward_modules=[], task_type="TOKEN_CLS")}
    torch.manual_seed(0)
    pm = peft.get_peft_model(tok, make[method]())
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape))
    pm.save_pretrained(str(tmp_path))
    with pytest.raises(jpeft.errors.BaseMismatchError,
                       match="task_type='TOKEN_CLS'.*sequence classifier's.*BertForTokenClassification"):
        load_peft(str(tmp_path), params)


def test_adalora_seq_cls_adapter_trains_with_its_classifier_copy_as_peft(tmp_path):
    """AdaLoRA's SEQ_CLS file carries the classifier copy PEFT trains, which loads as a
    SavedModule site: the orthogonal penalty and the rank allocator then refused the adapter ("an
    AdaLoRA adapter holds a SavedModule at 'classifier'"), so it could not be trained at all. PEFT's
    penalty reads lora_A / lora_B only (its loss against PEFT's, every tensor random), its
    allocator scores the lora_ parameters only, and the copy trains with the inner optimizer."""
    import optax

    hf, _ = tiny.hf_model("bert")
    pm = peft.get_peft_model(copy.deepcopy(hf), SEQ_CLS_METHODS["adalora"]())
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:  # lora_A, lora_E, lora_B and the classifier copy
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    pm.eval().save_pretrained(str(tmp_path))
    model, params = _jpeft_base("bert")
    cfg, ad = load_peft(str(tmp_path), params)
    assert isinstance(ad["classifier"], jpeft.SavedModule)
    ids, mask = tiny.batch("bert")
    labels = np.arange(len(ids)) % hf.config.num_labels
    with torch.no_grad():  # PEFT's AdaLoRA adds orth_reg_weight * its penalty to the model's loss
        want = float(pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                        labels=torch.tensor(labels)).loss)
    logits = jpeft.apply(model, params, ad, jnp.asarray(ids), jnp.asarray(mask))
    ce = float(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(labels)).mean())
    reg = float(cfg.regularizer(ad))
    assert reg > 0.1
    np.testing.assert_allclose(ce + reg, want, rtol=1e-5)
    # one allocator update: the sites move as the allocator moves them without the copy, the copy as adam alone
    train = jpeft.trainable(ad)
    grads = _perturb(train, jax.random.key(3))
    tx = cfg.wrap_optimizer(optax.adam(1e-2))
    upd, _ = tx.update(grads, tx.init(train), train)
    sites = {p: n for p, n in train.items() if p != "classifier"}
    want_sites, _ = tx.update({p: grads[p] for p in sites}, tx.init(sites), sites)
    inner = optax.adam(1e-2)
    want_copy, _ = inner.update(grads["classifier"], inner.init(train["classifier"]), train["classifier"])
    for got, ref in [(upd[p], want_sites[p]) for p in sites] + [(upd["classifier"], want_copy)]:
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-8)
    assert float(jnp.abs(upd["classifier"].params["kernel"]).max()) > 1e-3  # the copy trains


@pytest.mark.parametrize("method", ["lora", "ia3", "prompt"])
def test_question_answering_adapter_is_refused_by_name(method, tmp_path):
    """PEFT's QUESTION_ANS keeps BertForQuestionAnswering's ``qa_outputs`` as a module to save.
    LoRA's file failed as a key mismatch ("trained on another model?"), the others' as
    modules_to_save jpeft does not load: on params without qa_outputs (the sequence classifier's)
    one refusal names the task type and jpeft's BertForQuestionAnswering, on which it loads
    (tests/test_bert_task_heads.py), for prompt tuning too (refused as prompt learning jpeft did not
    run before)."""
    import transformers

    hf, _ = tiny.hf_model("bert")
    _, params = _jpeft_base("bert")
    qa = transformers.BertForQuestionAnswering(hf.config)
    qa.load_state_dict({k: v for k, v in hf.state_dict().items() if ".pooler." not in k and k.startswith("bert.")},
                       strict=False)
    make = {"lora": lambda: peft.LoraConfig(r=2, target_modules=["query"], task_type="QUESTION_ANS", init_lora_weights=False),
            "ia3": lambda: peft.IA3Config(target_modules=["key"], feedforward_modules=[], task_type="QUESTION_ANS"),
            "prompt": lambda: peft.PromptTuningConfig(num_virtual_tokens=T, task_type="QUESTION_ANS")}
    torch.manual_seed(0)
    peft.get_peft_model(qa, make[method]()).save_pretrained(str(tmp_path))
    with pytest.raises(jpeft.errors.BaseMismatchError,
                       match=r"task_type='QUESTION_ANS'.*qa_outputs.*sequence classifier's.*BertForQuestionAnswering"):
        load_peft(str(tmp_path), params)


@pytest.mark.parametrize("method", ["lora", "ia3", "prompt"])
def test_feature_extraction_on_bare_bert_model_matches_peft_both_ways(method, tmp_path):
    """PEFT's FEATURE_EXTRACTION adapter of a bare ``BertModel`` (every adapter tensor random)
    loads on jpeft.models.BertModel with the encoder's params and gives PEFT's last_hidden_state.
    Loaded on the sequence classifier's params it failed as a key mismatch ("trained on another
    model?"): now the refusal says how to load it. Saved from jpeft on the bare params, prompt
    tuning was written as CAUSAL_LM, which PEFT cannot build on BertModel (AttributeError)."""
    import transformers

    hf, _ = tiny.hf_model("bert")
    bare = transformers.BertModel(hf.config)
    bare.load_state_dict({k[len("bert."):]: v for k, v in hf.state_dict().items() if k.startswith("bert.")})
    make = {"lora": lambda: peft.LoraConfig(r=2, target_modules=["query", "value"], task_type="FEATURE_EXTRACTION"),
            "ia3": lambda: peft.IA3Config(target_modules=["key", "output.dense"], feedforward_modules=["output.dense"],
                                          task_type="FEATURE_EXTRACTION"),
            "prompt": lambda: peft.PromptTuningConfig(num_virtual_tokens=T, task_type="FEATURE_EXTRACTION")}
    pm = peft.get_peft_model(copy.deepcopy(bare), make[method]())
    tiny.perturb_trainable(pm, 6).save_pretrained(str(tmp_path / "a"))
    ids, mask = tiny.batch("bert")
    rows = mask.astype(bool)

    def hidden(m, lead=T if method == "prompt" else 0):  # PEFT's output keeps the virtual tokens' states first
        with torch.no_grad():
            return m(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()[:, lead:]

    model, params = _jpeft_base("bert")
    if method != "prompt":  # prompt tuning has no module keys: it loads on either
        with pytest.raises(jpeft.errors.BaseMismatchError, match=r"saved by PEFT on the bare base \(BertModel.*jpeft.models.BertModel"):
            load_peft(str(tmp_path / "a"), params)
    encoder, enc_params = jpeft.models.BertModel(model.config), {"params": params["params"]["bert"]}
    cfg, ad = load_peft(str(tmp_path / "a"), enc_params)
    t = hidden(pm)
    assert np.abs(t - hidden(bare.eval(), 0))[rows].max() > 1e-2
    h, _ = jpeft.apply(encoder, enc_params, ad, jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(h)[rows], t[rows], rtol=1e-4, atol=1e-4)
    ad2 = _perturb(ad, jax.random.key(3))
    if method == "prompt":  # as made in jpeft: no task type of its own, so "auto" chooses it from the params
        cfg = jpeft.PromptTuningConfig(num_virtual_tokens=T)
    save_peft(str(tmp_path / "b"), cfg, ad2, params=enc_params)
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["task_type"] == "FEATURE_EXTRACTION"
    pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(bare), str(tmp_path / "b")).eval()
    h2, _ = jpeft.apply(encoder, enc_params, ad2, jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(hidden(pm2)[rows], np.asarray(h2)[rows], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama3", "gpt2"])
def test_prompt_tuning_on_a_bare_decoder_is_written_as_feature_extraction_and_matches_peft(family, tmp_path):
    """Prompt tuning saved from a bare decoder's params (jpeft.models.LlamaModel / GPT2Model, PEFT's
    LlamaModel / GPT2Model, no language-model head) was written as CAUSAL_LM, which PEFT cannot
    build there ('... has no attribute prepare_inputs_for_generation'); it is now
    FEATURE_EXTRACTION, and PEFT's last_hidden_state equals jpeft's (every virtual token random)."""
    import transformers

    hf, _ = tiny.hf_model(family)
    root, cls = {"llama3": ("model", transformers.LlamaModel), "gpt2": ("transformer", transformers.GPT2Model)}[family]
    bare = cls(hf.config)
    bare.load_state_dict({k[len(root) + 1:]: v for k, v in hf.state_dict().items() if k.startswith(root + ".")})
    model, params = _jpeft_base(family)
    stack = {"llama3": jpeft.models.LlamaModel, "gpt2": jpeft.models.GPT2Model}[family](model.config)
    sp = {"params": params["params"][root]}
    cfg = jpeft.PromptTuningConfig(num_virtual_tokens=T)
    ad = _perturb(jpeft.init(cfg, sp, jax.random.key(0), stack, jnp.zeros((1, 4), jnp.int32)), jax.random.key(4))
    save_peft(str(tmp_path), cfg, ad, params=sp)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] == "FEATURE_EXTRACTION"
    pm = peft.PeftModel.from_pretrained(bare, str(tmp_path)).eval()
    ids, _ = tiny.batch(family)
    mask = np.ones_like(ids)  # right after the virtual tokens, no padding: positions as PEFT's
    with torch.no_grad():
        t = pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    assert np.abs(t[:, T:] - bare(input_ids=torch.tensor(ids)).last_hidden_state.detach().numpy()).max() > 1e-2

    def hidden(adapter):  # jpeft's stack returns the real tokens' states (PEFT's keeps the virtual ones first)
        out = jpeft.apply(stack, sp, adapter, jnp.asarray(ids), jnp.asarray(mask))
        return np.asarray(out[0] if isinstance(out, tuple) else out)

    np.testing.assert_allclose(hidden(ad), t[:, T:], rtol=1e-4, atol=1e-4)
    _, back = load_peft(str(tmp_path), sp)  # and read back on the bare params
    np.testing.assert_allclose(hidden(back), t[:, T:], rtol=1e-4, atol=1e-4)


def test_every_key_the_installed_peft_writes_is_known_and_an_unknown_one_warns(tmp_path):
    """LoRA, IA3 and the LyCORIS loaders kept only the keys they knew: an option of a newer PEFT
    that changes the outputs was dropped with no word. Every key of the installed PEFT's configs is
    known (so its files load quietly); another key is named in a warning."""
    import json
    import warnings

    from jpeft.config import registered_configs

    made = {"LORA": peft.LoraConfig(), "IA3": peft.IA3Config(), "LOHA": peft.LoHaConfig(), "LOKR": peft.LoKrConfig(),
            "ADALORA": peft.AdaLoraConfig(total_step=10), "VERA": peft.VeraConfig(),
            "OFT": peft.OFTConfig(r=0, oft_block_size=4), "LN_TUNING": peft.LNTuningConfig(),
            "PREFIX_TUNING": peft.PrefixTuningConfig(num_virtual_tokens=2),
            "PROMPT_TUNING": peft.PromptTuningConfig(num_virtual_tokens=2)}
    reg = registered_configs()
    for ptype, cfg in made.items():
        assert set(cfg.to_dict()) <= reg[ptype].known_hf_keys(), (ptype, set(cfg.to_dict()) - reg[ptype].known_hf_keys())
    hf, _ = tiny.hf_model("mistral")
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    pm.save_pretrained(str(tmp_path))
    _, params = _jpeft_base("mistral")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_peft(str(tmp_path), params)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), lora_future_option=3)))
    with pytest.warns(UserWarning, match=r"keys jpeft does not know for LORA: \['lora_future_option'\]"):
        load_peft(str(tmp_path), params)


class _TorchLinear(torch.nn.Module):
    """One Linear without bias: its bfloat16 product is the same in torch and XLA, so what is left
    between PEFT and jpeft is the adapter's own arithmetic."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(48, 40, bias=False)

    def forward(self, x):
        return self.proj(x)


HALF_BASE_CASES = {
    "lora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], init_lora_weights=False),
    "dora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], use_dora=True, init_lora_weights=False),
    "ia3": lambda: peft.IA3Config(target_modules=["proj"], feedforward_modules=[], init_ia3_weights=False),
    "ia3-ff": lambda: peft.IA3Config(target_modules=["proj"], feedforward_modules=["proj"], init_ia3_weights=False),
    "loha": lambda: peft.LoHaConfig(r=4, alpha=8, target_modules=["proj"], init_weights=False),
}


@pytest.mark.parametrize("method", sorted(HALF_BASE_CASES))
def test_adapter_over_a_bfloat16_base_computes_and_trains_as_peft(method, tmp_path):
    """Over a bfloat16 base PEFT keeps the adapter in float32 (autocast_adapter_dtype=True), runs the
    branch in float32 and rounds its sum with the base output once. jpeft cast the adapter to
    bfloat16 and rounded after every product: on one bf16 Linear with every adapter tensor random,
    only 34-71% of the outputs equalled PEFT's, and the adapter's gradients were off by 0.2-1.2%
    (bf16 rounding). Now the outputs equal PEFT's bit for bit but for a rare last bf16 step, and the
    gradients and the loss agree to float32 rounding."""
    torch.manual_seed(0)
    base = _TorchLinear()
    with torch.no_grad():
        base.proj.weight.normal_(0.0, 0.2)
    pm = peft.get_peft_model(copy.deepcopy(base), HALF_BASE_CASES[method]())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:  # every adapter tensor random; IA3's and DoRA's scales around 1
                p.copy_(0.3 * torch.randn(p.shape, generator=g) + (1.0 if "magnitude" in n or "ia3" in n else 0.0))
    pm.save_pretrained(str(tmp_path / "adapter"))
    pm16 = peft.PeftModel.from_pretrained(copy.deepcopy(base).to(torch.bfloat16), str(tmp_path / "adapter"),
                                          is_trainable=True)
    trained = [p for p in pm16.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)  # PEFT's float32 adapter on the bf16 base
    x = torch.randn(64, 48).to(torch.bfloat16)
    w = torch.randn(64, 40)
    out_t = pm16(x)
    loss_t = (out_t.float() * w).sum()
    loss_t.backward()
    with torch.no_grad():  # the gradients, saved as an adapter so that jpeft reads them in its own layout
        for p in trained:
            p.copy_(p.grad)
    pm16.save_pretrained(str(tmp_path / "grads"))

    class Proj(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(40, use_bias=False, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, name="proj")(x)

    params = {"params": {"proj": {"kernel": jnp.asarray(base.proj.weight.detach().numpy().T, jnp.bfloat16)}}}
    _, ad = load_peft(str(tmp_path / "adapter"), params)
    _, want = load_peft(str(tmp_path / "grads"), params)
    xj, wj = jnp.asarray(x.float().numpy(), jnp.bfloat16), jnp.asarray(w.numpy())
    out_j = jpeft.apply(Proj(), params, ad, xj)
    assert out_j.dtype == jnp.bfloat16
    j, t = np.asarray(out_j, np.float32), out_t.detach().float().numpy()
    off = j != t  # float32 sums in another order may end on the other side of a bf16 rounding, rarely
    assert off.mean() < 0.01, (off.mean(), np.abs(j - t).max())
    assert np.all(np.abs(j - t)[off] <= 2.0 ** -7 * np.abs(t)[off])  # one bf16 step at most

    def loss(a):
        return jnp.sum(jpeft.apply(Proj(), params, a, xj).astype(jnp.float32) * wj)

    loss_j, grads = jax.value_and_grad(loss)(ad)
    np.testing.assert_allclose(float(loss_j), float(loss_t), rtol=1e-4)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(grads))
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_bert_prefix_from_peft_refuses_the_token_types_peft_drops(tmp_path):
    """PEFT's prefix tuning of a BERT sequence classifier saved as FEATURE_EXTRACTION (PEFT's
    task type for it that builds) loads in jpeft, but PEFT's forward drops token_type_ids there
    (with a warning) while jpeft used them: logits 0.3 apart on a tiny BERT, without a word. jpeft
    now refuses them (InputValidationError) and gives PEFT's numbers without them."""
    hf, _ = tiny.hf_model("bert")
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.PrefixTuningConfig(num_virtual_tokens=2,
                                                                        task_type="FEATURE_EXTRACTION"))
    tiny.perturb_trainable(pm, 6).save_pretrained(str(tmp_path))
    ids, mask = tiny.batch("bert")
    types = np.asarray(jax.random.randint(jax.random.key(2), ids.shape, 0, 2))

    def ref(**kw):
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                      **{k: torch.tensor(v) for k, v in kw.items()}).logits.numpy()

    with_types = ref(token_type_ids=types)
    np.testing.assert_array_equal(with_types, ref())  # PEFT ignores them
    model, params = _jpeft_base("bert")
    _, ad = load_peft(str(tmp_path), params)
    out = jpeft.apply(model, params, ad, jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(out), with_types, rtol=1e-4, atol=1e-4)
    assert np.abs(with_types - tiny.torch_logits("bert", ids, mask)).max() > 1e-2  # the prefix matters
    with pytest.raises(jpeft.errors.InputValidationError, match="drops token_type_ids"):
        jpeft.apply(model, params, ad, jnp.asarray(ids), jnp.asarray(mask), token_type_ids=jnp.asarray(types))


def test_bert_prefix_exports_to_peft_as_feature_extraction(tmp_path):
    """save_peft refused every BERT prefix ("PEFT cannot build this method"), though PEFT builds and
    runs one as FEATURE_EXTRACTION (the task type it now writes): PEFT's logits equal jpeft's
    without token types (PEFT drops them, so the adapter loaded back refuses them by name), and the
    task types PEFT cannot run a BERT prefix with (SEQ_CLS: "Model does not support past key values")
    are still refused before anything is written."""
    model, params = _jpeft_base("bert")
    hf, folder = tiny.hf_model("bert")
    cfg = jpeft.PrefixTuningConfig(num_virtual_tokens=T, prefix_projection=True)
    ad = _perturb(jpeft.init(cfg, params, jax.random.key(0)), jax.random.key(1))  # embeddings and MLP random
    save_peft(str(tmp_path / "a"), cfg, ad, params=params, base_model_name_or_path=folder)
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["task_type"] == "FEATURE_EXTRACTION"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "a")).eval()
    ids, mask = tiny.batch("bert")
    types = jnp.asarray(jax.random.randint(jax.random.key(2), ids.shape, 0, 2))
    j = np.asarray(jpeft.apply(model, params, ad, jnp.asarray(ids), jnp.asarray(mask)))
    assert np.abs(j - tiny.torch_logits("bert", ids, mask)).max() > 1e-2  # the prefix matters
    t = tiny.peft_logits(pm, ids, mask, with_positions=False)
    np.testing.assert_allclose(j, t, rtol=1e-4, atol=1e-4)
    _, ad2 = load_peft(str(tmp_path / "a"), params)
    np.testing.assert_allclose(np.asarray(jpeft.apply(model, params, ad2, jnp.asarray(ids), jnp.asarray(mask))), j,
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(jpeft.errors.InputValidationError, match="drops token_type_ids"):
        jpeft.apply(model, params, ad2, jnp.asarray(ids), jnp.asarray(mask), token_type_ids=types)
    for task in ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"):
        with pytest.raises(jpeft.errors.UnsupportedAdapterError, match=rf"task_type='{task}'.*\['FEATURE_EXTRACTION'\]"):
            save_peft(str(tmp_path / task), cfg, ad, params=params, base_model_name_or_path=folder, task_type=task)
        assert not (tmp_path / task).exists()


def test_bert_prefix_numbers_every_slot_as_peft_left_padding_and_padded_slots_included(tmp_path):
    """PEFT's BERT numbers every slot after the prefix (``arange + T``, padding included), as jpeft's
    BERT does without a prefix; jpeft's prefix counted real tokens instead (``cumsum(mask) - 1 + T``).
    Right-padded, only the padded slots' ``last_hidden_state`` differed (up to 2.4 on the tiny BERT);
    left-padded, the real tokens moved: their states were 2.2 off PEFT's and the pooled output
    0.30, without a word. Bare BertModel, PEFT's FEATURE_EXTRACTION prefix, every tensor random."""
    import transformers

    hf, _ = tiny.hf_model("bert")
    bare = transformers.BertModel(hf.config)
    bare.load_state_dict({k[len("bert."):]: v for k, v in hf.state_dict().items() if k.startswith("bert.")})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(bare), peft.PrefixTuningConfig(num_virtual_tokens=T,
                                                                               task_type="FEATURE_EXTRACTION"))
    tiny.perturb_trainable(pm, 3).save_pretrained(str(tmp_path))
    model, params = _jpeft_base("bert")
    encoder, enc_params = jpeft.models.BertModel(model.config), {"params": params["params"]["bert"]}
    _, ad = load_peft(str(tmp_path), enc_params)
    ids, right = tiny.batch("bert", seed=3)
    left = right[:, ::-1].copy()
    for mask in (right, left):
        ids_m = np.where(mask == 1, ids[:, ::-1] if mask is left else ids, 0)
        with torch.no_grad():
            out = pm(input_ids=torch.tensor(ids_m), attention_mask=torch.tensor(mask))
        h, pooled = jpeft.apply(encoder, enc_params, ad, jnp.asarray(ids_m), jnp.asarray(mask))
        np.testing.assert_allclose(np.asarray(h), out.last_hidden_state.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(pooled), out.pooler_output.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family,bias", [("bert", "all"), ("gpt2", "lora_only")])
def test_dora_with_trained_base_biases_matches_peft(family, bias, tmp_path):
    """DoRA with bias='all' / 'lora_only' was refused (ConfigError "not implemented with DoRA"),
    though PEFT runs it: its DoRA adds the base layer's bias (trained in place) after the magnitude
    scaling, unscaled, and its merge keeps that bias beside m/||W + sAB|| (W + sAB). Both ways, with
    every tensor random (A, B, magnitudes, the trained biases), before and after the merge."""
    model, params = _jpeft_base(family)
    hf, folder = tiny.hf_model(family)
    targets = ["query", "value", "output.dense"] if family == "bert" else ["c_attn", "c_proj"]
    ids, mask = tiny.batch(family)

    def run(p, a):
        return np.asarray(jpeft.apply(model, p, a, jnp.asarray(ids), jnp.asarray(mask)))

    def torch_out(m):
        return tiny.peft_logits(m, ids, mask, with_positions=family != "bert")

    def close(j, t):  # BERT: one row of logits per sequence; GPT-2: the real tokens'
        if family == "bert":
            np.testing.assert_allclose(j, t, rtol=1e-4, atol=1e-4)
        else:
            _close(j, t, mask)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, use_dora=True,
                                                                    bias=bias, init_lora_weights=False))
        tiny.perturb_trainable(pm, 7).save_pretrained(str(tmp_path / "p"))
        ref = torch_out(pm)
        ref_merged = torch_out(copy.deepcopy(pm).merge_and_unload())
    close(ref_merged, ref)
    _, ad = load_peft(str(tmp_path / "p"), params)
    sites = [n for n in ad.values() if isinstance(n, jpeft.LoraWeights)]
    assert sites and all(n.magnitude is not None and n.base_bias is not None for n in sites)
    close(run(params, ad), ref)
    close(run(jpeft.merge(params, ad), {}), ref)
    with pytest.raises(jpeft.errors.NotInvertibleError, match="base bias"):  # merge replaced the base's own bias
        jpeft.unmerge(jpeft.merge(params, ad), ad)
    # the trained biases matter: the DoRA sites with the base's own biases are far from PEFT's logits
    own = {p: dataclasses.replace(n, base_bias=None) if isinstance(n, jpeft.LoraWeights) else n for p, n in ad.items()}
    assert np.abs(run(params, own) - ref).max() > 1e-2
    # jpeft -> PEFT
    cfg = jpeft.LoraConfig(r=2, alpha=4, target_modules=targets, use_dora=True, bias=bias, init_weights="random")
    ad2 = _perturb(jpeft.init(cfg, params, jax.random.key(0)), jax.random.key(1))
    out2 = run(params, ad2)
    save_peft(str(tmp_path / "j"), cfg, ad2, params=params, base_model_name_or_path=folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pj = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "j")).eval()
        close(out2, torch_out(pj))
        close(run(jpeft.merge(params, ad2), {}), torch_out(pj.merge_and_unload()))
