"""Adapter-only training checkpoints on Orbax: exact resume, crash safety, resharding, and a
guard against restoring onto the wrong base model.

Each checkpoint step is an Orbax composite of two items:

* ``state``: the arrays: the adapter (``adapter/<module path>/<field>``), the optimizer state
  (``opt_state/<key path>``) and the RNG key data (``rng``). Never a base weight.
* ``meta``: JSON: format version, jpeft version, the method config (``config.to_dict()``), the
  base-model fingerprint (its config and every parameter's path, shape and dtype, plus an
  optional content hash), the step, the data position, the metrics, and an index of every
  array with its shape, dtype and SHA-256.

Orbax writes each step into a temporary directory and renames it into place once complete,
so a process killed mid-save leaves the previous step restorable; the manager removes
leftover temporary directories when it starts, and moves a step folder no save got into (an
empty one) aside to ``<step>.incomplete-<id>``. A checkpoint whose files were damaged later
is caught by the SHA-256 index and raises :class:`~jpeft.errors.CheckpointError`.

>>> import jax, jax.numpy as jnp, flax.linen as nn, optax, jpeft, tempfile
>>> model = nn.Dense(4); params = model.init(jax.random.key(0), jnp.ones((1, 3)))
>>> cfg = jpeft.LoraConfig(r=2, target_modules=".*"); opt = optax.adam(1e-3)
>>> adapter = jpeft.init(cfg, params, jax.random.key(1))
>>> with jpeft.checkpoint.CheckpointManager(tempfile.mkdtemp(), cfg, params, optimizer=opt) as mngr:
...     mngr.save(10, adapter, opt.init(adapter), jax.random.key(2), data_position=640)
...     mngr.wait()
...     state = mngr.restore_latest()
True
>>> state.step, state.data_position, bool(jnp.array_equal(state.adapter[""].lora_A, adapter[""].lora_A))
(10, 640, True)
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import errno
import fcntl
import gc
import logging
import math
import os
import shutil
import stat
import sys
import threading
import time
import traceback
import uuid
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import numpy as np

from jpeft.config import AdapterConfig
from jpeft.distributed import gather, lost_peer
from jpeft.errors import (
    CheckpointError,
    CheckpointUnreadableError,
    ConfigError,
    DistributedError,
    JpeftError,
    LayoutError,
    LoadError,
    PathEscapeError,
    SaveError,
    ShapeMismatchError,
)
from jpeft._version import __version__
from jpeft._checksum import sha256_hex, verify_checksum, with_checksum
from jpeft._files import safe_join
from jpeft._fingerprint import base_fingerprint, check_base
from jpeft._safe_read import read_json
from jpeft._safetensors import np_dtype
from jpeft.io import check_index, kernel_fns, module_copies, plain_sites, template_adapter
from jpeft.methods._common import head_copies, with_head_copies
from jpeft.methods.base import (recorded_kernel_fns, recorded_plain_sites, split_frozen, trainable, with_kernel_fns,
                                with_plain_sites)
from jpeft.tree import host_array, is_typed_key, leaf_names, unwrap_params

FORMAT = "jpeft-train-checkpoint"
FORMAT_VERSION = 1
_LOCK_FILE = ".jpeft-writer.lock"  # flock-ed by the one manager allowed to save into a directory

_log = logging.getLogger(__name__)


class _DropNotes(logging.Filter):
    """Orbax's warnings that say what jpeft asked for, not news to the user: on opening a manager
    read-only, ``save_interval_steps`` set to 0 and "Given directory is read only" (said of a
    writable folder; ``jpeft eval --adapter <checkpoint>`` printed both); on an unranked save
    (``save(..., ranked=False)``), "Requested `tracked_metric`; did not provide metrics"."""

    def __init__(self, notes):
        super().__init__()
        self.notes = notes

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(n in msg for n in self.notes)


_READ_ONLY_NOTES = ("read_only=True, setting save_interval_steps", "Given directory is read only")
_UNRANKED_NOTES = ("did not provide metrics",)


@contextlib.contextmanager
def _quiet_notes(notes=_READ_ONLY_NOTES):
    f = _DropNotes(notes)
    log = logging.getLogger("absl")
    log.addFilter(f)
    try:
        yield
    finally:
        log.removeFilter(f)


def _closed_loop_callback(unraisable) -> bool:
    """Whether ``unraisable`` is a read of an aborted Orbax restore reporting to its closed loop.

    Orbax runs a restore's reads on an event loop of its own and closes it as soon as one read
    fails (a damaged or unreadable file); the other reads go on in tensorstore's threads, and each
    that completes calls the closed loop's ``call_soon_threadsafe`` from C, which Python prints as
    an unraisable "RuntimeError: Event loop is closed" traceback with no caller: one per array,
    around jpeft's own error line. Nothing can act on them; anything else is not this."""
    if unraisable.exc_type is not RuntimeError or str(unraisable.exc_value) != "Event loop is closed":
        return False
    tb = unraisable.exc_traceback
    return tb is not None and tb.tb_frame.f_code.co_name == "call_soon_threadsafe" and \
        unraisable.object is None and isinstance(threading.current_thread(), threading._DummyThread)


#: step folders being restored, or whose restore failed part-way: asyncio's reports of their stray reads are
#: dropped (see below)
_ABORTED_READS: set = set()


def _drop_aborted_read_tasks(record: logging.LogRecord) -> bool:
    """asyncio's "Task/Future exception was never retrieved" for the other reads of a restore that
    failed (each names its own read error in that step's folder, logged whenever the garbage
    collector frees it, even after the restore's error was handled): the restore's error says it."""
    msg = record.getMessage()
    return not ("exception was never retrieved" in msg and any(d in msg for d in _ABORTED_READS))


@contextlib.contextmanager
def _quiet_aborted_reads(folder, quiet: float = 0.2, limit: float = 2.0):
    """Drops :func:`_closed_loop_callback` reports while an Orbax restore of the step folder
    ``folder`` runs, and after one that failed, until its stray reads have ended (``quiet`` seconds
    without one, ``limit`` at most); every other unraisable error goes to the hook that was in
    place. asyncio's reports of that folder's unretrieved reads are dropped from the start (a failed
    read's task may be freed, and reported, before the error leaves Orbax) and, after a failure,
    for good."""
    previous, last = sys.unraisablehook, [time.monotonic()]
    # ".../1/", not ".../10"; resolved, and as given (the message names the folder as Orbax was given it)
    keys = {os.path.join(str(p), "") for p in (Path(folder).resolve(), os.path.abspath(folder))}
    new_keys = keys - _ABORTED_READS
    if not _ABORTED_READS:
        logging.getLogger("asyncio").addFilter(_drop_aborted_read_tasks)
    _ABORTED_READS.update(keys)

    def hook(unraisable):
        if _closed_loop_callback(unraisable):
            last[0] = time.monotonic()
        else:
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    except BaseException as e:
        new_keys = set()  # kept: the stray reads may be freed, and reported, at any later time
        last[0] = time.monotonic()  # the stray reads may not have reported yet
        end = last[0] + limit
        while time.monotonic() < end and time.monotonic() - last[0] < quiet:
            time.sleep(0.02)
        # the aborted reads' tasks, held by the locals of the failed restore's frames: freed now, not when the caller
        # lets go of the error (the frames' code and lines stay for a traceback)
        traceback.clear_frames(e.__traceback__)
        gc.collect()
        raise
    finally:
        _ABORTED_READS.difference_update(new_keys)  # a restore that succeeded leaves no stray reads
        if sys.unraisablehook is hook:  # another hook put in place meanwhile chains to this one: keep it
            sys.unraisablehook = previous


#: Orbax's own reports of a failed background save, each an ERROR with its traceback: the writer thread's, the
#: commit's, the finalize's and the step metadata's. jpeft raises that failure itself (SaveError, or the next
#: save's warning).
_FAILED_SAVE_NOTES = ("_SignalingThread.run() raised an exception", "Handler Commit operations or the Commit callback",
                      "Save Finalize thread (save_finalize) failed", "Failed to write metadata=")


class _FailedSaveReports:
    """Quiets what a failed save prints around jpeft's one error, while a manager that writes is
    open: Orbax's :data:`_FAILED_SAVE_NOTES` (three tracebacks per failed step) and, as on the
    restore path (:func:`_closed_loop_callback`, :func:`_drop_aborted_read_tasks`), what the
    step's other array writes report once Orbax closed the save's event loop on the first failed
    write: an unraisable "Event loop is closed" traceback each, and asyncio's "Task/Future
    exception was never retrieved" for those that failed too (a save's temporary folder in the
    message). A disk that filled up part-way through a run printed 98 + 20 of them around the
    named errors. Every other unraisable error goes to the hook that was in place. Counted: the
    first writer opened installs it (and any other while a hook put in place since holds the
    place), the last one closed or collected removes it."""

    def __init__(self):
        self.users, self.previous, self.last = 0, None, 0.0
        self.notes = _DropNotes(_FAILED_SAVE_NOTES)

    def hook(self, unraisable) -> None:
        if _closed_loop_callback(unraisable):
            self.last = time.monotonic()
        else:
            (self.previous or sys.__unraisablehook__)(unraisable)

    @staticmethod
    def unretrieved_writes(record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not ("exception was never retrieved" in msg and ".orbax-checkpoint-tmp" in msg)

    def enter(self) -> None:
        if sys.unraisablehook != self.hook:
            self.previous, sys.unraisablehook = sys.unraisablehook, self.hook
        if self.users == 0:
            logging.getLogger("absl").addFilter(self.notes)
            logging.getLogger("asyncio").addFilter(self.unretrieved_writes)
        self.users += 1

    def exit(self) -> None:
        self.users -= 1
        if self.users == 0:
            if sys.unraisablehook == self.hook:  # another hook put in place meanwhile chains to this one: keep it
                sys.unraisablehook = self.previous
            logging.getLogger("absl").removeFilter(self.notes)
            logging.getLogger("asyncio").removeFilter(self.unretrieved_writes)

    def settle(self, quiet: float = 0.2, limit: float = 2.0) -> None:
        """After a failed save: waits until its stray writes have reported (``quiet`` seconds
        without one, ``limit`` at most), so none prints after the error once the manager closes."""
        start = self.last = max(self.last, time.monotonic())
        while time.monotonic() < start + limit and time.monotonic() - self.last < quiet:
            time.sleep(0.02)
        gc.collect()  # the failed writes' tasks, reported when freed: now, while the filter is in place


_FAILED_SAVES = _FailedSaveReports()


@dataclasses.dataclass(frozen=True)
class TrainState:
    """A restored training checkpoint.

    Attributes:
      step: the step the checkpoint was saved at.
      adapter: the adapter dict, nodes rebuilt from the config.
      opt_state: the optimizer state in the structure of ``optimizer.init(jpeft.trainable(adapter))`` (or of
        the ``opt_state`` template given to :meth:`CheckpointManager.restore`); a flat dict
        ``{key path: array}`` when neither was given; ``None`` when none was saved.
      key: the RNG key as saved (a typed key stays typed), or ``None``.
      data_position: what was given as ``data_position`` (any JSON value).
      metrics: the metrics given to ``save`` (or ``None``).
      metadata: the checkpoint's JSON metadata (jpeft version, config, base fingerprint).
      extra: what was given to ``save`` as ``extra`` (``{"meta": ..., "adapter": ...,
        "opt_state": ...}``, the arrays rebuilt like ``adapter`` and ``opt_state``), or ``None``:
        :func:`jpeft.fit` keeps its forgetting guard's state there.
    """

    step: int
    adapter: dict
    opt_state: Any
    key: Any
    data_position: Any
    metrics: Optional[dict]
    metadata: dict
    extra: Optional[dict] = None


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


def optimizer_state_kinds(opt_state) -> list:
    """The class names of an optimizer state's parts, in order (``["ScaleByAdamState",
    "EmptyState"]`` for ``optax.adam``): what tells two optimizers' states apart when their
    arrays have the same names and shapes (Adam's ``nu`` against AdaBelief's), so a checkpoint
    is not restored into another update rule. Adapter-shaped parts (``mu``, ``nu``) are not
    entered."""
    out: list = []

    def walk(x):
        if isinstance(x, tuple) and hasattr(x, "_fields"):
            out.append(type(x).__name__)
            for v in x:
                walk(v)
        elif isinstance(x, (tuple, list)):
            for v in x:
                walk(v)

    walk(opt_state)
    return out


def _key_paths(tree) -> list:
    return [tuple(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _ends_with(kp: tuple, suffixes: set, lengths: list) -> bool:
    return any(kp[len(kp) - n:] in suffixes for n in lengths if n <= len(kp))


def _misbuilt_leaf(opt_state, adapter: Mapping[str, Any], base_keys: set) -> Optional[tuple[str, str]]:
    """``(what, leaf name)`` for the first array of ``opt_state`` that was built over the base
    model's params (``what="base"``: ``optimizer.init(params)``) or over the adapter's frozen
    arrays (``"frozen"``: ``optimizer.init(adapter)`` of VeRA's shared projections), else ``None``.

    Told by key paths: a leaf of a state built over a tree ends with that tree's key path to it
    (``mu/<path>`` in Adam's, ``inner_state/0/mu/<path>`` under ``optax.masked``, ...). A leaf
    ending with a trainable array's key path is the adapter's own (full fine-tuning's copy of the
    params too, whose key path has the node's field in it), so chains, masked and multi-transform
    states, factored second moments and empty states pass."""
    train, frozen = split_frozen(adapter)
    allowed = set(_key_paths(train))
    if not allowed:
        return None
    refused = [("base", base_keys), ("frozen", set(_key_paths(frozen)))]
    a_len = sorted({len(k) for k in allowed})
    for kp, _ in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
        kp = tuple(kp)
        if _ends_with(kp, allowed, a_len):
            continue
        for what, keys in refused:
            if keys and _ends_with(kp, keys, sorted({len(k) for k in keys})):
                return what, jax.tree_util.keystr(kp)
    return None


def _named_host(tree, prefix: str) -> tuple[dict, dict]:
    """``({name: host array}, {name: index entry})`` for a pytree of arrays."""
    named = leaf_names(tree)
    leaves = [leaf for _, leaf in named]
    for name, leaf in named:
        if isinstance(leaf, jax.ShapeDtypeStruct):
            raise ConfigError(f"cannot save {prefix}/{name}: it is abstract (jax.ShapeDtypeStruct), not an array.")
    addressable = all(getattr(x, "is_fully_addressable", True) for x in leaves)
    if addressable:
        # One batched device->host copy; the host copies are what Orbax writes, so the
        # caller may donate or overwrite its device buffers as soon as save() returns.
        host = jax.device_get([jax.random.key_data(x) if is_typed_key(x) else x for x in leaves])
        host = whole = [np.asarray(h) for h in host]
    else:
        # multi-host: Orbax writes each process's shards; the hash is of each array's whole value, gathered on every
        # process (a collective: every process saves, and decides alike from the global shapes), so a restore onto
        # any layout checks it. Not past MULTIHOST_HASH_BYTES (full fine-tuning's copy of a large model and its
        # optimizer state would be gathered whole on every host): those arrays are saved unhashed
        host = leaves
        if sum(_nbytes(x) for x in leaves) <= MULTIHOST_HASH_BYTES:
            whole = gather([jax.random.key_data(x) if is_typed_key(x) else x for x in leaves])
        else:
            whole = [None] * len(leaves)
    arrays, index = {}, {}
    for (name, _), h, w in zip(named, host, whole):
        full = f"{prefix}/{name}" if name else prefix
        arrays[name] = h
        index[full] = {"shape": [int(d) for d in h.shape], "dtype": str(np.dtype(h.dtype)),
                       "sha256": None if w is None else sha256_hex(w)}
    return arrays, index


# the most bytes of one save's tree that a multi-process save gathers on every process to hash (1 GiB)
MULTIHOST_HASH_BYTES = 1 << 30


def _nbytes(x) -> int:
    data = jax.random.key_data(x) if is_typed_key(x) else x
    return int(np.prod(data.shape)) * np.dtype(data.dtype).itemsize


def _wrap(e: BaseException, what: str, cls=CheckpointError):
    if isinstance(e, JpeftError):
        return e
    return cls(f"{what}: {type(e).__name__}: {str(e)[:500]}")


#: managers with asynchronous saves, finished when the interpreter exits (:func:`_finish_at_exit`)
_ASYNC_MANAGERS: "weakref.WeakSet" = weakref.WeakSet()
_EXIT_HOOK = False


def _finish_orbax(mngr) -> None:
    """Waits for an Orbax manager's pending saves: at interpreter exit (:func:`_finish_at_exit`)
    or when a :class:`CheckpointManager` that was never closed is collected."""
    try:
        mngr.wait_until_finished()
    except Exception as e:  # noqa: BLE001  (at exit or in a finalizer: report, never raise)
        warnings.warn(f"jpeft: a pending checkpoint save did not finish: {e}", stacklevel=1)


def _finish_at_exit() -> None:
    """Waits for every live manager's pending asynchronous saves at interpreter exit. Registered
    with ``threading``'s exit hooks, which run before ``concurrent.futures`` refuses new work (Orbax's
    background commit needs it); ``atexit`` would run too late and the last save would be lost
    (only its ``.orbax-checkpoint-tmp`` directory left) by a script that never called ``close()``.
    The hooks run last registered first, so this one is registered after Orbax (and with it
    ``concurrent.futures``) is imported: at the first asynchronous manager."""
    for m in list(_ASYNC_MANAGERS):
        _finish_orbax(m._mngr)


def is_step_folder(path) -> bool:
    """Whether ``path`` is one checkpoint step's folder (``<dir>/<step>``, as Orbax writes it:
    its ``_CHECKPOINT_METADATA``, or the ``state`` and ``meta`` items), not a folder of steps."""
    d = Path(path)
    return (d / "_CHECKPOINT_METADATA").exists() or ((d / "meta").is_dir() and (d / "state").is_dir())


# what Orbax writes into a step folder before its items (a folder holding only these is an unfinished save)
_ORBAX_STEP_MARKS = ("_CHECKPOINT_METADATA", "commit_success.txt")


def _unfinished_step(path) -> bool:
    """Whether ``path`` is a step folder no save got into: a real folder, empty or holding only
    what Orbax writes before a step's items (:data:`_ORBAX_STEP_MARKS`), no ``state`` or ``meta``
    (what a crash right after the folder was made, or a user's ``mkdir``, leaves). Orbax takes
    any folder named like a step for a finished checkpoint. A folder with a ``state`` or
    ``meta`` but files missing is a damaged step (:meth:`CheckpointManager.restore` names it);
    one holding anything else (an adapter saved there) is not a step at all
    (:meth:`CheckpointManager._refuse_foreign_step_names`)."""
    p = Path(path)
    if p.is_symlink() or not p.is_dir() or (p / "state").exists() or (p / "meta").exists():
        return False
    return all(c.name in _ORBAX_STEP_MARKS for c in p.iterdir())


class CheckpointManager:
    """Saves and restores adapter-only training checkpoints under ``directory``.

    Args:
      directory: where the step directories go (created if needed).
      config: the method config of the adapter being trained.
      params: the base model's params (arrays or ``jax.ShapeDtypeStruct``): only their
        fingerprint is stored, never a weight.
      optimizer: the optax optimizer; lets :meth:`restore` rebuild the optimizer state's
        structure without a template.
      model, example_args: what was given to :func:`jpeft.init` after ``key``, when the
        adapter was created by tracing the model.
      base_config: the base model's config (dict, dataclass or transformers config), added to
        the fingerprint.
      with_content_hash: also hash the base weights' bytes into the fingerprint (costs one
        pass over the weights at construction; needs concrete params).
      save_every: :meth:`save` writes only at steps that are multiples of this (unless
        ``force=True``).
      keep_last: keep the newest ``keep_last`` checkpoints (``None`` keeps all).
      keep_best: also keep the ``keep_best`` best checkpoints by ``best_metric``.
      best_metric: the key of the ``metrics`` dict given to :meth:`save` that ranks them.
      best_mode: ``"min"`` (a loss) or ``"max"`` (an accuracy).
      async_save: write in a background thread; :meth:`save` returns once the arrays are on
        the host. Call :meth:`wait` (or :meth:`close`) before relying on the files.
      root: confine ``directory`` to this directory (``..``, absolute paths and symlinks
        raise :class:`~jpeft.errors.PathEscapeError`). Without ``root``, ``directory`` may
        itself be a symlink (e.g. to a scratch disk).
      allow_base_mismatch: default for :meth:`restore`'s flag of the same name.
      read_only: open for reading and restoring only (``jpeft export --adapter
        runs/x/checkpoints/30``): nothing is created or deleted, so a run that is still
        writing keeps its temporary directories; :meth:`save` raises :class:`ConfigError`.

    Raises:
      CheckpointUnreadableError: this process may not list ``directory`` or a step folder in it
        (another user's run with umask 077); names it and how to give access.
    """

    def __init__(
        self,
        directory,
        config: AdapterConfig,
        params,
        *,
        optimizer=None,
        model=None,
        example_args: Sequence[Any] = (),
        base_config=None,
        with_content_hash: bool = False,
        save_every: int = 1,
        keep_last: Optional[int] = 3,
        keep_best: int = 0,
        best_metric: Optional[str] = None,
        best_mode: str = "min",
        async_save: bool = True,
        root=None,
        allow_base_mismatch: bool = False,
        read_only: bool = False,
    ):
        if not isinstance(config, AdapterConfig):
            raise ConfigError(f"CheckpointManager needs a method config such as jpeft.LoraConfig, found {type(config).__name__}.")
        if not isinstance(save_every, int) or save_every < 1:
            raise ConfigError(f"save_every must be a positive integer, found {save_every!r}.")
        if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
            raise ConfigError(f"keep_last must be a positive integer or None, found {keep_last!r}.")
        if not isinstance(keep_best, int) or keep_best < 0:
            raise ConfigError(f"keep_best must be a non-negative integer, found {keep_best!r}.")
        if keep_best and not best_metric:
            raise ConfigError("keep_best > 0 needs best_metric, the key of the metrics dict that ranks checkpoints (e.g. 'loss').")
        if best_mode not in ("min", "max"):
            raise ConfigError(f"best_mode must be 'min' or 'max', found {best_mode!r}.")
        # Without root the directory may itself be a symlink (a scratch disk, say): Orbax writes
        # inside it and never renames it. With root, nothing may lead outside root.
        self.directory = (safe_join(root, directory) if root is not None else Path(directory)).absolute()
        self.config = config
        self.params = params
        self.optimizer = optimizer
        self.model = model
        self.example_args = tuple(example_args)
        self.base_config = base_config
        self.save_every = save_every
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.async_save = async_save
        self.allow_base_mismatch = allow_base_mismatch
        self.read_only = bool(read_only)
        self.fingerprint = base_fingerprint(params, base_config, with_content_hash=with_content_hash)
        self._config_dict = config.to_dict()
        self._base_keys = set(_key_paths(unwrap_params(params)[0]))  # what a state built over the base is told by
        self._opt_structures: dict = {}  # the adapter's tree structure -> that of optimizer.init of its trainable arrays
        self._lock = None  # the writer lock, taken at the first save
        self._pending: Optional[int] = None  # the step of the last asynchronous save started
        self._damaged: set[int] = set()  # steps restore_latest(fallback=True) skipped as damaged
        with _quiet_notes():
            try:
                self._mngr = self._open()
            except PermissionError:  # the folder of another user (umask 077): intact, but closed to this process
                denied = _first_unreadable(self.directory)
                if denied is None:  # not a read: e.g. a folder this process may not write into
                    raise
                raise _unreadable_error(f"the checkpoints in {self.directory}", denied, self.directory) from None
        self._quieting = None  # left once: by close(), or when the manager is collected unclosed
        if not self.read_only:
            _FAILED_SAVES.enter()
            self._quieting = weakref.finalize(self, _FAILED_SAVES.exit)
        if async_save and not self.read_only:
            global _EXIT_HOOK
            if not _EXIT_HOOK:
                threading._register_atexit(_finish_at_exit)
                _EXIT_HOOK = True
            _ASYNC_MANAGERS.add(self)
            # a manager dropped without close() (made inside a script's main(), which returned) leaves the exit
            # hook's weak set before the interpreter exits: its pending save is finished when it is collected
            weakref.finalize(self, _finish_orbax, self._mngr).atexit = False

    # -- orbax plumbing ------------------------------------------------------------------------
    def _open(self):
        ocp = _ocp()
        pp = ocp.checkpoint_managers
        policies = [pp.LatestN(n=self.keep_last)]
        best_fn = None
        if self.keep_best:
            metric = self.best_metric

            worst = float("inf") if self.best_mode == "min" else float("-inf")

            def best_fn(m, metric=metric, worst=worst):
                # a NaN metric ranks last: a diverged step must never push the best one out
                v = float(m[metric])
                return worst if math.isnan(v) else v

            policies.append(pp.BestN(get_metric_fn=best_fn, reverse=(self.best_mode == "min"), n=self.keep_best,
                                     keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=1,
            preservation_policy=pp.AnyPreservationPolicy(policies),
            best_fn=best_fn,
            best_mode=self.best_mode,
            keep_checkpoints_without_metrics=False,
            create=not self.read_only,
            cleanup_tmp_directories=False,  # done by _cleanup_incomplete, only when no other writer is active
            read_only=self.read_only,
            enable_async_checkpointing=self.async_save,
        )
        if self.read_only:
            if not self.directory.is_dir():
                raise CheckpointError(f"checkpoint directory {self.directory} does not exist.")
        if self.directory.is_dir():
            self._refuse_other_folder_kinds()
            self._refuse_foreign_step_names()
        if not self.read_only:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                if jax.process_index() == 0:  # the job's primary process cleans up for all of them
                    with self._writer_lock(blocking=False) as free:
                        if free:  # never remove the temporary directory of another writer's save in progress
                            self._cleanup_incomplete()
                            self._set_aside_unfinished()
            except SaveError:
                raise
            except OSError as e:
                raise SaveError(f"cannot create the checkpoint directory {self.directory}: {e}") from e
        try:
            return ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
        except Exception as e:  # Orbax reads every step's metadata here; a damaged one must not escape raw
            raise CheckpointError(
                f"cannot open the checkpoint directory {self.directory}: {type(e).__name__}: {str(e)[:300]}. "
                "A step's files are damaged; move the damaged step directory away and retry."
            ) from None

    def _cleanup_incomplete(self) -> None:
        """Removes step directories that never completed (Orbax's temporary directories, and
        step directories without Orbax's commit marker)."""
        for p in self.directory.iterdir():
            name = p.name
            if ".orbax-checkpoint-tmp" in name and p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)

    def _set_aside_unfinished(self) -> None:
        """Moves each unfinished step folder (:func:`_unfinished_step`: empty, as a crash right
        after it was made or a user's ``mkdir`` leaves) to
        ``<step>.incomplete-<id>``, with a warning naming it: Orbax takes any folder named like a
        step for a complete checkpoint, so ``restore_latest`` failed on it (and ``keep_last``
        would rotate it away). Kept, never deleted; the newest complete step is restored."""
        for p in sorted(self.directory.iterdir()):
            if p.name.isdigit() and _unfinished_step(p):
                dst = self.directory / f"{p.name}.incomplete-{uuid.uuid4().hex[:8]}"
                try:
                    os.rename(p, dst)
                except OSError as e:
                    raise SaveError(f"checkpoint step folder {p} holds no checkpoint (no state or meta), and moving it "
                                    f"aside to {dst} failed: {e}. Move it out of {self.directory} by hand.") from e
                warnings.warn(f"checkpoint step folder {p} holds no checkpoint (no state or meta: a save that never "
                              f"started writing, or a folder made by hand); moved it to {dst} and skipped it, so the "
                              "newest complete step is restored.", stacklevel=4)

    def _refuse_other_folder_kinds(self) -> None:
        """A manager opened on one checkpoint step (``runs/x/checkpoints/30``), on a run folder
        (``runs/x``) or on a finished adapter folder finds no steps there, so ``restore_latest()``
        returns ``None`` (the "fresh run" answer), training restarts from step 0 and new steps are
        written inside that folder. Refused by what the folder holds, before anything is written; a
        folder that holds steps is a checkpoint directory whatever else it holds (a copied
        ``adapter_config.json``, an adapter exported beside its checkpoints)."""
        d = self.directory
        if is_step_folder(d):
            raise CheckpointError(
                f"{d} is one checkpoint step, not a checkpoint directory: a CheckpointManager takes the folder that "
                f"holds the step folders ({d.parent}). Open it on that folder and restore(step={d.name}) "
                f"(jpeft.load_adapter does not read checkpoints; `jpeft export --adapter {d}` does)."
                if d.name.isdigit() else
                f"{d} holds the files of one checkpoint step, not step folders; a CheckpointManager takes the folder "
                "that holds the step folders (<dir>/<step>).")
        if any(p.name.isdigit() for p in d.iterdir()):
            # it holds steps (restore_latest() finds them; other files beside them are left alone), or entries
            # named like steps that _refuse_foreign_step_names judges
            return
        for name, what, how in (("jpeft_adapter.json", "a finished jpeft adapter", "jpeft.load_adapter"),
                                ("adapter_config.json", "a Hugging Face PEFT adapter", "jpeft.hf.load_peft")):
            if (d / name).exists():
                raise CheckpointError(
                    f"{d} holds {what} ({name}), not training checkpoints; load it with {how}, and give the "
                    "CheckpointManager a directory of its own (e.g. runs/x/checkpoints).")
        sub = d / "checkpoints"
        if sub.is_dir() and any(p.name.isdigit() for p in sub.iterdir()):
            raise CheckpointError(
                f"{d} is a run folder whose checkpoints are in {sub}; open the CheckpointManager on {sub} (opened on "
                f"{d}, it finds no step and would start the run afresh).")

    def _refuse_foreign_step_names(self) -> None:
        """Orbax takes every entry with a step's name (digits) for a checkpoint step, and its
        ``keep_last`` rotation deletes it. An entry with such a name that holds none of a
        checkpoint's parts (a finished adapter saved to ``<dir>/7``, a user's folder) is
        refused by name before anything is written or deleted."""
        parts = ("_CHECKPOINT_METADATA", "state", "meta")
        foreign = sorted(p.name for p in self.directory.iterdir()
                         if p.name.isdigit() and not p.is_symlink()
                         and not (p.is_dir() and any((p / n).exists() for n in parts)) and not _unfinished_step(p))
        if foreign:
            raise CheckpointError(
                f"{self.directory} holds {foreign[:5]}, named like checkpoint steps but not checkpoints (no "
                f"{parts[0]}, state or meta inside); the checkpoint rotation would delete them. Move them out of the "
                "checkpoint directory, or give the manager a directory of its own."
            )

    def _refuse_symlinked_steps(self) -> None:
        """A step directory that is a symlink would be written or deleted through (Orbax's
        rotation fails on it after the new step was written); refuse it up front."""
        for p in self.directory.iterdir():
            if p.name.isdigit() and p.is_symlink():
                raise PathEscapeError(
                    f"checkpoint step directory {p} is a symlink (to {os.readlink(p)}); jpeft does not write or delete "
                    "through symlinks. Replace it with the real directory (or move it out of the checkpoint directory)."
                )

    @contextlib.contextmanager
    def _writer_lock(self, *, blocking: bool):
        """Yields whether the writer lock was free (then holds it for the block)."""
        with open(self.directory / _LOCK_FILE, "a+b") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except OSError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _take_lock(self) -> None:
        """Makes this manager the only writer of its directory (two managers saving the same
        step, in two processes or in one, would overwrite each other). The lock is an ``flock``
        held until :meth:`close`, released by the kernel if the process dies. In a multi-process
        JAX job every process takes part in the same save (Orbax coordinates them), so the job's
        primary process holds the lock for all of them."""
        if self._lock is not None or jax.process_index() != 0:
            return
        try:
            f = open(self.directory / _LOCK_FILE, "a+b")
        except OSError as e:
            raise SaveError(f"cannot create the writer lock in {self.directory}: {e}") from e
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            f.close()
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):  # ENOLCK (NFS without locks), ...
                raise SaveError(f"cannot take the writer lock in {self.directory}: {e}. Save into a folder on a file "
                                "system with flock (a local disk).") from e
            raise SaveError(
                f"another CheckpointManager (in this or another process) is saving into {self.directory}; two writers "
                "would overwrite each other's steps. Close the other manager first, or save into another directory."
            ) from None
        self._lock = f
        self._mngr.reload()  # steps the other writer saved before this one took the lock

    def lock(self) -> "CheckpointManager":
        """Makes this manager its directory's only writer now rather than at its first save
        (what :meth:`save` does), so a program can refuse to start work a second writer would
        lose: ``jpeft train`` takes it before its first step, so a second run on the same output
        folder stops before writing its metrics. Returns the manager.

        Raises:
          ConfigError: the manager was opened with ``read_only=True``.
          SaveError: another manager (in this or another process) holds the directory.
        """
        if self.read_only:
            raise ConfigError(f"this CheckpointManager of {self.directory} was opened with read_only=True; "
                              "it never writes, so it takes no writer lock.")
        self._take_lock()
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Waits for pending saves, then releases Orbax's threads."""
        try:
            self.wait()
        finally:
            self._mngr.close()
            if self._quieting is not None:
                self._quieting()
            if self._lock is not None:
                self._lock.close()  # releases the flock
                self._lock = None

    def wait(self) -> None:
        """Blocks until every asynchronous save is on disk.

        Raises:
          SaveError: a background save failed (the earlier checkpoints are intact).
        """
        try:
            self._mngr.wait_until_finished()
        except Exception as e:  # surfaced from the background thread
            self._settle()
            raise _wrap(e, f"an asynchronous save into {self.directory} failed; earlier checkpoints are intact", SaveError) from e

    def _settle(self) -> None:
        """After a failed save: lets Orbax's remaining writer threads finish, then removes the
        incomplete step directory they leave behind."""
        for _ in range(3):
            try:
                self._mngr.wait_until_finished()
                break
            except Exception:  # the failure itself, re-raised by each wait
                continue
        # Orbax does not cancel the failed step's sibling writers; they may still create files in
        # its temporary directory for a moment. Remove it until it stays gone (bounded).
        quiet = 0
        for _ in range(20):
            had = any(".orbax-checkpoint-tmp" in p.name for p in self.directory.iterdir())
            self._cleanup_incomplete()
            quiet = 0 if had else quiet + 1
            if quiet >= 3:
                break
            time.sleep(0.05)
        _FAILED_SAVES.settle()

    # -- queries -----------------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        """The steps with a complete checkpoint, oldest first. Not one: an unfinished step folder
        (:func:`_unfinished_step`), which a read-only manager leaves in place, nor a step Orbax
        listed whose folder is gone (another process of the job moved it aside after this one
        opened), unless it is this manager's own save still in flight."""
        def listed(s: int) -> bool:
            p = self._step_dir(s)
            return s == self._pending or (os.path.lexists(p) and not _unfinished_step(p))

        return sorted(s for s in map(int, self._mngr.all_steps()) if listed(s))

    def latest_step(self) -> Optional[int]:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def best_step(self) -> Optional[int]:
        """The kept step with the best ``best_metric`` (``None`` when none has metrics)."""
        if not self.best_metric:
            return None
        best = None
        for s in self.all_steps():
            m = self.metrics(s)
            if not m or self.best_metric not in m:
                continue
            v = float(m[self.best_metric])
            if math.isnan(v):  # a diverged step is never the best
                continue
            if best is None or (v < best[0] if self.best_mode == "min" else v > best[0]):
                best = (v, s)
        return None if best is None else best[1]

    def metrics(self, step: int) -> Optional[dict]:
        """The metrics saved with ``step`` (from its JSON metadata)."""
        return self.read_metadata(step).get("metrics")

    def should_save(self, step: int) -> bool:
        return step % self.save_every == 0 and step not in self.all_steps()

    # -- save ----------------------------------------------------------------------------------------
    def save(self, step: int, adapter: Mapping[str, Any], opt_state=None, key=None, *, data_position: Any = None,
             metrics: Optional[Mapping[str, float]] = None, force: bool = False,
             extra: Optional[Mapping[str, Any]] = None, ranked: bool = True) -> bool:
        """Saves the training state at ``step`` if ``step`` is a multiple of ``save_every`` (or
        ``force``). Returns whether a checkpoint was started.

        Only the adapter, the optimizer state, the RNG key, the data position and JSON
        metadata are written, and ``extra`` when given: ``{"meta": JSON-able, "adapter": a tree
        shaped like the adapter, "opt_state": one shaped like the optimizer state}`` (each part
        optional; :func:`jpeft.fit` saves its forgetting guard's kept state and report there),
        restored as :attr:`TrainState.extra`. With ``async_save`` the call returns once the arrays are copied
        to the host; the device buffers may then be donated to the next step.

        With ``keep_best``, ``metrics`` must hold ``best_metric``, which ranks the step; ``ranked=False``
        saves a state that has no value of it (``metrics`` then must not hold it): its ``metrics`` are kept
        (:meth:`metrics`) and the step is never ranked (:meth:`best_step` passes it over, ``keep_best`` does not
        keep it; ``keep_last`` rotates it as any step). :func:`jpeft.fit` saves so a stop on skipped steps
        before any finite step, whose pending skips a resumed run reads from its metrics.

        The first save takes this directory's writer lock (held until :meth:`close`): a second
        manager saving into the same directory, in this or another process, is refused. A
        step that :meth:`restore_latest` skipped as damaged is moved aside to
        ``<step>.damaged-<id>`` and saved anew.

        Raises:
          SaveError: the write failed (earlier checkpoints are intact), or another manager
            holds the writer lock.
          PathEscapeError: a step directory is a symlink.
          ConfigError: ``step`` is invalid or already saved, an argument is not JSON-able, or
            ``opt_state`` is not a state of the adapter's trainable arrays (built over the base
            model's params, ``optimizer.init(params)``, or over the adapter's frozen arrays; with
            the manager's ``optimizer``: not the structure of ``optimizer.init(jpeft.trainable(adapter))``).
        """
        if self.read_only:
            raise ConfigError(f"this CheckpointManager of {self.directory} was opened with read_only=True; "
                              "open it without read_only to save.")
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ConfigError(f"step must be a non-negative integer, found {step!r}.")
        step = int(step)
        if not force and step % self.save_every != 0:
            return False
        if not isinstance(adapter, Mapping) or not adapter:
            raise ConfigError(f"save expects the adapter dict from jpeft.init, found {type(adapter).__name__}.")
        # refused before the lock, the damaged-step move or any write
        if opt_state is not None and jax.tree.leaves(opt_state):
            self._check_opt_state(adapter, opt_state, "the optimizer state")
        if isinstance(extra, Mapping) and extra.get("opt_state") is not None and jax.tree.leaves(extra["opt_state"]):
            self._check_opt_state(adapter, extra["opt_state"], "extra['opt_state']")  # restored with the same template
        self._take_lock()
        self._refuse_symlinked_steps()
        self._drain_failed_async_save(step)
        if step in self.all_steps():
            if step not in self._damaged:
                raise ConfigError(f"step {step} is already saved in {self.directory}; checkpoints are never overwritten.")
            self._set_aside(step)
        arrays: dict[str, Any] = {}
        index: dict[str, Any] = {}
        a, i = _named_host(dict(adapter), "adapter")
        arrays["adapter"] = a
        index.update(i)
        if opt_state is not None and jax.tree.leaves(opt_state):
            o, i = _named_host(opt_state, "opt_state")
            arrays["opt_state"] = o
            index.update(i)
        rng = None
        if key is not None:
            typed = is_typed_key(key)
            data = host_array(key)
            rng = {"typed": bool(typed), "impl": str(jax.random.key_impl(key)) if typed else None}
            arrays["rng"] = data
            index["rng"] = {"shape": list(data.shape), "dtype": str(data.dtype), "sha256": sha256_hex(data)}
        extra_meta = None
        if extra is not None:
            unknown = set(extra) - {"meta", "adapter", "opt_state"} if isinstance(extra, Mapping) else set()
            if not isinstance(extra, Mapping) or unknown:
                raise ConfigError(f"extra must be a dict with keys 'meta', 'adapter', 'opt_state'; found "
                                  f"{sorted(unknown) if isinstance(extra, Mapping) else type(extra).__name__}.")
            # a copy: the caller may change its dicts while an asynchronous save still writes them
            extra_meta = {"meta": copy.deepcopy(extra.get("meta")), "parts": []}
            for part in ("adapter", "opt_state"):
                if extra.get(part) is not None and jax.tree.leaves(extra[part]):
                    x, i = _named_host(extra[part] if part == "opt_state" else dict(extra[part]), f"extra_{part}")
                    arrays[f"extra_{part}"] = x
                    index.update(i)
                    extra_meta["parts"].append(part)
        clean_metrics = None
        if metrics is not None:
            try:
                clean_metrics = {str(k): float(np.asarray(jax.device_get(v))) for k, v in dict(metrics).items()}
            except (TypeError, ValueError) as e:
                raise ConfigError(f"metrics must map names to scalars: {e}") from None
            if ranked and self.keep_best and self.best_metric not in clean_metrics:
                raise ConfigError(
                    f"metrics must include best_metric={self.best_metric!r}; found keys {sorted(clean_metrics)}. "
                    "jpeft.fit passes the training loss as {'loss': ...}: rank by best_metric='loss' there, or call "
                    "save(..., metrics={...}) from your own loop with the metric you rank by."
                )
        if not ranked and self.keep_best and clean_metrics is not None and self.best_metric in clean_metrics:
            raise ConfigError(
                f"save(..., ranked=False) is for a state without a value of best_metric={self.best_metric!r}, but its "
                f"metrics hold one ({clean_metrics[self.best_metric]!r}); leave ranked=True to rank the step by it.")
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "jpeft_version": __version__,
            "step": step,
            "config": self._config_dict,
            "base": self.fingerprint,
            "data_position": data_position,
            "rng": rng,
            "metrics": clean_metrics,
            "arrays": index,
        }
        if extra_meta is not None:
            meta["extra"] = extra_meta
        # marks of the sites the config does not say: LoRA's residual inits, and what training decided and the
        # optimizer state holds (AdaLoRA's rank_pattern: an export of this step writes the kept triplets)
        sites_config = self.config.trained_config(opt_state).saved_config(adapter)
        if sites_config != self.config:
            meta["sites_config"] = sites_config.to_dict()
        copies = head_copies(self.config, adapter)  # SEQ_CLS's classifier copy, which the config does not make
        if copies:
            meta["module_copies"] = sorted(copies)
        fns = recorded_kernel_fns(adapter)  # sites jpeft.merge refuses, which a template without the model cannot see
        if fns:
            meta["kernel_fns"] = fns
        plain = recorded_plain_sites(adapter)  # sites the config's residual init does not cover (a PEFT file's embedding)
        if plain:
            meta["plain_sites"] = plain
        if "opt_state" in arrays:
            meta["opt_state_kinds"] = optimizer_state_kinds(opt_state)
        try:
            meta = with_checksum(meta)
        except (TypeError, ValueError, RecursionError) as e:
            raise ConfigError(f"data_position must be JSON-able (an int, a dict of ints, ...), as must extra['meta']: {e}") from None
        ocp = _ocp()
        try:
            with contextlib.nullcontext() if ranked else _quiet_notes(_UNRANKED_NOTES):
                started = bool(
                    self._mngr.save(
                        step,
                        args=ocp.args.Composite(state=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)),
                        metrics=clean_metrics if (self.keep_best and ranked) else None,
                        force=True,
                    )
                )
            self._pending = step
            return started
        except Exception as e:
            self._settle()
            raise _wrap(e, f"saving step {step} into {self.directory} failed; earlier checkpoints are intact", SaveError) from e

    def _check_opt_state(self, adapter: Mapping[str, Any], opt_state, what: str) -> None:
        """Refuses, before anything is written, an optimizer state that the train step and
        :meth:`restore` would refuse later: one built over the base model's params or over the
        adapter's frozen arrays, or (when the manager has an ``optimizer``) one whose structure is
        not that of ``optimizer.init(jpeft.trainable(adapter))``, which restore rebuilds."""
        bad = _misbuilt_leaf(opt_state, adapter, self._base_keys)
        fix = ("Build it over the adapter's trainable arrays: jpeft.init_opt_state(optimizer, adapter) or "
               "optimizer.init(jpeft.trainable(adapter)).")
        if bad is not None and bad[0] == "base":
            raise ConfigError(
                f"cannot save {what}: it was built over the base model's params (its array {bad[1]} is the optimizer "
                "state of a base weight, e.g. optimizer.init(params)), not over the adapter; the train step refuses it "
                f"and a restore could not rebuild it. {fix} Nothing was written.")
        if bad is not None:
            raise ConfigError(
                f"cannot save {what}: it holds state for the adapter's frozen arrays (its array {bad[1]}), which are "
                f"never trained (optimizer.init(adapter) of an adapter with frozen arrays). {fix} Nothing was written.")
        if self.optimizer is None:
            return
        train = trainable(adapter)
        treedef = jax.tree.structure(train)
        shapes = tuple((tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(train))
        key = (treedef, shapes)
        want = self._opt_structures.get(key)
        if want is None:
            abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), train)
            want = self._opt_structures[key] = jax.tree.structure(jax.eval_shape(self.optimizer.init, abstract))
        got = jax.tree.structure(opt_state)
        if got != want:
            raise ConfigError(
                f"cannot save {what}: it is not a state of this manager's optimizer for this adapter (expected the "
                f"structure of optimizer.init(jpeft.trainable(adapter)), {want.num_leaves} arrays; found "
                f"{got.num_leaves} arrays in another structure), so restore could not rebuild it. Give the "
                "CheckpointManager the optimizer the run trains with, and build the state with "
                "jpeft.init_opt_state(optimizer, adapter). Nothing was written.")

    def _drain_failed_async_save(self, step: int) -> None:
        """A failed asynchronous save is reported by the next call into Orbax; report it as the
        failure of the step it belongs to (a warning), so that this save, after space was
        freed, is not failed by the old error."""
        if not self.async_save:
            return
        try:
            self._mngr.wait_until_finished()
        except Exception as e:  # the earlier background save's error
            self._settle()
            warnings.warn(
                f"the asynchronous save of step {self._pending} into {self.directory} failed ({type(e).__name__}: "
                f"{str(e)[:300]}); that step is not on disk, earlier checkpoints are intact. Now saving step {step}.",
                stacklevel=3,
            )

    def _set_aside(self, step: int) -> None:
        """Moves a step that restore_latest(fallback=True) found damaged to ``<step>.damaged-<id>``
        (kept for inspection, invisible to Orbax), so that training resumed from an earlier step can
        save this step again."""
        src = self._step_dir(step)
        dst = self.directory / f"{step}.damaged-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(src, dst)
        except OSError as e:
            raise SaveError(f"cannot move the damaged step {src} aside: {e}") from e
        warnings.warn(f"checkpoint step {step} was damaged; moved to {dst} and saving step {step} again.", stacklevel=3)
        self._damaged.discard(step)
        self._mngr.reload()

    # -- restore -------------------------------------------------------------------------------------
    def read_metadata(self, step: Optional[int] = None) -> dict:
        """The JSON metadata of ``step`` (latest by default), without reading any array.

        Raises:
          CheckpointError: no such step, or its metadata is corrupted.
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(f"no complete checkpoint in {self.directory}.")
        meta_file = self._step_dir(step) / "meta" / "metadata"
        try:
            d = read_json(meta_file, what=f"checkpoint metadata of step {step}")
        except LoadError as e:
            raise CheckpointError(str(e)) from None
        where = f"checkpoint step {step} in {self.directory}"
        verify_checksum(d, f"the metadata of {where}")
        if d.get("format") != FORMAT:
            raise CheckpointError(f"{where} is not a jpeft training checkpoint ('format' is {str(d.get('format'))[:60]!r}).")
        v = d.get("format_version")
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= FORMAT_VERSION:
            raise CheckpointError(f"{where}: unsupported format_version {str(v)[:60]!r} (this jpeft reads 1..{FORMAT_VERSION}).")
        if d.get("step") != step:
            raise CheckpointError(f"{where}: its metadata says step {str(d.get('step'))[:40]!r}; the files are corrupted or were moved.")
        if not isinstance(d.get("config"), dict):
            raise CheckpointError(f"{where}: 'config' is missing or not an object.")
        if d.get("sites_config") is not None and not isinstance(d["sites_config"], dict):
            raise CheckpointError(f"{where}: 'sites_config' is not an object.")
        base = d.get("base")
        if base is not None and not (isinstance(base, dict) and isinstance(base.get("params"), list)
                                     and all(isinstance(r, list) and len(r) == 3 for r in base["params"])
                                     and (base.get("config") is None or isinstance(base.get("config"), dict))):
            raise CheckpointError(f"{where}: the base fingerprint is malformed.")
        check_index(d.get("arrays"), where)
        rng = d.get("rng")
        if rng is not None and not (isinstance(rng, dict) and isinstance(rng.get("typed"), bool)):
            raise CheckpointError(f"{where}: the 'rng' entry is malformed.")
        if d.get("metrics") is not None and not isinstance(d["metrics"], dict):
            raise CheckpointError(f"{where}: 'metrics' is not an object.")
        return d

    def _step_dir(self, step: int) -> Path:
        return Path(self._mngr.directory) / str(step)

    def restore_latest(self, *, fallback: bool = False, **kwargs) -> Optional[TrainState]:
        """:meth:`restore` of the newest complete checkpoint, or ``None`` when there is none
        (so ``state = mngr.restore_latest()`` then "start fresh if None").

        Args:
          fallback: when the newest checkpoint is damaged (:class:`~jpeft.errors.CheckpointError`),
            warn and try the next older one, down to the oldest; the last error is raised if
            none restores. A wrong base, a shape mismatch or a checkpoint this process may not
            read (:class:`~jpeft.errors.CheckpointUnreadableError`) is never skipped.
          **kwargs: as for :meth:`restore`.
        """
        steps = self.all_steps()
        if not steps:
            return None
        if not fallback:
            return self.restore(steps[-1], **kwargs)
        err = None
        for s in reversed(steps):
            try:
                return self.restore(s, **kwargs)
            except CheckpointUnreadableError:  # not damaged: an older step would silently lose its steps
                raise
            except CheckpointError as e:
                err = e
                self._damaged.add(s)  # a later save of this step replaces it (set aside, not deleted)
                warnings.warn(f"skipping damaged checkpoint step {s}: {e}", stacklevel=2)
        raise err

    def restore_best(self, **kwargs) -> Optional[TrainState]:
        """:meth:`restore` of :meth:`best_step`, or ``None``."""
        s = self.best_step()
        return None if s is None else self.restore(s, **kwargs)

    def restore(
        self,
        step: Optional[int] = None,
        *,
        adapter=None,
        opt_state=None,
        shardings: Union[None, jax.sharding.Sharding, Callable[[str, tuple], jax.sharding.Sharding]] = None,
        allow_base_mismatch: Optional[bool] = None,
    ) -> TrainState:
        """Restores ``step`` (latest by default) onto this manager's base.

        Args:
          step: the step; ``None`` for the latest.
          adapter: optional template (arrays or ``jax.ShapeDtypeStruct``) of the adapter;
            built from the config with :func:`jpeft.init` under ``jax.eval_shape`` otherwise.
            The shardings of its leaves are used as target shardings.
          opt_state: optional template of the optimizer state; ``optimizer.init`` of the
            adapter template's trainable arrays otherwise (when the manager has an ``optimizer``).
          shardings: target shardings for every restored array: one
            :class:`jax.sharding.Sharding`, or ``fn(name, shape) -> Sharding`` with names like
            ``"adapter/model/q_proj/lora_A"``. Overrides the templates' shardings. By default
            arrays land on the first local device. Saved and restored device layouts need not
            match: Orbax reads each target shard's slice.
          allow_base_mismatch: restore even though the base fingerprint differs (warns).

        Raises:
          BaseMismatchError: the checkpoint was saved for another base (says what differs).
          CheckpointError: the checkpoint is missing, corrupted or truncated.
          CheckpointUnreadableError: this process may not read one of its files or folders
            (permissions; names it): not a damaged checkpoint.
          ShapeMismatchError: the saved arrays do not fit the templates.
          ConfigError: the checkpoint was saved with a different method config.
        """
        try:
            return self._restore(step, adapter, opt_state, shardings, allow_base_mismatch)
        except (CheckpointError, DistributedError):
            self._refuse_unreadable(step)
            raise
        except JpeftError:
            raise
        except Exception as e:  # whatever a damaged file makes Orbax, tensorstore or json raise
            self._refuse_unreadable(step)
            raise CheckpointError(
                f"checkpoint step {step if step is not None else 'latest'} in {self.directory} could not be restored: "
                f"{type(e).__name__}: {str(e)[:300]}. Its files are damaged; restore an earlier step."
            ) from None

    def _refuse_unreadable(self, step: Optional[int]) -> None:
        """After a failed restore of ``step`` (``None``: the latest): raises
        :class:`~jpeft.errors.CheckpointUnreadableError` when this process may not read one of
        the step's files or folders (Orbax and tensorstore report that as a missing or unreadable
        array, which reads as damage, and the remedy for damage, setting the step aside, loses an
        intact checkpoint)."""
        try:
            step = self.latest_step() if step is None else step
        except OSError:
            return
        if step is None:
            return
        folder = self._step_dir(step)
        denied = _first_unreadable(folder)
        if denied is None:
            return
        raise _unreadable_error(f"checkpoint step {step} in {self.directory}", denied, folder) from None

    def _restore(self, step, adapter, opt_state, shardings, allow_base_mismatch) -> TrainState:
        step, meta = self._step_meta(step, allow_base_mismatch)
        where = f"checkpoint step {step} in {self.directory}"
        index = meta["arrays"]
        adapter, opt_state = self._templates(meta, adapter, opt_state, where)
        extra_meta = meta.get("extra")
        extra_parts = extra_meta.get("parts", []) if isinstance(extra_meta, dict) else []
        groups = {"adapter": adapter}
        if opt_state is not None:
            groups["opt_state"] = opt_state
        if "adapter" in extra_parts:
            groups["extra_adapter"] = adapter
        if "opt_state" in extra_parts and opt_state is not None:
            groups["extra_opt_state"] = opt_state
        expected = _fitted_template_leaves(groups, index, where)
        flat = self._read_arrays(step, _abstract_target(index, expected, shardings), index, where)

        def rebuild_or_flat(g, template):  # without a template: {key path: array}, as saved
            if template is not None:
                return _rebuild(flat, g, template)
            return {k[len(g) + 1:]: v for k, v in flat.items() if k.startswith(g + "/")} or None

        extra = None
        if isinstance(extra_meta, dict):
            extra = {"meta": extra_meta.get("meta")}
            if "adapter" in extra_parts:
                extra["adapter"] = _rebuild(flat, "extra_adapter", adapter)
            if "opt_state" in extra_parts:
                extra["opt_state"] = rebuild_or_flat("extra_opt_state", opt_state)
        return TrainState(step, _rebuild(flat, "adapter", adapter), rebuild_or_flat("opt_state", opt_state),
                          _restored_key(meta, flat, where), meta.get("data_position"), meta.get("metrics"), meta, extra)

    def _step_meta(self, step, allow_base_mismatch) -> tuple[int, dict]:
        """``(step, metadata)`` of the step to restore (the latest for ``None``), after refusing a
        missing step, another base and another method config."""
        allow = self.allow_base_mismatch if allow_base_mismatch is None else allow_base_mismatch
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(f"no complete checkpoint in {self.directory}; nothing to restore.")
        if step not in self.all_steps():
            raise CheckpointError(f"step {step} has no complete checkpoint in {self.directory}; available: {self.all_steps()}.")
        meta = self.read_metadata(step)
        where = f"checkpoint step {step} in {self.directory}"
        check_base(meta.get("base"), self.params, self.base_config, allow_base_mismatch=allow, what="checkpoint")
        if meta["config"] != self._config_dict:
            saved, now = meta["config"], self._config_dict
            k = next(k for k in ["peft_type", *sorted(set(saved) | set(now))] if saved.get(k) != now.get(k))
            raise ConfigError(
                f"{where} was saved with a different method config: {k!r} is {saved.get(k)!r} there, {now.get(k)!r} here. "
                "Create the CheckpointManager with the config the run was started with."
            )
        return step, meta

    def _templates(self, meta: dict, adapter, opt_state, where: str) -> tuple:
        """``(adapter, opt_state)`` templates: the caller's, else built from the saved config and
        this manager's optimizer (``opt_state`` stays ``None`` without one); refuses an optimizer
        state whose parts are another optimizer's."""
        if adapter is None:
            # the sites as saved: a config that also records their marks (AdapterConfig.saved_config), else the manager's
            sites = meta.get("sites_config")
            config = AdapterConfig.from_dict(sites) if isinstance(sites, dict) else self.config
            try:
                adapter = template_adapter(config, self.params, self.model, *self.example_args)
            except LayoutError as e:
                if self.model is not None:
                    raise
                # its fix names jpeft.init, which a user restoring a checkpoint does not call
                raise LayoutError(f"{e} To restore a checkpoint, give them to the manager: CheckpointManager(directory, "
                                  "config, params, model=model, example_args=(x,)), or pass restore(adapter=...) a "
                                  "template adapter.") from None
            copies = module_copies(meta, where)
            if copies:
                adapter = with_head_copies(adapter, unwrap_params(self.params)[0], copies, where)
            if self.model is None:
                adapter = with_kernel_fns(adapter, kernel_fns(meta, where))
            adapter = with_plain_sites(adapter, plain_sites(meta, where), where)
        if opt_state is None and self.optimizer is not None:
            abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), adapter)
            built = jax.eval_shape(self.optimizer.init, trainable(abstract))  # no state for frozen arrays
            # a state without arrays (optax.sgd's EmptyStates) is never written: it is the optimizer's own
            if any(k.startswith("opt_state/") for k in meta["arrays"]) or not jax.tree.leaves(built):
                opt_state = built
        if opt_state is not None:
            kinds = meta.get("opt_state_kinds")
            if isinstance(kinds, list) and kinds != optimizer_state_kinds(opt_state):
                raise CheckpointError(
                    f"{where} holds the optimizer state of another optimizer: its parts are {kinds}, this optimizer's "
                    f"are {optimizer_state_kinds(opt_state)}. Restoring it would hand one update rule's moments to "
                    "another (Adam's second moment is not AdaBelief's). Create the CheckpointManager with the "
                    "optimizer the run was trained with, or restore the adapter alone (restore(..., opt_state=None) "
                    "on a manager made without an optimizer).")
        return adapter, opt_state

    def _read_arrays(self, step: int, abstract: dict, index: dict, where: str) -> dict:
        """``{saved name: array}`` read by Orbax into ``abstract``, each checked against the
        metadata index (names, shapes, dtypes, SHA-256 where recorded)."""
        ocp = _ocp()
        try:
            with _quiet_aborted_reads(self._step_dir(step)):
                restored = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
            state = restored["state"]
        except Exception as e:
            if lost_peer(e):  # every process reads its shards together: not a damaged checkpoint, which must be kept
                raise DistributedError(
                    f"reading {where} takes every process of this job, and another process left the job while it was "
                    f"read ({' '.join(str(e).split())[:200]}); nothing says the checkpoint is damaged: keep it. See the "
                    "other processes' output, fix the cause there and start every process again with --resume.") from None
            raise _wrap(e, f"{where} is corrupted or truncated (Orbax could not read it)") from None
        flat: dict[str, Any] = {}
        try:
            for g, v in state.items():
                if g == "rng":
                    flat["rng"] = v
                else:
                    for name, arr in v.items():
                        flat[f"{g}/{name}" if name else g] = arr
        except AttributeError:
            raise CheckpointError(f"{where} is corrupted: its array tree has an unexpected structure.") from None
        if set(flat) != set(index):
            raise CheckpointError(f"{where} is corrupted: its arrays do not match its metadata index.")
        for name, arr in flat.items():
            e = index[name]
            if tuple(arr.shape) != tuple(e["shape"]) or str(np.dtype(arr.dtype)) != e["dtype"]:
                raise CheckpointError(f"{where} is corrupted: {name!r} restored as {arr.dtype}{tuple(arr.shape)}, expected {e['dtype']}{e['shape']}.")
        # each array's whole value, an array split across processes gathered on every process (a collective: every
        # process restores, in the same order, and so reaches the same verdict)
        hashed = sorted(n for n in flat if index[n].get("sha256"))
        for name, whole in zip(hashed, gather([flat[n] for n in hashed])):
            if sha256_hex(whole) != index[name]["sha256"]:
                raise CheckpointError(f"{where} is corrupted: the bytes of {name!r} do not match their SHA-256 in the metadata.")
        return flat


def _unreadable_error(what: str, denied: Path, folder: Path) -> CheckpointUnreadableError:
    """The error for ``what`` (checkpoints or one step), which this process may not read:
    ``denied``, the first file or folder under ``folder`` it may not open or list."""
    try:
        st = os.lstat(denied)
        whose = f"mode {stat.filemode(st.st_mode)}, owner uid {st.st_uid}; "
    except OSError:  # a file in a folder this process may not enter
        whose = ""
    return CheckpointUnreadableError(
        f"{what} cannot be read by this process: permission denied on {denied} ({whose}this process runs as uid "
        f"{os.geteuid()}). Nothing says the checkpoint is damaged: keep it. Give this process read access to every "
        f"file and folder under {folder} (e.g. `chmod -R a+rX {folder}`, or run as the user that wrote it) and run "
        "again.")


def _first_unreadable(folder: Path) -> Optional[Path]:
    """The first file or folder under ``folder`` that this process may not open or list
    (``PermissionError``), else ``None``."""
    todo = [Path(folder)]
    while todo:
        d = todo.pop()
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except PermissionError:
            return d
        except OSError:
            continue
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=False):
                    todo.append(Path(e.path))
                elif e.is_file():
                    with open(e.path, "rb"):
                        pass
            except PermissionError:
                return Path(e.path)
            except OSError:
                continue
    return None


def _fitted_template_leaves(groups: Mapping[str, Any], index: Mapping[str, dict], where: str) -> dict:
    """``{saved name: template leaf}`` of every group's template (``"adapter/<path>/<field>"``),
    after checking that the saved arrays are exactly these, with these shapes."""
    expected: dict[str, Any] = {}
    for g, tree in groups.items():
        for name, leaf in leaf_names(tree):
            expected[f"{g}/{name}" if name else g] = leaf
    saved_names = [k for k in index if k != "rng"]
    for g in groups:
        want = [k for k in expected if k == g or k.startswith(g + "/")]
        have = [k for k in saved_names if k == g or k.startswith(g + "/")]
        if set(want) != set(have):
            miss = sorted(set(want) - set(have))
            extra = sorted(set(have) - set(want))
            raise ShapeMismatchError(
                f"{where}: the saved {g} does not fit the template"
                + (f"; the template has {miss[0]!r} that was not saved ({len(miss)} in all)" if miss else "")
                + (f"; the checkpoint has {extra[0]!r} that the template lacks ({len(extra)} in all)" if extra else "")
                + ". Restore with the config, model and optimizer the run was saved with."
            )
        for k in want:
            e = index[k]
            if tuple(e["shape"]) != tuple(expected[k].shape):
                raise ShapeMismatchError(
                    f"{where}: {k!r} was saved with shape {tuple(e['shape'])}, the template has {tuple(expected[k].shape)}."
                )
    return expected


def _abstract_target(index: Mapping[str, dict], expected: Mapping[str, Any], shardings) -> dict:
    """Orbax's restore target: a ``jax.ShapeDtypeStruct`` per saved array, grouped as saved,
    placed by ``shardings`` (see :meth:`CheckpointManager.restore`), else by its template leaf's
    sharding, else on the first local device."""
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def target_sharding(name, shape):
        if shardings is not None:
            return shardings(name, shape) if callable(shardings) and not isinstance(shardings, jax.sharding.Sharding) else shardings
        leaf = expected.get(name)
        s = getattr(leaf, "sharding", None) if leaf is not None else None
        return s if isinstance(s, jax.sharding.Sharding) else default

    abstract: dict[str, Any] = {}
    for full, e in index.items():
        shape = tuple(e["shape"])
        sds = jax.ShapeDtypeStruct(shape, np_dtype(e["dtype"]), sharding=target_sharding(full, shape))
        g, _, rest = full.partition("/")
        if g == "rng":
            abstract["rng"] = sds
        else:
            abstract.setdefault(g, {})[rest] = sds
    return abstract


def _rebuild(flat: Mapping[str, Any], g: str, template):
    """The group ``g`` of the restored arrays in ``template``'s structure."""
    leaves = [flat[f"{g}/{n}" if n else g] for n, _ in leaf_names(template)]
    return jax.tree.unflatten(jax.tree.structure(template), leaves)


def _restored_key(meta: dict, flat: Mapping[str, Any], where: str):
    """The saved RNG key (typed again when it was saved typed), or ``None``."""
    rng = meta.get("rng")
    if rng is None or "rng" not in flat:
        return None
    key = flat["rng"]
    if rng["typed"]:
        try:
            key = jax.random.wrap_key_data(key, impl=rng.get("impl") or None)
        except Exception as e:
            raise CheckpointError(f"{where}: cannot rebuild the RNG key ({e}).") from None
    return key


__all__ = ["CheckpointManager", "TrainState", "is_step_folder"]
