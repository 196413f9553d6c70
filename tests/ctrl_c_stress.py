"""Ctrl-C at random moments of `jpeft train`'s start-up, many times (docs/RELIABILITY.md).

Not part of the suite (its name does not start with ``test_``; 200 runs take ~12-15 minutes on a
2-core machine); run it by name::

    CTRL_C_RUNS=200 CTRL_C_FROM=1.9 CTRL_C_TO=3.0 python -m pytest -n0 tests/ctrl_c_stress.py

Each run starts the console script's entry point as `test_ctrl_c_at_any_moment_of_start_up...`
does, sends SIGINT a random 1.9-3.0 s (``CTRL_C_FROM``/``CTRL_C_TO``) after the launcher's code
started, and expects status 130, one last line saying "interrupted", no traceback, and an end
within 40 s (status None otherwise). Every run is printed; the test fails listing the runs that did not.
"""

from __future__ import annotations

import os
import random

from tests.test_cli_hardening import endless_train_config, folder, interrupt_train  # noqa: F401 - the fixture


def test_ctrl_c_at_random_moments_of_start_up(folder):  # noqa: F811
    cfg = endless_train_config(folder)
    runs, lo, hi = int(os.environ.get("CTRL_C_RUNS", "20")), float(os.environ.get("CTRL_C_FROM", "1.9")), \
        float(os.environ.get("CTRL_C_TO", "3.0"))
    rng = random.Random(int(os.environ.get("CTRL_C_SEED", "0")))
    bad = []
    for i in range(runs):
        delay = rng.uniform(lo, hi)
        status, err = interrupt_train(folder, cfg, delay, timeout=40)
        last = (err.strip().splitlines() or [""])[-1]
        ok = status == 130 and "interrupted" in last and "Traceback" not in err
        print(f"run {i}: SIGINT after {delay:.2f} s: status {status}, last line {last!r}", flush=True)
        if not ok:
            bad.append((i, round(delay, 2), status, err[-2000:]))
    assert not bad, f"{len(bad)} of {runs} runs did not end with status 130 and one line: {bad}"
