"""Fisher estimators: which Fisher of the safety skill defines the sensitive subspace, and how it is solved.

Each estimator is a small immutable value (hashable, so jitted code specialises on it) with two methods on a
:class:`~alignment_geom.problem.Problem`:

* ``subspace(problem, k, key) -> (SensitiveSubspace, (tr F, stderr) | None)``: the top-k eigenpairs, and tr F
  when the same computation gives it for free;
* ``trace(problem, key) -> (tr F, stderr)``: tr F, exact or estimated with a standard error;
* ``trace_method(problem) -> str``: how ``trace`` (or the free trace) is obtained: "exact", "hutch++", "sketch".

The jitted wrappers :func:`estimator_subspace` and :func:`estimator_trace` return :class:`FisherTrace` values.

    TrueFisher()        F = mean_x Jᵀ(diag p − ppᵀ)J of softmax(logits_fn(θ, inputs)) (Assumption 1: F = ∇²Δu)
    EmpiricalFisher()   F̂ = (1/m) Σᵢ ∇log πᵢ ∇log πᵢᵀ of the safe completions (logprob_fn, safety_batch)
    RandomSubspace(k)   the paper's estimator of F̂: per-example gradients in a k-dim random subspace (§7)
    OperatorFisher(op)  any user-supplied symmetric PSD LinearOperator

A LinearOperator passed where an estimator is expected is wrapped in :class:`OperatorFisher`.
"""
from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from alignment_geom import curvature
from alignment_geom.aic.subspace import SensitiveSubspace
from alignment_geom.linalg import (
    LinearOperator,
    as_sketch,
    dense_trace,
    gram_eigenpairs_and_trace,
    hutchpp_trace,
    random_subspace_fisher,
    top_eigenpairs,
)
from alignment_geom.problem import Problem
from alignment_geom.tree import mask_count, tree_map

__all__ = ["FisherTrace", "TrueFisher", "EmpiricalFisher", "RandomSubspace", "OperatorFisher", "as_estimator",
           "fisher_trace"]

LANCZOS_METHODS = ("lanczos", "lobpcg", "randomized")


class FisherTrace(NamedTuple):
    """tr F: ``value``, ``method`` ("exact", "hutch++" or "sketch") and ``stderr`` (0 when exact, NaN unknown)."""

    value: Any
    method: str
    stderr: Any


def _check_k(k, n):
    if not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"d must be an integer in [1, n={n}]; got {k!r}")


def _eig(op, k, key, method, tol, num_steps):
    lam, basis, res = top_eigenpairs(op, k, key=key, method=method, tol=tol, num_steps=num_steps)
    return SensitiveSubspace(basis, lam, res)


def _exact_residuals(op, basis, lam):
    Fb = jax.vmap(op.mv)(basis)
    r = jax.tree_util.tree_leaves(tree_map(lambda a, b: (a - lam.reshape((-1,) + (1,) * (b.ndim - 1)) * b) ** 2,
                                           Fb, basis))
    nrm = jnp.sqrt(sum(jnp.sum(x.reshape(x.shape[0], -1), axis=1) for x in r))
    return nrm / jnp.maximum(jnp.abs(lam), jnp.finfo(lam.dtype).tiny)


def _trace_method(op: LinearOperator, exact_max_n: int) -> str:
    return "exact" if op.size <= exact_max_n else "hutch++"


def _operator_trace(op: LinearOperator, exact_max_n: int, num_matvecs: int, key):
    """(tr A, stderr): exact from n unit-vector matvecs when n ≤ exact_max_n, else Hutch++."""
    if _trace_method(op, exact_max_n) == "exact":
        t = dense_trace(op)
        return t, jnp.zeros_like(t)
    return hutchpp_trace(op, num_matvecs, key=key)


class TrueFisher(NamedTuple):
    """F = mean_x Jᵀ(diag p − ppᵀ)J of the safety policy softmax(logits_fn(θ, inputs)).

    method: "lanczos" (default; full re-orthogonalisation, on the Gram side B Bᵀ of F = BᵀB when the logits have
    fewer entries than θ), "lobpcg", "randomized" (on the linearised matvec ``curvature.fisher(problem)``), or
    "factor" (exact: thin SVD of the Fisher factor
    Λ^{1/2}J, ``curvature.top_fisher_subspace``; cheap when the logits have few entries, e.g. the
    landscapes). tol / num_steps: passed to ``linalg.top_eigenpairs``. tr F: exact (n unit-vector
    matvecs) when n ≤ exact_trace_max_n, else Hutch++ with ``trace_matvecs`` matvecs.
    """

    method: str = "lanczos"
    tol: Optional[float] = None
    num_steps: Optional[int] = None
    exact_trace_max_n: int = 2048
    trace_matvecs: int = 300

    name = "true"

    def check(self, problem: Problem):
        if self.method not in LANCZOS_METHODS + ("factor",):
            raise ValueError(f"TrueFisher.method must be one of {LANCZOS_METHODS + ('factor',)}; got {self.method!r}")
        problem.require("logits_fn")

    def operator(self, problem: Problem) -> LinearOperator:
        return curvature.fisher(problem)

    def subspace(self, problem: Problem, k: int, key):
        op = self.operator(problem)
        if self.method == "factor":
            basis, lam = curvature.top_fisher_subspace(problem.logits_fn, problem.params, problem.inputs, k,
                                                       problem.mask)
            return SensitiveSubspace(basis, lam, _exact_residuals(op, basis, lam)), None
        return _eig(op, k, key, self.method, self.tol, self.num_steps), None

    def trace_method(self, problem: Problem) -> str:
        return _trace_method(self.operator(problem), self.exact_trace_max_n)

    def trace(self, problem: Problem, key):
        return _operator_trace(self.operator(problem), self.exact_trace_max_n, self.trace_matvecs, key)


class EmpiricalFisher(NamedTuple):
    """F̂ = (1/m) Σᵢ ∇log π(yᵢ|xᵢ) ∇log π(yᵢ|xᵢ)ᵀ of the m safe completions (``logprob_fn``, ``safety_batch``).

    method: "lanczos", "lobpcg", "randomized" (on the linearised matvec ``curvature.empirical_fisher``), or
    "gram": exact eigenpairs from the m×m Gram matrix of the m per-example gradients (memory m·n, cost
    about one batched gradient + O(m²n); what alignment-risk's SVD computes; tr F̂ comes with it).
    tr F̂ = (1/m) Σᵢ ‖∇log πᵢ‖² is always exact (``curvature.empirical_fisher_trace``).
    """

    method: str = "lanczos"
    tol: Optional[float] = None
    num_steps: Optional[int] = None

    name = "empirical"

    def check(self, problem: Problem):
        if self.method not in LANCZOS_METHODS + ("gram",):
            raise ValueError(f"EmpiricalFisher.method must be one of {LANCZOS_METHODS + ('gram',)}; "
                             f"got {self.method!r}")
        problem.require("logprob_fn", "safety_batch")

    def operator(self, problem: Problem) -> LinearOperator:
        return curvature.empirical_fisher(problem)

    def subspace(self, problem: Problem, k: int, key):
        if self.method == "gram":
            m = int(jax.tree_util.tree_leaves(problem.safety_batch)[0].shape[0])
            if k > m:
                raise ValueError(f"the empirical Fisher of m = {m} examples has rank ≤ {m} < d = {k}")
            # one pass of per-example gradients G (m × n) gives the eigenpairs and tr F̂ = tr(GGᵀ)/m
            G = curvature.per_example_grads(problem.logprob_fn, problem.params, problem.safety_batch, problem.mask)
            lam, basis, res, trace = gram_eigenpairs_and_trace(G, k, True)
            return SensitiveSubspace(basis, lam, res), (trace, jnp.zeros_like(trace))
        return _eig(self.operator(problem), k, key, self.method, self.tol, self.num_steps), None

    def trace_method(self, problem: Problem) -> str:
        return "exact"

    def trace(self, problem: Problem, key):
        t = curvature.empirical_fisher_trace(problem.logprob_fn, problem.params, problem.safety_batch,
                                             mask=problem.mask)
        return t, jnp.zeros_like(t)


class RandomSubspace(NamedTuple):
    """The paper's estimator (§7) of the empirical Fisher: zᵢ = S gᵢ ∈ ℝᵏ for the m per-example gradients
    gᵢ = ∇log π(safe completionᵢ | promptᵢ) and a k×n Gaussian S generated blockwise from the key, then the
    eigenpairs of F_S = (1/m) Σ zᵢzᵢᵀ = S F̂ Sᵀ (k×k), mapped back to parameter space through the Gram
    identity (``linalg.random_subspace_fisher``). tr F̂ ≈ (1/m)‖Z‖²_F (method "sketch", no standard error).
    ``kind``: the sketch S, "gaussian" (the paper's dense S, default), "sparse_sign", "countsketch" or a sketch
    object (``linalg.SparseSign(s=8)``, ...).
    """

    k: int = 4096
    block_size: int = 65536
    example_batch_size: Optional[int] = None
    normalization: str = "jl"
    kind: Any = "gaussian"

    name = "random_subspace"
    method = "sketch"

    def check(self, problem: Problem):
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"RandomSubspace.k must be a positive integer; got {self.k!r}")
        as_sketch(self.kind, self.k, None)
        problem.require("logprob_fn", "safety_batch")

    def _run(self, problem, key, return_vectors):
        return random_subspace_fisher(problem.logprob_fn, problem.params, problem.safety_batch, self.k, key=key,
                                      mask=problem.mask, example_batch_size=self.example_batch_size,
                                      block_size=self.block_size, normalization=self.normalization,
                                      return_vectors=return_vectors, kind=self.kind)

    def subspace(self, problem: Problem, k: int, key):
        rs = self._run(problem, key, True)
        r = rs.eigvals.shape[0]
        if k > r:
            raise ValueError(f"the random-subspace Fisher has rank ≤ min(m, k) = {r} < d = {k}")
        lam = rs.eigvals[:k]
        sub = SensitiveSubspace(tree_map(lambda x: x[:k], rs.eigvecs), lam, jnp.full((k,), jnp.nan, lam.dtype))
        return sub, (rs.trace, jnp.full((), jnp.nan, lam.dtype))

    def trace_method(self, problem: Problem) -> str:
        return "sketch"

    def trace(self, problem: Problem, key):
        rs = self._run(problem, key, False)
        return rs.trace, jnp.full((), jnp.nan, rs.trace.dtype)


class OperatorFisher(NamedTuple):
    """A user-supplied Fisher: any symmetric PSD :class:`~alignment_geom.linalg.LinearOperator` on θ-shaped
    pytrees. Solved with ``method`` ("lanczos", "lobpcg", "randomized"); tr F exact for n ≤ exact_trace_max_n,
    else Hutch++. Runs eagerly (the operator already holds its arrays)."""

    op: LinearOperator
    method: str = "lanczos"
    tol: Optional[float] = None
    num_steps: Optional[int] = None
    exact_trace_max_n: int = 2048
    trace_matvecs: int = 300

    name = "operator"

    def check(self, problem: Problem):
        if self.method not in LANCZOS_METHODS:
            raise ValueError(f"OperatorFisher.method must be one of {LANCZOS_METHODS}; got {self.method!r}")
        if not self.op.symmetric:
            raise ValueError("the Fisher operator must be symmetric (LinearOperator(symmetric=True))")

    def operator(self, problem: Problem) -> LinearOperator:
        return self.op if problem.mask is None or self.op.mask is not None else self.op.with_mask(problem.mask)

    def subspace(self, problem: Problem, k: int, key):
        return _eig(self.operator(problem), k, key, self.method, self.tol, self.num_steps), None

    def trace_method(self, problem: Problem) -> str:
        return _trace_method(self.operator(problem), self.exact_trace_max_n)

    def trace(self, problem: Problem, key):
        return _operator_trace(self.operator(problem), self.exact_trace_max_n, self.trace_matvecs, key)


def as_estimator(fisher) -> Any:
    """An estimator from ``fisher``: an estimator (returned as is), a LinearOperator (OperatorFisher), or None
    (TrueFisher())."""
    if fisher is None:
        return TrueFisher()
    if isinstance(fisher, LinearOperator):
        return OperatorFisher(fisher)
    if isinstance(fisher, (TrueFisher, EmpiricalFisher, RandomSubspace, OperatorFisher)) or (
            hasattr(fisher, "subspace") and hasattr(fisher, "trace")):
        return fisher
    raise ValueError(f"fisher must be a Fisher estimator (TrueFisher(), EmpiricalFisher(), RandomSubspace(k)) or a "
                     f"LinearOperator; got {fisher!r}")


# Jitted entry points: one compilation per (estimator, k) and per problem (its functions, mask and shapes).
@partial(jax.jit, static_argnames=("est", "k"))
def _subspace_jit(est, problem, k, key):
    return est.subspace(problem, k, key)


@partial(jax.jit, static_argnames=("est",))
def _trace_jit(est, problem, key):
    return est.trace(problem, key)


def estimator_subspace(est, problem: Problem, k: int, key):
    """(SensitiveSubspace, FisherTrace or None): ``est.subspace(problem, k, key)``, jitted unless the estimator
    holds its own arrays (OperatorFisher)."""
    est.check(problem)
    _check_k(k, mask_count(problem.mask, problem.params))
    run = est.subspace if isinstance(est, OperatorFisher) else partial(_subspace_jit, est)
    sub, tr = run(problem, k, key)
    return sub, (None if tr is None else FisherTrace(tr[0], est.trace_method(problem), tr[1]))


def estimator_trace(est, problem: Problem, key) -> FisherTrace:
    """FisherTrace from ``est.trace(problem, key)``, jitted unless the estimator holds its own arrays."""
    est.check(problem)
    run = est.trace if isinstance(est, OperatorFisher) else partial(_trace_jit, est)
    t, se = run(problem, key)
    return FisherTrace(t, est.trace_method(problem), se)


def fisher_trace(problem: Problem, *, fisher=None, key: Optional[jax.Array] = None) -> FisherTrace:
    """tr F for ``problem``'s safety skill: a :class:`FisherTrace` (value, method, stderr), which unpacks as a
    3-tuple. ``fisher``: an estimator (default TrueFisher()) or a LinearOperator."""
    key = jax.random.PRNGKey(0) if key is None else key
    return estimator_trace(as_estimator(fisher), problem, key)
