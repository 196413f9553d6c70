"""Adapters and training checkpoints for the CLI, on :mod:`jpeft.io` (finished adapters)
and :mod:`jpeft.checkpoint` (Orbax training checkpoints)."""

from __future__ import annotations

import os

from jpeft.errors import LoadError


def save_adapter(directory: str, adapter, config, *, params=None, base_config=None, metadata=None):
    """Writes a finished adapter (``jpeft_adapter.json`` + ``jpeft_adapter.safetensors``),
    replacing an older one at ``directory``."""
    from jpeft import io

    return io.save_adapter(directory, config, adapter, params=params, base_config=base_config,
                           metadata=metadata, overwrite=True)


def load_adapter(directory: str, *, params, model=None, example=None, base_config=None):
    """Reads an adapter written by :func:`save_adapter` onto ``params``: ``(adapter, config)``."""
    from jpeft import io

    if not os.path.exists(directory):
        raise LoadError(f"adapter folder {directory!r} does not exist; give the adapter folder written by "
                        "`jpeft train` (<output_dir>/adapter).")
    args = () if example is None else (example,)
    config, adapter = io.load_adapter(directory, params, model, *args, base_config=base_config)
    return adapter, config
