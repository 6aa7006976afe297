"""The paper's random-subspace Fisher (§7): per-example gradients sketched into k dimensions.

    sketch, sketch_transpose, random_sketch_matrix
                              S v ∈ ℝᵏ and Sᵀ w for a k×n random matrix S generated blockwise from a key
    random_subspace_fisher    F_S = (1/m) Σᵢ (S gᵢ)(S gᵢ)ᵀ = S F̂ Sᵀ, gᵢ = ∇log π(yᵢ|xᵢ), and its eigenpairs
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree

from alignment_geom.tree import apply_mask, check_mask, mask_count, tree_map

PyTree = Any

__all__ = ["sketch", "sketch_transpose", "random_sketch_matrix", "RandomSubspaceFisher", "random_subspace_fisher"]


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
    scale = _sketch_scale(mask_count(mask, v), k, normalization)
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
    scale = _sketch_scale(mask_count(mask, like), k, normalization)
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
