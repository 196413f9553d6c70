"""Hardening (issue 11): the non-finite guard, host-boundary validation, no pickle in load
paths, writes that stay where they are told, atomic saves under simulated disk-full and
permission errors."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import signal
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
from jpeft import validate
from jpeft.errors import (
    CheckpointError,
    InputValidationError,
    LoadError,
    NonFiniteError,
    OverwriteError,
    PathEscapeError,
    SaveError,
    UnsafeFileError,
)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "helpers"))
sys.path.insert(0, os.path.dirname(__file__))
import ckpt_common as C  # noqa: E402
from _models_tiny import randomize_adapter  # noqa: E402


def _leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


@pytest.fixture(scope="module")
def run():
    """A run without dropout (so dropping a batch does not shift any random draw) whose loss
    weights each example by ``batch["w"]``: a NaN there poisons the loss and the gradients."""
    params = C.params()
    cfg = C.lora_config(dropout=0.0)
    adapter = jpeft.init(cfg, params, jax.random.key(1))
    opt = optax.adam(3e-2)
    model = C.model()

    def loss_fn(params, adapter, batch, key):
        logits = jpeft.apply(model, params, adapter, batch["input_ids"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean(axis=-1)
        return jnp.mean(ce * batch["w"])

    step = jpeft.make_train_step(loss_fn, opt, donate=False)
    return params, cfg, adapter, opt, step, loss_fn


def _batch(i, nan=False):
    b = C.batch(i)
    b["w"] = np.full((C.BATCH,), np.nan if nan else 1.0, np.float32)
    return b


# ------------------------------------------------------------------------------------------------
# non-finite guard
# ------------------------------------------------------------------------------------------------
def test_nan_batch_is_skipped_and_training_matches_the_run_without_it(run):
    params, cfg, adapter, opt, step, loss_fn = run
    key = jax.random.key(0)
    with_nan = [_batch(i, nan=(i == 4)) for i in range(10)]
    without = [b for i, b in enumerate(with_nan) if i != 4]
    a = jpeft.fit(step, params, adapter, opt.init(adapter), with_nan, key=key)
    b = jpeft.fit(step, params, adapter, opt.init(adapter), without, key=key)
    assert a.skipped == 1 and [h["skipped"] for h in a.history] == [0, 0, 0, 0, 1, 0, 0, 0, 0, 0]
    assert not np.isfinite(a.history[4]["loss"])
    assert [h["loss"] for i, h in enumerate(a.history) if i != 4] == [h["loss"] for h in b.history]  # bitwise
    assert _leaves_equal(a.adapter, b.adapter) and _leaves_equal(a.opt_state, b.opt_state)
    seen = _batch(0)  # training went on after the skipped step: the loss on seen data fell
    la = loss_fn(params, a.adapter, seen, None)
    assert float(la) == float(loss_fn(params, b.adapter, seen, None)) < float(loss_fn(params, adapter, seen, None))


def test_consecutive_nan_batches_stop_training_and_keep_the_last_good_checkpoint(run, tmp_path):
    params, cfg, adapter, opt, step, loss_fn = run
    key = jax.random.key(0)
    data = [_batch(i, nan=(i >= 4)) for i in range(12)]
    with jpeft.checkpoint.CheckpointManager(tmp_path / "ck", cfg, params, optimizer=opt, save_every=2, keep_last=2,
                                            async_save=True) as mngr:
        with pytest.raises(NonFiniteError, match=r"^step 8: the loss, gradients or update were not finite for 4 consecutive steps "
                                                 r"\(steps 5 to 8; limit 3\).*The last step with a finite update was 4"):
            jpeft.fit(step, params, adapter, opt.init(adapter), data, key=key, checkpoint=mngr, max_consecutive_skips=3)
        assert mngr.all_steps() == [2, 4]  # nothing written during the skips, nothing rotated out
        state = mngr.restore_latest()
    good = jpeft.fit(step, params, adapter, opt.init(adapter), data[:4], key=key)
    assert state.step == 4 and state.data_position == 4
    assert _leaves_equal(state.adapter, good.adapter) and _leaves_equal(state.opt_state, good.opt_state)


@pytest.mark.parametrize("how", ["num_steps", "ctrl_c"])
def test_a_stop_on_a_skipped_step_saves_the_last_finite_state_and_resume_is_exact(run, tmp_path, how):
    """A stop (``num_steps`` before ``total_steps``, as `jpeft train --max-steps` runs it, or Ctrl-C) that
    landed on a skipped step raised NonFiniteError as if the run had ended diverged (the CLI exited 2 with
    no checkpoint there). It now saves the step: the last finite step's state, ranked by that step's loss
    (not the skipped step's NaN), and the resumed run equals the uninterrupted one bit for bit."""
    params, cfg, adapter, opt, step, loss_fn = run
    key = jax.random.key(0)
    data = [_batch(i, nan=i in (3, 4)) for i in range(8)]  # steps 4 and 5 are skipped
    straight = jpeft.fit(step, params, adapter, opt.init(adapter), data, key=key)
    stop = {"num_steps": 5, "total_steps": 8} if how == "num_steps" else {
        "handle_interrupt": True, "on_step": lambda s, m: s == 5 and os.kill(os.getpid(), signal.SIGINT)}
    with jpeft.checkpoint.CheckpointManager(tmp_path / "ck", cfg, params, optimizer=opt, save_every=100, keep_best=1,
                                            best_metric="loss", async_save=False) as mngr:
        with pytest.warns(RuntimeWarning, match=r"stopped at step 5 with 2 non-finite step\(s\) pending \(steps 4 to "
                                                r"5\).*those of the last finite step \(3\)"):
            first = jpeft.fit(step, params, adapter, opt.init(adapter), data, key=key, checkpoint=mngr, save_last=True,
                              **stop)
        assert first.step == 5 and first.interrupted == (how == "ctrl_c") and mngr.all_steps() == [5]
        assert mngr.metrics(5) == {"loss": straight.history[2]["loss"], "skips_pending": 2, "first_skipped_step": 4,
                                   "last_finite_step": 3} and mngr.best_step() == 5
        st = mngr.restore_latest()
        assert _leaves_equal(st.adapter, first.adapter) and st.data_position == 5
        rest = jpeft.fit(step, params, st.adapter, st.opt_state, data[5:], key=st.key, start_step=5, data_position=5,
                         checkpoint=mngr, save_last=True)
    # bitwise, the skipped steps' NaN losses included
    np.testing.assert_array_equal([h["loss"] for h in first.history + rest.history], [h["loss"] for h in straight.history])
    assert _leaves_equal(rest.adapter, straight.adapter) and _leaves_equal(rest.opt_state, straight.opt_state)


def test_a_run_resumed_after_a_stop_on_skipped_steps_counts_them_on(run, tmp_path):
    """The guard's count of consecutive skipped steps goes on across the stop: the resumed run raises at
    the step, and with the message, of the uninterrupted run (a fresh count would have let it train on).
    A run that ends (its num_steps is its whole length) on a skipped step still raises."""
    params, cfg, adapter, opt, step, loss_fn = run
    key = jax.random.key(0)
    data = [_batch(i, nan=i in (3, 4, 5)) for i in range(8)]  # steps 4, 5 and 6 are skipped
    with pytest.raises(NonFiniteError) as straight:
        jpeft.fit(step, params, adapter, opt.init(adapter), data, key=key, max_consecutive_skips=2)
    assert str(straight.value).startswith("step 6: the loss, gradients or update were not finite for 3 consecutive "
                                          "steps (steps 4 to 6; limit 2), so training stopped. The last step with a "
                                          "finite update was 3.")
    with pytest.raises(NonFiniteError, match=r"^step 5: the run ended with 2 consecutive non-finite step\(s\) \(steps 4"):
        jpeft.fit(step, params, adapter, opt.init(adapter), data, key=key, num_steps=5, max_consecutive_skips=2)
    with jpeft.checkpoint.CheckpointManager(tmp_path / "ck", cfg, params, optimizer=opt, save_every=100,
                                            async_save=False) as mngr:
        with pytest.warns(RuntimeWarning, match="2 non-finite step"):
            jpeft.fit(step, params, adapter, opt.init(adapter), data, key=key, num_steps=5, total_steps=8,
                      checkpoint=mngr, save_last=True, max_consecutive_skips=2)
        st = mngr.restore_latest()
        with pytest.raises(NonFiniteError) as resumed:
            jpeft.fit(step, params, st.adapter, st.opt_state, data[5:], key=st.key, start_step=5, data_position=5,
                      checkpoint=mngr, save_last=True, max_consecutive_skips=2)
        assert mngr.all_steps() == [5]
    assert str(resumed.value) == str(straight.value)


def test_a_stop_on_skipped_steps_before_any_finite_step_keeps_them_pending_and_unranked(run, tmp_path):
    """A stop when every step since step 0 was skipped, with a manager that keeps the best by the loss: no
    finite loss is known, so the stop checkpoint was saved with no metrics at all, and the run resumed from it
    counted afresh (it trained on past the step where the uninterrupted run raises). Its metrics now hold the
    skips pending, unranked (no NaN or stand-in loss), and the resumed run raises as the uninterrupted one."""
    params, cfg, adapter, opt, step, loss_fn = run
    key = jax.random.key(0)
    data = [_batch(i, nan=i < 3) for i in range(6)]  # steps 1, 2 and 3 are skipped
    with pytest.raises(NonFiniteError) as straight:
        jpeft.fit(step, params, adapter, opt.init(adapter), data, key=key, max_consecutive_skips=2)
    assert str(straight.value).startswith("step 3: the loss, gradients or update were not finite for 3 consecutive "
                                          "steps (steps 1 to 3; limit 2), so training stopped. The last step with a "
                                          "finite update was none.")
    with jpeft.checkpoint.CheckpointManager(tmp_path / "ck", cfg, params, optimizer=opt, save_every=100, keep_best=1,
                                            best_metric="loss", async_save=False) as mngr:
        with pytest.warns(RuntimeWarning, match=r"stopped at step 2 with 2 non-finite step\(s\) pending"):
            jpeft.fit(step, params, adapter, opt.init(adapter), data, key=key, num_steps=2, total_steps=6,
                      checkpoint=mngr, save_last=True, max_consecutive_skips=2)
        assert mngr.all_steps() == [2] and mngr.metrics(2) == {"skips_pending": 2, "first_skipped_step": 1}
        assert mngr.best_step() is None  # nothing to rank it by
        st = mngr.restore_latest()
        assert _leaves_equal(st.adapter, adapter)  # the skipped steps changed nothing
        with pytest.raises(NonFiniteError) as resumed:
            jpeft.fit(step, params, st.adapter, st.opt_state, data[2:], key=st.key, start_step=2, data_position=2,
                      checkpoint=mngr, save_last=True, max_consecutive_skips=2)
        assert mngr.all_steps() == [2]
        with pytest.raises(jpeft.errors.ConfigError, match=r"ranked=False\) is for a state without a value of "
                                                           r"best_metric='loss', but its metrics hold one"):
            mngr.save(7, st.adapter, st.opt_state, st.key, metrics={"loss": 1.0}, force=True, ranked=False)
    assert str(resumed.value) == str(straight.value)


def test_a_checkpoint_object_whose_save_lacks_a_keyword_the_run_calls_is_refused_before_the_first_step(run, tmp_path):
    """A checkpoint object of one's own (fit's protocol: save(step, adapter, opt_state, key, *, data_position,
    metrics), force= with save_last, extra= with a forgetting guard, ranked= with save_last and a keep_best) written
    before save took ``ranked`` trained on and failed with a bare TypeError at the stop on skipped steps, where fit
    saves unranked (steps trained, nothing saved). It is now refused before the first step, naming what it lacks;
    the same object trains and saves where the run never passes ranked (no keep_best), and so does one taking
    **kwargs."""
    params, cfg, adapter, opt, step, loss_fn = run
    key = jax.random.key(0)
    data = [_batch(i, nan=i < 3) for i in range(6)]  # steps 1, 2 and 3 are skipped

    class Mine:
        def __init__(self, mngr, keep_best):
            self.m, self.keep_best = mngr, keep_best

        def save(self, step, adapter, opt_state=None, key=None, *, data_position=None, metrics=None, force=False):
            return self.m.save(step, adapter, opt_state, key, data_position=data_position, metrics=metrics, force=force)

        def all_steps(self):
            return self.m.all_steps()

        def metrics(self, step):
            return self.m.metrics(step)

        def wait(self):
            self.m.wait()

    class Open(Mine):
        def save(self, step, adapter, opt_state=None, key=None, **kw):
            return self.m.save(step, adapter, opt_state, key, **kw)

    ran = []
    with jpeft.checkpoint.CheckpointManager(tmp_path / "ck", cfg, params, optimizer=opt, save_every=100,
                                            async_save=False) as mngr:
        with pytest.raises(jpeft.errors.ConfigError, match=r"checkpoint object \(Mine\) lacks \['save\(\.\.\., "
                                                           r"ranked=\)'\], which this run calls.*ranked=False"):
            jpeft.fit(step, params, adapter, opt.init(adapter), data, key=key, num_steps=2, total_steps=6,
                      checkpoint=Mine(mngr, keep_best=1), save_last=True, on_step=lambda s, m: ran.append(s))
        assert ran == [] and mngr.all_steps() == []  # refused before the first step
        with pytest.raises(jpeft.errors.ConfigError, match=r"\(NoWait\) lacks \['wait'\]"):
            jpeft.fit(step, params, adapter, opt.init(adapter), data, key=key,
                      checkpoint=type("NoWait", (Mine,), {"wait": None})(mngr, 0))
    # the same object where the run passes no ranked (no keep_best), and one taking **kwargs with a keep_best: they
    # train and save the stop with its pending skips (under keep_best, unranked)
    for kind, best in ((Mine, 0), (Open, 1)):
        with jpeft.checkpoint.CheckpointManager(tmp_path / kind.__name__, cfg, params, optimizer=opt, save_every=100,
                                                keep_best=best, best_metric="loss", async_save=False) as mngr:
            with pytest.warns(RuntimeWarning, match=r"stopped at step 2 with 2 non-finite step\(s\) pending"):
                jpeft.fit(step, params, adapter, opt.init(adapter), data, key=key, num_steps=2, total_steps=6,
                          checkpoint=kind(mngr, best), save_last=True, max_consecutive_skips=2)
            assert mngr.all_steps() == [2] and mngr.metrics(2) == {"skips_pending": 2, "first_skipped_step": 1}


def test_guard_resets_after_a_finite_step():
    g = jpeft.NonFiniteGuard(max_consecutive=1)
    assert [g.update(s, {"skipped": k}) for s, k in [(1, 1), (2, 0), (3, 1), (4, 0)]] == [True, False, True, False]
    assert g.total_skipped == 2 and g.last_good_step == 4
    with pytest.raises(NonFiniteError, match="step 6"):
        g.update(5, {"skipped": 1})
        g.update(6, {"skipped": 1})
    # a step function without the guard's metric: judged by its loss
    g2 = jpeft.NonFiniteGuard(max_consecutive=0)
    assert g2.update(1, {"loss": 1.0}) is False
    with pytest.raises(NonFiniteError, match="step 2"):
        g2.update(2, {"loss": float("inf")})


# ------------------------------------------------------------------------------------------------
# validation at the host boundary
# ------------------------------------------------------------------------------------------------
def _counting(step):
    calls = []

    def wrapped(*a):
        calls.append(1)
        return step(*a)

    return wrapped, calls


def test_out_of_range_token_ids_raise_before_any_compute(run):
    params, cfg, adapter, opt, step, _ = run
    bad = _batch(1)
    bad["input_ids"] = bad["input_ids"].copy()
    bad["input_ids"][2, 5] = C.VOCAB  # one past the end: JAX's gather would clamp it silently
    counted, calls = _counting(step)
    with pytest.raises(InputValidationError, match=r"batch 1\['input_ids'\] holds token id 50 at position \(2, 5\), "
                                                   r"outside the vocabulary \[0, 50\)"):
        jpeft.fit(counted, params, adapter, opt.init(adapter), [_batch(0), bad], key=jax.random.key(0), vocab_size=C.VOCAB)
    assert len(calls) == 1  # batch 0 ran; the bad batch never reached the jitted step
    neg = _batch(0)
    neg["input_ids"] = neg["input_ids"].copy()
    neg["input_ids"][0, 0] = -3
    counted, calls = _counting(step)
    with pytest.raises(InputValidationError, match=r"token id -3 at position \(0, 0\)"):
        jpeft.fit(counted, params, adapter, opt.init(adapter), [neg], key=jax.random.key(0), vocab_size=C.VOCAB)
    assert calls == []


def test_too_long_sequences_empty_data_and_shape_changes(run):
    params, cfg, adapter, opt, step, _ = run
    counted, calls = _counting(step)
    with pytest.raises(InputValidationError, match=r"sequences of length 8 .* longer than the model's 6 positions"):
        jpeft.fit(counted, params, adapter, opt.init(adapter), [_batch(0)], key=jax.random.key(0), max_positions=6)
    with pytest.raises(InputValidationError, match="batches is empty: expected at least one example, found 0"):
        jpeft.fit(counted, params, adapter, opt.init(adapter), [], key=jax.random.key(0))
    with pytest.raises(InputValidationError, match="batches yielded no batch"):
        jpeft.fit(counted, params, adapter, opt.init(adapter), iter(()), key=jax.random.key(0))
    short = _batch(1)
    short = {k: v[:2] for k, v in short.items()}
    with pytest.raises(InputValidationError, match=r"batch 1\['input_ids'\] has shape \(2, 8\), expected \(4, 8\)"):
        jpeft.fit(counted, params, adapter, opt.init(adapter), [_batch(0), short], key=jax.random.key(0))
    assert calls == [1]  # only batch 0 of the last call ran


def test_validate_helpers_messages():
    with pytest.raises(InputValidationError, match=r"batch\['x'\] has dtype float32, expected integer"):
        validate.check_batch({"x": np.zeros((2, 3), np.float32)}, {"x": ((None, 3), "integer")})
    with pytest.raises(InputValidationError, match=r"batch lacks key 'y'"):
        validate.check_batch({"x": np.zeros((2, 3))}, {"y": (None, None)})
    with pytest.raises(InputValidationError, match="must hold integer token ids, found dtype float32"):
        validate.check_token_ids(np.zeros((2, 2), np.float32), 10)
    with pytest.raises(InputValidationError, match=r"holds a non-finite value nan at \(1,\)"):
        validate.check_finite({"w": np.array([1.0, np.nan])}, name="batch")
    validate.check_tokens({"input_ids": jnp.arange(8).reshape(2, 4)}, vocab_size=8, max_positions=4)
    spec = validate.batch_spec(_batch(0), free_leading=True)
    validate.check_batch(_batch(3), spec)


# ------------------------------------------------------------------------------------------------
# no pickle in load paths
# ------------------------------------------------------------------------------------------------
class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling would create the marker file


def test_pickle_files_are_refused_without_being_executed(tmp_path):
    marker = tmp_path / "PWNED"
    payload = pickle.dumps(_Evil(str(marker)), protocol=4)
    # a pickle offered as an adapter file, under several names
    for name in ("adapter.pkl", "adapter_model.bin", "weights.safetensors", "jpeft_adapter.safetensors"):
        d = tmp_path / name.replace(".", "_")
        d.mkdir()
        (d / name).write_bytes(payload)
        target = d / name if name != "jpeft_adapter.safetensors" else d / name
        with pytest.raises(UnsafeFileError, match=r"it is a Python pickle \(protocol 4\), and loading it could execute"):
            if name.endswith(".safetensors") and name != "jpeft_adapter.safetensors":
                jpeft.io.read_safetensors(target)
            else:
                jpeft.load_adapter(target if name.endswith(".pkl") else d, params={})
    # a torch.save zip archive, and a directory holding one
    import torch

    tdir = tmp_path / "torch_adapter"
    tdir.mkdir()
    torch.save({"w": torch.zeros(2)}, tdir / "adapter_model.bin")
    with pytest.raises(UnsafeFileError, match="zip archive"):
        jpeft.load_adapter(tdir, params={})
    np.save(tmp_path / "a.npy", np.zeros(3))
    with pytest.raises(UnsafeFileError, match=r"\.npy file"):
        jpeft.load_adapter(tmp_path / "a.npy", params={})
    assert not marker.exists()


def test_hf_peft_folder_is_pointed_to_load_peft(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(LoadError, match="Hugging Face PEFT adapter .* load it with jpeft.hf.load_peft"):
        jpeft.load_adapter(tmp_path, params={})


# ------------------------------------------------------------------------------------------------
# writes stay where they are told; no silent overwrite
# ------------------------------------------------------------------------------------------------
def test_paths_cannot_escape_the_root(tmp_path, run):
    params, cfg, adapter, opt, *_ = run
    root = tmp_path / "adapters"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    for bad, msg in [("../evil", "'..' components are not allowed"), ("a/../../evil", "'..' components"),
                     (str(outside / "x"), "is absolute"), ("", "empty name")]:
        with pytest.raises(PathEscapeError, match=msg):
            jpeft.save_adapter(bad, cfg, adapter, root=root)
    os.symlink(outside, root / "link")
    with pytest.raises(PathEscapeError, match="is a symlink"):
        jpeft.save_adapter("link/task", cfg, adapter, root=root)
    with pytest.raises(PathEscapeError, match="does not save through symlinks"):
        jpeft.save_adapter(root / "link", cfg, adapter)
    with pytest.raises(PathEscapeError, match="'..' components"):
        jpeft.checkpoint.CheckpointManager("../ck", cfg, params, root=root)
    assert sorted(os.listdir(outside)) == [] and sorted(os.listdir(root)) == ["link"]
    ok = jpeft.save_adapter("task_a", cfg, adapter, root=root)
    assert ok == root / "task_a" and ok.is_dir()


def test_existing_adapter_is_not_overwritten_unless_asked(tmp_path, run):
    params, cfg, adapter, *_ = run
    d = jpeft.save_adapter(tmp_path / "a", cfg, adapter, params=params)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    newer = jax.tree.map(lambda x: x + 1.0, adapter)
    with pytest.raises(OverwriteError, match="already exists.*Pass overwrite=True"):
        jpeft.save_adapter(d, cfg, newer, params=params)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    jpeft.save_adapter(d, cfg, newer, params=params, overwrite=True)
    assert _leaves_equal(jpeft.load_adapter(d, params)[1], newer)
    assert sorted(os.listdir(tmp_path)) == ["a"]  # no temporary or backup directory left


# ------------------------------------------------------------------------------------------------
# atomic saves under simulated failures
# ------------------------------------------------------------------------------------------------
def test_disk_full_and_permission_denied_leave_previous_adapter_intact(tmp_path, run, monkeypatch):
    params, cfg, adapter, *_ = run
    d = jpeft.save_adapter(tmp_path / "a", cfg, adapter, params=params)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    newer = jax.tree.map(lambda x: x + 1.0, adapter)
    real_write = os.write
    written = []

    def full_disk(fd, data):
        if sum(written) > 300:  # the first few hundred bytes go through, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        n = real_write(fd, bytes(data)[:200])
        written.append(n)
        return n

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(SaveError, match=r"saving to .*/a failed: \[Errno 28\] No space left on device. The previous contents"):
        jpeft.save_adapter(d, cfg, newer, params=params, overwrite=True)
    with pytest.raises(SaveError, match="No space left"):
        jpeft.save_adapter(tmp_path / "fresh", cfg, newer, params=params)
    monkeypatch.setattr(os, "write", real_write)
    assert written  # the failure really happened part-way through a file
    real_rename = os.rename

    def denied(src, dst):
        raise PermissionError(errno.EACCES, "Permission denied", str(dst))

    monkeypatch.setattr(os, "rename", denied)
    monkeypatch.setattr(jpeft._files, "_exchange", lambda a, b: denied(a, b))  # the atomic swap (renameat2) too
    with pytest.raises(SaveError, match="Permission denied"):
        jpeft.save_adapter(d, cfg, newer, params=params, overwrite=True)
    monkeypatch.setattr(os, "rename", real_rename)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["a"]  # temporary directories cleaned up, "fresh" never appeared
    assert _leaves_equal(jpeft.load_adapter(d, params)[1], adapter)


def test_save_adapter_holds_one_array_at_a_time_and_writes_the_bytes_safetensors_writes(tmp_path):
    """``save_adapter`` held every array on the host and then the whole file once more as bytes
    (``safetensors.numpy.save``): for a full fine-tuning, the model three times over. It now
    reads, hashes and writes one array at a time (``gather=``: the read, a collective on several
    processes), and the file is byte for byte the one ``safetensors.numpy.save`` makes of the
    same arrays (bf16 beside f32; every array random), with the same index and checksums."""
    import safetensors.numpy
    import weakref

    params = C.params()
    mixed = jax.tree_util.tree_map_with_path(  # half the leaves in bf16: safetensors orders by dtype, then name
        lambda p, x: x.astype(jnp.bfloat16) if len(jax.tree_util.keystr(p)) % 2 else x, params)
    for cfg, base in ((jpeft.FullFinetuneConfig(), mixed), (C.lora_config(dropout=0.0), params)):
        adapter = randomize_adapter(jpeft.init(cfg, base, jax.random.key(1)), seed=3)
        named = dict(jpeft.tree.leaf_names(dict(adapter)))
        alive, order = [], []

        def gather(x):  # the arrays read so far must all be gone (written, then dropped) before the next
            assert [r for r in alive if r() is not None] == [], "an earlier array is still held"
            a = np.array(x)
            alive.append(weakref.ref(a))
            order.append(next(n for n, leaf in named.items() if leaf is x))
            return a

        d = jpeft.save_adapter(tmp_path / cfg.peft_type, cfg, adapter, params=base, gather=gather)
        assert d == tmp_path / cfg.peft_type and sorted(order) == sorted(named) and len(order) == len(named)
        host = {n: np.asarray(x) for n, x in named.items()}
        assert {str(a.dtype) for a in host.values()} == ({"float32", "bfloat16"} if cfg.peft_type == "FULL_FINETUNE"
                                                          else {"float32"})
        assert (d / "jpeft_adapter.safetensors").read_bytes() == safetensors.numpy.save(host, metadata={"format": "jpeft"})
        index = json.loads((d / "jpeft_adapter.json").read_text())["arrays"]
        assert list(index) == list(named)  # the adapter's order, as before
        assert index == {n: {"shape": list(a.shape), "dtype": str(a.dtype), "sha256": jpeft.io.sha256_hex(a)}
                         for n, a in host.items()}
        back = jpeft.load_adapter(d, base)[1]
        assert _leaves_equal(back, adapter)
        # without gather (one process): the same file
        again = jpeft.save_adapter(tmp_path / f"{cfg.peft_type}_plain", cfg, adapter, params=base)
        assert {p.name: p.read_bytes() for p in again.iterdir()} == {p.name: p.read_bytes() for p in d.iterdir()}


def test_a_save_that_fails_part_way_still_reads_every_array_and_leaves_nothing(tmp_path, run, monkeypatch):
    """With ``gather=`` every process reads each array in turn (a collective the others wait
    in): a write that fails on the writing process, before its first array or part-way, still
    reads the rest before raising, and leaves the earlier adapter as it was."""
    params, cfg, adapter, *_ = run
    d = jpeft.save_adapter(tmp_path / "a", cfg, adapter, params=params)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    newer = jax.tree.map(lambda x: x + 1.0, adapter)

    def full_disk(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    for target, fail in ((d, "part_way"), (tmp_path / "a" / "jpeft_adapter.json" / "x", "before")):
        reads = []

        def gather(x):
            reads.append(1)
            if fail == "part_way" and len(reads) == 2:  # the header and the first array are written
                monkeypatch.setattr(os, "write", full_disk)
            return np.asarray(x)

        with pytest.raises(SaveError, match="No space left" if fail == "part_way" else "cannot create a directory next to"):
            jpeft.save_adapter(target, cfg, newer, params=params, overwrite=True, gather=gather)
        monkeypatch.undo()
        assert len(reads) == len(jax.tree.leaves(adapter)), fail
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before and sorted(os.listdir(tmp_path)) == ["a"]


@pytest.mark.parametrize("async_save", [False, True])
def test_disk_full_during_checkpoint_save_keeps_earlier_checkpoint(tmp_path, run, monkeypatch, async_save):
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as jh

    params, cfg, adapter, opt, *_ = run
    st = opt.init(adapter)
    ck = tmp_path / "ck"
    with jpeft.checkpoint.CheckpointManager(ck, cfg, params, optimizer=opt, async_save=async_save) as m:
        m.save(1, adapter, st, jax.random.key(0), data_position=1)
        m.wait()

        async def full_disk(self, x, directory):
            path = directory / self._filename
            path.write_text(json.dumps(x)[:40])  # a partial write, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(jh.JsonCheckpointHandler, "_save_fn", full_disk)
        with pytest.raises(SaveError, match="step 2 .* failed; earlier checkpoints are intact|asynchronous save .* failed"):
            m.save(2, jax.tree.map(lambda x: x + 1.0, adapter), st, jax.random.key(0), data_position=2)
            m.wait()
        monkeypatch.undo()
    with jpeft.checkpoint.CheckpointManager(ck, cfg, params, optimizer=opt) as m2:
        assert m2.all_steps() == [1]  # the failed step is not visible
        state = m2.restore_latest()
        assert state.step == 1 and _leaves_equal(state.adapter, adapter)
        m2.save(3, adapter, st, jax.random.key(0), data_position=3)  # and saving works again
        m2.wait()
        assert m2.all_steps() == [1, 3]


def test_checkpoint_error_for_missing_step(tmp_path, run):
    params, cfg, adapter, opt, *_ = run
    with jpeft.checkpoint.CheckpointManager(tmp_path / "ck", cfg, params, optimizer=opt) as m:
        m.save(1, adapter, opt.init(adapter))
        m.wait()
        with pytest.raises(CheckpointError, match=r"step 5 has no complete checkpoint .* available: \[1\]"):
            m.restore(5)


def test_no_load_path_in_jpeft_can_unpickle_or_run_remote_code():
    """A static scan of the package: no call of pickle/torch/joblib loaders, no np.load with
    allow_pickle=True, no trust_remote_code=True anywhere in jpeft/."""
    import ast

    pkg = Path(jpeft.__file__).parent
    bad = []
    for f in sorted(pkg.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if not isinstance(node, ast.Call):
                continue
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            owner = fn.value.id if isinstance(fn, ast.Attribute) and isinstance(fn.value, ast.Name) else ""
            if (owner, name) in {("pickle", "load"), ("pickle", "loads"), ("torch", "load"), ("joblib", "load"),
                                 ("dill", "load"), ("cloudpickle", "load"), ("pickle", "Unpickler")}:
                bad.append(f"{f.relative_to(pkg)}:{node.lineno} {owner}.{name}")
            for kw in node.keywords:
                if kw.arg in ("trust_remote_code", "allow_pickle") and isinstance(kw.value, ast.Constant) and kw.value.value is True:
                    bad.append(f"{f.relative_to(pkg)}:{node.lineno} {kw.arg}=True")
    assert bad == [], bad


def test_safetensors_header_length_that_looks_like_a_pickle_opcode_is_not_refused(tmp_path):
    """A safetensors header of 896 bytes starts with 0x80 0x03, the pickle protocol-3 opcode."""
    import pickle
    import struct

    from jpeft import io as jio

    header = b'{"__metadata__":{"pad":"' + b"x" * (896 - 27) + b'"}}'
    assert len(header) == 896
    f = tmp_path / "a.safetensors"
    f.write_bytes(struct.pack("<Q", len(header)) + header)
    assert f.read_bytes()[:2] == b"\x80\x03"
    assert jio.sniff_unsafe(f) is None
    arrays, meta = jio.read_safetensors(f)
    assert arrays == {}
    p = tmp_path / "evil.safetensors"
    p.write_bytes(pickle.dumps({"a": 1}, protocol=3))
    assert jio.sniff_unsafe(p) is not None


# ------------------------------------------------------------------------------------------------
# issue 16: hostile folders (FIFOs, devices, sparse files), regex denial of service
# ------------------------------------------------------------------------------------------------
def _within(seconds, fn):
    """``fn()``'s result or exception, failing the test if it takes longer than ``seconds`` (the
    call runs in a daemon thread, so a hang cannot hang the test run)."""
    import threading

    out = {}

    def call():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["error"] = e

    th = threading.Thread(target=call, daemon=True)
    th.start()
    th.join(seconds)
    assert not th.is_alive(), f"no answer within {seconds}s (a hang)"
    return out


def _saved(tmp_path, run, name="a"):
    params, cfg, adapter, *_ = run
    return params, jpeft.save_adapter(tmp_path / name, cfg, adapter, params=params)


@pytest.mark.parametrize("kind", ["fifo", "dev_zero"])
def test_fifo_or_dev_zero_in_place_of_a_file_is_refused_at_once(tmp_path, run, kind):
    from jpeft import fuzz

    params, d = _saved(tmp_path, run)
    for fname in ("jpeft_adapter.json", "jpeft_adapter.safetensors"):
        work = tmp_path / f"{kind}_{fname}"
        shutil.copytree(d, work)
        fuzz.apply_mutation(work / fname, fuzz.Mutation(kind, 0, 0.0, 0))
        out = _within(5, lambda: jpeft.load_adapter(work, params))
        assert isinstance(out.get("error"), LoadError), out
        assert "not a regular file" in str(out["error"])
    # the safetensors reader and the JSON reader refuse them directly too
    os.mkfifo(tmp_path / "pipe.safetensors")
    for fn in (lambda: jpeft.io.read_safetensors(tmp_path / "pipe.safetensors"),
               lambda: jpeft.io.read_json(tmp_path / "pipe.safetensors"),
               lambda: jpeft.io.read_json("/dev/zero")):
        out = _within(5, fn)
        assert isinstance(out.get("error"), LoadError) and "not a regular file" in str(out["error"]), out


def test_sparse_file_declaring_a_huge_tensor_is_refused_before_reading_it(tmp_path, run):
    """A 1 GiB tensor declared in a sparse file (a few kB on disk): the names and shapes are
    compared with the metadata before any data is read, so memory stays small."""
    import tracemalloc

    from jpeft import fuzz

    params, d = _saved(tmp_path, run)
    f = d / "jpeft_adapter.safetensors"
    fuzz.apply_mutation(f, fuzz.Mutation("sparse_tensor", 0, 0.0, 0))
    assert f.stat().st_size > fuzz.SPARSE_BYTES and f.stat().st_blocks * 512 < (1 << 20)  # really sparse
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match="in the file, expected"):
            jpeft.load_adapter(d, params)
        with pytest.raises(CheckpointError, match="only in the file|expected"):
            jpeft.io.read_safetensors(f, expect={})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < (32 << 20), f"peak {peak / 2**20:.0f} MiB while refusing a sparse 1 GiB tensor"


@pytest.mark.parametrize("shape", [[0, 2 ** 62], [0] + [2] * 70])
def test_impossible_safetensors_shapes_are_named_errors(tmp_path, shape):
    h = json.dumps({"t": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}}).encode()
    (tmp_path / "x.safetensors").write_bytes(len(h).to_bytes(8, "little") + h)
    with pytest.raises(CheckpointError, match="impossible shape"):
        jpeft.io.read_safetensors(tmp_path / "x.safetensors")


def test_backtracking_regex_matches_in_linear_time(tmp_path, run):
    """``(.|.)*X`` takes 2^n steps in Python's re on an n-character path; RE2 answers at once,
    in jpeft.tree, in a config's rank_pattern, and when loading a downloaded adapter."""
    from jpeft.errors import ConfigError, TargetNotFoundError

    paths = ["model/layers_0/self_attn/q_proj_with_a_long_name"]
    out = _within(2, lambda: jpeft.tree.select("(.|.)*X", paths))
    assert isinstance(out.get("error"), TargetNotFoundError), out
    cfg = jpeft.LoraConfig(target_modules=".*q_proj.*", rank_pattern={"(.|.)*X": 2})
    assert _within(2, lambda: cfg.rank_alpha(paths[0]))["value"] == (8, 16.0)
    # a saved adapter whose config was edited to the pattern (checksum recomputed, as an attacker would)
    params, d = _saved(tmp_path, run)
    meta = json.loads((d / "jpeft_adapter.json").read_text())
    meta["config"]["target_modules"] = "(.|.)*X"
    (d / "jpeft_adapter.json").write_text(json.dumps(jpeft.io.with_checksum(meta)))
    out = _within(5, lambda: jpeft.load_adapter(d, params))
    assert isinstance(out.get("error"), TargetNotFoundError), out
    # what RE2 does not accept is a named error that says so
    for bad in ("(?=q)proj", r"(q)\1", "(", r"q_proj\Z"):
        with pytest.raises(ConfigError, match="not a valid module-path regex"):
            jpeft.LoraConfig(target_modules=bad)


@pytest.mark.parametrize("kw", [dict(alpha=float("inf")), dict(alpha=1e308), dict(alpha=float("nan")),
                                dict(alpha_pattern={"q_proj": float("inf")}), dict(alpha_pattern={"q_proj": 1e308}),
                                dict(alpha_pattern={"q_proj": "x"}), dict(alpha_pattern={"q_proj": None}),
                                dict(alpha_pattern=5), dict(rank_pattern=5), dict(rank_pattern={"q": "x"}),
                                dict(rank_pattern={"(": 2}), dict(target_modules=5), dict(target_modules=True),
                                dict(target_modules=[1, 2]), dict(target_modules="(")])
def test_non_finite_alpha_and_wrongly_typed_lora_fields_are_config_errors(kw):
    from jpeft.errors import ConfigError

    with pytest.raises(ConfigError):
        jpeft.LoraConfig(**kw)
    # the same values in a stored config: a named error, never a raw TypeError or re.error
    d = jpeft.LoraConfig().to_dict()
    d.update({{"alpha": "lora_alpha"}.get(k, k): v for k, v in kw.items()})
    with pytest.raises(ConfigError):
        jpeft.AdapterConfig.from_dict(d)


# ------------------------------------------------------------------------------------------------
# issue 16: the update itself is guarded
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("opt", [optax.adam(1e-2, eps=0.0), optax.sgd(float("nan")), optax.adam(float("inf"))],
                         ids=["adam_eps0_at_B0", "lr_nan", "lr_inf"])
def test_a_non_finite_update_is_skipped_even_with_finite_loss_and_gradients(run, opt):
    """adam(eps=0) at LoRA's B=0 start gives 0/0 for A; a NaN or inf learning rate makes every
    update non-finite. The loss and gradients are finite, so only a guard on the update itself
    keeps the adapter (and the checkpoint written from it) intact."""
    params, cfg, adapter, _, _, loss_fn = run
    step = jpeft.make_train_step(loss_fn, opt, donate=False)
    state = opt.init(adapter)
    new_adapter, new_state, metrics = step(params, adapter, state, _batch(0), jax.random.key(0))
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
    assert int(metrics["skipped"]) == 1
    assert _leaves_equal(new_adapter, adapter) and _leaves_equal(new_state, state)
    with pytest.raises(NonFiniteError):
        jpeft.fit(step, params, adapter, state, [_batch(i) for i in range(4)], key=jax.random.key(0),
                  max_consecutive_skips=2)


# ------------------------------------------------------------------------------------------------
# issue 16: replacing an adapter is one atomic step; a kill between two renames is recovered
# ------------------------------------------------------------------------------------------------
_KILL_BETWEEN_RENAMES = r"""
import os, signal, sys
sys.path.insert(0, {helpers!r})
import jax, jpeft, jpeft._files
import ckpt_common as C
params = C.params(); cfg = C.lora_config(dropout=0.0)
adapter = jax.tree.map(lambda x: x + 1.0, jpeft.init(cfg, params, jax.random.key(1)))
jpeft._files._renameat2 = None  # a system without an atomic exchange: two renames
real = os.rename
def rename(src, dst):
    real(src, dst)
    if str(dst).endswith(".old"):
        os.kill(os.getpid(), signal.SIGKILL)  # between the two renames
os.rename = rename
jpeft.save_adapter({path!r}, cfg, adapter, params=params, overwrite=True)
"""


def test_kill_between_the_two_renames_of_an_overwrite_is_recovered(tmp_path, run):
    import subprocess

    params, cfg, adapter, *_ = run
    d = jpeft.save_adapter(tmp_path / "a", cfg, adapter, params=params)
    code = _KILL_BETWEEN_RENAMES.format(helpers=os.path.join(os.path.dirname(__file__), "helpers"), path=str(d))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120, env=C.env())
    assert r.returncode == -9, r.stderr.decode()[-2000:]
    assert not d.exists() and any(p.name.endswith(".old") for p in tmp_path.iterdir())  # the exact point
    _, loaded = jpeft.load_adapter(d, params)  # recovered: the complete new version is moved into place
    assert _leaves_equal(loaded, jax.tree.map(lambda x: x + 1.0, adapter))
    assert sorted(os.listdir(tmp_path)) == ["a"]


def test_overwrite_is_an_exchange_and_leaves_no_sibling(tmp_path, run):
    params, cfg, adapter, *_ = run
    d = jpeft.save_adapter(tmp_path / "a", cfg, adapter, params=params)
    newer = jax.tree.map(lambda x: x + 1.0, adapter)
    jpeft.save_adapter(d, cfg, newer, params=params, overwrite=True)
    assert _leaves_equal(jpeft.load_adapter(d, params)[1], newer)
    # overwrite=True replaces an earlier adapter or an empty folder only: a file or a folder of other work given by
    # mistake was replaced (and lost) with no error
    f = tmp_path / "file"
    f.write_text("a regular file")
    with pytest.raises(OverwriteError, match="is a file, not an adapter folder"):
        jpeft.save_adapter(f, cfg, adapter, params=params, overwrite=True)
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "notes.txt").write_text("keep me")
    with pytest.raises(OverwriteError, match=r"holds files that are not a jpeft adapter \('notes.txt', 1 in all\)"):
        jpeft.save_adapter(tmp_path / "work", cfg, adapter, params=params, overwrite=True)
    assert f.read_text() == "a regular file" and (tmp_path / "work" / "notes.txt").read_text() == "keep me"
    (tmp_path / "hidden" / ".git").mkdir(parents=True)  # only hidden entries: replaced (and lost) before
    (tmp_path / "hidden" / ".env").write_text("KEY=1")
    with pytest.raises(OverwriteError, match=r"not a jpeft adapter \('.env', 2 in all\)"):
        jpeft.save_adapter(tmp_path / "hidden", cfg, adapter, params=params, overwrite=True)
    assert (tmp_path / "hidden" / ".env").read_text() == "KEY=1"
    shutil.rmtree(tmp_path / "hidden")
    (tmp_path / "empty").mkdir()
    jpeft.save_adapter(tmp_path / "empty", cfg, adapter, params=params, overwrite=True)
    long = "n" * 245  # the temporary sibling's name must stay under 255 bytes
    jpeft.save_adapter(tmp_path / long, cfg, adapter, params=params)
    assert sorted(os.listdir(tmp_path)) == sorted(["a", "file", "work", "empty", long])  # no .old or .tmp left
    assert _leaves_equal(jpeft.load_adapter(tmp_path / "empty", params)[1], adapter)


_KILL_BETWEEN_PEFT_REPLACES = r"""
import os, signal, sys
sys.path.insert(0, {helpers!r})
import jax, jpeft, jpeft.hf as H
import ckpt_common as C
params = C.params()
cfg = jpeft.LoraConfig(r=4, alpha=32, target_modules=["q_proj", "v_proj"])
adapter = jax.tree.map(lambda x: x + 1.0, jpeft.init(cfg, params, jax.random.key(1)))
real = os.replace
def replace(src, dst):
    real(src, dst)
    if str(dst).endswith("adapter_model.safetensors"):
        os.kill(os.getpid(), signal.SIGKILL)  # new weights in place, the old config beside them
os.replace = replace
H.save_peft({path!r}, cfg, adapter)
"""


def test_kill_between_save_peft_replaces_is_finished_on_load(tmp_path, run):
    """Without the fix the new weights load with the old config's alpha (8 instead of 32)."""
    import subprocess

    from jpeft import hf

    params = run[0]
    old_cfg = jpeft.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    hf.save_peft(str(tmp_path / "p"), old_cfg, jpeft.init(old_cfg, params, jax.random.key(1)))
    code = _KILL_BETWEEN_PEFT_REPLACES.format(helpers=os.path.join(os.path.dirname(__file__), "helpers"),
                                              path=str(tmp_path / "p"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120, env=C.env())
    assert r.returncode == -9, r.stderr.decode()[-2000:]
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["lora_alpha"] == 8  # the exact point
    cfg, adapter = hf.load_peft(str(tmp_path / "p"), params)
    assert cfg.alpha == 32
    new_cfg = jpeft.LoraConfig(r=4, alpha=32, target_modules=["q_proj", "v_proj"])
    assert _leaves_equal(adapter, jax.tree.map(lambda x: x + 1.0, jpeft.init(new_cfg, params, jax.random.key(1))))
    assert sorted(os.listdir(tmp_path / "p")) == ["adapter_config.json", "adapter_model.safetensors"]


def _fail_replace(monkeypatch, suffix: str, exc):
    """Makes ``os.replace`` raise ``exc`` for a destination ending in ``suffix``; returns the real one."""
    real = os.replace

    def replace(src, dst):
        if str(dst).endswith(suffix):
            raise exc
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    return real


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), OSError(errno.EIO, "I/O error")], ids=["ctrl_c", "oserror"])
def test_save_peft_failing_between_its_replaces_keeps_the_matching_config(tmp_path, run, monkeypatch, exc):
    """A Ctrl-C or an error between the two replaces: the temporary folder holding the config the new weights name
    was removed by ``finally``, so load_peft loaded the new weights with the old config's alpha (8, not 32)."""
    from jpeft import hf

    params = run[0]
    p = str(tmp_path / "p")
    old_cfg = jpeft.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    hf.save_peft(p, old_cfg, jpeft.init(old_cfg, params, jax.random.key(1)))
    new_cfg = jpeft.LoraConfig(r=4, alpha=32, target_modules=["q_proj", "v_proj"])
    new = jax.tree.map(lambda x: x + 1.0, jpeft.init(new_cfg, params, jax.random.key(1)))
    real = _fail_replace(monkeypatch, "adapter_config.json", exc)
    with pytest.raises(SaveError if isinstance(exc, OSError) else KeyboardInterrupt,
                       match="new weights are in place" if isinstance(exc, OSError) else None):
        hf.save_peft(p, new_cfg, new)
    monkeypatch.setattr(os, "replace", real)
    cfg, adapter = hf.load_peft(p, params)
    assert cfg.alpha == 32 and _leaves_equal(adapter, new)
    assert sorted(os.listdir(p)) == ["adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left on device")],
                         ids=["ctrl_c", "oserror"])
def test_a_failed_first_save_leaves_no_empty_folder(tmp_path, run, monkeypatch, exc):
    """save_peft and save_pretrained (jpeft merge/export) made the output folder before writing: a
    first save that failed (a full disk, Ctrl-C) left it behind, empty. A folder they made goes again;
    one that was there before stays."""
    from jpeft import hf
    from jpeft.models import loading

    params, cfg, adapter, *_ = run

    def fail(*a, **k):
        raise exc

    for module, save in ((hf, lambda p: hf.save_peft(p, cfg, adapter)),
                         (loading, lambda p: loading.write_weights(p, {"w": np.ones(2, np.float32)}, {"config.json": "{}"}))):
        monkeypatch.setattr(module, "save_file", fail)
        for there in (False, True):
            out = tmp_path / f"{module.__name__.split('.')[-1]}_{there}"
            if there:
                out.mkdir()
            with pytest.raises((SaveError, type(exc))):
                save(str(out))
            assert out.exists() == there and (not there or not os.listdir(out))
        monkeypatch.undo()


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), OSError(errno.EIO, "I/O error")], ids=["ctrl_c", "oserror"])
def test_save_pretrained_failing_between_its_renames_puts_the_old_files_back(tmp_path, monkeypatch, exc):
    """model.safetensors was renamed into place before config.json: a failure between the two left model B's weights
    beside model A's config.json (loaded with A's rope_theta), under "Its previous weights are unchanged"."""
    def make(theta, seed):
        c = jpeft.models.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                                     rope_theta=theta)
        m = jpeft.models.LlamaForCausalLM(c)
        return m, m.init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))

    d = str(tmp_path / "m")
    (ma, pa), (mb, pb) = make(10000.0, 0), make(500.0, 1)
    jpeft.models.save_pretrained(d, ma, pa)
    before = {n: (tmp_path / "m" / n).read_bytes() for n in os.listdir(d)}
    real = _fail_replace(monkeypatch, "config.json", exc)
    with pytest.raises(SaveError if isinstance(exc, OSError) else KeyboardInterrupt):
        jpeft.models.save_pretrained(d, mb, pb)
    monkeypatch.setattr(os, "replace", real)
    assert {n: (tmp_path / "m" / n).read_bytes() for n in os.listdir(d)} == before  # nothing else left either
    jpeft.models.save_pretrained(d, mb, pb)  # the next attempt succeeds
    model, params = jpeft.models.from_pretrained(d)[:2]
    assert model.config.rope_theta == 500.0 and _leaves_equal(params, pb)
    assert sorted(os.listdir(d)) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("case", ["no_hard_links", "symlinked_weights"])
def test_save_pretrained_failing_never_removes_a_file_it_could_not_keep(tmp_path, monkeypatch, case):
    """The rollback removed every file already renamed into place that had no second link: where os.link fails (a
    file system without hard links, a file of another owner under protected_hardlinks) or model.safetensors is a
    symlink (a Hub cache snapshot), a failure at config.json left the folder without any model.safetensors."""
    c = jpeft.models.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2)
    m = jpeft.models.LlamaForCausalLM(c)
    p = m.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    d = tmp_path / "m"
    jpeft.models.save_pretrained(str(d), m, p)
    if case == "symlinked_weights":
        os.replace(d / "model.safetensors", tmp_path / "blob")
        os.symlink(tmp_path / "blob", d / "model.safetensors")
    else:
        monkeypatch.setattr(os, "link", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EPERM, "not permitted")))
    blob = (d / "model.safetensors").read_bytes()
    real = _fail_replace(monkeypatch, "config.json", OSError(errno.EIO, "I/O error"))
    with pytest.raises(SaveError):
        jpeft.models.save_pretrained(str(d), m, jax.tree.map(lambda x: x + 1, p))
    monkeypatch.setattr(os, "replace", real)
    assert sorted(os.listdir(d)) == ["config.json", "model.safetensors"]
    if case == "symlinked_weights":  # the link is put back as it was
        assert (d / "model.safetensors").is_symlink() and (d / "model.safetensors").read_bytes() == blob


def test_a_later_save_peft_removes_the_config_an_interrupted_one_kept(tmp_path, run, monkeypatch):
    """A save failed between its replaces ("... or save again"), then saved again: the kept .jpeft_save_* folder
    stayed, and load_peft put its config back over a later hand edit of adapter_config.json (lora_alpha 16 -> 32)."""
    from jpeft import hf

    params = run[0]
    p = str(tmp_path / "p")
    cfg = jpeft.LoraConfig(r=4, alpha=32, target_modules=["q_proj", "v_proj"])
    ad = jax.tree.map(lambda x: x + 1.0, jpeft.init(cfg, params, jax.random.key(1)))
    hf.save_peft(p, jpeft.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), ad)
    real = _fail_replace(monkeypatch, "adapter_config.json", OSError(errno.EIO, "I/O error"))
    with pytest.raises(SaveError, match="new weights are in place"):
        hf.save_peft(p, cfg, ad)
    monkeypatch.setattr(os, "replace", real)
    hf.save_peft(p, cfg, ad)
    assert sorted(os.listdir(p)) == ["adapter_config.json", "adapter_model.safetensors"]
    d = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps(dict(d, lora_alpha=16)))
    assert hf.load_peft(p, params)[0].alpha == 16


def test_quant_save_errors_are_save_errors(tmp_path):
    """A folder, a missing parent folder and a full disk raised safetensors' own SafetensorError."""
    import resource
    import signal

    from jpeft import quant

    q = quant.quantize(C.params(), "nf4")
    with pytest.raises(SaveError, match="is a folder"):
        quant.save(str(tmp_path), q, overwrite=True)
    with pytest.raises(SaveError, match="could not write the quantized base"):
        quant.save(str(tmp_path / "missing" / "b.safetensors"), q)
    path = str(tmp_path / "b.safetensors")
    quant.save(path, q)
    good = Path(path).read_bytes()
    old_handler, old_limit = signal.signal(signal.SIGXFSZ, signal.SIG_IGN), resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(good) // 2, old_limit[1]))  # a full disk, for the Rust writer too
    try:
        with pytest.raises(SaveError, match="could not write the quantized base"):
            quant.save(path, q, overwrite=True)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert Path(path).read_bytes() == good and sorted(os.listdir(tmp_path)) == ["b.safetensors"]


def test_save_peft_to_a_read_only_filesystem_is_a_save_error(tmp_path, run, monkeypatch):
    import tempfile

    from jpeft import hf

    params, cfg, adapter, *_ = run

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)  # the folder exists; nothing can be created in it
    with pytest.raises(SaveError, match="could not write the adapter .*Read-only file system"):
        hf.save_peft(str(tmp_path), cfg, adapter)
    monkeypatch.setattr(os, "makedirs", read_only)
    with pytest.raises(SaveError, match="Read-only file system"):
        hf.save_peft(str(tmp_path / "new"), cfg, adapter)


# ------------------------------------------------------------------------------------------------
# issue 16: token ids at the models' entry points; generate's and save's remaining raw errors
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llama():
    cfg = jpeft.models.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2)
    model = jpeft.models.LlamaForCausalLM(cfg)
    return model, model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))


def test_out_of_vocabulary_ids_at_the_models_entry_point(tiny_llama):
    model, params = tiny_llama
    for bad, val in (([[1, -1, 3]], -1), ([[1, 2, 32]], 32)):
        with pytest.raises(InputValidationError, match=f"token id {val} at position"):
            model.apply(params, jnp.array(bad))
        cfg = jpeft.LoraConfig(r=2, target_modules=["q_proj"])
        with pytest.raises(InputValidationError, match=f"token id {val}"):
            jpeft.apply(model, params, jpeft.init(cfg, params, jax.random.key(1)), jnp.array(bad))
    # a masked-out (padding) position is not checked: it never reaches the embedding table
    model.apply(params, jnp.array([[99, 2, 3]]), attention_mask=jnp.array([[0, 1, 1]]))  # does not raise
    # inside jit the ids are abstract: the check is the host's job (jpeft.fit(vocab_size=), the CLI)
    assert jax.jit(model.apply)(params, jnp.array([[1, 2, 3]])) is not None


def test_generate_refuses_nan_temperature_and_ragged_prompts(tiny_llama):
    model, params = tiny_llama
    ids = jnp.ones((1, 3), jnp.int32)
    for t in (float("nan"), float("inf"), -1.0):
        with pytest.raises(InputValidationError, match="temperature must be a finite number >= 0"):
            jpeft.generate(model, params, None, ids, 2, temperature=t, key=jax.random.key(0))
    with pytest.raises(InputValidationError, match="pad ragged prompts"):
        jpeft.generate(model, params, None, [[1, 2, 3], [1, 2]], 2)


def test_deeply_nested_data_position_is_a_config_error(tmp_path, run):
    from jpeft.errors import ConfigError

    params, cfg, adapter, opt, *_ = run
    deep = 0
    for _ in range(5000):
        deep = [deep]
    with jpeft.checkpoint.CheckpointManager(tmp_path / "ck", cfg, params, optimizer=opt, async_save=False) as m:
        with pytest.raises(ConfigError, match="data_position must be JSON-able"):
            m.save(1, adapter, opt.init(adapter), data_position=deep)
        m.save(1, adapter, opt.init(adapter), data_position={"index": 1})  # and the manager still works
        assert m.all_steps() == [1]


def test_atomic_write_leaves_a_users_tmp_file_alone_and_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    """``jpeft.io.atomic_write`` (metrics.jsonl trims, resolved_config.json, the forgetting
    reports) wrote through ``<path>.tmp`` and removed it on failure: a user's file of that name
    was overwritten and deleted. Its temporary file now has a fresh hidden name; a failed
    write leaves the previous file and no temporary behind."""
    from jpeft.io import atomic_write

    target, users = tmp_path / "metrics.jsonl", tmp_path / "metrics.jsonl.tmp"
    users.write_text("mine")
    atomic_write(target, "first\n")
    assert target.read_text() == "first\n" and users.read_text() == "mine"

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write(target, "second\n")
    assert target.read_text() == "first\n" and users.read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl", "metrics.jsonl.tmp"]


def test_atomic_write_removes_a_killed_writers_temporary_file_once_stale_and_unlocked(tmp_path):
    """A process SIGKILLed inside ``atomic_write`` (before its rename) left its hidden
    ``.<name>.<hex>.jpeft-tmp`` beside the target for good. The next successful write of that
    target removes it once it is 15 minutes old and no live writer holds its ``flock``; a younger
    one, one a live process holds, another target's and a user's look-alike stay."""
    import fcntl
    import signal
    import subprocess
    import time

    from jpeft.io import atomic_write

    target = tmp_path / "resolved_config.json"
    code = ("import os, signal, sys\nfrom jpeft import io\n"
            "real = os.replace\n"
            "def die(src, dst):\n    os.kill(os.getpid(), signal.SIGKILL)\n"
            "os.replace = die\nio.atomic_write(sys.argv[1], 'half')\n")
    r = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr
    (killed,) = [n for n in os.listdir(tmp_path) if n.endswith(".jpeft-tmp")]
    assert killed.startswith(".resolved_config.json.") and not target.exists()
    live = tmp_path / ".resolved_config.json.0123456789ab.jpeft-tmp"  # a writer still at work (holds its flock)
    live.write_text("busy")
    other = tmp_path / ".metrics.jsonl.0123456789ab.jpeft-tmp"  # another target's
    other.write_text("x")
    users = tmp_path / ".resolved_config.json.mine.jpeft-tmp"  # not a name atomic_write makes
    users.write_text("mine")
    atomic_write(target, "{}")
    assert (tmp_path / killed).exists()  # seconds old: it could be a writer between its open and its flock
    hour_ago = time.time() - 3600
    for p in (tmp_path / killed, live, other, users):
        os.utime(p, (hour_ago, hour_ago))
    with open(live, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        atomic_write(target, '{"a": 1}')
    assert target.read_text() == '{"a": 1}'
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith(".")) == sorted([live.name, other.name, users.name])
