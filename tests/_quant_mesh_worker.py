"""Four emulated CPU devices: LoRA training on an NF4 base sharded over a 2 x 2 (data x fsdp)
mesh against one device (``run``), and ``from_pretrained(path, mesh=..., quantize=...)``, each
shard read and quantized where it is held, against ``jpeft.quantize`` of the whole model
(``loads``). Run by tests/test_quantize.py (XLA_FLAGS must be set before JAX is imported);
prints one JSON line that the test asserts on.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/_quant_mesh_worker.py [loads FOLDER]
"""

from __future__ import annotations

import json


def run(steps: int = 2) -> dict:
    import jax
    import numpy as np
    import optax

    import jpeft

    cfg = jpeft.models.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                                   num_kv_heads=2)
    model = jpeft.models.LlamaForCausalLM(cfg)
    ids = np.asarray(jax.random.randint(jax.random.key(0), (4, 13), 0, 64))
    q = jpeft.quantize(model.init(jax.random.key(0), ids[:, :-1]), "nf4")
    frozen = [np.array(x) for x in jax.tree.leaves(q)]
    adapter = jpeft.init(jpeft.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj"]), q, jax.random.key(1), model,
                         ids[:, :-1])

    def loss_fn(p, a, batch, key):
        logits = jpeft.apply(model, p, a, batch["ids"][:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["ids"][:, 1:]).mean()

    opt = optax.adam(5e-2)
    step = jpeft.make_train_step(loss_fn, opt, donate=False)
    a1, s1, ref = adapter, opt.init(adapter), []
    for i in range(steps):
        a1, s1, m = step(q, a1, s1, {"ids": ids}, jax.random.key(i))
        ref.append(float(m["loss"]))

    mesh = jpeft.make_mesh(data=2, fsdp=2)
    qs = jpeft.shard_params(q, mesh)
    sharded = sum(1 for x in jax.tree.leaves(qs) if any(e is not None for e in x.sharding.spec))
    a2 = jpeft.shard_adapter(adapter, mesh, qs)
    s2 = jpeft.init_opt_state(opt, a2)
    mstep = jpeft.make_sharded_train_step(loss_fn, opt, mesh)
    got = []
    for i in range(steps):
        a2, s2, m = mstep(qs, a2, s2, {"ids": ids}, jax.random.key(i))
        got.append(float(m["loss"]))
    diff = max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(jax.tree.leaves(a1), jax.tree.leaves(a2)))
    unchanged = all(np.array_equal(np.asarray(x), y) for x, y in zip(jax.tree.leaves(qs), frozen))
    return {"devices": jax.device_count(), "sharded_leaves": sharded, "loss_fell": got[-1] < got[0] - 1e-3,
            "base_unchanged": unchanged, "loss_diff": float(np.abs(np.array(got) - np.array(ref)).max()),
            "adapter_diff": diff, "losses": got}


def _folder(path: str, tied: bool) -> str:
    """A random two-layer Llama saved as a Hugging Face folder. Widths chosen so that NF4's
    blocks of 64 fall across output rows and shard boundaries: 28 x 28 (q/k/v/o_proj: 12.25 blocks,
    the last one padded), 28 x 40 (gate_proj, up_proj: 17.5), 40 x 28 (down_proj). Few shapes: each
    compiles its own quantizing programs.
    Tied: the file also stores ``lm_head.weight``, a copy of the embedding (the tied-head check)."""
    import jax
    import numpy as np
    from safetensors.numpy import load_file, save_file

    import jpeft

    cfg = jpeft.models.LlamaConfig(vocab_size=64, hidden_size=28, intermediate_size=40, num_layers=2, num_heads=2,
                                   num_kv_heads=2, tie_word_embeddings=tied)
    model = jpeft.models.LlamaForCausalLM(cfg)
    rng = np.random.default_rng(3)  # NumPy: no program compiled per shape
    params = jax.tree.map(lambda x: (0.3 * rng.standard_normal(x.shape)).astype(np.float32),
                          jax.eval_shape(model.init, jax.random.key(3), np.zeros((1, 4), np.int32)))
    jpeft.models.save_pretrained(path, model, params)
    if tied:
        f = f"{path}/model.safetensors"
        w = load_file(f)
        save_file({**w, "lm_head.weight": w["model.embed_tokens.weight"].copy()}, f, metadata={"format": "pt"})
    return path


def _compare(got, want, placed, case: dict) -> dict:
    """``case`` with what differs between the mesh load ``got`` and the whole-model ``want``
    (placed as ``placed``): ``bad`` (a leaf placed otherwise, or a shard whose bits differ), and
    how many leaves were quantized (``quantized``), cut across devices (``cut``), both (``cut_codes``)."""
    import jax
    import numpy as np

    case.update(bad=[], cut=0, cut_codes=0, quantized=0, same_tree=jax.tree.structure(got) == jax.tree.structure(want))
    for (kp, g), p, w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(placed), jax.tree.leaves(want)):
        name = jax.tree_util.keystr(kp)
        case["quantized"] += name.endswith((".codes", ".qvalue"))
        if not g.sharding.is_equivalent_to(p, g.ndim) or g.dtype != w.dtype or g.shape != w.shape:
            case["bad"].append(f"{name}: placed {g.sharding.spec} {g.dtype}{g.shape}, want {p.spec} {w.dtype}{w.shape}")
            continue
        whole = np.asarray(w)
        cut = any(s.data.shape != g.shape for s in g.addressable_shards)
        case["cut"] += cut
        case["cut_codes"] += cut and name.endswith((".codes", ".qvalue"))
        for s in g.addressable_shards:
            if not np.array_equal(np.atleast_1d(np.asarray(s.data)).view(np.uint8), np.atleast_1d(whole[s.index]).view(np.uint8)):
                case["bad"].append(f"{name}: shard {s.index} differs")
    return case


def _heads(root: str, mesh) -> list:
    """A GPT-2 (Conv1D kernels, stored ``[in, out]`` untransposed, c_attn's three projections in one)
    and a BERT sequence classifier read from a checkpoint of the encoder only (its pooler and
    classifier freshly initialised, then quantized), nf4 and int8 on the fsdp mesh, against
    ``jpeft.quantize`` of the one-device read. Widths: GPT-2's c_attn [28, 84] is 36.75 NF4 blocks
    (odd: the codes are cut within a block), its MLP [28, 56] 24.5; BERT's [28, 28] 12.25, its
    classifier [28, 3] 1.3."""
    import warnings

    import jax
    import numpy as np
    from safetensors.numpy import load_file, save_file

    import jpeft
    from jpeft.models import bert, gpt2

    rng = np.random.default_rng(5)
    ids = np.zeros((1, 4), np.int32)
    made = {"gpt2": gpt2.GPT2LMHeadModel(gpt2.GPT2Config(vocab_size=64, hidden_size=28, num_layers=1, num_heads=2,
                                                         intermediate_size=56, max_position_embeddings=16)),
            "bert": bert.BertForSequenceClassification(bert.BertConfig(
                vocab_size=64, hidden_size=28, num_layers=1, num_heads=2, intermediate_size=40,
                max_position_embeddings=16, num_labels=3))}
    cases = []
    for family, model in made.items():
        folder = f"{root}/{family}"
        params = jax.tree.map(lambda x: (0.3 * rng.standard_normal(x.shape)).astype(np.float32),
                              jax.eval_shape(model.init, jax.random.key(3), ids))
        jpeft.models.save_pretrained(folder, model, params)
        if family == "bert":  # the encoder alone: the head is initialised fresh from `key`
            f = f"{folder}/model.safetensors"
            save_file({k: v for k, v in load_file(f).items() if not k.startswith(("classifier.", "bert.pooler."))}, f,
                      metadata={"format": "pt"})
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")  # BERT: the head is "freshly initialised", each read says
            _, full = jpeft.models.from_pretrained(folder, key=jax.random.key(7))
            for scheme in ("nf4", "int8"):
                want = jpeft.quantize(full, scheme)
                placed = jpeft.param_shardings(want, mesh)
                _, got = jpeft.models.from_pretrained(folder, mesh=mesh, quantize=scheme, key=jax.random.key(7))
                cases.append(_compare(got, want, placed, {"family": family, "scheme": scheme}))
        for case in cases[-2:]:
            case["fresh"] = sorted({m for w in said for m in ("pooler", "classifier") if "freshly initialised" in
                                    str(w.message) and m in str(w.message)})
    return cases


def loads(root: str) -> dict:
    """Every quantized leaf of the mesh load is placed as ``jpeft.shard_params`` places the
    whole-model ``jpeft.quantize`` result, and each of its shards holds those bits."""
    import jax
    import numpy as np

    import jpeft
    from jpeft import quant

    out: dict = {"devices": jax.device_count(), "cases": []}
    # data=2 x fsdp=2: NF4 kernels of an even number of blocks are read in halves, of an odd one whole (the codes
    # cut within a block); tensor=2: the Megatron layout (down_proj's codes cut over fsdp, the others' over tensor)
    meshes = {"fsdp": (jpeft.make_mesh(data=2, fsdp=2), lambda scan: None),
              "tensor": (jpeft.make_mesh(data=1, fsdp=2, tensor=2), lambda scan: jpeft.tensor_parallel_rules(stacked=scan))}
    for tied, scan in ((False, False), (True, True)):
        folder = _folder(f"{root}/{'tied' if tied else 'untied'}", tied)
        kw = {"scan_layers": True} if scan else {}
        _, full = jpeft.models.from_pretrained(folder, **kw)
        for scheme in quant.SCHEMES:
            want = jpeft.quantize(full, scheme)
            for layout, (mesh, rules) in meshes.items():
                placed = jpeft.param_shardings(want, mesh, rules(scan), stacked=r".*layers/.*" if scan else None)
                _, got = jpeft.models.from_pretrained(folder, mesh=mesh, rules=rules(scan), quantize=scheme, **kw)
                out["cases"].append(_compare(got, want, placed, {"tied": tied, "scan": scan, "scheme": scheme,
                                                                 "layout": layout}))
    out["heads"] = _heads(root, meshes["fsdp"][0])
    # a NaN in one kernel: the mesh load refuses it by name as the whole-model read does (nothing returned)
    from safetensors.numpy import load_file, save_file

    bad = f"{root}/untied"
    w = load_file(f"{bad}/model.safetensors")
    w["model.layers.1.mlp.down_proj.weight"][3, 5] = np.nan
    save_file(w, f"{bad}/model.safetensors", metadata={"format": "pt"})
    out["nan"] = {}
    for scheme in ("nf4", "int8"):
        said = []
        for kw in ({}, {"mesh": meshes["fsdp"][0]}):
            try:
                jpeft.models.from_pretrained(bad, quantize=scheme, **kw)
                said.append(None)
            except jpeft.errors.QuantizationError as e:
                said.append(str(e))
        out["nan"][scheme] = said
    # values whose NF4 block scales' mean overflows float32 (the double quantization): refused alike
    w["model.layers.1.mlp.down_proj.weight"][3, 5] = 0.0
    w["model.layers.0.mlp.up_proj.weight"][:] = 3e38
    save_file(w, f"{bad}/model.safetensors", metadata={"format": "pt"})
    said = []
    for kw in ({}, {"mesh": meshes["fsdp"][0]}):
        try:
            jpeft.models.from_pretrained(bad, quantize="nf4", **kw)
            said.append(None)
        except jpeft.errors.QuantizationError as e:
            said.append(str(e))
    out["overflow"] = said
    return out


if __name__ == "__main__":
    import sys

    print("JSON:" + json.dumps(loads(sys.argv[2]) if sys.argv[1:2] == ["loads"] else run()))
