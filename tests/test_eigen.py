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
