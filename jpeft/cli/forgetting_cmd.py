"""``jpeft forgetting``: the catastrophic-forgetting experiment runner of
:mod:`jpeft.forgetting` (the same options as ``python -m jpeft.forgetting``)."""

from __future__ import annotations

from _jpeft_args import add_forgetting as add_parser  # noqa: F401  (the options, defined there: no JAX for --help)
from jpeft.forgetting.cli import run_from_args


def run(args) -> int:
    return int(run_from_args(args) or 0)
