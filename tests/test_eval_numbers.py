"""``jpeft eval``'s numbers against transformers + peft, document by document: which tokens
count (the BOS and the first token of each document or chunk do not, the EOS does, prompt
tokens do not), documents longer than ``--seq-len`` (scored in chunks), a last batch padded
with empty rows, ``--max-batches`` that selects no target (refused, not a loss of 0), and a
perplexity past ``exp(50)``."""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "helpers"))
import tiny_hf  # noqa: E402
from test_cli import jpeft_here  # noqa: E402

SEQ = 32


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny random Llama whose tokenizer puts a BOS in front of a text (as Llama's does), a
    PEFT LoRA of it with every tensor random, a JSONL of texts (two longer than SEQ) and
    prompt/completion pairs, and a JSONL whose first rows hold only prompt tokens."""
    import torch
    from peft import LoraConfig, get_peft_model
    from pydoc_data.topics import topics
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("e2")
    keys = sorted(topics)
    fast = tiny_hf.tokenizer(vocab_size=120, bos_in_front=True)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id)
    g = torch.Generator().manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g) if "norm" in n else 0.15 * torch.randn(p.shape, generator=g))
    model.save_pretrained(root / "m")
    fast.save_pretrained(root / "m")
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(root / "lora")
    lengths = [5, 140, 23, 60, 2, 90, 37, 11, 75]  # characters; 140 and 90 make documents longer than SEQ
    lines = [{"prompt": f"Q {k}:\n", "completion": topics[k][:n]} if i % 3 == 2 else {"text": topics[k][:n]}
             for i, (k, n) in enumerate(zip(keys[40:], lengths))]
    (root / "d.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (root / "long.jsonl").write_text("".join(json.dumps({"prompt": topics[k][:300], "completion": " yes"}) + "\n"
                                             for k in keys[:3]))
    return root, lines


def _documents(tok, lines):
    """Each line as transformers tokenizes it (``tok(text)`` adds the BOS) with the EOS appended,
    and its target mask: every token after the first, the prompt's tokens left out."""
    out = []
    for x in lines:
        if "text" in x:
            ids = tok(x["text"])["input_ids"]
            mask = [False] + [True] * (len(ids) - 1)
        else:
            prompt = tok(x["prompt"])["input_ids"]
            ids = tok(x["prompt"] + x["completion"])["input_ids"]
            assert ids[:len(prompt)] == prompt  # the prompts end at a token boundary
            mask = [False] * len(prompt) + [True] * (len(ids) - len(prompt))
        out.append((ids + [tok.eos_token_id], mask + [True]))
    return out


def _reference(model, pieces):
    """Summed next-token NLL of ``pieces`` (``(ids, mask)``), each run alone by transformers,
    and the number of targets (position 0 of a piece is never predicted)."""
    import torch

    total, n = 0.0, 0
    for ids, mask in pieces:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -len(ids):].double()
        nll = -torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        w = torch.tensor(mask[1:], dtype=torch.float64)
        total, n = total + float((nll * w).sum()), n + int(w.sum())
    return total, n


def _peft_model(root):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(root / "m")
    return tok, PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "m"), root / "lora").eval()


def test_eval_equals_transformers_document_by_document(folder, capsys):
    """Packed by documents, the loss is each document's run alone in transformers + peft (a
    document longer than --seq-len: each chunk of it), over all rows in batches of 3 rows, which
    do not divide them."""
    root, lines = folder
    tok, peft_model = _peft_model(root)
    docs = _documents(tok, lines)
    assert max(len(ids) for ids, _ in docs) > SEQ
    chunks = [(ids[i:i + SEQ], mask[i:i + SEQ]) for ids, mask in docs for i in range(0, len(ids), SEQ)]
    total, n = _reference(peft_model, chunks)
    r = jpeft_here(capsys, "eval", "--model", root / "m", "--adapter", root / "lora", "--data", root / "d.jsonl",
                   "--seq-len", SEQ, "--batch-size", 3, "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["tokens"] == n
    np.testing.assert_allclose(got["loss"], total / n, rtol=1e-5)
    np.testing.assert_allclose(got["perplexity"], math.exp(total / n), rtol=1e-5)


def test_stream_eval_of_the_first_batches_equals_transformers(folder, capsys, tmp_path):
    """--packing stream: the documents joined into one stream cut into rows (attention across
    documents); --max-batches 2 of 2 rows scores the first 4 rows. The BOS the tokenizer puts in
    front of a document is no target; with a tokenizer that puts none (GPT-2's), a text's first
    token is one, predicted from the EOS before it (docs/CLI.md)."""
    from transformers import AutoModelForCausalLM

    root, lines = folder
    tok, peft_model = _peft_model(root)
    docs = _documents(tok, lines)
    plain = tiny_hf.tokenizer(vocab_size=120)  # no BOS in front
    bare = tiny_hf.llama_folder(tmp_path / "bare", plain)
    docs_bare = [(ids, [True] * len(ids) if "text" in x else mask)  # the first text token is a target
                 for x, (ids, mask) in zip(lines, _documents(plain, lines))]
    assert plain("a")["input_ids"] == plain("a", add_special_tokens=False)["input_ids"]
    for model, docs, argv in [(peft_model, docs, ["--model", root / "m", "--adapter", root / "lora"]),
                              (AutoModelForCausalLM.from_pretrained(bare).eval(), docs_bare, ["--model", bare])]:
        ids, mask = sum((d[0] for d in docs), []), sum((d[1] for d in docs), [])
        total, n = _reference(model, [(ids[i:i + SEQ], mask[i:i + SEQ]) for i in range(0, 4 * SEQ, SEQ)])
        r = jpeft_here(capsys, "eval", *argv, "--data", root / "d.jsonl", "--seq-len", SEQ, "--packing", "stream",
                       "--max-batches", 2, "--batch-size", 2, "--json")
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout)
        assert got["tokens"] == n
        np.testing.assert_allclose(got["loss"], total / n, rtol=1e-5)


def test_max_batches_without_a_target_is_refused_not_scored_0(folder, capsys, tmp_path):
    """The first rows of long.jsonl are prompt chunks: --max-batches 1 read loss 0, perplexity 1
    (and a --canary report 0 rows, rise +0); training with such an eval_batches logged it."""
    root, _ = folder
    base = ["eval", "--model", root / "m", "--seq-len", 16, "--batch-size", 2]
    r = jpeft_here(capsys, *base, "--data", root / "long.jsonl", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["tokens"] > 0
    for what in ("--data", "--canary"):
        extra = ["--adapter", root / "lora"] if what == "--canary" else []
        r = jpeft_here(capsys, *base, *extra, what, root / "long.jsonl", "--max-batches", 1)
        assert r.returncode == 2 and r.stdout == ""
        line = r.stderr.strip().splitlines()[-1]  # after the warning of prompts longer than --seq-len
        assert line.startswith("jpeft eval: error: ") and "ConfigError: --max-batches=1 scores the first 2 packed row(s)" in line and "no target token" in line

    cfg = tmp_path / "c.toml"
    cfg.write_text(f'model = "{root / "m"}"\noutput_dir = "{tmp_path / "run"}"\n[data]\ntrain = "{root / "d.jsonl"}"\n'
                   f'eval = "{root / "long.jsonl"}"\nseq_len = 16\n[method]\nname = "lora"\n'
                   '[train]\nsteps = 2\nbatch_size = 2\neval_batches = 1\n')
    r = jpeft_here(capsys, "train", "--config", cfg, "--no-progress")
    assert r.returncode == 2 and "ConfigError: train.eval_batches=1 scores the first 2" in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()  # refused before anything was trained or written


def _scaled_head(folder, out, scale: float):
    """The fixture's model with ``lm_head`` times ``scale`` (a diverged model's large losses),
    saved with its tokenizer in ``out``, and the first two lines written to ``out.parent /
    "two.jsonl"``; returns transformers' ``(summed loss, target tokens)`` over them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, lines = folder
    model = AutoModelForCausalLM.from_pretrained(root / "m")
    model.lm_head.weight.data *= scale
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(root / "m").save_pretrained(out)
    docs = _documents(AutoTokenizer.from_pretrained(root / "m"), lines[:2])
    (out.parent / "two.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines[:2]))
    return _reference(model.eval(), [(ids[i:i + SEQ], mask[i:i + SEQ]) for ids, mask in docs
                                     for i in range(0, len(ids), SEQ)])


def test_perplexity_past_50_nats_is_exp_of_the_loss(folder, capsys, tmp_path):
    """A model whose loss is above 50 nats per token (a diverged run): the perplexity was
    reported as exp(50) = 5.2e21 whatever the loss."""
    total, n = _scaled_head(folder, tmp_path / "big", 25.0)
    assert 50 < total / n < 700
    r = jpeft_here(capsys, "eval", "--model", tmp_path / "big", "--data", tmp_path / "two.jsonl", "--seq-len", SEQ,
                   "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["tokens"] == n
    np.testing.assert_allclose(got["loss"], total / n, rtol=1e-5)
    np.testing.assert_allclose(got["perplexity"], math.exp(total / n), rtol=1e-4)
    r = jpeft_here(capsys, "eval", "--model", tmp_path / "big", "--data", tmp_path / "two.jsonl", "--seq-len", SEQ)
    assert r.stdout.strip() == f"loss {got['loss']:.4f}  perplexity {got['perplexity']:.6g}  ({n:,} target tokens)"
    assert "e+27" in r.stdout  # not a 28-digit integer


@pytest.mark.parametrize("max_rows", [0, -1, 2.0, True])
def test_eval_batches_refuses_a_max_rows_that_selects_nothing(max_rows):
    """``max_rows=0`` (or negative) yielded no batch, so a loop's mean loss read 0."""
    from jpeft.data import PackedDataset
    from jpeft.errors import InputValidationError

    ds = PackedDataset.from_examples([{"text": "abcdef"}], lambda s: [ord(c) for c in s], 4, eos_id=2)
    assert sum(int(b["loss_mask"][:, 1:].sum()) for b in ds.eval_batches(2, 1)) == 3
    with pytest.raises(InputValidationError, match="max_rows must be None"):
        list(ds.eval_batches(2, max_rows))


def _strict(text: str):
    """``text`` parsed as strict JSON (what jq, JavaScript and Go accept): no bare NaN/Infinity."""
    def refuse(token):
        raise ValueError(f"not strict JSON: {token}")

    return json.loads(text, parse_constant=refuse)


def test_eval_json_of_a_perplexity_past_float_range_is_strict_json(folder, capsys, tmp_path):
    """A loss above ~709 nats: its perplexity is past float range, and ``--json`` wrote the bare
    ``Infinity`` of Python's json, which jq and JavaScript refuse; it is the string
    "Infinity" (the loss itself still the number transformers gives)."""
    total, n = _scaled_head(folder, tmp_path / "huge", 600.0)
    assert total / n > 710
    r = jpeft_here(capsys, "eval", "--model", tmp_path / "huge", "--data", tmp_path / "two.jsonl", "--seq-len", SEQ,
                   "--json")
    assert r.returncode == 0, r.stderr
    got = _strict(r.stdout)
    assert got["tokens"] == n and got["perplexity"] == "Infinity"
    np.testing.assert_allclose(got["loss"], total / n, rtol=1e-4)
    assert float(got["perplexity"]) == math.inf
