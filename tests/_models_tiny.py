"""Tiny randomly initialised transformers models, built once per test process and saved with
``save_pretrained`` (shared by tests/test_models*.py, test_generate.py and test_hf_*.py), and
tiny linen modules several test files share."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile

import flax.linen as nn
import jax
import numpy as np

ROOT = tempfile.mkdtemp(prefix="jpeft_tiny_models_")
atexit.register(shutil.rmtree, ROOT, ignore_errors=True)  # one folder per test process; gone when it exits

VOCAB = 100


class BoxedMLP(nn.Module):
    """Dense ``d`` (its kernel boxed by ``nn.with_partitioning``, so it sits at ``d/kernel/value``),
    relu, Dense ``o``."""
    hidden: int
    out: int

    @nn.compact
    def __call__(self, x):
        init = nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model"))
        return nn.Dense(self.out, name="o")(nn.relu(nn.Dense(self.hidden, kernel_init=init, name="d")(x)))


def _randomize(model, seed: int):
    """Replaces every parameter by a random value of a useful scale (norm weights near 1, the
    rest N(0, 0.15^2)) so that logits are far from uniform and every weight matters."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name.lower() or ".ln_" in name or "LayerNorm" in name:
                p.copy_(1.0 + 0.2 * noise if name.endswith("weight") else 0.1 * noise)
            else:
                p.copy_(0.15 * noise)
    model.eval()
    return model


def peft_at_least(major: int, minor: int) -> bool:
    """Whether the installed ``peft`` is at least ``major.minor``: the suite runs against PEFT 0.21
    and 0.22, and a test of a behaviour the two differ in asserts each version's own."""
    import peft

    return tuple(int(v) for v in peft.__version__.split(".")[:2]) >= (major, minor)


def perturb_trainable(peft_model, seed: int, scale: float = 0.3):
    """Adds ``scale * N(0, 1)`` to every trainable tensor of a ``peft`` model (every adapter tensor
    random, never a zero-initialised B or an identity rotation), in eval mode; returns it."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))
    return peft_model.eval()


def randomize_adapter(adapter, seed: int, scale: float = 0.5):
    """Every trainable array of a jpeft adapter (each LoRA factor, DoRA magnitude, VeRA vector, trained
    bias) replaced by ``scale * N(0, 1)`` values, the method's frozen arrays (VeRA's projections) kept:
    :func:`perturb_trainable`'s counterpart for jpeft's own adapters, so no tensor keeps its init value
    (LoRA's zero B) in a comparison."""
    import jpeft

    train, frozen = jpeft.split_frozen(adapter)
    leaves, tree = jax.tree.flatten(train)
    keys = jax.random.split(jax.random.key(seed), max(len(leaves), 1))
    train = jax.tree.unflatten(tree, [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])
    return jpeft.join_frozen(train, frozen)


def _hf_config(family: str):
    import transformers as t

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "llama2":
        return t.LlamaConfig(**common, num_key_value_heads=4, tie_word_embeddings=False, max_position_embeddings=128,
                             attention_bias=True, mlp_bias=True)
    if family == "llama3":
        return t.LlamaConfig(
            **common, num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=128,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
        )
    if family == "mistral":
        return t.MistralConfig(**common, num_key_value_heads=2, sliding_window=5, max_position_embeddings=128,
                               tie_word_embeddings=False)
    if family == "qwen2":
        return t.Qwen2Config(**common, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
                             rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                             use_sliding_window=True, sliding_window=4, max_window_layers=1)
    if family == "qwen3":  # head_dim 16 != hidden / heads; biased q/k/v/o; q/k norms (random via _randomize)
        return t.Qwen3Config(**common, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                             tie_word_embeddings=True, attention_bias=True,
                             rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    if family == "gpt2":
        return t.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                            eos_token_id=2, pad_token_id=0)
    if family == "bert":
        return t.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=64, num_labels=3)
    raise KeyError(family)


DECODERS = ("llama2", "llama3", "mistral", "qwen2", "qwen3", "gpt2")
FAMILIES = DECODERS + ("bert",)


@functools.lru_cache(maxsize=None)
def hf_model(family: str):
    """``(torch_model, folder)``: the model in eval mode and the folder it was saved to."""
    import torch
    import transformers as t

    torch.manual_seed(0)
    cfg = _hf_config(family)
    cls = {"llama2": t.LlamaForCausalLM, "llama3": t.LlamaForCausalLM, "mistral": t.MistralForCausalLM,
           "qwen2": t.Qwen2ForCausalLM, "qwen3": t.Qwen3ForCausalLM,
           "gpt2": t.GPT2LMHeadModel, "bert": t.BertForSequenceClassification}[family]
    model = _randomize(cls(cfg), seed=len(family))
    folder = os.path.join(ROOT, family)
    model.save_pretrained(folder)
    return model, folder


def peft_with_adapters(hf, cases: dict, seed: int = 0):
    """A PeftModel (eval mode) of a copy of ``hf`` holding each of ``cases`` (``{name: peft.LoraConfig
    kwargs}``) under its name, every LoRA tensor random (``0.3 * N(0, 1)``: PEFT's zero B, and
    any other tensor left at its init value, hide bugs)."""
    import copy

    import peft
    import torch

    pm = None
    for name, kw in cases.items():
        cfg = peft.LoraConfig(**kw)
        if pm is None:
            pm = peft.get_peft_model(copy.deepcopy(hf), cfg, adapter_name=name)
        else:
            pm.add_adapter(name, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return pm.eval()


def batch(family: str, seed: int = 0):
    """``(ids, mask)`` numpy int arrays [3, 8]: left padding for decoders, right for BERT."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, size=(3, 8)).astype(np.int64)
    lengths = [8, 6, 3]
    mask = np.zeros((3, 8), np.int64)
    for i, n in enumerate(lengths):
        if family == "bert":
            mask[i, :n] = 1
        else:
            mask[i, 8 - n:] = 1
    ids = np.where(mask == 1, ids, 0)
    return ids, mask


def positions(mask):
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0)


def torch_logits(family: str, ids, mask):
    """The float32 logits of the family's tiny transformers model (:func:`hf_model`) on ``(ids, mask)``."""
    return peft_logits(hf_model(family)[0], ids, mask, with_positions=family != "bert")


def peft_logits(model, ids, mask, with_positions: bool = True):
    """The float32 numpy logits of a torch model (a PEFT model, or transformers') on ``(ids, mask)``,
    given the position ids jpeft's decoders compute (:func:`positions`) unless ``with_positions`` is
    false (BERT; prompt tuning, whose virtual tokens shift them)."""
    import torch

    kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    if with_positions:
        kw["position_ids"] = torch.tensor(positions(mask))
    with torch.no_grad():
        return model(**kw).logits.float().numpy()


def assert_close_at_tokens(a, b, mask, atol: float = 1e-4):
    """Logits ``a`` and ``b`` (``[batch, seq, ...]``) within ``atol`` at the real tokens of ``mask``
    (padding's logits differ between implementations and are not compared)."""
    sel = np.asarray(mask).astype(bool)
    np.testing.assert_allclose(a[sel], b[sel], atol=atol, rtol=0)
