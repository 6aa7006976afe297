"""Cross-module checks: curvature.top_fisher_subspace and linalg.principal_angles against dense numpy oracles."""
import jax
import jax.numpy as jnp
import numpy as np

from alignment_geom import curvature, linalg
from alignment_geom import testing as T
from alignment_geom.tree import ravel


def _dense_top(F, d):
    w, V = np.linalg.eigh(np.asarray(F))
    return w[::-1][:d], V[:, ::-1][:, :d].T


def test_top_fisher_subspace_matches_dense_eigh():
    """curvature.top_fisher_subspace (thin QR + SVD of the Fisher factor) against eigh of the dense F."""
    m = T.mlp_model(jax.random.PRNGKey(4))
    d = 3
    F = T.dense_fisher(m.logits_fn, m.params, m.inputs)
    w_dense, V_dense = _dense_top(F, d)
    basis, eigvals = curvature.top_fisher_subspace(m.logits_fn, m.params, m.inputs, d)
    np.testing.assert_allclose(eigvals, w_dense, rtol=1e-10)
    B = np.stack([np.asarray(ravel(jax.tree_util.tree_map(lambda x: x[i], basis))[0]) for i in range(d)])
    # same subspace: all principal angles ~ 0 (the spectrum has distinct eigenvalues here)
    cos = np.linalg.svd(B @ V_dense.T, compute_uv=False)
    assert np.all(cos > 1 - 1e-10), cos
    np.testing.assert_allclose(B @ B.T, np.eye(d), atol=1e-12)


def test_principal_angles_against_numpy_svd():
    """linalg.principal_angles on a pytree basis against arccos of the singular values of AᵀB (numpy) and, for the
    small angles where arccos loses digits, arcsin of the singular values of (I − AAᵀ)B."""
    rng = np.random.default_rng(0)
    n, k = 40, 4
    A = np.linalg.qr(rng.standard_normal((n, k)))[0]
    B = np.linalg.qr(A + 0.3 * rng.standard_normal((n, k)))[0]
    unravel = ravel({"x": jnp.zeros((8, 3)), "y": jnp.zeros(16)})[1]
    tree_a, tree_b = jax.vmap(unravel)(jnp.asarray(A.T)), jax.vmap(unravel)(jnp.asarray(B.T))
    got = np.sort(np.asarray(linalg.principal_angles(tree_a, tree_b)))
    cos = np.linalg.svd(A.T @ B, compute_uv=False)
    sin = np.linalg.svd(B - A @ (A.T @ B), compute_uv=False)
    np.testing.assert_allclose(got, np.sort(np.arccos(np.clip(cos, -1, 1))), atol=1e-7)
    np.testing.assert_allclose(got, np.sort(np.arcsin(np.clip(sin, 0, 1))), rtol=1e-10, atol=1e-12)
