"""A stopped and resumed run equals the uninterrupted one, knob by knob: the Python API's
documented resume (docs/CHECKPOINTS.md) and ``jpeft train --resume`` with the settings its
checkpoints do not hold (the forgetting guard's canary file)."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys

import jax
import numpy as np
import pytest

from jpeft.cli import main

sys.path.insert(0, os.path.dirname(__file__))
from test_cli import adapter_arrays, error_line, hf_dir, write_config  # noqa: F401  E402 (hf_dir: the fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------- the Python API, as documented
def _checkpoints_example() -> str:
    """The training-checkpoints example of docs/CHECKPOINTS.md, as written."""
    with open(os.path.join(ROOT, "docs", "CHECKPOINTS.md")) as f:
        text = f.read()
    return re.search(r"## Training checkpoints\n\n```python\n(.*?)```", text, re.S).group(1)


def _run_example(code: str, folder, crash_at=None) -> dict:
    """Runs the example in ``folder``; ``crash_at``: batch ``k`` raises (a crash mid-run)."""
    marker = "for k in range(pos, 10**9):"
    assert marker in code, "the example's batch loop changed; update this test"
    code = code.replace(marker, marker + "\n        if k == CRASH_AT: raise KeyboardInterrupt")
    ns = {"CRASH_AT": crash_at}
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        exec(compile(code, "docs/CHECKPOINTS.md", "exec"), ns)
    finally:
        os.chdir(cwd)
    return ns


def test_the_documented_fit_resume_equals_the_uninterrupted_run(tmp_path, capsys):
    """docs/CHECKPOINTS.md's example resumes with the manager's latest step; it passed
    ``num_steps=30`` again, which counts the steps of that call, so after a crash at step 25
    the rerun resumed from step 20 and trained to step 50 (an uninterrupted run: 30), with no
    word. Run as written: crashed at step 25 and run again, it ends at step 30 with the
    uninterrupted run's losses and adapter, bit for bit."""
    code = _checkpoints_example()
    (tmp_path / "whole").mkdir()
    (tmp_path / "split").mkdir()
    whole = _run_example(code, tmp_path / "whole")["result"]
    with pytest.raises(KeyboardInterrupt):
        _run_example(code, tmp_path / "split", crash_at=25)
    resumed = _run_example(code, tmp_path / "split")["result"]
    assert whole.step == 30 and resumed.step == 30
    assert [h["step"] for h in resumed.history] == list(range(21, 31))  # from the checkpoint of step 20
    np.testing.assert_array_equal([h["loss"] for h in resumed.history], [h["loss"] for h in whole.history[20:]])
    a, b = jax.tree.leaves(whole.adapter), jax.tree.leaves(resumed.adapter)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x))


# ------------------------------------------------------------------- jpeft train --resume
# knobs of the shared run: LoRA dropout, warm-up (2 steps; the split run stops inside it), gradient
# accumulation, an evaluation every 2 steps, a checkpoint every 3 (and at the stop)
KNOBS = ["--no-progress", "--set", "train.gradient_accumulation_steps=2"]


def _records(run):
    recs = [json.loads(x) for x in open(run / "metrics.jsonl")]
    return ([(r["step"], r["loss"], r["lr"]) for r in recs if "loss" in r],
            [(r["step"], r["eval_loss"]) for r in recs if "eval_loss" in r])


@pytest.fixture(scope="module")
def reference(hf_dir):
    """The uninterrupted run the resumed ones are compared with: its adapter and records."""
    cfg = write_config(hf_dir, "knobs-whole", steps=4, save_every=3, eval_every=2)
    assert main(["train", "--config", str(cfg), *KNOBS]) == 0
    return adapter_arrays(hf_dir / "knobs-whole" / "adapter"), _records(hf_dir / "knobs-whole")


def test_a_run_resumed_from_a_moved_project_equals_the_uninterrupted_run(hf_dir, reference, capsys):
    """A project copied to another folder or host (the config, its data and the run; the config's
    relative paths then resolve elsewhere) was refused on --resume: data.train's path had changed,
    though its packed rows are fingerprinted, and the advice was to edit the path back to a folder
    that no longer exists. The path may change now, the content is compared: edited data is still
    refused by name, the same data resumes and ends as the uninterrupted run, bit for bit (stopped
    inside the warm-up, with gradient accumulation, LoRA dropout and evaluations)."""
    run = hf_dir / "knobs-moved"
    cfg = write_config(hf_dir, run.name, steps=4, save_every=3, eval_every=2)
    assert main(["train", "--config", str(cfg), *KNOBS, "--max-steps", "1"]) == 0
    moved = hf_dir / "elsewhere"
    moved.mkdir()
    (moved / "tiny-llama").symlink_to(hf_dir / "tiny-llama")
    shutil.copy(hf_dir / "eval.jsonl", moved / "eval.jsonl")
    shutil.copy(cfg, moved / cfg.name)
    lines = (hf_dir / "train.jsonl").read_text().splitlines(keepends=True)
    (moved / "train.jsonl").write_text("".join(lines[1:] + lines[:1]))  # edited: one document moved to the end
    saved = (run / "resolved_config.json").read_text()
    args = ["train", "--config", str(moved / cfg.name), "--output-dir", str(run), "--resume", *KNOBS]
    capsys.readouterr()
    assert main(args) == 2
    assert "on other training data than its checkpoints were trained on" in error_line(capsys.readouterr().err)
    assert (run / "resolved_config.json").read_text() == saved
    (moved / "train.jsonl").write_text("".join(lines))
    assert main(args) == 0
    assert "resumed from step 1" in capsys.readouterr().err
    ref, (losses, evals) = reference
    got = adapter_arrays(run / "adapter")
    assert sorted(got) == sorted(ref)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    assert _records(run) == (losses, evals) and [s for s, _ in evals] == [2, 4]
    assert json.loads((run / "resolved_config.json").read_text())["data"]["train"] == str(moved / "train.jsonl")


def _guarded(hf_dir, name: str, canary: str):
    path = write_config(hf_dir, name, steps=3, save_every=1, eval_every=0)
    path.write_text(path.read_text() + f'\n[forgetting]\ncanary = "{canary}"\nevery = 1\nmax_kl = 100.0\n'
                                       'canary_batches = 1\n')
    return path


def test_resume_refuses_an_edited_canary_file(hf_dir, capsys):
    """The forgetting guard's canary file was not fingerprinted: edited between a stop and
    ``--resume``, the resumed guard measured other text against the checks and kept state its
    checkpoint carries (and could stop or roll back where the run would not), without a word.
    It is refused by name, like edited training data, and the saved settings are left as they were."""
    canary = hf_dir / "canary-resume.txt"
    shutil.copy(hf_dir / "notes.txt", canary)
    path = _guarded(hf_dir, "fg-canary-edit", canary.name)
    assert main(["train", "--config", str(path), "--no-progress", "--max-steps", "1"]) == 0
    saved = json.loads((hf_dir / "fg-canary-edit" / "resolved_config.json").read_text())
    original = canary.read_text()
    canary.write_text(original[len(original) // 2:] + original[: len(original) // 2])  # the same words, moved
    capsys.readouterr()
    assert main(["train", "--config", str(path), "--no-progress", "--resume"]) == 2
    line = error_line(capsys.readouterr().err)
    assert "with another forgetting canary than its checkpoints were trained with" in line, line
    assert json.loads((hf_dir / "fg-canary-edit" / "resolved_config.json").read_text()) == saved  # left as it was
