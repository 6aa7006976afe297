"""Gradient-flow dynamics, discrete training paths, path recorders and exact onset coefficients (issue 4).

API summary
    gradient_flow(loss_fn, params, batch, ts, *, method="dopri5"|"rk4", rtol=1e-10, atol=1e-12,
                  steps=32, mask=None, velocity=None, mxstep=100_000, output="params") -> path
    discrete_path(loss_fn, params, batch, ts, *, lr, optimizer="gd"|"sgd"|"adam"|optax transform,
                  key=None, batch_size=None, sample_fn=None, velocity=None, mask=None) -> (path, actual_ts)
    projection_defense(basis) -> velocity;  dynamic_projection_defense(logits_fn, inputs, d) -> velocity
    top_fisher_subspace(logits_fn, params, inputs, d, mask=None) -> (basis, eigvals)
    principal_angles(basis_a, basis_b) -> (d,) radians
    projected_fisher_norm(logits_fn, params0, inputs, basis, delta) -> ‖F^{1/2} P δ‖
    stable_kl_utility(logits_fn, params_ref, params, inputs) -> Δu without the ~1e-16 roundoff floor
    record_path(path, ts, *, params0, logits_fn, inputs, loss_fn=None, batch=None, basis=None,
                fisher_eigvals=None, taylor_order=0, dynamic=True, mask=None) -> dict of numpy arrays
    utility_taylor(ft_loss, params, batch, logits_fn, inputs, order) -> [a_0, …, a_order] (floats)
    utility_taylor_coeffs(...) -> the same as a jnp array (jit/vmap friendly)
    onset_split(ft_loss, params, batch, logits_fn, inputs, *, basis=None) -> dict(a4, a4_JHg, a4_curv, a4_cross, …)

A path is a pytree shaped like ``params`` with a leading time axis (one entry per t in ``ts``).

Notation (arXiv:2602.15799): θ* = params, L the fine-tuning loss, g = ∇L(θ*), H = ∇²L(θ*),
z = logits_fn(θ, x), J = ∂z/∂θ, Λ = diag p − ppᵀ, F = mean Jᵀ Λ J, P the projector onto the top-d
eigenvectors of F(θ*), Δu(θ) = mean KL(π_θ* ‖ π_θ) (``curvature.kl_utility``).

Exact onset coefficients. Along the flow θ(t) = θ* − t g + (t²/2) Hg + O(t³), so
z(θ(t)) − z* = −t Jg + (t²/2)(J·Hg + D²z[g, g]) + O(t³) and Δu(θ(t)) = Σ_k a_k t^k with
a_0 = a_1 = 0, a_2 = ½ mean‖Λ^{1/2} Jg‖² = ½ gᵀFg. When Jg = 0:
    a_4 = ⅛ mean ‖Λ^{1/2}(J·Hg + D²z[g, g])‖² = a4_JHg + a4_curv + a4_cross,
    a4_JHg = ⅛ ‖F^{1/2} Hg‖²  (= γ_F²/8 when Hg has no F-weight outside P),
    a4_curv = ⅛ mean ‖Λ^{1/2} D²z[g, g]‖²,  a4_cross = ¼ mean (J·Hg)ᵀ Λ D²z[g, g]   (may be < 0).
``utility_taylor`` computes every a_k exactly (Taylor mode through ``flow_taylor`` and Δu), so these
are identities to check, not bounds.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import jet as _jet
from jax.experimental.ode import odeint
from jax.flatten_util import ravel_pytree

from alignment_geom._tree import apply_mask, check_mask, tree_add, tree_dot, tree_map, tree_scale, tree_sub
from alignment_geom.curvature import flow_taylor, hvp, kl_utility, taylor_eval

PyTree = Any

__all__ = [
    "gradient_flow",
    "discrete_path",
    "projection_defense",
    "dynamic_projection_defense",
    "top_fisher_subspace",
    "principal_angles",
    "projected_fisher_norm",
    "record_path",
    "stable_kl",
    "stable_kl_utility",
    "utility_taylor",
    "utility_taylor_coeffs",
    "onset_split",
]


# --------------------------------------------------------------------------- helpers


def _check_ts(ts):
    """Validate a concrete time grid (1-D, ≥ 0, non-decreasing); traced grids pass through."""
    ts = jnp.asarray(ts)
    if ts.ndim != 1 or ts.shape[0] == 0:
        raise ValueError(f"ts must be a non-empty 1-D array of times; got shape {ts.shape}")
    if not isinstance(ts, jax.core.Tracer):
        tn = np.asarray(ts)
        if not np.all(np.isfinite(tn)) or tn[0] < 0 or np.any(np.diff(tn) < 0):
            raise ValueError("ts must be finite, >= 0 and non-decreasing")
    return ts


def _float_dtype(params):
    leaves = jax.tree_util.tree_leaves(params)
    return jnp.result_type(*leaves) if leaves else jnp.float64


def _make_rhs(loss_fn, batch, mask, velocity):
    """δ ↦ θ̇ at θ = θ* + δ: ``velocity(θ, ∇L)`` (default −∇L), restricted to the mask."""
    grad = jax.grad(loss_fn)

    def rhs(delta, params0):
        p = tree_add(params0, delta)
        gr = apply_mask(mask, grad(p, batch))
        v = tree_scale(-1.0, gr) if velocity is None else velocity(p, gr)
        return apply_mask(mask, tree_map(lambda a, b: a.astype(b.dtype), v, delta))

    return rhs


def _finish(params0, deltas, output):
    if output == "displacement":
        return deltas
    if output == "params":
        return tree_map(lambda p, d: p[None] + d, params0, deltas)
    raise ValueError(f"output must be 'params' or 'displacement'; got {output!r}")


# --------------------------------------------------------------------------- gradient flow


def gradient_flow(loss_fn: Callable, params: PyTree, batch: Any, ts, *, method: str = "dopri5",
                  rtol: float = 1e-10, atol: float = 1e-12, steps: int = 32, mask: Optional[PyTree] = None,
                  velocity: Optional[Callable] = None, mxstep: int = 100_000, output: str = "params") -> PyTree:
    """Integrate gradient flow θ̇ = −∇L(θ), θ(0) = θ*, and return θ(t) for every t in ``ts``.

    The state integrated is the displacement δ = θ − θ* (so tolerances act on θ − θ*, not on θ).

    Args:
      loss_fn: ``(params, batch) -> scalar`` L. params: θ* (pytree). batch: L's data.
      ts: (T,) non-decreasing times ≥ 0; integration starts at t = 0.
      method: "dopri5" (adaptive Dormand–Prince, ``jax.experimental.ode.odeint``, componentwise
        error control atol + rtol·|δ|, dense-output interpolation at ts) or "rk4" (classical RK4,
        ``steps`` equal sub-steps per interval [t_{i−1}, t_i], in lax.scan).
      mask: optional boolean pytree; only θ_S moves (θ̇ = −∇_S L on S, 0 elsewhere).
      velocity: optional hook ``velocity(θ, grad) -> θ̇`` replacing −grad (defences); grad is ∇L(θ),
        already masked.
      mxstep: maximum dopri5 steps per output interval.
      output: "params" (θ(t)) or "displacement" (θ(t) − θ*, no cancellation).
    Returns:
      a pytree like params with a leading axis of length T. jit/vmap compatible (vmap over
      params/batch with a shared ts).
    """
    check_mask(mask, params)
    ts = _check_ts(ts)
    if method not in ("dopri5", "rk4"):
        raise ValueError(f"method must be 'dopri5' or 'rk4'; got {method!r}")
    if output not in ("params", "displacement"):
        raise ValueError(f"output must be 'params' or 'displacement'; got {output!r}")
    if method == "rk4" and int(steps) < 1:
        raise ValueError(f"steps must be >= 1; got {steps}")
    return _gradient_flow_jit(loss_fn, velocity, method, float(rtol), float(atol), int(steps), int(mxstep), output,
                              params, batch, ts, mask)


@partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 6, 7))
def _gradient_flow_jit(loss_fn, velocity, method, rtol, atol, steps, mxstep, output, params, batch, ts, mask):
    """Compiled once per (loss_fn, velocity, options) and shapes: repeated calls hit the jit cache."""
    dtype = _float_dtype(params)
    ts = ts.astype(dtype)
    rhs = _make_rhs(loss_fn, batch, mask, velocity)
    delta0 = tree_map(jnp.zeros_like, params)
    if method == "dopri5":
        times = jnp.concatenate([jnp.zeros((1,), dtype), ts])
        deltas = odeint(lambda y, t, p0: rhs(y, p0), delta0, times, params,
                        rtol=rtol, atol=atol, mxstep=mxstep)
        deltas = tree_map(lambda x: x[1:], deltas)
    else:
        def rk4_step(_, carry):
            y, h = carry
            f = lambda yy: rhs(yy, params)  # noqa: E731
            k1 = f(y)
            k2 = f(tree_map(lambda a, k: a + 0.5 * h * k, y, k1))
            k3 = f(tree_map(lambda a, k: a + 0.5 * h * k, y, k2))
            k4 = f(tree_map(lambda a, k: a + h * k, y, k3))
            y = tree_map(lambda a, b1, b2, b3, b4: a + (h / 6) * (b1 + 2 * b2 + 2 * b3 + b4), y, k1, k2, k3, k4)
            return y, h

        def interval(carry, t_next):
            y, t_prev = carry
            h = (t_next - t_prev) / steps
            y, _ = jax.lax.fori_loop(0, steps, rk4_step, (y, h))
            return (y, t_next), y

        _, deltas = jax.lax.scan(interval, (delta0, jnp.zeros((), dtype)), ts)
    return _finish(params, deltas, output)


# --------------------------------------------------------------------------- discrete paths


def _subsample_leading(key, batch, *, batch_size):
    leaves = jax.tree_util.tree_leaves(batch)
    m = leaves[0].shape[0]
    if any(x.ndim == 0 or x.shape[0] != m for x in leaves):
        raise ValueError("default SGD sampling needs every batch leaf to share a leading example axis; "
                         "pass sample_fn(key, batch) instead")
    idx = jax.random.choice(key, m, (batch_size,), replace=False)
    return tree_map(lambda x: x[idx], batch)


def discrete_path(loss_fn: Callable, params: PyTree, batch: Any, ts, *, lr: float, optimizer="gd",
                  key=None, batch_size: Optional[int] = None, sample_fn: Optional[Callable] = None,
                  velocity: Optional[Callable] = None, mask: Optional[PyTree] = None, output: str = "params"):
    """Discrete training from θ* recorded on the gradient-flow clock t = η·k.

    Step k (η = ``lr``): the gradient ∇L(θ_k) on the full batch ("gd", "adam") or on a minibatch of
    ``batch_size`` examples ("sgd", or any optimizer when batch_size is given; drawn with
    ``sample_fn(key_k, batch)``, default: without replacement along every leaf's leading axis) is
    turned into a direction v = ``velocity(θ, grad)`` (default −grad), and the optax transform is fed
    the pseudo-gradient −v: "gd"/"sgd" = optax.sgd(η) (θ_{k+1} = θ_k + η v), "adam" = optax.adam(η);
    an ``optax.GradientTransformation`` may be passed instead.

    Each t in ``ts`` is rounded to the nearest step k = round(t/η); the state after k steps is
    recorded. Steps run in a lax.scan over the recording intervals (fori_loop inside).
    Returns ``(path, actual_ts)``: path as in :func:`gradient_flow`, actual_ts = η·k (T,).
    """
    check_mask(mask, params)
    ts_np = np.asarray(ts, np.float64)
    if ts_np.ndim != 1 or ts_np.size == 0 or np.any(np.diff(ts_np) < 0) or ts_np[0] < 0:
        raise ValueError("ts must be a non-empty, non-decreasing 1-D array of times >= 0")
    lr = float(lr)
    if not lr > 0:
        raise ValueError(f"lr must be > 0; got {lr}")
    ks = np.rint(ts_np / lr).astype(np.int64)
    if not (isinstance(optimizer, optax.GradientTransformation) or optimizer in ("gd", "sgd", "adam")):
        raise ValueError(f"optimizer must be 'gd', 'sgd', 'adam' or an optax.GradientTransformation; got {optimizer!r}")
    if optimizer == "sgd" and batch_size is None:
        raise ValueError("optimizer='sgd' needs batch_size")
    stochastic = batch_size is not None
    if stochastic:
        key = jax.random.PRNGKey(0) if key is None else key
        if sample_fn is None:
            sample_fn = partial(_subsample_leading, batch_size=int(batch_size))
    else:
        key, sample_fn = jax.random.PRNGKey(0), None
    opt_name = "custom" if isinstance(optimizer, optax.GradientTransformation) else optimizer
    custom = optimizer if opt_name == "custom" else None
    starts = np.concatenate([[0], ks[:-1]])
    pairs = jnp.asarray(np.stack([starts, ks], axis=1), jnp.int32)
    dtype = _float_dtype(params)
    deltas = _discrete_jit(loss_fn, opt_name, custom, sample_fn, velocity, params, batch, pairs,
                           jnp.asarray(lr, dtype), key, mask)
    return _finish(params, deltas, output), jnp.asarray(ks * lr, dtype)


@partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _discrete_jit(loss_fn, opt_name, custom, sample_fn, velocity, params, batch, pairs, lr, key, mask):
    """Compiled once per (loss_fn, optimizer kind, hooks) and shapes; lr and the step counts are traced."""
    opt = {"gd": lambda: optax.sgd(lr), "sgd": lambda: optax.sgd(lr), "adam": lambda: optax.adam(lr),
           "custom": lambda: custom}[opt_name]()
    grad = jax.grad(loss_fn)

    def step(k, carry):
        delta, st = carry
        p = tree_add(params, delta)
        b = sample_fn(jax.random.fold_in(key, k), batch) if sample_fn is not None else batch
        gr = apply_mask(mask, grad(p, b))
        v = tree_scale(-1.0, gr) if velocity is None else velocity(p, gr)
        pseudo = apply_mask(mask, tree_scale(-1.0, v))
        upd, st = opt.update(pseudo, st, p)
        delta = tree_map(lambda a, u: a + u.astype(a.dtype), delta, apply_mask(mask, upd))
        return delta, st

    def interval(carry, k_pair):
        carry = jax.lax.fori_loop(k_pair[0], k_pair[1], step, carry)
        return carry, carry[0]

    delta0 = tree_map(jnp.zeros_like, params)
    _, deltas = jax.lax.scan(interval, (delta0, opt.init(params)), pairs)
    return deltas


# --------------------------------------------------------------------------- Fisher subspaces


def _stack_to_matrix(basis):
    """Pytree with leading axis d -> (d, n) matrix of ravelled rows."""
    return jax.vmap(lambda b: ravel_pytree(b)[0])(basis)


def _matrix_to_stack(mat, like):
    _, unravel = ravel_pytree(like)
    return jax.vmap(unravel)(mat)


def _project_out(basis, v):
    """v − Σ_j b_j ⟨b_j, v⟩ for orthonormal rows b_j (pytree with leading axis d)."""
    coef = jax.vmap(lambda b: tree_dot(b, v))(basis)
    return tree_map(lambda vl, bl: vl - jnp.tensordot(coef.astype(bl.dtype), bl, axes=1), v, basis)


def projection_defense(basis: PyTree) -> Callable:
    """Static defence: θ̇ = −(I − P*) ∇L(θ), removing the component in span(basis) (P* = P(θ*)).

    ``basis``: orthonormal directions, a pytree with leading axis d (e.g. ``Landscape.basis`` or
    :func:`top_fisher_subspace` at θ*). Returns ``velocity(params, grad)`` for gradient_flow /
    discrete_path. Cost per call: 2d inner products.
    """

    def velocity(params, grad):
        return tree_scale(-1.0, _project_out(basis, grad))

    return velocity


def _fisher_factor(logits_fn, params, inputs, mask=None):
    """A (M·C, n) with F = AᵀA: rows Λ_x^{1/2} J_x / √M, Λ^{1/2} = (I − √p√pᵀ) diag √p."""
    flat, unravel = ravel_pytree(params)

    def zf(f):
        return logits_fn(unravel(f), inputs)

    z = zf(flat)
    C = z.shape[-1]
    zz = z.reshape(-1, C)
    M = zz.shape[0]
    J = jax.jacrev(lambda f: zf(f).reshape(-1, C))(flat)  # (M, C, n)
    if mask is not None:
        mflat = ravel_pytree(tree_map(lambda mm, x: jnp.broadcast_to(jnp.asarray(mm, x.dtype), x.shape),
                                      mask, params))[0]
        J = J * mflat
    sq = jnp.sqrt(jax.nn.softmax(zz, axis=-1))
    S = sq[:, :, None] * J
    A = S - sq[:, :, None] * jnp.einsum("mc,mcn->mn", sq, S)[:, None, :]
    return (A / jnp.sqrt(jnp.asarray(M, A.dtype))).reshape(M * C, -1)


def top_fisher_subspace(logits_fn: Callable, params: PyTree, inputs: Any, d: int,
                        mask: Optional[PyTree] = None):
    """Top-d eigenvectors and eigenvalues of the true Fisher F(θ) = mean Jᵀ Λ J.

    Exact, via the thin SVD of the factor A (F = AᵀA, A = Λ^{1/2}J/√M of shape (M·C, n), M the number
    of logit positions): cost M·C Jacobian rows (reverse mode) + O((M·C)² n), memory M·C·n — cheap
    when M·C is small (the landscapes: M·C = 2(d + n_tail)) whatever n is. Requires M·C ≥ d.
    Returns (basis, eigvals): basis a pytree like params with leading axis d (orthonormal rows),
    eigvals (d,) in decreasing order.
    """
    A = _fisher_factor(logits_fn, params, inputs, mask)
    if A.shape[0] < d:
        raise ValueError(f"the Fisher has rank <= {A.shape[0]} < d = {d}")
    # Aᵀ = Q R (thin QR, n × k) => AᵀA = Q (R Rᵀ) Qᵀ; R = U s Vᵀ => eigenvectors Q U, eigenvalues s².
    q, r = jnp.linalg.qr(A.T)
    u, s, _ = jnp.linalg.svd(r)
    return _matrix_to_stack((q @ u[:, :d]).T, params), s[:d] ** 2


def dynamic_projection_defense(logits_fn: Callable, inputs: Any, d: int, mask: Optional[PyTree] = None) -> Callable:
    """Dynamic defence: θ̇ = −(I − P(θ)) ∇L(θ) with P(θ) the top-d Fisher subspace recomputed at the
    current θ on every velocity call (:func:`top_fisher_subspace`: M·C reverse passes + an SVD of an
    (M·C) × n matrix per call, i.e. per RHS evaluation of the integrator / per discrete step)."""

    def velocity(params, grad):
        basis, _ = top_fisher_subspace(logits_fn, params, inputs, d, mask)
        return tree_scale(-1.0, _project_out(basis, grad))

    return velocity


def principal_angles(basis_a: PyTree, basis_b: PyTree) -> jax.Array:
    """Principal angles (radians, ascending) between span(basis_a) and span(basis_b): an alias of
    :func:`alignment_geom.spectral.principal_angles` (pytrees with a leading axis, or (k, n) arrays)."""
    from alignment_geom import spectral

    return spectral.principal_angles(basis_a, basis_b)


def _lambda_quad(z, x, y):
    """mean over positions of xᵀ Λ y, Λ = diag p − ppᵀ, p = softmax(z)."""
    p = jax.nn.softmax(z, axis=-1)
    val = jnp.sum(p * x * y, axis=-1) - jnp.sum(p * x, axis=-1) * jnp.sum(p * y, axis=-1)
    return jnp.mean(val)


def projected_fisher_norm(logits_fn: Callable, params0: PyTree, inputs: Any, basis: Optional[PyTree],
                          delta: PyTree) -> jax.Array:
    """‖F^{1/2} P δ‖ with F = F(θ*) (θ* = params0) and P the projector onto span(basis) (orthonormal
    rows; None → P = I): sqrt(mean (J Pδ)ᵀ Λ (J Pδ)), one jvp of the logits."""
    pd = delta if basis is None else tree_sub(delta, _project_out(basis, delta))
    z, jv = jax.jvp(lambda p: logits_fn(p, inputs), (params0,), (pd,))
    return jnp.sqrt(jnp.maximum(_lambda_quad(z, jv, jv), 0.0))


# --------------------------------------------------------------------------- stable Δu


def _phi(w):
    """φ(w) = eʷ − 1 − w to full relative precision (series for |w| < 0.1, else expm1(w) − w)."""
    small = jnp.abs(w) < 0.1
    ws = jnp.where(small, w, 0.0)
    series = jnp.zeros_like(w)
    for k in range(12, 1, -1):  # Horner: w²(1/2! + w(1/3! + …))
        series = (series * ws + 1.0 / math.factorial(k))
    series = series * ws * ws
    return jnp.where(small, series, jnp.expm1(w) - w)


@jax.jit
def stable_kl(logits_ref, logits):
    """KL(softmax(logits_ref) ‖ softmax(logits)) per position (leading axes kept), accurate to
    relative machine precision even when the KL is ~1e-30 (no cancellation floor).

    With Δz = z − z_ref, p = softmax(z_ref) and w = Δz − E_p[Δz]: KL = log E_p[eʷ] =
    log1p(E_p[φ(w)]), φ(w) = eʷ − 1 − w ≥ 0 (E_p[w] = 0 exactly); for max|w| ≥ 1 it is evaluated as
    logsumexp(w + log p). The naive Σ p (log p − log q) has an absolute floor ~1e-16.
    """
    dz = logits - logits_ref
    logp = jax.nn.log_softmax(logits_ref, axis=-1)
    p = jnp.exp(logp)
    w = dz - jnp.sum(p * dz, axis=-1, keepdims=True)
    big = jnp.max(jnp.abs(w), axis=-1) >= 1.0
    small_val = jnp.log1p(jnp.sum(p * _phi(jnp.where(big[..., None], 0.0, w)), axis=-1))
    big_val = jax.nn.logsumexp(w + logp, axis=-1)
    return jnp.maximum(jnp.where(big, big_val, small_val), 0.0)


@partial(jax.jit, static_argnums=0)
def stable_kl_utility(logits_fn: Callable, params_ref: PyTree, params: PyTree, inputs: Any) -> jax.Array:
    """Δu(θ) = mean_x KL(π_ref ‖ π_θ) (the same quantity as ``curvature.kl_utility``), computed with
    :func:`stable_kl` so that Δu ~ t⁴ stays accurate at small t (used by :func:`record_path`)."""
    return jnp.mean(stable_kl(logits_fn(params_ref, inputs), logits_fn(params, inputs)))


# --------------------------------------------------------------------------- recorders


def record_path(path: PyTree, ts, *, params0: PyTree, logits_fn: Callable, inputs: Any,
                loss_fn: Optional[Callable] = None, batch: Any = None, basis: Optional[PyTree] = None,
                fisher_eigvals=None, taylor_order: int = 0, dynamic: bool = True,
                mask: Optional[PyTree] = None) -> dict:
    """Measurements along a path (gradient_flow / discrete_path output), as numpy arrays over t.

    Keys (δ = θ(t) − θ*, P = P(θ*) onto ``basis``, P_t the top-d Fisher subspace at θ(t)):
      t; du = Δu(θ(t)) (exact KL, :func:`stable_kl_utility`: no roundoff floor at tiny Δu); loss = L(θ(t)) (needs loss_fn, batch);
      drift_F = ‖F^{1/2} P δ‖ (F = F(θ*); with ``fisher_eigvals`` (≥ d entries, top-d first, basis
        their eigenvectors) as sqrt(Σ_j λ_j ⟨b_j, δ⟩²), else by a jvp); drift_E = ‖P δ‖;
      proj_ratio = ‖Pδ‖/‖δ‖; proj_ratio_dynamic = ‖P_t δ‖/‖δ‖; angles (T, d) principal angles
        between span P and span P_t (``dynamic=True``; cost of :func:`top_fisher_subspace` per t);
      du_first_order = Δu(θ* − t g); du_taylor_K = Δu(θ* + Σ_{k≤K} c_k t^k) for K = 2..taylor_order
        (c_k from ``curvature.flow_taylor``; needs loss_fn, batch).
    At t = 0 the ratios are 0/0 = NaN.
    """
    ts = _check_ts(ts)
    T = ts.shape[0]
    lead = jax.tree_util.tree_leaves(path)[0].shape[0]
    if lead != T:
        raise ValueError(f"path has {lead} entries but ts has {T}")
    need_loss = taylor_order >= 1 or loss_fn is not None
    if need_loss and (loss_fn is None or batch is None):
        raise ValueError("loss_fn and batch are needed for loss, du_first_order and du_taylor_K")
    if taylor_order and taylor_order < 2:
        raise ValueError(f"taylor_order must be 0 or >= 2; got {taylor_order}")
    lam = None if fisher_eigvals is None else jnp.asarray(fisher_eigvals)
    res = _record_jit(logits_fn, loss_fn, int(taylor_order), bool(dynamic), path, ts, params0, inputs, batch,
                      basis, lam, mask)
    res = {k: np.asarray(v) for k, v in res.items()}
    res["t"] = np.asarray(ts)
    return res


@partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _record_jit(logits_fn, loss_fn, taylor_order, dynamic, path, ts, params0, inputs, batch, basis, lam, mask):
    d = None if basis is None else jax.tree_util.tree_leaves(basis)[0].shape[0]
    if lam is not None:
        lam = lam[:d]
    cs = flow_taylor(loss_fn, params0, batch, max(taylor_order, 1), mask) if loss_fn is not None else None

    def one(args):
        theta, t = args
        delta = tree_sub(theta, params0)
        out = {"du": stable_kl_utility(logits_fn, params0, theta, inputs)}
        nd = jnp.sqrt(tree_dot(delta, delta))
        if loss_fn is not None:
            out["loss"] = loss_fn(theta, batch)
            out["du_first_order"] = stable_kl_utility(logits_fn, params0, taylor_eval(cs[:1], t, params0), inputs)
            for K in range(2, taylor_order + 1):
                out[f"du_taylor_{K}"] = stable_kl_utility(logits_fn, params0, taylor_eval(cs[:K], t, params0), inputs)
        if basis is not None:
            coef = jax.vmap(lambda b: tree_dot(b, delta))(basis)
            pn = jnp.sqrt(jnp.sum(coef * coef))
            out["drift_E"] = pn
            out["proj_ratio"] = pn / nd
            if lam is not None:
                out["drift_F"] = jnp.sqrt(jnp.sum(lam * coef * coef))
            else:
                out["drift_F"] = projected_fisher_norm(logits_fn, params0, inputs, basis, delta)
            if dynamic:
                bt, _ = top_fisher_subspace(logits_fn, theta, inputs, d, mask)
                ct = jax.vmap(lambda b: tree_dot(b, delta))(bt)
                out["proj_ratio_dynamic"] = jnp.sqrt(jnp.sum(ct * ct)) / nd
                out["angles"] = principal_angles(basis, bt)
        return out

    return jax.lax.map(one, (path, ts))


# --------------------------------------------------------------------------- exact Taylor coefficients


def utility_taylor_coeffs(ft_loss: Callable, params: PyTree, batch: Any, logits_fn: Callable, inputs: Any,
                          order: int, *, mask: Optional[PyTree] = None, method: str = "jet") -> jax.Array:
    """[a_0, …, a_order] (jnp array) with Δu(θ(t)) = Σ_k a_k t^k + O(t^{order+1}) along gradient flow.

    θ(t) is replaced by its order-K Taylor polynomial θ* + Σ_{k≤K} c_k t^k (``curvature.flow_taylor``,
    exact up to t^K), and Δu(θ(t)) = kl_utility(θ*, θ(t)) is expanded in t by Taylor mode
    (``jax.experimental.jet``; method="jvp": K nested forward-mode derivatives of the scalar function,
    cost 2^K). jit/vmap friendly.
    """
    if not isinstance(order, int) or order < 1:
        raise ValueError(f"order must be an integer >= 1; got {order!r}")
    if method not in ("jet", "jvp"):
        raise ValueError(f"method must be 'jet' or 'jvp'; got {method!r}")
    cs = flow_taylor(ft_loss, params, batch, order, mask, method)
    dtype = _float_dtype(params)

    def f(t):
        return kl_utility(logits_fn, params, taylor_eval(cs, t, params), inputs)

    t0 = jnp.zeros((), dtype)
    if method == "jet":
        series = [jnp.ones((), dtype)] + [jnp.zeros((), dtype)] * (order - 1)
        y0, ys = _jet.jet(f, (t0,), (series,))
        derivs = [y0] + list(ys)
    else:
        derivs = []
        fk = f
        for k in range(order + 1):
            derivs.append(fk(t0))
            fk = (lambda g: (lambda t: jax.jvp(g, (t,), (jnp.ones_like(t),))[1]))(fk)
    return jnp.stack([jnp.asarray(dk, dtype) / math.factorial(k) for k, dk in enumerate(derivs)])


def utility_taylor(ft_loss: Callable, params: PyTree, batch: Any, logits_fn: Callable, inputs: Any,
                   order: int, *, mask: Optional[PyTree] = None, method: str = "jet") -> list:
    """The exact Taylor coefficients [a_0, …, a_order] (Python floats) of Δu(θ(t)) along gradient flow
    θ̇ = −∇L(θ), θ(0) = θ* (see :func:`utility_taylor_coeffs`). With Jg = 0, a_2 = a_3 = 0 and
    a_4 = ⅛ mean‖Λ^{1/2}(J·Hg + D²z[g, g])‖² (:func:`onset_split`)."""
    if not isinstance(order, int) or order < 1:
        raise ValueError(f"order must be an integer >= 1; got {order!r}")
    return [float(a) for a in np.asarray(_utility_taylor_jit(ft_loss, logits_fn, order, method, params, batch,
                                                             inputs, mask))]


@partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _utility_taylor_jit(ft_loss, logits_fn, order, method, params, batch, inputs, mask):
    return utility_taylor_coeffs(ft_loss, params, batch, logits_fn, inputs, order, mask=mask, method=method)


def onset_split(ft_loss: Callable, params: PyTree, batch: Any, logits_fn: Callable, inputs: Any, *,
                basis: Optional[PyTree] = None, mask: Optional[PyTree] = None, order: int = 5,
                method: str = "jet") -> dict:
    """How the exact quartic coefficient a_4 splits between the loss curvature and the policy curvature.

    Returns floats:
      coeffs [a_0..a_order] (utility_taylor), a2, a3, a4, a5 (if order ≥ 5);
      a4_JHg = ⅛ ‖F^{1/2} Hg‖² = ⅛ mean (J·Hg)ᵀΛ(J·Hg)  (the paper's γ_F²/8-type part);
      a4_curv = ⅛ mean D²z[g,g]ᵀ Λ D²z[g,g]  (the model's own curvature);
      a4_cross = ¼ mean (J·Hg)ᵀ Λ D²z[g,g]  (negative when the two cancel);
      a4_rest = a4 − (a4_JHg + a4_curv + a4_cross)  (0 when Jg = 0; the ε-terms otherwise);
      Jg_F = ‖F^{1/2} g‖ (= sqrt(2 a_2));
      with ``basis`` (top-d Fisher eigenvectors at θ*): gamma_E = ‖P Hg‖, gamma_F = ‖F^{1/2}P Hg‖,
      eps_E = ‖P g‖, eps_F = ‖F^{1/2} P g‖, bound_F = γ_F²/8.
    Everything is at θ* (F = F(θ*), Λ at z(θ*)); g and Hg are masked when ``mask`` is given.
    """
    if order < 4:
        raise ValueError(f"order must be >= 4; got {order}")

    res = _onset_split_jit(ft_loss, logits_fn, int(order), method, params, batch, inputs, basis, mask)
    coeffs = [float(a) for a in np.asarray(res.pop("coeffs"))]
    out = {k: float(v) for k, v in res.items()}
    out["coeffs"] = coeffs
    out["a2"], out["a3"], out["a4"] = coeffs[2], coeffs[3], coeffs[4]
    if order >= 5:
        out["a5"] = coeffs[5]
    out["a4_rest"] = out["a4"] - (out["a4_JHg"] + out["a4_curv"] + out["a4_cross"])
    if basis is not None:
        out["bound_F"] = out["gamma_F"] ** 2 / 8
    return out


@partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _onset_split_jit(ft_loss, logits_fn, order, method, params, batch, inputs, basis, mask):
    coeffs = utility_taylor_coeffs(ft_loss, params, batch, logits_fn, inputs, order, mask=mask, method=method)
    g = apply_mask(mask, jax.grad(ft_loss)(params, batch))
    Hg = hvp(ft_loss, params, g, batch, mask)
    zf = lambda p: logits_fn(p, inputs)  # noqa: E731
    z, Jg = jax.jvp(zf, (params,), (g,))
    _, JHg = jax.jvp(zf, (params,), (Hg,))
    _, D2z = jax.jvp(lambda p: jax.jvp(zf, (p,), (g,))[1], (params,), (g,))
    out = {"coeffs": coeffs,
           "a4_JHg": _lambda_quad(z, JHg, JHg) / 8,
           "a4_curv": _lambda_quad(z, D2z, D2z) / 8,
           "a4_cross": _lambda_quad(z, JHg, D2z) / 4,
           "Jg_F": jnp.sqrt(jnp.maximum(_lambda_quad(z, Jg, Jg), 0.0))}
    if basis is not None:
        PHg = tree_sub(Hg, _project_out(basis, Hg))
        Pg = tree_sub(g, _project_out(basis, g))
        out["gamma_E"] = jnp.sqrt(tree_dot(PHg, PHg))
        out["gamma_F"] = projected_fisher_norm(logits_fn, params, inputs, None, PHg)
        out["eps_E"] = jnp.sqrt(tree_dot(Pg, Pg))
        out["eps_F"] = projected_fisher_norm(logits_fn, params, inputs, None, Pg)
    return out
