"""The spectrum of a weight update: effective rank and intruder dimensions, for any method.

Pure NumPy on matrices in PyTorch's orientation ``W: [out, in]`` (a Flax kernel ``[in, out]``
is ``W.T``), so the singular vectors compared are the same ones Hugging Face PEFT compares.

* :func:`effective_rank`: Roy & Vetterli (2007), ``exp(H(p))`` with ``p_i = s_i / sum(s)``.
* :func:`rank_for_energy`: the smallest ``k`` whose top ``k`` singular values carry
  ``energy`` of ``sum(s**2)`` (Biderman et al. 2024 report the rank that explains 90 % of
  the update's variance).
* :func:`intruder_dimensions`: Shuttleworth et al. (2024), "LoRA vs Full Fine-tuning: An
  Illusion of Equivalence": among the top ``top_k`` left singular vectors of the fine-tuned
  matrix, those whose largest absolute cosine similarity with *any* left singular vector of
  the base matrix is below ``epsilon`` (the test of PEFT's ``reduce_intruder_dimension``).
* :func:`update_spectrum`: these numbers for every 2-D ``kernel`` that a method changed,
  from the base and the merged parameter trees.

>>> import numpy as np
>>> round(effective_rank(np.diag([1.0, 1.0, 0.0])), 6)   # two equal singular values
2.0
>>> rank_for_energy(np.diag([3.0, 1.0]), 0.9)   # 9 of 10 in the first
1
"""

from __future__ import annotations

import warnings

from typing import Any, Mapping

import numpy as np

from jpeft import quant
from jpeft.errors import InputValidationError
from jpeft.tree import unbox

__all__ = ["effective_rank", "rank_for_energy", "intruder_dimensions", "update_spectrum"]


def _matrix(w, name="matrix") -> np.ndarray:
    a = np.asarray(w, dtype=np.float64)
    if a.ndim != 2:
        raise InputValidationError(f"{name} must be a 2-D matrix, found shape {a.shape}.")
    return a


def _singular_values(w) -> np.ndarray:
    return np.linalg.svd(_matrix(w), compute_uv=False)


def effective_rank(w) -> float:
    """``exp(-sum p_i log p_i)``, ``p_i = s_i / sum(s)``: 1 for a rank-1 matrix, ``n`` for ``n``
    equal singular values; 0 for the zero matrix."""
    s = _singular_values(w)
    total = s.sum()
    if total == 0:
        return 0.0
    p = s[s > 0] / total
    return float(np.exp(-np.sum(p * np.log(p))))


def rank_for_energy(w, energy: float = 0.9) -> int:
    """The smallest ``k`` with ``sum(s[:k]**2) >= energy * sum(s**2)`` (0 for the zero matrix)."""
    if not 0 < energy <= 1:
        raise InputValidationError(f"energy must be in (0, 1], found {energy}.")
    s2 = _singular_values(w) ** 2
    total = s2.sum()
    if total == 0:
        return 0
    return int(np.searchsorted(np.cumsum(s2) / total, energy - 1e-12) + 1)


def intruder_dimensions(w_base, w_tuned, *, top_k: int = 10, epsilon: float = 0.5) -> dict:
    """Intruder dimensions of ``w_tuned`` against ``w_base`` (both ``[out, in]``).

    Returns ``{"indices", "similarity"}``: the indices (into the tuned matrix's singular
    vectors, by decreasing singular value, among the first ``top_k``) whose largest
    ``|cos|`` with a base singular vector is below ``epsilon``, and those largest ``|cos|`` for
    all of the first ``top_k``.
    """
    wb, wt = _matrix(w_base, "w_base"), _matrix(w_tuned, "w_tuned")
    if wb.shape != wt.shape:
        raise InputValidationError(f"w_base and w_tuned must have the same shape, found {wb.shape} and {wt.shape}.")
    if top_k < 1 or not 0 < epsilon <= 1:
        raise InputValidationError(f"top_k must be >= 1 and epsilon in (0, 1], found {top_k} and {epsilon}.")
    ub = np.linalg.svd(wb, full_matrices=False)[0]
    ut = np.linalg.svd(wt, full_matrices=False)[0]
    sim = np.abs(ut.T @ ub).max(axis=1)[:top_k]
    return {"indices": [int(i) for i in np.nonzero(sim < epsilon)[0]], "similarity": sim.tolist()}


def _kernels(tree, prefix=(), names=("kernel",)):
    """``(path, leaf)`` for every leaf whose name is in ``names`` (``kernel`` leaves by default)."""
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from _kernels(v, prefix + (str(k),), names)
    elif prefix and prefix[-1] in names:
        yield "/".join(prefix), quant.dequantize_array(tree)  # a quantized leaf: the kernel it stands for


def update_spectrum(params: Mapping[str, Any], merged: Mapping[str, Any], *, top_k: int = 10, epsilon: float = 0.5,
                    energy: float = 0.9) -> dict:
    """Per changed 2-D ``kernel`` (Flax ``[in, out]``, analysed as ``[out, in]``) of ``merged``
    against ``params``: the update's ``effective_rank``, its ``rank_for_energy`` (as a count
    and as a share of ``min(out, in)``) and the number of intruder dimensions of the merged
    matrix. Also their means (``mean_*``) and the total ``intruders`` over the changed kernels.
    Changed kernels of other ranks (a layer-scanned model's stacked ``[L, in, out]`` kernels,
    ``DenseGeneral``) and changed ``embedding`` tables (an embedding LoRA, full fine-tuning) are
    listed under ``skipped``, with a warning, not measured.

    ``merged`` is ``jpeft.merge(params, adapter)``: a method's update is what merging adds, so
    every mergeable method (and full fine-tuning) is measured the same way. A quantized ``params``
    (:func:`jpeft.quantize`; ``jpeft.merge`` of it is dequantized) is read as the kernels it
    dequantizes to, so the update is exactly what the adapter adds. Params boxed by
    ``nn.with_partitioning`` are read as the arrays they hold.
    """
    base = dict(_kernels(unbox(params)))  # a boxed kernel was float()'s raw TypeError on nn.Partitioned
    per, skipped = {}, []
    for path, wt in _kernels(unbox(merged)):
        if np.ndim(wt) != 2:
            if path in base and np.any(np.asarray(wt) != np.asarray(base[path])):
                skipped.append(path)
            continue
        if path not in base:
            raise InputValidationError(f"the merged tree has a kernel at {path!r} that the base does not.")
        wb = np.asarray(base[path], np.float64).T
        wt = np.asarray(wt, np.float64).T
        d = wt - wb
        if not np.any(d):
            continue
        k = rank_for_energy(d, energy)
        per[path] = {"effective_rank": effective_rank(d), "rank_for_energy": k, "rank_share": k / min(d.shape),
                     "intruders": len(intruder_dimensions(wb, wt, top_k=top_k, epsilon=epsilon)["indices"])}
    # embedding tables an embedding LoRA (or full fine-tuning) changed: not kernels, not measured, but said
    tables = dict(_kernels(params, names=("embedding",)))
    skipped += [path for path, wt in _kernels(merged, names=("embedding",))
                if path in tables and np.shape(wt) == np.shape(tables[path])
                and np.any(np.asarray(wt) != np.asarray(tables[path]))]
    skipped.sort()
    if skipped:
        warnings.warn(
            f"update_spectrum analyses 2-D kernels; {len(skipped)} changed kernel(s) of other ranks are not in its "
            f"numbers: {skipped[:4]}{' ...' if len(skipped) > 4 else ''} (a layer-scanned model's stacked kernels, "
            "DenseGeneral or Einsum kernels, embedding tables). Unstack a scanned model's params first (jpeft.scan.unstack_params) "
            "to measure them.",
            UserWarning, stacklevel=2)
    out = {"kernels": per, "changed": len(per), "skipped": skipped}
    for key in ("effective_rank", "rank_for_energy", "rank_share"):
        out[f"mean_{key}"] = float(np.mean([v[key] for v in per.values()])) if per else float("nan")
    out["intruders"] = int(sum(v["intruders"] for v in per.values()))
    return out
