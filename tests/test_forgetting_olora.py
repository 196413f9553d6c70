"""O-LoRA (orthogonal subspaces across a task sequence): the penalty against its closed form on
hand-made tensors, zero for orthogonal subspaces, its gradient, and a two-task run through the
forgetting runner in which earlier adapters are frozen and summed into the base."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft.forgetting import experiment
from jpeft.forgetting import regularizers as R
from jpeft.forgetting.digits import SplitDigits


class _Two(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(5, name="b")(nn.Dense(7, name="a")(x))


def _lora(params, key, a_mats):
    """A LoRA adapter on _Two whose A matrices are the given ones (B random)."""
    cfg = jpeft.LoraConfig(r=a_mats["a"].shape[1], alpha=2.0, target_modules=["a", "b"], init_weights="random")
    ad = jpeft.init(cfg, params, key)
    return {p: dataclasses.replace(n, lora_A=jnp.asarray(a_mats[p], jnp.float32)) for p, n in ad.items()}


def test_penalty_closed_form_orthogonal_zero_and_gradient():
    rng = np.random.RandomState(0)
    params = _Two().init(jax.random.key(0), jnp.ones((1, 6)))
    r = 2
    a1 = {"a": rng.randn(6, r), "b": rng.randn(7, r)}
    a2 = {"a": rng.randn(6, r), "b": rng.randn(7, r)}
    new = {"a": rng.randn(6, r), "b": rng.randn(7, r)}
    mem = R.orthogonal_consolidate(R.orthogonal_init(), _lora(params, jax.random.key(1), a1))
    mem = R.orthogonal_consolidate(mem, _lora(params, jax.random.key(2), a2))
    assert {p: m.shape for p, m in mem.items()} == {"a": (6, 2 * r), "b": (7, 2 * r)}
    ad = _lora(params, jax.random.key(3), new)
    want_sq = sum(np.sum((np.concatenate([a1[p], a2[p]], 1).T @ new[p]) ** 2) for p in ("a", "b"))
    want_l1 = sum(np.sum(np.abs(np.concatenate([a1[p], a2[p]], 1).T @ new[p])) for p in ("a", "b"))
    np.testing.assert_allclose(R.orthogonal_penalty(mem, ad, strength=0.3), 0.3 * want_sq, rtol=1e-5)
    np.testing.assert_allclose(R.orthogonal_penalty(mem, ad, strength=0.3, norm="l1"), 0.3 * want_l1, rtol=1e-5)
    assert float(R.orthogonal_penalty(R.orthogonal_init(), ad)) == 0.0  # the first task has nothing to avoid

    # gradient: d/dA_new = 2 * strength * A_old A_old^T A_new; nothing flows to B or to the memory
    g = jax.grad(lambda a: R.orthogonal_penalty(mem, a, strength=0.3))(ad)
    for p in ("a", "b"):
        old = np.concatenate([a1[p], a2[p]], 1)
        np.testing.assert_allclose(g[p].lora_A, 0.6 * old @ old.T @ new[p], rtol=1e-4, atol=1e-5)
        assert not np.any(np.asarray(g[p].lora_B))

    # a new subspace orthogonal to every earlier one costs nothing, whatever B is
    orth = {}
    for p, n_in in (("a", 6), ("b", 7)):
        old = np.concatenate([a1[p], a2[p]], 1)
        q, _ = np.linalg.qr(np.concatenate([old, rng.randn(n_in, n_in)], 1))
        orth[p] = q[:, 2 * r: 2 * r + r] * 3.0  # the complement of span(old)
    assert float(R.orthogonal_penalty(mem, _lora(params, jax.random.key(4), orth))) < 1e-10

    with pytest.raises(jpeft.errors.ShapeMismatchError, match="same modules"):
        R.orthogonal_penalty(mem, {"a": ad["a"]})
    with pytest.raises(jpeft.ConfigError, match="norm"):
        R.orthogonal_penalty(mem, ad, norm="fro")
    ia3 = jpeft.init(jpeft.IA3Config(target_modules=["a", "b"], feedforward_modules=[]), params, jax.random.key(5))
    with pytest.raises(jpeft.ConfigError, match="O-LoRA needs a LoRA update"):
        R.orthogonal_consolidate(R.orthogonal_init(), ia3)


def test_spec_refusals():
    with pytest.raises(jpeft.ConfigError, match="plain LoRA"):
        experiment.MethodSpec("x", jpeft.FullFinetuneConfig(), orthogonal=1.0)
    with pytest.raises(jpeft.ConfigError, match="plain LoRA"):
        experiment.MethodSpec("x", jpeft.LoraConfig(r=2, target_modules=".*", init_weights="milora"), orthogonal=1.0)
    with pytest.raises(jpeft.ConfigError, match="set one of ewc and orthogonal"):
        experiment.MethodSpec("x", jpeft.LoraConfig(r=2, target_modules=".*"), orthogonal=1.0, ewc=1.0)
    with pytest.raises(jpeft.ConfigError, match="per_task_adapter shares"):
        experiment.MethodSpec("x", jpeft.LoraConfig(r=2, target_modules=".*", init_weights="pissa"), per_task_adapter=True)


def test_every_residual_init_lora_takes_is_one_to_the_runner():
    """The runner asked its own list of residual inits ("pissa", "olora", "milora"), drifted from
    LoRA's: PiSSA with subspace iterations was accepted with per_task_adapter (which shares the
    base) and then refused by jpeft.init with advice for another API; a CorDA mark as init failed
    the same way. Now the config says (``residual_init``): pissa_niter_K is refused where the base
    is shared, trained as init_pissa(niter=K) otherwise (the adapter and residual base equal it),
    and a CorDA mark is refused by name with the MethodSpec setting to use."""
    cfg = jpeft.LoraConfig(r=2, target_modules=".*", init_weights="pissa_niter_2")
    with pytest.raises(jpeft.ConfigError, match="per_task_adapter shares"):
        experiment.MethodSpec("x", cfg, per_task_adapter=True)
    with pytest.raises(jpeft.ConfigError, match="give init_weights='default' and corda='kpm'"):
        experiment.MethodSpec("x", jpeft.LoraConfig(r=2, target_modules=".*", init_weights="corda_kpm"))
    spec = experiment.MethodSpec("x", cfg)
    assert "PiSSA (2 subspace iterations) init, residual base" in spec.describe()
    bench = SplitDigits("task", steps_per_task=2, batch_size=4, hidden=(8,), num_tasks=2)
    params = bench.base_params(0)
    res, ad = experiment.init_adapter(bench, cfg, jax.random.key(3), params)
    want_res, want_ad = jpeft.init_pissa(cfg, params, jax.random.key(3), bench.model, *bench.example_input(), niter=2)
    for got, want in ((res, want_res), (ad, want_ad)):
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def _input_subspace_overlap(base, params, adapter, path="Dense_0"):
    """How much of the second task's A lies in the input subspace of the first task's update
    (read off the merged base: params - base = s A1 B1): ||P1 A2||_F / ||A2||_F."""
    d1 = np.asarray(params["params"][path]["kernel"] - base["params"][path]["kernel"])  # [in, out]
    r = adapter[path].lora_A.shape[1]
    u, _, _ = np.linalg.svd(d1, full_matrices=False)
    p1 = u[:, :r] @ u[:, :r].T
    a2 = np.asarray(adapter[path].lora_A)
    return np.linalg.norm(p1 @ a2) / np.linalg.norm(a2)


def test_two_task_run_freezes_earlier_adapter_and_pushes_orthogonal():
    bench = SplitDigits("class", steps_per_task=40, batch_size=16, hidden=(16,), num_tasks=2)
    (spec,) = [m for m in bench.default_methods() if m.name == "O-LoRA"]
    outs = {}
    for lam in (1e-8, 10.0):  # the strength rides in the batch: one compiled step for both
        outs[lam] = experiment.run_one(bench, dataclasses.replace(spec, orthogonal=lam), 0, log=None, keep_adapter=True)
    for lam, out in outs.items():
        R_ = np.asarray(out["R"])
        assert R_.shape == (2, 2) and np.all(np.isfinite(R_)) and R_[0, 0] > 0.5, (lam, R_)
        # the first task's adapter is summed into the frozen base; the adapter is the second task's
        # fresh LoRA (rank 8 each)
        d = out["params"]["params"]["Dense_0"]["kernel"] - out["base"]["params"]["Dense_0"]["kernel"]
        assert int(jnp.linalg.matrix_rank(d)) == 8
        assert sorted(out["adapter"]) == ["Dense_0", "Dense_1"] and out["adapter"]["Dense_0"].lora_A.shape == (64, 8)
    # task 0 is identical for both strengths (the penalty is 0 there), so the merged base is too
    for x, y in zip(jax.tree.leaves(outs[1e-8]["params"]), jax.tree.leaves(outs[10.0]["params"])):
        np.testing.assert_array_equal(x, y)
    weak = _input_subspace_overlap(outs[1e-8]["base"], outs[1e-8]["params"], outs[1e-8]["adapter"])
    strong = _input_subspace_overlap(outs[10.0]["base"], outs[10.0]["params"], outs[10.0]["adapter"])
    print(f"overlap of task 2's A with task 1's input subspace: lambda 1e-8 {weak:.3f}, lambda 10 {strong:.3f}")
    assert strong < 0.5 * weak, (strong, weak)
