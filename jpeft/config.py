"""Base type for method configs: small frozen dataclasses that round-trip through JSON.

Each method's config subclasses :class:`AdapterConfig`, sets ``peft_type`` (the
Hugging Face PEFT name where one exists) and maps its field names to the key names of
Hugging Face PEFT's ``adapter_config.json`` through ``_hf_keys`` so that
``to_dict()`` writes, and ``from_dict()`` reads, the same keys Hugging Face uses.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import warnings
from typing import Any, ClassVar, Mapping, Optional

import numpy as np

from jpeft.errors import ConfigError
from jpeft.tree import compile_pattern, matches

_REGISTRY: dict[str, type["AdapterConfig"]] = {}


def register_config(cls):
    """Class decorator (put it above ``@dataclasses.dataclass``): makes ``AdapterConfig.from_dict``
    able to find ``cls`` by ``peft_type``, and lets the constructor take Hugging Face PEFT's
    key names as aliases of the fields (``LoraConfig(lora_alpha=16)`` is ``LoraConfig(alpha=16)``),
    so Python, TOML and ``adapter_config.json`` use the same names. A keyword that is neither
    a field nor an alias raises :class:`ConfigError` naming it, the accepted names and the
    nearest one, and so does a value not of a field's declared scalar type (``r="8"``, ``r=8.5``,
    ``use_rslora="false"``, ``alpha=float("nan")``), for every method's config in this one place.
    A former field name that is no PEFT key (LoRA's ``init``, now ``init_weights``: a
    :func:`renamed_option` of the class) is taken too, with a :class:`DeprecationWarning`."""
    _REGISTRY[cls.peft_type] = cls
    aliases = {hf: name for name, hf in cls._hf_keys.items() if hf != name}
    # a former field name that is no PEFT key (LoRA's init): taken with a DeprecationWarning (renamed_option)
    cls._former_names = {k: v.new for c in cls.__mro__ for k, v in vars(c).items()
                         if isinstance(v, _RenamedOption) and k not in aliases}
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        _take_former_names(cls, kwargs, "")
        for hf, name in aliases.items():
            if hf in kwargs:
                if name in kwargs:
                    raise ConfigError(
                        f"{cls.__name__} got both {name}= and its Hugging Face PEFT alias {hf}=; give one of them."
                    )
                kwargs[name] = kwargs.pop(hf)
        _refuse_unknown_keywords(cls, kwargs)
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        given = dict(zip(names, args)) | kwargs
        _refuse_mistyped_fields(cls, given)  # and numpy scalars made Python's, in ``given``
        if len(args) > len(names) or set(names[:len(args)]) & set(kwargs):
            init(self, *args, **kwargs)  # Python's own TypeError
        else:
            init(self, **given)

    cls.__init__ = __init__
    cls.__eq__ = _config_eq  # over the dataclass's own: an ordered field's keys compare in order
    return cls


def _config_eq(self, other) -> bool:
    """A config's equality: the dataclass's (same class, every compared field equal), except that
    a first-match-ordered field (:attr:`AdapterConfig._ordered_fields`) is equal only with its
    keys in the same order (:meth:`AdapterConfig.same_field`)."""
    if other.__class__ is not self.__class__:
        return NotImplemented
    return all(self.same_field(f.name, getattr(self, f.name), getattr(other, f.name))
               for f in dataclasses.fields(self) if f.compare)


def ordered_fields() -> frozenset:
    """The names of the first-match-ordered fields of every registered config
    (:attr:`AdapterConfig._ordered_fields`: ``rank_pattern``, ``alpha_pattern``), for a settings
    table not yet resolved to a config (``jpeft train``'s multi-host agreement)."""
    return frozenset(n for c in _REGISTRY.values() for n in c._ordered_fields)



class _RenamedOption(property):
    """The property :func:`renamed_option` makes (``old``, ``new``: the names), which
    :func:`register_config` finds on a config class."""


def renamed_option(old: str, new: str = "init_weights") -> property:
    """A config's read-only attribute ``old`` for its option now named ``new`` (one name for one
    option in every method's config: the init option is ``init_weights``): reading it warns with a
    :class:`DeprecationWarning` naming ``new`` and returns ``new``'s value. Where ``old`` is the
    option's Hugging Face PEFT key (``_hf_keys``: AdaLoRA's ``init_lora_weights``, IA3's
    ``init_ia3_weights``) the constructor, ``replace`` and ``from_dict`` take it as they take
    every PEFT key, without a warning: it stays PEFT's ``adapter_config.json`` key. Where it is
    not (LoRA's ``init``, whose PEFT key is ``init_lora_weights``) they take it too, with the
    same :class:`DeprecationWarning` (:func:`register_config`), and ``to_dict`` never writes it."""
    def get(self):
        warnings.warn(_renamed_note(type(self), old, new), DeprecationWarning, stacklevel=2)
        return getattr(self, new)

    prop = _RenamedOption(get, doc=f"Deprecated name of :attr:`{new}` (a :class:`DeprecationWarning`).")
    prop.old, prop.new = old, new
    return prop


def _renamed_note(cls, old: str, new: str, given: bool = False) -> str:
    """The :class:`DeprecationWarning` of a former option name ``old``: read, or ``given`` (a
    keyword, a config key)."""
    name, hf = cls.__name__, cls._hf_keys.get(new, new)
    peft = f"{old} stays its Hugging Face PEFT key" if hf == old else f"its Hugging Face PEFT key {hf} is taken too"
    return (f"{name}.{old} is deprecated: the option is {name}.{new}, its name in every jpeft method's config ({peft})"
            + (f"; write {new} (a keyword, a [method] key, --set {new}=...)." if given else "."))


def _take_former_names(cls, kwargs: dict, where: str) -> None:
    """Renames in ``kwargs`` (keywords or config keys) each former option name of ``cls`` that is
    no PEFT key (``cls._former_names``, LoRA's ``init``) to its field, with a
    :class:`DeprecationWarning` naming the field (attributed to the caller of the constructor,
    ``replace`` or ``from_dict``). Raises :class:`ConfigError` where the field is given too, under
    its name or its PEFT key."""
    for old, new in cls._former_names.items():
        if old not in kwargs:
            continue
        for other in dict.fromkeys((new, cls._hf_keys.get(new, new))):
            if other in kwargs:
                raise ConfigError(f"{cls.__name__}{where} got both {other}= and {old}=, the option's former name; "
                                  f"give {new}= alone.")
        warnings.warn(_renamed_note(cls, old, new, given=True), DeprecationWarning, stacklevel=3)
        kwargs[new] = kwargs.pop(old)


_FLOAT32_MAX = 3.4028234663852886e38  # np.finfo(np.float32).max; NaN compares False
_SCALARS = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false"}


def scalar_kinds(declared) -> Optional[tuple[tuple[str, ...], bool]]:
    """The scalar types a config field declared as ``declared`` takes (``"int"``, ``"Optional[str]"``,
    ``"str | bool"``: ``(("str", "bool"), False)``) and whether it takes ``None``; ``None`` for any
    other declaration (``Any``, a ``Mapping``, a ``tuple``), which the config's ``__post_init__`` checks.
    The one reading of a field's type: the constructor's check and the CLI's ``--set`` use it."""
    if not isinstance(declared, str):
        declared = getattr(declared, "__name__", str(declared))
    declared = declared.replace("typing.", "")
    optional = declared.startswith("Optional[") and declared.endswith("]")
    kinds = [k.strip() for k in (declared[len("Optional["):-1] if optional else declared).split("|")]
    if "None" in kinds:
        optional, kinds = True, [k for k in kinds if k != "None"]
    if not kinds or any(k not in _SCALARS for k in kinds):
        return None
    return tuple(kinds), optional


def kinds_text(kinds) -> str:
    """``("int",)`` -> ``"an integer"``, ``("str", "bool")`` -> ``"a string or true or false"``: what a field wants."""
    return " or ".join(_SCALARS[k] for k in kinds)


def is_kind(v, kind: str) -> bool:
    """Whether ``v`` is a value of the scalar type ``kind`` (``"bool"``, ``"int"``, ``"float"``, ``"str"``):
    a bool is no number, an int is a number, numpy's scalars count, and a number is finite in
    float32, the adapters' dtype (an alpha, dropout or scale of NaN, inf or 1e39 makes outputs NaN)."""
    is_bool = isinstance(v, (bool, np.bool_))
    if kind == "bool" or is_bool:
        return kind == "bool" and is_bool
    if kind == "str":
        return isinstance(v, str)
    if not isinstance(v, (int, np.integer) if kind == "int" else (int, float, np.integer, np.floating)):
        return False
    try:
        return kind == "int" or abs(float(v)) <= _FLOAT32_MAX
    except OverflowError:  # an int too large for a float
        return False


def python_scalar(v):
    """``v`` as Python's own scalar where it is numpy's (``np.int64(2)`` -> ``2``), else ``v``: what a
    config keeps, as ``to_dict`` writes it to JSON (which takes no numpy scalar: a config built from
    ``np.arange`` or ``np.int64`` values trained, then failed to save)."""
    return v.item() if isinstance(v, np.generic) else v


def is_positive_number(v) -> bool:
    """A number (not a bool) > 0 and finite in float32: an alpha or scale of inf or 1e308 would
    make the float32 scale, and so every output, non-finite."""
    return is_kind(v, "float") and v > 0


def _refuse_mistyped_fields(cls, kwargs) -> None:
    """Raises :class:`ConfigError` for a field declared ``bool``, ``int``, ``float`` or ``str`` (or
    ``Optional`` of one) given a value of another type, for every method's config in this one place:
    a TOML or JSON ``use_rslora = "false"`` (a string, so true) switched rsLoRA's scale on without a
    word, ``token_dim = "16"``, ``num_layers = 2.5`` or ``init_std = true`` were kept as given, and
    ``non_linearity = ["relu"]`` raised a bare TypeError. Ranges stay with each config's
    ``__post_init__``."""
    for f in dataclasses.fields(cls):
        if f.name not in kwargs or not f.init:
            continue
        decl = scalar_kinds(f.type)
        v = kwargs[f.name]
        if decl is None or (decl[1] and v is None):
            continue
        if any(is_kind(v, k) for k in decl[0]):
            kwargs[f.name] = python_scalar(v)  # numpy's scalars kept as Python's: to_dict writes JSON
            continue
        want = kinds_text(decl[0]) + (" (or None)" if decl[1] else "")
        hint = ""
        if isinstance(v, str) and "bool" in decl[0]:
            hint = " (a quoted string counts as true: write true or false unquoted)"
        elif isinstance(v, str):
            hint = " (a quoted number is a string: write it unquoted)"
        elif "float" in decl[0] and isinstance(v, (int, float, np.number)) and not isinstance(v, bool):
            want, hint = "a finite number", " (at most float32's 3.4e38: a NaN or infinite value makes outputs NaN)"
        elif "int" in decl[0] and isinstance(v, float):
            hint = " (a whole number: jpeft does not round it)"
        raise ConfigError(f"{cls.__name__}.{f.name} must be {want}, found {type(v).__name__} {v!r}{hint}.")


def did_you_mean(word: str, names) -> str:
    """`` Did you mean 'name' (not 'word')?`` for the name of ``names`` nearest to a misspelt
    ``word`` (``difflib``), or ``""`` when none is near; for the error that refuses ``word``.
    ``names`` may map spellings to the name to suggest (``{"rank": "r"}``)."""
    spelled = names if isinstance(names, Mapping) else {str(n): n for n in names}
    near = difflib.get_close_matches(str(word), list(spelled), n=1, cutoff=0.5)
    return f" Did you mean {spelled[near[0]]!r} (not {word!r})?" if near else ""


def _refuse_unknown_keywords(cls, kwargs, where: str = "", what: str = "keyword") -> None:
    """Raises :class:`ConfigError` naming the keywords of ``kwargs`` that are no field of the config
    class ``cls`` (a typo such as ``rnak=4``, or a Hugging Face PEFT option the method does not have),
    with the accepted names and the nearest one; Python's own error was a bare ``TypeError``.
    :meth:`AdapterConfig.from_dict` names a dict's unknown keys here too (``where=".from_dict"``,
    ``what="key"``)."""
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in kwargs if k not in fields]
    if not unknown:
        return
    accepted = sorted(cls.key_names())
    notes = []
    for k in unknown:
        if k in cls._unsupported_hf_options:
            notes.append(f"{k!r} is a Hugging Face PEFT option jpeft does not implement for {cls.__name__}.")
        elif k in cls._ignored_hf_keys:  # from_dict (adapter_config.json) skips them; the constructor takes none
            notes.append(f"{k!r} is a Hugging Face PEFT key that changes nothing in jpeft (from_dict ignores it); "
                         "drop it here.")
        else:
            spelled = {n: n for n in accepted} | ({"rank": "r"} if "r" in fields else {})  # rank= for r=
            if did_you_mean(k, spelled):
                notes.append(did_you_mean(k, spelled).strip())
    raise ConfigError(
        f"{cls.__name__}{where} got unknown {what}{'s' if len(unknown) > 1 else ''} {unknown}; it accepts {accepted}."
        + "".join(" " + n for n in notes)
        + f" Remove unknown {what}s or fix their spelling."
    )


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """Base class. Subclasses are frozen dataclasses with a ``peft_type`` class attribute."""

    peft_type: ClassVar[str] = ""
    # whether the method can train on rows packed by documents (segment ids): prompt tuning, whose
    # virtual tokens are prepended once per row, cannot; `jpeft train` refuses that before loading
    packs_documents: ClassVar[bool] = True
    # whether the method trains a copy of every base weight (full fine-tuning): on a quantized base that copy would
    # start from the rounded kernels, so `jpeft train` refuses quantize with it
    trains_every_weight: ClassVar[bool] = False
    # PEFT's prompt-learning methods (prefix and prompt tuning: virtual tokens, no site on a module),
    # whose tensors PEFT keys under ``base_model.`` rather than ``base_model.model.``
    prompt_learning: ClassVar[bool] = False
    # the PEFT task types with which PEFT loads the saved adapter and runs it on jpeft.models' bases, by the base's
    # kind ("decoder": the Llama family and GPT-2; "encoder": BERT); jpeft.save_peft refuses any other before writing.
    # None is no task type (a plain PeftModel); "SEQ_CLS", "TOKEN_CLS" and "QUESTION_ANS" also write the head PEFT
    # keeps as a module to save (the classifier, qa_outputs)
    peft_task_types: ClassVar[Mapping[str, tuple]] = {
        "decoder": (None, "CAUSAL_LM"),
        "encoder": (None, "FEATURE_EXTRACTION", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"),
    }
    # field name -> Hugging Face adapter_config.json key (only where they differ)
    _hf_keys: ClassVar[Mapping[str, str]] = {}
    # dict fields whose keys' order is meaning: the first key that matches a module gives it its value
    # (rank_pattern / alpha_pattern, PEFT's get_pattern_key), so two orders are two configs (same_field)
    _ordered_fields: ClassVar[tuple] = ()
    # former field name (no PEFT key) -> field: set by register_config from the class's renamed_option attributes
    _former_names: ClassVar[Mapping[str, str]] = {}
    # keys Hugging Face writes that do not change what the adapter computes: accepted and ignored
    _ignored_hf_keys: ClassVar[frozenset] = frozenset(
        {
            "base_model_name_or_path", "revision", "task_type", "inference_mode", "auto_mapping",
            "peft_version", "fan_in_fan_out", "megatron_core", "runtime_config", "qalora_group_size",
        }
    )
    # Hugging Face PEFT options jpeft does not implement: accepted only at their "off" values
    # (what PEFT writes by default), refused by name otherwise, never silently dropped. A config
    # with a field of that name implements it (LoraConfig: layers_to_transform, layers_pattern,
    # exclude_modules, lora_bias, modules_to_save, bias,
    # trainable_token_indices) and the list does not apply to it.
    _unsupported_hf_options: ClassVar[Mapping[str, tuple]] = {
        "modules_to_save": (None, [], ()),
        "bias": ("none", None),
        "layers_to_transform": (None, [], ()),
        "layers_pattern": (None, [], (), ""),
        "exclude_modules": (None, [], ()),
        "lora_bias": (False, None),
        "trainable_token_indices": (None, [], (), {}),
        "layer_replication": (None, [], ()),
        "megatron_config": (None, {}),
        "loftq_config": (None, {}),
        "eva_config": (None, {}),
        "corda_config": (None, {}),
        "astra_config": (None, {}),  # PEFT 0.22's Astra init (init_lora_weights="astra"), written null by default
        "use_qalora": (False, None),
        "target_parameters": (None, [], ()),
        "alora_invocation_tokens": (None, [], ()),
        "arrow_config": (None, {}),
        "lora_ga_config": (None, {}),
        "use_bdlora": (False, None),
        # LoRA variants whose files carry extra tensors or a changed base (KaSA truncates it):
        # named here so the refusal says which option, not that the keys fit no module
        "kasa_config": (None,),  # {} is the variant on, with its defaults
        "monteclora_config": (None,),
        "velora_config": (None,),
    }

    @classmethod
    def field_of(cls, key: str) -> str:
        """The field that ``key`` names: ``key`` itself, the field whose Hugging Face PEFT name it
        is (``LoraConfig.field_of("lora_alpha") == "alpha"``) or whose former name it is
        (``LoraConfig.field_of("init") == "init_weights"``, deprecated: :func:`renamed_option`)."""
        return ({hf: name for name, hf in cls._hf_keys.items()} | dict(cls._former_names)).get(key, key)

    @classmethod
    def same_field(cls, key: str, a, b) -> bool:
        """Whether ``a`` and ``b`` are one value of the field ``key`` names (a field or Hugging
        Face PEFT name): equal, and for a first-match-ordered field (:attr:`_ordered_fields`:
        ``rank_pattern`` / ``alpha_pattern`` of LoRA, LoHa and LoKr) with their keys in the same
        order, since the first key that matches a module gives it its rank or alpha. Any other
        order differs, even of keys that match no module in common: that depends on the model's
        module names, which a config does not know.

        >>> from jpeft import LoraConfig
        >>> first, second = {"q_proj": 4, "layers.0.q_proj": 8}, {"layers.0.q_proj": 8, "q_proj": 4}
        >>> first == second, LoraConfig.same_field("rank_pattern", first, second)
        (True, False)
        """
        if a != b:
            return False
        return (cls.field_of(key) not in cls._ordered_fields or not isinstance(a, Mapping)
                or not isinstance(b, Mapping) or list(a) == list(b))

    @classmethod
    def key_names(cls) -> frozenset:
        """The names that set a field: every field's name and its Hugging Face PEFT name."""
        fields = {f.name for f in dataclasses.fields(cls) if f.init}
        return frozenset(fields | {cls._hf_keys.get(n, n) for n in fields})

    @classmethod
    def known_hf_keys(cls) -> frozenset:
        """Every ``adapter_config.json`` key jpeft reads (:meth:`key_names`), ignores as harmless or
        refuses (PEFT options jpeft does not implement) for this method."""
        return cls.key_names() | cls._ignored_hf_keys | set(cls._unsupported_hf_options) | {"peft_type"}

    @property
    def extra_positions(self) -> int:
        """Positions the method puts before every row's tokens (prefix and prompt tuning's
        virtual tokens), which the row's tokens share the model's position range with:
        `jpeft train` and `jpeft eval` check ``seq_len`` plus these against it before anything
        is written (the first step raised ``PromptTooLongError`` after the output folder was)."""
        return 0

    def replace(self, **changes) -> "AdapterConfig":
        """A copy with ``changes`` (field names or their Hugging Face PEFT aliases, as the constructor takes).

        Raises:
          ConfigError: a keyword the config does not have, or a field given under both of its names."""
        _take_former_names(type(self), changes, ".replace")
        for name, hf in self._hf_keys.items():
            if hf != name and hf in changes:
                if name in changes:
                    raise ConfigError(
                        f"{type(self).__name__}.replace got both {name}= and its Hugging Face PEFT alias {hf}=; give one of them."
                    )
                changes[name] = changes.pop(hf)
        return dataclasses.replace(self, **changes)

    def _set_targets(self, fix: str) -> None:
        """For ``__post_init__`` of a config with a ``target_modules`` field: sets it normalised
        (:func:`_as_targets`); an empty one is refused, ``fix`` saying what to give instead.

        Raises:
          ConfigError: ``target_modules`` is empty, or not a regex or a list of names."""
        object.__setattr__(self, "target_modules", _as_targets(self.target_modules))
        if self.target_modules is None or (not isinstance(self.target_modules, str) and not self.target_modules):
            raise ConfigError(f"{type(self).__name__}.target_modules is empty; {fix}.")

    def layer_scan_refusal(self) -> Optional[str]:
        """Why this config cannot train a layer-scanned model (``scan_layers``), or ``None`` when
        it can; ``jpeft train`` reads it to refuse ``train.scan_layers = true`` before loading."""
        return None

    def adapts_lm_head(self, peft_version: Optional[tuple[int, int]] = None) -> bool:
        """Whether this config gives ``lm_head`` a site or a trained copy of its own, which PEFT
        computes on a tied model with an ``lm_head`` of its own; ``jpeft train`` then reads a tied
        base untied, and the CLI's commands for a PEFT folder (``peft_version``: its file's
        ``(major, minor)``, where the PEFTs match names differently; ``None``: jpeft's own rules).
        By default: ``target_modules`` selects ``lm_head`` (a method with other selection rules
        overrides this: LoRA's exclusions and ``modules_to_save``)."""
        targets = getattr(self, "target_modules", None)
        return targets is not None and matches(targets, "lm_head")

    def untied_head_refusal(self) -> Optional[str]:
        """Why this config cannot train on a tied base read untied (``lm_head`` a copy of the
        input embedding, see :meth:`adapts_lm_head`), or ``None`` when it can; ``jpeft train``
        reads it to refuse before loading."""
        return None

    @property
    def residual_init(self) -> Optional[str]:
        """The init that makes this config's adapter relative to a residual base (the base
        changes: LoRA's ``"pissa"``, ``"pissa_niter_K"``, ``"olora"``, ``"milora"``,
        ``"corda_kpm"``/``"corda_ipm"``, made by :func:`jpeft.init_pissa` & co.), else ``None``."""
        return None

    def saved_config(self, adapter) -> "AdapterConfig":
        """The config :func:`jpeft.save_adapter` records with ``adapter`` (:func:`jpeft.load_adapter`
        rebuilds the sites from it): this one, unless a method keeps marks of its sites in the
        config (LoRA's residual inits)."""
        return self

    # -- training: what a method adds to the one training loop (jpeft.fit and its step makers) --------
    # A method whose training is more than the loss's gradient steps (AdaLoRA's rank allocator, its
    # orthogonal penalty) says so here; `jpeft train` and the forgetting runner read these three,
    # never a method module. The defaults are a plain method's: nothing added.

    def wrap_optimizer(self, tx, total_steps: int | None = None):
        """The optimizer a training loop runs for this method, given the one it built (``tx``,
        clipping left outside: ``optax.chain(optax.clip_by_global_norm(c),
        config.wrap_optimizer(optax.adamw(...)))``): ``tx`` itself, unless the method's
        training acts on each update (AdaLoRA's rank allocator, which lives in the optimizer
        state). ``total_steps``, where the loop knows how many updates it will run, lets the
        method warn about a schedule the run does not finish (AdaLoRA's ``total_step``)."""
        return tx

    def regularizer(self, adapter):
        """The term a training loop adds to the loss for ``adapter`` (a scalar), or ``None``:
        none, unless the method trains with a penalty of its own (AdaLoRA's
        ``orth_reg_weight`` times its orthogonal regularization, as PEFT adds it)."""
        return None

    def trained_config(self, opt_state) -> "AdapterConfig":
        """The config to save a trained adapter with, given the optimizer state of the
        optimizer :meth:`wrap_optimizer` returned: this one, unless training decides something
        the config records (AdaLoRA's ``rank_pattern``). An ``opt_state`` the method's
        training did not make (``None``, a plain optimizer's) gives this config too."""
        return self

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict with Hugging Face PEFT key names and ``peft_type``."""
        out: dict[str, Any] = {"peft_type": self.peft_type}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, tuple):
                v = list(v)
            if isinstance(v, Mapping):
                v = dict(v)
            out[self._hf_keys.get(f.name, f.name)] = v
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AdapterConfig":
        """Inverse of :meth:`to_dict`. Called on ``AdapterConfig`` it dispatches on ``peft_type``.

        Raises:
          ConfigError: for an unknown ``peft_type`` or a key the config does not have.
        """
        d = dict(d)
        ptype = d.pop("peft_type", cls.peft_type or None)
        target = cls
        if cls is AdapterConfig or (ptype and ptype != cls.peft_type):
            if ptype not in _REGISTRY:
                raise ConfigError(
                    f"unknown peft_type {ptype!r}; jpeft supports {sorted(_REGISTRY)}. "
                    "Check the adapter_config.json, or use the config class of the method directly."
                )
            target = _REGISTRY[ptype]
        _take_former_names(target, d, ".from_dict")
        names = {f.name for f in dataclasses.fields(target)}
        flags = {f.name for f in dataclasses.fields(target) if scalar_kinds(f.type) == (("bool",), False)}
        kwargs, unknown, unsupported, given_as = {}, [], {}, {}
        for k, v in d.items():
            name = target.field_of(k)
            if name in names:
                if name in given_as:  # `alpha` and `lora_alpha`: one value would be dropped silently
                    raise ConfigError(
                        f"{target.__name__}.from_dict got both {given_as[name]!r} ({kwargs[name]!r}) and {k!r} ({v!r}), "
                        f"two names of one field ({name}); give one of them."
                    )
                given_as[name] = k
                # a null flag (older PEFT files, other writers) is false to PEFT, which tests it by truth value
                kwargs[name] = False if v is None and name in flags else v
            elif k in target._ignored_hf_keys:
                continue
            elif k in target._unsupported_hf_options:
                if not any(v is ok or (type(v) is type(ok) and v == ok) for ok in target._unsupported_hf_options[k]):
                    unsupported[k] = v
            else:
                unknown.append(k)
        if unsupported:
            raise ConfigError(
                f"{target.__name__}.from_dict got Hugging Face PEFT options jpeft does not implement: {unsupported}. "
                "jpeft would not apply them, so training, merging and export would differ from PEFT's; remove them "
                f"(or set them to PEFT's defaults: {({k: target._unsupported_hf_options[k][0] for k in unsupported})})."
            )
        _refuse_unknown_keywords(target, dict.fromkeys(sorted(unknown)), ".from_dict", "key")
        return target(**kwargs)

    def to_json(self) -> str:
        """The config as JSON, its fields sorted by name; the values inside a field keep their
        order: ``rank_pattern`` / ``alpha_pattern`` take the first matching key (PEFT's
        ``get_pattern_key``), so sorting their keys changed which value a module got."""
        return json.dumps(dict(sorted(self.to_dict().items())), indent=2)

    @classmethod
    def from_json(cls, s: str) -> "AdapterConfig":
        try:
            d = json.loads(s)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"config JSON must be an object, found {type(d).__name__}")
        return cls.from_dict(d)


_NON_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def strict_json(obj, **kw) -> str:
    """``json.dumps(obj, **kw)`` as strict JSON, for every JSON file or line jpeft writes for a
    reader (``--json`` output, ``metrics.jsonl``, result files): a float that is NaN or infinite
    (a diverged loss, a perplexity past float range) is written as the string ``"NaN"``,
    ``"Infinity"`` or ``"-Infinity"``, where Python's ``json`` writes the bare ``NaN`` /
    ``Infinity`` that strict parsers (``jq``, JavaScript's ``JSON.parse``, Go) refuse.
    ``float()`` in Python and ``Number()`` in JavaScript read those strings back as the number.

    >>> strict_json({"loss": 800.0, "perplexity": float("inf"), "kl": [float("nan")]})
    '{"loss": 800.0, "perplexity": "Infinity", "kl": ["NaN"]}'
    """
    def fix(v):
        if isinstance(v, (float, np.floating)) and not np.isfinite(v):
            return _NON_FINITE[str(float(v))]
        if isinstance(v, Mapping):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [fix(x) for x in v]
        return v

    return json.dumps(fix(obj), allow_nan=False, **kw)


def registered_configs() -> dict[str, type[AdapterConfig]]:
    return dict(_REGISTRY)


def _as_targets(v, field: str = "target_modules"):
    """Normalises ``target_modules``: a str stays a regex (checked by RE2); a list becomes a
    tuple of names.

    Raises:
      ConfigError: a value of another type, a list holding a non-string, or an invalid regex.
    """
    if v is None:
        return None
    if isinstance(v, str):
        compile_pattern(v)
        return v
    if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
        raise ConfigError(
            f"{field} must be a regex string or a list of module names such as ['q_proj', 'v_proj'], found "
            f"{type(v).__name__} {str(v)[:120]}."
        )
    return tuple(v)
