"""The ``jpeft`` command's arguments: every subcommand's options, help and examples, and
the parsing of a command line, in the standard library alone.

It lives outside the ``jpeft`` package (next to ``_jpeft_launcher.py``, the console script)
because importing any part of the package imports JAX (about a second): the launcher parses
the command line with this module first, so that ``jpeft --help``, ``jpeft <command> --help``,
``--version`` and every argument error end without importing JAX, and only a command that runs
imports jpeft (:func:`jpeft.cli.main`, which parses with this module too). Each option is
defined here and nowhere else; ``jpeft.cli.<command>_cmd.add_parser`` is the function below.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import sys
from typing import Optional, Sequence

__all__ = ["COMMANDS", "UsageError", "build_parser", "parse_command_line", "missing_input", "one_line", "fail", "version"]


def version() -> str:
    """``jpeft.__version__``, read from ``jpeft/_version.py`` (its one place) without importing
    the package."""
    path = os.path.join(os.path.dirname(importlib.util.find_spec("jpeft").origin), "_version.py")
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    return next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                and any(getattr(t, "id", None) == "__version__" for t in node.targets))


class UsageError(Exception):
    """Bad command-line arguments: reported as one line with exit status 2."""

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage dump) and exit status 2."""

    def __init__(self, *a, **kw):
        kw.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*a, **kw)

    def error(self, message):  # noqa: D401 - argparse hook
        raise UsageError(self.prog, message)


def one_line(msg: str) -> str:
    """Collapses a (possibly multi-line) message to one line."""
    parts = [s.strip() for s in str(msg).splitlines() if s.strip()]
    return " ".join(parts) if parts else "unknown error"


def fail(prog: str, msg: str) -> int:
    """Prints ``<prog>: error: <msg>`` (one line) on stderr and returns the exit status 2."""
    print(f"{prog}: error: {one_line(msg)}", file=sys.stderr)
    return 2


# ----------------------------------------------------------------- the options of each command
DEFAULT_METHOD = "lora"
#: the names ``--method`` and ``[method] name`` take (jpeft.cli._common.method_names, less the alias
#: ``full_finetune``): one per registered method, ``full`` for full fine-tuning
METHOD_NAMES = ("lora", "ia3", "loha", "lokr", "adalora", "vera", "oft", "ln_tuning", "bottleneck", "prefix_tuning",
                "prompt_tuning", "full")


def add_method_args(p: argparse.ArgumentParser) -> None:
    """``--method``, ``-r``, ``--alpha``, ``--target`` and ``--set KEY=VALUE``; each is ``None``
    (``[]`` for ``--set``) when not given, so a command can refuse them where they do not apply."""
    g = p.add_argument_group("adapter method")
    g.add_argument("--method", default=None,
                   help=f"the method (default {DEFAULT_METHOD}): {', '.join(METHOD_NAMES[:-1])} or {METHOD_NAMES[-1]} "
                        "(full fine-tuning); case, - and _ do not matter")
    g.add_argument("-r", "--rank", type=int, default=None, help="rank, for methods that have one (LoRA default 8)")
    g.add_argument("--alpha", type=float, default=None,
                   help="scaling numerator (LoRA: update scaled by alpha/r; LoRA default 16, where PEFT's "
                        "LoraConfig has 8)")
    g.add_argument("--target", default=None,
                   help="target modules: a comma-separated list of names (q_proj,v_proj) or one regex "
                        "(re.fullmatch on the module path or its Hugging Face name)")
    g.add_argument("--set", dest="method_set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other field of the method's config, by its jpeft or PEFT name (value parsed as JSON "
                        "if it can be, else a string), e.g. --set use_rslora=true; repeatable")


DEMO_HELP = "pretrain a tiny model on Python code, fine-tune it on English with full FT and LoRA, compare forgetting"
DEMO_EPILOG = """\
example:
  jpeft demo                       # ~4 minutes on 2 idle CPU cores the first time (~1 pretraining the base, then cached)
  jpeft demo --out demo --steps 400 --rank 16
  jpeft demo --tiny --steps 5      # a smoke test: ~20 s cold on 2 cores

What it does:
  1. pretrains (or reuses the cached) tiny byte-level Llama on the Python standard
     library's own source code (the "old task"),
  2. fine-tunes it on English prose (the Python documentation topics, pydoc_data) four
     times: full fine-tuning, LoRA on q_proj,v_proj (PEFT's default), LoRA on every linear
     layer, and the latter again with a quarter of each batch replayed from the code data,
  3. prints a table: trainable share, checkpoint size, step time, new-task (English) loss,
     and how much the old-task (code) loss rose: the forgetting,
  4. writes <out>/demo_losses.png (both losses over training) and <out>/demo_results.json
     (every number), the LoRA adapters (<out>/lora-adapter, lora-all-linear-adapter,
     lora-all-linear-replay-adapter), the base and the full fine-tune as Hugging Face folders
     (<out>/base-model, <out>/full-finetune; what jpeft serve/eval --model take), replacing
     these from an earlier run, and prints text generated by the base and by the adapted models.
"""


def add_demo(sub):
    p = sub.add_parser("demo", help=DEMO_HELP, description=DEMO_HELP + ".", epilog=DEMO_EPILOG)
    p.add_argument("--out", default="jpeft-demo", help="output folder (default ./jpeft-demo)")
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps per method (default 200; --tiny 20)")
    p.add_argument("--pretrain-steps", type=int, default=None,
                   help="pretraining steps of the base model when it is not cached (default 800; --tiny 30)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--lr-lora", type=float, default=3e-3, help="LoRA learning rate (default 3e-3)")
    p.add_argument("--lr-full", type=float, default=1e-3, help="full fine-tuning learning rate (default 1e-3)")
    p.add_argument("--replay", type=float, default=0.25,
                   help="fraction of each batch drawn from the old task (code) in the extra 'LoRA + replay' run "
                        "(default 0.25; 0 skips that run); it is rounded to whole rows of --batch-size, and a share that rounds "
                        "to no row or to every row is refused")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step (default 16)")
    p.add_argument("--seq-len", type=int, default=128, help="bytes per sequence (default 128)")
    p.add_argument("--eval-every", type=int, default=None, help="steps between loss evaluations (default steps/15)")
    p.add_argument("--tiny", action="store_true", help="a much smaller model and data (for tests and smoke runs)")
    p.add_argument("--cache-dir", default=None,
                   help="where the pretrained base is cached (default $JPEFT_CACHE or ~/.cache/jpeft)")
    p.add_argument("--no-cache", action="store_true", help="pretrain again even if a cached base exists")
    p.add_argument("--gen-bytes", type=int, default=160, help="bytes generated per sample (default 160; 0: none)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


TRAIN_HELP = "fine-tune a local Hugging Face model folder with any jpeft method (TOML config)"

TRAIN_EXAMPLE_TOML = """\
model = "./my-model"          # local Hugging Face folder: config.json, *.safetensors, tokenizer
output_dir = "runs/my-run"    # default: jpeft-run, next to the config
seed = 0

[data]
train = "train.jsonl"         # .jsonl ({"text"}, {"prompt","completion"} or {"messages"} per line) or text
eval = "eval.jsonl"           # optional (omit it or "" for no eval set)
seq_len = 256                 # examples are tokenized and packed into rows of seq_len tokens; past
                              # the model's max_position_embeddings: refused for GPT-2 (a learned
                              # position table), a warning for rotary models (Llama, Mistral, Qwen)
packing = "documents"         # whole documents per row, attention never crosses them; "stream":
                              # one token stream cut into rows (needed for prompt tuning)
chat_loss = "assistant"       # conversations: train the assistant turns ("all": every token)
text_field = "text"           # the JSON keys read from each .jsonl line (the defaults shown)
prompt_field = "prompt"
completion_field = "completion"
messages_field = "messages"   # a chat conversation, rendered with the folder's chat template

[method]                      # any jpeft method; keys as in Hugging Face PEFT's adapter_config.json
name = "lora"                 # lora, ia3, loha, lokr, adalora, vera, oft, ln_tuning, bottleneck,
                              # prefix_tuning, prompt_tuning, or full (full fine-tuning)
r = 8                         # jpeft's LoRA defaults: r = 8, lora_alpha = 16 (PEFT's LoraConfig: 8)
lora_alpha = 16
target_modules = ["q_proj", "v_proj"]  # default: PEFT's for the model type (Llama: q_proj, v_proj)

[train]
steps = 1000                  # optimizer updates
batch_size = 8                # rows per forward/backward pass
gradient_accumulation_steps = 1  # passes per update (an update takes batch_size x this many rows,
                              # the loss a mean over all of their target tokens, as HF Trainer's)
learning_rate = 2e-4          # AdamW, linear warm-up then cosine decay to 10 %
warmup_steps = 50             # linear warm-up steps (default 0: none)
weight_decay = 0.0            # AdamW; biases and norms left out, as HF Trainer does
max_grad_norm = 1.0
eval_every = 100              # steps between evaluations (0: only at the end)
eval_batches = 0              # batches of the eval set per evaluation (0: all of it, as `jpeft eval`)
save_every = 200              # steps between checkpoints (0: only at the end)
log_every = 10                # steps between metrics.jsonl records (0: only the last step)
keep_checkpoints = 3          # the newest checkpoints kept in <output_dir>/checkpoints
scan_layers = false           # Llama family: nn.scan over the layers (one layer compiled: less compile
                              # time and memory); the saved adapter is per layer as usual. On the CPU a
                              # quantized base saves training memory only with scan_layers = true
loss_chunk_tokens = "auto"    # the output layer and the loss a chunk of tokens at a time (jpeft.lm_loss):
                              # the [batch, seq, vocab] logits never exist whole. "auto": 256 tokens on
                              # the CPU, 2048 on accelerators; 0: the whole logits at once
dtype = "float32"             # the base model's compute and storage dtype: "float32" or "bfloat16" (half
                              # the base's memory; the adapter, its optimizer state and the loss stay float32)
model_dropout = true          # the model's own dropout in training steps, at its config.json rates (GPT-2
                              # embd/resid/attn_pdrop, BERT hidden/attention, Llama attention_dropout), as
                              # transformers' Trainer trains; evaluation never drops. false: none

# QLoRA: instead of the top-level model = "...", a table whose quantize = "nf4" | "int8" | "fp8"
# loads the base quantized (the adapter trains in float32 and loads on the unquantized base too;
# a top-level quantize = "nf4" beside model = "..." does the same):
# [model]
# path = "hf-folder"
# quantize = "nf4"
# tie_word_embeddings = false # a tied model (config.json) read with an lm_head of its own, a copy of
#                             # the embedding; the default when the method adapts lm_head (as PEFT unties)

[mesh]                        # optional; used when the run has more than one device or process
data = 0                      # batch axis (0: every device not used by fsdp)
fsdp = 1                      # axis the frozen base is sharded over
tensor = 1                    # Megatron-style tensor parallelism (Llama family; refused for GPT-2)

[forgetting]                  # optional forgetting guard: canary text that must not be forgotten
canary = "general.txt"        # .jsonl or plain text, packed like [data]
every = 100                   # steps between canary checks (and at the last step)
max_loss_rise = 0.1           # budget: canary loss rise over the base, nats
max_kl = 0.05                 # budget: mean per-token KL(base || adapted); give either or both
action = "stop"               # "stop": end the run, keep the last adapter within budget;
                              # "rollback": restore it, lower the learning rate, continue
lr_factor = 0.5               # learning-rate multiplier of a rollback
max_rollbacks = 3             # then the next crossing stops the run
canary_batches = 4            # batches of train.batch_size canary rows per check
"""

TRAIN_EPILOG = f"""\
example:
  jpeft train --config config.toml
  jpeft train --config config.toml --resume          # continue from the latest checkpoint
  jpeft train --config config.toml --set train.steps=50 --set method.r=16
  jpeft train --config config.toml --coordinator 10.0.0.2:1234 --num-processes 2 --process-id 0
  jpeft train --config config.toml --cluster-auto     # every worker of a TPU pod slice / SLURM job

config.toml: only model and [data] train are required; every other value below is its default,
except output_dir, data.eval, warmup_steps and [forgetting]'s canary, max_loss_rise and max_kl
(examples; without a [forgetting] table there is no guard):
{TRAIN_EXAMPLE_TOML}
Writes <output_dir>/metrics.jsonl (one JSON object per log/eval step), TensorBoard events in
<output_dir>/tb when tensorboard (or tensorboardX) is installed, checkpoints in
<output_dir>/checkpoints, and the final adapter in <output_dir>/adapter, which
`jpeft export`, `jpeft merge` and `jpeft eval --adapter` read. Ctrl-C saves a checkpoint
and exits; `--resume` continues it and ends with the same adapter as an uninterrupted run.
"""


def add_train(sub):
    p = sub.add_parser("train", help=TRAIN_HELP, description=TRAIN_HELP + ".", epilog=TRAIN_EPILOG)
    p.add_argument("--config", required=True, help="TOML file (format below)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    p.add_argument("--output-dir", default=None, help="overrides output_dir of the config")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop (with a checkpoint) after this step; the schedule still spans train.steps")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=100 (value parsed as TOML/JSON)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines instead)")
    g = p.add_argument_group("many processes (run the same command on every process; output_dir must be one "
                             "folder they all share)")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="address of process 0")
    g.add_argument("--num-processes", type=int, default=None, help="number of processes in the job")
    g.add_argument("--process-id", type=int, default=None, help="index of this process, 0..N-1")
    g.add_argument("--cluster-auto", action="store_true",
                   help="let JAX find the job's processes (TPU VM pod slices, SLURM, Open MPI)")
    g.add_argument("--join-timeout", type=int, default=300, metavar="SECONDS",
                   help="seconds to wait for every process to join before stopping with an error (default 300)")
    return p


EVAL_HELP = "loss and perplexity of a model (optionally with an adapter) on a text or JSONL dataset"
EVAL_EPILOG = """\
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


def add_eval(sub):
    p = sub.add_parser("eval", help=EVAL_HELP, description=EVAL_HELP + ".", epilog=EVAL_EPILOG)
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
                   help="packed row length in tokens (default 256, or the model's max_position_embeddings less the "
                        "adapter's virtual tokens if that is shorter); longer than max_position_embeddings: refused for "
                        "GPT-2 (a learned position table), a warning for rotary models (Llama, Mistral, Qwen)")
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


MERGE_HELP = "merge an adapter into its base model and save a plain Hugging Face model folder"
MERGE_EPILOG = """\
example:
  jpeft merge --model ./my-model --adapter runs/my-run/adapter --out ./my-model-merged

The result loads with transformers' AutoModelForCausalLM.from_pretrained and with
jpeft.models.from_pretrained, and needs no jpeft or peft to serve. The base's tokenizer
files, when it has any, are copied; none are needed. --adapter also takes a run folder or a
checkpoint (runs/my-run/checkpoints/30). A PEFT folder saved after a PiSSA or OLoRA init is
merged into the residual base PEFT recomputes, as PEFT's merge_and_unload() does. Methods that
cannot be merged (prefix or prompt tuning, bottleneck adapters) end with a NotMergeableError.
"""


def add_merge(sub):
    p = sub.add_parser("merge", help=MERGE_HELP, description=MERGE_HELP + ".", epilog=MERGE_EPILOG)
    p.add_argument("--model", required=True, help="the base model's local Hugging Face folder")
    p.add_argument("--adapter", required=True, help="adapter to read: an adapter folder (runs/x/adapter), a PEFT folder, a run folder (runs/x) "
                        "or a checkpoint (runs/x/checkpoints/<step>)")
    p.add_argument("--out", required=True, help="output folder for the merged model")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty output folder")
    return p


EXPORT_HELP = "export an adapter to the Hugging Face PEFT format (adapter_config.json + adapter_model.safetensors)"
EXPORT_EPILOG = """\
example:
  jpeft export --model ./my-model --adapter runs/my-run/adapter --out ./my-peft-adapter

then, in PyTorch:
  from peft import AutoPeftModelForCausalLM, PeftModel
  from transformers import AutoModelForCausalLM
  model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("./my-model"), "./my-peft-adapter")
  # or, from any directory (adapter_config.json names the base by its absolute path):
  model = AutoPeftModelForCausalLM.from_pretrained("./my-peft-adapter")

--adapter also takes a run folder (runs/my-run) or a checkpoint (runs/my-run/checkpoints/30),
so an interrupted run can be exported.
"""


def add_export(sub):
    p = sub.add_parser("export", help=EXPORT_HELP, description=EXPORT_HELP + ".", epilog=EXPORT_EPILOG)
    p.add_argument("--model", required=True, help="the base model's local Hugging Face folder")
    p.add_argument("--adapter", required=True, help="adapter to read: an adapter folder (runs/x/adapter), a PEFT folder, a run folder (runs/x) "
                        "or a checkpoint (runs/x/checkpoints/<step>)")
    p.add_argument("--out", required=True, help="output folder for the PEFT adapter")
    p.add_argument("--base-name", default=None,
                   help="base_model_name_or_path written into adapter_config.json (default: the absolute path of "
                        "--model, so that AutoPeftModel*.from_pretrained finds the base from any directory; give "
                        "a hub name such as meta-llama/Llama-2-7b-hf to publish the adapter)")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty output folder")
    return p


INFO_HELP = ("parameter budget of a method on a model folder or a published config (nothing is allocated), "
        "or what an adapter, PEFT export, run folder or checkpoint holds")
INFO_EPILOG = """\
example:
  jpeft info llama-2-7b                          # LoRA r=8 on q_proj,v_proj (PEFT's default for llama)
  jpeft info gpt2                                # (PEFT's default for gpt2: c_attn)
  jpeft info mistral-7b --method lora -r 16 --target q_proj,k_proj,v_proj,o_proj
  jpeft info ./my-model --method ia3 --json
  jpeft info --list                              # the published configs that ship with jpeft
  jpeft info runs/my-run                         # what training wrote: adapter or newest checkpoint
  jpeft info runs/my-run/checkpoints/30          # a checkpoint: method, step, metrics, sizes
                                                 # (its own config: --method, -r, ... are refused)

The model is built with jax.eval_shape: shapes only, so a 70B model costs no memory.
Memory estimates assume float32 adapter weights and Adam (two moments per trainable value);
the frozen base is counted in its stored dtype (config.json's dtype or torch_dtype;
bfloat16 when it names none), or in --base-dtype when given.
"""
BASE_DTYPES = ("float32", "bfloat16", "float16")  # --base-dtype: what the frozen base is counted in


def add_info(sub):
    p = sub.add_parser("info", help=INFO_HELP, description=INFO_HELP + ".", epilog=INFO_EPILOG)
    p.add_argument("model", nargs="?", help="a local Hugging Face folder (config.json), a published name, or an "
                   "adapter / PEFT / run / checkpoint folder")
    p.add_argument("--list", action="store_true", help="list the published configs and exit")
    add_method_args(p)
    p.add_argument("--base-dtype", default=None, choices=list(BASE_DTYPES),
                   help="dtype the frozen base weights are counted in for the memory estimate (default: the "
                        "stored dtype named by config.json, else bfloat16)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


SERVE_HELP = "serve a base model and many LoRA adapters over the OpenAI API (continuous batching, hot loading)"
SERVE_EPILOG = """\
example:
  jpeft serve --model ./base --adapter english=runs/en/adapter --adapter code=./peft-code \\
              --adapters-root ./adapters --port 8000
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"model": "english", "prompt": "The ", "max_tokens": 32, "temperature": 0}'
  curl http://127.0.0.1:8000/v1/adapters -d '{"name": "legal", "path": "legal-v2"}'   # add live
  curl -X DELETE http://127.0.0.1:8000/v1/adapters/legal

A request picks its adapter with "model": the adapter's name, or the base model's name (--name,
default the model folder's name) for no adapter. See docs/SERVING.md.
"""


def add_serve(sub):
    p = sub.add_parser("serve", help=SERVE_HELP, description=SERVE_HELP + ".", epilog=SERVE_EPILOG)
    p.add_argument("--model", required=True, help="a local Hugging Face model folder (config.json + safetensors + tokenizer)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="an adapter to load at start (jpeft or PEFT folder, run folder or checkpoint); repeatable")
    p.add_argument("--adapters-root", default=None,
                   help="folder that POST /v1/adapters paths are relative to (and confined to); without it adapters "
                        "cannot be added while serving")
    p.add_argument("--capacity", type=int, default=None,
                   help="adapters held at once (bank slots; default max(8, number of --adapter))")
    p.add_argument("--max-rank", type=int, default=None, help="largest LoRA rank accepted (default max(16, the --adapter ranks))")
    p.add_argument("--targets", default="all-linear",
                   help="modules live-added adapters may adapt (names or a regex; default all-linear), besides the "
                        "modules of the --adapter adapters")
    p.add_argument("--trainable-tokens", type=int, default=0, metavar="N",
                   help="trainable token rows (PEFT's trainable_token_indices) each adapter may hold at the input "
                        "embedding, for adapters added live (default 0: as many as the --adapter adapters hold)")
    p.add_argument("--modules-to-save", default=None, metavar="NAMES",
                   help="modules (comma-separated names) of which adapters added live may hold a full copy (PEFT's "
                        "modules_to_save), besides those the --adapter adapters copy")
    p.add_argument("--name", default=None, help="the base model's name in the API (default: the folder's name)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="the base model's compute and storage dtype (default float32; bfloat16 halves its memory)")
    p.add_argument("--slots", type=int, default=16, help="requests decoded together (default 16)")
    p.add_argument("--max-len", type=int, default=None,
                   help="prompt + generated tokens per request (default the model's maximum, at most 2048)")
    p.add_argument("--chunk", type=int, default=32, help="prefill chunk length in tokens (default 32)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 429 (default 64)")
    p.add_argument("--queue-timeout", type=float, default=30.0, help="seconds a request may wait for a slot (503 after; default 30)")
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds a request may run in all (504 after; default 300)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    return p


FORGETTING_DESCRIPTION = """\
Measure catastrophic forgetting: train a list of methods over a sequence of tasks for several
seeds and write the score matrices (scores.json), per-seed metrics (metrics.csv), a markdown
table of mean ± std (results.md) and two plots (learning vs forgetting; score-matrix heat maps).

Benchmarks (data ships with the installed software, nothing is downloaded):
  split-digits-task   sklearn digits as 5 two-class tasks, task identity given (multi-head)
  split-digits-class  the same, class-incremental (choose among every class seen so far)
  language            byte-level Llama pretrained on Python stdlib code (task A, cached on
                      disk), then adapted to English prose from pydoc_data.topics (task B);
                      forgetting = rise of held-out code loss, learning = fall of prose loss
  language3           the same code model (default size small), then prose, then CSV data
                      files shipped with scikit-learn: three domains in sequence
"""

FORGETTING_EPILOG = """\
examples:
  python -m jpeft.forgetting split-digits-task --list-methods
  python -m jpeft.forgetting split-digits-task --seeds 0 1 2 --out runs/digits-task
  python -m jpeft.forgetting split-digits-class --seeds 0 1 2 --methods naive,replay,lwf
  python -m jpeft.forgetting split-digits-class --methods naive,replay --replay-sizes 10 50 200 --out runs/replay-sizes
                                                       # the replay buffer at several sizes
  python -m jpeft.forgetting language --seeds 0 1 2 --out runs/language
  python -m jpeft.forgetting language --methods full,lora-r16 --steps 20 --pretrain-steps 50 \\
      --cache-dir /tmp/jpeft-cache --no-plots          # a quick smoke run
  python -m jpeft.forgetting language --sweep --seeds 0 1 2 3 4 --methods full,full+distill,lora-r4 \\
      --lr-factors 0.25 0.5 1 2 --strength-factors 0.3 1 3 --checkpoints 50 100 200
                                                       # learning-vs-forgetting curves and Pareto fronts

Method names are matched case-insensitively ignoring spaces and punctuation ("online-ewc"
selects "online EWC"). Seeds change initialisation (digits) and batch order; the pretrained
language model is trained once (its own fixed seed) and cached, so every seed adapts the same base.
"""

FORGETTING_BENCHMARKS = ("language", "language3", "split-digits-class", "split-digits-task")  # jpeft.forgetting.experiment.BENCHMARKS


def forgetting_options(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of the forgetting runner (``jpeft forgetting``, ``python -m jpeft.forgetting``)."""
    p.add_argument("benchmark", choices=FORGETTING_BENCHMARKS, help="which benchmark to run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds, one full run each (default: 0 1 2)")
    p.add_argument("--methods", default=None, help="comma-separated method names (default: all of the benchmark's)")
    p.add_argument("--list-methods", action="store_true", help="print the benchmark's methods and exit")
    p.add_argument("--steps", type=int, default=None, help="training steps per task (default: digits 300, language 300)")
    p.add_argument("--batch-size", type=int, default=None, help="examples per step (digits 32; language 16)")
    p.add_argument("--out", default=None, help="output folder (default: forgetting_results/<benchmark>; with --sweep "
                                               "forgetting_results/<benchmark>-sweep)")
    p.add_argument("--replay-sizes", type=int, nargs="+", default=None,
                   help="run every selected replay method once per buffer size (examples of earlier tasks kept), "
                        "named '<method> buffer N'")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--force", action="store_true",
                   help="replace the results of an earlier run in the output folder (refused without it)")
    g = p.add_argument_group("sweep (learning-vs-forgetting curves; see jpeft.forgetting.sweep)")
    g.add_argument("--sweep", action="store_true",
                   help="sweep every selected method over learning rates (and regularizer strengths) and checkpoints; "
                        "writes sweep.json, points.csv, summary.csv, report.md and a Pareto plot")
    g.add_argument("--lr-factors", type=float, nargs="+", default=None,
                   help="with --sweep: learning rates as multiples of each method's own (default: 0.25 0.5 1 2)")
    g.add_argument("--strength-factors", type=float, nargs="+", default=None,
                   help="with --sweep: regularizer strengths (EWC lambda, L2-SP, distillation weight, replay share) "
                        "as multiples of each method's own (default: 1)")
    g.add_argument("--checkpoints", type=int, nargs="+", default=[],
                   help="with --sweep: steps of the last task at which every task is also evaluated (the last step always is)")
    g = p.add_argument_group("language benchmark")
    g.add_argument("--pretrain-steps", type=int, default=None, help="steps of code pretraining when not cached (default 1500)")
    g.add_argument("--cache-dir", default=None, help="where the pretrained code model is cached (default $JPEFT_CACHE or ~/.cache/jpeft)")
    g.add_argument("--seq-len", type=int, default=None, help="bytes per training sequence (default 64)")
    g.add_argument("--model-size", dest="size", choices=("micro", "tiny", "small", "base"), default=None,
                   help="byte-level Llama size: micro ~0.03M, tiny ~0.13M (default for language), small ~0.9M (default for "
                        "language3), base ~5M parameters")
    return p


def add_forgetting(sub, name: str = "forgetting", command: str = "jpeft forgetting"):
    """The forgetting runner as the subcommand ``name`` of ``sub``, its examples written as
    ``command`` runs them (``jpeft.forgetting.cli.add_parser``: ``python -m jpeft.forgetting``)."""
    p = sub.add_parser(name, help="run the catastrophic-forgetting benchmarks", description=FORGETTING_DESCRIPTION,
                       epilog=FORGETTING_EPILOG.replace("python -m jpeft.forgetting", command),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    return forgetting_options(p)


# -------------------------------------------------------------------------------- the command line
EPILOG = """\
examples:
  jpeft demo                              # the ~4-minute tour: PEFT against forgetting
  jpeft info llama-2-7b --method lora -r 8
  jpeft train --config config.toml        # see `jpeft train --help` for the file format
  jpeft export --model ./base --adapter runs/x/adapter --out ./peft-adapter

Run `jpeft <command> --help` for the options and an example of each command.
"""

COMMANDS = {"demo": add_demo, "train": add_train, "eval": add_eval, "merge": add_merge, "export": add_export,
            "info": add_info, "forgetting": add_forgetting, "serve": add_serve}


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser of the ``jpeft`` command."""
    parser = _Parser(
        prog="jpeft",
        description="jpeft: parameter-efficient fine-tuning for JAX/Flax, and tools to measure and "
        "prevent catastrophic forgetting.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"jpeft {version()}")
    sub = parser.add_subparsers(dest="cmd", metavar="<command>", parser_class=_Parser)
    for name, add in COMMANDS.items():
        add(sub).set_defaults(cmd=name)
    return parser


#: what an adapter option takes (``--adapter`` of eval, merge, export and serve; jpeft.cli._ckpt.find_adapter)
ADAPTER_KINDS = ("a jpeft adapter folder (jpeft_adapter.json, e.g. runs/x/adapter), a Hugging Face PEFT folder "
                 "(adapter_config.json, e.g. from `jpeft export`), a run folder written by `jpeft train`, or one of "
                 "its checkpoints (runs/x/checkpoints/<step>)")
#: the options of each command that name a file or folder it reads, and what each takes: a path that does not
#: exist ends the command as its line is parsed, not after the second that importing jpeft (JAX) takes.
#: `jpeft train --config` is left to the command: a process of a multi-process job joins the job first and
#: tells the others that its config is missing, where ending here would leave them waiting.
_MODEL_FOLDER = ("a local Hugging Face model folder (config.json and *.safetensors); jpeft downloads nothing: "
                 "fetch a hub model first (hf download NAME --local-dir DIR) and give DIR")
_DATA_FILE = "a .jsonl or plain-text file"
INPUT_PATHS = {
    "eval": {"model": _MODEL_FOLDER, "adapter": ADAPTER_KINDS, "data": _DATA_FILE, "canary": _DATA_FILE},
    "merge": {"model": _MODEL_FOLDER, "adapter": ADAPTER_KINDS},
    "export": {"model": _MODEL_FOLDER, "adapter": ADAPTER_KINDS},
    "serve": {"model": _MODEL_FOLDER},
}


def missing_input(args: argparse.Namespace) -> Optional[str]:
    """The error line for the first input path of ``args`` (:data:`INPUT_PATHS`) that does not
    exist, else ``None``: ``--model 'x' does not exist; give <what the option takes>.``"""
    for dest, what in INPUT_PATHS.get(getattr(args, "cmd", None), {}).items():
        path = getattr(args, dest, None)
        if path is not None and not os.path.exists(path):
            return f"--{dest} {path!r} does not exist; give {what}."
    return None


def parse_command_line(argv: Optional[Sequence[str]] = None) -> tuple[Optional[argparse.Namespace], int]:
    """``(args, 0)`` for a command line that names a command to run; ``(None, 2)`` when it ends
    here: bad arguments (one line ``jpeft <cmd>: error: ...`` on stderr), an input path that does
    not exist (:func:`missing_input`) or no command (the help, on stderr). ``--help`` and
    ``--version`` print and raise ``SystemExit(0)``, as argparse does."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    except UsageError as e:
        return None, fail(e.prog, f"{e} (see `{e.prog} --help`)")
    if extra:
        prog = f"jpeft {args.cmd}" if getattr(args, "cmd", None) else "jpeft"
        return None, fail(prog, f"unrecognized arguments: {' '.join(extra)} (see `{prog} --help`)")
    if not getattr(args, "cmd", None):
        parser.print_help(sys.stderr)
        return None, 2
    missing = missing_input(args)
    if missing is not None:
        return None, fail(f"jpeft {args.cmd}", missing)
    return args, 0
