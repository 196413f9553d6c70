"""The ``jpeft`` console script's entry point.

It lives outside the ``jpeft`` package because importing the package imports JAX (about a
second). A Ctrl-C that interrupts an import half-way can surface as a traceback, as an
ImportError of some extension module, or be lost in a callback whose exceptions Python ignores
(after which the run would go on to exit 0). So while jpeft is imported, Ctrl-C only sets a
flag; once the import is done the command stops with one line and exit status 130, like any
other Ctrl-C of the command. Everything else is :func:`jpeft.cli.main`.
"""

import signal
import sys


def main() -> int:
    pressed = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
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
