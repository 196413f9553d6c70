"""Property-based fuzzing (issue 11) of every loader with hypothesis: truncations, byte flips,
wrong dtypes and shapes in safetensors headers, malformed, nested and oversized JSON. Every
case must load the pristine data unchanged or raise a named jpeft error, within a time bound.
The same mutations run from ``python -m jpeft.fuzz`` (the figures in docs/RELIABILITY.md)."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from jpeft import fuzz

TIME_BOUND = 10.0  # seconds per case; cases take well under 1 s on an idle machine

mutations = st.builds(
    fuzz.Mutation,
    kind=st.sampled_from(fuzz.KINDS),
    file=st.integers(0, 63),
    pos=st.floats(0.0, 1.0, exclude_max=True, allow_nan=False),
    value=st.integers(0, (1 << 16) - 1),
)


@pytest.fixture(scope="module")
def scratch():
    d = Path(tempfile.mkdtemp(prefix="jpeft_test_fuzz_"))
    for name in ("absl", "asyncio", "orbax"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _prepare(target, scratch):
    fixture = scratch / f"fixture_{target.name}"
    fixture.mkdir()
    root = target.make_fixture(fixture)
    return root, target.digest(target.load(root))


@pytest.fixture(scope="module")
def adapter_fixtures(scratch):
    out = {}
    for t in fuzz.adapter_targets():
        out[t.name] = (t, *_prepare(t, scratch))
    return out


@pytest.fixture(scope="module")
def checkpoint_fixture(scratch):
    t = fuzz.checkpoint_target()
    return (t, *_prepare(t, scratch))


@pytest.fixture(scope="module")
def hf_fixtures(scratch):
    out = {}
    for t in fuzz.hf_targets():
        out[t.name] = (t, *_prepare(t, scratch))
    return out


def _check(target, root, expected, m, scratch):
    o = fuzz.run_case(target, root, m, scratch, time_bound=TIME_BOUND, expected=expected)
    assert o.status in ("ok", "named", "changed"), f"{target.name} {m}: {o.error}"
    if target.checksummed:
        assert o.status != "changed"
    assert o.seconds < TIME_BOUND


_SETTINGS = dict(deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@settings(max_examples=150, **_SETTINGS)
@given(m=mutations)
def test_fuzz_load_adapter(adapter_fixtures, scratch, m):
    _check(*adapter_fixtures["load_adapter"], m, scratch)


@settings(max_examples=80, **_SETTINGS)
@given(m=mutations)
def test_fuzz_read_adapter_info(adapter_fixtures, scratch, m):
    _check(*adapter_fixtures["read_adapter_info"], m, scratch)


@settings(max_examples=40, **_SETTINGS)
@given(m=mutations)
def test_fuzz_checkpoint_restore(checkpoint_fixture, scratch, m):
    _check(*checkpoint_fixture, m, scratch)


@settings(max_examples=40, **_SETTINGS)
@given(m=mutations)
def test_fuzz_models_from_pretrained(hf_fixtures, scratch, m):
    assert "models.from_pretrained" in hf_fixtures
    _check(*hf_fixtures["models.from_pretrained"], m, scratch)


@settings(max_examples=40, **_SETTINGS)
@given(m=mutations)
def test_fuzz_hf_load_peft(hf_fixtures, scratch, m):
    assert "hf.load_peft" in hf_fixtures
    _check(*hf_fixtures["hf.load_peft"], m, scratch)


@pytest.mark.parametrize("kind", ["json_nested", "json_oversized", "st_header_len", "st_dtype", "st_shape", "st_offsets"])
def test_each_format_attack_is_a_named_error(adapter_fixtures, scratch, kind):
    """Every structured attack on the two files of a saved adapter, not left to chance."""
    t, root, expected = adapter_fixtures["load_adapter"]
    files = t.files(root)
    for fi in range(len(files)):
        for value in (0, 1, 2, 3, 8):
            o = fuzz.run_case(t, root, fuzz.Mutation(kind, fi, 0.5, value), scratch, time_bound=TIME_BOUND, expected=expected)
            assert o.status == "named", (kind, fi, value, o)


def _hostile_cases(fixture, scratch):
    t, root, expected = fixture
    files = (t.hostile_files or t.files)(root)
    assert files
    for kind in fuzz.HOSTILE_KINDS:
        for fi in range(len(files)):
            o = fuzz.run_case(t, root, fuzz.Mutation(kind, fi, 0.0, 0), scratch, time_bound=TIME_BOUND, expected=expected)
            assert o.status in ("named", "ok"), (t.name, kind, files[fi].name, o)  # ok: a file it never opens
            assert o.seconds < 2.0, (t.name, kind, files[fi].name, o)


def test_hostile_files_in_an_adapter_folder(adapter_fixtures, scratch):
    """A FIFO, a symlink to /dev/zero, or a sparse file declaring a 1 GiB tensor in place of
    either file of a saved adapter: a named error at once (never a hang, never 1 GiB read)."""
    for name in ("load_adapter", "read_adapter_info"):
        _hostile_cases(adapter_fixtures[name], scratch)


def test_hostile_checkpoint_metadata(checkpoint_fixture, scratch):
    _hostile_cases(checkpoint_fixture, scratch)


def test_hostile_files_in_hf_folders(hf_fixtures, scratch):
    for name in ("models.from_pretrained", "hf.load_peft"):
        _hostile_cases(hf_fixtures[name], scratch)


def test_cli_reports_and_updates_a_doc(tmp_path, capsys):
    doc = tmp_path / "R.md"
    doc.write_text("before\n<!-- fuzz:begin -->old<!-- fuzz:end -->\nafter\n")
    rc = fuzz.main(["--cases", "5", "--seed", "1", "--no-hf", "--loaders", "read_adapter_info", "--no-progress",
                    "--write-doc", str(doc)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "| `read_adapter_info` | 5 + 6 |" in out and "**0**" in out
    text = doc.read_text()
    assert text.startswith("before\n<!-- fuzz:begin (python -m jpeft.fuzz --cases 5 --seed 1") and text.endswith("<!-- fuzz:end -->\nafter\n")
    assert "old" not in text


_BAD_PEFT_VALUES = [("target_modules", 5), ("target_modules", True), ("target_modules", "("), ("target_modules", [1]),
                    ("target_modules", "(.|.)*X"), ("rank_pattern", 5), ("rank_pattern", "x"), ("rank_pattern", {"(": 2}),
                    ("rank_pattern", {"q_proj": "x"}), ("alpha_pattern", {"q_proj": "x"}),
                    ("alpha_pattern", {"q_proj": None}), ("alpha_pattern", 5), ("alpha_pattern", {"q_proj": 1e308}),
                    ("lora_alpha", 1e308), ("lora_alpha", "x"), ("r", "4"), ("use_rslora", "yes"), ("use_dora", 1)]


def test_wrongly_typed_peft_config_values_are_named_errors(hf_fixtures, scratch):
    """Each value, written into adapter_config.json, ends in a named jpeft error (before the
    fix: raw TypeError, ValueError or re.error; and ``(.|.)*X`` hung)."""
    import json as _json

    from jpeft.errors import JpeftError

    t, root, _ = hf_fixtures["hf.load_peft"]
    for i, (key, value) in enumerate(_BAD_PEFT_VALUES):
        work = scratch / f"peft_value_{i}"
        shutil.copytree(root, work)
        cfg = _json.loads((work / "adapter_config.json").read_text())
        cfg[key] = value
        (work / "adapter_config.json").write_text(_json.dumps(cfg))
        out = {}

        def call():
            try:
                t.load(work)
            except BaseException as e:  # noqa: BLE001 - checked below
                out["e"] = e

        import threading

        th = threading.Thread(target=call, daemon=True)
        th.start()
        th.join(TIME_BOUND)
        assert not th.is_alive(), f"{key}={value!r}: no answer within {TIME_BOUND}s"
        assert isinstance(out.get("e"), JpeftError), (key, value, out)
