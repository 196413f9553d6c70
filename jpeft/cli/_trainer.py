"""``jpeft train``: a Hugging Face folder, packed data and AdamW handed to :func:`jpeft.fit`,
the one training loop (guard, validation, periodic eval, checkpoints with exact resume,
Ctrl-C, progress bar, JSONL/TensorBoard metrics)."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import shutil
import uuid
import warnings
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jpeft
from jpeft import distributed as dist
from jpeft.checkpoint import CheckpointManager
from jpeft.cli._ckpt import save_adapter
from jpeft.cli._common import method_class, method_name_of, method_of, say as _say
from jpeft.cli._model import load_folder, read_tokenizer
from jpeft.config import ordered_fields
from jpeft.core import logits_of
from jpeft.data import is_conversation, load_examples, model_inputs, PackedDataset, render_chat, text_encoder
from jpeft.errors import (BaseMismatchError, CheckpointError, CheckpointUnreadableError, ConfigError, DistributedError,
                          SaveError, ShardingError)
from jpeft.forgetting.guard import current_lr_scale
from jpeft.forgetting.metrics import perplexity
from jpeft._files import atomic_write, check_folder
from jpeft.models import LlamaForCausalLM, loading
from jpeft.parallel import kernels_on
from jpeft.train import decay_mask
from jpeft.tree import host_array
from jpeft.validate import check_tokens, position_limit


def check_seq_len(seq_len: int, hf_config: dict, what: str, extra: int = 0) -> None:
    """Refuses rows longer than a learned position table (GPT-2, BERT: past it the lookup gives
    NaN or fails; :func:`jpeft.validate.position_limit`); ``extra``: the positions the method puts
    before every row (:attr:`jpeft.AdapterConfig.extra_positions`). A rotary model (Llama,
    Mistral, Qwen2/3) runs past its ``max_position_embeddings``, as jpeft's models, transformers
    and PEFT do: that is allowed, with a warning that the positions past it extrapolate."""
    limit = max_positions(hf_config)
    if limit is None or seq_len + extra <= limit:
        return
    plus = f" plus the method's {extra} virtual tokens" if extra else ""
    if position_limit(loading.config_from_hf(hf_config)) is None:
        warnings.warn(f"{what}={seq_len}{plus} is longer than the model's max_position_embeddings={limit}: its rotary "
                      f"positions past {limit} are computed as transformers computes them (extrapolated), but the "
                      "model was not trained on them.", stacklevel=2)
        return
    raise ConfigError(f"{what}={seq_len}{plus} exceeds the model's max_position_embeddings={limit}: a "
                      f"{hf_config.get('model_type')!r} model reads each position from a learned table of {limit} rows and has "
                      f"none past it (transformers refuses such rows too); use at most {limit - extra}.")


def max_positions(hf_config: dict) -> Optional[int]:
    """The model's position range from its config.json (None when it names none)."""
    limit = hf_config.get("max_position_embeddings", hf_config.get("n_positions"))
    return None if limit is None else int(limit)


def run_keys(seed: int):
    """``(k_init, k_train)`` of a run's ``seed``: the initial adapter's key and the base of the
    steps' dropout keys. ``jax.random.key`` keeps only the low 32 bits of a seed (JAX's default
    32-bit mode), so seeds ``s`` and ``s + 2**32`` would draw the same adapter and dropout; the
    high bits are folded in (a seed below ``2**32`` gives ``jax.random.key(seed)``'s keys, as before).

    >>> import jax
    >>> a, b = run_keys(3)[0], run_keys(3 + 2 ** 32)[0]
    >>> bool((jax.random.key_data(a) == jax.random.key_data(b)).all())
    False
    """
    seed = int(seed)
    key = jax.random.key(seed & 0xFFFFFFFF)
    if seed >> 32:
        key = jax.random.fold_in(key, seed >> 32)  # < 2**31: the config's seed is below 2**63
    return tuple(jax.random.split(key))


def make_optimizer(t: dict, total_steps: int, lr_scale: bool = False, method=None):
    """AdamW with warm-up and cosine decay (and clipping), weight decay on what
    :func:`jpeft.train.decay_mask` selects (biases and norms left out, as transformers'
    ``Trainer`` does); ``lr_scale`` appends
    :func:`jpeft.lr_scale`, the stage a forgetting-guard rollback lowers. ``method`` (a method
    config) wraps what follows the clipping (:meth:`jpeft.AdapterConfig.wrap_optimizer`: AdaLoRA's
    rank allocator then reads the clipped gradients, as PEFT's under the ``Trainer``)."""
    lr = float(t["learning_rate"])
    warm = int(t["warmup_steps"])
    if warm > 0:
        sched = optax.warmup_cosine_decay_schedule(0.0, lr, warm, max(total_steps, warm + 1), end_value=0.1 * lr)
    else:
        sched = optax.cosine_decay_schedule(lr, max(total_steps, 1), alpha=0.1)
    parts = []
    if t.get("max_grad_norm"):
        parts.append(optax.clip_by_global_norm(float(t["max_grad_norm"])))
    wd = float(t["weight_decay"])
    # no mask without decay: the optimizer state (and its checkpoints) stays what it was
    inner = [optax.adamw(sched, weight_decay=wd, mask=decay_mask if wd else None)]
    if lr_scale:
        inner.append(jpeft.lr_scale())
    tx = inner[0] if len(inner) == 1 else optax.chain(*inner)
    wrapped = tx if method is None else method.wrap_optimizer(tx, total_steps)
    # unwrapped: the flat chain of earlier jpeft versions, whose checkpoints' optimizer state it restores
    parts += inner if wrapped is tx else [wrapped]
    return optax.chain(*parts), sched


def applied_lr(sched):
    """``lr(opt_state, skipped)``: the learning rate the last update applied, read from the state
    :func:`make_optimizer`'s optimizer holds after it: ``sched`` at the update's count (the count
    lags the step number after skipped steps and is rewound by a forgetting-guard rollback) times
    the :func:`jpeft.lr_scale` a rollback lowered."""

    def lr(opt_state, skipped: bool) -> float:
        is_sched = lambda x: isinstance(x, optax.ScaleByScheduleState)  # noqa: E731
        found = [x for x in jax.tree.leaves(opt_state, is_leaf=is_sched) if is_sched(x)]
        count = int(host_array(found[0].count)) - (0 if skipped else 1)
        scale = current_lr_scale(opt_state)
        return float(sched(max(count, 0))) * (1.0 if scale is None else float(host_array(scale)))

    return lr


def loss_chunk_tokens(t: dict):
    """``train.loss_chunk_tokens`` as :func:`jpeft.lm_loss` takes it (0: the whole logits)."""
    v = t.get("loss_chunk_tokens", "auto")
    return None if v == 0 else v


def make_loss_fns(model, mesh=None, chunk_tokens="auto", model_dropout: bool = True, method=None):
    """The training loss and the jitted evaluation sums (:func:`jpeft.lm_loss`: the output
    layer and the loss ``chunk_tokens`` tokens at a time); with ``mesh`` (a mesh run) the
    evaluation traces inside :func:`jpeft.parallel.kernels_on`, as the mesh step does.
    ``model_dropout``: training steps run the model with its own dropout
    (``deterministic=False``), as transformers' ``Trainer`` does; the adapter's dropout is
    active either way, evaluation never drops. ``method`` (a method config): the training loss
    adds its :meth:`jpeft.AdapterConfig.regularizer` (AdaLoRA's orthogonal penalty, as PEFT adds
    it to a causal LM's loss); evaluation reports the language-model loss alone."""
    train_kw = {"deterministic": False} if model_dropout else {}

    def loss_fn(params, adapter, batch, key):
        loss, n = jpeft.lm_loss(model, params, adapter, batch["input_ids"], batch["loss_mask"],
                                rngs={"dropout": key}, chunk_tokens=chunk_tokens, **train_kw, **model_inputs(batch))
        reg = None if method is None else method.regularizer(adapter)
        return (loss, {"targets": n}) if reg is None else (loss + reg, {"targets": n})

    @jax.jit
    def eval_sums(params, adapter, batch):
        with kernels_on(mesh):
            loss, n = jpeft.lm_loss(model, params, adapter, batch["input_ids"], batch["loss_mask"],
                                    chunk_tokens=chunk_tokens, **model_inputs(batch))
        return loss * n, n

    return loss_fn, eval_sums


def make_logits_fn(model, mesh=None):
    """``logits(params, adapter, batch)`` without dropout (``adapter=None``: the base), the
    forward pass of the forgetting guard and of ``jpeft eval --canary`` (``mesh``: as in
    :func:`make_loss_fns`)."""
    @jax.jit
    def logits(params, adapter, batch):
        with kernels_on(mesh):
            return logits_of(jpeft.apply(model, params, adapter, batch["input_ids"], **model_inputs(batch)))

    return logits


def eval_rows(ds, batch_size: int, max_batches: Optional[int], what: str) -> Optional[int]:
    """The rows an evaluation of the first ``max_batches`` batches of ``ds`` scores (``None``: all
    of them). Refuses a selection that holds no target token, whose loss would read 0 and
    perplexity 1 (a dataset without any is refused when it is packed); ``what`` names the setting."""
    if not max_batches:
        return None
    rows = max_batches * batch_size
    if not ds.loss_mask[:rows, 1:].any():
        raise ConfigError(
            f"{what}={max_batches} scores the first {min(rows, len(ds))} packed row(s) ({max_batches} batch(es) of "
            f"{batch_size} rows), which hold no target token (only prompt tokens, padding or the first token of a "
            f"document or row), so the loss would read 0 and the perplexity 1; the data's {ds.num_targets} target "
            f"tokens lie in later rows. Raise {what}, or give 0 to score all of the data.")
    return rows


def canary_batches(ds, batch_size: int, max_batches: Optional[int], what: str = "canary_batches") -> list:
    """The first ``max_batches`` batches of the packed canary set (all of it when ``None``);
    ``what``: the setting of ``max_batches``, named when they hold no target (:func:`eval_rows`)."""
    return list(ds.eval_batches(batch_size, eval_rows(ds, batch_size, max_batches, what)))


def evaluate(eval_sums, params, adapter, ds, batch_size: int, max_batches: Optional[int] = None, place=None,
             what: str = "max_batches") -> dict:
    """Mean loss and perplexity over (up to ``max_batches`` batches of) ``ds``; ``place(batch)``
    puts a host batch where the step wants it (a mesh run: a global array split over the
    batch axes); ``what``: the setting of ``max_batches``, named when they hold no target
    (:func:`eval_rows`). The perplexity is ``exp(loss)`` (``inf`` past float range)."""
    tot, n = 0.0, 0.0
    for b in ds.eval_batches(batch_size, eval_rows(ds, batch_size, max_batches, what)):
        s, k = eval_sums(params, adapter, b if place is None else place(b))
        tot += float(s)
        n += float(k)
    loss = tot / max(n, 1.0)
    return {"loss": loss, "perplexity": perplexity(loss), "tokens": int(n)}




# Settings a resumed run may change: where and how often it reports and saves, and the mesh (the
# checkpoints reshard). ``train.steps`` may change too, to extend or shorten a run (noted, since
# the learning-rate schedule then spans the new number). Anything else changes the training
# trajectory (the data order, the model, the update rule), so a resume with it is refused.
_RESUME_MAY_CHANGE = ("output_dir", "model", "data.eval", "train.eval_every", "train.save_every", "train.log_every",
                      "train.keep_checkpoints", "train.eval_batches", "train.steps", "mesh.")
# Files whose content resolved_config.json fingerprints: their path may change too (a project moved to another
# folder or host resolves its relative paths anew), since the content itself is checked (_check_resumed_fingerprint)
_RESUME_MAY_MOVE = {"data.train": "train_data_sha256", "forgetting.canary": "canary_sha256"}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _drop_logged_after(path: str, step: int) -> None:
    """Removes from ``metrics.jsonl`` the records of steps after ``step``, the checkpoint a run
    resumes from: a run that crashed after logging them re-runs and re-logs those steps, which
    would otherwise appear twice. ``step = 0`` (a run starting afresh where an earlier one died
    before its first checkpoint) removes every record, the step-0 canary baseline included: the
    new run logs its own. Rewritten through a temporary file (never half-written)."""
    try:
        with open(path) as f:
            lines = f.readlines()
    except OSError:
        return

    def later(line: str) -> bool:
        try:
            s = json.loads(line).get("step")
        except (ValueError, AttributeError):
            return False
        return isinstance(s, (int, float)) and (s > step or s == step == 0)

    def partial(line: str) -> bool:  # the last record, cut off by a kill mid-write
        try:
            json.loads(line)
        except ValueError:
            return True
        return False

    keep = [ln for ln in lines if not later(ln)]
    if keep and not keep[-1].endswith("\n"):
        # a record cut off mid-write (a kill, a full disk): the next record appended would be glued onto
        # it and both lost to a reader; a whole record only lacks its line end
        keep[-1:] = [] if partial(keep[-1]) else [keep[-1] + "\n"]
    if keep == lines:
        return
    atomic_write(path, "".join(keep))
    if len(keep) == len(lines):
        return
    if step == 0:
        _say(f"jpeft train: metrics.jsonl: {len(lines) - len(keep)} record(s) of an earlier run that left no checkpoint "
             "removed; this run starts from step 0.")
    else:
        _say(f"jpeft train: metrics.jsonl: {len(lines) - len(keep)} record(s) of steps after {step} removed; those "
             "steps run again.")


def _saved_steps(saved: Optional[dict]) -> Optional[int]:
    try:
        return int(saved["train"]["steps"])
    except (KeyError, TypeError, ValueError):
        return None


def _read_saved_config(out_dir: str) -> Optional[dict]:
    """The ``resolved_config.json`` a run wrote (read once per resume: the checks below take it),
    ``None`` when there is none (an older jpeft: not checked); a damaged one is refused, since
    ``--resume`` could then not check that the run keeps the settings its checkpoints were
    trained with."""
    path = os.path.join(out_dir, "resolved_config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            before = json.load(f)
    except (OSError, ValueError) as e:  # a file written half (before it was written atomically) or damaged
        raise ConfigError(
            f"{path} is unreadable ({type(e).__name__}: {str(e)[:120]}), so --resume cannot check that this run has "
            "the settings its checkpoints were trained with. Put back a copy of that file, or delete it to resume "
            "without the check, or start a new run in another output_dir.") from None
    if not isinstance(before, dict) or not isinstance(before.get("train", {}), dict):
        raise ConfigError(
            f"{path} holds {type(before).__name__} JSON, not the settings table jpeft train writes, so --resume cannot "
            "check that this run has the settings its checkpoints were trained with. Put back a copy of that file, or "
            "delete it to resume without the check, or start a new run in another output_dir.")
    return before


def _keep_unsaved_settings(out_dir: str, cfg: dict, before: Optional[dict] = None) -> None:
    """A run saved by a jpeft without ``train.model_dropout`` trained without the model's own
    dropout: resumed, it keeps training so (``cfg`` is set to false, with a note) rather than
    switch dropout on mid-run. ``before``: :func:`_read_saved_config` (read here if not given)."""
    before = _read_saved_config(out_dir) if before is None else before
    saved = None if before is None else before.get("train")
    if isinstance(saved, dict) and "model_dropout" not in saved and cfg["train"].get("model_dropout", True):
        cfg["train"]["model_dropout"] = False
        _say("note: this run was started by a jpeft without train.model_dropout, which trained without the model's "
             "own dropout; it resumes with train.model_dropout = false.")


def _method_changes(before: dict, cfg: dict, method) -> Optional[dict]:
    """The fields of the method config this run trains (``method``, resolved from ``cfg``'s [method]
    table) that differ from the resolved one the run saved (``method_config``), as
    ``{"method.<field>": (saved, now)}``; ``None`` where that cannot be told (no saved
    ``method_config``: an older jpeft; no ``method``). Compared resolved, so ``alpha`` for
    ``lora_alpha``, or a field now written at its default value, is no change; a field an older
    jpeft did not save is skipped."""
    was = before.get("method_config")
    if method is None or not isinstance(was, dict) or not isinstance(cfg.get("method"), dict):
        return None
    now = json.loads(json.dumps(method.to_dict()))
    # rank_pattern / alpha_pattern in another order are another config (the first matching key wins)
    return {f"method.{k}": (was[k], now[k]) for k in sorted(was)
            if k in now and not type(method).same_field(k, was[k], now[k])}


def _check_resumable(out_dir: str, cfg: dict, before: Optional[dict] = None, method=None) -> None:
    """Refuses ``--resume`` with settings that change the run (the seed, the data, the model's
    layout, the method, the optimizer, ...), naming each with its saved and its new value:
    the resumed run would no longer be the run its checkpoints belong to, and the saved config
    would be overwritten. Checkpoints of a ``scan_layers`` run hold stacked arrays the unrolled
    model cannot use (and the other way round), which gets its own message. Runs without a
    ``resolved_config.json`` (an older jpeft) are not checked; keys an older jpeft did not save
    are skipped. The path of a file whose content the saved config fingerprints
    (:data:`_RESUME_MAY_MOVE`) may change: its content is compared instead, once read. ``before``:
    :func:`_read_saved_config` (read here if not given). ``method``
    (the method config the table resolves to, :func:`method_of`): the [method] table is then
    compared as that config (:func:`_method_changes`), else key by key as written."""
    path = os.path.join(out_dir, "resolved_config.json")
    before = _read_saved_config(out_dir) if before is None else before
    if before is None:
        return
    was, now = before.get("train", {}).get("scan_layers"), bool(cfg["train"]["scan_layers"])
    if was is not None and bool(was) != now:  # None: an older jpeft did not save it (the other keys still count)
        was = bool(was)
        raise ConfigError(
            f"the checkpoints in {out_dir!r} were written with train.scan_layers = {str(was).lower()} (a "
            f"{'layer-stacked' if was else 'per-layer'} adapter), but this run has train.scan_layers = "
            f"{str(now).lower()}; resume with --set train.scan_layers={str(was).lower()}, or choose another output_dir.")
    fingerprints = ("method_config", "model_weights_sha256", *_RESUME_MAY_MOVE.values())  # checked on their own
    old = _flat({k: v for k, v in before.items() if k not in fingerprints})
    new = _flat(cfg)
    was_m, now_m = before.get("method"), cfg.get("method")
    if isinstance(was_m, dict) and isinstance(now_m, dict) and \
            method_class(method_name_of(was_m)) is method_class(method_name_of(now_m)):
        # one method, named either way: an earlier jpeft saved name = "lora" beside a peft_type = "LORA" given alone
        for k in ("method.name", "method.peft_type"):
            old.pop(k, None)
            new.pop(k, None)
    # a key the saved config lacks counts only where its whole table is new (a [forgetting] or
    # quantize added now); inside a saved table it is a setting an older jpeft did not write
    # [method] holds only the keys given (no defaults filled in), by every jpeft: a key added there is a change too
    changed = sorted({k for k in old if old[k] != new.get(k)}
                     | {k for k in new if k not in old and new[k] is not None
                        and (k.split(".")[0] not in before or k.startswith("method."))})
    changed = [k for k in changed if not k.startswith(_RESUME_MAY_CHANGE)
               and not (k in _RESUME_MAY_MOVE and isinstance(before.get(_RESUME_MAY_MOVE[k]), str))]
    method_changes = _method_changes(before, cfg, method)
    if method_changes is not None:  # the resolved method config decides: the table's spelling does not matter
        changed = sorted([k for k in changed if not k.startswith("method.")] + list(method_changes))
        old.update({k: v[0] for k, v in method_changes.items()})
        new.update({k: v[1] for k, v in method_changes.items()})
    if changed:
        reordered = " (the same keys in another order: the first key that matches a module gives it its value)"
        shown = "; ".join(f"{k}: {json.dumps(old.get(k))} -> {json.dumps(new.get(k))}"
                          + (reordered if old.get(k) == new.get(k) else "") for k in changed[:8])
        more = f" (and {len(changed) - 8} more)" if len(changed) > 8 else ""
        raise ConfigError(
            f"--resume would continue the run in {out_dir!r} with other settings than it was trained with "
            f"({shown}{more}): "
            "its checkpoints' data order, model or update rule no longer apply, and resuming would not be exact. "
            "Resume with the saved values (drop those --set options or edit the config back; they are in "
            f"{path}), or start a new run in another output_dir.")


def data_fingerprint(ds) -> str:
    """SHA-256 of a packed dataset's rows (token ids, loss mask, segments, positions): what a
    resumed run must train on for its batches to continue the checkpointed run's, and what
    every process of a multi-host run must agree on."""
    h = hashlib.sha256()
    for a in (ds.input_ids, ds.loss_mask, ds.segment_ids, ds.position_ids):
        if a is not None:
            h.update(str(a.shape).encode())
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _check_resumed_fingerprint(out_dir: str, before: dict, key: str, sha: str) -> None:
    """Refuses ``--resume`` when the fingerprint ``key`` of ``resolved_config.json`` differs:
    ``train_data_sha256`` (:func:`data_fingerprint`: the data file edited, another tokenizer, so
    batch ``k`` would be another batch), ``canary_sha256`` (:func:`data_fingerprint` of the packed
    ``[forgetting] canary``: the resumed guard would measure other text against the checks and
    the kept state its checkpoint carries, and stop or roll back where the run would not) or
    ``model_weights_sha256`` (:func:`jpeft.models.loading.weights_fingerprint`:
    the model folder's path may change, but another model of the same architecture, config and
    shapes alike, would pass the checkpoints' base check and continue the run on another base).
    Runs saved without the fingerprint (an older jpeft) are not checked."""
    was = before.get(key)
    if not isinstance(was, str) or was == sha:
        return
    if key == "canary_sha256":
        raise ConfigError(
            f"--resume would continue the run in {out_dir!r} with another forgetting canary than its checkpoints were "
            "trained with (the packed rows of forgetting.canary differ: the file or the tokenizer changed since), so "
            "the guard's checks would measure other text than its saved checks and kept state, and it could stop or "
            "roll back where the run would not. Restore the canary file the run was started with, or start a new run "
            "in another output_dir.")
    if key == "train_data_sha256":
        raise ConfigError(
            f"--resume would continue the run in {out_dir!r} on other training data than its checkpoints were trained "
            "on (the packed rows of data.train differ: the file or the tokenizer changed since, or an older jpeft "
            "started the run and put the tokenizer's BOS before every document where the tokenizer's own call adds "
            "none, or masked a prompt/completion example's token spanning the boundary as prompt), so its batches "
            "would not continue the run's. Restore the data the run was started with, or start "
            "a new run in another output_dir.")
    raise ConfigError(
        f"--resume would continue the run in {out_dir!r} on another base model than its checkpoints were trained "
        "on: the weights in this config's `model` folder differ from the run's (its config and shapes match, so "
        "this is another model of the same architecture, or the folder's weights were replaced). Resume with the "
        "model folder the run was started with, or start a new run in another output_dir.")


def untie_lm_head(cfg: dict, method, hf_config: dict) -> bool:
    """Whether ``jpeft train`` reads the base untied (``load_folder(untie=True)``: ``lm_head`` a
    copy of the input embedding, the same logits): ``[model] tie_word_embeddings = false``, or,
    when the table leaves it out, a method that adapts ``lm_head`` of a tied ``config.json`` (as
    PEFT unties it; a note says so). Refuses, before the model loads, what cannot be trained or
    exported as asked.

    Raises:
      ConfigError: ``tie_word_embeddings = true`` on an untied checkpoint or with a method
        adapting ``lm_head``; a method that cannot train on a tied checkpoint read untied
        (:meth:`jpeft.AdapterConfig.untied_head_refusal`: LoRA's trainable tokens, whose rows
        PEFT applies in the tied ``lm_head`` too)."""
    want = cfg.get("tie_word_embeddings")
    file_tied = loading.ties_lm_head(hf_config)
    heads = method.adapts_lm_head()
    if want is True and not file_tied:
        raise ConfigError(f"model.tie_word_embeddings = true, but {cfg['model']!r} has an lm_head of its own (its "
                          "config.json does not tie it to the input embedding), which cannot be tied away. Drop the key.")
    if not file_tied:
        return False
    if want is True and heads:
        raise ConfigError("model.tie_word_embeddings = true, but the method adapts lm_head, which a tied model does "
                          "not have (its logits come from the input embedding), while PEFT unties it. Drop the key (or "
                          "set it to false) to train lm_head as PEFT does, or leave lm_head out of the method.")
    untie = want is False or (want is None and heads)
    why = method.untied_head_refusal() if untie else None
    if why is not None:
        raise ConfigError(
            f"{why}. {cfg['model']!r} is read untied ("
            + ("model.tie_word_embeddings = false" if want is False else "the method adapts lm_head") +
            ") while its config.json ties lm_head to the input embedding, so the exported adapter would give other "
            "outputs in PEFT. Train on the tied base (leave lm_head out of the method and drop "
            "tie_word_embeddings = false), or change the method as said.")
    if untie and want is None:
        _say("note: the method adapts lm_head, which config.json ties to the input embedding; the base is read with "
             "an lm_head of its own (a copy of the embedding: the same logits), as PEFT unties it ([model] "
             "tie_word_embeddings = false says so explicitly).")
    return untie


def train(cfg: dict, *, resume: bool = False, max_steps: Optional[int] = None, progress: bool = True) -> dict:
    """Runs a resolved ``jpeft train`` config (see :mod:`jpeft.cli.train_cmd`) through
    :func:`jpeft.fit`."""
    t = cfg["train"]
    d = cfg["data"]
    out_dir = cfg["output_dir"]
    if jax.process_count() > 1:  # before any check one process could fail alone, leaving the others waiting
        _check_devices_per_process()
        _check_settings_agree(cfg, {"resume": bool(resume), "max_steps": max_steps})
    # every check and read of this host's own files: a process failing one alone tells the others at the data
    # agreement that ends the block, so they stop too instead of waiting there for it
    with _host_checks(cfg) as agreed:
        method0 = method_of(cfg)  # fail on a bad method before loading anything
        if not method0.packs_documents and d["packing"] == "documents":
            # prompt tuning's virtual tokens are prepended once per row, so rows of several documents cannot share
            # them: refused here, not in the first training step after the model loaded and the output was written
            raise ConfigError(f"method {method0.peft_type.lower()} prepends its virtual tokens once per packed row, so it "
                              "cannot train on rows packed by documents (data.packing = \"documents\", the default); "
                              "set data.packing = \"stream\".")
        init = method0.residual_init
        if init is not None:
            # jpeft.init refused it only once the whole base was loaded, pointing to a Python function
            raise ConfigError(f"[method] init_lora_weights = {init!r} takes the initial adapter out of the base weights "
                              "and trains on the residual base it leaves; jpeft train trains on the model folder's "
                              "weights as they are and does not offer it. Give init_lora_weights = true (PEFT's "
                              "default) or \"gaussian\", or train such an adapter from Python with "
                              f"jpeft.init_{init.split('_')[0]}(config, params, key, ...), which returns the residual "
                              "base with the adapter (docs/METHODS.md).")
        if cfg.get("forgetting") and jax.process_count() > 1:
            raise ConfigError(f"[forgetting] runs in a single process (its canary metrics are read on the host); this job "
                              f"has {jax.process_count()} processes. Drop the [forgetting] table, or train on one host "
                              "(any number of local devices).")
        check_folder(out_dir, "output_dir")  # before the model is loaded, not at os.makedirs after it
        # the row length against the model's positions and the data files (missing, not UTF-8, a bad line), before
        # the model is loaded: a path's typo was named only once the whole base was read
        hf_config = loading.read_config(cfg["model"])
        check_seq_len(int(d["seq_len"]), hf_config, "data.seq_len", method0.extra_positions)
        why = method0.layer_scan_refusal() if t.get("scan_layers") else None
        if why is not None:
            raise ConfigError(f"method {method0.peft_type.lower()} cannot train a layer-scanned model (train.scan_layers = "
                              f"true): {why}. Set train.scan_layers = false.")
        fields = {k: d[k] for k in ("text_field", "prompt_field", "completion_field", "messages_field")}
        fg = cfg.get("forgetting")
        train_ex = load_examples(d["train"], **fields)
        eval_ex = load_examples(d["eval"], **fields) if d.get("eval") else None
        canary_ex = load_examples(fg["canary"], **fields) if fg else None
        if any(is_conversation(ex) for exs in (train_ex, eval_ex, canary_ex) if exs for ex in exs):
            # rendered with the folder's tokenizer before the weights are read: a template that refuses a line
            # (or is not prefix-stable) is named in seconds, not after the whole base has loaded
            tok = read_tokenizer(cfg["model"])
            train_ex, eval_ex, canary_ex = (None if exs is None else render_chat(exs, tok, chat_loss=d["chat_loss"])
                                            for exs in (train_ex, eval_ex, canary_ex))
        ckpt_dir = os.path.join(out_dir, "checkpoints")
        has_ckpts = os.path.isdir(ckpt_dir) and any(n.isdigit() for n in os.listdir(ckpt_dir))
        if not resume and has_ckpts:
            raise ConfigError(f"{out_dir!r} already has checkpoints; pass --resume to continue, or choose another "
                              "output_dir.")
        finished = os.path.join(out_dir, "adapter")
        if not has_ckpts and os.path.lexists(finished):
            # a finished run whose checkpoints were deleted: this run would start from step 0, drop the old run's
            # metrics.jsonl records and replace its adapter when done
            raise ConfigError(f"{out_dir!r} holds the finished adapter of an earlier run ({finished}) and no checkpoints to "
                              f"{'resume' if resume else 'continue'} from; this run would start from step 0 and replace it. "
                              "Choose another output_dir, or move that adapter away first.")
        saved = _read_saved_config(out_dir) if resume and has_ckpts else None
        # resolved once (its notes said once): the resume check compares it with the saved one
        method = method_of(cfg, hf_config.get("model_type"), saved)
        untie = untie_lm_head(cfg, method, hf_config)  # before the model loads: the refusals and the note
        if saved is not None:
            _keep_unsaved_settings(out_dir, cfg, saved)
            _check_resumable(out_dir, cfg, saved, method)
        mesh = make_run_mesh(cfg, int(t["batch_size"]))
        if mesh is not None and "tensor" in mesh.shape:
            check_tensor_axis(cfg["model"], mesh.shape["tensor"])
        scan = bool(t.get("scan_layers", False))
        rules = jpeft.tensor_parallel_rules(stacked=scan) if mesh is not None and "tensor" in mesh.shape else None
        try:
            loaded = load_folder(cfg["model"], scan_layers=scan, mesh=mesh, rules=rules, quantize=cfg.get("quantize"),
                                 dtype=t.get("dtype", "float32"), untie=untie)
        except ShardingError as e:
            if rules is None:
                raise
            # the rules are jpeft's own (tensor_parallel_rules), so the fix is the mesh, not a rule
            raise ConfigError(f"[mesh] tensor = {mesh.shape['tensor']} does not fit this model: {str(e).split('. Pick')[0]}. "
                              "Choose a mesh.tensor that divides it (1 turns tensor parallelism off).") from None
        if cfg.get("quantize") and not scan and jax.default_backend() == "cpu":
            _say(f"note: on the CPU an unrolled model holds every layer's {cfg['quantize']} kernels dequantized while it "
                 "trains (XLA's CPU backend merges the backward pass's re-dequantization into the forward pass's), so the "
                 "quantized base saves no training memory; train.scan_layers = true (Llama family) keeps one layer's "
                 "(docs/MODELS.md).")
        # a few bytes per tensor, read once the folder loaded; agreed by every process: each reads its own shards from
        # its own copy of the folder, so hosts holding different weights would train a mix of two models
        base_sha = agreed["model_sha"] = loading.weights_fingerprint(cfg["model"])
        if saved is not None:
            _check_resumed_fingerprint(out_dir, saved, "model_weights_sha256", base_sha)
        encode, bos, eos = text_encoder(loaded.tokenizer)

        def pack(examples, key, path):
            """Packs one file's examples (conversations rendered above); its warnings and errors name the
            file (train, eval or canary)."""
            return PackedDataset.from_examples(examples, encode, int(d["seq_len"]), eos_id=eos, bos_id=bos,
                                               packing=d["packing"], source=f"{key} ({path})")

        train_ds = pack(train_ex, "data.train", d["train"])
        eval_ds = pack(eval_ex, "data.eval", d.get("eval")) if eval_ex is not None else None
        if eval_ds is not None:  # refused now, not at the first evaluation after eval_every steps of training
            eval_rows(eval_ds, int(t["batch_size"]), t["eval_batches"], "train.eval_batches")

        data_sha = agreed["data_sha"] = data_fingerprint(train_ds)
        # agreed too: the path is a setting every process shares, but each host reads its own copy of the file
        eval_sha = agreed["eval_sha"] = data_fingerprint(eval_ds) if eval_ds is not None else ""
        if saved is not None:
            _check_resumed_fingerprint(out_dir, saved, "train_data_sha256", data_sha)
    # before the output folder is made: an empty canary file leaves nothing behind
    canary_ds = pack(canary_ex, "forgetting.canary", fg["canary"]) if fg else None
    canary_sha = None
    if canary_ds is not None:
        eval_rows(canary_ds, int(t["batch_size"]), fg["canary_batches"], "forgetting.canary_batches")
        canary_sha = data_fingerprint(canary_ds)
        if saved is not None:
            _check_resumed_fingerprint(out_dir, saved, "canary_sha256", canary_sha)
    before = set(os.listdir(out_dir)) if os.path.isdir(out_dir) else None
    os.makedirs(out_dir, exist_ok=True)
    seed = int(cfg.get("seed", 0))
    k_init, k_train = run_keys(seed)
    example = jnp.asarray(train_ds.input_ids[:1, : min(8, train_ds.seq_len)])
    steps = int(t["steps"])
    optimizer, sched = make_optimizer(t, steps, lr_scale=bool(fg) and fg["action"] == "rollback", method=method)
    ckpts = CheckpointManager(ckpt_dir, method, loaded.params, optimizer=optimizer, model=loaded.model,
                              example_args=(example,), base_config=loaded.hf_config,
                              save_every=int(t["save_every"]) or steps + 1,
                              keep_last=t["keep_checkpoints"], async_save=False)
    failed, locked = True, False
    try:
        # the only writer of this run folder from here: a second run started on it stops before writing metrics.
        # Only process 0 takes the lock: the others learn its refusal at one more data agreement and stop naming
        # it, instead of waiting for process 0 in the first step's collectives
        with _host_checks(cfg) as agreed:
            agreed.update(data_sha=data_sha, eval_sha=eval_sha, model_sha=base_sha)
            try:
                ckpts.lock()
                locked = True
            except SaveError as e:
                # the lock could not be made or taken (permissions, no flock): its own message
                if isinstance(e.__cause__, OSError):
                    raise
                agreed["stopped"] = _LOCKED_OUT
                raise SaveError(f"another run (a jpeft train, or a program saving checkpoints) is writing into "
                                f"{ckpt_dir}; {_TWO_RUNS}") from None
            if jax.process_count() > 1 and jax.process_index() == 0:
                atomic_write(os.path.join(out_dir, _SHARED_MARK), uuid.uuid4().hex)  # read after the agreement
        if jax.process_count() > 1:
            _check_output_shared(out_dir)
        out = _run(cfg, method, loaded, train_ds, eval_ds, canary_ds, ckpts, optimizer, sched, example, k_init,
                   k_train, seed, steps, resume, max_steps, progress, mesh, data_sha, saved, base_sha, canary_sha)
        failed = False
        return out
    finally:
        ckpts.close()
        # refused the lock: the files not in `before` are the other run's (started since this one looked)
        if failed and locked and saved is None and jax.process_count() == 1:
            _remove_unstarted(out_dir, before)


# what a run writes before its first step; removed again when it fails before logging one
_RUN_FILES = ("resolved_config.json", "metrics.jsonl", "tb", "checkpoints")


def _remove_unstarted(out_dir: str, before: Optional[set]) -> None:
    """After a fresh run failed before its first record (a setting refused once the model and
    adapter exist, such as a forgetting budget its starting adapter already crosses), removes
    what it wrote (:data:`_RUN_FILES` not there before it started, and the folder if it made
    it), so a failed start leaves nothing behind. Keeps everything once a step was logged or a
    checkpoint saved (a crash's records help find its cause)."""
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    metrics = os.path.join(out_dir, "metrics.jsonl")
    saved_any = os.path.isdir(ckpt_dir) and any(n.isdigit() for n in os.listdir(ckpt_dir))
    if saved_any or (os.path.isfile(metrics) and os.path.getsize(metrics)):
        return
    for name in _RUN_FILES:
        path = os.path.join(out_dir, name)
        if before is not None and name in before:
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.remove(path)
    if before is None and os.path.isdir(out_dir) and not os.listdir(out_dir):
        os.rmdir(out_dir)


# why a process of a multi-host run stopped before training, as it tells the others at a data agreement
_OWN_ERROR, _LOCKED_OUT = 1, 2
_SHARED_MARK = ".jpeft-shared-output-check"  # process 0's token: do all processes see its output folder?
_TWO_RUNS = ("two runs in one output folder would mix their metrics and overwrite each other's checkpoints. Wait "
             "for it to end, or give this run another output_dir.")


@contextlib.contextmanager
def _host_checks(cfg: dict):
    """Wraps :func:`train`'s checks and reads of the host's own files (output folder, model,
    data), and then its taking of the output folder's writer lock (process 0's alone). With
    several processes, ends in the data agreement of :func:`_check_data_agrees`
    (``agreed["data_sha"]``, ``["eval_sha"]`` and ``["model_sha"]``, set inside the block); a process whose block raised joins that
    agreement as failed (``agreed["stopped"]``: why, :data:`_OWN_ERROR` unless set) and then
    raises its own error, so the others stop with an error naming it rather than waiting in
    the agreement, or in the first step's collectives, for a process that will never reach it."""
    agreed: dict = {}
    if jax.process_count() == 1:
        yield agreed
        return
    try:
        yield agreed
    except Exception:
        _check_data_agrees({}, failed=agreed.get("stopped", _OWN_ERROR))
        raise
    _check_data_agrees(agreed)


def _gather_digests(parts, extra=None) -> np.ndarray:
    """Every process's sha256 of each ``(name, what, bytes)`` of ``parts`` (and an ``extra``
    row holding that number: why a process stopped), as ``[processes, rows, 8]`` uint32."""
    mine = np.stack([np.frombuffer(hashlib.sha256(v).digest(), np.uint32) for _, _, v in parts])
    if extra is not None:
        mine = np.concatenate([mine, np.full((1, 8), int(extra), np.uint32)])
    try:
        # every device of this process done with the gather before it goes on: processes refusing together
        # leave nothing in flight (jpeft.distributed.allgather)
        return dist.allgather(mine)
    except jax.errors.JaxRuntimeError as e:
        # a process that got SIGTERM or Ctrl-C before training (or crashed) left the job: the gather fails once its
        # connection closes (a raw traceback before, then a wait in jax.distributed's shutdown for its heartbeat
        # timeout, about 100 s, and an abort)
        why = re.sub(r"\s*\[[^\]]*\](:\d+)?", "", " ".join(str(e).split()))[:200]  # without gloo's source lines
        raise DistributedError(
            f"another process of this job left it before training started (stopped by a signal or Ctrl-C, or "
            f"crashed: see its output), so the processes cannot agree on their {parts[0][0]} ({why}); this process "
            "stops too. Start every process again (with --resume where a checkpoint exists).") from None


def _refuse_differences(parts, every: np.ndarray) -> None:
    for i, (name, what, _) in enumerate(parts):
        differ = [p for p in range(every.shape[0]) if not np.array_equal(every[p, i], every[0, i])]
        if differ:
            raise ConfigError(f"process(es) {differ} of this job were given different {name} than process 0 ({what}); "
                              "every process must run the same config on the same data. Start them with the same "
                              "command line and files.")


def _check_devices_per_process() -> None:
    """Refuses (one line, on every process: each reads the same global device list) a job whose
    processes hold different numbers of devices: every process feeds an equal block of each
    batch's rows to its own devices, and the agreements gather one row per device (JAX's
    ``process_allgather`` failed with a bare ``ValueError`` about a reshape)."""
    counts = [0] * jax.process_count()
    for d in jax.devices():
        counts[d.process_index] += 1
    if len(set(counts)) > 1:
        held = ", ".join(f"process {i}: {n}" for i, n in enumerate(counts))
        raise ConfigError(f"the processes of this job hold different numbers of devices ({held}); jpeft train "
                          "gives every process an equal block of each batch, so each needs the same number. Start "
                          "every process with as many devices (CUDA_VISIBLE_DEVICES; on a CPU "
                          "XLA_FLAGS=--xla_force_host_platform_device_count=N).")


def _check_settings_agree(cfg: Optional[dict], flags: Optional[dict]) -> None:
    """Every process of a multi-host run computes the same batches and initial adapter from its
    own copy of the config and data; refuses (one line, on every process) a job whose processes
    were given different settings, which would otherwise train a mix of two runs, or different
    ``flags`` (``--resume``, ``--max-steps``: a process stopping at another step leaves the
    others waiting in the next step's collectives forever). The model folder and output
    directory may be spelled differently per host. :func:`train` calls it before any check one
    process could fail alone (a process refusing to run without ``--resume`` would leave one
    given it waiting here); :func:`_check_data_agrees` follows once the data is read.
    ``cfg=None``: this process could not read or resolve its config (``jpeft train`` joins the
    job first), takes part as failed and returns, its caller raising its own error; the
    others stop with an error naming it rather than waiting for it until JAX aborts."""
    failed = cfg is None
    settings = {} if failed else {k: v for k, v in cfg.items() if k not in ("model", "output_dir")}
    method = settings.get("method")
    if isinstance(method, dict):  # sort_keys below: a first-match-ordered field's order is added on its own
        settings["method key order"] = {k: list(v) for k, v in method.items()
                                        if k in ordered_fields() and isinstance(v, dict)}
    parts = [("settings", "the resolved config, --set options included",
              json.dumps(settings, sort_keys=True, default=str).encode()),
             ("command-line options", "--resume and --max-steps", json.dumps(flags, sort_keys=True).encode())]
    every = _gather_digests(parts, extra=_OWN_ERROR if failed else 0)
    if failed:
        return
    stopped = _marked(every)
    if stopped:
        raise ConfigError(f"process(es) {stopped} of this job could not read or resolve their config (see their "
                          f"output: the --config file missing on that host, or a bad setting or --set option); {_TOO}")
    _refuse_differences(parts, every)


_TOO = "this process stops too. Fix it there and start every process again."


def _marked(every, mark=None) -> list:
    """The processes whose row of an agreement's digests (:func:`_gather_digests`) carries a mark
    in its ``extra`` field: any (``mark=None``), or that one (:data:`_LOCKED_OUT`)."""
    return [p for p in range(every.shape[0]) if (every[p, -1, 0] if mark is None else every[p, -1, 0] == mark)]


def config_failed() -> None:
    """Called by ``jpeft train`` when this process could not read or resolve its config after
    joining a multi-host job: it takes part in the settings agreement as failed, so the other
    processes stop with an error naming it (its caller then raises its own error). When the
    processes hold different numbers of devices, the others stop at
    :func:`_check_devices_per_process` before that agreement (each reads the same global device
    list), so this one does not join it either (it waited there for ever)."""
    if jax.process_count() > 1:
        try:
            _check_devices_per_process()
        except ConfigError:
            return
        _check_settings_agree(None, None)


def _check_output_shared(out_dir: str) -> None:
    """Refuses (one line, on every process) a multi-host job whose processes do not all see
    one output folder: process 0 wrote a fresh token into its ``output_dir`` before the data
    agreement, and every process reads it from its own. Orbax writes each checkpoint with every
    process into the same step folder, so with separate folders (each host's own disk) the first
    checkpoint waits forever for a folder process 0 made elsewhere."""
    path = os.path.join(out_dir, _SHARED_MARK)
    try:
        with open(path, "rb") as f:
            seen = f.read()
    except OSError:
        seen = b""
    every = _gather_digests([("output folder", "", seen)])
    if jax.process_index() == 0:
        with contextlib.suppress(OSError):
            os.remove(path)
    apart = [p for p in range(every.shape[0]) if not np.array_equal(every[p, 0], every[0, 0])]
    if apart:
        raise ConfigError(f"process(es) {apart} of this job do not see process 0's output folder (the token process 0 "
                          f"wrote into its output_dir is not in theirs): output_dir must be one folder all processes "
                          "share (NFS, a mounted bucket), spelled any way on each host, since every checkpoint is "
                          "written by all processes together and would wait forever for the others' files. Give every "
                          "process a path to the same shared folder.")


def _check_data_agrees(shas: dict, *, failed: int = 0) -> None:
    """The second agreement of a multi-host run, held again once process 0 took the writer lock:
    every process packed the same training data (``shas["data_sha"]``: :func:`data_fingerprint`)
    and evaluation data (``shas["eval_sha"]``, ``""`` without ``data.eval``: the path is a
    setting they share, the file each host's own copy) and read the same base weights (``shas["model_sha"]``:
    :func:`jpeft.models.loading.weights_fingerprint`; the model folder's path may differ per host,
    its weights may not: each process reads its own shards from its own copy).
    ``failed``: this process stopped (:data:`_OWN_ERROR`: it could not read its files;
    :data:`_LOCKED_OUT`: another run holds the output folder's writer lock) and raises its own
    error afterwards; the others are told which process stopped, and why."""
    parts = [("training data", "the data.train file", shas.get("data_sha", "").encode()),
             ("evaluation data", "the data.eval file at the same path on each host", shas.get("eval_sha", "").encode()),
             ("model weights", "the safetensors files of the model folder: each process reads its own shards from its "
              "own copy, so the job would train a mix of two models", shas.get("model_sha", "").encode())]
    every = _gather_digests(parts, extra=failed)
    if failed:
        return  # the caller raises this process's own error
    locked_out = _marked(every, _LOCKED_OUT)
    if locked_out:
        raise SaveError(f"process(es) {locked_out} of this job could not take the writer lock of the output folder: "
                        "another run (a jpeft train, or a program saving checkpoints) is writing into its "
                        f"checkpoints, and this process stops too; {_TWO_RUNS}")
    stopped = _marked(every)
    if stopped:
        raise ConfigError(f"process(es) {stopped} of this job stopped before training with an error of their own "
                          f"(see their output: a file or folder missing or different on that host, most often); {_TOO}")
    _refuse_differences(parts, every)


def make_run_mesh(cfg: dict, batch_size: int):
    """The ``[mesh]`` of a run, or ``None`` for a single-device, single-process run (the plain
    jitted step). ``mesh.data = 0`` takes every device not used by ``fsdp``.

    Raises:
      ConfigError: the mesh does not fit the devices, or ``batch_size`` does not split over
        it and over the processes.
    """
    m = cfg["mesh"]
    n, procs = jax.device_count(), jax.process_count()
    if n == 1 and procs == 1:
        if m["fsdp"] != 1 or m["tensor"] != 1 or m["data"] not in (0, 1):
            raise ConfigError(f"[mesh] data={m['data']}, fsdp={m['fsdp']}, tensor={m['tensor']} needs "
                              f"{max(1, m['data']) * m['fsdp'] * m['tensor']} devices, but this run has 1; drop the "
                              "[mesh] table or run on more devices.")
        return None
    want = m["data"] * m["fsdp"] * m["tensor"]
    if m["data"] and want != n:
        raise ConfigError(f"[mesh] data={m['data']} x fsdp={m['fsdp']} x tensor={m['tensor']} = {want} devices, but "
                          f"this job has {n}; jpeft train uses every device: set mesh.data = 0 (the devices fsdp x "
                          "tensor leave), or make the product equal the device count (on a CPU, emulate devices with "
                          "XLA_FLAGS=--xla_force_host_platform_device_count=N).")
    try:
        mesh = jpeft.make_mesh(data=m["data"] or None, fsdp=m["fsdp"], tensor=m["tensor"])
    except ShardingError as e:
        raise ConfigError(f"[mesh]: {e}") from None
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if ways % procs:
        raise ConfigError(f"[mesh] data x fsdp = {ways} must be a multiple of the {procs} processes: each process feeds "
                          "its own rows to its own devices, so the batch axes must span the processes and "
                          f"mesh.tensor={mesh.shape['tensor']} must fit within one process's "
                          f"{jax.local_device_count()} devices. Give data or fsdp more ways, tensor fewer.")
    if batch_size % ways or batch_size % procs:
        raise ConfigError(f"train.batch_size={batch_size} must be a multiple of the mesh's data x fsdp = {ways} and "
                          f"of the {procs} process(es), so every device and process gets whole rows.")
    return mesh


def check_tensor_axis(folder: str, tensor: int) -> None:
    """Refuses a ``tensor`` mesh axis for a model :func:`jpeft.tensor_parallel_rules` does not
    split (they name the Llama family's modules): none of its weights would be split over the
    axis, so each group of ``tensor`` devices would compute the same thing, silently.

    Raises:
      ConfigError: the model is not of the Llama family (one line, before anything is loaded).
    """
    mt = loading.read_config(folder).get("model_type")
    llama = loading.model_types_of(LlamaForCausalLM)
    if mt not in llama:
        raise ConfigError(
            f"[mesh] tensor = {tensor} splits the layers of Llama-family models ({', '.join(llama)}; "
            f"jpeft.tensor_parallel_rules), but {folder!r} is a {mt!r} model: none of its weights would be split, "
            f"and every {tensor} devices would compute the same thing. Set mesh.tensor = 1 (mesh.fsdp shards the "
            "base of any model).")


def _restore(ckpts, out_dir: str, steps: int, **templates):
    """The latest checkpoint's state, or ``None``; refuses one past ``train.steps`` and names
    the cause of a base mismatch. ``templates`` (``adapter``, ``opt_state``) give the target
    shardings, so a run resumes on another mesh or number of processes."""
    try:
        state = ckpts.restore_latest(**templates)
    except BaseMismatchError as e:
        raise ConfigError(
            f"the checkpoints in {out_dir!r} were saved for a different base model than this config's `model` "
            f"({str(e).split('. ')[0]}); resume with the model (and train.scan_layers) of that run, or choose another "
            "output_dir.") from None
    except CheckpointUnreadableError:  # intact, but not for this process: its message says how to fix that
        raise
    except CheckpointError as e:
        if "optimizer state of another optimizer" not in str(e):
            kept = ckpts.all_steps()
            if not kept:
                raise
            # the newest step is damaged (a file truncated, flipped or deleted): say how to go on from the one before
            then = f"resume from step {kept[-2]}" if len(kept) > 1 else "start the run again from step 0"
            raise CheckpointError(
                f"{str(e).rstrip('.')}. --resume continues from the newest checkpoint, step {kept[-1]}; move its "
                f"folder {os.path.join(str(ckpts.directory), str(kept[-1]))} out of {ckpts.directory} (keep it to "
                f"inspect) and run --resume again to {then}.") from None
        raise ConfigError(
            f"the checkpoints in {out_dir!r} hold another optimizer's state than this run's AdamW "
            f"({str(e).split(': ', 1)[-1].split('. ')[0]}); a run with train.weight_decay > 0 saved by a jpeft before "
            "weight decay left out biases and norms has that layout. Resume it with the jpeft it was started with, or "
            "start a new run in another output_dir.") from None
    if state is not None and int(state.step) > steps:
        raise ConfigError(
            f"the latest checkpoint in {out_dir!r} is at step {int(state.step)}, past train.steps = {steps}; resume "
            f"with train.steps >= {int(state.step)} (e.g. --set train.steps={int(state.step)}), or choose another "
            "output_dir.")
    return state


def _run(cfg, method, loaded, train_ds, eval_ds, canary_ds, ckpts, optimizer, sched, example, k_init, k_train, seed,
         steps, resume, max_steps, progress, mesh, data_sha=None, saved=None, base_sha=None, canary_sha=None):
    t = cfg["train"]
    out_dir = cfg["output_dir"]
    model, params = loaded.model, loaded.params
    # a batch's rows against the vocabulary and a learned position table (GPT-2's; a rotary model has none)
    vocab, max_pos = (int(loaded.hf_config["vocab_size"]) if "vocab_size" in loaded.hf_config else None,
                      position_limit(model.config))
    loss_fn, eval_sums = make_loss_fns(model, mesh, loss_chunk_tokens(t), bool(t.get("model_dropout", True)), method)
    # an update takes batch_size x accum rows in accum passes; its loss and gradient are means over all of
    # their target tokens (each pass weighted by its count), as the HF Trainer's gradient_accumulation_steps;
    # an update whose rows hold no target token at all changes nothing (train.make_step_fn's loss_weight)
    accum = int(t.get("gradient_accumulation_steps", 1))
    step_kw = {"loss_weight": "targets", **({} if accum == 1 else {"accumulate_steps": accum})}
    if mesh is None:
        place = None
        adapter = jpeft.init(method, params, k_init, model, example)
        opt_state = optimizer.init(jpeft.trainable(adapter))
        step_fn = jpeft.make_train_step(loss_fn, optimizer, **step_kw)
    else:
        # the base was read straight into its fsdp shards; the adapter is created in place,
        # laid out like its base weights, and so is the optimizer state; every batch is split
        # over data x fsdp with each process holding its own rows
        init = lambda p, k: jpeft.init(method, p, k, model, example)
        a_shard = jpeft.adapter_shardings(jax.eval_shape(init, params, k_init), mesh, params)
        adapter = jax.jit(init, out_shardings=a_shard)(params, k_init)
        opt_state = jpeft.init_opt_state(optimizer, adapter)
        step_fn = jpeft.make_sharded_train_step(loss_fn, optimizer, mesh, **step_kw)

        def place(b):
            local = dist.host_local_batch(b)
            check_tokens(local, vocab_size=vocab, max_positions=max_pos)  # host values, before the step
            return dist.global_batch(local, mesh)

    start, resumed_guard = 0, None
    if resume:
        templates = {} if mesh is None else {"adapter": adapter, "opt_state": opt_state}
        state = _restore(ckpts, out_dir, steps, **templates)
        if state is None:
            _say(f"jpeft train: no checkpoint in {ckpts.directory}; starting from step 0")
        else:
            adapter, opt_state, start = state.adapter, state.opt_state, int(state.step)
            resumed_guard = state.extra  # the forgetting guard's kept state, checks and rollbacks
            _say(f"jpeft train: resumed from step {start}")
    stop_at = steps if max_steps is None else min(steps, int(max_steps))
    if start >= stop_at and start < steps:
        raise ConfigError(f"--max-steps {max_steps} is not past the checkpoint's step {start}; give a larger "
                          "--max-steps, or none to finish the run.")
    if jax.process_index() == 0:
        path = os.path.join(out_dir, "resolved_config.json")
        if start > 0:
            was = _saved_steps(saved)
            if was is not None and was != steps:
                _say(f"note: train.steps changed from {was} to {steps} on resume; the learning-rate schedule now spans "
                     f"{steps} steps.")
        # through a temporary file: a half-written resolved_config.json (a full disk, a kill) would read as
        # "no saved settings" and let a later --resume change the seed, data or optimizer unchecked
        try:
            atomic_write(path, json.dumps(dict(cfg, method_config=method.to_dict(), train_data_sha256=data_sha,
                                               model_weights_sha256=base_sha,
                                               **({} if canary_sha is None else {"canary_sha256": canary_sha})),
                                          indent=1))
        except OSError as e:  # a read-only output folder (its checkpoints folder writable): a raw PermissionError
            raise SaveError(f"cannot write {path} ({type(e).__name__}: {e.strerror or e}), so this run cannot record "
                            f"its settings; nothing was trained or changed. Make {out_dir} writable (permissions, "
                            "free space), or choose another output_dir.") from None

    bs = int(t["batch_size"])
    summary = jpeft.summary(params, adapter, print_fn=None)
    where_run = "1 device" if mesh is None else (
        "mesh " + " x ".join(f"{k}={v}" for k, v in mesh.shape.items()) + f" over {jax.process_count()} process(es)")
    _say(f"jpeft train: {method.peft_type} on {cfg['model']}: {summary['trainable']:,} trainable of "
         f"{summary['total']:,} params ({100 * summary['share']:.3f}%); {len(train_ds)} packed rows of "
         f"{train_ds.seq_len} tokens; {where_run}; steps {start}->{stop_at} of {steps}"
         + (f"; {accum} passes of {bs} rows per update" if accum > 1 else ""))

    eval_fn = None
    if eval_ds is not None:
        def eval_fn(adapter, step):
            return evaluate(eval_sums, params, adapter, eval_ds, bs, t["eval_batches"] or None, place,
                            what="train.eval_batches")

    guard = None
    fg = cfg.get("forgetting")
    if fg:
        rows = canary_batches(canary_ds, bs, fg["canary_batches"], "forgetting.canary_batches")
        guard = jpeft.ForgettingGuard(
            rows if place is None else [place(b) for b in rows], make_logits_fn(model, mesh),
            max_loss_rise=fg["max_loss_rise"], max_kl=fg["max_kl"], every=fg["every"], action=fg["action"],
            lr_factor=fg["lr_factor"], max_rollbacks=fg["max_rollbacks"])

    result = None
    if start < stop_at:
        batches = (train_ds.batch(s, bs * accum, seed) for s in itertools.count(start))
        if place is not None:
            batches = map(place, batches)
        if jax.process_index() == 0:
            # resumed: the steps after the checkpoint run again; fresh (an output_dir without
            # checkpoints, whose earlier run died before its first): every step does
            _drop_logged_after(os.path.join(out_dir, "metrics.jsonl"), start)
        # TensorBoard's events of those steps are hidden alike (its files are appended to, not rewritten)
        with jpeft.MetricLog(os.path.join(out_dir, "metrics.jsonl"), tensorboard=os.path.join(out_dir, "tb"),
                             echo=not progress, purge_step=start + 1 if start else 0) as log:
            result = jpeft.fit(
                step_fn, params, adapter, opt_state, batches, key=k_train, num_steps=stop_at - start,
                start_step=start, data_position=start, checkpoint=ckpts, save_last=True,
                vocab_size=vocab if mesh is None else None, max_positions=max_pos if mesh is None else None,
                progress=progress, desc="train", eval_fn=eval_fn, eval_every=int(t["eval_every"]), total_steps=steps,
                log=log, log_every=int(t["log_every"]), lr_fn=applied_lr(sched), handle_interrupt=True,
                forgetting=guard, forgetting_state=resumed_guard if guard is not None else None)
        adapter, opt_state = result.adapter, result.opt_state
        step, interrupted, last_eval = result.step, result.interrupted, result.eval
    else:
        step, interrupted, last_eval = start, False, None
    report = None if result is None else result.forgetting
    if result is None and guard is not None and isinstance(resumed_guard, dict):
        # resumed at train.steps (killed before the finished adapter was written, or --resume of a finished run):
        # no step runs, and the adapter is written again with the guard's report as the run left it
        meta = resumed_guard.get("meta")
        report = meta.get("report") if isinstance(meta, dict) and isinstance(meta.get("report"), dict) else None
    stopped = bool(report and report["stopped"])
    if stopped and eval_fn is not None:
        last_eval = eval_fn(adapter, report["kept_step"])  # the eval of the adapter that is kept
    if step >= steps or stopped:
        if last_eval is None and eval_fn is not None:
            last_eval = eval_fn(adapter, step)
        final = adapter
        final_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
        if jpeft.scan.is_stacked(final) or jpeft.scan.num_stacked_layers(final_params) is not None:
            # the finished adapter is written per layer, for the unrolled model that
            # `jpeft eval`, `merge` and `export` load (checkpoints keep the scanned form); on a mesh the
            # layers are sliced on the devices (every process alike), where each keeps its share
            final = jpeft.scan.unstack_adapter(final)
            final_params = jpeft.scan.unstack_params(final_params)
        # on a mesh every process writes with process 0, gathering one array at a time (a collective each):
        # no process holds the whole adapter, or a full fine-tuning's whole model, on its host
        if mesh is not None or jax.process_index() == 0:
            try:
                # the config training decided (AdaLoRA's rank_pattern, read from the optimizer state)
                save_adapter(os.path.join(out_dir, "adapter"), final, method.trained_config(opt_state),
                             gather=dist.gather_array if mesh is not None else None,
                             params=final_params, base_config=loaded.hf_config,
                             metadata={"steps": _adapter_step(report, steps), "eval": last_eval,
                                       **({"forgetting": _canary_summary(report)} if report else {})})
            except OSError as e:  # SaveError among them: the folder became read-only, the disk filled
                if stopped or step not in ckpts.all_steps():
                    raise
                raise SaveError(f"{str(e).rstrip('.')}. The trained state is not lost: checkpoint step {step} in "
                                f"{ckpts.directory} holds it. Make {out_dir} writable (permissions, free space) and run "
                                "the same command with --resume, which writes the finished adapter without training "
                                "again.") from None
        if jax.process_count() > 1:
            dist.barrier("jpeft_train_adapter_written")
    where = (os.path.join(out_dir, "adapter") if step >= steps or stopped
             else os.path.join(str(ckpts.directory), str(step)))
    if report:
        _say(_canary_line(report, fg))
    if stopped:
        _say(f"jpeft train: stopped by the forgetting guard at step {step} of {steps}; the adapter of step "
             f"{report['kept_step']} (the last within budget) saved to {where}")
    elif interrupted:
        _say(f"jpeft train: interrupted at step {step}; checkpoint saved. Continue with --resume.")
    elif step < steps:
        _say(f"jpeft train: stopped at step {step} of {steps} (--max-steps); continue with --resume.")
    elif _adapter_step(report, steps) != steps:
        _say(f"jpeft train: done; the forgetting guard rolled back at the last step, so the adapter of step "
             f"{report['kept_step']} (the last within budget) saved to {where}")
    else:
        _say(f"jpeft train: done; adapter saved to {where}")
    return {"step": step, "interrupted": interrupted, "eval": last_eval, "adapter_dir": where,
            "forgetting": None if report is None else _canary_summary(report)}


def _adapter_step(report: Optional[dict], steps: int) -> int:
    """The step whose adapter a finished run saves: the kept one when the guard stopped the run
    or rolled back at its last step (the state it restored), else ``steps``."""
    if report and (report["stopped"] or any(e["action"] == "rollback" and e["step"] >= steps
                                            for e in report["events"])):
        return int(report["kept_step"])
    return steps


def _canary_summary(report: dict) -> dict:
    """The forgetting guard's result as stored in the adapter's metadata: the kept state's
    canary numbers, the last check, and the stops and rollbacks."""
    return {"kept_step": report["kept_step"], **report["kept"], "last_check": report["checks"][-1],
            "stopped": report["stopped"], "rollbacks": report["rollbacks"], "events": report["events"]}


def _canary_line(report: dict, fg: dict) -> str:
    k = report["kept"]
    budget = ", ".join(f"{n} {fg[n]:g}" for n in ("max_loss_rise", "max_kl") if fg[n] is not None)
    return (f"jpeft train: canary {os.path.basename(fg['canary'])}: loss {k['canary_loss']:.4f}, rise "
            f"{k['canary_loss_rise']:+.4f} nats, mean KL {k['canary_kl']:.4g} nats at step {report['kept_step']} "
            f"(budget {budget}; {len(report['checks'])} checks, {report['rollbacks']} rollback(s)"
            f"{', stopped' if report['stopped'] else ''})")
