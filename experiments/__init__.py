"""Command-line entry points: ``python -m experiments.run`` (one study) and ``python -m experiments.figures`` (the
main job). They only parse flags and call :mod:`alignment_geom.cli`."""
