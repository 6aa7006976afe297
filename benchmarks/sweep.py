"""Issue 7 §3: sweep throughput, a λ × γ grid of gradient flows vmapped vs the same configs in a Python loop.

The grid is ``alignment_geom.landscapes.landscape_grid(lam=[16 values], gamma=[16 values], ...)``
(256 synthetic landscapes with exact AIC parameters, n = 64 by default) and each flow is
``alignment_geom.flow.gradient_flow(loss, θ*, batch, ts, method="rk4", steps=S)`` (θ̇ = −∇L(θ),
fixed-step RK4 in lax.scan/fori_loop). Two ways to run the whole grid:

    vmapped  one jitted ``jax.vmap`` of the flow over the stacked landscapes (one dispatch);
    loop     a Python loop over the 256 configurations calling the (cached, jitted) flow once each.

Both produce the same paths (checked); the ratio t_loop / t_vmap is the speedup (target ≥ 10×).
Run alone: ``python -m benchmarks.sweep [--quick] [--json PATH]``.
"""
from __future__ import annotations

import sys

import numpy as np

from benchmarks import bench_args, environment, median, paired_ratio, time_interleaved, write_json

TARGET_SPEEDUP = 10.0


def make_grid(n_lam: int = 16, n_gamma: int = 16, n: int = 64, d: int = 4, dtype=None):
    import jax.numpy as jnp

    from alignment_geom.landscapes import landscape_grid

    dtype = jnp.float32 if dtype is None else dtype
    return landscape_grid(lam=np.geomspace(0.1, 10.0, n_lam), gamma=np.geomspace(0.1, 10.0, n_gamma),
                          n=n, d=d, eps=0.0, third_order=0.1, dtype=dtype)


def bench_sweep(quick: bool = False, reps: int = 5, n_times: int = 32, steps: int = 8, log=print, dtype=None):
    import jax
    import jax.numpy as jnp

    from alignment_geom.flow import gradient_flow

    g = 4 if quick else 16
    grid = make_grid(g, g, n=16 if quick else 64, d=2 if quick else 4, dtype=dtype)
    N = g * g
    dt = jax.tree_util.tree_leaves(grid.params)[0].dtype
    ts = jnp.linspace(0.0, 2.0, 8 if quick else n_times + 1)[1:].astype(dt)
    steps = 2 if quick else steps

    def flow(p, b):
        return gradient_flow(grid.loss_fn, p, b, ts, method="rk4", steps=steps)

    vflow = jax.jit(jax.vmap(flow))
    configs = [(jax.tree_util.tree_map(lambda x: x[i], grid.params), jax.tree_util.tree_map(lambda x: x[i], grid.batch))
               for i in range(N)]

    def run_vmapped():
        return vflow(grid.params, grid.batch)

    def run_loop():
        return [flow(p, b) for p, b in configs]

    # warm up both (compile), and check they agree
    pv = jax.block_until_ready(run_vmapped())
    pl = jax.block_until_ready(run_loop())
    diff = max(float(jnp.max(jnp.abs(pv["theta"][i] - pl[i]["theta"]))) for i in range(N))
    scale = float(jnp.max(jnp.abs(pv["theta"] - grid.params["theta"][:, None])))
    times = time_interleaved({"vmapped": (run_vmapped, ()), "loop": (run_loop, ())}, reps=2 if quick else reps,
                             warmup=0)
    speedup = paired_ratio(times, "loop", "vmapped")
    res = {
        "grid": [g, g], "n_configs": N, "n_params": int(grid.params["theta"].shape[-1]), "dtype": str(dt),
        "n_times": int(ts.shape[0]), "rk4_steps_per_interval": steps, "rk4_steps_total": int(ts.shape[0]) * steps,
        "vmapped_s": median(times["vmapped"]), "loop_s": median(times["loop"]),
        "flows_per_s_vmapped": N / median(times["vmapped"]), "flows_per_s_loop": N / median(times["loop"]),
        "speedup": speedup, "max_abs_diff_vmapped_vs_loop": diff, "displacement_scale": scale,
        "target": TARGET_SPEEDUP, "pass": bool(speedup >= TARGET_SPEEDUP),
    }
    log(f"[sweep] {g}x{g} lambda x gamma grid, n={res['n_params']}, {res['rk4_steps_total']} RK4 steps, {dt}: "
        f"vmapped {res['vmapped_s'] * 1e3:.1f} ms, loop {res['loop_s'] * 1e3:.1f} ms -> {speedup:.1f}x "
        f"(target >= {TARGET_SPEEDUP}); max |diff| {diff:.1e}")
    return res


def main(argv=None, quick: bool = False, log=print):
    args = bench_args(__doc__, argv, reps=5)
    res = bench_sweep(quick=quick or args.quick, reps=args.reps, log=log)
    write_json(args.json, {"environment": environment(), "sweep": res})
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
