"""Top-k eigenpairs of symmetric operators on pytrees (paper §3: F, its top-d eigenpairs, Mᵢ, Pᵢ).

Every solver takes a symmetric linear operator, either a :class:`~alignment_geom.linalg.LinearOperator` or a
*matvec* on pytrees ``matvec(v) -> A v`` with ``v`` shaped like ``like`` (typically θ*), e.g. the true Fisher
F (``curvature.linearized_fisher_vp``) or the Hessian H (``curvature.linearized_hvp``). Internally the vectors
are ravelled (``jax.flatten_util``) so the Krylov bases are plain ``(steps, n)`` arrays; results come back
as pytrees with a leading axis.

All solver loops run in ``lax.fori_loop`` / ``lax.while_loop`` / ``lax.map``: compile time does not grow
with the number of steps. Everything is jit-compatible (``k``, step counts, ``method`` and ``which`` are
static) and works with parameters sharded over several devices (XLA propagates the shardings through the
ravelled vectors).

    top_eigenpairs  Lanczos (partial or full re-orthogonalisation, tolerance stop; thick restart), LOBPCG
                    (jax.experimental.sparse.linalg.lobpcg_standard) or randomized subspace iteration.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.sparse.linalg import lobpcg_standard
from jax.flatten_util import ravel_pytree

from alignment_geom.linalg.operator import LinearOperator, operator_args
from alignment_geom.linalg.subspace import orthonormal_rows

PyTree = object

__all__ = ["SolverInfo", "top_eigenpairs"]


# --------------------------------------------------------------------------- helpers


class SolverInfo(NamedTuple):
    """Diagnostics of an eigensolver run (all jax arrays, so it can leave a jit).

    num_matvecs: operator applications used by the iteration (Krylov steps / block columns), not
        counting the ``k`` extra ones of the final exact residual check.
    num_iters: Lanczos steps, LOBPCG or subspace iterations.
    converged: whether the tolerance was met (True when no tolerance was asked).
    residual_estimates: (k,) the solver's own relative residual estimates (Lanczos: β_m|e_mᵀs|/|θ|).
    num_reorths: full-basis Lanczos: the steps that projected against the whole stored basis (all of them with
        ``reorth="full"``); None for the other solvers.
    """

    num_matvecs: jax.Array
    num_iters: jax.Array
    converged: jax.Array
    residual_estimates: jax.Array
    num_reorths: Optional[jax.Array] = None


def _unravel_rows(unravel, V):
    """The rows of V (k, n) as a pytree with a leading axis k. A lax.map over the rows: a vmapped unravel of a
    (k, n) array of Ritz vectors made XLA:CPU lay out the whole Krylov loop for its strided slices (6 s of an
    18 s top-20 Lanczos at n = 1M)."""
    return lax.map(unravel, V)


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
_RESIDUAL_BATCH = 8  # matvecs vmapped together in the final exact-residual check
_CHECK_BUCKETS = (32, 64, 128)  # sizes of T's leading block diagonalised by the Lanczos convergence test


def _lanczos_core(mv, q0, max_steps, *, key, mflat, k=1, tol=None, which="LA", check_every=1, min_steps=None,
                  gram_side=False, reorth="full"):
    """Lanczos with full or partial re-orthogonalisation in a lax.while_loop.

    Builds Q = [q_0 … q_{m}] (orthonormal rows) and the tridiagonal T_m (alpha, beta) with
    A Q_mᵀ = Q_mᵀ T_m + β_{m-1} q_m e_mᵀ. On breakdown (an invariant subspace, β ≈ 0) it continues
    from a fresh random vector orthogonal to Q, storing β = 0, so rank-deficient operators are handled.
    With ``tol`` it stops as soon as the k wanted Ritz pairs have relative residual estimates
    β_{m-1}|s_{m-1,i}|/|θ_i| ≤ tol (checked every ``check_every`` steps, never before ``min_steps``).

    The basis is stored in blocks of ``_BASIS_BLOCK`` rows, and step j projects only against the
    ⌈(j+1)/block⌉ blocks filled so far (a lax.fori_loop over blocks): the re-orthogonalisation
    cost grows with the steps actually taken, not with ``max_steps`` (one (S+1)×n matvec pass
    costs as much as all of them; benchmarks/spectral.py measures the step cost).

    ``reorth``: "full" projects every new vector against the whole basis (classical Gram–Schmidt, a second
    pass when the DGKS test ‖w'‖ < ‖w‖/√2 asks for it). "partial" (Simon's partial re-orthogonalisation,
    as in PROPACK) runs the three-term recurrence alone and tracks the loss of orthogonality
    ω_{j+1,i} ≈ q_{j+1}ᵀq_i through the recurrence that T_m satisfies,

        β_j ω_{j+1,i} = β_i ω_{j,i+1} + (α_i − α_j) ω_{j,i} + β_{i−1} ω_{j,i−1} − β_{j−1} ω_{j−1,i} + ϑ_{ji},

    with rounding terms |ϑ_{ji}| = 0.3 u (β_i + β_j) taken with the sign of the sum (an overestimate) and
    ω_{j+1,j} = 0.6 u √n ‖T‖/β_j. Only when max_i |ω_{j+1,i}| > √u does it project q_{j+1}, and then q_{j+2}
    too, against the whole basis (resetting their ω to 1.5 u). The basis then stays semi-orthogonal
    (|q_iᵀq_j| ≤ √u), which keeps the Ritz values and vectors of T_m as accurate as with full
    re-orthogonalisation (Simon 1984) while most steps skip the two passes over the stored rows.

    ``gram_side``: the operator is K = B Bᵀ of a factored A = BᵀB and the Ritz vectors will be mapped back as
    v = Bᵀu/√θ; then ‖Av − θv‖ = ‖Bᵀ(Ku − θu)‖/√θ ≤ √(λ_max/θ)‖Ku − θu‖, so each estimate is multiplied by
    √(θ_max/θ_i) before the test.

    Returns (alpha (S,), beta (S,), Q (R, n) with R ≥ S+1 rows, rows past m zero, m steps done,
    converged, number of steps that re-orthogonalised against the whole basis).
    """
    if reorth not in ("full", "partial"):
        raise ValueError(f"reorth must be 'full' or 'partial'; got {reorth!r}")
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

    # the convergence test diagonalises the leading c×c block of T for the smallest bucket c ≥ m (eigh's cost
    # grows as c³, so the early checks are cheap)
    buckets = [c for c in _CHECK_BUCKETS if k <= c < S] + [S]

    def check(alpha, beta, m):
        def at(c):
            def test():
                theta, s, valid = _tridiag_eig(alpha[:c], beta[:c], m)
                idx = _select(theta, k, which, valid)
                last = s[m - 1, idx]
                est = jnp.abs(beta[m - 1] * last) / jnp.maximum(jnp.abs(theta[idx]), jnp.finfo(dtype).tiny)
                if gram_side:
                    est = est * _gram_side_factor(theta, valid, idx)
                return jnp.all(est <= tol) & (m >= min_steps)
            return test

        return lax.switch(jnp.searchsorted(jnp.asarray(buckets), m), [at(c) for c in buckets])

    u = jnp.finfo(dtype).eps
    sqrt_u = jnp.sqrt(u)
    sqrt_n = float(np.sqrt(n))
    idx_all = jnp.arange(S + 1)

    def omega_next(om_prev, om_cur, alpha, beta, a, b, j, scale):
        """ω_{j+1,·} from ω_{j,·}, ω_{j−1,·} (length S+1, zero past their own index) and T's entries."""
        al = jnp.concatenate([alpha, jnp.zeros((1,), dtype)])
        be = jnp.concatenate([beta, jnp.zeros((1,), dtype)])
        cur_up = jnp.concatenate([om_cur[1:], jnp.zeros((1,), dtype)])        # ω_{j,i+1}
        cur_dn = jnp.concatenate([jnp.zeros((1,), dtype), om_cur[:-1]])       # ω_{j,i−1}
        be_dn = jnp.concatenate([jnp.zeros((1,), dtype), be[:-1]])            # β_{i−1}
        beta_jm1 = jnp.where(j > 0, beta[jnp.maximum(j - 1, 0)], 0.0)
        raw = be * cur_up + (al - a) * om_cur + be_dn * cur_dn - beta_jm1 * om_prev
        raw = raw + jnp.where(raw >= 0, 1.0, -1.0) * 0.3 * u * (be + b)
        bb = jnp.maximum(b, jnp.finfo(dtype).tiny)
        new = jnp.where(idx_all < j, raw / bb, 0.0)
        new = jnp.where(idx_all == j, 0.6 * u * sqrt_n * scale / bb, new)
        return jnp.where(idx_all == j + 1, 1.0, new)

    def cond(state):
        return (state[0] < S) & ~state[4]

    def body(state):
        j, Q, alpha, beta, _, scale, om_prev, om_cur, force, nre = state
        q = Q[j // B, j % B]
        w = mv(q)
        a = jnp.vdot(q, w)
        jp = jnp.maximum(j - 1, 0)
        w = w - a * q - jnp.where(j > 0, beta[jp], 0.0) * Q[jp // B, jp % B]
        n0 = jnp.linalg.norm(w)

        def full_pass(w):
            # classical Gram–Schmidt against the whole basis, repeated only when it cancelled much of w
            # (the DGKS criterion ‖w'‖ < ‖w‖/√2): two passes over Q per step instead of four, usually
            w = gram_schmidt(Q, w, j)
            n1 = jnp.linalg.norm(w)
            return lax.cond(n1 < 0.7071 * n0, lambda: gram_schmidt(Q, w, j), lambda: w)

        if reorth == "full":
            w = full_pass(w)
            did = jnp.asarray(True)
            om_new = om_cur
        else:
            sc = jnp.maximum(scale, jnp.maximum(jnp.abs(a), n0))
            om_new = omega_next(om_prev, om_cur, alpha, beta, a, n0, j, sc)
            lost = jnp.max(jnp.abs(jnp.where(idx_all <= j, om_new, 0.0))) > sqrt_u
            did = force | lost | (n0 <= eps_bd * sc)
            w = lax.cond(did, full_pass, lambda w: w, w)
        b = jnp.linalg.norm(w)
        scale = jnp.maximum(scale, jnp.maximum(jnp.abs(a), b))
        breakdown = b <= eps_bd * scale
        if reorth == "partial":  # a projected (or fresh, fully orthogonalised) q_{j+1}: ω back at rounding level
            om_new = jnp.where((did | breakdown) & (idx_all <= j), 1.5 * u, om_new)
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
        elif check_every == 1:
            done = check(alpha, beta, m)
        else:
            done = lax.cond(((m % check_every) == 0) & (m >= min_steps),
                            lambda: check(alpha, beta, m), lambda: jnp.asarray(False))
        # a triggered re-orthogonalisation is repeated once at the next step (q_{j+1} and q_{j+2}; Simon)
        force = did & ~force & ~breakdown
        return m, Q, alpha, beta, done, scale, om_cur, om_new, force, nre + did.astype(nre.dtype)

    om0 = jnp.zeros((S + 1,), dtype).at[0].set(1.0)
    state = (jnp.asarray(0), Q0, alpha0, beta0, jnp.asarray(False), jnp.zeros((), dtype), jnp.zeros((S + 1,), dtype),
             om0, jnp.asarray(False), jnp.asarray(0))
    m, Q, alpha, beta, done, _, _, _, _, nre = lax.while_loop(cond, body, state)
    converged = jnp.asarray(True) if tol is None else done
    return alpha, beta, Q.reshape(NB * B, n), m, converged, nre


def _gram_side_factor(theta, valid, idx):
    """√(θ_max/|θ_i|) for the selected Ritz values: the factor by which a Gram-side residual can grow when the
    Ritz vector is mapped back through Bᵀ (see ``_lanczos_core``)."""
    top = jnp.max(jnp.where(valid, jnp.abs(theta), 0.0))
    return jnp.sqrt(top / jnp.maximum(jnp.abs(theta[idx]), jnp.finfo(theta.dtype).tiny))


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


def _warm_vector(key, flat, mflat, X):
    """A start vector in span of the rows of X (b, n): Σ_i c_i x_i with Gaussian weights c (masked)."""
    q = jax.random.normal(key, (X.shape[0],), flat.dtype) @ X.astype(flat.dtype)
    return q if mflat is None else q * mflat


def _ritz_vectors(Sk, Q, m):
    """V = S_kᵀ Q_m (k, n) for the eigenvectors S_k (S, k) of T and the stored basis Q (R ≥ S rows), summed over
    the ``_BASIS_BLOCK``-row blocks that hold rows 0..m−1 (one (k×B)·(B×n) product per block; a single
    (k×R)·(R×n) product over the whole basis runs several times slower on XLA:CPU)."""
    R, n = Q.shape
    B = min(_BASIS_BLOCK, R)
    Sr = jnp.zeros((R, Sk.shape[1]), Sk.dtype).at[:Sk.shape[0]].set(Sk)   # rows ≥ S of Q are unused
    Qb, Sb = Q.reshape(R // B, B, n), Sr.reshape(R // B, B, -1)
    nblk = jnp.minimum((m + B - 1) // B, R // B)
    return lax.fori_loop(0, nblk, lambda c, V: V + Sb[c].T @ Qb[c], jnp.zeros((Sk.shape[1], n), Q.dtype))


def _lowdin(V):
    """Symmetric orthonormalisation V ← (V Vᵀ)^{-1/2} V of k nearly orthonormal rows (k, n): the closest
    orthonormal rows to V. Ritz vectors from a semi-orthogonal basis are orthonormal only to the basis' level
    (|q_iᵀq_j| ≤ √u); this moves each by O(‖VVᵀ − I‖), below the residual tolerances, for one k×k Gram
    matrix and one (k×k)·(k×n) product."""
    G = V @ V.T
    w, U = jnp.linalg.eigh(0.5 * (G + G.T))
    return (U * lax.rsqrt(jnp.maximum(w, jnp.finfo(V.dtype).tiny))) @ U.T @ V


def _lanczos_eigenpairs(mv, flat, mflat, k, key, num_steps, tol, which, check_every, X0=None, gram_side=False,
                        reorth="partial"):
    kq, kr = jax.random.split(key)
    q0 = _rand_like_flat(kq, flat, mflat) if X0 is None else _warm_vector(kq, flat, mflat, X0)
    alpha, beta, Q, m, converged, nre = _lanczos_core(mv, q0, num_steps, key=kr, mflat=mflat, k=k, tol=tol,
                                                      which=which, check_every=check_every, gram_side=gram_side,
                                                      reorth=reorth)
    theta, s, valid = _tridiag_eig(alpha, beta, m)
    idx = _select(theta, k, which, valid)
    lam = theta[idx]
    Sk = s[:, idx]                                    # (S, k)
    V = _ritz_vectors(Sk, Q, m)                       # (k, n) Ritz vectors
    if reorth == "partial":
        V = _lowdin(V)
    est = jnp.abs(beta[m - 1] * Sk[m - 1]) / jnp.maximum(jnp.abs(lam), jnp.finfo(flat.dtype).tiny)
    if gram_side:
        est = est * _gram_side_factor(theta, valid, idx)
    info = SolverInfo(num_matvecs=m, num_iters=m, converged=converged, residual_estimates=est, num_reorths=nre)
    return lam, V, info


def _gram_side_eigenpairs(op, k, key, num_steps, tol, which, check_every, X0=None, reorth="partial"):
    """Lanczos on the Gram side of a factored PSD operator A = BᵀB (B: ℝⁿ → ℝᴹ, M < n).

    K = B Bᵀ (M×M) has A's non-zero eigenvalues; for K u = λu with ‖u‖ = 1, v = Bᵀu/√λ is a unit eigenvector
    of A. Each Krylov step costs one B and one Bᵀ (as one A·v would), but the re-orthogonalisation runs on
    M-vectors instead of n-vectors, and the basis takes (steps + 1)·M memory. The stopping test bounds the
    residual of the mapped-back pairs (``_lanczos_core``'s ``gram_side``).
    """
    b, bt, uflat = op.factor_flat()
    Xd = None if X0 is None else jax.vmap(b)(X0.astype(uflat.dtype))
    lam, U, info = _lanczos_eigenpairs(lambda u: b(bt(u)), uflat, None, k, key, min(num_steps, uflat.shape[0]),
                                       tol, which, check_every, Xd, gram_side=True, reorth=reorth)
    V = jax.vmap(bt)(U)
    norms = jnp.linalg.norm(V, axis=1, keepdims=True)
    V = V / jnp.maximum(norms, jnp.finfo(V.dtype).tiny)
    # Bᵀ amplifies the Ritz vectors' departure from K's eigenvectors by up to √(θ₁/θ_i): re-orthonormalise here
    return lam, (_lowdin(V) if reorth == "partial" else V), info


# --------------------------------------------------------------------------- thick-restart Lanczos (bounded memory)


def _proj_eig(H, j):
    """Eigenpairs of the leading j×j block of the symmetrised projected matrix ½(H + Hᵀ) (static size p, dynamic
    j): the rest is replaced by a decoupled diagonal far below the spectrum. Returns (theta, s, valid)."""
    p = H.shape[0]
    i = jnp.arange(p)
    inside = i < j
    Hs = 0.5 * (H + H.T)
    Hs = jnp.where(inside[:, None] & inside[None, :], Hs, 0.0)
    bound = jnp.sum(jnp.abs(Hs)) + 1.0
    Hs = Hs + jnp.diag(jnp.where(inside, 0.0, -3.0 * bound))
    theta, s = jnp.linalg.eigh(Hs)
    valid = theta > -2.0 * bound
    return theta, jnp.where(inside[:, None], s, 0.0), valid


def _thick_restart_eigenpairs(mv, flat, mflat, k, key, basis_size, max_matvecs, tol, which, X0=None,
                              basis_dtype=None):
    """Thick-restart Lanczos (Wu–Simon; the symmetric Krylov–Schur method) with at most p = ``basis_size`` + 1
    stored basis vectors.

    Keeps A Q_jᵀ = Q_jᵀ H_j + β_j q_j e_jᵀ with Q's rows orthonormal (one classical Gram–Schmidt pass against
    the stored rows, a second only when the DGKS test ‖w'‖ < ‖w‖/√2 asks for it: two gemvs each on the
    preallocated (p+1)×n basis) and H = Q A Qᵀ (p×p: tridiagonal plus an arrow after a restart). When the
    basis is full, H = S Θ Sᵀ; if the k wanted Ritz pairs have |β_p s_{p,i}|/|θ_i| ≤ tol it stops, else it
    keeps the l = k + ⌊(p − k)/2⌋ best Ritz vectors Y = S_lᵀ Q_p and the residual direction q_p, sets
    H ← [Θ_l, b; bᵀ, ·] with b = β_p S_{p,l}, and continues the Lanczos recurrence from q_p. ``basis_dtype``
    (e.g. bfloat16) stores Q at lower precision (arithmetic in the operator's dtype); its Ritz values are then
    accurate to about the storage precision (the stored basis is orthonormal to O(u_basis) only).
    """
    n = flat.shape[0]
    dtype = flat.dtype
    p = basis_size
    l_keep = min(k + (p - k) // 2, p - 1)
    qdt = dtype if basis_dtype is None else jnp.dtype(basis_dtype)
    eps_bd = jnp.finfo(dtype).eps ** 0.75
    tiny = jnp.finfo(dtype).tiny
    kq, kr = jax.random.split(key)
    q0 = _rand_like_flat(kq, flat, mflat) if X0 is None else _warm_vector(kq, flat, mflat, X0)
    Q0 = jnp.zeros((p + 1, n), qdt).at[0].set((q0 / jnp.linalg.norm(q0)).astype(qdt))
    H0 = jnp.zeros((p + 1, p + 1), dtype)

    def gs(Q, w, j):
        rows = (jnp.arange(p + 1) <= j).astype(dtype)
        h = (Q.astype(dtype) @ w) * rows
        return w - h @ Q.astype(dtype), h

    def wanted(H, j):
        theta, s, valid = _proj_eig(H[:p, :p], j)
        idx = _select(theta, p, which, valid)
        return theta[idx], s[:, idx]

    def residual_est(theta, s, beta):
        return jnp.abs(beta * s[p - 1, :k]) / jnp.maximum(jnp.abs(theta[:k]), tiny)

    def cond(st):
        j, _, _, nmv, _, done, _ = st
        return (nmv < max_matvecs) & ~done

    def body(st):
        j, Q, H, nmv, nrs, _, scale = st
        q = Q[j].astype(dtype)
        w = mv(q)
        n0 = jnp.linalg.norm(w)
        w, h = gs(Q, w, j)
        n1 = jnp.linalg.norm(w)
        w, h = lax.cond(n1 < 0.7071 * n0, lambda: (lambda r: (r[0], h + r[1]))(gs(Q, w, j)), lambda: (w, h))
        b = jnp.linalg.norm(w)
        scale = jnp.maximum(scale, jnp.maximum(jnp.abs(h[j]), b))
        breakdown = b <= eps_bd * scale

        def fresh():
            r = _rand_like_flat(jax.random.fold_in(kr, nmv), flat, mflat)
            r = gs(Q, gs(Q, r, j)[0], j)[0]
            return r / jnp.linalg.norm(r)

        w_next = lax.cond(breakdown, fresh, lambda: w / b)
        b = jnp.where(breakdown, 0.0, b)
        H = H.at[:, j].set(h).at[j + 1, j].set(b)
        Q = Q.at[j + 1].set(w_next.astype(qdt))
        j = j + 1
        nmv = nmv + 1

        def restart(args):
            Q, H = args
            theta, s = wanted(H, p)
            beta = H[p, p - 1]
            ok = jnp.asarray(False) if tol is None else jnp.all(residual_est(theta, s, beta) <= tol)
            Y = (s[:, :l_keep].T @ Q[:p].astype(dtype)).astype(qdt)
            Qn = Q.at[:l_keep].set(Y).at[l_keep].set(Q[p]).at[l_keep + 1:].set(0)
            Hn = jnp.zeros_like(H).at[jnp.arange(l_keep), jnp.arange(l_keep)].set(theta[:l_keep])
            Hn = Hn.at[l_keep, :l_keep].set(beta * s[p - 1, :l_keep])
            # converged: keep the full basis (the Ritz vectors are formed once, after the loop)
            return lax.cond(ok, lambda: (jnp.asarray(p), Q, H, ok), lambda: (jnp.asarray(l_keep), Qn, Hn, ok))

        full = j == p
        j, Q, H, done = lax.cond(full, restart, lambda a: (j, a[0], a[1], jnp.asarray(False)), (Q, H))
        nrs = nrs + (full & ~done).astype(nrs.dtype)
        return j, Q, H, nmv, nrs, done, scale

    st = (jnp.asarray(0), Q0, H0, jnp.asarray(0), jnp.asarray(0), jnp.asarray(False), jnp.zeros((), dtype))
    j, Q, H, nmv, nrs, done, _ = lax.while_loop(cond, body, st)
    theta, s = wanted(H, j)
    beta = H[jnp.minimum(j, p), jnp.maximum(j - 1, 0)]
    lam = theta[:k]
    V = s[:, :k].T @ Q[:p].astype(dtype)
    sj = jnp.take(s, jnp.maximum(j - 1, 0), axis=0)[:k]
    est = jnp.abs(beta * sj) / jnp.maximum(jnp.abs(lam), tiny)
    converged = jnp.asarray(True) if tol is None else done
    info = SolverInfo(num_matvecs=nmv, num_iters=nrs, converged=converged, residual_estimates=est)
    return lam, V, info


# --------------------------------------------------------------------------- LOBPCG and randomized


def _lobpcg_eigenpairs(mv, flat, mflat, k, key, max_iters, tol):
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


def _randomized_eigenpairs(mv, flat, mflat, k, key, max_iters, tol, which, oversample, X_init=None):
    """Randomized subspace iteration with Rayleigh–Ritz (block of b = k + oversample, vmapped matvecs).

    Converges to the largest-|λ| eigenpairs (which="LA" equals "LM" for PSD operators such as F). ``X_init``
    (r, n): warm start, the first min(r, b) rows of the start block (the rest random).
    """
    b = k + oversample
    n = flat.shape[0]
    if b > n:
        b = n
    mvb = jax.vmap(mv)
    X0 = jax.vmap(lambda kk: _rand_like_flat(kk, flat, mflat))(jax.random.split(key, b))
    if X_init is not None:
        r = min(X_init.shape[0], b)
        Xi = X_init[:r].astype(flat.dtype)
        X0 = X0.at[:r].set(Xi if mflat is None else Xi * mflat)
    X0 = orthonormal_rows(X0)
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
        Xn = orthonormal_rows(AV)
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


def top_eigenpairs(matvec, like: PyTree = None, k: Optional[int] = None, *, key: jax.Array, method: str = "lanczos",
                   num_steps: Optional[int] = None, tol: Optional[float] = None, which: str = "LA",
                   mask: Optional[PyTree] = None, check_every: int = 1, max_iters: Optional[int] = None,
                   oversample: int = 10, init: Optional[PyTree] = None, return_info: bool = False,
                   basis_size: Optional[int] = None, basis_dtype=None, side: str = "auto", reorth: str = "partial"):
    """Top-k eigenpairs of a symmetric operator A given as a pytree matvec (e.g. F·v or H·v at θ*).

    A v_i = λ_i v_i, λ_1 ≥ … ≥ λ_k (which="LA": largest algebraic; "LM": largest |λ|, sorted by |λ|).

    Call forms: ``top_eigenpairs(operator, k, key=...)`` with a LinearOperator, or
    ``top_eigenpairs(matvec, like, k, key=...)`` with a matvec function.

    Args:
      matvec: a symmetric LinearOperator, or ``v -> A v`` on pytrees shaped like ``like`` (linear, symmetric).
      like: a pytree fixing the structure, shapes and dtype (e.g. θ*); omitted with an operator.
      k: number of eigenpairs (static).
      key: PRNG key for the start vector(s).
      method: "lanczos" (partial re-orthogonalisation, see ``reorth``; Ritz vectors from eigh of the tridiagonal T_m;
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
      init: optional warm start, a pytree shaped like ``like`` with a leading axis r (e.g. the eigvecs of an
        earlier call at a nearby operator): Lanczos starts from a random combination Σ_i c_i x_i of its rows,
        "randomized" puts them first in its start block. Not for LOBPCG. None = a random start.
      return_info: also return a :class:`SolverInfo` (matvecs used, convergence).
      basis_size: Lanczos only: bounded memory. None (default) keeps the whole Krylov basis (num_steps + 1
        vectors); an integer p (≥ k + 2; 2k + 1 is a good choice, ARPACK's default) runs thick-restart Lanczos
        with at most p + 1 stored vectors, restarting with the best k + ⌊(p − k)/2⌋ Ritz vectors each time the
        basis fills; ``num_steps`` is then the matvec budget (default 60·p) and convergence is checked once
        per restart cycle. info.num_iters counts the restarts.
      basis_dtype: with basis_size, the storage dtype of the basis (e.g. jnp.bfloat16 halves or quarters its
        memory; the Ritz values are then accurate to about that dtype's precision, the residuals returned are
        exact).
      side: Lanczos on a factored operator A = BᵀB (a LinearOperator with ``factor``, B: ℝⁿ → ℝᴹ, such as
        ``curvature.fisher(problem)``): "gram" runs the Krylov iteration on the M×M Gram side K = B Bᵀ (same
        non-zero spectrum; one B and one Bᵀ per step, re-orthogonalisation on M-vectors, basis (steps+1)·M;
        eigenvectors v = Bᵀu/√λ, so it needs λ_k > 0), "primal" on A itself, "auto" (default) the Gram side
        when the operator has a factor, M < n and k ≤ M (full-basis Lanczos only), else primal.

      reorth: full-basis Lanczos: "partial" (default; Simon's partial re-orthogonalisation: the loss of
        orthogonality is estimated from T_m's recurrence each step and the new vector is projected against the
        whole basis only when it exceeds √u, keeping the basis semi-orthogonal and the Ritz pairs as accurate
        as "full", at a fraction of the passes over the basis; the residual estimates then hold down to a floor
        of order |q_iᵀq_j|·λ₁/θ ≤ √u·λ₁/θ, and the returned residuals are exact either way) or "full" (every
        step; info.num_reorths counts the steps that projected).

    Returns:
      ``(eigvals (k,), eigvecs, residuals (k,))`` [+ ``info``]: eigvecs is a pytree shaped like
      ``like`` with a leading axis k, orthonormal in the Euclidean inner product; residuals are the
      exact relative residuals ‖A v_i − λ_i v_i‖/|λ_i| (k extra matvecs, vmapped 8 at a time).
    """
    if method not in ("lanczos", "lobpcg", "randomized"):
        raise ValueError(f"method must be 'lanczos', 'lobpcg' or 'randomized'; got {method!r}")
    if side not in ("auto", "gram", "primal"):
        raise ValueError(f"side must be 'auto', 'gram' or 'primal'; got {side!r}")
    if reorth not in ("full", "partial"):
        raise ValueError(f"reorth must be 'full' or 'partial'; got {reorth!r}")
    op = None
    if isinstance(matvec, LinearOperator):
        op = matvec if mask is None else matvec.with_mask(mask)
    mv, flat, unravel, mflat, like, mask, k = operator_args(matvec, like, k, mask)
    n = _check_common(k, which, like)
    X0 = None
    if init is not None:
        if method == "lobpcg":
            raise ValueError("init (a warm start) is supported by method='lanczos' and 'randomized', not 'lobpcg'")
        X0 = jax.vmap(lambda v: ravel_pytree(v)[0])(init)
        if X0.ndim != 2 or X0.shape[1] != flat.shape[0]:
            raise ValueError(f"init must be a pytree like the operator's vectors with a leading axis; got rows of "
                             f"size {X0.shape[1:]} for n={flat.shape[0]}")
    if method == "lobpcg" and which != "LA":
        raise ValueError("method='lobpcg' finds the largest algebraic eigenvalues only (which='LA')")
    if tol is not None and not tol > 0:
        raise ValueError(f"tol must be positive; got {tol!r}")
    if not jnp.issubdtype(flat.dtype, jnp.floating):
        raise ValueError(f"the operator's vectors must be floating point; got {flat.dtype}")
    if basis_size is not None or basis_dtype is not None:
        if method != "lanczos":
            raise ValueError("basis_size / basis_dtype (thick-restart Lanczos) need method='lanczos'")
        if basis_size is None:
            raise ValueError("basis_dtype needs basis_size (the bounded thick-restart mode)")
        if not isinstance(basis_size, (int, np.integer)) or not k + 2 <= basis_size <= n:
            raise ValueError(f"basis_size must be an integer in [k + 2, n] = [{k + 2}, {n}]; got {basis_size!r}")
        budget = 60 * int(basis_size) if num_steps is None else num_steps
        if not isinstance(budget, (int, np.integer)) or budget < basis_size:
            raise ValueError(f"num_steps (the matvec budget) must be an integer >= basis_size; got {num_steps!r}")
        lam, V, info = _thick_restart_eigenpairs(mv, flat, mflat, k, key, int(basis_size), int(budget), tol, which,
                                                 X0, basis_dtype)
    elif method == "lanczos":
        if num_steps is None:
            num_steps = min(n, max(3 * k, k + 40))
        if not isinstance(num_steps, (int, np.integer)) or num_steps < k:
            raise ValueError(f"num_steps must be an integer >= k={k}; got {num_steps!r}")
        num_steps = min(int(num_steps), n)
        factored = op is not None and op.factor is not None
        if side == "gram" and not factored:
            raise ValueError("side='gram' needs a LinearOperator with a factor (A = BᵀB)")
        if side == "gram" and k > op.factor.size:
            raise ValueError(f"side='gram': k={k} exceeds the factor's range dimension M={op.factor.size}")
        if side == "gram" or (side == "auto" and factored and k <= op.factor.size < n):
            lam, V, info = _gram_side_eigenpairs(op, k, key, num_steps, tol, which, check_every, X0, reorth)
        else:
            lam, V, info = _lanczos_eigenpairs(mv, flat, mflat, k, key, num_steps, tol, which, check_every, X0,
                                               reorth=reorth)
    elif method == "lobpcg":
        lam, V, info = _lobpcg_eigenpairs(mv, flat, mflat, k, key, 100 if max_iters is None else max_iters, tol)
    else:
        lam, V, info = _randomized_eigenpairs(mv, flat, mflat, k, key, 50 if max_iters is None else max_iters,
                                              tol, which, oversample, X0)
    # the k exact residuals, _RESIDUAL_BATCH matvecs vmapped at a time (k vmapped at once would hold k copies of
    # the operator's activations: 0.4 GB for the Section-7 study's k = 32 Fisher pairs)
    AV = lax.map(mv, V)
    res = jnp.linalg.norm(AV - lam[:, None] * V, axis=1) / jnp.maximum(jnp.abs(lam), jnp.finfo(flat.dtype).tiny)
    out = (lam, _unravel_rows(unravel, V), res)
    return out + (info,) if return_info else out
