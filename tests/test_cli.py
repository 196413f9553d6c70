"""End-to-end tests of the ``jpeft`` command: every subcommand on tiny settings, one-line
errors with exit status 2, exact resume after an interruption, and numbers checked against
transformers / peft on the same tiny model.

A command runs in a subprocess where the process is what is tested (the console script, exit
statuses, Ctrl-C, a resume in a fresh process, emulated devices and two processes, the demo as a
user starts it), and in this process through ``main`` otherwise: each ``jpeft`` process spends
4-5 s importing and, loading a tokenizer, ~5 s more importing transformers and torch, which
this test process has already done."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import jpeft
import jpeft.models
from jpeft.cli import main

COMMANDS = ["demo", "train", "eval", "merge", "export", "info", "forgetting", "serve"]
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", XLA_PYTHON_CLIENT_PREALLOCATE="false")


def jpeft_cmd(*args, timeout=300, cwd=None, env=ENV):
    """Runs ``python -m jpeft.cli ARGS`` (the console script's code) in a subprocess."""
    return subprocess.run([sys.executable, "-m", "jpeft.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)


def jpeft_here(capsys, *args):
    """Runs ``jpeft ARGS`` in this process through ``main``; the same fields as a subprocess's
    result (``returncode``, ``stdout``, ``stderr``)."""
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["jpeft", *map(str, args)], rc, out, err)


_RUNS = """
import contextlib, io, json, sys
from jpeft.cli import process_main as main
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    results.append([rc, out.getvalue(), err.getvalue()])
print(json.dumps(results))
"""


def jpeft_runs(env, *argvs, timeout=300):
    """Runs ``jpeft ARGV`` for each ARGV one after another through ``main`` in one subprocess
    with the environment ``env`` (emulated devices are fixed when a process starts JAX; a
    process per run would spend its 4-5 s of imports again): one ``CompletedProcess`` per run,
    with that run's exit status and its own stdout and stderr."""
    r = subprocess.run([sys.executable, "-c", _RUNS, json.dumps([[str(a) for a in argv] for argv in argvs])],
                       capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return [subprocess.CompletedProcess(["jpeft", *argv], rc, out, err)
            for argv, (rc, out, err) in zip(argvs, json.loads(r.stdout.splitlines()[-1]))]


_WARNING = re.compile(r"^\S+:\d+: \w*Warning: ")  # a Python warning's first line ("file:line: UserWarning: ...")
_CLI_WARNING = re.compile(r"^jpeft( \w+)?: warning: ")  # the command's own line of a warning


def error_line(stderr: str) -> str:
    """The one line of an error in ``stderr``, besides warnings (the command's ``jpeft <cmd>:
    warning: ...`` lines; a Python warning's line and the source line under it: the data's
    warnings of a run that then fails)."""
    lines, after_warning = [], False
    for ln in stderr.splitlines():
        if _CLI_WARNING.match(ln):
            after_warning = False
        elif _WARNING.match(ln):
            after_warning = True
        elif after_warning and ln.startswith("  "):
            after_warning = False
        elif ln.strip():
            lines.append(ln)
            after_warning = False
    assert len(lines) == 1, f"expected a one-line error, got:\n{stderr}"
    return lines[0]


# ------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random Llama saved by transformers, with a small byte-level BPE tokenizer
    trained here (nothing downloaded), plus JSONL / text datasets and a train config."""
    import torch
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("cli")
    model_dir = root / "tiny-llama"
    keys = sorted(topics)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([topics[k] for k in keys[:30]], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    fast.save_pretrained(model_dir)
    with open(root / "train.jsonl", "w") as f:
        for k in keys[:40]:
            f.write(json.dumps({"prompt": f"Topic {k}:\n", "completion": topics[k][:300]}) + "\n")
    with open(root / "eval.jsonl", "w") as f:
        for k in keys[40:48]:
            f.write(json.dumps({"text": topics[k][:300]}) + "\n")
    (root / "notes.txt").write_text(" ".join(topics[k][:200] for k in keys[50:60]))
    return root


def write_config(root, name, *, steps=8, save_every=3, eval_every=4):
    path = root / f"{name}.toml"
    path.write_text(f"""
model = "tiny-llama"
output_dir = "{name}"
seed = 3

[data]
train = "train.jsonl"
eval = "eval.jsonl"
seq_len = 32

[method]
name = "lora"
r = 4
lora_alpha = 8
lora_dropout = 0.1
target_modules = ["q_proj", "v_proj", "down_proj"]

[train]
steps = {steps}
batch_size = 4
learning_rate = 5e-3
warmup_steps = 2
eval_every = {eval_every}
save_every = {save_every}
log_every = 1
""")
    return path


def adapter_arrays(folder):
    from safetensors.numpy import load_file

    return load_file(os.path.join(folder, "jpeft_adapter.safetensors"))


# ------------------------------------------------------------------------------ help & errors
@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_subcommand_has_help_with_an_example(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"jpeft {cmd}" in out and "example" in out.lower()


def test_console_script_is_declared_and_runs():
    from importlib.metadata import entry_points

    eps = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert eps.get("jpeft") == "_jpeft_launcher:main"
    r = jpeft_cmd("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"jpeft {jpeft.__version__}"


def test_bad_arguments_exit_2_with_one_line_in_a_subprocess(tmp_path):
    r = jpeft_cmd("info", "llama-2-7b", "--bogus")
    assert r.returncode == 2
    assert error_line(r.stderr) == "jpeft info: error: unrecognized arguments: --bogus (see `jpeft info --help`)"
    r = jpeft_cmd("train", "--config", tmp_path / "missing.toml")
    assert r.returncode == 2
    line = error_line(r.stderr)
    assert line.startswith("jpeft train: error: LoadError: config file") and "does not exist" in line
    assert "Traceback" not in r.stderr


def test_warnings_of_a_command_are_one_line_each_as_its_errors(hf_dir, capsys, monkeypatch):
    """A warning while a command ran was printed in Python's format, ``/path/jpeft/data.py:463:
    UserWarning: ...`` and the source line under it; it is one line ``jpeft eval: warning: ...``
    (another package's warning names its category and package), and a warning of jpeft's Python
    API outside the command is Python's as before."""
    import warnings

    import jpeft.cli.eval_cmd as eval_cmd

    real = eval_cmd.run

    def run(args):  # a warning of a library the command calls, at a path under site-packages
        warnings.warn_explicit("an old\nAPI", FutureWarning, "/v/lib/python3.11/site-packages/transformers/x.py", 7)
        return real(args)

    def show(message, category, filename, lineno, file=None, line=None):  # as Python shows one (pytest records them)
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    monkeypatch.setattr(eval_cmd, "run", run)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        r = jpeft_here(capsys, "eval", "--model", hf_dir / "tiny-llama", "--data", hf_dir / "train.jsonl",
                       "--seq-len", "16", "--max-batches", "1")
        warnings.warn("called from Python")  # after main: as Python shows it
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert lines[0] == "jpeft eval: warning: FutureWarning from transformers: an old API", r.stderr
    data = f"jpeft eval: warning: {hf_dir / 'train.jsonl'}: in "
    assert lines[1].startswith(data) and "the first target token comes after the first 16 tokens" in lines[1]
    assert lines[2].startswith(data) and "the completion runs past the first 16 tokens" in lines[2]
    assert len(lines) == 3 and "data.py" not in r.stderr and "UserWarning" not in r.stderr, r.stderr
    assert re.match(r"^\S+test_cli.py:\d+: UserWarning: called from Python$", capsys.readouterr().err.splitlines()[0])
    assert error_line("\n".join(lines + ["jpeft eval: error: X"])) == "jpeft eval: error: X"


@pytest.mark.parametrize(
    "argv, expect",
    [
        (["nope"], "jpeft: error: argument <command>: invalid choice: 'nope'"),
        (["info"], "jpeft info: error: ConfigError: give a model folder or a published config name"),
        (["info", "no-such-model"], "jpeft info: error: LoadError: 'no-such-model' is neither a model folder"),
        (["info", "llama-2-7b", "--method", "nope"], "jpeft info: error: ConfigError: unknown method 'nope'; available:"),
        (["info", "llama-2-7b", "-r", "0"], "jpeft info: error: ConfigError: LoraConfig.r must be a positive integer, found 0"),
        (["info", "llama-2-7b", "-r", "x"], "jpeft info: error: argument -r/--rank: invalid int value: 'x'"),
        (["info", "llama-2-7b", "--target", "nothing_here"], "jpeft info: error: TargetNotFoundError:"),
        (["demo", "--steps", "0"], "jpeft demo: error: ConfigError: --steps must be >= 1, found 0."),
        (["demo", "--seq-len", "4"], "jpeft demo: error: ConfigError: --seq-len must be >= 8, found 4."),
        (["demo", "--replay", "1.5"], "jpeft demo: error: ConfigError: --replay must be in [0, 1), found 1.5."),
        # rounded to whole rows: none (a "replay" run without code) or all (no prose left) is refused
        (["demo", "--batch-size", "2"], "jpeft demo: error: ConfigError: --replay with --batch-size 2: replay ratio "
                                        "0.25 of a batch of 2 rounds to 0 replayed rows"),
        (["demo", "--replay", "0.99"], "jpeft demo: error: ConfigError: --replay with --batch-size 16: replay ratio "
                                       "0.99 of a batch of 16 rounds to all 16 rows"),
        (["eval", "--data", "x.jsonl"], "jpeft eval: error: the following arguments are required: --model"),
        (["eval", "--model", "/no/such/dir", "--data", "x.jsonl"], "jpeft eval: error: --model '/no/such/dir' does not "
                                                                    "exist; give a local Hugging Face model folder"),
        (["eval", "--model", ".", "--data", "x.jsonl"], "jpeft eval: error: --data 'x.jsonl' does not exist; give a "
                                                        ".jsonl or plain-text file."),
        (["eval", "--model", ".", "--canary", "c.txt", "--adapter", "a"], "jpeft eval: error: --adapter 'a' does not "
                                                                          "exist; give a jpeft adapter folder"),
        (["merge", "--model", "m", "--adapter", "a"], "jpeft merge: error: the following arguments are required: --out"),
        (["export", "--model", "/no/such/dir", "--adapter", "a", "--out", "o"], "jpeft export: error: --model "
                                                                                "'/no/such/dir' does not exist"),
        (["merge", "--model", ".", "--adapter", "a", "--out", "o"], "jpeft merge: error: --adapter 'a' does not exist"),
        (["serve", "--model", "meta-llama/Llama-2-7b-hf"], "jpeft serve: error: --model 'meta-llama/Llama-2-7b-hf' does "
                                                           "not exist; give a local Hugging Face model folder (config.json "
                                                           "and *.safetensors); jpeft downloads nothing: fetch a hub model "
                                                           "first (hf download NAME --local-dir DIR) and give DIR."),
        (["forgetting", "nope"], "jpeft forgetting: error: argument benchmark: invalid choice: 'nope'"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, expect, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert error_line(err).startswith(expect), err


def test_train_config_errors(hf_dir, capsys):
    bad = hf_dir / "bad.toml"
    bad.write_text('model = "tiny-llama"\n[data]\ntrain = "train.jsonl"\n[train]\nstepz = 3\n')
    assert main(["train", "--config", str(bad)]) == 2
    assert "unknown key(s) ['stepz'] in [train] of the config" in error_line(capsys.readouterr().err)
    bad.write_text('model = "tiny-llama"\n[data]\ntrain = "train.jsonl"\n[method]\nname = "lora"\nr = -1\n')
    assert main(["train", "--config", str(bad)]) == 2
    assert "LoraConfig.r must be a positive integer, found -1" in error_line(capsys.readouterr().err)
    bad.write_text('model = "tiny-llama"\n[data\n')
    assert main(["train", "--config", str(bad)]) == 2
    assert "not valid TOML" in error_line(capsys.readouterr().err)
    (hf_dir / "short.txt").write_text("too short")
    # packed as one stream, a file shorter than a row has no row (by documents it is one padded row)
    bad.write_text('model = "tiny-llama"\n[data]\ntrain = "short.txt"\nseq_len = 128\npacking = "stream"\n')
    assert main(["train", "--config", str(bad)]) == 2
    assert "fewer than one row of seq_len=128" in error_line(capsys.readouterr().err)
    bad.write_text('model = "tiny-llama"\n[data]\ntrain = "train.jsonl"\n[train]\nloss_chunk_tokens = -1\n')
    assert main(["train", "--config", str(bad)]) == 2
    assert ('train.loss_chunk_tokens must be "auto" or an integer >= 0 (0: the whole logits at once), found int '
            "'-1'") in error_line(capsys.readouterr().err)



def test_a_misspelt_method_or_config_key_names_the_nearest_and_a_lora_variant_its_option(hf_dir, capsys):
    """A first-hour slip: `name = "loar"`, `batchsize = 3` and `--method dora` (the README lists DoRA
    among the methods) were refused with the list of names alone; the nearest name is suggested,
    and a LoRA variant that is an option of lora says which option, which then works."""
    bad = hf_dir / "near.toml"
    for body, expect in (('[train]\nbatchsize = 3\n', "Did you mean 'batch_size' (not 'batchsize')?"),
                         ('[data]\nseqlen = 32\n', "Did you mean 'seq_len' (not 'seqlen')?"),
                         ('[method]\nname = "loar"\n', "Did you mean 'lora' (not 'loar')?")):
        bad.write_text('model = "tiny-llama"\n[data]\ntrain = "train.jsonl"\n' + body.replace("[data]\n", ""))
        assert main(["train", "--config", str(bad)]) == 2
        assert error_line(capsys.readouterr().err).endswith(expect)
    assert main(["info", "llama-2-7b", "--method", "DoRA"]) == 2
    assert error_line(capsys.readouterr().err) == (
        "jpeft info: error: ConfigError: unknown method 'DoRA': DoRA is LoRA with use_dora = true (`jpeft train`: "
        '[method] name = "lora" and use_dora = true; `jpeft info`: --method lora --set use_dora=true).')
    assert main(["info", "llama-2-7b", "--method", "lora", "--set", "use_dora=true"]) == 0
    assert '"use_dora": true' in capsys.readouterr().out


def test_seeds_a_multiple_of_2_to_the_32_apart_draw_other_adapters_and_dropout():
    """``jax.random.key`` keeps a seed's low 32 bits: ``seed = 3`` and ``seed = 2**32 + 3`` (both
    accepted, the range is [0, 2**63)) drew the same initial adapter and dropout keys while the data
    order (numpy) differed. A seed below 2**32 keeps its keys."""
    import jax

    from jpeft.cli._trainer import run_keys

    data = lambda ks: [jax.random.key_data(k).tolist() for k in ks]  # noqa: E731
    assert data(run_keys(3)) == data(jax.random.split(jax.random.key(3)))
    seen = {str(data(run_keys(s))) for s in (3, 3 + 2 ** 32, 3 + 2 ** 33, 2 ** 63 - 1, 2 ** 32 - 1)}
    assert len(seen) == 5


def test_a_top_level_quantize_next_to_a_model_table_is_refused_not_dropped():
    """``quantize = "nf4"`` at the top level works with ``model = "path"``; next to a ``[model]``
    table it was silently replaced by the table's (none: a full-precision base)."""
    from jpeft.cli.train_cmd import resolve_config

    assert resolve_config({"model": "m", "quantize": "nf4", "data": {"train": "t"}})["quantize"] == "nf4"
    assert resolve_config({"model": {"path": "m", "quantize": "int8"}, "data": {"train": "t"}})["quantize"] == "int8"
    for table in ({"path": "m"}, {"path": "m", "quantize": "int8"}):
        with pytest.raises(jpeft.errors.ConfigError, match="quantize = 'nf4' at the top level and a \\[model\\] table"):
            resolve_config({"model": table, "quantize": "nf4", "data": {"train": "t"}})


def test_train_refuses_prompt_tuning_on_rows_packed_by_documents_before_loading(hf_dir, capsys):
    """Prompt tuning prepends its virtual tokens once per row, so it needs ``packing = "stream"``;
    with the default ``"documents"`` it used to load the model, write ``resolved_config.json``,
    ``metrics.jsonl`` and ``checkpoints/`` and only then fail in the first step's trace."""
    bad = hf_dir / "prompt_docs.toml"
    bad.write_text('model = "tiny-llama"\noutput_dir = "prompt_docs"\n[data]\ntrain = "train.jsonl"\nseq_len = 32\n'
                   '[method]\nname = "prompt_tuning"\nnum_virtual_tokens = 4\n[train]\nsteps = 1\n')
    assert main(["train", "--config", str(bad), "--no-progress"]) == 2
    line = error_line(capsys.readouterr().err)
    assert "ConfigError" in line and 'data.packing = "documents"' in line and 'set data.packing = "stream"' in line
    assert not (hf_dir / "prompt_docs").exists()


def _tiny_gpt2(hf_dir, tmp_path):
    """A tiny random GPT-2 (64 learned positions) with the tiny Llama's tokenizer: its folder."""
    import shutil as _shutil

    import torch
    import transformers

    folder = tmp_path / "tiny-gpt2"
    vocab = json.loads((hf_dir / "tiny-llama" / "config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=vocab, n_embd=16, n_layer=1, n_head=2,
                                                         n_positions=64)).save_pretrained(folder)
    for f in (hf_dir / "tiny-llama").iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            _shutil.copy(f, folder / f.name)
    return folder


def test_rows_past_a_learned_position_table_are_refused_by_name_before_anything_is_written(hf_dir, tmp_path, capsys):
    """GPT-2 (and BERT) read each position from a learned table: rows longer than it, or than it
    less prefix or prompt tuning's virtual tokens, are refused before the model is loaded or
    anything written (`jpeft train` wrote resolved_config.json, metrics.jsonl and checkpoints/
    and then failed in the first step), naming the table and the longest row that fits."""
    import transformers

    from jpeft.cli._trainer import check_seq_len

    gpt2 = _tiny_gpt2(hf_dir, tmp_path)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'model = "{gpt2}"\noutput_dir = "long"\n[data]\ntrain = "{hf_dir / "train.jsonl"}"\nseq_len = 100\n'
                   '[train]\nsteps = 1\n')
    r = jpeft_here(capsys, "train", "--config", cfg, "--no-progress")
    line = error_line(r.stderr)
    assert r.returncode == 2 and "data.seq_len=100 exceeds the model's max_position_embeddings=64" in line, r.stderr
    assert "'gpt2' model reads each position from a learned table of 64 rows" in line and "use at most 64" in line
    r = jpeft_here(capsys, "train", "--config", cfg, "--no-progress", "--set", "data.seq_len=62", "--set",
                   "data.packing=stream", "--set", "method.name=prompt_tuning", "--set", "method.num_virtual_tokens=4")
    line = error_line(r.stderr)
    assert r.returncode == 2 and "data.seq_len=62 plus the method's 4 virtual tokens exceeds" in line, r.stderr
    assert "use at most 60" in line and not (tmp_path / "long").exists()
    r = jpeft_here(capsys, "eval", "--model", gpt2, "--data", hf_dir / "notes.txt", "--seq-len", 65)
    assert r.returncode == 2 and "--seq-len=65 exceeds the model's max_position_embeddings=64" in error_line(r.stderr)
    r = jpeft_here(capsys, "eval", "--model", gpt2, "--data", hf_dir / "notes.txt", "--seq-len", 64, "--json")
    assert r.returncode == 0 and np.isfinite(json.loads(r.stdout)["loss"]), r.stderr
    bert = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32, max_position_embeddings=32).to_dict()
    with pytest.raises(jpeft.errors.ConfigError, match="'bert' model reads each position from a learned table of 32"):
        check_seq_len(33, bert, "data.seq_len")
    check_seq_len(32, bert, "data.seq_len")


def test_rows_past_max_position_embeddings_on_a_rotary_model_score_as_transformers_and_peft_do(hf_dir, tmp_path, capsys):
    """A rotary model (Llama, Mistral, Qwen) has no position table: jpeft's models, transformers and
    PEFT run it past max_position_embeddings (extrapolating); `jpeft train` and `jpeft eval` refused
    such rows, and seq_len plus prefix or prompt tuning's virtual tokens past it, which the library
    runs. Now they run, with one warning line: `jpeft eval` of 160-token rows on the tiny Llama (128
    positions) equals transformers' loss on the same rows, a prompt-tuning adapter's 4 virtual tokens
    plus 128-token rows equal jpeft.lm_loss's (whose logits equal PEFT's past the limit,
    test_methods_hf.py), and `jpeft train` trains on such rows."""
    import warnings

    import jax.numpy as jnp
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jpeft import io, models
    from jpeft.data import PackedDataset

    model_dir, notes = hf_dir / "tiny-llama", hf_dir / "notes.txt"
    tok = AutoTokenizer.from_pretrained(model_dir)
    encode = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    ds = PackedDataset.from_file(notes, encode, 160, eos_id=tok.eos_token_id, bos_id=None)
    assert ds.input_ids.shape[1] == 160 and ds.num_targets > 128
    ref, _ = _torch_loss(AutoModelForCausalLM.from_pretrained(model_dir).eval(), ds.input_ids, ds.loss_mask)
    with pytest.warns(UserWarning, match="--seq-len=160 is longer than the model's max_position_embeddings=128: its "
                      "rotary positions past 128 are computed as transformers computes them"):
        r = jpeft_here(capsys, "eval", "--model", model_dir, "--data", notes, "--seq-len", 160, "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["tokens"] == ds.num_targets
    np.testing.assert_allclose(got["loss"], ref, rtol=1e-5)

    model, params = models.from_pretrained(str(model_dir))
    cfg = jpeft.PromptTuningConfig(num_virtual_tokens=4)
    adapter = jpeft.init(cfg, params, jax.random.key(0), model, jnp.zeros((1, 8), jnp.int32))
    io.save_adapter(tmp_path / "pt", cfg, adapter, params=params)
    rows = PackedDataset.from_file(notes, encode, 128, eos_id=tok.eos_token_id, bos_id=None, packing="stream")
    # the last virtual token's logits predict each row's first token, as in PEFT (jpeft.lm_loss)
    ref, n = jpeft.lm_loss(model, params, adapter, jnp.asarray(rows.input_ids), jnp.asarray(rows.loss_mask))
    with pytest.warns(UserWarning, match="--seq-len=128 plus the method's 4 virtual tokens is longer than"):
        r = jpeft_here(capsys, "eval", "--model", model_dir, "--adapter", tmp_path / "pt", "--data", notes,
                       "--packing", "stream", "--seq-len", 128, "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["tokens"] == int(n) == rows.input_ids.size
    np.testing.assert_allclose(got["loss"], float(ref), rtol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default --seq-len stays inside the positions: 128 - 4
        r = jpeft_here(capsys, "eval", "--model", model_dir, "--adapter", tmp_path / "pt", "--data", notes,
                       "--packing", "stream", "--json")
    assert r.returncode == 0, r.stderr

    cfg = tmp_path / "c.toml"
    cfg.write_text(f'model = "{model_dir}"\noutput_dir = "long"\n[data]\ntrain = "{notes}"\nseq_len = 160\n'
                   'packing = "stream"\n[method]\nname = "prompt_tuning"\nnum_virtual_tokens = 4\n'
                   '[train]\nsteps = 1\nbatch_size = 1\n')
    with pytest.warns(UserWarning, match="data.seq_len=160 plus the method's 4 virtual tokens is longer than"):
        r = jpeft_here(capsys, "train", "--config", cfg, "--no-progress")
    assert r.returncode == 0, r.stderr
    logged = [json.loads(ln) for ln in (tmp_path / "long" / "metrics.jsonl").read_text().splitlines()]
    assert (tmp_path / "long" / "adapter").is_dir() and np.isfinite([m["loss"] for m in logged if "loss" in m]).all()


def test_set_takes_toml_values_as_its_help_says(tmp_path):
    """`--set` values are "parsed as TOML/JSON": a TOML array of literal strings, an integer with
    underscores and an inline table were kept as text (a target_modules regex that matched
    nothing, "train.steps must be a positive integer, found '1_000'")."""
    from jpeft.cli.train_cmd import resolve_config

    raw = {"model": "m", "data": {"train": "t.jsonl"}}
    cfg = resolve_config(raw, ["method.target_modules=['q_proj', 'v_proj']", "train.steps=1_000",
                               "method.rank_pattern={ v_proj = 2 }", "data.eval=my eval.jsonl", "method.name=lora",
                               "train.scan_layers=true", "output_dir=1979-05-27"], base_dir=str(tmp_path))
    assert cfg["method"]["target_modules"] == ["q_proj", "v_proj"] and cfg["train"]["steps"] == 1000
    assert cfg["method"]["rank_pattern"] == {"v_proj": 2} and cfg["method"]["name"] == "lora"
    assert cfg["data"]["eval"] == str(tmp_path / "my eval.jsonl") and cfg["train"]["scan_layers"] is True
    assert cfg["output_dir"] == str(tmp_path / "1979-05-27")  # a TOML date is no config value: the text


def test_train_with_the_whole_logits_equals_the_chunked_default(hf_dir, capsys):
    """train.loss_chunk_tokens = 0 (the whole [batch, seq, vocab] logits) trains the same
    adapter as the default (the output layer and the loss a chunk of tokens at a time)."""
    runs = {}
    for name, extra in (("chunked_run", []), ("whole_logits_run", ["--set", "train.loss_chunk_tokens=0"])):
        cfg = write_config(hf_dir, name, steps=3, save_every=3, eval_every=3)
        r = jpeft_here(capsys, "train", "--config", cfg, "--no-progress", *extra)
        assert r.returncode == 0, r.stderr
        lines = [json.loads(x) for x in open(hf_dir / name / "metrics.jsonl")]
        runs[name] = ([x["loss"] for x in lines if "loss" in x], [x["eval_loss"] for x in lines if "eval_loss" in x],
                      adapter_arrays(hf_dir / name / "adapter"))
    (loss_c, eval_c, ad_c), (loss_w, eval_w, ad_w) = runs["chunked_run"], runs["whole_logits_run"]
    assert len(loss_c) == 3 and len(eval_c) == 1
    np.testing.assert_allclose(loss_c, loss_w, rtol=1e-5)
    np.testing.assert_allclose(eval_c, eval_w, rtol=1e-5)
    assert sorted(ad_c) == sorted(ad_w)
    for k in ad_w:
        np.testing.assert_allclose(ad_c[k], ad_w[k], rtol=1e-3, atol=1e-5, err_msg=k)


def test_gradient_accumulation_trains_as_the_whole_batch_at_once(hf_dir, capsys):
    """train.gradient_accumulation_steps = 2 with batch_size = 2 takes the rows a batch of 4
    takes, in two passes weighted by their target tokens: the same loss and grad norm at every
    step and the same adapter as batch_size = 4 in one pass (dropout off, so the passes' keys do
    not matter); an invalid value is refused by name."""
    runs = {}
    for name, extra in (("acc_whole", ""), ("acc_two", "\ngradient_accumulation_steps = 2")):
        cfg = write_config(hf_dir, name, steps=3, save_every=3, eval_every=0)
        text = cfg.read_text().replace("lora_dropout = 0.1", "lora_dropout = 0.0").replace(
            "[train]", "[train]\nmodel_dropout = false" + extra)
        cfg.write_text(text if extra == "" else text.replace("batch_size = 4", "batch_size = 2"))
        r = jpeft_here(capsys, "train", "--config", cfg, "--no-progress")
        assert r.returncode == 0, r.stderr
        recs = [json.loads(x) for x in open(hf_dir / name / "metrics.jsonl") if '"loss"' in x]
        runs[name] = (recs, adapter_arrays(hf_dir / name / "adapter"))
    (whole, a), (two, b) = runs["acc_whole"], runs["acc_two"]
    assert [x["step"] for x in whole] == [x["step"] for x in two] == [1, 2, 3]
    for x, y in zip(whole, two):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5) and x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6)
    # the same two-pass run on a 2-device mesh (each pass's 2 rows split over data=2)
    env2 = dict(ENV, XLA_FLAGS=f"{ENV.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2")
    r = subprocess.run([sys.executable, "-m", "jpeft.cli", "train", "--config", str(hf_dir / "acc_two.toml"),
                        "--no-progress", "--output-dir", str(hf_dir / "acc_mesh"), "--set", "mesh.data=2"],
                       capture_output=True, text=True, timeout=300, env=env2)
    assert r.returncode == 0 and "mesh data=2" in r.stderr and "2 passes of 2 rows per update" in r.stderr, r.stderr
    c = adapter_arrays(hf_dir / "acc_mesh" / "adapter")
    for k in a:
        np.testing.assert_allclose(c[k], a[k], rtol=1e-4, atol=1e-5)
    cfg = write_config(hf_dir, "acc_bad", steps=1)
    r = jpeft_here(capsys, "train", "--config", cfg, "--no-progress", "--set", "train.gradient_accumulation_steps=0")
    assert r.returncode == 2 and "train.gradient_accumulation_steps must be a positive integer" in r.stderr


def test_train_matches_transformers_trainer_with_peft_step_for_step(hf_dir, capsys):
    """``jpeft train`` (LoRA, warm-up + cosine to 10 %, clipping, weight decay, AdamW) against
    transformers' ``Trainer`` + peft fed the same packed rows in the same order (documents
    packing as a 4-D block-diagonal mask), from the same initial adapter: the same loss, grad
    norm and learning rate at every step, the same final adapter, and ``eval_loss`` equal to the
    token-weighted mean of the Trainer's model (``Trainer.evaluate`` averages batch means)."""
    import jax
    import peft
    import torch
    import transformers as T
    from safetensors.torch import load_file

    from jpeft.cli._common import method_of
    from jpeft.cli._model import load_folder
    from jpeft.data import text_encoder
    from jpeft.data import PackedDataset

    cfg = write_config(hf_dir, "vs_trainer", steps=4, save_every=4, eval_every=4)
    cfg.write_text(cfg.read_text().replace("lora_dropout = 0.1", "lora_dropout = 0.0").replace(
        ', "down_proj"]', ']').replace("[train]", "[train]\nweight_decay = 0.1\nmodel_dropout = false\n"
                                       "max_grad_norm = 0.5").replace("batch_size = 4", "batch_size = 2"))
    r = jpeft_here(capsys, "train", "--config", cfg, "--no-progress")
    assert r.returncode == 0, r.stderr
    recs = [json.loads(x) for x in open(hf_dir / "vs_trainer" / "metrics.jsonl")]
    mine = [x for x in recs if "loss" in x]
    eval_loss = [x["eval_loss"] for x in recs if "eval_loss" in x][-1]
    rc = json.load(open(hf_dir / "vs_trainer" / "resolved_config.json"))
    t, d = rc["train"], rc["data"]
    loaded = load_folder(rc["model"])
    method = method_of(rc, "llama")
    enc, bos, eos = text_encoder(loaded.tokenizer)
    packed = {s: PackedDataset.from_file(d[s], enc, d["seq_len"], eos_id=eos, bos_id=bos) for s in ("train", "eval")}
    k_init, _ = jax.random.split(jax.random.key(rc["seed"]))  # the initial adapter jpeft train drew
    a0 = jpeft.init(method, loaded.params, k_init, loaded.model,
                    jax.numpy.asarray(packed["train"].input_ids[:1, :8]))
    jpeft.hf.save_peft(str(hf_dir / "vs_trainer_init"), method, a0, base_model_name_or_path=rc["model"])
    assert main(["export", "--model", rc["model"], "--adapter", str(hf_dir / "vs_trainer"),
                 "--out", str(hf_dir / "vs_trainer_peft")]) == 0

    def rows(b):
        out = []
        for i in range(len(b["input_ids"])):
            ids = torch.tensor(b["input_ids"][i], dtype=torch.long)
            seg = torch.tensor(b["segment_ids"][i])
            n = len(ids)
            see = (seg[:, None] == seg[None]) & (seg[:, None] > 0) & torch.ones(n, n, dtype=torch.bool).tril()
            out.append({"input_ids": ids, "labels": torch.where(torch.tensor(b["loss_mask"][i]).bool(), ids, -100),
                        "position_ids": torch.tensor(b["position_ids"][i], dtype=torch.long),
                        "attention_mask": torch.where(see | torch.eye(n, dtype=torch.bool), 0.0, -1e30)[None]})
        return out

    class Rows(torch.utils.data.Dataset):
        def __init__(self, r):
            self.r = r

        def __len__(self):
            return len(self.r)

        def __getitem__(self, i):
            return self.r[i]

    class InOrder(T.Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    train_rows = [x for s in range(t["steps"]) for x in rows(packed["train"].batch(s, t["batch_size"], rc["seed"]))]
    eval_rows = [x for b in packed["eval"].eval_batches(t["batch_size"]) for x in rows(b) if (x["labels"] != -100).any()]
    base = T.LlamaForCausalLM.from_pretrained(rc["model"], attn_implementation="eager")
    model = peft.PeftModel.from_pretrained(base, str(hf_dir / "vs_trainer_init"), is_trainable=True)
    args = T.TrainingArguments(
        output_dir=str(hf_dir / "vs_trainer_hf"), per_device_train_batch_size=t["batch_size"], max_steps=t["steps"],
        learning_rate=t["learning_rate"], warmup_steps=t["warmup_steps"], weight_decay=t["weight_decay"],
        max_grad_norm=t["max_grad_norm"], lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1}, optim="adamw_torch", logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=True, remove_unused_columns=False, disable_tqdm=True)
    trainer = InOrder(model=model, args=args, train_dataset=Rows(train_rows), data_collator=T.default_data_collator)
    trainer.train()
    ref = [x for x in trainer.state.log_history if "loss" in x]
    assert len(ref) == len(mine) == 4
    for key, hf_key in (("loss", "loss"), ("grad_norm", "grad_norm"), ("lr", "learning_rate")):
        np.testing.assert_allclose([x[key] for x in mine], [x[hf_key] for x in ref], rtol=2e-5, atol=1e-9, err_msg=key)
    got = load_file(str(hf_dir / "vs_trainer_peft" / "adapter_model.safetensors"))
    want = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    assert sorted(got) == sorted(want)
    for k in got:
        np.testing.assert_allclose(got[k].numpy(), want[k].detach().numpy(), rtol=1e-4,
                                   atol=1e-5 * float(want[k].abs().max()), err_msg=k)
    with torch.no_grad():
        nll = [torch.nn.functional.cross_entropy(
            model(**{k: v[None] for k, v in x.items() if k != "labels"}).logits[0, :-1], x["labels"][1:],
            reduction="sum", ignore_index=-100) for x in eval_rows]
    count = sum(int((x["labels"][1:] != -100).sum()) for x in eval_rows)
    assert eval_loss == pytest.approx(float(sum(nll)) / count, rel=1e-5)


# ------------------------------------------------------------------------------------ info
def test_info_llama2_7b_matches_transformers_and_peft(capsys):
    """The budget computed with jax.eval_shape equals peft's count on the real architecture
    (built by transformers on the meta device: no memory)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from jpeft.cli import _configs

    assert main(["info", "llama-2-7b", "--method", "lora", "-r", "8", "--target", "q_proj,v_proj", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    with torch.device("meta"):
        ref = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in _configs.PUBLISHED["llama-2-7b"].items()
                                              if k not in ("model_type", "architectures")}))
    base = sum(p.numel() for p in ref.parameters())
    peft_model = get_peft_model(ref, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    trainable, total = peft_model.get_nb_trainable_parameters()
    assert base == 6_738_415_616  # the published Llama-2-7B size
    assert (got["base_params"], got["trainable_params"], got["total_params"]) == (base, trainable, total)
    assert trainable == 4_194_304
    assert got["adapted_sites"] == 64

    # IA3 with PEFT's default targets for llama (k_proj, v_proj; down_proj as feed-forward)
    from peft import IA3Config

    assert main(["info", "llama-2-7b", "--method", "ia3", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    with torch.device("meta"):
        ref = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in _configs.PUBLISHED["llama-2-7b"].items()
                                              if k not in ("model_type", "architectures")}))
    trainable, total = get_peft_model(ref, IA3Config(task_type="CAUSAL_LM")).get_nb_trainable_parameters()
    assert (got["trainable_params"], got["total_params"]) == (trainable, total) == (614_400, 6_739_030_016)


def test_info_qwen3_0_6b_matches_transformers_and_peft(capsys):
    """The published Qwen3-0.6B (head_dim 128 != 1024 / 16, q/k norms, tied embeddings) counts as
    transformers builds it, and LoRA on PEFT's default targets for qwen3 adapts what PEFT adapts
    (the other methods' defaults: tests/test_methods_budget.py)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from jpeft.cli import _configs

    assert main(["info", "Qwen/Qwen3-0.6B", "--method", "lora", "-r", "8", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    with torch.device("meta"):
        ref = Qwen3ForCausalLM(Qwen3Config(**{k: v for k, v in _configs.PUBLISHED["qwen3-0.6b"].items()
                                              if k not in ("model_type", "architectures")}))
    base = sum(p.numel() for p in ref.parameters())
    trainable, total = get_peft_model(ref, LoraConfig(r=8, task_type="CAUSAL_LM")).get_nb_trainable_parameters()
    assert base == 596_049_920  # the published Qwen3-0.6B size
    assert (got["base_params"], got["trainable_params"], got["total_params"]) == (base, trainable, total)


def test_info_text_output_and_list(capsys):
    assert main(["info", "mistral-7b", "-r", "16", "--target", "q_proj,k_proj,v_proj,o_proj"]) == 0
    out = capsys.readouterr().out
    # Mistral-7B: 32 layers; q,o: 4096->4096, k,v: 4096->1024 (grouped-query attention)
    r = 16
    expect = 32 * r * ((4096 + 4096) * 2 + (4096 + 1024) * 2)
    assert f"trainable params: {expect:,}" in out and "7,241,732,096" in out
    assert main(["info", "--list"]) == 0
    listing = capsys.readouterr().out
    for name in ("llama-2-7b", "mistral-7b", "gpt2", "llama-3-8b"):
        assert name in listing


def test_info_on_a_model_folder_and_gpt2(hf_dir, capsys):
    assert main(["info", str(hf_dir / "tiny-llama"), "--json", "-r", "2", "--target", "q_proj"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["trainable_params"] == 2 * 2 * (32 + 32)  # 2 layers, r=2, [32 -> 32]
    from safetensors.numpy import load_file

    w = load_file(str(hf_dir / "tiny-llama" / "model.safetensors"))
    assert got["base_params"] == sum(a.size for a in w.values())
    assert main(["info", "gpt2", "--target", "c_attn", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["base_params"] == 124_439_808  # GPT-2 small
    assert got["trainable_params"] == 12 * 8 * (768 + 3 * 768)


# ----------------------------------------------------------------------------------- train
_FAKE_TENSORBOARDX = """
import json, os


class SummaryWriter:  # what jpeft's MetricLog calls of tensorboardX's writer, recorded as JSON lines
    def __init__(self, logdir, purge_step=None):
        os.makedirs(logdir, exist_ok=True)
        self._f = open(os.path.join(logdir, "events.jsonl"), "a")
        self._f.write(json.dumps({"purge_step": purge_step}) + "\\n")

    def add_scalar(self, tag, value, step):
        self._f.write(json.dumps({"tag": tag, "value": value, "step": step}) + "\\n")

    def close(self):
        self._f.close()
"""


def _tensorboard_shows(logdir):
    """The scalars TensorBoard shows of the fake writer's records: a writer opened with ``purge_step=P``
    hides the events written before it of step P and later (TensorBoard's SessionLog.START purge)."""
    shown = []
    for rec in map(json.loads, open(logdir / "events.jsonl")):
        if "purge_step" in rec:
            if rec["purge_step"] is not None:
                shown = [e for e in shown if e["step"] < rec["purge_step"]]
        else:
            shown.append(rec)
    return shown


def test_train_max_steps_then_resume_equals_uninterrupted(hf_dir, capsys, monkeypatch, tmp_path):
    """Also: TensorBoard (a fake tensorboardX writer, here and in the resumed process) shows each step once,
    with the uninterrupted run's loss: the resumed run opens its writer with purge_step = the step after the
    checkpoint (it appended steps 4 and 5 again, and TensorBoard showed both copies)."""
    import importlib.util

    (tmp_path / "tensorboardX").mkdir()
    (tmp_path / "tensorboardX" / "__init__.py").write_text(_FAKE_TENSORBOARDX)
    spec = importlib.util.spec_from_file_location("tensorboardX", tmp_path / "tensorboardX" / "__init__.py")
    fake = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fake)
    monkeypatch.setitem(sys.modules, "tensorboardX", fake)
    cfg = write_config(hf_dir, "full_run")
    r = jpeft_here(capsys, "train", "--config", cfg, "--no-progress")
    assert r.returncode == 0, r.stderr
    ref = adapter_arrays(hf_dir / "full_run" / "adapter")
    lines = [json.loads(x) for x in open(hf_dir / "full_run" / "metrics.jsonl")]
    assert [x["step"] for x in lines if "loss" in x] == list(range(1, 9))
    assert [x["step"] for x in lines if "eval_loss" in x] == [4, 8]
    assert all(np.isfinite(x["loss"]) for x in lines if "loss" in x)

    cfg2 = write_config(hf_dir, "split_run")
    r = jpeft_here(capsys, "train", "--config", cfg2, "--max-steps", "5", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "stopped at step 5 of 8" in r.stderr
    assert not (hf_dir / "split_run" / "adapter").exists()
    assert main(["train", "--config", str(cfg2), "--no-progress"]) == 2  # without --resume: refused
    assert "already has checkpoints; pass --resume" in error_line(capsys.readouterr().err)
    # as after a crash that lost the newest checkpoint: steps 4-5 were logged, the run resumes at 3
    shutil.rmtree(hf_dir / "split_run" / "checkpoints" / "5")
    # a fresh process (nothing kept in memory), which reads the tokenizer with transformers imported without torch
    # (jpeft.cli.process_main; it imported torch, 2.4 s of CPU): its losses below are this process's, with torch
    path = os.pathsep.join([str(tmp_path)] + [p for p in [ENV.get("PYTHONPATH")] if p])  # the fake tensorboardX
    r = jpeft_cmd("train", "--config", cfg2, "--resume", "--no-progress",
                  env=dict(ENV, PYTHONPROFILEIMPORTTIME="1", PYTHONPATH=path))
    assert r.returncode == 0, r.stderr
    assert "resumed from step 3" in r.stderr and "3 record(s) of steps after 3 removed" in r.stderr  # 4, its eval, 5
    imported = {ln.split("|")[-1].strip() for ln in r.stderr.splitlines() if ln.startswith("import time:")}
    assert "transformers" in imported and "torch" not in imported
    # each step logged once, with the uninterrupted run's losses
    split = [x for x in _metrics(hf_dir / "split_run") if "loss" in x]
    assert [x["step"] for x in split] == list(range(1, 9))
    np.testing.assert_allclose([x["loss"] for x in split], [x["loss"] for x in lines if "loss" in x], rtol=1e-6)
    # and in TensorBoard: the first run's writer purged nothing before it (step 0), the resumed one steps 4 and on
    shown = _tensorboard_shows(hf_dir / "split_run" / "tb")
    assert [e["step"] for e in shown if e["tag"] == "loss"] == list(range(1, 9))
    assert [e["step"] for e in shown if e["tag"] == "eval_loss"] == [4, 8]
    np.testing.assert_allclose([e["value"] for e in shown if e["tag"] == "loss"],
                               [x["loss"] for x in lines if "loss" in x], rtol=1e-6)
    assert [json.loads(x).get("purge_step", "-") for x in open(hf_dir / "split_run" / "tb" / "events.jsonl")
            if "purge_step" in x] == [0, 4]
    got = adapter_arrays(hf_dir / "split_run" / "adapter")
    assert sorted(got) == sorted(ref) and len(ref) == 12  # 2 layers x 3 modules x (A, B)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    assert any(np.abs(ref[k]).max() > 0 for k in ref if k.endswith("lora_B"))  # it did train


def test_train_afresh_over_a_run_that_died_before_its_first_checkpoint_logs_each_step_once(hf_dir, capsys):
    """A run killed before its first checkpoint leaves metrics.jsonl (and no checkpoint), so a
    new run without --resume is allowed there; it used to append to the old records (steps 1-2
    twice, steps 3-5 of a run that no longer exists)."""
    cfg = write_config(hf_dir, "died_early", steps=2, save_every=0, eval_every=0)
    (hf_dir / "died_early" / "checkpoints").mkdir(parents=True)
    with open(hf_dir / "died_early" / "metrics.jsonl", "w") as f:  # as the killed run left it
        f.write(json.dumps({"step": 0, "canary_loss": 9.0}) + "\n")
        for s in range(1, 6):
            f.write(json.dumps({"step": s, "loss": 9.0 + s}) + "\n")
    r = jpeft_here(capsys, "train", "--config", cfg, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "6 record(s) of an earlier run that left no checkpoint removed" in r.stderr
    recs = _metrics(hf_dir / "died_early")
    assert [(x["step"], sorted(x)[0]) for x in recs] == [(1, "elapsed_s"), (2, "elapsed_s"), (2, "eval_loss")]
    assert all(x["loss"] < 9 for x in recs if "loss" in x)


def test_train_refuses_a_tensor_axis_for_a_model_it_would_not_split(hf_dir, tmp_path):
    """`[mesh] tensor` splits the Llama family's layers (jpeft.tensor_parallel_rules); on GPT-2
    no weight matched, so each tensor group silently computed the same thing. Refused before
    anything is loaded or written; a tensor size that does not divide a split dimension names
    the mesh setting (not the rules, which a jpeft train user does not write)."""
    import transformers

    gpt2 = tmp_path / "tiny-gpt2"
    transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=64).save_pretrained(gpt2)
    cfg = write_config(hf_dir, "gpt2_tp", steps=1)
    env = dict(ENV, XLA_FLAGS=f"{ENV.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2")
    r = subprocess.run([sys.executable, "-m", "jpeft.cli", "train", "--config", str(cfg), "--no-progress",
                        "--set", f"model={json.dumps(str(gpt2))}", "--set", "mesh.tensor=2"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 2 and "is a 'gpt2' model: none of its weights would be split" in error_line(r.stderr)
    assert not (hf_dir / "gpt2_tp").exists()
    # a tensor size that does not divide a dimension the rules split: the advice is about the mesh
    r = subprocess.run([sys.executable, "-m", "jpeft.cli", "train", "--config", str(cfg), "--no-progress",
                        "--set", "mesh.tensor=3"], capture_output=True, text=True, timeout=300,
                       env=dict(env, XLA_FLAGS=env["XLA_FLAGS"].replace("count=2", "count=3")))
    assert r.returncode == 2 and "[mesh] tensor = 3 does not fit this model" in error_line(r.stderr)



def test_train_refuses_scan_layers_for_gpt2_naming_the_setting(hf_dir, tmp_path, capsys):
    """docs/CLI.md: GPT-2 folders refuse train.scan_layers with a one-line error. It used to be
    from_pretrained's "['scan_layers'] are not fields of GPT2Config; the overrides it takes are
    [...]", which names no setting of the config the user wrote; now the setting and the fix,
    from config.json before any weight is read (the folder here has none)."""
    import transformers

    gpt2 = tmp_path / "tiny-gpt2"
    transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=64).save_pretrained(gpt2)
    cfg = write_config(hf_dir, "gpt2_scan", steps=1)
    assert main(["train", "--config", str(cfg), "--no-progress", "--set", f"model={json.dumps(str(gpt2))}",
                 "--set", "train.scan_layers=true"]) == 2
    line = error_line(capsys.readouterr().err)
    assert "train.scan_layers is for Llama-family models" in line and "Set scan_layers = false" in line, line
    assert not (hf_dir / "gpt2_scan").exists()

def _tiny_lora_run(hf_dir, tmp_path, *, steps: int, extra: str = ""):
    """A config of a few LoRA steps on the tiny Llama, saving every step, with its own copy of the
    training data (tests edit it): the path of the config."""
    shutil.copy(hf_dir / "train.jsonl", tmp_path / "train.jsonl")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'model = "{hf_dir / "tiny-llama"}"\noutput_dir = "out"\n[data]\ntrain = "train.jsonl"\n'
                   'seq_len = 16\n[method]\nname = "lora"\nr = 2\ntarget_modules = ["q_proj"]\n'
                   f'[train]\nsteps = {steps}\nbatch_size = 2\nwarmup_steps = 0\nsave_every = 1\n{extra}')
    return cfg


def test_resume_past_a_damaged_newest_checkpoint_names_the_step_to_move_and_then_resumes(hf_dir, tmp_path, capsys):
    """A newest checkpoint whose bytes were damaged (a disk error, a file truncated by hand) made
    --resume stop with the restore's error alone ("... is corrupted: the bytes of ... do not
    match their SHA-256"), which names no way on for a `jpeft train` user. It now names the
    step folder to move away and the step the run then resumes from; done so, the run resumes
    from that step and ends with the uninterrupted run's adapter, bit for bit. An empty step
    folder left in its place (``mkdir``, or a crash right after the folder was made) is moved
    aside with a warning; it was refused as "not checkpoints" and blocked --resume."""
    cfg = _tiny_lora_run(hf_dir, tmp_path, steps=3)
    assert main(["train", "--config", str(cfg), "--no-progress", "--output-dir", str(tmp_path / "whole")]) == 0
    assert main(["train", "--config", str(cfg), "--no-progress", "--max-steps", "2"]) == 0
    ckpts = tmp_path / "out" / "checkpoints"
    data = sorted(f for f in (ckpts / "2" / "state").rglob("*") if f.is_file() and f.parent.name == "d")
    b = bytearray(data[0].read_bytes())
    b[len(b) // 2] ^= 0xFF
    data[0].write_bytes(bytes(b))
    capsys.readouterr()
    assert main(["train", "--config", str(cfg), "--no-progress", "--resume"]) == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith("jpeft train: error: CheckpointError: checkpoint step 2 in ") and "corrupted" in line, line
    assert f"move its folder {ckpts / '2'} out of {ckpts}" in line and "run --resume again to resume from step 1" in line
    shutil.move(ckpts / "2", tmp_path / "damaged-2")
    (ckpts / "2").mkdir()  # an empty step folder (a crash right after it was made): set aside, never blocking
    with pytest.warns(UserWarning, match=r"checkpoints/2 holds no checkpoint .*moved it to .*2\.incomplete-"):
        assert main(["train", "--config", str(cfg), "--no-progress", "--resume"]) == 0
    assert "resumed from step 1" in capsys.readouterr().err
    got, ref = adapter_arrays(tmp_path / "out" / "adapter"), adapter_arrays(tmp_path / "whole" / "adapter")
    assert sorted(got) == sorted(ref)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)


def test_resume_refuses_changed_training_data(hf_dir, tmp_path, capsys):
    """--resume after data.train was edited (same path, other rows) continued the run on other
    batches, silently; the packed rows' fingerprint is saved and compared."""
    cfg = _tiny_lora_run(hf_dir, tmp_path, steps=2)
    assert main(["train", "--config", str(cfg), "--no-progress", "--max-steps", "1"]) == 0
    saved = (tmp_path / "out" / "resolved_config.json").read_text()
    assert '"train_data_sha256"' in saved
    with open(tmp_path / "train.jsonl", "a") as f:
        f.write(json.dumps({"text": "one more line"}) + "\n")
    capsys.readouterr()
    assert main(["train", "--config", str(cfg), "--no-progress", "--resume"]) == 2
    assert "on other training data than its checkpoints were trained on" in error_line(capsys.readouterr().err)
    assert (tmp_path / "out" / "resolved_config.json").read_text() == saved


def test_a_second_run_in_a_busy_output_folder_stops_before_writing(hf_dir, tmp_path, capsys):
    """Two runs in one output folder: the checkpoint writer lock was taken at the first save,
    so a second run appended its records to the first's metrics.jsonl until then. The run now
    takes the lock before its first step and stops with a named error, the folder untouched."""
    from jpeft.checkpoint import CheckpointManager

    cfg = _tiny_lora_run(hf_dir, tmp_path, steps=3, extra="log_every = 1\n")
    assert main(["train", "--config", str(cfg), "--no-progress", "--max-steps", "1"]) == 0
    out = tmp_path / "out"
    before = {p: (out / p).read_bytes() for p in ("metrics.jsonl", "resolved_config.json")}
    model, params = jpeft.models.from_pretrained(str(hf_dir / "tiny-llama"))
    other = CheckpointManager(out / "checkpoints", jpeft.LoraConfig(r=2, target_modules=["q_proj"]), params).lock()
    try:
        capsys.readouterr()
        assert main(["train", "--config", str(cfg), "--no-progress", "--resume"]) == 2
        assert "another run (a jpeft train, or a program saving checkpoints) is writing into" in \
            error_line(capsys.readouterr().err)
        assert {p: (out / p).read_bytes() for p in before} == before
    finally:
        other.close()
    assert main(["train", "--config", str(cfg), "--no-progress", "--resume"]) == 0  # once the other writer is gone


def test_a_run_refused_the_lock_leaves_the_other_runs_files(hf_dir, tmp_path, capsys, monkeypatch):
    """Two fresh runs started on one output folder at about the same time: the second looked at the folder before
    the first wrote its files, was refused the writer lock, and its failed-start cleanup removed the first run's
    resolved_config.json, metrics.jsonl, tb/ and checkpoints/ (with its lock): they were not there when it looked,
    and the first had not logged a step yet. Simulated: the first starts between the second's look and its lock."""
    import jpeft.cli._trainer as trainer

    shutil.copy(hf_dir / "train.jsonl", tmp_path / "train.jsonl")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'model = "{hf_dir / "tiny-llama"}"\noutput_dir = "out"\n[data]\ntrain = "train.jsonl"\n'
                   'seq_len = 16\n[method]\nname = "lora"\nr = 2\ntarget_modules = ["q_proj"]\n'
                   '[train]\nsteps = 3\nbatch_size = 2\nwarmup_steps = 0\nsave_every = 1\n')
    out, real, held = tmp_path / "out", trainer.CheckpointManager, []

    def manager(ckpt_dir, method, params, **kw):  # the first run takes the lock and writes its files
        held.append(real(ckpt_dir, method, params, **kw).lock())
        (out / "resolved_config.json").write_text("{}")
        (out / "metrics.jsonl").write_text("")
        return real(ckpt_dir, method, params, **kw)

    monkeypatch.setattr(trainer, "CheckpointManager", manager)
    try:
        assert main(["train", "--config", str(cfg), "--no-progress"]) == 2
        assert "is writing into" in error_line(capsys.readouterr().err)
        assert sorted(os.listdir(out)) == ["checkpoints", "metrics.jsonl", "resolved_config.json"]
        assert (out / "checkpoints" / ".jpeft-writer.lock").exists()
    finally:
        for m in held:
            m.close()


def test_a_lock_file_that_cannot_be_made_is_not_reported_as_another_run(hf_dir, tmp_path, capsys, monkeypatch):
    """The writer lock's file could not be created (permissions, a read-only folder), or the file
    system has no flock (ENOLCK): `jpeft train` said another run was writing into the folder; it
    now passes the lock's own message on."""
    from jpeft.checkpoint import CheckpointManager
    from jpeft.errors import SaveError

    def refuse(self):
        try:
            raise PermissionError(13, "Permission denied")
        except OSError as e:
            raise SaveError(f"cannot create the writer lock in {self.directory}: {e}") from e

    monkeypatch.setattr(CheckpointManager, "_take_lock", refuse)
    cfg = _tiny_lora_run(hf_dir, tmp_path, steps=2)
    assert main(["train", "--config", str(cfg), "--no-progress"]) == 2
    err = error_line(capsys.readouterr().err)
    assert "cannot create the writer lock" in err and "Permission denied" in err and "another run" not in err
    monkeypatch.undo()
    import errno

    import jpeft.checkpoint as ckpt

    def no_locks(fd, op):  # a file system without flock (NFS mounted without locks: ENOLCK)
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(ckpt.fcntl, "flock", no_locks)
    assert main(["train", "--config", str(cfg), "--no-progress"]) == 2
    err = error_line(capsys.readouterr().err)
    assert "cannot take the writer lock" in err and "No locks available" in err and "another run" not in err


def test_resume_refuses_another_base_of_the_same_architecture(hf_dir, tmp_path, capsys):
    """`model` may change on --resume (the folder moved), but a folder holding other weights of
    the same config and shapes (another fine-tune) passed the checkpoints' base check (config
    and shapes only) and the run went on on another base, silently (loss 5.69 -> 10.7). A
    sample of each tensor's bytes is fingerprinted; the same weights in another folder, or
    sharded into other files, still resume."""
    from safetensors.numpy import load_file, save_file

    from jpeft.models.loading import weights_fingerprint

    src = hf_dir / "tiny-llama"
    moved, other, sharded = tmp_path / "moved", tmp_path / "other", tmp_path / "sharded"
    shutil.copytree(src, moved)
    shutil.copytree(src, other)
    w = load_file(src / "model.safetensors")
    rng = np.random.default_rng(0)
    save_file({k: (v + rng.normal(0, 0.1, v.shape)).astype(v.dtype) for k, v in w.items()}, other / "model.safetensors")
    sharded.mkdir()
    names = sorted(w)
    save_file({k: w[k] for k in names[::2]}, sharded / "a.safetensors")
    save_file({k: w[k] for k in names[1::2]}, sharded / "b.safetensors")
    assert weights_fingerprint(str(src)) == weights_fingerprint(str(moved)) == weights_fingerprint(str(sharded))
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'model = "{src}"\noutput_dir = "out"\n[data]\ntrain = "{hf_dir / "train.jsonl"}"\n'
                   'seq_len = 16\n[method]\nname = "lora"\nr = 2\ntarget_modules = ["q_proj"]\n'
                   '[train]\nsteps = 3\nbatch_size = 2\nwarmup_steps = 0\nsave_every = 1\n')
    assert main(["train", "--config", str(cfg), "--no-progress", "--max-steps", "1"]) == 0
    saved = (tmp_path / "out" / "resolved_config.json").read_text()
    capsys.readouterr()
    assert main(["train", "--config", str(cfg), "--no-progress", "--resume", "--set", f"model={other}"]) == 2
    assert "on another base model than its checkpoints were trained on" in error_line(capsys.readouterr().err)
    assert (tmp_path / "out" / "resolved_config.json").read_text() == saved
    assert main(["train", "--config", str(cfg), "--no-progress", "--resume", "--max-steps", "2",
                 "--set", f"model={moved}"]) == 0


def test_train_never_replaces_a_finished_adapter_it_cannot_resume_nor_resumes_past_a_damaged_config(hf_dir, capsys):
    """A finished run whose checkpoints were deleted (to free space) was started again from step
    0 by a new `jpeft train` (with or without --resume) into the same output_dir: its metrics
    were dropped at the start and its adapter replaced at the end. And a half-written
    resolved_config.json (it was written in place) read as "no saved settings", so --resume
    accepted a changed seed. Both are refused before anything is loaded or written."""
    cfg = write_config(hf_dir, "kept_run", steps=2, save_every=1, eval_every=0)
    out = hf_dir / "kept_run"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "jpeft_adapter.json").write_text("{}")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    for extra in ([], ["--resume"]):
        assert main(["train", "--config", str(cfg), "--no-progress", *extra]) == 2
        assert "holds the finished adapter of an earlier run" in error_line(capsys.readouterr().err)
    assert (out / "adapter" / "jpeft_adapter.json").read_text() == "{}"
    assert (out / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'
    shutil.rmtree(out / "adapter")
    (out / "checkpoints" / "2").mkdir(parents=True)
    (out / "resolved_config.json").write_text('{"seed": 3, "train": {"ste')
    assert main(["train", "--config", str(cfg), "--no-progress", "--resume", "--set", "seed=99"]) == 2
    assert "resolved_config.json is unreadable" in error_line(capsys.readouterr().err)
    (out / "resolved_config.json").write_text("[1, 2]")  # JSON, but not the settings table: refused too
    assert main(["train", "--config", str(cfg), "--no-progress", "--resume", "--set", "seed=99"]) == 2
    assert "holds list JSON" in error_line(capsys.readouterr().err)


def test_train_refuses_resume_past_steps_and_names_a_scan_layers_change(hf_dir, capsys):
    cfg = write_config(hf_dir, "past_run", steps=2, save_every=1, eval_every=0)
    assert main(["train", "--config", str(cfg), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["train", "--config", str(cfg), "--no-progress", "--resume", "--set", "train.steps=1"]) == 2
    assert "latest checkpoint in" in (line := error_line(capsys.readouterr().err))
    assert "is at step 2, past train.steps = 1; resume with train.steps >= 2" in line
    assert main(["train", "--config", str(cfg), "--no-progress", "--resume", "--set", "train.scan_layers=true"]) == 2
    assert ("were written with train.scan_layers = false (a per-layer adapter), but this run has "
            "train.scan_layers = true; resume with --set train.scan_layers=false") in error_line(capsys.readouterr().err)
    # settings that change the run (data order, update rule) are refused by name, and the saved
    # config stays as it was; a clipping change would otherwise fail deep in the optimizer state
    saved = (hf_dir / "past_run" / "resolved_config.json").read_text()
    assert main(["train", "--config", str(cfg), "--no-progress", "--resume", "--set", "seed=99",
                 "--set", "train.max_grad_norm=0"]) == 2
    line = error_line(capsys.readouterr().err)
    assert "--resume would continue the run in" in line and "seed: 3 -> 99; train.max_grad_norm: 1.0 -> 0" in line, line
    assert "resolved_config.json), or start a new run in another output_dir" in line
    assert (hf_dir / "past_run" / "resolved_config.json").read_text() == saved
    # reporting and saving settings may change on resume (and train.steps, with a note)
    assert main(["train", "--config", str(cfg), "--no-progress", "--resume", "--set", "train.log_every=1",
                 "--set", "train.steps=3"]) == 0
    assert "note: train.steps changed from 2 to 3 on resume" in capsys.readouterr().err
    # extended again but stopped early: the run folder's finished adapter/ (step 3) is older than
    # its newest checkpoint (step 4); --adapter RUN still reads adapter/, and says so
    assert main(["train", "--config", str(cfg), "--no-progress", "--resume", "--set", "train.steps=6",
                 "--max-steps", "4"]) == 0
    capsys.readouterr()
    assert main(["info", str(hf_dir / "past_run")]) == 0
    err = capsys.readouterr().err
    assert "past_run/adapter is the adapter finished at step 3, but the run has a newer checkpoint (step 4" in err
    assert "Give --adapter " + str(hf_dir / "past_run" / "checkpoints" / "4") + " for the newer one" in err


def test_train_with_a_nan_base_weight_fails_instead_of_saving(hf_dir, capsys, monkeypatch):
    """`jpeft train` runs jpeft.fit, whose guard skips every non-finite step and refuses to
    end a run on them: exit status 2, no adapter written (issue #16, item 5)."""
    import shutil

    from safetensors.numpy import load_file, save_file

    nan_dir = hf_dir / "nan-llama"
    if not nan_dir.exists():
        shutil.copytree(hf_dir / "tiny-llama", nan_dir)
        w = load_file(nan_dir / "model.safetensors")
        w["model.layers.0.mlp.down_proj.weight"][0, 0] = np.nan
        save_file(w, nan_dir / "model.safetensors", metadata={"format": "pt"})
    cfg = write_config(hf_dir, "nan_run", steps=3, save_every=1, eval_every=0)
    cfg.write_text(cfg.read_text().replace('model = "tiny-llama"', 'model = "nan-llama"'))
    calls = []
    real = jpeft.fit
    monkeypatch.setattr(jpeft, "fit", lambda *a, **kw: calls.append(kw["desc"]) or real(*a, **kw))
    assert main(["train", "--config", str(cfg), "--no-progress"]) == 2
    assert calls == ["train"]
    err = capsys.readouterr().err.strip().splitlines()
    assert [ln.split(",")[0] for ln in err[-4:-1]] == [f"step {i}: loss nan" for i in (1, 2, 3)]  # --no-progress log
    assert err[-1].startswith("jpeft train: error: NonFiniteError: step 3: the run ended with 3 consecutive "
                              "non-finite step(s)")
    assert not (hf_dir / "nan_run" / "adapter").exists()
    assert not any(n.isdigit() for n in os.listdir(hf_dir / "nan_run" / "checkpoints"))


def test_train_steps_whose_rows_hold_no_target_change_nothing(hf_dir, tmp_path, capsys):
    """Prompts longer than seq_len are cut into chunks, and a chunk of prompt tokens alone is a row
    without a target: a step drawing only such rows logged loss 0 and AdamW still moved the adapter
    by its momentum and weight decay. Such a step now leaves the adapter (and the optimizer and
    its schedule) as it was: its checkpoint equals the step before's, and the run says so."""
    from pydoc_data.topics import topics

    from jpeft.checkpoint import CheckpointManager

    cfg = _tiny_lora_run(hf_dir, tmp_path, steps=8, extra="weight_decay = 0.5\nlearning_rate = 0.05\n"
                                                         "keep_checkpoints = 10\nlog_every = 1\n")
    keys = sorted(topics)
    with open(tmp_path / "train.jsonl", "w") as f:  # prompts of a few rows, then a few target tokens each
        for k in keys[:6]:
            f.write(json.dumps({"prompt": topics[k][:60], "completion": " done."}) + "\n")
    cfg.write_text(cfg.read_text().replace("batch_size = 2", "batch_size = 1"))
    with pytest.warns(RuntimeWarning, match=r"steps \(step .*\) had a batch without a single target token"):
        assert main(["train", "--config", str(cfg), "--no-progress"]) == 0
    recs = [json.loads(x) for x in open(tmp_path / "out" / "metrics.jsonl")]
    empty = [r["step"] for r in recs if r.get("no_targets")]
    assert empty and all(r["loss"] == 0.0 for r in recs if r.get("no_targets"))
    assert len(empty) < 8  # some steps trained
    _, params = jpeft.models.from_pretrained(str(hf_dir / "tiny-llama"))
    m = CheckpointManager(tmp_path / "out" / "checkpoints", jpeft.LoraConfig(r=2, target_modules=["q_proj"]), params,
                          read_only=True)
    for s in empty:
        if s == 1:
            continue
        was, now = m.restore(s - 1).adapter, m.restore(s).adapter
        for x, y in zip(jax.tree.leaves(was), jax.tree.leaves(now)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f"step {s}")


def _without_dac_override():
    """The command prefix that runs a process without root's CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH (dropped from its capability bounding set by ``setpriv``, util-linux), so
    that file modes bind it as they bind a user's process; ``None`` where ``setpriv`` is missing or
    not allowed to drop them (a user's own process: file modes bind it already)."""
    setpriv = shutil.which("setpriv")
    drop = [setpriv, "--bounding-set=-dac_override,-dac_read_search"] if setpriv else None
    if drop is None or subprocess.run([*drop, "true"], capture_output=True).returncode != 0:
        return None
    return drop


# the tests that need file modes to bind this process: as root (CI) they run again, together, in one
# pytest without root's override (a pytest process and the hf_dir fixture cost seconds each)
_NEEDS_FILE_MODES = ("test_train_into_a_read_only_output_folder_says_so_and_loses_no_work",
                     "test_resume_from_a_checkpoint_this_process_may_not_read_names_the_file_and_keeps_it",
                     "test_checkpoints_in_a_folder_this_process_may_not_list_are_refused_by_name_when_opened")


@pytest.fixture(scope="module")
def _runs_without_dac_override(request, tmp_path_factory):
    """One pytest, in a process that cannot write into read-only folders
    (:func:`_without_dac_override`), of the tests of ``_NEEDS_FILE_MODES`` this session runs:
    ``(that pytest's output, {test name: its JUnit test case})``; ``None`` where ``setpriv`` is
    missing or not allowed to drop the capabilities."""
    drop = _without_dac_override()
    if drop is None:
        return None
    here = os.path.abspath(__file__)
    selected = {getattr(it, "originalname", it.name) for it in request.session.items
                if os.path.abspath(str(it.path)) == here}
    names = [n for n in _NEEDS_FILE_MODES if n in selected]
    tmp = tmp_path_factory.mktemp("rerun")
    env = dict(os.environ, JPEFT_TEST_DAC_DROPPED="1")
    r = subprocess.run([*drop, sys.executable, "-m", "pytest", "-n0", "-p", "no:cacheprovider", "--basetemp",
                        str(tmp / "bt"), "--junitxml", str(tmp / "junit.xml"), *(f"{here}::{n}" for n in names)],
                       env=env, cwd=os.path.dirname(os.path.dirname(here)), capture_output=True, text=True, timeout=900)
    output = (r.stdout + r.stderr)[-4000:]
    assert (tmp / "junit.xml").is_file(), output
    import xml.etree.ElementTree as ET

    return output, {c.get("name"): c for c in ET.parse(tmp / "junit.xml").iter("testcase")}


def _rerun_without_dac_override(request, name: str) -> None:
    """Checks that test ``name`` of this file passed in the pytest whose process cannot write into
    read-only folders (:func:`_runs_without_dac_override`), so CI, which runs as root, checks what
    a user's process meets. Skips only where ``setpriv`` is missing or not allowed to drop them
    (say so)."""
    if os.environ.get("JPEFT_TEST_DAC_DROPPED"):
        pytest.fail("setpriv ran, but this process still writes into read-only folders")
    runs = request.getfixturevalue("_runs_without_dac_override")
    if runs is None:
        pytest.skip("this process writes into read-only folders (root with CAP_DAC_OVERRIDE) and setpriv cannot "
                    "drop that capability here")
    output, cases = runs
    assert name in cases, output
    bad = [(x.tag, x.get("message"), (x.text or "")[-3000:]) for x in cases[name]
           if x.tag in ("failure", "error", "skipped")]
    assert not bad, (bad, output)


def _chmod_stops_writes(tmp_path) -> bool:
    """Whether a folder without write permission refuses this process (root with CAP_DAC_OVERRIDE
    writes anyway: the read-only test then runs again under setpriv, `_rerun_without_dac_override`)."""
    probe = tmp_path / "ro-probe"
    probe.mkdir()
    probe.chmod(0o555)
    try:
        (probe / "f").write_text("")
    except PermissionError:
        return True
    finally:
        probe.chmod(0o755)
    return False


def test_train_into_a_read_only_output_folder_says_so_and_loses_no_work(hf_dir, tmp_path, capsys, monkeypatch, request):
    """A read-only output folder: refused by name before training with nothing left behind. One
    whose checkpoints folder is writable (a --resume) failed with a raw PermissionError about a
    hidden temporary file; and one that became read-only before the finished adapter was written
    said "Nothing was written" only, as if the run were lost, where its last checkpoint holds it:
    the error now says so, and --resume writes the adapter without training again."""
    if not _chmod_stops_writes(tmp_path):  # root: run this test again in a pytest without the override
        _rerun_without_dac_override(request, "test_train_into_a_read_only_output_folder_says_so_and_loses_no_work")
        return
    cfg = _tiny_lora_run(hf_dir, tmp_path, steps=2)
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)

    def the_error():  # the one error line (the data's warning about long prompts comes before it)
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("jpeft train: error:")]
        assert len(lines) == 1, lines
        return lines[0]

    try:
        assert main(["train", "--config", str(cfg), "--no-progress"]) == 2
        line = the_error()
        assert line.startswith("jpeft train: error: SaveError: cannot create the checkpoint directory"), line
        assert not any(out.iterdir())
        out.chmod(0o755)
        assert main(["train", "--config", str(cfg), "--no-progress", "--max-steps", "1"]) == 0
        before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
        out.chmod(0o555)
        assert main(["train", "--config", str(cfg), "--no-progress", "--resume"]) == 2
        line = the_error()
        assert line.startswith(f"jpeft train: error: SaveError: cannot write {out / 'resolved_config.json'} "
                               "(PermissionError: Permission denied)") and f"Make {out} writable" in line, line
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
        out.chmod(0o755)

        real = jpeft.fit

        def fit_then_read_only(*a, **kw):  # the folder turns read-only while the run trains
            result = real(*a, **kw)
            out.chmod(0o555)
            return result

        monkeypatch.setattr(jpeft, "fit", fit_then_read_only)
        assert main(["train", "--config", str(cfg), "--no-progress", "--resume"]) == 2
        line = the_error()
        assert line.startswith("jpeft train: error: SaveError: cannot create a directory next to "), line
        assert (f"The trained state is not lost: checkpoint step 2 in {out / 'checkpoints'} holds it. Make {out} "
                "writable") in line and "run the same command with --resume" in line, line
        out.chmod(0o755)
        monkeypatch.setattr(jpeft, "fit", real)
        assert main(["train", "--config", str(cfg), "--no-progress", "--resume"]) == 0
        assert (out / "adapter" / "jpeft_adapter.safetensors").is_file()
    finally:
        out.chmod(0o755)


def test_resume_from_a_checkpoint_this_process_may_not_read_names_the_file_and_keeps_it(hf_dir, tmp_path, capsys,
                                                                                         request):
    """--resume from a checkpoint whose data folder or metadata file this process may not read
    (written by another user, a mode changed by hand; on several hosts, the one host that cannot
    read it): it was "corrupted or truncated (Orbax could not read it)" / "cannot read checkpoint
    metadata", with the advice to move the intact step folder away and start again from step 0.
    It is now a CheckpointUnreadableError naming the file or folder and how to give access, with no
    such advice, and ``restore_latest(fallback=True)`` no longer skips it as damaged (it resumed
    from the step before); given access, the run resumes from that step."""
    if not _chmod_stops_writes(tmp_path):  # root: run this test again in a pytest without the override
        _rerun_without_dac_override(
            request, "test_resume_from_a_checkpoint_this_process_may_not_read_names_the_file_and_keeps_it")
        return
    from jpeft.checkpoint import CheckpointManager
    from jpeft.errors import CheckpointUnreadableError

    cfg = _tiny_lora_run(hf_dir, tmp_path, steps=3)
    assert main(["train", "--config", str(cfg), "--no-progress", "--max-steps", "2"]) == 0
    _, params = jpeft.models.from_pretrained(str(hf_dir / "tiny-llama"))
    step = tmp_path / "out" / "checkpoints" / "2"
    for denied in (step / "state" / "d", step / "meta" / "metadata"):  # read by Orbax's tensorstore; by jpeft
        mode = denied.stat().st_mode
        denied.chmod(0)
        try:
            capsys.readouterr()
            assert main(["train", "--config", str(cfg), "--no-progress", "--resume"]) == 2
            line = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("jpeft train: error:")][-1]
            # nor does restore_latest(fallback=True) skip it as damaged (to step 1, setting step 2 aside later)
            m = CheckpointManager(step.parent, jpeft.LoraConfig(r=2, target_modules=["q_proj"]), params, read_only=True)
            with pytest.raises(CheckpointUnreadableError, match=f"permission denied on {re.escape(str(denied))} "):
                m.restore_latest(fallback=True)
        finally:
            denied.chmod(mode)
        assert line.startswith(f"jpeft train: error: CheckpointUnreadableError: checkpoint step 2 in {step.parent} "
                               f"cannot be read by this process: permission denied on {denied} ("), line
        assert f"keep it. Give this process read access to every file and folder under {step}" in line, line
        assert "corrupted" not in line and "move its folder" not in line, line
    r = jpeft_here(capsys, "train", "--config", cfg, "--no-progress", "--resume")
    assert r.returncode == 0 and "resumed from step 2" in r.stderr, r.stderr


def test_checkpoints_in_a_folder_this_process_may_not_list_are_refused_by_name_when_opened(tmp_path, request):
    """Checkpoints of another user's run with umask 077 (every folder drwx------), or a step folder
    whose mode was changed by hand: ``CheckpointManager(...)`` itself, reading or writing, raised a
    bare PermissionError from its check of the step names (on --resume too), before any restore
    could say CheckpointUnreadableError. It now names the folder this process may not list and how
    to give access; given access, the step restores."""
    if not _chmod_stops_writes(tmp_path):  # root: run this test again in a pytest without the override
        _rerun_without_dac_override(
            request, "test_checkpoints_in_a_folder_this_process_may_not_list_are_refused_by_name_when_opened")
        return
    from jpeft.checkpoint import CheckpointManager
    from jpeft.errors import CheckpointUnreadableError

    params = {"params": {"d": {"kernel": np.ones((8, 4), np.float32)}}}
    cfg = jpeft.LoraConfig(r=2, target_modules=["d"])
    adapter = jpeft.init(cfg, params, jax.random.key(0))
    ckpts = tmp_path / "ckpts"
    m = CheckpointManager(ckpts, cfg, params, async_save=False)
    m.save(1, adapter)
    m.close()
    for denied in (ckpts / "1", ckpts):
        denied.chmod(0o000)
        try:
            for read_only in (True, False):
                with pytest.raises(CheckpointUnreadableError, match=f"cannot be read by this process: permission denied "
                                                                    f"on {re.escape(str(denied))} "):
                    CheckpointManager(ckpts, cfg, params, read_only=read_only)
        finally:
            denied.chmod(0o755)
    m = CheckpointManager(ckpts, cfg, params, read_only=True)
    assert m.restore_latest().step == 1


def _wait_for_steps(p, metrics, n=2, timeout=240):
    """Waits until ``metrics`` (a run's metrics.jsonl) holds ``n`` records or ``p`` ended."""
    deadline = time.time() + timeout
    while time.time() < deadline and p.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= n:
            return
        time.sleep(0.02)


LONG_STEPS = 200  # the signal tests' runs: long enough that a signal reaches a process still training


@pytest.fixture(scope="module")
def long_ref(hf_dir):
    """The adapter of the uninterrupted ``write_config(steps=LONG_STEPS, save_every=0,
    eval_every=0)`` run, trained once in this process for every signal test (each compares its
    interrupted and resumed runs of that same config with it)."""
    cfg = write_config(hf_dir, "long_ref", steps=LONG_STEPS, save_every=0, eval_every=0)
    assert main(["train", "--config", str(cfg), "--no-progress"]) == 0
    return adapter_arrays(hf_dir / "long_ref" / "adapter")


def test_train_ctrl_c_or_sigterm_saves_a_checkpoint_and_resume_is_exact(hf_dir, long_ref, capsys):
    """Ctrl-C (SIGINT) and SIGTERM (what a scheduler or a spot pre-emption sends before
    SIGKILL) both finish the running step, save it and exit 130; the run resumed from that
    checkpoint ends with the uninterrupted run's adapter, bit for bit. SIGTERM used to kill the
    process at once, losing every step since the last checkpoint (here: all of them). The
    resume runs in this process through ``main``: it reads the checkpoint the interrupted
    process saved (test_train_max_steps_then_resume_equals_uninterrupted resumes in a fresh
    process)."""
    steps, ref = LONG_STEPS, long_ref
    for sig, said in ((signal.SIGINT, "Ctrl-C: saving a checkpoint"), (signal.SIGTERM, "SIGTERM: saving a checkpoint")):
        name = f"long_int_{sig.name}"
        cfg = write_config(hf_dir, name, steps=steps, save_every=0, eval_every=0)
        p = subprocess.Popen([sys.executable, "-m", "jpeft.cli", "train", "--config", str(cfg), "--no-progress"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        _wait_for_steps(p, hf_dir / name / "metrics.jsonl")
        p.send_signal(sig)
        out, err = p.communicate(timeout=240)
        assert p.returncode == 130, err
        assert said in err and "interrupted at step" in err
        stopped = int(err.split("interrupted at step ")[1].split(";")[0])
        assert 2 <= stopped < steps
        assert (hf_dir / name / "checkpoints" / str(stopped)).is_dir()
        r = jpeft_here(capsys, "train", "--config", cfg, "--resume", "--no-progress")
        assert r.returncode == 0, r.stderr
        assert f"resumed from step {stopped}" in r.stderr
        got = adapter_arrays(hf_dir / name / "adapter")
        for k in ref:
            np.testing.assert_array_equal(got[k], ref[k], err_msg=f"{sig.name}: {k}")


@pytest.mark.parametrize("sig,who", [("SIGTERM", 0), ("SIGINT", 1)])
def test_a_signal_to_one_of_two_processes_stops_both_at_one_step_and_resume_matches(hf_dir, long_ref, capsys, sig, who):
    """Two processes over 127.0.0.1, SIGTERM sent to process 0 only (one host pre-empted), or
    Ctrl-C to process 1 only: both processes finish the same step, save one checkpoint together
    and exit 130; resumed, the run ends with the 1-device run's adapter (|diff| <= 1e-5 + 1e-4
    |x|: reduction order). Before, JAX's pre-emption notifier swallowed the SIGTERM (the run
    trained on to its end, to be killed by the SIGKILL that follows), and the Ctrl-C stopped one
    process without a checkpoint while both hung (over 200 s)."""
    import socket

    steps = LONG_STEPS
    name = f"term_2p_{sig}"
    cfg = write_config(hf_dir, name, steps=steps, save_every=0, eval_every=0)
    env1 = dict(ENV, XLA_FLAGS=f"{ENV.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=1")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-m", "jpeft.cli", "train", "--config", str(cfg), "--no-progress",
                               "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env1)
             for i in range(2)]
    try:
        _wait_for_steps(procs[0], hf_dir / name / "metrics.jsonl", n=3)
        procs[who].send_signal(getattr(signal, sig))
        outs = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [130, 130], "\n----\n".join(o[-3000:] for o in outs)
    said = {"SIGTERM": "SIGTERM: saving a checkpoint", "SIGINT": "Ctrl-C: saving a checkpoint"}[sig]
    assert said in outs[who] and "interrupted at step" in outs[0]
    if who:
        assert "another process of this job got a signal: saving a checkpoint at step" in outs[0]
    stopped = int(outs[0].split("interrupted at step ")[1].split(";")[0])
    assert 3 <= stopped < steps
    saved = sorted(int(n) for n in os.listdir(hf_dir / name / "checkpoints") if n.isdigit())
    assert saved == [stopped]
    r = jpeft_here(capsys, "train", "--config", cfg, "--resume", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert f"resumed from step {stopped}" in r.stderr
    ref, got = long_ref, adapter_arrays(hf_dir / name / "adapter")  # the 1-device run of the same config
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-4, atol=1e-5, err_msg=k)


_SLOW_LOAD = """
import sys, time
import jpeft.cli._trainer as T
from jpeft.cli import process_main as main
real = T.load_folder
def slow(*a, **k):
    print("jpeft-test: loading the model", file=sys.stderr, flush=True)
    time.sleep(20)
    return real(*a, **k)
T.load_folder = slow
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("to", ["both", "process 1", "process 0"])
def test_sigterm_while_two_processes_load_the_model_stops_both(hf_dir, tmp_path, to):
    """SIGTERM (a scheduler stopping the job) sent to both processes of a run while they load the
    model, before training starts: JAX's pre-emption notifier, installed by
    jax.distributed.initialize, swallowed it and the run went on to train to its end (exit 0,
    until the SIGKILL that follows). Both now stop as on Ctrl-C: exit 130 with one line, nothing
    written to the output folder. SIGTERM to process 1 alone: process 0 met a closed connection in
    the data agreement, printed JAX's raw traceback, then waited in jax.distributed's shutdown for
    the heartbeat timeout (about 100 s) and aborted (SIGABRT, a C++ stack dump). SIGTERM to
    process 0 alone: process 0 ended at once, and JAX's coordination client then aborted process 1
    (SIGABRT, "Terminating process because the JAX distributed service detected fatal errors" and a
    C++ stack). The signalled process now tells the other through JAX's coordination service
    (jpeft.distributed.leave_job_now), which stops within seconds, still loading the model, with
    one DistributedError line naming it (exit 2)."""
    import socket

    name = f"term_2p_loading_{to.replace(' ', '')}"
    cfg = write_config(hf_dir, name, steps=3, save_every=1, eval_every=0)
    env1 = dict(ENV, XLA_FLAGS=f"{ENV.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=1")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    errs = [tmp_path / f"err{i}" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", _SLOW_LOAD, "train", "--config", str(cfg), "--no-progress",
                               "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                              stdout=subprocess.DEVNULL, stderr=open(errs[i], "w"), env=env1)
             for i in range(2)]
    try:
        deadline = time.time() + 120
        while not all("jpeft-test: loading" in e.read_text() for e in errs):
            assert time.time() < deadline and all(p.poll() is None for p in procs), [e.read_text()[-2000:] for e in errs]
            time.sleep(0.2)
        for p in procs if to == "both" else [procs[int(to[-1])]]:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=90)  # process 0 alone used to wait out JAX's heartbeat timeout (~100 s), then abort
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    outs = [e.read_text().replace("jpeft-test: loading the model", "") for e in errs]
    if to == "both":
        assert [p.returncode for p in procs] == [130, 130], "\n----\n".join(o[-3000:] for o in outs)
        assert all(error_line(o) == "jpeft train: interrupted" for o in outs)
    else:  # the signalled process ends as on Ctrl-C; the other with one line naming it (it still loads the model)
        k = int(to[-1])
        assert [p.returncode for p in procs] == ([130, 2] if k == 0 else [2, 130]), "\n----\n".join(o[-3000:] for o in outs)
        assert error_line(outs[k]) == "jpeft train: interrupted"
        assert error_line(outs[1 - k]).startswith(f"jpeft train: error: DistributedError: process {k} of this job stopped: "
                                                  "interrupted (Ctrl-C or SIGTERM); this process stops too"), outs[1 - k]
    assert not (hf_dir / name / "checkpoints").exists() and not (hf_dir / name / "adapter").exists()


_STOP_ALONE = """
import os, sys
import jpeft.cli._trainer as T
from jpeft.cli import process_main as main
from jpeft.errors import InputValidationError
if os.environ.get("JPEFT_TEST_STOP") == "final_save":  # the disk fills as process 0 writes the finished adapter
    import jpeft.io
    def full(path, data):  # its first array read (a gather process 1 takes part in), then the disk is full
        for _ in data:
            raise OSError(28, "No space left on device")
    jpeft.io.write_file = full
if os.environ.get("JPEFT_TEST_STOP") == "bad_batch":  # the third batch of this process's rows is refused
    real, seen = T.check_tokens, []
    def check(*a, **k):
        seen.append(1)
        if len(seen) == 3:
            raise InputValidationError("token id 999 is out of range (this host's rows only)")
        return real(*a, **k)
    T.check_tokens = check
if os.environ.get("JPEFT_TEST_STOP") == "resume_unreadable":  # this host cannot read the checkpoint
    import jpeft.checkpoint as C
    from jpeft.errors import CheckpointError
    def unreadable(*a, **k):
        raise CheckpointError("checkpoint step 2 cannot be read on this host (PermissionError: Permission denied)")
    C.CheckpointManager.restore_latest = unreadable
if os.environ.get("JPEFT_TEST_STOP") == "killed":  # killed without a word at its third batch (out of memory, SIGKILL)
    real, seen = T.check_tokens, []
    def check(*a, **k):
        seen.append(1)
        if len(seen) == 3:
            os._exit(9)
        return real(*a, **k)
    T.check_tokens = check
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("case", ["final_save", "bad_batch", "killed", "resume_unreadable"])
def test_one_of_two_processes_stopping_alone_ends_both_with_one_line(hf_dir, capsys, case):
    """One process of a two-process run stops with an error the other does not share: the
    finished adapter's write failing on process 0 (a full disk; process 0 alone writes it), or
    a batch of process 1's own rows refused in the middle of training. Before, the failing
    process printed its error and then waited in jax.distributed's shutdown, and the other
    waited for it in the final barrier or in the next step's collectives: both hung for
    minutes (over 200 s measured), to be aborted by JAX with a C++ stack. Now the failing
    process says why through JAX's coordination service and ends with its own line (process
    0: the SaveError that says --resume recovers the run); the other ends within seconds with
    one DistributedError line naming it; no adapter is left half-written, and --resume then
    writes the finished adapter from the last checkpoint. A process killed without a word
    (``killed``) left the other with JAX's raw traceback of a failed gloo all-reduce and then an
    abort at JAX's heartbeat timeout (about 100 s); it now ends with one DistributedError line. A
    ``--resume`` whose checkpoint process 1 cannot read (``resume_unreadable``): process 0's read,
    which every process takes part in, failed on the closed connection and was reported as
    "checkpoint step 2 ... is corrupted or truncated", telling the user to move the intact
    checkpoint out of the folder and start again from step 0; it is now a DistributedError that
    says to keep it. Where root can drop its override of file modes (CI), process 1 runs without it
    and really may not read the checkpoint's data folder: its own error said "corrupted or
    truncated" with the same advice, and is now a CheckpointUnreadableError naming the folder."""
    import socket

    name = f"stop_alone_{case}"
    cfg = write_config(hf_dir, name, steps=3 if case == "final_save" else 6, save_every=0, eval_every=0)
    who = 0 if case == "final_save" else 1
    resume, prefix, denied = [], [[], []], None
    if case == "resume_unreadable":  # a checkpoint at step 2 (one process), resumed by two
        assert jpeft_here(capsys, "train", "--config", cfg, "--no-progress", "--max-steps", "2").returncode == 0
        resume = ["--resume"]
        if _without_dac_override() is not None:  # root (CI): process 1 alone may not read its data, for real
            prefix[1] = _without_dac_override()
            denied = hf_dir / name / "checkpoints" / "2" / "state" / "d"
            denied.chmod(0)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env1 = dict(ENV, XLA_FLAGS=f"{ENV.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=1")
    procs = [subprocess.Popen([*prefix[i], sys.executable, "-c", _STOP_ALONE, "train", "--config", str(cfg),
                               "--no-progress", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                               "--process-id", str(i), *resume], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, env=dict(env1, JPEFT_TEST_STOP=case) if i == who and denied is None else env1)
             for i in range(2)]
    try:
        outs = [p.communicate(timeout=120)[1] for p in procs]  # both used to hang past 200 s
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        if denied is not None:
            denied.chmod(0o755)
    assert [p.returncode for p in procs] == ([2, 9] if case == "killed" else [2, 2]), "\n----\n".join(
        o[-3000:] for o in outs)
    if case == "killed":
        lines = outs[0].splitlines()
        assert lines[-1].startswith("jpeft train: error: DistributedError: an operation across the processes of this "
                                    "job failed (") and "another process left the job (killed, crashed" in lines[-1], outs[0]
        # the killed process said nothing but the data's warnings (its completions run past seq_len)
        assert "Traceback" not in outs[0] and "Traceback" not in outs[1] and "error" not in outs[1], outs[1]
        return
    if case == "resume_unreadable" and denied is not None:  # says what it found, and keeps the checkpoint
        mine = [ln for ln in outs[1].splitlines() if ln.startswith("jpeft train: error:")]
        assert len(mine) == 1 and mine[0].startswith(
            f"jpeft train: error: CheckpointUnreadableError: checkpoint step 2 in {denied.parents[2]} cannot be read by "
            f"this process: permission denied on {denied} ("), outs[1]
        assert "move its folder" not in mine[0] and "corrupted" not in mine[0], mine[0]
    elif case == "resume_unreadable":
        assert outs[1].splitlines()[-1].startswith("jpeft train: error: CheckpointError: checkpoint step 2 cannot be "
                                                   "read on this host"), outs[1]
    if case == "resume_unreadable":
        line = outs[0].splitlines()[-1]  # the closed connection of the read, or process 1's announcement
        assert line.startswith("jpeft train: error: DistributedError: ") and "corrupted" not in line, outs[0]
        assert "Traceback" not in outs[0] and (hf_dir / name / "checkpoints" / "2").is_dir()
        return
    for o in outs:  # one error line each (process 0's status and step lines come before it), no traceback
        lines = o.splitlines()
        assert [ln for ln in lines if ln.startswith("jpeft train: error:")] == lines[-1:] and "Traceback" not in o, o
    mine, other = outs[who].splitlines()[-1], outs[1 - who].splitlines()[-1]
    if case == "final_save":
        assert mine.startswith(f"jpeft train: error: SaveError: saving to {hf_dir / name / 'adapter'} failed: [Errno 28] "
                               "No space left on device. The previous contents of "), mine
        assert "The trained state is not lost: checkpoint step 3 in " in mine
        assert "run the same command with --resume" in mine
        # process 1 took part in every gather of the write (process 0 read on after the failure), then stopped
        assert other.startswith("jpeft train: error: DistributedError: process 0 of this job stopped: SaveError: saving "
                                "to ") and "this process stops too" in other, other
        assert sorted(os.listdir(hf_dir / name)) == ["checkpoints", "metrics.jsonl", "resolved_config.json"]
        r = jpeft_here(capsys, "train", "--config", cfg, "--no-progress", "--resume")
        assert r.returncode == 0, r.stderr
        assert "resumed from step 3" in r.stderr and (hf_dir / name / "adapter" / "jpeft_adapter.safetensors").is_file()
    else:
        assert mine == "jpeft train: error: InputValidationError: token id 999 is out of range (this host's rows only)"
        assert other.startswith("jpeft train: error: DistributedError: process 1 of this job stopped: "
                                "InputValidationError: token id 999 is out of range (this host's rows only); this "
                                "process stops too"), other
        assert not (hf_dir / name / "adapter").exists()


def _metrics(folder):
    return [json.loads(x) for x in open(folder / "metrics.jsonl")]


def test_train_on_a_mesh_and_on_two_processes_matches_one_device(hf_dir, capsys):
    """The same TOML on 1 device, on 1 process x 4 devices (data=2, fsdp=2), on 1 process x 4
    devices (fsdp=2, tensor=2) and, resumed from the 1-device run's checkpoint at step 2, on 2
    processes x 2 devices over 127.0.0.1 (the multi-host run writes the final adapter): the
    same adapter (|diff| <= 1e-5 + 1e-4 |x|; measured <= 2.2e-6, reduction order) and the
    same eval loss (rtol 1e-5). The LoRA run also trains a copy of lm_head (``modules_to_save``)
    and embedding rows (``trainable_token_indices``), adapter leaves that are not LoRA factors,
    so their sharding, resharded resume and gathering are checked on every layout too."""
    import socket

    cfg = write_config(hf_dir, "mesh_ref", steps=4, save_every=2, eval_every=2)
    cfg.write_text(cfg.read_text().replace(
        'target_modules = ["q_proj", "v_proj", "down_proj"]',
        'target_modules = ["q_proj", "v_proj", "down_proj"]\nmodules_to_save = ["lm_head"]\n'
        'trainable_token_indices = [5, 7, 9]'))
    assert main(["train", "--config", str(cfg), "--no-progress"]) == 0
    assert main(["train", "--config", str(cfg), "--no-progress", "--output-dir", str(hf_dir / "mesh_2p"),
                 "--max-steps", "2"]) == 0
    assert "1 device;" in capsys.readouterr().err
    env4 = dict(ENV, XLA_FLAGS=f"{ENV.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4")
    run = ["train", "--config", cfg, "--no-progress", "--output-dir"]
    r4d, rtp, r3 = jpeft_runs(env4, [*run, hf_dir / "mesh_4d", "--set", "mesh.fsdp=2", "--set", "mesh.data=2"],
                              [*run, hf_dir / "mesh_tp", "--set", "mesh.fsdp=2", "--set", "mesh.tensor=2"],
                              [*run, hf_dir / "mesh_bad3", "--set", "mesh.data=3"])
    assert r4d.returncode == 0, r4d.stderr
    assert "mesh data=2 x fsdp=2 over 1 process(es)" in r4d.stderr
    assert rtp.returncode == 0, rtp.stderr
    assert "mesh data=1 x fsdp=2 x tensor=2 over 1 process(es)" in rtp.stderr
    assert r3.returncode == 2
    assert "= 3 devices, but this job has 4; jpeft train uses every device" in error_line(r3.stderr)
    env2 = dict(ENV, XLA_FLAGS=f"{ENV.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2")

    def two_processes(out, extra=((), ())):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        procs = [subprocess.Popen([sys.executable, "-m", "jpeft.cli", "train", "--config", str(cfg), "--no-progress",
                                   "--output-dir", str(hf_dir / out), "--resume", "--coordinator",
                                   f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i), *extra[i]],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env2)
                 for i in range(2)]
        try:
            return procs, [p.communicate(timeout=300)[1] for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()

    procs, outs = two_processes("mesh_2p")
    assert all(p.returncode == 0 for p in procs), "\n----\n".join(o[-3000:] for o in outs)
    assert "resumed from step 2" in outs[0] and "mesh data=4 x fsdp=1 over 2 process(es)" in outs[0]
    assert "resumed from step 2" not in outs[1]  # status lines come from process 0 only
    ref = adapter_arrays(hf_dir / "mesh_ref" / "adapter")
    ref_eval = [m["eval_loss"] for m in _metrics(hf_dir / "mesh_ref") if "eval_loss" in m]
    assert len(ref_eval) == 2 and any(np.abs(ref[k]).max() > 0 for k in ref if k.endswith("lora_B"))
    assert any(k.startswith("lm_head/") for k in ref) and any(k.startswith("model/embed_tokens/") for k in ref)
    for run in ("mesh_4d", "mesh_tp", "mesh_2p"):
        got = adapter_arrays(hf_dir / run / "adapter")
        assert sorted(got) == sorted(ref)
        for k in ref:
            np.testing.assert_allclose(got[k], ref[k], rtol=1e-4, atol=1e-5, err_msg=f"{run}: {k}")
        evals = [m["eval_loss"] for m in _metrics(hf_dir / run) if "eval_loss" in m]
        np.testing.assert_allclose(evals, ref_eval, rtol=1e-5, err_msg=run)
    assert sorted(n for n in os.listdir(hf_dir / "mesh_2p" / "checkpoints") if not n.startswith(".")) == ["2", "4"]
    # QLoRA over 2 processes x 2 devices, fsdp=4: each process reads and quantizes only its own shards of the base
    # (it read and quantized the whole model, then sharded it): the adapter and eval losses of one device
    nf4 = ("--set", "quantize=nf4", "--set", "train.steps=2", "--set", "train.eval_every=2", "--set", "train.save_every=0")
    assert main(["train", "--config", str(cfg), "--no-progress", "--output-dir", str(hf_dir / "nf4_ref"), *nf4]) == 0
    procs, outs = two_processes("mesh_2p_nf4", ((*nf4, "--set", "mesh.fsdp=4"),) * 2)
    assert all(p.returncode == 0 for p in procs), "\n----\n".join(o[-3000:] for o in outs)
    assert "mesh data=1 x fsdp=4 over 2 process(es)" in outs[0]
    ref, got = adapter_arrays(hf_dir / "nf4_ref" / "adapter"), adapter_arrays(hf_dir / "mesh_2p_nf4" / "adapter")
    assert sorted(got) == sorted(ref) and any(np.abs(ref[k]).max() > 0 for k in ref if k.endswith("lora_B"))
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-4, atol=1e-5, err_msg=k)
    evals = [[m["eval_loss"] for m in _metrics(hf_dir / r) if "eval_loss" in m] for r in ("nf4_ref", "mesh_2p_nf4")]
    assert len(evals[0]) == 1 and evals[0][0] != pytest.approx(ref_eval[0], rel=1e-4)  # the quantized base's loss
    np.testing.assert_allclose(evals[1], evals[0], rtol=1e-5)
    # processes started with different settings would train a mix of two runs: refused by name on every process
    procs, outs = two_processes("mesh_2p_seed", ((), ("--set", "seed=8")))
    assert [p.returncode for p in procs] == [2, 2], "\n----\n".join(o[-3000:] for o in outs)
    assert all("process(es) [1] of this job were given different settings than process 0" in error_line(o)
               for o in outs)
    assert not (hf_dir / "mesh_2p_seed" / "adapter").exists()
    # a tensor axis across processes leaves the batch rows nowhere to go: a one-line error, not a traceback
    procs, outs = two_processes("mesh_2p_tp", (("--set", "mesh.tensor=4"),) * 2)
    assert [p.returncode for p in procs] == [2, 2], "\n----\n".join(o[-3000:] for o in outs)
    assert all("data x fsdp = 1 must be a multiple of the 2 processes" in error_line(o) for o in outs)
    capsys.readouterr()
    assert main(["train", "--config", str(cfg), "--output-dir", str(hf_dir / "mesh_bad"), "--set", "mesh.fsdp=2"]) == 2
    assert "[mesh] data=0, fsdp=2, tensor=1 needs 2 devices, but this run has 1" in error_line(capsys.readouterr().err)


@pytest.mark.parametrize("case", ["max_steps", "resume", "own_folder", "locked", "apart", "devices", "no_config",
                                  "devices_no_config", "model", "eval"])
def test_two_processes_with_different_max_steps_are_refused_not_left_waiting(hf_dir, case):
    """--max-steps and --resume are command-line options outside the resolved config: processes
    started with different --max-steps used to pass the agreement check, and the one stopping
    first left the other waiting in the next step's collectives (a hang, then an abort with a C++
    stack); with checkpoints in the output folder, the process without --resume refused alone
    and left the one with it waiting in the check. Refused by name on every process first. A
    process failing a check of its own host's files (``own_folder``) tells the others at the data
    agreement, which stop with an error naming it. Only process 0 takes the output folder's
    writer lock: refused it (``locked``: another run holds it), it used to stop alone while
    process 1 waited in the first step's collectives forever; every process now stops naming
    the lock. Processes whose output folders are not one shared folder (``apart``: each its own,
    as on hosts without a shared disk) trained until the first checkpoint and waited there forever
    (Orbax writes a checkpoint with every process into one step folder; SIGTERM did not stop
    them); every process now stops before training, naming the processes that do not see
    process 0's folder. Processes holding different numbers of devices (``devices``: 1 and 2)
    failed in the first agreement with JAX's bare ValueError about a reshape; refused by name. A
    process whose --config is missing (``no_config``) joins the job first and tells the others at
    the settings agreement. Both at once (``devices_no_config``): process 0 stopped at the device
    check, before that agreement, and process 1 waited in it for ever; it stops too. Hosts whose
    copies of the model folder hold different weights (``model``: the same architecture, one
    weight changed; the folder's path is not a setting the processes must share) trained a mix
    of the two models without a word, each process reading its own shards from its own copy (a
    2-process fsdp=2 run ended 3e-2 away from the one-device adapter); refused by name. Hosts
    holding different files at the same ``data.eval`` path (``eval``: the path, a setting every
    process shares, is ``/proc/self/cwd/...``, each process started in another folder holding its
    own copy; one line changed) trained to the end without a word, each evaluating its own file;
    refused by name."""
    import fcntl
    import socket

    name = f"mesh_2p_{case}"
    cfg = write_config(hf_dir, name, steps=4, save_every=0, eval_every=0)
    cwds = [None, None]
    if case == "eval":  # one path naming each process's own file: the file in the folder it was started in
        cwds = [hf_dir / f"{name}_host{i}" for i in range(2)]
        lines = (hf_dir / "eval.jsonl").read_text().splitlines(keepends=True)
        for i, folder in enumerate(cwds):
            folder.mkdir(exist_ok=True)
            (folder / "eval.jsonl").write_text("".join(lines[:-1]) + ('{"text": "another host\'s line"}\n' if i else lines[-1]))
    if case == "resume":  # a folder with a checkpoint step (never read: the check comes first)
        (hf_dir / name / "checkpoints" / "1").mkdir(parents=True)
    env1 = dict(ENV, XLA_FLAGS=f"{ENV.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=1")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    extra = {"max_steps": (["--max-steps", "2"], []), "resume": (["--resume"], []),
             # the output folder may differ per host; process 1's holds a finished adapter, so it refuses alone
             # after the settings agreement: process 0 used to wait for it in the data agreement until JAX gave up
             "own_folder": (["--output-dir", str(hf_dir / "own_0")], ["--output-dir", str(hf_dir / name)]),
             "locked": ([], []),
             "apart": (["--output-dir", str(hf_dir / "apart_0")], ["--output-dir", str(hf_dir / "apart_1")]),
             "devices": ([], []),
             # process 1's --config is missing on its host: it used to stop before joining the job, and process 0
             # waited in jax.distributed.initialize for 5 minutes, then aborted with a C++ stack (rc 134)
             "no_config": ([], ["--config", str(hf_dir / "missing.toml")]),
             "devices_no_config": ([], ["--config", str(hf_dir / "missing.toml")]),
             # process 1's host holds another copy of the model: the same files, one tensor changed
             "model": ([], ["--set", f"model={hf_dir / 'tiny-llama-other'}"]),
             "eval": (["--set", "data.eval=/proc/self/cwd/eval.jsonl"],) * 2}[case]
    if case == "model" and not (hf_dir / "tiny-llama-other").exists():
        from safetensors.numpy import load_file, save_file

        shutil.copytree(hf_dir / "tiny-llama", hf_dir / "tiny-llama-other")
        weights = load_file(hf_dir / "tiny-llama-other" / "model.safetensors")
        weights["model.layers.1.mlp.down_proj.weight"] = weights["model.layers.1.mlp.down_proj.weight"] + 0.5
        save_file(weights, hf_dir / "tiny-llama-other" / "model.safetensors", metadata={"format": "pt"})
    if case == "own_folder":
        (hf_dir / name / "adapter").mkdir(parents=True)
    env2 = dict(ENV, XLA_FLAGS=f"{ENV.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2")
    held = None
    if case == "locked":  # another run's writer lock on the output folder, held by this test process
        (hf_dir / name / "checkpoints").mkdir(parents=True)
        held = open(hf_dir / name / "checkpoints" / ".jpeft-writer.lock", "a+b")
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    procs = [subprocess.Popen([sys.executable, "-m", "jpeft.cli", "train", "--config", str(cfg), "--no-progress",
                               "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i),
                               *extra[i]], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env2 if case.startswith("devices") and i == 1 else env1, cwd=cwds[i])
             for i in range(2)]
    try:
        outs = [p.communicate(timeout=150 if case != "locked" else 90)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        if held is not None:
            held.close()
    assert [p.returncode for p in procs] == [2, 2], "\n----\n".join(o[-3000:] for o in outs)
    if case == "locked":
        assert "another run (a jpeft train, or a program saving checkpoints) is writing into" in error_line(outs[0])
        assert "process(es) [0] of this job could not take the writer lock of the output folder" in error_line(outs[1])
        assert not (hf_dir / name / "metrics.jsonl").exists() and not (hf_dir / name / "adapter").exists()
        return
    if case == "devices":
        assert all("the processes of this job hold different numbers of devices (process 0: 1, process 1: 2)"
                   in error_line(o) for o in outs)
        return
    if case == "devices_no_config":
        assert "different numbers of devices (process 0: 1, process 1: 2)" in error_line(outs[0])
        assert "missing.toml' does not exist" in error_line(outs[1])
        return
    if case == "apart":
        assert all("process(es) [1] of this job do not see process 0's output folder" in error_line(o) for o in outs)
        assert not any((hf_dir / d / n).exists() for d in ("apart_0", "apart_1") for n in ("metrics.jsonl", "adapter"))
        assert not (hf_dir / "apart_0" / ".jpeft-shared-output-check").exists()
        return
    if case == "no_config":
        assert "process(es) [1] of this job could not read or resolve their config" in error_line(outs[0])
        assert "missing.toml' does not exist" in error_line(outs[1])
        assert not (hf_dir / name / "checkpoints").exists()
        return
    if case == "model":
        assert all("process(es) [1] of this job were given different model weights than process 0 (the safetensors "
                   "files of the model folder" in error_line(o) for o in outs)
        assert not (hf_dir / name / "metrics.jsonl").exists() and not (hf_dir / name / "adapter").exists()
        return
    if case == "eval":
        assert all("process(es) [1] of this job were given different evaluation data than process 0 (the data.eval "
                   "file" in error_line(o) for o in outs)
        assert not (hf_dir / name / "metrics.jsonl").exists() and not (hf_dir / name / "adapter").exists()
        return
    if case == "own_folder":
        assert "process(es) [1] of this job stopped before training with an error of their own" in error_line(outs[0])
        assert "holds the finished adapter of an earlier run" in error_line(outs[1])
        assert not (hf_dir / name / "checkpoints").exists() and not (hf_dir / "own_0").exists()
        return
    assert all("were given different command-line options than process 0 (--resume and --max-steps)" in error_line(o)
               for o in outs)
    assert case == "resume" or not (hf_dir / name / "checkpoints").exists()



def test_join_timeout_ends_a_process_whose_peers_never_join_within_seconds(hf_dir, capsys):
    """The join's 300 s timeout had no ``jpeft train`` option: process 0 of a job whose process 1
    was never started (or was given another port) waited 5 minutes for the one line saying so.
    ``--join-timeout 3`` ends it with that line after 3 s; a timeout that is not positive is
    refused before joining."""
    import socket

    cfg = write_config(hf_dir, "join_alone", steps=4, save_every=0, eval_every=0)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    join = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "0"]
    r = jpeft_here(capsys, "train", "--config", cfg, "--no-progress", *join, "--join-timeout", "0")
    assert r.returncode == 2
    assert "ConfigError: --join-timeout must be a positive number of seconds, found 0." in error_line(r.stderr)
    p = jpeft_cmd("train", "--config", cfg, "--no-progress", *join, "--join-timeout", "3", timeout=120)
    assert p.returncode == 2, p.stderr[-3000:]
    assert error_line(p.stderr).startswith(
        "jpeft train: error: DistributedError: not every process of this job joined it within --join-timeout "
        f"= 3 s (process 0 of 2, coordinator 127.0.0.1:{port})"), p.stderr[-3000:]
    assert not (hf_dir / "join_alone").exists()

# ------------------------------------------------------------------------- eval/export/merge
def _torch_loss(model, rows, mask):
    import torch

    with torch.no_grad():
        logits = model(torch.tensor(rows, dtype=torch.long)).logits.float()
    lp = torch.log_softmax(logits[:, :-1], -1)
    nll = -lp.gather(-1, torch.tensor(rows[:, 1:], dtype=torch.long)[..., None])[..., 0]
    w = torch.tensor(mask[:, 1:], dtype=torch.float32)
    return float((nll * w).sum() / w.sum()), logits


def test_train_and_eval_a_bfloat16_base(hf_dir, capsys):
    """train.dtype = "bfloat16" (eval/serve --dtype): the base computes and is stored in bf16
    (half its memory: every command loaded it in float32), the adapter and the loss stay float32;
    losses follow the float32 run's within bf16 rounding; the dtype cannot change on resume."""
    cfg = write_config(hf_dir, "bf16_run", steps=4, save_every=2, eval_every=0)
    ref = write_config(hf_dir, "f32_run", steps=4, save_every=0, eval_every=0)
    assert jpeft_here(capsys, "train", "--config", ref, "--no-progress").returncode == 0
    r = jpeft_here(capsys, "train", "--config", cfg, "--no-progress", "--set", "train.dtype=bfloat16")
    assert r.returncode == 0, r.stderr
    got = adapter_arrays(hf_dir / "bf16_run" / "adapter")
    assert got and all(v.dtype == np.float32 for v in got.values())
    losses = [[m["loss"] for m in _metrics(hf_dir / run) if "loss" in m] for run in ("f32_run", "bf16_run")]
    assert len(losses[1]) == 4 and losses[0] != losses[1]  # bf16 really ran
    np.testing.assert_allclose(losses[1], losses[0], rtol=2e-2)
    r = jpeft_here(capsys, "train", "--config", cfg, "--no-progress", "--resume", "--set", "train.steps=6")
    assert r.returncode == 2 and "train.dtype" in error_line(r.stderr)
    evals = []
    for dt in ("float32", "bfloat16"):
        r = jpeft_here(capsys, "eval", "--model", hf_dir / "tiny-llama", "--data", hf_dir / "notes.txt", "--seq-len", 32,
                       "--json", "--dtype", dt)
        assert r.returncode == 0, r.stderr
        evals.append(json.loads(r.stdout)["loss"])
    assert evals[0] != evals[1] and abs(evals[1] - evals[0]) < 2e-2 * evals[0]
    r = jpeft_here(capsys, "train", "--config", cfg, "--no-progress", "--set", "train.dtype=float16")
    assert r.returncode == 2 and 'train.dtype must be "float32" or "bfloat16"' in error_line(r.stderr)


def test_an_adapter_of_a_bfloat16_run_is_read_onto_the_float32_base_and_back(hf_dir, capsys):
    """The base fingerprint an adapter or checkpoint keeps holds the dtype the base was loaded in:
    a train.dtype = "bfloat16" run's adapter was refused by eval (float32 by default), merge and
    export (no --dtype) as "saved for a different base model", and eval --dtype bfloat16 refused a
    float32 run's, though --model named the folder it was trained on. Another base is still refused."""
    cfg = write_config(hf_dir, "bf16_read", steps=2, save_every=2, eval_every=0)
    assert jpeft_here(capsys, "train", "--config", cfg, "--no-progress", "--set", "train.dtype=bfloat16").returncode == 0
    run = hf_dir / "bf16_read"
    losses = []
    for target, dt in ((run / "adapter", "float32"), (run / "checkpoints" / "2", "float32"), (run / "adapter", "bfloat16")):
        r = jpeft_here(capsys, "eval", "--model", hf_dir / "tiny-llama", "--adapter", target, "--data",
                       hf_dir / "notes.txt", "--seq-len", 32, "--json", "--dtype", dt)
        assert r.returncode == 0, r.stderr
        losses.append(json.loads(r.stdout)["loss"])
    assert losses[0] == losses[1] and abs(losses[2] - losses[0]) < 2e-2 * losses[0]
    for cmd in ("merge", "export"):
        r = jpeft_here(capsys, cmd, "--model", hf_dir / "tiny-llama", "--adapter", run / "adapter", "--out",
                       hf_dir / f"bf16_read_{cmd}")
        assert r.returncode == 0, r.stderr
    other = hf_dir / "bf16_read_other"  # another base (one more vocabulary row) is still refused
    other.mkdir()
    conf = json.loads((hf_dir / "tiny-llama" / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(dict(conf, vocab_size=conf["vocab_size"] + 1)))
    from transformers import AutoConfig, AutoModelForCausalLM
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(other)).save_pretrained(other)
    r = jpeft_here(capsys, "export", "--model", other, "--adapter", run / "adapter", "--out", hf_dir / "bf16_read_x")
    assert r.returncode == 2 and "saved for a different base model" in error_line(r.stderr)


def test_eval_of_a_prompt_tuning_adapter_names_its_packing_option(hf_dir, capsys):
    """eval's default --packing documents cannot run a prompt-tuning adapter (virtual tokens once
    per row): the error names eval's --packing stream (the model's error named train's [data]
    packing), and --packing stream evaluates it."""
    import jax
    import jax.numpy as jnp
    import jpeft
    from jpeft.models import from_pretrained
    model, params = from_pretrained(str(hf_dir / "tiny-llama"))
    cfg = jpeft.PromptTuningConfig(num_virtual_tokens=4)
    adapter = jpeft.init(cfg, params, jax.random.key(0), model, jnp.ones((1, 4), jnp.int32))
    jpeft.save_adapter(hf_dir / "pt_adapter", cfg, adapter, params=params)
    args = ["eval", "--model", hf_dir / "tiny-llama", "--adapter", hf_dir / "pt_adapter", "--data", hf_dir / "notes.txt",
            "--seq-len", 32, "--json"]
    r = jpeft_here(capsys, *args)
    assert r.returncode == 2 and "pass --packing stream" in error_line(r.stderr)
    r = jpeft_here(capsys, *args, "--packing", "stream")
    assert r.returncode == 0, r.stderr


def test_train_with_scan_layers_saves_a_per_layer_adapter(hf_dir, capsys):
    """train.scan_layers trains the layer-scanned model; the finished adapter is written per
    layer, so `jpeft eval --adapter` on the ordinary (unrolled) model reads it."""
    cfg = write_config(hf_dir, "scan_run", steps=4, save_every=2)
    r = jpeft_here(capsys, "train", "--config", cfg, "--no-progress", "--set", "train.scan_layers=true")
    assert r.returncode == 0, r.stderr
    got = adapter_arrays(hf_dir / "scan_run" / "adapter")
    ref = adapter_arrays(hf_dir / "full_run" / "adapter") if (hf_dir / "full_run").exists() else None
    assert len(got) == 12 and any("layers_1" in k for k in got)
    if ref is not None:
        assert sorted(got) == sorted(ref) and all(got[k].shape == ref[k].shape for k in ref)
    assert any(np.abs(got[k]).max() > 0 for k in got if k.endswith("lora_B"))  # it did train
    losses = [json.loads(x)["loss"] for x in open(hf_dir / "scan_run" / "metrics.jsonl") if '"loss"' in x]
    assert len(losses) == 4 and all(np.isfinite(losses))
    base = jpeft_here(capsys, "eval", "--model", hf_dir / "tiny-llama", "--data", hf_dir / "notes.txt", "--seq-len", 32,
                      "--json")
    r = jpeft_here(capsys, "eval", "--model", hf_dir / "tiny-llama", "--adapter", hf_dir / "scan_run" / "adapter",
                   "--data", hf_dir / "notes.txt", "--seq-len", 32, "--json")
    assert r.returncode == 0 and base.returncode == 0, r.stderr + base.stderr
    assert json.loads(r.stdout)["loss"] != json.loads(base.stdout)["loss"]
    r = jpeft_here(capsys, "train", "--config", cfg, "--no-progress", "--set", "train.scan_layers=1")
    assert r.returncode == 2 and "train.scan_layers must be true or false" in error_line(r.stderr)


def test_eval_export_merge_against_transformers_and_peft(hf_dir, tmp_path, capsys):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jpeft.data import PackedDataset

    cfg = write_config(hf_dir, "for_export", steps=6)
    r = jpeft_here(capsys, "train", "--config", cfg, "--no-progress")
    assert r.returncode == 0, r.stderr
    model_dir, adapter_dir = hf_dir / "tiny-llama", hf_dir / "for_export" / "adapter"

    # the same packed rows as `jpeft eval` builds, scored by transformers
    tok = AutoTokenizer.from_pretrained(model_dir)
    ds = PackedDataset.from_file(hf_dir / "notes.txt", lambda s: tok(s, add_special_tokens=False)["input_ids"], 32,
                                 eos_id=tok.eos_token_id, bos_id=None)  # tok(s) adds no BOS
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ref_base, _ = _torch_loss(base, ds.input_ids, ds.loss_mask)

    r = jpeft_here(capsys, "eval", "--model", model_dir, "--data", hf_dir / "notes.txt", "--seq-len", 32, "--batch-size", 3,
                   "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["tokens"] == ds.num_targets
    np.testing.assert_allclose(got["loss"], ref_base, rtol=1e-5)
    np.testing.assert_allclose(got["perplexity"], np.exp(ref_base), rtol=1e-5)

    # export -> peft loads it and scores the same as `jpeft eval --adapter`
    peft_dir = tmp_path / "peft"
    r = jpeft_here(capsys, "export", "--model", model_dir, "--adapter", adapter_dir, "--out", peft_dir)
    assert r.returncode == 0, r.stderr
    assert (peft_dir / "adapter_config.json").is_file() and (peft_dir / "adapter_model.safetensors").is_file()
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), peft_dir).eval()
    ref_adapted, ref_logits = _torch_loss(peft_model, ds.input_ids, ds.loss_mask)
    assert abs(ref_adapted - ref_base) > 1e-4  # the adapter changes the model
    r = jpeft_here(capsys, "eval", "--model", model_dir, "--adapter", adapter_dir, "--data", hf_dir / "notes.txt",
                   "--seq-len", 32, "--json")
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(json.loads(r.stdout)["loss"], ref_adapted, rtol=1e-5)
    r = jpeft_here(capsys, "export", "--model", model_dir, "--adapter", adapter_dir, "--out", peft_dir)
    assert r.returncode == 2 and "is not empty; pass --force" in error_line(r.stderr)

    # merge -> a plain transformers folder with the adapted logits
    merged_dir = tmp_path / "merged"
    r = jpeft_here(capsys, "merge", "--model", model_dir, "--adapter", adapter_dir, "--out", merged_dir)
    assert r.returncode == 0, r.stderr
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    with torch.no_grad():
        m_logits = merged(torch.tensor(ds.input_ids, dtype=torch.long)).logits.float()
    np.testing.assert_allclose(m_logits.numpy(), ref_logits.numpy(), atol=2e-5)
    assert AutoTokenizer.from_pretrained(merged_dir)("def f():")["input_ids"] == tok("def f():")["input_ids"]

    r = jpeft_here(capsys, "eval", "--model", model_dir, "--adapter", tmp_path / "nowhere", "--data", hf_dir / "notes.txt",
                   "--seq-len", 32)
    assert r.returncode == 2 and "adapter folder" in error_line(r.stderr)


# ------------------------------------------------------------------------------------ demo
def test_demo_tiny_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    r = jpeft_cmd("demo", "--tiny", "--steps", "4", "--pretrain-steps", "6", "--eval-every", "2", "--gen-bytes", "8",
                  "--out", out, "--cache-dir", tmp_path / "cache", "--no-progress")
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "demo_results.json").read_text())
    assert res["table"] in r.stdout
    rows = res["table"].splitlines()
    assert [c.strip() for c in rows[0].split("|")[1:-1]] == [
        "method", "trainable", "checkpoint", "step time", "new-task loss", "old-task loss rise"]
    full, lora, lora_all, lora_replay = res["runs"]
    assert [r["method"] for r in res["runs"]] == ["full fine-tuning", "LoRA r=8, q,v", "LoRA r=8, all linear",
                                                  "LoRA r=8, all linear + 25% code replay"]
    assert lora_replay["trainable"] == lora_all["trainable"]
    assert full["trainable_share"] == 1.0 and 0 < lora["trainable_share"] < lora_all["trainable_share"] < 1
    # tiny setting: 2 layers x width 32; LoRA r=8 on q,v: 2 x 2 x 8 x (32 + 32)
    assert lora["trainable"] == 2 * 2 * 8 * (32 + 32)
    assert full["steps"] == lora["steps"] == [0, 2, 4]
    # the losses at step 0 are the base model's: every method starts from the same model
    assert full["new_task_loss"][0] == lora["new_task_loss"][0] == res["base_loss"]["new_task"]
    assert full["old_task_loss"][0] == res["base_loss"]["old_task"]
    assert lora["checkpoint_bytes"] < full["checkpoint_bytes"]
    assert (out / "demo_losses.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "lora-adapter" / "jpeft_adapter.json").is_file()
    assert (out / "lora-all-linear-adapter" / "jpeft_adapter.json").is_file()
    # the full fine-tune is a Hugging Face folder like base-model/ (it was safetensors under flax key
    # strings that nothing loads), holding the fine-tuned weights, not the base's
    fm, fp = jpeft.models.from_pretrained(out / "full-finetune")
    bm, bp = jpeft.models.from_pretrained(out / "base-model")
    assert fm.config == bm.config and (out / "full-finetune" / "tokenizer.json").is_file()
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(fp), jax.tree.leaves(bp)))
    # the natural next step, jpeft eval on it without --seq-len: its default (256) was longer than the demo
    # model's position range and refused; it now takes the model's range when that is shorter
    (tmp_path / "eval.txt").write_text("The quick brown fox jumps over the lazy dog. " * 20)
    r3 = jpeft_here(capsys, "eval", "--model", out / "full-finetune", "--data", tmp_path / "eval.txt", "--json")
    assert r3.returncode == 0, r3.stderr
    assert np.isfinite(json.loads(r3.stdout)["loss"])
    assert r.stdout.count("[The ]") == 5 and r.stdout.count("[def ]") == 5
    for row in res["runs"]:  # the table shows the JSON's numbers
        rise = row["old_task_loss"][-1] - res["base_loss"]["old_task"]
        line = next(ln for ln in rows if ln.startswith(f"| {row['method']} "))
        assert f"{row['new_task_loss'][-1]:.3f}" in line and f"{rise:+.3f}" in line
    # a second run (here, not in a subprocess) reuses the cached base model
    # (with --replay 0: the first run's replay adapter, which this run did not train, is not left behind)
    assert (out / "lora-all-linear-replay-adapter" / "jpeft_adapter.json").is_file()
    r2 = jpeft_here(capsys, "demo", "--tiny", "--steps", "2", "--pretrain-steps", "6", "--gen-bytes", "0", "--out", out,
                   "--cache-dir", tmp_path / "cache", "--no-progress", "--replay", "0")
    assert r2.returncode == 0, r2.stderr
    assert "cached base model" in r2.stdout
    res2 = json.loads((out / "demo_results.json").read_text())
    assert res2["base_loss"] == res["base_loss"]
    assert len(res2["runs"]) == 3 and not (out / "lora-all-linear-replay-adapter").exists()


# ------------------------------------------------------------------------------ forgetting
def test_forgetting_delegates_to_the_runner(capsys):
    r = jpeft_here(capsys, "forgetting", "split-digits-task", "--list-methods")
    assert r.returncode == 0, r.stderr
    from jpeft.forgetting.experiment import get_benchmark

    names = [m.name for m in get_benchmark("split-digits-task").default_methods()]
    for n in names:
        assert n in r.stdout


# ------------------------------------------------------------- merge / export / info: no work lost
def test_merge_and_export_never_write_into_their_inputs_or_leave_stale_shards(hf_dir, tmp_path, capsys):
    import jax
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base"
    shutil.copytree(hf_dir / "tiny-llama", base)
    model, params = jpeft.models.from_pretrained(str(base))
    config = jpeft.LoraConfig(r=2, target_modules=["q_proj"], init_weights="random")
    adapter = jax.tree.map(lambda x: x + 0.05, jpeft.init(config, params, jax.random.key(0)))  # B random too
    jpeft.save_adapter(str(tmp_path / "a"), config, adapter)
    weights = (base / "model.safetensors").read_bytes()
    # --out naming an input folder is refused even with --force (merge overwrote the base's weights,
    # export made the base folder load with the adapter attached in transformers)
    for cmd in ("merge", "export"):
        for out in (base, tmp_path / "a"):
            r = jpeft_here(capsys, cmd, "--model", base, "--adapter", tmp_path / "a", "--out", out, "--force")
            assert r.returncode == 2 and "--force does not allow it" in error_line(r.stderr)
    assert (base / "model.safetensors").read_bytes() == weights
    assert sorted(os.listdir(base)) == sorted(os.listdir(hf_dir / "tiny-llama"))
    # so is the folder --adapter is read from, and one holding it: a run folder's adapter/ (the export
    # was written beside its jpeft files), or the run folder itself (a later --adapter RUN read the
    # exported checkpoint's PEFT files before the run's adapter/)
    run = tmp_path / "run"
    shutil.copytree(tmp_path / "a", run / "adapter")
    for cmd in ("merge", "export"):
        for given, out in ((run, run / "adapter"), (run / "adapter", run)):
            r = jpeft_here(capsys, cmd, "--model", base, "--adapter", given, "--out", out, "--force")
            assert r.returncode == 2 and "holds the adapter the command reads" in error_line(r.stderr)
    assert sorted(os.listdir(run)) == ["adapter"]
    assert sorted(os.listdir(run / "adapter")) == sorted(os.listdir(tmp_path / "a"))
    # --force over a sharded model: its index and shards go (jpeft's loader read the old shards by the index)
    out = tmp_path / "out"
    AutoModelForCausalLM.from_pretrained(base).save_pretrained(out, max_shard_size="20KB")
    assert (out / "model.safetensors.index.json").is_file()
    r = jpeft_here(capsys, "merge", "--model", base, "--adapter", tmp_path / "a", "--out", out, "--force")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"] + sorted(
        n for n in os.listdir(base) if n.startswith(("tokenizer", "special_tokens")))
    _, got = jpeft.models.from_pretrained(str(out))
    want = jpeft.merge(params, adapter)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    # a bfloat16 checkpoint is merged in float32 and written back in bfloat16, as its copied config.json says
    # (it was written in float32: twice the size)
    bf = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(base, dtype="bfloat16").save_pretrained(bf)
    r = jpeft_here(capsys, "merge", "--model", bf, "--adapter", tmp_path / "a", "--out", tmp_path / "bf16-merged")
    assert r.returncode == 0, r.stderr
    from safetensors import safe_open

    with safe_open(str(tmp_path / "bf16-merged" / "model.safetensors"), "np") as f:
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"BF16"}
    _, got = jpeft.models.from_pretrained(str(tmp_path / "bf16-merged"))
    _, bparams = jpeft.models.from_pretrained(str(bf))
    want = jpeft.merge(bparams, adapter)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-2, atol=1e-2)  # one bfloat16 rounding


def test_info_on_adapter_folders_counts_what_peft_trains(hf_dir, tmp_path, capsys):
    import peft
    from transformers import AutoModelForCausalLM

    _, params = jpeft.models.from_pretrained(str(hf_dir / "tiny-llama"))
    cases = [(peft.LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"]), 0),
             (peft.VeraConfig(r=4, target_modules=["q_proj", "v_proj"], save_projection=True), 1)]
    for i, (cfg, has_frozen) in enumerate(cases):
        pm = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(hf_dir / "tiny-llama"), cfg)
        trainable, _ = pm.get_nb_trainable_parameters()
        pm.save_pretrained(tmp_path / f"peft{i}")  # LoRA: with the embedding's base weight (base_layer)
        config, adapter = jpeft.hf.load_peft(str(tmp_path / f"peft{i}"), params)
        jpeft.save_adapter(str(tmp_path / f"jpeft{i}"), config, adapter)
        s = jpeft.summary(params, adapter, print_fn=None)
        assert s["trainable"] == trainable and bool(s["frozen"]) == bool(has_frozen)
        for folder in (tmp_path / f"peft{i}", tmp_path / f"jpeft{i}"):
            r = jpeft_here(capsys, "info", folder, "--json")
            assert r.returncode == 0, r.stderr
            res = json.loads(r.stdout)
            # before: 4,240 (the saved base embedding counted) and 400 / 1,168 (VeRA's projections counted)
            assert res["trainable_params"] == trainable, (folder, res)
            assert (res["frozen_params"] > 0) == bool(has_frozen)


def test_info_counts_the_base_biases_peft_trains_with_bias_lora_only_or_all(tmp_path, capsys):
    """PEFT saves the biases ``bias="lora_only"``/``"all"`` trains of a LoRA layer as
    ``...q_proj.base_layer.bias``; `jpeft info` took them for base weights saved with the adapter
    (as a targeted embedding's ``base_layer.weight`` is): 1,024 trainable where PEFT counts 1,152."""
    import copy

    import peft

    sys.path.insert(0, os.path.dirname(__file__))
    import _models_tiny as tiny

    base, _ = tiny.hf_model("llama2")  # biased attention projections
    for bias in ("lora_only", "all"):
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], bias=bias))
        pm.save_pretrained(tmp_path / bias)
        res = json.loads(jpeft_here(capsys, "info", tmp_path / bias, "--json").stdout)
        assert res["trainable_params"] == pm.get_nb_trainable_parameters()[0], (bias, res)
        assert res["base_copy_params"] == 0


def test_merge_and_export_with_force_leave_no_earlier_output_to_be_read_instead(hf_dir, tmp_path, capsys):
    """`merge --force` over an earlier merge of a base with a tokenizer kept that tokenizer beside the
    new base's weights (transformers loaded a 300-token tokenizer for a 100-word model); `export
    --force` into a folder holding a jpeft adapter wrote the PEFT files beside it, and every
    `--adapter OUT` then read the old jpeft adapter (a merge 2.96 away from the exported adapter);
    into another run's folder, `--adapter RUN` read the export instead of the run's adapter/."""
    import jax

    sys.path.insert(0, os.path.dirname(__file__))
    import _models_tiny as tiny

    _, plain = tiny.hf_model("llama2")  # no tokenizer files
    adapters = {}
    for name, folder in (("tok", hf_dir / "tiny-llama"), ("plain", plain)):
        _, params = jpeft.models.from_pretrained(str(folder))
        config = jpeft.LoraConfig(r=2, target_modules=["q_proj"], init_weights="random")
        jpeft.save_adapter(str(tmp_path / name), config, jpeft.init(config, params, jax.random.key(0)))
        adapters[name] = folder
    out = tmp_path / "merged"
    assert jpeft_here(capsys, "merge", "--model", adapters["tok"], "--adapter", tmp_path / "tok", "--out", out).returncode == 0
    assert (out / "tokenizer.json").is_file()
    r = jpeft_here(capsys, "merge", "--model", plain, "--adapter", tmp_path / "plain", "--out", out, "--force")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == sorted(os.listdir(plain))
    # export --force into a jpeft adapter folder: refused, the adapter left as it was
    shutil.copytree(tmp_path / "tok", tmp_path / "old")
    before = {n: (tmp_path / "old" / n).read_bytes() for n in os.listdir(tmp_path / "old")}
    r = jpeft_here(capsys, "export", "--model", plain, "--adapter", tmp_path / "plain", "--out", tmp_path / "old", "--force")
    assert r.returncode == 2 and "SaveError" in error_line(r.stderr) and "jpeft_adapter.json" in r.stderr
    assert {n: (tmp_path / "old" / n).read_bytes() for n in os.listdir(tmp_path / "old")} == before
    # so is another run's folder: `--adapter RUN` would read the export instead of the run's adapter/
    shutil.copytree(tmp_path / "tok", tmp_path / "run" / "adapter")
    r = jpeft_here(capsys, "export", "--model", plain, "--adapter", tmp_path / "plain", "--out", tmp_path / "run", "--force")
    assert r.returncode == 2 and "a training run" in error_line(r.stderr)
    assert os.listdir(tmp_path / "run") == ["adapter"]


# ------------------------------------------------------------- PiSSA / OLoRA PEFT folders
@pytest.mark.parametrize("family", ["llama3", "gpt2"])
def test_merge_and_export_of_a_peft_lm_head_adapter_on_a_tied_base_give_peft_numbers(family, tmp_path, capsys):
    """A PEFT folder adapting lm_head of a tied base (modules_to_save=["lm_head"], or a LoRA of it)
    was refused by `merge` and `export` with a BaseMismatchError ("Was the adapter trained on another
    model?") whose only fix was a Python call; PEFT computes such a model with its own lm_head, and
    its merge_and_unload() unties it. Now the base is read untied: the merged folder says
    tie_word_embeddings=false and gives the unmerged PEFT model's logits (as PEFT's own merged and
    saved folder does for modules_to_save), and the export loads in PEFT to the same logits."""
    import copy
    import warnings

    import peft
    import torch
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, os.path.dirname(__file__))
    import _models_tiny as tiny

    base, folder = tiny.hf_model(family)  # both tie lm_head to the input embedding
    assert base.config.tie_word_embeddings
    target = {"llama3": "q_proj", "gpt2": "c_attn"}[family]
    ids = torch.tensor(tiny.batch(family)[0])
    # trainable tokens saved with save_embedding_layers: the file holds lm_head keys (the delta PEFT shares with the
    # tied head, copies of the base) but no site of lm_head, so the base stays tied, as in PEFT
    for name, kw in (("saved", dict(modules_to_save=["lm_head"])), ("lora", dict(target_modules=[target, "lm_head"])),
                     ("tokens", dict(trainable_token_indices=[1, 2, 5]))):
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, **{"target_modules": [target], **kw}))
        g = torch.Generator().manual_seed(len(name))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if p.requires_grad:  # every adapter tensor random, the lm_head copy included
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
        pm.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm.save_pretrained(tmp_path / name, save_embedding_layers=name == "tokens")
        with torch.no_grad():
            ref = pm(ids).logits.numpy()
            assert np.abs(ref - base(ids).logits.numpy()).max() > 0.5  # the adapter changes the model
        r = jpeft_here(capsys, "merge", "--model", folder, "--adapter", tmp_path / name, "--out", tmp_path / f"{name}-merged")
        assert r.returncode == 0, r.stderr
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / f"{name}-merged").eval()
        untied = name != "tokens"
        assert merged.config.tie_word_embeddings is not untied
        assert json.loads((tmp_path / f"{name}-merged" / "config.json").read_text()).get("tie_word_embeddings", True) \
            is not untied
        with torch.no_grad():
            np.testing.assert_allclose(merged(ids).logits.numpy(), ref, atol=2e-5)
        if name == "saved":  # PEFT's own merge, saved and loaded back (a merged LoRA of lm_head it writes tied)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                copy.deepcopy(pm).merge_and_unload().save_pretrained(tmp_path / "peft-merged")
            theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "peft-merged").eval()
            with torch.no_grad():
                np.testing.assert_allclose(merged(ids).logits.numpy(), theirs(ids).logits.numpy(), atol=2e-5)
        r = jpeft_here(capsys, "export", "--model", folder, "--adapter", tmp_path / name, "--out", tmp_path / f"{name}-peft")
        assert r.returncode == 0, r.stderr
        back = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / f"{name}-peft")).eval()
        with torch.no_grad():
            np.testing.assert_allclose(back(ids).logits.numpy(), ref, atol=2e-5)


# ------------------------------------------------------------- lm_head adapters of a tied base
@pytest.fixture(scope="module")
def tied_llama(hf_dir):
    """hf_dir's tiny Llama with tie_word_embeddings=True (lm_head is the input embedding), every
    weight random at a useful scale, saved with hf_dir's tokenizer: ``(torch_model, folder)``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, os.path.dirname(__file__))
    import _models_tiny as tiny

    src, folder = hf_dir / "tiny-llama", hf_dir / "tied-llama"
    torch.manual_seed(1)
    model = tiny._randomize(LlamaForCausalLM(LlamaConfig.from_pretrained(src, tie_word_embeddings=True)), seed=11)
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(src).save_pretrained(folder)
    return model, folder


def _peft_random_folder(base, out, seed, **kw):
    """A PEFT LoRA adapter of ``base`` (``LoraConfig(r=4, lora_alpha=8, **kw)``) with every trainable
    tensor random (the lm_head copy and the token rows included), saved to ``out``: its PeftModel."""
    import copy
    import warnings

    import peft
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, **kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.eval().save_pretrained(out)
    return pm


def _rows_of(folder, data, seq_len=32):
    """The packed rows `jpeft eval --seq-len seq_len` scores (its tokenizer adds no BOS)."""
    from jpeft.data import PackedDataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    return PackedDataset.from_file(data, lambda s: tok(s, add_special_tokens=False)["input_ids"], seq_len,
                                   eos_id=tok.eos_token_id, bos_id=None)


def test_eval_of_a_peft_lm_head_adapter_on_a_tied_base_gives_peft_loss(tied_llama, hf_dir, tmp_path, capsys):
    """`jpeft eval` refused a PEFT folder with an lm_head LoRA or modules_to_save=["lm_head"] copy on
    a tied base (BaseMismatchError, "load the base untied: jpeft.models.from_pretrained(...)", no
    option of the command), while merge and export read such a base untied. Now eval does too: its
    loss is PEFT's (every adapter tensor random), and the --canary report's base loss is the tied
    model's."""
    import _models_tiny as tiny

    base, folder = tied_llama
    ds = _rows_of(folder, hf_dir / "notes.txt")
    base_loss, _ = _torch_loss(base, ds.input_ids, ds.loss_mask)
    for name, kw in (("saved", dict(target_modules=["q_proj"], modules_to_save=["lm_head"])),
                     # PEFT < 0.22's modules_to_save is a suffix rule: "head" copies lm_head too (was read on the
                     # tied base); PEFT 0.22 matches whole components, so there it copies nothing (q_proj's LoRA only)
                     ("suffix", dict(target_modules=["q_proj"], modules_to_save=["head"])),
                     ("lora", dict(target_modules=["v_proj", "lm_head"]))):
        pm = _peft_random_folder(base, tmp_path / name, seed=len(name), **kw)
        ref, _ = _torch_loss(pm, ds.input_ids, ds.loss_mask)
        if name != "suffix" or not tiny.peft_at_least(0, 22):
            assert abs(ref - base_loss) > 0.1  # the adapter changes the model (lm_head's copy or LoRA)
        r = jpeft_here(capsys, "eval", "--model", folder, "--adapter", tmp_path / name, "--data", hf_dir / "notes.txt",
                       "--seq-len", 32, "--json")
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout)
        assert got["tokens"] == ds.num_targets
        np.testing.assert_allclose(got["loss"], ref, rtol=1e-5)
    r = jpeft_here(capsys, "eval", "--model", folder, "--adapter", tmp_path / "lora", "--canary", hf_dir / "notes.txt",
                   "--seq-len", 32, "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    np.testing.assert_allclose([got["base_loss"], got["loss"]], [base_loss, ref], rtol=1e-5)


def test_serve_reads_a_tied_base_untied_for_an_lm_head_adapter_with_peft_numbers(tied_llama, tmp_path, capsys):
    """`jpeft serve` refused a PEFT LoRA of lm_head on a tied base (BaseMismatchError naming a
    Python call). The shared base is now read untied when a --adapter needs it (lm_head a copy of
    the embedding, noted on stderr): the bank's rows give each adapter's PEFT logits and the base's
    own, an adapter that does not touch lm_head included. An lm_head adapter added live to a
    server whose base was read tied is refused by name (the bank's base cannot change)."""
    import argparse

    import torch

    from jpeft.cli import serve_cmd
    from jpeft.errors import BaseMismatchError

    base, folder = tied_llama
    pms = {"plain": _peft_random_folder(base, tmp_path / "plain", seed=1, target_modules=["v_proj"]),
           "head": _peft_random_folder(base, tmp_path / "head", seed=2, target_modules=["q_proj", "lm_head"])}
    ids = np.random.default_rng(0).integers(3, base.config.vocab_size, size=(3, 12))
    with torch.no_grad():
        want = [pms["plain"](torch.tensor(ids[:1])).logits.numpy()[0], pms["head"](torch.tensor(ids[1:2])).logits.numpy()[0],
                base(torch.tensor(ids[2:])).logits.numpy()[0]]
    parser = serve_cmd.add_parser(argparse.ArgumentParser().add_subparsers())
    capsys.readouterr()
    server = serve_cmd.build(parser.parse_args(["--model", str(folder), "--adapter", f"plain={tmp_path / 'plain'}",
                                                "--adapter", f"head={tmp_path / 'head'}"]))
    assert "adapter(s) head adapt lm_head" in capsys.readouterr().err
    engine = server.engine
    got = np.asarray(jpeft.apply(engine.model, engine.params, engine.bank.route(["plain", "head", None]), ids))
    np.testing.assert_allclose(got, np.stack(want), atol=2e-5)
    assert np.abs(want[1] - base(torch.tensor(ids[1:2])).logits.detach().numpy()[0]).max() > 0.5
    # a server whose --adapter ones leave lm_head alone keeps the base tied: a live-added lm_head adapter is refused
    server = serve_cmd.build(parser.parse_args(["--model", str(folder), "--adapter", f"plain={tmp_path / 'plain'}"]))
    with pytest.raises(BaseMismatchError, match="Restart jpeft serve with this adapter among the --adapter ones"):
        server.loader(str(tmp_path / "head"))


def test_peft_lm_head_adapter_with_trainable_tokens_on_a_tied_base_is_refused(tied_llama, hf_dir, tmp_path, capsys):
    """A PEFT folder with a LoRA of lm_head and trainable tokens on a tied base: PEFT applies the
    token rows in the tied lm_head under its LoRA too, while jpeft, reading the base untied for the
    LoRA, applied them in the input embedding only; `jpeft merge` wrote a model 7 logits off PEFT's
    without a word. Every command now refuses it by name before loading the base."""
    import torch

    base, folder = tied_llama
    pm = _peft_random_folder(base, tmp_path / "ad", seed=3, target_modules=["q_proj", "lm_head"],
                             trainable_token_indices=[3, 5, 9])
    ids = torch.tensor([[3, 5, 9, 12, 40, 5]])
    with torch.no_grad():
        assert np.abs(pm(ids).logits.numpy() - base(ids).logits.numpy()).max() > 0.5  # PEFT runs it
    for cmd in (["merge", "--out", tmp_path / "m"], ["export", "--out", tmp_path / "e"],
                ["eval", "--data", hf_dir / "notes.txt", "--seq-len", 32]):
        r = jpeft_here(capsys, cmd[0], "--model", folder, "--adapter", tmp_path / "ad", *cmd[1:])
        assert r.returncode == 2 and "UnsupportedAdapterError" in error_line(r.stderr), r.stderr
        assert "applies the token rows in the tied lm_head" in r.stderr
    assert not (tmp_path / "m").exists() and not (tmp_path / "e").exists()


def test_cli_reads_lm_head_of_a_peft_folder_as_its_loader_does(tied_llama, tmp_path):
    """Whether the commands read a tied base untied for a PEFT folder (``_ckpt.adapts_lm_head``)
    is what the folder's config answers (``AdapterConfig.adapts_lm_head`` of
    ``jpeft.hf.peft_config``; it was a second reading of the file's keys), and it agrees with what
    ``jpeft.hf.load_peft`` builds on the base the commands read: an ``lm_head`` site on the untied
    base, or an adapter that loads on the tied one. Every tensor random; LoRA's own reading of the
    file takes an init that ``LoraConfig.from_dict`` refuses ("orthogonal")."""
    import copy
    import warnings

    import peft
    import torch

    import _models_tiny as tiny
    from jpeft.cli._ckpt import adapts_lm_head
    from jpeft.cli._model import load_folder

    base, folder = tied_llama
    bases = {untie: load_folder(str(folder), tokenizer=False, untie=untie).params for untie in (False, True)}
    head, q = ["q_proj", "lm_head"], ["q_proj"]
    cases = {
        "lora_q": (peft.LoraConfig(target_modules=q), False),
        "lora_head": (peft.LoraConfig(target_modules=head), True),
        "lora_regex_excluded": (peft.LoraConfig(target_modules=".*_proj|lm_head", exclude_modules=["lm_head"]), False),
        "lora_saves_head": (peft.LoraConfig(target_modules=q, modules_to_save=["head"]), True),
        "lora_tied": (peft.LoraConfig(target_modules=["embed_tokens", "lm_head"], ensure_weight_tying=True), False),
        "lora_tokens": (peft.LoraConfig(target_modules=q, trainable_token_indices=[3, 5]), False),
        "lora_orthogonal_head": (peft.LoraConfig(r=4, target_modules=head, init_lora_weights="orthogonal"), True),
        "loha_head": (peft.LoHaConfig(r=2, target_modules=head), True),
        "lokr_q": (peft.LoKrConfig(r=2, target_modules=q), False),
        "ia3_head": (peft.IA3Config(target_modules=["q_proj", "lm_head"], feedforward_modules=[]), True),
    }
    g = torch.Generator().manual_seed(0)
    for name, (cfg, want) in cases.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = peft.get_peft_model(copy.deepcopy(base), cfg)
            with torch.no_grad():
                for _, p in pm.named_parameters():
                    if p.requires_grad:
                        p.copy_(0.3 * torch.randn(p.shape, generator=g))
            pm.save_pretrained(tmp_path / name)
            config, adapter = jpeft.hf.load_peft(str(tmp_path / name), bases[want])
        # PEFT < 0.22's suffix rule copies lm_head for modules_to_save=["head"]; PEFT 0.22 matches whole name
        # components, so its file copies nothing: the loaded adapter has no lm_head, and the CLI's check, made
        # before the base loads, reads the file by its peft_version too (it read the suffix rule, and so the base
        # untied: the same logits, but `jpeft merge` wrote an untied checkpoint where PEFT's merge stays tied)
        has_head = want and not (name == "lora_saves_head" and tiny.peft_at_least(0, 22))
        assert adapts_lm_head(str(tmp_path / name)) is has_head, name
        assert ("lm_head" in adapter) is has_head and config.adapts_lm_head() is has_head, (name, sorted(adapter))


def test_merge_of_a_peft_folder_naming_head_keeps_the_base_tied_as_its_peft_version_does(tied_llama, tmp_path, capsys):
    """modules_to_save=["head"] copies lm_head in PEFT < 0.22 (a suffix) and nothing in PEFT 0.22
    (whole name components). The CLI decided whether to read a tied base untied by the suffix rule
    alone, before the base loads, so `jpeft merge` of a 0.22 file wrote an untied checkpoint where
    PEFT 0.22's merge_and_unload keeps it tied. The decision now follows the file's peft_version:
    a 0.22 file stays tied, a 0.21 file is untied, each with the logits of PEFT's merge of that file
    (the installed PEFT's own file, and both versions' files built from one with every tensor
    random, each compared with a file the installed PEFT computes alike)."""
    import json
    import shutil

    import torch
    from peft import PeftModel
    from safetensors.numpy import load_file, save_file
    from transformers import AutoModelForCausalLM

    import _models_tiny as tiny

    base, folder = tied_llama
    ids = torch.tensor(np.random.default_rng(5).integers(3, base.config.vocab_size, size=(2, 10)))

    def peft_merge(ad):  # PEFT's merge_and_unload of the folder `ad`: (logits, whether lm_head stays tied)
        m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), ad).merge_and_unload().eval()
        with torch.no_grad():
            return m(ids).logits.numpy(), m.lm_head.weight is m.model.embed_tokens.weight

    def edited(name, src, drop_head=False, **changes):  # a copy of the folder `src` with its config changed
        out = tmp_path / name
        shutil.copytree(src, out)
        d = json.loads((out / "adapter_config.json").read_text())
        (out / "adapter_config.json").write_text(json.dumps({**d, **changes}))
        if drop_head:  # as the writing PEFT saves it: no lm_head copy
            t = load_file(out / "adapter_model.safetensors")
            save_file({k: v for k, v in t.items() if ".lm_head." not in k}, out / "adapter_model.safetensors")
        return out

    pm = _peft_random_folder(base, tmp_path / "full", seed=7, target_modules=["q_proj"], modules_to_save=["lm_head"])
    _peft_random_folder(base, tmp_path / "native", seed=8, target_modules=["q_proj"], modules_to_save=["head"])
    with torch.no_grad():
        assert np.abs(pm(ids).logits.numpy() - base(ids).logits.numpy()).max() > 0.5  # the LoRA and the copy act
    plain = edited("plain", tmp_path / "full", drop_head=True, modules_to_save=None)  # the q_proj LoRA alone
    cases = {  # folder -> (the folder the installed PEFT computes as the file's PEFT computes it, tied after merge)
        "native": (tmp_path / "native", tiny.peft_at_least(0, 22)),  # PEFT 0.22's own file copies nothing
        "v21": (tmp_path / "full", False),
        "v22": (plain, True),
    }
    edited("v21", tmp_path / "full", modules_to_save=["head"], peft_version="0.21.2")
    edited("v22", tmp_path / "full", drop_head=True, modules_to_save=["head"], peft_version="0.22.0")
    for name, (ref_folder, tied) in cases.items():
        want, peft_tied = peft_merge(ref_folder)
        assert peft_tied is tied, name
        out = tmp_path / f"m_{name}"
        r = jpeft_here(capsys, "merge", "--model", folder, "--adapter", tmp_path / name, "--out", out)
        assert r.returncode == 0, r.stderr
        merged = AutoModelForCausalLM.from_pretrained(out).eval()
        assert merged.config.tie_word_embeddings is tied, name
        assert (merged.lm_head.weight is merged.model.embed_tokens.weight) is tied, name
        with torch.no_grad():
            np.testing.assert_allclose(merged(ids).logits.numpy(), want, atol=2e-5, err_msg=name)


def test_train_adapts_lm_head_of_a_tied_base_as_peft_does(tied_llama, hf_dir, tmp_path, capsys):
    """`jpeft train` of a method adapting lm_head on a tied model was refused (TargetNotFoundError:
    "load the base untied: jpeft.models.from_pretrained(...)", no option of the command) only after
    the base had loaded. The base is now read untied when the method adapts lm_head, with a note, as
    PEFT unties it; the run's adapter exports to PEFT files that load on the original tied checkpoint
    to jpeft's numbers (eval's loss of the run, the merged model's logits)."""
    import torch
    from peft import PeftModel
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    base, folder = tied_llama
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'model = "{folder}"\noutput_dir = "{tmp_path / "run"}"\n[data]\ntrain = "{hf_dir / "train.jsonl"}"\n'
                   'seq_len = 32\n[method]\nname = "lora"\nr = 4\nlora_alpha = 8\ntarget_modules = ["q_proj", "lm_head"]\n'
                   "[train]\nsteps = 2\nbatch_size = 2\nlearning_rate = 5e-2\neval_every = 0\nsave_every = 0\n")
    r = jpeft_here(capsys, "train", "--config", cfg, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "the method adapts lm_head, which config.json ties to the input embedding" in r.stderr
    r = jpeft_here(capsys, "export", "--model", folder, "--adapter", tmp_path / "run", "--out", tmp_path / "peft")
    assert r.returncode == 0, r.stderr
    head_b = load_file(tmp_path / "peft" / "adapter_model.safetensors")["base_model.model.lm_head.lora_B.weight"]
    assert np.abs(head_b).max() > 1e-3  # lm_head's LoRA was trained (B starts at zero)
    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), tmp_path / "peft").eval()
    assert pm.base_model.model.config.tie_word_embeddings  # the original tied checkpoint
    ds = _rows_of(folder, hf_dir / "notes.txt")
    ref, ref_logits = _torch_loss(pm, ds.input_ids, ds.loss_mask)
    r = jpeft_here(capsys, "eval", "--model", folder, "--adapter", tmp_path / "run", "--data", hf_dir / "notes.txt",
                   "--seq-len", 32, "--json")
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(json.loads(r.stdout)["loss"], ref, rtol=1e-5)
    assert abs(ref - _torch_loss(base, ds.input_ids, ds.loss_mask)[0]) > 1e-3
    r = jpeft_here(capsys, "merge", "--model", folder, "--adapter", tmp_path / "run", "--out", tmp_path / "merged")
    assert r.returncode == 0, r.stderr
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert merged.config.tie_word_embeddings is False
    with torch.no_grad():
        np.testing.assert_allclose(merged(torch.tensor(ds.input_ids, dtype=torch.long)).logits.numpy(),
                                   ref_logits.numpy(), atol=2e-5)


def test_train_tie_word_embeddings_key_and_its_refusals_before_the_model_loads(tied_llama, hf_dir, tmp_path, capsys):
    """[model] tie_word_embeddings = false reads a tied base untied, as from_pretrained's override
    does; what cannot be trained or exported as asked is refused before the model loads (these
    folders hold config.json alone, so any load would fail otherwise) and writes nothing."""
    from jpeft.cli._common import method_of
    from jpeft.cli._trainer import untie_lm_head
    from jpeft.cli.train_cmd import _tomllib, resolve_config
    from jpeft.models import loading

    _, folder = tied_llama
    for name, src in (("tied", folder), ("untied", hf_dir / "tiny-llama")):
        (tmp_path / name).mkdir()
        shutil.copy(src / "config.json", tmp_path / name / "config.json")

    def toml(model, tie, method):
        return (f'output_dir = "{tmp_path / "run"}"\n[model]\npath = "{tmp_path / model}"\n{tie}\n[data]\n'
                f'train = "{hf_dir / "train.jsonl"}"\nseq_len = 32\n[method]\nname = "lora"\n{method}\n')

    head, q = 'target_modules = ["q_proj", "lm_head"]', 'target_modules = ["q_proj"]'
    tokens = "trainable_token_indices = [3, 5]"
    for model, tie, method, msg in (
            ("tied", "tie_word_embeddings = true", head, "but the method adapts lm_head, which a tied model does not have"),
            ("untied", "tie_word_embeddings = true", q, "which cannot be tied away"),
            ("tied", "", f"{head}\n{tokens}", "PEFT applies the token rows in lm_head too"),
            ("tied", "tie_word_embeddings = false", f"{q}\n{tokens}", "(model.tie_word_embeddings = false)"),
            ("tied", 'tie_word_embeddings = "false"', q, "model.tie_word_embeddings must be true or false")):
        (tmp_path / "c.toml").write_text(toml(model, tie, method))
        r = jpeft_here(capsys, "train", "--config", tmp_path / "c.toml", "--no-progress")
        assert r.returncode == 2 and "ConfigError" in error_line(r.stderr) and msg in r.stderr, (msg, r.stderr)
        assert not (tmp_path / "run").exists()
    # the key alone unties a tied base for a method that leaves lm_head alone; without it the base stays tied
    # the method decides what adapts lm_head (AdapterConfig.adapts_lm_head), as it builds its sites: PEFT's
    # modules_to_save is a suffix rule, so "head" copies lm_head (the CLI's own reading of the field said no and
    # read the base tied); LoRA's exclude_modules takes lm_head out of a regex that selects it
    for tie, method, want in (("tie_word_embeddings = false", q, True), ("", q, False),
                              ("", f'{q}\nmodules_to_save = ["head"]', True), ("", head, True),
                              ("", 'target_modules = ".*_proj|lm_head"\nexclude_modules = ["lm_head"]', False)):
        cfg = resolve_config(_tomllib().loads(toml("tied", tie, method)), base_dir=str(tmp_path))
        assert untie_lm_head(cfg, method_of(cfg), loading.read_config(cfg["model"])) is want, method
    assert jpeft.LoraConfig(target_modules=["q_proj"], modules_to_save=["head"]).saves("lm_head")  # as PEFT's endswith


def _peft_residual_folder(base, init, out, seed):
    """A PEFT adapter made with init_lora_weights=init, every LoRA tensor random, saved unconverted."""
    import copy
    import warnings

    import peft
    import torch

    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=init))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(out)
        return pm, peft.PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_peft_folders_give_peft_numbers_in_every_command(init, hf_dir, tmp_path, capsys):
    """A PEFT folder saved unconverted after a PiSSA/OLoRA init applies to the residual base PEFT
    recomputes on load: merge, export and eval refused it (UnsupportedAdapterError pointing at a
    library function); now merge equals merge_and_unload(), the export reloads in PEFT to the same
    logits, eval scores PEFT's loss, and serve (one shared base) converts it to a plain LoRA of that
    base, its bank giving PEFT's logits (it refused the folder by name)."""
    import argparse

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jpeft.cli import serve_cmd
    from jpeft.data import PackedDataset

    model_dir = hf_dir / "tiny-llama"
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    _, ref = _peft_residual_folder(base, init, tmp_path / "ad", seed=3)
    ids = torch.tensor(np.random.default_rng(0).integers(3, 200, (2, 12)))
    with torch.no_grad():
        want = ref(ids).logits.numpy()
        assert np.abs(want - base(ids).logits.numpy()).max() > 0.1  # the adapter matters

    r = jpeft_here(capsys, "merge", "--model", model_dir, "--adapter", tmp_path / "ad", "--out", tmp_path / "merged")
    assert r.returncode == 0, r.stderr
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(ids).logits.numpy()
    np.testing.assert_allclose(merged, want, atol=2e-5)

    r = jpeft_here(capsys, "export", "--model", model_dir, "--adapter", tmp_path / "ad", "--out", tmp_path / "exp")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "exp" / "adapter_config.json").read_text())["init_lora_weights"] == init
    with torch.no_grad():
        again = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "exp").eval()
        np.testing.assert_allclose(again(ids).logits.numpy(), want, atol=1e-5)

    tok = AutoTokenizer.from_pretrained(model_dir)
    ds = PackedDataset.from_file(hf_dir / "notes.txt", lambda s: tok(s, add_special_tokens=False)["input_ids"], 32,
                                 eos_id=tok.eos_token_id, bos_id=None)  # tok(s) adds no BOS
    ref_loss, _ = _torch_loss(ref, ds.input_ids, ds.loss_mask)
    base_loss, _ = _torch_loss(base, ds.input_ids, ds.loss_mask)
    r = jpeft_here(capsys, "eval", "--model", model_dir, "--adapter", tmp_path / "ad", "--data", hf_dir / "notes.txt",
                   "--seq-len", 32, "--json")
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(json.loads(r.stdout)["loss"], ref_loss, rtol=1e-5)
    if init == "pissa":  # the forgetting report: the adapted model against the original base
        r = jpeft_here(capsys, "eval", "--model", model_dir, "--adapter", tmp_path / "ad", "--canary",
                       hf_dir / "notes.txt", "--seq-len", 32, "--json")
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout)
        np.testing.assert_allclose([got["base_loss"], got["loss"]], [base_loss, ref_loss], rtol=1e-5)
        # on a quantized base: the residual is taken from the full-precision weights, then quantized (int8's
        # rounding moves the loss a little; the original base quantized instead would be the adapter-less loss)
        r = jpeft_here(capsys, "eval", "--model", model_dir, "--adapter", tmp_path / "ad", "--data",
                       hf_dir / "notes.txt", "--seq-len", 32, "--json", "--quantize", "int8")
        assert r.returncode == 0, r.stderr
        q = json.loads(r.stdout)["loss"]
        assert abs(q - ref_loss) < 0.02 * abs(ref_loss) and abs(q - ref_loss) < abs(base_loss - ref_loss) / 4

    # serve shares the --model base among adapters: the folder is converted to a plain LoRA of that base
    # (jpeft.convert_residual_adapter; it was refused by name), so the bank's rows give PEFT's logits
    args = serve_cmd.add_parser(argparse.ArgumentParser().add_subparsers()).parse_args(
        ["--model", str(model_dir), "--adapter", f"a={tmp_path / 'ad'}"])
    engine = serve_cmd.build(args).engine
    routed = engine.bank.route(["a", None])
    got = jpeft.apply(engine.model, engine.params, routed, np.asarray(ids.numpy()))
    np.testing.assert_allclose(got[0], want[0], atol=1e-4)
    with torch.no_grad():
        np.testing.assert_allclose(got[1], base(ids).logits.numpy()[1], atol=1e-4)
    merged = engine.model.apply(engine.bank.merged_params(engine.params, "a"), np.asarray(ids.numpy()))
    np.testing.assert_allclose(merged, want, atol=1e-4)


def test_residual_peft_folder_converted_by_peft_and_corda_folders(hf_dir, tmp_path, capsys):
    """PEFT's conversion (path_initial_model_for_weight_conversion) gives a plain LoRA that every
    command reads, serve included, with the same merged logits; a CorDA folder (PEFT itself
    rebuilds its base only after preprocess_corda) is refused by name, pointing at that conversion."""
    import copy
    import warnings

    import peft
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = hf_dir / "tiny-llama"
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    pm, ref = _peft_residual_folder(base, "pissa", tmp_path / "ad", seed=4)
    init_dir = tmp_path / "init"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights="pissa"))
        fresh.save_pretrained(init_dir)  # the initial factors (PEFT's SVD is deterministic), as saved before training
        pm.save_pretrained(tmp_path / "conv", path_initial_model_for_weight_conversion=str(init_dir))
    conf = json.loads((tmp_path / "conv" / "adapter_config.json").read_text())
    assert conf["init_lora_weights"] is True and conf["r"] == 8
    ids = torch.tensor(np.random.default_rng(1).integers(3, 200, (2, 12)))
    r = jpeft_here(capsys, "merge", "--model", model_dir, "--adapter", tmp_path / "conv", "--out", tmp_path / "m")
    assert r.returncode == 0, r.stderr
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()(ids).logits.numpy()
        np.testing.assert_allclose(merged, ref(ids).logits.numpy(), atol=5e-5)

    conf["init_lora_weights"] = "corda"
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(conf | {"r": 4, "lora_alpha": 8}))
    for cmd in ("merge", "export"):
        r = jpeft_here(capsys, cmd, "--model", model_dir, "--adapter", tmp_path / "ad", "--out", tmp_path / f"c-{cmd}")
        assert r.returncode == 2 and "init_lora_weights='corda'" in error_line(r.stderr)
        assert "path_initial_model_for_weight_conversion" in r.stderr and not (tmp_path / f"c-{cmd}").exists()


def test_set_init_lora_weights_takes_pefts_booleans(tmp_path):
    """`--set method.init_lora_weights=false` (PEFT's boolean, which LoraConfig maps to 'random')
    was passed on as the text 'false' once --set followed the field's declared type (str) and
    refused; the field takes str or bool, and text that is neither stays text."""
    from jpeft.cli._common import method_from_args
    from jpeft.cli.train_cmd import resolve_config
    from jpeft.cli._common import method_of

    raw = {"model": "m", "data": {"train": "t.jsonl"}, "method": {"name": "lora"}}
    for text, want in (("false", "random"), ("true", "default"), ("pissa", "pissa")):
        cfg = resolve_config(raw, [f"method.init_lora_weights={text}"], base_dir=str(tmp_path))
        assert method_of(cfg).init_weights == want
        args = type("A", (), dict(method="lora", rank=None, alpha=None, target="q_proj",
                                  method_set=[f"init_lora_weights={text}"]))
        assert method_from_args(args).init_weights == want
    assert resolve_config(raw, ["method.init_weights=nan"], base_dir=str(tmp_path))["method"]["init_weights"] == "nan"


def test_set_and_method_key_init_still_work_with_one_warning_and_a_run_started_so_resumes_as_init_weights(
        hf_dir, tmp_path, capsys):
    """LoRA's init option is ``init_weights`` (docs/METHODS.md); its former name ``init`` in a
    [method] table or a ``--set`` still works, with one ``warning:`` line naming init_weights per
    command (Python hides a DeprecationWarning outside __main__: the command shows jpeft's own).
    A run started with ``init = "gaussian"`` (its resolved_config.json records the key as written)
    resumes with ``init_weights = "gaussian"``, silently, to the uninterrupted run's adapter bit
    for bit."""
    import warnings

    from jpeft.cli._common import method_from_args
    from jpeft.cli.train_cmd import resolve_config

    args = type("A", (), dict(method="lora", rank=None, alpha=None, target="q_proj", method_set=["init=false"]))
    with pytest.warns(DeprecationWarning, match=r"LoraConfig\.init is deprecated: .*write init_weights"):
        assert method_from_args(args).init_weights == "random"  # PEFT's false
    raw = {"model": "m", "data": {"train": "t.jsonl"}, "method": {"name": "lora"}}
    # typed as its field, init_weights (str | bool): the text "nan" stays text, not TOML's float nan
    assert resolve_config(raw, ["method.init=nan"], base_dir=str(tmp_path))["method"]["init"] == "nan"
    old = _tiny_lora_run(hf_dir, tmp_path, steps=2)
    text = old.read_text()
    old.write_text(text.replace('[method]\n', '[method]\ninit = "gaussian"\n'))
    new = tmp_path / "new.toml"
    new.write_text(text.replace('[method]\n', '[method]\ninit_weights = "gaussian"\n'))

    def show(message, category, filename, lineno, file=None, line=None):  # as Python shows one (pytest records them)
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # Python's default outside __main__
        warnings.showwarning = show
        first = jpeft_here(capsys, "train", "--config", old, "--no-progress", "--max-steps", "1")
        saved = json.loads((tmp_path / "out" / "resolved_config.json").read_text())
        assert saved["method"]["init"] == "gaussian" and "init_weights" not in saved["method"]  # as written
        resumed = jpeft_here(capsys, "train", "--config", new, "--no-progress", "--resume")
        whole = jpeft_here(capsys, "train", "--config", new, "--no-progress", "--output-dir", tmp_path / "whole")
    for r in (first, resumed, whole):
        assert r.returncode == 0, r.stderr
    warned = [ln for ln in first.stderr.splitlines() if "deprecated" in ln]
    assert warned == ["jpeft train: warning: LoraConfig.init is deprecated: the option is LoraConfig.init_weights, its "
                      "name in every jpeft method's config (its Hugging Face PEFT key init_lora_weights is taken too); "
                      "write init_weights (a keyword, a [method] key, --set init_weights=...)."], first.stderr
    assert "deprecated" not in resumed.stderr + whole.stderr and "resumed from step 1" in resumed.stderr
    saved = json.loads((tmp_path / "out" / "resolved_config.json").read_text())
    assert saved["method"]["init_weights"] == "gaussian" and saved["method_config"]["init_lora_weights"] == "gaussian"
    got, ref = adapter_arrays(tmp_path / "out" / "adapter"), adapter_arrays(tmp_path / "whole" / "adapter")
    assert sorted(got) == sorted(ref) and len(ref) == 4
    for k in ref:
        assert np.abs(ref[k]).min() > 0, k  # trained: neither factor left at its init (gaussian's zero B)
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)


def test_set_values_follow_the_declared_type_of_their_field(tmp_path):
    """`--set` read `inf`, `nan`, `-inf`, `0x10`, `1e3` as numbers (TOML/JSON) even where the field
    is a string: data.train=inf ended in "must be a string, found float", method.bias=0x10 became
    16. Now a string field keeps the text; a typed method field refuses another type by name."""
    from jpeft.cli._common import method_from_args
    from jpeft.cli.train_cmd import resolve_config
    from jpeft.errors import ConfigError

    raw = {"model": "m", "data": {"train": "t.jsonl"}}
    cfg = resolve_config(raw, ["data.train=inf", "data.eval=nan", "output_dir=0x10", "data.text_field=-inf",
                               "data.prompt_field=1e3", "method.init_weights=nan", "method.bias=0x10", "train.steps=0x10",
                               'data.completion_field="true"'], base_dir=str(tmp_path))
    assert cfg["data"]["train"] == str(tmp_path / "inf") and cfg["data"]["eval"] == str(tmp_path / "nan")
    assert cfg["output_dir"] == str(tmp_path / "0x10") and cfg["data"]["text_field"] == "-inf"
    assert cfg["data"]["prompt_field"] == "1e3" and cfg["data"]["completion_field"] == "true"
    assert cfg["method"]["init_weights"] == "nan" and cfg["method"]["bias"] == "0x10" and cfg["train"]["steps"] == 16
    assert resolve_config(raw, ["data.eval=null"], base_dir=str(tmp_path))["data"].get("eval") is None
    for ov, want in (("method.r=abc", "--set method.r: expected an integer, found str 'abc'"),
                     ("method.use_rslora=1", "--set method.use_rslora: expected true or false"),
                     ("method.lora_alpha=[1]", "--set method.lora_alpha: expected a number"),
                     ("data.train=[1, 2]", "--set data.train: expected a string")):
        with pytest.raises(ConfigError, match=re.escape(want)):
            resolve_config(raw, [ov], base_dir=str(tmp_path))
    args = type("A", (), dict(method="lora", rank=None, alpha=None, target=None, method_set=["bias=0x10"]))
    with pytest.raises(ConfigError, match="bias"):  # a string field: the text itself, refused by LoraConfig by name
        method_from_args(args)
    args.method_set = ["r=1e3"]
    with pytest.raises(ConfigError, match=re.escape("--set r: expected an integer, found float '1e3'")):
        method_from_args(args)


@pytest.mark.parametrize("family, model_type, fields", [
    ("llama3", "llama", {"feedforward_modules": []}),  # was PEFT's default ["down_proj"] again
    ("llama3", "llama", {"feedforward_modules": ["v_proj"]}),
    ("gpt2", "gpt2", {"target_modules": ["c_attn", "mlp.c_proj"]}),  # was Llama's down_proj: a ConfigError
])
def test_ia3_target_defaults_fill_only_the_fields_not_given(family, model_type, fields):
    """A `[method]` table (or `--set`) giving IA3's feedforward_modules but no target_modules got
    both from PEFT's defaults for the model type: feedforward_modules = [] trained down_proj as a
    feed-forward site without a word. PEFT fills each field it is not given on its own
    (IA3Model._prepare_adapter_config); so does jpeft now, checked on the logits with PEFT's own
    random vectors."""
    import copy
    import dataclasses
    import warnings

    import jax.numpy as jnp
    import peft
    import torch

    sys.path.insert(0, os.path.dirname(__file__))
    import _models_tiny as tiny
    from jpeft.cli._common import method_from_args, method_of
    from jpeft.tree import from_hf_name

    hf, folder = tiny.hf_model(family)
    assert hf.config.model_type == model_type
    method = method_of({"method": {"name": "ia3", **fields}}, model_type=model_type)
    args = type("A", (), dict(method="ia3", rank=None, alpha=None, target=None,
                              method_set=[f"{k}={json.dumps(v)}" for k, v in fields.items()]))
    assert method_from_args(args, model_type=model_type) == method
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(hf), peft.IA3Config(init_ia3_weights=False, **fields)).eval()
    model, params = jpeft.models.from_pretrained(folder)
    adapter = jpeft.init(method, params, jax.random.key(0))
    theirs = {from_hf_name(n[len("base_model.model."):-len(".ia3_l.default")]): p.detach().numpy()
              for n, p in pm.named_parameters() if ".ia3_l." in n}
    assert sorted(adapter) == sorted(theirs)
    ff = {p: m.is_feedforward for p, m in ((from_hf_name(n[len("base_model.model."):]), m)
                                           for n, m in pm.named_modules() if hasattr(m, "is_feedforward"))}
    assert {p: n.feedforward for p, n in adapter.items()} == ff
    adapter = {p: dataclasses.replace(n, ia3_l=jnp.asarray(theirs[p].reshape(n.ia3_l.shape)))
               for p, n in adapter.items()}
    ids, mask = tiny.batch(family, seed=3)
    with torch.no_grad():
        ref = pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(tiny.positions(mask))).logits.numpy()
    got = np.asarray(jpeft.apply(model, params, adapter, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    plain = np.asarray(jpeft.apply(model, params, {}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    sel = mask.astype(bool)
    assert np.abs(ref[sel] - plain[sel]).max() > 1e-2  # the vectors matter
    np.testing.assert_allclose(got[sel], ref[sel], atol=1e-4, rtol=0)


def test_train_mica_updates_lora_a_only(hf_dir, capsys):
    """`jpeft train` with init_weights = "mica" (PEFT's MiCA): the saved adapter's lora_B is the init's, bit for
    bit (frozen: no gradient, no optimizer state), its lora_A moved from zero, and the file says "mica"."""
    cfg = write_config(hf_dir, "mica_run", steps=2, save_every=2, eval_every=2)
    r = jpeft_here(capsys, "train", "--config", cfg, "--no-progress", "--set", "method.lora_dropout=0.0",
                   "--set", 'method.init_weights="mica"')
    assert r.returncode == 0, r.stderr
    saved = adapter_arrays(hf_dir / "mica_run" / "adapter")
    config, trained = jpeft.load_adapter(str(hf_dir / "mica_run" / "adapter"),
                                         jpeft.models.from_pretrained(str(hf_dir / "tiny-llama"))[1])
    assert config.init_weights == "mica" and len(trained) == 6 and all(n.frozen_b for n in trained.values())
    start = jpeft.init(config, jpeft.models.from_pretrained(str(hf_dir / "tiny-llama"))[1], jax.random.key(0))
    for path, node in trained.items():
        np.testing.assert_array_equal(node.lora_B, start[path].lora_B)
        assert float(np.abs(np.asarray(node.lora_A)).min()) > 0
    assert len(saved) == 12


def test_info_on_a_peft_folder_jpeft_cannot_load_says_so(tmp_path, capsys):
    """`jpeft info` on a PEFT folder of a type jpeft has no format for (FourierFT, HRA, saved by peft)
    described the file and exited 0 without a word that `load_peft`, `merge` and `export` refuse it;
    now one line names the refusal (the supported types), still rc 0; a LoRA folder gets no such line."""
    import copy

    import peft

    sys.path.insert(0, os.path.dirname(__file__))
    import _models_tiny as tiny

    base, _ = tiny.hf_model("llama2")
    cases = {"fourierft": peft.FourierFTConfig(n_frequency=8, target_modules=["q_proj"]),
             "hra": peft.HRAConfig(r=2, target_modules=["q_proj"]),
             "lora": peft.LoraConfig(r=2, target_modules=["q_proj"])}
    for name, cfg in cases.items():
        peft.get_peft_model(copy.deepcopy(base), cfg).save_pretrained(tmp_path / name)
        r = jpeft_here(capsys, "info", tmp_path / name)
        assert r.returncode == 0, r.stderr
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("jpeft cannot load")]
        res = json.loads(jpeft_here(capsys, "info", tmp_path / name, "--json").stdout)
        if name == "lora":
            assert not lines and "jpeft_cannot_load" not in res, r.stdout
            continue
        with pytest.raises(jpeft.errors.UnsupportedAdapterError) as e:
            jpeft.hf.peft_config(str(tmp_path / name))
        assert len(lines) == 1 and cfg.peft_type.value in lines[0] and "'LORA'" in lines[0], r.stdout
        assert lines[0].endswith(str(e.value)) and res["jpeft_cannot_load"].endswith(str(e.value))
