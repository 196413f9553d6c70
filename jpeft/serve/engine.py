"""The continuous-batching engine behind ``jpeft serve``: one frozen base, an
:class:`~jpeft.bank.AdapterBank` of LoRA adapters, a fixed number of decode slots.

* **Slots.** The KV cache holds ``slots`` rows; each row has its own write index (the cache's
  ``index`` is a ``[slots]`` vector, :class:`jpeft.models.KVCache`), so a finished sequence's row
  is reused at once by the next waiting request while the other rows keep decoding.
* **One decode step** for every busy row at once, whatever adapters they use: each row is routed
  to its own bank slot (:func:`jpeft.bank.route`; the bank's stacked weights are arguments of
  the jitted step, so adding, replacing or removing adapters never recompiles). Rows that are
  free or still prefilling ride along masked out.
* **Chunked prefill.** A prompt enters its row ``chunk`` tokens at a time, one chunk per engine
  iteration, interleaved with the decode steps: a long prompt delays the others' next token by
  one chunk's compute, never by the whole prompt.
* Exactly two compiled programs (``prefill``: ``[1, chunk]``; ``decode``: ``[slots, 1]``);
  :attr:`Engine.traces` counts how often each was traced (1 each in a healthy server).
* **Bounded.** At most ``max_queue`` requests wait for a slot (:class:`~jpeft.errors.OverloadedError`
  past that); a request that waits longer than ``queue_timeout`` or runs longer than
  ``request_timeout`` seconds ends with a ``timeout`` event; :meth:`Engine.cancel` (a client that
  went away) frees its row at the next iteration.

The engine runs in its own thread and talks to callers through events passed to each
request's ``sink`` (called from the engine thread; the HTTP layer forwards them to its event
loop). It knows nothing of HTTP.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import threading
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.bank import DEFAULT_STRATEGY, AdapterBank, route
from jpeft.core import apply
from jpeft.errors import (
    BankCapacityError,
    ConfigError,
    InputValidationError,
    OverloadedError,
    PromptTooLongError,
    UnknownAdapterError,
)
from jpeft.generate import as_eos_ids, check_decoder, nucleus_tail, sample_rows
from jpeft.models._layers import KVCache, init_cache, rope_fixed_length
from jpeft.validate import position_limit


class Event(NamedTuple):
    """What the engine tells a request's ``sink``.

    ``kind``: ``"text"`` (new ``text`` and the ``token_ids`` it came from: every token generated
    since the previous text event, those whose text was held back, such as the first bytes of a
    character, included; the last one may have empty text: the ids of tokens that made none, such as
    a special token), ``"done"``
    (``finish_reason``: ``"stop"`` or ``"length"``; ``usage``), or ``"error"`` (``error``: a
    short code, ``"timeout"`` or ``"engine"``, with ``message``).
    """

    kind: str
    text: str = ""
    token_ids: tuple = ()
    finish_reason: Optional[str] = None
    usage: Optional[dict] = None
    error: Optional[str] = None
    message: str = ""


@dataclasses.dataclass(eq=False)
class Request:
    """One generation request.

    Args:
      prompt_ids: the prompt's token ids.
      adapter: the adapter's name in the bank, ``None`` for the bare base.
      max_tokens: tokens to generate at most.
      temperature: ``0`` greedy; else sampling from ``softmax(logits / temperature)``.
      top_p: nucleus sampling mass (``1``: off).
      seed: the sampling seed (the same seed, prompt and options give the same text whatever
        else is in the batch); ``None`` draws one.
      stop: a string, or strings, that end the generation (not included in the text).
      sink: ``callable(Event)``, called from the engine thread.
    """

    prompt_ids: Sequence[int]
    adapter: Optional[str]
    max_tokens: int
    sink: Callable[[Event], Any]
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: tuple = ()
    # engine state
    id: int = 0
    created: float = 0.0
    started: Optional[float] = None
    cancelled: bool = False
    prefilled: int = 0
    generated: list = dataclasses.field(default_factory=list)
    emitted: str = ""
    unsent: list = dataclasses.field(default_factory=list)  # generated ids not yet in a text event
    done: bool = False


_SEEDS = np.random.default_rng()


def _is_scalar(v, kinds) -> bool:
    """Whether ``v`` is one number of the numpy dtype ``kinds`` (a Python, numpy or 0-d jax/numpy
    array one), not a bool or a string."""
    if isinstance(v, (bool, np.bool_, str, bytes)) or np.ndim(v) != 0:
        return False
    return any(np.issubdtype(np.asarray(v).dtype, k) for k in kinds)


def _is_int(v) -> bool:
    """Whether ``v`` is one integer: a Python int of any size (a JSON seed may exceed int64, where
    numpy makes an object array of it), or a numpy or 0-d jax/numpy integer; not a bool."""
    if isinstance(v, (bool, np.bool_)):
        return False
    return isinstance(v, int) or _is_scalar(v, (np.integer,))


def _slice_rows(cache: KVCache, slot):
    """Row ``slot`` of every cache array (a batch-1 :class:`KVCache`)."""
    stacked = not isinstance(cache.keys, (tuple, list))
    take = (lambda a: jax.lax.dynamic_slice_in_dim(a, slot, 1, axis=1)) if stacked else (
        lambda a: jax.lax.dynamic_slice_in_dim(a, slot, 1, axis=0))
    keys = take(cache.keys) if stacked else tuple(take(k) for k in cache.keys)
    values = take(cache.values) if stacked else tuple(take(v) for v in cache.values)
    mask = jax.lax.dynamic_slice_in_dim(cache.mask, slot, 1, axis=0)
    index = jax.lax.dynamic_slice_in_dim(cache.index, slot, 1, axis=0)
    return KVCache(keys, values, mask, index)


def _put_rows(cache: KVCache, row: KVCache, slot) -> KVCache:
    stacked = not isinstance(cache.keys, (tuple, list))
    put = (lambda a, r: jax.lax.dynamic_update_slice_in_dim(a, r, slot, axis=1)) if stacked else (
        lambda a, r: jax.lax.dynamic_update_slice_in_dim(a, r, slot, axis=0))
    keys = put(cache.keys, row.keys) if stacked else tuple(put(a, r) for a, r in zip(cache.keys, row.keys))
    values = put(cache.values, row.values) if stacked else tuple(put(a, r) for a, r in zip(cache.values, row.values))
    mask = jax.lax.dynamic_update_slice_in_dim(cache.mask, row.mask, slot, axis=0)
    index = jax.lax.dynamic_update_slice_in_dim(cache.index, row.index, slot, axis=0)
    return KVCache(keys, values, mask, index)


def _keys(seeds, steps):
    return jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(seeds, steps)


class _NoBank:
    """The bank of an engine that serves its base alone."""

    weights: dict = {}
    scales: dict = {}
    slots: tuple = ()
    names: tuple = ()
    capacity = 0

    def slot(self, name):
        raise UnknownAdapterError(f"no adapter named {name!r}; this server serves its base model only.")

    def add(self, name, adapter):
        raise BankCapacityError("this server was started without an adapter bank (capacity 0); restart it with one.")


class Engine:
    """Continuous batching of many adapters on one base (see the module docstring).

    Args:
      model, params: a jpeft decoder (``jpeft.models``) and its variables.
      bank: the :class:`~jpeft.bank.AdapterBank` whose adapters requests may name; ``None``
        serves the base alone (e.g. a merged model) with no routing at all.
      tokenizer: a transformers tokenizer (text out, stop strings); ``None``: token ids only.
      slots: decode rows (requests generating at once).
      max_len: prompt + generated tokens per request at most (default: the model's
        ``max_position_embeddings``, at most 2048; a model with learned positions, GPT-2,
        reads every position but the last generated token's, as :func:`jpeft.generate` does,
        so it takes one more by default and refuses more with :class:`~jpeft.errors.ConfigError`).
      chunk: prefill chunk length.
      max_queue: requests waiting for a row at most; more raise :class:`OverloadedError`.
      queue_timeout, request_timeout: seconds a request may wait for a row / run in all (> 0; inf: no limit).
      eos_ids: token ids that end a sequence (default: the tokenizer's ``eos_token_id``).
    """

    def __init__(self, model, params, bank: AdapterBank, *, tokenizer=None, slots: int = 8,
                 max_len: Optional[int] = None, chunk: int = 32, max_queue: int = 64,
                 queue_timeout: float = 30.0, request_timeout: float = 300.0, eos_ids: Optional[Sequence[int]] = None):
        if bank is None:
            bank = _NoBank()
        cfg = model.config
        for name, v in (("slots", slots), ("chunk", chunk), ("max_queue", max_queue)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"Engine {name} must be a positive int, found {v!r}.")
        for name, v in (("queue_timeout", queue_timeout), ("request_timeout", request_timeout)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or v <= 0:
                raise ConfigError(f"Engine {name} must be a number of seconds > 0 (inf: no limit; "
                                  f"--{name.replace('_', '-')}), found {v!r}.")
        limit = position_limit(cfg)
        fixed = rope_fixed_length(cfg)
        if max_len is None:
            max_len = min(int(getattr(cfg, "max_position_embeddings", 2048) or 2048), 2048)
            if limit is not None and limit < 2048:
                max_len = limit + 1  # the last new token is never read back (jpeft.generate and transformers agree)
            if fixed is not None:
                max_len = min(max_len, fixed)
        if max_len < 2:
            raise ConfigError(f"Engine max_len must be >= 2, found {max_len}.")
        check_decoder(model, "Engine")
        # a request ends once prompt + generated reach max_len, and its last token is never fed back: it reads
        # max_len - 1 positions. Past the position table the logits are NaN: token 0, silently
        if limit is not None and max_len > limit + 1:
            raise ConfigError(
                f"Engine max_len is {max_len}, but this model has {limit} learned positions (max_position_embeddings): "
                f"a request reads every position but its last token's, so it can hold {limit + 1} tokens at most. "
                f"Use max_len <= {limit + 1} (--max-len)."
            )
        if fixed is not None and max_len > fixed:
            # chunked prefill and rows of other requests decoded together would pick the long frequencies at
            # other steps than one call over the whole prompt does (jpeft.generate, transformers): other tokens
            kind = cfg.rope_scaling_dict["rope_type"]
            raise ConfigError(
                f"Engine max_len is {max_len}, but this model's {kind} rope changes its frequencies with the length "
                f"of the call past {fixed} positions, which a server running prompts in chunks and requests side by "
                f"side cannot reproduce (jpeft.generate can). Use max_len <= {fixed} (--max-len)."
            )
        if not isinstance(bank, _NoBank):
            bank.check(params)
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.slots, self.max_len, self.chunk = slots, int(max_len), chunk
        self.max_queue, self.queue_timeout, self.request_timeout = max_queue, queue_timeout, request_timeout
        if eos_ids is None:
            eos_ids = as_eos_ids(getattr(tokenizer, "eos_token_id", None))
        self.eos_ids = frozenset(int(e) for e in eos_ids)
        self.vocab_size = int(cfg.vocab_size)
        self._bank = bank
        self._retiring: set = set()
        self._cv = threading.Condition()
        self._pending: collections.deque = collections.deque()
        self._rows: list = [None] * slots
        self._ids = itertools.count(1)
        self._thread: Optional[threading.Thread] = None
        self._running = False
        self.error: Optional[BaseException] = None
        self.traces = {"prefill": 0, "decode": 0}
        self.counters = collections.Counter()
        cache = init_cache(cfg, slots, self.max_len + chunk, cfg.dtype)
        self._cache = dataclasses.replace(cache, index=jnp.zeros((slots,), jnp.int32))
        self._prefill = jax.jit(self._prefill_impl, donate_argnums=(3,))
        self._decode = jax.jit(self._decode_impl, donate_argnums=(3,))

    @property
    def _strategy(self) -> str:
        """The bank's routed-update implementation (read when the programs are traced)."""
        return getattr(self._bank, "strategy", DEFAULT_STRATEGY)

    # -- the two compiled programs ----------------------------------------------------------------
    def _prefill_impl(self, params, weights, scales, cache, slot, adapter_id, tokens, n_real, reset, opts):
        self.traces["prefill"] += 1  # runs only while tracing
        row = _slice_rows(cache, slot)
        row = dataclasses.replace(row, mask=jnp.where(reset, False, row.mask), index=jnp.where(reset, 0, row.index))
        mask = (jnp.arange(tokens.shape[1]) < n_real)[None].astype(jnp.int32)
        adapter = route(weights, scales, adapter_id[None], strategy=self._strategy) if weights else None
        logits, new = apply(self.model, params, adapter, tokens, attention_mask=mask, cache=row)
        new = dataclasses.replace(new, index=row.index + n_real)
        seed, step, temp, tail = opts
        last = jax.lax.dynamic_index_in_dim(logits[0], n_real - 1, axis=0).astype(jnp.float32)
        tok = sample_rows(last, _keys(seed[None], step[None]), temp[None], tail[None])[0]
        return _put_rows(cache, new, slot), tok

    def _decode_impl(self, params, weights, scales, cache, tokens, ids, active, opts):
        self.traces["decode"] += 1
        adapter = route(weights, scales, ids, strategy=self._strategy) if weights else None
        logits, new = apply(self.model, params, adapter, tokens[:, None], attention_mask=active[:, None].astype(jnp.int32),
                            cache=cache)
        new = dataclasses.replace(new, index=jnp.where(active, cache.index + 1, cache.index))
        seeds, steps, temps, tails = opts
        tok = sample_rows(logits[:, -1].astype(jnp.float32), _keys(seeds, steps), temps, tails)
        return new, tok

    # -- the public surface -----------------------------------------------------------------------
    @property
    def bank(self) -> AdapterBank:
        return self._bank

    def adapters(self) -> tuple:
        """Names requests may use now (adapters being removed are left out)."""
        with self._cv:
            return tuple(n for n in self._bank.names if n not in self._retiring)

    def warmup(self) -> "Engine":
        """Compiles the two programs now (one prefill chunk into row 0 and one decode step with
        every row idle), so the first request does not wait for the compiler. Call it before
        :meth:`start`; it leaves no trace in the cache (a row's first chunk resets the row)."""
        bank = self._bank
        zeros = (np.int32(0), np.int32(0), np.float32(0), np.float32(0))
        self._cache, _ = self._prefill(self.params, bank.weights, bank.scales, self._cache, np.int32(0), np.int32(-1),
                                       np.zeros((1, self.chunk), np.int32), np.int32(1), np.bool_(True), zeros)
        n = self.slots
        self._cache, tok = self._decode(self.params, bank.weights, bank.scales, self._cache, np.zeros((n,), np.int32),
                                        np.full((n,), -1, np.int32), np.zeros((n,), bool),
                                        (np.zeros((n,), np.int32), np.zeros((n,), np.int32), np.zeros((n,), np.float32),
                                         np.zeros((n,), np.float32)))
        jax.block_until_ready(tok)
        return self

    def start(self) -> "Engine":
        with self._cv:
            if self._thread is None:
                self._running = True
                self._thread = threading.Thread(target=self._loop, name="jpeft-engine", daemon=True)
                self._thread.start()
        return self

    def stop(self, timeout: Optional[float] = 10.0, give_up: Optional[Callable[[], bool]] = None) -> None:
        """Stops the engine: the step running ends, then every request left ends with a "the
        server is shutting down" error event. Waits for that up to ``timeout`` seconds (``None``:
        until it is done) or until ``give_up()`` is true (checked every 50 ms): a step that takes
        longer (a first compile, a large model on the CPU) is still running when a capped wait
        returns, and its requests end after it."""
        with self._cv:
            self._running = False
            self._cv.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._thread is not None and self._thread.is_alive():
            if (give_up is not None and give_up()) or (deadline is not None and time.monotonic() >= deadline):
                return
            self._thread.join(0.05 if deadline is None else max(0.0, min(0.05, deadline - time.monotonic())))

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._running

    def submit(self, req: Request) -> Request:
        """Queues ``req``; its events go to ``req.sink``.

        Raises:
          UnknownAdapterError: no adapter of that name (or it is being removed).
          InputValidationError, PromptTooLongError: an empty prompt, ids outside the vocabulary,
            bad options, stop strings on an engine without a tokenizer, or prompt + ``max_tokens``
            above ``max_len``.
          OverloadedError: ``max_queue`` requests already wait (or the engine is not running).
        """
        ids = [int(t) for t in req.prompt_ids]
        if not ids:
            raise InputValidationError("the prompt is empty; give at least one token.")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InputValidationError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size}).")
        if not _is_int(req.max_tokens) or int(req.max_tokens) < 1:
            raise InputValidationError(f"max_tokens must be a positive integer, found {req.max_tokens!r}.")
        req.max_tokens = int(req.max_tokens)
        if len(ids) + req.max_tokens > self.max_len:
            raise PromptTooLongError(
                f"the prompt has {len(ids)} tokens and max_tokens is {req.max_tokens}: {len(ids) + req.max_tokens} "
                f"tokens, above this server's limit of {self.max_len} per request. Shorten the prompt or ask for "
                "fewer tokens."
            )
        for name in ("temperature", "top_p"):
            v = getattr(req, name)
            if not _is_scalar(v, (np.integer, np.floating)):
                raise InputValidationError(f"{name} must be a number, found {v!r}.")
            setattr(req, name, float(v))
        if req.seed is not None and not _is_int(req.seed):
            raise InputValidationError(f"seed must be an integer or None, found {req.seed!r}.")
        # a bare string would be iterated as its characters: stop="END" would end at any 'E', 'N' or 'D'
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        if any(not isinstance(s, str) or not s for s in stop):
            raise InputValidationError(f"stop must be a string or a sequence of non-empty strings, found {req.stop!r}.")
        req.stop = stop
        if not (0.0 <= req.temperature <= 100.0):
            raise InputValidationError(f"temperature must be in [0, 100], found {req.temperature}.")
        if not (0.0 < req.top_p <= 1.0):
            raise InputValidationError(f"top_p must be in (0, 1], found {req.top_p}.")
        if req.stop and self.tokenizer is None:
            raise InputValidationError("stop strings need the model's tokenizer, and this engine has none; stop on token "
                                       "ids with eos_ids instead.")
        req.prompt_ids = ids
        if req.seed is None:
            req.seed = int(_SEEDS.integers(0, 2**31 - 1))
        req.seed = int(req.seed) % (2**31 - 1)
        with self._cv:
            if req.adapter is not None and (req.adapter not in self._bank.slots or req.adapter in self._retiring):
                raise UnknownAdapterError(self._unknown(req.adapter))
            if not self._running:
                raise OverloadedError("the engine is not running; the server is shutting down or failed.")
            if len(self._pending) >= self.max_queue:
                self.counters["rejected"] += 1
                raise OverloadedError(
                    f"{len(self._pending)} requests already wait for one of the {self.slots} decode slots (the queue "
                    f"holds {self.max_queue}); retry later."
                )
            req.id, req.created = next(self._ids), time.monotonic()
            self._pending.append(req)
            self.counters["submitted"] += 1
            self._cv.notify_all()
        return req

    def cancel(self, req: Request) -> None:
        """Ends ``req`` at the next iteration (its row, if it has one, is freed); no more events."""
        with self._cv:
            req.cancelled = True
            self._cv.notify_all()

    def add_adapter(self, name: str, adapter) -> None:
        """Adds ``adapter`` to the bank (same shapes: the compiled steps are reused).

        Raises:
          DuplicateAdapterError, BankCapacityError, BankShapeError, BankError: as
          :meth:`jpeft.bank.AdapterBank.add`.
        """
        with self._cv:
            self._drop_retired()
            self._bank = self._bank.add(name, adapter)

    def remove_adapter(self, name: str) -> int:
        """Stops accepting requests for ``name`` and removes it from the bank once the requests
        already accepted for it have finished (none is dropped or silently moved to the base).
        Returns how many of those were still running or waiting.

        Raises:
          UnknownAdapterError: no such adapter.
        """
        with self._cv:
            if name not in self._bank.slots or name in self._retiring:
                raise UnknownAdapterError(self._unknown(name))
            self._retiring.add(name)
            n = self._users(name)
            self._drop_retired()
            return n

    def stats(self) -> dict:
        with self._cv:
            return {
                "slots": self.slots, "busy": sum(r is not None for r in self._rows), "waiting": len(self._pending),
                "max_queue": self.max_queue, "capacity": self._bank.capacity,
                "adapters": [n for n in self._bank.names if n not in self._retiring],
                "removing": sorted(self._retiring), "traces": dict(self.traces), **dict(self.counters),
            }

    # -- internals ----------------------------------------------------------------------------------
    def _unknown(self, name) -> str:
        names = [n for n in self._bank.names if n not in self._retiring]
        return f"no adapter named {name!r}; available: {names} (and the base model)."

    def _users(self, name) -> int:
        return sum(r is not None and r.adapter == name for r in self._rows) + sum(
            r.adapter == name for r in self._pending)

    def _drop_retired(self):
        """Removes retiring adapters nobody uses any more (holding the lock)."""
        for name in list(self._retiring):
            if self._users(name) == 0:
                self._bank = self._bank.remove(name)
                self._retiring.discard(name)

    def _send(self, req: Request, event: Event):
        try:
            req.sink(event)
        except Exception:  # a sink whose consumer went away must not stop the engine
            self.counters["sink_errors"] += 1

    def _finish(self, req: Request, event: Optional[Event], counter: str):
        req.done = True
        self.counters[counter] += 1
        if event is not None:
            self._send(req, event)

    def _loop(self):
        try:
            while True:
                with self._cv:
                    if not self._running:
                        break
                    self._housekeeping()
                    if not any(self._rows) and not self._pending:
                        self._cv.wait(0.5)
                        continue
                    bank = self._bank
                    rows = list(self._rows)
                self._iterate(bank, rows)
        except BaseException as e:  # noqa: BLE001 - reported to every waiting request, then re-raised in the log
            self.error = e
            with self._cv:
                self._running = False
                waiting = [r for r in self._rows if r is not None] + list(self._pending)
                self._rows, self._pending = [None] * self.slots, collections.deque()
            for r in waiting:
                self._finish(r, Event("error", error="engine", message=f"the engine failed: {type(e).__name__}: {e}"),
                             "failed")
            raise
        finally:
            with self._cv:
                self._running = False
                left = [r for r in self._rows if r is not None] + list(self._pending)
                self._rows, self._pending = [None] * self.slots, collections.deque()
            for r in left:
                if not r.done:
                    self._finish(r, Event("error", error="engine", message="the server is shutting down."), "failed")

    def _housekeeping(self):
        """Drops cancelled and timed-out requests, fills free rows (holding the lock)."""
        now = time.monotonic()
        for i, r in enumerate(self._rows):
            if r is None:
                continue
            if r.cancelled:
                self._rows[i] = None
                self._finish(r, None, "cancelled")
            elif now - r.created > self.request_timeout:
                self._rows[i] = None
                self._finish(r, Event("error", error="timeout", message=(
                    f"the request ran longer than this server's {self.request_timeout:g} s limit.")), "timed_out")
        keep = collections.deque()
        for r in self._pending:
            if r.cancelled:
                self._finish(r, None, "cancelled")
            elif now - r.created > self.queue_timeout:
                self._finish(r, Event("error", error="timeout", message=(
                    f"no decode slot became free within {self.queue_timeout:g} s; the server is overloaded, retry "
                    "later.")), "timed_out")
            else:
                keep.append(r)
        self._pending = keep
        while self._pending and None in self._rows:
            r = self._pending.popleft()
            r.started = now
            self._rows[self._rows.index(None)] = r
        self._drop_retired()

    def _iterate(self, bank: AdapterBank, rows: list):
        """One prefill chunk (the oldest row still prefilling) and one decode step."""
        pre = [(i, r) for i, r in enumerate(rows) if r is not None and r.prefilled < len(r.prompt_ids)]
        if pre:
            i, r = min(pre, key=lambda x: x[1].started)
            self._prefill_chunk(bank, i, r)
        dec = [(i, r) for i, r in enumerate(rows) if r is not None and not r.done and r.generated
               and r.prefilled == len(r.prompt_ids)]
        if dec:
            self._decode_step(bank, dec)

    def _opts(self, reqs):
        return (np.asarray([r.seed for r in reqs], np.int32), np.asarray([len(r.generated) for r in reqs], np.int32),
                np.asarray([r.temperature for r in reqs], np.float32), nucleus_tail([r.top_p for r in reqs]))

    def _prefill_chunk(self, bank, i, r):
        start = r.prefilled
        part = r.prompt_ids[start:start + self.chunk]
        tokens = np.zeros((1, self.chunk), np.int32)
        tokens[0, :len(part)] = part
        adapter_id = -1 if r.adapter is None else bank.slot(r.adapter)
        opts = tuple(a[0] for a in self._opts([r]))
        self._cache, tok = self._prefill(self.params, bank.weights, bank.scales, self._cache, np.int32(i),
                                         np.int32(adapter_id), tokens, np.int32(len(part)), np.bool_(start == 0), opts)
        r.prefilled = start + len(part)
        if r.prefilled == len(r.prompt_ids):
            self._accept([(i, r)], [int(tok)])

    def _decode_step(self, bank, dec):
        tokens = np.zeros((self.slots,), np.int32)
        ids = np.full((self.slots,), -1, np.int32)
        active = np.zeros((self.slots,), bool)
        seeds, steps = np.zeros((self.slots,), np.int32), np.zeros((self.slots,), np.int32)
        temps, top_ps = np.zeros((self.slots,), np.float32), np.ones((self.slots,), np.float64)  # idle: off
        for i, r in dec:
            tokens[i], active[i] = r.generated[-1], True
            ids[i] = -1 if r.adapter is None else bank.slot(r.adapter)
            seeds[i], steps[i], temps[i], top_ps[i] = r.seed, len(r.generated), r.temperature, r.top_p
        self._cache, tok = self._decode(self.params, bank.weights, bank.scales, self._cache, tokens, ids, active,
                                        (seeds, steps, temps, nucleus_tail(top_ps)))
        tok = np.asarray(tok)
        self._accept(dec, [int(tok[i]) for i, _ in dec])
        self.counters["decode_steps"] += 1

    def _accept(self, rows, toks):
        """Appends each row's new token, sends its text, ends it when it is done."""
        for (i, r), t in zip(rows, toks):
            if r.cancelled or r.done:
                continue
            self.counters["tokens"] += 1
            eos = t in self.eos_ids
            if not eos:
                r.generated.append(t)
                r.unsent.append(t)
            reason = "stop" if eos else None
            text, stopped = self._text(r)
            if stopped:
                reason = "stop"
            elif reason is None and (len(r.generated) >= r.max_tokens
                                     or len(r.prompt_ids) + len(r.generated) >= self.max_len):
                reason = "length"
            final = reason is not None
            new = self._new_text(r, text, final)
            if new or (self.tokenizer is None and not eos) or (final and r.unsent):
                # the ids of tokens whose text was held back (a character's first bytes) go with the text they made;
                # at the end, those of tokens that made no text (a special token, a stop string) go with an empty text
                self._send(r, Event("text", new, tuple(r.unsent)))
                r.unsent.clear()
            if final:
                with self._cv:
                    if self._rows[i] is r:
                        self._rows[i] = None
                # the end-of-sequence token is generated work too (vLLM and TGI count it): not in the text,
                # but in the usage
                n = len(r.generated) + int(eos)
                usage = {"prompt_tokens": len(r.prompt_ids), "completion_tokens": n,
                         "total_tokens": len(r.prompt_ids) + n}
                self._finish(r, Event("done", finish_reason=reason, usage=usage), "completed")
                with self._cv:
                    self._cv.notify_all()

    def _text(self, r: Request):
        """``(text so far, whether a stop string ended it)``; the text is cut before the stop."""
        if self.tokenizer is None:
            return "", False
        # without clean_up_tokenization_spaces: its merges (" ' s" -> "'s") would rewrite text already sent, and
        # nothing after it could be sent any more
        text = self.tokenizer.decode(r.generated, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if r.stop:
            hits = [p for p in (text.find(s, max(0, len(r.emitted) - len(s))) for s in r.stop) if p >= 0]
            if hits:
                return text[:min(hits)], True
        return text, False

    def _new_text(self, r: Request, text: str, final: bool) -> str:
        """The part of ``text`` not sent yet that is safe to send: held back while it may be the
        start of a stop string, or ends in an incomplete UTF-8 sequence (every trailing U+FFFD)."""
        if self.tokenizer is None:
            return ""
        safe = len(text)
        if not final:
            # an incomplete UTF-8 character decodes to U+FFFD: one for a byte-level BPE, but one per byte for a
            # byte-fallback tokenizer (Llama 2, Mistral); sending any of them would make the text already sent
            # differ from the text once the character completes, and nothing more could be sent
            safe = len(text.rstrip("\ufffd"))
            # the start of a stop string is looked for before those U+FFFD: the character they become may be the
            # stop string's next one ("用" then the bytes of "户", stop "用户": "用" was sent, then cut)
            head = text[:safe]
            for s in r.stop:
                for k in range(min(len(s) - 1, len(head)), 0, -1):
                    if head.endswith(s[:k]):
                        safe = min(safe, len(head) - k)
                        break
        if not text.startswith(r.emitted) or safe <= len(r.emitted):
            return ""
        new = text[len(r.emitted):safe]
        r.emitted += new
        return new


__all__ = ["Engine", "Request", "Event"]
