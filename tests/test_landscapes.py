"""Tests for alignment_geom.landscapes: every configured AIC quantity against dense float64 oracles."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignment_geom import landscapes as L
from alignment_geom.curvature import hvp, utility_taylor_coeffs
from alignment_geom.testing import dense_fisher, dense_hessian

CONFIGS = [
    dict(n=24),
    dict(n=24, eps=0.3, tail=0.2, lam=0.7, gamma=1.7, lam_spread=3.0, offset=0.5, grad_norm=1.3),
    dict(n=20, d=1, eps=0.1, gamma=2.0, mix=False, third_order=1.0, policy_curvature=0.3),
]


@jax.jit
def _dense_quantities_jit(params, batch, inputs):
    H = dense_hessian(L.landscape_loss, params, batch)[0]
    F = dense_fisher(L.landscape_logits, params, inputs)
    return H, F, jax.grad(L.landscape_loss)(params, batch)["theta"]


def _dense_quantities(ls):
    return tuple(np.asarray(x) for x in _dense_quantities_jit(ls.params, ls.batch, ls.inputs))


@pytest.mark.parametrize("cfg", CONFIGS)
def test_configured_aic_values_dense(cfg):
    ls = L.make_landscape(**cfg)
    H, F, g = _dense_quantities(ls)
    info, d = ls.info, cfg.get("d", 4)
    B = np.asarray(ls.basis["theta"])
    np.testing.assert_allclose(B @ B.T, np.eye(d), atol=1e-14)
    ev = np.linalg.eigvalsh(F)[::-1]
    lam_all = np.asarray(ls.fisher_eigvals)
    np.testing.assert_allclose(ev[:lam_all.size], lam_all, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np.abs(ev[lam_all.size:]).max(), 0.0, atol=1e-13)
    np.testing.assert_allclose(ev[d - 1], cfg.get("lam", 1.0), rtol=1e-12)  # λ_d = lam
    np.testing.assert_allclose(ev[d:].sum(), cfg.get("tail", 0.0), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(F @ B.T, B.T * lam_all[:d], atol=1e-13)  # exact eigenvectors
    P = B.T @ B
    np.testing.assert_allclose(np.linalg.norm(P @ g), cfg.get("eps", 0.0), rtol=1e-12, atol=1e-14)
    PHg = P @ H @ g
    np.testing.assert_allclose(np.linalg.norm(PHg), cfg.get("gamma", 1.0), rtol=1e-12)  # γ_E = γ exactly
    np.testing.assert_allclose(np.sqrt(PHg @ F @ PHg), info["gamma_F"], rtol=1e-12)
    np.testing.assert_allclose(np.sqrt((P @ g) @ F @ (P @ g)), info["eps_F"], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np.linalg.norm(g), info["g_norm"], rtol=1e-12)


def test_third_order_and_policy_curvature_knobs_dense():
    ls = L.make_landscape(n=16, d=2, n_tail=2, third_order=1.5, policy_curvature=-0.4, grad_norm=2.0)
    flat, unravel = ls.params["theta"], lambda f: {"theta": f}
    g = jax.grad(ls.loss_fn)(ls.params, ls.batch)["theta"]
    # P ∇³L[g, g] = third_order · G² · Q u  (dense third derivative)
    D3 = jax.jit(jax.jacfwd(jax.hessian(lambda f: ls.loss_fn(unravel(f), ls.batch))))(flat)
    B = np.asarray(ls.basis["theta"])
    u = np.full(2, 1 / np.sqrt(2))
    np.testing.assert_allclose(B @ np.einsum("ijk,j,k->i", D3, g, g), 1.5 * 4.0 * u, rtol=1e-12)
    # D²z[g, g] on the sensitive heads = a_i κ_i G², κ = policy_curvature · u
    z2 = jax.jit(jax.jacfwd(jax.jacfwd(lambda f: ls.logits_fn(unravel(f), ls.inputs)[:, 1])))(flat)
    np.testing.assert_allclose(np.einsum("ijk,j,k->i", z2, g, g)[:2],
                               np.asarray(ls.inputs["a"]) * (-0.4 * u) * 4.0, rtol=1e-12)


def test_closed_form_onset_coefficients_vs_utility_taylor_vmapped():
    """info a4/a5 (closed forms) against the exact Taylor coefficients, one vmapped computation."""
    grid = L.stack_landscapes([
        L.make_landscape(n=16),
        L.make_landscape(n=16, policy_curvature=0.7, third_order=2.0, tail=0.2, tail_coupling=0.5),
        L.make_landscape(n=16, policy_curvature=-1.0),  # = −γ/G²: exact cancellation, a4 = 0
        L.make_landscape(n=16, lam=3.0, gamma=0.5, lam_spread=2.0, policy_curvature=0.2, h_task=0.4),
    ])
    coeffs = jax.jit(jax.vmap(lambda p, b, x: utility_taylor_coeffs(L.landscape_loss, p, b, L.landscape_logits,
                                                                   x, 5)))(grid.params, grid.batch, grid.inputs)
    coeffs = np.asarray(coeffs)
    np.testing.assert_allclose(coeffs[:, :4], 0.0, atol=1e-15)
    np.testing.assert_allclose(coeffs[:, 4], grid.info["a4"], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(coeffs[:, 5], grid.info["a5"], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(grid.info["a4"], grid.info["a4_JHg"] + grid.info["a4_curv"] + grid.info["a4_cross"],
                               rtol=1e-14, atol=1e-16)
    # with lam_spread = 1: a4_JHg = λ γ²/8 = the E-bound (the F-bound coincides)
    np.testing.assert_allclose(grid.info["a4_JHg"][0], grid.info["bound_E"][0], rtol=1e-14)
    assert grid.info["a4_cross"][2] < 0 and grid.info["a4"][2] == 0.0


def test_grid_and_stack_vmap_match_individual():
    grid = L.landscape_grid(n=16, lam=[0.5, 1.0, 2.0], gamma=[0.3, 3.0], eps=0.01)
    assert grid.info["grid_shape"] == (3, 2) and grid.params["theta"].shape == (6, 16)
    np.testing.assert_array_equal(grid.info["lam"].reshape(3, 2)[:, 0], [0.5, 1.0, 2.0])
    losses = jax.vmap(lambda p, b: jax.grad(L.landscape_loss)(p, b)["theta"])(grid.params, grid.batch)
    one = L.make_landscape(n=16, lam=2.0, gamma=0.3, eps=0.01)
    np.testing.assert_allclose(losses[4], jax.grad(one.loss_fn)(one.params, one.batch)["theta"], rtol=1e-14)
    z = jax.vmap(L.landscape_logits)(grid.params, grid.inputs)
    assert z.shape == (6, 8, 2)
    with pytest.raises(ValueError):
        L.stack_landscapes([L.make_landscape(n=16), L.make_landscape(n=17)])


def test_matrix_free_large_n():
    n = 100_000
    ls = L.make_landscape(n=n, eps=0.05, gamma=2.0, tail=0.1, policy_curvature=0.3)
    g = jax.grad(ls.loss_fn)(ls.params, ls.batch)
    B = ls.basis["theta"]
    Pg = B.T @ (B @ g["theta"])
    np.testing.assert_allclose(np.linalg.norm(Pg), 0.05, rtol=1e-10)
    Hg = hvp(ls.loss_fn, ls.params, g, ls.batch)["theta"]
    np.testing.assert_allclose(np.linalg.norm(B @ Hg), 2.0, rtol=1e-10)
    assert ls.logits_fn(ls.params, ls.inputs).shape == (8, 2)


def test_float32_and_minibatch_noise():
    ls = L.make_landscape(n=32, dtype=jnp.float32, n_examples=6, grad_noise=0.5, key=jax.random.PRNGKey(3))
    assert ls.params["theta"].dtype == jnp.float32 and ls.batch["noise"].dtype == jnp.float32
    ref = L.make_landscape(n=32, key=jax.random.PRNGKey(3))
    theta = {"theta": jnp.linspace(-1, 1, 32)}
    full = ls.loss_fn({"theta": theta["theta"].astype(jnp.float32)}, ls.batch)
    np.testing.assert_allclose(full, ref.loss_fn(theta, ref.batch), rtol=1e-5)  # noise is centred
    mb = ls.minibatch_fn(jax.random.PRNGKey(0), ls.batch, 2)
    assert mb["noise"].shape == (2, 32)
    assert abs(float(ls.loss_fn({"theta": theta["theta"].astype(jnp.float32)}, mb)) - float(full)) > 1e-3
    with pytest.raises(ValueError):
        L.landscape_minibatch(jax.random.PRNGKey(0), ref.batch, 2)


def test_bad_configs():
    with pytest.raises(ValueError, match="n must be"):
        L.make_landscape(n=5, d=4)
    with pytest.raises(ValueError, match="tail"):
        L.make_landscape(n=24, tail=3.0)  # first tail eigenvalue would exceed λ_d
    with pytest.raises(ValueError, match="lam"):
        L.make_landscape(lam=0.0)


def test_aic_measure_reproduces_configuration():
    from alignment_geom import aic

    ls = L.make_landscape(n=24, eps=0.3, lam=0.7, gamma=1.7, lam_spread=3.0, offset=0.5, tail=0.2)
    rep = aic.measure(ls.loss_fn, ls.params, ls.batch, ls.logits_fn, ls.inputs, 4)
    np.testing.assert_allclose(rep.lam, 0.7, rtol=1e-8)
    np.testing.assert_allclose(rep.gamma_E, 1.7, rtol=1e-8)
    np.testing.assert_allclose(rep.eps, 0.3, rtol=1e-8)
    np.testing.assert_allclose(rep.gamma_F, ls.info["gamma_F"], rtol=1e-8)
    np.testing.assert_allclose(rep.eps_F, ls.info["eps_F"], rtol=1e-8)
    np.testing.assert_allclose(rep.tail, 0.2, rtol=1e-8)
    np.testing.assert_allclose(rep.t_min, ls.info["t_min"], rtol=1e-8)
    # ε = 0: the closed-form c3_F and t0 = γ_F/(4 c3_F)
    ls = L.make_landscape(n=24, third_order=3.0, lam=2.0, gamma=0.8)
    rep = aic.measure(ls.loss_fn, ls.params, ls.batch, ls.logits_fn, ls.inputs, 4)
    np.testing.assert_allclose(rep.eps, 0.0, atol=1e-12)
    np.testing.assert_allclose(rep.c3_F, ls.info["c3_F"], rtol=1e-8)
    np.testing.assert_allclose(rep.t0, ls.info["t0"], rtol=1e-8)
    np.testing.assert_allclose(rep.c4_bound_F, ls.info["bound_F"], rtol=1e-8)


def _sliced_loss(params, batch):
    """The module docstring's L(θ) written term by term with the slices s, w, y (the reference form)."""
    x = params["theta"] - batch["theta0"]
    delta = x - 2.0 * batch["v"] * jnp.dot(batch["v"], x)
    d, nt = batch["c"].shape[-1], batch["c_tail"].shape[-1]
    s, w, y = delta[:d], delta[d], delta[d + 1:d + 1 + nt]
    loss = (jnp.dot(batch["b"], delta) + 0.5 * jnp.dot(batch["h"], delta * delta)
            + w * (jnp.dot(batch["c"], s) + jnp.dot(batch["c_tail"], y)) + 0.5 * w * w * jnp.dot(batch["k3"], s))
    if "noise" in batch:
        loss = loss + jnp.dot(jnp.mean(batch["noise"], axis=0), delta)
    return loss


@pytest.mark.parametrize("cfg", CONFIGS + [dict(n=12, d=2, n_tail=0, third_order=0.5, n_examples=3, grad_noise=0.1)])
def test_loss_equals_sliced_reference_formula(cfg):
    # landscape_loss uses full-length vectors (no pads in its gradient): same value, gradient and
    # Hessian as the sliced formula, at θ* and at random points away from it.
    ls = L.make_landscape(**{"third_order": 0.7, **cfg})
    for i in range(3):
        shift = 0.0 if i == 0 else jax.random.normal(jax.random.PRNGKey(i), ls.params["theta"].shape)
        theta = ls.params["theta"] + shift
        p = {"theta": theta}
        np.testing.assert_allclose(L.landscape_loss(p, ls.batch), _sliced_loss(p, ls.batch), rtol=1e-13, atol=1e-14)
        np.testing.assert_allclose(jax.grad(L.landscape_loss)(p, ls.batch)["theta"],
                                   jax.grad(_sliced_loss)(p, ls.batch)["theta"], rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(dense_hessian(L.landscape_loss, p, ls.batch)[0],
                               dense_hessian(_sliced_loss, p, ls.batch)[0], rtol=1e-12, atol=1e-13)
