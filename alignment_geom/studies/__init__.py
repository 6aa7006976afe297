"""The studies: the nine theory figures, the defences landscape study, the Section-7 study and the defences on its
model, one registry.

Each study is a module with ``run(config, workdir) -> dict`` and ``validate(config)`` (see
:mod:`alignment_geom.harness.study` for the contract); ``configs/<name>.py`` holds its config. The registry
:data:`STUDIES` maps a config's ``experiment`` field to the module; :data:`MAIN_JOB` is the order in which the
main job (``make figures``) runs them.

    validate(config)                the config's checks (returns the study module)
    run(config, workdir)            one study into its workdir (validation first; resumable)
    main_job(outdir, preset=...)    every study of MAIN_JOB, then the summary table
"""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import Optional, Sequence

import jax

from alignment_geom import harness
from alignment_geom.harness import ConfigError
from alignment_geom.studies import (
    collapse_time,
    coupling_sweep,
    defenses_landscape,
    defenses_lm,
    drift,
    gd_vs_flow,
    llm_table1,
    lm_table1,
    orthogonality_illusion,
    projection_defense,
    quartic_onset,
    sharpness_sweep,
    subspace_rotation,
)
from alignment_geom.studies._theory import THEORY_FIGURES

__all__ = ["STUDIES", "MAIN_JOB", "PRESETS", "get_study", "validate", "run", "main_job"]

STUDIES = {m.__name__.rsplit(".", 1)[1]: m for m in (
    quartic_onset, sharpness_sweep, coupling_sweep, collapse_time, drift, orthogonality_illusion,
    projection_defense, gd_vs_flow, subspace_rotation, defenses_landscape, lm_table1, defenses_lm, llm_table1)}
MAIN_JOB = THEORY_FIGURES + ("defenses_landscape", "lm_table1", "defenses_lm")
PRESETS = ("smoke", "default", "large")


def get_study(name):
    """The study module registered as ``name``. Raises ConfigError naming the allowed ones."""
    if not isinstance(name, str) or name not in STUDIES:
        raise ConfigError("experiment", name, "one of " + ", ".join(STUDIES))
    return STUDIES[name]


def validate(config):
    """Validate ``config`` (generic fields, then the study's own); returns the study module. Raises ConfigError."""
    module = get_study(config.get("experiment"))
    harness.validate_study(module, config)
    return module


def run(config, workdir: str, overwrite: bool = False, keep_checkpoints: bool = True) -> dict:
    """Run the study named by ``config.experiment`` into ``workdir`` (``harness.run_study``)."""
    return harness.run_study(get_study(config.get("experiment")), config, workdir, overwrite=overwrite,
                             keep_checkpoints=keep_checkpoints)


def main_job(outdir: str, *, preset: str = "default", only: Sequence[str] = (), overwrite: bool = False,
             configs_dir: Optional[str] = None) -> int:
    """Run every study of :data:`MAIN_JOB` (or ``only``) at ``preset`` into ``outdir/<name>/``; copy each study's
    ARTIFACTS (default ``<name>.png``) to ``outdir``; print and save the summary table.

    Each study's results carry ``claim = {quantity, measured, expected, agree}``. With ``only``, the rows of an
    existing summary (same preset) are updated rather than replaced. Returns 0 when every study ran and agrees,
    1 otherwise. Raises ConfigError on an unknown study or preset (before anything runs).
    """
    configs_dir = configs_dir or harness.configs_dir()
    names = list(only) if only else list(MAIN_JOB)
    for n in names:
        if n not in STUDIES:
            raise ConfigError("only", n, "studies among " + ", ".join(MAIN_JOB))
    if preset not in PRESETS:
        raise ConfigError("preset", preset, "one of " + ", ".join(PRESETS))
    if jax.process_index() == 0:
        os.makedirs(outdir, exist_ok=True)
    rows, t_all = [], time.time()
    bar = harness.progress(names, desc="figures", total=len(names))
    for name in bar:
        bar.set_postfix_str(name)
        t0 = time.time()
        row = {"figure": name, "quantity": "", "measured": None, "expected": "", "agree": False}
        try:
            config = harness.load_config(os.path.join(configs_dir, f"{name}.py") + f":{preset}")
            res = run(config, os.path.join(outdir, name), overwrite=overwrite, keep_checkpoints=False)
            claim = res.get("claim", {})
            row.update(quantity=claim.get("quantity", ""), measured=claim.get("measured"),
                       expected=claim.get("expected", ""), agree=bool(claim.get("agree", False)))
            for art in getattr(STUDIES[name], "ARTIFACTS", (f"{name}.png",)):
                src = os.path.join(outdir, name, art)
                if os.path.exists(src) and jax.process_index() == 0:
                    shutil.copyfile(src, os.path.join(outdir, art))
        except ConfigError as e:
            row["error"] = str(e)
        except Exception as e:  # noqa: BLE001 - one failing study must not hide the others
            harness.log.exception("study %s failed", name)
            row["error"] = f"{type(e).__name__}: {e}"
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
    total = time.time() - t_all
    summary_path = os.path.join(outdir, "summary.json")
    if only and os.path.exists(summary_path):      # --only updates its rows of an existing summary
        try:
            with open(summary_path) as f:
                old = json.load(f)
            if old.get("preset") == preset:
                ran = {r["figure"] for r in rows}
                merged = {r["figure"]: r for r in old.get("rows", []) if r.get("figure") not in ran}
                merged.update({r["figure"]: r for r in rows})
                rows = [merged[n] for n in STUDIES if n in merged]
        except (OSError, ValueError, KeyError):
            pass
    table = harness.format_summary(rows)
    print(table)
    print(f"total: {total:.0f} s on {jax.device_count()} {jax.default_backend()} device(s), preset={preset}")
    harness.write_json(summary_path, {"preset": preset, "seconds": total, "rows": rows})
    if jax.process_index() == 0:
        with open(os.path.join(outdir, "summary.md"), "w") as f:
            f.write(table + f"\n\nTotal {total:.0f} s on {jax.device_count()} {jax.default_backend()} device(s), "
                    f"preset `{preset}`.\n")
    return 0 if all(r["agree"] and "error" not in r for r in rows) else 1
