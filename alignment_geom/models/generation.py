"""Autoregressive generation for the Llama/Qwen3 family with a KV cache, under one jit.

:func:`generate` continues a batch of left-padded prompts (B, T₀) for up to ``max_new_tokens`` tokens:
one prefill pass writes every layer's keys and values into a cache of S = T₀ + max_new_tokens slots
(L, B, S, K, d); each further step runs the model on one token per row, attending over the cache. Greedy
(``temperature=0``: argmax) or sampled from softmax(z/temperature) restricted to the top-p nucleus (the
smallest set of most likely tokens whose probability reaches ``top_p``) with an explicit PRNG key. A row stops
after it emits any of the EOS ids; later slots hold ``pad_token_id``. The loop is a ``lax.while_loop`` that ends
when every row has stopped.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from alignment_geom.models.llama import LlamaConfig, decoder, lm_head, positions_from_mask, rope_tables

PyTree = Any

__all__ = ["generate", "top_p_filter"]


def top_p_filter(z, top_p):
    """Logits z (…, V) with every token outside the top-p nucleus set to −inf (the most likely token is kept)."""
    zs = jnp.sort(z, axis=-1)[..., ::-1]
    p = jax.nn.softmax(zs, axis=-1)
    before = jnp.cumsum(p, axis=-1) - p  # probability mass of the strictly more likely tokens
    keep = before < top_p
    thresh = jnp.min(jnp.where(keep, zs, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(z >= thresh, z, -jnp.inf)


def generate(cfg: LlamaConfig, params: PyTree, tokens, attention_mask=None, *, max_new_tokens: int,
             key: Optional[jax.Array] = None, temperature: float = 0.0, top_p: float = 1.0,
             eos_token_id: Optional[Sequence[int]] = None, pad_token_id: Optional[int] = None):
    """New tokens (B, max_new_tokens) int32 continuing the left-padded prompts ``tokens`` (B, T₀).

    attention_mask (B, T₀): 1 on prompt tokens, 0 on (left) padding; each row needs ≥ 1 token. ``eos_token_id``
    defaults to cfg.eos_token_id, ``pad_token_id`` to cfg.pad_token_id, else the first EOS id, else 0.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must have shape (B, T), got {tokens.shape}")
    mask = jnp.ones_like(tokens) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    if mask.shape != tokens.shape:
        raise ValueError(f"attention_mask must have the shape of tokens {tokens.shape}, got {mask.shape}")
    m = np.asarray(mask)
    if not (np.all(np.diff(m, axis=1) >= 0) and np.all(m[:, -1] == 1)):
        raise ValueError("attention_mask must be left padding (0…0 1…1 in every row, ending in a token)")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature > 0 and key is None:
        raise ValueError("sampled generation (temperature > 0) needs an explicit PRNG key")
    eos = tuple(cfg.eos_token_id if eos_token_id is None else
                ([eos_token_id] if isinstance(eos_token_id, (int, np.integer)) else eos_token_id))
    pad = pad_token_id if pad_token_id is not None else (
        cfg.pad_token_id if cfg.pad_token_id is not None else (eos[0] if eos else 0))
    key = jax.random.PRNGKey(0) if key is None else key
    eos_arr = jnp.asarray([int(e) for e in eos] or [-1], jnp.int32)  # -1: no EOS, never emitted
    return _generate(cfg, params, tokens, mask, key, jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p),
                     eos_arr, jnp.int32(pad), max_new=int(max_new_tokens), greedy=temperature == 0)


@partial(jax.jit, static_argnames=("cfg", "max_new", "greedy"))
def _generate(cfg, params, tokens, mask, key, temperature, top_p, eos_arr, pad, *, max_new, greedy):
    B, T0 = tokens.shape
    S = T0 + max_new
    dt = params["embed"].dtype
    L, K, d = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    cache = (jnp.zeros((L, B, S, K, d), dt), jnp.zeros((L, B, S, K, d), dt))
    valid = jnp.concatenate([mask.astype(bool), jnp.zeros((B, max_new), bool)], axis=1)

    def run(toks, positions, index, valid, cache):
        T = toks.shape[1]
        h = jnp.take(params["embed"], toks, axis=0)
        cos, sin = rope_tables(cfg, positions, h.dtype)
        slots = index + jnp.arange(T)
        allowed = valid[:, None, :] & (jnp.arange(S)[None, None, :] <= slots[None, :, None])
        h, cache = decoder(cfg, params, h, cos, sin, allowed, cache=cache, index=index)
        return lm_head(cfg, params, h[:, -1]), cache

    def pick(z, key):
        if greedy:
            return jnp.argmax(z, axis=-1).astype(jnp.int32)
        return jax.random.categorical(key, top_p_filter(z / temperature, top_p), axis=-1).astype(jnp.int32)

    pos0 = positions_from_mask(mask, T0)
    z, cache = run(tokens, pos0, jnp.int32(0), valid, cache)
    last = pos0[:, -1]
    out = jnp.full((B, max_new), pad, jnp.int32)

    def cond(c):
        i, _, done, *_ = c
        return (i < max_new) & ~jnp.all(done)

    def body(c):
        i, out, done, z, cache, valid, key = c
        key, sub = jax.random.split(key)
        tok = pick(z, sub)
        tok = jnp.where(done, pad, tok)
        zero = jnp.zeros((), jnp.int32)
        out = jax.lax.dynamic_update_slice(out, tok[:, None], (zero, i))
        done = done | jnp.any(tok[:, None] == eos_arr[None, :], axis=-1)
        slot = T0 + i
        valid = jax.lax.dynamic_update_slice(valid, jnp.ones((B, 1), bool), (zero, slot))
        z, cache = run(tok[:, None], (last + 1 + i)[:, None], slot, valid, cache)
        return i + 1, out, done, z, cache, valid, key

    carry = (jnp.int32(0), out, jnp.zeros((B,), bool), z, cache, valid, key)
    return jax.lax.while_loop(cond, body, carry)[1]
