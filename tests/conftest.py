"""Test-session setup: 8 forced host devices (for the sharding tests), float64, no persistent compile cache, and
XLA's backend optimisations and its slowest compile passes off.

The first two must be set before JAX initialises its backends, hence here, at import time. The persistent
compilation cache (harness.enable_compilation_cache, default ~/.cache/alignment_geom/jax) is switched off for
the session and for the subprocesses it starts (they inherit the environment), so tests never write to the
user's cache; a test that wants one points $ALIGNMENT_GEOM_JAX_CACHE at its tmp_path.

The suite's run time is XLA compilation of tiny programs, so it compiles with ``jax_disable_most_optimizations``
(LLVM's expensive passes off; the HLO, XLA's flop counts and buffer assignment, hence memory_analysis, are
unchanged), in this process and, through $JAX_DISABLE_MOST_OPTIMIZATIONS, in the subprocesses it starts.
"""
import os

os.environ["ALIGNMENT_GEOM_JAX_CACHE"] = "off"
os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"

# Compile-time flags of XLA:CPU, each added unless the environment sets it: the elemental emitters in place of the
# fusion emitters, and copy insertion without region analysis. Together they cut the suite's backend compile time
# 2.5-fold (865 → 369 s summed over both workers; the tiny-Llama Taylor test 31.5 → 16.7 s). Results are the same up
# to rounding: a batched and a per-example program may now round float32 differently in the last ulp.
_FLAGS = {"xla_force_host_platform_device_count": "8", "xla_cpu_use_fusion_emitters": "false",
          "xla_cpu_copy_insertion_use_region_analysis": "false"}
flags = os.environ.get("XLA_FLAGS", "")
for _name, _value in _FLAGS.items():
    if _name not in flags:
        flags += f" --{_name}={_value}"
os.environ["XLA_FLAGS"] = flags.strip()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_disable_most_optimizations", True)
