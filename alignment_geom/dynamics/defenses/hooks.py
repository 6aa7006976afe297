"""Velocity hooks for gradient_flow / discrete_path that defend the sensitive subspace (figure 7), and the
gradient-flow velocity of any defence written as an optax transformation.

    projection_defense(basis) -> velocity                  static: θ̇ = −(I − P(θ*)) ∇L(θ)
    dynamic_projection_defense(logits_fn, inputs, d) -> velocity
                                                           dynamic: θ̇ = −(I − P(θ)) ∇L(θ), P(θ) recomputed
    flow_velocity(tx) -> velocity                          θ̇ = −T_θ(∇L(θ)), T_θ = tx.update with tx.init(θ)
A velocity is ``velocity(θ, grad) -> θ̇``, with grad = ∇L(θ) (already masked).

Relation to the transformations of this package: ``flow_velocity(static_projection(basis))`` is
``projection_defense(basis)``, and ``flow_velocity(dynamic_projection(problem, d, estimator=TrueFisher("factor")))``
is ``dynamic_projection_defense(problem.logits_fn, problem.inputs, d)`` (the K → 0 limit of a refresh every K
steps); gradient descent with ``optax.chain(tx, optax.sgd(η))`` is the forward-Euler discretisation of that flow
on the clock t = η k.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from alignment_geom.curvature import top_fisher_subspace
from alignment_geom.linalg import project_out
from alignment_geom.tree import tree_scale

PyTree = Any

__all__ = ["projection_defense", "dynamic_projection_defense", "flow_velocity"]


def projection_defense(basis: PyTree) -> Callable:
    """Static defence: θ̇ = −(I − P*) ∇L(θ), removing the component in span(basis) (P* = P(θ*)).

    ``basis``: orthonormal directions, a pytree with leading axis d (e.g. ``Landscape.basis`` or the basis of
    ``aic.sensitive_subspace`` at θ*). Returns ``velocity(params, grad)`` for gradient_flow / discrete_path.
    Cost per call: 2d inner products.
    """

    def velocity(params, grad):
        return tree_scale(-1.0, project_out(basis, grad))

    return velocity


def dynamic_projection_defense(logits_fn: Callable, inputs: Any, d: int, mask: Optional[PyTree] = None) -> Callable:
    """Dynamic defence: θ̇ = −(I − P(θ)) ∇L(θ) with P(θ) the top-d Fisher subspace recomputed at the
    current θ on every velocity call (``curvature.top_fisher_subspace``: M·C reverse passes + an SVD of an
    (M·C) × n matrix per call, i.e. per RHS evaluation of the integrator / per discrete step)."""

    def velocity(params, grad):
        basis, _ = top_fisher_subspace(logits_fn, params, inputs, d, mask)
        return tree_scale(-1.0, project_out(basis, grad))

    return velocity


def flow_velocity(tx) -> Callable:
    """The gradient-flow velocity of a defence transformation: θ̇ = −T_θ(∇L(θ)).

    ``tx`` is an ``optax.GradientTransformation`` whose update maps a gradient to a defended gradient (the
    transformations of :mod:`alignment_geom.dynamics.defenses`). Its state is initialised afresh at the current
    θ on every call: stateless defences (projections, penalties, coupling suppression) give their exact flow,
    and a dynamic projection gives the flow that re-estimates P(θ) at every evaluation. Returns
    ``velocity(params, grad)`` for gradient_flow / discrete_path.
    """

    def velocity(params, grad):
        upd, _ = tx.update(grad, tx.init(params), params)
        return tree_scale(-1.0, upd)

    return velocity
