"""Reading a ``jax.profiler`` trace without TensorBoard: the per-op time table.

``jax.profiler.trace(dir, create_perfetto_trace=True)`` writes
``dir/plugins/profile/<run>/perfetto_trace.json.gz`` (Chrome trace-event JSON). On the CPU
each XLA op (a fusion, a YNNPACK/oneDNN matmul, a copy...) is one complete (``"X"``) event
named after the HLO instruction, so summing durations by name gives where the step's time
goes; :func:`top_ops` also finds each name's HLO line (shapes) in the compiled module text.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re

# events that are not XLA ops (runtime bookkeeping and Python frames)
_SKIP = re.compile(r"^(\$|end: )|::|PjitFunction|Handle |ParseArguments|AllocateOutput|Thunk|ThreadPool|np\.asarray|jax\.Array")


def load_events(trace_dir: str):
    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True))
    if not paths:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
    with gzip.open(paths[-1]) as f:
        d = json.load(f)
    return d["traceEvents"] if isinstance(d, dict) else d


def hlo_lines(hlo_text: str) -> dict[str, str]:
    out = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$", line)
        if m:
            out.setdefault(m.group(2), m.group(3))
    return out


def top_ops(trace_dir: str, hlo_text: str = "", n: int = 25, steps: int = 1) -> list[dict]:
    """The ``n`` XLA ops with the most total time, per step: name, milliseconds, share of the
    ops' total, calls per step, and the op's HLO (truncated)."""
    ev = load_events(trace_dir)
    dur = collections.Counter()
    cnt = collections.Counter()
    for e in ev:
        if e.get("ph") != "X":
            continue
        name = e.get("name", "")
        if _SKIP.search(name):
            continue
        dur[name] += float(e.get("dur", 0.0))
        cnt[name] += 1
    total = sum(dur.values()) or 1.0
    lines = hlo_lines(hlo_text) if hlo_text else {}
    rows = []
    for name, us in dur.most_common(n):
        hlo = lines.get(name, "")
        rows.append({
            "op": name, "ms_per_step": us / 1e3 / steps, "share": us / total, "calls_per_step": cnt[name] / steps,
            "hlo": hlo[:200],
        })
    return rows


def by_kind(rows_or_dir, hlo_text: str = "") -> dict[str, float]:
    """Shares of time grouped by a coarse op kind (matmul, fusion, copy/transpose, other)."""
    rows = top_ops(rows_or_dir, hlo_text, n=10_000) if isinstance(rows_or_dir, str) else rows_or_dir
    out = collections.Counter()
    for r in rows:
        h = r["hlo"]
        if "ynn" in r["op"] or "dot(" in h or "custom-call" in h and "matmul" in h:
            k = "matmul"
        elif r["op"].startswith(("copy", "transpose")) or h.startswith(("f32[", "bf16[")) and "transpose(" in h:
            k = "copy/transpose"
        elif "fusion" in r["op"]:
            k = "elementwise/reduce fusion"
        else:
            k = "other"
        out[k] += r["share"]
    return dict(out)
