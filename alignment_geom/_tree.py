"""Small pytree linear-algebra helpers shared by every module (private).

All functions are pure and jit-compatible. A "vector" is any pytree of arrays;
two vectors are compatible when they have the same tree structure and leaf shapes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
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


def mask_indices(mask, params):
    """Indices (numpy int array) of the ravelled parameter vector that `mask` keeps."""
    import numpy as np

    if mask is None:
        flat, _ = ravel_pytree(params)
        return np.arange(flat.shape[0])
    m = tree_map(lambda mm, x: jnp.broadcast_to(jnp.asarray(mm, bool), x.shape), mask, params)
    flat_m, _ = ravel_pytree(tree_map(lambda x: x.astype(jnp.float32), m))
    return np.nonzero(np.asarray(flat_m) > 0.5)[0]
