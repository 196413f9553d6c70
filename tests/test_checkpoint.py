"""Adapter-only Orbax checkpoints and finished adapters (issue 6): exact resume across
processes, SIGKILL during saves, resharding 8 <-> 1 devices, size on a ~100M-parameter base,
wrong-base / corrupted / truncated errors, async == sync, keep-last / keep-best."""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
from jpeft.errors import BaseMismatchError, CheckpointError, ConfigError, SaveError, ShapeMismatchError

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "helpers"))
import ckpt_common as C  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import _parallel_common as P  # noqa: E402

HELPERS = os.path.join(os.path.dirname(__file__), "helpers")


def _run(script, *args, devices=1, timeout=240):
    r = subprocess.run([C.PY, os.path.join(HELPERS, script), *map(str, args)], env=C.env(devices),
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{script} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


def _leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


@pytest.fixture(scope="module")
def base():
    return C.setup()


# ------------------------------------------------------------------------------------------------
# exact resume
# ------------------------------------------------------------------------------------------------
def test_resume_in_fresh_process_is_bitwise_identical(tmp_path, base):
    params, cfg, adapter0, opt, state0, key = base
    step = jpeft.make_train_step(C.loss_fn(), opt, donate=False)
    straight = jpeft.fit(step, params, adapter0, state0, C.batches(0, 30), key=key)
    assert straight.step == 30 and straight.skipped == 0

    with jpeft.checkpoint.CheckpointManager(tmp_path / "ck", cfg, params, optimizer=opt, save_every=15) as mngr:
        first = jpeft.fit(step, params, adapter0, state0, C.batches(0, 15), key=key, checkpoint=mngr)
        assert mngr.all_steps() == [15]
    out = tmp_path / "out"
    out.mkdir()
    _run("ckpt_resume.py", tmp_path / "ck", out, 30)
    got = json.loads((out / "losses.json").read_text())
    assert got["start"] == 15
    resumed = [float.fromhex(h) for h in got["losses"]]
    want = [h["loss"] for h in straight.history]
    assert [h["loss"] for h in first.history] == want[:15]
    assert resumed == want[15:]  # bitwise: float equality of every loss
    _, final = jpeft.load_adapter(out / "adapter", params)
    assert _leaves_equal(final, straight.adapter)
    # and the adapter really trained (this is not a comparison of two no-ops)
    assert not _leaves_equal(straight.adapter, adapter0)


# ------------------------------------------------------------------------------------------------
# crash safety: SIGKILL during saves
# ------------------------------------------------------------------------------------------------
def test_sigkill_during_saves_leaves_a_complete_earlier_checkpoint(tmp_path):
    n = 10
    dirs = [tmp_path / f"run{i}" for i in range(n)]
    procs = [subprocess.Popen([C.PY, os.path.join(HELPERS, "ckpt_kill_saver.py"), str(d), "sync" if i % 2 == 0 else "async"],
                              env=C.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, d in enumerate(dirs)]
    delays = [0.013 * i + 0.007 * (i % 3) for i in range(n)]  # ten different moments in the save cycle
    errors = []

    def kill_after_ready(p, delay):
        try:
            line = p.stdout.readline()
            if line.strip() != "ready":
                errors.append(f"saver did not get ready: {line!r} {p.stderr.read()[-2000:]}")
                return
            time.sleep(delay)
            p.send_signal(signal.SIGKILL)
        finally:
            p.wait(timeout=120)

    threads = [threading.Thread(target=kill_after_ready, args=(p, d)) for p, d in zip(procs, delays)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=200)
    for p in procs:
        if p.poll() is None:
            p.kill()
    assert not errors, errors
    assert all(p.returncode == -signal.SIGKILL for p in procs)
    results = _run("ckpt_kill_verify.py", *dirs)
    assert len(results) == n
    for r in results:
        assert "error" not in r, r
        assert r["complete"] and r["step"] >= 1 and r["n_leaves"] > 0, r
        assert r["incomplete_after"] == [], r  # leftovers of the killed save were cleaned up
        assert all(s <= r["step"] for s in r["steps"])
    # the kills did land mid-save: some run left an incomplete step directory behind
    assert sum(bool(r["incomplete_before"]) for r in results) >= 1, results


# ------------------------------------------------------------------------------------------------
# resharding 8 -> 1 -> 8 devices
# ------------------------------------------------------------------------------------------------
def test_restore_on_another_device_layout(tmp_path):
    ck, ref = tmp_path / "ck", tmp_path / "ref"
    ref.mkdir()
    (r8,) = _run("ckpt_reshard.py", "save8", ck, ref, devices=8)
    assert r8["devices"] == 8 and r8["sharded_leaves"] > 0
    (r1,) = _run("ckpt_reshard.py", "restore1", ck, ref, devices=1)
    assert r1 == {"mode": "restore1", "devices": 1, "equal": True, "single_device": True}
    (b8,) = _run("ckpt_reshard.py", "restore8", ck, ref, devices=8)
    assert b8["equal"] and b8["mu_equal"] and b8["all_on_mesh"] and b8["step_on_mesh_finite"]
    assert b8["sharded_leaves"] == r8["sharded_leaves"]


# ------------------------------------------------------------------------------------------------
# size on a ~100M-parameter base, and no base weight in any file
# ------------------------------------------------------------------------------------------------
def _big_model():
    import flax.linen as nn

    class Layer(nn.Module):
        @nn.compact
        def __call__(self, h):
            q = nn.Dense(768, name="q_proj")(h)
            k = nn.Dense(768, name="k_proj")(h)
            v = nn.Dense(768, name="v_proj")(h)
            h = h + nn.Dense(768, name="o_proj")(q * k + v)
            return h + nn.Dense(768, name="down_proj")(nn.gelu(nn.Dense(3072, name="up_proj")(h)))

    class Big(nn.Module):
        @nn.compact
        def __call__(self, ids):
            h = nn.Embed(32000, 768, name="embed")(ids)
            for i in range(12):
                h = Layer(name=f"layers_{i}")(h)
            return h

    return Big()


def _dir_bytes(d):
    return sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file())


def test_adapter_and_checkpoint_sizes_on_100m_base(tmp_path):
    m = _big_model()
    abstract = jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))  # nothing allocated
    base_params = jpeft.summary(abstract, None, print_fn=None)["base"]
    assert 100e6 <= base_params <= 125e6
    base_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
    cfg = jpeft.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"])
    adapter = jpeft.init(cfg, abstract, jax.random.key(1))
    assert len(adapter) == 24

    def noise(tree, seed):  # trained values: random bytes do not compress (fresh B and Adam moments are zeros)
        leaves, treedef = jax.tree.flatten(tree)
        ks = jax.random.split(jax.random.key(seed), len(leaves))
        return jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape, x.dtype) if jnp.issubdtype(x.dtype, jnp.floating)
                                            else x for k, x in zip(ks, leaves)])

    adapter = noise(adapter, 3)
    d = jpeft.save_adapter(tmp_path / "adapter", cfg, adapter, params=abstract)
    adapter_share = _dir_bytes(d) / base_bytes
    opt = optax.adam(1e-3)
    with jpeft.checkpoint.CheckpointManager(tmp_path / "ck", cfg, abstract, optimizer=opt, async_save=False) as mngr:
        mngr.save(1, adapter, noise(opt.init(adapter), 4), jax.random.key(2), data_position=1)
    ckpt_share = _dir_bytes(tmp_path / "ck" / "1") / base_bytes
    print(f"adapter {adapter_share:.4%} of base bytes, training checkpoint {ckpt_share:.4%}")
    assert adapter_share < 0.005
    assert ckpt_share < 0.015
    # every stored array is an adapter or optimizer leaf (named so, with the rank-8 shapes)
    info = jpeft.read_adapter_info(d)
    assert set(info.arrays) == {f"{p}/{f}" for p in adapter for f in ("lora_A", "lora_B")}
    assert all(8 in shape for shape, _ in info.arrays.values())
    meta = json.loads((tmp_path / "ck" / "1" / "meta" / "metadata").read_text())
    base_names = {r[0] for r in meta["base"]["params"]}
    assert len(base_names) == len(jax.tree.leaves(abstract))
    for name, e in meta["arrays"].items():
        assert name == "rng" or name.startswith(("adapter/", "opt_state/")), name
        assert name.split("/", 1)[-1] not in base_names


def test_no_file_holds_a_base_weight(tmp_path, base):
    params, cfg, adapter, opt, opt_state, key = base
    d = jpeft.save_adapter(tmp_path / "a", cfg, adapter, params=params, with_content_hash=True)
    with jpeft.checkpoint.CheckpointManager(tmp_path / "ck", cfg, params, optimizer=opt, async_save=False) as mngr:
        mngr.save(1, adapter, opt_state, key)
    blobs = [f.read_bytes() for root in (d, tmp_path / "ck") for f in Path(root).rglob("*") if f.is_file()]
    probed = 0
    for leaf in jax.tree.leaves(params):
        a = np.asarray(leaf)
        if np.unique(a).size < a.size // 2:  # zero biases: their bytes are not distinctive
            continue
        probe = a.tobytes()[:64]
        assert all(probe not in b for b in blobs), "a base weight's bytes were found in a saved file"
        probed += 1
    assert probed >= 10  # every kernel and the embedding
    # the adapter's own bytes are there (the probe method can find what is stored)
    a_raw = np.asarray(jax.tree.leaves(adapter)[0]).tobytes()[:64]
    assert any(a_raw in b for b in blobs)


# ------------------------------------------------------------------------------------------------
# guard: wrong base, corrupted, truncated
# ------------------------------------------------------------------------------------------------
def _other_base(kind):
    """A base that differs from C.params() by a config field, a shape or a dtype."""
    p = C.params()
    if kind == "dtype":
        return jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.ndim == 1 else x, p)
    if kind == "shape":
        p2 = jax.tree.map(lambda x: x, p)
        inner = dict(p2["params"])
        inner["lm_head"] = {"kernel": jnp.zeros((C.HIDDEN, C.VOCAB + 1)), "bias": jnp.zeros((C.VOCAB + 1,))}
        return {"params": inner}
    return p


def test_wrong_base_named_error_and_override(tmp_path, base):
    params, cfg, adapter, opt, opt_state, key = base
    d = jpeft.save_adapter(tmp_path / "a", cfg, adapter, params=params, base_config={"vocab_size": C.VOCAB, "hidden_size": 16})
    with pytest.raises(BaseMismatchError, match=r"base config field 'vocab_size': saved 50, this base 51"):
        jpeft.load_adapter(d, params, base_config={"vocab_size": 51, "hidden_size": 16})
    with pytest.raises(BaseMismatchError, match=r"parameter 'lm_head/bias' has shape \(51,\) in this base, the saved base had \(50,\)"):
        jpeft.load_adapter(d, _other_base("shape"))
    with pytest.raises(BaseMismatchError, match=r"parameter 'embed/.*|layers_0/.*bias' has dtype bfloat16 in this base, the saved base had float32"):
        jpeft.load_adapter(d, _other_base("dtype"))
    with pytest.warns(UserWarning, match="allow_base_mismatch=True was given"):
        cfg2, a2 = jpeft.load_adapter(d, _other_base("shape"), allow_base_mismatch=True)
    assert cfg2 == cfg and _leaves_equal(a2, adapter)  # q/v shapes still fit, so the override works
    # content hash: same shapes, different values
    d2 = jpeft.save_adapter(tmp_path / "h", cfg, adapter, params=params, with_content_hash=True)
    other = jax.tree.map(lambda x: x + 1, params)
    with pytest.raises(BaseMismatchError, match="content hash differs"):
        jpeft.load_adapter(d2, other)
    # training checkpoints: the same guard
    with jpeft.checkpoint.CheckpointManager(tmp_path / "ck", cfg, params, optimizer=opt, async_save=False) as m:
        m.save(3, adapter, opt_state, key)
    with jpeft.checkpoint.CheckpointManager(tmp_path / "ck", cfg, _other_base("shape"), optimizer=opt) as m:
        with pytest.raises(BaseMismatchError, match=r"checkpoint was saved for a different base model: parameter 'lm_head/bias'"):
            m.restore_latest()
        with pytest.warns(UserWarning):
            st = m.restore_latest(allow_base_mismatch=True)
        assert st.step == 3 and _leaves_equal(st.adapter, adapter)
    # a different method config is refused too
    with jpeft.checkpoint.CheckpointManager(tmp_path / "ck", cfg.replace(r=8), params, optimizer=opt) as m:
        with pytest.raises(ConfigError, match="'r' is 4 there, 8 here"):
            m.restore_latest()
    # and the state of another optimizer whose arrays have the same names and shapes (AdaBelief's
    # mu / nu against Adam's): the state's parts are saved by class and compared
    assert jpeft.checkpoint.optimizer_state_kinds(opt_state) == ["ScaleByAdamState", "EmptyState"]
    for other in (optax.adabelief(1e-3), optax.adamw(1e-3)):
        with jpeft.checkpoint.CheckpointManager(tmp_path / "ck", cfg, params, optimizer=other) as m:
            with pytest.raises(CheckpointError, match=r"optimizer state of another optimizer: its parts are "
                                                      r"\['ScaleByAdamState', 'EmptyState'\], this optimizer's are"):
                m.restore_latest()
    with jpeft.checkpoint.CheckpointManager(tmp_path / "ck", cfg, params, optimizer=opt) as m:
        assert _leaves_equal(m.restore_latest().opt_state, opt_state)


def _ocdbt_data_files(step_dir):
    return sorted(f for f in Path(step_dir, "state").rglob("*") if f.is_file() and f.parent.name == "d")


def test_corrupted_and_truncated_checkpoints_raise_checkpoint_error(tmp_path, base):
    params, cfg, adapter, opt, opt_state, key = base

    def fresh(name):
        d = tmp_path / name
        with jpeft.checkpoint.CheckpointManager(d, cfg, params, optimizer=opt, async_save=False) as m:
            m.save(1, adapter, opt_state, key)
        return d

    def restore(d):
        with jpeft.checkpoint.CheckpointManager(d, cfg, params, optimizer=opt) as m:
            return m.restore_latest()

    assert _leaves_equal(restore(fresh("ok")).adapter, adapter)
    # truncated array data
    d = fresh("trunc")
    for f in _ocdbt_data_files(d / "1"):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="checkpoint step 1 in .* is corrupted"):
        restore(d)
    # flipped bytes in array data: caught by Orbax or by the SHA-256 index
    d = fresh("flip")
    for f in _ocdbt_data_files(d / "1"):
        b = bytearray(f.read_bytes())
        b[len(b) // 2] ^= 0xFF
        f.write_bytes(bytes(b))
    with pytest.raises(CheckpointError, match="corrupted"):
        restore(d)
    # truncated metadata JSON
    d = fresh("meta")
    mf = d / "1" / "meta" / "metadata"
    mf.write_bytes(mf.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupted or truncated: not valid JSON"):
        restore(d)


def test_a_restore_that_fails_part_way_reports_its_error_alone(tmp_path, base, monkeypatch, caplog):
    """Orbax closes its event loop as soon as one read of a damaged checkpoint fails, while
    tensorstore still reads the other arrays: each read that then completed printed a
    "RuntimeError: Event loop is closed" traceback (an unraisable error from tensorstore's
    threads), and each failed one "Future exception was never retrieved", around jpeft's one error
    (`jpeft train --resume` printed 18-22 such tracebacks in about half the runs). Other
    unraisable errors still reach the hook."""
    params, cfg, adapter, opt, opt_state, key = base
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    for i in range(4):  # the stray reads race the loop's closing: a few tries see them on the code before
        d = tmp_path / f"ck{i}"
        with jpeft.checkpoint.CheckpointManager(d, cfg, params, optimizer=opt, async_save=False) as m:
            m.save(1, adapter, opt_state, key)
        for f in _ocdbt_data_files(d / "1"):
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        with jpeft.checkpoint.CheckpointManager(d, cfg, params, optimizer=opt) as m:
            with pytest.raises(CheckpointError, match="corrupted or truncated"):
                m.restore_latest()
        time.sleep(0.3)
        gc.collect()
    assert [str(u.exc_value) for u in seen] == [] and sys.unraisablehook == seen.append
    assert [r.getMessage()[:80] for r in caplog.records if r.name == "asyncio"] == []
    with jpeft.checkpoint._quiet_aborted_reads(tmp_path):  # any other unraisable error reaches the hook in place
        sys.unraisablehook(types.SimpleNamespace(exc_type=RuntimeError, exc_value=RuntimeError("Event loop is closed"),
                                                 exc_traceback=None, err_msg=None, object=None))
    assert [str(u.exc_value) for u in seen] == ["Event loop is closed"] and sys.unraisablehook == seen.append
    other = logging.LogRecord("asyncio", logging.ERROR, "", 0, "Future exception was never retrieved: /x/1/state/",
                              None, None)
    assert jpeft.checkpoint._drop_aborted_read_tasks(other)  # another folder's unretrieved error is still logged
    # a failed read's task freed (and reported) before the error leaves Orbax: dropped too (it reached the log
    # in about one fresh-clone run in ten)
    caplog.clear()
    step = tmp_path / "early" / "1"
    with pytest.raises(ValueError), jpeft.checkpoint._quiet_aborted_reads(step):
        logging.getLogger("asyncio").error("Task exception was never retrieved\nfuture: <Task finished "
                                           "exception=ValueError('Error reading %s/state/d/0')>", step)
        raise ValueError("the read that failed first")
    assert [r.getMessage()[:80] for r in caplog.records if r.name == "asyncio"] == []


def test_restore_latest_can_fall_back_past_a_damaged_step(tmp_path, base):
    params, cfg, adapter, opt, opt_state, key = base
    with jpeft.checkpoint.CheckpointManager(tmp_path / "ck", cfg, params, optimizer=opt, async_save=False) as m:
        m.save(1, adapter, opt_state, key, data_position=1)
        m.save(2, jax.tree.map(lambda x: x + 1, adapter), opt_state, key, data_position=2)
    for f in _ocdbt_data_files(tmp_path / "ck" / "2"):
        f.write_bytes(f.read_bytes()[:7])
    with jpeft.checkpoint.CheckpointManager(tmp_path / "ck", cfg, params, optimizer=opt) as m:
        with pytest.raises(CheckpointError, match="checkpoint step 2"):
            m.restore_latest()
        with pytest.warns(UserWarning, match="skipping damaged checkpoint step 2"):
            st = m.restore_latest(fallback=True)
    assert st.step == 1 and st.data_position == 1 and _leaves_equal(st.adapter, adapter)


def test_corrupted_and_truncated_adapters(tmp_path, base):
    params, cfg, adapter, *_ = base
    d = jpeft.save_adapter(tmp_path / "a", cfg, adapter, params=params)
    w = d / "jpeft_adapter.safetensors"
    good = w.read_bytes()
    w.write_bytes(good[:-10])
    with pytest.raises(CheckpointError, match="corrupted or truncated: tensor .* claims bytes"):
        jpeft.load_adapter(d, params)
    b = bytearray(good)
    b[-5] ^= 0x01
    w.write_bytes(bytes(b))
    with pytest.raises(CheckpointError, match="do not match their SHA-256"):
        jpeft.load_adapter(d, params)
    w.write_bytes(good)
    j = d / "jpeft_adapter.json"
    j.write_text(j.read_text()[:50])
    with pytest.raises(CheckpointError, match="not valid JSON"):
        jpeft.read_adapter_info(d)


# ------------------------------------------------------------------------------------------------
# finished adapters: round trip and generic node rebuild
# ------------------------------------------------------------------------------------------------
def test_save_load_roundtrip_and_info(tmp_path, base):
    params, cfg, adapter, *_ = base
    trained = jax.tree.map(lambda x: x + 0.5, adapter)
    d = jpeft.save_adapter(tmp_path / "a", cfg, trained, params=params, metadata={"task": "demo"})
    assert sorted(os.listdir(d)) == ["jpeft_adapter.json", "jpeft_adapter.safetensors"]
    info = jpeft.read_adapter_info(d)
    assert info.config == cfg and info.metadata == {"task": "demo"} and info.jpeft_version == jpeft.__version__
    assert info.num_params == jpeft.summary(params, adapter, print_fn=None)["trainable"]
    cfg2, a2 = jpeft.load_adapter(d, params)
    assert cfg2 == cfg and jax.tree.structure(a2) == jax.tree.structure(trained) and _leaves_equal(a2, trained)
    x = jnp.asarray(C.batch(0)["input_ids"])
    np.testing.assert_array_equal(jpeft.apply(C.model(), params, a2, x), jpeft.apply(C.model(), params, trained, x))
    # bfloat16 adapters keep their dtype
    bf = jax.tree.map(lambda v: v.astype(jnp.bfloat16), trained)
    d3 = jpeft.save_adapter(tmp_path / "bf", cfg, bf, params=params)
    _, a3 = jpeft.load_adapter(d3, params)
    assert all(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(a3)) and _leaves_equal(a3, bf)


def test_load_needs_the_same_sites(tmp_path, base):
    params, cfg, adapter, *_ = base
    d = jpeft.save_adapter(tmp_path / "a", cfg, adapter)  # no fingerprint: the site check still guards
    other = jpeft.LoraConfig(r=4, alpha=8, target_modules=["q_proj"])
    data = json.loads((d / "jpeft_adapter.json").read_text())
    data["config"] = other.to_dict()
    (d / "jpeft_adapter.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="does not match its checksum"):  # edited after saving
        jpeft.load_adapter(d, params)
    (d / "jpeft_adapter.json").write_text(json.dumps(jpeft.io.with_checksum(data)))
    with pytest.raises(ShapeMismatchError, match="it has 'layers_0/v_proj/lora_A' that the config does not create here"):
        jpeft.load_adapter(d, params)


def test_a_reordered_first_match_pattern_is_an_edit_the_checksum_sees(tmp_path, base):
    """alpha_pattern takes the first matching key, so swapping two keys in a saved adapter's JSON
    changes its outputs (here layers_0's q_proj from alpha 16 to 2); the checksum was of the keys
    sorted, which that edit left intact, and the edited adapter loaded with other numbers. It is of
    the document in its own order now; a file an earlier jpeft wrote ("sha256:", sorted keys) still
    loads, and an edit of its values is still refused."""
    import hashlib

    params = base[0]
    cfg = jpeft.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"],
                           alpha_pattern={"layers_0.*q_proj": 16.0, "q_proj": 2.0})
    adapter = jax.tree.map(lambda v: v + 0.1, jpeft.init(cfg, params, jax.random.key(1)))
    d = jpeft.save_adapter(tmp_path / "a", cfg, adapter, params=params)
    f = d / "jpeft_adapter.json"
    data = json.loads(f.read_text())
    x = jnp.asarray(C.batch(0)["input_ids"])
    want = jpeft.apply(C.model(), params, adapter, x)
    swapped = {**data, "config": {**data["config"], "alpha_pattern": dict(reversed(data["config"]["alpha_pattern"].items()))}}
    f.write_text(json.dumps(swapped))
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        jpeft.load_adapter(d, params)
    f.write_text(json.dumps(jpeft.io.with_checksum(swapped)))  # re-signed: it loads, and means something else
    cfg2, a2 = jpeft.load_adapter(d, params)
    assert np.max(np.abs(np.asarray(jpeft.apply(C.model(), params, a2, x) - want))) > 1e-3
    # a file an earlier jpeft wrote: its checksum of the sorted keys is still checked as written
    body = {k: v for k, v in data.items() if k != "checksum"}
    old = {**body, "checksum": "sha256:" + hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()}
    f.write_text(json.dumps(old))
    cfg3, a3 = jpeft.load_adapter(d, params)
    assert cfg3 == cfg
    np.testing.assert_array_equal(jpeft.apply(C.model(), params, a3, x), want)
    f.write_text(json.dumps({**old, "config": {**old["config"], "r": 3}}))
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        jpeft.load_adapter(d, params)


# ------------------------------------------------------------------------------------------------
# manager policies: save_every, keep last K + best, async == sync
# ------------------------------------------------------------------------------------------------
def test_save_every_keep_last_and_best(tmp_path, base):
    params, cfg, adapter, opt, opt_state, key = base
    losses = {2: 5.0, 4: 1.0, 6: 3.0, 8: 4.0, 10: 6.0}
    with jpeft.checkpoint.CheckpointManager(tmp_path / "ck", cfg, params, optimizer=opt, save_every=2, keep_last=2,
                                            keep_best=1, best_metric="loss", async_save=False) as m:
        for s in range(1, 11):
            saved = m.save(s, jax.tree.map(lambda x: x + s, adapter), opt_state, key, metrics={"loss": losses.get(s, 9.0)})
            assert saved == (s % 2 == 0)
        assert m.all_steps() == [4, 8, 10]  # last two, plus the best (loss 1.0 at step 4)
        assert m.best_step() == 4
        best = m.restore_best()
        assert best.step == 4 and best.metrics == {"loss": 1.0}
        assert _leaves_equal(best.adapter, jax.tree.map(lambda x: x + 4, adapter))
        with pytest.raises(ConfigError, match="already saved"):
            m.save(10, adapter, opt_state, key, force=True)
    with jpeft.checkpoint.CheckpointManager(tmp_path / "ck2", cfg, params) as m:
        assert m.restore_latest() is None


def test_extra_state_round_trips_and_is_checked(tmp_path, base):
    """``save(extra=...)``: trees shaped like the adapter and the optimizer state plus JSON (what
    jpeft.fit saves for its forgetting guard) come back as TrainState.extra, bit for bit."""
    params, cfg, adapter, opt, opt_state, key = base
    kept = jax.tree.map(lambda x: x + 0.5, adapter)
    with jpeft.checkpoint.CheckpointManager(tmp_path / "ck", cfg, params, optimizer=opt, async_save=False) as m:
        m.save(1, adapter, opt_state, key, extra={"meta": {"kept_step": 0, "checks": [0.25]}, "adapter": kept,
                                                  "opt_state": opt_state})
        m.save(2, adapter, opt_state, key)
        with pytest.raises(ConfigError, match="extra must be a dict with keys 'meta', 'adapter', 'opt_state'"):
            m.save(3, adapter, opt_state, key, extra={"kept": kept})
        st = m.restore(1)
        assert st.extra["meta"] == {"kept_step": 0, "checks": [0.25]}
        assert _leaves_equal(st.extra["adapter"], kept) and _leaves_equal(st.extra["opt_state"], opt_state)
        assert _leaves_equal(st.adapter, adapter) and m.restore(2).extra is None


def test_opening_read_only_says_nothing(tmp_path, base, caplog):
    """Orbax warned twice on a read-only open ("Given directory is read only" of a writable
    folder): `jpeft eval --adapter <checkpoint>` printed both. Dropped; other warnings stay."""
    import logging

    params, cfg, adapter, opt, opt_state, key = base
    with jpeft.checkpoint.CheckpointManager(tmp_path / "ck", cfg, params, async_save=False) as m:
        m.save(1, adapter, None, key, force=True)
    with caplog.at_level(logging.WARNING, logger="absl"):
        with jpeft.checkpoint.CheckpointManager(tmp_path / "ck", cfg, params, async_save=False, keep_last=None,
                                                read_only=True) as m:
            assert _leaves_equal(m.restore(1).adapter, adapter)
    assert not [r for r in caplog.records if "read only" in r.getMessage() or "read_only" in r.getMessage()]
    assert not logging.getLogger("absl").filters  # the filter is only there while opening


def _training_run(directory, async_save, params, cfg, adapter, opt, opt_state, key):
    step = jpeft.make_train_step(C.loss_fn(), opt)  # donates: save() must copy before the next step
    with jpeft.checkpoint.CheckpointManager(directory, cfg, params, optimizer=opt, save_every=2, keep_last=3,
                                            async_save=async_save) as m:
        res = jpeft.fit(step, params, jax.tree.map(jnp.copy, adapter), jax.tree.map(jnp.copy, opt_state),
                        C.batches(0, 10), key=key, checkpoint=m)
        steps = m.all_steps()
        states = [m.restore(s) for s in steps]
    return res, steps, states


def _normalized_files(d):
    # Orbax names ocdbt data files by random ids and packs arrays into them in an order that
    # depends on thread timing; everything else must match name for name
    return sorted({re.sub(r"/d/[0-9a-f]{32}$", "/d/<id>", str(f.relative_to(d))) for f in Path(d).rglob("*") if f.is_file()})


def test_async_save_overlapping_training_equals_sync(tmp_path, base):
    r_sync, s_sync, st_sync = _training_run(tmp_path / "sync", False, *base)
    r_async, s_async, st_async = _training_run(tmp_path / "async", True, *base)
    assert s_sync == s_async == [6, 8, 10]
    assert [h["loss"] for h in r_sync.history] == [h["loss"] for h in r_async.history]
    for a, b in zip(st_sync, st_async):
        assert a.step == b.step and a.data_position == b.data_position
        assert _leaves_equal((a.adapter, a.opt_state, jax.random.key_data(a.key)), (b.adapter, b.opt_state, jax.random.key_data(b.key)))
        ma, mb = dict(a.metadata), dict(b.metadata)
        assert ma == mb  # same JSON metadata, SHA-256 of every array included
    assert _normalized_files(tmp_path / "sync") == _normalized_files(tmp_path / "async")


def test_other_methods_round_trip_through_the_generic_rebuild(tmp_path, base):
    """Nodes are rebuilt from the config by jpeft.init, so other methods (IA3; bottleneck
    adapters, which need the model traced) save, load and checkpoint with no extra code."""
    params = base[0]
    model = C.model()
    x = jnp.asarray(C.batch(0)["input_ids"])
    cases = [
        (jpeft.IA3Config(target_modules=["k_proj", "v_proj"], feedforward_modules=[], init_ia3_weights=False), ()),
        (jpeft.BottleneckConfig(target_modules=["o_proj"], reduction_factor=4, init_std=0.5), (model, x)),
    ]
    for i, (cfg, traced) in enumerate(cases):
        adapter = jpeft.init(cfg, params, jax.random.key(7), *traced)
        want = jpeft.apply(model, params, adapter, x)
        assert not np.allclose(want, model.apply(params, x))  # the adapter does something
        d = jpeft.save_adapter(tmp_path / f"a{i}", cfg, adapter, params=params)
        cfg2, a2 = jpeft.load_adapter(d, params, *traced)
        assert cfg2 == cfg and jax.tree.structure(a2) == jax.tree.structure(adapter) and _leaves_equal(a2, adapter)
        np.testing.assert_array_equal(jpeft.apply(model, params, a2, x), want)
        opt = optax.adam(1e-3)
        with jpeft.checkpoint.CheckpointManager(tmp_path / f"ck{i}", cfg, params, optimizer=opt, model=traced[0] if traced else None,
                                                example_args=traced[1:], async_save=False) as m:
            m.save(1, adapter, opt.init(adapter), jax.random.key(0))
            st = m.restore_latest()
        assert _leaves_equal(st.adapter, adapter) and jax.tree.structure(st.opt_state) == jax.tree.structure(opt.init(adapter))


def test_restore_keeps_the_residual_mark_of_pissa_sites(tmp_path, base):
    """The template was rebuilt from the manager's config alone, so a PiSSA (here randomized-SVD)
    adapter trained under a plain LoraConfig came back unmarked, and jpeft.hf.save_peft then wrote it
    for PEFT as a plain LoRA on the original base instead of refusing it."""
    params = base[0]
    cfg = jpeft.LoraConfig(r=2, alpha=4, target_modules=["q_proj"])
    res, adapter = jpeft.init_pissa(cfg, params, jax.random.key(0), niter=1)
    with jpeft.checkpoint.CheckpointManager(tmp_path / "ck", cfg, res, async_save=False) as m:
        m.save(1, adapter)
    with jpeft.checkpoint.CheckpointManager(tmp_path / "ck", cfg, res, async_save=False) as m:
        st = m.restore_latest()
    assert {n.residual for n in st.adapter.values()} == {"pissa_niter_1"} and _leaves_equal(st.adapter, adapter)
    with pytest.raises(jpeft.errors.UnsupportedAdapterError, match="niter=1"):
        jpeft.hf.save_peft(str(tmp_path / "peft"), cfg, st.adapter)


def test_read_adapter_info_reads_no_arrays(tmp_path, base):
    params, cfg, adapter, *_ = base
    d = jpeft.save_adapter(tmp_path / "a", cfg, adapter, params=params)
    (d / "jpeft_adapter.safetensors").unlink()  # metadata alone answers
    info = jpeft.read_adapter_info(d)
    assert info.arrays["layers_0/q_proj/lora_A"] == ((C.HIDDEN, 4), "float32")
    assert info.base["num_params"] == jpeft.summary(params, None, print_fn=None)["base"]
    with pytest.raises(jpeft.LoadError, match="does not exist"):
        jpeft.load_adapter(d, params)


# ------------------------------------------------------------------------------------------------
# issue 16: saved work is not lost or mislabelled
# ------------------------------------------------------------------------------------------------
def test_a_nan_metric_never_pushes_the_best_checkpoint_out(tmp_path, base):
    params, cfg, adapter, opt, opt_state, key = base
    with jpeft.checkpoint.CheckpointManager(tmp_path / "ck", cfg, params, optimizer=opt, keep_last=2, keep_best=1,
                                            best_metric="loss", async_save=False) as m:
        for step, loss in zip((1, 2, 3, 4), (1.0, float("nan"), 2.0, 3.0)):
            m.save(step, jax.tree.map(lambda x: x + step, adapter), opt_state, key, metrics={"loss": loss})
        assert m.all_steps() == [1, 3, 4]  # the best (loss 1 at step 1) and the last two
        assert m.best_step() == 1
    with jpeft.checkpoint.CheckpointManager(tmp_path / "mx", cfg, params, optimizer=opt, keep_last=1, keep_best=1,
                                            best_metric="acc", best_mode="max", async_save=False) as m:
        for step, acc in zip((1, 2, 3), (0.5, float("nan"), 0.1)):
            m.save(step, adapter, opt_state, key, metrics={"acc": acc})
        assert m.all_steps() == [1, 3] and m.best_step() == 1


_HOLD_WRITER = r"""
import sys
import jax, jpeft, ckpt_common as C
params, cfg, adapter, opt, opt_state, key = C.setup()
with jpeft.checkpoint.CheckpointManager(sys.argv[1], cfg, params, optimizer=opt, async_save=False) as m:
    m.save(1, adapter, opt_state, key)
    print("saved", flush=True)
    sys.stdin.readline()  # hold the manager (and its writer lock) open until told
"""


def test_two_writers_on_one_directory_are_refused(tmp_path, base):
    """Two managers saving into one directory would overwrite each other's steps: the second
    writer, in another process or in the same one (sync beside async), gets a SaveError."""

    params, cfg, adapter, opt, opt_state, key = base
    d = tmp_path / "ck"
    p = subprocess.Popen([C.PY, "-c", _HOLD_WRITER, str(d)], env=C.env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "saved", p.stderr.read()[-2000:]
        with jpeft.checkpoint.CheckpointManager(d, cfg, params, optimizer=opt, async_save=True) as m:
            with pytest.raises(SaveError, match="another CheckpointManager .* is saving into"):
                m.save(1, jax.tree.map(lambda x: x + 1, adapter), opt_state, key)
            p.communicate("\n", timeout=60)  # the other process closes its manager
            with pytest.raises(ConfigError, match="step 1 is already saved"):  # its step 1 is seen now
                m.save(1, jax.tree.map(lambda x: x + 1, adapter), opt_state, key)
            m.save(2, adapter, opt_state, key)
            with jpeft.checkpoint.CheckpointManager(d, cfg, params, optimizer=opt, async_save=False) as other:
                with pytest.raises(SaveError, match="another CheckpointManager"):
                    other.save(3, adapter, opt_state, key)
            m.wait()
        st = jpeft.checkpoint.CheckpointManager(d, cfg, params, optimizer=opt).restore(1)
        assert _leaves_equal(st.adapter, adapter)  # the first writer's step 1, not overwritten
    finally:
        if p.poll() is None:
            p.kill()


def test_a_save_after_a_failed_async_save_is_not_failed_by_the_old_error(tmp_path, base, monkeypatch):
    import errno

    from orbax.checkpoint._src.handlers import json_checkpoint_handler as jh

    params, cfg, adapter, opt, opt_state, key = base
    with jpeft.checkpoint.CheckpointManager(tmp_path / "ck", cfg, params, optimizer=opt, async_save=True) as m:
        m.save(1, adapter, opt_state, key)
        m.wait()

        async def full_disk(self, x, directory):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(jh.JsonCheckpointHandler, "_save_fn", full_disk)
        m.save(2, adapter, opt_state, key)  # fails in the background
        monkeypatch.undo()  # space is freed
        with pytest.warns(UserWarning, match=r"asynchronous save of step 2 .* failed .*No space left.*Now saving step 3"):
            m.save(3, adapter, opt_state, key)
        m.save(4, adapter, opt_state, key)
        m.wait()
        assert m.all_steps() == [1, 3, 4]


def test_fit_resumed_past_a_damaged_step_saves_that_step_again(tmp_path, base):
    params, cfg, adapter, opt, opt_state, key = base
    step = jpeft.make_train_step(C.loss_fn(), opt, donate=False)
    data = list(C.batches(0, 4))
    with jpeft.checkpoint.CheckpointManager(tmp_path / "ck", cfg, params, optimizer=opt, async_save=False) as m:
        full = jpeft.fit(step, params, adapter, opt_state, data, key=key, checkpoint=m)
        assert m.all_steps() == [2, 3, 4]
    for f in _ocdbt_data_files(tmp_path / "ck" / "4"):
        f.write_bytes(f.read_bytes()[:7])
    with jpeft.checkpoint.CheckpointManager(tmp_path / "ck", cfg, params, optimizer=opt, async_save=False) as m:
        with pytest.warns(UserWarning, match="skipping damaged checkpoint step 4"):
            st = m.restore_latest(fallback=True)
        assert st.step == 3
        with pytest.warns(UserWarning, match="step 4 was damaged; moved to .*4.damaged-"):
            jpeft.fit(step, params, st.adapter, st.opt_state, data[st.data_position:], key=st.key,
                      checkpoint=m, start_step=st.step, data_position=st.data_position)
        assert m.all_steps() == [2, 3, 4] and _leaves_equal(m.restore(4).adapter, full.adapter)
    assert any(p.name.startswith("4.damaged-") for p in (tmp_path / "ck").iterdir())


def test_a_symlinked_step_directory_is_refused_before_anything_is_written(tmp_path, base):
    from jpeft.errors import PathEscapeError

    params, cfg, adapter, opt, opt_state, key = base
    d = tmp_path / "ck"
    with jpeft.checkpoint.CheckpointManager(d, cfg, params, optimizer=opt, async_save=False, keep_last=1) as m:
        m.save(1, adapter, opt_state, key)
    os.rename(d / "1", tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", d / "1")
    with jpeft.checkpoint.CheckpointManager(d, cfg, params, optimizer=opt, async_save=False, keep_last=1) as m:
        assert m.restore(1).step == 1  # reading through it is fine
        with pytest.raises(PathEscapeError, match="step directory .*1 is a symlink"):
            m.save(2, adapter, opt_state, key)
        assert m.all_steps() == [1]
    assert (tmp_path / "elsewhere").is_dir()


def test_a_folder_named_like_a_step_is_refused_not_rotated_away(tmp_path, base):
    """Orbax takes any folder with a step's name for a checkpoint step; the keep_last rotation
    deleted a finished adapter the user had saved to <dir>/7 (no error). It is refused by name,
    before anything is written or deleted; other files in the directory are left alone."""
    params, cfg, adapter, opt, opt_state, key = base
    d = tmp_path / "ck"
    jpeft.save_adapter(str(d / "7"), cfg, adapter, params=params)
    (d / "notes.txt").write_text("mine")
    (d / "logs").mkdir()
    for read_only in (False, True):
        with pytest.raises(CheckpointError, match=r"\['7'\].*not checkpoints"):
            jpeft.checkpoint.CheckpointManager(d, cfg, params, optimizer=opt, keep_last=2, read_only=read_only)
    assert sorted(os.listdir(d / "7")) == ["jpeft_adapter.json", "jpeft_adapter.safetensors"]
    (d / "7").rename(tmp_path / "adapter_7")
    with jpeft.checkpoint.CheckpointManager(d, cfg, params, optimizer=opt, keep_last=2, async_save=False) as m:
        for s in (8, 9, 10):
            m.save(s, adapter, opt_state, key)
        assert m.all_steps() == [9, 10]
    assert (d / "notes.txt").read_text() == "mine" and (d / "logs").is_dir()
    with jpeft.checkpoint.CheckpointManager(d, cfg, params, optimizer=opt) as m:  # reopening its own steps is fine
        assert m.restore_latest().step == 10


def test_an_empty_step_folder_is_set_aside_and_the_newest_complete_step_restored(tmp_path, base):
    """A step folder no save got into (empty, or only Orbax's _CHECKPOINT_METADATA: a crash right
    after the folder was made, or a user's mkdir) was refused as "not checkpoints", which blocked
    `jpeft train --resume` for good. A writer moves it aside (kept, with a warning naming it) and
    restores the newest complete step; a read-only manager skips it and moves nothing; training
    then saves that step again. A folder with a checkpoint's parts but files missing stays a damaged
    step (CheckpointError), never read as complete."""
    params, cfg, adapter, opt, opt_state, key = base
    d = tmp_path / "ck"
    with jpeft.checkpoint.CheckpointManager(d, cfg, params, optimizer=opt, async_save=False, keep_last=2) as m:
        m.save(1, adapter, opt_state, key, data_position=1)
        m.save(2, adapter, opt_state, key, data_position=2)
    (d / "3").mkdir()
    (d / "4").mkdir()
    shutil.copy(d / "2" / "_CHECKPOINT_METADATA", d / "4")
    with jpeft.checkpoint.CheckpointManager(d, cfg, params, optimizer=opt, read_only=True) as m:
        assert m.all_steps() == [1, 2] and m.restore_latest().step == 2
    assert (d / "3").is_dir() and (d / "4" / "_CHECKPOINT_METADATA").is_file()
    with pytest.warns(UserWarning, match=r"step folder .*ck/3 holds no checkpoint.*moved it to .*3\.incomplete-"):
        m = jpeft.checkpoint.CheckpointManager(d, cfg, params, optimizer=opt, async_save=False, keep_last=2)
    with m:
        assert m.all_steps() == [1, 2] and m.restore_latest().step == 2
        m.save(3, adapter, opt_state, key, data_position=3)
        m.save(4, adapter, opt_state, key, data_position=4)
        assert m.all_steps() == [3, 4] and m.restore(4).data_position == 4
    aside = sorted(n for n in os.listdir(d) if ".incomplete-" in n)
    assert [n.split(".")[0] for n in aside] == ["3", "4"] and os.listdir(d / aside[1]) == ["_CHECKPOINT_METADATA"]
    shutil.rmtree(d / "3" / "meta")  # a damaged step: never skipped as unfinished
    with jpeft.checkpoint.CheckpointManager(d, cfg, params, optimizer=opt, async_save=False) as m:
        with pytest.raises(CheckpointError, match="step 3"):
            m.restore(3)


def test_a_manager_on_a_step_run_or_adapter_folder_is_refused_not_started_afresh(tmp_path, base):
    """A manager opened on one step (runs/x/checkpoints/10), on the run folder (runs/x) or on a
    finished adapter found no step there: restore_latest() returned None, the documented "fresh
    run" answer, so training silently restarted from step 0 and wrote new steps inside that
    folder. Each is refused by name before anything is written."""
    params, cfg, adapter, opt, opt_state, key = base
    run = tmp_path / "run"
    with jpeft.checkpoint.CheckpointManager(run / "checkpoints", cfg, params, optimizer=opt, async_save=False) as m:
        m.save(10, adapter, opt_state, key, data_position=10)
    jpeft.save_adapter(run / "adapter", cfg, adapter, params=params)
    jpeft.hf.save_peft(tmp_path / "peft", cfg, adapter)
    cases = [(run / "checkpoints" / "10", r"is one checkpoint step.*restore\(step=10\)"), (run, r"is a run folder"),
             (run / "adapter", r"finished jpeft adapter.*jpeft.load_adapter"),
             (tmp_path / "peft", r"Hugging Face PEFT adapter.*jpeft.hf.load_peft")]
    for folder, msg in cases:
        before = sorted(os.listdir(folder))
        for read_only in (False, True):
            with pytest.raises(CheckpointError, match=msg):
                jpeft.checkpoint.CheckpointManager(folder, cfg, params, optimizer=opt, read_only=read_only)
        assert sorted(os.listdir(folder)) == before
    with jpeft.checkpoint.CheckpointManager(run / "checkpoints", cfg, params, optimizer=opt) as m:
        assert m.restore_latest().step == 10
    # a folder holding steps is a checkpoint directory whatever lies beside them (it resumed before the refusals)
    shutil.copy(tmp_path / "peft" / "adapter_config.json", run / "checkpoints")
    shutil.copy(run / "adapter" / "jpeft_adapter.json", run / "checkpoints")
    (run / "checkpoints" / "checkpoints" / "3").mkdir(parents=True)
    for read_only in (False, True):
        with jpeft.checkpoint.CheckpointManager(run / "checkpoints", cfg, params, optimizer=opt,
                                                read_only=read_only) as m:
            assert m.restore_latest().step == 10
    # a checkpoint of another method names the method, not the first differing option
    ia3 = jpeft.IA3Config(target_modules=["q_proj"], feedforward_modules=[])
    with jpeft.checkpoint.CheckpointManager(run / "checkpoints", ia3, params, read_only=True) as m:
        with pytest.raises(ConfigError, match="'peft_type' is 'LORA' there, 'IA3' here"):
            m.restore_latest()


def test_an_adapter_initialised_with_the_model_and_its_reload_have_one_tree_structure(tmp_path):
    """jpeft.init(..., model, x) marked every traced LoRA site tied_output=False (a static field),
    load_adapter None for all but embeddings, so the two trees differed and an optimizer state of
    one did not fit the other (optax raised a pytree-metadata error; a jit retraced)."""
    cfg = jpeft.models.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                                   tie_word_embeddings=True)
    model, ids = jpeft.models.LlamaForCausalLM(cfg), jnp.ones((1, 4), jnp.int32)
    params = model.init(jax.random.key(0), ids)
    lcfg = jpeft.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "embed_tokens"])
    a = jpeft.init(lcfg, params, jax.random.key(1), model, ids)
    assert a["model/embed_tokens"].tied_output is True and a["model/layers_0/self_attn/q_proj"].tied_output is None
    jpeft.save_adapter(tmp_path / "a", lcfg, a, params=params)
    b = jpeft.load_adapter(tmp_path / "a", params)[1]
    assert jax.tree.structure(a) == jax.tree.structure(b)
    opt = optax.adam(1e-3)
    opt.update(b, opt.init(a), b)  # the original's optimizer state takes the reloaded adapter's gradients


_EXIT_WITHOUT_CLOSE = """
import sys, jax, jax.numpy as jnp, optax, flax.linen as nn, jpeft
model = nn.Dense(3); params = model.init(jax.random.key(0), jnp.ones((2, 4)))
cfg = jpeft.LoraConfig(r=2, target_modules=".*")
ad = jpeft.init(cfg, params, jax.random.key(1))
m = jpeft.checkpoint.CheckpointManager(sys.argv[1], cfg, params, optimizer=optax.adam(1e-3))  # async_save
m.save(5, ad, optax.adam(1e-3).init(ad))
"""


def test_a_script_that_exits_without_close_keeps_its_last_async_save(tmp_path):
    """The last asynchronous save of a script that never calls close() was lost at exit (Orbax's
    commit thread found concurrent.futures shut down; only a .orbax-checkpoint-tmp directory was
    left); a threading exit hook now waits for it."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", _EXIT_WITHOUT_CLOSE, str(tmp_path / "ck")], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "ck").iterdir() if not p.name.startswith(".")) == ["5"], r.stderr[-2000:]
    assert "cannot schedule new futures" not in r.stderr


def test_a_manager_dropped_without_close_keeps_its_last_async_save(tmp_path):
    """A script's manager made inside main() (collected when main returns, before the interpreter
    exits, so the exit hook's weak set no longer holds it) lost its last asynchronous save; it is
    finished when the manager is collected."""
    code = "def main():\n" + "".join(f"    {line}\n" for line in _EXIT_WITHOUT_CLOSE.strip().splitlines()[1:]) + "main()\n"
    code = _EXIT_WITHOUT_CLOSE.strip().splitlines()[0] + "\n" + code
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ck")], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "ck").iterdir() if not p.name.startswith(".")) == ["5"], r.stderr[-2000:]


def test_an_optimizer_state_of_the_base_or_of_frozen_arrays_is_refused_at_save(tmp_path, base):
    """save() wrote an optimizer state built over the base params (``adam.init(params)`` for
    ``adam.init(adapter)``) without a word; the train step refused it only later, after the
    checkpoint (and in it an optimizer state of every base weight) was on disk, and restore then
    refused the checkpoint. Refused at save now, before anything is written, with or without
    the manager's optimizer; valid states (chains, masked and multi-transform states, empty and
    factored states, full fine-tuning's whole-model adapter, an AdapterBank's weights, VeRA's
    trainable part) still save."""
    params, cfg, adapter, opt, opt_state, key = base
    adapter = jax.tree.map(lambda x: x + 0.25, adapter)  # every tensor nonzero (lora_B starts at zero)
    label = lambda t: jax.tree.map(lambda x: "a" if x.ndim > 1 else "b", t)  # noqa: E731
    masked = optax.masked(optax.adam(1e-3), lambda t: jax.tree.map(lambda x: x.ndim > 1, t))
    multi = optax.multi_transform({"a": optax.adam(1e-3), "b": optax.sgd(1e-2, momentum=0.9)}, label)
    chain = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    full_cfg = jpeft.FullFinetuneConfig()
    full = jpeft.init(full_cfg, params, jax.random.key(3))
    vera_cfg = jpeft.VeraConfig(r=2, target_modules=["q_proj", "v_proj"])
    vera = jpeft.init(vera_cfg, params, jax.random.key(4))
    bank = jpeft.AdapterBank.create(adapter, capacity=2, max_rank=4)
    bad = [  # (config, adapter, optimizer, state, message)
        (cfg, adapter, opt, opt.init(params), "base model's params"),
        (cfg, adapter, opt, opt.init(params["params"]), "base model's params"),
        (cfg, adapter, chain, chain.init(params), "base model's params"),
        (cfg, adapter, masked, masked.init(params), "base model's params"),
        (full_cfg, full, opt, opt.init(params), "base model's params"),
        (vera_cfg, vera, opt, opt.init(vera), "frozen arrays"),
    ]
    for i, (c, a, o, state, msg) in enumerate(bad):
        for with_opt in (True, False):
            d = tmp_path / f"bad{i}{with_opt}"
            with jpeft.checkpoint.CheckpointManager(d, c, params, optimizer=o if with_opt else None,
                                                    async_save=False) as m:
                with pytest.raises(ConfigError, match=msg):
                    m.save(1, a, state, key)
                with pytest.raises(ConfigError, match=msg):  # also as the forgetting guard's kept state
                    m.save(1, a, None, key, extra={"opt_state": state})
                assert m.all_steps() == []
            assert not [p for p in d.iterdir() if p.name != ".jpeft-writer.lock"]
    # the state of another optimizer than the manager's: restore could not rebuild it
    with jpeft.checkpoint.CheckpointManager(tmp_path / "other", cfg, params, optimizer=opt, async_save=False) as m:
        with pytest.raises(ConfigError, match="not a state of this manager's optimizer"):
            m.save(1, adapter, optax.sgd(1e-2, momentum=0.9).init(adapter), key)
    good = [
        (cfg, adapter, opt, opt.init(adapter)),
        (cfg, adapter, chain, chain.init(adapter)),
        (cfg, adapter, masked, masked.init(adapter)),
        (cfg, adapter, multi, multi.init(adapter)),
        (cfg, adapter, optax.adafactor(1e-2, min_dim_size_to_factor=2), optax.adafactor(
            1e-2, min_dim_size_to_factor=2).init(adapter)),
        (cfg, adapter, optax.sgd(1e-2), optax.sgd(1e-2).init(adapter)),  # empty: nothing saved
        (full_cfg, full, opt, opt.init(full)),
        (vera_cfg, vera, opt, jpeft.init_opt_state(opt, vera)),
        (cfg, bank.weights, opt, jpeft.init_opt_state(opt, bank.weights)),  # no state for its frozen scales
    ]
    for i, (c, a, o, state) in enumerate(good):
        with jpeft.checkpoint.CheckpointManager(tmp_path / f"good{i}", c, params, optimizer=o, async_save=False) as m:
            assert m.save(1, a, state, key)
            if a is not bank.weights:  # a bank's weights restore with their own template
                st = m.restore(1)
                assert _leaves_equal(st.adapter, a) and _leaves_equal(st.opt_state, state)
                # sgd's EmptyStates came back as None, which no train step takes (its resumed run stopped)
                assert jax.tree.structure(st.opt_state) == jax.tree.structure(state)


_TWO_PROCESS_SAVE = r"""
import json, sys
import jax
jax.distributed.initialize(f"127.0.0.1:{sys.argv[1]}", num_processes=2, process_id=int(sys.argv[2]))
import flax.linen as nn, jax.numpy as jnp, numpy as np, optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
import jpeft
from jpeft.errors import CheckpointError
from jpeft.io import sha256_hex, with_checksum
model = nn.Dense(6)
params = model.init(jax.random.key(0), jnp.ones((1, 8)))
cfg, opt = jpeft.LoraConfig(r=2, alpha=4, target_modules=".*"), optax.adam(1e-2)
host = jpeft.init(cfg, params, jax.random.key(1))
host = jax.tree.map(lambda x: np.asarray(jax.random.normal(jax.random.key(x.size), x.shape)), host)  # B random too
mesh = jax.make_mesh((2,), ("d",))
split = NamedSharding(mesh, P("d"))  # every array's first axis (8 or 2) split over the two processes
place = lambda x: jax.make_array_from_callback(x.shape, split if np.ndim(x) else NamedSharding(mesh, P()),
                                               lambda i: np.asarray(x)[i])
adapter = jax.tree.map(place, host)
opt_state = jax.tree.map(place, jax.tree.map(lambda x: (x + 1.5).astype(x.dtype), opt.init(jpeft.trainable(host))))
assert not jax.tree.leaves(adapter)[0].is_fully_addressable
d = sys.argv[3]
out = {}
with jpeft.checkpoint.CheckpointManager(d, cfg, params, optimizer=opt, async_save=False) as m:
    m.save(1, adapter, opt_state, jax.random.key(5), data_position=1)
    arrays = m.read_metadata(1)["arrays"]
    want = {f"adapter/{n}": sha256_hex(np.asarray(x)) for n, x in jpeft.io.leaf_names(host)}
    out["sha"] = all(arrays[k]["sha256"] == v for k, v in want.items()) and all(e["sha256"] for e in arrays.values())
    st = m.restore(1, adapter=adapter, opt_state=opt_state)
    back = jpeft.distributed.gather(st.adapter)
    out["restored"] = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(host)))
    multihost_utils.sync_global_devices("restored")
    if jax.process_index() == 0:  # a flipped array under an intact metadata checksum: what the hash is for
        meta_file = f"{d}/1/meta/metadata"
        meta = json.load(open(meta_file))
        meta.pop("checksum", None)
        name = "adapter/lora_B" if "adapter/lora_B" in meta["arrays"] else sorted(meta["arrays"])[0]
        meta["arrays"][name]["sha256"] = "0" * 64
        json.dump(with_checksum(meta), open(meta_file, "w"))
    multihost_utils.sync_global_devices("tampered")
    try:
        m.restore(1, adapter=adapter, opt_state=opt_state)
        out["tampered"] = "restored"
    except CheckpointError as e:
        out["tampered"] = "SHA-256" in str(e)
    jpeft.checkpoint.MULTIHOST_HASH_BYTES = 8  # past the limit (full fine-tuning of a large model): saved unhashed
    m.save(2, adapter, opt_state, jax.random.key(5), data_position=2)
    out["unhashed"] = all(e["sha256"] is None for k, e in m.read_metadata(2)["arrays"].items() if k != "rng")
    back = jpeft.distributed.gather(m.restore(2, adapter=adapter, opt_state=opt_state).adapter)
    out["unhashed_restored"] = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(host)))
print("OUT", json.dumps(out, sort_keys=True), flush=True)
jax.distributed.shutdown()
"""


def test_a_checkpoint_split_across_processes_is_hashed_and_checked(tmp_path):
    """A checkpoint saved by two processes whose adapter and optimizer state are split across them
    recorded no SHA-256 at all (the whole value is on no one process), and a restore onto arrays
    split across processes skipped the check, so a damaged step Orbax reads without complaint
    restored silently. Each array's whole value is now gathered on every process and hashed when
    saving and when restoring: the saved hashes are those of the full arrays, the restore is
    exact, and a hash that does not match is a CheckpointError on both processes."""
    port = P.free_port()
    outs, _ = P.run_processes([[C.PY, "-c", _TWO_PROCESS_SAVE, str(port), str(i), str(tmp_path / "ck")] for i in range(2)],
                              env=C.env(1))
    want = 'OUT {"restored": true, "sha": true, "tampered": true, "unhashed": true, "unhashed_restored": true}'
    assert all(want in o for o in outs), "\n----\n".join(o[-3000:] for o in outs)


def test_a_failed_save_reports_its_named_error_alone(tmp_path, base, monkeypatch, caplog):
    """A save whose array write fails (a full disk): Orbax logged the failure three times with
    tracebacks (absl ERRORs), asyncio logged the step's other failed writes as "exception was
    never retrieved", and each write that completed after Orbax closed the save's event loop
    printed an unraisable "Event loop is closed" traceback, around jpeft's one SaveError. Now
    only the SaveError says it, and the checkpoint saved before is intact and restores."""
    import errno

    from orbax.checkpoint._src.serialization import type_handlers as th

    params, cfg, adapter, opt, opt_state, key = base
    stray = []
    monkeypatch.setattr(sys, "unraisablehook", stray.append)
    write = th.NumpyHandler._open_and_write

    async def full_disk(self, value, tspec, ts_context):
        if "nu" in json.dumps(tspec):  # the optimizer's second moments: the other arrays are written
            raise OSError(errno.ENOSPC, "No space left on device")
        return await write(self, value, tspec, ts_context)

    d = tmp_path / "ck"
    with caplog.at_level(logging.INFO):
        with jpeft.checkpoint.CheckpointManager(d, cfg, params, optimizer=opt, async_save=True) as m:
            m.save(1, adapter, opt_state, key)
            m.wait()
            monkeypatch.setattr(th.NumpyHandler, "_open_and_write", full_disk)
            m.save(2, adapter, opt_state, key)
            with pytest.raises(SaveError, match=r"asynchronous save .* failed; earlier checkpoints are intact.*No sp"):
                m.wait()
            monkeypatch.setattr(th.NumpyHandler, "_open_and_write", write)
            assert m.all_steps() == [1]
            st = m.restore(1)
        gc.collect()
    loud = [f"{r.name}: {r.getMessage()[:120]}" for r in caplog.records if r.levelno >= logging.WARNING]
    assert [str(u.exc_value) for u in stray] == []
    assert loud == []
    assert st.step == 1 and _leaves_equal(st.adapter, adapter) and _leaves_equal(st.opt_state, opt_state)
    assert sorted(p.name for p in d.iterdir() if not p.name.startswith(".")) == ["1"]
