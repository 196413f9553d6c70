"""jpeft: parameter-efficient fine-tuning for JAX/Flax, and tools to measure and prevent
catastrophic forgetting.

The whole idea in four calls::

    adapter = jpeft.init(config, params, key)           # trainable tree, separate from params
    out = jpeft.apply(model, params, adapter, x)        # any flax.linen model, unchanged
    step = jpeft.make_train_step(loss_fn, optax.adam(1e-3))
    merged = jpeft.merge(params, adapter)               # plain params for serving
"""

from jpeft.config import AdapterConfig
# The methods, first: importing jpeft.methods imports every method module (each registers itself)
# and the helpers they build on (jpeft.scan, jpeft._inject, jpeft.core, ...), in the one order of
# docs/ARCHITECTURE.md, "The dependency direction". A helper imported before it would import
# jpeft.methods.base half-way through its own import, and the methods could not take its names.
from jpeft import methods as _methods
from jpeft.methods import *  # noqa: F401,F403  (the names jpeft.methods.__all__ lists; __all__ below)
from jpeft.core import apply, init, lm_loss, merge, summary, unmerge
from jpeft._inject import transparent_dot_general  # a user's dot_general that merge may fold adapters through
from jpeft.quant import dequantize, quantize  # QLoRA: a quantized frozen base (issue 19)
from jpeft import errors
# the errors users catch around the calls above; every error class is jpeft.errors.X
from jpeft.errors import (ConfigError, InputValidationError, JpeftError, LoadError, NonFiniteError, NotMergeableError,
                          SaveError, ShapeMismatchError, TargetNotFoundError)
from jpeft.methods.base import join_frozen, split_frozen, trainable
from jpeft.train import make_train_step
from jpeft import data, hf, models, scan
from jpeft.generate import generate
from jpeft import distributed, parallel
from jpeft.parallel import (
    adapter_shardings, adapter_specs, cast_base, init_opt_state, make_mesh, make_pmap_train_step,
    make_sharded_train_step, opt_state_shardings, param_shardings, param_specs, remat, remat_policy,
    tensor_parallel_rules,
    replicate, shard_adapter, shard_batch, shard_params, split_for_pmap, unreplicate, with_precision,
)
from jpeft import checkpoint, loop, validate
from jpeft.io import AdapterInfo, load_adapter, read_adapter_info, save_adapter
from jpeft.loop import FitResult, MetricLog, NonFiniteGuard, fit
from jpeft.bank import AdapterBank
from jpeft.merging import merge_adapters, merge_into_base
from jpeft import forgetting
from jpeft.forgetting.guard import ForgettingGuard, lr_scale

from jpeft._version import __version__

__all__ = [
    "AdapterConfig",
    *_methods.__all__,  # the methods' public names (jpeft/methods/__init__.py)
    "init",
    "apply",
    "lm_loss",
    "merge",
    "quantize",
    "dequantize",
    "unmerge",
    "transparent_dot_general",
    "summary",
    "trainable",
    "split_frozen",
    "join_frozen",
    "make_train_step",
    "generate",
    "models",
    "scan",
    "data",
    "hf",
    "AdapterBank",
    "merge_adapters",
    "merge_into_base",
    "checkpoint",
    "validate",
    "loop",
    "save_adapter",
    "load_adapter",
    "read_adapter_info",
    "AdapterInfo",
    "fit",
    "FitResult",
    "MetricLog",
    "NonFiniteGuard",
    "parallel",
    "distributed",
    "make_mesh",
    "shard_params",
    "param_specs",
    "param_shardings",
    "tensor_parallel_rules",
    "shard_adapter",
    "adapter_specs",
    "adapter_shardings",
    "opt_state_shardings",
    "init_opt_state",
    "shard_batch",
    "make_sharded_train_step",
    "make_pmap_train_step",
    "replicate",
    "unreplicate",
    "split_for_pmap",
    "cast_base",
    "with_precision",
    "remat",
    "remat_policy",
    "forgetting",
    "ForgettingGuard",
    "lr_scale",
    "__version__",
    "errors",
    "JpeftError",
    "ConfigError",
    "TargetNotFoundError",
    "ShapeMismatchError",
    "NotMergeableError",
    "InputValidationError",
    "NonFiniteError",
    "LoadError",
    "SaveError",
]
