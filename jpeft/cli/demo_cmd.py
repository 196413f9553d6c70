"""``jpeft demo``: PEFT against catastrophic forgetting, in minutes, on a CPU, with no downloads."""

from __future__ import annotations

from _jpeft_args import add_demo as add_parser  # noqa: F401  (the options, defined there: no JAX for --help)
from jpeft.cli import _demo
from jpeft.errors import ConfigError
from jpeft.forgetting.replay import replay_rows
from jpeft._files import check_folder



def run(args) -> int:
    for name in ("steps", "pretrain_steps", "eval_every"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, found {v}.")
    for name in ("rank", "batch_size"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, found {getattr(args, name)}.")
    if args.seq_len < 8:
        raise ConfigError(f"--seq-len must be >= 8, found {args.seq_len}.")
    for name in ("lr_lora", "lr_full"):
        if not getattr(args, name) > 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be > 0, found {getattr(args, name)}.")
    if not 0.0 <= args.replay < 1.0:
        raise ConfigError(f"--replay must be in [0, 1), found {args.replay}.")
    try:  # a share that rounds to no row (a "replay" run without old data) or to every row (no prose left)
        replay_rows(args.replay, args.batch_size)
    except ConfigError as e:
        raise ConfigError(f"--replay with --batch-size {args.batch_size}: {e}") from None
    if args.gen_bytes < 0:
        raise ConfigError(f"--gen-bytes must be >= 0, found {args.gen_bytes}.")

    check_folder(args.out, "--out")
    _demo.run_demo(args)
    return 0
