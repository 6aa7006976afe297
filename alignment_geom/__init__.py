"""alignment_geom: exact, JAX-native geometry of alignment collapse (arXiv:2602.15799)."""
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

__version__ = "0.1.0"
