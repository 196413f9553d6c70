"""The parameter-budget script: Hugging Face PEFT's figures for Llama-2-7B, from shapes alone."""

import jax

from jpeft.methods import budget


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
