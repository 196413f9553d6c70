"""Instruction and chat data against transformers' own tokenization: the rows jpeft packs from
a chat template's output equal ``apply_chat_template(..., tokenize=True)``, the tokens trained
in a prompt/completion line cut at an assistant turn are the ones the template marks with
``{% generation %}`` (``return_assistant_tokens_mask``), and a tokenizer's front token is the
one ``tokenizer(text)`` puts there. Conversational lines (``messages``, TRL's conversational
prompt/completion) rendered by jpeft with the model folder's chat template: text and tokens equal to
``apply_chat_template``'s, the targets exactly the assistant turns (token by token), the refusals,
and a `jpeft train` / `jpeft eval` run on them. Tokenizers are built here with the tokenizers library."""

import functools

import pytest

from jpeft.data import PackedDataset, text_encoder, tokenize_documents

# ChatML as Qwen 2 writes it: every turn ends "<|im_end|>\n"; the reply and its <|im_end|> are generated
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}{% generation %}"
          "{{ m['content'] }}<|im_end|>{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Llama 2's: the BOS written by the template, the reply and its </s> generated
LLAMA2 = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
          "{% else %}{% generation %} {{ m['content'] }} {{ eos_token }}{% endgeneration %}{% endif %}{% endfor %}")

MESSAGES = [{"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And of Italy?"},
            {"role": "assistant", "content": "Rome, of course."}]


@functools.lru_cache(maxsize=None)
def _tokenizer(kind):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    text = [m["content"] for m in MESSAGES] * 4 + ["system user assistant INST the capital of"] * 4
    if kind == "chatml":  # byte-level BPE, no BOS, EOS <|im_end|>
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.train_from_iterator(text, trainers.BpeTrainer(
            vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                       chat_template=CHATML)
    # SentencePiece-style ("▁" for spaces, a "▁" in front), a post-processor that adds <s>
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"],
                                                      show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   chat_template=LLAMA2)


@pytest.mark.parametrize("kind", ["chatml", "llama2"])
def test_chat_template_output_and_its_assistant_turns_are_tokenized_as_transformers_does(kind):
    """A conversation rendered with the chat template into a ``text`` line is packed as
    ``apply_chat_template(tokenize=True)`` gives it (no second BOS where the template writes one,
    special tokens whole), plus the EOS where the rendering does not end in it; a
    prompt/completion line per assistant turn (the turns before it with the generation prompt,
    then the reply) trains exactly the tokens the template's ``{% generation %}`` marks (the reply
    and its end-of-turn token), nothing of the system or user turns."""
    tok = _tokenizer(kind)
    messages = MESSAGES if kind == "chatml" else MESSAGES[1:]  # Llama 2's template above takes no system turn
    encode, bos, eos = text_encoder(tok)
    ref = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    text = tok.apply_chat_template(messages, tokenize=False)
    (ids, mask), = tokenize_documents([{"text": text}], encode, eos_id=eos, bos_id=bos)
    want = ref["input_ids"] + ([] if ref["input_ids"][-1] == eos else [eos])  # ChatML ends "<|im_end|>\n"
    assert ids.tolist() == want
    assert ids.tolist().count(tok.convert_tokens_to_ids("<s>" if kind == "llama2" else "<|im_start|>")) == (
        1 if kind == "llama2" else len(messages))

    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    examples = []
    for i in turns:
        prompt = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=kind == "chatml")
        full = tok.apply_chat_template(messages[:i + 1], tokenize=False)
        assert full.startswith(prompt)
        examples.append({"prompt": prompt, "completion": full[len(prompt):]})
    for i, (ids, mask) in zip(turns, tokenize_documents(examples, encode, eos_id=eos, bos_id=bos)):
        turn = tok.apply_chat_template(messages[:i + 1], tokenize=True, return_dict=True,
                                       return_assistant_tokens_mask=True)
        m = turn["assistant_masks"]
        end = max(j for j, v in enumerate(m) if v) + 1  # the generated part of the last turn: reply, end of turn
        start = next(j for j in range(end, 0, -1) if not m[j - 1])
        assert ids[:end].tolist() == turn["input_ids"][:end]
        assert mask[:end].tolist() == [start <= j for j in range(end)]
        assert tok.convert_ids_to_tokens(int(ids[end - 1])) in ("</s>", "<|im_end|>")
        assert mask[end:].all()  # what follows the turn: "\n" and the appended EOS (ChatML), nothing (Llama 2)


def test_a_front_token_the_tokenizer_adds_without_a_bos_token_name_is_in_the_rows():
    """A tokenizer whose post-processor puts "<s>" in front of every text but that was wrapped without
    ``bos_token`` (PreTrainedTokenizerFast(tokenizer_object=tok), saved and read back the same): text_encoder
    gave no BOS, so the rows were [a, b, </s>] where transformers' tokenizer(text) (TRL, `jpeft serve`'s
    /v1/completions) gives [<s>, a, b] + </s>; the model was trained and scored on rows without the token it
    is served with. Now the rows are tokenizer(text) + EOS, and a text holding its own <s> gets no second."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "a", "b", "c"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")
    assert fast.bos_token is None and fast("a b")["input_ids"] == [1, 3, 4]
    encode, bos, eos = text_encoder(fast)
    assert (bos, eos) == (1, 2)
    ds = PackedDataset.from_examples([{"text": "a b"}, {"prompt": "a", "completion": " c"}, {"text": "<s> c"}], encode,
                                     4, eos_id=eos, bos_id=bos)
    assert ds.input_ids.tolist() == [[1, 3, 4, 2], [1, 3, 5, 2], [1, 5, 2, 0]]
    assert ds.loss_mask.astype(int).tolist() == [[0, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 0]]
    # a post-processor that appends the EOS only puts nothing in front
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    assert text_encoder(PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>"))[1] is None


def test_a_completion_running_past_the_row_is_warned_about_with_its_targets():
    """Packed by documents, a prompt/completion pair longer than seq_len is cut into chunks, and a
    chunk sees none of the chunks before it: the completion's tokens after the first chunk were
    trained as text that follows no instruction, without a word (only a prompt longer than seq_len
    was warned about). Now the documents and their targets trained so are counted; a long text
    document (no prompt) and a pair that fits its row are not."""
    import warnings

    enc = lambda s: [ord(c) for c in s]  # noqa: E731
    examples = [{"prompt": "p" * 6, "completion": "abcdefghij"}, {"text": "x" * 30}, {"prompt": "q", "completion": "d"},
                {"prompt": "qq", "completion": "e" * 20}]
    with pytest.warns(UserWarning, match=r"in 2 prompt/completion \(or conversation\) document\(s\) the completion runs past the first 8 "
                                         r"tokens: 22 of their target tokens are trained in later chunks") as said:
        ds = PackedDataset.from_examples(examples, enc, 8, eos_id=2, bos_id=1)
    assert len(said) == 1
    # the count is the targets of the chunks after each pair's first: rows 1-2 (pair 1) and 9-10 (the last pair)
    assert sum(int(ds.loss_mask[r, 1:].sum()) for r in (1, 2, 9, 10)) == 22
    assert ds.input_ids[1, 0] == ord("b") and ds.input_ids[9].tolist() == [ord("e")] * 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fits = [{"prompt": "ppp", "completion": "abc"}]
        PackedDataset.from_examples(examples[1:3] + fits, enc, 8, eos_id=2, bos_id=1)


# ---------------------------------------------------------------- conversational rows (`messages`), rendered by jpeft
# Qwen 2.5's ChatML (a default system turn, loop.first, "\n" after every <|im_end|>), and Llama 3.1's (its BOS
# written by the template, strftime_now, raise_exception on a role it does not know, `| trim`, whitespace control)
QWEN = ("{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + "
        "'<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
        "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
        "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
LLAMA3 = ("{{- bos_token }}{%- set date_string = strftime_now('%d %b %Y') %}"
          "{%- for message in messages %}{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
          "{{- raise_exception('Unknown role: ' + message['role']) }}{%- endif %}"
          "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
          "{%- if message['role'] == 'system' %}{{- 'Today Date: ' + date_string + '\\n\\n' }}{%- endif %}"
          "{{- message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
          "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")
# Qwen 3's habit: an earlier assistant turn loses its reasoning, the last keeps it (not prefix-stable)
DROPS_THINKING = ("{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' }}{%- if m.role == 'assistant' and "
                  "not loop.last %}{{- m.content.split('</think>')[-1] }}{%- else %}{{- m.content }}{%- endif %}"
                  "{{- '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
                  "{%- endif %}")
# Qwen 2.5's tool use: with tools, the system turn lists each tool's JSON schema between <tools> tags
QWEN_TOOLS = ("{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0]['role'] == 'system' %}"
              "{{- messages[0]['content'] }}{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}"
              "{{- '\\n\\n# Tools\\n\\n<tools>' }}{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
              "{{- '\\n</tools><|im_end|>\\n' }}{%- else %}" + QWEN.split("{%- for message", 1)[0] + "{%- endif %}"
              "{%- for message" + QWEN.split("{%- for message", 1)[1])
# Qwen 3's switch: with enable_thinking false, the generation prompt and every assistant turn open with an empty
# <think></think> block (the reply is trained after it); tools listed in a system turn
THINK_SWITCH = ("{%- set off = enable_thinking is defined and enable_thinking is false %}{%- if tools %}"
                "{{- '<|im_start|>system\\n' }}{%- for tool in tools %}{{- tool | tojson }}{%- endfor %}{{- '<|im_end|>\\n' }}"
                "{%- endif %}{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' }}{%- if m.role == 'assistant' "
                "and off %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{{- m.content + '<|im_end|>\\n' }}{%- endfor %}"
                "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- if off %}"
                "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}")
TOOLS = [{"type": "function", "function": {
    "name": "get_capital", "description": "The capital city of a country.",
    "parameters": {"type": "object", "properties": {"country": {"type": "string"}}, "required": ["country"]}}}]
CHATS = [MESSAGES, [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
                    {"role": "user", "content": "Another?"}]]  # the second ends with a user turn (not trained)


@functools.lru_cache(maxsize=None)
def _chat_folder(kind, root):
    """A model folder's tokenizer files (saved by transformers: the template in chat_template.jinja), and
    the transformers tokenizer read back from them (the reference). ``kind``: "qwen" (no BOS, EOS
    <|im_end|>), "llama3" (a post-processor putting <|begin_of_text|> in front, as Llama 3's does),
    "none" (no template), "thinking"; "qwen-config": the template in tokenizer_config.json instead, as
    transformers 4 saved it."""
    import json
    import os

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    text = [m["content"] for c in CHATS for m in c] * 4 + ["system user assistant helpful Today Date Dec"] * 4
    llama = kind == "llama3"
    special = (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
               if llama else ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=special, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if llama:
        tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                           special_tokens=[("<|begin_of_text|>", 0)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                       chat_template=LLAMA3)
    else:
        template = {"none": None, "thinking": DROPS_THINKING, "tools": QWEN_TOOLS, "switch": THINK_SWITCH,
                    "calls": QWEN_CALLS}.get(kind, QWEN)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                       chat_template=template)
    folder = os.path.join(root, kind)
    fast.save_pretrained(folder)
    if kind == "qwen-config":
        os.remove(os.path.join(folder, "chat_template.jinja"))
        with open(os.path.join(folder, "tokenizer_config.json")) as f:
            cfg = json.load(f)
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            json.dump(dict(cfg, chat_template=QWEN), f)
    return folder, AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def chat_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("chat"))


def _jsonl(path, rows):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _runs(mask):
    """The [start, end) runs of True in a mask."""
    out, start = [], None
    for j, v in enumerate(list(mask) + [False]):
        if v and start is None:
            start = j
        elif not v and start is not None:
            out.append((start, j))
            start = None
    return out


@pytest.mark.parametrize("kind", ["qwen", "llama3", "qwen-config"])
def test_messages_rows_are_rendered_and_tokenized_as_transformers_and_train_the_assistant_turns(kind, chat_root, tmp_path):
    """A ``messages`` line is rendered with the model folder's chat template (chat_template.jinja, or
    tokenizer_config.json's chat_template) exactly as transformers' ``apply_chat_template(messages,
    tokenize=False)``, its tokens are ``apply_chat_template(tokenize=True)``'s (one BOS, written by the
    template, none added; no EOS appended, as TRL appends none to a conversation), and the loss mask
    covers exactly the assistant turns, token by token: each reply and what the template closes it
    with (ChatML's <|im_end|> and newline, Llama 3's <|eot_id|>), nothing of the system or user turns
    nor of the assistant headers. A conversation ending with a user turn trains its assistant turns."""
    from jpeft.data import load_examples, render_chat
    from jpeft.models import load_tokenizer

    folder, ref = _chat_folder(kind, chat_root)
    tok = load_tokenizer(folder)  # as `jpeft train` reads the model folder
    encode, bos, eos = text_encoder(tok)
    rows = load_examples(_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CHATS]))
    assert [r["where"] for r in rows] == [f"{tmp_path / 'chat.jsonl'}:{i}" for i in (1, 2)]
    rendered = render_chat(rows, tok)
    docs = tokenize_documents(rendered, encode, eos_id=eos, bos_id=bos)
    close = "<|eot_id|>" if kind == "llama3" else "<|im_end|>\n"
    for chat, r, (ids, mask) in zip(CHATS, rendered, docs):
        assert r["chat"] == ref.apply_chat_template(chat, tokenize=False)
        want = ref.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
        assert ids.tolist() == want
        if kind == "llama3":
            assert bos == ref.convert_tokens_to_ids("<|begin_of_text|>") and want.count(bos) == 1 and want[0] == bos
        # token by token: a token is a target iff its characters lie in an assistant turn, the text that
        # messages[:i + 1] renders beyond messages[:i] with the generation prompt (transformers' offsets)
        spans = [(len(ref.apply_chat_template(chat[:i], tokenize=False, add_generation_prompt=True)),
                  len(ref.apply_chat_template(chat[:i + 1], tokenize=False)))
                 for i, m in enumerate(chat) if m["role"] == "assistant"]
        offsets = ref(r["chat"], add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        assert mask.tolist() == [any(a < e and b > s for s, e in spans) for a, b in offsets]
        replies = [m["content"] for m in chat if m["role"] == "assistant"]
        assert [ref.decode(ids[s:e].tolist()) for s, e in _runs(mask)] == [c + close for c in replies]


@pytest.mark.parametrize("kind", ["chatml", "llama2"])
def test_the_assistant_turns_found_by_rendering_prefixes_are_the_tokens_generation_blocks_mark(kind):
    """On templates whose ``{% generation %}`` blocks hold exactly each reply and its end of turn
    (ChatML and Llama 2 above, a SentencePiece-style tokenizer adding <s> for the latter), the targets
    jpeft finds by rendering prefixes are transformers' ``return_assistant_tokens_mask``, token by
    token (the conversation's first token aside, which nothing predicts), and the tokens are
    ``apply_chat_template(tokenize=True)``'s, one BOS."""
    from jpeft.data import render_chat

    tok = _tokenizer(kind)
    messages = MESSAGES if kind == "chatml" else MESSAGES[1:]
    encode, bos, eos = text_encoder(tok)
    (ids, mask), = tokenize_documents(render_chat([{"messages": messages}], tok), encode, eos_id=eos, bos_id=bos)
    ref = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ids.tolist() == ref["input_ids"]
    assert ids.tolist().count(tok.convert_tokens_to_ids("<s>")) == (kind == "llama2")
    assert mask.tolist() == [bool(m) for m in ref["assistant_masks"]]
    assert len(_runs(mask)) == 2  # the two replies


def test_a_conversational_prompt_completion_row_trains_its_completion_as_trl_does(chat_root, tmp_path):
    """TRL's conversational prompt/completion (``prompt`` and ``completion`` lists of messages): the
    tokens are ``apply_chat_template(prompt + completion)``'s and the targets those after
    ``apply_chat_template(prompt, add_generation_prompt=True)``'s tokens, TRL's completion mask."""
    from jpeft.data import load_examples, render_chat

    _, ref = _chat_folder("qwen", chat_root)
    encode, bos, eos = text_encoder(ref)
    row = {"prompt": MESSAGES[:2], "completion": MESSAGES[2:3]}
    (ids, mask), = tokenize_documents(render_chat(load_examples(_jsonl(tmp_path / "pc.jsonl", [row])), ref), encode,
                                      eos_id=eos, bos_id=bos)
    full = ref.apply_chat_template(MESSAGES[:3], tokenize=True, return_dict=True)["input_ids"]
    prompt = ref.apply_chat_template(MESSAGES[:2], tokenize=True, return_dict=True, add_generation_prompt=True)
    n = len(prompt["input_ids"])
    assert ids.tolist() == full and full[:n] == prompt["input_ids"]
    assert mask.tolist() == [False] * n + [True] * (len(full) - n)
    assert ref.decode(ids[mask].tolist()) == "Paris.<|im_end|>\n"


def test_a_rows_tools_are_passed_to_the_chat_template_as_transformers_and_trl_render_them(chat_root, tmp_path):
    """A conversational line's ``tools`` (TRL's column; its SFTTrainer passes them on) were dropped: the
    conversation was rendered without them, a prompt other than the one the template writes with them, with
    no word. Every rendering of the row (the whole, the prefixes that find the assistant turns, a prompt and
    its completion) now passes them on: text, tokens and targets equal ``apply_chat_template(messages,
    tools=row["tools"])``'s, token by token. ``null`` is none; tools that are not a list of objects are refused
    by line, and tools beside a text line (no template renders it) are warned about."""
    from jpeft.data import load_examples, render_chat
    from jpeft.errors import LoadError
    from jpeft.models import load_tokenizer

    folder, ref = _chat_folder("tools", chat_root)
    tok = load_tokenizer(folder)
    encode, bos, eos = text_encoder(tok)
    rows = [{"messages": MESSAGES, "tools": TOOLS}, {"prompt": MESSAGES[:2], "completion": MESSAGES[2:3], "tools": TOOLS},
            {"messages": MESSAGES, "tools": None}]
    rendered = render_chat(load_examples(_jsonl(tmp_path / "tools.jsonl", rows)), tok)
    docs = tokenize_documents(rendered, encode, eos_id=eos, bos_id=bos)
    text = ref.apply_chat_template(MESSAGES, tools=TOOLS, tokenize=False)
    assert '"name": "get_capital"' in text and text != ref.apply_chat_template(MESSAGES, tokenize=False)
    assert rendered[0]["chat"] == text
    ids, mask = docs[0]
    assert ids.tolist() == ref.apply_chat_template(MESSAGES, tools=TOOLS, tokenize=True, return_dict=True)["input_ids"]
    spans = [(len(ref.apply_chat_template(MESSAGES[:i], tools=TOOLS, tokenize=False, add_generation_prompt=True)),
              len(ref.apply_chat_template(MESSAGES[:i + 1], tools=TOOLS, tokenize=False)))
             for i, m in enumerate(MESSAGES) if m["role"] == "assistant"]
    offsets = ref(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert mask.tolist() == [any(a < e and b > s for s, e in spans) for a, b in offsets]
    assert [ref.decode(ids[s:e].tolist()) for s, e in _runs(mask)] == [m["content"] + "<|im_end|>\n" for m in MESSAGES
                                                                       if m["role"] == "assistant"]
    # TRL's conversational prompt/completion: the prompt with the generation prompt, and the whole, both with the tools
    full = ref.apply_chat_template(MESSAGES[:3], tools=TOOLS, tokenize=True, return_dict=True)["input_ids"]
    prompt = ref.apply_chat_template(MESSAGES[:2], tools=TOOLS, tokenize=True, return_dict=True,
                                     add_generation_prompt=True)["input_ids"]
    assert full[:len(prompt)] == prompt and '"get_capital"' in ref.decode(prompt)
    n = len(prompt)
    assert docs[1][0].tolist() == full and docs[1][1].tolist() == [False] * n + [True] * (len(full) - n)
    assert rendered[2]["chat"] == ref.apply_chat_template(MESSAGES, tokenize=False)  # null: no tools
    with pytest.raises(LoadError, match=r"bad.jsonl:2: the 'tools' field is a string that is not JSON .*json.loads"):
        load_examples(_jsonl(tmp_path / "bad.jsonl", [rows[0], {"messages": MESSAGES, "tools": "get_capital"}]))
    with pytest.raises(LoadError, match=r"bad1.jsonl:1: the 'tools' field must be a list of tool objects .*; found str"):
        load_examples(_jsonl(tmp_path / "bad1.jsonl", [{"messages": MESSAGES, "tools": '"get_capital"'}]))
    with pytest.raises(LoadError, match=r"bad2.jsonl:1: the 'tools' field .*; found a list holding \"get_capital\""):
        load_examples(_jsonl(tmp_path / "bad2.jsonl", [{"messages": MESSAGES, "tools": ["get_capital"]}]))
    with pytest.warns(UserWarning, match=r"text.jsonl:1: 1 line\(s\) \(1\) hold a 'tools' or 'chat_template_kwargs' "
                                         r"field next to a 'text'"):
        load_examples(_jsonl(tmp_path / "text.jsonl", [{"text": "Paris.", "tools": TOOLS}]))


# Qwen 2.5's tool calls: an assistant turn writes each call's name and its arguments with tojson (an object as JSON, a
# string as a quoted string), a tool reply goes in a user turn between <tool_response> tags
QWEN_CALLS = QWEN_TOOLS.split("{%- for message", 1)[0] + (
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{%- if message.role == 'tool' %}{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + "
    "'\\n</tool_response><|im_end|>\\n' }}{%- else %}{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content %}{{- message.content }}{%- endif %}{%- for call in message.tool_calls or [] %}"
    "{{- '<tool_call>\\n{\"name\": \"' + call.function.name + '\", \"arguments\": ' + call.function.arguments | tojson + "
    "'}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}{%- endif %}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def _called(arguments):
    """A conversation whose first assistant turn calls get_capital (content null, OpenAI's form) with ``arguments``."""
    call = {"id": "call_1", "type": "function", "function": {"name": "get_capital", "arguments": arguments}}
    return [MESSAGES[1], {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "name": "get_capital", "content": "Paris"}, MESSAGES[2]]


def test_tools_as_a_json_string_and_tool_call_arguments_as_json_strings_render_as_their_objects(chat_root, tmp_path):
    """A row's ``tools`` written as a JSON string (a common dataset layout: TRL's trainers json.loads it) was refused,
    and so was an assistant turn with ``tool_calls`` and no content (OpenAI's and transformers' form). Both are read
    now: the string tools decoded as TRL decodes them, and a call's ``arguments`` given as a JSON string (OpenAI's
    form) decoded into the object transformers documents and chat templates expect (vLLM does the same; `jpeft serve`
    too, so the served prompt is the trained one): text, tokens and assistant-turn targets equal
    ``apply_chat_template(messages with object arguments, tools=TOOLS)``'s. Arguments that are no JSON object, and
    malformed tool_calls, are refused by line."""
    import json

    from jpeft.data import load_examples, render_chat
    from jpeft.errors import LoadError
    from jpeft.models import load_tokenizer

    folder, ref = _chat_folder("calls", chat_root)
    tok = load_tokenizer(folder)
    encode, bos, eos = text_encoder(tok)
    objects, strings = _called({"country": "France"}), _called('{"country": "France"}')
    text = ref.apply_chat_template(objects, tools=TOOLS, tokenize=False)
    assert '"arguments": {"country": "France"}' in text and '"get_capital"' in text.split("<tool_call>")[0]
    # the template given the string itself writes another prompt (a quoted string): what decoding avoids
    assert ref.apply_chat_template(strings, tools=TOOLS, tokenize=False) != text
    rows = [{"messages": strings, "tools": json.dumps(TOOLS)}, {"messages": objects, "tools": TOOLS},
            {"prompt": strings[:3], "completion": strings[3:], "tools": json.dumps(TOOLS)}]
    loaded = load_examples(_jsonl(tmp_path / "calls.jsonl", rows))
    assert loaded[0]["tools"] == TOOLS
    rendered = render_chat(loaded, tok)
    docs = tokenize_documents(rendered, encode, eos_id=eos, bos_id=bos)
    assert rendered[0]["chat"] == rendered[1]["chat"] == text
    ids, mask = docs[0]
    assert ids.tolist() == ref.apply_chat_template(objects, tools=TOOLS, tokenize=True, return_dict=True)["input_ids"]
    assert docs[1][0].tolist() == ids.tolist() and docs[1][1].tolist() == mask.tolist()
    assert [ref.decode(ids[s:e].tolist()) for s, e in _runs(mask)] == [
        '<tool_call>\n{"name": "get_capital", "arguments": {"country": "France"}}\n</tool_call><|im_end|>\n',
        "Paris.<|im_end|>\n"]
    prompt = ref.apply_chat_template(objects[:3], tools=TOOLS, tokenize=True, return_dict=True,
                                     add_generation_prompt=True)["input_ids"]
    assert docs[2][0].tolist() == ids.tolist() and docs[2][1].tolist() == [False] * len(prompt) + [True] * (
        len(ids) - len(prompt))
    # a row built in Python (not read by load_examples) is decoded too
    assert render_chat([{"messages": strings, "tools": TOOLS}], tok)[0]["chat"] == text
    for bad, msg in ((_called("France"), r"bad.jsonl:1: .*message 1's tool call 'get_capital' has \"arguments\" "
                                         r"\"France\", a string that is not a JSON object"),
                     (_called('["France"]'), r"bad.jsonl:1: .*a string that is not a JSON object"),
                     ([MESSAGES[1], {"role": "assistant", "content": None, "tool_calls": {"name": "get_capital"}}],
                      r"bad.jsonl:1: .*message 1's \"tool_calls\" must be a list of")):
        with pytest.raises(LoadError, match=msg):
            load_examples(_jsonl(tmp_path / "bad.jsonl", [{"messages": bad, "tools": TOOLS}]))
    with pytest.raises(LoadError, match=r"message 1's \"content\" must be a string, found null"):  # no call: no text
        load_examples(_jsonl(tmp_path / "bad.jsonl", [{"messages": [MESSAGES[1], {"role": "assistant", "content": None}]}]))


def test_a_rows_chat_template_kwargs_reach_every_rendering_as_trl_passes_them(chat_root, tmp_path):
    """A conversational line's ``chat_template_kwargs`` (TRL's column: its SFTTrainer renders every row with
    ``apply_chat_template(messages, tools=..., **row["chat_template_kwargs"])``, e.g. Qwen 3's ``{"enable_thinking":
    false}``) were ignored: the conversation was rendered without them, another prompt than TRL's (here without the
    empty <think></think> block), with no word. Every rendering of the row (the whole, the prefixes that find the
    assistant turns, a prompt and its completion) now takes them, with the tools: text, tokens and targets equal
    ``apply_chat_template(..., tools=..., enable_thinking=False)``'s, token by token. ``null`` is none; a value that is
    not an object, or one setting apply_chat_template's own arguments, is refused by file and line, also for a row
    built in Python; beside a text line they are warned about."""
    from jpeft.data import load_examples, render_chat
    from jpeft.errors import LoadError
    from jpeft.models import load_tokenizer

    folder, ref = _chat_folder("switch", chat_root)
    tok = load_tokenizer(folder)
    encode, bos, eos = text_encoder(tok)
    off = {"enable_thinking": False}
    rows = [{"messages": MESSAGES, "chat_template_kwargs": off},
            {"prompt": MESSAGES[:2], "completion": MESSAGES[2:3], "chat_template_kwargs": off, "tools": TOOLS},
            {"messages": MESSAGES, "chat_template_kwargs": None}]
    path = _jsonl(tmp_path / "kw.jsonl", rows)
    rendered = render_chat(load_examples(path), tok)
    docs = tokenize_documents(rendered, encode, eos_id=eos, bos_id=bos)
    text = ref.apply_chat_template(MESSAGES, tokenize=False, **off)
    assert "<think>" in text and text != ref.apply_chat_template(MESSAGES, tokenize=False)
    assert rendered[0]["chat"] == text
    ids, mask = docs[0]
    assert ids.tolist() == ref.apply_chat_template(MESSAGES, tokenize=True, return_dict=True, **off)["input_ids"]
    spans = [(len(ref.apply_chat_template(MESSAGES[:i], tokenize=False, add_generation_prompt=True, **off)),
              len(ref.apply_chat_template(MESSAGES[:i + 1], tokenize=False, **off)))
             for i, m in enumerate(MESSAGES) if m["role"] == "assistant"]
    offsets = ref(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert mask.tolist() == [any(a < e and b > s for s, e in spans) for a, b in offsets]
    # the replies are trained, the empty thinking block before each is the prompt's (as the generation prompt writes it)
    assert [ref.decode(ids[s:e].tolist()) for s, e in _runs(mask)] == [m["content"] + "<|im_end|>\n" for m in MESSAGES
                                                                       if m["role"] == "assistant"]
    # TRL's conversational prompt/completion, with the tools as well
    full = ref.apply_chat_template(MESSAGES[:3], tools=TOOLS, tokenize=True, return_dict=True, **off)["input_ids"]
    prompt = ref.apply_chat_template(MESSAGES[:2], tools=TOOLS, tokenize=True, return_dict=True,
                                     add_generation_prompt=True, **off)["input_ids"]
    assert ref.decode(prompt).endswith("<think>\n\n</think>\n\n") and '"get_capital"' in ref.decode(prompt)
    n = len(prompt)
    assert docs[1][0].tolist() == full and docs[1][1].tolist() == [False] * n + [True] * (len(full) - n)
    assert rendered[2]["chat"] == ref.apply_chat_template(MESSAGES, tokenize=False)  # null: none
    # so does PackedDataset.from_file (jpeft train and jpeft eval's reading)
    ds = PackedDataset.from_file(path, encode, 1024, eos_id=eos, bos_id=bos, tokenizer=tok)
    assert ds.input_ids[0][ds.segment_ids[0] == 1].tolist() == docs[0][0].tolist()
    for bad, want in (("enable_thinking", r"bad.jsonl:2: the 'chat_template_kwargs' field must be an object .*found str"),
                      ([off], r"bad.jsonl:2: the 'chat_template_kwargs' field must be an object .*found list"),
                      ({"add_generation_prompt": True, "tools": TOOLS, "x": 1},
                       r"bad.jsonl:2: the 'chat_template_kwargs' field sets \['add_generation_prompt', 'tools'\]")):
        with pytest.raises(LoadError, match=want):
            load_examples(_jsonl(tmp_path / "bad.jsonl", [rows[0], {"messages": MESSAGES, "chat_template_kwargs": bad}]))
    with pytest.raises(LoadError, match=r"example 0: the 'chat_template_kwargs' field sets \['tokenize'\]"):
        render_chat([{"messages": MESSAGES, "chat_template_kwargs": {"tokenize": True}}], tok)
    with pytest.warns(UserWarning, match=r"text.jsonl:1: 1 line\(s\) \(1\) hold a 'tools' or 'chat_template_kwargs' "
                                         r"field next to a 'text'"):
        load_examples(_jsonl(tmp_path / "text.jsonl", [{"text": "Paris.", "chat_template_kwargs": off}]))


def test_conversations_pack_and_cut_like_the_other_rows_and_chat_loss_all_trains_every_token(chat_root, tmp_path):
    """Rendered conversations go through the same packing as text and pairs: by documents (a
    conversation longer than seq_len cut into chunks, each chunk's first token no target) and as a
    stream; ``chat_loss="all"`` trains every token but each conversation's first."""
    import numpy as np

    from jpeft.data import load_examples, render_chat

    _, ref = _chat_folder("qwen", chat_root)
    encode, bos, eos = text_encoder(ref)
    path = _jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CHATS] + [{"text": "Blue."}])
    docs = tokenize_documents(render_chat(load_examples(path), ref), encode, eos_id=eos, bos_id=bos)
    with pytest.warns(UserWarning, match="first target token comes after the first 16 tokens"):  # the reply's context cut
        ds = PackedDataset.from_file(path, encode, 16, eos_id=eos, bos_id=bos, tokenizer=ref)
    got = [(ds.input_ids[r][ds.segment_ids[r] == s], ds.loss_mask[r][ds.segment_ids[r] == s])
           for r in range(len(ds)) for s in range(1, ds.segment_ids[r].max() + 1)]
    chunks = [(ids[i:i + 16], np.r_[False, mask[i + 1:i + 16]]) for ids, mask in docs for i in range(0, len(ids), 16)]
    assert len(got) == len(chunks) > 6
    for (a, m), (b, n) in zip(got, chunks):
        assert a.tolist() == b.tolist() and m.tolist() == n.tolist()
    stream = PackedDataset.from_file(path, encode, 16, eos_id=eos, bos_id=bos, tokenizer=ref, packing="stream")
    flat = np.concatenate([d[0] for d in docs])
    assert stream.input_ids.ravel().tolist() == flat[:stream.input_ids.size].tolist()
    every = tokenize_documents(render_chat(load_examples(path), ref, chat_loss="all"), encode, eos_id=eos, bos_id=bos)
    for (ids, mask), chat in zip(every, CHATS):
        assert ids.tolist() == ref.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
        assert mask.tolist() == [False] + [True] * (len(ids) - 1)


def test_conversations_that_cannot_be_rendered_or_trained_are_refused_by_file_and_line(chat_root, tmp_path, monkeypatch):
    """Named errors with the file and line: no chat template in the model folder, a role the template
    refuses (its raise_exception message passed on), content that is not a string, an empty list, a
    conversation opening with an assistant turn, a template that is not prefix-stable (with the
    option to train every token, which then works), a missing jinja2 (with its install hint), and
    a conversation without an assistant turn is warned about."""
    import transformers.utils.chat_template_utils as ctu

    from jpeft.data import load_examples, render_chat
    from jpeft.errors import ConfigError, LoadError

    def rows(*rs):
        return load_examples(_jsonl(tmp_path / "d.jsonl", [{"text": "fine"}, *rs]))

    user, reply = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}
    for bad, want in (([], r"d.jsonl:2: the 'messages' field must be a non-empty list .* found an empty list"),
                      ([user, {"role": "assistant", "content": [{"type": "text", "text": "x"}]}],
                       r"d.jsonl:2: the 'messages' field: message 1's \"content\" must be a string, found list"),
                      ([{"from": "human", "value": "hi"}], r"message 0 must be an object with \"role\" and "
                                                          r"\"content\".*ShareGPT")):
        with pytest.raises(LoadError, match=want):
            rows({"messages": bad})
    with pytest.raises(LoadError, match=r"d.jsonl:2: .*found keys \['conversations'\].*messages_field = 'conversations'"):
        rows({"conversations": [user, reply]})
    assert load_examples(_jsonl(tmp_path / "c.jsonl", [{"conversations": [user]}]),
                         messages_field="conversations")[0]["messages"] == [user]

    _, none = _chat_folder("none", chat_root)
    with pytest.raises(LoadError, match=r"d.jsonl:2: a conversation is rendered with the model's chat template, and "
                                        r"the tokenizer has none"):
        render_chat(rows({"messages": [user, reply]}), none)
    _, llama = _chat_folder("llama3", chat_root)
    with pytest.raises(LoadError, match=r"d.jsonl:2: the model's chat template refused this conversation: "
                                        r"TemplateError: Unknown role: tool"):
        render_chat(rows({"messages": [user, {"role": "tool", "content": "42"}, reply]}), llama)
    with pytest.raises(LoadError, match=r"d.jsonl:2: the conversation begins with an assistant turn"):
        render_chat(rows({"messages": [reply, user]}), llama)
    _, thinking = _chat_folder("thinking", chat_root)
    conv = [user, {"role": "assistant", "content": "<think>greet</think>hello"}, user, reply]
    with pytest.raises(LoadError, match=r"d.jsonl:2: the chat template is not prefix-stable: messages\[:2\] does not "
                                        r"render as the beginning of the whole conversation.*chat_loss = \"all\""):
        render_chat(rows({"messages": conv}), thinking)
    assert render_chat(rows({"messages": conv}), thinking, chat_loss="all")[1]["chat"] == thinking.apply_chat_template(
        conv, tokenize=False)
    with pytest.raises(ConfigError, match=r"chat_loss must be one of \['assistant', 'all'\], found 'user'"):
        render_chat(rows(), llama, chat_loss="user")
    with pytest.warns(UserWarning, match=r"d.jsonl:3: 1 conversation\(s\) hold no assistant turn"):
        render_chat(rows({"messages": [user, reply]}, {"messages": [user]}), llama)
    with pytest.warns(UserWarning, match=r"d.jsonl:2: 2 line\(s\) \(2, 3\) hold a 'messages' conversation next to a "
                                         r"'text' field or a 'prompt'/'completion' pair, which is read"):
        got = rows({"messages": [user, reply], "text": "t"}, {"messages": [user, reply], "prompt": "p", "completion": "c"})
    assert got[1:] == [{"text": "t"}, {"prompt": "p", "completion": "c"}]

    ctu._compile_jinja_template.cache_clear()
    monkeypatch.setattr(ctu, "is_jinja_available", lambda: False)
    try:
        with pytest.raises(ConfigError, match=r"needs jinja2 .*pip install 'jinja2>=3.1.6'"):
            render_chat(rows({"messages": [user, reply]}), llama)
    finally:
        monkeypatch.undo()
        ctu._compile_jinja_template.cache_clear()


def test_jpeft_train_and_eval_read_a_messages_file(chat_root, tmp_path, capsys, monkeypatch):
    """`jpeft train` on a ``messages`` JSONL trains (its eval set the same file), and `jpeft eval`
    scores the adapter on the assistant tokens alone: as many target tokens as the assistant turns
    hold in transformers' own tokenization, and the loss the run logged; a bad [data] chat_loss is
    refused before anything loads. A line that cannot be rendered is named before the weights are read,
    by both commands."""
    import json
    import pathlib
    import shutil

    from jpeft.cli import main

    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).parent / "helpers"))
    import tiny_hf

    _, ref = _chat_folder("qwen", chat_root)
    model = tmp_path / "model"
    tiny_hf.llama_folder(model, ref, max_positions=128)  # a random Llama, and the tokenizer with its template
    data = _jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CHATS * 3])
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'model = "{model}"\noutput_dir = "run"\n[data]\ntrain = "{data}"\neval = "{data}"\nseq_len = 128\n'
                   '[method]\nname = "lora"\nr = 2\ntarget_modules = ["q_proj", "v_proj"]\n'
                   '[train]\nsteps = 2\nbatch_size = 2\neval_every = 2\nsave_every = 2\nlog_every = 1\n')
    assert main(["train", "--config", str(cfg), "--no-progress", "--set", "data.chat_loss=user"]) == 2
    assert "data.chat_loss must be \"assistant\"" in capsys.readouterr().err
    # a line the template cannot train is named before the weights are read (here there are none to read)
    bare = tmp_path / "bare"
    shutil.copytree(model, bare, ignore=shutil.ignore_patterns("*.safetensors"))
    bad = _jsonl(tmp_path / "bad.jsonl", [{"messages": c} for c in CHATS] + [{"messages": CHATS[0][-1:]}])
    assert main(["train", "--config", str(cfg), "--no-progress", "--set", f"model={bare}", "--set",
                 f"data.train={bad}", "--set", "output_dir=bad"]) == 2
    err = capsys.readouterr().err
    assert f"bad.jsonl:{len(CHATS) + 1}: the conversation begins with an assistant turn" in err, err
    assert CHATS[0][-1]["role"] == "assistant" and not (tmp_path / "bad").exists()
    # so is it by `jpeft eval` (it was rendered after the model loaded: here, a LoadError about the missing weights)
    assert main(["eval", "--model", str(bare), "--data", str(bad), "--seq-len", "128"]) == 2
    err = capsys.readouterr().err
    assert f"bad.jsonl:{len(CHATS) + 1}: the conversation begins with an assistant turn" in err, err
    assert main(["train", "--config", str(cfg), "--no-progress"]) == 0, capsys.readouterr().err
    recs = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    capsys.readouterr()
    assert main(["eval", "--model", str(model), "--adapter", str(tmp_path / "run"), "--data", str(data),
                 "--seq-len", "128", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    want = 0
    for chat in CHATS * 3:
        text = ref.apply_chat_template(chat, tokenize=False)
        spans = [(len(ref.apply_chat_template(chat[:i], tokenize=False, add_generation_prompt=True)),
                  len(ref.apply_chat_template(chat[:i + 1], tokenize=False)))
                 for i, m in enumerate(chat) if m["role"] == "assistant"]
        offsets = ref(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        want += sum(any(a < e and b > s for s, e in spans) for a, b in offsets)
    assert res["tokens"] == want == [r["eval_tokens"] for r in recs if "eval_tokens" in r][-1]
    assert res["loss"] == pytest.approx([r["eval_loss"] for r in recs if "eval_loss" in r][-1], rel=1e-5)
