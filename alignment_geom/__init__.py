"""alignment_geom: exact, JAX-native geometry of alignment collapse (arXiv:2602.15799).

The flat API below is the core mathematics; each name lives in the package of its concept:

    problem      Problem: θ*, the fine-tuning loss and the safety skill, as one pytree value
    curvature    H v, D³L[u, v, ·], F v, F̂ v, per-example gradients, Δu, Taylor series along the flow (§2–4)
    linalg       LinearOperator; eigensolvers, Gram eigenpairs, traces, SLQ, principal angles, the sketch (§3, §7)
    aic          the sensitive subspace (Def. 3.4), Fisher estimators, the AIC measurement (Def. 5.1)
    dynamics     gradient flow, optimiser paths, defences, path recorders, training loops (§4, §6)
    landscapes   synthetic problems where every AIC parameter is set exactly (§6)
    scaling      log–log slopes, the t⁴ window, fitted coefficients, collapse times, power laws (§6)

Above the core (import them explicitly): ``alignment_geom.models`` and ``alignment_geom.data`` (Section 7),
``alignment_geom.harness`` (workdirs, checkpoints, sharding, figures), ``alignment_geom.studies`` (the figures
and the Section-7 study), ``alignment_geom.cli`` (the command line), ``alignment_geom.testing`` (test zoo).
"""
from alignment_geom import aic, curvature, dynamics, landscapes, linalg, scaling, tree
from alignment_geom.aic import (
    AICReport,
    EmpiricalFisher,
    OperatorFisher,
    RandomSubspace,
    SensitiveSubspace,
    TrueFisher,
    measure,
    overlap_score,
    sensitive_subspace,
)
from alignment_geom.curvature import (
    CurvatureOperators,
    curvature_operators,
    empirical_fisher,
    empirical_fisher_vp,
    fisher,
    fisher_vp,
    flow_taylor,
    hessian,
    hvp,
    kl_utility,
    linearized_fisher_vp,
    linearized_hvp,
    onset_split,
    per_example_grads,
    stable_kl_utility,
    taylor_eval,
    third_order,
    utility_taylor,
)
from alignment_geom.dynamics import (
    discrete_path,
    dynamic_projection_defense,
    gradient_flow,
    make_defense,
    projection_defense,
    record_path,
)
from alignment_geom.landscapes import Landscape, landscape_grid, make_landscape
from alignment_geom.linalg import (
    LinearOperator,
    cumulative_energy,
    effective_rank,
    gram_eigenpairs,
    hutchpp_trace,
    principal_angles,
    random_subspace_fisher,
    top_eigenpairs,
)
from alignment_geom.problem import Problem
from alignment_geom.scaling import collapse_time, fit_coefficient, local_slope, onset_window, power_law_fit

__version__ = "0.2.0"

__all__ = [
    "aic", "curvature", "dynamics", "landscapes", "linalg", "scaling", "tree",
    "Problem", "LinearOperator",
    "hvp", "linearized_hvp", "third_order", "hessian", "fisher_vp", "linearized_fisher_vp", "empirical_fisher_vp",
    "fisher", "empirical_fisher", "per_example_grads", "kl_utility", "stable_kl_utility", "flow_taylor",
    "taylor_eval", "utility_taylor", "onset_split", "CurvatureOperators", "curvature_operators",
    "top_eigenpairs", "gram_eigenpairs", "hutchpp_trace", "principal_angles", "cumulative_energy", "effective_rank",
    "random_subspace_fisher",
    "SensitiveSubspace", "TrueFisher", "EmpiricalFisher", "RandomSubspace", "OperatorFisher", "sensitive_subspace",
    "measure", "AICReport", "overlap_score",
    "gradient_flow", "discrete_path", "projection_defense", "dynamic_projection_defense", "record_path",
    "make_defense",
    "Landscape", "make_landscape", "landscape_grid",
    "local_slope", "onset_window", "fit_coefficient", "collapse_time", "power_law_fit",
]
