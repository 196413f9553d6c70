"""The Llama family (Llama 2/3, Mistral, Qwen2, Qwen3) as ``flax.nnx`` modules.

The same :class:`~jpeft.models.LlamaConfig`, the same blocks (rotary embeddings, masks,
attention kernels from ``_layers`` / ``_attention``) and the same parameter tree as the linen
:class:`~jpeft.models.LlamaForCausalLM`: the layers are the attributes ``layers_0``,
``layers_1``, ... so every module path (``model/layers_0/self_attn/q_proj``) and every
parameter name is the linen one. Hence weight loading is shared (``from_pretrained(path,
api="nnx")`` reads the checkpoint with the linen loader and puts the tree into the NNX
state), and an adapter trained on either model applies to the other unchanged.

Not in the NNX version: the KV cache (generation), layer scanning, remat, and the
``prefix_kv`` / ``inputs_embeds`` hooks of prefix and prompt tuning (:class:`ConfigError`
for the first three; those two methods act at the model's root, which NNX models refuse).
"""

from __future__ import annotations

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from jpeft._ops import activation, flat_dot_general
from jpeft.errors import ConfigError, InputValidationError
from jpeft.models import _layers as L
from jpeft.models.llama import LlamaConfig
from jpeft.tree import nnx_with_params, unwrap_params


def check_config(config: LlamaConfig) -> None:
    """Raises :class:`ConfigError` for the options the NNX Llama does not have."""
    if config.scan_layers or config.remat:
        raise ConfigError(
            f"the NNX Llama has no layer scan or remat (found scan_layers={config.scan_layers}, "
            f"remat={config.remat}); use the linen jpeft.models.LlamaForCausalLM for those, or leave them False."
        )


class RMSNorm(nnx.Module):
    """:class:`jpeft.models.RMSNorm` in NNX (parameter ``scale``)."""

    def __init__(self, features: int, eps: float, dtype, param_dtype):
        self.features, self.eps, self.dtype, self.param_dtype = features, eps, dtype, param_dtype
        self.scale = nnx.Param(jnp.ones((features,), param_dtype))

    def __call__(self, x):
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...].reshape((1,) * (x.ndim - 1) + (-1,))
        return scale.astype(self.dtype) * h.astype(self.dtype)

    def linen_twin(self) -> nn.Module:
        """The linen module computing the same function (jpeft's NNX sites use it; LN tuning)."""
        return L.RMSNorm(self.features, self.eps, self.dtype, self.param_dtype, parent=None)


def _dense(n_in: int, n_out: int, bias: bool, c: LlamaConfig, rngs) -> nnx.Linear:
    return nnx.Linear(n_in, n_out, use_bias=bias, dtype=c.dtype, param_dtype=c.param_dtype,
                      kernel_init=nn.initializers.normal(c.initializer_range), dot_general=flat_dot_general,
                      rngs=rngs)


class LlamaMLP(nnx.Module):
    def __init__(self, c: LlamaConfig, rngs):
        self.act = activation(c.hidden_act)
        self.gate_proj = _dense(c.hidden_size, c.intermediate_size, c.mlp_bias, c, rngs)
        self.up_proj = _dense(c.hidden_size, c.intermediate_size, c.mlp_bias, c, rngs)
        self.down_proj = _dense(c.intermediate_size, c.hidden_size, c.mlp_bias, c, rngs)

    def __call__(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class LlamaAttention(nnx.Module):
    def __init__(self, c: LlamaConfig, rngs):
        if c.attention_dropout:
            warnings.warn(f"attention_dropout={c.attention_dropout} is not applied by the NNX Llama (it has no dropout); "
                          "the linen LlamaForCausalLM applies it in training.", UserWarning, stacklevel=3)
        self.c = c
        qd, kd = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.q_proj = _dense(c.hidden_size, qd, c.attention_bias, c, rngs)
        self.k_proj = _dense(c.hidden_size, kd, c.attention_bias, c, rngs)
        self.v_proj = _dense(c.hidden_size, kd, c.attention_bias, c, rngs)
        self.o_proj = _dense(qd, c.hidden_size, c.attention_out_bias, c, rngs)
        if c.qk_norm:  # Qwen3: per-head RMSNorm of queries and keys, before rotary
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, c.dtype, c.param_dtype)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, c.dtype, c.param_dtype)

    def __call__(self, hidden, mask, rope):
        c = self.c
        b, s, _ = hidden.shape
        q = self.q_proj(hidden).reshape(b, s, c.num_heads, c.head_dim)
        k = self.k_proj(hidden).reshape(b, s, c.num_kv_heads, c.head_dim)
        v = self.v_proj(hidden).reshape(b, s, c.num_kv_heads, c.head_dim)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        q, k = L.apply_rope(q, cos, sin), L.apply_rope(k, cos, sin)
        out, _ = L.attend(q, k, v, mask, scale=c.head_dim ** -0.5, dtype=c.dtype, implementation=c.attention,
                          block_size=c.attention_block_size)
        return self.o_proj(out.reshape(b, s, c.num_heads * c.head_dim))


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, c: LlamaConfig, rngs):
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.dtype, c.param_dtype)
        self.self_attn = LlamaAttention(c, rngs)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.dtype, c.param_dtype)
        self.mlp = LlamaMLP(c, rngs)

    def __call__(self, hidden, mask, rope):
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), mask, rope)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class LlamaModel(nnx.Module):
    """``embed_tokens``, ``layers_0`` ... ``layers_{n-1}``, ``norm`` (the linen names)."""

    def __init__(self, c: LlamaConfig, rngs):
        self.c = c
        self.embed_tokens = nnx.Embed(c.vocab_size, c.hidden_size, dtype=c.dtype, param_dtype=c.param_dtype,
                                      embedding_init=nn.initializers.normal(c.initializer_range), rngs=rngs)
        for i in range(c.num_layers):
            setattr(self, f"layers_{i}", LlamaDecoderLayer(c, rngs))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.dtype, c.param_dtype)

    def __call__(self, input_ids, attention_mask=None, *, position_ids=None, segment_ids=None):
        c = self.c
        hidden, attention_mask, position_ids, padded = L.decoder_inputs(
            input_ids, attention_mask, None, position_ids, None, self.embed_tokens, "LlamaModel", segment_ids
        )
        hidden = hidden.astype(c.dtype)
        rope = L.rotary(position_ids, c, attention_mask)
        masks = {}
        for i in range(c.num_layers):
            w = c.window(i)
            if w not in masks:
                masks[w], _ = L.causal_mask(attention_mask, None, w, segment_ids=segment_ids, padded=padded)
            hidden = getattr(self, f"layers_{i}")(hidden, masks[w], rope)
        return self.norm(hidden)


class LlamaForCausalLM(nnx.Module):
    """A Llama-family causal LM in NNX: ``model(input_ids, attention_mask=None, *,
    position_ids=None, segment_ids=None)`` returns the logits, as the linen
    :class:`jpeft.models.LlamaForCausalLM` does without a cache.

    >>> import jax.numpy as jnp, jpeft
    >>> from flax import nnx
    >>> from jpeft.models import LlamaConfig
    >>> from jpeft.models.llama_nnx import LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2)
    >>> model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    >>> model(jnp.ones((1, 4), jnp.int32)).shape
    (1, 4, 32)
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        check_config(config)
        self.config = config
        self.model = LlamaModel(config, rngs)
        if not config.tie_word_embeddings:
            self.lm_head = _dense(config.hidden_size, config.vocab_size, False, config, rngs)

    def __call__(self, input_ids, attention_mask=None, *, position_ids=None, segment_ids=None, cache=None,
                 token_type_ids=None):
        if token_type_ids is not None:
            raise InputValidationError(
                "LlamaForCausalLM has no token type embeddings, so token_type_ids would change nothing (transformers' "
                "model ignores them); drop them from the batch, e.g. model(input_ids, attention_mask) instead of "
                "model(**batch)."
            )
        if cache is not None:
            raise InputValidationError(
                "the NNX Llama has no KV cache; generate with the linen model (jpeft.generate), which loads the same "
                "weights and takes the same adapters."
            )
        hidden = self.model(input_ids, attention_mask, position_ids=position_ids, segment_ids=segment_ids)
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.attend(hidden)
        return self.lm_head(hidden)


def from_params(config: LlamaConfig, params):
    """``(graphdef, state)`` of the NNX Llama holding ``params`` (the linen model's
    ``{"params": ...}`` tree, e.g. from :func:`jpeft.models.from_pretrained`)."""
    abstract = nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    return graphdef, nnx_with_params(state, unwrap_params(params)[0])
