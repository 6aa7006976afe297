"""The Alignment Instability Condition (Definition 5.1) measured at θ*: ``measure(problem, d, fisher=...)``.

Notation (arXiv:2602.15799): θ* the aligned parameters, L the fine-tuning loss, g = ∇L(θ*), H = ∇²L(θ*),
F = F(θ*) the skill's Fisher with eigenvalues λ₁ ≥ λ₂ ≥ …, M = span of its top-d eigenvectors and P the
projector onto M. The AIC holds when (1) Σ_{j>d} λ_j ≤ ε and λ_d ≥ λ (low-rank sensitivity), (2) ‖P g‖ ≤ ε
(initial orthogonality) and (3) ‖F^{1/2} P H g‖ ≥ γ (curvature coupling).

    sensitive_subspace(problem, d | energy=, fisher=TrueFisher())  -> SensitiveSubspace   (Definition 3.4)
    measure(problem, d, fisher=TrueFisher(), thresholds…)          -> AICReport           (Definition 5.1)

``fisher`` is a Fisher estimator (:mod:`alignment_geom.aic.fisher`) or any symmetric PSD LinearOperator.
Both functions also accept the positional-function call forms of earlier releases
(``measure(loss_fn, params, batch, logits_fn, inputs, d, fisher="true", ...)``,
``sensitive_subspace(params, d, logits_fn=..., fisher="empirical", ...)``): a first argument that is not a
Problem is read that way and converted (:func:`problem_from_functions`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
from functools import partial
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from alignment_geom import curvature
from alignment_geom.aic.fisher import (
    EmpiricalFisher,
    RandomSubspace,
    TrueFisher,
    as_estimator,
    estimator_subspace,
    estimator_trace,
)
from alignment_geom.aic.subspace import SensitiveSubspace, coordinates
from alignment_geom.linalg import dim_for_energy
from alignment_geom.problem import Problem
from alignment_geom.tree import mask_count, tree_map

PyTree = Any

__all__ = ["sensitive_subspace", "measure", "AICReport", "problem_from_functions", "estimator_from_strings"]


# --------------------------------------------------------------------------- earlier call forms


def problem_from_functions(params, *, loss_fn=None, batch=None, logits_fn=None, inputs=None, logprob_fn=None,
                           safety_batch=None, mask=None) -> Problem:
    """The Problem of the positional-function call forms (fields as keywords)."""
    return Problem(params, loss_fn=loss_fn, batch=batch, logits_fn=logits_fn, inputs=inputs, logprob_fn=logprob_fn,
                   safety_batch=safety_batch, mask=mask)


def estimator_from_strings(fisher: str = "true", *, method: str = "lanczos", tol=None, num_steps=None,
                           sketch_dim: int = 4096, exact_trace_max_n: int = 2048, trace_matvecs: int = 300):
    """The estimator named by the string options of the earlier call forms (fisher="true" | "empirical" |
    "random_subspace", method, tol, num_steps, sketch_dim, exact_trace_max_n, trace_matvecs)."""
    if fisher == "true":
        return TrueFisher(method, tol, num_steps, exact_trace_max_n, trace_matvecs)
    if fisher == "empirical":
        return EmpiricalFisher(method, tol, num_steps)
    if fisher == "random_subspace":
        return RandomSubspace(int(sketch_dim))
    raise ValueError(f"fisher must be 'true', 'empirical' or 'random_subspace'; got {fisher!r}")


def _legacy_subspace(params, d=None, *, logits_fn=None, inputs=None, fisher="true", logprob_fn=None,
                     safety_batch=None, energy=None, k_max=None, total=None, mask=None, key=None, method="lanczos",
                     tol=None, num_steps=None, sketch_dim=4096, trace_options=None):
    est = estimator_from_strings(fisher, method=method, tol=tol, num_steps=num_steps, sketch_dim=sketch_dim,
                                 **(trace_options or {}))
    pb = problem_from_functions(params, logits_fn=logits_fn, inputs=inputs, logprob_fn=logprob_fn,
                                safety_batch=safety_batch, mask=mask)
    return (pb, d), dict(fisher=est, energy=energy, k_max=k_max, total=total, key=key)


def _legacy_measure(ft_loss, params, ft_batch, logits_fn, safety_inputs, d, *, fisher="true", logprob_fn=None,
                    safety_batch=None, mask=None, key=None, method="lanczos", tol=None, num_steps=None,
                    lam_threshold=None, eps_threshold=None, gamma_threshold=None, tail_threshold=None,
                    exact_trace_max_n=2048, trace_matvecs=300, sketch_dim=4096, taylor_method="jet", subspace=None):
    est = estimator_from_strings(fisher, method=method, tol=tol, num_steps=num_steps, sketch_dim=sketch_dim,
                                 exact_trace_max_n=exact_trace_max_n, trace_matvecs=trace_matvecs)
    pb = problem_from_functions(params, loss_fn=ft_loss, batch=ft_batch, logits_fn=logits_fn, inputs=safety_inputs,
                                logprob_fn=logprob_fn, safety_batch=safety_batch, mask=mask)
    return (pb, d), dict(fisher=est, key=key, lam_threshold=lam_threshold, eps_threshold=eps_threshold,
                         gamma_threshold=gamma_threshold, tail_threshold=tail_threshold,
                         taylor_method=taylor_method, subspace=subspace)


def _accepts_earlier_forms(adapter):
    """Decorator: a call whose first argument is not a Problem is converted by ``adapter(*args, **kwargs) ->
    (args, kwargs)`` into the Problem form. ``help()``/``inspect`` show the Problem form's signature."""
    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            first = args[0] if args else kwargs.get("problem")
            if isinstance(first, Problem):
                return fn(*args, **kwargs)
            a, kw = adapter(*args, **kwargs)
            return fn(*a, **kw)
        return wrapper
    return deco


# --------------------------------------------------------------------------- Definition 3.4


@_accepts_earlier_forms(_legacy_subspace)
def sensitive_subspace(problem: Problem, d: Optional[int] = None, *, fisher=None, energy: Optional[float] = None,
                       k_max: Optional[int] = None, total: Optional[float] = None,
                       key: Optional[jax.Array] = None) -> SensitiveSubspace:
    """Definition 3.4: M = span of the top-d eigenvectors of the skill Fisher F(θ*) (restricted to problem.mask).

    Args:
      problem: θ* and the safety skill (``logits_fn``/``inputs`` for the true Fisher, ``logprob_fn``/
        ``safety_batch`` for the empirical Fisher and the random-subspace estimator).
      d: the subspace dimension; or give ``energy`` ∈ (0, 1] to take the smallest d with
        Σ_{j≤d} λ_j ≥ energy · tr F (from the top ``k_max`` eigenpairs, default 64; tr F from the
        estimator, or pass ``total``). d = k_max if the energy is not reached.
      fisher: a Fisher estimator (``TrueFisher()`` default, ``EmpiricalFisher(method="gram")``,
        ``RandomSubspace(k=4096)``, …) or a symmetric PSD LinearOperator.
      key: PRNG key (default PRNGKey(0)).
    """
    return _sensitive_subspace(problem, d, fisher=fisher, energy=energy, k_max=k_max, total=total, key=key)[0]


def _sensitive_subspace(problem, d=None, *, fisher=None, energy=None, k_max=None, total=None, key=None):
    """(SensitiveSubspace, FisherTrace or None): the subspace and tr F when it came with it."""
    if (d is None) == (energy is None):
        raise ValueError("give exactly one of d (the dimension) and energy (a cumulative-energy threshold)")
    est = as_estimator(fisher)
    key = jax.random.PRNGKey(0) if key is None else key
    n = mask_count(problem.mask, problem.params)
    kk = d if d is not None else min(64 if k_max is None else k_max, n)
    if not isinstance(kk, (int, np.integer)) or not 1 <= kk <= n:
        raise ValueError(f"d must be an integer in [1, n={n}]; got {kk!r}")
    sub, free_trace = estimator_subspace(est, problem, int(kk), key)
    if energy is None:
        return sub, free_trace
    if total is None:
        tr = free_trace if free_trace is not None else estimator_trace(est, problem, jax.random.fold_in(key, 1))
        total = tr.value
    dd = dim_for_energy(sub.eigvals, energy, total)
    return SensitiveSubspace(tree_map(lambda x: x[:dd], sub.basis), sub.eigvals[:dd], sub.residuals[:dd]), free_trace


# --------------------------------------------------------------------------- the report


def _f(x):
    return None if x is None else float(np.asarray(x))


@dataclasses.dataclass
class AICReport:
    """The measured AIC parameters at θ* (Definition 5.1) and the quartic-onset constants (Cor. 6.3).

    eigvals (d,): λ_1 ≥ … ≥ λ_d of F(θ*); lam = λ_d (sharpness).
    trace, tail: tr F and Σ_{j>d} λ_j = tr F − Σ_{j≤d} λ_j; trace_method "exact" | "hutch++" |
        "sketch" (random-subspace Fisher); trace_stderr its standard error (0 when exact).
    eps = ‖P g‖; eps_F = ‖F^{1/2} P g‖; gamma_E = ‖P H g‖; gamma_F = ‖F^{1/2} P H g‖;
    hg_norm = ‖H g‖; g_norm = ‖g‖.
    c4_bound_F = γ_F²/8 and c4_bound_E = λ γ_E²/8: the two readings of the quartic constant,
        Δu(θ(t)) ≳ C t⁴.
    t_min = 2 eps_F/γ_F: beyond it the (γ_F/2) t² drift dominates the −eps_F t term.
    c3_F = ‖F^{1/2} P c_3‖ with c_3 = −(H²g + D³L[g, g])/6 the path's cubic Taylor coefficient;
    t0 = γ_F/(4 c3_F): where c3_F t³ reaches half of the quadratic term γ_F t²/2 (inf if c3_F = 0).
    conditions: {"low_rank", "orthogonality", "coupling"} → bool (None without thresholds);
    aic: all three hold (None if any is undecided). thresholds: the (λ, ε, γ) used.
    """

    d: int
    n: int
    fisher: str
    method: str
    eigvals: np.ndarray
    residuals: np.ndarray
    lam: float
    trace: float
    trace_method: str
    trace_stderr: float
    tail: float
    g_norm: float
    eps: float
    eps_F: float
    gamma_E: float
    gamma_F: float
    hg_norm: float
    c3_F: float
    c4_bound_F: float
    c4_bound_E: float
    t_min: float
    t0: float
    thresholds: Dict[str, Optional[float]]
    conditions: Dict[str, Optional[bool]]
    aic: Optional[bool]

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict (arrays as lists, inf as the string "inf")."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, np.ndarray):
                v = [float(x) for x in v]
            elif isinstance(v, float) and not math.isfinite(v):
                v = str(v)
            out[f.name] = v
        return out

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    def __str__(self) -> str:
        rows = [
            ("d / n", f"{self.d} / {self.n}"),
            ("Fisher / solver", f"{self.fisher} / {self.method}"),
            ("λ_1 … λ_d", ", ".join(f"{x:.4g}" for x in self.eigvals[:8]) + (" …" if self.d > 8 else "")),
            ("λ = λ_d (sharpness)", f"{self.lam:.6g}"),
            ("tr F", f"{self.trace:.6g} ({self.trace_method}, ± {self.trace_stderr:.2g})"),
            ("tail Σ_{j>d} λ_j", f"{self.tail:.6g}"),
            ("‖g‖", f"{self.g_norm:.6g}"),
            ("ε = ‖P g‖", f"{self.eps:.6g}"),
            ("ε_F = ‖F^½ P g‖", f"{self.eps_F:.6g}"),
            ("‖H g‖", f"{self.hg_norm:.6g}"),
            ("γ_E = ‖P H g‖", f"{self.gamma_E:.6g}"),
            ("γ_F = ‖F^½ P H g‖", f"{self.gamma_F:.6g}"),
            ("‖F^½ P c_3‖", f"{self.c3_F:.6g}"),
            ("γ_F²/8", f"{self.c4_bound_F:.6g}"),
            ("λ γ_E²/8", f"{self.c4_bound_E:.6g}"),
            ("t_min = 2ε_F/γ_F", f"{self.t_min:.6g}"),
            ("t0 (cubic = ½ quadratic)", f"{self.t0:.6g}"),
        ]
        for name, ok in self.conditions.items():
            rows.append((f"condition {name}", "undecided" if ok is None else ("holds" if ok else "fails")))
        rows.append(("AIC", "undecided" if self.aic is None else ("holds" if self.aic else "fails")))
        w = max(len(r[0]) for r in rows)
        lines = ["AICReport (Definition 5.1)"] + [f"  {a.ljust(w)}  {b}" for a, b in rows]
        return "\n".join(lines)




# --------------------------------------------------------------------------- Definition 5.1


@partial(jax.jit, static_argnames=("taylor_method",))
def _flow_quantities(problem: Problem, sub: SensitiveSubspace, taylor_method: str):
    """‖g‖, ‖Hg‖, ε, ε_F, γ_E, γ_F and ‖F^{1/2}P c_3‖ from one order-3 Taylor pass of the flow."""
    c1, c2, c3 = curvature.flow_taylor(problem.loss_fn, problem.params, problem.batch, 3, mask=problem.mask,
                                       method=taylor_method)
    g = tree_map(jnp.negative, c1)
    hg = tree_map(lambda x: 2 * x, c2)
    lam = jnp.clip(sub.eigvals, 0.0)
    a, bb, c = coordinates(sub, g), coordinates(sub, hg), coordinates(sub, c3)

    def nrm(t):
        return jnp.sqrt(sum(jnp.vdot(x, x) for x in jax.tree_util.tree_leaves(t)))

    return dict(g_norm=nrm(g), hg_norm=nrm(hg), eps=jnp.linalg.norm(a), eps_F=jnp.sqrt(jnp.sum(lam * a * a)),
                gamma_E=jnp.linalg.norm(bb), gamma_F=jnp.sqrt(jnp.sum(lam * bb * bb)),
                c3_F=jnp.sqrt(jnp.sum(lam * c * c)))


@_accepts_earlier_forms(_legacy_measure)
def measure(problem: Problem, d: int, *, fisher=None, key: Optional[jax.Array] = None,
            subspace: Optional[SensitiveSubspace] = None, lam_threshold: Optional[float] = None,
            eps_threshold: Optional[float] = None, gamma_threshold: Optional[float] = None,
            tail_threshold: Optional[float] = None, taylor_method: str = "jet") -> AICReport:
    """Measure the AIC (Definition 5.1) at θ* = problem.params for its fine-tuning loss and safety skill.

    g = ∇L(θ*), H g and c_3 = −(H²g + D³L[g, g])/6 come from ``curvature.flow_taylor`` (order 3:
    c_1 = −g, c_2 = Hg/2). P projects onto the top-d eigenvectors of the skill Fisher F(θ*)
    (:func:`sensitive_subspace` with ``fisher``; pass ``subspace`` to reuse one). Everything is matrix-free:
    cost ≈ the estimator's matvecs + one order-3 Taylor pass + the trace (the estimator's: exact or Hutch++
    for the true Fisher, exact for the empirical one, the sketch's for the random subspace).

    Conditions (verdicts None when the thresholds they need are not given):
      low_rank:      tail ≤ ε_tail (tail_threshold, default eps_threshold) and λ_d ≥ λ (lam_threshold);
      orthogonality: ‖P g‖ ≤ ε (eps_threshold);
      coupling:      γ_F = ‖F^{1/2} P H g‖ ≥ γ (gamma_threshold).

    ``problem.mask`` restricts both the Fisher and the flow (θ̇_S = −∇_S L).
    """
    problem.require("loss_fn")
    est = as_estimator(fisher)
    key = jax.random.PRNGKey(0) if key is None else key
    n = mask_count(problem.mask, problem.params)
    if not isinstance(d, (int, np.integer)) or not 1 <= d <= n:
        raise ValueError(f"d must be an integer in [1, n={n}]; got {d!r}")
    free_trace = None
    if subspace is None:
        subspace, free_trace = _sensitive_subspace(problem, int(d), fisher=est, key=key)
    elif subspace.eigvals.shape[0] != d:
        raise ValueError(f"subspace has dimension {subspace.eigvals.shape[0]}, expected d = {d}")
    tr = free_trace if free_trace is not None else estimator_trace(est, problem, jax.random.fold_in(key, 1))
    q = {k_: float(v) for k_, v in _flow_quantities(problem, subspace, taylor_method).items()}
    eig = np.asarray(subspace.eigvals, np.float64)
    lam_d = float(eig[-1])
    trace = float(tr.value)
    tail = trace - float(np.sum(eig))
    gF, gE = q["gamma_F"], q["gamma_E"]
    t_min = 2 * q["eps_F"] / gF if gF > 0 else math.inf
    t0 = gF / (4 * q["c3_F"]) if q["c3_F"] > 0 else math.inf
    tail_thr = eps_threshold if tail_threshold is None else tail_threshold
    low_rank = (None if (tail_thr is None or lam_threshold is None)
                else bool(tail <= tail_thr and lam_d >= lam_threshold))
    ortho = None if eps_threshold is None else bool(q["eps"] <= eps_threshold)
    coupling = None if gamma_threshold is None else bool(gF >= gamma_threshold)
    conds = {"low_rank": low_rank, "orthogonality": ortho, "coupling": coupling}
    aic = None if any(v is None for v in conds.values()) else all(conds.values())
    return AICReport(
        d=int(d), n=n, fisher=est.name, method=getattr(est, "method", ""),
        eigvals=eig, residuals=np.asarray(subspace.residuals, np.float64), lam=lam_d, trace=trace,
        trace_method=tr.method, trace_stderr=float(tr.stderr), tail=tail, g_norm=q["g_norm"], eps=q["eps"],
        eps_F=q["eps_F"], gamma_E=gE, gamma_F=gF, hg_norm=q["hg_norm"], c3_F=q["c3_F"],
        c4_bound_F=gF ** 2 / 8, c4_bound_E=max(lam_d, 0.0) * gE ** 2 / 8, t_min=t_min, t0=t0,
        thresholds={"lam": lam_threshold, "eps": eps_threshold, "gamma": gamma_threshold, "tail": tail_thr},
        conditions=conds, aic=aic)
