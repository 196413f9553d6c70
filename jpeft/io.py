"""Finished adapters on disk (the format), with the base-model fingerprint and the safe reading and
writing they use, which this module re-exports from the modules that implement them
(:mod:`jpeft._fingerprint`, :mod:`jpeft._files`, :mod:`jpeft._checksum`, :mod:`jpeft._safe_read`,
:mod:`jpeft._safetensors`): ``jpeft.io.<name>`` is their public name.

A finished adapter is a directory holding two files and nothing that can execute code:

* ``jpeft_adapter.json``: the format version, the jpeft version, the method config
  (``config.to_dict()``), the fingerprint of the base model the adapter was trained on, and an
  index of the arrays (``shape``, ``dtype``, ``sha256`` of the bytes);
* ``jpeft_adapter.safetensors``: the adapter arrays, keyed ``"<module path>/<field>"``
  (``"model/layers_0/self_attn/q_proj/lora_A"``).

Loading never unpickles: the JSON is parsed with :mod:`json`, the arrays with
:mod:`safetensors` after the header has been checked, and a pickle, zip (``torch.save``) or
``.npy`` file offered as an adapter is refused with :class:`~jpeft.errors.UnsafeFileError`.
Nodes are not stored: :func:`load_adapter` rebuilds them by calling :func:`jpeft.init` with
the stored config (under :func:`jax.eval_shape`, so nothing is computed) and fills the
arrays in, so each method's node type stays the one source of truth for its structure.

Writing goes to a temporary sibling directory that is renamed into place only once every
file is written and flushed: a save that fails part-way (disk full, permission denied)
raises :class:`~jpeft.errors.SaveError` and leaves the previous files untouched. Paths can be
confined to a root directory (``root=``); ``..``, absolute names and symlinks that would
lead outside it raise :class:`~jpeft.errors.PathEscapeError`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional

import jax
import numpy as np

from jpeft._version import __version__
# Re-exported: jpeft.io is the public home of these names (``jpeft.io.atomic_write`` ...); each
# concern is implemented in its own module below the adapter format.
from jpeft._checksum import sha256_hex, verify_checksum, with_checksum
from jpeft._files import atomic_directory, atomic_write, check_folder, recover, resolve_target, safe_join, write_file  # noqa: F401
from jpeft._fingerprint import (  # noqa: F401
    base_fingerprint, base_mismatch_message, check_base, content_hash, fingerprint_difference,
)
from jpeft._safe_read import MAX_JSON_BYTES, open_regular, read_bounded, read_json, refuse_unsafe, sniff_unsafe  # noqa: F401
from jpeft._safetensors import (  # noqa: F401
    MAX_HEADER_BYTES, check_expected, np_dtype, read_safetensors, safetensors_index, safetensors_layout,
)
from jpeft.config import AdapterConfig
from jpeft.core import init
from jpeft.errors import (
    CheckpointError,
    ConfigError,
    JpeftError,
    LayoutError,
    LoadError,
    OverwriteError,
    ShapeMismatchError,
)
from jpeft.methods._common import head_copies, with_head_copies
from jpeft.methods.base import (FOREIGN_SITE_FIX, foreign_site, recorded_kernel_fns, recorded_plain_sites,
                               with_kernel_fns, with_plain_sites)
from jpeft.tree import host_array, is_typed_key, leaf_names, unwrap_params

ADAPTER_JSON = "jpeft_adapter.json"
ADAPTER_WEIGHTS = "jpeft_adapter.safetensors"
FORMAT = "jpeft-adapter"
FORMAT_VERSION = 1


def check_index(index, where: str) -> dict:
    """The ``arrays`` index of a saved adapter's or checkpoint's metadata, checked entry by entry.

    Raises:
      CheckpointError: an entry is not ``{shape, dtype, sha256}`` or names an unknown dtype.
    """
    if not isinstance(index, dict):
        raise CheckpointError(f"{where}: 'arrays' must be an object mapping names to {{shape, dtype, sha256}}.")
    out = {}
    for name, e in index.items():
        if not (isinstance(e, dict) and isinstance(e.get("shape"), list) and isinstance(e.get("dtype"), str)
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in e["shape"])
                and (e.get("sha256") is None or isinstance(e.get("sha256"), str))):
            raise CheckpointError(f"{where}: the index entry for {name!r} is malformed: {str(e)[:200]}.")
        try:
            np.dtype(np_dtype(e["dtype"]))
        except TypeError:
            raise CheckpointError(f"{where}: the index entry for {name!r} has an unknown dtype {e['dtype']!r}.") from None
        out[name] = e
    return out


# --------------------------------------------------------------------------------------------
# finished adapters
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    """What :func:`read_adapter_info` returns: everything about a saved adapter but its arrays.

    Attributes:
      path: the adapter directory.
      config: the method config (an :class:`~jpeft.AdapterConfig` subclass).
      base: the base-model fingerprint (``{"config", "params", "num_params", "content_hash"}``)
        or ``None`` when the adapter was saved without ``params``.
      arrays: ``{name: (shape, dtype)}``.
      num_params: number of adapter parameters.
      nbytes: bytes of the adapter arrays.
      jpeft_version: the jpeft version that wrote it.
      metadata: the user's own ``metadata`` dict given to :func:`save_adapter`.
      module_copies: paths of the module copies the adapter holds beside its method's sites
        (SEQ_CLS's classifier copy of a method without ``modules_to_save``, read from a PEFT file).
      kernel_fns: ``{path: function}`` of the sites on modules that compute with their own
        function of the kernel (:attr:`jpeft.methods.base.Layout.kernel_fn`), which
        :func:`jpeft.merge` refuses.
      plain_sites: paths of the sites relative to the original weights in an adapter whose other
        sites are relative to a residual base (:func:`jpeft.methods.base.recorded_plain_sites`: a
        PEFT PiSSA/OLoRA file's embedding).
    """

    path: Path
    config: AdapterConfig
    base: Optional[dict]
    arrays: dict
    num_params: int
    nbytes: int
    jpeft_version: str
    metadata: dict
    module_copies: tuple = ()
    kernel_fns: dict = dataclasses.field(default_factory=dict)
    plain_sites: tuple = ()


def _resolve_adapter_dir(path) -> Path:
    p = Path(path)
    try:
        recover(p)  # a save killed between its two renames (systems without an atomic exchange)
    except OSError as e:
        raise LoadError(f"cannot finish an interrupted save of {p}: {e}") from None
    if p.is_file():
        if p.name in (ADAPTER_JSON, ADAPTER_WEIGHTS):
            return p.parent
        refuse_unsafe(p)
        raise LoadError(
            f"{p} is a file; jpeft.load_adapter expects the adapter directory written by jpeft.save_adapter "
            f"(holding {ADAPTER_JSON} and {ADAPTER_WEIGHTS})."
        )
    if not p.exists():
        raise LoadError(f"adapter directory {p} does not exist.")
    if not (p / ADAPTER_JSON).exists():
        for f in sorted(p.iterdir()) if p.is_dir() else []:
            if f.is_file() and sniff_unsafe(f) is not None:
                refuse_unsafe(f)
        if (p / "adapter_config.json").exists():
            raise LoadError(
                f"{p} holds a Hugging Face PEFT adapter (adapter_config.json), not a jpeft adapter; "
                "load it with jpeft.hf.load_peft."
            )
        raise LoadError(f"{p} is not a jpeft adapter directory: {ADAPTER_JSON} is missing.")
    return p


def _parse_info(p: Path) -> tuple[AdapterInfo, dict]:
    d = read_json(p / ADAPTER_JSON, what="adapter metadata")
    where = str(p / ADAPTER_JSON)
    verify_checksum(d, where)
    if d.get("format") != FORMAT:
        raise CheckpointError(f"{where} is not jpeft adapter metadata: 'format' is {str(d.get('format'))[:80]!r}, expected {FORMAT!r}.")
    v = d.get("format_version")
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise CheckpointError(f"{where}: 'format_version' must be a positive integer, found {str(v)[:80]!r}.")
    if v > FORMAT_VERSION:
        raise LoadError(f"{where} has format_version {v}; this jpeft reads up to {FORMAT_VERSION}. Upgrade jpeft.")
    cfg = d.get("config")
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{where}: 'config' must be an object, found {type(cfg).__name__}.")
    try:
        config = AdapterConfig.from_dict(cfg)
    except JpeftError:
        raise
    except Exception as e:  # a config class rejecting a malformed value
        raise CheckpointError(f"{where}: the stored config is invalid ({type(e).__name__}: {e}).") from None
    base = d.get("base")
    if base is not None:
        if not (isinstance(base, dict) and isinstance(base.get("params"), list)
                and all(isinstance(r, list) and len(r) == 3 and isinstance(r[0], str) and isinstance(r[1], list)
                        and isinstance(r[2], str) for r in base["params"])
                and (base.get("config") is None or isinstance(base.get("config"), dict))):
            raise CheckpointError(f"{where}: the base fingerprint is malformed.")
    index = check_index(d.get("arrays"), where)
    meta = d.get("metadata") or {}
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: 'metadata' must be an object.")
    arrays = {k: (tuple(e["shape"]), e["dtype"]) for k, e in index.items()}
    num = sum(math.prod(s) for s, _ in arrays.values())
    nbytes = sum(math.prod(s) * np.dtype(np_dtype(dt)).itemsize for s, dt in arrays.values())
    copies = module_copies(d, where)
    info = AdapterInfo(p, config, base, arrays, int(num), int(nbytes), str(d.get("jpeft_version", "?")), meta, copies,
                       kernel_fns(d, where), plain_sites(d, where))
    return info, index


def module_copies(meta: Mapping[str, Any], where: str) -> tuple:
    """The ``module_copies`` a writer recorded in ``meta`` (:func:`jpeft.methods._common.head_copies`), checked."""
    copies = meta.get("module_copies", [])
    if not isinstance(copies, list) or not all(isinstance(c, str) for c in copies):
        raise CheckpointError(f"{where}: 'module_copies' must be a list of module paths, found {str(copies)[:80]!r}.")
    return tuple(copies)


def plain_sites(meta: Mapping[str, Any], where: str) -> tuple:
    """The ``plain_sites`` a writer recorded in ``meta`` (:func:`jpeft.methods.base.recorded_plain_sites`), checked."""
    paths = meta.get("plain_sites", [])
    if not isinstance(paths, list) or not all(isinstance(c, str) for c in paths):
        raise CheckpointError(f"{where}: 'plain_sites' must be a list of module paths, found {str(paths)[:80]!r}.")
    return tuple(paths)


def kernel_fns(meta: Mapping[str, Any], where: str) -> dict:
    """The ``kernel_fns`` a writer recorded in ``meta`` (:func:`jpeft.methods.base.recorded_kernel_fns`), checked."""
    fns = meta.get("kernel_fns", {})
    if not isinstance(fns, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in fns.items()):
        raise CheckpointError(f"{where}: 'kernel_fns' must map module paths to function names, found {str(fns)[:80]!r}.")
    return dict(fns)


def read_adapter_info(path) -> AdapterInfo:
    """Reads a saved adapter's metadata (config, base fingerprint, array shapes) without
    loading its arrays.

    Raises:
      LoadError: the directory or its metadata is missing; CheckpointError: it is malformed;
      UnsafeFileError: a pickle-based file was offered.
    """
    try:
        return _parse_info(_resolve_adapter_dir(path))[0]
    except JpeftError:
        raise
    except Exception as e:  # a damaged file must end in a named error, whatever tripped on it
        raise CheckpointError(f"adapter at {path} is damaged: {type(e).__name__}: {str(e)[:300]}") from None


def save_adapter(
    path,
    config: AdapterConfig,
    adapter: Mapping[str, Any],
    *,
    params=None,
    base_config=None,
    with_content_hash: bool = False,
    metadata: Optional[Mapping[str, Any]] = None,
    overwrite: bool = False,
    root=None,
    gather=None,
) -> Optional[Path]:
    """Saves a finished adapter as ``path/jpeft_adapter.json`` + ``path/jpeft_adapter.safetensors``.

    Only the adapter's arrays are written, never a base weight. The write is atomic: the files
    go to a temporary sibling directory that replaces ``path`` in one rename. The arrays are
    read to the host and written one at a time, so the host never holds the whole adapter (or,
    for full fine-tuning, the whole model) beyond the arrays the caller already has there.

    Args:
      path: the adapter directory to create (relative to ``root`` when ``root`` is given).
      config: the method config the adapter was made with.
      adapter: the adapter dict from :func:`jpeft.init` (after training).
      params: the base model's params (arrays or ``jax.ShapeDtypeStruct``); strongly
        recommended: their fingerprint lets :func:`load_adapter` refuse a wrong base.
      base_config: the base model's config (dict, dataclass or transformers config), added
        to the fingerprint.
      with_content_hash: also hash the base weights' bytes (needs concrete params).
      metadata: a JSON-able dict of your own (task name, metrics, ...).
      overwrite: replace an existing ``path`` that holds an earlier adapter (or is an empty
        folder); a file or a folder of anything else is refused (:class:`OverwriteError`).
      root: confine ``path`` to this directory (``..``, absolute paths and symlinks refused).
      gather: for an adapter whose arrays are split across the processes of a job
        (:func:`jpeft.distributed.gather_array`): every process calls ``save_adapter`` with the
        same arguments, each array is gathered in turn (a collective, in the same order on every
        process) and written by process 0 before the next is gathered, so no process holds more
        than one whole array at a time. A write that fails on process 0 still takes part in
        the remaining gathers before raising there.

    Returns:
      The directory written (``None`` on the processes other than 0 when ``gather`` is given).

    Raises:
      ConfigError: ``adapter`` holds nodes the config's method does not make (e.g. a merged
        LoRA adapter of VeRA inputs with their ``VeraConfig``), which :func:`load_adapter`
        could not rebuild.
      OverwriteError: ``path`` exists and ``overwrite`` is false, or it is not an adapter.
      PathEscapeError: ``path`` would leave ``root``, or is a symlink.
      SaveError: the write failed; nothing at ``path`` changed.

    >>> import jax, jax.numpy as jnp, flax.linen as nn, jpeft, tempfile, os
    >>> model = nn.Dense(4); params = model.init(jax.random.key(0), jnp.ones((1, 3)))
    >>> cfg = jpeft.LoraConfig(r=2, target_modules=".*")
    >>> adapter = jpeft.init(cfg, params, jax.random.key(1))
    >>> d = jpeft.save_adapter(os.path.join(tempfile.mkdtemp(), "a"), cfg, adapter, params=params)
    >>> cfg2, adapter2 = jpeft.load_adapter(d, params)
    >>> cfg2 == cfg, bool(jnp.array_equal(adapter2[""].lora_A, adapter[""].lora_A))
    (True, True)
    >>> jpeft.read_adapter_info(d).arrays
    {'lora_A': ((3, 2), 'float32'), 'lora_B': ((2, 4), 'float32')}
    """
    if not isinstance(config, AdapterConfig):
        raise ConfigError(f"save_adapter expects a method config such as jpeft.LoraConfig, found {type(config).__name__}.")
    if not isinstance(adapter, Mapping) or not adapter:
        raise ConfigError(f"save_adapter expects the adapter dict {{module_path: node}} from jpeft.init, found {type(adapter).__name__}.")
    # SEQ_CLS's classifier copy beside a method without modules_to_save (from jpeft.hf.load_peft): recorded by path
    copies = head_copies(config, adapter)
    foreign = foreign_site(config, {p: n for p, n in adapter.items() if p not in copies})  # load_adapter: jpeft.init(config)
    if foreign is not None:
        raise ConfigError(f"save_adapter: {foreign}, which load_adapter could not rebuild. {FOREIGN_SITE_FIX}")
    # the config load_adapter rebuilds these sites from (LoRA: init set to the sites' residual base)
    config = config.saved_config(adapter)
    named = dict(leaf_names(dict(adapter)))
    specs = {}
    for name, leaf in named.items():
        if isinstance(leaf, jax.ShapeDtypeStruct):
            raise ConfigError(f"adapter leaf {name!r} is abstract (jax.ShapeDtypeStruct); save a concrete adapter.")
        if isinstance(leaf, jax.Array):
            s = jax.eval_shape(jax.random.key_data, leaf) if is_typed_key(leaf) else leaf  # host_array's value
        else:
            s = named[name] = host_array(leaf)
        specs[name] = (tuple(s.shape), np.dtype(s.dtype))
    # the index in the adapter's order; each sha256 is filled in as its array is written
    index = {name: {"shape": list(shape), "dtype": str(dt), "sha256": None} for name, (shape, dt) in specs.items()}
    header, order = safetensors_layout(specs, {"format": "jpeft"})
    # every process reads the arrays in the file's order (with ``gather``, a collective each); process 0 writes
    arrays = ((name, (host_array if gather is None else gather)(named[name])) for name in order)
    if gather is not None and jax.process_index() != 0:
        for _ in arrays:
            pass
        return None
    try:
        return _write_adapter(path, root, overwrite, config, adapter, copies, params, base_config, with_content_hash,
                              metadata, index, header, arrays)
    finally:
        if gather is not None:
            for _ in arrays:  # after a failed write: the gathers the other processes wait in (none if one failed)
                pass


def _write_adapter(path, root, overwrite, config, adapter, copies, params, base_config, with_content_hash, metadata,
                   index, header, arrays) -> Path:
    """:func:`save_adapter`'s writing, on the one process that writes: ``arrays`` yields
    ``(name, host array)`` in the file's order, each hashed and written as it comes."""
    target = resolve_target(path, root)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "jpeft_version": __version__,
        "config": config.to_dict(),
        "base": base_fingerprint(params, base_config, with_content_hash=with_content_hash) if params is not None else None,
        "arrays": index,
        "metadata": dict(metadata or {}),
    }
    if copies:
        meta["module_copies"] = sorted(copies)
    fns = recorded_kernel_fns(adapter)  # sites jpeft.merge refuses: a load without the model cannot see them
    if fns:
        meta["kernel_fns"] = fns
    plain = recorded_plain_sites(adapter)  # sites the config's residual init does not cover (a PEFT file's embedding)
    if plain:
        meta["plain_sites"] = plain
    try:
        # not sort_keys: rank_pattern / alpha_pattern take the first matching key, so their order is meaning
        # (the checksum is computed over the canonical, sorted form)
        json.dumps(with_checksum(meta), indent=1)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"metadata must be JSON-able: {e}") from None
    if overwrite:
        _check_replaceable(target)

    def chunks():
        yield header
        for name, a in arrays:
            a = np.ascontiguousarray(a)
            index[name]["sha256"] = sha256_hex(a)
            yield a.reshape(-1).view(np.uint8)
            del a  # before the next array is read: one array at a time on the host

    with atomic_directory(target, overwrite=overwrite) as tmp:
        write_file(tmp / ADAPTER_WEIGHTS, chunks())
        write_file(tmp / ADAPTER_JSON, json.dumps(with_checksum(meta), indent=1).encode("utf-8"))
    return target


def _check_replaceable(target: Path) -> None:
    """``overwrite=True`` replaces an earlier adapter (or an empty folder), never a file or a
    folder holding something else: a path given by mistake (a data file, a project folder)
    would be lost with everything in it."""
    if not (target.exists() or target.is_symlink()):
        return
    if not target.is_dir():
        raise OverwriteError(f"{target} is a file, not an adapter folder; overwrite=True replaces an earlier adapter "
                             "only. Choose another path, or remove the file yourself.")
    # hidden entries count too (a project's .git, a .env): only the Finder's .DS_Store is nobody's work
    names = sorted(n for n in os.listdir(target) if n != ".DS_Store")
    if names and ADAPTER_JSON not in names:
        raise OverwriteError(f"{target} holds files that are not a jpeft adapter ({names[0]!r}, {len(names)} in all); "
                             "overwrite=True replaces an earlier adapter only. Choose another path, or empty it yourself.")


def template_adapter(config: AdapterConfig, params, model=None, *model_args, **model_kwargs):
    """The adapter :func:`jpeft.init` would create for ``params``, as ``jax.ShapeDtypeStruct``
    leaves (nothing is computed): the structure loaders fill with saved arrays."""
    def make(p):
        return init(config, p, jax.random.key(0), model, *model_args, **model_kwargs)

    return jax.eval_shape(make, params)


def fill_template(template, arrays: Mapping[str, Any], *, where: str, exact_dtype: bool = False):
    """Puts ``arrays`` (named as :func:`leaf_names` names them) into ``template``'s structure.

    Raises:
      ShapeMismatchError: a name is missing or extra, or a shape differs.
    """
    named = leaf_names(template)
    want = {n for n, _ in named}
    missing = [n for n, _ in named if n not in arrays]
    extra = [n for n in arrays if n not in want]
    if missing or extra:
        raise ShapeMismatchError(
            f"{where} does not fit this base: "
            + (f"it lacks {missing[0]!r} ({len(missing)} missing)" if missing else "")
            + ("; " if missing and extra else "")
            + (f"it has {extra[0]!r} that the config does not create here ({len(extra)} extra)" if extra else "")
            + ". Was it saved for another model, or with a different model tracing (model, *example_args)?"
        )
    leaves = []
    for name, t in named:
        a = arrays[name]
        if tuple(a.shape) != tuple(t.shape):
            raise ShapeMismatchError(
                f"{where}: array {name!r} has shape {tuple(a.shape)}, but the config creates {tuple(t.shape)} on this base. "
                "Load it onto the base it was trained on."
            )
        tdt, adt = np.dtype(t.dtype), np.dtype(a.dtype)
        if tdt != adt and (exact_dtype or not (jax.dtypes.issubdtype(tdt, np.inexact) and jax.dtypes.issubdtype(adt, np.inexact))):
            raise ShapeMismatchError(f"{where}: array {name!r} has dtype {adt}, expected {tdt}.")
        leaves.append(a)
    treedef = jax.tree.structure(template)
    return jax.tree.unflatten(treedef, leaves)


def load_adapter(path, params, model=None, *model_args, base_config=None, allow_base_mismatch: bool = False,
                 **model_kwargs) -> tuple[AdapterConfig, dict]:
    """Loads an adapter saved by :func:`save_adapter`: ``config, adapter = load_adapter(path, params)``.

    The nodes are rebuilt by :func:`jpeft.init` with the stored config on ``params`` (under
    :func:`jax.eval_shape`), and the saved arrays, checked against their stored SHA-256, are
    filled in. Give ``model, *example_args`` when the adapter was created with them.

    Args:
      path: the adapter directory (or one of its two files).
      params: the base model's params (arrays or ``jax.ShapeDtypeStruct``).
      model, *model_args, **model_kwargs: as for :func:`jpeft.init`.
      base_config: the base model's config, compared with the stored fingerprint's.
      allow_base_mismatch: load onto a base whose fingerprint differs (a warning instead of
        :class:`~jpeft.errors.BaseMismatchError`); shapes must still fit.

    Raises:
      UnsafeFileError: a pickle-based file was offered.
      BaseMismatchError: the adapter was saved for another base (says what differs).
      CheckpointError: a file is corrupted or truncated.
      ShapeMismatchError: the arrays do not fit the nodes the config creates on ``params``.
      LoadError: files are missing.
    """
    try:
        return _load_adapter(path, params, model, model_args, base_config, allow_base_mismatch, model_kwargs)
    except JpeftError:
        raise
    except Exception as e:  # a damaged file must end in a named error, whatever tripped on it
        raise CheckpointError(f"adapter at {path} is damaged: {type(e).__name__}: {str(e)[:300]}") from None


def _load_adapter(path, params, model, model_args, base_config, allow_base_mismatch, model_kwargs):
    p = _resolve_adapter_dir(path)
    info, index = _parse_info(p)
    check_base(info.base, params, base_config, allow_base_mismatch=allow_base_mismatch)
    try:
        template = template_adapter(info.config, params, model, *model_args, **model_kwargs)
    except LayoutError as e:
        if model is not None:
            raise
        # its fix names jpeft.init, which a user loading a saved adapter does not call
        raise LayoutError(f"{e} To load a saved adapter, give them to load_adapter the same way: "
                          "jpeft.load_adapter(path, params, model, x).") from None
    if info.module_copies:
        template = with_head_copies(template, unwrap_params(params)[0], info.module_copies, str(p))
    if model is None:  # layouts from the params alone: what the saved adapter's trace recorded (with the model: its own)
        template = with_kernel_fns(template, info.kernel_fns)
    template = with_plain_sites(template, info.plain_sites, str(p))
    # Names and shapes are checked against the config's template and the metadata index before
    # any tensor data is read: a header declaring a 1 GiB tensor in a sparse file costs nothing.
    fill_template(template, {k: jax.ShapeDtypeStruct(tuple(e["shape"]), np_dtype(e["dtype"])) for k, e in index.items()},
                  where=str(p))
    where = str(p / ADAPTER_WEIGHTS)
    arrays, _ = read_safetensors(p / ADAPTER_WEIGHTS, expect={k: (e["shape"], e["dtype"]) for k, e in index.items()})
    for name, e in index.items():
        if e.get("sha256") and sha256_hex(arrays[name]) != e["sha256"]:
            raise CheckpointError(f"{where} is corrupted: the bytes of {name!r} do not match their SHA-256 in {ADAPTER_JSON}.")
    adapter = fill_template(template, arrays, where=str(p))
    adapter = jax.tree.map(jax.numpy.asarray, adapter)
    _warn_load_notes(p, adapter)
    return info.config, adapter


def _warn_load_notes(p, adapter) -> None:
    """Warns what the loaded nodes say a user must know (each node's ``load_note``: LoRA factors
    relative to a residual base, which nothing on disk ties to the params given), once per note."""
    notes = sorted({n for node in adapter.values() if (n := node.load_note()) is not None})
    for note in notes:
        warnings.warn(f"the adapter in {str(p)!r}: {note}", UserWarning, stacklevel=4)


__all__ = [
    "AdapterInfo",
    "save_adapter",
    "load_adapter",
    "read_adapter_info",
    "base_fingerprint",
    "check_base",
    "content_hash",
    "safe_join",
    "atomic_directory",
    "recover",
    "sniff_unsafe",
    "refuse_unsafe",
    "read_json",
    "with_checksum",
    "verify_checksum",
    "read_safetensors",
    "safetensors_index",
    "check_expected",
    "open_regular",
    "read_bounded",
    "leaf_names",
    "template_adapter",
    "fill_template",
]
