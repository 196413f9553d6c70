"""The ``jpeft`` command: ``jpeft <subcommand> --help`` teaches each one.

Subcommands (each is a module of this package with ``add_parser`` and ``run``):

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
import argparse
import contextlib
import importlib
import os
import sys
import time
from typing import Optional, Sequence

from jpeft._version import __version__
from jpeft.errors import JpeftError

__all__ = ["main", "build_parser", "UsageError"]

_COMMANDS = ("demo", "train", "eval", "merge", "export", "info", "forgetting", "serve")

_EPILOG = """\
examples:
  jpeft demo                              # the 3-minute tour: PEFT against forgetting
  jpeft info llama-2-7b --method lora -r 8
  jpeft train --config config.toml        # see `jpeft train --help` for the file format
  jpeft export --model ./base --adapter runs/x/adapter --out ./peft-adapter

Run `jpeft <command> --help` for the options and an example of each command.
"""


class UsageError(Exception):
    """Bad command-line arguments: reported as one line with exit status 2."""

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage dump) and exit status 2."""

    def __init__(self, *a, **kw):
        kw.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*a, **kw)

    def error(self, message):  # noqa: D401 - argparse hook
        raise UsageError(self.prog, message)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (subcommand modules are imported lazily)."""
    parser = _Parser(
        prog="jpeft",
        description="jpeft: parameter-efficient fine-tuning for JAX/Flax, and tools to measure and "
        "prevent catastrophic forgetting.",
        epilog=_EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"jpeft {__version__}")
    sub = parser.add_subparsers(dest="cmd", metavar="<command>", parser_class=_Parser)
    for name in _COMMANDS:
        mod = importlib.import_module(f"jpeft.cli.{name}_cmd")
        p = mod.add_parser(sub)
        p.set_defaults(_run=mod.run, cmd=name)
    return parser


def one_line(msg: str) -> str:
    """Collapses a (possibly multi-line) message to one line."""
    parts = [s.strip() for s in str(msg).splitlines() if s.strip()]
    return " ".join(parts) if parts else "unknown error"


def _fail(prog: str, msg: str) -> int:
    print(f"{prog}: error: {one_line(msg)}", file=sys.stderr)
    return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the ``jpeft`` command line and returns its exit status (0 ok, 2 bad input,
    130 interrupted, 141 stdout closed).

    >>> main(["info", "no-such-model"])  # prints "jpeft info: error: ..." to stderr
    2
    """
    with _ctrl_c_never_swallowed():
        rc = _main(argv)
    _forget_caught_ctrl_c()
    return rc


@contextlib.contextmanager
def _ctrl_c_never_swallowed():
    """A Ctrl-C that lands while Python runs a callback whose exceptions it ignores (JAX's
    garbage-collection hook, a ``__del__``) would be printed as "Exception ignored" and lost,
    and the run would go on to exit 0. This delivers it to the main thread again, from a
    helper thread so that it arrives after the callback has returned (if it lands in such a
    callback again, it is delivered again)."""
    previous, active = sys.unraisablehook, [True]

    def hook(unraisable):
        if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
            _thread.start_new_thread(_interrupt_main_soon, (active,))
        else:
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous
        active[0] = False


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


def _interrupt_main_soon(active):
    time.sleep(0.01)
    if active[0]:
        _thread.interrupt_main()


def _main(argv: Optional[Sequence[str]]) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    except UsageError as e:
        return _fail(e.prog, f"{e} (see `{e.prog} --help`)")
    except KeyboardInterrupt:  # Ctrl-C while the subcommands are imported
        print("jpeft: interrupted", file=sys.stderr)
        return 130
    if extra:
        prog = f"jpeft {args.cmd}" if getattr(args, "cmd", None) else "jpeft"
        return _fail(prog, f"unrecognized arguments: {' '.join(extra)} (see `{prog} --help`)")
    if not getattr(args, "cmd", None):
        parser.print_help(sys.stderr)
        return 2
    prog = f"jpeft {args.cmd}"
    try:
        rc = args._run(args)
        sys.stdout.flush()  # a closed pipe (`jpeft info ... | head -3`) shows here, not at exit
    except BrokenPipeError:
        return _closed_stdout()
    except UsageError as e:
        return _fail(e.prog or prog, f"{e} (see `{e.prog or prog} --help`)")
    except JpeftError as e:
        return _fail(prog, f"{type(e).__name__}: {e}")
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except UnicodeDecodeError as e:  # a data or config file that is binary, or not UTF-8
        return _fail(prog, f"an input file is not UTF-8 text ({e.reason} at byte {e.start}); give a UTF-8 text file.")
    except RecursionError:  # JSON lines or TOML nested thousands of levels deep
        return _fail(prog, "an input file is nested too deeply to read (thousands of levels); it is not a jpeft input.")
    except OSError as e:  # the environment: a read-only or full disk, a missing permission
        return _fail(prog, f"{type(e).__name__}: {e}")
    return int(rc or 0)


def _closed_stdout() -> int:
    """The reader of our stdout went away (``| head``): stop quietly, as a command killed by
    SIGPIPE would, and keep Python from reporting the failed flush at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 141
