"""Method registry: config type -> init function.

Adding a method touches one new file and one line here (:data:`INIT`)."""

from __future__ import annotations

from typing import Any, Callable

# Each entry: config class -> ``init(config, params, key, infos) -> {path: node}``, where
# ``params`` is the bare params collection and ``infos`` is ``{path: ModuleInfo}`` from tracing
# the model (or ``None`` when no model was given).
INIT: dict[type, Callable[..., dict[str, Any]]] = {}


def register(config_cls):
    def deco(fn):
        INIT[config_cls] = fn
        return fn

    return deco


# Each method registers its init on import (one line per method).
from jpeft.methods import ia3  # noqa: E402,F401
from jpeft.methods import bottleneck  # noqa: E402,F401
from jpeft.methods import pissa  # noqa: E402,F401
from jpeft.methods import prefix  # noqa: E402,F401
from jpeft.methods import prompt  # noqa: E402,F401
from jpeft.methods import vera  # noqa: E402,F401
from jpeft.methods import adalora  # noqa: E402,F401
