"""The alignment-sensitive subspace (Definition 3.4) and the Alignment Instability Condition (Definition 5.1).

Notation (arXiv:2602.15799): θ* the aligned parameters, L the fine-tuning loss, g = ∇L(θ*),
H = ∇²L(θ*), F = F(θ*) the skill's Fisher (= ∇²Δu at θ* under Assumption 1), λ₁ ≥ λ₂ ≥ … its
eigenvalues with orthonormal eigenvectors u_j, M = span(u_1..u_d) the sensitive subspace and
P = Σ_{j≤d} u_j u_jᵀ its orthogonal projector.

Because P is the spectral projector of F onto its top-d eigenvectors, P and F commute, so
F^{1/2} P v = Σ_{j≤d} √λ_j (u_jᵀv) u_j exactly and ‖F^{1/2} P v‖² = Σ_{j≤d} λ_j (u_jᵀv)²: every
F-weighted quantity of the AIC is computed from the d coordinates u_jᵀv without further Fisher
products. (When the basis only approximates F's eigenvectors, e.g. from the random-subspace estimator,
these formulas give the quantities for the operator Σ_j λ_j u_j u_jᵀ.)

Public names
    SensitiveSubspace, sensitive_subspace, project, coordinates, fisher_sqrt_project,
    projected_norm, fisher_projected_norm, overlap_score, fisher_operator, AICReport, measure.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
from typing import Any, Callable, Dict, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from alignment_geom import spectral
from alignment_geom._tree import apply_mask, check_mask, tree_map

PyTree = Any

__all__ = [
    "SensitiveSubspace",
    "fisher_operator",
    "fisher_trace",
    "empirical_fisher_trace",
    "sensitive_subspace",
    "coordinates",
    "project",
    "fisher_sqrt_project",
    "projected_norm",
    "fisher_projected_norm",
    "overlap_score",
    "AICReport",
    "measure",
]


class SensitiveSubspace(NamedTuple):
    """M = span of the top-d eigenvectors of the skill Fisher F(θ*) (a pytree; jit/vmap friendly).

    basis: pytree shaped like θ with a leading axis d, orthonormal rows u_1..u_d.
    eigvals: (d,) λ_1 ≥ … ≥ λ_d (λ_d is the sharpness λ of condition 1).
    residuals: (d,) ‖F u_j − λ_j u_j‖/λ_j (NaN when not available).
    """

    basis: Any
    eigvals: jax.Array
    residuals: jax.Array


# --------------------------------------------------------------------------- projections


def coordinates(basis, v: PyTree) -> jax.Array:
    """(u_jᵀ v)_{j≤d}, shape (d,). ``basis``: a SensitiveSubspace or a pytree with a leading axis d."""
    U = basis.basis if isinstance(basis, SensitiveSubspace) else basis
    ul = jax.tree_util.tree_leaves(U)
    vl = jax.tree_util.tree_leaves(v)
    if len(ul) != len(vl):
        raise ValueError("basis and v have different tree structures")
    out = 0.0
    for u, x in zip(ul, vl):
        if u.shape[1:] != x.shape:
            raise ValueError(f"basis leaf shape {u.shape[1:]} (after the leading d axis) does not match {x.shape}")
        out = out + jnp.einsum("d...,...->d", u, x.astype(u.dtype))
    return out


def _combine(basis, c) -> PyTree:
    U = basis.basis if isinstance(basis, SensitiveSubspace) else basis
    return tree_map(lambda u: jnp.einsum("d,d...->...", c.astype(u.dtype), u), U)


def project(basis, v: PyTree) -> PyTree:
    """P v = Σ_{j≤d} (u_jᵀv) u_j, a pytree shaped like v."""
    return _combine(basis, coordinates(basis, v))


def fisher_sqrt_project(subspace: SensitiveSubspace, v: PyTree) -> PyTree:
    """F^{1/2} P v = Σ_{j≤d} √λ_j (u_jᵀv) u_j (exact: P is F's top-d spectral projector, so PF = FP)."""
    lam = jnp.clip(subspace.eigvals, 0.0)
    return _combine(subspace, jnp.sqrt(lam) * coordinates(subspace, v))


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
    ``fisher_vp`` (v ↦ F v, e.g. ``curvature.linearized_fisher_vp(...)``); ``basis`` must then be a
    SensitiveSubspace (its eigvals weight the numerator).
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


# --------------------------------------------------------------------------- the Fisher operator


def fisher_operator(params: PyTree, *, fisher: str = "true", logits_fn: Optional[Callable] = None,
                    inputs: Any = None, logprob_fn: Optional[Callable] = None, safety_batch: Any = None,
                    mask: Optional[PyTree] = None) -> Callable:
    """A matvec v ↦ F v at θ* = params, linearised once.

    fisher="true": F = mean_x Jᵀ(diag p − ppᵀ)J of softmax(logits_fn(θ, inputs)) (curvature.linearized_fisher_vp).
    fisher="empirical": F̂ = (1/m) Σᵢ ∇log pᵢ ∇log pᵢᵀ with the data's completions
    (logprob_fn(θ, safety_batch) -> (m,)), applied as (1/m) Jᵀ(J v) with one linearisation.
    """
    from alignment_geom import curvature

    if fisher == "true":
        if logits_fn is None:
            raise ValueError("fisher='true' needs logits_fn and inputs")
        return curvature.linearized_fisher_vp(logits_fn, params, inputs, mask)
    if fisher == "empirical":
        if logprob_fn is None or safety_batch is None:
            raise ValueError("fisher='empirical' needs logprob_fn and safety_batch")
        check_mask(mask, params)
        lp, f_jvp = jax.linearize(lambda p: logprob_fn(p, safety_batch), params)
        if lp.ndim != 1:
            raise ValueError(f"logprob_fn must return per-example log-probabilities (m,); got shape {lp.shape}")
        f_vjp = jax.linear_transpose(f_jvp, params)
        m = lp.shape[0]

        def mv(v):
            return apply_mask(mask, f_vjp(f_jvp(apply_mask(mask, v)) / m)[0])

        return mv
    raise ValueError(f"fisher must be 'true' or 'empirical' for a matvec; got {fisher!r}")


_JIT_CACHE: Dict[Any, Callable] = {}
_JIT_CACHE_SIZE = 64


def _mask_key(mask):
    """A hashable fingerprint of a concrete mask (structure, shapes and values)."""
    if mask is None:
        return None
    leaves, treedef = jax.tree_util.tree_flatten(mask)
    return (treedef, tuple((np.shape(m), np.asarray(m, bool).tobytes()) for m in leaves))


def _cached_jit(key, build: Callable) -> Callable:
    """jax.jit(build()) memoised on a hashable ``key`` (the static configuration), so repeated calls
    along a trajectory with the same functions, mask and options reuse one compilation."""
    fn = _JIT_CACHE.get(key)
    if fn is None:
        if len(_JIT_CACHE) >= _JIT_CACHE_SIZE:
            _JIT_CACHE.pop(next(iter(_JIT_CACHE)))
        fn = _JIT_CACHE[key] = jax.jit(build())
    return fn


def _n_params(params, mask):
    """n = the number of (masked) parameters."""
    return spectral._n_eff(params, mask)


def sensitive_subspace(params: PyTree, d: Optional[int] = None, **options) -> SensitiveSubspace:
    """Definition 3.4: M = span of the top-d eigenvectors of the skill Fisher F(θ*).

    Args:
      params: θ*.
      d: the subspace dimension; or give ``energy`` ∈ (0, 1] to take the smallest d with
        Σ_{j≤d} λ_j ≥ energy · tr F (from the top ``k_max`` eigenpairs, default 64; tr F exact for
        small n or fisher="empirical", Hutch++ otherwise, or pass ``total``). d = k_max if the energy is
        not reached.
      fisher: "true" (logits_fn, inputs: the skill's inputs), "empirical" (logprob_fn, safety_batch:
        per-example log π(safe completion | prompt)) or "random_subspace" (the paper's estimator on
        the empirical Fisher: logprob_fn, safety_batch, ``sketch_dim`` = k; eigenvectors mapped back).
      mask: restrict to a parameter block (F_SS).
      key: PRNG key (default PRNGKey(0)). method / tol / num_steps: passed to spectral.top_eigenpairs
        ("lanczos", "lobpcg", "randomized"); or method="gram" with fisher="empirical": exact eigenpairs
        from the m×m Gram matrix of the m per-example gradients (``spectral.gram_eigenpairs``; memory
        m·n, cost about one batched gradient + O(m²n); what alignment-risk's SVD computes).
    """
    return _sensitive_subspace(params, d, **options)[0]


def _sensitive_subspace(params: PyTree, d: Optional[int] = None, *, logits_fn: Optional[Callable] = None,
                        inputs: Any = None, fisher: str = "true", logprob_fn: Optional[Callable] = None,
                        safety_batch: Any = None, energy: Optional[float] = None, k_max: Optional[int] = None,
                        total: Optional[float] = None, mask: Optional[PyTree] = None,
                        key: Optional[jax.Array] = None, method: str = "lanczos", tol: Optional[float] = None,
                        num_steps: Optional[int] = None, sketch_dim: int = 4096,
                        trace_options: Optional[dict] = None):
    """:func:`sensitive_subspace`, and tr F̂ when it came for free (method="gram": the squared norms of the
    same per-example gradients), else None: returns (SensitiveSubspace, trace or None)."""
    if (d is None) == (energy is None):
        raise ValueError("give exactly one of d (the dimension) and energy (a cumulative-energy threshold)")
    key = jax.random.PRNGKey(0) if key is None else key
    n = _n_params(params, mask)
    kk = d if d is not None else min(64 if k_max is None else k_max, n)
    if not isinstance(kk, (int, np.integer)) or not 1 <= kk <= n:
        raise ValueError(f"d must be an integer in [1, n={n}]; got {kk!r}")
    free_trace = None
    if fisher == "random_subspace":
        if logprob_fn is None or safety_batch is None:
            raise ValueError("fisher='random_subspace' needs logprob_fn and safety_batch")
        rs = _cached_jit(("rsf", logprob_fn, sketch_dim, _mask_key(mask), True), lambda: (
            lambda p, b, k_: spectral.random_subspace_fisher(logprob_fn, p, b, sketch_dim, key=k_, mask=mask)))(
            params, safety_batch, key)
        r = rs.eigvals.shape[0]
        if kk > r:
            raise ValueError(f"the random-subspace Fisher has rank ≤ min(m, k) = {r} < d = {kk}")
        lam, basis = rs.eigvals[:kk], tree_map(lambda x: x[:kk], rs.eigvecs)
        res = jnp.full((kk,), jnp.nan, lam.dtype)
        total = rs.trace if total is None else total
    elif method == "gram":
        if fisher != "empirical":
            raise ValueError("method='gram' is for fisher='empirical' (the Gram matrix of the per-example "
                             f"gradients); got fisher={fisher!r}")
        if logprob_fn is None or safety_batch is None:
            raise ValueError("fisher='empirical' needs logprob_fn and safety_batch")
        m = int(jax.tree_util.tree_leaves(safety_batch)[0].shape[0])
        if kk > m:
            raise ValueError(f"the empirical Fisher of m = {m} examples has rank ≤ {m} < d = {kk}")

        def build_gram():
            from alignment_geom import curvature

            def solve(p, b):
                # one pass of per-example gradients G (m × n) gives the eigenpairs and tr F̂ = tr(GGᵀ)/m
                G = curvature.per_example_grads(logprob_fn, p, b, mask)
                return spectral._gram_eigenpairs_and_trace(G, kk, True)
            return solve

        lam, basis, res, free_trace = _cached_jit(("gram", logprob_fn, kk, _mask_key(mask)), build_gram)(
            params, safety_batch)
        total = free_trace if total is None else total
    else:
        def build():
            def solve(p, x, b, k_):
                mv = fisher_operator(p, fisher=fisher, logits_fn=logits_fn, inputs=x, logprob_fn=logprob_fn,
                                     safety_batch=b, mask=mask)
                return spectral.top_eigenpairs(mv, p, kk, key=k_, method=method, tol=tol, num_steps=num_steps,
                                               mask=mask)
            return solve

        cfg = ("eig", fisher, logits_fn, logprob_fn, kk, method, tol, num_steps, _mask_key(mask))
        lam, basis, res = _cached_jit(cfg, build)(params, inputs, safety_batch, key)
    sub = SensitiveSubspace(basis, lam, res)
    if energy is None:
        return sub, free_trace
    if total is None:
        total, _, _ = fisher_trace(params, fisher=fisher, logits_fn=logits_fn, inputs=inputs, logprob_fn=logprob_fn,
                                   safety_batch=safety_batch, mask=mask, key=jax.random.fold_in(key, 1),
                                   **(trace_options or {}))
    dd = spectral.dim_for_energy(lam, energy, total)
    return SensitiveSubspace(tree_map(lambda x: x[:dd], basis), lam[:dd], res[:dd]), free_trace


# one signature for both: help(sensitive_subspace) shows every keyword of the implementation
sensitive_subspace.__signature__ = inspect.signature(_sensitive_subspace).replace(
    return_annotation=SensitiveSubspace)


def empirical_fisher_trace(logprob_fn: Callable, params: PyTree, batch: Any, *, mask: Optional[PyTree] = None,
                           max_chunk_elements: int = 2 ** 26) -> jax.Array:
    """tr F̂ = (1/m) Σᵢ ‖∇_θ log π(yᵢ|xᵢ)‖² of the empirical Fisher F̂ = (1/m) Σᵢ ∇log πᵢ ∇log πᵢᵀ (exact).

    ``batch`` has the example axis first on every leaf (m examples; each is passed to ``logprob_fn``
    as a batch of one, as in ``curvature.per_example_grads``). The per-example gradients are formed in
    chunks of c = max(1, ⌊max_chunk_elements / n⌋) examples (lax.map), so memory is c × n, not m × n.
    ``mask`` restricts θ to a parameter block (the trace of F̂_SS). Returns a scalar.
    """
    check_mask(mask, params)
    leaves = jax.tree_util.tree_leaves(batch)
    if not leaves:
        raise ValueError("batch has no leaves")
    m = int(leaves[0].shape[0])
    n = max(sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params)), 1)
    chunk = max(1, min(m, int(max_chunk_elements) // n))

    def sq_norm(ex):
        ex1 = tree_map(lambda x: x[None], ex)
        g = apply_mask(mask, jax.grad(lambda p: logprob_fn(p, ex1)[0])(params))
        return sum(jnp.vdot(x, x) for x in jax.tree_util.tree_leaves(g))

    return jnp.mean(jax.lax.map(sq_norm, batch, batch_size=chunk))


def fisher_trace(params, *, fisher="true", logits_fn=None, inputs=None, logprob_fn=None, safety_batch=None,
                 mask=None, key=None, exact_max_n: int = 2048, num_matvecs: int = 300):
    """(tr F, method, standard error).

    fisher="empirical": tr F̂ = (1/m) Σᵢ ‖∇_θ log π(yᵢ|xᵢ)‖², exact for every n, from the m per-example
    gradients (:func:`empirical_fisher_trace`; about one batched gradient of work instead of the
    ``num_matvecs`` Fisher matvecs of Hutch++). Otherwise exact (n matvecs on unit vectors) for
    n ≤ exact_max_n, else Hutch++ with ``num_matvecs``.
    """
    key = jax.random.PRNGKey(0) if key is None else key
    if fisher == "empirical":
        if logprob_fn is None or safety_batch is None:
            raise ValueError("fisher='empirical' needs logprob_fn and safety_batch")
        t = _cached_jit(("trace_emp", logprob_fn, _mask_key(mask)), lambda: (
            lambda p, b: empirical_fisher_trace(logprob_fn, p, b, mask=mask)))(params, safety_batch)
        return t, "exact", jnp.zeros_like(t)
    n = _n_params(params, mask)
    exact = n <= exact_max_n

    def build():
        def tr(p, x, b, k_):
            mv = fisher_operator(p, fisher=fisher, logits_fn=logits_fn, inputs=x, logprob_fn=logprob_fn,
                                 safety_batch=b, mask=mask)
            if exact:
                t = spectral.dense_trace(mv, p, mask=mask)
                return t, jnp.zeros_like(t)
            return spectral.hutchpp_trace(mv, p, num_matvecs, key=k_, mask=mask)
        return tr

    cfg = ("trace", fisher, logits_fn, logprob_fn, exact, num_matvecs, _mask_key(mask))
    t, se = _cached_jit(cfg, build)(params, inputs, safety_batch, key)
    return t, ("exact" if exact else "hutch++"), se


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


def measure(ft_loss: Callable, params: PyTree, ft_batch: Any, logits_fn: Optional[Callable], safety_inputs: Any,
            d: int, *, fisher: str = "true", logprob_fn: Optional[Callable] = None, safety_batch: Any = None,
            mask: Optional[PyTree] = None, key: Optional[jax.Array] = None, method: str = "lanczos",
            tol: Optional[float] = None, num_steps: Optional[int] = None, lam_threshold: Optional[float] = None,
            eps_threshold: Optional[float] = None, gamma_threshold: Optional[float] = None,
            tail_threshold: Optional[float] = None, exact_trace_max_n: int = 2048, trace_matvecs: int = 300,
            sketch_dim: int = 4096, taylor_method: str = "jet", subspace: Optional[SensitiveSubspace] = None
            ) -> AICReport:
    """Measure the AIC (Definition 5.1) at θ* = params for a fine-tuning loss and a safety skill.

    g = ∇L(θ*), H g and c_3 = −(H²g + D³L[g, g])/6 come from ``curvature.flow_taylor`` (order 3:
    c_1 = −g, c_2 = Hg/2). P projects onto the top-d eigenvectors of the skill Fisher F(θ*)
    (:func:`sensitive_subspace`; pass ``subspace`` to reuse one). Everything is matrix-free: cost
    ≈ the eigensolver's matvecs + one order-3 Taylor pass + the trace (fisher="empirical": exact, from
    the m per-example gradients; otherwise n unit-vector matvecs when n ≤ exact_trace_max_n, else
    Hutch++ with ``trace_matvecs``).

    Conditions (verdicts None when the thresholds they need are not given):
      low_rank:      tail ≤ ε_tail (tail_threshold, default eps_threshold) and λ_d ≥ λ (lam_threshold);
      orthogonality: ‖P g‖ ≤ ε (eps_threshold);
      coupling:      γ_F = ‖F^{1/2} P H g‖ ≥ γ (gamma_threshold).

    Args mirror :func:`sensitive_subspace`; ``mask`` restricts both the Fisher and the flow (θ̇_S = −∇_S L).
    """
    from alignment_geom import curvature

    check_mask(mask, params)
    key = jax.random.PRNGKey(0) if key is None else key
    n = _n_params(params, mask)
    if not isinstance(d, (int, np.integer)) or not 1 <= d <= n:
        raise ValueError(f"d must be an integer in [1, n={n}]; got {d!r}")
    free_trace = None
    if subspace is None:
        subspace, free_trace = _sensitive_subspace(
            params, d, logits_fn=logits_fn, inputs=safety_inputs, fisher=fisher, logprob_fn=logprob_fn,
            safety_batch=safety_batch, mask=mask, key=key, method=method, tol=tol, num_steps=num_steps,
            sketch_dim=sketch_dim)
    elif subspace.eigvals.shape[0] != d:
        raise ValueError(f"subspace has dimension {subspace.eigvals.shape[0]}, expected d = {d}")

    # trace of F
    if fisher == "random_subspace":
        rs = _cached_jit(("rsf", logprob_fn, sketch_dim, _mask_key(mask), False), lambda: (
            lambda p, b, k_: spectral.random_subspace_fisher(logprob_fn, p, b, sketch_dim, key=k_, mask=mask,
                                                             return_vectors=False)))(params, safety_batch, key)
        trace, trace_method, trace_se = rs.trace, "sketch", jnp.asarray(jnp.nan)
    elif free_trace is not None:  # method="gram": tr F̂ from the same per-example gradients, exact
        trace, trace_method, trace_se = free_trace, "exact", jnp.zeros_like(free_trace)
    else:
        trace, trace_method, trace_se = fisher_trace(
            params, fisher=fisher, logits_fn=logits_fn, inputs=safety_inputs, logprob_fn=logprob_fn,
            safety_batch=safety_batch, mask=mask, key=jax.random.fold_in(key, 1), exact_max_n=exact_trace_max_n,
            num_matvecs=trace_matvecs)

    def core(p, b, sub):
        c1, c2, c3 = curvature.flow_taylor(ft_loss, p, b, 3, mask=mask, method=taylor_method)
        g = tree_map(jnp.negative, c1)
        hg = tree_map(lambda x: 2 * x, c2)
        lam = jnp.clip(sub.eigvals, 0.0)
        a, bb, c = coordinates(sub, g), coordinates(sub, hg), coordinates(sub, c3)

        def nrm(t):
            return jnp.sqrt(sum(jnp.vdot(x, x) for x in jax.tree_util.tree_leaves(t)))

        return dict(g_norm=nrm(g), hg_norm=nrm(hg), eps=jnp.linalg.norm(a), eps_F=jnp.sqrt(jnp.sum(lam * a * a)),
                    gamma_E=jnp.linalg.norm(bb), gamma_F=jnp.sqrt(jnp.sum(lam * bb * bb)),
                    c3_F=jnp.sqrt(jnp.sum(lam * c * c)))

    core_fn = _cached_jit(("core", ft_loss, taylor_method, _mask_key(mask)), lambda: core)
    q = {k_: float(v) for k_, v in core_fn(params, ft_batch, subspace).items()}
    eig = np.asarray(subspace.eigvals, np.float64)
    lam_d = float(eig[-1])
    trace = float(trace)
    tail = trace - float(np.sum(eig))
    gF, gE = q["gamma_F"], q["gamma_E"]
    t_min = 2 * q["eps_F"] / gF if gF > 0 else math.inf
    t0 = gF / (4 * q["c3_F"]) if q["c3_F"] > 0 else math.inf
    tail_thr = eps_threshold if tail_threshold is None else tail_threshold
    low_rank = None if (tail_thr is None or lam_threshold is None) else bool(tail <= tail_thr and lam_d >= lam_threshold)
    ortho = None if eps_threshold is None else bool(q["eps"] <= eps_threshold)
    coupling = None if gamma_threshold is None else bool(gF >= gamma_threshold)
    conds = {"low_rank": low_rank, "orthogonality": ortho, "coupling": coupling}
    aic = None if any(v is None for v in conds.values()) else all(conds.values())
    return AICReport(
        d=int(d), n=n, fisher=fisher, method=("sketch" if fisher == "random_subspace" else method),
        eigvals=eig, residuals=np.asarray(subspace.residuals, np.float64), lam=lam_d, trace=trace,
        trace_method=trace_method, trace_stderr=float(trace_se), tail=tail, g_norm=q["g_norm"], eps=q["eps"],
        eps_F=q["eps_F"], gamma_E=gE, gamma_F=gF, hg_norm=q["hg_norm"], c3_F=q["c3_F"],
        c4_bound_F=gF ** 2 / 8, c4_bound_E=max(lam_d, 0.0) * gE ** 2 / 8, t_min=t_min, t0=t0,
        thresholds={"lam": lam_threshold, "eps": eps_threshold, "gamma": gamma_threshold, "tail": tail_thr},
        conditions=conds, aic=aic)
