"""The one training loop, :func:`jpeft.fit`: its guard, eval, logging, accumulation, Ctrl-C
and resume are tested here once; the trainers built on it (``jpeft train``, ``jpeft demo``,
the forgetting runner, the code-model pretraining) are checked to call it."""

from __future__ import annotations

import json
import os
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
from jpeft.errors import NonFiniteError

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "helpers"))
import ckpt_common as C  # noqa: E402


@pytest.fixture(scope="module")
def run():
    params, cfg, adapter, opt, state, key = C.setup()
    step = jpeft.make_train_step(C.loss_fn(), opt, donate=False)
    return params, cfg, adapter, opt, state, key, step


def _equal(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_eval_log_and_progress_records(run, tmp_path, capsys):
    params, cfg, adapter, opt, state, key, step = run
    seen = []

    def eval_fn(a, s):
        seen.append(s)
        return {"loss": float(C.loss_fn()(params, a, C.batch(99), jax.random.key(0)))}

    sched = optax.constant_schedule(3e-2)
    with jpeft.MetricLog(str(tmp_path / "m.jsonl")) as log:
        res = jpeft.fit(step, params, adapter, state, C.batches(0, 100), key=key, num_steps=7, eval_fn=eval_fn,
                        eval_every=3, log=log, log_every=2, schedule=sched, progress=True, desc="test")
    assert res.step == 7 and res.data_position == 7 and len(res.history) == len(res.step_seconds) == 7
    assert seen == [3, 6, 7]  # every 3 steps and at the end of the run
    recs = [json.loads(x) for x in open(tmp_path / "m.jsonl")]
    train = [r for r in recs if "loss" in r]
    assert [r["step"] for r in train] == [2, 4, 6, 7]
    assert [r["step"] for r in recs if "eval_loss" in r] == [3, 6, 7]
    assert all(r["lr"] == pytest.approx(3e-2) for r in train)
    assert train[0]["tokens_per_s"] > 0  # tokens of batch["input_ids"], the compiling step left out
    assert [r["loss"] for r in train] == [res.history[s - 1]["loss"] for s in (2, 4, 6, 7)]
    assert res.eval["loss"] == recs[-1]["eval_loss"] < res.history[0]["loss"]
    # the evaluation lines (tqdm.write: on stdout, the bar on stderr) say the run's desc (the lines of several
    # runs in stdout redirected to a file were told apart by nothing), with the logged numbers
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ": eval " in ln]
    assert lines == [f"test: step {r['step']}: eval loss {r['eval_loss']:.4f}" for r in recs if "eval_loss" in r]


def test_a_run_that_ends_with_its_batches_logs_and_evaluates_its_last_step(run):
    """Without num_steps or total_steps the run ends when the batches do: its last step was
    neither logged (the docstring's "and at the last step") nor evaluated, so the final loss of
    `fit(..., log=MetricLog(...))` over a list of batches was missing from the log."""
    params, cfg, adapter, opt, state, key, step = run
    seen, recs = [], []

    def eval_fn(a, s):
        seen.append(s)
        return {"loss": float(C.loss_fn()(params, a, C.batch(99), jax.random.key(0)))}

    res = jpeft.fit(step, params, adapter, state, list(C.batches(0, 7)), key=key, eval_fn=eval_fn, eval_every=3,
                    log=recs.append, log_every=2)
    assert res.step == 7 and seen == [3, 6, 7]
    assert [r["step"] for r in recs if "loss" in r] == [2, 4, 6, 7]
    assert recs[-2]["loss"] == res.history[-1]["loss"] and recs[-1]["eval_loss"] == res.eval["loss"]
    recs.clear()  # a last step already logged is not logged twice
    jpeft.fit(step, params, adapter, state, list(C.batches(0, 4)), key=key, log=recs.append, log_every=2)
    assert [r["step"] for r in recs] == [2, 4]


def test_run_ending_on_nonfinite_steps_raises_and_saves_nothing(run, tmp_path):
    """Fewer non-finite steps than the guard's limit, but at the end of the run: its adapter
    is not a trained result, so fit raises instead of returning it (issue #16, item 5)."""
    params, cfg, adapter, opt, state, key, step = run
    nan = jax.tree.map(lambda x: x * jnp.nan if x.dtype == jnp.float32 else x, params)
    with jpeft.checkpoint.CheckpointManager(tmp_path / "ck", cfg, nan, optimizer=opt, save_every=1,
                                            async_save=False) as mngr:
        with pytest.raises(NonFiniteError, match=r"^step 2: the run ended with 2 consecutive non-finite step\(s\) "
                                                 r"\(steps 1 to 2\).*The last step with a finite update was none"):
            jpeft.fit(step, nan, adapter, state, C.batches(0, 2), key=key, checkpoint=mngr, save_last=True)
        assert mngr.all_steps() == []


def test_negative_num_steps_is_a_config_error(run):
    """A negative num_steps was a raw ValueError from itertools.islice."""
    params, cfg, adapter, opt, state, key, step = run
    with pytest.raises(jpeft.ConfigError, match="num_steps must be a non-negative integer, found -1"):
        jpeft.fit(step, params, adapter, state, C.batches(0, 2), key=key, num_steps=-1)
    assert jpeft.fit(step, params, adapter, state, C.batches(0, 2), key=key, num_steps=np.int64(1)).step == 1


def test_accumulation_equals_one_step_on_the_whole_batch(run):
    params, cfg, _, opt, _, key, _ = run
    adapter = jpeft.init(C.lora_config(dropout=0.0), params, jax.random.key(1))
    state = opt.init(adapter)
    one = jpeft.make_train_step(C.loss_fn(), opt, donate=False)
    acc = jpeft.make_train_step(C.loss_fn(), opt, donate=False, accumulate_steps=2)
    a = jpeft.fit(one, params, adapter, state, C.batches(0, 4), key=key)
    b = jpeft.fit(acc, params, adapter, state, C.batches(0, 4), key=key)
    np.testing.assert_allclose([h["loss"] for h in a.history], [h["loss"] for h in b.history], rtol=1e-6)
    for x, y in zip(jax.tree.leaves(a.adapter), jax.tree.leaves(b.adapter)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_tuple_batches_of_ones_own_model_train_and_log_no_token_rate():
    """A user's own loss over tuple batches ``(x, y)``: fit's token count read ``np.shape`` of the
    tuple, a raw ValueError (inhomogeneous shape) at step 2, after the first step had run; and a
    batch without ``input_ids`` logged ``tokens_per_s`` 0.0 (there were no token ids to count)."""
    import flax.linen as nn

    model = nn.Dense(2)
    x = jax.random.normal(jax.random.key(0), (4, 8, 3))
    y = jnp.tanh(x[..., :2])
    params = model.init(jax.random.key(1), x[0])
    adapter = jpeft.init(jpeft.LoraConfig(r=2, target_modules=".*", init_weights="random"), params, jax.random.key(2))
    opt = optax.sgd(0.1)
    step = jpeft.make_train_step(lambda p, a, b, k: jnp.mean((jpeft.apply(model, p, a, b[0]) - b[1]) ** 2), opt,
                                 donate=False)
    recs = []
    res = jpeft.fit(step, params, adapter, opt.init(adapter), [(x[i], y[i]) for i in range(4)], key=jax.random.key(3),
                    log=recs.append)
    assert res.step == 4 and [r["step"] for r in recs] == [1, 2, 3, 4]
    assert all(r["tokens_per_s"] is None for r in recs)
    a = adapter  # the same four SGD steps by hand
    for i in range(4):
        g = jax.grad(lambda a: jnp.mean((jpeft.apply(model, params, a, x[i]) - y[i]) ** 2))(a)
        a = jax.tree.map(lambda p, d: p - 0.1 * d, a, g)
    for u, v in zip(jax.tree.leaves(res.adapter), jax.tree.leaves(a)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-5, atol=1e-6)


def test_a_half_precision_adapter_is_warned_of_because_its_small_updates_round_away():
    """An adapter cast to bfloat16 by the user: Adam at lr 1e-5 moves none of lora_A's entries (each step is
    below bfloat16's rounding step of the weight), with no word. fit now warns once; a float32 adapter is quiet."""
    import warnings

    import flax.linen as nn

    model = nn.Dense(8)
    x = jax.random.normal(jax.random.key(0), (4, 16, 8))
    params = model.init(jax.random.key(1), x[0])
    a32 = jpeft.init(jpeft.LoraConfig(r=2, target_modules=".*", init_weights="random"), params, jax.random.key(2))
    a16 = jax.tree.map(lambda v: v.astype(jnp.bfloat16), a32)
    opt = optax.adam(1e-5)
    step = jpeft.make_train_step(
        lambda p, a, b, k: jnp.mean((jpeft.apply(model, p, a, b) - jnp.roll(b, 1, -1)) ** 2), opt, donate=False)
    with pytest.warns(RuntimeWarning, match=r"2 of 2 trainable arrays are half precision .*bfloat16.*float32") as w:
        res = jpeft.fit(step, params, a16, opt.init(a16), list(x), key=jax.random.key(3))
    assert sum("half precision" in str(r.message) for r in w) == 1
    (node,) = res.adapter.values()
    assert (np.asarray(node.lora_A) == np.asarray(a16[""].lora_A)).all()  # what the warning is about: nothing moved
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        res = jpeft.fit(step, params, a32, opt.init(a32), list(x), key=jax.random.key(3))
    assert (np.asarray(res.adapter[""].lora_A) != np.asarray(a32[""].lora_A)).all()


def test_an_eval_fn_returning_jax_scalars_is_logged_as_numbers(run, tmp_path):
    """eval_fn returning {"loss": loss_fn(...)} (a JAX scalar, the natural thing) crashed fit at the first
    evaluation, after the steps before it, with json's raw TypeError ("Object of type ArrayImpl is not JSON
    serializable") under a MetricLog, and FitResult.eval held device arrays; a non-scalar is refused by name."""
    params, cfg, adapter, opt, state, key, step = run

    def eval_fn(a, s):
        return {"loss": C.loss_fn()(params, a, C.batch(99), jax.random.key(0)), "n": jnp.int32(7), "k": 3,
                "ok": jnp.bool_(True), "seen": False}  # a flag is logged as one (was refused since session 50)

    with jpeft.MetricLog(str(tmp_path / "m.jsonl")) as log:
        res = jpeft.fit(step, params, adapter, state, C.batches(0, 4), key=key, eval_fn=eval_fn, eval_every=2, log=log)
    evals = [json.loads(x) for x in open(tmp_path / "m.jsonl") if "eval_loss" in x]
    assert [r["step"] for r in evals] == [2, 4]
    want = float(C.loss_fn()(params, res.adapter, C.batch(99), jax.random.key(0)))
    assert res.eval == {"loss": pytest.approx(want, rel=1e-6), "n": 7, "k": 3, "ok": True, "seen": False}
    assert type(res.eval["loss"]) is float and type(res.eval["ok"]) is bool
    assert evals[-1] == {"step": 4, "eval_loss": res.eval["loss"], "eval_n": 7, "eval_k": 3, "eval_ok": True,
                         "eval_seen": False}
    with pytest.raises(jpeft.ConfigError, match=r"must return a dict of numbers; at step 1 its 'per_example' is"):
        jpeft.fit(step, params, adapter, state, C.batches(0, 2), key=key, eval_every=1,
                  eval_fn=lambda a, s: {"per_example": jnp.zeros(4)})


@pytest.mark.parametrize("bad, found", [
    (lambda y: jnp.mean(y ** 2, axis=-1), "an array of shape ({n},) and dtype float32"),  # per-example losses
    (lambda y: jnp.sum(y > 0), "an array of shape () and dtype int32"),  # a count
    (lambda y: (jnp.mean(y), {}, 1), "a tuple of 3 items"),
])
def test_a_loss_that_is_not_one_float_number_is_a_config_error(bad, found):
    """loss_fn returning per-example losses, an integer or a 3-tuple raised JAX's TypeError from
    inside grad ("Gradient only defined for scalar-output functions"), with every step variant."""
    import flax.linen as nn

    model = nn.Dense(2)
    x = jnp.ones((8, 3))
    params = model.init(jax.random.key(0), x)
    adapter = jpeft.init(jpeft.LoraConfig(r=2, target_modules=".*"), params, jax.random.key(1))
    opt = optax.sgd(0.1)
    for k in (1, 2):
        step = jpeft.make_train_step(lambda p, a, b, key: bad(jpeft.apply(model, p, a, b)), opt, donate=False,
                                     accumulate_steps=k)
        with pytest.raises(jpeft.ConfigError, match=r"must return the loss as one float number") as e:
            step(params, adapter, opt.init(adapter), x, jax.random.key(2))
        assert "returned " + found.format(n=8 // k) in str(e.value)  # a micro-batch's with accumulation


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_saves_the_step_and_resume_is_exact(run, tmp_path, sig):
    """SIGTERM (a scheduler's or a spot pre-emption's notice) is handled as Ctrl-C: the step
    finishes, is saved, and the loop stops; the handlers found before are put back (here a
    script's own SIGTERM handler). SIGTERM used to end the process at once."""
    params, cfg, adapter, opt, state, key, step = run
    sig = getattr(signal, sig)
    straight = jpeft.fit(step, params, adapter, state, C.batches(0, 9), key=key)
    handler = signal.getsignal(signal.SIGINT)
    seen = []

    def own_sigterm_handler(signum, frame):  # a script's own, there before fit
        seen.append(signum)

    old_term = signal.signal(signal.SIGTERM, own_sigterm_handler)

    def interrupt_at_4(s, m):
        if s == 4:
            os.kill(os.getpid(), sig)  # the handler sets a flag; the loop stops after this step

    try:
        with jpeft.checkpoint.CheckpointManager(tmp_path / "ck", cfg, params, optimizer=opt, save_every=100,
                                                async_save=False) as mngr:
            first = jpeft.fit(step, params, adapter, state, C.batches(0, 9), key=key, checkpoint=mngr, save_last=True,
                              handle_interrupt=True, on_step=interrupt_at_4)
            assert first.interrupted and first.step == 4 and mngr.all_steps() == [4]
            st = mngr.restore_latest()
        assert signal.getsignal(signal.SIGINT) is handler  # the loop's handlers were removed
        assert signal.getsignal(signal.SIGTERM) is own_sigterm_handler and not seen
    finally:
        signal.signal(signal.SIGTERM, old_term)
    assert st.step == 4 and st.data_position == 4
    rest = jpeft.fit(step, params, st.adapter, st.opt_state, C.batches(st.data_position, 9), key=st.key,
                     start_step=st.step, data_position=st.data_position)
    assert [h["loss"] for h in first.history + rest.history] == [h["loss"] for h in straight.history]  # bitwise
    assert _equal(rest.adapter, straight.adapter) and not _equal(straight.adapter, adapter)


def test_a_signal_during_the_last_step_leaves_a_finished_run(run, tmp_path):
    """A Ctrl-C that lands in the last step interrupts nothing: fit returns the finished run
    (not interrupted=True, which made `jpeft train` print "interrupted ... Continue with --resume"
    and exit 130 after writing the finished adapter), with its last step saved and evaluated."""
    params, cfg, adapter, opt, state, key, step = run
    straight = jpeft.fit(step, params, adapter, state, C.batches(0, 5), key=key)
    evals = []

    def ctrl_c_at_5(s, m):
        if s == 5:
            os.kill(os.getpid(), signal.SIGINT)

    with jpeft.checkpoint.CheckpointManager(tmp_path / "ck", cfg, params, optimizer=opt, save_every=100,
                                            async_save=False) as mngr:
        res = jpeft.fit(step, params, adapter, state, C.batches(0, 5), key=key, checkpoint=mngr, save_last=True,
                        handle_interrupt=True, on_step=ctrl_c_at_5, eval_fn=lambda a, s: evals.append(s) or {})
        assert mngr.all_steps() == [5]
    assert not res.interrupted and res.step == 5 and evals == [5]
    assert _equal(res.adapter, straight.adapter)


def test_interrupt_handler_restores_python_handler_when_previous_was_not_set_from_python(monkeypatch):
    """signal.signal returns None for a handler installed outside Python (an embedding program,
    or a C extension); leaving the loop then puts Python's own handlers back (Ctrl-C's
    KeyboardInterrupt, SIGTERM's default), not the loop's flag-setter."""
    from jpeft import loop

    real = signal.signal
    monkeypatch.setattr(loop.signal, "signal", lambda s, h: (real(s, h), None)[1])  # previous one "from C"
    old_term = signal.getsignal(signal.SIGTERM)
    try:
        with loop._Interrupt(True) as it:
            assert signal.getsignal(signal.SIGINT) == it._handle
            assert signal.getsignal(signal.SIGTERM) == it._handle
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        real(signal.SIGINT, signal.default_int_handler)
        real(signal.SIGTERM, old_term)


def _spy(monkeypatch):
    calls = []
    real = jpeft.fit

    def spy(*a, **kw):
        calls.append(kw.get("desc", "fit"))
        return real(*a, **kw)

    monkeypatch.setattr(jpeft, "fit", spy)
    return calls


def test_forgetting_runner_pretraining_and_demo_train_through_fit(monkeypatch, tmp_path, capsys):
    from types import SimpleNamespace

    from jpeft.cli import _demo
    from jpeft.forgetting import experiment, language

    calls = _spy(monkeypatch)
    bench = experiment.get_benchmark("split-digits-task", steps_per_task=2)
    spec = experiment.MethodSpec("LoRA", jpeft.LoraConfig(r=2, target_modules=".*"), lr=1e-2, replay=0.25)
    res = experiment.run_one(bench, spec, seed=0)
    assert len(calls) == len(bench.task_names) and np.all(np.isfinite(res["R"]))

    calls.clear()
    setting = _demo.Setting(size="micro", pretrain_steps=2, steps=2, code_bytes=60_000, eval_rows=4)
    args = SimpleNamespace(cache_dir=str(tmp_path), no_cache=False, batch_size=4, seed=0, no_progress=True)
    model, params, how = _demo.base_model(setting, args, 16)
    args.no_progress = False  # the fine-tuning's bar, and the evaluation lines above it
    assert calls == ["pretraining the code model"] and "pretrained the base model" in how
    data = _demo.Data(16, setting)
    ev = _demo.make_eval(model)
    base = (ev(params, None, data.prose_eval), ev(params, None, data.code_eval))
    r = _demo.finetune("LoRA", jpeft.LoraConfig(r=2, target_modules=["q_proj"]), 1e-2, model, params, data, args,
                       2, 1, ev, base, replay=0.5)
    assert calls[-1] == "fine-tune on English: LoRA" and r.steps == [0, 1, 2] and len(r.old_loss) == 3
    # each evaluation line names the demo's run (its four runs' lines were alike in a log file)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ": eval " in ln]
    assert lines == [f"fine-tune on English: LoRA: step {i}: eval english {r.new_loss[i]:.4f}, code {r.old_loss[i]:.4f}"
                     for i in (1, 2)]
    assert language.pretrain_code_model(str(tmp_path), 2, seq_len=16, batch_size=4, size="micro")[2]["cached"]


def test_freed_memory_is_handed_back_after_the_first_step_and_after_evaluations(run, monkeypatch):
    """fit asks glibc, once the step's outputs are ready, to give the freed heap back after the
    first (compiling) step and after each evaluation, never after a plain step (issue 24: under
    the kept heap, full fine-tuning's peak otherwise grows by one step's temporaries;
    benchmarks/kept_heap_peak.py measures it)."""
    params, cfg, adapter, opt, state, key, step = run
    calls = []

    def counting_step(*a):
        out = step(*a)
        calls.append("step")
        return out

    def eval_fn(a, s):
        calls.append("eval")
        return {"loss": 0.0}

    monkeypatch.setattr(jpeft._hostmem, "release", lambda: calls.append("release") or True)
    res = jpeft.fit(counting_step, params, adapter, state, C.batches(0, 100), key=key, num_steps=5, eval_fn=eval_fn,
                    eval_every=2)
    assert res.step == 5
    assert calls == ["step", "release", "step", "eval", "release", "step", "step", "eval", "release",
                     "step", "eval", "release"]
    # a resumed run (a new fit call) hands its own first step's memory back too; no eval here
    calls.clear()
    jpeft.fit(counting_step, params, res.adapter, res.opt_state, C.batches(5, 100), key=key, num_steps=2,
              start_step=5)
    assert calls == ["step", "release", "step"]


def test_fit_waits_for_the_heap_to_settle_after_each_long_step(run, monkeypatch):
    """After each step but the first (which compiles), fit waits until the C heap holds no
    more than it did before the step (XLA frees the step's temporaries just after its outputs
    are ready; a next step dispatched before that puts its own elsewhere, issue 24); not after
    short steps, and not again once the heap failed to settle twice."""
    params, cfg, adapter, opt, state, key, step = run
    calls, heap = [], {"n": 0}

    def in_use():
        heap["n"] += 1
        return 1000 * heap["n"]

    def settle(before, **kw):
        calls.append(before)
        return len(calls) < 3  # the 3rd and 4th steps' heaps do not settle

    monkeypatch.setattr(jpeft._hostmem, "in_use", in_use)
    monkeypatch.setattr(jpeft._hostmem, "settle", settle)
    monkeypatch.setattr(jpeft.loop, "SETTLE_MIN_STEP_S", 0.0)
    monkeypatch.setattr(jpeft._hostmem, "RELEASE_WAIT", 0.0)  # the release after step 1 reads no heap here
    jpeft.fit(step, params, adapter, state, C.batches(0, 100), key=key, num_steps=6)
    assert calls == [1000, 2000, 3000, 4000]  # steps 2-5, each with the value read before it; not step 6
    calls.clear()
    heap["n"] = 0
    monkeypatch.setattr(jpeft.loop, "SETTLE_MIN_STEP_S", 1e9)  # every step counts as short
    jpeft.fit(step, params, adapter, state, C.batches(0, 100), key=key, num_steps=3)
    assert calls == [] and heap["n"] == 0


def test_step_heap_hands_back_pages_the_next_step_would_leave_idle(monkeypatch):
    """Issue 24: after each watched step StepHeap hands freed pages back (malloc_trim) when the
    freed temporaries were cut off from the top of the heap (same heap size, the free top
    shrunk by more than the slack: the next step's would go on top) and when the free top has
    released pages under resident ones (the next step's would fault in while resident ones
    stay idle); not for a top shrunk by less than the slack, a heap that grew, or a few
    released pages; at most max_releases times; an unwatched step starts the comparison again."""
    from jpeft._hostmem import Heap, StepHeap

    state, released = {}, []
    monkeypatch.setattr(jpeft._hostmem, "in_use", lambda: 0)
    monkeypatch.setattr(jpeft._hostmem, "settle", lambda before, **kw: True)
    monkeypatch.setattr(jpeft._hostmem, "heap", lambda: state["heap"])
    monkeypatch.setattr(jpeft._hostmem, "top_residency", lambda: state["pages"])

    def release():
        released.append(state["k"])
        state["heap"] = Heap(state["heap"].size, 0)  # the top trimmed
        return True

    monkeypatch.setattr(jpeft._hostmem, "release", release)

    def run(h, steps, watched=None):
        for k, (size_top, pages) in enumerate(steps):
            state.update(k=k, heap=Heap(*size_top), pages=pages)
            h.before(watched is None or k in watched)
            h.after()

    run(StepHeap(slack=5, max_releases=4), [
        ((100, 50), (0, 50)),  # steady: the temporaries' pages resident in the top
        ((100, 46), (0, 46)),  # the top a little smaller: nothing
        ((100, 10), (0, 10)),  # cut off: release
        ((200, 60), (0, 60)),  # the heap grew (the temporaries went on top): nothing
        ((200, 110), (50, 60)),  # 50 released under 60 resident: release
        ((300, 60), (3, 57)),  # 3 released, within the slack: nothing
        ((300, 10), (0, 10)),  # cut off: release
        ((300, 100), (10, 90)),  # released under resident: release (the 4th)
        ((300, 60), (0, 60)),
        ((300, 10), (0, 10)),  # cut off, but no releases left
    ])
    assert released == [2, 4, 6, 7]
    released.clear()
    run(StepHeap(slack=5), [((100, 50), (0, 50)), ((100, 50), (0, 50)), ((100, 10), (0, 10))], watched={0, 2})
    assert released == []  # step 1 not watched: step 2 has nothing to compare with
    h = StepHeap(slack=5)
    run(h, [((100, 50), (0, 50))])
    state["k"] = "fit"
    h.release()  # fit's own release (after its first step, an evaluation): the top trimmed
    run(h, [((100, 10), (0, 10))])
    assert released == ["fit"]  # a top trimmed by fit is not taken for one cut off


def test_step_heap_release_trims_again_when_the_last_works_temporaries_are_freed_late(monkeypatch):
    """Issue 24: fit's release after its first step (or an evaluation) can come before XLA has
    freed that work's temporaries (4 of 12 full fine-tuning runs peaked ~850 MiB high so);
    StepHeap.release watches the heap for up to `wait` seconds and trims again once it drops
    by more than the slack; once only when nothing is freed; no watching with wait=0."""
    from jpeft._hostmem import StepHeap

    heap, calls = [], []
    monkeypatch.setattr(jpeft._hostmem, "in_use", lambda: heap.pop(0) if len(heap) > 1 else heap[0])
    monkeypatch.setattr(jpeft._hostmem, "release", lambda: calls.append(len(heap)) or True)
    heap[:] = [1000, 1000, 990, 100]  # held at the call, then freed on XLA's thread
    StepHeap(slack=64).release(wait=5.0)
    assert calls == [3, 1]  # trimmed at once, and again after the drop (not waiting 5 s for it)
    calls.clear()
    heap[:] = [1000, 990]  # nothing freed late: one trim, after watching for `wait`
    StepHeap(slack=64).release(wait=0.02)
    assert calls == [1]
    calls.clear()
    heap[:] = [1000]
    StepHeap(slack=64).release(wait=0.0)
    assert calls == [1] and heap == [1000]


def test_an_optimizer_state_of_another_adapter_or_none_is_a_config_error(run):
    """make_train_step given the optimizer state of another adapter (or None) failed with a raw
    pytree ValueError / TypeError from inside optax; the named check covered only adapters with
    frozen arrays."""
    params, cfg, adapter, opt, state, key, step = run
    other = jax.tree.map(lambda a: a, dict(list(adapter.items())[:1]))  # one site fewer
    batch = next(iter(C.batches(0, 1)))
    for bad in (opt.init(other), None):
        with pytest.raises(jpeft.ConfigError, match="does not fit this optimizer and adapter"):
            step(params, adapter, bad, batch, key)


def test_an_array_aux_such_as_lm_loss_count_is_reported_not_a_tracer_error():
    # loss_fn returning jpeft.lm_loss's (loss, count) directly: the count was compared to {} (a
    # TypeError on a tracer from inside the jitted step); it is the step's "aux" metric
    import flax.linen as nn

    model = nn.Dense(2)
    x = jnp.ones((4, 3))
    params = model.init(jax.random.key(0), x)
    adapter = jpeft.init(jpeft.LoraConfig(r=1, target_modules=".*"), params, jax.random.key(1))

    def loss_fn(p, a, batch, key):
        y = jpeft.apply(model, p, a, batch)
        return jnp.mean(y ** 2), jnp.float32(batch.shape[0])

    opt = optax.sgd(0.1)
    _, _, metrics = jpeft.make_train_step(loss_fn, opt)(params, adapter, opt.init(adapter), x, jax.random.key(2))
    assert float(metrics["aux"]) == 4.0

    # an aux dict naming the step's own metrics replaced them (a "skipped" one misled fit's non-finite guard)
    from jpeft.errors import ConfigError

    for name in ("loss", "skipped"):
        def named(p, a, batch, key, name=name):
            return jnp.mean(jpeft.apply(model, p, a, batch) ** 2), {name: jnp.float32(0.0), "mine": jnp.float32(1.0)}

        with pytest.raises(ConfigError, match=f"use the step's own name\\(s\\) \\['{name}'\\]"):
            jpeft.make_train_step(named, opt)(params, adapter, opt.init(adapter), x, jax.random.key(2))


def test_resume_after_a_record_cut_off_mid_write_keeps_every_record_readable(tmp_path):
    """A run killed while writing metrics.jsonl leaves its last record cut off (no line end);
    the resumed run's first record was appended onto it, so both were unreadable (the resumed
    step missing from the log, a reader's json.loads failing). `jpeft train --resume` drops the
    cut-off record, and MetricLog ends such a line before appending (the library path)."""
    from jpeft.cli._trainer import _drop_logged_after

    p = tmp_path / "metrics.jsonl"
    whole = "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4))
    p.write_text(whole + '{"step": 5, "loss": 0.9')
    _drop_logged_after(str(p), 3)  # resumed from the checkpoint of step 3
    with jpeft.MetricLog(str(p)) as log:
        log({"step": 4, "loss": 2.0})
    got = [json.loads(x) for x in p.read_text().splitlines()]
    assert got[-2:] == [{"step": 3, "loss": 1.0}, {"step": 4, "loss": 2.0}]
    # a record that is whole but lost its line end is kept, and the library path alone keeps lines apart
    for cut, want in (('{"step": 2, "loss": 0.9}', [1, 2, 3]), ('{"step": 2, "lo', [1, None, 3])):
        p.write_text(json.dumps({"step": 1}) + "\n" + cut)
        with jpeft.MetricLog(str(p)) as log:
            log({"step": 3})
        lines = p.read_text().splitlines()
        got = []
        for x in lines:
            try:
                got.append(json.loads(x)["step"])
            except ValueError:
                got.append(None)
        assert got == want, lines


def test_a_tensorboard_writer_that_fails_is_said_not_silently_dropped(tmp_path, monkeypatch):
    """MetricLog(tensorboard=...) turned TensorBoard off without a word when the writer could not be
    made (an unwritable folder, a broken install: every exception was swallowed); it warns now, and
    the JSONL log still gets the records. An absent tensorboard stays silent (it is optional)."""
    import sys
    import types
    import warnings

    class Failing:
        def __init__(self, logdir):
            raise PermissionError(f"cannot write {logdir}")

    import importlib.machinery

    tb = types.ModuleType("tensorboard")  # an installed tensorboard, as the writer's import looks for it first
    tb.__spec__ = importlib.machinery.ModuleSpec("tensorboard", None)
    monkeypatch.setitem(sys.modules, "tensorboard", tb)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Failing))
    with pytest.warns(UserWarning, match=r"TensorBoard logging is off.*PermissionError: cannot write"):
        log = jpeft.MetricLog(str(tmp_path / "m.jsonl"), tensorboard=str(tmp_path / "tb"))
    with log:
        log({"step": 1, "loss": 2.5})
    assert json.loads((tmp_path / "m.jsonl").read_text())["loss"] == 2.5
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails: ImportError
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jpeft.MetricLog(str(tmp_path / "n.jsonl"), tensorboard=str(tmp_path / "tb2")).close()


def _token_loss_fn():
    """``jpeft train``'s loss on the tiny model: the mean over the ``loss_mask`` targets, its count as ``targets``."""
    m = C.model()

    def loss(params, adapter, batch, key):
        logits = jpeft.apply(m, params, adapter, batch["input_ids"])
        loss, n = jpeft.data.causal_lm_loss(logits, batch["input_ids"], batch["loss_mask"])
        return loss, {"targets": n}

    return loss


def _masked_batch(i: int, masked=()):
    """Batch ``i`` with a loss mask: the rows in ``masked`` hold no target (a completion cut off)."""
    ids = C.batch(i)["input_ids"]
    mask = np.ones(ids.shape, np.int32)
    mask[list(masked)] = 0
    return {"input_ids": ids, "loss_mask": mask}


def _random_adapter(params):
    adapter = jpeft.init(C.lora_config(dropout=0.0), params, jax.random.key(1))
    leaves, tree = jax.tree.flatten(adapter)  # B random too: a zero B hides what weight decay does to A
    return jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(jax.random.key(i), x.shape) for i, x in enumerate(leaves)])


def test_a_step_without_targets_changes_nothing_and_an_empty_micro_batch_does_not_dilute(run):
    """A batch whose every label is masked (a prompt/completion row whose completion the length cut
    off, rows of prompts only) gave loss 0 and a zero gradient, and AdamW still moved the adapter by
    its momentum and weight decay and advanced its schedule (transformers' Trainer gets NaN there):
    the adapter after [b0, empty, b1] differed from the one after [b0, b1] by 0.097. With
    loss_weight (what `jpeft train` passes) such a step now changes nothing, reports
    no_targets = 1 (not skipped: nothing diverged), is listed and warned of by fit; and with
    accumulation an empty micro-batch weighs nothing, so the update is the other micro-batch's."""
    from jpeft.cli._trainer import applied_lr, make_optimizer

    params, _, _, _, _, key, _ = run
    adapter = _random_adapter(params)
    opt, sched = make_optimizer({"learning_rate": 0.05, "warmup_steps": 1, "weight_decay": 0.3, "max_grad_norm": 1.0}, 6)
    state = opt.init(adapter)
    step = jpeft.make_train_step(_token_loss_fn(), opt, donate=False, loss_weight="targets")
    want = jpeft.fit(step, params, adapter, state, [_masked_batch(0), _masked_batch(1)], key=key)
    assert want.no_target_steps == []
    recs = []
    with pytest.warns(RuntimeWarning, match=r"1 of 3 steps \(step 2\) had a batch without a single target token"):
        got = jpeft.fit(step, params, adapter, state, [_masked_batch(0), _masked_batch(9, range(C.BATCH)),
                                                       _masked_batch(1)], key=key, log=recs.append, lr_fn=applied_lr(sched))
    assert got.no_target_steps == [2] and got.skipped == 0
    assert [h.get("no_targets") for h in got.history] == [0, 1, 0] and got.history[1]["skipped"] == 0
    # no update: the schedule did not move, so step 3 applies the rate step 2 would have (what a skipped step logs)
    assert recs[1]["no_targets"] == 1 and recs[2]["lr"] == recs[1]["lr"] == float(sched(1)) > recs[0]["lr"]
    assert _equal(got.adapter, want.adapter) and _equal(got.opt_state, want.opt_state)

    # accumulation: micro-batch 1 (rows 1 and 3) has no target; the update is micro-batch 0's (rows 0 and 2) alone
    acc = jpeft.make_train_step(_token_loss_fn(), opt, donate=False, accumulate_steps=2, loss_weight="targets")
    a, _, m = acc(params, adapter, state, _masked_batch(0, (1, 3)), key)
    half = {k: v[::2] for k, v in _masked_batch(0).items()}
    b, _, n = step(params, adapter, state, half, key)
    assert int(m["no_targets"]) == 0 and float(m["targets"]) == float(n["targets"])
    np.testing.assert_allclose(float(m["loss"]), float(n["loss"]), rtol=1e-6)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)


def test_an_empty_micro_batch_or_device_whose_own_mean_is_nan_weighs_nothing(run):
    """A loss written as users write a per-token mean, ``sum / count``, is NaN (0 / 0) on a
    micro-batch whose every label is masked; with ``loss_weight`` that part was scaled by its
    count 0, and NaN * 0 made the whole update's loss and gradients NaN: the step was skipped
    and the other micro-batch's 14 target tokens were lost (loss nan, skipped 1). A part of
    count 0 now adds zeros, over micro-batches and over devices (``weighted_sum``, the pmap
    rule), so the update is the other part's alone, as for ``jpeft.lm_loss``'s guarded mean."""
    from jpeft.train import weighted_sum

    params, _, _, _, _, key, _ = run
    adapter = _random_adapter(params)
    m = C.model()

    def sum_over_count(params, adapter, batch, key):
        logits = jpeft.apply(m, params, adapter, batch["input_ids"]).astype(jnp.float32)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), batch["input_ids"][:, 1:, None], -1)[..., 0]
        w = batch["loss_mask"][:, 1:].astype(jnp.float32)
        return (nll * w).sum() / w.sum(), {"targets": w.sum()}

    opt = optax.adamw(1e-2, weight_decay=0.1)
    state = opt.init(adapter)
    acc = jpeft.make_train_step(sum_over_count, opt, donate=False, accumulate_steps=2, loss_weight="targets")
    one = jpeft.make_train_step(sum_over_count, opt, donate=False, loss_weight="targets")
    a, _, got = acc(params, adapter, state, _masked_batch(0, (1, 3)), key)  # micro-batch 1: rows 1 and 3, no target
    b, _, want = one(params, adapter, state, {k: v[::2] for k, v in _masked_batch(0).items()}, key)
    assert int(got["skipped"]) == 0 and float(got["targets"]) == float(want["targets"]) > 0
    np.testing.assert_allclose([float(got["loss"]), float(got["grad_norm"])],
                               [float(want["loss"]), float(want["grad_norm"])], rtol=1e-6)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)
    # one batch with no target at all: no update and no term (not a skipped NaN step, whose run of
    # max_consecutive_skips would stop training on data that is merely empty here)
    c, _, empty = one(params, adapter, state, _masked_batch(0, range(C.BATCH)), key)
    assert (int(empty["skipped"]), int(empty["no_targets"]), float(empty["loss"])) == (0, 1, 0.0)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(c), jax.tree.leaves(adapter)))

    # over devices: two parts, the second with no term and a NaN mean, joined with a psum (vmap's axis)
    g = {"w": jnp.array([[1.0, -2.0], [jnp.nan, jnp.nan]])}
    parts = (jnp.array([3.0, jnp.nan]), {"targets": jnp.array([5.0, 0.0])}, g)
    loss, aux, grads = jax.vmap(lambda p: weighted_sum(p, "targets", lambda x: jax.lax.psum(x, "d")),
                                axis_name="d")(parts)
    assert loss.tolist() == [3.0, 3.0] and aux["targets"].tolist() == [5.0, 5.0]
    assert grads["w"].tolist() == [[1.0, -2.0], [1.0, -2.0]]


def test_fit_over_a_pmap_step_logs_its_loss_and_counts_its_skipped_and_empty_steps(run):
    """``jpeft.fit`` takes a ``make_pmap_train_step`` step (its docstring says so), whose metrics
    lead with the device axis; fit read only 0-d metrics, so every one was dropped: history and
    log held no loss (``loss: None``), a NaN step was not counted by the non-finite guard (five
    in a row ran on with ``max_consecutive_skips=2``, ``skipped`` 0) and a step without targets
    was not listed. fit now reads the first device's copy, as jpeft.unreplicate does (here the
    process's first device: each device holds the same reduced numbers)."""
    params, _, _, _, _, key, _ = run
    adapter = _random_adapter(params)
    opt = optax.adamw(1e-2, weight_decay=0.1)
    devices = jax.local_devices()[:1]
    pstep = jpeft.make_pmap_train_step(_token_loss_fn(), opt, devices=devices, donate=False, loss_weight="targets")
    step = jpeft.make_train_step(_token_loss_fn(), opt, donate=False, loss_weight="targets")
    data = [_masked_batch(0, (1,)), _masked_batch(9, range(C.BATCH)), _masked_batch(1, (0, 2))]
    split = lambda b: jpeft.split_for_pmap(b, len(devices))  # noqa: E731
    rep = lambda t: jpeft.replicate(t, devices)  # noqa: E731
    logged = []
    with pytest.warns(RuntimeWarning, match=r"1 of 3 steps \(step 2\)"):
        want = jpeft.fit(step, params, adapter, opt.init(adapter), data, key=key)
    with pytest.warns(RuntimeWarning, match=r"1 of 3 steps \(step 2\)"):
        got = jpeft.fit(pstep, rep(params), rep(adapter), rep(opt.init(adapter)), map(split, data), key=key,
                        log=logged.append)
    assert [h["loss"] for h in got.history] == pytest.approx([h["loss"] for h in want.history], rel=1e-6)
    assert [r["loss"] for r in logged] == [h["loss"] for h in got.history] and logged[0]["loss"] > 1.0
    assert [h["targets"] for h in got.history] == [h["targets"] for h in want.history] == [21.0, 0.0, 14.0]
    assert got.no_target_steps == [2] and got.skipped == 0
    nan = jax.tree.map(lambda x: x * jnp.nan, adapter)  # every loss NaN: every update skipped
    with pytest.raises(NonFiniteError, match="3 consecutive steps"):
        jpeft.fit(pstep, rep(params), rep(nan), rep(opt.init(nan)), map(split, [data[0]] * 5), key=key,
                  max_consecutive_skips=2)


def test_metric_log_of_a_skipped_step_is_strict_json(tmp_path):
    """A step the non-finite guard skipped logs its NaN loss (a diverging run, an infinite
    gradient norm): metrics.jsonl held the bare NaN / Infinity of Python's json, which jq,
    JavaScript and Go refuse; they are the strings "NaN" / "Infinity" (``float()`` reads them)."""
    def refuse(token):
        raise ValueError(f"not strict JSON: {token}")

    p = tmp_path / "m.jsonl"
    with jpeft.MetricLog(str(p)) as log:
        log({"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "skipped": 1})
        log({"step": 2, "loss": 2.5, "grad_norm": -float("inf")})
    got = [json.loads(x, parse_constant=refuse) for x in p.read_text().splitlines()]
    assert got == [{"step": 1, "loss": "NaN", "grad_norm": "Infinity", "skipped": 1},
                   {"step": 2, "loss": 2.5, "grad_norm": "-Infinity"}]
    assert np.isnan(float(got[0]["loss"]))
