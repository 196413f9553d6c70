"""``jpeft train --config config.toml``: fine-tune a local Hugging Face model folder."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
from typing import Any, Mapping

from _jpeft_args import DEFAULT_METHOD, add_train as add_parser  # noqa: F401  (the options, defined there: no JAX for --help)
from jpeft import distributed
from jpeft.cli._common import (check_train_values, field_type, method_class, require_causal_lm,
                               typed_value)
from jpeft.cli._trainer import config_failed, train
from jpeft.config import did_you_mean
from jpeft.data import CHAT_LOSSES
from jpeft.errors import ConfigError, LoadError
from jpeft.quant import SCHEMES


_DEFAULTS = {
    "seed": 0,
    "data": {"seq_len": 256, "packing": "documents", "text_field": "text", "prompt_field": "prompt",
             "completion_field": "completion", "messages_field": "messages", "chat_loss": "assistant"},
    "method": {},  # name = "lora" unless the table names a method (name, or peft_type as in adapter_config.json)
    "train": {
        "steps": 1000, "batch_size": 8, "learning_rate": 2e-4, "warmup_steps": 0, "weight_decay": 0.0,
        "max_grad_norm": 1.0, "eval_every": 100, "save_every": 200, "log_every": 10,
        "keep_checkpoints": 3, "eval_batches": 0, "scan_layers": False, "loss_chunk_tokens": "auto",
        "model_dropout": True, "gradient_accumulation_steps": 1, "dtype": "float32",
    },
    "mesh": {"data": 0, "fsdp": 1, "tensor": 1},
}
FORGETTING_DEFAULTS = {"every": 100, "max_loss_rise": None, "max_kl": None, "action": "stop", "lr_factor": 0.5,
                       "max_rollbacks": 3, "canary_batches": 4}
# the config's string fields (their declared type for --set; None: optional)
_STRING_KEYS = {k: "str" for k in (("model",), ("output_dir",), ("data", "train"), ("data", "packing"),
                                   ("data", "text_field"), ("data", "prompt_field"), ("data", "completion_field"),
                                   ("data", "messages_field"), ("data", "chat_loss"),
                                   ("train", "dtype"), ("forgetting", "canary"), ("forgetting", "action"),
                                   ("model", "path"), ("method", "name"))}
_STRING_KEYS.update({k: "Optional[str]" for k in (("data", "eval"), ("quantize",), ("model", "quantize"))})
# transformers' TrainingArguments names a [train] table may hold, and what jpeft train takes instead
_FIXED_ADAMW = "AdamW's betas (0.9, 0.999) and epsilon 1e-8 are fixed (the Trainer's defaults)"
_TRAINER_HINTS = {
    "lr_scheduler_type": "the schedule is fixed: linear warm-up (warmup_steps) then cosine decay to 10 % of "
                         "learning_rate, the Trainer's \"cosine_with_min_lr\" with min_lr_rate = 0.1",
    "lr_scheduler_kwargs": "the schedule is fixed (cosine to 10 %)",
    "warmup_ratio": "give warmup_steps = ceil(ratio x steps)",
    "max_steps": "use steps", "num_train_epochs": "use steps (there are no epochs; docs/CLI.md, Epochs)",
    "per_device_train_batch_size": "use batch_size (the global batch)", "train_batch_size": "use batch_size",
    "adam_beta1": _FIXED_ADAMW, "adam_beta2": _FIXED_ADAMW, "adam_epsilon": _FIXED_ADAMW, "optim": _FIXED_ADAMW,
    "loraplus_lr_ratio": "LoRA+ (per-group learning rates) is not offered; every array trains at learning_rate",
    "seed": "seed is a top-level key (above [data])", "logging_steps": "use log_every", "save_steps": "use save_every",
    "eval_steps": "use eval_every", "save_total_limit": "use keep_checkpoints", "bf16": 'use dtype = "bfloat16"',
    "accumulate_steps": "use gradient_accumulation_steps (the Trainer's name; accumulate_steps is the Python "
                        "API's, jpeft.make_train_step)",
}
_KNOWN = {
    "": {"model", "output_dir", "seed", "data", "method", "train", "mesh", "forgetting", "quantize"},
    "forgetting": {"canary", *FORGETTING_DEFAULTS},
    "data": {"train", "eval", "seq_len", "packing", "text_field", "prompt_field", "completion_field",
             "messages_field", "chat_loss"},
    "train": set(_DEFAULTS["train"]),
    "mesh": set(_DEFAULTS["mesh"]),
}


# ----------------------------------------------------------------------------------- config
def _tomllib():
    """The standard library's TOML reader (``tomli`` on Python 3.10, a dependency there)."""
    try:
        import tomllib  # Python >= 3.11
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ConfigError("reading TOML on Python 3.10 needs the 'tomli' package: pip install tomli") from None
    return tomllib


def _load_toml(path: str) -> dict:
    tomllib = _tomllib()
    if not os.path.isfile(path):
        raise LoadError(f"config file {path!r} does not exist; see `jpeft train --help` for an example.")
    with open(path, "rb") as f:
        try:
            return tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML ({e}).") from None


def _plain(v) -> bool:
    """Whether ``v`` is made of the values a TOML config holds that JSON can also write (no
    dates or times: ``resolved_config.json`` records every value)."""
    if isinstance(v, (bool, int, float, str)):
        return True
    if isinstance(v, list):
        return all(_plain(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _plain(x) for k, x in v.items())
    return False


def _parse_value(v: str):
    """An ``--set`` value: JSON (``true``, ``1e-3``, ``["q_proj", "v_proj"]``), else a TOML value
    as the config file would hold it (``['q_proj', 'v_proj']``, ``1_000``, ``{ v_proj = 2 }``),
    else the text itself (``--set data.train=train.jsonl``)."""
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        pass
    tomllib = _tomllib()
    try:
        parsed = tomllib.loads(f"v = {v}")["v"]
    except (tomllib.TOMLDecodeError, RecursionError):
        return v
    return parsed if _plain(parsed) else v


def resolve_config(raw: Mapping[str, Any], overrides=(), *, base_dir: str = ".") -> dict:
    """Merges defaults, the TOML file and ``--set`` overrides; checks keys; resolves paths
    relative to the config file's folder.

    Raises:
      ConfigError: unknown keys, missing ``model`` / ``data.train``, bad values.
    """
    cfg: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in _DEFAULTS.items()}
    for k, v in raw.items():
        if isinstance(v, Mapping) and isinstance(cfg.get(k), dict):
            cfg[k].update(v)
        else:
            cfg[k] = v
    method_sets = {}
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"--set expects SECTION.KEY=VALUE, found {ov!r}.")
        key, val = ov.split("=", 1)
        parts = key.strip().split(".")
        node = cfg
        for i, p in enumerate(parts[:-1]):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                at = ".".join(parts[:i + 1])
                hint = (" (a quantized base: --set quantize=VALUE)" if at == "model" and parts[-1] == "quantize" else "")
                raise ConfigError(f"--set {key}: {at} is a value ({type(node).__name__} {str(node)[:60]!r}), not a "
                                  f"table with keys; set it whole with --set {at}=VALUE{hint}.")
        # the field's declared type decides: a string field keeps `inf`, `nan`, `0x10` as the text
        node[parts[-1]] = typed_value(key.strip(), val, _parse_value(val), _STRING_KEYS.get(tuple(parts)))
        if len(parts) == 2 and parts[0] == "method" and parts[1] not in ("name", "peft_type"):
            method_sets[parts[1]] = val
    if method_sets and isinstance(cfg.get("method"), dict):  # typed once the method (maybe set too) is known
        m = cfg["method"]
        try:
            cls = method_class(m.get("name") or m.get("peft_type") or "lora")
        except ConfigError:  # an unknown method is named later, with the config's other checks
            cls = None
        for k, val in method_sets.items():
            if cls is not None:
                m[k] = typed_value(f"method.{k}", val, m[k], field_type(cls, k))
    m = cfg.get("method")
    if isinstance(m, dict) and "name" not in m and "peft_type" not in m:
        m["name"] = DEFAULT_METHOD  # a default name would override a peft_type = "VERA" given alone
    for section, known in _KNOWN.items():
        node = cfg if not section else cfg.get(section, {})
        if not isinstance(node, dict):
            raise ConfigError(f"[{section}] must be a table, found {type(node).__name__}.")
        unknown = sorted(set(node) - known)
        if unknown:
            where = f"[{section}]" if section else "the top level"
            hints = "".join(f" {k}: {_TRAINER_HINTS[k]}." if section == "train" and k in _TRAINER_HINTS
                            else did_you_mean(k, known) for k in unknown)
            raise ConfigError(f"unknown key(s) {unknown} in {where} of the config; known: {sorted(known)}.{hints}")
    if "model" not in cfg:
        raise ConfigError("the config has no `model = \"path/to/hf-folder\"` line.")
    if isinstance(cfg["model"], dict):  # [model] path = "...", quantize = "nf4" (QLoRA)
        m = cfg["model"]
        if cfg.get("quantize") is not None:
            # the table's quantize (or its absence) would replace the top-level one with no word
            raise ConfigError(f"the config sets quantize = {cfg['quantize']!r} at the top level and a [model] table "
                              f"(quantize = {m.get('quantize')!r}); give the quantization once: in the [model] table "
                              "(--set model.quantize=...), or with model = \"hf-folder\" and a top-level quantize.")
        unknown = sorted(set(m) - {"path", "quantize", "tie_word_embeddings"})
        if unknown or not isinstance(m.get("path"), str):
            raise ConfigError(f"[model] takes path = \"hf-folder\" and optionally quantize = \"nf4\" | \"int8\" | "
                              f"\"fp8\" and tie_word_embeddings = false; found keys {sorted(m)}.")
        if "tie_word_embeddings" in m:
            if not isinstance(m["tie_word_embeddings"], bool):  # "false" (a string) would read as true
                raise ConfigError(f"model.tie_word_embeddings must be true or false, found {m['tie_word_embeddings']!r}.")
            cfg["tie_word_embeddings"] = m["tie_word_embeddings"]
        cfg["quantize"] = m.get("quantize")
        cfg["model"] = m["path"]
    if cfg.get("quantize") is not None and cfg["quantize"] not in SCHEMES:
        raise ConfigError(f"model.quantize must be one of {list(SCHEMES)}, found {cfg['quantize']!r}.")
    check_train_values(cfg)  # types and ranges, a NaN learning rate (issue 16)
    if cfg.get("quantize") is not None:
        m = cfg["method"]
        try:
            cls = method_class(m.get("name") or m.get("peft_type") or "lora")
        except ConfigError:  # an unknown method is named later, with the config's other checks
            cls = None
        if cls is not None and cls.trains_every_weight:
            # it trained a float copy of every weight started from the quantized kernels: the quantization error
            # of every kernel went into the saved model (and `jpeft merge` wrote it over the full-precision weights)
            raise ConfigError(f"quantize = {cfg['quantize']!r} with full fine-tuning: full fine-tuning trains a float copy "
                              "of every weight, which would start from the quantized kernels' rounded values and carry "
                              "that rounding into the saved model. Drop quantize to fine-tune the full-precision "
                              "weights, or train an adapter (name = \"lora\", ...) on the quantized base.")
    if "train" not in cfg["data"]:
        raise ConfigError("the config has no [data] train = \"file.jsonl\" entry.")
    t = cfg["train"]
    for k in ("steps", "batch_size", "gradient_accumulation_steps"):
        if isinstance(t[k], bool) or not isinstance(t[k], int) or t[k] <= 0:
            raise ConfigError(f"train.{k} must be a positive integer, found {t[k]!r}.")
    for k in ("eval_every", "save_every", "log_every", "warmup_steps", "eval_batches"):
        if isinstance(t[k], bool) or not isinstance(t[k], int) or t[k] < 0:  # `true` was read as 1
            share = k == "warmup_steps" and isinstance(t[k], float) and 0 < t[k] < 1  # transformers reads it as a share
            raise ConfigError(f"train.{k} must be a non-negative integer, found {t[k]!r}."
                              + (f" For a share of the run, as transformers reads warmup_steps < 1, give warmup_steps = "
                                 f"{math.ceil(t['steps'] * t[k])} (ceil({t[k]} x {t['steps']} steps))." if share else ""))
    for k, low in (("data", 0), ("fsdp", 1), ("tensor", 1)):
        v = cfg["mesh"][k]
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ConfigError(f"mesh.{k} must be an integer >= {low}, found {v!r}.")
    if not isinstance(t["scan_layers"], bool):
        raise ConfigError(f"train.scan_layers must be true or false, found {t['scan_layers']!r}.")
    if t["dtype"] not in ("float32", "bfloat16"):
        raise ConfigError(f"train.dtype must be \"float32\" or \"bfloat16\" (the base model's dtype), found "
                          f"{t['dtype']!r}.")
    if cfg["data"]["packing"] not in ("documents", "stream"):  # before loading anything, not after the model
        raise ConfigError(f"data.packing must be \"documents\" or \"stream\", found {cfg['data']['packing']!r}.")
    if cfg["data"]["chat_loss"] not in CHAT_LOSSES:
        raise ConfigError(f"data.chat_loss must be \"assistant\" (a conversation's assistant turns are trained) or "
                          f"\"all\" (every token), found {cfg['data']['chat_loss']!r}.")
    if not isinstance(t["learning_rate"], (int, float)) or t["learning_rate"] <= 0:
        raise ConfigError(f"train.learning_rate must be > 0, found {t['learning_rate']!r}.")
    if t["keep_checkpoints"] is not None and (isinstance(t["keep_checkpoints"], bool)
                                              or not isinstance(t["keep_checkpoints"], int) or t["keep_checkpoints"] < 1):
        raise ConfigError(f"train.keep_checkpoints must be >= 1, found {t['keep_checkpoints']!r}.")

    def rel(p):
        return p if os.path.isabs(p) else os.path.normpath(os.path.join(base_dir, p))

    if "forgetting" in cfg:
        cfg["forgetting"] = check_forgetting(cfg["forgetting"])
        cfg["forgetting"]["canary"] = rel(cfg["forgetting"]["canary"])

    cfg["model"] = rel(str(cfg["model"]))
    cfg["data"]["train"] = rel(str(cfg["data"]["train"]))
    if cfg["data"].get("eval"):
        cfg["data"]["eval"] = rel(str(cfg["data"]["eval"]))
    cfg["output_dir"] = rel(str(cfg.get("output_dir", "jpeft-run")))
    return cfg


def check_forgetting(f: Mapping[str, Any]) -> dict:
    """The ``[forgetting]`` table with its defaults, checked before anything is loaded.

    Raises:
      ConfigError: a missing canary, no budget, or a value of the wrong type or range (one line).
    """
    f = {**FORGETTING_DEFAULTS, **f}

    def fail(key, want):
        raise ConfigError(f"forgetting.{key} must be {want}, found {f[key]!r}.")

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    def is_num(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not isinstance(f.get("canary"), str) or not f["canary"]:
        raise ConfigError(f"[forgetting] needs canary = \"file.txt\" (a .jsonl or text file of what must not be "
                          f"forgotten), found {f.get('canary')!r}.")
    for k in ("max_loss_rise", "max_kl"):
        if f[k] is not None and not (is_num(f[k]) and f[k] >= 0):
            fail(k, "a non-negative number (nats)")
    if f["max_loss_rise"] is None and f["max_kl"] is None:
        raise ConfigError("[forgetting] needs a budget: set max_loss_rise (nats of canary loss rise), max_kl (mean "
                          "per-token KL from the base, nats) or both.")
    for k, low in (("every", 1), ("canary_batches", 1), ("max_rollbacks", 0)):
        if not is_int(f[k]) or f[k] < low:
            fail(k, f"an integer >= {low}")
    if f["action"] not in ("stop", "rollback"):
        fail("action", '"stop" or "rollback"')
    if not (is_num(f["lr_factor"]) and 0 < f["lr_factor"] < 1):
        fail("lr_factor", "a number in (0, 1)")
    return f


# ----------------------------------------------------------------------------------- run
def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _sigterm_as_ctrl_c() -> None:
    """Makes a SIGTERM stop a process of a multi-process job as Ctrl-C does until ``fit`` takes
    both signals over (and after it returns). ``jax.distributed.initialize`` installs JAX's
    pre-emption notifier on SIGTERM, which swallowed one that came while the model loaded: the
    run went on and trained until SIGKILL."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)


def _another_process_failed(message: str) -> int:
    """Another process of this job stopped alone (:func:`jpeft.distributed.watch_for_failures`),
    or not every process joined the job in time (``initialize``'s ``on_join_timeout``): this
    one's error line and exit status."""
    print(f"jpeft train: error: DistributedError: {message}", file=sys.stderr, flush=True)
    return 2


def _check_relative_paths(cfg: Mapping[str, Any], base_dir: str) -> None:
    """A relative path of the config names a file or folder next to the config file; one that is
    missing there but exists in the current folder (``jpeft train --config cfgs/x.toml`` with
    ``model = "my-model"`` beside ``cfgs/``) is refused saying so, rather than as a missing file.

    Raises:
      ConfigError: such a path (its key, where it was looked for, and what to write instead).
    """
    here = os.getcwd()
    if os.path.realpath(base_dir) == os.path.realpath(here):
        return
    for key, path in (("model", cfg.get("model")), ("data.train", cfg["data"].get("train")),
                      ("data.eval", cfg["data"].get("eval")), ("forgetting.canary", cfg.get("forgetting", {}).get("canary"))):
        if not path or os.path.exists(path):
            continue
        given = os.path.relpath(path, base_dir)
        if given.startswith("..") or not os.path.exists(given):
            continue
        raise ConfigError(f"{key} = {given!r} is read relative to the config file's folder ({base_dir}), where "
                          f"{path} does not exist; it does exist in the current folder ({here}). Paths in the config "
                          f"(and its --set values) are relative to the config file: write {key} = "
                          f"{os.path.relpath(os.path.abspath(given), base_dir)!r}, or an absolute path.")


def run(args) -> int:
    # join the job before reading the config: a process whose config is missing or bad then tells the others at
    # the settings agreement, instead of leaving them waiting in the join until JAX aborts them
    joined = args.coordinator is not None or args.num_processes is not None or args.process_id is not None \
        or args.cluster_auto
    if joined:
        if args.join_timeout <= 0:  # before the join: JAX would take it as no time at all to wait
            raise ConfigError(f"--join-timeout must be a positive number of seconds, found {args.join_timeout}.")
        distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                               auto=True if args.cluster_auto else None, fail_together=False,  # cli._end does it
                               initialization_timeout=args.join_timeout,
                               # the library's parameter is this command's --join-timeout
                               on_join_timeout=lambda m: _another_process_failed(
                                   m.replace("initialization_timeout", "--join-timeout")))
        _sigterm_as_ctrl_c()
        distributed.watch_for_failures(_another_process_failed)
    try:
        cfg_path = os.path.abspath(args.config)
        raw = _load_toml(cfg_path)
        cfg = resolve_config(raw, args.overrides, base_dir=os.path.dirname(cfg_path))
        _check_relative_paths(cfg, os.path.dirname(cfg_path))
        if args.output_dir is not None:
            if not args.output_dir.strip():  # was ignored: the run went to the config's output_dir
                raise ConfigError("--output-dir is empty; give the folder to write the run into, or drop the option "
                                  "to use the config's output_dir.")
            cfg["output_dir"] = os.path.abspath(args.output_dir)
        if args.max_steps is not None and args.max_steps <= 0:
            raise ConfigError(f"--max-steps must be positive, found {args.max_steps}.")
        require_causal_lm(cfg["model"], "train")  # one line before anything is loaded
    except Exception:
        if joined:  # (one process alone has no one to tell, and its error needs no JAX backend)
            config_failed()
        raise

    result = train(cfg, resume=args.resume, max_steps=args.max_steps, progress=not args.no_progress)
    return 130 if result.get("interrupted") else 0
