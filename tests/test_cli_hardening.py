"""Issue 16: the ``jpeft`` command ends every bad input in one stderr line and exit status 2
(never a traceback): wrongly typed or non-finite config values, binary or deeply nested
files, a broken ``config.json`` for ``jpeft info``, a read-only output place, a closed pipe."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
import sys

import pytest

from jpeft.cli import main

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", XLA_PYTHON_CLIENT_PREALLOCATE="false")


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny random Llama saved by transformers with a byte-level BPE tokenizer trained here,
    a training file and a valid config (nothing downloaded)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("clih")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20,
                            trainers.BpeTrainer(vocab_size=280, special_tokens=["<s>", "</s>"], show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(root / "m")
    fast.save_pretrained(root / "m")
    (root / "train.jsonl").write_text("".join(json.dumps({"text": "the quick brown fox " * 8}) + "\n" for _ in range(8)))
    return root


def config(root, extra_train="", method='name = "lora"\nr = 2\ntarget_modules = ["q_proj"]', data="train.jsonl",
           top=""):
    p = root / "c.toml"
    p.write_text(f'model = "m"\noutput_dir = "out"\n{top}\n[data]\ntrain = "{data}"\nseq_len = 16\n'
                 f"[method]\n{method}\n[train]\nsteps = 2\nbatch_size = 2\n{extra_train}\n")
    return p


@pytest.mark.parametrize("extra, top, method, expect", [
    ("learning_rate = nan", "", None, "train.learning_rate must be a finite number > 0, found float 'nan'"),
    ("learning_rate = inf", "", None, "train.learning_rate must be a finite number > 0"),
    ("learning_rate = \"1e-3\"", "", None, "train.learning_rate must be a number (e.g. 2e-4), found str '1e-3'"),
    ("weight_decay = \"x\"", "", None, "train.weight_decay must be a number"),
    ("max_grad_norm = [1]", "", None, "train.max_grad_norm must be a number"),
    ("max_grad_norm = -inf", "", None, "train.max_grad_norm must be a finite number >= 0"),
    ("", "seed = 1.5", None, "seed must be an integer in [0, 2**63), found float"),
    ("", "seed = -1", None, "seed must be an integer in [0, 2**63), found int '-1'"),  # numpy's traceback after loading
    ("", "", 'name = "lora"\ntarget_modules = 5', "target_modules must be a regex string or a list of module names"),
    ("", "", 'name = "lora"\ntarget_modules = "("', "is not a valid module-path regex"),
    ("", "", 'name = "lora"\nrank_pattern = 5', "rank_pattern must be a dict"),
    ("", "", 'name = "lora"\nlora_alpha = inf', "LoraConfig.alpha must be a finite number, found float inf"),
    # booleans were read as 0 / 1 (a `warmup_steps = true` run warmed up for one step)
    ("warmup_steps = true", "", None, "train.warmup_steps must be a non-negative integer, found True"),
    ("eval_every = false", "", None, "train.eval_every must be a non-negative integer, found False"),
    ("keep_checkpoints = true", "", None, "train.keep_checkpoints must be >= 1, found True"),
    # two names of one field: one value was dropped silently
    ("", "", 'name = "lora"\nlora_alpha = 16\nalpha = 32', "got both 'lora_alpha' (16) and 'alpha' (32)"),
    # a quoted "false" is a non-empty string, so true: rsLoRA's alpha / sqrt(r) scale, DoRA, ... were switched on
    ("", "", 'name = "lora"\nr = 2\nuse_rslora = "false"', "LoraConfig.use_rslora must be true or false, found str "
                                                          "'false' (a quoted string counts as true"),
    ("", "", 'name = "lora"\nr = 2\nuse_dora = 0', "LoraConfig.use_dora must be true or false, found int 0"),
    ("", "", 'name = "oft"\nr = 2\noft_block_size = 0\ncoft = "no"', "OFTConfig.coft must be true or false"),
    ("", "", 'name = "prefix_tuning"\nnum_virtual_tokens = 2\nprefix_projection = "false"',
     "PrefixTuningConfig.prefix_projection must be true or false"),
])
def test_bad_train_values_are_one_line(folder, capsys, extra, top, method, expect):
    cfg = config(folder, extra, top=top, **({"method": method} if method else {}))
    assert main(["train", "--config", str(cfg), "--no-progress"]) == 2
    assert expect in one_line(capsys.readouterr().err)


def test_bad_packing_is_refused_before_the_model_is_loaded(folder, capsys, monkeypatch):
    """It was an InputValidationError raised after loading the model."""
    import jpeft.cli._trainer as trainer

    monkeypatch.setattr(trainer, "load_folder", lambda *a, **k: pytest.fail("the model was loaded"))
    cfg = config(folder, data='train.jsonl"\npacking = "doc')
    assert main(["train", "--config", str(cfg), "--no-progress"]) == 2
    assert 'ConfigError: data.packing must be "documents" or "stream", found \'doc\'' in one_line(capsys.readouterr().err)


def test_a_method_given_by_its_peft_type_is_the_one_trained_and_a_second_name_is_refused(folder, capsys, monkeypatch):
    """`[method] peft_type = "VERA"` (the key of PEFT's adapter_config.json, which the docs say the table
    takes) trained LoRA without a word: the default `name = "lora"` won over it. Two names of two
    methods are refused before the model is loaded."""
    import jpeft
    import jpeft.cli._trainer as trainer
    from jpeft.cli._common import method_of
    from jpeft.cli.train_cmd import resolve_config

    raw = {"model": "m", "data": {"train": "t.jsonl"}}
    assert isinstance(method_of(resolve_config(dict(raw, method={"peft_type": "VERA", "r": 2}))), jpeft.VeraConfig)
    assert isinstance(method_of(resolve_config(raw, ["method.peft_type=LOHA"])), jpeft.LoHaConfig)
    assert isinstance(method_of(resolve_config(dict(raw, method={"peft_type": "LORA", "name": "lora"}))),
                      jpeft.LoraConfig)
    assert resolve_config(raw)["method"] == {"name": "lora"}  # the default, as saved in resolved_config.json
    monkeypatch.setattr(trainer, "load_folder", lambda *a, **k: pytest.fail("the model was loaded"))
    cfg = config(folder, method='name = "lora"\npeft_type = "VERA"\nr = 2')
    assert main(["train", "--config", str(cfg), "--no-progress"]) == 2
    assert "[method] gives name = 'lora' and peft_type = 'VERA', two different methods" in one_line(
        capsys.readouterr().err)


def test_data_files_and_the_row_length_are_refused_before_the_model_is_loaded(folder, capsys, monkeypatch):
    """A misspelt data.train, data.eval or forgetting.canary path and a bad JSON line were named only
    once the whole base model had been read (minutes for a 7B model). (A seq_len past a learned
    position table: test_cli.py, test_rows_past_a_learned_position_table_are_refused_by_name_....)"""
    import jpeft.cli._trainer as trainer

    monkeypatch.setattr(trainer, "load_folder", lambda *a, **k: pytest.fail("the model was loaded"))
    (folder / "bad.jsonl").write_text('{"text": "a"}\n{"text": \n')
    for data, sets, expect in (
            ("trian.jsonl", [], "LoadError: dataset file '" + str(folder / "trian.jsonl") + "' does not exist"),
            ('train.jsonl"\neval = "evl.jsonl', [], "dataset file '" + str(folder / "evl.jsonl") + "' does not exist"),
            ("bad.jsonl", [], "bad.jsonl:2: not valid JSON"),
            ("train.jsonl", ["forgetting.canary=canary.txt", "forgetting.max_kl=1.0"],
             "dataset file '" + str(folder / "canary.txt") + "' does not exist")):
        cfg = config(folder, data=data)
        argv = ["train", "--config", str(cfg), "--no-progress"] + [a for s in sets for a in ("--set", s)]
        assert main(argv) == 2
        assert expect in one_line(capsys.readouterr().err)


def test_a_residual_base_init_is_refused_before_the_model_is_loaded_with_what_jpeft_train_takes(folder, capsys,
                                                                                                monkeypatch):
    """`init_lora_weights = "pissa"` (or olora, milora, pissa_niter_K) was refused by jpeft.init only once
    the whole base had been loaded, with advice for Python ("create it with jpeft.init_pissa(config,
    params, key, ...)") that a [method] table cannot follow. It is now refused before loading, saying
    what jpeft train takes instead."""
    import jpeft.cli._trainer as trainer

    monkeypatch.setattr(trainer, "load_folder", lambda *a, **k: pytest.fail("the model was loaded"))
    for init, entry in (("pissa", "init_pissa"), ("olora", "init_olora"), ("pissa_niter_4", "init_pissa"),
                        ("milora", "init_milora")):
        cfg = config(folder, method=f'name = "lora"\nr = 2\ntarget_modules = ["q_proj"]\ninit_lora_weights = "{init}"')
        assert main(["train", "--config", str(cfg), "--no-progress"]) == 2
        line = one_line(capsys.readouterr().err)
        assert f"ConfigError: [method] init_lora_weights = '{init}' takes the initial adapter out of the base" in line
        assert "Give init_lora_weights = true (PEFT's default) or \"gaussian\"" in line and f"jpeft.{entry}(" in line
    assert not (folder / "out").exists()


def test_lora_trainable_biases_on_a_scanned_model_are_refused_before_the_model_is_loaded(folder, capsys, monkeypatch):
    """LoRA with ``bias = "all"`` or ``"lora_only"`` and ``train.scan_layers = true`` was refused only once the
    whole base had been loaded (trainable base biases are not implemented for stacked layers)."""
    import jpeft.cli._trainer as trainer

    monkeypatch.setattr(trainer, "load_folder", lambda *a, **k: pytest.fail("the model was loaded"))
    for bias in ("all", "lora_only"):
        cfg = config(folder, method=f'name = "lora"\nr = 2\ntarget_modules = ["q_proj"]\nbias = "{bias}"',
                     extra_train="scan_layers = true")
        assert main(["train", "--config", str(cfg), "--no-progress"]) == 2
        line = one_line(capsys.readouterr().err)
        assert (f"method lora cannot train a layer-scanned model (train.scan_layers = true): bias = '{bias}' "
                "(trainable base biases). Set train.scan_layers = false.") in line


def test_resume_names_a_key_added_to_the_method_table_before_loading(folder, capsys, monkeypatch):
    """A key added to [method] on --resume (use_rslora = true: another scale) passed the settings check,
    which skips keys an older jpeft did not save, and was refused only once the model was loaded, by the
    checkpoint's own check in the library's words ("Create the CheckpointManager with ...")."""
    import jpeft.cli._trainer as trainer

    argv = ["train", "--config", str(config(folder)), "--no-progress", "--output-dir", str(folder / "out_resume")]
    assert main(argv + ["--max-steps", "1"]) == 0
    capsys.readouterr()
    monkeypatch.setattr(trainer, "load_folder", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(argv + ["--resume", "--set", "method.use_rslora=true"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "--resume would continue the run" in line and "method.use_rslora: false -> true" in line


def test_resume_compares_the_method_config_the_table_resolves_to(folder, capsys):
    """--resume compared the [method] table key by key as written, so the same method config spelt
    another way was refused: ``alpha`` for ``lora_alpha``, or a key added at its default value
    (``use_rslora = false``, ``lora_alpha = 8`` where 8 was the default). It now compares the
    resolved method config: those resume, a changed value is still refused, in the field's own name."""
    argv = ["train", "--config", str(config(folder, method='name = "lora"\nr = 2\nlora_alpha = 4\n'
                                                          'target_modules = ["q_proj"]')),
            "--no-progress", "--output-dir", str(folder / "out_resolved"), "--set", "train.steps=3"]
    assert main(argv + ["--max-steps", "1"]) == 0
    capsys.readouterr()
    assert main(argv + ["--resume", "--max-steps", "2", "--set", "method.use_rslora=false"]) == 0
    assert "resumed from step 1" in capsys.readouterr().err
    # the table written again with alpha for lora_alpha (PEFT's key or jpeft's, both read)
    spelt = config(folder, method='peft_type = "LORA"\nr = 2\nalpha = 4\ntarget_modules = ["q_proj"]')
    argv2 = ["train", "--config", str(spelt), "--no-progress", "--output-dir", str(folder / "out_resolved"),
             "--set", "train.steps=3"]
    assert main(argv2 + ["--resume"]) == 0
    assert "resumed from step 2" in capsys.readouterr().err
    assert main(argv2 + ["--resume", "--set", "method.alpha=8"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "--resume would continue the run" in line and "method.lora_alpha: 4 -> 8" in line


def test_resume_refuses_alpha_pattern_keys_in_another_order(folder, capsys):
    """rank_pattern / alpha_pattern take the first matching key (PEFT's get_pattern_key), but --resume
    compared them as unordered dicts: a run trained with layer 0's q_proj at alpha 1 resumed with its
    alpha_pattern keys swapped, which gives that module alpha 3 (another scale, the same shapes, so no
    checkpoint check saw it) and trained on from its checkpoint as another adapter. It is now refused
    by name, saying that the keys came in another order; the same order resumes."""
    def table(order):
        keys = {"q_proj": 1.0, "layers.0.self_attn.q_proj": 3.0}
        pairs = ", ".join(f'"{k}" = {keys[k]}' for k in order)
        return f'name = "lora"\nr = 2\ntarget_modules = ["q_proj"]\nalpha_pattern = {{ {pairs} }}'

    out = str(folder / "out_order")
    same = table(["q_proj", "layers.0.self_attn.q_proj"])
    argv = ["train", "--no-progress", "--output-dir", out, "--set", "train.steps=3"]
    assert main(argv + ["--config", str(config(folder, method=same)), "--max-steps", "1"]) == 0
    saved = json.loads((folder / "out_order" / "resolved_config.json").read_text())
    assert list(saved["method_config"]["alpha_pattern"]) == ["q_proj", "layers.0.self_attn.q_proj"]
    capsys.readouterr()
    swapped = config(folder, method=table(["layers.0.self_attn.q_proj", "q_proj"]))
    assert main(argv + ["--config", str(swapped), "--resume", "--max-steps", "2"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "--resume would continue the run" in line
    assert ('method.alpha_pattern: {"q_proj": 1.0, "layers.0.self_attn.q_proj": 3.0} -> {"layers.0.self_attn.q_proj": '
            '3.0, "q_proj": 1.0} (the same keys in another order: the first key that matches a module gives it its '
            'value)') in line
    assert main(argv + ["--config", str(config(folder, method=same)), "--resume"]) == 0
    assert "resumed from step 1" in capsys.readouterr().err


def test_processes_given_pattern_keys_in_another_order_do_not_agree(monkeypatch):
    """The processes of a multi-host run agree on a digest of their settings, written with sorted keys,
    so one given alpha_pattern's keys in another order (another alpha for a module both keys match)
    agreed and trained a mix of two adapters. Each first-match-ordered field's order now counts; the
    order of the keys of a table whose order means nothing ([train]) still does not."""
    import hashlib

    import numpy as np

    import jpeft.cli._trainer as trainer
    from jpeft.errors import ConfigError

    def settings(alphas, train):
        return {"model": "m", "output_dir": "o", "train": train,
                "method": {"name": "lora", "r": 2, "alpha_pattern": alphas}}

    def rows(cfg):  # this process's digests, as _gather_digests hashes them
        got = []
        monkeypatch.setattr(trainer, "_gather_digests", lambda parts, extra=None: got.append(
            np.stack([np.frombuffer(hashlib.sha256(v).digest(), np.uint32) for _, _, v in parts]
                     + [np.full(8, extra or 0, np.uint32)])) or np.stack([got[-1]]))
        trainer._check_settings_agree(cfg, {"resume": False, "max_steps": None})
        return got[-1]

    def agree(a, b):
        other, mine = rows(b), rows(a)  # process 1's, process 0's (this one)
        monkeypatch.setattr(trainer, "_gather_digests", lambda parts, extra=None: np.stack([mine, other]))
        trainer._check_settings_agree(a, {"resume": False, "max_steps": None})

    ordered, train = {"q_proj": 1.0, "layers.0.self_attn.q_proj": 3.0}, {"steps": 2, "seed": 0}
    agree(settings(ordered, train), settings(dict(ordered), dict(reversed(train.items()))))
    with pytest.raises(ConfigError, match=r"process\(es\) \[1\] of this job were given different settings"):
        agree(settings(ordered, train), settings(dict(reversed(ordered.items())), train))


def test_resume_of_a_run_an_earlier_jpeft_saved_with_peft_type_alone(tmp_path):
    """An earlier jpeft saved ``name = "lora"`` in every resolved [method] table; a run started with
    ``peft_type = "LORA"`` alone (as in adapter_config.json) was then refused on --resume
    ("method.name: "lora" -> null"), though it names the method it trained. A saved name of another
    method (``peft_type = "VERA"`` trained LoRA then) is still refused."""
    import copy

    from jpeft.cli._trainer import _check_resumable
    from jpeft.cli.train_cmd import resolve_config
    from jpeft.errors import ConfigError

    for ptype, ok in (("LORA", True), ("VERA", False)):
        raw = {"model": "m", "output_dir": "run", "data": {"train": "t.jsonl"}, "method": {"peft_type": ptype, "r": 2}}
        cfg = resolve_config(raw, base_dir=str(tmp_path))
        saved = copy.deepcopy(cfg)
        saved["method"] = {"name": "lora", **saved["method"]}  # as the earlier jpeft resolved it
        (tmp_path / "resolved_config.json").write_text(json.dumps(saved))
        if ok:
            _check_resumable(str(tmp_path), cfg)
        else:
            with pytest.raises(ConfigError, match=r"--resume would continue the run .*method.name: \"lora\" -> null"):
                _check_resumable(str(tmp_path), cfg)


def test_bad_train_values_from_the_command_line(folder, capsys):
    cfg = config(folder)
    for sets, expect in ([["train.learning_rate=\"1e-3\""], "train.learning_rate must be a number"],
                         [["method=5"], "[method] must be a table"],
                         [["data.seq_len=\"x\""], "data.seq_len must be a positive integer"],
                         # "" was the config file's own folder
                         [["output_dir="], "output_dir must be a non-empty string (a path), found str ''"],
                         # was "'model' is not a section.", with no word of what to do
                         [["model.quantize=nf4"], "--set model.quantize: model is a value (str 'm'), not a table with "
                                                  "keys; set it whole with --set model=VALUE (a quantized base: "
                                                  "--set quantize=VALUE)."]):
        argv = ["train", "--config", str(cfg), "--no-progress"] + [a for s in sets for a in ("--set", s)]
        assert main(argv) == 2
        assert expect in one_line(capsys.readouterr().err)
    # an empty --output-dir was ignored: the run was written into the config's output_dir
    assert main(["train", "--config", str(cfg), "--no-progress", "--output-dir", ""]) == 2
    assert "--output-dir is empty" in one_line(capsys.readouterr().err)
    (folder / "s.toml").write_text('method = "lora"\nmodel = "m"\n[data]\ntrain = "train.jsonl"\n')
    assert main(["train", "--config", str(folder / "s.toml")]) == 2
    assert "[method] must be a table" in one_line(capsys.readouterr().err)


def test_binary_nested_and_non_utf8_inputs_are_one_line(folder, capsys):
    (folder / "bin.jsonl").write_bytes(b"\xff\xfe\x00\x81" * 100)
    (folder / "deep.jsonl").write_text("[" * 60000 + "]" * 60000 + "\n")
    (folder / "bin.txt").write_bytes(bytes(range(256)) * 4)
    for data, expect in (("bin.jsonl", "is not UTF-8 text"), ("bin.txt", "is not UTF-8 text"),
                         ("deep.jsonl", "nested too deeply")):
        assert main(["train", "--config", str(config(folder, data=data)), "--no-progress"]) == 2
        assert expect in one_line(capsys.readouterr().err)
    toml = folder / "bad.toml"
    for body, expect in ((b"\xff\xfe model = 1", "not UTF-8"), (b"a = " + b"[" * 60000 + b"]" * 60000, "nested too deeply")):
        toml.write_bytes(body)
        assert main(["train", "--config", str(toml)]) == 2
        assert expect in one_line(capsys.readouterr().err)


def test_info_on_broken_config_json_is_one_line(folder, capsys, tmp_path):
    good = json.loads((folder / "m" / "config.json").read_text())
    cases = [(b"{not json", "not valid JSON"), (b"[1, 2]", "must hold a JSON object"), (bytes(range(256)), "not valid JSON"),
             (json.dumps(dict(good, num_attention_heads=0)).encode(), "num_heads must be a positive integer, found 0"),
             (json.dumps(dict(good, num_hidden_layers="x")).encode(), ""),
             (json.dumps(dict(good, num_hidden_layers=20000)).encode(), "20,000 layers is more than")]
    for i, (body, expect) in enumerate(cases):
        d = tmp_path / f"m{i}"
        d.mkdir()
        (d / "config.json").write_bytes(body)
        assert main(["info", str(d)]) == 2, body[:60]
        assert expect in one_line(capsys.readouterr().err)


def test_export_and_merge_to_an_unwritable_place_are_one_line(folder, capsys, tmp_path):
    import jax

    import jpeft
    from jpeft.models import from_pretrained

    _, params = from_pretrained(str(folder / "m"))
    cfg = jpeft.LoraConfig(r=2, target_modules=["q_proj"])
    jpeft.save_adapter(tmp_path / "a", cfg, jpeft.init(cfg, params, jax.random.key(0)), params=params)
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder would go")
    for cmd in ("export", "merge"):
        # /proc refuses new entries even to root: a read-only place
        for out in ("/proc/jpeft-out", str(blocker / "out")):
            assert main([cmd, "--model", str(folder / "m"), "--adapter", str(tmp_path / "a"), "--out", out]) == 2
            line = one_line(capsys.readouterr().err)
            assert line.startswith(f"jpeft {cmd}: error: "), line
    # an empty --base-name was replaced by --model's path without a word; nothing is written
    assert main(["export", "--model", str(folder / "m"), "--adapter", str(tmp_path / "a"), "--out",
                 str(tmp_path / "named"), "--base-name", " "]) == 2
    assert "ConfigError: --base-name is empty" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "named").exists()


def test_merge_force_over_an_earlier_output_leaves_it_whole_when_the_disk_fills(folder, capsys, tmp_path, monkeypatch):
    """`jpeft merge --force` over an earlier merged folder copied config.json and the tokenizer
    files over the old ones in place, after the new weights: a full disk (or a kill) left a
    half-written config.json (the earlier model no longer loads) and a raw OSError. Every file
    now goes under a temporary name first; the earlier output stays as it was."""
    import hashlib
    import shutil

    import jax

    import jpeft
    from jpeft.models import from_pretrained

    _, params = from_pretrained(str(folder / "m"))
    cfg = jpeft.LoraConfig(r=2, target_modules=["q_proj"])
    jpeft.save_adapter(tmp_path / "a", cfg, jpeft.init(cfg, params, jax.random.key(0)), params=params)
    out = tmp_path / "merged"
    args = ["merge", "--model", str(folder / "m"), "--adapter", str(tmp_path / "a"), "--out", str(out)]
    assert main(args) == 0
    def digest():
        return {n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in sorted(os.listdir(out))}

    before = digest()
    real = shutil.copyfile

    def disk_full(src, dst, *a, **k):
        if "config.json" in os.path.basename(dst):  # half the file written, then no space left
            data = open(src, "rb").read()
            with open(dst, "wb") as f:
                f.write(data[: len(data) // 2])
            raise OSError(28, "No space left on device", dst)
        return real(src, dst, *a, **k)

    monkeypatch.setattr(shutil, "copyfile", disk_full)
    capsys.readouterr()
    assert main(args + ["--force"]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("jpeft merge: error: SaveError:") and "No space left" in line, line
    assert digest() == before


def test_merge_force_over_an_earlier_export_removes_its_adapter_files(folder, capsys, tmp_path):
    """`jpeft merge --force` into a folder holding an earlier `jpeft export` left its
    adapter_config.json and adapter_model.safetensors beside the merged model, so transformers'
    from_pretrained(out) loaded the base named there with the old adapter attached instead of the
    merged weights (logits 4.5 off on a tiny Llama). They are removed once the merge is in place."""
    import jax
    import numpy as np

    import jpeft
    from jpeft.models import from_pretrained

    _, params = from_pretrained(str(folder / "m"))
    cfg = jpeft.LoraConfig(r=2, target_modules=["q_proj"], init_weights="random")  # every adapter tensor random
    jpeft.save_adapter(tmp_path / "a", cfg, jpeft.init(cfg, params, jax.random.key(0)), params=params)
    out = tmp_path / "out"
    common = ["--model", str(folder / "m"), "--adapter", str(tmp_path / "a"), "--out", str(out)]
    assert main(["export", *common]) == 0
    assert main(["merge", *common, "--force"]) == 0
    names = set(os.listdir(out))
    assert "model.safetensors" in names and "config.json" in names
    assert not names & {"adapter_config.json", "adapter_model.safetensors"}, names


def test_merge_into_a_bfloat16_checkpoint_says_when_the_rounding_loses_the_update(folder, tmp_path):
    """`jpeft merge` computes in float32 and writes a bfloat16 checkpoint's tensors in bfloat16, as PEFT's
    merge_and_unload() does; a small update then mostly rounds away in the written weights, with no word
    (jpeft.merge into bfloat16 params warned). Now the command warns too; a large update stays quiet."""
    import dataclasses
    import warnings

    import jax
    import torch
    from transformers import LlamaForCausalLM

    import jpeft
    from jpeft.models import from_pretrained

    LlamaForCausalLM.from_pretrained(str(folder / "m"), dtype=torch.bfloat16).save_pretrained(tmp_path / "m16")
    _, params = from_pretrained(str(tmp_path / "m16"))  # float32, as `jpeft merge` loads it
    cfg = jpeft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_weights="random")  # every adapter tensor random
    big = jpeft.init(cfg, params, jax.random.key(0))
    small = {p: dataclasses.replace(n, lora_B=n.lora_B * 1e-4) for p, n in big.items()}  # ~40% rounds away
    for name, ad in (("small", small), ("big", big)):
        jpeft.save_adapter(tmp_path / name, cfg, ad, params=params)
    common = ["--model", str(tmp_path / "m16"), "--out"]
    with pytest.warns(UserWarning, match=r"jpeft merge \(writing the base's 16-bit dtype\): the merged weights are "
                                         r"bfloat16, whose rounding lost \d+% of the adapter's update"):
        assert main(["merge", *common, str(tmp_path / "o1"), "--adapter", str(tmp_path / "small")]) == 0
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*whose rounding lost")
        assert main(["merge", *common, str(tmp_path / "o2"), "--adapter", str(tmp_path / "big")]) == 0


def test_packing_warnings_name_the_file_they_are_about(folder, tmp_path):
    """A packing warning of `jpeft train` (here: a prompt longer than seq_len) did not say whether it was
    about data.train, data.eval or the forgetting canary; it now names the key and the file."""
    (folder / "ev.jsonl").write_text(json.dumps({"prompt": "the quick brown fox " * 4, "completion": " dog"}) + "\n")
    cfg = config(folder, data='train.jsonl"\neval = "ev.jsonl', extra_train="eval_every = 2")
    with pytest.warns(UserWarning, match=r"^data\.eval \(.*ev\.jsonl\): in 1 document\(s\) the first target token"):
        assert main(["train", "--config", str(cfg), "--no-progress", "--output-dir", str(tmp_path / "o")]) == 0


def test_closed_pipe_and_subprocess_exit_codes(folder):
    r = subprocess.run(f"{sys.executable} -m jpeft.cli info llama-2-7b | head -1", shell=True, capture_output=True,
                       text=True, env=ENV, timeout=300)
    assert r.stdout.startswith("model: llama-2-7b") and r.stderr.strip() == "", r.stderr
    cfg = config(folder, "learning_rate = nan")
    r = subprocess.run([sys.executable, "-m", "jpeft.cli", "train", "--config", str(cfg)], capture_output=True,
                       text=True, env=ENV, timeout=300)
    assert r.returncode == 2 and "learning_rate must be a finite number" in one_line(r.stderr)


def test_a_tokenizer_larger_than_the_model_is_one_line(folder, capsys, tmp_path, monkeypatch):
    """Token ids past the embedding table would be clamped to its last row (``loss`` finite but
    wrong, or NaN): ``jpeft eval`` and ``jpeft train`` refuse the pair up front, before the weights
    are read (they were read first)."""
    import shutil

    import jpeft.cli._model as cli_model

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    small = tmp_path / "small"
    shutil.copytree(folder / "m", small)
    cfg = json.loads((small / "config.json").read_text())
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k in LlamaConfig().to_dict() and k != "vocab_size"},
                                      vocab_size=cfg["vocab_size"] - 20))
    hf.save_pretrained(small)
    capsys.readouterr()  # transformers' own progress output
    assert main(["eval", "--model", str(small), "--data", str(folder / "train.jsonl"), "--seq-len", "16"]) == 2
    assert "have no embedding row" in one_line(capsys.readouterr().err)
    (folder / "small").exists() or shutil.copytree(small, folder / "small")
    monkeypatch.setattr(cli_model, "from_pretrained", lambda *a, **k: pytest.fail("the weights were read"))
    assert main(["train", "--config", str(config(folder, top="").with_name("c.toml")), "--no-progress",
                 "--set", 'model="small"']) == 2
    assert "have no embedding row" in one_line(capsys.readouterr().err)


def test_a_tokenizer_whose_ids_pass_the_model_is_refused_though_it_has_fewer_tokens(tmp_path, capsys):
    """A vocabulary may skip ids: 6 tokens with ids up to 40 passed the count check against
    vocab_size 16, and ``jpeft eval`` on a text holding the token of id 40 printed ``loss nan``
    (no batch check sees its rows)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "a": 2, "b": 3, "c": 4, "zz": 40}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")
    assert len(fast) == 6 and fast("a zz")["input_ids"] == [2, 40]
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                 eos_token_id=1)).save_pretrained(tmp_path / "m")
    fast.save_pretrained(tmp_path / "m")
    (tmp_path / "e.jsonl").write_text("".join(json.dumps({"text": "a b zz a zz c a b"}) + "\n" for _ in range(4)))
    capsys.readouterr()
    assert main(["eval", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "e.jsonl"), "--seq-len", "16"]) == 2
    err = one_line(capsys.readouterr().err)
    assert "has 6 tokens with ids up to 40 but the model's vocab_size is 16" in err and "no embedding row" in err


@pytest.mark.parametrize("content", ["{}", "null", '{"added_tokens": 5}', '{"added_tokens": [], "model": {"type": "x"}}'])
def test_a_malformed_tokenizer_json_is_one_line(folder, tmp_path, capsys, content):
    """A tokenizer.json that is JSON but not a tokenizer raised transformers' KeyError, TypeError or
    AttributeError, or the tokenizers library's bare Exception, as a traceback."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(folder / "m", bad)
    (bad / "tokenizer.json").write_text(content)
    assert main(["eval", "--model", str(bad), "--data", str(folder / "train.jsonl"), "--seq-len", "16"]) == 2
    err = one_line(capsys.readouterr().err)
    assert "LoadError: no usable tokenizer in" in err and "tokenizer.save_pretrained" in err


def _python_for_a_while(seconds: float = 10.0):
    """Runs Python code for ``seconds``: where a Ctrl-C delivered again lands (one long sleep in
    C would see it only at its end)."""
    import time

    deadline = time.time() + seconds
    while time.time() < deadline:
        time.sleep(0.01)


def test_ctrl_c_swallowed_by_a_gc_callback_still_stops_the_command(monkeypatch, capsys):
    """A Ctrl-C that Python raises inside a callback whose exceptions it ignores (here a gc
    callback, as JAX installs one) is delivered again, so the command stops with status 130
    instead of finishing and exiting 0 (issue #16, item 13)."""
    import gc

    import jpeft.cli.info_cmd as info_cmd

    fired, finished = [], []

    def raise_once(phase, info):
        if not fired:
            fired.append(phase)
            raise KeyboardInterrupt

    def run(args):
        gc.callbacks.append(raise_once)
        try:
            gc.collect()  # the interrupt is raised in the callback and printed as "ignored" by default
        finally:
            gc.callbacks.remove(raise_once)
        _python_for_a_while()
        finished.append(True)
        return 0

    monkeypatch.setattr(info_cmd, "run", run)
    # a user's shell starts jpeft with Python's Ctrl-C handler; a test worker may have inherited
    # SIGINT ignored (seen in loaded suite runs), under which Ctrl-C can never arrive
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert main(["info", "llama-2-7b"]) == 130
    finally:
        signal.signal(signal.SIGINT, previous)
    assert fired and not finished
    assert one_line(capsys.readouterr().err) == "jpeft info: interrupted"


def test_ctrl_c_swallowed_silently_still_stops_the_command(monkeypatch, capsys):
    """A Ctrl-C whose KeyboardInterrupt is discarded without a word (C code that clears errors,
    an ``except BaseException`` that goes on) is delivered again once it is gone, so the command
    stops with status 130 instead of finishing and exiting 0 (a start-up run once trained on
    past its Ctrl-C); and a ``threading.Timer`` the interrupt kept from being cancelled is
    cancelled, so the process does not wait for it before exiting (a start-up run once hung a
    minute after its one line, JAX's backend start-up timer)."""
    import signal
    import threading
    import time

    import jpeft.cli.info_cmd as info_cmd

    swallowed, finished, timers = [], [], []

    def run(args):
        # as JAX's backend start-up: a timer cancelled in a `finally` the interrupt never reaches
        timers.append(threading.Timer(60, finished.append, (False,)))
        timers[0].start()
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the interrupt lands here
        except BaseException as e:  # noqa: BLE001 - the code under test must survive exactly this
            swallowed.append(type(e))
        _python_for_a_while()
        finished.append(True)
        return 0

    monkeypatch.setattr(info_cmd, "run", run)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as from a shell (see above)
    try:
        assert main(["info", "llama-2-7b"]) == 130
    finally:
        signal.signal(signal.SIGINT, previous)
    assert swallowed and issubclass(swallowed[0], KeyboardInterrupt) and not finished
    assert one_line(capsys.readouterr().err) == "jpeft info: interrupted"
    assert signal.getsignal(signal.SIGINT) is previous
    # the timer left running is cancelled: Python would wait the minute for it before exiting
    timers[0].join(timeout=5)
    assert not timers[0].is_alive() and not finished


def _wait_for_the_launcher(p, timeout=30.0):
    """Until the launcher's code runs in ``p`` (the moments are counted from there): a Ctrl-C
    while the interpreter itself starts (its `site` import, before any code of ours) ends
    Python with its own fatal error, which no program can catch. On Linux with glibc the
    re-executed command line (`-m _jpeft_launcher`) marks it; elsewhere a fixed 0.2 s."""
    import time

    import _jpeft_launcher as L

    reexec = L.huge_pages_env(ENV)["GLIBC_TUNABLES"] != ENV.get("GLIBC_TUNABLES", "")
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc" or \
            ENV.get("JPEFT_HUGE_PAGES") == "0" or not reexec:
        time.sleep(0.2)
        return
    end = time.monotonic() + timeout
    while time.monotonic() < end and p.poll() is None:
        try:
            with open(f"/proc/{p.pid}/cmdline", "rb") as f:
                if b"-m\0_jpeft_launcher" in f.read():
                    return
        except OSError:
            pass
        time.sleep(0.002)


def endless_train_config(folder):
    """A `jpeft train` config of the tiny model that would train 100,000 steps."""
    cfg = config(folder, extra_train="log_every = 1", top="")
    cfg.write_text(cfg.read_text().replace("steps = 2", "steps = 100000"))
    return cfg


def interrupt_train(folder, cfg, delay: float, timeout: float = 120.0):
    """Starts `jpeft train --config cfg` through the console script's entry point
    (_jpeft_launcher), sends it SIGINT ``delay`` seconds after the launcher's code started, and
    returns its exit status and stderr; the status is ``None`` when it had not ended ``timeout``
    seconds later (it is then killed). ``folder/out`` is removed first."""
    import shutil
    import signal
    import time

    shutil.rmtree(folder / "out", ignore_errors=True)
    launcher = [sys.executable, "-c", "import sys, _jpeft_launcher; sys.exit(_jpeft_launcher.main())"]
    # as from a terminal: SIGINT at its default even if this test worker inherited it ignored
    p = subprocess.Popen([*launcher, "train", "--config", str(cfg), "--no-progress"], cwd=folder, env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_for_the_launcher(p)
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    try:
        _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        return None, p.communicate()[1]
    return p.returncode, err


def test_ctrl_c_at_any_moment_of_start_up_ends_with_one_line_and_status_130(folder):
    """The console script's entry point (_jpeft_launcher) sends SIGINT to `jpeft train` at
    moments spread over importing JAX, loading, compiling and the first steps: every run stops
    with status 130 and no traceback, and never goes on to save the final adapter."""
    import shutil

    cfg = endless_train_config(folder)
    for delay in (0.05, 0.5, 1.2, 2.5):
        status, err = interrupt_train(folder, cfg, delay)
        assert status == 130, (delay, err)
        assert "Traceback" not in err and "Exception ignored" not in err, (delay, err)
        assert "interrupted" in err.strip().splitlines()[-1], (delay, err)
        assert not (folder / "out" / "adapter").exists(), delay
    # a run interrupted after its first checkpoint leaves ``out`` resumable: later tests of this
    # module's shared folder expect none
    shutil.rmtree(folder / "out", ignore_errors=True)


def test_ctrl_c_caught_inside_generated_source_still_ends_with_status_130(tmp_path):
    """A Ctrl-C that lands while Python evaluates source text (a dataclass's generated
    ``__init__`` while some module is imported) is caught by ``jpeft.cli.main`` like any other,
    and a ``python -m`` run (as the command re-executes itself) then ends with status 130 and
    one line, not killed by SIGINT: CPython notes such an interrupt even once it is caught (the
    start-up test above failed so once, at its 2.5 s delay). Here the signal is sent from
    inside an ``exec`` of source text, so it lands there every time."""
    import signal

    (tmp_path / "interrupted_in_source.py").write_text(
        "import sys\n"
        "import jpeft.cli as cli\n"
        "def parse_command_line(argv):\n"
        "    exec('import os, signal\\nos.kill(os.getpid(), signal.SIGINT)\\nfor _ in range(10 ** 7): pass')\n"
        "cli.parse_command_line = parse_command_line\n"
        "sys.exit(cli.main(['info']))\n")
    p = subprocess.run([sys.executable, "-m", "interrupted_in_source"], cwd=tmp_path, env=ENV,
                       capture_output=True, text=True, timeout=120,
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert p.returncode == 130, (p.returncode, p.stderr)
    assert one_line(p.stderr) == "jpeft: interrupted"


_MODULES_AT_EXIT = """
import json, os, runpy, sys
try:
    runpy.run_module("_jpeft_launcher", run_name="__main__")
except SystemExit as e:
    code = e.code
with open(os.environ["MODULES_AT_EXIT"], "w") as f:
    json.dump({"code": code, "imported": [m for m in ("jax", "jpeft", "numpy", "flax", "optax") if m in sys.modules]}, f)
"""


@pytest.mark.parametrize("argv, status", [
    (["--help"], 0), (["train", "--help"], 0), (["forgetting", "--help"], 0), (["--version"], 0),
    (["no-such-command"], 2), (["info", "llama-2-7b", "--no-such-option"], 2), ([], 2),
    # an input path that does not exist: named in a blink, not after a second of imports (it was a LoadError then)
    (["export", "--model", "no-model", "--adapter", "a", "--out", "o"], 2), (["merge", "--model", ".", "--adapter",
     "no-adapter", "--out", "o"], 2), (["eval", "--model", ".", "--data", "no.jsonl"], 2), (["serve", "--model", "m"], 2),
    (["info", "--list"], None),  # a command that runs: it imports jpeft and JAX (what the others are checked for)
])
def test_help_and_argument_errors_of_the_console_script_import_no_jax(tmp_path, argv, status):
    """The console script (_jpeft_launcher) parses the command line with _jpeft_args, the
    standard library alone: ``jpeft --help``, a command's ``--help`` (``jpeft train --help``'s
    full config text included), ``--version``, an unknown command or option and no command end
    without importing JAX, jpeft, NumPy, flax or optax (a second of CPU each time), with the
    text and status of :func:`jpeft.cli.main` (which parses with the same module); a command
    that runs (``jpeft info --list``) imports them."""
    import contextlib
    import io

    marker = tmp_path / "modules.json"
    env = dict(ENV, MODULES_AT_EXIT=str(marker), JPEFT_HUGE_PAGES="0")  # no re-execution: the script is the process
    r = subprocess.run([sys.executable, "-c", _MODULES_AT_EXIT, *argv], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    got = json.loads(marker.read_text())
    if status is None:
        assert got["code"] == 0 and {"jax", "jpeft"} <= set(got["imported"]), (got, r.stderr[-2000:])
        return
    assert got == {"code": status, "imported": []}, (got, r.stderr[-2000:])
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    assert (code, r.stdout, r.stderr) == (status, out.getvalue(), err.getvalue())
    assert (r.stdout if status == 0 else r.stderr).strip()


def test_the_command_lines_lists_agree_with_jpeft():
    """_jpeft_args (outside the package, so that parsing imports no JAX) names the version and
    the forgetting benchmarks that jpeft defines (jpeft/_version.py, jpeft.forgetting.experiment),
    and jpeft.cli runs each command it defines with that command's module."""
    import _jpeft_args
    import jpeft
    import jpeft.cli
    from jpeft.cli._common import method_names
    from jpeft.forgetting.experiment import BENCHMARKS

    assert _jpeft_args.version() == jpeft.__version__
    assert _jpeft_args.FORGETTING_BENCHMARKS == tuple(sorted(BENCHMARKS))
    # jpeft's own methods (a test module may have registered a toy method in this process: test_protocol's)
    ours = {name for name, cls in method_names().items() if cls.__module__.startswith("jpeft.")}
    assert set(_jpeft_args.METHOD_NAMES) == ours - {"full_finetune"}
    assert list(jpeft.cli._MODULES) == list(_jpeft_args.COMMANDS)
    for name, add in _jpeft_args.COMMANDS.items():
        module = sys.modules[f"jpeft.cli.{name}_cmd"]
        assert jpeft.cli._MODULES[name] is module and module.add_parser is add, name


def test_train_help_config_shows_the_defaults_it_says_it_shows(capsys):
    """`jpeft train --help` prints a config.toml and says every value in it is the default but the
    examples it names; the method names it lists (and `--method`'s help) are those jpeft takes
    (a new user read `name = "lora"  # lora, ia3, full, ...` with no way to find the others)."""
    import tomllib

    import _jpeft_args
    import jpeft
    from jpeft.cli.train_cmd import _DEFAULTS, FORGETTING_DEFAULTS

    shown = tomllib.loads(_jpeft_args.TRAIN_EXAMPLE_TOML)
    examples = {("output_dir",), ("data", "eval"), ("train", "warmup_steps"), ("forgetting", "canary"),
                ("forgetting", "max_loss_rise"), ("forgetting", "max_kl")}
    defaults = dict(_DEFAULTS, forgetting=FORGETTING_DEFAULTS,
                    method={"name": _jpeft_args.DEFAULT_METHOD, "r": jpeft.LoraConfig().r,
                            "lora_alpha": jpeft.LoraConfig().alpha, "target_modules": ["q_proj", "v_proj"]})
    checked = 0
    for section, values in shown.items():
        for key, value in (values.items() if isinstance(values, dict) else [(None, values)]):
            where = (section,) if key is None else (section, key)
            if where in examples or where == ("model",) or where == ("data", "train"):
                continue
            assert (defaults[section] if key is None else defaults[section][key]) == value, where
            checked += 1
    assert checked > 30
    assert {k for k in shown["train"]} == set(_DEFAULTS["train"]) - {"accumulate_steps"}
    for name in _jpeft_args.METHOD_NAMES:
        assert name in _jpeft_args.TRAIN_EXAMPLE_TOML
    with pytest.raises(SystemExit):
        main(["info", "--help"])
    names = _jpeft_args.METHOD_NAMES
    assert f"{', '.join(names[:-1])} or {names[-1]}" in " ".join(capsys.readouterr().out.split())


def test_the_python_lines_of_export_help_import_every_name_they_use():
    """`jpeft export --help` shows the PyTorch lines that load the export; they used
    AutoModelForCausalLM and AutoPeftModelForCausalLM without importing them (a NameError when
    pasted). Every name they use is now imported by them."""
    import ast
    import builtins

    import _jpeft_args

    code = _jpeft_args.EXPORT_EPILOG.split("then, in PyTorch:\n", 1)[1].split("\n\n", 1)[0]
    tree = ast.parse("\n".join(ln.strip() for ln in code.splitlines()))
    imported = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assigned = {t.id for n in ast.walk(tree) if isinstance(n, ast.Assign) for t in n.targets}
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    assert used and used <= imported | assigned | set(dir(builtins)), used - imported - assigned


def test_huge_pages_env_merges_with_the_users_tunables(monkeypatch):
    """The console script's glibc tunables: added to GLIBC_TUNABLES (other tunables kept), each
    left alone when the user names it, the keep-freed-memory ones only for XLA on the CPU, and
    none applied with JPEFT_HUGE_PAGES=0."""
    import _jpeft_launcher as L

    keep = ":".join(L.KEEP_FREED_MEMORY)
    assert keep == f"glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold={2 ** 60}"
    cpu = {"JAX_PLATFORMS": "cpu"}
    assert L.huge_pages_env(cpu)["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1:" + keep
    assert L.huge_pages_env({"JAX_PLATFORMS": "cuda,cpu"})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert L.huge_pages_env(cpu, keep_freed_memory=False)["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert L.huge_pages_env({**cpu, "JPEFT_KEEP_FREED_MEMORY": "0"})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    # the user's own value of a tunable wins; the others are added after the user's
    got = L.huge_pages_env({**cpu, "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})["GLIBC_TUNABLES"]
    assert got == ("glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1:glibc.malloc.mmap_max=0:"
                   f"glibc.malloc.trim_threshold={2 ** 60}")
    got = L.huge_pages_env({"JAX_PLATFORMS": "tpu", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert got["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=0"
    # without JAX_PLATFORMS: the CPU unless an accelerator plugin is installed
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert L.runs_on_cpu({})
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "libtpu" else None)
    assert not L.runs_on_cpu({}) and L.runs_on_cpu({"JAX_PLATFORMS": "cpu"})
    monkeypatch.undo()

    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setenv("JPEFT_HUGE_PAGES", "0")
    assert L._reexec_env() is None
    monkeypatch.delenv("JPEFT_HUGE_PAGES")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0:" + keep)
    assert L._reexec_env() is None  # everything already named: no re-execution
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    got = L._reexec_env()
    assert (got["GLIBC_TUNABLES"].startswith("glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1:")) if glibc \
        else got is None


def _run_on_the_cpu(tmp_path, script: str, *, tunables: bool) -> str:
    """Runs a Python script in a fresh process on JAX's CPU backend, with the `jpeft` command's
    glibc tunables or with glibc's defaults; returns its last line of output."""
    import _jpeft_launcher as L

    path = tmp_path / "script.py"
    path.write_text(script)
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "JPEFT_HUGE_PAGES")}
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run([sys.executable, str(path)], env=L.huge_pages_env(env) if tunables else env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="glibc malloc tunables on Linux")
def test_the_commands_tunables_keep_a_steps_temporaries_without_page_faults(tmp_path):
    """What the tunables are for: XLA's CPU temporaries (here 128 MiB a call) are freed at the
    end of every call; with the command's tunables the next call reuses them without a page
    fault, where glibc's defaults map them afresh and fault every page in again."""
    script = (
        "import resource, jax, jax.numpy as jnp\n"
        "f = jax.jit(lambda x, w: (jnp.sin(x) @ w).sum() + (jnp.cos(x) @ w).sum())\n"
        "x, w = jnp.ones((4096, 4096)) * 0.01, jnp.ones((4096, 8))\n"
        "for _ in range(3):\n"
        "    f(x, w).block_until_ready()\n"
        "r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(3):\n"
        "    f(x, w).block_until_ready()\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) // 3)\n")
    faults = {name: int(_run_on_the_cpu(tmp_path, script, tunables=name == "jpeft")) for name in ("default", "jpeft")}
    # glibc's defaults: the temporaries' 4 KiB pages (32,768 of them) faulted in every call
    assert faults["default"] > 20_000, faults
    assert faults["jpeft"] < 500, faults


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="glibc malloc tunables on Linux")
def test_the_heap_readings_fit_acts_on_under_the_commands_tunables(tmp_path):
    """What jpeft._hostmem.StepHeap reads, on the real glibc heap under the command's tunables:
    a freed buffer with a live one above it is cut off from the top (same heap size, top
    small); once its pages are released and the one above is freed, the top has released
    pages under resident ones; trimming leaves a small top."""
    script = (
        "import json, numpy as np\n"
        "import jpeft._hostmem as H\n"
        "M = 1 << 20\n"
        "x = np.ones(400 * M // 8); y = np.ones(160 * M // 8); h0 = H.heap(); del x\n"
        "h1 = H.heap(); H.release(); del y\n"
        "r1 = H.top_residency(); H.release()\n"
        "print(json.dumps({'h0': h0, 'h1': h1, 'r1': r1, 'h2': H.heap(), 'r2': H.top_residency()}))\n")
    got = json.loads(_run_on_the_cpu(tmp_path, script, tunables=True))
    M = 1 << 20
    assert got["h1"][0] == got["h0"][0] and got["h1"][1] < 64 * M, got  # cut off: the top stayed small
    assert got["r1"][0] > 380 * M and 150 * M < got["r1"][1] < 200 * M, got  # released under resident
    assert got["h2"][1] < 16 * M and got["r2"][0] < 16 * M, got  # trimmed


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/environ (Linux)")
def test_the_jpeft_command_trains_with_huge_pages_in_the_same_process(folder):
    """On glibc the console script re-executes itself (same PID) with the huge-page tunable,
    and a Ctrl-C then still ends the run with one line and status 130."""
    import _jpeft_launcher as L
    import shutil
    import signal
    import time

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("the tunable is glibc's; this C library is not glibc")
    cfg = config(folder, extra_train="log_every = 1", top="")
    cfg.write_text(cfg.read_text().replace("steps = 2", "steps = 100000"))
    env = {k: v for k, v in ENV.items() if k not in ("GLIBC_TUNABLES", "JPEFT_HUGE_PAGES")}
    launcher = [sys.executable, "-c", "import sys, _jpeft_launcher; sys.exit(_jpeft_launcher.main())"]
    # its own output folder: the module's tests share ``folder``, and one interrupted later than
    # its first checkpoint leaves ``out`` resumable, which this run would refuse (it did, in CI)
    out = folder / "out_huge_pages"
    shutil.rmtree(out, ignore_errors=True)
    p = subprocess.Popen([*launcher, "train", "--config", str(cfg), "--no-progress", "--output-dir", str(out)],
                         cwd=folder, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        seen = ""
        for _ in range(300):
            with open(f"/proc/{p.pid}/environ", "rb") as f:
                seen = f.read().decode(errors="replace")
            if "glibc.malloc.hugetlb=1" in seen:
                break
            time.sleep(0.05)
        want = f"GLIBC_TUNABLES={L.huge_pages_env(env)['GLIBC_TUNABLES']}\0"
        # glibc before 2.38 parses GLIBC_TUNABLES in place, leaving NULs where the colons were
        assert want in seen or want.replace(":", "\0") in seen, seen
        with open(f"/proc/{p.pid}/cmdline", "rb") as f:
            assert b"_jpeft_launcher" in f.read()
        time.sleep(1.0)
    finally:
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err.strip().splitlines()[-1], err


def test_an_adapter_of_another_base_names_the_commands_fix(tmp_path):
    """`jpeft eval/serve --adapter` onto another base ended with the library's fix, "pass
    allow_base_mismatch=True", which no command has: it names --model (and the Python keyword)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    import jpeft
    from jpeft.cli import _ckpt
    from jpeft.errors import BaseMismatchError

    x = jnp.ones((1, 4))
    p1 = nn.Dense(3).init(jax.random.key(0), x)
    p2 = {"params": {**p1["params"], "extra": jnp.zeros(2)}}  # another base: one more parameter
    cfg = jpeft.LoraConfig(r=2, target_modules=".*")
    jpeft.io.save_adapter(tmp_path / "a", cfg, jpeft.init(cfg, p1, jax.random.key(1)), params=p1)
    with pytest.raises(BaseMismatchError) as e:
        _ckpt.load_adapter(str(tmp_path / "a"), params=p2)
    assert "(--model); from Python, allow_base_mismatch=True loads it anyway" in str(e.value)
    assert "pass allow_base_mismatch" not in str(e.value)


def test_info_on_an_adapter_folder_refuses_method_options_it_would_ignore(tmp_path, capsys):
    """`jpeft info ADAPTER --method ia3` (or -r, --alpha, --target, --set, --base-dtype) printed
    the adapter's own LoRA config and counts with exit status 0, the options dropped without a
    word; they are refused by name, and the folder alone is still described."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    import jpeft

    p = nn.Dense(3).init(jax.random.key(0), jnp.ones((1, 4)))
    cfg = jpeft.LoraConfig(r=2, target_modules=".*")
    jpeft.io.save_adapter(tmp_path / "a", cfg, jpeft.init(cfg, p, jax.random.key(1)), params=p)
    for opts, named in [(["--method", "ia3"], "--method"), (["--method", "lora"], "--method"), (["-r", "16"], "-r/--rank"),
                        (["--alpha", "4"], "--alpha"), (["--target", "q_proj"], "--target"),
                        (["--set", "use_rslora=true"], "--set"), (["--base-dtype", "float32"], "--base-dtype")]:
        assert main(["info", str(tmp_path / "a"), *opts]) == 2
        out, err = capsys.readouterr()
        assert not out
        line = one_line(err)
        assert line.startswith(f"jpeft info: error: ConfigError: {named} describe a method to count on a model"), line
        assert "Leave them out, or give a model folder" in line
    assert main(["info", str(tmp_path / "a"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["method"]["r"] == 2 and res["trainable_params"] == 2 * 4 + 3 * 2


def test_forgetting_sweep_options_without_sweep_are_refused_not_ignored(tmp_path, capsys):
    """`jpeft forgetting BENCH --lr-factors 0.1 1` (or --strength-factors) without --sweep ran the
    plain benchmark with the factors dropped; they are refused, as --checkpoints was, before
    anything is trained."""
    for opts, named in [(["--lr-factors", "0.1", "1"], "--lr-factors only applies"),
                        (["--strength-factors", "3"], "--strength-factors only applies"),
                        (["--lr-factors", "1", "--checkpoints", "5"], "--lr-factors, --checkpoints only apply")]:
        assert main(["forgetting", "split-digits-task", "--steps", "1", "--seeds", "0", "--methods", "naive",
                     "--no-progress", "--no-plots", "--out", str(tmp_path / "o"), *opts]) == 2
        line = one_line(capsys.readouterr().err)
        assert not (tmp_path / "o").exists()
        assert f"ConfigError: {named} with --sweep; add --sweep" in line, line
    from jpeft.forgetting import cli as fcli

    args = fcli.build_parser().parse_args(["split-digits-task", "--sweep"])  # a sweep without them: the defaults
    assert args.lr_factors is None and args.strength_factors is None
    assert (fcli.LR_FACTORS, fcli.STRENGTH_FACTORS) == ((0.25, 0.5, 1.0, 2.0), (1.0,))


def test_info_refuses_one_field_given_by_an_option_and_by_set(folder, capsys):
    """`jpeft info -r 8 --set r=4` counted r=4 (and `--target q_proj --set target_modules=...`
    the --set's modules) with exit status 0: one of the two values was dropped without a word."""
    m = str(folder / "m")
    for opts, named in [(["-r", "8", "--set", "r=4"], "--set r=4 and -r/--rank give one field (r) twice"),
                        (["--alpha", "8", "--set", "lora_alpha=32"], "--set lora_alpha=32 and --alpha give one field (alpha)"),
                        (["--target", "q_proj", "--set", 'target_modules=["v_proj"]'],
                         "--set target_modules=[\"v_proj\"] and --target give one field (target_modules) twice"),
                        # two --set of one field (by either of its names) are named as such, not as -r/--rank
                        (["--set", "r=4", "--set", "r=8"], "--set r=4 and --set r=8 give one field (r) twice"),
                        (["--set", "alpha=4", "--set", "lora_alpha=8"],
                         "--set alpha=4 and --set lora_alpha=8 give one field (alpha) twice")]:
        assert main(["info", m, *opts]) == 2
        line = one_line(capsys.readouterr().err)
        assert f"ConfigError: {named}" in line and line.endswith("give it once."), line
    # each alone still counts: r=4 on q_proj (16 -> 16) of the one layer is 4 * (16 + 16) = 128
    for opts in (["-r", "4", "--target", "q_proj"], ["--set", "r=4", "--set", 'target_modules=["q_proj"]']):
        assert main(["info", m, "--json", *opts]) == 0
        assert json.loads(capsys.readouterr().out)["trainable_params"] == 128


def test_an_output_folder_that_is_a_file_is_a_named_error_before_any_work(folder, capsys, tmp_path, monkeypatch):
    """`jpeft train --output-dir FILE` (after loading the model and packing the data), `jpeft demo
    --out FILE` and `jpeft forgetting --out FILE` ended with a bare `FileExistsError: [Errno 17]`,
    and `--out FILE/sub` with `NotADirectoryError`; each is a named error naming the file, given
    before anything is loaded, trained or written, and the file is left as it was."""
    from jpeft.cli import _trainer

    monkeypatch.setattr(_trainer, "load_folder", lambda *a, **k: pytest.fail("loaded the model first"))
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    cfg = config(folder)
    for out in (f, f / "sub"):
        for argv in (["train", "--config", cfg, "--output-dir", out, "--no-progress"],
                     ["demo", "--tiny", "--out", out, "--no-progress"],
                     ["forgetting", "split-digits-task", "--steps", "1", "--seeds", "0", "--methods", "naive",
                      "--no-progress", "--no-plots", "--out", out],
                     ["forgetting", "split-digits-task", "--sweep", "--steps", "1", "--seeds", "0", "--methods",
                      "naive", "--no-progress", "--no-plots", "--out", out],
                     ["merge", "--model", folder / "m", "--adapter", folder / "m", "--out", out],
                     ["export", "--model", folder / "m", "--adapter", folder / "m", "--out", out]):
            assert main([str(a) for a in argv]) == 2, argv
            line = one_line(capsys.readouterr().err)
            assert "error: OverwriteError: " in line and f"cannot be made a folder: {str(f)!r} exists and is a file. Give a folder path" in line, line
            assert f.read_text() == "keep me"


def test_info_on_adalora_without_total_step_says_how_to_give_it(folder, capsys):
    """`jpeft info MODEL --method adalora` (docs/CLI.md: AdaLoRA counted on PEFT's default targets)
    ended with "total_step is required" and no word of how to give it on the command line."""
    assert main(["info", str(folder / "m"), "--method", "adalora"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "AdaLoraConfig.total_step is required" in line and "`jpeft info`: --set total_step=N" in line, line
    assert main(["info", str(folder / "m"), "--method", "adalora", "--set", "total_step=100", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["method"]["total_step"] == 100


def test_eval_of_a_file_with_other_field_names_says_what_eval_can_do(folder, capsys, tmp_path):
    """`jpeft eval` of a JSONL with other keys told the user to "set text_field / prompt_field /
    completion_field in the [data] section", which `jpeft eval` has none of (it reads the default
    names only, docs/CLI.md)."""
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"body": "the quick brown fox"}) + "\n")
    assert main(["eval", "--model", str(folder / "m"), "--data", str(data)]) == 2
    line = one_line(capsys.readouterr().err)
    assert ("expected a 'text' field, both 'prompt' and 'completion', or a 'messages' conversation, found keys "
            "['body']") in line, line
    assert "`jpeft eval` reads the default names only" in line, line


def test_an_adapter_given_as_the_model_says_to_swap_them(folder, capsys, tmp_path):
    """`jpeft eval --model runs/x/adapter --adapter ./my-model` (the two folders swapped) said the
    adapter folder "needs config.json next to its weights; write it with transformers'
    save_pretrained", which cannot help; it names what the folder holds and the fix."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    import jpeft

    p = nn.Dense(3).init(jax.random.key(0), jnp.ones((1, 4)))
    cfg = jpeft.LoraConfig(r=2, target_modules=".*")
    jpeft.io.save_adapter(tmp_path / "run" / "adapter", cfg, jpeft.init(cfg, p, jax.random.key(1)), params=p)
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "adapter_config.json").write_text("{}")
    for part in ("state", "meta"):  # a checkpoint's step folder, as Orbax lays it out
        (tmp_path / "run" / "checkpoints" / "4" / part).mkdir(parents=True)
    data = tmp_path / "d.txt"
    data.write_text("the quick brown fox")
    for folder_, held in [(tmp_path / "run" / "adapter", "a jpeft adapter (jpeft_adapter.json)"),
                          (tmp_path / "peft", "a Hugging Face PEFT adapter (adapter_config.json)"),
                          (tmp_path / "run", "a `jpeft train` run (adapter/, checkpoints/)"),
                          (tmp_path / "run" / "checkpoints" / "4", "a `jpeft train` checkpoint (state/, meta/)")]:
        for argv in (["eval", "--model", folder_, "--adapter", folder / "m", "--data", data],
                     ["merge", "--model", folder_, "--adapter", folder / "m", "--out", tmp_path / "o"]):
            assert main([str(a) for a in argv]) == 2
            line = one_line(capsys.readouterr().err)
            assert f"LoadError: {str(folder_)!r} holds {held}, not a model (no config.json). Give the base model's folder" in line, line
            assert "save_pretrained" not in line and not (tmp_path / "o").exists()


def test_every_default_a_help_line_states_is_the_one_the_command_uses():
    """Each `(default X)` of an option's --help is its argparse default (where the parser holds
    it), and the method options of `jpeft info` state LoraConfig's own defaults (--alpha gave
    none: jpeft's 16 is not PEFT's 8)."""
    import argparse
    import re

    import jpeft
    from jpeft.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    checked = 0
    for name, sp in sub.choices.items():
        for a in sp._actions:
            m = re.search(r"\(default:? ([-\w.]+)[;)]", a.help or "")
            if m and a.default is not None and not isinstance(a.default, (bool, list)):
                assert float(m.group(1)) == float(a.default) if isinstance(a.default, (int, float)) \
                    else m.group(1) == a.default, (name, a.option_strings, m.group(1), a.default)
                checked += 1
    assert checked >= 15
    info = {o: a.help for a in sub.choices["info"]._actions for o in a.option_strings}
    lora = jpeft.LoraConfig()
    assert f"LoRA default {lora.r})" in info["--rank"] and f"LoRA default {lora.alpha:g}," in info["--alpha"]
    assert "(default lora)" in info["--method"]


def test_resume_resolves_the_method_once_and_says_its_note_once(folder, capsys, monkeypatch):
    """--resume resolved the [method] table twice (once to compare it with the saved method config,
    once to train it), so a note it gives, such as a full fine-tuning copy resuming in the base's
    dtype as an earlier jpeft started it, was printed twice. The method is now resolved once."""
    import jpeft.cli._trainer as trainer

    out = folder / "out_note"
    argv = ["train", "--config", str(config(folder, method='name = "full"', extra_train='dtype = "bfloat16"')),
            "--no-progress", "--output-dir", str(out)]
    assert main(argv + ["--max-steps", "1"]) == 0
    saved = json.loads((out / "resolved_config.json").read_text())
    saved["method_config"]["dtype"] = None  # as an earlier jpeft saved a copy trained in the base's dtype
    (out / "resolved_config.json").write_text(json.dumps(saved))
    capsys.readouterr()

    class Stop(Exception):
        pass

    def stop(*a, **k):
        raise Stop  # right after the run's method is resolved: nothing is trained

    monkeypatch.setattr(trainer, "text_encoder", stop)
    try:
        main(argv + ["--resume"])
    except Stop:
        pass
    assert capsys.readouterr().err.count("started in the base's dtype (bfloat16) by an earlier jpeft") == 1


def test_ctrl_c_inside_an_extension_modules_import_ends_with_one_line_and_status_130(monkeypatch, capsys):
    """A Ctrl-C that lands while a C extension initialises surfaces as its ``ImportError:
    initialization failed`` raised from the KeyboardInterrupt (pybind11's ``raise_from``): the
    fresh-clone run's start-up test above hit it once at its 2.5 s delay, in tensorstore's import
    (orbax, imported lazily), and the command ended with status 1 and a traceback. It ends as any
    other Ctrl-C now; an ImportError of its own is still a bug's traceback."""
    import jpeft.cli.info_cmd as info_cmd

    def interrupted_import(args):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            raise ImportError("initialization failed") from e

    monkeypatch.setattr(info_cmd, "run", interrupted_import)
    assert main(["info", "x"]) == 130
    assert one_line(capsys.readouterr().err) == "jpeft info: interrupted"

    def broken_import(args):
        raise ImportError("initialization failed")

    monkeypatch.setattr(info_cmd, "run", broken_import)
    with pytest.raises(ImportError, match="initialization failed"):
        main(["info", "x"])


def test_a_config_path_that_exists_only_beside_the_current_folder_says_paths_are_config_relative(
        tmp_path, capsys, monkeypatch):
    """`jpeft train --config cfgs/x.toml` with `model = "my-model"` (or a data file) that lies in the
    current folder, not next to the config: the paths are the config's, and the command said only
    that `cfgs/my-model` is not a folder (or the data file does not exist). It names the key, where
    it looked, and the path to write. A path missing in both places keeps its plain error."""
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "my-model").mkdir()
    (tmp_path / "train.jsonl").write_text('{"text": "a b c"}\n')
    (tmp_path / "cfgs" / "x.toml").write_text('model = "my-model"\n[data]\ntrain = "train.jsonl"\n')
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", "cfgs/x.toml", "--no-progress"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "ConfigError: model = 'my-model' is read relative to the config file's folder" in line
    assert "write model = '../my-model'" in line
    assert main(["train", "--config", "cfgs/x.toml", "--set", "model=../my-model", "--no-progress"]) == 2
    assert "data.train = 'train.jsonl' is read relative to the config file's folder" in one_line(capsys.readouterr().err)
    assert main(["train", "--config", "cfgs/x.toml", "--set", "model=../my-model", "--set", "data.train=nope.jsonl",
                 "--no-progress"]) == 2
    assert "relative to the config" not in one_line(capsys.readouterr().err)
