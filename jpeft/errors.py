"""Named errors raised by jpeft.

Every error jpeft raises on bad input derives from :class:`JpeftError`, so a caller
can catch them all at once; each also derives from the closest built-in type
(``ValueError``, ``KeyError``, ``OSError``) so existing ``except`` clauses keep working.
Messages say what was expected, what was found, and how to fix it.
"""

from __future__ import annotations

import functools


class JpeftError(Exception):
    """Base class of every error jpeft raises on purpose."""


class ConfigError(JpeftError, ValueError):
    """A method config holds an invalid value or an unknown key."""


class TargetNotFoundError(JpeftError, ValueError):
    """``target_modules`` matched no module of the model."""


class ShapeMismatchError(JpeftError, ValueError):
    """An adapter does not fit the parameters it is applied to or merged with."""


class LayoutError(JpeftError, ValueError):
    """jpeft cannot tell how a module's kernel maps inputs to outputs."""


class NotMergeableError(JpeftError, ValueError):
    """The adapter's method cannot be folded into the base weights."""


class UnsupportedModuleError(JpeftError, TypeError):
    """A targeted module is of a type the method cannot adapt."""


class InputValidationError(JpeftError, ValueError):
    """A batch or input given to a public entry point has the wrong shape, dtype or values."""


class NonFiniteError(JpeftError, FloatingPointError):
    """Training produced non-finite losses or gradients too many steps in a row."""


class LoadError(JpeftError, OSError):
    """A model, adapter or checkpoint on disk is missing, malformed or does not match."""


class UnsupportedModelError(LoadError):
    """A Hugging Face ``model_type`` or architecture jpeft does not implement."""


class UnsafeFileError(LoadError):
    """A file that would execute code when loaded (pickle) was offered; jpeft refuses it."""


class BaseMismatchError(LoadError):
    """An adapter or checkpoint was made for a different base model."""


class CheckpointError(LoadError):
    """A checkpoint is incomplete, corrupted or truncated."""


class CheckpointUnreadableError(CheckpointError, PermissionError):
    """A checkpoint's files are there but this process may not read them (permissions); nothing
    says they are damaged."""


class SaveError(JpeftError, OSError):
    """A save failed part-way; the previous files are left intact."""


class PathEscapeError(JpeftError, ValueError):
    """A name or path would write outside the directory it was meant for."""


class BankError(JpeftError, ValueError):
    """An adapter bank operation is invalid (capacity, name, or shape)."""


class NotInvertibleError(NotMergeableError):
    """A merge that cannot be undone from the merged weights alone (DoRA); keep the original params."""


class PrefixNotSupportedError(UnsupportedModuleError):
    """Prefix tuning targets an attention module whose call takes no ``prefix_kv`` keyword."""


class PromptTooLongError(InputValidationError):
    """Virtual tokens plus the input exceed the model's position budget."""


class BottleneckTargetError(ShapeMismatchError):
    """A bottleneck adapter's target is not a module output of the adapter's width."""


class BankCapacityError(BankError):
    """An adapter bank is full, or an adapter's rank is above the bank's maximum rank
    (:class:`BankRankError`)."""


class BankRankError(BankCapacityError):
    """An adapter's LoRA rank is above the bank's maximum rank (``rank`` and ``max_rank`` say
    which): unlike a full bank, freeing a slot does not help."""

    def __init__(self, message: str, *, rank: int, max_rank: int):
        super().__init__(message)
        self.rank, self.max_rank = rank, max_rank

    def __reduce__(self):  # pickle and copy rebuild it with its keywords (a process pool sends it back so)
        return functools.partial(type(self), rank=self.rank, max_rank=self.max_rank), self.args


class BankShapeError(BankError, ShapeMismatchError):
    """An adapter (or the params a bank is applied to) belongs to another base model shape."""


class UnknownAdapterError(BankError, LookupError):
    """No adapter of that name is in the bank."""


class DuplicateAdapterError(BankError):
    """``AdapterBank.add`` was given a name the bank already holds (use ``replace``)."""


class OverwriteError(JpeftError, FileExistsError):
    """A save would replace an existing adapter or checkpoint and ``overwrite=True`` was not given."""


class ShardingError(JpeftError, ValueError):
    """A mesh, partition rule or array placement does not fit the arrays being sharded."""


class DistributedError(JpeftError, RuntimeError):
    """Joining or using a multi-process (multi-host) JAX job failed or was set up wrongly."""


class WeightShapeError(LoadError, ShapeMismatchError):
    """A weight in a checkpoint has a shape that disagrees with the model's config."""


class UnsupportedAdapterError(LoadError):
    """An adapter on disk uses a method or an option jpeft cannot load."""


class QuantizationError(JpeftError, ValueError):
    """A base cannot be quantized as asked, or an operation cannot run on a quantized base."""


class OverloadedError(JpeftError, RuntimeError):
    """A server's bounded request queue is full, or its engine is not running (``jpeft serve``
    answers 429 / 503): retry later."""


__all__ = [
    "JpeftError",
    "ConfigError",
    "TargetNotFoundError",
    "ShapeMismatchError",
    "LayoutError",
    "NotMergeableError",
    "UnsupportedModuleError",
    "InputValidationError",
    "NonFiniteError",
    "LoadError",
    "UnsupportedModelError",
    "UnsafeFileError",
    "BaseMismatchError",
    "CheckpointError",
    "CheckpointUnreadableError",
    "SaveError",
    "PathEscapeError",
    "BankError",
    "NotInvertibleError",
    "PrefixNotSupportedError",
    "PromptTooLongError",
    "BottleneckTargetError",
    "BankCapacityError",
    "BankRankError",
    "BankShapeError",
    "UnknownAdapterError",
    "DuplicateAdapterError",
    "OverwriteError",
    "ShardingError",
    "DistributedError",
    "WeightShapeError",
    "UnsupportedAdapterError",
    "OverloadedError",
    "QuantizationError",
]
