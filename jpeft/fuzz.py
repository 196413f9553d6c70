"""Fuzzing of every jpeft loader: damaged files must end in a named jpeft error, quickly.

Each *target* is a loader plus a pristine fixture it can load (a saved adapter, a training
checkpoint, a Hugging Face model folder, a Hugging Face PEFT adapter). Each *case* copies the
fixture, applies one :class:`Mutation` to one of its files (a truncation, byte flips, a
rewritten safetensors header: wrong dtype, wrong shape, bad offsets, an oversized or
malformed header; a rewritten JSON file: malformed, truncated, deeply nested, oversized,
values of the wrong type) and calls the loader. The outcome is

* ``ok``: the loader returned exactly what the pristine fixture gives (the damage did not
  matter, e.g. a flipped byte in a file the loader does not need);
* ``changed``: the loader returned other values, in a format without checksums (a flipped
  weight byte in a Hugging Face safetensors file is a valid, different number); for jpeft's
  own formats, which carry SHA-256 checksums, this counts as ``unhandled``;
* ``named``: it raised a :class:`~jpeft.errors.JpeftError` subclass;
* ``unhandled``: it raised anything else, or took longer than the time bound.

Run ``python -m jpeft.fuzz --help``; ``python -m jpeft.fuzz --cases 300 --write-doc docs/RELIABILITY.md``
refreshes the figures in docs/RELIABILITY.md. ``tests/test_fuzz.py`` drives the same
mutations from hypothesis.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import struct
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jpeft
from jpeft.errors import JpeftError
from jpeft.hf import load_peft
from jpeft.models import from_pretrained

KINDS = (
    "truncate",        # cut the file at a random length
    "flip",            # flip 1-8 random bytes
    "zero_tail",       # zero the last part of the file
    "st_header_len",   # safetensors: a wrong header length (huge, zero, off by a few)
    "st_dtype",        # safetensors: change a tensor's dtype in the header
    "st_shape",        # safetensors: change a tensor's shape in the header
    "st_offsets",      # safetensors: bad data_offsets
    "st_header_junk",  # safetensors: malformed header JSON
    "json_truncate",   # JSON: cut inside the document
    "json_junk",       # JSON: replace by non-JSON / another JSON type
    "json_value",      # JSON: one value replaced by a value of another type
    "json_nested",     # JSON: deeply nested arrays
    "json_oversized",  # JSON: a huge document
    "delete",          # the file is missing
    "empty",           # the file is empty
)

# What a downloaded folder can hold instead of a file: these run on every file a jpeft reader
# opens itself (Target.hostile_files), each case, not by chance.
HOSTILE_KINDS = (
    "fifo",            # a named pipe with no writer (reading it would block for ever)
    "dev_zero",        # a symlink to /dev/zero (st_size 0, endless zeros)
    "sparse_tensor",   # safetensors: a header declaring a 1 GiB tensor, the file extended sparsely
)
SPARSE_BYTES = 1 << 30


@dataclasses.dataclass(frozen=True)
class Mutation:
    """One damage: ``kind`` (one of :data:`KINDS`) applied to the ``file``-th file of the
    fixture (modulo their number) at relative position ``pos`` in ``[0, 1)`` with ``value``
    (an integer that picks among variants)."""

    kind: str
    file: int
    pos: float
    value: int


@dataclasses.dataclass
class Target:
    name: str
    make_fixture: Callable[[Path], Path]  # writes the pristine fixture under the given dir, returns its root
    load: Callable[[Path], object]  # loads from a (possibly damaged) copy of the root
    files: Callable[[Path], list]  # the files of a fixture that mutations pick from
    # reduces a loaded result to comparable data; a case that loads must give the pristine answer
    digest: Callable[[object], object] = lambda r: None
    # False for formats without checksums (Hugging Face safetensors): a flipped weight byte there
    # loads as a different number and no loader can tell; such cases are counted as "changed"
    checksummed: bool = True
    # the files a hostile folder may replace by a FIFO, a device or a sparse file: those jpeft
    # opens itself (Orbax's own data files are read by tensorstore); None means every file
    hostile_files: Optional[Callable[[Path], list]] = None


# ------------------------------------------------------------------------------------------------
# mutations
# ------------------------------------------------------------------------------------------------
_WRONG_VALUES = [None, True, -1, 0, 2 ** 63, 1.5, float("inf"), "x", "", [], [1, 2], {}, {"a": 1}, "F32", [-1, 2], [2 ** 40]]


def _mutate_json_value(doc, rnd: random.Random):
    """Replaces one randomly chosen value anywhere in ``doc`` by a value of another type."""
    paths = []

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                paths.append(path + (k,))
                walk(v, path + (k,))
        elif isinstance(node, list):
            for i, v in enumerate(node[:50]):
                paths.append(path + (i,))
                walk(v, path + (i,))

    walk(doc, ())
    if not paths:
        return rnd.choice(_WRONG_VALUES)
    path = rnd.choice(paths)
    node = doc
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = rnd.choice(_WRONG_VALUES)
    return doc


def _st_split(data: bytes):
    if len(data) < 8:
        return None
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        return None
    try:
        header = json.loads(data[8:8 + n])
    except ValueError:
        return None
    return header, data[8 + n:]


def _st_join(header, body: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


def _sparse_tensor(path: Path) -> None:
    """Rewrites the first tensor of a safetensors file as a 1 GiB float32 tensor at the end of the
    data section and extends the file sparsely to fit (a few kB on disk); a JSON file becomes a
    sparse 1 GiB document."""
    data = path.read_bytes()
    split = _st_split(data)
    names = [k for k in split[0] if k != "__metadata__"] if split is not None else []
    if not names:
        path.write_bytes(b'{"pad": "')
        with open(path, "r+b") as f:
            f.truncate(SPARSE_BYTES)
        return
    header, body = split
    header[sorted(names)[0]] = {"dtype": "F32", "shape": [SPARSE_BYTES // 4],
                                "data_offsets": [len(body), len(body) + SPARSE_BYTES]}
    out = _st_join(header, body)
    path.write_bytes(out)
    with open(path, "r+b") as f:
        f.truncate(len(out) + SPARSE_BYTES)


def apply_mutation(path: Path, m: Mutation) -> None:
    """Applies ``m`` to the file at ``path`` in place (a mutation that does not fit the file's
    format falls back to byte flips, so every case damages something)."""
    rnd = random.Random(zlib.crc32(repr((m.kind, m.file, m.pos, m.value)).encode()))  # stable across processes
    if m.kind == "delete":
        path.unlink()
        return
    if m.kind in ("fifo", "dev_zero"):
        path.unlink()
        os.mkfifo(path) if m.kind == "fifo" else os.symlink("/dev/zero", path)
        return
    if m.kind == "sparse_tensor":
        _sparse_tensor(path)
        return
    data = path.read_bytes()
    n = len(data)
    at = int(m.pos * n) if n else 0
    out: Optional[bytes] = None
    if m.kind == "empty":
        out = b""
    elif m.kind == "truncate":
        out = data[:at]
    elif m.kind == "zero_tail":
        out = data[:at] + bytes(n - at)
    elif m.kind.startswith("st_"):
        split = _st_split(data)
        if split is not None:
            header, body = split
            names = [k for k in header if k != "__metadata__"] or ["__metadata__"]
            name = names[m.value % len(names)]
            e = header.get(name)
            if m.kind == "st_header_len":
                h = data[8:8 + struct.unpack("<Q", data[:8])[0]]
                lens = [2 ** 63, 2 ** 40, 0, len(h) + 1 + m.value % 7, max(0, len(h) - 1 - m.value % 7), n]
                out = struct.pack("<Q", lens[m.value % len(lens)]) + data[8:]
            elif m.kind == "st_dtype" and isinstance(e, dict):
                e["dtype"] = ["I8", "F16", "F64", "BOOL", "U8", "BF16", "F8_E4M3", "C64", "XX", 7][m.value % 10]
                out = _st_join(header, body)
            elif m.kind == "st_shape" and isinstance(e, dict):
                shapes = [[], [0], [1], [2 ** 31, 2 ** 31], [-1], [3, "a"], None, [10 ** 6], list(reversed(e.get("shape", [])))]
                e["shape"] = shapes[m.value % len(shapes)]
                out = _st_join(header, body)
            elif m.kind == "st_offsets" and isinstance(e, dict):
                b, en = (e.get("data_offsets") or [0, 0])[:2]
                offs = [[en, b], [b, en + 4], [b + 4, en], [-4, en], [b, 2 ** 62], [0, 0], "x", [b]]
                e["data_offsets"] = offs[m.value % len(offs)]
                out = _st_join(header, body)
            elif m.kind == "st_header_junk":
                junk = [b"{", b"[]", b"null", b"\xff\xfe", b'{"a": {"dtype": "F32"}}', b"{" * 5000, b'{"__metadata__": 5}']
                h = junk[m.value % len(junk)]
                out = struct.pack("<Q", len(h)) + h + body
    elif m.kind.startswith("json_"):
        try:
            doc = json.loads(data)
        except ValueError:
            doc = None
        if doc is not None or m.kind in ("json_junk", "json_nested", "json_oversized"):
            if m.kind == "json_truncate":
                out = data[: max(0, min(at, n - 1))]
            elif m.kind == "json_junk":
                junk = [b"", b"not json", b"[1, 2]", b"null", b"42", b'"str"', b"\xff\xfe\x00", b"{\"a\": NaN}", b"{}"]
                out = junk[m.value % len(junk)]
            elif m.kind == "json_value":
                out = json.dumps(_mutate_json_value(doc, rnd)).encode()
            elif m.kind == "json_nested":
                depth = 10_000 + 1000 * (m.value % 90)
                out = b"[" * depth + b"]" * depth
            elif m.kind == "json_oversized":
                out = b'{"pad": "' + b"x" * ((70 << 20) if m.value % 8 == 0 else (1 << 20)) + b'"}'
    if out is None:  # the file has another format: flip bytes instead
        m = dataclasses.replace(m, kind="flip")
    if m.kind == "flip":
        b = bytearray(data)
        if b:
            for _ in range(1 + m.value % 8):
                i = rnd.randrange(len(b)) if m.value % 2 else min(len(b) - 1, at + rnd.randrange(4))
                b[i] ^= 1 << rnd.randrange(8)
        out = bytes(b)
    path.write_bytes(out)


# ------------------------------------------------------------------------------------------------
# running cases
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Outcome:
    status: str  # "ok" | "named" | "unhandled"
    error: str
    seconds: float


def run_case(target: Target, pristine: Path, m: Mutation, scratch: Path, *, time_bound: float = 10.0,
             expected=None) -> Outcome:
    """Copies the fixture, damages it with ``m`` and runs the loader under a time bound.
    ``expected`` is ``target.digest`` of the pristine fixture's result: a case that loads must
    return exactly that."""
    work = scratch / f"case_{time.monotonic_ns()}"
    shutil.copytree(pristine, work, symlinks=True)
    files = (target.hostile_files or target.files)(work) if m.kind in HOSTILE_KINDS else target.files(work)
    apply_mutation(files[m.file % len(files)], m)
    result: dict = {}

    def call():
        t0 = time.perf_counter()
        try:
            got = target.digest(target.load(work))
            if got != expected and target.checksummed:
                result["status"], result["error"] = "unhandled", "loaded without error but returned different data (silent corruption)"
            elif got != expected:
                result["status"], result["error"] = "changed", "loaded different values (the format has no checksum)"
            else:
                result["status"], result["error"] = "ok", ""
        except JpeftError as e:
            result["status"], result["error"] = "named", f"{type(e).__name__}: {str(e)[:300]}"
        except BaseException as e:  # noqa: BLE001 - that is what the fuzzer is looking for
            result["status"], result["error"] = "unhandled", f"{type(e).__name__}: {str(e)[:300]}"
        result["seconds"] = time.perf_counter() - t0

    th = threading.Thread(target=call, daemon=True)
    th.start()
    th.join(time_bound)
    if th.is_alive():
        out = Outcome("unhandled", f"no answer within {time_bound}s (hang)", time_bound)
    else:
        out = Outcome(result["status"], result["error"], result["seconds"])
        if out.seconds > time_bound:
            out = Outcome("unhandled", f"took {out.seconds:.1f}s > {time_bound}s: {out.error}", out.seconds)
        shutil.rmtree(work, ignore_errors=True)
    return out


def random_mutation(rnd: random.Random) -> Mutation:
    return Mutation(rnd.choice(KINDS), rnd.randrange(64), rnd.random(), rnd.randrange(1 << 16))


# ------------------------------------------------------------------------------------------------
# targets
# ------------------------------------------------------------------------------------------------
def _tiny_base():
    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(8, name="q_proj")(x)
            return nn.Dense(4, name="v_proj")(h)

    m = Tiny()
    return m, m.init(jax.random.key(0), jnp.ones((1, 6)))


def _arrays_digest(tree):
    """Structure, dtypes, shapes and bytes of every leaf, as one comparable tuple."""
    leaves, treedef = jax.tree.flatten(tree)
    h = hashlib.sha256()
    for x in leaves:
        a = np.asarray(x)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return str(treedef), h.hexdigest()


def _files_of(root: Path) -> list:
    return sorted(p for p in root.rglob("*") if p.is_file())


def adapter_targets() -> list[Target]:
    """``load_adapter`` and ``read_adapter_info`` on a saved LoRA adapter."""
    model, params = _tiny_base()
    cfg = jpeft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    adapter = jpeft.init(cfg, params, jax.random.key(1))

    def make(d: Path) -> Path:
        return jpeft.save_adapter(d / "adapter", cfg, adapter, params=params, metadata={"note": "fuzz fixture"})

    def digest_loaded(r):
        cfg2, a = r
        return cfg2.to_json(), _arrays_digest(a)

    def digest_info(info):
        return (info.config.to_json(), json.dumps(info.base, sort_keys=True), sorted(info.arrays.items()),
                info.num_params, info.nbytes, info.jpeft_version, json.dumps(info.metadata, sort_keys=True))

    return [
        Target("load_adapter", make, lambda p: jpeft.load_adapter(p, params), _files_of, digest_loaded),
        Target("read_adapter_info", make, lambda p: jpeft.read_adapter_info(p), _files_of, digest_info),
    ]


def checkpoint_target() -> Target:
    """``CheckpointManager.restore_latest`` on an Orbax training checkpoint (adapter + Adam)."""
    model, params = _tiny_base()
    cfg = jpeft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    adapter = jpeft.init(cfg, params, jax.random.key(1))
    opt = optax.adam(1e-3)

    def make(d: Path) -> Path:
        root = d / "ckpt"
        with jpeft.checkpoint.CheckpointManager(root, cfg, params, optimizer=opt, async_save=False) as m:
            m.save(7, adapter, opt.init(adapter), jax.random.key(3), data_position={"epoch": 1, "index": 7},
                   metrics={"loss": 1.0})
        return root

    def load(root: Path):
        with jpeft.checkpoint.CheckpointManager(root, cfg, params, optimizer=opt, async_save=False) as m:
            st = m.restore_latest()
            if st is None:
                raise AssertionError("restore_latest returned None on a directory holding a checkpoint")
            return st

    def files(root: Path) -> list:
        # the step's files; the step directory name itself is not fuzzed
        return _files_of(root / "7") if (root / "7").exists() else _files_of(root)

    def digest(st):
        return (st.step, json.dumps(st.data_position, sort_keys=True), json.dumps(st.metrics, sort_keys=True),
                _arrays_digest((st.adapter, st.opt_state, jax.random.key_data(st.key))))

    def own_files(root: Path) -> list:
        return [p for p in files(root) if p.parent.name == "meta" and p.name == "metadata"]

    return Target("checkpoint_restore", make, load, files, digest, hostile_files=own_files)


def hf_targets() -> list[Target]:
    """``jpeft.models.from_pretrained`` and ``jpeft.hf.load_peft`` on folders written by
    transformers / peft (only where those packages are installed)."""
    out = []
    try:
        import torch  # noqa: F401
        import transformers
    except ImportError:
        return out

    def make_model(d: Path) -> Path:
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
        root = d / "hf_model"
        transformers.LlamaForCausalLM(cfg).save_pretrained(root)
        return root

    def digest_model(r):
        model, params = r
        return repr(getattr(model, "config", model)), _arrays_digest(params)

    out.append(Target("models.from_pretrained", make_model, lambda p: from_pretrained(p), _files_of, digest_model,
                      checksummed=False))
    try:
        import peft
    except ImportError:
        return out

    base_params: dict = {}

    def make_peft(d: Path) -> Path:
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
        base = transformers.LlamaForCausalLM(cfg)
        base.save_pretrained(d / "base")
        pm = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        root = d / "peft_adapter"
        pm.save_pretrained(root)
        base_params["params"] = from_pretrained(d / "base")[1]  # the jpeft base the adapter is loaded onto
        return root

    def load_peft_case(p: Path):
        return load_peft(p, base_params["params"])

    def digest_peft(r):
        cfg, adapter = r
        return cfg.to_json(), _arrays_digest(adapter)

    out.append(Target("hf.load_peft", make_peft, load_peft_case, _files_of, digest_peft, checksummed=False))
    return out


def all_targets(include_hf: bool = True) -> list[Target]:
    ts = adapter_targets() + [checkpoint_target()]
    if include_hf:
        ts += hf_targets()
    return ts


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
def fuzz(targets: list[Target], cases: int, seed: int, time_bound: float, progress: bool = True) -> dict:
    """Runs ``cases`` random mutations per target; returns ``{target: stats}``."""
    rnd = random.Random(seed)
    stats = {}
    # Orbax and tensorstore log every damaged file they meet; the outcome table says it all.
    for name in ("absl", "asyncio", "orbax", "jax"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="jpeft_fuzz_") as tmp:
        tmp = Path(tmp)
        for t in targets:
            fixture_dir = tmp / f"fixture_{t.name}"
            fixture_dir.mkdir()
            root = t.make_fixture(fixture_dir)
            expected = t.digest(t.load(root))  # the pristine fixture must load
            s = {"cases": 0, "ok": 0, "changed": 0, "named": 0, "unhandled": 0, "max_seconds": 0.0, "examples": [],
                 "errors": {}}
            it = range(cases)
            if progress:
                from tqdm.auto import tqdm

                it = tqdm(it, desc=t.name, unit="case")
            hostile = [Mutation(kind, i, 0.0, 0) for kind in HOSTILE_KINDS
                       for i in range(len((t.hostile_files or t.files)(root)))]
            for _ in it:
                m = random_mutation(rnd)
                o = run_case(t, root, m, tmp, time_bound=time_bound, expected=expected)
                record(s, m, o)
            for m in hostile:
                record(s, m, run_case(t, root, m, tmp, time_bound=time_bound, expected=expected))
            s["hostile"] = len(hostile)
            stats[t.name] = s
    return stats


def record(s: dict, m: Mutation, o: Outcome) -> None:
    """Adds one case's outcome to a target's statistics."""
    s["cases"] += 1
    s[o.status] += 1
    s["max_seconds"] = max(s["max_seconds"], o.seconds)
    if o.status == "named":
        name = o.error.split(":", 1)[0]
        s["errors"][name] = s["errors"].get(name, 0) + 1
    if o.status == "unhandled" and len(s["examples"]) < 5:
        s["examples"].append({"mutation": dataclasses.asdict(m), "error": o.error})


def table(stats: dict, cases: int, seed: int, time_bound: float) -> str:
    lines = [
        f"<!-- fuzz:begin (python -m jpeft.fuzz --cases {cases} --seed {seed} --time-bound {time_bound:g}) -->",
        "| loader | cases (random + hostile) | loaded, same data | loaded, other values (no checksum in format) | named jpeft error | unhandled | slowest case (s) | errors raised |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in stats.items():
        errs = ", ".join(f"{k} {v}" for k, v in sorted(s["errors"].items(), key=lambda kv: -kv[1]))
        n = f"{s['cases'] - s.get('hostile', 0)} + {s['hostile']}" if s.get("hostile") else f"{s['cases']}"
        lines.append(f"| `{name}` | {n} | {s['ok']} | {s['changed']} | {s['named']} | **{s['unhandled']}** | "
                     f"{s['max_seconds']:.2f} | {errs} |")
    lines.append("<!-- fuzz:end -->")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m jpeft.fuzz",
        description=(
            "Fuzz jpeft's loaders with damaged files (truncations, byte flips, wrong dtypes and shapes in safetensors "
            "headers, malformed, nested and oversized JSON). Every case must end in success or a named jpeft error "
            "within the time bound; anything else is counted as unhandled and printed. Exit status 1 if any case "
            "was unhandled."
        ),
        epilog="Example: python -m jpeft.fuzz --cases 300 --write-doc docs/RELIABILITY.md",
    )
    ap.add_argument("--cases", type=int, default=200, help="cases per loader (default 200)")
    ap.add_argument("--seed", type=int, default=0, help="random seed; the same seed replays the same cases")
    ap.add_argument("--time-bound", type=float, default=10.0, help="seconds a case may take (default 10)")
    ap.add_argument("--loaders", default="all",
                    help="comma-separated loader names (load_adapter, read_adapter_info, checkpoint_restore, "
                         "models.from_pretrained, hf.load_peft) or 'all'")
    ap.add_argument("--no-hf", action="store_true", help="skip the Hugging Face loaders (no torch/transformers needed)")
    ap.add_argument("--write-doc", metavar="PATH", help="replace the table between the fuzz markers in this markdown file")
    ap.add_argument("--json", action="store_true", help="print the full statistics as JSON")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    a = ap.parse_args(argv)
    targets = all_targets(include_hf=not a.no_hf)
    if a.loaders != "all":
        want = set(a.loaders.split(","))
        unknown = want - {t.name for t in targets}
        if unknown:
            ap.error(f"unknown or unavailable loaders {sorted(unknown)}; available: {[t.name for t in targets]}")
        targets = [t for t in targets if t.name in want]
    stats = fuzz(targets, a.cases, a.seed, a.time_bound, progress=not a.no_progress)
    tab = table(stats, a.cases, a.seed, a.time_bound)
    print(json.dumps(stats, indent=1) if a.json else tab)
    for name, s in stats.items():
        for ex in s["examples"]:
            print(f"UNHANDLED in {name}: {ex}", file=sys.stderr)
    if a.write_doc:
        p = Path(a.write_doc)
        text = p.read_text()
        b, e = text.find("<!-- fuzz:begin"), text.find("<!-- fuzz:end -->")
        if b < 0 or e < 0:
            print(f"{p} has no <!-- fuzz:begin --> ... <!-- fuzz:end --> markers; not written", file=sys.stderr)
            return 2
        p.write_text(text[:b] + tab + text[e + len("<!-- fuzz:end -->"):])
    return 1 if any(s["unhandled"] for s in stats.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
