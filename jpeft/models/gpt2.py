"""GPT-2 as a ``flax.linen`` module with Hugging Face's module names
(``transformer/h_0/attn/c_attn``, ``transformer/h_0/mlp/c_fc``, ...).

Hugging Face's GPT-2 uses ``Conv1D`` layers whose weight is stored ``[in, out]``; that is
exactly the layout of a Flax ``nn.Dense`` kernel, so jpeft's ``c_attn``/``c_proj``/``c_fc``
are plain ``nn.Dense`` modules and load the weights untransposed. (Hugging Face PEFT marks
such targets with ``fan_in_fan_out=True``; :func:`jpeft.hf.save_peft` sets it.)

>>> import jax, jax.numpy as jnp, jpeft
>>> cfg = jpeft.models.GPT2Config(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4,
...                               max_position_embeddings=16)
>>> model = jpeft.models.GPT2LMHeadModel(cfg)
>>> ids = jnp.ones((1, 4), jnp.int32)
>>> model.apply(model.init(jax.random.key(0), ids), ids).shape
(1, 4, 50)
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jpeft._ops import activation
from jpeft.errors import ConfigError, InputValidationError
from jpeft.validate import check_token_ids
from jpeft.models import _layers as L


@dataclasses.dataclass(frozen=True)
class GPT2Config(L.FullHeadsConfig):
    """Configuration of GPT-2 (Hugging Face names in brackets).

    Args:
      vocab_size, hidden_size [n_embd], num_layers [n_layer], num_heads [n_head].
      intermediate_size [n_inner]: default ``4 * hidden_size``.
      max_position_embeddings [n_positions]: number of learned positions.
      layer_norm_epsilon, hidden_act [activation_function] (``"gelu_new"``).
      scale_attn_weights: divide scores by ``sqrt(head_dim)``.
      scale_attn_by_inverse_layer_idx: also divide by ``layer_idx + 1``.
      embd_pdrop, resid_pdrop, attn_pdrop: dropout rates of the embeddings, the residual
        branches and the attention probabilities (active with ``deterministic=False`` and a
        ``"dropout"`` rng).
      tie_word_embeddings: logits use ``wte`` (GPT-2's default).
      dtype, param_dtype, remat, remat_policy, initializer_range, attention,
        attention_block_size: as in :class:`LlamaConfig`.
    """

    vocab_size: int = 50257
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: Optional[int] = None
    max_position_embeddings: int = 1024
    layer_norm_epsilon: float = 1e-5
    hidden_act: str = "gelu_new"
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    embd_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    tie_word_embeddings: bool = True
    model_type: str = "gpt2"
    initializer_range: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False
    remat_policy: Optional[str] = None
    attention: str = "auto"
    attention_block_size: int = 0
    bos_token_id: Any = None
    eos_token_id: Any = None
    pad_token_id: Any = None

    def __post_init__(self):
        self._note_derived("intermediate_size")
        if self.intermediate_size is None:
            object.__setattr__(self, "intermediate_size", 4 * self.hidden_size)
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"GPT2Config: hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})."
            )
        self._finish("GPT2Config")


class GPT2Attention(nn.Module):
    config: GPT2Config
    layer_idx: int = 0

    @nn.compact
    def __call__(self, hidden, mask, cache=None, prefix_kv=None, deterministic: bool = True):
        c = self.config
        b, s, d = hidden.shape
        qkv = L.dense(3 * d, True, c, "c_attn")(hidden)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        q = q.reshape(b, s, c.num_heads, c.head_dim)
        k = k.reshape(b, s, c.num_heads, c.head_dim)
        v = v.reshape(b, s, c.num_heads, c.head_dim)
        scale = (c.head_dim ** -0.5) if c.scale_attn_weights else 1.0
        if c.scale_attn_by_inverse_layer_idx:
            scale = scale / float(self.layer_idx + 1)
        prefix_kv = L.check_prefix(prefix_kv, b, c.num_heads, c.head_dim, "attn")
        out, new = L.attend(q, k, v, mask, scale=scale, cache_layer=cache, prefix_kv=prefix_kv, dtype=c.dtype,
                            implementation=c.attention, block_size=c.attention_block_size,
                            dropout_rate=c.attn_pdrop, dropout_key=L.attention_dropout_key(self, c.attn_pdrop, deterministic))
        out = L.dense(d, True, c, "c_proj")(out.reshape(b, s, d))
        out = nn.Dropout(c.resid_pdrop)(out, deterministic=deterministic)
        return out if cache is None else (out, new)


class GPT2MLP(nn.Module):
    config: GPT2Config

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        c = self.config
        h = activation(c.hidden_act)(L.dense(c.intermediate_size, True, c, "c_fc")(x))
        h = L.dense(c.hidden_size, True, c, "c_proj")(h)
        return nn.Dropout(c.resid_pdrop)(h, deterministic=deterministic)


class GPT2Block(nn.Module):
    config: GPT2Config
    layer_idx: int = 0

    @nn.compact
    def __call__(self, hidden, mask, cache=None, prefix_kv=None, deterministic: bool = True):
        c = self.config
        h = L.layer_norm(c.layer_norm_epsilon, c.dtype, c.param_dtype, "ln_1")(hidden)
        a = GPT2Attention(c, self.layer_idx, name="attn")(h, mask, cache=cache, prefix_kv=prefix_kv, deterministic=deterministic)
        new = None
        if cache is not None:
            a, new = a
        hidden = hidden + a
        h = L.layer_norm(c.layer_norm_epsilon, c.dtype, c.param_dtype, "ln_2")(hidden)
        hidden = hidden + GPT2MLP(c, name="mlp")(h, deterministic=deterministic)
        return hidden if cache is None else (hidden, new)


class GPT2Model(nn.Module):
    """``wte``, ``wpe``, ``h_{i}``, ``ln_f``."""

    config: GPT2Config

    def setup(self):
        c = self.config
        init = nn.initializers.normal(c.initializer_range)
        self.wte = L.Embed(c.vocab_size, c.hidden_size, dtype=c.dtype, param_dtype=c.param_dtype, embedding_init=init)
        self.wpe = nn.Embed(c.max_position_embeddings, c.hidden_size, dtype=c.dtype, param_dtype=c.param_dtype,
                            embedding_init=init)
        block = L.remat_wrap(GPT2Block, c, static_argnums=(5,))
        self.h = [block(c, i) for i in range(c.num_layers)]
        self.ln_f = L.layer_norm(c.layer_norm_epsilon, c.dtype, c.param_dtype, "ln_f")
        self.drop = nn.Dropout(c.embd_pdrop)

    def __call__(self, input_ids=None, attention_mask=None, *, inputs_embeds=None, position_ids=None,
                 segment_ids=None, cache=None, prefix_kv=None, deterministic=True, token_type_ids=None):
        """``token_type_ids`` (``[batch, seq]`` ids, as transformers' ``GPT2Model`` takes them) add
        ``wte(token_type_ids)`` to the embeddings: GPT-2 has no token type table of its own."""
        c = self.config
        hidden, attention_mask, position_ids, padded = L.decoder_inputs(
            input_ids, attention_mask, inputs_embeds, position_ids, cache, self.wte, "GPT2Model", segment_ids
        )
        L.check_prefix_count(prefix_kv, c.num_layers)
        if cache is None and hidden.shape[1] > c.max_position_embeddings:
            # the position table would be read past its end (NaN, silently); transformers raises too
            raise InputValidationError(
                f"GPT2Model: sequences of {hidden.shape[1]} positions are longer than the model's "
                f"{c.max_position_embeddings} (max_position_embeddings / n_positions); truncate them."
            )
        position_ids = L.learned_positions(position_ids, attention_mask, c.max_position_embeddings, "GPT2Model")
        hidden = hidden + self.wpe(position_ids)
        if token_type_ids is not None:
            if prefix_kv is not None:
                raise InputValidationError(
                    "GPT2Model: token_type_ids cannot be used with prefix tuning (Hugging Face PEFT drops them there "
                    "with a warning, so the results would differ); pass no token_type_ids."
                )
            hidden = hidden + self._token_type_embeds(token_type_ids, hidden.shape[:2], attention_mask)
        hidden = hidden.astype(c.dtype)
        hidden = self.drop(hidden, deterministic=deterministic)
        mask, kv_valid = L.causal_mask(attention_mask, cache, segment_ids=segment_ids, padded=padded)

        def call(i, block, hidden, layer_cache):
            return block(hidden, mask, layer_cache, None if prefix_kv is None else prefix_kv[i], deterministic)

        hidden, new_cache = L.run_unrolled(self.h, hidden, cache, kv_valid, call)
        return self.ln_f(hidden), new_cache

    def _token_type_embeds(self, token_type_ids, shape, attention_mask):
        """``wte(token_type_ids)``, as transformers adds it. Raises :class:`InputValidationError` for ids
        that are not integers of the inputs' shape or are out of the vocabulary (concrete ids; the gather
        would clamp them). Prompt tuning refuses token types on a causal LM before this is reached."""
        b, s = shape
        tt = token_type_ids
        if jnp.ndim(tt) != 2 or not jnp.issubdtype(jnp.asarray(tt).dtype, jnp.integer) \
                or tt.shape[1] != s or tt.shape[0] not in (1, b):
            raise InputValidationError(
                f"GPT2Model: token_type_ids must be integer ids of shape {(b, s)} (the inputs' shape), found "
                f"{getattr(tt, 'dtype', type(tt).__name__)} {tuple(jnp.shape(tt))}."
            )
        tt = jnp.broadcast_to(tt, (b, s))
        vocab = self.config.vocab_size
        if not any(isinstance(x, jax.core.Tracer) for x in (tt, attention_mask)):
            # the gather would silently clamp an id to another row (transformers raises IndexError)
            ids = np.where(np.asarray(attention_mask).astype(bool), np.asarray(tt), 0)  # padding reads no row
            check_token_ids(ids, vocab, name="GPT2Model: token_type_ids")
        return self.wte(L.padding_ids_in_range(tt, attention_mask, vocab))


class GPT2LMHeadModel(L.CausalLM):
    """GPT-2 with its language-model head (tied to ``wte`` unless ``tie_word_embeddings=False``).

    Same call signature and outputs as :class:`~jpeft.models.LlamaForCausalLM`; learned
    positions default to ``cumsum(attention_mask) - 1``.
    """

    config: GPT2Config
    trunk_name: ClassVar[str] = "transformer"
    trunk_class: ClassVar[type] = GPT2Model
    embed_name: ClassVar[str] = "wte"
    takes_token_type_ids: ClassVar[bool] = True
