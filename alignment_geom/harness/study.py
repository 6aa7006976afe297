"""Running one study into its workdir: validation before anything is written, config.json / env.json /
results.json / timing.json, resume or refusal of an existing workdir, partial results on NaN/Inf.

The contract a study module follows (the registry in :mod:`alignment_geom.studies` maps config.experiment
to it): ``run(config, workdir) -> dict`` computes, saves its figures and returns the JSON-able results (with a
``claim = {quantity, measured, expected, agree}`` for the summary table); optionally ``validate(config)``
raises ConfigError on bad input; ``THEORY = True`` marks a theory figure, whose small-t regime needs float64
(a float32/bfloat16 run warns); ``ARTIFACTS`` names the files the main job copies next to the summary
(default: ``<name>.png``).
"""
from __future__ import annotations

import os
import shutil
import time
import warnings

import jax
import ml_collections

from alignment_geom.harness.errors import ConfigError, NonFiniteError
from alignment_geom.harness.jsonio import config_to_dict, env_info, to_jsonable, write_json
from alignment_geom.harness.runtime import ensure_x64
from alignment_geom.harness.validation import validate_common
from alignment_geom.harness.workdir import clear_workdir, prepare_workdir

__all__ = ["FLOAT64_WARNING", "validate_study", "run_study", "format_summary"]

FLOAT64_WARNING = ("float64 is needed for the small-t regime of a theory figure (Δu ∝ t⁴ falls below "
                   "float32 resolution at small t); results in {dtype} are unreliable there")


def validate_study(module, config) -> None:
    """Generic + the study's own validation. Raises ConfigError."""
    if not hasattr(module, "run"):
        raise ConfigError("experiment", config.get("experiment"), "a study module defining run(config, workdir)")
    validate_common(config)
    if hasattr(module, "validate"):
        module.validate(config)


def run_study(module, config, workdir: str, overwrite: bool = False, keep_checkpoints: bool = True) -> dict:
    """Validate ``config``, prepare ``workdir``, run ``module.run``, write results.json; return the results.

    Raises ConfigError (nothing written) on bad input, NonFiniteError (after writing a partial
    results.json with ``status = "nonfinite"``) on NaN/Inf along a trajectory. ``keep_checkpoints=False``
    removes ``workdir/checkpoints`` after a successful run (the main job keeps figures/ small).
    """
    if not isinstance(config, ml_collections.ConfigDict):
        config = ml_collections.ConfigDict(config)
    validate_study(module, config)
    cfg = config_to_dict(config)
    resume = prepare_workdir(cfg, workdir, overwrite)
    dtype = config.get("dtype", "float64")
    ensure_x64(dtype)
    if getattr(module, "THEORY", False) and dtype != "float64":
        warnings.warn(FLOAT64_WARNING.format(dtype=dtype), RuntimeWarning, stacklevel=2)
    if overwrite and not resume:
        clear_workdir(workdir)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
    write_json(os.path.join(workdir, "config.json"), cfg)
    write_json(os.path.join(workdir, "env.json"), env_info())
    res_path = os.path.join(workdir, "results.json")
    t0 = time.time()
    try:
        results = module.run(config, workdir)
    except NonFiniteError as e:
        partial = dict(e.partial)
        partial.update(status="nonfinite", error=str(e), quantity=e.quantity, step=str(e.step))
        write_json(res_path, partial)
        raise
    results = dict(results)
    results.setdefault("status", "ok")
    write_json(res_path, results)
    write_json(os.path.join(workdir, "timing.json"), {"seconds": time.time() - t0, "resumed": resume})
    ck = os.path.join(workdir, "checkpoints")
    if not keep_checkpoints and jax.process_index() == 0 and os.path.isdir(ck):
        shutil.rmtree(ck)
    return to_jsonable(results)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def format_summary(rows: list) -> str:
    """A Markdown table: figure | quantity | measured | expected | agree? | seconds."""
    head = "| figure | quantity | measured | expected | agree? | s |\n|---|---|---|---|---|---|"
    lines = [head]
    for r in rows:
        agree = "yes" if r.get("agree") else ("ERROR: " + r["error"] if "error" in r else "no")
        lines.append(f"| {r['figure']} | {r.get('quantity', '')} | {_fmt(r.get('measured'))} | "
                     f"{_fmt(r.get('expected'))} | {agree} | {_fmt(r.get('seconds'))} |")
    return "\n".join(lines)
