"""``jpeft info``: the parameter budget of a method on a model, computed without allocating."""

from __future__ import annotations

import json
import math
import os
import re

import jax.numpy as jnp
import numpy as np

from _jpeft_args import BASE_DTYPES, add_info as add_parser  # noqa: F401  (the options, defined there: no JAX for --help)
from jpeft import hf, io
from jpeft.cli import _configs
from jpeft.cli._ckpt import checkpoint_metadata, find_adapter
from jpeft.cli._common import format_table, human_bytes, human_count, method_from_args
from jpeft.config import strict_json
from jpeft.errors import ConfigError, JpeftError, LoadError
from jpeft.io import read_json
from jpeft.methods.base import registered_methods
from jpeft.models import loading
from jpeft import budget as _budget



MAX_LAYERS = 1024  # ``jpeft info`` traces every layer's shapes; far beyond any published model


def stored_dtype(cfg: dict) -> str:
    """The dtype a Hugging Face ``config.json`` says the weights are stored in (``dtype``, or
    ``torch_dtype`` before transformers 5), ``"bfloat16"`` when it names none."""
    d = cfg.get("dtype") or cfg.get("torch_dtype")
    return d if d in BASE_DTYPES else "bfloat16"


def _config_dict(spec: str) -> tuple[str, dict]:
    if os.path.isdir(spec):
        return spec, loading.read_config(spec)  # size-limited; missing/malformed/binary/list: named errors
    if spec.endswith(".json") and os.path.isfile(spec):
        return spec, read_json(spec, what="config.json")
    hit = _configs.lookup(spec)
    if hit is None:
        raise LoadError(f"{spec!r} is neither a model folder nor a published config; published configs: "
                        f"{', '.join(sorted(_configs.PUBLISHED))}.")
    return hit


def budget(config_dict: dict, method) -> dict:
    """Counts base and adapter parameters of ``method`` on the model described by a Hugging
    Face ``config.json`` dict, using shapes only (:func:`jpeft.budget.budget`, the
    function behind ``python -m jpeft.budget``)."""
    return _budget.budget(config_dict, method)


def run(args) -> int:
    if args.list:
        rows = []
        for name, c in sorted(_configs.PUBLISHED.items()):
            rows.append([name, c["model_type"], c.get("num_hidden_layers", c.get("n_layer")),
                         c.get("hidden_size", c.get("n_embd")), c["vocab_size"]])
        print(format_table(rows, ["name", "model_type", "layers", "hidden", "vocab"]))
        return 0
    if not args.model:
        raise ConfigError("give a model folder or a published config name (see `jpeft info --list`).")
    if os.path.isdir(args.model) and not os.path.isfile(os.path.join(args.model, "config.json")):
        # what the folder holds is read from its own metadata: a method or dtype asked for would be ignored
        given = [o for o, v in (("--method", args.method), ("-r/--rank", args.rank), ("--alpha", args.alpha),
                                ("--target", args.target), ("--set", args.method_set or None),
                                ("--base-dtype", args.base_dtype)) if v is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} describe a method to count on a model, but {args.model!r} has no "
                              "config.json: it is read as an adapter, PEFT, run or checkpoint folder, whose own config "
                              "`jpeft info` prints. Leave them out, or give a model folder or a published config name.")
        return describe_adapter(args.model, as_json=args.json)
    method_from_args(args)  # a bad method fails before anything is loaded
    name, cfg = _config_dict(args.model)
    method = method_from_args(args, model_type=cfg.get("model_type"))
    layers = cfg.get("num_hidden_layers", cfg.get("n_layer"))
    if isinstance(layers, int) and layers > MAX_LAYERS:
        raise ConfigError(f"{name}: {layers:,} layers is more than jpeft info's limit of {MAX_LAYERS:,} (the largest "
                          "published models have about 130); tracing them would take minutes. Check config.json.")
    try:
        s = budget(cfg, method)
    except (TypeError, ValueError, KeyError, OverflowError, ZeroDivisionError) as e:
        if isinstance(e, JpeftError):
            raise
        raise LoadError(f"{name}: config.json holds an invalid value ({type(e).__name__}: {str(e)[:200]}).") from None
    base_dtype = args.base_dtype or stored_dtype(cfg)
    base_bytes = jnp.dtype(base_dtype).itemsize
    adam_adapter = s["trainable"] * 4 * 3 + s["frozen"] * 4  # weights + two Adam moments (none for frozen arrays), float32
    full_train = s["base"] * (4 * 3 + 4)  # fp32 master weights + Adam moments + grads
    res = {
        "model": name,
        "method": method.to_dict(),
        "base_params": s["base"],
        "trainable_params": s["trainable"],
        "frozen_adapter_params": s["frozen"],
        "total_params": s["total"],
        "trainable_share": s["share"],
        "adapted_sites": s["sites"],
        "adapter_bytes_float32": (s["trainable"] + s["frozen"]) * 4,
        "base_bytes": s["base"] * base_bytes,
        "base_dtype": base_dtype,
        "train_state_bytes": adam_adapter,
        "full_finetune_train_state_bytes": full_train,
    }
    if args.json:
        print(strict_json(res))
        return 0
    print(f"model: {name} ({cfg.get('model_type', '?')}; shapes only, nothing allocated)")
    print(f"method: {method.peft_type} " + json.dumps({k: v for k, v in method.to_dict().items() if k != 'peft_type'}))
    print(f"trainable params: {s['trainable']:,} || all params: {s['total']:,} || trainable%: {100 * s['share']:.4f}"
          f" (base {s['base']:,}; {s['sites']} adapted site{'s' if s['sites'] != 1 else ''}" + (f"; {s['frozen']:,} frozen adapter params)"
                                                                   if s["frozen"] else ")"))
    rows = [
        ["frozen base weights", f"{human_count(s['base'])}", human_bytes(res["base_bytes"]) + f" ({base_dtype})"],
        ["adapter weights" + (" (trainable + frozen)" if s["frozen"] else ""),
         f"{human_count(s['trainable'] + s['frozen'])}", human_bytes(res["adapter_bytes_float32"]) + " (float32)"],
        ["adapter + Adam state", "", human_bytes(adam_adapter)],
    ] + ([["frozen adapter arrays (never trained)", f"{human_count(s['frozen'])}", human_bytes(s["frozen"] * 4) + " (float32)"]]
         if s["frozen"] else []) + [
        ["full fine-tuning: weights + grads + Adam", f"{human_count(s['base'])}", human_bytes(full_train)],
    ]
    print(format_table(rows, ["", "params", "memory"]))
    return 0


def adapter_summary(path: str) -> dict:
    """What an adapter, PEFT, run or checkpoint folder holds, read from its metadata and
    safetensors headers (no array is loaded)."""
    found = find_adapter(path)
    res: dict = {"path": path, "kind": found.kind, "adapter_path": found.path}
    if found.kind == "jpeft":
        info = io.read_adapter_info(found.path)
        frozen = _frozen_count(info.config.peft_type, {k: v[0] for k, v in info.arrays.items()},
                               getattr(info.config, "init_weights", None))
        res.update(method=info.config.to_dict(), trainable_params=info.num_params - frozen, frozen_params=frozen,
                   adapter_bytes=info.nbytes, arrays=len(info.arrays), base_params=(info.base or {}).get("num_params"),
                   jpeft_version=info.jpeft_version)
    elif found.kind == "peft":
        cfg = io.read_json(os.path.join(found.path, "adapter_config.json"), what="adapter_config.json")
        index, _ = io.safetensors_index(os.path.join(found.path, "adapter_model.safetensors"))
        # PEFT saves a targeted embedding's base weight beside its factors (``...base_layer.weight``):
        # a copy of the base, not an adapter parameter; a ``...base_layer.bias`` is the base bias that
        # ``bias="lora_only"``/``"all"`` trains, counted as PEFT counts it
        shapes = {k: e[1] for k, e in index.items() if not k.endswith(".base_layer.weight")}
        frozen = _frozen_count(cfg.get("peft_type"), shapes, cfg.get("init_lora_weights"))
        res.update(method=cfg, trainable_params=sum(math.prod(s) for s in shapes.values()) - frozen, frozen_params=frozen,
                   base_copy_params=sum(math.prod(e[1]) for k, e in index.items() if k not in shapes),
                   adapter_bytes=sum(e[3] for e in index.values()), arrays=len(index),
                   base_model_name_or_path=cfg.get("base_model_name_or_path"))
        try:  # the checks `load_peft` makes of the config before it reads a tensor (type, options)
            hf.peft_config(found.path)
        except JpeftError as e:
            res["jpeft_cannot_load"] = f"{type(e).__name__}: {e}"
    else:
        meta = checkpoint_metadata(found.path)
        adapter = {k: e for k, e in meta["arrays"].items() if k.startswith("adapter/")}
        frozen = _frozen_count((meta["config"] or {}).get("peft_type"), {k: e["shape"] for k, e in adapter.items()},
                               (meta["config"] or {}).get("init_lora_weights"))
        res.update(method=meta["config"], step=meta.get("step"), metrics=meta.get("metrics"),
                   data_position=meta.get("data_position"),
                   trainable_params=sum(math.prod(e["shape"]) for e in adapter.values()) - frozen, frozen_params=frozen,
                   adapter_bytes=sum(math.prod(e["shape"]) * np.dtype(e["dtype"]).itemsize for e in adapter.values()),
                   arrays=len(adapter), base_params=(meta.get("base") or {}).get("num_params"),
                   optimizer_state=any(k.startswith("opt_state/") for k in meta["arrays"]))
    return res


def _class_frozen(node_cls) -> tuple:
    """A node class's frozen field names; ``()`` where they depend on the node (a property:
    LoraWeights', whose MiCA B is frozen per site)."""
    frozen = getattr(node_cls, "frozen", ())
    return frozen if isinstance(frozen, tuple) else ()


def _frozen_count(peft_type, shapes: dict, init=None) -> int:
    """How many of the saved numbers are frozen adapter arrays (never trained: VeRA's shared
    projections, MiCA's lora_B), told by their field name, the last part of an array's name
    (``.../vera_A``, PEFT's ``base_model.vera_A``; PEFT's ``...lora_B.weight`` by its module name),
    among the ``frozen`` fields of the method's node classes; ``init`` is the LoRA config's
    ``init_lora_weights`` ("mica" freezes lora_B, PEFT's lora_embedding_B on embeddings)."""
    names = {f for m in registered_methods() if m.config.peft_type == peft_type for node in m.nodes
             for f in _class_frozen(node)}
    if peft_type == "LORA" and init == "mica":
        names |= {"lora_B", "lora_embedding_B"}

    def frozen(key):
        parts = re.split(r"[/.]", key)
        return parts[-1] in names or (parts[-1] == "weight" and len(parts) > 1 and parts[-2] in names)

    return sum(math.prod(shape) for k, shape in shapes.items() if frozen(k)) if names else 0


def describe_adapter(path: str, *, as_json: bool = False) -> int:
    res = adapter_summary(path)
    if as_json:
        print(strict_json(res))
        return 0
    what = {"jpeft": "jpeft adapter", "peft": "Hugging Face PEFT adapter", "checkpoint": "training checkpoint"}[res["kind"]]
    method = dict(res["method"])
    ptype = method.pop("peft_type", "?")
    print(f"{path}: {what}" + (f" at {res['adapter_path']}" if os.path.normpath(res["adapter_path"]) != os.path.normpath(path) else ""))
    print(f"method: {ptype} " + json.dumps(method))
    base = res.get("base_params")
    print(f"trainable params: {res['trainable_params']:,} in {res['arrays']} arrays ({human_bytes(res['adapter_bytes'])})"
          + (f"; {res['frozen_params']:,} frozen adapter params" if res.get("frozen_params") else "")
          + (f"; {res['base_copy_params']:,} params of base weights PEFT saved with it" if res.get("base_copy_params") else "")
          + (f"; base {base:,} params" if base else ""))
    if res["kind"] == "checkpoint":
        m = res.get("metrics") or {}
        print(f"step {res['step']}" + (" " + " ".join(f"{k} {v:.4g}" for k, v in m.items()) if m else "")
              + ("; with optimizer state" if res["optimizer_state"] else "")
              + ": `jpeft export|merge|eval --adapter` read it")
    if res.get("base_model_name_or_path"):
        print(f"base_model_name_or_path: {res['base_model_name_or_path']}")
    if res.get("jpeft_cannot_load"):
        print(f"jpeft cannot load this adapter: {res['jpeft_cannot_load']}")
    return 0
