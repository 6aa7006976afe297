"""Gradient-based data selection: the Alpaca top-100 subset of the paper's Table 1.

The benign examples whose gradients point most along harmful compliance (He et al.'s "what's in your safe
data"): with ḡ_harm = (1/r) Σ_j ∇_θ log π_θ*(y_j^harm | x_j^harm) the mean gradient of r harmful prompts'
complying responses, each candidate (xᵢ, yᵢ) is scored by the cosine

    sᵢ = ⟨gᵢ, ḡ_harm⟩ / (‖gᵢ‖ ‖ḡ_harm‖),   gᵢ = ∇_θ log π_θ*(yᵢ | xᵢ),

and the ``n_top`` largest scores are kept. Per-example gradients are formed ``chunk`` at a time (``lax.map``
over chunks, ``vmap`` inside), so memory holds one chunk of gradients and ḡ_harm.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from alignment_geom.aic.scale import chunk_batch
from alignment_geom.tree import apply_mask, tree_map

PyTree = Any

__all__ = ["mean_gradient", "gradient_similarity", "top_similar"]


def _dot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def mean_gradient(logprob_fn: Callable, params: PyTree, batch: Any, *, mask: Optional[PyTree] = None) -> PyTree:
    """ḡ = (1/r) Σ_j ∇_θ log π(y_j | x_j) over the r examples of ``batch`` (masked)."""
    r = jax.tree_util.tree_leaves(batch)[0].shape[0]
    return apply_mask(mask, jax.grad(lambda p: jnp.sum(logprob_fn(p, batch)) / r)(params))


def gradient_similarity(logprob_fn: Callable, params: PyTree, candidates: Any, reference: Any, *,
                        mask: Optional[PyTree] = None, chunk: int = 8) -> jax.Array:
    """sᵢ (N,): the cosine between each candidate's gradient gᵢ and the mean reference gradient ḡ_harm.

    ``logprob_fn(params, batch) -> (B,)`` per-example log π(y | x); ``candidates`` and ``reference`` are token
    batches with the example axis first."""
    g_ref = mean_gradient(logprob_fn, params, reference, mask=mask)
    ref_norm = jnp.sqrt(_dot(g_ref, g_ref))
    N = jax.tree_util.tree_leaves(candidates)[0].shape[0]
    chunks, valid = chunk_batch(candidates, chunk)

    def one_chunk(args):
        ex, _ = args

        def one(e):
            e1 = tree_map(lambda x: x[None], e)
            g = apply_mask(mask, jax.grad(lambda p: logprob_fn(p, e1)[0])(params))
            return _dot(g, g_ref) / jnp.maximum(jnp.sqrt(_dot(g, g)) * ref_norm, jnp.finfo(ref_norm.dtype).tiny)

        return jax.vmap(one)(ex)

    return lax.map(one_chunk, (chunks, valid)).reshape(-1)[:N]


def top_similar(scores, n_top: int) -> np.ndarray:
    """Indices of the ``n_top`` largest scores, best first (ties: the lower index first)."""
    s = np.asarray(scores, np.float64)
    if not 1 <= n_top <= s.shape[0]:
        raise ValueError(f"n_top must be in [1, {s.shape[0]}], got {n_top!r}")
    return np.lexsort((np.arange(s.shape[0]), -s))[:n_top]
