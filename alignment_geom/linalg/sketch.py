"""The paper's random-subspace Fisher (§7): per-example gradients sketched into k dimensions.

    GaussianSketch, SparseSign, CountSketch, as_sketch
                              k×n random sketches S as small objects (apply: S v, apply_batch: S vᵢ for a
                              leading axis, transpose: Sᵀ w, matrix: the dense S for small n)
    sketch, sketch_transpose, random_sketch_matrix
                              S v ∈ ℝᵏ and Sᵀ w; ``kind`` selects the sketch (dense Gaussian by default)
    random_subspace_fisher    F_S = (1/m) Σᵢ (S gᵢ)(S gᵢ)ᵀ = S F̂ Sᵀ, gᵢ = ∇log π(yᵢ|xᵢ), and its eigenpairs

Every sketch is a pure function of (key, k, its hyper-parameters, the tree structure and leaf shapes):
the dense Gaussian draws its (block, k) slabs from fold_in(fold_in(key, leaf), block); the sparse sketches
hash the GLOBAL flat index of each coordinate inside its leaf, so the matrix is the same whether θ is
sharded over devices or not. All kinds satisfy E SᵀS = I_n ("jl" normalisation) and, for any n×r
orthonormal V, E‖(SV)ᵀ(SV) − I_r‖²_F ≤ r(r+1)/k (equality for the Gaussian), the second-moment bound
behind their distortion guarantees.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree

from alignment_geom.tree import apply_mask, check_mask, mask_count, tree_map

PyTree = Any

__all__ = ["GaussianSketch", "SparseSign", "CountSketch", "as_sketch", "SKETCH_KINDS", "sketch_hash",
           "sketch", "sketch_transpose", "random_sketch_matrix", "RandomSubspaceFisher", "random_subspace_fisher"]

SKETCH_KINDS = ("gaussian", "sparse_sign", "countsketch")


def _leaf_keys(key, n_leaves):
    return [jax.random.fold_in(key, i) for i in range(n_leaves)]


def _static_included(mm) -> bool:
    """False only for mask leaves that are statically all False (those leaves are skipped)."""
    if mm is None:
        return True
    if isinstance(mm, (bool, np.bool_)):
        return bool(mm)
    if isinstance(mm, jax.core.Tracer):
        return True
    try:
        return bool(np.any(np.asarray(mm)))
    except Exception:  # noqa: BLE001 - traced masks: keep the leaf
        return True


def _mask_leaves(mask, n):
    return [None] * n if mask is None else jax.tree_util.tree_leaves(mask)


def _norm_scale(normalization, n_eff, k):
    """Factor turning the "jl" sketch (E SᵀS = I) into the requested normalisation."""
    if normalization == "jl":
        return 1.0
    if normalization == "subspace":
        return math.sqrt(k / max(n_eff, 1))
    raise ValueError(f"normalization must be 'jl' or 'subspace'; got {normalization!r}")


# --------------------------------------------------------------------------- dense Gaussian (reference)


class GaussianSketch(NamedTuple):
    """Dense S with i.i.d. N(0, s²) entries, s² = 1/k ("jl": E SᵀS = I_n) or 1/n ("subspace": rows of S ≈
    orthonormal), generated in (block_size, k) slabs from fold_in(fold_in(key, leaf), block) and never held
    whole. Cost per vector: n·k normal draws and 2nk flops (``apply_batch`` draws each slab once per batch).
    """

    k: Optional[int] = None
    key: Any = None
    block_size: int = 65536
    normalization: str = "jl"

    name = "gaussian"

    def _plan(self, like, mask):
        leaves = jax.tree_util.tree_leaves(like)
        plan = []
        for x, mm in zip(leaves, _mask_leaves(mask, len(leaves))):
            size = int(np.prod(jnp.shape(x)))
            b = max(1, min(self.block_size, size))
            plan.append((size, b, -(-size // b), _static_included(mm)))
        return plan

    def _scale(self, like, mask):
        return _norm_scale(self.normalization, mask_count(mask, like), self.k) / math.sqrt(self.k)

    def apply_batch(self, V: PyTree, mask: Optional[PyTree] = None) -> jax.Array:
        """S vᵢ for every row of V (a pytree whose leaves carry a leading axis B): (B, k)."""
        leaves = jax.tree_util.tree_leaves(V)
        like = tree_map(lambda x: x[0], V)
        plan = self._plan(like, mask)
        scale = self._scale(like, mask)
        V = apply_mask(mask, V) if mask is None else jax.vmap(lambda v: apply_mask(mask, v))(V)
        leaves = jax.tree_util.tree_leaves(V)
        dtype = jnp.result_type(*leaves)
        B = leaves[0].shape[0]
        out = jnp.zeros((B, self.k), dtype)
        for key_l, x, (size, b, nb, inc) in zip(_leaf_keys(self.key, len(leaves)), leaves, plan):
            if not inc:
                continue
            xf = jnp.pad(x.reshape(B, -1).astype(dtype), ((0, 0), (0, nb * b - size))).reshape(B, nb, b)

            def step(acc, c, xf=xf, key_l=key_l, b=b):
                blk = jax.random.normal(jax.random.fold_in(key_l, c), (b, self.k), dtype) * scale
                return acc + lax.dynamic_index_in_dim(xf, c, axis=1, keepdims=False) @ blk, None

            out, _ = lax.scan(step, out, jnp.arange(nb))
        return out

    def apply(self, v: PyTree, mask: Optional[PyTree] = None) -> jax.Array:
        """S v ∈ ℝᵏ."""
        return self.apply_batch(tree_map(lambda x: x[None], v), mask)[0]

    def transpose(self, w: jax.Array, like: PyTree, mask: Optional[PyTree] = None) -> PyTree:
        """Sᵀ w, a pytree shaped like ``like`` (the adjoint of :meth:`apply`)."""
        leaves, treedef = jax.tree_util.tree_flatten(like)
        plan = self._plan(like, mask)
        scale = self._scale(like, mask)
        outs = []
        for key_l, x, (size, b, nb, inc) in zip(_leaf_keys(self.key, len(leaves)), leaves, plan):
            if not inc:
                outs.append(jnp.zeros_like(x))
                continue

            def one(c, key_l=key_l, b=b):
                return (jax.random.normal(jax.random.fold_in(key_l, c), (b, self.k), w.dtype) * scale) @ w

            blocks = lax.map(one, jnp.arange(nb))
            outs.append(blocks.reshape(-1)[:size].reshape(jnp.shape(x)).astype(x.dtype))
        return apply_mask(mask, jax.tree_util.tree_unflatten(treedef, outs))

    def matrix(self, like: PyTree, mask: Optional[PyTree] = None) -> jax.Array:
        """The dense k×n matrix (ravel_pytree order; tests and small n only)."""
        return _matrix(self, like, mask)


# --------------------------------------------------------------------------- hashed sparse sketches

_M1 = 0x7FEB352D
_M2 = 0x846CA68B
_GOLD = 0x9E3779B9


def _mix32(x):
    """A bijective 32-bit integer hash (xorshift-multiply; uint32 wrap-around arithmetic)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(_M1)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(_M2)
    return x ^ (x >> 16)


def sketch_hash(index, seed_a, seed_b):
    """h(i) = mix(mix(i ⊕ a) + b) for uint32 global indices i and the seeds (a, b): the row hash of the sparse
    sketches; their sign hash is mix(h(i) + 0x9E3779B9), sign = +1 when its top bit is 0."""
    h = _mix32(_mix32(index ^ seed_a) + seed_b)
    return h, _mix32(h + jnp.uint32(_GOLD))


def _block_rows(k, s):
    """Row counts of the s row blocks (sizes differ by at most one) and their offsets."""
    sizes = [k // s + (1 if j < k % s else 0) for j in range(s)]
    return sizes, list(np.cumsum([0] + sizes[:-1]))


class SparseSign(NamedTuple):
    """OSNAP-style sparse sign sketch: every column of S has exactly s nonzeros ±1/√s, one in each of s row
    blocks of ≈ k/s rows. For coordinate i of leaf ℓ (i: its flat index in the whole leaf), block j puts
    sign_j(i)/√s at row off_j + h_j(i) mod k_j, with (h_j, sign_j) = :func:`sketch_hash` of i under the seeds
    jax.random.bits(fold_in(fold_in(key, ℓ), j), (2,), uint32). So every column has unit norm (diag SᵀS = 1),
    E SᵀS = I, and E‖(SV)ᵀ(SV) − I‖²_F ≤ r(r+1)/k for orthonormal V (n×r); s ≈ log(r/δ) sharpens the tail.
    Cost per vector: s·n hashed scatter-adds (``apply_batch`` moves the B examples of a coordinate together),
    no random draws, no flops in k.
    """

    k: Optional[int] = None
    key: Any = None
    s: int = 4
    normalization: str = "jl"

    name = "sparse_sign"

    def _check(self):
        if not isinstance(self.s, (int, np.integer)) or not 1 <= self.s <= self.k:
            raise ValueError(f"sparse sketch needs 1 <= s <= k={self.k}; got s={self.s!r}")

    def _seeds(self, n_leaves):
        return [[jax.random.bits(jax.random.fold_in(kl, j), (2,), jnp.uint32) for j in range(self.s)]
                for kl in _leaf_keys(self.key, n_leaves)]

    def _hashes(self, size, seeds, dtype):
        """Per block j: (rows (size,) int32, signs (size,) dtype) for the global indices 0..size−1 of one leaf."""
        sizes, offs = _block_rows(self.k, self.s)
        idx = jnp.arange(size, dtype=jnp.uint32)
        out = []
        for j in range(self.s):
            h, g = sketch_hash(idx, seeds[j][0], seeds[j][1])
            rows = (h % jnp.uint32(sizes[j])).astype(jnp.int32) + offs[j]
            signs = jnp.where((g >> 31) == 0, 1.0, -1.0).astype(dtype)
            out.append((rows, signs))
        return out

    def _scale(self, like, mask):
        return _norm_scale(self.normalization, mask_count(mask, like), self.k) / math.sqrt(self.s)

    def apply_batch(self, V: PyTree, mask: Optional[PyTree] = None) -> jax.Array:
        """S vᵢ for every row of V (leaves with a leading axis B): (B, k)."""
        self._check()
        like = tree_map(lambda x: x[0], V)
        scale = self._scale(like, mask)
        V = V if mask is None else jax.vmap(lambda v: apply_mask(mask, v))(V)
        leaves = jax.tree_util.tree_leaves(V)
        dtype = jnp.result_type(*leaves)
        B = leaves[0].shape[0]
        out = jnp.zeros((self.k, B), dtype)
        for x, seeds, mm in zip(leaves, self._seeds(len(leaves)), _mask_leaves(mask, len(leaves))):
            if not _static_included(mm):
                continue
            xt = x.reshape(B, -1).astype(dtype).T                       # (size, B): a coordinate's B values
            for rows, signs in self._hashes(xt.shape[0], seeds, dtype):  # contiguous in the scatter
                out = out.at[rows].add(xt * signs[:, None], indices_are_sorted=False, unique_indices=False)
        return (out * scale).T

    def apply(self, v: PyTree, mask: Optional[PyTree] = None) -> jax.Array:
        """S v ∈ ℝᵏ."""
        return self.apply_batch(tree_map(lambda x: x[None], v), mask)[0]

    def transpose(self, w: jax.Array, like: PyTree, mask: Optional[PyTree] = None) -> PyTree:
        """Sᵀ w: coordinate i gets Σ_j sign_j(i) w[row_j(i)]/√s (a gather of the k-vector)."""
        self._check()
        leaves, treedef = jax.tree_util.tree_flatten(like)
        scale = self._scale(like, mask)
        outs = []
        for x, seeds, mm in zip(leaves, self._seeds(len(leaves)), _mask_leaves(mask, len(leaves))):
            size = int(np.prod(jnp.shape(x)))
            if not _static_included(mm):
                outs.append(jnp.zeros_like(x))
                continue
            acc = sum(signs * w[rows] for rows, signs in self._hashes(size, seeds, w.dtype))
            outs.append((acc * scale).reshape(jnp.shape(x)).astype(x.dtype))
        return apply_mask(mask, jax.tree_util.tree_unflatten(treedef, outs))

    def matrix(self, like: PyTree, mask: Optional[PyTree] = None) -> jax.Array:
        """The dense k×n matrix (ravel_pytree order; tests and small n only)."""
        return _matrix(self, like, mask)


def CountSketch(k: Optional[int] = None, key: Any = None, normalization: str = "jl") -> SparseSign:
    """CountSketch (Charikar–Chen–Farach-Colton; Clarkson–Woodruff): the s = 1 :class:`SparseSign`, one ±1 per
    column at a hashed row. Cheapest; its distortion has only the second-moment bound (δ ∝ r²/(k ε²))."""
    return SparseSign(k, key, 1, normalization)


Sketch = Union[GaussianSketch, SparseSign]


def _matrix(sk, like, mask):
    flat, unravel = ravel_pytree(like)
    eye = jnp.eye(flat.shape[0], dtype=flat.dtype)
    return sk.apply_batch(jax.vmap(unravel)(eye), mask).T


def as_sketch(kind: Union[str, Sketch], k: int, key: jax.Array, *, block_size: int = 65536,
              normalization: str = "jl") -> Sketch:
    """The sketch object for ``kind`` ("gaussian", "sparse_sign", "countsketch", or a sketch object whose other
    hyper-parameters are kept) with this k, key and normalisation."""
    if isinstance(kind, str):
        if kind == "gaussian":
            return GaussianSketch(k, key, block_size, normalization)
        if kind == "sparse_sign":
            return SparseSign(k, key, 4, normalization)
        if kind == "countsketch":
            return SparseSign(k, key, 1, normalization)
        raise ValueError(f"sketch kind must be one of {SKETCH_KINDS} or a sketch object; got {kind!r}")
    if isinstance(kind, GaussianSketch):
        return kind._replace(k=k, key=key, normalization=normalization)
    if isinstance(kind, SparseSign):
        return kind._replace(k=k, key=key, normalization=normalization)
    raise ValueError(f"sketch kind must be one of {SKETCH_KINDS} or a sketch object; got {kind!r}")


def _check_k(k):
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer; got {k!r}")


def sketch(v: PyTree, k: int, *, key: jax.Array, mask: Optional[PyTree] = None, block_size: int = 65536,
           normalization: str = "jl", kind: Union[str, Sketch] = "gaussian") -> jax.Array:
    """S v ∈ ℝᵏ for the random k×n sketch S of ``kind`` generated from ``key`` (never held whole).

    "gaussian" (default): i.i.d. N(0, s²) entries, s² = 1/k ("jl": E SᵀS = I_n, so inner products are
    preserved in expectation) or 1/n ("subspace": the columns of R = Sᵀ have ≈ unit norm; θ* + R w is a
    random k-dim reparametrisation); leaf ℓ's rows come in blocks of ``block_size`` from
    fold_in(fold_in(key, ℓ), block), so the matrix depends on key, k, block_size and the tree structure.
    "sparse_sign" / "countsketch": the hashed sketches :class:`SparseSign` (s = 4) / :func:`CountSketch`.
    With a mask only masked coordinates contribute. ``v`` is one vector (``as_sketch(...).apply_batch``
    for many).
    """
    _check_k(k)
    return as_sketch(kind, k, key, block_size=block_size, normalization=normalization).apply(v, mask)


def sketch_transpose(w: jax.Array, like: PyTree, *, key: jax.Array, mask: Optional[PyTree] = None,
                     block_size: int = 65536, normalization: str = "jl",
                     kind: Union[str, Sketch] = "gaussian") -> PyTree:
    """Sᵀ w as a pytree shaped like ``like`` (the adjoint of :func:`sketch` with the same key and kind)."""
    return as_sketch(kind, w.shape[0], key, block_size=block_size, normalization=normalization).transpose(
        w, like, mask)


def random_sketch_matrix(like: PyTree, k: int, *, key: jax.Array, mask: Optional[PyTree] = None,
                         block_size: int = 65536, normalization: str = "jl",
                         kind: Union[str, Sketch] = "gaussian") -> jax.Array:
    """The dense k×n matrix S of :func:`sketch` (for tests and small n only)."""
    _check_k(k)
    return as_sketch(kind, k, key, block_size=block_size, normalization=normalization).matrix(like, mask)


class RandomSubspaceFisher(NamedTuple):
    """Result of :func:`random_subspace_fisher`.

    eigvals (r,): descending eigenvalues of the sketched Fisher F_S = (1/m) ZᵀZ = S F̂ Sᵀ (k×k).
    sketch_eigvecs (k, r): its eigenvectors (coordinates in the random subspace).
    Z (m, k): the projected per-example gradients zᵢ = S gᵢ.
    eigvecs: pytree with leading axis r, orthonormal parameter-space vectors v_j ∝ Gᵀ Z w_j
        (= F̂'s eigenvector directions recovered through the Gram identity; None if not asked).
    rayleigh (r,): v_jᵀ F̂ v_j for those vectors (exact F̂), or None.
    trace: (1/m)‖Z‖_F², an unbiased estimate of tr F̂ (jl normalisation).
    """

    eigvals: jax.Array
    sketch_eigvecs: jax.Array
    Z: jax.Array
    eigvecs: Any
    rayleigh: Any
    trace: jax.Array


def _map_chunks(f, batch, m, B):
    """Stack f(chunk) over consecutive chunks of B examples (lax.map over the full chunks, then the rest)."""
    nfull = m // B
    outs = []
    if nfull:
        full = tree_map(lambda x: x[:nfull * B].reshape((nfull, B) + x.shape[1:]), batch)
        y = lax.map(f, full)
        outs.append(tree_map(lambda a: a.reshape((nfull * B,) + a.shape[2:]), y))
    if m - nfull * B:
        outs.append(f(tree_map(lambda x: x[nfull * B:], batch)))
    return outs[0] if len(outs) == 1 else tree_map(lambda *a: jnp.concatenate(a), *outs)


def _scan_chunks(f, init, batch, m, B):
    """Σ over chunks of B examples of f(chunk, offset) with a lax.scan over the full chunks, then the rest."""
    nfull = m // B
    acc = init
    if nfull:
        full = tree_map(lambda x: x[:nfull * B].reshape((nfull, B) + x.shape[1:]), batch)
        acc, _ = lax.scan(lambda a, xs: (tree_map(jnp.add, a, f(xs[0], xs[1] * B)), None), acc,
                          (full, jnp.arange(nfull)))
    if m - nfull * B:
        acc = tree_map(jnp.add, acc, f(tree_map(lambda x: x[nfull * B:], batch), nfull * B))
    return acc


def random_subspace_fisher(logprob_fn: Callable, params: PyTree, batch: Any, k: int = 4096, *,
                           key: jax.Array, num_eigs: Optional[int] = None, mask: Optional[PyTree] = None,
                           example_batch_size: Optional[int] = None, block_size: int = 65536,
                           normalization: str = "jl", return_vectors: bool = True,
                           kind: Union[str, Sketch] = "gaussian") -> RandomSubspaceFisher:
    """The paper's Fisher estimator (§7): per-example gradients in a k-dimensional random subspace.

    For m examples (the paper: 100 safe completions), gᵢ = ∇_θ log π_θ(yᵢ|xᵢ) at θ* (masked: the
    block-wise restriction), zᵢ = S gᵢ ∈ ℝᵏ with the random S of ``kind`` (:func:`sketch`; the paper: a
    dense Gaussian, k = 4096), then the eigenpairs of the k×k Fisher F_S = (1/m) Σ zᵢzᵢᵀ = S F̂ Sᵀ (through
    the m×m Gram matrix (1/m) Z Zᵀ when m < k: same nonzero spectrum, w_j = Zᵀu_j/√(mλ_j)).
    With "jl" normalisation the nonzero eigenvalues of F_S are those of (1/m) G SᵀS Gᵀ, so by
    Ostrowski's theorem λ_j(F_S)/λ_j(F̂) ∈ [λ_min, λ_max] of W = (SV)ᵀ(SV) (V: an orthonormal basis of
    G's row space, r = rank G); every kind has E‖W − I‖²_F ≤ r(r+1)/k (Gaussian: a Wishart matrix with
    extremes (1 ± √(r/k))² + O(1/√k)).

    Cost: one pass of per-example gradients (vmapped over chunks of ``example_batch_size``; default 1 for
    the Gaussian, min(m, 16) for the sparse kinds, whose scatter moves a chunk's B values per coordinate),
    each chunk sketched by ``apply_batch`` (Gaussian: its n·k draws once per chunk; sparse: s·n
    scatter-adds, nothing in k). Parameter-space eigenvectors (return_vectors) cost two more gradient
    passes: V_raw = Uᵀ G with U = Z W (the Gram identity), accumulated chunk by chunk, orthonormalised
    (QR), then rayleigh_j = (1/m) Σᵢ (gᵢ·v_j)². Memory: chunk × n for the gradients, r × n for the
    vectors, block_size × k for a Gaussian slab; never n × k.

    Args:
      logprob_fn: ``(params, batch) -> (m,)`` per-example log π(yᵢ|xᵢ); every leaf of ``batch`` has the
        example axis first.
      k: sketch dimension. num_eigs: r (default min(m, k)).
      kind: "gaussian" (default, the paper's), "sparse_sign", "countsketch", or a sketch object
        (:class:`GaussianSketch`, :class:`SparseSign`; its k and key are replaced by these).
    """
    _check_k(k)
    check_mask(mask, params)
    sk = as_sketch(kind, k, key, block_size=block_size, normalization=normalization)
    m = jax.tree_util.tree_leaves(batch)[0].shape[0]
    r = min(m, k) if num_eigs is None else num_eigs
    if not 1 <= r <= min(m, k):
        raise ValueError(f"num_eigs must be in [1, min(m, k)={min(m, k)}]; got {num_eigs!r}")
    if example_batch_size is None:
        B = 1 if isinstance(sk, GaussianSketch) else min(m, 16)
    else:
        if not isinstance(example_batch_size, (int, np.integer)) or example_batch_size < 1:
            raise ValueError(f"example_batch_size must be a positive integer; got {example_batch_size!r}")
        B = min(int(example_batch_size), m)

    def grad_one(ex):
        ex1 = tree_map(lambda x: x[None], ex)
        return apply_mask(mask, jax.grad(lambda p: logprob_fn(p, ex1)[0])(params))

    def grads(exs):
        return jax.vmap(grad_one)(exs)

    Z = _map_chunks(lambda exs: sk.apply_batch(grads(exs), mask), batch, m, B)     # (m, k)
    if m < k:
        # F_S = (1/m) ZᵀZ has rank ≤ m: its eigenpairs from the m×m Gram matrix K_S = (1/m) Z Zᵀ = U Σ Uᵀ,
        # w_j = Zᵀu_j/√(m σ_j) (O(m²k) instead of the k×k eigh's O(k³))
        KS = (Z @ Z.T) / m
        sig, Ug = jnp.linalg.eigh(0.5 * (KS + KS.T))
        lam, Ug = sig[::-1][:r], Ug[:, ::-1][:, :r]
        W = (Z.T @ Ug) / jnp.sqrt(jnp.maximum(m * lam, jnp.finfo(Z.dtype).tiny))[None, :]
    else:
        FS = (Z.T @ Z) / m
        lam, W = jnp.linalg.eigh(0.5 * (FS + FS.T))
        lam, W = lam[::-1][:r], W[:, ::-1][:, :r]
    trace = jnp.sum(Z * Z) / m
    eigvecs = rayleigh = None
    if return_vectors:
        U = Z @ W                                                          # (m, r) ∝ Gram eigenvectors
        flat_like, unravel = ravel_pytree(params)

        def vraw(exs, off):
            G = jax.vmap(lambda g: ravel_pytree(g)[0])(grads(exs))          # (b, n)
            Uc = lax.dynamic_slice_in_dim(U, off, G.shape[0], axis=0).astype(G.dtype)
            return Uc.T @ G                                                 # (r, n)

        V = _scan_chunks(vraw, jnp.zeros((r, flat_like.shape[0]), flat_like.dtype), batch, m, B)
        q, rr = jnp.linalg.qr(V.T)
        V = (q * jnp.sign(jnp.diagonal(rr))[None, :]).T
        eigvecs = jax.vmap(unravel)(V)

        def proj(exs, off):
            G = jax.vmap(lambda g: ravel_pytree(g)[0])(grads(exs))
            return jnp.sum(jnp.square(G @ V.T), axis=0)                    # Σᵢ (gᵢ·v_j)²

        rayleigh = _scan_chunks(proj, jnp.zeros((r,), V.dtype), batch, m, B) / m
    return RandomSubspaceFisher(lam, W, Z, eigvecs, rayleigh, trace)
