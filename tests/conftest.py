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
into their ``__pycache__`` folders (git-ignored), which every process reads as usual. (Not into a
``PYTHONPYCACHEPREFIX``: a prefix moves where *every* module's bytecode is looked for, so each
subprocess then compiled jax, torch and transformers from source, 2.5 CPU-s more.)"""

import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

# Helper scripts run in subprocesses (multi-device, multi-process, crash tests): never
# import them while collecting (pytest runs with --doctest-modules).
collect_ignore_glob = ["helpers/*", "_*.py"]


def pytest_configure(config):
    if hasattr(config, "workerinput") or not sys.dont_write_bytecode:
        return  # an xdist worker (the controller did it), or bytecode written on first import as usual
    import compileall

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for sub in ("jpeft", "benchmarks", "tests"):
        compileall.compile_dir(os.path.join(root, sub), quiet=2)  # a read-only checkout: compiled as before


def pytest_runtest_setup(item):
    torch = sys.modules.get("torch")  # imported by the tests that use it, never here
    if torch is not None and torch.get_num_threads() != 1:
        torch.set_num_threads(1)
