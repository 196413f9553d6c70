"""Strict JAX flags for the whole suite (as equinox does): implicit rank promotion raises.

Strict dtype promotion is not used: optax's Adam mixes int and float internally.

PyTorch (the reference models) runs on one intra-op thread in each test process (set before each
test once a test module has imported torch; this file does not import it): its default,
one thread per core, puts an OpenMP team of two behind every tiny ``linear`` on the 2-core CI
host, where the two xdist workers already use both cores, and the team's spin-waits cost far
more than the product (docs/ARCHITECTURE.md, "The test suite's compile time").

Where Python writes no bytecode (``PYTHONDONTWRITEBYTECODE``, set on the CI host), each of the
suite's few hundred Python subprocesses (``jpeft`` commands, multi-device and benchmark workers)
compiled jpeft's modules from source again (0.2 CPU-s each): the controller compiles them once
into a temporary ``PYTHONPYCACHEPREFIX`` that the workers and their subprocesses inherit and
read, leaving the checkout untouched, and removes it at the end."""

import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

# Helper scripts run in subprocesses (multi-device, multi-process, crash tests): never
# import them while collecting (pytest runs with --doctest-modules).
collect_ignore_glob = ["helpers/*", "_*.py"]


_PYCACHE = None  # the controller's temporary bytecode folder (pytest_configure)


def pytest_configure(config):
    global _PYCACHE
    if hasattr(config, "workerinput") or not sys.dont_write_bytecode or os.environ.get("PYTHONPYCACHEPREFIX"):
        return  # an xdist worker (the controller did it), bytecode written as usual, or a prefix chosen already
    import compileall
    import tempfile

    _PYCACHE = tempfile.mkdtemp(prefix="jpeft-test-pycache-")
    os.environ["PYTHONPYCACHEPREFIX"] = _PYCACHE  # read by the workers xdist starts next, and by their subprocesses
    sys.pycache_prefix = _PYCACHE
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for sub in ("jpeft", "benchmarks", "tests"):
        compileall.compile_dir(os.path.join(root, sub), quiet=2)


def pytest_unconfigure(config):
    if _PYCACHE is not None:
        import shutil

        shutil.rmtree(_PYCACHE, ignore_errors=True)


def pytest_runtest_setup(item):
    torch = sys.modules.get("torch")  # imported by the tests that use it, never here
    if torch is not None and torch.get_num_threads() != 1:
        torch.set_num_threads(1)
