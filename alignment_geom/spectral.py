"""Matrix-free spectral toolkit over pytree operators (paper §3: F, its top-d eigenpairs, Mᵢ, Pᵢ).

Every solver takes a symmetric linear operator as a *matvec* on pytrees, ``matvec(v) -> A v`` with
``v`` shaped like ``like`` (typically the parameters θ*), e.g. ``curvature.linearized_fisher_vp`` (F·v)
or ``curvature.linearized_hvp`` (H·v). Internally the vectors are ravelled (``jax.flatten_util``) so the
Krylov bases are plain ``(steps, n)`` arrays; results come back as pytrees with a leading axis.

All solver loops run in ``lax.fori_loop`` / ``lax.while_loop`` / ``lax.map``: compile time does not
grow with the number of steps. Everything is jit-compatible (``k``, step counts, ``method`` and
``which`` are static) and works with parameters sharded over several devices (XLA propagates the
shardings through the ravelled vectors).

Public functions
    top_eigenpairs       top-k eigenpairs: Lanczos (full re-orthogonalisation, tolerance stop),
                         LOBPCG (jax.experimental.sparse.linalg.lobpcg_standard) or randomized
                         subspace iteration.
    gram_eigenpairs      top eigenpairs of the empirical Fisher F̂ = (1/m) GᵀG from the m×m Gram matrix.
    hutchinson_trace, hutchpp_trace, dense_trace
                         tr A (stochastic with a standard error, or exact for small n).
    slq, slq_trace, spectral_density
                         stochastic Lanczos quadrature: tr f(A) and a smoothed spectral density.
    cumulative_energy, effective_rank, dim_for_energy
    principal_angles     between two subspaces (pytrees with a leading axis, or (k, n) arrays).
    random_subspace_fisher, sketch, sketch_transpose, random_sketch_matrix
                         the paper's estimator: per-example gradients in a k-dim random subspace.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree

from alignment_geom._tree import apply_mask, check_mask, tree_map

PyTree = Any

__all__ = [
    "SolverInfo",
    "top_eigenpairs",
    "gram_eigenpairs",
    "dense_trace",
    "hutchinson_trace",
    "hutchpp_trace",
    "SLQResult",
    "slq",
    "slq_trace",
    "spectral_density",
    "cumulative_energy",
    "effective_rank",
    "dim_for_energy",
    "principal_angles",
    "as_matrix",
    "RandomSubspaceFisher",
    "random_subspace_fisher",
    "sketch",
    "sketch_transpose",
    "random_sketch_matrix",
]


# --------------------------------------------------------------------------- helpers


class SolverInfo(NamedTuple):
    """Diagnostics of an eigensolver run (all jax arrays, so it can leave a jit).

    num_matvecs: operator applications used by the iteration (Krylov steps / block columns), not
        counting the ``k`` extra ones of the final exact residual check.
    num_iters: Lanczos steps, LOBPCG or subspace iterations.
    converged: whether the tolerance was met (True when no tolerance was asked).
    residual_estimates: (k,) the solver's own relative residual estimates (Lanczos: β_m|e_mᵀs|/|θ|).
    """

    num_matvecs: jax.Array
    num_iters: jax.Array
    converged: jax.Array
    residual_estimates: jax.Array


def _flat_mask(mask, like):
    """The mask as a ravelled 0/1 vector in the dtype of ``like`` (None stays None)."""
    if mask is None:
        return None
    check_mask(mask, like)
    m = tree_map(lambda mm, x: jnp.broadcast_to(jnp.asarray(mm, bool), jnp.shape(x)).astype(jnp.result_type(x)),
                 mask, like)
    return ravel_pytree(m)[0]


def _flat_operator(matvec: Callable, like: PyTree, mask=None):
    """(mv_flat, flat_like, unravel, mask_flat): the operator on ravelled vectors, restricted to the mask."""
    flat, unravel = ravel_pytree(like)
    mflat = _flat_mask(mask, like)

    def mv(x):
        if mflat is not None:
            x = x * mflat
        y = ravel_pytree(matvec(unravel(x)))[0].astype(flat.dtype)
        if mflat is not None:
            y = y * mflat
        return y

    return mv, flat, unravel, mflat


def as_matrix(basis) -> jax.Array:
    """(k, n) matrix from a pytree with a leading axis k (ravelled per row) or a (k, n) array."""
    if isinstance(basis, (jax.Array, np.ndarray)) and jnp.ndim(basis) == 2:
        return jnp.asarray(basis)
    leaves = jax.tree_util.tree_leaves(basis)
    if not leaves:
        raise ValueError("basis is an empty pytree")
    k = leaves[0].shape[0]
    for x in leaves:
        if x.ndim < 1 or x.shape[0] != k:
            raise ValueError("basis must be a pytree whose leaves all share a leading axis k")
    return jnp.concatenate([x.reshape(k, -1) for x in leaves], axis=1)


def _unravel_rows(unravel, V):
    return jax.vmap(unravel)(V)


def _select(theta, k, which, valid=None):
    """Indices of the k wanted Ritz values, in descending order of the sort key."""
    if which == "LA":
        score = theta
    elif which == "LM":
        score = jnp.abs(theta)
    else:  # pragma: no cover - validated by callers
        raise ValueError(which)
    if valid is not None:
        score = jnp.where(valid, score, -jnp.inf)
    _, idx = lax.top_k(score, k)
    return idx


def _check_common(k, which, like):
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer; got {k!r}")
    if which not in ("LA", "LM"):
        raise ValueError(f"which must be 'LA' (largest algebraic) or 'LM' (largest magnitude); got {which!r}")
    n = sum(int(np.prod(jnp.shape(x))) for x in jax.tree_util.tree_leaves(like))
    if k > n:
        raise ValueError(f"k={k} exceeds the operator dimension n={n}")
    return n


def _rand_like_flat(key, flat, mflat, dist="normal"):
    if dist == "normal":
        z = jax.random.normal(key, flat.shape, flat.dtype)
    elif dist == "rademacher":
        z = jax.random.rademacher(key, flat.shape, flat.dtype)
    else:
        raise ValueError(f"dist must be 'normal' or 'rademacher'; got {dist!r}")
    return z if mflat is None else z * mflat


# --------------------------------------------------------------------------- Lanczos

_BASIS_BLOCK = 16  # rows per block of the stored Krylov basis (see _lanczos_core)


def _lanczos_core(mv, q0, max_steps, *, key, mflat, k=1, tol=None, which="LA", check_every=1, min_steps=None):
    """Lanczos with full re-orthogonalisation ("twice is enough") in a lax.while_loop.

    Builds Q = [q_0 … q_{m}] (orthonormal rows) and the tridiagonal T_m (alpha, beta) with
    A Q_mᵀ = Q_mᵀ T_m + β_{m-1} q_m e_mᵀ. On breakdown (an invariant subspace, β ≈ 0) it continues
    from a fresh random vector orthogonal to Q, storing β = 0, so rank-deficient operators are handled.
    With ``tol`` it stops as soon as the k wanted Ritz pairs have relative residual estimates
    β_{m-1}|s_{m-1,i}|/|θ_i| ≤ tol (checked every ``check_every`` steps, never before ``min_steps``).

    The basis is stored in blocks of ``_BASIS_BLOCK`` rows, and step j projects only against the
    ⌈(j+1)/block⌉ blocks filled so far (a lax.fori_loop over blocks): the re-orthogonalisation
    cost grows with the steps actually taken, not with ``max_steps`` (one (S+1)×n matvec pass
    costs as much as all of them; benchmarks/spectral.py measures the step cost).

    Returns (alpha (S,), beta (S,), Q (R, n) with R ≥ S+1 rows, rows past m zero, m steps done,
    converged).
    """
    n = q0.shape[0]
    dtype = q0.dtype
    S = max_steps
    eps_bd = jnp.finfo(dtype).eps ** 0.75
    min_steps = max(k, 1) if min_steps is None else min_steps
    B = min(_BASIS_BLOCK, S + 1)
    NB = -(-(S + 1) // B)

    def gram_schmidt(Q, w, j):
        """One classical Gram–Schmidt pass, w − Q_{0..j}ᵀ(Q_{0..j} w), over the filled blocks only."""
        nblk = j // B + 1
        h = lax.fori_loop(0, nblk, lambda c, h: h.at[c].set(Q[c] @ w), jnp.zeros((NB, B), dtype))
        return lax.fori_loop(0, nblk, lambda c, ww: ww - Q[c].T @ h[c], w)

    def orth(Q, w, j):
        return gram_schmidt(Q, gram_schmidt(Q, w, j), j)

    Q0 = jnp.zeros((NB, B, n), dtype).at[0, 0].set(q0 / jnp.linalg.norm(q0))
    alpha0 = jnp.zeros((S,), dtype)
    beta0 = jnp.zeros((S,), dtype)

    def check(alpha, beta, m):
        theta, s, valid = _tridiag_eig(alpha, beta, m)
        idx = _select(theta, k, which, valid)
        last = s[m - 1, idx]
        est = jnp.abs(beta[m - 1] * last) / jnp.maximum(jnp.abs(theta[idx]), jnp.finfo(dtype).tiny)
        return jnp.all(est <= tol) & (m >= min_steps)

    def cond(state):
        j, _, _, _, done, _ = state
        return (j < S) & ~done

    def body(state):
        j, Q, alpha, beta, _, scale = state
        q = Q[j // B, j % B]
        w = mv(q)
        a = jnp.vdot(q, w)
        jp = jnp.maximum(j - 1, 0)
        w = w - a * q - jnp.where(j > 0, beta[jp], 0.0) * Q[jp // B, jp % B]
        # classical Gram–Schmidt against the whole basis, repeated only when it cancelled much of w
        # (the DGKS criterion ‖w'‖ < ‖w‖/√2): two passes over Q per step instead of four, usually
        n0 = jnp.linalg.norm(w)
        w = gram_schmidt(Q, w, j)
        n1 = jnp.linalg.norm(w)
        w = lax.cond(n1 < 0.7071 * n0, lambda: gram_schmidt(Q, w, j), lambda: w)
        b = jnp.linalg.norm(w)
        scale = jnp.maximum(scale, jnp.maximum(jnp.abs(a), b))
        breakdown = b <= eps_bd * scale
        # fresh direction after a breakdown (beta stored as 0 keeps T block-diagonal); only computed then
        def restart():
            r = orth(Q, orth(Q, _rand_like_flat(jax.random.fold_in(key, j), q0, mflat), j), j)
            return r / jnp.linalg.norm(r)

        w_next = lax.cond(breakdown, restart, lambda: w / b)
        b = jnp.where(breakdown, 0.0, b)
        Q = Q.at[(j + 1) // B, (j + 1) % B].set(w_next)
        alpha = alpha.at[j].set(a)
        beta = beta.at[j].set(b)
        m = j + 1
        if tol is None:
            done = jnp.asarray(False)
        else:
            done = lax.cond(((m % check_every) == 0) & (m >= min_steps),
                            lambda: check(alpha, beta, m), lambda: jnp.asarray(False))
        return m, Q, alpha, beta, done, scale

    state = (jnp.asarray(0), Q0, alpha0, beta0, jnp.asarray(False), jnp.zeros((), dtype))
    m, Q, alpha, beta, done, _ = lax.while_loop(cond, body, state)
    converged = jnp.asarray(True) if tol is None else done
    return alpha, beta, Q.reshape(NB * B, n), m, converged


def _tridiag_eig(alpha, beta, m):
    """Eigen-decomposition of the leading m×m block of T (static size S, dynamic m).

    The block beyond m is replaced by a decoupled diagonal far below the spectrum, so
    eigh(T_padded) contains eig(T_m); ``valid`` flags the Ritz values that belong to T_m.
    Returns (theta (S,), s (S, S) eigenvectors in columns, valid (S,)).
    """
    S = alpha.shape[0]
    i = jnp.arange(S)
    inside = i < m
    bound = jnp.max(jnp.abs(alpha) * inside) + 2 * jnp.max(jnp.abs(beta) * inside) + 1.0
    diag = jnp.where(inside, alpha, -3.0 * bound)
    off = jnp.where(i[:-1] < m - 1, beta[:-1], 0.0)
    T = jnp.diag(diag) + jnp.diag(off, 1) + jnp.diag(off, -1)
    theta, s = jnp.linalg.eigh(T)
    valid = theta > -2.0 * bound
    s = jnp.where(inside[:, None], s, 0.0)
    return theta, s, valid


def _lanczos_eigenpairs(mv, flat, mflat, k, key, num_steps, tol, which, check_every):
    kq, kr = jax.random.split(key)
    q0 = _rand_like_flat(kq, flat, mflat)
    alpha, beta, Q, m, converged = _lanczos_core(mv, q0, num_steps, key=kr, mflat=mflat, k=k, tol=tol,
                                                 which=which, check_every=check_every)
    theta, s, valid = _tridiag_eig(alpha, beta, m)
    idx = _select(theta, k, which, valid)
    lam = theta[idx]
    Sk = s[:, idx]                                    # (S, k)
    Sk_rows = jnp.zeros((Q.shape[0], k), Sk.dtype).at[:Sk.shape[0]].set(Sk)  # rows ≥ S of Q are unused
    V = Sk_rows.T @ Q                                 # (k, n) Ritz vectors
    est = jnp.abs(beta[m - 1] * Sk[m - 1]) / jnp.maximum(jnp.abs(lam), jnp.finfo(flat.dtype).tiny)
    info = SolverInfo(num_matvecs=m, num_iters=m, converged=converged, residual_estimates=est)
    return lam, V, info


# --------------------------------------------------------------------------- LOBPCG and randomized


def _lobpcg_eigenpairs(mv, flat, mflat, k, key, max_iters, tol):
    from jax.experimental.sparse.linalg import lobpcg_standard

    n = flat.shape[0]
    if 5 * k >= n:
        raise ValueError(f"method='lobpcg' needs 5k < n (got k={k}, n={n}); use method='lanczos'")
    X = jax.vmap(lambda kk: _rand_like_flat(kk, flat, mflat), out_axes=1)(jax.random.split(key, k))
    A = jax.vmap(mv, in_axes=1, out_axes=1)
    # lobpcg's criterion: ‖Av − θv‖ < tol'·10·n·(θ + ‖Av‖) ≈ tol'·20·n·θ; ours: ‖Av − θv‖ ≤ tol·θ.
    jtol = None if tol is None else tol / (20.0 * n)
    theta, U, it = lobpcg_standard(A, X, m=max_iters, tol=jtol)
    V = U.T
    # jax's lobpcg applies A to the (n, 3k) block [X, P, R] and again to the new X every iteration,
    # after A X once at the start: k + 4k·iterations matvecs
    info = SolverInfo(num_matvecs=k + 4 * k * it, num_iters=it,
                      converged=jnp.asarray(True) if tol is None else it < max_iters,
                      residual_estimates=jnp.full((k,), jnp.nan, flat.dtype))
    return theta, V, info


def _orthonormal_rows(Y):
    """Orthonormal rows spanning the rows of Y (b, n), via QR of Yᵀ."""
    q, _ = jnp.linalg.qr(Y.T)
    return q.T


def _randomized_eigenpairs(mv, flat, mflat, k, key, max_iters, tol, which, oversample):
    """Randomized subspace iteration with Rayleigh–Ritz (block of b = k + oversample, vmapped matvecs).

    Converges to the largest-|λ| eigenpairs (which="LA" equals "LM" for PSD operators such as F).
    """
    b = k + oversample
    n = flat.shape[0]
    if b > n:
        b = n
    mvb = jax.vmap(mv)
    X0 = jax.vmap(lambda kk: _rand_like_flat(kk, flat, mflat))(jax.random.split(key, b))
    X0 = _orthonormal_rows(X0)
    tiny = jnp.finfo(flat.dtype).tiny

    def rr(X):
        Y = mvb(X)                       # (b, n) = A X
        T = X @ Y.T
        T = 0.5 * (T + T.T)
        theta, s = jnp.linalg.eigh(T)
        idx = _select(theta, b, "LM" if which == "LM" else "LA")
        theta, s = theta[idx], s[:, idx]
        V = s.T @ X
        AV = s.T @ Y
        res = jnp.linalg.norm(AV - theta[:, None] * V, axis=1) / jnp.maximum(jnp.abs(theta), tiny)
        return theta, V, AV, res

    def cond(st):
        i, _, res, _, _ = st
        ok = jnp.asarray(False) if tol is None else jnp.all(res[:k] <= tol)
        return (i < max_iters) & ~ok

    def body(st):
        i, X, _, _, _ = st
        theta, V, AV, res = rr(X)
        Xn = _orthonormal_rows(AV)
        return i + 1, Xn, res, theta, V

    theta0 = jnp.zeros((b,), flat.dtype)
    st = (jnp.asarray(0), X0, jnp.full((b,), jnp.inf, flat.dtype), theta0, jnp.zeros((b, n), flat.dtype))
    it, X, _, _, _ = lax.while_loop(cond, body, st)
    theta, V, _, res = rr(X)
    idx = _select(theta, k, which)
    info = SolverInfo(num_matvecs=(it + 1) * b, num_iters=it,
                      converged=jnp.asarray(True) if tol is None else jnp.all(res[idx] <= tol),
                      residual_estimates=res[idx])
    return theta[idx], V[idx], info


# --------------------------------------------------------------------------- public eigensolver


def top_eigenpairs(matvec: Callable, like: PyTree, k: int, *, key: jax.Array, method: str = "lanczos",
                   num_steps: Optional[int] = None, tol: Optional[float] = None, which: str = "LA",
                   mask: Optional[PyTree] = None, check_every: int = 1, max_iters: Optional[int] = None,
                   oversample: int = 10, return_info: bool = False):
    """Top-k eigenpairs of a symmetric operator A given as a pytree matvec (e.g. F·v or H·v at θ*).

    A v_i = λ_i v_i, λ_1 ≥ … ≥ λ_k (which="LA": largest algebraic; "LM": largest |λ|, sorted by |λ|).

    Args:
      matvec: ``v -> A v`` on pytrees shaped like ``like``; must be linear and symmetric.
      like: a pytree fixing the structure, shapes and dtype (e.g. θ*).
      k: number of eigenpairs (static).
      key: PRNG key for the start vector(s).
      method: "lanczos" (full re-orthogonalisation; Ritz vectors from eigh of the tridiagonal T_m;
        memory (num_steps+1)·n), "lobpcg" (jax.experimental.sparse.linalg.lobpcg_standard on the
        vmapped matvec; needs 5k < n; largest algebraic only) or "randomized" (subspace iteration on a
        block of k + oversample vectors with the matvec vmapped over the block, Rayleigh–Ritz each
        iteration; converges to the largest |λ|).
      num_steps: Lanczos: the maximum Krylov dimension m (default min(n, max(3k, k + 40))). Without
        ``tol`` exactly m steps are taken.
      tol: relative residual target ‖Av − λv‖/|λ| for all k pairs; Lanczos stops at the first step
        where its residual estimates β_m|e_mᵀ s_i|/|θ_i| meet it (checked every ``check_every``
        steps), the others when their residuals do.
      which: "LA" or "LM" (Lanczos and randomized; LOBPCG supports "LA" only).
      mask: optional boolean pytree: the operator is restricted to the masked coordinates
        (A_SS; start vectors and outputs masked).
      max_iters: LOBPCG / randomized iteration limit (default 100 / 50).
      return_info: also return a :class:`SolverInfo` (matvecs used, convergence).

    Returns:
      ``(eigvals (k,), eigvecs, residuals (k,))`` [+ ``info``]: eigvecs is a pytree shaped like
      ``like`` with a leading axis k, orthonormal in the Euclidean inner product; residuals are the
      exact relative residuals ‖A v_i − λ_i v_i‖/|λ_i| (k extra matvecs, vmapped).
    """
    if method not in ("lanczos", "lobpcg", "randomized"):
        raise ValueError(f"method must be 'lanczos', 'lobpcg' or 'randomized'; got {method!r}")
    n = _check_common(k, which, like)
    if method == "lobpcg" and which != "LA":
        raise ValueError("method='lobpcg' finds the largest algebraic eigenvalues only (which='LA')")
    if tol is not None and not tol > 0:
        raise ValueError(f"tol must be positive; got {tol!r}")
    mv, flat, unravel, mflat = _flat_operator(matvec, like, mask)
    if not jnp.issubdtype(flat.dtype, jnp.floating):
        raise ValueError(f"the operator's vectors must be floating point; got {flat.dtype}")
    if method == "lanczos":
        if num_steps is None:
            num_steps = min(n, max(3 * k, k + 40))
        if not isinstance(num_steps, (int, np.integer)) or num_steps < k:
            raise ValueError(f"num_steps must be an integer >= k={k}; got {num_steps!r}")
        num_steps = min(int(num_steps), n)
        lam, V, info = _lanczos_eigenpairs(mv, flat, mflat, k, key, num_steps, tol, which, check_every)
    elif method == "lobpcg":
        lam, V, info = _lobpcg_eigenpairs(mv, flat, mflat, k, key, 100 if max_iters is None else max_iters, tol)
    else:
        lam, V, info = _randomized_eigenpairs(mv, flat, mflat, k, key, 50 if max_iters is None else max_iters,
                                              tol, which, oversample)
    AV = jax.vmap(mv)(V)
    res = jnp.linalg.norm(AV - lam[:, None] * V, axis=1) / jnp.maximum(jnp.abs(lam), jnp.finfo(flat.dtype).tiny)
    out = (lam, _unravel_rows(unravel, V), res)
    return out + (info,) if return_info else out


# --------------------------------------------------------------------------- Gram (m ≪ n) eigenpairs


def gram_eigenpairs(grads, k: Optional[int] = None, *, mean: bool = True):
    """Top eigenpairs of the empirical Fisher F̂ = (1/m) Σᵢ gᵢgᵢᵀ = (1/m) GᵀG through its m×m Gram matrix.

    With K = (1/m) G Gᵀ = U Σ Uᵀ (m×m), the nonzero eigenpairs of F̂ are (σ_j, v_j = Gᵀu_j/√(m σ_j)):
    the eigenvectors are mapped back to parameter space exactly. Cost O(m² n); memory m·n.

    Args:
      grads: per-example gradients gᵢ = ∇log π(yᵢ|xᵢ) (``curvature.per_example_grads``), a pytree
        with a leading axis m, or an (m, n) array.
      k: number of eigenpairs (default m; at most m).
      mean: F̂ = (1/m) GᵀG (default) or GᵀG.
    Returns:
      (eigvals (k,) descending, eigvecs (same container as grads, leading axis k), residuals (k,)
      = ‖F̂v − λv‖/|λ| computed exactly from G).
    """
    sig, V, res, _ = _gram_eigenpairs_and_trace(grads, k, mean)
    return sig, V, res


def _gram_eigenpairs_and_trace(grads, k, mean):
    """:func:`gram_eigenpairs` and tr F̂ = tr K (the trace of the same Gram matrix, no extra pass over G).

    Works leaf by leaf (G = [G_1 | … | G_L] with G_l the (m, n_l) rows of leaf l): K = c Σ_l G_l G_lᵀ,
    V_l = U_kᵀ G_l / D, so the m × n matrix is never concatenated nor split again (at n = 1M, m = 64
    in float64 those two copies cost as much as the eigen-decomposition).
    """
    if isinstance(grads, (jax.Array, np.ndarray)) and jnp.ndim(grads) == 2:
        leaves, treedef = [jnp.asarray(grads)], None
    else:
        leaves, treedef = jax.tree_util.tree_flatten(grads)
        if not leaves:
            raise ValueError("grads is an empty pytree")
        if any(x.ndim < 1 or x.shape[0] != leaves[0].shape[0] for x in leaves):
            raise ValueError("grads must be a pytree whose leaves all share a leading axis m")
    m = leaves[0].shape[0]
    Gs = [x.reshape(m, -1) for x in leaves]
    k = m if k is None else k
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= m:
        raise ValueError(f"k must be an integer in [1, m={m}]; got {k!r}")
    c = (1.0 / m) if mean else 1.0
    K = c * sum(_gram_product(G) for G in Gs)
    sig, U = jnp.linalg.eigh(0.5 * (K + K.T))
    sig, U = sig[::-1][:k], U[:, ::-1][:, :k]
    tiny = jnp.finfo(K.dtype).tiny
    # K u = σ u with K = c GGᵀ  ⇒  F̂ (Gᵀu) = c Gᵀ(GGᵀu) = σ Gᵀu and ‖Gᵀu‖² = σ/c
    D = jnp.sqrt(jnp.maximum(sig / c, tiny))
    Vs = [(U.T @ G) / D[:, None] for G in Gs]
    # residual F̂V − σV = (c V Gᵀ − σ D⁻¹ Uᵀ) G: (k, m) @ (m, n) products. Written as c (V Gᵀ) G − σ V,
    # XLA:CPU (jaxlib 0.10.2) fuses the two dots and the row norms into one YNNPACK fusion that took 21 s
    # instead of 1 s at m = 64, n = 1M in float64 (found by benchmarks/torch_peer.py, method="gram").
    M = c * sum(V @ G.T for V, G in zip(Vs, Gs)) - (sig / D)[:, None] * U.T
    res = jnp.sqrt(sum(jnp.sum(jnp.square(M @ G), axis=1) for G in Gs)) / jnp.maximum(jnp.abs(sig), tiny)
    trace = jnp.trace(K)
    if treedef is None:
        return sig, Vs[0], res, trace
    outs = [V.reshape((k,) + x.shape[1:]) for V, x in zip(Vs, leaves)]
    return sig, jax.tree_util.tree_unflatten(treedef, outs), res, trace


def _gram_product(G: jax.Array, block: int = 8192) -> jax.Array:
    """G Gᵀ for a wide (m, n) G, the contraction over n summed in column blocks of ``block`` (lax.fori_loop).

    XLA:CPU runs one (m, n) @ (n, m) dot with n ≫ m at about 20% of the float64 GEMM peak; summing
    (m, block) @ (block, m) products over the blocks runs about 2× faster (m = 64, n = 524,288).
    """
    m, n = G.shape
    nb = n // block
    if nb < 2:
        return G @ G.T
    blocks = G[:, :nb * block].reshape(m, nb, block)

    def body(i, acc):
        b = lax.dynamic_index_in_dim(blocks, i, axis=1, keepdims=False)
        return acc + b @ b.T

    acc = lax.fori_loop(0, nb, body, jnp.zeros((m, m), G.dtype))
    rem = G[:, nb * block:]
    return acc + rem @ rem.T if rem.shape[1] else acc


# --------------------------------------------------------------------------- traces


def dense_trace(matvec: Callable, like: PyTree, *, mask: Optional[PyTree] = None, batch_size: int = 64):
    """Exact tr A = Σᵢ eᵢᵀ A eᵢ from n matvecs on unit vectors (only the masked coordinates with a mask).

    For small n only (n matvecs, run by lax.map in batches of ``batch_size`` vmapped matvecs).
    """
    mv, flat, _, _ = _flat_operator(matvec, like, mask)
    idx = jnp.asarray(_mask_index_array(mask, like))

    def diag_entry(i):
        e = jnp.zeros_like(flat).at[i].set(1.0)
        return mv(e)[i]

    return jnp.sum(lax.map(diag_entry, idx, batch_size=min(batch_size, idx.shape[0])))


def hutchinson_trace(matvec: Callable, like: PyTree, num_samples: int, *, key: jax.Array,
                     mask: Optional[PyTree] = None, dist: str = "rademacher", batch_size: Optional[int] = None):
    """Hutchinson's estimator tr A ≈ (1/s) Σ_j z_jᵀ A z_j with Rademacher (or normal) probes z_j.

    Returns (estimate, standard error = sample std of z_jᵀAz_j / √s). Var = 2(‖A‖_F² − Σ A_ii²)/s for
    Rademacher probes. With a mask the probes live on the masked coordinates (tr A_SS).
    """
    if not isinstance(num_samples, (int, np.integer)) or num_samples < 2:
        raise ValueError(f"num_samples must be an integer >= 2; got {num_samples!r}")
    mv, flat, _, mflat = _flat_operator(matvec, like, mask)

    def one(kk):
        z = _rand_like_flat(kk, flat, mflat, dist)
        return jnp.vdot(z, mv(z))

    vals = lax.map(one, jax.random.split(key, num_samples), batch_size=batch_size)
    return jnp.mean(vals), jnp.std(vals, ddof=1) / jnp.sqrt(num_samples)


def hutchpp_trace(matvec: Callable, like: PyTree, num_matvecs: int, *, key: jax.Array,
                  mask: Optional[PyTree] = None, dist: str = "rademacher"):
    """Hutch++ (Meyer, Musco, Musco, Woodruff 2021): tr A with ≈ num_matvecs matvecs.

    s = num_matvecs // 3 sketch vectors S; Q = orth(A S); tr A ≈ tr(QᵀAQ) + Hutchinson on
    (I − QQᵀ)A(I − QQᵀ) with s more probes. Exact for rank(A) ≤ s; relative error O(1/num_matvecs)
    for PSD A. Returns (estimate, standard error of the Hutchinson part).
    """
    if not isinstance(num_matvecs, (int, np.integer)) or num_matvecs < 6:
        raise ValueError(f"num_matvecs must be an integer >= 6; got {num_matvecs!r}")
    mv, flat, _, mflat = _flat_operator(matvec, like, mask)
    s = num_matvecs // 3
    mvb = jax.vmap(mv)
    k1, k2 = jax.random.split(key)
    S = jax.vmap(lambda kk: _rand_like_flat(kk, flat, mflat, dist))(jax.random.split(k1, s))
    Q = _orthonormal_rows(mvb(S))                           # (s, n)
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


def slq(matvec: Callable, like: PyTree, num_steps: int, num_probes: int, *, key: jax.Array,
        mask: Optional[PyTree] = None) -> SLQResult:
    """Stochastic Lanczos quadrature: per Rademacher probe, m Lanczos steps (full re-orthogonalisation).

    Probes run sequentially (lax.map), each holding an (m+1)×n Krylov basis.
    """
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer; got {num_steps!r}")
    if not isinstance(num_probes, (int, np.integer)) or num_probes < 2:
        raise ValueError(f"num_probes must be an integer >= 2; got {num_probes!r}")
    mv, flat, _, mflat = _flat_operator(matvec, like, mask)
    n = flat.shape[0] if mflat is None else jnp.sum(mflat)
    num_steps = min(int(num_steps), flat.shape[0])

    def one(kk):
        kz, kr = jax.random.split(kk)
        z = _rand_like_flat(kz, flat, mflat, "rademacher")
        alpha, beta, _, m, _ = _lanczos_core(mv, z, num_steps, key=kr, mflat=mflat)
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


# --------------------------------------------------------------------------- spectrum summaries


def cumulative_energy(eigvals, total=None):
    """E_d = Σ_{j≤d} λ_j / total (total defaults to Σ_j λ_j, e.g. pass tr F). Shape (k,)."""
    eigvals = jnp.asarray(eigvals)
    total = jnp.sum(eigvals) if total is None else total
    return jnp.cumsum(eigvals) / total


def dim_for_energy(eigvals, threshold: float, total=None) -> int:
    """Smallest d with cumulative energy E_d ≥ threshold (concrete; len(eigvals) if never reached)."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1]; got {threshold!r}")
    e = np.asarray(cumulative_energy(eigvals, total))
    hit = np.nonzero(e >= threshold - 1e-12)[0]
    return int(hit[0] + 1) if hit.size else int(e.shape[0])


def effective_rank(eigvals, kind: str = "entropy"):
    """Effective rank of a PSD spectrum (eigenvalues clipped at 0).

    "entropy": exp(−Σ p_j log p_j), p = λ/Σλ (Roy & Vetterli); "participation": (Σλ)²/Σλ²;
    "stable": Σλ / max λ.
    """
    lam = jnp.clip(jnp.asarray(eigvals), 0.0)
    s = jnp.sum(lam)
    if kind == "entropy":
        p = lam / s
        return jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)))
    if kind == "participation":
        return s ** 2 / jnp.sum(lam ** 2)
    if kind == "stable":
        return s / jnp.max(lam)
    raise ValueError(f"kind must be 'entropy', 'participation' or 'stable'; got {kind!r}")


# --------------------------------------------------------------------------- principal angles


def principal_angles(basis_a, basis_b):
    """Principal angles 0 ≤ φ_1 ≤ … ≤ φ_q ≤ π/2 between span(A) and span(B), q = min(k_a, k_b).

    Bases are pytrees with a leading axis (like ``top_eigenpairs``' eigvecs) or (k, n) arrays; they are
    orthonormalised first (QR), so any spanning sets work. cos φ_i are the singular values of
    Q_A Q_Bᵀ; for accuracy at small angles (Björck & Golub) φ_i = arcsin of the singular values of
    Q_B − Q_B Q_AᵀQ_A where cos² φ < ½, arccos elsewhere.
    """
    A = as_matrix(basis_a)
    B = as_matrix(basis_b)
    if A.shape[1] != B.shape[1]:
        raise ValueError(f"bases live in different dimensions: {A.shape[1]} vs {B.shape[1]}")
    if B.shape[0] > A.shape[0]:
        A, B = B, A
    Qa = _orthonormal_rows(A)
    Qb = _orthonormal_rows(B)
    cos = jnp.linalg.svd(Qa @ Qb.T, compute_uv=False)                 # descending, k_b values
    cos = jnp.clip(cos, 0.0, 1.0)
    R = Qb - (Qb @ Qa.T) @ Qa
    # singular values of the wide (k_b, n) R via its (k_b, k_b) QR factor: LAPACK's wide-matrix SVD can
    # allocate an n×n workspace
    sin = jnp.sort(jnp.clip(jnp.linalg.svd(jnp.linalg.qr(R.T, mode="r"), compute_uv=False), 0.0, 1.0))
    return jnp.where(cos ** 2 < 0.5, jnp.arccos(cos), jnp.arcsin(sin))


# --------------------------------------------------------------------------- random-subspace Fisher


def _leaf_keys(key, n_leaves):
    return [jax.random.fold_in(key, i) for i in range(n_leaves)]


def _sketch_plan(like, mask, block_size):
    """Per leaf: (size, block, n_blocks, included) with included False for statically-all-False mask leaves."""
    leaves = jax.tree_util.tree_leaves(like)
    mleaves = [None] * len(leaves) if mask is None else jax.tree_util.tree_leaves(mask)
    plan = []
    for x, mm in zip(leaves, mleaves):
        size = int(np.prod(jnp.shape(x)))
        b = max(1, min(block_size, size))
        nb = -(-size // b)
        included = True
        if mm is not None and isinstance(mm, (bool, np.bool_)):
            included = bool(mm)
        elif mm is not None and not isinstance(mm, jax.core.Tracer):
            try:
                included = bool(np.any(np.asarray(mm)))
            except Exception:  # noqa: BLE001 - traced masks: keep the leaf
                included = True
        plan.append((size, b, nb, included))
    return plan


def _block(key_leaf, c, b, k, dtype, scale):
    return jax.random.normal(jax.random.fold_in(key_leaf, c), (b, k), dtype) * scale


def _sketch_scale(n_eff, k, normalization):
    if normalization == "jl":
        return 1.0 / math.sqrt(k)
    if normalization == "subspace":
        return 1.0 / math.sqrt(n_eff)
    raise ValueError(f"normalization must be 'jl' or 'subspace'; got {normalization!r}")


def _mask_index_array(mask, like):
    """Indices of the ravelled vector kept by a concrete mask (numpy; works while ``like`` is traced)."""
    leaves = jax.tree_util.tree_leaves(like)
    if mask is None:
        return np.arange(sum(int(np.prod(jnp.shape(x))) for x in leaves))
    check_mask(mask, like)
    mleaves = jax.tree_util.tree_leaves(mask)
    flat = np.concatenate([np.broadcast_to(np.asarray(mm, bool), jnp.shape(x)).reshape(-1)
                           for mm, x in zip(mleaves, leaves)])
    return np.nonzero(flat)[0]


def _n_eff(like, mask):
    """Number of masked coordinates (the mask must be concrete: Python/numpy bools or concrete arrays)."""
    leaves = jax.tree_util.tree_leaves(like)
    if mask is None:
        return sum(int(np.prod(jnp.shape(x))) for x in leaves)
    mleaves = jax.tree_util.tree_leaves(mask)
    return int(sum(np.sum(np.broadcast_to(np.asarray(mm, bool), jnp.shape(x))) for mm, x in zip(mleaves, leaves)))


def sketch(v: PyTree, k: int, *, key: jax.Array, mask: Optional[PyTree] = None, block_size: int = 65536,
           normalization: str = "jl") -> jax.Array:
    """S v ∈ ℝᵏ for the random k×n sketch S generated blockwise from ``key`` (never held whole).

    S has i.i.d. N(0, s²) entries, s² = 1/k ("jl": E SᵀS = I_n, so inner products are preserved in
    expectation) or 1/n ("subspace": the columns of R = Sᵀ have ≈ unit norm; θ* + R w is a random
    k-dim reparametrisation). Leaf ℓ's rows come in blocks of ``block_size`` from
    fold_in(fold_in(key, ℓ), block); the matrix depends on key, k, block_size and the tree structure.
    With a mask only masked coordinates contribute. ``v`` is one vector (vmap for many).
    """
    leaves = jax.tree_util.tree_leaves(v)
    plan = _sketch_plan(v, mask, block_size)
    scale = _sketch_scale(_n_eff(v, mask), k, normalization)
    v = apply_mask(mask, v)
    leaves = jax.tree_util.tree_leaves(v)
    dtype = jnp.result_type(*leaves)
    out = jnp.zeros((k,), dtype)
    for key_l, x, (size, b, nb, inc) in zip(_leaf_keys(key, len(leaves)), leaves, plan):
        if not inc:
            continue
        xf = jnp.pad(x.reshape(-1).astype(dtype), (0, nb * b - size)).reshape(nb, b)

        def step(acc, c, xf=xf, key_l=key_l, b=b):
            return acc + xf[c] @ _block(key_l, c, b, k, dtype, scale), None

        out, _ = lax.scan(step, out, jnp.arange(nb))
    return out


def sketch_transpose(w: jax.Array, like: PyTree, *, key: jax.Array, mask: Optional[PyTree] = None,
                     block_size: int = 65536, normalization: str = "jl") -> PyTree:
    """Sᵀ w as a pytree shaped like ``like`` (the adjoint of :func:`sketch` with the same key)."""
    k = w.shape[0]
    leaves, treedef = jax.tree_util.tree_flatten(like)
    plan = _sketch_plan(like, mask, block_size)
    scale = _sketch_scale(_n_eff(like, mask), k, normalization)
    outs = []
    for key_l, x, (size, b, nb, inc) in zip(_leaf_keys(key, len(leaves)), leaves, plan):
        if not inc:
            outs.append(jnp.zeros_like(x))
            continue
        dtype = w.dtype

        def one(c, key_l=key_l, b=b):
            return _block(key_l, c, b, k, dtype, scale) @ w

        blocks = lax.map(one, jnp.arange(nb))
        outs.append(blocks.reshape(-1)[:size].reshape(jnp.shape(x)).astype(x.dtype))
    return apply_mask(mask, jax.tree_util.tree_unflatten(treedef, outs))


def random_sketch_matrix(like: PyTree, k: int, *, key: jax.Array, mask: Optional[PyTree] = None,
                         block_size: int = 65536, normalization: str = "jl") -> jax.Array:
    """The dense k×n matrix S of :func:`sketch` (for tests and small n only)."""
    flat, unravel = ravel_pytree(like)
    eye = jnp.eye(flat.shape[0], dtype=flat.dtype)
    cols = jax.vmap(lambda e: sketch(unravel(e), k, key=key, mask=mask, block_size=block_size,
                                     normalization=normalization))(eye)
    return cols.T


class RandomSubspaceFisher(NamedTuple):
    """Result of :func:`random_subspace_fisher`.

    eigvals (r,): descending eigenvalues of the sketched Fisher F_S = (1/m) ZᵀZ = S F̂ Sᵀ (k×k).
    sketch_eigvecs (k, r): its eigenvectors (coordinates in the random subspace).
    Z (m, k): the projected per-example gradients zᵢ = S gᵢ.
    eigvecs: pytree with leading axis r, orthonormal parameter-space vectors v_j ∝ Gᵀ Z w_j
        (= F̂'s eigenvector directions recovered through the Gram identity; None if not asked).
    rayleigh (r,): v_jᵀ F̂ v_j for those vectors (exact F̂, one jvp each), or None.
    trace: (1/m)‖Z‖_F², an unbiased estimate of tr F̂ (jl normalisation).
    """

    eigvals: jax.Array
    sketch_eigvecs: jax.Array
    Z: jax.Array
    eigvecs: Any
    rayleigh: Any
    trace: jax.Array


def random_subspace_fisher(logprob_fn: Callable, params: PyTree, batch: Any, k: int = 4096, *,
                           key: jax.Array, num_eigs: Optional[int] = None, mask: Optional[PyTree] = None,
                           example_batch_size: Optional[int] = None, block_size: int = 65536,
                           normalization: str = "jl", return_vectors: bool = True) -> RandomSubspaceFisher:
    """The paper's Fisher estimator (§7): per-example gradients in a k-dimensional random subspace.

    For m examples (the paper: 100 safe completions), gᵢ = ∇_θ log π_θ(yᵢ|xᵢ) at θ* (masked: the
    block-wise restriction), zᵢ = S gᵢ ∈ ℝᵏ with the blockwise-generated random S (:func:`sketch`;
    the paper: k = 4096), then eigh of the k×k Fisher F_S = (1/m) Σ zᵢzᵢᵀ = S F̂ Sᵀ.
    With "jl" normalisation the nonzero eigenvalues of F_S are those of (1/m) G SᵀS Gᵀ, so by
    Ostrowski's theorem λ_j(F_S)/λ_j(F̂) ∈ [λ_min, λ_max] of W = (SV)ᵀ(SV) (V: an orthonormal basis of
    G's row space), a Wishart matrix with extremes (1 ± √(r/k))² + O(1/√k).

    Memory: example_batch_size × n for the gradients (lax.map over example chunks), block_size × k for
    the random block; never n × k. Parameter-space eigenvectors (return_vectors) cost one backward
    pass per vector through the batch: v_j ∝ Gᵀ u_j with u_j = Z w_j (the Gram identity), then
    orthonormalised; with r = rank(G) they span F̂'s range exactly.

    Args:
      logprob_fn: ``(params, batch) -> (m,)`` per-example log π(yᵢ|xᵢ); every leaf of ``batch`` has the
        example axis first.
      k: sketch dimension. num_eigs: r (default min(m, k)).
    """
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer; got {k!r}")
    check_mask(mask, params)
    m = jax.tree_util.tree_leaves(batch)[0].shape[0]
    r = min(m, k) if num_eigs is None else num_eigs
    if not 1 <= r <= min(m, k):
        raise ValueError(f"num_eigs must be in [1, min(m, k)={min(m, k)}]; got {num_eigs!r}")
    skw = dict(key=key, mask=mask, block_size=block_size, normalization=normalization)

    def one(ex):
        ex1 = tree_map(lambda x: x[None], ex)
        g = jax.grad(lambda p: logprob_fn(p, ex1)[0])(params)
        return sketch(g, k, **skw)

    Z = lax.map(one, batch, batch_size=example_batch_size)               # (m, k)
    FS = (Z.T @ Z) / m
    lam, W = jnp.linalg.eigh(0.5 * (FS + FS.T))
    lam, W = lam[::-1][:r], W[:, ::-1][:, :r]
    trace = jnp.sum(Z * Z) / m
    eigvecs = rayleigh = None
    if return_vectors:
        U = Z @ W                                                          # (m, r) ∝ Gram eigenvectors
        lp, f_vjp = jax.vjp(lambda p: logprob_fn(p, batch), params)
        Vt = jax.vmap(lambda u: apply_mask(mask, f_vjp(u.astype(lp.dtype))[0]))(U.T)
        flat_like, unravel = ravel_pytree(params)
        V = jax.vmap(lambda t: ravel_pytree(t)[0])(Vt)
        q, rr = jnp.linalg.qr(V.T)
        q = q * jnp.sign(jnp.diagonal(rr))[None, :]
        V = q.T
        eigvecs = jax.vmap(unravel)(V)
        _, f_jvp = jax.linearize(lambda p: logprob_fn(p, batch), params)
        JV = jax.vmap(lambda t: f_jvp(apply_mask(mask, t)))(eigvecs)        # (r, m)
        rayleigh = jnp.sum(JV * JV, axis=1) / m
    return RandomSubspaceFisher(lam, W, Z, eigvecs, rayleigh, trace)
