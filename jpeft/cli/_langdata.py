"""Python standard-library source code as bytes, split by file into train and held-out parts
(the held-out files are never seen in pretraining)."""

from __future__ import annotations

import hashlib
import os
import sysconfig


def stdlib_files() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "test", "tests",
                                                            "idlelib", "lib2to3", "__pycache__", "turtledemo"))
        for f in sorted(filenames):
            if f.endswith(".py"):
                out.append(os.path.join(dirpath, f))
    return out


def code_bytes(tiny: bool = False, max_bytes: int = 4_000_000) -> tuple[bytes, bytes]:
    """``(train, held_out)``: about ``max_bytes`` of code (300 kB when ``tiny``); one file
    in ten (chosen by a hash of its name) is held out."""
    limit = 300_000 if tiny else max_bytes
    train, held = [], []
    nt = nh = 0
    root = sysconfig.get_paths()["stdlib"]
    for path in stdlib_files():
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            continue
        if len(data) > 200_000:
            continue
        rel = os.path.relpath(path, root)
        is_held = int(hashlib.md5(rel.encode()).hexdigest(), 16) % 10 == 0
        if is_held and nh < limit // 8:
            held.append(data)
            nh += len(data)
        elif not is_held and nt < limit:
            train.append(data)
            nt += len(data)
        if nt >= limit and nh >= limit // 8:
            break
    return b"\n\n".join(train), b"\n\n".join(held)
