"""Flax linen models that load Hugging Face checkpoints: Llama (2 and 3), Mistral, Qwen2,
Qwen3, GPT-2 and BERT (sequence classification, token classification, question answering).

Submodule names mirror Hugging Face's, so ``jpeft.tree.hf_name(path)`` of a module path is
the Hugging Face module name and ``target_modules`` written for Hugging Face PEFT select the
same modules. See docs/MODELS.md.

>>> import jpeft
>>> jpeft.models.supported_model_types()
['bert', 'gpt2', 'llama', 'mistral', 'qwen2', 'qwen3']
"""

from jpeft.models._layers import KVCache, RMSNorm, init_cache
from jpeft.models.bert import (
    BertConfig,
    BertForMultipleChoice,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    multiple_choice_loss,
    question_answering_loss,
    token_classification_loss,
)
from jpeft.models.gpt2 import GPT2Config, GPT2LMHeadModel, GPT2Model
from jpeft.models.llama import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from jpeft.models.loading import (
    config_from_hf,
    config_to_hf,
    from_pretrained,
    load_tokenizer,
    model_from_config,
    read_config,
    save_pretrained,
    supported_model_types,
)

__all__ = [
    "KVCache",
    "RMSNorm",
    "init_cache",
    "LlamaConfig",
    "LlamaForCausalLM",
    "LlamaModel",
    "MistralConfig",
    "MistralForCausalLM",
    "Qwen2Config",
    "Qwen2ForCausalLM",
    "Qwen3Config",
    "Qwen3ForCausalLM",
    "GPT2Config",
    "GPT2LMHeadModel",
    "GPT2Model",
    "BertConfig",
    "BertForSequenceClassification",
    "BertForTokenClassification",
    "BertForQuestionAnswering",
    "BertForMultipleChoice",
    "BertModel",
    "token_classification_loss",
    "question_answering_loss",
    "multiple_choice_loss",
    "config_from_hf",
    "config_to_hf",
    "from_pretrained",
    "load_tokenizer",
    "model_from_config",
    "read_config",
    "save_pretrained",
    "supported_model_types",
]
