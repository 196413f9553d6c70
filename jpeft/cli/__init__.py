"""The ``jpeft`` command: ``jpeft <subcommand> --help`` teaches each one.

Subcommands (each is a module of this package with ``run``; its options, ``add_parser``, are defined in
``_jpeft_args.py`` next to the package, so that the console script parses a command line without
importing JAX):

====================  ==============================================================
``jpeft demo``        PEFT against forgetting in minutes, on a CPU, with no downloads
``jpeft train``       fine-tune a local Hugging Face model folder from a TOML config
``jpeft eval``        loss and perplexity of a model (plus adapter) on a dataset
``jpeft merge``       fold an adapter into the base and save a Hugging Face folder
``jpeft export``      write an adapter in the Hugging Face PEFT format
``jpeft info``        parameter budget of a method on a model, computed without allocating
``jpeft forgetting``  the catastrophic-forgetting experiment runner
``jpeft serve``       an OpenAI-compatible server: one base, many LoRA adapters
====================  ==============================================================

Bad arguments or inputs end with one line ``jpeft <cmd>: error: ...`` on stderr and exit
status 2; no traceback. That covers jpeft's named errors and what the environment or a
hostile input raises: a file that is not UTF-8, JSON or TOML nested thousands of levels
deep, a read-only or full disk (``OSError``). Ctrl-C exits with status 130 and one line; a
closed stdout (``jpeft info ... | head -3``) ends quietly with status 141, as SIGPIPE would. :func:`main` returns the exit status instead of exiting, so it can
be called from Python (``jpeft.cli.main(["info", "llama-2-7b"])``).
"""

from __future__ import annotations

import _thread
import contextlib
import os
import signal
import sys
import threading
import time
import traceback
import warnings
import weakref
from typing import Optional, Sequence

from _jpeft_args import UsageError, build_parser, one_line, parse_command_line
from _jpeft_args import fail as _fail
from jpeft.cli import _model, demo_cmd, eval_cmd, export_cmd, forgetting_cmd, info_cmd, merge_cmd, serve_cmd, train_cmd
from jpeft.errors import JpeftError

__all__ = ["main", "process_main", "build_parser", "UsageError"]

# each command's module, whose run(args) runs it; its options are defined in _jpeft_args (the standard
# library only), which the console script parses the command line with before it imports jpeft
_MODULES = {"demo": demo_cmd, "train": train_cmd, "eval": eval_cmd, "merge": merge_cmd, "export": export_cmd,
            "info": info_cmd, "forgetting": forgetting_cmd, "serve": serve_cmd}


_JPEFT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _origin(filename: str) -> str:
    """The package a warning's source file belongs to (``transformers``, ``jax``), else its name."""
    parts = os.path.abspath(filename or "?").split(os.sep)
    for i, part in enumerate(parts[:-1]):
        if part in ("site-packages", "dist-packages"):
            return parts[i + 1].removesuffix(".py")
    return os.path.basename(filename or "?").removesuffix(".py")


@contextlib.contextmanager
def _warnings_as_lines(prog: str):
    """Prints each warning shown while a command runs as one line, as its errors are:
    ``jpeft train: warning: <message>``, not Python's ``/path/file.py:123: UserWarning: ...``
    with the source line under it. A warning from outside jpeft names its category and package
    (``jpeft eval: warning: FutureWarning from transformers: ...``). Only how a shown warning
    is written changes (``warnings.formatwarning``, restored after the command), and one filter
    is added while it runs: jpeft's own :class:`DeprecationWarning` (a former option name in a
    ``[method]`` table or a ``--set``, LoRA's ``init``), which Python shows only when raised from
    ``__main__``, is shown, once. A program or test that records warnings
    (``warnings.catch_warnings(record=True)``, ``pytest.warns``) still records those shown, and
    jpeft's Python functions called outside :func:`main` warn as Python does."""
    def line(message, category, filename, lineno, line=None):
        here = os.path.abspath(filename or "?").startswith(_JPEFT_DIR + os.sep)
        origin = "" if here else f"{category.__name__} from {_origin(filename)}: "
        return f"{prog}: warning: {origin}{one_line(message)}\n"

    previous = warnings.formatwarning
    warnings.formatwarning = line
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("default", category=DeprecationWarning, module=r"jpeft(\.|$)")
            yield
    finally:
        if warnings.formatwarning is line:
            warnings.formatwarning = previous


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the ``jpeft`` command line and returns its exit status (0 ok, 2 bad input,
    130 interrupted, 141 stdout closed).

    >>> main(["info", "no-such-model"])  # prints "jpeft info: error: ..." to stderr
    2
    """
    with _ctrl_c_never_lost() as ctrl_c:
        rc = _main(argv, ctrl_c)
    if rc == 130:  # interrupted, however it was handled
        _cancel_timers_left_running()
    _forget_caught_ctrl_c()
    return rc


def process_main(argv: Optional[Sequence[str]] = None) -> int:
    """:func:`main` in a process that runs the ``jpeft`` command alone: the console script and
    ``python -m jpeft.cli``. Such a process reads tokenizers with transformers imported without
    torch (:func:`jpeft.cli._model.import_transformers_without_torch`: 2.4 s less CPU at the
    start of every command that reads one); :func:`main` leaves the calling program's imports
    as they are."""
    _model.OWN_PROCESS = True
    return main(argv)


class _CtrlC(KeyboardInterrupt):
    """The KeyboardInterrupt a Ctrl-C raises while :func:`main` runs (its own class only so
    that :func:`_ctrl_c_never_lost` can tell when it is gone)."""


@contextlib.contextmanager
def _ctrl_c_never_lost():
    """Delivers a Ctrl-C again when something swallowed its KeyboardInterrupt.

    Python raises a Ctrl-C's KeyboardInterrupt wherever the main thread is. Where that is a
    callback whose exceptions Python ignores (JAX's garbage-collection hook, a ``__del__``) it
    was printed as "Exception ignored" and lost; where it is code that discards errors (a C
    extension clearing them, an ``except BaseException`` that goes on) it was lost silently; the
    run then trained on and exited 0. While this is active, SIGINT raises a KeyboardInterrupt
    (:class:`_CtrlC`) that is watched with a weak reference: when it is freed before the
    command's own ``except`` has handled it (``state["handled"]``), it was swallowed, and a
    helper thread delivers the Ctrl-C to the main thread again, so that it arrives after the
    code that swallowed it has returned (to whatever SIGINT handler is current then: this one,
    or :func:`jpeft.fit`'s, which saves and stops). A KeyboardInterrupt raised some other way
    that ends in an ignoring callback is delivered again too. The handler is installed only in
    the main thread over Python's default one (not over an embedding program's own)."""

    state, watched, previous = {"active": True, "handled": False}, set(), sys.unraisablehook

    def gone(ref):
        watched.discard(ref)
        if state["active"] and not state["handled"]:
            _thread.start_new_thread(_interrupt_main_soon, (state,))

    def watch(interrupt):
        watched.add(weakref.ref(interrupt, gone))
        return interrupt

    def on_sigint(signum, frame):
        raise watch(_CtrlC())  # no local name for it: this frame, in its traceback, must not keep it alive

    def hook(unraisable):
        if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
            if not isinstance(unraisable.exc_value, _CtrlC):  # ours are delivered again once freed
                _thread.start_new_thread(_interrupt_main_soon, (state,))
        else:
            previous(unraisable)

    ours = threading.current_thread() is threading.main_thread() and \
        signal.getsignal(signal.SIGINT) is signal.default_int_handler
    sys.unraisablehook = hook
    if ours:
        signal.signal(signal.SIGINT, on_sigint)
    try:
        yield state
    finally:
        if ours and signal.getsignal(signal.SIGINT) is on_sigint:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.unraisablehook = previous
        state["active"] = False


def _cancel_timers_left_running():
    """Cancels the ``threading.Timer`` threads still waiting after a Ctrl-C stopped the command.

    Code that starts a timer and cancels it in a ``finally`` never cancels it when the
    interrupt lands in between: JAX's backend start-up runs a 60 s timer (a warning that TPU
    start-up is slow) around the client's creation, and a Ctrl-C there left it running. Python
    waits for such threads before it exits, so the command printed "interrupted" and then hung
    for a minute. After a Ctrl-C nothing they would do is wanted."""

    for t in threading.enumerate():
        if isinstance(t, threading.Timer) and t.is_alive():
            t.cancel()


def _forget_caught_ctrl_c():
    """Keeps a caught Ctrl-C from ending the process by SIGINT instead of the returned status.

    CPython notes a KeyboardInterrupt that leaves the evaluation of source text
    (``exec``/``eval`` of a string, e.g. a ``dataclass``'s generated ``__init__`` while a module
    is imported), even one caught further up, and a ``python -m`` run (the ``jpeft`` command
    re-executes itself as ``python -m _jpeft_launcher``; ``python -m jpeft.cli``) then ends
    killed by SIGINT, not with status 130 (CPython's ``Py_RunMain``; a script file exits through
    ``Py_Exit`` and never looks). Every evaluation of source text clears that note as it starts,
    so one empty one here forgets the interrupt this function's caller has already handled."""
    exec("")


def _from_ctrl_c(e: BaseException) -> bool:
    """Whether ``e`` was raised because of a KeyboardInterrupt (its cause or context, at any
    depth): a Ctrl-C that lands while a C extension module initialises (orbax's tensorstore, imported
    when the first checkpoint is made) surfaces as that module's ``ImportError: initialization
    failed``, raised from the interrupt."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def _interrupt_main_soon(state):
    time.sleep(0.01)
    if state["active"] and not state["handled"]:
        _thread.interrupt_main()


def _main(argv: Optional[Sequence[str]], ctrl_c: dict) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        args, status = parse_command_line(argv)
    except KeyboardInterrupt:  # Ctrl-C while the command line is parsed
        ctrl_c["handled"] = True
        print("jpeft: interrupted", file=sys.stderr)
        return 130
    if args is None:
        return status
    prog = f"jpeft {args.cmd}"
    try:
        with _warnings_as_lines(prog):
            rc = _MODULES[args.cmd].run(args)
        sys.stdout.flush()  # a closed pipe (`jpeft info ... | head -3`) shows here, not at exit
    except BrokenPipeError:
        return _closed_stdout()
    except UsageError as e:
        return _fail(e.prog or prog, f"{e} (see `{e.prog or prog} --help`)")
    except JpeftError as e:
        return _end(prog, 2, f"{type(e).__name__}: {e}")
    except KeyboardInterrupt:
        ctrl_c["handled"] = True
        return _end(prog, 130, None)
    except UnicodeDecodeError as e:  # a data or config file that is binary, or not UTF-8
        return _end(prog, 2, f"an input file is not UTF-8 text ({e.reason} at byte {e.start}); give a UTF-8 text file.")
    except RecursionError:  # JSON lines or TOML nested thousands of levels deep
        return _end(prog, 2, "an input file is nested too deeply to read (thousands of levels); it is not a jpeft input.")
    except OSError as e:  # the environment: a read-only or full disk, a missing permission
        return _end(prog, 2, f"{type(e).__name__}: {e}")
    except Exception as e:  # a bug, or a collective operation that failed: alone in a job, the others would wait
        if _from_ctrl_c(e):  # a Ctrl-C inside a C extension's import (tensorstore's): "ImportError: initialization failed"
            ctrl_c["handled"] = True
            return _end(prog, 130, None)
        if _job() is None:
            raise
        return _end(prog, *_unexpected(e))
    return int(rc or 0)


def _job():
    """``jpeft.distributed`` when this process is one of several joined through it, else ``None``."""
    distributed = sys.modules.get("jpeft.distributed")  # not imported: no jax.distributed job either
    return distributed if distributed is not None and distributed.coordination_client() is not None else None


def _end(prog: str, status: int, msg: Optional[str]) -> int:
    """Prints the one line of a command that stops with ``msg`` (``None``: interrupted) and
    returns ``status``; in a multi-process job, ends this process at once instead.

    A process of a ``jax.distributed`` job that stops with an error of its own (a failed write
    on process 0, a bad file on one host) or an interrupt the others did not get (a second
    Ctrl-C or SIGTERM aborts without the stop every process agrees on; see :func:`jpeft.fit`)
    leaves the others waiting in the collective operations of a step this one left, and
    Python's exit would wait for them in ``jax.distributed``'s shutdown, for minutes. It tells
    them why through JAX's coordination service and ends at once
    (:func:`jpeft.distributed.leave_job_now`); each of the others then ends within seconds with
    one line naming it (:func:`jpeft.distributed.watch_for_failures`). When that helper is
    already ending this process for another's failure, this one's own error is a consequence
    of it and is not printed."""
    job = _job()
    if job is not None and not job.claim_exit():
        time.sleep(60)  # the helper thread prints the other process's failure and ends this process
    if msg is None:
        print(f"{prog}: interrupted", file=sys.stderr)
    else:
        _fail(prog, msg)
    if job is not None:
        job.leave_job_now(status, "interrupted (Ctrl-C or SIGTERM)" if msg is None else one_line(msg))
    return status


def _unexpected(e: Exception):
    """The exit status and error line of an unexpected error in a multi-process job: an
    operation across processes that failed because another process left the job (announced, or
    killed without a word) reads as that, in one line (status 2); anything else is a bug, whose
    traceback is printed here before its line (status 1)."""
    job = _job()
    seen = job.another_process_failed()
    if seen is not None:
        return 2, f"DistributedError: {seen}"
    if type(e).__name__ == "JaxRuntimeError" and job.lost_peer(e):
        return 2, (f"DistributedError: an operation across the processes of this job failed ({one_line(e)[:200]}): "
                   "another process left the job (killed, crashed, or stopped by an error: see its output); this "
                   "process stops too. Start every process again (with --resume to continue from the last checkpoint).")

    traceback.print_exc()
    return 1, f"{type(e).__name__}: {e}"


def _closed_stdout() -> int:
    """The reader of our stdout went away (``| head``): stop quietly, as a command killed by
    SIGPIPE would, and keep Python from reporting the failed flush at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 141
