"""The main job: every study (the nine theory figures, the defences landscape study, then the Section-7 study), then
the summary table.

    python -m experiments.figures --outdir=figures [--preset=default|smoke|large] [--only=a,b] [--overwrite]

(the console script ``alignment-geom-figures`` is the same command). Each study runs its config
(configs/<name>.py:<preset>) into <outdir>/<name>/ (config.json, env.json, results.json, figures as PNG + PDF;
resumable) and its artifacts (the PNGs, the Table-1 files) are copied to <outdir>/. At the end it prints the
table (study, measured number, expected number, agree?) and writes <outdir>/summary.json and summary.md.
Default preset: about 5 minutes on 2 CPU cores. Exit status 1 if a study disagrees with its expected number or
fails, 2 on bad input.
"""
from alignment_geom.cli import figures_main

if __name__ == "__main__":
    figures_main()
