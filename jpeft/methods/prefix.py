"""Prefix tuning (Li & Liang 2021) as Hugging Face PEFT does it: learned per-layer key/value
prefixes that every query attends to.

The adapter is one node at the model's top-level call (path ``""``). It holds the prefixes in
Hugging Face's layout, ``[num_virtual_tokens, num_layers * 2 * token_dim]`` with
``token_dim = num_kv_heads * head_dim`` (layer ``i``'s keys are slot ``2 i``, its values slot
``2 i + 1``), and passes them to the model as ``prefix_kv=[(k_0, v_0), ...]`` with each
``k_i, v_i: [1, num_virtual_tokens, num_kv_heads, head_dim]``. The model's attention modules
prepend them to their keys and values (jpeft's models do; see :mod:`jpeft.models`), so a user
model works when its ``__call__`` takes ``prefix_kv`` the same way.

As in Hugging Face PEFT, the prefix occupies positions ``0 .. T-1`` and the real tokens get
positions ``T, T+1, ...``: default positions are ``cumsum(attention_mask) - 1 + T`` (what
``transformers`` computes from the prefix's cache length), or ``arange(seq) + T`` for a model
whose config sets ``positions_by_slot`` (BERT, which numbers every slot, padding included, as
transformers' BERT does with the prefix's cache length), and explicit ``position_ids`` are
shifted by ``T`` (as PEFT does). This also holds while
generating with a :class:`~jpeft.models.KVCache` (the prefix is not written to the cache; it is
attended at every step).

With ``prefix_projection=True`` the prefixes are reparameterised while training, as in the paper:
``prefix = W2 tanh(W1 e + b1) + b2`` from ``T`` learned embeddings ``e: [T, token_dim]``.
:func:`fold_prefix` evaluates the MLP once and returns the plain prefixes for inference and
for export (Hugging Face saves the same folded tensor).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, ClassVar, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jpeft._hfconfig import num_kv_heads
from jpeft._ops import default_positions, segment_slots
from jpeft.config import AdapterConfig
from jpeft.errors import (BaseMismatchError, CheckpointError, ConfigError, InputValidationError, NotMergeableError,
                          PrefixNotSupportedError, PromptTooLongError, ShapeMismatchError, UnsupportedAdapterError,
                          UnsupportedModuleError)
from jpeft.peft_format import config_from_peft
from jpeft.methods.base import Call, Method, Site, register_method, static_field
from jpeft.tree import module_leaves
from jpeft.validate import position_limit

# Key projections that tell the number of layers and the key width, per family:
# (module name, how many key widths its kernel's output holds)
_KEY_PROJ = {"k_proj": 1, "key": 1, "c_attn": 3}
# families whose Hugging Face config has num_key_value_heads (Llama, Mistral, Qwen2): there PEFT replaces a
# file's token_dim and num_attention_heads by the model's (head_dim * num_key_value_heads and
# num_key_value_heads; peft.utils.other._prepare_prompt_learning_config) when it loads the adapter
_KV_HEADS_FROM_MODEL = ("k_proj",)


@dataclasses.dataclass(frozen=True)
class PrefixTuningConfig(AdapterConfig):
    """Configuration of prefix tuning (Hugging Face PEFT's ``PrefixTuningConfig`` keys).

    Args:
      num_virtual_tokens: prefix length ``T``.
      prefix_projection: reparameterise the prefixes through a two-layer MLP while training
        (fold it with :func:`fold_prefix` for inference).
      encoder_hidden_size: the MLP's hidden width (default ``token_dim``).
      num_layers, token_dim: the model's layer count and key width
        (``num_kv_heads * head_dim``); learnt from the key projections in the params when
        ``None`` (Llama/Mistral/Qwen2 ``k_proj``, GPT-2 ``c_attn``, BERT ``key``).
      num_attention_heads: key/value heads (``num_key_value_heads``, not the query heads of a
        grouped-query model); taken from the model's ``config`` at apply time when ``None``. A
        value other than the model's is a ``ShapeMismatchError`` at apply, and refused by
        :func:`jpeft.hf.save_peft` when the base folder's ``config.json`` says otherwise.
      init_weights: ``None`` (random, as Hugging Face PEFT: a standard normal for plain
        prefixes, PyTorch's default ``Linear`` init for the MLP) or ``"zero"`` (zero prefixes;
        for the MLP a zero last layer).
      num_transformer_submodules: 1 (decoders and encoders); encoder-decoder models are not
        supported.
      task_type: Hugging Face PEFT's task type written by :func:`jpeft.hf.save_peft`
        (``None``: ``"CAUSAL_LM"`` on decoders, ``"FEATURE_EXTRACTION"`` on BERT, the one task type
        PEFT runs a BERT prefix with; it drops ``token_type_ids`` there). ``"SEQ_CLS"`` keeps BERT's
        token types in jpeft, but PEFT cannot run such a prefix (``save_peft`` refuses it).

    >>> from jpeft.methods.prefix import PrefixTuningConfig
    >>> c = PrefixTuningConfig(num_virtual_tokens=10, prefix_projection=True)
    >>> PrefixTuningConfig.from_dict(c.to_dict()) == c
    True
    """

    peft_type: ClassVar[str] = "PREFIX_TUNING"
    prompt_learning: ClassVar[bool] = True
    # PEFT builds prompt learning only inside a task model; on BERT its prefix tuning runs as FEATURE_EXTRACTION
    # only (its SEQ_CLS, TOKEN_CLS and QUESTION_ANS forwards find no past_key_values argument and raise)
    peft_task_types: ClassVar[Mapping[str, tuple]] = {"decoder": ("CAUSAL_LM",), "encoder": ("FEATURE_EXTRACTION",)}

    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: Optional[int] = None
    num_layers: Optional[int] = None
    token_dim: Optional[int] = None
    num_attention_heads: Optional[int] = None
    init_weights: Optional[str] = None
    num_transformer_submodules: int = 1
    task_type: Optional[str] = None

    @property
    def extra_positions(self) -> int:  # the virtual tokens take positions before the row's
        return int(self.num_virtual_tokens)

    def __post_init__(self):
        def pos(name, v, allow_none=True):
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"PrefixTuningConfig.{name} must be a positive integer, found {v!r}.")

        pos("num_virtual_tokens", self.num_virtual_tokens, allow_none=False)
        for n in ("encoder_hidden_size", "num_layers", "token_dim", "num_attention_heads"):
            pos(n, getattr(self, n))
        if not isinstance(self.prefix_projection, bool):
            raise ConfigError(f"PrefixTuningConfig.prefix_projection must be a bool, found {self.prefix_projection!r}.")
        if self.init_weights not in (None, "zero"):
            raise ConfigError(f"PrefixTuningConfig.init_weights must be None or 'zero', found {self.init_weights!r}.")
        if self.num_transformer_submodules != 1:
            raise ConfigError(
                f"PrefixTuningConfig.num_transformer_submodules={self.num_transformer_submodules}: jpeft supports "
                "decoder-only and encoder-only models (1); encoder-decoder models are not supported."
            )
        if self.token_dim and self.num_attention_heads and self.token_dim % self.num_attention_heads:
            raise ConfigError(
                f"PrefixTuningConfig.token_dim ({self.token_dim}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads}): token_dim is num_kv_heads * head_dim."
            )


def _split_layers(flat, num_layers: int, heads: int, head_dim: int, dtype):
    """``[T, L*2*H*hd]`` -> ``[(k_i, v_i)]`` with ``k_i, v_i: [1, T, H, hd]``."""
    t = flat.shape[0]
    kv = flat.reshape(t, num_layers * 2, heads, head_dim).astype(dtype)
    return [(kv[None, :, 2 * i], kv[None, :, 2 * i + 1]) for i in range(num_layers)]


def _bind(call: Call):
    fn = type(call.module).__call__
    sig = inspect.signature(fn)
    return sig, sig.bind(None, *call.args, **call.kwargs)


def _call_bound(call: Call, bound):
    args = bound.args[1:]
    return call.next_fun(*args, **bound.kwargs)


def check_token_rows(args: Mapping[str, Any], module, what: str) -> None:
    """Raises :class:`UnsupportedModuleError` unless the call's tokens are ``[batch, seq]`` rows
    (``input_ids`` of rank 2, ``inputs_embeds`` of rank 3), where prompt learning puts its virtual
    tokens before axis 1: a multiple-choice model's ``[batch, choices, seq]`` inputs have the
    choices there (PEFT cannot run prompt learning on such a model either)."""
    ids, emb = args.get("input_ids"), args.get("inputs_embeds")
    x, rank = (ids, 2) if ids is not None else (emb, 3)
    if x is not None and jnp.ndim(x) != rank:
        raise UnsupportedModuleError(
            f"{what} puts its virtual tokens before the tokens of [batch, seq] inputs, but {type(module).__name__} was "
            f"called with {'input_ids' if ids is not None else 'inputs_embeds'} of shape {tuple(jnp.shape(x))} (a "
            "multiple-choice model's [batch, choices, seq]); PEFT cannot run prompt or prefix tuning on such a model "
            "either (its torch.cat of the virtual tokens fails). Use LoRA or another method with sites on the model's "
            "modules."
        )


def _seq_len(bound) -> Optional[int]:
    a = bound.arguments
    if a.get("input_ids") is not None:
        return int(a["input_ids"].shape[1])
    if a.get("inputs_embeds") is not None:
        return int(a["inputs_embeds"].shape[1])
    return None


class _PrefixBase(Site):
    site: ClassVar[str] = "attention"
    mergeable: ClassVar[bool] = False

    def prefix(self):  # pragma: no cover - both prefix node classes define it
        raise TypeError(f"{type(self).__name__} must define prefix() returning the per-layer (k, v) prefixes.")

    def merge(self, module_params):
        raise NotMergeableError(
            "prefix tuning adds key/value positions to attention; it cannot be folded into the base weights. "
            "Serve it with jpeft.apply (use jpeft.fold_prefix to drop the training-time MLP)."
        )

    def _heads(self, module):
        cfg = getattr(module, "config", None)
        kv = getattr(cfg, "num_kv_heads", None) or getattr(cfg, "num_heads", None)  # the model's
        heads = self.num_heads or kv
        if heads is None:
            raise ConfigError(
                "prefix tuning needs the number of key/value heads: the model has no config with num_kv_heads; "
                "set PrefixTuningConfig(num_attention_heads=...)."
            )
        heads = int(heads)
        if self.token_dim % heads:
            raise ShapeMismatchError(f"prefix token_dim {self.token_dim} is not a multiple of {heads} key/value heads.")
        if cfg is not None:
            nl = getattr(cfg, "num_layers", None)
            hd = getattr(cfg, "head_dim", None)
            if kv is not None and int(kv) != heads and (hd is None or int(kv) * hd == self.token_dim):
                # the prefix fits the model; only the recorded head count is wrong (often the query heads)
                raise ShapeMismatchError(
                    f"this prefix records num_attention_heads={heads}, but the model's attention has {int(kv)} "
                    f"key/value heads (token_dim {self.token_dim} = {int(kv)} x {self.token_dim // int(kv)}). "
                    "PrefixTuningConfig.num_attention_heads is the key/value head count (num_key_value_heads, as "
                    f"PEFT records it for grouped-query models): set it to {int(kv)}, or leave it None to read it "
                    "from the model."
                )
            if (nl is not None and nl != self.num_layers) or (hd is not None and heads * hd != self.token_dim):
                raise ShapeMismatchError(
                    f"this prefix was built for {self.num_layers} layers of key width {self.token_dim}, but the model "
                    f"has {nl} layers of key width {heads} x {hd}. Re-create the adapter for this model."
                )
        return heads

    def intercept(self, call: Call):
        sig, bound = _bind(call)
        check_token_rows(bound.arguments, call.module, "prefix tuning")
        if "prefix_kv" not in sig.parameters:
            raise PrefixNotSupportedError(
                f"{type(call.module).__name__}.__call__ takes no prefix_kv keyword, so its attention cannot take "
                "key/value prefixes. Use one of jpeft.models (their attention accepts prefixes), add a prefix_kv "
                "argument passed down to your attention modules, or choose LoRA or prompt tuning instead."
            )
        bound.apply_defaults()
        if bound.arguments.get("prefix_kv") is not None:
            raise PrefixNotSupportedError("the call already passes prefix_kv; prefix tuning cannot be combined with another prefix.")
        if getattr(self, "drops_token_types", False) and bound.arguments.get("token_type_ids") is not None:
            raise InputValidationError(
                "prefix tuning: this adapter has a task_type other than SEQ_CLS, TOKEN_CLS or QUESTION_ANS, where "
                "Hugging Face PEFT drops token_type_ids (with a warning), so jpeft's outputs with them would differ "
                "from PEFT's; pass no token_type_ids (PEFT's numbers), or train the prefix in jpeft with "
                "task_type='SEQ_CLS', which uses them (PEFT cannot run a SEQ_CLS prefix on BERT, so it stays in jpeft)."
            )
        t = self.num_virtual_tokens
        n = _seq_len(bound)
        cache = bound.arguments.get("cache")
        budget = position_limit(getattr(call.module, "config", None))  # None on rotary models
        if budget is not None and n is not None:
            need = t + (cache.max_length if cache is not None else n)
            if need > budget:
                raise PromptTooLongError(
                    f"{t} prefix positions plus {need - t} token positions need {need} positions, but the model has "
                    f"max_position_embeddings={budget}. Shorten the input (or the cache), or use fewer virtual tokens."
                )
        heads = self._heads(call.module)
        dtype = getattr(getattr(call.module, "config", None), "dtype", jnp.float32)
        bound.arguments["prefix_kv"] = _split_layers(self.prefix(), self.num_layers, heads, self.token_dim // heads, dtype)
        if bound.arguments.get("position_ids") is not None:  # given for the real tokens: shift past the prefix
            bound.arguments["position_ids"] = bound.arguments["position_ids"] + t
        elif "position_ids" in sig.parameters and n is not None:
            seg = bound.arguments.get("segment_ids")
            if seg is not None:  # packed documents: positions restart in each document
                pos = segment_slots(jnp.asarray(seg, jnp.int32))
            else:
                mask = bound.arguments.get("attention_mask")
                if mask is None:
                    b = (bound.arguments.get("input_ids") if bound.arguments.get("input_ids") is not None
                         else bound.arguments["inputs_embeds"]).shape[0]
                    mask = jnp.ones((b, n), bool)
                if getattr(getattr(call.module, "config", None), "positions_by_slot", False) and cache is None:
                    # the model numbers every slot, padding included (transformers' BERT, and jpeft's without a
                    # prefix): counting real tokens instead moved a left-padded row's tokens and every padded slot
                    pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), mask.shape)
                else:
                    pos = default_positions(mask, cache)
            bound.arguments["position_ids"] = pos + t
        return _call_bound(call, bound)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PrefixWeights(_PrefixBase):
    """Plain prefixes ``[num_virtual_tokens, num_layers * 2 * token_dim]`` (Hugging Face's
    ``prompt_embeddings`` layout)."""

    prefix_embeddings: jax.Array
    num_layers: int = static_field(default=1)
    token_dim: int = static_field(default=1)
    num_heads: Optional[int] = static_field(default=None)
    # a task_type where PEFT drops token_type_ids (any but SEQ_CLS, TOKEN_CLS and QUESTION_ANS; None: jpeft's own
    # prefix): jpeft then refuses them instead of giving other outputs than PEFT's
    drops_token_types: bool = static_field(default=False)

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.prefix_embeddings.shape[0])

    def prefix(self):
        return self.prefix_embeddings


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PrefixMLPWeights(_PrefixBase):
    """Reparameterised prefixes: ``embedding: [T, token_dim]`` through
    ``tanh(e @ w1 + b1) @ w2 + b2`` (``w1: [token_dim, hidden]``, ``w2: [hidden, L*2*token_dim]``)."""

    no_decay = ("b1", "b2")  # PEFT's transform.0.bias / transform.2.bias
    embedding: jax.Array
    w1: jax.Array
    b1: jax.Array
    w2: jax.Array
    b2: jax.Array
    num_layers: int = static_field(default=1)
    token_dim: int = static_field(default=1)
    num_heads: Optional[int] = static_field(default=None)
    drops_token_types: bool = static_field(default=False)  # as PrefixWeights'

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.embedding.shape[0])

    def prefix(self):
        h = jnp.tanh(self.embedding @ self.w1 + self.b1.reshape(1, -1))
        return h @ self.w2 + self.b2.reshape(1, -1)


def fold_prefix(adapter: Mapping[str, Any]) -> dict:
    """Replaces every reparameterised prefix (``prefix_projection=True``) by the plain prefixes
    it computes, for inference and export; other nodes are returned unchanged.

    >>> import jax, jax.numpy as jnp
    >>> from jpeft.methods.prefix import PrefixMLPWeights, fold_prefix
    >>> k = jax.random.split(jax.random.key(0), 3)
    >>> node = PrefixMLPWeights(jax.random.normal(k[0], (2, 4)), jax.random.normal(k[1], (4, 3)), jnp.zeros(3),
    ...                         jax.random.normal(k[2], (3, 8)), jnp.zeros(8), num_layers=1, token_dim=4)
    >>> folded = fold_prefix({"": node})[""]
    >>> bool(jnp.allclose(folded.prefix_embeddings, node.prefix()))
    True
    """
    out = {}
    for path, node in adapter.items():
        if isinstance(node, PrefixMLPWeights):
            node = PrefixWeights(node.prefix(), node.num_layers, node.token_dim, node.num_heads, node.drops_token_types)
        out[path] = node
    return out


def infer_dims(params) -> tuple[int, int]:
    """``(num_layers, token_dim)`` from the key projections found in ``params``."""
    found = {}
    for path, own in module_leaves(params).items():
        name = path.split("/")[-1]
        if name in _KEY_PROJ and "kernel" in own:
            kernel = own["kernel"]
            # a layer-scanned model's kernel is stacked over its layers ([layers, in, out], jpeft.scan)
            n = int(kernel.shape[0]) if kernel.ndim == 3 and "layers" in path.split("/") else 1
            found.setdefault(name, []).extend([int(kernel.shape[-1]) // _KEY_PROJ[name]] * n)
    if len(found) != 1:
        raise ConfigError(
            "prefix tuning could not tell the model's layer count and key width from its params "
            f"(key projections found: {sorted(found) or 'none'}); set PrefixTuningConfig(num_layers=..., "
            "token_dim=num_kv_heads * head_dim, num_attention_heads=num_kv_heads)."
        )
    widths = next(iter(found.values()))
    if len(set(widths)) != 1:
        raise ConfigError(f"the key projections have different widths {sorted(set(widths))}; set token_dim explicitly.")
    return len(widths), widths[0]


def init(config: PrefixTuningConfig, params, key, infos) -> dict:
    """Creates the prefix node at the model's top-level call."""
    nl, td = config.num_layers, config.token_dim
    if nl is None or td is None:
        inl, itd = infer_dims(params)
        nl, td = nl or inl, td or itd
    t = config.num_virtual_tokens
    out_dim = nl * 2 * td
    zero = config.init_weights == "zero"
    if not config.prefix_projection:
        emb = jnp.zeros((t, out_dim), jnp.float32) if zero else jax.random.normal(key, (t, out_dim), jnp.float32)
        return {"": PrefixWeights(emb, nl, td, config.num_attention_heads, _drops_token_types(config.task_type))}
    hid = config.encoder_hidden_size or td
    k = jax.random.split(key, 5)

    def linear(kk, kb, fan_in, shape):  # torch.nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        b = 1.0 / math.sqrt(fan_in)
        return jax.random.uniform(kk, shape, jnp.float32, -b, b), jax.random.uniform(kb, (shape[1],), jnp.float32, -b, b)

    emb = jax.random.normal(k[0], (t, td), jnp.float32)
    w1, b1 = linear(k[1], k[2], td, (td, hid))
    w2, b2 = linear(k[3], k[4], hid, (hid, out_dim))
    if zero:
        w2, b2 = jnp.zeros_like(w2), jnp.zeros_like(b2)
    return {"": PrefixMLPWeights(emb, w1, b1, w2, b2, nl, td, config.num_attention_heads,
                                 _drops_token_types(config.task_type))}


# -- Hugging Face PEFT format ----------------------------------------------------------------
# PEFT saves the (folded) prefixes as one tensor "prompt_embeddings": [T, num_layers * 2 * token_dim].

def _to_hf(config: PrefixTuningConfig, adapter, ctx):
    node = fold_prefix(adapter).get("")
    if not isinstance(node, PrefixWeights) or len(adapter) != 1:
        raise UnsupportedAdapterError(
            "a PrefixTuningConfig adapter must hold exactly one prefix node at path '' (from jpeft.init); "
            f"found {sorted(adapter)}."
        )
    d = config.to_dict()
    d.pop("peft_type", None)
    d["task_type"] = config.task_type  # None: save_peft picks the base's default
    heads = node.num_heads or config.num_attention_heads or _kv_heads(ctx.hf_config)
    if heads is None:
        raise UnsupportedAdapterError(
            "PEFT needs num_attention_heads (the key/value head count) to split a prefix's token_dim, and this adapter "
            "does not record it: set PrefixTuningConfig(num_attention_heads=<the model's num_key_value_heads>), or "
            "pass save_peft(..., base_model_name_or_path=<the local model folder>) so jpeft reads it from config.json."
        )
    kv = _kv_heads(ctx.hf_config)
    if kv is not None and int(heads) != kv:
        raise UnsupportedAdapterError(
            f"the prefix records num_attention_heads={heads}, but the base's config.json gives {kv} key/value heads: "
            "PEFT would split token_dim into the wrong heads (or override the value on grouped-query models). "
            f"Set PrefixTuningConfig(num_attention_heads={kv}) (the key/value head count), or leave it None. "
            "Nothing was written."
        )
    d.update(num_virtual_tokens=node.num_virtual_tokens, num_layers=node.num_layers, token_dim=node.token_dim,
             num_attention_heads=heads, encoder_hidden_size=config.encoder_hidden_size or node.token_dim,
             modules_to_save=None)
    return d, {"prompt_embeddings": np.ascontiguousarray(np.asarray(node.prefix_embeddings, np.float32))}


def _kv_heads(hf_config):
    """Key/value heads from a Hugging Face config.json dict, as transformers reads them
    (:func:`jpeft._hfconfig.num_kv_heads`; ``None`` without one)."""
    try:
        return num_kv_heads(hf_config) if hf_config else None
    except (TypeError, ValueError):  # a malformed value: the caller asks for num_attention_heads by name
        return None


def _from_hf(d, tensors, params, ctx):
    names = {f.name for f in dataclasses.fields(PrefixTuningConfig)}
    config = config_from_peft(PrefixTuningConfig, {k: v for k, v in d.items() if k in names}, ctx.folder)
    if set(tensors) != {"prompt_embeddings"}:
        raise CheckpointError(f"a prefix-tuning adapter holds one tensor 'prompt_embeddings'; {ctx.folder!r} has {sorted(tensors)}.")
    emb = tensors["prompt_embeddings"]
    inner = params.get("params", params) if isinstance(params, Mapping) else params
    try:
        nl, td = infer_dims(inner)
    except ConfigError:
        nl, td = config.num_layers, config.token_dim
    heads = config.num_attention_heads
    if any(p.split("/")[-1] in _KV_HEADS_FROM_MODEL for p in module_leaves(inner)):
        # PEFT takes the key width and the key/value heads from the model here, whatever the file records
        # (a file giving the query heads or the hidden size runs in PEFT), so jpeft reads them from the model too
        config, heads = config.replace(token_dim=td), None
    if config.num_layers is not None and config.token_dim is not None and (config.num_layers, config.token_dim) != (nl, td):
        raise BaseMismatchError(
            f"the prefix in {ctx.folder!r} was made for {config.num_layers} layers of key width {config.token_dim}, but "
            f"the base has {nl} layers of key width {td}. Load it on the base it was made for."
        )
    want = (config.num_virtual_tokens, nl * 2 * td)
    if tuple(emb.shape) != want:
        raise CheckpointError(f"prompt_embeddings in {ctx.folder!r} has shape {tuple(emb.shape)}, expected {want}.")
    return config, {"": PrefixWeights(jnp.asarray(emb, ctx.dtype), nl, td, heads, _drops_token_types(d.get("task_type")))}


def _drops_token_types(task_type) -> bool:
    """Whether PEFT's forward drops ``token_type_ids`` with a prefix of this task type (it passes them
    on for SEQ_CLS, TOKEN_CLS and QUESTION_ANS only)."""
    return task_type is not None and task_type not in ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")


def budget_rows(model_type: str, targets):
    """``Method.budget``: 20 virtual tokens, with and without the MLP (decoders; BERT has no
    prompt-learning rows, as for prompt tuning)."""
    if model_type == "bert":
        return []
    return [
        ("Prefix tuning", "20 virtual tokens", lambda: PrefixTuningConfig(num_virtual_tokens=20)),
        ("Prefix tuning + MLP", "20 tokens, MLP width 512 (training; folds to the row above)",
         lambda: PrefixTuningConfig(num_virtual_tokens=20, prefix_projection=True, encoder_hidden_size=512)),
    ]


PREFIX = register_method(Method(config=PrefixTuningConfig, init=init, nodes=(PrefixWeights, PrefixMLPWeights),
                                to_hf=_to_hf, from_hf=_from_hf, budget=budget_rows))
