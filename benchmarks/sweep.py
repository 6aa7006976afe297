"""Sweep throughput, a λ × γ grid of gradient flows vmapped vs the same configs in a Python loop.

The grid is ``alignment_geom.landscapes.landscape_grid(lam=[16 values], gamma=[16 values], ...)``
(256 synthetic landscapes with exact AIC parameters, n = 64 by default) and each flow is
``alignment_geom.dynamics.gradient_flow(loss, θ*, batch, ts, method="rk4", steps=S)`` (θ̇ = −∇L(θ),
fixed-step RK4 in lax.scan/fori_loop). Two ways to run the whole grid:

    vmapped  one jitted ``jax.vmap`` of the flow over the stacked landscapes (one dispatch);
    loop     a Python loop over the 256 configurations calling the (cached, jitted) flow once each.

    sharded  the same jitted vmap with the grid placed ``NamedSharding(Mesh(devices, ('grid',)),
             P('grid'))`` over every device (what ``harness.sharded_vmap`` does for the figure sweeps).

All produce the same paths (checked: relative difference ``max_rel_diff_vs_loop`` over the points of each
path with ‖θ(t) − θ*‖_∞ ≤ ``BOUNDED``, beyond which diverging flows amplify rounding); t_loop / t_vmap is
the speedup (target ≥ 10×). A CPU host
is one XLA device, and a loop of small flows can use only one core, so on CPU ``run_subprocess``
(what ``benchmarks.run`` calls) measures in a child process started with
``XLA_FLAGS=--xla_force_host_platform_device_count=<cores>``: one host device per core, the loop
and ``vmapped`` on device 0, ``sharded`` over all of them.
Run alone: ``python -m benchmarks.sweep [--quick] [--json PATH] [--host-devices N]`` (N > 1 re-runs
itself in such a child process; 0 = one per core).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import numpy as np

from benchmarks import bench_args, environment, median, paired_ratio, time_interleaved, write_json

TARGET_SPEEDUP = 10.0
BOUNDED = 10.0    # displacement ‖θ(t) − θ*‖_∞ up to which two programs' paths are compared (see bench_sweep)


def make_grid(n_lam: int = 16, n_gamma: int = 16, n: int = 64, d: int = 4, dtype=None):
    import jax.numpy as jnp

    from alignment_geom.landscapes import landscape_grid

    dtype = jnp.float32 if dtype is None else dtype
    return landscape_grid(lam=np.geomspace(0.1, 10.0, n_lam), gamma=np.geomspace(0.1, 10.0, n_gamma),
                          n=n, d=d, eps=0.0, third_order=0.1, dtype=dtype)


def bench_sweep(quick: bool = False, reps: int = 5, n_times: int = 32, steps: int = 8, log=print, dtype=None):
    import jax
    import jax.numpy as jnp

    from alignment_geom.dynamics import gradient_flow

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

    fns = {"vmapped": (run_vmapped, ()), "loop": (run_loop, ())}
    ndev = max(k for k in range(1, jax.device_count() + 1) if N % k == 0 and k <= jax.device_count())
    if ndev > 1:
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        sharding = NamedSharding(Mesh(np.array(jax.devices()[:ndev]), ("grid",)), PartitionSpec("grid"))
        placed = jax.device_put((grid.params, grid.batch), sharding)
        sflow = jax.jit(jax.vmap(flow), out_shardings=sharding)
        fns["sharded"] = (lambda: sflow(*placed), ())

    # warm up (compile), and check every way gives the same paths
    outs = {k: jax.block_until_ready(f()) for k, (f, _) in fns.items()}
    pv, pl = outs["vmapped"], outs["loop"]
    th_loop = np.stack([np.asarray(o["theta"], np.float64) for o in pl])            # (N, T, n)
    others = [np.asarray(pv["theta"], np.float64)]
    if "sharded" in outs:
        others.append(np.asarray(outs["sharded"]["theta"], np.float64))
    disp = np.max(np.abs(th_loop - np.asarray(grid.params["theta"], np.float64)[:, None]), axis=-1)  # (N, T)
    gap = np.max([np.max(np.abs(o - th_loop), axis=-1) for o in others], axis=0)    # (N, T)
    # Flows that blow up (λ = γ = 10 grows ~1e6-fold) amplify one-ulp rounding differences between programs
    # (1e-7 relative at the first point, 3e-5 by a displacement of 100), so the relative comparison is over the
    # well-conditioned part of each path (displacement ≤ BOUNDED); a mix-up of configurations shows there at O(1).
    bounded = disp <= BOUNDED
    diff = float(np.max(gap))
    rel = float(np.max(gap[bounded] / np.maximum(1.0, disp[bounded])))
    scale = float(np.max(disp))
    times = time_interleaved(fns, reps=2 if quick else reps, warmup=0)
    speedup = paired_ratio(times, "loop", "vmapped")
    res = {
        "grid": [g, g], "n_configs": N, "n_params": int(grid.params["theta"].shape[-1]), "dtype": str(dt),
        "n_times": int(ts.shape[0]), "rk4_steps_per_interval": steps, "rk4_steps_total": int(ts.shape[0]) * steps,
        "devices": ndev, "xla_flags": os.environ.get("XLA_FLAGS", ""), "rounds": len(times["loop"]),
        "vmapped_s": median(times["vmapped"]), "loop_s": median(times["loop"]),
        "flows_per_s_vmapped": N / median(times["vmapped"]), "flows_per_s_loop": N / median(times["loop"]),
        "speedup_one_device": speedup, "max_abs_diff_vs_loop": diff, "displacement_scale": scale,
        "max_rel_diff_vs_loop": rel, "bounded_fraction": float(np.mean(bounded)),
        "target": TARGET_SPEEDUP,
    }
    line = f"vmapped {res['vmapped_s'] * 1e3:.1f} ms ({speedup:.1f}x)"
    best = speedup
    if "sharded" in times:
        res["sharded_s"] = median(times["sharded"])
        res["speedup_sharded"] = best = paired_ratio(times, "loop", "sharded")
        line += f", vmapped+sharded over {ndev} devices {res['sharded_s'] * 1e3:.1f} ms ({best:.1f}x)"
    res.update(speedup=best, **{"pass": bool(best >= TARGET_SPEEDUP)})
    log(f"[sweep] {g}x{g} lambda x gamma grid, n={res['n_params']}, {res['rk4_steps_total']} RK4 steps, {dt}: "
        f"loop {res['loop_s'] * 1e3:.1f} ms, {line} (target >= {TARGET_SPEEDUP}); max |diff| {diff:.1e}")
    return res


def run_subprocess(host_devices: int = 0, quick: bool = False, reps: int = 5, log=print):
    """Run this benchmark in a child process with one XLA host device per core (CPU only; see the
    module docstring) and return its results. ``host_devices`` 0 = ``len(os.sched_getaffinity(0))``."""
    n = host_devices or len(os.sched_getaffinity(0))
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
    env["JAX_PLATFORMS"] = "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "sweep.json")
        cmd = [sys.executable, "-m", "benchmarks.sweep", "--json", path, "--reps", str(reps), "--host-devices", "1"]
        proc = subprocess.run(cmd + (["--quick"] if quick else []), env=env, capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        for ln in proc.stdout.splitlines():
            if ln.startswith("[sweep]"):
                log(ln)
        if proc.returncode != 0:
            raise RuntimeError(f"sweep child process failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        with open(path) as fh:
            out = json.load(fh)
    return out["sweep"]


def main(argv=None, quick: bool = False, log=print):
    args = bench_args(__doc__, argv, reps=5, extra=[("--host-devices", dict(
        type=int, default=1,
        help="CPU: measure in a child process with this many XLA host devices (0 = one per core)"))])
    import jax

    if args.host_devices != 1 and jax.default_backend() == "cpu" and jax.device_count() == 1:
        res = run_subprocess(args.host_devices, quick=quick or args.quick, reps=args.reps, log=log)
    else:
        res = bench_sweep(quick=quick or args.quick, reps=args.reps, log=log)
    write_json(args.json, {"environment": environment(), "sweep": res})
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
