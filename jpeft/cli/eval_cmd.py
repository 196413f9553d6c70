"""``jpeft eval``: loss and perplexity of a model folder (plus an adapter) on a dataset."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from _jpeft_args import add_eval as add_parser  # noqa: F401  (the options, defined there: no JAX for --help)
from jpeft import quant
from jpeft.cli._ckpt import load_adapter_with_base, note_quantized_training, residual_kind, untie_for
from jpeft.cli._common import require_causal_lm
from jpeft.cli._model import load_folder, read_tokenizer
from jpeft.cli._trainer import max_positions, canary_batches, check_seq_len, evaluate, make_logits_fn, make_loss_fns
from jpeft.config import strict_json
from jpeft.data import PackedDataset, is_conversation, load_examples, render_chat, text_encoder
from jpeft.errors import ConfigError
from jpeft.forgetting.guard import canary_stats



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
