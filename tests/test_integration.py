"""Cross-module checks: the pieces written in different modules agree with dense oracles and each other."""
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


def test_principal_angles_agree_between_modules():
    key = jax.random.PRNGKey(0)
    n, k = 40, 4
    A = jnp.linalg.qr(jax.random.normal(key, (n, k)))[0].T
    B = jnp.linalg.qr(A.T + 0.3 * jax.random.normal(jax.random.PRNGKey(1), (n, k)))[0].T
    a = np.sort(np.asarray(linalg.principal_angles({"w": A}, {"w": B})))
    b = np.sort(np.asarray(linalg.principal_angles({"w": A}, {"w": B})))
    want = np.sort(np.arccos(np.clip(np.linalg.svd(np.asarray(A @ B.T), compute_uv=False), -1, 1)))
    np.testing.assert_allclose(a, want, atol=1e-7)
    np.testing.assert_allclose(b, want, atol=1e-7)
