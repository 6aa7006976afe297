"""Process start-up: float64, the persistent XLA compilation cache, cluster initialisation, quiet logs, dtypes."""
from __future__ import annotations

import logging
import os
from typing import Optional

import jax
import jax.numpy as jnp
from absl import logging as absl_logging

from alignment_geom.harness.distributed import maybe_initialize_distributed

log = logging.getLogger("alignment_geom")

__all__ = ["log", "ensure_x64", "dtype_of", "enable_compilation_cache", "setup", "quiet_logs"]


def ensure_x64(dtype: str) -> None:
    """Turn on jax_enable_x64 when float64 is requested (entry points set it at start-up)."""
    if dtype == "float64" and not jax.config.jax_enable_x64:
        jax.config.update("jax_enable_x64", True)


def dtype_of(config):
    """The jnp dtype named by ``config.dtype`` (default float64)."""
    return {"float64": jnp.float64, "float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.get("dtype", "float64")]


def enable_compilation_cache(path: Optional[str] = None) -> Optional[str]:
    """Turn on JAX's persistent compilation cache (compiled XLA programs reused across processes: a rerun, a
    resumed run or the main job skip most compile time). ``path`` default: $ALIGNMENT_GEOM_JAX_CACHE, else
    ~/.cache/alignment_geom/jax; the value "off" disables it. Call before the first compilation."""
    path = path or os.environ.get("ALIGNMENT_GEOM_JAX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "alignment_geom", "jax")
    if path.lower() in ("off", "0", "none", "false"):
        return None
    try:
        os.makedirs(path, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    except (OSError, AttributeError) as e:  # pragma: no cover - read-only home etc.
        log.warning("compilation cache disabled: %s", e)
        return None
    return path


def setup():
    """Entry-point start-up (before any JAX work): float64 on, the persistent compilation cache, cluster init
    when the environment describes one."""
    jax.config.update("jax_enable_x64", True)
    enable_compilation_cache()
    maybe_initialize_distributed()


def quiet_logs():
    """Warnings and errors only (JAX/orbax INFO chatter off); called after absl has parsed its flags."""
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)
    for name in ("jax", "orbax", "absl", "matplotlib"):
        logging.getLogger(name).setLevel(logging.WARNING)
