"""Hugging Face PEFT format round trips for DoRA, IA3, prefix tuning and prompt tuning, through the
real ``peft`` package on tiny randomly initialised transformers models: adapters saved by jpeft
load in peft and adapters saved by peft load in jpeft, with logits equal to 1e-4."""

import copy
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
import jpeft.models
from jpeft.hf import load_peft, save_peft
from jpeft.methods.ia3 import IA3Config
from jpeft.methods.prefix import PrefixTuningConfig
from jpeft.methods.prompt import PromptTuningConfig

torch = __import__("torch")  # a test dependency: missing means a broken install, not a skip
peft = __import__("peft")  # a test dependency: missing means a broken install, not a skip
sys.path.insert(0, os.path.dirname(__file__))
import _models_tiny as tiny  # noqa: E402

T = 4  # virtual tokens


def _jpeft_base(family):
    _, folder = tiny.hf_model(family)
    return jpeft.models.from_pretrained(folder)


def _torch_logits(pm, ids, mask, with_positions=True):
    kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    if with_positions:
        kw["position_ids"] = torch.tensor(tiny.positions(mask))
    with torch.no_grad():
        return pm(**kw).logits.float().numpy()


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
    "ia3": (lambda fam: IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
            lambda fam: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                                       init_ia3_weights=False)),
    "prefix": (lambda fam: PrefixTuningConfig(num_virtual_tokens=T, prefix_projection=True),
               lambda fam: peft.PrefixTuningConfig(num_virtual_tokens=T, prefix_projection=True)),
    "prompt": (lambda fam: PromptTuningConfig(num_virtual_tokens=T),
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
    save_peft(str(tmp_path), jcfg(family), ad)
    hf, _ = tiny.hf_model(family)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path)).eval()
    t = _torch_logits(pm, ids, mask, with_positions=method != "prompt")
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
    t = _torch_logits(pm, ids, mask, with_positions=method != "prompt")
    model, params = _jpeft_base(family)
    cfg, ad = load_peft(str(tmp_path), params)
    assert cfg.peft_type == pcfg.peft_type.value if hasattr(pcfg.peft_type, "value") else pcfg.peft_type
    j = jpeft.apply(model, params, ad, jnp.asarray(ids), jnp.asarray(mask))
    _close(j, _compare(method, j, t), mask)


def test_prefix_load_on_wrong_base_is_named(tmp_path):
    model, params = _jpeft_base("llama3")
    ad = jpeft.init(PrefixTuningConfig(num_virtual_tokens=T), params, jax.random.key(0))
    save_peft(str(tmp_path), PrefixTuningConfig(num_virtual_tokens=T), ad)
    _, gparams = _jpeft_base("gpt2")
    with pytest.raises(jpeft.BaseMismatchError, match="layers of key width"):
        load_peft(str(tmp_path), gparams)
