"""``jpeft.models.from_pretrained(path, mesh=...)`` on 4 emulated CPU devices (data=2 x fsdp=2),
against the ordinary load: run as a script by tests/test_parallel.py (XLA_FLAGS must be set
before JAX is imported). argv[1]: a tiny Hugging Face Llama folder saved in one file, argv[2]:
the same model saved as a sharded folder (model.safetensors.index.json). Prints one JSON line
with the measured numbers; the test asserts on them.
"""

from __future__ import annotations

import json
import sys


def main(single: str, sharded: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jpeft
    from jpeft.models import loading

    reads: list = []
    real = loading._read_slice

    def counting(fname, name, spans, index):
        block = real(fname, name, spans, index)
        reads.append((name, block.nbytes, int(np.prod(spans[name][1])) * np.dtype(spans[name][0]).itemsize))
        return block

    loading._read_slice = counting
    mesh = jpeft.make_mesh(data=2, fsdp=2)
    ids = jnp.asarray(np.arange(24, dtype=np.int32).reshape(2, 12) % 200)
    out: dict = {"devices": jax.device_count()}
    tp = jpeft.make_mesh(data=1, fsdp=2, tensor=2)
    for tag, path, kw in [("f32", single, {}), ("index", sharded, {}), ("bf16", single, {"dtype": jnp.bfloat16}),
                          ("scan", sharded, {"scan_layers": True}), ("tensor", single, {})]:
        reads.clear()
        m, rules = (tp, jpeft.tensor_parallel_rules()) if tag == "tensor" else (mesh, None)
        model, ref = jpeft.models.from_pretrained(path, **kw)
        _, got = jpeft.models.from_pretrained(path, mesh=m, rules=rules, **kw)
        want = jpeft.param_shardings(ref, m, rules, stacked=r".*layers/.*" if kw.get("scan_layers") else None)
        flat_got = jax.tree_util.tree_flatten_with_path(got)[0]
        flat_ref, flat_want = jax.tree.leaves(ref), jax.tree.leaves(want)
        bad_sharding, bad_values, sharded_leaves = [], [], 0
        for (kp, g), r, w in zip(flat_got, flat_ref, flat_want):
            name = jax.tree_util.keystr(kp)
            if not g.sharding.is_equivalent_to(w, g.ndim) or g.dtype != r.dtype:
                bad_sharding.append(name)
            if any(d != full for d, full in zip(g.addressable_shards[0].data.shape, g.shape)):
                sharded_leaves += 1
            r = np.asarray(r)
            for s in g.addressable_shards:  # each device holds exactly its block of the weight
                if not np.array_equal(np.asarray(s.data), r[s.index]):
                    bad_values.append(name)
        logits_ref = np.asarray(model.apply(ref, ids), np.float32)
        logits = np.asarray(jax.jit(model.apply)(got, ids), np.float32)
        out[tag] = {
            "leaves": len(flat_got), "sharded_leaves": sharded_leaves, "bad_sharding": bad_sharding,
            "bad_values": sorted(set(bad_values)), "logits_diff": float(np.max(np.abs(logits - logits_ref))),
            "reads": len(reads), "partial_reads": sum(1 for _, got_b, full in reads if got_b < full),
            "bytes_read": int(sum(b for _, b, _ in reads)),
            "bytes_in_files": int(sum({n: f for n, _, f in reads}.values())),
        }
    # tensor parallel: the Megatron layout, and LoRA factors that follow it
    p = got["params"]["model"]["layers_0"]
    adapter = jpeft.init(jpeft.LoraConfig(r=4, target_modules=["q_proj", "o_proj"]), ref, jax.random.key(0))
    specs = jpeft.adapter_specs(adapter, got)
    sp = lambda spec: list(spec)  # noqa: E731 - a PartitionSpec as a JSON list
    q, o = specs["model/layers_0/self_attn/q_proj"], specs["model/layers_0/self_attn/o_proj"]
    out["tensor_specs"] = {
        "q_proj": sp(p["self_attn"]["q_proj"]["kernel"].sharding.spec),
        "o_proj": sp(p["self_attn"]["o_proj"]["kernel"].sharding.spec),
        "embed": sp(got["params"]["model"]["embed_tokens"]["embedding"].sharding.spec),
        "q_lora": [sp(q.lora_A), sp(q.lora_B)],
        "o_lora": [sp(o.lora_A), sp(o.lora_B)],
    }
    return out


if __name__ == "__main__":
    print("JSON:" + json.dumps(main(sys.argv[1], sys.argv[2])))
