"""Command-line entry points: ``python -m experiments.run`` (one figure) and ``python -m experiments.figures``
(the main job, all nine figures). They only parse flags and call library code in alignment_geom."""
