"""A forgetting guard for :func:`jpeft.fit`: canary data for what must not be forgotten,
checked every N steps against the frozen base, with a budget that stops the run or rolls it
back.

The base is frozen, so its canary logits are computed once (:meth:`ForgettingGuard.start`)
and kept on the device. Each check runs the adapted model on the same canary batches and
measures the **loss rise** (canary next-token loss of the adapted model minus the base's,
in nats) and the **mean per-token KL(base || adapted)** (:func:`jpeft.forgetting.metrics.mean_token_kl`),
both token-weighted over all canary batches. A check within budget keeps a device copy of
the adapter and optimizer state (the train step donates its buffers, so a copy, not a
reference). A check over budget either

* ``action="stop"``: ends the run; :func:`jpeft.fit` returns the kept copy (the state of the
  last within-budget check), or
* ``action="rollback"``: restores the kept copy, multiplies the learning rate by
  ``lr_factor`` and continues with the next batch (step numbers and data keep moving
  forward); after ``max_rollbacks`` rollbacks the next crossing stops the run as above.

The learning rate is lowered through an optax stage at the end of the optimizer chain,
:func:`lr_scale` (``optax.inject_hyperparams(optax.scale)``): its ``lr_scale``
hyperparameter lives in the optimizer state, multiplies every update (for Adam/AdamW, the
same as multiplying the learning rate, schedule included), is saved with checkpoints, and
changing it does not recompile the step. At 1.0 it is bit-exact (``x * 1.0 == x``).

>>> import jax.numpy as jnp, optax
>>> opt = optax.chain(optax.adam(1e-2), lr_scale())
>>> s = scale_lr(opt.init({"w": jnp.zeros(2)}), 0.5)
>>> float(current_lr_scale(s))
0.5
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jpeft.data import causal_lm_loss
from jpeft.errors import ConfigError, InputValidationError
from jpeft.forgetting.metrics import mean_token_kl
from jpeft.methods.base import Site
from jpeft.tree import host_array

__all__ = ["ForgettingGuard", "lr_scale", "scale_lr", "current_lr_scale", "canary_stats"]

ACTIONS = ("stop", "rollback")


def _scale(lr_scale):
    return optax.scale(lr_scale)


def lr_scale(value: float = 1.0) -> optax.GradientTransformation:
    """An optax stage that multiplies updates by ``lr_scale``, kept in the optimizer state so
    :func:`scale_lr` can lower it during a run. Put it last in the chain."""
    return optax.inject_hyperparams(_scale)(lr_scale=value)


def _is_scale_state(x) -> bool:
    return isinstance(x, tuple) and hasattr(x, "hyperparams") and isinstance(x.hyperparams, dict) \
        and "lr_scale" in x.hyperparams


def _scale_states(opt_state) -> list:
    return [x for x in jax.tree.leaves(opt_state, is_leaf=_is_scale_state) if _is_scale_state(x)]


def _stage_after_scale(opt_state) -> bool:
    """Whether a stage follows :func:`lr_scale` in an ``optax.chain`` (whose state is a plain
    tuple of its stages' states) or an ``optax.named_chain`` (a dict of them, in order):
    scaling the updates before Adam, a clip or any other stage then does not scale the step by
    the factor (Adam divides it out), so a rollback would lower nothing. The dict of
    ``optax.partition`` / ``multi_transform`` (``inner_states``) holds parallel groups, no order."""
    def walk(x, parallel: bool = False) -> tuple[bool, bool]:  # (found, a stage after it)
        if _is_scale_state(x):
            return True, False
        children = list(x.values()) if isinstance(x, dict) else list(x) if isinstance(x, (tuple, list)) else []
        fields = getattr(x, "_fields", ())
        ordered = not parallel and (type(x) is tuple or isinstance(x, dict))
        for i, c in enumerate(children):
            found, after = walk(c, parallel=i < len(fields) and fields[i] == "inner_states")
            if found:
                return True, after or (ordered and i != len(children) - 1)
        return False, False

    return walk(opt_state)[1]


def _check_scale_last(opt_state) -> None:
    if _stage_after_scale(opt_state):
        raise ConfigError("jpeft.lr_scale() is not the last stage of the optimizer's optax.chain, so lowering it does not "
                          "lower the step by that factor (a stage after it, such as Adam, divides the scale out): a "
                          "rollback would lower nothing. Put it last: optax.chain(optax.adamw(...), jpeft.lr_scale()).")


def current_lr_scale(opt_state):
    """The ``lr_scale`` in ``opt_state`` (from :func:`lr_scale`), or ``None`` when it has none."""
    found = _scale_states(opt_state)
    return None if not found else found[0].hyperparams["lr_scale"]


def scale_lr(opt_state, factor: float):
    """``opt_state`` with its :func:`lr_scale` multiplied by ``factor`` (a new tree).

    Raises:
      ConfigError: the optimizer has no :func:`lr_scale` stage.
    """
    if not _scale_states(opt_state):
        raise ConfigError("the optimizer state has no lr_scale stage, so the learning rate cannot be lowered; build "
                          "the optimizer as optax.chain(..., jpeft.lr_scale()) to use action='rollback'.")
    _check_scale_last(opt_state)

    def one(x):
        if not _is_scale_state(x):
            return x
        old = x.hyperparams["lr_scale"]
        return x._replace(hyperparams={**x.hyperparams, "lr_scale": jnp.asarray(old * factor, jnp.asarray(old).dtype)})

    return jax.tree.map(one, opt_state, is_leaf=_is_scale_state)


def _residual_marks(adapter) -> list:
    """The residual-base inits the adapter's sites are marked with (``jpeft.init_pissa`` & co.)."""
    if not isinstance(adapter, dict):
        return []
    return sorted({n.residual for n in adapter.values() if isinstance(n, Site) and n.residual})


def _copy(tree):
    return jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, tree)


def _stats(base_logits, logits, input_ids, loss_mask):
    """Per-row canary loss of the adapted model and of the base, per-row mean KL and target
    counts: ``causal_lm_loss`` and ``mean_token_kl`` applied row by row."""
    def row(bl, nl, ids, m):
        new, n = causal_lm_loss(nl[None], ids[None], m[None])
        base, _ = causal_lm_loss(bl[None], ids[None], m[None])
        w = jnp.concatenate([m[1:], jnp.zeros_like(m[:1])]).astype(jnp.float32)  # the positions with a target
        return new, base, mean_token_kl(bl, nl, w), n

    return jax.vmap(row)(base_logits, logits, input_ids, loss_mask)


_stats_jit = jax.jit(_stats)


def _mask(batch):
    ids = batch["input_ids"]
    m = batch.get("loss_mask")
    return jnp.ones(jnp.shape(ids), jnp.int32) if m is None else m


def canary_stats(logits_fn: Callable, params, adapter, canary: Iterable, base_logits=None) -> dict:
    """Per-example forgetting of ``adapter`` on the canary batches, as host arrays:
    ``loss`` and ``base_loss`` (next-token loss of each row, nats), ``kl`` (mean per-token
    KL(base || adapted) of each row), ``tokens`` (targets per row), and the token-weighted
    totals ``canary_loss``, ``base_loss_mean``, ``loss_rise`` and ``kl_mean``.
    ``base_logits`` (one array per batch) skips the base's forward pass."""
    rows = {"loss": [], "base_loss": [], "kl": [], "tokens": []}
    for i, b in enumerate(canary):
        logits = logits_fn(params, adapter, b)
        bl = logits_fn(params, None, b) if base_logits is None else base_logits[i]
        out = _stats_jit(bl, logits, b["input_ids"], _mask(b))
        for k, v in zip(rows, out):
            rows[k].append(host_array(v).astype(np.float64))  # a canary split across processes: ShardingError
    res = {k: np.concatenate(v) for k, v in rows.items()}
    n = max(res["tokens"].sum(), 1.0)
    res["canary_loss"] = float((res["loss"] * res["tokens"]).sum() / n)
    res["base_loss_mean"] = float((res["base_loss"] * res["tokens"]).sum() / n)
    res["loss_rise"] = res["canary_loss"] - res["base_loss_mean"]
    res["kl_mean"] = float((res["kl"] * res["tokens"]).sum() / n)
    return res


class ForgettingGuard:
    """Canary checks with a forgetting budget, run by :func:`jpeft.fit` (``forgetting=``).

    Args:
      canary: a list of canary batches (dicts with ``input_ids [B, L]`` and optionally
        ``loss_mask [B, L]``, as :class:`jpeft.data.PackedDataset` makes); kept for the run.
      logits_fn: ``logits_fn(params, adapter, batch) -> logits [B, L, V]``, deterministic (no
        dropout); ``adapter=None`` must give the base model.
      max_loss_rise: the largest allowed canary loss rise over the base, in nats (``None``: no limit).
      max_kl: the largest allowed mean per-token KL(base || adapted), in nats (``None``: no limit).
      every: check every this many steps (and at the run's last step).
      action: ``"stop"`` or ``"rollback"`` (needs :func:`lr_scale` in the optimizer).
      lr_factor: the learning-rate multiplier of a rollback, in (0, 1).
      max_rollbacks: rollbacks allowed before a crossing stops the run.
      base_params: the params of the model the canary is compared with (``logits_fn(base_params,
        None, batch)``); default: the params :func:`jpeft.fit` trains on. Give the original base
        when those are a residual base (:func:`jpeft.init_pissa`, ``init_olora``, ``init_milora``,
        ``init_corda``), whose model without the adapter is not the base; an adapter marked as
        relative to a residual base is refused without it.

    After the run, :attr:`report` holds ``checks`` (one dict per check), ``events`` (each
    rollback or stop), ``kept_step`` (the step of the state returned on a stop), ``stopped``
    and ``rollbacks``.
    """

    def __init__(self, canary, logits_fn: Callable, *, max_loss_rise: Optional[float] = None,
                 max_kl: Optional[float] = None, every: int = 100, action: str = "stop", lr_factor: float = 0.5,
                 max_rollbacks: int = 3, base_params=None):
        self.canary = list(canary)
        if not self.canary:
            raise InputValidationError("the forgetting guard got no canary batch; expected at least one batch of "
                                       "input_ids. Check the canary file and canary_batches.")
        targets = 0
        for i, b in enumerate(self.canary):
            if not hasattr(b, "get") or b.get("input_ids") is None or np.ndim(b["input_ids"]) != 2:
                raise InputValidationError(f"canary batch {i} must be a dict with input_ids [batch, length], found "
                                           f"{type(b).__name__}.")
            m = b.get("loss_mask")
            if m is not None and np.shape(m) != np.shape(b["input_ids"]):
                raise InputValidationError(f"canary batch {i}: loss_mask must have the shape of input_ids "
                                           f"{tuple(np.shape(b['input_ids']))}, found {tuple(np.shape(m))}.")
            m = np.ones(np.shape(b["input_ids"])) if m is None else np.asarray(m)
            targets += int(np.count_nonzero(m[:, 1:]))  # position t > 0 is a next-token target
        if not targets:
            raise InputValidationError(
                f"the forgetting guard's {len(self.canary)} canary batch(es) hold no next-token target (every loss_mask "
                "entry after the first position is 0), so the canary loss rise and KL would always read 0 and the "
                "budget could never be crossed. Give canary rows with loss_mask 1 on the tokens to keep.")
        for name, v in (("max_loss_rise", max_loss_rise), ("max_kl", max_kl)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0):
                raise ConfigError(f"{name} must be a non-negative number or None, found {v!r}.")
        if max_loss_rise is None and max_kl is None:
            raise ConfigError("the forgetting guard needs a budget: set max_loss_rise, max_kl or both.")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError(f"every must be a positive integer (steps between canary checks), found {every!r}.")
        if action not in ACTIONS:
            raise ConfigError(f"action must be one of {list(ACTIONS)}, found {action!r}.")
        if isinstance(lr_factor, bool) or not isinstance(lr_factor, (int, float)) or not 0 < lr_factor < 1:
            raise ConfigError(f"lr_factor must be a number in (0, 1), found {lr_factor!r}.")
        if isinstance(max_rollbacks, bool) or not isinstance(max_rollbacks, int) or max_rollbacks < 0:
            raise ConfigError(f"max_rollbacks must be a non-negative integer, found {max_rollbacks!r}.")
        self.logits_fn = logits_fn
        self.max_loss_rise = None if max_loss_rise is None else float(max_loss_rise)
        self.max_kl = None if max_kl is None else float(max_kl)
        self.every, self.action = every, action
        self.lr_factor, self.max_rollbacks = float(lr_factor), max_rollbacks
        self.base_params = base_params
        self._base_logits = None
        self._kept: Optional[tuple] = None
        self.report: dict = {}

    # -- measuring -------------------------------------------------------------------------
    def measure(self, params, adapter) -> dict:
        """The canary metrics of ``adapter``: ``canary_loss``, ``canary_loss_rise``, ``canary_kl``."""
        s = canary_stats(self.logits_fn, params, adapter, self.canary, self._base_logits)
        return {"canary_loss": s["canary_loss"], "canary_loss_rise": s["loss_rise"], "canary_kl": s["kl_mean"]}

    def over_budget(self, m: dict) -> list:
        """The budget lines ``m`` crosses (empty: within budget)."""
        out = []
        # a non-finite measurement (a diverged adapter, an overflowing canary) is not within any budget
        for k in ("canary_loss_rise", "canary_kl"):
            if not np.isfinite(m[k]):
                out.append(f"{k.replace('_', ' ')} is {m[k]} (not finite)")
        if self.max_loss_rise is not None and m["canary_loss_rise"] > self.max_loss_rise:
            out.append(f"canary loss rise {m['canary_loss_rise']:.4g} > max_loss_rise {self.max_loss_rise:g}")
        if self.max_kl is not None and m["canary_kl"] > self.max_kl:
            out.append(f"canary KL {m['canary_kl']:.4g} > max_kl {self.max_kl:g}")
        return out

    def due(self, step: int, total_steps: Optional[int]) -> bool:
        return step % self.every == 0 or step == total_steps

    # -- the run ---------------------------------------------------------------------------
    def start(self, params, adapter, opt_state, step: int, resumed: Optional[dict] = None) -> dict:
        """Computes the base's canary logits (once), measures and keeps the starting state.

        ``resumed``: the :meth:`state` saved with the checkpoint a run resumes from
        (:attr:`jpeft.checkpoint.TrainState.extra`): the guard continues with that run's kept
        state, checks and rollback count, as if it had not stopped, and returns the metrics of
        its last check (nothing is measured).

        Raises:
          ConfigError: ``action="rollback"`` without :func:`lr_scale` as the optimizer's last stage, a
            starting adapter already over the budget (it would be kept as the state within budget),
            or an adapter relative to a residual base without ``base_params``."""
        if self.action == "rollback" and current_lr_scale(opt_state) is None:
            raise ConfigError("action='rollback' lowers the learning rate through jpeft.lr_scale(), but the optimizer "
                              "has no such stage; build it as optax.chain(..., jpeft.lr_scale()), or use action='stop'.")
        if self.action == "rollback":
            _check_scale_last(opt_state)
        marks = _residual_marks(adapter)
        if marks and self.base_params is None:
            # params is then the residual base (the base minus the initial adapter): its model without the adapter
            # is not the base, and every check would measure the distance to that model instead
            raise ConfigError(
                f"the forgetting guard's adapter is relative to a residual base ({', '.join(marks)} init), so the "
                "params fit trains on are that residual, and logits_fn(params, None, batch) is not the base model "
                "the canary must be compared with. Pass the original base params as ForgettingGuard(..., "
                "base_params=...).")
        ref = params if self.base_params is None else self.base_params
        self._base_logits = [self.logits_fn(ref, None, b) for b in self.canary]
        if resumed is not None:
            return self._resume(resumed, step)
        m = self.measure(params, adapter)
        crossed = self.over_budget(m)
        if crossed:
            # the starting state is what a stop returns and a rollback restores, as "the last state within
            # budget": kept over budget, the run would end (or keep restarting) on an adapter that breaks it
            raise ConfigError(
                f"the forgetting guard's budget is already crossed by the adapter it starts from (step {step}): "
                f"{'; '.join(crossed)}, so no state within budget would be there to keep or roll back to. An "
                "adapter that changes the model when created (prompt or prefix tuning's virtual tokens) or one "
                "trained before starts above 0: raise the budget above these values, or start from an adapter "
                "within it.")
        self._kept = (step, _copy(adapter), _copy(opt_state), m)
        self.report = {"checks": [dict(m, step=step)], "events": [], "kept_step": step, "kept": m,
                       "stopped": False, "rollbacks": 0}
        return m

    def state(self) -> dict:
        """What a checkpoint must hold for a resumed run to continue exactly (:meth:`start` with
        ``resumed=``): ``{"meta": {"report": ...}, "adapter": kept adapter, "opt_state": kept
        optimizer state}``. :func:`jpeft.fit` saves it with every checkpoint."""
        kept_step, ka, ko, km = self._kept
        # references, no copy (fit passes this at every step; a checkpoint writes the JSON when it saves): the
        # report holds plain floats and strings only (canary_stats returns floats)
        return {"meta": {"format": 1, "report": self.report, "kept_step": int(kept_step), "kept": km},
                "adapter": ka, "opt_state": ko}

    def _resume(self, resumed, step: int) -> dict:
        meta = resumed.get("meta") if isinstance(resumed, dict) else None
        if not (isinstance(meta, dict) and meta.get("format") == 1 and isinstance(meta.get("report"), dict)
                and resumed.get("adapter") is not None and resumed.get("opt_state") is not None):
            raise InputValidationError(
                "resumed must be the forgetting guard's state saved with the checkpoint (TrainState.extra from a run "
                f"with this guard), found {type(resumed).__name__}. Resume without it to start the guard afresh.")
        if int(meta["kept_step"]) > step:
            raise InputValidationError(f"the resumed forgetting guard kept the state of step {meta['kept_step']}, after "
                                       f"the step {step} the run resumes from: the state belongs to another run.")
        self._kept = (int(meta["kept_step"]), _copy(resumed["adapter"]), _copy(resumed["opt_state"]), meta["kept"])
        self.report = meta["report"]
        last = self.report["checks"][-1] if self.report.get("checks") else dict(meta["kept"])
        return {k: last[k] for k in ("canary_loss", "canary_loss_rise", "canary_kl")}

    def check(self, params, adapter, opt_state, step: int):
        """One check at ``step``. Returns ``(metrics, decision, state)``: decision ``"ok"`` (the
        state is kept), ``"rollback"`` (``state = (adapter, opt_state)`` to continue from, with
        the lowered learning rate) or ``"stop"`` (``state`` = the kept ``(adapter, opt_state)``)."""
        m = self.measure(params, adapter)
        self.report["checks"].append(dict(m, step=step))
        crossed = self.over_budget(m)
        if not crossed:
            self._kept = (step, _copy(adapter), _copy(opt_state), m)
            self.report.update(kept_step=step, kept=m)
            return m, "ok", None
        kept_step, ka, ko, km = self._kept
        why = "; ".join(crossed)
        if self.action == "rollback" and self.report["rollbacks"] < self.max_rollbacks:
            ko = scale_lr(ko, self.lr_factor)
            self._kept = (kept_step, ka, ko, km)
            self.report["rollbacks"] += 1
            scale = float(current_lr_scale(ko))
            self.report["events"].append({"step": step, "action": "rollback", "to_step": kept_step, "why": why,
                                          "lr_scale": scale})
            self.message = (f"step {step}: {why}; rolled back to the state of step {kept_step} and lowered the "
                            f"learning rate to x{scale:g} (rollback {self.report['rollbacks']} of {self.max_rollbacks})")
            return m, "rollback", (_copy(ka), _copy(ko))
        limit = "" if self.action == "stop" else f" after {self.max_rollbacks} rollback(s)"
        self.report["events"].append({"step": step, "action": "stop", "to_step": kept_step, "why": why})
        self.report["stopped"] = True
        self.message = (f"step {step}: {why}; training stopped{limit}, keeping the adapter of step {kept_step} "
                        f"(canary loss rise {km['canary_loss_rise']:.4g}, KL {km['canary_kl']:.4g}), a copy kept "
                        "in memory at its check")
        return m, "stop", (ka, ko)
