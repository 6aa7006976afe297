"""linalg.sketch: the sketch kinds against direct numpy constructions, adjoints, sharding, moments and the
distortion bounds of the random-subspace Fisher on known spectra (float64)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from alignment_geom import aic
from alignment_geom import linalg as sp

KEY = jax.random.PRNGKey(3)
KINDS = ("gaussian", "sparse_sign", "countsketch")
M1, M2, GOLD = np.uint32(0x7FEB352D), np.uint32(0x846CA68B), np.uint32(0x9E3779B9)


def _mat(like, k, key, kind="gaussian", **kw):
    """The dense S of random_sketch_matrix, jitted (the eager loops dispatch op by op)."""
    return np.asarray(jax.jit(lambda l, kk: sp.random_sketch_matrix(l, k, key=kk, kind=kind, **kw))(like, key))


def _like():
    return {"W": jnp.zeros((16, 12)), "b": jnp.zeros((24,))}


def _np_mix(x):
    x = x ^ (x >> np.uint32(16))
    x = x * M1
    x = x ^ (x >> np.uint32(15))
    x = x * M2
    return x ^ (x >> np.uint32(16))


def _np_sparse(like, k, s, key):
    """S from its definition: column i of leaf ℓ has sign/√s at row off_j + h_j(i) mod k_j in each block j."""
    leaves = jax.tree_util.tree_leaves(like)
    sizes = [k // s + (1 if j < k % s else 0) for j in range(s)]
    offs = np.cumsum([0] + sizes[:-1])
    cols = []
    for ell, x in enumerate(leaves):
        size = int(np.prod(x.shape))
        i = np.arange(size, dtype=np.uint32)
        Sl = np.zeros((k, size))
        for j in range(s):
            a, b = (np.asarray(jax.random.bits(jax.random.fold_in(jax.random.fold_in(key, ell), j), (2,),
                                               jnp.uint32)))
            h = _np_mix(_np_mix(i ^ a) + b)
            g = _np_mix(h + GOLD)
            rows = offs[j] + (h % np.uint32(sizes[j])).astype(np.int64)
            Sl[rows, np.arange(size)] += np.where((g >> np.uint32(31)) == 0, 1.0, -1.0) / np.sqrt(s)
        cols.append(Sl)
    return np.concatenate(cols, axis=1)


def _np_gaussian(like, k, key, block_size):
    """S from its definition: leaf ℓ's (block_size, k) slabs N(0, 1/k) from fold_in(fold_in(key, ℓ), block)."""
    cols = []
    for ell, x in enumerate(jax.tree_util.tree_leaves(like)):
        size = int(np.prod(x.shape))
        b = min(block_size, size)
        nb = -(-size // b)
        blocks = [np.asarray(jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, ell), c), (b, k),
                                               jnp.float64)) for c in range(nb)]
        cols.append(np.concatenate(blocks)[:size].T / np.sqrt(k))
    return np.concatenate(cols, axis=1)


@pytest.mark.parametrize("k,s", [(40, 1), (40, 4), (50, 3)])
def test_sparse_matrix_against_numpy(k, s):
    like = _like()
    S = _mat(like, k, KEY, sp.SparseSign(s=s))
    np.testing.assert_array_equal(S, _np_sparse(like, k, s, KEY))
    # every column has exactly s nonzeros ±1/√s (unit norm)
    assert np.all(np.sum(S != 0, axis=0) == s)
    np.testing.assert_allclose(np.sum(S * S, axis=0), 1.0, rtol=1e-14)
    if s == 1:
        np.testing.assert_array_equal(S, _mat(like, k, KEY, "countsketch"))


def test_gaussian_matrix_against_blocks():
    like = _like()
    S = _mat(like, 30, KEY, block_size=50)
    np.testing.assert_allclose(S, _np_gaussian(like, 30, KEY, 50), rtol=1e-14, atol=1e-15)
    # the object, the function and the batched application agree
    v = jax.tree_util.tree_map(lambda x: jnp.asarray(np.random.default_rng(0).standard_normal(x.shape)), like)
    sk = sp.GaussianSketch(30, KEY, 50)
    np.testing.assert_allclose(np.asarray(sk.apply(v)), S @ np.asarray(ravel_pytree(v)[0]), rtol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_transpose_reproducible_normalization(kind):
    like = _like()
    k = 32
    S = _mat(like, k, KEY, kind, block_size=64)
    w = jnp.asarray(np.random.default_rng(1).standard_normal(k))
    St = ravel_pytree(jax.jit(lambda ww: sp.sketch_transpose(ww, like, key=KEY, kind=kind, block_size=64))(w))[0]
    np.testing.assert_allclose(np.asarray(St), S.T @ np.asarray(w), rtol=1e-12, atol=1e-13)
    v = jax.tree_util.tree_map(lambda x: jnp.asarray(np.random.default_rng(2).standard_normal(x.shape)), like)
    y1 = sp.sketch(v, k, key=KEY, kind=kind, block_size=64) if kind != "gaussian" else \
        sp.GaussianSketch(k, KEY, 64).apply(v)
    y2 = jax.jit(lambda vv: sp.sketch(vv, k, key=KEY, kind=kind, block_size=64))(v)
    np.testing.assert_allclose(np.asarray(y1), np.asarray(y2), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(np.asarray(y1), S @ np.asarray(ravel_pytree(v)[0]), rtol=1e-12, atol=1e-13)
    S2 = _mat(like, k, jax.random.PRNGKey(4), kind, block_size=64)
    assert np.max(np.abs(S2 - S)) > 0.1
    # "subspace" normalisation: S·√(k/n), same matrix otherwise
    n = S.shape[1]
    Ss = _mat(like, k, KEY, kind, block_size=64, normalization="subspace")
    np.testing.assert_allclose(Ss, S * np.sqrt(k / n), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("kind", ("gaussian", "sparse_sign"))   # countsketch: the s = 1 sparse_sign code path
def test_sharded_equals_unsharded(kind):
    mesh = Mesh(np.array(jax.devices()[:8]), ("x",))
    rng = np.random.default_rng(5)
    V = {"W": jnp.asarray(rng.standard_normal((3, 16, 12))), "b": jnp.asarray(rng.standard_normal((3, 24)))}
    like = jax.tree_util.tree_map(lambda x: x[0], V)
    sk = sp.as_sketch(kind, 40, KEY, block_size=64)
    f = jax.jit(sk.apply_batch)
    g = jax.jit(lambda w: sk.transpose(w, like))
    Z0 = np.asarray(f(V))
    Vs = {"W": jax.device_put(V["W"], NamedSharding(mesh, PartitionSpec(None, "x", None))),
          "b": jax.device_put(V["b"], NamedSharding(mesh, PartitionSpec(None, "x")))}
    assert len(Vs["W"].sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(f(Vs)), Z0, rtol=1e-12, atol=1e-12)
    w = jnp.asarray(rng.standard_normal(40))
    np.testing.assert_allclose(np.asarray(ravel_pytree(g(jax.device_put(w, NamedSharding(mesh, PartitionSpec()))))[0]),
                               np.asarray(ravel_pytree(g(w))[0]), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(Z0, np.asarray(jax.vmap(sk.apply)(V)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_second_moments(kind):
    """E SᵀS = I_n, and E‖(SV)ᵀ(SV) − I‖²_F ≤ r(r+1)/k for an orthonormal n×r V, over 200 seeds."""
    like = {"a": jnp.zeros((30,)), "b": jnp.zeros((10,))}
    n, k, N, r = 40, 24, 200, 3
    keys = jax.random.split(jax.random.PRNGKey(11), N)
    Ss = np.asarray(jax.jit(jax.vmap(lambda kk: sp.random_sketch_matrix(like, k, key=kk, kind=kind)))(keys))
    StS = np.einsum("sij,sil->sjl", Ss, Ss)
    mean = StS.mean(0)
    # entrywise standard error of the mean: off-diagonal var(SᵀS)_{ab} = 1/k (all kinds), diagonal 2/k (Gaussian)
    se = np.sqrt(2.0 / k / N)
    assert np.max(np.abs(mean - np.eye(n))) < 5 * se, np.max(np.abs(mean - np.eye(n)))
    V = np.linalg.qr(np.random.default_rng(6).standard_normal((n, r)))[0]
    W = np.einsum("ia,sij,jb->sab", V, StS, V)
    dev = np.sum((W - np.eye(r)) ** 2, axis=(1, 2))
    # the mean of N draws with mean ≤ b = r(r+1)/k and variance ≤ 2b² (all kinds): within b + 5·b·√(2/N)
    b = r * (r + 1) / k
    assert dev.mean() <= b * (1 + 5 * np.sqrt(2.0 / N)), (dev.mean(), b)
    if kind != "gaussian":
        np.testing.assert_allclose(np.diagonal(StS, axis1=1, axis2=2), 1.0, rtol=1e-14)


def _planted_problem(m=6, seed=21):
    """log π(yᵢ|xᵢ) = aᵢ·θ + cᵢ: gᵢ = aᵢ, F̂ = AᵀA/m with the known spectrum σ² (gap after the 3rd)."""
    rng = np.random.default_rng(seed)
    like = {"W": jnp.zeros((15, 12)), "b": jnp.zeros((20,))}
    n = 200
    sig2 = np.array([9.0, 6.0, 4.0, 0.6, 0.4, 0.2])[:m]
    U = np.linalg.qr(rng.standard_normal((m, m)))[0]
    V = np.linalg.qr(rng.standard_normal((n, m)))[0]
    A = np.sqrt(m) * U @ np.diag(np.sqrt(sig2)) @ V.T
    _, unravel = ravel_pytree(like)
    batch = {"a": jnp.asarray(A), "c": jnp.asarray(rng.standard_normal(m))}

    def logprob_fn(p, bt):
        return bt["a"] @ ravel_pytree(p)[0] + bt["c"]

    params = unravel(jnp.asarray(rng.standard_normal(n)))
    return params, logprob_fn, batch, A, sig2, V


@pytest.fixture(scope="module")
def seeds_runs():
    """random_subspace_fisher of every kind over 12 seeds (vmapped), with the sketch matrices."""
    params, logprob_fn, batch, A, sig2, V = _planted_problem()
    k = 96
    keys = jax.random.split(jax.random.PRNGKey(31), 12)
    out = {}
    for kind in KINDS:
        def run(kk, kind=kind):
            rs = sp.random_subspace_fisher(logprob_fn, params, batch, k, key=kk, kind=kind, example_batch_size=4)
            return rs, sp.random_sketch_matrix(params, k, key=kk, kind=kind)

        out[kind] = jax.jit(jax.vmap(run))(keys)
    return out, (params, logprob_fn, batch, A, sig2, V, k)


@pytest.mark.parametrize("kind", KINDS)
def test_fisher_distortion_on_known_spectrum(kind, seeds_runs):
    runs, (params, logprob_fn, batch, A, sig2, V, k) = seeds_runs
    rs, Ss = runs[kind]
    m, r, d = A.shape[0], A.shape[0], 3
    P = V[:, :d] @ V[:, :d].T                                                  # exact top-3 projector
    delta = np.random.default_rng(8).standard_normal(A.shape[1])
    os_exact = np.linalg.norm(P @ delta) / np.linalg.norm(delta)
    devs, ratios = [], []
    for s in range(Ss.shape[0]):
        S = np.asarray(Ss[s])
        np.testing.assert_allclose(np.asarray(rs.Z[s]), A @ S.T, rtol=1e-10, atol=1e-10)
        W = (S @ V).T @ (S @ V)
        wmin, wmax = np.linalg.eigvalsh(W)[[0, -1]]
        # Ostrowski: λ_j(F_S)/λ_j(F̂) ∈ [λ_min(W), λ_max(W)], exactly
        ratio = np.asarray(rs.eigvals[s]) / sig2
        assert np.all((ratio >= wmin - 1e-10) & (ratio <= wmax + 1e-10)), (ratio, wmin, wmax)
        ratios.append(ratio)
        devs.append(np.sum((W - np.eye(r)) ** 2))
        # overlap score of the sketched top-3 subspace: |OS_S − OS| ≤ ‖P_S − P‖ = sin θ_max, and sin θ_max obeys
        # the Davis–Kahan bound 2‖E‖/gap with E = K_S − K the exact Gram-space perturbation
        Vs = np.asarray(sp.as_matrix(jax.tree_util.tree_map(lambda x: x[s, :d], rs.eigvecs)))
        sub = aic.SensitiveSubspace(jax.tree_util.tree_map(lambda x: x[s, :d], rs.eigvecs), rs.eigvals[s, :d],
                                    jnp.zeros(d))
        dl = ravel_pytree(params)[1](jnp.asarray(delta))
        os_s = float(aic.overlap_score(dl, sub))
        sin_max = np.linalg.norm(Vs.T @ Vs - P, 2)
        assert abs(os_s - os_exact) <= sin_max + 1e-10
        E = np.linalg.norm(A @ (S.T @ S - np.eye(S.shape[1])) @ A.T / m, 2)
        assert sin_max <= 2 * E / (sig2[d - 1] - sig2[d]) + 1e-10, (sin_max, E)
        # the Rayleigh quotients of the mapped-back vectors are exact
        Vall = np.asarray(sp.as_matrix(jax.tree_util.tree_map(lambda x: x[s], rs.eigvecs)))
        np.testing.assert_allclose(np.asarray(rs.rayleigh[s]), np.sum((Vall @ A.T) ** 2, axis=1) / m, rtol=1e-10)
    b = r * (r + 1) / k
    assert np.mean(devs) <= b * (1 + 5 * np.sqrt(2.0 / len(devs))), (np.mean(devs), b)
    runs_g = runs["gaussian"][0]
    if kind != "gaussian":
        # statistically like the Gaussian: the mean ratios agree within 4 standard errors of the difference
        rg = np.asarray(runs_g.eigvals) / sig2
        ra = np.asarray(ratios)
        se = np.sqrt(ra.var(0, ddof=1) / len(ra) + rg.var(0, ddof=1) / len(rg))
        assert np.all(np.abs(ra.mean(0) - rg.mean(0)) <= 4 * se + 1e-12), (ra.mean(0), rg.mean(0), se)


@pytest.mark.parametrize("kind", ("sparse_sign", "countsketch"))
def test_masks(kind):
    params, logprob_fn, batch, A, _, _ = _planted_problem()
    mask = {"W": np.arange(180).reshape(15, 12) % 3 == 0, "b": False}
    rs = jax.jit(lambda p, b: sp.random_subspace_fisher(logprob_fn, p, b, 32, key=KEY, mask=mask, kind=kind))(
        params, batch)
    S = _mat(params, 32, KEY, kind, mask=mask)
    keep = np.concatenate([mask["W"].reshape(-1), np.zeros(20, bool)])
    assert np.all(S[:, ~keep] == 0)
    np.testing.assert_array_equal(S[:, keep], _mat(params, 32, KEY, kind)[:, keep])
    np.testing.assert_allclose(np.asarray(rs.Z), (A * keep) @ S.T, rtol=1e-10, atol=1e-10)
    assert np.all(np.asarray(rs.eigvecs["b"]) == 0)
    # subspace normalisation counts the kept coordinates only
    Ss = _mat(params, 32, KEY, kind, mask=mask, normalization="subspace")
    np.testing.assert_allclose(Ss, S * np.sqrt(32 / keep.sum()), rtol=1e-12)


def test_kind_argument_and_estimator():
    params, logprob_fn, batch, A, sig2, _ = _planted_problem()
    with pytest.raises(ValueError, match="sketch kind"):
        sp.random_subspace_fisher(logprob_fn, params, batch, 16, key=KEY, kind="hadamard")
    with pytest.raises(ValueError, match="s <= k"):
        sp.sketch(params, 4, key=KEY, kind=sp.SparseSign(s=8))
    with pytest.raises(ValueError, match="RandomSubspace.k|sketch kind"):
        aic.RandomSubspace(16, kind="nope").check(None)
    # RandomSubspace passes its kind through: same result as the function
    est = aic.RandomSubspace(48, kind=sp.SparseSign(s=2))
    from alignment_geom.problem import Problem  # noqa: F401 - the estimator's argument type
    rs = sp.random_subspace_fisher(logprob_fn, params, batch, 48, key=KEY, kind=sp.SparseSign(s=2))
    got = est._run(type("P", (), {"logprob_fn": staticmethod(logprob_fn), "params": params, "safety_batch": batch,
                                  "mask": None})(), KEY, False)
    np.testing.assert_allclose(np.asarray(got.eigvals), np.asarray(rs.eigvals), rtol=1e-12)
