"""Parameter budgets of every jpeft method on a published model config, computed with
``jax.eval_shape`` (no parameter is allocated, so a 7B model costs nothing).

Run ``python -m jpeft.budget`` for the table in docs/METHODS.md (Llama-2-7B), or
``python -m jpeft.budget --hf-config path/to/config.json`` for any model jpeft loads.
``--write docs/METHODS.md`` replaces the table between its ``<!-- budget:begin -->`` and
``<!-- budget:end -->`` markers.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from jpeft import _inject
from jpeft.core import init, init_from_trace, summary
from jpeft.errors import ConfigError, JpeftError, UnsupportedModelError
from jpeft.methods.base import registered_methods
from jpeft.models import config_from_hf, model_from_config, read_config
from jpeft.models.loading import example_shape
from jpeft.models.published import PUBLISHED


def LlamaConfig_7b():
    """The Llama-2-7B config (meta-llama/Llama-2-7b-hf, :mod:`jpeft.models.published`) as a
    :class:`jpeft.models.LlamaConfig`."""
    return config_from_hf(PUBLISHED["llama-2-7b"])


BEGIN, END = "<!-- budget:begin -->", "<!-- budget:end -->"

#: Module names per model family: LoRA on Hugging Face PEFT's default targets and on every
#: linear layer, IA3's targets and feed-forward subset (PEFT's defaults), and the modules whose
#: outputs the Houlsby and Pfeiffer bottleneck adapters follow.
FAMILY_TARGETS = {
    "llama": dict(lora=["q_proj", "v_proj"],
                  linear=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                  ia3=(["k_proj", "v_proj", "down_proj"], ["down_proj"]),
                  houlsby=["o_proj", "down_proj"], pfeiffer=["down_proj"],
                  ln=["input_layernorm", "post_attention_layernorm", "norm"]),
    "gpt2": dict(lora=["c_attn"], linear=["c_attn", "c_proj", "c_fc"],
                 ia3=(["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
                 houlsby=["attn/c_proj", "mlp/c_proj"], pfeiffer=["mlp/c_proj"], ln=["ln_1", "ln_2", "ln_f"]),
    "bert": dict(lora=["query", "value"], linear=["query", "key", "value", "dense"],
                 ia3=(["key", "value", "output.dense"], ["output.dense"]),
                 houlsby=["output/dense"], pfeiffer=r".*/layer_\d+/output/dense", ln=["LayerNorm"]),
}
# PEFT's IA3 and LN tuning defaults for Qwen2 and Qwen3 are not Llama's: q_proj (not k_proj) and only
# post_attention_layernorm, not Qwen3's q_norm/k_norm (TRANSFORMERS_MODELS_TO_{IA3,LNTUNING}_TARGET_MODULES_MAPPING)
FAMILY_TARGETS.update(mistral=FAMILY_TARGETS["llama"],
                      qwen2=dict(FAMILY_TARGETS["llama"], ia3=(["q_proj", "v_proj", "down_proj"], ["down_proj"]),
                                 ln=["post_attention_layernorm"]))
FAMILY_TARGETS.update(qwen3=FAMILY_TARGETS["qwen2"])

#: Hugging Face PEFT's default ``target_modules`` (and IA3's ``feedforward_modules``) per
#: method and model type, used by ``jpeft info`` and ``jpeft train`` when none are given
#: (PEFT's TRANSFORMERS_MODELS_TO_{LORA,IA3}_TARGET_MODULES_MAPPING). A model type a method's
#: table leaves out takes the config's own default (Llama's names); ``None``: there is no default,
#: the modules must be given.
DEFAULT_TARGETS = {
    "LORA": {m: {"target_modules": t["lora"]} for m, t in FAMILY_TARGETS.items()},
    "IA3": {m: {"target_modules": t["ia3"][0], "feedforward_modules": t["ia3"][1]} for m, t in FAMILY_TARGETS.items()},
    "OFT": {m: {"target_modules": t["lora"]} for m, t in FAMILY_TARGETS.items()},
    # PEFT has no BERT default: None makes the CLI ask for the modules (an error naming --target)
    "LN_TUNING": {m: {"target_modules": t["ln"]} if m != "bert" else None for m, t in FAMILY_TARGETS.items()},
    # PEFT's VeRA and AdaLoRA defaults are LoRA's (TRANSFORMERS_MODELS_TO_{VERA,ADALORA}_TARGET_MODULES_MAPPING)
    "VERA": {m: {"target_modules": t["lora"]} for m, t in FAMILY_TARGETS.items()},
    "ADALORA": {m: {"target_modules": t["lora"]} for m, t in FAMILY_TARGETS.items()},
}
DEFAULT_TARGETS.update(LOHA=DEFAULT_TARGETS["LORA"], LOKR=DEFAULT_TARGETS["LORA"])  # PEFT copies LoRA's mapping
# PEFT has no bottleneck adapters: the default is the family's Pfeiffer placement. Llama's names are the
# config's own default (mlp/down_proj, the same module), so a saved Llama run resolves as before.
DEFAULT_TARGETS["BOTTLENECK"] = {m: {"target_modules": t["pfeiffer"]} for m, t in FAMILY_TARGETS.items()
                                 if t["pfeiffer"] is not FAMILY_TARGETS["llama"]["pfeiffer"]}


def methods(model_type: str = "llama") -> list[tuple[str, str, Callable]]:
    """``(name, settings, make_config)`` for the usual settings of each registered method on a
    ``model_type``, in registration order (LoRA first, on Hugging Face PEFT's default
    targets): each method's ``Method.budget`` rows (:class:`jpeft.methods.base.Method`).
    Prefix and prompt tuning need a decoder, so BERT has no rows for them."""
    t = FAMILY_TARGETS.get(model_type)
    if t is None:
        raise UnsupportedModelError(f"no budget targets for model_type {model_type!r}; known: {sorted(FAMILY_TARGETS)}.")
    return [row for m in registered_methods() if m.budget is not None for row in m.budget(model_type, t)]


def abstract_model(model_config):
    """``(model, params, ids)``: the jpeft model of a config (a jpeft model config, or a
    Hugging Face ``config.json`` dict), its parameters as ``jax.ShapeDtypeStruct`` (nothing
    allocated) and the example input they were traced with."""
    model, ids = _model_and_ids(model_config)
    return model, jax.eval_shape(lambda i: model.init(jax.random.key(0), i), ids), ids


def _model_and_ids(model_config):
    if isinstance(model_config, dict):
        model_config = config_from_hf(model_config)
    model = model_from_config(model_config)
    return model, jax.ShapeDtypeStruct(example_shape(model, 8), jnp.int32)


def abstract_params(model_config):
    """The base's parameters as ``jax.ShapeDtypeStruct`` (nothing allocated)."""
    return abstract_model(model_config)[1]


def budget(model_config, method, *, abstract=None, trace: bool = True) -> dict:
    """:func:`jpeft.summary` of ``method`` on the model of ``model_config`` (a jpeft model config
    or a Hugging Face ``config.json`` dict), from shapes alone. ``jpeft info`` and this module's
    table both count with it. ``abstract`` reuses an :func:`abstract_model` result;
    ``trace=False`` skips tracing the model in :func:`jpeft.init`: the counts are the same and
    the 11-row Llama-2-7B table is several times faster (``jpeft info`` traces, which checks
    that the targets a user typed are modules the model calls)."""
    if trace and abstract is None:  # the model traced while its params are made: one forward trace, not two
        model, ids = _model_and_ids(model_config)
        params, infos = _inject.init_and_trace(model, jax.random.key(0), ids)
        adapter = jax.eval_shape(lambda p: init_from_trace(method, p, jax.random.key(0), infos), params)
        return summary(params, adapter, print_fn=None)
    model, params, ids = abstract if abstract is not None else abstract_model(model_config)
    if trace:
        adapter = jax.eval_shape(lambda p, i: init(method, p, jax.random.key(0), model, i), params, ids)
    else:
        adapter = jax.eval_shape(lambda p: init(method, p, jax.random.key(0)), params)
    return summary(params, adapter, print_fn=None)


def budget_rows(model_config, progress: bool = True) -> list[dict]:
    """One row per method: ``{"method", "settings", "trainable", "base", "share"}``. A method whose
    default settings do not fit this model (OFT's block size 32 on a model 16 wide) gets
    ``trainable = share = None`` and ``"unfit"``: the reason, as the method's config error says it."""
    abstract = abstract_model(model_config)
    model_type = abstract[0].config.model_type
    rows = []
    items = methods(model_type)
    try:
        from tqdm import tqdm

        it = tqdm(items, desc="methods", disable=not progress, file=sys.stderr)
    except ImportError:  # pragma: no cover
        it = items
    for name, settings, make in it:
        try:
            s = budget(None, make(), abstract=abstract, trace=False)
        except ConfigError as e:
            rows.append(dict(method=name, settings=settings, trainable=None, base=None, share=None, unfit=str(e)))
            continue
        rows.append(dict(method=name, settings=settings, trainable=s["trainable"], base=s["base"], share=s["share"]))
    return rows


def hf_config(path: str):
    """The jpeft model config of a Hugging Face ``config.json`` (or the folder holding it)."""
    folder = os.path.dirname(path) if path.endswith(".json") else path
    return config_from_hf(read_config(folder or "."))


def markdown(rows: list[dict], title: str) -> str:
    base = next(r["base"] for r in rows if r["base"] is not None)
    lines = [
        f"Base: {title}, {base:,} parameters. Trainable share = trainable / (base + trainable), "
        "as Hugging Face PEFT's `print_trainable_parameters` reports it.",
        "",
        "| method | settings | trainable | share |",
        "|---|---|---:|---:|",
    ]
    for r in rows:
        if r["trainable"] is None:
            lines.append(f"| {r['method']} | {r['settings']}: does not fit this model ({r['unfit'].split(';')[0]}) | n/a | n/a |")
        else:
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
        prog="python -m jpeft.budget",
        description=(
            "Print the trainable-parameter budget of every registered jpeft method (LoRA, rsLoRA, DoRA, PiSSA, IA3, "
            "LoHa, LoKr, Houlsby and Pfeiffer bottleneck adapters, prefix and prompt tuning, OFT, LN tuning, VeRA, "
            "AdaLoRA) on a model config, as a Markdown table. "
            "Shapes only: jax.eval_shape builds the base and each adapter without allocating, so a 7B model "
            "takes seconds and no memory."
        ),
        epilog="Example: python -m jpeft.budget --write docs/METHODS.md",
    )
    p.add_argument("--hf-config", metavar="CONFIG_JSON",
                   help="a Hugging Face config.json (or its folder) of a model jpeft supports; default: Llama-2-7B")
    p.add_argument("--write", metavar="MARKDOWN_FILE",
                   help=f"replace the table between {BEGIN} and {END} in this file instead of printing it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    try:
        if a.hf_config:
            cfg = hf_config(a.hf_config)
            title = f"{cfg.model_type} from {a.hf_config}"
        else:
            cfg, title = LlamaConfig_7b(), "Llama-2-7B (meta-llama/Llama-2-7b-hf config)"
        table = markdown(budget_rows(cfg, progress=not a.quiet), title)
    except JpeftError as e:  # a missing or unsupported config.json: one line, as `jpeft info` says it
        print(f"{p.prog}: error: {type(e).__name__}: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if a.write:
        write_into(a.write, table)
        print(f"wrote the budget table into {a.write}")
    else:
        print(table)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
