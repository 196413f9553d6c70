"""The parameter-budget script: Hugging Face PEFT's figures for Llama-2-7B, from shapes alone."""

import dataclasses
import os
import sys

import jax

from jpeft import budget
from jpeft.cli._common import method_config, method_names
from jpeft.errors import ConfigError
from jpeft.models import supported_model_types

sys.path.insert(0, os.path.dirname(__file__))
import _models_tiny as tiny  # noqa: E402


def test_llama2_7b_budget_matches_peft_figures(capsys):
    rows = {(r["method"], r["settings"]): r for r in budget.budget_rows(budget.LlamaConfig_7b(), progress=False)}
    lora = rows[("LoRA", "r=8, alpha=16, q_proj+v_proj")]
    # "trainable params: 4,194,304 || all params: 6,742,609,920 || trainable%: 0.0622" (HF PEFT on Llama-2-7B)
    assert lora["base"] == 6_738_415_616 and lora["trainable"] == 4_194_304
    assert round(100 * lora["share"], 4) == 0.0622
    assert rows[("IA3", "k_proj, v_proj, down_proj (feed-forward)")]["trainable"] == 614_400  # PEFT's IA3 figure
    assert rows[("DoRA", "r=8, alpha=16, q_proj+v_proj")]["trainable"] == 4_194_304 + 32 * 2 * 4096
    assert rows[("Prefix tuning", "20 virtual tokens")]["trainable"] == 20 * 32 * 2 * 4096
    assert rows[("Prompt tuning", "20 virtual tokens")]["trainable"] == 20 * 4096
    assert rows[("Pfeiffer", "reduction 16, after down_proj")]["trainable"] == 32 * (2 * 4096 * 256 + 256 + 4096)
    # PEFT's print_trainable_parameters for its default OFTConfig / LNTuningConfig on a meta-device Llama-2-7B
    assert rows[("OFT", "oft_block_size=32, q_proj+v_proj")]["trainable"] == 4_063_232 == 32 * 2 * 128 * (32 * 31 // 2)
    assert rows[("LN tuning", "input_layernorm+post_attention_layernorm+norm")]["trainable"] == 266_240
    # nothing was allocated: the budget ran on shapes only
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(budget.abstract_params(budget.LlamaConfig_7b())))


def test_cli_prints_and_writes_the_table(tmp_path, capsys):
    assert budget.main(["--quiet"]) == 0
    out = capsys.readouterr().out
    assert "| LoRA | r=8, alpha=16, q_proj+v_proj | 4,194,304 | 0.062% |" in out
    doc = tmp_path / "M.md"
    doc.write_text(f"intro\n{budget.BEGIN}\nSTALE TABLE\n{budget.END}\nend\n")
    budget.main(["--quiet", "--write", str(doc)])
    text = doc.read_text()
    assert "STALE" not in text and "4,194,304" in text and text.startswith("intro") and text.endswith("end\n")


def test_default_targets_are_peft_defaults_for_every_family():
    """`jpeft info` / `jpeft train` without target_modules use PEFT's defaults per model type
    (Qwen2's IA3 default is q_proj, v_proj, down_proj, not Llama's k_proj: it trained other modules)."""
    from peft.utils import constants as C

    tables = {"LORA": "LORA", "LOHA": "LOHA", "LOKR": "LOKR", "OFT": "OFT", "VERA": "VERA", "ADALORA": "ADALORA",
              "IA3": "IA3", "LN_TUNING": "LNTUNING"}
    for peft_type, name in tables.items():
        mapping = getattr(C, f"TRANSFORMERS_MODELS_TO_{name}_TARGET_MODULES_MAPPING")
        for model_type, d in budget.DEFAULT_TARGETS[peft_type].items():
            if mapping.get(model_type) is None:  # PEFT has none (AdaLoRA on Mistral): jpeft's is LoRA's
                continue
            assert list(d["target_modules"]) == list(mapping[model_type]), (peft_type, model_type)
            if peft_type == "IA3":
                assert d["feedforward_modules"] == C.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING[model_type]


def test_every_method_default_targets_every_family():
    """Without target_modules, `jpeft info` / `jpeft train` adapt the family's own modules, or refuse
    with a ConfigError naming --target: bottleneck's default was Llama's mlp/down_proj on GPT-2 and
    BERT (TargetNotFoundError), BERT's LN tuning (PEFT has no default) Llama's norms."""
    families = {"llama": "llama2", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gpt2": "gpt2", "bert": "bert"}
    assert sorted(families) == supported_model_types()
    refused = []
    for model_type, family in families.items():
        cfg = tiny._hf_config(family).to_dict()
        for name, cls in sorted(method_names().items()):
            if "target_modules" not in {f.name for f in dataclasses.fields(cls)}:
                continue
            try:
                method = method_config(name, {"total_step": 10} if name == "adalora" else {}, model_type=model_type)
            except ConfigError as e:
                assert "--target" in str(e) and repr(model_type) in str(e), str(e)
                refused.append((model_type, name))
                continue
            assert budget.budget(cfg, method)["sites"] > 0, (model_type, name)  # traced: targets that match nothing raise
    assert refused == [("bert", "ln_tuning")]
    pf = method_config("bottleneck", {}, model_type="gpt2")
    assert budget.budget(tiny._hf_config("gpt2").to_dict(), pf)["sites"] == 2  # mlp/c_proj of 2 layers, not attn/c_proj
