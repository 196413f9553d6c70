"""Packed sequences with document boundaries: ``jpeft.data`` packs whole documents with segment
ids and per-document positions, and jpeft's models then attend block-diagonally, so a packed
row's per-document losses and adapter gradients equal each document run alone (with either
attention kernel), and no token depends on another document."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
import jpeft.models
from jpeft.data import PackedDataset, causal_lm_loss, model_inputs, pack_documents, tokenize_documents


def _docs():
    rng = np.random.default_rng(0)
    lens = [5, 3, 4, 7]
    return [(rng.integers(3, 60, n).astype(np.int32), rng.random(n) > 0.2) for n in lens]


def test_pack_documents_layout():
    docs = _docs()
    ids, mask, seg, pos = pack_documents(docs, 9)
    # rows: [5 + 3], [4], [7] (4 + 7 > 9 would split a document across rows)
    assert ids.shape == (3, 9)
    np.testing.assert_array_equal(seg, [[1] * 5 + [2] * 3 + [0], [1] * 4 + [0] * 5, [1] * 7 + [0] * 2])
    np.testing.assert_array_equal(pos[0], [0, 1, 2, 3, 4, 0, 1, 2, 0])
    np.testing.assert_array_equal(ids[0, 5:8], docs[1][0])
    assert not mask[0, 0] and not mask[0, 5] and not mask[0, 8]  # first tokens and padding carry no loss
    np.testing.assert_array_equal(mask[0, 6:8], docs[1][1][1:])
    # a document longer than a row is cut into row-sized documents
    ids2, _, seg2, _ = pack_documents([(np.arange(10, 21, dtype=np.int32), np.ones(11, bool))], 4)
    np.testing.assert_array_equal(ids2.ravel()[:11], np.arange(10, 21))
    np.testing.assert_array_equal(seg2, [[1] * 4, [1] * 4, [1] * 3 + [0]])


def test_dataset_packings_and_batches():
    ex = [{"text": "abcd"}, {"prompt": "xy", "completion": "zw"}]
    enc = lambda s: [ord(c) for c in s]  # noqa: E731
    docs = PackedDataset.from_examples(ex, enc, 8, eos_id=2, bos_id=1)
    assert [len(d[0]) for d in tokenize_documents(ex, enc, eos_id=2, bos_id=1)] == [6, 6]
    assert len(docs) == 2 and docs.segment_ids is not None
    b = docs.batch(0, 2)
    assert set(b) == {"input_ids", "loss_mask", "segment_ids", "position_ids"}
    kw = model_inputs(b)
    np.testing.assert_array_equal(kw["attention_mask"], b["segment_ids"] > 0)
    (eb,) = list(docs.eval_batches(3))
    assert eb["segment_ids"].shape == (3, 8) and not eb["loss_mask"][2].any()
    stream = PackedDataset.from_examples(ex, enc, 8, eos_id=2, bos_id=1, packing="stream")
    assert stream.segment_ids is None and model_inputs(stream.batch(0, 1)) == {}
    np.testing.assert_array_equal(stream.input_ids[0], [1] + enc("abcd") + [2, 1, ord("x")])
    with pytest.raises(jpeft.InputValidationError, match="packing"):
        PackedDataset.from_examples(ex, enc, 8, packing="greedy")


@functools.lru_cache(maxsize=None)
def _llama(impl):
    cfg = jpeft.models.LlamaConfig(vocab_size=60, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                                   num_kv_heads=2, sliding_window=4, attention=impl, attention_block_size=4)
    return jpeft.models.LlamaForCausalLM(cfg)


def _random_adapter(config, params, model, ids):
    ad = jpeft.init(config, params, jax.random.key(1), model, ids)
    leaves, tdef = jax.tree.flatten(ad)  # every tensor random (no zero LoRA B)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    return jax.tree.unflatten(tdef, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _sum_loss(model, params, ad, ids, mask, **kw):
    loss, n = causal_lm_loss(jpeft.apply(model, params, ad, ids, **kw), ids, mask)
    return loss * n


@pytest.mark.parametrize("impl,method", [("blockwise", "lora"), ("reference", "prefix")])
def test_packed_losses_and_grads_equal_documents_alone(impl, method):
    model = _llama(impl)
    docs = _docs()[:3]
    ids, mask, seg, pos = pack_documents(docs, 13)  # one row: 5 + 3 + 4 tokens and one pad
    assert ids.shape == (1, 13)
    params = model.init(jax.random.key(0), jnp.asarray(ids))
    cfg = (jpeft.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]) if method == "lora"
           else jpeft.PrefixTuningConfig(num_virtual_tokens=2))
    ad = _random_adapter(cfg, params, model, jnp.asarray(ids))
    batch = {"input_ids": ids, "loss_mask": mask, "segment_ids": seg, "position_ids": pos}
    kw = {k: jnp.asarray(v) for k, v in model_inputs(batch).items()}
    ids_j = jnp.asarray(ids)
    # without explicit position_ids the positions restart per document too (prefix tuning shifts them)
    no_pos = {k: v for k, v in kw.items() if k != "position_ids"}
    np.testing.assert_allclose(np.asarray(jpeft.apply(model, params, ad, ids_j, **no_pos)),
                               np.asarray(jpeft.apply(model, params, ad, ids_j, **kw)), rtol=1e-6, atol=1e-6)

    # jitted (one program each) rather than run op by op: the same numbers in a fraction of the time
    packed = jax.jit(jax.value_and_grad(  # the packed row's loss on one document's targets only
        lambda ad, doc_mask: _sum_loss(model, params, ad, ids_j, doc_mask, **kw)))
    alone = jax.jit(jax.value_and_grad(lambda ad, doc_ids, doc_mask: _sum_loss(model, params, ad, doc_ids, doc_mask)))

    for d, (dids, dmask) in enumerate(docs):
        alone_mask = dmask.copy()
        alone_mask[0] = False
        la, ga = alone(ad, jnp.asarray(dids[None]), jnp.asarray(alone_mask[None]))
        lp, gp = packed(ad, jnp.asarray(mask & (seg == d + 1)))
        np.testing.assert_allclose(float(lp), float(la), rtol=1e-5, atol=1e-5)
        jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6),
                     gp, ga)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_no_token_depends_on_another_document(family):
    """The Jacobian of each document's logits with respect to another document's input
    embeddings is exactly zero (so the attention weights across documents are zero)."""
    if family == "llama":
        model = _llama("blockwise")
    else:
        model = jpeft.models.GPT2LMHeadModel(jpeft.models.GPT2Config(
            vocab_size=60, hidden_size=16, num_layers=2, num_heads=2, max_position_embeddings=16, attention_block_size=3))
    ids, _, seg, pos = pack_documents(_docs()[:3], 13)
    params = model.init(jax.random.key(0), jnp.asarray(ids))
    emb = jax.random.normal(jax.random.key(5), ids.shape + (model.config.hidden_size,))
    kw = {"attention_mask": jnp.asarray(seg > 0), "segment_ids": jnp.asarray(seg), "position_ids": jnp.asarray(pos)}
    jac = jax.jacobian(lambda e: model.apply(params, inputs_embeds=e, **kw).sum(-1))(emb)  # [1, q, 1, k, hidden]
    dep = np.abs(np.asarray(jac)[0, :, 0]).sum(-1) > 0  # [q, k]: output q depends on input k
    s = seg[0]
    real = s > 0
    same = s[:, None] == s[None, :]
    causal = np.tril(np.ones_like(same))
    assert not dep[np.ix_(real, real)][~same[np.ix_(real, real)]].any()
    assert dep[np.ix_(real, real)][(same & causal)[np.ix_(real, real)]].all()


def test_prompt_tuning_refuses_segments():
    model = _llama("blockwise")
    ids, _, seg, pos = pack_documents(_docs()[:2], 9)
    params = model.init(jax.random.key(0), jnp.asarray(ids))
    ad = jpeft.init(jpeft.PromptTuningConfig(num_virtual_tokens=2), params, jax.random.key(1))
    with pytest.raises(jpeft.InputValidationError, match="stream"):
        jpeft.apply(model, params, ad, jnp.asarray(ids), segment_ids=jnp.asarray(seg))


def test_jsonl_values_must_be_strings(tmp_path):
    """A null, number, list or object in a text field is refused with its line and field, not
    trained on as its Python text ("None", "['a', 'b']")."""
    from jpeft.data import load_examples
    from jpeft.errors import LoadError

    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "abc"}\n{"prompt": "Q", "completion": "A"}\n')
    assert load_examples(good) == [{"text": "abc"}, {"prompt": "Q", "completion": "A"}]
    cases = [('{"text": null}', r"bad.jsonl:2: the 'text' field must be a string, found null"),
             ('{"prompt": "Q", "completion": null}', r"bad.jsonl:2: the 'completion' field must be a string, found null"),
             ('{"text": ["a", "b"]}', r"bad.jsonl:2: the 'text' field must be a string, found list \[\"a\", \"b\"\]"),
             ('{"text": {"x": 1}}', r"the 'text' field must be a string, found dict"),
             ('{"prompt": 7, "completion": "A"}', r"the 'prompt' field must be a string, found int 7"),
             # past Python's int-conversion limit json.loads raised a bare ValueError, no file or line
             ('{"text": "a", "n": ' + "9" * 5000 + "}", r"bad.jsonl:2: not readable JSON \(Exceeds the limit")]
    for line, want in cases:
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"text": "fine"}\n' + line + "\n")
        with pytest.raises(LoadError, match=want):
            load_examples(bad)


def test_trls_conversational_prompt_completion_is_read_as_a_conversation(tmp_path):
    """TRL's conversational prompt-completion rows (``prompt`` and ``completion`` lists of
    role/content messages) were refused ("render it with the tokenizer's chat template"); they are
    read as message lists, with their file and line, for ``render_chat`` (tests/test_chat_data.py),
    and a row with one list and one string is refused by its line."""
    from jpeft.data import load_examples
    from jpeft.errors import LoadError

    conv = tmp_path / "conv.jsonl"
    prompt, completion = [{"role": "user", "content": "2+2?"}], [{"role": "assistant", "content": "4"}]
    conv.write_text(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    assert load_examples(conv) == [{"prompt": prompt, "completion": completion, "where": f"{conv}:1"}]
    conv.write_text(json.dumps({"prompt": prompt, "completion": "4"}) + "\n")
    with pytest.raises(LoadError, match=r"conv.jsonl:1: the 'completion' field must be a non-empty list of .* found str"):
        load_examples(conv)


def test_the_same_key_for_prompt_and_completion_is_refused(tmp_path):
    """``completion_field = "prompt"`` trained every line on its prompt twice, the second copy as
    the completion, without a word."""
    from jpeft.data import load_examples
    from jpeft.errors import ConfigError

    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "Q", "completion": "A"}) + "\n")
    with pytest.raises(ConfigError, match="prompt_field and completion_field are both 'prompt'"):
        load_examples(f, completion_field="prompt")


def test_a_lone_surrogate_escape_is_refused_with_its_line(tmp_path):
    """JSON reads "\\ud800" (an escape without its pair) into a str no tokenizer takes (a TypeError
    from deep inside tokenizers, no line); it is refused with its line and field. A full pair is
    one character and is read."""
    from jpeft.data import load_examples
    from jpeft.errors import LoadError

    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "ok \\ud83d\\ude00"}\n{"prompt": "Q", "completion": "x \\ud800 y"}\n')
    with pytest.raises(LoadError, match=r"d.jsonl:2: the 'completion' field holds a lone surrogate '\\ud800' at "
                                        r"character 2"):
        load_examples(f)
    f.write_text('{"text": "ok \\ud83d\\ude00"}\n')
    assert load_examples(f) == [{"text": "ok \U0001F600"}]
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(LoadError, match="dir.jsonl' is a directory"):  # it said "does not exist"
        load_examples(tmp_path / "dir.jsonl")


def test_prompt_and_completion_are_tokenized_as_one_text_as_trl_does():
    """Encoded apart, a SentencePiece-style tokenizer (Metaspace, Llama 2 / Mistral) started the
    completion with a word-boundary mark the text does not have ('A:' + 'Paris.' trained on
    '▁Paris'); the pair is encoded as one text and the tokens it shares with encode(prompt) are the
    prompt's, as TRL does. A token spanning the boundary gets a warning and is a target."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(["<unk>", "▁A:", "▁A", ":", "Paris", "▁Paris", ".", "▁is", "is", "▁", "A:Paris"])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="<unk>", continuing_subword_prefix=""))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)

    def enc(s):
        return tok.encode(s, add_special_tokens=False).ids

    assert enc("Paris.") == [vocab["▁Paris"], vocab["."]]  # alone, the completion gets the mark
    (ids, mask), = tokenize_documents([{"prompt": "A:", "completion": "Paris."}], enc, eos_id=99, bos_id=98)
    joint = enc("A:Paris.")
    assert ids.tolist() == [98, *joint, 99]
    n_prompt = len(enc("A:"))
    assert mask.tolist() == [False] * (1 + n_prompt) + [True] * (len(joint) - n_prompt + 1)
    assert vocab["▁Paris"] not in ids.tolist()
    # a tokenizer whose joint tokens do not begin with the prompt's: warned, the token spanning the boundary trained
    merge = lambda s: [7] if s == "ab" else [ord(c) for c in s]  # noqa: E731
    with pytest.warns(UserWarning, match="1 prompt/completion example"):
        (ids2, mask2), = tokenize_documents([{"prompt": "a", "completion": "b"}], merge)
    assert ids2.tolist() == [7] and mask2.tolist() == [True]


def test_a_completion_merged_into_the_prompts_last_token_is_trained_as_trl_does():
    """A prompt ending in a space ("Answer: " + "4") is tokenized by a byte-level BPE as Answer, :,
    Ġ4: the answer is one token spanning the boundary. jpeft masked the first len(tokens(prompt))
    = 3 joint tokens, so the answer was never a target and only the EOS carried loss; TRL's
    SFTTrainer masks the tokens the joint and prompt tokenizations share (common_prefix_length)
    and trains on Ġ4, and so does jpeft now (labels compared with that rule on the transformers
    tokenizer's own output)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from jpeft.data import text_encoder

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["Answer: 4", "Answer: 42", "Q: Paris?"] * 5, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    enc, bos, eos = text_encoder(fast)
    examples = [{"prompt": "Answer: ", "completion": "4"}, {"prompt": "Q:", "completion": " Paris?"}]
    with pytest.warns(UserWarning, match="in 1 prompt/completion example"):
        docs = tokenize_documents(examples, enc, eos_id=eos, bos_id=bos)
    for ex, (ids, mask) in zip(examples, docs):
        p = fast(ex["prompt"])["input_ids"]
        joint = fast(ex["prompt"] + ex["completion"])["input_ids"] + [fast.eos_token_id]
        shared = next(i for i, (a, b) in enumerate(zip(p + [None], joint)) if a != b)  # TRL's common_prefix_length
        assert ids.tolist() == joint
        assert mask.tolist() == [False] * shared + [True] * (len(joint) - shared)
    ids, mask = docs[0]
    assert fast.convert_ids_to_tokens(ids[mask].tolist()) == ["Ġ4", "</s>"]  # the answer and the EOS; was the EOS alone


def test_a_text_with_its_own_bos_or_eos_gets_no_second_one():
    """Chat-template output or a completion ending in "</s>" already holds the BOS / EOS: it is
    not doubled (a second EOS would be trained as following the first), as TRL appends the EOS
    only where it is missing; the text's own BOS is never a target."""
    enc = lambda s: [1 if c == "^" else 2 if c == "$" else ord(c) for c in s]  # noqa: E731
    docs = tokenize_documents([{"text": "^ab$"}, {"prompt": "^x", "completion": "y$"}, {"text": "ab"}], enc,
                              eos_id=2, bos_id=1)
    assert [d[0].tolist() for d in docs] == [[1, 97, 98, 2], [1, 120, 121, 2], [1, 97, 98, 2]]
    assert [d[1].astype(int).tolist() for d in docs] == [[0, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]]
    # one id for both (GPT-2's <|endoftext|>): an empty text is still [bos, eos]
    assert tokenize_documents([{"text": ""}], enc, eos_id=5, bos_id=5)[0][0].tolist() == [5, 5]


def test_the_bos_is_put_in_front_only_where_the_tokenizer_puts_it():
    """A tokenizer that names a BOS but does not add it (a Llama tokenizer saved with
    add_bos_token=False; GPT-2's <|endoftext|>) got it in front of every document anyway, so the
    rows (and `jpeft eval`'s loss, on one more target) differed from transformers' tokenizer(text)
    + EOS, as TRL's SFTTrainer and `jpeft serve` tokenize; now the rows are exactly those."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from jpeft.data import text_encoder

    def tokenizer(add_bos, bos="<s>"):
        vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "hello", "world", "a"])}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        if add_bos:
            tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token=bos, eos_token="</s>")

    for tok, want_bos in [(tokenizer(True), 1), (tokenizer(False), None), (tokenizer(False, bos="</s>"), None)]:
        enc, bos, eos = text_encoder(tok)
        assert (bos, eos) == (want_bos, 2)
        ds = PackedDataset.from_examples([{"text": "hello world"}], enc, 8, eos_id=eos, bos_id=bos)
        n = len(tok("hello world")["input_ids"]) + 1
        assert ds.input_ids[0, :n].tolist() == tok("hello world")["input_ids"] + [2] and not ds.segment_ids[0, n:].any()


def test_the_bos_probe_takes_a_tokenizer_without_the_letter_a():
    """The BOS probe tokenized "a": a word-level vocabulary of digits and operators without an
    unknown token (whose data tokenize fine) raised the tokenizers library's bare Exception
    ("Missing [UNK] token"), so `jpeft train` stopped on it; the probe falls back to "" there."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from jpeft.data import text_encoder

    vocab = {t: i for i, t in enumerate(["<s>", "</s>", "1", "2", "+", "="])}
    for add_bos, want in ((True, 0), (False, None)):
        tok = Tokenizer(models.WordLevel(vocab))  # no unk_token
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        if add_bos:
            tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
        enc, bos, eos = text_encoder(fast)
        assert (bos, eos) == (want, 1) and enc("1 + 2") == [2, 4, 3]


def test_a_document_longer_than_the_tokenizers_max_length_gets_no_indexing_error_warning():
    """A tokenizer saved with model_max_length (4,096 for Llama 2) made transformers print "Token indices
    sequence length is longer than the specified maximum sequence length for this model (69 > 16).
    Running this sequence through the model will result in indexing errors" for a long document or
    a plain-text file, though jpeft cuts it into rows of seq_len (checked against the model's
    positions); the ids are those of tokenizer(text) all the same."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from jpeft.data import text_encoder

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "</s>": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", model_max_length=4)
    enc, _, _ = text_encoder(fast)
    assert enc("a " * 10) == [1] * 10
    assert "sequence-length-is-longer-than-the-specified-maximum" not in fast.deprecation_warnings  # never warned


def test_a_dataset_without_target_tokens_is_refused():
    """Only prompt tokens (empty completions, no EOS): its loss would read 0 and its perplexity
    1, and training on it would never move the adapter."""
    enc = lambda s: [ord(c) for c in s]  # noqa: E731
    ex = [{"prompt": "abc", "completion": ""}] * 3
    for packing in ("documents", "stream"):
        with pytest.raises(jpeft.InputValidationError, match="no target token"):
            PackedDataset.from_examples(ex, enc, 4, packing=packing)
    assert PackedDataset.from_examples(ex, enc, 4, eos_id=2).num_targets == 3  # the EOS is a target


def test_jsonl_suffixes_in_any_case_are_json_lines(tmp_path):
    """train.JSONL or data.ndjson was read as one plain-text document: the JSON syntax and the
    prompts trained on, silently; a byte-order mark was refused as bad JSON (or trained on)."""
    from jpeft.data import load_examples

    for name in ("a.JSONL", "b.ndjson", "c.Json"):
        p = tmp_path / name
        p.write_text('{"prompt": "Q", "completion": "A"}\n{"text": "t"}\n')
        assert load_examples(p) == [{"prompt": "Q", "completion": "A"}, {"text": "t"}]
    # a UTF-8 byte-order mark (Windows editors write one) is no text and no JSON error
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "t"}\n')
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfplain")
    assert load_examples(tmp_path / "bom.jsonl") == [{"text": "t"}]
    assert load_examples(tmp_path / "bom.txt") == [{"text": "plain"}]


def test_a_json_array_or_an_indented_object_says_the_file_is_read_as_json_lines(tmp_path):
    """A data.json holding one JSON array (or one object written with indent=2) was refused as
    "expected a JSON object, found list" (or "Expecting value"), which does not say why a .json
    file is read line by line nor how to fix it."""
    from jpeft.data import load_examples

    for name, body in (("one_line.json", json.dumps([{"text": "a"}, {"text": "b"}])),
                       ("array.json", json.dumps([{"text": "a"}], indent=1)),
                       ("object.json", json.dumps({"text": "a"}, indent=2))):
        (tmp_path / name).write_text(body)
        with pytest.raises(jpeft.LoadError, match=rf"{name}:1: .*read as JSON Lines, one object per line.*Write one "):
            load_examples(tmp_path / name)
    # a conversation is read (rendered later with the chat template); under another key the error names messages_field
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    assert load_examples(tmp_path / "chat.jsonl")[0]["messages"] == [{"role": "user", "content": "hi"}]
    (tmp_path / "chat.jsonl").write_text(json.dumps({"conversations": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(jpeft.LoadError, match=r"found keys \['conversations'\]\. A conversation is read from the "
                                              r"'messages' field: name yours with messages_field = 'conversations'"):
        load_examples(tmp_path / "chat.jsonl")


def test_a_non_utf8_byte_is_located_in_the_file(tmp_path):
    """The offset came from the decoder's 8 KiB chunk: 7361 for a byte at 56513."""
    from jpeft.data import load_examples
    from jpeft.errors import LoadError

    good = ('{"text": "' + "a" * 100 + '"}\n') * 500
    (tmp_path / "late.jsonl").write_bytes(good.encode() + b'{"text": "caf\xe9"}\n')
    with pytest.raises(LoadError, match=f"at byte {len(good) + 13}, line 501"):
        load_examples(tmp_path / "late.jsonl")


def test_batch_arguments_are_checked():
    ds = PackedDataset.from_examples([{"text": "abcdefgh"}], lambda s: [ord(c) for c in s], 4)
    for kw in ({"seed": -1}, {"step": -1}, {"batch_size": 0}):
        args = {"step": 0, "batch_size": 2, "seed": 0, **kw}
        with pytest.raises(jpeft.InputValidationError, match=f"{next(iter(kw))} must be an integer"):
            ds.batch(**args)
    with pytest.raises(jpeft.InputValidationError, match="batch_size must be an integer >= 1"):
        list(ds.eval_batches(0))


def test_a_stream_that_drops_much_of_its_data_says_so():
    """511 tokens at seq_len 256: one row, half of the targets dropped without a word."""
    enc = lambda s: [ord(c) for c in s]  # noqa: E731
    with pytest.warns(UserWarning, match="dropped the last 255 tokens of the stream \\(255 of its 510 target"):
        ds = PackedDataset.from_examples([{"text": "x" * 509}], enc, 256, eos_id=2, bos_id=1, packing="stream")
    assert len(ds) == 1 and ds.num_targets == 255


def test_a_prompt_longer_than_a_row_is_warned_about():
    """Packed by documents, a prompt/completion pair whose prompt is longer than seq_len trains its
    completion in a chunk that holds none of the prompt's start: said, with the number of such
    examples; a long text document (targets from its start) and a fitting prompt are not."""
    import warnings

    enc = lambda s: [ord(c) for c in s]  # noqa: E731
    long = [{"prompt": "p" * 12, "completion": "abc"}, {"prompt": "q", "completion": "d"}]
    with pytest.warns(UserWarning, match=r"in 1 document\(s\) the first target token comes after the first 8 tokens"):
        PackedDataset.from_examples(long, enc, 8, eos_id=2)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        PackedDataset.from_examples([{"text": "x" * 30}, {"prompt": "p" * 5, "completion": "abcdefgh"}], enc, 8, eos_id=2)
    # the fitting prompt's completion runs past the row: that is said (tests/test_chat_data.py), nothing else
    assert [str(w.message).split(":")[0] for w in said] == [
        "in 1 prompt/completion (or conversation) document(s) the completion runs past the first 8 tokens"]


def test_from_file_names_its_file_in_packing_warnings_and_errors(tmp_path):
    """``PackedDataset.from_file`` said "in 1 document(s) ..." or "no target token" without naming the
    file (only ``jpeft train`` added it); ``source`` now begins them, and from_file gives its path."""
    import warnings

    enc = lambda s: [ord(c) for c in s]  # noqa: E731
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "p" * 12, "completion": "abc"}) + "\n")
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        ds = PackedDataset.from_file(long, enc, 8, eos_id=2)
    assert [str(w.message).split(": in ")[0] for w in said] == [str(long)]  # one warning, once
    assert ds.num_targets == 4
    empty = tmp_path / "prompts.jsonl"
    empty.write_text(json.dumps({"prompt": "abc", "completion": ""}) + "\n")
    with pytest.raises(jpeft.InputValidationError, match=f"^{empty}: the dataset has no target token"):
        PackedDataset.from_file(empty, enc, 4)
    with pytest.raises(jpeft.InputValidationError, match="^data.eval: the dataset has no target token"):
        PackedDataset.from_examples([{"prompt": "abc", "completion": ""}], enc, 4, source="data.eval")


def test_jsonl_lines_with_both_kinds_or_an_empty_field_are_said_with_their_lines(tmp_path):
    """A line with a "text" next to "prompt"/"completion" was read as one of them and the other
    dropped, and an empty "text" or "completion" was trained (as "end at once"), both without a
    word; each is now a warning naming the file and the lines. Other keys (an id, a source) are
    metadata, read past without a word."""
    import warnings

    from jpeft.data import load_examples

    f = tmp_path / "d.jsonl"
    rows = [{"text": "fine", "id": 1, "source": "web"}, {"text": ""}, {"prompt": "Q", "completion": " \n"},
            {"text": "T", "prompt": "Q", "completion": "A"}, {"text": "T2", "prompt": "Q"}, {"prompt": "P", "completion": ""}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        got = load_examples(f)
    assert got == [{"text": "fine"}, {"text": ""}, {"prompt": "Q", "completion": " \n"}, {"prompt": "Q", "completion": "A"},
                   {"text": "T2"}, {"prompt": "P", "completion": ""}]
    msgs = sorted(str(w.message) for w in said)
    assert len(msgs) == 3 and all(w.filename == __file__ for w in said), msgs  # pointed at the caller
    assert msgs[0].startswith(f"{f}:2: the 'text' field is empty or only whitespace in 1 line(s) (2); each trains")
    assert msgs[1].startswith(f"{f}:3: the 'completion' field is empty or only whitespace in 2 line(s) (3, 6); each "
                              "trains the model to end (the EOS) right after its prompt")
    assert msgs[2].startswith(f"{f}:4: 2 line(s) (4, 5) hold a 'text' field next to a 'prompt' or 'completion' field")
    f.write_text("".join(json.dumps(r) + "\n" for r in rows[:1]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_examples(f) == [{"text": "fine"}]


def test_pairs_without_an_eos_token_are_said():
    """A tokenizer that names no EOS: prompt/completion pairs were packed with no end marker (a
    model trained on them never learns to stop), without a word; texts alone are not warned about,
    nor pairs with an EOS."""
    import warnings

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from jpeft.data import text_encoder

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "a": 2, "b": 3}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    pairs = [{"prompt": "a ", "completion": "b b"}, {"text": "a b"}, {"prompt": "a ", "completion": "b"}]
    for eos_token, warned in ((None, True), ("</s>", False)):
        enc, bos, eos = text_encoder(PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token=eos_token))
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            ds = PackedDataset.from_examples(pairs, enc, 8, eos_id=eos, bos_id=bos, source="data.train")
            PackedDataset.from_examples(pairs[1:2], enc, 8, eos_id=eos, bos_id=bos)
        assert [str(w.message)[:85] for w in said] == (
            ["data.train: no EOS token (eos_id=None; the tokenizer names none): the 2 prompt/completion pair(s)"[:85]]
            if warned else [])
        assert ds.input_ids[0].tolist() == ([2, 3, 3, 2, 3, 2, 3, 0] if warned else [2, 3, 3, 1, 2, 3, 1, 0])
