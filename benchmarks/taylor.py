"""Taylor coefficients along gradient flow: the cost of ``curvature.flow_taylor`` divided by one jitted gradient.

Models: the benchmark MLP (benchmarks/models.py) and a small Llama-style decoder
(alignment_geom.models.llama: ``lax.scan`` over layers, each block under ``jax.checkpoint``, RoPE, grouped-query
attention, SwiGLU, tied embeddings). For each, compiled once, timed round-robin in one run:

    grad                 ∇L(θ)  (the unit)
    taylor{K}            flow_taylor(order=K), method="jet": this library's Taylor mode (K = 4, 6)
    experimental_jet{K}  the same through jax.experimental.jet (only where it runs: not through scan/remat)
    jvp{K}               method="jvp" (2^k nested jvps for order k), at low order only

Reports median paired ratios t(op)/t(grad) and compile seconds, side by side.
Run alone: ``python -m benchmarks.taylor [--quick] [--json PATH]`` (default JSON: benchmarks/taylor.json).
"""
from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp

from alignment_geom import curvature as C
from alignment_geom.models import llama
from benchmarks import bench_args, compile_fn, environment, paired_ratio, time_interleaved, write_json
from benchmarks.models import get_model, n_params

DEFAULT_JSON = os.path.join(os.path.dirname(__file__), "taylor.json")


def _llama_model(quick):
    cfg = llama.LlamaConfig(vocab_size=256 if quick else 1024, hidden_size=32 if quick else 128,
                            intermediate_size=64 if quick else 352, num_layers=2 if quick else 4,
                            num_heads=4, num_kv_heads=2, head_dim=8 if quick else 32,
                            tie_word_embeddings=True, remat="full")
    params = llama.init_params(cfg, jax.random.PRNGKey(0), dtype="float32")
    B, T = (2, 16) if quick else (8, 64)
    toks = jax.random.randint(jax.random.PRNGKey(1), (B, T), 0, cfg.vocab_size)

    def loss(p, t):
        z = llama.forward(cfg, p, t)[:, :-1]
        lp = jax.nn.log_softmax(z, -1)
        return -jnp.mean(jnp.take_along_axis(lp, t[:, 1:, None], -1))

    return "llama", params, loss, toks


def _ops(loss, orders, exp_jet, jvp_orders):
    ops = {"grad": lambda p, b: jax.grad(loss)(p, b)}
    for K in orders:
        ops[f"taylor{K}"] = lambda p, b, K=K: C.flow_taylor(loss, p, b, K)
        if exp_jet:
            ops[f"experimental_jet{K}"] = lambda p, b, K=K: C.flow_taylor(loss, p, b, K, method="experimental_jet")
    for K in jvp_orders:
        ops[f"jvp{K}"] = lambda p, b, K=K: C.flow_taylor(loss, p, b, K, method="jvp")
    return ops


def bench(name, params, loss, batch, *, orders, exp_jet, jvp_orders, reps, max_seconds, log):
    ops = _ops(loss, orders, exp_jet, jvp_orders)
    compiled, compile_s = {}, {}
    for op, fn in ops.items():
        try:
            compiled[op], compile_s[op] = compile_fn(fn, params, batch)
        except Exception as e:  # noqa: BLE001  (experimental_jet lacks rules for scan / remat)
            compile_s[op] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
    times = time_interleaved({k: (f, (params, batch)) for k, f in compiled.items()}, reps=reps,
                             max_seconds=max_seconds)
    ratios = {op: paired_ratio(times, op, "grad") for op in compiled if op != "grad"}
    res = {"n_params": n_params(params), "grad_s": float(sorted(times["grad"])[len(times["grad"]) // 2]),
           "ratio_to_grad": ratios, "compile_s": compile_s}
    log(f"\n{name}: n = {res['n_params']:,}, grad {res['grad_s'] * 1e3:.2f} ms")
    log(f"  {'op':<22}{'t/grad':>10}{'compile s':>12}")
    for op in ops:
        if op == "grad":
            continue
        r = f"{ratios[op]:.2f}" if op in ratios else "fails"
        cs = compile_s[op]
        log(f"  {op:<22}{r:>10}{cs if isinstance(cs, str) else f'{cs:.1f}':>12}")
    return res


def main(argv=None, quick: bool = False, log=print):
    """Time flow_taylor against one gradient on the MLP and on a scanned, rematerialised Llama; returns the
    results dict and writes benchmarks/taylor.json (or --json PATH)."""
    args = bench_args(__doc__, argv, reps=10)
    quick = quick or args.quick
    reps = 2 if quick else args.reps
    out = {}
    m = get_model("mlp", quick=quick)
    out["mlp"] = bench("mlp", m.params, m.loss_fn, m.batch, orders=(4, 6), exp_jet=True, jvp_orders=(3, 4),
                       reps=reps, max_seconds=5.0 if quick else 60.0, log=log)
    name, p, loss, toks = _llama_model(quick)
    out[name] = bench(name, p, loss, toks, orders=(4, 6), exp_jet=True, jvp_orders=(3,) if quick else (3, 4),
                      reps=reps, max_seconds=5.0 if quick else 90.0, log=log)
    write_json(args.json or (None if quick else DEFAULT_JSON), {"environment": environment(), "taylor": out})
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
