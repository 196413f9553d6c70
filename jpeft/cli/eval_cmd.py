"""``jpeft eval``: loss and perplexity of a model folder (plus an adapter) on a dataset."""

from __future__ import annotations

import json
import sys

HELP = "loss and perplexity of a model (optionally with an adapter) on a text or JSONL dataset"
EPILOG = """\
example:
  jpeft eval --model ./my-model --data eval.jsonl
  jpeft eval --model ./my-model --adapter runs/my-run/adapter --data eval.jsonl --json

The dataset is read, tokenized with the folder's tokenizer and packed exactly as
`jpeft train` does (prompt/completion lines are scored on the completion only).
"""


def add_parser(sub):
    p = sub.add_parser("eval", help=HELP, description=HELP + ".", epilog=EPILOG)
    p.add_argument("--model", required=True, help="local Hugging Face model folder")
    p.add_argument("--adapter", default=None, help="adapter to read: an adapter folder (runs/x/adapter), a PEFT folder, a run folder (runs/x) "
                        "or a checkpoint (runs/x/checkpoints/<step>); default: none, the base)")
    p.add_argument("--data", required=True, help=".jsonl or plain-text file")
    p.add_argument("--seq-len", type=int, default=256, help="packed row length in tokens (default 256)")
    p.add_argument("--packing", choices=("documents", "stream"), default="documents",
                   help="as [data] packing in `jpeft train`: whole documents per row, attention never crossing them "
                        "(default), or one token stream cut into rows")
    p.add_argument("--batch-size", type=int, default=8, help="rows per batch (default 8)")
    p.add_argument("--max-batches", type=int, default=0, help="evaluate at most this many batches (default 0: all)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p


def run(args) -> int:
    from jpeft.errors import ConfigError

    if args.seq_len < 2:
        raise ConfigError(f"--seq-len must be >= 2, found {args.seq_len}.")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, found {args.batch_size}.")
    if args.max_batches < 0:
        raise ConfigError(f"--max-batches must be >= 0, found {args.max_batches}.")
    import jax.numpy as jnp

    from jpeft.cli._ckpt import load_adapter
    from jpeft.cli._common import require_causal_lm
    from jpeft.cli._model import encode_fn, load_folder
    from jpeft.cli._trainer import check_seq_len, evaluate, make_loss_fns
    from jpeft.data import PackedDataset

    require_causal_lm(args.model, "eval")
    loaded = load_folder(args.model)
    check_seq_len(args.seq_len, loaded.hf_config, "--seq-len")
    encode, bos, eos = encode_fn(loaded.tokenizer)
    ds = PackedDataset.from_file(args.data, encode, args.seq_len, eos_id=eos, bos_id=bos, packing=args.packing)
    adapter = None
    if args.adapter:
        example = jnp.asarray(ds.input_ids[:1, : min(8, ds.seq_len)])
        adapter, _ = load_adapter(args.adapter, params=loaded.params, model=loaded.model, example=example)
    _, eval_sums = make_loss_fns(loaded.model)
    res = evaluate(eval_sums, loaded.params, adapter, ds, args.batch_size, args.max_batches or None)
    res.update(model=args.model, adapter=args.adapter, data=args.data)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"loss {res['loss']:.4f}  perplexity {res['perplexity']:.3f}  ({res['tokens']:,} target tokens)")
    return 0
