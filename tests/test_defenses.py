"""The defences as optax transformations (dynamics.defenses): each against a direct dense implementation (float64,
jax.hessian / jax.jacfwd on ravelled parameters, numpy eigh), under jit, with masks, sharded over 8 host devices;
their gradient-flow velocities; the coupling-suppression derivation; and the defences landscape study."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from alignment_geom import harness, studies, testing
from alignment_geom.aic import SensitiveSubspace, TrueFisher
from alignment_geom.dynamics import defenses as D
from alignment_geom.dynamics import gradient_flow
from alignment_geom.linalg import top_eigenpairs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL = 1e-10
DIM = 3
LR = 0.05
STRENGTH = 2.5


# --------------------------------------------------------------------------- dense oracles (no library operators)


def _jac(pb, params):
    """(logits z (M, C), dense Jacobian (M, C, n)) of the safety logits at params (jax.jacfwd, jitted)."""
    flat, unravel = ravel_pytree(params)
    z = np.asarray(pb.logits_fn(params, pb.inputs))
    J = np.asarray(jax.jit(jax.jacfwd(lambda f: pb.logits_fn(unravel(f), pb.inputs)))(flat))
    return z.reshape(-1, z.shape[-1]), J.reshape(-1, z.shape[-1], flat.size)


def dense_F(pb, params, idx=None):
    """The true Fisher mean_x Jᵀ(diag p − ppᵀ)J at params from the dense Jacobian (restricted to idx)."""
    z, J = _jac(pb, params)
    p = np.exp(z - z.max(-1, keepdims=True)).reshape(-1, z.shape[-1])
    p /= p.sum(-1, keepdims=True)
    F = sum(J[i].T @ (np.diag(p[i]) - np.outer(p[i], p[i])) @ J[i] for i in range(J.shape[0])) / J.shape[0]
    return F if idx is None else F[np.ix_(idx, idx)]


def dense_H(pb, params, batch=None, idx=None):
    flat, unravel = ravel_pytree(params)
    H = np.asarray(jax.jit(jax.hessian(lambda f, b: pb.loss_fn(unravel(f), b)))(flat, pb.batch if batch is None
                                                                                   else batch))
    return H if idx is None else H[np.ix_(idx, idx)]


def top_rows(F, d=DIM):
    w, V = np.linalg.eigh(F)
    return V[:, ::-1][:, :d].T, w[::-1][:d]


def dense_grad_du(pb, theta_star, theta):
    """∇Δu(θ) = mean_x J_x(θ)ᵀ (p_θ − p_θ*), Δu = mean KL(π_θ* ‖ π_θ)."""
    def sm(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    z, J = _jac(pb, theta)
    z0, _ = _jac(pb, theta_star)
    return np.einsum("mc,mcn->n", sm(z) - sm(z0), J) / J.shape[0]


def flat(t):
    return np.asarray(ravel_pytree(t)[0])


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def setup():
    pb = testing.mlp_model(jax.random.PRNGKey(3))
    theta_star = pb.params
    f0, unravel = ravel_pytree(theta_star)
    n = f0.size
    rng = np.random.default_rng(0)
    delta = 0.05 * rng.standard_normal(n)
    theta = unravel(f0 + delta)
    g = rng.standard_normal(n)
    U, lam = top_rows(dense_F(pb, theta_star))
    sub = SensitiveSubspace(jax.vmap(unravel)(jnp.asarray(U)), jnp.asarray(lam), jnp.zeros(DIM))
    return dict(pb=pb, unravel=unravel, f0=np.asarray(f0), delta=delta, theta=theta, g=g, gt=unravel(jnp.asarray(g)),
                U=U, lam=lam, sub=sub, n=n)


def _apply(tx, s, params=None, **extra):
    """The (jitted) update of ``s["gt"]`` at ``params`` (default s["theta"]) from a fresh state."""
    params = s["theta"] if params is None else params
    return flat(jax.jit(lambda g, p, e: tx.update(g, tx.init(p), p, **e)[0])(s["gt"], params, extra))


# --------------------------------------------------------------------------- each transformation vs dense


def test_static_projection_matches_dense(setup):
    s = setup
    out = _apply(D.static_projection(s["sub"]), s)
    np.testing.assert_allclose(out, s["g"] - s["U"].T @ (s["U"] @ s["g"]), rtol=RTOL, atol=1e-13)
    assert abs(s["U"] @ out).max() < 1e-12


def test_fisher_penalty_matches_dense(setup):
    s, pb = setup, setup["pb"]
    F = dense_F(pb, pb.params)
    out = _apply(D.fisher_penalty(pb, STRENGTH), s)
    np.testing.assert_allclose(out, s["g"] + STRENGTH * F @ s["delta"], rtol=RTOL, atol=1e-13)
    low = _apply(D.fisher_penalty(pb, STRENGTH, subspace=s["sub"]), s)
    np.testing.assert_allclose(low, s["g"] + STRENGTH * s["U"].T @ (s["lam"] * (s["U"] @ s["delta"])), rtol=RTOL,
                               atol=1e-13)
    # the empirical Fisher of the safe completions when the problem has no logits
    flat0, unravel = ravel_pytree(pb.params)
    G = np.asarray(jax.jit(jax.jacrev(lambda f: pb.logprob_fn(unravel(f), pb.safety_batch)))(flat0))   # (m, n)
    emp = _apply(D.fisher_penalty(pb.replace(logits_fn=None), STRENGTH), s)
    np.testing.assert_allclose(emp, s["g"] + STRENGTH * G.T @ (G @ s["delta"]) / G.shape[0], rtol=RTOL, atol=1e-13)


def test_utility_penalty_matches_dense_and_fisher_to_first_order(setup):
    s, pb = setup, setup["pb"]
    out = _apply(D.utility_penalty(pb, STRENGTH), s)
    np.testing.assert_allclose(out, s["g"] + STRENGTH * dense_grad_du(pb, pb.params, s["theta"]), rtol=RTOL,
                               atol=1e-13)
    F = dense_F(pb, pb.params)
    errs = []
    for eps in (1e-2, 5e-3):   # ∇Δu(θ* + εv) − ε F v = O(ε²)
        th = s["unravel"](jnp.asarray(s["f0"] + eps * s["delta"]))
        errs.append(np.linalg.norm(dense_grad_du(pb, pb.params, th) - eps * F @ s["delta"]))
    assert 3.5 < errs[0] / errs[1] < 4.5


def test_coupling_suppression_matches_dense_and_takes_the_batch(setup):
    s, pb = setup, setup["pb"]
    H = dense_H(pb, pb.params)
    out = _apply(D.coupling_suppression(pb, s["sub"]), s)
    PHd = s["U"].T @ (s["U"] @ (H @ s["delta"]))
    np.testing.assert_allclose(out, s["g"] - PHd, rtol=RTOL, atol=1e-13)
    # through optax.chain, the step's minibatch reaches the HVP (H on that batch)
    half = jax.tree_util.tree_map(lambda x: x[:5], pb.batch)
    tx = optax.chain(D.coupling_suppression(pb, s["sub"]), optax.sgd(LR))
    step = _apply(tx, s, batch=half)
    Hb = dense_H(pb, pb.params, batch=half)
    np.testing.assert_allclose(step, -LR * (s["g"] - s["U"].T @ (s["U"] @ (Hb @ s["delta"]))), rtol=RTOL, atol=1e-13)


@pytest.mark.parametrize("estimator", ["factor", "lanczos_warm"])
def test_dynamic_projection_matches_dense_descent(setup, estimator):
    """Seven GD steps through optax.chain(dynamic_projection(every=3), sgd) against a direct loop that re-solves the
    dense Fisher eigenproblem at steps 0, 3, 6."""
    s, pb = setup, setup["pb"]
    every, steps = 3, 7
    est = TrueFisher("factor") if estimator == "factor" else TrueFisher("lanczos", tol=1e-13, num_steps=40)
    tx = optax.chain(D.dynamic_projection(pb, DIM, every=every, estimator=est), optax.sgd(LR))

    @jax.jit
    def run():
        def body(carry, _):
            p, st = carry
            upd, st = tx.update(jax.grad(pb.loss_fn)(p, pb.batch), st, p)
            return (optax.apply_updates(p, upd), st), None
        (p, st), _ = jax.lax.scan(body, (pb.params, tx.init(pb.params)), None, length=steps)
        return p, st[0]

    p_tx, state = run()
    x = s["f0"].copy()
    for k in range(steps):
        th = s["unravel"](jnp.asarray(x))
        if k % every == 0:
            U, _ = top_rows(dense_F(pb, th))
        g = flat(jax.grad(pb.loss_fn)(th, pb.batch))
        x = x - LR * (g - U.T @ (U @ g))
    np.testing.assert_allclose(flat(p_tx), x, rtol=RTOL, atol=1e-12)
    assert int(state.count) == steps and int(state.refreshes) == 3
    if estimator == "factor":
        assert int(state.matvecs) == 3 * D.refresh_cost(est, pb, DIM) == 3 * 30   # M·C = 10 inputs × 3 classes


@pytest.mark.parametrize("method", ["lanczos", "randomized"])
def test_warm_started_refresh_is_cheaper(setup, method):
    """A refresh at θ near θ*, started from the exact subspace at θ*, finds the same projector as a cold (random)
    start with fewer Fisher-vector products."""
    s, pb = setup, setup["pb"]
    est = TrueFisher(method, tol=1e-10, num_steps=40 if method == "lanczos" else None)
    prev = s["sub"].basis                                            # the exact subspace at θ*
    near = s["unravel"](jnp.asarray(s["f0"] + 0.1 * s["delta"]))      # a step away
    f = jax.jit(lambda init, k: D.estimate_subspace(pb.replace(params=near), DIM, est, k, init=init))
    Ue, _ = top_rows(dense_F(pb, near))
    warm = f(prev, jax.random.PRNGKey(1))
    cold = f(jax.tree_util.tree_map(lambda x: jax.random.normal(jax.random.PRNGKey(2), x.shape), prev),
             jax.random.PRNGKey(1))
    for basis, _, _ in (warm, cold):
        B = np.asarray(jax.vmap(lambda b: ravel_pytree(b)[0])(basis))
        np.testing.assert_allclose(B.T @ B, Ue.T @ Ue, atol=1e-8)      # the same projector
    assert int(warm[2]) < int(cold[2]), (int(warm[2]), int(cold[2]))
    if method == "lanczos":
        with pytest.raises(ValueError, match="init .* not 'lobpcg'"):
            top_eigenpairs(lambda v: v, pb.params, 2, key=jax.random.PRNGKey(0), method="lobpcg", init=prev)


# --------------------------------------------------------------------------- jit, masks, dtypes, sharding


MASK = {"l1": {"W": False, "b": False}, "l2": {"W": True, "b": True}}
ALL = [("none", {}), ("static_projection", {}), ("dynamic_projection", dict(estimator="factor")),
       ("dynamic_projection", dict(estimator="lanczos", tol=1e-13, num_steps=40)),
       ("fisher_penalty", dict(strength=STRENGTH)),
       ("fisher_penalty", dict(strength=STRENGTH, fisher="subspace")), ("utility_penalty", dict(strength=STRENGTH)),
       ("coupling_suppression", {})]


@pytest.fixture(scope="module")
def masked(setup):
    """θ moved on the masked block only (the frozen block stays at θ*), the masked problem and its dense pieces."""
    s, pb = setup, setup["pb"]
    mflat = flat(jax.tree_util.tree_map(lambda m, x: jnp.full(x.shape, m, bool), MASK, pb.params)).astype(bool)
    idx = np.nonzero(mflat)[0]
    delta = np.where(mflat, s["delta"], 0.0)
    theta = s["unravel"](jnp.asarray(s["f0"] + delta))
    pbm = pb.replace(mask=MASK)
    U_S, lam_S = top_rows(dense_F(pb, pb.params, idx))
    U = np.zeros((DIM, s["n"]))
    U[:, idx] = U_S
    sub = SensitiveSubspace(jax.vmap(s["unravel"])(jnp.asarray(U)), jnp.asarray(lam_S), jnp.zeros(DIM))
    return dict(pb=pbm, idx=idx, out=np.nonzero(~mflat)[0], delta=delta, theta=theta, U_S=U_S, lam_S=lam_S, sub=sub)


def test_every_defence_jits_keeps_dtype_and_respects_the_mask(setup, masked):
    s, m = setup, masked
    idx, g, dS = m["idx"], setup["g"], m["delta"][m["idx"]]
    U_S = m["U_S"]
    F_S = dense_F(s["pb"], s["pb"].params, idx)
    H_S = dense_H(s["pb"], s["pb"].params, idx=idx)
    ref_grad_du = dense_grad_du(s["pb"], s["pb"].params, m["theta"])[idx]
    expected_S = {
        "none": g[idx], "static_projection": g[idx] - U_S.T @ (U_S @ g[idx]),
        "dynamic_projection": None,      # P(θ) at the current θ on the block (below)
        "fisher_penalty": g[idx] + STRENGTH * F_S @ dS,
        "utility_penalty": g[idx] + STRENGTH * ref_grad_du,
        "coupling_suppression": g[idx] - U_S.T @ (U_S @ (H_S @ dS)),
    }
    Ut, _ = top_rows(dense_F(s["pb"], m["theta"], idx))
    expected_S["dynamic_projection"] = g[idx] - Ut.T @ (Ut @ g[idx])
    g32 = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), s["gt"])
    txs = [D.make_defense(name, m["pb"], m["sub"], **opts) for name, opts in ALL]

    @jax.jit
    def run_all(g, g32, p):     # every defence, float64 and float32 updates, in one compilation
        states = [tx.init(p) for tx in txs]
        return [(tx.update(g, st, p)[0], tx.update(g32, st, p)[0]) for tx, st in zip(txs, states)]

    outs = run_all(s["gt"], g32, m["theta"])
    for (name, opts), tx, (out, out32) in zip(ALL, txs, outs):
        jitted = flat(out)
        if name in ("static_projection", "fisher_penalty"):     # un-jitted equals jitted
            eager = flat(tx.update(s["gt"], tx.init(m["theta"]), m["theta"])[0])
            np.testing.assert_allclose(jitted, eager, rtol=1e-12, atol=1e-14, err_msg=name)
        np.testing.assert_array_equal(jitted[m["out"]], g[m["out"]], err_msg=name)    # frozen leaves untouched
        exp = expected_S[name]
        if name == "fisher_penalty" and opts.get("fisher") == "subspace":
            exp = g[idx] + STRENGTH * U_S.T @ (m["lam_S"] * (U_S @ dS))
        np.testing.assert_allclose(jitted[idx], exp, rtol=1e-9 if "tol" in opts else RTOL, atol=1e-12, err_msg=name)
        assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(out32)), name


def test_sharded_equals_unsharded(setup):
    assert jax.device_count() == 8
    s, pb = setup, setup["pb"]
    mesh = Mesh(np.array(jax.devices()[:8]), ("x",))
    spec = {"l1": {"W": P(None, "x"), "b": P("x")}, "l2": {"W": P("x", None), "b": P()}}
    put = lambda tree, lead=False: jax.tree_util.tree_map(  # noqa: E731
        lambda x, sp: jax.device_put(x, NamedSharding(mesh, P(None, *sp) if lead else sp)), tree, spec)
    theta_sh, g_sh = put(s["theta"]), put(s["gt"])
    pb_sh = pb.replace(params=put(pb.params))
    sub_sh = s["sub"]._replace(basis=put(s["sub"].basis, lead=True))
    assert len(theta_sh["l1"]["W"].sharding.device_set) == 8

    def run_all(problem, sub):
        txs = [D.make_defense(name, problem, sub, **opts) for name, opts in ALL]
        return jax.jit(lambda g, p: [tx.update(g, tx.init(p), p)[0] for tx in txs])

    refs = run_all(pb, s["sub"])(s["gt"], s["theta"])
    outs = run_all(pb_sh, sub_sh)(g_sh, theta_sh)
    assert len(outs[1]["l1"]["W"].sharding.device_set) == 8
    for (name, _), out, ref in zip(ALL, outs, refs):
        np.testing.assert_allclose(flat(out), flat(ref), rtol=1e-12, atol=1e-13, err_msg=name)


# --------------------------------------------------------------------------- flows and the derivation


def test_flow_velocities_are_the_figure7_hooks(setup):
    s, pb = setup, setup["pb"]
    pairs = [(D.flow_velocity(D.static_projection(s["sub"])), D.projection_defense(s["sub"].basis)),
             (D.flow_velocity(D.dynamic_projection(pb, DIM, estimator=TrueFisher("factor"))),
              D.dynamic_projection_defense(pb.logits_fn, pb.inputs, DIM))]
    out = jax.jit(lambda p, g: [(a(p, g), b(p, g)) for a, b in pairs])(s["theta"], s["gt"])
    for new, hook in out:
        np.testing.assert_allclose(flat(new), flat(hook), rtol=1e-12, atol=1e-14)


def test_coupling_suppression_removes_the_t2_drift(setup):
    """Along θ̇ = −(g(θ) − P H δ): P δ(t) = −t P g − (t³/6) P ∇³L[g, g] + O(t⁴) (no t² term); the undefended flow
    has (t²/2) P H g."""
    s, pb = setup, setup["pb"]
    U = s["U"]
    gv = flat(jax.grad(pb.loss_fn)(pb.params, pb.batch))
    H = dense_H(pb, pb.params)
    T3 = np.asarray(testing.dense_third(pb.loss_fn, pb.params, pb.batch))
    Pg, PHg, PT = U @ gv, U @ (H @ gv), U @ np.einsum("ijk,j,k->i", T3, gv, gv)
    ts = np.array([0.01, 0.02, 0.04])
    vel = D.flow_velocity(D.coupling_suppression(pb, s["sub"]))
    kw = dict(method="dopri5", rtol=1e-13, atol=1e-16, output="displacement")
    rav = jax.vmap(lambda t: ravel_pytree(t)[0])
    dd = np.asarray(rav(gradient_flow(pb.loss_fn, pb.params, pb.batch, ts, velocity=vel, **kw)))
    du = np.asarray(rav(gradient_flow(pb.loss_fn, pb.params, pb.batch, ts, **kw)))
    r = [np.linalg.norm(U @ dd[i] - (-t * Pg - t ** 3 / 6 * PT)) for i, t in enumerate(ts)]
    assert 12 < r[1] / r[0] < 20 and 12 < r[2] / r[1] < 20, r                 # O(t⁴)
    assert r[0] < 1e-3 * 0.5 * ts[0] ** 2 * np.linalg.norm(PHg)               # the t² term is gone ...
    np.testing.assert_allclose(U @ du[0] + ts[0] * Pg, 0.5 * ts[0] ** 2 * PHg, rtol=0.05)  # ... which GF has


# --------------------------------------------------------------------------- registry


def test_registry_names_options_and_errors(setup):
    s = setup
    assert {"none", "static_projection", "dynamic_projection", "fisher_penalty", "utility_penalty",
            "coupling_suppression"} <= set(D.DEFENSES)
    with pytest.raises(ValueError, match=r"defense='projection' is not allowed: one of none, static_projection"):
        D.make_defense("projection", s["pb"], s["sub"])
    with pytest.raises(ValueError, match=r"option 'every' is not allowed: strength, fisher"):
        D.make_defense("fisher_penalty", s["pb"], s["sub"], every=3)
    with pytest.raises(ValueError, match="already registered"):
        D.register_defense("none", lambda problem, subspace: optax.identity())
    with pytest.raises(ValueError, match="every must be an integer >= 1"):
        D.dynamic_projection(s["pb"], DIM, every=0)
    with pytest.raises(ValueError, match="strength"):
        D.fisher_penalty(s["pb"], -1.0)
    with pytest.raises(ValueError, match="needs params"):
        D.fisher_penalty(s["pb"], 1.0).update(s["gt"], optax.EmptyState())


# --------------------------------------------------------------------------- the landscape study (smoke)


def test_defenses_landscape_smoke_claims(tmp_path):
    config = harness.load_config(os.path.join(ROOT, "configs", "defenses_landscape.py") + ":smoke")
    wd = str(tmp_path / "defenses_landscape")
    res = studies.run(config, wd)
    for f in ("config.json", "results.json", "defenses_landscape.png", "defenses_landscape.pdf"):
        assert os.path.getsize(os.path.join(wd, f)) > 0, f
    on_disk = json.load(open(os.path.join(wd, "results.json")))
    rows = on_disk["defenses"]
    for name in ("none", "static_projection", "dynamic_projection", "fisher_penalty"):
        assert {"exponent", "tstar_ratio", "task_loss_at_tstar"} <= set(rows[name]), name
    assert rows["dynamic_projection"]["tstar_ratio"] >= 10                     # dynamic delays collapse ≥ 10×
    assert rows["static_projection"]["tstar_ratio"] < 2                        # static does not
    assert rows["fisher_penalty"]["du_at_equal_task_loss_ratio"] < 1           # penalty: less Δu at equal loss
    assert abs(rows["none"]["exponent"] - 4) <= 0.1 and abs(rows["static_projection"]["exponent"] - 4) <= 0.1
    assert abs(rows["dynamic_projection"]["exponent"] - 2) <= 0.1              # the re-derived onset law
    law = rows["static_projection"]["law"]
    assert abs(law["coefficient_fit"] / law["coefficient"] - 1) < 0.02         # Δu ≈ a4_curv t⁴ under static
    for name in ("none", "static_projection", "fisher_penalty", "utility_penalty", "coupling_suppression"):
        assert abs(rows[name]["tstar_flow"] / rows[name]["tstar"] - 1) < 0.02, name   # GD ≈ its gradient flow
    assert res["claim"]["agree"] and on_disk["claim"] == res["claim"]
    cost = on_disk["refresh_cost"]
    assert cost["factor_cold"]["max_angle_to_exact"] < 1e-10
    # one tracking iteration is accurate only from the previous subspace
    assert cost["tracking_warm"]["max_angle_to_exact"] < 1e-2 * cost["tracking_cold"]["max_angle_to_exact"]
