"""Generic experiment machinery: config validation, workdirs, checkpoint/resume, sharded sweeps.

The contract every experiment follows
-------------------------------------
A config (an ``ml_collections.ConfigDict`` from ``configs/<name>.py:get_config(arg)``) has a string
field ``experiment`` naming a module ``alignment_geom.experiments.<experiment>`` that defines

* ``run(config, workdir) -> dict``: compute, save the figure (PNG + PDF) into ``workdir``, return the
  JSON-able results dict (the figure's numbers);
* optionally ``validate(config)``: raise :class:`ConfigError` (field, value, allowed) on bad input;
* optionally ``THEORY = True``: a theory figure; running it in float32/bfloat16 warns that float64 is
  needed for the small-t regime (Δu ∝ t⁴ underflows float32 resolution at small t).

:func:`run` does the generic parts around it: validation (before anything is written), the
workdir (``config.json`` resolved, ``env.json`` versions/devices, ``results.json``), refusing a workdir
that holds a different config unless ``overwrite``, turning a :class:`NonFiniteError` into a partial
``results.json`` that names the step and the quantity.

Resumable long work (for every experiment, including the LM one)
----------------------------------------------------------------
* :func:`checkpointed_map` ``(fn, grid, workdir=, name=, chunk_size=, every=)``: evaluates ``fn`` over
  the leading axis of ``grid`` in equal chunks (one compilation; each chunk vmapped and sharded over
  all devices by :func:`sharded_vmap`), saves the finished rows with orbax every ``every`` chunks, and
  on a rerun restores them and continues. Deterministic: a killed-and-resumed run returns exactly the
  numbers of an uninterrupted one.
* :func:`checkpointed_loop` ``(step_fn, init_state, num_steps, workdir=, name=, every=)``: a Python
  loop over ``num_steps`` outer steps (each ``step_fn(i, state) -> state`` should itself be a jitted
  ``lax.scan``/``fori_loop`` block), checkpointing the state pytree every ``every`` steps and resuming
  from the latest checkpoint.
Both write under ``workdir/checkpoints/<name>/`` and take ``workdir=None`` to disable checkpointing.

Multi-host: :func:`maybe_initialize_distributed` calls ``jax.distributed.initialize()`` when the
environment describes a cluster (``JAX_COORDINATOR_ADDRESS``, a multi-worker TPU pod slice, SLURM or
Open MPI with more than one task). Only process 0 writes files; sweeps span all global devices.
"""
from __future__ import annotations

import importlib
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
import warnings
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger("alignment_geom")

DTYPES = ("float64", "float32", "bfloat16")
FLOAT64_WARNING = ("float64 is needed for the small-t regime of a theory figure (Δu ∝ t⁴ falls below "
                   "float32 resolution at small t); results in {dtype} are unreliable there")


# --------------------------------------------------------------------------- errors


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
        bad = ~np.isfinite(np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)).all(axis=1) if a.ndim else np.array([True])
        i = int(np.argmax(bad))
        label = i if steps is None else f"{i} (t={np.asarray(steps)[i]:.6g})"
        raise NonFiniteError(quantity, label, partial)
    return values


# --------------------------------------------------------------------------- validation helpers


def require_positive(config, field: str, *, strict: bool = True):
    v = config[field]
    vals = list(v) if isinstance(v, (list, tuple)) else [v]
    for x in vals:
        if not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x) or (x <= 0 if strict else x < 0):
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
        rng = f"an integer" + (f" >= {lo}" if lo is not None else "") + (f" and <= {hi}" if hi is not None else "")
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


def _generic_validate(config):
    if "experiment" not in config or not isinstance(config.experiment, str) or not config.experiment:
        raise ConfigError("experiment", config.get("experiment"), "the name of a module in alignment_geom/experiments")
    try:
        module = importlib.import_module(f"alignment_geom.experiments.{config.experiment}")
    except ModuleNotFoundError as e:
        if e.name and e.name.endswith(config.experiment):
            raise ConfigError("experiment", config.experiment,
                              "the name of a module in alignment_geom/experiments") from None
        raise
    if not hasattr(module, "run"):
        raise ConfigError("experiment", config.experiment, "a module defining run(config, workdir)")
    if "dtype" in config:
        require_choice(config, "dtype", DTYPES)
    if "seed" in config:
        require_int(config, "seed", lo=0)
    if "checkpoint_every" in config:
        require_int(config, "checkpoint_every", lo=1)
    return module


def validate(config):
    """Generic + experiment-specific validation; returns the experiment module. Raises ConfigError."""
    module = _generic_validate(config)
    if hasattr(module, "validate"):
        module.validate(config)
    return module


# --------------------------------------------------------------------------- JSON


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
    import importlib.metadata as md

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


# --------------------------------------------------------------------------- workdir + run


def prepare_workdir(config_dict: dict, workdir: str, overwrite: bool = False) -> bool:
    """Check (without writing) that ``workdir`` may take this config.

    Returns True when the workdir already holds the same config (a resume). Raises ConfigError when
    it holds a different config (unless ``overwrite``) or is a non-empty directory that is not a
    workdir of ours, or exists as a file.
    """
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError("workdir", workdir, "a directory path (this is a file)")
    cfg_path = os.path.join(workdir, "config.json")
    if os.path.isdir(workdir) and os.listdir(workdir) and not os.path.exists(cfg_path):
        raise ConfigError("workdir", workdir, "an empty or new directory, or a previous run's workdir "
                          "(this one is non-empty and holds no config.json)")
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            old = json.load(f)
        if old == json.loads(json.dumps(config_dict)):
            return not overwrite
        if not overwrite:
            diff = sorted(k for k in set(old) | set(config_dict) if old.get(k) != config_dict.get(k))
            raise ConfigError("workdir", workdir, "a workdir holding the same config (it holds a different "
                              f"one: fields {', '.join(diff)} differ); pass --overwrite to replace it")
    return False


def _clear_workdir(workdir: str) -> None:
    if jax.process_index() != 0 or not os.path.isdir(workdir):
        return
    for name in os.listdir(workdir):
        p = os.path.join(workdir, name)
        shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)


def ensure_x64(dtype: str) -> None:
    """Turn on jax_enable_x64 when float64 is requested (entry points set it at start-up)."""
    if dtype == "float64" and not jax.config.jax_enable_x64:
        jax.config.update("jax_enable_x64", True)


def run(config, workdir: str, overwrite: bool = False, keep_checkpoints: bool = True) -> dict:
    """Validate ``config``, prepare ``workdir``, run the experiment, write results.json; return results.

    Raises ConfigError (nothing written) on bad input, NonFiniteError (after writing a partial
    results.json with ``status = "nonfinite"``) on NaN/Inf along a trajectory. ``keep_checkpoints=False``
    removes ``workdir/checkpoints`` after a successful run (the main job keeps figures/ small).
    """
    import ml_collections

    if not isinstance(config, ml_collections.ConfigDict):
        config = ml_collections.ConfigDict(config)
    module = validate(config)
    cfg = config_to_dict(config)
    resume = prepare_workdir(cfg, workdir, overwrite)
    dtype = config.get("dtype", "float64")
    ensure_x64(dtype)
    if getattr(module, "THEORY", False) and dtype != "float64":
        msg = FLOAT64_WARNING.format(dtype=dtype)
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
    if overwrite and not resume:
        _clear_workdir(workdir)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
    write_json(os.path.join(workdir, "config.json"), cfg)
    write_json(os.path.join(workdir, "env.json"), env_info())
    res_path = os.path.join(workdir, "results.json")
    t0 = time.time()
    try:
        results = module.run(config, workdir)
    except NonFiniteError as e:
        partial = dict(e.partial)
        partial.update(status="nonfinite", error=str(e), quantity=e.quantity, step=str(e.step))
        write_json(res_path, partial)
        raise
    results = dict(results)
    results.setdefault("status", "ok")
    write_json(res_path, results)
    write_json(os.path.join(workdir, "timing.json"), {"seconds": time.time() - t0, "resumed": resume})
    ck = os.path.join(workdir, "checkpoints")
    if not keep_checkpoints and jax.process_index() == 0 and os.path.isdir(ck):
        shutil.rmtree(ck)
    return to_jsonable(results)


# --------------------------------------------------------------------------- distributed + devices


_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def cluster_env_present(environ=None) -> bool:
    """True when the environment describes a multi-process cluster jax.distributed can auto-detect."""
    env = os.environ if environ is None else environ
    if any(env.get(k) for k in _CLUSTER_ENV):
        return True
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    if hosts and len([h for h in hosts.split(",") if h.strip()]) > 1:
        return True
    for k in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        try:
            if int(env.get(k, "1")) > 1:
                return True
        except ValueError:
            pass
    return False


_DIST_DONE = False


def maybe_initialize_distributed() -> bool:
    """Call jax.distributed.initialize() once when a cluster is described (call before any JAX work)."""
    global _DIST_DONE
    if _DIST_DONE or not cluster_env_present():
        return False
    jax.distributed.initialize()
    _DIST_DONE = True
    return True


def _mesh(devices=None):
    from jax.sharding import Mesh

    devs = list(jax.devices() if devices is None else devices)
    return Mesh(np.array(devs), ("grid",))


_SHARDED_CACHE: dict = {}


def sharded_vmap(fn: Callable, grid, *, devices=None):
    """``vmap(fn)`` over the leading axis of the pytree ``grid``, sharded over ``devices`` (default: all).

    The grid (N points) is padded to a multiple of the device count by repeating its last point,
    placed with ``NamedSharding(Mesh(devices, ('grid',)), P('grid'))``, evaluated by one jitted
    ``vmap(fn)`` and cut back to N rows. ``fn`` maps one grid point (the pytree without the leading
    axis) to a pytree of arrays. Returns host numpy arrays, identical (up to floating-point
    reassociation, none in practice) to a single-device evaluation.
    """
    from jax.sharding import NamedSharding, PartitionSpec as P

    leaves = jax.tree_util.tree_leaves(grid)
    if not leaves:
        raise ValueError("sharded_vmap: empty grid pytree")
    N = int(np.shape(leaves[0])[0])
    if N == 0:
        raise ValueError("sharded_vmap: the grid has no points (leading axis of length 0)")
    if any(np.shape(x)[0] != N for x in leaves):
        raise ValueError(f"sharded_vmap: all grid leaves need the same leading axis; got {[np.shape(x) for x in leaves]}")
    mesh = _mesh(devices)
    ndev = mesh.devices.size
    pad = (-N) % ndev
    host = jax.tree_util.tree_map(
        lambda x: np.concatenate([np.asarray(x), np.repeat(np.asarray(x)[-1:], pad, axis=0)]) if pad else np.asarray(x),
        grid)
    sharding = NamedSharding(mesh, P("grid"))
    placed = jax.tree_util.tree_map(
        lambda x: jax.make_array_from_callback(x.shape, sharding, lambda idx, x=x: x[idx]), host)
    key = (fn, tuple(d.id for d in mesh.devices.flat))
    f = _SHARDED_CACHE.get(key)
    if f is None:
        f = jax.jit(jax.vmap(fn), out_shardings=sharding)
        _SHARDED_CACHE[key] = f
    out = f(placed)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        out = multihost_utils.process_allgather(out, tiled=True)
    return jax.tree_util.tree_map(lambda x: np.asarray(x)[:N], out)


def grid_product(**axes) -> dict:
    """Cartesian product of named 1-D axes -> dict of flat arrays (one row per grid point, C order)."""
    names = list(axes)
    mesh = np.meshgrid(*[np.asarray(axes[k]) for k in names], indexing="ij")
    return {k: m.reshape(-1) for k, m in zip(names, mesh)}


# --------------------------------------------------------------------------- progress


def progress(iterable=None, *, total=None, desc=None, **kw):
    """A tqdm progress bar on stderr (off on non-zero processes or with ALIGNMENT_GEOM_NO_PROGRESS=1)."""
    from tqdm.auto import tqdm

    disable = jax.process_index() != 0 or os.environ.get("ALIGNMENT_GEOM_NO_PROGRESS") == "1"
    return tqdm(iterable, total=total, desc=desc, disable=disable, leave=False, dynamic_ncols=True, **kw)


# --------------------------------------------------------------------------- checkpointing


def _manager(directory: str):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False, create=True))


def _save(mgr, step: int, state, meta: dict):
    import orbax.checkpoint as ocp

    state = jax.tree_util.tree_map(np.asarray, state)
    mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
             force=True)
    mgr.wait_until_finished()


def _restore(mgr, like):
    import orbax.checkpoint as ocp

    step = mgr.latest_step()
    if step is None:
        return None
    like = jax.tree_util.tree_map(np.asarray, like)
    r = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(like), meta=ocp.args.JsonRestore()))
    return step, r["state"], r["meta"]


def checkpointed_loop(step_fn: Callable, init_state, num_steps: int, *, workdir: Optional[str], name: str,
                      every: int = 1, desc: Optional[str] = None, on_restore: Optional[Callable] = None):
    """``state = step_fn(i, state)`` for i in [0, num_steps), checkpointed every ``every`` steps.

    On a rerun with the same ``workdir``/``name`` it restores the latest saved state and continues
    from there (state: a pytree of arrays with fixed shapes/dtypes). Returns the final state.
    """
    if num_steps < 0 or every < 1:
        raise ValueError(f"checkpointed_loop: need num_steps >= 0 and every >= 1, got {num_steps}, {every}")
    mgr = _manager(os.path.join(workdir, "checkpoints", name)) if workdir else None
    state, start = init_state, 0
    if mgr is not None:
        got = _restore(mgr, init_state)
        if got is not None:
            start, state, _ = got
            state = jax.tree_util.tree_map(lambda a, b: jnp.asarray(a, dtype=jnp.asarray(b).dtype), state, init_state)
            if on_restore is not None:
                on_restore(start)
    with progress(total=num_steps, desc=desc or name, initial=start) as bar:
        for i in range(start, num_steps):
            state = step_fn(i, state)
            bar.update(1)
            if mgr is not None and ((i + 1) % every == 0 or i + 1 == num_steps):
                _save(mgr, i + 1, state, {"done": i + 1, "num_steps": num_steps})
    if mgr is not None:
        mgr.close()
    return state


def checkpointed_map(fn: Callable, grid, *, workdir: Optional[str], name: str, chunk_size: Optional[int] = None,
                     every: int = 1, devices=None, desc: Optional[str] = None):
    """``vmap(fn)`` over the leading axis of ``grid`` in resumable chunks; returns host numpy outputs.

    Chunks have ``chunk_size`` points (rounded up to a multiple of the device count; default one
    chunk per device), all the same shape (the last one padded), so ``fn`` compiles once. Each chunk
    runs through :func:`sharded_vmap`; finished rows are checkpointed every ``every`` chunks.
    """
    leaves = jax.tree_util.tree_leaves(grid)
    if not leaves or np.shape(leaves[0])[0] == 0:
        raise ValueError("checkpointed_map: the grid has no points")
    N = int(np.shape(leaves[0])[0])
    ndev = len(jax.devices() if devices is None else devices)
    cs = ndev if chunk_size is None else int(chunk_size)
    cs = max(ndev, -(-cs // ndev) * ndev)
    nchunks = -(-N // cs)
    host = jax.tree_util.tree_map(np.asarray, grid)
    pad = nchunks * cs - N
    if pad:
        host = jax.tree_util.tree_map(lambda x: np.concatenate([x, np.repeat(x[-1:], pad, axis=0)]), host)
    one = jax.tree_util.tree_map(lambda x: x[:cs], host)
    shapes = jax.eval_shape(jax.vmap(fn), one)
    init = {"out": jax.tree_util.tree_map(lambda s: np.zeros((nchunks * cs,) + s.shape[1:], s.dtype), shapes)}

    def step(i, state):
        chunk = jax.tree_util.tree_map(lambda x: x[i * cs:(i + 1) * cs], host)
        res = sharded_vmap(fn, chunk, devices=devices)
        out = jax.tree_util.tree_map(lambda buf, r: _set_rows(buf, i * cs, r), state["out"], res)
        return {"out": out}

    final = checkpointed_loop(step, init, nchunks, workdir=workdir, name=name, every=every, desc=desc)
    return jax.tree_util.tree_map(lambda x: np.asarray(x)[:N], final["out"])


def _set_rows(buf, start, rows):
    buf = np.array(buf, copy=True)
    buf[start:start + rows.shape[0]] = rows
    return buf


# --------------------------------------------------------------------------- dtype + figures


def dtype_of(config):
    return {"float64": jnp.float64, "float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.get("dtype", "float64")]


def save_figure(fig, workdir: str, name: str) -> list:
    """Save a matplotlib figure as ``workdir/name.png`` and ``.pdf`` (process 0 only); close it."""
    import matplotlib.pyplot as plt

    paths = []
    if jax.process_index() == 0:
        for ext in ("png", "pdf"):
            p = os.path.join(workdir, f"{name}.{ext}")
            fig.savefig(p, dpi=130 if ext == "png" else None, bbox_inches="tight")
            paths.append(p)
    plt.close(fig)
    return paths


# --------------------------------------------------------------------------- config args + command line


PRESET_NAMES = ("smoke", "default", "large")


def _coerce(field: str, current, text: str):
    """Parse ``text`` into the type of ``current`` (sweeps: values separated by '/')."""
    def one(kind, s):
        s = s.strip()
        if kind is bool:
            if s.lower() in ("true", "1", "yes"):
                return True
            if s.lower() in ("false", "0", "no"):
                return False
            raise ConfigError(field, text, "true or false")
        if kind is int:
            try:
                return int(s)
            except ValueError:
                raise ConfigError(field, text, "an integer") from None
        if kind is float:
            try:
                return float(s)
            except ValueError:
                raise ConfigError(field, text, "a number") from None
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
    import ml_collections

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

    ``presets``: name -> dict of field overrides (``smoke``/``default``/``large``). Raises ConfigError on an
    unknown preset or field, or a value of the wrong type. Returns ``config`` (modified in place).
    """
    if not arg:
        return config
    for tok in [t.strip() for t in arg.split(",") if t.strip()]:
        if "=" not in tok:
            if tok not in presets:
                raise ConfigError("preset", tok, "a preset (" + ", ".join(presets) + ") or FIELD=VALUE")
            for k, v in presets[tok].items():
                setattr(config, k, v)
            if "preset" in config:
                config.preset = tok
            continue
        k, v = (s.strip() for s in tok.split("=", 1))
        if k not in config:
            raise ConfigError(k, v, "a known field (" + ", ".join(sorted(config.keys())) + ")")
        setattr(config, k, _coerce(k, config[k], v))
    return config


def die(message: str, status: int = 2):
    """Print ``error: message`` as one line on stderr and exit with ``status`` (2 = bad input)."""
    sys.stderr.write("error: " + " ".join(str(message).split()) + "\n")
    sys.stderr.flush()
    sys.exit(status)


def _unknown_override(argv: Sequence[str]) -> Optional[str]:
    """The first --config.FIELD override in argv whose FIELD is not in the loaded config (or None)."""
    cfg_arg = next((a.split("=", 1)[1] for a in reversed(argv) if a.startswith("--config=")), None)
    if cfg_arg is None:
        return None
    try:
        config = load_config(cfg_arg)
    except Exception:  # noqa: BLE001
        return None
    for a in argv:
        if a.startswith("--config.") and "=" in a:
            path = a[len("--config."):].split("=", 1)[0]
            node = config
            for part in path.split("."):
                if not hasattr(node, "keys") or part not in node:
                    return f"config.{path}: unknown config field; allowed fields are {', '.join(sorted(config.keys()))}"
                node = node[part]
        elif a.startswith("--config.") and "=" not in a:
            path = a[len("--config."):]
            if path not in config:
                return f"config.{path}: unknown config field; allowed fields are {', '.join(sorted(config.keys()))}"
    return None


def flags_parser(argv):
    """absl flags parser that turns every flag/config error into one line + exit status 2."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except ConfigError as e:
        die(str(e))
    except flags.Error as e:
        msg = str(e)
        if "--config." in msg or "config" in msg:
            msg = msg.replace("flag --config.", "config.")
        lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
        pick = next((ln for ln in lines if "is not allowed" in ln), lines[0] if lines else msg)
        pick = pick[pick.index("config."):] if "is not allowed" in pick and "config." in pick else pick
        die(pick + ("" if "allowed" in pick else " (see the config's fields and types)"))
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        unknown = _unknown_override(argv)
        die(unknown or f"invalid --config: {e}")
    except Exception as e:  # noqa: BLE001
        die(f"invalid --config ({type(e).__name__}): {e}")


def load_config(spec: str):
    """Load ``configs/NAME.py[:ARGS]`` by path (as config_flags does) and call get_config(ARGS)."""
    import importlib.util

    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError("config", spec, "an existing config file configs/NAME.py[:ARGS]")
    name = "_ag_config_" + os.path.splitext(os.path.basename(path))[0]
    sp = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(sp)
    sp.loader.exec_module(mod)
    return mod.get_config(arg) if arg else mod.get_config()


def resolved_config(config_flag, argv):
    """The parsed config from a config_flags holder; one-line exit 2 when it could not be loaded."""
    try:
        config = config_flag.value
        if config is None:
            die("--config is required: allowed is configs/NAME.py[:ARGS]")
        _ = config.keys()
    except ConfigError as e:
        die(str(e))
    except Exception as e:  # noqa: BLE001
        spec = next((a.split("=", 1)[1] for a in reversed(argv) if a.startswith("--config=")), "")
        die(f"config={spec!r} could not be loaded ({type(e).__name__}: {e}): allowed is an existing configs/NAME.py[:ARGS]")
    return config


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
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.WARNING)
    except ImportError:  # pragma: no cover
        pass
    logging.getLogger().setLevel(logging.WARNING)
    for name in ("jax", "orbax", "absl", "matplotlib"):
        logging.getLogger(name).setLevel(logging.WARNING)


def run_one(config, workdir: str, overwrite: bool = False) -> dict:
    """run() for the command line: ConfigError -> exit 2, NonFiniteError -> exit 3 (partial results kept)."""
    quiet_logs()
    try:
        results = run(config, workdir, overwrite=overwrite)
    except ConfigError as e:
        die(str(e), 2)
    except NonFiniteError as e:
        die(f"{e}; partial results kept in {os.path.join(workdir, 'results.json')}", 3)
    print(json.dumps(summary_line(results), sort_keys=True))
    return results


def summary_line(results: dict) -> dict:
    """The scalar entries of a results dict (what the command line prints)."""
    return {k: v for k, v in to_jsonable(results).items() if isinstance(v, (int, float, str, bool)) or v is None}


# --------------------------------------------------------------------------- the main job


def main_job(outdir: str, *, preset: str = "default", only: Sequence[str] = (), overwrite: bool = False,
             configs_dir: Optional[str] = None) -> int:
    """Run every figure's config at ``preset`` into ``outdir/<name>/``; print + save the summary table.

    Each experiment's results carry ``claim = {quantity, measured, expected, agree}``. With ``only``, the rows
    of an existing summary (same preset) are updated rather than replaced. Returns the exit
    status: 0 when every figure ran and agrees, 1 otherwise, 2 on bad input (unknown figure/preset).
    """
    from alignment_geom.experiments import FIGURES

    quiet_logs()
    configs_dir = configs_dir or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    names = list(only) if only else list(FIGURES)
    for n in names:
        if n not in FIGURES:
            die(f"--only={n!r} is not allowed: figures are {', '.join(FIGURES)}")
    if preset not in PRESET_NAMES:
        die(f"--preset={preset!r} is not allowed: one of {', '.join(PRESET_NAMES)}")
    if jax.process_index() == 0:
        os.makedirs(outdir, exist_ok=True)
    rows, t_all = [], time.time()
    bar = progress(names, desc="figures", total=len(names))
    for name in bar:
        bar.set_postfix_str(name)
        t0 = time.time()
        row = {"figure": name, "quantity": "", "measured": None, "expected": "", "agree": False}
        try:
            config = load_config(os.path.join(configs_dir, f"{name}.py") + f":{preset}")
            res = run(config, os.path.join(outdir, name), overwrite=overwrite, keep_checkpoints=False)
            claim = res.get("claim", {})
            row.update(quantity=claim.get("quantity", ""), measured=claim.get("measured"),
                       expected=claim.get("expected", ""), agree=bool(claim.get("agree", False)))
            png = os.path.join(outdir, name, f"{name}.png")
            if os.path.exists(png) and jax.process_index() == 0:
                shutil.copyfile(png, os.path.join(outdir, f"{name}.png"))
        except ConfigError as e:
            row["error"] = str(e)
        except Exception as e:  # noqa: BLE001 - one failing figure must not hide the others
            log.exception("figure %s failed", name)
            row["error"] = f"{type(e).__name__}: {e}"
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
    total = time.time() - t_all
    summary_path = os.path.join(outdir, "summary.json")
    if only and os.path.exists(summary_path):      # --only updates its rows of an existing summary
        try:
            with open(summary_path) as f:
                old = json.load(f)
            if old.get("preset") == preset:
                ran = {r["figure"] for r in rows}
                merged = {r["figure"]: r for r in old.get("rows", []) if r.get("figure") not in ran}
                merged.update({r["figure"]: r for r in rows})
                rows = [merged[n] for n in FIGURES if n in merged]
        except (OSError, ValueError, KeyError):
            pass
    table = format_summary(rows)
    print(table)
    print(f"total: {total:.0f} s on {jax.device_count()} {jax.default_backend()} device(s), preset={preset}")
    write_json(summary_path, {"preset": preset, "seconds": total, "rows": rows})
    if jax.process_index() == 0:
        with open(os.path.join(outdir, "summary.md"), "w") as f:
            f.write(table + f"\n\nTotal {total:.0f} s on {jax.device_count()} {jax.default_backend()} device(s), "
                    f"preset `{preset}`.\n")
    return 0 if all(r["agree"] and "error" not in r for r in rows) else 1


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def format_summary(rows: list) -> str:
    """A Markdown table: figure | quantity | measured | expected | agree? | seconds."""
    head = "| figure | quantity | measured | expected | agree? | s |\n|---|---|---|---|---|---|"
    lines = [head]
    for r in rows:
        agree = "yes" if r.get("agree") else ("ERROR: " + r["error"] if "error" in r else "no")
        lines.append(f"| {r['figure']} | {r.get('quantity', '')} | {_fmt(r.get('measured'))} | "
                     f"{_fmt(r.get('expected'))} | {agree} | {_fmt(r.get('seconds'))} |")
    return "\n".join(lines)
