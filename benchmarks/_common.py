"""Shared pieces of the jpeft-vs-Hugging-Face benchmark (benchmarks/bench_vs_hf.py).

Nothing here imports torch or jax at module level, so each worker process imports only its
own framework and its memory baseline is not inflated by the other one.

* :data:`SIZES`: the model and batch configurations (``issue`` is the one issue 10 fixes).
* :class:`PeakRSS`: peak resident memory of *this* process above a baseline taken after
  imports (Linux ``VmHWM`` reset through ``/proc/self/clear_refs``; ``ru_maxrss`` fallback).
* :func:`batches`: the token batches both frameworks train on (same numbers in both).
* :func:`lora_step_flops`: the analytic FLOP count of one LoRA training step, for MFU.
* worker protocol helpers: a worker prints one JSON object per line on stdout and reads
  one command per line on stdin.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import resource
import sys
import time
from typing import Any

import numpy as np

# ``bench_vs_hf.py --threads 1`` pins every worker to one CPU before torch or jax is imported.
# Thread-count settings alone are not enough: XLA's CPU matmuls (YNNPACK) use every core
# whatever --xla_cpu_multi_thread_eigen says, so only the affinity mask makes it one core each.
if os.environ.get("BENCH_PIN_CPU") and hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {int(os.environ["BENCH_PIN_CPU"])})

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class Size:
    """A Llama configuration plus the batch it is trained on."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    batch: int
    seq: int
    kv_heads: int | None = None

    def hf_config_kwargs(self) -> dict:
        return dict(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads or self.heads,
            max_position_embeddings=max(2048, self.seq),
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            attention_bias=False,
            mlp_bias=False,
        )

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    def n_params(self) -> int:
        h, i, v, n = self.hidden, self.intermediate, self.vocab, self.layers
        kv = (self.kv_heads or self.heads) * (h // self.heads)
        per_layer = h * h * 2 + h * kv * 2 + 3 * h * i + 2 * h
        return n * per_layer + 2 * v * h + h


SIZES = {
    # the configuration issue 10 fixes: ~21M parameters, 2048 tokens a step
    "issue": Size(hidden=512, layers=4, heads=8, intermediate=1376, vocab=8192, batch=8, seq=256),
    # a toy for the smoke test and quick checks
    "toy": Size(hidden=64, layers=2, heads=4, intermediate=160, vocab=512, batch=2, seq=32),
    # the parameter-dominated configuration of the LoRA-vs-full memory comparison (~393M)
    "400m": Size(hidden=1024, layers=24, heads=16, intermediate=3072, vocab=32000, batch=1, seq=128),
    "400m-toy": Size(hidden=128, layers=2, heads=4, intermediate=384, vocab=1024, batch=1, seq=32),
}


def size(spec: str) -> Size:
    """A named size, optionally with fields replaced: ``"issue"`` or
    ``"issue:seq=1024,batch=2,layers=8"`` (the scaling sweep's points)."""
    name, _, over = spec.partition(":")
    if name not in SIZES:
        raise SystemExit(f"unknown size {name!r}; known: {sorted(SIZES)}")
    kw = {}
    for item in filter(None, over.split(",")):
        k, _, v = item.partition("=")
        if k not in Size.__dataclass_fields__:
            raise SystemExit(f"size field {k!r} is not one of {sorted(Size.__dataclass_fields__)}")
        kw[k] = int(v)
    return dataclasses.replace(SIZES[name], **kw)


# --------------------------------------------------------------------------------------- memory
def _status() -> dict[str, int]:
    try:
        text = open("/proc/self/status").read()
    except OSError:
        return {}
    out = {}
    for key in ("VmRSS", "VmHWM"):
        m = re.search(key + r":\s+(\d+)\s+kB", text)
        if m:
            out[key] = int(m.group(1)) * 1024
    return out


class PeakRSS:
    """Peak resident set size of this process above the RSS at construction time.

    On Linux the kernel's high-water mark (``VmHWM``) is reset by writing ``5`` to
    ``/proc/self/clear_refs``, so the peak is exact (no polling, no missed spikes). Where that is
    not possible the ``ru_maxrss`` high-water mark is used, which is only right when the
    process's peak after the baseline exceeds its peak before it.
    """

    def __init__(self):
        self.method = "VmHWM(reset)"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.method = "ru_maxrss"
        st = _status()
        self.baseline = st.get("VmRSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)

    def reset_peak(self) -> bool:
        """Resets the high-water mark to the current RSS (keeps the baseline); False if the
        kernel interface is unavailable."""
        if not self.method.startswith("VmHWM"):
            return False
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True

    def peak(self) -> int:
        if self.method.startswith("VmHWM"):
            return _status()["VmHWM"]
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def above_baseline(self) -> int:
        return self.peak() - self.baseline

    def current_above_baseline(self) -> int:
        return _status().get("VmRSS", 0) - self.baseline


# ------------------------------------------------------------------------------------------ data
def batches(size: Size, n: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` int32 token batches ``[batch, seq]``; identical in every process."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, size.vocab, (size.batch, size.seq), dtype=np.int64).astype(np.int32) for _ in range(n)]


# ----------------------------------------------------------------------------------------- flops
def lora_step_flops(size: Size, r: int = 8, causal: bool = False) -> dict[str, float]:
    """Matmul FLOPs of one LoRA training step (multiply-add = 2 FLOPs).

    * forward: ``2 * T * W`` for the frozen linear weights W (attention projections, MLP,
      lm_head), plus attention scores and values ``2 * 2 * B * S^2 * H`` per layer (the full,
      not the causal half, as is usual for MFU; ``causal=True`` counts only the ``S (S + 1) / 2``
      query-key pairs a causal kernel computes: both jpeft's blockwise kernel and PyTorch's SDPA
      skip the masked tiles, so at long sequences the full count is work neither side does and
      an MFU from it can pass 1), plus the LoRA branches ``2 * T * r * (in + out)``;
    * backward: gradients with respect to activations cost the forward again (frozen weights get
      no weight gradient), except the input gradient of the first layer's q/k/v projections
      (base and LoRA branch): nothing before them trains, so neither framework forms it (XLA
      drops it, PyTorch's autograd never asks for it; XLA's own count of the compiled step
      agrees with this one within ~0.3 % at the issue size; counted, this gradient put the
      count 2-3 % above XLA's there); attention backward costs twice its forward; LoRA weights get their gradients
      too (twice the LoRA forward, less that first-layer input gradient).

    The embedding lookup and elementwise work are not counted.
    """
    h, i, v, n = size.hidden, size.intermediate, size.vocab, size.layers
    kv = (size.kv_heads or size.heads) * (h // size.heads)
    T = size.tokens
    lin_per_layer = h * h * 2 + h * kv * 2 + 3 * h * i
    frozen = n * lin_per_layer + h * v
    pairs = size.seq * (size.seq + 1) // 2 if causal else size.seq * size.seq
    attn_fwd = n * 2 * 2 * size.batch * pairs * h
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]
    lora_fwd = n * sum(2 * T * r * (a + b) for a, b in shapes)
    fwd = 2 * T * frozen + attn_fwd + lora_fwd
    # the first layer's q/k/v input gradient, which no one needs (see above)
    first_dx = 2 * T * (h * h + 2 * h * kv) + 3 * 2 * T * h * r
    bwd = 2 * T * frozen + 2 * attn_fwd + 2 * lora_fwd - first_dx
    return {"forward": float(fwd), "backward": float(bwd), "step": float(fwd + bwd)}


def full_step_flops(size: Size, causal: bool = False) -> dict[str, float]:
    """Matmul FLOPs of one full fine-tuning step: as :func:`lora_step_flops` without LoRA, and
    the backward pass also forms every weight gradient (another ``2 * T * W``) and the first
    layer's q/k/v input gradient (the embedding trains)."""
    f = lora_step_flops(size, r=0, causal=causal)
    h, i, v, n = size.hidden, size.intermediate, size.vocab, size.layers
    kv = (size.kv_heads or size.heads) * (h // size.heads)
    weights = n * (h * h * 2 + h * kv * 2 + 3 * h * i) + h * v
    bwd = f["backward"] + 2 * size.tokens * weights + 2 * size.tokens * (h * h + 2 * h * kv)
    return {"forward": f["forward"], "backward": float(bwd), "step": float(f["forward"] + bwd)}


# ------------------------------------------------------------------------------------- protocol
def emit(obj: dict[str, Any]) -> None:
    """One JSON line to the orchestrator (stdout is reserved for the protocol)."""
    sys.__stdout__.write(json.dumps(obj) + "\n")
    sys.__stdout__.flush()


def commands():
    """Yields the orchestrator's commands, one per stdin line, until EOF."""
    for line in sys.stdin:
        line = line.strip()
        if line:
            yield json.loads(line)


def quiet_stdout():
    """Sends library prints to stderr so that stdout carries only the protocol."""
    sys.stdout = sys.stderr


def median(xs):
    return float(np.median(np.asarray(xs, dtype=np.float64))) if len(xs) else float("nan")


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.s = time.perf_counter() - self.t0


def add_huge_pages_arg(parser) -> None:
    parser.add_argument(
        "--huge-pages", default="both", choices=["both", "jpeft", "none"],
        help="which workers run with glibc's transparent-huge-page malloc tunable "
             "(GLIBC_TUNABLES=glibc.malloc.hugetlb=1), as the `jpeft` command sets for itself: both frameworks "
             "(default: the same process environment for both), jpeft only (what each gets out of the box), or none")


def host_pages_env(framework: str, huge_pages: str) -> dict[str, str]:
    """The worker environment for ``--huge-pages`` (``framework``: ``"jpeft"`` or ``"hf"``)."""
    if huge_pages == "both" or (huge_pages == "jpeft" and framework == "jpeft"):
        from _jpeft_launcher import huge_pages_env

        return {"GLIBC_TUNABLES": huge_pages_env()["GLIBC_TUNABLES"]}
    return {}


def cpu_model() -> str:
    """The host CPU's vendor and model as /proc/cpuinfo names it ("" where there is none):
    results from different CPUs are not comparable (PyTorch's and XLA's matmul libraries rank
    differently on AMD and Intel CPUs; see docs/BENCHMARKS.md, Machine)."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return ""
    get = lambda key: next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith(key)), "")
    flags = set(get("flags").split())
    extra = [f for f in ("avx512f", "avx512_bf16", "amx_tile") if f in flags]
    return " ".join(x for x in (get("vendor_id"), get("model name"), f"family {get('cpu family')}",
                                f"model {get('model')}", ",".join(extra)) if x.strip())


def env_summary() -> dict[str, Any]:
    keys = ("XLA_FLAGS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "JAX_PLATFORMS", "GLIBC_TUNABLES")
    return {k: os.environ.get(k) for k in keys if os.environ.get(k) is not None}


def write_report(report, md: str, markdown_path=None, json_path=None):
    """Prints a benchmark's markdown table and writes it and the JSON report where asked (the
    JSON through a temporary file, so a reader never sees half a report); ``md=""`` writes the
    JSON only."""
    if md:
        print(md)
    if md and markdown_path:
        with open(markdown_path, "w") as f:
            f.write(md + "\n")
    if json_path:
        tmp = json_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=1, default=float)
        os.replace(tmp, json_path)
