"""Projection defences as optax transformations: remove the sensitive component of every update.

    static_projection(basis) -> tx             g̃ = (I − P(θ*)) g
    dynamic_projection(problem, d, *, every=1, estimator=None, warm=True, key=None) -> tx
                                               g̃ = (I − P(θ_r)) g, P re-estimated at θ_r every ``every`` steps
    estimate_subspace(problem, d, estimator, key, init=None) -> (basis, eigvals, matvecs)
    refresh_cost(estimator, problem, d) -> int  operator applications of one cold non-Krylov estimate

Notation: θ* the aligned parameters, g = ∇L(θ) the fine-tuning gradient (or any update fed to the chain),
F(θ) the safety Fisher, P(θ) the orthogonal projector on its top-d eigenvectors u_1..u_d (Definition 3.4),
(I − P) g = g − Σ_j ⟨u_j, g⟩ u_j. A projection commutes with scaling, so it may sit anywhere in an optax chain;
placed before an adaptive optimiser (``optax.chain(tx, optax.adam(η))``) it removes the sensitive gradient but the
optimiser's per-coordinate rescaling may move the update back into span P (docs/paper_notes.md §6, figure 8);
placed after it, the parameter step itself stays in the complement.

Onset law (docs/paper_notes.md §4). Static: P δ(t) ≡ 0 along the defended flow, so the γ term of the quartic
law is removed exactly, but Δu still grows like t⁴ through what P(θ*) does not see: the curvature of the policy
(the top-d subspace of F(θ) rotates away from P(θ*)) and the Fisher tail. Dynamic, refreshed every K steps of
size η (τ = Kη): between refreshes the update is orthogonal to the stale rows ∇ζ(θ_r) of the policy Jacobian, so
each sensitive logit moves by ζ̇ = ⟨∇ζ(θ) − ∇ζ(θ_r), θ̇⟩ = O(t − t_r): a step of O(τ²) per interval, i.e. a
drift linear in t and Δu ∝ τ² t² (slope 2, coefficient ∝ τ²) instead of the t⁴ onset. The landscape study
(studies/defenses_landscape.py) derives the constant and measures it.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from alignment_geom.aic import EmpiricalFisher, SensitiveSubspace, TrueFisher, as_estimator
from alignment_geom.linalg import project_out, top_eigenpairs
from alignment_geom.problem import Problem
from alignment_geom.tree import apply_mask, mask_count, tree_map

PyTree = Any

__all__ = ["static_projection", "dynamic_projection", "DynamicProjectionState", "estimate_subspace",
           "refresh_cost", "KRYLOV_METHODS"]

KRYLOV_METHODS = ("lanczos", "randomized")


def _rows(basis):
    return basis.basis if isinstance(basis, SensitiveSubspace) else basis


def cast_like(tree, like):
    """``tree`` with the dtype of ``like``'s leaves (a defence never changes the dtype of the updates)."""
    return tree_map(lambda a, b: a.astype(jnp.result_type(b)), tree, like)


def _project_out(basis, updates):
    return cast_like(project_out(basis, updates), updates)


def static_projection(basis) -> optax.GradientTransformation:
    """Static projection (the SafeLoRA-style baseline): g̃ = (I − P(θ*)) g for every update g.

    ``basis``: the top-d eigenvectors of F(θ*) (a :class:`~alignment_geom.aic.SensitiveSubspace` or a pytree
    like θ with a leading axis d, orthonormal rows; zero outside a mask when estimated on a masked problem, so
    frozen leaves pass unchanged). Stateless; cost 2d inner products per step. Sharding: the basis rows should
    carry the sharding of θ (XLA propagates it through the inner products).
    """
    rows = _rows(basis)

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        return _project_out(rows, updates), state

    return optax.GradientTransformation(init, update)


class DynamicProjectionState(NamedTuple):
    """State of :func:`dynamic_projection`.

    basis: (d, …) the rows of P(θ_r) at the last refresh θ_r; eigvals (d,) their Fisher eigenvalues;
    count: steps taken; refreshes: subspace estimates made (the one of ``init`` included); matvecs: operator
    applications they used (Krylov: Fisher-vector products, counted by the solver; others: ``refresh_cost``);
    key: the PRNG key the estimates fold the step into.
    """

    basis: PyTree
    eigvals: jax.Array
    count: jax.Array
    refreshes: jax.Array
    matvecs: jax.Array
    key: jax.Array


def _default_estimator(problem: Problem, estimator):
    if estimator is not None:
        return as_estimator(estimator)
    return TrueFisher() if problem.logits_fn is not None else EmpiricalFisher()


def _krylov(est) -> bool:
    return isinstance(est, (TrueFisher, EmpiricalFisher)) and est.method in KRYLOV_METHODS


def refresh_cost(estimator, problem: Problem, d: int) -> int:
    """Operator applications of one estimate by a non-Krylov estimator (0 for a Krylov one, whose solver counts
    them): TrueFisher("factor") M·C reverse passes (the logits' entries), EmpiricalFisher("gram") and
    RandomSubspace(k) m per-example gradients (the safe completions)."""
    est = _default_estimator(problem, estimator)
    if _krylov(est):
        return 0
    if isinstance(est, TrueFisher):
        return int(np.prod(jax.eval_shape(problem.logits_fn, problem.params, problem.inputs).shape))
    return int(jax.tree_util.tree_leaves(problem.safety_batch)[0].shape[0])


def estimate_subspace(problem: Problem, d: int, estimator, key, init: Optional[PyTree] = None,
                      num_steps: Optional[int] = None, tol: Optional[float] = None, max_iters: Optional[int] = None,
                      oversample: int = 10):
    """The top-d Fisher subspace at ``problem.params``: (basis (d, …), eigvals (d,), matvecs).

    ``estimator``: an :mod:`alignment_geom.aic` Fisher estimator (None: TrueFisher() when the problem has
    logits_fn, else EmpiricalFisher()). TrueFisher/EmpiricalFisher with method "lanczos" or "randomized" run
    ``linalg.top_eigenpairs`` on the Fisher operator at θ, warm-started from ``init`` (the previous basis) when
    given, and return the solver's matvec count (+ d for the exact residuals); ``num_steps`` / ``tol`` override
    the estimator's; ``max_iters`` / ``oversample`` set the "randomized" block iteration (``max_iters=1``,
    ``oversample`` small and a warm ``init``: subspace tracking, one block of d + oversample Fisher products and a
    Rayleigh–Ritz step per iteration, the cheapest refresh when the subspace moved little). Any other estimator
    (TrueFisher("factor"), EmpiricalFisher("gram"), RandomSubspace(k)) is solved cold by its own ``subspace`` and
    costs :func:`refresh_cost`. Pure and jittable.
    """
    est = _default_estimator(problem, estimator)
    if _krylov(est):
        op = est.operator(problem)
        steps = est.num_steps if num_steps is None else num_steps
        tol = est.tol if tol is None else tol
        lam, basis, _, info = top_eigenpairs(op, d, key=key, method=est.method, num_steps=steps, tol=tol,
                                             init=init, max_iters=max_iters, oversample=oversample, return_info=True)
        return basis, lam, jnp.asarray(info.num_matvecs + d, jnp.int32)
    sub, _ = est.subspace(problem, d, key)
    return sub.basis, sub.eigvals, jnp.asarray(refresh_cost(est, problem, d), jnp.int32)


def dynamic_projection(problem: Problem, d: int, *, every: int = 1, estimator=None, warm: bool = True,
                       num_steps: Optional[int] = None, tol: Optional[float] = None, max_iters: Optional[int] = None,
                       oversample: int = 10, key: Optional[jax.Array] = None) -> optax.GradientTransformation:
    """Dynamic projection: g̃ = (I − P(θ_r)) g with P(θ_r) the top-d Fisher subspace re-estimated at the current
    parameters θ_r every ``every`` = K steps.

    ``problem`` supplies the safety skill (``logits_fn``/``inputs`` for the true Fisher, ``logprob_fn``/
    ``safety_batch`` for the empirical one and the random-subspace estimator) and the mask; its ``params`` are
    replaced by the current θ at every refresh. ``init(params)`` estimates P(params) cold (at θ* when training
    starts); ``update(updates, state, params)`` refreshes at step counts k = K, 2K, … (a ``lax.cond``, so the
    refresh is paid only on those steps under jit; under vmap both branches run) and projects. ``estimator`` and
    ``num_steps``/``tol``/``max_iters``/``oversample``: see :func:`estimate_subspace`; ``warm`` starts a Krylov
    refresh from the previous basis (with a ``tol``, fewer steps when the subspace moved little; with
    TrueFisher("randomized") and ``max_iters=1``, one tracking iteration of d + oversample products). The cost of
    the refreshes is in the state (``refreshes``, ``matvecs``); the landscape study times one refresh.

    K → 0 is the flow θ̇ = −(I − P(θ)) ∇L(θ) of ``dynamic_projection_defense`` (``flow_velocity`` of this
    transformation with the "factor" estimator).
    """
    every = int(every)
    if every < 1:
        raise ValueError(f"every must be an integer >= 1 (refresh period in steps); got {every}")
    est = _default_estimator(problem, estimator)
    est.check(problem)
    if getattr(est, "method", None) == "lobpcg":
        raise ValueError("dynamic_projection: the estimator's method must be 'lanczos', 'randomized' (warm-started) "
                         "or a direct one ('factor', 'gram', RandomSubspace); got 'lobpcg'")
    n = mask_count(problem.mask, problem.params)
    if not isinstance(d, (int, np.integer)) or not 1 <= d <= n:
        raise ValueError(f"d must be an integer in [1, n={n}]; got {d!r}")
    d = int(d)
    key = jax.random.PRNGKey(0) if key is None else key

    def estimate(params, k, init):
        basis, lam, mv = estimate_subspace(problem.replace(params=params), d, est, k, init=init, num_steps=num_steps,
                                           tol=tol, max_iters=max_iters, oversample=oversample)
        return apply_mask(problem.mask, basis), lam, mv     # exactly zero on frozen leaves

    def init(params):
        basis, lam, mv = estimate(params, key, None)
        zero = jnp.zeros((), jnp.int32)
        return DynamicProjectionState(basis, lam, zero, zero + 1, mv, key)

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("dynamic_projection needs params: call update(updates, state, params)")

        def refresh(st):
            basis, lam, mv = estimate(params, jax.random.fold_in(st.key, st.count), st.basis if warm else None)
            return st._replace(basis=cast_like(basis, st.basis), eigvals=lam.astype(st.eigvals.dtype),
                               refreshes=st.refreshes + 1, matvecs=st.matvecs + mv)

        due = (state.count > 0) & (state.count % every == 0)
        state = jax.lax.cond(due, refresh, lambda st: st, state)
        return _project_out(state.basis, updates), state._replace(count=state.count + 1)

    return optax.GradientTransformation(init, update)
