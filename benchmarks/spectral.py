"""Eigensolvers: top-20 Fisher eigenpairs of the ~1M-parameter MLP, and ``aic.measure`` end to end.

On ``benchmarks.models.mlp_model`` (tanh MLP 512 → 1024 → 512 → 10, 1,055,242 parameters; the Fisher
of softmax(z) on its m = 512 inputs), in float64:

  matvecs        Lanczos (partial re-orthogonalisation, tolerance stop checked every step) for the top-20
                 eigenpairs with relative residual ≤ 1e-6 (at most --max-steps = 200): Krylov matvecs used
                 and the true residuals,
                 (a) on the natural Fisher (a random-init MLP: flat top spectrum, no gap) and (b) on the
                 same Fisher plus a planted rank-20 spike above a gap λ_21/λ_20 ≈ ½ (target ≤ 60);
                 LOBPCG and randomized subspace iteration for comparison (full mode, without --no-compare).
  compile        seconds to compile a fixed 20-step and an 80-step Lanczos (target: equal; the loop is a
                 lax.while_loop, so the program does not grow with the step count).
  step / matvec  (t(80 steps) − t(20 steps)) / 60 divided by one jitted Fisher matvec: the cost of a
                 Lanczos step in matvecs (the matvec, plus on the steps that partial re-orthogonalisation
                 selects one Gram–Schmidt pass over the j filled basis rows, a second only when DGKS asks
                 for it; each pass reads those j float64 n-vectors twice, so at n = 1M it is memory-bound).
  ARPACK         side by side with scipy's eigsh on the same operator and tolerance: the full-basis Lanczos
                 with partial (the default) and full re-orthogonalisation, the Gram-side Lanczos
                 (F = BᵀB, on B Bᵀ), bounded thick restart in float64 and bfloat16
                 (targets: time ≤ 0.7× ARPACK's, matvecs ≤ ARPACK's).
  BLAS threads   everything runs with OpenBLAS (scipy's and numpy's, which also serve jax's CPU eigh) held to
                 --blas-threads = 1 thread: with its default of one thread per core, its idle threads spin
                 after each LAPACK call and take a core from the next matvec; on this 2-core machine that
                 cost the Lanczos tolerance test (one small eigh per step) 2–3.5 s of a 13–16 s run and
                 left ARPACK's time unchanged (22.8–23.4 s default, 23.5–24.4 s with one thread).
  measure        ``aic.measure`` (d = 20, Hutch++ trace) end to end, first call (compile included) and
                 second call.

Prints ratios and writes benchmarks/spectral.json. ``--quick`` uses the small MLP variant.
Run: ``python -m benchmarks.spectral [--quick] [--json PATH]``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

TARGETS = {"lanczos_matvecs_top20": 60, "compile_ratio_80_over_20": 1.5, "step_over_matvec": 1.5,
           "lanczos_time_over_arpack": 0.7, "lanczos_matvecs_over_arpack": 1.0}


def _timed(fn, *args, reps=3):
    import jax

    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return min(ts)


def _arpack_side_by_side(model, params, inputs, k, args, key, unbounded, lam_ref):
    """Our Lanczos (full basis, partial and full re-orthogonalisation; full basis on the Gram side B Bᵀ of
    F = BᵀB, M = 512·10 < n; bounded thick restart with p = 2k + 1 vectors in float64 and bfloat16) against
    scipy's eigsh (ARPACK, ncv = 2k + 1) on the same linearised Fisher, the same tolerance on the returned pairs:
    matvecs and wall seconds (compile excluded), the faster of two runs for ARPACK and the default Lanczos, one
    run for the others. A Gram-side step costs one B and one Bᵀ (one F·v's work); its re-orthogonalisation is on
    M-vectors instead of n-vectors, which is what the primal full basis with reorth="full" spends most of its
    time on here; reorth="partial" projects on the few steps where the estimated loss of orthogonality
    exceeds √u."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import scipy.sparse.linalg as sla
    from jax.flatten_util import ravel_pytree

    from alignment_geom import curvature, linalg

    p = args.basis_size or 2 * k + 1
    flat0, unravel = ravel_pytree(params)
    n = flat0.shape[0]
    rows = {"lanczos": {"num_matvecs": unbounded["num_matvecs"], "num_reorths": unbounded["num_reorths"],
                        "seconds": unbounded["seconds"],
                        "max_residual": unbounded["max_residual"], "converged": unbounded["converged"],
                        "basis_vectors": min(args.max_steps, n) + 1}}
    # the same full-basis primal Lanczos with every step projected against the whole basis (reorth="full")
    def solve_full(pp, kk):
        mv = curvature.linearized_fisher_vp(model.logits_fn, pp, inputs)
        return linalg.top_eigenpairs(mv, pp, k, key=kk, tol=args.tol, num_steps=min(args.max_steps, n),
                                     reorth="full", return_info=True)

    comp = jax.jit(solve_full).lower(params, key).compile()
    t0 = time.perf_counter()
    lam_f, _, res_f, info_f = jax.block_until_ready(comp(params, key))
    rows["lanczos_full_reorth"] = {"num_matvecs": int(info_f.num_matvecs), "seconds": time.perf_counter() - t0,
                                   "max_residual": float(jnp.max(res_f)), "converged": bool(info_f.converged),
                                   "basis_vectors": min(args.max_steps, n) + 1,
                                   "num_reorths": int(info_f.num_reorths),
                                   "max_rel_eig_diff_vs_lanczos": float(jnp.max(jnp.abs(lam_f - lam_ref)
                                                                                / jnp.abs(lam_ref)))}
    # Lanczos on the Gram side of F = BᵀB (B = Λ^{1/2}J/√M, M = 512·10 < n): same operator, same tolerance on
    # the mapped-back pairs, re-orthogonalisation on M-vectors
    def solve_gram(pp, kk):
        op = curvature.linearized_fisher_operator(model.logits_fn, pp, inputs)
        return linalg.top_eigenpairs(op, k, key=kk, tol=args.tol, num_steps=min(args.max_steps, n), side="gram",
                                     return_info=True)

    comp = jax.jit(solve_gram).lower(params, key).compile()
    t0 = time.perf_counter()
    lam_g, _, res_g, info_g = jax.block_until_ready(comp(params, key))
    rows["lanczos_gram_side"] = {"num_matvecs": int(info_g.num_matvecs), "seconds": time.perf_counter() - t0,
                                 "max_residual": float(jnp.max(res_g)), "converged": bool(info_g.converged),
                                 "basis_vectors": min(args.max_steps, n) + 1, "basis_length": int(np.prod(
                                     jax.eval_shape(lambda: model.logits_fn(params, inputs)).shape)),
                                 "max_rel_eig_diff_vs_lanczos": float(jnp.max(jnp.abs(lam_g - lam_ref)
                                                                              / jnp.abs(lam_ref)))}
    for name, bdt in (("lanczos_bounded", None), ("lanczos_bounded_bf16", jnp.bfloat16)):
        def solve(pp, kk, bdt=bdt):
            mv = curvature.linearized_fisher_vp(model.logits_fn, pp, inputs)
            return linalg.top_eigenpairs(mv, pp, k, key=kk, tol=args.tol if bdt is None else max(args.tol, 1e-3),
                                         basis_size=p, basis_dtype=bdt, num_steps=60 * p, return_info=True)

        comp = jax.jit(solve).lower(params, key).compile()
        t0 = time.perf_counter()
        lam_b, _, res_b, info_b = jax.block_until_ready(comp(params, key))
        rows[name] = {"num_matvecs": int(info_b.num_matvecs), "restarts": int(info_b.num_iters),
                      "seconds": time.perf_counter() - t0, "max_residual": float(jnp.max(res_b)),
                      "converged": bool(info_b.converged), "basis_vectors": p + 1,
                      "basis_dtype": "bfloat16" if bdt is not None else str(flat0.dtype),
                      "max_rel_eig_diff_vs_lanczos": float(jnp.max(jnp.abs(lam_b - lam_ref) / jnp.abs(lam_ref)))}

    # ARPACK through a LinearOperator over the jitted matvec (the linearisation hoisted as arguments)
    mv0 = curvature.linearized_fisher_vp(model.logits_fn, params, inputs)
    fn, consts = jax.closure_convert(lambda x: ravel_pytree(mv0(unravel(x)))[0], flat0)
    jmv = jax.jit(fn).lower(flat0, *consts).compile()
    count = [0]

    def np_mv(x):
        count[0] += 1
        return np.asarray(jmv(jnp.asarray(np.ravel(x), flat0.dtype), *consts))

    A = sla.LinearOperator((n, n), matvec=np_mv, dtype=np.dtype(str(flat0.dtype)))
    v0 = np.asarray(jax.random.normal(key, (n,), flat0.dtype))
    t_ar = float("inf")
    for _ in range(2):  # the faster of two runs, as for the default Lanczos
        count[0] = 0
        t0 = time.perf_counter()
        w, V = sla.eigsh(A, k=k, which="LA", tol=args.tol, v0=v0, ncv=p, maxiter=10000)
        t_ar = min(t_ar, time.perf_counter() - t0)
    nmv = count[0]
    AV = np.stack([np_mv(V[:, i]) for i in range(k)], axis=1)
    res = np.linalg.norm(AV - V * w[None, :], axis=0) / np.abs(w)
    order = np.argsort(-w)
    rows["arpack_eigsh"] = {"num_matvecs": nmv, "seconds": t_ar, "max_residual": float(np.max(res)),
                            "converged": True, "basis_vectors": p,
                            "max_rel_eig_diff_vs_lanczos": float(np.max(np.abs(w[order] - np.asarray(lam_ref))
                                                                        / np.abs(np.asarray(lam_ref))))}
    for r in rows.values():
        r["time_ratio_to_arpack"] = r["seconds"] / t_ar
        r["matvec_ratio_to_arpack"] = r["num_matvecs"] / nmv
    print(f"\nside by side, top-{k} at relative residual {args.tol:g} (compile excluded; ARPACK and lanczos: the "
          f"faster of two runs, the others one run):")
    print(f"{'solver':24s} {'basis':>6s} {'matvecs':>8s} {'seconds':>8s} {'t/ARPACK':>8s} {'mv/ARPACK':>9s} "
          f"{'max res':>8s}")
    for name, r in rows.items():
        print(f"{name:24s} {r['basis_vectors']:6d} {r['num_matvecs']:8d} {r['seconds']:8.2f} "
              f"{r['time_ratio_to_arpack']:8.2f} {r['matvec_ratio_to_arpack']:9.2f} {r['max_residual']:8.1e}")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small MLP, fewer comparisons")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "spectral.json"))
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--max-steps", type=int, default=200)
    ap.add_argument("--no-compare", action="store_true", help="skip LOBPCG / randomized")
    ap.add_argument("--no-arpack", action="store_true", help="skip the side-by-side with scipy's eigsh")
    ap.add_argument("--basis-size", type=int, default=None, help="bounded mode basis (default 2k + 1)")
    ap.add_argument("--blas-threads", type=int, default=1,
                    help="OpenBLAS threads for every solver here, ARPACK included (0: leave the library default)")
    args = ap.parse_args(argv)
    if args.blas_threads <= 0:
        return _run(args)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=args.blas_threads, user_api="blas"):
        return _run(args)


def _run(args):

    import jax
    import jax.flatten_util

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    from alignment_geom import aic, curvature, linalg
    from benchmarks import environment
    from benchmarks.models import get_model, n_params

    model = get_model("mlp", quick=args.quick, dtype=jnp.float64)
    params, inputs = model.params, model.inputs
    n = n_params(params)
    k = args.k
    key = jax.random.PRNGKey(0)
    out = {"environment": environment(), "model": model.name, "n_params": n, "quick": args.quick, "k": k,
           "tol": args.tol, "blas_threads": args.blas_threads or "default", "targets": TARGETS}
    print(f"model {model.name}: n = {n:,} parameters, float64, Fisher on {inputs.shape[0]} inputs")

    # ---------------------------------------------------------------- matvecs to convergence
    def lanczos_tol(p, kk):
        mv = curvature.linearized_fisher_vp(model.logits_fn, p, inputs)
        return linalg.top_eigenpairs(mv, p, k, key=kk, num_steps=min(args.max_steps, n), tol=args.tol,
                                       return_info=True)

    t0 = time.perf_counter()
    lz_c = jax.jit(lanczos_tol).lower(params, key).compile()
    t_lz_compile = time.perf_counter() - t0
    t_lz_run = float("inf")
    for _ in range(2):  # the faster of two runs (the first also pays the fresh basis' page faults), as for ARPACK
        t0 = time.perf_counter()
        lam, _, res, info = jax.block_until_ready(lz_c(params, key))
        t_lz_run = min(t_lz_run, time.perf_counter() - t0)
    t_lz = t_lz_compile + t_lz_run
    out["lanczos"] = {"num_matvecs": int(info.num_matvecs), "num_reorths": int(info.num_reorths),
                      "converged": bool(info.converged),
                      "max_residual": float(jnp.max(res)), "eigvals": [float(x) for x in lam],
                      "seconds_incl_compile": t_lz, "seconds": t_lz_run}
    gaps = jnp.abs(jnp.diff(lam)) / jnp.abs(lam[:-1])
    out["lanczos"]["min_relative_gap_top_k"] = float(jnp.min(gaps))
    print(f"lanczos top-{k}: {int(info.num_matvecs)} matvecs (target ≤ {TARGETS['lanczos_matvecs_top20']}), "
          f"converged={bool(info.converged)}, max residual {float(jnp.max(res)):.2e}, "
          f"λ_1 = {float(lam[0]):.4g}, λ_{k} = {float(lam[-1]):.4g}")

    # ---------------------------------------------------------------- side by side with ARPACK (scipy eigsh)
    if not args.no_arpack:
        out["arpack_side_by_side"] = _arpack_side_by_side(model, params, inputs, k, args, key, out["lanczos"], lam)

    # the same Fisher plus a planted rank-k spike: F + Σ_j s_j u_j u_jᵀ with s_j = λ_1(F)·(2 + j/k), so the
    # top-k spectrum sits above a gap λ_{k+1}/λ_k ≈ 1/2 (the natural Fisher of a random-init MLP has none)
    U = jax.random.normal(jax.random.PRNGKey(7), (k, n), jnp.float64)
    U = jnp.linalg.qr(U.T)[0].T
    spikes = float(lam[0]) * (2.0 + jnp.arange(k)[::-1] / k)
    unravel = jax.flatten_util.ravel_pytree(params)[1]

    def lanczos_gap(p, kk):
        mv0 = curvature.linearized_fisher_vp(model.logits_fn, p, inputs)

        def mv(v):
            x = jax.flatten_util.ravel_pytree(v)[0]
            return jax.tree_util.tree_map(jnp.add, mv0(v), unravel(U.T @ (spikes * (U @ x))))

        return linalg.top_eigenpairs(mv, p, k, key=kk, num_steps=min(args.max_steps, n), tol=args.tol,
                                       return_info=True)

    t0 = time.perf_counter()
    lam_g, _, res_g, info_g = jax.block_until_ready(jax.jit(lanczos_gap)(params, key))
    out["lanczos_gapped"] = {"num_matvecs": int(info_g.num_matvecs), "converged": bool(info_g.converged),
                             "max_residual": float(jnp.max(res_g)), "eigvals": [float(x) for x in lam_g],
                             "seconds_incl_compile": time.perf_counter() - t0}
    print(f"lanczos top-{k} with a gap (planted spike): {int(info_g.num_matvecs)} matvecs "
          f"(target ≤ {TARGETS['lanczos_matvecs_top20']}), converged={bool(info_g.converged)}, "
          f"max residual {float(jnp.max(res_g)):.2e}")

    if not (args.quick or args.no_compare):
        for method, kw in (("lobpcg", dict(max_iters=60)), ("randomized", dict(max_iters=30, oversample=10))):
            def solve(p, kk, method=method, kw=kw):
                mv = curvature.linearized_fisher_vp(model.logits_fn, p, inputs)
                return linalg.top_eigenpairs(mv, p, k, key=kk, method=method, tol=args.tol, return_info=True, **kw)

            t0 = time.perf_counter()
            lam2, _, res2, info2 = jax.block_until_ready(jax.jit(solve)(params, key))
            out[method] = {"num_matvecs": int(info2.num_matvecs), "converged": bool(info2.converged),
                           "max_residual": float(jnp.max(res2)),
                           "max_rel_eig_diff_vs_lanczos": float(jnp.max(jnp.abs(lam2 - lam) / jnp.abs(lam))),
                           "seconds_incl_compile": time.perf_counter() - t0}
            print(f"{method}: {out[method]['num_matvecs']} matvecs, converged={out[method]['converged']}, "
                  f"max residual {out[method]['max_residual']:.2e}, "
                  f"max |Δλ|/λ vs lanczos {out[method]['max_rel_eig_diff_vs_lanczos']:.1e}")

    # ---------------------------------------------------------------- compile time vs steps
    def lanczos_fixed(steps):
        def f(p, kk):
            mv = curvature.linearized_fisher_vp(model.logits_fn, p, inputs)
            return linalg.top_eigenpairs(mv, p, k, key=kk, num_steps=steps)

        return f

    compiled, comp = {}, {}
    for steps in (20, 80):
        steps_eff = min(steps, n)
        t0 = time.perf_counter()
        compiled[steps] = jax.jit(lanczos_fixed(steps_eff)).lower(params, key).compile()
        comp[steps] = time.perf_counter() - t0
    out["compile_seconds"] = {"steps20": comp[20], "steps80": comp[80], "ratio_80_over_20": comp[80] / comp[20]}
    print(f"compile: 20 steps {comp[20]:.2f}s, 80 steps {comp[80]:.2f}s, ratio {comp[80] / comp[20]:.2f} "
          f"(target ≈ 1)")

    # ---------------------------------------------------------------- step cost vs one matvec
    mv_jit = jax.jit(lambda p, v: curvature.fisher_vp(model.logits_fn, p, v, inputs))
    v = jax.tree_util.tree_map(jnp.ones_like, params)
    jax.block_until_ready(mv_jit(params, v))
    reps = 3 if args.quick else 2
    t_mv = _timed(mv_jit, params, v, reps=reps + 2)
    t20 = _timed(compiled[20], params, key, reps=reps)
    t80 = _timed(compiled[80], params, key, reps=reps)
    step = (t80 - t20) / 60
    out["timing_seconds"] = {"matvec": t_mv, "lanczos20": t20, "lanczos80": t80, "per_step": step,
                             "step_over_matvec": step / t_mv}
    print(f"one Fisher matvec {t_mv * 1e3:.1f} ms; Lanczos step {step * 1e3:.1f} ms = {step / t_mv:.2f} matvecs")

    # ---------------------------------------------------------------- measure end to end
    d = k
    mkw = dict(tol=args.tol, num_steps=min(args.max_steps, n), trace_matvecs=60 if args.quick else 90)
    t0 = time.perf_counter()
    rep = aic.measure(model.loss_fn, params, model.batch, model.logits_fn, inputs, d, **mkw)
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    rep = aic.measure(model.loss_fn, params, model.batch, model.logits_fn, inputs, d, **mkw)
    t_second = time.perf_counter() - t0
    out["measure"] = {"seconds_first_call": t_first, "seconds_second_call": t_second,
                      "second_call_in_matvecs": t_second / t_mv, "report": rep.to_dict()}
    print(f"aic.measure (d = {d}): first call {t_first:.1f}s, second {t_second:.1f}s "
          f"(= {t_second / t_mv:.0f} Fisher matvecs)")
    print(rep)

    with open(args.json, "w") as fh:
        json.dump(out, fh, indent=2)
    print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
