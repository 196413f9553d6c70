"""Catastrophic forgetting: measure it, prevent it, and compare methods on real data.

* :mod:`jpeft.forgetting.metrics`: average accuracy, backward/forward transfer, forgetting
  (Chaudhry et al. 2018), retention over a score matrix ``R[i, j]``; language-model loss
  drift and per-token KL from the base model.
* :mod:`jpeft.forgetting.regularizers`: EWC and online EWC with a selectable Fisher
  estimator, L2-SP on effective weights, LwF-style distillation.
* :mod:`jpeft.forgetting.replay`: a reservoir buffer and batch mixing, as pure functions.
* full fine-tuning is a jpeft method (:class:`jpeft.FullFinetuneConfig`, in ``jpeft/methods/full.py``),
  so it goes through the same ``jpeft.init`` / ``jpeft.apply`` / ``jpeft.make_train_step`` code as
  every adapter.
* :func:`run` (:mod:`jpeft.forgetting.experiment`): trains a list of methods over a sequence
  of tasks for several seeds and writes the score matrices, metrics, a CSV, a markdown table
  and plots. Built-in benchmarks: Split-Digits (task- and class-incremental;
  :mod:`jpeft.forgetting.digits`) and code-to-prose language adaptation
  (:mod:`jpeft.forgetting.language`).
* :mod:`jpeft.forgetting.sweep` / :mod:`jpeft.forgetting.stats`: learning-versus-forgetting
  curves (learning rate, training length, regularizer strength), Pareto fronts, bootstrap
  intervals over seeds and paired tests at equal learning.

Command line: ``python -m jpeft.forgetting --help`` (also ``jpeft forgetting``).
"""

from jpeft.forgetting import cli, digits, experiment, language, metrics, regularizers, replay, stats, sweep
from jpeft.forgetting.experiment import MethodSpec, run
from jpeft.forgetting.guard import ForgettingGuard, canary_stats, lr_scale, scale_lr
from jpeft.forgetting.metrics import (
    average_accuracy,
    backward_transfer,
    forgetting,
    forward_transfer,
    loss_drift,
    mean_token_kl,
    retention_ratio,
)
from jpeft.forgetting.regularizers import (
    EWCState,
    distillation_kl,
    ewc_consolidate,
    ewc_init,
    ewc_penalty,
    fisher_diagonal,
    l2sp_penalty,
    orthogonal_consolidate,
    orthogonal_init,
    orthogonal_penalty,
)
from jpeft.forgetting.replay import ReservoirBuffer, mix_batch, reservoir_add, reservoir_init, reservoir_sample
from jpeft.forgetting.sweep import SweepSpec

__all__ = [
    "metrics",
    "regularizers",
    "replay",
    "run",
    "MethodSpec",
    "SweepSpec",
    "ForgettingGuard",
    "canary_stats",
    "lr_scale",
    "scale_lr",
    "average_accuracy",
    "backward_transfer",
    "forward_transfer",
    "forgetting",
    "retention_ratio",
    "loss_drift",
    "mean_token_kl",
    "fisher_diagonal",
    "EWCState",
    "ewc_init",
    "ewc_consolidate",
    "ewc_penalty",
    "l2sp_penalty",
    "orthogonal_init",
    "orthogonal_consolidate",
    "orthogonal_penalty",
    "distillation_kl",
    "ReservoirBuffer",
    "reservoir_init",
    "reservoir_add",
    "reservoir_sample",
    "mix_batch",
]
