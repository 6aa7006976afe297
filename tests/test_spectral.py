"""alignment_geom.linalg (eigen, gram, trace, subspace) against dense float64 oracles (n ≤ 200)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from alignment_geom import linalg as sp
from alignment_geom import testing as T

KEY = jax.random.PRNGKey(0)


def _like(n1=30, n2=(10, 3)):
    return {"a": jnp.zeros((n1,)), "b": jnp.zeros(n2)}


def _op(A, like):
    _, unravel = ravel_pytree(like)
    return lambda v: unravel(A @ ravel_pytree(v)[0])


def _wishart(n, p, seed):
    X = np.random.default_rng(seed).standard_normal((p, n))
    return jnp.asarray(X.T @ X / p)


def _check_pairs(A, lam, vecs, res, k, *, which="LA", rtol=1e-10, rtol_res=1e-8):
    w, U = np.linalg.eigh(np.asarray(A))
    order = np.argsort(-w if which == "LA" else -np.abs(w))[:k]
    w, U = w[order], U[:, order]
    np.testing.assert_allclose(np.asarray(lam), w, rtol=rtol)
    assert np.all(np.asarray(res) <= rtol_res), res
    V = np.asarray(sp.as_matrix(vecs))
    np.testing.assert_allclose(V @ V.T, np.eye(k), atol=1e-12)
    # each Ritz vector is the true eigenvector up to sign (eigenvalues are simple here)
    np.testing.assert_allclose(np.abs(np.sum(V * U.T, axis=1)), 1.0, atol=1e-8)


MASK = {"a": True, "b": False}


@functools.lru_cache(maxsize=None)
def _solver(method, k=5, num_steps=60, tol=1e-10, which="LA", masked=False):
    """One jitted solver per configuration; the matrix is an argument, so tests share compilations."""
    like = _like()

    def f(A, key):
        return sp.top_eigenpairs(_op(A, like), like, k, key=key, method=method, num_steps=num_steps, tol=tol,
                                 which=which, mask=MASK if masked else None, return_info=True)

    return jax.jit(f)


def _spiked(n=60, spikes=(9.0, 7.0, 5.5, 4.5, 3.5), seed=2):
    U = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, len(spikes))))[0]
    return _wishart(n, 80, 1) + jnp.asarray(U @ np.diag(spikes) @ U.T)


@pytest.mark.parametrize("method", ["lanczos", "lobpcg", "randomized"])
def test_top_eigenpairs_wishart(method):
    """Planted separated spikes on a Wishart bulk: the three methods agree with eigh."""
    A = _spiked()
    lam, vecs, res, info = _solver(method)(A, KEY)
    assert bool(info.converged)
    assert int(info.num_matvecs) > 0
    _check_pairs(A, lam, vecs, res, 5)
    like = _like()
    assert jax.tree_util.tree_structure(vecs) == jax.tree_util.tree_structure(like)
    assert vecs["b"].shape == (5, 10, 3)


def test_lanczos_plain_wishart_tolerance_and_rank_deficient():
    f = _solver("lanczos")
    # plain Wishart (no planted gap): converges by m = n at the latest, to machine precision
    A = _wishart(60, 70, 3)
    lam, vecs, res, info = f(A, KEY)
    _check_pairs(A, lam, vecs, res, 5)
    # a spectrum with a gap: the tolerance stop fires early, and the estimate matches the true residual
    n = 60
    rng = np.random.default_rng(5)
    Q = np.linalg.qr(rng.standard_normal((n, n)))[0]
    ev = np.concatenate([[10, 8, 6, 5, 4], 0.1 * rng.random(n - 5)])
    A = jnp.asarray(Q @ np.diag(ev) @ Q.T)
    lam, vecs, res, info = f(A, KEY)
    assert bool(info.converged) and int(info.num_matvecs) < 40
    _check_pairs(A, lam, vecs, res, 5, rtol_res=1e-9)
    np.testing.assert_allclose(np.asarray(info.residual_estimates), np.asarray(res), rtol=1e-3, atol=1e-13)
    # rank 3 < k = 5: breakdown handled by restarting; the extra pairs are zeros in the null space
    B = jnp.asarray(Q[:, :3] @ np.diag([3.0, 2.0, 1.0]) @ Q[:, :3].T)
    lam, vecs, _, info = f(B, KEY)
    np.testing.assert_allclose(np.asarray(lam), [3, 2, 1, 0, 0], atol=1e-12)
    V = np.asarray(sp.as_matrix(vecs))
    np.testing.assert_allclose(V @ V.T, np.eye(5), atol=1e-12)


@pytest.mark.parametrize("steps", [5, 15, 16, 37])
def test_lanczos_core_blocked_basis_is_a_lanczos_decomposition(steps):
    """The Krylov basis is stored in blocks of 16 rows and each step re-orthogonalises against the
    filled blocks only: Q has orthonormal rows 0..m, zero rows after, and Q_m A Q_mᵀ = T_m (dense check)."""
    n = 50
    A = np.asarray(_wishart(n, 70, 11))
    q0 = jax.random.normal(KEY, (n,), jnp.float64)
    alpha, beta, Q, m, _, _ = jax.jit(lambda q: sp.eigen._lanczos_core(lambda x: jnp.asarray(A) @ x, q, steps,
                                                              key=KEY, mflat=None))(q0)
    Q, m = np.asarray(Q), int(m)
    assert m == steps and Q.shape[0] >= steps + 1 and Q.shape[0] % 16 in (0, steps + 1)
    np.testing.assert_allclose(Q[:m + 1] @ Q[:m + 1].T, np.eye(m + 1), atol=1e-13)
    assert not np.any(Q[m + 1:])
    T_m = np.diag(np.asarray(alpha)[:m]) + np.diag(np.asarray(beta)[:m - 1], 1) + np.diag(np.asarray(beta)[:m - 1], -1)
    np.testing.assert_allclose(Q[:m] @ A @ Q[:m].T, T_m, atol=1e-12)
    # first row is the normalised start vector
    np.testing.assert_allclose(Q[0], np.asarray(q0) / np.linalg.norm(np.asarray(q0)), atol=1e-15)


def _separated(n=400, seed=0):
    """A = U diag(λ) Uᵀ with ten well-separated eigenvalues 10 … 5 above a bulk in [0, 1]: Lanczos' Ritz values
    converge fast, which is exactly when the three-term recurrence loses orthogonality."""
    rng = np.random.default_rng(seed)
    U = np.linalg.qr(rng.standard_normal((n, n)))[0]
    lam = np.concatenate([np.linspace(10.0, 5.0, 10), rng.uniform(0.0, 1.0, n - 10)])
    return (U * lam) @ U.T, lam


@pytest.mark.parametrize("steps", [60, 150])
def test_partial_reorthogonalisation_keeps_the_basis_semi_orthogonal(steps):
    """reorth="partial": the ω recurrence triggers projections on some steps only, the basis stays
    semi-orthogonal (|q_iᵀq_j| ≤ √u), and T_m's top Ritz values equal the dense eigenvalues and those of full
    re-orthogonalisation to rounding."""
    A, lam = _separated()
    q0 = jnp.asarray(np.random.default_rng(1).standard_normal(A.shape[0]))
    out = {}
    for reorth in ("partial", "full"):
        alpha, beta, Q, m, _, nre = jax.jit(lambda q, r=reorth: sp.eigen._lanczos_core(
            lambda x: jnp.asarray(A) @ x, q, steps, key=KEY, mflat=None, reorth=r))(q0)
        m = int(m)
        Q = np.asarray(Q)[:m + 1]
        b = np.asarray(beta)[:m - 1]
        T_m = np.diag(np.asarray(alpha)[:m]) + np.diag(b, 1) + np.diag(b, -1)
        out[reorth] = (int(nre), np.max(np.abs(Q @ Q.T - np.eye(m + 1))), np.sort(np.linalg.eigvalsh(T_m))[::-1])
    nre, orth, theta = out["partial"]
    assert out["full"][0] == steps and 0 < nre < steps // 2, nre
    assert orth <= np.sqrt(np.finfo(np.float64).eps), orth
    assert out["full"][1] <= 1e-14
    np.testing.assert_allclose(theta[:10], np.sort(lam)[::-1][:10], rtol=1e-13)
    np.testing.assert_allclose(theta[:20], out["full"][2][:20], rtol=1e-12)


def test_top_eigenpairs_partial_equals_full_reorthogonalisation():
    """top_eigenpairs' default (partial) and reorth="full" return the same pairs, and both match the dense
    oracle; the partial run projects on fewer steps."""
    A, lam = _separated(n=300, seed=3)
    res = {}
    for reorth in ("partial", "full"):
        f = jax.jit(lambda M, r=reorth: sp.top_eigenpairs(lambda v: M @ v, jnp.zeros(300), 8, key=KEY, tol=1e-10,
                                                          num_steps=120, reorth=r, return_info=True))
        res[reorth] = f(jnp.asarray(A))
        _check_pairs(A, *res[reorth][:3], 8)
    np.testing.assert_allclose(np.asarray(res["partial"][0]), np.asarray(res["full"][0]), rtol=1e-13)
    assert int(res["partial"][3].num_reorths) < int(res["full"][3].num_reorths) == int(res["full"][3].num_matvecs)
    with pytest.raises(ValueError, match="reorth"):
        sp.top_eigenpairs(lambda v: v, jnp.zeros(5), 1, key=KEY, reorth="selective")


def test_lanczos_dense_hessian_indefinite():
    """Dense Hessian of a tanh MLP with n = 3·7 + 7 + 7·4 + 4 = 60 parameters (indefinite)."""
    mdl = T.mlp_model(jax.random.PRNGKey(3), n_in=3, hidden=7, n_out=4)
    H, _, _ = T.dense_hessian(mdl.loss_fn, mdl.params, mdl.batch)
    assert H.shape == (60, 60) and np.min(np.linalg.eigvalsh(np.asarray(H))) < 0
    for which in ("LA", "LM"):
        lam, vecs, res, info = _solver("lanczos", which=which)(H, KEY)
        assert bool(info.converged)
        _check_pairs(H, lam, vecs, res, 5, which=which)


def test_mask_restricts_operator():
    A = _spiked(seed=6)
    lam, vecs, res, _ = _solver("lanczos", masked=True)(A, KEY)
    Ass = np.asarray(A)[:30, :30]
    w = np.sort(np.linalg.eigvalsh(Ass))[::-1][:5]
    np.testing.assert_allclose(np.asarray(lam), w, rtol=1e-10)
    assert np.all(np.asarray(vecs["b"]) == 0)
    assert np.all(np.asarray(res) <= 1e-8)


def test_gram_eigenpairs_empirical_fisher():
    """F̂ = (1/m) GᵀG with per-example gradients as a pytree (leading axis m) or an (m, n) array."""
    params, logprob_fn, batch, Am = _linear_logprob_problem(m=8)
    from alignment_geom import curvature as C

    G = C.per_example_grads(logprob_fn, params, batch)
    np.testing.assert_allclose(np.asarray(sp.as_matrix(G)), Am, rtol=1e-12)
    m = Am.shape[0]
    Fhat = Am.T @ Am / m
    lam, vecs, res = sp.gram_eigenpairs(G, 5)
    _check_pairs(jnp.asarray(Fhat), lam, vecs, res, 5)
    lam2, V2, _ = sp.gram_eigenpairs(jnp.asarray(Am), 5)
    np.testing.assert_allclose(np.asarray(lam2), np.asarray(lam), rtol=1e-12)
    assert V2.shape == (5, Am.shape[1])
    with pytest.raises(ValueError):
        sp.gram_eigenpairs(G, 9)


@pytest.mark.parametrize("n", [10, 49, 50])
def test_gram_product_blocked_equals_dense(n):
    """G Gᵀ summed over column blocks (fori_loop; with and without a remainder block, and the plain dot
    below two blocks) equals the dense product."""
    G = np.random.default_rng(n).standard_normal((5, n))
    np.testing.assert_allclose(np.asarray(sp.gram._gram_product(jnp.asarray(G), block=7)), G @ G.T, rtol=1e-13,
                               atol=1e-13)


def test_gram_eigenpairs_wide_leaf_pytree_with_trace():
    """A pytree with one leaf wide enough for the blocked Gram product (n_l = 20,009 > 2 blocks of 8,192, with a
    remainder) and a small one: eigenpairs, residuals and tr F̂ against the dense m×n matrix."""
    rng = np.random.default_rng(3)
    m = 6
    grads = {"big": rng.standard_normal((m, 11, 1819)), "small": rng.standard_normal((m, 3))}
    A = np.concatenate([grads["big"].reshape(m, -1), grads["small"]], axis=1)
    K = A @ A.T / m
    w = np.sort(np.linalg.eigvalsh(K))[::-1]
    lam, vecs, res, tr = sp.gram_eigenpairs_and_trace(jax.tree_util.tree_map(jnp.asarray, grads), 4, True)
    np.testing.assert_allclose(np.asarray(lam), w[:4], rtol=1e-12)
    np.testing.assert_allclose(float(tr), np.sum(A ** 2) / m, rtol=1e-13)
    V = np.asarray(sp.as_matrix(vecs))
    assert vecs["big"].shape == (4, 11, 1819) and vecs["small"].shape == (4, 3)
    np.testing.assert_allclose(V @ V.T, np.eye(4), atol=1e-12)
    # F̂ V = λ V without forming the n×n F̂
    np.testing.assert_allclose((V @ A.T) @ A / m, np.asarray(lam)[:, None] * V, rtol=1e-10, atol=1e-12)
    assert np.all(np.asarray(res) < 1e-12)
    with pytest.raises(ValueError, match="leading axis"):
        sp.gram_eigenpairs({"a": jnp.ones((3, 2)), "b": jnp.ones((4,))}, 2)


def _probes(key, num, n, dist, mask_flat=None):
    """The estimator's probes, regenerated: z_j from split(key, num)[j] (jax.random's Rademacher/normal draw)."""
    draw = jax.random.rademacher if dist == "rademacher" else jax.random.normal
    Z = np.stack([np.asarray(draw(k, (n,), jnp.float64)) for k in jax.random.split(key, num)])
    return Z if mask_flat is None else Z * mask_flat


MASK_FLAT = np.concatenate([np.ones(30), np.zeros(30)])


@functools.lru_cache(maxsize=None)
def _traces():
    like = _like()

    @jax.jit
    def traces(A, key):
        mv = _op(A, like)
        return (sp.dense_trace(mv, like), sp.dense_trace(mv, like, mask=MASK, batch_size=7),
                sp.hutchinson_trace(mv, like, 200, key=key),
                sp.hutchinson_trace(mv, like, 40, key=key, mask=MASK, dist="normal", batch_size=8),
                sp.hutchpp_trace(mv, like, 90, key=key), sp.hutchpp_trace(mv, like, 30, key=key, mask=MASK))

    return traces


def test_traces_reproduce_their_probes_exactly():
    """Each stochastic estimate equals the same formula evaluated in numpy on the regenerated probes (float64
    rounding only), with and without mask/dist/batch_size; dense traces are exact."""
    A = _wishart(60, 90, 8)
    An = np.asarray(A)
    dense, dense_m, (h, h_se), (hm, hm_se), (hpp, hpp_se), (hppm, _) = _traces()(A, KEY)
    np.testing.assert_allclose(float(dense), np.trace(An), rtol=1e-12)
    np.testing.assert_allclose(float(dense_m), np.trace(An[:30, :30]), rtol=1e-12)
    # Hutchinson: (1/s) Σ z_jᵀ A z_j and its standard error std(ddof=1)/√s
    for (est, se), num, dist, mk in (((h, h_se), 200, "rademacher", None), ((hm, hm_se), 40, "normal", MASK_FLAT)):
        Z = _probes(KEY, num, 60, dist, mk)
        q = np.einsum("ji,ik,jk->j", Z, An, Z)
        np.testing.assert_allclose(float(est), q.mean(), rtol=1e-12)
        np.testing.assert_allclose(float(se), q.std(ddof=1) / np.sqrt(num), rtol=1e-10)
    # Hutch++: s = m // 3 sketch probes from split(key)[0], Q = orth(A S), s residual probes from split(key)[1]
    for est, num, mk in ((hpp, 90, None), (hppm, 30, MASK_FLAT)):
        s_ = num // 3
        k1, k2 = jax.random.split(KEY)
        Am = An if mk is None else An * np.outer(mk, mk)
        Q = np.linalg.qr((Am @ _probes(k1, s_, 60, "rademacher", mk).T))[0]
        G = _probes(k2, s_, 60, "rademacher", mk).T
        G = G - Q @ (Q.T @ G)
        want = np.trace(Q.T @ Am @ Q) + np.mean(np.einsum("ij,ik,kj->j", G, Am, G))
        np.testing.assert_allclose(float(est), want, rtol=1e-10)
    # and the statistics: within 4 standard errors of tr A; Var = 2(‖A‖_F² − Σ A_ii²)/s for Rademacher
    tr = np.trace(An)
    assert abs(float(h) - tr) <= 4 * float(h_se)
    np.testing.assert_allclose(float(h_se) ** 2, 2 * (np.sum(An ** 2) - np.sum(np.diag(An) ** 2)) / 200, rtol=0.3)
    assert float(hpp_se) > 0 and abs(float(hpp) - tr) <= 4 * float(hpp_se)
    # Hutch++ is exact when rank(A) ≤ num_matvecs // 3
    Q = np.linalg.qr(np.random.default_rng(9).standard_normal((60, 5)))[0]
    B = jnp.asarray(Q @ np.diag([5.0, 4, 3, 2, 1]) @ Q.T)
    np.testing.assert_allclose(float(_traces()(B, KEY)[4][0]), 15.0, rtol=1e-10)


def test_slq_polynomial_moments_exact_and_density():
    """With m Lanczos steps Gauss quadrature is exact for degree ≤ 2m − 1, so n Σ_j τ_j θ_j^k = z_pᵀ A^k z_p for
    each probe (z_p regenerated: split(split(key, p)[i])[0]); tr exp(A) only within 4 standard errors."""
    like = _like()
    A = _wishart(60, 90, 10)
    An = np.asarray(A)
    w = np.linalg.eigvalsh(An)
    res = jax.jit(lambda A, key: sp.slq(_op(A, like), like, 12, 40, key=key))(A, KEY)
    np.testing.assert_allclose(np.asarray(res.weights).sum(axis=1), 1.0, rtol=1e-12)
    Z = np.stack([np.asarray(jax.random.rademacher(jax.random.split(k)[0], (60,), jnp.float64))
                  for k in jax.random.split(KEY, 40)])
    for k in (1, 2, 3, 7):
        per = np.einsum("pi,ij,pj->p", Z, np.linalg.matrix_power(An, k), Z)
        est, se = sp.slq_trace(res, lambda x, k=k: x ** k)
        np.testing.assert_allclose(float(est), per.mean(), rtol=1e-10)
        np.testing.assert_allclose(float(se), per.std(ddof=1) / np.sqrt(40), rtol=1e-8)
    est, se = sp.slq_trace(res, jnp.exp)
    assert abs(float(est) - np.sum(np.exp(w))) <= 4 * float(se)
    grid = jnp.linspace(-1.0, 5.0, 601)
    sigma = 0.3
    dens = np.asarray(sp.spectral_density(res, grid, sigma))
    np.testing.assert_allclose(np.trapezoid(dens, np.asarray(grid)), 1.0, atol=1e-3)
    # the density from the returned nodes/weights in numpy, and against the exact smoothed density
    d = np.asarray(grid)[:, None, None] - np.asarray(res.nodes)[None]
    per = np.sum(np.asarray(res.weights)[None] * np.exp(-0.5 * (d / sigma) ** 2), axis=2) / (sigma * np.sqrt(2 * np.pi))
    np.testing.assert_allclose(dens, per.mean(axis=1), rtol=1e-12, atol=1e-15)
    exact = np.mean(np.exp(-0.5 * ((np.asarray(grid)[:, None] - w[None]) / sigma) ** 2), axis=1) / (
        sigma * np.sqrt(2 * np.pi))
    se = per.std(axis=1, ddof=1) / np.sqrt(per.shape[1])
    assert np.all(np.abs(dens - exact) <= 4 * se + 1e-6)


def test_energy_and_effective_rank():
    lam = jnp.asarray([4.0, 3.0, 2.0, 1.0])
    np.testing.assert_allclose(np.asarray(sp.cumulative_energy(lam)), [0.4, 0.7, 0.9, 1.0])
    np.testing.assert_allclose(np.asarray(sp.cumulative_energy(lam, total=20.0)), [0.2, 0.35, 0.45, 0.5])
    assert sp.dim_for_energy(lam, 0.7) == 2 and sp.dim_for_energy(lam, 0.71) == 3
    assert sp.dim_for_energy(lam, 0.9, total=100.0) == 4
    np.testing.assert_allclose(float(sp.effective_rank(jnp.ones(5))), 5.0, rtol=1e-12)
    np.testing.assert_allclose(float(sp.effective_rank(lam, "participation")), 100.0 / 30.0, rtol=1e-12)
    np.testing.assert_allclose(float(sp.effective_rank(lam, "stable")), 2.5, rtol=1e-12)
    p = np.asarray(lam) / 10
    np.testing.assert_allclose(float(sp.effective_rank(lam)), np.exp(-np.sum(p * np.log(p))), rtol=1e-12)
    with pytest.raises(ValueError):
        sp.effective_rank(lam, "nope")


def test_principal_angles():
    rng = np.random.default_rng(11)
    n = 40
    A = rng.standard_normal((3, n))
    B = rng.standard_normal((5, n))
    qa = np.linalg.qr(A.T)[0]
    qb = np.linalg.qr(B.T)[0]
    ref = np.arccos(np.clip(np.linalg.svd(qa.T @ qb, compute_uv=False), 0, 1))
    np.testing.assert_allclose(np.asarray(sp.principal_angles(A, B)), np.sort(ref), atol=1e-12)
    np.testing.assert_allclose(np.asarray(sp.principal_angles(B, A)), np.sort(ref), atol=1e-12)
    # known small angles (where arccos loses accuracy) and a pytree basis
    Q = np.linalg.qr(rng.standard_normal((n, 6)))[0]
    phi = np.array([1e-9, 1e-5, 0.3])
    Ua = Q[:, :3].T
    Ub = (np.cos(phi)[:, None] * Q[:, :3].T + np.sin(phi)[:, None] * Q[:, 3:6].T)
    unr = ravel_pytree({"x": jnp.zeros((10, 2)), "y": jnp.zeros(20)})[1]
    tree_b = jax.vmap(unr)(jnp.asarray(Ub))
    got = np.asarray(sp.principal_angles(jnp.asarray(Ua), tree_b))
    np.testing.assert_allclose(got, phi, rtol=1e-7, atol=1e-15)
    with pytest.raises(ValueError):
        sp.principal_angles(np.ones((2, 5)), np.ones((2, 6)))


def _linear_logprob_problem(m=5, n_w=(20, 3), n_b=10, seed=12):
    rng = np.random.default_rng(seed)
    params = {"W": jnp.asarray(rng.standard_normal(n_w)), "b": jnp.asarray(rng.standard_normal(n_b))}
    n = int(np.prod(n_w)) + n_b
    Amat = jnp.asarray(rng.standard_normal((m, n)))
    _, unravel = ravel_pytree(params)

    def logprob_fn(p, batch):
        # log π(yᵢ|xᵢ) linear in θ: gᵢ = aᵢ exactly, F̂ = AᵀA/m
        return batch["a"] @ ravel_pytree(p)[0] + batch["c"]

    batch = {"a": Amat, "c": jnp.asarray(rng.standard_normal(m))}
    return params, logprob_fn, batch, np.asarray(Amat)


def test_random_subspace_fisher_known_fisher():
    params, logprob_fn, batch, Am = _linear_logprob_problem()
    m, n = Am.shape
    Fhat = Am.T @ Am / m
    k = 512
    rs = jax.jit(lambda p, b: sp.random_subspace_fisher(logprob_fn, p, b, k, key=KEY, block_size=16,
                                                        example_batch_size=2))(params, batch)
    S = np.asarray(sp.random_sketch_matrix(params, k, key=KEY, block_size=16))
    assert S.shape == (k, n)
    np.testing.assert_allclose(np.asarray(rs.Z), Am @ S.T, rtol=1e-10, atol=1e-10)
    FS = S @ Fhat @ S.T
    np.testing.assert_allclose(np.asarray(rs.eigvals), np.sort(np.linalg.eigvalsh(FS))[::-1][:m], rtol=1e-10)
    # Ostrowski + Wishart extremes: each ratio λ_j(F_S)/λ_j(F̂) lies in [(1−√(m/k)−4/√k)², (1+√(m/k)+4/√k)²]
    true = np.sort(np.linalg.eigvalsh(Fhat))[::-1][:m]
    ratio = np.asarray(rs.eigvals) / true
    lo, hi = (1 - np.sqrt(m / k) - 4 / np.sqrt(k)) ** 2, (1 + np.sqrt(m / k) + 4 / np.sqrt(k)) ** 2
    assert np.all((ratio >= lo) & (ratio <= hi)), ratio
    # with r = rank(G) = m the mapped-back vectors span range(F̂) exactly
    w, U = np.linalg.eigh(Fhat)
    top = U[:, np.argsort(-w)[:m]].T
    ang = np.asarray(sp.principal_angles(rs.eigvecs, jnp.asarray(top)))
    assert np.max(ang) < 1e-8
    V = np.asarray(sp.as_matrix(rs.eigvecs))
    np.testing.assert_allclose(np.asarray(rs.rayleigh), np.sum((V @ Fhat) * V, axis=1), rtol=1e-10)
    # sketch_transpose is the adjoint of sketch
    wv = jnp.asarray(np.random.default_rng(0).standard_normal(k))
    St_w = ravel_pytree(sp.sketch_transpose(wv, params, key=KEY, block_size=16))[0]
    np.testing.assert_allclose(np.asarray(St_w), S.T @ np.asarray(wv), rtol=1e-10, atol=1e-10)


def test_random_subspace_fisher_mask():
    params, logprob_fn, batch, Am = _linear_logprob_problem(seed=13)
    mask = {"W": True, "b": False}
    rs = sp.random_subspace_fisher(logprob_fn, params, batch, 64, key=KEY, mask=mask, block_size=16)
    S = np.asarray(sp.random_sketch_matrix(params, 64, key=KEY, mask=mask, block_size=16))
    assert np.all(S[:, 60:] == 0)
    Amask = Am.copy()
    Amask[:, 60:] = 0
    np.testing.assert_allclose(np.asarray(rs.Z), Amask @ S.T, rtol=1e-10, atol=1e-10)
    assert np.all(np.asarray(rs.eigvecs["b"]) == 0)


def test_sharded_equals_unsharded():
    devs = np.array(jax.devices()[:8])
    assert devs.size == 8
    mesh = Mesh(devs, ("x",))
    mdl = T.softmax_regression_model(jax.random.PRNGKey(14), n_in=16, n_out=4, m=24)
    from alignment_geom import curvature as C

    def solve(p, key):
        fvp = C.linearized_fisher_vp(mdl.logits_fn, p, mdl.inputs)
        return sp.top_eigenpairs(fvp, p, 4, key=key, num_steps=40)

    f = jax.jit(solve)
    lam0, v0, r0 = f(mdl.params, KEY)
    sharded = {"W": jax.device_put(mdl.params["W"], NamedSharding(mesh, PartitionSpec("x", None))),
               "b": jax.device_put(mdl.params["b"], NamedSharding(mesh, PartitionSpec()))}
    assert len(sharded["W"].sharding.device_set) == 8
    lam1, v1, r1 = f(sharded, KEY)
    np.testing.assert_allclose(np.asarray(lam1), np.asarray(lam0), rtol=1e-12)
    T.assert_trees_all_close(v1, v0, rtol=1e-8, atol=1e-10)
    F = T.dense_fisher(mdl.logits_fn, mdl.params, mdl.inputs)
    np.testing.assert_allclose(np.asarray(lam0), np.sort(np.linalg.eigvalsh(np.asarray(F)))[::-1][:4], rtol=1e-10)


def test_bad_inputs():
    like = _like()
    A = _wishart(60, 70, 1)
    mv = _op(A, like)
    with pytest.raises(ValueError, match="method"):
        sp.top_eigenpairs(mv, like, 2, key=KEY, method="arnoldi")
    with pytest.raises(ValueError, match="k must"):
        sp.top_eigenpairs(mv, like, 0, key=KEY)
    with pytest.raises(ValueError, match="exceeds"):
        sp.top_eigenpairs(mv, like, 61, key=KEY)
    with pytest.raises(ValueError, match="which"):
        sp.top_eigenpairs(mv, like, 2, key=KEY, which="SA")
    with pytest.raises(ValueError, match="5k < n"):
        sp.top_eigenpairs(mv, like, 20, key=KEY, method="lobpcg")
    with pytest.raises(ValueError, match="num_steps"):
        sp.top_eigenpairs(mv, like, 5, key=KEY, num_steps=3)
