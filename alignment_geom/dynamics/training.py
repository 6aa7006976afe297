"""Minibatch training loops over a dataset (full fine-tuning and LoRA): one optax optimiser, epochs of lax.scan.

    TrainConfig, make_optimizer, train(loss_fn, params, data, tc, *, key, mask=None, metric_fn=None)
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from alignment_geom.tree import StaticTree

PyTree = Any

__all__ = ["TrainConfig", "make_optimizer", "train"]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimiser settings: ``optimizer`` ∈ {adamw, adam, sgd}; constant or cosine ``schedule``."""
    learning_rate: float = 1e-3
    batch_size: int = 32
    epochs: int = 1
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_steps: int = 0
    grad_clip: float = 0.0

    def __post_init__(self):
        if self.optimizer not in ("adamw", "adam", "sgd"):
            raise ValueError(f"optimizer must be adamw, adam or sgd, got {self.optimizer!r}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be constant or cosine, got {self.schedule!r}")
        if not self.learning_rate > 0 or self.batch_size < 1 or self.epochs < 0:
            raise ValueError("need learning_rate > 0, batch_size ≥ 1, epochs ≥ 0")


def make_optimizer(tc: TrainConfig, total_steps: int, mask: Optional[PyTree] = None, params=None):
    """The optax transformation; leaves with ``mask`` False get zero updates (frozen)."""
    if tc.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, tc.learning_rate, max(tc.warmup_steps, 0),
                                                max(total_steps, tc.warmup_steps + 1), tc.learning_rate * 0.1)
    else:
        lr = tc.learning_rate
    if tc.optimizer == "sgd":
        tx = optax.sgd(lr)
    elif tc.optimizer == "adam":
        tx = optax.adam(lr)
    else:
        tx = optax.adamw(lr, weight_decay=tc.weight_decay)
    if tc.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(tc.grad_clip), tx)
    if mask is not None:
        labels = jax.tree_util.tree_map(lambda m: "train" if bool(m) else "freeze", mask)
        tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
    return tx


def train(loss_fn: Callable, params: PyTree, data: Dict[str, np.ndarray], tc: TrainConfig, *, key,
          mask: Optional[PyTree] = None, metric_fn: Optional[Callable] = None, metric_every: int = 1):
    """Minimise ``loss_fn(params, batch)`` with minibatches of ``data`` (dict of arrays, axis 0 = N).

    Each epoch reshuffles with a key folded from ``key``; the steps of an epoch run in one jitted
    ``lax.scan`` (N // batch_size steps, the remainder dropped; batch_size is capped at N).
    ``mask`` (bool pytree like params) trains only the True leaves (LoRA: ``models.lora_mask``).
    ``metric_fn(params) -> scalar`` is evaluated before training and every ``metric_every`` steps.

    Returns (params, history) with history["loss"] (steps,), history["step"] and history["metric"]
    (at steps 0, metric_every, …) when metric_fn is given."""
    data = {k: jnp.asarray(v) for k, v in data.items()}
    N = int(next(iter(data.values())).shape[0])
    if N == 0:
        raise ValueError("train: empty data")
    if metric_every < 1:
        raise ValueError("metric_every must be ≥ 1")
    bs = min(tc.batch_size, N)
    spe = N // bs
    total = spe * tc.epochs
    tx = make_optimizer(tc, total, mask)
    static = dict(loss_fn=loss_fn, metric_fn=metric_fn, tc=tc, total=total, bs=bs, spe=spe,
                  metric_every=metric_every, mask=StaticTree(mask))
    opt_state = tx.init(params)
    losses, metrics = [], []
    if metric_fn is not None:
        metrics.append(np.asarray(_metric(metric_fn, params))[None])
    for ep in range(tc.epochs):
        perm = jax.random.permutation(jax.random.fold_in(key, ep), N)
        params, opt_state, (l, mt) = _run_epoch(params, opt_state, data, perm, ep * spe, **static)
        losses.append(np.asarray(l))
        if metric_fn is not None:
            steps_done = ep * spe + np.arange(1, spe + 1)  # global step count after each update
            metrics.append(np.asarray(mt)[steps_done % metric_every == 0])
    hist = {"loss": np.concatenate(losses) if losses else np.zeros((0,))}
    if metric_fn is not None:
        hist["metric"] = np.concatenate(metrics)
        hist["step"] = np.arange(hist["metric"].shape[0]) * metric_every
    return params, hist


@partial(jax.jit, static_argnums=0)
def _metric(metric_fn, params):
    return metric_fn(params)


@partial(jax.jit, static_argnames=("loss_fn", "metric_fn", "tc", "total", "bs", "spe", "metric_every", "mask"))
def _run_epoch(params, opt_state, data, perm, step0, *, loss_fn, metric_fn, tc, total, bs, spe, metric_every, mask):
    """One epoch: ``spe`` minibatch steps in a lax.scan. Compiled once per (functions, config, shapes, mask)."""
    tx = make_optimizer(tc, total, mask.tree)

    def step(carry, i):
        p, s = carry
        idx = jax.lax.dynamic_slice_in_dim(perm, i * bs, bs)
        batch = {k: v[idx] for k, v in data.items()}
        loss, g = jax.value_and_grad(loss_fn)(p, batch)
        upd, s = tx.update(g, s, p)
        p = optax.apply_updates(p, upd)
        if metric_fn is None:
            mt = jnp.zeros(())
        else:
            mt = jax.lax.cond((step0 + i + 1) % metric_every == 0, lambda q: jnp.asarray(metric_fn(q), jnp.float32),
                              lambda q: jnp.zeros((), jnp.float32), p)
        return (p, s), (loss, mt)

    (params, opt_state), out = jax.lax.scan(step, (params, opt_state), jnp.arange(spe))
    return params, opt_state, out
