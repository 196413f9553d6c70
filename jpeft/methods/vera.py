"""VeRA (Kopiczko et al. 2024): vector-based random matrix adaptation, as Hugging Face PEFT 0.21
implements it (``peft/tuners/vera``).

Every adapted linear module shares one pair of frozen random projections, made once from
``projection_prng_key`` for the largest targeted input and output widths: ``vera_A: [max_in, r]``
and ``vera_B: [r, max_out]`` (JAX orientation; PEFT stores ``vera_A: [r, max_in]`` and
``vera_B: [max_out, r]``). A module with ``in`` inputs and ``out`` outputs uses the slices
``A = vera_A[:in]`` and ``B = vera_B[:, :out]`` and trains only two vectors, ``lambda_d: [r]``
and ``lambda_b: [out]``:

    y = x @ W + (((dropout(x) @ A) * lambda_d) @ B) * lambda_b

so its weight update is ``(A * lambda_d) @ (B * lambda_b)`` as ``[in, out]`` (there is no
scaling factor). At init ``lambda_d = d_initial`` and ``lambda_b = 0``: the adapter starts as
the identity.

Where the projections live: each site's node holds its own slices ``vera_A: [in, r]`` and
``vera_B: [r, out]`` as frozen arrays (:attr:`VeraWeights.frozen`: saved and loaded with the
adapter, never differentiated, no optimizer state, not counted as trainable). Nodes are
independent pytrees, so holding one pair by reference in every node would alias one buffer under
several leaves, and a training step that donates the adapter then fails ("Attempt to donate the
same buffer twice"); per-site slices also shard like the kernel they sit beside. The cost is
memory: ``r * (in + out)`` frozen numbers per site, 134,217,728 for r=256 on Llama-2-7B's q/v
projections, where PEFT holds one pair of 2,097,152. The Hugging Face PEFT file holds the pair
once (``base_model.vera_A`` / ``base_model.vera_B``): :func:`jpeft.hf.save_peft` rebuilds it from
the widest sites' slices after checking that every site's slices are its prefixes, and
:func:`jpeft.hf.load_peft` slices it per site.

A PEFT adapter saved without its projections (``save_projection=False``) holds only the seed:
PEFT regenerates the pair from ``projection_prng_key`` with torch's random generator, which JAX
cannot reproduce, so :func:`jpeft.hf.load_peft` regenerates it with torch, bit for bit as PEFT
does (:func:`peft_projections`), where torch is installed, and refuses the file by name
(:class:`~jpeft.errors.UnsupportedAdapterError`) where it is not. jpeft always exports the pair
(its own projections come from JAX's generator, which PEFT cannot regenerate).

PEFT's ``bias`` option: ``"vera_only"`` trains the base bias of every VeRA-adapted module beside
the vectors, held as :attr:`VeraWeights.base_bias` (it replaces the module's own bias: merging
writes it, unmerging is refused, and adapter merging and the adapter bank refuse the site, whose
update is then no longer ``A @ B``); ``"all"`` trains every bias of the model, the others as
bias-only :class:`~jpeft.methods._common.SavedModule` sites, as ``LoraConfig.bias`` and
``OFTConfig.bias`` do. The PEFT keys are a site's ``<module>.base_layer.bias`` and another
module's ``<module>.bias``. ``"all"`` on a base with a task head (BERT's ``classifier``) is refused
by name (jpeft would read the head's trained bias as PEFT's copy of the head), and so is a
layer-scanned base.

>>> import jax, jax.numpy as jnp, flax.linen as nn, jpeft
>>> model = nn.Dense(6); x = jnp.ones((2, 4))
>>> params = model.init(jax.random.key(0), x)
>>> adapter = jpeft.init(jpeft.VeraConfig(r=3, target_modules=".*"), params, jax.random.key(1))
>>> node = adapter[""]
>>> node.lambda_d.shape, node.lambda_b.shape, node.vera_A.shape, node.vera_B.shape
((3,), (6,), (4, 3), (3, 6))
>>> bool(jnp.array_equal(jpeft.apply(model, params, adapter, x), model.apply(params, x)))
True
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jpeft import _inject, scan
from jpeft.config import AdapterConfig
from jpeft.errors import (
    BaseMismatchError,
    CheckpointError,
    ConfigError,
    NotMergeableError,
    ShapeMismatchError,
    UnsupportedAdapterError,
)
from jpeft.methods._common import (BASE_BIAS, HEAD_MODULES, AdditiveMerge, SavedModule, TrainedBiasOption,
                                   base_bias_from_hf, branch_dtype, broadcast_bias, broadcast_out, check_dense_for_peft,
                                   down_project, from_matrix, linear_layouts, other_bias_keys, refuse_all_with_heads,
                                   trained_biases_from_hf, trained_biases_to_hf, up_project, with_trainable_biases)
from jpeft.methods.base import (Call, Kind, Layout, LowRank, Method, Site, dropout, flat_spec_entry,
                                kernel_spec_entries, register_method, static_field)
from jpeft.peft_format import config_from_peft, peft_key, site_tensors
from jpeft.tree import hf_name

@dataclasses.dataclass(frozen=True)
class VeraConfig(TrainedBiasOption, AdapterConfig):
    """Configuration of a VeRA adapter (Hugging Face PEFT's ``VeraConfig``; same key names in
    ``adapter_config.json``).

    Args:
      r: width of the shared random projections (PEFT's default 256; VeRA's vectors are so
        small that ranks far above LoRA's are usual).
      target_modules: linear modules to adapt (a regex or a list of names / path suffixes, as
        for :class:`jpeft.LoraConfig`; ``"all-linear"`` too). Dense, DenseGeneral, Conv
        and Einsum; the PEFT format holds dense sites only (PEFT adapts ``nn.Linear``). The
        default is PEFT's for Llama.
      projection_prng_key: seed (0 to 2**63 - 1) of the shared projections (JAX's generator: the
        same seed gives the same projections in jpeft, but not PEFT's, which come from torch's
        generator; that is why they are always saved).
      save_projection: must stay ``True``: the projections are written with the adapter (see
        the module docstring; a PEFT file saved with ``false`` loads with this ``True``, its
        regenerated pair then written with it).
      dropout: dropout rate on the input of the VeRA branch (PEFT's ``vera_dropout``), active
        only when :func:`jpeft.apply` gets ``rngs={"dropout": key}``.
      d_initial: the initial value of every ``lambda_d`` entry (PEFT's default 0.1).
      init_weights: ``True``: ``lambda_d = d_initial``, ``lambda_b = 0`` (the identity);
        ``False``: ``lambda_d`` standard normal and ``lambda_b = 1``, as PEFT does (tests only).
      bias: ``"none"``, ``"vera_only"`` (the base biases of the VeRA-adapted modules are trained
        too, held as ``VeraWeights.base_bias``) or ``"all"`` (every base bias of the model, the
        others as bias-only :class:`jpeft.SavedModule` sites), as PEFT's option of that name.
        ``None`` (a null) reads as ``"none"``.

    PEFT's ``modules_to_save``, ``layers_to_transform`` and ``layers_pattern`` are not
    implemented: :meth:`from_dict` refuses them by name unless they hold PEFT's defaults.

    >>> from jpeft.methods.vera import VeraConfig
    >>> c = VeraConfig(r=16, target_modules=["q_proj", "v_proj"])
    >>> VeraConfig.from_dict(c.to_dict()) == c
    True
    >>> c.to_dict()["vera_dropout"], c.to_dict()["peft_type"]
    (0.0, 'VERA')
    """

    peft_type: ClassVar[str] = "VERA"
    _hf_keys: ClassVar[Mapping[str, str]] = {"dropout": "vera_dropout"}

    r: int = 256
    target_modules: Any = ("q_proj", "v_proj")
    projection_prng_key: int = 0
    save_projection: bool = True
    dropout: float = 0.0
    d_initial: float = 0.1
    init_weights: bool = True
    bias: Optional[str] = "none"  # None: "none" (TrainedBiasOption)

    def __post_init__(self):
        self._set_targets("give a regex or names such as ['q_proj', 'v_proj']")
        self._check_bias("vera_only")  # PEFT's bias option (TrainedBiasOption)
        if isinstance(self.r, bool) or not isinstance(self.r, (int, np.integer)) or self.r <= 0:
            raise ConfigError(f"VeraConfig.r must be a positive integer, found {self.r!r}. PEFT's default is 256.")
        if isinstance(self.projection_prng_key, bool) or not isinstance(self.projection_prng_key, (int, np.integer)) \
                or not 0 <= self.projection_prng_key < 2 ** 63:
            raise ConfigError(f"VeraConfig.projection_prng_key must be an integer seed >= 0, found {self.projection_prng_key!r}.")
        if self.save_projection is not True:
            raise ConfigError(
                f"VeraConfig.save_projection must be True, found {self.save_projection!r}: jpeft makes the shared "
                "projections with JAX's random generator, which Hugging Face PEFT cannot regenerate from "
                "projection_prng_key (it uses torch's), so jpeft always saves them with the adapter."
            )
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"VeraConfig.dropout (vera_dropout) must be in [0, 1), found {self.dropout!r}.")
        if isinstance(self.d_initial, bool) or not isinstance(self.d_initial, (int, float)) or not math.isfinite(self.d_initial):
            raise ConfigError(f"VeraConfig.d_initial must be a finite number, found {self.d_initial!r} (PEFT's default: 0.1).")
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"VeraConfig.init_weights must be true or false, found {self.init_weights!r}.")

    def __hash__(self):
        return hash((self.r, self.target_modules, self.projection_prng_key, self.save_projection, self.dropout,
                     self.d_initial, self.init_weights, self.bias))


# -- the math, as small pure functions -----------------------------------------------------------

def make_projections(seed: int, r: int, max_in: int, max_out: int) -> tuple[jax.Array, jax.Array]:
    """The shared frozen pair ``(vera_A: [max_in, r], vera_B: [r, max_out])``, drawn as PEFT
    draws its ``vera_A: [r, max_in]`` and ``vera_B: [max_out, r]`` (Kaiming-uniform with gain
    ``sqrt(2)`` on PEFT's second axis: bounds ``sqrt(6 / max_in)`` and ``sqrt(6 / r)``), from
    JAX's generator seeded with all 64 bits of ``seed``."""
    # both 32-bit halves of the seed (jax.random.key alone keeps the low 32 bits without x64)
    ka, kb = jax.random.split(jax.random.fold_in(jax.random.key(seed % 2 ** 32), seed // 2 ** 32))
    ba, bb = math.sqrt(6.0 / max_in), math.sqrt(6.0 / r)
    a = jax.random.uniform(ka, (max_in, r), jnp.float32, -ba, ba)
    b = jax.random.uniform(kb, (r, max_out), jnp.float32, -bb, bb)
    return a, b


def peft_projections(seed: int, r: int, max_in: int, max_out: int, folder: str) -> tuple[np.ndarray, np.ndarray]:
    """The shared pair PEFT regenerates for an adapter saved with ``save_projection=False``, in
    PEFT's orientation (``vera_A: [r, max_in]``, ``vera_B: [max_out, r]``), bit for bit: PEFT's
    ``_init_vera_A_vera_B`` seeds a CPU ``torch.Generator`` with ``projection_prng_key`` and draws
    ``vera_A`` then ``vera_B`` with ``_kaiming_init`` (uniform, bound ``sqrt(3) * sqrt(2) /
    sqrt(fan_in)``, ``fan_in`` the tensor's second axis). JAX cannot reproduce torch's generator,
    so this needs torch (an optional dependency, imported here only).

    Raises:
      UnsupportedAdapterError: torch is not installed (the adapter in ``folder`` is named)."""
    try:
        import torch
    except ImportError:
        raise UnsupportedAdapterError(
            f"the VeRA adapter in {folder!r} was saved without its shared projections (save_projection=false): PEFT "
            "regenerates them from projection_prng_key with torch's random generator, which JAX cannot reproduce, "
            "and torch is not installed. Install torch (jpeft then regenerates them exactly as PEFT does), or "
            "re-save the adapter in PEFT with VeraConfig(save_projection=True)."
        ) from None
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    out = []
    for shape in ((r, max_in), (max_out, r)):
        bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))  # PEFT's _kaiming_init, operation for operation
        with torch.no_grad():
            out.append(torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=g).numpy())
    return out[0], out[1]


def delta_matrix(lambda_d, lambda_b, vera_A, vera_B) -> jax.Array:
    """The weight update ``(A * lambda_d) @ (B * lambda_b)`` as ``[in, out]`` (float32), from a
    site's slices ``A: [in, r]``, ``B: [r, out]``."""
    f = jnp.float32
    return (vera_A.astype(f) * lambda_d.astype(f)[None, :]) @ (vera_B.astype(f) * lambda_b.astype(f)[None, :])


def branch(x2, lambda_d, lambda_b, vera_A, vera_B) -> jax.Array:
    """The VeRA branch on 2-D inputs ``[tokens, in]``: ``((x A) * lambda_d) B * lambda_b``, in
    ``x2``'s dtype, never forming the ``[in, out]`` update."""
    dt = x2.dtype
    h = (x2 @ vera_A.astype(dt)) * lambda_d.astype(dt)[None, :]
    return (h @ vera_B.astype(dt)) * lambda_b.astype(dt)[None, :]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VeraWeights(AdditiveMerge, Site):
    """One VeRA site: trainable ``lambda_d: [r]`` and ``lambda_b: [out]``, and this site's
    slices of the shared projections, ``vera_A: [in, r]`` and ``vera_B: [r, out]``, which
    :attr:`frozen` names: they get no gradient and no optimizer state, are not counted as
    trainable, and are saved and loaded with the adapter. With ``VeraConfig.bias`` other than
    ``"none"``, ``base_bias: [out]`` is the module's trained bias, used in place of its own."""

    lambda_d: jax.Array
    lambda_b: jax.Array
    vera_A: Optional[jax.Array]
    vera_B: Optional[jax.Array]
    layout: Layout = static_field(default=None)
    dropout: float = static_field(default=0.0)
    # VeraConfig.bias: the module's trained base bias [out], used in place of its own (PEFT trains it in place)
    base_bias: Optional[jax.Array] = None

    site: ClassVar[str] = "linear"
    mergeable: ClassVar[bool] = True
    frozen: ClassVar[tuple] = ("vera_A", "vera_B")

    @property
    def r(self) -> int:
        return int(self.lambda_d.shape[-1])

    def check_params(self, path: str, own: Mapping[str, Any]) -> None:
        self.layout.check_params(path, own, what="VeRA adapter")
        n_in, n_out, r = self.layout.in_features, self.layout.out_features, self.r
        got = (tuple(self.vera_A.shape[-2:]), tuple(self.vera_B.shape[-2:]), tuple(self.lambda_b.shape[-1:]))
        if got != ((n_in, r), (r, n_out), (n_out,)):
            raise ShapeMismatchError(
                f"the VeRA site at {path!r} maps {n_in} -> {n_out} features with r={r}, but holds vera_A {got[0]}, "
                f"vera_B {got[1]} and lambda_b {got[2]} (needed ({n_in}, {r}), ({r}, {n_out}), ({n_out},)). Was the "
                "adapter made for another model?"
            )
        own_b = own.get("bias")
        if self.base_bias is not None and (own_b is None or tuple(self.base_bias.shape) != tuple(own_b.shape)):
            raise ShapeMismatchError(
                f"the VeRA site at {path!r} trains a base bias of shape {tuple(self.base_bias.shape)}, but the module's "
                f"bias is {None if own_b is None else tuple(own_b.shape)}. Was the adapter made for another model?"
            )

    def _factors(self):
        """``(A * lambda_d, B * lambda_b)``: the update as ``[in, r] @ [r, out]`` (float32)."""
        f = jnp.float32
        return (self.vera_A.astype(f) * self.lambda_d.astype(f)[None, :],
                self.vera_B.astype(f) * self.lambda_b.astype(f)[None, :])

    def delta_matrix(self) -> jax.Array:
        """The update ``[in, out]`` (float32); used by merge, never while training."""
        return delta_matrix(self.lambda_d, self.lambda_b, self.vera_A, self.vera_B)

    def intercept(self, call: Call):
        lay = self.layout
        _inject.check_layout(call.path, lay, call.module, call.args, call.kwargs)
        y = call.run()
        # the branch in the adapter's dtype (float32) and one rounding of the sum, as PEFT (branch_dtype)
        dt = branch_dtype(y.dtype, self.vera_A, self.vera_B, self.lambda_d, self.lambda_b)
        x = call.inputs
        x = dropout(x.astype(dt), self.dropout, call.dropout_key())
        if lay.kind == Kind.DENSE:  # the 2-D form (one contracted axis; see LoRA's note on XLA's CPU backend)
            d = branch(x.reshape(-1, x.shape[-1]), self.lambda_d, self.lambda_b, self.vera_A, self.vera_B)
            out = y.astype(dt) + d.reshape(y.shape)
        else:
            h = down_project(x, self.vera_A.astype(dt), lay, call.module)
            h = h * self.lambda_d.astype(dt).reshape((1,) * (h.ndim - 1) + (-1,))
            d = up_project(h, self.vera_B.astype(dt), lay)
            out = y.astype(dt) + d * broadcast_out(self.lambda_b.astype(dt), d.ndim, lay)
        if self.base_bias is not None:  # VeraConfig.bias: the trained base bias replaces the module's own
            own_b = call.module.variables["params"]["bias"]
            out = out + broadcast_bias((self.base_bias.astype(dt) - own_b.astype(dt)).reshape(own_b.shape), out.ndim, lay)
        return out.astype(y.dtype)

    def kernel_update(self, own=None):
        """The update in the kernel's shape (float32): what merge adds to the kernel."""
        return from_matrix(self.delta_matrix(), self.layout)

    def effective(self, own):
        """L2-SP's effective weights: the update in the kernel's shape, and with a trained base
        bias (``VeraConfig.bias``) ``{kernel name: update, "bias": the bias the layer uses}``, so
        the bias's drift is penalised too."""
        if self.base_bias is None:
            return self.kernel_update()
        return {self.layout.param_name: self.kernel_update(), "bias": self.base_bias.astype(jnp.float32)}

    def low_rank(self) -> LowRank:
        """The update ``(A * lambda_d) @ (B * lambda_b)`` as low-rank factors (scale 1), so
        adapter merging and the bank can combine VeRA adapters; a site that trains its base bias
        (``VeraConfig.bias``) is refused, since its change is not that product alone.

        Raises:
          NotMergeableError: the site trains its base bias."""
        if self.base_bias is not None:
            raise NotMergeableError(
                "this VeRA site trains the module's base bias too (VeraConfig.bias), which replaces the module's own; "
                "adapter merging and the adapter bank combine the updates (A * lambda_d) @ (B * lambda_b) only and "
                "would drop it. Merge it into the base alone with jpeft.merge, or serve it with jpeft.apply."
            )
        a, b = self._factors()
        return LowRank(a, b, 1.0, self.layout, None, False, float(self.dropout))

    def partition_specs(self, module_specs):
        """Like LoRA's factors: ``vera_A [in, r]`` takes the kernel's input-dimension entry,
        ``vera_B [r, out]`` and ``lambda_b [out]`` its output entry; ``lambda_d`` is replicated."""
        lay = self.layout
        lead = self.lambda_d.ndim - 1  # stacked (scanned) sites carry leading layer axes
        lead_e, kern_e = kernel_spec_entries(lay, module_specs, lead, "VeRA")
        a_in, b_out = flat_spec_entry(kern_e, lay.in_axes), flat_spec_entry(kern_e, lay.out_axes)
        return dataclasses.replace(
            self, lambda_d=P(*lead_e, None), lambda_b=P(*lead_e, b_out),
            vera_A=None if self.vera_A is None else P(*lead_e, a_in, None),
            vera_B=None if self.vera_B is None else P(*lead_e, None, b_out),
            base_bias=None if self.base_bias is None else P())


def init(config: VeraConfig, params, key, infos) -> dict:
    """Creates the shared projections and the two vectors of every targeted linear module."""
    leaves, layouts = linear_layouts(config.target_modules, params, infos, "VeRA adapts linear modules (Dense, "
                                     "DenseGeneral, Conv, Einsum), as Hugging Face PEFT adapts nn.Linear only")
    max_in = max(lay.in_features for lay in layouts.values())
    max_out = max(lay.out_features for lay in layouts.values())
    full_a, full_b = make_projections(int(config.projection_prng_key), int(config.r), max_in, max_out)
    r = int(config.r)
    out = {}
    for k, (path, lay) in zip(jax.random.split(key, len(layouts)), layouts.items()):
        def make(k, own, lay=lay):
            if config.init_weights:
                d = jnp.full((r,), config.d_initial, jnp.float32)
                b = jnp.zeros((lay.out_features,), jnp.float32)
            else:
                d = jax.random.normal(k, (r,), jnp.float32)
                b = jnp.ones((lay.out_features,), jnp.float32)
            # copies: a slice covering the whole pair would otherwise be the same buffer at several sites,
            # which a step donating the adapter refuses ("donate the same buffer twice")
            a = jnp.array(full_a[:lay.in_features], copy=True)
            b_proj = jnp.array(full_b[:, :lay.out_features], copy=True)
            return VeraWeights(d, b, a, b_proj, lay, float(config.dropout))

        out[path] = scan.make_site(make, path, lay, k, leaves[path])
    if config.bias != "none":
        refuse_all_with_heads(config.bias, leaves, ConfigError, "VeraConfig(bias='all')", "vera_only")
        out = with_trainable_biases(config.bias, "VeraConfig.bias", leaves, out)
    return out


# -- Hugging Face PEFT format ------------------------------------------------------------------
# Per site: ``<prefix><module>.vera_lambda_b: [out]`` and ``.vera_lambda_d: [r]`` (and with
# ``bias`` its trained ``.base_layer.bias``); once per adapter: ``base_model.vera_A: [r, max_in]``
# and ``base_model.vera_B: [max_out, r]``, where the maxima run over the targeted modules (PEFT
# checks these shapes when it loads); with ``bias="all"`` every other trained ``<module>.bias``.

PEFT_A, PEFT_B = "base_model.vera_A", "base_model.vera_B"
_SITE_TENSORS = ("vera_lambda_b", "vera_lambda_d")


def projections_to_peft(vera_A, vera_B) -> dict:
    """The shared pair (jpeft's ``[max_in, r]``, ``[r, max_out]``) in PEFT's keys and orientation."""
    return {PEFT_A: np.ascontiguousarray(np.asarray(vera_A, np.float32).T),
            PEFT_B: np.ascontiguousarray(np.asarray(vera_B, np.float32).T)}


def shared_pair(slices_a, slices_b) -> tuple[np.ndarray, np.ndarray]:
    """The shared ``(vera_A [max_in, r], vera_B [r, max_out])`` from the sites' slices (the widest
    ones), or ``None`` when some site's slice is not a prefix of them (sites of different
    ``jpeft.init`` calls)."""
    a = max(slices_a, key=lambda x: x.shape[0])
    b = max(slices_b, key=lambda x: x.shape[1])
    ok = all(x.shape[1] == a.shape[1] and np.array_equal(x, a[:x.shape[0]]) for x in slices_a) and \
        all(x.shape[0] == b.shape[0] and np.array_equal(x, b[:, :x.shape[1]]) for x in slices_b)
    return (a, b) if ok else None


def _to_hf(config: VeraConfig, adapter, ctx):
    tensors, targets, slices_a, slices_b = {}, [], [], []
    for path in sorted(adapter):
        node = adapter[path]
        tensors.update(trained_biases_to_hf(path, node, config.bias, "VeraConfig.bias"))
        if isinstance(node, SavedModule):  # bias="all": the trained bias of a module without a site
            continue
        check_dense_for_peft(path, node.layout, "VeRA")
        slices_a.append(np.asarray(node.vera_A, np.float32))
        slices_b.append(np.asarray(node.vera_B, np.float32))
        tensors[peft_key(path, "vera_lambda_b")] = np.asarray(node.lambda_b, np.float32)
        tensors[peft_key(path, "vera_lambda_d")] = np.asarray(node.lambda_d, np.float32)
        targets.append(hf_name(path))
    pair = shared_pair(slices_a, slices_b)
    if pair is None:
        raise UnsupportedAdapterError(
            "the VeRA sites hold slices of different projections (not prefixes of one shared pair); the Hugging Face "
            "PEFT format stores one shared pair per adapter. Save adapters made by different jpeft.init calls "
            "(different projection_prng_key) separately."
        )
    tensors.update(projections_to_peft(*pair))
    d = {
        "r": int(config.r),
        "target_modules": targets,
        "projection_prng_key": int(config.projection_prng_key),
        "save_projection": True,
        "vera_dropout": float(config.dropout),
        "d_initial": float(config.d_initial),
        "init_weights": bool(config.init_weights),
        "fan_in_fan_out": ctx.fan_in_fan_out,
        "bias": config.bias,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    return d, tensors


def _from_hf(d, tensors, params, ctx):
    folder = ctx.folder
    # PEFT regenerates the pair from the seed (and ignores any pair in the file)
    regenerate = d.get("save_projection") is False
    if not regenerate and (PEFT_A not in tensors or PEFT_B not in tensors):
        raise CheckpointError(
            f"the VeRA adapter in {folder!r} says save_projection={d.get('save_projection')!r}, but its file lacks the "
            f"shared projections ({[k for k in (PEFT_A, PEFT_B) if k not in tensors]}); the file is incomplete. "
            "Save it again."
        )
    kept = dict(d)
    kept["save_projection"] = True  # the pair is in the adapter now: jpeft writes it with the adapter
    if set(kept.get("modules_to_save") or ()) <= set(HEAD_MODULES):  # a task head's copy: checked by jpeft.hf
        kept["modules_to_save"] = None
    if kept.get("target_modules") is None:
        raise UnsupportedAdapterError(f"the VeRA adapter in {folder!r} has target_modules=null; set it explicitly.")
    config = config_from_peft(VeraConfig, kept, folder)
    refuse_all_with_heads(config.bias, ctx.leaves, UnsupportedAdapterError, f"the VeRA adapter in {folder!r} (bias='all')",
                          "vera_only")
    biases = other_bias_keys(tensors, config.bias, ctx.leaves)  # bias="all": <module>.bias of modules without a site
    by_site = site_tensors(tensors, _SITE_TENSORS + (BASE_BIAS,), ctx.leaves, config.target_modules,
                           skip=(PEFT_A, PEFT_B) + tuple(biases))
    r = int(config.r)
    layouts = {p: _inject.infer_layout(p, ctx.leaves[p]) for p in sorted(by_site)}
    # PEFT's _find_dim: the largest input and output widths of the targeted modules (the sites of the file)
    max_in = max(lay.in_features for lay in layouts.values())
    max_out = max(lay.out_features for lay in layouts.values())
    if regenerate:
        a, b = peft_projections(config.projection_prng_key, r, max_in, max_out, folder)
    else:
        a, b = tensors[PEFT_A], tensors[PEFT_B]
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != r or b.shape[1] != r or a.shape[1] < max_in or b.shape[0] < max_out:
        raise BaseMismatchError(
            f"the VeRA adapter in {folder!r} has projections vera_A {tuple(a.shape)} and vera_B {tuple(b.shape)}; "
            f"r={r} and the targeted modules (up to {max_in} inputs, {max_out} outputs) need vera_A ({r}, >= {max_in}) "
            f"and vera_B (>= {max_out}, {r}). Was it saved for another model?"
        )
    full_a, full_b = np.asarray(a, np.float32).T, np.asarray(b, np.float32).T  # [max_in, r], [r, max_out]
    adapter = {}
    for path, lay in layouts.items():
        t = by_site[path]
        missing = [n for n in _SITE_TENSORS if n not in t]
        if missing:
            raise CheckpointError(f"VeRA site {hf_name(path)!r} in {folder!r} lacks {missing}; the file is incomplete.")
        want = {"vera_lambda_b": (lay.out_features,), "vera_lambda_d": (r,)}
        for n, shape in want.items():
            if tuple(t[n].shape) != shape:
                raise BaseMismatchError(
                    f"VeRA site {hf_name(path)!r}: {n} has shape {tuple(t[n].shape)}, expected {shape} for r={r} on a "
                    f"module mapping {lay.in_features} -> {lay.out_features} features."
                )
        adapter[path] = VeraWeights(jnp.asarray(t["vera_lambda_d"], ctx.dtype), jnp.asarray(t["vera_lambda_b"], ctx.dtype),
                                    jnp.array(full_a[:lay.in_features], ctx.dtype, copy=True),
                                    jnp.array(full_b[:, :lay.out_features], ctx.dtype, copy=True), lay, float(config.dropout),
                                    base_bias_from_hf(t, config.bias, ctx.leaves[path], path, folder, ctx.dtype))
    for k, path in biases.items():
        if path in adapter:
            raise CheckpointError(f"the VeRA adapter in {folder!r} has {k!r}, the bias of a VeRA site, which PEFT "
                                  f"saves as {BASE_BIAS}; the file is not PEFT's.")
    adapter.update(trained_biases_from_hf({path: tensors[k] for k, path in biases.items()}, config.bias, ctx.leaves,
                                          ctx.dtype, adapter))
    return config, adapter


def budget_rows(model_type: str, targets):
    """``Method.budget``: VeRA with PEFT's default rank on PEFT's default targets (LoRA's)."""
    t = targets["lora"]
    return [("VeRA", f"r=256, {t if isinstance(t, str) else '+'.join(t)}", lambda: VeraConfig(r=256, target_modules=t))]


VERA = register_method(Method(config=VeraConfig, init=init, nodes=(VeraWeights, SavedModule), to_hf=_to_hf,
                              from_hf=_from_hf, budget=budget_rows))
