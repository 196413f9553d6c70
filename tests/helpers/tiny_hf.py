"""Tiny local Hugging Face folders for the CLI and docs tests (tests/test_new_user.py,
tests/test_docs.py): a byte-level BPE tokenizer trained here on Python's documentation
topics, a tiny random Llama saved with it, and JSONL text from the same topics. Nothing
is downloaded."""

from __future__ import annotations

import json
import os


def tokenizer(vocab_size: int = 300, bos_in_front: bool = False):
    """A ``vocab_size``-token byte-level BPE ``PreTrainedTokenizerFast`` with ``<s>`` / ``</s>``;
    ``bos_in_front``: its call puts ``<s>`` in front of every text, as Llama's does."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    keys = sorted(topics)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([topics[k] for k in keys[:20]], trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos_in_front:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def llama_folder(path, tok, *, max_positions: int = 64) -> str:
    """Saves a random one-layer Llama (width 16) and ``tok`` to ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=max_positions,
                                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def jsonl(path, first: int, n: int, chars: int = 200) -> str:
    """``n`` lines ``{"text": ...}`` of documentation topics, starting at topic ``first``."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    with open(path, "w") as f:
        for k in keys[first:first + n]:
            f.write(json.dumps({"text": topics[k][:chars]}) + "\n")
    return os.fspath(path)
