"""Functions of a Llama/Qwen3 model on token data: SFT loss, log π(completion | prompt), completion logits.

A token batch (:func:`make_batch`) is a dict of arrays with the example axis first::

    tokens (B, T) int32, attention_mask (B, T) 1/0, pos (B, K) int32, targets (B, K) int32, weights (B, K)

where completion token k of example b is ``targets[b, k]``, predicted by the logits at position ``pos[b, k]``
(the token before it), and ``weights`` is 1 on the real completion tokens and 0 on padding (K = the longest
completion). Only the K completion positions go through the output projection: the (B, T, V) logits of every
position are never formed.

* :func:`sft_loss` L(θ) = −Σ w log π_θ(y_k | x, y_<k) / Σ w (prompt tokens masked out);
* :func:`completion_logprob` log π_θ(y | x) = Σ_k w log π_θ(y_k | x, y_<k), shape (B,) (the empirical Fisher's
  per-example log-likelihoods);
* :func:`completion_logits` z (B, K, V) at the completion positions (the policy of the true Fisher F and of
  Δu = KL(π_θ* ‖ π_θ)); padded completion slots get constant zero logits (J = 0 there), so F and Δu are
  (Σ w)/(B·K) times their means over real tokens, and exactly those means when every completion has K tokens;
* ``chunk`` (loss and log-likelihoods): the logits are formed ``chunk`` positions at a time under
  ``jax.checkpoint``, so at most (B, chunk, V) of them exist, in the backward pass too;
* :func:`lm_problem` — a :class:`~alignment_geom.problem.Problem` from a fine-tuning batch and a safety batch,
  full-parameter or LoRA (θ = {"base", "lora"} with the adapter mask).

With ``lora`` (a :class:`~alignment_geom.models.lora.LoRAConfig`) the parameters are the LoRA tree
{"base": θ₀, "lora": adapters} and the adapters are applied at apply time.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from alignment_geom.models.llama import LlamaConfig, hidden_states, lm_head
from alignment_geom.models.lora import LoRAConfig, lora_mask
from alignment_geom.problem import Problem

PyTree = Any

__all__ = ["make_batch", "sft_loss", "completion_logprob", "completion_logits", "token_logprobs", "LMFunction",
           "lm_problem", "apply_model"]


def make_batch(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], *, pad_id: int = 0,
               padding: str = "right", length: Optional[int] = None) -> dict:
    """A token batch (module docstring) from token-id lists; numpy arrays.

    ``padding`` "right" or "left"; ``length`` T (default: the longest prompt + completion). Every prompt needs
    at least one token (the first completion token is predicted from the prompt's last)."""
    if padding not in ("left", "right"):
        raise ValueError(f"padding must be 'left' or 'right', got {padding!r}")
    if len(prompts) != len(completions) or not prompts:
        raise ValueError(f"prompts and completions must be equally long and non-empty, got {len(prompts)} "
                         f"and {len(completions)}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    lens = [len(p) + len(c) for p, c in zip(prompts, completions)]
    T = max(lens) if length is None else int(length)
    if T < max(lens):
        raise ValueError(f"length={T} is shorter than the longest prompt + completion ({max(lens)})")
    K = max(1, max(len(c) for c in completions))
    B = len(prompts)
    tokens = np.full((B, T), pad_id, np.int32)
    mask = np.zeros((B, T), np.int32)
    pos = np.zeros((B, K), np.int32)
    targets = np.zeros((B, K), np.int32)
    weights = np.zeros((B, K), np.float32)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        seq = list(p) + list(c)
        start = 0 if padding == "right" else T - len(seq)
        tokens[b, start:start + len(seq)] = seq
        mask[b, start:start + len(seq)] = 1
        n = len(c)
        pos[b, :n] = start + len(p) - 1 + np.arange(n)
        targets[b, :n] = c
        weights[b, :n] = 1.0
    return {"tokens": tokens, "attention_mask": mask, "pos": pos, "targets": targets, "weights": weights}


def apply_model(cfg: LlamaConfig, params: PyTree, tokens, attention_mask=None, lora: Optional[LoRAConfig] = None,
                freeze_base: bool = False):
    """Final hidden states (B, T, D) and the parameters that hold the output projection. ``freeze_base``
    (LoRA): θ₀ under stop_gradient, so no derivative with respect to it is formed."""
    if lora is None:
        return hidden_states(cfg, params, tokens, attention_mask=attention_mask), params
    base = jax.lax.stop_gradient(params["base"]) if freeze_base else params["base"]
    h = hidden_states(cfg, base, tokens, attention_mask=attention_mask, lora=params["lora"], lora_scale=lora.scale)
    return h, base


def completion_logits(cfg: LlamaConfig, params: PyTree, batch: dict, lora: Optional[LoRAConfig] = None,
                      freeze_base: bool = False):
    """z (B, K, V): next-token logits at the completion positions ``pos`` (zeros, constant, on padded slots)."""
    h, head = apply_model(cfg, params, batch["tokens"], batch.get("attention_mask"), lora, freeze_base)
    pos = jnp.asarray(batch["pos"])
    hk = jnp.take_along_axis(h, pos[:, :, None], axis=1)
    z = lm_head(cfg, head, hk)
    w = jnp.asarray(batch["weights"])
    return jnp.where(w[:, :, None] > 0, z, jnp.zeros((), z.dtype))


def _chunked_logprobs(cfg, head, hk, targets, chunk):
    """log π(targets) at the hidden states hk (B, K, D), ``chunk`` positions at a time: lax.map over chunks of
    a checkpointed body, so only one (B, chunk, V) block of logits exists at a time, in the backward pass too."""
    B, K, D = hk.shape
    nc = -(-K // chunk)
    pad = nc * chunk - K
    hk = jnp.pad(hk, ((0, 0), (0, pad), (0, 0))).reshape(B, nc, chunk, D).swapaxes(0, 1)
    tg = jnp.pad(targets, ((0, 0), (0, pad))).reshape(B, nc, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one(args):
        h, t = args
        z = lm_head(cfg, head, h)
        return jnp.take_along_axis(z, t[:, :, None], axis=-1)[..., 0] - jax.nn.logsumexp(z, axis=-1)

    return jax.lax.map(one, (hk, tg)).swapaxes(0, 1).reshape(B, nc * chunk)[:, :K]


def token_logprobs(cfg: LlamaConfig, params: PyTree, batch: dict, lora: Optional[LoRAConfig] = None,
                   chunk: Optional[int] = None, freeze_base: bool = False):
    """w_k · log π_θ(y_k | x, y_<k), shape (B, K) (0 on padded slots). ``chunk``: positions per block of
    logits (None: all K at once)."""
    w = jnp.asarray(batch["weights"])
    targets = jnp.asarray(batch["targets"])
    if chunk is None:
        z = completion_logits(cfg, params, batch, lora, freeze_base)
        lp = jnp.take_along_axis(z, targets[:, :, None], axis=-1)[..., 0] - jax.nn.logsumexp(z, axis=-1)
    else:
        h, head = apply_model(cfg, params, batch["tokens"], batch.get("attention_mask"), lora, freeze_base)
        hk = jnp.take_along_axis(h, jnp.asarray(batch["pos"])[:, :, None], axis=1)
        lp = _chunked_logprobs(cfg, head, hk, targets, int(chunk))
    return lp * w.astype(lp.dtype)


def completion_logprob(cfg: LlamaConfig, params: PyTree, batch: dict, lora: Optional[LoRAConfig] = None,
                       chunk: Optional[int] = None, freeze_base: bool = False):
    """log π_θ(y | x) = Σ_k w_k log π_θ(y_k | x, y_<k), shape (B,)."""
    return jnp.sum(token_logprobs(cfg, params, batch, lora, chunk, freeze_base), axis=-1)


def sft_loss(cfg: LlamaConfig, params: PyTree, batch: dict, lora: Optional[LoRAConfig] = None,
             chunk: Optional[int] = None, freeze_base: bool = False):
    """L(θ) = −Σ_{b,k} w log π_θ(y_k | x, y_<k) / Σ w: next-token cross-entropy on completion tokens only.
    ``chunk`` (positions per block of logits) bounds the logits in memory to (B, chunk, V)."""
    lp = token_logprobs(cfg, params, batch, lora, chunk, freeze_base)
    w = jnp.asarray(batch["weights"]).astype(lp.dtype)
    return -jnp.sum(lp) / jnp.maximum(jnp.sum(w), 1.0)


_KINDS = {"sft_loss": sft_loss, "completion_logprob": completion_logprob, "completion_logits": completion_logits}


@dataclasses.dataclass(frozen=True)
class LMFunction:
    """``f(params, batch)`` for one of the objectives above, bound to (cfg, lora). Compared and hashed by value,
    so Problems built twice from the same model hit the same compiled functions."""
    cfg: LlamaConfig
    kind: str
    lora: Optional[LoRAConfig] = None
    chunk: Optional[int] = None
    freeze_base: bool = False

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise ValueError(f"LMFunction.kind must be one of {sorted(_KINDS)}, got {self.kind!r}")
        if self.chunk is not None and (not isinstance(self.chunk, (int, np.integer)) or self.chunk < 1):
            raise ValueError(f"LMFunction.chunk must be a positive int or None, got {self.chunk!r}")

    def __call__(self, params, batch):
        if self.kind == "completion_logits":
            return completion_logits(self.cfg, params, batch, self.lora, self.freeze_base)
        return _KINDS[self.kind](self.cfg, params, batch, self.lora, self.chunk, self.freeze_base)


def _as_arrays(batch):
    return None if batch is None else jax.tree_util.tree_map(jnp.asarray, batch)


def lm_problem(cfg: LlamaConfig, params: PyTree, batch: dict, safety_batch: Optional[dict] = None, *,
               lora: Optional[LoRAConfig] = None, mask: Optional[PyTree] = None, chunk: Optional[int] = None,
               name: str = "") -> Problem:
    """The Problem of fine-tuning (cfg, params) on ``batch`` (SFT loss L) against the safety skill of
    ``safety_batch`` (safe completions: the true Fisher of the completion logits, the empirical Fisher of
    log π(completion | prompt)). With ``lora`` the params are {"base", "lora"} and the mask defaults to the
    adapters (:func:`~alignment_geom.models.lora.lora_mask`); with that default θ₀ is also frozen
    (stop_gradient), so the derivatives with respect to it, which the mask discards, are never formed.
    ``chunk``: positions per block of logits in the loss and the log-likelihoods (see :func:`sft_loss`)."""
    freeze = False
    if lora is not None:
        if not (isinstance(params, dict) and set(params) == {"base", "lora"}):
            raise ValueError("with lora=..., params must be the LoRA tree {'base': θ₀, 'lora': adapters}")
        freeze = mask is None
        mask = lora_mask(params) if mask is None else mask
    safety = _as_arrays(safety_batch)

    def fn(kind):
        return LMFunction(cfg, kind, lora, None if kind == "completion_logits" else chunk, freeze)

    return Problem(params=params, loss_fn=fn("sft_loss"), batch=_as_arrays(batch),
                   logits_fn=None if safety is None else fn("completion_logits"), inputs=safety,
                   logprob_fn=None if safety is None else fn("completion_logprob"),
                   safety_batch=safety, mask=mask, name=name)
