"""Matrix-free linear algebra over pytree operators (paper §3: F, its top-d eigenpairs, Mᵢ, Pᵢ; §7: the sketch).

Operators (:class:`LinearOperator`: a matvec plus its structure) and the solvers that consume them:
top-k eigenpairs (Lanczos, LOBPCG, randomized), Gram eigenpairs of per-example gradients, traces and
stochastic Lanczos quadrature, principal angles and spectral energies, and the paper's random-subspace
Fisher. Every solver accepts a LinearOperator or a ``(matvec, like)`` pair.
"""
from alignment_geom.linalg.eigen import SolverInfo, top_eigenpairs
from alignment_geom.linalg.gram import gram_eigenpairs, gram_eigenpairs_and_trace
from alignment_geom.linalg.operator import Factor, LinearOperator, as_matrix, as_operator
from alignment_geom.linalg.sketch import (
    SKETCH_KINDS,
    CountSketch,
    GaussianSketch,
    RandomSubspaceFisher,
    SparseSign,
    as_sketch,
    random_sketch_matrix,
    random_subspace_fisher,
    sketch,
    sketch_transpose,
)
from alignment_geom.linalg.subspace import (
    combine,
    coordinates,
    cumulative_energy,
    dim_for_energy,
    effective_rank,
    orthonormal_rows,
    principal_angles,
    project,
    project_out,
)
from alignment_geom.linalg.trace import (
    SLQResult,
    dense_trace,
    hutchinson_trace,
    hutchpp_trace,
    slq,
    slq_trace,
    spectral_density,
)

__all__ = [
    "Factor", "LinearOperator", "as_operator", "as_matrix",
    "SolverInfo", "top_eigenpairs",
    "gram_eigenpairs", "gram_eigenpairs_and_trace",
    "dense_trace", "hutchinson_trace", "hutchpp_trace", "SLQResult", "slq", "slq_trace", "spectral_density",
    "coordinates", "combine", "project", "project_out", "orthonormal_rows", "principal_angles", "cumulative_energy",
    "dim_for_energy", "effective_rank",
    "sketch", "sketch_transpose", "random_sketch_matrix", "RandomSubspaceFisher", "random_subspace_fisher",
    "GaussianSketch", "SparseSign", "CountSketch", "as_sketch", "SKETCH_KINDS",
]
