"""The ``jpeft demo`` pipeline: a tiny byte-level Llama pretrained on Python code, fine-tuned on
English prose with full fine-tuning and with LoRA; forgetting measured as the rise of the
code loss. Everything runs on a CPU in minutes, from data that ships with Python."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from typing import Any, Optional

import numpy as np


@dataclasses.dataclass(frozen=True)
class Setting:
    hidden: int
    layers: int
    heads: int
    mlp: int
    pretrain_steps: int
    steps: int
    pretrain_lr: float = 3e-3


DEFAULT = Setting(hidden=128, layers=2, heads=4, mlp=384, pretrain_steps=800, steps=200)
TINY = Setting(hidden=32, layers=2, heads=2, mlp=64, pretrain_steps=30, steps=20)


def cache_root(arg: Optional[str]) -> str:
    return arg or os.environ.get("JPEFT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "jpeft")


# ------------------------------------------------------------------------------------ data
def _bytes_rows(data: bytes, seq_len: int) -> np.ndarray:
    a = np.frombuffer(data, np.uint8).astype(np.int32)
    n = len(a) // seq_len
    return a[: n * seq_len].reshape(n, seq_len)


def prose_text() -> bytes:
    """English prose that ships with Python: the documentation topics of ``pydoc_data``."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")


class Data:
    """Byte rows for the old task (code) and the new task (prose): train / held-out."""

    def __init__(self, seq_len: int, tiny: bool):
        from jpeft.cli import _langdata

        code_train, code_eval = _langdata.code_bytes(tiny)
        prose = prose_text()
        if tiny:
            prose = prose[: 200_000]
        cut = int(len(prose) * 0.9)
        self.code_train = _bytes_rows(code_train, seq_len)
        self.code_eval = _bytes_rows(code_eval, seq_len)[: 32 if tiny else 64]
        self.prose_train = _bytes_rows(prose[:cut], seq_len)
        self.prose_eval = _bytes_rows(prose[cut:], seq_len)[: 32 if tiny else 64]

    @staticmethod
    def batch(rows: np.ndarray, step: int, batch_size: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng([seed, step])
        return rows[rng.integers(0, len(rows), batch_size)]


# ----------------------------------------------------------------------------------- model
def make_model(s: Setting, seq_len: int):
    from jpeft.models.llama import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=s.hidden, intermediate_size=s.mlp, num_layers=s.layers,
                      num_heads=s.heads, num_kv_heads=s.heads, max_position_embeddings=max(512, seq_len),
                      rope_theta=10000.0, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg), cfg


def _loss(model, variables, ids):
    import jax
    import jax.numpy as jnp

    logits = model.apply(variables, ids)
    lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
    return -jnp.take_along_axis(lp, ids[:, 1:, None], -1).mean()


def pretrain(model, s: Setting, data: Data, *, batch_size: int, seed: int, progress: bool):
    """Plain next-byte pretraining on code (AdamW, cosine decay)."""
    import jax
    import jax.numpy as jnp
    import optax
    from tqdm.auto import tqdm

    ids0 = jnp.asarray(data.code_train[:1])
    params = model.init(jax.random.key(seed), ids0)
    sched = optax.warmup_cosine_decay_schedule(0.0, s.pretrain_lr, min(100, s.pretrain_steps // 10 + 1),
                                               s.pretrain_steps, end_value=0.1 * s.pretrain_lr)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01))
    state = opt.init(params)

    @jax.jit
    def step(params, state, ids):
        loss, g = jax.value_and_grad(lambda p: _loss(model, p, ids))(params)
        upd, state = opt.update(g, state, params)
        return optax.apply_updates(params, upd), state, loss

    bar = tqdm(range(s.pretrain_steps), desc="pretrain on Python code", unit="step", disable=not progress,
               dynamic_ncols=True, file=sys.stderr)
    for i in bar:
        params, state, loss = step(params, state, jnp.asarray(data.batch(data.code_train, i, batch_size, seed)))
        if i % 20 == 0 or i == s.pretrain_steps - 1:
            bar.set_postfix(loss=f"{float(loss):.3f}", refresh=False)
    bar.close()
    return params


def base_model(s: Setting, data: Data, args, seq_len: int):
    """The pretrained base: loaded from the cache when an identical setting was trained before."""
    import jax
    import jax.numpy as jnp
    from safetensors.numpy import load_file, save_file

    model, cfg = make_model(s, seq_len)
    key = dict(dataclasses.asdict(s), seq_len=seq_len, batch_size=args.batch_size, seed=args.seed, version=1)
    tag = "demo-base-" + str(abs(hash(json.dumps(key, sort_keys=True))) % 10**10)
    import hashlib

    tag = "demo-base-" + hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    folder = os.path.join(cache_root(args.cache_dir), tag)
    path = os.path.join(folder, "params.safetensors")
    template = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    flat, treedef = jax.tree_util.tree_flatten_with_path(template)
    names = [jax.tree_util.keystr(k) for k, _ in flat]
    if os.path.isfile(path) and not args.no_cache:
        arrays = load_file(path)
        if set(arrays) == set(names):
            params = jax.tree.unflatten(treedef, [jnp.asarray(arrays[n]) for n in names])
            return model, params, f"cached base model {folder}"
    t0 = time.perf_counter()
    params = pretrain(model, s, data, batch_size=args.batch_size, seed=args.seed, progress=not args.no_progress)
    os.makedirs(folder, exist_ok=True)
    leaves = jax.tree.leaves(params)
    tmp = path + ".tmp"
    save_file({n: np.asarray(x) for n, x in zip(names, leaves)}, tmp)
    os.replace(tmp, path)
    with open(os.path.join(folder, "setting.json"), "w") as f:
        json.dump(key, f, indent=1)
    return model, params, f"pretrained the base model in {time.perf_counter() - t0:.0f} s (cached in {folder})"


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
    import jax

    import jpeft

    @jax.jit
    def ev(params, adapter, ids):
        import jax.numpy as jnp

        logits = jpeft.apply(model, params, adapter, ids)
        lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
        return -jnp.take_along_axis(lp, ids[:, 1:, None], -1).mean()

    def evaluate(params, adapter, rows, bs=32):
        import jax.numpy as jnp

        vals = [float(ev(params, adapter, jnp.asarray(rows[i:i + bs]))) for i in range(0, len(rows) - bs + 1, bs)]
        if not vals:
            vals = [float(ev(params, adapter, jnp.asarray(rows)))]
        return float(np.mean(vals))

    return evaluate


def finetune(name, config, lr, model, params, data: Data, args, steps: int, eval_every: int, evaluate, base_losses,
             replay: float = 0.0):
    import jax
    import jax.numpy as jnp
    import optax
    from tqdm.auto import tqdm

    import jpeft

    key = jax.random.key(args.seed + 1)
    ids0 = jnp.asarray(data.prose_train[:1, :8])
    adapter = jpeft.init(config, params, key, model, ids0)
    s = jpeft.summary(params, adapter, print_fn=None)
    # the share of the model's own parameters that are trained (full fine-tuning: 100 %)
    trainable = s["trainable"]
    share = trainable / s["base"]
    opt = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 10), steps, 0.1 * lr),
                                  weight_decay=0.0))

    def loss_fn(p, a, ids, k):
        logits = jpeft.apply(model, p, a, ids)
        lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
        return -jnp.take_along_axis(lp, ids[:, 1:, None], -1).mean()

    step_fn = jpeft.make_train_step(loss_fn, opt)
    opt_state = opt.init(adapter)
    xs, new, old = [0], [base_losses[0]], [base_losses[1]]
    times = []
    bar = tqdm(range(steps), desc=f"fine-tune on English: {name}", unit="step", disable=args.no_progress,
               dynamic_ncols=True, file=sys.stderr)
    for i in bar:
        rows = data.batch(data.prose_train, i, args.batch_size, args.seed + 7)
        n_old = int(round(replay * args.batch_size))
        if n_old:  # experience replay: part of each batch is old-task (code) data
            rows = np.concatenate([rows[: args.batch_size - n_old], data.batch(data.code_train, i, n_old, args.seed + 9)])
        ids = jnp.asarray(rows)
        t0 = time.perf_counter()
        adapter, opt_state, m = step_fn(params, adapter, opt_state, ids, jax.random.fold_in(key, i))
        loss = float(m["loss"])  # blocks until the step is done
        if i > 0:
            times.append(time.perf_counter() - t0)
        if (i + 1) % eval_every == 0 or i + 1 == steps:
            xs.append(i + 1)
            new.append(evaluate(params, adapter, data.prose_eval))
            old.append(evaluate(params, adapter, data.code_eval))
            bar.set_postfix(english=f"{new[-1]:.3f}", code=f"{old[-1]:.3f}", refresh=False)
        else:
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
    bar.close()
    return RunResult(name, adapter, xs, new, old, float(np.median(times)) if times else float("nan"),
                     trainable, s["total"], share)


def dir_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def save_full(path: str, adapter) -> None:
    """A full fine-tune's checkpoint is the whole model: every weight, as safetensors."""
    import jax
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    flat = jax.tree_util.tree_flatten_with_path(adapter)[0]
    save_file({jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}, os.path.join(path, "model.safetensors"))


# ------------------------------------------------------------------------------- generation
def generate(model, params, adapter, prompt: bytes, n: int, *, seed: int = 0, temperature: float = 0.7,
             top_k: int = 20) -> bytes:
    """Samples ``n`` bytes after ``prompt`` (top-k sampling; a fixed-size buffer so one
    compiled function serves every position)."""
    import jax
    import jax.numpy as jnp

    import jpeft

    p = np.frombuffer(prompt, np.uint8).astype(np.int32)
    total = len(p) + n
    buf = np.zeros((1, total), np.int32)
    buf[0, : len(p)] = p

    @jax.jit
    def next_byte(buf, pos, key):
        logits = jpeft.apply(model, params, adapter, buf)[0]
        row = jax.lax.dynamic_index_in_dim(logits, pos - 1, keepdims=False).astype(jnp.float32) / temperature
        kth = jnp.sort(row)[-top_k]
        row = jnp.where(row < kth, -jnp.inf, row)
        return jax.random.categorical(key, row)

    key = jax.random.key(seed)
    b = jnp.asarray(buf)
    for pos in range(len(p), total):
        tok = next_byte(b, pos, jax.random.fold_in(key, pos))
        b = b.at[0, pos].set(tok)
    return bytes(np.asarray(b[0, len(p):]).astype(np.uint8).tolist())


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
    import jax

    import jpeft
    from jpeft.cli._ckpt import save_adapter
    from jpeft.cli._common import format_table, human_bytes
    from jpeft.forgetting import FullFinetuneConfig

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

    data = Data(seq_len, args.tiny)
    say(f"  old task: Python standard-library source, {data.code_train.size / 1e6:.1f} MB of code for pretraining")
    say(f"  new task: Python documentation prose (pydoc_data), {data.prose_train.size / 1e6:.2f} MB")
    model, params, how = base_model(s, data, args, seq_len)
    say(f"  base: byte-level Llama, {s.layers} layers x {s.hidden} wide, "
        f"{sum(x.size for x in jax.tree.leaves(params)):,} parameters; {how}")
    evaluate = make_eval(model)
    base_losses = (evaluate(params, None, data.prose_eval), evaluate(params, None, data.code_eval))

    all_linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora_qv = jpeft.LoraConfig(r=args.rank, alpha=2 * args.rank, target_modules=["q_proj", "v_proj"])
    lora_all = jpeft.LoraConfig(r=args.rank, alpha=2 * args.rank, target_modules=all_linear)
    runs = [
        ("full fine-tuning", FullFinetuneConfig(), args.lr_full, "full-finetune"),
        (f"LoRA r={args.rank}, q,v", lora_qv, args.lr_lora, "lora-adapter"),
        (f"LoRA r={args.rank}, all linear", lora_all, args.lr_lora, "lora-all-linear-adapter"),
    ]
    if args.replay > 0:
        runs.append((f"LoRA r={args.rank}, all linear + {100 * args.replay:.0f}% code replay", lora_all, args.lr_lora,
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
        if isinstance(cfg, FullFinetuneConfig):
            save_full(path, r.adapter)
        else:
            save_adapter(path, r.adapter, cfg, params=params,
                         metadata={"base": "jpeft demo byte-level Llama", "setting": dataclasses.asdict(s)})
        r.ckpt_bytes = dir_bytes(path)
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
    say(f"  saved: {', '.join(os.path.join(out, f) for *_, f in runs)}")

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
        json.dump(summary, f, indent=1)
    say("")
    say(f"done in {wall:.0f} s; results in {out}")
    return summary
