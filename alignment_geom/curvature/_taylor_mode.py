"""Univariate Taylor mode over jaxprs: the derivatives y⁽ᵏ⁾(0), k = 1..K, of y(t) = f(x(t)) from those of x(t).

A small, self-contained interpreter. ``taylor(fun, primals, series)`` traces ``fun`` to a jaxpr once and
propagates truncated Taylor series through it, equation by equation. Series are Taylor *coefficients*
(``series[i][j]`` = [t^{j+1}] x_i(t) = x_i⁽ʲ⁺¹⁾(0)/(j+1)!), the convention of the rules inside
``jax.experimental.jet`` (its ``jet(..., factorial_scaled=False)``).

Rules, in the order they are tried for an equation whose inputs carry a nonzero series:

* control flow and calls, by recursion into their jaxprs: ``jit`` and ``closed_call`` (inlined), ``remat``
  (``jax.checkpoint``, any policy; inlined: only the values matter here), ``scan`` (a new scan whose
  carry, consts and xs carry their series), ``while`` (the same; the predicate sees primals only), ``cond``
  (every branch propagates the series; float outputs instantiated so the branches agree);
* ``custom_jvp_call``: through its custom JVP rule, y' = ∂f(x)·x' (below);
  ``custom_vjp_call``: its primal function (JAX has no forward mode through the custom rule);
* the Taylor rules of ``jax.experimental.jet`` (O(K²) each: products by the Leibniz rule, exp/log/tanh/… by
  their ODEs);
* every other primitive with a JVP rule, through that rule: y(t) = f(x(t)) gives y'(t) = ∂f(x(t))·x'(t),
  so y_{k+1} = [t^k] y'(t) / (k+1) comes from the traced JVP at order K−1, with x(t) and
  x'(t) = Σ_j (j+1) x_{j+1} t^j as inputs. Recursion lowers the order by one per level (cost polynomial in K).

A primitive with neither a Taylor nor a JVP rule raises :class:`TaylorModeError`, which names the primitive
and the user function that bound it. Nothing is registered into JAX's tables: importing this module has no
side effects.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import jax.extend.core as _jcore
import jax.numpy as jnp
from jax import lax
from jax._src import source_info_util as _source_info  # private: only to name the caller in errors
from jax.experimental import jet as _jet
from jax.interpreters import ad as _ad

PyTree = Any
Series = Optional[list]   # None (identically zero) or K arrays shaped like the primal

__all__ = ["TaylorModeError", "taylor", "taylor_jaxpr", "widen_precision"]


class TaylorModeError(NotImplementedError):
    """A primitive has neither a Taylor rule nor a JVP rule (the message names it and where it was bound)."""


def _is_float(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _aval_is_float(aval) -> bool:
    dt = getattr(aval, "dtype", None)
    return dt is not None and jnp.issubdtype(dt, jnp.inexact)


def _closed(j):
    return j if isinstance(j, _jcore.ClosedJaxpr) else _jcore.ClosedJaxpr(j, ())


def _where(eqn) -> str:
    try:
        return _source_info.summarize(eqn.source_info)
    except Exception:  # noqa: BLE001
        return "<unknown location>"


def _zeros(x, order):
    return [jnp.zeros(jnp.shape(x), jnp.result_type(x)) for _ in range(order)]


def _inst(x, s, order):
    return _zeros(x, order) if s is None else list(s)


def _bind(eqn, primals):
    out = eqn.primitive.bind(*primals, **eqn.primitive.get_bind_params(eqn.params))
    return list(out) if eqn.primitive.multiple_results else [out]


# --------------------------------------------------------------------------- the interpreter


def taylor_jaxpr(closed_jaxpr, primals: Sequence, series: Sequence[Series], order: int):
    """Propagate (primals, series) through a ClosedJaxpr; returns (primals_out, series_out) as lists,
    series_out[i] None where the output does not depend on the series."""
    jaxpr = closed_jaxpr.jaxpr
    env = {}
    Literal = _jcore.Literal

    def read(v):
        if isinstance(v, Literal):
            return v.val, None
        return env[v]

    def write(v, p, s):
        if s is not None and (not _is_float(p) or len(s) != order):
            s = None
        env[v] = (p, s)

    for v, c in zip(jaxpr.constvars, closed_jaxpr.consts):
        write(v, c, None)
    for v, p, s in zip(jaxpr.invars, primals, series):
        write(v, p, s)
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        ps = [p for p, _ in ins]
        ss = [s for _, s in ins]
        if order == 0 or all(s is None for s in ss) or not any(_aval_is_float(v.aval) for v in eqn.outvars):
            outs = _bind(eqn, ps)
            sout = [None] * len(outs)
        else:
            outs, sout = _eqn_rule(eqn, ps, ss, order)
        for v, p, s in zip(eqn.outvars, outs, sout):
            write(v, p, s)
    res = [read(v) for v in jaxpr.outvars]
    return [p for p, _ in res], [s for _, s in res]


def taylor(fun: Callable, primals: Sequence, series: Sequence[Series]):
    """Taylor mode for ``fun(*primals)`` (array arguments; any pytree of array outputs) with ``series[i]``
    the Taylor coefficients [x_{i,1}, …, x_{i,K}] of x_i(t) = Σ_k x_{i,k} t^k (or None: constant in t).
    Returns (primal_out, series_out) in the output's pytree structure (zero series as explicit zeros)."""
    order = max((len(s) for s in series if s is not None), default=0)
    closed, out_shape = jax.make_jaxpr(fun, return_shape=True)(*primals)
    p_out, s_out = taylor_jaxpr(closed, list(primals), [None if s is None else list(s) for s in series], order)
    s_out = [_inst(p, s, order) for p, s in zip(p_out, s_out)]
    tree = jax.tree_util.tree_structure(out_shape)
    return jax.tree_util.tree_unflatten(tree, p_out), jax.tree_util.tree_unflatten(tree, s_out)


# --------------------------------------------------------------------------- rules


_OVERRIDES: dict = {}


def _eqn_rule(eqn, ps, ss, order):
    prim = eqn.primitive
    name = prim.name
    if name in _CALL_RULES:
        return _CALL_RULES[name](eqn, ps, ss, order)
    if prim in _OVERRIDES:
        return _OVERRIDES[prim](eqn, ps, ss, order)
    if prim in _jet.jet_rules:
        return _jet_rule(eqn, ps, ss, order)
    return _jvp_rule(eqn, ps, ss, order)


def _jet_rule(eqn, ps, ss, order):
    series_in = [_inst(p, s, order) for p, s in zip(ps, ss)]
    p_out, s_out = _jet.jet_rules[eqn.primitive](ps, series_in, **eqn.params)
    if eqn.primitive.multiple_results:
        p_out = list(p_out)
        s_out = [None if s is _jet.zero_series else list(s) for s in s_out]
        return p_out, s_out
    if s_out is _jet.zero_series:
        return [p_out], [None]
    s_out = [jnp.zeros(jnp.shape(p_out), jnp.result_type(p_out)) if t is _jet.zero_term else t for t in s_out]
    return [p_out], [list(s_out)]


def _jvp_rule(eqn, ps, ss, order):
    """y(t) = f(x(t)) ⇒ y'(t) = ∂f(x(t))·x'(t): y⁽ᵏ⁺¹⁾(0) from the traced JVP at order K−1."""
    prim = eqn.primitive
    if prim not in _ad.primitive_jvps and prim.name not in ("custom_jvp_call",):
        raise TaylorModeError(
            f"Taylor mode: primitive '{prim.name}' (bound at {_where(eqn)}) has neither a Taylor rule nor a "
            f"JVP rule, so its derivatives along t are not available; use method='jvp' (nested forward mode) if "
            f"JAX can differentiate it, or express the function with differentiable primitives.")
    idx = [i for i, s in enumerate(ss) if s is not None]

    def jvp_fn(*args):
        full, tans = list(args[:len(ps)]), args[len(ps):]

        def g(*xs):
            vals = list(full)
            for i, x in zip(idx, xs):
                vals[i] = x
            return _bind(eqn, vals)

        return jax.jvp(g, [full[i] for i in idx], list(tans))

    tan0 = [ss[i][0] for i in idx]
    try:
        jax.eval_shape(jvp_fn, *ps, *tan0)
    except (TypeError, ValueError, NotImplementedError) as e:
        raise TaylorModeError(
            f"Taylor mode: primitive '{prim.name}' (bound at {_where(eqn)}) has no Taylor rule and its JVP rule "
            f"fails ({type(e).__name__}: {str(e).splitlines()[0]}); use method='jvp' (nested forward mode) if JAX "
            f"can differentiate it, or express the function with differentiable primitives.") from e
    if order == 1:
        p_out, t_out = jvp_fn(*ps, *tan0)
        s_out = [[t] if _is_float(p) else None for p, t in zip(p_out, t_out)]
        return list(p_out), s_out
    closed = jax.make_jaxpr(jvp_fn)(*ps, *tan0)
    # x(t) = x_0 + Σ x_j t^j  ⇒  x'(t) = Σ_j (j+1) x_{j+1} t^j
    dseries = [[(j + 1) * ss[i][j] for j in range(1, order)] for i in idx]
    sub_series = [None if s is None else s[:order - 1] for s in ss] + dseries
    outs, souts = taylor_jaxpr(closed, list(ps) + tan0, sub_series, order - 1)
    n = len(outs) // 2
    p_out, t_out, t_ser = outs[:n], outs[n:], souts[n:]
    s_out = []
    for p, t, ts in zip(p_out, t_out, t_ser):
        if not _is_float(p):
            s_out.append(None)
        else:  # y_{j+1} = [t^j] y'(t) / (j+1)
            s_out.append([t] + [c / (j + 2) for j, c in enumerate(_inst(t, ts, order - 1))])
    return p_out, s_out


def _custom_vjp_rule(eqn, ps, ss, order):
    return taylor_jaxpr(_closed(eqn.params["call_jaxpr"]), ps, ss, order)


def _inline(key):
    def rule(eqn, ps, ss, order):
        return taylor_jaxpr(_closed(eqn.params[key]), ps, ss, order)
    return rule


def _scan_rule(eqn, ps, ss, order):
    prm = eqn.params
    body = prm["jaxpr"]
    nc, nk = prm["num_consts"], prm["num_carry"]
    consts_p, carry_p, xs_p = ps[:nc], ps[nc:nc + nk], ps[nc + nk:]
    consts_s, carry_s, xs_s = ss[:nc], ss[nc:nc + nk], ss[nc + nk:]
    carry_f = [_is_float(p) for p in carry_p]
    carry_s = [_inst(p, s, order) if f else None for p, s, f in zip(carry_p, carry_s, carry_f)]

    def step(carry, x):
        cp, cs = carry
        xp, xser = x
        outs, souts = taylor_jaxpr(body, list(consts_p) + list(cp) + list(xp),
                                   list(consts_s) + list(cs) + list(xser), order)
        new_cp, ys_p = outs[:nk], outs[nk:]
        new_cs = [_inst(p, s, order) if f else None for p, s, f in zip(new_cp, souts[:nk], carry_f)]
        ys_s = souts[nk:]
        return (new_cp, new_cs), (ys_p, ys_s)

    # the ys series pattern is fixed by one abstract trace of the body
    _, (_, ys_pattern) = jax.eval_shape(
        lambda c, x: step(c, jax.tree_util.tree_map(lambda a: a[0], x)),
        (list(carry_p), carry_s), (list(xs_p), list(xs_s))) if xs_p else (None, (None, None))

    def step_inst(carry, x):
        (cp, cs), (yp, ys) = step(carry, x)
        if ys_pattern is not None:
            ys = [None if pat is None else _inst(p, s, order) for p, s, pat in zip(yp, ys, ys_pattern)]
        return (cp, cs), (yp, ys)

    kw = {"length": prm["length"], "reverse": prm["reverse"], "unroll": prm["unroll"]}
    (cp, cs), (yp, ys) = lax.scan(step_inst, (list(carry_p), carry_s), (list(xs_p), list(xs_s)), **kw)
    return list(cp) + list(yp), list(cs) + list(ys)


def _while_rule(eqn, ps, ss, order):
    prm = eqn.params
    cn, bn = prm["cond_nconsts"], prm["body_nconsts"]
    cond_j, body_j = prm["cond_jaxpr"], prm["body_jaxpr"]
    cc, bc, init = ps[:cn], ps[cn:cn + bn], ps[cn + bn:]
    bcs, init_s = ss[cn:cn + bn], ss[cn + bn:]
    flt = [_is_float(p) for p in init]
    init_s = [_inst(p, s, order) if f else None for p, s, f in zip(init, init_s, flt)]

    def cond_fn(carry):
        cp, _ = carry
        return _jcore.jaxpr_as_fun(cond_j)(*cc, *cp)[0]

    def body_fn(carry):
        cp, cs = carry
        outs, souts = taylor_jaxpr(body_j, list(bc) + list(cp), list(bcs) + list(cs), order)
        return outs, [_inst(p, s, order) if f else None for p, s, f in zip(outs, souts, flt)]

    cp, cs = lax.while_loop(cond_fn, body_fn, (list(init), init_s))
    return list(cp), list(cs)


def _cond_rule(eqn, ps, ss, order):
    branches = eqn.params["branches"]
    index, ops_p, ops_s = ps[0], ps[1:], ss[1:]
    out_f = [_aval_is_float(v.aval) for v in eqn.outvars]

    def mk(br):
        def fn(op_p, op_s):
            outs, souts = taylor_jaxpr(br, list(op_p), list(op_s), order)
            return outs, [_inst(p, s, order) if f else None for p, s, f in zip(outs, souts, out_f)]
        return fn

    outs, souts = lax.switch(index, [mk(b) for b in branches], list(ops_p), list(ops_s))
    return list(outs), list(souts)


_CALL_RULES = {
    "jit": _inline("jaxpr"),
    "pjit": _inline("jaxpr"),
    "closed_call": _inline("call_jaxpr"),
    "core_call": _inline("call_jaxpr"),
    "remat2": _inline("jaxpr"),
    "checkpoint": _inline("jaxpr"),
    "custom_jvp_call": _jvp_rule,
    "custom_vjp_call": _custom_vjp_rule,
    "custom_vjp_call_jaxpr": _inline("fun_jaxpr"),
    "scan": _scan_rule,
    "while": _while_rule,
    "cond": _cond_rule,
}



# --------------------------------------------------------------------------- precision widening


def _itemsize(dt) -> int:
    return jnp.dtype(dt).itemsize


def _narrows(eqn) -> bool:
    """A float → narrower-float conversion (or reduce_precision): what widening removes."""
    if eqn.primitive is lax.reduce_precision_p:
        return True
    if eqn.primitive is not lax.convert_element_type_p:
        return False
    src, dst = eqn.invars[0].aval.dtype, eqn.params["new_dtype"]
    return (jnp.issubdtype(src, jnp.inexact) and jnp.issubdtype(dst, jnp.inexact)
            and _itemsize(dst) < _itemsize(src))


def _sub_jaxprs(eqn):
    return [_closed(j) for j in _jcore.jaxprs_in_params(eqn.params)]


def _has_narrowing(closed) -> bool:
    return any(_narrows(e) or any(_has_narrowing(j) for j in _sub_jaxprs(e)) for e in closed.jaxpr.eqns)


def _widen_eval(closed, args):
    """Evaluate a ClosedJaxpr with every float → narrower-float cast removed (values keep the widest float
    dtype that reaches them); equations whose inputs and sub-jaxprs are untouched are bound unchanged."""
    jaxpr = closed.jaxpr
    env = {}

    def read(v):
        return v.val if isinstance(v, _jcore.Literal) else env[v]

    for v, c in zip(jaxpr.constvars, closed.consts):
        env[v] = c
    for v, a in zip(jaxpr.invars, args):
        env[v] = a
    for eqn in jaxpr.eqns:
        vals = [read(v) for v in eqn.invars]
        if _narrows(eqn):
            outs = [vals[0]]
        else:
            changed = any(jnp.result_type(x) != v.aval.dtype for x, v in zip(vals, eqn.invars)
                          if hasattr(v.aval, "dtype"))
            subs = _sub_jaxprs(eqn)
            if not changed and not any(_has_narrowing(j) for j in subs):
                outs = _bind(eqn, vals)
            else:
                outs = _widen_rule(eqn, vals, changed)
        for v, o in zip(eqn.outvars, outs):
            env[v] = o
    return [read(v) for v in jaxpr.outvars]


def _promote_floats(eqn, vals):
    fl = [jnp.result_type(x) for x, v in zip(vals, eqn.invars) if _aval_is_float(v.aval)]
    if not fl:
        return vals, None
    w = jnp.result_type(*fl)
    return [x.astype(w) if _aval_is_float(v.aval) and jnp.result_type(x) != w else x
            for x, v in zip(vals, eqn.invars)], w


def _widen_rule(eqn, vals, changed):
    name = eqn.primitive.name
    prm = eqn.params
    if name in ("jit", "pjit", "remat2", "checkpoint"):
        return _widen_eval(_closed(prm["jaxpr"]), vals)
    if name in ("closed_call", "core_call", "custom_jvp_call", "custom_vjp_call"):
        return _widen_eval(_closed(prm["call_jaxpr"]), vals)
    if name == "scan":
        nc, nk = prm["num_consts"], prm["num_carry"]
        consts, init, xs = vals[:nc], vals[nc:nc + nk], vals[nc + nk:]

        def step(c, x):
            o = _widen_eval(prm["jaxpr"], list(consts) + list(c) + list(x))
            return o[:nk], o[nk:]

        outc = jax.eval_shape(step, list(init), [jax.tree_util.tree_map(lambda a: a[0], x) for x in xs])[0]
        init = [x.astype(jnp.result_type(x, o.dtype)) for x, o in zip(init, outc)]

        def step2(c, x):
            nc_, ys = step(c, x)
            return [a.astype(b.dtype) for a, b in zip(nc_, c)], ys

        c, ys = lax.scan(step2, list(init), list(xs), length=prm["length"], reverse=prm["reverse"],
                         unroll=prm["unroll"])
        return list(c) + list(ys)
    if name == "while":
        cn, bn = prm["cond_nconsts"], prm["body_nconsts"]
        cc, bc, init = vals[:cn], vals[cn:cn + bn], vals[cn + bn:]

        def body(c):
            return [a.astype(b.dtype) for a, b in zip(_widen_eval(prm["body_jaxpr"], list(bc) + list(c)), c)]

        outc = jax.eval_shape(lambda c: _widen_eval(prm["body_jaxpr"], list(bc) + list(c)), list(init))
        init = [x.astype(jnp.result_type(x, o.dtype)) for x, o in zip(init, outc)]
        return list(lax.while_loop(lambda c: _widen_eval(prm["cond_jaxpr"], list(cc) + list(c))[0], body,
                                   list(init)))
    if name == "cond":
        index, ops = vals[0], vals[1:]
        shapes = [jax.eval_shape(lambda o, b=b: _widen_eval(b, list(o)), list(ops)) for b in prm["branches"]]
        dts = [jnp.result_type(*[s[i].dtype for s in shapes]) for i in range(len(shapes[0]))]
        fns = [lambda o, b=b: [a.astype(d) for a, d in zip(_widen_eval(b, list(o)), dts)] for b in prm["branches"]]
        return list(lax.switch(index, fns, list(ops)))
    if eqn.primitive in (lax.convert_element_type_p,):
        return _bind(eqn, vals)
    vals, w = _promote_floats(eqn, vals)
    if w is not None and "preferred_element_type" in prm:
        pet = prm["preferred_element_type"]
        if pet is not None and jnp.issubdtype(pet, jnp.inexact) and _itemsize(pet) < _itemsize(w):
            eqn = eqn.replace(params={**prm, "preferred_element_type": w})
    return _bind(eqn, vals)


def widen_precision(fun: Callable) -> Callable:
    """``fun`` evaluated without its float → narrower-float casts: a model that rounds to float32 or bfloat16
    inside (e.g. ``jax.nn.dot_product_attention``'s float32 softmax) runs at the precision of its inputs.
    Functions without such casts are returned values-identical (their jaxpr is bound equation by equation)."""

    def widened(*args):
        flat, tree = jax.tree_util.tree_flatten(args)
        closed, shape = jax.make_jaxpr(lambda *leaves: fun(*jax.tree_util.tree_unflatten(tree, leaves)),
                                       return_shape=True)(*flat)
        if not _has_narrowing(closed):
            return fun(*args)
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shape), _widen_eval(closed, flat))

    return widened
