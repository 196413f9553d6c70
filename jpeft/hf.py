"""Hugging Face PEFT adapter folders in and out: ``adapter_config.json`` +
``adapter_model.safetensors`` exactly as ``peft`` writes and reads them.

* :func:`save_peft` writes a jpeft adapter so that ``peft.PeftModel.from_pretrained(model,
  path)`` loads it with no missing- or unexpected-key warning;
* :func:`load_peft` reads one (made by ``peft`` or by :func:`save_peft`) for a jpeft base.

Keys: an adapter site at jpeft module path ``p`` is saved under
``base_model.model.<hf_name(p)>.<tensor>``, e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``, in PyTorch's
orientation (``lora_A.weight: [r, in]``, ``lora_B.weight: [out, r]``; jpeft stores
``lora_A: [in, r]``, ``lora_B: [r, out]``). Embedding sites use ``lora_embedding_A: [r, num]``
and ``lora_embedding_B: [dim, r]``; DoRA adds ``lora_magnitude_vector: [out]`` and
``lora_bias=True`` adds ``lora_B.bias: [out]``.

Each method's format is the pair of functions ``to_hf`` / ``from_hf`` of its
:class:`~jpeft.methods.base.Method` record, found by the Hugging Face ``peft_type``; the
shared key helpers are in :mod:`jpeft.peft_format` (re-exported here). This module knows no
method: LoRA's format (with rsLoRA, rank_pattern, alpha_pattern, DoRA, and GPT-2's
``fan_in_fan_out``) is in ``jpeft/methods/lora_hf.py``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
import warnings
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from jpeft import _inject, quant, scan
from jpeft.config import AdapterConfig, _as_targets
from jpeft.errors import (
    BaseMismatchError,
    CheckpointError,
    ConfigError,
    JpeftError,
    LoadError,
    QuantizationError,
    SaveError,
    UnsafeFileError,
    UnsupportedAdapterError,
)
from jpeft._safe_read import MAX_JSON_BYTES, open_regular, read_bounded, read_json
from jpeft._safetensors import read_safetensors, safetensors_index
from jpeft.methods._common import HEAD_MODULES, PEFT_TASK_HEADS, TASK_HEADS
from jpeft.methods._common import has_modules_to_save, head_copies, saved_from_hf, saved_to_hf
from jpeft.methods.base import (FOREIGN_SITE_FIX, Method, check_reads_outside, foreign_site, method_for_peft_type,
                                registered_methods)
from jpeft.models.loading import BERT_ARCHITECTURES, read_config
from jpeft.peft_format import (CONFIG_FILE, CONV1D, PEFT_PREFIX, WEIGHTS_FILE, ExportContext, ImportContext, check_keys,  # noqa: F401
                               FLAG, check_value_types, config_from_peft, peft_key, peft_version_of, split_peft_key,
                               take_base_copies, take_embedding_copies, to_np)
from jpeft.tree import count, from_hf_name, hf_name, is_nnx, module_leaves, nnx_state_of, unwrap_params


def supported_peft_types() -> list[str]:
    """The ``peft_type`` values :func:`save_peft` / :func:`load_peft` handle: those of the
    registered methods that give ``to_hf`` and ``from_hf`` (:class:`jpeft.methods.base.Method`)."""
    return sorted(m.peft_type for m in registered_methods() if m.to_hf is not None and m.from_hf is not None)


def _format(peft_type) -> Optional[Method]:
    m = method_for_peft_type(peft_type) if isinstance(peft_type, str) else None
    return m if m is not None and m.to_hf is not None and m.from_hf is not None else None


_ENCODER_ROOTS = ("bert",)
_DECODER_ROOTS = ("model", "transformer")
# the task type "auto" writes by base kind; what PEFT loads per kind and method: AdapterConfig.peft_task_types
_DEFAULT_TASK = {"decoder": "CAUSAL_LM", "encoder": "FEATURE_EXTRACTION", "bare decoder": "FEATURE_EXTRACTION"}


def _base_kind(paths, params) -> Optional[str]:
    """``"encoder"`` (BERT, or the bare ``BertModel``'s params), ``"decoder"`` (Llama family,
    GPT-2), ``"bare decoder"`` (the params of ``jpeft.models.LlamaModel`` / ``GPT2Model``, the
    stack without its language-model head: PEFT builds prompt learning on such a base as
    FEATURE_EXTRACTION, not CAUSAL_LM) or ``None`` when neither the params nor the adapter's site
    paths tell."""
    inner = unwrap_params(params)[0] if params is not None else None
    roots = set(inner) if inner is not None else {p.split("/")[0] for p in paths if p}
    if roots & set(_ENCODER_ROOTS) or _is_bare_bert(inner):
        return "encoder"
    if roots & set(_DECODER_ROOTS):
        return "decoder"
    if _is_bare_decoder(inner):
        return "bare decoder"
    return None


def _is_bare_decoder(inner) -> bool:
    """Whether ``inner`` are the params of a bare decoder stack (``params['params']['model']`` of a
    Llama-family model, ``['transformer']`` of GPT-2): its token embedding beside its layers."""
    if not isinstance(inner, Mapping):
        return False
    return any(emb in inner and any(k == layers or k.startswith(layers + "_") for k in inner)
               for emb, layers in (("embed_tokens", "layers"), ("wte", "h")))


def _is_bare_bert(inner) -> bool:
    """Whether ``inner`` are the params of the bare encoder ``jpeft.models.BertModel`` (``params['params']['bert']``,
    PEFT's FEATURE_EXTRACTION base ``BertModel``): BERT's embeddings with token types beside an encoder."""
    emb = inner.get("embeddings") if isinstance(inner, Mapping) else None
    return isinstance(emb, Mapping) and "token_type_embeddings" in emb and "encoder" in inner


def _task_type(config, paths, params, requested, fmt_choice) -> Optional[str]:
    kind = _base_kind(paths, params)
    if requested == "auto":
        task = fmt_choice or _DEFAULT_TASK.get(kind, "CAUSAL_LM" if config.prompt_learning else None)
    else:
        task = requested
    ok = config.peft_task_types.get(kind)
    if ok is not None and task not in ok:
        can = "nothing (PEFT cannot build this method for it)" if not ok else f"task_type in {list(ok)}"
        raise UnsupportedAdapterError(
            f"PEFT cannot load a {config.peft_type} adapter with task_type={task!r} on this {kind} base (jpeft.models' "
            f"{'BERT' if kind == 'encoder' else 'Llama/Mistral/Qwen2/GPT-2'}): it can take {can}. Nothing was written."
        )
    return task


def _head_tensors(task: str, params, prefix: str) -> dict:
    """The frozen head PEFT keeps as a module to save for ``task`` (SEQ_CLS's and TOKEN_CLS's
    ``classifier``, QUESTION_ANS's ``qa_outputs``), from the base params."""
    if params is None:
        raise UnsupportedAdapterError(
            f"task_type={task!r} makes PEFT load the model's head as a module to save: pass params= (the base the "
            "adapter was trained on) so save_peft can write it. Nothing was written."
        )
    inner = unwrap_params(params)[0]
    leaves = module_leaves(inner)
    heads = [h for h in TASK_HEADS[task] if "kernel" in leaves.get(h, {})]
    if not heads:
        raise UnsupportedAdapterError(
            f"task_type={task!r} needs the head {' or '.join(map(repr, TASK_HEADS[task]))} (a Dense) in the base params; "
            f"none was found{_head_fix(task)}. Nothing was written.")
    if task == "TOKEN_CLS" and _bert_task(inner) == "SEQ_CLS":
        raise UnsupportedAdapterError(
            "task_type='TOKEN_CLS' is for a token classifier (transformers' BertForTokenClassification: the classifier "
            f"on every token), but these params are {_pooled_head(inner)}{_head_fix(task)}. Nothing was written.")
    out = {}
    for h in heads:
        own = leaves[h]
        # a head quantized by jpeft.quantize (its default quantizes every kernel but lm_head): what it stands for
        out[f"{prefix}{h}.weight"] = to_np(quant.dequantize_array(own["kernel"])).T.copy()
        if "bias" in own:
            out[f"{prefix}{h}.bias"] = to_np(own["bias"]).copy()
    return out


def _pooled_head(inner) -> str:
    """What BERT params with a pooler and a ``classifier`` (:func:`_bert_task`'s SEQ_CLS) are, for a
    refusal: a sequence classifier's, or, where the classifier has one output, that or a
    multiple-choice model's (BertForMultipleChoice scores each choice with a one-output classifier;
    the params alone cannot tell it from a one-label sequence classifier)."""
    shape = getattr(inner["classifier"].get("kernel"), "shape", None)
    if shape is not None and len(shape) and shape[-1] == 1:
        return ("a sequence classifier's or a multiple-choice model's (BertForSequenceClassification or "
                "BertForMultipleChoice: a pooler, a one-output classifier on the first token)")
    return "a sequence classifier's (a pooler, the classifier on the first token)"


def _bert_task(inner) -> Optional[str]:
    """PEFT's task type of a jpeft BERT task model's params (``None`` for other params): a
    ``qa_outputs`` head, a ``classifier`` on every token (no pooler) or on the pooled first token."""
    if not isinstance(inner, Mapping) or not isinstance(inner.get("bert"), Mapping):
        return None
    if "qa_outputs" in inner:
        return "QUESTION_ANS"
    if "classifier" in inner:
        return "SEQ_CLS" if "pooler" in inner["bert"] else "TOKEN_CLS"
    return None


# the BertConfig.task of each PEFT task type that needs a token-level BERT head (its transformers
# class is loading's BERT_ARCHITECTURES)
_BERT_HEAD_TASKS = {"TOKEN_CLS": "token_classification", "QUESTION_ANS": "question_answering"}


def _head_fix(task: str) -> str:
    name = _BERT_HEAD_TASKS.get(task)
    if name is None:
        return ""
    cls = BERT_ARCHITECTURES[name]
    return (f"; use the params of jpeft.models.{cls} (from_pretrained of its checkpoint, or "
            f"from_pretrained(folder, task={name!r}))")


def _refuse_head_sites(tensors: Mapping[str, Any], task: str) -> None:
    """PEFT's SEQ_CLS, TOKEN_CLS and QUESTION_ANS wrap the model's head as a module to save (a
    full copy) and load no adapter weights onto it: an adapter site on the head would be dropped
    by PEFT without a warning."""
    heads = tuple(f"{PEFT_PREFIX}{m}." for m in TASK_HEADS[task])
    own = {f"{h}{t}" for h in heads for t in ("weight", "bias")}  # a trained copy (modules_to_save) is PEFT's own
    sites = sorted(k for k in tensors if k.startswith(heads) and k not in own)
    if sites:
        raise UnsupportedAdapterError(
            f"the adapter has a site on the model's head ({sites[:3]}), but task_type={task!r} makes PEFT load the "
            "head as a module to save (a full copy) and drop adapter weights on it silently, so PEFT's outputs "
            "would differ from jpeft's. Save with task_type='FEATURE_EXTRACTION' (PEFT then adapts the head as "
            f"jpeft does), or train it as modules_to_save={list(TASK_HEADS[task])[:1]} instead of a target. Nothing "
            "was written."
        )


def _take_heads(d: Mapping[str, Any], config_cls, tensors: dict, leaves, folder: str, dtype) -> dict:
    """Removes from ``tensors`` the head a SEQ_CLS, TOKEN_CLS or QUESTION_ANS adapter file carries
    as PEFT's module to save and returns it as the adapter's copy of the head (``{path: node}``, a
    site that runs the module with the copy: PEFT trains it) for the methods whose config has no
    ``modules_to_save``; LoRA's own format reads the copies its ``modules_to_save`` names (``{}``
    here). A copy of a head the base lacks or any other module to save is refused by name
    (a task head of another model: :func:`_refuse_other_task_heads`)."""
    mts = d.get("modules_to_save") or []
    prefix = _key_prefix(config_cls)
    task_heads = PEFT_TASK_HEADS.get(d.get("task_type"), ())
    keys = [k for k in tensors if k.startswith(prefix) and k[len(prefix):] in
            {f"{m}.{t}" for m in HEAD_MODULES for t in ("weight", "bias")}]
    if not mts and not keys:
        return {}
    absent = sorted({k[len(prefix):].split(".")[0] for k in keys} - set(leaves))
    if absent:  # a head of another model (a decoder's score): no module of the base to compare or copy it to
        raise UnsupportedAdapterError(
            f"the adapter in {folder!r} carries the classification head {absent[0]!r} of a "
            f"{d.get('task_type') or 'SEQ_CLS'} model (PEFT's copy of it), but the base has no such module: jpeft's "
            "decoders (Llama, Mistral, Qwen2, GPT-2) are causal language models without a classification head, and "
            "BERT's heads are 'classifier' and 'qa_outputs'. Load the adapter on its model with transformers, or train "
            "it in jpeft on a base jpeft has."
        )
    if has_modules_to_save(config_cls):
        # a method that loads modules_to_save: a copy they name is one PEFT trains (SEQ_CLS names the
        # classifier), so it loads as a module to save even while it still equals the base's, as PEFT's
        # training would move it; one it does not name is PEFT's frozen copy, dropped after the check
        keys = [k for k in keys if k[len(prefix):].split(".")[0] not in mts
                and _equals_base_head(k[len(prefix):], tensors[k], leaves)]
        for k in keys:
            del tensors[k]
        return {}
    if not set(mts) <= set(HEAD_MODULES):
        raise UnsupportedAdapterError(
            f"the {d.get('peft_type')} adapter in {folder!r} has modules_to_save={list(mts)} (trainable full copies of "
            f"modules), which jpeft loads for this method only as a task head's copy {list(HEAD_MODULES)}; "
            f"use {' or '.join(sorted(m.name for m in registered_methods() if has_modules_to_save(m.config)))} (whose "
            "modules_to_save jpeft loads for any module) for the others."
        )
    out = {}
    for head in sorted({k[len(prefix):].split(".")[0] for k in keys}):
        own = {k[len(prefix) + len(head) + 1:]: tensors.pop(k) for k in list(keys) if k[len(prefix):].split(".")[0] == head}
        if head in mts or head in task_heads:  # PEFT's module to save, which it trains: trained or not
            out[head] = saved_from_hf(head, own, leaves[head], folder, dtype)
            continue
        for name, x in own.items():  # not a module to save: PEFT loads it onto the base's head, so it must be that
            if not _equals_base_head(f"{head}.{name}", x, leaves):
                raise UnsupportedAdapterError(
                    f"the adapter in {folder!r} carries {head}.{name}, which differs from the base's, but names no "
                    f"module to save (modules_to_save={list(mts)}, task_type={d.get('task_type')!r}): PEFT would "
                    "overwrite the base's head with it. Add it to modules_to_save (or set the task_type of its head, "
                    "'SEQ_CLS', 'TOKEN_CLS' or 'QUESTION_ANS') in adapter_config.json, or load the adapter on the base "
                    "it was trained with."
                )
    return out


def _equals_base_head(name: str, x: np.ndarray, leaves) -> bool:
    """Whether the tensor ``name`` (``classifier.weight``, ``qa_outputs.bias``, ...) of a file equals the base's."""
    head, _, tensor = name.partition(".")
    base = leaves.get(head, {}).get({"weight": "kernel", "bias": "bias"}.get(tensor, ""))
    base = None if base is None else quant.dequantize_array(base)  # a quantized head: what it stands for
    want = None if base is None else (np.asarray(base, np.float32).T if name.endswith("weight") else np.asarray(base, np.float32))
    return want is not None and want.shape == x.shape and bool(np.allclose(x, want, atol=1e-6))


def save_peft(path: str, config: AdapterConfig, adapter: Mapping[str, Any], *, base_model_name_or_path: Optional[str] = None,
              task_type: Optional[str] = "auto", fan_in_fan_out: Optional[bool] = None, params=None) -> None:
    """Writes ``adapter`` as a Hugging Face PEFT folder (``adapter_config.json`` +
    ``adapter_model.safetensors``, float32) that ``peft.PeftModel.from_pretrained`` loads on
    the matching transformers model.

    Args:
      path: the folder (created; existing adapter files in it are replaced atomically).
      config: the adapter's method config (e.g. :class:`jpeft.LoraConfig`).
      adapter: the adapter dict from :func:`jpeft.init` / training, for a jpeft.models base
        (sites of a layer-scanned model are written per layer, as PEFT names them).
      base_model_name_or_path: recorded in adapter_config.json (where the base lives).
      task_type: PEFT's task type; ``"auto"`` writes the config's own ``task_type`` (prefix and
        prompt tuning) or ``"CAUSAL_LM"`` for decoders and ``"FEATURE_EXTRACTION"`` for BERT.
        A type PEFT cannot load for the base and method (e.g. ``"CAUSAL_LM"`` on BERT, prefix
        tuning on BERT with any type but ``"FEATURE_EXTRACTION"``) is refused before anything is written; ``"SEQ_CLS"``,
        ``"TOKEN_CLS"`` and ``"QUESTION_ANS"`` need ``params`` (of the model with that head:
        ``BertForSequenceClassification``, ``BertForTokenClassification``,
        ``BertForQuestionAnswering``) to write the frozen head PEFT expects as a module to save.
      fan_in_fan_out: written for PEFT; ``None`` sets it when the sites are GPT-2 Conv1D layers.
      params: the base params (optional): tell the base's kind for prompt/prefix adapters and
        give the head for the task types above.

    Raises:
      UnsupportedAdapterError: a method without a registered format, or sites PEFT cannot express.
      SaveError: writing failed (the previous files are left intact).
    """
    if not isinstance(config, AdapterConfig):
        raise ConfigError(f"save_peft needs the adapter's config (e.g. jpeft.LoraConfig), found {type(config).__name__}.")
    if not adapter:
        raise ConfigError("save_peft got an empty adapter; there is nothing to save.")
    if isinstance(base_model_name_or_path, os.PathLike):  # a pathlib.Path: recorded (and read) as its string
        base_model_name_or_path = os.fspath(base_model_name_or_path)
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise ConfigError(f"save_peft's base_model_name_or_path must be a string (a Hub id or a folder) or None, found "
                          f"{type(base_model_name_or_path).__name__}. Nothing was written.")
    fmt = _format(config.peft_type)
    if fmt is None:
        # the fix: a full fine-tune is a whole model, not an adapter (`jpeft export` of a `name = "full"` run
        # ended with the list of formats alone, which names no way out)
        fix = ("a full fine-tune is the whole model, not an adapter: write it as a Hugging Face model folder with "
               "jpeft.merge (`jpeft merge --model BASE --adapter RUN --out DIR`), which transformers loads"
               if getattr(config, "trains_every_weight", False) else
               "jpeft reads the adapter in its own format (jpeft.load_adapter, `jpeft eval --adapter`); for a file PEFT "
               "loads, train one of the methods listed")
        raise UnsupportedAdapterError(
            f"no Hugging Face PEFT format is registered for peft_type {config.peft_type!r}; supported: "
            f"{supported_peft_types()}. Nothing was written; {fix}."
        )
    # a method without modules_to_save of its own: its copy of the head (loaded from a SEQ_CLS, TOKEN_CLS or
    # QUESTION_ANS file) is written as that copy, in a file of the head's task ("auto" picks it: the params' task,
    # else the head's); any other full copy is foreign to the method
    heads = head_copies(config, adapter)
    # the task types PEFT loads the head copies with: the params' own task where they tell it
    can = [t for t, h in TASK_HEADS.items() if set(heads) <= set(h)]
    own = _bert_task(unwrap_params(params)[0]) if params is not None else None
    can = [own] if own in can else can
    if heads:
        adapter = {p: n for p, n in adapter.items() if p not in heads}
        if task_type == "auto" and getattr(config, "task_type", None) is None and can:
            task_type = can[0]
    foreign = foreign_site(config, adapter)
    if foreign is not None:
        raise UnsupportedAdapterError(f"save_peft: {foreign}; PEFT would rebuild it as another method. {FOREIGN_SITE_FIX}")
    if scan.is_stacked(adapter):  # PEFT names layers one by one: model.layers.{i}....
        adapter = scan.unstack_adapter(adapter)
    paths = sorted(adapter)
    by_name: dict[str, str] = {}
    for p in paths:  # PEFT's keys name a module by its Hugging Face name: two sites with one would overwrite
        other = by_name.setdefault(hf_name(p), p)
        if other != p:
            raise ConfigError(
                f"the adapter's sites {other!r} and {p!r} have one Hugging Face module name, {hf_name(p)!r} (an NNX "
                "list entry layers/0 and an attribute layers_0), so the PEFT file would hold one of them only. Rename "
                "one of the two attributes, or save with jpeft.save_adapter.")
    if fan_in_fan_out is None:
        conv = [bool(CONV1D.match(p)) for p in paths]
        fan_in_fan_out = any(conv)
    # "auto": the config's own choice (prefix/prompt tuning configs may carry one) or the base's default
    task = _task_type(config, paths, params, task_type, getattr(config, "task_type", None))
    if heads and task not in can:
        which = " or ".join(map(repr, can)) or "none (no task has all these heads)"
        raise UnsupportedAdapterError(
            f"the {config.peft_type} adapter holds a trained copy of {sorted(heads)} (PEFT's module to save of a task "
            f"head), which PEFT loads for this method with task_type {which} only; found task_type={task!r}. Save "
            f"with task_type={(can or ['SEQ_CLS'])[0]!r} (or 'auto'). Nothing was written."
        )
    d, tensors = fmt.to_hf(config, adapter, ExportContext(bool(fan_in_fan_out), _local_hf_config(base_model_name_or_path)))
    d = dict(d)
    d["peft_type"] = config.peft_type
    d["base_model_name_or_path"] = base_model_name_or_path
    d["task_type"] = task
    if task in TASK_HEADS:
        _refuse_head_sites(tensors, task)
        prefix = _key_prefix(type(config))
        copies = {prefix + k[len(PEFT_PREFIX):]: v for p, n in heads.items() for k, v in saved_to_hf(p, n).items()}
        # a trained copy of the head (LoRA's modules_to_save, another method's copy) wins over the base's
        base = {} if set(heads) & set(TASK_HEADS[task]) else _head_tensors(task, params, prefix)
        tensors = dict(base, **copies, **tensors)
        d["modules_to_save"] = list(dict.fromkeys(list(d.get("modules_to_save") or []) + list(TASK_HEADS[task])))
    d.setdefault("inference_mode", True)
    d.setdefault("revision", None)

    config_bytes = json.dumps(d, indent=2, sort_keys=True).encode()
    tmp = None
    replaced = []
    made = not os.path.isdir(path)  # a folder this call makes goes again when the save fails
    done = False
    try:
        os.makedirs(path, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=_SAVE_PREFIX, dir=path)
        with open(os.path.join(tmp, CONFIG_FILE), "wb") as f:
            f.write(config_bytes)
        # the weights name their config, so a kill between the two replaces below is finished on load
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.path.join(tmp, WEIGHTS_FILE),
                  metadata={"format": "pt", _CONFIG_HASH: hashlib.sha256(config_bytes).hexdigest()})
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            os.replace(os.path.join(tmp, name), os.path.join(path, name))
            replaced.append(name)
        # an earlier save's kept config (failed between its replaces, then saved again): once these files are in
        # place it is stale, and a later hand edit of adapter_config.json must not be undone by load_peft with it
        for name in os.listdir(path):
            if name.startswith(_SAVE_PREFIX) and os.path.join(path, name) != tmp:
                shutil.rmtree(os.path.join(path, name), ignore_errors=True)
        done = True
    except OSError as e:
        if replaced == [WEIGHTS_FILE]:
            raise SaveError(f"could not write the adapter to {path!r}: {e}. Its new weights are in place but not yet "
                            f"their adapter_config.json, which is kept in {tmp!r}; the next jpeft.hf.load_peft of "
                            f"{path!r} puts it in place, or save again.") from None
        raise SaveError(f"could not write the adapter to {path!r}: {e}. The previous files are left as they were.") from None
    finally:
        # new weights beside the old config (an error or a Ctrl-C between the two replaces): the temporary folder
        # holds the config they name, which load_peft puts in place (_finish_interrupted_save); removing it would
        # let the new weights load with the old config's values (lora_alpha)
        if tmp is not None and replaced != [WEIGHTS_FILE]:
            shutil.rmtree(tmp, ignore_errors=True)
        if made and not done:
            with contextlib.suppress(OSError):
                os.rmdir(path)  # only when empty: nothing of anyone's is removed


_SAVE_PREFIX = ".jpeft_save_"
_CONFIG_HASH = "jpeft_config_sha256"


def _finish_interrupted_save(path: str) -> None:
    """A :func:`save_peft` killed between its two replaces leaves the new weights beside the old
    ``adapter_config.json``, with the new config still in its temporary folder: the weights'
    header names the SHA-256 of their config, so that config is put in place here."""
    wpath, cpath = os.path.join(path, WEIGHTS_FILE), os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(wpath) or not any(n.startswith(_SAVE_PREFIX) for n in os.listdir(path)):
        return
    want = safetensors_index(wpath)[1].get(_CONFIG_HASH)

    def sha(f):
        fd = open_regular(f, what="adapter_config.json")
        try:
            return hashlib.sha256(read_bounded(fd, MAX_JSON_BYTES + 1)).hexdigest()
        finally:
            os.close(fd)

    if not want or (os.path.isfile(cpath) and sha(cpath) == want):
        return
    for name in sorted(os.listdir(path)):
        cand = os.path.join(path, name, CONFIG_FILE)
        if name.startswith(_SAVE_PREFIX) and os.path.isfile(cand) and sha(cand) == want:
            os.replace(cand, cpath)
            shutil.rmtree(os.path.join(path, name), ignore_errors=True)
            return


def _local_hf_config(base) -> Optional[dict]:
    """The base's config.json when ``base`` is a local model folder, else ``None``."""
    if not isinstance(base, str) or not os.path.isfile(os.path.join(base, "config.json")):
        return None
    return read_config(base)


def read_peft_config(path: str) -> dict:
    """The parsed ``adapter_config.json`` of an adapter folder (named errors when absent/bad)."""
    if not os.path.isdir(path):
        raise LoadError(f"{path!r} is not a folder; pass the folder holding adapter_config.json.")
    try:
        _finish_interrupted_save(path)
    except JpeftError:
        raise
    except OSError as e:
        raise LoadError(f"cannot finish an interrupted save in {path!r}: {e}") from None
    cpath = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(cpath):
        found = sorted(os.listdir(path))
        named = [f for f in found if os.path.isfile(os.path.join(path, f, CONFIG_FILE))]
        if named:  # PEFT's save_pretrained of a model with adapters named other than "default"
            raise LoadError(
                f"{path!r} has no adapter_config.json of its own, but its subfolders {named[:10]} each hold one: PEFT "
                "saves an adapter named other than 'default' in a subfolder of that name. Pass one of them, e.g. "
                f"{os.path.join(path, named[0])!r}.")
        raise LoadError(f"{path!r} has no adapter_config.json (found {found[:10]}); it is not a PEFT adapter folder.")
    return read_json(cpath, what="adapter_config.json")


# a PEFT weights file declaring more numbers than this many times the base's, plus the slack, is refused unread
_ADAPTER_NUMBERS_PER_BASE, _ADAPTER_NUMBERS_SLACK = 8, 1 << 20


def _read_tensors(path: str, base_numel: int) -> dict[str, np.ndarray]:
    wpath = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(wpath):
        bins = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth"))]
        if bins:
            raise UnsafeFileError(
                f"{path!r} holds only pickle weights {bins}; jpeft reads adapter_model.safetensors only (unpickling can "
                "run code). Re-save with peft: model.save_pretrained(path, safe_serialization=True)."
            )
        raise LoadError(f"{path!r} has no {WEIGHTS_FILE}; save the adapter with weights next to adapter_config.json.")
    # The header is checked before any data is read, so a (sparse) file declaring far more numbers than
    # any adapter of this base holds is refused without allocating them. The bound is loose on purpose: an
    # adapter may exceed its base (a rank near the width on every module, DoRA's magnitudes, modules_to_save
    # copies: a 1x1 conv 3 -> 5 with DoRA r=2 holds 21 numbers over a base of 20).
    try:
        declared = sum(math.prod(shape) for _, shape, _, _ in safetensors_index(wpath)[0].values())
        limit = _ADAPTER_NUMBERS_PER_BASE * base_numel + _ADAPTER_NUMBERS_SLACK
        if declared > limit:
            raise CheckpointError(
                f"it declares {declared:,} adapter numbers, more than {_ADAPTER_NUMBERS_PER_BASE} times the "
                f"{base_numel:,} parameters of the whole base model (plus {_ADAPTER_NUMBERS_SLACK:,}), which no adapter "
                "of this base holds"
            )
        arrays, _ = read_safetensors(wpath)
    except CheckpointError as e:
        raise CheckpointError(f"cannot read {wpath!r}: {e}. The file is truncated or corrupted; copy it again.") from None
    return {k: np.asarray(v, np.float32) for k, v in arrays.items()}


# adapter_config.json keys every format may read, and the JSON types their values may have; a method's own keys are
# checked by its Method.check_hf_keys. A null bias is "none" for every config (TrainedBiasOption._check_bias)
_VALUE_TYPES = {
    "fan_in_fan_out": FLAG, "bias": (str, type(None)), "target_modules": (str, list, type(None)),
    "modules_to_save": (list, type(None)), "feedforward_modules": (str, list, type(None)), "task_type": (str, type(None)),
}


def check_config_values(d: Mapping[str, Any], where: str) -> None:
    """Checks the types of a loaded ``adapter_config.json``'s values before any format reads
    them: a wrongly typed value, a regex RE2 rejects, or a value a method's
    ``Method.check_hf_keys`` refuses (LoRA's: a non-finite alpha) is a
    :class:`~jpeft.errors.LoadError` that names the key (never a raw TypeError or ``re.error``).
    Every registered method's check runs, whatever the file's ``peft_type``: a key one format
    defines may be read by another's (LoRA's ``rank_pattern`` by AdaLoRA's)."""
    try:
        check_value_types(d, _VALUE_TYPES)
        for k in ("target_modules", "feedforward_modules"):
            if d.get(k) is not None:
                _as_targets(d[k], k)
        for m in registered_methods():
            if m.check_hf_keys is not None:
                m.check_hf_keys(d)
    except ConfigError as e:
        raise LoadError(f"{where}: {e}") from None


def _warn_unknown_keys(config_cls, d: Mapping[str, Any], path: str) -> None:
    """Warns of ``adapter_config.json`` keys that jpeft does not know for this method (neither
    a config field, nor an option it ignores as harmless or refuses): most likely an option of a
    newer PEFT, which jpeft cannot apply and which may change the adapter's outputs. Every key
    the installed PEFT writes is known (tests/test_methods_hf.py)."""
    known = config_cls.known_hf_keys()
    unknown = sorted(k for k in d if k not in known)
    if unknown:
        warnings.warn(f"the adapter in {path!r} has adapter_config.json keys jpeft does not know for "
                      f"{config_cls.peft_type}: {unknown[:8]} (from a newer PEFT?). jpeft ignores them; if they change "
                      "what the adapter computes, jpeft's outputs differ from PEFT's.", UserWarning, stacklevel=4)


def _refuse_other_task_heads(d: Mapping[str, Any], config_cls, tensors: Mapping[str, Any], inner, folder: str) -> None:
    """A TOKEN_CLS or QUESTION_ANS adapter that carries (or names as a module to save) its model's
    head, read for params without that head (TOKEN_CLS's ``classifier`` has the sequence
    classifier's name and shape and would load as it, on the pooled first token), or a prefix of
    those task types (PEFT cannot run one on BERT): refused by name before anything loads."""
    task = d.get("task_type")
    if task not in ("TOKEN_CLS", "QUESTION_ANS"):
        return
    head = TASK_HEADS[task][0]
    prefix = _key_prefix(config_cls)
    names = {head} | {m for m in (d.get("modules_to_save") or []) if isinstance(m, str)}
    keys = sorted(k for k in tensors if k.startswith(prefix) and any(k[len(prefix):].startswith(f"{n}.") for n in names))
    if not keys and head not in (d.get("modules_to_save") or []):
        return  # the encoder's adapter alone (the head removed from the file): it loads as any other
    found = keys[0] if keys else f"modules_to_save {head!r}"
    runs = config_cls.peft_task_types.get("encoder")
    if runs is not None and task not in runs:  # a prefix: PEFT's TOKEN_CLS / QUESTION_ANS model cannot run it on BERT
        raise UnsupportedAdapterError(
            f"the {d.get('peft_type')} adapter in {folder!r} has task_type={task!r} (it carries {found}), which PEFT "
            f"cannot run on BERT (its {task} model finds no past_key_values argument in BERT's forward and raises "
            f"'Model does not support past key values'), so it has no outputs to match; jpeft runs this method on "
            f"BERT as {list(runs)}. Train the prefix as FEATURE_EXTRACTION, or use prompt tuning, LoRA or another "
            "method for this task.")
    own = _bert_task(inner)
    if own == task:
        return
    what = ("a token classifier (transformers' BertForTokenClassification: its classifier on every token)"
            if task == "TOKEN_CLS" else "a question-answering model (transformers' BertForQuestionAnswering: qa_outputs, "
            "the start/end logits of every token)")
    found_base = _pooled_head(inner) if own == "SEQ_CLS" else {
        "TOKEN_CLS": "a token classifier's", "QUESTION_ANS": "a question-answering model's"}.get(
        own, "those of a model without that head")
    raise BaseMismatchError(
        f"the adapter in {folder!r} has task_type={task!r} and carries its head ({found}): it was trained on {what}, "
        f"but these params are {found_base}, so the head would give other outputs than the adapter's model"
        f"{_head_fix(task) if isinstance(inner, Mapping) and 'bert' in inner else '; jpeft has that head for BERT only'}"
        ". Load the adapter on such params, or remove the head from the file (and from modules_to_save) to load the "
        "encoder's adapter alone."
    )


# jpeft's task models and the bare base inside each (its root in the params, as PEFT keys an adapter made on it)
_BARE_BASES = {"bert": "BertModel", "model": "LlamaModel", "transformer": "GPT2Model"}


def _refuse_bare_base_keys(tensors: Mapping[str, Any], inner, folder: str) -> None:
    """An adapter PEFT saved on a bare base (``BertModel``, ``LlamaModel``, ``GPT2Model``: keys
    without ``bert.`` / ``model.`` / ``transformer.``), read for a task model's params: every key
    would miss, and PEFT itself would load none of them on the task model; refused by name with
    the bare module and its params, on which the adapter loads as PEFT applies it."""
    if not isinstance(inner, Mapping):
        return
    file_roots = {k[len(PEFT_PREFIX):].split(".")[0] for k in tensors if k.startswith(PEFT_PREFIX)}
    if not file_roots or file_roots & {hf_name(r).split(".")[0] for r in inner}:
        return
    for root, bare in _BARE_BASES.items():
        sub = inner.get(root)
        if isinstance(sub, Mapping) and file_roots <= {hf_name(r).split(".")[0] for r in sub}:
            raise BaseMismatchError(
                f"the adapter in {folder!r} was saved by PEFT on the bare base ({bare}: its keys start with "
                f"{sorted(file_roots)}, without the {root + '.'!r} of these params' model), so none of its keys names "
                f"a module of this model (PEFT would not load them on it either). Load it on the bare model, as it was "
                f"made: bare = jpeft.models.{bare}(model.config); bare_params = {{'params': params['params'][{root!r}]}}; "
                "load_peft(path, bare_params); jpeft.apply(bare, bare_params, adapter, ...)"
                + (" returns (last_hidden_state, pooled), PEFT's FEATURE_EXTRACTION outputs." if root == "bert" else ".")
            )


def _traced(params, model, example_args) -> Optional[dict]:
    """The trace of ``model.apply(params, *example_args)`` as :func:`jpeft.init` traces it
    (``{module_path: ModuleInfo}``), or ``None`` without a model."""
    if model is None:
        if tuple(example_args):
            raise ConfigError("example_args were given without a model; pass model= too (the flax.linen module).")
        return None
    if is_nnx(model) or is_nnx(params):
        from jpeft import _nnx  # flax.nnx: on the NNX path only (docs/ARCHITECTURE.md, "Start-up time")

        if not is_nnx(model):
            raise ConfigError(
                f"load_peft(model=...) got NNX params with a {type(model).__name__} model; pass the NNX model (the "
                "nnx.Module, or its graphdef with the state as params), as jpeft.init takes it."
            )
        graphdef, state = _nnx.split(model, nnx_state_of(params) if is_nnx(params) else None)
        infos = _nnx.trace(graphdef, state, *example_args)
    else:
        inner, _ = unwrap_params(params)
        infos = _inject.trace(model, {"params": inner}, *example_args)
    return infos


def _load_traced(path: str, params, dtype, infos) -> tuple[AdapterConfig, dict]:
    """:func:`_load` with the layouts of the traced model (``infos``; ``None``: none), whose sites that fold
    into params the model reads outside their modules' calls are refused (:func:`check_reads_outside`)."""
    layouts = None if infos is None else {p: i.layout for p, i in infos.items() if i.layout is not None}
    config, adapter = _load(path, params, dtype, layouts)
    check_reads_outside(adapter, infos)
    return config, adapter


def _load(path: str, params, dtype=jnp.float32, layouts=None) -> tuple[AdapterConfig, dict]:
    """The parsing behind :func:`load_peft` and :func:`load_peft_with_base` (see there)."""
    d, fmt = _read_config_dict(path)
    _warn_unknown_keys(fmt.config, d, path)
    inner, _ = unwrap_params(params)
    if count(inner) == 0:  # a GraphDef or an empty tree: the size check below would call the file corrupted
        raise ConfigError(
            f"the params given to read {path!r} onto hold no parameter arrays (found {type(params).__name__}); pass "
            "the base's params: {'params': ...} from jpeft.models.from_pretrained, or, from_pretrained(..., api='nnx') "
            "having returned (graphdef, state), the state (or the nnx.Module itself)."
        )
    tensors = _read_tensors(path, count(inner))
    renamed = _as_peft_reads(inner, path)
    with _naming_the_base(d, path):
        if renamed is not None:  # an NNX model's list entries ("layers/0/fc"): read under PEFT's names, then put back
            names, inner = renamed
            if layouts is not None:
                layouts = {q: layouts[p] for q, p in names.items() if p in layouts}
            config, adapter = _load_unrolled(d, fmt, tensors, inner, {"params": inner}, path, dtype, layouts)
            return config, {names.get(p, p): n for p, n in adapter.items()}
        return _load_unrolled(d, fmt, tensors, inner, params, path, dtype, layouts)


@contextlib.contextmanager
def _naming_the_base(d: Mapping[str, Any], path: str):
    """Adds the base that the PEFT folder ``path`` names (``base_model_name_or_path`` of its config
    ``d``) to a :class:`BaseMismatchError` raised inside: the base to load the folder on instead."""
    try:
        yield
    except BaseMismatchError as e:
        name = d.get("base_model_name_or_path")
        if not isinstance(name, str) or not name:
            raise
        raise type(e)(f"{e} {os.path.join(path, CONFIG_FILE)} names its base: {name!r}.") from None


def _read_config_dict(path: str) -> tuple[dict, Method]:
    """The checked ``adapter_config.json`` of the PEFT folder ``path`` and its method's record."""
    d = read_peft_config(path)
    check_config_values(d, os.path.join(path, CONFIG_FILE))
    ptype = d.get("peft_type")
    fmt = _format(ptype)
    if fmt is None:
        raise UnsupportedAdapterError(
            f"adapter type {ptype!r} in {path!r} is not supported by jpeft.hf; supported peft_type values: "
            f"{supported_peft_types()}.{next((h for m in registered_methods() for t, h in m.peft_hints if t == ptype), '')}"
        )
    return d, fmt


def peft_config(path: str) -> AdapterConfig:
    """The config of the PEFT adapter folder ``path`` as its ``adapter_config.json`` states it,
    read without its weights or a base: what a command asks before it loads the base (the CLI
    reads a tied base untied when ``peft_config(path).adapts_lm_head(peft_version)``, the file's
    ``peft_version`` saying how its PEFT matched ``modules_to_save``): the method's
    ``Method.hf_config`` (LoRA's is the reading :func:`load_peft` starts from), by default its
    config class's ``from_dict`` of the keys jpeft knows for it (those it does not know are
    what :func:`load_peft` warns of).

    Raises:
      LoadError: no folder or ``adapter_config.json``, or a malformed one;
        UnsupportedAdapterError (a LoadError) for a ``peft_type`` or an option jpeft does not
        support.
    """
    d, fmt = _read_config_dict(path)
    if fmt.hf_config is not None:
        return fmt.hf_config(d, path)
    known = fmt.config.known_hf_keys()
    return config_from_peft(fmt.config, {k: v for k, v in d.items() if k in known}, os.path.join(path, CONFIG_FILE))


def _as_peft_reads(inner, path: str):
    """``None`` when every module path of the base is the one a PEFT key reads back as
    (``from_hf_name(hf_name(p)) == p``: linen's ``layers_0``); else ``({read path: own path},
    params renamed to the read paths)``, for an NNX model whose list entries are path
    components of their own (``layers/0/fc``, PEFT's ``layers.0.fc``, read back as
    ``layers_0/fc``). Two modules with one PEFT name (``layers/0`` and ``layers_0``) are a
    :class:`BaseMismatchError`: a file cannot tell them apart."""
    leaves = module_leaves(inner)
    names: dict[str, str] = {}
    for p in leaves:
        q = from_hf_name(hf_name(p))
        if q in names:
            raise BaseMismatchError(
                f"the base has two modules with one Hugging Face name, {names[q]!r} and {p!r} (both "
                f"{hf_name(p)!r}), so the PEFT adapter in {path!r} cannot say which one its keys belong to. Rename one "
                "of the two attributes.")
        names[q] = p
    if all(q == p for q, p in names.items()):
        return None
    out: dict = {}
    for q, p in names.items():
        node = out
        for comp in [c for c in q.split("/") if c]:
            node = node.setdefault(comp, {})
        node.update(leaves[p])
    return names, out


def _key_prefix(config_cls) -> str:
    """Where PEFT keys a method's tensors (and SEQ_CLS's classifier copy) in its weights file."""
    return "base_model." if config_cls.prompt_learning else PEFT_PREFIX


def _load_unrolled(d, fmt, tensors, inner, params, path: str, dtype, layouts=None):
    _refuse_other_task_heads(d, fmt.config, tensors, inner, path)
    _refuse_bare_base_keys(tensors, inner, path)
    # a task head's copy (SEQ_CLS, TOKEN_CLS, QUESTION_ANS): a site of its own for a method without modules_to_save
    # (LoRA's from_hf reads it)
    heads = _take_heads(d, fmt.config, tensors, module_leaves(inner), path, dtype)
    n_scanned = scan.num_stacked_layers(inner)
    unrolled = None
    if n_scanned is not None:  # a layer-scanned base: read per layer, then stack (jpeft.scan)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), inner)
        unrolled = scan.unstack_params(abstract)
    # PEFT's copies of targeted embedding-like modules' base weights, checked against the params' and dropped
    # (on a layer-scanned base, against the layer's slice of the stacked params: jpeft.scan.layer_module)
    try:
        take_base_copies(tensors, module_leaves(inner if unrolled is None else unrolled), path,
                         own_of=None if unrolled is None else (lambda p: scan.layer_module(inner, p)))
    except BaseMismatchError:
        if fmt.hf_base_mismatch is not None:  # the method's settings may say what made the copies differ
            fmt.hf_base_mismatch(d, module_leaves(inner), path)
        raise
    # PEFT's save_embedding_layers copies of the whole embedding / lm_head (not a module to save)
    take_embedding_copies(tensors, module_leaves(inner), path, d.get("modules_to_save") or (),
                          bool(d.get("ensure_weight_tying")))
    hf_config = _peft_base_config(d)
    if n_scanned is not None:
        # the traced layouts name a scanned module once (layers/conv), each layer's site by its own path (layers_3/conv)
        per_layer = None if layouts is None else {
            p: layouts[s] for p in module_leaves(unrolled) if (s := scan.stacked_path(p) or p) in layouts}
        ctx = ImportContext(module_leaves(unrolled), path, dtype, hf_config, per_layer, peft_version_of(d))
        config, adapter = fmt.from_hf(d, tensors, {"params": unrolled}, ctx)
        return config, {**scan.stack_adapter(adapter, n_scanned), **heads}
    ctx = ImportContext(module_leaves(inner), path, dtype, hf_config, layouts, peft_version_of(d))
    config, adapter = fmt.from_hf(d, tensors, params, ctx)
    return config, {**adapter, **heads}


def _peft_base_config(d) -> Optional[dict]:
    """The config.json of the adapter's ``base_model_name_or_path`` when it is a readable local
    folder (the model PEFT would load it on), else ``None``: a format compares it with the params
    where they decide what PEFT computes (a tied output projection)."""
    try:
        return _local_hf_config(d.get("base_model_name_or_path"))
    except (JpeftError, OSError):
        return None


def _base_change(config, adapter):
    """``None``, or ``(setting, fn)`` when the adapter applies to a base PEFT recomputes on load
    (``setting`` names the option in PEFT's words, ``fn(params)`` computes the base; the method's
    ``Method.hf_base``)."""
    hook = method_for_peft_type(config.peft_type).hf_base
    return None if hook is None else hook(config, adapter)


def load_peft(path: str, params, *, dtype=jnp.float32, model=None, example_args=()) -> tuple[AdapterConfig, dict]:
    """Reads a Hugging Face PEFT adapter folder for a jpeft base.

    Args:
      path: folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
      params: the base (``{"params": ...}`` or bare) from :func:`jpeft.models.from_pretrained`;
        for a layer-scanned base the per-layer sites are stacked (:mod:`jpeft.scan`). For an
        NNX model its ``nnx.State`` or the ``nnx.Module`` itself (docs/NNX.md).
      dtype: dtype of the adapter arrays.
      model, example_args: the ``flax.linen`` model and an example input, as given to
        :func:`jpeft.init`, for an adapter on modules whose layout the kernel's shape alone
        does not tell: a LoRA on a ``torch.nn.Conv1d/2d/3d`` loads onto the ``nn.Conv`` of the
        same weights (kernel ``[*window, in, out]``). Not needed for Linear / Embedding sites.

    Returns:
      ``(config, adapter)``: ``jpeft.apply(model, params, adapter, ids)`` gives the output of
      PEFT's unmerged ``PeftModel.from_pretrained``. lora_alpha, use_rslora, rank_pattern,
      alpha_pattern, DoRA and ensure_weight_tying are honoured.

    Raises:
      LoadError: missing folder/files or malformed config; UnsafeFileError: pickle only.
      ConfigError: ``params`` holding no arrays (an NNX ``GraphDef`` given for its state).
      UnsupportedAdapterError: a ``peft_type`` or option jpeft does not support (the
        supported types are listed), or a PiSSA/OLoRA adapter, which needs the residual base
        :func:`load_peft_with_base` returns.
      BaseMismatchError: the adapter's keys do not match the base (first unmatched keys on
        both sides are listed).
      CheckpointError: a truncated or corrupted weights file.
    """
    config, adapter = _load_traced(path, nnx_state_of(params), dtype, _traced(params, model, example_args))
    change = _base_change(config, adapter)
    if change is not None:
        how = "" if model is None else ", model=model, example_args=(x,)"
        raise UnsupportedAdapterError(
            f"the adapter in {path!r} was saved with {change[0]}: its weights are relative to the residual base (the "
            "base minus its initial adapter) that PEFT recomputes when it loads the adapter, so it cannot be applied to "
            f"the original params. Use jpeft.hf.load_peft_with_base(path, params{how}), which returns (config, "
            "residual_params, adapter), then jpeft.convert_residual_adapter(adapter, params, residual_params) for an "
            "adapter on the original params (or convert it in PEFT with save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...))."
        )
    return config, adapter


def load_peft_with_base(path: str, params, *, dtype=jnp.float32, model=None,
                        example_args=()) -> tuple[AdapterConfig, Any, dict]:
    """Like :func:`load_peft`, and also returns the base the adapter applies to, as
    ``peft.PeftModel.from_pretrained`` builds it: for an adapter saved with
    ``init_lora_weights="pissa"`` or ``"olora"`` the targeted kernels become the residual
    ``W - s A0 B0`` (``A0, B0``: the exact SVD / QR factors of ``W``, as PEFT computes them on
    load); for any other adapter ``params`` is returned unchanged. ``model`` and
    ``example_args`` are :func:`load_peft`'s (for conv sites).

    Returns:
      ``(config, params_for_the_adapter, adapter)``.

    Raises:
      as :func:`load_peft`; UnsupportedAdapterError also for a residual adapter on a
      layer-scanned base (load it on ``scan_layers=False`` params, then stack);
      QuantizationError for a residual adapter on quantized params (the residual is taken from
      the full-precision weights, as PEFT refuses its residual inits on a quantized layer: load
      onto the float params, then quantize the residual returned).
    """
    given, params = params, nnx_state_of(params)
    config, adapter = _load_traced(path, params, dtype, _traced(given, model, example_args))
    change = _base_change(config, adapter)
    if change is None:
        return config, given, adapter  # an nnx.Module as given
    setting, base_of = change
    if quant.has_quantized(params):
        raise QuantizationError(
            f"the adapter in {path!r} ({setting}) applies to a residual base computed from the "
            "full-precision weights, and these params are quantized; load it onto the full-precision params, then "
            "quantize the residual params returned."
        )
    if scan.is_stacked(adapter):
        raise UnsupportedAdapterError(
            f"the adapter in {path!r} ({setting}) needs its residual base computed per layer; load it on a base made with "
            "scan_layers=False, then stack with jpeft.scan.stack_params / stack_adapter."
        )
    return config, base_of(params), adapter


__all__ = [
    "save_peft",
    "load_peft",
    "load_peft_with_base",
    "supported_peft_types",
    "peft_key",
    "split_peft_key",
    "check_keys",
    "read_peft_config",
    "peft_config",
    "ExportContext",
    "ImportContext",
    "PEFT_PREFIX",
]
