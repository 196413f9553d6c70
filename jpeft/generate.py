"""Autoregressive generation with a KV cache, jitted, batched with padding, for any jpeft
decoder (``jpeft.models``) with or without an adapter.

The adapter goes through :func:`jpeft.apply`, so any adapter dict works (LoRA, IA3,
prefixes injected at the attention modules, bank nodes routed per example, ...).
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.core import apply
from jpeft.errors import InputValidationError
from jpeft.methods.base import check_adapter
from jpeft.models._layers import init_cache
from jpeft.tree import is_nnx
from jpeft.validate import check_key, check_token_ids, position_limit


def nucleus_tail(top_p):
    """``1 - top_p`` computed in float64 on the host, then rounded to float32: the mass of least
    likely tokens that nucleus sampling drops, as transformers' ``TopPLogitsWarper`` compares it
    (``cumulative_probs <= 1 - top_p`` with a Python float ``top_p``). Rounding ``top_p`` to float32
    first and subtracting there gives another threshold (``1 - float32(0.9)`` is ``0.100000024``,
    ``float32(1 - 0.9)`` is ``0.1``), and turns a ``top_p`` within 6e-8 of 1 into 1 (off)."""
    return np.float32(1.0 - np.asarray(top_p, np.float64))


def _filter(logits, temperature, top_k: int, tail):
    """``(logits - max) / temperature`` (the same distribution as ``logits / temperature``; a
    tiny temperature then tends to the argmax instead of overflowing to ``inf``) with every token
    outside the top-k and outside the nucleus (the smallest set of most likely tokens whose mass
    reaches ``top_p``) set to the minimum, as transformers' warpers in that order.
    ``temperature`` and ``tail`` (``nucleus_tail(top_p)``; ``0``: no nucleus filtering) are
    scalars or ``[batch, 1]`` columns (one value per row). A temperature that float32 rounds to 0
    (``generate(temperature=1e-50)``) divides by float32's smallest normal number instead: the argmax
    still, where ``0 / 0`` made it NaN."""
    temperature = jnp.maximum(temperature, jnp.finfo(jnp.float32).tiny)
    logits = (logits - jnp.max(logits, axis=-1, keepdims=True)) / temperature
    neg = jnp.finfo(logits.dtype).min
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    # ascending, as transformers' TopPLogitsWarper: the cumulative mass of the least likely tokens
    # is summed from the small end, where float32 keeps it exact enough for top_p near 1 (a
    # descending sum loses whole tokens there); among equal logits the higher id ranks higher
    order = jnp.argsort(logits, axis=-1)
    probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
    drop_sorted = (jnp.cumsum(probs, axis=-1) <= tail) & (tail > 0.0)
    drop_sorted = drop_sorted.at[:, -1].set(False)  # the most likely token always stays
    drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
    return jnp.where(drop, neg, logits)


def _sample(logits, key, temperature, top_k: int, tail, greedy: bool):
    """One token per row from ``logits [batch, vocab]`` (float32); ``tail``: ``nucleus_tail(top_p)``."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = _filter(logits, temperature, top_k, tail)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def sample_rows(logits, keys, temperature, tail):
    """One token per row with per-row options, for servers whose rows belong to different
    requests: ``logits [batch, vocab]`` (float32), ``keys [batch]`` (typed ``jax.random`` keys;
    row ``i`` samples with its own key, so its draw does not depend on the other rows),
    ``temperature [batch]`` (``0``: greedy, the argmax) and ``tail [batch]``, each row's
    ``nucleus_tail(top_p)`` (``0``: no nucleus filtering)."""
    greedy = temperature <= 0
    t = jnp.where(greedy, 1.0, temperature)[:, None]
    filtered = _filter(logits, t, 0, tail[:, None])
    drawn = jax.vmap(lambda k, lg: jax.random.categorical(k, lg))(keys, filtered)
    return jnp.where(greedy, jnp.argmax(logits, axis=-1), drawn).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "top_k", "greedy", "eos", "pad"))
def _generate(model, params, adapter, input_ids, attention_mask, key, temperature, tail, *,
              max_new_tokens: int, top_k: int, greedy: bool, eos: tuple, pad: int):
    b, s = input_ids.shape
    cfg = model.config
    # the last new token is returned, never fed back: s + max_new_tokens - 1 positions are written (a cache one
    # longer made prefix tuning's position check refuse a length transformers' generate runs)
    cache = init_cache(cfg, b, s + max_new_tokens - 1, cfg.dtype)
    logits, cache = apply(model, params, adapter, input_ids, attention_mask=attention_mask, cache=cache)
    # the next token follows each row's last real token (works for left and right padding)
    idx = jnp.arange(s)[None, :]
    last = jnp.max(jnp.where(attention_mask.astype(bool), idx, 0), axis=1)
    last_logits = logits[jnp.arange(b), last].astype(jnp.float32)
    eos_arr = jnp.asarray(eos if eos else (-1,), jnp.int32)

    def pick(lg, k, done):
        tok = _sample(lg, k, temperature, top_k, tail, greedy)
        tok = jnp.where(done, pad, tok)
        return tok, done | jnp.any(tok[:, None] == eos_arr[None, :], axis=1)

    keys = jax.random.split(key, max_new_tokens)
    tok, done = pick(last_logits, keys[0], jnp.zeros((b,), bool))
    out = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(tok)

    def body(i, carry):
        cache, tok, done, out = carry
        step_mask = jnp.ones((b, 1), attention_mask.dtype)
        lg, cache = apply(model, params, adapter, tok[:, None], attention_mask=step_mask, cache=cache)
        tok, done = pick(lg[:, -1].astype(jnp.float32), keys[i], done)
        return cache, tok, done, out.at[:, i].set(tok)

    _, _, _, out = jax.lax.fori_loop(1, max_new_tokens, body, (cache, tok, done, out))
    return jnp.concatenate([input_ids.astype(jnp.int32), out], axis=1)


def check_decoder(model, where: str) -> None:
    """Raises :class:`InputValidationError` unless ``model`` is a decoder with a key/value cache
    (its ``__call__`` takes ``cache=``, and it has ``.config``): an encoder such as BERT would
    fail deep inside tracing instead."""
    if is_nnx(model):
        raise InputValidationError(
            f"{where}: got a flax.nnx model ({type(model).__name__}); jpeft's NNX models have no key/value cache "
            "(docs/NNX.md). Generate with the linen model, which loads the same weights and takes the same adapters: "
            f"model, params = jpeft.models.from_pretrained(path), and pass those to {where}."
        )
    if getattr(model, "config", None) is None:
        raise InputValidationError(f"{where}: {type(model).__name__} has no .config; use a jpeft.models decoder.")
    try:
        params = inspect.signature(type(model).__call__).parameters
        takes_cache = "cache" in params or any(v.kind == v.VAR_KEYWORD for v in params.values())
    except (TypeError, ValueError):  # no signature to read: let the call decide
        takes_cache = True
    if not takes_cache:
        raise InputValidationError(
            f"{where}: {type(model).__name__} is not a decoder with a key/value cache (its __call__ takes no cache=); "
            "generation needs a causal LM such as jpeft.models.LlamaForCausalLM or GPT2LMHeadModel."
        )


def as_eos_ids(eos) -> tuple:
    """An end id, a list of them or ``None`` as a tuple of ints (``()`` for none)."""
    if eos is None:
        return ()
    items = (eos,) if isinstance(eos, (int, np.integer, float, str, bytes)) else eos
    try:
        items = tuple(items)
    except TypeError:
        items = (eos,)
    if any(isinstance(e, (bool, np.bool_)) or not isinstance(e, (int, np.integer)) for e in items):
        raise InputValidationError(f"eos_token_id must be a token id (int), a list of them or None, found {eos!r}.")
    return tuple(int(e) for e in items)


def generate(model, params, adapter, input_ids, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, key=None, attention_mask=None,
             eos_token_id: Optional[int | Sequence[int]] = None, pad_token_id: Optional[int] = None):
    """Generates ``max_new_tokens`` tokens after each prompt.

    Prefill runs once over the prompts, then one token per step reuses the key/value cache
    (``jax.lax.fori_loop`` inside one ``jax.jit``; recompiled only when shapes or static
    options change). Prompts are batched with padding: pass ``attention_mask`` (1 for real
    tokens); left padding is the usual layout, right padding works too (the next token
    follows each row's last real token, positions count real tokens only, and a sliding
    window does not count the padding left in the cache after a prompt's last real token).

    Args:
      model: a jpeft decoder (``LlamaForCausalLM``, ``GPT2LMHeadModel``, ... any module whose
        ``__call__`` takes ``cache=`` and has ``model.config``).
      params: the base variables ``{"params": ...}``.
      adapter: an adapter dict applied with :func:`jpeft.apply`, or ``None`` for the base.
      input_ids: int ``[batch, prompt_len]``.
      max_new_tokens: tokens to generate (``>= 1``).
      temperature: ``0`` for greedy decoding (deterministic, no key needed); ``> 0`` samples
        from ``softmax(logits / temperature)`` (a tiny one, 1e-50 included, gives the argmax: the
        limit of sampling as the temperature goes to 0).
      top_k: keep only the ``top_k`` most likely tokens when sampling (``0``: all; transformers'
        ``generate(do_sample=True)`` keeps 50 unless told otherwise: pass ``top_k=50`` to sample as it does).
      top_p: nucleus sampling: keep the most likely tokens whose probability mass reaches
        ``top_p`` (``1.0``: all).
      key: ``jax.random`` key, required when sampling. One key draws for the whole batch: row
        ``i``'s draws depend on the key and on ``i``, so a prompt at another row samples other
        tokens (``jpeft serve`` gives each request its own seed).
      attention_mask: ``[batch, prompt_len]``, 1 for real tokens (default: all ones).
      eos_token_id: token id(s) that end a row; later positions get ``pad_token_id``
        (default ``None``: never stop early; the length is fixed for ``jit``).
      pad_token_id: filler after a row ended (default ``None``: the model config's
        ``pad_token_id`` where it has one, else the first ``eos_token_id``, as transformers'
        ``generate`` fills a row, so decoding with ``skip_special_tokens=True`` drops it; a real
        token such as id 0 would read as text).

    Returns:
      int32 ``[batch, prompt_len + max_new_tokens]``: the prompts followed by the new tokens
      (as Hugging Face ``generate`` returns them).

    Raises:
      InputValidationError: bad shapes, a non-positive ``max_new_tokens``, sampling without a
        key, options out of range, more positions than the model has (GPT-2), or a model that
        is not a decoder (no ``cache=``, e.g. BERT).

    >>> import jax, jax.numpy as jnp, jpeft
    >>> cfg = jpeft.models.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...                                num_layers=1, num_heads=2)
    >>> model = jpeft.models.LlamaForCausalLM(cfg)
    >>> params = model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    >>> out = jpeft.generate(model, params, None, jnp.array([[0, 5, 6], [4, 5, 6]]), 4,
    ...                      attention_mask=jnp.array([[0, 1, 1], [1, 1, 1]]))
    >>> out.shape
    (2, 7)
    """
    try:
        # the ids stay on the host until they are checked: jnp.asarray wraps int64 ids into int32 (2**32 + 5 would
        # read as token 5, a prompt nobody wrote)
        ids_host = np.asarray(input_ids)
        if ids_host.dtype == object:
            raise ValueError("the prompts are not one rectangular array of numbers")
    except (TypeError, ValueError) as e:  # a ragged list of prompts, or values that are not numbers
        raise InputValidationError(
            f"generate: input_ids must be an int array [batch, prompt_len] ({str(e)[:120]}); pad ragged prompts to one "
            "length and pass attention_mask with 0 at the padding."
        ) from None
    if ids_host.ndim != 2 or not np.issubdtype(ids_host.dtype, np.integer):
        raise InputValidationError(
            f"generate: input_ids must be an int array [batch, prompt_len], found {ids_host.dtype} {tuple(ids_host.shape)}."
        )
    b, s = ids_host.shape
    if s == 0 or b == 0:
        raise InputValidationError("generate: input_ids is empty; give at least one prompt token per row.")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise InputValidationError(f"generate: max_new_tokens must be a positive int, found {max_new_tokens!r}.")
    # read as 0/1 on the host, where an int64 mask value cannot wrap to 0 (2**32 read as padding)
    mask_host = np.ones((b, s), bool) if attention_mask is None else np.asarray(attention_mask) != 0
    if tuple(mask_host.shape) != (b, s):
        raise InputValidationError(
            f"generate: attention_mask must have input_ids' shape {(b, s)}, found {tuple(mask_host.shape)}."
        )
    attention_mask = jnp.asarray(mask_host, jnp.int32)
    if not bool(mask_host.any(axis=1).all()):
        raise InputValidationError("generate: a row of attention_mask is all zeros; every prompt needs a real token.")
    check_decoder(model, "generate")
    if adapter is not None:  # an AdapterBank or a (config, adapter) pair was a raw TypeError from jax.jit
        check_adapter(adapter, "generate")
    cfg = model.config
    limit = position_limit(cfg)  # a learned position table (GPT-2); None for rotary models
    # the last new token is returned, never read back: s + max_new_tokens - 1 positions are read (transformers'
    # generate goes as far)
    if limit is not None and s + max_new_tokens - 1 > limit:
        raise InputValidationError(
            f"generate: prompt ({s}) + max_new_tokens ({max_new_tokens}) reads {s + max_new_tokens - 1} positions (all "
            f"but the last new token), which exceeds GPT-2's {limit} learned positions; shorten the prompt or generate "
            "fewer tokens."
        )
    try:
        temperature, top_p = float(temperature), float(top_p)
    except (TypeError, ValueError):
        raise InputValidationError(f"generate: temperature and top_p must be numbers, found {temperature!r}, {top_p!r}.") from None
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise InputValidationError(f"generate: temperature must be a finite number >= 0 (0 = greedy), found {temperature}.")
    if not 0.0 < top_p <= 1.0:
        raise InputValidationError(f"generate: top_p must be in (0, 1], found {top_p}.")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise InputValidationError(f"generate: top_k must be an int >= 0 (0 = off), found {top_k!r}.")
    # JAX clamps out-of-range gather indices silently: check real prompt tokens on the host.
    check_token_ids(np.where(mask_host, ids_host, 0), int(cfg.vocab_size))
    input_ids = jnp.asarray(ids_host)
    eos = as_eos_ids(eos_token_id)
    outside = [e for e in eos if not 0 <= e < int(cfg.vocab_size)]
    if outside:  # never generated, so never an end: the rows would run on to max_new_tokens without a word
        raise InputValidationError(
            f"generate: eos_token_id holds ids outside the vocabulary [0, {cfg.vocab_size}): {outside}; give the "
            "tokenizer's eos id(s) (tokenizer.eos_token_id), or None for no end token."
        )
    if pad_token_id is None:
        # as transformers' generate: the model's own pad id (config.json's pad_token_id, which its generation config
        # copies), else an ended row repeats its (first) end id
        own = getattr(cfg, "pad_token_id", None)
        usable = isinstance(own, (int, np.integer)) and not isinstance(own, bool) and 0 <= own < int(cfg.vocab_size)
        pad_token_id = own if usable else eos[0] if eos else 0
    if isinstance(pad_token_id, (bool, np.bool_)) or not isinstance(pad_token_id, (int, np.integer)) or not (
            0 <= int(pad_token_id) < int(cfg.vocab_size)):
        raise InputValidationError(
            f"generate: pad_token_id must be a token id in [0, {cfg.vocab_size}), found {pad_token_id}."
        )
    greedy = temperature == 0.0
    if not greedy and key is None:
        raise InputValidationError("generate: sampling (temperature > 0) needs key=jax.random.key(seed).")
    if key is not None:
        check_key(key, where="generate")
    if key is None:
        key = jax.random.key(0)
    top_k = int(min(top_k, cfg.vocab_size))
    return _generate(
        model, params, adapter if adapter else None, input_ids, attention_mask, key,
        jnp.float32(temperature if not greedy else 1.0), nucleus_tail(top_p),
        max_new_tokens=int(max_new_tokens), top_k=top_k, greedy=greedy, eos=eos,
        pad=int(pad_token_id),
    )
