"""``jpeft train`` with a ``[forgetting]`` table (errors, a run within budget, rollback then
stop) and ``jpeft eval --canary`` (numbers against transformers on the same rows)."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

from jpeft.cli import main
sys.path.insert(0, os.path.dirname(__file__))
from test_cli import adapter_arrays, error_line, hf_dir, write_config  # noqa: F401  E402 (hf_dir: the fixture)


def _with_forgetting(path, table: str):
    path.write_text(path.read_text() + "\n[forgetting]\n" + table)
    return path


@pytest.mark.parametrize("table, expect", [
    ('every = 2\nmax_kl = 0.1\n', '[forgetting] needs canary = "file.txt"'),
    ('canary = "eval.jsonl"\n', "[forgetting] needs a budget: set max_loss_rise"),
    ('canary = "eval.jsonl"\nmax_kl = 0.1\naction = "halt"\n', 'forgetting.action must be "stop" or "rollback", found \'halt\''),
    ('canary = "eval.jsonl"\nmax_kl = 0.1\nlr_factor = 2\n', "forgetting.lr_factor must be a number in (0, 1), found 2"),
    ('canary = "eval.jsonl"\nmax_loss_rise = -1\n', "forgetting.max_loss_rise must be a non-negative number"),
    ('canary = "eval.jsonl"\nmax_kl = 0.1\nevery = 0\n', "forgetting.every must be an integer >= 1, found 0"),
    ('canary = "eval.jsonl"\nmax_kl = 0.1\nbudget = 1\n', "unknown key(s) ['budget'] in [forgetting]"),
])
def test_forgetting_table_errors_exit_2_with_one_line(hf_dir, capsys, table, expect):
    path = _with_forgetting(write_config(hf_dir, "fg-bad"), table)
    assert main(["train", "--config", str(path)]) == 2
    assert expect in error_line(capsys.readouterr().err)


def _canary_records(out):
    return [r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "canary_kl" in r]


def _metadata(out):
    return json.load(open(os.path.join(out, "adapter", "jpeft_adapter.json")))["metadata"]


def test_train_within_budget_logs_the_canary_and_summarises_it(hf_dir, capsys):
    path = _with_forgetting(write_config(hf_dir, "fg-ok", steps=4, save_every=0, eval_every=0),
                            'canary = "notes.txt"\nevery = 2\nmax_loss_rise = 100.0\nmax_kl = 100.0\n'
                            'canary_batches = 1\n')
    assert main(["train", "--config", str(path), "--no-progress"]) == 0
    err = capsys.readouterr().err
    out = hf_dir / "fg-ok"
    assert [r["step"] for r in _canary_records(out)] == [0, 2, 4]
    line = [ln for ln in err.splitlines() if "canary notes.txt" in ln]
    assert len(line) == 1 and "at step 4" in line[0] and "3 checks, 0 rollback(s))" in line[0], err
    rec = _canary_records(out)[-1]
    assert rec["canary_kl"] > 0 and f"mean KL {rec['canary_kl']:.4g} nats" in line[0]
    meta = _metadata(out)
    assert meta["steps"] == 4 and meta["forgetting"]["kept_step"] == 4 and not meta["forgetting"]["stopped"]
    assert meta["forgetting"]["canary_kl"] == rec["canary_kl"]


def test_train_rollback_then_stop_keeps_the_base_adapter(hf_dir, capsys):
    # any update moves the predictions: KL > 0 crosses max_kl = 0 at the first check
    path = _with_forgetting(write_config(hf_dir, "fg-stop", steps=8, save_every=0, eval_every=0),
                            'canary = "notes.txt"\nevery = 2\nmax_kl = 0.0\naction = "rollback"\n'
                            'max_rollbacks = 1\nlr_factor = 0.5\ncanary_batches = 1\n')
    assert main(["train", "--config", str(path), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "step 2: canary KL" in err and "rolled back to the state of step 0" in err and "x0.5" in err, err
    assert "step 4: canary KL" in err and "training stopped after 1 rollback(s), keeping the adapter of step 0" in err
    assert "stopped by the forgetting guard at step 4 of 8; the adapter of step 0" in err
    recs = _canary_records(hf_dir / "fg-stop")
    assert [(r["step"], r.get("canary_action")) for r in recs] == [(0, None), (2, "rollback"), (4, "stop")]
    arrays = adapter_arrays(hf_dir / "fg-stop" / "adapter")
    b = [v for k, v in arrays.items() if "lora_B" in k or "lora_b" in k.lower()]
    assert b and all(not np.any(v) for v in b)  # the step-0 LoRA: B = 0, the base itself
    meta = _metadata(hf_dir / "fg-stop")
    assert meta["steps"] == 0 and meta["forgetting"]["stopped"] and meta["forgetting"]["rollbacks"] == 1


def test_a_rollback_at_the_last_step_saves_the_kept_adapter_and_says_its_step(hf_dir, capsys):
    # the metadata said "steps": 2 for the restored step-0 adapter
    path = _with_forgetting(write_config(hf_dir, "fg-last", steps=2, save_every=0, eval_every=0),
                            'canary = "notes.txt"\nevery = 2\nmax_kl = 0.0\naction = "rollback"\n'
                            'max_rollbacks = 1\nlr_factor = 0.5\ncanary_batches = 1\n')
    assert main(["train", "--config", str(path), "--no-progress"]) == 0
    assert "rolled back at the last step, so the adapter of step 0" in capsys.readouterr().err
    meta = _metadata(hf_dir / "fg-last")
    assert meta["steps"] == 0 and meta["forgetting"]["kept_step"] == 0 and meta["forgetting"]["rollbacks"] == 1


def test_logged_lr_is_the_rate_applied_after_a_rollback(hf_dir, capsys):
    # a rollback restores the optimizer state of the kept step (its schedule count too) and
    # halves lr_scale: metrics.jsonl's lr must be that applied rate, not schedule(step - 1)
    from jpeft.cli._trainer import make_optimizer

    path = _with_forgetting(write_config(hf_dir, "fg-lr", steps=8, save_every=0, eval_every=0),
                            'canary = "notes.txt"\nevery = 2\nmax_kl = 0.0\naction = "rollback"\n'
                            'max_rollbacks = 1\nlr_factor = 0.5\ncanary_batches = 1\n')
    assert main(["train", "--config", str(path), "--no-progress"]) == 0
    capsys.readouterr()
    out = hf_dir / "fg-lr"
    cfg = json.load(open(out / "resolved_config.json"))
    _, sched = make_optimizer(cfg["train"], cfg["train"]["steps"])
    lr = {r["step"]: r["lr"] for r in map(json.loads, open(out / "metrics.jsonl")) if "lr" in r}
    # steps 1, 2 at counts 0, 1; the rollback at step 2 returns to step 0's state (count 0), x0.5
    want = {1: float(sched(0)), 2: float(sched(1)), 3: 0.5 * float(sched(0)), 4: 0.5 * float(sched(1))}
    assert {s: lr[s] for s in want} == pytest.approx(want, rel=1e-6), (lr, want)
    assert lr[4] != pytest.approx(float(sched(3)))


def test_eval_canary_report_matches_transformers(hf_dir, capsys):
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from jpeft.data import PackedDataset

    path = write_config(hf_dir, "fg-eval", steps=3, save_every=0, eval_every=0)
    assert main(["train", "--config", str(path), "--no-progress"]) == 0
    capsys.readouterr()
    args = ["eval", "--model", str(hf_dir / "tiny-llama"), "--adapter", str(hf_dir / "fg-eval"),
            "--canary", str(hf_dir / "notes.txt"), "--seq-len", "32", "--packing", "stream", "--batch-size", "4",
            "--worst", "2"]
    assert main(args + ["--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    # the base's loss from transformers on the same packed rows
    tok = AutoTokenizer.from_pretrained(hf_dir / "tiny-llama")
    ds = PackedDataset.from_file(str(hf_dir / "notes.txt"), lambda s: tok(s, add_special_tokens=False)["input_ids"],
                                 32, eos_id=tok.eos_token_id, bos_id=None, packing="stream")  # no BOS
    model = LlamaForCausalLM.from_pretrained(hf_dir / "tiny-llama").eval()
    ids = torch.tensor(np.asarray(ds.input_ids), dtype=torch.long)
    with torch.no_grad():
        ref = model(ids, labels=ids).loss.item()
    assert res["rows"] == len(ds) and res["base_loss"] == pytest.approx(ref, abs=2e-4)
    assert res["loss_rise"] == pytest.approx(res["loss"] - res["base_loss"], abs=1e-9) and res["kl"] > 0
    assert len(res["worst"]) == 2 and res["worst"][0]["loss_rise"] >= res["worst"][1]["loss_rise"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"rise {res['loss_rise']:+.4f} nats" in out and f"KL(base || adapted) {res['kl']:.4f}" in out
    # --worst with a --data report was silently ignored (that report lists no rows)
    assert main(["eval", "--model", str(hf_dir / "tiny-llama"), "--data", str(hf_dir / "notes.txt"), "--worst", "2"]) == 2
    assert "--worst lists the rows of a --canary report" in error_line(capsys.readouterr().err)
    assert out.count("  row ") == 2
    assert main(["eval", "--model", str(hf_dir / "tiny-llama"), "--canary", str(hf_dir / "notes.txt")]) == 2
    assert "--canary compares an adapter with its base: give --adapter" in error_line(capsys.readouterr().err)
    assert main(args + ["--data", str(hf_dir / "eval.jsonl")]) == 2
    assert "are two reports; give one of them" in error_line(capsys.readouterr().err)


def test_a_resumed_run_continues_the_guard_exactly(hf_dir, capsys):
    """The guard's kept state, checks and rollback count were not in the checkpoints: a run
    resumed after a rollback kept the (over-budget) resumed state as "the last within budget",
    restarted its rollback count and logged an extra canary record. Every checkpoint now holds
    the guard's state: stopped at step 3 (after the rollback at step 2) and resumed, the run ends
    as the uninterrupted one, bit for bit, with the same canary records and report."""
    table = ('canary = "notes.txt"\nevery = 2\nmax_kl = 0.0\naction = "rollback"\nmax_rollbacks = 1\n'
             'lr_factor = 0.5\ncanary_batches = 1\n')
    whole = _with_forgetting(write_config(hf_dir, "fg-whole", steps=8, save_every=1, eval_every=0), table)
    split = _with_forgetting(write_config(hf_dir, "fg-split", steps=8, save_every=1, eval_every=0), table)
    assert main(["train", "--config", str(whole), "--no-progress"]) == 0
    assert main(["train", "--config", str(split), "--no-progress", "--max-steps", "3"]) == 0
    assert main(["train", "--config", str(split), "--no-progress", "--resume"]) == 0
    err = capsys.readouterr().err
    assert "resumed from step 3" in err
    a, b = adapter_arrays(hf_dir / "fg-whole" / "adapter"), adapter_arrays(hf_dir / "fg-split" / "adapter")
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(b[k], a[k], err_msg=k)
    want = [(0, None), (2, "rollback"), (4, "stop")]
    for out in ("fg-whole", "fg-split"):
        assert [(r["step"], r.get("canary_action")) for r in _canary_records(hf_dir / out)] == want
    fa, fb = _metadata(hf_dir / "fg-whole")["forgetting"], _metadata(hf_dir / "fg-split")["forgetting"]
    assert fb == fa and fa["kept_step"] == 0 and fa["rollbacks"] == 1 and fa["stopped"]


def test_train_refuses_a_start_over_budget(hf_dir, capsys):
    # prompt tuning's random virtual tokens change the model at step 0: a budget below that start was
    # kept as "the last within budget" and the run stopped on the over-budget step-0 adapter
    path = _with_forgetting(write_config(hf_dir, "fg-start", steps=4, save_every=0, eval_every=0),
                            'canary = "notes.txt"\nevery = 2\nmax_kl = 0.0\ncanary_batches = 1\n')
    text = path.read_text().replace('name = "lora"', 'name = "prompt_tuning"\nnum_virtual_tokens = 4')
    text = "\n".join(ln for ln in text.splitlines() if not ln.startswith(("r =", "lora_", "target_modules")))
    path.write_text(text.replace("seq_len = 32", 'seq_len = 32\npacking = "stream"'))
    assert main(["train", "--config", str(path), "--no-progress"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]  # after the run's opening line
    assert line.startswith("jpeft train: error: ConfigError: the forgetting guard's budget is already crossed")
    assert "by the adapter it starts from (step 0): canary KL" in line and "max_kl 0" in line and "Traceback" not in line
    assert not (hf_dir / "fg-start").exists()  # the failed start left nothing behind
    (hf_dir / "fg-start").mkdir()  # in a folder of the user's: what was there stays, what the run wrote goes
    (hf_dir / "fg-start" / "notes.md").write_text("mine")
    assert main(["train", "--config", str(path), "--no-progress"]) == 2
    assert sorted(p.name for p in (hf_dir / "fg-start").iterdir()) == ["notes.md"]


@pytest.mark.parametrize("canary, expect", [("missing.txt", "does not exist"), ("empty.txt", "is empty")])
def test_a_bad_canary_file_leaves_no_output_dir(hf_dir, capsys, canary, expect):
    # the canary was read after the output folder was made, which a failure left behind (empty)
    (hf_dir / "empty.txt").write_text("")
    name = f"fg-bad-canary-{canary.split('.')[0]}"
    path = _with_forgetting(write_config(hf_dir, name, steps=2), f'canary = "{canary}"\nmax_kl = 1.0\n')
    assert main(["train", "--config", str(path), "--no-progress"]) == 2
    assert expect in error_line(capsys.readouterr().err)
    assert not (hf_dir / name).exists()


def test_a_run_resumed_at_its_last_step_writes_the_adapter_the_guard_kept_with_its_report(hf_dir, capsys):
    """A run resumed from its checkpoint at train.steps (killed after that checkpoint, before the
    finished adapter was written, or `--resume` given again to a finished run) trains no step and
    writes the adapter again: it wrote it without the guard's report, so after a rollback at the
    last step the metadata said `steps: 4` for the rolled-back adapter of step 0 (and had no
    `forgetting` summary). The guard's report now comes from the checkpoint, as the run left it."""
    table = ('canary = "notes.txt"\nevery = 4\nmax_kl = 0.0\naction = "rollback"\nmax_rollbacks = 1\n'
             'canary_batches = 1\n')
    path = _with_forgetting(write_config(hf_dir, "fg-end", steps=4, save_every=1, eval_every=0), table)
    assert main(["train", "--config", str(path), "--no-progress"]) == 0
    first = _metadata(hf_dir / "fg-end")
    arrays = adapter_arrays(hf_dir / "fg-end" / "adapter")
    assert first["steps"] == 0 and first["forgetting"]["rollbacks"] == 1 and first["forgetting"]["kept_step"] == 0
    capsys.readouterr()
    assert main(["train", "--config", str(path), "--no-progress", "--resume"]) == 0
    err = capsys.readouterr().err
    assert "resumed from step 4" in err and "rolled back at the last step, so the adapter of step 0" in err, err
    assert _metadata(hf_dir / "fg-end") == first
    again = adapter_arrays(hf_dir / "fg-end" / "adapter")
    assert sorted(again) == sorted(arrays) and all(np.array_equal(again[k], arrays[k]) for k in arrays)
