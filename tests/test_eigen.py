"""linalg.top_eigenpairs' Lanczos modes (full basis; bounded thick restart in float64 and with a bfloat16 basis)
against numpy.linalg.eigh of dense float64 matrices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignment_geom import linalg as sp

KEY = jax.random.PRNGKey(0)
U_BF16 = 2.0 ** -8                     # bfloat16 unit roundoff


def _sym(w, seed):
    Q = np.linalg.qr(np.random.default_rng(seed).standard_normal((w.size, w.size)))[0]
    return (Q * w) @ Q.T


def _solve(A, k, **kw):
    A = jnp.asarray(A)
    like = {"x": jnp.zeros((A.shape[0] - 20,)), "y": jnp.zeros((4, 5))}
    flat, unravel = jax.flatten_util.ravel_pytree(like)

    def mv(v):
        return unravel(A @ jax.flatten_util.ravel_pytree(v)[0])

    lam, V, res, info = jax.jit(lambda key: sp.top_eigenpairs(mv, like, k, key=key, return_info=True, **kw))(KEY)
    return np.asarray(lam), np.asarray(sp.as_matrix(V)), np.asarray(res), info


def _check(A, k, lam, V, res, *, which="LA", rtol=1e-10):
    w, U = np.linalg.eigh(A)
    order = np.argsort(-w if which == "LA" else -np.abs(w))[:k]
    np.testing.assert_allclose(lam, w[order], rtol=rtol)
    np.testing.assert_allclose(V @ V.T, np.eye(k), atol=1e-10)
    np.testing.assert_allclose(np.abs(np.sum(V * U[:, order].T, axis=1)), 1.0, atol=1e-8)
    np.testing.assert_allclose(res, np.linalg.norm(V @ A - lam[:, None] * V, axis=1) / np.abs(lam), rtol=1e-6,
                               atol=1e-14)


# eigenvalues 10, 9.5, …: a separated top and a slowly decaying bulk
W_SEP = np.concatenate([10.0 - 0.5 * np.arange(6), np.linspace(4.0, 0.01, 114)])


@pytest.mark.parametrize("mode", ["full", "bounded"])
def test_modes_against_eigh(mode):
    A = _sym(W_SEP, 1)
    kw = dict(num_steps=120, tol=1e-11) if mode == "full" else dict(basis_size=13, tol=1e-11)
    lam, V, res, info = _solve(A, 6, **kw)
    assert bool(info.converged)
    _check(A, 6, lam, V, res)
    assert np.all(res <= 1e-10)
    if mode == "bounded":
        assert int(info.num_iters) >= 1          # it restarted (a 14-vector basis cannot hold the answer)


def test_bounded_gapless_spectrum():
    """λ_i = 1 − i/n: no gap anywhere; thick restart with a 2k + 1 basis still converges to 1e-8."""
    n, k = 300, 10
    A = _sym(1.0 - np.arange(n) / n, 2)
    lam, V, res, info = _solve(A, k, basis_size=2 * k + 1, tol=1e-8, num_steps=3000)
    assert bool(info.converged), int(info.num_matvecs)
    assert np.all(res <= 1e-7), res
    # Ritz values of a residual-1e-8 pair are accurate to ‖r‖²/gap ≪ 1e-10 here
    _check(A, k, lam, V, res, rtol=1e-10)


def test_bounded_bf16_basis():
    """A bfloat16 basis: the stored vectors are orthonormal to O(u), u = 2⁻⁸, so the Ritz values are accurate
    to about u·λ₁ and the attainable residual is O(u): asked for tol = 4u, it converges there."""
    A = _sym(W_SEP, 3)
    lam, V, res, info = _solve(A, 6, basis_size=13, tol=4 * U_BF16, basis_dtype=jnp.bfloat16)
    assert bool(info.converged)
    w = np.sort(np.linalg.eigvalsh(A))[::-1][:6]
    assert np.max(np.abs(lam - w)) <= U_BF16 * w[0], np.abs(lam - w)
    assert np.all(res <= 2 * 4 * U_BF16), res
    np.testing.assert_allclose(V @ V.T, np.eye(6), atol=4 * U_BF16)


def test_bounded_which_lm_rank_deficient_warm_start():
    rng = np.random.default_rng(4)
    # indefinite: largest |λ| are negative and positive
    w = np.concatenate([[-9.0, 8.0, -7.0, 6.0], rng.uniform(-2, 2, 116)])
    A = _sym(w, 5)
    lam, V, res, info = _solve(A, 4, basis_size=10, tol=1e-11, which="LM")
    _check(A, 4, lam, V, res, which="LM")
    # rank 7 < basis: Krylov breakdown, continued from a fresh orthogonal direction
    w2 = np.concatenate([np.arange(7, 0, -1.0), np.zeros(113)])
    A2 = _sym(w2, 6)
    lam2, V2, res2, _ = _solve(A2, 3, basis_size=12, tol=1e-11)
    _check(A2, 3, lam2, V2, res2)
    # a warm start (init=) from earlier eigenvectors converges without a restart
    A3 = jnp.asarray(_sym(W_SEP, 1))
    like = jnp.zeros(120)
    v0 = jnp.asarray(np.linalg.eigh(np.asarray(A3))[1][:, ::-1][:, :6].T)
    lam3, _, res3, info3 = jax.jit(lambda x0: sp.top_eigenpairs(lambda v: A3 @ v, like, 6, key=KEY, basis_size=13,
                                                                tol=1e-10, init=x0, return_info=True))(v0)
    assert int(info3.num_iters) == 0 and bool(info3.converged)
    np.testing.assert_allclose(np.asarray(lam3), W_SEP[:6], rtol=1e-10)


def test_bounded_bad_inputs():
    A = jnp.asarray(_sym(W_SEP, 1))
    like = jnp.zeros(120)
    with pytest.raises(ValueError, match="basis_size must"):
        sp.top_eigenpairs(lambda v: A @ v, like, 6, key=KEY, basis_size=7)
    with pytest.raises(ValueError, match="needs basis_size"):
        sp.top_eigenpairs(lambda v: A @ v, like, 6, key=KEY, basis_dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="method='lanczos'"):
        sp.top_eigenpairs(lambda v: A @ v, like, 6, key=KEY, basis_size=13, method="randomized")


# --------------------------------------------------------------------------- Gram side of a factored operator


def _tiny_mlp(seed, d_in=5, h=12, c=4):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    params = {"W1": jax.random.normal(ks[0], (d_in, h)) * 0.7, "b1": jax.random.normal(ks[1], (h,)) * 0.1,
              "W2": jax.random.normal(ks[2], (h, c)) * 0.7}

    def logits(p, x):
        return jnp.tanh(x @ p["W1"] + p["b1"]) @ p["W2"]

    return params, logits


def _dense_fisher_oracle(logits, params, x):
    """F = ∇²_θ mean KL(π_θ* ‖ π_θ) at θ = θ* (Assumption 1), by jax.hessian on the ravelled parameters."""
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    p0 = jax.nn.softmax(logits(params, x), axis=-1)

    def kl(f):
        lq = jax.nn.log_softmax(logits(unravel(f), x), axis=-1)
        return jnp.mean(jnp.sum(p0 * (jnp.log(p0) - lq), axis=-1))

    return np.asarray(jax.hessian(kl)(flat))


@pytest.mark.parametrize("case", ["true", "true_seq", "true_masked", "empirical"])
def test_gram_side_against_dense_oracle(case):
    """Lanczos on K = B Bᵀ (side='gram') returns A's top eigenpairs, A = BᵀB, against eigh of a dense float64
    oracle that shares no code with the operator (jax.hessian of Δu for F; per-example jax.grad for F̂)."""
    from alignment_geom import curvature

    params, logits = _tiny_mlp(3)
    x = jax.random.normal(jax.random.PRNGKey(5), (6, 5))
    mask = None
    if case == "true_seq":                       # two leading axes of positions: M = 3·2·C
        x = x.reshape(3, 2, 5)
    if case == "true_masked":
        mask = {"W1": jnp.ones((5, 12), bool), "b1": jnp.zeros((12,), bool), "W2": jnp.zeros((12, 4), bool)}
    if case == "empirical":
        y = jnp.arange(6) % 4

        def logprob(p, b):
            return jnp.take_along_axis(jax.nn.log_softmax(logits(p, b[0]), -1), b[1][:, None], 1)[:, 0]

        op = curvature.empirical_fisher(ag_problem(params, logprob_fn=logprob, safety_batch=(x, y)))
        flat, unravel = jax.flatten_util.ravel_pytree(params)
        G = np.asarray(jax.vmap(lambda i: jax.grad(lambda f: logprob(unravel(f), (x, y))[i])(flat))(jnp.arange(6)))
        A = G.T @ G / 6
    else:
        op = curvature.linearized_fisher_operator(logits, params, x, mask)
        A = _dense_fisher_oracle(logits, params, x)
        if mask is not None:
            mf = np.asarray(jax.flatten_util.ravel_pytree(
                jax.tree_util.tree_map(lambda m, p: jnp.broadcast_to(m, p.shape), mask, params))[0], float)
            A = A * mf[:, None] * mf[None, :]
    M, n = op.factor.size, A.shape[0]
    assert M < n
    b, bt, _ = op.factor_flat()
    B = np.asarray(jax.vmap(b)(jnp.eye(n))).T            # (M, n)
    np.testing.assert_allclose(B.T @ B, A, atol=1e-12)
    np.testing.assert_allclose(np.asarray(jax.vmap(bt)(jnp.eye(M))), B, atol=1e-12)   # Bᵀ is B's transpose
    k = 3
    lam, V, res, info = jax.jit(lambda key: sp.top_eigenpairs(op, k, key=key, tol=1e-11, side="gram",
                                                              return_info=True))(KEY)
    assert bool(info.converged)
    lam, V, res = np.asarray(lam), np.asarray(sp.as_matrix(V)), np.asarray(res)
    _check(A, k, lam, V, res)
    assert np.all(res <= 1e-11), res
    assert int(info.num_matvecs) <= M
    # 'auto' takes the Gram side when M < n: the same iteration (the same matvec count), the same pairs
    lam_a, V_a, _, info_a = jax.jit(lambda key: sp.top_eigenpairs(op, k, key=key, tol=1e-11, return_info=True))(KEY)
    assert int(info_a.num_matvecs) == int(info.num_matvecs)
    np.testing.assert_allclose(np.asarray(lam_a), lam, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(sp.as_matrix(V_a)), V, atol=1e-10)


def ag_problem(params, **kw):
    from alignment_geom import Problem

    return Problem(params, **kw)


def test_gram_side_stopping_test_bounds_the_mapped_back_residual():
    """A = BᵀB with a wide spectrum (λ₁/λ_k = 1e4): the Gram-side residual ‖Ku − θu‖ understates ‖Av − θv‖ by up
    to √(λ₁/θ); the stopping test accounts for it, so every returned exact residual meets tol. Also: a warm start
    from the answer converges at once, and the bad inputs are one-line errors."""
    rng = np.random.default_rng(8)
    n, M = 90, 30
    s = np.logspace(0, -2, M)                      # singular values of B: λ = s² from 1 to 1e-4
    Bm = (np.linalg.qr(rng.standard_normal((M, M)))[0] * s) @ np.linalg.qr(rng.standard_normal((n, M)))[0].T
    Bj = jnp.asarray(Bm)
    op = sp.LinearOperator(lambda v: Bj.T @ (Bj @ v), jnp.zeros(n), psd=True,
                           factor=sp.Factor(lambda v: Bj @ v, lambda u: Bj.T @ u, jnp.zeros(M)))
    A = Bm.T @ Bm
    k, tol = 12, 1e-7
    # before convergence: the Gram-side estimates, scaled by √(θ₁/θ_i), bound the exact residuals of the
    # mapped-back pairs; unscaled they would not (3 and 1 pairs exceed them after 12 and 14 steps). The bound
    # assumes an orthonormal basis, so this part re-orthogonalises fully (a semi-orthogonal one adds a floor of
    # order |q_iᵀq_j|·λ₁/θ: 2e-10 against an estimate of 1e-10 for the top pair here)
    for steps, n_under in ((12, 3), (14, 1)):
        lam_s, _, res_s, info_s = sp.top_eigenpairs(op, k, key=KEY, num_steps=steps, reorth="full",
                                                    return_info=True)
        est = np.asarray(info_s.residual_estimates)
        assert np.all(np.asarray(res_s) <= est * (1 + 1e-8) + 1e-12)
        unscaled = est / np.sqrt(float(lam_s[0]) / np.asarray(lam_s))
        assert np.sum(np.asarray(res_s) > unscaled * (1 + 1e-8) + 1e-12) == n_under
    lam, V, res, info = sp.top_eigenpairs(op, k, key=KEY, tol=tol, num_steps=M, return_info=True)
    assert bool(info.converged)
    assert np.all(np.asarray(res) <= tol), res
    _check(A, k, np.asarray(lam), np.asarray(V), np.asarray(res), rtol=1e-9)
    lam_w, _, _, info_w = sp.top_eigenpairs(op, k, key=KEY, tol=1e-9, init=V, return_info=True)
    assert int(info_w.num_matvecs) <= k + 2, int(info_w.num_matvecs)
    with pytest.raises(ValueError, match="side must be"):
        sp.top_eigenpairs(op, k, key=KEY, side="dual")
    with pytest.raises(ValueError, match="needs a LinearOperator with a factor"):
        sp.top_eigenpairs(lambda v: Bj.T @ (Bj @ v), jnp.zeros(n), k, key=KEY, side="gram")
    with pytest.raises(ValueError, match="exceeds the factor's range"):
        sp.top_eigenpairs(op, M + 1, key=KEY, side="gram", num_steps=n)
