"""The public entry points: init, apply, lm_loss, merge, unmerge, summary."""

from __future__ import annotations

import math
import warnings
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jpeft import _inject, quant, scan
from jpeft.config import AdapterConfig
from jpeft.data import token_nll, causal_lm_loss, causal_lm_loss_chunked
from jpeft.errors import ConfigError, InputValidationError, ShapeMismatchError
from jpeft.methods.base import check_adapter, check_kernel_fn_merge, check_reads_outside, method_of, split_frozen
from jpeft.validate import check_key, is_single_key
from jpeft.tree import (count, get_subtree, is_half_float, is_nnx, is_nnx_module, loaded_nnx, nbytes, nnx_state_of,
                        rewrap_params, set_subtree, unbox, unwrap_params)


def init(config: AdapterConfig, params, key, model: Optional[nn.Module] = None, *model_args, **model_kwargs) -> dict:
    """Creates a new adapter for ``params``: a plain dict ``{module_path: node}`` holding only
    the trainable arrays.

    Args:
      config: a method config such as :class:`jpeft.LoraConfig`.
      params: the base model's variables (``{"params": ...}``) or its bare params tree.
      key: a ``jax.random`` key.
      params may also be the ``nnx.State`` of a ``flax.nnx`` model (``graphdef, state =
        nnx.split(model)``) or the ``nnx.Module`` itself, and ``model`` its ``graphdef`` or the
        module (docs/NNX.md).
      model, *model_args, **model_kwargs: optional. Needed only when a targeted module has a
        kernel whose input and output axes cannot be told from its shape (``nn.DenseGeneral``
        with several feature axes, ``nn.Conv``, ``nn.Einsum``) or when the method needs
        module output widths: the model is traced once with ``jax.eval_shape`` on the
        example inputs (nothing is computed).

    >>> import jax, jax.numpy as jnp, flax.linen as nn, jpeft
    >>> model = nn.Dense(4)
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 3)))
    >>> adapter = jpeft.init(jpeft.LoraConfig(r=2, alpha=4, target_modules=".*"), params, jax.random.key(1))
    >>> {k: (v.lora_A.shape, v.lora_B.shape) for k, v in adapter.items()}
    {'': ((3, 2), (2, 4))}
    """
    if not isinstance(config, AdapterConfig):
        raise ConfigError(f"jpeft.init expects a method config such as jpeft.LoraConfig, found {type(config).__name__}.")
    check_key(key, where="jpeft.init")
    fn = method_of(config).init
    if is_nnx(params) or (model is not None and is_nnx(model)):
        from jpeft import _nnx  # flax.nnx: on the NNX path only (docs/ARCHITECTURE.md, "Start-up time")

        state = _nnx.split(params, None)[1] if is_nnx(params) else params
        infos = None
        if model is not None:
            graphdef, state = _nnx.split(model, state)
            infos = _nnx.trace(graphdef, state, *model_args, **model_kwargs)
        adapter = fn(config, unwrap_params(state)[0], key, infos)
        check_reads_outside(adapter, infos)
        return adapter
    if quant.has_quantized(params):  # methods read the kernels they adapt (DoRA's norms, PiSSA's SVD)
        params = quant.dequantize(params)
    params = unbox(params)  # nn.with_partitioning's boxes: the arrays, as model.apply reads them
    infos = None
    if model is not None:
        variables = params if "params" in params and isinstance(params["params"], Mapping) else {"params": params}
        infos = _inject.trace(model, variables, *model_args, **model_kwargs)
    return init_from_trace(config, params, key, infos)


def init_from_trace(config: AdapterConfig, params, key, infos) -> dict:
    """:func:`init` of a linen model's plain ``params`` with the model's trace given instead of
    the model: ``infos`` from :func:`jpeft._inject.init_and_trace`, which traces the model
    while making its (abstract) params, so that :func:`jpeft.budget.budget` traces a 7B model
    once, not twice."""
    adapter = method_of(config).init(config, unwrap_params(params)[0], key, infos)
    check_reads_outside(adapter, infos)
    return adapter


def apply(model: nn.Module, params, adapter: Optional[Mapping[str, Any]], *args, rngs=None, **kwargs):
    """Runs ``model`` with ``adapter`` applied at its sites: ``model.apply(params, *args, ...)``
    with each targeted module's call adapted. ``model`` is any ``flax.linen.Module``; it needs
    no jpeft code. ``adapter=None`` runs the bare base. Extra keyword arguments go to
    ``model.apply`` (``method=``, ``mutable=``, the model's own keywords).

    For a ``flax.nnx`` model, ``model`` is its ``graphdef`` (or the ``nnx.Module``, with
    ``params=None`` for its own state) and ``params`` the ``nnx.State`` from ``nnx.split``:
    a pure function of ``(graphdef, state, adapter, inputs)`` (``jpeft/_nnx.py``, docs/NNX.md).

    LoRA dropout is active only when ``rngs`` holds a ``"dropout"`` key; a bare key
    (``rngs=key``) is that key, ``{"dropout": key}``, for linen as for NNX models (flax's own
    ``model.apply(..., rngs=key)`` would make it the ``"params"`` stream, leaving dropout off);
    anything else (an ``nnx.Rngs``, a seed) is an :class:`~jpeft.errors.InputValidationError`.

    A site at a module that runs inside ``nn.map_variables`` on a transformed view of its params
    (``trans_in_fn``; ``nn.WeightNorm``, ``nn.SpectralNorm``) raises
    :class:`~jpeft.errors.UnsupportedModuleError`: :func:`merge` could not fold the adapter into
    the stored params the same way. A first argument that is no model (the model left out) and
    params and adapter passed the other way round raise :class:`~jpeft.errors.ConfigError`.

    >>> import jax, jax.numpy as jnp, flax.linen as nn, jpeft
    >>> model = nn.Dense(4); x = jnp.ones((2, 3))
    >>> params = model.init(jax.random.key(0), x)
    >>> adapter = jpeft.init(jpeft.LoraConfig(target_modules=".*"), params, jax.random.key(1))
    >>> bool(jnp.array_equal(jpeft.apply(model, params, adapter, x), model.apply(params, x)))
    True
    """
    if not is_nnx(model) and not callable(getattr(model, "apply", None)):  # a dict failed as "takes an adapter"
        raise ConfigError(
            "jpeft.apply(model, params, adapter, *inputs) takes the model first (a flax.linen Module, or an NNX graphdef "
            f"or module), found {type(model).__name__}"
            + (": was the model left out?" if isinstance(model, Mapping) else "."))
    if adapter is not None:  # a (config, adapter) pair or a dict of arrays failed deep inside with a raw AttributeError
        check_adapter(adapter, "jpeft.apply", params=params)
    if is_nnx(model):
        from jpeft import _nnx  # flax.nnx: on the NNX path only (docs/ARCHITECTURE.md, "Start-up time")

        graphdef, state = _nnx.split(model, params)
        return _nnx.apply_with(graphdef, state, adapter or {}, *args, rngs=dropout_rngs(rngs), **kwargs)
    return _apply_linen(model, params, adapter, *args, rngs=rngs, **kwargs)


def _apply_linen(model: nn.Module, params, adapter, *args, rngs=None, called: Optional[set] = None, **kwargs):
    """:func:`apply` for a linen model; ``called`` as in :func:`jpeft._inject.apply_with`."""
    variables = params if isinstance(params, Mapping) and "params" in params and isinstance(params["params"], Mapping) else {"params": params}
    variables = unbox(variables)  # nn.with_partitioning's boxes: the arrays, as model.apply reads them
    rngs = dropout_rngs(rngs)
    if rngs is not None:
        kwargs["rngs"] = rngs
    if not adapter and not quant.has_quantized(variables):
        return model.apply(variables, *args, **kwargs)
    return _inject.apply_with(model, variables, adapter or {}, *args, called=called, **kwargs)


def dropout_rngs(rngs):
    """``rngs`` as a dict of streams: a bare key is the ``"dropout"`` stream's (as for NNX models).

    Raises:
      InputValidationError: ``rngs`` is neither a dict of streams nor one ``jax.random`` key (an
        ``nnx.Rngs``, a seed), which would fail deep inside JAX or flax."""
    if rngs is None or isinstance(rngs, Mapping):
        return rngs
    if not is_single_key(rngs):
        nnx = loaded_nnx()
        is_rngs = nnx is not None and isinstance(rngs, nnx.Rngs)
        found = type(rngs).__name__ + ("" if is_rngs else f" {rngs!r}"[:80])
        hint = (" jpeft.apply is a pure function and does not draw from (or advance) an nnx.Rngs: pass a key "
                "drawn from it, rngs={'dropout': rngs.dropout()}." if is_rngs else " Pass rngs={'dropout': key}.")
        raise InputValidationError(
            "rngs must be a dict of keys ({'dropout': key}) or one jax.random key (jax.random.key(seed)), found "
            f"{found}.{hint}"
        )
    return {"dropout": rngs}


def logits_of(out):
    """The logits array of a model output (an array, a tuple whose first item is the logits,
    or an object/dict with a ``logits`` entry)."""
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def default_chunk_tokens() -> int:
    """:func:`lm_loss`'s ``chunk_tokens="auto"``: 256 on the CPU (the output layer and loss
    alone ran fastest with 256-1,024 tokens a chunk; 256 holds the least memory of those;
    docs/BENCHMARKS.md "Session 34"), 2,048 on
    accelerators (not measured there: large enough to keep a matrix unit busy, small enough
    that a 256k-word vocabulary's chunk is 2 GiB in float32)."""
    return 256 if jax.default_backend() == "cpu" else 2048


def _root_sites_run_in_parts(adapter) -> bool:
    """Whether a site at the model's root (prefix and prompt tuning act on the whole call) also
    acts on the ``hidden_states`` and ``logits`` calls: those adapters take the whole logits."""
    node = (adapter or {}).get("")
    return node is None or (node.handles("hidden_states") and node.handles("logits"))


def lm_loss(model, params, adapter: Optional[Mapping[str, Any]], input_ids, loss_mask, *, rngs=None,
            chunk_tokens: Any = "auto", **kwargs):
    """The mean next-token cross-entropy of the adapted causal LM on ``input_ids``, weighted
    by ``loss_mask``: ``jpeft.data.causal_lm_loss(jpeft.apply(model, params, adapter,
    input_ids, rngs=rngs, **kwargs), input_ids, loss_mask)``, without the whole logits.

    For a model with ``hidden_states`` and ``logits`` methods (jpeft's causal LMs: the Llama
    family and GPT-2) the output layer and the loss run a chunk of about ``chunk_tokens``
    tokens at a time (:func:`jpeft.data.causal_lm_loss_chunked`): the ``[B, L, vocab]``
    logits and their gradient never exist whole: the step's temporary memory is 15-78 %
    smaller at 8k-128k-word vocabularies, its time on the CPU unchanged within the noise
    (docs/BENCHMARKS.md, "Session 34"). Any other model, an adapter acting on the model's whole call
    (prefix and prompt tuning), and ``chunk_tokens=None`` take the whole logits. The chunked
    loss has its own backward pass (a ``custom_vjp``), so it supports reverse mode only: for
    forward mode (``jax.jvp``, ``jax.jacfwd``, Hessian-vector products) pass ``chunk_tokens=None``.
    With prompt tuning the last virtual token's logits predict token 0 (weighted by
    ``loss_mask[:, 0]``), as in Hugging Face PEFT, whose labels get ``-100`` for the virtual
    tokens only; ``causal_lm_loss(jpeft.apply(...))`` sees the real tokens' logits alone and
    leaves that prediction out.
    The value and the gradients are the same either way up to float rounding; LoRA dropout
    at the output layer draws its masks chunk by chunk (the key folded with the chunk's
    number), so with dropout the two differ by which masks were drawn.

    Args:
      model, params, adapter, rngs, **kwargs: as for :func:`apply` (``attention_mask``,
        ``segment_ids``, ``position_ids``, ...).
      input_ids, loss_mask: ``[B, L]``; ``loss_mask[:, t]`` weighs the prediction of token ``t``.
      chunk_tokens: tokens per chunk, ``"auto"`` (:func:`default_chunk_tokens`) or ``None``.

    Returns:
      ``(mean_loss, number_of_targets)``.

    >>> import jax, jax.numpy as jnp, jpeft
    >>> from jpeft.models import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1,
    ...                   num_heads=2)
    >>> model = LlamaForCausalLM(cfg); ids = jnp.arange(12).reshape(2, 6)
    >>> params = model.init(jax.random.key(0), ids)
    >>> adapter = jpeft.init(jpeft.LoraConfig(target_modules=["q_proj", "lm_head"]), params, jax.random.key(1))
    >>> mask = jnp.ones_like(ids)
    >>> whole = jpeft.data.causal_lm_loss(jpeft.apply(model, params, adapter, ids), ids, mask)
    >>> chunked = jpeft.lm_loss(model, params, adapter, ids, mask, chunk_tokens=4)
    >>> bool(jnp.allclose(whole[0], chunked[0], rtol=1e-6)), int(chunked[1])
    (True, 10)
    """
    rngs = dropout_rngs(rngs)
    if isinstance(chunk_tokens, str):
        if chunk_tokens != "auto":
            raise ConfigError(f"chunk_tokens must be a positive int, 'auto' or None, found {chunk_tokens!r}.")
        chunk_tokens = default_chunk_tokens()
    root = (adapter or {}).get("")
    node, lead = (root, 0) if root is None else root.loss_view()
    if lead:
        # a root site whose outputs keep `lead` positions before the first real token (prompt
        # tuning's last virtual token): the last of them predicts token 0, as in Hugging Face
        # PEFT, whose labels get -100 for the virtual tokens only
        a = dict(adapter)
        a[""] = node
        logits = logits_of(apply(model, params, a, input_ids, rngs=rngs, **kwargs))
        n = input_ids.shape[1]
        nll, _ = token_nll(logits[:, lead - 1:lead - 1 + n], input_ids)
        w = loss_mask.astype(jnp.float32)
        count = w.sum()
        return (nll * w).sum() / jnp.maximum(count, 1.0), count
    parts = (not is_nnx(model) and callable(getattr(model, "hidden_states", None))
             and callable(getattr(model, "logits", None)) and _root_sites_run_in_parts(adapter))
    if chunk_tokens is None or not parts:
        out = apply(model, params, adapter, input_ids, rngs=rngs, **kwargs)
        return causal_lm_loss(logits_of(out), input_ids, loss_mask)
    called: set = set()
    hidden = _apply_linen(model, params, adapter, input_ids, rngs=rngs, called=called, method="hidden_states", **kwargs)

    def head(args, h, i):
        p, a, r = args
        r = None if r is None else {name: jax.random.fold_in(k, i) for name, k in r.items()}
        return _apply_linen(model, p, a, h, rngs=r, called=called, method="logits")

    out = causal_lm_loss_chunked(head, (params, adapter, rngs), hidden, input_ids, loss_mask, chunk_tokens=chunk_tokens)
    _inject.check_called(adapter, called, unwrap_params(params)[0])
    return out


class RoundingTally:
    """How much of a merge's update the rounding to a 16-bit float kernel loses: ``add`` each
    merged module's params before, merged exactly (float32) and as stored; ``warn`` once at the
    end when more than a tenth of the update (by norm) was rounded away. Leaves traced under
    ``jit`` are not looked at."""

    LIMIT = 0.1

    def __init__(self):
        self.lost = self.update = 0.0
        self.unchanged = self.entries = 0
        self.dtypes: set = set()

    @staticmethod
    def low(x) -> bool:
        """A concrete floating array of fewer than 32 bits (bfloat16, float16)."""
        return is_half_float(getattr(x, "dtype", None)) and not isinstance(x, jax.core.Tracer)

    def add(self, before, exact, stored) -> None:
        for k, m in stored.items():
            b, e = before.get(k), exact.get(k)
            if not self.low(m) or not hasattr(b, "shape") or not hasattr(e, "shape") or tuple(b.shape) != tuple(m.shape):
                continue
            # on the devices (a sharded kernel stays where it is); only the four sums come back
            b32, e32, m32 = (jnp.asarray(v, jnp.float32) for v in (b, e, m))
            changed = e32 != b32
            self.lost += float(jnp.sum((m32 - e32) ** 2))
            self.update += float(jnp.sum((e32 - b32) ** 2))
            self.unchanged += int(jnp.sum(changed & (m32 == b32)))
            self.entries += int(jnp.sum(changed))
            self.dtypes.add(str(jnp.dtype(m.dtype)))

    def warn(self, where: str, stacklevel: int = 4) -> None:
        if self.update <= 0 or math.sqrt(self.lost / self.update) <= self.LIMIT:
            return
        warnings.warn(
            f"{where}: the merged weights are {'/'.join(sorted(self.dtypes))}, whose rounding lost "
            f"{100 * math.sqrt(self.lost / self.update):.0f}% of the adapter's update (norm of the rounding error over "
            f"the update's; {100 * self.unchanged / max(self.entries, 1):.0f}% of the updated weights kept their base "
            "value), so the merged model does not compute what the adapter does. Merge into float32 params "
            "(jax.tree.map(lambda w: w.astype(jnp.float32), params)) and keep them float32, or serve the adapter "
            "unmerged.", UserWarning, stacklevel=stacklevel)


def _f32(own):
    """``own`` with its 16-bit float leaves in float32 (to merge exactly, for :class:`RoundingTally`)."""
    return jax.tree.map(lambda x: x.astype(jnp.float32) if RoundingTally.low(x) else x, own)


def _fold(params, adapter, how: str):
    check_adapter(adapter, f"jpeft.{how}", params=params)
    if is_nnx_module(params):  # an NNX model in, a new NNX model out
        from jpeft import _nnx  # flax.nnx: on the NNX path only (docs/ARCHITECTURE.md, "Start-up time")

        return _nnx.fold_module(params, adapter, lambda state: _fold(state, adapter, how))
    if quant.has_quantized(params):
        params = quant.dequantize(params)
    inner, wrapped = unwrap_params(params)
    new = inner
    tally = RoundingTally()
    for path, node in adapter.items():
        if not getattr(node, "mergeable", False) and how in ("merge", "unmerge"):
            node.merge({})  # raises NotMergeableError with the method's message
        if how == "merge":  # unmerge subtracts what merge added, whatever the module computes with it
            check_kernel_fn_merge(path, getattr(getattr(node, "unstacked", node), "layout", None))
        try:
            own = get_subtree(new, path)
        except (KeyError, TypeError):
            raise ShapeMismatchError(
                f"the adapter has a site {path!r} that the params do not have; was it made for another model?"
            ) from None
        if hasattr(node, "check_params"):
            node.check_params(path, own)
        out = getattr(node, how)(own)
        if how == "merge" and isinstance(own, Mapping) and any(RoundingTally.low(x) for x in jax.tree.leaves(own)):
            tally.add(own, node.merge(_f32(own)), out)
        new = set_subtree(new, path, out)
    tally.warn(f"jpeft.{how}", stacklevel=4)
    return rewrap_params(params, new, wrapped)


def merge(params, adapter: Mapping[str, Any]):
    """Folds the adapter into a copy of the base weights: ``model.apply(merge(p, a), x)``
    equals ``jpeft.apply(model, p, a, x)``. Raises
    :class:`~jpeft.errors.NotMergeableError` for methods that cannot merge, and for a site on a
    module that computes with its own function of its kernel (a fake-quantizing ``dot_general``
    that :func:`jpeft.transparent_dot_general` has not declared), which ``jpeft.init`` given the
    model records in the site's layout: the merged kernel would go through that function, the
    applied update does not (docs/METHODS.md). Params boxed by
    ``nn.with_partitioning`` come back unboxed (``nn.get_partition_spec`` of the boxed ones
    keeps their specs).

    On a quantized base (:func:`jpeft.quantize`) the result is the dequantized base with the
    adapter folded in, in the kernels' original dtype: re-quantizing would round the update
    away, as PEFT warns. ``jpeft.quantize(jpeft.merge(q, a), scheme)`` does it on purpose.
    Into 16-bit float kernels (bfloat16, float16) the update is added in float32 and rounded to
    the kernel's dtype; a ``UserWarning`` says when that rounding lost more than a tenth of it
    (merge into float32 params instead). Raises :class:`~jpeft.errors.ConfigError` for an
    ``adapter`` that is not a ``{path: node}`` dict (e.g. the ``(config, adapter)`` pair of
    :func:`jpeft.load_adapter`, or the params, given in the adapter's place and the adapter in theirs).

    >>> import jax, jax.numpy as jnp, flax.linen as nn, jpeft
    >>> model, x = nn.Dense(4), jnp.ones((2, 3))
    >>> params = model.init(jax.random.key(0), x)
    >>> adapter = jpeft.init(jpeft.LoraConfig(r=2, target_modules=".*", init_weights="random"), params, jax.random.key(1))
    >>> merged = jpeft.merge(params, adapter)  # plain params: no jpeft needed to run them
    >>> bool(jnp.allclose(model.apply(merged, x), jpeft.apply(model, params, adapter, x), atol=1e-6))
    True
    """
    return _fold(params, adapter, "merge")


def unmerge(merged, adapter: Mapping[str, Any]):
    """Inverse of :func:`merge` (up to float rounding): recovers the base weights. Raises
    :class:`~jpeft.errors.NotInvertibleError` (a :class:`~jpeft.errors.NotMergeableError`)
    where the merged weights no longer determine the base (DoRA, LN tuning, full fine-tuning,
    trained base biases, (IA)^3 scales of zero): keep the original params, which :func:`merge`
    never modifies.

    >>> import jax, jax.numpy as jnp, flax.linen as nn, jpeft
    >>> params = nn.Dense(4).init(jax.random.key(0), jnp.ones((1, 3)))
    >>> adapter = jpeft.init(jpeft.LoraConfig(r=2, target_modules=".*", init_weights="random"), params, jax.random.key(1))
    >>> back = jpeft.unmerge(jpeft.merge(params, adapter), adapter)
    >>> bool(jnp.allclose(back["params"]["kernel"], params["params"]["kernel"], atol=1e-6))
    True
    >>> dora = jpeft.init(jpeft.LoraConfig(r=2, target_modules=".*", use_dora=True), params, jax.random.key(1))
    >>> jpeft.unmerge(jpeft.merge(params, dora), dora)
    Traceback (most recent call last):
    jpeft.errors.NotInvertibleError: a merged DoRA adapter cannot be unmerged: ...
    """
    return _fold(merged, adapter, "unmerge")


def summary(params, adapter: Optional[Mapping[str, Any]], *, print_fn=print) -> dict:
    """Counts trainable (adapter) and base parameters and prints one line like Hugging Face
    PEFT's ``print_trainable_parameters``. Works on ``jax.ShapeDtypeStruct`` trees, so a
    budget can be computed with ``jax.eval_shape`` without allocating.

    Returns:
      ``{"trainable", "frozen", "base", "total", "share", "trainable_bytes", "sites"}`` where
      ``frozen`` counts the adapter's frozen arrays (saved with it, never trained; see
      :func:`jpeft.methods.base.split_frozen`), which ``trainable`` leaves out, and ``share``
      is ``trainable / total`` (as Hugging Face reports it) and ``total`` is the number of
      parameters the adapted model has: ``base + trainable``, except that arrays which stand
      in for the base's own (full fine-tuning's trainable copy, LoRA's trained base biases)
      are not counted twice (each node's ``added_params``), so full fine-tuning reports
      ``total = base`` and a share of 100 %.

    >>> import jax, jax.numpy as jnp, flax.linen as nn, jpeft
    >>> from jpeft import FullFinetuneConfig
    >>> params = nn.Dense(4).init(jax.random.key(0), jnp.ones((1, 3)))
    >>> s = jpeft.summary(params, jpeft.init(FullFinetuneConfig(), params, jax.random.key(1)))
    trainable params: 16 || all params: 16 || trainable%: 100.0000 (base 16; 1 adapted sites)
    """
    inner, _ = unwrap_params(nnx_state_of(params))
    base = count(quant.abstract(inner))
    train, froz = split_frozen(adapter) if adapter else ({}, {})
    trainable = count(train)
    frozen = count(froz)
    # frozen arrays are not parameters of the model (PEFT's VeRA keeps its projections as buffers, outside "all params")
    added = sum(node.added_params(train[p]) if hasattr(node, "added_params") else count(train[p])
                for p, node in (adapter or {}).items())
    total = base + added
    share = trainable / total if total else 0.0
    out = {
        "trainable": trainable,
        "frozen": frozen,
        "base": base,
        "total": total,
        "share": share,
        "trainable_bytes": nbytes(train),
        # a layer-scanned site is one per layer, as on the unrolled model
        "sites": sum(n.length if isinstance(n, scan.Stacked) else 1 for n in adapter.values()) if adapter else 0,
    }
    if print_fn is not None:
        extra = f"; {frozen:,} frozen adapter params" if frozen else ""
        print_fn(
            f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * share:.4f} "
            f"(base {base:,}; {out['sites']} adapted sites{extra})"
        )
    return out
