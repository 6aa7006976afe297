"""The main job: regenerate all nine figures, then print a summary table.

    python -m experiments.figures --outdir=figures [--preset=default|smoke|large] [--only=a,b] [--overwrite]

Each figure runs its config (configs/<name>.py:<preset>) into <outdir>/<name>/ (config.json, env.json,
results.json, <name>.png, <name>.pdf; resumable) and its PNG is copied to <outdir>/<name>.png. At the end it
prints the table (figure, measured number, expected number, agree?) and writes <outdir>/summary.json and
<outdir>/summary.md. Default preset: ~5 minutes on 2 CPU cores, float64. ``--preset=large`` (or
``--config.scale`` in experiments.run) scales every run up for a GPU/TPU. Exit status 1 if a figure disagrees
with its expected number or fails, 2 on bad input.
"""
from __future__ import annotations

import sys

from absl import app, flags

from alignment_geom import runner

_OUTDIR = flags.DEFINE_string("outdir", "figures", "output directory for all figures")
_PRESET = flags.DEFINE_string("preset", "default", "config preset for every figure: smoke, default or large")
_ONLY = flags.DEFINE_list("only", [], "comma-separated subset of figures (default: all nine)")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace workdirs that hold a different config")


def main(argv):
    if len(argv) > 1:
        runner.die(f"unexpected positional arguments {argv[1:]!r}")
    status = runner.main_job(_OUTDIR.value, preset=_PRESET.value, only=_ONLY.value, overwrite=_OVERWRITE.value)
    sys.exit(status)


if __name__ == "__main__":
    runner.setup()
    app.run(main, flags_parser=runner.flags_parser)
