"""Coupling suppression as an optax transformation: remove the Hessian-carried sensitive gradient (γ itself).

    coupling_suppression(problem, basis) -> tx      g̃ = g − P H (θ − θ*),  H = ∇²L(θ*): one HVP per step

Derivation (paper notation; docs/paper_notes.md §2–4). θ* the aligned parameters, δ = θ − θ*, L the fine-tuning
loss, g = ∇L(θ*), H = ∇²L(θ*), P the projector on the top-d eigenvectors of F(θ*), γ_E = ‖P H g‖. Along gradient
flow the gradient seen at θ is

    g(θ) = g + H δ + ½ ∇³L[δ, δ] + O(‖δ‖³),   so   P g(θ) = P g + P H δ + O(‖δ‖²).

P g is the initial non-orthogonality (‖P g‖ = ε). P H δ is the fine-tuning Hessian carrying the update into the
sensitive subspace: with δ = −t g + O(t²) it equals −t P H g, its integral is the (t²/2) P H g drift of
Theorem 6.2 and, through Δu ≳ ½‖F^{1/2} P δ‖², the γ_F² t⁴/8 onset of Corollary 6.3. Coupling suppression
subtracts exactly that term from the update, g̃(θ) = g(θ) − P H δ. Along the defended flow θ̇ = −g̃(θ), i.e.
δ̇ = −g(θ) + P H δ:

    δ̇(0) = −g,   δ̈(0) = H g − P H g = (I − P) H g,
    δ⃛(0) = −∇³L[g, g] − (I − P) H (I − P) H g,   so   P δ⃛(0) = −P ∇³L[g, g],

    P δ(t) = −t P g − (t³/6) P ∇³L[g, g] + O(t⁴):

the t² term of the drift is gone (for every ε), ‖F^{1/2} P δ‖ = t ε_F + O(t³), and Δu = ½ ε_F² t² + O(t³): the γ
part of the quartic coefficient is removed and the onset exponent is 2 (the ε regime) followed by the t⁴ terms
that no P(θ*)-based defence removes (the policy's curvature, which rotates the sensitive subspace, and the Fisher
tail). Unlike the static projection it keeps the first-order sensitive component P g of the update (the task's
own direction) and removes only what curvature adds to it.

Cost: one Hessian-vector product of L at θ* per step (forward-over-reverse; on the step's minibatch when the
chain is called with ``update(..., batch=b)``, else on ``problem.batch``) and 2d inner products. It is a gradient
correction: chain it before the optimiser.
"""
from __future__ import annotations

import optax

from alignment_geom.curvature import hvp
from alignment_geom.dynamics.defenses.penalty import add_scaled
from alignment_geom.dynamics.defenses.projection import _rows
from alignment_geom.linalg import project
from alignment_geom.problem import Problem
from alignment_geom.tree import apply_mask, tree_sub

__all__ = ["coupling_suppression"]


def coupling_suppression(problem: Problem, basis) -> optax.GradientTransformationExtraArgs:
    """Coupling suppression: g̃ = g − P H (θ − θ*) with H = ∇²L(θ*) (see the module docstring).

    ``problem``: θ* (``params``), the fine-tuning loss (``loss_fn``, ``batch``) and the mask (H_SS, P on the
    block). ``basis``: the top-d Fisher eigenvectors at θ* (a SensitiveSubspace or a pytree with a leading axis
    d). ``update(updates, state, params, batch=None)``: ``batch`` (an optax extra argument, passed through
    ``optax.chain``) is the step's minibatch for the HVP; default ``problem.batch``.
    """
    problem.require("loss_fn")
    rows = _rows(basis)
    theta_star, mask = problem.params, problem.mask

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None, batch=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("coupling_suppression needs params: call update(updates, state, params)")
        b = problem.batch if batch is None else batch
        delta = apply_mask(mask, tree_sub(params, theta_star))
        carried = project(rows, hvp(problem.loss_fn, theta_star, delta, b, mask))
        return add_scaled(updates, -1.0, apply_mask(mask, carried)), state

    return optax.GradientTransformationExtraArgs(init, update)
