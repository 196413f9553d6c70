"""jpeft.forgetting: metrics, Fisher/EWC, L2-SP, distillation, replay, full fine-tuning.

Every number is checked against a hand-computed value or a closed form."""

import dataclasses
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

import jpeft
from jpeft.errors import ConfigError, InputValidationError, JpeftError, NotMergeableError, ShapeMismatchError
from jpeft import FullFinetuneConfig
from jpeft.forgetting import (
    distillation_kl,
    ewc_consolidate,
    ewc_init,
    ewc_penalty,
    fisher_diagonal,
    l2sp_penalty,
    metrics,
    replay,
)
from jpeft.forgetting.regularizers import per_example_grads

# ---------------------------------------------------------------------------------- metrics

# R[i, j]: task j after training through task i. Task 0 peaks LATE (at step 1, after task 1
# was trained: positive backward transfer), then drops; task 1 peaks on time.
LATE = np.array([
    [0.70, 0.10, 0.05, 0.00],
    [0.90, 0.80, 0.10, 0.05],
    [0.60, 0.75, 0.95, 0.20],
    [0.50, 0.60, 0.85, 0.90],
])


def test_metrics_hand_computed_with_late_peak():
    # ACC = mean of last row
    assert metrics.average_accuracy(LATE) == pytest.approx((0.5 + 0.6 + 0.85 + 0.9) / 4)
    assert metrics.average_accuracy(LATE, step=1) == pytest.approx((0.9 + 0.8) / 2)
    # BWT = mean_{i<3} R[3,i] - R[i,i] = ((0.5-0.7) + (0.6-0.8) + (0.85-0.95)) / 3
    bwt = ((0.5 - 0.7) + (0.6 - 0.8) + (0.85 - 0.95)) / 3
    assert metrics.backward_transfer(LATE) == pytest.approx(bwt)
    # Chaudhry: best earlier score - final. Task 0 best is 0.90 (step 1), not R[0,0] = 0.70.
    f = ((0.90 - 0.5) + (0.80 - 0.6) + (0.95 - 0.85)) / 3
    assert metrics.forgetting(LATE) == pytest.approx(f)
    assert metrics.forgetting(LATE) > -metrics.backward_transfer(LATE)  # differs because of the late peak
    # FWT = mean_{i>0} R[i-1, i] - b[i]
    b = np.array([0.5, 0.05, 0.1, 0.1])
    assert metrics.forward_transfer(LATE, b) == pytest.approx(((0.10 - 0.05) + (0.10 - 0.1) + (0.20 - 0.1)) / 3)
    assert metrics.retention_ratio(LATE) == pytest.approx((0.5 / 0.7 + 0.6 / 0.8 + 0.85 / 0.95) / 3)
    s = metrics.summarize(LATE, b)
    assert s["forgetting"] == pytest.approx(f) and s["bwt"] == pytest.approx(bwt)


def test_metrics_equal_minus_bwt_without_late_peak():
    R = np.array([[0.9, 0.0, 0.0], [0.7, 0.8, 0.0], [0.6, 0.5, 0.9]])
    assert metrics.forgetting(R) == pytest.approx(-metrics.backward_transfer(R))
    assert metrics.forgetting(R) == pytest.approx(((0.9 - 0.6) + (0.8 - 0.5)) / 2)


def test_forgetting_peak_counts_only_scores_after_the_task_was_trained():
    # task 1 scores 0.9 zero-shot (row 0, before it was trained), 0.6 after its own step, 0.5 at
    # the end: it lost 0.1 of what it had once trained, not 0.4 from the zero-shot score
    R = np.array([[0.8, 0.9, 0.0], [0.7, 0.6, 0.0], [0.5, 0.5, 0.9]])
    assert metrics.forgetting(R) == pytest.approx(((0.8 - 0.5) + (0.6 - 0.5)) / 2)
    L = -R  # the same as a loss matrix
    assert metrics.forgetting(L, higher_is_better=False) == pytest.approx(((0.8 - 0.5) + (0.6 - 0.5)) / 2)


def test_metrics_on_losses():
    L = np.array([[1.5, 3.0], [1.9, 2.0]])  # code loss rose 0.4, prose fell 1.0
    assert metrics.forgetting(L, higher_is_better=False) == pytest.approx(0.4)
    assert metrics.backward_transfer(L, higher_is_better=False) == pytest.approx(-0.4)
    assert metrics.retention_ratio(L, higher_is_better=False) == pytest.approx(1.5 / 1.9)


def test_metrics_bad_input_errors():
    with pytest.raises(InputValidationError, match=r"square score matrix \[T, T\].*found shape \(2, 3\)"):
        metrics.backward_transfer(np.zeros((2, 3)))
    with pytest.raises(InputValidationError, match="at least 2 tasks"):
        metrics.forgetting([[1.0]])
    with pytest.raises(InputValidationError, match=r"one score per task, shape \(4,\), found \(3,\)"):
        metrics.forward_transfer(LATE, [0.1, 0.2, 0.3])
    with pytest.raises(InputValidationError, match="non-finite"):
        metrics.average_accuracy([[1.0, np.nan], [0.0, 1.0]])


def test_lm_metrics_against_numpy():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(2, 5, 7)).astype(np.float32)
    new = rng.normal(size=(2, 5, 7)).astype(np.float32)
    tgt = rng.integers(0, 7, size=(2, 5))
    lp = base - np.log(np.exp(base).sum(-1, keepdims=True))
    lq = new - np.log(np.exp(new).sum(-1, keepdims=True))
    ce = -np.take_along_axis(lp, tgt[..., None], -1)[..., 0]
    assert float(metrics.lm_loss(base, tgt)) == pytest.approx(ce.mean(), rel=1e-5)
    mask = np.zeros((2, 5)); mask[:, :3] = 1
    assert float(metrics.lm_loss(base, tgt, mask)) == pytest.approx(ce[:, :3].mean(), rel=1e-5)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    assert float(metrics.mean_token_kl(base, new)) == pytest.approx(kl.mean(), rel=1e-5)
    d = metrics.loss_drift(1.0, 1.25)
    assert d["drift"] == pytest.approx(0.25) and d["ppl_after"] == pytest.approx(math.exp(1.25))
    with pytest.raises(InputValidationError, match=r"found \(2, 4\)\. Shift targets by one"):
        metrics.lm_loss(base, tgt[:, :4])


def test_lm_metrics_with_masked_vocabulary_and_masked_positions():
    """A class both models give no mass (-inf logits, a masked vocabulary entry) adds 0 log 0 =
    0 to the KL, not NaN; positions masked out (their logits NaN, their label -100) do not reach
    the means; and a label outside the vocabulary without a mask is refused by name."""
    rng = np.random.default_rng(1)
    base = rng.normal(size=(2, 5, 7)).astype(np.float32)
    new = rng.normal(size=(2, 5, 7)).astype(np.float32)
    base[..., 0] = new[..., 0] = -np.inf
    lp = base[..., 1:] - np.log(np.exp(base[..., 1:]).sum(-1, keepdims=True))
    lq = new[..., 1:] - np.log(np.exp(new[..., 1:]).sum(-1, keepdims=True))
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    assert float(metrics.mean_token_kl(base, new)) == pytest.approx(kl.mean(), rel=1e-5)
    assert float(distillation_kl(new, base, temperature=1.0)) == pytest.approx(kl.mean(), rel=1e-5)
    g = jax.grad(lambda s: distillation_kl(s, jnp.asarray(base), temperature=1.0))(jnp.asarray(new))
    assert bool(jnp.all(jnp.isfinite(g)))
    # masked positions: NaN logits and a -100 label there change nothing
    mask = np.ones((2, 5)); mask[1, 3:] = 0
    tgt = rng.integers(1, 7, size=(2, 5))
    want_ce = -np.take_along_axis(np.concatenate([np.full((2, 5, 1), -np.inf), lp], -1), tgt[..., None], -1)[..., 0]
    noisy, noisy_new = base.copy(), new.copy()
    noisy[1, 3:] = np.nan
    noisy_new[1, 4] = np.nan
    tgt_ignored = np.where(mask == 1, tgt, -100)
    assert float(metrics.lm_loss(noisy, tgt_ignored, mask)) == pytest.approx(want_ce[mask == 1].mean(), rel=1e-5)
    assert float(metrics.mean_token_kl(noisy, noisy_new, mask)) == pytest.approx(kl[mask == 1].mean(), rel=1e-5)
    assert float(distillation_kl(noisy_new, noisy, temperature=1.0, mask=mask)) == pytest.approx(
        kl[mask == 1].mean(), rel=1e-5)
    with pytest.raises(InputValidationError, match=r"token ids in \[0, 7\), found -100\.\.6.*pass a mask"):
        metrics.lm_loss(base, np.where(mask == 1, tgt, -100))
    # with a mask, a label outside the vocabulary at a position it counts is refused too (a -1 there picked the
    # vocabulary's last class, a 7 gave NaN, with no word)
    for bad in (-1, 7):
        with pytest.raises(InputValidationError, match=rf"token ids in \[0, 7\) at positions the mask counts, "
                                                       rf"found {min(bad, 1)}\.\.{max(bad, 6)}"):
            metrics.lm_loss(new, np.where(np.arange(5) == 2, bad, tgt), mask)
    # a mask of weights is a weighted mean, whatever the weights sum to (weights summing to 0.5 halved it)
    w = np.zeros((2, 5)); w[0, 1], w[1, 2] = 0.1, 0.4
    want = (w * kl).sum() / w.sum()
    assert float(metrics.mean_token_kl(base, new, w)) == pytest.approx(want, rel=1e-5)
    assert float(distillation_kl(new, base, temperature=1.0, mask=w)) == pytest.approx(want, rel=1e-5)
    assert float(metrics.lm_loss(base, tgt, w)) == pytest.approx((w * want_ce).sum() / w.sum(), rel=1e-5)
    assert float(metrics.mean_token_kl(base, new, np.zeros((2, 5)))) == 0.0


# ---------------------------------------------------------------------------------- Fisher


def _linear_gaussian(n=64, d=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    w = rng.normal(size=(d,)).astype(np.float32)
    y = (x @ w + 0.3 * rng.normal(size=n)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(y), {"w": jnp.asarray(w)}


def _lin(params, adapter, x):
    return x @ adapter["w"]


def test_fisher_linear_gaussian_closed_form():
    x, y, a = _linear_gaussian()
    sigma = 0.5
    xn, yn, wn = np.asarray(x, np.float64), np.asarray(y, np.float64), np.asarray(a["w"], np.float64)
    # true Fisher of y ~ N(w.x, sigma^2): E[x x^T] / sigma^2, diagonal
    exact = fisher_diagonal(_lin, None, a, x, likelihood="gaussian", noise_std=sigma, batch_size=10)
    np.testing.assert_allclose(exact["w"], (xn**2).mean(0) / sigma**2, rtol=1e-5)
    # per-example score of the observed label: (y - w.x) x / sigma^2
    r = yn - xn @ wn
    emp = fisher_diagonal(_lin, None, a, x, y, estimator="empirical", likelihood="gaussian", noise_std=sigma, batch_size=7)
    np.testing.assert_allclose(emp["w"], ((r[:, None] * xn) ** 2).mean(0) / sigma**4, rtol=1e-4)
    g = per_example_grads(lambda p, ad, e: -0.5 * (e[1] - e[0] @ ad["w"]) ** 2 / sigma**2, None, a, (x, y))
    np.testing.assert_allclose(g["w"], r[:, None] * xn / sigma**2, rtol=1e-4, atol=1e-5)
    # Avalanche's batched variant: square of the minibatch-mean gradient, averaged over batches
    bat = fisher_diagonal(_lin, None, a, x, y, estimator="batched", likelihood="gaussian", noise_std=sigma, batch_size=16)
    gb = (r[:, None] * xn / sigma**2).reshape(4, 16, -1).mean(1)
    np.testing.assert_allclose(bat["w"], (gb**2).mean(0), rtol=1e-4)
    # Monte-Carlo labels sampled from the model: unbiased for the true Fisher
    mc = fisher_diagonal(_lin, None, a, x, estimator="sampled", likelihood="gaussian", noise_std=sigma,
                         key=jax.random.key(3), num_samples=200, batch_size=32)
    np.testing.assert_allclose(mc["w"], exact["w"], rtol=0.08)


def test_fisher_softmax_regression_exact_closed_form():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(20, 4)).astype(np.float32))
    W = jnp.asarray(rng.normal(size=(4, 3)).astype(np.float32))
    f = fisher_diagonal(lambda p, a, xx: xx @ a["W"], None, {"W": W}, x, estimator="exact", batch_size=8)
    p = np.asarray(jax.nn.softmax(x @ W))
    # sum_c p_c (x_i (e_c - p)_j)^2 = x_i^2 p_j (1 - p_j)
    ref = ((np.asarray(x)[:, :, None] ** 2) * (p * (1 - p))[:, None, :]).mean(0)
    np.testing.assert_allclose(f["W"], ref, rtol=1e-4, atol=1e-7)
    mc = fisher_diagonal(lambda p_, a, xx: xx @ a["W"], None, {"W": W}, x, estimator="sampled",
                         key=jax.random.key(0), num_samples=400)
    np.testing.assert_allclose(mc["W"], ref, rtol=0.15, atol=2e-3)


def test_fisher_mask_weights_and_padding_rows():
    x, y, a = _linear_gaussian()
    xn = np.asarray(x, np.float64)
    sigma = 0.5
    # one output per example, weighted 0.5: the log-likelihood is 0.5 * log N, so the score is
    # 0.5 * (y - mu) x / sigma^2 and the Fisher 0.25 * E[x^2] / sigma^2 (m^2, not m)
    half = jnp.full((x.shape[0],), 0.5)
    exact = fisher_diagonal(_lin, None, a, x, likelihood="gaussian", noise_std=sigma, mask=half)
    np.testing.assert_allclose(exact["w"], 0.25 * (xn**2).mean(0) / sigma**2, rtol=1e-5)
    mc = fisher_diagonal(_lin, None, a, x, estimator="sampled", likelihood="gaussian", noise_std=sigma, mask=half,
                         key=jax.random.key(3), num_samples=200, batch_size=32)
    np.testing.assert_allclose(mc["w"], exact["w"], rtol=0.08)
    # rows whose mask is all zeros (padding rows) do not dilute the average
    xp = jnp.concatenate([x, jnp.ones((5, x.shape[1]))])
    yp = jnp.concatenate([y, jnp.zeros((5,))])
    mp = jnp.concatenate([jnp.ones((x.shape[0],)), jnp.zeros((5,))])
    for est in ("exact", "empirical"):
        want = fisher_diagonal(_lin, None, a, x, y, estimator=est, likelihood="gaussian", noise_std=sigma)
        got = fisher_diagonal(_lin, None, a, xp, yp, estimator=est, likelihood="gaussian", noise_std=sigma, mask=mp)
        np.testing.assert_allclose(got["w"], want["w"], rtol=1e-5)
    # batched: a minibatch's mean gradient is over its real rows; an all-padding minibatch is skipped
    want = fisher_diagonal(_lin, None, a, x, y, estimator="batched", likelihood="gaussian", noise_std=sigma,
                           batch_size=16)
    xb = jnp.concatenate([x, jnp.ones((16, x.shape[1]))])
    yb, mb = jnp.concatenate([y, jnp.zeros((16,))]), jnp.concatenate([jnp.ones((x.shape[0],)), jnp.zeros((16,))])
    got = fisher_diagonal(_lin, None, a, xb, yb, estimator="batched", likelihood="gaussian", noise_std=sigma,
                          mask=mb, batch_size=16)
    np.testing.assert_allclose(got["w"], want["w"], rtol=1e-5)
    with pytest.raises(InputValidationError, match="mask is all zeros"):
        fisher_diagonal(_lin, None, a, x, likelihood="gaussian", mask=jnp.zeros((x.shape[0],)))


@pytest.mark.parametrize("L", [2, 3])  # L == D: a mask broadcast from the right weighed the D axis, silently
def test_fisher_position_mask_of_vector_gaussian_outputs(L):
    # outputs [N, L, D] (a vector per position) and a padding mask [N, L]: the exact Fisher gave
    # [[2.34, 0.61], ...] against the closed form's [[2.34, 2.34], ...] at L = D = 2 (the mask indexed
    # over the L*D outputs), and the observed-label estimators failed inside JAX at L = 3
    rng = np.random.default_rng(7)
    N, Din, D, sigma = 5, 4, 2, 0.7
    x = rng.normal(size=(N, L, Din)).astype(np.float32)
    y = rng.normal(size=(N, L, D)).astype(np.float32)
    a = {"w": jnp.asarray(rng.normal(size=(Din, D)), jnp.float32)}
    m = (rng.uniform(size=(N, L)) > 0.4).astype(np.float32)
    m[:, 0] = 1.0
    m[1, -1] = 0.5
    xn, yn, wn = (np.asarray(t, np.float64) for t in (x, y, a["w"]))
    # log N(y_kd; (x_k w)_d, sigma^2) weighed by m_k: d mu_kd / d w_id = x_ki, so the true Fisher is
    # E[sum_k m_k^2 x_ki^2] / sigma^2 for every d, and the observed-label score sum_k m_k (y_kd - mu_kd) x_ki / sigma^2
    exact_ref = np.repeat(((m[..., None] ** 2) * xn**2).sum(1).mean(0)[:, None], D, axis=1) / sigma**2
    r = yn - xn @ wn
    score = np.einsum("nk,nkd,nki->nid", m, r, xn) / sigma**2
    kw = dict(likelihood="gaussian", noise_std=sigma, mask=jnp.asarray(m))
    f = fisher_diagonal(_lin, None, a, jnp.asarray(x), **kw)
    np.testing.assert_allclose(f["w"], exact_ref, rtol=1e-5)
    f = fisher_diagonal(_lin, None, a, jnp.asarray(x), jnp.asarray(y), estimator="empirical", batch_size=2, **kw)
    np.testing.assert_allclose(f["w"], (score**2).mean(0), rtol=1e-4)
    f = fisher_diagonal(_lin, None, a, jnp.asarray(x), jnp.asarray(y), estimator="batched", batch_size=N, **kw)
    np.testing.assert_allclose(f["w"], score.mean(0) ** 2, rtol=1e-4, atol=1e-6)
    # the same mask spelled out over D gives the same Fisher
    full = jnp.asarray(np.broadcast_to(m[..., None], (N, L, D)))
    f2 = fisher_diagonal(_lin, None, a, jnp.asarray(x), likelihood="gaussian", noise_std=sigma, mask=full)
    np.testing.assert_allclose(f2["w"], exact_ref, rtol=1e-5)
    # a mask whose axes are not the terms' leading ones is refused by name, not broadcast from the right
    bad = jnp.ones((N, D, 1))
    for est in ("exact", "empirical"):
        with pytest.raises(InputValidationError, match=r"mask has shape \(2, 1\).*terms of shape"):
            fisher_diagonal(_lin, None, a, jnp.asarray(x), jnp.asarray(y), estimator=est, likelihood="gaussian",
                            mask=bad)
    # categorical logits [N, L, C=2]: a [N, L, 1] mask is the [N, L] one (it weighed every term L times)
    seq = lambda p, ad, xx: xx @ ad["w"]  # noqa: E731
    labels = jnp.asarray(rng.integers(0, D, (N, L)), jnp.int32)
    want = fisher_diagonal(seq, None, a, jnp.asarray(x), labels, estimator="empirical", mask=jnp.asarray(m))
    got = fisher_diagonal(seq, None, a, jnp.asarray(x), labels, estimator="empirical", mask=jnp.asarray(m[..., None]))
    np.testing.assert_allclose(got["w"], want["w"], rtol=1e-6)
    with pytest.raises(InputValidationError, match="without the class axis"):
        fisher_diagonal(seq, None, a, jnp.asarray(x), labels, estimator="empirical", mask=jnp.ones((N, L + 1)))


def test_fisher_labels_ignored_with_minus_100_need_a_mask():
    # Hugging Face marks ignored positions with label -100; without a mask the empirical Fisher took another
    # class's log-probability there (take_along_axis), with no word, and counted those positions
    rng = np.random.default_rng(11)
    N, L, Din, C = 4, 5, 3, 6
    x = rng.normal(size=(N, L, Din)).astype(np.float32)
    a = {"w": jnp.asarray(rng.normal(size=(Din, C)), jnp.float32)}
    seq = lambda p, ad, xx: xx @ ad["w"]  # noqa: E731  logits [N, L, C]
    y = rng.integers(0, C, (N, L))
    y[:, -2:] = -100
    for est in ("empirical", "batched"):
        with pytest.raises(InputValidationError, match=r"class ids in \[0, 6\), found -100\.\.\d.*mask with 0"):
            fisher_diagonal(seq, None, a, jnp.asarray(x), jnp.asarray(y), estimator=est)
    with pytest.raises(InputValidationError, match=r"one class id per prediction, shape \[N, 5\].*found \(4,\)"):
        fisher_diagonal(seq, None, a, jnp.asarray(x), jnp.asarray(y[:, 0]), estimator="empirical")
    # with the ignored positions masked out, the estimate is the closed form over the counted positions:
    # the score of log softmax(x_t W)[y_t] is x_t (e_{y_t} - p_t)^T
    m = (y != -100).astype(np.float32)
    f = fisher_diagonal(seq, None, a, jnp.asarray(x), jnp.asarray(y), estimator="empirical", mask=jnp.asarray(m))
    z = x.astype(np.float64) @ np.asarray(a["w"], np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    onehot = np.eye(C)[np.where(y < 0, 0, y)]
    score = np.einsum("nt,nti,ntc->nic", m, x.astype(np.float64), onehot - p)
    np.testing.assert_allclose(f["w"], (score**2).mean(0), rtol=1e-4, atol=1e-7)


def test_fisher_errors():
    x, y, a = _linear_gaussian()
    with pytest.raises(ConfigError, match="estimator must be one of"):
        fisher_diagonal(_lin, None, a, x, estimator="diag")
    with pytest.raises(InputValidationError, match="observed labels; pass labels"):
        fisher_diagonal(_lin, None, a, x, estimator="empirical", likelihood="gaussian")
    with pytest.raises(InputValidationError, match="pass key="):
        fisher_diagonal(_lin, None, a, x, estimator="sampled", likelihood="gaussian")
    seq = lambda p, ad, xx: jnp.stack([xx @ ad["w"], -xx @ ad["w"]], -1)[:, None, :] * jnp.ones((1, 5, 1))
    with pytest.raises(ConfigError, match="estimator='sampled'"):
        fisher_diagonal(seq, None, a, x, estimator="exact")


# ---------------------------------------------------------------------------------- EWC


def test_ewc_penalty_zero_at_anchor_and_quadratic():
    rng = np.random.default_rng(2)
    anchor = {"a": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32), "b": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
    F = jax.tree.map(lambda t: jnp.abs(t) + 0.1, {"a": jnp.ones((3, 2)) * 2.0, "b": jnp.arange(4.0)})
    s = ewc_consolidate(ewc_init(), anchor, F)
    assert float(ewc_penalty(s, anchor, strength=5.0)) == 0.0
    g = jax.grad(lambda p: ewc_penalty(s, p, strength=5.0))(anchor)
    assert all(float(jnp.max(jnp.abs(t))) == 0.0 for t in jax.tree.leaves(g))
    d = {"a": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32), "b": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
    at = lambda t: jax.tree.map(lambda x, y: x + t * y, anchor, d)
    p1 = float(ewc_penalty(s, at(1.0), strength=5.0))
    ref = 0.5 * 5.0 * sum(float(jnp.sum(f * dd**2)) for f, dd in zip(jax.tree.leaves(F), jax.tree.leaves(d)))
    assert p1 == pytest.approx(ref, rel=1e-5)
    for t in (0.5, -2.0, 3.0):
        assert float(ewc_penalty(s, at(t), strength=5.0)) == pytest.approx(t * t * p1, rel=1e-5)


def test_ewc_original_vs_online():
    a1, a2 = {"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([0.0, 2.0])}
    f1, f2 = {"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([3.0, 1.0])}
    p = {"w": jnp.array([0.5, 0.5])}
    orig = ewc_consolidate(ewc_consolidate(ewc_init(), a1, f1), a2, f2)
    assert len(orig.anchors) == 2
    ref = 0.5 * (1 * 0.25 + 2 * 0.25) + 0.5 * (3 * 0.25 + 1 * 2.25)
    assert float(ewc_penalty(orig, p)) == pytest.approx(ref)
    onl = ewc_consolidate(ewc_consolidate(ewc_init(), a1, f1, gamma=0.5), a2, f2, gamma=0.5)
    np.testing.assert_allclose(onl.fishers[0]["w"], [0.5 * 1 + 3, 0.5 * 2 + 1])
    assert float(ewc_penalty(onl, p)) == pytest.approx(0.5 * (3.5 * 0.25 + 2.0 * 2.25))
    with pytest.raises(ConfigError, match=r"gamma must be in \[0, 1\]"):
        ewc_consolidate(ewc_init(), a1, f1, gamma=1.5)
    with pytest.raises(ShapeMismatchError, match="adapter's structure"):
        ewc_consolidate(ewc_init(), a1, {"v": jnp.ones(2)})


# ---------------------------------------------------------------------------------- L2-SP


def _lora_setup():
    model = nn.Dense(5)
    params = model.init(jax.random.key(0), jnp.ones((1, 4)))
    a0 = jpeft.init(jpeft.LoraConfig(r=2, alpha=4, target_modules=".*"), params, jax.random.key(1))
    node = a0[""]
    rng = np.random.default_rng(3)
    A = jnp.asarray(rng.normal(size=node.lora_A.shape), jnp.float32)
    B = jnp.asarray(rng.normal(size=node.lora_B.shape), jnp.float32)
    return params, a0, A, B


def test_l2sp_lora_penalizes_effective_update():
    params, a0, A, B = _lora_setup()
    node = a0[""]
    a = {"": type(node)(A, B, None, node.scale, node.layout)}
    delta = node.scale * np.asarray(A) @ np.asarray(B)  # start has B = 0, so its update is 0
    assert float(l2sp_penalty(params, a, a0, strength=3.0)) == pytest.approx(0.5 * 3.0 * (delta**2).sum(), rel=1e-5)
    # the same update with A scaled up and B down: same function, same penalty
    a_re = {"": type(node)(A * 4.0, B / 4.0, None, node.scale, node.layout)}
    assert float(l2sp_penalty(params, a_re, a0)) == pytest.approx(float(l2sp_penalty(params, a, a0)), rel=1e-5)
    assert float(l2sp_penalty(params, a0, a0)) == 0.0


@pytest.mark.parametrize("bias", ["lora_bias", "all", "lora_only"])
def test_l2sp_lora_penalizes_a_trained_bias(bias):
    model = nn.Dense(5)
    params = model.init(jax.random.key(0), jnp.ones((1, 4)))
    cfg = (jpeft.LoraConfig(r=2, alpha=4, target_modules=".*", lora_bias=True) if bias == "lora_bias"
           else jpeft.LoraConfig(r=2, alpha=4, target_modules=".*", bias=bias))
    a0 = jpeft.init(cfg, params, jax.random.key(1))
    rng = np.random.default_rng(5)
    a0 = jax.tree.map(lambda t: jnp.asarray(rng.normal(size=t.shape), jnp.float32), a0)  # every tensor random
    node0 = a0[""]
    name = "lora_bias" if bias == "lora_bias" else "base_bias"
    db = rng.normal(size=getattr(node0, name).shape).astype(np.float32)
    dA = rng.normal(size=node0.lora_A.shape).astype(np.float32)
    node = dataclasses.replace(node0, lora_A=node0.lora_A + dA, **{name: getattr(node0, name) + db})
    ab = lambda n: np.asarray(n.lora_A) @ np.asarray(n.lora_B)
    dW = node.scale * (ab(node) - ab(node0))
    dbias = (node.scale if bias == "lora_bias" else 1.0) * db
    want = 0.5 * 2.0 * ((dW**2).sum() + (dbias**2).sum())
    assert float(l2sp_penalty(params, {"": node}, a0, strength=2.0)) == pytest.approx(want, rel=1e-5)
    # the bias changes what the layer computes, so its drift must cost something on its own
    only_bias = dataclasses.replace(node0, **{name: getattr(node0, name) + db})
    assert float(l2sp_penalty(params, {"": only_bias}, a0)) == pytest.approx(0.5 * (dbias**2).sum(), rel=1e-5)


@pytest.mark.parametrize("method", ["dora", "ia3"])
def test_l2sp_merged_kernel_methods_need_the_base(method):
    # with params=None DoRA and IA3 fell back to the distance of their raw arrays (DoRA 15.13 against the
    # merged kernels' 4.20 on this example), silently
    model = nn.Dense(5)
    params = model.init(jax.random.key(0), jnp.ones((1, 4)))
    cfg = (jpeft.LoraConfig(r=2, alpha=3, target_modules=".*", use_dora=True) if method == "dora"
           else jpeft.IA3Config(target_modules=".*", feedforward_modules=()))
    a0 = jpeft.init(cfg, params, jax.random.key(1))
    rng = np.random.default_rng(0)
    rnd = lambda: jax.tree.map(lambda t: jnp.asarray(rng.normal(size=t.shape), jnp.float32), a0)  # noqa: E731
    a1, a2 = rnd(), rnd()
    kernel = lambda a: np.asarray(jpeft.merge(params, a)["params"]["kernel"])  # noqa: E731
    want = 0.5 * ((kernel(a1) - kernel(a2)) ** 2).sum()
    assert float(l2sp_penalty(params, a1, a2)) == pytest.approx(want, rel=1e-5)
    with pytest.raises(InputValidationError, match="params is None"):
        l2sp_penalty(None, a1, a2)


def test_ewc_state_in_a_batch_split_by_gradient_accumulation_is_refused():
    # the docstring's pattern (the EWC memory rides in the batch) with make_train_step(accumulate_steps=2): the
    # step splits the anchors and Fishers into micro-batches; a [1, ...] slice broadcast into a wrong penalty
    # (59.48 instead of 80.46 here), a larger one failed deep inside jnp with a TypeError
    model = nn.Dense(3)
    params = model.init(jax.random.key(0), jnp.ones((1, 2)))
    a = jpeft.init(jpeft.LoraConfig(r=2, alpha=2, target_modules=".*"), params, jax.random.key(1))
    rng = np.random.default_rng(0)
    a = jax.tree.map(lambda t: jnp.asarray(rng.normal(size=t.shape), jnp.float32), a)  # every tensor random
    anchor = jax.tree.map(lambda t: jnp.asarray(rng.normal(size=t.shape), jnp.float32), a)
    fisher = jax.tree.map(lambda t: jnp.asarray(rng.uniform(size=t.shape), jnp.float32), a)
    state = ewc_consolidate(ewc_init(), anchor, fisher)

    def loss_fn(p, ad, batch, key):
        pred = jpeft.apply(model, p, ad, batch["x"])
        return jnp.mean((pred - batch["y"]) ** 2) + ewc_penalty(batch["ewc"], ad, strength=10.0)

    batch = {"x": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32), "y": jnp.zeros((4, 3)), "ewc": state}
    opt = optax.sgd(0.0)
    step = jpeft.make_train_step(loss_fn, opt, donate=False)
    _, _, m = step(params, a, opt.init(jpeft.trainable(a)), batch, jax.random.key(0))
    assert float(m["loss"]) == pytest.approx(float(loss_fn(params, a, batch, None)), rel=1e-6)
    step2 = jpeft.make_train_step(loss_fn, opt, donate=False, accumulate_steps=2)
    with pytest.raises(ShapeMismatchError, match="accumulate_steps"):
        step2(params, a, opt.init(jpeft.trainable(a)), batch, jax.random.key(0))


def test_l2sp_full_finetune_is_distance_to_pretrained():
    params, _, _, _ = _lora_setup()
    full = jpeft.init(FullFinetuneConfig(), params, jax.random.key(0))
    moved = jax.tree.map(lambda t: t + 0.5, full)
    n = sum(x.size for x in jax.tree.leaves(params))
    assert float(l2sp_penalty(params, moved, full, strength=2.0)) == pytest.approx(0.5 * 2.0 * 0.25 * n, rel=1e-5)


def test_distillation_kl_against_numpy():
    rng = np.random.default_rng(4)
    s = rng.normal(size=(3, 6)).astype(np.float32)
    t = rng.normal(size=(3, 6)).astype(np.float32)
    T = 2.0
    lp = t / T - np.log(np.exp(t / T).sum(-1, keepdims=True))
    lq = s / T - np.log(np.exp(s / T).sum(-1, keepdims=True))
    ref = T * T * (np.exp(lp) * (lp - lq)).sum(-1).mean()
    assert float(distillation_kl(s, t, temperature=T)) == pytest.approx(ref, rel=1e-5)
    g = jax.grad(lambda tt: distillation_kl(jnp.asarray(s), tt))(jnp.asarray(t))
    assert float(jnp.max(jnp.abs(g))) == 0.0  # the teacher gets no gradient
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        distillation_kl(s, t, temperature=0.0)
    # a mask that broadcasts against the [3] positions ([1], or [3, 1]) counted each KL several times over too few
    # weights (x3 here); a [3] mask gives the plain mean
    assert float(distillation_kl(s, t, temperature=T, mask=np.ones(3))) == pytest.approx(ref, rel=1e-5)
    for bad in (np.ones((3, 1)), np.ones(1)):
        with pytest.raises(InputValidationError, match=rf"mask must have the shape of the values it weighs, \(3,\) "
                                                       rf".*found {re.escape(str(bad.shape))}"):
            distillation_kl(s, t, temperature=T, mask=bad)


# ---------------------------------------------------------------------------------- replay


def test_reservoir_holds_uniform_sample_of_stream():
    N, cap, trials = 200, 20, 2000
    buf0 = replay.reservoir_init(jnp.zeros((), jnp.int32), cap)
    stream = jnp.arange(N, dtype=jnp.int32)

    def one(k):
        # offered in 4 chunks, as a training loop would
        b = buf0
        for i, kk in enumerate(jax.random.split(k, 4)):
            b = replay.reservoir_add(b, stream[i * 50:(i + 1) * 50], kk)
        return b.data

    held = np.asarray(jax.vmap(one)(jax.random.split(jax.random.key(1234), trials)))
    assert all(len(set(row.tolist())) == cap for row in held[:50])  # no duplicates
    counts = np.bincount(held.ravel(), minlength=N)
    assert counts.sum() == trials * cap
    # each item is held with probability cap / N: chi-square goodness of fit
    _, p = scipy.stats.chisquare(counts, np.full(N, trials * cap / N))
    assert p > 0.01, (p, counts.min(), counts.max())
    # first and last items of the stream are equally likely to be kept
    assert abs(counts[:50].mean() - counts[-50:].mean()) < 0.1 * trials * cap / N


def test_reservoir_fill_sample_and_mix():
    buf = replay.reservoir_init({"x": jnp.zeros((2,)), "y": jnp.zeros((), jnp.int32)}, capacity=8)
    buf = replay.reservoir_add(buf, {"x": jnp.ones((5, 2)), "y": jnp.arange(5)}, jax.random.key(0))
    assert int(buf.size) == 5 and sorted(np.asarray(buf.data["y"][:5]).tolist()) == [0, 1, 2, 3, 4]
    batch = {"x": jnp.zeros((10, 2)), "y": jnp.full((10,), 99)}
    mixed = replay.mix_batch(batch, buf, 0.3, jax.random.key(1))
    ys = np.asarray(mixed["y"])
    assert (ys == 99).sum() == 7 and set(ys[7:].tolist()) <= {0, 1, 2, 3, 4}
    assert replay.mix_batch(batch, buf, 0.0, jax.random.key(1)) is batch
    # a share that rounds to no row would silently replay nothing: refused
    with pytest.raises(ConfigError, match=r"rounds to 0 replayed rows.*at least 0.25"):
        replay.mix_batch({"x": jnp.zeros((4, 2)), "y": jnp.zeros((4,), jnp.int32)}, buf, 0.125, jax.random.key(1))
    with pytest.raises(ConfigError, match=r"replay ratio must be in \[0, 1\)"):
        replay.mix_batch(batch, buf, 1.0, jax.random.key(1))
    # a share below 1 that rounds to the whole batch would train on old examples only: refused
    with pytest.raises(ConfigError, match=r"rounds to all 4 rows.*at most 0.75 \(3 rows of 4\)"):
        replay.mix_batch({"x": jnp.zeros((4, 2)), "y": jnp.zeros((4,), jnp.int32)}, buf, 0.9, jax.random.key(1))
    with pytest.raises(InputValidationError, match="buffer is empty"):
        replay.reservoir_sample(replay.reservoir_init(jnp.zeros(()), 3), 2, jax.random.key(0))
    # examples of another shape than the buffer's: a [5, 1] or [5] batch was broadcast into the [2] slots (the
    # buffer silently held made-up examples), a [5, 3] one failed deep inside JAX; mix_batch failed in concatenate
    for x in (jnp.arange(5.0)[:, None], jnp.arange(5.0), jnp.ones((5, 3))):
        want = re.escape(f"examples at ['x'] have shape {tuple(x.shape[1:])}, the replay buffer's (2,)")
        with pytest.raises(InputValidationError, match=want):
            replay.reservoir_add(buf, {"x": x, "y": jnp.arange(5)}, jax.random.key(0))
        with pytest.raises(InputValidationError, match=want):
            replay.mix_batch({"x": x, "y": jnp.arange(5)}, buf, 0.4, jax.random.key(1))


# ---------------------------------------------------------------------------------- full fine-tuning


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x, scale=1.0):
        return nn.Dense(2)(nn.relu(nn.Dense(8)(x))) * scale


def test_full_finetune_is_a_jpeft_method():
    model = _MLP()
    x = jax.random.normal(jax.random.key(0), (16, 3))
    y = (x[:, 0] > 0).astype(jnp.int32)
    params = model.init(jax.random.key(1), x)
    adapter = jpeft.init(FullFinetuneConfig(), params, jax.random.key(2))
    np.testing.assert_array_equal(jpeft.apply(model, params, adapter, x, scale=2.0), model.apply(params, x, scale=2.0))
    s = jpeft.summary(params, adapter, print_fn=None)
    assert s["trainable"] == s["base"]

    def loss_fn(p, a, b, k):
        return optax.softmax_cross_entropy_with_integer_labels(jpeft.apply(model, p, a, b[0]), b[1]).mean()

    opt = optax.adam(1e-2)
    step = jpeft.make_train_step(loss_fn, opt)
    st = opt.init(adapter)
    l0 = float(loss_fn(params, adapter, (x, y), None))
    for i in range(30):
        adapter, st, m = step(params, adapter, st, (x, y), jax.random.key(i))
    assert float(m["loss"]) < 0.5 * l0
    merged = jpeft.merge(params, adapter)
    np.testing.assert_allclose(model.apply(merged, x), jpeft.apply(model, params, adapter, x), rtol=1e-6)
    # the base tree is untouched
    np.testing.assert_array_equal(jpeft.apply(model, params, None, x), model.apply(params, x))
    with pytest.raises(NotMergeableError, match="keep the base params"):
        jpeft.unmerge(merged, adapter)
    other = nn.Dense(3).init(jax.random.key(0), x)
    with pytest.raises(ShapeMismatchError, match="made for another model"):
        jpeft.apply(nn.Dense(3), other, adapter, x)
    with pytest.raises(ConfigError, match="dtype must be one of"):
        FullFinetuneConfig(dtype="int8")
    assert isinstance(ShapeMismatchError("x"), JpeftError)


def test_ewc_on_a_fresh_lora_constrains_b_only_as_documented():
    # EWC's Fisher is per adapter array: at B = 0 every gradient of A carries a factor B, so A's Fisher is 0
    model = nn.Dense(4)
    params = model.init(jax.random.key(0), jnp.ones((1, 3)))
    a = jpeft.init(jpeft.LoraConfig(r=2, alpha=4, target_modules=".*"), params, jax.random.key(1))
    x = jax.random.normal(jax.random.key(2), (16, 3))
    F = fisher_diagonal(lambda p, ad, xx: jpeft.apply(model, p, ad, xx), params, a, x)[""]
    assert float(jnp.abs(F.lora_A).max()) == 0.0 and float(F.lora_B.min()) > 0.0
