"""Mutation check: break one line of the core mathematics and show that the tests fail.

Not collected by pytest (the name does not match test_*.py). Run from the repository root:

    python tests/mutation_check.py            # every mutation, only its relevant tests (-x: stop at the first failure)
    python tests/mutation_check.py --baseline # also run each selection unmutated (it must pass)
    python tests/mutation_check.py --only aic

Each mutation is applied to a temporary copy of the repository (the working tree is never modified): the copy's
``alignment_geom`` is what the tests import (the copy is the working directory). A mutation is "killed" when
pytest exits with failures (status 1); "survived" when the selection passes. Prints a markdown table and writes
it as JSON with ``--json PATH``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (name, file, original line fragment, mutated fragment, test files, -k expression or None)
MUTATIONS = [
    ("curvature", "alignment_geom/curvature/fisher.py", "return pw - p * s", "return pw - 2 * p * s",
     ["tests/test_curvature.py"], "fisher_vp_matches or enumerated"),
    ("linalg", "alignment_geom/linalg/trace.py", "return t_low + jnp.mean(vals)", "return t_low - jnp.mean(vals)",
     ["tests/test_spectral.py"], "traces"),
    ("linalg-angles", "alignment_geom/linalg/subspace.py",
     "jnp.where(cos ** 2 < 0.5, jnp.arccos(cos), jnp.arcsin(sin))",
     "jnp.where(cos ** 2 > 0.5, jnp.arccos(cos), jnp.arcsin(sin))", ["tests/test_integration.py",
                                                                      "tests/test_spectral.py"], "principal"),
    ("aic", "alignment_geom/aic/measure.py", "hg = tree_map(lambda x: 2 * x, c2)", "hg = tree_map(lambda x: x, c2)",
     ["tests/test_aic.py"], "eps_zero or operator_fisher"),
    ("dynamics", "alignment_geom/dynamics/flow.py", "(h / 6) * (b1 + 2 * b2 + 2 * b3 + b4)",
     "(h / 6) * (b1 + b2 + 3 * b3 + b4)", ["tests/test_flow.py"], "rk4"),
    ("scaling", "alignment_geom/scaling.py", "out[idx] = np.gradient(ly[idx], lt[idx])",
     "out[idx] = np.gradient(ly[idx], 2 * lt[idx])", ["tests/test_scaling.py"], None),
    ("scaling-fit", "alignment_geom/scaling.py", "return float(np.exp(coef[0]))",
     "return float(np.exp(coef[0] + coef[1] * ts[sel][0]))", ["tests/test_scaling.py"], None),
]

IGNORE = shutil.ignore_patterns(".git", ".venv", "venv", "__pycache__", ".pytest_cache", "runs", "figures",
                                "*.egg-info", ".ruff_cache")


def _copy_tree(dst: str) -> None:
    for entry in os.listdir(ROOT):
        if entry in (".git", ".venv", "venv", "runs", "figures", ".pytest_cache", ".ruff_cache"):
            continue
        src = os.path.join(ROOT, entry)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(dst, entry), ignore=IGNORE)
        else:
            shutil.copy2(src, os.path.join(dst, entry))


def _mutate(path: str, old: str, new: str) -> None:
    text = open(path).read()
    n = text.count(old)
    if n != 1:
        raise SystemExit(f"mutation target {old!r} occurs {n} times in {path}; update MUTATIONS")
    with open(path, "w") as f:
        f.write(text.replace(old, new))


def _pytest(cwd: str, files, kexpr, timeout: int):
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", f"--timeout={timeout}", *files]
    if kexpr:
        cmd += ["-k", kexpr]
    env = {**os.environ, "ALIGNMENT_GEOM_JAX_CACHE": "off"}
    t0 = time.time()
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    tail = [ln for ln in p.stdout.splitlines() if ln.strip()][-1:] or [""]
    return p.returncode, time.time() - t0, tail[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", default=None, help="mutation names to run")
    ap.add_argument("--baseline", action="store_true", help="also run each selection without the mutation")
    ap.add_argument("--timeout", type=int, default=600)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = []
    for name, rel, old, new, files, kexpr in MUTATIONS:
        if args.only and name not in args.only:
            continue
        with tempfile.TemporaryDirectory(prefix="mutation_") as tmp:
            _copy_tree(tmp)
            check = subprocess.run([sys.executable, "-c", "import alignment_geom; print(alignment_geom.__file__)"],
                                   cwd=tmp, capture_output=True, text=True).stdout.strip()
            if not check.startswith(os.path.realpath(tmp)) and not check.startswith(tmp):
                raise SystemExit(f"the copy does not import its own package ({check}); aborting")
            base = None
            if args.baseline:
                base = _pytest(tmp, files, kexpr, args.timeout)
            _mutate(os.path.join(tmp, rel), old, new)
            rc, sec, tail = _pytest(tmp, files, kexpr, args.timeout)
        verdict = "killed" if rc == 1 else ("survived" if rc == 0 else f"error (rc {rc})")
        row = {"mutation": name, "file": rel, "change": f"`{old}` → `{new}`", "tests": " ".join(files) +
               (f" -k '{kexpr}'" if kexpr else ""), "verdict": verdict, "seconds": round(sec, 1), "pytest": tail}
        if base is not None:
            row["baseline"] = "pass" if base[0] == 0 else f"FAIL (rc {base[0]})"
        rows.append(row)
        print(f"{name}: {verdict} ({sec:.0f} s) {tail}", flush=True)
    cols = ["mutation", "file", "change", "tests", "verdict", "seconds"] + (["baseline"] if args.baseline else [])
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all(r["verdict"] == "killed" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
