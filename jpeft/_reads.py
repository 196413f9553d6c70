"""The one place that reads a traced model's jaxpr: which modules' parameters the model reads
outside that module's own call (a decoder's ``h @ enc.variables["params"]["kernel"].T``, a GPT-2
port's ``h @ self.wte.embedding.T``, NNX ``self.enc.kernel[...]`` outside ``enc(...)``).

The trace (:func:`jpeft._inject.trace`, :func:`jpeft._nnx.trace`) runs every module method inside a
``jax.named_scope`` of its own (:meth:`Scopes.of`), so each equation of the jaxpr carries the
modules whose calls were on the stack when it was traced. A parameter is followed from its input
variable through the equations that only move or cast it (a transpose, a reshape, a dtype cast:
what flax's lifted transforms do to a scanned kernel) and into the bodies of ``jit``, ``scan``,
``remat``, ``cond``, ``while``...; the first equation that computes with it while its module's call
is not on the stack is a read outside the call. It reads ``JaxprEqn.source_info`` (its name stack and
the user's line), which JAX does not document; ``tests/test_properties.py`` runs it on the JAX
pinned here.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

import jax
from jax.extend import core as jex

_TOKEN = "jpeft_site_"
_TOKEN_RE = re.compile(_TOKEN + r"(\d+)_")
#: primitives that only move, slice or cast an array: a parameter passing through them outside its
#: module's call (flax's lifted transforms move a scanned kernel's layer axis) is followed, not read
_MOVES = frozenset({"transpose", "reshape", "squeeze", "expand_dims", "broadcast_in_dim", "convert_element_type",
                    "copy", "copy_p", "sharding_constraint", "device_put", "slice", "dynamic_slice", "rev",
                    "reduce_precision", "optimization_barrier", "mesh_cast", "reshard"})


class Scopes:
    """A ``jax.named_scope`` per module path, numbered: ``with scopes.of(path): ...``."""

    def __init__(self):
        self.ids: dict[str, int] = {}

    def of(self, path: str):
        n = self.ids.setdefault(path, len(self.ids))
        return jax.named_scope(f"{_TOKEN}{n}_")


def outside_reads(closed, owners: Sequence[Optional[str]], scopes: Scopes) -> dict[str, list[str]]:
    """``{module path: [where, ...]}``: where the jaxpr ``closed`` (traced with ``scopes``) computes with
    a parameter of a module while that module's call is not on the stack. ``owners[i]`` is the path of
    the module owning the jaxpr's ``i``-th input (``None``: not a parameter, or a module not called)."""
    ids = scopes.ids
    taint = {v: frozenset({ids[o]}) for v, o in zip(closed.jaxpr.invars, owners) if o is not None and o in ids}
    found: dict[int, list[str]] = {}
    _walk(closed.jaxpr, taint, frozenset(), found)
    names = {n: p for p, n in ids.items()}
    return {names[n]: where for n, where in found.items()}


def _of(taint: dict, v) -> frozenset:
    return frozenset() if isinstance(v, jex.Literal) else taint.get(v, frozenset())


def _walk(jaxpr, taint: dict, outer: frozenset, found: dict) -> list:
    """Follows ``taint`` (``{var: module numbers}``) through ``jaxpr``; ``outer``: the modules whose
    calls are on the stack around it. Records reads in ``found``; returns the outputs' taint."""
    for eqn in jaxpr.eqns:
        ins = [_of(taint, v) for v in eqn.invars]
        if not any(ins):
            continue
        stack = outer | {int(n) for n in _TOKEN_RE.findall(str(eqn.source_info.name_stack))}
        live = [t - stack for t in ins]  # the modules whose params come in while their call is not on the stack
        if not any(live):
            continue
        subs = _sub_jaxprs(eqn)
        if subs:
            outs = _walk_sub(eqn, subs, live, stack, found)
        elif eqn.primitive.name in _MOVES:
            outs = [frozenset().union(*live)] * len(eqn.outvars)
        else:
            where = _where(eqn)
            for n in frozenset().union(*live):
                if where not in found.setdefault(n, []):  # a loop body is walked until its carry settles
                    found[n].append(where)
            continue
        for v, t in zip(eqn.outvars, outs):
            if t:
                taint[v] = t
    return [_of(taint, v) for v in jaxpr.outvars]


def _sub_jaxprs(eqn) -> list:
    subs = []
    for value in eqn.params.values():
        for j in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(j, jex.ClosedJaxpr):
                subs.append(j.jaxpr)
            elif isinstance(j, jex.Jaxpr):
                subs.append(j)
    return subs


def _walk_sub(eqn, subs: list, live: list, stack: frozenset, found: dict) -> list:
    """The outputs' taint of a higher-order equation (``jit``, ``scan``, ``cond``, ``while``,
    ``remat``, custom derivatives), its bodies walked with their inputs' taint."""
    name, p = eqn.primitive.name, eqn.params
    if name == "cond":  # branches take the operands after the index
        outs = [_walk(b, dict(zip(b.invars, live[1:])), stack, found) for b in subs]
        return [frozenset().union(*ts) for ts in zip(*outs)]
    if name == "while":
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        cond, body = p["cond_jaxpr"].jaxpr, p["body_jaxpr"].jaxpr
        carry = list(live[cn + bn:])
        for _ in range(len(carry) + 1):  # to a fixed point: a carry's taint only grows
            _walk(cond, dict(zip(cond.invars, live[:cn] + carry)), stack, found)
            out = _walk(body, dict(zip(body.invars, live[cn:cn + bn] + carry)), stack, found)
            new = [a | b for a, b in zip(carry, out)]
            if new == carry:
                break
            carry = new
        return carry
    if name == "scan":
        body, nc, nk = subs[0], p["num_consts"], p["num_carry"]
        ins = list(live)
        for _ in range(nk + 1):
            out = _walk(body, dict(zip(body.invars, ins)), stack, found)
            carry = [a | b for a, b in zip(ins[nc:nc + nk], out[:nk])]
            if carry == ins[nc:nc + nk]:
                break
            ins[nc:nc + nk] = carry
        return out
    outs = [frozenset()] * len(eqn.outvars)
    for sub in subs:  # jit, remat, custom_jvp / custom_vjp calls, shard_map: inputs one to one
        if len(sub.invars) == len(live):
            got = _walk(sub, dict(zip(sub.invars, live)), stack, found)
            if len(got) == len(outs):
                outs = [a | b for a, b in zip(outs, got)]
    return outs


def _where(eqn) -> str:
    """``"dot_general at file.py:12 (fn), in Model/dec"``: the equation, the user's line, and the
    modules (flax's scope names) around it."""
    line = _user_line(eqn.source_info.traceback)
    scope = "/".join(c for c in str(eqn.source_info.name_stack).split("/") if c and not _TOKEN_RE.fullmatch(c))
    return f"{eqn.primitive.name} at {line}" + (f", in {scope}" if scope else "")


#: the files of the libraries and jpeft modules a traced call passes through, skipped when naming the user's line
_LIBRARY = re.compile(r"[/\\](jax|jaxlib|flax|contextlib|functools)[/\\.]|[/\\]jpeft[/\\](_reads|_inject|_nnx|core)\.py$")


def _user_line(traceback) -> str:
    """``"file.py:12 (fn)"``: the innermost frame of the traceback outside JAX, flax and jpeft's tracing."""
    for frame in getattr(traceback, "frames", None) or ():
        if not _LIBRARY.search(frame.file_name):
            return f"{frame.file_name}:{frame.line_num} ({frame.function_name})"
    return "an unknown line"


def owners_of(leaf_paths: Sequence[Optional[tuple]], modules) -> list[Optional[str]]:
    """For each leaf's key path (``None``: not a parameter), the path of the module owning it: the
    longest called module path (``modules``) that prefixes it, ``None`` when only the root does."""
    known = set(modules)
    out: list[Optional[str]] = []
    for keys in leaf_paths:
        owner = None
        if keys is not None:
            for i in range(len(keys) - 1, 0, -1):
                p = "/".join(keys[:i])
                if p in known:
                    owner = p
                    break
        out.append(owner)
    return out


def key_names(path) -> tuple:
    """A ``jax.tree_util`` key path as strings (``DictKey('enc')`` -> ``'enc'``)."""
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
        else:
            out.append(str(k))
    return tuple(out)


def traced(fn, arg):
    """The closed jaxpr of ``fn(arg)`` traced abstractly (nothing computed): its inputs are ``arg``'s
    leaves, in ``jax.tree_util.tree_flatten_with_path(arg)``'s order."""
    return jax.make_jaxpr(fn)(arg)
