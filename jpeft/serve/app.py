"""The HTTP layer of ``jpeft serve``: the OpenAI API subset clients use, on Starlette + uvicorn.

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with
``"stream": true`` as server-sent events), ``POST /v1/adapters`` (``{"name", "path"}``, a path
under the adapters root), ``DELETE /v1/adapters/{name}``, ``GET /health`` (the engine's counters).
Errors have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 a malformed
request, 403 adding adapters on a server without an adapters root, 404 an unknown model or
adapter (the message lists the available names), 409 a full bank or a taken name, 413 a body
over 4 MiB, 429 a full queue, 503 an engine that is not running, a server shutting down or no
free slot in time, 504 a request that ran past the server's time limit.

Starlette and uvicorn are imported here only, so ``import jpeft`` does not import them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sys
import time
import uuid
from typing import Any, Callable, Optional

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from jpeft.bank import AdapterBank
from jpeft.config import strict_json
from jpeft.data import chat_messages, chat_template_inputs
from jpeft.errors import (
    BankCapacityError,
    BankRankError,
    BankShapeError,
    ConfigError,
    DuplicateAdapterError,
    InputValidationError,
    JpeftError,
    LoadError,
    OverloadedError,
    PathEscapeError,
    UnknownAdapterError,
)
from jpeft.io import safe_join
from jpeft.serve.engine import Engine, Event, Request

MAX_BODY = 4 << 20
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param

    def response_body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.response_body(), status_code=self.status)


def _bad(message: str, param: Optional[str] = None) -> ApiError:
    return ApiError(400, message, param=param)


# -- request parsing ----------------------------------------------------------------------------------
def _number(body: dict, key: str, default, lo: float, hi: float) -> float:
    v = body.get(key, default)
    if v is None:
        v = default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise _bad(f"{key!r} must be a number in [{lo}, {hi}], found {v!r}.", key)
    return float(v)


def _int(body: dict, key: str, default, lo: int) -> Optional[int]:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise _bad(f"{key!r} must be an integer >= {lo}, found {v!r}.", key)
    return v


def _stop(body: dict) -> tuple:
    s = body.get("stop")
    if s is None:
        return ()
    if isinstance(s, str):
        s = [s]
    if not isinstance(s, list) or len(s) > 4 or not all(isinstance(x, str) and x for x in s):
        raise _bad(f"'stop' must be a non-empty string or a list of up to 4 of them, found {s!r}.", "stop")
    return tuple(s)


def _stream_options(body: dict, stream: bool) -> bool:
    """Whether a streamed reply ends with OpenAI's usage chunk (``stream_options: {"include_usage": true}``).
    ``stream_options`` without ``"stream": true`` gets a 400, as from OpenAI and vLLM; so does a key jpeft serve
    does not know or a value that is not a boolean (``include_obfuscation`` is taken and has no effect: OpenAI's
    padding of streamed deltas against side channels, which jpeft serve does not send)."""
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not stream:
        raise _bad("'stream_options' is only allowed with \"stream\": true.", "stream_options")
    if not isinstance(opts, dict):
        raise _bad(f"'stream_options' must be an object such as {{\"include_usage\": true}}, found "
                   f"{json.dumps(opts)[:80]}.", "stream_options")
    for key, v in opts.items():
        if key not in ("include_usage", "include_obfuscation"):
            raise _bad(f"'stream_options.{key}' is not supported by jpeft serve; it takes 'include_usage' (and "
                       "'include_obfuscation', which has no effect).", "stream_options")
        if v is not None and not isinstance(v, bool):
            raise _bad(f"'stream_options.{key}' must be true or false, found {json.dumps(v)[:80]}.", "stream_options")
    return bool(opts.get("include_usage"))


def _unsupported(body: dict, chat: bool = False) -> None:
    """A 400 for the options jpeft serve does not implement; ``chat``: the request is a chat completion, whose
    ``tools`` (and ``chat_template_kwargs``) :meth:`Server._chat_ids` renders with the chat template."""
    if chat and body.get("tool_choice") not in (None, "auto"):
        # the model chooses as it was trained to: nothing forces a call ("required", a named function) or forbids one
        raise _bad(f"'tool_choice' {json.dumps(body['tool_choice'])[:80]} is not supported by jpeft serve: the tools "
                   "are rendered into the prompt by the chat template and the model decides whether to call one "
                   "(\"auto\", the default); nothing forces or forbids a call. Leave tool_choice out, or send \"auto\".",
                   "tool_choice")
    if not chat:
        for key in ("tools", "tool_choice", "chat_template_kwargs"):
            if body.get(key) not in (None, False, 0, [], {}):
                raise _bad(f"{key!r} is not supported by /v1/completions, whose prompt is text; send the messages to "
                           "/v1/chat/completions, which renders them with the chat template.", key)
    if body.get("n", 1) not in (1, None):
        raise _bad("'n' > 1 is not supported; send one request per completion.", "n")
    if body.get("best_of", 1) not in (1, None):
        raise _bad("'best_of' is not supported.", "best_of")
    # off only when null or false: /v1/completions' "logprobs": 0 asks for the chosen tokens' log probabilities
    # (OpenAI, vLLM), and 0 == False would let it through below, answered with "logprobs": null
    if body.get("logprobs") is not None and body.get("logprobs") is not False:
        raise _bad("'logprobs' is not supported by jpeft serve.", "logprobs")
    for key in ("top_logprobs", "echo", "suffix", "functions", "logit_bias", "function_call", "response_format",
                "stop_token_ids", "min_tokens", "ignore_eos"):
        if body.get(key) not in (None, False, 0, [], {}):
            raise _bad(f"{key!r} is not supported by jpeft serve.", key)
    for key in ("frequency_penalty", "presence_penalty"):
        if body.get(key) not in (None, 0, 0.0):
            raise _bad(f"{key!r} is not supported by jpeft serve (only 0).", key)
    # sampling options other servers take (vLLM, TGI): ignored, a client asking top_k=1 for
    # greedy text would silently get samples
    for key, off in (("top_k", (0, -1)), ("min_p", (0,)), ("typical_p", (1,)), ("repetition_penalty", (1,)),
                     ("use_beam_search", (False,))):
        if body.get(key) is not None and body.get(key) not in off:
            raise _bad(f"{key!r} is not supported by jpeft serve; it samples with 'temperature' and 'top_p' only "
                       "('temperature': 0 is greedy).", key)


class Server:
    """The state behind the routes: the engine, the tokenizer, the base model's name, the
    adapters root and the function that reads an adapter folder (``loader(path) -> adapter``)."""

    def __init__(self, engine: Engine, *, base_name: str, tokenizer=None, adapters_root: Optional[str] = None,
                 loader: Optional[Callable[[str], Any]] = None):
        if tokenizer is None:  # the engine would send token ids only, and every completion's text would be empty
            raise ConfigError("the OpenAI server answers with text and needs the model's tokenizer (tokenizer=None "
                              "given); load it with jpeft.models.load_tokenizer(folder).")
        if getattr(tokenizer, "response_template", None) is not None:
            try:  # a response template the parser cannot load would make every reply text, and no word said
                tokenizer.parse_response("", prefix="")
            except Exception as e:
                raise ConfigError(f"the tokenizer's response_template (transformers' response parsing, which jpeft "
                                  f"serve uses to return tool calls) cannot be used: {type(e).__name__}: "
                                  f"{str(e)[:200]}. Fix or remove it in tokenizer_config.json.") from None
        self.engine, self.base_name, self.tokenizer = engine, base_name, tokenizer
        self.adapters_root, self.loader = adapters_root, loader
        self.created = int(time.time())
        self._added: dict[str, int] = {}  # adapters added while serving: when (``created`` in /v1/models)
        self.closing = False  # shutting down (:meth:`drain`): new generation requests get a 503

    # -- helpers ----------------------------------------------------------------------------------
    async def _json(self, request: HttpRequest) -> dict:
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise ApiError(413, f"the request body has {len(raw):,} bytes; the limit is {MAX_BODY:,}.")
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise _bad(f"the request body is not valid JSON ({str(e)[:120]}).") from None
        if not isinstance(body, dict):
            raise _bad("the request body must be a JSON object.")
        return body

    def _adapter_of(self, body: dict) -> Optional[str]:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _bad(f"'model' must name the base model {self.base_name!r} or an adapter.", "model")
        if model == self.base_name:
            return None
        names = self.engine.adapters()
        if model not in names:
            raise ApiError(404, f"the model {model!r} does not exist; available: {[self.base_name, *names]}.",
                           "not_found_error", "model")
        return model

    def _encode(self, text: str) -> list:
        return list(self.tokenizer(text)["input_ids"])

    def _prompt_ids(self, body: dict) -> list:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]
        if isinstance(p, str):
            if not p:
                raise _bad("'prompt' is empty.", "prompt")
            return self._encode(p)
        if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            return p
        raise _bad("'prompt' must be a string or a list of token ids (one prompt per request).", "prompt")

    def _chat_ids(self, body: dict) -> list:
        """The prompt of a chat completion: ``apply_chat_template(messages, tools=body["tools"],
        add_generation_prompt=True, **body["chat_template_kwargs"])`` as :func:`jpeft.data.render_chat` renders a
        training line (the messages with all their keys, the same tools and template variables), so a model
        trained on conversations with tools is served the prompt it was trained on."""
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and (isinstance(m.get("content"), str) or (
                    m["role"] == "assistant" and m.get("tool_calls") and m.get("content") is None)) for m in msgs):
            raise _bad("'messages' must be a non-empty list of {\"role\": str, \"content\": str} (an assistant "
                       "turn with \"tool_calls\" may have \"content\": null).", "messages")
        try:
            # as training renders them: a tool call's arguments sent as a JSON string (OpenAI's form) decoded
            msgs = chat_messages(msgs)
        except InputValidationError as e:
            raise _bad(str(e), "messages") from None
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise _bad("this model's tokenizer has no chat template, so /v1/chat/completions cannot format messages; "
                       "use /v1/completions with a prompt, or serve a model folder whose tokenizer has one "
                       "(chat_template.jinja, as tokenizer.save_pretrained writes it, or tokenizer_config.json's "
                       "chat_template).", "messages")
        inputs = {}
        for key in ("tools", "chat_template_kwargs"):
            try:
                inputs.update(chat_template_inputs(**{key: body.get(key)}))
            except InputValidationError as e:
                raise _bad(str(e), key) from None
        try:
            # every key of a message, as training renders them (a tool call's "tool_calls", a tool reply's "name")
            text = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True,
                                                      tokenize=False, **inputs)
        except Exception as e:  # a template that raises on these messages (jinja's raise_exception)
            raise _bad(f"the chat template refused the messages: {str(e)[:200]}", "messages") from None
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _submit(self, body: dict, ids: list, adapter: Optional[str], max_default: Optional[int], sink,
                chat: bool = False) -> Request:
        _unsupported(body, chat)
        if self.closing:
            raise ApiError(503, "the server is shutting down; send the request to another server, or retry once it "
                           "has restarted.", "server_error")
        max_tokens, max_completion = _int(body, "max_tokens", None, 1), _int(body, "max_completion_tokens", None, 1)
        if max_tokens is not None and max_completion is not None and max_tokens != max_completion:
            # OpenAI deprecates max_tokens for max_completion_tokens; vLLM takes the latter: neither is safe to assume
            raise _bad(f"'max_tokens' ({max_tokens}) and 'max_completion_tokens' ({max_completion}) differ; they are "
                       "one limit (max_tokens is OpenAI's deprecated name for it): send one of them.",
                       "max_completion_tokens")
        if max_tokens is None:
            max_tokens = max_completion
        if max_tokens is None:
            max_tokens = max_default if max_default is not None else max(1, self.engine.max_len - len(ids))
        seed = _int(body, "seed", None, 0)
        req = Request(ids, adapter, max_tokens, sink, temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                      top_p=_number(body, "top_p", 1.0, 1e-9, 1.0), seed=seed, stop=_stop(body))
        try:
            return self.engine.submit(req)
        except UnknownAdapterError as e:
            raise ApiError(404, str(e), "not_found_error", "model") from None
        except OverloadedError as e:
            if self.engine.alive:
                raise ApiError(429, str(e), "rate_limit_error") from None
            raise ApiError(503, str(e), "server_error") from None
        except JpeftError as e:
            raise _bad(str(e)) from None

    # -- generation routes ---------------------------------------------------------------------
    async def completions(self, request: HttpRequest):
        return await self._generate(request, chat=False)

    async def chat(self, request: HttpRequest):
        return await self._generate(request, chat=True)

    async def _generate(self, request: HttpRequest, chat: bool):
        try:
            body = await self._json(request)
            adapter = self._adapter_of(body)
            ids = self._chat_ids(body) if chat else self._prompt_ids(body)
            stream = body.get("stream")
            if stream is None:  # null is the default, false, as OpenAI takes it (the openai client's stream=None)
                stream = False
            if not isinstance(stream, bool):
                raise _bad("'stream' must be true or false.", "stream")
            include_usage = _stream_options(body, stream)
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue = asyncio.Queue()

            def sink(ev: Event):
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, ev)
                except RuntimeError:  # the event loop is gone (shutdown)
                    pass

            req = self._submit(body, ids, adapter, None if chat else 16, sink, chat)
        except ApiError as e:
            return e.response()
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        model = body["model"]
        if stream:
            return StreamingResponse(self._stream(req, queue, rid, model, chat, body, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await self._collect(request, req, queue, rid, model, chat, body)

    def _message(self, body: dict, req: Request, ids: list, text: str, finish: str) -> tuple:
        """``(message, finish_reason)`` of a chat completion. With a tokenizer that has a ``response_template``
        (transformers' response parsing, ``tokenizer.parse_response``, as its text-generation pipeline uses it),
        the reply ``ids`` are parsed after the prompt (``prefix``) with the request's ``tools``: the parsed text is
        the ``content``, each call one of OpenAI's ``tool_calls`` (``arguments`` a JSON string, a new ``id``;
        ``finish_reason`` ``"tool_calls"``), parsed reasoning ``reasoning_content`` (vLLM's field). Without one, or
        for a reply cut by max_tokens (a call in it may be cut too), or one the parser cannot read, the message is
        the text, as generated."""
        text_only = ({"role": "assistant", "content": text}, finish)
        if getattr(self.tokenizer, "response_template", None) is None or finish != "stop":
            return text_only
        try:
            # a reply cut at a stop string: its text (the ids run past the cut)
            parsed = self.tokenizer.parse_response(text if req.stop else list(ids),
                                                   prefix=self.tokenizer.decode(req.prompt_ids) if req.stop else
                                                   list(req.prompt_ids), tools=body.get("tools") or None)
            calls = [{"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                      "function": {"name": c["function"]["name"],
                                   "arguments": json.dumps(c["function"].get("arguments") or {})}}
                     for c in parsed.get("tool_calls") or []]
        except Exception:  # a reply the parser cannot read (a malformed call): the text, as without a template
            return text_only
        content = parsed.get("content")
        message = {"role": "assistant", "content": content if content or not calls else None}
        if parsed.get("reasoning_content"):
            message["reasoning_content"] = parsed["reasoning_content"]
        if calls:
            message["tool_calls"] = calls
        return message, "tool_calls" if calls else finish

    async def _collect(self, request: HttpRequest, req: Request, queue: asyncio.Queue, rid, model, chat,
                       body: Optional[dict] = None):
        parts, ids = [], []
        checked = time.monotonic()
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(queue.get(), 1.0)
                except asyncio.TimeoutError:
                    ev = None
                # checked at least once a second, also while tokens keep coming: a client that dropped
                # a long non-streaming request held its slot until max_tokens
                if ev is None or time.monotonic() - checked >= 1.0:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        self.engine.cancel(req)
                        return JSONResponse({}, status_code=499)
                    if ev is None:
                        continue
                if ev.kind == "text":
                    parts.append(ev.text)
                    ids.extend(ev.token_ids)
                elif ev.kind == "error":
                    return _engine_error(ev, started=req.started is not None).response()
                else:
                    break
        except asyncio.CancelledError:
            self.engine.cancel(req)
            raise
        text = "".join(parts)
        if chat:
            message, finish = self._message(body, req, ids, text, ev.finish_reason)
            choice = {"index": 0, "message": message, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": ev.finish_reason}
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                             "created": int(time.time()), "model": model, "choices": [choice], "usage": ev.usage})

    async def _stream(self, req: Request, queue: asyncio.Queue, rid, model, chat, body: dict,
                      include_usage: bool = False):
        """The server-sent events of a streamed request. A chat reply on a tokenizer with a ``response_template``
        is parsed as the non-streamed one (:meth:`_message`), so it gives the same message: its text is held until
        the reply ends (the parse needs the whole reply: a tool call's markup, the whitespace around it, a call
        cut by max_tokens), then sent as deltas in OpenAI's streamed form, ``reasoning_content``, ``content``
        and each call with its ``index`` (:func:`_message_deltas`). Any other reply streams its text as it comes.
        Usage as OpenAI streams it: with ``stream_options.include_usage`` every chunk has ``"usage": null`` and a
        last chunk before ``[DONE]`` has ``"choices": []`` and the usage; without it no chunk has a usage."""
        created = int(time.time())
        parse = chat and getattr(self.tokenizer, "response_template", None) is not None
        parts, ids = [], []

        def chunk(text=None, finish=None, role=False, usage=None, delta=None, last=False):
            if last:
                choices = []
            elif chat:
                delta = dict(delta or {})
                if role:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                choices = [{"index": 0, "delta": delta, "finish_reason": finish}]
            else:
                choices = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]
            obj = "chat.completion.chunk" if chat else "text_completion"
            d = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
            if include_usage:
                d["usage"] = usage
            return f"data: {strict_json(d)}\n\n"

        try:
            if chat:
                yield chunk(role=True, text="")
            while True:
                ev = await queue.get()
                if ev.kind == "text":
                    if parse:  # held: parsed with the whole reply below
                        parts.append(ev.text)
                        ids.extend(ev.token_ids)
                    elif ev.text:
                        yield chunk(text=ev.text)
                elif ev.kind == "error":
                    # a request that never got a slot timed out in the queue: 503 as without streaming (was 504, the
                    # code of a request that ran past --request-timeout)
                    err = _engine_error(ev, started=req.started is not None)
                    yield f"data: {strict_json(err.response_body())}\n\n"
                    return
                else:
                    finish = ev.finish_reason
                    if parse:
                        message, finish = self._message(body, req, ids, "".join(parts), finish)
                        for delta in _message_deltas(message):
                            yield chunk(delta=delta)
                    yield chunk(text="" if not chat else None, finish=finish)
                    if include_usage:
                        yield chunk(usage=ev.usage, last=True)
                    yield "data: [DONE]\n\n"
                    return
        finally:
            if not req.done:  # the client went away (or the server stops): free the slot
                self.engine.cancel(req)

    async def drain(self, grace: float, force: Callable[[], bool] = lambda: False) -> int:
        """Shuts the generation down before the HTTP server closes its connections: new requests get
        a 503, those running or waiting get up to ``grace`` seconds to finish (less once ``force()``
        is true: a second Ctrl-C), then the engine stops, and the ones left end with a 503 "the
        server is shutting down" (a streamed one as its last event) while their connections are
        still open: the drain waits for the engine's step in progress however long it takes, or
        until ``force()``. Returns how many ended that way."""
        self.closing = True
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and not force():
            st = self.engine.stats()
            if st["busy"] == 0 and st["waiting"] == 0:
                break
            await asyncio.sleep(0.05)
        before = self.engine.stats().get("failed", 0)
        # joins the engine's thread (not on the event loop) until its step ends and the requests left are answered,
        # however long that step takes (a capped wait would let the connections close before their 503), or until
        # force(): a second Ctrl-C still ends a step that never does
        await run_in_threadpool(self.engine.stop, None, force)
        return self.engine.stats().get("failed", 0) - before

    # -- models and adapters --------------------------------------------------------------------
    async def models(self, request: HttpRequest):
        data = [{"id": self.base_name, "object": "model", "created": self.created, "owned_by": "jpeft"}]
        data += [{"id": n, "object": "model", "created": self._added.get(n, self.created), "owned_by": "jpeft",
                  "parent": self.base_name}
                 for n in self.engine.adapters()]
        return JSONResponse({"object": "list", "data": data})

    async def health(self, request: HttpRequest):
        st = self.engine.stats()
        st["status"] = "ok" if self.engine.alive else "stopped"
        return JSONResponse(st, status_code=200 if self.engine.alive else 503)

    async def add_adapter(self, request: HttpRequest):
        try:
            if self.adapters_root is None or self.loader is None:
                raise ApiError(403, "this server was started without --adapters-root, so adapters cannot be added "
                               "while it runs; restart it with --adapters-root DIR.", "permission_error")
            body = await self._json(request)
            name, path = body.get("name"), body.get("path")
            if not isinstance(name, str) or not _NAME.fullmatch(name) or name == self.base_name:
                raise _bad(f"'name' must be 1-128 characters of letters, digits and ._:- (starting with a letter or "
                           f"digit), other than the base model's name {self.base_name!r}; found {name!r}.", "name")
            if not isinstance(path, str) or not path:
                raise _bad("'path' must be the adapter folder, relative to the server's adapters root.", "path")
            try:
                folder = safe_join(self.adapters_root, path)
            except PathEscapeError as e:
                raise _bad(f"{e} Paths are relative to the adapters root.", "path") from None
            except (OSError, ValueError) as e:  # a name too long for the file system (ENAMETOOLONG): was a 500
                raise _bad(f"'path' {path[:80]!r} is not a usable folder name under the adapters root ({e.__class__.__name__}: "
                           f"{str(e)[:120]}).", "path") from None
            if name in self.engine.bank.slots:
                raise ApiError(409, f"an adapter named {name!r} is already loaded (or being removed); DELETE "
                               f"/v1/adapters/{name} first, or pick another name.", "conflict_error", "name")
            try:
                adapter = await run_in_threadpool(self.loader, str(folder))
            except (LoadError, OSError) as e:
                raise _bad(f"could not load an adapter from {path[:200]!r}: {str(e)[:500]}", "path") from None
            except JpeftError as e:
                raise _bad(f"the adapter at {path!r} does not fit this base: {e}", "path") from None
            try:
                await run_in_threadpool(self.engine.add_adapter, name, adapter)
            except BankRankError as e:
                # the bank checks the adapter before its free slots: a rank above --max-rank on a full bank is the
                # rank's error (was answered "the bank is full", and after a DELETE the adapter still did not fit)
                raise _bad(f"{e} (jpeft serve: this server's bank was built with --max-rank {e.max_rank}; "
                           f"restart it with --max-rank {e.rank} or more to serve this adapter.)", "path") from None
            except BankCapacityError as e:
                bank = self.engine.bank
                if None not in bank.slots:
                    raise ApiError(409, f"the adapter bank is full: all {bank.capacity} slots are taken by "
                                   f"{list(bank.names)}. Free a slot with DELETE /v1/adapters/NAME, or restart the "
                                   "server with a larger --capacity.", "conflict_error") from None
                raise _bad(f"{e}", "path") from None
            except DuplicateAdapterError as e:
                raise ApiError(409, str(e), "conflict_error", "name") from None
            except JpeftError as e:
                hint = self._targets_hint(adapter) if isinstance(e, BankShapeError) else self._reserve_hint(e)
                raise _bad(f"the adapter at {path!r} cannot join this server's bank: {e}{hint}", "path") from None
        except ApiError as e:
            return e.response()
        self._added[name] = created = int(time.time())
        return JSONResponse({"id": name, "object": "model", "created": created, "owned_by": "jpeft",
                             "parent": self.base_name}, status_code=201)

    @staticmethod
    def _reserve_hint(e: Exception) -> str:
        """For an adapter with more trainable tokens, or a module copy, than the bank holds: the
        ``jpeft serve`` option that reserves them (the bank's error names the Python API)."""
        msg = str(e)
        if "trainable_token_indices" in msg:
            return (" (jpeft serve: restart the server with --trainable-tokens naming at least this adapter's count, or "
                    "with this adapter among the --adapter ones.)")
        if "modules_to_save" in msg:
            return (" (jpeft serve: restart the server with --modules-to-save naming this module, or with this adapter "
                    "among the --adapter ones.)")
        return ""

    def _targets_hint(self, adapter) -> str:
        """For an adapter with sites the bank does not hold: how to serve it (the bank's sites are
        fixed at start by ``--targets`` and the ``--adapter`` adapters)."""
        bank = self.engine.bank
        if not isinstance(bank, AdapterBank):
            return ""
        missing = {"lora": set(), "tokens": set(), "copy": set()}
        for p, node in adapter.items():
            if p not in bank.layouts:
                try:
                    lr = node.routed_low_rank()
                except Exception:  # noqa: BLE001 - a node the bank cannot hold at all: the bank's error says so
                    lr = None
                kind = "tokens" if getattr(lr, "tokens", None) is not None else (
                    "copy" if getattr(lr, "saved", None) is not None else "lora")
                missing[kind].add(str(p).rsplit("/", 1)[-1])
        hints = []
        if missing["lora"]:
            hints.append(f"this adapter also adapts {sorted(missing['lora'])[:8]}. If the base has these modules, restart "
                         "the server with --targets naming them too")
        if missing["tokens"]:
            hints.append(f"this adapter has trainable tokens at {sorted(missing['tokens'])}: restart the server with "
                         "--trainable-tokens N (N at least its count)")
        if missing["copy"]:
            hints.append(f"this adapter has full copies (modules_to_save) of {sorted(missing['copy'])[:8]}: restart the "
                         "server with --modules-to-save naming them")
        if not hints:
            return ""
        return (" (jpeft serve: the bank's modules were fixed at start by --targets (default every linear layer but "
                "lm_head), --trainable-tokens, --modules-to-save and the --adapter adapters; " + "; ".join(hints) + ".)")

    async def delete_adapter(self, request: HttpRequest):
        name = request.path_params["name"]
        try:
            waiting = self.engine.remove_adapter(name)
        except UnknownAdapterError:
            return ApiError(404, f"no adapter named {name!r}; loaded: {list(self.engine.adapters())}.",
                            "not_found_error", "name").response()
        self._added.pop(name, None)
        return JSONResponse({"id": name, "object": "model", "deleted": True, "requests_finishing": waiting})


def _message_deltas(message: dict) -> list:
    """A chat completion's ``message`` as the deltas of OpenAI's streamed form, which a client's accumulation
    (the ``openai`` client's, vLLM's) joins back into it: ``reasoning_content`` (vLLM's field), ``content``, and
    each tool call as ``{"index": i, "id", "type", "function": {"name", "arguments"}}``, each in its own delta
    (no reasoning delta without reasoning; a ``content`` of ``""`` is sent, ``None`` is not, as the message
    holds it)."""
    deltas = [{"reasoning_content": message["reasoning_content"]}] if message.get("reasoning_content") else []
    deltas += [{"content": message["content"]}] if message.get("content") is not None else []
    deltas += [{"tool_calls": [{"index": i, **call}]} for i, call in enumerate(message.get("tool_calls") or [])]
    return deltas


def _engine_error(ev: Event, started: bool) -> ApiError:
    if ev.error == "timeout":
        return ApiError(504 if started else 503, ev.message, "timeout_error")
    return ApiError(503, ev.message, "server_error")


def make_app(server: Server) -> Starlette:
    """The Starlette application of ``server`` (starts and stops its engine with the app)."""
    routes = [
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/v1/chat/completions", server.chat, methods=["POST"]),
        Route("/v1/adapters", server.add_adapter, methods=["POST"]),
        Route("/v1/adapters/{name:path}", server.delete_adapter, methods=["DELETE"]),
        Route("/health", server.health, methods=["GET"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.engine.start()
        try:
            yield
        finally:
            server.engine.stop()

    async def http_error(request, exc):  # an unknown route (404) or method (405): OpenAI's shape, not plain text
        return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}.",
                        "not_found_error" if exc.status_code == 404 else "invalid_request_error").response()

    async def server_error(request, exc):  # a bug: OpenAI's shape without the traceback (uvicorn logs it)
        return ApiError(500, f"internal server error ({type(exc).__name__}); the server log has the details.",
                        "server_error").response()

    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={HTTPException: http_error, 500: server_error})


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, which on SIGTERM or Ctrl-C first drains ``server`` (:meth:`Server.drain`).

    uvicorn alone waited ``grace`` seconds for the open requests, then cancelled them and only
    then stopped the engine (the app's lifespan): a request still running or waiting lost its
    connection without an answer (a stream ended without its last event, a plain request got
    a text/plain 500), and the log had one traceback per request.
    """

    def __init__(self, config: uvicorn.Config, server: Server, grace: float):
        super().__init__(config)
        self.jpeft, self.grace = server, grace

    async def shutdown(self, sockets=None) -> None:
        st = self.jpeft.engine.stats()
        if st["busy"] or st["waiting"]:
            print(f"jpeft serve: shutting down: {st['busy']} request(s) running and {st['waiting']} waiting get up to "
                  f"{self.grace:g} s to finish (Ctrl-C again to stop them now); new requests get 503.",
                  file=sys.stderr, flush=True)
        ended = await self.jpeft.drain(self.grace, lambda: self.force_exit)
        if ended:
            print(f"jpeft serve: {ended} request(s) did not finish in time and were answered 503 \"the server is "
                  "shutting down\".", file=sys.stderr, flush=True)
        await super().shutdown(sockets)


def make_server(server: Server, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning",
                grace: float = 5.0) -> uvicorn.Server:
    """The uvicorn server of ``server`` (``.run()`` serves until SIGTERM or Ctrl-C); on shutdown
    the requests running or waiting get ``grace`` seconds to finish, the rest a 503."""
    config = uvicorn.Config(make_app(server), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    return _Uvicorn(config, server, grace)


def run(server: Server, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> None:
    """Serves ``server`` with uvicorn until SIGTERM or Ctrl-C (:func:`make_server`). uvicorn
    delivers the signal again once the server has stopped: a Ctrl-C ends here as a
    KeyboardInterrupt (``jpeft serve``: status 130), a SIGTERM ends the process as SIGTERM does."""
    srv = make_server(server, host, port, log_level)
    srv.run()
    if not srv.started:  # uvicorn logged why (e.g. the port was taken in the meantime)
        raise ConfigError(f"the HTTP server did not start on {host}:{port}; see uvicorn's error above.")


__all__ = ["Server", "make_app", "make_server", "run", "ApiError"]
