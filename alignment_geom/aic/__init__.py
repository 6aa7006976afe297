"""The alignment-sensitive subspace (Definition 3.4) and the Alignment Instability Condition (Definition 5.1).

    subspace   SensitiveSubspace and the projections of the AIC (P v, F^{1/2} P v, ‖P v‖, the overlap score)
    fisher     Fisher estimators: TrueFisher, EmpiricalFisher, RandomSubspace, OperatorFisher; fisher_trace
    measure    sensitive_subspace, measure -> AICReport
    scale      LLM scale, one chunk of per-example gradients in memory: the random-subspace Fisher
               (subspace_fisher, subspace_overlap), the exact Gram Fisher and OS (gram_fisher, gram_overlap),
               the true Fisher by Lanczos (true_fisher_eigenpairs)
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
from alignment_geom.aic.scale import (
    GramFisher,
    SubspaceFisher,
    gram_fisher,
    gram_jvp,
    gram_overlap,
    sketched_gradients,
    subspace_fisher,
    subspace_overlap,
    true_fisher_eigenpairs,
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
    "SubspaceFisher", "GramFisher", "sketched_gradients", "subspace_fisher", "subspace_overlap", "gram_fisher",
    "gram_jvp", "gram_overlap", "true_fisher_eigenpairs",
    "sensitive_subspace", "measure", "AICReport", "problem_from_functions", "estimator_from_strings",
]
