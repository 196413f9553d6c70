"""What a new user hits (issue #23): the install the docs show runs every command, BERT in
`jpeft train` / `eval`, trainable counts of full fine-tuning, the budget tool on GPT-2 / BERT,
what `jpeft export` writes as the base's name, and every command reading what training wrote
(adapter, PEFT export, run folder, checkpoint)."""

from __future__ import annotations

import ast
import json
import os
import pathlib
import subprocess
import sys

import pytest

from jpeft.cli import main

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "helpers"))
import tiny_hf  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", XLA_PYTHON_CLIENT_PREALLOCATE="false",
           PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def jpeft_cmd(*args, cwd=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "jpeft.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=ENV, cwd=cwd)


def one_error_line(r) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, f"expected exit 2 and one stderr line, got {r.returncode}:\n{r.stderr}"
    return lines[0]


# ----------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny Llama and BERT with a byte-level BPE tokenizer trained here, a tiny GPT-2 with no
    tokenizer files, a JSONL dataset and an interrupted LoRA run (a checkpoint, no adapter)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("newuser")
    fast = tiny_hf.tokenizer()
    tiny_hf.llama_folder(root / "llama", fast)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=16, n_layer=1, n_head=2, n_positions=64)).save_pretrained(root / "gpt2")
    BertForSequenceClassification(BertConfig(vocab_size=300, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=32, max_position_embeddings=64)).save_pretrained(root / "bert")
    fast.save_pretrained(root / "bert")
    tiny_hf.jsonl(root / "data.jsonl", 20, 16)
    cfg = """
model = "{model}"
output_dir = "{out}"
[data]
train = "data.jsonl"
seq_len = 16
[method]
name = "lora"
r = 2
lora_alpha = 4
[train]
steps = 4
batch_size = 2
learning_rate = 1e-2
warmup_steps = 1
eval_every = 0
save_every = 2
log_every = 1
"""
    (root / "run.toml").write_text(cfg.format(model="llama", out="run"))
    (root / "bert.toml").write_text(cfg.format(model="bert", out="bert-run"))
    # an interrupted run: a checkpoint at step 2 and no finished adapter
    assert main(["train", "--config", str(root / "run.toml"), "--max-steps", "2", "--no-progress"]) == 0
    assert (root / "run" / "checkpoints" / "2").is_dir() and not (root / "run" / "adapter").exists()
    return root


# ------------------------------------------------------------ 1. the documented install runs every command
_DIST = {"sklearn": "scikit-learn", "orbax": "orbax-checkpoint", "re2": "google-re2"}


def _required_imports() -> dict[str, str]:
    """Third-party modules that jpeft imports unconditionally (not inside ``try: ... except
    ImportError``), with one file that imports each; jpeft/fuzz.py is a test tool (the test extra)."""
    found: dict[str, str] = {}

    def visit(node, guarded, fname):
        if isinstance(node, ast.Try):
            names = {ast.unparse(h.type) for h in node.handlers if h.type is not None}
            g = guarded or bool(names & {"ImportError", "ModuleNotFoundError", "(ImportError, ModuleNotFoundError)", "Exception"})
            for n in node.body:
                visit(n, g, fname)
            for n in node.handlers + node.orelse + node.finalbody:
                visit(n, guarded, fname)
            return
        if not guarded:
            if isinstance(node, ast.Import):
                for a in node.names:
                    found.setdefault(a.name.split(".")[0], fname)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                found.setdefault(node.module.split(".")[0], fname)
        for n in ast.iter_child_nodes(node):
            visit(n, guarded, fname)

    for f in sorted((ROOT / "jpeft").rglob("*.py")):
        if f.name != "fuzz.py":
            visit(ast.parse(f.read_text()), False, str(f.relative_to(ROOT)))
    return {m: f for m, f in found.items() if m not in sys.stdlib_module_names and m != "jpeft"}


def test_the_documented_install_has_every_package_the_commands_import():
    import re
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = {re.split(r"[<>=!;\[ ]", d, maxsplit=1)[0].strip().lower() for d in project["dependencies"]}
    required = _required_imports()
    assert "transformers" in required  # the tokenizer of `jpeft train | eval`
    own = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["py-modules"])
    assert own == {"_jpeft_launcher", "_jpeft_args"}  # jpeft's modules outside the package, installed beside it
    missing = {m: f for m, f in required.items() if _DIST.get(m, m).lower() not in deps and m not in own}
    # tomli is declared for python < 3.11 only, where train_cmd imports it instead of tomllib
    missing.pop("tomli", None)
    assert not missing, f"imported but not in [project] dependencies (pip install -e . lacks them): {missing}"
    for doc in ("README.md", "docs/CLI.md"):
        assert "pip install -e ." in (ROOT / doc).read_text()


# ------------------------------------------------------------------ 2. BERT in `jpeft train` / `jpeft eval`
def test_bert_folder_is_refused_in_one_line_before_loading(work, capsys):
    line = one_error_line(jpeft_cmd("train", "--config", work / "bert.toml"))  # the console script's process
    assert line.startswith("jpeft train: error: UnsupportedModelError:") and "'bert'" in line
    assert "causal language models" in line and "Traceback" not in line
    assert not (work / "bert-run" / "checkpoints").exists()
    assert main(["eval", "--model", str(work / "bert"), "--data", str(work / "data.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("jpeft eval: error: UnsupportedModelError:") and "'bert'" in err


# ---------------------------------------------------------------- 4. full fine-tuning is 100 % trainable
def test_full_finetuning_counts_the_base_once(work, capsys):
    import jax
    import jax.numpy as jnp

    import jpeft

    model, params = jpeft.models.from_pretrained(str(work / "llama"))
    n = jpeft.tree.count(params)
    s = jpeft.summary(params, jpeft.init(jpeft.FullFinetuneConfig(), params, jax.random.key(0)), print_fn=None)
    assert (s["trainable"], s["base"], s["total"], s["share"]) == (n, n, n, 1.0)
    lora = jpeft.init(jpeft.LoraConfig(r=2, target_modules=["q_proj"]), params, jax.random.key(0))
    s = jpeft.summary(params, lora, print_fn=None)
    assert s["total"] == n + s["trainable"] and 0 < s["share"] < 1
    assert main(["info", str(work / "llama"), "--method", "full", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["trainable_params"] == res["total_params"] == res["base_params"] == n
    assert res["trainable_share"] == 1.0
    del jnp, model


# ---------------------------------------------------------------------- 5. the budget tool on GPT-2 and BERT
@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_budget_tool_on_gpt2_and_bert_configs(work, family, capsys):
    from jpeft import budget

    assert budget.main(["--hf-config", str(work / family / "config.json"), "--quiet"]) == 0
    table = capsys.readouterr().out
    rows = [ln for ln in table.splitlines() if ln.startswith("| ") and not ln.startswith("| method")]
    assert len(rows) == len(budget.methods(family)) and all(" | 0 | " not in r for r in rows)
    # a method whose defaults do not fit the tiny model says why instead of failing the table
    unfit = [r for r in rows if "| n/a |" in r]
    assert all("does not fit this model" in r for r in unfit) and len(unfit) < len(rows) // 2
    # the CLI computes the same numbers with the same function
    assert main(["info", str(work / family), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    lora = budget.budget_rows(budget.hf_config(str(work / family)), progress=False)[0]  # PEFT's default targets
    assert info["trainable_params"] == lora["trainable"] and info["base_params"] == lora["base"]


# ------------------------------------------------ 3. the CHECKPOINTS.md example (fit + keep_best) as written
def test_fit_with_keep_best_on_fit_loss_and_a_clear_error_otherwise(tmp_path):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    import jpeft
    from jpeft.errors import ConfigError

    model = nn.Dense(2)
    params = model.init(jax.random.key(0), jnp.ones((1, 3)))
    config = jpeft.LoraConfig(r=1, target_modules=".*")
    loss_fn = lambda p, a, b, k: jnp.mean((jpeft.apply(model, p, a, b) - 1.0) ** 2)  # noqa: E731
    opt = optax.sgd(0.1)
    step = jpeft.make_train_step(loss_fn, opt)
    adapter = jpeft.init(config, params, jax.random.key(1))
    batches = [jnp.full((4, 3), i / 10) for i in range(4)]
    with jpeft.checkpoint.CheckpointManager(tmp_path / "a", config, params, optimizer=opt, save_every=2, keep_best=1,
                                            best_metric="loss", async_save=False) as mngr:
        res = jpeft.fit(step, params, adapter, opt.init(adapter), batches, key=jax.random.key(2), checkpoint=mngr)
        assert res.step == 4 and mngr.all_steps() == [2, 4] and mngr.best_step() in (2, 4)
    with jpeft.checkpoint.CheckpointManager(tmp_path / "b", config, params, optimizer=opt, keep_best=1,
                                            best_metric="eval_loss", async_save=False) as mngr:
        adapter = jpeft.init(config, params, jax.random.key(1))  # the first was donated to the steps
        with pytest.raises(ConfigError, match="best_metric='loss'"):
            jpeft.fit(step, params, adapter, opt.init(adapter), batches, key=jax.random.key(2), checkpoint=mngr)


# ------------------------------------------- 7. export names the base so that it loads from any directory
def test_export_stores_an_absolute_base_path_that_peft_loads_from_elsewhere(work, tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM

    monkeypatch.chdir(work)
    assert main(["export", "--model", "llama", "--adapter", "run/checkpoints/2", "--out", "peft-out", "--force"]) == 0
    cfg = json.loads((work / "peft-out" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(work / "llama")
    monkeypatch.chdir(tmp_path)  # another directory: the relative "llama" would not resolve here
    model = AutoPeftModelForCausalLM.from_pretrained(str(work / "peft-out"))
    assert type(model.base_model.model).__name__ == "LlamaForCausalLM"
    r = jpeft_cmd("export", "--model", work / "llama", "--adapter", work / "run", "--out", tmp_path / "named",
                  "--base-name", "meta-llama/Llama-2-7b-hf")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "named" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "meta-llama/Llama-2-7b-hf"


# ------------------------------------------------ 8. every command reads what training and export wrote
def test_eval_export_merge_and_info_read_checkpoints_runs_and_peft_folders(work, tmp_path, capsys, monkeypatch):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from safetensors.numpy import load_file

    import jpeft
    from jpeft.checkpoint import CheckpointManager
    from jpeft.cli._ckpt import checkpoint_metadata, load_adapter
    from jpeft.config import AdapterConfig

    monkeypatch.chdir(work)
    model, params = jpeft.models.from_pretrained("llama")
    example = jnp.zeros((1, 8), jnp.int32)
    # the checkpoint's adapter, restored directly with the manager, is what every path yields
    meta = checkpoint_metadata("run/checkpoints/2")
    with CheckpointManager("run/checkpoints", AdapterConfig.from_dict(meta["config"]), params, model=model,
                           example_args=(example,), async_save=False, keep_last=None) as m:
        ref = m.restore(2).adapter
    ref_leaves = [np.asarray(x) for x in jax.tree.leaves(ref)]
    for path in ("run/checkpoints/2", "run/checkpoints", "run"):
        adapter, _ = load_adapter(path, params=params, model=model, example=example)
        assert len(jax.tree.leaves(adapter)) == len(ref_leaves) > 0
        for a, b in zip(jax.tree.leaves(adapter), ref_leaves):
            np.testing.assert_array_equal(np.asarray(a), b)
    # merge an interrupted run; its output equals jpeft.merge of the checkpoint's adapter
    assert main(["merge", "--model", "llama", "--adapter", "run/checkpoints/2", "--out", str(tmp_path / "m")]) == 0
    merged = load_file(str(tmp_path / "m" / "model.safetensors"))
    want = jpeft.merge(params, ref)["params"]["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    np.testing.assert_allclose(merged["model.layers.0.self_attn.q_proj.weight"], np.asarray(want).T, rtol=1e-6, atol=1e-7)
    # the PEFT export reads back (eval on it equals eval on the checkpoint)
    assert main(["export", "--model", "llama", "--adapter", "run", "--out", str(tmp_path / "peft"), "--force"]) == 0
    capsys.readouterr()
    losses = []
    for adapter_path in ("run/checkpoints/2", str(tmp_path / "peft")):
        assert main(["eval", "--model", "llama", "--adapter", adapter_path, "--data", "data.jsonl", "--seq-len", "16",
                     "--json"]) == 0
        losses.append(json.loads(capsys.readouterr().out)["loss"])
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    # info on each kind of folder
    n_lora = sum(int(np.prod(x.shape)) for x in ref_leaves)
    for path, kind in (("run", "checkpoint"), ("run/checkpoints/2", "checkpoint"), (str(tmp_path / "peft"), "peft")):
        assert main(["info", path, "--json"]) == 0
        res = json.loads(capsys.readouterr().out)
        assert res["kind"] == kind and res["trainable_params"] == n_lora
        if kind == "checkpoint":
            assert res["step"] == 2 and res["optimizer_state"] and res["method"]["peft_type"] == "LORA"
    assert main(["info", "run"]) == 0
    out = capsys.readouterr().out
    assert "training checkpoint" in out and f"trainable params: {n_lora:,}" in out and "step 2" in out


def test_adapter_path_errors_are_one_line(work, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    line = one_error_line(jpeft_cmd("export", "--model", work / "llama", "--adapter", tmp_path / "empty",
                                    "--out", tmp_path / "o"))
    assert "holds no adapter" in line and "checkpoints/<step>" in line
    assert main(["info", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("jpeft info: error: LoadError:") and "holds no adapter" in err


# ------------------------------------------------------------------------------------- 9. smaller
def test_merge_needs_no_tokenizer_and_its_help_names_a_real_loader(work, tmp_path, capsys):
    import jax

    import jpeft

    # a GPT-2 folder without tokenizer files, and a LoRA adapter for it with every tensor random

    model, params = jpeft.models.from_pretrained(str(work / "gpt2"))
    config = jpeft.LoraConfig(r=2, target_modules=["c_attn"])
    adapter = jpeft.init(config, params, jax.random.key(0))
    adapter = jax.tree.map(lambda x: x + 0.01, adapter)  # B is random too, not zero
    jpeft.save_adapter(str(tmp_path / "a"), config, adapter)
    assert main(["merge", "--model", str(work / "gpt2"), "--adapter", str(tmp_path / "a"), "--out", str(tmp_path / "m")]) == 0
    _, merged = jpeft.models.from_pretrained(str(tmp_path / "m"))
    want = jpeft.merge(params, adapter)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(want)):
        assert abs(float((a - b).max())) < 1e-6
    capsys.readouterr()
    assert main(["info", str(tmp_path / "a"), "--json"]) == 0  # a jpeft adapter folder
    res = json.loads(capsys.readouterr().out)
    assert res["kind"] == "jpeft" and res["method"]["peft_type"] == "LORA"
    assert res["trainable_params"] == sum(int(x.size) for x in jax.tree.leaves(adapter))
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    text = capsys.readouterr().out
    assert "jpeft.models.from_pretrained" in text and "jpeft.hf.from_pretrained" not in text
    assert callable(jpeft.models.from_pretrained)


def test_info_counts_the_base_in_its_stored_dtype(work, capsys):
    assert main(["info", str(work / "llama"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["base_dtype"] == "float32" and res["base_bytes"] == 4 * res["base_params"]
    assert main(["info", "llama-2-7b", "--json"]) == 0  # published configs name no dtype: bfloat16
    res = json.loads(capsys.readouterr().out)
    assert res["base_dtype"] == "bfloat16" and res["base_bytes"] == 2 * res["base_params"]
    assert main(["info", str(work / "llama"), "--json", "--base-dtype", "float16"]) == 0
    assert json.loads(capsys.readouterr().out)["base_dtype"] == "float16"


def test_forgetting_no_progress_reaches_the_language_pretraining():
    import argparse

    from jpeft.forgetting import cli

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    cli.add_parser(sub, "forgetting")
    for flag, want in ((["--no-progress"], False), ([], True)):
        args = parser.parse_args(["forgetting", "language", "--pretrain-steps", "1", *flag])
        bench = cli.benchmark_from_args(args)
        assert bench._progress is want


def test_make_mesh_on_too_few_devices_says_how_to_emulate_them():
    import jax

    import jpeft
    from jpeft.errors import ShardingError

    n = len(jax.devices())
    with pytest.raises(ShardingError, match=f"xla_force_host_platform_device_count={2 * 4 * n}"):
        jpeft.make_mesh(data=2 * n, fsdp=4)


@pytest.mark.parametrize("method", ["lora", "prefix_tuning"])
def test_a_scan_layers_checkpoint_exports_as_its_finished_adapter(work, tmp_path, monkeypatch, method):
    """A checkpoint of a ``scan_layers = true`` run is read onto the stacked base and exports the
    PEFT files of the run's finished adapter, array for array. Prefix tuning's adapter has no
    per-layer site, so only the checkpoint's base fingerprint says it is a scanned run's: every
    command refused its checkpoints with a BaseMismatchError ("saved for a different base model")."""
    import numpy as np
    from safetensors.numpy import load_file

    monkeypatch.chdir(work)
    run = f"scan-{method}"
    cfg = (work / "run.toml").read_text().replace('output_dir = "run"', f'output_dir = "{run}"')
    if method != "lora":
        cfg = cfg.replace('name = "lora"\nr = 2\nlora_alpha = 4', f'name = "{method}"\nnum_virtual_tokens = 3')
    (work / f"{run}.toml").write_text(cfg.replace("[train]", "[train]\nscan_layers = true"))
    assert main(["train", "--config", f"{run}.toml", "--set", "train.steps=2", "--no-progress"]) == 0
    assert (work / run / "checkpoints" / "2").is_dir()
    for adapter, out in ((f"{run}/adapter", "a"), (f"{run}/checkpoints/2", "c")):
        assert main(["export", "--model", "llama", "--adapter", adapter, "--out", str(tmp_path / out)]) == 0
    a = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    c = load_file(str(tmp_path / "c" / "adapter_model.safetensors"))
    assert sorted(a) == sorted(c) and len(a) > 0
    for k in a:
        np.testing.assert_array_equal(a[k], c[k])


def test_reading_a_checkpoint_leaves_a_running_saves_temporary_folder(work, tmp_path):
    """`jpeft export --adapter runs/x/checkpoints/N` while the run is still saving must not
    delete the save in progress (a writable CheckpointManager cleans such folders up)."""
    import shutil

    import jax.numpy as jnp

    import jpeft
    from jpeft.cli._ckpt import load_adapter
    from jpeft.errors import ConfigError

    run = tmp_path / "run"
    shutil.copytree(work / "run", run)
    pending = run / "checkpoints" / "4.orbax-checkpoint-tmp-123"
    pending.mkdir()
    model, params = jpeft.models.from_pretrained(str(work / "llama"))
    adapter, config = load_adapter(str(run / "checkpoints" / "2"), params=params, model=model,
                                   example=jnp.zeros((1, 8), jnp.int32))
    assert pending.is_dir() and sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith(".")) == ["2", pending.name]
    with jpeft.checkpoint.CheckpointManager(run / "checkpoints", config, params, model=model,
                                            example_args=(jnp.zeros((1, 8), jnp.int32),), read_only=True) as m:
        assert m.all_steps() == [2]
        with pytest.raises(ConfigError, match="read_only"):
            m.save(3, adapter, force=True)
    assert pending.is_dir()


def test_train_help_shows_every_config_key():
    """`jpeft train --help` prints a config file with every key the file takes: `[data] chat_loss`,
    the JSON field names (`text_field`, `prompt_field`, `completion_field`, `messages_field`) and
    `[forgetting] max_kl` were accepted but shown nowhere in the help."""
    import re

    from jpeft.cli import build_parser
    from jpeft.cli.train_cmd import _KNOWN

    sub = next(a for a in build_parser()._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    text = sub.choices["train"].format_help()
    missing = [f"{s + '.' if s else ''}{k}" for s, keys in _KNOWN.items() for k in sorted(keys)
               if f"[{k}]" not in text and not re.search(rf"^[#\s]*{k}\s*=", text, re.M)]
    assert not missing, f"config keys `jpeft train` accepts but its --help never shows: {missing}"


def test_packing_with_the_text_encoder_tuple_or_a_tokenizer_is_a_named_error(tmp_path):
    """`jpeft.data.text_encoder(tok)` returns (encode, bos_id, eos_id): handing the tuple, or the
    tokenizer itself, to PackedDataset as `encode` failed deep inside packing with a TypeError
    ("'tuple' object is not callable") or a ValueError; it is an InputValidationError saying
    how to call it. The encode it returns packs as before."""
    import jpeft
    from jpeft.errors import InputValidationError

    tok = tiny_hf.tokenizer()
    data = tiny_hf.jsonl(tmp_path / "d.jsonl", 0, 4)
    for wrong in (jpeft.data.text_encoder(tok), tok):
        with pytest.raises(InputValidationError, match=r"text_encoder\(tokenizer\)"):
            jpeft.data.PackedDataset.from_file(data, wrong, 32)
        with pytest.raises(InputValidationError, match="encode must be a function"):
            jpeft.data.PackedDataset.from_examples([{"text": "a b c"}], wrong, 32)
    encode, bos, eos = jpeft.data.text_encoder(tok)
    ds = jpeft.data.PackedDataset.from_file(data, encode, 32, eos_id=eos, bos_id=bos)
    assert ds.num_targets > 0 and ds.input_ids[0, 0] == encode(json.loads(open(data).readline())["text"])[0]


def test_loading_a_conv_adapter_without_the_model_names_the_call_that_loads_it(tmp_path):
    """An adapter of an `nn.Conv` needs the model and an example input to rebuild its layout; loading
    it (or restoring its checkpoint) without them said to call `jpeft.init(config, params, key, model, x)`,
    which a user loading a file does not call. The error names `load_adapter(path, params, model, x)`
    (the manager's `model=`, `example_args=`), and that call loads the adapter to the same outputs."""
    import flax.linen as nn
    import jax
    import numpy as np
    import optax

    import jpeft
    from jpeft.errors import LayoutError

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, name="head")(nn.Conv(4, (3, 3), name="conv")(x).reshape(x.shape[0], -1))

    model, x = Net(), jax.random.normal(jax.random.key(0), (2, 5, 5, 1))
    params = model.init(jax.random.key(1), x)
    config = jpeft.LoraConfig(r=2, alpha=4, target_modules=["conv", "head"])
    adapter = jpeft.init(config, params, jax.random.key(2), model, x)
    adapter = jax.tree.map(lambda a: a + 0.3 if isinstance(a, jax.Array) and a.ndim else a, adapter)  # B random too
    jpeft.save_adapter(tmp_path / "a", config, adapter, params=params)
    with pytest.raises(LayoutError, match=r"jpeft\.load_adapter\(path, params, model, x\)"):
        jpeft.load_adapter(tmp_path / "a", params)
    _, loaded = jpeft.load_adapter(tmp_path / "a", params, model, x)
    np.testing.assert_array_equal(jpeft.apply(model, params, loaded, x), jpeft.apply(model, params, adapter, x))
    opt = optax.sgd(0.1)
    with jpeft.checkpoint.CheckpointManager(tmp_path / "ck", config, params, optimizer=opt) as m:
        m.save(1, adapter, opt.init(adapter), jax.random.key(3), force=True)
    with jpeft.checkpoint.CheckpointManager(tmp_path / "ck", config, params, optimizer=opt) as m:
        with pytest.raises(LayoutError, match=r"model=model, example_args=\(x,\)"):
            m.restore()
    with jpeft.checkpoint.CheckpointManager(tmp_path / "ck", config, params, optimizer=opt, model=model,
                                            example_args=(x,)) as m:
        restored = m.restore().adapter
    np.testing.assert_array_equal(jpeft.apply(model, params, restored, x), jpeft.apply(model, params, adapter, x))
