"""Checkpointing with orbax: resumable loops and grid maps, and whole pytrees (one stack for every experiment).

* :func:`checkpointed_map` ``(fn, grid, workdir=, name=, chunk_size=, every=)``: evaluates ``fn`` over the leading
  axis of ``grid`` in equal chunks (one compilation; each chunk vmapped and sharded over all devices by
  :func:`~alignment_geom.harness.distributed.sharded_vmap`), saves the finished rows every ``every`` chunks,
  and on a rerun restores them and continues. Deterministic: a killed-and-resumed run returns exactly the
  numbers of an uninterrupted one.
* :func:`checkpointed_loop` ``(step_fn, init_state, num_steps, workdir=, name=, every=)``: a Python loop over
  ``num_steps`` outer steps (each ``step_fn(i, state) -> state`` should itself be a jitted
  ``lax.scan``/``fori_loop`` block), checkpointing the state pytree every ``every`` steps and resuming from
  the latest checkpoint.
* :func:`save_tree` / :func:`restore_tree`: one pytree of arrays in a directory.
Both loops write under ``workdir/checkpoints/<name>/`` and take ``workdir=None`` to disable checkpointing.
Crash hook (:data:`CRASH_ENV`): with ``ALIGNMENT_GEOM_CRASH_AFTER=NAME:K`` in the environment, the loop ``NAME``
kills its own process with SIGKILL right after the K-th checkpoint is written and flushed (shell status 137,
``subprocess`` returncode −9): a deterministic interruption for resume tests, with no race against a poll of the
checkpoint directory. K counts loop steps (chunks for :func:`checkpointed_map`); unset or non-matching: no effect.
"""
from __future__ import annotations

import os
import signal
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from alignment_geom.harness.distributed import sharded_vmap
from alignment_geom.harness.progress import progress

__all__ = ['CRASH_ENV', 'checkpointed_loop', 'checkpointed_map', 'save_tree', 'restore_tree']


def _manager(directory: str):
    return ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False, create=True))


def _save(mgr, step: int, state, meta: dict):
    state = jax.tree_util.tree_map(np.asarray, state)
    mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
             force=True)
    mgr.wait_until_finished()


def _restore(mgr, like):
    step = mgr.latest_step()
    if step is None:
        return None
    like = jax.tree_util.tree_map(np.asarray, like)
    r = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(like), meta=ocp.args.JsonRestore()))
    return step, r["state"], r["meta"]


CRASH_ENV = "ALIGNMENT_GEOM_CRASH_AFTER"


def _maybe_crash(name: str, step: int) -> None:
    """Kill this process (SIGKILL) right after loop ``name`` saved step ``step``, when $ALIGNMENT_GEOM_CRASH_AFTER
    is ``name:step``: a deterministic interruption for resume tests."""
    spec = os.environ.get(CRASH_ENV, "")
    if spec and spec.rsplit(":", 1) == [name, str(step)]:
        os.kill(os.getpid(), signal.SIGKILL)


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
                _maybe_crash(name, i + 1)
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


def save_tree(path: str, tree) -> None:
    """Write a pytree of arrays to ``path`` (a new directory) with orbax."""
    path = os.path.abspath(path)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, jax.tree_util.tree_map(np.asarray, tree), force=True)
        ckpt.wait_until_finished()


def restore_tree(path: str, like):
    """Read a pytree saved by :func:`save_tree`; ``like`` gives structure, shapes and dtypes."""
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    with ocp.StandardCheckpointer() as ckpt:
        out = ckpt.restore(path, jax.tree_util.tree_map(np.asarray, like))
    return jax.tree_util.tree_map(jnp.asarray, out)


