"""``jpeft eval``: loss and perplexity of a model folder (plus an adapter) on a dataset."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jpeft import quant
from jpeft.cli._ckpt import load_adapter_with_base, note_quantized_training, residual_kind, untie_for
from jpeft.cli._common import require_causal_lm
from jpeft.cli._model import load_folder, read_tokenizer
from jpeft.cli._trainer import max_positions, canary_batches, check_seq_len, evaluate, make_logits_fn, make_loss_fns
from jpeft.config import strict_json
from jpeft.data import PackedDataset, is_conversation, load_examples, render_chat, text_encoder
from jpeft.errors import ConfigError
from jpeft.forgetting.guard import canary_stats

HELP = "loss and perplexity of a model (optionally with an adapter) on a text or JSONL dataset"
EPILOG = """\
example:
  jpeft eval --model ./my-model --data eval.jsonl
  jpeft eval --model ./my-model --adapter runs/my-run/adapter --data eval.jsonl --json
  jpeft eval --model ./my-model --adapter runs/my-run/adapter --canary general.txt --worst 5

With --canary, a forgetting report of the adapter against its base on that data: the canary
loss of both, the loss rise, the mean per-token KL(base || adapted), and the packed rows
whose loss rose the most.

The dataset is read, tokenized with the folder's tokenizer and packed exactly as
`jpeft train` does (prompt/completion lines are scored on the completion only, conversations
rendered with the folder's chat template on their assistant turns). A document
longer than --seq-len is scored in chunks of --seq-len tokens, each without the ones before
it (docs/CLI.md says which tokens count).
"""


def add_parser(sub):
    p = sub.add_parser("eval", help=HELP, description=HELP + ".", epilog=EPILOG)
    p.add_argument("--model", required=True, help="local Hugging Face model folder")
    p.add_argument("--adapter", default=None, help="adapter to read: an adapter folder (runs/x/adapter), a PEFT folder, a run folder (runs/x) "
                        "or a checkpoint (runs/x/checkpoints/<step>); default: none, the base alone")
    p.add_argument("--data", default=None, help=".jsonl or plain-text file (needed unless --canary is given)")
    p.add_argument("--canary", default=None, metavar="DATA",
                   help="forgetting report of --adapter against the base on this .jsonl or text file: loss rise, "
                        "mean per-token KL and the worst-affected rows")
    p.add_argument("--worst", type=int, default=None,
                   help="with --canary: how many worst-affected rows to list (default 5)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="packed row length in tokens (default 256, or the model's position range less the adapter's "
                        "virtual tokens if that is shorter)")
    p.add_argument("--packing", choices=("documents", "stream"), default="documents",
                   help="as [data] packing in `jpeft train`: whole documents per row, attention never crossing them "
                        "(default), or one token stream cut into rows")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="the base model's compute and storage dtype (default float32; bfloat16 halves its memory; "
                        "the loss is summed in float32)")
    p.add_argument("--quantize", choices=("nf4", "int8", "fp8"), default=None,
                   help="quantize the base while reading it, as [model] quantize in `jpeft train` does (default: full "
                        "precision); give the run's scheme to score a QLoRA adapter on the base it was trained on, as "
                        "its logged eval_loss was")
    p.add_argument("--batch-size", type=int, default=8, help="rows per batch (default 8)")
    p.add_argument("--max-batches", type=int, default=0, help="evaluate at most this many batches (default 0: all)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p


def run(args) -> int:
    if args.seq_len is not None and args.seq_len < 2:
        raise ConfigError(f"--seq-len must be >= 2, found {args.seq_len}.")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, found {args.batch_size}.")
    if args.max_batches < 0:
        raise ConfigError(f"--max-batches must be >= 0, found {args.max_batches}.")
    if args.data is None and args.canary is None:
        raise ConfigError("jpeft eval needs --data FILE (loss and perplexity) or --canary FILE (a forgetting report).")
    if args.data is not None and args.canary is not None:
        raise ConfigError("--data (loss and perplexity) and --canary (a forgetting report) are two reports; give one "
                          "of them per `jpeft eval` call.")
    if args.canary is not None and not args.adapter:
        raise ConfigError("--canary compares an adapter with its base: give --adapter (a run, adapter or checkpoint "
                          "folder).")
    if args.worst is not None and args.canary is None:  # it would be ignored: the --data report lists no rows
        raise ConfigError("--worst lists the rows of a --canary report; give --canary FILE, or leave --worst out.")
    if args.worst is None:
        args.worst = 5
    if args.worst < 0:
        raise ConfigError(f"--worst must be >= 0, found {args.worst}.")

    require_causal_lm(args.model, "eval")
    path = args.canary or args.data
    # read, and its conversations rendered with the folder's tokenizer, before the weights are read (as `jpeft
    # train` does): a missing file, a bad line or a template that refuses a conversation is named in seconds
    examples = load_examples(path)
    if any(is_conversation(ex) for ex in examples):
        examples = render_chat(examples, read_tokenizer(args.model))
    # a PiSSA/OLoRA PEFT folder applies to the residual of the full-precision weights: quantized after it is computed
    later = args.quantize if args.quantize and args.adapter and residual_kind(args.adapter) else None
    # an adapter of lm_head (a PEFT folder's, or a run's trained on the base read untied) on a tied base: read it
    # untied, lm_head a copy of the embedding, as PEFT computes it (the base's own loss is unchanged)
    loaded = load_folder(args.model, dtype=args.dtype, quantize=None if later else args.quantize,
                         untie=bool(args.adapter) and untie_for(args.adapter, args.model))
    encode, bos, eos = text_encoder(loaded.tokenizer)
    limit = max_positions(loaded.hf_config)
    adapter, extra, base = None, 0, loaded.params
    if args.adapter:  # read first: prefix and prompt tuning's virtual tokens share the rows' positions
        example = jnp.zeros((1, min(8, args.seq_len or 8, limit or 8)), jnp.int32)
        adapter, config, base = load_adapter_with_base(args.adapter, params=loaded.params, model=loaded.model,
                                                       example=example)
        note_quantized_training(args.adapter, args.quantize, f"this scores it on the "
                                f"{args.quantize + '-quantized' if args.quantize else 'full-precision'} base; pass "
                                "--quantize {q} for the base it was trained (and its eval_loss logged) on.")
        if later:
            loaded = loaded._replace(params=quant.quantize(loaded.params, later))
            base = quant.quantize(base, later)
        extra = config.extra_positions
        if not config.packs_documents and args.packing == "documents":
            raise ConfigError(f"the adapter ({config.peft_type}) prepends its virtual tokens once per row, so it cannot "
                              "score rows packed by documents (--packing documents, the default); pass --packing stream.")
    seq_len = args.seq_len
    if seq_len is None:  # the default fits the model (the demo's has 192 positions) and the adapter's virtual tokens
        seq_len = min(256, (limit - extra) if limit else 256)
    check_seq_len(seq_len, loaded.hf_config, "--seq-len", extra)
    ds = PackedDataset.from_examples(examples, encode, seq_len, eos_id=eos, bos_id=bos, packing=args.packing,
                                     source=str(path))
    if args.canary is not None:
        return _canary_report(args, loaded, adapter, ds, base)
    _, eval_sums = make_loss_fns(loaded.model)
    res = evaluate(eval_sums, base, adapter, ds, args.batch_size, args.max_batches or None, what="--max-batches")
    res.update(model=args.model, adapter=args.adapter, data=args.data)
    if args.json:
        print(strict_json(res))
    else:
        # 6 significant digits: a diverged model's perplexity (1e27) would print as a 28-digit integer
        print(f"loss {res['loss']:.4f}  perplexity {res['perplexity']:.6g}  ({res['tokens']:,} target tokens)")
    return 0


def _canary_report(args, loaded, adapter, ds, base) -> int:
    """Prints the forgetting report of ``adapter`` (applied to ``base``: the residual of a
    PiSSA/OLoRA PEFT folder, else the model's params) against the base model on the canary rows."""
    batches = canary_batches(ds, args.batch_size, args.max_batches or None, "--max-batches")
    logits = make_logits_fn(loaded.model)
    s = canary_stats(lambda p, ad, b: logits(loaded.params if ad is None else base, ad, b), loaded.params, adapter,
                     batches)
    ids = np.concatenate([b["input_ids"] for b in batches])
    mask = np.concatenate([b["loss_mask"] for b in batches]).astype(bool)
    real = np.flatnonzero(s["tokens"] > 0)  # padding rows of the last batch have no target
    rise = s["loss"] - s["base_loss"]
    order = real[np.argsort(-rise[real], kind="stable")][: args.worst]
    worst = [{"row": int(i), "loss_rise": float(rise[i]), "base_loss": float(s["base_loss"][i]),
              "loss": float(s["loss"][i]), "kl": float(s["kl"][i]), "tokens": int(s["tokens"][i]),
              "text": loaded.tokenizer.decode([int(t) for t in ids[i][mask[i]]])} for i in order]
    res = {"model": args.model, "adapter": args.adapter, "canary": args.canary, "rows": int(real.size),
           "tokens": int(s["tokens"].sum()), "base_loss": s["base_loss_mean"], "loss": s["canary_loss"],
           "loss_rise": s["loss_rise"], "kl": s["kl_mean"], "worst": worst}
    if args.json:
        print(strict_json(res))
        return 0
    print(f"forgetting on {args.canary}: {res['rows']} rows, {res['tokens']:,} target tokens")
    print(f"  loss     base {res['base_loss']:.4f}  adapted {res['loss']:.4f}  rise {res['loss_rise']:+.4f} nats")
    # a KL is >= 0: float32 rounding of an unchanged row's (~ -1e-7) is printed as the 0 it is, not "-0.0000"
    print(f"  mean per-token KL(base || adapted) {max(res['kl'], 0.0):.4f} nats")
    if worst:
        print("  worst-affected rows (by loss rise):")
        for w in worst:
            text = " ".join(w["text"].split())
            text = text if len(text) <= 60 else text[:57] + "..."
            print(f"    row {w['row']:>4}  rise {w['loss_rise']:+.4f}  KL {max(w['kl'], 0.0):.4f}  {text!r}")
    return 0
