"""``jpeft forgetting``: the catastrophic-forgetting experiment runner of
:mod:`jpeft.forgetting` (the same options as ``python -m jpeft.forgetting``)."""

from __future__ import annotations


def add_parser(sub):
    from jpeft.forgetting.cli import add_parser as _add

    p = _add(sub, "forgetting")
    p.epilog = (p.epilog or "").replace("python -m jpeft.forgetting", "jpeft forgetting")
    return p


def run(args) -> int:
    from jpeft.forgetting.cli import run_from_args

    return int(run_from_args(args) or 0)
