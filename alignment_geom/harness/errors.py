"""Errors of the harness: bad input (exit 2) and NaN/Inf along a trajectory (exit 3, partial results kept)."""
from __future__ import annotations

from typing import Any, Optional

import jax
import numpy as np

__all__ = ['ConfigError', 'NonFiniteError', 'check_finite']


class ConfigError(ValueError):
    """Bad input: one line naming the field, the value and what is allowed (exit status 2)."""

    _NO_VALUE = object()

    def __init__(self, field: str, value: Any = _NO_VALUE, allowed: Optional[str] = None):
        if value is ConfigError._NO_VALUE and allowed is None:   # re-raised from a bare message (config_flags)
            self.field, self.value, self.allowed = None, None, None
            super().__init__(str(field))
            return
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"config.{field}={value!r} is not allowed: {allowed}")


class NonFiniteError(FloatingPointError):
    """NaN/Inf along a trajectory: names the quantity and the step; ``partial`` keeps what was computed."""

    def __init__(self, quantity: str, step: Any, partial: Optional[dict] = None, detail: str = ""):
        self.quantity, self.step, self.partial = quantity, step, dict(partial or {})
        msg = f"non-finite {quantity} at step {step}"
        super().__init__(msg + (f" ({detail})" if detail else ""))


def check_finite(quantity: str, values, *, steps=None, partial: Optional[dict] = None, axis: int = 0):
    """Raise :class:`NonFiniteError` at the first step (index along ``axis``) where ``values`` is NaN/Inf.

    ``values``: array (or pytree) whose axis ``axis`` is the step / time index; ``steps`` (optional)
    maps indices to the reported step label (e.g. the t-grid). Host-side; returns ``values``.
    """
    for leaf in jax.tree_util.tree_leaves(values):
        a = np.asarray(leaf)
        if a.size == 0 or np.all(np.isfinite(a)):
            continue
        if a.ndim:
            bad = ~np.isfinite(np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)).all(axis=1)
        else:
            bad = np.array([True])
        i = int(np.argmax(bad))
        label = i if steps is None else f"{i} (t={np.asarray(steps)[i]:.6g})"
        raise NonFiniteError(quantity, label, partial)
    return values
