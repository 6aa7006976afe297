"""Test-session setup: 8 forced host devices (for the sharding tests), float64, and no persistent compile cache.

The first two must be set before JAX initialises its backends, hence here, at import time. The persistent
compilation cache (harness.enable_compilation_cache, default ~/.cache/alignment_geom/jax) is switched off for
the session and for the subprocesses it starts (they inherit the environment), so tests never write to the
user's cache; a test that wants one points $ALIGNMENT_GEOM_JAX_CACHE at its tmp_path.
"""
import os

os.environ["ALIGNMENT_GEOM_JAX_CACHE"] = "off"

flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
