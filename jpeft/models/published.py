"""Published model configurations (Hugging Face ``config.json`` fields), so that
``jpeft info llama-2-7b`` and ``python -m jpeft.budget`` can compute a parameter
budget without downloading anything.

Values are copied from the models' published ``config.json`` files.
"""

from __future__ import annotations

_LLAMA2_COMMON = dict(
    model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu", vocab_size=32000,
    max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
    attention_bias=False, mlp_bias=False, bos_token_id=1, eos_token_id=2,
)

PUBLISHED: dict[str, dict] = {
    # meta-llama/Llama-2-7b-hf
    "llama-2-7b": dict(_LLAMA2_COMMON, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32),
    # meta-llama/Llama-2-13b-hf
    "llama-2-13b": dict(_LLAMA2_COMMON, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=40),
    # meta-llama/Llama-2-70b-hf
    "llama-2-70b": dict(_LLAMA2_COMMON, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8),
    # meta-llama/Meta-Llama-3-8B
    "llama-3-8b": dict(_LLAMA2_COMMON, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       max_position_embeddings=8192, rope_theta=500000.0, bos_token_id=128000,
                       eos_token_id=128001),
    # mistralai/Mistral-7B-v0.1
    "mistral-7b": dict(model_type="mistral", architectures=["MistralForCausalLM"], hidden_act="silu",
                       hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                       max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=10000.0,
                       sliding_window=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    # Qwen/Qwen2-0.5B
    "qwen2-0.5b": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_act="silu",
                       hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                       max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=1000000.0,
                       tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151643),
    # Qwen/Qwen3-0.6B (head_dim 128 != hidden_size / heads = 64)
    "qwen3-0.6b": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_act="silu",
                       hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                       max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
                       attention_bias=False, use_sliding_window=False, sliding_window=None,
                       max_window_layers=28, tie_word_embeddings=True, bos_token_id=151643,
                       eos_token_id=151645),
    # openai-community/gpt2
    "gpt2": dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=50257, n_positions=1024,
                 n_embd=768, n_layer=12, n_head=12, n_inner=None, activation_function="gelu_new",
                 layer_norm_epsilon=1e-5, tie_word_embeddings=True, bos_token_id=50256, eos_token_id=50256),
}

ALIASES = {
    "llama2-7b": "llama-2-7b", "meta-llama/llama-2-7b-hf": "llama-2-7b", "llama-2-7b-hf": "llama-2-7b",
    "llama2-13b": "llama-2-13b", "meta-llama/llama-2-13b-hf": "llama-2-13b",
    "llama2-70b": "llama-2-70b", "meta-llama/llama-2-70b-hf": "llama-2-70b",
    "llama3-8b": "llama-3-8b", "meta-llama/meta-llama-3-8b": "llama-3-8b",
    "mistral-7b-v0.1": "mistral-7b", "mistralai/mistral-7b-v0.1": "mistral-7b",
    "qwen/qwen2-0.5b": "qwen2-0.5b", "qwen/qwen3-0.6b": "qwen3-0.6b",
    "openai-community/gpt2": "gpt2", "gpt2-small": "gpt2",
}


def lookup(name: str):
    """The config dict of a published model name (case-insensitive, common aliases), or None."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    cfg = PUBLISHED.get(key)
    return (key, dict(cfg)) if cfg is not None else None
