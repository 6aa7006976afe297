"""JSON output of runs: numpy/jax values to JSON (non-finite floats to null), atomic writes, the environment record."""
from __future__ import annotations

import importlib.metadata as md
import json
import math
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ['to_jsonable', 'config_to_dict', 'write_json', 'env_info']


def to_jsonable(x):
    """numpy/jax scalars and arrays -> lists/floats; non-finite floats -> None; tuples -> lists."""
    if isinstance(x, dict) or hasattr(x, "items"):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, (jax.Array, np.ndarray, np.generic)):
        a = np.asarray(x)
        if a.dtype.kind in "fc" or a.dtype == jnp.bfloat16:
            a = a.astype(np.float64)
        return to_jsonable(a.tolist()) if a.ndim else to_jsonable(a.item())
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, (bool, int, str)) or x is None:
        return x
    return str(x)


def config_to_dict(config) -> dict:
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return to_jsonable(d)


def write_json(path: str, obj) -> None:
    if jax.process_index() != 0:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(to_jsonable(obj), f, indent=2, sort_keys=True, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)


def env_info() -> dict:
    """Versions, devices and flags of this process (written to env.json)."""
    versions = {}
    for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "ml_collections", "numpy", "scipy",
                "matplotlib", "absl-py", "tqdm"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    devs = jax.devices()
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": versions,
        "backend": jax.default_backend(),
        "device_count": len(devs),
        "local_device_count": jax.local_device_count(),
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "devices": [f"{d.platform}:{d.id}:{getattr(d, 'device_kind', '')}" for d in devs],
        "jax_enable_x64": bool(jax.config.jax_enable_x64),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "argv": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
