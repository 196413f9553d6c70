"""Adapters and training checkpoints for the CLI, on :mod:`jpeft.io` (finished adapters),
:mod:`jpeft.hf` (Hugging Face PEFT folders) and :mod:`jpeft.checkpoint` (Orbax training
checkpoints).

Every command that takes ``--adapter`` reads whatever training or export wrote:

* a jpeft adapter folder (``jpeft_adapter.json``), e.g. ``runs/x/adapter``;
* a Hugging Face PEFT folder (``adapter_config.json``), e.g. what ``jpeft export`` wrote;
* a training checkpoint step, e.g. ``runs/x/checkpoints/30`` (an interrupted run);
* a run folder (``runs/x``): its finished ``adapter/``, else its newest checkpoint;
* a checkpoints folder (``runs/x/checkpoints``): its newest step.

A PEFT folder saved unconverted after a PiSSA or OLoRA init (``init_lora_weights="pissa"`` /
``"olora"``) holds factors relative to the residual base PEFT recomputes from the original
weights when it loads the adapter: :func:`load_adapter_with_base` returns that base with the
adapter (``merge``, ``export`` and ``eval`` use it, so their numbers are PEFT's), and
:func:`load_adapter`, for commands that apply every adapter to the ``--model`` base as it is
(``serve``), converts it to a plain LoRA of that base (:func:`jpeft.convert_residual_adapter`).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import NamedTuple, Optional

import jax.numpy as jnp

import jpeft
from _jpeft_args import ADAPTER_KINDS
from jpeft import hf, io, scan
from jpeft.checkpoint import CheckpointManager, FORMAT
from jpeft.cli._common import say
from jpeft.config import AdapterConfig
from jpeft.errors import (BaseMismatchError, CheckpointError, JpeftError, LoadError, ShapeMismatchError,
                          UnsupportedAdapterError)
from jpeft.io import read_json, verify_checksum
from jpeft.models import loading
from jpeft.peft_format import peft_version_of

ADAPTER_JSON = "jpeft_adapter.json"
PEFT_JSON = "adapter_config.json"
CKPT_META = os.path.join("meta", "metadata")


class Found(NamedTuple):
    kind: str   # "jpeft", "peft" or "checkpoint"
    path: str   # the adapter folder, the PEFT folder, or the checkpoint step folder
    step: Optional[int] = None


def checkpoint_steps(ckpt_dir: str) -> list[int]:
    """Complete checkpoint steps in a checkpoints folder (Orbax's temporary folders skipped)."""
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(int(n) for n in os.listdir(ckpt_dir)
                  if n.isdigit() and os.path.isfile(os.path.join(ckpt_dir, n, CKPT_META)))


def find_adapter(path: str) -> Found:
    """Says what ``path`` holds (see the module docstring).

    Raises:
      LoadError: it does not exist or holds none of the accepted kinds.
    """
    if not os.path.exists(path):
        raise LoadError(f"adapter path {path!r} does not exist; give {ADAPTER_KINDS}.")
    if os.path.isfile(path):
        name = os.path.basename(path)
        if name in (ADAPTER_JSON, PEFT_JSON, "jpeft_adapter.safetensors", "adapter_model.safetensors"):
            return find_adapter(os.path.dirname(path) or ".")
        raise LoadError(f"adapter path {path!r} is a file; give {ADAPTER_KINDS}.")
    if os.path.isfile(os.path.join(path, ADAPTER_JSON)):
        return Found("jpeft", path)
    if os.path.isfile(os.path.join(path, PEFT_JSON)):
        return Found("peft", path)
    if os.path.isfile(os.path.join(path, CKPT_META)) and os.path.basename(os.path.normpath(path)).isdigit():
        return Found("checkpoint", path, int(os.path.basename(os.path.normpath(path))))
    if os.path.isfile(os.path.join(path, "adapter", ADAPTER_JSON)):
        _warn_if_checkpoints_are_newer(path)
        return Found("jpeft", os.path.join(path, "adapter"))
    for ckpt_dir in (os.path.join(path, "checkpoints"), path):
        steps = checkpoint_steps(ckpt_dir)
        if steps:
            return Found("checkpoint", os.path.join(ckpt_dir, str(steps[-1])), steps[-1])
    raise LoadError(f"{path!r} holds no adapter (found: {sorted(os.listdir(path))[:8]}); give {ADAPTER_KINDS}.")


def adapts_lm_head(path: str) -> bool:
    """Whether the adapter at ``path`` is a PEFT folder whose config adapts ``lm_head``
    (:meth:`jpeft.AdapterConfig.adapts_lm_head` of :func:`jpeft.hf.peft_config`, by the rules of
    the file's ``peft_version``, as :func:`jpeft.hf.load_peft` reads it: a site of it, or
    ``modules_to_save`` naming it, ``["lm_head"]``, or ``["head"]`` in a file of PEFT < 0.22,
    whose suffix rule copies ``lm_head`` where PEFT >= 0.22 copies nothing; not with
    ``ensure_weight_tying``, where the embedding's site covers the tied head), or a jpeft
    adapter or checkpoint saved for a base with an ``lm_head`` of its own (``jpeft train`` of
    such a method on a tied base reads it untied). On a base whose ``config.json`` ties
    ``lm_head`` to the input embedding, PEFT computes such an adapter with an ``lm_head`` of its
    own, so the commands read that base untied (``load_folder(untie=True)``: ``lm_head`` a copy
    of the embedding, the same logits) and ``merge`` writes it untied, as PEFT's
    ``merge_and_unload()`` does."""
    try:
        found = find_adapter(path)
    except JpeftError:  # no adapter there (or --model and --adapter swapped): the loaders name it, model first
        return False
    if found.kind != "peft":
        try:
            base = (io.read_adapter_info(found.path).base if found.kind == "jpeft"
                    else checkpoint_metadata(found.path).get("base"))
            rows = base.get("params") if isinstance(base, dict) else None
            return any(isinstance(r, list) and r and str(r[0]).split("/")[0] == "lm_head" for r in rows or ())
        except JpeftError:  # a damaged file: the loader names it
            return False
    if not os.path.isfile(os.path.join(found.path, "adapter_model.safetensors")):
        return False
    try:
        with warnings.catch_warnings():  # the loader gives the file's warnings (an init it reads as plain LoRA)
            warnings.simplefilter("ignore")
            return hf.peft_config(found.path).adapts_lm_head(peft_version_of(hf.read_peft_config(found.path)))
    except JpeftError:  # a damaged or unsupported file: the loader names it
        return False


def untie_for(path: str, model: str) -> bool:
    """Whether a command reads the base folder ``model`` untied (``load_folder(untie=True)``) for
    the adapter at ``path``: it adapts ``lm_head`` (:func:`adapts_lm_head`) and ``model``'s
    ``config.json`` ties ``lm_head`` to the input embedding.

    Raises:
      UnsupportedAdapterError: such a PEFT folder that also holds trainable tokens: PEFT applies
        their rows in the tied ``lm_head`` under its adapter too, which the untied base does not
        (its logits were 7 off PEFT's without a word).
    """
    if not adapts_lm_head(path):
        return False
    try:
        tied = loading.ties_lm_head(loading.read_config(model))
    except (JpeftError, TypeError, ValueError):  # a missing or broken config.json: the model's loader names it
        return True
    found = find_adapter(path)
    if tied and found.kind == "peft":
        try:
            tokens = read_json(os.path.join(found.path, PEFT_JSON)).get("trainable_token_indices")
        except (JpeftError, AttributeError):  # the adapter's loader names a broken file
            tokens = None
        if tokens:
            raise UnsupportedAdapterError(
                f"the PEFT adapter at {path!r} adapts lm_head (a LoRA of it, or modules_to_save) and holds trainable "
                f"tokens ({tokens!r}) on a base whose config.json ties lm_head to the input embedding: PEFT applies "
                "the token rows in the tied lm_head under its adapter too, which jpeft cannot compute (its lm_head, "
                "read untied for the adapter, takes the embedding's rows only; the outputs would differ). Merge it with "
                "PEFT (merge_and_unload()), or keep trainable tokens and an lm_head adapter in separate adapters.")
    return tied


def _warn_if_checkpoints_are_newer(run: str) -> None:
    """A run folder's finished ``adapter/`` is what ``--adapter RUN`` reads; a run resumed to
    more steps and not finished yet has newer checkpoints beside it, which the user may have
    meant. Says so (one line on stderr) and how to read the newer one."""
    steps = checkpoint_steps(os.path.join(run, "checkpoints"))
    if not steps:
        return
    try:
        meta = read_json(os.path.join(run, "adapter", ADAPTER_JSON), what="adapter metadata")["metadata"]
        done = int(meta["steps"])
    except (LoadError, KeyError, TypeError, ValueError):
        return
    if (meta.get("forgetting") or {}).get("stopped"):
        return  # the forgetting guard stopped the run and kept an earlier step on purpose
    if steps[-1] > done:
        newest = os.path.join(run, "checkpoints", str(steps[-1]))
        say(f"note: {os.path.join(run, 'adapter')} is the adapter finished at step {done}, but the run has a newer "
              f"checkpoint (step {steps[-1]}: a resumed run not finished yet); reading the finished adapter. Give "
              f"--adapter {newest} for the newer one.")


def run_folder_of(found_path: str) -> Optional[str]:
    """The ``jpeft train`` run folder holding the adapter folder or checkpoint step
    :func:`find_adapter` found (``runs/x`` for ``runs/x/adapter`` and ``runs/x/checkpoints/30``),
    else ``None``. Real paths."""
    read = os.path.realpath(found_path)
    parent = os.path.dirname(read)
    if os.path.basename(read) == "adapter":
        return parent
    return os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else None


def trained_quantization(path: str) -> Optional[str]:
    """The quantization (``"nf4"``, ``"int8"``, ``"fp8"``) of the base the adapter at ``path``
    was trained on, from its run's ``resolved_config.json``; ``None`` when the base was not
    quantized or nothing says (a PEFT folder, an adapter folder outside its run)."""
    run = run_folder_of(find_adapter(path).path)
    if run is None or not os.path.isfile(os.path.join(run, "resolved_config.json")):
        return None
    try:
        q = read_json(os.path.join(run, "resolved_config.json"), what="the run's settings").get("quantize")
    except (LoadError, AttributeError):
        return None  # --resume names a broken file; here it only decides a note
    return q if isinstance(q, str) else None


def note_quantized_training(path: str, used: Optional[str], consequence: str) -> None:
    """One line on stderr when the adapter at ``path`` was trained on a quantized base and the
    command reads the base otherwise (``used``: its quantization, ``None`` for full precision):
    its numbers then differ from training's by the quantization error, and nothing else says so.
    ``consequence`` may name the scheme as ``{q}``."""
    q = trained_quantization(path)
    if q is not None and q != used:
        say(f"note: {path} was trained on a {q}-quantized base (the run's quantize = {q!r}); "
            + consequence.format(q=q))


def checkpoint_metadata(step_dir: str) -> dict:
    """The JSON metadata of one checkpoint step (method config, base fingerprint, array index,
    metrics), checked as :meth:`jpeft.checkpoint.CheckpointManager.read_metadata` checks it."""
    step = int(os.path.basename(os.path.normpath(step_dir)))
    try:
        d = read_json(os.path.join(step_dir, CKPT_META), what=f"checkpoint metadata of step {step}")
    except LoadError as e:
        raise CheckpointError(str(e)) from None
    verify_checksum(d, f"the metadata of checkpoint {step_dir}")
    if d.get("format") != FORMAT or not isinstance(d.get("config"), dict) or not isinstance(d.get("arrays"), dict):
        raise CheckpointError(f"{step_dir} is not a jpeft training checkpoint (its metadata lacks format, config or arrays).")
    return d


def save_adapter(directory: str, adapter, config, *, params=None, base_config=None, metadata=None, gather=None):
    """Writes a finished adapter (``jpeft_adapter.json`` + ``jpeft_adapter.safetensors``),
    replacing an older one at ``directory`` (``gather``: :func:`jpeft.io.save_adapter`'s, every
    process of the job calls it)."""
    return io.save_adapter(directory, config, adapter, params=params, base_config=base_config,
                           metadata=metadata, overwrite=True, gather=gather)


def load_adapter(path: str, *, params, model=None, example=None, base_config=None):
    """Reads any adapter :func:`find_adapter` accepts onto ``params``: ``(adapter, config)``.
    A checkpoint's adapter is restored without its optimizer state.

    For commands that apply the adapter to ``params`` as they are (``serve``, which shares the
    base among adapters): a PEFT folder whose factors are relative to a residual base PEFT
    recomputes (PiSSA, OLoRA) is read with that base (:func:`load_adapter_with_base`) and
    converted to a plain LoRA of ``params`` (:func:`jpeft.convert_residual_adapter`, rank ``2r``,
    as PEFT's ``path_initial_model_for_weight_conversion``), so it gives PEFT's numbers on the
    shared base; ``config`` is then the converted one (:func:`jpeft.convert_residual_config`)."""
    adapter, config, base = load_adapter_with_base(path, params=params, model=model, example=example,
                                                   base_config=base_config)
    if base is not params:
        adapter = jpeft.convert_residual_adapter(adapter, params, base)
        config = jpeft.convert_residual_config(config)
    return adapter, config


def residual_kind(path: str):
    """``"pissa"`` / ``"olora"`` when ``path`` is a PEFT folder whose factors are relative to the
    residual base PEFT recomputes on load, else ``None`` (read from ``adapter_config.json`` only)."""
    found = find_adapter(path)
    if found.kind != "peft":
        return None
    try:
        with warnings.catch_warnings():  # the load that follows warns of what it drops, once
            warnings.simplefilter("ignore")
            init = AdapterConfig.from_dict(hf.read_peft_config(found.path)).residual_init
    except JpeftError:
        return None  # the load that follows names what is wrong with the file
    return init if init in ("pissa", "olora") else None  # the residual inits PEFT recomputes on load


def load_adapter_with_base(path: str, *, params, model=None, example=None, base_config=None):
    """As :func:`load_adapter`, with the base the adapter applies to: ``(adapter, config, base)``.
    ``base`` is ``params`` itself, except for a PEFT folder saved with
    ``init_lora_weights="pissa"``/``"olora"``, whose base is the residual PEFT's
    ``PeftModel.from_pretrained`` recomputes from the original weights
    (:func:`jpeft.hf.load_peft_with_base`): ``jpeft.apply(model, base, adapter, x)`` gives
    PEFT's outputs and ``jpeft.merge(base, adapter)`` its ``merge_and_unload()`` weights.

    Raises:
      QuantizationError: such an adapter on quantized ``params`` (the residual is computed from
        the full-precision kernels: read it onto the full-precision base, then quantize the
        ``base`` returned).
    """
    try:
        return _load_adapter(path, params, model, example, base_config)
    except BaseMismatchError as e:
        if getattr(e, "difference", None) is None:
            raise
        # the library's fix (allow_base_mismatch=True) is no option of the command
        raise BaseMismatchError(io.base_mismatch_message(
            e.what, e.difference, " (--model); from Python, allow_base_mismatch=True loads it anyway")) from None


def float_dtype_only(saved: Optional[dict], params, base_config=None) -> bool:
    """Whether the base fingerprint ``saved`` differs from ``params`` only in floating dtypes:
    the same model folder loaded in another dtype (``train.dtype``, ``eval``/``serve --dtype``;
    ``merge`` and ``export`` load it in float32), which the commands accept. The library's
    loaders refuse any dtype difference (``allow_base_mismatch``)."""
    if not isinstance(saved, dict) or saved.get("content_hash") or params is None:
        return False
    current = io.base_fingerprint(params, base_config)

    def loose(fp):
        rows = [[n, s, "float" if jnp.issubdtype(jnp.dtype(d), jnp.floating) else d] for n, s, d in fp.get("params", [])]
        return {**fp, "params": rows}

    try:
        return io.fingerprint_difference(saved, current) is not None and io.fingerprint_difference(loose(saved), loose(current)) is None
    except (TypeError, ValueError):  # a damaged fingerprint: the library's check names it
        return False


@contextlib.contextmanager
def _quiet_base_warning():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"this (adapter|checkpoint) was saved for a different base model")
        yield


def _load_adapter(path, params, model, example, base_config):
    found = find_adapter(path)
    args = () if example is None else (example,)
    if found.kind == "jpeft":
        allow = float_dtype_only(io.read_adapter_info(found.path).base, params, base_config)
        with _quiet_base_warning():
            config, adapter = io.load_adapter(found.path, params, model, *args, base_config=base_config,
                                              allow_base_mismatch=allow)
        return adapter, config, params
    if found.kind == "peft":  # a residual (PiSSA/OLoRA) folder on a quantized base: QuantizationError there
        config, base, adapter = hf.load_peft_with_base(found.path, params)
        return adapter, config, base
    return _restore_checkpoint(found, params, model, args, base_config) + (params,)


def _restore_checkpoint(found: Found, params, model, args, base_config):
    """The adapter of one checkpoint step. A ``scan_layers = true`` run checkpoints the
    layer-stacked adapter of the scanned model: it is restored onto the stacked base and
    written back per layer (:func:`jpeft.scan.unstack_adapter`), as the run's finished
    ``adapter/`` is."""
    meta = checkpoint_metadata(found.path)
    config = AdapterConfig.from_dict(meta["config"])
    # the config the step's sites were saved with (AdaLoRA's rank_pattern of that step, LoRA's residual marks)
    sites = AdapterConfig.from_dict(meta["sites_config"]) if isinstance(meta.get("sites_config"), dict) else config
    directory = os.path.dirname(os.path.normpath(found.path))
    try:
        return _restore(directory, found.step, config, params, model, args, base_config), sites
    except (BaseMismatchError, ShapeMismatchError) as e:
        cfg = getattr(model, "config", None)
        if not hasattr(cfg, "scan_layers") or cfg.scan_layers or not _stacked(meta):
            raise
        first = e
    scanned = type(model)(cfg.replace(scan_layers=True))
    try:
        stacked = _restore(directory, found.step, config, scan.stack_params(params), scanned, args, base_config)
    except (BaseMismatchError, ShapeMismatchError):
        raise first from None
    return scan.unstack_adapter(stacked), sites


def _stacked(meta) -> bool:
    """Whether a checkpoint's metadata is a layer-scanned run's: its adapter's array names hold a
    layer-stacked site (``.../layers/...``, where an unrolled model has ``.../layers_0/...``), or,
    for an adapter with no per-layer site (prefix tuning's one table, which was read as saved for
    another base), its base fingerprint names the stacked layers."""
    base = meta.get("base") if isinstance(meta.get("base"), dict) else {}
    rows = base.get("params") if isinstance(base.get("params"), list) else []
    names = [k for k in meta["arrays"] if k.startswith("adapter/")]
    names += [r[0] for r in rows if isinstance(r, list) and r and isinstance(r[0], str)]
    return any("layers" in n.split("/") for n in names)


def _restore(directory, step, config, params, model, args, base_config):
    saved = checkpoint_metadata(os.path.join(directory, str(step))).get("base")
    allow = float_dtype_only(saved, params, base_config)
    with CheckpointManager(directory, config, params, model=model, example_args=args, base_config=base_config,
                           async_save=False, keep_last=None, read_only=True) as mngr, _quiet_base_warning():
        return mngr.restore(step, allow_base_mismatch=allow).adapter
