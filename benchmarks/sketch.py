"""The paper's random-subspace Fisher (§7) against the per-example gradients it sketches.

On a small Llama (``alignment_geom.models.llama``: 2 layers, width 128, MLP 512, vocab 2048, ≈1.01M
parameters, float32), m = 100 examples, each a prompt of 16 tokens and a completion of C tokens
(C = 128, and C = 1 for single-token examples), log π(completion | prompt) from
``models.objectives.completion_logprob``:

  grads      the per-example gradients gᵢ alone, vmapped in chunks of 16 and reduced to one number per
             chunk (so nothing but the gradients is computed): the peer.
  <kind>     ``linalg.random_subspace_fisher(..., k, kind=<kind>, return_vectors=False)``: gradients,
             Z = S G (m × k), eigh of F_S (k × k) and tr F̂: the whole estimator (eigenvalues); the ratio
             to ``grads`` is the target (≤ 1.5 at k = 4096).
  +vectors   the same with return_vectors=True (two more gradient passes: F̂'s eigenvectors, Rayleigh
             quotients), so ≥ 3× by construction.

Each function is compiled first (compile seconds reported apart) and timed interleaved; ratios are the
median of paired ratios. The Gaussian (the paper's dense S, n·k draws and 2nk flops per chunk) is timed
at k = 256 only (--gaussian-k; its cost grows ∝ k: it is the slow reference). Accuracy: the top
eigenvalues of every kind against the exact Gram eigenvalues (``linalg.gram_eigenpairs``) of the same gradients.

Run: ``python -m benchmarks.sketch [--quick] [--json PATH]``. Writes benchmarks/sketch.json.
"""
from __future__ import annotations

import argparse
import os
import sys

TARGETS = {"fisher_over_grads_k4096": 1.5}


def _model(quick):
    import jax

    from alignment_geom.models import llama

    if quick:
        cfg = llama.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                                num_kv_heads=1, head_dim=16)
    else:
        cfg = llama.LlamaConfig(vocab_size=2048, hidden_size=128, intermediate_size=512, num_layers=2, num_heads=4,
                                num_kv_heads=2, head_dim=32)
    params = llama.init_params(cfg, jax.random.PRNGKey(0), dtype="float32")
    return cfg, params


def _batch(cfg, m, prompt, completion, seed=0):
    import numpy as np

    from alignment_geom.models import objectives

    rng = np.random.default_rng(seed)
    prompts = [list(rng.integers(1, cfg.vocab_size, prompt)) for _ in range(m)]
    comps = [list(rng.integers(1, cfg.vocab_size, completion)) for _ in range(m)]
    return objectives.make_batch(prompts, comps)


def main(argv=None, quick=False, log=print) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, few examples, small k")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "sketch.json"))
    ap.add_argument("--m", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--ks", default=None, help="comma-separated sketch dimensions of the sparse kinds")
    ap.add_argument("--no-vectors", action="store_true", help="skip the return_vectors=True row")
    ap.add_argument("--gaussian-k", type=int, default=None, help="k of the dense Gaussian reference (0: skip)")
    args = ap.parse_args([] if argv is None else argv)
    quick = quick or args.quick

    import jax
    import jax.numpy as jnp
    import numpy as np

    from alignment_geom import linalg
    from alignment_geom.models import objectives
    from benchmarks import compile_fn, environment, paired_ratio, time_interleaved
    from benchmarks.models import n_params

    cfg, params = _model(quick)
    n = n_params(params)
    m = args.m or (12 if quick else 100)
    ks = tuple(int(x) for x in args.ks.split(",")) if args.ks else ((64,) if quick else (1024, 4096))
    k_ref = ks[-1]
    comps = (8, 1) if quick else (128, 1)
    reps = args.reps or (2 if quick else 3)
    B = 16
    key = jax.random.PRNGKey(1)
    out = {"environment": environment(), "n_params": n, "m": m, "chunk": B, "ks": list(ks), "targets": TARGETS,
           "quick": quick, "results": {}}
    log(f"llama: n = {n:,} parameters, m = {m} examples, float32, chunks of {B}")

    def lp_fn(p, b):
        return objectives.completion_logprob(cfg, p, b)

    rows = []
    for C in comps:
        batch = {kk: jnp.asarray(v) for kk, v in _batch(cfg, m, 16, C).items()}

        def grads_only(p, b):
            def chunk(exs):
                g = jax.vmap(lambda ex: jax.grad(
                    lambda q: lp_fn(q, jax.tree_util.tree_map(lambda x: x[None], ex))[0])(p))(exs)
                return sum(jnp.sum(x) for x in jax.tree_util.tree_leaves(g))
            nfull = m // B
            full = jax.tree_util.tree_map(lambda x: x[:nfull * B].reshape((nfull, B) + x.shape[1:]), b)
            s = jnp.sum(jax.lax.map(chunk, full))
            if m - nfull * B:
                s = s + chunk(jax.tree_util.tree_map(lambda x: x[nfull * B:], b))
            return s

        fns, comp_s = {}, {}
        fns["grads"], comp_s["grads"] = compile_fn(grads_only, params, batch)
        gk = args.gaussian_k if args.gaussian_k is not None else (64 if quick else 256)
        configs = [("sparse_sign", k, False) for k in ks] + [("countsketch", k_ref, False)]
        configs += [("gaussian", gk, False)] if gk else []
        if C == comps[0] and not args.no_vectors:
            configs += [("sparse_sign", k_ref, True)]
        for kind, k, vec in configs:
            name = f"{kind} k={k}" + (" +vectors" if vec else "")

            def f(p, b, kind=kind, k=k, vec=vec):
                rs = linalg.random_subspace_fisher(lp_fn, p, b, k, key=key, kind=kind, example_batch_size=B,
                                                   return_vectors=vec)
                # the vectors must be outputs, or XLA drops their two gradient passes as dead code
                return (rs.eigvals, rs.trace) + ((rs.rayleigh, rs.eigvecs) if vec else ())

            fns[name], comp_s[name] = compile_fn(f, params, batch)
        times = time_interleaved({nm: (fn, (params, batch)) for nm, fn in fns.items()}, reps=reps, warmup=0)
        # exact F̂ eigenvalues from the Gram matrix of the same gradients
        G = jax.jit(lambda p, b: jax.vmap(lambda ex: jax.flatten_util.ravel_pytree(jax.grad(
            lambda q: lp_fn(q, jax.tree_util.tree_map(lambda x: x[None], ex))[0])(p))[0])(b))(params, batch)
        exact = np.asarray(linalg.gram_eigenpairs(G, 10)[0])
        del G
        t_g = float(np.median(times["grads"]))
        res = {"grads_seconds": t_g, "compile_seconds": comp_s, "rows": {}}
        log(f"\ncompletion of {C} token(s): per-example gradients {t_g:.3f}s (m = {m})")
        log(f"{'estimator':32s} {'seconds':>8s} {'÷ grads':>8s} {'λ₁..₁₀ max rel err':>18s}")
        for nm in fns:
            if nm == "grads":
                continue
            kind, k = nm.split()[0], int(nm.split()[1][2:])
            lam = np.asarray(fns[nm](params, batch)[0])[:10]
            err = float(np.max(np.abs(lam - exact) / exact))
            ratio = paired_ratio(times, nm, "grads")
            res["rows"][nm] = {"kind": kind, "k": k, "seconds": float(np.median(times[nm])), "ratio_to_grads": ratio,
                               "max_rel_err_top10": err}
            log(f"{nm:32s} {float(np.median(times[nm])):8.3f} {ratio:8.2f} {err:18.3f}")
            rows.append((C, nm, ratio))
        out["results"][f"completion_{C}"] = res
    with open(args.json, "w") as fh:
        import json

        json.dump(out, fh, indent=2)
    log(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
