"""One command: ``python -m benchmarks.run [--quick] [--out PATH] [--sections curvature,spectral,...]``.

Measures, in one process and one run, ratios that do not depend on the machine's speed:

1. curvature  each operator's time / one jitted gradient on the same batch (tanh MLP ~1M params, batch 512;
              a small Llama, models.llama), float32: time ratio, XLA's flop ratio, time/flop (bar ≤ 1.1),
              peak memory / the gradient's (third_order's bar ≤ 4×).
2. spectral   Lanczos top-20 of the MLP's Fisher: matvecs to convergence, step cost in matvecs,
              compile time vs step count (benchmarks/spectral.py), float64.
3. sweep      16×16 λ×γ grid of gradient flows: vmapped (one device, and sharded over one XLA host
              device per core) vs a Python loop over the configs, float32.
4. torch      the same problems in PyTorch (the MLP's hand-written mirror; transformers' LlamaForCausalLM on the
              Llama's weights): HVP and gradient time vs alignment_geom's (float32; the gradient in tokens/s,
              bar ≥ 1.0), agreement in float64, and alignment-risk's ε̂/γ̂ pipeline vs aic.measure; skipped
              without torch.
5. llm        (not in the default run) a ~28M-parameter Llama vs transformers/torch on the same weights,
              float32: forward+backward tokens/s and HVP time (benchmarks/llm.py).

Every section is a module (``SECTIONS``: section name → module name) with
``main(argv=None, quick=False, log=print) -> dict``; ``SECTION_ARGV`` holds the arguments run.py passes.
Prints one table (value, target, pass/fail) and writes ``benchmarks/results.json`` (with the environment:
versions, device kind, cores). Timings: compile first, then interleave the compared functions round-robin and
take medians of paired ratios (benchmarks/__init__.py).

On GPU/TPU: install the matching jax wheel (e.g. ``pip install -U "jax[cuda12]"``) and run the same
command; the device kind is recorded in results.json. The torch peer then still runs on CPU.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import sys
import time
import traceback

SECTIONS = {
    "curvature": "benchmarks.curvature",
    "spectral": "benchmarks.spectral",
    "sweep": "benchmarks.sweep",
    "torch": "benchmarks.torch_peer",
    "llm": "benchmarks.llm",
    "sketch": "benchmarks.sketch",
    "taylor": "benchmarks.taylor",
}
# the default run (about 6 minutes on 2 CPU cores); any section can be named with --sections
DEFAULT_SECTIONS = ("curvature", "spectral", "sweep", "torch")
SECTION_ARGV = {
    # LOBPCG / randomized comparisons are left to `python -m benchmarks.spectral` (runtime)
    "spectral": ["--json", os.devnull, "--no-compare"],
    # on CPU: in a child process with one XLA host device per core (sweep.run_subprocess)
    "sweep": ["--host-devices", "0"],
}
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.json")


def run_section(name: str, quick: bool = False, log=print) -> dict:
    """Import SECTIONS[name] and call its ``main(argv, quick=quick, log=log)`` (``--quick`` in argv for a
    ``main(argv)`` that takes no keywords)."""
    mod = importlib.import_module(SECTIONS[name])
    argv = list(SECTION_ARGV.get(name, []))
    params = inspect.signature(mod.main).parameters
    if "quick" in params:
        kw = {"quick": quick}
        if "log" in params:
            kw["log"] = log
        return mod.main(argv, **kw)
    return mod.main(argv + (["--quick"] if quick else []))


def _fmt(x, nd=2):
    if x is None:
        return "-"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, (int,)):
        return str(x)
    try:
        return f"{x:.{nd}f}" if abs(x) >= 10 ** -nd else f"{x:.1e}"
    except TypeError:
        return str(x)


def table_rows(results):
    """[(section, quantity, value, target, pass)] from the results dict."""
    rows = []
    cur = results.get("curvature") or {}
    for mname, r in cur.items():
        if not isinstance(r, dict) or "ratio_to_grad" not in r:
            continue
        rt, mem, fl = r["ratio_to_grad"], r["peak_memory_ratio_to_grad"], r.get("flops_ratio_to_grad", {})
        tpf = r.get("time_per_flop", {})
        for op in ("hvp", "linearized_hvp", "fisher_vp", "empirical_fisher_vp", "third_order", "third_order_mb4",
                   "flow_taylor4", "hvp_rev_rev"):
            if op not in rt:
                continue
            tf = tpf.get(op)
            rows.append((f"curvature/{mname}", f"{op}: time {_fmt(rt[op])}x, flops {_fmt(fl.get(op))}x grad; "
                         f"time/flop", tf, None if op == "hvp_rev_rev" else "<= 1.1",
                         None if (op == "hvp_rev_rev" or tf is None) else tf <= 1.1))
            mtgt = (r.get("targets") or {}).get("peak_memory_ratio", {}).get(op)
            rows.append((f"curvature/{mname}", f"{op}: peak memory / grad's", mem.get(op),
                         None if mtgt is None else f"<= {mtgt}",
                         None if (mtgt is None or mem.get(op) is None) else mem[op] <= mtgt))
    sp = results.get("spectral") or {}
    tg = sp.get("targets") or {}
    for key, label in (("lanczos", "Lanczos top-20 matvecs"),
                       ("lanczos_gapped", "Lanczos top-20 matvecs (planted gap)")):
        lz = sp.get(key)
        if isinstance(lz, dict) and "num_matvecs" in lz:
            tgt = tg.get("lanczos_matvecs_top20", 60)
            rows.append(("spectral/mlp", f"{label}, converged={lz.get('converged')}", lz["num_matvecs"], f"<= {tgt}",
                         bool(lz["num_matvecs"] <= tgt and lz.get("converged", False))))
    sbs = sp.get("arpack_side_by_side") or {}
    for key, r in sbs.items():
        if key == "arpack_eigsh" or not isinstance(r, dict):
            continue
        t_tgt, m_tgt = tg.get("lanczos_time_over_arpack", 0.7), tg.get("lanczos_matvecs_over_arpack", 1.0)
        rows.append(("spectral/mlp", f"{key}: time / ARPACK's ({r['num_matvecs']} vs "
                     f"{sbs['arpack_eigsh']['num_matvecs']} matvecs, max res {r['max_residual']:.1e})",
                     r["time_ratio_to_arpack"], f"<= {t_tgt}",
                     bool(r["time_ratio_to_arpack"] <= t_tgt and r["matvec_ratio_to_arpack"] <= m_tgt)))
    for sub, key, label in (("timing_seconds", "step_over_matvec", "Lanczos step / matvec"),
                            ("compile_seconds", "ratio_80_over_20", "compile(80 steps) / compile(20 steps)")):
        val = (sp.get(sub) or {}).get(key)
        if val is not None:
            tgt = tg.get(key if key == "step_over_matvec" else "compile_ratio_80_over_20")
            rows.append(("spectral/mlp", label, val, None if tgt is None else f"<= {tgt}",
                         None if tgt is None else bool(val <= tgt)))
    sw = results.get("sweep") or {}
    if "speedup" in sw:
        g = f"{sw['grid'][0]}x{sw['grid'][1]} flows"
        if "speedup_sharded" in sw:
            rows.append(("sweep", f"loop / vmapped, one device ({g})", sw["speedup_one_device"], None, None))
            rows.append(("sweep", f"loop / vmapped sharded over {sw['devices']} devices ({g})", sw["speedup_sharded"],
                         f">= {sw['target']}", sw["pass"]))
        else:
            rows.append(("sweep", f"loop / vmapped ({g})", sw["speedup"], f">= {sw['target']}", sw["pass"]))
    tp = results.get("torch") or {}
    for k, r in tp.items():
        if k.startswith("hvp_") and isinstance(r, dict) and "speedup_hvp" in r:
            rows.append((f"torch/{r['model']}", "torch HVP time / jax hvp time", r["speedup_hvp"], ">= 5.0",
                         r["speedup_hvp"] >= 5.0))
            if "tokens_per_s" in r:
                rows.append((f"torch/{r['model']}", "gradient tokens/s, jax / torch", r["speedup_grad"], ">= 1.0",
                             r["speedup_grad"] >= 1.0))
            else:
                rows.append((f"torch/{r['model']}", "gradient time, torch / jax", r["speedup_grad"], None, None))
            rows.append((f"torch/{r['model']}", "HVP rel. diff torch vs jax (float64)", r["hvp_rel_diff_float64"],
                         "<= 1e-5", r["agree"]))
            rf = r.get("roofline")
            if rf:
                rows.append((f"torch/{r['model']}", "jax hvp / torch hvp, fraction of GEMM peak",
                             f"{rf['jax_hvp_fraction_of_peak']:.2f} / {rf['torch_hvp_fraction_of_peak']:.2f}",
                             None, None))
                rows.append((f"torch/{r['model']}", "largest possible speedup over torch HVP (HVP at GEMM peak)",
                             rf["max_attainable_speedup_over_torch"], None, None))
    lm = results.get("llm") or {}
    if "hvp_speedup" in lm:
        sec = f"llm/llama-{lm['n_params'] / 1e6:.0f}M"
        rows.append((sec, "jax / torch forward+backward tokens/s (remat full)", lm["fwd_bwd_speedup_full"], None, None))
        rows.append((sec, "jax / torch forward+backward tokens/s (remat none)", lm["fwd_bwd_speedup_none"], None, None))
        rows.append((sec, "torch double-backward HVP time / jax hvp time", lm["hvp_speedup"], None, None))
        rows.append((sec, "HVP rel. diff jax vs torch (float32)", lm["hvp_rel_diff"], "<= 1e-4",
                     lm["hvp_rel_diff"] <= 1e-4))
    ar = tp.get("aic_vs_alignment_risk") or {}
    if "time_ratio_second" in ar:
        rows.append(("torch/aic", "alignment-risk time / aic.measure, Lanczos (2nd call)", ar["time_ratio_second"],
                     None, None))
        rows.append(("torch/aic", "alignment-risk time / aic.measure, Lanczos (1st, +compile)", ar["time_ratio_first"],
                     None, None))
        if "time_ratio_gram_second" in ar:
            rows.append(("torch/aic", "alignment-risk time / aic.measure, method=gram (2nd call)",
                         ar["time_ratio_gram_second"], None, None))
            rows.append(("torch/aic", "alignment-risk time / aic.measure, method=gram (1st, +compile)",
                         ar["time_ratio_gram_first"], None, None))
        rows.append(("torch/aic", "max rel. diff eigvals, eps, gamma (float64)", ar["max_rel_diff"], "<= 1e-5",
                     ar["agree"]))
    return rows


def format_table(rows):
    w0 = max([len(r[0]) for r in rows] + [7])
    w1 = max([len(r[1]) for r in rows] + [8])
    lines = [f"{'section':{w0}}  {'quantity':{w1}}  {'value':>9}  {'target':>8}  result",
             "-" * (w0 + w1 + 36)]
    for sec, q, v, t, ok in rows:
        res = "-" if ok is None else ("PASS" if ok else "MISS")
        lines.append(f"{sec:{w0}}  {q:{w1}}  {_fmt(v):>9}  {t or '-':>8}  {res}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description="alignment_geom benchmarks (one process, one run)")
    ap.add_argument("--quick", action="store_true", help="tiny models, few rounds (smoke test; not a measurement)")
    ap.add_argument("--out", default=DEFAULT_OUT, help="results JSON (default benchmarks/results.json)")
    ap.add_argument("--sections", default=",".join(DEFAULT_SECTIONS), help=f"a subset of {', '.join(SECTIONS)}")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    sections = [s for s in args.sections.split(",") if s]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        print(f"error: unknown sections {bad}; expected a subset of {list(SECTIONS)}", file=sys.stderr)
        raise SystemExit(2)

    import jax

    # float64 is needed by the agreement checks (spectral, torch); the timed curvature and sweep
    # sections build their arrays in float32 explicitly (recorded per section).
    jax.config.update("jax_enable_x64", True)
    from benchmarks import environment

    t_start = time.perf_counter()
    results = {"quick": bool(args.quick), "sections": sections, "environment": environment(), "seconds": {}}
    for sec in sections:
        t0 = time.perf_counter()
        print(f"=== {sec}", flush=True)
        try:
            results[sec] = run_section(sec, quick=args.quick)
        except Exception as e:  # one failing section must not lose the others' results
            traceback.print_exc()
            results[sec] = {"error": f"{type(e).__name__}: {e}"}
        results["seconds"][sec] = round(time.perf_counter() - t0, 1)
    results["seconds"]["total"] = round(time.perf_counter() - t_start, 1)
    rows = table_rows(results)
    results["table"] = [dict(section=s, quantity=q, value=v, target=t, passed=ok) for s, q, v, t, ok in rows]
    print()
    if args.quick:
        print("(--quick: tiny models and 2 rounds; a smoke test, not a measurement)")
    print(format_table(rows))
    print(f"\n(float32 timings for curvature/sweep/torch-HVP, float64 agreement checks; "
          f"{results['environment']['cpu_count']} cores, {results['environment']['devices'][0]}; "
          f"total {results['seconds']['total']} s)")
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=1, default=_json_default)
    print(f"wrote {args.out}")
    return results


def _json_default(o):
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    return str(o)


if __name__ == "__main__":
    main()
