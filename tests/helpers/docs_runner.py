"""Runs the code blocks of the docs, for tests/test_docs.py, in one process (JAX is imported
once): ``python docs_runner.py BLOCKS_JSON RESULTS_JSON``, in the working folder the test
prepared.

BLOCKS_JSON is a list of ``{"doc", "line", "lang", "code", "write", "append"}`` in document
order. Python blocks of one document share one namespace, like the cells of a notebook.
Shell blocks run line by line: ``jpeft ...`` through :func:`jpeft.cli.main` (the console
script's code), ``python -m MODULE ...`` through :mod:`runpy`; any other command is an error
(mark the block ``<!-- docs-test: skip REASON -->``). ``write`` saves the block's text under
that file name instead of running it. After the first failure in a document, its later blocks
are not run (they usually build on it). RESULTS_JSON gets
``{doc: [{"line", "ok", "error", "seconds"}]}``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import runpy
import shlex
import sys
import time
import traceback


def shell_commands(code: str) -> list[list[str]]:
    """The commands of a shell block: continuation lines joined, comments and blanks dropped."""
    text = code.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        argv = shlex.split(line, comments=True)
        if argv:
            out.append(argv)
    return out


def run_shell(argv: list[str], append: list[str]) -> None:
    from jpeft.cli import main

    if argv[0] == "jpeft":
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main(argv[1:] + append)
        if rc != 0:
            raise RuntimeError(f"`{shlex.join(argv + append)}` exited with {rc}: {err.getvalue().strip()[-2000:]}")
        return
    if argv[0] in ("python", "python3") and len(argv) > 2 and argv[1] == "-m":
        saved = sys.argv
        sys.argv = [argv[2], *argv[3:], *append]
        try:
            runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
        except SystemExit as e:
            if e.code not in (None, 0):
                raise RuntimeError(f"`{shlex.join(argv)}` exited with {e.code}") from None
        finally:
            sys.argv = saved
        return
    raise RuntimeError(f"the docs test runs `jpeft ...` and `python -m ...` commands only, found `{shlex.join(argv)}`; "
                       "mark the block <!-- docs-test: skip REASON --> if it cannot run here.")


def main(blocks_path: str, results_path: str) -> int:
    with open(blocks_path) as f:
        blocks = json.load(f)
    results: dict[str, list] = {}
    namespaces: dict[str, dict] = {}
    failed: set[str] = set()
    for b in blocks:
        doc = b["doc"]
        res = results.setdefault(doc, [])
        if doc in failed:
            res.append({"line": b["line"], "ok": False, "error": "not run: an earlier block of this document failed"})
            continue
        t0 = time.perf_counter()
        try:
            if b.get("write"):
                with open(b["write"], "w") as f:
                    f.write(b["code"])
            elif b["lang"] == "python":
                ns = namespaces.setdefault(doc, {"__name__": "__docs__"})
                exec(compile(b["code"], f"{doc}:{b['line']}", "exec"), ns)
            else:
                for argv in shell_commands(b["code"]):
                    run_shell(argv, shlex.split(b.get("append") or ""))
            res.append({"line": b["line"], "ok": True, "error": None, "seconds": round(time.perf_counter() - t0, 2)})
        except BaseException as e:  # noqa: BLE001 - every failure is reported with its block
            failed.add(doc)
            tb = "".join(traceback.format_exception(type(e), e, e.__traceback__)[-6:])
            res.append({"line": b["line"], "ok": False, "error": tb[-3000:]})
        sys.stdout.flush()
    with open(results_path, "w") as f:
        json.dump(results, f)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    raise SystemExit(main(sys.argv[1], sys.argv[2]))
