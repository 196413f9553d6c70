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


# A metadata document's checksum is of its JSON in the document's own key order ("sha256o:"), since
# order carries meaning in it: rank_pattern / alpha_pattern take the first matching key, so an edit
# that only swaps two keys changes what an adapter computes. Earlier jpeft wrote "sha256:", the
# hash of the keys sorted, which such an edit leaves intact; files with it are still read (and checked
# that way: their key order cannot be verified).
_ORDERED = "sha256o:"
_SORTED = "sha256:"


def _digest(body: dict, sort_keys: bool) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=sort_keys).encode()).hexdigest()


def with_checksum(doc: dict) -> dict:
    """``doc`` plus ``"checksum"``: the SHA-256 of its JSON in its own key order, so a metadata file
    changed after saving (bit rot, a partial write, an edit, a reordering of first-match patterns) is
    detected on load."""
    body = {k: v for k, v in doc.items() if k != "checksum"}
    out = dict(body)
    out["checksum"] = _ORDERED + _digest(body, sort_keys=False)
    return out


def verify_checksum(doc: dict, where: str) -> None:
    """Raises :class:`CheckpointError` when ``doc["checksum"]`` does not match its content (in its key
    order; an older file's ``"sha256:"`` checksum, of the sorted keys, is checked as it was written)."""
    if "checksum" not in doc:
        raise CheckpointError(f"{where} has no 'checksum'; it was not written by jpeft or was damaged.")
    got = doc["checksum"]
    body = {k: v for k, v in doc.items() if k != "checksum"}
    try:
        if isinstance(got, str) and got.startswith(_SORTED):
            want = _SORTED + _digest(body, sort_keys=True)
        else:
            want = _ORDERED + _digest(body, sort_keys=False)
    except (TypeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{where} is corrupted: {e}") from None
    if got != want:
        raise CheckpointError(
            f"{where} is corrupted: its content does not match its checksum (it was changed after saving). "
            "Use an intact copy, or save it again."
        )


__all__ = ["sha256_hex", "with_checksum", "verify_checksum"]
