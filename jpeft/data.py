"""Text and JSONL datasets for causal language-model fine-tuning: load, tokenize, pack.

A dataset file is either

* plain text (``.txt``, ``.md``, any suffix other than ``.jsonl``/``.ndjson``/``.json``, in any
  letter case): the whole file is one document and every token is trained on; or
* JSON Lines (``.jsonl``, ``.ndjson``, ``.json``): one object per line, either ``{"text": ...}`` (every token is
  trained on), ``{"prompt": ..., "completion": ...}`` (the loss is taken on the
  completion tokens only, as in supervised instruction tuning), or a conversation (TRL's
  "conversational" rows: ``{"messages": [{"role": ..., "content": ...}, ...]}``, or a ``prompt`` and a
  ``completion`` that are such lists), which :func:`render_chat` renders with the model's chat template
  (the loss on the assistant turns, or on the completion). Field names are configurable.

Documents are tokenized (:func:`text_encoder` reads a tokenizer as ``jpeft train`` does) and **packed** into rows of ``seq_len`` tokens. Two packings:

* ``"documents"`` (the default): whole documents are placed one after another into rows
  (a document longer than ``seq_len`` is cut into ``seq_len`` chunks, each its own
  document); every token carries a ``segment_ids`` entry (1, 2, ... per document in the
  row, 0 for the padding that fills the row's tail) and a ``position_ids`` entry restarting
  at 0 in each document. Given ``segment_ids``, jpeft's models attend block-diagonally
  (causal inside each document, never across), so a packed row's loss equals the loss of
  its documents run one at a time (tests/test_packing.py).
* ``"stream"``: the documents are joined into one token stream and cut into rows; no
  padding, but attention crosses document boundaries inside a row.

A row holds ``input_ids[seq_len]`` and ``loss_mask[seq_len]`` (and, packed by documents,
``segment_ids`` and ``position_ids``); position ``t`` of ``loss_mask`` says whether token
``t`` is a target (it is predicted from tokens ``< t``), so the loss of a causal model is
taken on ``logits[:, :-1]`` against ``input_ids[:, 1:]`` weighted by ``loss_mask[:, 1:]``
(see :func:`causal_lm_loss`). :func:`model_inputs` turns a batch into the keyword arguments
of the model call.

Batches are a pure function of ``(seed, step)`` (:meth:`PackedDataset.batch`), which is what
makes a resumed training run reproduce an uninterrupted one exactly.

>>> ds = PackedDataset.from_examples(
...     [{"prompt": "ab", "completion": "cd"}], encode=lambda s: [ord(c) for c in s], seq_len=6, eos_id=2)
>>> ds.input_ids.tolist(), ds.loss_mask.astype(int).tolist(), ds.segment_ids.tolist()
([[97, 98, 99, 100, 2, 0]], [[0, 0, 1, 1, 1, 0]], [[1, 1, 1, 1, 1, 0]])
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from jpeft.errors import ConfigError, InputValidationError, LoadError

__all__ = [
    "load_examples", "is_conversation", "render_chat", "chat_template_inputs", "chat_messages", "tokenize_examples", "tokenize_documents",
    "pack", "pack_documents",
    "PackedDataset", "model_inputs", "causal_lm_loss", "causal_lm_loss_chunked", "PACKINGS", "CHAT_LOSSES",
]

PACKINGS = ("documents", "stream")
# what a conversation ("messages") trains: its assistant turns (TRL's assistant_only_loss), or every token
CHAT_LOSSES = ("assistant", "all")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")  # compared lower-cased: train.JSONL is JSON Lines too


def load_examples(
    path: str | os.PathLike,
    *,
    text_field: str = "text",
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    messages_field: str = "messages",
) -> list[dict[str, Any]]:
    """Reads a text or JSONL dataset into a list of ``{"text": ...}`` or
    ``{"prompt": ..., "completion": ...}`` dicts, and conversations (unrendered, for
    :func:`render_chat`): ``{"messages": [...], "where": "file:line"}``, or
    ``{"prompt": [...], "completion": [...], "where": ...}`` (TRL's conversational prompt/completion),
    with the line's ``tools`` (TRL's column: a list of JSON-schema objects that the chat template
    renders, or a JSON string of that list, decoded as TRL decodes it; ``null`` is none) as ``"tools"`` and its ``chat_template_kwargs`` (TRL's column: an object of
    the template's variables, such as ``{"enable_thinking": false}``) as ``"chat_template_kwargs"`` when it
    has them.

    Args:
      path: a ``.jsonl`` file (one JSON object per line), or any other file read as UTF-8
        text (one document).
      text_field / prompt_field / completion_field / messages_field: the JSONL keys to read.

    Raises:
      ConfigError: ``prompt_field`` and ``completion_field`` are the same key.
      LoadError: the file is missing, a JSONL line is not a JSON object, a line has
        neither ``text_field`` nor both ``prompt_field`` and ``completion_field`` nor ``messages_field``,
        or one of those values is not a string (``null``, a number, a list) or holds a lone surrogate
        escape (``"\\ud800"``, which JSON reads but is not text); a conversation is not a non-empty list
        of ``{"role": str, "content": str}`` objects (an assistant turn with ``tool_calls`` may have no content;
        :func:`chat_messages` refuses its malformed calls), its ``tools`` is not a list of objects (nor a JSON
        string of one, which is decoded as TRL does), or its
        ``chat_template_kwargs`` is not an object or sets an argument of ``apply_chat_template``
        (:func:`chat_template_inputs`).

    Warns:
      UserWarning: naming the file and lines: a line holds a ``text_field`` next to a
        ``prompt_field`` or ``completion_field`` (one of them is ignored), a conversation next to
        a text or a prompt/completion pair (the conversation is ignored), or an empty or
        whitespace-only text or completion (trained as a document that ends at once), ``tools`` or
        ``chat_template_kwargs`` on a line that is no conversation (only a chat template renders them:
        ignored). Other keys of a line are read past.
    """
    if prompt_field == completion_field:
        # every pair would be the prompt twice, its second copy trained on as the completion
        raise ConfigError(f"prompt_field and completion_field are both {prompt_field!r}; name the two different keys "
                          "of a prompt/completion line ([data] prompt_field / completion_field in `jpeft train`).")
    path = os.fspath(path)
    if not os.path.isfile(path):
        what = "is a directory" if os.path.isdir(path) else "does not exist"
        raise LoadError(f"dataset file {path!r} {what} (expected a .txt or .jsonl file).")
    try:
        return _read_examples(path, text_field, prompt_field, completion_field, messages_field)
    except UnicodeDecodeError as e:
        reason, at, line = _first_bad_byte(path, e)
        raise LoadError(f"dataset file {path!r} is not UTF-8 text ({reason} at byte {at}, line {line}); "
                        "give a UTF-8 .txt or .jsonl file.") from None


def _first_bad_byte(path: str, e: UnicodeDecodeError) -> tuple[str, int, int]:
    """The reason, file offset and line of the first byte that is not UTF-8 (the error of a
    text-mode read counts from the start of the chunk it was decoding, not of the file)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as whole:
        return whole.reason, whole.start, data.count(b"\n", 0, whole.start) + 1
    return e.reason, e.start, 0  # not reached: the file decoded in one piece


def _text_value(path: str, lineno: int, row: Mapping, field: str) -> str:
    """``row[field]``, which must be a string: ``null``, a number, a list or an object would
    otherwise be trained on as its Python text (``"None"``, ``"['a', 'b']"``)."""
    v = row[field]
    if isinstance(v, list) and v and all(isinstance(m, Mapping) and "role" in m for m in v):
        raise LoadError(f"{path}:{lineno}: the {field!r} field holds a conversation (a list of role/content messages), "
                        "where a string was expected; a conversation is read from a 'messages' field (or the one named "
                        "by messages_field), or from a 'prompt' and a 'completion' that are both lists of messages.")
    return _string(f"{path}:{lineno}: the {field!r} field", v)


def _string(what: str, v) -> str:
    """``v`` if it is text; else a LoadError that begins with ``what`` (the file, line and field)."""
    if not isinstance(v, str):
        found = "null" if v is None else f"{type(v).__name__} {json.dumps(v)[:60]}"
        raise LoadError(f"{what} must be a string, found {found}. Write the text as a JSON string (or drop the line); "
                        "jpeft does not turn other values into text.")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate escape ("\ud800"): JSON reads it, no tokenizer takes it
        raise LoadError(f"{what} holds a lone surrogate {v[e.start]!r} at character "
                        f"{e.start}, which is not text (an escape such as \\ud800 without its pair); write the "
                        "character itself, or its full surrogate pair, or drop it.") from None
    return v


def _messages(path: str, lineno: int, row: Mapping, field: str) -> list[dict]:
    """``row[field]`` as a conversation: a non-empty list of ``{"role": str, "content": str}``
    objects (other keys, such as ``name``, are kept for the chat template)."""
    v, at = row[field], f"{path}:{lineno}: the {field!r} field"
    if not isinstance(v, list) or not v:
        found = "an empty list" if isinstance(v, list) else type(v).__name__
        raise LoadError(f"{at} must be a non-empty list of {{\"role\": ..., \"content\": ...}} messages, found {found}.")
    for k, m in enumerate(v):
        if isinstance(m, Mapping) and m.get("role") == "assistant" and m.get("tool_calls") and m.get("content") is None:
            continue  # a tool call without text: its content null or left out (OpenAI's and transformers' form)
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            sharegpt = isinstance(m, Mapping) and "from" in m and "value" in m
            raise LoadError(
                f"{at}: message {k} must be an object with \"role\" and \"content\", found "
                f"{json.dumps(m)[:80]}." + (" ShareGPT's {\"from\": ..., \"value\": ...} messages: rename from -> role "
                                           "(human -> user, gpt -> assistant) and value -> content." if sharegpt else ""))
        _string(f"{at}: message {k}'s \"role\"", m["role"])
        if not isinstance(m["content"], str):
            found = "null" if m["content"] is None else f"{type(m['content']).__name__} {json.dumps(m['content'])[:60]}"
            raise LoadError(f"{at}: message {k}'s \"content\" must be a string, found {found}: jpeft reads text-only "
                            "conversations (no content parts or images; only an assistant turn with \"tool_calls\" may "
                            "have none). Write the content as one string, or drop the message.")
        _string(f"{at}: message {k}'s \"content\"", m["content"])
    try:
        return chat_messages(v)
    except InputValidationError as e:
        raise LoadError(f"{at}: {e}") from None


# apply_chat_template's own arguments (transformers 5), and the conversation it hands the template as `messages`: a
# chat_template_kwargs key naming one would clash with it (a TypeError deep in transformers) or change what is
# rendered (a generation prompt, the tokens) rather than feed the template a variable
_TEMPLATE_ARGS = ("conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
                  "continue_final_message", "tokenize", "sanitize_control_tokens", "padding", "truncation",
                  "max_length", "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs")


def chat_template_inputs(tools=None, chat_template_kwargs=None) -> dict:
    """The keyword arguments of ``tokenizer.apply_chat_template`` for a conversation's ``tools`` and
    ``chat_template_kwargs`` (TRL's two columns, which its ``SFTTrainer`` passes to every rendering of the row:
    ``apply_chat_template(messages, tools=tools, **chat_template_kwargs)``, e.g. ``{"enable_thinking": false}``
    for Qwen 3's template); ``None`` is none. :func:`render_chat` and ``jpeft serve`` render with them.

    ``tools`` may also be a string holding that list as JSON (``json.dumps(tools)``, a common dataset layout, since a
    column of JSON schemas of different shapes is stored as text): it is decoded, ``json.loads(tools)``, as TRL's
    trainers decode it.

    Raises:
      InputValidationError: ``tools`` is not a list of objects (nor a JSON string of one); ``chat_template_kwargs`` is
        not an object, or names one of ``apply_chat_template``'s own arguments (``add_generation_prompt``, ``tools``,
        ...).

    >>> chat_template_inputs(None, {"enable_thinking": False})
    {'enable_thinking': False}
    """
    out = {}
    if isinstance(tools, str):  # TRL's trainers json.loads a string column (a dataset's common layout)
        try:
            tools = json.loads(tools)
        except (ValueError, RecursionError) as e:
            raise InputValidationError(
                f"the 'tools' field is a string that is not JSON ({str(e)[:80]}): a string is read as TRL reads it, "
                "json.loads(tools), and must hold a list of tool objects (json.dumps of the list), or null for none; "
                f"found {json.dumps(tools)[:60]}.") from None
    if tools is not None:
        if not (isinstance(tools, list) and all(isinstance(t, Mapping) for t in tools)):
            found = (f"{type(tools).__name__} {json.dumps(tools)[:60]}" if not isinstance(tools, list) else
                     "a list holding " + json.dumps(next(t for t in tools if not isinstance(t, Mapping)))[:60])
            raise InputValidationError(
                "the 'tools' field must be a list of tool objects (JSON schemas such as {\"type\": \"function\", "
                "\"function\": {\"name\": ..., \"parameters\": ...}}, which the chat template renders), or null for "
                f"none; found {found}.")
        out["tools"] = [dict(t) for t in tools]
    if chat_template_kwargs is not None:
        if not isinstance(chat_template_kwargs, Mapping):
            raise InputValidationError(
                "the 'chat_template_kwargs' field must be an object of the chat template's variables (e.g. "
                f"{{\"enable_thinking\": false}}), or null for none; found {type(chat_template_kwargs).__name__} "
                f"{json.dumps(chat_template_kwargs)[:60]}.")
        clash = sorted(k for k in chat_template_kwargs if k in _TEMPLATE_ARGS)
        if clash:
            raise InputValidationError(
                f"the 'chat_template_kwargs' field sets {clash}, which are apply_chat_template's own arguments (jpeft "
                "sets them for each rendering; tools go in the 'tools' field), not variables of the template; drop "
                "them from chat_template_kwargs.")
        out.update(chat_template_kwargs)
    return out


def _template_fields(path: str, lineno: int, row: Mapping) -> dict:
    """A conversation line's ``tools`` and ``chat_template_kwargs`` (each left out when absent or ``null``),
    checked by :func:`chat_template_inputs`, for :func:`render_chat` to pass to every rendering of it."""
    try:
        inputs = chat_template_inputs(row.get("tools"), row.get("chat_template_kwargs"))
    except InputValidationError as e:
        raise LoadError(f"{path}:{lineno}: {e}") from None
    out = {"tools": inputs["tools"]} if "tools" in inputs else {}  # a JSON string of tools decoded
    return {**out, **({"chat_template_kwargs": row["chat_template_kwargs"]}
                      if row.get("chat_template_kwargs") is not None else {})}


def chat_messages(messages: Sequence[Mapping]) -> list[dict]:
    """A conversation as jpeft hands it to the chat template, in training (:func:`render_chat`) and in ``jpeft
    serve`` alike, so a served prompt is the trained one: each message a new dict with all its keys, and an
    assistant turn's ``tool_calls`` whose ``function.arguments`` is a JSON string (OpenAI's API sends them so)
    given that object instead (transformers' form: chat templates expect a dict and render a string as it is, or
    fail on it; vLLM decodes them the same way before rendering). An assistant turn with ``tool_calls`` may have
    ``content`` null or leave it out (OpenAI's and transformers' form).

    Raises:
      InputValidationError: a ``tool_calls`` that is not a list of objects each with a ``function`` object; an
        ``arguments`` string that is not a JSON object.

    >>> chat_messages([{"role": "assistant", "content": None, "tool_calls": [
    ...     {"type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]}])[0]["tool_calls"]
    [{'type': 'function', 'function': {'name': 'f', 'arguments': {'x': 1}}}]
    """
    out = []
    for k, m in enumerate(messages):
        m = dict(m)
        calls = m.get("tool_calls")
        if calls is not None:
            if not isinstance(calls, list) or not all(isinstance(c, Mapping) and isinstance(c.get("function"), Mapping)
                                                      for c in calls):
                raise InputValidationError(
                    f"message {k}'s \"tool_calls\" must be a list of {{\"type\": \"function\", \"function\": "
                    f"{{\"name\": ..., \"arguments\": ...}}}} objects, found {json.dumps(calls)[:80]}.")
            m["tool_calls"] = [_decoded_call(k, c) for c in calls]
        out.append(m)
    return out


def _decoded_call(k: int, call: Mapping) -> dict:
    """A tool call with its ``function.arguments`` as an object: a JSON string of one is decoded."""
    fn = dict(call["function"])
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            fn["arguments"] = json.loads(args)
        except (ValueError, RecursionError):
            fn["arguments"] = None
        if not isinstance(fn["arguments"], Mapping):
            raise InputValidationError(
                f"message {k}'s tool call {fn.get('name')!r} has \"arguments\" {json.dumps(args)[:80]}, a string that "
                "is not a JSON object; arguments are an object, or a JSON string of one (json.dumps(arguments), as "
                "OpenAI's API writes them), which jpeft decodes, as vLLM does, since chat templates expect an object.")
    return {**call, "function": fn}


# said of a file holding one JSON array, or one object spread over lines (json.dump(..., indent=2)): .json is
# JSON Lines here, and a bare "expected a JSON object, found list" leaves the fix to guess
_JSON_LINES_HINT = ("; a .json/.jsonl file is read as JSON Lines, one object per line, not as one JSON array or an object "
                    "spread over lines. Write one object per line (e.g. jq -c '.[]' data.json > data.jsonl).")


def _read_examples(path: str, text_field: str, prompt_field: str, completion_field: str,
                   messages_field: str) -> list[dict[str, Any]]:
    if not path.lower().endswith(JSONL_SUFFIXES):
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
        if not text.strip():
            raise LoadError(f"dataset file {path!r} is empty; put some text in it.")
        return [{"text": text}]
    out: list[dict[str, str]] = []
    empty: dict[str, list[int]] = {}  # field -> the lines where it is empty or blank
    both: list[int] = []  # lines with a text field next to a prompt or completion field
    beside: list[int] = []  # lines with a conversation next to a text or a prompt/completion pair (which is read)
    stray_tools: list[int] = []  # lines with tools or chat_template_kwargs that are no conversation (never rendered)
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise LoadError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object"
                                f"{_JSON_LINES_HINT if line.strip() in ('[', '{') else '.'}") from None
            except RecursionError:
                raise LoadError(f"{path}:{lineno}: JSON nested too deeply to read; each line must be one flat object.") from None
            except ValueError as e:  # a number of more than 4,300 digits (Python's int-conversion limit)
                raise LoadError(f"{path}:{lineno}: not readable JSON ({e}); each line must be one JSON object "
                                "whose texts are strings.") from None
            if not isinstance(row, Mapping):
                raise LoadError(f"{path}:{lineno}: expected a JSON object, found {type(row).__name__}"
                                f"{_JSON_LINES_HINT if isinstance(row, list) else '.'}")
            if text_field in row and (prompt_field in row or completion_field in row):
                both.append(lineno)
            if messages_field in row and (text_field in row or (prompt_field in row and completion_field in row)):
                beside.append(lineno)
            field = None  # the text field whose blank value is warned about
            if prompt_field in row and completion_field in row:
                if isinstance(row[prompt_field], list) or isinstance(row[completion_field], list):
                    # TRL's conversational prompt/completion: both lists of messages
                    out.append({"prompt": _messages(path, lineno, row, prompt_field),
                                "completion": _messages(path, lineno, row, completion_field),
                                "where": f"{path}:{lineno}", **_template_fields(path, lineno, row)})
                else:
                    out.append({"prompt": _text_value(path, lineno, row, prompt_field),
                                "completion": _text_value(path, lineno, row, completion_field)})
                    field = completion_field
            elif text_field in row:
                out.append({"text": _text_value(path, lineno, row, text_field)})
                field = text_field
            elif messages_field in row:
                out.append({"messages": _messages(path, lineno, row, messages_field), "where": f"{path}:{lineno}",
                            **_template_fields(path, lineno, row)})
            else:
                other = next((k for k in ("messages", "conversations") if isinstance(row.get(k), list)), None)
                fix = (f"A conversation is read from the {messages_field!r} field: name yours with messages_field = "
                       f"{other!r}." if other else
                       "Rename the fields, or name yours with text_field / prompt_field / completion_field / "
                       "messages_field (`jpeft train`'s [data] section, load_examples' keywords; `jpeft eval` reads the "
                       "default names only).")
                raise LoadError(
                    f"{path}:{lineno}: expected a {text_field!r} field, both {prompt_field!r} and "
                    f"{completion_field!r}, or a {messages_field!r} conversation, found keys {sorted(row)}. {fix}"
                )
            if field is not None and not row[field].strip():
                empty.setdefault(field, []).append(lineno)
            if field is not None and any(row.get(k) is not None for k in ("tools", "chat_template_kwargs")):
                stray_tools.append(lineno)
    if not out:
        raise LoadError(f"dataset file {path!r} has no examples.")
    if both:
        warnings.warn(
            f"{path}:{both[0]}: {_count_lines(both)} hold a {text_field!r} field next to a {prompt_field!r} or "
            f"{completion_field!r} field: a line with both {prompt_field!r} and {completion_field!r} is read as that "
            f"pair (the loss on the completion only) and its {text_field!r} is ignored; one with only one of them is "
            f"read as its {text_field!r} (every token trained), the other ignored. Keep one kind per line (drop or "
            "rename the other field).", stacklevel=3)
    if beside:
        warnings.warn(
            f"{path}:{beside[0]}: {_count_lines(beside)} hold a {messages_field!r} conversation next to a "
            f"{text_field!r} field or a {prompt_field!r}/{completion_field!r} pair, which is read (as it would be "
            f"alone) and the conversation ignored. Keep one kind per line (drop or rename the other field).",
            stacklevel=3)
    if stray_tools:
        warnings.warn(
            f"{path}:{stray_tools[0]}: {_count_lines(stray_tools)} hold a 'tools' or 'chat_template_kwargs' field next "
            f"to a {text_field!r} or a {prompt_field!r}/{completion_field!r} pair of strings, which is read as it is: "
            f"both are inputs of a chat template, which renders conversations only, so they are ignored. Write these "
            f"lines as conversations ({messages_field!r}, or a prompt and completion of messages), or drop the "
            "fields.", stacklevel=3)
    for field, lines in empty.items():
        after = "its prompt" if field == completion_field else "the start of the document"
        warnings.warn(
            f"{path}:{lines[0]}: the {field!r} field is empty or only whitespace in {_count_lines(lines)}; each "
            f"trains the model to end (the EOS) right after {after} (and any whitespace it holds). Drop these lines "
            "unless that is meant.", stacklevel=3)
    return out


def _count_lines(lines: Sequence[int]) -> str:
    """``"2 line(s) (3, 7)"``: how many lines, and the first few of them."""
    shown = ", ".join(map(str, lines[:5])) + (", ..." if len(lines) > 5 else "")
    return f"{len(lines)} line(s) ({shown})"


def text_encoder(tokenizer):
    """``(encode, bos_id, eos_id)`` for :class:`PackedDataset`, as ``jpeft train`` and ``jpeft eval``
    tokenize: ``encode`` is ``str -> list[int]`` without special tokens.

    ``bos_id`` is the token the tokenizer puts in front of a text itself (``tokenizer(text)``, as
    transformers, TRL's ``SFTTrainer`` and ``jpeft serve`` tokenize): a tokenizer saved with
    ``add_bos_token=False``, or a GPT-2-style one whose ``bos_token`` is ``<|endoftext|>`` but never
    added, gets ``None``, so the rows hold no BOS the model will not see when it is served; one whose
    post-processor adds a token in front without naming it ``bos_token`` gets that token, which
    ``tokenizer(text)`` and ``jpeft serve`` give the model too. ``eos_id`` is the tokenizer's EOS
    (appended to every document, as TRL does)."""
    if tokenizer is None:
        raise LoadError("the model folder has no tokenizer files (tokenizer.json or vocab files); "
                        "save one next to the model with tokenizer.save_pretrained(folder).")

    def encode(s: str):
        # verbose=False: a document longer than the tokenizer's model_max_length is cut into seq_len rows (checked
        # against the model's positions), not "run through the model" whole as transformers' warning says
        return tokenizer(s, add_special_tokens=False, verbose=False)["input_ids"]

    bos = getattr(tokenizer, "bos_token_id", None)
    # a text that is no special token: does the tokenizer's own call start it with the BOS? "" where "a" cannot be
    # tokenized (a word-level vocabulary of digits without an unknown token raises on it)
    for probe in ("a", ""):
        try:
            added, plain = tokenizer(probe)["input_ids"], encode(probe)
        except Exception:  # the tokenizers library raises a bare Exception
            continue
        if probe and len(added) > len(plain) and added[1:1 + len(plain)] == plain:
            # the one token the call puts in front, named bos_token or not (a post-processor "<s> $A" of a tokenizer
            # wrapped without bos_token): tokenizer(text) and `jpeft serve` start every text with it
            bos = added[0]
        if bos is not None and (added[:1] != [bos] or plain[:1] == [bos]):
            bos = None
        break
    return encode, bos, getattr(tokenizer, "eos_token_id", None)


def _check_encode(encode) -> None:
    """Refuses an ``encode`` that is no function ``str -> token ids`` before packing: the tuple
    :func:`text_encoder` returns, or a tokenizer (whose call gives a dict), failed deep inside it
    (``'tuple' object is not callable``, ``invalid literal for int()``).

    Raises:
      InputValidationError: saying to unpack ``text_encoder(tokenizer)``.
    """
    how = "encode, bos_id, eos_id = jpeft.data.text_encoder(tokenizer), then pass encode (and eos_id=, bos_id=)"
    if isinstance(encode, tuple):
        raise InputValidationError(f"encode must be a function str -> list of token ids, found a tuple of "
                                   f"{len(encode)}; jpeft.data.text_encoder returns three things: {how}.")
    if not callable(encode):
        raise InputValidationError(f"encode must be a function str -> list of token ids, found "
                                   f"{type(encode).__name__}; {how}.")
    if callable(getattr(encode, "encode", None)) and callable(getattr(encode, "decode", None)):
        raise InputValidationError(f"encode must be a function str -> list of token ids, found a tokenizer "
                                   f"({type(encode).__name__}, whose call returns a dict of input_ids and "
                                   f"attention_mask); {how}.")


def is_conversation(example: Mapping[str, Any]) -> bool:
    """Whether ``example`` (a row of :func:`load_examples`) is a conversation that :func:`render_chat`
    has still to render: ``{"messages": [...]}``, or a ``prompt`` and ``completion`` that are lists
    of messages."""
    return "messages" in example or ("prompt" in example and not isinstance(example["prompt"], str))


def render_chat(examples: Iterable[Mapping[str, Any]], tokenizer, *, chat_loss: str = "assistant") -> list[dict]:
    """Renders the conversations among ``examples`` (:func:`load_examples`' ``{"messages": [...]}``
    and conversational ``{"prompt": [...], "completion": [...]}`` rows) with the tokenizer's chat
    template, ``tokenizer.apply_chat_template(messages, tokenize=False)`` (transformers' own
    rendering: its Jinja environment, the template from ``tokenizer_config.json``'s ``chat_template``
    or a ``chat_template.jinja`` file); other rows are returned as they are. A row's ``tools``
    (:func:`load_examples`) are passed on, ``apply_chat_template(messages, tools=row["tools"], ...)``, to
    every rendering of it, as TRL's ``SFTTrainer`` does, and so are its ``chat_template_kwargs`` (the template's
    own variables, ``apply_chat_template(messages, tools=..., **row["chat_template_kwargs"])``, e.g. Qwen 3's
    ``enable_thinking``; :func:`chat_template_inputs`).

    A rendered row is ``{"chat": text, "targets": [[start, end], ...]}``: the text, which holds
    its own special tokens (:func:`tokenize_documents` tokenizes it as ``apply_chat_template(...,
    tokenize=True)`` does, adding no BOS or EOS, as TRL does for conversations), and the character
    spans trained on. With ``chat_loss="assistant"`` (the default; TRL's ``assistant_only_loss``)
    these are the assistant turns: turn ``i`` is the text that ``messages[:i + 1]`` renders
    beyond ``messages[:i]`` rendered with ``add_generation_prompt=True`` (the reply and what the
    template writes after it, e.g. ChatML's ``<|im_end|>`` and newline); ``"all"`` trains every
    token. A conversational prompt/completion row trains its completion: what ``prompt +
    completion`` renders beyond the prompt with the generation prompt, as TRL's ``SFTTrainer`` does.

    Raises:
      ConfigError: ``chat_loss`` is not one of :data:`CHAT_LOSSES`; jinja2 is not installed.
      LoadError: naming the row's file and line: its ``tools`` or ``chat_template_kwargs`` are refused by
        :func:`chat_template_inputs`; the tokenizer has no chat template; the template
        refuses the conversation (its ``raise_exception`` message is passed on); an assistant turn
        comes first (nothing renders before it); the template is not prefix-stable (a conversation's
        beginning does not render as the beginning of the whole, e.g. a template that drops earlier
        turns' reasoning), so the assistant turns cannot be found: train on every token
        (``chat_loss="all"``) or fix the template.

    Warns:
      UserWarning: naming the lines of conversations without an assistant turn (nothing trained).
    """
    if chat_loss not in CHAT_LOSSES:
        raise ConfigError(f"chat_loss must be one of {list(CHAT_LOSSES)}, found {chat_loss!r}: 'assistant' trains the "
                          "assistant turns of a conversation, 'all' every token ([data] chat_loss in `jpeft train`).")
    out, idle = [], []
    for k, ex in enumerate(examples):
        if not is_conversation(ex):
            out.append(ex)
        elif "messages" in ex:
            where = ex.get("where") or f"example {k}"
            out.append(_render_messages(tokenizer, _row_messages(ex["messages"], where), where, chat_loss,
                                        _row_inputs(ex, where)))
            idle += [where] if not out[-1]["targets"] else []
        else:  # TRL's conversational prompt/completion
            where = ex.get("where") or f"example {k}"
            inputs = _row_inputs(ex, where)
            turns = _row_messages(list(ex["prompt"]) + list(ex["completion"]), where)
            prompt = _render(tokenizer, turns[:len(ex["prompt"])], where, True, inputs)
            full = _render(tokenizer, turns, where, False, inputs)
            if not full.startswith(prompt):
                raise LoadError(_unstable(where, "the prompt with the generation prompt", "prompt + completion", "this row "
                                          "as a 'messages' conversation with chat_loss = \"all\""))
            out.append({"chat": full, "targets": [[len(prompt), len(full)]]})
    if idle:
        warnings.warn(f"{idle[0]}: {len(idle)} conversation(s) hold no assistant turn, so nothing of them is trained "
                      "(chat_loss = \"assistant\"); add the replies, drop them, or train every token (chat_loss = "
                      "\"all\").", stacklevel=2)
    return out


def _row_messages(messages, where: str) -> list[dict]:
    """:func:`chat_messages` of a row (again here: a row built in Python did not pass through :func:`load_examples`)."""
    try:
        return chat_messages(messages)
    except InputValidationError as e:
        raise LoadError(f"{where}: {e}") from None


def _row_inputs(ex: Mapping, where: str) -> dict:
    """The row's ``tools`` and ``chat_template_kwargs`` as ``apply_chat_template``'s keyword arguments (checked
    again here: a row built in Python did not pass through :func:`load_examples`)."""
    try:
        return chat_template_inputs(ex.get("tools"), ex.get("chat_template_kwargs"))
    except InputValidationError as e:
        raise LoadError(f"{where}: {e}") from None


def _render_messages(tokenizer, messages, where: str, chat_loss: str, inputs: Mapping) -> dict:
    full = _render(tokenizer, messages, where, False, inputs)
    if chat_loss == "all":
        return {"chat": full, "targets": [[0, len(full)]]}
    targets = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0:
            raise LoadError(f"{where}: the conversation begins with an assistant turn, so nothing renders before it to "
                            "tell the reply from its header; begin with a system or user turn, or train every token "
                            "(chat_loss = \"all\").")
        before = _render(tokenizer, messages[:i], where, True, inputs)
        upto = _render(tokenizer, messages[:i + 1], where, False, inputs)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise LoadError(_unstable(where, f"messages[:{i}] with the generation prompt" if not upto.startswith(before)
                                      else f"messages[:{i + 1}]", f"messages[:{i + 1}]" if not upto.startswith(before)
                                      else "the whole conversation", "every token (chat_loss = \"all\")"))
        targets.append([len(before), len(upto)])
    return {"chat": full, "targets": targets}


def _unstable(where: str, part: str, whole: str, fix: str) -> str:
    return (f"{where}: the chat template is not prefix-stable: {part} does not render as the beginning of {whole}, so "
            f"the tokens to train cannot be told from the rest (a template that rewrites earlier turns, such as one "
            f"dropping their reasoning, does this). Train on {fix}, or give a template whose renderings of a "
            "conversation's beginning are prefixes of the whole.")


def _render(tokenizer, messages, where: str, generation_prompt: bool, inputs: Mapping) -> str:
    """``tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=..., **inputs)`` (``inputs``:
    the row's :func:`chat_template_inputs`); its refusals as named errors."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise LoadError(f"{where}: a conversation is rendered with the model's chat template, and "
                        f"{'no tokenizer was given' if tokenizer is None else 'the tokenizer has none'} (no chat_template "
                        "in tokenizer_config.json, no chat_template.jinja in the model folder). Use a model folder whose "
                        "tokenizer has one (an instruct model's), or write the data as text or prompt/completion lines.")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                             **inputs)
    except ImportError as e:  # transformers renders with jinja2, which it does not require
        raise ConfigError(f"rendering conversations with the chat template needs jinja2 ({e}); reinstall jpeft (pip "
                          "install -e .), which depends on it, or pip install 'jinja2>=3.1.6'.") from None
    except Exception as e:  # jinja2's TemplateError (the template's raise_exception), UndefinedError, a TypeError
        msg = " ".join(str(e).split())[:300]
        raise LoadError(f"{where}: the model's chat template refused this conversation: {type(e).__name__}: {msg}. "
                        "Fix the line (its roles and their order as the template expects them).") from None


def tokenize_documents(
    examples: Iterable[Mapping[str, str]],
    encode: Callable[[str], Sequence[int]],
    *,
    eos_id: Optional[int] = None,
    bos_id: Optional[int] = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Tokenizes each example into ``(ids int32[n], mask bool[n])``.

    Each document is ``[bos] + tokens + [eos]`` (when those ids are given); a text whose
    tokens already begin with ``bos`` or end with ``eos`` (a chat template's output, a
    completion written with its ``</s>``) does not get a second one (TRL appends the EOS only
    where it is missing too). For a prompt/completion pair the prompt tokens (and the ``bos``)
    are masked out; the completion tokens and the closing ``eos`` are targets. The pair is tokenized as one text,
    ``encode(prompt + completion)``, as TRL does, and its tokens up to where they stop agreeing
    with ``encode(prompt)`` are the prompt's (all of them when the joint tokens begin with the
    prompt's): encoded apart, a SentencePiece-style tokenizer (Llama 2, Mistral) would start the
    completion with a word-boundary mark the text does not have. Where a token spans the
    boundary (a prompt ending in a space: ``"Answer: "`` + ``"4"`` tokenized as ``Answer``,
    ``:``, ``Ġ4``), that token holds completion text and is a target, as in TRL's
    ``SFTTrainer`` (``common_prefix_length``); a ``UserWarning`` says in how many examples.
    A conversation rendered by :func:`render_chat` (``{"chat": text, "targets": spans}``) is
    ``encode(text)`` alone (its template wrote its special tokens), its targets the tokens of its
    spans found the same way; an unrendered one raises ``InputValidationError``.
    """
    docs = []
    mismatched = 0
    for ex in examples:
        if "chat" in ex:  # render_chat's output: its own special tokens, no BOS or EOS added (TRL adds none either)
            ids, mask, _ = _spans_mask(encode, ex["chat"], ex["targets"])
            if mask:
                mask[0] = False  # the conversation's first token (its BOS, a turn's header) is predicted from nothing
            if ids:
                docs.append((np.asarray(ids, np.int32), np.asarray(mask, bool)))
            continue
        if is_conversation(ex):
            raise InputValidationError("a conversation (a list of role/content messages) must be rendered with the "
                                       "model's chat template first: render_chat(examples, tokenizer).")
        if "text" in ex:
            t = list(encode(ex["text"]))
            ids, mask = t, [True] * len(t)
        else:
            ids, mask, inside = _spans_mask(encode, ex["prompt"] + ex["completion"], [[len(ex["prompt"]), None]])
            mismatched += inside
        if eos_id is not None and ids[-1:] != [int(eos_id)]:
            ids, mask = ids + [int(eos_id)], mask + [True]
        if bos_id is not None:
            if ids[:1] == [int(bos_id)] and (len(ids) > 1 or bos_id != eos_id):  # the text's own BOS: no target
                mask[0] = False
            else:
                ids, mask = [int(bos_id)] + ids, [False] + mask
        if ids:
            docs.append((np.asarray(ids, np.int32), np.asarray(mask, bool)))
    if mismatched:
        warnings.warn(
            f"in {mismatched} prompt/completion example(s) the tokens of prompt + completion do not begin with the "
            "prompt's own tokens (a token spans the boundary); the tokens they share were masked as the prompt and the "
            "rest, from the token spanning the boundary on, trained on as the completion, as TRL does. End prompts at "
            "a token boundary (e.g. with a newline; a trailing space often merges into the completion's first word) to "
            "avoid it.",
            stacklevel=2,
        )
    return docs


def _spans_mask(encode, text: str, spans) -> tuple[list[int], list[bool], bool]:
    """``encode(text)`` and the mask of its tokens inside the character ``spans`` (``[start,
    end]``, ``end=None``: the text's end), and whether a span begins inside a token.

    The tokens before a span's start are those ``encode(text)`` shares with ``encode(text[:start])``
    (the text is tokenized once, as TRL does; encoded apart, a SentencePiece-style tokenizer would
    start the span with a word-boundary mark); a token spanning a span's start or end holds text of
    the span and is a target, as in TRL's ``SFTTrainer`` (``common_prefix_length``)."""
    ids = list(encode(text))
    mask = [False] * len(ids)
    inside = False

    def shared(at):  # (tokens of ids before character `at`, whether a token of ids spans it)
        if at >= len(text):
            return len(ids), False
        part = list(encode(text[:at])) if at > 0 else []
        n = next((i for i, (a, b) in enumerate(zip(part, ids)) if a != b), min(len(part), len(ids)))
        return n, n < len(part)

    for start, end in spans:
        a, cut = shared(start)
        b, over = shared(len(text) if end is None else end)
        mask[a:max(a, b + over)] = [True] * max(0, b + over - a)
        inside |= cut
    return ids, mask, inside


def tokenize_examples(
    examples: Iterable[Mapping[str, str]],
    encode: Callable[[str], Sequence[int]],
    *,
    eos_id: Optional[int] = None,
    bos_id: Optional[int] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`tokenize_documents` joined into one token stream and one loss mask.

    Returns:
      ``(ids int32[n], mask bool[n])``.
    """
    docs = tokenize_documents(examples, encode, eos_id=eos_id, bos_id=bos_id)
    if not docs:
        return np.zeros((0,), np.int32), np.zeros((0,), bool)
    return np.concatenate([d[0] for d in docs]), np.concatenate([d[1] for d in docs])


def pack(ids: np.ndarray, mask: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Cuts a token stream into ``[rows, seq_len]`` rows (the incomplete tail is dropped).

    Raises:
      InputValidationError: ``seq_len < 2`` or the stream is shorter than one row.
    """
    _check_seq_len(seq_len)
    n = len(ids) // seq_len
    if n == 0:
        raise InputValidationError(
            f"the dataset has {len(ids)} tokens, fewer than one row of seq_len={seq_len}; "
            "add data or lower seq_len."
        )
    return (
        np.asarray(ids[: n * seq_len], np.int32).reshape(n, seq_len),
        np.asarray(mask[: n * seq_len], bool).reshape(n, seq_len),
    )


def _check_seq_len(seq_len):
    if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 2:
        raise InputValidationError(f"seq_len must be an integer >= 2, found {seq_len!r}.")


def pack_documents(docs: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int):
    """Packs whole documents into rows of ``seq_len`` tokens, in order: a document goes into
    the current row if it fits, else starts the next one; a document longer than ``seq_len``
    is cut into chunks of ``seq_len`` tokens, each packed as its own document. The tail of a
    row is padding (id 0, no loss, segment 0).

    The first token of every document gets no loss (in a row it would be predicted from the
    previous document, and run alone it is never predicted). A ``UserWarning`` counts the
    prompt/completion documents whose first target, or any target, lies past their first
    ``seq_len`` tokens: those targets are trained in a chunk without (all of) the prompt.

    Returns:
      ``(input_ids, loss_mask, segment_ids, position_ids)``, each ``[rows, seq_len]``
      (int32, bool, int32, int32); segments are numbered 1, 2, ... within each row.

    >>> docs = [(np.array([5, 6, 7]), np.ones(3, bool)), (np.array([8, 9]), np.ones(2, bool))]
    >>> ids, mask, seg, pos = pack_documents(docs, 4)
    >>> ids.tolist(), seg.tolist(), pos.tolist(), mask.astype(int).tolist()
    ([[5, 6, 7, 0], [8, 9, 0, 0]], [[1, 1, 1, 0], [1, 1, 0, 0]], [[0, 1, 2, 0], [0, 1, 0, 0]], [[0, 1, 1, 0], [0, 1, 0, 0]])
    """
    _check_seq_len(seq_len)
    chunks = []
    cut_off = 0  # documents whose first target lies past their first chunk: a prompt longer than seq_len
    # documents with a prompt (a non-target before the first target other than the document's first token, which is
    # no target anyway) whose targets run past the first chunk, and those targets, trained without the prompt
    spilled = spilled_targets = 0
    for ids, mask in docs:
        first = np.flatnonzero(np.asarray(mask, bool))
        cut_off += bool(first.size and first[0] >= seq_len)
        if first.size and 2 <= first[0] < seq_len <= first[-1]:
            spilled += 1  # a chunk's first token is no target (below)
            later = first[first >= seq_len]
            spilled_targets += int(np.count_nonzero(later % seq_len))
        for i in range(0, len(ids), seq_len):
            chunks.append((np.asarray(ids[i:i + seq_len], np.int32), np.asarray(mask[i:i + seq_len], bool)))
    if not chunks:
        raise InputValidationError("the dataset has no tokens to pack; add data.")
    if cut_off:
        warnings.warn(
            f"in {cut_off} document(s) the first target token comes after the first {seq_len} tokens (a prompt longer "
            f"than seq_len={seq_len}): the completion is trained in a chunk that holds none of the prompt's first "
            f"{seq_len} tokens (a chunk sees none of the chunks before it). Raise seq_len or shorten these prompts.",
            stacklevel=2)
    if spilled:
        warnings.warn(
            f"in {spilled} prompt/completion (or conversation) document(s) the completion runs past the first {seq_len} "
            f"tokens: {spilled_targets} of their target tokens are trained in later chunks that hold none of the prompt (a "
            "chunk sees none of the chunks before it), as text that follows no instruction. Raise seq_len or shorten "
            "these completions.", stacklevel=2)
    rows: list[list[tuple[np.ndarray, np.ndarray]]] = [[]]
    used = 0
    for c in chunks:
        if used + len(c[0]) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(c)
        used += len(c[0])
    n = len(rows)
    out_ids = np.zeros((n, seq_len), np.int32)
    out_mask = np.zeros((n, seq_len), bool)
    out_seg = np.zeros((n, seq_len), np.int32)
    out_pos = np.zeros((n, seq_len), np.int32)
    for r, row in enumerate(rows):
        at = 0
        for j, (ids, mask) in enumerate(row):
            k = len(ids)
            out_ids[r, at:at + k] = ids
            out_mask[r, at:at + k] = mask
            out_mask[r, at] = False
            out_seg[r, at:at + k] = j + 1
            out_pos[r, at:at + k] = np.arange(k)
            at += k
    return out_ids, out_mask, out_seg, out_pos


@dataclasses.dataclass(frozen=True)
class PackedDataset:
    """Packed rows ``input_ids[rows, seq_len]`` and ``loss_mask[rows, seq_len]``, plus
    ``segment_ids`` and ``position_ids`` when packed by documents (None for a stream)."""

    input_ids: np.ndarray
    loss_mask: np.ndarray
    segment_ids: Optional[np.ndarray] = None
    position_ids: Optional[np.ndarray] = None

    @classmethod
    def from_examples(cls, examples, encode, seq_len: int, *, eos_id=None, bos_id=None,
                      packing: str = "documents", source: Optional[str] = None) -> "PackedDataset":
        """Tokenizes and packs ``examples``; ``packing`` is ``"documents"`` (no attention across
        documents, the default) or ``"stream"`` (one token stream cut into rows). ``source``
        (e.g. the file the examples came from) begins the warnings and errors about them."""
        if source is None:
            return cls._pack(examples, encode, seq_len, eos_id, bos_id, packing)
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            try:
                ds = cls._pack(examples, encode, seq_len, eos_id, bos_id, packing)
            except InputValidationError as e:
                raise InputValidationError(f"{source}: {e}") from None
        for w in said:
            warnings.warn(f"{source}: {w.message}", w.category, stacklevel=2)
        return ds

    @classmethod
    def _pack(cls, examples, encode, seq_len, eos_id, bos_id, packing) -> "PackedDataset":
        _check_encode(encode)
        examples = list(examples)  # counted below after tokenizing
        if packing not in PACKINGS:
            raise InputValidationError(
                f"packing must be one of {list(PACKINGS)}, found {packing!r}: 'documents' keeps documents apart "
                "(segment ids, per-document positions), 'stream' cuts one token stream into rows."
            )
        if packing == "stream":
            ids, mask = tokenize_examples(examples, encode, eos_id=eos_id, bos_id=bos_id)
            ds = cls(*pack(ids, mask, seq_len))
            lost, total = int(mask[len(ds) * seq_len:].sum()), int(mask.sum())
            if lost and lost >= 0.1 * total:  # a small eval set can lose half of itself
                warnings.warn(
                    f"packing='stream' dropped the last {len(ids) - len(ds) * seq_len} tokens of the stream ({lost} of "
                    f"its {total} target tokens), which do not fill a row of seq_len={seq_len}; lower seq_len, or pack "
                    "by 'documents' (nothing dropped), to keep them.", stacklevel=2)
        else:
            ds = cls(*pack_documents(tokenize_documents(examples, encode, eos_id=eos_id, bos_id=bos_id), seq_len))
        if ds.num_targets == 0:
            # its loss would read 0 (perplexity 1) and training on it would never move the adapter
            raise InputValidationError(
                f"the dataset has no target token in its {len(ds)} packed row(s) of seq_len={seq_len}: every token is a "
                "prompt token, padding, or the first of its document or row (never predicted). Give completions (or "
                "text lines), a tokenizer with an EOS token, or a larger seq_len.")
        pairs = sum(1 for ex in examples if "prompt" in ex)
        if eos_id is None and pairs:
            # TRL appends the tokenizer's EOS to every completion; without one nothing marks where a completion ends
            warnings.warn(
                f"no EOS token (eos_id=None; the tokenizer names none): the {pairs} prompt/completion pair(s) get no "
                "end marker, so a model trained on them is never taught to stop after a completion (generation runs on "
                "to its token limit). Give the tokenizer an eos_token (tokenizer.add_special_tokens({'eos_token': "
                "'</s>'}) if it has none, then save_pretrained into the model folder; the model's vocab_size must "
                "hold it), or pass eos_id.", stacklevel=3)
        return ds

    @classmethod
    def from_file(cls, path, encode, seq_len: int, *, eos_id=None, bos_id=None, packing: str = "documents",
                  tokenizer=None, chat_loss: str = "assistant", **fields) -> "PackedDataset":
        """:func:`load_examples`, :func:`render_chat` (conversations need ``tokenizer``, whose chat
        template renders them) then :meth:`from_examples` (its warnings and errors name ``path``)."""
        examples = render_chat(load_examples(path, **fields), tokenizer, chat_loss=chat_loss)
        return cls.from_examples(examples, encode, seq_len, eos_id=eos_id, bos_id=bos_id, packing=packing,
                                 source=str(path))

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def num_targets(self) -> int:
        """Tokens that carry loss (excluding each row's first position, never predicted)."""
        return int(self.loss_mask[:, 1:].sum())

    def batch(self, step: int, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
        """The batch of training step ``step``: a pure function of ``(seed, step)``.

        Rows are drawn without replacement from a fresh permutation per epoch, so every
        row is seen once per epoch, and ``batch(step)`` needs no iterator state (resuming
        at step ``k`` continues exactly where an uninterrupted run would be).
        """
        for name, v, low in (("step", step, 0), ("batch_size", batch_size, 1), ("seed", seed, 0)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
                raise InputValidationError(f"PackedDataset.batch: {name} must be an integer >= {low}, found {v!r}.")
        n = len(self)
        pos = np.arange(step * batch_size, (step + 1) * batch_size)
        epochs, within = pos // n, pos % n
        idx = np.empty_like(pos)
        for e in np.unique(epochs):
            perm = np.random.default_rng([int(seed), int(e)]).permutation(n)
            sel = epochs == e
            idx[sel] = perm[within[sel]]
        return self._rows(idx)

    def _rows(self, idx) -> dict[str, np.ndarray]:
        out = {"input_ids": self.input_ids[idx], "loss_mask": self.loss_mask[idx]}
        if self.segment_ids is not None:
            out["segment_ids"] = self.segment_ids[idx]
            out["position_ids"] = self.position_ids[idx]
        return out

    def eval_batches(self, batch_size: int, max_rows: Optional[int] = None):
        """Yields the rows in order (the first ``max_rows`` of them; ``None``: all), for evaluation.
        Every batch has ``batch_size`` rows (one compiled shape): the last one is padded with rows
        whose ``loss_mask`` is all false."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise InputValidationError(f"eval_batches: batch_size must be an integer >= 1, found {batch_size!r}.")
        if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, (int, np.integer))
                                     or max_rows < 1):
            # 0 rows would yield no batch, and a loop's loss over them read 0 (a sum over nothing)
            raise InputValidationError(f"eval_batches: max_rows must be None (all rows) or an integer >= 1, found "
                                       f"{max_rows!r}.")
        n = len(self) if max_rows is None else min(len(self), max_rows)
        for i in range(0, n, batch_size):
            j = min(n, i + batch_size)
            rows = self._rows(slice(i, j))
            if j - i < batch_size:
                pad = batch_size - (j - i)
                rows = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in rows.items()}
            yield rows


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments a batch adds to the model call beside ``input_ids``: for rows
    packed by documents ``segment_ids``, ``position_ids`` and ``attention_mask``
    (``segment_ids > 0``); nothing for a stream.

    >>> model_inputs({"input_ids": np.zeros((1, 2))})
    {}
    """
    if batch.get("segment_ids") is None:
        return {}
    seg = batch["segment_ids"]
    return {"attention_mask": seg > 0, "segment_ids": seg, "position_ids": batch["position_ids"]}


def causal_lm_loss(logits, input_ids, loss_mask) -> tuple[Any, Any]:
    """Mean next-token cross-entropy over the masked targets.

    Args:
      logits: ``[B, L, V]`` model outputs for ``input_ids``.
      input_ids: ``[B, L]``.
      loss_mask: ``[B, L]``; position ``t`` weights the prediction of token ``t``.

    Returns:
      ``(mean_loss, number_of_targets)`` (float32 scalars).

    >>> import jax.numpy as jnp
    >>> loss, n = causal_lm_loss(jnp.zeros((1, 3, 4)), jnp.array([[0, 1, 2]]), jnp.array([[1, 1, 1]]))
    >>> round(float(loss), 4), int(n)   # uniform logits over 4 classes: log 4
    (1.3863, 2)
    """
    # Targets are shifted, not the logits (as transformers' ForCausalLMLoss does): slicing
    # ``logits[:, :-1]`` would copy the largest activation of the step, and the log-softmax
    # is never materialised either (logsumexp minus the picked logit).
    tgt, w = _shifted_targets(input_ids, loss_mask)
    nll, _ = token_nll(logits, tgt)
    n = w.sum()
    return (nll * w).sum() / jnp.maximum(n, 1.0), n


def _shifted_targets(input_ids, loss_mask):
    """Targets and weights aligned with the positions that predict them (position ``t``
    predicts token ``t + 1``; the last position has no target and weight 0)."""
    pad = jnp.zeros_like(input_ids[:, :1])
    tgt = jnp.concatenate([input_ids[:, 1:], pad], axis=1)
    w = jnp.concatenate([loss_mask[:, 1:], pad.astype(loss_mask.dtype)], axis=1).astype(jnp.float32)
    return tgt, w


def token_nll(logits, tgt):
    """``-log softmax(logits)[tgt]`` per position in float32, and the log-normaliser."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    return lse - jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0], lse


def causal_lm_loss_chunked(head: Callable, head_args, hidden, input_ids, loss_mask, *,
                           chunk_tokens: int = 256) -> tuple[Any, Any]:
    """:func:`causal_lm_loss` of ``head(head_args, hidden)`` computed a few positions at a
    time, so the ``[B, L, V]`` logits and their gradient never exist whole.

    The output layer of a language model and its loss are a large share of a fine-tuning
    step (a 32k-256k-word vocabulary at thousands of tokens is gigabytes of logits). Here the
    sequence is cut into chunks of about ``chunk_tokens`` positions (over the whole batch);
    each chunk's logits, loss and gradient are computed and dropped before the next, and
    the gradient is taken in the same pass (the loss is a scalar), so nothing is computed
    twice. Gradients flow to ``hidden`` and to the leaves of ``head_args`` that are being
    differentiated, only to those; the value and the gradients equal those of
    ``causal_lm_loss(head(head_args, hidden, 0), ...)`` up to float rounding.

    Args:
      head: ``head(head_args, hidden_chunk, index) -> logits_chunk``, ``[B, c, H] -> [B, c, V]``,
        position by position (a language model's output layer); ``index`` is the chunk's
        number (an int32 scalar), to fold into a dropout key. It must depend on arrays only
        through ``head_args``.
      head_args: a pytree of the head's inputs (parameters, adapter, keys).
      hidden: ``[B, L, H]`` final hidden states.
      input_ids, loss_mask: ``[B, L]``, as for :func:`causal_lm_loss`.
      chunk_tokens: tokens per chunk (``B x`` positions); 256 is :func:`jpeft.lm_loss`'s
        choice on the CPU (:func:`jpeft.core.default_chunk_tokens`).

    Returns:
      ``(mean_loss, number_of_targets)`` as :func:`causal_lm_loss`.

    >>> import jax, jax.numpy as jnp
    >>> w = jax.random.normal(jax.random.key(0), (8, 16)); h = jax.random.normal(jax.random.key(1), (2, 5, 8))
    >>> ids = jnp.arange(10).reshape(2, 5); mask = jnp.ones((2, 5))
    >>> a = causal_lm_loss(h @ w, ids, mask)[0]
    >>> b = causal_lm_loss_chunked(lambda w, x, i: x @ w, w, h, ids, mask, chunk_tokens=4)[0]
    >>> bool(jnp.allclose(a, b, rtol=1e-6))
    True
    """
    if not isinstance(chunk_tokens, int) or isinstance(chunk_tokens, bool) or chunk_tokens < 1:
        raise InputValidationError(f"chunk_tokens must be a positive int, found {chunk_tokens!r}.")
    if hidden.ndim != 3 or input_ids.shape != hidden.shape[:2] or loss_mask.shape != input_ids.shape:
        raise InputValidationError(
            f"causal_lm_loss_chunked expects hidden [B, L, H] and input_ids, loss_mask [B, L]; found "
            f"hidden {hidden.shape}, input_ids {input_ids.shape}, loss_mask {loss_mask.shape}."
        )
    b, seq, width = hidden.shape
    c = max(1, min(seq, chunk_tokens // max(b, 1)))
    n_chunks = -(-seq // c)
    tgt, w = _shifted_targets(input_ids, loss_mask)
    if n_chunks * c != seq:  # padded positions weigh 0
        extra = n_chunks * c - seq
        hidden = jnp.pad(hidden, ((0, 0), (0, extra), (0, 0)))
        tgt, w = jnp.pad(tgt, ((0, 0), (0, extra))), jnp.pad(w, ((0, 0), (0, extra)))

    def by_chunk(x):  # [B, n*c, ...] -> [n, B, c, ...]
        return jnp.moveaxis(x.reshape((b, n_chunks, c) + x.shape[2:]), 1, 0)

    leaves, treedef = jax.tree.flatten(head_args)
    fn = _chunked_loss(head, treedef, n_chunks)
    return fn(list(leaves), by_chunk(hidden), by_chunk(tgt), by_chunk(w))


def _chunked_loss(head, treedef, n_chunks):
    def call(leaves, h, i):
        return head(jax.tree.unflatten(treedef, leaves), h, i)

    @jax.custom_vjp
    def loss(leaves, hs, tgt, w):
        def body(total, x):
            h, t, wt, i = x
            nll, _ = token_nll(call(leaves, h, i), t)
            return total + (nll * wt).sum(), None
        idx = jnp.arange(n_chunks, dtype=jnp.int32)
        total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (hs, tgt, w, idx))
        n = w.sum()
        return total / jnp.maximum(n, 1.0), n

    def fwd(leaves, hs, tgt, w):
        values = [p.value for p in leaves]
        pert = [i for i, p in enumerate(leaves) if p.perturbed]
        want_h = hs.perturbed
        hs, tgt, w = hs.value, tgt.value, w.value
        n = w.sum()
        scale = 1.0 / jnp.maximum(n, 1.0)

        def with_diff(diff):
            full = list(values)
            for k, v in zip(pert, diff):
                full[k] = v
            return full

        def body(carry, x):
            total, acc = carry
            h, t, wt, i = x
            diff = [values[k] for k in pert]
            if want_h:
                logits, vjp = jax.vjp(lambda d, h_: call(with_diff(d), h_, i), diff, h)
            else:
                logits, vjp = jax.vjp(lambda d: call(with_diff(d), h, i), diff)
            nll, lse = token_nll(logits, t)
            p = jnp.exp(logits.astype(jnp.float32) - lse[..., None])
            onehot = jax.nn.one_hot(t, logits.shape[-1], dtype=jnp.float32)
            dlogits = ((p - onehot) * (wt * scale)[..., None]).astype(logits.dtype)
            grads = vjp(dlogits)
            acc = [a + g.astype(a.dtype) for a, g in zip(acc, grads[0])]
            return (total + (nll * wt).sum(), acc), (grads[1] if want_h else None)

        acc0 = [jnp.zeros(values[k].shape, jnp.promote_types(values[k].dtype, jnp.float32)) for k in pert]
        idx = jnp.arange(n_chunks, dtype=jnp.int32)
        (total, acc), dh = jax.lax.scan(body, (jnp.zeros((), jnp.float32), acc0), (hs, tgt, w, idx))
        d_leaves = [None] * len(values)
        for k, a in zip(pert, acc):
            d_leaves[k] = a.astype(values[k].dtype)
        return (total * scale, n), (d_leaves, dh)

    def bwd(res, g):
        d_leaves, dh = res
        g_loss = g[0]
        if isinstance(g_loss, SymbolicZero):
            return [None] * len(d_leaves), None, None, None
        scaled = [None if d is None else (d * g_loss).astype(d.dtype) for d in d_leaves]
        return scaled, (None if dh is None else (dh * g_loss).astype(dh.dtype)), None, None

    loss.defvjp(fwd, bwd, symbolic_zeros=True)
    return loss
