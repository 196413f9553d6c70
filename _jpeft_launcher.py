"""The ``jpeft`` console script's entry point.

It lives outside the ``jpeft`` package because importing the package imports JAX (about a
second). A Ctrl-C that interrupts an import half-way can surface as a traceback, as an
ImportError of some extension module, or be lost in a callback whose exceptions Python ignores
(after which the run would go on to exit 0). So while jpeft is imported, Ctrl-C only sets a
flag; once the import is done the command stops with one line and exit status 130, like any
other Ctrl-C of the command. Everything else is :func:`jpeft.cli.main`.

On Linux with glibc the command first re-executes itself with glibc's transparent-huge-page
tunable (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, glibc 2.35 and later): XLA's CPU backend
allocates each step's temporaries afresh, and with 4 KiB pages the kernel faults every page of
them in (and zeroes it) on every step, about a fifth of a CPU training step's time; with huge
pages that cost mostly goes (docs/ARCHITECTURE.md "Host memory pages on the CPU"). ``JPEFT_HUGE_PAGES=0``
turns this off; a ``GLIBC_TUNABLES`` that already sets ``glibc.malloc.hugetlb`` is kept as it
is. SIGINT is blocked across the re-execution (a blocked signal stays pending through
``execve``) and unblocked once the flag handler is in place, so no Ctrl-C is lost or turned
into a traceback.
"""

import os
import platform
import signal
import sys

HUGE_PAGES = "glibc.malloc.hugetlb=1"


def huge_pages_env(env=None) -> dict:
    """``env`` (default: this process's environment) with glibc's transparent-huge-page malloc
    tunable added to ``GLIBC_TUNABLES`` (other tunables kept). For launching JAX CPU training
    processes: ``subprocess.run(cmd, env=huge_pages_env())``."""
    env = dict(os.environ if env is None else env)
    current = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" not in current:
        env["GLIBC_TUNABLES"] = f"{current}:{HUGE_PAGES}" if current else HUGE_PAGES
    return env


def _reexec_env():
    """The environment to re-execute with, or ``None`` to run as is."""
    if not sys.platform.startswith("linux") or os.environ.get("JPEFT_HUGE_PAGES", "1") == "0":
        return None
    if "glibc.malloc.hugetlb" in os.environ.get("GLIBC_TUNABLES", ""):
        return None
    if platform.libc_ver()[0] != "glibc":
        return None
    return huge_pages_env()


def main() -> int:
    env = _reexec_env()
    if env is not None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            safe_path = ["-P"] if sys.version_info >= (3, 11) else []  # no working directory on sys.path
            os.execve(sys.executable, [sys.executable, *safe_path, "-m", "_jpeft_launcher", *sys.argv[1:]], env)
        except OSError:  # run without huge pages rather than not at all
            pass
    pressed = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # a Ctrl-C pending from before the exec lands here
    try:
        from jpeft.cli import main as run
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed:
        print("jpeft: interrupted", file=sys.stderr)
        return 130
    return run()


if __name__ == "__main__":
    sys.exit(main())
