"""Exact curvature of the fine-tuning loss and of the safety policy (paper §2–4), over pytrees.

Notation (arXiv:2602.15799): θ* the aligned parameters, L the fine-tuning loss, g = ∇L(θ*), H = ∇²L(θ*),
z = logits_fn(θ, x) ∈ ℝ^C the policy logits, π = softmax(z), J = ∂z/∂θ, Λ = diag(p) − ppᵀ,
F = E[Jᵀ Λ J] the true Fisher, F̂ the empirical Fisher of observed completions, Δu = KL(π_θ* ‖ π_θ).

Two forms of every operator:

* functional, ``hvp(loss_fn, params, v, batch, mask)``, ``fisher_vp(logits_fn, params, v, inputs, mask)``, …
  (pure functions of pytrees; jit/vmap compatible; the parameters' dtype is kept);
* operator objects built from a :class:`~alignment_geom.problem.Problem`: ``hessian(problem)``,
  ``fisher(problem)``, ``empirical_fisher(problem)`` return :class:`~alignment_geom.linalg.LinearOperator` s
  (linearised once, masked, tagged symmetric/PSD) that the eigensolvers and traces of
  :mod:`alignment_geom.linalg` consume.

Modules: ``hessian`` (H v, D³L[u, v, ·]), ``fisher`` (F v, F̂ v, per-example gradients, ‖F^{1/2}v‖),
``utility`` (Δu), ``taylor`` (the Taylor series of θ(t) and of Δu(θ(t)) along gradient flow).
"""
from alignment_geom.curvature._taylor_mode import TaylorModeError, widen_precision
from alignment_geom.curvature.bundle import CurvatureOperators, curvature_operators
from alignment_geom.curvature.fisher import (
    empirical_fisher,
    empirical_fisher_trace,
    empirical_fisher_vp,
    fisher,
    fisher_factor,
    fisher_norm,
    fisher_vp,
    lambda_quad,
    linearized_empirical_fisher_vp,
    linearized_fisher_operator,
    linearized_fisher_vp,
    per_example_grads,
    softmax_hessian_apply,
    top_fisher_subspace,
)
from alignment_geom.curvature.hessian import hessian, hvp, linearized_hvp, third_order
from alignment_geom.curvature.taylor import flow_taylor, onset_split, taylor_eval, utility_taylor, utility_taylor_coeffs
from alignment_geom.curvature.utility import kl_utility, stable_kl, stable_kl_utility

__all__ = [
    "TaylorModeError", "widen_precision",
    "hvp", "linearized_hvp", "third_order", "hessian",
    "fisher_vp", "linearized_fisher_vp", "linearized_fisher_operator", "empirical_fisher_vp",
    "linearized_empirical_fisher_vp",
    "per_example_grads", "empirical_fisher_trace", "fisher_norm", "lambda_quad", "softmax_hessian_apply",
    "fisher_factor", "top_fisher_subspace", "fisher", "empirical_fisher",
    "kl_utility", "stable_kl", "stable_kl_utility",
    "flow_taylor", "taylor_eval", "utility_taylor", "utility_taylor_coeffs", "onset_split",
    "CurvatureOperators", "curvature_operators",
]
