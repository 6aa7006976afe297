"""alignment_geom.dynamics (flow, paths, record) and curvature.utility_taylor: closed forms, dense oracles, and the
quartic-onset acceptance checks on the synthetic landscapes."""
import math

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from alignment_geom import curvature, dynamics, scaling
from alignment_geom import landscapes as L
from alignment_geom.testing import dense_fisher, mlp_model, relative_error, softmax_regression_model

# --------------------------------------------------------------------------- quadratic closed forms


def _quadratic(n=10, cond=1e3, seed=0):
    rng = np.random.default_rng(seed)
    V, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = np.geomspace(1.0, cond, n)
    H = (V * lam) @ V.T
    g = rng.standard_normal(n)
    theta0 = rng.standard_normal(n)
    params = {"a": jnp.asarray(theta0[:n // 2]), "b": jnp.asarray(theta0[n // 2:])}

    def loss(p, batch):
        x = jnp.concatenate([p["a"], p["b"]]) - batch["theta0"]
        return jnp.dot(batch["g"], x) + 0.5 * x @ batch["H"] @ x

    batch = {"H": jnp.asarray(H), "g": jnp.asarray(g), "theta0": jnp.asarray(theta0)}
    return loss, params, batch, H, g


def _closed_form(H, g, ts):
    """θ(t) − θ* = −H⁻¹(I − e^{−Ht}) g, with (1 − e^{−λt})/λ = −expm1(−λt)/λ (no cancellation)."""
    lam, V = np.linalg.eigh(H)
    gt = V.T @ g
    return np.stack([-V @ (-np.expm1(-lam * t) / lam * gt) for t in ts])


def _flat(path):
    return np.concatenate([np.asarray(path["a"]), np.asarray(path["b"])], axis=1)


def test_dopri5_stiff_quadratic_closed_form():
    loss, params, batch, H, g = _quadratic(cond=1e3)
    ts = np.logspace(-4, 1, 26)
    disp = _flat(dynamics.gradient_flow(loss, params, batch, ts, output="displacement"))
    exact = _closed_form(H, g, ts)
    rel = np.linalg.norm(disp - exact, axis=1) / np.linalg.norm(exact, axis=1)
    assert rel.max() <= 1e-8, rel.max()
    # the "params" output is θ* + δ (same integration)
    path = _flat(dynamics.gradient_flow(loss, params, batch, ts))
    np.testing.assert_allclose(path, np.asarray(batch["theta0"]) + disp, rtol=0, atol=1e-15)


def test_rk4_closed_form_and_convergence_order():
    loss, params, batch, H, g = _quadratic(cond=10.0, seed=1)  # eigenvalues 1 … 10
    ts = np.logspace(-2, 0, 7)
    exact = _closed_form(H, g, ts)
    errs = []
    for steps in (16, 32):
        disp = _flat(dynamics.gradient_flow(loss, params, batch, ts, method="rk4", steps=steps, output="displacement"))
        errs.append(np.max(np.linalg.norm(disp - exact, axis=1) / np.linalg.norm(exact, axis=1)))
    assert errs[1] < 1e-8
    assert 12 < errs[0] / errs[1] < 20  # fourth order: 2⁴ = 16


def test_masked_flow_and_static_projection_closed_forms():
    loss, params, batch, H, g = _quadratic(n=8, cond=30.0, seed=2)
    ts = np.array([0.05, 0.5, 2.0])
    # mask: only "a" (the first 4 coordinates) moves, with the sub-block H_SS and g_S
    disp = _flat(dynamics.gradient_flow(loss, params, batch, ts, mask={"a": True, "b": False}, output="displacement"))
    np.testing.assert_allclose(disp[:, 4:], 0.0, atol=0)
    np.testing.assert_allclose(disp[:, :4], _closed_form(H[:4, :4], g[:4], ts), rtol=1e-8)
    # static projection defence: δ stays in range(I − P) and follows the projected quadratic
    rng = np.random.default_rng(3)
    Qf, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    Bp, Qc = Qf[:, :2].T, Qf[:, 2:]
    basis = {"a": jnp.asarray(Bp[:, :4]), "b": jnp.asarray(Bp[:, 4:])}
    disp = _flat(dynamics.gradient_flow(loss, params, batch, ts, velocity=dynamics.projection_defense(basis),
                                    output="displacement"))
    np.testing.assert_allclose(disp @ Bp.T, 0.0, atol=1e-13)
    exact = _closed_form(Qc.T @ H @ Qc, Qc.T @ g, ts) @ Qc.T
    np.testing.assert_allclose(disp, exact, rtol=1e-8, atol=1e-12)


def test_bad_inputs():
    loss, params, batch, _, _ = _quadratic(n=4)
    with pytest.raises(ValueError, match="non-decreasing"):
        dynamics.gradient_flow(loss, params, batch, np.array([1.0, 0.5]))
    with pytest.raises(ValueError, match="method"):
        dynamics.gradient_flow(loss, params, batch, np.array([1.0]), method="euler")
    with pytest.raises(ValueError, match="batch_size"):
        dynamics.discrete_path(loss, params, batch, np.array([1.0]), lr=0.1, optimizer="sgd")
    with pytest.raises(ValueError, match="order"):
        curvature.utility_taylor(loss, params, batch, None, None, 0)


# --------------------------------------------------------------------------- stable KL


def test_stable_kl_matches_kl_and_log_cosh():
    from alignment_geom.curvature import kl_utility

    model = softmax_regression_model(jax.random.PRNGKey(0))
    p2 = jax.tree_util.tree_map(lambda x: x + 0.3 * jnp.cos(jnp.arange(x.size).reshape(x.shape)), model.params)
    np.testing.assert_allclose(curvature.stable_kl_utility(model.logits_fn, model.params, p2, model.inputs),
                               kl_utility(model.logits_fn, model.params, p2, model.inputs), rtol=1e-13)
    # binary heads at p = ½: KL(½ ‖ σ(x)) = log cosh(x/2), from x = 1e-9 (KL ~ 1e-19) to x = 60
    x = jnp.array([1e-9, 1e-5, 0.05, 0.3, 1.5, 8.0, 60.0])
    ref = jnp.zeros_like(x)
    kl = curvature.stable_kl(jnp.stack([ref, ref], -1), jnp.stack([ref, x], -1))
    exact = np.log1p(2 * np.sinh(np.asarray(x) / 4) ** 2)  # log cosh(x/2) without cancellation
    np.testing.assert_allclose(kl, exact, rtol=1e-13)


# --------------------------------------------------------------------------- utility_taylor vs dense


def _nth_coeff(f, k):
    """[t^k] of a function of a scalar t at 0: the k-th nested jacfwd / k!."""
    d = f
    for _ in range(k):
        d = jax.jacfwd(d)
    return d(jnp.zeros(())) / math.factorial(k)


def _dense_utility_coeffs(model, order):
    """Oracle: Picard iteration for the flow's Taylor polynomial, then nested jacfwd of a naive Δu."""
    flat0, unravel = jax.flatten_util.ravel_pytree(model.params)
    return np.asarray(jax.jit(lambda f: _dense_utility_coeffs_impl(model, f, unravel, order))(flat0))


def _dense_utility_coeffs_impl(model, flat0, unravel, order):
    grad = lambda f: jax.flatten_util.ravel_pytree(jax.grad(model.loss_fn)(unravel(f), model.batch))[0]  # noqa: E731
    cs = [-grad(flat0)]
    poly = lambda t, cs: flat0 + sum(c * t ** (j + 1) for j, c in enumerate(cs))  # noqa: E731
    for k in range(1, order):
        cs.append(-_nth_coeff(lambda t: grad(poly(t, cs)), k) / (k + 1))

    def du(t):
        zr = model.logits_fn(model.params, model.inputs)
        z = model.logits_fn(unravel(poly(t, cs)), model.inputs)
        pr = jax.nn.softmax(zr, -1)
        return jnp.mean(jnp.sum(pr * (jax.nn.log_softmax(zr, -1) - jax.nn.log_softmax(z, -1)), -1))

    return jnp.stack([_nth_coeff(du, k) for k in range(order + 1)])


@pytest.mark.parametrize("make", [mlp_model, softmax_regression_model], ids=["mlp_curved", "linear_logits"])
def test_utility_taylor_vs_dense_differentiation(make):
    model = make(jax.random.PRNGKey(4), m=6)
    a = np.array(curvature.utility_taylor(model.loss_fn, model.params, model.batch, model.logits_fn, model.inputs, 4))
    ref = _dense_utility_coeffs(model, 4)
    np.testing.assert_allclose(a, ref, rtol=1e-10, atol=1e-15)
    # a_2 = ½ gᵀ F g (dense Fisher)
    g = jax.flatten_util.ravel_pytree(jax.grad(model.loss_fn)(model.params, model.batch))[0]
    F = dense_fisher(model.logits_fn, model.params, model.inputs)
    np.testing.assert_allclose(a[2], 0.5 * g @ F @ g, rtol=1e-10)
    split = curvature.onset_split(model.loss_fn, model.params, model.batch, model.logits_fn, model.inputs, order=4)
    np.testing.assert_allclose(split["a4"], a[4], rtol=1e-12)
    if make is softmax_regression_model:  # linear logits: D²z = 0
        assert split["a4_curv"] == 0.0 and split["a4_cross"] == 0.0
    else:
        assert abs(split["a4_curv"]) > 1e-8


def test_utility_taylor_jet_equals_jvp():
    ls = L.make_landscape(n=12, d=2, n_tail=1, eps=0.2, policy_curvature=0.4, third_order=1.0, base_logit=0.5)
    a = curvature.utility_taylor(ls.loss_fn, ls.params, ls.batch, ls.logits_fn, ls.inputs, 5)
    b = curvature.utility_taylor(ls.loss_fn, ls.params, ls.batch, ls.logits_fn, ls.inputs, 5, method="jvp")
    np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-15)
    assert a[2] > 0 and a[3] != 0  # ε > 0: the t² and t³ terms are present


# --------------------------------------------------------------------------- landscapes: acceptance

TS = np.logspace(-4, 0.5, 91)


@pytest.fixture(scope="module")
def onset_grid():
    """Default, ε > 0 and strong-third-order landscapes, integrated in one vmapped, jitted flow."""
    grid = L.stack_landscapes([L.make_landscape(), L.make_landscape(eps=1e-3), L.make_landscape(third_order=30.0)])

    @jax.jit
    @jax.vmap
    def run(p, b, x):
        path = dynamics.gradient_flow(L.landscape_loss, p, b, TS)
        du = jax.vmap(lambda th: curvature.stable_kl_utility(L.landscape_logits, p, th, x))(path)
        return du, curvature.utility_taylor_coeffs(L.landscape_loss, p, b, L.landscape_logits, x, 5)

    du, coeffs = run(grid.params, grid.batch, grid.inputs)
    return grid, np.asarray(du), np.asarray(coeffs)


def test_quartic_onset_default_landscape(onset_grid):
    grid, du, coeffs = onset_grid
    y, a4 = du[0], coeffs[0, 4]
    lo, hi = scaling.onset_window(TS, y)
    assert lo == TS[0] and hi / lo > 1e3  # the window spans > 3 decades
    sel = (TS >= lo) & (TS <= hi)
    fit = scaling.power_law_fit(TS[sel], y[sel])
    assert abs(fit["exponent"] - 4) < 0.05
    assert abs(scaling.fit_coefficient(TS, y, (lo, hi)) / a4 - 1) < 0.01
    assert abs(scaling.fit_coefficient(TS, y, (lo, hi), method="mean") / a4 - 1) < 0.01
    # ε = 0: a₂ = a₃ = 0 and a₄, a₅ equal the landscape's closed forms (a₅ sees the flow's c₃ = −(H²g + D³L[g,g])/6
    # through B_i; a₄ alone would not), for the default and the strong-third-order landscapes
    for i in (0, 2):
        scale = abs(grid.info["a4"][i])
        np.testing.assert_allclose(coeffs[i, 2:4], 0.0, atol=1e-13 * scale)
        np.testing.assert_allclose(coeffs[i, 4], grid.info["a4"][i], rtol=1e-10)
        np.testing.assert_allclose(coeffs[i, 5], grid.info["a5"][i], rtol=1e-10)
    # and the measured Δu: y = a₄t⁴ + a₅t⁵ + O(t⁶) at t = 1e-4 (relative remainder ~ (a₆/a₄) t² ≈ 1e-8)
    np.testing.assert_allclose(y[0], grid.info["a4"][0] * TS[0] ** 4 + grid.info["a5"][0] * TS[0] ** 5, rtol=1e-6)


def test_eps_regime_below_t_min(onset_grid):
    grid, du, coeffs = onset_grid
    y, t_min = du[1], grid.info["t_min"][1]
    s = scaling.local_slope(TS, y)
    assert np.all(np.abs(s[TS < t_min / 10] - 2) < 0.05)  # slope-2 (first-order, ε t) regime
    lo, hi = scaling.onset_window(TS, y)
    # the window opens where a2 t² stops mattering: t_lo = sqrt(19 a2/a4) = √19 t_min (slope 3.9);
    # resolved to the grid (ratio 10^0.05)
    t_lo_pred = scaling.predicted_window(coeffs[1])[0]
    np.testing.assert_allclose(t_lo_pred, math.sqrt(19) * t_min, rtol=1e-3)
    assert t_lo_pred <= lo < 1.13 * t_lo_pred
    assert t_min < lo < 2 * math.sqrt(19) * t_min


def test_third_order_ends_window_near_t0(onset_grid):
    grid, du, coeffs = onset_grid
    y = du[2]
    t0 = scaling.predicted_window(coeffs[2])[1]
    np.testing.assert_allclose(t0, grid.info["t0_taylor"][2], rtol=1e-10)
    lo, hi = scaling.onset_window(TS, y)
    assert t0 / 2 < hi < 2 * t0
    assert hi < scaling.onset_window(TS, du[0])[1] / 50  # the knob moved the end by > 50×
    # against aic's t0 = γ_F/(4 c3_F) (cubic drift = ½ quadratic): t0_taylor = t0/10 here, so the
    # ±0.1 slope window closes about a decade before it
    np.testing.assert_allclose(grid.info["t0"][2] / t0, 10.0, rtol=0.02)
    assert grid.info["t0"][2] / 20 < hi < grid.info["t0"][2] / 5


def test_discrete_gd_tracks_flow_then_leaves_it():
    ls = L.make_landscape(n=32)
    ts = np.array([0.5, 1.0])  # GD's drift lags by O(η/t): δ_s = cG(t² − ηt)/2, so compare at t ≫ η
    ref = dynamics.record_path(dynamics.gradient_flow(ls.loss_fn, ls.params, ls.batch, ts), ts, params0=ls.params,
                           logits_fn=ls.logits_fn, inputs=ls.inputs)["du"]
    errs = []
    for lr in (1e-3, 1e-2, 1e-1):
        path, actual = dynamics.discrete_path(ls.loss_fn, ls.params, ls.batch, ts, lr=lr)
        np.testing.assert_allclose(actual, np.rint(ts / lr) * lr, rtol=1e-14)
        du = dynamics.record_path(path, actual, params0=ls.params, logits_fn=ls.logits_fn, inputs=ls.inputs)["du"]
        # compare at the rounded times: Δu(t) ≈ a4 t⁴ locally, so rescale the flow value
        errs.append(np.max(np.abs(du / (ref * (actual / ts) ** 4) - 1)))
    errs = np.array(errs)
    assert errs[0] < 0.01  # tracks the flow ...
    assert np.all((errs[1:] / errs[:-1] > 5) & (errs[1:] / errs[:-1] < 15))  # ... with an O(η) error ...
    assert errs[2] > 0.1  # ... and leaves it as η grows


def test_sgd_and_adam_paths():
    ls = L.make_landscape(n=16, n_examples=4, grad_noise=0.3)
    ts = np.array([0.0104, 0.02, 0.05])
    gd, act = dynamics.discrete_path(ls.loss_fn, ls.params, ls.batch, ts, lr=0.01)
    np.testing.assert_allclose(act, [0.01, 0.02, 0.05], rtol=1e-14)
    full, _ = dynamics.discrete_path(ls.loss_fn, ls.params, ls.batch, ts, lr=0.01, optimizer="sgd", batch_size=4,
                                 sample_fn=lambda k, b: ls.minibatch_fn(k, b, 4), key=jax.random.PRNGKey(1))
    np.testing.assert_allclose(full["theta"], gd["theta"], rtol=1e-12, atol=1e-15)  # full minibatch = GD
    one, _ = dynamics.discrete_path(ls.loss_fn, ls.params, ls.batch, ts, lr=0.01, optimizer="sgd", batch_size=1,
                                sample_fn=lambda k, b: ls.minibatch_fn(k, b, 1), key=jax.random.PRNGKey(1))
    assert np.abs(np.asarray(one["theta"] - gd["theta"])).max() > 1e-4
    adam, _ = dynamics.discrete_path(ls.loss_fn, ls.params, ls.batch, ts, lr=0.01, optimizer="adam")
    # Adam's first step moves every coordinate with a nonzero gradient by ≈ lr (sign-like update)
    g = np.asarray(jax.grad(ls.loss_fn)(ls.params, ls.batch)["theta"])
    step1 = np.asarray(adam["theta"][0])
    big = np.abs(g) > 1e-3
    np.testing.assert_allclose(np.abs(step1[big]), 0.01, rtol=1e-5)


def test_defences_static_still_quartic_dynamic_delays():
    ls = L.make_landscape(n=24, policy_curvature=0.5, tail=0.1, tail_coupling=0.3)
    ts = np.logspace(-3, 0, 31)
    rec = {}
    for name, vel in [("none", None), ("static", dynamics.projection_defense(ls.basis)),
                      ("dynamic", dynamics.dynamic_projection_defense(ls.logits_fn, ls.inputs, 4))]:
        path = dynamics.gradient_flow(ls.loss_fn, ls.params, ls.batch, ts, velocity=vel, rtol=1e-9)
        rec[name] = dynamics.record_path(path, ts, params0=ls.params, logits_fn=ls.logits_fn, inputs=ls.inputs)["du"]
    info = ls.info
    for name, a4 in [("none", info["a4"]), ("static", info["a4_curv"] + info["a4_tail"]),
                     ("dynamic", info["a4_tail"])]:
        y = rec[name]
        lo, hi = scaling.onset_window(ts, y)
        assert lo == ts[0] and hi > 0.05, (name, lo, hi)  # still a quartic onset ...
        np.testing.assert_allclose(scaling.fit_coefficient(ts, y, (lo, hi)), a4, rtol=0.01)  # ... with this a4
    thr = 1e-5
    t_none, t_static, t_dyn = (scaling.collapse_time(ts, rec[k], thr) for k in ("none", "static", "dynamic"))
    assert t_none < t_static < t_dyn
    assert np.all(rec["dynamic"] < rec["static"])


def test_record_path_measurements_and_rotation():
    pc = 0.5
    ls = L.make_landscape(n=24, policy_curvature=pc)
    ts = np.logspace(-3, 0, 7)
    path = dynamics.gradient_flow(ls.loss_fn, ls.params, ls.batch, ts)
    rec = dynamics.record_path(path, ts, params0=ls.params, logits_fn=ls.logits_fn, inputs=ls.inputs,
                           loss_fn=ls.loss_fn, batch=ls.batch, basis=ls.basis, taylor_order=4)
    delta = np.asarray(path["theta"])  # θ* = 0
    B = np.asarray(ls.basis["theta"])
    coef = delta @ B.T
    lam = np.asarray(ls.fisher_eigvals)[:4]
    np.testing.assert_allclose(rec["drift_F"], np.sqrt((coef ** 2) @ lam), rtol=1e-10)
    np.testing.assert_allclose(rec["drift_E"], np.linalg.norm(coef, axis=1), rtol=1e-12)
    np.testing.assert_allclose(rec["proj_ratio"], np.linalg.norm(coef, axis=1) / np.linalg.norm(delta, axis=1),
                               rtol=1e-12)
    np.testing.assert_allclose(rec["loss"], [float(ls.loss_fn({"theta": jnp.asarray(d)}, ls.batch)) for d in delta],
                               rtol=1e-12)
    # rotation: P(θ) = span{e_si + κ_i w e_w} (latent), so one principal angle is arctan(|w| |κ|), the rest 0
    v = np.asarray(ls.batch["v"])
    w = delta[:, 4] - 2 * v[4] * (delta @ v)
    np.testing.assert_allclose(rec["angles"][:, -1], np.arctan(np.abs(w) * pc), rtol=1e-8)
    np.testing.assert_allclose(rec["angles"][:, :-1], 0.0, atol=1e-7)
    assert np.all(rec["proj_ratio_dynamic"] >= rec["proj_ratio"])
    # orthogonality illusion: the first-order path θ* − t g has s = 0, only the policy curvature moves z:
    # Δζ_i = a_i κ_i G² t²/2 and KL(½ ‖ σ(x)) = log cosh(x/2)
    x = np.asarray(ls.inputs["a"])[None] * (pc / 2) * 0.5 * ts[:, None] ** 2
    np.testing.assert_allclose(rec["du_first_order"], np.sum(np.log1p(2 * np.sinh(x / 4) ** 2), 1) / 8, rtol=1e-10)
    assert np.all(rec["du_first_order"] < rec["du"] / 5)
    # Taylor predictions converge to Δu as t → 0
    err4 = np.abs(rec["du_taylor_4"] / rec["du"] - 1)
    assert err4[0] < 1e-4 and err4[0] < err4[3]


def test_float32_flow_and_rk4_vmap_on_landscapes():
    ls64 = L.make_landscape(n=32)
    ls32 = L.make_landscape(n=32, dtype=jnp.float32)
    ts = np.array([0.1, 0.5])
    p64 = dynamics.gradient_flow(ls64.loss_fn, ls64.params, ls64.batch, ts, method="rk4", steps=16)
    p32 = dynamics.gradient_flow(ls32.loss_fn, ls32.params, ls32.batch, ts, method="rk4", steps=16)
    assert p32["theta"].dtype == jnp.float32
    assert relative_error(p32, p64) < 1e-5
    pd = dynamics.gradient_flow(ls64.loss_fn, ls64.params, ls64.batch, ts)
    assert relative_error(p64, pd) < 1e-8
