"""Taylor mode through the models users bring: flow_taylor / utility_taylor / onset_split against dense oracles.

Oracles share no code with the Taylor-mode interpreter: c_{k+1} = −[t^k] ∇L(θ* + Σ_{j≤k} c_j t^j)/(k+1) with
[t^k] = (1/k!) d^k/dt^k by k nested ``jax.jvp`` in the scalar t of the ravelled right-hand side, and
a_k = (1/k!) d^k/dt^k of Δu(θ* + Σ c_j t^j) with the naive Σ p (log p − log q) written here, all K + 1
derivatives from one program of nested jvps (one compile: the oracles' compile time is the file's run time).
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from alignment_geom import curvature as C
from alignment_geom.curvature._taylor_mode import TaylorModeError, taylor, widen_precision
from alignment_geom.models import llama

RTOL = 1e-10


def _dt(f, k):
    """d^k f/dt^k for f of a scalar t, by k nested jvps."""
    for _ in range(k):
        f = (lambda f: lambda t: jax.jvp(f, (t,), (jnp.ones_like(t),))[1])(f)
    return f


def _derivs(f, K):
    """t ↦ (f(t), f'(t), …, f⁽ᴷ⁾(t)) for f of a scalar t, by K nested jvps carrying every lower derivative."""
    def g(t):
        return (f(t),)
    for _ in range(K):
        def g(t, prev=g):
            p, tan = jax.jvp(prev, (t,), (jnp.ones_like(t),))
            return p + (tan[-1],)
    return g


def _oracle_flow(loss, params, batch, K):
    flat0, unr = ravel_pytree(params)

    def rhs(th):
        return -ravel_pytree(jax.grad(loss)(unr(th), batch))[0]

    cs = [jax.jit(rhs)(flat0)]
    for k in range(1, K):
        prev = list(cs)
        path = lambda t, prev=prev: rhs(flat0 + sum(c * t ** (j + 1) for j, c in enumerate(prev)))  # noqa: E731
        cs.append(jax.jit(_dt(path, k))(0.0) / math.factorial(k) / (k + 1))
    return cs


def _naive_du(logits_fn, p_ref, p, inputs):
    lr = jax.nn.log_softmax(logits_fn(p_ref, inputs), -1)
    lq = jax.nn.log_softmax(logits_fn(p, inputs), -1)
    return jnp.mean(jnp.sum(jnp.exp(lr) * (lr - lq), -1))


def _oracle_du(logits_fn, params, inputs, cs, K):
    flat0, unr = ravel_pytree(params)

    def du(t):
        th = flat0 + sum(c * t ** (j + 1) for j, c in enumerate(cs[:K]))
        return _naive_du(logits_fn, params, unr(th), inputs)

    d = jax.jit(_derivs(du, K))(0.0)
    return np.array([float(x) / math.factorial(k) for k, x in enumerate(d)])


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _flow(loss, params, batch, K, **kw):
    cs = jax.jit(lambda p: C.flow_taylor(loss, p, batch, K, **kw))(params)
    return [ravel_pytree(c)[0] for c in cs]


def _check_a(a, o):
    a = np.asarray(a)
    scale = np.max(np.abs(o))
    assert abs(a[0]) <= 1e-13 * scale and abs(a[1]) <= 1e-13 * scale, (a, o)
    for k in range(2, len(o)):
        assert abs(a[k] - o[k]) <= RTOL * abs(o[k]), (k, a[k], o[k])


def _ce(logits, y):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits, -1), y[..., None], -1))


# --------------------------------------------------------------------------- the zoo (each item alone)

NIN, NH, NOUT, M = 4, 6, 3, 5


def _data(seed=0):
    kx, ky, ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(kx, (M, NIN))
    y = jax.random.randint(ky, (M,), 0, NOUT)
    xs = jax.random.normal(ks, (M, NIN))
    return x, y, xs


def _mlp_params(seed=0, layers=2):
    ks = jax.random.split(jax.random.PRNGKey(seed + 10), 4)
    return {"w1": 0.7 * jax.random.normal(ks[0], (NIN, NH)), "b1": 0.1 * jax.random.normal(ks[1], (NH,)),
            "ws": 0.5 * jax.random.normal(ks[2], (layers, NH, NH)),
            "w2": 0.7 * jax.random.normal(ks[3], (NH, NOUT))}


@jax.custom_vjp
def _cv_act(x):
    return jnp.tanh(x) + 0.1 * x * x


_cv_act.defvjp(lambda x: (jnp.tanh(x) + 0.1 * x * x, x), lambda x, g: (g * (1 - jnp.tanh(x) ** 2 + 0.2 * x),))


def _plain_act(x):
    return jnp.tanh(x) + 0.1 * x * x


def _layers_loop(p, h):
    for i in range(p["ws"].shape[0]):
        h = jnp.tanh(h @ p["ws"][i])
    return h


def _layers_scan(p, h):
    return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), h, p["ws"])[0]


def _layers_fori(p, h):
    return jax.lax.fori_loop(0, p["ws"].shape[0], lambda i, h: jnp.tanh(h @ p["ws"][i]), h)


def _layers_while(p, h):
    def body(c):
        i, h = c
        return i + 1, jnp.tanh(h @ p["ws"][i])
    return jax.lax.while_loop(lambda c: c[0] < p["ws"].shape[0], body, (0, h))[1]


def _layers_remat(policy):
    def f(p, h):
        blk = jax.checkpoint(lambda h, w: jnp.tanh(h @ w), policy=policy)
        return jax.lax.scan(lambda h, w: (blk(h, w), None), h, p["ws"])[0]
    return f


def _layers_cond(p, h):
    h = jnp.tanh(h @ p["ws"][0])
    return jax.lax.cond(jnp.sum(h) > 0, lambda h: jnp.sin(h @ p["ws"][1]), lambda h: jnp.tanh(h @ p["ws"][1]), h)


def _mlp(act=jnp.tanh, layers=_layers_loop):
    def logits(p, x):
        return layers(p, act(x @ p["w1"] + p["b1"])) @ p["w2"]
    return logits


ZOO = {
    "relu": _mlp(jax.nn.relu),
    "softplus": _mlp(jax.nn.softplus),
    "silu_gelu": _mlp(lambda x: jax.nn.silu(x) + jax.nn.gelu(x)),
    "scan": _mlp(layers=_layers_scan),
    "fori": _mlp(layers=_layers_fori),
    "remat_full": _mlp(layers=_layers_remat(jax.checkpoint_policies.nothing_saveable)),
    "remat_dots": _mlp(layers=_layers_remat(jax.checkpoint_policies.dots_saveable)),
    "cond": _mlp(layers=_layers_cond),
    "norms": _mlp(act=lambda x: jnp.tanh(x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(jnp.mean(x * x, -1,
                                                                                                     keepdims=True)
                                                                                            + 1e-3)),
}
# orders: 6 for one activation with its custom JVP rule, 5 for one control-flow model, 4 elsewhere
ORDERS = {"relu": 6, "scan": 5}


@pytest.fixture(scope="module")
def data():
    return _data()


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_flow_and_utility_against_dense_oracle(name, data):
    x, y, xs = data
    logits = ZOO[name]
    K = ORDERS.get(name, 4)
    params = _mlp_params()
    loss = lambda p, b: _ce(logits(p, b[0]), b[1])  # noqa: E731
    cs = _flow(loss, params, (x, y), K)
    oracle = _oracle_flow(loss, params, (x, y), K)
    for k, (a, b) in enumerate(zip(cs, oracle), start=1):
        assert _rel(a, b) <= RTOL, (name, k, _rel(a, b))
    a = C.utility_taylor(loss, params, (x, y), logits, xs, K)
    _check_a(a, _oracle_du(logits, params, xs, oracle, K))


def test_same_coefficients_with_and_without_scan_remat_fori_while(data):
    x, y, xs = data
    params = _mlp_params()
    ref_logits = _mlp(layers=_layers_loop)
    loss = lambda p, b: _ce(ref_logits(p, b[0]), b[1])  # noqa: E731
    ref_c = _flow(loss, params, (x, y), 4)
    ref_a = np.asarray(C.utility_taylor(loss, params, (x, y), ref_logits, xs, 4))
    for layers in (_layers_scan, _layers_fori, _layers_remat(None)):
        lg = _mlp(layers=layers)
        lo = lambda p, b, lg=lg: _ce(lg(p, b[0]), b[1])  # noqa: E731
        for a, b in zip(_flow(lo, params, (x, y), 4), ref_c):
            assert _rel(a, b) <= 1e-12
    # while_loop (forward only: JAX has no reverse mode through it) in the safety model
    a = np.asarray(C.utility_taylor(loss, params, (x, y), _mlp(layers=_layers_while), xs, 4))
    np.testing.assert_allclose(a[2:], ref_a[2:], rtol=1e-12)


def test_custom_vjp_uses_primal(data):
    """custom_vjp: flow through JAX's own reverse rule (dense oracle), Δu through the primal function."""
    x, y, xs = data
    params = _mlp_params()
    lg, lp = _mlp(_cv_act), _mlp(_plain_act)
    loss = lambda p, b: _ce(lg(p, b[0]), b[1])  # noqa: E731
    cs = _flow(loss, params, (x, y), 4)
    for a, b in zip(cs, _oracle_flow(loss, params, (x, y), 4)):
        assert _rel(a, b) <= RTOL
    a = np.asarray(C.utility_taylor(loss, params, (x, y), lg, xs, 4))
    b = np.asarray(C.utility_taylor(loss, params, (x, y), lp, xs, 4))
    np.testing.assert_allclose(a[2:], b[2:], rtol=1e-12)


def test_embedding_gather_scatter():
    V, D = 7, 4
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(3), 3)
    params = {"e": jax.random.normal(k1, (V, D)), "w": jax.random.normal(k2, (D, V)) * 0.5}
    toks = jax.random.randint(k3, (3, 5), 0, V)
    tgt = jnp.roll(toks, -1, axis=1)

    def logits(p, t):
        h = jnp.take(p["e"], t, axis=0)                              # gather
        h = h.at[:, 1:].add(0.5 * jnp.tanh(h[:, :-1]))                # scatter-add
        h = jnp.zeros_like(h).at[:, ::-1].set(h) * h                  # scatter
        return h @ p["w"]

    loss = lambda p, b: _ce(logits(p, b[0]), b[1])  # noqa: E731
    cs = _flow(loss, params, (toks, tgt), 4)
    oracle = _oracle_flow(loss, params, (toks, tgt), 4)
    for a, b in zip(cs, oracle):
        assert _rel(a, b) <= RTOL
    _check_a(C.utility_taylor(loss, params, (toks, tgt), logits, toks[::-1], 4),
             _oracle_du(logits, params, toks[::-1], oracle, 4))


# --------------------------------------------------------------------------- attention and precision

B, T, NHD, HD = 2, 4, 2, 2


def _attn_params():
    ks = jax.random.split(jax.random.PRNGKey(4), 4)
    Dm = NHD * HD
    return {n: 0.6 * jax.random.normal(k, (Dm, Dm)) for n, k in zip("qkvo", ks)}


def _attn_logits(kind):
    def f(p, x):
        q, k, v = [(x @ p[n]).reshape(B, T, NHD, HD) for n in "qkv"]
        if kind == "dpa":
            a = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
        else:
            s = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(HD)
            s = jnp.where(jnp.tril(jnp.ones((T, T), bool)), s, -1e30)
            a = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, -1), v)
        if kind == "bf16":
            a = a.astype(jnp.bfloat16).astype(x.dtype)
        return a.reshape(B, T, NHD * HD) @ p["o"]
    return f


@pytest.fixture(scope="module")
def attn():
    kx, ky = jax.random.split(jax.random.PRNGKey(5))
    x = jax.random.normal(kx, (B, T, NHD * HD))
    y = jax.random.randint(ky, (B, T), 0, NHD * HD)
    return _attn_params(), x, y


def test_dot_product_attention_float64(attn):
    """jax.nn.dot_product_attention rounds its scores to float32 before the softmax for any input dtype, so in
    float64 the model itself is a float32 computation (c_1 = −g already off by ~1e-8): that, not either
    Taylor method, is the jet/jvp discrepancy. With widen=True (default) Taylor mode evaluates it at the
    parameters' precision and matches a float64 attention written by hand, and the dense oracle of it."""
    params, x, y = attn
    dpa, ref = _attn_logits("dpa"), _attn_logits("ref")
    l_dpa = lambda p, b: _ce(dpa(p, b[0]), b[1])  # noqa: E731
    l_ref = lambda p, b: _ce(ref(p, b[0]), b[1])  # noqa: E731
    raw = _flow(l_dpa, params, (x, y), 1, widen=False)[0]
    exact = _oracle_flow(l_ref, params, (x, y), 4)
    assert _rel(raw, exact[0]) > 1e-10           # the float32 rounding inside the model is visible
    for a, b in zip(_flow(l_dpa, params, (x, y), 4), exact):
        assert _rel(a, b) <= RTOL
    for a, b in zip(_flow(l_dpa, params, (x, y), 4, method="jvp"), exact):
        assert _rel(a, b) <= RTOL
    for a, b in zip(_oracle_flow(widen_precision(l_dpa), params, (x, y), 3), exact):
        assert _rel(a, b) <= RTOL
    _check_a(C.utility_taylor(l_dpa, params, (x, y), dpa, x[::-1], 4), _oracle_du(ref, params, x[::-1], exact, 4))


def test_bf16_casts_evaluated_at_parameter_precision(attn):
    params, x, y = attn
    bf, ref = _attn_logits("bf16"), _attn_logits("ref")
    lb = lambda p, b: _ce(bf(p, b[0]), b[1])  # noqa: E731
    lr = lambda p, b: _ce(ref(p, b[0]), b[1])  # noqa: E731
    for a, b in zip(_flow(lb, params, (x, y), 3), _flow(lr, params, (x, y), 3)):
        assert _rel(a, b) <= 1e-12
    p32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params)
    c32 = _flow(lb, p32, (x.astype(jnp.float32), y), 2)
    assert c32[0].dtype == jnp.float32


# --------------------------------------------------------------------------- a small Llama / Qwen3-style model

CFG = llama.LlamaConfig(vocab_size=7, hidden_size=4, intermediate_size=6, num_layers=2, num_heads=2,
                        num_kv_heads=1, head_dim=2, tie_word_embeddings=True, remat="full")


@pytest.fixture(scope="module")
def tiny_llama():
    params = llama.init_params(CFG, jax.random.PRNGKey(0), dtype="float64", std=0.5)
    toks = jax.random.randint(jax.random.PRNGKey(1), (2, 5), 0, CFG.vocab_size)
    safety = jax.random.randint(jax.random.PRNGKey(2), (2, 5), 0, CFG.vocab_size)
    n = ravel_pytree(params)[0].size
    assert n <= 300
    return params, toks, safety


def _llama_fns(cfg):
    def logits(p, t):
        return llama.forward(cfg, p, t)

    def loss(p, t):
        return _ce(logits(p, t)[:, :-1], t[:, 1:])

    return loss, logits


def test_llama_scan_remat_rope_gqa_swiglu_tied(tiny_llama):
    params, toks, safety = tiny_llama
    """Taylor mode through the rematerialised model (remat="full") against the oracle of the same model
    without remat: the coefficients are exact and remat does not change them (each policy alone: the zoo's
    remat_full / remat_dots)."""
    loss, logits = _llama_fns(CFG)
    loss0, logits0 = _llama_fns(dataclasses.replace(CFG, remat="none"))
    K = 4
    oracle = _oracle_flow(loss0, params, toks, K)
    cs = _flow(loss, params, toks, K)
    for k, (a, b) in enumerate(zip(cs, oracle), start=1):
        assert _rel(a, b) <= RTOL, (k, _rel(a, b))
    _check_a(C.utility_taylor(loss, params, toks, logits, safety, K), _oracle_du(logits0, params, safety, oracle, K))


# --------------------------------------------------------------------------- onset_split, KL, errors


def test_onset_split_parts_sum_to_a4():
    """θ = (a, b), z = W tanh(a) + V (b ⊙ b), L = cᵀb + (a − a*)ᵀ M b + ½‖a − a*‖²: g = (0, c), so Jg = 0."""
    rng = np.random.default_rng(0)
    n = 5
    W, V = jnp.asarray(rng.standard_normal((3, n))), jnp.asarray(rng.standard_normal((3, n)))
    Mx, c, a0 = (jnp.asarray(rng.standard_normal(s)) for s in ((n, n), (n,), (n,)))
    params = {"a": a0, "b": jnp.zeros(n)}

    def logits(p, x):
        return jnp.tanh(p["a"] * x[:, None] + 0.3) @ W.T + V @ (p["b"] * p["b"])

    def loss(p, batch):
        d = p["a"] - a0
        return c @ p["b"] + d @ Mx @ p["b"] + 0.5 * d @ d + 0.2 * jnp.sum(jnp.sin(p["b"])) ** 3

    xs = jnp.linspace(0.5, 1.5, n)
    out = C.onset_split(loss, params, None, logits, xs, order=5)
    assert out["Jg_F"] <= 1e-12
    assert abs(out["a2"]) <= 1e-14 and abs(out["a3"]) <= 1e-13
    parts = out["a4_JHg"] + out["a4_curv"] + out["a4_cross"]
    assert abs(parts - out["a4"]) <= RTOL * abs(out["a4"])
    assert out["a4_cross"] != 0 and out["a4_curv"] > 0 and out["a4_JHg"] > 0


def test_kl_utility_no_floor_and_taylor():
    """kl_utility is the cancellation-free form: relative precision at Δu ~ t² ~ 1e-24 (the naive form
    returns roundoff there), and its Taylor coefficients in t equal the naive form's."""
    ref = jnp.array([[0.3, -1.0, 2.0], [0.0, 0.5, -0.5]])
    d = jnp.array([[1.0, 0.2, -0.7], [0.4, -0.3, 0.1]])
    g = lambda p, x: x + p["z"]  # noqa: E731
    t = 1e-12
    zero = jnp.zeros_like(d)                      # z_ref = 0, so z − z_ref = t d is exact in floating point
    got = float(C.kl_utility(g, {"z": zero}, {"z": t * d}, zero))
    f = lambda p, x: p["z"]  # noqa: E731
    p = jax.nn.softmax(zero, -1)
    w = d - jnp.sum(p * d, -1, keepdims=True)
    quad = float(jnp.mean(0.5 * jnp.sum(p * w * w, -1))) * t * t        # KL = ½ Var_p(Δz) + O(t³)
    assert abs(got - quad) <= 1e-10 * quad
    s = [jnp.zeros_like(d)] * 6
    s[0] = d
    s[1] = 0.3 * d[::-1]
    _, got_s = jax.jit(lambda: taylor(lambda z: C.kl_utility(f, {"z": ref}, {"z": z}, None), (ref,), (s,)))()
    dd = lambda tt: _naive_du(f, {"z": ref}, {"z": ref + tt * s[0] + tt ** 2 * s[1]}, None)  # noqa: E731
    for k in range(2, 7):
        o = float(_dt(dd, k)(0.0)) / math.factorial(k)
        assert abs(float(got_s[k - 1]) - o) <= RTOL * abs(o), (k, got_s[k - 1], o)


def test_unsupported_primitive_names_it(data):
    x, y, xs = data
    params = _mlp_params()
    lg = _mlp()
    loss = lambda p, b: _ce(lg(p, b[0]), b[1])  # noqa: E731

    def opaque_logits(p, x):
        z = lg(p, x)
        return jax.pure_callback(lambda a: np.asarray(a), jax.ShapeDtypeStruct(z.shape, z.dtype), z)

    with pytest.raises(TaylorModeError, match=r"pure_callback.*opaque_logits.*method='jvp'"):
        C.utility_taylor(loss, params, (x, y), opaque_logits, xs, 4)
