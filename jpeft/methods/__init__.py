"""jpeft's methods, one file each, on the protocol in :mod:`jpeft.methods.base`.

A method registers itself with one :func:`~jpeft.methods.base.register_method` call in its own
file; this package imports every method module below, which is what registers them (one
place), and exports their public names (config classes, the node classes users inspect, the
residual inits, ``fold_prefix``, ``to_prefix``), which ``jpeft/__init__.py`` re-exports. See
docs/ARCHITECTURE.md, "Adding a method" and "The dependency direction".

The protocol modules here are :mod:`jpeft.methods.base` (the node protocol, :class:`Layout`,
the :class:`~jpeft.methods.base.Method` registry, frozen-state splitting) and
:mod:`jpeft.methods._common` (the shared layout dispatch). Every other module in this package
is a method module, which nothing outside ``jpeft/methods/`` imports: code elsewhere goes
through the registry, or takes a public name from here (``from jpeft.methods import
LoraConfig``) as a user does (the budget table over every method is :mod:`jpeft.budget`, a
consumer). Importing any part of jpeft imports this package first (``jpeft/__init__.py``
does), so every method is registered before any jpeft code runs.
"""

from jpeft.methods._common import SavedModule
from jpeft.methods.lora import LoraConfig, LoraWeights, TrainableTokens
from jpeft.methods import lora_hf  # noqa: F401  (LoRA's PEFT format and its registration)
from jpeft.methods.ia3 import IA3Config, IA3Weights
from jpeft.methods.loha import LoHaConfig
from jpeft.methods.lokr import LoKrConfig
from jpeft.methods.bottleneck import BottleneckConfig, BottleneckWeights
from jpeft.methods.prefix import PrefixTuningConfig, PrefixWeights, PrefixMLPWeights, fold_prefix
from jpeft.methods.prompt import PromptTuningConfig, PromptWeights, to_prefix
from jpeft.methods.oft import OFTConfig
from jpeft.methods.ln_tuning import LNTuningConfig
from jpeft.methods.vera import VeraConfig, VeraWeights
from jpeft.methods.adalora import AdaLoraConfig, AdaLoraWeights, allocator as adalora_allocator
from jpeft.methods.corda import init_corda
from jpeft.methods.pissa import (convert_residual_adapter, convert_residual_config, init_milora, init_olora, init_pissa,
                                 residual_params)
from jpeft.methods.full import FullFinetuneConfig
from jpeft.methods.intruders import intruder_report, reduce_intruder_dimension

__all__ = [
    "LoraConfig",
    "LoraWeights",
    "SavedModule",
    "TrainableTokens",
    "IA3Config",
    "IA3Weights",
    "LoHaConfig",
    "LoKrConfig",
    "BottleneckConfig",
    "BottleneckWeights",
    "PrefixTuningConfig",
    "PrefixWeights",
    "PrefixMLPWeights",
    "fold_prefix",
    "PromptTuningConfig",
    "PromptWeights",
    "to_prefix",
    "OFTConfig",
    "LNTuningConfig",
    "VeraConfig",
    "VeraWeights",
    "AdaLoraConfig",
    "AdaLoraWeights",
    "adalora_allocator",
    "init_pissa",
    "init_olora",
    "init_milora",
    "init_corda",
    "convert_residual_adapter",
    "residual_params",
    "convert_residual_config",
    "intruder_report",
    "reduce_intruder_dimension",
    "FullFinetuneConfig",
]
