"""Keeps benchmarks/bench_vs_hf.py from rotting: one toy-sized run end to end (no timing
assertions; timings on a shared CI machine mean nothing). What is checked are numbers with a
reference: jpeft and transformers+peft, loaded from the same files, must produce the same
loss at every training step, and the analytic FLOP count must agree with XLA's own count."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.join(os.path.dirname(HERE), "benchmarks")
sys.path.insert(0, BENCH)

import _common as C  # noqa: E402
import bench_vs_hf  # noqa: E402


def test_peak_rss_sees_an_allocation():
    mem = C.PeakRSS()
    block = bytearray(64 * 2**20)
    block[:: 4096] = b"x" * len(block[:: 4096])  # touch every page
    del block
    assert mem.above_baseline() >= 60 * 2**20


def test_flop_count_matches_a_hand_count():
    s = C.Size(hidden=4, layers=1, heads=2, intermediate=6, vocab=10, batch=1, seq=3)
    f = C.lora_step_flops(s, r=2)
    T = 3
    frozen = 4 * 4 * 4 + 3 * 4 * 6 + 4 * 10
    attn = 2 * 2 * 1 * 3 * 3 * 4
    lora = sum(2 * T * 2 * (a + b) for a, b in [(4, 4)] * 4 + [(4, 6), (4, 6), (6, 4)])
    # the first layer's q/k/v input gradient (base 3 x 4 x 4, LoRA branch 3 x 4 x r): nothing
    # before them trains, so no one forms it
    first_dx = 2 * T * 3 * 4 * 4 + 2 * T * 3 * 4 * 2
    assert f["forward"] == 2 * T * frozen + attn + lora
    assert f["backward"] == 2 * T * frozen + 2 * attn + 2 * lora - first_dx
    # causal: the 3 * 4 / 2 = 6 query-key pairs of 3 tokens a causal kernel computes, not all 9
    c = C.lora_step_flops(s, r=2, causal=True)
    attn_causal = 2 * 2 * 1 * 6 * 4
    assert c["forward"] == 2 * T * frozen + attn_causal + lora
    assert c["backward"] == 2 * T * frozen + 2 * attn_causal + 2 * lora - first_dx
    assert C.full_step_flops(s, causal=True)["step"] == C.full_step_flops(s)["step"] - 3 * (attn - attn_causal)
    # full fine-tuning: every weight gradient, and the first layer's input gradient (the embedding trains)
    assert C.full_step_flops(s)["step"] == 3 * (2 * T * frozen) + 3 * attn


def test_flop_count_matches_xlas_count_of_the_compiled_step():
    """The analytic LoRA step count against XLA's own count of jpeft's compiled step (one layer,
    dense attention, so nothing is in a loop XLA counts once; matmuls dominate): XLA counts the
    elementwise work too, so it may be a little higher, never lower. The count once included
    the first layer's q/k/v input gradient, which XLA drops (nothing before it trains): 12 %
    more than XLA's count here, 2 % at the issue size, every MFU that much too high."""
    import depth_stats

    s = C.Size(hidden=256, layers=1, heads=4, intermediate=512, vocab=256, batch=4, seq=32)
    ca = depth_stats.compile_step(s, "reference", 8, False, False).cost_analysis()
    xla = float((ca[0] if isinstance(ca, (list, tuple)) else ca)["flops"])
    assert 1.0 <= xla / C.lora_step_flops(s, r=8)["step"] < 1.04


def test_scaling_goals_tell_superlinear_memory_from_flat():
    """bench_scaling's memory verdict: quadratic growth fails; memory that falls and then stays
    flat within a few MiB (what the blockwise kernel gives) passes."""
    import bench_scaling

    def points(mib):
        return [{"axis": "seq", "value": L, "ratio_lora": {"median": 1.0},
                 "workers": {"jpeft_lora": {"peak_rss_mib": m, "mfu": 0.5}, "hf_lora": {"peak_rss_mib": 1e9}}}
                for L, m in zip((128, 256, 512, 1024, 2048, 4096), mib)]

    key = "jpeft peak memory linear in sequence length"
    assert bench_scaling.goals(points([1694, 1612, 1594, 1575, 1623, 1645]))[key] is True  # session 21
    assert bench_scaling.goals(points([1000 + 10 * k ** 2 for k in (1, 2, 4, 8, 16, 32)]))[key] is False
    assert bench_scaling.goals(points([1000 + 0.5 * L for L in (128, 256, 512, 1024, 2048, 4096)]))[key] is True


def test_scaling_merge_joins_parts_of_one_sweep_and_refuses_others(tmp_path):
    """``bench_scaling.py --merge``: parts of a sweep run axis by axis become one report whose
    goals are judged over all points; parts measured otherwise, stopped part-way or measuring a
    point twice are refused with the reason, and nothing is written."""
    import bench_scaling

    def point(axis, value, ratio, jpeft_mib=900.0):
        return {"axis": axis, "value": value, "size": f"issue:{axis}={value}", "r": 8, "tokens": 4096,
                "ratio_lora": {"median": ratio, "min": ratio, "max": ratio, "per_round": [ratio]},
                "workers": {"jpeft_lora": {"step_s": ratio, "mfu": 0.6, "peak_rss_mib": jpeft_mib, "xla_temp_mib": 1.0},
                            "hf_lora": {"step_s": 1.0, "mfu": 0.5, "peak_rss_mib": 1000.0}}}

    def part(name, pts, **kw):
        rep = {"base": "issue", "tokens": 4096, "rounds": 2, "steps": 3, "per_turn": 2, "attention": "auto",
               "attention_block": 0, "jpeft_config": "", "points": pts, "complete": True,
               "env": {"cpu": "AMD EPYC", "cpus": 2, "xla_flags": "", "huge_pages": "jpeft", "wall_s": 10.0,
                       "load_avg_end": [0.1, 0.1, 0.1]}}
        for k, v in kw.items():
            (rep["env"] if k in bench_scaling.SHARED_ENV else rep)[k] = v
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(rep))
        return str(path)

    a = part("a", [point("seq", 128, 0.65), point("seq", 256, 0.68)])
    b = part("b", [point("depth", 2, 0.9)])
    out = tmp_path / "all.json"
    merged = bench_scaling.main(["--merge", a, b, "--json", str(out), "--markdown", str(tmp_path / "all.md")])
    assert [(p["axis"], p["value"]) for p in merged["points"]] == [("seq", 128), ("seq", 256), ("depth", 2)]
    assert merged["goals"]["ratio <= 0.70 at every point"] is False  # the depth point's 0.9 counts
    assert merged["env"]["wall_s"] == 20.0 and merged["env"]["merged_from"] == ["a.json", "b.json"]
    assert json.loads(out.read_text())["points"] == merged["points"]
    assert "| depth (lora) | 2 |" in (tmp_path / "all.md").read_text()
    assert bench_scaling.merge([bench_scaling._load(a)])["goals"]["ratio <= 0.70 at every point"] is True

    bad = {"other CPU": part("c", [point("rank", 4, 0.7)], cpu="Intel Xeon"),
           "other rounds": part("d", [point("rank", 4, 0.7)], rounds=3),
           "stopped part-way": part("e", [point("rank", 4, 0.7)], complete=False),
           "twice": part("f", [point("seq", 256, 0.7)])}
    for why, other in bad.items():
        out.unlink(missing_ok=True)
        with pytest.raises(SystemExit):
            bench_scaling.main(["--merge", a, other, "--json", str(out)])
        assert not out.exists(), why
    for why, other, says in [("cpu", bad["other CPU"], "env.cpu"), ("rounds", bad["other rounds"], "rounds"),
                             ("partial", bad["stopped part-way"], "stopped part-way"), ("twice", bad["twice"], "seq=256")]:
        with pytest.raises(bench_scaling.MergeError, match=says):
            bench_scaling.merge([bench_scaling._load(a), bench_scaling._load(other)])
    (tmp_path / "junk.json").write_text("not json")
    with pytest.raises(bench_scaling.MergeError, match="cannot read"):
        bench_scaling._load(str(tmp_path / "junk.json"))


def test_toy_run_end_to_end(tmp_path):
    report = bench_vs_hf.main([
        "--size", "toy", "--rounds", "1", "--steps", "2", "--per-turn", "2", "--warmup", "0", "--no-bf16",
        "--memory-size", "none", "--workdir", str(tmp_path / "w"), "--json", str(tmp_path / "r.json"),
        "--peak-matmul", "256",  # MFU's denominator from small products: 2048^2 ones cost ~1.5 s of CPU a worker
    ])
    r = report["ratios"]["step time jpeft_f32 / hf_f32"]
    assert math.isfinite(r["median"]) and r["median"] > 0
    # two turns of two back-to-back steps each, per worker (as bench_scaling.py times them)
    assert report["per_turn"] == 2 and all(len(report["raw_rounds"][0]["steps"][n]) == 4 for n in report["workers"])
    # same weights, same adapter, same batches, same optimizer: same losses (f32 round-off only)
    chk = report["loss_checks"]["jpeft_f32 vs hf_f32"]
    assert chk["steps"] == 5
    assert chk["max_abs"] < 1e-4, chk
    for name in ("hf_f32", "jpeft_f32"):
        s = report["speed"][name]
        assert s["peak_rss_above_baseline_mb"] > 0 and s["mfu"] > 0 and s["tokens_per_s"] > 0
    # XLA's own FLOP count of the compiled step agrees with the analytic one within 10%
    xla = report["speed"]["jpeft_f32"]["xla_flops"]
    if math.isfinite(xla):
        assert abs(xla / 1e9 - report["speed"]["analytic_step_gflop"]) / report["speed"]["analytic_step_gflop"] < 0.1
    assert (tmp_path / "r.json").exists()
    assert "| hf_f32 |" in bench_vs_hf.markdown(report)


def test_toy_memory_runs_end_to_end(tmp_path):
    """The LoRA-vs-full memory runs (scanned + remat model, f32 and bf16 bases), toy size: every
    run reports, the ratios are formed, and LoRA trains far fewer parameters than full."""
    out = tmp_path / "m.json"
    report = bench_vs_hf.main(["--memory-only", "--memory-size", "400m-toy", "--memory-steps", "1",
                               "--workdir", str(tmp_path / "w"), "--json", str(out)])
    m = report["memory_400m"]
    assert m["model"] == "scan-remat"
    for k in ("lora_f32", "full_f32", "lora_bf16", "full_bf16"):
        assert m[k]["peak_rss_above_baseline"] > 0 and m[k]["scan"] and m[k]["remat"], k
        assert math.isfinite(m[k]["loss"])
    assert m["lora_f32"]["n_trainable"] < m["full_f32"]["n_trainable"] / 10
    assert m["lora_f32"]["n_params"] == m["full_f32"]["n_params"]
    for k in ("ratio_f32", "ratio_bf16", "ratio_bf16_vs_full_f32"):
        assert 0 < m[k] < 10, (k, m[k])
    assert out.exists()


def test_accelerator_benchmark_toy_run(tmp_path):
    """benchmarks/accelerator.py at toy size on the CPU: the jpeft LoRA and full fine-tuning
    runs go through jpeft.fit and report their numbers; the full step counts the weight
    gradients on top of the LoRA count without LoRA."""
    import json
    import subprocess

    import accelerator as A

    size = A.SIZES["toy"]
    h, i, v, n, T = size.hidden, size.intermediate, size.vocab, size.layers, size.tokens
    weights = n * (4 * h * h + 3 * h * i) + h * v
    assert C.full_step_flops(size)["step"] == C.lora_step_flops(size, r=0)["step"] + 2 * T * weights + 2 * T * 3 * h * h
    out = tmp_path / "acc.json"
    r = subprocess.run([sys.executable, os.path.join(BENCH, "accelerator.py"), "--size", "toy", "--steps", "2",
                        "--runs", "jpeft-lora,jpeft-full", "--seq", "16", "--batch", "3", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(out.read_text())
    assert (report["shape"]["seq"], report["shape"]["batch"], report["shape"]["hidden"]) == (16, 3, size.hidden)
    res = {x["run"]: x for x in report["results"]}
    lora, full = res["jpeft-lora"], res["jpeft-full"]
    assert full["trainable"] == full["params"] > lora["trainable"] > 0
    for x in (lora, full):
        assert x["tokens_per_s"] > 0 and 0 < x["mfu"] and len(x["loss"]) == 3 and all(map(math.isfinite, x["loss"]))


def test_accelerator_benchmark_summarises_interleaved_rounds():
    """With --rounds, each run's median is over its own rounds, and a round's jpeft / PEFT ratio
    counts only where both runs of that round finished (a failed run is not paired with another
    round's)."""
    import numpy as np

    import accelerator as A

    results = [{"run": "jpeft-lora", "round": 0, "step_s": 0.10}, {"run": "peft-lora", "round": 0, "step_s": 0.25},
               {"run": "jpeft-lora", "round": 1, "step_s": 0.12}, {"run": "peft-lora", "round": 1, "error": "oom"},
               {"run": "jpeft-lora", "round": 2, "step_s": 0.11}, {"run": "peft-lora", "round": 2, "step_s": 0.20}]
    s = A.summarise(results, ["jpeft-lora", "peft-lora"], 3)
    assert s["median_step_s"] == {"jpeft-lora": 0.11, "peft-lora": 0.225}
    assert np.allclose(s["ratios"], [0.4, 0.55], rtol=0, atol=1e-12) and abs(s["ratio_median"] - 0.475) < 1e-12
    assert A.summarise(results[:1], ["jpeft-lora", "peft-lora"], 1)["ratio_median"] is None


def test_accelerator_benchmark_gives_both_frameworks_one_adamw():
    """accelerator.py's AdamW is the same in both frameworks: optax's and torch's defaults differ
    (weight decay 1e-4 against 1e-2), so the settings are spelled out; three updates of the same
    parameters with the same gradients agree."""
    import numpy as np
    import optax
    import torch

    import accelerator as A

    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((4, 3)).astype(np.float32)
    grads = [rng.standard_normal((4, 3)).astype(np.float32) for _ in range(3)]
    opt = optax.adamw(A.ADAMW["lr"], eps=A.ADAMW["eps"], weight_decay=A.ADAMW["weight_decay"])
    w, state = w0, opt.init(w0)
    tw = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    topt = torch.optim.AdamW([tw], **A.ADAMW)
    for g in grads:
        upd, state = opt.update(g, state, w)
        w = optax.apply_updates(w, upd)
        tw.grad = torch.from_numpy(g)
        topt.step()
    np.testing.assert_allclose(np.asarray(w), tw.detach().numpy(), rtol=0, atol=3e-7)  # float32 round-off
    assert A.ADAMW["weight_decay"] > 0 and np.abs(np.asarray(w) - w0).max() > 0


def test_accelerator_benchmark_divides_by_the_devices_own_peak():
    """MFU's denominator is the data-sheet peak of the device's own variant: an H100 PCIe (756
    TFLOP/s dense bf16) is not the SXM part (989), whose peak every "H100" once got."""
    import accelerator as A

    unknown = lambda: float("nan")
    assert A._peak("NVIDIA H100 80GB HBM3", None, unknown)[0] == 989e12
    assert A._peak("NVIDIA H100 PCIe", None, unknown) == (756e12, "data sheet (H100 PCIe, dense bf16)")
    assert A._peak("NVIDIA H100 NVL", None, unknown)[0] == 835e12
    assert A._peak("NVIDIA H200", None, unknown)[0] == 989e12
    assert A._peak("NVIDIA H100 PCIe", 500, unknown) == (500e12, "given (--peak-tflops)")


@pytest.mark.slow
def test_scaling_sweep_toy_end_to_end(tmp_path):
    """benchmarks/bench_scaling.py at toy size: the LoRA-vs-full point (four workers: LoRA and
    full fine-tuning in both frameworks), one round; checks the report's structure, not its
    timings."""
    import bench_scaling

    report = bench_scaling.main([
        "--base", "toy", "--axes", "mode", "--tokens", "32", "--depth-seq", "16",
        "--rounds", "1", "--steps", "1", "--per-turn", "1", "--warmup", "0", "--workdir", str(tmp_path / "w"),
        "--json", str(tmp_path / "s.json"), "--huge-pages", "jpeft", "--peak-matmul", "256",
    ])
    assert report["env"]["huge_pages"] == "jpeft"
    assert [(p["axis"], p["value"]) for p in report["points"]] == [("mode", "lora+full")]
    full = report["points"][0]
    for m in ("lora", "full"):
        assert math.isfinite(full[f"ratio_{m}"]["median"]) and full[f"ratio_{m}"]["median"] > 0
        assert full["workers"][f"jpeft_{m}"]["xla_temp_mib"] > 0
        # the same work on both sides: same weights, adapter, batches and updates give the same
        # loss at every step (the first, and each timed one after the warm-up)
        chk = full[f"loss_check_{m}"]
        assert chk["same"] and chk["steps"] == 2 and chk["max_abs"] < 1e-4, (m, chk)
    # full fine-tuning counts the weight gradients: more FLOPs than LoRA's step
    assert full["workers"]["jpeft_full"]["step_gflop"] > full["workers"]["jpeft_lora"]["step_gflop"]
    md = bench_scaling.markdown(report)
    assert "| mode (lora) |" in md and "| mode (full) |" in md
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["complete"] is True and saved["points"] == json.loads(json.dumps(report["points"], default=float))


def test_paired_benchmarks_refuse_settings_that_time_nothing(capsys):
    """bench_vs_hf.py and bench_scaling.py with no rounds, turns or steps per turn would time
    nothing and report NaN ratios (or fail on an empty list): refused by name, before any work."""
    import bench_scaling

    for main in (bench_vs_hf.main, bench_scaling.main):
        for bad in (["--per-turn", "0"], ["--steps", "0"], ["--rounds", "0"]):
            with pytest.raises(SystemExit):
                main(["--size" if main is bench_vs_hf.main else "--base", "toy"] + bad)
            assert "--rounds, --steps and --per-turn must be >= 1" in capsys.readouterr().err


def test_huge_pages_reach_the_workers_asked_for():
    on = C.host_pages_env("jpeft", "jpeft")
    assert "glibc.malloc.hugetlb=1" in on["GLIBC_TUNABLES"]
    assert C.host_pages_env("hf", "jpeft") == {} and C.host_pages_env("jpeft", "none") == {}
    assert C.host_pages_env("hf", "both") == on


def test_host_pages_script_counts_a_steps_faults():
    import host_pages

    rep = host_pages.main(["--layers", "1", "--batch", "1", "--seq", "8", "--steps", "2"])
    assert rep["temp_bytes"] > 0 and rep["peak_rss"] > 0 and len(rep["steps"]) == 2
    assert all(r["step_s"] > 0 and r["minor_faults"] >= 0 for r in rep["steps"])


def test_size_specs_and_full_flops():
    s = C.size("toy:seq=64,batch=1,layers=3")
    assert (s.seq, s.batch, s.layers, s.hidden) == (64, 1, 3, C.SIZES["toy"].hidden)
    f, lo = C.full_step_flops(s), C.lora_step_flops(s, r=0)
    assert f["forward"] == lo["forward"] and f["backward"] > lo["backward"]


def test_quant_benchmark_toy_run(tmp_path):
    """bench_quant.py end to end at toy size: one process per base, the report's columns."""
    out = tmp_path / "q.json"
    r = subprocess.run([sys.executable, os.path.join(BENCH, "bench_quant.py"), "--size", "toy", "--bases", "bf16,nf4",
                        "--no-kernel-eval", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(out.read_text())
    bf16, nf4 = rep["rows"]
    assert (bf16["base"], nf4["base"]) == ("bf16", "nf4") and bf16["bytes_vs_bf16"] == 1.0
    assert nf4["kernel_bytes_vs_bf16"] < 0.3 and nf4["logit_rel_err_vs_bf16"] > 0
    assert "step 3/3" in r.stderr and "| nf4 |" in r.stdout


def test_attention_kernel_benchmark_toy_run(tmp_path):
    """benchmarks/attention_cpu.py runs both frameworks' processes and reports a ratio per block."""
    out = tmp_path / "att.json"
    r = subprocess.run([sys.executable, os.path.join(BENCH, "attention_cpu.py"), "--seq", "48", "--blocks", "16,64,16x32",
                        "--heads", "2", "--dim", "8", "--rounds", "1", "--reps", "1", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(x["seq"], x["block"]) for x in rows] == [(48, 16), (48, 64), (48, "16x32")]
    # both frameworks' processes in the same environment by default (as bench_scaling.py), with
    # the `jpeft` command's glibc tunables
    env = json.loads(out.read_text())["env"]
    assert env["torch"] == env["jpeft"] == C.host_pages_env("jpeft", "both")
    assert all(x["jpeft_s"] > 0 and x["torch_s"] > 0 and x["ratio"] > 0 for x in rows)
    assert "| 48 x 1 | jpeft blockwise, blocks of 16 |" in r.stdout
    assert "| 48 x 1 | jpeft blockwise, tiles of 16 x 32 |" in r.stdout
    import attention_cpu
    with pytest.raises(SystemExit, match="QUERIESxKEYS such as 256x512, got '16x0'"):
        attention_cpu.parse_block("16x0")
    # fixed tokens per batch (the batch follows the length) and the models' automatic block
    r = subprocess.run([sys.executable, os.path.join(BENCH, "attention_cpu.py"), "--seq", "32,256", "--tokens", "512",
                        "--blocks", "0", "--heads", "2", "--dim", "8", "--rounds", "1", "--reps", "1",
                        "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(x["seq"], x["batch"], x["block"]) for x in rows] == [(32, 16, 0), (256, 2, 0)]
    assert "| 256 x 2 | jpeft blockwise, automatic blocks (64) |" in r.stdout


def test_weight_gradient_benchmark_toy_run(tmp_path, capsys):
    """benchmarks/weight_grad_cpu.py (in this process, as test_fused_projections_benchmark_toy_run:
    its main imports JAX, which a process of its own spends seconds on) times both pullbacks,
    says which path jpeft took and that both give the same weight gradient; a malformed shape is
    refused by name."""
    import weight_grad_cpu

    out = tmp_path / "wg.json"
    capsys.readouterr()
    assert weight_grad_cpu.main(["--shapes", "16x512x2048,16x64x64", "--rounds", "1", "--reps", "1",
                                 "--json", str(out)]) == 0
    stdout = capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert [(x["shape"], x["path"]) for x in rows] == [("16x512x2048", "copy"), ("16x64x64", "plain")]
    assert all(x["plain_ms"] > 0 and x["jpeft_ms"] > 0 and x["max_rel_diff"] < 1e-5 for x in rows)
    assert "| 16x512x2048 | copy |" in stdout
    with pytest.raises(SystemExit, match="expected TOKENSxINxOUT"):  # exits non-zero, the message on stderr
        weight_grad_cpu.main(["--shapes", "16x512"])


def test_fused_projections_benchmark_toy_run(tmp_path):
    """benchmarks/fused_projections.py (in this process: no JAX start-up) times both variants
    of the q/k/v and gate/up groups, checks their gradients agree and writes the rows; a bad
    value is refused by name."""
    import fused_projections

    out = tmp_path / "fp.json"
    rep = fused_projections.main(["--tokens", "24", "--hidden", "16", "--intermediate", "24", "--rank", "2",
                                  "--rounds", "2", "--reps", "1", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(x["group"], x["outs"]) for x in rows] == [("q/k/v", [16, 16, 16]), ("gate/up", [24, 24])]
    for x in rows:
        assert x["separate_ms"] > 0 and x["fused_ms"] > 0 and len(x["fused_ms_rounds"]) == 2
        assert x["max_rel_grad_diff"] < 1e-5
    assert rep["rows"][0]["fused_over_separate"] == rows[0]["fused_over_separate"]
    with pytest.raises(SystemExit, match="--rank must be >= 1, found 0"):
        fused_projections.main(["--rank", "0"])


def test_step_options_benchmark_toy_run(tmp_path, capfd, monkeypatch):
    """benchmarks/step_options.py compiles jpeft's step with and without compiler options,
    compares their adapter gradients and times them in turns; options XLA refuses (which also
    shows they reach the compiler) and malformed variants end in a named message. Its main runs
    in this process (no JAX start-up of its own; as test_weight_gradient_benchmark_toy_run), and
    writes the table to ``sys.__stdout__`` (file descriptor 1, read with ``capfd``)."""
    import step_options

    monkeypatch.setattr(sys, "stdout", sys.stdout)  # main points it at sys.__stdout__; put back after the test
    out = tmp_path / "so.json"
    capfd.readouterr()
    assert step_options.main(["--size", "toy", "--rounds", "2", "--per-turn", "1",
                              "--variant", "nofm:xla_cpu_enable_fast_min_max=false", "--json", str(out)]) == 0
    stdout = capfd.readouterr().out
    rows = json.loads(out.read_text())["variants"]
    assert list(rows) == ["default", "nofm"]
    assert rows["nofm"]["options"] == {"xla_cpu_enable_fast_min_max": False}
    assert rows["default"]["grad_max_rel_diff"] == 0.0 and rows["nofm"]["grad_max_rel_diff"] < 1e-5
    assert all(len(x["steps_s"]) == 2 and x["step_s"] > 0 and x["xla_temp_mib"] > 0 for x in rows.values())
    assert rows["default"]["ratio"] == 1.0
    assert "| nofm |" in stdout
    with pytest.raises(SystemExit) as refused:  # a message as the exit code: printed to stderr, status 1
        step_options.main(["--size", "toy", "--variant", "bad:xla_cpu_experimental_ynn_fusion_type=dot"])
    assert isinstance(refused.value.code, str) and "XLA refused the options" in refused.value.code
    assert "LIBRARY_FUSION_TYPE_DOT, not dot" in refused.value.code
    assert '"variant": "default"' not in capfd.readouterr().err  # refused before the model is built and its step compiled
    with pytest.raises(SystemExit) as bad:
        step_options.main(["--variant", "nolabel"])
    assert isinstance(bad.value.code, str) and "expected LABEL:KEY=VALUE" in bad.value.code


def test_lm_loss_benchmark_toy_run(tmp_path, capfd, monkeypatch):
    """benchmarks/lm_loss.py reports the step's XLA temporaries with the whole-logits loss and
    with jpeft.lm_loss's chunks (from abstract shapes), and with --time compares their adapter
    gradients and times them in turns; a malformed list ends in a named message. Its main runs
    in this process, as step_options.py's above."""
    import lm_loss

    monkeypatch.setattr(sys, "stdout", sys.stdout)  # main points it at sys.__stdout__; put back after the test
    out = tmp_path / "ll.json"
    capfd.readouterr()
    assert lm_loss.main(["--size", "toy", "--vocab", "512,2048", "--seq", "32", "--batch", "2", "--chunks", "16",
                         "--time", "--rounds", "1", "--per-turn", "1", "--json", str(out)]) == 0
    stdout = capfd.readouterr().out
    res = json.loads(out.read_text())
    assert [(m["vocab"], m["seq"]) for m in res["memory"]] == [(512, 32), (2048, 32)]
    big = res["memory"][1]
    assert big["logits_mib"] == 2 * 32 * 2048 * 4 / 2**20
    assert big["chunk 16"] < big["whole"]  # the whole logits (and their gradient) are not among the temporaries
    t = res["time"]
    assert t["whole"]["ratio"] == 1.0 and t["whole"]["grad_max_rel_diff"] == 0.0
    assert t["chunk 16"]["grad_max_rel_diff"] < 1e-5 and len(t["chunk 16"]["steps_s"]) == 1
    assert "| chunk 16 |" in stdout
    with pytest.raises(SystemExit) as bad:  # argparse: status 2, the message on stderr
        lm_loss.main(["--vocab", "8k"])
    assert bad.value.code == 2 and "expected positive integers separated by commas" in capfd.readouterr().err
