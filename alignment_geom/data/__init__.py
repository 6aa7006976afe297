"""Data for the Section-7 studies: the synthetic instruction language (with its programmatic judge).

    synthetic   a closed-vocabulary instruction language with harmful and benign tasks, generated from a seed
"""
from alignment_geom.data import synthetic

__all__ = ["synthetic"]
