"""Linear operators on pytrees: a matvec plus its structure (in the spirit of lineax's FunctionLinearOperator).

An operator A acts on vectors shaped like ``like`` (a pytree of arrays, typically θ*): ``A.mv(v) -> A v``.
Its structure tags say what a solver may assume: ``symmetric`` (Aᵀ = A: Lanczos, traces) and ``psd``
(A ⪰ 0: the Fisher F and F̂, not the Hessian H in general). An optional boolean ``mask`` restricts it to a
parameter block S: inputs and outputs are zeroed outside S, so the operator is A_SS embedded in a full-size
pytree.

A PSD operator may also carry its ``factor`` B (A = BᵀB, B: ℝⁿ → ℝᴹ as a :class:`Factor`, e.g. F = mean Jᵀ Λ J
with B = Λ^{1/2}J/√M): when M < n a solver can work on the M×M Gram side B Bᵀ, whose non-zero spectrum is
A's (``linalg.top_eigenpairs`` does; eigenvectors v = Bᵀu/√λ).

Operators are plain Python objects that close over arrays (for instance the residuals of one
``jax.linearize``); build them inside the jitted function that uses them. The solvers in
:mod:`alignment_geom.linalg` accept an operator wherever they accept a ``(matvec, like)`` pair.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from alignment_geom.tree import apply_mask, check_mask, flat_mask, mask_count

__all__ = ["Factor", "LinearOperator", "as_operator", "as_matrix", "operator_args"]

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Factor:
    """B with A = BᵀB: ``apply(v) -> B v`` (v shaped like the operator's ``like``, B v shaped like ``out_like``)
    and ``transpose(u) -> Bᵀ u``; both linear. ``out_like`` may hold arrays or ``jax.ShapeDtypeStruct`` s."""

    apply: Callable
    transpose: Callable
    out_like: PyTree

    @property
    def size(self) -> int:
        """M, the dimension of B's range space."""
        return sum(int(np.prod(jnp.shape(x))) for x in jax.tree_util.tree_leaves(self.out_like))


@dataclasses.dataclass(frozen=True)
class LinearOperator:
    """v ↦ A v on pytrees shaped like ``like``.

    fn: the matvec (linear in v). like: a pytree fixing structure, shapes and dtype. symmetric / psd: structure
    tags. mask: optional boolean pytree (A_SS). name: a label for error messages and reports. factor: optional
    :class:`Factor` B with A = BᵀB (unmasked; with a mask, A_SS = (B P_S)ᵀ(B P_S)).
    """

    fn: Callable
    like: PyTree
    symmetric: bool = True
    psd: bool = False
    mask: Optional[PyTree] = None
    name: str = ""
    factor: Optional[Factor] = None

    def mv(self, v: PyTree) -> PyTree:
        """A v (masked: A_SS v_S, zeros outside S)."""
        if self.mask is None:
            return self.fn(v)
        return apply_mask(self.mask, self.fn(apply_mask(self.mask, v)))

    __call__ = mv

    @property
    def size(self) -> int:
        """n, the number of coordinates the operator acts on (the masked ones with a mask)."""
        return mask_count(self.mask, self.like)

    def flat(self):
        """(mv_flat, flat_like, unravel, mask_flat): A on ravelled vectors, restricted to the mask."""
        flat, unravel = ravel_pytree(self.like)
        mflat = flat_mask(self.mask, self.like)
        fn = self.fn

        def mv(x):
            if mflat is not None:
                x = x * mflat
            y = ravel_pytree(fn(unravel(x)))[0].astype(flat.dtype)
            if mflat is not None:
                y = y * mflat
            return y

        return mv, flat, unravel, mflat

    def factor_flat(self):
        """(b, bt, out_flat) on ravelled vectors: b(x) = B P_S x ∈ ℝᴹ, bt(u) = P_S Bᵀ u ∈ ℝⁿ (P_S the mask), and a
        ravelled zero vector of B's range space. Needs ``factor``."""
        if self.factor is None:
            raise ValueError(f"operator {self.name or '(unnamed)'} has no factor (A = BᵀB)")
        flat, unravel = ravel_pytree(self.like)
        out_like = jax.tree_util.tree_map(lambda x: jnp.zeros(jnp.shape(x), x.dtype), self.factor.out_like)
        out_flat, unravel_out = ravel_pytree(out_like)
        mflat = flat_mask(self.mask, self.like)
        apply_, transpose_ = self.factor.apply, self.factor.transpose

        def b(x):
            if mflat is not None:
                x = x * mflat
            return ravel_pytree(apply_(unravel(x)))[0].astype(out_flat.dtype)

        def bt(u):
            y = ravel_pytree(transpose_(unravel_out(u)))[0].astype(flat.dtype)
            return y if mflat is None else y * mflat

        return b, bt, jnp.zeros_like(out_flat)

    def as_dense(self) -> jax.Array:
        """The n×n matrix of A on the ravelled coordinates (n matvecs: for tests and small n)."""
        mv, flat, _, _ = self.flat()
        eye = jnp.eye(flat.shape[0], dtype=flat.dtype)
        return jax.vmap(mv)(eye).T

    def with_mask(self, mask) -> "LinearOperator":
        check_mask(mask, self.like)
        return dataclasses.replace(self, mask=mask)


def as_operator(matvec, like=None, *, mask=None, symmetric: bool = True, psd: bool = False) -> LinearOperator:
    """A LinearOperator from an operator (returned as is, ``mask`` applied if given) or a ``(matvec, like)`` pair."""
    if isinstance(matvec, LinearOperator):
        return matvec if mask is None else matvec.with_mask(mask)
    if not callable(matvec):
        raise TypeError(f"expected a LinearOperator or a matvec function; got {type(matvec).__name__}")
    if like is None:
        raise ValueError("a matvec function needs `like` (a pytree shaped like its vectors)")
    check_mask(mask, like)
    return LinearOperator(matvec, like, symmetric=symmetric, psd=psd, mask=mask)


def operator_args(matvec, like, count, mask):
    """Resolve the two call forms of a linalg solver, ``f(operator, count, ...)`` and ``f(matvec, like, count, ...)``.

    Returns (mv_flat, flat_like, unravel, mask_flat, like, mask, count). With an operator, the positional
    slot after it may hold the count (``top_eigenpairs(op, 20, key=k)``); the operator's own mask is used
    unless ``mask`` is given.
    """
    if isinstance(matvec, LinearOperator):
        if count is None and like is not None and not isinstance(like, (dict, list, tuple)) and np.ndim(like) == 0:
            count, like = like, None
        if like is not None:
            raise ValueError("pass either a LinearOperator or (matvec, like), not both")
        op = matvec if mask is None else matvec.with_mask(mask)
    else:
        op = as_operator(matvec, like, mask=mask)
    mv, flat, unravel, mflat = op.flat()
    return mv, flat, unravel, mflat, op.like, op.mask, count


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
