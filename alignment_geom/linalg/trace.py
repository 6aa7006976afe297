"""Traces and spectral densities of symmetric operators on pytrees.

    dense_trace                  exact tr A from n unit-vector matvecs (small n)
    hutchinson_trace, hutchpp_trace
                                 stochastic tr A with a standard error (Hutchinson; Hutch++, Meyer et al. 2021)
    slq, slq_trace, spectral_density
                                 stochastic Lanczos quadrature: tr f(A) and a smoothed spectral density

Each takes a LinearOperator (``hutchpp_trace(op, 300, key=k)``) or a ``(matvec, like)`` pair
(``hutchpp_trace(mv, params, 300, key=k)``).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from alignment_geom.linalg.eigen import _lanczos_core, _rand_like_flat, _tridiag_eig
from alignment_geom.linalg.operator import operator_args
from alignment_geom.linalg.subspace import orthonormal_rows
from alignment_geom.tree import mask_indices

PyTree = object

__all__ = ["dense_trace", "hutchinson_trace", "hutchpp_trace", "SLQResult", "slq", "slq_trace", "spectral_density"]


# --------------------------------------------------------------------------- traces


def dense_trace(matvec, like: PyTree = None, *, mask: Optional[PyTree] = None, batch_size: int = 64):
    """Exact tr A = Σᵢ eᵢᵀ A eᵢ from n matvecs on unit vectors (only the masked coordinates with a mask).

    For small n only (n matvecs, run by lax.map in batches of ``batch_size`` vmapped matvecs).
    """
    mv, flat, _, _, like, mask, _ = operator_args(matvec, like, None, mask)
    idx = jnp.asarray(mask_indices(mask, like))

    def diag_entry(i):
        e = jnp.zeros_like(flat).at[i].set(1.0)
        return mv(e)[i]

    return jnp.sum(lax.map(diag_entry, idx, batch_size=min(batch_size, idx.shape[0])))


def hutchinson_trace(matvec, like: PyTree = None, num_samples: Optional[int] = None, *, key: jax.Array,
                     mask: Optional[PyTree] = None, dist: str = "rademacher", batch_size: Optional[int] = None):
    """Hutchinson's estimator tr A ≈ (1/s) Σ_j z_jᵀ A z_j with Rademacher (or normal) probes z_j.

    Returns (estimate, standard error = sample std of z_jᵀAz_j / √s). Var = 2(‖A‖_F² − Σ A_ii²)/s for
    Rademacher probes. With a mask the probes live on the masked coordinates (tr A_SS).
    """
    mv, flat, _, mflat, _, _, num_samples = operator_args(matvec, like, num_samples, mask)
    if not isinstance(num_samples, (int, np.integer)) or num_samples < 2:
        raise ValueError(f"num_samples must be an integer >= 2; got {num_samples!r}")

    def one(kk):
        z = _rand_like_flat(kk, flat, mflat, dist)
        return jnp.vdot(z, mv(z))

    vals = lax.map(one, jax.random.split(key, num_samples), batch_size=batch_size)
    return jnp.mean(vals), jnp.std(vals, ddof=1) / jnp.sqrt(num_samples)


def hutchpp_trace(matvec, like: PyTree = None, num_matvecs: Optional[int] = None, *, key: jax.Array,
                  mask: Optional[PyTree] = None, dist: str = "rademacher"):
    """Hutch++ (Meyer, Musco, Musco, Woodruff 2021): tr A with ≈ num_matvecs matvecs.

    s = num_matvecs // 3 sketch vectors S; Q = orth(A S); tr A ≈ tr(QᵀAQ) + Hutchinson on
    (I − QQᵀ)A(I − QQᵀ) with s more probes. Exact for rank(A) ≤ s; relative error O(1/num_matvecs)
    for PSD A. Returns (estimate, standard error of the Hutchinson part).
    """
    mv, flat, _, mflat, _, _, num_matvecs = operator_args(matvec, like, num_matvecs, mask)
    if not isinstance(num_matvecs, (int, np.integer)) or num_matvecs < 6:
        raise ValueError(f"num_matvecs must be an integer >= 6; got {num_matvecs!r}")
    s = num_matvecs // 3
    mvb = jax.vmap(mv)
    k1, k2 = jax.random.split(key)
    S = jax.vmap(lambda kk: _rand_like_flat(kk, flat, mflat, dist))(jax.random.split(k1, s))
    Q = orthonormal_rows(mvb(S))                           # (s, n)
    t_low = jnp.sum(Q * mvb(Q))
    G = jax.vmap(lambda kk: _rand_like_flat(kk, flat, mflat, dist))(jax.random.split(k2, s))
    G = G - (G @ Q.T) @ Q
    vals = jnp.sum(G * mvb(G), axis=1)
    return t_low + jnp.mean(vals), jnp.std(vals, ddof=1) / jnp.sqrt(s)


# --------------------------------------------------------------------------- SLQ


class SLQResult(NamedTuple):
    """Stochastic Lanczos quadrature nodes and weights.

    nodes (p, m): Ritz values θ_j of each probe's T_m; weights (p, m): τ_j = (e_1ᵀ s_j)², Σ_j τ_j = 1;
    dim: the operator dimension n (masked coordinates only with a mask). For a probe z with ‖z‖² = n,
    zᵀf(A)z ≈ n Σ_j τ_j f(θ_j), exact for polynomials f of degree ≤ 2m − 1.
    """

    nodes: jax.Array
    weights: jax.Array
    dim: jax.Array


def slq(matvec, like: PyTree = None, num_steps: Optional[int] = None, num_probes: Optional[int] = None, *,
        key: jax.Array, mask: Optional[PyTree] = None) -> SLQResult:
    """Stochastic Lanczos quadrature: per Rademacher probe, m Lanczos steps (full re-orthogonalisation).

    Probes run sequentially (lax.map), each holding an (m+1)×n Krylov basis. Call forms:
    ``slq(operator, num_steps, num_probes, key=k)`` or ``slq(matvec, like, num_steps, num_probes, key=k)``.
    """
    if num_probes is None and like is not None and np.ndim(like) == 0 and not isinstance(like, dict):
        like, num_steps, num_probes = None, like, num_steps
    mv, flat, _, mflat, _, _, _ = operator_args(matvec, like, None, mask)
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer; got {num_steps!r}")
    if not isinstance(num_probes, (int, np.integer)) or num_probes < 2:
        raise ValueError(f"num_probes must be an integer >= 2; got {num_probes!r}")
    n = flat.shape[0] if mflat is None else jnp.sum(mflat)
    num_steps = min(int(num_steps), flat.shape[0])

    def one(kk):
        kz, kr = jax.random.split(kk)
        z = _rand_like_flat(kz, flat, mflat, "rademacher")
        alpha, beta, _, m, _, _ = _lanczos_core(mv, z, num_steps, key=kr, mflat=mflat)
        theta, s, valid = _tridiag_eig(alpha, beta, m)
        tau = jnp.where(valid, s[0] ** 2, 0.0)
        return jnp.where(valid, theta, 0.0), tau

    nodes, weights = lax.map(one, jax.random.split(key, num_probes))
    return SLQResult(nodes, weights, jnp.asarray(n, flat.dtype))


def slq_trace(result: SLQResult, f: Callable = lambda x: x):
    """tr f(A) ≈ n · mean_probes Σ_j τ_j f(θ_j). Returns (estimate, standard error over probes)."""
    per = result.dim * jnp.sum(result.weights * f(result.nodes), axis=1)
    p = per.shape[0]
    return jnp.mean(per), jnp.std(per, ddof=1) / jnp.sqrt(p)


def spectral_density(result: SLQResult, grid: jax.Array, sigma: float):
    """Gaussian-smoothed spectral density φ(x) = mean_probes Σ_j τ_j N(x; θ_j, σ²) on ``grid``.

    Integrates to 1 (multiply by n for an eigenvalue count density). It estimates
    (1/n) Σ_i N(x; λ_i, σ²) without bias (up to the quadrature error).
    """
    grid = jnp.asarray(grid)
    d = grid[:, None, None] - result.nodes[None]
    g = jnp.exp(-0.5 * (d / sigma) ** 2) / (sigma * jnp.sqrt(2 * jnp.pi))
    return jnp.mean(jnp.sum(result.weights[None] * g, axis=2), axis=1)
