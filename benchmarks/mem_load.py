"""Peak memory of loading a Hugging Face checkpoint with ``jpeft.models.from_pretrained``.

Writes a random Llama of ``--size`` (default the 393M "400m" size) as a Hugging Face folder
once (in its own process), then loads it in a fresh process and reports the resident memory
above that process's post-import baseline: right after loading, and the peak while loading.

Examples:
  python benchmarks/mem_load.py                     # f32, unrolled layers
  python benchmarks/mem_load.py --scan              # LlamaConfig(scan_layers=True)
  python benchmarks/mem_load.py --scan --dtype bf16
  python benchmarks/mem_load.py --processes 2       # from_pretrained(path, mesh=...) over 2 processes
                                                    # (127.0.0.1, one CPU device each, fsdp=2): peak per process
  python benchmarks/mem_load.py --quantize nf4      # QLoRA: quantized tensor by tensor while reading; exits 1
                                                    # unless the peak stays within the quantized weights plus
                                                    # three copies of the largest tensor (read, converted, placed)
                                                    # and 64 MiB of runtime, compilation excluded (issue 19)
  python benchmarks/mem_load.py --quantize nf4 --processes 2
                                                    # from_pretrained(path, mesh=..., quantize=...): each process
                                                    # reads and quantizes its own shards; the same bound with the
                                                    # process's quantized shards in place of the whole model
  python benchmarks/mem_load.py --size "issue:layers=16"   # a size with fields replaced (benchmarks/_common.size)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def _status(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    return float("nan")


def write(folder: str, size: str) -> None:
    sys.path.insert(0, HERE)
    import jax.numpy as jnp

    import _common as C
    import _jpeft_worker as W
    import jpeft

    model, params = W.build_random(C.size(size), jnp.float32)
    jpeft.models.save_pretrained(folder, model, params)


def _largest_tensor_mib(folder: str) -> float:
    from safetensors import safe_open

    out = 0
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), framework="numpy") as f:
                for k in f.keys():
                    sl = f.get_slice(k)
                    n = 1
                    for d in sl.get_shape():
                        n *= d
                    out = max(out, n * 4)
    return out / 2**20


def load(folder: str, scan: bool, dtype: str, coordinator=None, processes: int = 1, index: int = 0,
         quantize=None) -> None:
    import jax
    import jax.numpy as jnp

    import jpeft

    kw = {"scan_layers": True} if scan else {}
    if quantize:
        kw["quantize"] = quantize
    if processes > 1:
        from jpeft import distributed

        distributed.initialize(coordinator, processes, index)
        kw["mesh"] = jpeft.make_mesh(data=1, fsdp=jax.device_count())
        jax.block_until_ready(jnp.zeros(()))  # the runtime's own memory belongs to the baseline
    if quantize:
        # one load first, so that compiling the quantizer for each kernel shape (a one-off cost
        # that does not grow with the model) is not counted; then the peak is reset
        warm = jpeft.models.from_pretrained(folder, dtype={"f32": jnp.float32, "bf16": jnp.bfloat16}[dtype], **kw)
        del warm
        from jpeft import _hostmem

        _hostmem.release()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    base = _status("VmRSS")
    _, params = jpeft.models.from_pretrained(folder, dtype={"f32": jnp.float32, "bf16": jnp.bfloat16}[dtype], **kw)
    jax.block_until_ready(params)
    local = sum(s.data.nbytes for x in jax.tree.leaves(params) for s in x.addressable_shards)
    print(json.dumps({"weights_mib": jpeft.tree.nbytes(params) / 2**20, "local_shards_mib": local / 2**20,
                      "after_load_mib": _status("VmRSS") - base, "peak_mib": _status("VmHWM") - base, "scan": scan,
                      "dtype": dtype, "process": index, "processes": processes, "quantize": quantize,
                      "largest_tensor_f32_mib": _largest_tensor_mib(folder)}))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="400m", help="a size from benchmarks/_common.py (default 400m)")
    p.add_argument("--scan", action="store_true", help="load as a layer-scanned model")
    p.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    p.add_argument("--dir", help="checkpoint folder (written if missing; default: a temporary folder)")
    p.add_argument("--quantize", default=None, choices=["nf4", "int8", "fp8"],
                   help="from_pretrained(quantize=...): check the peak against the quantized size plus one tensor")
    p.add_argument("--processes", type=int, default=1,
                   help="load sharded over this many processes on this machine (one CPU device each, fsdp mesh)")
    p.add_argument("--_coordinator", help=argparse.SUPPRESS)
    p.add_argument("--_index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--_write", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_load", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._write:
        return write(args.dir, args.size)
    if args._load:
        return load(args.dir, args.scan, args.dtype, args._coordinator, args.processes, args._index, args.quantize)
    folder = args.dir or os.path.join(tempfile.mkdtemp(prefix="jpeft_mem_load_"), args.size)
    if not os.path.exists(os.path.join(folder, "config.json")):
        subprocess.run([sys.executable, __file__, "--_write", "--dir", folder, "--size", args.size], check=True)
    cmd = [sys.executable, __file__, "--_load", "--dir", folder, "--dtype", args.dtype] + (["--scan"] if args.scan else [])
    cmd += ["--quantize", args.quantize] if args.quantize else []
    if args.processes > 1:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
        procs = [subprocess.Popen(cmd + ["--processes", str(args.processes), "--_coordinator", f"127.0.0.1:{port}",
                                         "--_index", str(i)], stdout=subprocess.PIPE, text=True, env=env)
                 for i in range(args.processes)]
        outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
        over = []
        for r in outs:
            print(f"from_pretrained ({args.size}, {args.dtype}, {'scanned' if args.scan else 'unrolled'}, mesh fsdp="
                  f"{args.processes}{', quantized ' + args.quantize if args.quantize else ''}) process {r['process']}: "
                  f"weights {r['weights_mib']:.0f} MiB, its shards {r['local_shards_mib']:.0f} MiB, resident after "
                  f"loading {r['after_load_mib']:.0f} MiB, peak {r['peak_mib']:.0f} MiB (above the post-initialisation "
                  "baseline)")
            if args.quantize:
                over += [r["process"]] if r["peak_mib"] > _bound(r, r["local_shards_mib"]) else []
        if over:
            raise SystemExit(f"from_pretrained(quantize={args.quantize!r}, mesh=...) peaked above the bound on process(es) {over}")
        return
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    r = json.loads(out)
    print(f"from_pretrained ({args.size}, {args.dtype}, {'scanned' if args.scan else 'unrolled'}): weights "
          f"{r['weights_mib']:.0f} MiB, resident after loading {r['after_load_mib']:.0f} MiB, peak {r['peak_mib']:.0f} MiB "
          "(above the post-import baseline)" + (f", quantized {args.quantize}" if args.quantize else ""))
    if args.quantize and r["peak_mib"] > _bound(r, r["weights_mib"]):
        raise SystemExit(f"from_pretrained(quantize={args.quantize!r}) peaked above the bound")


def _bound(r: dict, held_mib: float) -> float:
    """A quantized load's bound: the quantized weights this process holds, three copies of the
    largest tensor (read, converted, placed) and 64 MiB of runtime; printed."""
    bound = held_mib + 3 * r["largest_tensor_f32_mib"] + 64
    print(f"process {r['process']}: peak {r['peak_mib']:.0f} MiB against the bound {bound:.0f} MiB (quantized weights "
          f"held {held_mib:.0f} + 3 x the largest tensor {r['largest_tensor_f32_mib']:.0f} + 64)")
    return bound


if __name__ == "__main__":
    main()
