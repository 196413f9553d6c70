"""AdaLoRA (Zhang et al. 2023): LoRA in SVD form with a rank budget that shrinks during training,
as Hugging Face PEFT 0.21 implements it (``peft/tuners/adalora``).

Each targeted linear module holds ``lora_A: [in, r]``, ``lora_E: [r]`` and ``lora_B: [r, out]``
(JAX orientation; PEFT stores ``lora_A: [r, in]``, ``lora_E: [r, 1]``, ``lora_B: [out, r]``),
``r = init_r``, and computes

    y = x @ W + ((dropout(x) @ (A * E)) @ B) * alpha / (init_r + 1e-5)

(PEFT's ``scaling = lora_alpha`` over ``ranknum``, which stays ``init_r`` when ranks are pruned).
At init ``E = 0`` and ``A``, ``B`` are ``N(0, 0.02^2)``: the identity.

Training: the rank budget starts at ``init_r`` per module and falls on a cubic schedule to
``target_r`` per module between steps ``tinit`` and ``total_step - tfinal``
(:func:`budget_schedule`). In the one training loop (:func:`jpeft.fit` with any step maker,
``jpeft train``, the forgetting runner) the allocator is an optax transformation around the
optimizer, :func:`allocator` (``config.wrap_optimizer(tx)``), whose state rides in the optimizer
state; ``config.trained_config(opt_state)`` is the config with the ``rank_pattern`` and
``config.regularizer(adapter)`` the loss term. For a loop of your own, after each optimizer step
:func:`update_and_allocate` takes the adapter, its gradients and the step; it keeps exponential averages of each entry's sensitivity
``|p * grad|`` and of its uncertainty (:class:`AllocatorState`), scores each singular triplet
``(A[:, i], E[i], B[i])`` and sets the ``E`` entries of the lowest-scoring triplets to zero so
that the budget holds (PEFT's ``RankAllocator``). It returns the ``rank_pattern`` (which
triplets each module keeps, keyed ``"<module>.lora_E"`` as PEFT writes them), which goes into the
config (``config.replace(rank_pattern=...)``) so that :func:`jpeft.hf.save_peft` writes only the
kept triplets. Shapes never change in jpeft (a pruned triplet is a zero ``E`` entry), so the
training step compiles once. :func:`orthogonal_regularization` is PEFT's penalty
``mean ||A^T A - I||_F, ||B B^T - I||_F``; add ``orth_reg_weight`` times it to the loss, as
PEFT adds it to the model's loss.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, ClassVar, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from jpeft import _inject, scan
from jpeft.config import AdapterConfig, renamed_option
from jpeft.errors import (
    BaseMismatchError,
    CheckpointError,
    ConfigError,
    InputValidationError,
    ShapeMismatchError,
    UnsupportedAdapterError,
    UnsupportedModuleError,
)
from jpeft.methods._common import (HEAD_MODULES, PEFT_CONV_FORWARD, AdditiveMerge, SavedModule, branch_dtype,
                                   check_conv_for_peft, conv_rows_from_torch, conv_rows_to_torch, down_project,
                                   from_matrix, linear_layouts, peft_padded_conv_layout, up_project)
from jpeft.methods.base import (Call, Kind, Layout, LowRank, Method, Site, dropout, flat_spec_entry,
                                kernel_spec_entries, register_method, static_field)
from jpeft.peft_format import config_from_peft, needs_peft, peft_key, site_tensors
from jpeft.tree import hf_name, host_array

_OFF = (None, {}, [], ())


@dataclasses.dataclass(frozen=True)
class AdaLoraConfig(AdapterConfig):
    """Configuration of an AdaLoRA adapter (Hugging Face PEFT's ``AdaLoraConfig``; same key names).

    Args:
      init_r: the starting rank of every module (PEFT's default 12).
      target_r: the average rank per module at the end of the budget schedule (8).
      tinit, tfinal, total_step: the schedule: the budget stays at ``init_r`` per module up to
        step ``tinit``, falls cubically to ``target_r`` per module at ``total_step - tfinal``, and
        the ranks are then fixed for the last ``tfinal`` steps. ``total_step`` is required.
      deltaT: re-allocate the budget every ``deltaT`` steps during the falling phase.
      beta1, beta2: the averaging factors of the sensitivity and its uncertainty, in (0, 1).
      orth_reg_weight: the weight of :func:`orthogonal_regularization` in the loss (>= 0).
      alpha: ``lora_alpha``; the update is scaled by ``alpha / init_r`` (PEFT's default 8).
      dropout: ``lora_dropout``, active only with ``rngs={"dropout": key}``.
      target_modules: linear modules to adapt (as for :class:`jpeft.LoraConfig`); the PEFT
        format holds dense sites only.
      init_weights: ``True``: ``E = 0`` (the identity), ``A``, ``B`` normal with std 0.02;
        ``False``: all three standard normal (tests only), as PEFT. PEFT's name,
        ``init_lora_weights``, is taken too (and is the ``adapter_config.json`` key); the
        attribute ``init_lora_weights`` is deprecated.
      rank_pattern: which triplets each module keeps, ``{"<module>.lora_E": [bool] * init_r}``,
        as :func:`update_and_allocate` returns it and PEFT saves it.

    PEFT's LoRA options that AdaLoRA inherits but jpeft's AdaLoRA does not implement
    (``bias``, ``modules_to_save``, ``layers_to_transform``, ``use_rslora``, ``alpha_pattern``, ...)
    are refused by name unless they hold PEFT's defaults; PEFT's ``r`` is ignored by AdaLoRA
    (it uses ``init_r``) and so by jpeft.

    >>> from jpeft.methods.adalora import AdaLoraConfig
    >>> c = AdaLoraConfig(init_r=6, target_r=2, total_step=100, tinit=10, tfinal=20)
    >>> AdaLoraConfig.from_dict(c.to_dict()) == c
    True
    >>> c.to_dict()["lora_alpha"], c.to_dict()["peft_type"]
    (8, 'ADALORA')
    """

    peft_type: ClassVar[str] = "ADALORA"
    _hf_keys: ClassVar[Mapping[str, str]] = {"alpha": "lora_alpha", "dropout": "lora_dropout",
                                             "init_weights": "init_lora_weights"}
    # PEFT's AdaLoRA layers ignore r and LoRA's Astra init (AdaLoraConfig inherits astra_config; PEFT >= 0.22 writes it)
    _ignored_hf_keys: ClassVar[frozenset] = AdapterConfig._ignored_hf_keys | {"r", "astra_config"}
    _unsupported_hf_options: ClassVar[Mapping[str, tuple]] = {
        **AdapterConfig._unsupported_hf_options,
        "use_rslora": (False, None),
        "use_dora": (False, None),
        "alpha_pattern": _OFF,
        "ensure_weight_tying": (False, None),
        "kasa_config": _OFF,
        "monteclora_config": _OFF,
        "velora_config": _OFF,
        "use_bdlora": (False, None),
    }

    init_r: int = 12
    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: Optional[int] = None
    alpha: float = 8
    dropout: float = 0.0
    target_modules: Any = ("q_proj", "v_proj")
    init_weights: bool = True
    init_lora_weights = renamed_option("init_lora_weights")
    rank_pattern: Optional[Mapping[str, Any]] = None

    def __post_init__(self):
        self._set_targets("give a regex or names such as ['q_proj', 'v_proj']")

        def whole(name, lo):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ConfigError(f"AdaLoraConfig.{name} must be an integer >= {lo}, found {v!r}.")

        for name, lo in (("init_r", 1), ("target_r", 1), ("tinit", 0), ("tfinal", 0), ("deltaT", 1)):
            whole(name, lo)
        if self.total_step is None:
            raise ConfigError("AdaLoraConfig.total_step is required (> 0): the budget schedule needs the training length, "
                              "as in Hugging Face PEFT. Give the number of training steps: total_step=N (`jpeft train`: "
                              "total_step = N in [method], as train.steps; `jpeft info`: --set total_step=N).")
        whole("total_step", 1)
        if self.tinit >= self.total_step - self.tfinal:
            raise ConfigError(
                f"AdaLoraConfig: tinit={self.tinit} >= total_step - tfinal = {self.total_step - self.tfinal} leaves no "
                "budgeting phase; decrease tfinal/tinit or increase total_step (PEFT refuses this too)."
            )
        if self.target_r > self.init_r:
            raise ConfigError(f"AdaLoraConfig.target_r={self.target_r} exceeds init_r={self.init_r}; the budget only shrinks.")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
                raise ConfigError(f"AdaLoraConfig.{name} must be in (0, 1), found {v!r}.")
        if isinstance(self.orth_reg_weight, bool) or not isinstance(self.orth_reg_weight, (int, float)) \
                or not 0 <= self.orth_reg_weight < float("inf"):
            raise ConfigError(f"AdaLoraConfig.orth_reg_weight must be a finite number >= 0, found {self.orth_reg_weight!r}.")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 < self.alpha < float("inf"):
            raise ConfigError(f"AdaLoraConfig.alpha (lora_alpha) must be a finite number > 0, found {self.alpha!r}.")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"AdaLoraConfig.dropout (lora_dropout) must be in [0, 1), found {self.dropout!r}.")
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"AdaLoraConfig.init_weights (init_lora_weights) must be true or false, found {self.init_weights!r}.")
        rp = self.rank_pattern
        if rp is not None:
            if not isinstance(rp, Mapping) or not all(
                    isinstance(k, str) and k.endswith(".lora_E") and isinstance(v, (list, tuple, np.ndarray))
                    and len(v) == self.init_r and all(isinstance(b, (bool, np.bool_)) for b in v) for k, v in rp.items()):
                raise ConfigError(
                    f"AdaLoraConfig.rank_pattern must map '<module>.lora_E' to init_r={self.init_r} booleans (as "
                    f"update_and_allocate returns it), found {str(rp)[:160]}."
                )
            # numpy's bools kept as Python's: to_dict writes JSON
            object.__setattr__(self, "rank_pattern", {k: tuple(map(bool, v)) for k, v in rp.items()} or None)

    def __hash__(self):
        rp = None if self.rank_pattern is None else tuple(sorted(self.rank_pattern.items()))
        return hash((self.init_r, self.target_r, self.tinit, self.tfinal, self.deltaT, self.beta1, self.beta2,
                     self.orth_reg_weight, self.total_step, self.alpha, self.dropout, self.target_modules,
                     self.init_weights, rp))

    @property
    def scaling(self) -> float:
        """``alpha / (init_r + 1e-5)``: PEFT's ``scaling / ranknum``."""
        return float(self.alpha) / (float(self.init_r) + 1e-5)

    def layer_scan_refusal(self) -> Optional[str]:
        return "its rank allocator ranks each layer's modules across the model, so it needs each layer's modules apart"

    # the training protocol (jpeft.config.AdapterConfig): what jpeft.fit's steps, `jpeft train` and the
    # forgetting runner add for AdaLoRA
    def wrap_optimizer(self, tx, total_steps: int | None = None):
        """``tx`` wrapped in AdaLoRA's rank allocator (:func:`allocator`). With ``total_steps``
        (the run's number of updates), a ``UserWarning`` when the run ends before the final
        allocation at ``total_step - tfinal``: its adapter would keep more than ``target_r``
        triplets per module."""
        final = self.total_step - self.tfinal
        if total_steps is not None and int(total_steps) < final:
            warnings.warn(
                f"AdaLoraConfig(total_step={self.total_step}, tfinal={self.tfinal}) makes its final rank allocation "
                f"at step {final}, but this run has {int(total_steps)} steps: it ends with the budget still above "
                f"target_r={self.target_r} per module. Set total_step to the run's number of steps "
                f"({int(total_steps)}).", UserWarning, stacklevel=2)
        return allocator(self, tx)

    def regularizer(self, adapter):
        """``orth_reg_weight * orthogonal_regularization(adapter)`` (PEFT adds it to the loss of a
        model with a ``task_type``); ``None`` when the weight is 0."""
        if not self.orth_reg_weight:
            return None
        return self.orth_reg_weight * orthogonal_regularization(adapter)

    def trained_config(self, opt_state):
        """This config with the ``rank_pattern`` of the allocator in ``opt_state``
        (:func:`rank_pattern`); unchanged when ``opt_state`` holds no allocator or it has not
        allocated yet."""
        states = _allocator_states(opt_state)
        if len(states) != 1:
            return self
        rp = _pattern_of(states[0])
        return self if rp is None else self.replace(rank_pattern=rp)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AdaLoraWeights(AdditiveMerge, Site):
    """One AdaLoRA site: ``lora_A: [in, r]``, ``lora_E: [r]``, ``lora_B: [r, out]``."""

    lora_A: jax.Array
    lora_E: jax.Array
    lora_B: jax.Array
    scale: float = static_field(default=1.0)  # alpha / (init_r + 1e-5)
    layout: Layout = static_field(default=None)
    dropout: float = static_field(default=0.0)

    site: ClassVar[str] = "linear"
    mergeable: ClassVar[bool] = True

    def check_params(self, path: str, own: Mapping[str, Any]) -> None:
        self.layout.check_params(path, own, what="AdaLoRA adapter")
        n_in, n_out = self.layout.in_features, self.layout.out_features
        a, e, b = self.lora_A.shape[-2:], self.lora_E.shape[-1:], self.lora_B.shape[-2:]
        if a[0] != n_in or b[1] != n_out or not a[1] == e[0] == b[0]:
            raise ShapeMismatchError(
                f"the AdaLoRA site at {path!r} maps {n_in} -> {n_out} features but holds lora_A {a}, lora_E {e}, "
                f"lora_B {b}. Was the adapter made for another model?"
            )

    def delta_matrix(self) -> jax.Array:
        """``(A * E) @ B * scale`` as ``[in, out]`` (float32; merge only)."""
        f = jnp.float32
        return ((self.lora_A.astype(f) * self.lora_E.astype(f)[None, :]) @ self.lora_B.astype(f)) * self.scale

    def intercept(self, call: Call):
        lay = self.layout
        _inject.check_layout(call.path, lay, call.module, call.args, call.kwargs)
        y = call.run()
        # the branch in the adapter's dtype (float32) and one rounding of the sum, as PEFT (branch_dtype)
        dt = branch_dtype(y.dtype, self.lora_A, self.lora_E, self.lora_B)
        x = call.inputs
        x = dropout(x.astype(dt), self.dropout, call.dropout_key())
        if lay.kind == Kind.DENSE:  # the 2-D form (one contracted axis; see LoRA's note on XLA's CPU backend)
            x2 = x.reshape(-1, x.shape[-1])
            h = (x2 @ self.lora_A.astype(dt)) * self.lora_E.astype(dt)[None, :]
            return (y.astype(dt) + ((h @ self.lora_B.astype(dt)) * self.scale).reshape(y.shape)).astype(y.dtype)
        h = down_project(x, self.lora_A.astype(dt), lay, call.module)
        h = h * self.lora_E.astype(dt).reshape((1,) * (h.ndim - 1) + (-1,))
        return (y.astype(dt) + up_project(h, self.lora_B.astype(dt), lay) * self.scale).astype(y.dtype)

    def effective(self, own):
        """L2-SP's effective weights: the update in the kernel's shape."""
        return from_matrix(self.delta_matrix(), self.layout)

    def low_rank(self) -> LowRank:
        """The update as ``scale * (A * E) @ B``, so adapter merging and the bank can combine it."""
        f = jnp.float32
        return LowRank(self.lora_A.astype(f) * self.lora_E.astype(f)[None, :], self.lora_B.astype(f), self.scale,
                       self.layout, None, False, float(self.dropout))

    def partition_specs(self, module_specs):
        """``lora_A [in, r]`` takes the kernel's input-dimension entry, ``lora_B [r, out]`` its output
        entry (as LoRA's), ``lora_E`` is replicated."""
        lay = self.layout
        lead = self.lora_A.ndim - 2  # stacked (scanned) sites carry leading layer axes
        lead_e, kern_e = kernel_spec_entries(lay, module_specs, lead, "AdaLoRA")
        return dataclasses.replace(self, lora_A=P(*lead_e, flat_spec_entry(kern_e, lay.in_axes), None),
                                   lora_E=P(*lead_e, None), lora_B=P(*lead_e, None, flat_spec_entry(kern_e, lay.out_axes)))


def init_site(config: AdaLoraConfig, layout: Layout, key) -> AdaLoraWeights:
    r, n_in, n_out = int(config.init_r), layout.in_features, layout.out_features
    ka, ke, kb = jax.random.split(key, 3)
    if config.init_weights:
        a = 0.02 * jax.random.normal(ka, (n_in, r), jnp.float32)
        e = jnp.zeros((r,), jnp.float32)
        b = 0.02 * jax.random.normal(kb, (r, n_out), jnp.float32)
    else:
        a = jax.random.normal(ka, (n_in, r), jnp.float32)
        e = jax.random.normal(ke, (r,), jnp.float32)
        b = jax.random.normal(kb, (r, n_out), jnp.float32)
    return AdaLoraWeights(a, e, b, config.scaling, layout, float(config.dropout))


def init(config: AdaLoraConfig, params, key, infos) -> dict:
    """Creates the SVD-form factors of every targeted linear module (rank ``init_r``)."""
    leaves, layouts = linear_layouts(config.target_modules, params, infos, "jpeft's AdaLoRA adapts linear modules "
                                     "(Dense, DenseGeneral, Conv, Einsum; PEFT's nn.Linear, Conv1D and Conv2d)")
    out = {}
    for k, (path, lay) in zip(jax.random.split(key, len(layouts)), layouts.items()):
        out[path] = scan.make_site(lambda kk, own, lay=lay: init_site(config, lay, kk), path, lay, k, leaves[path])
    return out


# -- training: the rank allocator -----------------------------------------------------------------

def orthogonal_regularization(adapter: Mapping[str, Any]) -> jax.Array:
    """PEFT's AdaLoRA penalty: the mean over every ``A`` and ``B`` of ``||A^T A - I||_F`` and
    ``||B B^T - I||_F`` (the ``r x r`` Gram matrices). Add ``config.orth_reg_weight`` times it
    to the training loss.

    A triplet whose column of ``A`` (row of ``B``) is all zeros is one a loaded adapter dropped
    (:func:`jpeft.load_peft` puts the triplets a PEFT ``rank_pattern`` pruned back as zeros,
    where PEFT shrinks the module): its identity entry is left out, so the penalty is PEFT's over
    the kept triplets, and the same before and after a ``save_peft`` / ``load_peft`` round trip."""

    def frob(x):  # ||x||_F with a zero (not NaN) gradient at x = 0: a site with every triplet pruned
        n2 = jnp.sum(jnp.square(x))
        return jnp.where(n2 > 0, jnp.sqrt(jnp.where(n2 > 0, n2, 1.0)), 0.0)

    def pair(a, b):  # one module's two terms
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
        keep_a = jnp.any(a != 0, axis=0).astype(jnp.float32)
        keep_b = jnp.any(b != 0, axis=1).astype(jnp.float32)
        return jnp.stack([frob(a.T @ a - jnp.diag(keep_a)), frob(b @ b.T - jnp.diag(keep_b))])

    terms = []
    for path, node in adapter.items():
        inner = node.inner if isinstance(node, scan.Stacked) else node
        if isinstance(inner, SavedModule):  # SEQ_CLS's classifier copy: PEFT's penalty reads lora_A / lora_B only
            continue
        if not isinstance(inner, AdaLoraWeights):
            raise UnsupportedAdapterError(f"an AdaLoRA adapter holds a {type(inner).__name__} at {path!r}.")
        if isinstance(node, scan.Stacked):  # a layer-scanned site: each layer is one of PEFT's modules
            terms.append(jax.vmap(pair)(inner.lora_A, inner.lora_B).reshape(-1))
        else:
            terms.append(pair(inner.lora_A, inner.lora_B))
    return jnp.mean(jnp.concatenate(terms))


class AllocatorState(NamedTuple):
    """Exponential averages per adapter entry (trees shaped like the adapter): smoothed
    sensitivity ``|p * grad|`` (``ipt``) and its uncertainty (``unc``); ``None`` before the first
    update and after the final allocation (PEFT's ``reset_ipt``)."""

    ipt: Any = None
    unc: Any = None


def _sites(adapter) -> dict:
    """``{path: AdaLoraWeights}``; a module copy (SEQ_CLS's classifier, :class:`SavedModule`) is
    left out: PEFT's allocator scores the ``lora_`` parameters only, the copy trains plainly."""
    out = {}
    for path, node in adapter.items():
        if isinstance(node, SavedModule):
            continue
        if isinstance(node, scan.Stacked):
            raise UnsupportedModuleError(
                f"AdaLoRA's rank allocator ranks each module's triplets across the model, but {path!r} is a "
                "layer-scanned (stacked) site; train AdaLoRA on an unrolled model (scan_layers=False)."
            )
        if not isinstance(node, AdaLoraWeights):
            raise UnsupportedAdapterError(f"an AdaLoRA adapter holds a {type(node).__name__} at {path!r}.")
        out[path] = node
    return out


def budget_schedule(config: AdaLoraConfig, step: int, init_bgt: int, target_bgt: int) -> tuple[int, bool]:
    """``(budget, mask_now)`` at ``step``: PEFT's cubic schedule (``RankAllocator.budget_schedule``)."""
    tinit, tfinal, total = config.tinit, config.tfinal, config.total_step
    if step <= tinit:
        return init_bgt, False
    if step > total - tfinal:
        return target_bgt, True
    mul = 1 - (step - tinit) / (total - tfinal - tinit)
    return int((init_bgt - target_bgt) * (mul ** 3) + target_bgt), step % config.deltaT == 0


def _update_ipt(config: AdaLoraConfig, state: AllocatorState, adapter, grads) -> AllocatorState:
    ipt = jax.tree.map(lambda p, g: jnp.abs(p * g), adapter, grads)
    zeros = lambda t: jax.tree.map(jnp.zeros_like, t)
    avg = jax.tree.map(lambda e, i: config.beta1 * e + (1 - config.beta1) * i,
                       state.ipt if state.ipt is not None else zeros(ipt), ipt)
    unc = jax.tree.map(lambda u, i, e: config.beta2 * u + (1 - config.beta2) * jnp.abs(i - e),
                       state.unc if state.unc is not None else zeros(ipt), ipt, avg)
    return AllocatorState(avg, unc)


def triplet_scores(state: AllocatorState, adapter) -> dict:
    """``{path: [r]}``: each triplet's importance, ``s(E_i) + mean_j s(A_ji) + mean_j s(B_ij)``
    with ``s = ipt * unc`` per entry (PEFT's ``mask_to_budget``)."""
    out = {}
    for path in _sites(adapter):
        ipt, unc = state.ipt[path], state.unc[path]
        s = jax.tree.map(lambda i, u: i * u, ipt, unc)
        out[path] = s.lora_E + jnp.mean(s.lora_A, axis=0) + jnp.mean(s.lora_B, axis=1)
    return out


def rank_key(path: str) -> str:
    """The ``rank_pattern`` key of a module, as PEFT saves it (``model.layers.0.self_attn.q_proj.lora_E``)."""
    return f"{hf_name(path)}.lora_E"


def _above_kth(scores: Mapping[str, jax.Array], k) -> dict:
    """``{path: bool[r]}``: the triplets scoring above the ``k``-th smallest of all ``scores``
    (PEFT's ``kthvalue`` threshold; ties at it are pruned), every triplet for ``k <= 0`` (nothing
    to prune: PEFT's kthvalue has no ``k = 0``, which a valid schedule never asks for). ``k`` may
    be traced (the jitted :func:`allocator`)."""
    ranked = jnp.sort(jnp.concatenate([scores[p] for p in sorted(scores)]))
    thr = jnp.where(k > 0, ranked[jnp.clip(k - 1, 0, ranked.shape[0] - 1)], -jnp.inf)
    return {p: s > thr for p, s in scores.items()}


def mask_to_budget(state: AllocatorState, adapter, budget: int) -> tuple[dict, dict]:
    """Zeroes the ``E`` entries of the lowest-scoring triplets so that ``budget`` remain
    (ties at the threshold are pruned too, as in PEFT). Returns ``(adapter, rank_pattern)``."""
    sites = _sites(adapter)
    init_bgt = sum(int(n.lora_E.shape[0]) for n in sites.values())
    kept = _above_kth(triplet_scores(state, adapter), init_bgt - int(budget))
    out, pattern = dict(adapter), {}
    for path, node in sites.items():
        keep = kept[path]
        out[path] = dataclasses.replace(node, lora_E=jnp.where(keep, node.lora_E, jnp.zeros_like(node.lora_E)))
        pattern[rank_key(path)] = tuple(bool(b) for b in np.asarray(keep))
    return out, pattern


def mask_using_rank_pattern(adapter, rank_pattern: Mapping[str, Any]) -> dict:
    """Zeroes the ``E`` entries ``rank_pattern`` drops (the ranks stay fixed after the schedule)."""
    out = dict(adapter)
    sites = _sites(adapter)
    missing = sorted(rank_key(p) for p in sites if rank_key(p) not in rank_pattern)
    if missing:  # a pattern of another adapter (PEFT raises KeyError); masking the rest would be silent
        raise ConfigError(f"rank_pattern has no entry for {missing[:3]}{' ...' if len(missing) > 3 else ''} of this "
                          "adapter's sites; use the pattern the final allocation of this adapter returned.")
    for path, node in sites.items():
        keep = rank_pattern.get(rank_key(path))
        if keep is not None:
            out[path] = dataclasses.replace(node, lora_E=jnp.where(jnp.asarray(keep), node.lora_E, 0.0).astype(node.lora_E.dtype))
    return out


def _clip_like_torch(grads, max_grad_norm):
    """``grads`` scaled as ``torch.nn.utils.clip_grad_norm_`` scales them in place (what
    transformers' ``Trainer`` runs before the optimizer step, so what PEFT's allocator reads as
    ``p.grad``): by ``min(1, max_grad_norm / (norm + 1e-6))``, the norm over every array."""
    if max_grad_norm is None:
        return grads
    if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float, np.floating)) \
            or not 0 < max_grad_norm < float("inf"):
        raise ConfigError(f"update_and_allocate: max_grad_norm must be None or a finite number > 0 (the clipping norm "
                          f"of the optimizer, e.g. train.max_grad_norm), found {max_grad_norm!r}.")
    leaves = [jnp.asarray(g, jnp.float32) for g in jax.tree.leaves(grads)]
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in leaves)) if leaves else jnp.float32(0)
    coef = jnp.minimum(1.0, float(max_grad_norm) / (norm + 1e-6))
    return jax.tree.map(lambda g: (g * coef).astype(g.dtype), grads)


def update_and_allocate(config: AdaLoraConfig, state: AllocatorState, adapter, grads, step: int, *,
                        max_grad_norm: Optional[float] = None):
    """One step of PEFT's ``AdaLoraModel.update_and_allocate``: call it after each optimizer
    update with the new adapter and the gradients of that step.

    PEFT's allocator reads ``p.grad`` after the step, which under transformers' ``Trainer``
    (or any loop calling ``torch.nn.utils.clip_grad_norm_``) holds the *clipped* gradients.
    When your optimizer clips (``optax.clip_by_global_norm(c)``, ``jpeft train``'s
    ``max_grad_norm``), pass ``max_grad_norm=c`` with the raw gradients: they are scaled as
    torch scales them before the sensitivities are taken, so the ranks equal PEFT's. Without it
    the raw gradients are used (a loop that does not clip); with clipping active on some steps
    that ranks other triplets (an audit's 12-step run pruned a different triplet at step 5).

    Returns:
      ``(adapter, state, rank_pattern)``: the adapter with the pruned triplets' ``E`` set to zero,
      the new averages, and the rank pattern when this step allocated (``None`` otherwise); keep
      the latest with ``config = config.replace(rank_pattern=rank_pattern)``.
    """
    sites = _sites(adapter)
    if jax.tree.structure(grads) != jax.tree.structure(adapter):
        raise InputValidationError("update_and_allocate: grads must be the gradient tree of this adapter (the same "
                                   f"sites and arrays); found {len(jax.tree.leaves(grads))} arrays for the adapter's "
                                   f"{len(jax.tree.leaves(adapter))}.")
    grads = _clip_like_torch(grads, max_grad_norm)
    init_bgt = sum(int(n.lora_E.shape[0]) for n in sites.values())
    target_bgt = int(config.target_r) * len(sites)
    final = config.total_step - config.tfinal
    if step < final:
        state = _update_ipt(config, state, adapter, grads)
        budget, now = budget_schedule(config, step, init_bgt, target_bgt)
        if not now:
            return adapter, state, None
        adapter, pattern = mask_to_budget(state, adapter, budget)
        return adapter, state, pattern
    if step == final:
        if state.ipt is None:
            raise ConfigError(
                f"update_and_allocate at the final allocation (step {step} = total_step - tfinal) ranks triplets by the "
                "sensitivity averages the earlier steps kept, but this AllocatorState is empty (a fresh state, e.g. "
                "after a restart): keep the state returned by each earlier step (it is a pytree of arrays; save it "
                "with the adapter), or allocate before the final step.")
        budget, _ = budget_schedule(config, step, init_bgt, target_bgt)
        adapter, pattern = mask_to_budget(state, adapter, budget)
        return adapter, AllocatorState(), pattern
    if config.rank_pattern is None:
        raise ConfigError(
            f"update_and_allocate at step {step} (after total_step - tfinal = {final}) masks with config.rank_pattern, "
            "which is None; pass config.replace(rank_pattern=...) with the pattern the final allocation returned."
        )
    return mask_using_rank_pattern(adapter, config.rank_pattern), state, None


# -- the rank allocator as an optax transformation (the one training loop) --------------------------

class RankAllocatorState(NamedTuple):
    """The optimizer state of :func:`allocator`: a pytree of arrays, checkpointed, sharded and
    donated with the rest of the optimizer state.

    ``count``: the updates applied (the step number of the last one: PEFT's ``update_and_allocate(s)``
    with ``s = 1`` after the first optimizer step, e.g. ``state.global_step + 1`` in a ``Trainer``
    callback's ``on_optimizer_step``);
    ``inner``: the wrapped optimizer's state; ``ipt``, ``unc``: the sensitivity and uncertainty
    averages (float32 trees shaped like the adapter); ``keep``: ``{path: bool[init_r]}``, the
    triplets the last allocation kept (the fixed mask after ``total_step - tfinal``);
    ``allocated``: whether an allocation happened (:func:`rank_pattern` is ``None`` before)."""

    count: jax.Array
    inner: Any
    ipt: Any
    unc: Any
    keep: Any
    allocated: jax.Array


def _allocator_tables(config: AdaLoraConfig, init_bgt: int, target_bgt: int):
    """``(budget, allocate)`` per step ``0 .. total_step`` (host integers, from
    :func:`budget_schedule`): the budget PEFT masks to and whether step ``s`` allocates (on
    PEFT's ``deltaT`` grid before ``total_step - tfinal``, and at it)."""
    final = config.total_step - config.tfinal
    budget, alloc = [], []
    for s in range(config.total_step + 1):
        b, now = budget_schedule(config, s, init_bgt, target_bgt)
        budget.append(b)
        alloc.append((s < final and now) or s == final)
    return np.asarray(budget, np.int32), np.asarray(alloc, bool)


def allocator(config: AdaLoraConfig, inner) -> "optax.GradientTransformation":
    """AdaLoRA's rank allocator (PEFT's ``update_and_allocate``) around the optimizer ``inner``,
    as one optax transformation, so AdaLoRA trains in any jitted step
    (:func:`jpeft.make_train_step`, :func:`jpeft.make_sharded_train_step`,
    :func:`jpeft.make_pmap_train_step`) run by :func:`jpeft.fit`, and its state
    (:class:`RankAllocatorState`) is checkpointed and resumed with the optimizer state.

    Each update runs ``inner``, takes the new adapter ``p + inner_update``, updates the
    sensitivity averages with ``|p_new * grad|`` (PEFT reads ``p`` after the optimizer step and
    ``p.grad``), and on the steps PEFT allocates zeroes the ``lora_E`` entries of the
    lowest-scoring triplets (threshold and ties as :func:`mask_to_budget`); after
    ``total_step - tfinal`` it applies the final mask every step. The step is the count of
    updates applied (a step the non-finite guard skipped does not count). Place it after any
    clipping, ``optax.chain(optax.clip_by_global_norm(c), allocator(config, optax.adamw(...)))``:
    it then reads the clipped gradients, as PEFT under transformers' ``Trainer`` reads ``p.grad``
    after ``clip_grad_norm_``. :func:`rank_pattern` reads the kept triplets from the state
    (``config.trained_config(opt_state)``: the config to save with). ``update`` needs
    ``params`` (the adapter's trainable arrays).

    Raises:
      ConfigError: ``config`` is not an :class:`AdaLoraConfig` or ``inner`` not an optax
        transformation; ``update`` without ``params``.
      UnsupportedAdapterError, UnsupportedModuleError: (at ``init``) an adapter that is not
        AdaLoRA's, or a layer-scanned site (the allocator ranks each module's triplets).
    """
    if not isinstance(config, AdaLoraConfig):
        raise ConfigError(f"adalora.allocator needs an AdaLoraConfig, found {type(config).__name__}.")
    if not (hasattr(inner, "init") and hasattr(inner, "update")):
        raise ConfigError(f"adalora.allocator wraps an optax transformation (e.g. optax.adamw(1e-3)), found "
                          f"{type(inner).__name__}.")
    final = config.total_step - config.tfinal

    def sites_of(params):
        if not isinstance(params, Mapping):
            raise UnsupportedAdapterError(f"adalora.allocator optimizes an AdaLoRA adapter ({{path: AdaLoraWeights}}), "
                                          f"found {type(params).__name__}.")
        other = [(p, n) for p, n in params.items()
                 if not isinstance(getattr(n, "unstacked", n), (AdaLoraWeights, SavedModule))]
        if other:
            raise UnsupportedAdapterError(
                f"adalora.allocator optimizes an AdaLoRA adapter ({{path: AdaLoraWeights}}), but {other[0][0]!r} holds a "
                f"{type(getattr(other[0][1], 'inner', other[0][1])).__name__}; wrap the optimizer with the config of the "
                "adapter it trains (config.wrap_optimizer(tx)).")
        sites = _sites(params)
        if not sites:
            raise UnsupportedAdapterError("adalora.allocator got an adapter with no AdaLoRA site; build it with "
                                          "jpeft.init(AdaLoraConfig(...), params, key).")
        return sites

    def init_fn(params):
        sites = sites_of(params)
        f32 = lambda t: jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), t)  # noqa: E731
        keep = {p: jnp.ones(jnp.shape(n.lora_E), bool) for p, n in sites.items()}
        return RankAllocatorState(jnp.zeros((), jnp.int32), inner.init(params), f32(params), f32(params), keep,
                                  jnp.zeros((), bool))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ConfigError("adalora.allocator's update needs params (the adapter): call "
                              "optimizer.update(grads, opt_state, adapter), as jpeft's train steps do.")
        sites = sites_of(params)
        paths = sorted(sites)
        init_bgt = sum(int(sites[p].lora_E.shape[0]) for p in paths)
        budget_t, alloc_t = _allocator_tables(config, init_bgt, int(config.target_r) * len(paths))
        inner_updates, inner_state = inner.update(updates, state.inner, params)
        new_p = optax.apply_updates(params, inner_updates)  # what PEFT reads after optimizer.step()
        step = state.count + 1
        at = jnp.minimum(step, config.total_step)
        # the averages, before total_step - tfinal (PEFT's update_ipt)
        ipt_now = jax.tree.map(lambda p, g: jnp.abs(p.astype(jnp.float32) * g.astype(jnp.float32)), new_p, updates)
        avg = jax.tree.map(lambda e, i: config.beta1 * e + (1 - config.beta1) * i, state.ipt, ipt_now)
        unc = jax.tree.map(lambda u, i, e: config.beta2 * u + (1 - config.beta2) * jnp.abs(i - e), state.unc, ipt_now, avg)
        averaging = step < final
        avg = jax.tree.map(lambda n, o: jnp.where(averaging, n, o), avg, state.ipt)
        unc = jax.tree.map(lambda n, o: jnp.where(averaging, n, o), unc, state.unc)
        # the allocation (PEFT's mask_to_budget): kthvalue of the scores at k = init_bgt - budget
        kept = _above_kth(triplet_scores(state._replace(ipt=avg, unc=unc), params), init_bgt - jnp.asarray(budget_t)[at])
        allocate = jnp.asarray(alloc_t)[at] & (step <= config.total_step)  # past total_step: the final mask
        keep = {p: jnp.where(allocate, kept[p], state.keep[p]) for p in paths}
        masking = allocate | (step > final)
        out = dict(inner_updates)
        for p in paths:  # a pruned E entry's update takes it to zero: p + (-p) = 0 exactly
            u, old = inner_updates[p], params[p]
            drop = masking & ~keep[p]
            out[p] = dataclasses.replace(u, lora_E=jnp.where(drop, -old.lora_E, u.lora_E).astype(u.lora_E.dtype))
        return out, RankAllocatorState(step, inner_state, avg, unc, keep, state.allocated | allocate)

    return optax.GradientTransformation(init_fn, update_fn)


def _allocator_states(opt_state) -> list:
    is_state = lambda x: isinstance(x, RankAllocatorState)  # noqa: E731
    return [x for x in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(x)]


def _pattern_of(state: RankAllocatorState):
    allocated = host_array(state.allocated)
    lead = allocated.ndim  # make_pmap_train_step's state carries a leading device axis: its copies are equal
    if not bool(allocated.reshape(-1)[0]):
        return None
    return {rank_key(p): tuple(bool(b) for b in host_array(k)[(0,) * lead]) for p, k in sorted(state.keep.items())}


def rank_pattern(opt_state) -> Optional[dict]:
    """The ``rank_pattern`` (``{"<module>.lora_E": (bool, ...)}``, as :func:`update_and_allocate`
    returns it and PEFT saves it) of the last allocation of the :func:`allocator` in
    ``opt_state``; ``None`` before the first. ``config.trained_config(opt_state)`` is the config
    with it, what :func:`jpeft.hf.save_peft` writes the kept triplets of.

    Raises:
      ConfigError: ``opt_state`` holds no allocator state, or several.
    """
    states = _allocator_states(opt_state)
    if len(states) != 1:
        raise ConfigError(f"rank_pattern reads the state of one adalora.allocator in the optimizer state, found "
                          f"{len(states)}; pass the opt_state of the optimizer config.wrap_optimizer(...) (or "
                          "adalora.allocator(config, ...)) returned.")
    return _pattern_of(states[0])


# -- Hugging Face PEFT format -------------------------------------------------------------------
# per site: lora_A [r, in], lora_E [r, 1], lora_B [out, r] (no ".weight"); with a rank_pattern only
# the kept triplets are written and PEFT resizes its modules to them on load.

_TENSORS = ("lora_A", "lora_E", "lora_B")


def _to_hf(config: AdaLoraConfig, adapter, ctx):
    tensors, targets, padded = {}, [], {}
    rp = config.rank_pattern or {}
    written = dict(rp)
    for path, node in sorted(_sites(adapter).items()):
        check_conv_for_peft(path, node.layout, "AdaLoRA", (2,))  # PEFT's SVDConv2d: no Conv1d
        if node.layout.peft_padding_differs is not None:
            padded[path] = node.layout.peft_padding_differs
        keep = np.asarray(rp.get(rank_key(path), (True,) * node.lora_E.shape[0]), bool)
        if keep.shape != node.lora_E.shape:
            raise UnsupportedAdapterError(
                f"the AdaLoRA site {path!r} has rank {node.lora_E.shape[0]}, but config.rank_pattern holds "
                f"{keep.shape[0]} entries for it; use the config the adapter was trained with."
            )
        a, e, b = (np.asarray(x, np.float32) for x in (node.lora_A, node.lora_E, node.lora_B))
        # between two allocations (deltaT > 1, before total_step - tfinal) the optimizer moves the E entries the last
        # allocation zeroed (as in PEFT); those triplets still act, so they are written (and marked kept) too
        keep = keep | (e.reshape(-1) != 0)
        if rank_key(path) in rp:
            written[rank_key(path)] = tuple(bool(k) for k in keep)
        # PEFT's SVDConv2d holds lora_A [r, in * kh * kw], its columns in PyTorch's (in, kh, kw) order
        a_t = conv_rows_to_torch(a, node.layout).reshape(a.shape[1], -1) if node.layout.kind == Kind.CONV else a.T
        tensors[peft_key(path, "lora_A")] = np.ascontiguousarray(a_t[keep])
        tensors[peft_key(path, "lora_E")] = np.ascontiguousarray(e[keep].reshape(-1, 1))
        tensors[peft_key(path, "lora_B")] = np.ascontiguousarray(b.T[:, keep])
        targets.append(hf_name(path))
    d = {k: v for k, v in config.to_dict().items() if k != "peft_type"}
    d["target_modules"] = targets
    d["rank_pattern"] = None if config.rank_pattern is None else {k: list(v) for k, v in written.items()}
    d.update(r=8, fan_in_fan_out=ctx.fan_in_fan_out, bias="none", modules_to_save=None, use_rslora=False,
             use_dora=False, alpha_pattern={}, layers_to_transform=None, layers_pattern=None, exclude_modules=None)
    needs_peft(d, PEFT_CONV_FORWARD, padded, f"their nn.Conv has {' / '.join(sorted(set(padded.values())))}, and PEFT "
               "0.21 adds AdaLoRA's conv update zero-padded (F.conv2d), PEFT 0.22 through the base's own padding, "
               "as jpeft")
    return d, tensors


def _from_hf(d, tensors, params, ctx):
    kept = dict(d)
    if set(kept.get("modules_to_save") or ()) <= set(HEAD_MODULES):  # a task head's copy: checked by jpeft.hf
        kept["modules_to_save"] = None
    if kept.get("target_modules") is None:
        raise UnsupportedAdapterError(f"the AdaLoRA adapter in {ctx.folder!r} has target_modules=null; set it explicitly.")
    init = kept.get("init_lora_weights", True)
    if isinstance(init, str) and init:  # an init's name (LoraConfig's init_weights, which AdaLoRA inherits): PEFT's
        kept["init_lora_weights"] = True  # AdaLoRA takes any true value for its own init, and the file holds the tensors
    elif init not in (True, False):
        raise UnsupportedAdapterError(
            f"the AdaLoRA adapter in {ctx.folder!r} has init_lora_weights={init!r}; jpeft's AdaLoRA loads true (or an "
            "init's name, which PEFT's AdaLoRA reads as true) or false.")
    config = config_from_peft(AdaLoraConfig, kept, ctx.folder)
    by_site = site_tensors(tensors, _TENSORS, ctx.leaves, config.target_modules)
    rp, r0 = config.rank_pattern or {}, int(config.init_r)
    adapter = {}
    for path in sorted(by_site):
        t, lay = by_site[path], peft_padded_conv_layout(path, ctx.leaves[path], ctx, "AdaLoRA", "Conv2d")
        if lay.kind == Kind.CONV and len(lay.kernel_shape) != 4:
            raise UnsupportedAdapterError(
                f"the AdaLoRA adapter in {ctx.folder!r} adapts {hf_name(path)!r}, a {len(lay.kernel_shape) - 2}-D "
                "nn.Conv; Hugging Face PEFT's AdaLoRA adapts Linear and Conv2d layers only (SVDConv2d), so no PEFT "
                "computes this site. Load it on the base it was made for.")
        missing = [n for n in _TENSORS if n not in t]
        if missing:
            raise CheckpointError(f"AdaLoRA site {hf_name(path)!r} in {ctx.folder!r} lacks {missing}; the file is incomplete.")
        keep = np.asarray(rp.get(rank_key(path), (True,) * r0), bool)
        r = int(keep.sum())
        want = {"lora_A": (r, lay.in_features), "lora_E": (r, 1), "lora_B": (lay.out_features, r)}
        bad = {n: tuple(t[n].shape) for n, s in want.items() if tuple(t[n].shape) != s}
        if bad:
            raise BaseMismatchError(
                f"AdaLoRA site {hf_name(path)!r}: tensors {bad}, expected {want} for {r} kept triplets of init_r={r0} on a "
                f"module mapping {lay.in_features} -> {lay.out_features} features."
            )
        # back to init_r rows (the dropped triplets as zeros), so every site keeps one shape
        a = np.zeros((lay.in_features, r0), np.float32)
        e = np.zeros((r0,), np.float32)
        b = np.zeros((r0, lay.out_features), np.float32)
        a_rows = conv_rows_from_torch(t["lora_A"], lay) if lay.kind == Kind.CONV else t["lora_A"].T
        a[:, keep], e[keep], b[keep] = a_rows, t["lora_E"].reshape(-1), t["lora_B"].T
        adapter[path] = AdaLoraWeights(jnp.asarray(a, ctx.dtype), jnp.asarray(e, ctx.dtype), jnp.asarray(b, ctx.dtype),
                                       config.scaling, lay, float(config.dropout))
    return config, adapter


def budget_rows(model_type: str, targets):
    """``Method.budget``: AdaLoRA's starting rank (PEFT's defaults) on PEFT's default targets (LoRA's)."""
    t = targets["lora"]
    names = t if isinstance(t, str) else "+".join(t)
    return [("AdaLoRA", f"init_r=12, target_r=8, {names} (at the start)",
             lambda: AdaLoraConfig(init_r=12, target_r=8, total_step=1000, target_modules=t))]


ADALORA = register_method(Method(config=AdaLoraConfig, init=init, nodes=(AdaLoraWeights,), to_hf=_to_hf,
                                 from_hf=_from_hf, budget=budget_rows))
