"""Checksums of saved files: an array's SHA-256, and a metadata document's own checksum, so a
file changed after saving (bit rot, a partial write, an edit) is detected on load. :mod:`jpeft.io`
re-exports them."""

from __future__ import annotations

import hashlib
import json

import numpy as np

from jpeft.errors import CheckpointError


def sha256_hex(arr: np.ndarray) -> str:
    """The SHA-256 of a host array's bytes (C order), as saved adapters and checkpoints record it."""
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def with_checksum(doc: dict) -> dict:
    """``doc`` plus ``"checksum"``: the SHA-256 of its canonical JSON, so a metadata file changed
    after saving (bit rot, a partial write, an edit) is detected on load."""
    body = {k: v for k, v in doc.items() if k != "checksum"}
    out = dict(body)
    out["checksum"] = "sha256:" + hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    return out


def verify_checksum(doc: dict, where: str) -> None:
    """Raises :class:`CheckpointError` when ``doc["checksum"]`` does not match its content."""
    if "checksum" not in doc:
        raise CheckpointError(f"{where} has no 'checksum'; it was not written by jpeft or was damaged.")
    try:
        want = with_checksum(doc)["checksum"]
    except (TypeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{where} is corrupted: {e}") from None
    if doc["checksum"] != want:
        raise CheckpointError(
            f"{where} is corrupted: its content does not match its checksum (it was changed after saving). "
            "Use an intact copy, or save it again."
        )


__all__ = ["sha256_hex", "with_checksum", "verify_checksum"]
