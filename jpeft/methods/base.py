"""The method protocol: what every method shares, and the one place a method registers.

A method is one file in ``jpeft/methods/`` holding a frozen config dataclass, an ``init``
function, one small pytree node type per kind of site it attaches to, and a single
:func:`register_method` call that hands jpeft a :class:`Method` record. Everything the rest of
jpeft needs from a method is reached through that record (init, Hugging Face PEFT conversion,
residual base, budget table) or through the node's own methods (the :class:`Site` protocol:
apply, merge, effective update, partition specs, frozen arrays), so no module outside
``jpeft/methods/`` names a method's classes or imports a method's module.

Node protocol (see :class:`Site`, whose defaults a node inherits):

* ``handles(method_name) -> bool``: which module methods the node intercepts;
* ``intercept(call) -> output``: the function applied at the site;
* ``check(path, module)`` / ``check_params(path, module_params)``: raise
  :class:`~jpeft.errors.ShapeMismatchError` if the node does not fit the module;
* ``merge(module_params) / unmerge(module_params)``: fold into / out of the base
  (``mergeable`` is ``False`` where this is impossible);
* ``effective(module_params)``: the effective weights the node contributes (L2-SP);
* ``low_rank()``: the update as ``s * A @ B`` (:class:`LowRank`) for adapter merging and the
  bank, or a :class:`~jpeft.errors.NotMergeableError` saying why not; ``routed_low_rank()``:
  what the adapter bank routes (``low_rank()``, plus a LoRA's ``lora_bias``);
* ``partition_specs(module_specs)``: the node with a ``PartitionSpec`` in place of each array;
* ``frozen``: names of the node's array fields that are saved and loaded but never trained.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import warnings
from typing import Any, Callable, ClassVar, Mapping, NamedTuple, Optional

import jax
from jax.sharding import PartitionSpec as P

from jpeft.config import register_config, registered_configs
from jpeft.errors import (CheckpointError, ConfigError, NotMergeableError, ShapeMismatchError, ShardingError,
                          UnsupportedModuleError)


class Kind(str, enum.Enum):
    """The kinds of kernel layout a linear site can have. A ``str`` enum, so a kind compares
    equal to its name (``Kind.EMBED == "embed"``) and layouts written as JSON stay readable."""

    DENSE = "dense"
    DENSE_GENERAL = "dense_general"
    CONV = "conv"
    EINSUM = "einsum"
    EMBED = "embed"

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a module's kernel maps inputs to outputs.

    ``kind`` is a :class:`Kind`. ``in_axes`` / ``out_axes`` index ``kernel_shape``; the adapter
    treats the kernel as the matrix ``[prod(in dims), prod(out dims)]``. ``equation`` is set for
    ``einsum``. ``kernel_fn`` names the module's own function of its kernel (a custom
    ``dot_general``: fake quantization, a kernel-scaling wrapper) where jpeft does not know it to
    compute the plain product of the kernel it is given (:func:`jpeft._inject.kernel_fn`), else
    ``None``; :func:`jpeft.merge` refuses such a site (:func:`check_kernel_fn_merge`).
    ``peft_lora_differs`` says, for an ``nn.Conv``, why Hugging Face PEFT < 0.22's LoRA on its
    torch twin computes another update than jpeft's (a dilated, circular- or reflect-padded
    window: PEFT 0.21's ``lora_A`` conv takes the base's kernel size, stride and padding only;
    PEFT 0.22's takes its dilation and padding mode too, as jpeft's), else ``None``; LoRA's PEFT
    reader refuses such a site in a file of PEFT < 0.22 (or without ``peft_version``), and its
    writer records ``peft_version`` 0.22.0. ``peft_padding_differs`` says the same for LoHa, LoKr
    and AdaLoRA (a circular- or reflect-padded window: PEFT 0.21 adds their update through
    ``F.conv2d``, zero-padded; PEFT 0.22 through the base's ``_conv_forward``, as jpeft), else
    ``None``; their readers and writers gate on it so.
    """

    kind: Kind
    kernel_shape: tuple
    in_axes: tuple
    out_axes: tuple
    equation: Optional[str] = None
    kernel_fn: Optional[str] = None
    peft_lora_differs: Optional[str] = None
    peft_padding_differs: Optional[str] = None

    def __post_init__(self):
        try:
            object.__setattr__(self, "kind", Kind(self.kind))
        except ValueError:
            raise ConfigError(f"Layout.kind must be one of {[k.value for k in Kind]}, found {self.kind!r}.") from None

    @property
    def in_dims(self) -> tuple:
        return tuple(self.kernel_shape[i] for i in self.in_axes)

    @property
    def out_dims(self) -> tuple:
        return tuple(self.kernel_shape[i] for i in self.out_axes)

    @property
    def in_features(self) -> int:
        return int(math.prod(self.in_dims))

    @property
    def out_features(self) -> int:
        return int(math.prod(self.out_dims))

    @property
    def param_name(self) -> str:
        return "embedding" if self.kind == Kind.EMBED else "kernel"

    def check_params(self, path: str, own: Mapping[str, Any], *, what: str = "adapter") -> None:
        """Raises :class:`~jpeft.errors.ShapeMismatchError` unless the module params ``own``
        hold a kernel (or embedding) of exactly the shape this layout was made for."""
        pname = self.param_name
        if pname not in own:
            raise ShapeMismatchError(f"{what} at {path!r} expects a {pname!r} parameter; the params have {sorted(own)}.")
        got = tuple(own[pname].shape)
        if got != tuple(self.kernel_shape):
            raise ShapeMismatchError(
                f"{what} at {path!r} was built for a {pname} of shape {tuple(self.kernel_shape)}, "
                f"but the params hold shape {got}. Re-create the adapter for this base model."
            )


class ModuleInfo(NamedTuple):
    """What tracing the model once records about a module call."""

    cls_name: str
    layout: Optional[Layout]
    out_shape: Any  # pytree of jax.ShapeDtypeStruct, the module's __call__ output
    in_shape: Any
    methods: frozenset = frozenset()  # the module's other methods the model called ("attend", ...)
    refusal: Optional[str] = None  # why a module with a kernel has no layout (a grouped conv, ...), raised when targeted
    input_axes: Optional[tuple] = None  # the input's axes a Dense/DenseGeneral contracts (non-negative, sorted)
    # inside a layer scan (nn.scan): the number of layers its params (its own and its submodules') are stacked over
    scanned_layers: Optional[int] = None
    # where the model computes with the module's params outside the module's own calls (jpeft._reads)
    read_outside: tuple = ()


def module_input(args: tuple, kwargs: Mapping):
    """The input of a linen module call: its first positional argument, else its ``inputs``
    keyword (the name every ``flax.linen`` layer gives it), else ``None``."""
    return args[0] if args else kwargs.get("inputs")


class Call(NamedTuple):
    """One intercepted module call, handed to a node's ``intercept``."""

    module: Any  # the bound flax.linen.Module
    method_name: str
    next_fun: Callable
    args: tuple
    kwargs: dict
    path: str

    def run(self):
        return self.next_fun(*self.args, **self.kwargs)

    @property
    def inputs(self):
        """The module's input (:func:`module_input`)."""
        return module_input(self.args, self.kwargs)

    def dropout_key(self):
        """A dropout key from the ``rngs`` given to :func:`jpeft.apply`, or ``None``."""
        if self.module.has_rng("dropout"):
            return self.module.make_rng("dropout")
        return None


class LowRank(NamedTuple):
    """A site's update written as ``scale * a @ b`` on the ``[in, out]`` matrix view of the
    kernel (:class:`Layout`): what adapter merging (:mod:`jpeft.merging`) and the adapter bank
    (:mod:`jpeft.bank`) combine. For an embedding, ``tied_output`` says whether the model also
    reads it as its tied output projection (``None``: unknown) and ``tie_output`` whether the
    update acts there too; ``dropout`` is the rate on the update's input; ``residual`` is the
    init whose residual base the factors are relative to (``"pissa"``, ``"olora"``, ...; LoRA's
    ``LoraWeights.residual``), ``None`` for an update of the original weights."""

    a: jax.Array  # [in, r]
    b: jax.Array  # [r, out]
    scale: float
    layout: Layout
    tied_output: Optional[bool] = None
    tie_output: bool = False
    dropout: float = 0.0
    residual: Optional[str] = None
    # ``[out]``: ``s * bias`` is added to the module's output (LoRA's ``lora_bias``, PEFT's bias on
    # lora_B); only ``Site.routed_low_rank`` sets it (the bank routes it; merging sums w_i * s_i * bias_i)
    bias: Optional[jax.Array] = None
    # ``(indices, values [k, out])``: embedding rows that replace the lookup of those ids (LoRA's
    # trainable tokens, whose routed_low_rank has rank 0); only ``Site.routed_low_rank`` sets it
    tokens: Optional[tuple] = None
    # ``{param name: array}``: a trained full copy of the module's params that replaces them
    # (modules_to_save of an nn.Dense or nn.Embed, rank 0); only ``Site.routed_low_rank`` sets it
    saved: Optional[Mapping[str, Any]] = None
    # ``b`` is frozen where the update is trained (MiCA's lora_B, ``LoraWeights.frozen_b``): what the
    # bank gives back and what an exact concatenation of such updates keeps (:mod:`jpeft.merging`)
    frozen_b: bool = False


def residual_refusal(where: str, mark: str, what: str) -> str:
    """Why a LoRA site relative to a residual base (``jpeft.init_pissa`` & co.) cannot be
    combined: its ``s * A @ B`` is not its change to the original weights, and the combined
    adapter would lose the mark (so ``jpeft.hf.save_peft`` would write it for the original base)."""
    return (f"{where} comes from jpeft.init_{str(mark).split('_')[0]} (marked {mark!r}): its factors are relative to "
            f"the residual base that call returned, not to the original weights, so its s*A@B cannot be {what} as an "
            "update of the base (and the result would lose the mark: exported, PEFT would apply it to the original "
            "weights). Convert it first to a plain LoRA of the original weights with "
            "jpeft.convert_residual_adapter(adapter, original_params, residual_params) (factors [A | A_0] and "
            "[B ; -B_0], as PEFT's path_initial_model_for_weight_conversion writes them), or merge it alone into its "
            "residual params with jpeft.merge(residual_params, adapter).")


def check_tied_merge(lr: "LowRank", stacklevel: int = 3) -> None:
    """Refuses folding an embedding's update into a weight the model also reads as its tied
    output projection when the unmerged update acts on the input lookup only (the merged
    model's logits would differ), and warns when it cannot tell; a no-op for other sites and
    for updates that adapt the tied output too (``tie_output``). Used by :func:`jpeft.merge`
    (LoRA's ``merge``) and :func:`jpeft.merging.merge_into_base`.

    Raises:
      NotMergeableError: the embedding is the model's tied output projection.
    """
    if lr.layout is None or lr.layout.kind != Kind.EMBED or lr.tie_output:
        return
    check_input_only_embedding_merge(lr.tied_output, "a LoRA", stacklevel + 1)


def check_kernel_fn_merge(path: str, layout: Optional[Layout], where: str = "jpeft.merge") -> None:
    """Refuses to fold an update into the kernel of a module that computes with its own
    function of the kernel (:attr:`Layout.kernel_fn`): the adapters add their update to what
    that function returns (as PEFT adds LoRA's beside a quantized base layer), while the merged
    kernel would go through it, so the merged model would not compute what the adapter does
    (LoRA 0.75 off through a dot_general that rounds the kernel to quarters).

    Raises:
      NotMergeableError: ``layout`` records such a function."""
    fn = getattr(layout, "kernel_fn", None)
    if fn is None:
        return
    raise NotMergeableError(
        f"{where}: the site {path!r} is on a module that computes with its own {fn} (recorded when jpeft traced the "
        "model), which jpeft does not know to compute the plain product of the kernel it is given. jpeft.apply adds "
        "the adapter's update to what that function returns, but a merge would fold the update into the kernel the "
        "function then transforms (a fake-quantizing or kernel-scaling dot_general), so the merged model would not "
        "compute what the adapter does. Serve the adapter unmerged with jpeft.apply; or, if the function computes "
        "the plain product of the kernel (a precision or sharding wrapper), declare it in the model with "
        "jpeft.transparent_dot_general(fn) and rebuild the adapter's layout from the model "
        "(jpeft.load_adapter(folder, params, model, x) of the saved adapter)."
    )


def recorded_kernel_fns(adapter: Mapping[str, Any]) -> dict:
    """``{path: Layout.kernel_fn}`` of the sites that record one: what the writers
    (:func:`jpeft.save_adapter`, the checkpoint manager) save beside the arrays, so that an adapter
    loaded without the model (whose layouts come from the params alone) still refuses its merge."""
    out = {}
    for path, node in adapter.items():
        fn = getattr(getattr(getattr(node, "unstacked", node), "layout", None), "kernel_fn", None)
        if fn is not None:
            out[path] = fn
    return out


def with_kernel_fns(adapter: Mapping[str, Any], fns: Mapping[str, str]) -> dict:
    """``adapter`` with each site of ``fns`` (:func:`recorded_kernel_fns`) recording its function
    in its layout (a loader's template built from the params alone)."""
    out = dict(adapter)
    for path, fn in fns.items():
        node = out.get(path)
        inner = getattr(node, "unstacked", node)
        lay = getattr(inner, "layout", None)
        if not isinstance(lay, Layout) or lay.kernel_fn is not None:
            continue
        new = dataclasses.replace(inner, layout=dataclasses.replace(lay, kernel_fn=str(fn)))
        out[path] = new if inner is node else dataclasses.replace(node, inner=new)
    return out


def _has_residual_mark(node) -> bool:
    """Whether ``node`` (a site's node, unstacked) records the residual init its update is of (LoRA's ``residual``)."""
    return dataclasses.is_dataclass(node) and "residual" in {f.name for f in dataclasses.fields(node)}


def recorded_plain_sites(adapter: Mapping[str, Any]) -> list:
    """Paths of the sites whose update is of the original weights (``residual`` ``None``) in an
    adapter whose other sites are relative to a residual base: a PEFT PiSSA/OLoRA file's embedding
    (PEFT's Embedding layer has no residual init and starts plain). What the writers
    (:func:`jpeft.save_adapter`, the checkpoint manager) save beside the arrays, since a loader's
    template, built from the config's one init, marks every site with it."""
    inner = {p: getattr(n, "unstacked", n) for p, n in adapter.items()}
    marked = {p: n for p, n in inner.items() if _has_residual_mark(n)}
    if all(n.residual is None for n in marked.values()):
        return []
    return sorted(p for p, n in marked.items() if n.residual is None)


def with_plain_sites(adapter: Mapping[str, Any], paths, where: str) -> dict:
    """``adapter`` (a loader's template) with the sites of ``paths`` (:func:`recorded_plain_sites`)
    unmarked: their update is of the original weights."""
    out = dict(adapter)
    for path in paths:
        node = out.get(path)
        inner = getattr(node, "unstacked", node)
        if not _has_residual_mark(inner):
            raise CheckpointError(f"{where}: 'plain_sites' names {path!r}, which is not a site with a residual mark of "
                                  "this adapter's config; the metadata does not belong to these arrays.")
        new = dataclasses.replace(inner, residual=None)
        out[path] = new if inner is node else dataclasses.replace(node, inner=new)
    return out


def check_reads_outside(adapter: Mapping[str, Any], infos: Optional[Mapping[str, ModuleInfo]]) -> None:
    """Raises :class:`~jpeft.errors.UnsupportedModuleError` for a site whose node folds into its
    module's params (``mergeable``) where the traced model (``infos``) also computes with those
    params outside the module's own calls (:attr:`ModuleInfo.read_outside`): ``jpeft.apply`` adapts
    the module's calls only, so that read sees the base params, while ``jpeft.merge`` changes the
    stored params, and so the read too: the merged model would differ from the applied one."""
    for path, node in adapter.items():
        info = (infos or {}).get(path)
        if info is None or not info.read_outside or not getattr(node, "mergeable", False):
            continue
        more = f" (and {len(info.read_outside) - 1} more)" if len(info.read_outside) > 1 else ""
        raise UnsupportedModuleError(
            f"module {path!r} ({info.cls_name}) is adapted, but the model also computes with its params outside the "
            f"module's own call: {info.read_outside[0]}{more}. jpeft adapts the module's calls only, so that read "
            "sees the base params, while jpeft.merge folds the update into the stored params and so changes the read "
            "too: the merged model would differ from the applied one. Read the params through the module's call "
            "(call the module; tie an output layer to an embedding with its attend method, as jpeft.models do), or "
            "remove this module from target_modules (modules_to_save, trainable_token_indices)."
        )


def check_input_only_embedding_merge(tied_output: Optional[bool], what: str, stacklevel: int = 3) -> None:
    """The check of :func:`check_tied_merge` for any site that changes an embedding's input
    lookup only (``what`` names it in the messages: ``"a LoRA"``, ``"a modules_to_save copy"``):
    refused when ``tied_output`` (the model also reads the embedding as its output projection),
    a warning when it is ``None`` (unknown).

    Raises:
      NotMergeableError: the embedding is the model's tied output projection.
    """
    if tied_output is None:
        warnings.warn(
            f"merging {what} into an embedding: jpeft cannot tell whether the model also reads this embedding as "
            "a tied output projection (attend), where the merged weight would act but the unmerged adapter does "
            "not. Pass the model to jpeft.init (it then refuses such a merge), or set "
            "LoraConfig(ensure_weight_tying=True) to adapt both.", UserWarning, stacklevel=stacklevel)
    if tied_output:
        raise NotMergeableError(
            f"{what} here changes the input embedding only (Hugging Face PEFT's unmerged model), but the model also "
            "reads the embedding as its tied output projection (attend): merging into the shared weight would "
            "change the output projection too, giving different logits (PEFT's merge_and_unload does exactly "
            "that). Keep the adapter unmerged, untie the output projection (give the model its own lm_head), or "
            "adapt both on purpose with LoraConfig(ensure_weight_tying=True)."
        )


class FrozenFields:
    """A pytree dataclass some of whose array fields (:attr:`frozen`) are carried along but never
    trained: :func:`split_frozen` / :func:`join_frozen` (and so ``jpeft.make_train_step``,
    :func:`trainable`, :func:`jpeft.summary`) read it. Every :class:`Site` is one; so is the
    adapter bank's trainable stack (its per-slot scales are frozen)."""

    #: names of the node's array fields that are saved and loaded with the adapter but never
    #: trained (no gradient, no optimizer state, not counted as trainable); see :func:`split_frozen`.
    frozen: ClassVar[tuple] = ()

    def split_frozen(self):
        """``(trainable, frozen)``: two copies of the node, the first with ``None`` for every
        field in :attr:`frozen`, the second with ``None`` for every other array field."""
        names = set(self.frozen)
        if not names:
            return self, None
        fields = [f.name for f in dataclasses.fields(self) if not f.metadata.get("static", False)]
        unknown = names - set(fields)
        if unknown:
            raise ConfigError(f"{type(self).__name__}.frozen names {sorted(unknown)}, which are not array fields of the node.")
        train = dataclasses.replace(self, **{n: None for n in names})
        froz = dataclasses.replace(self, **{n: None for n in fields if n not in names})
        return train, froz

    def join_frozen(self, frozen):
        """Inverse of :meth:`split_frozen` (``self`` is the trainable part)."""
        if frozen is None:
            return self
        return dataclasses.replace(self, **{n: getattr(frozen, n) for n in self.frozen})

    def keep_frozen_entries(self, before, frozen):
        """The trainable part ``self`` after an optimizer update, with the entries that ``frozen``
        (this node's frozen part) marks as never trained put back from ``before`` (the trainable
        part before the update), bit for bit. For a node some of whose trained arrays are frozen
        in part only, e.g. the adapter bank's stacked ``lora_B``, frozen in the slots that hold
        MiCA adapters: an optimizer moves an entry whatever its gradient (AdamW's weight decay,
        momentum), so the train step calls this on every node. Default: ``self``."""
        return self


class Site(FrozenFields):
    """Base class of per-site nodes: the protocol, with the defaults a node inherits."""

    site: ClassVar[str] = "linear"
    mergeable: ClassVar[bool] = False
    methods: ClassVar[tuple] = ("__call__",)
    #: True for a node whose parameters stand in for the base's own (full fine-tuning's
    #: trainable copy): :func:`jpeft.summary` then counts them once, not on top of the base
    #: (see :meth:`added_params`).
    replaces_base: ClassVar[bool] = False
    #: names of the node's array fields that transformers' ``Trainer`` leaves out of weight decay
    #: although their names say nothing of it (they are biases under PEFT's names);
    #: :func:`jpeft.train.decay_mask` reads it.
    no_decay: ClassVar[tuple] = ()
    #: the init whose residual base the node's update is relative to (``"pissa"``, ``"olora"``,
    #: ...: LoRA's ``LoraWeights.residual``), ``None`` for an update of the original weights:
    #: the params the node applies to are then not the base model's (the forgetting guard reads it).
    residual: ClassVar[Optional[str]] = None

    @property
    def unstacked(self) -> "Site":
        """The node of one layer: this node, or the node a layer scan stacks (``scan.Stacked``)."""
        return self

    def handles(self, method_name: str) -> bool:
        return method_name in self.methods

    def loss_view(self) -> tuple["Site", int]:
        """``(node, lead)`` for :func:`jpeft.lm_loss`: the node to run for the next-token loss
        and how many positions before the first real token its outputs keep (their last one's
        logits predict token 0). Default ``(self, 0)``; prompt tuning keeps its last virtual
        token, whose prediction of the first real token Hugging Face PEFT's loss counts."""
        return self, 0

    def after_update(self) -> "Site":
        """The node after an optimizer update changed its arrays (the train step calls it on
        every node). A method whose parameters must stay in a set puts them back there: OFT's
        ``coft`` projects ``oft_R`` onto its ball, which Hugging Face PEFT does in place at its
        next forward, so the next step starts from the same point. Default: the node as is."""
        return self

    def intercept(self, call: Call):  # pragma: no cover - every node class defines it
        raise TypeError(f"{type(self).__name__} is a site node without an intercept(call) method; define one.")

    def check(self, path: str, module) -> None:
        """At apply time, on the bound module: :meth:`check_params` on its parameters."""
        self.check_params(path, module.variables.get("params", {}))

    def check_params(self, path: str, module_params: Mapping[str, Any]) -> None:
        """Raise :class:`~jpeft.errors.ShapeMismatchError` if the node does not fit these params."""
        return None

    def merge(self, module_params):
        raise NotMergeableError(
            f"{type(self).__name__} adapters cannot be merged into the base weights; "
            "serve them with jpeft.apply instead."
        )

    def unmerge(self, module_params):
        return self.merge(module_params)

    def effective(self, module_params):
        """The effective weights the node contributes, as a tree of arrays (L2-SP compares
        these between the adapter and its start): the merged module params for a mergeable
        node, else the node itself. Additive methods override it with their update."""
        if self.mergeable and module_params is not None:
            return self.merge(module_params)
        return self

    def low_rank(self) -> LowRank:
        """The node's update as ``s * A @ B`` (:class:`LowRank`), for adapter merging and the
        bank; methods whose update is not of that form raise :class:`NotMergeableError`."""
        raise NotMergeableError(
            f"{type(self).__name__} is not a low-rank update s*A@B; adapter merging and the adapter bank combine "
            "LoRA adapters only. Merge it into the base alone with jpeft.merge, or serve it with jpeft.apply."
        )

    def routed_low_rank(self) -> LowRank:
        """What the adapter bank routes: :meth:`low_rank`, or for a LoRA with ``lora_bias`` (which
        PEFT's mixed-batch forward mixes like any LoRA) the same with :attr:`LowRank.bias` set, the
        update being ``s * (x @ A @ B + bias)``. Adapter merging reads :meth:`low_rank`, and this
        where that refuses a ``lora_bias`` (which it combines as PEFT >= 0.22 does)."""
        return self.low_rank()

    def partition_specs(self, module_specs):
        """The node with a ``jax.sharding.PartitionSpec`` in place of each array.
        ``module_specs`` is the base module's own spec tree (``{"kernel": P(...), ...}``) or
        ``None`` when the base has no module at the site's path. Default: replicated."""
        return jax.tree.map(lambda _: P(), self)

    def added_params(self, trainable) -> int:
        """How many parameters the node adds to the base model, for :func:`jpeft.summary`'s
        "all params" (as Hugging Face PEFT counts them); ``trainable`` is the node's trainable
        part. All of them by default, none for a node that stands in for the base's own weights
        (:attr:`replaces_base`); a node's ``base_bias`` field, the module's own bias trained in place
        (PEFT's ``bias`` option of LoRA, OFT and VeRA: ``jpeft.methods._common.with_trainable_biases``),
        is left out, as PEFT counts it."""
        if self.replaces_base:
            return 0
        n = int(sum(math.prod(x.shape) for x in jax.tree.leaves(trainable) if hasattr(x, "shape")))
        base_bias = getattr(self, "base_bias", None)
        return n - (0 if base_bias is None else math.prod(base_bias.shape))

    def load_note(self) -> Optional[str]:
        """What :func:`jpeft.load_adapter` should warn a user about a loaded node of this kind
        (LoRA factors relative to a residual base), or ``None``."""
        return None


def spec_entries(spec, ndim: int) -> list:
    """A ``PartitionSpec``'s entries padded with ``None`` to ``ndim``."""
    e = list(spec)
    return e + [None] * (ndim - len(e))


def flat_spec_entry(entries: list, axes) -> Any:
    """The spec entry of the flattened dims ``axes`` (in order) of a kernel: the major axis's
    entry when only it is sharded, else ``None`` (replicated), since other block patterns do
    not survive the flattening to the ``[in, out]`` matrix view."""
    sharded = [i for i, a in enumerate(axes) if entries[a] is not None]
    if not sharded:
        return None
    if sharded == [0]:
        return entries[axes[0]]
    return None


def kernel_spec_entries(lay: Layout, module_specs, lead: int, what: str) -> tuple[list, list]:
    """``(leading entries, kernel entries)`` of the spec of the base kernel a site adapts
    (``module_specs`` as :meth:`Site.partition_specs` gets it), for a site stacked over ``lead``
    leading (layer) axes; ``what`` names the method in the error (``"LoRA"``), which
    :func:`jpeft.parallel.adapter_specs` prefixes with the site's path.

    Raises:
      ShardingError: the base has no such kernel at the site's path.
    """
    if module_specs is None or lay.param_name not in module_specs:
        raise ShardingError(f"({what}) adapts the base leaf {lay.param_name!r}, which the params do not have at its "
                            "path; was the adapter made for another model?")
    entries = spec_entries(module_specs[lay.param_name], len(lay.kernel_shape) + lead)
    return entries[:lead], entries[lead:]


def static_field(**kw):
    return dataclasses.field(metadata=dict(static=True), **kw)


def dropout(x, rate: float, key):
    """Inverted dropout; identity when ``rate == 0`` or ``key is None``."""
    if rate <= 0.0 or key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jax.numpy.where(keep, x / (1.0 - rate), jax.numpy.zeros_like(x))


# ----------------------------------------------------------------------------------------------
# frozen adapter state: split an adapter into what is trained and what is only carried along
# ----------------------------------------------------------------------------------------------
def _is_node(x) -> bool:
    return isinstance(x, Site)


def split_frozen(adapter: Mapping[str, Any]) -> tuple[dict, dict]:
    """``(trainable, frozen)`` for an adapter ``{path: node}``. Both are adapters of the same
    paths; a node's frozen fields (its class's :attr:`Site.frozen`) are ``None`` in
    ``trainable`` and its other arrays ``None`` in ``frozen`` (a site without frozen arrays
    maps to ``None`` there). ``jax.tree.leaves(trainable)`` is exactly what training
    differentiates and what the optimizer state is built for; :func:`join_frozen` inverts it.

    >>> import jax, jax.numpy as jnp, flax.linen as nn, jpeft
    >>> params = nn.Dense(4).init(jax.random.key(0), jnp.ones((1, 3)))
    >>> a = jpeft.init(jpeft.LoraConfig(r=2, target_modules=".*"), params, jax.random.key(1))
    >>> t, f = split_frozen(a)
    >>> len(jax.tree.leaves(t)), jax.tree.leaves(f)
    (2, [])
    """
    train, froz = {}, {}
    for path, node in adapter.items():
        train[path], froz[path] = node.split_frozen() if isinstance(node, FrozenFields) else (node, None)
    return train, froz


def after_update(adapter):
    """:meth:`Site.after_update` on every node of an adapter (or of its trainable part); an
    adapter that is not a ``{path: node}`` dict is returned as it is."""
    if not isinstance(adapter, Mapping):
        return adapter
    return {p: (n.after_update() if _is_node(n) else n) for p, n in adapter.items()}


def keep_frozen_entries(new: Any, before: Any, frozen: Any):
    """:meth:`FrozenFields.keep_frozen_entries` on every node of the trainable part ``new`` of an
    adapter (``before``: that part before the optimizer update; ``frozen``: the adapter's frozen
    part, :func:`split_frozen`); anything but a ``{path: node}`` dict is returned as it is."""
    if not isinstance(new, Mapping) or not isinstance(frozen, Mapping):
        return new
    return {p: (n.keep_frozen_entries(before[p], frozen.get(p)) if isinstance(n, FrozenFields) else n)
            for p, n in new.items()}


def join_frozen(trainable: Mapping[str, Any], frozen: Mapping[str, Any]) -> dict:
    """Inverse of :func:`split_frozen`.

    >>> import jax, jax.numpy as jnp, flax.linen as nn, jpeft
    >>> params = nn.Dense(4).init(jax.random.key(0), jnp.ones((1, 3)))
    >>> vera = jpeft.init(jpeft.VeraConfig(r=2, target_modules=".*"), params, jax.random.key(1))
    >>> train, frozen = jpeft.split_frozen(vera)  # VeRA's shared projections are frozen
    >>> [x.shape for x in jax.tree.leaves(train)], [x.shape for x in jax.tree.leaves(frozen)]
    ([(2,), (4,)], [(3, 2), (2, 4)])
    >>> jax.tree.structure(jpeft.join_frozen(train, frozen)) == jax.tree.structure(vera)
    True
    """
    return {p: (n.join_frozen(frozen.get(p)) if isinstance(n, FrozenFields) else n) for p, n in trainable.items()}


def trainable(adapter: Mapping[str, Any]) -> dict:
    """The adapter without its frozen arrays: build optimizer states for this
    (``optimizer.init(jpeft.trainable(adapter))``, :func:`jpeft.init_opt_state` does it).

    >>> import jax, jax.numpy as jnp, flax.linen as nn, optax, jpeft
    >>> params = nn.Dense(4).init(jax.random.key(0), jnp.ones((1, 3)))
    >>> vera = jpeft.init(jpeft.VeraConfig(r=2, target_modules=".*"), params, jax.random.key(1))
    >>> [x.shape for x in jax.tree.leaves(jpeft.trainable(vera))]  # lambda_d, lambda_b; not vera_A, vera_B
    [(2,), (4,)]
    >>> opt_state = optax.adam(1e-3).init(jpeft.trainable(vera))
    """
    return split_frozen(adapter)[0]


# ----------------------------------------------------------------------------------------------
# the method registry: one Method record per method, registered from the method's own file
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Method:
    """Everything jpeft needs to know about a method, handed over in one
    :func:`register_method` call from the method's file.

    Args:
      config: the config class (a frozen dataclass subclassing
        :class:`jpeft.config.AdapterConfig`, with ``peft_type`` set).
      init: ``init(config, params, key, infos) -> {path: node}``; ``params`` is the bare params
        tree, ``infos`` is ``{path: ModuleInfo}`` from tracing the model (``None`` without a
        model). :func:`jpeft.init` calls it.
      nodes: the node classes the method creates (documentation, and the import-graph test's
        list of names nothing outside the method may use).
      to_hf: ``to_hf(config, adapter, ctx: ExportContext) -> (config_dict, tensors)``: the
        Hugging Face PEFT format (see :mod:`jpeft.peft_format`); ``None``: not exportable.
      from_hf: ``from_hf(config_dict, tensors, params, ctx: ImportContext) -> (config, adapter)``.
      hf_config: ``hf_config(config_dict, folder) -> config``: the config a PEFT
        ``adapter_config.json`` states, read without its weights or a base
        (:func:`jpeft.hf.peft_config`), for a method whose ``from_hf`` reads the file's fields
        other than as ``config.from_dict`` of the keys the config knows (the default, ``None``).
      hf_base: ``hf_base(config, adapter) -> None | (setting, fn)``: for a loaded PEFT adapter
        that applies to a base PEFT rebuilds on load (PiSSA/OLoRA's residual base), the
        ``setting`` that made it, in PEFT's words (``"init_lora_weights='pissa'"``, named in
        errors), and ``fn(params) -> params`` computing that base; ``None`` (the default, or the
        hook's answer): the stored base.
      hf_base_mismatch: ``hf_base_mismatch(config_dict, leaves, folder)``: called when a PEFT
        file's copies of base weights differ from the params (:func:`jpeft.hf.load_peft` then
        raises :class:`~jpeft.errors.BaseMismatchError`), to raise a more exact refusal where
        this method's settings made them differ (LoRA: PiSSA/OLoRA with ``ensure_weight_tying``
        on a tied base); ``None`` (the default, or returning): the mismatch stands.
      check_hf_keys: ``check_hf_keys(config_dict)``: checks the types and values of the
        ``adapter_config.json`` keys this method's format defines, raising
        :class:`~jpeft.errors.ConfigError` naming the key; :mod:`jpeft.hf` runs every method's
        on every file before a format reads it (another format may read the same keys).
      peft_hints: ``((peft_type, hint), ...)``: what to do instead, for PEFT adapter types
        jpeft does not read that this method covers (PEFT's ``TRAINABLE_TOKENS``: LoRA's
        ``trainable_token_indices``); the refusal ends with the hint.
      budget: ``budget(model_type, targets) -> [(name, settings, make_config), ...]``: the rows
        the budget table (``python -m jpeft.budget``, ``jpeft info``) counts for a model
        family, given :data:`jpeft.budget.FAMILY_TARGETS` ``[model_type]`` (PEFT's default
        target names and the family's linear layers); ``None``: the method has no row.
      from_low_rank: ``from_low_rank(LowRank) -> node``: builds this method's node from a
        low-rank update (adapter merging and the bank return such nodes). One method provides it.
    """

    config: type
    init: Callable[..., dict]
    nodes: tuple = ()
    to_hf: Optional[Callable] = None
    from_hf: Optional[Callable] = None
    hf_config: Optional[Callable] = None
    hf_base: Optional[Callable] = None
    hf_base_mismatch: Optional[Callable] = None
    check_hf_keys: Optional[Callable] = None
    peft_hints: tuple = ()
    budget: Optional[Callable] = None
    from_low_rank: Optional[Callable] = None

    @property
    def peft_type(self) -> str:
        return self.config.peft_type

    @property
    def name(self) -> str:
        return self.config.__name__


_METHODS: dict[type, Method] = {}


def register_method(method: Method) -> Method:
    """Registers a method (call it once, at the end of the method's file). Also registers its
    config class for :meth:`jpeft.config.AdapterConfig.from_dict` (by ``peft_type``).

    Raises:
      ConfigError: the config has no ``peft_type``, or another method already uses it.
    """
    cfg = method.config
    ptype = getattr(cfg, "peft_type", "")
    if not ptype:
        raise ConfigError(f"{cfg.__name__} has no peft_type; set the Hugging Face PEFT type name on the class.")
    for other in _METHODS.values():
        if other.peft_type == ptype and other.config is not cfg:
            raise ConfigError(
                f"{cfg.__name__} and {other.config.__name__} both use peft_type {ptype!r}; each method needs its own."
            )
    if registered_configs().get(ptype) is not cfg:
        register_config(cfg)
    _METHODS[cfg] = method
    return method


def registered_methods() -> tuple[Method, ...]:
    """Every registered method, in registration order."""
    return tuple(_METHODS.values())


def method_of(config) -> Method:
    """The :class:`Method` of a config (instance or class).

    Raises:
      ConfigError: no method is registered for it."""
    cls = config if isinstance(config, type) else type(config)
    m = _METHODS.get(cls)
    if m is None:
        raise ConfigError(
            f"no method is registered for {cls.__name__}; known: {[c.__name__ for c in _METHODS]}. A method "
            "registers itself with jpeft.methods.base.register_method(Method(...)) in its own file."
        )
    return m


FOREIGN_SITE_FIX = ("Save each method's sites with its own config; an adapter from jpeft.merging is a LoRA adapter "
                    "whatever its inputs were (VeRA, AdaLoRA): save it with a jpeft.LoraConfig of the same target_modules.")


def foreign_site(config, adapter: Mapping[str, Any]) -> Optional[str]:
    """``None`` when every site of ``adapter`` is a node ``config``'s method makes (a layer-scanned
    site by the node it stacks), else a sentence naming the first that is not (a site of another
    method, a merged LoRA adapter of VeRA inputs), for the writers' errors: a file written with
    ``config`` could not be rebuilt from it."""
    made = method_of(config).nodes
    for path in sorted(adapter):
        node = getattr(adapter[path], "unstacked", adapter[path])  # a value that is no Site: reported as it is
        if made and not isinstance(node, made):
            return (f"a {type(config).__name__} adapter (its method makes {[c.__name__ for c in made]} sites) holds a "
                    f"{type(node).__name__} at {path!r}")
    return None


def method_for_peft_type(peft_type: str) -> Optional[Method]:
    """The method whose config has this Hugging Face ``peft_type``, or ``None``."""
    return next((m for m in _METHODS.values() if m.peft_type == peft_type), None)


def check_adapter(adapter, where: str, *, low_rank_ok: bool = False, params=None) -> None:
    """Raises :class:`~jpeft.errors.ConfigError` unless ``adapter`` is an adapter, a dict
    ``{path: node}`` of site nodes (what :func:`jpeft.init` returns; ``low_rank_ok``: a
    :class:`LowRank` counts as a node). ``where`` names the call for the message; ``params``, the
    call's base params, lets it say when the two were passed the other way round."""
    if params is not None and isinstance(params, Mapping) and params and all(isinstance(v, Site) for v in params.values()):
        if not (isinstance(adapter, Mapping) and all(isinstance(v, Site) for v in adapter.values())):
            raise ConfigError(f"{where}: the params and the adapter are swapped: the params argument holds an adapter "
                              f"(sites {sorted(params)[:3]}), the adapter argument a {type(adapter).__name__}. Pass the "
                              "base params first, then the adapter.")
    if not isinstance(adapter, Mapping):
        pair = isinstance(adapter, tuple) and len(adapter) == 2 and isinstance(adapter[1], Mapping)
        raise ConfigError(
            f"{where} takes an adapter, a dict {{path: node}} as jpeft.init returns; found "
            f"{type(adapter).__name__}"
            + (" (jpeft.load_adapter and jpeft.hf.load_peft return a pair: unpack it, config, adapter = "
               "jpeft.load_adapter(...))." if pair else
               " (an AdapterBank is routed first: pass bank.route(names), one adapter name, or None for the base, "
               "per example)." if callable(getattr(adapter, "route", None)) else ".")
        )
    for path, node in adapter.items():
        if not isinstance(node, Site) and not (low_rank_ok and isinstance(node, LowRank)):
            raise ConfigError(
                f"{where}: the adapter's entry {path!r} is a {type(node).__name__}, not an adapter node (a model's "
                "params, or a dict of arrays read by hand?). Pass the adapter jpeft.init or jpeft.load_adapter returns."
            )


def low_rank_node(lr: LowRank):
    """A node of the method that builds nodes from a :class:`LowRank` update (LoRA).

    Raises:
      ConfigError: no registered method provides ``from_low_rank``."""
    m = next((m for m in _METHODS.values() if m.from_low_rank is not None), None)
    if m is None:
        raise ConfigError("no registered method builds nodes from low-rank factors (Method.from_low_rank); import jpeft.")
    return m.from_low_rank(lr)
