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
subprocess then compiled jax, torch and transformers from source, 2.5 CPU-s more.)

Each test module starts on a frozen heap: before its first test (and its module fixtures), the
test process collects its garbage once and ``gc.freeze()``s what is left (the imported modules,
every test module collected, JAX's caches, session fixtures), so no later collection walks those
objects again. A worker holds ~860k of them once the suite is collected and more as it runs, and
each full collection walked them all (0.45 CPU-s right after collection, more later): Python's
own, and the explicit ``gc.collect()`` after every failed checkpoint restore (jpeft.checkpoint),
each ``Trainer.train`` (accelerate) and hypothesis' ``register_random``. Objects alive at a
module's start are kept until the process ends even if they become cyclic garbage later;
reference counting still frees the rest, and nothing a test creates is frozen before its module
ends. Time only: no test's numbers change."""

import gc
import os
import sys

import pytest

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


_frozen_for = [None]  # the file (test module or doctests) whose first test froze the heap


@pytest.hookimpl(tryfirst=True)  # before the module's fixtures are built
def pytest_runtest_setup(item):
    if _frozen_for[0] != item.path:
        _frozen_for[0] = item.path
        gc.collect()  # the previous module's garbage (its fixtures are torn down) is not kept
        gc.freeze()
    torch = sys.modules.get("torch")  # imported by the tests that use it, never here
    if torch is not None and torch.get_num_threads() != 1:
        torch.set_num_threads(1)
