"""What one jpeft LoRA training step costs the host in page faults (issue 24).

XLA's CPU backend allocates a step's temporaries afresh at every call and frees them at the
end; with 4 KiB pages the kernel faults every page in again (and zeroes it) on every step. This
script trains the issue-size Llama (hidden 512, MLP 1376, vocabulary 8192, LoRA r=8 on every
projection) and prints, per step: wall time, minor page faults (and the MiB they cover),
system and user CPU time; then XLA's temporary bytes and the peak RSS. Run it with and without
glibc's transparent-huge-page tunable to see what the `jpeft` command's default saves here:

    python benchmarks/host_pages.py --layers 4
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python benchmarks/host_pages.py --layers 4

(Run as a plain script, nothing sets the tunable for you; the `jpeft` command does.) The
`jpeft` command on the CPU also keeps freed memory for the next step (no faults at all):

    T=$(python -c "import _jpeft_launcher as L; print(L.huge_pages_env()['GLIBC_TUNABLES'])")
    GLIBC_TUNABLES=$T python benchmarks/host_pages.py --layers 4
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import time


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4, help="timed steps after two warm-up steps")
    ap.add_argument("--scan-layers", action="store_true")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp  # noqa: F401
    import optax

    import jpeft

    cfg = jpeft.models.LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_layers=args.layers,
                                   num_heads=8, num_kv_heads=8, scan_layers=args.scan_layers)
    model = jpeft.models.LlamaForCausalLM(cfg)
    ids = jax.random.randint(jax.random.key(0), (args.batch, args.seq + 1), 0, 8192)
    params = jax.jit(model.init)(jax.random.key(0), ids[:, :8])

    def loss_fn(p, a, rows, key):
        logits = jpeft.apply(model, p, a, rows[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, rows[:, 1:]).mean()

    adapter = jpeft.init(jpeft.LoraConfig(r=8, target_modules="all-linear"), params, jax.random.key(1), model, ids[:, :8])
    opt = optax.adamw(1e-4)
    state = opt.init(adapter)
    step = jpeft.make_train_step(loss_fn, opt).lower(params, adapter, state, ids, jax.random.key(0)).compile()
    temp = step.memory_analysis().temp_size_in_bytes
    print(f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}; {args.layers} layers, batch {args.batch} x "
          f"{args.seq}; XLA temporaries {temp / 2**20:.0f} MiB")
    for _ in range(2):
        adapter, state, m = step(params, adapter, state, ids, jax.random.key(0))
        float(m["loss"])
    rows = []
    for _ in range(args.steps):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        adapter, state, m = step(params, adapter, state, ids, jax.random.key(0))
        float(m["loss"])
        t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        faults = r1.ru_minflt - r0.ru_minflt
        rows.append({"step_s": t1 - t0, "minor_faults": faults, "sys_s": r1.ru_stime - r0.ru_stime,
                     "user_s": r1.ru_utime - r0.ru_utime})
        print(f"step {t1 - t0:.3f} s: {faults} minor faults ({faults * resource.getpagesize() / 2**20:.0f} MiB of "
              f"pages), system {rows[-1]['sys_s']:.3f} s, user {rows[-1]['user_s']:.3f} s")
    with open("/proc/self/status") as f:
        hwm = re.search(r"VmHWM:\s+(\d+)", f.read())
    peak = int(hwm.group(1)) * 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"peak RSS {peak / 2**20:.0f} MiB")
    return {"temp_bytes": temp, "steps": rows, "peak_rss": peak}


if __name__ == "__main__":
    main()
