"""LN tuning against Hugging Face PEFT 0.21 through the PEFT format both ways (Mistral's RMSNorm,
GPT-2's LayerNorm with bias; logits to 1e-4, every copied norm parameter moved off the base), on
a layer-scanned model, its counts and its refusals."""

import copy
import os
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

sys.path.insert(0, os.path.dirname(__file__))
import _models_tiny as tiny  # noqa: E402

import jpeft  # noqa: E402
import jpeft.models  # noqa: E402
from jpeft import hf as H  # noqa: E402
from jpeft import scan  # noqa: E402
from jpeft.methods.ln_tuning import LNTuningConfig, LNTuningWeights  # noqa: E402

torch = __import__("torch")  # a test dependency: missing means a broken install, not a skip
peft = __import__("peft")  # a test dependency: missing means a broken install, not a skip

TARGETS = {"mistral": ["input_layernorm", "post_attention_layernorm", "norm"], "gpt2": ["ln_1", "ln_2", "ln_f"]}


def _logits(model, params, adapter, ids, mask):
    return np.asarray(jpeft.apply(model, params, adapter, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))


@pytest.mark.parametrize("family", ["mistral", "gpt2"])
def test_jpeft_to_peft(family, tmp_path):
    hf_model, folder = tiny.hf_model(family)
    model, params = jpeft.models.from_pretrained(folder)
    cfg = LNTuningConfig(target_modules=TARGETS[family])
    ad = jpeft.init(cfg, params, jax.random.key(0))
    assert len(ad) == 5 and all(isinstance(n, LNTuningWeights) for n in ad.values())
    ids, mask = tiny.batch(family, seed=3)
    base = tiny.peft_logits(hf_model, ids, mask)
    tiny.assert_close_at_tokens(_logits(model, params, ad, ids, mask), base, mask)  # the copy starts equal to the base
    leaves, tdef = jax.tree.flatten(ad)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    ad = jax.tree.unflatten(tdef, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    assert {tuple(sorted(n.params)) for n in ad.values()} == ({("scale",)} if family == "mistral" else {("bias", "scale")})
    H.save_peft(str(tmp_path), cfg, ad, base_model_name_or_path=folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf_model), str(tmp_path)).eval()
    ref = tiny.peft_logits(pm, ids, mask)
    assert np.abs(ref - base).max() > 1e-3
    tiny.assert_close_at_tokens(_logits(model, params, ad, ids, mask), ref, mask)
    tiny.assert_close_at_tokens(_logits(model, jpeft.merge(params, ad), {}, ids, mask), ref, mask)


@pytest.mark.parametrize("family", ["mistral", "gpt2"])
def test_peft_to_jpeft(family, tmp_path):
    hf_model, folder = tiny.hf_model(family)
    model, params = jpeft.models.from_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(hf_model), peft.LNTuningConfig(target_modules=TARGETS[family]))
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if p.requires_grad:
                    p.add_(0.3 * torch.randn(p.shape, generator=g))
        pm.eval()
        pm.save_pretrained(str(tmp_path))
        s = pm.get_nb_trainable_parameters()
    ids, mask = tiny.batch(family, seed=3)
    ref = tiny.peft_logits(pm, ids, mask)
    assert np.abs(ref - tiny.peft_logits(hf_model, ids, mask)).max() > 1e-3
    cfg, ad = H.load_peft(str(tmp_path), params)
    assert sorted(cfg.target_modules) == sorted(TARGETS[family])
    tiny.assert_close_at_tokens(_logits(model, params, ad, ids, mask), ref, mask)
    # PEFT's counts: its total holds the norms and their copies (jpeft's was the base alone, 160 fewer on mistral)
    got = jpeft.summary(params, ad, print_fn=None)
    assert (got["trainable"], got["total"]) == s and got["base"] == s[1] - s[0]
    if family == "mistral":  # the same file on the layer-scanned model
        smodel, sparams = jpeft.models.from_pretrained(folder, scan_layers=True)
        _, sad = H.load_peft(str(tmp_path), sparams)
        assert sorted(sad) == ["model/layers/input_layernorm", "model/layers/post_attention_layernorm", "model/norm"]
        assert isinstance(sad["model/layers/input_layernorm"], scan.Stacked)
        tiny.assert_close_at_tokens(_logits(smodel, sparams, sad, ids, mask), ref, mask)
        tiny.assert_close_at_tokens(_logits(smodel, jpeft.merge(sparams, sad), {}, ids, mask), ref, mask)
        init_sc = jpeft.init(cfg, sparams, jax.random.key(0), smodel, jnp.asarray(ids))
        assert jax.tree.structure(init_sc) == jax.tree.structure(sad)


def test_refusals():
    model, params = jpeft.models.from_pretrained(tiny.hf_model("mistral")[1])
    with pytest.raises(jpeft.TargetNotFoundError, match="norm layer"):
        jpeft.init(LNTuningConfig(target_modules=["q_proj"]), params, jax.random.key(0))
    with pytest.raises(jpeft.ConfigError, match="modules_to_save"):
        LNTuningConfig.from_dict({"peft_type": "LN_TUNING", "target_modules": ["norm"], "modules_to_save": ["lm_head"]})
    ad = jpeft.init(LNTuningConfig(target_modules=["norm"]), params, jax.random.key(0))
    with pytest.raises(jpeft.errors.NotInvertibleError, match="keep the original params"):
        jpeft.unmerge(jpeft.merge(params, ad), ad)
    other = {"model/norm": LNTuningWeights({"scale": jnp.ones((5,))})}
    with pytest.raises(jpeft.ShapeMismatchError, match="another model"):
        jpeft.merge(params, other)


def test_peft_copy_of_a_module_that_is_no_norm_is_refused_by_name(tmp_path):
    """PEFT's LN tuning trains a copy of whatever target_modules names (here q_proj, a Linear);
    jpeft's copies norm layers only, and refused such a file as "trained on another model"
    (BaseMismatchError, the keys matching no module), though the base was the right one."""
    hf_model, folder = tiny.hf_model("mistral")
    _, params = jpeft.models.from_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(hf_model), peft.LNTuningConfig(target_modules=["input_layernorm",
                                                                                              "q_proj"]))
    assert any(".q_proj.ln_tuning_layers." in n for n, _ in pm.named_parameters())
    pm.save_pretrained(str(tmp_path))
    with pytest.raises(jpeft.errors.UnsupportedAdapterError,
                       match=r"2 module\(s\) that are not norm layers .*'model.layers.0.self_attn.q_proj'"):
        H.load_peft(str(tmp_path), params)


def test_partition_specs_follow_the_norms():
    """LN tuning's copy is sharded as the norm's own parameters (scanned: with the layer axis);
    OFT's small oft_R is replicated."""
    cfg = jpeft.models.LlamaConfig(vocab_size=24, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2,
                                   num_kv_heads=1, scan_layers=True)
    model = jpeft.models.LlamaForCausalLM(cfg)
    ids = jax.ShapeDtypeStruct((1, 4), jnp.int32)
    params = jax.eval_shape(lambda i: model.init(jax.random.key(0), i), ids)
    specs = jax.tree.map(lambda x: P("fsdp") if x.ndim == 1 else P(None, "fsdp"), params)
    ad = jax.eval_shape(lambda p: jpeft.init(LNTuningConfig(), p, jax.random.key(0), model, jnp.ones((1, 4), jnp.int32)),
                        params)
    got = jpeft.adapter_specs(ad, specs)
    assert got["model/norm"].params == {"scale": P("fsdp")}
    assert got["model/layers/input_layernorm"].inner.params == {"scale": P(None, "fsdp")}
    oft_ad = jax.eval_shape(lambda p: jpeft.init(jpeft.OFTConfig(oft_block_size=4), p, jax.random.key(0), model,
                                                 jnp.ones((1, 4), jnp.int32)), params)
    assert all(s == P() for s in jax.tree.leaves(jpeft.adapter_specs(oft_ad, specs), is_leaf=lambda v: isinstance(v, P)))
