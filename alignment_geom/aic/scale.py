"""The safety Fisher and the overlap score at LLM scale, bounded in memory by one chunk of per-example gradients.

Notation: θ* the aligned parameters (n of them, or the n_M of a mask M), m safe completions (xᵢ, yᵢ) with
per-example gradients gᵢ = ∇_θ log π_θ*(yᵢ | xᵢ), G = [g₁ … g_m]ᵀ (m × n), the empirical Fisher
F̂ = (1/m) GᵀG, P the projector onto its top-d eigenvectors u₁..u_d, and the overlap score
OS(Δθ) = ‖P Δθ‖ / ‖Δθ‖. At paper scale (n ≈ 2–3·10⁹, m = 100, k = 4096) neither G nor an m × k sketch
of dense columns, nor d parameter-space eigenvectors, fit beside the model, so nothing here stores more than
``chunk`` gradients at a time:

* :func:`sketched_gradients` / :func:`subspace_fisher` — the paper's estimator: zᵢ = S gᵢ ∈ ℝᵏ for the random
  k × n matrix S of :func:`alignment_geom.linalg.sketch` (generated blockwise from a key, so every device and
  every chunking sees the same S), the gradients formed ``chunk`` at a time (``lax.map`` over chunks, ``vmap``
  inside), then the eigenpairs of F_S = (1/m) ZᵀZ = S F̂ Sᵀ (k × k; computed from the m × m Z Zᵀ when m < k,
  which has the same nonzero eigenpairs). :func:`subspace_overlap`: OS_S = ‖W_dᵀ S Δθ‖ / ‖S Δθ‖ with W_d the
  top-d eigenvectors of F_S.
* :func:`gram_fisher` / :func:`gram_overlap` — exact: F̂ has rank ≤ m, and with K = (1/m) G Gᵀ = U Σ Uᵀ its
  nonzero eigenpairs are (σ_j, v_j = Gᵀu_j / √(m σ_j)). K is built block by block, K[a, b] = (1/m) G_a G_bᵀ,
  from the gradients of chunk a and one jvp of chunk b's log-likelihoods along each of them (G_b g = J_b g).
  Then v_jᵀΔθ = u_jᵀ (G Δθ) / √(m σ_j), and G Δθ = J Δθ is one jvp (batched over several Δθ), so
  ‖P Δθ‖² = Σ_{j≤d} (u_jᵀ J Δθ)² / (m σ_j) without any parameter-space eigenvector.
* :func:`true_fisher_eigenpairs` — the true Fisher F = E Jᵀ(diag p − ppᵀ)J by Lanczos (memory: the Krylov
  basis, ``num_steps`` + 1 vectors of the masked parameters; see ``models.memory.estimate_memory(op="lanczos")``).

Every function is a pure function of (params, batch) and jit-compatible; shard the batch's example axis and/or
the parameters over a mesh and XLA partitions the same computation (the sketch is generated from the key, not
from device-local state), so a sharded run equals an unsharded one.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from alignment_geom.aic.subspace import SensitiveSubspace
from alignment_geom.curvature.fisher import linearized_fisher_vp
from alignment_geom.linalg.eigen import top_eigenpairs
from alignment_geom.linalg.sketch import sketch
from alignment_geom.tree import apply_mask, check_mask, tree_map

PyTree = Any

__all__ = ["chunk_batch", "sketched_gradients", "SubspaceFisher", "subspace_fisher", "subspace_overlap",
           "GramFisher", "gram_fisher", "gram_jvp", "gram_coordinates", "gram_overlap", "true_fisher_eigenpairs",
           "basis_bytes"]


def _num_examples(batch) -> int:
    leaves = jax.tree_util.tree_leaves(batch)
    if not leaves:
        raise ValueError("batch has no arrays")
    return int(np.shape(leaves[0])[0])


def chunk_batch(batch, chunk: int):
    """(chunks, valid): every leaf (m, …) padded to nc·c rows (repeating the last example) and reshaped to
    (nc, c, …), and valid (nc, c) float, 1 on real examples and 0 on the padding."""
    if not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    m = _num_examples(batch)
    c = min(int(chunk), m)
    nc = -(-m // c)
    pad = nc * c - m

    def one(x):
        x = jnp.asarray(x)
        if pad:
            x = jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)])
        return x.reshape((nc, c) + x.shape[1:])

    valid = (jnp.arange(nc * c) < m).reshape(nc, c)
    return tree_map(one, batch), valid


def _example_grad(logprob_fn, params, ex, mask):
    """gᵢ = ∇_θ log π(yᵢ | xᵢ) (masked) for one example ``ex`` (leaves without the example axis)."""
    ex1 = tree_map(lambda x: x[None], ex)
    return apply_mask(mask, jax.grad(lambda p: logprob_fn(p, ex1)[0])(params))


def _chunk_grads(logprob_fn, params, chunk_ex, valid, mask):
    """The c gradients of one chunk (leading axis c), zero on padding rows."""
    g = jax.vmap(lambda ex: _example_grad(logprob_fn, params, ex, mask))(chunk_ex)
    return tree_map(lambda x: x * valid.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype), g)


# --------------------------------------------------------------------------- the paper's random subspace


def sketched_gradients(logprob_fn: Callable, params: PyTree, batch: Any, k: int, *, key: jax.Array,
                       mask: Optional[PyTree] = None, chunk: int = 8, block_size: int = 65536,
                       normalization: str = "jl") -> jax.Array:
    """Z (m, k), zᵢ = S gᵢ: the per-example gradients in the random k-dimensional subspace of
    :func:`~alignment_geom.linalg.sketch` (same key ⇒ same S), formed ``chunk`` gradients at a time.

    ``logprob_fn(params, batch) -> (B,)`` per-example log π(y | x); every leaf of ``batch`` has the example
    axis first. Memory: ``chunk`` gradients plus one (block_size, k) block of S."""
    check_mask(mask, params)
    m = _num_examples(batch)
    chunks, valid = chunk_batch(batch, chunk)
    skw = dict(key=key, mask=mask, block_size=block_size, normalization=normalization)

    def one(args):
        ex, v = args
        g = _chunk_grads(logprob_fn, params, ex, v, mask)
        return jax.vmap(lambda gi: sketch(gi, k, **skw))(g)

    Z = lax.map(one, (chunks, valid))
    return Z.reshape((-1, k))[:m]


class SubspaceFisher(NamedTuple):
    """The random-subspace Fisher F_S = (1/m) ZᵀZ = S F̂ Sᵀ (k × k).

    eigvals (r,): its largest r = min(m, k) eigenvalues, descending. W (k, r): their eigenvectors (coordinates
    in the random subspace). Z (m, k): the sketched gradients. trace: (1/m)‖Z‖²_F (≈ tr F̂ for "jl")."""
    eigvals: jax.Array
    W: jax.Array
    Z: jax.Array
    trace: jax.Array


def _subspace_eigh(Z):
    m, k = Z.shape
    if m < k:   # ZᵀZ/m and ZZᵀ/m share their nonzero eigenvalues; ZᵀZ w = σ w with w = Zᵀu / ‖Zᵀu‖
        K = (Z @ Z.T) / m
        sig, U = jnp.linalg.eigh(0.5 * (K + K.T))
        sig, U = sig[::-1], U[:, ::-1]
        W = Z.T @ U
        W = W / jnp.maximum(jnp.linalg.norm(W, axis=0, keepdims=True), jnp.finfo(Z.dtype).tiny)
        return sig, W
    FS = (Z.T @ Z) / m
    sig, W = jnp.linalg.eigh(0.5 * (FS + FS.T))
    return sig[::-1][:m], W[:, ::-1][:, :m]


def subspace_fisher(logprob_fn: Callable, params: PyTree, batch: Any, k: int = 4096, *, key: jax.Array,
                    mask: Optional[PyTree] = None, chunk: int = 8, block_size: int = 65536,
                    normalization: str = "jl") -> SubspaceFisher:
    """The paper's estimator: Z = :func:`sketched_gradients`, then the eigenpairs of F_S = (1/m) ZᵀZ."""
    Z = sketched_gradients(logprob_fn, params, batch, k, key=key, mask=mask, chunk=chunk, block_size=block_size,
                           normalization=normalization)
    sig, W = _subspace_eigh(Z)
    return SubspaceFisher(sig, W, Z, jnp.sum(Z * Z) / Z.shape[0])


def subspace_overlap(sf: SubspaceFisher, deltas: PyTree, d: int, *, key: jax.Array, mask: Optional[PyTree] = None,
                     block_size: int = 65536, normalization: str = "jl") -> jax.Array:
    """OS_S = ‖W_dᵀ S Δθ‖ / ‖S Δθ‖ (N,): the overlap score in the random subspace (same key and sketch settings
    as ``sf``) of N updates stacked on the leading axis of ``deltas``."""
    k = sf.Z.shape[1]
    skw = dict(key=key, mask=mask, block_size=block_size, normalization=normalization)
    Wd = sf.W[:, :d]

    def one(dl):
        z = sketch(dl, k, **skw)
        return jnp.linalg.norm(Wd.T @ z) / jnp.linalg.norm(z)

    return jax.vmap(one)(deltas)


# --------------------------------------------------------------------------- exact: the m × m Gram matrix


class GramFisher(NamedTuple):
    """The exact empirical Fisher F̂ = (1/m) GᵀG through K = (1/m) G Gᵀ = U Σ Uᵀ (m × m).

    eigvals (m,): σ_j descending (the nonzero eigenvalues of F̂, and zeros). U (m, m): eigenvectors of K.
    K (m, m): the Gram matrix. trace: tr F̂ = tr K."""
    eigvals: jax.Array
    U: jax.Array
    K: jax.Array
    trace: jax.Array


def gram_fisher(logprob_fn: Callable, params: PyTree, batch: Any, *, mask: Optional[PyTree] = None,
                chunk: int = 8) -> GramFisher:
    """K = (1/m) G Gᵀ block by block and its eigendecomposition (exact F̂ eigenvalues, no n-sized storage
    beyond one chunk of gradients).

    For each chunk a (``lax.map``) the c gradients G_a are formed (vmap of grad); for each chunk b (an inner
    ``lax.map``) the block G_b G_aᵀ is the jvp of chunk b's log-likelihoods along each row of G_a (vmap of jvp).
    Cost: m gradients and m²/c jvps of c examples; memory: c gradients and c tangents of one chunk."""
    check_mask(mask, params)
    m = _num_examples(batch)
    chunks, valid = chunk_batch(batch, chunk)

    def row_block(args):
        ex_a, v_a = args
        Ga = _chunk_grads(logprob_fn, params, ex_a, v_a, mask)

        def col_block(args_b):
            ex_b, v_b = args_b
            f = (lambda p: logprob_fn(p, ex_b))
            out = jax.vmap(lambda g: jax.jvp(f, (params,), (g,))[1])(Ga)      # (c_a, c_b) = G_a G_bᵀ
            return out * v_b[None, :].astype(out.dtype)

        return lax.map(col_block, (chunks, valid))                           # (nc, c_a, c_b)

    blocks = lax.map(row_block, (chunks, valid))                             # (nc_a, nc_b, c_a, c_b)
    nc, c = valid.shape
    K = blocks.transpose(0, 2, 1, 3).reshape(nc * c, nc * c)[:m, :m] / m
    K = 0.5 * (K + K.T)
    sig, U = jnp.linalg.eigh(K)
    return GramFisher(sig[::-1], U[:, ::-1], K, jnp.trace(K))


def gram_jvp(logprob_fn: Callable, params: PyTree, batch: Any, deltas: PyTree, *, mask: Optional[PyTree] = None,
             chunk: int = 8) -> jax.Array:
    """J Δθ = G Δθ (N, m) for N updates stacked on the leading axis of ``deltas`` (masked): one batched jvp
    per chunk of examples."""
    m = _num_examples(batch)
    chunks, valid = chunk_batch(batch, chunk)
    deltas = jax.vmap(lambda t: apply_mask(mask, t))(deltas)

    def one(args):
        ex, v = args
        f = (lambda p: logprob_fn(p, ex))
        return jax.vmap(lambda t: jax.jvp(f, (params,), (t,))[1])(deltas) * v[None, :]

    out = lax.map(one, (chunks, valid))                                      # (nc, N, c)
    N = out.shape[1]
    return out.transpose(1, 0, 2).reshape(N, -1)[:, :m]


def gram_coordinates(gf: GramFisher, jd: jax.Array, d: int) -> jax.Array:
    """(v_jᵀΔθ)_{j≤d} = u_jᵀ (J Δθ) / √(m σ_j) from ``jd`` = J Δθ (…, m) (:func:`gram_jvp`); shape (…, d)."""
    m = gf.U.shape[0]
    sig = gf.eigvals[:d]
    scale = 1.0 / jnp.sqrt(jnp.maximum(m * sig, jnp.finfo(sig.dtype).tiny))
    return (jd @ gf.U[:, :d]) * scale


def gram_overlap(logprob_fn: Callable, params: PyTree, batch: Any, gf: GramFisher, deltas: PyTree, d: int, *,
                 mask: Optional[PyTree] = None, chunk: int = 8) -> jax.Array:
    """OS = ‖P Δθ‖ / ‖Δθ‖ (N,) exactly, P the projector onto F̂'s top-d eigenvectors, for N updates stacked on
    the leading axis of ``deltas``: ‖P Δθ‖² = Σ_{j≤d} (u_jᵀ J Δθ)² / (m σ_j). With a mask, Δθ is its masked
    part (the parameters the Fisher is measured on) in numerator and denominator."""
    if not 1 <= d <= gf.U.shape[0]:
        raise ValueError(f"d must be in [1, m={gf.U.shape[0]}], got {d!r}")
    jd = gram_jvp(logprob_fn, params, batch, deltas, mask=mask, chunk=chunk)
    coords = gram_coordinates(gf, jd, d)
    masked = jax.vmap(lambda t: apply_mask(mask, t))(deltas)
    norms = jnp.sqrt(sum(jnp.sum(jnp.square(x.reshape(x.shape[0], -1)), axis=1)
                         for x in jax.tree_util.tree_leaves(masked)))
    return jnp.linalg.norm(coords, axis=-1) / norms


# --------------------------------------------------------------------------- the true Fisher by Lanczos


def true_fisher_eigenpairs(logits_fn: Callable, params: PyTree, inputs: Any, d: int, *, key: jax.Array,
                           mask: Optional[PyTree] = None, num_steps: Optional[int] = None) -> SensitiveSubspace:
    """The top-d eigenpairs of the true Fisher F = E Jᵀ(diag p − ppᵀ)J of the completion logits (Lanczos with
    full re-orthogonalisation on the masked parameters; memory (num_steps + 1) masked vectors: restrict the
    mask, e.g. to LoRA adapters, at scale)."""
    mv = linearized_fisher_vp(logits_fn, params, inputs, mask)
    lam, V, res = top_eigenpairs(mv, params, d, key=key, num_steps=num_steps, mask=mask)
    return SensitiveSubspace(V, lam, res)


def basis_bytes(params: PyTree, vectors: int, *, mask: Optional[PyTree] = None, dtype=None) -> int:
    """Bytes of ``vectors`` parameter-shaped vectors (a Lanczos basis), counting masked leaves only."""
    leaves = jax.tree_util.tree_leaves(params)
    mleaves = [True] * len(leaves) if mask is None else jax.tree_util.tree_leaves(mask)
    total = 0
    for x, mm in zip(leaves, mleaves):
        if bool(np.any(np.asarray(mm))):
            total += int(np.prod(np.shape(x))) * jnp.dtype(dtype or x.dtype).itemsize
    return int(total) * int(vectors)
