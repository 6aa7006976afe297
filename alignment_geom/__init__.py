"""alignment_geom: exact, JAX-native geometry of alignment collapse (arXiv:2602.15799).

Flat public API for the operators and measurements; the submodules hold the rest:
``curvature`` (§2–4 operators), ``spectral`` (eigensolvers, traces, principal angles),
``aic`` (Definitions 3.4 and 5.1), ``flow`` (Theorems 6.1–6.2, Corollary 6.3), ``landscapes``,
``scaling``, ``runner`` / ``experiments`` (figures), ``lm`` / ``lm_data`` (Section 7, imported on use).
"""
from alignment_geom import aic, curvature, flow, landscapes, scaling, spectral  # noqa: F401
from alignment_geom.aic import (  # noqa: F401
    AICReport,
    SensitiveSubspace,
    measure,
    overlap_score,
    sensitive_subspace,
)
from alignment_geom.curvature import (  # noqa: F401
    CurvatureOperators,
    curvature_operators,
    empirical_fisher_vp,
    fisher_vp,
    flow_taylor,
    hvp,
    kl_utility,
    linearized_fisher_vp,
    linearized_hvp,
    per_example_grads,
    taylor_eval,
    third_order,
)
from alignment_geom.flow import (  # noqa: F401
    discrete_path,
    dynamic_projection_defense,
    gradient_flow,
    onset_split,
    projection_defense,
    record_path,
    utility_taylor,
)
from alignment_geom.landscapes import Landscape, landscape_grid, make_landscape  # noqa: F401
from alignment_geom.scaling import (  # noqa: F401
    collapse_time,
    fit_coefficient,
    local_slope,
    onset_window,
    power_law_fit,
)
from alignment_geom.spectral import (  # noqa: F401
    cumulative_energy,
    effective_rank,
    gram_eigenpairs,
    hutchpp_trace,
    principal_angles,
    random_subspace_fisher,
    top_eigenpairs,
)

__version__ = "0.1.0"
