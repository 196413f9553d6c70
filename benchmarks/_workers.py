"""Starting benchmark worker processes and talking to them (one JSON line each way)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any, Callable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))


class WorkerError(RuntimeError):
    pass


class Worker:
    """A worker subprocess: ``python benchmarks/<script> <args>``; stdout carries JSON lines,
    stderr goes to ``log_path``."""

    def __init__(self, script: str, args: list[str], log_path: str, env: dict[str, str] | None = None):
        self.log_path = log_path
        self.log = open(log_path, "w")
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        full_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        self.cmd = [sys.executable, os.path.join(HERE, script)] + list(args)
        self.proc = subprocess.Popen(
            self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=full_env, bufsize=1
        )

    def read(self, expect: str | None = None) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise WorkerError(
                f"worker {' '.join(self.cmd[1:])} exited with code {self.proc.returncode} before answering; "
                f"last lines of its log {self.log_path}:\n{tail(self.log_path)}"
            )
        msg = json.loads(line)
        if expect is not None and msg.get("event") != expect:
            raise WorkerError(f"expected a {expect!r} message from {self.cmd[1]}, got {msg}")
        return msg

    def send(self, cmd: str, **kw) -> None:
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()

    def ask(self, cmd: str, expect: str | None = None, **kw) -> dict[str, Any]:
        self.send(cmd, **kw)
        return self.read(expect)

    def finish(self) -> dict[str, Any]:
        out = self.ask("done", expect="done")
        self.proc.stdin.close()
        self.proc.wait(timeout=120)
        self.log.close()
        return out

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@contextlib.contextmanager
def work_folder(given: Optional[str], prefix: str, log: Callable[[str], Any]):
    """The folder the workers write their models and logs to: ``given`` (kept), else a temporary
    one removed at the end; a :class:`WorkerError` inside is logged and exits with status 2."""
    workdir = given or tempfile.mkdtemp(prefix=prefix)
    os.makedirs(workdir, exist_ok=True)
    try:
        yield workdir
    except WorkerError as e:
        log(f"error: {e}")
        raise SystemExit(2)
    finally:
        if not given:
            shutil.rmtree(workdir, ignore_errors=True)


def run_once(script: str, args: list[str], log_path: str, env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Runs a worker that needs no commands to completion; returns all its JSON messages."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with open(log_path, "w") as log:
        p = subprocess.run([sys.executable, os.path.join(HERE, script)] + args, stdout=subprocess.PIPE, stderr=log,
                           stdin=subprocess.DEVNULL, text=True, env=full_env)
    msgs = [json.loads(x) for x in p.stdout.splitlines() if x.strip()]
    if p.returncode != 0:
        raise WorkerError(f"{script} {' '.join(args)} failed with code {p.returncode}; last lines of {log_path}:\n"
                          f"{tail(log_path)}")
    return msgs


def tail(path: str, n: int = 25) -> str:
    try:
        with open(path) as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return "(no log)"
