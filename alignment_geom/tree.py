"""Pytree linear algebra: the vectors of every operator in alignment_geom are pytrees shaped like θ.

All functions are pure and jit-compatible. A "vector" is any pytree of arrays; two vectors are
compatible when they have the same tree structure and leaf shapes. A *mask* is a boolean pytree with
the structure of θ (a leaf may be a Python bool or a boolean array broadcastable to the leaf): it
selects the parameter block S on which an operator acts (H_SS, F_SS, …).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

tree_map = jax.tree_util.tree_map


def tree_add(a, b):
    return tree_map(jnp.add, a, b)


def tree_sub(a, b):
    return tree_map(jnp.subtract, a, b)


def tree_scale(s, a):
    return tree_map(lambda x: s * x, a)


def tree_axpy(s, x, y):
    """s * x + y."""
    return tree_map(lambda xi, yi: s * xi + yi, x, y)


def tree_dot(a, b):
    """Euclidean inner product Σ aᵢ·bᵢ over all leaves (accumulated in the leaves' dtype)."""
    leaves = [jnp.vdot(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))]
    return sum(leaves) if leaves else jnp.zeros(())


def tree_norm(a):
    return jnp.sqrt(tree_dot(a, a))


def tree_zeros_like(a):
    return tree_map(jnp.zeros_like, a)


def tree_size(a) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(a))


def tree_cast(a, dtype):
    return tree_map(lambda x: x.astype(dtype), a)


def tree_random_normal(key, like):
    """A standard normal pytree with the structure, shapes and dtypes of `like`."""
    leaves, treedef = jax.tree_util.tree_flatten(like)
    keys = jax.random.split(key, max(len(leaves), 1))
    new = [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    return jax.tree_util.tree_unflatten(treedef, new)


def tree_stack(trees):
    """Stack a list of pytrees along a new leading axis."""
    return tree_map(lambda *xs: jnp.stack(xs), *trees)


def tree_unstack(tree):
    n = jax.tree_util.tree_leaves(tree)[0].shape[0]
    return [tree_map(lambda x: x[i], tree) for i in range(n)]


def tree_index(tree, i):
    return tree_map(lambda x: x[i], tree)


def check_like(params, v, name="v"):
    """Raise ValueError unless ``v`` has the tree structure and leaf shapes of ``params``."""
    p_def = jax.tree_util.tree_structure(params)
    v_def = jax.tree_util.tree_structure(v)
    if p_def != v_def:
        raise ValueError(f"{name} must have the same tree structure as params; got {v_def} vs {p_def}")
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(v)):
        if jnp.shape(a) != jnp.shape(b):
            raise ValueError(f"{name} leaf shape {jnp.shape(b)} does not match params leaf shape {jnp.shape(a)}")


def tree_float_dtype(tree):
    """The promoted dtype of a pytree's leaves (float64 for an empty tree)."""
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.result_type(*leaves) if leaves else jnp.float64


# --------------------------------------------------------------------------- masks


def check_mask(mask, params):
    """Validate a boolean pytree mask against params (same structure; bool leaves or
    bool arrays broadcastable to the leaf). Raises ValueError with a clear message."""
    if mask is None:
        return
    p_def = jax.tree_util.tree_structure(params)
    m_def = jax.tree_util.tree_structure(mask)
    if p_def != m_def:
        raise ValueError(f"mask must have the same tree structure as params; got {m_def} vs {p_def}")


def apply_mask(mask, tree):
    """Zero the leaves (or entries) of `tree` outside the boolean `mask` (None = keep all)."""
    if mask is None:
        return tree
    return tree_map(lambda m, x: jnp.where(jnp.asarray(m, bool), x, jnp.zeros_like(x)), mask, tree)


def mask_select(mask, inside, outside):
    """Entrywise: `inside` where mask is True, `outside` elsewhere."""
    if mask is None:
        return inside
    return tree_map(lambda m, a, b: jnp.where(jnp.asarray(m, bool), a, b), mask, inside, outside)


# --------------------------------------------------------------------------- ravel


def ravel(tree):
    """(flat vector, unravel_fn); a thin alias of jax.flatten_util.ravel_pytree."""
    return ravel_pytree(tree)


def mask_indices(mask, like) -> np.ndarray:
    """Indices (numpy int array) of the ravelled parameter vector that a concrete ``mask`` keeps.

    Uses only the shapes of ``like``, so it works while ``like`` is traced; ``mask`` must be concrete
    (Python/numpy bools or concrete arrays). ``mask=None`` keeps every index.
    """
    leaves = jax.tree_util.tree_leaves(like)
    if mask is None:
        return np.arange(sum(int(np.prod(jnp.shape(x))) for x in leaves))
    check_mask(mask, like)
    mleaves = jax.tree_util.tree_leaves(mask)
    flat = np.concatenate([np.broadcast_to(np.asarray(mm, bool), jnp.shape(x)).reshape(-1)
                           for mm, x in zip(mleaves, leaves)])
    return np.nonzero(flat)[0]


def mask_count(mask, like) -> int:
    """n = the number of coordinates a concrete ``mask`` keeps (all of ``like``'s when mask is None)."""
    leaves = jax.tree_util.tree_leaves(like)
    if mask is None:
        return sum(int(np.prod(jnp.shape(x))) for x in leaves)
    mleaves = jax.tree_util.tree_leaves(mask)
    return int(sum(np.sum(np.broadcast_to(np.asarray(mm, bool), jnp.shape(x))) for mm, x in zip(mleaves, leaves)))


def flat_mask(mask, like):
    """The mask as a ravelled 0/1 vector in the dtype of ``like`` (None stays None)."""
    if mask is None:
        return None
    check_mask(mask, like)
    m = tree_map(lambda mm, x: jnp.broadcast_to(jnp.asarray(mm, bool), jnp.shape(x)).astype(jnp.result_type(x)),
                 mask, like)
    return ravel_pytree(m)[0]


class StaticTree:
    """A pytree of concrete values (a mask, say) wrapped to be a static jit argument: equal and hashed by value
    (structure, shapes and entries); ``.tree`` is the pytree. A traced tree is equal to itself only."""

    __slots__ = ("tree", "_key")

    def __init__(self, tree):
        self.tree = tree
        self._key = _fingerprint(tree)

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, StaticTree) and self._key == other._key


def _fingerprint(tree):
    if tree is None:
        return None
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    try:
        return (treedef, tuple((np.shape(m), np.asarray(m).dtype.str, np.asarray(m).tobytes()) for m in leaves))
    except (TypeError, jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return (treedef, id(tree))
