"""What a forgetting comparison is made of: :class:`MethodSpec` (one method and its
countermeasures) and :class:`Benchmark` (a sequence of tasks, and how to train and score a model
on them). The built-in benchmarks (:mod:`jpeft.forgetting.digits`, :mod:`jpeft.forgetting.language`)
subclass :class:`Benchmark`, and the runner (:mod:`jpeft.forgetting.experiment`, which re-exports
both names) imports them: dependencies point one way, benchmarks below the runner."""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Optional

import jax.numpy as jnp
import numpy as np

import jpeft
from jpeft.config import AdapterConfig
from jpeft.errors import ConfigError
from jpeft.forgetting import regularizers as R

__all__ = ["MethodSpec", "Benchmark"]

_RESIDUAL_NAMES = {"pissa": "PiSSA", "olora": "OLoRA", "milora": "MiLoRA"}


def _residual_name(init: str) -> str:
    """``"PiSSA"`` for ``"pissa"``, ``"PiSSA (4 subspace iterations)"`` for ``"pissa_niter_4"``."""
    base, _, niter = init.partition("_niter_")
    return _RESIDUAL_NAMES[base] + (f" ({niter} subspace iterations)" if niter else "")


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """One method of a comparison: an adapter config plus optional forgetting countermeasures.

    Args:
      name: label in tables and plots.
      config: any jpeft method config; :class:`~jpeft.FullFinetuneConfig` for full
        fine-tuning (the default).
      lr: Adam learning rate.
      ewc: EWC strength ``lambda`` (0: off).
      ewc_gamma: ``None``: original EWC (one penalty term per task); a float: online EWC with
        this decay (Schwarz et al. 2018).
      fisher: Fisher estimator for EWC (``"exact"``, ``"sampled"``, ``"empirical"``,
        ``"batched"``); ``None``: the benchmark's default.
      fisher_examples: examples of each finished task used to estimate the Fisher.
      replay: share of each batch replaced by examples of earlier tasks (0: off); a share that
        rounds to no row of the benchmark's batch is refused before anything is trained.
      replay_capacity: size of the reservoir buffer.
      distill: weight of the LwF distillation term (KL to the predictions of the model as it
        was when the current task started; 0: off).
      temperature: distillation temperature.
      l2sp: L2-SP strength (distance of the effective weights to the start of each task).
      per_task_adapter: task-incremental PEFT: the network is fully trained on the first task
        and then frozen; every later task gets a fresh adapter of ``config``, chosen at test
        time by the task's identity (so nothing learned earlier can be overwritten).
      orthogonal: O-LoRA (Wang et al. 2023) strength ``lambda_1`` (0: off). Needs a LoRA
        ``config``. Every trained task gets a fresh adapter; the adapters of earlier tasks are
        merged into the frozen base (so they are summed and never change again) and their
        ``A`` matrices kept; the loss adds ``lambda_1 * sum_sites ||A_old^T A_new||_F^2``
        (:func:`jpeft.forgetting.regularizers.orthogonal_penalty`). No task identity is used
        at test time.
      corda: CorDA's knowledge-preserving initialisation (Yang et al. 2024;
        :func:`jpeft.init_corda`): ``"kpm"`` starts the adapter in the directions the
        benchmark's pretrained tasks use least (calibrated on their training data: what must
        not be forgotten), ``"ipm"`` in those the first trained task uses most; ``None``: off.
        Needs a plain LoRA ``config`` (init_weights ``"default"``); the base becomes the residual, as
        for PiSSA.
      calibration_examples: CorDA's calibration passes (one example each, as PEFT's hook
        assumes).

    >>> MethodSpec("lora r=8", jpeft.LoraConfig(r=8, target_modules=".*"), lr=3e-3).name
    'lora r=8'
    """

    name: str
    config: AdapterConfig = dataclasses.field(default_factory=lambda: jpeft.FullFinetuneConfig())
    lr: float = 1e-3
    ewc: float = 0.0
    ewc_gamma: Optional[float] = None
    fisher: Optional[str] = None
    fisher_examples: int = 256
    replay: float = 0.0
    replay_capacity: int = 200
    distill: float = 0.0
    temperature: float = 2.0
    l2sp: float = 0.0
    per_task_adapter: bool = False
    orthogonal: float = 0.0
    corda: Optional[str] = None
    calibration_examples: int = 128

    def __post_init__(self):
        if not isinstance(self.config, AdapterConfig):
            raise ConfigError(f"MethodSpec {self.name!r}: config must be a jpeft method config, found {type(self.config).__name__}.")
        for f in ("lr",):
            if not getattr(self, f) > 0:
                raise ConfigError(f"MethodSpec {self.name!r}: {f} must be > 0, found {getattr(self, f)}.")
        for f in ("ewc", "distill", "l2sp", "orthogonal"):
            if getattr(self, f) < 0:
                raise ConfigError(f"MethodSpec {self.name!r}: {f} must be >= 0, found {getattr(self, f)}.")
        if not 0.0 <= self.replay < 1.0:
            raise ConfigError(f"MethodSpec {self.name!r}: replay must be in [0, 1), found {self.replay}.")
        # checked here, not where they are first used (after the first task has trained)
        if self.replay and not (isinstance(self.replay_capacity, int) and self.replay_capacity > 0):
            raise ConfigError(f"MethodSpec {self.name!r}: replay_capacity must be a positive integer, found "
                              f"{self.replay_capacity!r}.")
        if self.distill and not self.temperature > 0:
            raise ConfigError(f"MethodSpec {self.name!r}: temperature must be > 0, found {self.temperature}.")
        if self.ewc and not (isinstance(self.fisher_examples, int) and self.fisher_examples > 0):
            raise ConfigError(f"MethodSpec {self.name!r}: fisher_examples must be a positive integer, found "
                              f"{self.fisher_examples!r}.")
        if self.ewc_gamma is not None and not 0.0 <= self.ewc_gamma <= 1.0:
            raise ConfigError(f"MethodSpec {self.name!r}: ewc_gamma (online EWC's decay) must be in [0, 1] or None, "
                              f"found {self.ewc_gamma}.")
        if self.corda is not None:
            if self.corda not in ("kpm", "ipm"):
                raise ConfigError(f"MethodSpec {self.name!r}: corda must be 'kpm', 'ipm' or None, found {self.corda!r}.")
            if (not isinstance(self.config, jpeft.LoraConfig) or self.config.init_weights != "default"
                    or self.config.use_dora):
                raise ConfigError(f"MethodSpec {self.name!r}: corda needs a plain LoRA config (jpeft.LoraConfig with "
                                  f"init_weights='default', no DoRA): CorDA sets LoRA's A and B itself; found {self.config!r}.")
            if self.calibration_examples < 1:
                raise ConfigError(f"MethodSpec {self.name!r}: calibration_examples must be >= 1, found "
                                  f"{self.calibration_examples}.")
        init = self.config.residual_init
        if init is not None and init.startswith("corda_"):
            raise ConfigError(f"MethodSpec {self.name!r}: init_weights={init!r} marks an adapter jpeft.init_corda made; the "
                              f"runner makes it itself: give init_weights='default' and corda={init[len('corda_'):]!r}.")
        residual = self.corda is not None or init is not None
        if residual and self.per_task_adapter:
            what, fix = ((f"corda={self.corda!r}", "drop corda") if self.corda else
                         (f"LoraConfig(init_weights={self.config.init_weights!r})", "use init_weights='default'"))
            raise ConfigError(f"MethodSpec {self.name!r}: {what} changes the base weights, which per_task_adapter "
                              f"shares between tasks; {fix}.")
        if self.orthogonal and (not isinstance(self.config, jpeft.LoraConfig) or residual or self.config.use_dora):
            raise ConfigError(f"MethodSpec {self.name!r}: orthogonal (O-LoRA) needs a plain LoRA config "
                              "(jpeft.LoraConfig, init 'default'/'gaussian', no DoRA, no CorDA): the penalty is on LoRA's A "
                              f"matrices; found {self.config!r}.")
        if self.orthogonal and self.ewc:
            raise ConfigError(f"MethodSpec {self.name!r}: EWC anchors the adapter it was computed on, and O-LoRA "
                              "trains a fresh adapter per task; set one of ewc and orthogonal.")
        if self.per_task_adapter and (self.ewc or self.replay):
            what = " and ".join(k for k in ("ewc", "replay") if getattr(self, k))
            raise ConfigError(f"MethodSpec {self.name!r}: {what} with per_task_adapter would do nothing: each task "
                              "trains its own fresh adapter on the frozen network, so there is no earlier state to "
                              f"anchor (EWC) or old data to mix in (replay) for it; drop {what} or per_task_adapter.")
        if self.orthogonal and self.per_task_adapter:
            raise ConfigError(f"MethodSpec {self.name!r}: orthogonal (O-LoRA) and per_task_adapter are two different "
                              "ways to give each task its own adapter; set one of them.")
        if self.fisher is not None and self.fisher not in R.FISHER_ESTIMATORS:
            raise ConfigError(f"MethodSpec {self.name!r}: fisher must be one of {R.FISHER_ESTIMATORS}, found {self.fisher!r}.")

    def describe(self) -> str:
        cfg = self.config
        kind = type(cfg).__name__.replace("Config", "")
        if isinstance(cfg, jpeft.LoraConfig):
            kind = f"{'DoRA' if cfg.use_dora else 'LoRA'} r={cfg.r} alpha={cfg.alpha:g}"
            if cfg.residual_init is not None:
                kind += f" ({_residual_name(cfg.residual_init)} init, residual base)"
            if self.corda:
                kind += (f" (CorDA {self.corda.upper()} init on {self.calibration_examples} calibration examples, "
                         "residual base)")
        parts = [kind]
        if self.ewc:
            parts.append(f"{'online ' if self.ewc_gamma is not None else ''}EWC lambda={self.ewc:g}"
                         + (f" gamma={self.ewc_gamma:g}" if self.ewc_gamma is not None else ""))
        if self.replay:
            parts.append(f"replay {self.replay:g} of batch, buffer {self.replay_capacity}")
        if self.distill:
            parts.append(f"distill w={self.distill:g} T={self.temperature:g}")
        if self.l2sp:
            parts.append(f"L2-SP {self.l2sp:g}")
        if self.per_task_adapter:
            parts.append("one adapter per task")
        if self.orthogonal:
            parts.append(f"O-LoRA lambda={self.orthogonal:g} (fresh adapter per task, earlier ones merged)")
        return ", ".join(parts) + f", lr={self.lr:g}"


class Benchmark(abc.ABC):
    """A sequence of tasks and how to train and score a model on them. Subclasses set the
    attributes and implement the methods below (see :mod:`jpeft.forgetting.digits` for a
    complete example).

    Attributes:
      name: short name (file names use it).
      task_names: one name per task.
      score_name: what ``R`` holds (``"accuracy"``, ``"loss"``).
      higher_is_better: ``False`` for losses.
      pretrained_tasks: leading tasks the base parameters have already learned (the
        language benchmark's code task); they are evaluated, not trained.
      steps_per_task, batch_size: training length.
      fisher_estimator: default EWC Fisher estimator.
      learning_name: what :meth:`learning` measures (axis label).
    """

    name: str = "benchmark"
    task_names: tuple = ()
    score_name: str = "score"
    higher_is_better: bool = True
    pretrained_tasks: int = 0
    steps_per_task: int = 100
    batch_size: int = 32
    fisher_estimator: str = "exact"
    learning_name: str = "learning"

    model: Any = None

    @abc.abstractmethod
    def example_input(self):
        """An example model input (for ``jpeft.init`` to trace the model)."""
        ...

    @abc.abstractmethod
    def base_params(self, seed: int):
        ...

    @abc.abstractmethod
    def train_set(self, t: int) -> dict:
        """Training examples of task ``t``: a dict of numpy arrays with a leading axis."""
        ...

    def forward(self, params, adapter, data):
        """Raw model outputs (logits) on a batch."""
        return jpeft.apply(self.model, params, adapter, data["x"])

    @abc.abstractmethod
    def loss(self, logits, data, t):
        ...

    @abc.abstractmethod
    def distill(self, student, teacher, data, t, temperature):
        ...

    @abc.abstractmethod
    def fisher_data(self, t: int, n: int):
        """``(output_fn, inputs, labels, mask)`` for the Fisher of task ``t`` (``n`` examples)."""
        ...

    @abc.abstractmethod
    def evaluate(self, params, adapter, j: int, step: int) -> float:
        """Score on task ``j`` after training step ``step`` (``adapter`` may be ``None``)."""
        ...

    def calibration_inputs(self, t: int, n: int) -> list:
        """Model inputs of ``n`` training examples of task ``t``, one example per item (each a
        tuple of positional arguments of the model), for CorDA's calibration. The default
        takes ``train_set(t)["x"]``."""
        x = self.train_set(t).get("x")
        if x is None:
            raise ConfigError(f"benchmark {self.name!r}: its training data has no 'x' array; override "
                              "calibration_inputs to give CorDA model inputs.")
        return [(jnp.asarray(x[i : i + 1]),) for i in range(min(n, len(x)))]

    def learning(self, Rm: np.ndarray, baseline: np.ndarray) -> float:
        """How much was learned (higher = more), for the learning-vs-forgetting plot."""
        return float(np.mean(np.diag(Rm)[self.pretrained_tasks:]))

    def extra_metrics(self, params, adapter) -> dict:
        """Benchmark-specific metrics of the final model (e.g. KL from the base)."""
        return {}

    def settings(self) -> dict:
        """The construction settings that change the scores besides the tasks, ``steps_per_task``
        and ``batch_size`` (the model's size, the sequence length, ...), as JSON values: a sweep
        records them, and :func:`jpeft.forgetting.sweep.combine` refuses sweeps whose settings
        differ (their seeds would pair runs of different models)."""
        return {}

    @abc.abstractmethod
    def default_methods(self) -> list:
        """The methods the benchmark compares when none are named."""
        ...
