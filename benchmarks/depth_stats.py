"""Load-independent statistics of jpeft's compiled LoRA training step as the model gets deeper
or the sequence longer: XLA's FLOP count, bytes accessed and temporary memory (from
``compiled.cost_analysis()`` and ``compiled.memory_analysis()``), per point and per added
layer, against the analytic matmul FLOPs of benchmarks/_common.py. No timing: the numbers
do not depend on what else the machine is doing.

Loops (``lax.scan`` over layers or attention blocks) are counted once by XLA's cost analysis,
so FLOPs and bytes are only comparable between unrolled programs; temporary memory is exact.

``--ops`` adds, per point, the top-level ops of the compiled step that belong to decoder
layer 1 (by their ``op_name`` metadata), grouped by pass (forward / backward), part of the
layer and kind (matmul or not): op count, MB written and MB read (operand sizes), the
per-layer op statistics of issue 24's depth item.

``--axis attention`` compiles the gradient of the attention kernel alone (one layer's shape of
the chosen size, batch 1) with its tile loop unrolled, and gives XLA's FLOPs with the causal
tile skipping, with every tile visited, and for the dense reference.

Examples::

    python benchmarks/depth_stats.py --axis depth --values 2,4,8 --attention blockwise
    python benchmarks/depth_stats.py --axis seq --values 256,1024,4096 --tokens 4096 --attention reference
    python benchmarks/depth_stats.py --axis attention --values 1024,2048,4096 --block 512
    python benchmarks/depth_stats.py --axis depth --values 3 --attention auto --ops
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import jpeft  # noqa: E402
import jpeft.models  # noqa: E402
from jpeft.data import causal_lm_loss  # noqa: E402
from jpeft.models import _attention as A, _layers as L  # noqa: E402


_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1}


def _nbytes(shape: str) -> int:
    total = 0
    for dt, dims in re.findall(r"\b(f32|bf16|f16|s32|u32|pred|s8|u8)\[([\d,]*)\]", shape):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _BYTES[dt]
    return total


def layer_ops(hlo_text: str, layer: int = 1) -> list:
    """The top-level ops of the compiled module's entry computation that belong to decoder
    layer ``layer``: pass, part of the layer, kind, bytes written and read."""
    entry = hlo_text[hlo_text.index("\nENTRY"):]
    entry = entry[:entry.index("\n}")]
    sizes, rows = {}, []
    tag = f"layers_{layer}/"
    for line in entry.splitlines()[1:]:
        m = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\([^=]*?\)|\S+)\s+([\w\-]+)\((.*)", line)
        if not m:
            continue
        name, shape, op, rest = m.groups()
        sizes[name] = _nbytes(shape)
        on = re.search(r'op_name="([^"]+)"', line)
        if tag not in line or not on or op in ("parameter", "get-tuple-element", "bitcast", "constant"):
            continue
        on = on.group(1)
        part = re.search(re.escape(tag) + r"(\w+)(?:/(\w+))?", on)
        part = part.group(1) if part else "other"
        if part == "self_attn" and re.search(r"vmap|while|BNTS|bkgq", on) and "_proj" not in on:
            part = "self_attn (scores)"
        read = sum(sizes.get(a.strip().lstrip("%"), 0) for a in rest.split(")")[0].split(","))
        backward = "transpose(jvp" in on or "rematted_computation" in on  # a remat recomputes for the backward
        rows.append({"pass": "backward" if backward else "forward", "part": part,
                     "kind": "matmul" if name.startswith(("ynn", "dot")) else "other",
                     "written": sizes[name], "read": read})
    return rows


def ops_table(rows: list) -> str:
    groups = collections.defaultdict(lambda: [0, 0, 0])
    for r in rows:
        g = groups[(r["pass"], r["part"], r["kind"])]
        g[0] += 1
        g[1] += r["written"]
        g[2] += r["read"]
    out = ["| pass | part | kind | ops | MB written | MB read |", "|---|---|---|---:|---:|---:|"]
    for (ps, part, kind), (n, w, rd) in sorted(groups.items(), key=lambda kv: -(kv[1][1] + kv[1][2])):
        out.append(f"| {ps} | {part} | {kind} | {n} | {w / 1e6:.1f} | {rd / 1e6:.1f} |")
    n, w, rd = (sum(g[i] for g in groups.values()) for i in range(3))
    out.append(f"| all | | | {n} | {w / 1e6:.1f} | {rd / 1e6:.1f} |")
    return "\n".join(out)


def compile_step(size: C.Size, attention: str, r: int, scan: bool, remat: bool):
    """The compiled LoRA training step (adam, LoRA on every linear layer) of a Llama of ``size``."""
    cfg = jpeft.models.LlamaConfig(
        vocab_size=size.vocab, hidden_size=size.hidden, intermediate_size=size.intermediate, num_layers=size.layers,
        num_heads=size.heads, num_kv_heads=size.kv_heads or size.heads, max_position_embeddings=max(2048, size.seq),
        attention=attention, scan_layers=scan, remat=remat)
    model = jpeft.models.LlamaForCausalLM(cfg)
    ids = jax.ShapeDtypeStruct((size.batch, size.seq), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), ids)
    lora = jpeft.LoraConfig(r=r, alpha=2 * r, target_modules=list(C.LORA_TARGETS))
    adapter = jax.eval_shape(lambda p: jpeft.init(lora, p, jax.random.key(1), model, jnp.zeros((1, 8), jnp.int32)),
                             params)
    opt = optax.adam(1e-3)
    opt_state = jax.eval_shape(opt.init, adapter)

    def loss_fn(params, adapter, batch, key):
        ids = batch
        return causal_lm_loss(jpeft.apply(model, params, adapter, ids), ids, jnp.ones_like(ids))[0]

    step = jpeft.make_train_step(loss_fn, opt)
    compiled = step.lower(params, adapter, opt_state, ids, jax.random.key(0)).compile()
    return compiled


def stats(size: C.Size, attention: str, r: int, scan: bool, remat: bool, ops: bool = False) -> dict:
    compiled = compile_step(size, attention, r, scan, remat)
    if ops:
        print(f"\n{size.layers} layers, seq {size.seq}: ops of layer 1\n" + ops_table(layer_ops(compiled.as_text())))
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    ma = compiled.memory_analysis()
    return {"layers": size.layers, "seq": size.seq, "batch": size.batch,
            "xla_gflop": float(ca.get("flops", float("nan"))) / 1e9,
            "xla_gb_accessed": float(ca.get("bytes accessed", float("nan"))) / 1e9,
            "analytic_gflop": C.lora_step_flops(size, r)["step"] / 1e9,
            "temp_mib": ma.temp_size_in_bytes / 2**20, "argument_mib": ma.argument_size_in_bytes / 2**20}


def attention_stats(size: C.Size, block: int, window) -> dict:
    h, kvh = size.heads, size.kv_heads or size.heads
    d = size.hidden // h
    q = jax.ShapeDtypeStruct((1, size.seq, h, d), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, size.seq, kvh, d), jnp.float32)

    def gflop(kind):
        def f(q, k, v):
            mask, _ = L.causal_mask(jnp.ones((1, size.seq), bool), None, window)
            if kind == "reference":
                out = jax.nn.dot_product_attention(q, k, v, mask=mask.dense(), scale=d ** -0.5)
            else:
                mask = mask if kind == "skip" else dataclasses.replace(mask, diagonal=None)
                out = A.blockwise_attention(q, k, v, mask, scale=d ** -0.5, block_size=block, unroll=True)
            return jnp.sum(jnp.sin(out))

        compiled = jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(q, kv, kv).compile()
        ca = compiled.cost_analysis()
        return float((ca[0] if isinstance(ca, (list, tuple)) else ca)["flops"]) / 1e9

    n = -(-size.seq // block)
    tiles = len(A.block_pairs(size.seq, min(block, size.seq), n, min(block, size.seq), 0, window))
    return {"seq": size.seq, "block": block, "window": window, "tiles": tiles, "all_tiles": n * n,
            "skip_gflop": gflop("skip"), "every_tile_gflop": gflop("every"), "reference_gflop": gflop("reference")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="issue", choices=sorted(C.SIZES))
    p.add_argument("--axis", default="depth", choices=["depth", "seq", "attention"])
    p.add_argument("--block", type=int, default=512, help="attention block size of --axis attention")
    p.add_argument("--window", type=int, default=None, help="sliding window of --axis attention")
    p.add_argument("--values", default="2,4,8")
    p.add_argument("--tokens", type=int, default=2048, help="tokens per batch of the seq axis (default 2048)")
    p.add_argument("--attention", default="blockwise")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--scan", action="store_true")
    p.add_argument("--remat", action="store_true")
    p.add_argument("--ops", action="store_true", help="print the op table of layer 1 (unscanned models)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    base = C.SIZES[args.base]
    rows = []
    if args.axis == "attention":
        print("| seq | tiles computed | XLA GFLOP, skipping | every tile | reference | skipping / every tile |")
        print("|---:|---:|---:|---:|---:|---:|")
        for v in (int(x) for x in args.values.split(",")):
            r = attention_stats(dataclasses.replace(base, seq=v), args.block, args.window)
            rows.append(r)
            print(f"| {v} | {r['tiles']} of {r['all_tiles']} | {r['skip_gflop']:.2f} | {r['every_tile_gflop']:.2f} | "
                  f"{r['reference_gflop']:.2f} | {r['skip_gflop'] / r['every_tile_gflop']:.3f} |", flush=True)
        return rows
    for v in (int(x) for x in args.values.split(",")):
        size = (dataclasses.replace(base, layers=v) if args.axis == "depth"
                else dataclasses.replace(base, seq=v, batch=max(1, args.tokens // v)))
        rows.append(stats(size, args.attention, args.r, args.scan, args.remat, args.ops))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n| {args.axis} | XLA GFLOP | analytic GFLOP | XLA GB accessed | temp MiB |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layers'] if args.axis == 'depth' else r['seq']} | {r['xla_gflop']:.2f} | "
              f"{r['analytic_gflop']:.2f} | {r['xla_gb_accessed']:.2f} | {r['temp_mib']:.1f} |")
    if args.axis == "depth" and len(rows) > 1:
        a, b = rows[0], rows[-1]
        n = b["layers"] - a["layers"]
        print(f"\nper added layer: XLA {(b['xla_gflop'] - a['xla_gflop']) / n:.3f} GFLOP "
              f"(analytic {(b['analytic_gflop'] - a['analytic_gflop']) / n:.3f}), "
              f"{(b['xla_gb_accessed'] - a['xla_gb_accessed']) / n:.3f} GB accessed, "
              f"{(b['temp_mib'] - a['temp_mib']) / n:.1f} MiB temporary")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
