"""Progress bars on stderr for every slow loop (process 0 only; ALIGNMENT_GEOM_NO_PROGRESS=1 turns them off)."""
from __future__ import annotations

import os

import jax
from tqdm.auto import tqdm

__all__ = ['progress']


def progress(iterable=None, *, total=None, desc=None, **kw):
    """A tqdm progress bar on stderr (off on non-zero processes or with ALIGNMENT_GEOM_NO_PROGRESS=1)."""
    disable = jax.process_index() != 0 or os.environ.get("ALIGNMENT_GEOM_NO_PROGRESS") == "1"
    return tqdm(iterable, total=total, desc=desc, disable=disable, leave=False, dynamic_ncols=True, **kw)
