"""Every public name of the core API has a test, and value tests for the names no other test file exercises.

The coverage check lists the names in ``alignment_geom.__all__`` and in the ``__all__`` of the core subpackages
(linalg, curvature, aic, dynamics, landscapes, scaling, tree, problem) that no ``tests/test_*.py`` mentions as a
whole word; it must be empty. (A mention is a necessary condition for a value test, not a proof of one: the
value tests below were written for the names that were missing.) Oracles: numpy formulas on jax.jacfwd Jacobians.
"""
import glob
import importlib
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import alignment_geom as ag
from alignment_geom import aic, curvature, dynamics, landscapes, linalg
from alignment_geom import testing as T
from alignment_geom.problem import Problem
from alignment_geom.tree import mask_indices, ravel

HERE = os.path.dirname(os.path.abspath(__file__))
CORE = ["alignment_geom", "alignment_geom.linalg", "alignment_geom.curvature", "alignment_geom.aic",
        "alignment_geom.dynamics", "alignment_geom.landscapes", "alignment_geom.scaling", "alignment_geom.tree",
        "alignment_geom.problem"]
KEY = jax.random.PRNGKey(0)


def untested_public_names():
    """{module: [public names no test file mentions]} over the core API (empty lists dropped)."""
    text = "\n".join(open(f).read() for f in sorted(glob.glob(os.path.join(HERE, "test_*.py"))))
    out = {}
    for name in CORE:
        mod = importlib.import_module(name)
        miss = [n for n in getattr(mod, "__all__", ()) if not re.search(r"\b%s\b" % re.escape(n), text)]
        if miss:
            out[name] = miss
    return out


def test_every_public_name_is_referenced_by_a_test():
    assert untested_public_names() == {}


# --------------------------------------------------------------------------- curvature: Fisher pieces


@pytest.fixture(scope="module")
def mlp():
    m = T.mlp_model(jax.random.PRNGKey(31))
    flat, unravel = ravel(m.params)
    J = np.asarray(jax.jit(jax.jacfwd(lambda f: m.logits_fn(unravel(f), m.inputs)))(flat))  # (M, C, n)
    z = np.asarray(m.logits_fn(m.params, m.inputs))
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    Lam = np.stack([np.diag(pi) - np.outer(pi, pi) for pi in p])
    F = np.einsum("mci,mcd,mdj->ij", J, Lam, J) / J.shape[0]
    Jlp = np.asarray(jax.jit(jax.jacfwd(lambda f: m.logprob_fn(unravel(f), m.batch)))(flat))
    return dict(m=m, flat=np.asarray(flat), unravel=unravel, J=J, z=z, p=p, Lam=Lam, F=F, Jlp=Jlp)


def test_fisher_factor_norm_lambda_quad_softmax_hessian(mlp):
    m, unravel, F = mlp["m"], mlp["unravel"], mlp["F"]
    n = F.shape[0]
    A = np.asarray(curvature.fisher_factor(m.logits_fn, m.params, m.inputs))
    assert A.shape == (mlp["z"].size, n)
    np.testing.assert_allclose(A.T @ A, F, rtol=0, atol=1e-13 * np.abs(F).max())
    mask = {"l1": {"W": False, "b": False}, "l2": {"W": True, "b": True}}
    S = mask_indices(mask, m.params)
    Am = np.asarray(curvature.fisher_factor(m.logits_fn, m.params, m.inputs, mask=mask))
    out = np.setdiff1d(np.arange(n), S)
    assert not np.any(Am[:, out])
    np.testing.assert_allclose(Am[:, S].T @ Am[:, S], F[np.ix_(S, S)], rtol=0, atol=1e-13 * np.abs(F).max())
    v = np.random.default_rng(1).standard_normal(n)
    np.testing.assert_allclose(float(curvature.fisher_norm(m.logits_fn, m.params, unravel(jnp.asarray(v)),
                                                           m.inputs)), np.sqrt(v @ F @ v), rtol=1e-12)
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal(mlp["z"].shape), rng.standard_normal(mlp["z"].shape)
    want = np.mean(np.einsum("mc,mcd,md->m", x, mlp["Lam"], y))
    np.testing.assert_allclose(float(curvature.lambda_quad(jnp.asarray(mlp["z"]), jnp.asarray(x), jnp.asarray(y))),
                               want, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(curvature.softmax_hessian_apply(jnp.asarray(mlp["z"]), jnp.asarray(x))),
                               np.einsum("mcd,md->mc", mlp["Lam"], x), rtol=1e-12, atol=1e-15)


def test_fisher_operators_of_a_problem(mlp):
    """curvature.fisher / empirical_fisher (LinearOperators of a Problem, with its mask),
    linearized_empirical_fisher_vp and linalg.as_operator against F and F̂ = JᵀJ/m (numpy)."""
    m, unravel, F, Jlp = mlp["m"], mlp["unravel"], mlp["F"], mlp["Jlp"]
    n = F.shape[0]
    Fhat = Jlp.T @ Jlp / Jlp.shape[0]
    v = np.random.default_rng(3).standard_normal(n)
    vt = unravel(jnp.asarray(v))
    mask = {"l1": {"W": True, "b": False}, "l2": {"W": False, "b": True}}
    S = mask_indices(mask, m.params)
    P = np.zeros((n, n))
    P[S, S] = 1.0
    flat = lambda t: np.asarray(ravel(t)[0])  # noqa: E731
    for msk, Pm in ((None, np.eye(n)), (mask, P)):
        pb = Problem(m.params, logits_fn=m.logits_fn, inputs=m.inputs, logprob_fn=m.logprob_fn,
                     safety_batch=m.batch, mask=msk)
        opF, opE = curvature.fisher(pb), curvature.empirical_fisher(pb)
        assert isinstance(opF, linalg.LinearOperator) and opF.psd and opE.symmetric
        assert opF.size == (n if msk is None else S.size)
        np.testing.assert_allclose(flat(opF.mv(vt)), Pm @ F @ Pm @ v, rtol=1e-11, atol=1e-14)
        np.testing.assert_allclose(flat(opE.mv(vt)), Pm @ Fhat @ Pm @ v, rtol=1e-11, atol=1e-14)
        mv = curvature.linearized_empirical_fisher_vp(m.logprob_fn, m.params, m.batch, msk)
        np.testing.assert_allclose(flat(mv(vt)), Pm @ Fhat @ Pm @ v, rtol=1e-11, atol=1e-14)
    op = linalg.as_operator(lambda u: unravel(jnp.asarray(F) @ ravel(u)[0]), m.params, mask=mask, psd=True)
    np.testing.assert_allclose(flat(op.mv(vt)), P @ F @ P @ v, rtol=1e-12, atol=1e-14)
    assert linalg.as_operator(op) is op and op.psd
    with pytest.raises(ValueError, match="like"):
        linalg.as_operator(lambda u: u)
    assert isinstance(curvature.curvature_operators(m.loss_fn), ag.CurvatureOperators)


# --------------------------------------------------------------------------- linalg helpers and result types


def test_subspace_helpers_against_numpy():
    rng = np.random.default_rng(4)
    Y = rng.standard_normal((3, 12))
    U = np.asarray(linalg.orthonormal_rows(jnp.asarray(Y)))
    np.testing.assert_allclose(U @ U.T, np.eye(3), atol=1e-14)
    Qn = np.linalg.qr(Y.T)[0]
    np.testing.assert_allclose(U.T @ U, Qn @ Qn.T, atol=1e-13)             # same span (projector)
    unravel = ravel({"a": jnp.zeros((2, 3)), "b": jnp.zeros(6)})[1]
    basis = jax.vmap(unravel)(jnp.asarray(U))
    c = rng.standard_normal(3)
    v = rng.standard_normal(12)
    flat = lambda t: np.asarray(ravel(t)[0])  # noqa: E731
    np.testing.assert_allclose(flat(linalg.combine(basis, jnp.asarray(c))), U.T @ c, rtol=1e-13)
    np.testing.assert_allclose(flat(linalg.project_out(basis, unravel(jnp.asarray(v)))), v - U.T @ (U @ v),
                               rtol=1e-12, atol=1e-14)


def test_result_types():
    A = np.diag(np.arange(1.0, 13.0))
    like = jnp.zeros(12)
    mv = lambda v: jnp.asarray(A) @ v  # noqa: E731
    lam, _, _, info = linalg.top_eigenpairs(mv, like, 2, key=KEY, num_steps=12, return_info=True)
    assert isinstance(info, linalg.SolverInfo) and bool(info.converged)
    np.testing.assert_allclose(np.asarray(lam), [12.0, 11.0], rtol=1e-12)
    res = linalg.slq(mv, like, 12, 2, key=KEY)
    assert isinstance(res, linalg.SLQResult)
    np.testing.assert_allclose(float(linalg.slq_trace(res)[0]), 78.0, rtol=1e-12)       # m = n: exact
    params = {"w": jnp.asarray(np.random.default_rng(5).standard_normal(6))}
    a = jnp.asarray(np.random.default_rng(6).standard_normal((3, 6)))
    rs = linalg.random_subspace_fisher(lambda p, b: b @ p["w"], params, a, 8, key=KEY, block_size=4)
    assert isinstance(rs, linalg.RandomSubspaceFisher)
    S = np.asarray(linalg.random_sketch_matrix(params, 8, key=KEY, block_size=4))
    np.testing.assert_allclose(float(rs.trace), np.sum((np.asarray(a) @ S.T) ** 2) / 3, rtol=1e-12)
    ls = landscapes.make_landscape(n=8, d=2, n_tail=1)
    assert isinstance(ls, ag.Landscape) and isinstance(ls, landscapes.Landscape)


# --------------------------------------------------------------------------- aic: estimators from options


def test_estimator_constructors_and_random_subspace_trace():
    assert aic.as_estimator(None) == aic.TrueFisher()
    op = linalg.LinearOperator(lambda v: v, jnp.zeros(3))
    assert aic.as_estimator(op) == aic.OperatorFisher(op)
    e = aic.EmpiricalFisher()
    assert aic.as_estimator(e) is e
    with pytest.raises(ValueError, match="Fisher estimator"):
        aic.as_estimator("true")
    assert aic.estimator_from_strings("true", method="lobpcg", tol=1e-9) == aic.TrueFisher("lobpcg", 1e-9)
    assert aic.estimator_from_strings("empirical", num_steps=7) == aic.EmpiricalFisher("lanczos", None, 7)
    assert aic.estimator_from_strings("random_subspace", sketch_dim=16) == aic.RandomSubspace(16)
    with pytest.raises(ValueError, match="fisher must be"):
        aic.estimator_from_strings("gauss")
    fn = lambda p, b: b["a"] @ p["w"]  # noqa: E731
    params = {"w": jnp.asarray(np.random.default_rng(7).standard_normal(6))}
    a = np.random.default_rng(8).standard_normal((4, 6))
    pb = aic.problem_from_functions(params, logprob_fn=fn, safety_batch={"a": jnp.asarray(a)})
    assert isinstance(pb, Problem) and pb.logprob_fn is fn and pb.loss_fn is None and pb.mask is None
    # RandomSubspace's trace: (1/m)‖G Sᵀ‖²_F with gᵢ = aᵢ (linear log π) and S regenerated from the key
    k = jax.random.PRNGKey(9)
    tr = aic.fisher_trace(pb, fisher=aic.RandomSubspace(16, block_size=4), key=k)
    assert isinstance(tr, aic.FisherTrace) and tr.method == "sketch" and np.isnan(float(tr.stderr))
    S = np.asarray(linalg.random_sketch_matrix(params, 16, key=k, block_size=4))
    np.testing.assert_allclose(float(tr.value), np.sum((a @ S.T) ** 2) / 4, rtol=1e-12)


# --------------------------------------------------------------------------- dynamics.make_optimizer


def test_make_optimizer_sgd_mask_and_clip():
    params = {"a": jnp.array([1.0, -2.0]), "b": jnp.array([3.0])}
    g = {"a": jnp.array([0.3, 0.4]), "b": jnp.array([5.0])}
    tc = dynamics.TrainConfig(learning_rate=0.1, optimizer="sgd")
    tx = dynamics.make_optimizer(tc, 10, mask={"a": True, "b": False})
    upd, _ = tx.update(g, tx.init(params), params)
    np.testing.assert_allclose(np.asarray(upd["a"]), [-0.03, -0.04], rtol=1e-14)
    np.testing.assert_allclose(np.asarray(upd["b"]), [0.0], atol=0)
    tx = dynamics.make_optimizer(dynamics.TrainConfig(learning_rate=0.1, optimizer="sgd", grad_clip=1.0), 10)
    upd, _ = tx.update(g, tx.init(params), params)
    gn = np.sqrt(0.09 + 0.16 + 25.0)                                        # ‖g‖ > 1: scaled to norm 1
    np.testing.assert_allclose(np.asarray(upd["b"]), [-0.1 * 5.0 / gn], rtol=1e-12)
    tx = dynamics.make_optimizer(dynamics.TrainConfig(learning_rate=0.1, optimizer="adam"), 10)
    upd, _ = tx.update(g, tx.init(params), params)
    ref, _ = optax.adam(0.1).update(g, optax.adam(0.1).init(params), params)
    np.testing.assert_allclose(np.asarray(upd["a"]), np.asarray(ref["a"]), rtol=1e-14)
