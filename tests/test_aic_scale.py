"""aic.scale: the chunked Gram Fisher and OS against dense float64 oracles (jax.jacfwd on the ravelled parameters +
numpy eigh), the random-subspace estimate converging to them as k grows, and 8 devices equal to one."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from alignment_geom import aic, linalg, models

M_EX = 8


@pytest.fixture(scope="module")
def tiny():
    """A 1-layer Qwen3 of n < 500 parameters in float64, 8 safe completions and 3 updates Δθ."""
    cfg = models.LlamaConfig(vocab_size=12, hidden_size=8, intermediate_size=4, num_layers=1, num_heads=2,
                             num_kv_heads=1, head_dim=4, tie_word_embeddings=True, architecture="Qwen3ForCausalLM",
                             remat="none")
    params = models.init_llama(cfg, jax.random.PRNGKey(0), dtype="float64", std=0.5)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(1, 12, size=int(rng.integers(2, 5)))) for _ in range(M_EX)]
    comps = [list(rng.integers(1, 12, size=int(rng.integers(1, 4)))) for _ in range(M_EX)]
    batch = jax.tree_util.tree_map(jnp.asarray, models.make_batch(prompts, comps))
    flat, unravel = ravel_pytree(params)
    assert flat.shape[0] <= 500

    def logprob_fn(p, b):
        return models.completion_logprob(cfg, p, b)

    J = np.asarray(jax.jacfwd(lambda f: logprob_fn(unravel(f), batch))(flat))          # (m, n)
    F = J.T @ J / M_EX
    lam, V = np.linalg.eigh(F)
    lam, V = lam[::-1], V[:, ::-1]
    deltas_flat = rng.standard_normal((3, flat.shape[0]))
    deltas = jax.vmap(unravel)(jnp.asarray(deltas_flat))
    return dict(cfg=cfg, params=params, batch=batch, fn=logprob_fn, lam=lam, V=V, dflat=deltas_flat,
                deltas=deltas, n=flat.shape[0])


def _dense_os(t, d):
    Vd = t["V"][:, :d]
    return np.linalg.norm(t["dflat"] @ Vd, axis=1) / np.linalg.norm(t["dflat"], axis=1)


@pytest.mark.parametrize("chunk", [3, 8])
def test_gram_fisher_and_os_equal_dense(tiny, chunk):
    gf = jax.jit(lambda p, b: aic.gram_fisher(tiny["fn"], p, b, chunk=chunk))(tiny["params"], tiny["batch"])
    np.testing.assert_allclose(np.asarray(gf.eigvals), tiny["lam"][:M_EX], rtol=0, atol=1e-10 * tiny["lam"][0])
    np.testing.assert_allclose(float(gf.trace), tiny["lam"].sum(), rtol=1e-10)
    for d in (1, 3):
        os_ = aic.gram_overlap(tiny["fn"], tiny["params"], tiny["batch"], gf, tiny["deltas"], d, chunk=chunk)
        np.testing.assert_allclose(np.asarray(os_), _dense_os(tiny, d), rtol=1e-10)


def test_subspace_fisher_converges_with_k(tiny):
    """λ_j(S F̂ Sᵀ) → λ_j(F̂) and OS_S → OS as k grows (mean relative error over 4 sketches shrinks ~ 1/√k, so
    by about 16× from k = 16 to k = 4096)."""
    d = 2
    ref_os = _dense_os(tiny, d)
    errs, os_errs = [], []
    keys = jax.random.split(jax.random.PRNGKey(10), 4)
    for k in (16, 4096):
        def one(key, k=k):
            sf = aic.subspace_fisher(tiny["fn"], tiny["params"], tiny["batch"], k, key=key, chunk=4)
            return sf.eigvals[:d], aic.subspace_overlap(sf, tiny["deltas"], d, key=key)

        lam, os_ = jax.jit(jax.vmap(one))(keys)
        errs.append(np.mean(np.abs(np.asarray(lam) / tiny["lam"][:d] - 1).max(axis=1)))
        os_errs.append(np.mean(np.abs(np.asarray(os_) - ref_os).max(axis=1)))
    assert errs[1] < errs[0] / 4 and errs[1] < 0.1, errs
    assert os_errs[1] < os_errs[0] / 2 and os_errs[1] < 0.05, os_errs


def test_sketched_gradients_independent_of_chunking(tiny):
    key = jax.random.PRNGKey(3)
    z1 = aic.sketched_gradients(tiny["fn"], tiny["params"], tiny["batch"], 32, key=key, chunk=1)
    z8 = aic.sketched_gradients(tiny["fn"], tiny["params"], tiny["batch"], 32, key=key, chunk=5)
    np.testing.assert_allclose(np.asarray(z1), np.asarray(z8), rtol=1e-12, atol=1e-14)


def test_sharded_equals_unsharded(tiny):
    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharded = jax.device_put(tiny["batch"], NamedSharding(mesh, P("data")))
    key = jax.random.PRNGKey(1)

    def run(b):
        gf = aic.gram_fisher(tiny["fn"], tiny["params"], b, chunk=8)
        os_ = aic.gram_overlap(tiny["fn"], tiny["params"], b, gf, tiny["deltas"], 2, chunk=8)
        z = aic.sketched_gradients(tiny["fn"], tiny["params"], b, 64, key=key, chunk=8)
        return gf.eigvals, os_, z

    one = jax.jit(run)(tiny["batch"])
    eight = jax.jit(run)(sharded)
    assert len(eight[2].sharding.device_set) in (1, 8)
    for a, b in zip(one, eight):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-11, atol=1e-13)


def test_true_fisher_lanczos_on_a_mask(tiny):
    """Lanczos on the true Fisher restricted to the MLP block equals the dense masked Fisher's top pairs."""
    params, batch, cfg = tiny["params"], tiny["batch"], tiny["cfg"]
    mask = jax.tree_util.tree_map(lambda _: False, params)
    mask["layers"] = {k: (k in ("gate", "up", "down")) for k in params["layers"]}
    mask = jax.tree_util.tree_map(lambda x, mm: mm, params, mask)

    def logits_fn(p, b):
        return models.completion_logits(cfg, p, b)

    sub = aic.true_fisher_eigenpairs(logits_fn, params, batch, 2, key=jax.random.PRNGKey(0), mask=mask,
                                     num_steps=40)
    flat, unravel = ravel_pytree(params)
    sel = np.asarray(ravel_pytree(jax.tree_util.tree_map(lambda x, mm: jnp.full(x.shape, mm), params, mask))[0])
    Jz = np.asarray(jax.jacfwd(lambda f: logits_fn(unravel(f), batch))(flat))          # (B, K, V, n)
    z = np.asarray(logits_fn(params, batch))
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    B, K, V = z.shape
    F = np.zeros((flat.shape[0],) * 2)
    for b in range(B):
        for k in range(K):
            A = np.diag(p[b, k]) - np.outer(p[b, k], p[b, k])
            F += Jz[b, k].T @ A @ Jz[b, k]
    F = F[np.ix_(sel, sel)] / (B * K)
    lam = np.linalg.eigvalsh(F)[::-1]
    np.testing.assert_allclose(np.asarray(sub.eigvals), lam[:2], rtol=1e-9)
    assert aic.scale.basis_bytes(params, 41, mask=mask) == 41 * int(sel.sum()) * 8


def test_gram_jvp_gram_fisher_subspace_fisher_types_and_values(tiny):
    """gram_jvp = J Δθ against the dense Jacobian; GramFisher/SubspaceFisher fields against numpy."""
    flat, unravel = ravel_pytree(tiny["params"])
    J_dense = np.asarray(jax.jacfwd(lambda f: tiny["fn"](unravel(f), tiny["batch"]))(flat))
    JD = np.asarray(aic.gram_jvp(tiny["fn"], tiny["params"], tiny["batch"], tiny["deltas"], chunk=3))
    np.testing.assert_allclose(JD, tiny["dflat"] @ J_dense.T, rtol=1e-10, atol=1e-12)
    gf = aic.gram_fisher(tiny["fn"], tiny["params"], tiny["batch"], chunk=3)
    assert isinstance(gf, aic.GramFisher)
    np.testing.assert_allclose(np.asarray(gf.K), J_dense @ J_dense.T / M_EX, rtol=1e-10, atol=1e-12)
    sf = aic.subspace_fisher(tiny["fn"], tiny["params"], tiny["batch"], 16, key=jax.random.PRNGKey(1), chunk=3)
    assert isinstance(sf, aic.SubspaceFisher)
    Z = np.asarray(sf.Z)
    np.testing.assert_allclose(float(sf.trace), (Z ** 2).sum() / M_EX, rtol=1e-10)


def test_sketch_kinds_and_countsketch(tiny):
    """Every name in SKETCH_KINDS builds a reproducible matrix; CountSketch has one ±scale entry per column."""

    key = jax.random.PRNGKey(3)
    for kind in linalg.SKETCH_KINDS:
        S1 = np.asarray(linalg.random_sketch_matrix(tiny["params"], 8, key=key, kind=kind))
        S2 = np.asarray(linalg.random_sketch_matrix(tiny["params"], 8, key=key, kind=kind))
        assert S1.shape == (8, tiny["n"]) and np.array_equal(S1, S2)
    S = np.asarray(linalg.random_sketch_matrix(tiny["params"], 8, key=key, kind=linalg.CountSketch()))
    nnz = (S != 0).sum(axis=0)
    assert np.all(nnz == 1)
    np.testing.assert_allclose(np.abs(S[S != 0]), np.abs(S[S != 0])[0], rtol=1e-14)
