"""Loss terms that prevent forgetting; they compose with any jpeft method and with full
fine-tuning (:class:`~jpeft.FullFinetuneConfig`), because they act on the adapter
tree, whatever it holds.

* **EWC** (Kirkpatrick et al. 2017): ``strength/2 * sum_i F_i (theta_i - theta*_i)^2`` with a
  diagonal Fisher ``F`` from :func:`fisher_diagonal`. :func:`ewc_consolidate` adds one
  ``(anchor, Fisher)`` term per finished task (the original EWC) or, with ``gamma``, keeps a
  single running term ``F <- gamma * F_old + F_new`` anchored at the latest solution
  (online EWC, Schwarz et al. 2018). The Fisher and the anchor are per array of the adapter
  tree: for LoRA the factors ``A`` and ``B``, not the update ``s * A @ B`` (unlike L2-SP below).
  At a fresh LoRA (``B = 0``) every gradient of ``A`` is multiplied by ``B``, so ``A``'s Fisher
  is exactly 0 and EWC consolidated there leaves ``A`` free; full fine-tuning
  (:class:`~jpeft.FullFinetuneConfig`), where the arrays are the weights, has no such gap.
* **L2-SP** (Li et al. 2018): ``strength/2 * ||W_eff - W_eff_start||^2`` over the *effective*
  weights. For LoRA that is the update ``s * A @ B`` itself (:meth:`jpeft.LoraWeights.kernel_delta`),
  not ``A`` and ``B`` separately (which would penalise a re-parametrisation, not a change of
  the function), plus the bias the layer uses when the LoRA trains one (``lora_bias``,
  ``bias``); for full fine-tuning it is the classic distance to the pre-trained weights; for
  other mergeable methods (IA3, DoRA) the change of the merged kernel; for methods that
  cannot merge (prefix, prompt, bottleneck) the distance of the adapter's own arrays to where
  they started.
* **O-LoRA** (Wang et al. 2023, "Orthogonal Subspace Learning for Language Model Continual
  Learning"): each task trains a fresh LoRA while the earlier tasks' adapters stay frozen
  (summed into the base); the loss adds ``strength * sum_sites ||A_old^T A_new||_F^2``, which
  pushes the new update's input subspace (the columns of ``A``) orthogonal to every earlier
  one. :func:`orthogonal_consolidate` keeps the finished adapters' ``A`` matrices,
  :func:`orthogonal_penalty` computes the term (``norm="l1"``: the sum of absolute entries,
  which the authors' released code uses instead of the paper's squares).
* **Distillation** (LwF, Li & Hoiem 2016): :func:`distillation_kl`, ``T^2 * KL(p_teacher || p_student)``
  at temperature ``T`` against the base model's (or the previous task's) predictions.

Which Fisher (``estimator=``):

==============  ====================================================================  ===========
estimator       what it computes (per example ``x``, averaged over the data)           cost
==============  ====================================================================  ===========
``"exact"``     ``sum_y p(y|x) g_y^2`` — the true Fisher, expectation over the         C backward
                classes in closed form (categorical with one prediction per             passes
                example) or ``sum_k (d mu_k)^2 / sigma^2`` (Gaussian).
``"sampled"``   ``g_y^2`` with ``y ~ p(.|x)`` drawn from the model: an unbiased          1 per sample
                Monte-Carlo estimate of the true Fisher. Use for language models.
``"empirical"`` ``g_y^2`` with the observed label ``y``: the "empirical Fisher";         1
                cheap but biased (it is the squared gradient of the loss, which
                vanishes where the model already fits the data).
``"batched"``   ``(mean over a minibatch of g_y)^2`` with observed labels, averaged    1 per batch
                over minibatches: what Avalanche's ``EWCPlugin`` computes. About
                ``batch_size`` times smaller than the per-example Fisher where
                gradients of different examples are uncorrelated.
==============  ====================================================================  ===========

Per-example gradients come from ``jax.vmap(jax.grad(...))`` over the examples of each chunk.
``"exact"`` is the default where it applies (small output spaces such as Split-Digits);
``"sampled"`` is the right choice for language models, whose next-token output space makes
the exact expectation ``V x positions`` backward passes per sequence.

Using them in a training step (EWC shown; the state rides in the batch so the jitted step
is compiled once)::

    def loss_fn(params, adapter, batch, key):
        logits = jpeft.apply(model, params, adapter, batch["x"])
        task = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
        return task + ewc_penalty(batch["ewc"], adapter, strength=100.0)
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.errors import ConfigError, InputValidationError, NotMergeableError, ShapeMismatchError
from jpeft.forgetting.metrics import kl_rows, masked_mean
from jpeft.scan import Stacked
from jpeft.tree import get_subtree, unwrap_params

__all__ = [
    "FISHER_ESTIMATORS",
    "per_example_grads",
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
]

FISHER_ESTIMATORS = ("exact", "sampled", "empirical", "batched")
_LIKELIHOODS = ("categorical", "gaussian")


def per_example_grads(fn: Callable, params, adapter, examples) -> Any:
    """Gradients of ``fn(params, adapter, example) -> scalar`` w.r.t. the adapter, one per
    example, computed with ``jax.vmap`` over the leading axis of ``examples`` (a pytree).
    Returns the adapter's structure with a leading example axis on every leaf.

    >>> import jax.numpy as jnp
    >>> g = per_example_grads(lambda p, a, e: a["w"] @ e, None, {"w": jnp.zeros(2)}, jnp.eye(2))
    >>> g["w"].tolist()
    [[1.0, 0.0], [0.0, 1.0]]
    """
    return jax.vmap(jax.grad(lambda a, e: fn(params, a, e)), in_axes=(None, 0))(adapter, examples)


def _n_examples(tree) -> int:
    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise InputValidationError("fisher_diagonal got empty inputs; give at least one example.")
    n = int(np.shape(leaves[0])[0])
    for x in leaves:
        if int(np.shape(x)[0]) != n:
            raise InputValidationError(f"all inputs/labels must share the leading example axis; found sizes {n} and {np.shape(x)[0]}.")
    return n


def _mask_like(likelihood, mask, out):
    """One example's ``mask`` spread over its log-likelihood terms (categorical: the output's
    shape without the class axis; gaussian: the output's shape): a mask with fewer axes weighs
    every term under each of its entries alike (``[L]`` for ``[L, D]`` Gaussian outputs: each
    position's ``D`` values). A mask whose axes are not the leading axes of the terms is
    refused: broadcast from the right, ``[L]`` against ``[L, D]`` would weigh the ``D`` axis
    (or fail inside JAX). Trailing axes of size 1 beyond the terms' (``[N, 1]`` for one
    prediction per example) are dropped."""
    if mask is None:
        return None
    terms = tuple(out.shape[:-1] if likelihood == "categorical" else out.shape)
    m = jnp.asarray(mask, jnp.float32)
    while m.ndim > len(terms) and m.shape[-1] == 1:
        m = m[..., 0]
    if m.shape != terms[: m.ndim]:
        what = "the logits' shape without the class axis" if likelihood == "categorical" else "the output's shape"
        raise InputValidationError(
            f"fisher_diagonal: each example's mask has shape {tuple(m.shape)}, but its {likelihood} log-likelihood "
            f"has terms of shape {terms} ({what}); the mask must be [N] (one weight per example) or [N, ...] with "
            f"the leading axes of those terms, e.g. [N, {', '.join(map(str, terms[:1])) or '...'}] to weigh "
            "positions.")
    return jnp.broadcast_to(jnp.reshape(m, m.shape + (1,) * (len(terms) - m.ndim)), terms)


def _loglik(likelihood, out, label, mask, noise_std):
    """Log-likelihood (up to a constant) of ``label`` under the model output for one example."""
    if likelihood == "categorical":
        lp = jax.nn.log_softmax(out.astype(jnp.float32), axis=-1)
        ll = jnp.take_along_axis(lp, label[..., None].astype(jnp.int32), axis=-1)[..., 0]
    else:
        ll = -0.5 * jnp.square((label - out).astype(jnp.float32)) / (noise_std**2)
    if mask is not None:
        ll = ll * _mask_like(likelihood, mask, out)
    return jnp.sum(ll)


def _sample_label(likelihood, out, key, noise_std):
    out = jax.lax.stop_gradient(out)
    if likelihood == "categorical":
        return jax.random.categorical(key, out.astype(jnp.float32), axis=-1)
    return out + noise_std * jax.random.normal(key, out.shape, jnp.float32)


def fisher_diagonal(
    output_fn: Callable,
    params,
    adapter,
    inputs,
    labels=None,
    *,
    estimator: str = "exact",
    likelihood: str = "categorical",
    key: Optional[jax.Array] = None,
    mask=None,
    batch_size: int = 32,
    num_samples: int = 1,
    noise_std: float = 1.0,
):
    """Diagonal Fisher information of the model w.r.t. the adapter, averaged over examples.

    Args:
      output_fn: ``output_fn(params, adapter, x) -> out`` for a batch ``x``. For
        ``likelihood="categorical"`` ``out`` are logits ``[batch, ..., C]``; for
        ``"gaussian"`` it is the predicted mean ``[batch, ...]`` of ``N(mean, noise_std^2)``.
        Extra axes (``...``, e.g. sequence positions) are summed into one log-likelihood
        per example.
      params: the frozen base (passed through to ``output_fn``).
      adapter: the trainable tree; the Fisher has its structure.
      inputs: a pytree of arrays with a leading example axis ``N``.
      labels: observed labels ``[N, ...]`` (class ids or real targets); needed for
        ``"empirical"`` and ``"batched"``.
      estimator: ``"exact"``, ``"sampled"``, ``"empirical"`` or ``"batched"`` (module docstring).
      likelihood: ``"categorical"`` or ``"gaussian"``.
      key: ``jax.random`` key; needed for ``"sampled"``.
      mask: optional weights (0 for padding positions): ``[N]``, one per example, or ``[N, ...]``
        with the leading axes of the log-likelihood's terms (categorical: the logits' shape
        without the class axis; gaussian: the output's shape; a mask with fewer axes weighs
        every term under each entry, e.g. ``[N, L]`` for Gaussian outputs ``[N, L, D]``;
        trailing axes of size 1 are dropped; other shapes are refused). Term ``k`` enters the
        log-likelihood times ``m_k``, so the Fisher times ``m_k^2`` (0/1 masks: the same). An
        example whose mask is all zeros (a padding row) is left out of the average.
      batch_size: examples per vmapped chunk; for ``"batched"`` the minibatch whose mean
        gradient is squared.
      num_samples: labels drawn per example for ``"sampled"``.
      noise_std: the Gaussian likelihood's standard deviation.

    Returns:
      A tree like ``adapter`` of float32 arrays: the Fisher diagonal per parameter.

    Raises:
      ConfigError: unknown estimator/likelihood, or ``"exact"`` on an output with several
        categorical predictions per example.
      InputValidationError: missing labels or key, mismatched shapes, or (categorical) labels
        that are not class ids at the positions the mask counts (``-100`` needs a 0 in ``mask``).

    >>> import jax, jax.numpy as jnp
    >>> x = jnp.array([[1.0, 2.0], [3.0, 0.0]])
    >>> out = lambda p, a, x: x @ a["w"]            # linear-Gaussian, sigma = 1
    >>> F = fisher_diagonal(out, None, {"w": jnp.zeros(2)}, x, likelihood="gaussian")
    >>> F["w"].tolist()                             # E[x^2] / sigma^2
    [5.0, 2.0]
    """
    if estimator not in FISHER_ESTIMATORS:
        raise ConfigError(f"estimator must be one of {FISHER_ESTIMATORS}, found {estimator!r}. See jpeft.forgetting.regularizers.")
    if likelihood not in _LIKELIHOODS:
        raise ConfigError(f"likelihood must be one of {_LIKELIHOODS}, found {likelihood!r}.")
    if estimator in ("empirical", "batched") and labels is None:
        raise InputValidationError(f"estimator={estimator!r} uses the observed labels; pass labels=[N, ...].")
    if estimator == "sampled" and key is None:
        raise InputValidationError("estimator='sampled' draws labels from the model; pass key=jax.random.key(...).")
    if not (isinstance(batch_size, int) and batch_size > 0):
        raise ConfigError(f"batch_size must be a positive integer, found {batch_size!r}.")
    if not (isinstance(num_samples, int) and num_samples > 0):
        raise ConfigError(f"num_samples must be a positive integer, found {num_samples!r}.")
    n = _n_examples((inputs, labels, mask))
    if likelihood == "categorical" and estimator in ("empirical", "batched"):
        _check_class_labels(output_fn, params, adapter, inputs, labels, mask)
    key = key if key is not None else jax.random.key(0)
    chunk_sum, batch_sq = _fisher_fns(output_fn, estimator, likelihood, float(noise_std), int(num_samples))

    total = jax.tree.map(lambda t: jnp.zeros(jnp.shape(t), jnp.float32), adapter)
    sl = lambda tree, i, j: None if tree is None else jax.tree.map(lambda t: jnp.asarray(t)[i:j], tree)
    # an example whose mask is all zeros (a padding row) carries no information: it is not
    # counted in the average (nor in a minibatch's mean gradient)
    real = np.ones(n, bool) if mask is None else np.any(np.reshape(np.asarray(mask) != 0, (n, -1)), axis=1)
    if not real.any():
        raise InputValidationError(
            f"every one of the {n} examples' mask is all zeros, so there is nothing to estimate the Fisher from; "
            "pass a mask with 1 at the positions that count (or mask=None)."
        )
    n_chunks = 0
    for c, i in enumerate(range(0, n, batch_size)):
        j = min(n, i + batch_size)
        if not real[i:j].any():
            continue
        xi, yi, mi = sl(inputs, i, j), sl(labels, i, j), sl(mask, i, j)
        if estimator == "batched":
            part = batch_sq(params, adapter, xi, yi, mi)
        else:
            part = chunk_sum(params, adapter, xi, yi, mi, jax.random.fold_in(key, c))
        total = jax.tree.map(jnp.add, total, part)
        n_chunks += 1
    denom = n_chunks if estimator == "batched" else int(real.sum())
    return jax.tree.map(lambda t: t / denom, total)


def _check_class_labels(output_fn, params, adapter, inputs, labels, mask):
    """Refuses observed class labels that are not one class id per prediction, in ``[0, C)`` at
    every position the mask counts: an ignored label such as Hugging Face's ``-100`` (or one
    past the classes) was picked from another class inside ``take_along_axis``, with no word."""
    first = jax.tree.map(lambda t: jnp.asarray(t)[:1], inputs)
    out = jax.eval_shape(output_fn, params, adapter, first).shape  # traced only, nothing is computed
    y = np.asarray(labels)
    if tuple(y.shape[1:]) != tuple(out[1:-1]):
        want = "[N" + "".join(f", {d}" for d in out[1:-1]) + "]"
        raise InputValidationError(
            f"fisher_diagonal: categorical labels must hold one class id per prediction, shape {want} (the logits' "
            f"shape {tuple(out)} without the class axis), found {tuple(y.shape)}.")
    counted = y
    if mask is not None:
        m = np.asarray(mask)
        while m.ndim > y.ndim and m.shape[-1] == 1:  # as _mask_like reads it
            m = m[..., 0]
        if tuple(m.shape) == tuple(y.shape[: m.ndim]):  # other shapes are refused when the mask is applied
            counted = y[np.broadcast_to(m.reshape(m.shape + (1,) * (y.ndim - m.ndim)), y.shape) != 0]
    C = int(out[-1])
    if counted.size and (counted.min() < 0 or counted.max() >= C):
        where = "" if mask is None else " at the positions the mask counts"
        raise InputValidationError(
            f"fisher_diagonal: labels must be class ids in [0, {C}){where}, found {counted.min()}..{counted.max()}; "
            "for ignored positions (such as -100) pass a mask with 0 there.")


@functools.lru_cache(maxsize=64)
def _fisher_fns(output_fn, estimator, likelihood, noise_std, num_samples):
    """Jitted per-chunk Fisher sums, cached per output function and estimator so repeated
    calls (one per finished task) compile once."""

    def single_out(params, a, x):
        return output_fn(params, a, jax.tree.map(lambda t: t[None], x))[0]

    def ex_fisher(params, a, x, y, m, k):
        if estimator == "empirical":
            g = jax.grad(lambda a_: _loglik(likelihood, single_out(params, a_, x), y, m, noise_std))(a)
            return jax.tree.map(lambda t: jnp.square(t.astype(jnp.float32)), g)
        if estimator == "sampled":
            out0 = single_out(params, a, x)

            def one(kk):
                ys = _sample_label(likelihood, out0, kk, noise_std)
                g = jax.grad(lambda a_: _loglik(likelihood, single_out(params, a_, x), ys, m, noise_std))(a)
                return jax.tree.map(lambda t: jnp.square(t.astype(jnp.float32)), g)

            gs = jax.vmap(one)(jax.random.split(k, num_samples))
            return jax.tree.map(lambda t: jnp.mean(t, axis=0), gs)
        # exact
        out0 = single_out(params, a, x)
        if likelihood == "categorical":
            if out0.ndim != 1:
                raise ConfigError(
                    f"estimator='exact' takes the expectation over the classes of ONE prediction per example, but "
                    f"each example has outputs of shape {tuple(out0.shape)} (several positions). Use "
                    "estimator='sampled' (Monte-Carlo true Fisher) for sequence models."
                )
            C = out0.shape[-1]
            p = jax.lax.stop_gradient(jax.nn.softmax(out0.astype(jnp.float32)))
            w = 1.0 if m is None else jnp.square(_mask_like(likelihood, m, out0))

            def gc(c):
                g = jax.grad(lambda a_: jax.nn.log_softmax(single_out(params, a_, x).astype(jnp.float32))[c])(a)
                return jax.tree.map(lambda t: jnp.square(t.astype(jnp.float32)), g)

            gs = jax.vmap(gc)(jnp.arange(C))
            return jax.tree.map(lambda t: w * jnp.tensordot(p, t, axes=1), gs)
        # gaussian: sum_k (d mu_k / d theta)^2 / sigma^2 (E[(y-mu)^2] = sigma^2)
        K = int(np.prod(out0.shape)) if out0.ndim else 1
        mm = jnp.ones(out0.shape, jnp.float32) if m is None else _mask_like(likelihood, m, out0)

        def gk(k_):
            g = jax.grad(lambda a_: jnp.reshape(single_out(params, a_, x), (-1,))[k_].astype(jnp.float32))(a)
            # the log-likelihood weighs position k by m_k, so its score (and the Fisher) by m_k^2
            return jax.tree.map(lambda t: jnp.square(t.astype(jnp.float32)) * jnp.square(jnp.reshape(mm, (-1,))[k_]), g)

        gs = jax.vmap(gk)(jnp.arange(K))
        return jax.tree.map(lambda t: jnp.sum(t, axis=0) / noise_std**2, gs)

    @jax.jit
    def chunk_sum(params, a, x, y, m, k):
        ks = jax.random.split(k, _n_examples(x))
        fs = jax.vmap(ex_fisher, in_axes=(None, None, 0, 0 if y is not None else None, 0 if m is not None else None, 0))(params, a, x, y, m, ks)
        return jax.tree.map(lambda t: jnp.sum(t, axis=0), fs)

    @jax.jit
    def batch_sq(params, a, x, y, m):
        def mean_ll(a_):
            outs = output_fn(params, a_, x)
            lls = jax.vmap(lambda o, yy, mmm: _loglik(likelihood, o, yy, mmm, noise_std), in_axes=(0, 0, 0 if m is not None else None))(outs, y, m)
            if m is None:
                return jnp.mean(lls)
            real = jnp.any(jnp.reshape(jnp.asarray(m) != 0, (lls.shape[0], -1)), axis=1)
            return jnp.sum(lls) / jnp.sum(real)

        g = jax.grad(mean_ll)(a)
        return jax.tree.map(lambda t: jnp.square(t.astype(jnp.float32)), g)

    return chunk_sum, batch_sq


class EWCState(NamedTuple):
    """EWC memory: one ``(anchor, fisher)`` pair per consolidated task (original EWC), or a
    single running pair (online EWC). Both are trees shaped like the adapter. A pytree, so it
    can be passed into a jitted step."""

    anchors: tuple = ()
    fishers: tuple = ()


def ewc_init() -> EWCState:
    """An empty EWC memory (penalty 0)."""
    return EWCState((), ())


def _check_like(a, b, what):
    sa, sb = jax.tree.structure(a), jax.tree.structure(b)
    if sa != sb:
        raise ShapeMismatchError(f"{what} must have the adapter's structure; found {sb} for adapter {sa}.")
    # shapes too: a state that rides in the batch of make_train_step(accumulate_steps=k) is split into
    # micro-batches along its first axis, and a [1, ...] slice would broadcast into a wrong penalty
    bad = [(np.shape(x), np.shape(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)) if np.shape(x) != np.shape(y)]
    if bad:
        raise ShapeMismatchError(
            f"{what} must have the adapter's shapes; found {bad[0][1]} for an adapter array of shape {bad[0][0]}. "
            "If it rides in the batch of make_train_step(..., accumulate_steps=k), that step splits every batch "
            "array into micro-batches: pass it to the loss function another way (a closure), or accumulate_steps=1.")


def ewc_consolidate(state: EWCState, adapter, fisher, *, gamma: Optional[float] = None) -> EWCState:
    """Adds the task just finished to the EWC memory.

    Args:
      state: the memory so far (:func:`ewc_init` at the start).
      adapter: the parameters at the end of the task (the new anchor ``theta*``).
      fisher: :func:`fisher_diagonal` at those parameters on that task's data.
      gamma: ``None`` for the original EWC (a separate term per task, so the penalty grows
        with the number of tasks); a float in ``[0, 1]`` for online EWC (Schwarz et al. 2018):
        one term, ``F <- gamma * F_old + F_new``, anchored at the newest ``adapter``.

    >>> import jax.numpy as jnp
    >>> s = ewc_consolidate(ewc_init(), {"w": jnp.ones(2)}, {"w": jnp.full(2, 2.0)}, gamma=0.5)
    >>> s = ewc_consolidate(s, {"w": jnp.zeros(2)}, {"w": jnp.ones(2)}, gamma=0.5)
    >>> s.fishers[0]["w"].tolist(), len(s.anchors)
    ([2.0, 2.0], 1)
    """
    _check_like(adapter, fisher, "the Fisher")
    anchor = jax.tree.map(lambda t: jnp.array(t, jnp.float32, copy=True), jax.lax.stop_gradient(adapter))
    fisher = jax.tree.map(lambda t: jnp.asarray(t, jnp.float32), fisher)
    if gamma is None:
        return EWCState(tuple(state.anchors) + (anchor,), tuple(state.fishers) + (fisher,))
    if not (0.0 <= float(gamma) <= 1.0):
        raise ConfigError(f"online EWC gamma must be in [0, 1], found {gamma}. Schwarz et al. use values near 1.")
    if state.fishers:
        if len(state.fishers) != 1:
            raise ConfigError("online EWC keeps one running term, but the state holds several (it was built with gamma=None).")
        fisher = jax.tree.map(lambda old, new: gamma * old + new, state.fishers[0], fisher)
    return EWCState((anchor,), (fisher,))


def ewc_penalty(state: EWCState, adapter, *, strength: float = 1.0) -> jax.Array:
    """``strength/2 * sum_tasks sum_i F_i (theta_i - theta*_i)^2``; 0 for an empty memory.

    >>> import jax.numpy as jnp
    >>> s = ewc_consolidate(ewc_init(), {"w": jnp.zeros(2)}, {"w": jnp.array([1.0, 4.0])})
    >>> float(ewc_penalty(s, {"w": jnp.array([1.0, 0.5])}, strength=2.0))   # (1*1 + 4*0.25)
    2.0
    """
    total = jnp.zeros((), jnp.float32)
    for anchor, fisher in zip(state.anchors, state.fishers):
        _check_like(adapter, anchor, "the EWC anchor")
        terms = jax.tree.map(lambda p, a, f: jnp.sum(f * jnp.square(p.astype(jnp.float32) - a)), adapter, anchor, fisher)
        total = total + sum(jax.tree.leaves(terms), jnp.zeros((), jnp.float32))
    return 0.5 * strength * total


def _effective(node, own):
    """The effective weights a node contributes, as a tree of arrays (for L2-SP): the node's
    own ``effective`` (:class:`jpeft.methods.base.Site`)."""
    return node.effective(own)


def l2sp_penalty(params, adapter: Mapping[str, Any], start: Mapping[str, Any], *, strength: float = 1.0) -> jax.Array:
    """L2-SP (Li et al. 2018): ``strength/2 * ||W_eff(adapter) - W_eff(start)||^2`` summed over
    sites, where ``W_eff`` is the effective weight (see the module docstring): for LoRA the
    update ``s * A @ B``, for full fine-tuning the weights themselves (so ``start`` = the
    pre-trained weights), for other mergeable methods the merged kernel, and otherwise the
    adapter's own arrays.

    Args:
      params: the frozen base (used for mergeable methods other than LoRA; may be ``None``
        for LoRA and full fine-tuning). A site whose effective weights need the base (DoRA,
        IA3, ...) without it is refused (``InputValidationError``).
      adapter: the adapter being trained.
      start: the adapter at the start of fine-tuning (its initialisation, or the previous
        task's solution).
      strength: ``alpha`` in the paper.

    >>> import jax, jax.numpy as jnp, flax.linen as nn, jpeft
    >>> params = nn.Dense(3).init(jax.random.key(0), jnp.ones((1, 2)))
    >>> a0 = jpeft.init(jpeft.LoraConfig(r=1, alpha=1, target_modules=".*"), params, jax.random.key(1))
    >>> a = {"": a0[""].__class__(a0[""].lora_A * 0 + 1.0, a0[""].lora_B * 0 + 1.0, None, 1.0, a0[""].layout)}
    >>> float(l2sp_penalty(params, a, a0, strength=2.0))   # delta = ones(2, 3), start delta 0
    6.0
    """
    if set(adapter) != set(start):
        raise ShapeMismatchError(f"start must have the adapter's sites; found {sorted(start)} for {sorted(adapter)}.")
    inner = unwrap_params(params)[0] if params is not None else None
    total = jnp.zeros((), jnp.float32)
    for path, node in adapter.items():
        own = None
        if inner is not None:
            try:
                own = get_subtree(inner, path)
            except (KeyError, TypeError):
                own = None
        cur, ref = _effective(node, own), _effective(start[path], own)
        inner_node = node.inner if isinstance(node, Stacked) else node
        if own is None and getattr(node, "mergeable", False) and type(cur) is type(inner_node):
            # a mergeable node whose effective weights are its merged kernel (DoRA, IA3, ...) gave back its own
            # arrays: without the base's weights at its path the penalty would compare the wrong tensors
            raise InputValidationError(
                f"l2sp_penalty: site {path!r} is a {type(inner_node).__name__}, whose effective weights are the merged "
                f"kernel, so they need the base's weights at that path, but "
                + ("params is None" if inner is None else "params holds no module there")
                + f". Pass the frozen base params the adapter was made for (only LoRA and full fine-tuning work "
                "without them).")
        _check_like(cur, ref, f"start[{path!r}]")
        d = jax.tree.map(lambda x, y: jnp.sum(jnp.square(jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32))), cur, ref)
        total = total + sum(jax.tree.leaves(d), jnp.zeros((), jnp.float32))
    return 0.5 * strength * total


def orthogonal_init() -> dict:
    """An empty O-LoRA memory: ``{site path: A_old}`` with ``A_old: [..., in, r_total]``."""
    return {}


def _lora_a(path, node):
    inner = node.inner if isinstance(node, Stacked) else node  # a layer-scanned site: A is [L, in, r]
    try:
        return inner.low_rank().a
    except NotMergeableError as e:
        raise ConfigError(f"O-LoRA needs a LoRA update s*A@B at every site; site {path!r} is a "
                          f"{type(inner).__name__}: {e}") from None


def orthogonal_consolidate(memory: Mapping[str, Any], adapter: Mapping[str, Any]) -> dict:
    """The memory with the ``A`` of every site of a finished task's LoRA ``adapter`` appended
    (along the rank axis, as a frozen copy).

    Raises:
      ConfigError: a site is not a LoRA update (DoRA, another method).
      ShapeMismatchError: the adapter's sites differ from the remembered ones.
    """
    if memory and set(memory) != set(adapter):
        raise ShapeMismatchError(f"O-LoRA: the adapter's sites {sorted(adapter)} differ from the earlier tasks' "
                                 f"{sorted(memory)}; every task's adapter must target the same modules.")
    out = {}
    for path, node in adapter.items():
        a = jax.lax.stop_gradient(jnp.asarray(_lora_a(path, node), jnp.float32))
        out[path] = a if path not in memory else jnp.concatenate([memory[path], a], axis=-1)
    return out


def orthogonal_penalty(memory: Mapping[str, Any], adapter: Mapping[str, Any], *, strength: float = 1.0,
                       norm: str = "squared") -> jax.Array:
    """O-LoRA's orthogonality loss: ``strength * sum_sites sum_jk |(A_old^T A_new)[j, k]|^p``
    with ``p = 2`` (``norm="squared"``, the paper's Eq. 6) or ``p = 1`` (``norm="l1"``, the
    authors' code). ``A`` is the ``[in, r]`` down-projection (PEFT's ``lora_A.weight``
    transposed), so the term is zero exactly when every new input direction is orthogonal to
    every earlier one. An empty memory (the first task) gives 0.

    >>> import dataclasses, jax, jax.numpy as jnp, flax.linen as nn, jpeft
    >>> params = nn.Dense(3).init(jax.random.key(0), jnp.ones((1, 4)))
    >>> node = jpeft.init(jpeft.LoraConfig(r=1, alpha=1, target_modules=".*"), params, jax.random.key(1))[""]
    >>> e = jnp.eye(4)
    >>> old = {"": dataclasses.replace(node, lora_A=e[:, :1])}
    >>> new = {"": dataclasses.replace(node, lora_A=e[:, :1] + 2 * e[:, 1:2])}
    >>> mem = orthogonal_consolidate(orthogonal_init(), old)
    >>> float(orthogonal_penalty(mem, new, strength=0.5))   # (A_old^T A_new)^2 = 1
    0.5
    """
    if norm not in ("squared", "l1"):
        raise ConfigError(f"orthogonal_penalty: norm must be 'squared' or 'l1', found {norm!r}.")
    total = jnp.zeros((), jnp.float32)
    if not memory:
        return total
    if set(memory) != set(adapter):
        raise ShapeMismatchError(f"O-LoRA: the adapter's sites {sorted(adapter)} differ from the earlier tasks' "
                                 f"{sorted(memory)}; every task's adapter must target the same modules.")
    for path, node in adapter.items():
        a_new = jnp.asarray(_lora_a(path, node), jnp.float32)
        a_old = jax.lax.stop_gradient(jnp.asarray(memory[path], jnp.float32))
        if a_old.shape[:-1] != a_new.shape[:-1]:
            raise ShapeMismatchError(f"O-LoRA: site {path!r} has A of shape {a_new.shape}, the earlier tasks' "
                                     f"{a_old.shape}; the input dimension (and layers) must agree.")
        o = jnp.einsum("...ir,...is->...rs", a_old, a_new)
        total = total + (jnp.sum(jnp.square(o)) if norm == "squared" else jnp.sum(jnp.abs(o)))
    return strength * total


def distillation_kl(student_logits, teacher_logits, *, temperature: float = 2.0, mask=None) -> jax.Array:
    """LwF-style distillation: ``T^2 * mean KL(softmax(teacher/T) || softmax(student/T))``.

    The ``T^2`` factor keeps gradient magnitudes comparable across temperatures (Hinton et
    al. 2015). The teacher (the base model's or the previous task's predictions) gets no
    gradient. ``mask`` (``[...]``, the logits' shape without the class axis) averages over
    selected positions only.

    >>> import jax.numpy as jnp
    >>> float(distillation_kl(jnp.zeros((2, 3)), jnp.zeros((2, 3))))
    0.0
    """
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, found {temperature}.")
    s = jnp.asarray(student_logits, jnp.float32)
    t = jax.lax.stop_gradient(jnp.asarray(teacher_logits, jnp.float32))
    if s.shape != t.shape:
        raise InputValidationError(f"student and teacher logits must have the same shape; found {s.shape} and {t.shape}.")
    lp = jax.nn.log_softmax(t / temperature, axis=-1)
    lq = jax.nn.log_softmax(s / temperature, axis=-1)
    return (temperature**2) * masked_mean(kl_rows(lp, lq), mask)
