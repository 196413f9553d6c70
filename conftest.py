"""Suite-wide set-up, loaded first by pytest in the controller and in each xdist worker.

* **Scratch files** stay inside pytest's own temporary folder (which pytest prunes to the last
  three runs): the doctests under jpeft/, the notebooks and the CLI subprocesses call
  ``tempfile.mkdtemp()`` as a user would, and without this each run left folders in /tmp.
* **Compile time.** The suite's models are tiny, so nearly all of its time is XLA compiling,
  not running. These settings cut it, and none changes the program XLA compiles (its HLO,
  fusions and buffer assignment, hence the memory statistics some tests read):

  - In ``XLA_FLAGS``, how the CPU backend turns that program into machine code:
    ``--xla_backend_optimization_level=0`` (LLVM's optimisation of the emitted code),
    ``--xla_cpu_use_fusion_emitters=false`` (fusions emitted by XLA's older elemental emitter
    instead of the MLIR fusion emitters) and ``--xla_cpu_parallel_codegen_split_count=1``
    (one LLVM module, not several compiled in parallel: the two xdist workers already use
    both cores). The code is less tuned, which a tiny model does not notice; values agree
    within the tests' float tolerances, not always bit for bit with a user's process.
    Measured on the 2-core AMD EPYC (Zen 3) VM, tests/test_scan.py, test_packing.py and
    test_models.py on two workers: 222 s with the first flag alone, 133 s with all three.
  - JAX's persistent compilation cache in one folder shared by the workers and every
    subprocess they start (``JAX_COMPILATION_CACHE_DIR``): the same tiny step compiled by many
    tests and ``jpeft`` subprocesses is compiled once. A cache hit is the executable the
    compiler would produce (the key covers the program, the flags and the versions).

  A flag already in the caller's ``XLA_FLAGS`` (and a cache folder already set) is left alone.
  XLA aborts a process whose ``XLA_FLAGS`` names a flag it does not know, so the controller
  first starts one ``python -c "import jax; jax.devices()"`` with the two newer flags and
  drops them if it fails (a jaxlib that renamed them). ``JPEFT_TEST_XLA=plain`` runs the
  suite with none of these settings, as a user's process runs. A test that sets ``XLA_FLAGS``
  for a subprocess (the emulated devices) appends to the inherited value. Benchmarks never
  use these settings.
"""

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

_OPT_FLAG = "--xla_backend_optimization_level=0"  # in every XLA release the suite supports
_CODEGEN_FLAGS = ("--xla_cpu_use_fusion_emitters=false", "--xla_cpu_parallel_codegen_split_count=1")
_CACHE_ENV = "JPEFT_TEST_JAX_CACHE"  # set by the first process (the controller); workers inherit it
_FLAGS_ENV = "JPEFT_TEST_XLA_FLAGS_SET"  # likewise: the controller has chosen XLA_FLAGS
_created_cache = None


def _flag_name(flag: str) -> str:
    return flag.lstrip("-").split("=")[0]


def _xla_accepts(flags: str) -> bool:
    """Whether a fresh process starts JAX's CPU backend with these ``XLA_FLAGS``."""
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    try:
        r = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env,
                           capture_output=True, timeout=300)
    except subprocess.TimeoutExpired:
        return False
    return r.returncode == 0


if os.environ.get("JPEFT_TEST_XLA", "") != "plain":
    if _FLAGS_ENV not in os.environ:
        _flags = os.environ.get("XLA_FLAGS", "")
        _add = [f for f in (_OPT_FLAG, *_CODEGEN_FLAGS) if _flag_name(f) not in _flags]
        _newer = [f for f in _add if f in _CODEGEN_FLAGS]
        if _newer and not _xla_accepts(" ".join([_flags, *_add]).strip()):
            _add = [f for f in _add if f not in _CODEGEN_FLAGS]
        os.environ["XLA_FLAGS"] = " ".join([_flags, *_add]).strip()
        os.environ[_FLAGS_ENV] = "1"
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
