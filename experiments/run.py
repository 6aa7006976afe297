"""Run one study: writes DIR/config.json, DIR/env.json, DIR/results.json and its figures (PNG + PDF).

    python -m experiments.run --config=configs/NAME.py[:ARGS] [--config.FIELD=VALUE ...] --workdir=DIR [--overwrite]

(the console script ``alignment-geom-run`` is the same command). ARGS is a comma-separated list of presets
(``smoke``, ``default``, ``large``) and ``field=value`` pairs, e.g. ``configs/quartic_onset.py:lam=10,gamma=0.3``;
sweep values inside ARGS are separated by ``/`` (``lams=1/2/4``). Bad input prints one line naming the field,
the value and what is allowed, writes nothing and exits with status 2; NaN/Inf along a trajectory writes a
partial results.json and exits with status 3. A run killed mid-way resumes from its orbax checkpoints when the
same command is run again.

Multi-host (TPU pod slice): run the same command on every worker, e.g.
    gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command="cd alignment_geom && \\
      python -m experiments.run --config=configs/sharpness_sweep.py:large --workdir=/shared/run"
"""
from alignment_geom.cli import run_main

if __name__ == "__main__":
    run_main()
