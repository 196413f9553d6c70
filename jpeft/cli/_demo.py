"""The ``jpeft demo`` pipeline: a tiny byte-level Llama pretrained on Python code, fine-tuned on
English prose with full fine-tuning and with LoRA; forgetting measured as the rise of the
code loss. Everything runs on a CPU in minutes, from data that ships with Python.

Data, model and pretraining are :mod:`jpeft.forgetting.language`'s (the language forgetting
benchmark's), and every run trains through :func:`jpeft.fit`."""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jpeft
from jpeft.cli._ckpt import save_adapter
from jpeft.cli._common import format_table, human_bytes
from jpeft.cli._model import import_transformers_without_torch
from jpeft.config import strict_json
from jpeft.forgetting import language as L
from jpeft.forgetting.replay import replay_rows


@dataclasses.dataclass(frozen=True)
class Setting:
    size: str  # a model size of jpeft.forgetting.language.tiny_llama_config
    pretrain_steps: int
    steps: int
    pretrain_lr: float = 3e-3
    code_bytes: int = 6_000_000
    eval_rows: int = 64


DEFAULT = Setting(size="demo", pretrain_steps=800, steps=200)
TINY = Setting(size="demo-tiny", pretrain_steps=30, steps=20, code_bytes=300_000, eval_rows=32)


def cache_root(arg: Optional[str]) -> str:
    return arg or L.default_cache_dir()


# ------------------------------------------------------------------------------------ data
class Data:
    """Byte data of :mod:`jpeft.forgetting.language`: the old task (standard-library code)
    and the new task (``pydoc_data`` prose), train and held-out (split by file / topic), with
    fixed held-out windows of ``seq_len + 1`` bytes."""

    def __init__(self, seq_len: int, s: Setting):
        self.seq_len = seq_len
        self.code_train, code_held = L.code_corpus(s.code_bytes)
        self.prose_train, prose_held = L.prose_corpus()
        self.code_eval = L.eval_windows(code_held, seq_len, s.eval_rows)
        self.prose_eval = L.eval_windows(prose_held, seq_len, s.eval_rows)

    def batches(self, batch_size: int, seed: int, replay: float = 0.0):
        """Endless random prose windows; with ``replay``, that share of every batch is code."""
        n_old = replay_rows(replay, batch_size)
        prose = L.byte_batches(self.prose_train, self.seq_len, batch_size - n_old, seed + 7)
        code = L.byte_batches(self.code_train, self.seq_len, n_old, seed + 9) if n_old else None
        for rows in prose:
            if code is not None:  # experience replay: part of each batch is old-task (code) data
                rows = np.concatenate([rows, next(code)])
            yield rows


# ----------------------------------------------------------------------------------- model
def base_model(s: Setting, args, seq_len: int):
    """The pretrained base of :func:`jpeft.forgetting.language.pretrain_code_model` (cached
    when an identical setting was trained before)."""
    model, params, info = L.pretrain_code_model(
        cache_root(args.cache_dir), s.pretrain_steps, seq_len=seq_len, batch_size=args.batch_size, lr=s.pretrain_lr,
        size=s.size, seed=args.seed, use_cache=not args.no_cache, progress=not args.no_progress)
    how = (f"cached base model {info['path']}" if info["cached"] else
           f"pretrained the base model in {info['train_seconds']:.0f} s (cached in {info['path']})")
    return model, params, how


# -------------------------------------------------------------------------------- fine-tune
@dataclasses.dataclass
class RunResult:
    name: str
    adapter: Any
    steps: list
    new_loss: list
    old_loss: list
    step_time: float
    trainable: int
    total: int
    share: float
    ckpt_bytes: int = 0


def make_eval(model):
    def evaluate(params, adapter, windows):
        return L.heldout_loss(model, params, adapter, windows)

    return evaluate


def finetune(name, config, lr, model, params, data: Data, args, steps: int, eval_every: int, evaluate, base_losses,
             replay: float = 0.0):
    """One fine-tuning run on prose through :func:`jpeft.fit`, with held-out prose and code
    losses every ``eval_every`` steps."""
    key = jax.random.key(args.seed + 1)
    adapter = jpeft.init(config, params, key, model, jnp.asarray(data.prose_eval[:1, :8]))
    s = jpeft.summary(params, adapter, print_fn=None)
    # the share of the model's own parameters that are trained (full fine-tuning: 100 %)
    trainable = s["trainable"]
    share = trainable / s["base"]
    opt = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 10), steps, 0.1 * lr),
                                  weight_decay=0.0))
    loss = L.lm_loss_fn(model)
    step_fn = jpeft.make_train_step(lambda p, a, w, k: loss(p, a, w), opt)
    xs, new, old = [0], [base_losses[0]], [base_losses[1]]

    def eval_fn(adapter, step):
        xs.append(step)
        new.append(evaluate(params, adapter, data.prose_eval))
        old.append(evaluate(params, adapter, data.code_eval))
        return {"english": new[-1], "code": old[-1]}

    batches = (jnp.asarray(w) for w in data.batches(args.batch_size, args.seed, replay))
    res = jpeft.fit(step_fn, params, adapter, opt.init(jpeft.trainable(adapter)), batches, key=key, num_steps=steps,
                    progress=not args.no_progress, desc=f"fine-tune on English: {name}", eval_fn=eval_fn,
                    eval_every=eval_every)
    times = res.step_seconds[1:]  # the first step includes compilation
    return RunResult(name, res.adapter, xs, new, old, float(np.median(times)) if times else float("nan"),
                     trainable, s["total"], share)


def _byte_chars() -> dict:
    """GPT-2's byte -> printable character table (what the ``ByteLevel`` pre-tokenizer writes)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(range(ord("\xae"), 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def save_base(path: str, model, params) -> None:
    """Writes the byte-level base as a Hugging Face folder with a tokenizer whose token id is the
    byte's value (a BPE without merges over the 256 bytes), so `jpeft serve` and transformers
    can load it (docs/SERVING.md)."""
    jpeft.models.loading.save_pretrained(path, model, params)
    save_byte_tokenizer(path)


def save_byte_tokenizer(path: str) -> None:
    """The byte-level tokenizer of :func:`save_base` (token id = byte value) into ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    import_transformers_without_torch()  # in a `jpeft` process: no torch for a tokenizer (seconds of start-up)
    from transformers import PreTrainedTokenizerFast

    ch = _byte_chars()
    tok = Tokenizer(models.BPE({ch[b]: b for b in range(256)}, [], ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(path)


def dir_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def save_full(path: str, model, params, adapter) -> int:
    """A full fine-tune's checkpoint is the whole model: written as a Hugging Face folder like
    ``base-model/`` (so `jpeft eval`, `jpeft serve` and transformers load it), and its size, the
    weights and config.json, returned before the shared byte-level tokenizer is added."""
    jpeft.models.loading.save_pretrained(path, model, jpeft.merge(params, adapter))
    size = dir_bytes(path)
    save_byte_tokenizer(path)
    return size


# ------------------------------------------------------------------------------- generation
def generate(model, params, adapter, prompt: bytes, n: int, *, seed: int = 0, temperature: float = 0.7,
             top_k: int = 20) -> bytes:
    """Samples ``n`` bytes after ``prompt`` with :func:`jpeft.generate` (top-k sampling, the KV cache)."""
    ids = jnp.asarray(np.frombuffer(prompt, np.uint8).astype(np.int32)[None])
    out = jpeft.generate(model, params, adapter, ids, n, temperature=temperature, top_k=top_k, key=jax.random.key(seed))
    return bytes(np.asarray(out[0, len(prompt):]).astype(np.uint8).tolist())


def _show(text: bytes, width: int = 100) -> str:
    s = text.decode("utf-8", errors="replace").replace("\n", "⏎ ").replace("\t", " ")
    return s[:width]


# ------------------------------------------------------------------------------------- plot
def plot(results: list, base_losses, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    palette = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e"]
    colors = {r.name: palette[i % len(palette)] for i, r in enumerate(results)}
    for r in results:
        c = colors.get(r.name, "#1f77b4")
        axes[0].plot(r.steps, r.new_loss, marker="o", ms=3, label=r.name, color=c)
        axes[1].plot(r.steps, r.old_loss, marker="o", ms=3, label=r.name, color=c)
    axes[0].set_title("new task: English prose (lower is better)")
    axes[1].set_title("old task: Python code (rise = forgetting)")
    axes[1].axhline(base_losses[1], color="gray", ls="--", lw=1, label="base model")
    axes[0].axhline(base_losses[0], color="gray", ls="--", lw=1, label="base model")
    for ax in axes:
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel("held-out loss (nats / byte)")
        ax.grid(alpha=0.3)
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------- run
def run_demo(args) -> dict:
    t_start = time.perf_counter()
    s = TINY if args.tiny else DEFAULT
    if args.pretrain_steps:
        s = dataclasses.replace(s, pretrain_steps=args.pretrain_steps)
    steps = args.steps or s.steps
    seq_len = args.seq_len
    eval_every = args.eval_every or max(1, steps // 15)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    say = print
    say(f"jpeft demo: PEFT against catastrophic forgetting ({'tiny setting' if args.tiny else 'default setting'}; "
        f"{jax.device_count()} {jax.default_backend().upper()} device(s))")

    data = Data(seq_len, s)
    say(f"  old task: Python standard-library source, {data.code_train.size / 1e6:.1f} MB of code for pretraining")
    say(f"  new task: Python documentation prose (pydoc_data), {data.prose_train.size / 1e6:.2f} MB")
    model, params, how = base_model(s, args, seq_len)
    say(f"  base: byte-level Llama, {model.config.num_layers} layers x {model.config.hidden_size} wide, "
        f"{sum(x.size for x in jax.tree.leaves(params)):,} parameters; {how}")
    save_base(os.path.join(out, "base-model"), model, params)
    evaluate = make_eval(model)
    base_losses = (evaluate(params, None, data.prose_eval), evaluate(params, None, data.code_eval))

    all_linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora_qv = jpeft.LoraConfig(r=args.rank, alpha=2 * args.rank, target_modules=["q_proj", "v_proj"])
    lora_all = jpeft.LoraConfig(r=args.rank, alpha=2 * args.rank, target_modules=all_linear)
    runs = [
        ("full fine-tuning", jpeft.FullFinetuneConfig(), args.lr_full, "full-finetune"),
        (f"LoRA r={args.rank}, q,v", lora_qv, args.lr_lora, "lora-adapter"),
        (f"LoRA r={args.rank}, all linear", lora_all, args.lr_lora, "lora-all-linear-adapter"),
    ]
    if args.replay > 0:
        share = replay_rows(args.replay, args.batch_size) / args.batch_size  # the rows replayed, not the request
        runs.append((f"LoRA r={args.rank}, all linear + {100 * share:.0f}% code replay", lora_all, args.lr_lora,
                     "lora-all-linear-replay-adapter"))
    results = []
    for name, cfg, lr, _ in runs:
        replay = args.replay if "replay" in name else 0.0
        results.append(finetune(name, cfg, lr, model, params, data, args, steps, eval_every, evaluate, base_losses,
                                replay=replay))

    for r, (_, cfg, _, folder) in zip(results, runs):
        path = os.path.join(out, folder)
        if os.path.isdir(path):
            shutil.rmtree(path)
        if cfg.trains_every_weight:  # full fine-tuning: the whole model is the checkpoint
            r.ckpt_bytes = save_full(path, model, params, r.adapter)
        else:
            save_adapter(path, r.adapter, cfg, params=params,
                         metadata={"base": "jpeft demo byte-level Llama", "setting": dataclasses.asdict(s)})
            r.ckpt_bytes = dir_bytes(path)
    stale = os.path.join(out, "lora-all-linear-replay-adapter")
    if args.replay == 0 and os.path.isdir(stale):  # an earlier run's, not this run's results
        shutil.rmtree(stale)
    full, lora = results[0], results[1]
    adapter_dir = os.path.join(out, "lora-adapter")

    header = ["method", "trainable", "checkpoint", "step time", "new-task loss", "old-task loss rise"]
    rows = [["base model (no fine-tuning)", "-", "-", "-", f"{base_losses[0]:.3f}", "-"]]
    for r in results:
        rise = r.old_loss[-1] - base_losses[1]
        rows.append([r.name, f"{100 * r.share:.2f}%", human_bytes(r.ckpt_bytes), f"{1000 * r.step_time:.0f} ms",
                     f"{r.new_loss[-1]:.3f}", f"{rise:+.3f} ({100 * rise / base_losses[1]:+.0f}%)"])
    table = format_table(rows, header)
    png = os.path.join(out, "demo_losses.png")
    plot(results, base_losses, png,
         f"byte-level Llama pretrained on Python code, fine-tuned {steps} steps on English prose")

    say("")
    say(table)
    say("")
    say("  losses: held-out next-byte cross-entropy (nats/byte); old-task rise: code loss after - before")
    say(f"  plot: {png}")
    say(f"  saved: {', '.join(os.path.join(out, f) for *_, f in runs)}; the base as {os.path.join(out, 'base-model')} "
        f"(serve them: jpeft serve --model {os.path.join(out, 'base-model')} --adapter lora={adapter_dir})")

    if args.gen_bytes:
        say("")
        say("samples (prompt in brackets; ⏎ marks a newline):")
        for prompt in (b"The ", b"def "):
            for label, adapter in [("base", None)] + [(r.name, r.adapter) for r in results]:
                text = generate(model, params, adapter, prompt, args.gen_bytes, seed=args.seed)
                say(f"  {label:>40} [{prompt.decode()}]{_show(text)}")
    wall = time.perf_counter() - t_start
    summary = {
        "base_loss": {"new_task": base_losses[0], "old_task": base_losses[1]},
        "runs": [{"method": r.name, "trainable": r.trainable, "trainable_share": r.share,
                  "checkpoint_bytes": r.ckpt_bytes, "step_time_s": r.step_time, "steps": r.steps,
                  "new_task_loss": r.new_loss, "old_task_loss": r.old_loss} for r in results],
        "table": table,
        "wall_s": wall,
    }
    with open(os.path.join(out, "demo_results.json"), "w") as f:
        f.write(strict_json(summary, indent=1))
    say("")
    say(f"done in {wall:.0f} s; results in {out}")
    return summary
