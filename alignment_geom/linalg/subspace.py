"""Subspaces and spectra: projections, orthonormal bases, principal angles, cumulative energy, effective rank.

A *basis* is a pytree shaped like θ with a leading axis d (orthonormal rows u_1..u_d, e.g. the top-d
eigenvectors of the Fisher), or a (d, n) array.

    coordinates, project, project_out
                          (u_jᵀv)_j, P v = Σ_j (u_jᵀv) u_j and (I − P) v for an orthonormal basis
    orthonormal_rows      an orthonormal basis (rows) of the row space of a (b, n) matrix
    principal_angles      between two subspaces (pytrees with a leading axis, or (k, n) arrays)
    cumulative_energy     E_d = Σ_{j≤d} λ_j / total;  dim_for_energy: the smallest d with E_d ≥ threshold
    effective_rank        entropy, participation or stable rank of a PSD spectrum
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from alignment_geom.linalg.operator import as_matrix
from alignment_geom.tree import tree_map, tree_sub

__all__ = ["coordinates", "project", "project_out", "combine", "orthonormal_rows", "principal_angles",
           "cumulative_energy", "dim_for_energy", "effective_rank"]


def coordinates(basis, v) -> jax.Array:
    """(u_jᵀ v)_{j≤d}, shape (d,), for a basis pytree with a leading axis d and v shaped like one row."""
    ul = jax.tree_util.tree_leaves(basis)
    vl = jax.tree_util.tree_leaves(v)
    if len(ul) != len(vl):
        raise ValueError("basis and v have different tree structures")
    out = 0.0
    for u, x in zip(ul, vl):
        if u.shape[1:] != x.shape:
            raise ValueError(f"basis leaf shape {u.shape[1:]} (after the leading d axis) does not match {x.shape}")
        out = out + jnp.einsum("d...,...->d", u, x.astype(u.dtype))
    return out


def combine(basis, c):
    """Σ_j c_j u_j, a pytree shaped like one row of ``basis``."""
    return tree_map(lambda u: jnp.einsum("d,d...->...", c.astype(u.dtype), u), basis)


def project(basis, v):
    """P v = Σ_{j≤d} (u_jᵀv) u_j (orthonormal rows u_j)."""
    return combine(basis, coordinates(basis, v))


def project_out(basis, v):
    """(I − P) v = v − Σ_{j≤d} (u_jᵀv) u_j: the component of v outside span(basis)."""
    return tree_sub(v, project(basis, v))


def orthonormal_rows(Y):
    """Orthonormal rows spanning the rows of Y (b, n), via QR of Yᵀ."""
    q, _ = jnp.linalg.qr(Y.T)
    return q.T


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
    Qa = orthonormal_rows(A)
    Qb = orthonormal_rows(B)
    cos = jnp.linalg.svd(Qa @ Qb.T, compute_uv=False)                 # descending, k_b values
    cos = jnp.clip(cos, 0.0, 1.0)
    R = Qb - (Qb @ Qa.T) @ Qa
    # singular values of the wide (k_b, n) R via its (k_b, k_b) QR factor: LAPACK's wide-matrix SVD can
    # allocate an n×n workspace
    sin = jnp.sort(jnp.clip(jnp.linalg.svd(jnp.linalg.qr(R.T, mode="r"), compute_uv=False), 0.0, 1.0))
    return jnp.where(cos ** 2 < 0.5, jnp.arccos(cos), jnp.arcsin(sin))
