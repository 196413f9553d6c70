"""``jpeft forgetting``: the catastrophic-forgetting experiment runner of
:mod:`jpeft.forgetting` (the same options as ``python -m jpeft.forgetting``)."""

from __future__ import annotations

from jpeft.forgetting.cli import add_parser as _add, run_from_args


def add_parser(sub):
    p = _add(sub, "forgetting")
    p.epilog = (p.epilog or "").replace("python -m jpeft.forgetting", "jpeft forgetting")
    return p


def run(args) -> int:
    return int(run_from_args(args) or 0)
