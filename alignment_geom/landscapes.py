"""Synthetic landscapes where the AIC parameters (d, λ, γ, ε, t₀, …) are set exactly.

API summary
    make_landscape(*, n=64, d=4, lam=1.0, gamma=1.0, eps=0.0, tail=0.0, third_order=0.0,
                   policy_curvature=0.0, dtype=jnp.float64, key=None, ...) -> Landscape
    Landscape(problem, basis, fisher_eigvals, info, minibatch_fn); ls.params, ls.loss_fn, ls.batch,
        ls.logits_fn, ls.inputs are the fields of ls.problem
    landscape_loss(params, batch), landscape_logits(params, inputs)   the shared (module-level) functions
    stack_landscapes([ls, ...]) -> Landscape with a leading grid axis on params/batch/inputs/basis/...
    landscape_grid(*, lam=[...], gamma=[...], ..., **fixed) -> Landscape over the Cartesian product
    landscape_minibatch(key, batch, batch_size)  SGD minibatch of the per-example gradient noise

Every numeric value lives in the arrays ``params`` / ``batch`` / ``inputs`` (only the shapes are
static), so one ``loss_fn`` / ``logits_fn`` can be ``jax.vmap``-ed over a stacked grid. Nothing is
ever n×n: memory and time are O(n) (n ≥ 10⁵ is fine).

Construction (latent coordinates δ = Q (θ − θ*), Q = I − 2 v vᵀ a Householder reflection, v = 0
when ``mix=False``; Q is symmetric and orthogonal):
    δ = (s, w, y, r):  s ∈ ℝ^d the sensitive coordinates, w ∈ ℝ the task coordinate,
                       y ∈ ℝ^{n_tail} the Fisher-tail coordinates, r the bulk.
Fine-tuning loss (Hessian H = diag(h) + the s–w and y–w couplings; third-order term k₃)
    L(θ) = bᵀδ + ½ Σ h δ² + w (cᵀs + c_tᵀy) + ½ w² (k₃ᵀs) [+ mean_i ξ_iᵀ δ, Σ_i ξ_i = 0]
Policy (m = d + n_tail binary softmax heads, logits z_i = [0, ζ_i]):
    ζ_i = z0_i + a_i (s_i + ½ κ_i w²)   (i < d),      ζ_{d+j} = z0_{d+j} + a_{d+j} y_j
    Δu(θ) = mean_i KL(π*(·|i) ‖ π_θ(·|i))   (Assumption 1 holds exactly).
Fisher at θ*: F = Σ_i λ_i q_i q_iᵀ with q_i = Q e_i and λ_i = a_i² p_i(1 − p_i)/m, p_i = σ(z0_i).
``basis`` = (q_0 … q_{d−1}), the exact top-d eigenvectors; λ_d (the sharpness) = ``lam``.

How the knobs map to the AIC (u ∈ ℝ^d the unit coupling direction, uniform 1/√d by default;
v_ε ∈ ℝ^d unit, F-orthogonal to u when d ≥ 2; G = ``grad_norm``):
* λ: the top-d Fisher eigenvalues are λ_j = lam · lam_spread^{(d−1−j)/(d−1)}, so λ_d = min = lam.
* ε: g = ∇L(θ*) = Q(G e_w + ε v_ε + g_bulk ρ), hence ‖P g‖ = ε exactly. Tail: Σ_{j>d} λ_j = ``tail``.
* γ: c is solved so that P H g = γ Q u exactly, so γ_E = ‖P H g‖ = ``gamma`` exactly for every ε
  (c = (γ u − h_s ε v_ε)/G), and γ_F = ‖F^{1/2} P H g‖ = γ (Σ_j λ_j u_j²)^{1/2} (= √λ γ when
  lam_spread = 1).
* third_order: k₃ = third_order · u, so P ∇³L[g, g] = third_order · G² · Q u (it enters the jerk
  θ⃛ = −(H²g + ∇³L[g, g]) and moves the end of the quartic window t₀).
* policy_curvature: κ_i = policy_curvature · u_i, so D²z[g, g] has heads ζ_i'' = a_i κ_i G² while
  J·Hg has a_i γ u_i: policy_curvature = −γ/G² cancels the J·Hg part exactly, > 0 adds to it.
* tail_coupling: the w–y coupling c_t = tail_coupling · (uniform unit vector), driving the tail.
Closed forms in ``info`` (valid for ε = 0 and z0 = 0, i.e. p = ½):
    a4 = ⅛ Σ_i λ_i A_i²,  a5 = ½ Σ_i λ_i A_i B_i  with  Δζ_i = a_i t² (A_i/2 + B_i t) + O(t⁴),
    A_i = (Hg)_i + κ_i G²,  B_i = −[(H²g)_i + (k₃)_i G²]/6 − κ_i G² h_w/2,
so a4 = a4_JHg + a4_curv + a4_cross with a4_JHg = ⅛‖F^{1/2}Hg‖² = γ_F²/8 + a4_tail; ``t_min`` = 2 ε_F/γ_F with
ε_F = ‖F^{1/2} P g‖, ``t0_taylor`` = 0.1 a4/|a5| (where the t⁵ term moves the log–log slope by 0.1),
``c3_F`` = ‖F^{1/2} P c_3‖ (c_3 = −(H²g + ∇³L[g, g])/6) and ``t0`` = γ_F/(4 c3_F) (aic.measure's t₀: the
cubic drift term reaches half the quadratic one). With pc = 0 and the cubic drift dominant,
a5/a4 = −4 c3_F/γ_F, so t0_taylor = t0/10: the ±0.1 slope window closes a decade before t0.
The flow is not confined to a convex region: large couplings make H indefinite (the flow is still
well defined for the finite times the experiments use).
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from alignment_geom.aic.subspace import SensitiveSubspace
from alignment_geom.problem import Problem

__all__ = [
    "Landscape",
    "make_landscape",
    "landscape_loss",
    "landscape_logits",
    "landscape_minibatch",
    "stack_landscapes",
    "landscape_grid",
]


class Landscape(NamedTuple):
    """A synthetic problem. ``problem`` the :class:`~alignment_geom.problem.Problem` (θ* = {"theta": (n,)},
    L, its batch, the policy logits and their inputs); ``basis`` = {"theta": (d, n)} the exact top-d Fisher
    eigenvectors (orthonormal rows); ``fisher_eigvals`` (d + n_tail,) the nonzero Fisher eigenvalues (top-d
    first); ``info`` a dict of the configured and derived values (floats, or arrays over the grid for a
    stacked landscape); ``minibatch_fn(key, batch, batch_size)`` the SGD sampler."""

    problem: Problem
    basis: Any
    fisher_eigvals: Any
    info: dict
    minibatch_fn: Callable

    @property
    def params(self):
        return self.problem.params

    @property
    def loss_fn(self):
        return self.problem.loss_fn

    @property
    def batch(self):
        return self.problem.batch

    @property
    def logits_fn(self):
        return self.problem.logits_fn

    @property
    def inputs(self):
        return self.problem.inputs

    @property
    def subspace(self) -> SensitiveSubspace:
        """The exact top-d sensitive subspace (basis and its eigenvalues λ_1..λ_d; residuals 0)."""
        d = jax.tree_util.tree_leaves(self.basis)[0].shape[-2]
        lam = self.fisher_eigvals[..., :d]
        return SensitiveSubspace(self.basis, lam, jnp.zeros_like(lam))


def _latent(theta, theta0, v):
    x = theta - theta0
    return x - 2.0 * v * jnp.dot(v, x)


def landscape_loss(params, batch):
    """The fine-tuning loss L(θ) of a landscape (see the module docstring); scalar."""
    delta = _latent(params["theta"], batch["theta0"], batch["v"])
    n = delta.shape[-1]
    d = batch["c"].shape[-1]
    nt = batch["c_tail"].shape[-1]
    # Written with full-length n-vectors instead of the slices s = δ[:d], w = δ[d], y = δ[d+1:d+1+nt]
    # (same value): the gradient then has no pad/concatenate ops, which made vmapped flows over a
    # grid 1.2-1.4x slower on XLA:CPU (benchmarks/sweep.py). C = (c, 0, c_t, 0), K = (k3, 0), e = e_d.
    zeros = lambda k: jnp.zeros((k,), delta.dtype)  # noqa: E731
    coupling = jnp.concatenate([batch["c"], zeros(1), batch["c_tail"], zeros(n - d - 1 - nt)])
    cubic = jnp.concatenate([batch["k3"], zeros(n - d)])
    w = jnp.dot(zeros(n).at[d].set(1.0), delta)
    # L = bᵀδ + ½ Σ h δ² + w (cᵀs + c_tᵀy) + ½ w² (k₃ᵀs), as one inner product with δ
    loss = jnp.dot(batch["b"] + 0.5 * batch["h"] * delta + w * coupling + (0.5 * w * w) * cubic, delta)
    if "noise" in batch:
        loss = loss + jnp.dot(jnp.mean(batch["noise"], axis=0), delta)
    return loss


def landscape_logits(params, inputs):
    """Policy logits z(θ) of a landscape, shape (d + n_tail, 2) (binary heads [0, ζ_i])."""
    delta = _latent(params["theta"], inputs["theta0"], inputs["v"])
    d = inputs["a"].shape[-1]
    nt = inputs["a_tail"].shape[-1]
    s, w, y = delta[:d], delta[d], delta[d + 1:d + 1 + nt]
    zeta = jnp.concatenate([inputs["a"] * (s + 0.5 * inputs["kappa"] * w * w), inputs["a_tail"] * y])
    zeta = inputs["z0"] + zeta
    return jnp.stack([jnp.zeros_like(zeta), zeta], axis=-1)


def landscape_minibatch(key, batch, batch_size: int):
    """An SGD minibatch: ``batch_size`` rows of the per-example gradient noise ξ_i (without
    replacement); the deterministic part of the loss is kept. Requires ``n_examples > 0``."""
    if "noise" not in batch:
        raise ValueError("this landscape has no per-example data: build it with n_examples > 0")
    m = batch["noise"].shape[0]
    if not 0 < batch_size <= m:
        raise ValueError(f"batch_size must be in [1, {m}]; got {batch_size}")
    idx = jax.random.choice(key, m, (batch_size,), replace=False)
    out = dict(batch)
    out["noise"] = batch["noise"][idx]
    return out


def _geometric_weights(k, ratio=0.5):
    w = ratio ** np.arange(k, dtype=np.float64)
    return w / w.sum()


def make_landscape(*, n: int = 64, d: int = 4, lam: float = 1.0, gamma: float = 1.0, eps: float = 0.0,
                   tail: float = 0.0, third_order: float = 0.0, policy_curvature: float = 0.0,
                   dtype=jnp.float64, key=None, n_tail: int = 4, grad_norm: float = 1.0,
                   lam_spread: float = 1.0, h_sens: float = 0.1, h_task: float = 0.1, h_tail: float = 0.1,
                   bulk_spectrum=(0.01, 1.0), tail_coupling: float = 0.0, g_bulk: float = 0.0,
                   base_logit: float = 0.0, mix: bool = True, offset: float = 0.0,
                   n_examples: int = 0, grad_noise: float = 0.0) -> Landscape:
    """Build a landscape with configured AIC parameters (module docstring: the exact relations).

    Args:
      n: dimension (≥ d + 1 + n_tail). d: sensitive rank. lam: λ = λ_d, the sharpness (> 0).
      gamma: γ_E = ‖P H g‖ (exact for every ε). eps: ‖P g‖ (0 = exactly orthogonal).
      tail: Σ_{j>d} λ_j over ``n_tail`` tail directions (geometric, ratio ½; must stay below λ_d).
      third_order: P∇³L[g, g] = third_order · G² · Qu. policy_curvature: D²z[g, g] knob (see top).
      key: PRNG key for the Householder vector, bulk gradient, θ* offset and noise (default key 0).
      grad_norm: G, the task component of g. lam_spread: λ_1/λ_d (≥ 1).
      h_sens, h_task, h_tail: diagonal of H on s, w, y; bulk_spectrum: (min, max) of the bulk diagonal.
      tail_coupling: ‖c_t‖, the H coupling between w and the tail y. g_bulk: bulk component of g.
      base_logit: z0 of every head (0 → p = ½, where the KL has no cubic term).
      mix: apply a random Householder reflection (dense basis); False = coordinate-aligned.
      offset: θ* = offset · N(0, I) (0 → θ* = 0). n_examples, grad_noise: per-example gradient noise
        ξ_i (centred, so the full-batch loss is unchanged) for SGD; 0 = none.
      dtype: float64 (theory) or float32.
    Returns:
      a :class:`Landscape`.
    """
    n, d, n_tail, n_examples = int(n), int(d), int(n_tail), int(n_examples)
    if d < 1:
        raise ValueError(f"d must be >= 1; got {d}")
    if n_tail < 0:
        raise ValueError(f"n_tail must be >= 0; got {n_tail}")
    if n < d + 1 + n_tail:
        raise ValueError(f"n must be >= d + 1 + n_tail = {d + 1 + n_tail}; got {n}")
    if not lam > 0:
        raise ValueError(f"lam must be > 0; got {lam}")
    if not lam_spread >= 1:
        raise ValueError(f"lam_spread must be >= 1; got {lam_spread}")
    if gamma < 0 or eps < 0 or tail < 0:
        raise ValueError(f"gamma, eps and tail must be >= 0; got {gamma}, {eps}, {tail}")
    if not grad_norm > 0:
        raise ValueError(f"grad_norm must be > 0; got {grad_norm}")
    if tail > 0 and n_tail == 0:
        raise ValueError("tail > 0 needs n_tail >= 1")
    if tail_coupling != 0 and n_tail == 0:
        raise ValueError("tail_coupling != 0 needs n_tail >= 1")
    if grad_noise != 0 and n_examples < 2:
        raise ValueError("grad_noise != 0 needs n_examples >= 2")
    key = jax.random.PRNGKey(0) if key is None else key
    k_mix, k_bulk, k_off, k_noise = jax.random.split(key, 4)
    f64 = np.float64
    m = d + n_tail
    G = float(grad_norm)

    # Fisher spectrum.
    if d == 1:
        lam_top = np.array([lam], f64)
    else:
        lam_top = lam * lam_spread ** ((d - 1 - np.arange(d)) / (d - 1))
    lam_tail = tail * _geometric_weights(n_tail) if n_tail else np.zeros(0)
    if n_tail and lam_tail[0] >= lam_top[-1]:
        raise ValueError(f"the largest tail eigenvalue {lam_tail[0]:.3g} must stay below λ_d = {lam_top[-1]:.3g}")
    p0 = 1.0 / (1.0 + np.exp(-base_logit))
    fisher_eigvals = np.concatenate([lam_top, lam_tail])
    a_all = np.sqrt(m * fisher_eigvals / (p0 * (1.0 - p0)))

    # Directions in sensitive space: coupling u, initial projection v_eps (F-orthogonal to u).
    u = np.full(d, 1.0 / np.sqrt(d))
    if d == 1:
        v_eps = np.ones(1)
    else:
        v_eps = np.zeros(d)
        v_eps[0], v_eps[1] = lam_top[1] * u[1], -lam_top[0] * u[0]
        v_eps /= np.linalg.norm(v_eps)

    # Hessian diagonal.
    n_bulk = n - m - 1
    h = np.empty(n)
    h[:d] = h_sens
    h[d] = h_task
    h[d + 1:d + 1 + n_tail] = h_tail
    if n_bulk:
        h[d + 1 + n_tail:] = np.geomspace(bulk_spectrum[0], bulk_spectrum[1], n_bulk)

    # Gradient and couplings.
    b = np.zeros(n)
    b[d] = G
    b[:d] = eps * v_eps
    if n_bulk and g_bulk:
        rho = np.array(jax.random.normal(k_bulk, (n_bulk,), jnp.float64))
        b[d + 1 + n_tail:] = g_bulk * rho / np.linalg.norm(rho)
    c = (gamma * u - h[:d] * eps * v_eps) / G
    c_tail = tail_coupling * np.full(n_tail, 1.0 / np.sqrt(max(n_tail, 1)))
    k3 = third_order * u
    kappa = policy_curvature * u

    # Orthogonal mixing and θ*.
    if mix:
        vv = np.array(jax.random.normal(k_mix, (n,), jnp.float64))
        vv /= np.linalg.norm(vv)
    else:
        vv = np.zeros(n)
    theta0 = offset * np.array(jax.random.normal(k_off, (n,), jnp.float64)) if offset else np.zeros(n)
    eye_rows = np.zeros((d, n))
    eye_rows[np.arange(d), np.arange(d)] = 1.0
    basis = eye_rows - 2.0 * vv[None, :] * vv[:d, None]

    cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731
    params = {"theta": cast(theta0)}
    batch = {"theta0": cast(theta0), "v": cast(vv), "b": cast(b), "h": cast(h), "c": cast(c),
             "c_tail": cast(c_tail), "k3": cast(k3)}
    if n_examples:
        xi = np.array(jax.random.normal(k_noise, (n_examples, n), jnp.float64))
        xi -= xi.mean(axis=0, keepdims=True)
        batch["noise"] = cast(grad_noise * xi)
    inputs = {"theta0": cast(theta0), "v": cast(vv), "a": cast(a_all[:d]), "a_tail": cast(a_all[d:]),
              "z0": cast(np.full(m, base_logit)), "kappa": cast(kappa)}

    # Closed forms (ε = 0, base_logit = 0): Δζ_i = a_i t² (A_i/2 + B_i t) + O(t⁴).
    Hg_s = gamma * u                       # exact for every ε
    Hg_w = h_task * G + c @ b[:d]
    Hg_y = c_tail * G
    H2g_s = h[:d] * Hg_s + c * Hg_w
    H2g_y = h_tail * Hg_y + c_tail * Hg_w
    A = np.concatenate([Hg_s + kappa * G ** 2, Hg_y])
    B = np.concatenate([-(H2g_s + k3 * G ** 2) / 6 - kappa * G ** 2 * h_task / 2, -H2g_y / 6])
    a4 = float(np.sum(fisher_eigvals * A ** 2) / 8)
    a5 = float(np.sum(fisher_eigvals * A * B) / 2)
    A_j = np.concatenate([Hg_s, Hg_y])
    A_c = np.concatenate([kappa * G ** 2, np.zeros(n_tail)])
    gamma_F = float(np.sqrt(np.sum(lam_top * Hg_s ** 2)))
    c3_F = float(np.sqrt(np.sum(lam_top * ((H2g_s + k3 * G ** 2) / 6) ** 2)))  # ‖F^{1/2} P c_3‖ (ε = 0)
    eps_F = float(np.sqrt(np.sum(lam_top * (eps * v_eps) ** 2)))
    info = dict(
        n=n, d=d, n_tail=n_tail, lam=float(lam_top[-1]), lam_top=lam_top, lam_tail=lam_tail,
        gamma=float(gamma), gamma_E=float(gamma), gamma_F=gamma_F, eps=float(eps), eps_F=eps_F,
        tail=float(tail), third_order=float(third_order), policy_curvature=float(policy_curvature),
        grad_norm=G, g_norm=float(np.linalg.norm(b)), tail_coupling=float(tail_coupling),
        h_sens=float(h_sens), h_task=float(h_task),
        a4=a4, a5=a5,
        a4_JHg=float(np.sum(fisher_eigvals * A_j ** 2) / 8),
        a4_curv=float(np.sum(fisher_eigvals * A_c ** 2) / 8),
        a4_cross=float(np.sum(fisher_eigvals * A_j * A_c) / 4),
        a4_tail=float(np.sum(lam_tail * Hg_y ** 2) / 8),
        bound_F=gamma_F ** 2 / 8, bound_E=float(lam_top[-1]) * gamma ** 2 / 8,
        t_min=(2 * eps_F / gamma_F) if gamma_F > 0 else float("inf"),
        t0_taylor=(0.1 * a4 / abs(a5)) if a5 != 0 else float("inf"),
        c3_F=c3_F, t0=(gamma_F / (4 * c3_F)) if c3_F > 0 else float("inf"),
    )
    problem = Problem(params, loss_fn=landscape_loss, batch=batch, logits_fn=landscape_logits, inputs=inputs,
                      name="landscape")
    return Landscape(problem, {"theta": cast(basis)}, cast(fisher_eigvals), info, landscape_minibatch)


def stack_landscapes(landscapes) -> Landscape:
    """Stack landscapes of the same structure (n, d, n_tail, n_examples) along a new leading axis.

    The shared ``loss_fn`` / ``logits_fn`` are kept; ``info`` values become numpy arrays over the grid.
    Use ``jax.vmap(f)(ls.params, ls.batch, ...)`` for sweeps.
    """
    landscapes = list(landscapes)
    if not landscapes:
        raise ValueError("stack_landscapes needs at least one landscape")
    ref = jax.tree_util.tree_structure((landscapes[0].params, landscapes[0].batch, landscapes[0].inputs))
    shapes = [x.shape for x in jax.tree_util.tree_leaves((landscapes[0].batch, landscapes[0].inputs))]
    for ls in landscapes[1:]:
        s = jax.tree_util.tree_structure((ls.params, ls.batch, ls.inputs))
        sh = [x.shape for x in jax.tree_util.tree_leaves((ls.batch, ls.inputs))]
        if s != ref or sh != shapes:
            raise ValueError("all landscapes must share n, d, n_tail and n_examples to be stacked")
    stack = lambda *xs: jnp.stack(xs)  # noqa: E731
    fields = {}
    for name in ("problem", "basis", "fisher_eigvals"):
        fields[name] = jax.tree_util.tree_map(stack, *[getattr(ls, name) for ls in landscapes])
    info = {k: np.stack([np.asarray(ls.info[k]) for ls in landscapes]) for k in landscapes[0].info}
    return Landscape(fields["problem"], fields["basis"], fields["fisher_eigvals"], info, landscape_minibatch)


_GRID_KNOBS = ("lam", "gamma", "eps", "tail", "third_order", "policy_curvature", "grad_norm",
               "tail_coupling", "lam_spread", "h_sens", "h_task", "base_logit")


def landscape_grid(**kwargs) -> Landscape:
    """Landscapes over the Cartesian product of the knobs given as 1-D sequences.

    Any of ``lam, gamma, eps, tail, third_order, policy_curvature, grad_norm, tail_coupling,
    lam_spread, h_sens, h_task, base_logit`` may be a sequence (a grid axis, in the order given);
    everything else is passed to :func:`make_landscape` unchanged. Returns the stacked landscape
    (leading axis N = product of the axis lengths, C order); ``info["grid_shape"]`` holds the shape
    and ``info[knob]`` the per-point values, so results reshape to the grid with
    ``x.reshape(info["grid_shape"])``.
    """
    axes = {k: np.atleast_1d(np.asarray(v, np.float64)) for k, v in kwargs.items()
            if k in _GRID_KNOBS and np.ndim(v) > 0}
    fixed = {k: v for k, v in kwargs.items() if k not in axes}
    names = list(axes)
    shape = tuple(len(axes[k]) for k in names)
    lss = []
    for combo in itertools.product(*[axes[k] for k in names]):
        lss.append(make_landscape(**fixed, **{k: float(x) for k, x in zip(names, combo)}))
    out = stack_landscapes(lss)
    out.info["grid_shape"] = shape
    out.info["grid_axes"] = tuple(names)
    return out
