"""Suite-wide set-up, loaded first by pytest in the controller and in each xdist worker.

* **Scratch files** stay inside pytest's own temporary folder (which pytest prunes to the last
  three runs): the doctests under jpeft/, the notebooks and the CLI subprocesses call
  ``tempfile.mkdtemp()`` as a user would, and without this each run left folders in /tmp.
* **Compile time.** The suite's models are tiny, so nearly all of its time is XLA compiling,
  not running. Two settings cut it (measured on a 2-core VM, tests/test_scan.py,
  test_packing.py, test_cli.py and test_models.py: 510 s -> 358 s with the first, 311 s with
  both), and neither changes what a program computes:

  - ``--xla_backend_optimization_level=0`` in ``XLA_FLAGS``: LLVM's optimisation of the CPU
    code XLA emits. The HLO (fusion, buffer assignment, the memory statistics some tests read)
    is the same; only the machine code is less tuned, which a tiny model does not notice.
  - JAX's persistent compilation cache in one folder shared by the workers and every
    subprocess they start (``JAX_COMPILATION_CACHE_DIR``): the same tiny step compiled by many
    tests and ``jpeft`` subprocesses is compiled once. A cache hit is the executable the
    compiler would produce (the key covers the program, the flags and the versions).

  Either is left alone when the caller's environment already sets it; ``JPEFT_TEST_XLA=plain``
  runs the suite without both, as a user's process runs. A test that sets ``XLA_FLAGS`` for a
  subprocess (the emulated devices) appends to the inherited value. Benchmarks never use these
  settings.
"""

import os
import shutil
import tempfile

import pytest

_OPT_FLAG = "--xla_backend_optimization_level=0"
_CACHE_ENV = "JPEFT_TEST_JAX_CACHE"  # set by the first process (the controller); workers inherit it
_created_cache = None

if os.environ.get("JPEFT_TEST_XLA", "") != "plain":
    _flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in _flags:
        os.environ["XLA_FLAGS"] = f"{_flags} {_OPT_FLAG}".strip()
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        if _CACHE_ENV not in os.environ:
            _created_cache = os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="jpeft-test-jax-cache-")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ[_CACHE_ENV]
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_unconfigure(config):
    if _created_cache:
        shutil.rmtree(_created_cache, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _scratch_inside_pytest_basetemp(tmp_path_factory):
    scratch = str(tmp_path_factory.mktemp("tempfile"))
    old_dir, old_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir, os.environ["TMPDIR"] = scratch, scratch  # this process and its subprocesses
    yield
    tempfile.tempdir = old_dir
    if old_env is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = old_env
