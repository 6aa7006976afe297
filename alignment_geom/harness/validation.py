"""Config validation helpers: each raises ConfigError naming the field, the value and what is allowed."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from alignment_geom.harness.errors import ConfigError

__all__ = ["DTYPES", "require_positive", "require_nonempty", "require_increasing", "require_int", "require_choice",
           "require_d_le_n", "validate_common"]


DTYPES = ("float64", "float32", "bfloat16")


def require_positive(config, field: str, *, strict: bool = True):
    v = config[field]
    vals = list(v) if isinstance(v, (list, tuple)) else [v]
    for x in vals:
        bad_sign = x <= 0 if strict else x < 0
        if not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x) or bad_sign:
            raise ConfigError(field, v, "a finite number " + ("> 0" if strict else ">= 0") +
                              (" for every entry" if isinstance(v, (list, tuple)) else ""))


def require_nonempty(config, field: str):
    v = config[field]
    if not isinstance(v, (list, tuple)) or len(v) == 0:
        raise ConfigError(field, v, "a non-empty sweep (tuple of values)")


def require_increasing(config, field: str):
    v = config[field]
    arr = np.asarray(v, dtype=np.float64)
    if arr.ndim != 1 or arr.size < 2 or not np.all(np.isfinite(arr)) or not np.all(np.diff(arr) > 0):
        raise ConfigError(field, v, "a strictly increasing grid of at least 2 finite values")


def require_int(config, field: str, lo: Optional[int] = None, hi: Optional[int] = None):
    v = config[field]
    if not isinstance(v, int) or isinstance(v, bool) or (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = "an integer" + (f" >= {lo}" if lo is not None else "") + (f" and <= {hi}" if hi is not None else "")
        raise ConfigError(field, v, rng)


def require_choice(config, field: str, choices: Sequence[str]):
    v = config[field]
    if v not in choices:
        raise ConfigError(field, v, "one of " + ", ".join(repr(c) for c in choices))


def require_d_le_n(config, d_field: str = "d", n_field: str = "n"):
    require_int(config, n_field, lo=1)
    require_int(config, d_field, lo=1)
    if config[d_field] > config[n_field]:
        raise ConfigError(d_field, config[d_field], f"an integer between 1 and n={config[n_field]} (d <= n)")


def validate_common(config):
    """The fields every config may have: dtype, seed, checkpoint_every."""
    if "dtype" in config:
        require_choice(config, "dtype", DTYPES)
    if "seed" in config:
        require_int(config, "seed", lo=0)
    if "checkpoint_every" in config:
        require_int(config, "checkpoint_every", lo=1)
