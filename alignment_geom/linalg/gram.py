"""Gram eigenpairs: the empirical Fisher F̂ = (1/m) GᵀG of m per-example gradients through its m×m Gram matrix.

When m ≪ n, K = (1/m) G Gᵀ = U Σ Uᵀ gives every nonzero eigenpair of F̂ exactly: (σ_j, Gᵀu_j/√(m σ_j)).
Cost O(m² n), memory m·n (what alignment-risk's SVD computes).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["gram_eigenpairs", "gram_eigenpairs_and_trace"]


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
    sig, V, res, _ = gram_eigenpairs_and_trace(grads, k, mean)
    return sig, V, res


def gram_eigenpairs_and_trace(grads, k, mean):
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
