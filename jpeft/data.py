"""Text and JSONL datasets for causal language-model fine-tuning: load, tokenize, pack.

A dataset file is either

* plain text (``.txt``, ``.md``, any suffix other than ``.jsonl``/``.json``): the whole file is
  one document and every token is trained on; or
* JSON Lines (``.jsonl``): one object per line, either ``{"text": ...}`` (every token is
  trained on) or ``{"prompt": ..., "completion": ...}`` (the loss is taken on the
  completion tokens only, as in supervised instruction tuning). Field names are configurable.

Documents are tokenized, joined with the end-of-sequence token and **packed** into rows of
``seq_len`` tokens, so no compute is spent on padding. A row of the result holds
``input_ids[seq_len]`` and ``loss_mask[seq_len]``; position ``t`` of ``loss_mask`` says
whether token ``t`` is a target (it is predicted from tokens ``< t``), so the loss of a
causal model is taken on ``logits[:, :-1]`` against ``input_ids[:, 1:]`` weighted by
``loss_mask[:, 1:]`` (see :func:`causal_lm_loss`).

Batches are a pure function of ``(seed, step)`` (:meth:`PackedDataset.batch`), which is what
makes a resumed training run reproduce an uninterrupted one exactly.

>>> ds = PackedDataset.from_examples(
...     [{"prompt": "ab", "completion": "cd"}], encode=lambda s: [ord(c) for c in s], seq_len=4, eos_id=0)
>>> ds.input_ids.tolist(), ds.loss_mask.astype(int).tolist()
([[97, 98, 99, 100]], [[0, 0, 1, 1]])
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from jpeft.errors import InputValidationError, LoadError

__all__ = ["load_examples", "tokenize_examples", "pack", "PackedDataset", "causal_lm_loss"]


def load_examples(
    path: str | os.PathLike,
    *,
    text_field: str = "text",
    prompt_field: str = "prompt",
    completion_field: str = "completion",
) -> list[dict[str, str]]:
    """Reads a text or JSONL dataset into a list of ``{"text": ...}`` or
    ``{"prompt": ..., "completion": ...}`` dicts.

    Args:
      path: a ``.jsonl`` file (one JSON object per line), or any other file read as UTF-8
        text (one document).
      text_field / prompt_field / completion_field: the JSONL keys to read.

    Raises:
      LoadError: the file is missing, a JSONL line is not a JSON object, or a line has
        neither ``text_field`` nor both ``prompt_field`` and ``completion_field``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise LoadError(f"dataset file {path!r} does not exist (expected a .txt or .jsonl file).")
    try:
        return _read_examples(path, text_field, prompt_field, completion_field)
    except UnicodeDecodeError as e:
        raise LoadError(f"dataset file {path!r} is not UTF-8 text ({e.reason} at byte {e.start}); "
                        "give a UTF-8 .txt or .jsonl file.") from None


def _read_examples(path: str, text_field: str, prompt_field: str, completion_field: str) -> list[dict[str, str]]:
    if not path.endswith((".jsonl", ".json")):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if not text.strip():
            raise LoadError(f"dataset file {path!r} is empty; put some text in it.")
        return [{"text": text}]
    out: list[dict[str, str]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise LoadError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object.") from None
            except RecursionError:
                raise LoadError(f"{path}:{lineno}: JSON nested too deeply to read; each line must be one flat object.") from None
            if not isinstance(row, Mapping):
                raise LoadError(f"{path}:{lineno}: expected a JSON object, found {type(row).__name__}.")
            if prompt_field in row and completion_field in row:
                out.append({"prompt": str(row[prompt_field]), "completion": str(row[completion_field])})
            elif text_field in row:
                out.append({"text": str(row[text_field])})
            else:
                raise LoadError(
                    f"{path}:{lineno}: expected a {text_field!r} field or both {prompt_field!r} and "
                    f"{completion_field!r}, found keys {sorted(row)}. Rename the fields or set "
                    "text_field / prompt_field / completion_field in the [data] section."
                )
    if not out:
        raise LoadError(f"dataset file {path!r} has no examples.")
    return out


def tokenize_examples(
    examples: Iterable[Mapping[str, str]],
    encode: Callable[[str], Sequence[int]],
    *,
    eos_id: Optional[int] = None,
    bos_id: Optional[int] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenizes examples into one token stream and a loss mask of the same length.

    Each document is ``[bos] + tokens + [eos]`` (when those ids are given). For a
    prompt/completion pair the prompt tokens (and the ``bos``) are masked out; the
    completion tokens and the closing ``eos`` are targets.

    Returns:
      ``(ids int32[n], mask bool[n])``.
    """
    ids: list[int] = []
    mask: list[bool] = []
    for ex in examples:
        if bos_id is not None:
            ids.append(int(bos_id))
            mask.append(False)
        if "text" in ex:
            t = list(encode(ex["text"]))
            ids.extend(t)
            mask.extend([True] * len(t))
        else:
            p = list(encode(ex["prompt"]))
            c = list(encode(ex["completion"]))
            ids.extend(p)
            mask.extend([False] * len(p))
            ids.extend(c)
            mask.extend([True] * len(c))
        if eos_id is not None:
            ids.append(int(eos_id))
            mask.append(True)
    return np.asarray(ids, np.int32), np.asarray(mask, bool)


def pack(ids: np.ndarray, mask: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Cuts a token stream into ``[rows, seq_len]`` rows (the incomplete tail is dropped).

    Raises:
      InputValidationError: ``seq_len < 2`` or the stream is shorter than one row.
    """
    if not isinstance(seq_len, (int, np.integer)) or seq_len < 2:
        raise InputValidationError(f"seq_len must be an integer >= 2, found {seq_len!r}.")
    n = len(ids) // seq_len
    if n == 0:
        raise InputValidationError(
            f"the dataset has {len(ids)} tokens, fewer than one row of seq_len={seq_len}; "
            "add data or lower seq_len."
        )
    return (
        np.asarray(ids[: n * seq_len], np.int32).reshape(n, seq_len),
        np.asarray(mask[: n * seq_len], bool).reshape(n, seq_len),
    )


@dataclasses.dataclass(frozen=True)
class PackedDataset:
    """Packed rows ``input_ids[rows, seq_len]`` and ``loss_mask[rows, seq_len]``."""

    input_ids: np.ndarray
    loss_mask: np.ndarray

    @classmethod
    def from_examples(cls, examples, encode, seq_len: int, *, eos_id=None, bos_id=None) -> "PackedDataset":
        ids, mask = tokenize_examples(examples, encode, eos_id=eos_id, bos_id=bos_id)
        return cls(*pack(ids, mask, seq_len))

    @classmethod
    def from_file(cls, path, encode, seq_len: int, *, eos_id=None, bos_id=None, **fields) -> "PackedDataset":
        """:func:`load_examples` then :meth:`from_examples`."""
        return cls.from_examples(load_examples(path, **fields), encode, seq_len, eos_id=eos_id, bos_id=bos_id)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def num_targets(self) -> int:
        """Tokens that carry loss (excluding each row's first position, never predicted)."""
        return int(self.loss_mask[:, 1:].sum())

    def batch(self, step: int, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
        """The batch of training step ``step``: a pure function of ``(seed, step)``.

        Rows are drawn without replacement from a fresh permutation per epoch, so every
        row is seen once per epoch, and ``batch(step)`` needs no iterator state (resuming
        at step ``k`` continues exactly where an uninterrupted run would be).
        """
        n = len(self)
        pos = np.arange(step * batch_size, (step + 1) * batch_size)
        epochs, within = pos // n, pos % n
        idx = np.empty_like(pos)
        for e in np.unique(epochs):
            perm = np.random.default_rng([int(seed), int(e)]).permutation(n)
            sel = epochs == e
            idx[sel] = perm[within[sel]]
        return {"input_ids": self.input_ids[idx], "loss_mask": self.loss_mask[idx]}

    def eval_batches(self, batch_size: int, max_rows: Optional[int] = None):
        """Yields the rows in order, for evaluation. Every batch has ``batch_size`` rows (one
        compiled shape): the last one is padded with rows whose ``loss_mask`` is all false."""
        n = len(self) if max_rows is None else min(len(self), max_rows)
        for i in range(0, n, batch_size):
            j = min(n, i + batch_size)
            ids, mask = self.input_ids[i:j], self.loss_mask[i:j]
            if j - i < batch_size:
                pad = batch_size - (j - i)
                ids = np.concatenate([ids, np.zeros((pad, ids.shape[1]), ids.dtype)])
                mask = np.concatenate([mask, np.zeros((pad, mask.shape[1]), bool)])
            yield {"input_ids": ids, "loss_mask": mask}


def causal_lm_loss(logits, input_ids, loss_mask) -> tuple[Any, Any]:
    """Mean next-token cross-entropy over the masked targets.

    Args:
      logits: ``[B, L, V]`` model outputs for ``input_ids``.
      input_ids: ``[B, L]``.
      loss_mask: ``[B, L]``; position ``t`` weights the prediction of token ``t``.

    Returns:
      ``(mean_loss, number_of_targets)`` (float32 scalars).

    >>> import jax.numpy as jnp
    >>> loss, n = causal_lm_loss(jnp.zeros((1, 3, 4)), jnp.array([[0, 1, 2]]), jnp.array([[1, 1, 1]]))
    >>> round(float(loss), 4), int(n)   # uniform logits over 4 classes: log 4
    (1.3863, 2)
    """
    import jax
    import jax.numpy as jnp

    # Targets are shifted, not the logits (as transformers' ForCausalLMLoss does): slicing
    # ``logits[:, :-1]`` would copy the largest activation of the step, and the log-softmax
    # is never materialised either (logsumexp minus the picked logit).
    logits = logits.astype(jnp.float32)
    pad = jnp.zeros_like(input_ids[:, :1])
    tgt = jnp.concatenate([input_ids[:, 1:], pad], axis=1)
    w = jnp.concatenate([loss_mask[:, 1:], pad.astype(loss_mask.dtype)], axis=1).astype(jnp.float32)
    picked = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - picked
    n = w.sum()
    return (nll * w).sum() / jnp.maximum(n, 1.0), n
