"""The functional operators of one problem bound to its functions and jitted once (an optax-style bundle)."""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax

from alignment_geom.curvature.fisher import empirical_fisher_vp, fisher_vp
from alignment_geom.curvature.hessian import hvp, third_order
from alignment_geom.curvature.taylor import flow_taylor
from alignment_geom.curvature.utility import kl_utility

PyTree = Any

__all__ = ["CurvatureOperators", "curvature_operators"]


class CurvatureOperators(NamedTuple):
    """The operators of one problem, bound to its functions and jitted (optax-style bundle).

    ``hvp(params, v, batch)``, ``third_order(params, u, v, batch)``, ``fisher_vp(params, v, inputs)``,
    ``empirical_fisher_vp(params, v, batch)``, ``kl_utility(params_ref, params, inputs)``,
    ``flow_taylor(params, batch)`` (of the bound order). Fields are None when the function they need
    (logits_fn, logprob_fn) was not given.
    """

    hvp: Callable
    third_order: Callable
    fisher_vp: Optional[Callable]
    empirical_fisher_vp: Optional[Callable]
    kl_utility: Optional[Callable]
    flow_taylor: Callable


def curvature_operators(loss_fn: Callable, logits_fn: Optional[Callable] = None,
                        logprob_fn: Optional[Callable] = None, mask: Optional[PyTree] = None,
                        taylor_order: int = 4) -> CurvatureOperators:
    """Bind the operators to one problem and jit each of them once."""
    return CurvatureOperators(
        hvp=jax.jit(lambda p, v, b: hvp(loss_fn, p, v, b, mask)),
        third_order=jax.jit(lambda p, u, v, b: third_order(loss_fn, p, u, v, b, mask)),
        fisher_vp=None if logits_fn is None else jax.jit(lambda p, v, x: fisher_vp(logits_fn, p, v, x, mask)),
        empirical_fisher_vp=None if logprob_fn is None else jax.jit(
            lambda p, v, b: empirical_fisher_vp(logprob_fn, p, v, b, mask)),
        kl_utility=None if logits_fn is None else jax.jit(
            lambda pr, p, x: kl_utility(logits_fn, pr, p, x, mask)),
        flow_taylor=jax.jit(lambda p, b: flow_taylor(loss_fn, p, b, taylor_order, mask)),
    )
