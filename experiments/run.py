"""Run one experiment: writes DIR/config.json, DIR/env.json, DIR/results.json and the figure (PNG + PDF).

    python -m experiments.run --config=configs/NAME.py[:ARGS] [--config.FIELD=VALUE ...] --workdir=DIR [--overwrite]

ARGS is a comma-separated list of presets (``smoke``, ``default``, ``large``) and ``field=value`` pairs, e.g.
``configs/quartic_onset.py:lam=10,gamma=0.3``; sweep values inside ARGS are separated by ``/``
(``lams=1/2/4``). Bad input prints one line naming the field, the value and what is allowed, writes nothing and
exits with status 2; NaN/Inf along a trajectory writes a partial results.json and exits with status 3.
A run killed mid-way resumes from its orbax checkpoints when the same command is run again.

Multi-host (TPU pod slice): run the same command on every worker, e.g.
    gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all \\
      --command="cd alignment_geom && python -m experiments.run --config=configs/sharpness_sweep.py:large --workdir=/shared/run"
jax.distributed.initialize() is called automatically when the environment describes a cluster (TPU pod,
JAX_COORDINATOR_ADDRESS, SLURM/Open MPI with several tasks); sweeps then span all chips, process 0 writes files
(use a workdir on storage all workers see, for checkpoints).
"""
from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from alignment_geom import runner as cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/NAME.py[:ARGS]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory (created; resumed when it holds the same config)")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace a workdir that holds a different config")


def main(argv):
    if len(argv) > 1:
        cli.die(f"unexpected positional arguments {argv[1:]!r}: allowed are only --config, --config.FIELD, --workdir, --overwrite")
    config = cli.resolved_config(_CONFIG, sys.argv)
    if not _WORKDIR.value:
        cli.die("--workdir is required: allowed is a directory path (created if missing)")
    cli.run_one(config, _WORKDIR.value, _OVERWRITE.value)


if __name__ == "__main__":
    cli.setup()
    app.run(main, flags_parser=cli.flags_parser)
