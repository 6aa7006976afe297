"""Loading config modules by path: ``configs/NAME.py[:ARGS]`` -> ``get_config(ARGS)`` (as ml_collections'
config_flags does), with every bad argument turned into a one-line :class:`ConfigError`."""
from __future__ import annotations

import importlib.util
import os

from alignment_geom.harness.errors import ConfigError

__all__ = ["load_config", "configs_dir"]


def load_config(spec: str):
    """Load ``configs/NAME.py[:ARGS]`` by path and call ``get_config(ARGS)``. Raises ConfigError."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError("config", spec, "an existing config file configs/NAME.py[:ARGS]")
    name = "_ag_config_" + os.path.splitext(os.path.basename(path))[0]
    sp = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(sp)
    sp.loader.exec_module(mod)
    try:
        return mod.get_config(arg) if arg else mod.get_config()
    except ValueError as e:
        if hasattr(e, "allowed"):           # configs.common.ConfigArgError: already one line
            raise ConfigError(str(e)) from None
        raise


def configs_dir() -> str:
    """The directory of the project's config modules (the installed ``configs`` package)."""
    spec = importlib.util.find_spec("configs")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("configs", None, "the configs/ directory of an alignment_geom checkout (pip install -e .)")
    return list(spec.submodule_search_locations)[0]
