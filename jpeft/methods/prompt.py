"""Prompt tuning (Lester et al. 2021) as Hugging Face PEFT does it: ``T`` learned virtual-token
embeddings prepended to the input embeddings.

The adapter is one node at the model's top-level call (path ``""``). It looks the input ids up
in the model's own word-embedding table (found in the params), prepends the virtual tokens and
calls the model with ``inputs_embeds``; the attention mask gets ``T`` leading ones, the
virtual tokens take positions ``0 .. T-1`` and the real tokens ``T, T+1, ...`` (explicit
``position_ids`` for the real tokens are shifted by ``T``; BERT's ``token_type_ids`` get ``T``
leading zeros, as PEFT does). The model needs an ``inputs_embeds`` keyword (jpeft's models
have one).

Outputs are returned *for the real tokens only*: every output array of rank >= 3 whose axis 1
has ``T + n`` entries (logits, hidden states) is cut to its last ``n`` positions, and so is every
rank-2 one of a model whose outputs are all per token (``per_token_outputs``: BERT's
question-answering start and end logits ``[batch, seq]``), so the same loss code works with and
without the adapter. (Hugging Face returns the ``T`` extra positions and pads the labels
instead.) Pooled outputs such as a classifier's logits are unchanged.

Initialisation (``prompt_tuning_init``): ``"RANDOM"`` (standard normal, as PEFT), ``"TEXT"``
(the embeddings of a text's tokens, repeated or cut to ``T``: give ``prompt_tuning_init_text``
and a local ``tokenizer_name_or_path``, or the ids directly as ``init_token_ids``), or
``"SAMPLE_VOCAB"`` (embeddings of ``T`` random vocabulary entries).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, ClassVar, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.config import AdapterConfig
from jpeft import core
from jpeft.errors import (BaseMismatchError, CheckpointError, ConfigError, InputValidationError, NotMergeableError, PromptTooLongError, ShapeMismatchError, UnsupportedAdapterError,
                          UnsupportedModuleError)
from jpeft.peft_format import config_from_peft
from jpeft.methods.base import Call, Method, Site, register_method, static_field
from jpeft.methods.prefix import PrefixWeights, check_token_rows
from jpeft.tree import get_subtree, module_leaves, unwrap_params
from jpeft.validate import position_limit

_INITS = ("RANDOM", "TEXT", "SAMPLE_VOCAB")
_EMBED_NAMES = ("embed_tokens", "wte", "word_embeddings", "embed", "embedding", "token_embedding")


@dataclasses.dataclass(frozen=True)
class PromptTuningConfig(AdapterConfig):
    """Configuration of prompt tuning (Hugging Face PEFT's ``PromptTuningConfig`` keys).

    Args:
      num_virtual_tokens: number ``T`` of virtual tokens.
      prompt_tuning_init: ``"RANDOM"``, ``"TEXT"`` or ``"SAMPLE_VOCAB"``.
      prompt_tuning_init_text: the text for ``"TEXT"``.
      tokenizer_name_or_path: a *local* tokenizer folder for ``"TEXT"`` (nothing is downloaded).
      tokenizer_kwargs: extra arguments for ``AutoTokenizer.from_pretrained`` (``trust_remote_code``
        is dropped, as Hugging Face PEFT drops it: no tokenizer code from the folder is run).
      init_token_ids: jpeft only: the token ids for ``"TEXT"`` (instead of a tokenizer).
      word_embeddings: jpeft only: the module path of the word-embedding table; found in the
        params when ``None`` (``embed_tokens``, ``wte``, ``word_embeddings``, or the only
        ``nn.Embed``).
      token_dim, num_layers, num_attention_heads, num_transformer_submodules: written by
        Hugging Face PEFT; ``token_dim`` is checked against the embedding width, the others are
        informational.
      task_type: Hugging Face PEFT's task type written by :func:`jpeft.hf.save_peft`
        (``None``: ``"CAUSAL_LM"``; use ``"SEQ_CLS"`` for BERT classifiers, ``"TOKEN_CLS"`` and
        ``"QUESTION_ANS"`` for BERT's token-classification and question-answering models). With
        ``"FEATURE_EXTRACTION"`` and ``"QUESTION_ANS"`` ``token_type_ids`` are refused (PEFT drops
        them there).

    >>> from jpeft.methods.prompt import PromptTuningConfig
    >>> c = PromptTuningConfig(num_virtual_tokens=8, prompt_tuning_init="TEXT", init_token_ids=[5, 6])
    >>> PromptTuningConfig.from_dict(c.to_dict()) == c
    True
    """

    peft_type: ClassVar[str] = "PROMPT_TUNING"
    prompt_learning: ClassVar[bool] = True
    # PEFT builds prompt learning only inside a task model: never without a task type
    peft_task_types: ClassVar[Mapping[str, tuple]] = {
        "decoder": ("CAUSAL_LM",), "encoder": ("FEATURE_EXTRACTION", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")}
    packs_documents: ClassVar[bool] = False  # virtual tokens once per row: one token stream per row

    num_virtual_tokens: int = 20
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: Optional[str] = None
    tokenizer_name_or_path: Optional[str] = None
    tokenizer_kwargs: Optional[Mapping[str, Any]] = None
    init_token_ids: Optional[tuple] = None
    word_embeddings: Optional[str] = None
    token_dim: Optional[int] = None
    num_layers: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_transformer_submodules: Optional[int] = 1
    task_type: Optional[str] = None

    @property
    def extra_positions(self) -> int:  # the virtual tokens take positions before the row's
        return int(self.num_virtual_tokens)

    def __post_init__(self):
        t = self.num_virtual_tokens
        if isinstance(t, bool) or not isinstance(t, int) or t <= 0:
            raise ConfigError(f"PromptTuningConfig.num_virtual_tokens must be a positive integer, found {t!r}.")
        init = self.prompt_tuning_init
        init = getattr(init, "value", init)
        if isinstance(init, str):
            init = init.upper()
        object.__setattr__(self, "prompt_tuning_init", init)
        if init not in _INITS:
            raise ConfigError(f"PromptTuningConfig.prompt_tuning_init must be one of {_INITS}, found {self.prompt_tuning_init!r}.")
        if self.init_token_ids is not None:
            ids = self.init_token_ids
            if not isinstance(ids, (list, tuple, np.ndarray)) or not all(
                    isinstance(i, (int, np.integer)) and not isinstance(i, bool) and i >= 0 for i in ids):
                # int() kept 8.5 as 8, True as 1 and read the string "12" as the ids (1, 2)
                raise ConfigError(f"PromptTuningConfig.init_token_ids must be a list of token ids (integers >= 0), "
                                  f"found {type(ids).__name__} {str(ids)[:120]}.")
            ids = tuple(int(i) for i in ids)
            if not ids:
                raise ConfigError("PromptTuningConfig.init_token_ids is empty; give at least one token id.")
            object.__setattr__(self, "init_token_ids", ids)
        if init == "TEXT" and self.init_token_ids is None and not (self.prompt_tuning_init_text and self.tokenizer_name_or_path):
            raise ConfigError(
                "PromptTuningConfig(prompt_tuning_init='TEXT') needs prompt_tuning_init_text and a local "
                "tokenizer_name_or_path, or the token ids as init_token_ids."
            )
        for f in ("token_dim", "num_layers", "num_attention_heads"):  # recorded for PEFT; to_prefix reads num_layers
            if getattr(self, f) is not None and getattr(self, f) <= 0:
                raise ConfigError(f"PromptTuningConfig.{f} must be a positive integer (or None: read from the model), "
                                  f"found {getattr(self, f)!r}.")
        if self.num_transformer_submodules not in (1, None):
            raise ConfigError("prompt tuning supports decoder-only and encoder-only models (num_transformer_submodules=1).")
        if self.tokenizer_kwargs is not None:
            if not isinstance(self.tokenizer_kwargs, Mapping):
                raise ConfigError(f"PromptTuningConfig.tokenizer_kwargs must be a dict of AutoTokenizer.from_pretrained "
                                  f"arguments, found {type(self.tokenizer_kwargs).__name__} {str(self.tokenizer_kwargs)[:80]}.")
            object.__setattr__(self, "tokenizer_kwargs", dict(self.tokenizer_kwargs))

    def __hash__(self):
        return hash((self.num_virtual_tokens, self.prompt_tuning_init, self.prompt_tuning_init_text,
                     self.tokenizer_name_or_path, self.init_token_ids, self.word_embeddings, self.token_dim))

    def to_dict(self):
        d = super().to_dict()
        for k in ("init_token_ids", "word_embeddings"):  # jpeft-only keys: written only when set
            if d.get(k) is None:
                d.pop(k, None)
        return d

    def token_ids(self) -> tuple:
        """The ids whose embeddings start the prompt for ``"TEXT"``, before repeating to ``T``."""
        if self.init_token_ids is not None:
            return self.init_token_ids
        try:
            from transformers import AutoTokenizer
        except ImportError as e:  # pragma: no cover - transformers is a dependency of jpeft
            raise ConfigError("prompt_tuning_init='TEXT' with a tokenizer needs the transformers package; "
                              "or pass init_token_ids.") from e
        kw = dict(self.tokenizer_kwargs or {})
        kw.pop("trust_remote_code", None)  # as PEFT: a config read from an adapter file must not run a folder's code
        kw.setdefault("local_files_only", True)
        tok = AutoTokenizer.from_pretrained(self.tokenizer_name_or_path, **kw)
        return tuple(tok(self.prompt_tuning_init_text)["input_ids"])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PromptWeights(Site):
    """Virtual-token embeddings ``[num_virtual_tokens, hidden]`` prepended at the model's input;
    ``embed_path`` is the params path of the word-embedding table."""

    embedding: jax.Array
    embed_path: str = static_field(default="")
    # jpeft.lm_loss sets this: outputs keep the last virtual token's position (n + 1 positions),
    # whose logits predict the first real token, as Hugging Face PEFT's -100-padded labels do
    keep_last_virtual: bool = static_field(default=False)
    # a task type whose PEFT forward drops token_type_ids (_drops_token_types), so jpeft refuses them instead of
    # giving other outputs than PEFT's
    drops_token_types: bool = static_field(default=False)

    def loss_view(self):
        """Outputs keep the last virtual token (its logits predict the first real token, which
        PEFT's -100-padded labels count)."""
        return dataclasses.replace(self, keep_last_virtual=True), 1

    site: ClassVar[str] = "input"
    mergeable: ClassVar[bool] = False

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.embedding.shape[0])

    def merge(self, module_params):
        raise NotMergeableError(
            "prompt tuning adds input positions; it cannot be folded into the base weights. Serve it with jpeft.apply."
        )

    def intercept(self, call: Call):
        sig = inspect.signature(type(call.module).__call__)
        if "inputs_embeds" not in sig.parameters:
            raise UnsupportedModuleError(
                f"{type(call.module).__name__}.__call__ takes no inputs_embeds keyword, so prompt tuning cannot prepend "
                "virtual tokens. Use one of jpeft.models, or add an inputs_embeds argument to your model."
            )
        bound = sig.bind(None, *call.args, **call.kwargs)
        bound.apply_defaults()
        a = bound.arguments
        if a.get("cache") is not None:
            raise InputValidationError(
                "prompt tuning cannot run with a KV cache: the virtual tokens must be prepended only on the first "
                "(prefill) call. Convert the adapter with jpeft.to_prefix(model, params, adapter), "
                "which runs the virtual tokens once and gives an equivalent prefix-tuning adapter, then generate."
            )
        if a.get("segment_ids") is not None:
            raise InputValidationError(
                "prompt tuning prepends its virtual tokens once per row, so packed documents (segment_ids) cannot "
                "share them; pack one token stream instead (jpeft.data packing='stream'; in `jpeft train`, "
                "[data] packing = \"stream\")."
            )
        check_token_rows(a, call.module, "prompt tuning")
        t = self.num_virtual_tokens
        ids, emb = a.get("input_ids"), a.get("inputs_embeds")
        if emb is None:
            if ids is None:
                raise InputValidationError("prompt tuning: pass input_ids [batch, seq] or inputs_embeds [batch, seq, hidden].")
            table = get_subtree(call.module.variables["params"], self.embed_path)["embedding"]
            if table.shape[-1] != self.embedding.shape[-1]:
                raise ShapeMismatchError(
                    f"the prompt has width {self.embedding.shape[-1]} but the embedding table at {self.embed_path!r} has "
                    f"width {table.shape[-1]}; re-create the adapter for this model."
                )
            emb = jnp.take(table, ids, axis=0)
        b, n = emb.shape[0], emb.shape[1]
        budget = position_limit(getattr(call.module, "config", None))  # None on rotary models, which run past it
        if budget is not None and t + n > budget:
            raise PromptTooLongError(
                f"{t} virtual tokens plus {n} input tokens need {t + n} positions, but the model has "
                f"max_position_embeddings={budget}. Shorten the input to at most {budget - t} tokens or use fewer "
                "virtual tokens."
            )
        prompt = jnp.broadcast_to(self.embedding.astype(emb.dtype)[None], (b, t, emb.shape[-1]))
        a["inputs_embeds"] = jnp.concatenate([prompt, emb], axis=1)
        if "input_ids" in a:
            a["input_ids"] = None
        mask = a.get("attention_mask")
        if mask is not None:
            a["attention_mask"] = jnp.concatenate([jnp.ones((b, t), mask.dtype), mask], axis=1)
        pos = a.get("position_ids")
        if pos is not None:
            lead = jnp.broadcast_to(jnp.arange(t, dtype=pos.dtype)[None], (pos.shape[0], t))
            a["position_ids"] = jnp.concatenate([lead, pos + t], axis=1)
        tt = a.get("token_type_ids")
        if tt is not None and getattr(call.module, "takes_token_type_ids", False):  # a causal LM (GPT-2)
            raise InputValidationError(
                "prompt tuning: token_type_ids cannot be used with a causal language model (Hugging Face PEFT drops "
                "them there with a warning, so the results would differ); pass no token_type_ids."
            )
        if tt is not None and self.drops_token_types:
            raise InputValidationError(
                "prompt tuning: this adapter has task_type='FEATURE_EXTRACTION' or 'QUESTION_ANS', where Hugging Face "
                "PEFT drops token_type_ids (with a warning for FEATURE_EXTRACTION; PeftModelForQuestionAnswering never "
                "passes them on), so jpeft's outputs with them would differ from PEFT's; pass no token_type_ids, or "
                "use task_type='SEQ_CLS' or 'TOKEN_CLS', where PEFT uses them (with T leading zeros) as jpeft does."
            )
        if tt is not None:
            a["token_type_ids"] = jnp.concatenate([jnp.zeros((b, t), tt.dtype), tt], axis=1)
        out = call.next_fun(*bound.args[1:], **bound.kwargs)

        keep = t - 1 if self.keep_last_virtual else t
        # a model whose every output is per token (BERT's start/end logits [batch, seq]) loses the virtual
        # positions of its rank-2 outputs too; elsewhere a rank-2 output is pooled ([batch, labels])
        lowest = 2 if getattr(call.module, "per_token_outputs", False) else 3

        def strip(x):
            if hasattr(x, "ndim") and x.ndim >= lowest and x.shape[1] == t + n:
                return x[:, keep:]
            return x

        return jax.tree.map(strip, out)


def find_embedding(params, path: Optional[str] = None) -> str:
    """The params path of the word-embedding table (see :class:`PromptTuningConfig`)."""
    tables = {p: own for p, own in module_leaves(params).items() if "embedding" in own}
    if path is not None:
        if path not in tables:
            raise ConfigError(f"word_embeddings={path!r} is not an embedding module of the params; found {sorted(tables)}.")
        return path
    for name in _EMBED_NAMES:
        hits = [p for p in tables if p.split("/")[-1] == name]
        if len(hits) == 1:
            return hits[0]
    if len(tables) == 1:
        return next(iter(tables))
    raise ConfigError(
        f"cannot tell which embedding table holds the word embeddings (found {sorted(tables) or 'none'}); "
        "set PromptTuningConfig(word_embeddings='path/to/embed')."
    )


def init(config: PromptTuningConfig, params, key, infos) -> dict:
    """Creates the virtual-token embeddings at the model's top-level call."""
    path = find_embedding(params, config.word_embeddings)
    table = get_subtree(params, path)["embedding"]
    vocab, dim = int(table.shape[0]), int(table.shape[1])
    if config.token_dim is not None and config.token_dim != dim:
        raise ConfigError(f"PromptTuningConfig.token_dim={config.token_dim} but the word embeddings at {path!r} have width {dim}.")
    t = config.num_virtual_tokens
    if config.prompt_tuning_init == "RANDOM":
        emb = jax.random.normal(key, (t, dim), jnp.float32)
    else:
        if config.prompt_tuning_init == "TEXT":
            ids = list(config.token_ids())
            if not ids:
                raise ConfigError("prompt_tuning_init_text tokenized to no tokens; give a non-empty text.")
            ids = (ids * math.ceil(t / len(ids)))[:t]
            bad = [i for i in ids if not 0 <= i < vocab]
            if bad:
                raise ConfigError(f"init token ids {sorted(set(bad))} are outside the vocabulary [0, {vocab}).")
            ids = jnp.asarray(ids, jnp.int32)
        else:  # SAMPLE_VOCAB
            ids = jax.random.randint(key, (t,), 0, vocab)
        emb = jnp.take(jnp.asarray(table), ids, axis=0).astype(jnp.float32)
    return {"": PromptWeights(emb, path, drops_token_types=_drops_token_types(config.task_type))}


def to_prefix(model, params, adapter: Mapping[str, Any]) -> dict:
    """Converts a prompt-tuning adapter for a *causal* decoder into the equivalent prefix-tuning
    adapter, for generation with a KV cache.

    In a causal decoder the virtual tokens never see the real tokens, so their keys and values
    at every layer are fixed: this runs them through the model once (positions ``0 .. T-1``) and
    keeps those keys and values as prefixes. The resulting :class:`~jpeft.methods.prefix.PrefixWeights`
    gives the real tokens positions ``T, T+1, ...``, exactly as prompt tuning does, so the logits
    are the same, and it works with
    ``jpeft.generate``. Under a sliding attention window the prefix keys sit in the slots the
    virtual tokens held, so they leave the window exactly as the virtual tokens do. Other nodes of ``adapter`` are applied while computing the prefixes and
    returned unchanged. On a model whose rotary frequencies depend on the call's length (longrope,
    dynamic NTK) the prefixes equal the prompt only while virtual and real tokens together stay
    within the length where those frequencies do not change (docs/METHODS.md).

    Raises:
      UnsupportedModuleError: the model has no ``init_cache`` (it is not a jpeft decoder).
    """
    node = adapter.get("")
    if not isinstance(node, PromptWeights):
        raise ConfigError("to_prefix expects an adapter made with PromptTuningConfig (a PromptWeights node at path '').")
    if not hasattr(model, "init_cache"):
        raise UnsupportedModuleError(
            f"{type(model).__name__} has no init_cache: to_prefix needs a causal jpeft decoder (Llama, Mistral, Qwen2, GPT-2)."
        )
    cfg = model.config
    rest = {k: v for k, v in adapter.items() if k != ""}
    t = node.num_virtual_tokens
    cache = model.init_cache(1, t)
    # in the dtype of the word embeddings, as prompt tuning prepends them (and PEFT casts them): float32 virtual
    # tokens beside a bfloat16 table gave other prefixes than the prompt itself (GPT-2's logits 0.027 off)
    table = get_subtree(unwrap_params(params)[0], node.embed_path)["embedding"]
    embeds = node.embedding.astype(table.dtype)[None]
    _, cache = core.apply(model, params, rest or None, inputs_embeds=embeds, cache=cache)
    heads, hd = int(cfg.num_kv_heads), int(cfg.head_dim)
    per_token = jnp.stack(
        [x[0].astype(jnp.float32).reshape(t, heads * hd) for pair in zip(cache.keys, cache.values) for x in pair], axis=1
    )  # [T, 2L, H*hd]: layer i keys at 2i, values at 2i+1 (Hugging Face's prefix layout)
    flat = per_token.reshape(t, -1)
    out = dict(rest)
    out[""] = PrefixWeights(flat, int(cfg.num_layers), heads * hd, heads)
    return out


# -- Hugging Face PEFT format ----------------------------------------------------------------
# PEFT saves the virtual-token embeddings as one tensor "prompt_embeddings": [T, hidden].

def _to_hf(config: PromptTuningConfig, adapter, ctx):
    node = adapter.get("")
    if not isinstance(node, PromptWeights) or len(adapter) != 1:
        raise UnsupportedAdapterError(
            "a PromptTuningConfig adapter must hold exactly one PromptWeights node at path '' (from jpeft.init); "
            f"found {sorted(adapter)}."
        )
    d = config.to_dict()
    d.pop("peft_type", None)
    d["task_type"] = config.task_type  # None: save_peft picks the base's default
    d.pop("init_token_ids", None)
    d.pop("word_embeddings", None)
    if config.prompt_tuning_init == "TEXT" and config.prompt_tuning_init_text is None:
        d["prompt_tuning_init"] = "RANDOM"  # initialised from ids: PEFT cannot record those; the weights are what count
    d.update(num_virtual_tokens=node.num_virtual_tokens, token_dim=int(node.embedding.shape[1]), modules_to_save=None)
    return d, {"prompt_embeddings": np.ascontiguousarray(np.asarray(node.embedding, np.float32))}


def _from_hf(d, tensors, params, ctx):
    names = {f.name for f in dataclasses.fields(PromptTuningConfig)} - {"init_token_ids", "word_embeddings"}
    kept = {k: v for k, v in d.items() if k in names}
    if kept.get("prompt_tuning_init") == "TEXT":
        kept["prompt_tuning_init"] = "RANDOM" if not (kept.get("prompt_tuning_init_text") and kept.get("tokenizer_name_or_path")) else "TEXT"
    config = config_from_peft(PromptTuningConfig, kept, ctx.folder)
    inner = params["params"] if isinstance(params, Mapping) and isinstance(params.get("params"), Mapping) else params
    if set(tensors) != {"prompt_embeddings"}:
        raise CheckpointError(f"a prompt-tuning adapter holds one tensor 'prompt_embeddings'; {ctx.folder!r} has {sorted(tensors)}.")
    emb = tensors["prompt_embeddings"]
    path = find_embedding(inner)
    dim = int(get_subtree(inner, path)["embedding"].shape[1])
    if emb.ndim != 2 or emb.shape[1] != dim:
        raise BaseMismatchError(
            f"prompt_embeddings in {ctx.folder!r} has shape {tuple(emb.shape)}, but the base's word embeddings "
            f"({path!r}) have width {dim}. Load the adapter on the base it was made for."
        )
    if emb.shape[0] != config.num_virtual_tokens:
        raise CheckpointError(
            f"prompt_embeddings has {emb.shape[0]} rows but adapter_config.json says num_virtual_tokens={config.num_virtual_tokens}."
        )
    return config, {"": PromptWeights(jnp.asarray(emb, ctx.dtype), path,
                                      drops_token_types=_drops_token_types(config.task_type))}


def _drops_token_types(task_type) -> bool:
    """Whether Hugging Face PEFT's prompt-tuning forward drops ``token_type_ids`` for this task type:
    ``FEATURE_EXTRACTION`` (with a warning) and ``QUESTION_ANS`` (without one: the forward of
    ``PeftModelForQuestionAnswering`` never passes them on); ``SEQ_CLS`` and ``TOKEN_CLS`` prepend
    ``T`` zeros, as jpeft does."""
    return task_type in ("FEATURE_EXTRACTION", "QUESTION_ANS")


def budget_rows(model_type: str, targets):
    """``Method.budget``: 20 virtual tokens (decoders; BERT has no row, as for prefix tuning)."""
    if model_type == "bert":
        return []
    return [("Prompt tuning", "20 virtual tokens", lambda: PromptTuningConfig(num_virtual_tokens=20))]


PROMPT = register_method(Method(config=PromptTuningConfig, init=init, nodes=(PromptWeights,), to_hf=_to_hf,
                                from_hf=_from_hf, budget=budget_rows))
