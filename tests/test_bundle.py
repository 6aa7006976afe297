"""curvature.curvature_operators: every field of the bundle, its ``mask`` and ``taylor_order``, against dense float64
oracles (jax.hessian / jax.jacfwd on the ravelled parameters of a 4-8-3 tanh MLP, n = 67) and numpy formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignment_geom import curvature as C
from alignment_geom import testing as T
from alignment_geom.tree import mask_indices, ravel

RTOL = 1e-10


@pytest.fixture(scope="module")
def setup():
    m = T.mlp_model(jax.random.PRNGKey(21))
    flat, unravel = ravel(m.params)
    lossf = lambda f: m.loss_fn(unravel(f), m.batch)  # noqa: E731
    H = np.asarray(jax.jit(jax.hessian(lossf))(flat))
    D3 = np.asarray(jax.jit(jax.jacfwd(jax.hessian(lossf)))(flat))
    J = np.asarray(jax.jit(jax.jacfwd(lambda f: m.logits_fn(unravel(f), m.inputs)))(flat))   # (M, C, n)
    p = np.asarray(jax.nn.softmax(m.logits_fn(m.params, m.inputs), -1))                    # (M, C)
    # F = mean_x Jᵀ(diag p − ppᵀ)J written out in numpy
    Lam = np.stack([np.diag(pi) - np.outer(pi, pi) for pi in p])
    F = np.einsum("mci,mcd,mdj->ij", J, Lam, J) / J.shape[0]
    Jlp = np.asarray(jax.jit(jax.jacfwd(lambda f: m.logprob_fn(unravel(f), m.batch)))(flat))  # (m, n)
    g = np.asarray(jax.grad(lossf)(flat))
    rng = np.random.default_rng(0)
    u, v = rng.standard_normal(flat.size), rng.standard_normal(flat.size)
    mask = {"l1": {"W": True, "b": False}, "l2": {"W": True, "b": True}}
    S = mask_indices(mask, m.params)
    return dict(m=m, flat=np.asarray(flat), unravel=unravel, H=H, D3=D3, F=F, Jlp=Jlp, g=g, u=u, v=v, mask=mask,
                S=S)


def _check(actual, desired_flat, unravel, rtol=RTOL):
    err = T.relative_error(actual, unravel(jnp.asarray(desired_flat)))
    assert err <= rtol, f"relative error {err:.3e} > {rtol:.1e}"


@pytest.mark.parametrize("masked", [False, True], ids=["full", "mask"])
def test_every_field_against_dense(setup, masked):
    s = setup
    m, unravel, n = s["m"], s["unravel"], s["flat"].size
    S = s["S"] if masked else np.arange(n)
    P = np.zeros((n, n))
    P[S, S] = 1.0                                                         # the coordinate projector onto S
    ops = C.curvature_operators(m.loss_fn, m.logits_fn, m.logprob_fn, mask=s["mask"] if masked else None,
                                taylor_order=3)
    u, v = unravel(jnp.asarray(s["u"])), unravel(jnp.asarray(s["v"]))
    H, D3, F, Jlp, g = P @ s["H"] @ P, s["D3"], P @ s["F"] @ P, s["Jlp"] @ P, P @ s["g"]
    D3 = np.einsum("ai,bj,ck,ijk->abc", P, P, P, D3, optimize=True)
    _check(ops.hvp(m.params, v, m.batch), H @ s["v"], unravel)
    _check(ops.third_order(m.params, u, v, m.batch), np.einsum("ijk,j,k->i", D3, s["u"], s["v"]), unravel)
    _check(ops.fisher_vp(m.params, v, m.inputs), F @ s["v"], unravel)
    _check(ops.empirical_fisher_vp(m.params, v, m.batch), Jlp.T @ (Jlp @ s["v"]) / Jlp.shape[0], unravel)
    # taylor_order=3: c_1 = −g_S, c_2 = H_SS g_S/2, c_3 = −(H_SS² g_S + D³L_SSS[g_S, g_S])/6
    cs = ops.flow_taylor(m.params, m.batch)
    assert len(cs) == 3
    _check(cs[0], -g, unravel)
    _check(cs[1], H @ g / 2, unravel)
    _check(cs[2], -(H @ H @ g + np.einsum("ijk,j,k->i", D3, g, g)) / 6, unravel, rtol=1e-9)
    # Δu = mean_x KL(π* ‖ π_θ) in numpy, with θ moved along P·δ only (the mask holds the rest at θ*)
    delta = 0.2 * s["u"]
    other = unravel(jnp.asarray(s["flat"] + delta))
    z0 = np.asarray(m.logits_fn(m.params, m.inputs))
    z1 = np.asarray(m.logits_fn(unravel(jnp.asarray(s["flat"] + P @ delta)), m.inputs))
    lp0 = z0 - np.log(np.sum(np.exp(z0), -1, keepdims=True))
    lp1 = z1 - np.log(np.sum(np.exp(z1), -1, keepdims=True))
    want = np.mean(np.sum(np.exp(lp0) * (lp0 - lp1), -1))
    np.testing.assert_allclose(float(ops.kl_utility(m.params, other, m.inputs)), want, rtol=1e-12)


def test_fields_without_policy_functions_are_none_and_order_binds(setup):
    m = setup["m"]
    ops = C.curvature_operators(m.loss_fn)
    assert ops.fisher_vp is None and ops.empirical_fisher_vp is None and ops.kl_utility is None
    assert len(ops.flow_taylor(m.params, m.batch)) == 4                    # default taylor_order
    assert len(C.curvature_operators(m.loss_fn, taylor_order=1).flow_taylor(m.params, m.batch)) == 1
