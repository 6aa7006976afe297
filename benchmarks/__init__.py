"""Benchmarks of alignment_geom: machine-independent cost ratios (``python -m benchmarks.run``).

Shared timing helpers live here so every benchmark section measures the same way:

* compile first (``jax.jit(f).lower(*args).compile()``), so no timing includes tracing/compilation;
* time many repetitions with ``block_until_ready``, *interleaving* the functions compared
  (A B C A B C …, in a rotated order each round) so slow drifts of a shared machine hit all alike;
  two runtimes that share the cores (JAX and PyTorch) are instead timed in alternating blocks
  (``time_blocks``), since their thread pools slow each other down when interleaved call by call;
* report medians, and ratios as the median of the per-round (paired) ratios.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any, Callable, Dict, Mapping, Sequence, Tuple

__all__ = [
    "compile_fn",
    "memory_bytes",
    "time_interleaved",
    "time_blocks",
    "paired_ratio",
    "median",
    "environment",
    "block",
]


def block(x):
    """Wait for every array in a pytree (jax arrays; torch tensors and floats pass through)."""
    import jax

    return jax.block_until_ready(x)


def compile_fn(fn: Callable, *args, static_argnums=()) -> Tuple[Callable, float]:
    """(compiled executable, compile seconds) of ``jax.jit(fn)`` for these arguments."""
    import jax

    t0 = time.perf_counter()
    compiled = jax.jit(fn, static_argnums=static_argnums).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def memory_bytes(compiled) -> Dict[str, int] | None:
    """Peak-memory proxy of a compiled executable: temp + output bytes (XLA's memory_analysis()).

    Returns None when the backend does not report it.
    """
    try:
        ma = compiled.memory_analysis()
    except Exception:  # pragma: no cover - backend dependent
        return None
    if ma is None:
        return None
    temp = int(getattr(ma, "temp_size_in_bytes", 0))
    out = int(getattr(ma, "output_size_in_bytes", 0))
    arg = int(getattr(ma, "argument_size_in_bytes", 0))
    return {"temp": temp, "output": out, "argument": arg, "peak": temp + out}


def time_interleaved(fns: Mapping[str, Tuple[Callable, Sequence[Any]]], reps: int = 10,
                     warmup: int = 1, max_seconds: float | None = None) -> Dict[str, list]:
    """Wall-clock seconds of each ``fn(*args)`` (blocked until ready), measured round-robin.

    Each round calls every function once, starting at a rotated position so no function is always
    first. Returns {name: [seconds per round]}. ``max_seconds`` stops early (after ≥ 3 rounds).
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            f, a = fns[n]
            block(f(*a))
    times: Dict[str, list] = {n: [] for n in names}
    t_start = time.perf_counter()
    for r in range(reps):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            f, a = fns[n]
            t0 = time.perf_counter()
            block(f(*a))
            times[n].append(time.perf_counter() - t0)
        if max_seconds is not None and r >= 2 and time.perf_counter() - t_start > max_seconds:
            break
    return times


def time_blocks(groups: Mapping[str, Mapping[str, Tuple[Callable, Sequence[Any]]]], blocks: int = 6,
                reps: int = 5, pause: float = 0.3) -> Tuple[Dict[str, list], Dict[str, list]]:
    """Time functions in per-group blocks (for comparing two runtimes that share the cores).

    ``groups`` = {group: {name: (fn, args)}}, e.g. {"jax": {...}, "torch": {...}}. Each block runs one
    group only: a pause (``pause`` s, so the other runtime's worker threads go idle), one warm-up call
    of each function, then ``reps`` interleaved rounds. The groups alternate, in a rotated order, for
    ``blocks`` blocks each. Interleaving torch and XLA call by call instead made both ~2x slower on 2
    cores (each runtime's spinning thread pool competes with the other's work).

    Returns ({name: [seconds per call]}, {name: [median per block]}); block k of every group is
    adjacent in time, so ratios of per-block medians pair like ``paired_ratio``.
    """
    names = [n for g in groups.values() for n in g]
    times: Dict[str, list] = {n: [] for n in names}
    per_block: Dict[str, list] = {n: [] for n in names}
    order = list(groups)
    for b in range(blocks):
        k = b % len(order)
        for gname in order[k:] + order[:k]:
            fns = groups[gname]
            time.sleep(pause)
            for f, a in fns.values():
                block(f(*a))
            block_times: Dict[str, list] = {n: [] for n in fns}
            for _ in range(reps):
                for n, (f, a) in fns.items():
                    t0 = time.perf_counter()
                    block(f(*a))
                    block_times[n].append(time.perf_counter() - t0)
            for n, ts in block_times.items():
                times[n].extend(ts)
                per_block[n].append(statistics.median(ts))
    return times, per_block


def paired_ratio(times: Mapping[str, list], num: str, den: str) -> float:
    """Median over rounds of t_num / t_den (rounds measured back to back, so drift cancels)."""
    return float(statistics.median(a / b for a, b in zip(times[num], times[den])))


def median(xs) -> float:
    return float(statistics.median(xs))


def environment() -> Dict[str, Any]:
    """Versions, device kind and core count, for results.json."""
    import jax

    env: Dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [d.device_kind for d in jax.devices()],
        "device_count": jax.device_count(),
        "jax_enable_x64": bool(jax.config.jax_enable_x64),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    try:
        env["sched_affinity_cores"] = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        pass
    for mod in ("jaxlib", "flax", "numpy", "torch", "alignment_risk"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:
            env[mod] = None
    try:
        import torch

        env["torch_threads"] = torch.get_num_threads()
    except Exception:
        pass
    return env


def bench_args(doc: str, argv, *, reps: int, extra=()):
    """Parse a benchmark script's common flags (--quick, --json, --reps) plus ``extra``
    ((flag, kwargs) pairs); ``argv=None`` parses no arguments (library use)."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny problems, few rounds (smoke test)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--reps", type=int, default=reps)
    for flag, kw in extra:
        ap.add_argument(flag, **kw)
    return ap.parse_args([] if argv is None else argv)


def write_json(path, payload) -> None:
    """Write ``payload`` as indented JSON to ``path`` when a path is given."""
    import json

    if path:
        with open(path, "w") as fh:
            json.dump(payload, fh, indent=1)
