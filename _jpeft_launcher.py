"""The ``jpeft`` console script's entry point.

It lives outside the ``jpeft`` package because importing the package imports JAX (about a
second). It parses the command line first, with ``_jpeft_args`` (the standard library alone):
``--help``, ``--version``, a bad option or an unknown command end there without importing
JAX; only a command that runs imports jpeft. A Ctrl-C that interrupts an import half-way can surface as a traceback, as an
ImportError of some extension module, or be lost in a callback whose exceptions Python ignores
(after which the run would go on to exit 0). So while jpeft is imported, Ctrl-C only sets a
flag; once the import is done the command stops with one line and exit status 130, like any
other Ctrl-C of the command. Everything else is :func:`jpeft.cli.process_main`.

On Linux with glibc the command first re-executes itself with glibc malloc tunables
(``GLIBC_TUNABLES``, glibc 2.35 and later). XLA's CPU backend allocates each step's temporaries
afresh (one buffer, gigabytes for a deep model) and frees them at the end; glibc serves a buffer
that large with a fresh ``mmap``, so the kernel faults every page of it in, and zeroes it, on
every step. ``glibc.malloc.hugetlb=1`` makes those pages 2 MiB instead of 4 KiB; and, when the
process will run XLA on the CPU, ``arena_max=1``, ``mmap_max=0`` and a trim threshold it never
reaches keep the freed buffer in the heap, so the next step reuses it without a single fault
(docs/ARCHITECTURE.md "Host memory pages on the CPU"). ``JPEFT_KEEP_FREED_MEMORY=0`` keeps only
the huge pages (the heap can fragment: full fine-tuning's peak measured 43% higher with it);
``JPEFT_HUGE_PAGES=0`` turns all of this off; a tunable the user already set in
``GLIBC_TUNABLES`` is kept as it is. SIGINT is blocked across the re-execution (a blocked signal
stays pending through ``execve``) and unblocked once the flag handler is in place, so no Ctrl-C
is lost or turned into a traceback.
"""

import os
import platform
import signal
import sys

HUGE_PAGES = "glibc.malloc.hugetlb=1"
# Keep freed memory in one heap instead of returning it to the kernel: every step's temporaries
# are then reused, never faulted in again (a threshold of 2**60 bytes is never reached).
KEEP_FREED_MEMORY = ("glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0",
                     f"glibc.malloc.trim_threshold={2 ** 60}")
# JAX plugins that put XLA on an accelerator (the host then holds no step temporaries)
ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin", "libtpu")


def runs_on_cpu(env=None) -> bool:
    """Whether JAX in a process with environment ``env`` will run on the CPU: ``JAX_PLATFORMS``
    names ``cpu`` first, or is unset and no accelerator plugin is installed (looked up, not
    imported)."""
    import importlib.util

    env = os.environ if env is None else env
    platforms = env.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(importlib.util.find_spec(name) for name in ACCELERATOR_PLUGINS)


def huge_pages_env(env=None, keep_freed_memory=None) -> dict:
    """``env`` (default: this process's environment) with the ``jpeft`` command's glibc malloc
    tunables added to ``GLIBC_TUNABLES``: transparent huge pages, and (``keep_freed_memory``;
    default: :func:`runs_on_cpu`, unless ``JPEFT_KEEP_FREED_MEMORY=0``) freed memory kept for
    reuse. A tunable the user already names is left as set; other tunables are kept. For
    launching JAX CPU training processes: ``subprocess.run(cmd, env=huge_pages_env())``."""
    env = dict(os.environ if env is None else env)
    if keep_freed_memory is None:
        keep_freed_memory = env.get("JPEFT_KEEP_FREED_MEMORY", "1") != "0" and runs_on_cpu(env)
    current = env.get("GLIBC_TUNABLES", "")
    named = {t.split("=", 1)[0] for t in current.split(":") if t}
    wanted = (HUGE_PAGES,) + (KEEP_FREED_MEMORY if keep_freed_memory else ())
    added = [t for t in wanted if t.split("=", 1)[0] not in named]
    if added:
        env["GLIBC_TUNABLES"] = ":".join(([current] if current else []) + added)
    return env


def _reexec_env():
    """The environment to re-execute with, or ``None`` to run as is."""
    if not sys.platform.startswith("linux") or os.environ.get("JPEFT_HUGE_PAGES", "1") == "0":
        return None
    if platform.libc_ver()[0] != "glibc":
        return None
    env = huge_pages_env()
    if env.get("GLIBC_TUNABLES", "") == os.environ.get("GLIBC_TUNABLES", ""):
        return None  # every tunable already as wanted (or set by the user): no re-execution
    return env


def main() -> int:
    # SIGINT blocked from here until the flag handler is in place (across the re-execution too):
    # a Ctrl-C meanwhile stays pending and lands in the handler below
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    env = _reexec_env()
    if env is not None:
        try:
            safe_path = ["-P"] if sys.version_info >= (3, 11) else []  # no working directory on sys.path
            os.execve(sys.executable, [sys.executable, *safe_path, "-m", "_jpeft_launcher", *sys.argv[1:]], env)
        except OSError:  # run without the tunables rather than not at all
            pass
    pressed = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # a Ctrl-C pending from before the exec lands here
    try:
        from _jpeft_args import parse_command_line

        args, status = parse_command_line()  # --help and --version print and exit here
        if args is not None and not pressed:
            from jpeft.cli import process_main as run  # parses the command line again (a millisecond)
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed:
        print("jpeft: interrupted", file=sys.stderr)
        return 130
    if args is None:
        return status
    return run()


if __name__ == "__main__":
    sys.exit(main())
