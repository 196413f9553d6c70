"""`jpeft serve` as a real server (a subprocess of `python -m jpeft.cli serve` on a free port of
127.0.0.1), driven by the official `openai` client: completions and chat, streaming and not, equal
token for token to `jpeft.generate` with the same adapter; concurrent mixed adapters; hot add and
remove with no failed request and no recompilation; the error paths; a bounded load test."""

import concurrent.futures as cf
import dataclasses
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft

openai = pytest.importorskip("openai")

V = 40
WORDS = [f"w{i}" for i in range(V)]
CFG = jpeft.models.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                               num_kv_heads=2, max_position_embeddings=128)
MODEL = jpeft.models.LlamaForCausalLM(CFG)
PARAMS = MODEL.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
# the tools' names first, a message's name before its content, an assistant turn opened by w1 (the generation
# prompt), w2 before that w1 when the template variable enable_thinking is false (Qwen 3's switch), a tool call's
# name and its arguments' keys and values (an object, as transformers' templates expect) after the content; without
# tools, variables or assistant turns: the contents, then w1
TEMPLATE = ("{%- set off = enable_thinking is defined and enable_thinking is false %}"
            "{% for t in tools or [] %}{{ t['function']['name'] }} {% endfor %}{% for m in messages %}"
            "{% if m['role'] == 'assistant' %}{% if off %}w2 {% endif %}w1 {% endif %}"
            "{% if m['name'] is defined %}{{ m['name'] }} {% endif %}{{ m['content'] or '' }} "
            "{% for c in m['tool_calls'] or [] %}{{ c['function']['name'] }} "
            "{% for k, v in c['function']['arguments'] | dictsort %}{{ k }} {{ v }} {% endfor %}{% endfor %}{% endfor %}"
            "{% if add_generation_prompt %}{% if off %}w2 {% endif %}w1{% endif %}")


def _lora(key, targets, r=4):
    cfg = jpeft.LoraConfig(r=r, alpha=2 * r, target_modules=targets, init_weights="random")
    return cfg, jpeft.init(cfg, PARAMS, jax.random.key(key))


# one adapter structure, so the references compile jpeft.generate once for all of them
TARGETS = ["q_proj", "v_proj", "down_proj"]
ADAPTERS = {k: _lora(i, TARGETS) for i, k in enumerate("abcd", start=1)}


def _ids(text):
    return [WORDS.index(w) for w in text.split()]


def _ref(name, prompt_ids, n):
    ad = None if name is None else ADAPTERS[name][1]
    out = jpeft.generate(MODEL, PARAMS, ad, jnp.asarray([prompt_ids], jnp.int32), n)
    return np.asarray(out[0, len(prompt_ids):]).tolist()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chat_tokenizer():
    """The served folder's tokenizer: one word-level token per word of WORDS, TEMPLATE its chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0")
    fast.chat_template = TEMPLATE
    return fast


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    folder, adapters = root / "tiny", root / "adapters"
    jpeft.models.loading.save_pretrained(str(folder), MODEL, PARAMS)
    _chat_tokenizer().save_pretrained(str(folder))
    for name, (cfg, ad) in ADAPTERS.items():
        if name == "c":  # a PEFT-format folder, added live
            jpeft.hf.save_peft(str(adapters / name), cfg, ad, params=PARAMS)
        else:
            jpeft.save_adapter(str(adapters / name), cfg, ad, params=PARAMS)
    outside = root / "outside"
    jpeft.save_adapter(str(outside), *ADAPTERS["d"], params=PARAMS)
    os.symlink(outside, adapters / "link")
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "jpeft.cli", "serve", "--model", str(folder), "--name", "tiny",
         "--adapter", f"a={adapters / 'a'}", "--adapter", f"b={adapters / 'b'}", "--adapters-root", str(adapters),
         "--capacity", "3", "--max-rank", "8", "--slots", "4", "--chunk", "4", "--max-queue", "16",
         "--max-len", "96", "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    refs = {}
    try:
        # the references are computed while the server starts
        for name in (None, "a", "b", "c"):
            refs[name] = _ref(name, _ids("w3 w5 w7 w9 w11 w2"), 10)
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"jpeft serve exited: {proc.stdout.read()[-3000:]}")
            try:
                if _get(port, "/health")[0] == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail("jpeft serve did not start in 180 s")
            time.sleep(0.3)
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)
        yield {"port": port, "client": client, "refs": refs, "root": root}
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _request(port, method, path, body=None, raw=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    data = raw if raw is not None else (None if body is None else json.dumps(body))
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    out = r.status, json.loads(r.read() or b"{}")
    conn.close()
    return out


def _get(port, path):
    return _request(port, "GET", path)


PROMPT = "w3 w5 w7 w9 w11 w2"


def _complete(client, model, **kw):
    kw.setdefault("max_tokens", 10)
    kw.setdefault("temperature", 0)
    r = client.completions.create(model=model, prompt=PROMPT, **kw)
    return r.choices[0].text, r.choices[0].finish_reason


def _stream_text(client, model, **kw):
    parts, reason = [], None
    for ch in client.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=0, stream=True, **kw):
        parts.append(ch.choices[0].text)
        reason = ch.choices[0].finish_reason or reason
    return "".join(parts), reason


def test_completions_and_chat_equal_generate_token_for_token(server):
    client, refs = server["client"], server["refs"]
    ids = sorted(m.id for m in client.models.list().data)
    assert ids == ["a", "b", "tiny"]
    assert len({tuple(v) for v in refs.values()}) == 4  # every adapter changes the output
    for model, name in (("tiny", None), ("a", "a"), ("b", "b")):
        text, reason = _complete(client, model)
        assert _ids(text) == refs[name] and reason == "length"
        assert _stream_text(client, model) == (text, "length")
    # chat: the template renders the contents and appends w1 (the generation prompt)
    msgs = [{"role": "user", "content": "w3 w5 w7"}, {"role": "user", "content": "w9 w11"}]
    chat = client.chat.completions.create(model="a", messages=msgs, max_tokens=10, temperature=0)
    assert _ids(chat.choices[0].message.content) == _ref("a", _ids("w3 w5 w7 w9 w11 w1"), 10)
    parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="a", messages=msgs, max_tokens=10, temperature=0, stream=True)]
    assert "".join(parts) == chat.choices[0].message.content
    # stop: the text ends before the stop string; sampling with a seed is reproducible
    full = " ".join(WORDS[i] for i in refs["a"])
    stop = " " + WORDS[refs["a"][3]]
    assert _complete(client, "a", stop=["w99", stop]) == (full[:full.index(stop)], "stop")
    assert _stream_text(client, "a", stop=["w99", stop]) == (full[:full.index(stop)], "stop")  # held back, then cut
    s1 = _complete(client, "b", temperature=1.5, top_p=0.9, seed=7)
    assert s1 == _complete(client, "b", temperature=1.5, top_p=0.9, seed=7)

    # usage as OpenAI streams it: without stream_options no chunk has a "usage" key; with include_usage every
    # chunk has "usage": null but the last, which has "choices": [] and the non-streamed usage (was: the finish
    # chunk carried the usage either way, and no chunk without choices came)
    for chat_, kw in ((False, {"prompt": PROMPT, "stop": stop}), (False, {"prompt": PROMPT}),
                      (True, {"messages": msgs})):
        create = client.chat.completions.create if chat_ else client.completions.create
        whole = create(model="a", max_tokens=10, temperature=0, **kw)
        plain = list(create(model="a", max_tokens=10, temperature=0, stream=True, **kw))
        assert all("usage" not in c.model_fields_set for c in plain) and all(c.choices for c in plain)
        counted = list(create(model="a", max_tokens=10, temperature=0, stream=True,
                              stream_options={"include_usage": True}, **kw))
        assert all("usage" in c.model_fields_set for c in counted)
        assert [c.usage for c in counted[:-1]] == [None] * (len(counted) - 1) and counted[-1].choices == []
        assert counted[-1].usage == whole.usage and whole.usage.completion_tokens > 0
        text = [c.choices[0].delta.content or "" if chat_ else c.choices[0].text for c in counted[:-1]]
        finish = [c.choices[0].finish_reason for c in counted[:-1]]
        assert "".join(text) == (whole.choices[0].message.content if chat_ else whole.choices[0].text)
        assert finish[-1] == whole.choices[0].finish_reason and set(finish[:-1]) <= {None}
    with client.chat.completions.stream(model="a", messages=msgs, max_tokens=10, temperature=0,
                                        stream_options={"include_usage": True}) as st:
        for _ in st:  # the openai client's own accumulation (get_final_completion refuses a "length" reply)
            pass
        final = st.current_completion_snapshot
    assert final.usage == chat.usage and final.choices[0].message.content == chat.choices[0].message.content
    assert final.choices[0].finish_reason == chat.choices[0].finish_reason
    # stream_options without stream, an unknown key, a value that is not a boolean: a 400 naming stream_options
    for extra in ({"stream_options": {"include_usage": True}}, {"stream": True, "stream_options": {"x": True}},
                  {"stream": True, "stream_options": {"include_usage": 1}}, {"stream": True, "stream_options": []}):
        status, err = _request(server["port"], "POST", "/v1/completions", {"model": "a", "prompt": PROMPT, **extra})
        assert status == 400 and err["error"]["param"] == "stream_options", (extra, err)
    assert _stream_text(client, "a", stream_options={"include_obfuscation": False}) == _complete(client, "a")
    # "stream": null is the default, false (OpenAI's schema: boolean or null; the openai client sends stream=None
    # as null): was a 400 "'stream' must be true or false"
    assert _complete(client, "a", stream=None) == _complete(client, "a")

    # concurrent requests for different adapters: each gets its own adapter's output
    names = ["a", "tiny", "b", "a", "b", "tiny", "a", "b"] * 2
    with cf.ThreadPoolExecutor(8) as ex:
        outs = list(ex.map(lambda m: _complete(client, m)[0], names))
    for m, text in zip(names, outs):
        assert _ids(text) == refs[None if m == "tiny" else m], m


TOOLS = [{"type": "function", "function": {"name": "w13", "description": "a tool",
                                           "parameters": {"type": "object", "properties": {}}}}]


def test_a_chat_request_with_tools_and_template_variables_is_served_the_prompt_training_renders(server):
    """`jpeft serve` refused ``tools`` with a 400 (and dropped every message key but role and content), so a model
    trained on conversations with tools (jpeft train renders a line's ``tools`` and ``chat_template_kwargs`` with the
    chat template, as TRL does) could not be served the prompt it learned. A chat completion's ``tools``,
    ``chat_template_kwargs`` (vLLM's extension, here Qwen 3's enable_thinking) and messages' other keys now reach the
    template: the prompt is ``apply_chat_template(messages, tools=..., add_generation_prompt=True, **kwargs)``'s ids,
    exactly the prompt tokens (the non-targets) of the same conversation as a training line, and the generated
    tokens are `jpeft.generate`'s on it. The response holds the text (no parsed tool_calls); a tool_choice that
    forces or forbids a call, bad tools or kwargs, and tools on /v1/completions get a 400 naming the field."""
    from jpeft.bank import AdapterBank
    from jpeft.data import load_examples, render_chat, text_encoder, tokenize_documents
    from jpeft.serve import Engine
    from jpeft.serve.app import ApiError, Server, _unsupported

    tok = _chat_tokenizer()
    msgs = [{"role": "user", "content": "w3 w5 w7"}, {"role": "tool", "name": "w17", "content": "w9 w11"}]
    kwargs = {"enable_thinking": False}
    want = tok.apply_chat_template(msgs, tools=TOOLS, add_generation_prompt=True, tokenize=True, return_dict=True,
                                   **kwargs)["input_ids"]
    assert want == _ids("w13 w3 w5 w7 w17 w9 w11 w2 w1")
    bank = AdapterBank.from_adapters({"a": ADAPTERS["a"][1]}, capacity=1)
    srv = Server(Engine(MODEL, PARAMS, bank, slots=1, max_len=32), base_name="tiny", tokenizer=tok)
    body = {"model": "a", "messages": msgs, "tools": TOOLS, "chat_template_kwargs": kwargs, "tool_choice": "auto"}
    assert srv._chat_ids(body) == want
    _unsupported(body, chat=True)
    # the same conversation as a training line: its prompt tokens are the served ones
    path = server["root"] / "train.jsonl"
    path.write_text(json.dumps({"prompt": msgs, "completion": [{"role": "assistant", "content": "w4"}], "tools": TOOLS,
                                "chat_template_kwargs": kwargs}) + "\n")
    encode, bos, eos = text_encoder(tok)
    (ids, mask), = tokenize_documents(render_chat(load_examples(path), tok), encode, eos_id=eos, bos_id=bos)
    assert ids.tolist()[:int(np.argmax(mask))] == want
    for bad, key in (({"tools": "w13"}, "tools"), ({"tools": ["w13"]}, "tools"),
                     ({"chat_template_kwargs": ["enable_thinking"]}, "chat_template_kwargs"),
                     ({"chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs")):
        with pytest.raises(ApiError, match=f"the '{key}' field") as e:
            srv._chat_ids(dict(body, **bad))
        assert (e.value.status, e.value.param) == (400, key)
    for bad in ("required", "none", {"type": "function", "function": {"name": "w13"}}):
        with pytest.raises(ApiError, match="'tool_choice' .* nothing forces or forbids a call") as e:
            _unsupported(dict(body, tool_choice=bad), chat=True)
        assert e.value.param == "tool_choice"
    for key in ("tools", "chat_template_kwargs"):
        with pytest.raises(ApiError, match=f"'{key}' is not supported by /v1/completions"):
            _unsupported({"model": "a", "prompt": "w3", key: body[key]})

    # over HTTP, with the openai client: accepted, and the tokens generate's on that prompt
    r = server["client"].chat.completions.create(model="a", messages=msgs, tools=TOOLS, max_tokens=6, temperature=0,
                                                 extra_body={"chat_template_kwargs": kwargs})
    assert _ids(r.choices[0].message.content) == _ref("a", want, 6) and r.choices[0].message.tool_calls is None


def test_tool_call_arguments_sent_as_a_json_string_are_served_the_prompt_training_renders(server):
    """OpenAI's API sends an assistant turn's tool calls with ``content`` null and ``arguments`` a JSON string;
    transformers' chat templates expect an object. `jpeft serve` refused the turn (400: content not a string), and
    a template given the string fails on it or writes another prompt. The arguments are now decoded (as vLLM does,
    and as jpeft train decodes a training line's, :func:`jpeft.data.chat_messages`): the prompt is
    ``apply_chat_template`` of the messages with object arguments, and exactly the prompt tokens of the same
    conversation as a training line; arguments that are no JSON object get a 400 naming the messages."""
    from jpeft.bank import AdapterBank
    from jpeft.data import load_examples, render_chat, text_encoder, tokenize_documents
    from jpeft.serve import Engine
    from jpeft.serve.app import ApiError, Server

    tok = _chat_tokenizer()

    def called(arguments):
        call = {"id": "call_1", "type": "function", "function": {"name": "w13", "arguments": arguments}}
        return [{"role": "user", "content": "w3 w5"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "name": "w13", "content": "w9"}]

    msgs = called(json.dumps({"w6": "w8", "w4": "w7"}))
    want = tok.apply_chat_template(called({"w6": "w8", "w4": "w7"}), tools=TOOLS, add_generation_prompt=True,
                                   tokenize=True, return_dict=True)["input_ids"]
    assert want == _ids("w13 w3 w5 w1 w13 w4 w7 w6 w8 w13 w9 w1")
    bank = AdapterBank.from_adapters({"a": ADAPTERS["a"][1]}, capacity=1)
    srv = Server(Engine(MODEL, PARAMS, bank, slots=1, max_len=32), base_name="tiny", tokenizer=tok)
    body = {"model": "a", "messages": msgs, "tools": TOOLS}
    assert srv._chat_ids(body) == want
    path = server["root"] / "calls.jsonl"
    path.write_text(json.dumps({"prompt": msgs, "completion": [{"role": "assistant", "content": "w4"}],
                                "tools": TOOLS}) + "\n")
    encode, bos, eos = text_encoder(tok)
    (ids, mask), = tokenize_documents(render_chat(load_examples(path), tok), encode, eos_id=eos, bos_id=bos)
    assert ids.tolist()[:int(np.argmax(mask))] == want
    for bad in ("w8", "[1, 2]", "{"):
        with pytest.raises(ApiError, match="tool call 'w13' has \"arguments\" .* not a JSON object") as e:
            srv._chat_ids(dict(body, messages=called(bad)))
        assert (e.value.status, e.value.param) == (400, "messages")
    with pytest.raises(ApiError, match="an assistant turn with \"tool_calls\" may have \"content\": null") as e:
        srv._chat_ids(dict(body, messages=[{"role": "user", "content": None}]))


def test_a_tokenizers_response_template_parses_the_reply_into_openai_tool_calls():
    """A reply holding a tool call came back as text only. With a tokenizer that has a ``response_template``
    (transformers' response parsing, the one its text-generation pipeline and TRL use), a chat completion's message
    is ``tokenizer.parse_response(reply, prefix=prompt, tools=...)`` in OpenAI's shape: the content, each call with
    its ``arguments`` as a JSON string and an id, ``finish_reason`` "tool_calls"; the same for a reply ended by the
    EOS (parsed from its token ids) or cut at a stop string (its text). A reply cut by max_tokens is the text (a
    call in it may be cut short), and so is every reply without a response_template. A template the parser cannot
    load is refused when the server is built. The reference is the tiny model's greedy reply (jpeft.generate).
    Streamed (``"stream": true``), each reply gives the same message, tool calls, reasoning and finish_reason, as the
    official ``openai`` client accumulates the deltas; it was the raw text, the call's markup in its content."""
    from starlette.testclient import TestClient

    from jpeft.errors import ConfigError
    from jpeft.serve import Engine
    from jpeft.serve.app import Server, make_app

    msgs = [{"role": "user", "content": "w3 w5 w7"}]
    plain = _chat_tokenizer()
    prompt = plain.apply_chat_template(msgs, tools=TOOLS, add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"]
    g = [WORDS[i] for i in _ref(None, prompt, 7)]  # the base model's greedy reply
    assert len(set(g)) == 7, g
    # g1 opens a call, g2 is its name, g3 g4 a key and its value, g5 closes it; g0 is the content
    tok = _chat_tokenizer()
    tok.response_template = {
        "defaults": {"role": "assistant"}, "start_anchor": "w1",
        "fields": {"tool_calls": {"open_pattern": rf"{g[1]} (?P<name>w\d+)\s*", "close_pattern": rf"{g[5]}\s*",
                                  "repeats": True, "content": "xml-inline",
                                  "content_args": {"tag_pattern": r"(?P<key>w\d+) (?P<value>w\d+)",
                                                   "value_parser": {"name": "text"}},
                                  "transform": {"type": "function",
                                                "function": {"name": "{name}", "arguments": "{content}"}}},
                   "content": {"content": "text"}}}
    reply = " ".join(g[:6])
    want = tok.parse_response(reply, prefix=tok.decode(prompt), tools=TOOLS)
    assert want["tool_calls"] == [{"type": "function", "function": {"name": g[2], "arguments": {g[3]: g[4]}}}]
    for eos, extra, finish in (([WORDS.index(g[6])], {}, "tool_calls"), (None, {"stop": [g[6]]}, "tool_calls"),
                               (None, {"max_tokens": 6}, "length")):
        eng = Engine(MODEL, PARAMS, None, tokenizer=tok, slots=1, max_len=32, eos_ids=eos)
        body = {"model": "tiny", "messages": msgs, "tools": TOOLS, "temperature": 0, "max_tokens": 10, **extra}
        with TestClient(make_app(Server(eng, base_name="tiny", tokenizer=tok))) as client:
            r = client.post("/v1/chat/completions", json=body)
            streamed = _streamed_chat(client.post("/v1/chat/completions", json=dict(
                body, stream=True, stream_options={"include_usage": True})))
        assert r.status_code == 200, r.text
        assert streamed.usage.model_dump(exclude_none=True) == r.json()["usage"], (streamed.usage, r.json())
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == finish, choice
        message = choice["message"]
        # streamed, the same message as the official client accumulates it (was the raw text: no tool_calls, the
        # call's markup in the content, finish_reason "stop")
        got = streamed.choices[0]
        assert got.finish_reason == finish and got.message.content == message["content"], (got, message)
        calls = [("call_", c["type"], c["function"]["name"], c["function"]["arguments"])
                 for c in message.get("tool_calls", [])]
        assert [(c.id[:5], c.type, c.function.name, c.function.arguments)
                for c in got.message.tool_calls or []] == calls
        if finish == "length":  # cut short: the text as generated
            assert message == {"role": "assistant", "content": reply}
            continue
        assert message["content"] == want["content"] == g[0]
        (call,) = message["tool_calls"]
        assert call["type"] == "function" and call["id"].startswith("call_") and call["function"]["name"] == g[2]
        assert json.loads(call["function"]["arguments"]) == {g[3]: g[4]}
    # parsed reasoning (vLLM's reasoning_content) streams as the non-streamed message holds it: here g0 opens it and g2
    # closes it, so g1 is the reasoning (no call opens inside it) and the rest the content
    tok.response_template["fields"]["reasoning_content"] = {"open_pattern": rf"{g[0]}\s*",
                                                            "close_pattern": rf"\s*{g[2]}\s*", "content": "text"}
    eng = Engine(MODEL, PARAMS, None, tokenizer=tok, slots=1, max_len=32, eos_ids=[WORDS.index(g[6])])
    with TestClient(make_app(Server(eng, base_name="tiny", tokenizer=tok))) as client:
        r = client.post("/v1/chat/completions", json=dict(body, max_tokens=10))
        events = client.post("/v1/chat/completions", json=dict(body, max_tokens=10, stream=True)).text
    message = r.json()["choices"][0]["message"]
    assert message == {"role": "assistant", "content": " ".join(g[3:6]), "reasoning_content": g[1]}, message
    deltas = [json.loads(e[6:])["choices"][0]["delta"] for e in events.split("\n\n") if e.startswith("data: {")]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == g[1]
    assert "".join(d.get("content") or "" for d in deltas) == message["content"]
    # without a response_template: the text, no tool_calls
    eng = Engine(MODEL, PARAMS, None, tokenizer=plain, slots=1, max_len=32, eos_ids=[WORDS.index(g[6])])
    with TestClient(make_app(Server(eng, base_name="tiny", tokenizer=plain))) as client:
        r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": msgs, "tools": TOOLS,
                                                      "temperature": 0})
    assert r.json()["choices"][0] == {"index": 0, "message": {"role": "assistant", "content": reply},
                                      "finish_reason": "stop"}
    broken = _chat_tokenizer()
    broken.response_template = {"fields": {}}
    with pytest.raises(ConfigError, match="the tokenizer's response_template .* cannot be used"):
        Server(eng, base_name="tiny", tokenizer=broken)


def _streamed_chat(response):
    """A streamed chat completion's server-sent events accumulated by the official ``openai`` client's own
    stream state (its ``chat.completions.stream`` helper), into a ``ChatCompletion``."""
    from openai.lib.streaming.chat import ChatCompletionStreamState
    from openai.types.chat import ChatCompletionChunk

    assert response.status_code == 200, response.text
    events = [e[len("data: "):] for e in response.text.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]", events[-3:]
    state = ChatCompletionStreamState()
    for e in events[:-1]:
        state.handle_chunk(ChatCompletionChunk.model_validate_json(e))
    return state.current_completion_snapshot  # (get_final_completion refuses a reply cut by max_tokens)


def test_hot_add_and_remove_while_serving_no_failure_no_recompile(server):
    client, refs, port = server["client"], server["refs"], server["port"]
    traces0 = _get(port, "/health")[1]["traces"]
    stop, failures, done = threading.Event(), [], []

    def worker(model, name):
        while not stop.is_set():
            try:
                text, _ = _complete(client, model)
                if _ids(text) != refs[name]:
                    failures.append((model, text))
                done.append(model)
            except Exception as e:  # noqa: BLE001 - collected and asserted below
                failures.append((model, repr(e)))

    threads = [threading.Thread(target=worker, args=a) for a in (("tiny", None), ("a", "a"), ("b", "b"))]
    for t in threads:
        t.start()
    try:
        st, body = _request(port, "POST", "/v1/adapters", {"name": "c", "path": "c"})  # PEFT format
        assert st == 201, body
        assert _ids(_complete(client, "c")[0]) == refs["c"]
        st, body = _request(port, "DELETE", "/v1/adapters/c")
        assert st == 200 and body["deleted"], body
        with pytest.raises(openai.NotFoundError, match="available"):
            _complete(client, "c")
        st, body = _request(port, "POST", "/v1/adapters", {"name": "c2", "path": "c"})
        assert st == 201, body
        listed = {m["id"]: m for m in _request(port, "GET", "/v1/models")[1]["data"]}
        assert listed["c2"]["created"] == body["created"] >= listed["a"]["created"]  # when it was added
        assert _ids(_complete(client, "c2")[0]) == refs["c"]
        # the bank (capacity 3) is full now: 409 that says how to free a slot
        st, body = _request(port, "POST", "/v1/adapters", {"name": "d", "path": "d"})
        assert st == 409 and "DELETE /v1/adapters/" in body["error"]["message"], body
        assert _request(port, "DELETE", "/v1/adapters/c2")[0] == 200
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert failures == [] and len(done) >= 3
    health = _get(port, "/health")[1]
    assert health["traces"] == traces0 == {"prefill": 1, "decode": 1}, health


def test_error_paths_keep_the_server_serving(server):
    client, refs, port = server["client"], server["refs"], server["port"]
    with pytest.raises(openai.NotFoundError, match=r"available: \['tiny', 'a', 'b'\]"):
        client.completions.create(model="nope", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="a", prompt=PROMPT, max_tokens=2, temperature=-1)
    with pytest.raises(openai.BadRequestError, match="limit of 96"):
        client.completions.create(model="a", prompt=PROMPT, max_tokens=95)
    assert _request(port, "POST", "/v1/completions", raw="{not json")[0] == 400
    assert _request(port, "POST", "/v1/completions", raw=" " * (5 << 20))[0] == 413
    assert _request(port, "POST", "/v1/completions", {"model": "a", "prompt": [1, 2, 999]})[0] == 400
    assert _request(port, "DELETE", "/v1/adapters/nope")[0] == 404
    for hostile in ("../outside", str(server["root"] / "outside"), "link", "a/../../outside"):
        st, body = _request(port, "POST", "/v1/adapters", {"name": "evil", "path": hostile})
        assert st == 400 and body["error"]["param"] == "path", (hostile, body)
    st, body = _request(port, "POST", "/v1/adapters", {"name": "x", "path": "no-such-folder"})
    assert st == 400 and "does not exist" in body["error"]["message"]
    assert "evil" not in {m.id for m in client.models.list().data}

    # overload: 40 concurrent long requests on 4 slots and a queue of 16 -> some 429, none lost
    def one(i):
        try:
            return client.completions.create(model="ab"[i % 2], prompt=PROMPT, max_tokens=60,
                                              temperature=0).choices[0].finish_reason
        except openai.RateLimitError:
            return 429

    with cf.ThreadPoolExecutor(40) as ex:
        got = list(ex.map(one, range(40)))
    assert got.count(429) > 0 and got.count("length") + got.count(429) == 40, got

    # a client that disconnects mid-stream frees its slot
    before = _get(port, "/health")[1].get("cancelled", 0)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps(
        {"model": "a", "prompt": PROMPT, "max_tokens": 80, "stream": True, "temperature": 0}),
        headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.time() + 20
    while time.time() < deadline:
        h = _get(port, "/health")[1]
        if h.get("cancelled", 0) > before and h["busy"] == 0:
            break
        time.sleep(0.1)
    assert h.get("cancelled", 0) > before and h["busy"] == 0, h
    assert _ids(_complete(client, "a")[0]) == refs["a"]  # still serving


def test_load_200_requests_16_clients_nothing_lost(server):
    client, refs, port = server["client"], server["refs"], server["port"]
    names = ["tiny", "a", "b"]

    def one(i):
        m = names[i % 3]
        r = client.completions.create(model=m, prompt=PROMPT, max_tokens=4, temperature=0)
        return m, r.choices[0].text

    t0 = time.time()
    with cf.ThreadPoolExecutor(16) as ex:
        outs = list(ex.map(one, range(200)))
    assert len(outs) == 200 and time.time() - t0 < 120
    for m, text in outs:
        assert _ids(text) == refs[None if m == "tiny" else m][:4]
    h = _get(port, "/health")[1]
    assert h["busy"] == 0 and h["waiting"] == 0 and h["traces"] == {"prefill": 1, "decode": 1}, h


def test_engine_bookkeeping_timeouts_overload_and_deferred_removal():
    """The engine's queue rules without running a step (nothing is compiled): a full queue
    raises OverloadedError, a request past its queue time ends with a timeout event, a removed
    adapter leaves the bank only after the requests already accepted for it are gone."""
    from jpeft.bank import AdapterBank
    from jpeft.errors import OverloadedError, UnknownAdapterError
    from jpeft.serve import Engine, Request
    from jpeft.serve.app import ApiError, Server

    bank = AdapterBank.from_adapters({"a": ADAPTERS["a"][1]}, capacity=2, strategy="ragged")
    eng = Engine(MODEL, PARAMS, bank, slots=1, max_len=32, max_queue=2, queue_timeout=5.0)
    assert eng._strategy == "ragged"  # the programs route with the bank's implementation (it was always "gather")
    eng._running = True  # accept requests; the loop's thread is not started
    events = []
    reqs = [eng.submit(Request([1, 2], "a", 4, events.append)) for _ in range(2)]
    with pytest.raises(OverloadedError, match="retry later"):
        eng.submit(Request([1, 2], None, 4, events.append))
    with pytest.raises(UnknownAdapterError, match=r"available: \['a'\]"):
        eng.submit(Request([1, 2], "zz", 4, events.append))
    assert eng.remove_adapter("a") == 2 and "a" in eng.bank.names and eng.adapters() == ()
    eng._housekeeping()  # the first request takes the only row, the second waits
    assert eng._rows[0] is reqs[0] and list(eng._pending) == [reqs[1]]
    reqs[1].created -= 10.0  # waited past queue_timeout
    eng._housekeeping()
    assert [e.error for e in events] == ["timeout"] and "no decode slot" in events[0].message
    assert "a" in eng.bank.names  # still used by the running request
    eng.cancel(reqs[0])
    eng._housekeeping()
    assert eng.bank.names == () and eng.stats()["cancelled"] == 1 and eng.stats()["timed_out"] == 1

    class NoTemplate:
        chat_template = None

    with pytest.raises(ApiError, match="no chat template.*chat_template.jinja") as e:  # what save_pretrained writes
        Server(eng, base_name="tiny", tokenizer=NoTemplate())._chat_ids({"messages": [{"role": "user", "content": "x"}]})
    assert e.value.status == 400


def _post_adapter(server, body):
    """``server.add_adapter`` on a POST /v1/adapters body, in process: ``(status, error message)``."""
    import asyncio

    from starlette.requests import Request as HttpRequest

    raw = json.dumps(body).encode()

    async def receive():
        return {"type": "http.request", "body": raw, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/v1/adapters", "headers": [], "query_string": b""}
    resp = asyncio.run(server.add_adapter(HttpRequest(scope, receive)))
    return resp.status_code, json.loads(resp.body).get("error", {}).get("message", "")


def test_a_live_added_adapter_the_bank_cannot_hold_names_the_serve_option_to_change(tmp_path):
    """An adapter of a rank above --max-rank sent to a full bank was answered 409 "the bank is
    full" (after the DELETE it asked for, the adapter still did not fit); one adapting a module
    outside --targets was told to "build the bank from a template", which no serve option does."""
    from jpeft.bank import AdapterBank
    from jpeft.serve import Engine
    from jpeft.serve.app import Server

    bank = AdapterBank.from_adapters({"a": ADAPTERS["a"][1]}, capacity=1, max_rank=4)  # full
    eng = Engine(MODEL, PARAMS, bank, slots=1, max_len=32)
    big = _lora(7, TARGETS, r=8)[1]
    head = _lora(8, ["q_proj", "lm_head"], r=2)[1]
    for name in ("big", "head"):
        (tmp_path / name).mkdir()
    server = Server(eng, base_name="tiny", tokenizer=object(), adapters_root=str(tmp_path),
                    loader=lambda path: {"big": big, "head": head}[os.path.basename(path)])
    st, msg = _post_adapter(server, {"name": "big", "path": "big"})
    assert st == 400 and "rank 8" in msg and "--max-rank 8" in msg, (st, msg)
    eng.remove_adapter("a")  # a free slot: the same answer
    assert _post_adapter(server, {"name": "big", "path": "big"}) == (st, msg)
    st, msg = _post_adapter(server, {"name": "head", "path": "head"})
    assert st == 400 and "--targets" in msg and "['lm_head']" in msg, (st, msg)
    assert eng.bank.names == ()


def test_sampling_options_it_does_not_take_are_refused_not_ignored():
    """Options other servers take (top_k, min_p, ...) would otherwise be ignored: a client
    asking top_k=1 for greedy text would get samples. Their off values pass."""
    from jpeft.serve.app import ApiError, _unsupported

    for key, value in (("top_k", 1), ("min_p", 0.1), ("typical_p", 0.9), ("repetition_penalty", 1.2),
                       ("use_beam_search", True), ("logprobs", 2), ("logprobs", 0), ("logprobs", True), ("n", 2),
                       ("response_format", {"type": "json_object"}), ("tool_choice", "auto"),
                       ("stop_token_ids", [3]), ("min_tokens", 4), ("ignore_eos", True)):
        with pytest.raises(ApiError, match=f"'{key}'") as e:
            _unsupported({"model": "a", "prompt": "x", key: value})
        assert e.value.status == 400
    _unsupported({"model": "a", "prompt": "x", "top_k": -1, "min_p": 0, "repetition_penalty": 1.0, "n": 1})
    # /v1/completions' logprobs=0 asks for the chosen tokens' log probabilities: it passed as an off value (0 == False)
    # and the answer had "logprobs": null; null and false are off
    _unsupported({"model": "a", "prompt": "x", "logprobs": None, "top_logprobs": 0})
    _unsupported({"model": "a", "messages": [], "logprobs": False})


def test_serve_stops_at_every_eos_id_the_model_folder_names(tmp_path):
    """Chat models end a turn with another id than the document end (Llama 3 Instruct's
    generation_config.json: [128001, 128009]); transformers' generate stops at each, and so
    does jpeft serve: the union of generation_config.json's, config.json's and the tokenizer's."""
    import json

    from jpeft.cli.serve_cmd import eos_ids_of

    class Tok:
        eos_token_id = 0

    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 253]}))
    assert eos_ids_of(str(tmp_path), Tok(), {"eos_token_id": 7}) == (0, 7, 253)
    assert eos_ids_of(str(tmp_path / "missing"), None, {"eos_token_id": [5, 6]}) == (5, 6)
    assert eos_ids_of(str(tmp_path / "missing"), None, {}) == ()


def _word_tokenizer(words, **kw):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=words[0], **kw)


def test_engine_refuses_max_len_past_gpt2s_learned_positions():
    """Past GPT-2's position table the logits are NaN: a request there got token 0 over and over,
    silently (jpeft.generate refused the same length)."""
    from jpeft.errors import ConfigError
    from jpeft.serve import Engine

    cfg = jpeft.models.GPT2Config(vocab_size=V, hidden_size=16, num_layers=1, num_heads=2, max_position_embeddings=16)
    model = jpeft.models.GPT2LMHeadModel(cfg)
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    with pytest.raises(ConfigError, match="16 learned positions"):
        Engine(model, params, None, slots=1, max_len=18)
    assert Engine(model, params, None, slots=1).max_len == 17  # the default stays inside


def test_engine_refuses_max_len_past_where_the_rope_changes_with_the_length():
    """Longrope (past original_max_position_embeddings) and dynamic NTK (past
    max_position_embeddings) rotate by the length of the call: the engine's prompt chunks and
    side-by-side rows got other tokens than jpeft.generate (a 20-token prompt in chunks of 8: every
    token differed). Its default max_len stays where the frequencies are fixed; more is refused."""
    from jpeft.errors import ConfigError
    from jpeft.serve import Engine

    longrope = {"rope_type": "longrope", "short_factor": [1.0, 1.5, 2.0, 2.5], "long_factor": [2.0, 3.0, 4.0, 5.0],
                "original_max_position_embeddings": 16}
    for rope, fixed in ((longrope, 16), ({"rope_type": "dynamic", "factor": 2.0}, 64)):
        cfg = jpeft.models.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=32, num_layers=1, num_heads=4,
                                       max_position_embeddings=64, rope_scaling=rope)
        model = jpeft.models.LlamaForCausalLM(cfg)
        params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
        with pytest.raises(ConfigError, match=f"{rope['rope_type']} rope changes its frequencies .* past {fixed} "):
            Engine(model, params, None, slots=1, max_len=fixed + 1)
        assert Engine(model, params, None, slots=1).max_len == fixed


def test_engine_serves_gpt2_up_to_generates_limit():
    """GPT-2's last new token is never read back, so jpeft.generate (as transformers) takes a
    prompt + max_new_tokens of n_positions + 1; the engine refused that one token more by
    default (max_len = n_positions) and with max_len = n_positions + 1. It now serves a request
    at exactly that limit with generate's greedy tokens, and refuses one token more by name."""
    from jpeft.errors import InputValidationError, PromptTooLongError
    from jpeft.serve import Engine, Request

    cfg = jpeft.models.GPT2Config(vocab_size=V, hidden_size=16, num_layers=1, num_heads=2, max_position_embeddings=16)
    model = jpeft.models.GPT2LMHeadModel(cfg)
    leaves, tree = jax.tree.flatten(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    keys = jax.random.split(jax.random.key(5), len(leaves))  # every tensor random: the init's tokens all repeat
    params = jax.tree.unflatten(tree, [jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    prompt = [3, 9, 1, 4, 15, 2, 7, 30, 11]
    n = 16 + 1 - len(prompt)  # reads positions 0..15: the whole table
    ref = np.asarray(jpeft.generate(model, params, None, jnp.asarray([prompt], jnp.int32), n))[0, len(prompt):]
    with pytest.raises(InputValidationError, match="exceeds GPT-2's 16 learned positions"):
        jpeft.generate(model, params, None, jnp.asarray([prompt], jnp.int32), n + 1)
    eng = Engine(model, params, None, slots=1, chunk=8, eos_ids=[])
    with pytest.raises(PromptTooLongError, match="18 tokens, above this server's limit of 17"):
        eng.submit(Request(prompt, None, n + 1, lambda e: None, temperature=0.0))
    done, events = threading.Event(), []

    def sink(e):
        events.append(e)
        if e.kind != "text":
            done.set()

    eng.start()
    try:
        eng.submit(Request(prompt, None, n, sink, temperature=0.0))
        assert done.wait(120)
    finally:
        eng.stop()
    assert events[-1].kind == "done" and events[-1].finish_reason == "length", events[-1]
    got = [t for e in events if e.kind == "text" for t in e.token_ids]
    assert got == ref.tolist() and len(set(got)) > 1


def test_text_is_not_lost_when_decoding_rewrites_earlier_text():
    """A tokenizer whose config sets clean_up_tokenization_spaces rewrites text already streamed
    ("it '" becomes "it's" once "s" arrives); the engine then sent nothing more, silently
    ending every such completion early."""
    from jpeft.serve import Engine, Request

    words = ["<unk>", "it", "'", "s", "a", "good", "day"]
    tok = _word_tokenizer(words, clean_up_tokenization_spaces=True)
    eng = Engine(MODEL, PARAMS, None, tokenizer=tok, slots=1, max_len=32, eos_ids=[])  # nothing compiled below
    events = []
    req = Request([1], None, 6, events.append, temperature=0.0)
    eng._rows[0] = req
    for w in ["it", "'", "s", "a", "good", "day"]:
        eng._accept([(0, req)], [words.index(w)])
    assert "".join(e.text for e in events if e.kind == "text") == "it ' s a good day"
    assert events[-1].finish_reason == "length"


def test_a_character_split_over_byte_fallback_tokens_does_not_end_the_text():
    """A byte-fallback tokenizer (Llama 2's, Mistral's) decodes an incomplete UTF-8 character to
    one U+FFFD per byte; the engine held back only the last one, sent the first, and once the
    character completed the text no longer began with what was sent: nothing more was sent. The
    held-back tokens' ids were dropped from the events' token_ids."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    from jpeft.serve import Engine, Request

    vocab = {"<unk>": 0, "a": 1, "b": 2, **{f"<0x{i:02X}>": 3 + i for i in range(256)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    euro = [3 + b for b in "\u20ac".encode()]  # three byte tokens
    eng = Engine(MODEL, PARAMS, None, tokenizer=fast, slots=1, max_len=32, eos_ids=[])  # nothing compiled below
    events = []
    seq = [1, *euro, 2, *euro, 1]
    req = Request([1], None, len(seq), events.append, temperature=0.0)
    eng._rows[0] = req
    for t in seq:
        eng._accept([(0, req)], [t])
    assert "".join(e.text for e in events if e.kind == "text") == "a\u20acb\u20aca"
    assert events[-1].finish_reason == "length"
    # each text event carries the ids it came from, the held-back first bytes of a character included (only the
    # last byte's id came with the character before)
    assert [e.token_ids for e in events if e.kind == "text"] == [(1,), tuple(euro), (2,), tuple(euro), (1,)]


def test_a_stop_string_whose_next_character_is_split_over_byte_tokens_is_cut_whole():
    """The hold-back of a stop string's start looked at the text's end, which is U+FFFD while a
    character is incomplete: with stop "用户" and "户" arriving as three byte tokens, "用" was sent
    and the completion read "a用" instead of "a" (streamed or not). Nothing compiled."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    from jpeft.serve import Engine, Request

    vocab = {"<unk>": 0, "a": 1, "b": 2, "\u7528": 3, **{f"<0x{i:02X}>": 4 + i for i in range(256)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    hu = [4 + b for b in "\u6237".encode()]  # three byte tokens
    eng = Engine(MODEL, PARAMS, None, tokenizer=fast, slots=1, max_len=32, eos_ids=[])  # nothing compiled below

    def run(seq, stop):
        events = []
        req = Request([1], None, len(seq), events.append, temperature=0.0, stop=stop)
        eng._rows[0] = req
        for t in seq:
            if not req.done:
                eng._accept([(0, req)], [t])
        return "".join(e.text for e in events if e.kind == "text"), events[-1].finish_reason

    assert run([1, 3, *hu, 2], ["\u7528\u6237"]) == ("a", "stop")
    assert run([1, 3, *hu, 2], ["b\u6237", "\u7528b"]) == ("a\u7528\u6237b", "length")  # held, then sent whole
    assert run([1, 2, *hu, 1], ["b\u6237"]) == ("a", "stop")


def test_usage_counts_every_generated_token_the_end_of_sequence_included():
    """``usage.completion_tokens`` counts the tokens the model generated, as vLLM and TGI count
    them: an end-of-sequence token is not text but is counted (it was left out), a stop string's
    tokens are counted, and a completion cut by ``max_tokens`` counts exactly ``max_tokens``."""
    from jpeft.serve import Engine, Request

    words = ["<unk>", "</s>", "a", "b", "c"]
    eng = Engine(MODEL, PARAMS, None, tokenizer=_word_tokenizer(words), slots=1, max_len=32,
                 eos_ids=[1])  # nothing compiled below

    def run(max_tokens, toks, **kw):
        events = []
        req = Request([2, 3, 4], None, max_tokens, events.append, temperature=0.0, **kw)
        eng._rows[0] = req
        for t in toks:
            eng._accept([(0, req)], [t])
        done = events[-1]
        assert done.kind == "done" and all(e.kind == "text" for e in events[:-1])
        return "".join(e.text for e in events[:-1]), done.finish_reason, done.usage

    assert run(8, [2, 3, 1]) == ("a b", "stop", {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6})
    assert run(8, [1]) == ("", "stop", {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4})
    assert run(2, [4, 4]) == ("c c", "length", {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})
    assert run(8, [2, 3, 4], stop=["b"])[1:] == ("stop", {"prompt_tokens": 3, "completion_tokens": 2,
                                                         "total_tokens": 5})


def test_text_events_carry_every_generated_token_id_those_without_text_included():
    """A last token that makes no text (a special token, skipped when decoding; the tokens of a stop
    string after text already sent) was counted in ``usage`` but its id was in no ``text`` event, so an
    Engine user collecting ``token_ids`` lost it (``jpeft.generate`` has it). Nothing compiled."""
    from jpeft.serve import Engine, Request

    words = ["<unk>", "</s>", "a", "b", "c"]
    eng = Engine(MODEL, PARAMS, None, tokenizer=_word_tokenizer(words), slots=1, max_len=32, eos_ids=[1])

    def ids(max_tokens, toks, **kw):
        events = []
        req = Request([2, 3, 4], None, max_tokens, events.append, temperature=0.0, **kw)
        eng._rows[0] = req
        for t in toks:
            eng._accept([(0, req)], [t])
        assert events[-1].kind == "done"
        return [t for e in events if e.kind == "text" for t in e.token_ids]

    assert ids(2, [2, 0]) == [2, 0]  # <unk> (special, no text) last
    assert ids(3, [2, 3, 0]) == [2, 3, 0]
    assert ids(8, [2, 4, 3], stop=["b"]) == [2, 4, 3]  # "a c" sent, then the stop string's token
    assert ids(8, [2, 0, 1]) == [2, 0]  # the end id is not generated text


def test_without_a_tokenizer_stop_and_the_http_server_are_refused(tmp_path):
    """Without a tokenizer the engine sends token ids only: the HTTP server answered every
    completion with empty text (and ignored 'stop'); `jpeft serve` started on such a folder."""
    import argparse

    from jpeft.cli import serve_cmd
    from jpeft.errors import ConfigError, InputValidationError, LoadError
    from jpeft.serve import Engine, Request
    from jpeft.serve.app import Server

    eng = Engine(MODEL, PARAMS, None, slots=1, max_len=32)
    eng._running = True
    with pytest.raises(InputValidationError, match="stop strings need the model's tokenizer"):
        eng.submit(Request([1, 2], None, 4, lambda e: None, stop=("w3",)))
    with pytest.raises(ConfigError, match="needs the model's tokenizer"):
        Server(eng, base_name="tiny")

    folder = tmp_path / "tiny"
    jpeft.models.loading.save_pretrained(str(folder), MODEL, PARAMS)
    parser = argparse.ArgumentParser()
    serve_cmd.add_parser(parser.add_subparsers())
    with pytest.raises(LoadError, match="needs the model folder's tokenizer"):
        serve_cmd.build(parser.parse_args(["serve", "--model", str(folder)]))
    _word_tokenizer(WORDS).save_pretrained(str(folder))
    cfg, ad = ADAPTERS["a"]
    jpeft.save_adapter(str(tmp_path / "a"), cfg, ad, params=PARAMS)
    # an adapter under the base model's API name could never be reached: requests naming it get the base
    with pytest.raises(ConfigError, match="has the base model's name"):
        serve_cmd.build(parser.parse_args(["serve", "--model", str(folder), "--adapter", f"tiny={tmp_path / 'a'}"]))
    # a DoRA adapter: refused by the bank's check, naming the adapter (the rank scan had raised "merge it into the base")
    dora_cfg = jpeft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)
    jpeft.save_adapter(str(tmp_path / "d"), dora_cfg, jpeft.init(dora_cfg, PARAMS, jax.random.key(3)), params=PARAMS)
    from jpeft.errors import BankError

    with pytest.raises(BankError, match="adapter 'd'"):
        serve_cmd.build(parser.parse_args(["serve", "--model", str(folder), "--adapter", f"d={tmp_path / 'd'}"]))


def test_engine_takes_a_bare_stop_string_whole_and_names_bad_option_types():
    """Request(stop="w3 w4") is one stop string (it used to be iterated as its characters, so the
    text ended at the first 'w', '3', ' ' or '4'); options of the wrong type get a named error
    instead of a TypeError from a comparison. Nothing is compiled (submit only)."""
    from jpeft.errors import InputValidationError
    from jpeft.serve import Engine, Request

    class Tok:
        eos_token_id = None

        def decode(self, ids, **kw):
            return " ".join(WORDS[i] for i in ids)

    eng = Engine(MODEL, PARAMS, None, tokenizer=Tok(), slots=1, max_len=32)
    eng._running = True  # accept requests; the loop's thread is not started
    req = eng.submit(Request([1, 2], None, 4, lambda e: None, stop="w3 w4"))
    assert req.stop == ("w3 w4",)
    req.generated = [3, 4, 5]
    assert eng._text(req) == ("", True)  # cut before "w3 w4", not at the first "w"
    req.generated = [5, 3, 6]
    assert eng._text(req) == ("w5 w3 w6", False)
    for kw in (dict(temperature="0.5"), dict(top_p=None), dict(seed="7"), dict(stop=["w1", ""]), dict(stop=[3]),
               dict(temperature=True), dict(top_p=jnp.ones(2))):
        with pytest.raises(InputValidationError):
            eng.submit(Request([1, 2], None, 4, lambda e: None, **kw))
    # a 0-d numpy or jax number is a number (accepted before the type check)
    req = eng.submit(Request([1, 2], None, 4, lambda e: None, temperature=jnp.float32(0.5), top_p=np.float32(0.75),
                             seed=jnp.int32(7)))
    assert (req.temperature, req.top_p, req.seed) == (0.5, 0.75, 7)


def test_engine_takes_any_integer_seed_and_a_numpy_max_tokens():
    """A JSON seed past int64 (the HTTP layer passes any integer >= 0) was refused as 'seed must be
    an integer' (numpy made an object array of it), and Request(max_tokens=np.int64(4)) as 'max_tokens
    must be a positive integer' (jpeft.generate takes numpy ints). Nothing is compiled (submit only)."""
    from jpeft.errors import InputValidationError
    from jpeft.serve import Engine, Request

    eng = Engine(MODEL, PARAMS, None, slots=1, max_len=32)
    eng._running = True  # accept requests; the loop's thread is not started
    req = eng.submit(Request([1, 2], None, np.int64(4), lambda e: None, seed=2**64))
    assert req.max_tokens == 4 and type(req.max_tokens) is int and req.seed == 2**64 % (2**31 - 1)
    for kw in (dict(seed=2.0), dict(seed=np.bool_(True)), dict(seed="3")):
        with pytest.raises(InputValidationError, match="seed"):
            eng.submit(Request([1, 2], None, 4, lambda e: None, **kw))
    for mt in (np.int64(0), 4.0, True, np.ones(2, np.int32)):
        with pytest.raises(InputValidationError, match="max_tokens"):
            eng.submit(Request([1, 2], None, mt, lambda e: None))


def test_a_dropped_non_streaming_request_frees_its_slot_while_tokens_keep_coming():
    """The disconnect check ran only after a second without events: a client that dropped a long
    non-streaming request held its slot until max_tokens (thousands of tokens). Nothing compiled."""
    import asyncio

    from jpeft.serve import Engine, Event, Request
    from jpeft.serve.app import Server

    eng = Engine(MODEL, PARAMS, None, slots=1, max_len=32)
    server = Server(eng, base_name="tiny", tokenizer=_word_tokenizer(WORDS))
    req = Request([1, 2], None, 4, lambda e: None)

    class Gone:  # a client that went away at once
        async def is_disconnected(self):
            return True

    async def main():
        queue = asyncio.Queue()

        async def tokens():  # the engine sends a token every 10 ms, forever
            while True:
                queue.put_nowait(Event("text", " w3", (3,)))
                await asyncio.sleep(0.01)

        feeder = asyncio.ensure_future(tokens())
        try:
            return await asyncio.wait_for(server._collect(Gone(), req, queue, "cmpl-x", "tiny", False), 10)
        finally:
            feeder.cancel()

    t0 = time.time()
    resp = asyncio.run(main())
    assert resp.status_code == 499 and req.cancelled and time.time() - t0 < 3


def test_odd_paths_and_routes_get_openai_shaped_errors_not_plain_text_500():
    """A 'path' too long for the file system (ENAMETOOLONG from the symlink check) was a plain
    500; unknown routes and methods answered plain-text 404/405. Nothing compiled."""
    from starlette.testclient import TestClient

    from jpeft.bank import AdapterBank
    from jpeft.serve import Engine
    from jpeft.serve.app import Server, make_app

    bank = AdapterBank.from_adapters({"a": ADAPTERS["a"][1]}, capacity=2)
    eng = Engine(MODEL, PARAMS, bank, slots=1, max_len=32)
    server = Server(eng, base_name="tiny", tokenizer=_word_tokenizer(WORDS), adapters_root=os.getcwd(),
                    loader=lambda path: pytest.fail("must not load"))
    with TestClient(make_app(server), raise_server_exceptions=False) as client:
        r = client.post("/v1/adapters", json={"name": "x", "path": "a" * 5000})
        assert r.status_code == 400 and r.json()["error"]["param"] == "path", r.text
        r = client.get("/v1/completions")
        assert r.status_code == 405 and "Method Not Allowed" in r.json()["error"]["message"], r.text
        r = client.get("/v1/nope")
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error", r.text


def test_max_tokens_and_max_completion_tokens_that_differ_are_refused_not_one_silently_chosen():
    """A request with max_tokens=5 and max_completion_tokens=2 generated 5 tokens: max_tokens won
    without a word, though OpenAI deprecates it for max_completion_tokens (and vLLM takes the latter).
    Differing values are a 400 naming both; equal values, or either alone, set the limit."""
    from starlette.testclient import TestClient

    from jpeft.bank import AdapterBank
    from jpeft.serve import Engine
    from jpeft.serve.app import Server, make_app

    eng = Engine(MODEL, PARAMS, AdapterBank.from_adapters({"a": ADAPTERS["a"][1]}, capacity=2), slots=1, max_len=32)
    server = Server(eng, base_name="tiny", tokenizer=_word_tokenizer(WORDS), adapters_root=os.getcwd(),
                    loader=lambda path: pytest.fail("must not load"))
    with TestClient(make_app(server), raise_server_exceptions=False) as client:
        body = {"model": "a", "prompt": PROMPT, "temperature": 0}
        r = client.post("/v1/completions", json={**body, "max_tokens": 5, "max_completion_tokens": 2})
        err = r.json()["error"]
        assert r.status_code == 400 and "'max_tokens' (5)" in err["message"], r.text
        assert "'max_completion_tokens' (2)" in err["message"] and err["param"] == "max_completion_tokens", r.text
        for limits in ({"max_tokens": 2, "max_completion_tokens": 2}, {"max_completion_tokens": 2}, {"max_tokens": 2}):
            r = client.post("/v1/completions", json={**body, **limits})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, (limits, r.text)


def test_a_streamed_request_that_timed_out_in_the_queue_reports_503_not_504():
    """A streaming request that never got a slot was reported inside the stream as 504 (the code of a
    request that ran past --request-timeout), where the same request without streaming gets the
    documented 503; the stream's error now has OpenAI's full shape (with "param"). Nothing compiled."""
    import asyncio

    from jpeft.serve import Engine, Event, Request
    from jpeft.serve.app import Server

    eng = Engine(MODEL, PARAMS, None, slots=1, max_len=32)
    server = Server(eng, base_name="tiny", tokenizer=_word_tokenizer(WORDS))

    async def main(started):
        req = Request([1, 2], None, 4, lambda e: None)
        req.started = started
        queue = asyncio.Queue()
        queue.put_nowait(Event("error", error="timeout", message="timed out"))
        return [c async for c in server._stream(req, queue, "cmpl-x", "tiny", False, {})]

    for started, code in ((None, 503), (1.0, 504)):
        (chunk,) = asyncio.run(main(started))
        err = json.loads(chunk[len("data: "):])["error"]
        assert err == {"message": "timed out", "type": "timeout_error", "param": None, "code": code}, err

    async def mid(include_usage):  # a time-out after text was sent: the text, then the error as the last event
        req = Request([1, 2], None, 4, lambda e: None)
        req.started = 1.0
        queue = asyncio.Queue()
        queue.put_nowait(Event("text", "w3", (3,)))
        queue.put_nowait(Event("error", error="timeout", message="timed out"))
        return [json.loads(c[len("data: "):]) async for c in server._stream(req, queue, "cmpl-x", "tiny", False, {},
                                                                           include_usage)]

    for include_usage in (False, True):  # no usage chunk after an error; "usage": null on the text's with include_usage
        text, last = asyncio.run(mid(include_usage))
        assert text["choices"][0]["text"] == "w3"
        assert text.get("usage", "absent") == (None if include_usage else "absent")
        assert last == {"error": {"message": "timed out", "type": "timeout_error", "param": None, "code": 504}}


def test_serve_options_zero_or_negative_are_refused_not_read_as_the_default(tmp_path):
    """`--capacity 0` and `--max-rank 0` started a server with the defaults (8 slots, rank 16),
    `--queue-timeout -1` / `--request-timeout 0` one that failed every request, and `--port 70000` one
    that said it listened on 70000 while uvicorn listened on 4464: each is a named error."""
    import argparse

    from jpeft.cli import serve_cmd
    from jpeft.errors import ConfigError
    from jpeft.serve import Engine

    folder = tmp_path / "tiny"
    jpeft.models.loading.save_pretrained(str(folder), MODEL, PARAMS)
    _word_tokenizer(WORDS).save_pretrained(str(folder))
    parser = argparse.ArgumentParser()
    serve_cmd.add_parser(parser.add_subparsers())
    for opt, value, match in [("--capacity", "0", "capacity must be a positive integer, found 0"),
                              ("--max-rank", "0", "max_rank must be a positive integer, found 0"),
                              ("--queue-timeout", "-1", "queue_timeout must be a number of seconds > 0"),
                              ("--request-timeout", "0", "request_timeout must be a number of seconds > 0"),
                              ("--queue-timeout", "nan", "queue_timeout must be a number of seconds > 0"),
                              ("--port", "70000", "--port must be a TCP port, 1 to 65535, found 70000")]:
        with pytest.raises(ConfigError, match=match):
            serve_cmd.build(parser.parse_args(["serve", "--model", str(folder), opt, value]))
    server = serve_cmd.build(parser.parse_args(["serve", "--model", str(folder), "--capacity", "3", "--max-rank", "5"]))
    assert (server.engine.bank.capacity, server.engine.bank.max_rank) == (3, 5)
    with pytest.raises(ConfigError, match="request_timeout"):
        Engine(MODEL, PARAMS, None, slots=1, max_len=32, request_timeout=float("nan"))
    assert Engine(MODEL, PARAMS, None, slots=1, max_len=32, request_timeout=float("inf")).request_timeout == float("inf")


def test_a_port_in_use_or_an_unknown_host_is_named_before_the_model_loads(tmp_path):
    """`jpeft serve --port P` with P held by another server loaded the model, compiled, and then
    exited with uvicorn's own "address already in use" line; the address is checked first now (the
    model folder here does not exist: the port's error comes before the load's)."""
    import argparse
    import socket

    from jpeft.cli import serve_cmd
    from jpeft.errors import ConfigError

    parser = argparse.ArgumentParser()
    serve_cmd.add_parser(parser.add_subparsers())
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        args = parser.parse_args(["serve", "--model", str(tmp_path / "missing"), "--port", str(port)])
        with pytest.raises(ConfigError, match=f"port {port} on 127.0.0.1 is in use by another program; stop it or "
                                              "choose another --port"):
            serve_cmd.run(args)
    args = parser.parse_args(["serve", "--model", str(tmp_path / "missing"), "--host", "no-such-host.invalid"])
    with pytest.raises(ConfigError, match="--host 'no-such-host.invalid' is not an address"):
        serve_cmd.run(args)



def _greedy_tokens(eng, names, prompt, n):
    """Starts ``eng``, sends one greedy request of ``n`` new tokens after ``prompt`` to each
    adapter of ``names`` at once, waits for all, stops it: ``{name: [token id, ...]}`` from the
    text events."""
    from jpeft.serve import Request

    events = {k: [] for k in names}
    done = threading.Semaphore(0)

    def sink(name):
        def put(e):
            events[name].append(e)
            if e.kind != "text":
                done.release()
        return put

    eng.start()
    try:
        for name in names:
            eng.submit(Request(prompt, name, n, sink(name), temperature=0.0))
        assert all(done.acquire(timeout=120) for _ in names)
    finally:
        eng.stop()
    return {k: [t for e in ev if e.kind == "text" for t in e.token_ids] for k, ev in events.items()}

def test_engine_after_hot_add_and_remove_generates_with_each_new_adapters_own_scale():
    """The engine's two programs, compiled on a bank of one adapter, then serving adapters added
    after (other ranks and alphas, so other scales) in a freed and in a fresh slot: each request's
    greedy tokens equal ``jpeft.generate`` with its adapter alone (the programs take the bank's
    weights and scales as arguments, so no scale is left over from compile time)."""
    from jpeft.bank import AdapterBank
    from jpeft.serve import Engine

    def lora(seed, r, alpha):
        cfg = jpeft.LoraConfig(r=r, alpha=alpha, target_modules=TARGETS, init_weights="random")
        return jpeft.init(cfg, PARAMS, jax.random.key(seed))

    new = {"x": lora(11, 2, 7.0), "y": lora(12, 3, 1.5)}
    eng = Engine(MODEL, PARAMS, AdapterBank.from_adapters({"a": ADAPTERS["a"][1]}, capacity=2, max_rank=4),
                 slots=2, max_len=32, eos_ids=[]).warmup()
    eng.add_adapter("x", new["x"])  # a fresh slot (scale 0 when compiled)
    assert eng.remove_adapter("a") == 0
    eng.add_adapter("y", new["y"])  # the freed slot of "a" (scale 2 when compiled)
    prompt, n = [3, 9, 1, 4], 6
    tokens = _greedy_tokens(eng, list(new), prompt, n)
    assert eng.traces == {"prefill": 1, "decode": 1}
    wants = set()
    for name, ad in new.items():
        want = np.asarray(jpeft.generate(MODEL, PARAMS, ad, jnp.asarray([prompt], jnp.int32), n))[0, len(prompt):]
        got = tokens[name]
        assert got == want.tolist(), name
        wants.add(tuple(got))
    assert len(wants) == 2  # the two adapters generate different tokens (the comparison has teeth)


def test_serve_takes_lora_bias_adapters_at_start_and_live_and_generates_their_tokens(tmp_path):
    """A LoRA with lora_bias (PEFT mixes them in a batch) given to `jpeft serve` was refused
    (BankError at start, 400 live); the bank now holds a bias at every linear site, and each
    request's greedy tokens equal ``jpeft.generate`` with its adapter alone (every tensor random)."""
    import argparse

    from jpeft.cli import serve_cmd

    def biased(seed, targets):
        cfg = jpeft.LoraConfig(r=2, alpha=5.0, target_modules=targets, lora_bias=True, init_weights="random")
        ad = jpeft.init(cfg, PARAMS, jax.random.key(seed))
        leaves, tree = jax.tree.flatten(ad)
        keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
        return cfg, jax.tree.unflatten(tree, [0.5 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])

    folder = tmp_path / "tiny"
    jpeft.models.loading.save_pretrained(str(folder), MODEL, PARAMS)
    _word_tokenizer(WORDS).save_pretrained(str(folder))
    ads = {"bias": biased(21, ["q_proj", "down_proj"]), "live": biased(23, ["v_proj", "o_proj"]), "a": ADAPTERS["a"]}
    for name, (cfg, ad) in ads.items():
        jpeft.save_adapter(str(tmp_path / name), cfg, ad, params=PARAMS)
    parser = argparse.ArgumentParser()
    serve_cmd.add_parser(parser.add_subparsers())
    server = serve_cmd.build(parser.parse_args(["serve", "--model", str(folder), "--adapter", f"bias={tmp_path / 'bias'}",
                                                "--adapter", f"a={tmp_path / 'a'}", "--slots", "3", "--max-len", "32"]))
    eng = server.engine
    eng.add_adapter("live", server.loader(str(tmp_path / "live")))  # a bias where no --adapter has one
    prompt, n = [3, 9, 1, 4], 6
    tokens = _greedy_tokens(eng, list(ads), prompt, n)
    outs = set()
    for name, (cfg, ad) in ads.items():
        want = np.asarray(jpeft.generate(MODEL, PARAMS, ad, jnp.asarray([prompt], jnp.int32), n))[0, len(prompt):]
        got = tokens[name]
        assert got == want.tolist(), name
        outs.add(tuple(got))
    no_bias = {p: dataclasses.replace(x, lora_bias=None) for p, x in ads["bias"][1].items()}
    plain = np.asarray(jpeft.generate(MODEL, PARAMS, no_bias, jnp.asarray([prompt], jnp.int32), n))[0, len(prompt):]
    assert len(outs) == 3 and tuple(plain.tolist()) not in outs  # the biases change the tokens (the test has teeth)


def test_shutdown_answers_every_open_request_before_closing_its_connection():
    """On SIGTERM or Ctrl-C uvicorn waited 5 s for the open requests, cancelled them, and only then
    stopped the engine: a request still running or waiting lost its connection without an answer (a
    stream ended with no last event, a plain request got a text/plain 500) and the log had a traceback
    for each. The server now drains first: after the grace period the engine stops, and each request
    still open gets a 503 "the server is shutting down" (a stream as its last event) on its own
    connection. In process: uvicorn in a thread, ``should_exit`` set as its signal handler sets it."""
    from jpeft.bank import AdapterBank
    from jpeft.serve import Engine
    from jpeft.serve.app import Server, make_server

    eng = Engine(MODEL, PARAMS, AdapterBank.from_adapters({"a": ADAPTERS["a"][1]}, capacity=1), slots=1, max_len=96,
                 chunk=4, eos_ids=[], tokenizer=_word_tokenizer(WORDS))
    decode = eng._decode

    def slow_decode(*args):  # 90 tokens take 4.5 s: the requests are still open when the shutdown starts
        time.sleep(0.05)
        return decode(*args)

    eng._decode = slow_decode
    port = _free_port()
    srv = make_server(Server(eng, base_name="tiny", tokenizer=eng.tokenizer), port=port, grace=0.3)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started

    def one(stream):
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("POST", "/v1/completions", body=json.dumps(
                {"model": "a", "prompt": PROMPT, "max_tokens": 90, "temperature": 0, "stream": stream}),
                headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            body = r.read().decode()
            if stream:  # the last event
                return r.status, json.loads(body.strip().split("\n\n")[-1][len("data: "):])
            return r.status, json.loads(body)
        except Exception as e:  # noqa: BLE001 - a dropped connection: asserted below
            return repr(e)

    with cf.ThreadPoolExecutor(4) as ex:
        futures = [ex.submit(one, stream) for stream in (False, True, False, True)]
        while time.time() < deadline:  # one running, three waiting
            st = eng.stats()
            if st["busy"] + st["waiting"] == 4:
                break
            time.sleep(0.02)
        srv.should_exit = True  # what uvicorn's SIGTERM / SIGINT handler does
        got = [f.result(timeout=60) for f in futures]
    thread.join(30)
    assert not thread.is_alive()
    for stream, g in zip((False, True, False, True), got):
        assert isinstance(g, tuple), g  # an answer, not a dropped connection
        status, body = g
        assert status == (200 if stream else 503), g  # a stream has answered 200 before it waits
        assert body["error"]["code"] == 503 and "shutting down" in body["error"]["message"], g
    assert eng.stats()["failed"] == 4 and not eng.alive


def test_serve_reserves_token_rows_and_module_copies_for_adapters_added_live(tmp_path):
    """An adapter with trainable tokens (PEFT's trainable_token_indices) or a modules_to_save copy
    added live to a server whose --adapter adapters had none got a 400 that named the Python API
    (AdapterBank.create(..., max_tokens=...)), which no serve option reached. `--trainable-tokens N`
    and `--modules-to-save NAMES` reserve them; each live adapter's greedy tokens equal
    ``jpeft.generate`` with it alone (every tensor random), and more than reserved names the option."""
    import argparse

    from jpeft.cli import serve_cmd

    def rand(seed, **kw):
        cfg = jpeft.LoraConfig(r=2, alpha=3.0, init_weights="random", **kw)
        leaves, tree = jax.tree.flatten(jpeft.init(cfg, PARAMS, jax.random.key(seed)))
        keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
        return cfg, jax.tree.unflatten(tree, [0.5 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])

    folder = tmp_path / "tiny"
    jpeft.models.loading.save_pretrained(str(folder), MODEL, PARAMS)
    _word_tokenizer(WORDS).save_pretrained(str(folder))
    ads = {"tok": rand(31, target_modules=["q_proj"], trainable_token_indices=[3, 9, 1]),
           "copy": rand(33, target_modules=["v_proj"], modules_to_save=["lm_head"]),
           "many": rand(35, target_modules=["q_proj"], trainable_token_indices=[3, 9, 1, 4]),
           "head": rand(37, target_modules=["q_proj", "lm_head"])}  # a LoRA where the copies are reserved
    for name, (cfg, ad) in ads.items():
        jpeft.save_adapter(str(tmp_path / name), cfg, ad, params=PARAMS)
    parser = argparse.ArgumentParser()
    serve_cmd.add_parser(parser.add_subparsers())
    argv = ["serve", "--model", str(folder), "--adapters-root", str(tmp_path), "--slots", "3", "--max-len", "32"]
    server = serve_cmd.build(parser.parse_args(argv))  # no reservation: the 400s name the options
    assert "--trainable-tokens" in _post_adapter(server, {"name": "tok", "path": "tok"})[1]
    assert "--modules-to-save" in _post_adapter(server, {"name": "copy", "path": "copy"})[1]
    server = serve_cmd.build(parser.parse_args(argv + ["--trainable-tokens", "3", "--modules-to-save", "lm_head",
                                                       "--adapter", f"head={tmp_path / 'head'}"]))
    for name in ("tok", "copy"):
        assert _post_adapter(server, {"name": name, "path": name})[0] == 201, name
    st, msg = _post_adapter(server, {"name": "many", "path": "many"})
    assert st == 400 and "4 trainable tokens" in msg and "--trainable-tokens" in msg, (st, msg)
    prompt, n = [3, 9, 1, 4, 2], 6
    tokens = _greedy_tokens(server.engine, ["tok", "copy", "head"], prompt, n)
    outs = set()
    for name in ("tok", "copy", "head"):
        ad = ads[name][1]
        want = np.asarray(jpeft.generate(MODEL, PARAMS, ad, jnp.asarray([prompt], jnp.int32), n))[0, len(prompt):].tolist()
        assert tokens[name] == want, name
        outs.add(tuple(tokens[name]))
    assert len(outs) == 3 and tuple(_ref(None, prompt, n)) not in outs  # the adapters change the tokens


def test_drain_of_an_idle_server_is_prompt():
    """The drain at shutdown (``Server.drain``, then ``Engine.stop``, which joins the engine's thread)
    was reported to wait ~10 s for an idle engine. It does not: the idle thread waits on the condition
    ``stop`` notifies (measured 0.14 s for the whole drain, 0.4 ms for ``stop``). This keeps it so (a
    hang would take the 30 s grace). Requests in flight at a drain are
    tested by test_shutdown_answers_every_open_request_before_closing_its_connection."""
    import asyncio

    from jpeft.bank import AdapterBank
    from jpeft.serve import Engine
    from jpeft.serve.app import Server

    eng = Engine(MODEL, PARAMS, AdapterBank.from_adapters({"a": ADAPTERS["a"][1]}, capacity=1), slots=1, max_len=32,
                 chunk=4, eos_ids=[], tokenizer=_word_tokenizer(WORDS)).start()
    srv = Server(eng, base_name="tiny", tokenizer=eng.tokenizer)
    time.sleep(0.1)  # the engine's thread is waiting for work
    t0 = time.monotonic()
    assert asyncio.run(srv.drain(30.0)) == 0
    assert time.monotonic() - t0 < 3.0 and srv.closing and not eng.alive and "failed" not in eng.stats()


def test_a_drain_waits_for_a_long_engine_step_and_answers_its_requests_before_returning():
    """``Engine.stop`` joined the engine's thread for at most 10 s, so a step longer than that (a
    first compile, a large model on the CPU) left the drain returning while its requests were still
    open: a wrong count, and their 503s sent after uvicorn had closed the connections. ``stop`` now
    waits until the step ends (``timeout=None``) or ``give_up()`` is true, and the drain uses that
    with its ``force`` (a second Ctrl-C). Here a step takes 0.6 s: a capped stop returns before the
    request is answered, the drain's after it."""
    import asyncio

    from jpeft.bank import AdapterBank
    from jpeft.serve import Engine, Request
    from jpeft.serve.app import Server

    def slow_engine():
        eng = Engine(MODEL, PARAMS, AdapterBank.from_adapters({"a": ADAPTERS["a"][1]}, capacity=1), slots=1,
                     max_len=32, chunk=4, eos_ids=[], tokenizer=_word_tokenizer(WORDS))
        fast, started = eng._iterate, threading.Event()

        def iterate(bank, rows):  # every step of this engine takes 0.6 s more
            started.set()
            time.sleep(0.6)
            fast(bank, rows)

        eng._iterate = iterate
        events = []
        eng.start().submit(Request(_ids("w3 w4"), "a", 20, events.append, temperature=0.0))
        assert started.wait(60)
        return eng, events

    eng, events = slow_engine()
    t0 = time.monotonic()
    eng.stop(timeout=0.05)  # capped: returns during the step, the request not answered yet
    assert time.monotonic() - t0 < 0.5 and eng._thread.is_alive() and not any(e.kind == "error" for e in events)
    eng.stop(timeout=None, give_up=lambda: False)  # until the step ends and the request is answered
    assert not eng._thread.is_alive() and events[-1].kind == "error" and "shutting down" in events[-1].message

    eng, events = slow_engine()
    srv = Server(eng, base_name="tiny", tokenizer=eng.tokenizer)
    assert asyncio.run(srv.drain(0.0)) == 1  # no grace: the running request ends with a 503, counted
    assert not eng._thread.is_alive() and events[-1].kind == "error" and "shutting down" in events[-1].message

    eng, events = slow_engine()
    t0 = time.monotonic()
    eng.stop(timeout=None, give_up=lambda: True)  # a second Ctrl-C: the drain stops waiting at once
    assert time.monotonic() - t0 < 0.5
    eng.stop(timeout=None)
