"""What every config shares: presets, the ``:ARGS`` string, and the landscape defaults of the theory figures.

A config module ``configs/NAME.py`` defines ``get_config(arg=None) -> ml_collections.ConfigDict`` and imports
only ``ml_collections`` and this module, so parsing a config never imports JAX. Its docstring states the run
command and the measured runtime.

``ARGS`` (``--config=configs/NAME.py:ARGS``) is a comma-separated list of presets and ``field=value`` pairs;
sweep values are separated by ``/`` (``lams=1/2/4``). A bad one raises :class:`ConfigArgError`, a one-line
message naming the field, the value and what is allowed.
"""
from __future__ import annotations

from typing import Any, Optional

import ml_collections

__all__ = ["PRESET_NAMES", "ConfigArgError", "coerce", "apply_config_arg", "LANDSCAPE_DEFAULTS", "landscape_config"]


class ConfigArgError(ValueError):
    """A bad config argument: ``config.FIELD=VALUE is not allowed: ALLOWED`` (the command line exits with 2)."""

    def __init__(self, field: str, value: Any, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"config.{field}={value!r} is not allowed: {allowed}")


PRESET_NAMES = ("smoke", "default", "large")


def coerce(field: str, current, text: str):
    """Parse ``text`` into the type of ``current`` (sweeps: values separated by '/')."""
    def one(kind, s):
        s = s.strip()
        if kind is bool:
            if s.lower() in ("true", "1", "yes"):
                return True
            if s.lower() in ("false", "0", "no"):
                return False
            raise ConfigArgError(field, text, "true or false")
        if kind is int:
            try:
                return int(s)
            except ValueError:
                raise ConfigArgError(field, text, "an integer") from None
        if kind is float:
            try:
                return float(s)
            except ValueError:
                raise ConfigArgError(field, text, "a number") from None
        return s

    if isinstance(current, (tuple, list)):
        kind = type(current[0]) if len(current) else float
        parts = [p for p in text.split("/") if p.strip()]
        return tuple(one(kind, p) for p in parts)
    return one(type(current) if current is not None else str, text)


# Shared defaults of the theory figures' landscape configs (one place; each config overrides what differs).
LANDSCAPE_DEFAULTS = dict(seed=0, dtype="float64", scale=1.0, n=32, d=4, n_tail=4, lam=10.0, lam_spread=2.0,
                          gamma=0.3, eps=1e-3, tail=1e-3, t_min=1e-3, t_max=10.0, num_t=96, ts=(), substeps=4)


def landscape_config(experiment: str, *, drop=(), **fields):
    """A ConfigDict for a landscape figure: ``experiment``, ``preset="default"``, the shared
    :data:`LANDSCAPE_DEFAULTS` (minus ``drop``, e.g. ``lam`` for a λ sweep) and then ``fields``
    (overrides and experiment-specific fields, in order)."""
    c = ml_collections.ConfigDict()
    c.experiment = experiment
    c.preset = "default"
    for k, v in LANDSCAPE_DEFAULTS.items():
        if k not in drop:
            setattr(c, k, fields.pop(k, v))
    for k, v in fields.items():
        setattr(c, k, v)
    return c


def apply_config_arg(config, arg: Optional[str], presets: dict):
    """Apply a config-file argument string (``smoke``, ``lam=10,gamma=0.3``, ``lams=1/2/4``) to ``config``.

    ``presets``: name -> dict of field overrides (``smoke``/``default``/``large``). Raises ConfigArgError on an
    unknown preset or field, or a value of the wrong type. Returns ``config`` (modified in place).
    """
    if not arg:
        return config
    for tok in [t.strip() for t in arg.split(",") if t.strip()]:
        if "=" not in tok:
            if tok not in presets:
                raise ConfigArgError("preset", tok, "a preset (" + ", ".join(presets) + ") or FIELD=VALUE")
            for k, v in presets[tok].items():
                setattr(config, k, v)
            if "preset" in config:
                config.preset = tok
            continue
        k, v = (s.strip() for s in tok.split("=", 1))
        if k not in config:
            raise ConfigArgError(k, v, "a known field (" + ", ".join(sorted(config.keys())) + ")")
        setattr(config, k, coerce(k, config[k], v))
    return config
