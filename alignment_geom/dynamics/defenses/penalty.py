"""Proximity defences as optax transformations: pull θ back towards θ* in the safety geometry.

    fisher_penalty(problem, strength, *, subspace=None) -> tx    g̃ = g + λ_reg F(θ*)(θ − θ*)
    utility_penalty(problem, strength) -> tx                     g̃ = g + λ_reg ∇Δu(θ)

Notation: θ* = ``problem.params``, g the update fed to the chain (the fine-tuning gradient when the defence comes
first), F(θ*) the safety Fisher at θ*, Δu(θ) = mean_x KL(π_θ*(·|x) ‖ π_θ(·|x)) the alignment utility loss
(Assumption 1), λ_reg = ``strength`` ≥ 0. F(θ*)(θ − θ*) is the gradient of ½‖θ − θ*‖²_F (an EWC penalty on the
safety Fisher); ∇Δu(θ) = mean_x Jᵀ(p_θ − p_θ*) is its exact counterpart (∇Δu(θ) = F(θ*)(θ − θ*) + O(‖θ − θ*‖²)).
Both are gradients, so chain them *before* the optimiser (``optax.chain(fisher_penalty(...), optax.adam(η))``),
as one would ``optax.add_decayed_weights``.

Onset law along the penalised flow θ̇ = −g(θ) − λ_reg F(θ*)(θ − θ*) (docs/paper_notes.md §4): the penalty is
O(λ_reg λ ‖P δ‖) = O(t²) and enters P δ at O(t³), so the quartic onset Δu ≈ a₄ t⁴ is unchanged for
t ≪ t_reg = 1/(λ_reg λ_d). Beyond t_reg the sensitive coordinates are damped at rate λ_reg λ_j and follow the
curvature drive quasi-statically, ⟨u_j, δ⟩ ≈ ⟨u_j, H g⟩ t / (λ_reg λ_j): Δu ≈ Σ_j ⟨u_j, H g⟩² t² / (2 λ_reg² λ_j),
slope 2 and ∝ 1/λ_reg². What F(θ*) does not see (the policy's curvature, which rotates the sensitive subspace,
and the Fisher tail) is not penalised by the Fisher form and keeps its t⁴ growth; the exact ∇Δu form penalises
the logits themselves and damps it too.
"""
from __future__ import annotations

from typing import Optional

import jax
import optax

from alignment_geom.aic import SensitiveSubspace
from alignment_geom.curvature import empirical_fisher_vp, fisher_vp, kl_utility
from alignment_geom.linalg import combine, coordinates
from alignment_geom.problem import Problem
from alignment_geom.tree import apply_mask, tree_map, tree_sub

__all__ = ["fisher_penalty", "utility_penalty"]


def _check_strength(strength):
    if not isinstance(strength, jax.core.Tracer) and not float(strength) >= 0:
        raise ValueError(f"strength (λ_reg) must be a number >= 0; got {strength!r}")


def add_scaled(updates, strength, term):
    """updates + strength · term, leaf by leaf, in the dtype of the updates."""
    return tree_map(lambda u, p: u + (strength * p).astype(u.dtype), updates, term)


def _need_params(params, name):
    if params is None:
        raise ValueError(f"{name} needs params: call update(updates, state, params)")


def fisher_penalty(problem: Problem, strength: float, *,
                   subspace: Optional[SensitiveSubspace] = None) -> optax.GradientTransformation:
    """Fisher-weighted proximity: g̃ = g + λ_reg F(θ*)(θ − θ*), the gradient of (λ_reg/2)‖θ − θ*‖²_{F(θ*)}.

    F(θ*) v is exact per step: the true Fisher (``curvature.fisher_vp``: one jvp and one vjp of the safety logits
    at θ*) when ``problem.logits_fn`` is set, else the empirical Fisher of ``problem.safety_batch``. With
    ``subspace`` (the top-d eigenpairs at θ*) the low-rank F ≈ Σ_j λ_j u_j u_jᵀ is used instead (2d inner
    products per step). ``problem.mask``: the penalty acts on the masked block only (other leaves unchanged).
    """
    _check_strength(strength)
    theta_star, mask = problem.params, problem.mask
    if subspace is None:
        if problem.logits_fn is None:
            problem.require("logprob_fn", "safety_batch")
        else:
            problem.require("logits_fn")

    def fisher_times(delta):
        if subspace is not None:
            lam = subspace.eigvals
            return combine(subspace.basis, lam * coordinates(subspace.basis, delta))
        if problem.logits_fn is not None:
            return fisher_vp(problem.logits_fn, theta_star, delta, problem.inputs, mask)
        return empirical_fisher_vp(problem.logprob_fn, theta_star, delta, problem.safety_batch, mask)

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        _need_params(params, "fisher_penalty")
        delta = apply_mask(mask, tree_sub(params, theta_star))
        return add_scaled(updates, strength, apply_mask(mask, fisher_times(delta))), state

    return optax.GradientTransformation(init, update)


def utility_penalty(problem: Problem, strength: float) -> optax.GradientTransformation:
    """The exact-Δu variant of the Fisher penalty: g̃ = g + λ_reg ∇Δu(θ), Δu(θ) = mean_x KL(π_θ* ‖ π_θ) on the
    safety inputs (``problem.logits_fn``, ``problem.inputs``; ``curvature.kl_utility``).

    ∇Δu(θ) = mean_x J(θ)ᵀ (p_θ − p_θ*): one forward pass at θ* (no gradient) and one forward and backward pass
    at θ per step. Agrees with :func:`fisher_penalty` to first order in θ − θ*; unlike it, it follows the policy's
    curvature (the rotation of the sensitive subspace). ``problem.mask``: only the masked block is penalised.
    """
    _check_strength(strength)
    problem.require("logits_fn")
    theta_star, mask = problem.params, problem.mask
    grad_du = jax.grad(lambda p: kl_utility(problem.logits_fn, jax.lax.stop_gradient(theta_star), p,
                                            problem.inputs, mask))

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        _need_params(params, "utility_penalty")
        return add_scaled(updates, strength, apply_mask(mask, grad_du(params))), state

    return optax.GradientTransformation(init, update)
