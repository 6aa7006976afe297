"""alignment_geom.curvature (hessian, fisher, utility, taylor) against dense float64 oracles and closed forms."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.ode import odeint

from alignment_geom import curvature as C
from alignment_geom import testing as T
from alignment_geom.tree import ravel

RTOL = 1e-10
MODELS = list(T.MODEL_ZOO)


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    key = jax.random.PRNGKey(MODELS.index(request.param))
    return T.MODEL_ZOO[request.param](key, dtype=jnp.float64)


@pytest.fixture(scope="module")
def dense(model):
    """Dense float64 oracles for the model, computed once per module."""
    H, flat, unravel = T.dense_hessian(model.loss_fn, model.params, model.batch)
    return {"H": H, "flat": flat, "unravel": unravel,
            "D3": T.dense_third(model.loss_fn, model.params, model.batch),
            "F": T.dense_fisher(model.logits_fn, model.params, model.inputs),
            # (m, n) Jacobian of the per-example log-likelihoods (the score vectors), jitted once
            "Jlp": np.asarray(jax.jit(jax.jacfwd(lambda f: model.logprob_fn(unravel(f), model.batch)))(flat))}


def _jit(op, *fns, **kw):
    """jit an operator with its model functions bound (as users do)."""
    return jax.jit(lambda *args: op(*fns, *args, **kw))


def _rand_like(params, seed):
    flat, unravel = ravel(params)
    return unravel(jax.random.normal(jax.random.PRNGKey(seed), flat.shape, flat.dtype))


def _close(actual, desired_flat, unravel, rtol=RTOL):
    err = T.relative_error(actual, unravel(desired_flat))
    assert err <= rtol, f"relative error {err:.3e} > {rtol:.1e}"


def _first_leaf_mask(params):
    """A mask that keeps the first leaf only (one 'layer')."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    return jax.tree_util.tree_unflatten(treedef, [i == 0 for i in range(len(leaves))])


# --------------------------------------------------------------------------- Hessian operators


def test_hvp_matches_dense_hessian(model, dense):
    H, flat, unravel = dense["H"], dense["flat"], dense["unravel"]
    assert flat.size <= 500
    v = _rand_like(model.params, 1)
    _close(_jit(C.hvp, model.loss_fn)(model.params, v, model.batch), H @ ravel(v)[0], unravel)


def test_linearized_hvp_matches_dense_hessian(model, dense):
    H, unravel = dense["H"], dense["unravel"]
    mv = C.linearized_hvp(model.loss_fn, model.params, model.batch)
    for seed in (2, 3):
        v = _rand_like(model.params, seed)
        _close(mv(v), H @ ravel(v)[0], unravel)


def test_third_order_matches_dense_tensor(model, dense):
    D3, unravel = dense["D3"], dense["unravel"]
    u, v = _rand_like(model.params, 4), _rand_like(model.params, 5)
    want = jnp.einsum("ijk,j,k->i", D3, ravel(u)[0], ravel(v)[0])
    op = _jit(C.third_order, model.loss_fn)
    a = op(model.params, u, v, model.batch)
    _close(a, want, unravel)
    # symmetric in (u, v)
    b = op(model.params, v, u, model.batch)
    assert T.relative_error(a, b) <= RTOL
    # accumulated over microbatches of the leading batch axis (every zoo loss is a per-example mean)
    m = jax.tree_util.tree_leaves(model.batch)[0].shape[0]
    c = 2 if m % 2 == 0 else 3
    _close(_jit(C.third_order, model.loss_fn, microbatches=c)(model.params, u, v, model.batch), want, unravel)


# --------------------------------------------------------------------------- Fisher and Δu


def test_fisher_vp_matches_dense_fisher(model, dense):
    F, unravel = dense["F"], dense["unravel"]
    v = _rand_like(model.params, 6)
    _close(C.fisher_vp(model.logits_fn, model.params, v, model.inputs), F @ ravel(v)[0], unravel)
    mv = C.linearized_fisher_vp(model.logits_fn, model.params, model.inputs)
    _close(mv(v), F @ ravel(v)[0], unravel)
    # F is symmetric positive semi-definite
    assert np.allclose(F, F.T, rtol=0, atol=1e-12 * np.abs(F).max())
    assert np.linalg.eigvalsh(np.asarray(F)).min() > -1e-12 * np.abs(F).max()


def test_fisher_equals_enumerated_score_outer_product(model, dense):
    """F = mean_x E_{y∼π(·|x)}[∇log π(y|x) ∇log π(y|x)ᵀ] by exact enumeration over the C classes at every logit
    position (no Λ = diag p − ppᵀ, no jvp/vjp of the library): every zoo model, incl. attention's (m, T, C)."""
    flat, unravel = dense["flat"], dense["unravel"]
    z = model.logits_fn(model.params, model.inputs)
    C_ = z.shape[-1]
    S = jax.jit(jax.jacfwd(lambda f: jax.nn.log_softmax(model.logits_fn(unravel(f), model.inputs), -1)))(flat)
    S = np.asarray(S).reshape(-1, C_, flat.size)                # scores (positions, classes, n)
    p = np.asarray(jax.nn.softmax(z, -1)).reshape(-1, C_)
    F = np.einsum("my,myi,myj->ij", p, S, S) / S.shape[0]
    np.testing.assert_allclose(np.asarray(dense["F"]), F, rtol=0, atol=1e-12 * np.abs(F).max())
    v = _rand_like(model.params, 7)
    _close(C.fisher_vp(model.logits_fn, model.params, v, model.inputs), F @ ravel(v)[0], unravel)


def test_empirical_fisher_and_per_example_grads(model, dense):
    unravel, Jlp = dense["unravel"], dense["Jlp"]  # (m, n)
    Fhat = Jlp.T @ Jlp / Jlp.shape[0]
    v = _rand_like(model.params, 8)
    _close(C.empirical_fisher_vp(model.logprob_fn, model.params, v, model.batch), Fhat @ ravel(v)[0], unravel)
    G = C.per_example_grads(model.logprob_fn, model.params, model.batch)
    G_flat = jax.vmap(lambda g: ravel(g)[0])(G)
    np.testing.assert_allclose(G_flat, Jlp, rtol=RTOL, atol=1e-13)


def test_kl_utility_value_gradient_hessian(model, dense):
    flat, unravel = ravel(model.params)
    du = lambda f: C.kl_utility(model.logits_fn, model.params, unravel(f), model.inputs)  # noqa: E731
    assert abs(float(du(flat))) < 1e-14
    assert float(jnp.linalg.norm(jax.jit(jax.grad(du))(flat))) < 1e-13
    Hdu = jax.jit(jax.hessian(du))(flat)
    F = dense["F"]
    np.testing.assert_allclose(Hdu, F, rtol=1e-9, atol=1e-12 * np.abs(F).max())
    # strictly positive away from the reference
    other = unravel(flat + 0.1 * ravel(_rand_like(model.params, 9))[0])
    assert float(C.kl_utility(model.logits_fn, model.params, other, model.inputs)) > 0


def test_kl_utility_against_explicit_formula():
    m = T.mlp_model(jax.random.PRNGKey(3))
    other = jax.tree_util.tree_map(lambda x: x + 0.3, m.params)
    p = jax.nn.softmax(m.logits_fn(m.params, m.inputs))
    q = jax.nn.softmax(m.logits_fn(other, m.inputs))
    want = np.mean(np.sum(np.asarray(p) * np.log(np.asarray(p) / np.asarray(q)), axis=-1))
    got = float(C.kl_utility(m.logits_fn, m.params, other, m.inputs))
    assert abs(got - want) <= 1e-12 * abs(want)


# --------------------------------------------------------------------------- Taylor series of the flow


def test_flow_taylor_low_orders_match_dense(model, dense):
    H, D3, unravel = dense["H"], dense["D3"], dense["unravel"]
    g = ravel(jax.grad(model.loss_fn)(model.params, model.batch))[0]
    c1, c2, c3 = jax.jit(lambda p, b: C.flow_taylor(model.loss_fn, p, b, 3))(model.params, model.batch)
    _close(c1, -g, unravel)
    _close(c2, H @ g / 2, unravel)
    _close(c3, -(H @ H @ g + jnp.einsum("ijk,j,k->i", D3, g, g)) / 6, unravel, rtol=1e-9)


def test_flow_taylor_jet_equals_nested_jvp(model):
    K = 4 if model.name == "attention" else 5  # nested jvp costs 2^(K-1) passes: keep compile time small
    a = jax.jit(lambda p, b: C.flow_taylor(model.loss_fn, p, b, K, method="jet"))(model.params, model.batch)
    b = jax.jit(lambda p, b: C.flow_taylor(model.loss_fn, p, b, K, method="jvp"))(model.params, model.batch)
    for k, (ca, cb) in enumerate(zip(a, b), start=1):
        assert T.relative_error(ca, cb) <= 1e-9, f"order {k}"


def test_flow_taylor_quadratic_closed_form():
    """L = ½θᵀAθ − bᵀθ: θ(t) = θ* − A⁻¹(I − e^{−At})g, so c_k = −(−A)^{k−1} g / k!."""
    n = 6
    key = jax.random.PRNGKey(0)
    Q = jnp.linalg.qr(jax.random.normal(key, (n, n)))[0]
    A = Q @ jnp.diag(jnp.linspace(0.5, 3.0, n)) @ Q.T
    b = jax.random.normal(jax.random.PRNGKey(1), (n,))
    theta = {"w": jax.random.normal(jax.random.PRNGKey(2), (n,))}
    loss = lambda p, batch: 0.5 * p["w"] @ batch["A"] @ p["w"] - batch["b"] @ p["w"]  # noqa: E731
    batch = {"A": A, "b": b}
    g = A @ theta["w"] - b
    cs = C.flow_taylor(loss, theta, batch, 6)
    Ak = jnp.eye(n)
    for k, c in enumerate(cs, start=1):
        want = -Ak @ g / math.factorial(k)
        np.testing.assert_allclose(c["w"], want, rtol=1e-11, atol=1e-14)
        Ak = -A @ Ak
    # the quadratic has no third derivative
    u, v = {"w": jnp.ones(n)}, {"w": jnp.arange(n, dtype=jnp.float64)}
    assert float(jnp.abs(C.third_order(loss, theta, u, v, batch)["w"]).max()) == 0.0


def test_polynomial_known_derivatives():
    """L(θ) = Σ aᵢ θᵢ⁴/4 + Σ bᵢ θᵢ³/6: H = diag(3aθ² + bθ), D³L[u,v] = (6aθ + b)·u·v."""
    a = jnp.array([1.0, -2.0, 0.5, 3.0])
    b = jnp.array([0.3, 1.0, -1.5, 0.0])
    theta = {"x": jnp.array([0.7, -0.2, 1.1, 0.4])}
    loss = lambda p, batch: jnp.sum(batch["a"] * p["x"] ** 4 / 4 + batch["b"] * p["x"] ** 3 / 6)  # noqa: E731
    batch = {"a": a, "b": b}
    u, v = {"x": jnp.array([1.0, 2.0, -1.0, 0.5])}, {"x": jnp.array([-0.3, 0.1, 0.2, 2.0])}
    x = theta["x"]
    np.testing.assert_allclose(C.hvp(loss, theta, v, batch)["x"], (3 * a * x**2 + b * x) * v["x"], rtol=1e-13)
    np.testing.assert_allclose(C.third_order(loss, theta, u, v, batch)["x"],
                               (6 * a * x + b) * u["x"] * v["x"], rtol=1e-13)


def test_taylor_eval_is_the_polynomial():
    """taylor_eval([c_1, …, c_K], t, θ*) = θ* + Σ_k c_k t^k, leaf by leaf (numpy Horner form as the oracle)."""
    rng = np.random.default_rng(0)
    cs = [{"a": jnp.asarray(rng.standard_normal(3)), "b": {"c": jnp.asarray(rng.standard_normal((2, 2)))}}
          for _ in range(4)]
    p0 = {"a": jnp.asarray(rng.standard_normal(3)), "b": {"c": jnp.asarray(rng.standard_normal((2, 2)))}}
    for t in (0.0, 0.3, -1.7):
        def horner(leaves, t=t):
            out = np.zeros_like(np.asarray(leaves[0]))
            for c in leaves[::-1]:
                out = (out + np.asarray(c)) * t
            return out
        want = jax.tree_util.tree_map(lambda *ls: horner(ls), *cs)
        T.assert_trees_all_close(C.taylor_eval(cs, t), want, rtol=1e-13, atol=1e-15)
        T.assert_trees_all_close(C.taylor_eval(cs, t, p0), jax.tree_util.tree_map(np.add, p0, want), rtol=1e-13,
                                 atol=1e-15)
    # jit with a traced t
    got = jax.jit(C.taylor_eval)(cs[:2], jnp.asarray(2.0))
    T.assert_trees_all_close(got, jax.tree_util.tree_map(lambda a, b: 2 * a + 4 * b, cs[0], cs[1]), rtol=1e-13)


@pytest.fixture(scope="module")
def ode_reference():
    """θ(t) of the tanh MLP's gradient flow from an accurate ODE solve (one solve shared by the orders), and the
    order-4 Taylor coefficients."""
    m = T.mlp_model(jax.random.PRNGKey(5))
    flat0, unravel = ravel(m.params)
    rhs = lambda x, t: -ravel(jax.grad(m.loss_fn)(unravel(x), m.batch))[0]  # noqa: E731
    ts = jnp.array([0.0, 0.05, 0.1, 0.2])
    traj = odeint(rhs, flat0, ts, rtol=1e-13, atol=1e-14)
    cs = [ravel(c)[0] for c in C.flow_taylor(m.loss_fn, m.params, m.batch, 4)]
    return flat0, ts, traj, cs


@pytest.mark.parametrize("K", [1, 2, 3, 4])
def test_flow_taylor_partial_sums_against_ode(K, ode_reference):
    """‖θ(t) − θ* − Σ_{k≤K} c_k t^k‖ shrinks like t^{K+1} (accurate ODE reference)."""
    flat0, ts, traj, cs = ode_reference
    errs = []
    for i in range(1, len(ts)):
        t = ts[i]
        pred = flat0 + sum(c * t ** (k + 1) for k, c in enumerate(cs[:K]))
        errs.append(float(jnp.linalg.norm(traj[i] - pred)))
    slopes = np.diff(np.log(errs)) / np.diff(np.log(np.asarray(ts[1:])))
    assert np.all(np.abs(slopes - (K + 1)) < 0.25), (errs, slopes)


# --------------------------------------------------------------------------- masks, dtypes, jit


def test_masked_operators_equal_dense_sub_blocks(model, dense):
    mask = _first_leaf_mask(model.params)
    flat, unravel = ravel(model.params)
    from alignment_geom.tree import mask_indices

    S = mask_indices(mask, model.params)
    assert 0 < S.size < flat.size
    v = _rand_like(model.params, 12)
    vS = ravel(v)[0][S]

    def embed(xS):
        return jnp.zeros_like(flat).at[S].set(xS)

    H = dense["H"]
    _close(_jit(C.hvp, model.loss_fn, mask=mask)(model.params, v, model.batch), embed(H[np.ix_(S, S)] @ vS), unravel)
    _close(C.linearized_hvp(model.loss_fn, model.params, model.batch, mask=mask)(v),
           embed(H[np.ix_(S, S)] @ vS), unravel)
    D3 = dense["D3"]
    u = _rand_like(model.params, 13)
    uS = ravel(u)[0][S]
    _close(_jit(C.third_order, model.loss_fn, mask=mask)(model.params, u, v, model.batch),
           embed(jnp.einsum("ijk,j,k->i", D3[np.ix_(S, S, S)], uS, vS)), unravel)
    F = dense["F"]
    _close(_jit(C.fisher_vp, model.logits_fn, mask=mask)(model.params, v, model.inputs),
           embed(F[np.ix_(S, S)] @ vS), unravel)
    _close(C.linearized_fisher_vp(model.logits_fn, model.params, model.inputs, mask=mask)(v),
           embed(F[np.ix_(S, S)] @ vS), unravel)
    # empirical Fisher and per-example gradients on S: the columns S of the dense (m, n) score Jacobian
    Jlp = dense["Jlp"]
    JS = Jlp[:, S]
    _close(C.empirical_fisher_vp(model.logprob_fn, model.params, v, model.batch, mask=mask),
           embed(JS.T @ (JS @ vS) / JS.shape[0]), unravel)
    G = jax.vmap(lambda g: ravel(g)[0])(C.per_example_grads(model.logprob_fn, model.params, model.batch, mask=mask))
    want = np.zeros_like(Jlp)
    want[:, S] = JS
    np.testing.assert_allclose(np.asarray(G), want, rtol=RTOL, atol=1e-13)
    # masked flow: only θ_S moves; c_2 = H_SS g_S / 2, c_3 = −(H_SS² g_S + D³L_SSS[g_S, g_S]) / 6
    g = ravel(jax.grad(model.loss_fn)(model.params, model.batch))[0]
    c1, c2, c3 = jax.jit(lambda p, b: C.flow_taylor(model.loss_fn, p, b, 3, mask=mask))(model.params, model.batch)
    HS, gS = H[np.ix_(S, S)], g[S]
    _close(c1, embed(-gS), unravel)
    _close(c2, embed(HS @ gS / 2), unravel)
    _close(c3, embed(-(HS @ (HS @ gS) + jnp.einsum("ijk,j,k->i", D3[np.ix_(S, S, S)], gS, gS)) / 6), unravel,
           rtol=1e-9)
    # masked Δu holds θ outside S at the reference
    moved = unravel(flat + 0.2 * ravel(u)[0])
    onlyS = unravel(flat + 0.2 * embed(uS))
    a = C.kl_utility(model.logits_fn, model.params, moved, model.inputs, mask=mask)
    b = C.kl_utility(model.logits_fn, model.params, onlyS, model.inputs)
    assert abs(float(a) - float(b)) <= 1e-12 * abs(float(b))


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 5e-2)])
def test_low_precision_dtypes(dtype, tol):
    m64 = T.mlp_model(jax.random.PRNGKey(1), dtype=jnp.float64)
    cast = lambda t: jax.tree_util.tree_map(  # noqa: E731
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, t)
    p, b, x = cast(m64.params), cast(m64.batch), cast(m64.inputs)
    v64 = _rand_like(m64.params, 3)
    v = cast(v64)
    ops = {
        "hvp": _jit(C.hvp, m64.loss_fn),
        "fisher": _jit(C.fisher_vp, m64.logits_fn),
        "third": jax.jit(lambda p, v, b: C.third_order(m64.loss_fn, p, v, v, b)),
        "taylor": jax.jit(lambda p, v, b: C.flow_taylor(m64.loss_fn, p, b, 3)[2]),
    }
    out = {}
    for name, op in ops.items():
        args_lo = (p, v, x if name == "fisher" else b)
        args_hi = (m64.params, v64, m64.inputs if name == "fisher" else m64.batch)
        out[name] = (op(*args_lo), op(*args_hi))
    for name, (lo, hi) in out.items():
        T.assert_tree_dtype(lo, dtype)
        err = T.relative_error(lo, hi)
        assert err < tol, f"{name}: {err}"


def test_jitted_operators_compile_once():
    m = T.mlp_model(jax.random.PRNGKey(2))
    counted = {name: T.CompileCounter(fn) for name, fn in {
        "hvp": lambda p, v, b: C.hvp(m.loss_fn, p, v, b),
        "third": lambda p, v, b: C.third_order(m.loss_fn, p, v, v, b),
        "fisher": lambda p, v, b: C.fisher_vp(m.logits_fn, p, v, b["x"]),
        "taylor": lambda p, v, b: C.flow_taylor(m.loss_fn, p, b, 4),
    }.items()}
    jitted = {k: jax.jit(f) for k, f in counted.items()}
    for seed in range(3):
        p = jax.tree_util.tree_map(lambda x: x + 0.01 * seed, m.params)
        v = _rand_like(m.params, seed)
        b = {"x": m.batch["x"] * (1 + seed), "y": m.batch["y"]}
        for f in jitted.values():
            jax.block_until_ready(f(p, v, b))
    for name, c in counted.items():
        assert c.count == 1, f"{name} traced {c.count} times"


def test_problems_differing_only_in_name_share_one_compile():
    """A Problem's name is a label: jit over problems of other names (e.g. one per task) traces once, and the
    name survives flattening."""
    m = T.mlp_model(jax.random.PRNGKey(2))
    f = T.CompileCounter(lambda pr: C.flow_taylor(pr.loss_fn, pr.params, pr.batch, 2))
    jf = jax.jit(f)
    outs = [jf(m.replace(name=name)) for name in ("samsum", "gsm8k", "")]
    assert f.count == 1
    assert all(T.relative_error(o, outs[0]) == 0.0 for o in outs)
    leaves, treedef = jax.tree_util.tree_flatten(m.replace(name="dolly"))
    back = jax.tree_util.tree_unflatten(treedef, leaves)
    assert back.name == "dolly" and type(back.name) is str


def test_bad_inputs_raise_clear_errors():
    m = T.mlp_model(jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="tree structure"):
        C.hvp(m.loss_fn, m.params, {"l1": m.params["l1"]}, m.batch)
    bad = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape + (1,)), m.params)
    with pytest.raises(ValueError, match="shape"):
        C.fisher_vp(m.logits_fn, m.params, bad, m.inputs)
    with pytest.raises(ValueError, match="order"):
        C.flow_taylor(m.loss_fn, m.params, m.batch, 0)
    with pytest.raises(ValueError, match="method"):
        C.flow_taylor(m.loss_fn, m.params, m.batch, 2, method="euler")
    with pytest.raises(ValueError, match="mask"):
        C.hvp(m.loss_fn, m.params, m.params, m.batch, mask={"l1": True})
    with pytest.raises(ValueError, match="must divide the leading axis"):
        C.third_order(m.loss_fn, m.params, m.params, m.params, m.batch, microbatches=3)
    with pytest.raises(ValueError, match="positive integer"):
        C.third_order(m.loss_fn, m.params, m.params, m.params, m.batch, microbatches=0)


def test_hvp_and_third_order_against_torch():
    """The one oracle outside JAX: torch.autograd (double backward) on the same tanh MLP in float64."""
    import torch

    m = T.mlp_model(jax.random.PRNGKey(8))
    names = [("l1", "W"), ("l1", "b"), ("l2", "W"), ("l2", "b")]
    P = [torch.tensor(np.asarray(m.params[a][b]), dtype=torch.float64, requires_grad=True) for a, b in names]
    x = torch.tensor(np.asarray(m.batch["x"]), dtype=torch.float64)
    y = torch.tensor(np.asarray(m.batch["y"]), dtype=torch.long)

    def loss(W1, b1, W2, b2):
        return torch.nn.functional.cross_entropy(torch.tanh(x @ W1 + b1) @ W2 + b2, y)

    u, v = _rand_like(m.params, 31), _rand_like(m.params, 32)
    tv = tuple(torch.tensor(np.asarray(v[a][b]), dtype=torch.float64) for a, b in names)
    tu = tuple(torch.tensor(np.asarray(u[a][b]), dtype=torch.float64) for a, b in names)
    grads = torch.autograd.grad(loss(*P), P, create_graph=True)
    Hv = torch.autograd.grad(sum((g * w).sum() for g, w in zip(grads, tv)), P, create_graph=True)
    D3uv = torch.autograd.grad(sum((h * w).sum() for h, w in zip(Hv, tu)), P)
    as_tree = lambda ts: {"l1": {"W": ts[0].detach().numpy(), "b": ts[1].detach().numpy()},  # noqa: E731
                          "l2": {"W": ts[2].detach().numpy(), "b": ts[3].detach().numpy()}}
    assert T.relative_error(C.hvp(m.loss_fn, m.params, v, m.batch), as_tree(Hv)) <= 1e-12
    assert T.relative_error(C.third_order(m.loss_fn, m.params, u, v, m.batch), as_tree(D3uv)) <= 1e-11
