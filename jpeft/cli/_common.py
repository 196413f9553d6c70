"""Helpers shared by the subcommands: method configs from arguments, model folders, output."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from typing import Any, Mapping, Optional

import jax

from _jpeft_args import DEFAULT_METHOD
from jpeft.config import did_you_mean, is_kind, kinds_text, scalar_kinds
from jpeft.errors import ConfigError, UnsupportedModelError
from jpeft.methods.base import registered_methods
from jpeft.budget import DEFAULT_TARGETS  # PEFT's default targets per model type (one table)
from jpeft.models import loading
from jpeft.models._layers import CausalLM


def say(msg: str) -> None:
    """A status line on stderr, from the main process only."""
    if jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)


def _parse_value(v: str):
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def field_type(cls, name: str) -> Optional[str]:
    """The declared type of the config field ``name`` (or its Hugging Face name, ``lora_alpha``)
    of the config dataclass ``cls`` as the source writes it (``"str"``, ``"Optional[int]"``,
    ``"float"``, ...), or ``None`` when ``cls`` has no such field."""
    name = cls.field_of(name)
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return None


def typed_value(key: str, text: str, value, declared: Optional[str]):
    """A ``--set KEY=VALUE`` value as its field declares it: ``value`` is what the untyped parse
    (JSON, else TOML, else the text) gave for ``text``. A string field takes the text itself when
    that parse read a number or a boolean (``inf``, ``nan``, ``0x10``, ``1e3``, ``true`` are file
    names, field names, ... there), or the quoted string's content; ``null`` is ``None`` where the
    field is optional. A number or boolean field takes only what that type holds. A field of
    several of these types (``str | bool``: LoRA's ``init_lora_weights``, which takes PEFT's
    ``true``/``false``) takes a value of any of them, else the text when one of them is ``str``.

    Raises:
      ConfigError: the value cannot be of the field's type (naming the key, the type and the value).
    """
    decl = None if declared is None else scalar_kinds(declared)
    if decl is None or (decl[1] and value is None):
        return value
    kinds, optional = decl
    want = kinds_text(kinds) + (" (or null)" if optional else "")
    if any(is_kind(value, k) for k in kinds):
        return value
    if "str" in kinds and (isinstance(value, (bool, int, float)) or value is None):
        return text
    raise ConfigError(f"--set {key}: expected {want}, found {type(value).__name__} {text!r}.")


def parse_targets(s: Optional[str]):
    if s is None:
        return None
    if "," in s or s.replace("_", "").replace(".", "").isalnum():
        return [t.strip() for t in s.split(",") if t.strip()]
    return s


def method_names() -> dict[str, type]:
    """Lower-case method name (the ``peft_type``; ``full`` for full fine-tuning) -> config
    class, for every registered method (:func:`jpeft.methods.base.registered_methods`)."""
    out = {m.peft_type.lower(): m.config for m in registered_methods()}
    if "full_finetune" in out:
        out.setdefault("full", out["full_finetune"])
    return out


def _with_default_targets(cls, d: dict, model_type: Optional[str]) -> dict:
    """``d`` with Hugging Face PEFT's default for ``model_type`` of each target field it does not
    give (``target_modules``; IA3's ``feedforward_modules`` too), each filled on its own as PEFT's
    ``_prepare_adapter_config`` fills a ``None``: IA3's ``feedforward_modules = []`` without
    ``target_modules`` was replaced by the default ``["down_proj"]`` without a word, and GPT-2's
    ``target_modules`` without ``feedforward_modules`` got Llama's ``down_proj``. A model type whose
    default is ``None`` (LN tuning on BERT: PEFT has none) without ``target_modules`` raises ConfigError."""
    if "target_modules" not in {f.name for f in dataclasses.fields(cls)}:
        return d
    given = {cls.field_of(k) for k in d}
    table = DEFAULT_TARGETS.get(cls.peft_type, {})
    if model_type in table and table[model_type] is None and "target_modules" not in given:
        raise ConfigError(f"{cls.peft_type} has no default target_modules for model_type {model_type!r} (Hugging Face "
                          "PEFT has none), and its own default names Llama's modules; name the modules to adapt: "
                          "--target NAME[,NAME] (`jpeft train`: target_modules = [...] in [method]).")
    defaults = table.get(model_type)
    if not defaults:
        return d
    return dict(d, **{k: v for k, v in defaults.items() if cls.field_of(k) not in given})


#: LoRA variants the README lists among the methods that are options of ``lora`` (or of the base), not
#: method names of their own: what to give instead
_LORA_OPTION = "`jpeft train`: [method] name = \"lora\" and {0}; `jpeft info`: --method lora --set {1}"
_INIT_FROM_BASE = ("{0} is LoRA initialised from the base weights, which jpeft train does not offer: "
                   "jpeft.init_{1} in Python (docs/METHODS.md)")
_NOT_METHODS = {
    "dora": "DoRA is LoRA with use_dora = true (" + _LORA_OPTION.format("use_dora = true", "use_dora=true") + ")",
    "rslora": "rsLoRA is LoRA with use_rslora = true (" + _LORA_OPTION.format("use_rslora = true", "use_rslora=true") + ")",
    "qlora": "QLoRA is LoRA on a quantized base (`jpeft train`: [method] name = \"lora\" and, in a [model] table, "
             "quantize = \"nf4\"; `jpeft eval --quantize nf4`)",
    "pissa": _INIT_FROM_BASE.format("PiSSA", "pissa"),
    "olora": _INIT_FROM_BASE.format("OLoRA", "olora"),
    "milora": _INIT_FROM_BASE.format("MiLoRA", "milora"),
}


def method_class(name) -> type:
    """The config class of a method given by its CLI name (``lora``, ``LN-tuning``, ``IA3``, ...).

    Raises:
      ConfigError: no method has that name (the available ones are listed, and the nearest; a LoRA
        variant that is an option of ``lora``, such as ``dora``, says which option).
    """
    names = method_names()
    key = str(name).strip().lower().replace("-", "_")
    if key not in names and key in _NOT_METHODS:
        raise ConfigError(f"unknown method {name!r}: {_NOT_METHODS[key]}.")
    if key not in names:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(sorted(names))}."
                          + did_you_mean(str(name).strip().lower(), sorted(names)))
    return names[key]


def method_config(name: str, fields: Optional[Mapping[str, Any]] = None, *, model_type: Optional[str] = None):
    """Builds a method config from its name and fields (Hugging Face PEFT key names or jpeft
    field names both work). Without ``target_modules``, the Hugging Face PEFT default for
    ``model_type`` is used.

    Raises:
      ConfigError: unknown method name or field.
    """
    cls = method_class(name)
    return cls.from_dict(_with_default_targets(cls, dict(fields or {}), model_type))


def method_name_of(table: Mapping[str, Any]) -> str:
    """The method a ``jpeft train`` ``[method]`` table trains: its ``name``, else its ``peft_type``
    (as in PEFT's adapter_config.json), else ``lora``. (An earlier jpeft wrote ``name = "lora"``
    into every resolved table, so a saved run's name, where given, is the method it trained.)"""
    name, ptype = table.get("name"), table.get("peft_type")
    return name if name is not None else ptype if ptype is not None else DEFAULT_METHOD


def method_of(cfg, model_type=None, saved: Optional[Mapping[str, Any]] = None) -> Any:
    """The method config of a resolved ``jpeft train`` TOML config (its ``[method]`` table).

    A method that trains its own copy of the base's weights in a ``dtype`` of its own (full
    fine-tuning) trains it in float32 over a ``train.dtype = "bfloat16"`` base unless the table
    sets ``dtype``: as every adapter and its optimizer state, not a bfloat16 copy whose AdamW
    updates round away. ``saved``: the resolved config of the run being resumed; one that an
    earlier jpeft started with the copy in the base's dtype (``dtype`` None) resumes so, with a note."""
    m = dict(cfg["method"])
    name, ptype = m.pop("name", None), m.pop("peft_type", None)
    if name is not None and ptype is not None and method_class(name) is not method_class(ptype):
        # one of the two would be trained without a word about the other
        raise ConfigError(f"[method] gives name = {name!r} and peft_type = {ptype!r}, two different methods; give one "
                          "of them (name = \"lora\", ..., or peft_type as in PEFT's adapter_config.json).")
    name = method_name_of({"name": name, "peft_type": ptype})
    cls = method_class(name)
    if (cfg.get("train", {}).get("dtype", "float32") != "float32" and "dtype" in {f.name for f in dataclasses.fields(cls)}
            and "dtype" not in m):
        was = (saved or {}).get("method_config") or {}
        if "dtype" in was and was["dtype"] is None:
            say(f"note: this run's {name} copy of the weights was started in the base's dtype "
                f"({cfg['train']['dtype']}) by an earlier jpeft; it resumes so (a new run trains it in float32).")
            m["dtype"] = None
        else:
            m["dtype"] = "float32"
    return method_config(name, m, model_type=model_type)


def method_from_args(args, *, model_type: Optional[str] = None):

    name = args.method if args.method is not None else DEFAULT_METHOD
    cls = method_class(name)
    fields = {f.name for f in dataclasses.fields(cls)}
    d: dict[str, Any] = {}
    if args.rank is not None:
        if "r" not in fields:
            raise ConfigError(f"method {name!r} has no rank; drop -r/--rank.")
        d["r"] = args.rank
    if args.alpha is not None:
        if "alpha" not in fields:
            raise ConfigError(f"method {name!r} has no alpha; drop --alpha.")
        d["alpha"] = args.alpha
    if "target_modules" in fields:
        t = parse_targets(args.target)
        if t is not None:
            d["target_modules"] = t
    elif args.target is not None:
        raise ConfigError(f"method {name!r} takes no target modules; drop --target.")
    options = {"r": "-r/--rank", "alpha": "--alpha", "target_modules": "--target"}
    by_option, by_set = set(d), {}  # the fields the options gave; field -> the --set that gave it
    for kv in args.method_set:
        if "=" not in kv:
            raise ConfigError(f"--set expects KEY=VALUE, found {kv!r}.")
        k, v = kv.split("=", 1)
        field = cls.field_of(k.strip())
        # one of the two values would be dropped without a word
        if field in by_option:
            raise ConfigError(f"--set {kv} and {options[field]} give one field ({field}) twice; give it once.")
        if field in by_set:
            raise ConfigError(f"--set {by_set[field]} and --set {kv} give one field ({field}) twice; give it once.")
        by_set[field] = kv
        d[k.strip()] = typed_value(k.strip(), v, _parse_value(v), field_type(cls, k.strip()))
    return cls.from_dict(_with_default_targets(cls, d, model_type))


def require_causal_lm(folder: str, cmd: str) -> dict:
    """Reads ``folder``'s ``config.json`` (nothing else is loaded) and refuses a model that
    ``cmd`` cannot train or score: the CLI's objective is next-token (causal LM) loss, which
    jpeft's models provide for the decoder families only. Returns the config dict.

    Raises:
      LoadError: no folder or no ``config.json``.
      UnsupportedModelError: an encoder such as BERT (jpeft loads it as a sequence classifier).
    """
    d = loading.read_config(folder)
    mt = d.get("model_type")
    causal = loading.model_types_of(CausalLM)
    if mt in loading.FAMILIES and mt not in causal:
        raise UnsupportedModelError(
            f"{folder!r} is a {mt!r} model, which jpeft loads as {loading.FAMILIES[mt].model_cls.__name__}; "
            f"`jpeft {cmd}` trains and scores causal language models ({', '.join(causal)}) with next-token loss. "
            f"Fine-tune {mt!r} models from Python (jpeft.models.from_pretrained, jpeft.init, a classification "
            "loss; docs/MODELS.md); `jpeft info`, `export` and `merge` accept them."
        )
    return d


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_train_values(cfg: Mapping[str, Any]) -> None:
    """Type and range checks of a resolved ``jpeft train`` config, before anything is loaded:
    a NaN or infinite learning rate, a string where a number belongs (``--set
    train.learning_rate='"1e-3"'``), a ``method`` that is not a table.

    Raises:
      ConfigError: naming the key, what it must be, and what was found.
    """
    def fail(key, want, v):
        raise ConfigError(f"{key} must be {want}, found {type(v).__name__} {str(v)[:80]!r}.")

    for key in ("model", "output_dir"):
        if key in cfg and (not isinstance(cfg[key], str) or not cfg[key].strip()):
            # "" resolved to the config file's own folder
            fail(key, "a non-empty string (a path)", cfg[key])
    seed = cfg.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 63:
        # the data order (numpy) takes no negative seed, the PRNG key (JAX) none past int64
        fail("seed", "an integer in [0, 2**63)", seed)
    if not isinstance(cfg.get("method"), Mapping):
        fail("[method]", 'a table such as [method] name = "lora" (or --set method.name=lora)', cfg.get("method"))
    d = cfg.get("data", {})
    for key in ("train", "eval", "text_field", "prompt_field", "completion_field", "messages_field", "chat_loss"):
        if d.get(key) is not None and not isinstance(d[key], str):
            fail(f"data.{key}", "a string", d[key])
    sl = d.get("seq_len")
    if not isinstance(sl, int) or isinstance(sl, bool) or sl <= 0:
        fail("data.seq_len", "a positive integer", sl)
    t = cfg.get("train", {})
    lr = t.get("learning_rate")
    if not _number(lr):
        fail("train.learning_rate", "a number (e.g. 2e-4)", lr)
    if not (math.isfinite(lr) and lr > 0):
        fail("train.learning_rate", "a finite number > 0", lr)
    if not isinstance(t.get("model_dropout", True), bool):
        fail("train.model_dropout", "true or false", t.get("model_dropout"))
    lc = t.get("loss_chunk_tokens", "auto")
    if lc != "auto" and (not isinstance(lc, int) or isinstance(lc, bool) or lc < 0):
        fail("train.loss_chunk_tokens", '"auto" or an integer >= 0 (0: the whole logits at once)', lc)
    for key in ("weight_decay", "max_grad_norm"):
        v = t.get(key)
        if key == "max_grad_norm" and v is None:
            continue
        if not _number(v):
            fail(f"train.{key}", "a number", v)
        if not (math.isfinite(v) and v >= 0):
            fail(f"train.{key}", "a finite number >= 0", v)


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} TB"


def human_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{int(n)}"


def format_table(rows: list[list[str]], header: list[str]) -> str:
    """A GitHub-markdown table (also readable in a terminal)."""
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    def line(r):
        return "| " + " | ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                                 for i, (c, w) in enumerate(zip(r, widths))) + " |"
    sep = "|" + "|".join(("-" * (w + 2)) if i == 0 else ("-" * (w + 1) + ":") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in rows])
