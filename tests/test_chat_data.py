"""Instruction and chat data against transformers' own tokenization: the rows jpeft packs from
a chat template's output equal ``apply_chat_template(..., tokenize=True)``, the tokens trained
in a prompt/completion line cut at an assistant turn are the ones the template marks with
``{% generation %}`` (``return_assistant_tokens_mask``), and a tokenizer's front token is the
one ``tokenizer(text)`` puts there. Tokenizers are built here with the tokenizers library."""

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
    with pytest.warns(UserWarning, match=r"in 2 prompt/completion document\(s\) the completion runs past the first 8 "
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
