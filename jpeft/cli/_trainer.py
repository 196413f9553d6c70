"""The fit loop behind ``jpeft train``: packed data, AdamW, periodic eval and checkpoints,
metrics to JSONL (and TensorBoard when installed), exact resume, Ctrl-C saves."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from typing import Any, Optional

import numpy as np


def _summary_writer(logdir: str):
    """A TensorBoard SummaryWriter when tensorboard or tensorboardX is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
    except Exception:
        try:
            from tensorboardX import SummaryWriter
        except Exception:
            return None
    try:
        return SummaryWriter(logdir)
    except Exception:
        return None


class _Interrupt:
    """SIGINT sets a flag (the loop saves and stops); a second Ctrl-C stops at once."""

    def __init__(self):
        self.hit = False
        self._old = None

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True
        print("\njpeft train: Ctrl-C: saving a checkpoint, then stopping (Ctrl-C again to abort)", file=sys.stderr)

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def check_seq_len(seq_len: int, hf_config: dict, what: str) -> None:
    """Refuses rows longer than the model's position range (Llama's rotary embeddings would
    extrapolate, GPT-2's learned positions would be out of range)."""
    from jpeft.errors import ConfigError

    limit = hf_config.get("max_position_embeddings", hf_config.get("n_positions"))
    if limit is not None and seq_len > int(limit):
        raise ConfigError(f"{what}={seq_len} exceeds the model's max_position_embeddings={limit}; "
                          f"use at most {limit}.")


def make_optimizer(t: dict, total_steps: int):
    import optax

    lr = float(t["learning_rate"])
    warm = int(t["warmup_steps"])
    if warm > 0:
        sched = optax.warmup_cosine_decay_schedule(0.0, lr, warm, max(total_steps, warm + 1), end_value=0.1 * lr)
    else:
        sched = optax.cosine_decay_schedule(lr, max(total_steps, 1), alpha=0.1)
    parts = []
    if t.get("max_grad_norm"):
        parts.append(optax.clip_by_global_norm(float(t["max_grad_norm"])))
    parts.append(optax.adamw(sched, weight_decay=float(t["weight_decay"])))
    return optax.chain(*parts), sched


def make_loss_fns(model):
    import jax
    import jax.numpy as jnp

    import jpeft
    from jpeft.cli._model import logits_of
    from jpeft.data import causal_lm_loss, model_inputs

    def loss_fn(params, adapter, batch, key):
        out = jpeft.apply(model, params, adapter, batch["input_ids"], rngs={"dropout": key}, **model_inputs(batch))
        loss, n = causal_lm_loss(logits_of(out), batch["input_ids"], batch["loss_mask"])
        return loss, {"targets": n}

    @jax.jit
    def eval_sums(params, adapter, batch):
        out = jpeft.apply(model, params, adapter, batch["input_ids"], **model_inputs(batch))
        loss, n = causal_lm_loss(logits_of(out), batch["input_ids"], batch["loss_mask"])
        return loss * n, n

    return loss_fn, eval_sums


def evaluate(eval_sums, params, adapter, ds, batch_size: int, max_batches: Optional[int] = None) -> dict:
    """Mean loss and perplexity over (up to ``max_batches`` batches of) ``ds``."""
    tot, n = 0.0, 0.0
    rows = None if not max_batches else max_batches * batch_size
    for b in ds.eval_batches(batch_size, rows):
        s, k = eval_sums(params, adapter, b)
        tot += float(s)
        n += float(k)
    loss = tot / max(n, 1.0)
    return {"loss": loss, "perplexity": float(math.exp(min(loss, 50.0))), "tokens": int(n)}


def train(cfg: dict, *, resume: bool = False, max_steps: Optional[int] = None, progress: bool = True) -> dict:
    """Runs a resolved ``jpeft train`` config (see :mod:`jpeft.cli.train_cmd`)."""
    import jax
    import jax.numpy as jnp

    import jpeft
    from jpeft.checkpoint import CheckpointManager
    from jpeft.cli._ckpt import save_adapter
    from jpeft.cli._model import encode_fn, load_folder
    from jpeft.cli.train_cmd import method_of
    from jpeft.data import PackedDataset
    from jpeft.errors import CheckpointError

    t = cfg["train"]
    d = cfg["data"]
    out_dir = cfg["output_dir"]
    method_of(cfg)  # fail on a bad method before loading anything
    loaded = load_folder(cfg["model"], scan_layers=bool(t.get("scan_layers", False)))
    method = method_of(cfg, loaded.hf_config.get("model_type"))
    check_seq_len(int(d["seq_len"]), loaded.hf_config, "data.seq_len")
    encode, bos, eos = encode_fn(loaded.tokenizer)
    fields = {k: d[k] for k in ("text_field", "prompt_field", "completion_field")}
    fields["packing"] = d["packing"]
    train_ds = PackedDataset.from_file(d["train"], encode, int(d["seq_len"]), eos_id=eos, bos_id=bos, **fields)
    eval_ds = (PackedDataset.from_file(d["eval"], encode, int(d["seq_len"]), eos_id=eos, bos_id=bos, **fields)
               if d.get("eval") else None)

    os.makedirs(out_dir, exist_ok=True)
    seed = int(cfg.get("seed", 0))
    key = jax.random.key(seed)
    k_init, k_train = jax.random.split(key)
    model, params = loaded.model, loaded.params
    example = jnp.asarray(train_ds.input_ids[:1, : min(8, train_ds.seq_len)])
    steps = int(t["steps"])
    optimizer, sched = make_optimizer(t, steps)
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    if not resume and os.path.isdir(ckpt_dir) and any(n.isdigit() for n in os.listdir(ckpt_dir)):
        from jpeft.errors import ConfigError

        raise ConfigError(f"{out_dir!r} already has checkpoints; pass --resume to continue, or choose another "
                          "output_dir.")
    ckpts = CheckpointManager(ckpt_dir, method, params, optimizer=optimizer, model=model,
                              example_args=(example,), base_config=loaded.hf_config,
                              keep_last=t["keep_checkpoints"], async_save=False)
    try:
        return _fit(cfg, t, method, loaded, train_ds, eval_ds, ckpts, optimizer, sched, example, k_init, k_train,
                    seed, steps, resume, max_steps, progress)
    finally:
        ckpts.close()


def _fit(cfg, t, method, loaded, train_ds, eval_ds, ckpts, optimizer, sched, example, k_init, k_train, seed, steps,
         resume, max_steps, progress):
    import jax
    import jax.numpy as jnp

    import jpeft
    from jpeft.cli._ckpt import save_adapter

    out_dir = cfg["output_dir"]
    model, params = loaded.model, loaded.params
    with open(os.path.join(out_dir, "resolved_config.json"), "w") as f:
        json.dump(dict(cfg, method_config=method.to_dict()), f, indent=1)

    adapter = jpeft.init(method, params, k_init, model, example)
    opt_state = optimizer.init(adapter)
    start = 0
    if resume:
        state = ckpts.restore_latest()
        if state is None:
            print(f"jpeft train: no checkpoint in {ckpts.directory}; starting from step 0", file=sys.stderr)
        else:
            adapter, opt_state, start = state.adapter, state.opt_state, int(state.step)
            print(f"jpeft train: resumed from step {start}", file=sys.stderr)

    loss_fn, eval_sums = make_loss_fns(model)
    step_fn = jpeft.make_train_step(loss_fn, optimizer)
    stop_at = steps if max_steps is None else min(steps, int(max_steps))
    bs = int(t["batch_size"])
    summary = jpeft.summary(params, adapter, print_fn=None)
    print(f"jpeft train: {method.peft_type} on {cfg['model']}: {summary['trainable']:,} trainable of "
          f"{summary['total']:,} params ({100 * summary['share']:.3f}%); {len(train_ds)} packed rows of "
          f"{train_ds.seq_len} tokens; steps {start}->{stop_at} of {steps}", file=sys.stderr)

    metrics_f = open(os.path.join(out_dir, "metrics.jsonl"), "a")
    tb = _summary_writer(os.path.join(out_dir, "tb"))

    def log(rec):
        metrics_f.write(json.dumps(rec) + "\n")
        metrics_f.flush()
        if tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    tb.add_scalar(k, v, rec["step"])

    def save(step):
        if step not in ckpts.all_steps():
            ckpts.save(step, adapter, opt_state, k_train, data_position=step, force=True)

    from tqdm.auto import tqdm

    bar = tqdm(total=stop_at, initial=start, desc="train", unit="step", dynamic_ncols=True,
               disable=not progress, file=sys.stderr)
    interrupted = False
    last_eval = None
    step = start
    t0 = time.perf_counter()
    tok_window, time_window = 0, 0.0
    with _Interrupt() as intr:
        while step < stop_at:
            if intr.hit:
                interrupted = True
                break
            b = train_ds.batch(step, bs, seed)
            batch = {"input_ids": jnp.asarray(b["input_ids"]), "loss_mask": jnp.asarray(b["loss_mask"])}
            ts = time.perf_counter()
            adapter, opt_state, m = step_fn(params, adapter, opt_state, batch, jax.random.fold_in(k_train, step))
            loss = float(m["loss"])
            dt = time.perf_counter() - ts
            step += 1
            if step > start + 1:  # the first step includes compilation
                tok_window += b["input_ids"].size
                time_window += dt
            tps = tok_window / time_window if time_window > 0 else float("nan")
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}" if tps == tps else "-", refresh=False)
            if (t["log_every"] and step % t["log_every"] == 0) or step == stop_at:
                log({"step": step, "loss": loss, "grad_norm": float(m["grad_norm"]),
                     "lr": float(sched(step - 1)), "tokens_per_s": tps if tps == tps else None,
                     "elapsed_s": time.perf_counter() - t0})
                if not progress:
                    print(f"step {step}/{stop_at} loss {loss:.4f} tok/s {tps:,.0f}", file=sys.stderr)
            if eval_ds is not None and ((t["eval_every"] and step % t["eval_every"] == 0) or step == steps):
                last_eval = evaluate(eval_sums, params, adapter, eval_ds, bs, t["eval_batches"] or None)
                log({"step": step, "eval_loss": last_eval["loss"], "eval_perplexity": last_eval["perplexity"]})
                bar.write(f"step {step}: eval loss {last_eval['loss']:.4f}, perplexity {last_eval['perplexity']:.2f}")
            if t["save_every"] and step % t["save_every"] == 0 and step < stop_at:
                save(step)
    bar.close()
    if step > start or interrupted or step < steps:
        save(step)
    if step >= steps:
        final, final_params = adapter, params
        if jpeft.scan.is_stacked(adapter):
            # the finished adapter is written per layer, for the unrolled model that
            # `jpeft eval`, `merge` and `export` load (checkpoints keep the scanned form)
            final = jpeft.scan.unstack_adapter(adapter)
            final_params = jpeft.scan.unstack_params(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params))
        save_adapter(os.path.join(out_dir, "adapter"), final, method, params=final_params,
                     base_config=loaded.hf_config, metadata={"steps": steps, "eval": last_eval})
    metrics_f.close()
    if tb is not None:
        tb.close()
    where = os.path.join(out_dir, "adapter") if step >= steps else os.path.join(str(ckpts.directory), str(step))
    if interrupted:
        print(f"jpeft train: interrupted at step {step}; checkpoint saved. Continue with --resume.", file=sys.stderr)
    elif step < steps:
        print(f"jpeft train: stopped at step {step} of {steps} (--max-steps); continue with --resume.", file=sys.stderr)
    else:
        print(f"jpeft train: done; adapter saved to {where}", file=sys.stderr)
    return {"step": step, "interrupted": interrupted, "eval": last_eval, "adapter_dir": where}
