"""The alignment-sensitive subspace (Definition 3.4) and the Alignment Instability Condition (Definition 5.1).

    subspace   SensitiveSubspace and the projections of the AIC (P v, F^{1/2} P v, ‖P v‖, the overlap score)
    fisher     Fisher estimators: TrueFisher, EmpiricalFisher, RandomSubspace, OperatorFisher; fisher_trace
    measure    sensitive_subspace, measure -> AICReport
"""
from alignment_geom.aic.fisher import (
    EmpiricalFisher,
    FisherTrace,
    OperatorFisher,
    RandomSubspace,
    TrueFisher,
    as_estimator,
    fisher_trace,
)
from alignment_geom.aic.measure import (
    AICReport,
    estimator_from_strings,
    measure,
    problem_from_functions,
    sensitive_subspace,
)
from alignment_geom.aic.subspace import (
    SensitiveSubspace,
    coordinates,
    fisher_projected_norm,
    fisher_sqrt_project,
    overlap_score,
    project,
    projected_norm,
)
from alignment_geom.curvature.fisher import empirical_fisher_trace

__all__ = [
    "SensitiveSubspace", "coordinates", "project", "fisher_sqrt_project", "projected_norm", "fisher_projected_norm",
    "overlap_score",
    "FisherTrace", "TrueFisher", "EmpiricalFisher", "RandomSubspace", "OperatorFisher", "as_estimator",
    "fisher_trace", "empirical_fisher_trace",
    "sensitive_subspace", "measure", "AICReport", "problem_from_functions", "estimator_from_strings",
]
