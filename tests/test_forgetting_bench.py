"""Miniature runs of the built-in forgetting benchmarks (a few steps each): every method path
runs through jpeft.init / jpeft.apply / jpeft.make_train_step and every artifact is written."""

import csv
import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jpeft.errors import ConfigError, OverwriteError
from jpeft.forgetting import experiment
from jpeft.forgetting.cli import main
from jpeft.forgetting.digits import SplitDigits
from jpeft.forgetting.language import CodeProseData, CodeToProse, pretrain_code_model

ARTIFACTS = ("scores.json", "metrics.csv", "results.md")


def _check_artifacts(out, bench_name, method_names, seeds, T):
    for f in ARTIFACTS:
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    res = json.load(open(os.path.join(out, "scores.json")))
    assert list(res["methods"]) == method_names
    for name in method_names:
        for s in seeds:
            r = res["methods"][name]["seeds"][str(s)]
            R = np.asarray(r["R"])
            assert R.shape == (T, T) and np.all(np.isfinite(R)), (name, R)
            assert set(r["metrics"]) >= {"acc", "bwt", "forgetting", "learning"}
    rows = list(csv.DictReader(open(os.path.join(out, "metrics.csv"))))
    assert [(r["method"], int(r["seed"])) for r in rows] == [(m, s) for m in method_names for s in seeds]
    md = open(os.path.join(out, "results.md")).read()
    for name in method_names:
        assert f"| {name} |" in md
    import matplotlib.image

    for kind in ("tradeoff", "matrices"):
        img = matplotlib.image.imread(os.path.join(out, f"forgetting_{bench_name}_{kind}.png"))
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    return res


def test_split_digits_task_incremental_miniature(tmp_path):
    bench = SplitDigits("task", steps_per_task=2, batch_size=8, hidden=(16,), num_tasks=3)
    by = {m.name: m for m in bench.default_methods()}
    assert list(by) == ["naive", "EWC", "online EWC", "replay", "LwF", "O-LoRA", "LoRA per task"]
    # the countermeasures compose: one spec with EWC + replay + LwF exercises all three paths
    combo = dataclasses.replace(by["EWC"], name="EWC+replay+LwF", fisher_examples=8, replay=0.5, replay_capacity=16,
                                distill=1.0)
    methods = [by["naive"], combo, dataclasses.replace(by["online EWC"], fisher_examples=8), by["LoRA per task"]]
    names = [m.name for m in methods]
    res = experiment.run(bench, methods, seeds=[0], out_dir=str(tmp_path), progress=False, log=None)
    res = _check_artifacts(str(tmp_path), "split-digits-task", names, [0], 3)
    lora = res["methods"]["LoRA per task"]["seeds"]["0"]
    # one adapter per task on a frozen network: earlier tasks cannot change after training
    R = np.asarray(lora["R"])
    for j in range(3):
        assert np.all(R[j:, j] == R[j, j])
    assert lora["trainable"] < res["methods"]["naive"]["seeds"]["0"]["trainable"]


def test_an_interrupted_plot_leaves_the_previous_png_not_half_a_file(tmp_path, monkeypatch):
    # the results' files are written through renamed temporaries; the PNGs went straight to their names
    import matplotlib.figure

    bench = SplitDigits("class", steps_per_task=1, batch_size=4, hidden=(8,), num_tasks=2)
    experiment.run(bench, [experiment.MethodSpec("naive")], seeds=[0], out_dir=str(tmp_path), progress=False, log=None)
    png = tmp_path / "forgetting_split-digits-class_tradeoff.png"
    before = png.read_bytes()

    def interrupted(fig, target, **kw):  # Ctrl-C after the first bytes of the picture were written
        (open(target, "wb") if isinstance(target, (str, os.PathLike)) else target).write(before[:100])
        raise KeyboardInterrupt

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", interrupted)
    with pytest.raises(KeyboardInterrupt):
        experiment.plot(json.load(open(tmp_path / "scores.json")), str(tmp_path))
    assert png.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == sorted(list(ARTIFACTS) + [f"forgetting_split-digits-class_{k}.png"
                                                                     for k in ("tradeoff", "matrices")])


def test_scores_json_with_a_diverged_score_is_strict_json_and_plots_when_read_back(tmp_path):
    """A NaN or infinite score (a diverged run's loss, an undefined retention) was written to
    scores.json as Python's bare NaN / Infinity, which jq, JavaScript and Go refuse; it is the
    string "NaN" / "Infinity", and ``experiment.plot`` of the file read back draws it."""
    bench = SplitDigits("class", steps_per_task=1, batch_size=4, hidden=(8,), num_tasks=2)
    res = experiment.run(bench, [experiment.MethodSpec("naive")], seeds=[0], out_dir=str(tmp_path), progress=False,
                         log=None, plots=False)
    r = res["methods"]["naive"]["seeds"]["0"]
    r["R"][1][0], r["metrics"]["retention"], r["metrics"]["forgetting"] = float("inf"), float("nan"), float("-inf")
    experiment._write(res, str(tmp_path), bench, plots=False)

    def refuse(token):
        raise ValueError(f"not strict JSON: {token}")

    back = json.loads((tmp_path / "scores.json").read_text(), parse_constant=refuse)
    got = back["methods"]["naive"]["seeds"]["0"]
    assert (got["R"][1][0], got["metrics"]["retention"], got["metrics"]["forgetting"]) == ("Infinity", "NaN", "-Infinity")
    assert got["R"][0][0] == r["R"][0][0]  # finite numbers stay numbers
    assert len(experiment.plot(back, str(tmp_path))) == 2


def test_split_digits_class_incremental_two_seeds(tmp_path):
    bench = SplitDigits("class", steps_per_task=2, batch_size=8, hidden=(16,))
    methods = [m for m in bench.default_methods() if m.name in ("naive", "replay")]
    methods = [dataclasses.replace(m, replay_capacity=16) for m in methods]
    experiment.run(bench, methods, seeds=[0, 1], out_dir=str(tmp_path), progress=False, log=None)
    res = _check_artifacts(str(tmp_path), "split-digits-class", ["naive", "replay"], [0, 1], 5)
    R = np.asarray(res["methods"]["naive"]["seeds"]["0"]["R"])
    assert np.all(R[np.triu_indices(5, 1)] == 0.0)  # classes not seen yet cannot be predicted
    assert "± " in open(tmp_path / "results.md").read()


def _results(per_seed):
    """A scores.json-like dict: one method, ``per_seed[seed] = forgetting`` (None: not measured)."""
    seeds = {str(s): {"metrics": {"acc": 0.5, "forgetting": f}, "extra": {}, "trainable": 10, "seconds": 1.0}
             for s, f in per_seed.items()}
    return {"benchmark": "b", "tasks": ["a", "b"], "score": "accuracy", "higher_is_better": True, "learning": "l",
            "steps_per_task": 1, "batch_size": 1, "seeds": [int(s) for s in per_seed],
            "methods": {"m": {"description": "d", "seeds": seeds}}}


def test_results_table_shows_no_spread_for_one_seed_and_counts_the_seeds_it_averages():
    # one seed printed "0.300 ± 0.000": a sample standard deviation of one value is undefined, not 0
    one = experiment.markdown_table(_results({0: 0.3}))
    assert "± 0.000" not in one and "| 0.300 |" in one and "one seed [0]" in one
    three = experiment.markdown_table(_results({0: 0.1, 1: 0.2, 2: 0.6}))
    assert f"| 0.300 ± {np.std([0.1, 0.2, 0.6], ddof=1):.3f} |" in three and "over 3 seed(s)" in three
    # a seed without a finite value was dropped from the mean while the header said "over 3 seeds"
    part = experiment.markdown_table(_results({0: 0.1, 1: float("nan"), 2: 0.3}))
    assert f"| 0.200 ± {np.std([0.1, 0.3], ddof=1):.3f} (2 of 3 seeds) |" in part
    assert "| 0.500 ± 0.000 |" in part  # acc: every seed measured, no spread

@pytest.fixture(scope="module")
def lang_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jpeft_cache"))


def test_language_miniature_and_cache(tmp_path, lang_cache):
    cache = lang_cache
    kw = dict(seq_len=16, size="micro", batch_size=4, progress=False)
    m1, p1, info1 = pretrain_code_model(cache, 3, **kw)
    m2, p2, info2 = pretrain_code_model(cache, 3, **kw)
    assert not info1["cached"] and info2["cached"] and info2["path"] == info1["path"]
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)))
    bench = CodeToProse(steps_per_task=2, batch_size=4, seq_len=16, pretrain_steps=3, cache_dir=cache, size="micro",
                        eval_windows_n=4, progress=False)
    by = {m.name: m for m in bench.default_methods()}
    # EWC (sampled Fisher), replay, distillation and L2-SP together on full fine-tuning, and LoRA
    combo = dataclasses.replace(by["full+EWC"], name="full+EWC+replay+distill+L2SP", fisher_examples=4, replay=0.25,
                                replay_capacity=8, distill=1.0, l2sp=1e-3)
    methods = [combo, by["LoRA r=4"], by["MiLoRA r=16"]]
    wanted = [m.name for m in methods]
    experiment.run(bench, methods, seeds=[0], out_dir=str(tmp_path / "out"), progress=False, log=None)
    res = _check_artifacts(str(tmp_path / "out"), "language", wanted, [0], 2)
    rows = [r["R"] for m in res["methods"].values() for r in m["seeds"].values()]
    # row 0 and the baseline are the pretrained model for every method (MiLoRA's residual base included)
    assert all(r[0] == rows[0][0] for r in rows)
    assert all(r["baseline"] == rows[0][0] for m in res["methods"].values() for r in m["seeds"].values())
    for m in res["methods"].values():
        r = m["seeds"]["0"]
        assert r["metrics"]["forgetting"] == pytest.approx(r["R"][1][0] - r["R"][0][0])  # code-loss rise
        assert r["metrics"]["learning"] == pytest.approx(r["R"][0][1] - r["R"][1][1])  # prose-loss fall
        assert r["extra"]["code_kl_from_base"] >= 0.0


def test_three_domain_miniature(tmp_path, lang_cache):
    """code -> prose -> CSV data (held-out sets of at least 64 kB each, checked when the benchmark
    is built): a 3 x 3 score matrix and every artifact for O-LoRA, whose task-C adapter is a
    fresh one kept orthogonal to task B's; learning is the mean fall of each new task's loss."""
    bench = CodeProseData(steps_per_task=2, batch_size=4, seq_len=16, pretrain_steps=3, cache_dir=lang_cache,
                          size="micro", eval_windows_n=4, progress=False)
    (olora,) = [m for m in bench.default_methods() if m.name == "O-LoRA r=16"]
    res = experiment.run(bench, [olora], seeds=[0], out_dir=str(tmp_path), progress=False, log=None, plots=False)
    assert os.path.getsize(tmp_path / "scores.json") > 0 and f"| {olora.name} |" in open(tmp_path / "results.md").read()
    r = res["methods"][olora.name]["seeds"]["0"]
    R = np.asarray(r["R"])
    assert R.shape == (3, 3) and np.all(np.isfinite(R))
    assert r["metrics"]["learning"] == pytest.approx(((R[0, 1] - R[1, 1]) + (R[1, 2] - R[2, 2])) / 2)


def test_language_every_listed_method_builds(lang_cache):
    """Each method the language benchmark lists initialises on the byte-level Llama; those not
    installed are reported by name with a reason."""
    import jpeft

    bench = CodeToProse(steps_per_task=1, seq_len=16, pretrain_steps=3, cache_dir=lang_cache, size="micro",
                        eval_windows_n=2, progress=False)  # the cached model of the test above (or pretrains it)
    params = bench.base_params(0)
    x = bench.example_input()
    for m in bench.default_methods():
        p, a = experiment.init_adapter(bench, m.config, jax.random.key(0), params, corda=m.corda,
                                       calibration_examples=m.calibration_examples)
        out = jpeft.apply(bench.model, p, a, x[0])
        assert out.shape == (1, 16, 256), m.name
        if p is not params:  # a residual-base init (PiSSA, MiLoRA, CorDA): the model is unchanged at the start
            np.testing.assert_allclose(out, jpeft.apply(bench.model, params, None, x[0]), rtol=1e-4, atol=1e-4)


def test_corda_in_the_runner_calibrates_on_what_must_not_be_forgotten(tmp_path, lang_cache):
    """MethodSpec(corda="kpm") is jpeft.init_corda on windows of the pretrained task's (code's)
    training data, "ipm" on the first trained task's (prose); computed once per base and config;
    a short run trains it. KPM on a benchmark with nothing pretrained, and CorDA on anything
    but a plain LoRA, are refused by name."""
    import jpeft

    bench = CodeToProse(steps_per_task=2, batch_size=4, seq_len=16, pretrain_steps=3, cache_dir=lang_cache,
                        size="micro", eval_windows_n=4, progress=False)
    params = bench.base_params(0)
    (spec,) = [m for m in bench.default_methods() if m.name == "CorDA r=16"]
    assert spec.corda == "kpm" and "CorDA KPM" in spec.describe()
    small = dataclasses.replace(spec, calibration_examples=6)
    for mode, task in (("kpm", 0), ("ipm", 1)):
        res, ad = experiment.init_adapter(bench, small.config, jax.random.key(3), params, corda=mode,
                                          calibration_examples=6)
        calib = [(np.asarray(w[None, :-1]),) for w in bench.train_set(task)["tokens"][:6]]
        ref_res, ref_ad = jpeft.init_corda(small.config, params, None, bench.model, calib, mode=mode)
        for got, want in ((res, ref_res), (ad, ref_ad)):
            for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
                np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
        again = experiment.init_adapter(bench, small.config, jax.random.key(4), params, corda=mode, calibration_examples=6)
        assert again[0] is res and again[1] is ad  # cached: CorDA does not depend on the key
        if mode == "kpm":
            kpm_a = np.asarray(jax.tree.leaves(ad)[0])
        else:
            assert not np.allclose(np.asarray(jax.tree.leaves(ad)[0]), kpm_a)  # different directions
    out = experiment.run(bench, [small], seeds=[0], out_dir=str(tmp_path), progress=False, log=None, plots=False)
    r = out["methods"][small.name]["seeds"]["0"]
    assert r["baseline"][0] == pytest.approx(r["R"][0][0])  # the residual base + adapter is the pretrained model
    assert np.isfinite(r["metrics"]["forgetting"]) and r["metrics"]["learning"] > 0

    digits = SplitDigits(scenario="task", steps_per_task=1)
    with pytest.raises(ConfigError, match="no pretrained task"):
        experiment.init_adapter(digits, spec.config, jax.random.key(0), digits.base_params(0), corda="kpm")
    with pytest.raises(ConfigError, match="corda needs a plain LoRA"):
        experiment.MethodSpec("x", jpeft.LoraConfig(r=2, target_modules=".*", use_dora=True), corda="kpm")
    with pytest.raises(ConfigError, match="'kpm', 'ipm' or None"):
        experiment.MethodSpec("x", jpeft.LoraConfig(r=2, target_modules=".*"), corda="KPM")
    with pytest.raises(ConfigError, match="no CorDA"):
        experiment.MethodSpec("x", jpeft.LoraConfig(r=2, target_modules=".*"), corda="kpm", orthogonal=0.5)


def test_cli(tmp_path, capsys):
    out = str(tmp_path / "o")
    rc = main(["split-digits-class", "--methods", "naive,Replay", "--steps", "1", "--seeds", "0", "--out", out,
               "--no-progress", "--no-plots", "--batch-size", "4"])
    assert rc == 0
    assert all(os.path.exists(os.path.join(out, f)) for f in ARTIFACTS)
    assert "| replay |" in capsys.readouterr().out
    assert main(["split-digits-task", "--methods", "nope", "--steps", "1"]) == 2
    assert "unknown method 'nope' for split-digits-task; available: naive, EWC" in capsys.readouterr().out
    assert main(["split-digits-task", "--pretrain-steps", "5"]) == 2
    assert "only apply to the language benchmark" in capsys.readouterr().out
    # the option's own name, not its argparse dest (`--size` does not exist)
    assert main(["split-digits-task", "--model-size", "small"]) == 2
    assert "--model-size only apply to the language benchmarks" in capsys.readouterr().out
    assert main(["split-digits-task", "--list-methods"]) == 0
    assert "online EWC" in capsys.readouterr().out
    r = subprocess.run([sys.executable, "-m", "jpeft.forgetting", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "examples:" in r.stdout and "python -m jpeft.forgetting language" in r.stdout


def test_cli_replay_sizes(capsys):
    from jpeft.forgetting.cli import with_replay_sizes

    bench = SplitDigits("class", steps_per_task=1)
    methods = [m for m in bench.default_methods() if m.name in ("naive", "replay")]
    out = with_replay_sizes(methods, [4, 8])
    assert [m.name for m in out] == ["naive", "replay buffer 4", "replay buffer 8"]
    assert [m.replay_capacity for m in out[1:]] == [4, 8] and all(m.replay == methods[1].replay for m in out[1:])
    assert "buffer 8" in out[2].describe()
    assert with_replay_sizes(methods, None) == methods
    # through the command line: the sizes reach the runner, and a selection without replay is refused
    assert main(["split-digits-class", "--methods", "naive", "--replay-sizes", "4", "--steps", "1"]) == 2
    assert "none of the selected methods uses replay" in capsys.readouterr().out
    assert main(["split-digits-class", "--methods", "replay", "--replay-sizes", "0", "--steps", "1"]) == 2
    assert "--replay-sizes must be positive" in capsys.readouterr().out


def _tiny_digits():
    return SplitDigits("task", steps_per_task=2, batch_size=4, hidden=(4,), num_tasks=2)


def test_a_run_does_not_replace_an_earlier_runs_results(tmp_path, capsys):
    import jpeft

    out = str(tmp_path)
    naive = experiment.MethodSpec("naive", jpeft.FullFinetuneConfig())
    experiment.run(_tiny_digits(), [naive], seeds=[0], out_dir=out, progress=False, plots=False, log=None)
    before = {f: open(os.path.join(out, f)).read() for f in ARTIFACTS}
    # a second run into the same folder (the CLI's default folder is per benchmark) replaced every file
    # as soon as its first (method, seed) ended; now it is refused before training, the files untouched
    ewc = experiment.MethodSpec("EWC", jpeft.FullFinetuneConfig(), ewc=1.0, fisher_examples=4)
    with pytest.raises(OverwriteError, match=r"already holds the results of an earlier run \(scores.json, metrics.csv, "
                                             r"results.md\).*--force"):
        experiment.run(_tiny_digits(), [ewc], seeds=[0], out_dir=out, progress=False, plots=False, log=None)
    assert {f: open(os.path.join(out, f)).read() for f in ARTIFACTS} == before
    assert main(["split-digits-task", "--methods", "naive", "--steps", "1", "--seeds", "0", "--out", out,
                 "--no-progress", "--no-plots"]) == 2
    assert "already holds the results of an earlier run" in capsys.readouterr().out
    assert main(["split-digits-task", "--methods", "naive", "--steps", "1", "--seeds", "0", "--out", out,
                 "--no-progress", "--no-plots", "--force"]) == 0
    assert json.load(open(os.path.join(out, "scores.json")))["steps_per_task"] == 1
    assert not [f for f in os.listdir(out) if f.endswith("tmp")]
    # a repeated seed stored one run but reported "mean ± sample std over 2 seed(s)" (std 0.000)
    with pytest.raises(ConfigError, match=r"seeds must be distinct, found \[0, 0\]"):
        experiment.run(_tiny_digits(), [naive], seeds=[0, 0], out_dir=str(tmp_path / "dup"), progress=False, log=None)


def test_replay_does_not_change_the_batch_order(monkeypatch):
    # methods of a seed are paired by the sweep as seeing the same batches; replay's buffer order was drawn
    # from the batch generator, so every task after the first saw other batches than the other methods
    seen = []

    class Recorder:
        def __init__(self, g):
            self.g = g

        def integers(self, *a, **k):
            r = self.g.integers(*a, **k)
            seen.append(r.tolist())
            return r

        def __getattr__(self, name):
            return getattr(self.g, name)

    make = np.random.default_rng
    monkeypatch.setattr(experiment.np.random, "default_rng", lambda *a, **k: Recorder(make(*a, **k)))
    import jpeft

    orders = []
    for spec in (experiment.MethodSpec("naive", jpeft.FullFinetuneConfig()),
                 experiment.MethodSpec("replay", jpeft.FullFinetuneConfig(), replay=0.5, replay_capacity=4)):
        seen.clear()
        experiment.run_one(_tiny_digits(), spec, 3, log=None)
        orders.append(list(seen))
    assert len(orders[0]) == 4 and orders[0] == orders[1]


def test_replay_share_rounding_to_no_row_is_refused_before_training(tmp_path):
    # mix_batch refused it only at the first batch of the second task, after the earlier methods (and the
    # replay method's own first task) had trained and their partial results had been written
    import jpeft
    from jpeft.forgetting import sweep as SW

    bench = SplitDigits("class", steps_per_task=2, batch_size=2, num_tasks=2, hidden=(8,))
    full = jpeft.FullFinetuneConfig()
    methods = [experiment.MethodSpec("naive", full), experiment.MethodSpec("replay", full, replay=0.25, replay_capacity=4)]
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"0.25 of a batch of 2 rounds to 0"):
        experiment.run(bench, methods, seeds=[0], out_dir=str(out), progress=False, plots=False, log=None)
    assert not out.exists()
    fam = SW.SweepSpec("replay", methods[1], strength="replay", strengths=(0.5, 0.25))
    with pytest.raises(ConfigError, match=r"rounds to 0"):
        SW.sweep(bench, [fam], seeds=[0], out_dir=str(tmp_path / "sweep"), progress=False, plots=False, log=None)
    assert not (tmp_path / "sweep").exists()
    whole = experiment.MethodSpec("replay", full, replay=0.8, replay_capacity=4)  # 0.8 of 2 rounds to 2 of 2
    with pytest.raises(ConfigError, match=r"0.8 of a batch of 2 rounds to all 2 rows"):
        experiment.run(bench, [whole], seeds=[0], out_dir=str(out), progress=False, plots=False, log=None)
    assert not out.exists()


@pytest.mark.parametrize("field", [{"ewc": 1e6}, {"replay": 0.5}])
def test_per_task_adapter_refuses_ewc_and_replay(field):
    # both were accepted, described ("EWC lambda=1e+06, one adapter per task") and silently did nothing: the Fisher
    # and the replay buffer are built only for a shared adapter (the score matrix equalled plain per-task's)
    import jpeft

    with pytest.raises(ConfigError, match="with per_task_adapter would do nothing"):
        experiment.MethodSpec("x", jpeft.LoraConfig(r=2, target_modules=".*"), per_task_adapter=True, **field)


@pytest.mark.parametrize("field", [{"ewc": 1.0, "ewc_gamma": 1.5}, {"distill": 1.0, "temperature": 0.0},
                                   {"ewc": 1.0, "fisher_examples": 0}, {"replay": 0.5, "replay_capacity": 0}])
def test_method_spec_refuses_bad_regularizer_settings_before_training(field):
    # each was refused only where first used: after the first task had trained (ewc_gamma, fisher_examples,
    # replay_capacity) or inside the jitted step (temperature)
    import jpeft

    with pytest.raises(ConfigError, match="MethodSpec 'x'"):
        experiment.MethodSpec("x", jpeft.FullFinetuneConfig(), **field)
