"""Curvature operators: each operator's cost divided by one jitted gradient on the same batch.

For each benchmark problem (benchmarks/models.py: the ~1M-parameter tanh MLP, batch 512, and the small Llama)
it compiles, then times round-robin in one run:

    grad            ∇L(θ)                                    (the unit)
    hvp             H·v  (alignment_geom.curvature.hvp, forward-over-reverse)
    linearized_hvp  one matvec of the reused linearisation, measured inside a lax.fori_loop of K
                    matvecs: (t(K) − t(1)) / (K − 1)
    fisher_vp       F·v, true Fisher of softmax(z) on the same inputs
    empirical_fisher_vp  F̂·v with the data's labels
    third_order     D³L[u, v, ·]
    third_order_mb4 the same with microbatches=4 (accumulated over four quarters of the batch in a lax.scan)
    flow_taylor4    [c_1..c_4] of θ(t) − θ* along gradient flow

and reports, per operator: the median paired time ratio t(op)/t(grad); the flop ratio (XLA's cost analysis
of the compiled op / of the gradient: the arithmetic of that formulation, so time/flop = 1 means the op runs
at the gradient's efficiency; one linearized matvec's flops are XLA's count of the linearised tangent program
alone, compiled with the stored residuals as constants: hvp's count − grad's would undercount it, because the HVP
discards its primal output ∇L and XLA drops that output's weight-gradient products); their
quotient time/flop (the bar: ≤ 1.1); and peak memory (XLA memory_analysis: temp + output bytes) relative to the
gradient's (the bar: ≤ 4× for third_order's low-memory option, third_order_mb4). hvp_rev_rev
(reverse-over-reverse, torch's formulation) is timed as a reference.

Run alone: ``python -m benchmarks.curvature [--quick] [--json PATH]``.
"""
from __future__ import annotations

import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from alignment_geom import curvature as C
from benchmarks import (
    bench_args,
    compile_fn,
    environment,
    median,
    memory_bytes,
    paired_ratio,
    time_interleaved,
    write_json,
)
from benchmarks.models import get_model, n_params

# time/flop bar of every operator, and third_order's peak-memory bar (× a gradient's peak)
TIME_PER_FLOP_TARGET = 1.1
BARRED = ("hvp", "linearized_hvp", "fisher_vp", "empirical_fisher_vp", "third_order", "third_order_mb4",
          "flow_taylor4")
# the bar applies to third_order's low-memory option (microbatches=4); plain third_order's peak is reported
MEMORY_TARGETS = {"third_order_mb4": 4.0}
K_MATVEC = 6


def _tree_dot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def _normalize(v):
    n = jnp.sqrt(_tree_dot(v, v))
    return jax.tree_util.tree_map(lambda x: x / n.astype(x.dtype), v)


def _flops(compiled):
    """XLA's flop count of a compiled program (None if unavailable; while-loop bodies count once)."""
    try:
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        return float(ca.get("flops", 0.0)) or None
    except Exception:
        return None


def operator_functions(model, k_matvec: int = K_MATVEC):
    """{name: (fn, args)} for every measured operator on ``model`` (uncompiled)."""
    loss_fn, logits_fn, logprob_fn = model.loss_fn, model.logits_fn, model.logprob_fn
    p, batch, inputs, safety = model.params, model.batch, model.inputs, model.safety_batch
    taylor_method = "jvp" if model.name == "transformer" else "jet"
    ku, kv = jax.random.split(jax.random.PRNGKey(1))
    leaves, treedef = jax.tree_util.tree_flatten(p)
    u = _normalize(jax.tree_util.tree_unflatten(
        treedef, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(jax.random.split(ku, len(leaves)), leaves)]))
    v = _normalize(jax.tree_util.tree_unflatten(
        treedef, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(jax.random.split(kv, len(leaves)), leaves)]))

    def lin_loop(params, b, v0, K):
        mv = C.linearized_hvp(loss_fn, params, b)
        return jax.lax.fori_loop(0, K, lambda i, w: _normalize(mv(w)), v0)

    fns = {
        "grad": (lambda params, b: jax.grad(loss_fn)(params, b), (p, batch)),
        "hvp": (lambda params, w, b: C.hvp(loss_fn, params, w, b), (p, v, batch)),
        "lin_K1": (partial(lin_loop, K=1), (p, batch, v)),
        f"lin_K{k_matvec}": (partial(lin_loop, K=k_matvec), (p, batch, v)),
        "fisher_vp": (lambda params, w, x: C.fisher_vp(logits_fn, params, w, x), (p, v, inputs)),
        "empirical_fisher_vp": (lambda params, w, b: C.empirical_fisher_vp(logprob_fn, params, w, b), (p, v, safety)),
        "third_order": (lambda params, a, w, b: C.third_order(loss_fn, params, a, w, b), (p, u, v, batch)),
        # the same D³L[u, v, ·] accumulated over 4 microbatches of the batch (a quarter of the activations live)
        "third_order_mb4": (lambda params, a, w, b: C.third_order(loss_fn, params, a, w, b, microbatches=4),
                            (p, u, v, batch)),
        # jet has no rule for lax.scan (the Llama's layer loop): nested jvps there
        "flow_taylor4": (lambda params, b: C.flow_taylor(loss_fn, params, b, 4, method=taylor_method), (p, batch)),
        # reference formulation (not library code): reverse-over-reverse, what torch's double backward computes
        "hvp_rev_rev": (lambda params, w, b: jax.grad(
            lambda q: _tree_dot(jax.grad(loss_fn)(q, b), w))(params), (p, v, batch)),
    }
    return fns


def linearized_matvec_flops(model):
    """XLA's flop count of one matvec of ``curvature.linearized_hvp`` on ``model`` (None if unavailable): the
    tangent program of the linearisation, compiled on its own with the primal residuals as constants."""
    mv = C.linearized_hvp(model.loss_fn, model.params, model.batch)
    return _flops(jax.jit(mv).lower(model.params).compile())


QUICK_K_MATVEC = 64
QUICK_OPS = ("grad", "hvp", "lin_K1", f"lin_K{QUICK_K_MATVEC}", "fisher_vp", "third_order")


def per_matvec_ratio(t_one, t_many, t_grad, k: int):
    """Median over rounds of ((t(K) − t(1)) / (K − 1)) / t(grad): one matvec of the reused linearisation
    in units of one gradient, from paired timings of a K-matvec and a 1-matvec loop.

    Returns None when the difference is not resolved (median ≤ 0: timing noise exceeds the K − 1 extra
    matvecs, as on tiny models with few rounds): a cost is never reported as zero or negative.
    """
    if k < 2:
        raise ValueError(f"need K >= 2 matvecs to difference, got {k}")
    per = [(b - a) / (k - 1) / g for a, b, g in zip(t_one, t_many, t_grad)]
    r = float(np.median(per)) if per else float("nan")
    return r if r > 0 else None


def bench_model(model, reps: int = 15, max_seconds: float = 120.0, k_matvec: int = K_MATVEC, log=print, ops=None):
    """Compile and time every operator (or those named in ``ops``) on one model; returns a JSON-ready dict."""
    fns = operator_functions(model, k_matvec)
    if ops is not None:
        fns = {n: f for n, f in fns.items() if n in ops}
    compiled, compile_s, mem, dtypes, flops = {}, {}, {}, {}, {}
    for name, (f, args) in fns.items():
        compiled[name], compile_s[name] = compile_fn(f, *args)
        mem[name] = memory_bytes(compiled[name])
        flops[name] = _flops(compiled[name])
        out = compiled[name](*args)
        dtypes[name] = sorted({str(x.dtype) for x in jax.tree_util.tree_leaves(out)})
    t0 = time.perf_counter()
    times = time_interleaved({n: (compiled[n], fns[n][1]) for n in fns}, reps=reps, warmup=1,
                             max_seconds=max_seconds)
    elapsed = time.perf_counter() - t0
    kname = f"lin_K{k_matvec}"
    lin = [(b - a) / (k_matvec - 1) for a, b in zip(times["lin_K1"], times[kname])]
    ratios = {n: paired_ratio(times, n, "grad") for n in fns if not n.startswith("lin_K")}
    ratios["linearized_hvp"] = per_matvec_ratio(times["lin_K1"], times[kname], times["grad"], k_matvec)
    ratios["linearized_hvp_setup"] = paired_ratio(times, "lin_K1", "grad")
    peak_g = (mem["grad"] or {}).get("peak") or None
    if "third_order_mb4" in flops and "third_order" in flops:
        # XLA counts a scan body once; the microbatched program does third_order's arithmetic, in 4 slices
        flops["third_order_mb4"] = flops["third_order"]
    flops_ratio = {n: (flops[n] / flops["grad"] if flops[n] and flops["grad"] else None)
                   for n in fns if not n.startswith("lin_K")}
    if "lin_K1" in fns and flops["grad"]:
        f_mv = linearized_matvec_flops(model)
        flops_ratio["linearized_hvp"] = f_mv / flops["grad"] if f_mv else None
    mem_ratio = {n: (m["peak"] / peak_g if (m and peak_g) else None) for n, m in mem.items()}
    mem_ratio["linearized_hvp"] = mem_ratio.get("lin_K1")
    time_per_flop = {n: (ratios[n] / flops_ratio[n] if ratios.get(n) and flops_ratio.get(n) else None)
                     for n in ratios if n in flops_ratio and n != "grad"}
    barred = [n for n in BARRED if n in time_per_flop]
    passed = {n: (None if time_per_flop[n] is None else bool(time_per_flop[n] <= TIME_PER_FLOP_TARGET))
              for n in barred}
    mem_pass = {n: (None if mem_ratio.get(n) is None else bool(mem_ratio[n] <= t)) for n, t in MEMORY_TARGETS.items()
                if n in mem_ratio}
    res = {
        "model": model.name,
        "n_params": n_params(model.params),
        "dtype": dtypes["grad"],
        "output_dtypes": dtypes,
        "rounds": len(times["grad"]),
        "timing_seconds": round(elapsed, 2),
        "grad_median_s": median(times["grad"]),
        "median_s": {n: median(t) for n, t in times.items()},
        "linearized_matvec_median_s": median(lin) if median(lin) > 0 else None,
        "ratio_to_grad": ratios,
        "flops_ratio_to_grad": flops_ratio,
        "time_per_flop": time_per_flop,
        "peak_memory_bytes": {n: (m["peak"] if m else None) for n, m in mem.items()},
        "peak_memory_ratio_to_grad": mem_ratio,
        "compile_s": compile_s,
        "targets": {"time_per_flop": TIME_PER_FLOP_TARGET, "peak_memory_ratio": MEMORY_TARGETS},
        "pass": passed,
        "memory_pass": mem_pass,
    }
    log(f"[curvature] {model.name}: n={res['n_params']:,} dtype={res['dtype']} rounds={res['rounds']} "
        f"grad={res['grad_median_s'] * 1e3:.1f} ms")
    for n in ["hvp", "linearized_hvp", "fisher_vp", "empirical_fisher_vp", "third_order", "third_order_mb4",
              "flow_taylor4",
              "hvp_rev_rev", "linearized_hvp_setup"]:
        if n not in ratios:
            continue
        mr = mem_ratio.get("lin_K1" if n.startswith("linearized_hvp") else n)
        fr, tf = flops_ratio.get(n), time_per_flop.get(n)
        rt = "unresolved" if ratios[n] is None else f"{ratios[n]:6.2f}x grad"
        log(f"    {n:22s} {rt}   flops {'-' if fr is None else round(fr, 2)}x   "
            f"time/flop {'-' if tf is None else round(tf, 2)}   peak mem {mr if mr is None else round(mr, 2)}x")
    return res


def main(argv=None, quick: bool = False, log=print):
    """Run the curvature benchmark on both models; returns {"mlp": ..., "transformer": ...}."""
    args = bench_args(__doc__, argv, reps=15, extra=[
        ("--models", dict(default=None, help="default mlp,transformer (mlp with --quick)"))])
    quick = quick or args.quick
    if args.models is None:
        args.models = "mlp" if quick else "mlp,transformer"
    reps = 5 if quick else args.reps
    out = {}
    for name in args.models.split(","):
        model = get_model(name, quick=quick)
        try:
            out[name] = bench_model(model, reps=reps, max_seconds=5.0 if quick else 40.0,
                                    k_matvec=QUICK_K_MATVEC if quick else K_MATVEC, log=log,
                                    ops=QUICK_OPS if quick else None)
        except Exception as e:  # one failing model must not lose the other's results
            log(f"[curvature] {name} failed: {type(e).__name__}: {e}")
            out[name] = {"error": f"{type(e).__name__}: {e}"}
    write_json(args.json, {"environment": environment(), "curvature": out})
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
