"""Llama-family decoders (Llama 2 and 3, Mistral, Qwen2, Qwen3) as ``flax.linen`` modules whose
submodule names mirror Hugging Face's, so a module path such as
``model/layers_0/self_attn/q_proj`` has the Hugging Face name
``model.layers.0.self_attn.q_proj`` and ``target_modules`` written for Hugging Face PEFT
select the same modules.

>>> import jax, jax.numpy as jnp, jpeft
>>> cfg = jpeft.models.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
...                                num_layers=2, num_heads=4, num_kv_heads=2)
>>> model = jpeft.models.LlamaForCausalLM(cfg)
>>> ids = jnp.ones((2, 5), jnp.int32)
>>> params = model.init(jax.random.key(0), ids)
>>> model.apply(params, ids).shape
(2, 5, 64)
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional

import flax.linen as nn
import jax.numpy as jnp

from jpeft._ops import activation
from jpeft.errors import ConfigError, InputValidationError
from jpeft.models import _layers as L


def _freeze_mapping(d):
    if d is None:
        return None
    if isinstance(d, tuple):
        return d
    return tuple(sorted((str(k), tuple(v) if isinstance(v, list) else v) for k, v in dict(d).items()))


def _standard_rope_keys(d):
    """``rope_scaling`` with an older file's ``type`` key read as ``rope_type`` (``rope_type``
    wins when both are given, as transformers reads them), so that every reader of the config,
    and the ``rope_parameters`` that :func:`jpeft.models.save_pretrained` writes, see one key."""
    if d is None:
        return None
    d = dict(d)
    if "type" in d:
        kind = d.pop("type")
        d.setdefault("rope_type", kind)
    return d


@dataclasses.dataclass(frozen=True)
class LlamaConfig(L.ConfigMethods):
    """Configuration of a Llama-family decoder (also Mistral, Qwen2 and Qwen3).

    Field names follow jpeft's common model-config vocabulary (``num_layers``, ``num_heads``,
    ``num_kv_heads``); :func:`jpeft.models.config_from_hf` maps the Hugging Face names
    (``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``, ...).

    Args:
      vocab_size, hidden_size, intermediate_size, num_layers, num_heads: sizes.
      num_kv_heads: key/value heads for grouped-query attention (default ``num_heads``).
      head_dim: per-head width (default ``hidden_size // num_heads``).
      max_position_embeddings: the longest sequence the model was trained for.
      rms_norm_eps: epsilon of the RMS norms.
      rope_theta: rotary base.
      rope_scaling: ``None`` or a mapping with ``rope_type`` ``"linear"`` (``factor``),
        ``"llama3"`` (``factor``, ``low_freq_factor``, ``high_freq_factor``,
        ``original_max_position_embeddings``), ``"yarn"``, ``"longrope"`` or ``"dynamic"``, with
        transformers' keys (docs/MODELS.md; ``original_max_position_embeddings`` defaults to
        ``max_position_embeddings``, as in transformers; an older file's ``type`` key is read as
        ``rope_type``, and a ``rope_theta`` in it, as in transformers 5's ``rope_parameters``,
        sets ``rope_theta``); stored as a sorted tuple of pairs so the config stays hashable.
      hidden_act: MLP activation (``"silu"``).
      attention_bias: bias on q/k/v projections (Qwen2: True).
      attention_out_bias: bias on o_proj (Llama's ``attention_bias=True`` sets both).
      mlp_bias: bias on gate/up/down projections.
      qk_norm: an RMSNorm over each head's ``head_dim`` on the projected queries and keys
        (``q_norm``, ``k_norm``, weights ``[head_dim]``), before the rotary embedding (Qwen3).
      tie_word_embeddings: logits use the input embedding matrix (no ``lm_head``).
      sliding_window: attention window for layers whose ``layer_types`` entry is
        ``"sliding_attention"`` (``layer_types=None`` with a window: every layer, as Mistral).
      layer_types: per-layer ``"full_attention"`` / ``"sliding_attention"``.
      model_type: ``"llama"``, ``"mistral"``, ``"qwen2"`` or ``"qwen3"`` (informational; used when saving).
      initializer_range: std of the normal initializer for fresh models.
      dtype: compute dtype; param_dtype: dtype of freshly initialised parameters.
      remat, remat_policy: rematerialise each decoder layer (``nn.remat``) with the named
        ``jax.checkpoint_policies`` policy (``None``: save nothing).
      scan_layers: run the decoder layers with ``nn.scan`` over weights stacked along a leading
        layer axis (params ``model/layers/...`` of shape ``[num_layers, ...]``): XLA compiles one
        layer, so compile time and compile memory stay flat with depth; with ``remat`` only each
        layer's input is kept for the backward pass. Needs the same attention window in every
        layer. See :mod:`jpeft.scan` for adapters on such models.
      attention: the attention kernel: ``"auto"`` (cuDNN's fused kernel on GPU for 16-bit
        dtypes, the Pallas splash kernel on TPU, else ``"blockwise"``), ``"blockwise"`` (online
        softmax over key blocks, memory linear in the sequence length), ``"reference"`` (dense
        scores), ``"cudnn"`` or ``"splash"``; see :mod:`jpeft.models._attention`.
      attention_block_size: query and key block of the blockwise kernel; 0 (the default)
        picks it per call: about a quarter of the sequence (64..256) for causal attention over
        the current tokens, 512 otherwise (:func:`jpeft.models._attention.auto_block_size`),
        with keys in blocks of 512 where that is 256 (``auto_key_block_size``).
      bos_token_id, eos_token_id, pad_token_id: special tokens from the Hugging Face config.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Any = None
    hidden_act: str = "silu"
    attention_bias: bool = False
    attention_out_bias: bool = False
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    sliding_window: Optional[int] = None
    layer_types: Optional[tuple] = None
    model_type: str = "llama"
    initializer_range: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False
    remat_policy: Optional[str] = None
    scan_layers: bool = False
    attention: str = "auto"
    attention_block_size: int = 0
    bos_token_id: Any = None
    eos_token_id: Any = None
    pad_token_id: Any = None

    def __post_init__(self):
        self._note_derived("num_kv_heads", "head_dim")
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ConfigError(
                    f"LlamaConfig: hidden_size ({self.hidden_size}) is not divisible by num_heads ({self.num_heads}); "
                    "set head_dim explicitly."
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        scaling = _standard_rope_keys(self.rope_scaling)
        if scaling is not None and scaling.get("rope_theta") is not None:
            # transformers 5's rope_parameters hold the base: it wins over rope_theta, as transformers reads them
            object.__setattr__(self, "rope_theta", float(scaling.pop("rope_theta")))
        if "original_max_position_embeddings" in L.ROPE_KEYS.get(L.rope_kind(scaling), ((), ()))[0]:
            # as transformers' standardize_rope_params: the pretraining length defaults to the context
            scaling.setdefault("original_max_position_embeddings", self.max_position_embeddings)
        object.__setattr__(self, "rope_scaling", _freeze_mapping(scaling))
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
            if len(self.layer_types) != self.num_layers:
                raise ConfigError(
                    f"LlamaConfig.layer_types has {len(self.layer_types)} entries, expected num_layers={self.num_layers}."
                )
            bad = sorted(set(self.layer_types) - {"full_attention", "sliding_attention"})
            if bad:
                raise ConfigError(f"LlamaConfig.layer_types: unknown entries {bad}; use 'full_attention' or 'sliding_attention'.")
        self._finish("LlamaConfig")
        if self.head_dim % 2:
            raise ConfigError(f"LlamaConfig.head_dim must be even for rotary embeddings, found {self.head_dim}.")
        if self.scan_layers and len({self.window(i) for i in range(self.num_layers)}) > 1:
            raise ConfigError(
                "LlamaConfig(scan_layers=True) runs one program for every layer, but layer_types gives the layers "
                "different attention windows; use scan_layers=False for this model."
            )
        if not self.rope_theta > 0:
            raise ConfigError(f"LlamaConfig.rope_theta must be positive, found {self.rope_theta!r}.")
        if not self.rms_norm_eps >= 0:
            raise ConfigError(f"LlamaConfig.rms_norm_eps must be >= 0, found {self.rms_norm_eps!r}.")
        if self.sliding_window is not None and (isinstance(self.sliding_window, bool) or int(self.sliding_window) <= 0):
            raise ConfigError(
                f"LlamaConfig.sliding_window must be a positive number of tokens or None (no window), "
                f"found {self.sliding_window!r}."
            )
        L.check_rope_scaling(self.rope_scaling_dict, self.head_dim, self.rope_theta, self.max_position_embeddings,
                             "LlamaConfig")

    @property
    def rope_scaling_dict(self) -> Optional[dict]:
        return dict(self.rope_scaling) if self.rope_scaling else None

    def window(self, layer: int) -> Optional[int]:
        """The sliding window of ``layer`` (``None``: full attention)."""
        if self.sliding_window is None:
            return None
        if self.layer_types is None:
            return int(self.sliding_window)
        return int(self.sliding_window) if self.layer_types[layer] == "sliding_attention" else None


class LlamaMLP(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        act = activation(c.hidden_act)
        g = L.dense(c.intermediate_size, c.mlp_bias, c, "gate_proj")(x)
        u = L.dense(c.intermediate_size, c.mlp_bias, c, "up_proj")(x)
        return L.dense(c.hidden_size, c.mlp_bias, c, "down_proj")(L.gated(act, g, u))


class LlamaAttention(nn.Module):
    """Grouped-query attention with rotary embeddings, an optional KV cache and an optional
    key/value prefix. Returns the output ``[batch, seq, hidden]``, or ``(output, (k, v))``
    when ``cache`` is given."""

    config: LlamaConfig
    layer_idx: int = 0

    @nn.compact
    def __call__(self, hidden, mask, rope, cache=None, prefix_kv=None, deterministic: bool = True):
        c = self.config
        b, s, _ = hidden.shape
        q = L.dense(c.num_heads * c.head_dim, c.attention_bias, c, "q_proj")(hidden)
        k = L.dense(c.num_kv_heads * c.head_dim, c.attention_bias, c, "k_proj")(hidden)
        v = L.dense(c.num_kv_heads * c.head_dim, c.attention_bias, c, "v_proj")(hidden)
        q = q.reshape(b, s, c.num_heads, c.head_dim)
        k = k.reshape(b, s, c.num_kv_heads, c.head_dim)
        v = v.reshape(b, s, c.num_kv_heads, c.head_dim)
        if c.qk_norm:  # Qwen3: per-head RMSNorm of queries and keys, before rotary
            q = L.RMSNorm(c.head_dim, c.rms_norm_eps, c.dtype, c.param_dtype, name="q_norm")(q)
            k = L.RMSNorm(c.head_dim, c.rms_norm_eps, c.dtype, c.param_dtype, name="k_norm")(k)
        cos, sin = rope
        q = L.apply_rope(q, cos, sin)
        k = L.apply_rope(k, cos, sin)
        prefix_kv = L.check_prefix(prefix_kv, b, c.num_kv_heads, c.head_dim, "self_attn")
        out, new = L.attend(q, k, v, mask, scale=c.head_dim ** -0.5, cache_layer=cache, prefix_kv=prefix_kv, dtype=c.dtype,
                            implementation=c.attention, block_size=c.attention_block_size,
                            dropout_rate=c.attention_dropout,
                            dropout_key=L.attention_dropout_key(self, c.attention_dropout, deterministic))
        out = L.dense(c.hidden_size, c.attention_out_bias, c, "o_proj")(out.reshape(b, s, c.num_heads * c.head_dim))
        return out if cache is None else (out, new)


class LlamaDecoderLayer(nn.Module):
    """One decoder layer. With ``scanned=True`` (the body of ``nn.scan`` over the layers) it
    takes the cache as ``(keys, values)`` plus a separate ``cache_index`` and always returns
    ``(hidden, new_cache_or_None)``."""

    config: LlamaConfig
    layer_idx: int = 0
    scanned: bool = False

    @nn.compact
    def __call__(self, hidden, mask, rope, cache=None, prefix_kv=None, deterministic: bool = True, cache_index=None):
        c = self.config
        if self.scanned and cache is not None:
            cache = (cache[0], cache[1], cache_index)
        h = L.RMSNorm(c.hidden_size, c.rms_norm_eps, c.dtype, c.param_dtype, name="input_layernorm")(hidden)
        a = LlamaAttention(c, self.layer_idx, name="self_attn")(
            h, mask, rope, cache=cache, prefix_kv=prefix_kv, deterministic=deterministic
        )
        new = None
        if cache is not None:
            a, new = a
        hidden = hidden + a
        h = L.RMSNorm(c.hidden_size, c.rms_norm_eps, c.dtype, c.param_dtype, name="post_attention_layernorm")(hidden)
        hidden = hidden + LlamaMLP(c, name="mlp")(h)
        if self.scanned:
            return hidden, new
        return hidden if cache is None else (hidden, new)


class LlamaModel(nn.Module):
    """The decoder stack: ``embed_tokens``, ``layers_{i}`` (``layers``, stacked, with
    ``scan_layers``), ``norm``."""

    config: LlamaConfig

    def setup(self):
        c = self.config
        self.embed_tokens = L.Embed(
            c.vocab_size, c.hidden_size, dtype=c.dtype, param_dtype=c.param_dtype,
            embedding_init=nn.initializers.normal(c.initializer_range),
        )
        layer_cls = L.remat_wrap(LlamaDecoderLayer, c, static_argnums=(6,))
        if c.scan_layers:
            self.layers = L.scan_layers(layer_cls, c.num_layers)(c, 0, True)
        else:
            self.layers = [layer_cls(c, i) for i in range(c.num_layers)]
        self.norm = L.RMSNorm(c.hidden_size, c.rms_norm_eps, c.dtype, c.param_dtype)

    def __call__(self, input_ids=None, attention_mask=None, *, inputs_embeds=None, position_ids=None,
                 segment_ids=None, cache=None, prefix_kv=None, deterministic=True):
        c = self.config
        hidden, attention_mask, position_ids, padded = L.decoder_inputs(
            input_ids, attention_mask, inputs_embeds, position_ids, cache, self.embed_tokens, "LlamaModel", segment_ids
        )
        L.check_prefix_count(prefix_kv, c.num_layers)
        hidden = hidden.astype(c.dtype)
        rope = L.rotary(position_ids, c, attention_mask)
        if c.scan_layers:
            mask, kv_valid = L.causal_mask(attention_mask, cache, c.window(0), segment_ids=segment_ids, padded=padded)
            hidden, new_cache = L.run_scanned(self.layers, hidden, mask, rope, cache, kv_valid, prefix_kv, deterministic)
            return self.norm(hidden), new_cache
        masks = {}
        for w in dict.fromkeys(c.window(i) for i in range(c.num_layers)):  # one mask per window width
            masks[w], kv_valid = L.causal_mask(attention_mask, cache, w, segment_ids=segment_ids, padded=padded)

        def call(i, layer, hidden, layer_cache):
            pre = None if prefix_kv is None else prefix_kv[i]
            return layer(hidden, masks[c.window(i)], rope, layer_cache, pre, deterministic)

        hidden, new_cache = L.run_unrolled(self.layers, hidden, cache, kv_valid, call)
        return self.norm(hidden), new_cache


class LlamaForCausalLM(L.CausalLM):
    """A Llama-family causal LM (``model`` + ``lm_head``; Mistral, Qwen2 and Qwen3 are the same
    class with their config flags).

    ``__call__(input_ids=None, attention_mask=None, *, inputs_embeds=None, position_ids=None,
    segment_ids=None, cache=None, prefix_kv=None, deterministic=True)`` returns logits
    ``[batch, seq, vocab]`` (compute dtype), or ``(logits, new_cache)`` when a
    :class:`~jpeft.models.KVCache` is given. Default ``position_ids`` count real tokens only
    (``cumsum(attention_mask) - 1``), so a left-padded row gives the logits of the unpadded
    row. ``segment_ids`` (packed rows, one document id per token) make attention
    block-diagonal causal: no token sees another document, and default positions restart
    at 0 in each document.
    """

    config: LlamaConfig
    trunk_name: ClassVar[str] = "model"
    trunk_class: ClassVar[type] = LlamaModel
    embed_name: ClassVar[str] = "embed_tokens"


MistralForCausalLM = LlamaForCausalLM
Qwen2ForCausalLM = LlamaForCausalLM
Qwen3ForCausalLM = LlamaForCausalLM


def MistralConfig(**kw) -> LlamaConfig:
    """A :class:`LlamaConfig` with Mistral's defaults (``model_type="mistral"``)."""
    kw.setdefault("model_type", "mistral")
    return LlamaConfig(**kw)


def Qwen2Config(**kw) -> LlamaConfig:
    """A :class:`LlamaConfig` with Qwen2's q/k/v bias (``model_type="qwen2"``)."""
    kw.setdefault("model_type", "qwen2")
    kw.setdefault("attention_bias", True)
    kw.setdefault("tie_word_embeddings", False)
    return LlamaConfig(**kw)


def Qwen3Config(**kw) -> LlamaConfig:
    """A :class:`LlamaConfig` with Qwen3's per-head q/k RMSNorm (``model_type="qwen3"``,
    ``qk_norm=True``; ``attention_bias``, when set, biases q/k/v and o_proj as in transformers)."""
    kw.setdefault("model_type", "qwen3")
    kw.setdefault("qk_norm", True)
    if kw.get("attention_bias"):
        kw.setdefault("attention_out_bias", True)
    return LlamaConfig(**kw)
