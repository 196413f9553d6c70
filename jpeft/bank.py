"""Many LoRA adapters on one frozen base: a fixed-capacity bank, per-example routing, hot swap.

An :class:`AdapterBank` stacks up to ``capacity`` LoRA adapters (possibly of different ranks)
site by site: at every adapted module path it holds ``lora_A: [N, in, R]``,
``lora_B: [N, R, out]`` and ``scales: [N]``, where ``N`` is the capacity and ``R`` the bank's
maximum rank. An adapter of rank ``r < R`` is stored zero-padded (columns ``r:`` of ``A`` and
rows ``r:`` of ``B`` are zero), which leaves its update ``s * A @ B`` unchanged. Each adapter
keeps its own scale (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA), per site.

Adding, replacing and removing adapters by name changes array *contents* only, never shapes:
the bank is an immutable value (every method returns a new bank), and a jitted function that
takes ``bank.route(adapter_ids)`` keeps its compiled program for as long as the capacity and
maximum rank stay the same, so an adapter can be swapped in a live server without recompiling.

Routing. ``bank.route(adapter_ids)`` returns an ordinary adapter dict ``{path: BankedLora}``
that :func:`jpeft.apply` (and everything built on it) accepts. ``adapter_ids[i]`` is the bank
slot of example ``i`` (``bank.ids(names)`` converts names), ``-1`` runs that example on the bare
base. Each :class:`BankedLora` site computes, for every example at once,
``y[i] = x[i] @ W + s[id_i] * (x[i] @ A[id_i]) @ B[id_i]``.

LoRA biases, trainable tokens, module copies. A LoRA with ``lora_bias`` (PEFT's
``lora_bias=True``) adds ``s * lora_bias`` of its own adapter to each row, trainable tokens
(``trainable_token_indices``) replace each row's lookup of its adapter's token ids with that
adapter's rows, and a ``modules_to_save`` copy of an ``nn.Dense`` or ``nn.Embed`` runs the module
with the row's own copy, as PEFT's mixed-batch forward does (nodes give them through
``Site.routed_low_rank``). The bank holds biases and copies at the sites where an adapter it was
built from has one (biases at every linear site with ``create(..., lora_bias=True)``) and
``max_tokens`` token rows per slot at every embedding; an adapter that needs more is refused by name.
Tokens of an embedding the model also reads as its tied output layer act in its ``attend`` too
(each row's logits of its adapter's token ids), as PEFT's do in the tied ``lm_head``.

**The batch axis must be the leading axis of every adapted module's input**: a module input of
shape ``[batch, seq, ..., features]`` is routed by its first axis (all its tokens use the same
adapter). A model that folds batch and sequence into one axis before a projection cannot be
routed per example; such an input is refused with :class:`~jpeft.errors.InputValidationError`.

Two implementations of the routed update (``strategy``):

* ``"gather"`` (the default): gathers each example's ``A`` and ``B`` (``[batch, in, R]``) and runs
  two batched matmuls. Cost grows with the batch, not with the number of distinct adapters.
* ``"ragged"``: sorts the examples by adapter and runs two grouped matmuls with
  :func:`jax.lax.ragged_dot` over all ``N`` slots.
* ``"pregather"``: ``route`` gathers each example's factors once, so the routed nodes hold
  ``[batch, in, R]`` / ``[batch, R, out]`` and every module call does only the two batched
  matmuls. Saves the per-call gather where one routing is reused many times (the decoding
  steps of :func:`jpeft.generate`), at the price of keeping ``batch x adapter size`` gathered
  factors alive for as long as the routed dict lives.

All give the same numbers; ``"gather"`` is the default because it measured faster than
``"ragged"`` on the machines we could measure (see docs/BENCHMARKS.md, "Multi-adapter serving
(issue 8)": XLA's CPU backend lowers ``ragged_dot`` to one dense matmul per group) and needs no
memory beyond one site's gathered factors at a time; ``"pregather"`` measured about 15% faster
than ``"gather"`` in greedy generation.

Training several adapters at once: differentiate the stacked weights ``bank.weights``
(``{path: LoraStack}``; float arrays only) and route inside the loss::

    def loss_fn(params, weights, batch, key):
        routed = bank.route(batch["adapter_ids"], weights=weights)
        logits = jpeft.apply(model, params, routed, batch["x"])
        ...
    opt = optax.adam(1e-3)
    step = jpeft.make_train_step(loss_fn, opt)
    weights, opt_state, metrics = step(params, bank.weights, jpeft.init_opt_state(opt, bank.weights), batch, key)
    bank = bank.with_weights(weights)

Each example's loss reaches only its own adapter's slot (gradients of other slots are exactly
zero), and the zero padding of lower-rank adapters stays exactly zero under gradient descent.
A MiCA adapter's slot trains ``lora_A`` only, as the adapter alone does: its ``lora_B`` (frozen
in the adapter, ``LoraWeights.frozen_b``) is marked in each stack's frozen ``b_frozen [N]``,
:func:`route` lets no gradient reach it, and the train step puts it back bit for bit after the
optimizer's update (:meth:`LoraStack.keep_frozen_entries`; AdamW's weight decay moves an entry
whose gradient is zero), so :meth:`AdapterBank.get` gives it back as MiCA. The mask costs
``capacity`` floats per site, not a copy of B. An optimizer applied to ``bank.weights`` by hand
(outside jpeft's train steps) can still move it: ``get`` then gives a plain LoRA, with a warning.
``make_train_step`` donates its adapter argument, so after a step use
``bank.with_weights(new_weights)``, not the old bank (whose entry points then raise
:class:`~jpeft.errors.BankError` saying so).

Scales travel with the weights. Each :class:`LoraStack` carries its slots' scales as a *frozen*
field (:class:`jpeft.methods.base.FrozenFields`): ``make_train_step`` splits it off before
differentiating and joins it back unchanged, so no optimizer (AdamW's weight decay included)
ever sees it, and :func:`route` applies ``stop_gradient`` to it besides. Because the scales are
values of the weights passed in, not of the bank object, a compiled step or forward never keeps
old scales: after ``bank = bank.with_weights(w).add(name, adapter)`` the same compiled step,
given ``bank.weights``, routes the new adapter with its own scale (no recompilation; the
optimizer state still fits, and the new slot's moments are zero since it had no gradient).
This was chosen over passing scales as a separate argument (``route(ids, weights=w,
scales=s)``), which every user of the documented ``loss_fn(params, weights, batch, key)`` would
have had to thread through the step, and over making the bank a pytree (its names would enter
jit's cache key). :meth:`AdapterBank.route` refuses to run inside a trace on weights that are
not traced values (the bank's own, captured from the enclosing scope), the one way left to bake
factors and scales into a compiled program, and :meth:`AdapterBank.with_weights` refuses weights
taken before an ``add`` / ``replace`` / ``remove`` (each stack also carries, frozen, the number of
the edit that last wrote each slot: a ``replace`` by an adapter of the same scale would
otherwise let old factors back in) and weights whose scales are not the bank's (changed by an
optimizer). Build the
optimizer state with ``jpeft.init_opt_state(optimizer, bank.weights)`` (that is
``optimizer.init(jpeft.trainable(bank.weights))``).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, ClassVar, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import _inject, scan
from jpeft.core import merge
from jpeft.errors import (
    BankCapacityError,
    BankError,
    BankRankError,
    BankShapeError,
    ConfigError,
    DuplicateAdapterError,
    InputValidationError,
    NotMergeableError,
    UnknownAdapterError,
    UnsupportedModuleError,
)
from jpeft.methods._common import branch_dtype
from jpeft.methods.base import (Call, FrozenFields, Kind, Layout, LowRank, Site, dropout as _dropout, low_rank_node,
                               residual_refusal, static_field)
from jpeft.tree import module_leaves, nnx_state_of, unwrap_params

STRATEGIES = ("gather", "ragged", "pregather")
#: The routed-update implementation used unless ``strategy=`` says otherwise (measured; see the
#: module docstring).
DEFAULT_STRATEGY = "gather"
#: The name PEFT's ``adapter_names`` gives the rows that use no adapter; :meth:`AdapterBank.ids`
#: reads it as ``None`` (the bare base), and no adapter may be stored under it.
BASE_NAME = "__base__"

_KINDS = (Kind.DENSE, Kind.DENSE_GENERAL, Kind.EMBED)


# ----------------------------------------------------------------------------------------------
# pytree nodes
# ----------------------------------------------------------------------------------------------
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraStack(FrozenFields):
    """The stack of one site: ``lora_A: [N, in, R]``, ``lora_B: [N, R, out]`` (trained),
    ``scales: [N]`` (each slot's scale) and ``edits: [N]`` (the number of the bank edit that
    last wrote each slot, float32 so that ``jax.grad`` over the stack still works). Scales and
    edits are frozen fields (see the module docstring): they travel with the factors into a
    jitted function, so the compiled program never keeps old scales, :func:`jpeft.make_train_step`
    never trains them, and :meth:`AdapterBank.with_weights` tells weights taken before an
    ``add`` / ``replace`` / ``remove`` by their edits, even where the scales did not change.
    A site of a bank that holds LoRA biases (PEFT's ``lora_bias``) has ``lora_bias: [N, out]``
    (trained) and ``bias_on: [N]`` (frozen: 1 for the slots whose adapter has a bias there);
    an embedding site of a bank that holds trainable tokens (PEFT's ``trainable_token_indices``)
    has ``token_values: [N, K, d]`` (trained) and ``token_ids: [N, K]`` (frozen, float32, ``-1``
    past each slot's own ids); a site holding ``modules_to_save`` copies (of an ``nn.Dense`` or
    ``nn.Embed``) has ``saved: {param name: [N, ...]}`` (trained) and ``saved_on: [N]`` (frozen: 1
    for the slots whose adapter has a copy there); elsewhere these are ``None``. Every stack has
    ``b_frozen: [N]`` (frozen: 1 for the slots whose adapter's ``lora_B`` is frozen there, MiCA's):
    :func:`route` gives those slots' ``lora_B`` no gradient and :func:`jpeft.make_train_step` (every
    jpeft step) keeps them bit for bit (:meth:`keep_frozen_entries`), so they train ``lora_A`` only."""

    lora_A: jax.Array
    lora_B: jax.Array
    scales: jax.Array
    edits: jax.Array
    layout: Layout = static_field(default=None)
    # the sites that hold LoRA biases (PEFT's lora_bias): ``[N, out]`` (trained) and ``bias_on: [N]``
    # (frozen; 1 where the slot's adapter has a bias here, so no other slot's bias ever trains)
    lora_bias: Optional[jax.Array] = None
    bias_on: Optional[jax.Array] = None
    # the embedding sites that hold trainable tokens: ``token_values: [N, K, d]`` (trained) and
    # ``token_ids: [N, K]`` (frozen; the ids, as float32, -1 past a slot's own tokens)
    token_values: Optional[jax.Array] = None
    token_ids: Optional[jax.Array] = None
    # the sites that hold modules_to_save copies: ``saved: {param name: [N, ...]}`` (trained) and
    # ``saved_on: [N]`` (frozen; 1 where the slot's adapter has a copy here)
    saved: Optional[dict] = None
    saved_on: Optional[jax.Array] = None
    # the tokens act in the embedding's attend too (the model's tied output layer), as PEFT ties them
    tied_tokens: bool = static_field(default=False)
    # ``[N]`` (frozen; every bank has it): 1 where the slot's lora_B is frozen (a MiCA adapter's,
    # LoraWeights.frozen_b), so no gradient reaches it (route) and no optimizer moves it (keep_frozen_entries)
    b_frozen: Optional[jax.Array] = None

    frozen: ClassVar[tuple] = ("scales", "edits", "bias_on", "token_ids", "saved_on", "b_frozen")

    def keep_frozen_entries(self, before, frozen):
        """The stack after an optimizer update with the ``lora_B`` of its MiCA slots (``b_frozen``)
        put back from ``before``, bit for bit: ``route`` gives them no gradient, but AdamW's weight
        decay (or momentum left from the slot's former adapter) would still move them."""
        on = None if frozen is None else frozen.b_frozen
        if on is None or self.lora_B is None:
            return self
        return dataclasses.replace(self, lora_B=jnp.where((on > 0)[:, None, None], before.lora_B, self.lora_B))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BankedLora(Site):
    """A routed LoRA site: every example of the batch gets its own adapter.

    Children (pytree leaves): ``lora_A [N, in, R]``, ``lora_B [N, R, out]``, ``scales [N]`` and
    ``adapter_ids [batch]`` (int; ``-1`` or an empty slot means the bare base, an id outside
    ``[-1, N)`` gives the row NaN outputs), and where the bank
    holds LoRA biases ``lora_bias [N, out]`` and ``bias_on [N]`` (row ``i`` adds
    ``s * bias_on * lora_bias`` of its slot, as PEFT's ``lora_B`` bias), and at an embedding
    holding trainable tokens ``token_values [N, K, d]`` and ``token_ids [N, K]`` (row ``i``'s
    tokens among its slot's ids look up its slot's values, as PEFT's mixed batch does), and where
    adapters have ``modules_to_save`` copies ``saved`` and ``saved_on`` (row ``i`` runs the module
    with its slot's copy, as PEFT's mixed batch does). Static:
    ``layout``, ``dropout``, ``strategy``. Changing any array's contents never changes the
    pytree structure, so jitted callers are not recompiled. The scales and ids are frozen
    fields (never trained, not counted as trainable by :func:`jpeft.summary`).
    """

    lora_A: jax.Array
    lora_B: jax.Array
    scales: jax.Array
    adapter_ids: jax.Array
    layout: Layout = static_field(default=None)
    dropout: float = static_field(default=0.0)
    strategy: str = static_field(default=DEFAULT_STRATEGY)
    lora_bias: Optional[jax.Array] = None
    bias_on: Optional[jax.Array] = None
    token_values: Optional[jax.Array] = None
    token_ids: Optional[jax.Array] = None
    saved: Optional[dict] = None
    saved_on: Optional[jax.Array] = None
    tied_tokens: bool = static_field(default=False)

    site: ClassVar[str] = "linear"
    mergeable: ClassVar[bool] = False
    frozen: ClassVar[tuple] = ("scales", "adapter_ids", "bias_on", "token_ids", "saved_on")

    def handles(self, method_name: str) -> bool:
        # an embedding LoRA adapts the lookup only, as a LoRA site does without ensure_weight_tying; trainable
        # tokens of a tied embedding act in its attend (the tied output layer) too
        return method_name == "__call__" or (method_name == "attend" and self.tied_tokens)

    def check(self, path: str, module) -> None:
        own = module.variables.get("params", {})
        pname = self.layout.param_name
        if pname not in own:
            raise BankShapeError(f"bank site {path!r} expects a {pname!r} parameter; the module has {sorted(own)}.")
        got = tuple(own[pname].shape)
        if got != tuple(self.layout.kernel_shape):
            raise BankShapeError(
                f"the adapter bank was built for a base whose {pname} at {path!r} has shape "
                f"{tuple(self.layout.kernel_shape)}, but the params hold shape {got}. The bank belongs to another base "
                "model; build a bank for this one."
            )

    def merge(self, module_params):
        raise NotMergeableError(
            "a routed bank (one adapter per example) cannot be merged into the base weights; merge a single "
            "adapter with bank.merged_params(params, name), or several with jpeft.merging.merge_into_base."
        )

    # -- forward --------------------------------------------------------------------------------
    def intercept(self, call: Call):
        if call.method_name == "attend":  # the tied output layer: only the token rows act there
            return self._attend_tokens(call, call.run())
        y = self._low_rank_rows(call)
        return y if self.saved is None else self._saved_rows(call, y)

    def _row_tokens(self):
        """``(ids [batch, K], values [batch, K, d])``: each row's slot's tokens (ids ``-1``: none)."""
        ids, values = self.token_ids, self.token_values
        if self.strategy == "pregather":
            return ids, values
        n = ids.shape[0]
        valid = (self.adapter_ids >= 0) & (self.adapter_ids < n)
        safe = jnp.where(valid, self.adapter_ids, 0)
        return jnp.where(valid[:, None], jnp.take(ids, safe, axis=0), -1.0), jnp.take(values, safe, axis=0)

    def _attend_tokens(self, call: Call, y):
        """``y`` (the logits ``[batch, ..., V]`` of ``attend``) with each row's columns of its
        tokens computed with its adapter's rows, as PEFT's tied output layer does."""
        h = call.args[0] if call.args else call.kwargs.get("query")
        if h.shape[0] == 0:
            return y
        ids, values = self._row_tokens()
        dt = y.dtype
        cols = jnp.einsum("bsd,bkd->bsk", h.reshape((h.shape[0], -1, h.shape[-1])).astype(dt), values.astype(dt))
        onehot = (jnp.arange(y.shape[-1])[None, None, :] == ids.astype(jnp.int32)[:, :, None]).astype(dt)  # [b, K, V]
        new = jnp.einsum("bsk,bkv->bsv", cols, onehot).reshape(y.shape)
        hit = (onehot.sum(1) > 0).reshape((y.shape[0],) + (1,) * (y.ndim - 2) + (y.shape[-1],))
        return jnp.where(hit, new, y)

    def _saved_rows(self, call: Call, y):
        """``y`` with the rows whose slot holds a ``modules_to_save`` copy here replaced by the
        module's output with that copy (each row runs the module on its own params)."""
        x = call.args[0] if call.args else call.kwargs.get("inputs")
        if x.shape[0] == 0:
            return y
        ids, on = self.adapter_ids, self.saved_on
        if self.strategy != "pregather":
            valid = (ids >= 0) & (ids < on.shape[0])
            safe = jnp.where(valid, ids, 0)
            on = jnp.where(valid, jnp.take(on, safe, axis=0), jnp.zeros((), on.dtype))
        mod = call.module
        rest = {k: v for k, v in mod.variables.items() if k != "params"}
        own = dict(mod.variables.get("params", {}))
        kwargs = {k: v for k, v in call.kwargs.items() if k != "inputs"}

        def one(p, xi):
            params = {**own, **{k: v.astype(own[k].dtype) for k, v in p.items()}}
            with _inject.bypass():
                out = mod.clone(parent=None).apply({**rest, "params": params}, xi[None], *call.args[1:],
                                                   method=call.method_name, **kwargs)
            return out[0]

        if self.strategy == "pregather":  # the rows' copies are already gathered (see route)
            ys = jax.vmap(one)(self.saved, x)
        else:  # one row at a time, indexing its slot's copy: never ``batch`` copies at once
            # (for lm_head a gather would hold batch x vocab x hidden weights)
            ys = jax.lax.map(lambda a: one({k: v[a[0]] for k, v in self.saved.items()}, a[1]), (safe, x))
        ys = ys.astype(y.dtype)
        return jnp.where((on > 0).reshape((-1,) + (1,) * (y.ndim - 1)), ys, y)

    def _low_rank_rows(self, call: Call):
        lay = self.layout
        if lay.kind != Kind.EMBED:
            _inject.check_layout(call.path, lay, call.module, call.args, call.kwargs)
        y = call.run()
        x = call.inputs
        ids = self.adapter_ids
        nb = ids.shape[0]
        if x.ndim == 0 or x.shape[0] != nb:
            raise InputValidationError(
                f"module {call.path!r}: adapter_ids has {nb} entries (one per example) but the module input has "
                f"shape {tuple(x.shape)}; AdapterBank routes by the leading (batch) axis of each adapted module's "
                "input. Pass one adapter id per example, and keep the batch axis first (do not fold batch and "
                "sequence into one axis before an adapted projection)."
            )
        if nb == 0:  # an empty batch: nothing to route (the reshapes below cannot infer a size from 0 rows)
            return y
        # the branch in the adapters' dtype (float32) and one rounding of the sum, as jpeft.apply of each
        dt = branch_dtype(y.dtype, self.lora_A, self.lora_B)
        if self.strategy == "pregather":  # factors already one per row (see route)
            valid, safe, s = None, None, self.scales.astype(dt)
        else:  # NaN for a row routed outside [-1, N): it carries into that row's update (see _row_scales)
            valid, safe, s = _row_scales(self.scales, ids)
            s = s.astype(dt)  # [batch]
        if lay.kind == Kind.EMBED:
            y = (y.astype(dt) + self._embed(call, x, safe, s, dt)).astype(y.dtype)
            return y if self.token_ids is None else _token_rows(x, y, *self._row_tokens())
        n_in = len(lay.in_axes)
        if lay.kind == Kind.DENSE_GENERAL:
            axes = _inject.normalize_axes(call.module.axis, x.ndim)
            if axes != tuple(range(x.ndim - n_in, x.ndim)):
                raise UnsupportedModuleError(
                    f"module {call.path!r}: nn.DenseGeneral contracts input axes {axes} of a {x.ndim}-D input; "
                    "AdapterBank routes modules whose contracted axes are the trailing ones. Exclude this module."
                )
        lead = x.shape[: x.ndim - n_in]
        if len(lead) == 0:
            raise InputValidationError(f"module {call.path!r}: the input {tuple(x.shape)} has no batch axis to route by.")
        x = _dropout(x.astype(dt), self.dropout, call.dropout_key())
        xf = x.reshape((nb, -1, lay.in_features))  # [batch, tokens, in]
        if self.strategy == "ragged":
            d = _ragged_update(xf, self.lora_A.astype(dt), self.lora_B.astype(dt), ids, valid, s)
        else:
            d = _gather_update(xf, self.lora_A.astype(dt), self.lora_B.astype(dt), safe, s)
        if self.lora_bias is not None:  # s * lora_bias of each row's slot (0 for the base, empty slots, no bias)
            bias = self.lora_bias if safe is None else jnp.take(self.lora_bias, safe, axis=0)  # [batch, out]
            on = self.bias_on if safe is None else jnp.take(self.bias_on, safe, axis=0)
            d = d + (bias.astype(dt) * (s * on.astype(dt))[:, None])[:, None, :]
        return (y.astype(dt) + d.reshape(tuple(lead) + tuple(lay.out_dims))).astype(y.dtype)

    def _embed(self, call, x, safe, s, dt):
        a = self.lora_A.astype(dt)  # [N, V, R]
        b = self.lora_B.astype(dt)  # [N, R, d]
        nb = s.shape[0]
        pre = safe is None  # pregathered: row i's factors are at index i
        if pre:
            safe = jnp.arange(nb)
        bg = b if pre else jnp.take(b, safe, axis=0)  # [batch, R, d]
        tok = x.reshape((nb, -1))
        slot = jnp.broadcast_to(safe[:, None], tok.shape)
        h = a[slot, tok]  # [batch, tokens, R]
        out = jnp.einsum("btr,brd->btd", h, bg) * s[:, None, None]
        return out.reshape(tuple(x.shape) + (b.shape[-1],))


def _token_rows(x, y, ids, values):
    """``y`` (the lookup ``[batch, ..., d]`` of ids ``x``) with each row's tokens among its
    ``ids [batch, K]`` (``-1``: none) replaced by its ``values [batch, K, d]``."""
    nb = x.shape[0]
    tok = x.reshape((nb, -1))
    hit = tok[:, :, None] == ids.astype(jnp.int32)[:, None, :]  # [batch, tokens, K]
    rows = jnp.einsum("btk,bkd->btd", hit.astype(y.dtype), values.astype(y.dtype))
    rows = rows.reshape(y.shape)
    return jnp.where(hit.any(-1).reshape(tuple(x.shape) + (1,)), rows, y)


def _row_scales(scales, ids):
    """``(valid, safe, s)`` for ``[batch]`` slot ids over ``[N]`` slot scales: whether each id is a
    slot, the id to gather with (0 where it is not), and each row's scale: its slot's, ``0`` for
    the bare base (``-1``; an empty slot's scale is 0 too), and NaN for an id outside ``[-1, N)``,
    which carries into that row's update and so its outputs. Traced ids cannot be refused by name
    (``route`` refuses concrete ones), and such a row ran as the bare base without a word (PEFT
    raises on an adapter name it does not hold); NaN makes the row's outputs, and a loss over
    them, non-finite instead."""
    n = scales.shape[0]
    valid = (ids >= 0) & (ids < n)
    safe = jnp.where(valid, ids, 0)
    off = jnp.where(ids == -1, jnp.zeros((), scales.dtype), jnp.full((), jnp.nan, scales.dtype))
    return valid, safe, jnp.where(valid, jnp.take(scales, safe, axis=0), off)


def _gather_update(xf, a, b, safe, s):
    """``s[i] * (x[i] @ A[id_i]) @ B[id_i]`` with gathered per-example factors (``safe=None``:
    ``a`` and ``b`` already hold one factor per row)."""
    ag = a if safe is None else jnp.take(a, safe, axis=0)  # [batch, in, R]
    bg = b if safe is None else jnp.take(b, safe, axis=0)  # [batch, R, out]
    h = jnp.einsum("bti,bir->btr", xf, ag) * s[:, None, None]
    return jnp.einsum("btr,bro->bto", h, bg)


def _ragged_update(xf, a, b, ids, valid, s):
    """The same update with the tokens sorted by adapter and two ``jax.lax.ragged_dot`` calls."""
    nb, t, n_in = xf.shape
    n = a.shape[0]
    off = (s * 0)[:, None, None]  # the rows that are no slot: 0 for the bare base, NaN outside [-1, N)
    s = jnp.where(valid, s, jnp.zeros((), s.dtype))  # so no NaN enters the grouped products
    group = jnp.where(valid, ids, n).astype(jnp.int32)  # bare-base examples sort last
    order = jnp.argsort(group, stable=True)
    inv = jnp.argsort(order)
    sizes = (jnp.bincount(group, length=n + 1)[:n] * t).astype(jnp.int32)
    xs = jnp.take(xf, order, axis=0).reshape((nb * t, n_in))
    h = jax.lax.ragged_dot(xs, a, sizes)  # [batch*tokens, R]; rows past the groups are zero
    h = h * jnp.repeat(jnp.take(s, order, axis=0), t, total_repeat_length=nb * t)[:, None]
    d = jax.lax.ragged_dot(h, b, sizes).reshape((nb, t, b.shape[-1]))
    d = jnp.take(d, inv, axis=0)
    return jnp.where(valid[:, None, None], d, off.astype(d.dtype))


@jax.custom_jvp
def _freeze_slots(b, on):
    """``b`` (a stack's ``lora_B``, ``[N, R, out]``) unchanged, with no gradient reaching the slots
    where ``on`` (``[N]``, ``b_frozen``) is 1: the identity in the forward (a serving forward pays
    nothing, not even a select), a masked tangent under ``jax.jvp`` / ``jax.grad``."""
    return b


@_freeze_slots.defjvp
def _freeze_slots_jvp(primals, tangents):
    b, on = primals
    return b, jnp.where((on > 0)[:, None, None], jnp.zeros_like(tangents[0]), tangents[0])


def _check_slots(ids, capacity: int) -> None:
    """Refuses concrete ``ids`` outside ``[-1, capacity)`` by name (traced ones cannot be read:
    there such a row's outputs are NaN, see ``_row_scales``)."""
    if isinstance(ids, jax.core.Tracer):
        return
    host = np.asarray(ids)
    bad = host[(host < -1) | (host >= capacity)]
    if bad.size:
        raise InputValidationError(
            f"adapter_ids must be bank slots in [0, {capacity}) or -1 for the bare base; found {bad.tolist()}."
        )


def route(
    weights: Mapping[str, LoraStack],
    scales: Optional[Mapping[str, jax.Array]],
    adapter_ids,
    *,
    dropout: float = 0.0,
    strategy: str = DEFAULT_STRATEGY,
) -> dict[str, BankedLora]:
    """The pure routing function behind :meth:`AdapterBank.route`: wraps stacked weights, scales
    and per-example slot ids into an adapter dict for :func:`jpeft.apply`. Usable inside
    ``jax.jit`` (nothing here depends on the values).

    Args:
      weights: ``{path: LoraStack}`` (``bank.weights``, or trained copies of it); each stack
        carries its slots' scales, and which slots' ``lora_B`` is frozen (``b_frozen``: those
        get no gradient).
      scales: ``None`` to use the stacks' own scales, or ``{path: [N] array}`` in their place
        (``bank.scales`` is the same arrays). Scales get no gradient (``stop_gradient``).
      adapter_ids: ``[batch]`` integer slot per example; ``-1`` means the bare base. Concrete
        ids outside ``[-1, N)`` raise ``InputValidationError``; traced ones (inside ``jit``) give
        those rows NaN outputs.
      dropout: LoRA dropout on the adapter branch (active only with ``rngs={"dropout": key}``).
      strategy: ``"gather"``, ``"ragged"`` or ``"pregather"`` (see the module docstring).
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy must be one of {STRATEGIES}, found {strategy!r}.")
    ids = jnp.asarray(adapter_ids)
    if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise InputValidationError(
            f"adapter_ids must be a 1-D integer array (one bank slot per example, -1 for the bare base); "
            f"found shape {tuple(ids.shape)} and dtype {ids.dtype}."
        )
    ids = ids.astype(jnp.int32)
    if weights:
        _check_slots(ids, next(iter(weights.values())).lora_A.shape[0])
    out = {}
    for path, st in weights.items():
        if scales is not None and path not in scales:
            raise BankShapeError(f"weights have a site {path!r} that scales do not have; use the bank's own scales.")
        sc = st.scales if scales is None else scales[path]
        if sc is None:
            raise BankShapeError(f"the weights at {path!r} carry no scales; pass bank.weights (or a trained copy of it).")
        a, b, sc = st.lora_A, st.lora_B, jax.lax.stop_gradient(sc)
        if st.b_frozen is not None:  # MiCA slots: lora_B gets no gradient
            b = _freeze_slots(b, jax.lax.stop_gradient(st.b_frozen))
        bias, on = st.lora_bias, None if st.bias_on is None else jax.lax.stop_gradient(st.bias_on)
        if (bias is None) != (on is None):
            raise BankShapeError(f"the weights at {path!r} carry lora_bias without bias_on or the other way round; "
                                 "pass bank.weights (or a trained copy of it).")
        tv, tid = st.token_values, None if st.token_ids is None else jax.lax.stop_gradient(st.token_ids)
        if (tv is None) != (tid is None):
            raise BankShapeError(f"the weights at {path!r} carry token_values without token_ids or the other way "
                                 "round; pass bank.weights (or a trained copy of it).")
        saved, saved_on = st.saved, None if st.saved_on is None else jax.lax.stop_gradient(st.saved_on)
        if (saved is None) != (saved_on is None):
            raise BankShapeError(f"the weights at {path!r} carry saved without saved_on or the other way round; pass "
                                 "bank.weights (or a trained copy of it).")
        if strategy == "pregather":  # gather once here, not at every call of the routed module
            valid, safe, sc = _row_scales(sc, ids)
            a, b = jnp.take(a, safe, axis=0), jnp.take(b, safe, axis=0)
            if bias is not None:
                bias, on = jnp.take(bias, safe, axis=0), jnp.take(on, safe, axis=0)
            if tv is not None:
                tv = jnp.take(tv, safe, axis=0)
                tid = jnp.where(valid[:, None], jnp.take(tid, safe, axis=0), -1.0)
            if saved is not None:
                saved = {k: jnp.take(v, safe, axis=0) for k, v in saved.items()}
                saved_on = jnp.where(valid, jnp.take(saved_on, safe, axis=0), jnp.zeros((), saved_on.dtype))
        out[path] = BankedLora(a, b, sc, ids, st.layout, float(dropout), strategy, lora_bias=bias, bias_on=on,
                               token_values=tv, token_ids=tid, saved=saved, saved_on=saved_on,
                               tied_tokens=bool(st.tied_tokens))
    return out


# ----------------------------------------------------------------------------------------------
# the bank
# ----------------------------------------------------------------------------------------------
def _staging() -> bool:
    """Whether this call runs while JAX stages a program out (``jax.jit``, ``jax.eval_shape``,
    ``make_train_step``): there every new array is a traced value, as JAX's tracing tutorial
    shows, while plain ``jax.grad`` / ``jax.vmap`` (nothing compiled) make a concrete one. JAX
    0.10 has no public function that answers this (``jax.core.trace_state_clean`` left the public
    ``jax.core``; ``jax.extend.core.get_opaque_trace_state`` also changes under ``grad`` and
    ``vmap``; the ``unsafe_am_i_under_a_jit_DO_NOT_USE`` of ``jax.extend.core`` says what it is),
    and the routed ids cannot tell: a captured concrete id array stays concrete there."""
    return isinstance(jnp.zeros((), jnp.int32), jax.core.Tracer)


def _donated(weights) -> Optional[str]:
    """``"path.field"`` of the first concrete array of ``weights`` that has been deleted (a jitted function that
    donates its arguments, as :func:`jpeft.make_train_step` does, consumed it), or ``None``. A check at the bank's
    Python entry points, on ``is_deleted()`` (no device work; traced values are passed over), so the error names
    the bank instead of JAX's bare "Array has been deleted" or "Buffer has been deleted or donated". A donation
    takes every array of the argument, so each stack's four always-present arrays are the ones looked at (30-55 us
    for 28 sites, beside 0.7-1.3 ms for the ``route`` call it guards; flattening the stacks took 90-160 us)."""
    for path, st in weights.items():
        for name in ("lora_A", "lora_B", "scales", "edits"):
            x = getattr(st, name, None)
            # a concrete jax.Array (numpy arrays and traced values have no buffer to lose)
            if not isinstance(x, jax.core.Tracer) and hasattr(x, "is_deleted") and x.is_deleted():
                return f"{path}.{name}"
    return None


def _refuse_donated(weights, own: bool) -> None:
    """Raises :class:`~jpeft.errors.BankError` when :func:`_donated` finds a deleted array in ``weights`` (the
    bank's own, ``own``, or weights passed in)."""
    where = _donated(weights)
    if where is None:
        return
    if own:
        raise BankError(
            f"this bank's arrays were donated to a jitted step and are gone ({where} is deleted): "
            "jpeft.make_train_step donates its adapter argument, so a step given bank.weights consumes the bank. "
            "Continue from what the step returned, bank = bank.with_weights(new_weights), and use that bank; or "
            "build the step with jpeft.make_train_step(..., donate=False) to keep this bank usable.")
    raise BankError(
        f"the weights passed in were donated to a jitted step and are gone ({where} is deleted): "
        "jpeft.make_train_step donates its adapter argument. Pass the weights that step returned (weights, "
        "opt_state, metrics = step(params, weights, opt_state, batch, key)), or build the step with "
        "jpeft.make_train_step(..., donate=False).")


def _kernel_desc(lay: Layout) -> str:
    return f"{lay.kind} kernel {tuple(lay.kernel_shape)}"


@jax.jit
def _write_slot(weights, slot, new_a, new_b, new_s, edit, new_frozen, new_bias, new_tokens, new_saved):
    """``new_frozen``: ``{path: b_frozen}`` (1.0 where the slot's ``lora_B`` is frozen there);
    ``new_bias``: ``{path: (lora_bias [out], bias_on)}`` for the sites that hold LoRA biases;
    ``new_tokens``: ``{path: (token_values [K, d], token_ids [K])}`` for those that hold tokens;
    ``new_saved``: ``{path: ({param name: array}, saved_on)}`` for those that hold module copies."""
    def bias(p, st):
        out = {}
        if st.lora_bias is not None:
            b, on = new_bias[p]
            out.update(lora_bias=st.lora_bias.at[slot].set(b), bias_on=st.bias_on.at[slot].set(on))
        if st.token_values is not None:
            v, i = new_tokens[p]
            out.update(token_values=st.token_values.at[slot].set(v), token_ids=st.token_ids.at[slot].set(i))
        if st.saved is not None:
            c, on = new_saved[p]
            out.update(saved={k: x.at[slot].set(c[k]) for k, x in st.saved.items()},
                       saved_on=st.saved_on.at[slot].set(on))
        return out

    return {
        p: LoraStack(st.lora_A.at[slot].set(new_a[p]), st.lora_B.at[slot].set(new_b[p]),
                     st.scales.at[slot].set(new_s[p]), st.edits.at[slot].set(edit), st.layout, **bias(p, st),
                     tied_tokens=st.tied_tokens, b_frozen=st.b_frozen.at[slot].set(new_frozen[p]))
        for p, st in weights.items()
    }


@dataclasses.dataclass(frozen=True, eq=False)
class AdapterBank:
    """A fixed-capacity stack of named LoRA adapters on one base model.

    Build one with :meth:`create` (empty, from the sites of a template adapter) or
    :meth:`from_adapters`. The bank is immutable: :meth:`add`, :meth:`replace`, :meth:`remove`
    and :meth:`with_weights` return a new bank whose arrays have the same shapes, so jitted
    functions of ``bank.route(ids)`` (or of ``bank.weights``) never recompile.

    Attributes:
      layouts: ``{path: Layout}``, the adapted sites.
      weights: ``{path: LoraStack}``, the stacked factors ``[capacity, in, max_rank]`` and
        ``[capacity, max_rank, out]`` with the slots' scales (the state to train through the
        bank; the scales are a frozen field).
      scales: ``{path: [capacity] float32}`` (a property: the stacks' scales), each adapter's
        scale at each site (0 where a slot is empty or its adapter does not adapt that site).
      slots: the name held by each slot, ``None`` for a free slot.
      slot_ranks: for each slot, ``{path: rank}`` of the adapter it holds (``None`` if free).
      slot_scales: for each slot, ``{path: scale}`` as host floats (``None`` if free): what
        :meth:`with_weights` checks the scales of the weights it is given against.
      slot_edits: for each slot, the number of the edit (``add``, ``replace``, ``remove``) that
        last wrote it (0: never written): what :meth:`with_weights` checks the weights' ``edits``
        against, so weights taken before an edit are refused even where the scales are equal.
      slot_frozen_b: for each slot, ``{path: lora_B}`` (host copies, in the bank's dtype) of
        the sites where its adapter's ``lora_B`` is frozen (MiCA's, ``LoraWeights.frozen_b``;
        ``b_frozen`` of the stacks marks the same sites on the device), so that :meth:`get` gives
        back a MiCA adapter as MiCA while its B is unchanged; ``None`` if free.
      dropout: LoRA dropout of the routed branch when training through the bank.
      strategy: ``"gather"``, ``"ragged"`` or ``"pregather"`` (see :mod:`jpeft.bank`).

    >>> import jax, jax.numpy as jnp, flax.linen as nn, jpeft
    >>> model = nn.Dense(4); x = jnp.ones((3, 5))
    >>> params = model.init(jax.random.key(0), x)
    >>> cfg = jpeft.LoraConfig(r=2, target_modules=".*", init_weights="random")
    >>> a, b = (jpeft.init(cfg, params, jax.random.key(i)) for i in (1, 2))
    >>> bank = jpeft.AdapterBank.from_adapters({"a": a, "b": b}, capacity=4)
    >>> routed = bank.route(bank.ids(["b", None, "a"]))
    >>> y = jpeft.apply(model, params, routed, x)
    >>> bool(jnp.allclose(y[0], jpeft.apply(model, params, b, x)[0], atol=1e-6))
    True
    >>> bool(jnp.allclose(y[1], model.apply(params, x)[1]))
    True
    """

    layouts: Mapping[str, Layout]
    weights: Mapping[str, LoraStack]
    slots: tuple
    slot_ranks: tuple
    slot_scales: tuple
    slot_edits: tuple
    dropout: float = 0.0
    strategy: str = DEFAULT_STRATEGY
    # embedding sites: whether the model also reads them as a tied output projection (attend);
    # from the template's low_rank().tied_output, so get() / merged_params() can refuse such a merge
    tied_output: Mapping[str, Optional[bool]] = dataclasses.field(default_factory=dict)
    slot_frozen_b: tuple = ()

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        template: Mapping[str, Any],
        *,
        capacity: int,
        max_rank: int,
        dtype=jnp.float32,
        dropout: float = 0.0,
        strategy: str = DEFAULT_STRATEGY,
        lora_bias: bool = False,
        max_tokens: int = 0,
    ) -> "AdapterBank":
        """An empty bank whose sites are those of ``template``.

        Args:
          template: a LoRA adapter (e.g. from :func:`jpeft.init`), or
            ``{path: Layout}``; only its sites and kernel layouts are used.
          capacity: the number of slots (adapters the bank can hold at once).
          max_rank: the largest LoRA rank the bank accepts; smaller ranks are zero-padded.
          dtype: storage dtype of the stacked factors (the forward computes in the module's dtype).
          dropout: LoRA dropout applied to the routed branch when training.
          strategy: ``"gather"``, ``"ragged"`` or ``"pregather"``.
          lora_bias: hold a LoRA bias (PEFT's ``lora_bias=True``) at every ``nn.Dense`` /
            ``nn.DenseGeneral`` site, for adapters added later; without it the bank holds one
            where a template site has one.
          max_tokens: the most trainable tokens (PEFT's ``trainable_token_indices``) an adapter
            may hold at one embedding; at least the template's own count. When above 0 the
            bank holds tokens at every embedding site.

        Raises:
          ConfigError: a non-positive capacity or rank, or an unknown strategy.
          BankError: a template site that the bank cannot hold.
        """
        if not isinstance(capacity, (int, np.integer)) or capacity < 1:
            raise ConfigError(f"AdapterBank capacity must be a positive integer, found {capacity!r}.")
        if not isinstance(max_rank, (int, np.integer)) or max_rank < 1:
            raise ConfigError(f"AdapterBank max_rank must be a positive integer, found {max_rank!r}.")
        if strategy not in STRATEGIES:
            raise ConfigError(f"AdapterBank strategy must be one of {STRATEGIES}, found {strategy!r}.")
        if not 0.0 <= float(dropout) < 1.0:
            raise ConfigError(f"AdapterBank dropout must be in [0, 1), found {dropout!r}.")
        if not isinstance(lora_bias, (bool, np.bool_)):
            raise ConfigError(f"AdapterBank lora_bias must be true or false, found {lora_bias!r}.")
        if not isinstance(max_tokens, (int, np.integer)) or isinstance(max_tokens, bool) or max_tokens < 0:
            raise ConfigError(f"AdapterBank max_tokens must be an integer >= 0, found {max_tokens!r}.")
        if not template:
            raise BankError("the template adapter has no sites; give an adapter from jpeft.init or {path: Layout}.")
        layouts, tied, biased, saved, tied_tokens = {}, {}, set(), {}, set()
        for path, node in template.items():
            if not isinstance(node, (Layout, LowRank)):
                node = _low_rank_of(f"template site {path!r}", node)
            lay = node if isinstance(node, Layout) else node.layout
            tied[path] = None if isinstance(node, Layout) else node.tied_output
            if (lora_bias and lay.kind != Kind.EMBED) or (isinstance(node, LowRank) and node.bias is not None):
                biased.add(path)
            if isinstance(node, LowRank) and node.tokens is not None:
                max_tokens = max(int(max_tokens), len(node.tokens[0]))
                if node.tie_output:
                    tied_tokens.add(path)
            if isinstance(node, LowRank) and node.saved is not None:
                saved[path] = {k: (tuple(v.shape), v.dtype) for k, v in node.saved.items()}
            if lay.kind not in _KINDS:
                raise UnsupportedModuleError(
                    f"bank site {path!r} is a {lay.kind} module; AdapterBank routes {_KINDS} modules. "
                    "Leave it out of the adapters you put in a bank."
                )
            layouts[path] = lay
        capacity, max_rank = int(capacity), int(max_rank)
        weights = {
            p: LoraStack(
                jnp.zeros((capacity, lay.in_features, max_rank), dtype),
                jnp.zeros((capacity, max_rank, lay.out_features), dtype),
                jnp.zeros((capacity,), jnp.float32),
                jnp.zeros((capacity,), jnp.float32),
                lay,
                **(dict(lora_bias=jnp.zeros((capacity, lay.out_features), dtype),
                        bias_on=jnp.zeros((capacity,), jnp.float32)) if p in biased else {}),
                **(dict(token_values=jnp.zeros((capacity, max_tokens, lay.out_features), dtype),
                        token_ids=jnp.full((capacity, max_tokens), -1.0, jnp.float32))
                   if max_tokens and lay.kind == Kind.EMBED else {}),
                **(dict(saved={k: jnp.zeros((capacity,) + shape, dt) for k, (shape, dt) in saved[p].items()},
                        saved_on=jnp.zeros((capacity,), jnp.float32)) if p in saved else {}),
                tied_tokens=p in tied_tokens and bool(max_tokens) and lay.kind == Kind.EMBED,
                b_frozen=jnp.zeros((capacity,), jnp.float32),
            )
            for p, lay in layouts.items()
        }
        free = (None,) * capacity
        return cls(layouts, weights, free, free, free, (0,) * capacity, float(dropout), strategy, tied, free)

    @classmethod
    def from_adapters(
        cls,
        adapters: Mapping[str, Mapping[str, Any]],
        *,
        capacity: Optional[int] = None,
        max_rank: Optional[int] = None,
        **kwargs,
    ) -> "AdapterBank":
        """A bank holding ``adapters`` (``{name: adapter}``), in that order from slot 0.

        The sites are the union of the adapters' sites (holding LoRA biases and ``modules_to_save``
        copies where any adapter has one, and trainable tokens, as many as the most any adapter
        has, at every embedding when any adapter has some). ``capacity`` defaults to the number of
        adapters and ``max_rank`` to their largest rank; other keywords go to :meth:`create`.

        Raises:
          BankCapacityError: ``capacity`` below the number of adapters; BankRankError, an
            adapter's rank above ``max_rank``. Others as :meth:`create` and :meth:`add`.
        """
        if not adapters:
            raise BankError("from_adapters needs at least one adapter; use AdapterBank.create for an empty bank.")
        if isinstance(capacity, (int, np.integer)) and not isinstance(capacity, bool) and 0 < capacity < len(adapters):
            raise BankCapacityError(
                f"from_adapters got {len(adapters)} adapters {list(adapters)[:20]} but capacity={capacity} slots; give "
                f"capacity >= {len(adapters)} (leave it out for exactly {len(adapters)}), or fewer adapters."
            )
        template: dict[str, LowRank] = {}
        for name, ad in adapters.items():
            for path, node in check_lora(name, ad).items():
                if path in template and not _same_layout(template[path].layout, node.layout):
                    raise BankShapeError(
                        f"adapter {name!r} has site {path!r} with a {_kernel_desc(node.layout)}, but another adapter has "
                        f"a {_kernel_desc(template[path].layout)} there: they were made for different base models."
                    )
                old = template.get(path)  # a site where any adapter has a lora_bias or a module copy holds them
                template[path] = node if old is None else old._replace(
                    bias=node.bias if old.bias is None else old.bias,
                    saved=node.saved if old.saved is None else old.saved,
                    tokens=node.tokens if old.tokens is None else old.tokens,
                    tie_output=bool(old.tie_output or (node.tokens is not None and node.tie_output)))
                if template[path].layout.kernel_fn is None and node.layout.kernel_fn is not None:  # any records it
                    lay = dataclasses.replace(template[path].layout, kernel_fn=node.layout.kernel_fn)
                    template[path] = template[path]._replace(layout=lay)
        lows = [lr for t in map(check_lora, adapters, adapters.values()) for lr in t.values()]
        if max_rank is None:
            max_rank = max(1, max(int(lr.a.shape[-1]) for lr in lows))  # trainable tokens alone have rank 0
        kwargs.setdefault("max_tokens", max([0] + [len(lr.tokens[0]) for lr in lows if lr.tokens is not None]))
        bank = cls.create(template, capacity=len(adapters) if capacity is None else capacity, max_rank=max_rank, **kwargs)
        for name, ad in adapters.items():
            bank = bank.add(name, ad)
        return bank

    # -- queries --------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return len(self.slots)

    @property
    def max_rank(self) -> int:
        return int(next(iter(self.weights.values())).lora_A.shape[-1])

    @property
    def scales(self) -> dict:
        """``{path: [capacity] float32}``: each slot's scale per site (the stacks' ``scales``)."""
        return {p: st.scales for p, st in self.weights.items()}

    @property
    def names(self) -> tuple:
        """Names of the adapters held, in slot order."""
        return tuple(n for n in self.slots if n is not None)

    @property
    def sites(self) -> tuple:
        return tuple(self.layouts)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name) -> bool:
        return name in self.slots

    def __repr__(self) -> str:
        return (
            f"AdapterBank(capacity={self.capacity}, max_rank={self.max_rank}, sites={len(self.layouts)}, "
            f"adapters={list(self.names)}, strategy={self.strategy!r})"
        )

    def slot(self, name: str) -> int:
        """The slot index holding ``name``.

        Raises:
          UnknownAdapterError: no adapter of that name is in the bank.
        """
        if name is not None and name in self.slots:
            return self.slots.index(name)
        raise UnknownAdapterError(
            f"no adapter named {name!r} in the bank; it holds {list(self.names)}. Add it with bank.add(name, adapter), "
            "or route the example to the bare base with None (id -1)."
        )

    def ids(self, names: Sequence[Union[str, int, None]]) -> jax.Array:
        """Slot ids for a batch of adapter names (``None``, or ``"__base__"`` as in PEFT's
        ``adapter_names``, -> ``-1``, the bare base); an integer entry is already a slot id and
        is kept (``[1, None, "a"]``)."""
        def slot_id(n):
            if isinstance(n, (int, np.integer)) and not isinstance(n, (bool, np.bool_)):
                return int(n)
            return -1 if n is None or n == BASE_NAME else self.slot(n)

        return jnp.asarray([slot_id(n) for n in names], jnp.int32)

    def get(self, name: str) -> dict:
        """The adapter ``name`` as a LoRA adapter at its own rank (padding removed), with
        ``lora_B`` frozen where the adapter added had it frozen (MiCA; jpeft's train steps keep
        that B through training in the bank), unless something else changed that B (an optimizer
        applied to ``bank.weights`` by hand, AdamW's weight decay): then a plain LoRA (both
        factors trained), with a ``UserWarning``.

        Raises:
          UnknownAdapterError: no adapter of that name is in the bank.
          BankError: the bank's arrays were donated to a training step (continue from ``bank.with_weights``)."""
        i = self.slot(name)
        _refuse_donated(self.weights, own=True)
        ranks = self.slot_ranks[i]
        frozen = self.slot_frozen_b[i]
        moved = sorted(p for p, b in frozen.items()
                       if not np.array_equal(np.asarray(self.weights[p].lora_B[i, : ranks[p]]), b))
        if moved:
            warnings.warn(
                f"AdapterBank.get({name!r}): this MiCA adapter's lora_B (frozen in the adapter) changed in the bank at "
                f"{moved[:4]}: it is no longer MiCA's B, so the adapter comes back as a plain LoRA (lora_B trained, not "
                "frozen). jpeft's train steps keep a MiCA slot's B; an optimizer applied to bank.weights by hand moves it "
                "(AdamW's weight decay does, even with a zero gradient). Train through the bank with "
                "jpeft.make_train_step (or the pmap / sharded steps) to keep it.", UserWarning, stacklevel=2)
            frozen = {}
        out = {}
        for path, r in ranks.items():
            st = self.weights[path]
            biased = st.bias_on is not None and float(st.bias_on[i]) != 0.0
            tokens = None
            if st.token_ids is not None and r == 0:  # a tokens site (rank 0): its ids, in their order
                ids = np.asarray(st.token_ids[i])
                k = int((ids >= 0).sum())
                tokens = (tuple(int(t) for t in ids[:k]), st.token_values[i, :k])
            copy = None
            if st.saved_on is not None and float(st.saved_on[i]) != 0.0:
                copy = {k: v[i] for k, v in st.saved.items()}
            out[path] = low_rank_node(LowRank(
                st.lora_A[i, :, :r], st.lora_B[i, :r, :], self.slot_scales[i][path], st.layout,
                tied_output=self.tied_output.get(path) if st.layout.kind == Kind.EMBED else None, dropout=self.dropout,
                bias=st.lora_bias[i] if biased else None, tokens=None if copy is not None else tokens, saved=copy,
                tie_output=bool(st.tied_tokens and tokens is not None and copy is None),
                frozen_b=path in frozen,
            ))
        return out

    # -- routing --------------------------------------------------------------------------------
    def route(
        self,
        adapter_ids: Union[jax.Array, Sequence[Optional[str]]],
        *,
        weights: Optional[Mapping[str, LoraStack]] = None,
        strategy: Optional[str] = None,
    ) -> dict[str, BankedLora]:
        """An adapter dict for :func:`jpeft.apply` that gives example ``i`` the adapter in slot
        ``adapter_ids[i]`` (``-1``: the bare base).

        Args:
          adapter_ids: ``[batch]`` integer slots (see :meth:`ids`), or a list of names / ``None``.
          weights: stacked weights (with their scales) to use instead of the bank's own (for
            training; see the module docstring).
          strategy: override the bank's ``"gather"`` / ``"ragged"`` / ``"pregather"`` choice.

        Raises:
          InputValidationError: ids that are not a 1-D integer array, or (when the ids are
            concrete) a slot outside ``[-1, capacity)``.
          UnknownAdapterError: (concrete ids) a slot that holds no adapter, or an unknown name.
          BankError: called while JAX traces a function (``jax.jit``, ``make_train_step``, ...)
            with weights that are not traced values (the bank's own arrays, captured from the
            enclosing scope): the compiled program would keep them after ``add`` / ``replace`` /
            ``remove``. Pass ``weights=`` as an argument of the traced function. Also: the
            weights' arrays were donated to a training step (``make_train_step`` donates its
            adapter argument): route the bank ``bank.with_weights(new_weights)`` returned.
        """
        if isinstance(adapter_ids, np.ndarray) and adapter_ids.dtype.kind in "USO":  # names as a numpy array
            adapter_ids = adapter_ids.tolist()
        if isinstance(adapter_ids, (list, tuple)) and any(isinstance(n, str) or n is None for n in adapter_ids):
            adapter_ids = self.ids(adapter_ids)  # names, None (the base) and slot ids, mixed: [1, None] is slot 1
        ids = jnp.asarray(adapter_ids)
        if not isinstance(ids, jax.core.Tracer) and ids.ndim == 1 and jnp.issubdtype(ids.dtype, jnp.integer):
            _check_slots(ids, self.capacity)
            host = np.asarray(ids)
            empty = sorted({int(i) for i in host if i >= 0 and self.slots[i] is None})
            if empty:
                raise UnknownAdapterError(
                    f"adapter_ids route examples to empty slots {empty}; the bank holds {dict(self._named_slots())}. "
                    "Use -1 for the bare base."
                )
        if weights is None:
            weights = self.weights
        else:
            self._check_weights(weights)
        _refuse_donated(weights, own=weights is self.weights)
        if _staging() and not all(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(weights)):
            raise BankError(
                "bank.route was called while JAX traces a function (jax.jit, jax.eval_shape, jpeft.make_train_step, "
                "...) with weights (the bank's own, or others) captured from the enclosing scope, not passed in as "
                "arguments: they would become constants of the compiled "
                "program, which keeps them (factors and scales) after bank.add / replace / remove, so rows routed to a "
                "new or swapped adapter would silently run the old one. Pass the weights in: "
                "bank.route(ids, weights=weights) with weights=bank.weights an argument of the traced function (as "
                "make_train_step's loss_fn(params, weights, batch, key)), or call bank.route(ids) outside and pass the "
                "routed dict in."
            )
        return route(weights, None, ids, dropout=self.dropout, strategy=strategy or self.strategy)

    def _named_slots(self):
        return [(n, i) for i, n in enumerate(self.slots) if n is not None]

    # -- updates (all return a new bank; shapes never change) -----------------------------------
    def add(self, name: str, adapter: Mapping[str, Any]) -> "AdapterBank":
        """A new bank with ``adapter`` stored under ``name`` in the first free slot.

        Raises:
          DuplicateAdapterError: ``name`` is already in the bank (use :meth:`replace`).
          BankCapacityError: every slot is taken; BankRankError (a BankCapacityError), the
            adapter's rank exceeds ``max_rank``.
          BankShapeError: the adapter has a site the bank lacks, or a kernel of another shape.
          BankError: the bank's arrays were donated to a training step (continue from ``bank.with_weights``).
        """
        if not isinstance(name, str) or not name:
            raise BankError(f"adapter names are non-empty strings, found {name!r}.")
        if name == BASE_NAME:
            raise BankError(f"{BASE_NAME!r} names the bare base (as in PEFT's adapter_names), so an adapter stored under "
                            "it would never be routed to; pick another name.")
        if name in self.slots:
            raise DuplicateAdapterError(
                f"the bank already holds an adapter named {name!r} (slot {self.slots.index(name)}); "
                "use bank.replace(name, adapter) to swap it, or pick another name."
            )
        self._validate(name, adapter)
        if None not in self.slots:
            raise BankCapacityError(
                f"the bank is full: all {self.capacity} slots are taken by {list(self.names)}. Remove an adapter "
                f"first (bank.remove(name)), or build a bank with a larger capacity (changing capacity recompiles)."
            )
        return self._store(self.slots.index(None), name, adapter)

    def replace(self, name: str, adapter: Mapping[str, Any]) -> "AdapterBank":
        """A new bank where the adapter ``name`` is swapped for ``adapter`` (same slot).

        Raises:
          UnknownAdapterError: ``name`` is not in the bank.
          BankCapacityError, BankShapeError: as for :meth:`add`.
        """
        return self._store(self.slot(name), name, adapter)

    def remove(self, name: str) -> "AdapterBank":
        """A new bank without ``name``; its slot is zeroed (routes to it act as the bare base) and
        becomes free.

        Raises:
          UnknownAdapterError: ``name`` is not in the bank.
          BankError: the bank's arrays were donated to a training step (continue from ``bank.with_weights``).
        """
        i = self.slot(name)
        _refuse_donated(self.weights, own=True)
        za = {p: jnp.zeros(st.lora_A.shape[1:], st.lora_A.dtype) for p, st in self.weights.items()}
        zb = {p: jnp.zeros(st.lora_B.shape[1:], st.lora_B.dtype) for p, st in self.weights.items()}
        zs = {p: jnp.zeros((), jnp.float32) for p in self.weights}
        edit = self._next_edit()
        w = _write_slot(self.weights, jnp.int32(i), za, zb, zs, jnp.float32(edit), zs, self._slot_bias({}),
                        self._slot_tokens({}), self._slot_copies({}))
        return dataclasses.replace(self, weights=w, **self._slot_record(i, None, None, None, edit, None))

    def with_weights(self, weights: Mapping[str, LoraStack]) -> "AdapterBank":
        """A new bank with its stacked factors replaced (e.g. after training through the bank).

        Raises:
          BankShapeError: weights of another structure or shape.
          BankError: weights taken before an ``add`` / ``replace`` / ``remove`` of this bank
            (their ``edits`` differ; the factors would bring back the slot's old adapter), or
            whose scales are not this bank's (changed by an optimizer that was given them), or
            whose arrays were donated to a later step (pass the weights it returned). This bank's
            own arrays may be gone (the step that returned ``weights`` donated them): that is how
            training through the bank goes on.
        """
        self._check_weights(weights)
        _refuse_donated(weights, own=False)
        for p, st in weights.items():
            stale = np.flatnonzero(np.asarray(st.edits, np.float64) != np.asarray(self.slot_edits, np.float64))
            if stale.size:
                k = int(stale[0])
                raise BankError(
                    f"the weights at {p!r} were taken from the bank before it changed slot {k} (now "
                    f"{self.slots[k]!r}; the weights hold what the slot had before an add / replace / remove), so "
                    "with_weights would bring the old adapter back there. Take bank.weights again after changing "
                    "the bank and train from it; bank.with_weights(trained).add(name, adapter) (changes after "
                    "with_weights) keeps what was trained."
                )
            got = np.asarray(st.scales)
            want = np.asarray([0.0 if r is None else r.get(p, 0.0) for r in self.slot_scales], np.float32)
            bad = np.flatnonzero(got.astype(np.float32) != want.astype(got.dtype).astype(np.float32))
            if bad.size:
                k = int(bad[0])
                raise BankError(
                    f"the weights' scales differ from the bank's at {p!r}, slot {k} ({self.slots[k]!r}): "
                    f"{float(got[k])} where the bank holds {float(want[k])}. The weights were taken from the bank "
                    "before an add / replace / remove (take bank.weights again after changing the bank, "
                    "bank.with_weights(trained).add(name, adapter) keeps what was trained), or an optimizer changed "
                    "the scales (train with jpeft.make_train_step, or build the optimizer for "
                    "jpeft.trainable(bank.weights): the scales are frozen)."
                )
            # which slots' lora_B is frozen (MiCA's), against the host record: this bank's own arrays may be donated
            got = np.asarray(st.b_frozen, np.float32)
            want = np.asarray([float(r is not None and p in r) for r in self.slot_frozen_b], np.float32)
            if not np.array_equal(got, want):
                raise BankError(
                    f"the weights' b_frozen at {p!r} is {got.tolist()} where the bank's slots hold {want.tolist()} (1: "
                    "the slot's lora_B is frozen, MiCA's): an optimizer changed this frozen field. Train with "
                    "jpeft.make_train_step, or build the optimizer for jpeft.trainable(bank.weights).")
            for name in ("bias_on", "token_ids", "saved_on"):  # frozen: which slots hold a bias, token ids, a copy
                got, own = getattr(st, name), getattr(self.weights[p], name)
                # this bank's own arrays are gone where a step donated them (bank = bank.with_weights(trained) is how
                # training goes on): then the host-side checks above (edits, scales) are what is left to compare
                if own is not None and hasattr(own, "is_deleted") and own.is_deleted():
                    continue
                if got is not None and not np.array_equal(np.asarray(got), np.asarray(own)):
                    raise BankError(
                        f"the weights' {name} at {p!r} differs from the bank's: an optimizer changed this frozen field. "
                        "Train with jpeft.make_train_step, or build the optimizer for jpeft.trainable(bank.weights)."
                    )
        return dataclasses.replace(self, weights=dict(weights))

    def merged_params(self, params, name: str):
        """``params`` with the adapter ``name`` folded into the base weights, for serving one
        tenant without any adapter overhead (:func:`jpeft.merge` of :meth:`get`)."""
        return merge(params, self.get(name))

    def check(self, params) -> None:
        """Raises :class:`~jpeft.errors.BankShapeError` unless every bank site exists in
        ``params`` with the kernel shape the bank was built for. ``params`` may be an
        ``nnx.Module`` (or its ``nnx.State``), as :func:`jpeft.apply` takes it."""
        inner = unwrap_params(nnx_state_of(params))[0]
        leaves = module_leaves(inner)
        for path, lay in self.layouts.items():
            own = leaves.get(path)
            pname = lay.param_name
            if own is None and scan.num_stacked_layers(inner) is not None:
                raise BankShapeError(
                    f"the bank has a site {path!r}, and these params are layer-scanned (scan_layers=True: one stacked "
                    "kernel per projection); a bank routes per-layer sites. Serve the unrolled model "
                    "(from_pretrained(path) without scan_layers, or jpeft.scan.unstack_params)."
                )
            if own is None or pname not in own:
                raise BankShapeError(
                    f"the bank has a site {path!r} that the params do not have; the bank belongs to another base "
                    "model. Build a bank for this model."
                )
            if tuple(own[pname].shape) != tuple(lay.kernel_shape):
                raise BankShapeError(
                    f"the bank was built for a base whose {pname} at {path!r} has shape {tuple(lay.kernel_shape)}, but "
                    f"the params hold shape {tuple(own[pname].shape)}; the bank belongs to another base model."
                )

    # -- internals ------------------------------------------------------------------------------
    def _check_weights(self, weights):
        if set(weights) != set(self.weights):
            raise BankShapeError(
                f"weights have sites {sorted(weights)}, the bank has {sorted(self.weights)}; pass bank.weights "
                "or a tree of the same structure."
            )
        for p, st in weights.items():
            ref = self.weights[p]
            if tuple(st.lora_A.shape) != tuple(ref.lora_A.shape) or tuple(st.lora_B.shape) != tuple(ref.lora_B.shape):
                raise BankShapeError(
                    f"weights at {p!r} have shapes {tuple(st.lora_A.shape)} / {tuple(st.lora_B.shape)}; the bank "
                    f"needs {tuple(ref.lora_A.shape)} / {tuple(ref.lora_B.shape)}."
                )
            def shapes(t):
                return None if t is None else jax.tree.map(lambda x: tuple(x.shape), dict(t))

            if shapes(st.saved) != shapes(ref.saved):
                raise BankShapeError(
                    f"weights at {p!r} carry module copies (saved) of another structure or shape than the bank's; pass "
                    "bank.weights, or a trained copy of it with its frozen fields (jpeft.join_frozen(trainable, frozen))."
                )
            for name in ("lora_bias", "bias_on", "token_values", "token_ids", "saved_on"):
                got, want = getattr(st, name), getattr(ref, name)
                if (got is None) != (want is None) or (want is not None and tuple(got.shape) != tuple(want.shape)):
                    raise BankShapeError(
                        f"weights at {p!r} carry {name} of shape {None if got is None else tuple(got.shape)}; the bank "
                        f"needs {None if want is None else tuple(want.shape)}: pass bank.weights, or a trained copy of it "
                        "with its frozen fields (jpeft.join_frozen(trainable, frozen))."
                    )
            for name in ("scales", "edits", "b_frozen"):
                x = getattr(st, name)
                if x is None or tuple(x.shape) != (self.capacity,):
                    raise BankShapeError(
                        f"weights at {p!r} carry {name} of shape {None if x is None else tuple(x.shape)}; the bank "
                        f"needs ({self.capacity},): pass bank.weights, or a trained copy of it with its frozen fields "
                        "(jpeft.join_frozen(trainable, frozen) puts back what jpeft.split_frozen took out)."
                    )

    def _validate(self, name: str, adapter) -> dict:
        low = check_lora(name, adapter)
        rmax = self.max_rank
        for path, node in low.items():
            r = int(node.a.shape[-1])
            if path not in self.layouts:
                raise BankShapeError(
                    f"adapter {name!r} has a site {path!r} that the bank does not hold; the bank's sites are "
                    f"{sorted(self.layouts)[:20]}. The adapter was made for another model or other target_modules; "
                    "build the bank from a template that covers every site you need."
                )
            lay = self.layouts[path]
            if not _same_layout(lay, node.layout):
                raise BankShapeError(
                    f"adapter {name!r} was made for a {_kernel_desc(node.layout)} at {path!r}, but the bank's base has "
                    f"a {_kernel_desc(lay)} there: the adapter belongs to another base model shape."
                )
            if tuple(node.a.shape) != (lay.in_features, r) or tuple(node.b.shape) != (r, lay.out_features):
                raise BankShapeError(
                    f"adapter {name!r} at {path!r}: lora_A {tuple(node.a.shape)} / lora_B {tuple(node.b.shape)} "
                    f"do not fit a [{lay.in_features}, r] / [r, {lay.out_features}] LoRA for this base."
                )
            if node.bias is not None and self.weights[path].lora_bias is None:
                raise BankError(
                    f"adapter {name!r} has a LoRA bias (LoraConfig.lora_bias / PEFT's lora_bias=True) at {path!r}, but "
                    "the bank holds no biases there (it holds them where an adapter it was built from has one). Build "
                    "the bank with AdapterBank.create(template, ..., lora_bias=True), or from_adapters with this "
                    "adapter among them (a new bank recompiles)."
                )
            if node.saved is not None:
                st = self.weights[path]
                if st.saved is None:
                    raise BankError(
                        f"adapter {name!r} has a trained copy of the module at {path!r} (LoraConfig.modules_to_save), "
                        "but the bank holds no copies there (it holds them where an adapter it was built from has one). "
                        "Build the bank with from_adapters with this adapter among them, or create it from a template "
                        "that has such a copy (a new bank recompiles)."
                    )
                got = {k: tuple(v.shape) for k, v in node.saved.items()}
                want = {k: tuple(v.shape[1:]) for k, v in st.saved.items()}
                if got != want:
                    raise BankShapeError(
                        f"adapter {name!r}'s copy of the module at {path!r} (modules_to_save) has parameters {got}; the "
                        f"bank holds {want} there: the adapter belongs to another base model."
                    )
            if node.tokens is not None:
                st = self.weights[path]
                k = 0 if st.token_values is None else int(st.token_values.shape[1])
                if st.token_values is not None and bool(node.tie_output) != st.tied_tokens:
                    def acts(tied):
                        return "in the tied output layer too" if tied else "in the input lookup only"

                    raise BankError(
                        f"adapter {name!r} has trainable tokens at {path!r} that act {acts(node.tie_output)}, but the "
                        f"bank's tokens there act {acts(st.tied_tokens)}: the adapters were made for bases that differ "
                        "in tie_word_embeddings. Load them on one base."
                    )
                if len(node.tokens[0]) > k:
                    raise BankError(
                        f"adapter {name!r} has {len(node.tokens[0])} trainable tokens (LoraConfig.trainable_token_indices) "
                        f"at {path!r}, but the bank holds {k} per adapter there. Build the bank with "
                        f"AdapterBank.create(template, ..., max_tokens={len(node.tokens[0])}) or more, or from_adapters "
                        "with this adapter among them (a new bank recompiles)."
                    )
            if r > rmax:
                raise BankRankError(
                    f"adapter {name!r} has rank {r} at {path!r}, above the bank's max_rank={rmax}. Build the bank "
                    f"with max_rank >= {r} (changing max_rank recompiles), or truncate the adapter "
                    "(jpeft.merging.merge_adapters([adapter], method='svd', rank=...)).",
                    rank=max(int(n.a.shape[-1]) for n in low.values()), max_rank=rmax,
                )
        return low

    def _store(self, i: int, name: str, adapter) -> "AdapterBank":
        adapter = self._validate(name, adapter)
        _refuse_donated(self.weights, own=True)
        rmax = self.max_rank
        new_a, new_b, new_s, host_s = {}, {}, {}, {}
        for path, st in self.weights.items():
            node = adapter.get(path)
            if node is None:
                new_a[path] = jnp.zeros(st.lora_A.shape[1:], st.lora_A.dtype)
                new_b[path] = jnp.zeros(st.lora_B.shape[1:], st.lora_B.dtype)
                new_s[path] = jnp.zeros((), jnp.float32)
                continue
            r = int(node.a.shape[-1])
            new_a[path] = jnp.pad(jnp.asarray(node.a, st.lora_A.dtype), ((0, 0), (0, rmax - r)))
            new_b[path] = jnp.pad(jnp.asarray(node.b, st.lora_B.dtype), ((0, rmax - r), (0, 0)))
            host_s[path] = float(np.float32(node.scale))
            new_s[path] = jnp.asarray(host_s[path], jnp.float32)
        edit = self._next_edit()
        on = {p: jnp.float32(p in adapter and bool(adapter[p].frozen_b)) for p in self.weights}
        w = _write_slot(self.weights, jnp.int32(i), new_a, new_b, new_s, jnp.float32(edit), on,
                        self._slot_bias(adapter), self._slot_tokens(adapter), self._slot_copies(adapter))
        ranks = {p: int(n.a.shape[-1]) for p, n in adapter.items()}
        frozen_b = {p: np.asarray(new_b[p][: ranks[p]]) for p, n in adapter.items() if n.frozen_b}
        return dataclasses.replace(self, weights=w, **self._slot_record(i, name, ranks, host_s, edit, frozen_b))

    def _slot_bias(self, adapter: Mapping[str, LowRank]) -> dict:
        """``{path: (lora_bias [out], bias_on)}`` of a slot holding ``adapter`` (``{}``: none), at
        the sites that hold LoRA biases."""
        out = {}
        for path, st in self.weights.items():
            if st.lora_bias is None:
                continue
            lr = adapter.get(path)
            if lr is None or lr.bias is None:
                out[path] = (jnp.zeros(st.lora_bias.shape[1:], st.lora_bias.dtype), jnp.zeros((), jnp.float32))
            else:
                out[path] = (jnp.asarray(lr.bias, st.lora_bias.dtype).reshape(st.lora_bias.shape[1:]),
                             jnp.ones((), jnp.float32))
        return out

    def _slot_tokens(self, adapter: Mapping[str, LowRank]) -> dict:
        """``{path: (token_values [K, d], token_ids [K])}`` of a slot holding ``adapter`` (``{}``:
        none), at the sites that hold trainable tokens (ids ``-1`` past the adapter's own)."""
        out = {}
        for path, st in self.weights.items():
            if st.token_values is None:
                continue
            vals = np.zeros(st.token_values.shape[1:], np.float32)
            ids = np.full(st.token_ids.shape[1:], -1.0, np.float32)
            lr = adapter.get(path)
            if lr is not None and lr.tokens is not None:
                idx, v = lr.tokens
                vals[: len(idx)] = np.asarray(v, np.float32)
                ids[: len(idx)] = idx
            out[path] = (jnp.asarray(vals, st.token_values.dtype), jnp.asarray(ids))
        return out

    def _slot_copies(self, adapter: Mapping[str, LowRank]) -> dict:
        """``{path: ({param name: array}, saved_on)}`` of a slot holding ``adapter`` (``{}``: none),
        at the sites that hold ``modules_to_save`` copies."""
        out = {}
        for path, st in self.weights.items():
            if st.saved is None:
                continue
            lr = adapter.get(path)
            if lr is None or lr.saved is None:
                out[path] = ({k: jnp.zeros(v.shape[1:], v.dtype) for k, v in st.saved.items()},
                             jnp.zeros((), jnp.float32))
            else:
                out[path] = ({k: jnp.asarray(lr.saved[k], v.dtype) for k, v in st.saved.items()},
                             jnp.ones((), jnp.float32))
        return out

    def _next_edit(self) -> int:
        """A number no slot of this bank was written with (edits only grow along a bank's history;
        float32 holds them exactly up to 2**24 edits)."""
        return max(self.slot_edits) + 1

    def _slot_record(self, i: int, name, ranks, scales, edit: int, frozen_b) -> dict:
        """The host bookkeeping of a bank whose slot ``i`` holds ``name`` (``None``: free), written
        by edit number ``edit``."""
        def put(t, v):
            return t[:i] + (v,) + t[i + 1 :]

        return dict(slots=put(self.slots, name), slot_ranks=put(self.slot_ranks, ranks),
                    slot_scales=put(self.slot_scales, scales), slot_edits=put(self.slot_edits, edit),
                    slot_frozen_b=put(self.slot_frozen_b, frozen_b))


def _same_layout(a: Layout, b: Layout) -> bool:
    return (
        tuple(a.kernel_shape) == tuple(b.kernel_shape)
        and tuple(a.in_axes) == tuple(b.in_axes)
        and tuple(a.out_axes) == tuple(b.out_axes)
        and (a.kind == b.kind or {a.kind, b.kind} <= {Kind.DENSE, Kind.DENSE_GENERAL})
    )


def _low_rank_of(where: str, node) -> LowRank:
    """``node.routed_low_rank()`` (its ``s * A @ B``, and a LoRA's ``lora_bias``), or a
    :class:`BankError` saying why the bank cannot hold it."""
    if not isinstance(node, Site):
        raise BankError(f"{where} is a {type(node).__name__}, not an adapter site; AdapterBank holds LoRA adapters.")
    try:
        return node.routed_low_rank()
    except NotMergeableError as e:
        # the scan hint for a layer-scanned site only: appended to a DoRA or IA3 refusal it sent users to unstack
        # an adapter that was not stacked
        hint = (" AdapterBank holds LoRA adapters of unrolled models only (this site is a layer-scanned "
                "jpeft.scan.Stacked; unstack the adapter with jpeft.scan.unstack_adapter)."
                if isinstance(node, scan.Stacked) else " AdapterBank holds LoRA, AdaLoRA and VeRA adapters.")
        raise BankError(f"{where}: {e}{hint}") from None


def check_lora(name, adapter) -> dict:
    """``{path: LowRank}`` of an adapter the bank can hold (named errors otherwise)."""
    if not isinstance(adapter, Mapping) or not adapter:
        raise BankError(f"adapter {name!r} must be a non-empty dict {{path: node}} of a LoRA adapter (from jpeft.init); "
                        f"found {adapter!r:.80}.")
    out = {}
    for path, node in adapter.items():
        lr = _low_rank_of(f"adapter {name!r} at {path!r}", node)
        if lr.residual is not None:
            raise BankError(residual_refusal(f"adapter {name!r} at {path!r}", lr.residual, "served on the bank's base"))
        if lr.tie_output and lr.saved is not None:
            raise BankError(
                f"adapter {name!r} has a copy of the embedding at {path!r} (modules_to_save) that the model's tied output "
                "projection reads too (ensure_weight_tying); a bank routes the input lookup only. Serve it alone with "
                "jpeft.apply."
            )
        if lr.tie_output and lr.tokens is None:
            raise BankError(
                f"adapter {name!r} adapts the tied output projection too at {path!r} (ensure_weight_tying); a bank routes "
                "the input lookup only. Serve it alone with jpeft.apply."
            )
        if lr.layout is None or lr.layout.kind not in _KINDS:
            kind = None if lr.layout is None else lr.layout.kind
            raise UnsupportedModuleError(
                f"adapter {name!r} adapts a {kind} module at {path!r}; AdapterBank routes {[str(k) for k in _KINDS]} "
                "modules only."
            )
        out[path] = lr
    return out


__all__ = ["AdapterBank", "BankedLora", "LoraStack", "route", "STRATEGIES", "DEFAULT_STRATEGY", "BASE_NAME"]
