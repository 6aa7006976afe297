"""Devices and hosts: cluster detection for jax.distributed, and grids vmapped and sharded over every device."""
from __future__ import annotations

import os
from functools import partial
from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ['cluster_env_present', 'maybe_initialize_distributed', 'grid_mesh', 'sharded_vmap', 'grid_product']


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


def maybe_initialize_distributed() -> bool:
    """Call jax.distributed.initialize() once when a cluster is described (call before any JAX work)."""
    if jax.distributed.is_initialized() or not cluster_env_present():
        return False
    jax.distributed.initialize()
    return True


def grid_mesh(devices=None) -> Mesh:
    """A one-axis mesh ("grid",) over ``devices`` (default: all global devices)."""
    devs = list(jax.devices() if devices is None else devices)
    return Mesh(np.array(devs), ("grid",))


@partial(jax.jit, static_argnames=("fn", "sharding"))
def _vmapped(placed, *, fn, sharding):
    return jax.lax.with_sharding_constraint(jax.vmap(fn)(placed), sharding)


def sharded_vmap(fn: Callable, grid, *, devices=None):
    """``vmap(fn)`` over the leading axis of the pytree ``grid``, sharded over ``devices`` (default: all).

    The grid (N points) is padded to a multiple of the device count by repeating its last point,
    placed with ``NamedSharding(Mesh(devices, ('grid',)), P('grid'))``, evaluated by one jitted
    ``vmap(fn)`` and cut back to N rows. ``fn`` maps one grid point (the pytree without the leading
    axis) to a pytree of arrays. Returns host numpy arrays, identical (up to floating-point
    reassociation, none in practice) to a single-device evaluation.
    """
    leaves = jax.tree_util.tree_leaves(grid)
    if not leaves:
        raise ValueError("sharded_vmap: empty grid pytree")
    N = int(np.shape(leaves[0])[0])
    if N == 0:
        raise ValueError("sharded_vmap: the grid has no points (leading axis of length 0)")
    if any(np.shape(x)[0] != N for x in leaves):
        shapes = [np.shape(x) for x in leaves]
        raise ValueError(f"sharded_vmap: all grid leaves need the same leading axis; got {shapes}")
    mesh = grid_mesh(devices)
    ndev = mesh.devices.size
    pad = (-N) % ndev
    host = jax.tree_util.tree_map(
        lambda x: np.concatenate([np.asarray(x), np.repeat(np.asarray(x)[-1:], pad, axis=0)]) if pad else np.asarray(x),
        grid)
    sharding = NamedSharding(mesh, P("grid"))
    placed = jax.tree_util.tree_map(
        lambda x: jax.make_array_from_callback(x.shape, sharding, lambda idx, x=x: x[idx]), host)
    out = _vmapped(placed, fn=fn, sharding=sharding)
    if jax.process_count() > 1:
        out = multihost_utils.process_allgather(out, tiled=True)
    return jax.tree_util.tree_map(lambda x: np.asarray(x)[:N], out)


def grid_product(**axes) -> dict:
    """Cartesian product of named 1-D axes -> dict of flat arrays (one row per grid point, C order)."""
    names = list(axes)
    mesh = np.meshgrid(*[np.asarray(axes[k]) for k in names], indexing="ij")
    return {k: m.reshape(-1) for k, m in zip(names, mesh)}
