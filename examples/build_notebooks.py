"""Writes the example notebooks (valid nbformat v4 JSON) from the cell sources below.

Run from the repository root after editing a cell:  python examples/build_notebooks.py

Every notebook reads ``SMALL`` from the environment variable ``JPEFT_SMALL`` (default ``1``):
the small setting runs top to bottom on a CPU runtime in well under 5 minutes, and is what
the test suite executes (tests/test_notebooks.py). Set ``JPEFT_SMALL=0`` (or edit the cell)
for the longer run.
"""

from __future__ import annotations

import os

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

REPO = "jpeft/jpeft"  # GitHub owner/name used by the "Open in Colab" badges
HERE = os.path.dirname(os.path.abspath(__file__))


def badge(name: str) -> str:
    url = f"https://colab.research.google.com/github/{REPO}/blob/main/examples/{name}"
    return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"


INSTALL = f'''\
# On Colab (or anywhere jpeft is not installed yet) this installs it; elsewhere it does nothing.
import importlib.util, subprocess, sys
if importlib.util.find_spec("jpeft") is None:
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "jpeft[hf] @ git+https://github.com/{REPO}"])'''

# the Hugging Face notebook also builds its model with PyTorch and loads the export with peft, which jpeft
# does not install: a Colab runtime has torch, and gets peft here; elsewhere a missing torch is named
INSTALL_HF = INSTALL + '''
# This notebook also uses PyTorch (to build the model) and peft (to load the export); jpeft installs neither.
if importlib.util.find_spec("torch") is None:
    raise ModuleNotFoundError("this notebook needs PyTorch and peft: pip install torch peft (a CPU-only PyTorch: "
                              "pip install torch --index-url https://download.pytorch.org/whl/cpu)")
if importlib.util.find_spec("peft") is None:
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "peft"])'''

SMALL = '''\
import os
SMALL = os.environ.get("JPEFT_SMALL", "1") != "0"  # the small setting: a few minutes on a CPU
print("small setting" if SMALL else "full setting")'''


def md(s):
    return new_markdown_cell(s.strip("\n"))


def code(s):
    return new_code_cell(s.strip("\n"))


# --------------------------------------------------------------------------------- quickstart
QUICKSTART = [
    md(f"""
# jpeft quickstart: LoRA on your own Flax linen model

{badge("quickstart.ipynb")}

jpeft keeps the frozen base model (`params`) and the trainable adapter (`adapter`) in **two
separate pytrees**. Any `flax.linen` model works unchanged: jpeft reaches the targeted modules
by their path. This notebook trains a small classifier on handwritten digits 0-4, then teaches
it digits 5-9 with a LoRA adapter, and shows the four calls: `init`, `apply`,
`make_train_step`, `merge`.
"""),
    code(INSTALL),
    code(SMALL),
    code('''
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import jpeft

digits = load_digits()
X = (digits.data / 16.0).astype(np.float32)
Y = digits.target.astype(np.int32)
rng = np.random.default_rng(0)
order = rng.permutation(len(X))
train, test = order[:1400], order[1400:]
old = lambda idx: idx[Y[idx] < 5]   # the "old task": digits 0-4
new = lambda idx: idx[Y[idx] >= 5]  # the "new task": digits 5-9
print(len(old(train)), "old-task and", len(new(train)), "new-task training images")
'''),
    md("## 1. Your model: plain linen, no jpeft code inside"),
    code('''
class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(128, name="hidden1")(x))
        x = nn.relu(nn.Dense(128, name="hidden2")(x))
        return nn.Dense(10, name="head")(x)

model = MLP()
params = model.init(jax.random.key(0), X[:1])

def accuracy(logits, y):
    return float((jnp.argmax(logits, -1) == y).mean())

def xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

# pretrain the base on the old task (ordinary optax training of all weights)
opt = optax.adam(3e-3)
state = opt.init(params)

@jax.jit
def base_step(params, state, x, y):
    loss, g = jax.value_and_grad(lambda p: xent(model.apply(p, x), y))(params)
    upd, state = opt.update(g, state)
    return optax.apply_updates(params, upd), state, loss

idx = old(train)
for i in range(150 if SMALL else 600):
    b = rng.choice(idx, 64)
    params, state, loss = base_step(params, state, X[b], Y[b])
base_old_acc = accuracy(model.apply(params, X[old(test)]), Y[old(test)])
print(f"base model, old task (0-4) accuracy: {base_old_acc:.3f}")
'''),
    md("""
## 2. A LoRA adapter: a separate, small pytree

`target_modules` selects modules by name (or by a regex on the module path), with the same
meaning as Hugging Face PEFT.
"""),
    code('''
config = jpeft.LoraConfig(r=4, alpha=8, target_modules=["hidden1", "hidden2", "head"])
adapter = jpeft.init(config, params, jax.random.key(1))
info = jpeft.summary(params, adapter)
print({path: (node.lora_A.shape, node.lora_B.shape) for path, node in adapter.items()})
# a fresh adapter is the identity: B starts at zero
assert jnp.allclose(jpeft.apply(model, params, adapter, X[:8]), model.apply(params, X[:8]))
'''),
    md("""
## 3. Train the adapter only

`jpeft.make_train_step` differentiates the adapter tree only; the optimizer state exists for
adapter leaves only, and the base `params` are never copied or changed.
"""),
    code('''
def loss_fn(params, adapter, batch, key):
    logits = jpeft.apply(model, params, adapter, batch["x"])
    return xent(logits, batch["y"])

opt = optax.adam(1e-2)
opt_state = opt.init(adapter)
step = jpeft.make_train_step(loss_fn, opt)
idx = new(train)
for i in range(150 if SMALL else 600):
    b = rng.choice(idx, 64)
    adapter, opt_state, metrics = step(params, adapter, opt_state, {"x": X[b], "y": Y[b]}, jax.random.key(i))
    if i % 50 == 0:
        print(f"step {i:4d}  loss {float(metrics['loss']):.4f}")

new_acc = accuracy(jpeft.apply(model, params, adapter, X[new(test)]), Y[new(test)])
old_acc = accuracy(jpeft.apply(model, params, adapter, X[old(test)]), Y[old(test)])
print(f"with the adapter: new task (5-9) {new_acc:.3f}, old task (0-4) {old_acc:.3f}")
print(f"without it (the untouched base): old task {accuracy(model.apply(params, X[old(test)]), Y[old(test)]):.3f}")
assert new_acc > 0.8
'''),
    md("""
## 4. Merge for serving, save and load

`jpeft.merge` folds `W + s * A @ B` into a copy of the weights: a plain params tree that runs
with `model.apply`, at no extra cost per call.
"""),
    code('''
merged = jpeft.merge(params, adapter)
diff = jnp.abs(model.apply(merged, X[test]) - jpeft.apply(model, params, adapter, X[test])).max()
print(f"max |merged - factored| = {float(diff):.2e}")
assert diff < 1e-4

import tempfile
from jpeft import io
path = io.save_adapter(os.path.join(tempfile.mkdtemp(), "digits-5-9"), config, adapter, params=params)
print(sorted(os.listdir(path)))
config2, adapter2 = io.load_adapter(path, params)
assert config2 == config
assert jnp.allclose(jpeft.apply(model, params, adapter2, X[:8]), jpeft.apply(model, params, adapter, X[:8]))
'''),
]

# --------------------------------------------------------------------------- HF fine-tune/export
HF = [
    md(f"""
# Fine-tune a Hugging Face model folder and export the adapter to PEFT

{badge("hf_finetune_export.ipynb")}

jpeft loads local Hugging Face checkpoint folders (`config.json` + `model.safetensors` +
tokenizer) into its own Flax models, trains an adapter on them, and writes the adapter in the
Hugging Face PEFT format, so PyTorch's `peft` can serve it.

So that this notebook runs anywhere without downloads, it first **creates** a tiny random
Llama with `transformers` and `save_pretrained`. To use a real model, point `MODEL_DIR` at its
downloaded folder instead (e.g. from `hf download NAME --local-dir DIR`).
"""),
    code(INSTALL_HF),
    code(SMALL),
    code('''
import json, tempfile
import numpy as np
import torch
from pydoc_data.topics import topics
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORK = tempfile.mkdtemp()
MODEL_DIR = os.path.join(WORK, "tiny-llama")
keys = sorted(topics)

# a small byte-level BPE tokenizer, trained here on Python's documentation text
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.train_from_iterator([topics[k] for k in keys[:40]], trainers.BpeTrainer(
    vocab_size=384, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False))
tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")

torch.manual_seed(0)
hf_config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
LlamaForCausalLM(hf_config).save_pretrained(MODEL_DIR)
tokenizer.save_pretrained(MODEL_DIR)
print(sorted(os.listdir(MODEL_DIR)))
'''),
    md("""
## A dataset: prompt/completion pairs in JSONL

Lines with `prompt` and `completion` are trained on the completion only; lines with `text`
are trained on every token. `jpeft.data` tokenizes them with the folder's tokenizer and packs
them into rows of `seq_len` tokens.
"""),
    code('''
train_path, eval_path = os.path.join(WORK, "train.jsonl"), os.path.join(WORK, "eval.jsonl")
with open(train_path, "w") as f:
    for k in keys[:60]:
        f.write(json.dumps({"prompt": f"Python topic {k!r}:\\n", "completion": topics[k][:400]}) + "\\n")
with open(eval_path, "w") as f:
    for k in keys[60:]:
        f.write(json.dumps({"prompt": f"Python topic {k!r}:\\n", "completion": topics[k][:400]}) + "\\n")

import jpeft
from jpeft.data import PackedDataset, text_encoder

model, params = jpeft.models.from_pretrained(MODEL_DIR)
tokenizer = jpeft.models.load_tokenizer(MODEL_DIR)
# tokenized as `jpeft train` and `jpeft eval` do: a BOS in front of each document only where the tokenizer
# puts one itself (this one does not), an EOS after each
encode, bos, eos = text_encoder(tokenizer)
SEQ = 64
train_ds = PackedDataset.from_file(train_path, encode, SEQ, eos_id=eos, bos_id=bos)
eval_ds = PackedDataset.from_file(eval_path, encode, SEQ, eos_id=eos, bos_id=bos)
print(f"{len(train_ds)} training rows of {SEQ} tokens; {train_ds.num_targets} target tokens")
'''),
    md("## LoRA on the attention and MLP projections"),
    code('''
import jax, jax.numpy as jnp, optax
from jpeft.data import causal_lm_loss, model_inputs

config = jpeft.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                         "gate_proj", "up_proj", "down_proj"])
example = jnp.asarray(train_ds.input_ids[:1])
adapter = jpeft.init(config, params, jax.random.key(0), model, example)
jpeft.summary(params, adapter)

# rows packed by documents carry segment and position ids; model_inputs(batch) passes them, so no token
# attends to another document of its row and positions restart in each, as `jpeft train` and `jpeft eval` do
def loss_fn(params, adapter, batch, key):
    logits = jpeft.apply(model, params, adapter, batch["input_ids"], **model_inputs(batch))
    loss, _ = causal_lm_loss(logits, batch["input_ids"], batch["loss_mask"])
    return loss

@jax.jit
def eval_loss(adapter):
    b = jax.tree.map(jnp.asarray, next(eval_ds.eval_batches(len(eval_ds))))  # every row, one batch
    return loss_fn(params, adapter, b, None)

opt = optax.adamw(3e-3)
opt_state = opt.init(adapter)
step = jpeft.make_train_step(loss_fn, opt)
print(f"eval loss before: {float(eval_loss(adapter)):.4f}")
for i in range(60 if SMALL else 400):
    b = train_ds.batch(i, 8)
    adapter, opt_state, m = step(params, adapter, opt_state, jax.tree.map(jnp.asarray, b), jax.random.key(i))
after = float(eval_loss(adapter))
print(f"eval loss after:  {after:.4f}")
'''),
    md("""
## Export to the Hugging Face PEFT format and load it with `peft`

The exported folder holds `adapter_config.json` and `adapter_model.safetensors` with PEFT's
key names and PyTorch's weight layout. The PyTorch model gives the same logits as jpeft.
"""),
    code('''
from jpeft import hf
from peft import PeftModel
from transformers import AutoModelForCausalLM

PEFT_DIR = os.path.join(WORK, "peft-adapter")
hf.save_peft(PEFT_DIR, config, adapter, base_model_name_or_path=MODEL_DIR)
print(sorted(os.listdir(PEFT_DIR)))

torch_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(MODEL_DIR), PEFT_DIR).eval()
ids = eval_ds.input_ids[:2]
with torch.no_grad():
    torch_logits = torch_model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
jax_logits = np.asarray(jpeft.apply(model, params, adapter, jnp.asarray(ids)))
print(f"max |torch - jax| logits: {np.abs(torch_logits - jax_logits).max():.2e}")
assert np.allclose(torch_logits, jax_logits, atol=1e-4)
'''),
    md("""
## The same from the command line

`jpeft train --config config.toml` does all of the above with a progress bar, periodic
evaluation, checkpoints, exact `--resume` and Ctrl-C saving; `jpeft export` and `jpeft merge`
write PEFT adapters and merged Hugging Face folders. Here is `jpeft eval` on our adapter,
saved in jpeft's own format first:
"""),
    code('''
from contextlib import redirect_stdout
from io import StringIO

from jpeft import io
from jpeft.cli import main

ADAPTER_DIR = os.path.join(WORK, "adapter")
io.save_adapter(ADAPTER_DIR, config, adapter, params=params)
rc = main(["eval", "--model", MODEL_DIR, "--adapter", ADAPTER_DIR, "--data", eval_path, "--seq-len", str(SEQ)])
assert rc == 0
# the same packed rows as eval_ds, so the same loss as the training loop's eval_loss above
out = StringIO()
with redirect_stdout(out):
    main(["eval", "--model", MODEL_DIR, "--adapter", ADAPTER_DIR, "--data", eval_path, "--seq-len", str(SEQ), "--json"])
assert abs(json.loads(out.getvalue())["loss"] - after) < 2e-5, (out.getvalue(), after)
'''),
]

# -------------------------------------------------------------------------------- forgetting
FORGETTING = [
    md(f"""
# Measuring catastrophic forgetting

{badge("forgetting.ipynb")}

A model fine-tuned on a new task tends to lose what it knew: *catastrophic forgetting*.
`jpeft.forgetting` measures it and compares methods that resist it (LoRA, EWC, L2-SP,
distillation, replay) on benchmarks built from data that ships with Python and scikit-learn.

Here: **Split-Digits** (scikit-learn's 8x8 handwritten digits as five two-class tasks learned
one after another). After each task, every task seen so far is scored; the score matrix
`R[i, j]` (accuracy on task `j` after training task `i`) gives average accuracy, forgetting and
backward transfer.
"""),
    code(INSTALL),
    code(SMALL),
    code('''
import tempfile
from jpeft.forgetting.experiment import get_benchmark, run
from jpeft.forgetting.cli import select_methods

bench = get_benchmark("split-digits-task", steps_per_task=40 if SMALL else 300)
for m in bench.default_methods():
    print(f"{m.name:>20s}  {m.describe()}")
'''),
    code('''
OUT = tempfile.mkdtemp()
methods = select_methods(bench, "naive,EWC,replay,LoRA per task" if SMALL else None)
results = run(bench, methods, seeds=[0] if SMALL else [0, 1, 2], out_dir=OUT, progress=False)
print(open(os.path.join(OUT, "results.md")).read())
'''),
    md("""
## The score matrices and the learning-vs-forgetting plot

Rows: after training task *i*; columns: accuracy on task *j*. Values below the diagonal falling
over time are forgetting.
"""),
    code('''
from IPython.display import Image, display
pngs = sorted(f for f in os.listdir(OUT) if f.endswith(".png"))
print(pngs)
for f in pngs:
    display(Image(os.path.join(OUT, f)))
'''),
    md("""
## Language: code to prose

The `language` benchmark pretrains a tiny byte-level Llama on Python's own source code, adapts
it to English prose, and measures how much the code loss rises. `jpeft demo` runs the same idea
in a few minutes; the command line runs the full comparison:

```
jpeft forgetting language --seeds 0 1 2 --steps 150 --out runs/language
```
"""),
]

# ------------------------------------------------------------------------------------ bank
BANK = [
    md(f"""
# Many adapters on one base: routing each example to its own adapter

{badge("bank_routing.ipynb")}

A server often holds one frozen base model and many small adapters (one per customer, task
or language). `jpeft.AdapterBank` stacks LoRA adapters into fixed-capacity arrays so that one
batch can mix examples for different adapters, and adapters can be added, replaced or removed
**without recompiling** the jitted model.
"""),
    code(INSTALL),
    code(SMALL),
    code('''
import flax.linen as nn
import jax, jax.numpy as jnp, numpy as np, optax
from sklearn.datasets import load_digits
import jpeft

digits = load_digits()
X = (digits.data / 16.0).astype(np.float32)
Y = digits.target.astype(np.int32)

class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(64, name="hidden")(x))
        return nn.Dense(10, name="head")(x)

model = MLP()
params = model.init(jax.random.key(0), X[:1])   # a random base: the adapters do all the work
'''),
    md("""
## Three adapters, three tasks

Each task relabels the digits differently: `identity` (the digit), `parity` (0 even, 1 odd)
and `mod3` (digit mod 3). Each adapter is trained alone, with the ordinary jpeft loop.
"""),
    code('''
tasks = {"identity": lambda y: y, "parity": lambda y: y % 2, "mod3": lambda y: y % 3}
config = jpeft.LoraConfig(r=8, alpha=16, target_modules=["hidden", "head"])

def train_adapter(relabel, seed):
    adapter = jpeft.init(config, params, jax.random.key(seed))
    def loss_fn(params, adapter, batch, key):
        logits = jpeft.apply(model, params, adapter, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
    opt = optax.adam(1e-2)
    state = opt.init(adapter)
    step = jpeft.make_train_step(loss_fn, opt)
    rng = np.random.default_rng(seed)
    for i in range(150 if SMALL else 500):
        b = rng.choice(len(X), 64)
        adapter, state, _ = step(params, adapter, state, {"x": X[b], "y": relabel(Y[b])}, jax.random.key(i))
    return adapter

adapters = {name: train_adapter(f, i + 1) for i, (name, f) in enumerate(tasks.items())}
for name, a in adapters.items():
    acc = float((jnp.argmax(jpeft.apply(model, params, a, X), -1) == tasks[name](Y)).mean())
    print(f"{name:>8s}: accuracy {acc:.3f} alone")
'''),
    md("""
## One bank, one batch, per-example routing

`bank.route(ids)` gives an ordinary adapter dict; example `i` uses the adapter in slot
`ids[i]` (`-1` runs the bare base).
"""),
    code('''
bank = jpeft.AdapterBank.from_adapters({"identity": adapters["identity"], "parity": adapters["parity"]}, capacity=4)
print("slots:", bank.slots)

# the jitted server takes the routed adapter itself; its shapes never change with the bank's contents
@jax.jit
def forward(routed, x):
    return jpeft.apply(model, params, routed, x)

names = ["identity", "parity", None, "parity"] * 3   # 12 examples, three different routes
x = X[:12]
out = forward(bank.route(bank.ids(names)), x)
for i, n in enumerate(names):
    ref = jpeft.apply(model, params, adapters[n], x[i:i + 1])[0] if n else model.apply(params, x[i:i + 1])[0]
    assert jnp.allclose(out[i], ref, atol=1e-5), n
print("each example got its own adapter's output")
'''),
    md("""
## Hot swap: add an adapter without recompiling

Adding `mod3` changes array contents, not shapes, so `forward` keeps its compiled program
(for the same batch shape).
"""),
    code('''
compiled_before = forward._cache_size()
bank2 = bank.add("mod3", adapters["mod3"])
ids = bank2.ids(["mod3", "parity", "identity"] * 4)
out = forward(bank2.route(ids), X[:12])
print("compiled programs before/after:", compiled_before, forward._cache_size())
assert forward._cache_size() == compiled_before
pred = jnp.argmax(out, -1)
labels = np.array([tasks[n](y) for n, y in zip(["mod3", "parity", "identity"] * 4, Y[:12])])
print("mixed-batch accuracy:", float((pred == labels).mean()))
'''),
]


# ------------------------------------------------------------------------------------------- nnx
NNX = [
    md(f"""
# LoRA on your own Flax NNX model, trained and exported to the PEFT format

{badge("nnx_lora.ipynb")}

jpeft adapts a `flax.nnx` model without editing it: `nnx.split` gives the graph definition and
the state, the state is the frozen base, and the adapter is a separate pytree keyed by module
path. This notebook puts LoRA on a small NNX classifier of handwritten digits, trains the adapter
only with `jpeft.fit`, and writes it in the Hugging Face PEFT format (docs/NNX.md).
"""),
    code(INSTALL),
    code(SMALL),
    code('''
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

import jpeft

digits = load_digits()
X = jnp.asarray(digits.data / 16.0, jnp.float32)
Y = jnp.asarray(digits.target, jnp.int32)
train, test = slice(0, 1400), slice(1400, None)
'''),
    md("## 1. Your model: plain NNX, no jpeft code inside"),
    code('''
class MLP(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(64, 64, rngs=rngs)
        self.head = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
        return self.head(jax.nn.relu(self.hidden(x)))

graphdef, state = nnx.split(MLP(nnx.Rngs(0)))   # `state` is the frozen base

def accuracy(logits, y):
    return float((jnp.argmax(logits, -1) == y).mean())

print("base accuracy:", accuracy(nnx.merge(graphdef, state)(X[test]), Y[test]))
'''),
    md("""
## 2. A LoRA adapter and its training

The same `target_modules` names and regexes as for linen models select modules by path
(`hidden`, `head`). `jpeft.make_train_step` differentiates the adapter only.
"""),
    code('''
config = jpeft.LoraConfig(r=8, alpha=16, target_modules=["hidden", "head"])
adapter = jpeft.init(config, state, jax.random.key(1), graphdef, X[:1])
jpeft.summary(state, adapter)

def loss_fn(params, adapter, batch, key):
    logits = jpeft.apply(graphdef, params, adapter, batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

optimizer = optax.adam(1e-2)
rng = np.random.default_rng(0)
steps = 150 if SMALL else 1000
batches = [{"x": X[train][b], "y": Y[train][b]} for b in (rng.integers(0, 1400, 64) for _ in range(steps))]
result = jpeft.fit(jpeft.make_train_step(loss_fn, optimizer), state, adapter, optimizer.init(adapter), batches,
                   key=jax.random.key(2))
acc = accuracy(jpeft.apply(graphdef, state, result.adapter, X[test]), Y[test])
print(f"loss {result.history[0]['loss']:.3f} -> {result.history[-1]['loss']:.3f}; adapted accuracy {acc:.3f}")
'''),
    md("""
## 3. Export to the PEFT format, load it back, merge for serving

`jpeft.hf.save_peft` writes `adapter_config.json` and `adapter_model.safetensors`;
`jpeft.merge` folds the adapter into a copy of the state, which `nnx.merge` turns into a plain
NNX model.
"""),
    code('''
out = tempfile.mkdtemp()
jpeft.hf.save_peft(f"{out}/peft", config, result.adapter)
config2, loaded = jpeft.hf.load_peft(f"{out}/peft", state)
served = nnx.merge(graphdef, jpeft.merge(state, loaded))
print("served accuracy:", accuracy(served(X[test]), Y[test]))
assert jnp.allclose(served(X[test]), jpeft.apply(graphdef, state, result.adapter, X[test]), atol=1e-4)
'''),
]


def build():
    books = {
        "quickstart.ipynb": QUICKSTART,
        "hf_finetune_export.ipynb": HF,
        "forgetting.ipynb": FORGETTING,
        "bank_routing.ipynb": BANK,
        "nnx_lora.ipynb": NNX,
    }
    for name, cells in books.items():
        nb = new_notebook(cells=cells, metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"},
            "colab": {"provenance": []},
        })
        nbformat.validate(nb)
        with open(os.path.join(HERE, name), "w") as f:
            nbformat.write(nb, f)
    return sorted(books)


if __name__ == "__main__":
    for n in build():
        print("wrote examples/" + n)
