"""Jitted training steps that differentiate the adapter only.

``loss_fn(params, adapter, batch, key)`` returns a scalar loss or ``(loss, aux)`` where
``aux`` is a dict of extra metrics (not named ``loss``, ``grad_norm`` or ``skipped``, the
step's own). The step returned by :func:`make_train_step` is::

    adapter, opt_state, metrics = step(params, adapter, opt_state, batch, key)

``params`` (the frozen base) is never differentiated, never copied and never handed to the
optimizer. Nor are an adapter's frozen arrays (a node's ``frozen`` fields, e.g. VeRA's shared
projections): the step splits the adapter with :func:`jpeft.methods.base.split_frozen`,
differentiates and updates the trainable part only and joins the frozen part back unchanged,
so the optimizer state is ``optimizer.init(jpeft.trainable(adapter))`` (what
:func:`jpeft.init_opt_state` builds); for an adapter without frozen arrays that is
``optimizer.init(adapter)``.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Optional

import flax.errors
import jax
import jax.numpy as jnp
import optax

from jpeft import quant
from jpeft.errors import ConfigError, InputValidationError, QuantizationError
from jpeft.methods.base import Site, after_update, join_frozen, keep_frozen_entries, split_frozen


def split_loss(out):
    """``(loss, aux)`` of a loss function's output: ``loss`` alone or ``(loss, aux)`` (``aux`` ``None`` -> ``{}``)."""
    if isinstance(out, tuple) and len(out) == 2:
        loss, aux = out
        return loss, (aux if aux is not None else {})
    return out, {}


def all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    if not leaves:
        return jnp.asarray(True)
    return jnp.stack(leaves).all()


def loss_and_grad(loss_fn: Callable, params, adapter, batch, key):
    """``(loss, aux), grads`` with gradients for the adapter only."""

    def f(adapter):
        try:
            out = loss_fn(params, adapter, batch, key)
        except flax.errors.ScopeParamShapeError as e:
            if quant.has_quantized(params):  # flax's shape error names the kernel, not the cause
                raise QuantizationError(
                    "loss_fn ran the model on a quantized base with model.apply, which cannot read quantized kernels "
                    f"({e.__class__.__name__}: {str(e).split(' (https')[0]}). Call jpeft.apply(model, params, adapter, "
                    "...) in loss_fn: it dequantizes each layer where it is called."
                ) from e
            raise
        loss, aux = split_loss(out)
        _check_loss(loss, out)
        return loss, aux

    return jax.value_and_grad(f, has_aux=True)(adapter)


def _check_loss(loss, out) -> None:
    """A loss that is not one float number (a per-example vector, an integer count, a tuple of
    three) is refused by name, not with JAX's ``grad`` error about "scalar-output functions"."""
    if isinstance(loss, (int, float)) and not isinstance(loss, bool):
        return
    shape, dtype = getattr(loss, "shape", None), getattr(loss, "dtype", None)
    if shape == () and dtype is not None and jnp.issubdtype(dtype, jnp.floating):
        return
    found = (f"an array of shape {tuple(shape)} and dtype {dtype}" if shape is not None else
             f"a {type(out).__name__} of {len(out)} items" if isinstance(out, (tuple, list)) else type(loss).__name__)
    raise ConfigError(
        f"loss_fn(params, adapter, batch, key) must return the loss as one float number (a 0-d float array), or "
        f"(loss, aux) with aux a dict of metrics; it returned {found}. Average a per-example loss (jnp.mean), "
        "cast a count to float, or return extra values in the aux dict."
    )


def apply_update(optimizer: optax.GradientTransformation, adapter, opt_state, grads, loss, aux, *, skip_nonfinite=True,
                 apply_if=None, frozen=None):
    """Optimizer update with the non-finite guard: a step whose loss or gradients are not
    finite, or whose update would make the adapter or optimizer state non-finite (a NaN or inf
    learning rate, ``adam(eps=0)`` on a zero gradient), leaves the adapter and optimizer state
    unchanged and reports ``skipped = 1``.

    ``apply_if`` (a boolean scalar, or ``None``: always): where it is false the adapter and
    optimizer state are left unchanged too and the step reports ``no_targets = 1`` (a batch
    holding no loss term, :func:`make_step_fn`'s ``loss_weight``): its zero gradient would
    still move the adapter by AdamW's momentum and weight decay and advance the schedule.

    ``frozen`` (the adapter's frozen part, :func:`jpeft.split_frozen`; ``None``: none): entries
    of trained arrays that it marks as frozen (an :class:`~jpeft.AdapterBank` stack's ``lora_B``
    in its MiCA slots) keep their values bit for bit, whatever the optimizer's update
    (:func:`jpeft.methods.base.keep_frozen_entries`)."""

    def update(operands):
        adapter, opt_state, grads = operands
        updates, new_state = optimizer.update(grads, opt_state, adapter)
        new = after_update(optax.apply_updates(adapter, updates))
        return keep_frozen_entries(new, adapter, frozen), new_state

    def guarded(operands):
        new_adapter, new_state = update(operands)
        ok = all_finite(new_adapter) & all_finite(new_state)
        kept = jax.lax.cond(ok, lambda ops: ops[:2], lambda ops: ops[2:], (new_adapter, new_state, *operands[:2]))
        return (*kept, ok)

    finite = jnp.isfinite(loss) & all_finite(grads)
    keep = lambda ops: (ops[0], ops[1])  # noqa: E731
    if skip_nonfinite:
        go = finite if apply_if is None else finite & apply_if
        # One ``lax.cond`` on the flag, not a ``where`` per leaf: XLA would fuse a copy of the
        # scalar flag's computation (an ``and`` over every gradient leaf) into each leaf's
        # update, so the program would grow with the square of the number of adapter leaves
        # (38k extra ops for an 8-layer Llama with LoRA on all linear layers), and with it
        # compile time and compile memory.
        new_adapter, new_state, applied = jax.lax.cond(go, guarded, lambda ops: (*keep(ops), jnp.asarray(False)),
                                                       (adapter, opt_state, grads))
        finite = jnp.where(go, applied, finite)  # a step left out by apply_if is not a non-finite one
    elif apply_if is None:
        new_adapter, new_state = update((adapter, opt_state, grads))
    else:
        new_adapter, new_state = jax.lax.cond(apply_if, update, keep, (adapter, opt_state, grads))
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "skipped": (~finite).astype(jnp.int32)}
    if apply_if is not None:
        metrics["no_targets"] = (~jnp.asarray(apply_if)).astype(jnp.int32)
    if isinstance(aux, dict):
        taken = sorted(set(aux) & set(metrics))
        if taken:
            # the step's own loss, gradient norm and skip flag (which fit's non-finite guard reads) would be replaced
            raise ConfigError(f"the loss function's aux metrics use the step's own name(s) {taken} (the step reports "
                              f"{sorted(metrics)} itself); rename them, e.g. {'aux_' + taken[0]!r}.")
        metrics.update(aux)
    elif aux is not None and not (isinstance(aux, Mapping) and len(aux) == 0):  # an array aux: no == on tracers
        metrics["aux"] = aux
    return new_adapter, new_state, metrics


#: the names transformers' ``Trainer`` keeps out of weight decay (``get_decay_parameter_names``),
#: searched in a parameter's lower-cased dotted name
_NO_DECAY = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")
#: the parameters of a norm layer (flax names): a module holding ``scale`` and at most a ``bias``
_NORM_LEAVES = {"scale", "bias"}


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _no_decay_paths(tree, prefix: tuple = ()) -> set:
    """The name paths of the arrays that the adapter nodes in ``tree`` name in ``no_decay``,
    nodes inside nodes included (a layer-scanned site's ``scan.Stacked`` holds its ``inner``)."""
    out: set = set()
    nodes = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, Site) and x is not tree)[0]
    for path, node in nodes:
        if isinstance(node, Site):
            here = prefix + tuple(n for n in (_key_name(k) for k in path) if n)
            out |= {here + (field,) for field in node.no_decay} | _no_decay_paths(node, here)
    return out


def decay_mask(tree) -> Any:
    """Which arrays of a trainable tree weight decay applies to, chosen as transformers'
    ``Trainer`` chooses them (``get_decay_parameter_names``): every array but biases and the
    parameters of normalisation layers. An array is left out when its lower-cased dotted name
    (site path and field, ``/`` read as ``.``) contains ``bias``, ``layernorm`` or ``rmsnorm``,
    or has a ``norm`` or ``*_norm`` component, or when it belongs to a module whose arrays are a
    norm's (``scale`` and at most ``bias``: GPT-2's ``ln_1``, which the Trainer leaves out by
    its type), or when its adapter node names it in ``no_decay`` (prefix tuning's projection
    MLP's ``b1`` / ``b2``, PEFT's ``transform.<i>.bias``). Pass it as
    ``optax.adamw(..., mask=jpeft.train.decay_mask)``; ``jpeft train`` does.

    >>> import jax, jax.numpy as jnp, jpeft
    >>> tree = {"": {"params": {"ln_1": {"scale": jnp.ones(2), "bias": jnp.zeros(2)},
    ...                         "fc": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)}}}}
    >>> jax.tree.leaves(decay_mask(tree))  # fc.bias, fc.kernel, ln_1.bias, ln_1.scale
    [False, True, False, False]
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = [[n for n in (_key_name(k) for k in path) if n] for path, _ in flat]
    named = _no_decay_paths(tree)
    siblings: dict = {}
    for parts in names:
        siblings.setdefault(tuple(parts[:-1]), set()).add(parts[-1] if parts else "")

    def decays(parts) -> bool:
        dotted = ".".join(q for p in parts for q in p.split("/") if q).lower()
        if _NO_DECAY.search(dotted):
            return False
        if tuple(parts) in named:
            return False
        leaves = siblings[tuple(parts[:-1])]
        return not ("scale" in leaves and leaves <= _NORM_LEAVES)

    return jax.tree_util.tree_unflatten(treedef, [decays(parts) for parts in names])


def _split(adapter):
    """``(trainable, frozen)``; an adapter that is not a ``{path: node}`` dict is all trainable."""
    if isinstance(adapter, Mapping):
        return split_frozen(adapter)
    return adapter, None


def _join(train, frozen):
    return train if frozen is None else join_frozen(train, frozen)


def _check_opt_state(optimizer, train, opt_state, frozen) -> None:
    """At trace time: an optimizer state that is not ``optimizer.init`` of the trainable arrays
    (built for another adapter, for the whole adapter with its frozen arrays, or missing) is
    refused by name, not left to a tree-structure error deep inside optax."""
    want = jax.tree.structure(jax.eval_shape(optimizer.init, train))
    if jax.tree.structure(opt_state) == want:
        return
    if frozen is None or not jax.tree.leaves(frozen):
        raise ConfigError(
            f"the optimizer state does not fit this optimizer and adapter: expected the structure of "
            f"optimizer.init(adapter) ({want.num_leaves} arrays), found {jax.tree.structure(opt_state).num_leaves} "
            "arrays in another structure. Was it made for another adapter or optimizer? Build it with "
            "jpeft.init_opt_state(optimizer, adapter)."
        )
    raise ConfigError(
        "the optimizer state does not match the adapter's trainable arrays: this adapter holds frozen arrays "
        f"({len(jax.tree.leaves(frozen))} leaves, never trained), which get no optimizer state. Build it with "
        "jpeft.init_opt_state(optimizer, adapter) or optimizer.init(jpeft.trainable(adapter))."
    )


def _split_micro(x, k: int):
    """``[k * m, ...] -> [k, m, ...]`` with micro-batch ``j`` = examples ``j, j + k, j + 2k, ...``.

    The strided split keeps every micro-batch spread over all data shards, so a batch sharded
    along its first axis stays local to its devices (no resharding inside the scan)."""
    x = jnp.asarray(x)
    if x.ndim == 0 or x.shape[0] % k:
        raise InputValidationError(
            f"accumulate_steps={k} splits every batch leaf along its first axis, but found a leaf of shape "
            f"{tuple(x.shape)}; give a batch whose leading dimension is a multiple of {k} "
            f"(k micro-batches of equal size), or set accumulate_steps=1."
        )
    return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)


def _loss_weight_of(aux, loss_weight: str):
    """The scalar weight named ``loss_weight`` among a loss function's aux metrics."""
    if not isinstance(aux, Mapping) or loss_weight not in aux:
        found = sorted(aux) if isinstance(aux, Mapping) else type(aux).__name__
        raise ConfigError(
            f"loss_weight={loss_weight!r} names an aux metric of the loss function, but its aux metrics are {found}; "
            f"return (loss, {{{loss_weight!r}: n, ...}}) with n the number of terms the loss averages over (e.g. "
            f"`loss, n = jpeft.lm_loss(...); return loss, {{{loss_weight!r}: n}}`), or pass loss_weight=None."
        )
    w = jnp.asarray(aux[loss_weight])
    if w.ndim != 0:
        raise ConfigError(f"loss_weight={loss_weight!r}: the aux metric must be a scalar (the number of terms the "
                          f"loss averages over), found shape {tuple(w.shape)}.")
    return w.astype(jnp.float32)


def _map_weighted(fn, parts, loss_weight: str):
    """``fn`` over the float leaves of ``(loss, aux, grads)``, except ``aux[loss_weight]``."""
    loss, aux, grads = parts
    f = lambda x: fn(x) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact) else x  # noqa: E731
    aux = {k: (v if k == loss_weight else jax.tree.map(f, v)) for k, v in aux.items()}
    return f(loss), aux, jax.tree.map(f, grads)


def _scaled_by_weight(parts, loss_weight: str):
    """A part's ``(loss, aux, grads)`` with every float leaf times its weight. A part with
    weight 0 holds no term, so it adds exact zeros: its own mean over no terms may be NaN (a
    loss written ``sum / count`` divides 0 by 0 there), and ``NaN * 0`` would make the whole
    step's loss and gradients NaN and lose the other parts' terms."""
    w = _loss_weight_of(parts[1], loss_weight)
    return _map_weighted(lambda x: jnp.where(w > 0, x * w.astype(x.dtype), jnp.zeros_like(x)), parts, loss_weight)


def weighted_sum(parts, loss_weight: str, sum_parts: Callable):
    """Joins per-part ``(loss, aux, grads)``, each a mean over its ``aux[loss_weight]`` terms,
    into the mean over all terms: every float leaf is scaled by its part's weight, summed with
    ``sum_parts`` (e.g. ``lax.psum`` over devices) and divided by the summed weight (a total
    of 0, no terms at all, gives 0; a part of weight 0 adds zeros, even where its own mean is
    NaN); the weight itself and integer metrics are summed."""
    summed = jax.tree.map(sum_parts, _scaled_by_weight(parts, loss_weight))
    return _divide_by_weight(summed, loss_weight)


def _divide_by_weight(summed, loss_weight: str):
    total = _loss_weight_of(summed[1], loss_weight)
    denom = jnp.where(total > 0, total, 1.0)
    return _map_weighted(lambda x: x / denom.astype(x.dtype), summed, loss_weight)


def accumulate_loss_and_grad(loss_fn: Callable, params, adapter, batch, key, steps: int, *,
                             loss_weight: Optional[str] = None):
    """:func:`loss_and_grad` over ``steps`` micro-batches with a ``lax.scan``.

    Micro-batch ``j`` is examples ``j, j + steps, ...`` and gets the key ``fold_in(key, j)``;
    ``steps=1`` is exactly :func:`loss_and_grad`. How the micro-batches combine:

    * ``loss_weight=None``: loss, float aux metrics and gradients are averaged, integer aux
      metrics summed. This equals one call on the whole batch when the loss is a mean over
      examples (every micro-batch holds the same number).
    * ``loss_weight="targets"`` (the name of an aux metric holding the number of terms the
      loss averages over, e.g. the count :func:`jpeft.lm_loss` returns): each micro-batch
      counts by that number, and the metric itself is summed. This equals one call on the
      whole batch for a per-token mean whose rows hold different numbers of loss tokens
      (padding, prompt/completion masks), which the plain average does not. A micro-batch
      whose count is 0 weighs nothing, even when its own mean is NaN (``sum / count`` of a
      micro-batch whose every label is masked).
    """
    if steps == 1:
        (loss, aux), grads = loss_and_grad(loss_fn, params, adapter, batch, key)
        if loss_weight is not None:  # no term: zeros, as for a total of 0 over micro-batches (not its own 0 / 0)
            w = _loss_weight_of(aux, loss_weight)
            loss, aux, grads = _map_weighted(lambda x: jnp.where(w > 0, x, jnp.zeros_like(x)), (loss, aux, grads),
                                             loss_weight)
        return (loss, aux), grads
    micro = jax.tree.map(lambda x: _split_micro(x, steps), batch)

    def one(mb, j):
        k = None if key is None else jax.random.fold_in(key, j)
        (loss, aux), grads = loss_and_grad(loss_fn, params, adapter, mb, k)
        parts = (loss, aux, grads)
        return parts if loss_weight is None else _scaled_by_weight(parts, loss_weight)

    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(one, first, jnp.int32(0))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def body(acc, xs):
        mb, j = xs
        return jax.tree.map(jnp.add, acc, one(mb, j)), None

    summed, _ = jax.lax.scan(body, zeros, (micro, jnp.arange(steps, dtype=jnp.int32)))
    if loss_weight is None:
        loss, aux, grads = summed

        def mean(x):
            return x / steps if jnp.issubdtype(x.dtype, jnp.inexact) else x

        return (mean(loss), jax.tree.map(mean, aux)), jax.tree.map(mean, grads)
    loss, aux, grads = _divide_by_weight(summed, loss_weight)
    return (loss, aux), grads


def make_step_fn(
    loss_fn: Callable,
    optimizer: optax.GradientTransformation,
    *,
    skip_nonfinite: bool = True,
    accumulate_steps: int = 1,
    grad_reduce: Optional[Callable] = None,
    loss_weight: Optional[str] = None,
):
    """The un-jitted step body, for composing into pmap / shard_map / custom loops.

    ``accumulate_steps=k`` splits the batch into ``k`` micro-batches (see
    :func:`accumulate_loss_and_grad`, which also says what ``loss_weight`` does); one call is
    still one optimizer update. With ``loss_weight``, a batch whose count is 0 (no loss term:
    every label masked, e.g. a prompt/completion row whose completion the length cut off) leaves
    the adapter and optimizer state unchanged and reports ``metrics["no_targets"] = 1`` (not
    ``skipped``: nothing diverged); its zero gradient would otherwise still move the adapter by
    the optimizer's momentum and weight decay (transformers' ``Trainer`` gets a NaN loss there).
    ``grad_reduce((loss, aux, grads)) -> (loss, aux, grads)`` runs before the update, e.g. a
    ``lax.pmean`` over a ``pmap`` axis (:func:`jpeft.make_pmap_train_step` uses it). With
    ``loss_weight`` a plain ``pmean`` would weigh every device's mean alike, whatever its count;
    reduce with :func:`weighted_sum` instead (``lambda t: weighted_sum(t, loss_weight, lambda x:
    lax.psum(x, axis))``, as :func:`jpeft.make_pmap_train_step` does).
    """
    if isinstance(accumulate_steps, bool) or not isinstance(accumulate_steps, int) or accumulate_steps < 1:
        raise ConfigError(f"accumulate_steps must be a positive integer, found {accumulate_steps!r}.")

    def step(params, adapter, opt_state, batch, key):
        train, frozen = _split(adapter)

        def loss_of_trainable(params, train, batch, key):
            return loss_fn(params, _join(train, frozen), batch, key)

        (loss, aux), grads = accumulate_loss_and_grad(loss_of_trainable, params, train, batch, key, accumulate_steps,
                                                      loss_weight=loss_weight)
        if grad_reduce is not None:
            loss, aux, grads = grad_reduce((loss, aux, grads))
        _check_opt_state(optimizer, train, opt_state, frozen)
        # a batch without a loss term (every label masked) updates nothing: see apply_update's apply_if
        has_terms = None if loss_weight is None else _loss_weight_of(aux, loss_weight) > 0
        new_train, new_state, metrics = apply_update(optimizer, train, opt_state, grads, loss, aux,
                                                     skip_nonfinite=skip_nonfinite, apply_if=has_terms, frozen=frozen)
        return _join(new_train, frozen), new_state, metrics

    return step


def make_train_step(
    loss_fn: Callable,
    optimizer: optax.GradientTransformation,
    *,
    donate: bool = True,
    skip_nonfinite: bool = True,
    accumulate_steps: int = 1,
    loss_weight: Optional[str] = None,
    compiler_options: Optional[Mapping[str, Any]] = None,
):
    """A jitted ``step(params, adapter, opt_state, batch, key) -> (adapter, opt_state, metrics)``.

    The adapter and optimizer-state buffers are donated (pass ``donate=False`` to keep the
    inputs usable); a call given ones an earlier call donated raises ``InputValidationError``
    naming the argument (an :class:`~jpeft.AdapterBank`'s ``weights`` too), not JAX's bare
    "Buffer has been deleted or donated". ``metrics`` holds ``loss``, ``grad_norm``, ``skipped`` (1 when the
    non-finite guard skipped the update) and whatever dict ``loss_fn`` returned as aux.
    ``accumulate_steps=k`` computes the gradients ``k`` equal micro-batches of the batch at a
    time inside the step (a ``lax.scan``), with ``1/k`` of the activation memory; one call is
    one optimizer update. It equals one step on the whole batch when the loss is a mean over
    examples; for a mean over tokens (:func:`jpeft.lm_loss`), whose rows hold different
    numbers of loss tokens, return the count as an aux metric and name it:
    ``loss_weight="targets"`` with ``return loss, {"targets": n}`` weighs each micro-batch by
    its tokens (:func:`jpeft.train.accumulate_loss_and_grad`); a batch with no loss token then
    updates nothing and reports ``no_targets = 1`` (:func:`jpeft.train.make_step_fn`). ``compiler_options`` are XLA
    options for this step's compilation only (``jax.jit(..., compiler_options=...)``); e.g.
    ``{"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}`` stops XLA's CPU backend
    from converting a layer-scanned bfloat16 model's whole weight stack to float32 ahead of
    the layer loop (it upcasts bf16 matmuls; docs/BENCHMARKS.md), which otherwise costs two
    float32 copies' worth of memory.

    >>> import jax, jax.numpy as jnp, flax.linen as nn, optax, jpeft
    >>> model = nn.Dense(1); x = jnp.ones((8, 3)); y = jnp.zeros((8, 1))
    >>> params = model.init(jax.random.key(0), x)
    >>> adapter = jpeft.init(jpeft.LoraConfig(r=2, target_modules=".*"), params, jax.random.key(1))
    >>> def loss_fn(params, adapter, batch, key):
    ...     pred = jpeft.apply(model, params, adapter, batch["x"])
    ...     return jnp.mean((pred - batch["y"]) ** 2)
    >>> opt = optax.adam(1e-2)
    >>> step = jpeft.make_train_step(loss_fn, opt)
    >>> adapter, state, metrics = step(params, adapter, opt.init(adapter), {"x": x, "y": y}, jax.random.key(2))
    >>> sorted(metrics)
    ['grad_norm', 'loss', 'skipped']
    """
    body = make_step_fn(loss_fn, optimizer, skip_nonfinite=skip_nonfinite, accumulate_steps=accumulate_steps,
                        loss_weight=loss_weight)
    jitted = jax.jit(body, donate_argnums=(1, 2) if donate else (),
                     compiler_options=dict(compiler_options) if compiler_options else None)
    return DonationNamed(jitted) if donate else jitted


class DonationNamed:
    """A donating step that names an argument an earlier call consumed: given the adapter (an
    :class:`~jpeft.AdapterBank`'s ``weights`` included) or optimizer state that a step already donated,
    the jitted call fails with JAX's bare "Buffer has been deleted or donated" (a ValueError) or "Array
    has been deleted" (a RuntimeError); that failure is turned into an :class:`~jpeft.errors.InputValidationError`
    naming the argument and the array, looked for only then, so a step that runs costs nothing more. A
    deleted array of an argument the step does not donate (``params``, ``batch``, ``key``) was deleted
    before the call (``x.delete()``, another function's donation), and the message says so; one of the
    adapter or optimizer state cannot be told from a donated one (JAX marks both alike), so that message
    names the donation and ``x.delete()`` both. Every
    other attribute (``lower``, ``trace``, ...) is the jitted function's. ``builder``: the function that
    built the step, named in the message (the sharded and pmap steps of :mod:`jpeft.parallel` donate too)."""

    def __init__(self, jitted, builder: str = "jpeft.make_train_step"):
        self._jitted = jitted
        self._builder = builder
        self.__wrapped__ = jitted
        self.__doc__ = jitted.__doc__

    def __getattr__(self, name):
        if name == "_jitted":  # not set yet (a copy or unpickling): no recursion
            raise AttributeError(name)
        return getattr(self._jitted, name)

    def __call__(self, *args, **kwargs):
        try:
            return self._jitted(*args, **kwargs)
        except (ValueError, RuntimeError) as e:
            if "deleted" not in str(e):
                raise
            found = _deleted_argument(args, kwargs)
            if found is None:
                raise
            if found[0] not in _DONATED_ARGS:  # this step never consumes it: deleted before the call
                raise InputValidationError(
                    f"the {found[0]} given to this training step hold a deleted array ({found[1]}); {self._builder} "
                    f"donates only its adapter and optimizer-state arguments, so this one was deleted before the call "
                    "(x.delete(), or donated to another jitted function). Pass arrays that are still alive.") from None
            # a donated array and one deleted by x.delete() look the same to JAX: the donation, the likely one, first
            raise InputValidationError(
                f"the {found[0]} given to this training step was donated to an earlier call of it and is gone "
                f"({found[1]} is deleted; or it was deleted some other way, x.delete(), which looks the same): "
                f"{self._builder} donates its adapter and optimizer-state arguments. "
                "Pass what the previous call returned (adapter, opt_state, metrics = step(params, adapter, opt_state, "
                "batch, key)); for an AdapterBank, bank = bank.with_weights(adapter) and step on bank.weights; or "
                f"build the step with {self._builder}(..., donate=False) to keep its inputs usable.") from None


_STEP_ARGS = ("params", "adapter", "opt_state", "batch", "key")
_DONATED_ARGS = ("adapter", "opt_state")  # donate_argnums=(1, 2) of every donating step


def _deleted_argument(args, kwargs) -> Optional[tuple]:
    """``(argument name, leaf path)`` of the first array among a step's arguments that has been deleted
    (donated), or ``None``."""
    named = list(zip(_STEP_ARGS, args)) + list(kwargs.items())
    for name, tree in named:
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
            if hasattr(x, "is_deleted") and x.is_deleted():
                return name, jax.tree_util.keystr(path) or "the array"
    return None
