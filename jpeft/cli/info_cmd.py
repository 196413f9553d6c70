"""``jpeft info``: the parameter budget of a method on a model, computed without allocating."""

from __future__ import annotations

import json
import os

from jpeft.cli._common import add_method_args, format_table, human_bytes, human_count
from jpeft.io import read_json

HELP = "parameter budget of a method on a model folder or a published config (nothing is allocated)"
EPILOG = """\
example:
  jpeft info llama-2-7b                          # LoRA r=8 on q_proj,v_proj (PEFT's default for llama)
  jpeft info gpt2                                # (PEFT's default for gpt2: c_attn)
  jpeft info mistral-7b --method lora -r 16 --target q_proj,k_proj,v_proj,o_proj
  jpeft info ./my-model --method ia3 --json
  jpeft info --list                              # the published configs that ship with jpeft

The model is built with jax.eval_shape: shapes only, so a 70B model costs no memory.
Memory estimates assume float32 adapter weights and Adam (two moments per trainable value);
the frozen base is counted in its stored dtype (--base-dtype).
"""


def add_parser(sub):
    p = sub.add_parser("info", help=HELP, description=HELP + ".", epilog=EPILOG)
    p.add_argument("model", nargs="?", help="a local Hugging Face folder (config.json) or a published name")
    p.add_argument("--list", action="store_true", help="list the published configs and exit")
    add_method_args(p)
    p.add_argument("--base-dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the frozen base weights for the memory estimate (default bfloat16)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


MAX_LAYERS = 1024  # ``jpeft info`` traces every layer's shapes; far beyond any published model


def _config_dict(spec: str) -> tuple[str, dict]:
    from jpeft.cli import _configs
    from jpeft.errors import LoadError

    if os.path.isdir(spec):
        path = os.path.join(spec, "config.json")
        if not os.path.isfile(path):
            raise LoadError(f"{spec!r} has no config.json; it is not a Hugging Face model folder.")
        return spec, read_json(path, what="config.json")  # size-limited; malformed/binary/list: named errors
    if spec.endswith(".json") and os.path.isfile(spec):
        return spec, read_json(spec, what="config.json")
    hit = _configs.lookup(spec)
    if hit is None:
        raise LoadError(f"{spec!r} is neither a model folder nor a published config; published configs: "
                        f"{', '.join(sorted(_configs.PUBLISHED))}.")
    return hit


def budget(config_dict: dict, method) -> dict:
    """Counts base and adapter parameters of ``method`` on the model described by a Hugging
    Face ``config.json`` dict, using shapes only (``jax.eval_shape``)."""
    import jax
    import jax.numpy as jnp

    import jpeft
    from jpeft.cli._model import model_from_config

    model = model_from_config(config_dict)
    ids = jax.ShapeDtypeStruct((1, 4), jnp.int32)
    key = jax.random.key(0)
    params = jax.eval_shape(lambda i: model.init(key, i), ids)
    adapter = jax.eval_shape(lambda p, i: jpeft.init(method, p, key, model, i), params, ids)
    s = jpeft.summary(params, adapter, print_fn=None)
    return s


def run(args) -> int:
    from jpeft.cli import _configs
    from jpeft.cli._common import method_from_args
    from jpeft.errors import ConfigError, JpeftError, LoadError

    if args.list:
        rows = []
        for name, c in sorted(_configs.PUBLISHED.items()):
            rows.append([name, c["model_type"], c.get("num_hidden_layers", c.get("n_layer")),
                         c.get("hidden_size", c.get("n_embd")), c["vocab_size"]])
        print(format_table(rows, ["name", "model_type", "layers", "hidden", "vocab"]))
        return 0
    if not args.model:
        raise ConfigError("give a model folder or a published config name (see `jpeft info --list`).")
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
    base_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}[args.base_dtype]
    adam_adapter = s["trainable"] * 4 * 3  # weights + two Adam moments, float32
    full_train = s["base"] * (4 * 3 + 4)  # fp32 master weights + Adam moments + grads
    res = {
        "model": name,
        "method": method.to_dict(),
        "base_params": s["base"],
        "trainable_params": s["trainable"],
        "total_params": s["total"],
        "trainable_share": s["share"],
        "adapted_sites": s["sites"],
        "adapter_bytes_float32": s["trainable"] * 4,
        "base_bytes": s["base"] * base_bytes,
        "train_state_bytes": adam_adapter,
        "full_finetune_train_state_bytes": full_train,
    }
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"model: {name} ({cfg.get('model_type', '?')}; shapes only, nothing allocated)")
    print(f"method: {method.peft_type} " + json.dumps({k: v for k, v in method.to_dict().items() if k != 'peft_type'}))
    print(f"trainable params: {s['trainable']:,} || all params: {s['total']:,} || trainable%: {100 * s['share']:.4f}"
          f" (base {s['base']:,}; {s['sites']} adapted sites)")
    rows = [
        ["frozen base weights", f"{human_count(s['base'])}", human_bytes(res["base_bytes"]) + f" ({args.base_dtype})"],
        ["adapter weights", f"{human_count(s['trainable'])}", human_bytes(res["adapter_bytes_float32"]) + " (float32)"],
        ["adapter + Adam state", "", human_bytes(adam_adapter)],
        ["full fine-tuning: weights + grads + Adam", f"{human_count(s['base'])}", human_bytes(full_train)],
    ]
    print(format_table(rows, ["", "params", "memory"]))
    return 0
