"""Loading Hugging Face checkpoint folders (``config.json`` + safetensors) into jpeft models.

The weights are read tensor by tensor from the safetensors files (one tensor in host memory
at a time, each converted and placed before the next is read), after every name and shape
has been checked against the model from the file headers alone, so a bad checkpoint fails
before anything large is allocated and nothing partially loaded is returned.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import re
import shutil
import warnings
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jpeft import _hostmem, distributed, quant
from jpeft._hfconfig import num_kv_heads, number as _number  # the one reading of config.json's numbers
from jpeft.checkpoint import is_step_folder
from jpeft.errors import (CheckpointError, ConfigError, JpeftError, LoadError, QuantizationError, SaveError,
                          UnsafeFileError, UnsupportedModelError, WeightShapeError)
from jpeft._safe_read import open_regular, read_json
from jpeft._safetensors import safetensors_index
from jpeft.io import ADAPTER_JSON
from jpeft.models.bert import (TASK_MODELS as _BERT_TASK_MODELS, BertConfig, BertForMultipleChoice,
                               BertForSequenceClassification)
from jpeft.models.gpt2 import GPT2Config, GPT2LMHeadModel
from jpeft.models import _layers as L
from jpeft.models.llama import LlamaConfig, LlamaForCausalLM
from jpeft.parallel import put_leaf, param_shardings
from jpeft.scan import stack_params, unstack_params
from jpeft.tree import hf_name, path_str
from jpeft.validate import check_key


@dataclasses.dataclass(frozen=True)
class Family:
    """How one Hugging Face ``model_type`` maps onto a jpeft model."""

    config_from_hf: Callable[[Mapping[str, Any], Any, Any], Any]
    model_cls: type
    base_prefix: str  # "model", "transformer", "bert"
    untransposed: Callable[[str], bool] = lambda path: False  # kernels stored [in, out] (Conv1D)
    ignored: tuple = ()  # regexes of checkpoint keys that are not parameters of the model
    fresh: tuple = ()  # regexes of module paths that may be missing (task heads): freshly initialised


def _get(d, *names, default=None):
    for n in names:
        if n in d and d[n] is not None:
            return d[n]
    return default


def _flag(d: Mapping[str, Any], name: str, default: bool) -> bool:
    """A true/false field of ``config.json``; transformers' configs take JSON booleans only, and
    ``bool("false")`` would read a quoted ``"false"`` as true."""
    value = d.get(name, default)
    if not isinstance(value, bool):
        raise ConfigError(
            f"config.json field {name!r} must be true or false (a JSON boolean), found {value!r} "
            f"({type(value).__name__}); transformers refuses it too. Write {name}: "
            f"{'true' if value in ('true', 'True', 1) else 'false'} without quotes, or remove it for the "
            f"default ({str(default).lower()}).")
    return value


# transformers' MistralConfig, Qwen2Config and Qwen3Config defaults when config.json has no
# max_position_embeddings (LlamaConfig's: 2048); llama3 rope falls back to it for original_max_position_embeddings
_MAX_POSITIONS_DEFAULT = {"mistral": 4096 * 32, "qwen2": 32768, "qwen3": 32768}
# transformers' Qwen3Config has head_dim 128 when config.json has none (the others: hidden_size // heads)
_HEAD_DIM_DEFAULT = {"qwen3": 128}


# the special-token fields LlamaConfig and GPT2Config carry as config.json has them (read and written)
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _llama_like(d: Mapping[str, Any], dtype, param_dtype, model_type: str) -> LlamaConfig:
    # as transformers' convert_rope_params_to_dict: an older file's rope_scaling, when set, wins over
    # rope_parameters (whose rope_theta is then not read either: the top-level one or 10000 is)
    rp = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
    if any(isinstance(v, Mapping) for v in rp.values()):
        # transformers 5's per-layer-type form ({"full_attention": {...}, "sliding_attention": {...}}):
        # its Llama/Mistral/Qwen2 cannot run it either; read as one dict it gave default rope, theta 10000
        raise UnsupportedModelError(
            f"config.json's rope parameters are given per layer type ({sorted(rp)}); jpeft's {model_type} has one "
            "rotary embedding for every layer. Write one rope_parameters dict (rope_type, rope_theta, ...)."
        )
    theta = _get(rp, "rope_theta", default=_get(d, "rope_theta", default=10000.0))
    theta = _number({"rope_theta": theta}, "rope_theta")
    max_positions = _number(d, "max_position_embeddings", _MAX_POSITIONS_DEFAULT.get(model_type, 2048), integer=True)
    scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
    kind = L.rope_kind(scaling)
    if float(scaling.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) or 1.0) != 1.0:
        raise UnsupportedModelError("partial_rotary_factor != 1 is not supported by jpeft's Llama-family models.")
    if kind == "default":
        scaling = None
    else:
        required, optional = L.ROPE_KEYS.get(kind, ((), ()))
        scaling = {k: v for k, v in scaling.items() if k in required + optional}  # transformers ignores the others
        scaling["rope_type"] = kind
        # llama3, yarn, longrope: as transformers' standardize_rope_params, a top-level value wins, else the context
        if "original_max_position_embeddings" in required:
            if d.get("original_max_position_embeddings") is not None:
                scaling["original_max_position_embeddings"] = d["original_max_position_embeddings"]
            elif scaling.get("original_max_position_embeddings") is None:
                scaling["original_max_position_embeddings"] = max_positions
    heads = _number(d, "num_attention_heads", integer=True)
    hidden = _number(d, "hidden_size", integer=True)
    attn_bias = _flag(d, "attention_bias", False)
    if model_type in _HEAD_DIM_DEFAULT:  # a default of its own (Qwen3's 128), not hidden / heads
        head_dim = _number(d, "head_dim", _HEAD_DIM_DEFAULT[model_type], integer=True)
    elif d.get("head_dim") is not None:
        head_dim = _number(d, "head_dim", integer=True)
    else:
        head_dim = hidden // (heads or 1)
    kw = dict(
        vocab_size=_number(d, "vocab_size", integer=True),
        hidden_size=hidden,
        intermediate_size=_number(d, "intermediate_size", integer=True),
        num_layers=_number(d, "num_hidden_layers", integer=True),
        num_heads=heads,
        num_kv_heads=num_kv_heads(dict(d, model_type=model_type)),
        head_dim=head_dim,
        max_position_embeddings=max_positions,
        rms_norm_eps=_number(d, "rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        hidden_act=str(d.get("hidden_act", "silu")),
        attention_bias=attn_bias,
        attention_out_bias=attn_bias,
        mlp_bias=_flag(d, "mlp_bias", False),
        # null as transformers' default 0.0 (it only drops in training); a quoted "0.1" refused as elsewhere
        attention_dropout=0.0 if d.get("attention_dropout") is None else _number(d, "attention_dropout"),
        tie_word_embeddings=_flag(d, "tie_word_embeddings", False),
        model_type=model_type,
        initializer_range=_number(d, "initializer_range", 0.02),
        dtype=dtype,
        param_dtype=param_dtype,
        **{k: d.get(k) for k in _TOKEN_IDS},
    )
    # transformers' Mistral and Qwen2 configs take a window of 4096 when config.json has no
    # sliding_window key (an explicit null means none)
    if model_type == "mistral":
        # a Mistral config with layer_types is Ministral to transformers' AutoConfig: the window per layer
        window = d.get("sliding_window", 4096)
        layer_types = d.get("layer_types")
        kw.update(attention_bias=False, attention_out_bias=False, mlp_bias=False, sliding_window=window,
                  layer_types=tuple(layer_types) if (window is not None and layer_types) else None)
    if model_type == "qwen2":
        kw.update(attention_bias=True, attention_out_bias=False, mlp_bias=False)
    if model_type == "qwen3":  # attention_bias on q/k/v and o_proj (as Llama's); no MLP bias; q/k norms
        kw.update(mlp_bias=False, qk_norm=True)
    if model_type in ("qwen2", "qwen3"):  # the same sliding-window options
        window = d.get("sliding_window", 4096) if _flag(d, "use_sliding_window", False) else None
        layer_types = d.get("layer_types")
        if window is not None and layer_types is None:
            mwl = _number(d, "max_window_layers", 28, integer=True)
            layer_types = ["sliding_attention" if i >= mwl else "full_attention" for i in range(kw["num_layers"])]
        kw.update(sliding_window=window, layer_types=tuple(layer_types) if (window is not None and layer_types) else None)
    return LlamaConfig(**kw)


def _gpt2(d, dtype, param_dtype) -> GPT2Config:
    if d.get("add_cross_attention"):
        raise UnsupportedModelError("GPT-2 with add_cross_attention=True (encoder-decoder use) is not supported.")
    return GPT2Config(
        vocab_size=_number(d, "vocab_size", integer=True),
        hidden_size=_number(d, "n_embd", integer=True),
        num_layers=_number(d, "n_layer", integer=True),
        num_heads=_number(d, "n_head", integer=True),
        intermediate_size=d.get("n_inner"),
        max_position_embeddings=_number(d, "n_positions", 1024, integer=True),
        layer_norm_epsilon=_number(d, "layer_norm_epsilon", 1e-5),
        hidden_act=str(d.get("activation_function", "gelu_new")),
        scale_attn_weights=_flag(d, "scale_attn_weights", True),
        scale_attn_by_inverse_layer_idx=_flag(d, "scale_attn_by_inverse_layer_idx", False),
        embd_pdrop=_number(d, "embd_pdrop", 0.1),
        resid_pdrop=_number(d, "resid_pdrop", 0.1),
        attn_pdrop=_number(d, "attn_pdrop", 0.1),
        tie_word_embeddings=_flag(d, "tie_word_embeddings", True),
        initializer_range=_number(d, "initializer_range", 0.02),
        dtype=dtype,
        param_dtype=param_dtype,
        **{k: d.get(k) for k in _TOKEN_IDS},
    )


def _bert(d, dtype, param_dtype) -> BertConfig:
    if d.get("position_embedding_type", "absolute") != "absolute":
        raise UnsupportedModelError(
            f"BERT with position_embedding_type={d.get('position_embedding_type')!r} is not supported; "
            "jpeft implements 'absolute'."
        )
    if d.get("is_decoder") or d.get("add_cross_attention"):
        raise UnsupportedModelError("BERT as a decoder (is_decoder / add_cross_attention) is not supported.")
    id2label = d.get("id2label") or None
    if id2label and d.get("num_labels") is not None and _number(d, "num_labels", integer=True) != len(id2label):
        # as transformers: a num_labels that disagrees with id2label (a hand-edited config.json) wins, with the
        # names LABEL_i; jpeft read len(id2label) labels, so the checkpoint's classifier was refused by shape
        id2label = None
    num_labels = len(id2label) if id2label else _number(d, "num_labels", 2, integer=True)
    names = None
    if id2label:
        try:
            names = tuple(str(v) for _, v in sorted(id2label.items(), key=lambda kv: int(kv[0])))
        except (TypeError, ValueError, AttributeError):
            names = None  # keys that are not label indices: the names are not kept
        if names == tuple(f"LABEL_{i}" for i in range(len(names or ()))):
            names = None  # transformers' default names: the same config as none given
    return BertConfig(
        task=_BERT_TASKS.get(next((a for a in d.get("architectures") or [] if a in _BERT_TASKS), None),
                             "sequence_classification"),
        vocab_size=_number(d, "vocab_size", integer=True),
        hidden_size=_number(d, "hidden_size", integer=True),
        num_layers=_number(d, "num_hidden_layers", integer=True),
        num_heads=_number(d, "num_attention_heads", integer=True),
        intermediate_size=_number(d, "intermediate_size", integer=True),
        max_position_embeddings=_number(d, "max_position_embeddings", 512, integer=True),
        type_vocab_size=_number(d, "type_vocab_size", 2, integer=True),
        layer_norm_eps=_number(d, "layer_norm_eps", 1e-12),
        hidden_act=str(d.get("hidden_act", "gelu")),
        hidden_dropout_prob=_number(d, "hidden_dropout_prob", 0.1),
        attention_probs_dropout_prob=_number(d, "attention_probs_dropout_prob", 0.1),
        classifier_dropout=None if d.get("classifier_dropout") is None else _number(d, "classifier_dropout"),
        num_labels=num_labels,
        problem_type=d.get("problem_type"),
        label_names=names,
        initializer_range=_number(d, "initializer_range", 0.02),
        dtype=dtype,
        param_dtype=param_dtype,
        pad_token_id=d.get("pad_token_id", 0),
    )


# the transformers class of each BertConfig.task (config.json's architectures; any other BERT class, BertModel or
# BertForMaskedLM, loads as the sequence classifier with a fresh head, as before)
BERT_ARCHITECTURES = {"sequence_classification": "BertForSequenceClassification",
                       "token_classification": "BertForTokenClassification",
                       "question_answering": "BertForQuestionAnswering",
                       "multiple_choice": "BertForMultipleChoice"}
_BERT_TASKS = {v: k for k, v in BERT_ARCHITECTURES.items()}

_DECODER_IGNORED = (r".*\.rotary_emb\.inv_freq",)

FAMILIES: dict[str, Family] = {
    "llama": Family(lambda d, a, b: _llama_like(d, a, b, "llama"), LlamaForCausalLM, "model", ignored=_DECODER_IGNORED),
    "mistral": Family(lambda d, a, b: _llama_like(d, a, b, "mistral"), LlamaForCausalLM, "model", ignored=_DECODER_IGNORED),
    "qwen2": Family(lambda d, a, b: _llama_like(d, a, b, "qwen2"), LlamaForCausalLM, "model", ignored=_DECODER_IGNORED),
    "qwen3": Family(lambda d, a, b: _llama_like(d, a, b, "qwen3"), LlamaForCausalLM, "model", ignored=_DECODER_IGNORED),
    "gpt2": Family(
        _gpt2, GPT2LMHeadModel, "transformer",
        untransposed=lambda path: path.startswith("transformer/h_"),
        ignored=(r".*\.attn\.bias", r".*\.attn\.masked_bias"),
    ),
    "bert": Family(
        _bert, BertForSequenceClassification, "bert",
        # a checkpoint's pooler where the head has none (token classification, question answering), and another
        # task's head (a checkpoint read with task=...; the model's own head is then freshly initialised, with a
        # warning): transformers drops them too
        ignored=(r"cls\..*", r".*\.position_ids", r"bert\.embeddings\.position_ids", r"bert\.pooler\..*",
                 r"classifier\..*", r"qa_outputs\..*"),
        fresh=(r"classifier", r"qa_outputs", r"bert/pooler/dense"),
    ),
}


# heads of Hugging Face classes no jpeft model of the family implements; a checkpoint of one could otherwise
# load onto another head (BERT's are BERT_ARCHITECTURES)
_OTHER_HEADS = ("DoubleHeadsModel",)
# a decoder family's checkpoint with a task head (``score``, ``classifier``, ``qa_outputs``) in place of ``lm_head``
_DECODER_OTHER_HEADS = _OTHER_HEADS + ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering",
                                      "ForMultipleChoice")


def supported_model_types() -> list[str]:
    """The Hugging Face ``model_type`` values :func:`from_pretrained` can load."""
    return sorted(FAMILIES)


def model_types_of(model_cls: type) -> list[str]:
    """The ``model_type`` values :func:`from_pretrained` loads as ``model_cls`` or a subclass of it
    (sorted): ``model_types_of(LlamaForCausalLM)`` is the Llama family, ``model_types_of(CausalLM)``
    (``jpeft.models._layers``) the causal language models."""
    return sorted(t for t, fam in FAMILIES.items() if issubclass(fam.model_cls, model_cls))


def read_config(path: str) -> dict:
    """The parsed ``config.json`` of a checkpoint folder (named errors when absent or malformed)."""
    if not os.path.isdir(path):
        raise LoadError(
            f"{path!r} is not a folder. jpeft loads local Hugging Face checkpoint folders holding config.json and "
            "model.safetensors (or model.safetensors.index.json with its shards); nothing is downloaded: fetch a hub "
            "model first (hf download NAME --local-dir DIR) and give DIR."
        )
    cpath = os.path.join(path, "config.json")
    if not os.path.isfile(cpath):
        held = _adapter_held(path)
        if held:  # the two folders swapped (`--model runs/x/adapter`): saving a config.json would not help
            raise LoadError(f"{path!r} holds {held}, not a model (no config.json). Give the base model's folder (the one "
                            "the adapter was trained on) here, and this folder as the adapter (`--adapter` of the jpeft "
                            "commands; jpeft.load_adapter or jpeft.hf.load_peft in Python).")
        raise LoadError(
            f"{path!r} has no config.json (found: {sorted(os.listdir(path))[:10]}). A Hugging Face checkpoint folder "
            "needs config.json next to its weights; write it with transformers' save_pretrained."
        )

    return read_json(cpath, what="config.json")


def _adapter_held(path: str) -> Optional[str]:
    """What adapter ``path`` (a folder without ``config.json``) holds, in words, or ``None``."""
    if os.path.isfile(os.path.join(path, ADAPTER_JSON)):
        return f"a jpeft adapter ({ADAPTER_JSON})"
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        return "a Hugging Face PEFT adapter (adapter_config.json)"
    if os.path.isfile(os.path.join(path, "adapter", ADAPTER_JSON)) or os.path.isdir(os.path.join(path, "checkpoints")):
        return "a `jpeft train` run (adapter/, checkpoints/)"
    if is_step_folder(path):
        return "a `jpeft train` checkpoint (state/, meta/)"
    return None


def ties_lm_head(d: Mapping[str, Any]) -> bool:
    """Whether the model a ``config.json`` (``d``) describes computes its logits with the input
    embedding (``tie_word_embeddings``, as :func:`config_from_hf` reads it: GPT-2's default is
    true): the one reading the commands use to decide whether an ``lm_head`` adapter needs the
    base read untied."""
    return bool(getattr(config_from_hf(d), "tie_word_embeddings", False))


def config_from_hf(d: Mapping[str, Any], dtype=jnp.float32, param_dtype=None):
    """A jpeft model config from a Hugging Face config dict (``config.json``).

    Raises:
      UnsupportedModelError: for a ``model_type`` jpeft does not implement (the message lists
        the supported ones) or an option it does not implement (rope types other than
        default/linear/llama3/yarn/longrope/dynamic, cross-attention, relative BERT positions).
      ConfigError: a field of the wrong type (a quoted ``"false"``, a null or quoted number, a
        fraction where a count is expected).
    """
    mt = d.get("model_type")
    if mt not in FAMILIES:
        raise UnsupportedModelError(
            f"model_type {mt!r} is not supported; jpeft.models implements {supported_model_types()}. "
            "Check config.json's model_type, or load the model with transformers instead."
        )
    other = _OTHER_HEADS if mt == "bert" else _DECODER_OTHER_HEADS
    heads = [a for a in (d.get("architectures") or []) if isinstance(a, str) and a.endswith(other)]
    if heads:
        fix = ("Load the encoder from a checkpoint of a supported head (or BertModel)" if mt == "bert"
               else "jpeft's decoders are causal language models only: load a causal-LM checkpoint")
        raise UnsupportedModelError(
            f"config.json's architectures names {heads[0]!r}: a head jpeft.models does not implement (it implements "
            f"{FAMILIES[mt].model_cls.__name__}, whose head would be applied where that model's head is). "
            f"{fix}, or use transformers."
        )
    param_dtype = dtype if param_dtype is None else param_dtype
    try:
        return FAMILIES[mt].config_from_hf(d, dtype, param_dtype)
    except KeyError as e:
        raise LoadError(f"config.json of a {mt!r} model lacks the field {e.args[0]!r}; re-save it with transformers.") from None


def model_from_config(config) -> nn.Module:
    """The jpeft module for a jpeft config (``LlamaConfig`` -> ``LlamaForCausalLM``, ...)."""
    if isinstance(config, LlamaConfig):
        return LlamaForCausalLM(config)
    if isinstance(config, GPT2Config):
        return GPT2LMHeadModel(config)
    if isinstance(config, BertConfig):
        return _BERT_TASK_MODELS[config.task](config)
    raise UnsupportedModelError(f"no jpeft model for a config of type {type(config).__name__}.")


def _family_of(config) -> Family:
    return FAMILIES[config.model_type]


# -- weight files ------------------------------------------------------------------------------------

def weight_files(path: str) -> tuple[list[str], Optional[dict]]:
    """``(files, weight_map)`` of a folder: ``model.safetensors`` when present, else the sharded
    index, in transformers' order (a folder holding both, such as one an unsharded save wrote over
    a sharded checkpoint, gives the same model in both libraries).

    Raises:
      LoadError: no safetensors weights (UnsafeFileError when only pickle ``.bin`` files are there).
    """
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index) and not os.path.isfile(single):
        wm = read_json(index, what="model.safetensors.index.json").get("weight_map")
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise CheckpointError(f"{index!r} is malformed; it must hold a 'weight_map' object of file names.")
        files = sorted(set(wm.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise CheckpointError(
                f"the sharded checkpoint {path!r} lists shards that are not there: {missing[:5]}. Copy all shards "
                "named in model.safetensors.index.json."
            )
        return [os.path.join(path, f) for f in files], wm
    if os.path.isfile(single):
        return [single], None
    others = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if others:
        return [os.path.join(path, f) for f in others], None
    pickles = sorted(f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
    if pickles:
        raise UnsafeFileError(
            f"{path!r} holds only pickle weights {pickles[:5]}; jpeft reads safetensors only, because unpickling "
            "can run arbitrary code. Convert once with transformers: "
            "AutoModel.from_pretrained(path).save_pretrained(path, safe_serialization=True)."
        )
    raise LoadError(
        f"{path!r} has config.json but no weights: expected model.safetensors or model.safetensors.index.json "
        f"with its shards (found: {sorted(os.listdir(path))[:10]})."
    )


def weights_fingerprint(folder: str) -> str:
    """SHA-256 of a model folder's weights as tensors: each tensor's name, dtype, shape and a
    sample of its bytes (the first, middle and last 64), so the same weights sharded or named
    into other files give the same value and another model of the same architecture (another
    fine-tune, other random weights) almost surely not. Reads the safetensors headers and a few
    bytes per tensor, not the weights."""
    h = hashlib.sha256()
    found = []
    for f in weight_files(folder)[0]:
        index = safetensors_index(f)[0]
        found += [(name, f, e) for name, e in index.items()]
    for name, f, (dt, shape, off, nbytes) in sorted(found, key=lambda x: x[0]):
        h.update(json.dumps([name, dt.str, list(shape)]).encode())
        fd = os.open(f, os.O_RDONLY)
        try:
            for at in sorted({0, max(0, nbytes // 2 - 32), max(0, nbytes - 64)}):
                h.update(os.pread(fd, min(64, nbytes - at), off + at))
        finally:
            os.close(fd)
    return h.hexdigest()


def _open(fname: str):

    os.close(open_regular(fname, what="weights file"))  # a FIFO or /dev/zero would block or stream forever
    try:
        return safe_open(fname, framework="flax")
    except Exception as e:  # SafetensorError, OSError
        raise CheckpointError(
            f"cannot read {fname!r}: {e}. The file is truncated or corrupted (an interrupted download or copy?); "
            "copy it again."
        ) from None


# -- the parameter <-> checkpoint-key map ------------------------------------------------------------

_PARAM_TO_HF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}


def hf_key_map(params_shape, family: Family) -> dict[str, tuple[tuple, str, bool]]:
    """``{hf_key: (tree_path, module_path, transposed)}`` for every parameter leaf."""
    out = {}
    for kp, leaf in jax.tree_util.tree_flatten_with_path(params_shape)[0]:
        keys = tuple(str(k.key) for k in kp)
        mpath = "/".join(keys[:-1])
        pname = keys[-1]
        hf = hf_name(mpath) + "." + _PARAM_TO_HF[pname]
        transposed = pname == "kernel" and not family.untransposed(mpath)
        out[hf] = (keys, mpath, transposed, tuple(leaf.shape))
    return out


def _normalise_key(k: str, add_prefix: Optional[str]) -> str:
    if k.endswith(".gamma"):
        k = k[: -len(".gamma")] + ".weight"
    elif k.endswith(".beta"):
        k = k[: -len(".beta")] + ".bias"
    if add_prefix and not k.startswith(add_prefix + ".") and not k.startswith(("lm_head.", "classifier.", "qa_outputs.", "cls.")):
        k = add_prefix + "." + k
    return k


def _set(tree: dict, keys: tuple, value):
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value


def from_pretrained(path: str, dtype=jnp.float32, *, param_dtype=None, key=None, mesh=None, rules=None,
                    api: str = "linen", quantize: Optional[quant.Scheme] = None, **config_overrides):
    """Loads a local Hugging Face checkpoint folder into a jpeft model.

    Args:
      path: a folder with ``config.json`` and ``model.safetensors`` (or
        ``model.safetensors.index.json`` and its shards).
      dtype: compute dtype, and the dtype the weights are stored in (``jnp.bfloat16`` halves
        the memory).
      param_dtype: dtype of the loaded parameters when it should differ from ``dtype``.
      key: ``jax.random`` key for task-head parameters a checkpoint may lack (BERT's
        ``classifier`` and ``pooler``, freshly initialised with a warning, as transformers does).
      mesh: a :class:`jax.sharding.Mesh` (:func:`jpeft.make_mesh`): every weight is placed
        directly in its final sharding (:func:`jpeft.param_shardings` with ``rules``), and
        each process reads from the safetensors files only the byte ranges of the shards its
        devices hold, so no process ever holds the whole model (also for a layer-scanned
        model, whose stacked leaves are filled layer by layer, and for sharded folders).
      rules: ``[(regex, spec), ...]`` for :func:`jpeft.param_specs` (with ``mesh``).
      api: ``"linen"`` (default) or ``"nnx"``: the Llama family as ``flax.nnx`` modules
        (:mod:`jpeft.models.llama_nnx`; same weights, same module paths, so the same adapters).
      quantize: ``"nf4"``, ``"int8"`` or ``"fp8"``: the linear kernels are quantized as they
        are read, one tensor at a time (as :func:`jpeft.quantize` would quantize them; the
        LM head, embeddings and norms stay in ``param_dtype``), so host and device memory
        stay near the quantized model's size plus one tensor. With ``mesh``: each process
        reads only the float blocks its devices' quantized shards are made of and quantizes
        them there (:func:`jpeft.quant.quantize_sharded`), into the layout
        :func:`jpeft.shard_params` gives the quantized tree, bit for bit the same values.
      **config_overrides: fields of the jpeft config to change (``remat=True``,
        ``scan_layers=True`` for a layer-scanned Llama whose weights are stacked per layer, ...).

    Returns:
      ``(model, params)`` with ``params = {"params": ...}``: ``model.apply(params, input_ids,
      attention_mask=None)`` gives the logits and ``jpeft.apply(model, params, adapter,
      input_ids)`` the adapted ones. With ``api="nnx"``: ``(graphdef, state)`` (``nnx.split``
      of the NNX model): ``nnx.merge(graphdef, state)(input_ids)`` gives the logits and
      ``jpeft.apply(graphdef, state, adapter, input_ids)`` the adapted ones.

    Raises:
      LoadError: no folder, no config.json or no weights (``UnsafeFileError`` for pickle-only).
      UnsupportedModelError: unsupported ``model_type`` (the supported ones are listed), or a
        pre-quantized checkpoint (``quantization_config`` in ``config.json``).
      WeightShapeError: a weight's shape disagrees with the config.
      CheckpointError: a truncated/corrupted file, missing or unexpected weights.
      ConfigError: ``dtype`` not one of float32, bfloat16, float16 or float64 (or its name), or
        ``param_dtype`` not a floating dtype (an int8 base loads with ``quantize="int8"``).
    """
    if api not in ("linen", "nnx"):
        raise ConfigError(f"from_pretrained: api must be 'linen' or 'nnx', found {api!r}.")
    if key is not None:
        check_key(key, where="from_pretrained")
    if quantize is not None and quantize not in quant.SCHEMES:
        raise QuantizationError(f"from_pretrained(quantize={quantize!r}): expected one of {list(quant.SCHEMES)} or None.")
    if quantize is not None and api == "nnx":
        raise QuantizationError(
            "from_pretrained(quantize=..., api='nnx') is not supported: quantized bases are linen trees; "
            "load with api='linen' to quantize."
        )
    d = read_config(path)
    _refuse_prequantized(path, d)
    try:
        cfg = config_from_hf(d, dtype, param_dtype)
    except (TypeError, ValueError, OverflowError, ZeroDivisionError) as e:
        if isinstance(e, JpeftError):
            raise
        raise LoadError(f"{path!r}: config.json holds an invalid value ({type(e).__name__}: {e}); re-save the checkpoint.") from None
    if config_overrides:
        unknown = sorted(set(config_overrides) - {f.name for f in dataclasses.fields(cfg)})
        if unknown:
            raise ConfigError(
                f"from_pretrained: {unknown} are not fields of {type(cfg).__name__}; the overrides it takes are "
                f"{sorted(f.name for f in dataclasses.fields(cfg))}."
            )
        file_tied = bool(getattr(cfg, "tie_word_embeddings", False))
        cfg = cfg.replace(**config_overrides)
        # tie_word_embeddings=False on a tied checkpoint: lm_head starts as a copy of the embedding (same logits)
        untie = file_tied and not getattr(cfg, "tie_word_embeddings", False)
    else:
        untie = False
    if api == "nnx" and not isinstance(cfg, LlamaConfig):
        raise UnsupportedModelError(
            f"{path!r} is a {cfg.model_type} model; jpeft's NNX models are the Llama family (llama, mistral, qwen2, "
            "qwen3). Load it with api='linen'."
        )
    if api == "nnx":
        from jpeft.models import llama_nnx  # flax.nnx: for api="nnx" only (docs/ARCHITECTURE.md, "Start-up time")

        llama_nnx.check_config(cfg)
    fam = _family_of(cfg)
    model = model_from_config(cfg)
    scanned = bool(getattr(cfg, "scan_layers", False))
    # A layer-scanned model is read into the unrolled layout (one tensor per layer, as the
    # checkpoint stores them) and stacked afterwards, one parameter at a time.
    read_model = model_from_config(cfg.replace(scan_layers=False)) if scanned else model
    files, _ = weight_files(path)

    dummy = _example_ids(model)
    shapes = jax.eval_shape(lambda k: read_model.init(k, dummy), jax.random.key(0))["params"]
    expected = hf_key_map(shapes, fam)

    placer = None
    if mesh is not None:
        final = shapes if not scanned else jax.eval_shape(lambda k: model.init(k, dummy), jax.random.key(0))["params"]
        placer = _ShardedPlacer(final, mesh, rules, scanned, quantize)
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(_open(f)) for f in files]
        params, fresh = _read_weights(path, cfg, fam, expected, handles, files, placer, quantize, untie)
    if fresh:
        warnings.warn(
            f"{path!r} has no weights for {sorted({expected[k][1] for k in fresh})}; they are freshly initialised "
            "(train them, e.g. as a task head).",
            stacklevel=2,
        )
        fresh_keys = [expected[k][0] for k in fresh]

        def pick(k):  # only the missing leaves are computed (the rest of init is dead code under jit)
            full = read_model.init(k, dummy)["params"]
            out = []
            for tree_keys in fresh_keys:
                node = full
                for c in tree_keys:
                    node = node[c]
                out.append(node)
            return out

        for tree_keys, value in zip(fresh_keys, jax.jit(pick)(jax.random.key(0) if key is None else key)):
            value = value.astype(cfg.param_dtype)
            if placer is None and quantize is not None and quant.selects("/".join(tree_keys[:-1]), tree_keys[-1], value):
                value = quant.quantize_array(value, quantize, "/".join(tree_keys))  # as jpeft.quantize would
            _set(params, tree_keys, value if placer is None else placer.place_fresh(tree_keys, value))
    _hostmem.release()  # the per-tensor host copies are gone; hand their pages back
    if placer is not None:
        params = placer.finish(params)
    elif scanned:
        params = stack_params(params, consume=True)
    if api == "nnx":
        return llama_nnx.from_params(cfg, params)
    return model, {"params": params}


def _refuse_prequantized(path, d: Mapping[str, Any]) -> None:
    """A ``config.json`` with a ``quantization_config`` (bitsandbytes, GPTQ, AWQ, fp8, ...
    checkpoints): its weights are stored quantized, with extra tensors (scales, quant states),
    and transformers quantizes even full-precision weights under it on load. jpeft reads
    full-precision safetensors only; such folders were refused as weights that "do not match
    their config.json", which did not say why."""
    qc = d.get("quantization_config")
    if not qc:
        return
    method = qc.get("quant_method") if isinstance(qc, Mapping) else None
    raise UnsupportedModelError(
        f"config.json in {path!r} has a quantization_config (quant_method {method!r}): a pre-quantized checkpoint, "
        "whose weights transformers loads through that quantization backend. jpeft.models reads full-precision "
        "(float32/bfloat16/float16) safetensors. Load the unquantized model and quantize it while reading, "
        "from_pretrained(path, quantize='nf4') (or 'int8', 'fp8'); or, for weights that are in fact full "
        "precision, remove quantization_config from config.json."
    )


def _check_stored_head_is_tied(path, where, spread: bool = False) -> None:
    """A config that ties the output projection to the embedding, with an ``lm_head.weight`` in
    the file too: jpeft's model has no head of its own, so the stored one must be the embedding
    (a copy, as some exporters write). A different one (a fine-tune or an FSDP export that untied
    the head and left the config alone) is what transformers 5 then uses, untied: refused. The two
    are compared :data:`_COMPARE_BYTES` of rows at a time, so the check holds two such blocks, not
    two whole vocabulary tables. ``spread``: a load every process of a multi-process job takes part
    in (a mesh across processes): each process compares its own share of the rows, and one small
    gather tells every process whether all shares were equal, so each reads 1/processes of both
    tables and all reach the same decision (and the same error)."""
    emb = [k for k in where if k.endswith((".embed_tokens.weight", ".wte.weight"))]
    if not emb:
        return
    share = (jax.process_index(), jax.process_count()) if spread else None
    same = _same_tensor(where["lm_head.weight"], where[emb[0]], share)
    if spread:
        same = bool(np.all(distributed.allgather(np.int32(same))))
    if same:
        return
    raise CheckpointError(
        f"config.json in {path!r} says tie_word_embeddings=true, but the weights also hold an lm_head.weight that "
        f"differs from {emb[0]}: the head was trained (or exported) untied. transformers then uses the stored head; "
        "jpeft's tied model would compute logits with the embedding instead. Set \"tie_word_embeddings\": false in "
        "config.json to load the head as it is stored."
    )


_COMPARE_BYTES = 16 << 20  # the most bytes of one tensor _same_tensor holds at a time


def _same_tensor(a, b, share: Optional[tuple] = None) -> bool:
    """Whether two stored tensors, ``(name, handle, file)`` as :func:`_read_weights` finds them,
    have the same shape and values, read (:func:`_read_slice`) and compared a block of at most
    :data:`_COMPARE_BYTES` of leading-axis rows at a time: reading both whole (safetensors'
    ``get_tensor``: memory-mapped pages and a JAX copy of each) would hold several copies of a
    vocabulary table on every process's host, where a sharded load holds a fraction of one.
    ``share``: ``(index, count)``: only the ``index``-th of ``count`` contiguous parts of the rows."""
    (ra, _, fa), (rb, _, fb) = a, b
    sa, sb = safetensors_index(fa)[0], safetensors_index(fb)[0]
    shape = tuple(int(d) for d in sa[ra][1])
    if shape != tuple(int(d) for d in sb[rb][1]):
        return False
    if not shape:
        return bool(np.array_equal(_read_slice(fa, ra, sa, ()), _read_slice(fb, rb, sb, ())))
    row = int(np.prod(shape[1:], dtype=np.int64)) * max(np.dtype(sa[ra][0]).itemsize, np.dtype(sb[rb][0]).itemsize)
    step = max(1, _COMPARE_BYTES // max(row, 1))
    first, end = (0, shape[0]) if share is None else (shape[0] * share[0] // share[1], shape[0] * (share[0] + 1) // share[1])
    for start in range(first, end, step):
        rows = (slice(start, min(start + step, end)),)
        if not np.array_equal(_read_slice(fa, ra, sa, rows), _read_slice(fb, rb, sb, rows)):
            return False
    return True


def _read_weights(path, cfg, fam, expected, handles, files, placer=None, quantize=None, untie=False):
    """Checks every name and shape from the headers, then reads tensor by tensor (with a
    ``placer``: only the slices of the shards this process holds). ``untie``: the checkpoint ties
    its head to the embedding and ``cfg`` does not, so a missing ``lm_head.weight`` is read from
    the embedding (an untied head that starts equal to the tied one)."""
    raw_keys = {}
    for h, fname in zip(handles, files):
        for k in h.keys():
            raw_keys[k] = (h, fname)
    has_prefix = any(k.startswith(fam.base_prefix + ".") for k in raw_keys)
    where = {}
    for k, v in raw_keys.items():
        where[_normalise_key(k, None if has_prefix else fam.base_prefix)] = (k, *v)
    tied = getattr(cfg, "tie_word_embeddings", False)
    emb_key = f"{fam.base_prefix}.{getattr(fam.model_cls, 'embed_name', '')}.weight"
    if tied and "lm_head.weight" in where and emb_key in expected and emb_key not in where:
        # a tied tensor stored under the head's name only (safetensors' save_model keeps the first
        # of the shared names, "lm_head.weight"): transformers reads it as the embedding too
        where[emb_key] = where["lm_head.weight"]
    elif tied and "lm_head.weight" in where:
        _check_stored_head_is_tied(path, where, placer is not None and placer.across_processes)
    if untie and "lm_head.weight" in expected and "lm_head.weight" not in where and emb_key in where:
        where["lm_head.weight"] = where[emb_key]
    ignored = [re.compile(p) for p in fam.ignored] + ([re.compile(r"lm_head\.weight")] if tied else [])
    unexpected = sorted(k for k in where if k not in expected and not any(p.fullmatch(k) for p in ignored))
    missing = sorted(k for k in expected if k not in where)
    fresh = [k for k in missing if any(re.fullmatch(p, expected[k][1]) for p in fam.fresh)]
    missing = [k for k in missing if k not in fresh]
    if missing or unexpected:
        raise CheckpointError(
            f"the weights in {path!r} do not match its config.json ({cfg.model_type}, {cfg.num_layers} layers): "
            f"missing {len(missing)} weights {missing[:6]}, unexpected {len(unexpected)} {unexpected[:6]}. "
            "Is config.json from the same model as the weights?"
        )
    for k, (tree_keys, mpath, transposed, shape) in expected.items():
        if k in fresh:
            continue
        raw, h, fname = where[k]
        file_shape = tuple(h.get_slice(raw).get_shape())
        want = tuple(reversed(shape)) if transposed else shape
        if file_shape != want:
            raise WeightShapeError(
                f"weight {raw!r} in {os.path.basename(fname)} has shape {file_shape}, but config.json implies {want} "
                f"for module {mpath!r}. The config and the weights come from different models; fix config.json."
            )

    pdt = np.dtype(cfg.param_dtype)
    params: dict = {}
    headers: dict = {}
    for k, (tree_keys, mpath, transposed, shape) in expected.items():
        if k in fresh:
            continue
        raw, h, fname = where[k]
        if fname not in headers:
            headers[fname] = safetensors_index(fname)[0]
        if placer is not None:
            placer.add(tree_keys, fname, raw, headers[fname], transposed, shape)
            continue
        t = _read_tensor(fname, raw, headers[fname])
        # Transpose and cast on the host, then one copy into a JAX buffer: the file is read
        # with plain reads (not memory-mapped, so its pages never count as this process's
        # memory) and each tensor's host copy is released before the next is read.
        if transposed:
            t = np.ascontiguousarray(t.T)
        if t.dtype != pdt:
            t = t.astype(pdt)
        value = jax.device_put(t)
        del t
        if quantize is not None and quant.selects("/".join(tree_keys[:-1]), tree_keys[-1], value):
            value = quant.quantize_array(value, quantize, "/".join(tree_keys))
        _set(params, tree_keys, value)
        del value
    return params, fresh


def _read_slice(fname: str, name: str, spans: dict, index: tuple) -> np.ndarray:
    """``tensor[index]`` of a row-major safetensors tensor, reading only the bytes of that
    block: one read per contiguous run (the runs span the dimensions after the last one the
    index cuts; the dimensions before it are walked). Unbuffered: a buffered file reads a
    whole buffer (4-8 KiB) at every seek, so a column block of a kernel split over 8 or more
    devices (runs of 1 KiB) read 4x its bytes, up to the whole tensor."""
    dt, shape, offset, nbytes = spans[name]
    shape = tuple(int(d) for d in shape)
    ranges = [range(*sl.indices(n)) for sl, n in zip(tuple(index) + (slice(None),) * (len(shape) - len(index)), shape)]
    if any(r.step != 1 for r in ranges):
        raise CheckpointError(f"a shard of {name!r} is a strided slice {index}; shards are contiguous blocks.")
    out = np.empty(tuple(len(r) for r in ranges), dt)
    if out.size == 0:
        return out
    cut = max([i for i, (r, n) in enumerate(zip(ranges, shape)) if len(r) != n], default=0)
    itemsize = np.dtype(dt).itemsize
    strides = [int(np.prod(shape[i + 1:], dtype=np.int64)) * itemsize for i in range(len(shape))]
    run = len(ranges[cut]) * strides[cut] if shape else itemsize
    view = memoryview(out.reshape(-1).view(np.uint8))
    pos = 0
    try:
        with open(fname, "rb", buffering=0) as f:
            for lead in itertools.product(*ranges[:cut]):
                start = offset + sum(i * st for i, st in zip(lead, strides)) + (ranges[cut].start * strides[cut] if shape else 0)
                f.seek(start)
                got = 0
                while got < run:  # a raw read may return less than asked (over 2 GiB at once on Linux)
                    n = f.readinto(view[pos + got:pos + run])
                    if not n:
                        break
                    got += n
                if got != run:
                    raise CheckpointError(
                        f"{fname!r} is truncated: tensor {name!r} needs {run:,} bytes at offset {start:,}, the file has "
                        f"{got:,}. Copy it again.")
                pos += run
    except OSError as e:
        raise CheckpointError(f"cannot read tensor {name!r} from {fname!r}: {e}. The file is corrupted; copy it again.") from None
    return out


class _ShardedPlacer:
    """Builds every parameter as a global ``jax.Array`` in its final sharding, each shard
    read from the file by the process whose device holds it (``jax.make_array_from_callback``
    asks only for this process's shards). A layer-scanned leaf is assembled from the
    per-layer tensors of the checkpoint, each read only for the shard's block."""

    def __init__(self, final_shapes, mesh, rules, scanned: bool, quantize: Optional[quant.Scheme] = None):
        self.scanned = scanned
        self.shapes = final_shapes
        self.quantize = quantize
        # a mesh over several processes: every process of the job takes part in this load
        self.across_processes = any(d.process_index != jax.process_index() for d in np.asarray(mesh.devices).flat)
        if quantize is not None:  # the quantized tree's specs, as jpeft.shard_params would give the quantized base
            final_shapes = jax.tree_util.tree_map_with_path(
                lambda kp, x: quant.abstract_quantized(x, quantize) if quant.selects(
                    "/".join(str(k.key) for k in kp[:-1]), str(kp[-1].key), x) else x, final_shapes)
        self.shardings = param_shardings(final_shapes, mesh, rules, stacked=r".*layers/.*" if scanned else None)
        self.sources: dict = {}  # final tree path -> [(fname, raw, spans, transposed)] (one per layer if stacked)

    def _final_keys(self, tree_keys):
        if not self.scanned:
            return tree_keys, None
        out, layer = [], None
        for k in tree_keys:
            m = re.fullmatch(r"layers_(\d+)", k)
            if m:
                layer = int(m.group(1))
                k = "layers"
            out.append(k)
        return tuple(out), layer

    def _get(self, tree, keys):
        for k in keys:
            tree = tree[k]
        return tree

    def add(self, tree_keys, fname, raw, spans, transposed, shape):
        keys, layer = self._final_keys(tree_keys)
        self.sources.setdefault(keys, {})[layer] = (fname, raw, spans, transposed)

    def place_fresh(self, tree_keys, value):
        keys, layer = self._final_keys(tree_keys)
        if layer is not None:
            raise CheckpointError(f"a layer-scanned model cannot initialise the missing weight {'/'.join(tree_keys)}.")
        sharding = self._get(self.shardings, keys)
        if quant.is_quantized(sharding):
            value = quant.quantize_array(value, self.quantize, "/".join(keys))
            return jax.tree.map(put_leaf, value, sharding)
        return put_leaf(value, sharding)

    def _read(self, src, index, dtype):
        fname, raw, spans, transposed = src
        file_index = tuple(reversed(index)) if transposed else index
        t = _read_slice(fname, raw, spans, file_index)
        if transposed:
            t = np.ascontiguousarray(t.T)
        return t.astype(dtype, copy=False)

    def finish(self, params):
        for keys, srcs in self.sources.items():
            leaf = self._get(self.shapes, keys)
            dtype = np.dtype(leaf.dtype)
            sharding = self._get(self.shardings, keys)
            if None in srcs:
                cb = lambda index, src=srcs[None]: self._read(src, index, dtype)
            else:
                def cb(index, srcs=srcs, n=leaf.shape[0]):
                    layers = range(*index[0].indices(n))
                    return np.stack([self._read(srcs[i], tuple(index[1:]), dtype) for i in layers])
            if quant.is_quantized(sharding):  # read and quantized shard by shard (quant.quantize_sharded)
                value = quant.quantize_sharded(cb, tuple(leaf.shape), dtype, sharding, self.quantize, "/".join(keys))
            else:
                value = jax.make_array_from_callback(tuple(leaf.shape), sharding, cb)
            _set(params, keys, value)
            _hostmem.release()
        return params


def _read_tensor(fname: str, name: str, spans: dict) -> np.ndarray:
    dt, shape, offset, nbytes = spans[name]
    buf = np.empty(shape, dt)
    try:
        with open(fname, "rb") as f:
            f.seek(offset)
            got = f.readinto(memoryview(buf.reshape(-1).view(np.uint8)))
    except OSError as e:
        raise CheckpointError(f"cannot read tensor {name!r} from {fname!r}: {e}. The file is corrupted; copy it again.") from None
    if got != nbytes:
        raise CheckpointError(
            f"{fname!r} is truncated: tensor {name!r} needs {nbytes:,} bytes at offset {offset:,}, the file has {got:,}. "
            "Copy it again."
        )
    return buf


def load_tokenizer(path: str, **kwargs):
    """``transformers.AutoTokenizer.from_pretrained(path, **kwargs)`` on a local folder (never
    downloads).

    Raises:
      LoadError: the folder has no tokenizer files, or they do not load (a malformed ``tokenizer.json``).
    """
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise LoadError(f"{path!r} is not a folder; pass the local checkpoint folder holding the tokenizer files.")
    kwargs.setdefault("local_files_only", True)
    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except Exception as e:  # a malformed tokenizer.json ({}, null, a wrong "model") raises a KeyError,
        # TypeError or AttributeError in transformers, or the tokenizers library's bare Exception
        why = " ".join(str(e).split())[:400]  # transformers' message runs over lines ("... from one of: \n(1) ...")
        if not isinstance(e, (OSError, ValueError)):
            why = f"{type(e).__name__}: {why}"
        if not any(n.startswith(("tokenizer", "vocab", "spiece", "sentencepiece", "tekken")) or
                   n.endswith((".model", ".tiktoken")) for n in os.listdir(path)):
            # transformers then asks for sentencepiece or tiktoken to convert a slow tokenizer there is none of
            why = "it holds no tokenizer file: no tokenizer.json, tokenizer_config.json, tokenizer.model or vocab file"
        raise LoadError(
            f"no usable tokenizer in {path!r} ({why}). Save one there with "
            "tokenizer.save_pretrained(path)."
        ) from None


# -- saving ---------------------------------------------------------------------------------------------

def config_to_hf(config) -> dict:
    """The Hugging Face ``config.json`` dict of a jpeft model config (inverse of
    :func:`config_from_hf` for the fields jpeft models use).

    Raises:
      UnsupportedModelError: a config Hugging Face's class for its ``model_type`` cannot express
        (e.g. a Llama with q/k/v bias but no o_proj bias: use ``model_type="qwen2"``).
    """
    tokens = {k: getattr(config, k, None) for k in _TOKEN_IDS}
    if isinstance(tokens["eos_token_id"], tuple):
        tokens["eos_token_id"] = list(tokens["eos_token_id"])
    dtype_name = jnp.dtype(config.param_dtype).name
    if isinstance(config, LlamaConfig):
        mt = config.model_type
        cls = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM"}.get(mt)
        if cls is None:
            raise UnsupportedModelError(f"LlamaConfig.model_type must be llama, mistral, qwen2 or qwen3, found {mt!r}.")
        if config.qk_norm != (mt == "qwen3"):
            raise UnsupportedModelError(
                f"a {mt} checkpoint {'always has' if mt == 'qwen3' else 'cannot express'} q_norm/k_norm, but this "
                f"config has qk_norm={config.qk_norm}. Use model_type='qwen3' with qk_norm=True "
                "(jpeft.models.Qwen3Config) for per-head query/key norms, and qk_norm=False for the other families.")
        rope = {"rope_type": "default", "rope_theta": float(config.rope_theta)}
        if config.rope_scaling:
            rope.update(dict(config.rope_scaling))
        d = dict(
            model_type=mt, architectures=[cls], vocab_size=config.vocab_size, hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim,
            max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
            hidden_act=config.hidden_act, rope_parameters=rope, rope_theta=float(config.rope_theta),
            tie_word_embeddings=config.tie_word_embeddings, initializer_range=config.initializer_range,
            attention_dropout=config.attention_dropout, dtype=dtype_name, **tokens,
        )
        bias = (config.attention_bias, config.attention_out_bias, config.mlp_bias)
        if mt in ("llama", "qwen3"):
            if config.attention_bias != config.attention_out_bias:
                raise UnsupportedModelError(
                    f"a {cls[:-len('ForCausalLM')]} checkpoint has one attention_bias flag for q/k/v/o; this config "
                    f"differs between q/k/v ({config.attention_bias}) and o_proj ({config.attention_out_bias}). Use "
                    "model_type='qwen2' for q/k/v bias only."
                )
            if mt == "qwen3" and config.mlp_bias:
                raise UnsupportedModelError("Qwen3 has no MLP bias; this config sets mlp_bias=True.")
            d.update(attention_bias=config.attention_bias)
            if mt == "llama":
                d.update(mlp_bias=config.mlp_bias)
        elif mt == "mistral" and any(bias):
            raise UnsupportedModelError("Mistral has no biases; this config sets attention_bias/mlp_bias.")
        elif mt == "qwen2" and bias != (True, False, False):
            raise UnsupportedModelError("Qwen2 has q/k/v bias only; set attention_bias=True and no other bias.")
        if mt == "mistral":
            d["sliding_window"] = config.sliding_window
            if config.layer_types is not None:  # per-layer windows: Ministral to transformers' AutoConfig
                d["layer_types"] = list(config.layer_types)
        elif config.sliding_window is not None:
            if mt not in ("qwen2", "qwen3"):
                raise UnsupportedModelError(
                    "a Llama checkpoint cannot express sliding_window; use mistral, qwen2 or qwen3.")
            d.update(use_sliding_window=True, sliding_window=config.sliding_window,
                     layer_types=list(config.layer_types or ["sliding_attention"] * config.num_layers),
                     max_window_layers=0)
        elif mt in ("qwen2", "qwen3"):
            d.update(use_sliding_window=False, sliding_window=None)
        return d
    if isinstance(config, GPT2Config):
        return dict(
            model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=config.vocab_size, n_embd=config.hidden_size,
            n_layer=config.num_layers, n_head=config.num_heads, n_inner=config.intermediate_size,
            n_positions=config.max_position_embeddings, layer_norm_epsilon=config.layer_norm_epsilon,
            activation_function=config.hidden_act, scale_attn_weights=config.scale_attn_weights,
            scale_attn_by_inverse_layer_idx=config.scale_attn_by_inverse_layer_idx, embd_pdrop=config.embd_pdrop,
            resid_pdrop=config.resid_pdrop, attn_pdrop=config.attn_pdrop, tie_word_embeddings=config.tie_word_embeddings,
            initializer_range=config.initializer_range, dtype=dtype_name, **tokens,
        )
    if isinstance(config, BertConfig):
        return dict(
            model_type="bert", architectures=[BERT_ARCHITECTURES[config.task]], vocab_size=config.vocab_size,
            hidden_size=config.hidden_size, num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
            intermediate_size=config.intermediate_size, max_position_embeddings=config.max_position_embeddings,
            type_vocab_size=config.type_vocab_size, layer_norm_eps=config.layer_norm_eps, hidden_act=config.hidden_act,
            hidden_dropout_prob=config.hidden_dropout_prob,
            attention_probs_dropout_prob=config.attention_probs_dropout_prob,
            classifier_dropout=config.classifier_dropout,
            id2label={str(i): n for i, n in enumerate(_label_names(config))},
            label2id={n: i for i, n in enumerate(_label_names(config))},
            **({} if config.problem_type is None else {"problem_type": config.problem_type}),
            initializer_range=config.initializer_range, pad_token_id=config.pad_token_id, dtype=dtype_name,
        )
    raise UnsupportedModelError(f"no Hugging Face config for a {type(config).__name__}.")


def example_shape(model, seq: int = 1) -> tuple:
    """The shape of token ids ``model`` takes, one row of ``seq`` tokens, to build its params:
    ``(1, seq)``, or ``(1, 1, seq)`` for BERT's multiple-choice head (``[batch, choices, seq]``)."""
    return (1, 1, seq) if isinstance(model, BertForMultipleChoice) else (1, seq)


def _example_ids(model):
    return jnp.zeros(example_shape(model), jnp.int32)


def _check_params_fit(config, inner) -> None:
    """Raises before anything is written when ``inner`` is not the parameter tree of ``config``'s
    (unscanned) model: a missing layer, a stray leaf or a resized tensor would otherwise be
    written under a config.json that does not describe it (transformers then refuses the folder,
    or re-initialises the missing weights with only a load report)."""
    model = model_from_config(config.replace(scan_layers=False) if getattr(config, "scan_layers", False) else config)
    want = jax.eval_shape(lambda k: model.init(k, _example_ids(model)), jax.random.key(0))["params"]

    def flat(tree):
        return {path_str(kp): tuple(getattr(leaf, "shape", ()))
                for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}

    want, got = flat(want), flat(jax.eval_shape(lambda: inner))
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or unexpected:
        raise CheckpointError(
            f"save_pretrained: the params are not those of this {config.model_type} model ({config.num_layers} "
            f"layers): missing {len(missing)} {missing[:6]}, unexpected {len(unexpected)} {unexpected[:6]}. Pass "
            "the params of this model (jpeft.merge(params, adapter) for a trained adapter), or build the model from "
            "a config that matches them; nothing was written."
        )
    for k in want:
        if want[k] != got[k]:
            raise WeightShapeError(
                f"save_pretrained: parameter {k!r} has shape {got[k]}, but the model's config implies {want[k]}; "
                "config.json would not describe the weights. Save with a config that matches them (e.g. "
                "model.config.replace(vocab_size=...) after resizing the embedding); nothing was written."
            )


def _label_names(config) -> tuple:
    return config.label_names or tuple(f"LABEL_{i}" for i in range(config.num_labels))


def save_pretrained(path: str, model: nn.Module, params) -> None:
    """Writes ``model``/``params`` as a Hugging Face checkpoint folder (``config.json`` +
    ``model.safetensors``) that ``transformers``' ``from_pretrained`` and
    :func:`from_pretrained` load. Use it to serve a merged model
    (``jpeft.merge(params, adapter)``) in a PyTorch stack, or to hand a model trained from
    scratch in JAX to transformers. Tensors keep the parameters' dtype.

    Raises:
      UnsupportedModelError: the config cannot be expressed as a Hugging Face config.
      CheckpointError / WeightShapeError: ``params`` are not the parameters of ``model``'s
        config (missing or extra leaves, another shape); raised before anything is written.
      SaveError: writing failed.
    """
    config = model.config
    if isinstance(config, BertConfig) and getattr(model, "task", config.task) != config.task:
        config = config.replace(task=model.task)  # a BERT head built from another task's config: the head's own
    d = config_to_hf(config)
    inner = params["params"] if isinstance(params, Mapping) and "params" in params else params
    inner = quant.dequantize(inner)  # a quantized base is written as the kernels it stands for
    if getattr(config, "scan_layers", False):
        inner = unstack_params(inner)
    _check_params_fit(config, inner)
    try:
        write_weights(path, hf_tensors(inner, _family_of(config)),
                      {"config.json": json.dumps(d, indent=2, sort_keys=True)})
    except OSError as e:
        raise SaveError(f"could not write the checkpoint to {path!r}: {e}. Its previous weights are unchanged.") from None


def hf_tensors(inner, family, dtypes: Optional[Mapping[str, Any]] = None) -> dict:
    """``{Hugging Face name: numpy array}`` of a params tree (transposed to Hugging Face's
    layouts), each cast to ``dtypes[name]`` where given (the dtypes a checkpoint stores)."""
    tensors = {}
    for k, (tree_keys, _mpath, transposed, _shape) in hf_key_map(jax.eval_shape(lambda: inner), family).items():
        node = inner
        for c in tree_keys:
            node = node[c]
        a = np.asarray(jax.device_get(node))
        if dtypes is not None and k in dtypes and a.dtype != dtypes[k]:
            a = a.astype(dtypes[k])
        tensors[k] = np.ascontiguousarray(a.T if transposed else a)
    return tensors


def write_weights(path: str, tensors: Mapping[str, np.ndarray], texts: Optional[Mapping[str, str]] = None,
                  copies: Optional[Mapping[str, str]] = None) -> None:
    """Writes ``model.safetensors`` (and the text files ``texts``, e.g. ``config.json``, and
    copies of the files ``copies`` maps names to, e.g. the base's tokenizer files) into
    ``path``, each under a temporary name renamed into place once all are written, weights
    first, so a failed write leaves the folder's previous checkpoint as it was (a failure or a
    Ctrl-C between the renames puts back the files already replaced, kept under a second hard
    link until all are in place); then removes the
    index and shards of an earlier sharded save there (:func:`stale_shards`; transformers
    removes them too), which would otherwise stand next to the new ``model.safetensors``.
    A folder this call made is removed again when the write fails. ``OSError`` propagates."""
    names = ["model.safetensors", *(texts or {}), *(copies or {})]
    made = not os.path.isdir(path)  # a folder this call makes goes again when the write fails
    os.makedirs(path, exist_ok=True)
    tmp = {name: os.path.join(path, f".{name}.jpeft-tmp") for name in names}
    old = {name: os.path.join(path, f".{name}.jpeft-old") for name in names}
    kept, existed, replaced = {}, set(), []
    try:
        save_file(dict(tensors), tmp["model.safetensors"], metadata={"format": "pt"})
        for name, text in (texts or {}).items():
            with open(tmp[name], "w") as f:
                f.write(text)
        for name, src in (copies or {}).items():
            shutil.copyfile(src, tmp[name])
        stale = stale_shards(path)
        # a second name for each file about to be replaced: a failure (or a Ctrl-C) after the first rename puts
        # them back, so new weights never stay beside the old config.json
        for name in names:
            dst = os.path.join(path, name)
            if os.path.lexists(dst):
                existed.add(name)
                with contextlib.suppress(FileNotFoundError):
                    os.remove(old[name])
                try:
                    if os.path.islink(dst):  # the link itself (a Hub cache snapshot's file), put back as it was
                        os.symlink(os.readlink(dst), old[name])
                    elif os.path.isfile(dst):
                        os.link(dst, old[name])
                    else:
                        continue
                except OSError:  # a file system without hard links: no way back, as before (the new file stays)
                    continue
                kept[name] = old[name]
        for name in names:
            os.replace(tmp[name], os.path.join(path, name))
            replaced.append(name)
    except BaseException:
        for name in reversed(replaced):
            with contextlib.suppress(OSError):
                if name in kept:
                    os.replace(kept.pop(name), os.path.join(path, name))
                elif name not in existed:  # new here: removed; an old file with no second name is not lost
                    os.remove(os.path.join(path, name))
        for t in (*tmp.values(), *kept.values()):
            with contextlib.suppress(OSError):
                os.remove(t)
        if made:
            with contextlib.suppress(OSError):
                os.rmdir(path)  # only when empty: nothing of anyone's is removed
        raise
    for t in kept.values():
        with contextlib.suppress(OSError):
            os.remove(t)
    for f in stale:
        with contextlib.suppress(FileNotFoundError):
            os.remove(f)


def stale_shards(path: str) -> list[str]:
    """``model.safetensors.index.json`` in ``path`` and the ``model-00001-of-00003.safetensors``-style
    shards there (the files an unsharded save replaces)."""
    names = [n for n in os.listdir(path) if re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", n)]
    if os.path.isfile(os.path.join(path, "model.safetensors.index.json")):
        names.append("model.safetensors.index.json")
    return [os.path.join(path, n) for n in sorted(names)]
