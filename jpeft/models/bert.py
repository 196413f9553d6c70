"""BERT (encoder) with a sequence-classification, token-classification or question-answering
head, as ``flax.linen`` modules named like Hugging Face's (``bert/encoder/layer_0/attention/self/query``,
``classifier``, ``qa_outputs``, ...), and the two token-level heads' losses as transformers computes them.

>>> import jax, jax.numpy as jnp, jpeft
>>> cfg = jpeft.models.BertConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4,
...                               intermediate_size=64, num_labels=3)
>>> model = jpeft.models.BertForSequenceClassification(cfg)
>>> ids = jnp.ones((2, 6), jnp.int32)
>>> model.apply(model.init(jax.random.key(0), ids), ids).shape
(2, 3)
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jpeft._ops import activation, segment_slots
from jpeft.errors import ConfigError, InputValidationError
from jpeft.validate import check_token_ids
from jpeft.models import _layers as L


@dataclasses.dataclass(frozen=True)
class BertConfig(L.FullHeadsConfig):
    """Configuration of BERT (Hugging Face names in brackets).

    Args:
      vocab_size, hidden_size, num_layers [num_hidden_layers], num_heads [num_attention_heads],
      intermediate_size, max_position_embeddings, type_vocab_size, layer_norm_eps,
      hidden_act (``"gelu"``, exact), hidden_dropout_prob, attention_probs_dropout_prob (active
      with ``deterministic=False`` and a ``"dropout"`` rng), num_labels (classifier outputs,
      from ``id2label`` when loading), problem_type and label_names (``id2label``'s names;
      kept so that a saved model gets transformers' loss and labels back), task (the head, as
      config.json's ``architectures`` names it: ``"sequence_classification"``,
      ``"token_classification"``, ``"question_answering"``, which needs ``num_labels=2``, or
      ``"multiple_choice"``, whose classifier has one output whatever ``num_labels`` says; it picks
      the model :func:`~jpeft.models.from_pretrained` builds and the architecture
      :func:`~jpeft.models.save_pretrained` writes), initializer_range, dtype, param_dtype, remat,
      remat_policy, attention, attention_block_size (as in :class:`~jpeft.models.LlamaConfig`).
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    classifier_dropout: Optional[float] = None  # the classifier's input dropout; None: hidden_dropout_prob
    num_labels: int = 2
    problem_type: Optional[str] = None  # transformers' loss choice: regression / single_ / multi_label_classification
    label_names: Optional[tuple] = None  # id2label's names in id order (None: LABEL_0, LABEL_1, ...)
    task: Literal["sequence_classification", "token_classification", "question_answering",
                  "multiple_choice"] = "sequence_classification"
    model_type: str = "bert"
    initializer_range: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False
    remat_policy: Optional[str] = None
    attention: str = "auto"
    attention_block_size: int = 0
    pad_token_id: Any = 0
    # default position ids are the slot indices (arange), padding included, as transformers' BERT numbers
    # them; prefix tuning shifts these (not the real-token count) by its virtual tokens, as PEFT's BERT does
    positions_by_slot: ClassVar[bool] = True

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"BertConfig: hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})."
            )
        if not isinstance(self.num_labels, int) or self.num_labels <= 0:
            raise ConfigError(f"BertConfig.num_labels must be a positive integer, found {self.num_labels!r}.")
        kinds = (None, "regression", "single_label_classification", "multi_label_classification")
        if self.problem_type not in kinds:
            raise ConfigError(f"BertConfig.problem_type must be one of {kinds}, found {self.problem_type!r}.")
        if self.label_names is not None:
            object.__setattr__(self, "label_names", tuple(str(n) for n in self.label_names))
            if len(self.label_names) != self.num_labels:
                raise ConfigError(
                    f"BertConfig.label_names has {len(self.label_names)} names for num_labels={self.num_labels}."
                )
        if self.task not in TASKS:
            raise ConfigError(f"BertConfig.task must be one of {TASKS}, found {self.task!r}.")
        if self.task == "question_answering" and self.num_labels != 2:
            raise ConfigError(
                f"BertConfig: task='question_answering' has a head of 2 outputs (start and end logits, as "
                f"transformers' BertForQuestionAnswering splits it), found num_labels={self.num_labels}. Set num_labels=2."
            )
        self._finish("BertConfig")


TASKS = ("sequence_classification", "token_classification", "question_answering", "multiple_choice")


def _ln(c, name):
    return L.layer_norm(c.layer_norm_eps, c.dtype, c.param_dtype, name)


class BertEmbeddings(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, input_ids, token_type_ids, position_ids, inputs_embeds=None, deterministic=True):
        c = self.config
        init = nn.initializers.normal(c.initializer_range)
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype, embedding_init=init)
        if inputs_embeds is None:
            inputs_embeds = nn.Embed(c.vocab_size, c.hidden_size, name="word_embeddings", **kw)(input_ids)
        else:
            nn.Embed(c.vocab_size, c.hidden_size, name="word_embeddings", **kw)  # keep the parameter
        h = inputs_embeds
        h = h + nn.Embed(c.max_position_embeddings, c.hidden_size, name="position_embeddings", **kw)(position_ids)
        h = h + nn.Embed(c.type_vocab_size, c.hidden_size, name="token_type_embeddings", **kw)(token_type_ids)
        h = _ln(c, "LayerNorm")(h)
        return nn.Dropout(c.hidden_dropout_prob)(h, deterministic=deterministic)


class BertSelfAttention(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, hidden, mask, prefix_kv=None, deterministic: bool = True):
        c = self.config
        b, s, d = hidden.shape
        shape = (b, s, c.num_heads, c.head_dim)
        q = L.dense(d, True, c, "query")(hidden).reshape(shape)
        k = L.dense(d, True, c, "key")(hidden).reshape(shape)
        v = L.dense(d, True, c, "value")(hidden).reshape(shape)
        prefix_kv = L.check_prefix(prefix_kv, b, c.num_heads, c.head_dim, "attention/self")
        rate = c.attention_probs_dropout_prob
        out, _ = L.attend(q, k, v, mask, scale=c.head_dim ** -0.5, prefix_kv=prefix_kv, dtype=c.dtype,
                          implementation=c.attention, block_size=c.attention_block_size,
                          dropout_rate=rate, dropout_key=L.attention_dropout_key(self, rate, deterministic))
        return out.reshape(b, s, d)


class BertSelfOutput(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, h, residual, deterministic: bool = True):
        c = self.config
        h = nn.Dropout(c.hidden_dropout_prob)(L.dense(c.hidden_size, True, c, "dense")(h), deterministic=deterministic)
        return _ln(c, "LayerNorm")(h + residual)


class BertAttention(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, hidden, mask, prefix_kv=None, deterministic: bool = True):
        a = BertSelfAttention(self.config, name="self")(hidden, mask, prefix_kv=prefix_kv, deterministic=deterministic)
        return BertSelfOutput(self.config, name="output")(a, hidden, deterministic=deterministic)


class BertIntermediate(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, h):
        c = self.config
        return activation(c.hidden_act)(L.dense(c.intermediate_size, True, c, "dense")(h))


class BertLayer(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, hidden, mask, prefix_kv=None, deterministic: bool = True):
        c = self.config
        a = BertAttention(c, name="attention")(hidden, mask, prefix_kv=prefix_kv, deterministic=deterministic)
        i = BertIntermediate(c, name="intermediate")(a)
        return BertSelfOutput(c, name="output")(i, a, deterministic=deterministic)


class BertEncoder(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, hidden, mask, prefix_kv=None, deterministic: bool = True):
        c = self.config
        layer_cls = L.remat_wrap(BertLayer, c, static_argnums=(4,))
        for i in range(c.num_layers):
            hidden = layer_cls(c, name=f"layer_{i}")(hidden, mask, None if prefix_kv is None else prefix_kv[i], deterministic)
        return hidden


class BertPooler(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, h):
        return jnp.tanh(L.dense(self.config.hidden_size, True, self.config, "dense")(h[:, 0]))


def _check_broadcasts(name: str, value, b: int, s: int) -> None:
    """Raises :class:`InputValidationError` unless ``value``'s shape broadcasts to the inputs' ``(b, s)``."""
    shape = tuple(jnp.shape(value))
    if len(shape) > 2 or any(n not in (1, want) for n, want in zip(shape[::-1], (s, b))):
        raise InputValidationError(
            f"BertModel: {name} must have the shape of the inputs {(b, s)} (or one that broadcasts to it, such as "
            f"{(1, s)}), found {shape}."
        )


class BertModel(nn.Module):
    """``embeddings``, ``encoder/layer_{i}``, ``pooler``. Returns ``(sequence_output, pooled)``;
    with ``add_pooling_layer=False`` (transformers' token-classification and question-answering
    models) there is no ``pooler`` and ``pooled`` is ``None``."""

    config: BertConfig
    add_pooling_layer: bool = True

    @nn.compact
    def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, *, inputs_embeds=None,
                 position_ids=None, segment_ids=None, prefix_kv=None, deterministic=True):
        c = self.config
        b, s = L.check_ids_mask(input_ids, attention_mask, inputs_embeds, "BertModel", self.config.vocab_size,
                                self.config.hidden_size)
        if s == 0:
            raise InputValidationError(
                "BertModel: the inputs have no tokens (shape (batch, 0)); the pooler reads the first token ([CLS]). "
                "Give every row at least one token."
            )
        input_ids = L.padding_ids_in_range(input_ids, attention_mask, self.config.vocab_size)
        padded = attention_mask is not None
        if attention_mask is None:
            attention_mask = jnp.ones((b, s), bool)
        if token_type_ids is None:
            token_type_ids = jnp.zeros((b, s), jnp.int32)
        else:
            # another shape failed in the embedding sum with a raw TypeError (a (batch, 1) one broadcasts, as in
            # transformers)
            _check_broadcasts("token_type_ids", token_type_ids, b, s)
            if not isinstance(token_type_ids, jax.core.Tracer):
                # the gather would silently wrap a negative type to another row, or give NaN past the table
                # (transformers raises IndexError)
                check_token_ids(token_type_ids, c.type_vocab_size, name="BertModel: token_type_ids")
            token_type_ids = jnp.broadcast_to(token_type_ids, (b, s))
        if position_ids is not None:
            _check_broadcasts("position_ids", position_ids, b, s)
        if position_ids is None and segment_ids is None and s > c.max_position_embeddings:
            raise InputValidationError(
                f"BertModel: sequences of length {s} are longer than the model's {c.max_position_embeddings} "
                "positions (max_position_embeddings); truncate them (transformers refuses them too)."
            )
        if position_ids is None and segment_ids is not None:
            position_ids = segment_slots(segment_ids.astype(jnp.int32))
        elif position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(s), (b, s))
        position_ids = L.learned_positions(jnp.broadcast_to(position_ids, (b, s)), attention_mask,
                                           c.max_position_embeddings, "BertModel")
        h = BertEmbeddings(c, name="embeddings")(input_ids, token_type_ids, position_ids, inputs_embeds, deterministic)
        mask = L.bidirectional_mask(attention_mask, segment_ids=segment_ids, padded=padded)
        h = BertEncoder(c, name="encoder")(h, mask, prefix_kv, deterministic)
        return h, (BertPooler(c, name="pooler")(h) if self.add_pooling_layer else None)


def _encode(c: BertConfig, pool: bool, input_ids, attention_mask, token_type_ids, inputs_embeds, position_ids,
            prefix_kv, deterministic):
    """The ``bert`` submodule of a task head (called inside the head's compact ``__call__``)."""
    return BertModel(c, add_pooling_layer=pool, name="bert")(
        input_ids, attention_mask, token_type_ids, inputs_embeds=inputs_embeds, position_ids=position_ids,
        prefix_kv=prefix_kv, deterministic=deterministic,
    )


def _classifier_dropout(c: BertConfig) -> nn.Dropout:
    return nn.Dropout(c.hidden_dropout_prob if c.classifier_dropout is None else c.classifier_dropout)


class BertForSequenceClassification(nn.Module):
    """BERT + pooler + ``classifier``: ``__call__(input_ids=None, attention_mask=None,
    token_type_ids=None, *, inputs_embeds=None, position_ids=None, prefix_kv=None,
    deterministic=True)`` returns logits ``[batch, num_labels]``. Positions default to
    ``arange(seq)`` as in Hugging Face (BERT is usually right-padded)."""

    config: BertConfig
    task = "sequence_classification"  # BertConfig.task of this head (what save_pretrained writes)

    @nn.compact
    def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, *, inputs_embeds=None,
                 position_ids=None, prefix_kv=None, deterministic=True):
        c = self.config
        _, pooled = _encode(c, True, input_ids, attention_mask, token_type_ids, inputs_embeds, position_ids,
                            prefix_kv, deterministic)
        pooled = _classifier_dropout(c)(pooled, deterministic=deterministic)
        return L.dense(c.num_labels, True, c, "classifier")(pooled)


class BertForTokenClassification(nn.Module):
    """BERT without a pooler + ``classifier`` on every token's hidden state (transformers'
    ``BertForTokenClassification``, PEFT's task type ``TOKEN_CLS``): the call of
    :class:`BertForSequenceClassification` returns logits ``[batch, seq, num_labels]``; the
    loss is :func:`token_classification_loss`.

    >>> import jax, jax.numpy as jnp, jpeft
    >>> cfg = jpeft.models.BertConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4,
    ...                               intermediate_size=64, num_labels=5, task="token_classification")
    >>> model = jpeft.models.BertForTokenClassification(cfg)
    >>> ids = jnp.ones((2, 6), jnp.int32)
    >>> model.apply(model.init(jax.random.key(0), ids), ids).shape
    (2, 6, 5)
    """

    config: BertConfig
    task = "token_classification"
    per_token_outputs: ClassVar[bool] = True  # axis 1 of every output is the sequence (prompt tuning cuts it)

    @nn.compact
    def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, *, inputs_embeds=None,
                 position_ids=None, prefix_kv=None, deterministic=True):
        c = self.config
        h, _ = _encode(c, False, input_ids, attention_mask, token_type_ids, inputs_embeds, position_ids,
                       prefix_kv, deterministic)
        h = _classifier_dropout(c)(h, deterministic=deterministic)
        return L.dense(c.num_labels, True, c, "classifier")(h)


class BertForQuestionAnswering(nn.Module):
    """BERT without a pooler + ``qa_outputs`` (2 outputs) on every token's hidden state
    (transformers' ``BertForQuestionAnswering``, PEFT's task type ``QUESTION_ANS``): the call of
    :class:`BertForSequenceClassification` returns ``(start_logits, end_logits)``, each
    ``[batch, seq]``; the loss is :func:`question_answering_loss`. Needs ``num_labels=2``."""

    config: BertConfig
    task = "question_answering"
    per_token_outputs: ClassVar[bool] = True  # start and end logits [batch, seq]: prompt tuning cuts the virtual tokens

    @nn.compact
    def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, *, inputs_embeds=None,
                 position_ids=None, prefix_kv=None, deterministic=True):
        c = self.config
        if c.num_labels != 2:  # a config made with another task: as BertConfig(task='question_answering') says
            raise ConfigError(f"BertForQuestionAnswering needs num_labels=2 (start and end logits), found {c.num_labels}.")
        h, _ = _encode(c, False, input_ids, attention_mask, token_type_ids, inputs_embeds, position_ids,
                       prefix_kv, deterministic)
        logits = L.dense(2, True, c, "qa_outputs")(h)
        return logits[..., 0], logits[..., 1]


class BertForMultipleChoice(nn.Module):
    """BERT + pooler + ``classifier`` of one output, scoring each choice (transformers'
    ``BertForMultipleChoice``): inputs ``[batch, choices, seq]`` (``inputs_embeds``
    ``[batch, choices, seq, hidden]``), each choice encoded as a row of its own; returns logits
    ``[batch, choices]``; the loss is :func:`multiple_choice_loss`. PEFT has no task type for it (a
    plain ``PeftModel``). Prompt and prefix tuning, which add positions to ``[batch, seq]`` inputs,
    are refused by name.

    >>> import jax, jax.numpy as jnp, jpeft
    >>> cfg = jpeft.models.BertConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4,
    ...                               intermediate_size=64, task="multiple_choice")
    >>> model = jpeft.models.BertForMultipleChoice(cfg)
    >>> ids = jnp.ones((2, 4, 6), jnp.int32)
    >>> model.apply(model.init(jax.random.key(0), ids), ids).shape
    (2, 4)
    """

    config: BertConfig
    task = "multiple_choice"

    @nn.compact
    def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, *, inputs_embeds=None,
                 position_ids=None, deterministic=True):
        c = self.config
        x, rank, what = ((input_ids, 3, "input_ids [batch, choices, seq]") if input_ids is not None
                         else (inputs_embeds, 4, "inputs_embeds [batch, choices, seq, hidden]"))
        if x is None or jnp.ndim(x) != rank:
            raise InputValidationError(
                f"BertForMultipleChoice: pass {what} (one row of tokens per choice), found "
                f"{None if x is None else tuple(jnp.shape(x))}."
            )
        b, k, s = jnp.shape(x)[:3]
        for name, v in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids),
                        ("position_ids", position_ids)):
            if v is not None and tuple(jnp.shape(v)) != (b, k, s):
                raise InputValidationError(
                    f"BertForMultipleChoice: {name} must have the inputs' shape {(b, k, s)}, found {tuple(jnp.shape(v))}.")

        def rows(v):  # [batch, choices, seq, ...] -> [batch * choices, seq, ...], as transformers' view(-1, seq)
            return None if v is None else jnp.reshape(v, (b * k,) + tuple(jnp.shape(v))[2:])

        _, pooled = _encode(c, True, rows(input_ids), rows(attention_mask), rows(token_type_ids), rows(inputs_embeds),
                            rows(position_ids), None, deterministic)
        pooled = _classifier_dropout(c)(pooled, deterministic=deterministic)
        return L.dense(1, True, c, "classifier")(pooled).reshape(b, k)


TASK_MODELS = {m.task: m for m in (BertForSequenceClassification, BertForTokenClassification, BertForQuestionAnswering,
                                   BertForMultipleChoice)}


def token_classification_loss(logits, labels, *, ignore_index: int = -100):
    """Mean cross-entropy over the tokens whose label is not ``ignore_index`` (transformers'
    ``BertForTokenClassification`` loss: ``CrossEntropyLoss`` with its ``-100``). ``logits``
    ``[batch, seq, num_labels]``, ``labels`` ``[batch, seq]`` integers. No labelled token gives NaN,
    as in transformers. Raises :class:`InputValidationError` for labels of another shape, or outside
    ``[0, num_labels)`` (transformers raises too); under ``jit``, where the values are not known,
    such a label makes the loss NaN rather than a number computed from a clamped label."""
    labels = jnp.asarray(labels)
    if tuple(labels.shape) != tuple(jnp.shape(logits))[:-1]:
        raise InputValidationError(
            f"token_classification_loss: labels must have the logits' shape without the label axis, "
            f"{tuple(jnp.shape(logits))[:-1]}, found {tuple(labels.shape)}."
        )
    n = jnp.shape(logits)[-1]
    keep = labels != ignore_index
    bad = keep & ((labels < 0) | (labels >= n))
    if not isinstance(bad, jax.core.Tracer) and bool(jnp.any(bad)):
        raise InputValidationError(
            f"token_classification_loss: label {int(labels[bad][0])} is outside [0, {n}) (the logits' labels) and is "
            f"not ignore_index ({ignore_index}); mark tokens without a label {ignore_index}."
        )
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), jnp.where(keep & ~bad, labels, 0))
    loss = jnp.sum(jnp.where(keep, ce, 0.0)) / jnp.sum(keep)
    return jnp.where(jnp.any(bad), jnp.nan, loss)


def question_answering_loss(start_logits, end_logits, start_positions, end_positions):
    """transformers' ``BertForQuestionAnswering`` loss: the mean of the start and the end
    cross-entropies, each averaged over the rows; positions are clamped to ``[0, seq]`` and a
    position of ``seq`` (an answer outside the sequence) is ignored. Logits ``[batch, seq]``,
    positions ``[batch]`` integers."""
    b, s = jnp.shape(start_logits)
    for name, x in (("start_positions", start_positions), ("end_positions", end_positions)):
        if tuple(jnp.shape(x)) != (b,):
            raise InputValidationError(
                f"question_answering_loss: {name} must have shape {(b,)}, found {tuple(jnp.shape(x))}.")

    def ce(logits, pos):
        pos = jnp.clip(pos, 0, s)
        keep = pos != s
        per = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), jnp.where(keep, pos, 0))
        return jnp.sum(jnp.where(keep, per, 0.0)) / jnp.sum(keep)

    return (ce(start_logits, start_positions) + ce(end_logits, end_positions)) / 2


def multiple_choice_loss(logits, labels):
    """transformers' ``BertForMultipleChoice`` loss: the mean cross-entropy of the right choice
    over the rows whose label is not ``-100``. ``logits`` ``[batch, choices]``, ``labels``
    ``[batch]`` integers (checked as :func:`token_classification_loss` checks its labels)."""
    labels = jnp.asarray(labels)
    b = jnp.shape(logits)[0]
    if jnp.ndim(logits) != 2 or tuple(labels.shape) != (b,):
        raise InputValidationError(
            f"multiple_choice_loss: logits must be [batch, choices] and labels [batch], found "
            f"{tuple(jnp.shape(logits))} and {tuple(labels.shape)}."
        )
    try:
        return token_classification_loss(jnp.asarray(logits)[:, None], labels[:, None])
    except InputValidationError as e:  # a label outside the choices: said for this loss
        raise InputValidationError(str(e).replace("token_classification_loss", "multiple_choice_loss")) from None
