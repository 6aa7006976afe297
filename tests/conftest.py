"""Test-session setup: 8 forced host devices (for the sharding tests) and float64.

Both must be set before JAX initialises its backends, hence here, at import time.
"""
import os

flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
