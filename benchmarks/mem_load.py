"""Peak memory of loading a Hugging Face checkpoint with ``jpeft.models.from_pretrained``.

Writes a random Llama of ``--size`` (default the 393M "400m" size) as a Hugging Face folder
once (in its own process), then loads it in a fresh process and reports the resident memory
above that process's post-import baseline: right after loading, and the peak while loading.

Examples:
  python benchmarks/mem_load.py                     # f32, unrolled layers
  python benchmarks/mem_load.py --scan              # LlamaConfig(scan_layers=True)
  python benchmarks/mem_load.py --scan --dtype bf16
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

    model, params = W.build_random(C.SIZES[size], jnp.float32)
    jpeft.models.save_pretrained(folder, model, params)


def load(folder: str, scan: bool, dtype: str) -> None:
    import jax
    import jax.numpy as jnp

    import jpeft

    base = _status("VmRSS")
    kw = {"scan_layers": True} if scan else {}
    _, params = jpeft.models.from_pretrained(folder, dtype={"f32": jnp.float32, "bf16": jnp.bfloat16}[dtype], **kw)
    jax.block_until_ready(params)
    print(json.dumps({"weights_mib": jpeft.tree.nbytes(params) / 2**20, "after_load_mib": _status("VmRSS") - base,
                      "peak_mib": _status("VmHWM") - base, "scan": scan, "dtype": dtype}))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="400m", help="a size from benchmarks/_common.py (default 400m)")
    p.add_argument("--scan", action="store_true", help="load as a layer-scanned model")
    p.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    p.add_argument("--dir", help="checkpoint folder (written if missing; default: a temporary folder)")
    p.add_argument("--_write", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_load", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._write:
        return write(args.dir, args.size)
    if args._load:
        return load(args.dir, args.scan, args.dtype)
    folder = args.dir or os.path.join(tempfile.mkdtemp(prefix="jpeft_mem_load_"), args.size)
    if not os.path.exists(os.path.join(folder, "config.json")):
        subprocess.run([sys.executable, __file__, "--_write", "--dir", folder, "--size", args.size], check=True)
    cmd = [sys.executable, __file__, "--_load", "--dir", folder, "--dtype", args.dtype] + (["--scan"] if args.scan else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    r = json.loads(out)
    print(f"from_pretrained ({args.size}, {args.dtype}, {'scanned' if args.scan else 'unrolled'}): weights "
          f"{r['weights_mib']:.0f} MiB, resident after loading {r['after_load_mib']:.0f} MiB, peak {r['peak_mib']:.0f} MiB "
          "(above the post-import baseline)")


if __name__ == "__main__":
    main()
