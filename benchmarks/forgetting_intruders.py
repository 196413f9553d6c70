"""Does removing LoRA's intruder dimensions after training reduce forgetting? (issue 21)

On the code->prose language benchmark (jpeft.forgetting.language), LoRA adapters are trained
for each seed (jpeft.forgetting.experiment.run_one, the runner's code path), then reduced with
jpeft.reduce_intruder_dimension (PEFT 0.21's post-hoc mitigation, same
arguments), and learning (fall of held-out prose loss) and forgetting (rise of held-out code
loss) are measured before and after on the same held-out windows. Prints a markdown table with
95 % bootstrap intervals over seeds and the paired test (after - before), and writes JSON.

    python benchmarks/forgetting_intruders.py --seeds 0 1 2 3 4 --steps 200 --json /tmp/intruders.json

This is a forgetting study, not a speed benchmark; its numbers are in docs/FORGETTING.md.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

import jpeft
from jpeft.forgetting import stats as S
from jpeft.forgetting.experiment import MethodSpec, run_one
from jpeft.forgetting.language import CodeToProse
from jpeft import intruder_report, reduce_intruder_dimension

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # as the benchmark's LoRA rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 16])
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.75, 0.0], help="mitigation_lambda values")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--epsilon", type=float, default=0.5)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    bench = CodeToProse(steps_per_task=a.steps, cache_dir=a.cache_dir, progress=False)
    rows = []
    for r in a.ranks:
        spec = MethodSpec(f"LoRA r={r}", jpeft.LoraConfig(r=r, alpha=2 * r, target_modules=LINEAR), lr=a.lr)
        for seed in a.seeds:
            out = run_one(bench, spec, seed, keep_adapter=True)
            params, ad, Rm = out["params"], out["adapter"], np.asarray(out["R"])
            code0, prose0 = Rm[0]
            row = {"rank": r, "seed": seed, "learning": float(prose0 - Rm[1, 1]), "forgetting": float(Rm[1, 0] - code0),
                   "intruders": sum(len(v["indices"]) for v in intruder_report(params, ad, top_k=a.top_k,
                                                                               threshold_epsilon=a.epsilon).values())}
            for lam in a.lambdas:
                red = reduce_intruder_dimension(params, ad, top_k=a.top_k, threshold_epsilon=a.epsilon,
                                                mitigation_lambda=lam)
                row[f"learning@{lam:g}"] = float(prose0 - bench.evaluate(params, red, 1, 1))
                row[f"forgetting@{lam:g}"] = float(bench.evaluate(params, red, 0, 1) - code0)
            rows.append(row)
            print(json.dumps(row), flush=True)
    lines = [f"LoRA (alpha = 2r, all linear projections, lr {a.lr:g}, {a.steps} steps of {bench.batch_size} x "
             f"{bench.seq_len} bytes), {len(a.seeds)} seeds {a.seeds}; top_k {a.top_k}, epsilon {a.epsilon:g}. "
             "Mean [95 % bootstrap CI]; change = after - before, paired over seeds.", "",
             "| rank | intruders (sum over 14 kernels) | mitigation_lambda | learning before | learning after | change | "
             "p (t) | forgetting before | forgetting after | change | p (t) |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def ci(v):
        lo, hi = S.bootstrap_ci(v)
        return f"{np.mean(v):.3f} [{lo:.3f}, {hi:.3f}]"

    for r in a.ranks:
        rs = [x for x in rows if x["rank"] == r]
        for lam in a.lambdas:
            cells = []
            for k in ("learning", "forgetting"):
                before = [x[k] for x in rs]
                after = [x[f"{k}@{lam:g}"] for x in rs]
                t = S.paired_test(after, before)
                cells += [ci(before), ci(after), f"{t['mean_diff']:+.4f} [{t['ci'][0]:+.4f}, {t['ci'][1]:+.4f}]",
                          f"{t['p_t']:.2g}"]
            lines.append(f"| {r} | {np.mean([x['intruders'] for x in rs]):.1f} | {lam:g} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "rows": rows, "table": lines}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
