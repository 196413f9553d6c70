"""The forgetting guard in :func:`jpeft.fit`: a run pushed away from its canary data stops
(or rolls back) at the first check over budget and keeps the last within-budget state; a
run within budget is bit-identical to one without the guard."""

from __future__ import annotations

import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
from jpeft.errors import ConfigError, InputValidationError
from jpeft.forgetting.guard import canary_stats, current_lr_scale, scale_lr

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "helpers"))
import ckpt_common as C  # noqa: E402

EVERY = 2
N = 12


def _logits_fn():
    m = C.model()
    return lambda p, a, b: jpeft.apply(m, p, a, b["input_ids"])


def _canary():
    rng = np.random.default_rng(7)
    return [{"input_ids": rng.integers(0, C.VOCAB, (C.BATCH, C.SEQ)).astype(np.int32)} for _ in range(2)]


def _skewed(start, stop):
    """Training batches unlike the canary: every label is token 3, so the canary loss rises."""
    for i in range(start, stop):
        b = C.batch(i)
        yield {"input_ids": b["input_ids"], "labels": np.full_like(b["labels"], 3)}


@pytest.fixture(scope="module")
def setup():
    params, cfg, adapter, _, _, key = C.setup()
    opt = optax.chain(optax.adam(3e-2), jpeft.lr_scale())
    step = jpeft.make_train_step(C.loss_fn(), opt, donate=False)
    return params, adapter, opt, step, key


def _equal(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _rises(setup):
    """The canary loss rise after each check step of the unguarded run, and its states."""
    params, adapter, opt, step, key = setup
    a, o = adapter, opt.init(adapter)
    out = {}
    for s in range(0, N, EVERY):
        r = jpeft.fit(step, params, a, o, _skewed(s, s + EVERY), key=key, start_step=s, data_position=s)
        a, o = r.adapter, r.opt_state
        st = canary_stats(_logits_fn(), params, a, _canary())
        out[s + EVERY] = (st["loss_rise"], st["kl_mean"], a, o)
    return out


@pytest.fixture(scope="module")
def rises(setup):
    return _rises(setup)


def _budget(rises):
    """A loss-rise budget crossed for the first time at a check in the middle of the run."""
    steps = sorted(rises)
    vals = [rises[s][0] for s in steps]
    assert vals[3] > max(vals[:3]) + 0.1 and vals[-1] > vals[3], vals  # the skewed data pushes the canary loss up
    return (max(vals[:3]) + vals[3]) / 2, steps[3], steps[2]  # budget, first step over it, last within it


def test_stop_at_the_first_check_over_budget_keeps_the_last_state_within_it(setup, rises, tmp_path, capsys):
    params, adapter, opt, step, key = setup
    budget, bad, good = _budget(rises)
    guard = jpeft.ForgettingGuard(_canary(), _logits_fn(), max_loss_rise=budget, every=EVERY, action="stop")
    with jpeft.MetricLog(str(tmp_path / "m.jsonl")) as log:
        res = jpeft.fit(step, params, adapter, opt.init(adapter), _skewed(0, N), key=key, num_steps=N, log=log,
                        forgetting=guard, log_every=100, progress=True)
    assert res.step == bad and len(res.history) == bad  # stopped right at the crossing check
    rep = res.forgetting
    assert rep["stopped"] and rep["kept_step"] == good and rep["rollbacks"] == 0
    assert [e["action"] for e in rep["events"]] == ["stop"] and rep["events"][0]["step"] == bad
    assert _equal(res.adapter, rises[good][2]) and _equal(res.opt_state, rises[good][3])
    kept = canary_stats(_logits_fn(), params, res.adapter, _canary())
    assert kept["loss_rise"] <= budget == guard.max_loss_rise
    assert kept["loss_rise"] == pytest.approx(rises[good][0], abs=1e-6)
    recs = [json.loads(x) for x in open(tmp_path / "m.jsonl")]
    canary = [r for r in recs if "canary_loss_rise" in r]
    assert [r["step"] for r in canary] == [0, 2, 4, 6, 8][: bad // EVERY + 1]
    assert canary[0]["canary_loss_rise"] == pytest.approx(0.0, abs=1e-6)  # LoRA starts as the base (B = 0)
    assert canary[-1]["canary_action"] == "stop"
    assert canary[-1]["canary_loss_rise"] == pytest.approx(rises[bad][0], abs=1e-6)
    err = capsys.readouterr().err  # the progress bar's last state and the guard's message
    assert f"canary_rise={rises[bad][0]:.4f}" in err and f"step {bad}: canary loss rise" in err
    assert f"training stopped, keeping the adapter of step {good}" in err


def test_a_run_within_budget_is_bit_identical_with_and_without_the_guard(setup):
    params, adapter, opt, step, key = setup
    plain = jpeft.fit(step, params, adapter, opt.init(adapter), _skewed(0, 6), key=key, num_steps=6)
    guard = jpeft.ForgettingGuard(_canary(), _logits_fn(), max_loss_rise=1e3, max_kl=1e3, every=EVERY,
                                  action="rollback")
    guarded = jpeft.fit(step, params, adapter, opt.init(adapter), _skewed(0, 6), key=key, num_steps=6,
                        forgetting=guard)
    assert _equal(plain.adapter, guarded.adapter) and _equal(plain.opt_state, guarded.opt_state)
    assert [h["loss"] for h in plain.history] == [h["loss"] for h in guarded.history]
    rep = guarded.forgetting
    assert not rep["stopped"] and rep["events"] == [] and rep["kept_step"] == 6
    assert [c["step"] for c in rep["checks"]] == [0, 2, 4, 6]
    assert plain.forgetting is None


def test_rollback_restores_the_kept_state_lowers_the_lr_and_continues_exactly(setup, rises):
    params, adapter, opt, step, key = setup
    budget, bad, good = _budget(rises)
    kw = dict(max_loss_rise=budget, every=EVERY, lr_factor=0.25)
    guard = jpeft.ForgettingGuard(_canary(), _logits_fn(), action="rollback", max_rollbacks=1, **kw)
    res = jpeft.fit(step, params, adapter, opt.init(adapter), _skewed(0, N), key=key, num_steps=N, forgetting=guard)
    ev = res.forgetting["events"]
    assert ev[0] == {"step": bad, "action": "rollback", "to_step": good, "why": ev[0]["why"], "lr_scale": 0.25}
    # the reference: from the kept state of step `good`, lr x 0.25, the data from step `bad` on,
    # with a stop guard (the rollback run has no rollback left)
    a, o = rises[good][2], scale_lr(rises[good][3], 0.25)
    ref_guard = jpeft.ForgettingGuard(_canary(), _logits_fn(), action="stop", **kw)
    ref = jpeft.fit(step, params, a, o, _skewed(bad, N), key=key, start_step=bad, data_position=bad,
                    total_steps=N, forgetting=ref_guard)
    assert res.step == ref.step and _equal(res.adapter, ref.adapter) and _equal(res.opt_state, ref.opt_state)
    assert [h["loss"] for h in res.history[bad:]] == [h["loss"] for h in ref.history]
    assert float(current_lr_scale(res.opt_state)) == 0.25
    assert res.forgetting["stopped"] == ref.forgetting["stopped"]
    final = canary_stats(_logits_fn(), params, res.adapter, _canary())
    assert final["loss_rise"] <= budget


def test_the_last_step_is_checked_when_the_batches_end_without_total_steps(setup, rises):
    # the documented call has no num_steps: the run ends with its batches, and the state it returns must be
    # checked as at total_steps (it used to come back unchecked, over budget, with stopped False)
    params, adapter, opt, step, key = setup
    budget, bad, good = _budget(rises)
    guard = jpeft.ForgettingGuard(_canary(), _logits_fn(), max_loss_rise=budget, every=good, action="stop")
    res = jpeft.fit(step, params, adapter, opt.init(adapter), list(_skewed(0, bad)), key=key, forgetting=guard)
    rep = res.forgetting
    assert [c["step"] for c in rep["checks"]] == [0, good, bad]
    assert rep["stopped"] and rep["kept_step"] == good and res.step == bad
    assert _equal(res.adapter, rises[good][2]) and _equal(res.opt_state, rises[good][3])
    within = jpeft.ForgettingGuard(_canary(), _logits_fn(), max_loss_rise=1e3, every=good, action="rollback")
    res = jpeft.fit(step, params, adapter, opt.init(adapter), list(_skewed(0, bad)), key=key, forgetting=within)
    assert [c["step"] for c in res.forgetting["checks"]] == [0, good, bad] and res.forgetting["kept_step"] == bad
    assert not res.forgetting["stopped"] and _equal(res.adapter, rises[bad][2])


def test_the_last_step_is_checked_when_the_batches_end_before_num_steps(setup, rises):
    # num_steps is at most: batches that end first end the run there, and the state fit returns must be
    # checked as at the last step (it came back unchecked: canary loss rise 2.04 against a budget of 0.05 with
    # every=100, num_steps=12 and 10 batches, checks [0] only and stopped False)
    params, adapter, opt, step, key = setup
    budget, bad, good = _budget(rises)
    guard = jpeft.ForgettingGuard(_canary(), _logits_fn(), max_loss_rise=budget, every=good, action="stop")
    res = jpeft.fit(step, params, adapter, opt.init(adapter), list(_skewed(0, bad)), key=key, num_steps=N,
                    forgetting=guard)
    rep = res.forgetting
    assert [c["step"] for c in rep["checks"]] == [0, good, bad]
    assert rep["stopped"] and rep["kept_step"] == good and res.step == bad
    assert _equal(res.adapter, rises[good][2]) and _equal(res.opt_state, rises[good][3])
    assert canary_stats(_logits_fn(), params, res.adapter, _canary())["loss_rise"] <= budget
    # with total_steps given, a later call continues the run: the batches' end is not its last step
    cont = jpeft.ForgettingGuard(_canary(), _logits_fn(), max_loss_rise=budget, every=good, action="stop")
    res = jpeft.fit(step, params, adapter, opt.init(adapter), list(_skewed(0, bad)), key=key, num_steps=N,
                    total_steps=N, forgetting=cont)
    assert [c["step"] for c in res.forgetting["checks"]] == [0, good] and not res.forgetting["stopped"]


def test_a_residual_base_run_compares_the_canary_with_the_original_base(setup):
    # PiSSA & co. train on the residual base: logits_fn(residual, None) is not the base model, so an adapter that
    # has not changed the model yet read as a loss rise and KL above 0 (measured against the residual model)
    params, _, _, _, key = setup
    residual, adapter = jpeft.init_pissa(jpeft.LoraConfig(r=4, alpha=4, target_modules=["q_proj", "v_proj", "lm_head"]),
                                         params, jax.random.key(0))
    opt = optax.chain(optax.adam(1e-3), jpeft.lr_scale())
    step = jpeft.make_train_step(C.loss_fn(), opt, donate=False)
    args = (step, residual, adapter, opt.init(adapter), [C.batch(i) for i in range(2)])
    guard = jpeft.ForgettingGuard(_canary(), _logits_fn(), max_kl=1e3, every=EVERY)
    with pytest.raises(ConfigError, match=r"residual base \(pissa init\).*base_params="):
        jpeft.fit(*args, key=key, forgetting=guard)
    guard = jpeft.ForgettingGuard(_canary(), _logits_fn(), max_kl=1e3, every=EVERY, base_params=params)
    first = jpeft.fit(*args, key=key, forgetting=guard).forgetting["checks"][0]
    assert first["canary_loss_rise"] == pytest.approx(0.0, abs=1e-5) and first["canary_kl"] == pytest.approx(0.0, abs=1e-6)
    wrong = canary_stats(_logits_fn(), residual, adapter, _canary())  # what the guard measured before
    assert wrong["kl_mean"] > 1e-3


def test_guard_arguments_are_checked(setup):
    params, adapter, _, _, key = setup
    make = lambda **kw: jpeft.ForgettingGuard(_canary(), _logits_fn(), **{"max_loss_rise": 0.1, **kw})
    for kw, msg in (({"max_loss_rise": None}, "needs a budget"), ({"action": "halt"}, "action must be one of"),
                    ({"lr_factor": 1.5}, "lr_factor must be a number in (0, 1)"),
                    ({"every": 0}, "every must be a positive integer"), ({"max_kl": -1.0}, "max_kl must be")):
        with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            make(**kw)
    plain = optax.adam(1e-2)
    step = jpeft.make_train_step(C.loss_fn(), plain, donate=False)
    with pytest.raises(ConfigError, match=r"optax.chain\(..., jpeft.lr_scale\(\)\)"):
        jpeft.fit(step, params, adapter, plain.init(adapter), _skewed(0, 2), key=key,
                  forgetting=make(action="rollback"))
    # a resumed guard's state without its guard was dropped silently (the run went on unguarded)
    with pytest.raises(ConfigError, match="forgetting_state .* but no forgetting guard"):
        jpeft.fit(step, params, adapter, plain.init(adapter), _skewed(0, 2), key=key, forgetting_state={"kept": None})


def test_an_lr_scale_before_another_stage_is_refused(setup):
    """``optax.chain(jpeft.lr_scale(), optax.adam(...))``: Adam divides the scale out, so a rollback's
    lower learning rate left the step as it was (checked below, to 1e-6) and the guard went on
    "lowering" it without a word. The guard and :func:`scale_lr` now refuse an lr_scale that is not
    the chain's last stage; the order the docs give still works (the other tests)."""
    params, adapter, _, _, key = setup
    wrong = optax.chain(jpeft.lr_scale(), optax.adam(1e-2))
    state = wrong.init(adapter)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.3), adapter)
    full, _ = wrong.update(grads, state, adapter)
    halved, _ = wrong.update(grads, _halve(state), adapter)
    assert all(np.allclose(a, b, atol=1e-6) for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(halved)))
    with pytest.raises(ConfigError, match=r"not the last stage .* optax.chain\(optax.adamw\(...\), jpeft.lr_scale\(\)\)"):
        scale_lr(state, 0.5)
    step = jpeft.make_train_step(C.loss_fn(), wrong, donate=False)
    guard = jpeft.ForgettingGuard(_canary(), _logits_fn(), max_loss_rise=0.1, action="rollback")
    with pytest.raises(ConfigError, match="not the last stage"):
        jpeft.fit(step, params, adapter, state, _skewed(0, 2), key=key, forgetting=guard)
    # the same stage last: the halved scale halves the step
    right = optax.chain(optax.adam(1e-2), jpeft.lr_scale())
    st = right.init(adapter)
    full, _ = right.update(grads, st, adapter)
    halved, _ = right.update(grads, scale_lr(st, 0.5), adapter)
    assert all(np.allclose(0.5 * np.asarray(a), b, rtol=1e-6) for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(halved)))


def test_an_lr_scale_before_another_stage_of_a_named_chain_is_refused(setup):
    """``optax.named_chain`` keeps its stages' states in a dict, in order; an lr_scale before Adam there
    was not seen (only ``optax.chain``'s tuple was), so scale_lr halved it and the step stayed the same
    (checked below), a rollback lowering nothing without a word. The parallel groups of
    ``optax.partition`` (also a dict) are no order: an lr_scale last in each group still works."""
    params, adapter, _, _, key = setup
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.3), adapter)
    wrong = optax.named_chain(("scale", jpeft.lr_scale()), ("adam", optax.adam(1e-2)))
    state = wrong.init(adapter)
    full, _ = wrong.update(grads, state, adapter)
    lowered = {**state, "scale": _halve((state["scale"],))[0]}
    halved, _ = wrong.update(grads, lowered, adapter)
    assert all(np.allclose(a, b, atol=1e-6) for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(halved)))
    with pytest.raises(ConfigError, match="not the last stage"):
        scale_lr(state, 0.5)
    guard = jpeft.ForgettingGuard(_canary(), _logits_fn(), max_loss_rise=0.1, action="rollback")
    step = jpeft.make_train_step(C.loss_fn(), wrong, donate=False)
    with pytest.raises(ConfigError, match="not the last stage"):
        jpeft.fit(step, params, adapter, state, _skewed(0, 2), key=key, forgetting=guard)
    # the order that works, in a named_chain and in each group of a partition
    labels = jax.tree.map(lambda _: "a", adapter)
    labels[sorted(labels)[0]] = jax.tree.map(lambda _: "b", labels[sorted(labels)[0]])
    for right in (optax.named_chain(("adam", optax.adam(1e-2)), ("scale", jpeft.lr_scale())),
                  optax.partition({g: optax.chain(optax.adam(1e-2), jpeft.lr_scale()) for g in "ab"}, labels)):
        st = right.init(adapter)
        full, _ = right.update(grads, st, adapter)
        halved, _ = right.update(grads, scale_lr(st, 0.5), adapter)
        assert all(np.allclose(0.5 * np.asarray(a), b, rtol=1e-6) for a, b in zip(jax.tree.leaves(full),
                                                                                  jax.tree.leaves(halved)))


def _halve(state):
    """``state`` with its lr_scale halved, without scale_lr (which refuses this chain)."""
    return (state[0]._replace(hyperparams={**state[0].hyperparams, "lr_scale": state[0].hyperparams["lr_scale"] * 0.5}),
            *state[1:])


def test_a_canary_without_targets_or_a_non_finite_check_is_not_within_budget(setup):
    params, adapter, opt, _, _ = setup
    # a canary whose loss_mask keeps no next-token target measured a rise and a KL of exactly 0 at every
    # check, whatever the adapter: a guard that could never fire. Refused when it is built.
    rows = _canary()
    first_only = np.zeros_like(rows[0]["input_ids"])
    first_only[:, 0] = 1  # the first token is never a next-token target
    for mask in (np.zeros_like(first_only), first_only):
        with pytest.raises(InputValidationError, match="hold no next-token target"):
            jpeft.ForgettingGuard([{**b, "loss_mask": mask} for b in rows], _logits_fn(), max_loss_rise=0.1)
    with pytest.raises(InputValidationError, match="loss_mask must have the shape of input_ids"):
        jpeft.ForgettingGuard([{**rows[0], "loss_mask": np.ones((1, 2))}], _logits_fn(), max_loss_rise=0.1)
    # a NaN measurement compared as within budget (NaN > x is false) and its state became the kept one
    g = jpeft.ForgettingGuard(rows, _logits_fn(), max_loss_rise=0.1, max_kl=0.1, every=1)
    g.start(params, adapter, opt.init(adapter), 0)
    bad = jax.tree.map(lambda x: x * np.nan if isinstance(x, jax.Array) and x.dtype.kind == "f" else x, adapter)
    m, decision, kept = g.check(params, bad, opt.init(adapter), 1)
    assert math.isnan(m["canary_loss_rise"]) and decision == "stop" and g.report["kept_step"] == 0
    assert "not finite" in g.report["events"][-1]["why"] and _equal(kept[0], adapter)


def test_checkpoints_hold_the_rolled_back_state_and_its_lower_lr(setup, rises, tmp_path):
    """The checkpoint of the rollback step holds the restored state with the lowered
    ``lr_scale``, so a resumed run continues as the uninterrupted one; a stop adds no
    checkpoint of the over-budget state."""
    params, adapter, opt, step, key = setup
    budget, bad, good = _budget(rises)
    guard = jpeft.ForgettingGuard(_canary(), _logits_fn(), max_loss_rise=budget, every=EVERY, action="rollback",
                                  max_rollbacks=1, lr_factor=0.25)
    with jpeft.checkpoint.CheckpointManager(tmp_path / "ck", C.lora_config(), params, optimizer=opt,
                                            save_every=EVERY, keep_last=None, async_save=False) as mngr:
        res = jpeft.fit(step, params, adapter, opt.init(adapter), _skewed(0, N), key=key, num_steps=N,
                        checkpoint=mngr, save_last=True, forgetting=guard)
        st = mngr.restore(bad)
        saved = mngr.all_steps()
    assert st.data_position == bad and _equal(st.adapter, rises[good][2])
    assert float(current_lr_scale(st.opt_state)) == 0.25
    stop_step = res.step if res.forgetting["stopped"] else None
    assert stop_step is None or stop_step not in saved  # stopped: the over-budget state is not checkpointed
    assert saved == [s for s in range(EVERY, N + 1, EVERY) if s != stop_step]


def test_a_start_over_budget_is_refused_not_kept_as_within_budget(setup):
    """The starting state is what a stop returns and a rollback restores as "the last within
    budget"; an adapter that already crosses the budget (prompt tuning's virtual tokens, an
    adapter trained before) was kept unchecked, so the run ended on an over-budget adapter."""
    params, adapter, opt, step, key = setup
    moved = jax.tree.map(lambda x: x + 0.5 if isinstance(x, jax.Array) and x.dtype.kind == "f" else x, adapter)
    start_kl = canary_stats(_logits_fn(), params, moved, _canary())["kl_mean"]
    assert start_kl > 1e-3
    guard = jpeft.ForgettingGuard(_canary(), _logits_fn(), max_kl=start_kl / 2, every=EVERY, action="rollback")
    with pytest.raises(ConfigError, match=r"already crossed by the adapter it starts from \(step 0\): canary KL"):
        jpeft.fit(step, params, moved, opt.init(moved), _skewed(0, N), key=key, num_steps=N, forgetting=guard)
    # within budget at the start: runs as before
    guard = jpeft.ForgettingGuard(_canary(), _logits_fn(), max_kl=start_kl * 2, every=EVERY)
    assert guard.start(params, moved, opt.init(moved), 0)["canary_kl"] == pytest.approx(start_kl)
