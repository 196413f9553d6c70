"""Byte-level language data, a tiny code model pretrained on the Python standard library, and
the code-to-prose forgetting benchmark. Nothing is downloaded: code is the ``.py`` source of
the running Python's standard library, prose is ``pydoc_data.topics`` (the Python reference
documentation's topic texts, about 460 kB of English).

Reusable API (``jpeft demo`` builds on it):

* :func:`code_corpus` / :func:`prose_corpus` -> ``(train, heldout)``: ``np.uint8`` byte arrays.
  Files (code) or topics (prose) are assigned to the held-out split by a stable hash of
  their name (about 10 %), so held-out text is never trained on.
* :func:`byte_windows(data, seq_len, n, seed)`: ``n`` random windows ``[n, seq_len + 1]``
  (``int32``); :func:`eval_windows(data, seq_len, n)`: ``n`` evenly spaced windows (fixed).
  :func:`byte_batches(data, seq_len, batch_size, seed)`: an endless iterator of random batches.
  A window ``w`` is used as input ``w[:, :-1]`` and next-byte target ``w[:, 1:]``.
* :func:`tiny_llama_config(seq_len, size)`: a byte-level (vocab 256) :class:`jpeft.models.LlamaConfig`.
* :func:`pretrain_code_model(cache_dir=None, steps=1500, ...) -> (model, params, info)`: trains
  the tiny Llama on code (full fine-tuning from random init through ``jpeft.make_train_step``)
  and caches the params (``flax.serialization`` msgpack, no pickle) plus ``info.json`` under
  ``cache_dir`` (default ``$JPEFT_CACHE`` or ``~/.cache/jpeft``), keyed by every setting, so a
  second call with the same settings loads in a second.
* :func:`lm_loss_fn(model)`: ``loss(params, adapter, windows) -> mean next-byte loss``;
  :func:`heldout_loss(model, params, adapter, windows)`.
* :class:`CodeToProse`: the benchmark (task A code, pretrained; task B prose, fine-tuned).

>>> train, held = prose_corpus()
>>> train.dtype, len(train) > 100_000, len(held) > 10_000
(dtype('uint8'), True, True)
>>> byte_windows(train, 16, 2, seed=0).shape
(2, 17)
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import json
import os
import sys
import sysconfig
import time
import zlib
from typing import Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

import jpeft
from jpeft.errors import ConfigError, InputValidationError, LoadError
from jpeft.forgetting import metrics as M, regularizers as R
from jpeft.forgetting.benchmark import Benchmark, MethodSpec
from jpeft.models import LlamaConfig, LlamaForCausalLM

__all__ = [
    "code_corpus",
    "prose_corpus",
    "byte_windows",
    "eval_windows",
    "byte_batches",
    "tiny_llama_config",
    "pretrain_code_model",
    "lm_loss_fn",
    "heldout_loss",
    "default_cache_dir",
    "CodeToProse",
    "data_corpus",
    "block_split",
    "CodeProseData",
]

_DATA_VERSION = 1


def _heldout(name: str) -> bool:
    return zlib.crc32(name.encode()) % 10 == 0


def code_corpus(max_bytes: int = 6_000_000) -> tuple[np.ndarray, np.ndarray]:
    """``(train, heldout)`` bytes of the standard library's top-level ``.py`` files and packages
    (tests and ``site-packages`` excluded), in sorted path order, each capped at ``max_bytes``.
    Files are joined with a blank line."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for d, subdirs, names in os.walk(root):
        rel = os.path.relpath(d, root)
        parts = rel.split(os.sep)
        subdirs[:] = sorted(s for s in subdirs if s not in ("site-packages", "test", "tests", "idlelib", "__pycache__")
                            and not s.startswith("lib2to3"))
        if any(p in ("test", "tests") for p in parts):
            continue
        files += [os.path.join(d, n) for n in sorted(names) if n.endswith(".py")]
    if not files:
        raise LoadError(f"found no .py files under the standard library folder {root!r}.")
    tr, he = [], []
    ntr = nhe = 0
    for f in sorted(files):
        rel = os.path.relpath(f, root)
        try:
            with open(f, "rb") as fh:
                b = fh.read()
        except OSError:
            continue
        if _heldout(rel):
            if nhe < max_bytes:
                he.append(b)
                nhe += len(b)
        elif ntr < max_bytes:
            tr.append(b)
            ntr += len(b)
    join = lambda bs: np.frombuffer(b"\n\n".join(bs)[:max_bytes], dtype=np.uint8).copy()
    return join(tr), join(he)


def prose_corpus() -> tuple[np.ndarray, np.ndarray]:
    """``(train, heldout)`` bytes of ``pydoc_data.topics`` (UTF-8), topics in sorted order."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # pragma: no cover - stripped Python builds
        raise LoadError(f"pydoc_data.topics is not available in this Python ({e}); install the full standard library.") from None
    tr, he = [], []
    for k in sorted(topics):
        (he if _heldout(k) else tr).append(topics[k].encode("utf-8"))
    return (np.frombuffer(b"\n\n".join(tr), dtype=np.uint8).copy(), np.frombuffer(b"\n\n".join(he), dtype=np.uint8).copy())


def _check_data(data, seq_len):
    if seq_len < 2:
        raise ConfigError(f"seq_len must be >= 2, found {seq_len}.")
    if len(data) < seq_len + 2:
        raise InputValidationError(f"the text has {len(data)} bytes, fewer than one window of {seq_len + 1}.")


def byte_windows(data: np.ndarray, seq_len: int, n: int, seed: int = 0) -> np.ndarray:
    """``n`` windows of ``seq_len + 1`` bytes at random offsets, ``int32 [n, seq_len + 1]``."""
    _check_data(data, seq_len)
    starts = np.random.default_rng(seed).integers(0, len(data) - seq_len - 1, n)
    return np.stack([data[s : s + seq_len + 1] for s in starts]).astype(np.int32)


def eval_windows(data: np.ndarray, seq_len: int, n: int) -> np.ndarray:
    """``n`` evenly spaced windows (deterministic; non-overlapping when the text is long enough)."""
    _check_data(data, seq_len)
    starts = np.linspace(0, len(data) - seq_len - 1, n).astype(np.int64)
    return np.stack([data[s : s + seq_len + 1] for s in starts]).astype(np.int32)


def byte_batches(data: np.ndarray, seq_len: int, batch_size: int, seed: int = 0) -> Iterator[np.ndarray]:
    """Endless iterator of random ``int32 [batch_size, seq_len + 1]`` windows."""
    _check_data(data, seq_len)
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, len(data) - seq_len - 1, batch_size)
        yield np.stack([data[s : s + seq_len + 1] for s in starts]).astype(np.int32)


_SIZES = {
    # name: (hidden, intermediate, layers, heads)
    "micro": (32, 64, 1, 2),  # for tests
    "tiny": (64, 176, 2, 4),
    "small": (128, 352, 4, 4),
    "base": (256, 704, 6, 8),
    "demo-tiny": (32, 64, 2, 2),  # `jpeft demo --tiny`
    "demo": (128, 384, 2, 4),  # `jpeft demo`
}


def tiny_llama_config(seq_len: int = 64, size: str = "tiny", *, extra_positions: int = 64):
    """A byte-level Llama config (vocab 256, untied embeddings) of size ``micro`` (~0.03 M
    parameters, for tests), ``tiny`` (~0.13 M, the default), ``small`` (~0.9 M), ``base`` (~5 M),
    or ``demo`` / ``demo-tiny`` (the models of ``jpeft demo`` and ``jpeft demo --tiny``)."""
    if size not in _SIZES:
        raise ConfigError(f"size must be one of {sorted(_SIZES)}, found {size!r}.")
    h, i, layers, heads = _SIZES[size]
    return LlamaConfig(vocab_size=256, hidden_size=h, intermediate_size=i, num_layers=layers, num_heads=heads,
                       num_kv_heads=heads, max_position_embeddings=seq_len + extra_positions, tie_word_embeddings=False)


def lm_loss_fn(model):
    """``loss(params, adapter, windows) -> mean next-byte cross-entropy`` (nats)."""

    def loss(params, adapter, windows):
        logits = jpeft.apply(model, params, adapter, windows[:, :-1])
        return M.lm_loss(logits, windows[:, 1:])

    return loss


_EVAL_FNS: dict = {}


def heldout_loss(model, params, adapter, windows, batch_size: int = 32) -> float:
    """Mean next-byte loss over ``windows`` (evaluated in batches, jitted once per model/adapter shape)."""
    key = id(model)
    if key not in _EVAL_FNS or _EVAL_FNS[key][0] is not model:
        _EVAL_FNS[key] = (model, jax.jit(lm_loss_fn(model)))
    f = _EVAL_FNS[key][1]
    tot, n = 0.0, 0
    for i in range(0, len(windows), batch_size):
        w = jnp.asarray(windows[i : i + batch_size])
        tot += float(f(params, adapter, w)) * len(w)
        n += len(w)
    return tot / n


def default_cache_dir() -> str:
    """``$JPEFT_CACHE`` or ``~/.cache/jpeft``."""
    return os.environ.get("JPEFT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "jpeft")


def pretrain_code_model(
    cache_dir: Optional[str] = None,
    steps: int = 1500,
    *,
    seq_len: int = 64,
    batch_size: int = 32,
    lr: float = 3e-3,
    size: str = "tiny",
    seed: int = 0,
    use_cache: bool = True,
    progress: bool = True,
):
    """The byte-level code model (task A): a tiny Llama trained on standard-library code.

    Trains with AdamW (warm-up then cosine decay) from a random initialisation, through the
    same jpeft path as everything else (a :class:`~jpeft.FullFinetuneConfig`
    adapter, merged at the end). The result is cached under ``cache_dir`` keyed by every
    argument that changes it; a cached model is loaded instead of retrained.

    Args:
      cache_dir: cache folder (default :func:`default_cache_dir`).
      steps, seq_len, batch_size, lr, size, seed: the pretraining run.
      use_cache: ``False`` retrains (and overwrites the cache entry).
      progress: a tqdm bar while training.

    Returns:
      ``(model, params, info)``: the ``LlamaForCausalLM``, its variables ``{"params": ...}``
      and a dict with the settings, ``train_seconds``, held-out code and prose losses and
      ``path`` (the cache folder of this model).
    """
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, found {steps}.")
    cfg = tiny_llama_config(seq_len, size)
    model = LlamaForCausalLM(cfg)
    settings = {"steps": steps, "seq_len": seq_len, "batch_size": batch_size, "lr": lr, "size": size, "seed": seed,
                "config": repr(cfg), "data_version": _DATA_VERSION, "python": sys.version.split()[0]}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir or default_cache_dir(), f"code-llama-{size}-{digest}")
    pfile, ifile = os.path.join(path, "params.msgpack"), os.path.join(path, "info.json")
    template = jax.eval_shape(model.init, jax.random.key(seed), jnp.zeros((1, seq_len), jnp.int32))
    if use_cache and os.path.exists(pfile) and os.path.exists(ifile):
        try:
            with open(pfile, "rb") as f:
                params = serialization.from_bytes(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template), f.read())
            with open(ifile) as f:
                info = json.load(f)
            info["cached"] = True
            return model, jax.tree.map(jnp.asarray, params), info
        except Exception as e:  # noqa: BLE001
            raise LoadError(f"the cached code model at {path!r} is unreadable ({e}); delete that folder or pass use_cache=False.") from None
    code_tr, code_he = code_corpus()
    prose_tr, prose_he = prose_corpus()
    params = model.init(jax.random.key(seed), jnp.zeros((1, seq_len), jnp.int32))
    adapter = jpeft.init(jpeft.FullFinetuneConfig(), params, jax.random.key(seed + 1))
    warm = max(1, steps // 20)
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, warm, max(steps, warm + 1), lr * 0.1)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01))
    loss = lm_loss_fn(model)
    step = jpeft.make_train_step(lambda p, a, b, k: loss(p, a, b), opt)
    state = opt.init(jpeft.trainable(adapter))
    batches = (jnp.asarray(b) for b in byte_batches(code_tr, seq_len, batch_size, seed))
    t0 = time.perf_counter()
    adapter = jpeft.fit(step, params, adapter, state, batches, key=jax.random.key(seed), num_steps=steps,
                        progress=progress, desc="pretraining the code model").adapter
    secs = time.perf_counter() - t0
    params = jpeft.merge(params, adapter)
    info = dict(settings)
    info.update({
        "train_seconds": secs,
        "parameters": int(sum(x.size for x in jax.tree.leaves(params))),
        "heldout_code_loss": heldout_loss(model, params, None, eval_windows(code_he, seq_len, 64)),
        "heldout_prose_loss": heldout_loss(model, params, None, eval_windows(prose_he, seq_len, 64)),
        "path": path,
        "cached": False,
    })
    os.makedirs(path, exist_ok=True)
    tmp = pfile + ".tmp"
    with open(tmp, "wb") as f:
        f.write(serialization.to_bytes(jax.device_get(params)))
    os.replace(tmp, pfile)
    with open(ifile, "w") as f:
        json.dump(info, f, indent=1)
    return model, params, info


# -- the benchmark -------------------------------------------------------------------------------

_ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def language_methods() -> list:
    """The benchmark's :class:`MethodSpec` list. Learning rates and regularizer strengths were
    fixed before the reported runs (common values for each method: adapters train at a higher
    rate than full fine-tuning), not tuned on results."""
    full = jpeft.FullFinetuneConfig()
    methods = [
        MethodSpec("full", full, lr=1e-3),
        MethodSpec("full+EWC", full, lr=1e-3, ewc=100.0, fisher="sampled", fisher_examples=128),
        MethodSpec("full+replay", full, lr=1e-3, replay=0.25, replay_capacity=1024),
        MethodSpec("full+distill", full, lr=1e-3, distill=1.0, temperature=1.0),
        # L2-SP pulls every weight back to the pretrained one: strength/2 * ||W - W_0||^2
        # summed over every weight (set before any run; sweep it with --strength-factors)
        MethodSpec("full+L2-SP", full, lr=1e-3, l2sp=0.01),
    ]
    for r in (4, 16, 64):
        methods.append(MethodSpec(f"LoRA r={r}", jpeft.LoraConfig(r=r, alpha=2 * r, target_modules=_ALL_LINEAR), lr=3e-3))
    # residual-base inits at the LoRA rate (not tuned): PiSSA trains the principal singular
    # directions of each kernel, MiLoRA the minor ones (jpeft.init_pissa / jpeft.init_milora)
    for init, label in (("pissa", "PiSSA"), ("milora", "MiLoRA")):
        methods.append(MethodSpec(f"{label} r=16", jpeft.LoraConfig(r=16, alpha=32, target_modules=_ALL_LINEAR, init_weights=init),
                                  lr=3e-3))
    # CorDA's knowledge-preserved mode: the adapter starts in the directions that code (what
    # must not be forgotten) uses least, calibrated on 128 training windows of code
    methods.append(MethodSpec("CorDA r=16", jpeft.LoraConfig(r=16, alpha=32, target_modules=_ALL_LINEAR), lr=3e-3,
                              corda="kpm", calibration_examples=128))
    methods += [
        MethodSpec("DoRA r=16", jpeft.LoraConfig(r=16, alpha=32, target_modules=_ALL_LINEAR, use_dora=True), lr=3e-3),
        MethodSpec("IA3", jpeft.IA3Config(), lr=1e-2),
        MethodSpec("bottleneck", jpeft.BottleneckConfig(target_modules=["self_attn/o_proj", "mlp/down_proj"],
                                                        reduction_factor=8, init_weights="mam"), lr=3e-3),
        MethodSpec("prefix", jpeft.PrefixTuningConfig(num_virtual_tokens=16), lr=1e-2),
        MethodSpec("prompt", jpeft.PromptTuningConfig(num_virtual_tokens=16), lr=1e-2),
    ]
    return methods


class CodeToProse(Benchmark):
    """Task A: Python standard-library code (learned by pretraining, cached). Task B: English
    prose from ``pydoc_data.topics``. ``R`` holds held-out losses (nats/byte, lower is better):
    row 0 after pretraining, row 1 after adapting to prose. Forgetting (Chaudhry) is the rise
    of held-out code loss; learning is the fall of held-out prose loss.

    Args:
      steps_per_task: fine-tuning steps on prose.
      batch_size: windows per step.
      seq_len: bytes per window.
      pretrain_steps: steps of code pretraining (when not cached).
      cache_dir: cache folder of the pretrained model.
      size: model size (:func:`tiny_llama_config`).
      eval_windows_n: held-out windows per task for every evaluation.
    """

    name = "language"
    task_names = ("code (A)", "prose (B)")
    score_name = "held-out loss (nats/byte)"
    higher_is_better = False
    pretrained_tasks = 1
    fisher_estimator = "sampled"
    learning_name = "learning: fall of held-out prose loss (nats/byte)"

    def __init__(self, *, steps_per_task: int = 300, batch_size: int = 16, seq_len: int = 64, pretrain_steps: int = 1500,
                 cache_dir: Optional[str] = None, size: str = "tiny", eval_windows_n: int = 128, progress: bool = True):
        self.steps_per_task = int(steps_per_task)
        self.batch_size = int(batch_size)
        self.seq_len = int(seq_len)
        self.pretrain_steps = int(pretrain_steps)
        self.cache_dir = cache_dir
        self.size = size
        self._progress = progress
        corpora = self._corpora()
        self._train = [{"tokens": byte_windows(tr, seq_len, 4096, seed=i + 1)} for i, (tr, _) in enumerate(corpora)]
        self._heldout = [eval_windows(he, seq_len, eval_windows_n) for _, he in corpora]
        self._params = None
        self.info = None
        self.model = None
        self._base_logits = None

    def _ensure(self):
        if self._params is None:
            self.model, self._params, self.info = pretrain_code_model(
                self.cache_dir, self.pretrain_steps, seq_len=self.seq_len, size=self.size, progress=self._progress)
            self._fwd = jax.jit(lambda p, a, w: jpeft.apply(self.model, p, a, w[:, :-1]))

    def _corpora(self):
        """``[(train, heldout), ...]`` bytes of every task, in task order."""
        return [code_corpus(), prose_corpus()]

    def settings(self) -> dict:
        return {"size": self.size, "seq_len": self.seq_len, "pretrain_steps": self.pretrain_steps,
                "eval_windows": int(len(self._heldout[0]))}

    @property
    def tokens_per_example(self) -> int:
        """Bytes (tokens) predicted per training window, for the budgets of a sweep."""
        return self.seq_len

    def default_methods(self):
        return language_methods()

    def example_input(self):
        return (jnp.zeros((1, self.seq_len), jnp.int32),)

    def base_params(self, seed: int):
        self._ensure()
        return self._params

    def train_set(self, t: int) -> dict:
        return self._train[t]

    def forward(self, params, adapter, data):
        return jpeft.apply(self.model, params, adapter, data["tokens"][:, :-1])

    def loss(self, logits, data, t):
        return M.lm_loss(logits, data["tokens"][:, 1:])

    def distill(self, student, teacher, data, t, temperature):
        return R.distillation_kl(student, teacher, temperature=temperature)

    def fisher_data(self, t: int, n: int):
        w = jnp.asarray(self._train[t]["tokens"][:n])
        return self._fisher_out, w[:, :-1], w[:, 1:], None

    def calibration_inputs(self, t: int, n: int) -> list:
        """``n`` training windows of task ``t`` as model inputs, one window per item (CorDA)."""
        w = self._train[t]["tokens"][:n]
        return [(jnp.asarray(x[None, :-1]),) for x in w]

    def _fisher_out(self, params, adapter, tokens):
        return jpeft.apply(self.model, params, adapter, tokens)

    def evaluate(self, params, adapter, j: int, step: int) -> float:
        self._ensure()
        return heldout_loss(self.model, params, adapter, self._heldout[j])

    def learning(self, Rm, baseline) -> float:
        return float(Rm[0, 1] - Rm[1, 1])

    def extra_metrics(self, params, adapter) -> dict:
        """Code-loss drift and perplexities, and the mean per-token KL from the pretrained
        model's predictions on held-out code."""
        self._ensure()
        w = jnp.asarray(self._heldout[0])
        if self._base_logits is None:
            self._base_logits = self._fwd(self._params, None, w)
        new = self._fwd(params, adapter, w)
        before = heldout_loss(self.model, self._params, None, self._heldout[0])
        after = heldout_loss(self.model, params, adapter, self._heldout[0])
        d = M.loss_drift(before, after)
        return {"code_kl_from_base": float(M.mean_token_kl(self._base_logits, new)),
                "code_ppl_before": d["ppl_before"], "code_ppl_after": d["ppl_after"],
                "prose_ppl_after": M.perplexity(heldout_loss(self.model, params, adapter, self._heldout[1]))}


# -- the three-domain sequence ---------------------------------------------------------------------

_DATA_FILES = ("breast_cancer.csv", "diabetes_data_raw.csv.gz", "diabetes_target.csv.gz", "digits.csv.gz", "iris.csv",
               "linnerud_exercise.csv", "linnerud_physiological.csv", "wine_data.csv")


def block_split(data: bytes, name: str, *, block: int = 4096, every: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """``(train, heldout)``: ``data`` cut into ``block``-byte pieces, a piece held out when a
    stable hash of ``(name, its index)`` is ``0 mod every`` (about ``1/every`` of the bytes)."""
    tr, he = [], []
    for i in range(0, len(data), block):
        (he if zlib.crc32(f"{name}:{i // block}".encode()) % every == 0 else tr).append(data[i : i + block])
    return np.frombuffer(b"".join(tr), dtype=np.uint8).copy(), np.frombuffer(b"".join(he), dtype=np.uint8).copy()


def data_corpus() -> tuple[np.ndarray, np.ndarray]:
    """``(train, heldout)`` bytes of the CSV data files scikit-learn ships in
    ``sklearn/datasets/data`` (digits, breast cancer, wine, diabetes, iris, linnerud; the
    ``.gz`` ones decompressed; about 430 kB of numbers and commas), each split by
    :func:`block_split` (about a fifth held out)."""
    root = importlib.resources.files("sklearn.datasets") / "data"
    tr, he = [], []
    for name in _DATA_FILES:
        raw = (root / name).read_bytes()
        raw = gzip.decompress(raw) if name.endswith(".gz") else raw
        a, b = block_split(raw, name)
        tr.append(a.tobytes())
        he.append(b.tobytes())
    return (np.frombuffer(b"\n".join(tr), dtype=np.uint8).copy(), np.frombuffer(b"\n".join(he), dtype=np.uint8).copy())


def _prose_blocks() -> tuple[np.ndarray, np.ndarray]:
    """``pydoc_data.topics`` split into 4 kB blocks (about a fifth held out), so the held-out
    prose reaches 64 kB (the per-topic split of :func:`prose_corpus` holds out about 46 kB)."""
    tr, he = prose_corpus()
    return block_split(b"\n\n".join([tr.tobytes(), he.tobytes()]), "prose")


class CodeProseData(CodeToProse):
    """Three domains in sequence: task A, Python standard-library code (pretrained, cached);
    task B, English prose (``pydoc_data.topics``); task C, CSV data files (scikit-learn's
    bundled datasets). Tasks B and C are fine-tuned one after the other, so the final row of
    ``R`` measures forgetting of both the pretrained code and the prose learned in between,
    and BWT (loss change since each task was learned) and Chaudhry forgetting (rise above the
    best loss seen before the last task) can differ. Held-out sets: about 1 MB of code,
    106 kB of prose and 80 kB of data (at least 64 kB each, checked), evaluated on
    ``eval_windows_n`` evenly spaced windows each. Learning is the mean fall of each new
    task's held-out loss while it is trained.

    The default base is the ``small`` byte-level Llama (0.9 M parameters; the two-domain
    benchmark uses ``tiny``, 0.13 M), pretrained once on code and cached like
    :class:`CodeToProse`'s. Arguments as :class:`CodeToProse`.
    """

    name = "language3"
    task_names = ("code (A)", "prose (B)", "data (C)")
    learning_name = "learning: mean fall of each new task's held-out loss (nats/byte)"
    MIN_HELDOUT = 64 * 1024

    def __init__(self, *, size: str = "small", eval_windows_n: int = 1024, **kw):
        super().__init__(size=size, eval_windows_n=eval_windows_n, **kw)

    def _corpora(self):
        out = [code_corpus(), _prose_blocks(), data_corpus()]
        for name, (_, he) in zip(self.task_names, out):
            if len(he) < self.MIN_HELDOUT:
                raise LoadError(f"the held-out {name} text has {len(he):,} bytes, fewer than {self.MIN_HELDOUT:,}; "
                                "this Python or scikit-learn ships less data than the benchmark needs.")
        return out

    def learning(self, Rm, baseline) -> float:
        T = len(self.task_names)
        return float(np.mean([Rm[j - 1, j] - Rm[j, j] for j in range(self.pretrained_tasks, T)]))

    def default_methods(self):
        """The language methods, and O-LoRA (LoRA r=16 with a fresh adapter for task C that is
        kept orthogonal to task B's; lambda = 0.5, the paper's value)."""
        return language_methods() + [
            MethodSpec("O-LoRA r=16", jpeft.LoraConfig(r=16, alpha=32, target_modules=_ALL_LINEAR), lr=3e-3,
                       orthogonal=0.5)]
