"""Ctrl-C at random moments of `jpeft train`'s start-up, many times (docs/RELIABILITY.md).

Not part of the suite (its name does not start with ``test_``; 200 runs take ~18 minutes on a
2-core machine); run it by name::

    CTRL_C_RUNS=200 CTRL_C_FROM=1.9 CTRL_C_TO=3.0 python -m pytest -n0 tests/ctrl_c_stress.py

Each run starts the console script's entry point as `test_ctrl_c_at_any_moment_of_start_up...`
does, sends SIGINT a random 1.9-3.0 s (``CTRL_C_FROM``/``CTRL_C_TO``) after the launcher's code
started, and expects status 130, one last line saying "interrupted", no traceback, and an end
within 40 s. Every run is printed; the test fails listing the runs that did not.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time

from tests.test_cli_hardening import ENV, _wait_for_the_launcher, config, folder  # noqa: F401 - the fixture


def test_ctrl_c_at_random_moments_of_start_up(folder):  # noqa: F811
    cfg = config(folder, extra_train="log_every = 1", top="")
    cfg.write_text(cfg.read_text().replace("steps = 2", "steps = 100000"))
    launcher = [sys.executable, "-c", "import sys, _jpeft_launcher; sys.exit(_jpeft_launcher.main())"]
    runs, lo, hi = int(os.environ.get("CTRL_C_RUNS", "20")), float(os.environ.get("CTRL_C_FROM", "1.9")), \
        float(os.environ.get("CTRL_C_TO", "3.0"))
    rng = random.Random(int(os.environ.get("CTRL_C_SEED", "0")))
    bad = []
    for i in range(runs):
        delay = rng.uniform(lo, hi)
        shutil.rmtree(folder / "out", ignore_errors=True)
        p = subprocess.Popen([*launcher, "train", "--config", str(cfg), "--no-progress"], cwd=folder, env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        _wait_for_the_launcher(p)
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        try:
            _, err = p.communicate(timeout=40)
            status = p.returncode
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
            status = "no end within 40 s"
        last = (err.strip().splitlines() or [""])[-1]
        ok = status == 130 and "interrupted" in last and "Traceback" not in err
        print(f"run {i}: SIGINT after {delay:.2f} s: status {status}, last line {last!r}", flush=True)
        if not ok:
            bad.append((i, round(delay, 2), status, err[-2000:]))
    assert not bad, f"{len(bad)} of {runs} runs did not end with status 130 and one line: {bad}"
