"""Parameter budgets of every jpeft method on a published model config, computed with
``jax.eval_shape`` (no parameter is allocated, so a 7B model costs nothing).

Run ``python -m jpeft.methods.budget`` for the table in docs/METHODS.md (Llama-2-7B), or
``python -m jpeft.methods.budget --hf-config path/to/config.json`` for any model jpeft loads.
``--write docs/METHODS.md`` replaces the table between its ``<!-- budget:begin -->`` and
``<!-- budget:end -->`` markers.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Callable, Optional

import jax
import jax.numpy as jnp

#: The published Llama-2-7B config (meta-llama/Llama-2-7b-hf config.json), in jpeft's names.
LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                 num_kv_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)

def LlamaConfig_7b():
    """The Llama-2-7B config as a :class:`jpeft.models.LlamaConfig`."""
    from jpeft.models import LlamaConfig

    return LlamaConfig(**LLAMA2_7B)


BEGIN, END = "<!-- budget:begin -->", "<!-- budget:end -->"


def methods() -> list[tuple[str, str, Callable]]:
    """``(name, settings, make_config)`` for the usual settings of each method."""
    import jpeft
    from jpeft.methods.bottleneck import BottleneckConfig
    from jpeft.methods.ia3 import IA3Config
    from jpeft.methods.prefix import PrefixTuningConfig
    from jpeft.methods.prompt import PromptTuningConfig

    qv = ["q_proj", "v_proj"]
    every = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return [
        ("LoRA", "r=8, alpha=16, q_proj+v_proj", lambda: jpeft.LoraConfig(r=8, alpha=16, target_modules=qv)),
        ("LoRA", "r=8, alpha=16, all linear layers", lambda: jpeft.LoraConfig(r=8, alpha=16, target_modules=every)),
        ("rsLoRA", "r=8, alpha=16, q_proj+v_proj", lambda: jpeft.LoraConfig(r=8, alpha=16, target_modules=qv, use_rslora=True)),
        ("DoRA", "r=8, alpha=16, q_proj+v_proj", lambda: jpeft.LoraConfig(r=8, alpha=16, target_modules=qv, use_dora=True)),
        ("PiSSA", "r=8, alpha=8, q_proj+v_proj", lambda: jpeft.LoraConfig(r=8, alpha=8, target_modules=qv, init="pissa")),
        ("IA3", "k_proj, v_proj, down_proj (feed-forward)", lambda: IA3Config()),
        ("Houlsby", "reduction 16, after o_proj and down_proj", lambda: BottleneckConfig.houlsby(reduction_factor=16)),
        ("Pfeiffer", "reduction 16, after down_proj", lambda: BottleneckConfig.pfeiffer(reduction_factor=16)),
        ("Prefix tuning", "20 virtual tokens", lambda: PrefixTuningConfig(num_virtual_tokens=20)),
        ("Prefix tuning + MLP", "20 tokens, MLP width 512 (training; folds to the row above)",
         lambda: PrefixTuningConfig(num_virtual_tokens=20, prefix_projection=True, encoder_hidden_size=512)),
        ("Prompt tuning", "20 virtual tokens", lambda: PromptTuningConfig(num_virtual_tokens=20)),
    ]


def abstract_params(model_config):
    """The base's parameters as ``jax.ShapeDtypeStruct`` (nothing allocated)."""
    from jpeft.models import model_from_config

    model = model_from_config(model_config)
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    return jax.eval_shape(lambda i: model.init(jax.random.key(0), i), ids)


def budget_rows(model_config, progress: bool = True) -> list[dict]:
    """One row per method: ``{"method", "settings", "trainable", "base", "share"}``."""
    import jpeft

    params = abstract_params(model_config)
    rows = []
    items = methods()
    try:
        from tqdm import tqdm

        it = tqdm(items, desc="methods", disable=not progress, file=sys.stderr)
    except ImportError:  # pragma: no cover
        it = items
    for name, settings, make in it:
        cfg = make()
        adapter = jax.eval_shape(lambda p: jpeft.init(cfg, p, jax.random.key(0)), params)
        s = jpeft.summary(params, adapter, print_fn=None)
        rows.append(dict(method=name, settings=settings, trainable=s["trainable"], base=s["base"], share=s["share"]))
    return rows


def markdown(rows: list[dict], title: str) -> str:
    base = rows[0]["base"]
    lines = [
        f"Base: {title}, {base:,} parameters. Trainable share = trainable / (base + trainable), "
        "as Hugging Face PEFT's `print_trainable_parameters` reports it.",
        "",
        "| method | settings | trainable | share |",
        "|---|---|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['settings']} | {r['trainable']:,} | {100 * r['share']:.3f}% |")
    return "\n".join(lines)


def write_into(path: str, table: str) -> None:
    with open(path) as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path} has no {BEGIN} ... {END} markers to replace.")
    new = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda m: f"{BEGIN}\n{table}\n{END}", text, flags=re.S)
    with open(path, "w") as f:
        f.write(new)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m jpeft.methods.budget",
        description=(
            "Print the trainable-parameter budget of every jpeft method (LoRA, rsLoRA, DoRA, PiSSA, IA3, Houlsby and "
            "Pfeiffer bottleneck adapters, prefix and prompt tuning) on a model config, as a Markdown table. "
            "Shapes only: jax.eval_shape builds the base and each adapter without allocating, so a 7B model "
            "takes seconds and no memory."
        ),
        epilog="Example: python -m jpeft.methods.budget --write docs/METHODS.md",
    )
    p.add_argument("--hf-config", metavar="CONFIG_JSON",
                   help="a Hugging Face config.json (or its folder) of a model jpeft supports; default: Llama-2-7B")
    p.add_argument("--write", metavar="MARKDOWN_FILE",
                   help=f"replace the table between {BEGIN} and {END} in this file instead of printing it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    from jpeft.models import config_from_hf, read_config

    if a.hf_config:
        import os

        path = os.path.dirname(a.hf_config) if a.hf_config.endswith(".json") else a.hf_config
        d = read_config(path or ".")
        cfg, title = config_from_hf(d), f"{d.get('model_type', 'model')} from {a.hf_config}"
    else:
        cfg, title = LlamaConfig_7b(), "Llama-2-7B (meta-llama/Llama-2-7b-hf config)"
    table = markdown(budget_rows(cfg, progress=not a.quiet), title)
    if a.write:
        write_into(a.write, table)
        print(f"wrote the budget table into {a.write}")
    else:
        print(table)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
