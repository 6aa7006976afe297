"""The alignment-sensitive subspace M (Definition 3.4) and the projections the AIC is made of.

Notation (arXiv:2602.15799): F = F(θ*) the skill's Fisher, λ₁ ≥ λ₂ ≥ … its eigenvalues with orthonormal
eigenvectors u_j, M = span(u_1..u_d) and P = Σ_{j≤d} u_j u_jᵀ its orthogonal projector.

Because P is the spectral projector of F onto its top-d eigenvectors, P and F commute, so
F^{1/2} P v = Σ_{j≤d} √λ_j (u_jᵀv) u_j exactly and ‖F^{1/2} P v‖² = Σ_{j≤d} λ_j (u_jᵀv)²: every F-weighted
quantity of the AIC is computed from the d coordinates u_jᵀv without further Fisher products. (When the
basis only approximates F's eigenvectors, e.g. from the random-subspace estimator, these formulas give the
quantities for the operator Σ_j λ_j u_j u_jᵀ.)
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from alignment_geom.linalg import subspace as _sub

PyTree = Any

__all__ = ["SensitiveSubspace", "coordinates", "project", "fisher_sqrt_project", "projected_norm",
           "fisher_projected_norm", "overlap_score"]


class SensitiveSubspace(NamedTuple):
    """M = span of the top-d eigenvectors of the skill Fisher F(θ*) (a pytree; jit/vmap friendly).

    basis: pytree shaped like θ with a leading axis d, orthonormal rows u_1..u_d.
    eigvals: (d,) λ_1 ≥ … ≥ λ_d (λ_d is the sharpness λ of condition 1).
    residuals: (d,) ‖F u_j − λ_j u_j‖/λ_j (NaN when not available).
    """

    basis: Any
    eigvals: jax.Array
    residuals: jax.Array


def _rows(basis):
    return basis.basis if isinstance(basis, SensitiveSubspace) else basis


def coordinates(basis, v: PyTree) -> jax.Array:
    """(u_jᵀ v)_{j≤d}, shape (d,). ``basis``: a SensitiveSubspace or a pytree with a leading axis d."""
    return _sub.coordinates(_rows(basis), v)


def project(basis, v: PyTree) -> PyTree:
    """P v = Σ_{j≤d} (u_jᵀv) u_j, a pytree shaped like v."""
    return _sub.project(_rows(basis), v)


def fisher_sqrt_project(subspace: SensitiveSubspace, v: PyTree) -> PyTree:
    """F^{1/2} P v = Σ_{j≤d} √λ_j (u_jᵀv) u_j (exact: P is F's top-d spectral projector, so PF = FP)."""
    lam = jnp.clip(subspace.eigvals, 0.0)
    return _sub.combine(subspace.basis, jnp.sqrt(lam) * coordinates(subspace, v))


def projected_norm(basis, v: PyTree) -> jax.Array:
    """‖P v‖ = ‖(u_jᵀv)_j‖ (orthonormal basis)."""
    return jnp.linalg.norm(coordinates(basis, v))


def fisher_projected_norm(subspace: SensitiveSubspace, v: PyTree) -> jax.Array:
    """‖F^{1/2} P v‖ = (Σ_{j≤d} λ_j (u_jᵀv)²)^{1/2}."""
    c = coordinates(subspace, v)
    return jnp.sqrt(jnp.sum(jnp.clip(subspace.eigvals, 0.0) * c * c))


def overlap_score(delta: PyTree, basis, fisher_weighted: bool = False, *, fisher_vp: Optional[Callable] = None):
    """The paper's overlap score OS = ‖P Δθ‖/‖Δθ‖, or ‖F^{1/2} P Δθ‖/‖F^{1/2} Δθ‖ when fisher_weighted.

    The Fisher-weighted denominator ‖F^{1/2}Δθ‖ = (Δθᵀ F Δθ)^{1/2} needs the full Fisher: pass
    ``fisher_vp`` (v ↦ F v: a matvec or a LinearOperator, e.g. ``curvature.fisher(problem)``); ``basis``
    must then be a SensitiveSubspace (its eigvals weight the numerator).
    """
    if fisher_weighted:
        if not isinstance(basis, SensitiveSubspace):
            raise ValueError("fisher_weighted=True needs a SensitiveSubspace (its eigvals weight P Δθ)")
        if fisher_vp is None:
            raise ValueError("fisher_weighted=True needs fisher_vp (v -> F v) for the denominator ‖F^{1/2} Δθ‖")
        num = fisher_projected_norm(basis, delta)
        fd = fisher_vp(delta)
        den = jnp.sqrt(jnp.clip(sum(jnp.vdot(a, b) for a, b in zip(jax.tree_util.tree_leaves(delta),
                                                                   jax.tree_util.tree_leaves(fd))), 0.0))
        return num / den
    num = projected_norm(basis, delta)
    den = jnp.sqrt(sum(jnp.vdot(x, x) for x in jax.tree_util.tree_leaves(delta)))
    return num / den
