"""Forgetting metrics: pure functions over a score matrix and over model outputs.

Score matrix convention: ``R[i, j]`` is the score on task ``j`` measured after training
through task ``i`` (rows: training steps 0..T-1, columns: tasks 0..T-1). Scores are
higher-is-better (accuracy) unless ``higher_is_better=False`` is passed (losses), in which
case every metric is computed on ``-R`` and reported in the original units with the sign
that keeps "positive forgetting = worse", e.g. forgetting on a loss matrix is the rise in loss.

The definitions follow the papers that introduced them:

* :func:`average_accuracy`: ``mean_j R[T-1, j]`` (Lopez-Paz & Ranzato 2017, "ACC");
* :func:`backward_transfer`: ``mean_{i<T-1} R[T-1, i] - R[i, i]`` (Lopez-Paz & Ranzato 2017);
* :func:`forward_transfer`: ``mean_{i>0} R[i-1, i] - b[i]`` where ``b[i]`` is the score on
  task ``i`` before any training (Lopez-Paz & Ranzato 2017);
* :func:`forgetting`: ``mean_{j<T-1} max_{l<T-1} R[l, j] - R[T-1, j]`` (Chaudhry et al.
  2018): the drop from the best score seen at any earlier step. It equals ``-BWT`` when
  every task peaks right after it is trained, and exceeds it when a task peaks later;
* :func:`retention_ratio`: ``mean_{j<T-1} R[T-1, j] / R[j, j]``.

Language-model metrics: :func:`lm_loss`, :func:`loss_drift` (held-out loss and perplexity
before and after) and :func:`mean_token_kl` (mean per-token ``KL(p_base || p_new)``).

>>> import numpy as np
>>> from jpeft.forgetting import metrics
>>> R = np.array([[0.8, 0.1, 0.0],
...               [0.9, 0.8, 0.1],     # task 0 improved while task 1 was trained
...               [0.5, 0.7, 0.9]])
>>> round(metrics.backward_transfer(R), 4)      # ((0.5-0.8) + (0.7-0.8)) / 2
-0.2
>>> round(metrics.forgetting(R), 4)             # ((0.9-0.5) + (0.8-0.7)) / 2: task 0 peaked late
0.25
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.data import token_nll
from jpeft.errors import InputValidationError

__all__ = [
    "average_accuracy",
    "backward_transfer",
    "forward_transfer",
    "forgetting",
    "retention_ratio",
    "summarize",
    "lm_loss",
    "perplexity",
    "loss_drift",
    "mean_token_kl",
]


def _matrix(R, name="R") -> np.ndarray:
    R = np.asarray(R, dtype=np.float64)
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] < 1:
        raise InputValidationError(
            f"{name} must be a square score matrix [T, T] (row i: after training through task i; "
            f"column j: task j), found shape {R.shape}. Build it with one row per training step."
        )
    if not np.all(np.isfinite(R)):
        raise InputValidationError(f"{name} holds non-finite scores: {R.tolist()}; every entry must be measured.")
    return R


def _signed(R, higher_is_better: bool) -> np.ndarray:
    R = _matrix(R)
    return R if higher_is_better else -R


def average_accuracy(R, *, step: Optional[int] = None) -> float:
    """Mean score over the tasks seen so far after training step ``step`` (default: the last).

    ``mean_{j<=step} R[step, j]``; with the default this is the final average accuracy.

    >>> average_accuracy([[1.0, 0.0], [0.5, 0.7]])
    0.6
    >>> average_accuracy([[1.0, 0.0], [0.5, 0.7]], step=0)
    1.0
    """
    R = _matrix(R)
    T = R.shape[0]
    s = T - 1 if step is None else int(step)
    if not 0 <= s < T:
        raise InputValidationError(f"step must be in [0, {T - 1}] for a {T}-task matrix, found {step}.")
    return float(np.mean(R[s, : s + 1]))


def backward_transfer(R, *, higher_is_better: bool = True) -> float:
    """BWT = ``mean_{i<T-1} R[T-1, i] - R[i, i]`` (Lopez-Paz & Ranzato 2017).

    Negative BWT means forgetting. For a loss matrix (``higher_is_better=False``) the
    result is ``-(mean rise in loss)``, so negative still means forgetting. Needs ``T >= 2``.

    >>> backward_transfer([[0.9, 0.0], [0.6, 0.8]])
    -0.30000000000000004
    >>> backward_transfer([[1.5, 3.0], [1.9, 2.0]], higher_is_better=False)   # loss rose by 0.4
    -0.3999999999999999
    """
    S = _signed(R, higher_is_better)
    T = S.shape[0]
    if T < 2:
        raise InputValidationError("backward transfer needs at least 2 tasks; the matrix has 1.")
    return float(np.mean(S[T - 1, : T - 1] - np.diag(S)[: T - 1]))


def forward_transfer(R, baseline, *, higher_is_better: bool = True) -> float:
    """FWT = ``mean_{i>0} R[i-1, i] - baseline[i]`` (Lopez-Paz & Ranzato 2017).

    ``baseline[i]`` is the score on task ``i`` measured before any training (a freshly
    initialised or the pre-trained model). Positive means earlier tasks helped task ``i``
    before it was trained.

    >>> forward_transfer([[0.9, 0.6], [0.7, 0.95]], [0.5, 0.5])
    0.09999999999999998
    """
    S = _signed(R, higher_is_better)
    b = np.asarray(baseline, dtype=np.float64)
    b = b if higher_is_better else -b
    T = S.shape[0]
    if b.shape != (T,):
        raise InputValidationError(f"baseline must hold one score per task, shape ({T},), found {b.shape}.")
    if T < 2:
        raise InputValidationError("forward transfer needs at least 2 tasks; the matrix has 1.")
    return float(np.mean([S[i - 1, i] - b[i] for i in range(1, T)]))


def forgetting(R, *, higher_is_better: bool = True) -> float:
    """Average forgetting (Chaudhry et al. 2018): for each task ``j < T-1``, the best score it
    had from the step that trained it on, ``max_{j<=l<T-1} R[l, j]``, minus the final score
    ``R[T-1, j]``, averaged.

    Unlike ``-BWT`` it measures from the task's peak, which may come after the step that
    trained it (positive backward transfer followed by a drop). Scores from before the task was
    trained (rows ``l < j``, a zero-shot score) are not a peak of what was learned and are left
    out, as in the paper, where task ``j`` is scored only once it has been seen. On a loss
    matrix it is the mean rise of the loss above its lowest value since training.

    >>> forgetting([[0.9, 0.1], [0.6, 0.8]])
    0.30000000000000004
    """
    S = _signed(R, higher_is_better)
    T = S.shape[0]
    if T < 2:
        raise InputValidationError("forgetting needs at least 2 tasks; the matrix has 1.")
    peaks = np.array([S[j : T - 1, j].max() for j in range(T - 1)])
    return float(np.mean(peaks - S[T - 1, : T - 1]))


def retention_ratio(R, *, higher_is_better: bool = True) -> float:
    """``mean_{j<T-1} R[T-1, j] / R[j, j]``: the share of each task's just-trained score still
    there at the end (1 = nothing lost). For losses it is ``R[j, j] / R[T-1, j]`` so that it
    is again ``<= 1`` when the loss rose. Scores must be non-negative, and the denominators
    positive.

    >>> retention_ratio([[0.8, 0.0], [0.6, 0.9]])
    0.7499999999999999
    """
    R = _matrix(R)
    T = R.shape[0]
    if T < 2:
        raise InputValidationError("retention needs at least 2 tasks; the matrix has 1.")
    d = np.diag(R)[: T - 1]
    f = R[T - 1, : T - 1]
    num, den = (f, d) if higher_is_better else (d, f)
    if np.any(den <= 0) or np.any(num < 0):
        raise InputValidationError(
            f"retention_ratio needs positive scores (an accuracy or a loss); found just-trained {d.tolist()} "
            f"and final {f.tolist()}."
        )
    return float(np.mean(num / den))


def summarize(R, baseline=None, *, higher_is_better: bool = True) -> dict:
    """All matrix metrics in one dict: ``acc`` (final average), ``bwt``, ``forgetting``,
    ``retention`` and, when ``baseline`` is given, ``fwt``. For ``T == 1`` only ``acc``.

    >>> sorted(summarize([[0.9, 0.1], [0.6, 0.8]], [0.5, 0.5]))
    ['acc', 'bwt', 'forgetting', 'fwt', 'retention']
    """
    R = _matrix(R)
    out = {"acc": average_accuracy(R)}
    if R.shape[0] >= 2:
        out["bwt"] = backward_transfer(R, higher_is_better=higher_is_better)
        out["forgetting"] = forgetting(R, higher_is_better=higher_is_better)
        try:
            out["retention"] = retention_ratio(R, higher_is_better=higher_is_better)
        except InputValidationError:
            out["retention"] = float("nan")
        if baseline is not None:
            out["fwt"] = forward_transfer(R, baseline, higher_is_better=higher_is_better)
    return out


# -- language models ---------------------------------------------------------------------------


def _check_logits(logits, targets=None, mask=None):
    logits = jnp.asarray(logits)
    if logits.ndim < 2:
        raise InputValidationError(f"logits must be [..., vocab], found shape {logits.shape}.")
    if targets is not None and tuple(jnp.shape(targets)) != tuple(logits.shape[:-1]):
        raise InputValidationError(
            f"targets must have the logits' shape without the vocab axis, {tuple(logits.shape[:-1])}, "
            f"found {tuple(jnp.shape(targets))}. Shift targets by one token for next-token loss."
        )
    if mask is not None and tuple(jnp.shape(mask)) != tuple(logits.shape[:-1]):
        raise InputValidationError(f"mask must have shape {tuple(logits.shape[:-1])}, found {tuple(jnp.shape(mask))}.")
    return logits


def masked_mean(x, mask):
    """Mean of ``x`` weighted by ``mask`` (``None``: all): ``sum(m x) / sum(m)``. Masked-out
    positions are selected away, not multiplied by 0, so a NaN or inf there (a padded row's
    logits) does not reach the mean; an all-zero mask gives 0.

    >>> import jax.numpy as jnp
    >>> float(masked_mean(jnp.array([2.0, 4.0, 6.0]), jnp.array([0.25, 0.25, 0.0])))
    3.0
    """
    if mask is None:
        return jnp.mean(x)
    m = jnp.asarray(mask, x.dtype)
    if m.shape != x.shape:  # a broadcast mask would weigh each value several times, and divide by too few
        raise InputValidationError(
            f"mask must have the shape of the values it weighs, {tuple(x.shape)} (the logits' shape without the "
            f"class axis), found {tuple(m.shape)}. Give one weight per position, e.g. loss_mask [batch, seq].")
    total = jnp.sum(m)
    # weights summing to less than 1 are a weighted mean too (a floor of 1 divided them by too much)
    return jnp.sum(jnp.where(m != 0, x * m, 0)) / jnp.where(total != 0, total, 1.0)


def kl_rows(lp, lq):
    """``KL(p || q)`` over the last axis from log-probabilities, with ``0 log 0 = 0``: a class
    that ``p`` gives no mass (``-inf``, e.g. a masked vocabulary entry in both models) adds
    nothing, where ``exp(-inf) * (-inf - -inf)`` would be NaN. Its gradient is finite there too.

    >>> import jax.numpy as jnp
    >>> lp = jnp.log(jnp.array([0.0, 0.5, 0.5])); lq = jnp.log(jnp.array([0.0, 0.25, 0.75]))
    >>> round(float(kl_rows(lp, lq)), 6)   # 0.5 log 2 + 0.5 log(2/3)
    0.143841
    """
    p = jnp.exp(lp)
    return jnp.sum(p * jnp.where(p > 0, lp - lq, 0.0), axis=-1)


def lm_loss(logits, targets, mask=None) -> jax.Array:
    """Mean next-token cross-entropy in nats: ``logits [..., V]``, integer ``targets [...]``
    (already shifted), optional ``mask [...]`` (0/1, or weights: the mean is weighted by them).
    A position the mask leaves out (0) may hold any label (such as -100); every counted one
    must be a token id in ``[0, V)`` (checked outside ``jax.jit``: ``InputValidationError``).

    >>> import jax.numpy as jnp
    >>> float(lm_loss(jnp.zeros((1, 3, 4)), jnp.array([[0, 1, 2]])))   # uniform over 4: log 4
    1.3862943649291992
    """
    logits = _check_logits(logits, targets, mask)
    targets = jnp.asarray(targets)
    # an ignored position (mask 0) may hold any label (Hugging Face's -100); a counted one must be a token id: a
    # negative one would pick a class from the end of the vocabulary and one past it a NaN, with no word
    if not isinstance(targets, jax.core.Tracer) and not isinstance(mask, jax.core.Tracer) and targets.size:
        counted = targets if mask is None else targets[np.asarray(mask) != 0]
        if counted.size and (int(counted.min()) < 0 or int(counted.max()) >= logits.shape[-1]):
            where = "" if mask is None else " at positions the mask counts"
            raise InputValidationError(
                f"targets must be token ids in [0, {logits.shape[-1]}){where}, found {int(counted.min())}.."
                f"{int(counted.max())}; for ignored positions (such as -100) pass a mask with 0 there.")
    if mask is not None:
        targets = jnp.where(jnp.asarray(mask) != 0, targets, 0)
    nll, _ = token_nll(logits, targets)
    return masked_mean(nll, mask)


def perplexity(loss) -> float:
    """``exp(loss)`` for a mean loss in nats (``inf`` past float range, without a warning).

    >>> round(perplexity(0.0), 3), perplexity(800.0)
    (1.0, inf)
    """
    with np.errstate(over="ignore"):
        return float(np.exp(float(loss)))


def loss_drift(loss_before, loss_after) -> dict:
    """Drift of held-out loss on general text: the loss and perplexity before and after
    fine-tuning, their difference (``drift``, positive = forgot) and perplexity ratio.

    >>> d = loss_drift(2.0, 2.5)
    >>> round(d["drift"], 3), round(d["ppl_ratio"], 4)
    (0.5, 1.6487)
    """
    b, a = float(loss_before), float(loss_after)
    return {
        "loss_before": b,
        "loss_after": a,
        "drift": a - b,
        "ppl_before": perplexity(b),
        "ppl_after": perplexity(a),
        "ppl_ratio": perplexity(a - b),
    }


def mean_token_kl(base_logits, new_logits, mask=None) -> jax.Array:
    """Mean over tokens of ``KL(p_base || p_new)`` in nats, from two models' logits on the
    same tokens (``[..., V]``, same shape). 0 when the predictions are unchanged.

    >>> import jax.numpy as jnp
    >>> float(mean_token_kl(jnp.zeros((2, 3)), jnp.zeros((2, 3))))
    0.0
    """
    base_logits = _check_logits(base_logits, mask=mask)
    new_logits = jnp.asarray(new_logits)
    if new_logits.shape != base_logits.shape:
        raise InputValidationError(f"base and new logits must have the same shape, found {base_logits.shape} and {new_logits.shape}.")
    lp = jax.nn.log_softmax(base_logits.astype(jnp.float32), axis=-1)
    lq = jax.nn.log_softmax(new_logits.astype(jnp.float32), axis=-1)
    return masked_mean(kl_rows(lp, lq), mask)
